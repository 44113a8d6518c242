//! libnbd through a hand-over: an in-process server suspends a connection with 128 requests
//! in flight, a second in-process server adopts its socket and state, and the client, which
//! sees only a pause, gets every reply and the data it wrote. (The binary's own hand-over is
//! driven under systemd by the systemd VM tests; this is the library-level proof with a real
//! client, for both generations of libnbd: Debian 13's negotiates extended headers.)

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use ramnbd::config::{ExportConfig, ListenAddr};
use ramnbd::export::Exports;
use ramnbd::metrics::Metrics;
use ramnbd::server::{self, ServeOptions};
use ramnbd::shutdown::{Phase, Shutdown};
use ramnbd_client_tests::clients::PYTHON;
use ramnbd_client_tests::{Clients, MIB, both_generations};

/// argv: the socket. A WRITE and a READ awaited, then 64 WRITEs of 4 KiB to 128 KiB and 64 READs of the same ranges
/// without waiting, says so, waits for a line on stdin (the test hands the server over before
/// sending it), then collects every completion and checks the data and the block status.
const SCRIPT: &str = r#"
import signal
import sys
import nbd

# A server that stops answering fails the test instead of hanging it.
signal.alarm(120)

KiB = 1024
MiB = 1024 * KiB
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri("nbd+unix:///disk?socket=" + sys.argv[1])
extended = hasattr(h, "get_extended_headers_negotiated") and h.get_extended_headers_negotiated()

def length(i):
    return 4096 * (1 + (i * 7) % 32)

def fill(i):
    return bytes([i % 251 + 1]) * length(i)

# Answered by the old server for sure: a WRITE and a READ, each awaited.
h.pwrite(b"\xee" * 4096, 32 * MiB)
assert h.pread(4096, 32 * MiB) == b"\xee" * 4096

writes = [h.aio_pwrite(fill(i), i * 128 * KiB) for i in range(64)]
reads = []
for i in range(64):
    buf = nbd.Buffer(length(i))
    reads.append((i, buf, h.aio_pread(buf, i * 128 * KiB)))
print("in flight", h.aio_in_flight(), flush=True)
sys.stdin.readline()
while h.aio_in_flight() > 0:
    h.poll(-1)
for cookie in writes:
    assert h.aio_command_completed(cookie)
for i, buf, cookie in reads:
    assert h.aio_command_completed(cookie)
    assert buf.to_bytearray() == fill(i), "READ %d" % i

extents = []
def got(context, offset, entries, err):
    if context == nbd.CONTEXT_BASE_ALLOCATION:
        extents.extend(entries)
h.block_status(256 * KiB, 0, got)
hole = nbd.STATE_HOLE | nbd.STATE_ZERO
expected = [length(0), 0, 128 * KiB - length(0), hole, length(1), 0, 128 * KiB - length(1), hole]
assert extents == expected, extents
print("extended" if extended else "compact")
h.shutdown()
print("hand-over OK")
"#;

/// Requests counted by a server's metrics (each when its reply was completely written).
fn requests(metrics: &Arc<Metrics>) -> u64 {
    metrics
        .render()
        .lines()
        .filter(|line| line.starts_with("ramnbd_requests_total{"))
        .map(|line| line.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

fn libnbd_requests_in_flight_survive_a_hand_over(clients: Clients) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // Under /tmp, which Debian 13's clients share.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nbd.sock");
    let config = ExportConfig {
        name: "disk".to_owned(),
        size: 64 * MIB,
        read_only: false,
        description: String::new(),
        max_memory: None,
        ..Default::default()
    };
    let exports = Arc::new(Exports::new(&[config]).unwrap());
    let options = |metrics| ServeOptions {
        max_connections: 4,
        max_connections_per_client: 0,
        handshake_timeout: None,
        tcp_keepalive: None,
        allow: Vec::new(),
        shutdown_grace: Duration::from_secs(30),
        metrics: Some(metrics),
        tls: Default::default(),
    };
    let old_metrics = Metrics::new(Arc::clone(&exports));
    let listeners = runtime
        .block_on(server::bind(&[ListenAddr::Unix(socket.clone())]))
        .unwrap();
    let old = Shutdown::new();
    let first = runtime.spawn(server::serve(
        listeners,
        Arc::clone(&exports),
        options(Arc::clone(&old_metrics)),
        old.clone(),
    ));

    let mut child = clients
        .command(PYTHON)
        .arg("-c")
        .arg(SCRIPT)
        .arg(&socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert!(line.starts_with("in flight"), "{line:?}");
    // The client sends no more than its socket holds and reads no replies until it is told to
    // go on, so most of the 128 requests cannot have reached the old server; the hand-over
    // completes what that server started (once the client reads again) and suspends.
    old.hand_over();
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let handed_over = runtime.block_on(first).unwrap();
    assert_eq!(handed_over.len(), 1, "the connection handed over");
    // The restart's pause, which the client must ride out.
    std::thread::sleep(Duration::from_millis(200));
    let new_metrics = Metrics::new(Arc::clone(&exports));
    let new = Shutdown::new();
    let second = runtime.spawn(server::serve_adopting(
        Vec::new(),
        handed_over,
        Arc::clone(&exports),
        options(Arc::clone(&new_metrics)),
        new.clone(),
    ));
    let status = child.wait().unwrap();
    let rest: Vec<String> = stdout.lines().map(Result::unwrap).collect();
    assert!(status.success(), "the client failed: {rest:?}");
    assert_eq!(
        rest.last().map(String::as_str),
        Some("hand-over OK"),
        "{rest:?}"
    );
    let headers = match clients {
        Clients::Debian12 => "compact",
        Clients::Debian13 => "extended",
    };
    assert!(
        rest.iter().any(|l| l == headers),
        "{headers} headers: {rest:?}"
    );
    new.advance(Phase::Stopping);
    assert!(runtime.block_on(second).unwrap().is_empty());

    let (before, after) = (requests(&old_metrics), requests(&new_metrics));
    println!("requests answered before the hand-over: {before}, after: {after}");
    assert!(before > 0 && after > 0, "{before} before, {after} after");
    assert!(before >= 2, "the first WRITE and READ: {before}");
    assert_eq!(
        before + after,
        131,
        "130 requests and BLOCK_STATUS, each answered once"
    );
}
both_generations!(libnbd_requests_in_flight_survive_a_hand_over);
