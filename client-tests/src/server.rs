//! A handle on one running `ramnbd` process.
//!
//! Every test starts its own server (tests run in parallel threads, and a shared server would
//! couple their data and their RSS measurements). The server listens on a Unix socket in a private
//! temporary directory and on `127.0.0.1:0`; the real TCP port is read back from the
//! `listening on tcp ADDR` line the server prints on stderr.

use std::env;
use std::ffi::OsStr;
use std::fs;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};
use tempfile::TempDir;

use crate::client::Target;

/// How long the server may take to print its `listening on` lines. Generous because the first
/// test in a process may share the 2 CPUs with a `cargo build` of the server.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a SIGTERM'd server may take to finish in-flight requests before it is SIGKILLed.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// The path of the ramnbd binary under test.
///
/// `RAMNBD_BIN` wins if set (for testing an installed or release binary). Otherwise the binary is
/// built once per test process with the cargo that runs the tests, in the same profile as the
/// tests, so `cargo test -p ramnbd-client-tests` never runs a stale server.
pub fn ramnbd_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = env::var_os("RAMNBD_BIN") {
            let bin = PathBuf::from(bin);
            assert!(bin.is_file(), "RAMNBD_BIN={} is not a file", bin.display());
            return bin;
        }
        let workspace = workspace_root();
        let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let release = !cfg!(debug_assertions);
        let mut build = Command::new(&cargo);
        build
            .args(["build", "-p", "ramnbd", "--bin", "ramnbd"])
            .current_dir(&workspace);
        if release {
            build.arg("--release");
        }
        let out = build
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", Path::new(&cargo).display()));
        assert!(
            out.status.success(),
            "building ramnbd failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let target_dir = match env::var_os("CARGO_TARGET_DIR") {
            Some(dir) => workspace.join(dir), // join keeps an absolute dir as it is
            None => workspace.join("target"),
        };
        let bin = target_dir
            .join(if release { "release" } else { "debug" })
            .join("ramnbd");
        assert!(
            bin.is_file(),
            "cargo built ramnbd but {} is missing",
            bin.display()
        );
        bin
    })
}

/// The workspace root: this crate lives in `<workspace>/client-tests`.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("client-tests has a parent directory")
        .to_path_buf()
}

/// The server's stderr, collected by a background thread so the pipe never fills up.
#[derive(Debug, Default)]
struct LogBuffer {
    text: Mutex<String>,
    grew: Condvar,
}

/// A running ramnbd. Dropping it stops the server (SIGTERM, then SIGKILL after a timeout) and,
/// if the test is failing, prints the server's log.
#[derive(Debug)]
pub struct Server {
    child: Child,
    log: Arc<LogBuffer>,
    tcp: SocketAddr,
    unix: PathBuf,
    exit: Option<ExitStatus>,
    // Holds the Unix socket; removed when the server handle goes away.
    _dir: TempDir,
}

impl Server {
    /// Starts `ramnbd [--no-config] ARGS -u TMPDIR/ramnbd.sock -l 127.0.0.1:0` and waits until
    /// both listeners are up. Panics (with the server's stderr) if it exits or does not come up in time.
    pub fn start<S: AsRef<OsStr>>(args: &[S]) -> Server {
        Server::start_wrapped::<&str, S>(&[], args)
    }

    /// Like [`Server::start`], run under `wrapper` (a command that execs the rest of its
    /// arguments in its own process, such as `prlimit --nofile=1024:4096`), so that
    /// [`Server::pid`] is still the server's.
    pub fn start_wrapped<W: AsRef<OsStr>, S: AsRef<OsStr>>(wrapper: &[W], args: &[S]) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("ramnbd-test-")
            .tempdir()
            .expect("create a temporary directory");
        let unix = dir.path().join("ramnbd.sock");
        let mut command = match wrapper.split_first() {
            None => Command::new(ramnbd_bin()),
            Some((program, rest)) => {
                let mut command = Command::new(program);
                command.args(rest).arg(ramnbd_bin());
                command
            }
        };
        // Hermetic: never pick up a machine's /etc/ramnbd/ramnbd.toml, unless the test chose a
        // config setting itself (clap refuses --no-config twice, or with --config).
        let chose_config = args.iter().any(|arg| {
            let arg = arg.as_ref().to_string_lossy();
            ["-c", "--config", "--no-config"].contains(&arg.as_ref())
                || arg.starts_with("--config=")
        });
        if !chose_config {
            command.arg("--no-config");
        }
        let mut child = command
            .args(args)
            .arg("-u")
            .arg(&unix)
            .args(["-l", "127.0.0.1:0"])
            // Colour codes would get in the way of parsing the listening lines.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", ramnbd_bin().display()));

