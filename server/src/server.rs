//! Listeners and the accept loop: every connection gets its own task, a tracing span with its
//! peer and export, and a slot under the connection cap; shutdown stops accepting and lets
//! sessions finish what they started.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::ListenAddr;
use crate::export::Exports;
use crate::metrics::Metrics;
use crate::session;
use crate::shutdown::{self, CLOSE_FLUSH, Phase, Shutdown};
use crate::systemd::{Inherited, InheritedSocket};

/// A bound listening socket.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    /// The path is removed when the listener is dropped: when the server stops, and on every
    /// error path after binding.
    Unix(UnixListener, SocketFile),
    /// Inherited from the service manager (socket activation): the socket and its path belong
    /// to the `.socket` unit, so the path is left in place.
    UnixInherited(UnixListener, PathBuf),
}

impl Listener {
    /// A human-readable address: `tcp 127.0.0.1:10809` or `unix /run/ramnbd.sock`.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => match l.local_addr() {
                Ok(addr) => format!("tcp {addr}"),
                Err(_) => "tcp (unknown address)".to_owned(),
            },
            Listener::Unix(_, SocketFile(path)) | Listener::UnixInherited(_, path) => {
                format!("unix {}", path.display())
            }
        }
    }
}

/// The path of a Unix socket this server bound; removing it when dropped means no error path
/// leaves a dead socket file behind.
#[derive(Debug)]
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Takes over sockets inherited through socket activation (call inside the runtime).
pub fn inherited(sockets: Vec<Inherited>) -> io::Result<Vec<Listener>> {
    sockets
        .into_iter()
        .map(|Inherited { socket, fd, name }| {
            // Tokio needs non-blocking sockets; inherited ones are blocking (tokio#5595).
            let listener = match socket {
                InheritedSocket::Tcp(l) => {
                    l.set_nonblocking(true)?;
                    Listener::Tcp(TcpListener::from_std(l)?)
                }
                InheritedSocket::Unix(l, path) => {
                    l.set_nonblocking(true)?;
                    let path = path.unwrap_or_else(|| format!("(fd {fd} {name})").into());
                    Listener::UnixInherited(UnixListener::from_std(l)?, path)
                }
            };
            tracing::debug!(fd, name, "inherited {}", listener.describe());
            Ok(listener)
        })
        .collect()
}

/// Binds every configured address. A stale Unix socket file (nobody listening) is replaced; a
/// live one is an error, so two servers never silently share a path.
pub async fn bind(addrs: &[ListenAddr]) -> io::Result<Vec<Listener>> {
    let mut listeners = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let listener = match addr {
            ListenAddr::Tcp(host_port) => TcpListener::bind(host_port.as_str())
                .await
                .map(Listener::Tcp)
                .map_err(|err| {
                    io::Error::new(err.kind(), format!("listen on {host_port}: {err}"))
                })?,
            ListenAddr::Unix(path) => {
                remove_stale_socket(path).await?;
                let listener = UnixListener::bind(path).map_err(|err| {
                    io::Error::new(err.kind(), format!("listen on {}: {err}", path.display()))
                })?;
                Listener::Unix(listener, SocketFile(path.clone()))
            }
        };
        listeners.push(listener);
    }
    Ok(listeners)
}

async fn remove_stale_socket(path: &PathBuf) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; remove it or pick another path",
                path.display()
            ),
        ));
    }
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} is in use by another server", path.display()),
        ));
    }
    std::fs::remove_file(path)
}

/// Serving limits and the shutdown policy.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub max_connections: usize,
    pub shutdown_grace: Duration,
    /// Where requests and connections are counted; `None` when metrics are off.
    pub metrics: Option<Arc<Metrics>>,
}

