//! libnbd's tools (nbdinfo, nbdcopy) and its Python binding against ramnbd, each test with
//! Debian 12's libnbd 1.14 (compact headers only) and Debian 13's libnbd 1.22 (extended headers).

use std::fs::{self, File};
use std::io::Read;
use std::path::Path;

use ramnbd_client_tests::tools::write_random_file;
use ramnbd_client_tests::{
    Clients, GIB, KIB, MIB, Negotiate, Server, both_generations, random_bytes,
};
use serde_json::Value;

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

fn nbdinfo_json_shows_the_advertised_features(clients: Clients) {
    let server = Server::start::<&str>(&[]);
    // No export name in the URI: libnbd asks for the default export "".
    let uri = format!("nbd://{}", server.tcp_addr());
    let info = json(&clients.run_ok("nbdinfo", &["--json", &uri]));
    assert_eq!(info["protocol"], "newstyle-fixed", "{info:#}");
    assert_eq!(info["TLS"], false);
    assert_eq!(info["structured"], true, "structured replies negotiated");
    let exports = info["exports"].as_array().expect("exports array");
    assert_eq!(exports.len(), 1, "{info:#}");
    let export = &exports[0];
    match clients {
        // libnbd 1.14 predates extended headers: it neither asks for them nor prints the keys.
        Clients::Debian12 => {
            assert_eq!(info.get("extended"), None, "{info:#}");
            assert_eq!(export.get("can_block_status_payload"), None, "{info:#}");
        }
        Clients::Debian13 => {
            assert_eq!(
                info["extended"], true,
                "extended headers negotiated: {info:#}"
            );
            // The optional filtered form of BLOCK_STATUS, which ramnbd does not offer.
            assert_eq!(export["can_block_status_payload"], false, "{info:#}");
        }
    }
    assert_eq!(export["export-name"], "");
    assert_eq!(export["export-size"], GIB, "the default export is 1 GiB");
    let contexts = export["contexts"].as_array().expect("contexts");
    assert!(
        contexts.iter().any(|c| c == "base:allocation"),
        "{contexts:?}"
    );
    for feature in [
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_fua",
        "can_flush",
        "can_cache",
        "can_multi_conn",
        "can_df",
    ] {
        assert_eq!(export[feature], true, "{feature}: {export:#}");
    }
    assert_eq!(export["is_rotational"], false);
    assert_eq!(export["is_read_only"], false);
    assert_eq!(export["block_size_minimum"], 1);
    assert_eq!(export["block_size_preferred"], 4096);
    assert_eq!(export["block_size_maximum"], 33_554_432);
}
both_generations!(nbdinfo_json_shows_the_advertised_features);

