//! Configuration: command-line flags, `HUBBUB_*` environment variables and a TOML
//! file, merged in that order of precedence (flag > environment > file > default).
//!
//! Owns: parsing and validating every setting into one [`Config`]. Must not: open
//! sockets or files other than the config file itself.

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;
use std::net::SocketAddr;
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

/// Flags of `hubbub serve`. Every one is optional so that the environment and the
/// config file can fill what a flag leaves out.
#[derive(Debug, Args, Default)]
pub struct ServeArgs {
    /// TOML config file (keys are the flag names with `_` for `-`).
    #[arg(long, env = "HUBBUB_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "HUBBUB_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Directory for the SQLite history [default: ./hubbub-data].
    #[arg(long, env = "HUBBUB_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// History store: sqlite or memory [default: sqlite].
    #[arg(long, env = "HUBBUB_STORE", value_name = "sqlite|memory")]
    pub store: Option<String>,
    /// Allow guest access (default: on unless a JWT key is configured).
    #[arg(long, overrides_with = "no_guests")]
    pub guests: bool,
    /// Refuse guest access.
    #[arg(long, overrides_with = "guests")]
    pub no_guests: bool,
    /// HS256 shared secret for JWTs.
    #[arg(
        long,
        env = "HUBBUB_JWT_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub jwt_secret: Option<String>,
    /// PEM public key (RSA for RS256 or EC P-256 for ES256) for JWTs.
    #[arg(long, env = "HUBBUB_JWT_PUBLIC_KEY", value_name = "PEM_FILE")]
    pub jwt_public_key: Option<PathBuf>,
    /// Comma-separated allowed Origins; empty allows all.
    #[arg(long, env = "HUBBUB_ALLOWED_ORIGINS", value_name = "LIST")]
    pub allowed_origins: Option<String>,
    /// Seconds between server pings [default: 25].
    #[arg(long, env = "HUBBUB_HEARTBEAT", value_name = "SECS")]
    pub heartbeat: Option<String>,
    /// Seconds a new connection has to say hello [default: 10].
    #[arg(long, env = "HUBBUB_HELLO_TIMEOUT", value_name = "SECS")]
    pub hello_timeout: Option<String>,
    /// Largest WebSocket message in bytes; larger closes with 1009 [default: 65536].
    #[arg(long, env = "HUBBUB_MAX_MESSAGE", value_name = "BYTES")]
    pub max_message: Option<usize>,
    /// Longest message text in Unicode code points [default: 4000].
    #[arg(long, env = "HUBBUB_MAX_TEXT", value_name = "CHARS")]
    pub max_text: Option<usize>,
    /// Commands per second per connection (token bucket, burst 2x) [default: 20].
    #[arg(long, env = "HUBBUB_RATE_LIMIT", value_name = "PER_SEC")]
    pub rate_limit: Option<u32>,
    /// Rooms one connection may join [default: 100].
    #[arg(long, env = "HUBBUB_MAX_ROOMS_PER_CONN", value_name = "N")]
    pub max_rooms_per_conn: Option<usize>,
    /// Outgoing queue per connection, in messages [default: 1024].
    #[arg(long, env = "HUBBUB_SEND_QUEUE", value_name = "N")]
    pub send_queue: Option<usize>,
    /// Outgoing queue per connection, in bytes [default: 1048576].
    #[arg(long, env = "HUBBUB_SEND_QUEUE_BYTES", value_name = "BYTES")]
    pub send_queue_bytes: Option<usize>,
    /// Messages kept per room by --store memory [default: 1000].
    #[arg(long, env = "HUBBUB_MEMORY_HISTORY", value_name = "N")]
    pub memory_history: Option<usize>,
    /// Log format: text or json [default: text].
    #[arg(long, env = "HUBBUB_LOG_FORMAT", value_name = "text|json")]
    pub log_format: Option<String>,
    /// PEM certificate chain: serve wss:// and https:// (needs --tls-key).
    #[arg(long, env = "HUBBUB_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "HUBBUB_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Comma-separated proxy addresses or CIDRs whose X-Forwarded-For is believed.
    #[arg(long, env = "HUBBUB_TRUSTED_PROXIES", value_name = "LIST")]
    pub trusted_proxies: Option<String>,
    /// Sessions closed per second when draining on SIGTERM [default: 1000].
    #[arg(long, env = "HUBBUB_DRAIN_RATE", value_name = "PER_SEC")]
    pub drain_rate: Option<u32>,
    /// Upper bound on the whole shutdown, in seconds [default: 30].
    #[arg(long, env = "HUBBUB_SHUTDOWN_TIMEOUT", value_name = "SECS")]
    pub shutdown_timeout: Option<String>,
    /// Shared history: postgres://USER@HOST/DB (several nodes) or sqlite://PATH
    /// (one node; PATH is the database file) [default: sqlite in --data-dir].
    #[arg(long, env = "HUBBUB_DATABASE_URL", value_name = "URL")]
    pub database_url: Option<String>,
    /// Redis for fan-out and presence across nodes (needs a postgres:// --database-url).
    /// With --redis-cluster, a comma-separated list of seed nodes.
    #[arg(long, env = "HUBBUB_REDIS_URL", value_name = "URL")]
    pub redis_url: Option<String>,
    /// --redis-url points at a Redis Cluster: use sharded pub/sub (SPUBLISH/SSUBSCRIBE).
    #[arg(long, env = "HUBBUB_REDIS_CLUSTER")]
    pub redis_cluster: bool,
    /// This node's name among the nodes (letters, digits, `.`, `_`, `-`) [default: host name].
    #[arg(long, env = "HUBBUB_NODE_ID", value_name = "NAME")]
    pub node_id: Option<String>,
    /// A node silent for this long is dead: its users leave presence [default: 10].
    #[arg(long, env = "HUBBUB_NODE_TIMEOUT", value_name = "SECS")]
    pub node_timeout: Option<String>,
}

