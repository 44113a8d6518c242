//! Runs session inputs through the harness without libFuzzer, printing what each did and how
//! long it took: `cargo run --release --example replay -- FILE...` (a reproducer, or a whole
//! corpus folder's files).

use std::time::Instant;

fn main() {
    for path in std::env::args().skip(1) {
        let data = std::fs::read(&path).expect("read the input");
        let start = Instant::now();
        let summary = ramnbd_fuzz::session::run(&data);
        println!("{path}: {:?}: {summary:?}", start.elapsed());
    }
}
