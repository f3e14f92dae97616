//! Configuration: command-line flags, `HUBBUB_*` environment variables and a TOML
//! file, merged in that order of precedence (flag > environment > file > default).
//!
//! Owns: the definition of every setting, each named once in [`SETTINGS`] (its
//! flag, environment variable, file key, type, default and description all come
//! from that one entry), and parsing and validating them into one [`Config`].
//! Must not: open sockets or files other than the config file itself.

use clap::{Args, Parser, Subcommand};
use std::collections::HashMap;
use std::net::SocketAddr;
#[cfg(test)]
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: String,
        source: Box<toml::de::Error>,
    },
    #[error("config file {path}: unknown key {key:?}")]
    UnknownKey { path: String, key: String },
    #[error("{key}: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "hubbub",
    version,
    about = "Hubbub: a real-time chat server (WebSocket rooms, DMs, presence, durable history)",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<CliCommand>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum CliCommand {
    /// Run the server (the default when no subcommand is given).
    Serve(Box<ServeArgs>),
    /// Print a signed HS256 token, for tests and for backends that mint tokens.
    Token(TokenArgs),
    /// Work with configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Exit 0 if a Hubbub answers 200 on its /healthz (for container health checks).
    Health {
        /// The health URL (plain http).
        #[arg(long, default_value = "http://127.0.0.1:8080/healthz")]
        url: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate FILE (with HUBBUB_* from the environment on top) and print the
    /// effective configuration, secrets masked.
    Check {
        /// The TOML file.
        file: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The shared secret (the server's --jwt-secret).
    #[arg(long)]
    pub secret: String,
    /// The user id (`sub` claim).
    #[arg(long)]
    pub sub: String,
    /// Display name (`name` claim).
    #[arg(long)]
    pub name: Option<String>,
    /// Comma-separated room patterns the user may join (`rooms` claim), e.g. 'team-*,lobby'.
    #[arg(long)]
    pub rooms: Option<String>,
    /// Lifetime: 30s, 15m, 1h, 7d. Default 1h.
    #[arg(long, default_value = "1h")]
    pub ttl: String,
}

/// How a setting is given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `--key VALUE`.
    Value,
    /// `--key` alone turns it on.
    Flag,
    /// `--key` turns it on, `--no-key` off.
    Toggle,
    /// A list: the flag (the key without its plural `s`) may be repeated; the
    /// environment variable and the file give the whole list.
    Repeat,
}

/// One setting: everything about it but its type (see [`SETTINGS`]).
#[derive(Debug)]
pub struct Setting {
    pub key: &'static str,
    pub kind: Kind,
    /// The placeholder in `--help` (`--listen ADDR`).
    pub value_name: &'static str,
    pub help: &'static str,
    /// The default, as it would be written in the file ("" for none).
    pub default: fn() -> String,
    /// How the README states the default, where the value alone would not say it.
    pub default_doc: &'static str,
}

impl Setting {
    /// `--key-name`.
    pub fn flag(&self) -> String {
        let name = match self.kind {
            Kind::Repeat => self.key.strip_suffix('s').unwrap_or(self.key),
            _ => self.key,
        };
        format!("--{}", name.replace('_', "-"))
    }

    /// `HUBBUB_KEY_NAME`.
    pub fn env(&self) -> String {
        format!("HUBBUB_{}", self.key.to_uppercase())
    }

    /// The default as the README and `--help` state it.
    pub fn default_text(&self) -> String {
        match (self.default_doc, (self.default)()) {
            ("", d) if d.is_empty() => "—".to_owned(),
            ("", d) => format!("`{d}`"),
            (doc, _) => doc.to_owned(),
        }
    }

    /// The setting's row in the README's configuration table.
    pub fn readme_row(&self) -> String {
        let flag = match self.kind {
            Kind::Value => format!("`{} {}`", self.flag(), self.value_name),
            Kind::Flag => format!("`{}`", self.flag()),
            Kind::Repeat => format!("`{} {}` (repeatable)", self.flag(), self.value_name),
            Kind::Toggle => format!("`{}` / `--no-{}`", self.flag(), &self.flag()[2..]),
        };
        let default = self.default_text();
        // A `|` inside a cell, even in a code span, would end the cell in Markdown.
        let flag = flag.replace('|', "\\|");
        format!("| {flag} | {default} | {} |", self.help)
    }
}

/// The README's configuration table, as the settings define it.
pub fn readme_table() -> String {
    let mut rows = vec![
        "| flag | default | meaning |".to_owned(),
        "|---|---|---|".to_owned(),
    ];
    rows.extend(SETTINGS.iter().map(Setting::readme_row));
    rows.push(format!("| `--config FILE` | — | {CONFIG_HELP} |"));
    rows.join("\n")
}

const CONFIG_HELP: &str = "TOML file with any of the keys above";

macro_rules! settings {
    ($(
        $key:ident : $ty:ty = $default:expr ; $([$doc:literal])? $kind:ident $value_name:literal ;
        $help:literal ;
    )*) => {
        /// The effective configuration: one field per setting.
        #[derive(Debug, Clone)]
        pub struct Config {
            $( pub $key: $ty, )*
        }

        /// Every setting of `hubbub serve`, in the order of the README's table.
        pub const SETTINGS: &[Setting] = &[
            $(
                Setting {
                    key: stringify!($key),
                    kind: Kind::$kind,
                    value_name: $value_name,
                    help: $help,
                    default: || $default.to_string(),
                    default_doc: concat!("" $(, $doc)?),
                },
            )*
        ];

        impl Config {
            /// Parse each setting's winning raw value.
            fn from_raw(raw: &Raw) -> Result<Config, ConfigError> {
                Ok(Config {
                    $( $key: raw.parse(stringify!($key))?, )*
                })
            }

            /// (key, value as written in a file) of every setting.
            fn shown(&self) -> Vec<(&'static str, String)> {
                vec![ $( (stringify!($key), SettingValue::show(&self.$key)), )* ]
            }
        }
    };
}

/// A type a setting can have: parsed from its raw text (a flag's value, an
/// environment variable, or a TOML value), shown as a TOML value.
pub trait SettingValue: Sized {
    fn parse(key: &'static str, raw: &str) -> Result<Self, ConfigError>;
    fn show(&self) -> String;
}

fn parse_with<T>(key: &'static str, raw: &str, what: &str) -> Result<T, ConfigError>
where
    T: std::str::FromStr,
{
    raw.trim()
        .parse()
        .map_err(|_| invalid(key, format!("{raw:?} is not {what}")))
}

impl SettingValue for SocketAddr {
    fn parse(key: &'static str, raw: &str) -> Result<Self, ConfigError> {
        parse_with(key, raw, "an address (host:port)")
    }
    fn show(&self) -> String {
        format!("{:?}", self.to_string())
    }
}

impl SettingValue for PathBuf {
    fn parse(_: &'static str, raw: &str) -> Result<Self, ConfigError> {
        Ok(PathBuf::from(raw))
    }
    fn show(&self) -> String {
        format!("{:?}", self.display().to_string())
    }
}

impl SettingValue for String {
    fn parse(_: &'static str, raw: &str) -> Result<Self, ConfigError> {
        Ok(raw.to_owned())
    }
    fn show(&self) -> String {
        format!("{self:?}")
    }
}

impl SettingValue for usize {
    fn parse(key: &'static str, raw: &str) -> Result<Self, ConfigError> {
        parse_with(key, raw, "a whole number")
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

impl SettingValue for u32 {
    fn parse(key: &'static str, raw: &str) -> Result<Self, ConfigError> {
        parse_with(key, raw, "a whole number")
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

impl SettingValue for bool {
    fn parse(key: &'static str, raw: &str) -> Result<Self, ConfigError> {
        parse_bool(raw).ok_or_else(|| invalid(key, format!("{raw:?}: use true or false")))
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

impl SettingValue for Duration {
    fn parse(key: &'static str, raw: &str) -> Result<Self, ConfigError> {
        parse_secs(key, raw)
    }
    fn show(&self) -> String {
        self.as_secs_f64().to_string()
    }
}

/// Not set when empty.
impl<T: SettingValue> SettingValue for Option<T> {
    fn parse(key: &'static str, raw: &str) -> Result<Self, ConfigError> {
        if raw.trim().is_empty() {
            Ok(None)
        } else {
            T::parse(key, raw).map(Some)
        }
    }
    fn show(&self) -> String {
        self.as_ref()
            .map_or_else(|| "\"(none)\"".to_owned(), SettingValue::show)
    }
}

/// A comma-separated list (a TOML array is joined to one first).
impl SettingValue for Vec<String> {
    fn parse(_: &'static str, raw: &str) -> Result<Self, ConfigError> {
        Ok(split_list(raw))
    }
    fn show(&self) -> String {
        format!("{:?}", self.join(","))
    }
}

/// Addresses ("10.0.0.7") or networks ("10.0.0.0/8"), comma-separated.
impl SettingValue for Vec<ipnet::IpNet> {
    fn parse(key: &'static str, raw: &str) -> Result<Self, ConfigError> {
        split_list(raw)
            .iter()
            .map(|s| {
                s.parse::<ipnet::IpNet>()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| invalid(key, format!("{s:?} is not an IP address or CIDR")))
            })
            .collect()
    }
    fn show(&self) -> String {
        let v: Vec<String> = self.iter().map(ToString::to_string).collect();
        format!("{:?}", v.join(","))
    }
}

/// `--store`: which single-node store (a `postgres://` database URL overrides it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreChoice {
    Sqlite,
    Memory,
}

/// `--publish-check-failure`: what a send gets when the publish check cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureMode {
    /// Store the message as sent.
    Open,
    /// Refuse it with `unavailable` (the SDK retries).
    Closed,
}

impl Choice for FailureMode {
    const WORDS: &'static [(&'static str, Self)] =
        &[("open", FailureMode::Open), ("closed", FailureMode::Closed)];
}

/// A setting that is one of a few words.
trait Choice: Sized + Copy + PartialEq + 'static {
    /// Every word and what it means.
    const WORDS: &'static [(&'static str, Self)];
}

impl<T: Choice> SettingValue for T {
    fn parse(key: &'static str, raw: &str) -> Result<Self, ConfigError> {
        let raw = raw.trim();
        T::WORDS
            .iter()
            .find(|(w, _)| *w == raw)
            .map(|(_, v)| *v)
            .ok_or_else(|| {
                let words: Vec<&str> = T::WORDS.iter().map(|(w, _)| *w).collect();
                invalid(key, format!("{raw:?}: use {}", words.join(" or ")))
            })
    }
    fn show(&self) -> String {
        let word = T::WORDS
            .iter()
            .find(|(_, v)| v == self)
            .map_or("", |(w, _)| *w);
        format!("{word:?}")
    }
}

impl Choice for StoreChoice {
    const WORDS: &'static [(&'static str, Self)] = &[
        ("sqlite", StoreChoice::Sqlite),
        ("memory", StoreChoice::Memory),
    ];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl Choice for LogFormat {
    const WORDS: &'static [(&'static str, Self)] =
        &[("text", LogFormat::Text), ("json", LogFormat::Json)];
}

