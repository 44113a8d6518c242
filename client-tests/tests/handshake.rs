//! The fixed-newstyle handshake, byte for byte, with the raw client.
//!
//! Each test starts its own server; each asserts the server's documented replies and, after an
//! error, that the option stream is still in sync (the next option gets its proper reply).

use std::time::Duration;

use ramnbd_client_tests::client::handshake::{info_payload, meta_context_payload};
use ramnbd_client_tests::proto::*;
use ramnbd_client_tests::{MIB, Negotiate, RawClient, Request, Server};

const DISK: &str = "disk";
const DISK_SIZE: u64 = 16 * MIB;
const DISK_DESCRIPTION: &str = "A RAM disk";
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

fn server() -> Server {
    Server::start(&["-e", &format!("{DISK}=16M,description={DISK_DESCRIPTION}")])
}

/// Connected, greeting read, client flags FIXED_NEWSTYLE|NO_ZEROES sent: ready for options.
fn options_phase(server: &Server) -> RawClient {
    let mut client = RawClient::connect(&server.unix());
    client.read_greeting();
    client.send_client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    client
}

/// Proves the option stream is in sync: a LIST must come back as REP_SERVER(s) and an ACK.
fn assert_in_sync(client: &mut RawClient) {
    let exports = client
        .opt_list()
        .unwrap_or_else(|e| panic!("LIST after the previous option failed: {e:?}"));
    assert!(
        exports.iter().any(|e| e.name == DISK),
        "LIST after the previous option lost the export: {exports:?}"
    );
}

#[test]
fn greeting_is_nbdmagic_ihaveopt_and_flags_3() {
    let server = server();
    for target in [server.tcp(), server.unix()] {
        let mut client = RawClient::connect(&target);
        let greeting = client.read_greeting();
        let mut expected = b"NBDMAGICIHAVEOPT".to_vec();
        expected.extend_from_slice(&[0x00, 0x03]);
        assert_eq!(greeting.raw, expected, "greeting over {target:?}");
        assert_eq!(greeting.flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    }
}

#[test]
fn unknown_client_flag_makes_the_server_close() {
    let server = server();
    for flags in [1 << 2, 1 << 31, FLAG_C_FIXED_NEWSTYLE | 1 << 5] {
        let mut client = RawClient::connect(&server.unix());
        client.read_greeting();
        client.send_client_flags(flags);
        // The server MUST drop the connection; sending an option first shows it does not
        // carry on regardless (no reply may come back). The send itself may fail if the server
        // was quicker, which is fine.
        let mut list = IHAVEOPT.to_be_bytes().to_vec();
        list.extend_from_slice(&OPT_LIST.to_be_bytes());
        list.extend_from_slice(&0u32.to_be_bytes());
        let _ = client.writer.try_send_raw(&list);
        assert_eq!(
            client.expect_closed(CLOSE_TIMEOUT),
            Ok(()),
            "client flags {flags:#x}: the server answered instead of closing"
        );
    }
    // A valid set of flags on a fresh connection still works, so the closes were about the flags.
    let mut client = options_phase(&server);
    assert_in_sync(&mut client);
}

#[test]
fn unknown_options_get_err_unsup_and_the_next_option_works() {
    let server = server();
    let mut client = options_phase(&server);
    // PEEK_EXPORT was withdrawn and must be treated as unknown; 0 and huge numbers were never
    // assigned. Unknown options with data test that the server skips exactly that data.
    for (option, data) in [
        (0x0000_1234, &b""[..]),
        (OPT_PEEK_EXPORT, &b""[..]),
        (0, &b"some data"[..]),
        (0xffff_ffff, &[0xaa; 300][..]),
    ] {
        let reply = client.option_single(option, data);
        assert_eq!(reply.rep, REP_ERR_UNSUP, "option {option:#x}: {reply:?}");
        assert_eq!(reply.option, option);
        assert_in_sync(&mut client);
    }
}

#[test]
fn abort_is_acked_then_the_connection_closes() {
    let server = server();
    let mut client = options_phase(&server);
    let reply = client.opt_abort();
    assert_eq!(reply.rep, REP_ACK, "{reply:?}");
    assert!(reply.data.is_empty(), "ACK carries no data: {reply:?}");
    assert_eq!(client.expect_closed(CLOSE_TIMEOUT), Ok(()));
}

#[test]
fn list_sends_one_rep_server_per_export_then_ack() {
    let server = Server::start(&[
        "-e",
        "first=1M,description=The first disk",
        "-e",
        "second=2M",
        "-e",
        "third=4M,ro,description=Read-only disk",
    ]);
    let mut client = options_phase(&server);
    client.send_option(OPT_LIST, &[]);
    let replies = client.read_option_replies(OPT_LIST);
    let (ack, servers) = replies.split_last().expect("replies");
    assert_eq!(ack.rep, REP_ACK, "{replies:?}");
    assert!(ack.data.is_empty());
    let mut listed: Vec<(Vec<u8>, Vec<u8>)> = servers
        .iter()
        .map(|reply| {
            assert_eq!(reply.rep, REP_SERVER, "{reply:?}");
            let name_len = u32::from_be_bytes(reply.data[..4].try_into().unwrap()) as usize;
            (
                reply.data[4..4 + name_len].to_vec(),
                reply.data[4 + name_len..].to_vec(),
            )
        })
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        [
            (b"first".to_vec(), b"The first disk".to_vec()),
            // No description: the optional text is absent, not padded.
            (b"second".to_vec(), b"".to_vec()),
            (b"third".to_vec(), b"Read-only disk".to_vec()),
        ]
    );
}

