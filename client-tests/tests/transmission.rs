//! The transmission phase with the raw client: data, reply formats, errors, block status.
//!
//! Most tests run once per reply format (simple, structured, extended headers), each on its own
//! connection to the same server. The raw client's reader already rejects replies that break a
//! MUST (wrong format for the negotiation, missing DONE, unknown cookies, non-spec error values),
//! so these tests concentrate on what each reply says.

use ramnbd_client_tests::client::transmission::HeaderStyle;
use ramnbd_client_tests::client::{ChunkBody, Extent, ReplyMode, Response};
use ramnbd_client_tests::proto::*;
use ramnbd_client_tests::{GIB, KIB, MIB, Negotiate, RawClient, Request, Server, random_bytes};

const SIZE: u64 = 64 * MIB;
const PAGE: u64 = 4096;
const MODES: [ReplyMode; 3] = [
    ReplyMode::Simple,
    ReplyMode::Structured,
    ReplyMode::Extended,
];

fn server(size: &str) -> Server {
    Server::start(&["-s", size])
}

/// A connection to the default export in `mode`; structured and extended connections also select
/// base:allocation.
fn connect(server: &Server, mode: ReplyMode) -> RawClient {
    let negotiate = Negotiate::new("");
    let negotiate = match mode {
        ReplyMode::Simple => negotiate,
        ReplyMode::Structured => negotiate.structured().base_allocation(),
        ReplyMode::Extended => negotiate.extended().base_allocation(),
    };
    let client = negotiate.go(&server.unix());
    assert_eq!(client.negotiated.mode, mode);
    client
}

/// Checks the reply is a single chunk of type `ty` with DONE (structured/extended) or a simple
/// reply (simple mode), carrying `error`.
fn assert_single_reply(response: &Response, mode: ReplyMode, ty: u16, error: u32) {
    assert_eq!(response.error(), error, "{response:?}");
    if mode == ReplyMode::Simple {
        assert!(response.is_simple(), "{response:?}");
        return;
    }
    let chunks = response.chunks();
    assert_eq!(chunks.len(), 1, "{response:?}");
    assert_eq!(chunks[0].ty, ty, "{response:?}");
    assert!(chunks[0].is_done(), "{response:?}");
    assert_eq!(chunks[0].extended, mode == ReplyMode::Extended);
}

/// Sends a request, and checks it failed with `error` in the form the mode requires (a simple
/// reply, or one ERROR chunk with DONE).
fn assert_fails(client: &mut RawClient, request: Request, error: u32) {
    let mode = client.negotiated.mode;
    let what = format!("{request:?}");
    let response = client.roundtrip(&request);
    assert_eq!(response.error(), error, "{what} in {mode:?}: {response:?}");
    assert_single_reply(&response, mode, REPLY_TYPE_ERROR, error);
}

/// The connection still answers properly: a READ of known data.
fn assert_in_sync(client: &mut RawClient) {
    client
        .write(SIZE / 2, b"sync")
        .expect("write after the error");
    assert_eq!(client.read(SIZE / 2, 4), Ok(b"sync".to_vec()));
}

#[test]
fn writes_read_back_byte_exact_at_start_middle_and_end() {
    let server = server("64M");
    for (i, mode) in MODES.into_iter().enumerate() {
        let mut client = connect(&server, mode);
        let seed = i as u64 * 100;
        for (offset, len) in [(0, PAGE + 3), (12_345, 77_777), (SIZE - 1000, 1000)] {
            let data = random_bytes(seed + offset, len as usize);
            client.write(offset, &data).expect("write");
            assert_eq!(
                client.read(offset, len).expect("read"),
                data,
                "{mode:?} at {offset}"
            );
        }
        // Reads that straddle the written ranges see exactly the written bytes and zeroes.
        let before = client.read(12_345 - 5, 10).expect("read");
        assert_eq!(&before[..5], &[0; 5]);
        assert_eq!(&before[5..], &random_bytes(seed + 12_345, 5)[..]);
        let last = client.read(SIZE - 1, 1).expect("read last byte");
        assert_eq!(
            last,
            [*random_bytes(seed + SIZE - 1000, 1000).last().unwrap()]
        );
    }
}

