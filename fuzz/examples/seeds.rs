//! Writes the seed corpus: `cargo run --example seeds` in `fuzz/` (re)creates the hand-made
//! files under `corpus/<target>/`. Crash reproducers that were added by hand (`crash-*`) are
//! left alone.

use std::path::Path;

use ramnbd::proto::consts::*;
use ramnbd_fuzz::session::{delivery, fill, input, literal, neg};
use ramnbd_fuzz::wire::{compact, extended, info_request, meta_context_request, option, string};

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, seeds) in [
        ("request_decoder", request_decoder()),
        ("option_parser", option_parser()),
        ("session", session()),
        ("negotiation_tls", negotiation_tls()),
    ] {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        for (name, bytes) in seeds {
            std::fs::write(dir.join(name), bytes)?;
        }
    }
    Ok(())
}

type Seeds = Vec<(&'static str, Vec<u8>)>;

/// The option phase before STARTTLS: byte 0 is the mode (bit 0: on, else require) and
/// whether the client flags are prefixed (bit 1); see `ramnbd_fuzz::tls`.
fn negotiation_tls() -> Seeds {
    use ramnbd_fuzz::tls::{FLAGS_PREFIX, MODE_ON, SECRET};
    let secret = SECRET.as_bytes();
    let probe = [
        option(OPT_LIST, &[]),
        option(OPT_INFO, &info_request(secret, &[INFO_NAME])),
        option(OPT_GO, &info_request(b"open", &[])),
        option(OPT_STRUCTURED_REPLY, &[]),
        option(OPT_STARTTLS, b"data"),
        option(
            OPT_SET_META_CONTEXT,
            &meta_context_request(secret, &[b"base:allocation"]),
        ),
    ]
    .concat();
    let with = |mode: u8, tail: &[u8]| [&[mode | FLAGS_PREFIX][..], &probe, tail].concat();
    vec![
        (
            "require-options-then-starttls",
            with(0, &option(OPT_STARTTLS, &[])),
        ),
        (
            "require-export-name",
            with(0, &option(OPT_EXPORT_NAME, b"open")),
        ),
        ("require-abort", with(0, &option(OPT_ABORT, &[]))),
        (
            "on-options-then-export-name-secret",
            with(MODE_ON, &option(OPT_EXPORT_NAME, secret)),
        ),
        (
            "on-go-secret",
            with(MODE_ON, &option(OPT_GO, &info_request(secret, &[]))),
        ),
        ("on-starttls", with(MODE_ON, &option(OPT_STARTTLS, &[]))),
    ]
}

fn request_decoder() -> Seeds {
    let mut long = compact(CMD_READ, 0, 1, 0, 512);
    long.extend_from_slice(&[0xaa; 40]);
    vec![
        ("compact-read", compact(CMD_READ, 0, 1, 4096, 512)),
        (
            "compact-write",
            compact(CMD_WRITE, CMD_FLAG_FUA, 2, 0, 4096),
        ),
        ("compact-disc", compact(CMD_DISC, 0, 3, 0, 0)),
        ("compact-then-more", long),
        ("extended-write", extended(CMD_WRITE, 0, 4, 0, 1 << 20)),
        (
            "extended-write-payload-len",
            extended(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 5, 0, 4096),
        ),
        (
            "extended-block-status-payload",
            extended(CMD_BLOCK_STATUS, CMD_FLAG_PAYLOAD_LEN, 6, 0, 8),
        ),
        (
            "extended-zeroes-huge",
            extended(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 7, 0, 1 << 40),
        ),
        ("short", compact(CMD_READ, 0, 1, 0, 1)[..27].to_vec()),
        ("bad-magic", vec![0x12; 32]),
    ]
}

fn option_parser() -> Seeds {
    let mut long_name = string(&[b'a'; 4096]);
    long_name.extend_from_slice(&0u16.to_be_bytes());
    let mut too_long = string(&[b'a'; 4097]);
    too_long.extend_from_slice(&0u16.to_be_bytes());
    let mut nul = string(b"a\0b");
    nul.extend_from_slice(&0u16.to_be_bytes());
    let mut trailing = info_request(b"disk", &[]);
    trailing.push(0);
    let mut many = string(b"");
    many.extend_from_slice(&u32::MAX.to_be_bytes());
    vec![
        (
            "info-go",
            info_request(b"disk", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]),
        ),
        ("info-empty-name", info_request(b"", &[])),
        ("info-4096-name", long_name),
        ("info-4097-name", too_long),
        ("info-nul", nul),
        ("info-trailing", trailing),
        ("info-utf8", info_request("dïsk".as_bytes(), &[INFO_EXPORT])),
        (
            "meta-base-allocation",
            meta_context_request(b"disk", &[BASE_ALLOCATION.as_bytes()]),
        ),
        (
            "meta-two",
            meta_context_request(b"disk", &[b"base:", b"qemu:dirty-bitmap:x"]),
        ),
        ("meta-none", meta_context_request(b"disk", &[])),
        ("meta-count-too-big", many),
        (
            "not-utf8",
            [&3u32.to_be_bytes()[..], &[0xff, 0xfe, 0xfd, 0, 0]].concat(),
        ),
    ]
}