/// The store the settings select.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Sqlite,
    Memory,
    Postgres,
}

/// Each setting's winning raw text: flag or environment, else file, else default.
struct Raw(HashMap<&'static str, String>);

impl Raw {
    fn parse<T: SettingValue>(&self, key: &'static str) -> Result<T, ConfigError> {
        let raw = match self.0.get(key) {
            Some(v) => v.clone(),
            None => SETTINGS
                .iter()
                .find(|s| s.key == key)
                .map(|s| (s.default)())
                .unwrap_or_default(),
        };
        T::parse(key, &raw)
    }
}

/// What `hubbub serve` was given on its command line and in its environment.
#[derive(Debug, Default, Clone)]
pub struct ServeArgs {
    /// The config file (`--config`, `HUBBUB_CONFIG`).
    pub config: Option<PathBuf>,
    /// Raw values from flags or the environment, by key.
    pub given: HashMap<&'static str, String>,
}

impl ServeArgs {
    /// No flags: `file` as the config file and whatever `HUBBUB_*` says.
    pub fn from_env_and_file(file: PathBuf) -> ServeArgs {
        use clap::FromArgMatches;
        let cmd = <ServeArgs as Args>::augment_args(clap::Command::new("hubbub"));
        let mut args = cmd
            .try_get_matches_from(["hubbub"])
            .ok()
            .and_then(|m| ServeArgs::from_arg_matches(&m).ok())
            .unwrap_or_default();
        args.config = Some(file);
        args
    }

    /// Set a setting as a flag would (for tests and embedders).
    pub fn with(mut self, key: &'static str, value: &str) -> ServeArgs {
        self.given.insert(key, value.to_owned());
        self
    }
}

fn no_flag_id(key: &str) -> String {
    format!("no_{key}")
}

impl clap::Args for ServeArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        use clap::{Arg, ArgAction};
        let mut cmd = cmd.arg(
            Arg::new("config")
                .long("config")
                .env("HUBBUB_CONFIG")
                .value_name("FILE")
                .help("TOML config file (keys are the flag names with `_` for `-`)"),
        );
        for s in SETTINGS {
            let help = format!(
                "{} [default: {}]",
                s.help,
                s.default_text().replace('`', "")
            );
            let arg = Arg::new(s.key).long(s.flag()[2..].to_owned()).help(help);
            cmd = match s.kind {
                Kind::Value => {
                    let arg = arg.env(s.env()).value_name(s.value_name);
                    // Secrets stay out of `--help`.
                    cmd.arg(arg.hide_env_values(s.key.ends_with("secret")))
                }
                Kind::Repeat => cmd.arg(
                    arg.env(s.env())
                        .value_name(s.value_name)
                        .action(ArgAction::Append)
                        .value_delimiter(',')
                        .hide_env_values(true),
                ),
                Kind::Flag => cmd.arg(arg.action(ArgAction::SetTrue)),
                Kind::Toggle => cmd
                    .arg(
                        arg.action(ArgAction::SetTrue)
                            .overrides_with(no_flag_id(s.key)),
                    )
                    .arg(
                        Arg::new(no_flag_id(s.key))
                            .long(format!("no-{}", &s.flag()[2..]))
                            .action(ArgAction::SetTrue)
                            .overrides_with(s.key)
                            .help(format!("the opposite of {}", s.flag())),
                    ),
            };
        }
        cmd
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl clap::FromArgMatches for ServeArgs {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut given = HashMap::new();
        for s in SETTINGS {
            let value = match s.kind {
                Kind::Value => m.get_one::<String>(s.key).cloned(),
                Kind::Repeat => m
                    .get_many::<String>(s.key)
                    .map(|v| v.cloned().collect::<Vec<_>>().join(",")),
                Kind::Flag | Kind::Toggle => {
                    if m.get_flag(s.key) {
                        Some("true".to_owned())
                    } else if s.kind == Kind::Toggle && m.get_flag(&no_flag_id(s.key)) {
                        Some("false".to_owned())
                    } else {
                        // A flag's environment variable says true or false.
                        std::env::var(s.env()).ok()
                    }
                }
            };
            if let Some(v) = value {
                given.insert(s.key, v);
            }
        }
        Ok(ServeArgs {
            config: m.get_one::<String>("config").map(PathBuf::from),
            given,
        })
    }

    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

/// A TOML value as the raw text a flag would carry.
fn toml_raw(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        toml::Value::Array(items) => items
            .iter()
            .map(toml_raw)
            .collect::<Option<Vec<_>>>()
            .map(|v| v.join(",")),
        _ => None,
    }
}

