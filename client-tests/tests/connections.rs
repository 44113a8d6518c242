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
