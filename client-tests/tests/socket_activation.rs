//! Socket activation and readiness, the way systemd does them, without systemd as PID 1:
//!
//! * `systemd-socket-activate` (from the systemd package: systemd's own implementation of the
//!   protocol) listens on a TCP and a Unix socket, waits for the first client, and execs ramnbd
//!   with `LISTEN_FDS=2`, `LISTEN_PID`, `LISTEN_FDNAMES`; the test binds the `NOTIFY_SOCKET`
//!   datagram socket and reads what ramnbd tells the service manager (`READY=1`, `STATUS=`,
//!   `STOPPING=1`), and drives the server through the inherited sockets with nbdinfo;
//! * libnbd's own socket activation (`nbdinfo [ CMD ARGS ]`).

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ramnbd_client_tests::server::ramnbd_bin;
use ramnbd_client_tests::{MIB, require_tool, run_ok};
use rustix::process::{Pid, Signal, kill_process};

const TIMEOUT: Duration = Duration::from_secs(20);

/// A process whose stderr is collected in the background.
struct Spawned {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Spawned {
    fn new(mut command: Command) -> Spawned {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().unwrap();
        let sink = Arc::clone(&stderr);
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut text = sink.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        });
        Spawned { child, stderr }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn wait_for_stderr(&self, needle: &str) {
        let deadline = Instant::now() + TIMEOUT;
        while !self.stderr().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on stderr within {TIMEOUT:?}:\n{}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "did not exit within {timeout:?}:\n{}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn terminate(&self) {
        let pid = Pid::from_raw(self.child.id() as i32).unwrap();
        let _ = kill_process(pid, Signal::TERM);
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("---- stderr ----\n{}---- end ----", self.stderr());
        }
    }
}

/// The datagram socket a service manager listens on (`NOTIFY_SOCKET`).
struct NotifySocket(UnixDatagram);

impl NotifySocket {
    fn bind(path: &Path) -> NotifySocket {
        let socket = UnixDatagram::bind(path).expect("bind the notify socket");
        socket.set_read_timeout(Some(TIMEOUT)).unwrap();
        NotifySocket(socket)
    }

    /// The next message, as its `KEY=VALUE` lines, past the disks' `FDSTORE=1` messages (a
    /// server under a service manager puts each export's memfd in the fd store first).
    fn next(&self) -> Vec<String> {
        let mut buf = [0u8; 4096];
        loop {
            let n = self
                .0
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("no notification within {TIMEOUT:?}: {e}"));
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            eprintln!("notify: {text:?}");
            let lines: Vec<String> = text.lines().map(str::to_owned).collect();
            if !lines.iter().any(|l| l == "FDSTORE=1") {
                return lines;
            }
        }
    }

    fn nothing_pending(&self) -> bool {
        self.0.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 4096];
        let pending = self.0.recv(&mut buf).is_ok();
        self.0.set_nonblocking(false).unwrap();
        !pending
    }
}

/// A TCP port that was free a moment ago (systemd-socket-activate needs a fixed one).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn systemd_socket_activate_passes_tcp_and_unix_and_ramnbd_notifies() {
    let activate = require_tool("systemd-socket-activate", "systemd");
    let nbdinfo = require_tool("nbdinfo", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let notify = NotifySocket::bind(&dir.path().join("notify.sock"));
    let unix = dir.path().join("nbd.sock");
    let port = free_port();

    let mut command = Command::new(activate);
    command
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg(format!("--listen={}", unix.display()))
        .arg("--fdname=nbd-tcp:nbd-unix")
        .arg(format!(
            "--setenv=NOTIFY_SOCKET={}",
            dir.path().join("notify.sock").display()
        ))
        .arg("--setenv=NO_COLOR=1")
        .arg("--setenv=RUST_LOG=debug")
        .arg(ramnbd_bin())
        .args(["--no-config", "-e", "a=64M", "-e", "b=1M,ro"])
        .args(["--shutdown-grace", "2s"]);
    let mut server = Spawned::new(command);
    server.wait_for_stderr(&format!("Listening on {} as 4.", unix.display()));
    // Nothing runs until the first client: systemd-socket-activate waits, as PID 1 would.
    assert!(notify.nothing_pending());

    // The first client (over the Unix socket) starts ramnbd, which answers on the same socket.
    let list = run_ok(
        &nbdinfo,
        &[
            "--list",
            "--json",
            &format!("nbd+unix:///?socket={}", unix.display()),
        ],
    );
    let json: serde_json::Value = serde_json::from_str(&list).unwrap();
    let exports: Vec<(String, u64)> = json["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["export-name"].as_str().unwrap().to_owned(),
                e["export-size"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        exports,
        [("a".to_owned(), 64 * MIB), ("b".to_owned(), MIB)],
        "{list}"
    );

    // READY=1 with a STATUS= naming the exports, their sizes and both listeners.
    let message = notify.next();
    assert!(message.contains(&"READY=1".to_owned()), "{message:?}");
    let status = message
        .iter()
        .find_map(|l| l.strip_prefix("STATUS="))
        .unwrap_or_else(|| panic!("no STATUS= with READY=1: {message:?}"));
    assert_eq!(
        status,
        format!(
            "serving 2 exports (\"a\" 64 MiB, \"b\" 1 MiB) on tcp 127.0.0.1:{port}, unix {}",
            unix.display()
        )
    );

    // The TCP socket is served too, by the same process (systemd-socket-activate exec'd it).
    let size = run_ok(&nbdinfo, &["--size", &format!("nbd://127.0.0.1:{port}/a")]);
    assert_eq!(size.trim(), (64 * MIB).to_string());
    let log = server.stderr();
    assert!(
        log.contains("sockets=2") && log.contains("socket activation: serving the inherited"),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "inherited tcp 127.0.0.1:{port} fd=3 name=\"nbd-tcp\""
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "inherited unix {} fd=4 name=\"nbd-unix\"",
            unix.display()
        )),
        "{log}"
    );
    assert!(
        !log.contains("listen on"),
        "ramnbd must not bind itself:\n{log}"
    );

    // SIGTERM: STOPPING=1, exit 0; the Unix socket belongs to the service manager and stays.
    server.terminate();
    let message = notify.next();
    assert!(message.contains(&"STOPPING=1".to_owned()), "{message:?}");
    let status = server.wait(Duration::from_secs(5));
    assert!(status.success(), "ramnbd exited with {status}");
    assert!(
        unix.exists(),
        "the inherited socket's path must be left alone"
    );
}