/// Accepts on every listener until shutdown starts, then gives sessions the grace period to
/// finish the requests they have read (see [`crate::shutdown`]). Returns when every session
/// has ended or the grace period is over.
pub async fn serve(
    listeners: Vec<Listener>,
    exports: Arc<Exports>,
    options: ServeOptions,
    shutdown: Shutdown,
) {
    // Sessions and accept loops are tracked apart, so that what is logged as active is
    // connections only.
    let tracker = TaskTracker::new();
    let accepting = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(options.max_connections));
    for listener in listeners {
        let accept = accept_loop(
            listener,
            Arc::clone(&exports),
            Arc::clone(&slots),
            tracker.clone(),
            shutdown.clone(),
            options.metrics.clone(),
        );
        accepting.spawn(accept);
    }
    accepting.close();
    shutdown.reached(Phase::Stopping).await;
    // The accept loops end at once, dropping their listeners (and Unix socket files).
    accepting.wait().await;
    tracker.close();
    tracing::info!(
        active = tracker.len(),
        grace = ?options.shutdown_grace,
        "stopping: no new connections, finishing requests in flight"
    );
    let grace = options.shutdown_grace;
    let stop_started = tokio::time::Instant::now();
    // Phase 1: sessions finish what they have read, until the grace period is nearly over or
    // a second signal moves on to closing.
    tokio::select! {
        () = tracker.wait() => {}
        () = tokio::time::sleep(shutdown::closing_after(grace)) => {
            tracing::info!(
                active = tracker.len(),
                "grace period nearly over: closing connections after their queued replies"
            );
            shutdown.advance(Phase::Closing);
        }
        () = shutdown.reached(Phase::Closing) => {
            tracing::info!(active = tracker.len(), "closing connections now");
        }
    }
    // Phase 2: sessions send what is queued and close. A client that does not read its
    // replies cannot hold this up for longer than CLOSE_FLUSH (or the grace period's end),
    // and a third signal ends the wait at once.
    if !tracker.is_empty() {
        let flush_until = (stop_started + grace).min(tokio::time::Instant::now() + CLOSE_FLUSH);
        tokio::select! {
            () = tracker.wait() => {}
            () = tokio::time::sleep_until(flush_until) => {
                tracing::warn!(
                    active = tracker.len(),
                    "connections still sending after the grace period, dropping them"
                );
            }
            () = shutdown.reached(Phase::Aborting) => {
                tracing::warn!(active = tracker.len(), "dropping the remaining connections now");
            }
        }
    }
}

async fn accept_loop(
    listener: Listener,
    exports: Arc<Exports>,
    slots: Arc<Semaphore>,
    tracker: TaskTracker,
    shutdown: Shutdown,
    metrics: Option<Arc<Metrics>>,
) {
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => slot.expect("semaphore never closed"),
            () = shutdown.reached(Phase::Stopping) => return,
        };
        let accepted = tokio::select! {
            accepted = accept(&listener) => accepted,
            () = shutdown.reached(Phase::Stopping) => return,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(err) => {
                // EMFILE and friends: back off rather than spin, and keep serving.
                tracing::warn!(cause = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let span = tracing::info_span!("conn", peer = %peer, export = tracing::field::Empty);
        let exports = Arc::clone(&exports);
        let shutdown = shutdown.clone();
        let metrics = metrics.clone();
        tracker.spawn(
            async move {
                tracing::debug!("accepted");
                let counted = metrics.as_ref().map(|m| m.connection());
                match stream {
                    Stream::Tcp(stream) => {
                        let (reader, writer) = stream.into_split();
                        session::serve(reader, writer, exports, shutdown, metrics).await;
                    }
                    Stream::Unix(stream) => {
                        let (reader, writer) = stream.into_split();
                        session::serve(reader, writer, exports, shutdown, metrics).await;
                    }
                }
                drop(counted);
                drop(slot);
            }
            .instrument(span),
        );
    }
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Accepts one connection. TCP gets TCP_NODELAY: replies are small and latency-bound.
async fn accept(listener: &Listener) -> io::Result<(Stream, String)> {
    match listener {
        Listener::Tcp(l) => {
            let (stream, peer) = l.accept().await?;
            stream.set_nodelay(true)?;
            Ok((Stream::Tcp(stream), peer.to_string()))
        }
        Listener::Unix(l, SocketFile(path)) | Listener::UnixInherited(l, path) => {
            let (stream, _) = l.accept().await?;
            Ok((Stream::Unix(stream), format!("unix:{}", path.display())))
        }
    }
}
