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

/// Python helpers shared by the scripts below, and a time limit. `extended(h)` says whether the
/// connection uses extended headers; libnbd 1.14 predates them and has no call to ask. `sent(h)`
/// counts the requests (and options) libnbd put on the wire: libnbd 1.16 added the counter, so
/// it is None with 1.14.
const PRELUDE: &str = r#"
import signal
import sys
import nbd

# A server that stops answering fails the test instead of hanging it.
signal.alarm(120)

GiB = 1 << 30
PAGE = 4096
HOLE_ZERO = nbd.STATE_HOLE | nbd.STATE_ZERO

def extended(h):
    return hasattr(h, "get_extended_headers_negotiated") and h.get_extended_headers_negotiated()

def sent(h):
    return h.stats_chunks_sent() if hasattr(h, "stats_chunks_sent") else None
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

/// argv: URI, "1" if the client must negotiate extended headers. The export is 8 GiB.
const ONE_REQUEST_SCRIPT: &str = r#"
uri, expect_extended = sys.argv[1], sys.argv[2] == "1"
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(uri)
size = h.get_size()
assert size == 8 * GiB, size
assert extended(h) == expect_extended, "extended headers negotiated: %s" % extended(h)

if expect_extended:
    # 5 GiB in one request: more than a compact header's 32-bit length can carry.
    start, length = GiB, 5 * GiB
else:
    # With compact headers libnbd refuses a 5 GiB request rather than splitting it...
    try:
        h.trim(5 * GiB, GiB)
        raise AssertionError("a 5 GiB TRIM went out with compact headers")
    except nbd.Error as e:
        assert e.errno == "ERANGE", e
    # ... and the largest page-aligned request it can send is 4 GiB - 4 KiB.
    start, length = GiB, 4 * GiB - PAGE
