//! Listeners and the accept loop: every connection gets its own task, a tracing span with its
//! peer and export, and a slot under the connection cap; shutdown stops accepting and lets
//! sessions finish what they started. A hand-over ([`Shutdown::hand_over`]) collects the
//! connections the sessions suspended, as sockets and states for the next process, which
//! adopts them with [`serve_adopting`]. Between the two they wait in the service manager's fd
//! store: [`store_handed_over`] puts them there (each socket under its own name, the states
//! together in one memfd), [`take_handed_over`] takes them back.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::access::{Peer, PeerKind, ServerAccess};
use crate::config::ListenAddr;
use crate::export::Exports;
use crate::metrics::Metrics;
use crate::session::{self, HandedOver, HandshakeOptions, MAX_PENDING, Suspended};
use crate::shutdown::{self, CLOSE_FLUSH, Phase, Shutdown};
use crate::systemd::{self, CONN_PREFIX, Inherited, InheritedSocket, STATE_NAME, StoredConnection};
use crate::tls::Tls;

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

/// The listen backlog: connections the kernel completes and queues while the accept loop is
/// busy, or while the connection cap is reached. Tokio's (and std's) 128 overflows when a
/// burst of clients connects, and each dropped SYN costs that client a 1 s retransmission.
/// The kernel caps it at net.core.somaxconn; inherited sockets have their unit's `Backlog=`.
const LISTEN_BACKLOG: i32 = 1024;

/// Binds every configured address. A stale Unix socket file (nobody listening) is replaced; a
/// live one is an error, so two servers never silently share a path.
pub async fn bind(addrs: &[ListenAddr]) -> io::Result<Vec<Listener>> {
    let mut listeners = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let listener = match addr {
            ListenAddr::Tcp(host_port) => {
                let context = |err: io::Error| {
                    io::Error::new(err.kind(), format!("listen on {host_port}: {err}"))
                };
                let listener = TcpListener::bind(host_port.as_str())
                    .await
                    .map_err(context)?;
                rustix::net::listen(&listener, LISTEN_BACKLOG).map_err(|e| context(e.into()))?;
                Listener::Tcp(listener)
            }
            ListenAddr::Unix(path) => {
                remove_stale_socket(path).await?;
                let context = |err: io::Error| {
                    io::Error::new(err.kind(), format!("listen on {}: {err}", path.display()))
                };
                let listener = UnixListener::bind(path).map_err(context)?;
                // Owned at once, so that an error from here on removes the file.
                let file = SocketFile(path.clone());
                rustix::net::listen(&listener, LISTEN_BACKLOG).map_err(|e| context(e.into()))?;
                Listener::Unix(listener, file)
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
    /// Connections one client address may hold at once (see [`PerClient`]); 0: no cap.
    pub max_connections_per_client: usize,
    /// A connection not in the transmission phase by then is closed; `None`: no deadline.
    pub handshake_timeout: Option<Duration>,
    /// TCP keepalive idle time on accepted TCP connections; `None`: keepalive off.
    pub tcp_keepalive: Option<Duration>,
    /// The client networks that may connect over TCP; empty: any (see [`ServerAccess`]).
    pub allow: Vec<IpNet>,
    pub shutdown_grace: Duration,
    /// Where requests and connections are counted; `None` when metrics are off.
    pub metrics: Option<Arc<Metrics>>,
    /// STARTTLS: the mode and credentials ([`Tls::off`]: none).
    pub tls: Tls,
}

/// File descriptors a server needs beyond one per connection: listeners, the metrics
/// endpoint, images, memfds, the log, the runtime's own.
pub const FD_MARGIN: u64 = 64;

/// Raises the soft open-files limit (RLIMIT_NOFILE; systemd leaves it at 1024) to what
/// `max_connections` connections on `listeners` listeners need, and returns the connection cap
/// to serve with: `max_connections`, or, if the hard limit is below what it needs, what the
/// hard limit allows (with a warning naming max-connections and `LimitNOFILE=`). Lowering
/// the cap rather than refusing to start: a server whose cap is the fd table serves every
/// connection it accepts, one above the fd table would fail accepts (EMFILE) under load.
pub fn raise_fd_limit(max_connections: usize, listeners: usize) -> io::Result<usize> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let needed = (max_connections as u64)
        .saturating_add(listeners as u64)
        .saturating_add(FD_MARGIN);
    // `None` is unlimited.
    let hard = limit.maximum.unwrap_or(u64::MAX);
    let soft = limit.current.unwrap_or(u64::MAX);
    let target = needed.min(hard);
    if soft < target {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(target),
                maximum: limit.maximum,
            },
        )?;
        tracing::info!(from = soft, to = target, "raised the soft open-files limit");
    }
    if needed <= hard {
        return Ok(max_connections);
    }
    let allowed = hard.saturating_sub(listeners as u64 + FD_MARGIN).max(1) as usize;
    tracing::warn!(
        max_connections,
        hard_limit = hard,
        serving_at_most = allowed,
        "max-connections {max_connections} needs {needed} open files but the hard limit is \
         {hard}: serving at most {allowed} connections; raise LimitNOFILE= in the service \
         unit (or ulimit -Hn) or lower max-connections"
    );
    Ok(allowed)
}

