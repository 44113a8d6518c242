//! The Linux kernel client's dialect, reproduced with the raw client (the host has no nbd.ko;
//! the real kernel runs in the VM tests in client-tests/vm).
//!
//! What the kernel does (read in `drivers/block/nbd.c` and nbd-client 3.24, and seen in the
//! VM tests): nbd-client sends only GO with no info requests and client flags FIXED_NEWSTYLE|NO_ZEROES;
//! the kernel accepts only simple replies, keeps up to 128 requests in flight per connection
//! with cookies `(cmd_cookie << 32) | tag`, uses 512-byte sectors, sends FUA writes, TRIMs of
//! up to 4 GiB - 512 bytes, and DISC at disconnect while I/O may still be in flight.

use std::thread;
use std::time::Duration;

use ramnbd_client_tests::client::ReplyMode;
use ramnbd_client_tests::proto::*;
use ramnbd_client_tests::{GIB, KIB, MIB, Negotiate, RawClient, Request, Server, random_bytes};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SECTOR: u64 = 512;

fn kernel_connect(server: &Server) -> RawClient {
    let client = Negotiate::new("")
        .client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .go(&server.tcp());
    assert_eq!(client.negotiated.mode, ReplyMode::Simple);
    // The kernel needs CAN_MULTI_CONN for more than one connection, and SEND_FLUSH for FUA.
    let flags = client.negotiated.transmission_flags;
    assert_eq!(flags, RAMNBD_BASE_FLAGS, "transmission flags {flags:#06x}");
    client
}

/// The kernel's cookie layout: a per-command counter in the high half, the blk-mq tag low.
fn kernel_cookie(cmd_cookie: u32, tag: u32) -> u64 {
    (u64::from(cmd_cookie) << 32) | u64::from(tag)
}

/// A random multiple of 512 in `[min, max]`.
fn sectors(rng: &mut StdRng, min: u64, max: u64) -> u64 {
    rng.random_range(min / SECTOR..=max / SECTOR) * SECTOR
}

#[test]
fn sector_aligned_io_round_trips() {
    let server = Server::start(&["-s", "1G"]);
    let mut client = kernel_connect(&server);
    let mut rng = StdRng::seed_from_u64(512);
    for i in 0..64 {
        let offset = sectors(&mut rng, 0, GIB - 128 * KIB);
        let len = sectors(&mut rng, SECTOR, 128 * KIB);
        let data = random_bytes(i, len as usize);
        client.write(offset, &data).expect("write");
        assert_eq!(client.read(offset, len), Ok(data), "at {offset}+{len}");
    }
}

#[test]
fn queue_depth_128_on_one_connection() {
    let server = Server::start(&["-s", "8G"]);
    let mut client = kernel_connect(&server);
    // Region A is prefilled and only read by the batch; region B is only written, one slot per
    // request, so every outcome is determined whatever order the server processes them in.
    let region_a = 16 * MIB;
    let a_data = random_bytes(0xa, region_a as usize);
    for (i, block) in a_data.chunks(4 * MIB as usize).enumerate() {
        client
            .write(i as u64 * 4 * MIB, block)
            .expect("prefill region A");
    }
    let region_b = 6 * GIB; // far away, and past 4 GiB to exercise 64-bit offsets
    let slot = 128 * KIB;

    let mut rng = StdRng::seed_from_u64(128);
    let mut requests = Vec::new();
    let mut written = Vec::new();
    for i in 0..128u32 {
        let cookie = kernel_cookie(i * 3 + 1, i);
        let len = sectors(&mut rng, 4 * KIB, 128 * KIB);
        if i % 2 == 0 {
            let offset = sectors(&mut rng, 0, region_a - len);
            requests.push(Request::read(offset, len).cookie(cookie));
        } else {
            let offset = region_b + u64::from(i) * slot;
            let data = random_bytes(1000 + u64::from(i), len as usize);
            requests.push(Request::write(offset, &data).cookie(cookie));
            written.push((offset, data));
        }
    }
    let responses = client.pipeline(&requests);
    assert_eq!(responses.len(), 128);
    for (request, response) in requests.iter().zip(&responses) {
        assert_eq!(Some(response.cookie), request.cookie);
        assert!(response.is_simple(), "{response:?}");
        if request.ty == CMD_READ {
            let got = response
                .read_data(request.offset, request.length)
                .expect("read");
            let at = request.offset as usize;
            assert!(
                got == a_data[at..at + got.len()],
                "READ {:#x} returned the wrong data",
                response.cookie
            );
        } else {
            assert_eq!(response.result(), Ok(()), "WRITE {:#x}", response.cookie);
        }
    }
    for (offset, data) in written {
        assert_eq!(
            client.read(offset, data.len() as u64),
            Ok(data),
            "slot at {offset}"
        );
    }
}

