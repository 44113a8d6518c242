//! The `ramnbd` binary: parse the command line, load the configuration, set up logging, take
//! over socket-activated sockets or bind, tell systemd it is ready, serve until SIGINT or
//! SIGTERM, and exit 0 once in-flight requests are finished.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ramnbd::cli::Cli;
use ramnbd::config::{Config, ListenAddr, format_size};
use ramnbd::export::Exports;
use ramnbd::image::Images;
use ramnbd::metrics::{self, Metrics};
use ramnbd::server::{self, ServeOptions};
use ramnbd::session::CONNECTION_BUFFER_BYTES;
use ramnbd::shutdown::{Phase, Shutdown};
use ramnbd::systemd::{self, Passed};
use ramnbd::tls::{Credentials, Tls, TlsMode};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    if let Some(file) = cli.check_config.clone() {
        return Ok(check_config(cli, file));
    }
    let listen_flags = !cli.listen.is_empty() || !cli.unix.is_empty();
    let config = match Config::load(cli) {
        Ok(config) => config,
        Err(err) => {
            // The message already says where and how to fix it; no backtrace wanted.
            eprintln!("ramnbd: invalid configuration: {err}");
            return Ok(ExitCode::FAILURE);
        }
    };
    // Bad certificates refuse the start as a bad configuration does: one line, exit 1.
    let tls = match tls_from(&config) {
        Ok(tls) => tls,
        Err(err) => {
            eprintln!("ramnbd: invalid configuration: {err:#}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let _log_flush = init_logging(config.log_level.as_deref())?;
    // Marks this process as an I/O flusher: its memory allocations never wait on I/O, and it
    // is not throttled by dirty-page writeback. Why: when the kernel's NBD client for this
    // server runs on the same host, reclaim may need to write dirty pages *to our device*; if
    // serving that write needed reclaim that waits on our device's writeback, the two would
    // wait on each other forever. Threads inherit the flag, so this comes before the runtime
    // starts them. Needs CAP_SYS_RESOURCE.
    if let Err(err) = rustix::process::configure_io_flusher_behavior(true) {
        tracing::info!(
            cause = %err,
            "not an I/O flusher (PR_SET_IO_FLUSHER needs CAP_SYS_RESOURCE); this only matters \
             when the kernel NBD client runs on this host"
        );
    }
    // Before any thread exists: listenfd removes LISTEN_FDS/LISTEN_PID from the environment.
    let passed = systemd::take_passed()?;
    if !passed.listeners.is_empty() && listen_flags {
        anyhow::bail!(
            "--listen and --unix cannot be used under socket activation (LISTEN_FDS is set): \
             the sockets passed by the service manager are served; drop the flags or the \
             .socket unit"
        );
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ramnbd")
        .build()
        .context("starting the async runtime")?
        .block_on(run(config, passed, tls))?;
    Ok(ExitCode::SUCCESS)
}

/// `--check-config [FILE]`: loads and validates, prints a summary (stdout) or the error
/// (stderr). Exit status 0 or 1. Binds and allocates nothing.
fn check_config(mut cli: Cli, file: Option<PathBuf>) -> ExitCode {
    if let Some(file) = file {
        cli.config = Some(file);
        cli.no_config = false;
    }
    let source = Config::file_for(&cli);
    let shown = source.as_ref().map_or_else(
        || "built-in defaults (no config file)".to_owned(),
        |path| path.display().to_string(),
    );
    match Config::load(cli) {
        Ok(config) => {
            if let Err(err) = tls_from(&config) {
                eprintln!("ramnbd: invalid configuration: {err:#}");
                return ExitCode::FAILURE;
            }
            let tls = match (&config.tls.certificates, config.tls.mode) {
                (Some(dir), mode) => format!(
                    "{} (certificates {}{})",
                    mode.as_str(),
                    dir.display(),
                    if config.tls.verify_peer {
                        ", client certificates verified"
                    } else {
                        ""
                    }
                ),
                (None, mode) => mode.as_str().to_owned(),
            };
            let listen: Vec<String> = config
                .listen
                .iter()
                .map(|l| match l {
                    ListenAddr::Tcp(addr) => format!("tcp {addr}"),
                    ListenAddr::Unix(path) => format!("unix {}", path.display()),
                })
                .collect();
            let off_if_zero = |d: Duration| {
                if d.is_zero() {
                    "off".to_owned()
                } else {
                    format!("{d:?}")
                }
            };
            let keepalive = match config.tcp_keepalive.as_secs().max(1) {
                _ if config.tcp_keepalive.is_zero() => "off".to_owned(),
                secs => format!(
                    "{secs}s idle, then {probes} probes {secs}s apart (a vanished client is \
                     closed within {}s)",
                    secs * (1 + server::KEEPALIVE_PROBES as u64),
                    probes = server::KEEPALIVE_PROBES,
                ),
            };
            let allow = match config.allow.as_slice() {
                [] => "any address".to_owned(),
                nets => nets
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" "),
            };
            let export_access: Vec<String> = config
                .exports
                .iter()
                .map(|e| format!("{:?}: {}", e.name, e.access.describe()))
                .collect();
            let per_client = match config.max_connections_per_client {
                0 => "no cap".to_owned(),
                n => n.to_string(),
            };
            println!(
                "{shown}: OK\n  exports: {}\n  listen: {}\n  tcp clients allowed from: {allow}\n  \
                 export access: {}\n  metrics: {}\n  shutdown grace: {:?}\n  \
                 connections: at most {} (per client: {per_client}), handshake timeout: {}, \
                 tcp keepalive: {keepalive}\n  memory for requests in flight: at most {} per \
                 connection, {} for all {} (buffers are mapped, resident as used)\n  tls: {tls}",
                config.describe_exports(),
                listen.join(", "),
                export_access.join(", "),
                config.metrics.as_deref().unwrap_or("off"),
                config.shutdown_grace,
                config.max_connections,
                off_if_zero(config.handshake_timeout),
                format_size(CONNECTION_BUFFER_BYTES as u64),
                format_size(CONNECTION_BUFFER_BYTES as u64 * config.max_connections as u64),
                config.max_connections,
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("ramnbd: invalid configuration: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Log lines waiting for stderr; beyond this, new lines are dropped (and counted).
const LOG_QUEUE_LINES: usize = 16 * 1024;

/// `--log-level` wins, then `RUST_LOG`, then `info`. Lines go to stderr from a thread of
/// their own: if stderr blocks (a pipe nobody reads, a stalled journal), lines are dropped
/// rather than stopping the thread that logged, which would stall every connection it
/// serves and the signal handler with them. Keep the guard until exit: dropping it flushes
/// (waiting at most about a second).
fn init_logging(level: Option<&str>) -> anyhow::Result<WorkerGuard> {
    let filter = match level {
        Some(level) => {
            EnvFilter::try_new(level).with_context(|| format!("bad --log-level {level:?}"))?
        }
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let queue = |inner| {
        tracing_appender::non_blocking::NonBlockingBuilder::default()
            .buffered_lines_limit(LOG_QUEUE_LINES)
            .lossy(true)
            .thread_name("ramnbd-log")
            .finish(inner)
    };
    // Under systemd, stderr goes to the journal: entries with priorities and fields there
    // (ramnbd::journal), through the same lossy queue. The journal has its own timestamps.
    if ramnbd::journal::stderr_is_journal() {
        match ramnbd::journal::JournalSocket::connect() {
            Ok(socket) => {
                let (writer, guard) = queue(Box::new(socket) as Box<dyn std::io::Write + Send>);
                tracing_subscriber::registry()
                    .with(filter)
                    .with(ramnbd::journal::JournalLayer::new(writer))
                    .init();
                return Ok(guard);
            }
            Err(err) => eprintln!(
                "ramnbd: cannot open the journal's socket {} ({err}): logging text to stderr",
                ramnbd::journal::SOCKET
            ),
        }
    }
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = queue(Box::new(std::io::stderr()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().init();
    } else {
        builder.init();
    }
    Ok(guard)
}

/// SIGTERM and SIGINT move the stop on one phase each (see `ramnbd::shutdown`): the first
/// stops accepting and lets requests in flight finish, the second closes connections after
/// their queued replies, the third drops whatever is left at once. With `hand_over` (the fd
/// store is in use), the first SIGTERM is a hand-over instead: sessions suspend at a request
/// boundary, to be stored and resumed by the next process.
fn spawn_signal_handler(shutdown: Shutdown, hand_over: bool) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                _ = sigterm.recv() => "SIGTERM",
                _ = sigint.recv() => "SIGINT",
            };
            ramnbd::journal::stream_from_now_on();
            if hand_over && name == "SIGTERM" && shutdown.phase() == Phase::Running {
                tracing::info!("{name} received: handing the connections over");
                systemd::stopping("handing over: suspending connections at a request boundary");
                shutdown.hand_over();
                continue;
            }
            match shutdown.escalate() {
                Phase::Running => {}
                Phase::Stopping => {
                    tracing::info!("{name} received");
                    systemd::stopping("stopping: finishing requests in flight");
                }
                Phase::Closing => tracing::info!("{name} again: closing connections now"),
                Phase::Aborting => tracing::info!("{name} a third time: exiting now"),
            }
        }
    });
    Ok(())
}

/// The TLS mode with its credentials loaded; an unusable credentials directory refuses the
/// start (the error names the file and the fix).
fn tls_from(config: &Config) -> anyhow::Result<Tls> {
    match (&config.tls.certificates, config.tls.mode) {
        (Some(dir), mode) if mode != TlsMode::Off => {
            let credentials = Credentials::load(dir, config.tls.verify_peer)
                .context("loading the TLS certificates")?;
            Ok(Tls::new(mode, Arc::new(credentials)))
        }
        _ => Ok(Tls::off()),
    }
}

/// SIGHUP reads the TLS certificates again (besides saving images, see `ramnbd::image`): new
/// handshakes get the new ones, connections keep theirs; if the directory no longer loads,
/// the old certificates stay in use and the error is logged.
fn spawn_tls_reload(credentials: Arc<Credentials>, shutdown: Shutdown) -> anyhow::Result<()> {
    let mut hangup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = hangup.recv() => {}
                () = shutdown.reached(Phase::Stopping) => return,
            }
            match credentials.reload() {
                Ok(()) => tracing::info!(
                    certificates = %credentials.dir().display(),
                    "SIGHUP received: TLS certificates reloaded; new connections use them"
                ),
                Err(err) => tracing::error!(
                    "SIGHUP received: TLS certificates not reloaded, the previous ones stay in \
                     use: {err}"
                ),
            }
        }
    });
    Ok(())
}