/// A connection in transmission, suspended by a hand-over or to be resumed: its socket (a
/// connected TCP or Unix stream socket, outside any runtime) and its session's state.
#[derive(Debug)]
pub struct SuspendedConnection {
    pub socket: OwnedFd,
    pub state: Suspended,
}

/// The connections handed over so far, filled by the sessions as they suspend.
type HandedOverList = Arc<Mutex<Vec<SuspendedConnection>>>;

/// Accepts on every listener until shutdown starts, then gives sessions the grace period to
/// finish the requests they have read (see [`crate::shutdown`]). Returns when every session
/// has ended or the grace period is over, with the connections a hand-over suspended (none
/// unless [`Shutdown::hand_over`] was called).
pub async fn serve(
    listeners: Vec<Listener>,
    exports: Arc<Exports>,
    options: ServeOptions,
    shutdown: Shutdown,
) -> Vec<SuspendedConnection> {
    serve_adopting(listeners, Vec::new(), exports, options, shutdown).await
}

/// Like [`serve`], first resuming `adopted`: connections a previous process handed over.
/// Each is served like an accepted one, under the connection cap if a slot is free (they
/// were accepted under the previous process's cap, so one is not refused for lack of it).
pub async fn serve_adopting(
    listeners: Vec<Listener>,
    adopted: Vec<SuspendedConnection>,
    exports: Arc<Exports>,
    options: ServeOptions,
    shutdown: Shutdown,
) -> Vec<SuspendedConnection> {
    // Sessions and accept loops are tracked apart, so that what is logged as active is
    // connections only.
    let tracker = TaskTracker::new();
    let accepting = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(options.max_connections));
    let handed_over = HandedOverList::default();
    for connection in adopted {
        let slot = Arc::clone(&slots).try_acquire_owned().ok();
        if slot.is_none() {
            tracing::warn!("adopted connection beyond the connection cap: served anyway");
        }
        let session = Session {
            exports: Arc::clone(&exports),
            shutdown: shutdown.clone(),
            metrics: options.metrics.clone(),
            handed_over: Arc::clone(&handed_over),
            handshake_timeout: options.handshake_timeout,
            tls: options.tls.clone(),
        };
        let span = tracing::info_span!("conn", peer = "adopted", export = tracing::field::Empty);
        tracker.spawn(
            async move {
                session.run(Start::Resume(connection)).await;
                drop(slot);
            }
            .instrument(span),
        );
    }
    let per_client = PerClient::new(options.max_connections_per_client);
    let access = Arc::new(ServerAccess::new(options.allow.clone()));
    for listener in listeners {
        let accept = accept_loop(
            listener,
            Arc::clone(&slots),
            Arc::clone(&per_client),
            Arc::clone(&access),
            options.tcp_keepalive,
            tracker.clone(),
            Session {
                exports: Arc::clone(&exports),
                shutdown: shutdown.clone(),
                metrics: options.metrics.clone(),
                handed_over: Arc::clone(&handed_over),
                handshake_timeout: options.handshake_timeout,
                tls: options.tls.clone(),
            },
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
    let handed_over = std::mem::take(&mut *handed_over.lock().expect("never poisoned"));
    if !handed_over.is_empty() {
        tracing::info!(connections = handed_over.len(), "connections handed over");
    }
    handed_over
}

/// What every session task of a server shares.
#[derive(Debug, Clone)]
struct Session {
    exports: Arc<Exports>,
    shutdown: Shutdown,
    metrics: Option<Arc<Metrics>>,
    handed_over: HandedOverList,
    handshake_timeout: Option<Duration>,
    tls: Tls,
}

/// How a session task begins.
enum Start {
    Accepted(Stream, Peer),
    Resume(SuspendedConnection),
}

impl Session {
    /// Runs one connection to its end; a connection a hand-over suspends is added to the
    /// server's list of those handed over.
    async fn run(self, start: Start) {
        let counted = self.metrics.as_ref().map(|m| m.connection());
        let (stream, peer, state) = match start {
            Start::Accepted(stream, peer) => (stream, peer, None),
            Start::Resume(SuspendedConnection { socket, state }) => match Stream::adopt(socket) {
                Ok((stream, peer)) => (stream, peer, Some(state)),
                Err(err) => {
                    tracing::warn!(cause = %err, "cannot adopt a handed-over connection");
                    return;
                }
            },
        };
        let handed_over = Arc::clone(&self.handed_over);
        let suspended = match stream {
            Stream::Tcp(stream) => {
                let (reader, writer) = stream.into_split();
                let ended = serve_or_resume(reader, writer, peer, state, self);
                ended.await.map(
                    |HandedOver {
                         reader,
                         writer,
                         state,
                     }| {
                        let socket = reader.reunite(writer).map_err(|_| unpaired());
                        (socket.and_then(|s| s.into_std()).map(OwnedFd::from), state)
                    },
                )
            }
            Stream::Unix(stream) => {
                let (reader, writer) = stream.into_split();
                let ended = serve_or_resume(reader, writer, peer, state, self);
                ended.await.map(
                    |HandedOver {
                         reader,
                         writer,
                         state,
                     }| {
                        let socket = reader.reunite(writer).map_err(|_| unpaired());
                        (socket.and_then(|s| s.into_std()).map(OwnedFd::from), state)
                    },
                )
            }
        };
        match suspended {
            None => {}
            Some((Ok(socket), state)) => {
                let connection = SuspendedConnection { socket, state };
                handed_over.lock().expect("never poisoned").push(connection);
            }
            Some((Err(err), _)) => {
                tracing::warn!(cause = %err, "cannot take a suspended socket out of the runtime");
            }
        }
        drop(counted);
    }
}

/// A new session, or a resumed one if there is a state.
async fn serve_or_resume<R, W>(
    reader: R,
    writer: W,
    peer: Peer,
    state: Option<Suspended>,
    session: Session,
) -> Option<HandedOver<R, W>>
where
    R: crate::session::Receive + Send + 'static,
    W: crate::session::Reply + Send + 'static,
{
    let Session {
        exports,
        shutdown,
        metrics,
        handshake_timeout,
        tls,
        ..
    } = session;
    match state {
        None => {
            session::serve_within(
                reader,
                writer,
                peer,
                &HandshakeOptions {
                    deadline: handshake_timeout,
                    tls,
                },
                exports,
                shutdown,
                metrics,
            )
            .await
        }
        Some(state) => {
            session::resume(reader, writer, peer, state, exports, shutdown, metrics).await
        }
    }
}

fn unpaired() -> io::Error {
    io::Error::other("stream halves of different sockets")
}

async fn accept_loop(
    listener: Listener,
    slots: Arc<Semaphore>,
    per_client: Arc<PerClient>,
    access: Arc<ServerAccess>,
    tcp_keepalive: Option<Duration>,
    tracker: TaskTracker,
    session: Session,
) {
    let shutdown = session.shutdown.clone();
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => slot.expect("semaphore never closed"),
            () = shutdown.reached(Phase::Stopping) => return,
        };
        let accepted = tokio::select! {
            accepted = accept(&listener) => accepted,
            () = shutdown.reached(Phase::Stopping) => return,
        };
        let (stream, shown, peer) = match accepted {
            Ok(conn) => conn,
            Err(err) => {
                // EMFILE and friends: back off rather than spin, and keep serving.
                tracing::warn!(cause = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Closed before the greeting: the client learns nothing and holds nothing.
        if !access.admit(&peer) {
            drop(stream);
            continue;
        }
        let Some(client_slot) = per_client.admit(peer.ip()) else {
            drop(stream);
            continue;
        };
        if let (Stream::Tcp(tcp), Some(idle)) = (&stream, tcp_keepalive)
            && let Err(err) = set_keepalive(tcp, idle)
        {
            tracing::warn!(peer = shown, cause = %err, "cannot set TCP keepalive");
        }
        let span = tracing::info_span!("conn", peer = %shown, export = tracing::field::Empty);
        let session = session.clone();
        tracker.spawn(
            async move {
                tracing::debug!("accepted");
                session.run(Start::Accepted(stream, peer)).await;
                drop(client_slot);
                drop(slot);
            }
            .instrument(span),
        );
    }
}

/// Puts suspended connections in the fd store: each socket under `conn-N`, and their states,
/// one record per connection (name length u16, name, state length u32, the encoded
/// [`Suspended`]; big-endian), in one memfd under [`STATE_NAME`]. Logs what was handed over.
/// The next process takes them back with [`take_handed_over`].
pub fn store_handed_over(parked: &[SuspendedConnection]) -> io::Result<()> {
    let pending: usize = parked.iter().map(|c| c.state.pending.len()).sum();
    let mut states = Vec::new();
    for (i, conn) in parked.iter().enumerate() {
        let name = format!("{CONN_PREFIX}{i}");
        systemd::store(&name, conn.socket.as_fd())?;
        states.push((name, conn.state.encode()));
    }
    let states = encode_states(&states);
    if !parked.is_empty() {
        let fd = rustix::fs::memfd_create("ramnbd:handover", rustix::fs::MemfdFlags::CLOEXEC)?;
        let mut file = File::from(fd);
        file.write_all(&states)?;
        systemd::store(STATE_NAME, file.as_fd())?;
    }
    tracing::info!(
        connections = parked.len(),
        pending_bytes = pending,
        "handed over {} connections with {pending} bytes pending",
        parked.len()
    );
    Ok(())
}

/// The longest encoded state [`take_handed_over`] reads: the header, a 4096-byte export name, and
/// the most pending input a session can have.
const MAX_STATE: usize = 64 + 4096 + MAX_PENDING;

/// Takes back connections an earlier process stored with [`store_handed_over`] (to resume
/// with [`serve_adopting`]) and removes them from the fd store (this process holds them now).
/// A connection without a readable state cannot be resumed (where its stream stands is
/// unknown): it is closed.
pub fn take_handed_over(
    connections: Vec<StoredConnection>,
    state: Option<File>,
) -> Vec<SuspendedConnection> {
    let mut states = HashMap::new();
    if let Some(mut file) = state {
        let mut bytes = Vec::new();
        match file
            .read_to_end(&mut bytes)
            .and_then(|_| decode_states(&bytes))
        {
            Ok(decoded) => states = decoded,
            Err(err) => tracing::warn!(cause = %err, "the stored connections' state is unreadable"),
        }
        systemd::remove_from_store(STATE_NAME);
    }
    let mut parked = Vec::new();
    for conn in connections {
        systemd::remove_from_store(&conn.name);
        match states
            .remove(&conn.name)
            .map(|bytes: Vec<u8>| Suspended::decode(&bytes))
        {
            Some(Ok(state)) => parked.push(SuspendedConnection {
                socket: conn.socket,
                state,
            }),
            Some(Err(err)) => {
                tracing::warn!(fd_name = conn.name, cause = %err, "closing a stored connection")
            }
            None => tracing::warn!(
                fd_name = conn.name,
                "closing a stored connection that has no state"
            ),
        }
    }
    parked
}

/// The state memfd's records: name length (u16), name, state length (u32), state; big-endian.
fn encode_states(states: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, state) in states {
        out.extend_from_slice(&(name.len() as u16).to_be_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(state.len() as u32).to_be_bytes());
        out.extend_from_slice(state);
    }
    out
}

/// Reads what [`encode_states`] wrote; every length is checked before it is used.
fn decode_states(bytes: &[u8]) -> io::Result<HashMap<String, Vec<u8>>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let mut states = HashMap::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let (len, tail) = rest
            .split_at_checked(2)
            .ok_or_else(|| bad("truncated name length"))?;
        let len = u16::from_be_bytes([len[0], len[1]]) as usize;
        let (name, tail) = tail
            .split_at_checked(len)
            .ok_or_else(|| bad("truncated name"))?;
        let name = std::str::from_utf8(name).map_err(|_| bad("name not UTF-8"))?;
        let (len, tail) = tail
            .split_at_checked(4)
            .ok_or_else(|| bad("truncated state length"))?;
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if len > MAX_STATE {
            return Err(bad("state too long"));
        }
        let (state, tail) = tail
            .split_at_checked(len)
            .ok_or_else(|| bad("truncated state"))?;
        states.insert(name.to_owned(), state.to_vec());
        rest = tail;
    }
    Ok(states)
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    /// A connected socket passed on from another process (call inside the runtime): TCP or
    /// Unix by the socket's own address family, with its peer.
    fn adopt(socket: OwnedFd) -> io::Result<(Stream, Peer)> {
        use rustix::net::{AddressFamily, sockopt};
        match sockopt::socket_domain(&socket)? {
            AddressFamily::INET | AddressFamily::INET6 => {
                let stream = std::net::TcpStream::from(socket);
                stream.set_nonblocking(true)?;
                stream.set_nodelay(true)?;
                let peer = Peer::tcp(stream.peer_addr()?.ip());
                Ok((Stream::Tcp(TcpStream::from_std(stream)?), peer))
            }
            AddressFamily::UNIX => {
                let stream = std::os::unix::net::UnixStream::from(socket);
                stream.set_nonblocking(true)?;
                let stream = UnixStream::from_std(stream)?;
                let peer = unix_peer(&stream);
                Ok((Stream::Unix(stream), peer))
            }
            other => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("not a TCP or Unix socket (address family {other:?})"),
            )),
        }
    }
}

