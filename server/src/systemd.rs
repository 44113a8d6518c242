//! systemd integration: socket activation, the file-descriptor store, and readiness
//! notification.
//!
//! * **Passed descriptors**: with `LISTEN_FDS`/`LISTEN_PID` set, the service manager has passed
//!   descriptors: listening sockets (a `.socket` unit, or `systemd-socket-activate`), and the
//!   descriptors this service put in its fd store before (see below). They are told apart by
//!   their `LISTEN_FDNAMES` entry: stored ones carry the names this module gives them
//!   ([`disk_fd_name`], `conn-…`, `handover-state`); every other one is a listening socket, served
//!   instead of binding. TCP and Unix sockets are told apart by their address family.
//!   [`take_passed`] must run before any thread starts: listenfd clears
//!   `LISTEN_FDS`/`LISTEN_PID` from the environment so that children do not inherit them.
//! * **The fd store** (`FDSTORE=1`, `FileDescriptorStoreMax=` in the unit): each export's memfd
//!   is stored under its own name, so that a restarted (or crashed and restarted) server adopts
//!   the disk with its data. PID 1 keeps the store while the unit is active, restarting, or has a
//!   job queued; `systemctl stop` releases it (the data is gone then). Used only when
//!   `NOTIFY_SOCKET` is set.
//! * **Notification** (`Type=notify`): `READY=1` once every listener is up, `STATUS=` with the
//!   exports, `STOPPING=1` when shutdown begins, and `WATCHDOG=1` if `WatchdogSec=` is set. All
//!   no-ops without `NOTIFY_SOCKET`.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::TcpListener as StdTcpListener;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::PathBuf;
use std::time::Duration;

use listenfd::ListenFd;
use sd_notify::NotifyState;

/// The first descriptor socket activation passes (`sd_listen_fds(3)`).
const SD_LISTEN_FDS_START: usize = 3;

/// The prefix of a stored disk's name; the rest is a hash of the export's name.
const DISK_PREFIX: &str = "disk-";
/// The prefix of a stored connection's name.
pub const CONN_PREFIX: &str = "conn-";
/// The name of the stored memfd that holds the handed-over connections' states.
pub const STATE_NAME: &str = "handover-state";

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

/// What the service manager passed at start.
#[derive(Debug, Default)]
pub struct Passed {
    /// Listening sockets (socket activation); empty when there are none.
    pub listeners: Vec<Inherited>,
    /// Descriptors this service stored before it was restarted.
    pub stored: Stored,
}

/// Descriptors from the fd store, by name. What start-up does not take is removed from the
/// store by [`Stored::discard_rest`], so that no stale descriptor outlives a restart.
#[derive(Debug, Default)]
pub struct Stored {
    /// By the hash part of the name: the full name, the size it gives, the memfd.
    disks: HashMap<String, (String, u64, File)>,
    connections: Vec<StoredConnection>,
    state: Option<File>,
}

/// A client connection from the fd store.
#[derive(Debug)]
pub struct StoredConnection {
    pub name: String,
    /// A connected TCP or Unix stream socket.
    pub socket: OwnedFd,
}

impl Stored {
    /// The stored memfd of the export named `export`, if there is one, and the size of the
    /// export it was created for.
    pub fn take_disk(&mut self, export: &str) -> Option<(File, u64)> {
        let (_, size, file) = self.disks.remove(&name_hash(export))?;
        Some((file, size))
    }

    /// The stored connections and the memfd with their states.
    pub fn take_connections(&mut self) -> (Vec<StoredConnection>, Option<File>) {
        (std::mem::take(&mut self.connections), self.state.take())
    }

    /// Whether anything is left.
    pub fn is_empty(&self) -> bool {
        self.disks.is_empty() && self.connections.is_empty() && self.state.is_none()
    }

    /// Removes from the store (and closes) what start-up did not take: disks of exports that
    /// are no longer configured, and connections nobody resumed.
    pub fn discard_rest(&mut self) {
        for (name, _, _) in self.disks.values() {
            tracing::warn!(
                fd_name = name,
                "a stored disk matches no configured export: removing it from the fd store \
                 (its data is dropped)"
            );
            remove_from_store(name);
        }
        for conn in &self.connections {
            tracing::warn!(
                fd_name = conn.name,
                "closing a stored connection nobody resumed"
            );
            remove_from_store(&conn.name);
        }
        if self.state.is_some() {
            remove_from_store(STATE_NAME);
        }
        *self = Stored::default();
    }
}

/// The fd store name of an export's disk: `disk-`, the FNV-1a hash of the export's name in
/// hex, `-`, and the export's size in bytes (so that a size changed in the configuration is
/// seen at adoption). Export names are arbitrary UTF-8 of up to 4096 bytes; FDNAME= allows at
/// most 255 characters, no `:` and no control characters: this is at most 42 ASCII characters.
pub fn disk_fd_name(export: &str, size: u64) -> String {
    format!("{}-{size}", name_hash(export))
}

