//! Graceful stop under load: several connections with many requests in flight, then SIGTERM.
//!
//! * every request sent before the signal gets a complete reply: success (and for a READ the
//!   data its WRITE stored), or ESHUTDOWN if the server had not started it;
//! * requests sent during the grace period get ESHUTDOWN;
//! * no reply is torn: every connection ends at a reply boundary, even one whose client keeps
//!   sending through the whole grace period;
//! * the server exits 0 within the grace period;
//! * a client still in the handshake gets ERR_SHUTDOWN for its options, and ACK for ABORT.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ramnbd_client_tests::client::transmission::HeaderStyle;
use ramnbd_client_tests::client::{ReplyReader, RequestWriter};
use ramnbd_client_tests::proto::*;
use ramnbd_client_tests::{MIB, Negotiate, RawClient, Request, Server, random_bytes};
use rustix::process::{Pid, Signal, kill_process};

const GRACE: Duration = Duration::from_secs(3);
const BLOCK: usize = 64 * 1024;
/// Requests sent this long after the signal must be refused (the server notices the signal
/// at its next read or write, which takes far less).
const SETTLE: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
struct Sent {
    ty: u16,
    length: u64,
    /// For a READ: the data the WRITE just before it stored.
    expect: Option<Arc<Vec<u8>>>,
    /// When its last byte had been handed to the socket.
    sent_at: Instant,
    /// When sending it began.
    began: Instant,
}

#[derive(Debug)]
enum Outcome {
    Ok(Option<Vec<u8>>),
    Err(u32),
}

type SentMap = Arc<Mutex<HashMap<u64, Sent>>>;

