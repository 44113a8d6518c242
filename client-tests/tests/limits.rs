//! Limits against hostile clients: the handshake deadline, the open-files limit, the
//! per-client cap and TCP keepalive.

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::process::Command;
use std::time::{Duration, Instant};

use ramnbd_client_tests::proto::NBDMAGIC;
use ramnbd_client_tests::{Negotiate, Server, random_bytes};

/// Silent connections: more than a soft open-files limit of 1024 holds.
const SILENT: usize = 1100;
/// The handshake deadline the server is given (`--handshake-timeout 2s`).
const DEADLINE: Duration = Duration::from_secs(2);

/// The soft and hard "Max open files" of a process, from /proc/PID/limits.
fn open_files_limit(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

/// Reads the 18-byte greeting if it is there, then says whether the connection is still
/// open (nothing more to read, no EOF), without blocking.
fn still_open(stream: &mut TcpStream, greeted: &mut bool) -> bool {
    stream.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    let open = loop {
        match stream.read(&mut buf) {
            Ok(0) => break false,
            Ok(18) if !*greeted => *greeted = true,
            Ok(n) => panic!("{n} unexpected bytes"),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break true,
            Err(e) => panic!("read: {e}"),
        }
    };
    stream.set_nonblocking(false).unwrap();
    open
}

#[test]
fn silent_connections_are_closed_at_the_deadline_and_others_served_meanwhile() {
    // The test itself holds SILENT sockets.
    let own = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let hard = own.maximum.unwrap_or(1 << 20);
    assert!(
        own.current.unwrap_or(u64::MAX) > SILENT as u64 + 100,
        "the test needs more open files than {own:?}"
    );
    // As systemd starts a service: soft limit 1024, the hard one well above.
    let nofile = format!("--nofile=1024:{hard}");
    let server = Server::start_wrapped(
        &["prlimit", nofile.as_str()],
        &[
            "-s",
            "64M",
            "--max-connections",
            "2000",
            "--handshake-timeout",
            "2s",
        ],
    );
    let (soft, _) = open_files_limit(server.pid());
    // 2000 connections + 2 listeners + the margin of 64.
    assert_eq!(soft, 2066.min(hard), "the soft limit was not raised");

    let addr = server.tcp_addr();
    // From 10 threads, as a flood would come.
    let began = Instant::now();
    let mut silent: Vec<(TcpStream, Instant, bool)> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..10)
            .map(|t| {
                scope.spawn(move || {
                    (0..SILENT / 10)
                        .map(|i| {
                            let stream = TcpStream::connect(addr)
                                .unwrap_or_else(|e| panic!("connect {t}/{i}: {e}"));
                            (stream, Instant::now(), false)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().expect("connecting thread"))
            .collect()
    });
    assert_eq!(silent.len(), SILENT);
    // Read them in the order they connected, so that each EOF is seen when it comes.
    silent.sort_by_key(|(_, connected, _)| *connected);
    let opened = began.elapsed();

    // A normal client is served while all of them are open.
    let started = Instant::now();
    let mut client = Negotiate::new("").go(&server.tcp());
    client.write(0, &random_bytes(7, 4096)).expect("write");
    assert!(client.read(0, 4096).expect("read") == random_bytes(7, 4096));
    let served_in = started.elapsed();
    let mut open_after = 0;
    for (stream, _, greeted) in &mut silent {
        open_after += still_open(stream, greeted) as usize;
    }
    let checked = began.elapsed();
    assert!(
        checked < DEADLINE,
        "the normal client was not served while the silent connections were open: opening \
         them took {opened:?}, its handshake, write and read {served_in:?}"
    );
    assert_eq!(
        open_after, SILENT,
        "silent connections closed before the deadline"
    );
    assert!(
        silent.iter().all(|(_, _, greeted)| *greeted),
        "every silent connection got the greeting: the server accepted them all"
    );

    // Then the server closes each of them at the deadline.
    let mut closed_after = Vec::with_capacity(SILENT);
    for (i, (stream, connected, _)) in silent.iter_mut().enumerate() {
        stream.set_read_timeout(Some(DEADLINE * 3)).unwrap();
        let mut buf = [0u8; 16];
        match stream.read(&mut buf) {
            Ok(0) => closed_after.push(connected.elapsed()),
            Ok(n) => panic!("connection {i}: {n} bytes instead of EOF"),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                closed_after.push(connected.elapsed())
            }
            Err(e) => panic!("connection {i} not closed within {:?}: {e}", DEADLINE * 3),
        }
    }
    let first = closed_after.iter().min().unwrap();
    let last = closed_after.iter().max().unwrap();
    eprintln!(
        "{SILENT} silent connections opened in {opened:?}, closed {first:?}..{last:?} after \
         connecting; a normal client's handshake, write and read took {served_in:?} meanwhile; \
         soft open-files limit 1024 -> {soft}"
    );
    assert!(
        *first >= DEADLINE - Duration::from_millis(50),
        "closed early: {first:?}"
    );
    assert!(
        *last <= DEADLINE + Duration::from_secs(2),
        "closed late: {last:?}"
    );
    // The normal client, past its handshake, is not subject to the deadline.
    assert!(client.read(0, 4096).expect("read after the deadline") == random_bytes(7, 4096));
}

/// A TCP connection to `addr` from the local address `from`.
fn connect_from(from: [u8; 4], addr: SocketAddr) -> TcpStream {
    use rustix::net::{AddressFamily, SocketType, bind, connect, socket};
    let fd: OwnedFd = socket(AddressFamily::INET, SocketType::STREAM, None).expect("socket");
    bind(&fd, &SocketAddr::from((from, 0))).expect("bind the client's address");
    connect(&fd, &addr).expect("connect");
    let stream = TcpStream::from(fd);
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// The first 8 bytes the server sends: `Some(NBDMAGIC)` for a greeting, `None` at EOF.
fn first_word(stream: &mut TcpStream) -> Option<u64> {
    let mut word = [0u8; 8];
    match stream.read_exact(&mut word) {
        Ok(()) => Some(u64::from_be_bytes(word)),
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
            ) =>
        {
            None
        }
        Err(e) => panic!("read the greeting: {e}"),
    }
}

#[test]
fn one_address_gets_at_most_its_share_of_connections() {
    let server = Server::start(&["-s", "16M", "--max-connections-per-client", "3"]);
    let addr = server.tcp_addr();
    let mut held: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut stream = connect_from([127, 0, 0, 1], addr);
            assert_eq!(first_word(&mut stream), Some(NBDMAGIC));
            stream
        })
        .collect();
    // The fourth and later ones from the same address: closed before the greeting.
    for _ in 0..5 {
        let mut refused = connect_from([127, 0, 0, 1], addr);
        assert_eq!(first_word(&mut refused), None, "over the cap but greeted");
    }
    // Another address is served, handshake and all.
    let mut other = connect_from([127, 0, 0, 2], addr);
    assert_eq!(first_word(&mut other), Some(NBDMAGIC));
    // A freed slot is given again.
    held.pop();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut again = connect_from([127, 0, 0, 1], addr);
        if first_word(&mut again) == Some(NBDMAGIC) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a freed slot was not given again"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = server.stderr_text();
    let lines = log
        .lines()
        .filter(|l| l.contains("holds max-connections-per-client (3)"))
        .count();
    assert_eq!(lines, 1, "refusals are logged once per 10 s:\n{log}");
}