#[test]
fn listen_flags_are_refused_under_socket_activation() {
    let activate = require_tool("systemd-socket-activate", "systemd");
    let port = free_port();
    let mut command = Command::new(activate);
    command
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg(ramnbd_bin())
        .args(["--no-config", "-l", "127.0.0.1:0"]);
    let mut server = Spawned::new(command);
    server.wait_for_stderr("as 3.");
    let _client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let status = server.wait(TIMEOUT);
    assert_eq!(status.code(), Some(1));
    assert!(
        server
            .stderr()
            .contains("--listen and --unix cannot be used under socket activation"),
        "{}",
        server.stderr()
    );
}

/// libnbd starts the server itself with a socket it created (`LISTEN_FDS=1`), the way
/// `nbdinfo [ CMD ARGS ]` and `nbdcopy -- [ CMD ]` do.
#[test]
fn libnbd_socket_activation() {
    let nbdinfo = require_tool("nbdinfo", "libnbd-bin");
    let bin = ramnbd_bin().to_str().unwrap();
    let size = run_ok(
        &nbdinfo,
        &["--size", "--", "[", bin, "--no-config", "-s", "3M", "]"],
    );
    assert_eq!(size.trim(), (3 * MIB).to_string());
    let info = run_ok(
        &nbdinfo,
        &[
            "--json",
            "--",
            "[",
            bin,
            "--no-config",
            "-s",
            "5M",
            "--read-only",
            "]",
        ],
    );
    let json: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(json["exports"][0]["export-size"], 5 * MIB, "{info}");
    assert_eq!(json["exports"][0]["is_read_only"], true, "{info}");
}

/// The notifications a server sends in its first 1.5 s with `WATCHDOG_USEC` set to `usec`
/// (unset for `None`).
fn notifications_with_watchdog(usec: Option<&str>) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let notify = NotifySocket::bind(&dir.path().join("notify"));
    let mut command = Command::new(ramnbd_bin());
    command
        .args(["--no-config", "-s", "1M", "-l", "127.0.0.1:0"])
        .env("NOTIFY_SOCKET", dir.path().join("notify"))
        .env_remove("WATCHDOG_PID");
    match usec {
        Some(usec) => command.env("WATCHDOG_USEC", usec),
        None => command.env_remove("WATCHDOG_USEC"),
    };
    let server = Spawned::new(command);
    notify
        .0
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_millis(1500);
    let mut lines = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = notify.0.recv(&mut buf) {
            lines.extend(
                String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .map(str::to_owned),
            );
        }
    }
    server.terminate();
    lines
}

#[test]
fn the_watchdog_is_pinged_only_when_systemd_asks_for_it() {
    let pings = |lines: &[String]| lines.iter().filter(|l| *l == "WATCHDOG=1").count();
    let asked = notifications_with_watchdog(Some("400000"));
    assert!(asked.iter().any(|l| l == "READY=1"), "{asked:?}");
    assert!(
        pings(&asked) >= 3,
        "WatchdogSec=0.4s: pinged every 0.2 s: {asked:?}"
    );
    // Unset, or 0 (which sd_watchdog_enabled(3) treats as not enabled): no pings.
    for usec in [None, Some("0")] {
        let lines = notifications_with_watchdog(usec);
        assert!(lines.iter().any(|l| l == "READY=1"), "{lines:?}");
        assert_eq!(pings(&lines), 0, "WATCHDOG_USEC={usec:?}: {lines:?}");
    }
}
