//! `decode_request` on arbitrary bytes, in both header modes, against the fuzz crate's own
//! reading of the header layout (`wire::request`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use ramnbd::proto::transmission::{Decoded, Request, decode_request};
use ramnbd_fuzz::wire::{self, Header};

fuzz_target!(|data: &[u8]| {
    check(data, false);
    check(data, true);
});

fn check(data: &[u8], extended: bool) {
    let decoded = decode_request(data, extended);
    match wire::request(data, extended) {
        Header::Short => assert_eq!(decoded, Decoded::Incomplete, "{} bytes", data.len()),
        Header::BadMagic => {
            let magic = u32::from_be_bytes(data[..4].try_into().unwrap());
            assert_eq!(decoded, Decoded::BadMagic(magic));
        }
        Header::Request(req) => {
            // WRITE always carries its length as payload; anything else only under extended
            // headers with PAYLOAD_LEN (the reference's rule).
            let request = Request {
                flags: req.flags,
                command: req.command,
                cookie: req.cookie,
                offset: req.offset,
                length: req.length,
                payload_len: req.payload_len,
            };
            assert_eq!(
                decoded,
                Decoded::Request {
                    request,
                    header_len: req.header_len
                }
            );
            // Only the header is looked at: what follows it changes nothing.
            assert_eq!(decode_request(&data[..req.header_len], extended), decoded);
        }
    }
}