/// The keepalive timer of the server's side of established connections on `port`, as `ss`
/// shows it (`timer:(keepalive,6.9sec,0)`), one entry per connection.
fn keepalive_timers(port: u16) -> Vec<String> {
    let out = Command::new("ss")
        .args(["-tnoH", "state", "established", &format!("sport = :{port}")])
        .output()
        .expect("run ss");
    assert!(out.status.success(), "ss failed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .map(|line| {
            line.split_whitespace()
                .find(|w| w.starts_with("timer:("))
                .unwrap_or("")
                .to_owned()
        })
        .collect()
}

/// The timer of the server's one TCP connection once the retransmission timer ("on"), which
/// may show for a moment just after traffic, is gone.
fn settled_timer(server: &Server) -> String {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let timers = keepalive_timers(server.tcp_addr().port());
        assert_eq!(timers.len(), 1, "{timers:?}");
        if !timers[0].starts_with("timer:(on,") || Instant::now() > deadline {
            return timers[0].clone();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Seconds from ss's timer format: "7sec", "6.892ms" (6 s 892 ms), "892ms".
fn ss_seconds(text: &str) -> Option<f64> {
    if let Some(secs) = text.strip_suffix("sec") {
        return secs.parse().ok();
    }
    let ms = text.strip_suffix("ms")?;
    match ms.split_once('.') {
        Some((secs, ms)) => Some(secs.parse::<f64>().ok()? + ms.parse::<f64>().ok()? / 1000.0),
        None => Some(ms.parse::<f64>().ok()? / 1000.0),
    }
}

#[test]
fn accepted_connections_have_tcp_keepalive() {
    let server = Server::start(&["-s", "16M", "--tcp-keepalive", "7s"]);
    let mut client = Negotiate::new("").go(&server.tcp());
    assert!(client.read(0, 512).is_ok());
    let timer = settled_timer(&server);
    assert!(timer.starts_with("timer:(keepalive,"), "{timer}");
    // 7 s idle, counting down: between 3 s and 7 s left.
    let left = timer["timer:(keepalive,".len()..]
        .split(',')
        .next()
        .and_then(ss_seconds)
        .unwrap_or_else(|| panic!("{timer}"));
    assert!((3.0..=7.0).contains(&left), "{timer}");

    let server = Server::start(&["-s", "16M", "--tcp-keepalive", "0"]);
    let mut client = Negotiate::new("").go(&server.tcp());
    assert!(client.read(0, 512).is_ok());
    assert_eq!(settled_timer(&server), "", "keepalive 0 is off");
}

#[test]
fn a_hard_limit_too_low_for_max_connections_lowers_the_cap_and_says_how_to_fix_it() {
    let server = Server::start_wrapped(
        &["prlimit", "--nofile=1024:1024"],
        &["-s", "16M", "--max-connections", "2000"],
    );
    // 1024 - 2 listeners - the margin of 64.
    let log = server.wait_for_stderr("serving at most 958 connections", Duration::from_secs(5));
    assert!(
        log.contains("max-connections 2000 needs 2066 open files but the hard limit is 1024")
            && log.contains("LimitNOFILE="),
        "{log}"
    );
    assert_eq!(open_files_limit(server.pid()), (1024, 1024));
    // It serves.
    let mut client = Negotiate::new("").go(&server.tcp());
    assert!(client.read(0, 512).is_ok());
}

#[test]
fn listeners_queue_a_burst_of_1024_connections() {
    let server = Server::start(&["-s", "16M"]);
    // ss shows a listener's backlog as its Send-Q: "[u_str] LISTEN Recv-Q Send-Q …".
    let backlog = |args: &[&str]| {
        let out = Command::new("ss").args(args).output().expect("run ss");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let words: Vec<&str> = text.split_whitespace().collect();
        let at = words.iter().position(|w| *w == "LISTEN");
        let send_q = at.and_then(|at| words.get(at + 2));
        send_q
            .unwrap_or_else(|| panic!("ss {args:?}: {text}"))
            .to_string()
    };
    let port = format!("sport = :{}", server.tcp_addr().port());
    assert_eq!(backlog(&["-ltnH", &port]), "1024");
    let path = format!("src = {}", server.unix_path().display());
    assert_eq!(backlog(&["-lxH", &path]), "1024");
}