fn nbdinfo_list_shows_every_export_with_its_description(clients: Clients) {
    let server = Server::start(&[
        "-e",
        "alpha=1M,description=First export",
        "-e",
        "beta=2M,ro,description=Second export",
        "-e",
        "gamma=3M",
    ]);
    let listing = json(&clients.run_ok("nbdinfo", &["--list", "--json", &server.unix_uri("")]));
    let exports = listing["exports"].as_array().expect("exports array");
    let mut seen: Vec<(String, Option<String>, u64, bool)> = exports
        .iter()
        .map(|e| {
            (
                e["export-name"].as_str().expect("name").to_owned(),
                e["description"].as_str().map(str::to_owned),
                e["export-size"].as_u64().expect("size"),
                e["is_read_only"].as_bool().expect("read-only flag"),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("alpha".into(), Some("First export".into()), MIB, false),
            ("beta".into(), Some("Second export".into()), 2 * MIB, true),
            ("gamma".into(), None, 3 * MIB, false),
        ],
        "{listing:#}"
    );
}
both_generations!(nbdinfo_list_shows_every_export_with_its_description);

/// Compares two files in blocks, reporting the first differing offset.
fn assert_same_file(a: &Path, b: &Path) {
    let len = fs::metadata(a).expect("stat").len();
    assert_eq!(fs::metadata(b).expect("stat").len(), len, "sizes differ");
    let (mut fa, mut fb) = (File::open(a).expect("open"), File::open(b).expect("open"));
    let mut ba = vec![0u8; MIB as usize];
    let mut bb = vec![0u8; MIB as usize];
    let mut offset = 0u64;
    while offset < len {
        let n = ba.len().min((len - offset) as usize);
        fa.read_exact(&mut ba[..n]).expect("read");
        fb.read_exact(&mut bb[..n]).expect("read");
        if ba[..n] != bb[..n] {
            let at = (0..n).find(|&i| ba[i] != bb[i]).expect("a difference");
            panic!("files differ at byte {}", offset + at as u64);
        }
        offset += n as u64;
    }
}

fn nbdcopy_round_trips_a_random_256_mib_image(clients: Clients) {
    let server = Server::start(&["-s", "256M"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("in.img");
    let out = dir.path().join("out.img");
    write_random_file(&image, 0x256, 256 * MIB);

    let image_arg = image.to_str().expect("utf-8 path");
    let out_arg = out.to_str().expect("utf-8 path");
    // In over TCP, back out over the Unix socket: both listeners carry the same export.
    clients.run_ok("nbdcopy", &[image_arg, &server.tcp_uri("")]);
    clients.run_ok("nbdcopy", &[&server.unix_uri(""), out_arg]);
    assert_same_file(&image, &out);
    clients.assert_headers(&server);
}
both_generations!(nbdcopy_round_trips_a_random_256_mib_image);

/// (offset, length, type) from `nbdinfo --map --json`, with adjacent equal types merged (the
/// server may split a run into several extents).
fn map(clients: Clients, uri: &str) -> Vec<(u64, u64, u64)> {
    let entries = json(&clients.run_ok("nbdinfo", &["--map", "--json", uri]));
    let mut merged: Vec<(u64, u64, u64)> = Vec::new();
    for entry in entries.as_array().expect("map array") {
        let offset = entry["offset"].as_u64().expect("offset");
        let length = entry["length"].as_u64().expect("length");
        let ty = entry["type"].as_u64().expect("type");
        match merged.last_mut() {
            Some(last) if last.2 == ty && last.0 + last.1 == offset => last.1 += length,
            _ => merged.push((offset, length, ty)),
        }
    }
    merged
}

fn nbdinfo_map_shows_data_holes_and_trimmed_ranges(clients: Clients) {
    const DATA: u64 = 0;
    const HOLE_ZERO: u64 = 3;
    let server = Server::start(&["-s", "16M"]);
    let mut client = Negotiate::new("").go(&server.unix());
    client
        .write(0, &random_bytes(1, MIB as usize))
        .expect("write 1 MiB at 0");
    client
        .write(4 * MIB, &random_bytes(2, MIB as usize))
        .expect("write 1 MiB at 4 MiB");
    client.trim(0, 512 * KIB).expect("trim the first half MiB");
    client.flush().expect("flush");

    assert_eq!(
        map(clients, &server.tcp_uri("")),
        [
            (0, 512 * KIB, HOLE_ZERO),
            (512 * KIB, 512 * KIB, DATA),
            (MIB, 3 * MIB, HOLE_ZERO),
            (4 * MIB, MIB, DATA),
            (5 * MIB, 11 * MIB, HOLE_ZERO),
        ]
    );
    clients.assert_headers(&server);
}
both_generations!(nbdinfo_map_shows_data_holes_and_trimmed_ranges);

/// What every Python script starts with: libnbd's module, and a time limit.
const PRELUDE: &str = r#"
import signal
import sys
import nbd

# A server that stops answering fails the test instead of hanging it.
signal.alarm(120)
"#;

const MULTI_CONN_SCRIPT: &str = r#"
uri = sys.argv[1]
handles = []
for _ in range(3):
    h = nbd.NBD()
    h.connect_uri(uri)
    handles.append(h)
h1, h2, h3 = handles
for h in handles:
    assert h.can_multi_conn(), "CAN_MULTI_CONN not advertised"
    assert h.get_structured_replies_negotiated()

data = bytes((i * 7 + 3) % 251 for i in range(256 * 1024))
h1.pwrite(data, 1048576)
h1.flush()
# Multi-conn: after the flush on h1 every connection sees the write.
assert h2.pread(len(data), 1048576) == data, "h2 does not see h1's write"
assert h3.pread(len(data), 1048576) == data, "h3 does not see h1's write"

# Pipelined asynchronous writes on h2, then a FUA write on h3, read back on h1.
cookies = [h2.aio_pwrite(bytes([i + 1]) * 4096, 4 * 1048576 + i * 4096) for i in range(32)]
while h2.aio_in_flight() > 0:
    h2.poll(-1)
assert all(h2.aio_command_completed(c) for c in cookies)
h2.flush()
for i in range(32):
    assert h1.pread(4096, 4 * 1048576 + i * 4096) == bytes([i + 1]) * 4096, i
h3.pwrite(b"fua!" * 1024, 8 * 1048576, nbd.CMD_FLAG_FUA)
assert h1.pread(4096, 8 * 1048576) == b"fua!" * 1024

# A trim on one connection reads back as zeroes on another.
h3.trim(65536, 1048576 + 65536)
h3.flush()
assert h2.pread(65536, 1048576 + 65536) == bytes(65536)

for h in handles:
    h.shutdown()
print("multi-conn OK")
"#;

fn python_libnbd_multi_conn_write_flush_read(clients: Clients) {
    let server = Server::start(&["-s", "64M"]);
    let script = format!("{PRELUDE}{MULTI_CONN_SCRIPT}");
    clients.python_ok(&script, &[&server.unix_uri("")], "multi-conn OK");
    clients.assert_headers(&server);
}
both_generations!(python_libnbd_multi_conn_write_flush_read);
