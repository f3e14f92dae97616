//! The `hubbub` binary: parse the command line, set up logging and metrics, and run
//! the server (or mint a token). Errors become `anyhow` only here, at the edge.

/// jemalloc instead of the system allocator. An idle connection is a few small
/// long-lived objects born between a handshake's short-lived buffers; glibc malloc
/// left those holes in its arenas (measured with `hubbub-bench idle --conns 19000
/// --rooms 1`: 2,731 B of server RSS per connection with glibc, 2,248 B with
/// jemalloc configured as below).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read from this symbol when it starts (`_RJEM_MALLOC_CONF` in
/// the environment overrides them): a background thread gives freed pages back to
/// the OS after one second rather than ten, so the server's RSS follows what it
/// holds.
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: MallocConf =
    MallocConf(c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

/// A C string pointer jemalloc reads at start; it points at a static literal.
#[repr(transparent)]
struct MallocConf(*const std::ffi::c_char);
// SAFETY: the pointer is to an immutable 'static C string; nothing ever writes it.
unsafe impl Sync for MallocConf {}

use anyhow::Context;
use clap::Parser;
use hubbub::config::{
    Cli, CliCommand, Config, ConfigCommand, LogFormat, ServeArgs, TokenArgs, parse_ttl,
};
use hubbub::server::Server;
use std::io::Write;
use tokio_util::sync::CancellationToken;

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hubbub: {}", one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, skipping a cause that the message before
/// it already spells out (our error types include their cause in their text).
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut prev = String::new();
    for cause in e.chain() {
        let m = cause.to_string();
        if !prev.contains(&m) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&m);
        }
        prev = m;
    }
    out
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(CliCommand::Token(args)) => token(args),
        Some(CliCommand::Serve(args)) => serve(*args),
        Some(CliCommand::Config(ConfigCommand::Check { file })) => config_check(file),
        Some(CliCommand::Health { url }) => health(&url),
        None => serve(cli.serve),
    }
}

fn config_check(file: std::path::PathBuf) -> anyhow::Result<()> {
    let args = ServeArgs::from_env_and_file(file);
    let config = Config::resolve(args)?;
    println!("# effective configuration (file, then HUBBUB_* environment, then defaults)");
    println!("{}", config.describe());
    Ok(())
}

/// A plain-HTTP GET of `url` that succeeds on status 200; no TLS, no redirects.
fn health(url: &str) -> anyhow::Result<()> {
    use std::io::{Read, Write as _};
    let rest = url
        .strip_prefix("http://")
        .context("health: only http:// URLs are supported")?;
    let (host, path) = rest.split_once('/').map_or((rest, "/"), |(h, p)| (h, p));
    let path = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    };
    let addr = std::net::ToSocketAddrs::to_socket_addrs(host)?
        .next()
        .context("health: cannot resolve the host")?;
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3))?;
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(3)))?;
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 16];
    let n = tcp.read(&mut head)?;
    let line = String::from_utf8_lossy(&head[..n]);
    if line.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        anyhow::bail!("health: {url} answered {line:?}")
    }
}

fn token(args: TokenArgs) -> anyhow::Result<()> {
    let ttl = parse_ttl(&args.ttl)?;
    let rooms = args.rooms.map(|r| {
        r.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    });
    let t = hubbub::auth::mint_hs256(
        &args.secret,
        &args.sub,
        args.name.as_deref(),
        rooms,
        Some(ttl),
    )
    .context("signing the token")?;
    println!("{t}");
    Ok(())
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config::resolve(args)?;
    init_logging(config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        let prometheus = hubbub::metrics::install().context("installing the metrics recorder")?;
        let shutdown = CancellationToken::new();
        let server = Server::bind(config.clone(), Some(prometheus), shutdown.clone()).await?;
        let addr = server.local_addr()?;
        tracing::info!(
            %addr,
            store = ?config.store_kind(),
            guests = config.guests_allowed(),
            "hubbub listening"
        );
        // The handlers are installed before the "listening" line: until then a
        // SIGHUP or SIGTERM takes its default action and kills the process, and
        // whoever read the line (a test, a supervisor) may signal at once.
        let signals = Signals::install().context("installing the signal handlers")?;
        tokio::spawn(signals.run(shutdown, server.tls()));
        // Tests and scripts read this line to find the port when listening on :0.
        println!("hubbub listening on http://{addr}");
        let _ = std::io::stdout().flush();
        server.run().await?;
        Ok(())
    })
}

/// The process's signal handlers: SIGTERM and Ctrl-C start the drain; SIGHUP
/// re-reads the TLS certificate and key (new connections use them, established ones
/// are untouched, a bad file keeps the old certificate) and is otherwise logged and
/// ignored, so a `kill -HUP` meant as "reload" never stops a plain-HTTP server.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn run(
        mut self,
        shutdown: CancellationToken,
        tls: Option<std::sync::Arc<hubbub::tls::TlsCerts>>,
    ) {
        loop {
            tokio::select! {
                _ = self.term.recv() => {
                    tracing::info!("SIGTERM received");
                    break;
                }
                _ = self.int.recv() => {
                    tracing::info!("interrupt received");
                    break;
                }
                _ = self.hup.recv() => match &tls {
                    Some(tls) => match tls.reload() {
                        Ok(()) => tracing::info!("TLS certificate reloaded"),
                        Err(e) => tracing::error!(
                            error = %e,
                            "TLS reload failed; keeping the old certificate"
                        ),
                    },
                    None => tracing::info!("SIGHUP received; nothing to reload without TLS"),
                },
            }
        }
        shutdown.cancel();
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("HUBBUB_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