/// The config file's values, by key; an unknown key or a table is an error.
fn read_file(path: &std::path::Path) -> Result<HashMap<&'static str, String>, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    let table: toml::Table = toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: shown.clone(),
        source: Box::new(source),
    })?;
    let mut out = HashMap::new();
    for (k, v) in &table {
        let Some(s) = SETTINGS.iter().find(|s| s.key == k) else {
            return Err(ConfigError::UnknownKey {
                path: shown,
                key: k.clone(),
            });
        };
        let raw = toml_raw(v).ok_or_else(|| {
            invalid(
                s.key,
                "must be a string, a number, a boolean or a list of them",
            )
        })?;
        out.insert(s.key, raw);
    }
    Ok(out)
}

impl Config {
    /// Merge flags and the environment (already merged by clap) over the config
    /// file over the defaults, and check the result.
    pub fn resolve(args: ServeArgs) -> Result<Config, ConfigError> {
        let mut raw = match &args.config {
            None => HashMap::new(),
            Some(path) => read_file(path)?,
        };
        raw.extend(args.given);
        let mut c = Config::from_raw(&Raw(raw))?;
        // Guests are on unless a JWT key is set, and nothing says otherwise.
        c.guests = Some(
            c.guests
                .unwrap_or(c.jwt_secret.is_none() && c.jwt_public_key.is_none()),
        );
        c.validate()?;
        Ok(c)
    }