#[test]
fn extended_write_payload_is_its_length_with_or_without_payload_len() {
    // qemu >= 8.2 sends extended WRITEs without PAYLOAD_LEN, libnbd >= 1.18 with it; either way
    // `length` bytes of payload follow the header. (This test sends both on one connection, so a
    // server that read the unflagged payload as the next header would drop out of sync.)
    let server = server("64M");
    let mut client = connect(&server, ReplyMode::Extended);
    let plain = random_bytes(7, 64 * KIB as usize);
    let flagged = random_bytes(8, 64 * KIB as usize);
    let fua = random_bytes(9, 4 * KIB as usize);
    for (offset, data, flags) in [
        (0, &plain, 0),
        (MIB, &flagged, CMD_FLAG_PAYLOAD_LEN),
        (2 * MIB, &fua, CMD_FLAG_FUA),
    ] {
        let response = client.roundtrip(&Request::write(offset, data).exact_flags(flags));
        assert_single_reply(&response, ReplyMode::Extended, REPLY_TYPE_NONE, 0);
    }
    assert_eq!(client.read(0, 64 * KIB), Ok(plain));
    assert_eq!(client.read(MIB, 64 * KIB), Ok(flagged));
    assert_eq!(client.read(2 * MIB, 4 * KIB), Ok(fua));
    assert_in_sync(&mut client);
}

#[test]
fn replies_use_the_negotiated_format() {
    let server = server("64M");
    for mode in MODES {
        let mut client = connect(&server, mode);
        let write = client.roundtrip(&Request::write(0, &[7; 100]));
        assert_single_reply(&write, mode, REPLY_TYPE_NONE, 0);
        let flush = client.roundtrip(&Request::flush());
        assert_single_reply(&flush, mode, REPLY_TYPE_NONE, 0);
        let trim = client.roundtrip(&Request::trim(PAGE * 4, PAGE));
        assert_single_reply(&trim, mode, REPLY_TYPE_NONE, 0);

        let read = client.roundtrip(&Request::read(0, 200));
        let mut expected = vec![7; 100];
        expected.resize(200, 0);
        assert_eq!(read.read_data(0, 200), Ok(expected), "{mode:?}");
        if mode == ReplyMode::Simple {
            assert!(read.is_simple());
        } else {
            // Any valid cover is fine, but DONE must be on the last chunk only.
            let chunks = read.chunks();
            let (last, rest) = chunks.split_last().expect("chunks");
            assert!(last.is_done(), "{read:?}");
            assert!(rest.iter().all(|c| !c.is_done()), "{read:?}");
            assert!(
                chunks.iter().all(|c| [
                    REPLY_TYPE_OFFSET_DATA,
                    REPLY_TYPE_OFFSET_HOLE,
                    REPLY_TYPE_NONE
                ]
                .contains(&c.ty)),
                "{read:?}"
            );
        }
        assert_fails(&mut client, Request::read(SIZE, 1), EINVAL);
    }
}

#[test]
fn requests_past_the_end_get_einval_or_enospc() {
    let server = server("64M");
    for mode in MODES {
        let mut client = connect(&server, mode);
        for (offset, len) in [(SIZE - 100, 200), (SIZE, 1), (SIZE + PAGE, PAGE)] {
            assert_fails(&mut client, Request::read(offset, len), EINVAL);
            assert_fails(&mut client, Request::trim(offset, len), EINVAL);
            assert_fails(&mut client, Request::cache(offset, len), EINVAL);
            let data = vec![0x5a; len as usize];
            assert_fails(&mut client, Request::write(offset, &data), ENOSPC);
            assert_fails(&mut client, Request::write_zeroes(offset, len), ENOSPC);
            if mode != ReplyMode::Simple {
                assert_fails(&mut client, Request::block_status(offset, len), EINVAL);
            }
        }
        // The refused write that straddled the end did not leave its payload in the stream.
        assert_in_sync(&mut client);
    }
}