#[test]
fn list_with_data_is_invalid_and_stays_in_sync() {
    let server = server();
    let mut client = options_phase(&server);
    let reply = client.option_single(OPT_LIST, b"unexpected");
    assert_eq!(reply.rep, REP_ERR_INVALID, "{reply:?}");
    assert_in_sync(&mut client);
}

#[test]
fn info_and_go_for_an_unknown_export_get_err_unknown() {
    let server = server();
    let mut client = options_phase(&server);
    let err = client.opt_info("nope", &[]).expect_err("INFO nope");
    assert_eq!(err.rep, REP_ERR_UNKNOWN, "{err:?}");
    let err = client.opt_go("nope", &[]).expect_err("GO nope");
    assert_eq!(err.rep, REP_ERR_UNKNOWN, "{err:?}");
    // Still negotiating: a GO to the real export works after the failed one.
    let info = client.opt_go(DISK, &[]).expect("GO disk");
    assert_eq!(info.size, DISK_SIZE);
}

#[test]
fn info_reports_export_name_description_and_block_sizes() {
    let server = server();
    let mut client = options_phase(&server);
    let info = client
        .opt_info(DISK, &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE])
        .expect("INFO");
    assert_eq!(info.size, DISK_SIZE);
    // No structured replies negotiated: no SEND_DF.
    assert_eq!(info.flags, RAMNBD_BASE_FLAGS, "flags {:#06x}", info.flags);
    assert_eq!(info.flags & TFLAG_ROTATIONAL, 0);
    assert_eq!(info.name.as_deref(), Some(DISK));
    assert_eq!(info.description.as_deref(), Some(DISK_DESCRIPTION));
    assert_eq!(
        info.block_size,
        Some((BLOCK_MIN, BLOCK_PREFERRED, MAX_PAYLOAD))
    );
}

#[test]
fn info_without_requests_sends_export_and_block_size_only() {
    let server = server();
    let mut client = options_phase(&server);
    let mut info = client.opt_info(DISK, &[]).expect("INFO");
    info.order.sort_unstable();
    assert_eq!(info.order, [INFO_EXPORT, INFO_BLOCK_SIZE]);
    assert_eq!(info.name, None);
    assert_eq!(info.description, None);
}

#[test]
fn empty_description_is_not_sent_even_when_requested() {
    let server = Server::start(&["-e", "plain=1M"]);
    let mut client = options_phase(&server);
    let info = client
        .opt_info("plain", &[INFO_DESCRIPTION, INFO_NAME])
        .expect("INFO");
    assert_eq!(info.description, None, "{info:?}");
    assert_eq!(info.name.as_deref(), Some("plain"));
}

#[test]
fn info_then_go_return_the_same_information() {
    let server = server();
    let mut client = options_phase(&server);
    let requests = [INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION];
    client.send_option(OPT_INFO, &info_payload(DISK, &requests));
    let info = client.read_option_replies(OPT_INFO);
    client.send_option(OPT_GO, &info_payload(DISK, &requests));
    let go = client.read_option_replies(OPT_GO);
    // Same parameters: the spec says the same information, so compare the replies' bytes.
    let strip = |replies: &[ramnbd_client_tests::client::OptReply]| -> Vec<(u32, Vec<u8>)> {
        replies.iter().map(|r| (r.rep, r.data.clone())).collect()
    };
    assert_eq!(strip(&info), strip(&go));
    // And GO really entered transmission: a READ works.
    assert_eq!(client.read(0, 512), Ok(vec![0; 512]));
}