/// Accepts one connection: the stream, the peer as the log shows it, and the [`Peer`] the
/// access rules and [`PerClient`] judge (a TCP client is counted by IP address; local clients
/// are not counted: the socket's permissions decide who may connect). TCP gets TCP_NODELAY:
/// replies are small and latency-bound.
async fn accept(listener: &Listener) -> io::Result<(Stream, String, Peer)> {
    match listener {
        Listener::Tcp(l) => {
            let (stream, addr) = l.accept().await?;
            stream.set_nodelay(true)?;
            // IPv4 clients of a dual-stack listener as IPv4, as the rules see them.
            let shown = std::net::SocketAddr::new(addr.ip().to_canonical(), addr.port());
            Ok((Stream::Tcp(stream), shown.to_string(), Peer::tcp(addr.ip())))
        }
        Listener::Unix(l, SocketFile(path)) | Listener::UnixInherited(l, path) => {
            let (stream, _) = l.accept().await?;
            let peer = unix_peer(&stream);
            let shown = match peer.kind {
                PeerKind::Unix { uid, pid, .. } => match pid {
                    Some(pid) => format!("unix:{} uid {uid} pid {pid}", path.display()),
                    None => format!("unix:{} uid {uid}", path.display()),
                },
                _ => format!("unix:{}", path.display()),
            };
            Ok((Stream::Unix(stream), shown, peer))
        }
    }
}

