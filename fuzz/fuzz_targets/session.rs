//! A whole connection, handshake and transmission, over an in-memory stream: see
//! `ramnbd_fuzz::session` for the input's layout and what is checked.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ramnbd_fuzz::session::run(data);
});
