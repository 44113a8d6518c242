//! Many connections at once, and hostile ones that must not disturb their neighbours.

use std::time::Duration;

use ramnbd_client_tests::client::transmission::HeaderStyle;
use ramnbd_client_tests::{Negotiate, RawClient, Request, Server, random_bytes};

const CONNECTIONS: usize = 300;

#[test]
fn hundreds_of_connections_are_served_at_once() {
    let server = Server::start(&["-s", "64M"]);
    // Open every connection before any of them does I/O, so they are all live together.
    let mut clients: Vec<RawClient> = (0..CONNECTIONS)
        .map(|i| {
            let target = if i % 2 == 0 {
                server.unix()
            } else {
                server.tcp()
            };
            Negotiate::new("").go(&target)
        })
        .collect();
    for (i, client) in clients.iter_mut().enumerate() {
        client
            .write(i as u64 * 4096, &random_bytes(i as u64, 4096))
            .expect("write");
    }
    // Every connection sees every other connection's write (multi-conn consistency).
    for (i, client) in clients.iter_mut().enumerate() {
        let other = (i * 7 + 3) % CONNECTIONS;
        let data = client.read(other as u64 * 4096, 4096).expect("read");
        assert!(
            data == random_bytes(other as u64, 4096),
            "connection {i} read {other}'s block wrong"
        );
    }
}

#[test]
fn a_hostile_connection_does_not_disturb_its_neighbours() {
    let server = Server::start(&["-s", "64M"]);
    let mut good = Negotiate::new("").go(&server.unix());
    // Keep requests in flight on the good connection while the others misbehave.
    let requests: Vec<Request> = (0..64u64)
        .map(|i| Request::write(i * 65536, &random_bytes(i, 65536)))
        .collect();
    for cookie in requests.iter().map(|r| good.send(r)).collect::<Vec<_>>() {
        assert_eq!(good.wait(cookie).result(), Ok(()));
    }

    // Garbage instead of a request header: that connection is dropped, nobody else is.
    let mut garbage = Negotiate::new("").go(&server.tcp());
    garbage.send_raw(&[0xde; 64]);
    assert!(
        garbage.closed_within(Duration::from_secs(5)),
        "bad magic did not end the stream"
    );

    // A connection that claims a 4 GiB write and then dies half-way through the payload.
    let mut liar = Negotiate::new("").go(&server.tcp());
    let header = Request::write(0, &[])
        .length(u32::MAX as u64)
        .encode_header(HeaderStyle::Compact, 1);
    liar.send_raw(&header);
    liar.send_raw(&[0x55; 1 << 20]);
    drop(liar);

    // A client that sends a request and never reads its replies.
    let mut deaf = Negotiate::new("").go(&server.tcp());
    for i in 0..64u64 {
        deaf.send_raw(&Request::read(i << 20, 1 << 20).encode_header(HeaderStyle::Compact, i));
    }

    // The good connection still works and its data is intact, and the server stays small.
    for i in 0..64u64 {
        let data = good.read(i * 65536, 65536).expect("read");
        assert!(data == random_bytes(i, 65536), "block {i} corrupted");
    }
    assert!(
        server.rss_bytes() < 128 << 20,
        "RSS {} MiB",
        server.rss_bytes() >> 20
    );
    drop(deaf);
}

#[test]
fn a_stderr_nobody_reads_does_not_stall_the_server() {
    // The server logs a line for each of a few thousand hostile handshakes into a pipe that
    // is never read: it fills after some hundreds of lines. Logging must then drop lines, not
    // block the threads that serve connections and handle signals.
    use std::io::Write as _;
    use std::os::unix::net::UnixStream;
    use std::process::{Command, Stdio};

    /// Kills the server if the test fails half way.
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ramnbd.sock");
    let child = Command::new(ramnbd_client_tests::server::ramnbd_bin())
        .args(["--no-config", "-s", "1M", "-u"])
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped()) // kept open, never read
        .spawn()
        .unwrap();
    let mut child = Reap(child);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&socket).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..3000 {
        // A bad option magic after the greeting: one log line each, then the server closes.
        let mut hostile = UnixStream::connect(&socket).unwrap();
        hostile
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut greeting = [0u8; 18];
        std::io::Read::read_exact(&mut hostile, &mut greeting).expect("a greeting");
        hostile.write_all(&[0, 0, 0, 1]).unwrap();
        hostile.write_all(&[0xee; 16]).unwrap();
    }
    let target = ramnbd_client_tests::Target::Unix(socket.clone());
    let mut client = Negotiate::new("").go(&target);
    client.set_read_timeout(Duration::from_secs(10));
    client.write(0, b"still serving").expect("write");
    assert_eq!(client.read(0, 13), Ok(b"still serving".to_vec()));
    drop(client);
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.0.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the server ignored SIGTERM with its stderr full"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}