#[test]
fn fua_writes_are_visible_on_another_connection() {
    let server = Server::start(&["-s", "1G"]);
    let mut writer = kernel_connect(&server);
    let mut reader = kernel_connect(&server);
    let data = random_bytes(42, 128 * KIB as usize);
    writer
        .write_flags(MIB, &data, CMD_FLAG_FUA)
        .expect("FUA write");
    // CAN_MULTI_CONN: once the FUA write is acknowledged, every connection sees it.
    assert_eq!(reader.read(MIB, 128 * KIB), Ok(data));
    writer.flush().expect("flush");
}

#[test]
fn trim_of_4_gib_minus_512_bytes() {
    let server = Server::start(&["-s", "8G"]);
    let mut client = kernel_connect(&server);
    let trim_len: u64 = 0xffff_fe00; // what blkdiscard sends on an 8 GiB device
    let straddle = trim_len - 4 * KIB; // 8 KiB written across the end of the trim
    let tail = random_bytes(7, 8 * KIB as usize);
    client.write(0, &[1; 4096]).expect("write at 0");
    client.write(GIB, &[2; 4096]).expect("write at 1 GiB");
    client.write(straddle, &tail).expect("write across the end");
    client.trim(0, trim_len).expect("TRIM 4 GiB - 512");

    assert_eq!(client.read(0, 4096), Ok(vec![0; 4096]));
    assert_eq!(client.read(GIB, 4096), Ok(vec![0; 4096]));
    // The trim ends mid-page: bytes before its end are zero, bytes after keep their data.
    let back = client.read(straddle, 8 * KIB).expect("read across the end");
    let cut = (trim_len - straddle) as usize;
    assert!(back[..cut].iter().all(|&b| b == 0), "inside the trim");
    assert_eq!(&back[cut..], &tail[cut..], "after the trim");
}

#[test]
fn disc_with_requests_in_flight_gets_every_reply_before_the_close() {
    let server = Server::start(&["-s", "1G"]);
    let mut client = kernel_connect(&server);
    client
        .write(0, &random_bytes(3, 2 * MIB as usize))
        .expect("prefill");
    let mut requests = Vec::new();
    for i in 0..64u64 {
        let cookie = kernel_cookie(i as u32 + 9, i as u32);
        if i % 2 == 0 {
            requests.push(Request::read(i * 32 * KIB, 32 * KIB).cookie(cookie));
        } else {
            let data = random_bytes(500 + i, 64 * KIB as usize);
            requests.push(Request::write(512 * MIB + i * 64 * KIB, &data).cookie(cookie));
        }
    }
    let count = requests.len();
    // DISC goes out in the same write as the requests, so they are all still in flight.
    requests.push(Request::disc());
    let (writer, reader) = client.split();
    let (responses, closed) = thread::scope(|scope| {
        let sender = scope.spawn(|| writer.send_all(&requests));
        let responses = reader.recv_responses(count);
        let closed = reader.expect_closed(Duration::from_secs(10));
        sender.join().expect("sender");
        (responses, closed)
    });
    assert_eq!(closed, Ok(()), "extra bytes after the last reply");
    let prefill = random_bytes(3, 2 * MIB as usize);
    for request in &requests[..count] {
        let response = &responses[&request.cookie.expect("cookie")];
        if request.ty == CMD_READ {
            let at = request.offset as usize;
            assert_eq!(
                response.read_data(request.offset, request.length),
                Ok(prefill[at..at + request.length as usize].to_vec())
            );
        } else {
            assert_eq!(response.result(), Ok(()));
        }
    }
    // The writes were carried out, not just answered.
    let mut check = kernel_connect(&server);
    for request in requests[..count].iter().filter(|r| r.ty == CMD_WRITE) {
        assert_eq!(
            check.read(request.offset, request.length),
            Ok(request.payload.clone())
        );
    }
}