#[test]
fn malformed_info_payloads_are_invalid() {
    let server = server();
    let mut client = options_phase(&server);
    let mut name_too_long = info_payload(DISK, &[]);
    name_too_long[3] = 200; // name length far beyond the data
    let mut odd_request_count = info_payload(DISK, &[INFO_NAME]);
    odd_request_count.pop(); // one byte short of the announced request
    for (what, data) in [
        ("empty", Vec::new()),
        ("name length past the end", name_too_long),
        ("truncated request list", odd_request_count),
    ] {
        for option in [OPT_INFO, OPT_GO] {
            let reply = client.option_single(option, &data);
            assert_eq!(
                reply.rep, REP_ERR_INVALID,
                "{what} (option {option}): {reply:?}"
            );
        }
        assert_in_sync(&mut client);
    }
}

#[test]
fn export_name_without_no_zeroes_sends_134_bytes() {
    let server = server();
    let mut client = RawClient::connect(&server.tcp());
    client.read_greeting();
    client.send_client_flags(FLAG_C_FIXED_NEWSTYLE);
    let (size, flags, raw) = client.opt_export_name(DISK);
    assert_eq!(raw.len(), 134);
    assert_eq!(size, DISK_SIZE);
    assert_eq!(flags, RAMNBD_BASE_FLAGS, "flags {flags:#06x}");
    assert!(raw[10..].iter().all(|&b| b == 0), "124 zero bytes");
    // The next bytes on the wire must be the reply to our first request, so the reply above
    // was exactly 134 bytes long.
    assert_eq!(client.read(0, 16), Ok(vec![0; 16]));
}

#[test]
fn export_name_with_no_zeroes_sends_10_bytes() {
    let server = server();
    let mut client = options_phase(&server);
    let (size, flags, raw) = client.opt_export_name(DISK);
    assert_eq!(raw.len(), 10);
    assert_eq!(size, DISK_SIZE);
    assert_eq!(flags, RAMNBD_BASE_FLAGS, "flags {flags:#06x}");
    client.write(100, b"hello").expect("write");
    assert_eq!(client.read(98, 9), Ok(b"\0\0hello\0\0".to_vec()));
}

#[test]
fn export_name_for_an_unknown_export_closes_the_connection() {
    let server = server();
    let mut client = options_phase(&server);
    client.send_option(OPT_EXPORT_NAME, b"no-such-export");
    // There is no error reply for EXPORT_NAME: the server MUST close.
    assert_eq!(client.expect_closed(CLOSE_TIMEOUT), Ok(()));
}

#[test]
fn starttls_is_refused_by_policy() {
    let server = server();
    let mut client = options_phase(&server);
    let reply = client.option_single(OPT_STARTTLS, &[]);
    assert_eq!(reply.rep, REP_ERR_POLICY, "{reply:?}");
    assert_in_sync(&mut client);
}

#[test]
fn structured_reply_is_acked_but_not_with_data() {
    let server = server();
    let mut client = options_phase(&server);
    let reply = client.option_single(OPT_STRUCTURED_REPLY, b"x");
    assert_eq!(reply.rep, REP_ERR_INVALID, "{reply:?}");
    let reply = client.opt_structured_reply();
    assert_eq!(reply.rep, REP_ACK, "{reply:?}");
    assert!(reply.data.is_empty());
    // Structured replies negotiated: SEND_DF appears in the flags.
    let info = client.opt_go(DISK, &[]).expect("GO");
    assert_eq!(info.flags, RAMNBD_BASE_FLAGS | TFLAG_SEND_DF);
}

#[test]
fn extended_headers_are_acked_but_not_with_data() {
    let server = server();
    let mut client = options_phase(&server);
    let reply = client.option_single(OPT_EXTENDED_HEADERS, b"x");
    assert_eq!(reply.rep, REP_ERR_INVALID, "{reply:?}");
    let reply = client.opt_extended_headers();
    assert_eq!(reply.rep, REP_ACK, "{reply:?}");
    let info = client.opt_go(DISK, &[]).expect("GO");
    assert_eq!(info.flags, RAMNBD_BASE_FLAGS | TFLAG_SEND_DF);
    // 32-byte requests are understood and replies are extended chunks (checked by the reader).
    client.write(4096, b"extended").expect("write");
    assert_eq!(client.read(4096, 8), Ok(b"extended".to_vec()));
}

