//! Images: an export saved to a file and loaded from it, driven through libnbd's Python
//! binding (Debian 12's and 13's). A reboot of a RAM disk is a new server process starting
//! with the image the old one saved, so these tests stop (or kill) the server and start a new
//! one on the same file.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ramnbd_client_tests::clients::PYTHON;
use ramnbd_client_tests::scrape::{scrape, value};
use ramnbd_client_tests::server::ramnbd_bin;
use ramnbd_client_tests::{Clients, MIB, Server, both_generations};
use rustix::process::Signal;

/// Pages of a known pattern: page `i` starts with `i` and a tag, then the tag repeated.
const PRELUDE: &str = r#"
import os
import signal
import struct
import sys
import time
import nbd

signal.alarm(240)
MiB = 1 << 20
PAGE = 4096

def page(i, tag):
    return struct.pack("<QQ", i, tag) + bytes([tag]) * (PAGE - 16)

def pages(first, count, tag):
    return b"".join(page(i, tag) for i in range(first, first + count))

def connect(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h

def fill(h, start, length, tag):
    """Writes the pattern over [start, start + length), 4 MiB at a time."""
    for at in range(start, start + length, 4 * MiB):
        n = min(4 * MiB, start + length - at)
        h.pwrite(pages(at // PAGE, n // PAGE, tag), at)

def check(h, start, length, tag):
    for at in range(start, start + length, 4 * MiB):
        n = min(4 * MiB, start + length - at)
        got = h.pread(n, at)
        if got != pages(at // PAGE, n // PAGE, tag):
            for p in range(0, n, PAGE):
                if got[p:p + PAGE] != page((at + p) // PAGE, tag):
                    head = struct.unpack("<QQ", got[p:p + 16])
                    raise AssertionError("page at %d: %r, expected tag %d" % (at + p, head, tag))
"#;

/// The image's directory (in /tmp, which Debian 13's clients share) and path.
fn image_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("ramnbd-image-")
        .tempdir()
        .expect("a temporary directory");
    let path = dir.path().join("disk.img");
    (dir, path)
}

fn start_with_image(size: &str, image: &Path) -> Server {
    Server::start(&["-s", size, "--image", image.to_str().unwrap()])
}

/// argv: URI. Writes tag 1 over 0..8 MiB and 40..48 MiB and tag 2 at the last page, trims
/// 40..44 MiB (a hole again) and zeroes 16..17 MiB (a hole that stays one).
const WRITE_SCRIPT: &str = r#"
h = connect(sys.argv[1])
size = h.get_size()
fill(h, 0, 8 * MiB, 1)
fill(h, 40 * MiB, 8 * MiB, 1)
h.trim(4 * MiB, 40 * MiB)
h.pwrite(page(size // PAGE - 1, 2), size - PAGE)
h.zero(MiB, 16 * MiB)
h.flush()
print("written")
"#;

/// argv: URI. Checks what WRITE_SCRIPT wrote.
const CHECK_SCRIPT: &str = r#"
h = connect(sys.argv[1])
size = h.get_size()
check(h, 0, 8 * MiB, 1)
check(h, 44 * MiB, 4 * MiB, 1)
assert h.pread(4 * MiB, 40 * MiB) == bytes(4 * MiB), "the trimmed range is not zero"
assert h.pread(MiB, 16 * MiB) == bytes(MiB)
assert h.pread(PAGE, size - PAGE) == page(size // PAGE - 1, 2)
assert h.pread(MiB, 100 * MiB) == bytes(MiB)
print("checked")
"#;

fn save_on_stop_and_load_at_start_keep_the_data(clients: Clients) {
    let (_dir, image) = image_dir();
    let mut server = start_with_image("1G", &image);
    server.wait_for_stderr("no image yet", Duration::from_secs(5));
    let write = format!("{PRELUDE}{WRITE_SCRIPT}");
    clients.python_ok(&write, &[&server.unix_uri("")], "written");
    assert!(server.terminate().success(), "{}", server.stderr_text());
    let saved = server.wait_for_stderr("saved image", Duration::from_secs(1));
    assert!(saved.contains("reason=\"stop\""), "{saved}");

    let meta = fs::metadata(&image).expect("the image was saved");
    assert_eq!(meta.len(), 1 << 30, "the image is the export's size");
    // 12 MiB of data were left: the file holds about that, not the export's 1 GiB.
    let allocated = meta.blocks() * 512;
    assert!(
        (12 * MIB..14 * MIB).contains(&allocated),
        "{allocated} bytes allocated for 12 MiB of data"
    );

    // The reboot: a new server on the same image.
    let server = start_with_image("1G", &image);
    let loaded = server.wait_for_stderr("loaded image", Duration::from_secs(5));
    assert!(loaded.contains("12.0 MiB of data"), "{loaded}");
    let check = format!("{PRELUDE}{CHECK_SCRIPT}");
    clients.python_ok(&check, &[&server.unix_uri("")], "checked");
}
both_generations!(save_on_stop_and_load_at_start_keep_the_data);

/// Blocks of the sequence-number writer: 64 MiB of 4 KiB blocks, after 256 MiB of other data.
const SEQ_START: u64 = 256 * MIB;
const SEQ_BLOCKS: u64 = 16384;

/// argv: URI, first byte of the blocks, block count, stop file. Fills 256 MiB of other data,
/// then writes block `seq % count` with `seq` = 1, 2, 3 ... (each write waits for its reply,
/// so every write is done before the next starts) until the stop file exists; prints
/// `started` once a full round is done and `last SEQ` at the end.
const WRITER_SCRIPT: &str = r#"
h = connect(sys.argv[1])
start, count, stop = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
fill(h, 0, start, 3)
seq = 1
while True:
    index = seq % count
    h.pwrite(struct.pack("<QQ", seq, index) + bytes(PAGE - 16), start + index * PAGE)
    if seq == count:
        print("started", flush=True)
    if seq % 256 == 0 and os.path.exists(stop):
        break
    seq += 1
print("last %d" % seq, flush=True)
"#;

/// argv: URI, first byte of the blocks, block count. The blocks must be the disk after one
/// write: every block holds the latest sequence number up to the largest found. Prints
/// `cut SEQ`.
const CUT_SCRIPT: &str = r#"
h = connect(sys.argv[1])
start, count = int(sys.argv[2]), int(sys.argv[3])
data = b"".join(h.pread(4 * MiB, at) for at in range(start, start + count * PAGE, 4 * MiB))
seqs = []
for i in range(count):
    seq, index = struct.unpack("<QQ", data[i * PAGE:i * PAGE + 16])
    assert seq == 0 or index == i, "block %d holds block %d's data" % (i, index)
    seqs.append(seq)
last = max(seqs)
for i, seq in enumerate(seqs):
    expected = last - (last - i) % count
    assert seq == expected, "block %d holds %d, but after write %d it held %d" % (i, seq, last, expected)
check(h, 0, start, 3)
print("cut %d" % last)
print("cut ok")
"#;

fn a_save_during_writes_holds_one_moment_of_the_disk(clients: Clients) {
    let (dir, image) = image_dir();
    let mut server = Server::start(&[
        "-s",
        "512M",
        "--image",
        image.to_str().unwrap(),
        "--metrics",
        "127.0.0.1:0",
    ]);
    let stop = dir.path().join("stop");
    let writer_script = format!("{PRELUDE}{WRITER_SCRIPT}");
    let mut writer = clients
        .command(PYTHON)
        .arg("-c")
        .arg(&writer_script)
        .arg(server.unix_uri(""))
        .arg(SEQ_START.to_string())
        .arg(SEQ_BLOCKS.to_string())
        .arg(&stop)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the writer");
    let mut out = std::io::BufReader::new(writer.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "started", "the writer did not start");

    server.signal(Signal::HUP);
    let saved = server.wait_for_stderr("saved image", Duration::from_secs(60));
    assert!(saved.contains("reason=\"SIGHUP\""), "{saved}");
    fs::write(&stop, b"").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(writer.wait().unwrap().success(), "the writer failed");
    let last: u64 = rest
        .trim()
        .strip_prefix("last ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no last line from the writer: {rest:?}"));
    println!("{saved}");
    // The pause the log reports is the one metrics show.
    let logged: f64 = saved
        .split("longest pause ")
        .nth(1)
        .and_then(|rest| rest.split(" ms").next())
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("no pause in {saved:?}"));
    let series = "ramnbd_export_save_pause_longest_microseconds{export=\"\"}";
    let metric = value(&scrape(&server), series) / 1000.0;
    assert!(
        metric > 0.0 && (metric - logged).abs() < 0.1,
        "{metric} ms, logged {logged} ms"
    );

    // A power cut: no save on stop, the image is the one SIGHUP made.
    server.signal(Signal::KILL);
    server
        .wait_timeout(Duration::from_secs(10))
        .expect("killed");
    let server = start_with_image("512M", &image);
    server.wait_for_stderr("loaded image", Duration::from_secs(30));
    let cut_script = format!("{PRELUDE}{CUT_SCRIPT}");
    let cut_args = [
        server.unix_uri(""),
        SEQ_START.to_string(),
        SEQ_BLOCKS.to_string(),
    ];
    let printed = clients.python_ok(&cut_script, &cut_args, "cut ok");
    let cut: u64 = printed
        .lines()
        .next()
        .unwrap_or_default()
        .strip_prefix("cut ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no cut line: {printed:?}"));
    println!("image holds the disk after write {cut} of {last}");
    assert!(
        SEQ_BLOCKS < cut && cut < last,
        "the image is not from the middle of the writes: write {cut} of {last}"
    );
}
both_generations!(a_save_during_writes_holds_one_moment_of_the_disk);

/// Starts ramnbd with an image it must refuse; returns its stderr.
fn refused_start(size: &str, image: &Path) -> String {
    let out = Command::new(ramnbd_bin())
        .args(["--no-config", "-s", size, "--image"])
        .arg(image)
        .args(["-l", "127.0.0.1:0"])
        .env("NO_COLOR", "1")
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run ramnbd");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "ramnbd started with a bad image:\n{stderr}"
    );
    assert!(!stderr.contains("listening on"), "{stderr}");
    stderr
}

#[test]
fn bad_images_refuse_the_start_and_are_left_alone() {
    let (dir, image) = image_dir();
    fs::write(&image, vec![7; MIB as usize]).unwrap();
    let err = refused_start("2M", &image);
    for part in [
        image.to_str().unwrap(),
        "1048576 bytes (1 MiB)",
        "2097152 bytes (2 MiB)",
        "too short",
        "set the export's size to 1048576",
        "move the file away",
    ] {
        assert!(err.contains(part), "{part:?} missing in:\n{err}");
    }
    assert_eq!(
        fs::read(&image).unwrap(),
        vec![7; MIB as usize],
        "the image changed"
    );

    let err = refused_start("1M", dir.path());
    assert!(
        err.contains("is not a regular file but a directory"),
        "{err}"
    );

    let missing_dir = dir.path().join("nowhere/disk.img");
    let err = refused_start("1M", &missing_dir);
    assert!(err.contains("directory must exist"), "{err}");
}

/// A save that dies half way (SIGKILL while it writes) leaves the image it was replacing as
/// it was; the next start removes the torn temporary file and loads the old image.
#[test]
fn a_server_killed_mid_save_keeps_the_old_image() {
    let clients = Clients::Debian12;
    let (dir, image) = image_dir();
    let mut server = start_with_image("1G", &image);
    let fill = format!(
        "{PRELUDE}h = connect(sys.argv[1])\nfill(h, 0, int(sys.argv[2]), int(sys.argv[3]))\nprint('filled')\n"
    );
    let size = (512 * MIB).to_string();
    clients.python_ok(
        &fill,
        &[server.unix_uri(""), size.clone(), "1".into()],
        "filled",
    );
    assert!(server.terminate().success());
    server.wait_for_stderr("saved image", Duration::from_secs(1));
    let old = fs::metadata(&image).unwrap();

    let mut server = start_with_image("1G", &image);
    clients.python_ok(
        &fill,
        &[server.unix_uri(""), size.clone(), "2".into()],
        "filled",
    );
    let torn = || -> Vec<String> {
        fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with(".disk.img.tmp-"))
            .collect()
    };
    server.signal(Signal::HUP);
    // The save is under way once its temporary file exists.
    let deadline = Instant::now() + Duration::from_secs(10);
    while torn().is_empty() {
        assert!(
            Instant::now() < deadline,
            "no temporary file within 10 s of SIGHUP"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    server.signal(Signal::KILL);
    server
        .wait_timeout(Duration::from_secs(10))
        .expect("killed");
    let log = server.stderr_text();
    assert!(
        !log.contains("saved image"),
        "the save finished before the kill; this test needs a slower save:\n{log}"
    );
    let leftovers = torn();
    assert_eq!(leftovers.len(), 1, "the torn save's file: {leftovers:?}");
    let now = fs::metadata(&image).unwrap();
    assert_eq!(
        (now.ino(), now.mtime_nsec()),
        (old.ino(), old.mtime_nsec()),
        "the image changed"
    );

    let started = Instant::now();
    let server = start_with_image("1G", &image);
    server.wait_for_stderr("removed the temporary file", Duration::from_secs(5));
    server.wait_for_stderr("loaded image", Duration::from_secs(30));
    println!("512 MiB image loaded in {:?}", started.elapsed());
    let check = format!(
        "{PRELUDE}h = connect(sys.argv[1])\ncheck(h, 0, int(sys.argv[2]), 1)\nprint('old data')\n"
    );
    clients.python_ok(&check, &[server.unix_uri(""), size], "old data");
    assert_eq!(
        torn(),
        Vec::<String>::new(),
        "the torn save's file is still there"
    );
}

/// `--save-interval` saves a changed disk, and skips the saves while nothing changes.
#[test]
fn the_save_interval_saves_changes_only() {
    let clients = Clients::Debian12;
    let (_dir, image) = image_dir();
    let mut server = Server::start(&[
        "-s",
        "1G",
        "--image",
        image.to_str().unwrap(),
        "--save-interval",
        "300ms",
    ]);
    let write = format!("{PRELUDE}{WRITE_SCRIPT}");
    clients.python_ok(&write, &[&server.unix_uri("")], "written");
    let saved = server.wait_for_stderr("reason=\"save-interval\"", Duration::from_secs(10));
    assert!(saved.contains("saving image"), "{saved}");
    server.wait_for_stderr("saved image", Duration::from_secs(10));
    // Several more ticks with nothing written.
    std::thread::sleep(Duration::from_millis(1500));
    let log = server.stderr_text();
    let periodic = log
        .lines()
        .filter(|l| l.contains("saved image") && l.contains("save-interval"))
        .count();
    assert_eq!(periodic, 1, "an unchanged disk was saved again:\n{log}");
    assert!(server.terminate().success());
    let check = format!("{PRELUDE}{CHECK_SCRIPT}");
    let server = start_with_image("1G", &image);
    clients.python_ok(&check, &[&server.unix_uri("")], "checked");
}

/// SIGHUP is what `systemctl reload` sends: without images it saves nothing, and it never
/// ends the server (its default action would).
#[test]
fn sighup_without_images_keeps_serving() {
    let mut server = Server::start(&["-s", "1M"]);
    server.signal(Signal::HUP);
    server.wait_for_stderr("no export has an image", Duration::from_secs(5));
    assert!(server.is_running());
    assert!(server.terminate().success());
}