/// One log line with what the exports hold and the cap, so RAM use is visible without metrics.
fn log_memory(exports: &Exports, what: &str) {
    let (held, cap) = exports.memory_usage();
    match cap {
        Some(cap) => tracing::info!(held_bytes = held, max_memory = cap, "{what}"),
        None => tracing::info!(held_bytes = held, max_memory = "unlimited", "{what}"),
    }
}

async fn run(config: Config, passed: Passed, tls: Tls) -> anyhow::Result<()> {
    let Passed {
        listeners: inherited,
        mut stored,
    } = passed;
    // Signals first: a stop requested while exports are created or sockets bound still stops
    // cleanly (Unix socket files removed, exit 0) instead of killing the process half set up.
    let shutdown = Shutdown::new();
    // Before anything opens files: the fd table fits the connection cap from the start.
    let listener_count = match inherited.len() {
        0 => config.listen.len(),
        n => n,
    };
    let max_connections = server::raise_fd_limit(config.max_connections, listener_count)
        .context("raising the open-files limit (RLIMIT_NOFILE)")?;
    let fd_store = systemd::fd_store_available();
    spawn_signal_handler(shutdown.clone(), fd_store)?;
    if let Some(path) = &config.source {
        tracing::info!(config = %path.display(), "configuration loaded");
    }
    if let Some(credentials) = &tls.credentials {
        tracing::info!(
            mode = tls.mode.as_str(),
            certificates = %credentials.dir().display(),
            verify_peer = credentials.verify_peer(),
            "TLS ready"
        );
        spawn_tls_reload(Arc::clone(credentials), shutdown.clone())?;
    }
    // Under a service manager the disks live in its fd store, so that they outlive this
    // process (a restart, an upgrade, a crash); `systemctl stop` releases them.
    let exports = if fd_store {
        Exports::with_store(&config.exports, &config.memory, &mut stored)
    } else {
        Exports::with_memory(&config.exports, &config.memory)
    };
    let exports = Arc::new(exports.context("creating exports")?);
    // Connections an earlier process handed over, resumed as soon as serving starts.
    let (connections, state) = stored.take_connections();
    let resumed = server::take_handed_over(connections, state);
    if !resumed.is_empty() {
        tracing::info!(
            connections = resumed.len(),
            "resuming handed-over connections"
        );
    }
    stored.discard_rest();
    // Saves wait until the images are loaded; a bad image refuses the start.
    let images = Images::start(&config, &exports, shutdown.clone())?;
    images.load().await?;
    log_memory(&exports, "memory at start");
    let listeners = match (!inherited.is_empty()).then_some(inherited) {
        Some(sockets) => {
            tracing::info!(
                sockets = sockets.len(),
                "socket activation: serving the inherited sockets (configured listeners unused)"
            );
            server::inherited(sockets).context("socket activation")?
        }
        None => server::bind(&config.listen).await?,
    };
    let metrics = config
        .metrics
        .as_ref()
        .map(|_| Metrics::new(Arc::clone(&exports)));
    if let Some(metrics) = &metrics {
        metrics.set_max_connections(max_connections);
    }
    let metrics_listener = match &config.metrics {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };
    for export in exports.iter() {
        tracing::info!(
            name = %ramnbd::logsafe::Untrusted::text(&export.name),
            size = export.size(),
            read_only = export.read_only,
            access = %export.access.describe(),
            "export ready"
        );
    }
    if !config.allow.is_empty() {
        let networks: Vec<String> = config.allow.iter().map(ToString::to_string).collect();
        tracing::info!(
            "tcp clients allowed from {} only (others are closed before the greeting)",
            networks.join(" ")
        );
    }
    // Metrics first: scripts take the "listening on" lines to mean that everything is up.
    let metrics_done = CancellationToken::new();
    if let (Some(listener), Some(metrics)) = (metrics_listener, &metrics) {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!("metrics on http://{addr}/metrics");
        }
        tokio::spawn(metrics::serve(
            listener,
            Arc::clone(metrics),
            metrics_done.clone(),
        ));
    }
    for listener in &listeners {
        tracing::info!("listening on {}", listener.describe());
    }

    // Every listener is up: tell systemd (Type=notify) and say what is served.
    let served: Vec<String> = listeners.iter().map(|l| l.describe()).collect();
    systemd::ready(&format!(
        "serving {} export{} ({}) on {}",
        exports.iter().count(),
        if exports.iter().count() == 1 { "" } else { "s" },
        exports
            .iter()
            .map(|e| format!("{:?} {}", e.name, format_size(e.size())))
            .collect::<Vec<_>>()
            .join(", "),
        served.join(", ")
    ));
    systemd::spawn_watchdog();

    if config.handshake_timeout.is_zero() {
        tracing::warn!(
            "handshake-timeout is 0: a client that connects and sends nothing holds its \
             connection slot and file descriptor until it leaves"
        );
    }
    let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
    let options = ServeOptions {
        max_connections,
        max_connections_per_client: config.max_connections_per_client,
        handshake_timeout: nonzero(config.handshake_timeout),
        tcp_keepalive: nonzero(config.tcp_keepalive),
        allow: config.allow.clone(),
        shutdown_grace: config.shutdown_grace,
        metrics,
        tls,
    };
    let parked = server::serve_adopting(
        listeners,
        resumed,
        Arc::clone(&exports),
        options,
        shutdown.clone(),
    )
    .await;
    if shutdown.handing_over() {
        // The disks are in the store already; the connections and their states go there now,
        // before this process exits (PID 1 reads them before it sees the exit).
        server::store_handed_over(&parked).context("storing the handed-over connections")?;
    }
    metrics_done.cancel();
    // The sessions are done: their last writes are in the images.
    images.save_on_stop().await?;
    log_memory(&exports, "memory at stop");
    tracing::info!("stopped");
    Ok(())
}