/// A Unix-socket peer by the credentials the kernel recorded at connect (`SO_PEERCRED`).
fn unix_peer(stream: &UnixStream) -> Peer {
    match stream.peer_cred() {
        Ok(cred) => Peer::unix(cred.uid(), cred.gid(), cred.pid()),
        Err(err) => {
            tracing::warn!(cause = %err, "cannot read a Unix peer's credentials");
            Peer {
                kind: PeerKind::UnixUnknown,
                tls_identity: None,
            }
        }
    }
}

/// Keepalive probes sent, [`set_keepalive`]'s interval apart, before a silent peer's
/// connection is closed.
pub const KEEPALIVE_PROBES: u32 = 3;

/// SO_KEEPALIVE: after `idle` without traffic, a probe every `idle`, and after
/// [`KEEPALIVE_PROBES`] unanswered the kernel closes the connection: a vanished peer's
/// connection ends within `idle` × (1 + [`KEEPALIVE_PROBES`]).
fn set_keepalive(stream: &TcpStream, idle: Duration) -> io::Result<()> {
    use rustix::net::sockopt;
    sockopt::set_socket_keepalive(stream, true)?;
    // Whole seconds, at least one: what the kernel takes.
    let idle = Duration::from_secs(idle.as_secs().max(1));
    sockopt::set_tcp_keepidle(stream, idle)?;
    sockopt::set_tcp_keepintvl(stream, idle)?;
    sockopt::set_tcp_keepcnt(stream, KEEPALIVE_PROBES)?;
    Ok(())
}

