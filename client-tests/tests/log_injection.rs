//! Log injection: export names a client sends reach the server's log escaped. A name with a
//! newline must not write a forged line of its own, escape sequences must not reach the
//! operator's terminal, invalid UTF-8 must show as the bytes sent.
//!
//! Each attempt asks for an unknown export, carrying a marker unique to it, over EXPORT_NAME
//! (the server closes), GO and INFO (`NBD_REP_ERR_UNKNOWN`, or `NBD_REP_ERR_INVALID` for a NUL
//! or invalid UTF-8, which NBD strings may not hold) and LIST_META_CONTEXT (logged at debug
//! level). Then the captured stderr must hold exactly one line per marker, with the escape.

use std::time::Duration;

use ramnbd_client_tests::proto::*;
use ramnbd_client_tests::{RawClient, Server};

const TIMEOUT: Duration = Duration::from_secs(10);

/// Names to try (after the marker), and the escaped form each must show in the log.
const NAMES: &[(&[u8], &str)] = &[
    (b"\nERROR ramnbd: forged", r"\nERROR ramnbd: forged"),
    (
        b"\r\nERROR ramnbd: forged too",
        r"\r\nERROR ramnbd: forged too",
    ),
    (b"nul\0byte", r"nul\0byte"),
    (b"\x1b[31mred\x1b[0m", r"\x1b[31mred\x1b[0m"),
    (b"\xff\xfe", r"\xff\xfe"),
    ("rtl\u{202e}txt.exe".as_bytes(), r"rtl\u{202e}txt.exe"),
    (b"quote\" op=\"GO", r#"quote\" op=\"GO"#),
];

/// An NBD string: 32-bit length, then the bytes.
fn nbd_string(bytes: &[u8]) -> Vec<u8> {
    let mut data = (bytes.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(bytes);
    data
}

/// Sends `name` in one option on a fresh connection; returns once the server has acted on it
/// (closed, or replied), so its log line is written or queued.
fn attempt(server: &Server, option: u32, name: &[u8]) {
    let mut client = RawClient::connect(&server.unix());
    client.read_greeting();
    client.send_client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    match option {
        OPT_EXPORT_NAME => {
            client.send_option(OPT_EXPORT_NAME, name);
            assert_eq!(
                client.expect_closed(TIMEOUT),
                Ok(()),
                "EXPORT_NAME {name:?}"
            );
        }
        OPT_GO | OPT_INFO => {
            let mut data = nbd_string(name);
            data.extend_from_slice(&0u16.to_be_bytes());
            let reply = client.option_single(option, &data);
            assert!(
                [REP_ERR_UNKNOWN, REP_ERR_INVALID].contains(&reply.rep),
                "{option} {name:?}: {reply:?}"
            );
        }
        OPT_LIST_META_CONTEXT => {
            let mut data = nbd_string(name);
            data.extend_from_slice(&0u32.to_be_bytes());
            let reply = client.option_single(option, &data);
            assert!(
                [REP_ERR_UNKNOWN, REP_ERR_INVALID].contains(&reply.rep),
                "LIST_META_CONTEXT {name:?}: {reply:?}"
            );
        }
        _ => unreachable!("option {option}"),
    }
}

#[test]
fn client_chosen_names_are_logged_escaped_one_line_each() {
    let server = Server::start(&["--log-level", "debug", "-e", "disk=1M"]);
    let options = [
        (OPT_EXPORT_NAME, "export_name"),
        (OPT_GO, "go"),
        (OPT_INFO, "info"),
        (OPT_LIST_META_CONTEXT, "list_meta"),
    ];
    let mut expected = Vec::new();
    for (option, label) in options {
        for (i, (name, escaped)) in NAMES.iter().enumerate() {
            let marker = format!("inj-{label}-{i}-");
            let mut sent = marker.clone().into_bytes();
            sent.extend_from_slice(name);
            attempt(&server, option, &sent);
            expected.push((marker, *escaped));
        }
    }
    // A name near the longest NBD allows is cut, with its length: it cannot flood a line.
    let mut long = b"inj-long-".to_vec();
    long.resize(4000, b'\n');
    attempt(&server, OPT_GO, &long);
    // The log is written in order by one thread: once a later line is there, all are.
    attempt(&server, OPT_EXPORT_NAME, b"inj-end");
    server.wait_for_stderr("inj-end", TIMEOUT);
    let log = server.stderr_text();

    for (marker, escaped) in &expected {
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(marker)).collect();
        assert_eq!(lines.len(), 1, "{marker}: {lines:#?}\n{log}");
        let want = format!("\"{marker}{escaped}\"");
        assert!(
            lines[0].contains(&want),
            "{marker}: want {want} in {lines:#?}"
        );
        // The level and target come before the first quote; the name's text only after it.
        let head = lines[0].split('"').next().unwrap_or_default();
        assert!(
            head.contains("INFO ") || head.contains("DEBUG "),
            "{marker}: not logged at INFO or DEBUG: {}",
            lines[0]
        );
    }
    // Every line is one the server began, never a forged `ERROR ramnbd: …` of a client's
    // making: the forged text only inside the marked lines, and each line with a timestamp
    // first (`2026-12-02T01:02:03.…Z`; under systemd, JOURNAL_STREAM, the server leaves it out).
    let stamps = std::env::var_os("JOURNAL_STREAM").is_none();
    for line in log.lines() {
        assert!(!line.starts_with("ERROR"), "{line}");
        if line.contains("forged") {
            assert!(
                line.contains("inj-"),
                "forged text outside a marked line: {line}"
            );
        }
        let bytes = line.as_bytes();
        let stamped = bytes.len() > 20
            && bytes[..4].iter().all(u8::is_ascii_digit)
            && bytes[4] == b'-'
            && bytes[10] == b'T';
        assert!(
            stamped || !stamps,
            "a line the server did not begin: {line:?}\n{log}"
        );
    }
    let long_line = log
        .lines()
        .find(|l| l.contains("inj-long-"))
        .expect("the long name's line");
    assert!(
        long_line.len() < 1500,
        "{} bytes: {long_line}",
        long_line.len()
    );
    assert!(
        long_line.contains(r#"\n\n"... (4000 bytes)"#),
        "{long_line}"
    );
    for (bad, what) in [
        ('\x1b', "ESC"),
        ('\0', "NUL"),
        ('\r', "CR"),
        ('\u{fffd}', "invalid UTF-8 (read back as U+FFFD)"),
        ('\u{202e}', "RIGHT-TO-LEFT OVERRIDE"),
    ] {
        assert!(!log.contains(bad), "raw {what} in the log:\n{log}");
    }
    let sample = log
        .lines()
        .find(|l| l.contains("inj-export_name-0-"))
        .expect("checked above");
    eprintln!("the newline name, as logged:\n{sample}");
    if std::env::var_os("SHOW_LOG").is_some() {
        eprintln!("{log}");
    }
}
