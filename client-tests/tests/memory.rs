//! Memory: a huge export costs nothing until written, writes cost RSS, and TRIM gives it back.
//!
//! Measured on the server process itself (/proc/PID/status VmRSS).

use ramnbd_client_tests::{MIB, Negotiate, RawClient, Request, Server, random_bytes};

const TIB: u64 = 1024 * 1024 * MIB;
const CHUNK: u64 = 4 * MIB;

/// Writes `len` bytes of random data at `offset` in 4 MiB chunks, four requests in flight.
fn write_random(client: &mut RawClient, offset: u64, len: u64, seed: u64) {
    let chunks: Vec<u64> = (0..len / CHUNK).collect();
    for group in chunks.chunks(4) {
        let requests: Vec<Request> = group
            .iter()
            .map(|&i| Request::write(offset + i * CHUNK, &random_bytes(seed + i, CHUNK as usize)))
            .collect();
        for response in client.pipeline(&requests) {
            assert_eq!(response.result(), Ok(()), "write");
        }
    }
}

#[test]
fn a_1_tib_export_costs_memory_only_for_written_data() {
    let server = Server::start(&["-s", "1T"]);
    let start = server.rss_bytes();
    assert!(
        start < 16 * MIB,
        "a fresh 1 TiB server already holds {} MiB",
        start / MIB
    );

    let mut client = Negotiate::new("").go(&server.unix());
    assert_eq!(client.negotiated.size, TIB);
    // Half at the start, half at the very end: offsets far apart must not cost what lies between.
    let tail = TIB - 256 * MIB;
    write_random(&mut client, 0, 256 * MIB, 1);
    write_random(&mut client, tail, 256 * MIB, 2);
    client.flush().expect("flush");
    let written = server.rss_bytes();
    assert!(
        written >= start + 480 * MIB,
        "writing 512 MiB raised RSS only from {} to {} MiB",
        start / MIB,
        written / MIB
    );
    // Spot-check that the data is really there (RSS alone could be buffers).
    assert_eq!(
        client.read(tail + 256 * MIB - 4096, 4096),
        Ok(random_bytes(2 + 63, CHUNK as usize)[CHUNK as usize - 4096..].to_vec())
    );

    client.trim(0, 256 * MIB).expect("trim the start");
    client.trim(tail, 256 * MIB).expect("trim the end");
    let trimmed = server.rss_bytes();
    eprintln!(
        "RSS: start {} KiB, after 512 MiB of writes {} KiB, after TRIM {} KiB",
        start / 1024,
        written / 1024,
        trimmed / 1024
    );
    assert!(
        trimmed <= start + 16 * MIB,
        "after trimming everything RSS is {} MiB (started at {} MiB)",
        trimmed / MIB,
        start / MIB
    );
    assert_eq!(client.read(0, 4096), Ok(vec![0; 4096]));
}

#[test]
fn write_zeroes_also_returns_memory() {
    let server = Server::start(&["-s", "1G"]);
    let start = server.rss_bytes();
    let mut client = Negotiate::new("").structured().go(&server.tcp());
    write_random(&mut client, 0, 128 * MIB, 7);
    let written = server.rss_bytes();
    assert!(written >= start + 120 * MIB, "RSS {} MiB", written / MIB);
    // Without NO_HOLE the server may (and ramnbd does) release the pages.
    client.write_zeroes(0, 128 * MIB, 0).expect("write zeroes");
    let zeroed = server.rss_bytes();
    eprintln!(
        "RSS: start {} KiB, written {} KiB, zeroed {} KiB",
        start / 1024,
        written / 1024,
        zeroed / 1024
    );
    assert!(
        zeroed <= start + 16 * MIB,
        "after WRITE_ZEROES RSS is {} MiB (started at {} MiB)",
        zeroed / MIB,
        start / MIB
    );
}

#[test]
fn sixty_four_writes_stalled_near_their_end_hold_little_memory() {
    // 64 connections each send a 32 MiB WRITE and 31 MiB of its payload, then stall. The
    // server applies a payload as it arrives and buffers at most about 1 MiB per connection,
    // so it does not hold 64 requests' worth (2 GiB). The payload is zeroes, which the store
    // does not keep, so RSS shows only what the connections buffer.
    let server = Server::start(&["-s", "4G"]);
    let start = server.rss_bytes();
    let len = 32 * MIB;
    let zeroes = vec![0u8; len as usize];
    let mut stalled = Vec::new();
    for i in 0..64 {
        let mut client = Negotiate::new("").go(&server.unix());
        let partial =
            Request::write(i * len, &zeroes).payload(zeroes[..31 * MIB as usize].to_vec());
        let cookie = client.send(&partial);
        stalled.push((client, cookie));
    }
    // Sending returned once the server had taken all but a socket buffer's worth.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let held = server.rss_bytes();
    eprintln!(
        "RSS: start {} KiB, with 64 writes stalled 31 MiB into 32 MiB: {} KiB",
        start / 1024,
        held / 1024
    );
    assert!(
        held < start + 128 * MIB,
        "64 stalled writes hold {} MiB",
        (held - start) / MIB
    );
    // Other clients are served meanwhile, and a stalled write that resumes completes.
    let mut other = Negotiate::new("").go(&server.tcp());
    other.write(3 * 1024 * MIB, b"alive").expect("write");
    assert_eq!(other.read(3 * 1024 * MIB, 5), Ok(b"alive".to_vec()));
    let (first, cookie) = &mut stalled[0];
    first.send_raw(&zeroes[..MIB as usize]);
    assert_eq!(first.wait(*cookie).result(), Ok(()));
}
