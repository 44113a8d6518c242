//! libnbd's tools (nbdinfo, nbdcopy) and its Python binding against ramnbd.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::Path;
use std::process::Command;

use ramnbd_client_tests::tools::run;
use ramnbd_client_tests::{GIB, KIB, MIB, Negotiate, Server, random_bytes, require_tool, run_ok};
use serde_json::Value;

fn nbdinfo() -> std::path::PathBuf {
    require_tool("nbdinfo", "libnbd-bin")
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

#[test]
fn nbdinfo_json_shows_the_advertised_features() {
    let server = Server::start::<&str>(&[]);
    // No export name in the URI: libnbd asks for the default export "".
    let uri = format!("nbd://{}", server.tcp_addr());
    let info = json(&run_ok(nbdinfo(), &["--json", &uri]));
    assert_eq!(info["protocol"], "newstyle-fixed", "{info:#}");
    assert_eq!(info["TLS"], false);
    assert_eq!(info["structured"], true, "structured replies negotiated");
    let exports = info["exports"].as_array().expect("exports array");
    assert_eq!(exports.len(), 1, "{info:#}");
    let export = &exports[0];
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

#[test]
fn nbdinfo_list_shows_every_export_with_its_description() {
    let server = Server::start(&[
        "-e",
        "alpha=1M,description=First export",
        "-e",
        "beta=2M,ro,description=Second export",
        "-e",
        "gamma=3M",
    ]);
    let listing = json(&run_ok(
        nbdinfo(),
        &["--list", "--json", &server.unix_uri("")],
    ));
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

/// Writes `len` bytes of reproducible random data to `path`.
fn write_random_file(path: &Path, seed: u64, len: u64) {
    let mut file = BufWriter::new(File::create(path).expect("create image"));
    let block = 4 * MIB;
    for i in 0..len / block {
        file.write_all(&random_bytes(seed + i, block as usize))
            .expect("write image");
    }
    file.flush().expect("flush image");
}

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

#[test]
fn nbdcopy_round_trips_a_random_256_mib_image() {
    let nbdcopy = require_tool("nbdcopy", "libnbd-bin");
    let server = Server::start(&["-s", "256M"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("in.img");
    let out = dir.path().join("out.img");
    write_random_file(&image, 0x256, 256 * MIB);

    let image_arg = image.to_str().expect("utf-8 path");
    let out_arg = out.to_str().expect("utf-8 path");
    // In over TCP, back out over the Unix socket: both listeners carry the same export.
    run_ok(&nbdcopy, &[image_arg, &server.tcp_uri("")]);
    run_ok(&nbdcopy, &[&server.unix_uri(""), out_arg]);
    assert_same_file(&image, &out);
}

/// (offset, length, type) from `nbdinfo --map --json`, with adjacent equal types merged (the
/// server may split a run into several extents).
fn map(uri: &str) -> Vec<(u64, u64, u64)> {
    let entries = json(&run_ok(nbdinfo(), &["--map", "--json", uri]));
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

#[test]
fn nbdinfo_map_shows_data_holes_and_trimmed_ranges() {
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
        map(&server.tcp_uri("")),
        [
            (0, 512 * KIB, HOLE_ZERO),
            (512 * KIB, 512 * KIB, DATA),
            (MIB, 3 * MIB, HOLE_ZERO),
            (4 * MIB, MIB, DATA),
            (5 * MIB, 11 * MIB, HOLE_ZERO),
        ]
    );
}

const MULTI_CONN_SCRIPT: &str = r#"
import sys
import nbd

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

#[test]
fn python_libnbd_multi_conn_write_flush_read() {
    let python = require_tool("/usr/bin/python3", "python3");
    let probe = Command::new(&python)
        .args(["-c", "import nbd"])
        .output()
        .expect("run /usr/bin/python3");
    assert!(
        probe.status.success(),
        "the nbd Python module is missing: install Debian package python3-libnbd\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let server = Server::start(&["-s", "64M"]);
    let output = run(&python, &["-c", MULTI_CONN_SCRIPT, &server.unix_uri("")]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("multi-conn OK"),
        "python3-libnbd script failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}
