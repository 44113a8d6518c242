//! Reading the server's Prometheus endpoint (`--metrics`), for tests that check what the
//! server counted.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::Server;

/// The address from the server's "metrics on http://ADDR/metrics" log line.
pub fn metrics_addr(server: &Server) -> SocketAddr {
    let log = server.stderr_text();
    let line = log
        .lines()
        .find(|l| l.contains("metrics on http://"))
        .unwrap_or_else(|| panic!("no metrics line in the log:\n{log}"));
    let rest = &line[line.find("http://").unwrap() + "http://".len()..];
    rest[..rest.find('/').unwrap()].parse().unwrap()
}

/// GET `path`; returns (status line, headers, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (String, String, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nAccept: */*\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("a header/body split");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_owned(), headers.to_owned(), body.to_owned())
}

/// The body of `/metrics` of a server started with `--metrics 127.0.0.1:0`.
pub fn scrape(server: &Server) -> String {
    http_get(metrics_addr(server), "/metrics").2
}

/// The value of the sample whose name and labels are exactly `series`.
pub fn value(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse::<f64>().unwrap())
        })
        .unwrap_or_else(|| panic!("no series {series} in\n{body}"))
}