/// `disk-` and the export name's FNV-1a hash. FNV-1a is written out here, not taken from std,
/// because the name must stay the same across builds: an upgraded server adopts the disk.
fn name_hash(export: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in export.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{DISK_PREFIX}{hash:016x}")
}

/// Splits a stored disk's name into its hash part and its size.
fn parse_disk_name(name: &str) -> Option<(String, u64)> {
    let (hash, size) = name.rsplit_once('-')?;
    let size = size.parse().ok()?;
    (hash.len() == DISK_PREFIX.len() + 16).then(|| (hash.to_owned(), size))
}

/// Takes every descriptor the service manager passed (`LISTEN_FDS`).
pub fn take_passed() -> io::Result<Passed> {
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    let mut fds = ListenFd::from_env();
    let mut passed = Passed::default();
    let names: Vec<&str> = names.split(':').collect();
    for idx in 0..fds.len() {
        let name = names.get(idx).copied().unwrap_or("").to_owned();
        // Named in messages by the descriptor listenfd takes for this index (the protocol's
        // SD_LISTEN_FDS_START + idx), read back from the socket where there is one.
        let mut fd = idx + SD_LISTEN_FDS_START;
        if name.starts_with(DISK_PREFIX) || name == STATE_NAME {
            let file = take_file(&mut fds, idx, fd, &name)?;
            if name == STATE_NAME {
                passed.stored.state = Some(file);
            } else if let Some((hash, size)) = parse_disk_name(&name) {
                passed.stored.disks.insert(hash, (name, size, file));
            } else {
                tracing::warn!(fd, name, "a stored disk with a malformed name; removed");
                remove_from_store(&name);
            }
            continue;
        }
        if name.starts_with(CONN_PREFIX) {
            // listenfd checks the family and the type, not that the socket listens: a
            // connected stream socket passes, and is turned back into one through OwnedFd.
            let socket = if let Ok(Some(tcp)) = fds.take_tcp_listener(idx) {
                OwnedFd::from(tcp)
            } else if let Ok(Some(unix)) = fds.take_unix_listener(idx) {
                OwnedFd::from(unix)
            } else {
                tracing::warn!(
                    fd,
                    name,
                    "a stored connection is not a stream socket; ignored"
                );
                remove_from_store(&name);
                continue;
            };
            passed
                .stored
                .connections
                .push(StoredConnection { name, socket });
            continue;
        }
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
        passed.listeners.push(Inherited { socket, fd, name });
    }
    Ok(passed)
}

/// A stored memfd, opened again through `/proc/self/fd`: that needs no `unsafe` outside the
/// store's module, at the cost of the passed descriptor staying open (one per disk, same
/// memory) until the process exits.
fn take_file(fds: &mut ListenFd, idx: usize, fd: usize, name: &str) -> io::Result<File> {
    let raw = fds.take_raw_fd(idx)?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("fd {fd} ({name:?}) taken twice"),
        )
    })?;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/self/fd/{raw}"))
        .map_err(|err| {
            io::Error::new(
                err.kind(),
                format!("cannot open the stored descriptor {name:?} (fd {raw}): {err}"),
            )
        })
}

/// Whether descriptors can be stored: a service manager listens (`NOTIFY_SOCKET`). Whether it
/// keeps them depends on the unit's `FileDescriptorStoreMax=` (PID 1 logs a refusal).
pub fn fd_store_available() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// Sends `fd` to the fd store under `name` (`FDSTORE=1`, `FDNAME=`). A descriptor stored again
/// under a name already there is added, not replaced (systemd keeps both): callers store a
/// name once per process, and remove names they no longer want.
pub fn store(name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
    sd_notify::notify_with_fds(&[NotifyState::FdStore, NotifyState::FdName(name)], &[fd])
}

/// Removes every descriptor named `name` from the fd store (`FDSTOREREMOVE=1`, `FDNAME=`).
pub fn remove_from_store(name: &str) {
    notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(name)]);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_names_are_short_safe_and_stable() {
        // The value is fixed: a later build must find the disks an earlier one stored.
        assert_eq!(disk_fd_name("scratch", 4096), "disk-e92743ced3fef5f5-4096");
        let long = "é:\n\u{7f}".repeat(1024);
        let name = disk_fd_name(&long, u64::MAX);
        assert!(name.len() <= 255, "{name}");
        assert!(
            name.chars().all(|c| c.is_ascii_graphic() && c != ':'),
            "{name}"
        );
        assert_ne!(disk_fd_name("a", 1), disk_fd_name("b", 1));
        assert_eq!(parse_disk_name(&name), Some((name_hash(&long), u64::MAX)));
        assert_eq!(parse_disk_name("disk-12-4096"), None);
        assert_eq!(parse_disk_name("disk-e92743ced3fef5f5-x"), None);
    }
}