end = start + length
# Pages just outside the range, and its first, middle and last page.
outside = {start - PAGE: b"<" * PAGE, end: b">" * PAGE}
inside = {offset: bytes([i + 1]) * PAGE
          for i, offset in enumerate([start, start + length // 2 // PAGE * PAGE, end - PAGE])}

def merge(runs):
    out = []
    for offset, length, flags in runs:
        if out and out[-1][2] == flags and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + length, flags)
        else:
            out.append((offset, length, flags))
    return out

def expected(data_pages):
    runs, at = [], 0
    for offset in sorted(data_pages):
        runs += [(at, offset - at, HOLE_ZERO), (offset, PAGE, 0)]
        at = offset + PAGE
    return merge([r for r in runs + [(at, size - at, HOLE_ZERO)] if r[1] > 0])

def extents():
    found = []
    def collect(context, offset, entries, error):
        assert context == "base:allocation", context
        # block_status_64 passes (length, flags) pairs, block_status a flat list.
        if entries and not isinstance(entries[0], tuple):
            entries = list(zip(entries[0::2], entries[1::2]))
        for length, flags in entries:
            found.append((offset, length, flags))
            offset += length
        return 0
    if expect_extended:
        # One request over the whole 8 GiB, answered in full.
        before = sent(h)
        h.block_status_64(size, 0, collect)
        assert sent(h) == before + 1
    else:
        offset = 0
        while offset < size:
            h.block_status(min(size - offset, 4 * GiB - PAGE), offset, collect)
            offset = found[-1][0] + found[-1][1]
    assert found[-1][0] + found[-1][1] == size, found
    return merge(found)

def fill():
    for offset, data in list(outside.items()) + list(inside.items()):
        h.pwrite(data, offset)
    for offset, data in list(outside.items()) + list(inside.items()):
        assert h.pread(PAGE, offset) == data, offset
    assert extents() == expected(list(outside) + list(inside)), extents()

def check_range_is_a_hole(what):
    for offset in inside:
        assert h.pread(PAGE, offset) == bytes(PAGE), (what, offset)
    # The edges, byte-exact: the page before and after the range survive.
    assert h.pread(2 * PAGE, start - PAGE) == b"<" * PAGE + bytes(PAGE), what
    assert h.pread(2 * PAGE, end - PAGE) == bytes(PAGE) + b">" * PAGE, what
    got = extents()
    assert got == expected(outside), (what, got)

def one_request(call):
    before = sent(h)
    call()
    if before is not None:
        assert sent(h) == before + 1, "libnbd split the request"

fill()
one_request(lambda: h.trim(length, start))
check_range_is_a_hole("trim")
fill()
# WRITE_ZEROES without NO_HOLE: ramnbd punches a hole, as for TRIM.
one_request(lambda: h.zero(length, start))
check_range_is_a_hole("write zeroes")
h.shutdown()
print("one request OK")
"#;

/// One TRIM, one WRITE_ZEROES and one BLOCK_STATUS as large as the client can send, on an 8 GiB
/// export: with extended headers (libnbd 1.22) 5 GiB each, and the block status covers the whole
/// export; with compact headers (libnbd 1.14) a 5 GiB request is refused by libnbd and 4 GiB - 4
/// KiB is the most. Either way the pages next to the range survive, the range reads back as
/// zeroes, and block status shows it as a hole.
fn one_request_trims_and_zeroes_gigabytes(clients: Clients) {
    // Thin: an 8 GiB export holds only the few pages the script writes.
    let server = Server::start(&["-s", "8G"]);
    let extended = if clients == Clients::Debian13 {
        "1"
    } else {
        "0"
    };
    let script = format!("{PRELUDE}{ONE_REQUEST_SCRIPT}");
    clients.python_ok(&script, &[&server.unix_uri(""), extended], "one request OK");
}
both_generations!(one_request_trims_and_zeroes_gigabytes);

/// argv: URI of a 64 MiB writable export, URI of a read-only export. Each bad request is sent
/// twice: with strict mode on, libnbd refuses it without sending anything; with strict mode off
/// it goes to the server, which must answer with the NBD error the spec (doc/proto.md, "Error
/// values") names, and the connection must stay usable. ramnbd advertises a minimum block size
/// of 1, so no request is misaligned.
const STRICT_SCRIPT: &str = r#"
uri, ro_uri = sys.argv[1], sys.argv[2]

def connect(uri, **settings):
    h = nbd.NBD()
    if settings.get("contexts", True):
        h.add_meta_context("base:allocation")
    if not settings.get("structured", True):
        h.set_request_structured_replies(False)
    h.connect_uri(uri)
    return h

h = connect(uri)
size = h.get_size()
last = b"L" * PAGE
h.pwrite(last, size - PAGE)
no_context = connect(uri, contexts=False)
# Without structured replies the server must not advertise DF (the spec ties it to them).
simple = connect(uri, structured=False)
assert h.can_df() and not simple.can_df(), "DF with and without structured replies"
ro = connect(ro_uri)
assert ro.is_read_only(), "the read-only export is not read-only"

straddle = size - PAGE // 2
cases = [
    # (what, handle, call, the server's error)
    ("read past the end", h, lambda: h.pread(PAGE, straddle), "EINVAL"),
    ("write past the end", h, lambda: h.pwrite(b"x" * PAGE, straddle), "ENOSPC"),
    ("trim past the end", h, lambda: h.trim(PAGE, straddle), "EINVAL"),
    ("write zeroes past the end", h, lambda: h.zero(PAGE, straddle), "ENOSPC"),
    ("cache past the end", h, lambda: h.cache(PAGE, straddle), "EINVAL"),
    ("block status past the end", h,
     lambda: h.block_status(PAGE, straddle, lambda *a: 0), "EINVAL"),
    ("block status without a context", no_context,
     lambda: no_context.block_status(PAGE, 0, lambda *a: 0), "EINVAL"),
    ("NO_HOLE on a read", h, lambda: h.pread(PAGE, 0, nbd.CMD_FLAG_NO_HOLE), "EINVAL"),
    ("DF on a write", h, lambda: h.pwrite(b"x" * PAGE, 0, nbd.CMD_FLAG_DF), "EINVAL"),
    ("REQ_ONE on a trim", h, lambda: h.trim(PAGE, 0, nbd.CMD_FLAG_REQ_ONE), "EINVAL"),
    ("undefined flag 0x80", h, lambda: h.pread(PAGE, 0, 0x80), "EINVAL"),
    ("DF not advertised", simple, lambda: simple.pread(PAGE, 0, nbd.CMD_FLAG_DF), "EINVAL"),
    ("write on a read-only export", ro, lambda: ro.pwrite(b"x" * PAGE, 0), "EPERM"),
    ("trim on a read-only export", ro, lambda: ro.trim(PAGE, 0), "EPERM"),
    ("write zeroes on a read-only export", ro, lambda: ro.zero(PAGE, 0), "EPERM"),
]

def usable(handle, what):
    # Any bad request leaves the connection in sync: a normal read still works.
    expected = last if handle is not ro else bytes(PAGE)
    offset = size - PAGE if handle is not ro else 0
    assert handle.pread(PAGE, offset) == expected, what

for strict in (True, False):
    for what, handle, call, errno in cases:
        handle.set_strict_mode(handle.get_strict_mode() if strict else 0)
        before = sent(handle)
        try:
            call()
            raise AssertionError("%s succeeded (strict %s)" % (what, strict))
        except nbd.Error as e:
            # libnbd words a server's error reply as "CMD: command failed: ...".
            from_server = "command failed" in e.string
            if strict:
                assert not from_server and sent(handle) == before, (what, e.string)
            else:
                assert from_server and e.errno == errno, (what, e.string, e.errno)
                assert before is None or sent(handle) == before + 1, what
        usable(handle, what)
    for handle in (h, no_context, simple, ro):
        handle.set_strict_mode(nbd.STRICT_MASK)

# The refused requests changed nothing, not even their in-range part.
assert h.pread(PAGE, size - PAGE) == last

# A zero-length request is refused by strict libnbd; the spec leaves its meaning open (the server
# SHOULD NOT disconnect), and ramnbd answers it with success.
h.set_strict_mode(0)
assert h.pread(0, 0) == b""
h.pwrite(b"", 0)
h.trim(0, 0)
# Strict mode off also drops libnbd 1.22's PAYLOAD_LEN flag from writes: an extended WRITE
# without it, as qemu sends them, carries its data all the same.
h.pwrite(b"q" * PAGE, 8 * PAGE)
assert h.pread(PAGE, 8 * PAGE) == b"q" * PAGE
usable(h, "after zero-length requests")
print("strict mode OK")
"#;

/// Requests a strict libnbd refuses to send (out of bounds, a flag the command does not take or
/// the server did not advertise, a write to a read-only export) are refused client-side with
/// strict mode on; with it off the server answers each with the right NBD error and the
/// connection stays usable.
fn libnbd_strict_mode_on_and_off(clients: Clients) {
    let server = Server::start(&["-e", "=64M", "-e", "ro=1M,ro"]);
    let script = format!("{PRELUDE}{STRICT_SCRIPT}");
    clients.python_ok(
        &script,
        &[&server.unix_uri(""), &server.tcp_uri("ro")],
        "strict mode OK",
    );
}
both_generations!(libnbd_strict_mode_on_and_off);
