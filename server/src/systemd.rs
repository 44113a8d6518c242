//! systemd integration: socket activation and readiness notification.
//!
//! * **Socket activation**: with `LISTEN_FDS`/`LISTEN_PID` set (a `.socket` unit, or
//!   `systemd-socket-activate`), the inherited listening sockets are served and nothing is
//!   bound. TCP and Unix sockets are told apart by their address family; `LISTEN_FDNAMES` only
//!   names them in logs. [`take_activation`] must run before any thread starts: listenfd clears
//!   `LISTEN_FDS`/`LISTEN_PID` from the environment so that children do not inherit them.
//! * **Notification** (`Type=notify`): `READY=1` once every listener is up, `STATUS=` with the
//!   exports, `STOPPING=1` when shutdown begins, and `WATCHDOG=1` if `WatchdogSec=` is set. All
//!   no-ops without `NOTIFY_SOCKET`.

use std::io;
use std::net::TcpListener as StdTcpListener;
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::PathBuf;
use std::time::Duration;

use std::os::fd::AsRawFd;

use listenfd::ListenFd;
use sd_notify::NotifyState;

/// The first descriptor socket activation passes (`sd_listen_fds(3)`).
const SD_LISTEN_FDS_START: usize = 3;

/// A listening socket handed over by the service manager.
#[derive(Debug)]
pub enum InheritedSocket {
    Tcp(StdTcpListener),
    /// The path is the socket's (`None` for an abstract or unnamed socket).
    Unix(StdUnixListener, Option<PathBuf>),
}

/// One inherited socket with its `LISTEN_FDNAMES` entry.
#[derive(Debug)]
pub struct Inherited {
    pub socket: InheritedSocket,
    pub fd: usize,
    pub name: String,
}

/// The sockets passed by the service manager, or `None` when not socket-activated.
pub fn take_activation() -> io::Result<Option<Vec<Inherited>>> {
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    let mut fds = ListenFd::from_env();
    if fds.len() == 0 {
        return Ok(None);
    }
    let names: Vec<&str> = names.split(':').collect();
    let mut sockets = Vec::with_capacity(fds.len());
    for idx in 0..fds.len() {
        let name = names.get(idx).copied().unwrap_or("").to_owned();
        // Named in messages by the descriptor listenfd takes for this index (the protocol's
        // SD_LISTEN_FDS_START + idx), read back from the socket where there is one.
        let mut fd = idx + SD_LISTEN_FDS_START;
        // A TCP listener is tried first; on a Unix socket that fails and leaves the fd in place.
        let socket = if let Ok(Some(tcp)) = fds.take_tcp_listener(idx) {
            fd = tcp.as_raw_fd() as usize;
            InheritedSocket::Tcp(tcp)
        } else if let Ok(Some(unix)) = fds.take_unix_listener(idx) {
            fd = unix.as_raw_fd() as usize;
            let path = unix
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(PathBuf::from));
            InheritedSocket::Unix(unix, path)
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "socket activation: fd {fd} ({name:?}) is not a listening TCP or Unix stream \
                     socket; use ListenStream= with Accept=no in the .socket unit"
                ),
            ));
        };
        sockets.push(Inherited { socket, fd, name });
    }
    Ok(Some(sockets))
}

fn notify(states: &[NotifyState]) {
    if let Err(err) = sd_notify::notify(states) {
        tracing::warn!(cause = %err, "cannot notify the service manager");
    }
}

/// `READY=1` and the status line.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `STOPPING=1` and the status line.
pub fn stopping(status: &str) {
    notify(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// Sends `WATCHDOG=1` at half the `WatchdogSec=` interval, if one is set, for as long as the
/// runtime runs.
pub fn spawn_watchdog() {
    // WATCHDOG_USEC=0 means no watchdog (sd_watchdog_enabled(3)); pinging at the 100 ms floor
    // below would only flood the manager.
    let Some(interval) = sd_notify::watchdog_enabled().filter(|usec| !usec.is_zero()) else {
        return;
    };
    tracing::debug!(?interval, "systemd watchdog enabled");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval((interval / 2).max(Duration::from_millis(100)));
        loop {
            tick.tick().await;
            notify(&[NotifyState::Watchdog]);
        }
    });
}