        let log = Arc::new(LogBuffer::default());
        let stderr = child.stderr.take().expect("stderr is piped");
        let sink = Arc::clone(&log);
        thread::Builder::new()
            .name(format!("ramnbd-{}-stderr", child.id()))
            .spawn(move || {
                for line in BufReader::new(stderr).split(b'\n') {
                    let Ok(line) = line else { break };
                    let mut text = sink.text.lock().unwrap_or_else(|p| p.into_inner());
                    text.push_str(&String::from_utf8_lossy(&line));
                    text.push('\n');
                    sink.grew.notify_all();
                }
                // EOF: wake a waiter so it notices the exit promptly.
                sink.grew.notify_all();
            })
            .expect("spawn the stderr reader thread");

        let mut server = Server {
            child,
            log,
            tcp: SocketAddr::from(([0, 0, 0, 0], 0)),
            unix: unix.clone(),
            exit: None,
            _dir: dir,
        };
        let (tcp, unix_seen) = server.wait_for_listeners();
        assert_eq!(
            unix_seen,
            unix,
            "server reported a different unix socket path\n{}",
            server.stderr_text()
        );
        server.tcp = tcp;
        server
    }

    /// Waits for `listening on tcp ADDR` and `listening on unix PATH`.
    fn wait_for_listeners(&mut self) -> (SocketAddr, PathBuf) {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let text = strip_ansi(&self.stderr_text());
            let tcp = find_after(&text, "listening on tcp ").map(|addr| {
                addr.parse::<SocketAddr>()
                    .unwrap_or_else(|e| panic!("bad tcp address {addr:?} in server log: {e}"))
            });
            let unix = find_after(&text, "listening on unix ").map(PathBuf::from);
            if let (Some(tcp), Some(unix)) = (tcp, unix) {
                return (tcp, unix);
            }
            if let Some(status) = self.child.try_wait().expect("poll the server process") {
                self.exit = Some(status);
                panic!("ramnbd exited during startup with {status}; stderr:\n{text}");
            }
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "ramnbd did not print both listening lines within {STARTUP_TIMEOUT:?}; stderr:\n{text}"
                );
            }
            let guard = self.log.text.lock().unwrap_or_else(|p| p.into_inner());
            // Re-check happens at the top of the loop; the timeout also bounds a missed wakeup.
            let wait = (deadline - now).min(Duration::from_millis(100));
            drop(self.log.grew.wait_timeout(guard, wait));
        }
    }

    /// The TCP listener's address (`127.0.0.1:PORT`).
    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp
    }

    /// The Unix socket's path.
    pub fn unix_path(&self) -> &Path {
        &self.unix
    }

    /// Where the raw client should connect over TCP.
    pub fn tcp(&self) -> Target {
        Target::Tcp(self.tcp)
    }

    /// Where the raw client should connect over the Unix socket.
    pub fn unix(&self) -> Target {
        Target::Unix(self.unix.clone())
    }

    /// `nbd://127.0.0.1:PORT/NAME` (libnbd, qemu and fio all accept this form).
    pub fn tcp_uri(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.tcp, export)
    }

    /// `nbd+unix:///NAME?socket=PATH`.
    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{}?socket={}", export, self.unix.display())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Current resident set size of the server process.
    pub fn rss_bytes(&self) -> u64 {
        self.proc_status_kib("VmRSS") * 1024
    }

    /// Peak resident set size (VmHWM) since the server started: catches a buffer that was
    /// allocated, touched and freed between two `rss_bytes` samples.
    pub fn peak_rss_bytes(&self) -> u64 {
        self.proc_status_kib("VmHWM") * 1024
    }

    fn proc_status_kib(&self, field: &str) -> u64 {
        let path = format!("/proc/{}/status", self.pid());
        let status =
            fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
        status
            .lines()
            .find_map(|line| {
                let rest = line.strip_prefix(field)?.strip_prefix(':')?;
                rest.trim().strip_suffix("kB")?.trim().parse().ok()
            })
            .unwrap_or_else(|| panic!("no {field} in {path}:\n{status}"))
    }

    /// Everything the server wrote to stderr so far.
    pub fn stderr_text(&self) -> String {
        self.log
            .text
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits up to `timeout` for a stderr line containing `needle` (for log lines printed after
    /// the listeners are up) and returns that line. Panics with the log if it never appears.
    pub fn wait_for_stderr(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut text = self.log.text.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(line) = strip_ansi(&text).lines().find(|l| l.contains(needle)) {
                return line.to_owned();
            }
            let now = Instant::now();
            if now >= deadline {
                panic!("no stderr line containing {needle:?} within {timeout:?}:\n{text}");
            }
            text = self
                .log
                .grew
                .wait_timeout(text, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        if self.exit.is_some() {
            return false;
        }
        match self.child.try_wait().expect("poll the server process") {
            Some(status) => {
                self.exit = Some(status);
                false
            }
            None => true,
        }
    }

    /// Sends SIGTERM and waits for the exit. Panics if the server does not exit in time.
    pub fn terminate(&mut self) -> ExitStatus {
        if let Some(status) = self.exit {
            return status;
        }
        self.signal(Signal::TERM);
        match self.wait_timeout(SHUTDOWN_TIMEOUT) {
            Some(status) => status,
            None => panic!(
                "ramnbd did not exit within {SHUTDOWN_TIMEOUT:?} of SIGTERM; stderr:\n{}",
                self.stderr_text()
            ),
        }
    }

    /// Sends `signal` to the server (which may already have exited).
    pub fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(self.pid() as i32).expect("a child pid is positive");
        // ESRCH only means it already exited; try_wait will report that.
        let _ = kill_process(pid, signal);
    }

    /// Waits up to `timeout` for the server to exit; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the server process") {
                self.exit = Some(status);
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.exit.is_none() {
            self.signal(Signal::TERM);
            if self.wait_timeout(SHUTDOWN_TIMEOUT).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
                eprintln!("ramnbd (pid {}) ignored SIGTERM and was killed", self.pid());
            }
        }
        if thread::panicking() {
            eprintln!(
                "---- ramnbd (pid {}) stderr ----\n{}---- end of ramnbd stderr ----",
                self.pid(),
                self.stderr_text()
            );
        }
    }
}

