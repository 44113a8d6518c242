//! The Prometheus endpoint: scrape `/metrics` after a known workload and check the counters.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use ramnbd_client_tests::proto::*;
use ramnbd_client_tests::scrape::{http_get, metrics_addr, value};
use ramnbd_client_tests::{KIB, MIB, Negotiate, Request, Server};

#[test]
fn counters_after_a_known_workload() {
    let server = Server::start(&[
        "--no-config",
        "-e",
        "disk=16M",
        "-e",
        "ro=1M,ro",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let addr = metrics_addr(&server);

    // Before any client: the exports are there, nothing counted.
    let (status, headers, body) = http_get(addr, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        headers.contains("Content-Type: text/plain; version=0.0.4"),
        "{headers}"
    );
    assert_eq!(
        value(&body, "ramnbd_export_size_bytes{export=\"disk\"}"),
        (16 * MIB) as f64
    );
    assert_eq!(
        value(&body, "ramnbd_export_size_bytes{export=\"ro\"}"),
        MIB as f64
    );
    assert_eq!(
        value(&body, "ramnbd_export_allocated_bytes{export=\"disk\"}"),
        0.0
    );
    assert_eq!(value(&body, "ramnbd_connections_total"), 0.0);
    assert!(!body.contains("ramnbd_requests_total{"), "{body}");

    // The workload: on "disk", 8 WRITEs of 64 KiB, 5 READs of 4 KiB, 1 READ past the end
    // (EINVAL), 2 TRIMs of 64 KiB, 1 FLUSH; on "ro", 1 WRITE (EPERM). Over TCP and Unix.
    let mut disk = Negotiate::new("disk").go(&server.tcp());
    let block = vec![0xa5u8; 64 * KIB as usize];
    let mut requests: Vec<Request> = (0..8)
        .map(|i| Request::write(i * 64 * KIB, &block))
        .collect();
    requests.extend((0..5).map(|i| Request::read(i * 4 * KIB, 4 * KIB)));
    requests.push(Request::read(16 * MIB - 512, 4 * KIB));
    requests.push(Request::trim(0, 64 * KIB));
    requests.push(Request::trim(64 * KIB, 64 * KIB));
    requests.push(Request::flush());
    let responses = disk.pipeline(&requests);
    let errors: Vec<u32> = responses
        .iter()
        .map(|r| r.error())
        .filter(|&e| e != 0)
        .collect();
    assert_eq!(errors, [EINVAL]);
    let mut ro = Negotiate::new("ro").go(&server.unix());
    assert_eq!(ro.write(0, b"nope"), Err(EPERM));

    let (_, _, body) = http_get(addr, "/metrics");
    eprintln!("{body}");
    let series = |name: &str, export: &str, command: &str| {
        value(
            &body,
            &format!("{name}{{export=\"{export}\",command=\"{command}\"}}"),
        )
    };
    for (command, requests, errors, bytes) in [
        ("write", 8.0, 0.0, (8 * 64 * KIB) as f64),
        ("read", 6.0, 1.0, (5 * 4 * KIB) as f64),
        ("trim", 2.0, 0.0, (2 * 64 * KIB) as f64),
        ("flush", 1.0, 0.0, 0.0),
    ] {
        assert_eq!(
            series("ramnbd_requests_total", "disk", command),
            requests,
            "{command}"
        );
        assert_eq!(
            series("ramnbd_request_errors_total", "disk", command),
            errors,
            "{command}"
        );
        assert_eq!(
            series("ramnbd_request_bytes_total", "disk", command),
            bytes,
            "{command}"
        );
        assert_eq!(
            series("ramnbd_request_duration_seconds_count", "disk", command),
            requests,
            "{command}"
        );
        let all = value(
            &body,
            &format!(
                "ramnbd_request_duration_seconds_bucket{{export=\"disk\",command=\"{command}\",le=\"+Inf\"}}"
            ),
        );
        assert_eq!(
            all, requests,
            "{command}: the +Inf bucket counts every request"
        );
        assert!(series("ramnbd_request_duration_seconds_sum", "disk", command) >= 0.0);
    }
    assert_eq!(series("ramnbd_requests_total", "ro", "write"), 1.0);
    assert_eq!(series("ramnbd_request_errors_total", "ro", "write"), 1.0);
    assert_eq!(series("ramnbd_request_bytes_total", "ro", "write"), 0.0);
    // Commands never sent have no series.
    assert!(!body.contains("command=\"block_status\""), "{body}");
    assert!(!body.contains("export=\"ro\",command=\"read\""), "{body}");
    // 8 blocks written, 2 trimmed: 6 × 64 KiB hold memory.
    assert_eq!(
        value(&body, "ramnbd_export_allocated_bytes{export=\"disk\"}"),
        (6 * 64 * KIB) as f64
    );
    assert_eq!(value(&body, "ramnbd_connections_total"), 2.0);
    assert_eq!(value(&body, "ramnbd_connections_open"), 2.0);

    // Connections close: the gauge follows, the total stays.
    disk.disc();
    ro.disc();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, _, body) = http_get(addr, "/metrics");
        if value(&body, "ramnbd_connections_open") == 0.0 {
            assert_eq!(value(&body, "ramnbd_connections_total"), 2.0);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "connections_open stuck:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Anything but /metrics is a 404, anything but GET a 405.
    assert_eq!(http_get(addr, "/").0, "HTTP/1.1 404 Not Found");
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(stream, "POST /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 405"), "{response}");
}

#[test]
fn metrics_are_off_by_default() {
    let server = Server::start(&["--no-config", "-s", "1M"]);
    assert!(!server.stderr_text().contains("metrics on"));
}

#[test]
fn a_failed_metrics_bind_leaves_no_socket_file_behind() {
    // The metrics port is taken: startup fails after the NBD listeners were bound, and the
    // Unix socket the server created must go with it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ramnbd.sock");
    let output = std::process::Command::new(ramnbd_client_tests::server::ramnbd_bin())
        .args(["--no-config", "-s", "1M", "-l", "127.0.0.1:0", "-u"])
        .arg(&socket)
        .args(["--metrics", &taken.local_addr().unwrap().to_string()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "started with its metrics port taken:\n{stderr}"
    );
    assert!(stderr.contains("metrics: listen on"), "{stderr}");
    assert!(!socket.exists(), "{} was left behind", socket.display());
}