#[test]
fn offset_plus_length_overflow_is_einval() {
    let server = server("64M");
    for mode in MODES {
        let mut client = connect(&server, mode);
        let offset = u64::MAX - 511;
        assert_fails(&mut client, Request::read(offset, 1024), EINVAL);
        assert_fails(&mut client, Request::trim(offset, 1024), EINVAL);
        assert_fails(&mut client, Request::cache(offset, 1024), EINVAL);
        assert_fails(&mut client, Request::write_zeroes(offset, 1024), EINVAL);
        assert_fails(&mut client, Request::write(offset, &[1; 1024]), EINVAL);
        if mode == ReplyMode::Extended {
            // 64-bit lengths overflow even from a small offset.
            assert_fails(&mut client, Request::trim(PAGE, u64::MAX), EINVAL);
            assert_fails(&mut client, Request::write_zeroes(PAGE, u64::MAX), EINVAL);
        }
        assert_in_sync(&mut client);
    }
}

#[test]
fn read_only_exports_refuse_changes_with_eperm() {
    let server = Server::start(&["-e", "ro=1M,ro"]);
    for mode in MODES {
        let negotiate = match mode {
            ReplyMode::Simple => Negotiate::new("ro"),
            ReplyMode::Structured => Negotiate::new("ro").structured(),
            ReplyMode::Extended => Negotiate::new("ro").extended(),
        };
        let mut client = negotiate.go(&server.tcp());
        assert_ne!(client.negotiated.transmission_flags & TFLAG_READ_ONLY, 0);
        assert_fails(&mut client, Request::write(0, &[1; 512]), EPERM);
        assert_fails(&mut client, Request::trim(0, 512), EPERM);
        assert_fails(&mut client, Request::write_zeroes(0, 512), EPERM);
        // Reads still work, and the refused write changed nothing.
        assert_eq!(client.read(0, 512), Ok(vec![0; 512]));
    }
    let server = Server::start(&["-s", "1M", "--read-only"]);
    let mut client = Negotiate::new("").go(&server.unix());
    assert_fails(&mut client, Request::write(0, &[1; 512]), EPERM);
    assert_eq!(client.read(0, 512), Ok(vec![0; 512]));
}

#[test]
fn unknown_commands_are_einval_and_the_connection_keeps_working() {
    let server = server("64M");
    for mode in MODES {
        let mut client = connect(&server, mode);
        // 8 is RESIZE, which is not advertised; the rest were never assigned.
        for ty in [42, CMD_RESIZE, 9, 0xffff] {
            assert_fails(&mut client, Request::new(ty, 0, 512), EINVAL);
        }
        assert_in_sync(&mut client);
    }
}

#[test]
fn unknown_command_flags_are_einval() {
    let server = server("64M");
    for mode in MODES {
        let mut client = connect(&server, mode);
        for flag in [1 << 6, 1 << 9, 1 << 15] {
            assert_fails(&mut client, Request::read(0, 512).flags(flag), EINVAL);
            assert_fails(&mut client, Request::flush().flags(flag), EINVAL);
            assert_fails(&mut client, Request::trim(0, 512).flags(flag), EINVAL);
            // With SEND_CACHE advertised the server MUST reject unknown flags on CACHE.
            assert_fails(&mut client, Request::cache(0, 512).flags(flag), EINVAL);
            assert_fails(
                &mut client,
                Request::write_zeroes(PAGE, 512).flags(flag),
                EINVAL,
            );
            // A refused WRITE must still have its payload consumed, and must not be applied.
            assert_fails(
                &mut client,
                Request::write(PAGE, &[0xee; 512]).flags(flag),
                EINVAL,
            );
        }
        assert_eq!(client.read(PAGE, 512), Ok(vec![0; 512]), "{mode:?}");
        assert_in_sync(&mut client);
    }
}