#[test]
fn read_only_exports_advertise_read_only() {
    let server = Server::start(&["-e", "ro=1M,ro", "-e", "rw=1M"]);
    for (export, read_only) in [("ro", true), ("rw", false)] {
        for structured in [false, true] {
            let mut client = options_phase(&server);
            if structured {
                assert_eq!(client.opt_structured_reply().rep, REP_ACK);
            }
            let info = client.opt_info(export, &[]).expect("INFO");
            let mut expected = RAMNBD_BASE_FLAGS;
            if read_only {
                expected |= TFLAG_READ_ONLY;
            }
            if structured {
                expected |= TFLAG_SEND_DF;
            }
            assert_eq!(
                info.flags, expected,
                "{export} structured={structured}: {:#06x}",
                info.flags
            );
        }
    }
    // --read-only makes every export read-only.
    let server = Server::start(&["-s", "1M", "--read-only"]);
    let mut client = options_phase(&server);
    let info = client.opt_info("", &[]).expect("INFO");
    assert_eq!(info.flags, RAMNBD_BASE_FLAGS | TFLAG_READ_ONLY);
}

#[test]
fn list_meta_context_offers_base_allocation() {
    let server = server();
    let mut client = options_phase(&server);
    assert_eq!(client.opt_structured_reply().rep, REP_ACK);
    for queries in [&[][..], &["base:"][..], &["base:allocation"][..]] {
        let listed = client
            .opt_list_meta_context(DISK, queries)
            .unwrap_or_else(|e| panic!("LIST_META_CONTEXT {queries:?}: {e:?}"));
        assert!(
            listed.iter().any(|(_, name)| name == BASE_ALLOCATION),
            "{queries:?} listed {listed:?}"
        );
    }
}

#[test]
fn unknown_meta_context_namespaces_and_leaves_are_ignored() {
    let server = server();
    let mut client = options_phase(&server);
    assert_eq!(client.opt_structured_reply().rep, REP_ACK);
    for queries in [&["x-unknown:thing"][..], &["base:no-such-leaf"][..]] {
        let listed = client.opt_list_meta_context(DISK, queries);
        assert_eq!(listed, Ok(vec![]), "LIST {queries:?}");
        let selected = client.opt_set_meta_context(DISK, queries);
        assert_eq!(selected, Ok(vec![]), "SET {queries:?}");
    }
    // Mixed with a known one, only the known one is selected.
    let selected = client
        .opt_set_meta_context(DISK, &["x-unknown:thing", BASE_ALLOCATION])
        .expect("SET");
    assert_eq!(selected.len(), 1, "{selected:?}");
    assert_eq!(selected[0].1, BASE_ALLOCATION);
}

#[test]
fn set_meta_context_needs_structured_replies_first() {
    let server = server();
    let mut client = options_phase(&server);
    let err = client
        .opt_set_meta_context(DISK, &[BASE_ALLOCATION])
        .expect_err("SET_META_CONTEXT before STRUCTURED_REPLY");
    assert_eq!(err.rep, REP_ERR_INVALID, "{err:?}");
    assert_in_sync(&mut client);
}

#[test]
fn set_meta_context_selects_base_allocation_with_an_id() {
    let server = server();
    for extended in [false, true] {
        let mut client = options_phase(&server);
        let reply = if extended {
            client.opt_extended_headers()
        } else {
            client.opt_structured_reply()
        };
        assert_eq!(reply.rep, REP_ACK);
        let selected = client
            .opt_set_meta_context(DISK, &[BASE_ALLOCATION])
            .expect("SET_META_CONTEXT");
        assert_eq!(selected.len(), 1, "{selected:?}");
        let (id, name) = &selected[0];
        assert_eq!(name, BASE_ALLOCATION);
        assert_ne!(*id, 0, "a selected context needs a nonzero id");
        // The id is usable: BLOCK_STATUS answers for that context.
        client.opt_go(DISK, &[]).expect("GO");
        let extents = client.block_status(0, 4096, 0).expect("BLOCK_STATUS");
        assert!(!extents.is_empty());
    }
}