/// The per-client connection cap: how many connections each client address holds, and the
/// log of refusals, at most one line per [`REFUSAL_LOG_EVERY`] so that a client hammering the
/// cap cannot flood the log.
#[derive(Debug)]
struct PerClient {
    /// 0: no cap (nothing is counted).
    cap: usize,
    state: Mutex<PerClientState>,
}

#[derive(Debug, Default)]
struct PerClientState {
    held: HashMap<IpAddr, usize>,
    /// When a refusal was last logged, and the refusals since that were not.
    last_logged: Option<tokio::time::Instant>,
    unlogged: u64,
}

/// The least time between two log lines about refused connections.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

impl PerClient {
    fn new(cap: usize) -> Arc<PerClient> {
        Arc::new(PerClient {
            cap,
            state: Mutex::default(),
        })
    }

    /// A slot for one more connection from `client`, or `None` (logged) if it holds the cap.
    fn admit(self: &Arc<Self>, client: Option<IpAddr>) -> Option<ClientSlot> {
        let (Some(addr), true) = (client, self.cap > 0) else {
            return Some(ClientSlot(None));
        };
        let mut state = self.state.lock().expect("never poisoned");
        let held = state.held.entry(addr).or_insert(0);
        if *held < self.cap {
            *held += 1;
            return Some(ClientSlot(Some((Arc::clone(self), addr))));
        }
        let now = tokio::time::Instant::now();
        if state
            .last_logged
            .is_some_and(|at| now.duration_since(at) < REFUSAL_LOG_EVERY)
        {
            state.unlogged += 1;
        } else {
            tracing::warn!(
                client = %addr,
                max_connections_per_client = self.cap,
                refused_unlogged = state.unlogged,
                "{addr} holds max-connections-per-client ({}) connections: closing a new one \
                 before the greeting (further refusals are logged at most every {}s)",
                self.cap,
                REFUSAL_LOG_EVERY.as_secs()
            );
            state.last_logged = Some(now);
            state.unlogged = 0;
        }
        None
    }
}