#[test]
fn flags_meant_for_other_commands_are_einval() {
    // "An unknown flag, or a flag not valid for the command, SHOULD → EINVAL".
    let server = server("64M");
    for mode in [ReplyMode::Structured, ReplyMode::Extended] {
        let mut client = connect(&server, mode);
        assert_fails(
            &mut client,
            Request::write(0, &[1; 512]).flags(CMD_FLAG_DF),
            EINVAL,
        );
        assert_fails(
            &mut client,
            Request::read(0, 512).flags(CMD_FLAG_REQ_ONE),
            EINVAL,
        );
        assert_fails(
            &mut client,
            Request::trim(0, 512).flags(CMD_FLAG_NO_HOLE),
            EINVAL,
        );
        assert_fails(
            &mut client,
            Request::write(0, &[1; 512]).flags(CMD_FLAG_FAST_ZERO),
            EINVAL,
        );
        assert_fails(
            &mut client,
            Request::block_status(0, 512).flags(CMD_FLAG_DF),
            EINVAL,
        );
        // None of the refused writes landed.
        assert_eq!(client.read(0, 512), Ok(vec![0; 512]), "{mode:?}");
        assert_in_sync(&mut client);
    }
}

#[test]
fn reads_and_writes_larger_than_32_mib_stream_through_bounded_buffers() {
    // Clients that connect with EXPORT_NAME never see the advertised 32 MiB maximum, and any
    // length a header can carry is served: the server streams between socket and store in
    // pieces, so it never holds a request's worth of payload. Zeroes are not stored, so with
    // zero payloads the server's RSS shows only what it buffers.
    let server = server("2G");
    let peak_before = server.peak_rss_bytes();
    for mode in MODES {
        let mut client = connect(&server, mode);
        let len = 320 * MIB;
        let zeroes = vec![0u8; len as usize];
        let response = client.roundtrip(&Request::write(GIB, &zeroes));
        assert_eq!(response.error(), 0, "{mode:?}: {response:?}");
        let response = client.roundtrip(&Request::read(GIB, len));
        assert_eq!(response.read_data(GIB, len), Ok(zeroes), "{mode:?}");
        if mode != ReplyMode::Simple {
            // Structured replies carry it in data chunks of at most 32 MiB (the raw client
            // rejects larger ones), the last one marked DONE.
            let chunks = response.chunks();
            assert_eq!(chunks.len(), 10, "{mode:?}: 320 MiB in 32 MiB chunks");
            assert!(chunks[..9].iter().all(|c| !c.is_done()));
            assert!(chunks[9].is_done());
        }
        assert_in_sync(&mut client);
    }
    let growth = server.peak_rss_bytes().saturating_sub(peak_before);
    assert!(
        growth < 48 * MIB,
        "peak RSS grew by {} MiB for 320 MiB requests",
        growth / MIB
    );
}

#[test]
fn a_large_write_is_stored_byte_exact_across_its_pieces() {
    let server = server("256M");
    for (i, mode) in MODES.into_iter().enumerate() {
        let mut client = connect(&server, mode);
        let offset = 12_345 + i as u64 * 70 * MIB;
        let data = random_bytes(40 + i as u64, (48 * MIB + 777) as usize);
        client.write(offset, &data).expect("48 MiB write");
        assert_eq!(client.read(offset, data.len() as u64), Ok(data), "{mode:?}");
        // Neighbours untouched.
        assert_eq!(client.read(offset - 10, 10), Ok(vec![0; 10]));
        assert_eq!(client.read(offset + 48 * MIB + 777, 10), Ok(vec![0; 10]));
    }
}