/// Removes ANSI escape sequences (`ESC [ ... letter`), in case the server colours its log even
/// with `NO_COLOR` set.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // Skip the CSI parameters up to and including the final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The whitespace-delimited word after `marker` on the first line containing it.
fn find_after<'a>(text: &'a str, marker: &str) -> Option<&'a str> {
    text.lines().find_map(|line| {
        let start = line.find(marker)? + marker.len();
        line[start..].split_whitespace().next()
    })
}

#[cfg(test)]
mod tests {
    use super::{find_after, strip_ansi};

    #[test]
    fn listening_lines_are_found_with_tracing_prefixes() {
        let log = "2026-11-26T05:00:00Z  INFO ramnbd::server: listening on tcp 127.0.0.1:4242\n\
                   INFO listening on unix /tmp/x/ramnbd.sock\n";
        assert_eq!(find_after(log, "listening on tcp "), Some("127.0.0.1:4242"));
        assert_eq!(
            find_after(log, "listening on unix "),
            Some("/tmp/x/ramnbd.sock")
        );
        assert_eq!(find_after(log, "listening on vsock "), None);
    }

    #[test]
    fn ansi_colour_codes_are_stripped() {
        let log = "\x1b[32m INFO\x1b[0m listening on tcp \x1b[3m127.0.0.1:1\x1b[0m";
        assert_eq!(
            find_after(&strip_ansi(log), "listening on tcp "),
            Some("127.0.0.1:1")
        );
    }
}
