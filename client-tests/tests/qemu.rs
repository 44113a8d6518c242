//! qemu's NBD client (qemu-io, qemu-img) against ramnbd, each test with Debian 12's qemu 7.2
//! (compact headers) and Debian 13's qemu 10.0 (extended headers; its writes do not set
//! PAYLOAD_LEN).

use ramnbd_client_tests::tools::write_random_file;
use ramnbd_client_tests::{Clients, MIB, Negotiate, Server, both_generations};
use serde_json::Value;

/// Runs qemu-io commands against `uri`; returns (success, combined output).
fn qemu_io(clients: Clients, uri: &str, commands: &[&str]) -> (bool, String) {
    let mut args = vec!["-f", "raw"];
    for command in commands {
        args.extend(["-c", command]);
    }
    args.push(uri);
    clients.run_qemu("qemu-io", &args)
}

fn qemu_io_patterns_discard_and_write_zeroes(clients: Clients) {
    let server = Server::start(&["-e", "qdisk=64M"]);
    let uri = server.tcp_uri("qdisk");
    let (ok, out) = qemu_io(
        clients,
        &uri,
        &[
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            "write -P 0xcd 3M 512k",
            // discard = TRIM; ramnbd reads trimmed ranges back as zeroes.
            "discard 0 64k",
            "read -P 0 0 64k",
            "read -P 0xab 64k 960k",
            // write -z = WRITE_ZEROES with NO_HOLE; with -u the server may punch a hole.
            "write -z 3M 128k",
            "read -P 0 3M 128k",
            "write -z -u 3200k 64k",
            "read -P 0 3200k 64k",
            "read -P 0xcd 3264k 256k",
            // Unaligned I/O.
            "write -P 0x5a 12345 777",
            "read -P 0x5a 12345 777",
            "flush",
        ],
    );
    assert!(ok, "qemu-io failed:\n{out}");
    assert_eq!(out.matches("wrote ").count(), 5, "{out}");
    assert_eq!(out.matches("read ").count(), 7, "{out}");

    // The same checks over the Unix socket see the same data.
    let (ok, out) = qemu_io(
        clients,
        &server.unix_uri("qdisk"),
        &["read -P 0xab 1000k 24k"],
    );
    assert!(ok, "qemu-io over unix failed:\n{out}");
    clients.assert_headers(&server);
}
both_generations!(qemu_io_patterns_discard_and_write_zeroes);

fn qemu_io_detects_a_wrong_pattern(clients: Clients) {
    // The negative control for the test above: a wrong expectation must fail, so a passing
    // qemu-io run really means the data matched.
    let server = Server::start(&["-s", "4M"]);
    let (ok, out) = qemu_io(
        clients,
        &server.unix_uri(""),
        &["write -P 0xab 0 64k", "read -P 0xcd 0 64k"],
    );
    assert!(!ok, "a wrong pattern was accepted:\n{out}");
    assert!(out.contains("Pattern verification failed"), "{out}");
}
both_generations!(qemu_io_detects_a_wrong_pattern);

/// (start, length, data, zero) runs from `qemu-img map --output=json`, adjacent equal runs merged.
fn qemu_img_map(clients: Clients, uri: &str) -> Vec<(u64, u64, bool, bool)> {
    let text = clients.run_ok("qemu-img", &["map", "-f", "raw", "--output=json", uri]);
    let entries: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("qemu-img map JSON ({e}):\n{text}"));
    let mut runs: Vec<(u64, u64, bool, bool)> = Vec::new();
    for entry in entries.as_array().expect("array") {
        let start = entry["start"].as_u64().expect("start");
        let length = entry["length"].as_u64().expect("length");
        let data = entry["data"].as_bool().expect("data");
        let zero = entry["zero"].as_bool().expect("zero");
        match runs.last_mut() {
            Some(last) if last.2 == data && last.3 == zero && last.0 + last.1 == start => {
                last.1 += length;
            }
            _ => runs.push((start, length, data, zero)),
        }
    }
    runs
}

fn qemu_img_map_shows_data_and_zero_extents(clients: Clients) {
    let server = Server::start(&["-s", "16M"]);
    let uri = server.tcp_uri("");
    let (ok, out) = qemu_io(
        clients,
        &uri,
        &["write -P 0x11 0 1M", "write -P 0x22 8M 1M"],
    );
    assert!(ok, "{out}");
    assert_eq!(
        qemu_img_map(clients, &uri),
        [
            (0, MIB, true, false),
            (MIB, 7 * MIB, false, true),
            (8 * MIB, MIB, true, false),
            (9 * MIB, 7 * MIB, false, true),
        ]
    );
    // Discarding the first MiB turns it back into a zero extent.
    let (ok, out) = qemu_io(clients, &uri, &["discard 0 1M"]);
    assert!(ok, "{out}");
    assert_eq!(
        qemu_img_map(clients, &uri),
        [
            (0, 8 * MIB, false, true),
            (8 * MIB, MIB, true, false),
            (9 * MIB, 7 * MIB, false, true),
        ]
    );
    clients.assert_headers(&server);
}
both_generations!(qemu_img_map_shows_data_and_zero_extents);

/// `qemu-img convert -n` copies a random image into the export (over TCP), and `qemu-img compare`
/// finds them identical (over the Unix socket); after one byte of the export changes, compare
/// must report the difference, so "identical" is not its only answer.
fn qemu_img_convert_and_compare_a_random_256_mib_image(clients: Clients) {
    // Exactly the image's size: compare also checks that the sizes match.
    let server = Server::start(&["-s", "256M"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("random.img");
    write_random_file(&image, 0x9e, 256 * MIB);
    let image = image.to_str().expect("utf-8 path");

    let (tcp, unix) = (server.tcp_uri(""), server.unix_uri(""));
    // -n: the target exists; -W: out-of-order writes, several in flight.
    let convert = ["convert", "-n", "-W", "-f", "raw", "-O", "raw", image, &tcp];
    clients.run_ok("qemu-img", &convert);
    let compare = ["compare", "-f", "raw", "-F", "raw", image, &unix];
    let same = clients.run_ok("qemu-img", &compare);
    assert_eq!(same.trim(), "Images are identical.", "{same}");

    let mut client = Negotiate::new("").go(&server.tcp());
    let at = 200 * MIB + 12_345;
    let byte = client.read(at, 1).expect("read one byte")[0];
    client.write(at, &[!byte]).expect("change one byte");
    let output = clients.run("qemu-img", &compare);
    let stdout = String::from_utf8_lossy(&output.stdout);
    // Exit status 1: the images differ, first in the 512-byte sector holding that byte.
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert_eq!(
        stdout.trim(),
        format!("Content mismatch at offset {}!", at / 512 * 512)
    );
    clients.assert_headers(&server);
}
both_generations!(qemu_img_convert_and_compare_a_random_256_mib_image);
