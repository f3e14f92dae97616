//! The `hubbub` binary: parse the command line, set up logging and metrics, and run
//! the server (or mint a token). Errors become `anyhow` only here, at the edge.

use anyhow::Context;
use clap::Parser;
use hubbub::config::{Cli, CliCommand, Config, LogFormat, ServeArgs, TokenArgs, parse_ttl};
use hubbub::server::Server;
use std::io::Write;
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(CliCommand::Token(args)) => token(args),
        Some(CliCommand::Serve(args)) => serve(*args),
        None => serve(cli.serve),
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
    let config = Config::resolve(args, std::env::var("HUBBUB_GUESTS").ok())?;
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
            store = ?config.store,
            guests = config.guests,
            "hubbub listening"
        );
        // Tests and scripts read this line to find the port when listening on :0.
        println!("hubbub listening on http://{addr}");
        let _ = std::io::stdout().flush();
        tokio::spawn(signals(shutdown));
        server.run().await?;
        Ok(())
    })
}

async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
    }
    shutdown.cancel();
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