#[test]
fn a_df_read_larger_than_one_chunk_is_eoverflow() {
    let server = server("128M");
    for mode in [ReplyMode::Structured, ReplyMode::Extended] {
        let mut client = connect(&server, mode);
        assert_fails(
            &mut client,
            Request::read(0, u64::from(MAX_PAYLOAD) + 1).flags(CMD_FLAG_DF),
            EOVERFLOW,
        );
        let data = client
            .read_flags(0, u64::from(MAX_PAYLOAD), CMD_FLAG_DF)
            .expect("a 32 MiB DF read");
        assert_eq!(data.len() as u64, u64::from(MAX_PAYLOAD));
        assert_in_sync(&mut client);
    }
}

#[test]
fn refused_large_writes_skip_their_payload_and_change_nothing() {
    let server = Server::start(&["-e", "ro=64M,ro", "-e", "rw=64M"]);
    let connect_to = |name: &str, mode| {
        let negotiate = Negotiate::new(name);
        match mode {
            ReplyMode::Simple => negotiate,
            ReplyMode::Structured => negotiate.structured(),
            ReplyMode::Extended => negotiate.extended(),
        }
        .go(&server.unix())
    };
    let payload = vec![0xab; 40 * MIB as usize];
    for mode in MODES {
        // Read-only: EPERM, with 40 MiB of payload read past to stay in sync.
        let mut client = connect_to("ro", mode);
        assert_fails(&mut client, Request::write(0, &payload), EPERM);
        assert_eq!(client.read(0, PAGE), Ok(vec![0; PAGE as usize]));
        // Past the end: ENOSPC, nothing written inside the export either.
        let mut client = connect_to("rw", mode);
        assert_fails(&mut client, Request::write(40 * MIB, &payload), ENOSPC);
        assert_eq!(client.read(40 * MIB, PAGE), Ok(vec![0; PAGE as usize]));
        client
            .write(0, b"sync")
            .expect("in sync after the refused payload");
        assert_eq!(client.read(0, 4), Ok(b"sync".to_vec()));
    }
}