#[test]
fn malformed_meta_context_payload_is_invalid() {
    let server = server();
    let mut client = options_phase(&server);
    assert_eq!(client.opt_structured_reply().rep, REP_ACK);
    let mut truncated = meta_context_payload(DISK, &[BASE_ALLOCATION]);
    truncated.truncate(truncated.len() - 3); // the query is shorter than its length says
    for option in [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT] {
        let reply = client.option_single(option, &truncated);
        assert_eq!(reply.rep, REP_ERR_INVALID, "option {option}: {reply:?}");
        assert_in_sync(&mut client);
    }
}

#[test]
fn oversized_option_gets_err_too_big_and_stays_in_sync() {
    let server = server();
    let mut client = options_phase(&server);
    // 1 MiB of option data: far past the 64 KiB the server accepts.
    let reply = client.option_single(OPT_INFO, &vec![0x55; MIB as usize]);
    assert_eq!(reply.rep, REP_ERR_TOO_BIG, "{reply:?}");
    assert_in_sync(&mut client);
    let info = client
        .opt_go(DISK, &[])
        .expect("GO after the oversized option");
    assert_eq!(info.size, DISK_SIZE);
}

#[test]
fn huge_option_is_discarded_without_being_buffered() {
    const HUGE: u32 = 256 * MIB as u32;
    let server = server();
    let peak_before = server.peak_rss_bytes();
    let mut client = options_phase(&server);
    client.send_option_header(OPT_SET_META_CONTEXT, HUGE);
    let block = vec![0u8; MIB as usize];
    for _ in 0..HUGE / MIB as u32 {
        client.send_raw(&block);
    }
    let reply = client.read_option_reply();
    assert_eq!(reply.option, OPT_SET_META_CONTEXT);
    assert_eq!(reply.rep, REP_ERR_TOO_BIG, "{reply:?}");
    assert_in_sync(&mut client);
    let growth = server.peak_rss_bytes().saturating_sub(peak_before);
    assert!(
        growth < 32 * MIB,
        "a {HUGE}-byte option raised the server's peak RSS by {growth} bytes"
    );
}

#[test]
fn a_fresh_connection_after_many_aborted_ones_still_works() {
    // Connections that vanish mid-handshake must not wedge the server.
    let server = server();
    for _ in 0..20 {
        let mut client = RawClient::connect(&server.unix());
        client.read_greeting();
    }
    let mut client = Negotiate::new(DISK).go(&server.tcp());
    assert_eq!(
        client.roundtrip(&Request::flush()).result(),
        Ok(()),
        "FLUSH on a fresh connection"
    );
}

/// BLOCK_STATUS on a fresh connection after the given meta-context negotiation; returns the
/// error value (0 on success).
fn block_status_after(
    server: &Server,
    set_for: &str,
    go_to: &str,
    negotiate: impl FnOnce(&mut RawClient),
) -> u32 {
    let mut client = options_phase(server);
    assert_eq!(client.opt_structured_reply().rep, REP_ACK);
    let selected = client
        .opt_set_meta_context(set_for, &[BASE_ALLOCATION])
        .expect("SET base:allocation");
    let id = selected[0].0;
    negotiate(&mut client);
    client.opt_go(go_to, &[]).expect("GO");
    // Use the id from the first SET even if a later one dropped it: the server must refuse.
    client.negotiated.contexts = vec![(id, BASE_ALLOCATION.to_owned())];
    client.roundtrip(&Request::block_status(0, 4096)).error()
}

#[test]
fn meta_contexts_are_replaced_by_each_set_and_bound_to_their_export() {
    let server = Server::start(&["-e", "a=1M", "-e", "b=1M"]);
    assert_eq!(block_status_after(&server, "a", "a", |_| {}), 0);
    // Contexts selected for export a are not valid on export b.
    assert_eq!(block_status_after(&server, "a", "b", |_| {}), EINVAL);
    // A SET with zero queries selects nothing, replacing the earlier selection.
    let empty = |c: &mut RawClient| {
        assert_eq!(c.opt_set_meta_context("a", &[]), Ok(vec![]));
    };
    assert_eq!(block_status_after(&server, "a", "a", empty), EINVAL);
    // "SET_META_CONTEXT replaces all earlier contexts, even when it fails."
    let failing = |c: &mut RawClient| {
        let reply = c.option_single(OPT_SET_META_CONTEXT, &[0, 0, 0, 9]);
        assert_eq!(reply.rep, REP_ERR_INVALID, "{reply:?}");
    };
    assert_eq!(block_status_after(&server, "a", "a", failing), EINVAL);
}
