//! The `ramnbd` binary: parse the command line, set up logging, bind, serve until SIGINT or
//! SIGTERM, and exit 0 once in-flight requests are finished.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use ramnbd::cli::Cli;
use ramnbd::config::Config;
use ramnbd::export::Exports;
use ramnbd::server::{self, ServeOptions};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let config = Config::try_from(Cli::parse())?;
    init_logging(config.log_level.as_deref())?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ramnbd")
        .build()
        .context("starting the async runtime")?
        .block_on(run(config))
}

/// `--log-level` wins, then `RUST_LOG`, then `info`.
fn init_logging(level: Option<&str>) -> anyhow::Result<()> {
    let filter = match level {
        Some(level) => {
            EnvFilter::try_new(level).with_context(|| format!("bad --log-level {level:?}"))?
        }
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    Ok(())
}

async fn run(config: Config) -> anyhow::Result<()> {
    let exports = Arc::new(Exports::new(&config.exports).context("creating exports")?);
    let listeners = server::bind(&config.listen).await?;
    for export in exports.iter() {
        tracing::info!(
            name = %export.name,
            size = export.size(),
            read_only = export.read_only,
            "export ready"
        );
    }
    for listener in &listeners {
        tracing::info!("listening on {}", listener.describe());
    }

    let shutdown = CancellationToken::new();
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = sigterm.recv() => tracing::info!("SIGTERM received"),
            _ = sigint.recv() => tracing::info!("SIGINT received"),
        }
        on_signal.cancel();
    });

    let options = ServeOptions {
        max_connections: config.max_connections,
        shutdown_grace: config.shutdown_grace,
    };
    server::serve(listeners, exports, options, shutdown).await;
    tracing::info!("stopped");
    Ok(())
}