#[test]
fn a_client_vanishing_mid_payload_leaves_a_partial_write_within_its_range() {
    // Like a power cut: what arrived may be applied, nothing past the request's range is.
    let server = server("64M");
    let mut client = connect(&server, ReplyMode::Simple);
    client
        .write(8 * MIB, b"after")
        .expect("sentinel after the range");
    let data = random_bytes(5, 3 * MIB as usize);
    let mut header =
        Request::write(4 * MIB, &vec![0; 4 * MIB as usize]).encode_header(HeaderStyle::Compact, 1);
    header.extend_from_slice(&data);
    client.send_raw(&header);
    drop(client); // 3 of the 4 MiB sent, then the connection closes

    let mut client = connect(&server, ReplyMode::Simple);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while client.read(4 * MIB, 3 * MIB) != Ok(data.clone()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the received part never landed"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(client.read(7 * MIB, MIB), Ok(vec![0; MIB as usize]));
    assert_eq!(client.read(8 * MIB, 5), Ok(b"after".to_vec()));
    assert_eq!(
        client.read(4 * MIB - PAGE, PAGE),
        Ok(vec![0; PAGE as usize])
    );
}

#[test]
fn multi_gigabyte_trim_and_write_zeroes_are_accepted() {
    let server = server("8G");
    let marks = [GIB, 3 * GIB + 123, 5 * GIB, 7 * GIB + 4 * KIB];
    for mode in [ReplyMode::Simple, ReplyMode::Extended] {
        let mut client = connect(&server, mode);
        for (i, &mark) in marks.iter().enumerate() {
            client
                .write(mark, &random_bytes(i as u64, 1000))
                .expect("write mark");
        }
        if mode == ReplyMode::Simple {
            // The largest compact lengths: 4 GiB - 4 KiB from 0, and from 4 GiB.
            client.trim(0, 0xffff_f000).expect("4 GiB TRIM");
            client
                .write_zeroes(4 * GIB, 0xffff_f000, 0)
                .expect("4 GiB WRITE_ZEROES");
        } else {
            // Extended headers: one request covers more than 4 GiB.
            client.trim(0, 6 * GIB).expect("6 GiB TRIM");
            client
                .write_zeroes(2 * GIB, 6 * GIB, 0)
                .expect("6 GiB WRITE_ZEROES");
        }
        for &mark in &marks {
            assert_eq!(
                client.read(mark, 1000),
                Ok(vec![0; 1000]),
                "{mode:?} at {mark}"
            );
        }
    }
}

#[test]
fn trimmed_and_zeroed_ranges_read_back_as_zero() {
    let server = server("64M");
    for (i, mode) in MODES.into_iter().enumerate() {
        let mut client = connect(&server, mode);
        let len = 512 * KIB;
        let mut model = random_bytes(i as u64, len as usize);
        client.write(0, &model).expect("write");
        // Unaligned and aligned ranges; every flag WRITE_ZEROES accepts.
        let zeroes: [(u64, u64, Option<u16>); 6] = [
            (1000, 70_000, None),
            (3 * PAGE, 2 * PAGE, None),
            (100_000, 100_003, Some(0)),
            (250_001, 9_999, Some(CMD_FLAG_NO_HOLE)),
            (300 * KIB, 64 * KIB, Some(CMD_FLAG_FAST_ZERO)),
            (400 * KIB + 1, 1, Some(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE)),
        ];
        for (offset, zlen, flags) in zeroes {
            match flags {
                None => client.trim(offset, zlen).expect("trim"),
                Some(flags) => client
                    .write_zeroes(offset, zlen, flags)
                    .unwrap_or_else(|e| panic!("WRITE_ZEROES flags {flags:#x}: {e}")),
            }
            model[offset as usize..(offset + zlen) as usize].fill(0);
        }
        let back = client.read(0, len).expect("read");
        assert!(back == model, "{mode:?}: contents differ from the model");
    }
}

#[test]
fn flush_cache_and_fua_succeed() {
    let server = server("64M");
    for mode in MODES {
        let mut client = connect(&server, mode);
        client
            .write_flags(0, b"durable", CMD_FLAG_FUA)
            .expect("FUA write");
        client.flush().expect("flush");
        client.cache(0, MIB).expect("cache");
        client.cache(SIZE - 1, 1).expect("cache at the end");
        // FUA is valid on every command when SEND_FUA is advertised.
        assert_eq!(
            client.read_flags(0, 7, CMD_FLAG_FUA),
            Ok(b"durable".to_vec())
        );
        assert_eq!(
            client
                .roundtrip(&Request::trim(MIB, PAGE).flags(CMD_FLAG_FUA))
                .result(),
            Ok(())
        );
        assert_eq!(
            client
                .roundtrip(&Request::write_zeroes(MIB, PAGE).flags(CMD_FLAG_FUA))
                .result(),
            Ok(())
        );
    }
}

#[test]
fn zero_length_read_and_write_succeed() {
    let server = server("64M");
    for mode in MODES {
        let mut client = connect(&server, mode);
        assert_eq!(client.read(PAGE, 0), Ok(vec![]), "{mode:?}");
        assert_eq!(client.write(PAGE, &[]), Ok(()), "{mode:?}");
        assert_in_sync(&mut client);
    }
}

/// Queries block status until `[offset, offset+len)` is covered, checks the descriptors'
/// invariants, and returns the flags of every 4 KiB page in the range.
fn page_flags(client: &mut RawClient, offset: u64, len: u64) -> Vec<u64> {
    let end = offset + len;
    let mut pages = Vec::new();
    let mut at = offset;
    while at < end {
        let extents = client
            .block_status(at, end - at, 0)
            .unwrap_or_else(|e| panic!("BLOCK_STATUS at {at}: {e}"));
        for Extent { length, flags } in extents {
            assert_eq!(at % PAGE, 0, "extent boundary {at} is not page aligned");
            assert_eq!(
                length % PAGE,
                0,
                "extent length {length} is not page granular"
            );
            assert_eq!(
                flags & !u64::from(STATE_HOLE | STATE_ZERO),
                0,
                "reserved bits"
            );
            let stop = (at + length).min(end);
            while at < stop {
                pages.push(flags);
                at += PAGE;
            }
            if at >= end {
                break;
            }
        }
    }
    pages
}

#[test]
fn block_status_reports_holes_and_data_per_page() {
    const HOLE_ZERO: u64 = (STATE_HOLE | STATE_ZERO) as u64;
    for mode in [ReplyMode::Structured, ReplyMode::Extended] {
        // A fresh server per mode, so the other mode's writes do not show.
        let server = server("64M");
        let mut client = connect(&server, mode);
        let range = 64 * PAGE;
        assert_eq!(page_flags(&mut client, 0, range), vec![HOLE_ZERO; 64]);

        client
            .write(16 * PAGE, &[1; PAGE as usize])
            .expect("write page 16");
        client
            .write(48 * PAGE + 100, &[2; 10])
            .expect("write into page 48");
        client
            .write(SIZE - 10, &[3; 10])
            .expect("write the last page");
        let mut expected = vec![HOLE_ZERO; 64];
        expected[16] = 0;
        expected[48] = 0;
        assert_eq!(page_flags(&mut client, 0, range), expected, "{mode:?}");
        assert_eq!(
            page_flags(&mut client, SIZE - PAGE, PAGE),
            vec![0],
            "{mode:?}"
        );

        client.trim(16 * PAGE, PAGE).expect("trim page 16");
        expected[16] = HOLE_ZERO;
        assert_eq!(page_flags(&mut client, 0, range), expected, "{mode:?}");

        // The chunk type follows the header style.
        let context = client.negotiated.base_allocation_id().expect("context");
        let response = client.roundtrip(&Request::block_status(0, range));
        let chunks = response.chunks();
        assert_eq!(chunks.len(), 1, "{response:?}");
        assert!(chunks[0].is_done());
        let expected_type = match mode {
            ReplyMode::Extended => REPLY_TYPE_BLOCK_STATUS_EXT,
            _ => REPLY_TYPE_BLOCK_STATUS,
        };
        assert_eq!(chunks[0].ty, expected_type, "{response:?}");
        assert!(!response.extents(context).expect("extents").is_empty());
    }
}

#[test]
fn block_status_req_one_returns_one_extent_within_the_request() {
    let server = server("64M");
    for mode in [ReplyMode::Structured, ReplyMode::Extended] {
        let mut client = connect(&server, mode);
        client
            .write(4 * PAGE, &[9; PAGE as usize])
            .expect("write page 4");
        // (offset, length, expected flags of the first extent)
        for (offset, len, flags) in [
            (0, MIB, STATE_HOLE | STATE_ZERO),
            (0, 100, STATE_HOLE | STATE_ZERO),
            (4 * PAGE, 3 * PAGE, 0),
            (2 * PAGE, 8 * PAGE, STATE_HOLE | STATE_ZERO),
        ] {
            let extents = client
                .block_status(offset, len, CMD_FLAG_REQ_ONE)
                .expect("BLOCK_STATUS REQ_ONE");
            assert_eq!(extents.len(), 1, "REQ_ONE at {offset}+{len}: {extents:?}");
            assert!(
                extents[0].length <= len,
                "REQ_ONE extent longer than requested: {extents:?}"
            );
            assert_eq!(
                extents[0].flags,
                u64::from(flags),
                "at {offset}: {extents:?}"
            );
        }
        // One extent has one status, so the hole before page 4 cannot reach into the data.
        let extents = client
            .block_status(0, MIB, CMD_FLAG_REQ_ONE)
            .expect("REQ_ONE");
        assert!(extents[0].length <= 4 * PAGE, "{extents:?}");
        let extents = client
            .block_status(4 * PAGE, MIB, CMD_FLAG_REQ_ONE)
            .expect("REQ_ONE");
        assert_eq!(
            extents[0].length, PAGE,
            "only page 4 holds data: {extents:?}"
        );
    }
}

#[test]
fn block_status_without_a_context_is_einval() {
    let server = server("64M");
    let mut client = Negotiate::new("").structured().go(&server.unix());
    assert_fails(&mut client, Request::block_status(0, PAGE), EINVAL);
    assert_in_sync(&mut client);
    let mut client = Negotiate::new("").go(&server.unix());
    assert_fails(&mut client, Request::block_status(0, PAGE), EINVAL);
}

#[test]
fn df_read_returns_a_single_data_chunk() {
    let server = server("64M");
    for mode in [ReplyMode::Structured, ReplyMode::Extended] {
        let mut client = connect(&server, mode);
        assert_ne!(client.negotiated.transmission_flags & TFLAG_SEND_DF, 0);
        client.write(8 * KIB, &[0x11; 4096]).expect("write");
        // Mostly never-written pages: without DF a server could send holes; with DF it must not
        // fragment the reply.
        let response = client.roundtrip(&Request::read(0, 64 * KIB).flags(CMD_FLAG_DF));
        let chunks = response.chunks();
        assert_eq!(chunks.len(), 1, "{mode:?}: {response:?}");
        assert!(chunks[0].is_done());
        match chunks[0].body() {
            ChunkBody::OffsetData { offset, data } => {
                assert_eq!(offset, 0);
                assert_eq!(data.len() as u64, 64 * KIB);
                assert!(data[..8192].iter().all(|&b| b == 0));
                assert!(data[8192..12288].iter().all(|&b| b == 0x11));
                assert!(data[12288..].iter().all(|&b| b == 0));
            }
            other => panic!("{mode:?}: DF read answered with {other:?}"),
        }
    }
}

#[test]
fn pipelined_requests_are_matched_by_cookie() {
    let server = server("64M");
    for mode in MODES {
        let mut client = connect(&server, mode);
        let base = 8 * MIB;
        client
            .write(base, &random_bytes(5, MIB as usize))
            .expect("prefill");
        // Extreme and repeated-looking cookies: the server must echo them unchanged.
        let cookies = [
            0u64,
            u64::MAX,
            0x8000_0000_0000_0000,
            1,
            0xdead_beef_0000_0001,
        ];
        let mut requests = Vec::new();
        for (i, &cookie) in cookies.iter().enumerate() {
            let offset = base + i as u64 * 64 * KIB;
            requests.push(Request::read(offset, 64 * KIB).cookie(cookie));
        }
        requests.push(Request::write(base + 2 * MIB, &[0x42; 8192]).cookie(77));
        requests.push(Request::flush().cookie(78));
        requests.push(Request::read(SIZE, 1).cookie(79)); // fails, among successes
        let responses = client.pipeline(&requests);
        let all = random_bytes(5, MIB as usize);
        for (i, response) in responses.iter().take(cookies.len()).enumerate() {
            assert_eq!(response.cookie, cookies[i]);
            let offset = base + i as u64 * 64 * KIB;
            let start = (offset - base) as usize;
            assert_eq!(
                response.read_data(offset, 64 * KIB).expect("read"),
                all[start..start + 64 * KIB as usize],
                "{mode:?} cookie {:#x}",
                cookies[i]
            );
        }
        assert_eq!(responses[cookies.len()].result(), Ok(()));
        assert_eq!(responses[cookies.len() + 1].result(), Ok(()));
        assert_eq!(responses[cookies.len() + 2].error(), EINVAL);
        assert_eq!(client.read(base + 2 * MIB, 8192), Ok(vec![0x42; 8192]));
    }
}

#[test]
fn sigterm_after_traffic_exits_zero_and_closes_connections() {
    let mut server = server("64M");
    let mut client = connect(&server, ReplyMode::Structured);
    client
        .write(0, &random_bytes(1, 64 * KIB as usize))
        .expect("write");
    client.flush().expect("flush");
    let status = server.terminate();
    assert!(
        status.success(),
        "ramnbd exited with {status} after SIGTERM"
    );
    // The idle connection was closed by the server on its way out.
    assert!(client.closed_within(std::time::Duration::from_secs(5)));
}