impl ServeArgs {
    /// No flags: `file` as the config file and whatever `HUBBUB_*` says.
    pub fn from_env_and_file(file: PathBuf) -> ServeArgs {
        use clap::FromArgMatches;
        let cmd = <ServeArgs as Args>::augment_args(clap::Command::new("hubbub"));
        let matches = cmd.get_matches_from(["hubbub"]);
        let mut args = ServeArgs::from_arg_matches(&matches).unwrap_or_default();
        args.config = Some(file);
        args
    }
}

/// The config file: the same keys as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    store: Option<String>,
    guests: Option<bool>,
    jwt_secret: Option<String>,
    jwt_public_key: Option<PathBuf>,
    allowed_origins: Option<StrOrList>,
    heartbeat: Option<NumOrStr>,
    hello_timeout: Option<NumOrStr>,
    max_message: Option<usize>,
    max_text: Option<usize>,
    rate_limit: Option<u32>,
    max_rooms_per_conn: Option<usize>,
    send_queue: Option<usize>,
    send_queue_bytes: Option<usize>,
    memory_history: Option<usize>,
    log_format: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    trusted_proxies: Option<StrOrList>,
    drain_rate: Option<u32>,
    shutdown_timeout: Option<NumOrStr>,
    database_url: Option<String>,
    redis_url: Option<String>,
    redis_cluster: Option<bool>,
    node_id: Option<String>,
    node_timeout: Option<NumOrStr>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StrOrList {
    Str(String),
    List(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum NumOrStr {
    Int(i64),
    Float(f64),
    Str(String),
}

impl NumOrStr {
    fn into_string(self) -> String {
        match self {
            NumOrStr::Int(i) => i.to_string(),
            NumOrStr::Float(f) => f.to_string(),
            NumOrStr::Str(s) => s,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Sqlite,
    Memory,
    Postgres,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub store: StoreKind,
    pub guests: bool,
    pub jwt_secret: Option<String>,
    pub jwt_public_key: Option<PathBuf>,
    pub allowed_origins: Vec<String>,
    pub heartbeat: Duration,
    pub hello_timeout: Duration,
    pub max_message: usize,
    pub max_text: usize,
    pub rate_limit: u32,
    pub max_rooms_per_conn: usize,
    pub send_queue: usize,
    pub send_queue_bytes: usize,
    pub memory_history: usize,
    pub log_format: LogFormat,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub drain_rate: u32,
    pub shutdown_timeout: Duration,
    /// The SQLite database file (`sqlite://PATH`); None: `data_dir/hubbub.db`.
    pub sqlite_file: Option<PathBuf>,
    /// `postgres://...` when `store` is Postgres.
    pub postgres_url: Option<String>,
    pub redis_url: Option<String>,
    pub redis_cluster: bool,
    pub node_id: String,
    pub node_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./hubbub-data"),
            store: StoreKind::Sqlite,
            guests: true,
            jwt_secret: None,
            jwt_public_key: None,
            allowed_origins: Vec::new(),
            heartbeat: Duration::from_secs(25),
            hello_timeout: Duration::from_secs(10),
            max_message: 65536,
            max_text: 4000,
            rate_limit: 20,
            max_rooms_per_conn: 100,
            send_queue: 1024,
            send_queue_bytes: 1 << 20,
            memory_history: 1000,
            log_format: LogFormat::Text,
            tls_cert: None,
            tls_key: None,
            trusted_proxies: Vec::new(),
            drain_rate: 1000,
            shutdown_timeout: Duration::from_secs(30),
            sqlite_file: None,
            postgres_url: None,
            redis_url: None,
            redis_cluster: false,
            node_id: default_node_id(),
            node_timeout: Duration::from_secs(10),
        }
    }
}

impl Config {
    /// Merge flags (already merged with the environment by clap) over the config
    /// file over the defaults. `guests_env` is `HUBBUB_GUESTS`, read by the caller.
    pub fn resolve(args: ServeArgs, guests_env: Option<String>) -> Result<Config, ConfigError> {
        let file = match &args.config {
            None => FileConfig::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                toml::from_str(&text).map_err(|source| ConfigError::Parse {
                    path: path.display().to_string(),
                    source: Box::new(source),
                })?
            }
        };
        let d = Config::default();

        let listen_s = args.listen.or(file.listen);
        let listen = match listen_s {
            None => d.listen,
            Some(s) => s
                .parse()
                .map_err(|e| invalid("listen", format!("{s:?} is not an address: {e}")))?,
        };
        let mut store = match args.store.or(file.store).as_deref() {
            None | Some("sqlite") => StoreKind::Sqlite,
            Some("memory") => StoreKind::Memory,
            Some(other) => {
                return Err(invalid("store", format!("{other:?}: use sqlite or memory")));
            }
        };
        let mut sqlite_file = None;
        let mut postgres_url = None;
        match args
            .database_url
            .or(file.database_url)
            .filter(|s| !s.is_empty())
        {
            None => {}
            Some(url) => {
                if let Some(path) = url.strip_prefix("sqlite://") {
                    if path.is_empty() {
                        return Err(invalid("database_url", "sqlite:// needs a file path"));
                    }
                    store = StoreKind::Sqlite;
                    sqlite_file = Some(PathBuf::from(path));
                } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
                    store = StoreKind::Postgres;
                    postgres_url = Some(url);
                } else {
                    return Err(invalid(
                        "database_url",
                        "use postgres://USER@HOST/DB or sqlite://PATH",
                    ));
                }
            }
        }
        let redis_url = args.redis_url.or(file.redis_url).filter(|s| !s.is_empty());
        let redis_cluster = args.redis_cluster || file.redis_cluster.unwrap_or(false);
        let node_id = args.node_id.or(file.node_id).unwrap_or(d.node_id.clone());
        let node_timeout = match args
            .node_timeout
            .or(file.node_timeout.map(NumOrStr::into_string))
        {
            None => d.node_timeout,
            Some(s) => parse_secs("node_timeout", &s)?,
        };
        let jwt_secret = args
            .jwt_secret
            .or(file.jwt_secret)
            .filter(|s| !s.is_empty());
        let jwt_public_key = args.jwt_public_key.or(file.jwt_public_key);
        let guests_flag = if args.guests {
            Some(true)
        } else if args.no_guests {
            Some(false)
        } else {
            None
        };
        let guests_env = match guests_env {
            None => None,
            Some(v) => Some(parse_bool(&v).ok_or_else(|| {
                invalid("guests", format!("HUBBUB_GUESTS={v:?}: use true or false"))
            })?),
        };
        let guests = guests_flag
            .or(guests_env)
            .or(file.guests)
            .unwrap_or(jwt_secret.is_none() && jwt_public_key.is_none());
        let allowed_origins = match args.allowed_origins {
            Some(s) => split_list(&s),
            None => match file.allowed_origins {
                None => Vec::new(),
                Some(StrOrList::Str(s)) => split_list(&s),
                Some(StrOrList::List(l)) => l.into_iter().filter(|s| !s.is_empty()).collect(),
            },
        };
        let heartbeat = match args.heartbeat.or(file.heartbeat.map(NumOrStr::into_string)) {
            None => d.heartbeat,
            Some(s) => parse_secs("heartbeat", &s)?,
        };
        let hello_timeout = match args
            .hello_timeout
            .or(file.hello_timeout.map(NumOrStr::into_string))
        {
            None => d.hello_timeout,
            Some(s) => parse_secs("hello_timeout", &s)?,
        };
        let log_format = match args.log_format.or(file.log_format).as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(invalid(
                    "log_format",
                    format!("{other:?}: use text or json"),
                ));
            }
        };
        let trusted_list = match args.trusted_proxies {
            Some(s) => split_list(&s),
            None => match file.trusted_proxies {
                None => Vec::new(),
                Some(StrOrList::Str(s)) => split_list(&s),
                Some(StrOrList::List(l)) => l,
            },
        };
        let trusted_proxies = trusted_list
            .iter()
            .map(|p| parse_net(p))
            .collect::<Result<Vec<_>, _>>()?;
        let shutdown_timeout = match args
            .shutdown_timeout
            .or(file.shutdown_timeout.map(NumOrStr::into_string))
        {
            None => d.shutdown_timeout,
            Some(s) => parse_secs("shutdown_timeout", &s)?,
        };
        let tls_cert = args.tls_cert.or(file.tls_cert);
        let tls_key = args.tls_key.or(file.tls_key);
        let c = Config {
            sqlite_file,
            postgres_url,
            redis_url,
            redis_cluster,
            node_id,
            node_timeout,
            tls_cert,
            tls_key,
            trusted_proxies,
            shutdown_timeout,
            drain_rate: args.drain_rate.or(file.drain_rate).unwrap_or(d.drain_rate),
            listen,
            data_dir: args.data_dir.or(file.data_dir).unwrap_or(d.data_dir),
            store,
            guests,
            jwt_secret,
            jwt_public_key,
            allowed_origins,
            heartbeat,
            hello_timeout,
            max_message: args
                .max_message
                .or(file.max_message)
                .unwrap_or(d.max_message),
            max_text: args.max_text.or(file.max_text).unwrap_or(d.max_text),
            rate_limit: args.rate_limit.or(file.rate_limit).unwrap_or(d.rate_limit),
            max_rooms_per_conn: args
                .max_rooms_per_conn
                .or(file.max_rooms_per_conn)
                .unwrap_or(d.max_rooms_per_conn),
            send_queue: args.send_queue.or(file.send_queue).unwrap_or(d.send_queue),
            send_queue_bytes: args
                .send_queue_bytes
                .or(file.send_queue_bytes)
                .unwrap_or(d.send_queue_bytes),
            memory_history: args
                .memory_history
                .or(file.memory_history)
                .unwrap_or(d.memory_history),
            log_format,
        };
        c.validate()?;
        Ok(c)
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
        if self.rate_limit == 0 {
            return Err(invalid("rate_limit", "must be at least 1"));
        }
        if self.drain_rate == 0 {
            return Err(invalid("drain_rate", "must be at least 1"));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(invalid("tls_cert", "--tls-cert and --tls-key go together"));
        }
        if self.redis_url.is_some() && self.store != StoreKind::Postgres {
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
        let id_ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if self.node_id.is_empty() || self.node_id.len() > 64 || !self.node_id.chars().all(id_ok) {
            return Err(invalid(
                "node_id",
                format!("{:?}: 1-64 letters, digits, '.', '_' or '-'", self.node_id),
            ));
        }
        if self.node_timeout < Duration::from_secs(1) {
            return Err(invalid("node_timeout", "must be at least 1 second"));
        }
        Ok(())
    }
}