/// A GO's or an EXPORT_NAME's export of the `disk` export in each framing, and raw requests.
fn session() -> Seeds {
    let go = neg::GO;
    let structured = neg::GO | neg::STRUCTURED | neg::META;
    let ext = neg::GO | neg::EXTENDED | neg::META;
    let stop_half = 8; // stopping after 7/14 of the bytes
    let pieces_29 = 2 << delivery::PIECE_SHIFT;
    let pieces_1 = 1 << delivery::PIECE_SHIFT;
    let cat = |parts: &[Vec<u8>]| parts.concat();
    let page = |byte: u8| vec![byte; 4096];
    let disc = compact(CMD_DISC, 0, 99, 0, 0);
    let xdisc = extended(CMD_DISC, 0, 99, 0, 0);
    let raw_handshake = cat(&[
        (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
            .to_be_bytes()
            .to_vec(),
        option(OPT_LIST, &[]),
        option(OPT_INFO, &info_request(b"small", &[INFO_NAME])),
        option(OPT_STRUCTURED_REPLY, &[]),
        option(OPT_GO, &info_request(b"disk", &[INFO_BLOCK_SIZE])),
        compact(CMD_WRITE, 0, 1, 100, 3),
        b"abc".to_vec(),
        compact(CMD_READ, 0, 2, 0, 200),
        disc.clone(),
    ]);
    let options = cat(&[
        option(OPT_STARTTLS, &[]),
        option(0x4242, b"x"),
        option(OPT_LIST, b"junk"),
        option(OPT_INFO, &info_request(b"missing", &[])),
        option(OPT_INFO, b"\0\0"),
        option(
            OPT_SET_META_CONTEXT,
            &meta_context_request(b"disk", &[b"base:allocation"]),
        ),
        option(OPT_STRUCTURED_REPLY, b"data"),
        option(OPT_EXTENDED_HEADERS, &[]),
        option(OPT_STRUCTURED_REPLY, &[]),
        option(
            OPT_LIST_META_CONTEXT,
            &meta_context_request(b"disk", &[b"base:"]),
        ),
        option(OPT_LIST_META_CONTEXT, &meta_context_request(b"capped", &[])),
        option(
            OPT_SET_META_CONTEXT,
            &meta_context_request(b"small", &[b"base:allocation"]),
        ),
        option(OPT_ABORT, &[]),
    ]);
    // An option too large to read: the header, then less data than it says.
    let oversized = cat(&[
        option(OPT_LIST, &[]),
        IHAVEOPT.to_be_bytes().to_vec(),
        OPT_INFO.to_be_bytes().to_vec(),
        70_000u32.to_be_bytes().to_vec(),
        vec![0; 100],
    ]);
    let oversized_name = cat(&[
        IHAVEOPT.to_be_bytes().to_vec(),
        OPT_EXPORT_NAME.to_be_bytes().to_vec(),
        u32::MAX.to_be_bytes().to_vec(),
    ]);
    let simple_commands = cat(&[
        compact(CMD_WRITE, 0, 1, 0, 4096),
        page(1),
        compact(CMD_WRITE, CMD_FLAG_FUA, 2, 8192 - 10, 20),
        vec![2; 20],
        compact(CMD_READ, 0, 3, 0, 8192 + 100),
        compact(CMD_FLUSH, 0, 4, 0, 0),
        compact(CMD_TRIM, 0, 5, 100, 5000),
        compact(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 6, 0, 50),
        compact(CMD_CACHE, 0, 7, 0, 4096),
        compact(CMD_READ, 0, 8, 0, 4096 * 3),
        disc.clone(),
    ]);
    let bad_requests = cat(&[
        compact(CMD_READ, 0, 1, (2 << 20) + 1, 512),
        compact(CMD_READ, 0, 2, 0, u32::MAX),
        compact(CMD_READ, CMD_FLAG_DF, 3, 0, 1),
        compact(99, 0, 4, 0, 0),
        compact(CMD_BLOCK_STATUS, 0, 5, 0, 4096),
        compact(CMD_WRITE, 0, 6, (2 << 20) + 100, 500),
        vec![9; 500],
        compact(CMD_READ, 0, 7, u64::MAX - 10, 100),
        disc.clone(),
    ]);
    let structured_commands = cat(&[
        compact(CMD_WRITE, 0, 1, 4096, 4096),
        page(7),
        compact(CMD_BLOCK_STATUS, 0, 2, 0, 3 * 4096 + 17),
        compact(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 3, 4096, 1 << 20),
        compact(CMD_READ, CMD_FLAG_DF, 4, 4000, 200),
        compact(CMD_READ, 0, 5, 0, 0),
        compact(CMD_WRITE_ZEROES, 0, 6, 0, 1 << 20),
        compact(CMD_BLOCK_STATUS, 0, 7, 0, 0),
        disc.clone(),
    ]);
    let extended_commands = cat(&[
        extended(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 1, 0, 4096),
        page(3),
        extended(CMD_WRITE, 0, 2, 1 << 20, 100),
        vec![4; 100],
        extended(CMD_BLOCK_STATUS, 0, 3, 0, 2 << 20),
        extended(CMD_BLOCK_STATUS, CMD_FLAG_PAYLOAD_LEN, 4, 0, 8),
        vec![0; 8],
        extended(CMD_READ, CMD_FLAG_DF, 5, 0, 8192),
        extended(
            CMD_WRITE_ZEROES,
            CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            6,
            0,
            1 << 20,
        ),
        extended(CMD_TRIM, CMD_FLAG_FUA, 7, 0, (2 << 20) + 512),
        extended(CMD_WRITE_ZEROES, 0, 8, 0, 1 << 40),
        extended(CMD_READ, 0, 9, 4000, 200),
        xdisc.clone(),
    ]);
    // A streamed write (more than a whole-payload write) whose payload stops short, and one
    // refused (past the end) that must be skipped.
    let streamed = cat(&[
        extended(CMD_WRITE, 0, 1, 0, (1 << 20) + 4096),
        vec![5; 3000],
    ]);
    let skipped = cat(&[compact(CMD_WRITE, 0, 1, 1 << 20, 2 << 20), vec![6; 3000]]);
    // The capped export holds 16 pages at most: zeroes that stay allocated fill it without a
    // payload.
    let capped = cat(&[
        compact(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 1, 0, 4096 * 20),
        compact(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 2, 0, 4096 * 15),
        // Straddles two pages: 17 with the 15 held.
        compact(CMD_WRITE, 0, 3, (64 << 10) - 2048, 4096),
        vec![1; 4096],
        compact(CMD_TRIM, 0, 4, 0, 4096 * 15),
        compact(CMD_WRITE, 0, 5, (64 << 10) - 2048, 4096),
        vec![1; 4096],
        compact(CMD_READ, 0, 6, (64 << 10) - 100, 300),
        disc.clone(),
    ]);
    let read_only = cat(&[
        compact(CMD_WRITE, 0, 1, 0, 10),
        vec![1; 10],
        compact(CMD_TRIM, 0, 2, 0, 10),
        compact(CMD_READ, 0, 3, 64 << 10, 1),
        compact(CMD_READ, 0, 4, 64 << 10, 2),
        disc.clone(),
    ]);
    let bad_magic = cat(&[
        compact(CMD_READ, 0, 1, 0, 1 << 20),
        compact(CMD_WRITE, 0, 2, 0, 3),
        b"xyz".to_vec(),
        vec![0xee; 28],
        compact(CMD_READ, 0, 3, 0, 4),
    ]);
    let newstyle = cat(&[
        0u32.to_be_bytes().to_vec(),
        option(OPT_EXPORT_NAME, b"disk"),
        compact(CMD_READ, 0, 1, 0, 16),
    ]);
    let many_reads: Vec<u8> = (0..40u64)
        .flat_map(|i| compact(CMD_READ, 0, i, i * 4096, 4096))
        .collect();
    // Fill records (delivery::FILLS) make requests of megabytes from a few bytes: a streamed
    // write that completes and is read back, a refused one skipped whole, a streamed write
    // over the cap, and whole-payload writes that fill the receive buffer.
    let fills = delivery::FILLS;
    let streamed_whole = cat(&[
        literal(&extended(CMD_WRITE, 0, 1, 512, (3 << 19) + 3)),
        fill((3 << 19) + 3, 0x5a),
        literal(&extended(CMD_READ, 0, 2, 0, (2 << 20) + 512)),
        literal(&extended(CMD_BLOCK_STATUS, 0, 3, 0, (2 << 20) + 512)),
        literal(&xdisc),
    ]);
    let skipped_whole = cat(&[
        literal(&compact(CMD_WRITE, 0, 1, 1 << 20, 2 << 20)),
        fill(2 << 20, 1),
        literal(&compact(CMD_READ, 0, 2, 1 << 20, 4096)),
        literal(&disc),
    ]);
    let capped_streamed = cat(&[
        literal(&compact(CMD_WRITE, 0, 1, 0, (1 << 20) + 1)),
        fill((1 << 20) + 1, 1),
        literal(&compact(CMD_READ, 0, 2, 0, 100)),
    ]);
    let back_to_back: Vec<u8> = (0..3u64)
        .flat_map(|i| {
            let len = (1 << 20) - 4096 * i;
            cat(&[
                literal(&compact(CMD_WRITE, 0, i, 4096 * i, len as u32)),
                fill(len as usize, i as u8 + 1),
            ])
        })
        .chain(literal(&compact(CMD_READ, 0, 9, 0, 2 << 20)))
        .collect();
    vec![
        ("fills-streamed-write", input(ext, fills, &streamed_whole)),
        (
            "fills-streamed-write-pieces",
            input(ext, fills | pieces_29, &streamed_whole),
        ),
        ("fills-skipped-write", input(go, fills, &skipped_whole)),
        (
            "fills-capped-streamed-write",
            input(go | neg::CAPPED, fills, &capped_streamed),
        ),
        (
            "fills-whole-writes",
            input(go, fills | delivery::METRICS, &back_to_back),
        ),
        (
            "fills-stopping",
            input(ext, fills | stop_half, &streamed_whole),
        ),
        ("raw-handshake", input(neg::RAW, 0, &raw_handshake)),
        (
            "raw-handshake-bytewise",
            input(neg::RAW, pieces_1, &raw_handshake),
        ),
        ("raw-newstyle-export-name", input(neg::RAW, 0, &newstyle)),
        ("raw-unknown-flags", input(neg::RAW, 0, &[0, 0, 0, 4])),
        ("options", input(neg::FLAGS_ONLY, 0, &options)),
        (
            "options-stopping",
            input(neg::FLAGS_ONLY, stop_half, &options),
        ),
        ("option-oversized", input(neg::FLAGS_ONLY, 0, &oversized)),
        (
            "option-oversized-name",
            input(neg::FLAGS_ONLY, 0, &oversized_name),
        ),
        ("go-simple", input(go, 0, &simple_commands)),
        (
            "go-simple-pieces",
            input(go, pieces_29 | delivery::METRICS, &simple_commands),
        ),
        ("go-simple-bad-requests", input(go, 0, &bad_requests)),
        ("go-simple-stopping", input(go, stop_half, &many_reads)),
        ("go-simple-stop-at-once", input(go, 1, &simple_commands)),
        ("go-structured", input(structured, 0, &structured_commands)),
        (
            "go-structured-bad-requests",
            input(structured, 0, &bad_requests),
        ),
        (
            "go-extended",
            input(ext, delivery::METRICS, &extended_commands),
        ),
        (
            "go-extended-stopping",
            input(ext, stop_half, &extended_commands),
        ),
        ("go-extended-streamed-write", input(ext, 0, &streamed)),
        (
            "go-extended-streamed-write-closing",
            input(ext, 15, &streamed),
        ),
        ("go-simple-skipped-write", input(go, 0, &skipped)),
        ("go-capped", input(go | neg::CAPPED, 0, &capped)),
        ("go-read-only", input(go | neg::SMALL, 0, &read_only)),
        (
            "go-missing-then-options",
            input(go | neg::UNKNOWN_EXPORT, 0, &options),
        ),
        ("go-bad-magic", input(go, 0, &bad_magic)),
        (
            "export-name-padded",
            input(neg::EXPORT_NAME | neg::ZEROES, 0, &simple_commands),
        ),
        (
            "export-name-structured",
            input(
                neg::EXPORT_NAME | neg::STRUCTURED | neg::META,
                0,
                &structured_commands,
            ),
        ),
        (
            "export-name-after-extended",
            input(neg::EXPORT_NAME | neg::EXTENDED, 0, &[]),
        ),
        (
            "export-name-missing",
            input(neg::EXPORT_NAME | neg::UNKNOWN_EXPORT, 0, &[]),
        ),
    ]
}
