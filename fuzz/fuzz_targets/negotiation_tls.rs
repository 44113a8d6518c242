//! The option phase under `tls = on` and `tls = require` before STARTTLS: see
//! `ramnbd_fuzz::tls` for the input's layout and what is checked.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ramnbd_fuzz::tls::run(data);
});