impl Config {
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
}

/// An address ("10.0.0.7") or a network ("10.0.0.0/8").
fn parse_net(s: &str) -> Result<ipnet::IpNet, ConfigError> {
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| {
            invalid(
                "trusted_proxies",
                format!("{s:?} is not an IP address or CIDR"),
            )
        })
}

impl Config {
    /// The effective configuration as TOML, with secrets masked.
    pub fn describe(&self) -> String {
        let opt = |p: &Option<PathBuf>| {
            p.as_ref()
                .map_or("(none)".to_owned(), |p| p.display().to_string())
        };
        let list = |v: &[String]| {
            if v.is_empty() {
                "(all)".to_owned()
            } else {
                v.join(",")
            }
        };
        let nets: Vec<String> = self
            .trusted_proxies
            .iter()
            .map(ToString::to_string)
            .collect();
        [
            format!("listen = {:?}", self.listen.to_string()),
            format!("data_dir = {:?}", self.data_dir.display().to_string()),
            format!(
                "store = {:?}",
                match self.store {
                    StoreKind::Sqlite => "sqlite",
                    StoreKind::Memory => "memory",
                    StoreKind::Postgres => "postgres",
                }
            ),
            format!("memory_history = {}", self.memory_history),
            format!("guests = {}", self.guests),
            format!(
                "jwt_secret = {:?}",
                if self.jwt_secret.is_some() {
                    "********"
                } else {
                    "(none)"
                }
            ),
            format!("jwt_public_key = {:?}", opt(&self.jwt_public_key)),
            format!("allowed_origins = {:?}", list(&self.allowed_origins)),
            format!("heartbeat = {}", self.heartbeat.as_secs_f64()),
            format!("hello_timeout = {}", self.hello_timeout.as_secs_f64()),
            format!("max_message = {}", self.max_message),
            format!("max_text = {}", self.max_text),
            format!("rate_limit = {}", self.rate_limit),
            format!("max_rooms_per_conn = {}", self.max_rooms_per_conn),
            format!("send_queue = {}", self.send_queue),
            format!("send_queue_bytes = {}", self.send_queue_bytes),
            format!(
                "log_format = {:?}",
                match self.log_format {
                    LogFormat::Text => "text",
                    LogFormat::Json => "json",
                }
            ),
            format!("tls_cert = {:?}", opt(&self.tls_cert)),
            format!("tls_key = {:?}", opt(&self.tls_key)),
            format!(
                "trusted_proxies = {:?}",
                if nets.is_empty() {
                    "(none)".to_owned()
                } else {
                    nets.join(",")
                }
            ),
            format!("drain_rate = {}", self.drain_rate),
            format!("shutdown_timeout = {}", self.shutdown_timeout.as_secs_f64()),
            format!(
                "database_url = {:?}",
                match (&self.postgres_url, &self.sqlite_file) {
                    (Some(u), _) => mask_url(u),
                    (None, Some(f)) => format!("sqlite://{}", f.display()),
                    (None, None) => "(sqlite in data_dir)".to_owned(),
                }
            ),
            format!(
                "redis_url = {:?}",
                self.redis_url
                    .as_deref()
                    .map_or("(none)".to_owned(), mask_url)
            ),
            format!("redis_cluster = {}", self.redis_cluster),
            format!("node_id = {:?}", self.node_id),
            format!("node_timeout = {}", self.node_timeout.as_secs_f64()),
        ]
        .join("\n")
    }
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
            parse_secs("k", "200ms").unwrap(),
            Duration::from_millis(200)
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
            max_text: Some(50),
            ..Default::default()
        };
        let c = Config::resolve(args, None).unwrap();
        assert_eq!(c.max_text, 50);
        assert_eq!(c.rate_limit, 7);
        assert_eq!(c.max_rooms_per_conn, 100);
    }

    #[test]
    fn unknown_file_key_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.toml");
        std::fs::write(&path, "max_txt = 100\n").unwrap();
        let args = ServeArgs {
            config: Some(path),
            ..Default::default()
        };
        assert!(matches!(
            Config::resolve(args, None),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn a_jwt_key_turns_guests_off_unless_asked() {
        let args = ServeArgs {
            jwt_secret: Some("s".into()),
            ..Default::default()
        };
        assert!(!Config::resolve(args, None).unwrap().guests);
        let args = ServeArgs {
            jwt_secret: Some("s".into()),
            guests: true,
            ..Default::default()
        };
        assert!(Config::resolve(args, None).unwrap().guests);
    }

    #[test]
    fn a_database_url_picks_the_store() {
        let pg = ServeArgs {
            database_url: Some("postgres://u@h/db".into()),
            ..Default::default()
        };
        let c = Config::resolve(pg, None).unwrap();
        assert_eq!(c.store, StoreKind::Postgres);
        assert_eq!(c.postgres_url.as_deref(), Some("postgres://u@h/db"));
        let lite = ServeArgs {
            database_url: Some("sqlite:///var/lib/hubbub/h.db".into()),
            ..Default::default()
        };
        let c = Config::resolve(lite, None).unwrap();
        assert_eq!(c.store, StoreKind::Sqlite);
        assert_eq!(c.sqlite_file, Some(PathBuf::from("/var/lib/hubbub/h.db")));
        let other = ServeArgs {
            database_url: Some("mysql://h/db".into()),
            ..Default::default()
        };
        assert!(Config::resolve(other, None).is_err());
    }

    #[test]
    fn redis_needs_a_shared_postgres_database() {
        let args = ServeArgs {
            redis_url: Some("redis://h".into()),
            ..Default::default()
        };
        let err = Config::resolve(args, None).unwrap_err().to_string();
        assert!(err.contains("postgres"), "{err}");
    }

    #[test]
    fn a_node_id_must_be_a_plain_name() {
        let args = ServeArgs {
            node_id: Some("a|b".into()),
            ..Default::default()
        };
        assert!(Config::resolve(args, None).is_err());
    }

    #[test]
    fn passwords_are_masked_in_urls() {
        assert_eq!(
            mask_url("postgres://u:secret@h/db"),
            "postgres://u:****@h/db"
        );
        assert_eq!(mask_url("redis://h:6379"), "redis://h:6379");
    }
}