/// One connection counted under [`PerClient`]; dropping it frees the slot.
struct ClientSlot(Option<(Arc<PerClient>, IpAddr)>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let Some((per_client, addr)) = self.0.take() else {
            return;
        };
        let mut state = per_client.state.lock().expect("never poisoned");
        if let Some(held) = state.held.get_mut(&addr) {
            *held -= 1;
            if *held == 0 {
                state.held.remove(&addr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_records_round_trip_and_bad_ones_are_refused() {
        let states = vec![
            ("conn-0".to_owned(), b"first".to_vec()),
            ("conn-1".to_owned(), Vec::new()),
        ];
        let bytes = encode_states(&states);
        let decoded = decode_states(&bytes).unwrap();
        assert_eq!(decoded.len(), 2);
        assert_eq!(decoded["conn-0"], b"first");
        assert_eq!(decoded["conn-1"], b"");
        // Every truncation is an error, never a panic or a partial record.
        for end in 1..bytes.len() {
            if end == bytes.len() - 4 - 6 - 2 {
                continue; // ends exactly after the first record: a valid file of one
            }
            assert!(decode_states(&bytes[..end]).is_err(), "cut at {end}");
        }
        // A length beyond any real state is refused before anything is read.
        let mut huge = encode_states(&[("conn-0".to_owned(), Vec::new())]);
        let at = huge.len() - 4;
        huge[at..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_states(&huge).is_err());
    }
}
