//! The `nbd` crate's synchronous client: a third-party client on the EXPORT_NAME path (it sends
//! client flags FIXED_NEWSTYLE only, so the server must send the 124 zero bytes, which the crate
//! checks).

use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;

use nbd::client::{NbdClient, NbdExt, handshake};
use ramnbd_client_tests::scrape::{scrape, value};
use ramnbd_client_tests::{KIB, MIB, Server, random_bytes};

#[test]
fn nbd_crate_writes_and_reads_back_over_tcp() {
    let server = Server::start(&["-e", "crate=8M"]);
    let mut tcp = TcpStream::connect(server.tcp_addr()).expect("connect");
    let export = handshake(&mut tcp, b"crate").expect("EXPORT_NAME handshake");
    assert_eq!(export.size, 8 * MIB);
    assert!(!export.readonly);
    assert!(!export.rotational);
    assert!(export.send_trim);
    assert!(export.send_flush);

    let mut client = NbdClient::new(&mut tcp, &export);
    let data = random_bytes(1, MIB as usize);
    client.seek(SeekFrom::Start(4 * KIB)).expect("seek");
    client.write_all(&data).expect("write");
    client.flush().expect("flush");

    let mut back = vec![0u8; MIB as usize + 8 * KIB as usize];
    client.seek(SeekFrom::Start(0)).expect("seek");
    client.read_exact(&mut back).expect("read");
    assert!(back[..4096].iter().all(|&b| b == 0));
    assert!(back[4096..4096 + data.len()] == data[..]);
    assert!(back[4096 + data.len()..].iter().all(|&b| b == 0));

    // The crate's TRIM, and the read-back of the trimmed range.
    client.seek(SeekFrom::Start(4 * KIB)).expect("seek");
    client.trim(64 * KIB as usize).expect("trim");
    let mut trimmed = vec![0xffu8; 64 * KIB as usize];
    client.seek(SeekFrom::Start(4 * KIB)).expect("seek");
    client.read_exact(&mut trimmed).expect("read");
    assert!(
        trimmed.iter().all(|&b| b == 0),
        "trimmed range reads as zero"
    );
}

#[test]
fn nbd_crate_sees_the_end_of_the_export_over_unix() {
    let server = Server::start(&["-s", "1M"]);
    let mut unix = UnixStream::connect(server.unix_path()).expect("connect");
    let export = handshake(&mut unix, b"").expect("handshake to the default export");
    assert_eq!(export.size, MIB);
    let mut client = NbdClient::new(&mut unix, &export);
    client.seek(SeekFrom::End(-3)).expect("seek");
    client.write_all(b"end").expect("write the last bytes");
    // Reading to the end stops at the export size.
    client.seek(SeekFrom::End(-10)).expect("seek");
    let mut tail = Vec::new();
    client.read_to_end(&mut tail).expect("read to the end");
    assert_eq!(tail, b"\0\0\0\0\0\0\0end");
}

#[test]
fn nbd_crate_round_trips_48_mib_in_single_requests() {
    // EXPORT_NAME clients never see the advertised 32 MiB maximum; the crate sends each write
    // and read as one request of the whole buffer. The server counts what it received.
    let server = Server::start(&["-s", "128M", "--metrics", "127.0.0.1:0"]);
    let peak_before = server.peak_rss_bytes();
    let mut unix = UnixStream::connect(server.unix_path()).expect("connect");
    let export = handshake(&mut unix, b"").expect("EXPORT_NAME handshake");
    let mut client = NbdClient::new(&mut unix, &export);
    let data = random_bytes(48, 48 * MIB as usize);
    client.seek(SeekFrom::Start(MIB + 5)).expect("seek");
    client.write_all(&data).expect("a 48 MiB write");
    let mut back = vec![0u8; data.len()];
    client.seek(SeekFrom::Start(MIB + 5)).expect("seek");
    client.read_exact(&mut back).expect("a 48 MiB read");
    assert!(back == data, "48 MiB read back differs");
    // The store keeps the 48 MiB; streaming adds no request-sized buffer on top.
    let growth = server.peak_rss_bytes() - peak_before;
    eprintln!(
        "peak RSS growth for a 48 MiB write and read: {} KiB",
        growth / 1024
    );
    assert!(growth < 56 * MIB, "peak RSS grew by {} MiB", growth / MIB);

    let body = scrape(&server);
    for command in ["write", "read"] {
        let series = |name| format!("{name}{{export=\"\",command=\"{command}\"}}");
        assert_eq!(
            value(&body, &series("ramnbd_requests_total")),
            1.0,
            "{command}"
        );
        assert_eq!(
            value(&body, &series("ramnbd_request_bytes_total")),
            (48 * MIB) as f64,
            "{command}: one request of 48 MiB"
        );
    }
}