    /// Is guest access on?
    pub fn guests_allowed(&self) -> bool {
        self.guests.unwrap_or(false)
    }

    /// Which store the settings select.
    pub fn store_kind(&self) -> StoreKind {
        match self.database_url.as_deref() {
            Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
                StoreKind::Postgres
            }
            Some(u) if u.starts_with("sqlite://") => StoreKind::Sqlite,
            _ => match self.store {
                StoreChoice::Sqlite => StoreKind::Sqlite,
                StoreChoice::Memory => StoreKind::Memory,
            },
        }
    }

    /// The store to open.
    pub fn store_config(&self) -> crate::store::StoreConfig {
        use crate::store::StoreConfig;
        match (self.store_kind(), self.database_url.as_deref()) {
            (StoreKind::Postgres, Some(url)) => StoreConfig::Postgres {
                url: url.to_owned(),
            },
            (StoreKind::Sqlite, Some(url)) if url.starts_with("sqlite://") => StoreConfig::Sqlite {
                file: PathBuf::from(&url["sqlite://".len()..]),
            },
            (StoreKind::Memory, _) => StoreConfig::Memory {
                ring: self.memory_history,
            },
            _ => StoreConfig::Sqlite {
                file: self.data_dir.join("hubbub.db"),
            },
        }
    }

    /// How this node reaches the others.
    pub fn broker(&self) -> crate::broker::BrokerConfig {
        match &self.redis_url {
            None => crate::broker::BrokerConfig::Local,
            Some(url) => crate::broker::BrokerConfig::Redis {
                url: url.clone(),
                cluster: self.redis_cluster,
                node_id: self.node_id.clone(),
                node_timeout: self.node_timeout,
            },
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let positive: [(&'static str, usize); 6] = [
            ("max_message", self.max_message),
            ("max_text", self.max_text),
            ("max_rooms_per_conn", self.max_rooms_per_conn),
            ("send_queue", self.send_queue),
            ("send_queue_bytes", self.send_queue_bytes),
            ("memory_history", self.memory_history),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self.max_message < 256 {
            return Err(invalid("max_message", "must be at least 256 bytes"));
        }
        if self.max_reply_bytes < 1024 {
            return Err(invalid("max_reply_bytes", "must be at least 1024 bytes"));
        }
        if self.rate_limit == 0 {
            return Err(invalid("rate_limit", "must be at least 1"));
        }
        if self.drain_rate == 0 {
            return Err(invalid("drain_rate", "must be at least 1"));
        }
        let csp_ok = |c: char| c.is_ascii_graphic() && !matches!(c, ';' | ',');
        if self.frame_ancestors.trim().is_empty()
            || !self
                .frame_ancestors
                .split(' ')
                .filter(|w| !w.is_empty())
                .all(|w| w.chars().all(csp_ok))
        {
            return Err(invalid(
                "frame_ancestors",
                "CSP sources separated by spaces, e.g. 'self' https://app.example",
            ));
        }
        if self.api_rate_limit == 0 {
            return Err(invalid("api_rate_limit", "must be at least 1"));
        }
        // Keys travel in an HTTP header: printable ASCII without spaces, and long
        // enough not to be guessed.
        for k in &self.api_keys {
            if k.len() < 16 || k.len() > 256 || !k.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(invalid(
                    "api_keys",
                    "each key must be 16-256 printable ASCII characters without spaces",
                ));
            }
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(invalid("tls_cert", "--tls-cert and --tls-key go together"));
        }
        if let Some(url) = &self.database_url {
            let ok = url.starts_with("postgres://")
                || url.starts_with("postgresql://")
                || url.strip_prefix("sqlite://").is_some_and(|p| !p.is_empty());
            if !ok {
                return Err(invalid(
                    "database_url",
                    "use postgres://USER@HOST/DB or sqlite://PATH (with a file path)",
                ));
            }
        }
        if self.redis_url.is_some() && self.store_kind() != StoreKind::Postgres {
            return Err(invalid(
                "redis_url",
                "several nodes must share their history: give --database-url postgres://...",
            ));
        }
        if self.redis_cluster && self.redis_url.is_none() {
            return Err(invalid(
                "redis_cluster",
                "needs --redis-url (the seed nodes)",
            ));
        }
        if let Some(url) = &self.redis_url
            && url.starts_with(crate::broker::sentinel::SCHEME)
        {
            if self.redis_cluster {
                return Err(invalid(
                    "redis_cluster",
                    "a Redis Cluster is not found through sentinels: use one or the other",
                ));
            }
            crate::broker::sentinel::SentinelUrl::parse(url)
                .map_err(|e| invalid("redis_url", e.to_string()))?;
        }
        let id_ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if self.node_id.is_empty() || self.node_id.len() > 64 || !self.node_id.chars().all(id_ok) {
            return Err(invalid(
                "node_id",
                format!("{:?}: 1-64 letters, digits, '.', '_' or '-'", self.node_id),
            ));
        }
        if let Some(url) = &self.publish_check_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(invalid(
                "publish_check_url",
                "use an http:// or https:// URL",
            ));
        }
        if let Some(url) = &self.webhook_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(invalid("webhook_url", "use an http:// or https:// URL"));
            }
            if self.store_kind() == StoreKind::Memory {
                return Err(invalid(
                    "webhook_url",
                    "webhooks need a durable queue: use SQLite or PostgreSQL, not --store memory",
                ));
            }
        }
        if self.publish_check_timeout.is_zero() {
            return Err(invalid("publish_check_timeout", "must be more than 0"));
        }
        if self.batch_delay_ms > 1000 {
            return Err(invalid(
                "batch_delay_ms",
                "must be at most 1000 (one second)",
            ));
        }
        if self.commit_interval_ms > 100 {
            return Err(invalid("commit_interval_ms", "must be at most 100"));
        }
        if self.node_timeout < Duration::from_secs(1) {
            return Err(invalid("node_timeout", "must be at least 1 second"));
        }
        Ok(())
    }

    /// The effective configuration as TOML, with secrets masked.
    pub fn describe(&self) -> String {
        self.shown()
            .into_iter()
            .map(|(key, value)| {
                let value = match key {
                    "jwt_secret" if self.jwt_secret.is_some() => "\"********\"".to_owned(),
                    "webhook_secret" if self.webhook_secret.is_some() => "\"********\"".to_owned(),
                    "api_keys" => match self.api_keys.len() {
                        1 => "\"(1 key)\"".to_owned(),
                        n => format!("\"({n} keys)\""),
                    },
                    "database_url" | "redis_url" => mask_url(&value),
                    _ => value,
                };
                format!("{key} = {value}")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

// Every setting, named once: the key gives the TOML key, the flag (`--` + the key
// with `-` for `_`) and the environment variable (`HUBBUB_` + the key in
// capitals); then its type, its default, how it is given on the command line, and
// the description that `--help` and the README's table both show (a test holds the
// README to it). `""` as a default means "not set".
settings! {
    listen: SocketAddr = "127.0.0.1:8080"; Value "ADDR";
        "address to listen on (`:0` picks a port; the chosen one is printed)";
    data_dir: PathBuf = "./hubbub-data"; Value "DIR";
        "where the SQLite history lives (`hubbub.db`)";
    store: StoreChoice = "sqlite"; Value "sqlite|memory";
        "durable SQLite, or in-memory rings (new epoch every start)";
    memory_history: usize = "1000"; Value "N";
        "messages kept per room by `--store memory`";
    guests: Option<bool> = ""; ["on, unless a JWT key is set"] Toggle "";
        "guest access (`HUBBUB_GUESTS=true/false`)";
    jwt_secret: Option<String> = ""; Value "SECRET";
        "HS256 shared secret";
    jwt_public_key: Option<PathBuf> = ""; Value "PEM_FILE";
        "RSA (RS256) or EC P-256 (ES256) public key";
    allowed_origins: Vec<String> = ""; ["empty = all"] Value "LIST";
        "comma-separated allowed `Origin`s; others get 403";
    heartbeat: Duration = "25"; Value "SECS";
        "server ping interval; silent peers are dropped after 2";
    handshake_timeout: Duration = "10"; Value "SECS";
        "time for a connection's first HTTP request line and headers (at most 16 KiB, else 431) to arrive; slower clients are dropped";
    hello_timeout: Duration = "10"; Value "SECS";
        "time to say `hello` before close 4000";
    token_expiring_notice: Duration = "30"; Value "SECS";
        "a token connection gets `token_expiring` this long before the token's `exp`; a `refresh` in time keeps it open";
    max_message: usize = "65536"; Value "BYTES";
        "largest WebSocket message; larger closes with 1009";
    max_text: usize = "4000"; Value "CHARS";
        "longest message text, in Unicode code points";
    rate_limit: u32 = "20"; Value "PER_SEC";
        "per-connection token bucket (burst 2x)";
    max_connections: usize = "0"; ["the open-file limit less 256"] Value "N";
        "WebSocket connections this node holds at most; beyond it a handshake gets 503 with `Retry-After` (counted in `hubbub_connections_refused_total`)";
    max_connections_per_ip: usize = "5000"; Value "N";
        "WebSocket connections one client address may hold on this node (behind `--trusted-proxies`, the forwarded address); beyond it a handshake gets 429 with `Retry-After`; 0: no limit";
    max_connections_per_user: usize = "100"; Value "N";
        "connections one user may hold on this node; a `hello` beyond it closes the user's oldest connection (`closing`, then 1008); 0: no limit";
    max_reply_bytes: usize = "524288"; Value "BYTES";
        "about how many bytes of messages one `history` or `joined` carries at most (the oldest are left out: `more: true` in `history`, `recovered: false` in `joined`); each 64 KiB of a reply costs one more rate-limit token";
    max_rooms_per_conn: usize = "100"; Value "N";
        "rooms one connection may join";
    send_queue: usize = "1024"; Value "N";
        "outgoing queue per connection, in messages (for a connection that batches, in frames: messages committed together count once)";
    send_queue_bytes: usize = "1048576"; Value "BYTES";
        "outgoing queue per connection, in bytes";
    tls_cert: Option<PathBuf> = ""; Value "FILE";
        "PEM certificate chain: `https://` and `wss://` on the same listener (TLS 1.2/1.3); SIGHUP reloads it; needs `--tls-key`";
    tls_key: Option<PathBuf> = ""; Value "FILE";
        "PEM private key for `--tls-cert`";
    trusted_proxies: Vec<ipnet::IpNet> = ""; Value "LIST";
        "proxy addresses or CIDRs whose `X-Forwarded-For` is believed (e.g. `127.0.0.1,10.0.0.0/8`)";
    drain_rate: u32 = "1000"; Value "PER_SEC";
        "sessions closed per second on SIGTERM";
    shutdown_timeout: Duration = "30"; Value "SECS";
        "upper bound on the whole shutdown";
    database_url: Option<String> = ""; ["SQLite in `--data-dir`"] Value "URL";
        "`postgres://USER@HOST/DB` (history shared by several nodes) or `sqlite://PATH` (one node; PATH is the database file)";
    redis_url: Option<String> = ""; Value "URL";
        "Redis for fan-out and presence between nodes (needs a `postgres://` database): `redis://HOST:PORT`, `redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE` (the primary the sentinels monitor, followed through failovers), or with `--redis-cluster` a comma-separated list of seed nodes";
    redis_cluster: bool = "false"; ["off"] Flag "";
        "the Redis is a Redis Cluster: sharded pub/sub (`SPUBLISH`/`SSUBSCRIBE`, Redis 7)";
    node_id: String = default_node_id(); ["host name"] Value "NAME";
        "this node's name in logs, Redis keys and presence";
    node_timeout: Duration = "10"; Value "SECS";
        "a node silent this long is dead; its users leave presence within 4/3 of it";
    writer_threads: usize = default_writer_threads(); ["one per core"] Value "N";
        "threads that write a room's messages straight into the sockets of idle plain-TCP connections, instead of waking each connection's session (at a lower priority than the rest of the server); 0: off, better where the node shares its cores with other busy processes";
    batch_delay_ms: u32 = "25"; Value "MS";
        "a busy room's messages to connections that asked for batches (`hello` with `batch: true`) are written at most this often, so that more leave in one write (a quiet room's next message leaves at once, and a connection's write is held only while its queue is under half full); 0: at once; at most 1000";
    commit_interval_ms: u32 = "1"; Value "MS";
        "under load, store commits (a write and an fsync each) start at most once this often, each storing every message that came meanwhile: fewer, fuller commits (a message after a quiet spell commits at once); 0: at once; at most 100";
    presence_events_max: usize = "1000"; Value "N";
        "rooms with more members than this get a `members` count (at most once a second) instead of per-user `member` events";
    api_keys: Vec<String> = ""; ["none: the API is off"] Repeat "KEY";
        "server API keys (`Authorization: Bearer KEY`); `HUBBUB_API_KEYS` and the file take a comma-separated list or an array";
    api_rate_limit: u32 = "1000"; Value "PER_SEC";
        "server API requests per second per key (burst 2x); beyond it 429";
    publish_check_url: Option<String> = ""; ["off"] Value "URL";
        "before storing a `send`, `direct`, `edit` or API post, POST it here (signed with `--webhook-secret`) and store it only if allowed (SERVER-API.md, Publish check)";
    publish_check_timeout: Duration = "2"; Value "SECS";
        "how long the publish check may take; beyond it `--publish-check-failure` decides";
    publish_check_failure: FailureMode = "closed"; Value "open|closed";
        "when the publish check times out or fails: `closed` refuses the message (`unavailable`, the SDK retries), `open` stores it";
    webhook_url: Option<String> = ""; ["off"] Value "URL";
        "POST every stored message, edit and delete here, in batches, at least once and in order per room or DM, from a durable queue (SERVER-API.md, Webhooks; needs SQLite or PostgreSQL)";
    webhook_secret: Option<String> = ""; Value "SECRET";
        "HMAC-SHA256 key of the `Hubbub-Signature` header on webhook and publish-check requests";
    webhook_queue_max: usize = "1000000"; Value "N";
        "events the webhook queue holds at most; beyond it new events are dropped, counted in `hubbub_webhook_dropped_total` and logged";
    frame_ancestors: String = "'none'"; Value "SOURCES";
        "who may frame the chat page and the console (CSP `frame-ancestors`, e.g. `'self' https://app.example`)";
    log_format: LogFormat = "text"; Value "text|json";
        "log format on stderr (`HUBBUB_LOG` sets the filter, e.g. `debug`)";
}

/// The default writer threads: one per core the process may use.
fn default_writer_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The default node id: the host name, or "node" when it has no usable one.
fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if !host.is_empty() && host.len() <= 64 && host.chars().all(ok) {
        host
    } else {
        "node".to_owned()
    }
}

/// A URL with its password replaced by `****`, for logs and `config check`.
pub fn mask_url(url: &str) -> String {
    // scheme://user:password@host/... -> scheme://user:****@host/...
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some(x) => x,
        None => return url.to_owned(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:****@{host}"),
        None => url.to_owned(),
    }
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Seconds, possibly fractional ("25", "0.5"), or with a unit ("500ms", "30s", "2m").
pub fn parse_secs(key: &'static str, s: &str) -> Result<Duration, ConfigError> {
    let bad = || {
        invalid(
            key,
            format!("{s:?} is not a duration (e.g. 25, 0.5, 500ms, 30s)"),
        )
    };
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    if !v.is_finite() || v <= 0.0 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(v * mult))
}

/// A token lifetime for `hubbub token --ttl`: 30s, 15m, 1h, 7d (a bare number is seconds).
pub fn parse_ttl(s: &str) -> Result<u64, ConfigError> {
    let bad = || {
        invalid(
            "ttl",
            format!("{s:?}: use a number with s, m, h or d (30s, 15m, 1h, 7d)"),
        )
    };
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86400),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    if n == 0 {
        return Err(bad());
    }
    n.checked_mul(mult).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(args: ServeArgs) -> Result<Config, ConfigError> {
        Config::resolve(args)
    }

    #[test]
    fn ttl_units() {
        assert_eq!(parse_ttl("30s").unwrap(), 30);
        assert_eq!(parse_ttl("15m").unwrap(), 900);
        assert_eq!(parse_ttl("1h").unwrap(), 3600);
        assert_eq!(parse_ttl("7d").unwrap(), 604800);
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("0s").is_err());
    }

    #[test]
    fn durations_accept_fractions_and_units() {
        assert_eq!(parse_secs("k", "25").unwrap(), Duration::from_secs(25));
        assert_eq!(parse_secs("k", "0.5").unwrap(), Duration::from_millis(500));
        assert_eq!(
            parse_secs("k", "500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert!(parse_secs("k", "-1").is_err());
    }

    #[test]
    fn flag_beats_file_and_file_beats_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.toml");
        std::fs::write(&path, "max_text = 100\nrate_limit = 7\n").unwrap();
        let args = ServeArgs {
            config: Some(path),
            ..Default::default()
        }
        .with("max_text", "50");
        let c = resolve(args).unwrap();
        assert_eq!(c.max_text, 50);
        assert_eq!(c.rate_limit, 7);
        assert_eq!(c.max_rooms_per_conn, 100);
    }

    #[test]
    fn every_default_parses_and_validates() {
        let c = resolve(ServeArgs::default()).expect("the defaults are a valid configuration");
        assert_eq!(c.listen, SocketAddr::from(([127, 0, 0, 1], 8080)));
        assert_eq!(c.heartbeat, Duration::from_secs(25));
        assert_eq!(c.store_kind(), StoreKind::Sqlite);
        assert!(c.guests_allowed());
    }

    #[test]
    fn file_lists_and_strings_mean_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.toml");
        std::fs::write(
            &path,
            "allowed_origins = [\"https://a\", \"https://b\"]\ntrusted_proxies = \"10.0.0.0/8, 127.0.0.1\"\nheartbeat = 0.5\n",
        )
        .unwrap();
        let c = resolve(ServeArgs {
            config: Some(path),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.allowed_origins, vec!["https://a", "https://b"]);
        assert_eq!(c.trusted_proxies.len(), 2);
        assert_eq!(c.heartbeat, Duration::from_millis(500));
    }

    #[test]
    fn unknown_file_key_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.toml");
        std::fs::write(&path, "max_txt = 100\n").unwrap();
        let args = ServeArgs {
            config: Some(path),
            ..Default::default()
        };
        let err = resolve(args).expect_err("refused");
        assert!(matches!(err, ConfigError::UnknownKey { .. }), "{err}");
        assert!(err.to_string().contains("max_txt"));
    }

    #[test]
    fn a_bad_value_names_its_setting() {
        let err = resolve(ServeArgs::default().with("max_text", "many")).expect_err("refused");
        assert!(err.to_string().starts_with("max_text:"), "{err}");
    }

    /// `key` set to `max + 1` is refused with an error naming it, and set to
    /// `max` is accepted as `read` gives it back.
    fn assert_at_most(key: &'static str, max: u32, read: impl Fn(&Config) -> u32) {
        let over = (max + 1).to_string();
        let err = resolve(ServeArgs::default().with(key, &over)).expect_err("refused");
        assert!(err.to_string().starts_with(&format!("{key}:")), "{err}");
        let ok = resolve(ServeArgs::default().with(key, &max.to_string())).expect("accepted");
        assert_eq!(read(&ok), max);
    }

    #[test]
    fn a_batch_delay_over_a_second_is_refused() {
        assert_at_most("batch_delay_ms", 1000, |c| c.batch_delay_ms);
    }

    #[test]
    fn a_commit_interval_over_100_ms_is_refused() {
        assert_at_most("commit_interval_ms", 100, |c| c.commit_interval_ms);
    }

    #[test]
    fn config_check_counts_the_api_keys_and_never_shows_them() {
        let one = resolve(ServeArgs::default().with("api_keys", "key-one-0123456789"))
            .unwrap()
            .describe();
        assert!(one.contains("api_keys = \"(1 key)\""), "{one}");
        let two =
            resolve(ServeArgs::default().with("api_keys", "key-one-0123456789,key-two-0123456789"))
                .unwrap()
                .describe();
        assert!(two.contains("api_keys = \"(2 keys)\""), "{two}");
        assert!(!two.contains("0123456789"), "{two}");
    }

    #[test]
    fn a_jwt_key_turns_guests_off_unless_asked() {
        let args = ServeArgs::default().with("jwt_secret", "s");
        assert!(!resolve(args).unwrap().guests_allowed());
        let args = ServeArgs::default()
            .with("jwt_secret", "s")
            .with("guests", "true");
        assert!(resolve(args).unwrap().guests_allowed());
    }

    #[test]
    fn a_database_url_picks_the_store() {
        let c = resolve(ServeArgs::default().with("database_url", "postgres://u@h/db")).unwrap();
        assert_eq!(c.store_kind(), StoreKind::Postgres);
        assert!(matches!(
            c.store_config(),
            crate::store::StoreConfig::Postgres { url } if url == "postgres://u@h/db"
        ));
        let c = resolve(ServeArgs::default().with("database_url", "sqlite:///var/lib/hubbub/h.db"))
            .unwrap();
        assert_eq!(c.store_kind(), StoreKind::Sqlite);
        assert!(matches!(
            c.store_config(),
            crate::store::StoreConfig::Sqlite { file } if file == Path::new("/var/lib/hubbub/h.db")
        ));
        assert!(resolve(ServeArgs::default().with("database_url", "mysql://h/db")).is_err());
        assert!(resolve(ServeArgs::default().with("database_url", "sqlite://")).is_err());
    }

    #[test]
    fn redis_needs_a_shared_postgres_database() {
        let err = resolve(ServeArgs::default().with("redis_url", "redis://h"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("postgres"), "{err}");
    }

    #[test]
    fn a_node_id_must_be_a_plain_name() {
        assert!(resolve(ServeArgs::default().with("node_id", "a|b")).is_err());
    }

    #[test]
    fn passwords_are_masked_in_urls() {
        assert_eq!(
            mask_url("postgres://u:secret@h/db"),
            "postgres://u:****@h/db"
        );
        assert_eq!(mask_url("redis://h:6379"), "redis://h:6379");
    }

    #[test]
    fn every_setting_has_a_flag_an_environment_variable_and_a_file_key() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        for s in SETTINGS {
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_id() == s.key)
                .unwrap_or_else(|| panic!("{} has a flag", s.key));
            assert_eq!(arg.get_long(), Some(&s.flag()[2..]));
            if s.kind == Kind::Value {
                assert_eq!(
                    arg.get_env().and_then(|e| e.to_str()),
                    Some(s.env().as_str())
                );
            }
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("h.toml");
            let default = (s.default)();
            let value = if default.is_empty() {
                "x"
            } else {
                default.as_str()
            };
            std::fs::write(&path, format!("{} = {value:?}\n", s.key)).unwrap();
            assert!(read_file(&path).is_ok(), "{} is a file key", s.key);
        }
    }

    #[test]
    fn the_readme_configuration_table_matches_the_settings() {
        let readme = include_str!("../README.md");
        let table = readme_table();
        assert!(
            readme.contains(&table),
            "README.md's configuration table differs from the settings; it should read:\n\n{table}\n"
        );
    }
}