/// Reads simple replies until a clean end of stream, panicking on a torn one.
fn read_replies(mut reader: ReplyReader, sent: SentMap) -> HashMap<u64, Outcome> {
    let mut outcomes = HashMap::new();
    loop {
        // One byte first: an end of stream here is clean; anywhere later it tears a reply.
        let first = match reader.try_recv_exact(1) {
            Ok(byte) => byte,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
                ) =>
            {
                return outcomes;
            }
            Err(e) => panic!("reading a reply: {e}"),
        };
        let header = [first, reader.recv_exact(15)].concat();
        let magic = u32::from_be_bytes(header[0..4].try_into().unwrap());
        assert_eq!(magic, SIMPLE_REPLY_MAGIC, "bad reply header {header:02x?}");
        let error = u32::from_be_bytes(header[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(header[8..16].try_into().unwrap());
        // The writer records a request before sending it, so it is known here.
        let request = sent.lock().unwrap().get(&cookie).cloned();
        let request = request.unwrap_or_else(|| panic!("reply for unknown cookie {cookie:#x}"));
        let outcome = if error != 0 {
            Outcome::Err(error)
        } else if request.ty == CMD_READ {
            // A reply cut off inside its data panics here.
            Outcome::Ok(Some(reader.recv_exact(request.length as usize)))
        } else {
            Outcome::Ok(None)
        };
        assert!(
            outcomes.insert(cookie, outcome).is_none(),
            "two replies for {cookie:#x}"
        );
    }
}

/// What happens after the signal on one connection.
#[derive(Debug, Clone, Copy)]
enum After {
    /// This many more WRITE+READ pairs, 20 ms apart (a client still busy, then quiet).
    Pairs(usize),
    /// Pairs every 5 ms until the server hangs up (a client that never pauses).
    UntilClosed,
}

struct Connection {
    writer: RequestWriter,
    sent: SentMap,
    conn: u64,
    cookie: u64,
    pairs: u64,
}

impl Connection {
    /// A WRITE of fresh data to this connection's region, then a READ of it.
    fn send_pair(&mut self) -> bool {
        let offset = self.conn * 4 * MIB + (self.pairs % 64) * BLOCK as u64;
        let data = Arc::new(random_bytes(self.conn << 32 | self.pairs, BLOCK));
        self.pairs += 1;
        for (request, expect) in [
            (Request::write(offset, &data), None),
            (Request::read(offset, BLOCK as u64), Some(Arc::clone(&data))),
        ] {
            let mut bytes = request.encode_header(HeaderStyle::Compact, self.cookie);
            bytes.extend_from_slice(&request.payload);
            let began = Instant::now();
            let record = Sent {
                ty: request.ty,
                length: request.length,
                expect,
                sent_at: began,
                began,
            };
            self.sent.lock().unwrap().insert(self.cookie, record);
            let result = self.writer.try_send_raw(&bytes);
            if let Some(s) = self.sent.lock().unwrap().get_mut(&self.cookie) {
                s.sent_at = Instant::now();
            }
            self.cookie += 1;
            if result.is_err() {
                return false;
            }
        }
        true
    }
}

struct Finished {
    conn: u64,
    sent: HashMap<u64, Sent>,
    outcomes: HashMap<u64, Outcome>,
}

fn run_connection(
    client: RawClient,
    conn: u64,
    ready: Arc<Barrier>,
    stop: Arc<AtomicBool>,
    signalled: Arc<Mutex<Option<Instant>>>,
    after: After,
) -> Finished {
    let RawClient { writer, reader, .. } = client;
    let sent = SentMap::default();
    let reader_sent = Arc::clone(&sent);
    let reader_thread = thread::spawn(move || read_replies(reader, reader_sent));
    let mut c = Connection {
        writer,
        sent: Arc::clone(&sent),
        conn,
        cookie: conn << 48 | 1,
        pairs: 0,
    };
    ready.wait();
    // Before the signal: as fast as the server takes them, so many are in flight.
    while !stop.load(Ordering::Relaxed) {
        assert!(
            c.send_pair(),
            "connection {conn}: the server hung up before the signal"
        );
    }
    let t_signal = loop {
        if let Some(t) = *signalled.lock().unwrap() {
            break t;
        }
        thread::sleep(Duration::from_millis(1));
    };
    thread::sleep((t_signal + SETTLE).saturating_duration_since(Instant::now()));
    match after {
        After::Pairs(n) => {
            for _ in 0..n {
                if !c.send_pair() {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        After::UntilClosed => {
            let until = Instant::now() + 2 * GRACE;
            while Instant::now() < until && c.send_pair() {
                thread::sleep(Duration::from_millis(5));
            }
        }
    }
    let outcomes = reader_thread.join().expect("reader thread");
    drop(c);
    let sent = Arc::try_unwrap(sent).unwrap().into_inner().unwrap();
    Finished {
        conn,
        sent,
        outcomes,
    }
}

#[test]
fn sigterm_under_load_completes_every_request_and_exits_in_time() {
    let mut server = Server::start(&[
        "--no-config",
        "-e",
        "disk=64M",
        "--shutdown-grace",
        &format!("{}s", GRACE.as_secs()),
    ]);
    let targets = [server.tcp(), server.unix(), server.tcp(), server.unix()];
    let afters = [
        After::Pairs(10),
        After::Pairs(10),
        After::Pairs(0),
        After::UntilClosed,
    ];
    let ready = Arc::new(Barrier::new(targets.len() + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let signalled: Arc<Mutex<Option<Instant>>> = Arc::default();
    let threads: Vec<_> = targets
        .iter()
        .zip(afters)
        .enumerate()
        .map(|(conn, (target, after))| {
            let client = Negotiate::new("disk").go(target);
            let (ready, stop, signalled) = (
                Arc::clone(&ready),
                Arc::clone(&stop),
                Arc::clone(&signalled),
            );
            thread::spawn(move || {
                run_connection(client, conn as u64, ready, stop, signalled, after)
            })
        })
        .collect();

    ready.wait();
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let t_signal = Instant::now();
    kill_process(Pid::from_raw(server.pid() as i32).unwrap(), Signal::TERM).unwrap();
    *signalled.lock().unwrap() = Some(t_signal);

    let finished: Vec<Finished> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let status = server.terminate();
    let stopped_after = t_signal.elapsed();
    assert!(status.success(), "ramnbd exited with {status}");
    assert!(
        stopped_after < GRACE + Duration::from_millis(500),
        "ramnbd took {stopped_after:?} to stop; the grace period is {GRACE:?}"
    );

    let (mut before, mut done_before, mut refused_after, mut unanswered_after) = (0, 0, 0, 0);
    for f in &finished {
        let conn = f.conn;
        for (cookie, s) in &f.sent {
            let outcome = f.outcomes.get(cookie);
            if s.sent_at < t_signal {
                // Sent before the signal: a complete reply, success or ESHUTDOWN.
                before += 1;
                match outcome {
                    Some(Outcome::Ok(data)) => {
                        done_before += 1;
                        if let (Some(data), Some(expect)) = (data, &s.expect) {
                            assert!(
                                data == expect.as_ref(),
                                "connection {conn}: READ {cookie:#x} returned other data than its WRITE stored"
                            );
                        }
                    }
                    Some(Outcome::Err(e)) => assert_eq!(
                        *e, ESHUTDOWN,
                        "connection {conn}: request {cookie:#x} sent before the signal failed with {e}"
                    ),
                    None => panic!(
                        "connection {conn}: request {cookie:#x} sent before the signal got no reply"
                    ),
                }
            } else if s.began >= t_signal + SETTLE {
                // Sent during the grace period: refused, or unanswered because the server had
                // already closed the connection.
                match outcome {
                    Some(Outcome::Err(e)) => {
                        assert_eq!(*e, ESHUTDOWN, "connection {conn}: {cookie:#x}");
                        refused_after += 1;
                    }
                    Some(Outcome::Ok(_)) => panic!(
                        "connection {conn}: request {cookie:#x} sent {:?} after the signal succeeded",
                        s.began - t_signal
                    ),
                    None => unanswered_after += 1,
                }
            }
        }
    }
    eprintln!(
        "sent before the signal: {before} ({done_before} done, {} refused); \
         after: {refused_after} refused, {unanswered_after} unanswered; stopped in {stopped_after:?}",
        before - done_before
    );
    assert!(
        before >= 100,
        "too little load to test anything: {before} requests"
    );
    assert!(done_before > 0);
    // The busy clients (10 pairs, 20 ms apart) were answered while the server drained.
    assert!(
        refused_after >= 40,
        "only {refused_after} requests refused after the signal"
    );
    // The client that never paused kept the connection until the closing phase.
    let log = server.stderr_text();
    assert!(
        log.contains("closing connections after their queued replies"),
        "{log}"
    );
    assert!(!log.contains("dropping them"), "{log}");
}

/// A client in the middle of the handshake when the server stops gets ERR_SHUTDOWN for its
/// options (and can still ABORT cleanly); the listener no longer accepts.
#[test]
fn sigterm_during_the_handshake_answers_err_shutdown() {
    let mut server = Server::start(&["--no-config", "-s", "1M", "--shutdown-grace", "3s"]);
    let mut client = RawClient::connect(&server.unix());
    client.read_greeting();
    client.send_client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    assert_eq!(client.opt_list().expect("LIST before the signal").len(), 1);

    let t_signal = Instant::now();
    kill_process(Pid::from_raw(server.pid() as i32).unwrap(), Signal::TERM).unwrap();
    thread::sleep(Duration::from_millis(100));
    let reply = client.option_single(OPT_LIST, &[]);
    assert_eq!(reply.rep, REP_ERR_SHUTDOWN, "{reply:?}");
    let reply = client.option_single(OPT_GO, &[0, 0, 0, 0, 0, 0]);
    assert_eq!(reply.rep, REP_ERR_SHUTDOWN, "{reply:?}");
    assert_eq!(client.opt_abort().rep, REP_ACK);
    assert!(client.closed_within(Duration::from_secs(2)));

    // No new connections once stopping (the listener is closed or no longer accepting).
    if let Ok(mut late) = std::os::unix::net::UnixStream::connect(server.unix_path()) {
        use std::io::Read;
        late.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 8];
        assert!(
            !matches!(late.read(&mut buf), Ok(n) if n > 0),
            "a new connection got a greeting after SIGTERM"
        );
    }
    let status = server.terminate();
    assert!(status.success(), "{status}");
    assert!(t_signal.elapsed() < Duration::from_secs(3));
}

/// An idle connection does not hold up the stop: it is closed once quiet.
#[test]
fn idle_connections_close_promptly() {
    let mut server = Server::start(&["--no-config", "-s", "1M", "--shutdown-grace", "10s"]);
    let mut clients: Vec<RawClient> = (0..3)
        .map(|_| Negotiate::new("").go(&server.tcp()))
        .collect();
    clients[0].write(0, b"hello").unwrap();
    let t_signal = Instant::now();
    let status = server.terminate();
    assert!(status.success(), "{status}");
    assert!(
        t_signal.elapsed() < Duration::from_secs(2),
        "idle clients held the server for {:?}",
        t_signal.elapsed()
    );
    for client in &mut clients {
        assert!(client.closed_within(Duration::from_secs(1)));
    }
}

/// Starts a server with a long grace period and a client that floods READs without reading
/// the replies, so the server's session is stuck writing to it. Returns when the stuck
/// connection has filled its socket.
fn server_with_a_client_that_does_not_read() -> (Server, RawClient) {
    let server = Server::start(&["--no-config", "-s", "64M", "--shutdown-grace", "60s"]);
    let mut client = Negotiate::new("").go(&server.unix());
    let requests: Vec<Request> = (0..400).map(|_| Request::read(0, MIB)).collect();
    client.writer.send_all(&requests);
    thread::sleep(Duration::from_millis(300));
    (server, client)
}

#[test]
fn a_second_signal_ends_the_stop_even_when_a_client_does_not_read() {
    // The session cannot send what it has queued; after the second signal the server waits
    // at most a second for it (shutdown::CLOSE_FLUSH), not the rest of the 60 s grace period.
    let (mut server, _client) = server_with_a_client_that_does_not_read();
    server.signal(Signal::TERM);
    thread::sleep(Duration::from_millis(300));
    assert!(
        server.is_running(),
        "still within the grace period after one signal"
    );
    let second = Instant::now();
    server.signal(Signal::TERM);
    let status = server
        .wait_timeout(Duration::from_secs(5))
        .expect("the server exits within 5 s of the second signal");
    assert!(status.success(), "{status}");
    assert!(
        second.elapsed() < Duration::from_secs(3),
        "{:?}",
        second.elapsed()
    );
    assert!(!server.unix_path().exists(), "the socket file is removed");
}

#[test]
fn a_third_signal_exits_at_once() {
    let (mut server, _client) = server_with_a_client_that_does_not_read();
    server.signal(Signal::TERM);
    thread::sleep(Duration::from_millis(200));
    server.signal(Signal::INT);
    thread::sleep(Duration::from_millis(50));
    let third = Instant::now();
    server.signal(Signal::TERM);
    let status = server
        .wait_timeout(Duration::from_secs(5))
        .expect("the server exits after the third signal");
    assert!(status.success(), "{status}");
    assert!(
        third.elapsed() < Duration::from_millis(700),
        "exited {:?} after the third signal, not at once",
        third.elapsed()
    );
}

#[test]
fn a_signal_while_listeners_are_being_bound_still_stops_cleanly() {
    // 400 Unix listeners take some milliseconds to bind. SIGTERM as soon as the first socket
    // file appears: the signal handlers must already be in place, so the server stops in
    // order (exit 0) and removes every socket file it made, rather than dying of the signal
    // with the files left behind.
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<std::path::PathBuf> =
        (0..400).map(|i| dir.path().join(format!("s{i}"))).collect();
    let mut command = std::process::Command::new(ramnbd_client_tests::server::ramnbd_bin());
    command.args(["--no-config", "-s", "1M"]);
    for path in &paths {
        command.arg("-u").arg(path);
    }
    let mut child = command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !paths[0].exists() {
        assert!(
            Instant::now() < deadline,
            "the server never bound its first socket"
        );
        std::hint::spin_loop();
    }
    kill_process(Pid::from_raw(child.id() as i32).unwrap(), Signal::TERM).unwrap();
    let status = child.wait().unwrap();
    let left = paths.iter().filter(|p| p.exists()).count();
    assert!(status.success(), "{status} ({left} socket files left)");
    assert_eq!(left, 0, "socket files left behind");
}
