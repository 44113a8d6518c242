//! `Suspended::decode` (the state a hand-over passes to the next process) on arbitrary bytes:
//! it must never panic, what it accepts must re-encode to exactly the bytes given (the layout
//! has one encoding per state), and checking it against a server's exports must not panic
//! either.

#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use ramnbd::config::ExportConfig;
use ramnbd::export::Exports;
use ramnbd::session::Suspended;

fn exports() -> &'static Arc<Exports> {
    static EXPORTS: OnceLock<Arc<Exports>> = OnceLock::new();
    EXPORTS.get_or_init(|| {
        let config = ExportConfig {
            name: "disk".to_owned(),
            size: 1 << 20,
            read_only: false,
            description: String::new(),
            max_memory: None,
            ..Default::default()
        };
        Arc::new(Exports::new(&[config]).expect("a 1 MiB export"))
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(state) = Suspended::decode(data) else {
        return;
    };
    assert_eq!(state.encode(), data, "does not re-encode to its bytes");
    if let Ok(negotiated) = state.negotiated(exports()) {
        assert_eq!(negotiated.export.name, state.export);
        assert_eq!(negotiated.export.size(), state.export_size);
        assert_eq!(negotiated.extended, state.extended);
    }
});
