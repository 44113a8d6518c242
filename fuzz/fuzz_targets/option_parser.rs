//! The option payload parsers (`parse_info_request`, `parse_meta_context_request`) on arbitrary
//! bytes: they must never panic, must agree with an independent reference parser on what is
//! valid, and what they accept must re-encode to exactly the bytes given.

#![no_main]

use libfuzzer_sys::fuzz_target;
use ramnbd::proto::consts::MAX_STRING;
use ramnbd::proto::handshake::{parse_info_request, parse_meta_context_request};
use ramnbd_fuzz::wire;

fuzz_target!(|data: &[u8]| {
    let info = parse_info_request(data).ok();
    let reference = wire::parse_info(data);
    assert_eq!(
        info.as_ref()
            .map(|r| (r.export.clone(), r.requested.clone())),
        reference,
        "INFO parsers disagree"
    );
    if let Some(request) = info {
        check_string(&request.export);
        assert_eq!(
            wire::info_request(request.export.as_bytes(), &request.requested),
            data,
            "INFO does not re-encode to its bytes"
        );
    }

    let meta = parse_meta_context_request(data).ok();
    let reference = wire::parse_meta_context(data);
    assert_eq!(
        meta.as_ref().map(|r| (r.export.clone(), r.queries.clone())),
        reference,
        "META_CONTEXT parsers disagree"
    );
    if let Some(request) = meta {
        check_string(&request.export);
        request.queries.iter().for_each(|q| check_string(q));
        let queries: Vec<&[u8]> = request.queries.iter().map(|q| q.as_bytes()).collect();
        assert_eq!(
            wire::meta_context_request(request.export.as_bytes(), &queries),
            data,
            "META_CONTEXT does not re-encode to its bytes"
        );
    }
});

/// The spec's string rules (UTF-8 is the `String`'s own guarantee).
fn check_string(s: &str) {
    assert!(s.len() <= MAX_STRING, "a {}-byte string", s.len());
    assert!(!s.contains('\0'), "a string with NUL");
}
