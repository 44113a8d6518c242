//! The committed session seeds through the harness, without libFuzzer: a quick check (on
//! stable) that the harness and the server agree on every hand-made case, and that the
//! harness really follows sessions (a harness that saw nothing would pass everything).

use std::path::Path;

use ramnbd::proto::consts::*;
use ramnbd_fuzz::session::{Summary, run};

fn seed(name: &str) -> Summary {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus/session")
        .join(name);
    run(&std::fs::read(&path).unwrap())
}

#[test]
fn every_session_seed_passes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/session");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).expect("the session corpus") {
        let path = entry.unwrap().path();
        let summary = run(&std::fs::read(&path).unwrap());
        eprintln!("{}: {summary:?}", path.display());
        count += 1;
    }
    assert!(count > 0, "no seeds in {}", dir.display());
}

#[test]
fn the_harness_follows_each_phase() {
    let go = seed("go-simple");
    assert_eq!(go.options, [REP_ACK]);
    assert_eq!(go.export.as_deref(), Some("disk"));
    assert_eq!(
        go.replies, [0; 8],
        "eight requests before DISC, all succeed"
    );

    let extended = seed("go-extended");
    assert_eq!(extended.options, [REP_ACK, REP_ACK, REP_ACK]);
    // BLOCK_STATUS with a payload (EINVAL) and the 1 TiB WRITE_ZEROES (ENOSPC) are refused.
    assert_eq!(extended.replies, [0, 0, 0, 22, 0, 0, 0, 28, 0]);

    let read_only = seed("go-read-only");
    assert_eq!(read_only.export.as_deref(), Some("small"));
    assert_eq!(read_only.replies, [1, 1, 0, 22]);

    let capped = seed("go-capped");
    assert_eq!(
        capped.replies,
        [28, 0, 28, 0, 0, 0],
        "over the cap, then within it"
    );

    let options = seed("options");
    assert_eq!(
        options.options,
        [
            REP_ERR_POLICY,
            REP_ERR_UNSUP,
            REP_ERR_INVALID,
            REP_ERR_UNKNOWN,
            REP_ERR_INVALID,
            REP_ERR_INVALID,
            REP_ERR_INVALID,
            REP_ACK,
            REP_ERR_INVALID,
            REP_ACK,
            REP_ACK,
            REP_ACK,
            REP_ACK,
        ]
    );
    assert_eq!(options.export, None);

    let stopping = seed("go-simple-stopping");
    assert!(stopping.replies.contains(&108), "{stopping:?}");

    let bad_magic = seed("go-bad-magic");
    assert!(bad_magic.replies.len() <= 2, "{bad_magic:?}");
}

#[test]
fn fill_records_stream_requests_of_megabytes() {
    let streamed = seed("fills-streamed-write");
    assert_eq!(
        streamed.replies,
        [0, 0, 0],
        "the write, the read back, block status"
    );
    assert_eq!(seed("fills-skipped-write").replies, [28, 0]);
    assert_eq!(seed("fills-capped-streamed-write").replies, [28, 0]);
    assert_eq!(seed("fills-whole-writes").replies, [0, 0, 0, 0]);
}

#[test]
fn fill_records_expand() {
    use ramnbd_fuzz::session::{MAX_EXPANDED, expand, fill, literal};
    let records = [literal(b"abc"), fill(5, b'x'), literal(&[7; 200])].concat();
    let mut want = b"abcxxxxx".to_vec();
    want.extend_from_slice(&[7; 200]);
    assert_eq!(expand(&records), want);
    assert_eq!(expand(&fill(1 << 24, 1)).len(), MAX_EXPANDED);
    // A record cut short ends the stream.
    assert_eq!(expand(&[0x80, 0]), b"");
    assert_eq!(expand(&[5, b'a']), b"a");
}

#[test]
fn every_negotiation_tls_seed_passes_and_require_refuses_everything() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/negotiation_tls");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).expect("the negotiation_tls corpus") {
        let path = entry.unwrap().path();
        let summary = ramnbd_fuzz::tls::run(&std::fs::read(&path).unwrap());
        eprintln!("{}: {summary:?}", path.display());
        count += 1;
    }
    assert!(count > 0, "no seeds in {}", dir.display());
    // The harness sees the replies it checks: six refusals, then STARTTLS's ACK.
    let path = dir.join("require-options-then-starttls");
    let summary = ramnbd_fuzz::tls::run(&std::fs::read(path).unwrap());
    let reqd = REP_ERR_TLS_REQD;
    assert_eq!(
        summary.replies,
        [reqd, reqd, reqd, reqd, REP_ERR_INVALID, reqd, REP_ACK]
    );
}
