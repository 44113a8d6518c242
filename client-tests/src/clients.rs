//! The two generations of NBD clients the interop tests drive.
//!
//! Debian 12's clients (libnbd 1.14, qemu 7.2, fio 3.33) are what the host has installed; none of
//! them negotiates extended headers. Debian 13's (libnbd 1.22, qemu 10.0, fio 3.39) do, and they
//! are what current distributions ship, so every libnbd, qemu and fio test runs with both:
//! Debian 13's live in a debootstrapped folder built by `client-tests/trixie/build.sh` and run
//! through `client-tests/trixie/run`, which shares the host's `/tmp` (Unix sockets, images) and
//! loopback network. Paths handed to a Debian 13 client must therefore lie under `/tmp`.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::server::{Server, workspace_root};
use crate::tools::{require_tool, run_command, run_command_ok};

/// One generation of client programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Clients {
    /// Debian 12 (bookworm): the host's own packages.
    Debian12,
    /// Debian 13 (trixie): the folder built by `client-tests/trixie/build.sh`.
    Debian13,
}

/// The Python interpreter whose `nbd` module is Debian's python3-libnbd. On the host the first
/// `python3` on PATH may be another build without that module, so it is named by path.
pub const PYTHON: &str = "/usr/bin/python3";

impl Clients {
    /// Both generations, oldest first.
    pub const ALL: [Clients; 2] = [Clients::Debian12, Clients::Debian13];

    /// "Debian 12" or "Debian 13", for messages.
    pub fn name(self) -> &'static str {
        match self {
            Clients::Debian12 => "Debian 12",
            Clients::Debian13 => "Debian 13",
        }
    }

    /// A `Command` that runs `program` (a name like `nbdinfo`, or [`PYTHON`]) of this generation.
    /// Fails the test, saying how to fix it, when the program is not installed; prints the
    /// program's version once per test.
    pub fn command(self, program: &str) -> Command {
        self.require(program);
        self.report_version(program);
        self.raw_command(program)
    }

    /// Fails the test, saying how to fix it, unless `program` of this generation is installed.
    fn require(self, program: &str) {
        let package = debian_package(program);
        match self {
            Clients::Debian12 => {
                require_tool(program, package);
            }
            Clients::Debian13 => {
                let root = trixie_root();
                let found = if program.contains('/') {
                    root.join(program.trim_start_matches('/')).is_file()
                } else {
                    ["usr/bin", "usr/sbin"]
                        .iter()
                        .any(|dir| root.join(dir).join(program).is_file())
                };
                assert!(
                    found,
                    "`{program}` is missing from the Debian 13 client folder {}: add Debian \
                     package {package} to PACKAGES in client-tests/trixie/build.sh and rerun it",
                    root.display()
                );
                // Unix sockets and files are only shared through /tmp (see the module docs).
                let tmp = std::env::temp_dir();
                assert!(
                    tmp.starts_with("/tmp"),
                    "TMPDIR={} is outside /tmp, which Debian 13 clients cannot see: unset TMPDIR",
                    tmp.display()
                );
            }
        }
        if program == PYTHON {
            let output = self
                .raw_command(PYTHON)
                .args(["-c", "import nbd"])
                .output()
                .expect("run python3");
            assert!(
                output.status.success(),
                "{}'s {PYTHON} has no nbd module: install Debian package python3-libnbd\n{}",
                self.name(),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }

    /// The command line for `program`, unchecked.
    fn raw_command(self, program: &str) -> Command {
        match self {
            Clients::Debian12 => Command::new(program),
            Clients::Debian13 => {
                let mut command = Command::new(workspace_root().join("client-tests/trixie/run"));
                command.arg(program);
                command
            }
        }
    }

    /// Runs `program ARGS` of this generation, reporting it like [`crate::tools::run`].
    pub fn run<S: AsRef<OsStr>>(self, program: &str, args: &[S]) -> Output {
        run_command(self.command(program).args(args))
    }

    /// Runs a qemu tool (qemu-io, qemu-img) of this generation; returns (success, stdout and
    /// stderr). qemu-io reports a failed command in its output while exiting 0 on some
    /// versions, so success needs a zero exit and no "failed" or "error" in the output.
    pub fn run_qemu<S: AsRef<OsStr>>(self, program: &str, args: &[S]) -> (bool, String) {
        let output = self.run(program, args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let ok = output.status.success() && !text.contains("failed") && !text.contains("error");
        (ok, text)
    }

    /// Runs `program ARGS` of this generation, which must succeed; returns its stdout.
    pub fn run_ok<S: AsRef<OsStr>>(self, program: &str, args: &[S]) -> String {
        run_command_ok(self.command(program).args(args))
    }

    /// Runs a Python script with libnbd's `nbd` module; it must succeed and print `ok_line`.
    /// Returns its stdout.
    pub fn python_ok<S: AsRef<OsStr>>(self, script: &str, args: &[S], ok_line: &str) -> String {
        let mut command = self.command(PYTHON);
        command.arg("-c").arg(script).args(args);
        let stdout = run_command_ok(&mut command);
        assert!(
            stdout.lines().any(|line| line == ok_line),
            "the script did not print {ok_line:?}:\n{stdout}"
        );
        stdout
    }

    /// Checks in the server's log ("transmission started mode=...") that this generation's
    /// clients got the headers they should: extended headers for at least one of Debian 13's
    /// connections, none for Debian 12's. Without it a Debian 13 test that quietly fell back to
    /// compact headers would only repeat the Debian 12 one.
    pub fn assert_headers(self, server: &Server) {
        const EXTENDED: &str = "mode=Extended";
        match self {
            // The line is written before the first reply, but the harness reads the server's
            // stderr on a thread of its own: wait for it rather than race that thread.
            Clients::Debian13 => {
                server.wait_for_stderr(EXTENDED, Duration::from_secs(10));
            }
            Clients::Debian12 => {
                let log = server.stderr_text();
                assert!(
                    !log.contains(EXTENDED),
                    "a Debian 12 client negotiated extended headers:\n{log}"
                );
            }
        }
    }

    /// Prints `program`'s version into the test's output, once per test (each test runs on a
    /// thread of its own) and looked up once per process.
    fn report_version(self, program: &str) {
        thread_local! {
            static REPORTED: RefCell<HashSet<(Clients, String)>> = RefCell::new(HashSet::new());
        }
        let first = REPORTED.with(|seen| seen.borrow_mut().insert((self, program.to_owned())));
        if first {
            eprintln!("{} {program}: {}", self.name(), self.version(program));
        }
    }

    /// The first line of `program --version` (libnbd's version for [`PYTHON`]).
    pub fn version(self, program: &str) -> String {
        static VERSIONS: OnceLock<Mutex<HashMap<(Clients, String), String>>> = OnceLock::new();
        let versions = VERSIONS.get_or_init(Default::default);
        let key = (self, program.to_owned());
        if let Some(version) = versions.lock().unwrap().get(&key) {
            return version.clone();
        }
        let args: &[&str] = if program == PYTHON {
            &["-c", "import nbd; print('libnbd', nbd.NBD().get_version())"]
        } else {
            &["--version"]
        };
        let output = self
            .raw_command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program} --version: {e}"));
        let version = String::from_utf8_lossy(&output.stdout)
            .lines()
            .next()
            .unwrap_or("(no version printed)")
            .to_owned();
        versions.lock().unwrap().insert(key, version.clone());
        version
    }
}

/// The Debian package that provides `program`, for the message when it is missing.
fn debian_package(program: &str) -> &'static str {
    match program {
        "nbdinfo" | "nbdcopy" | "nbdsh" => "libnbd-bin",
        "qemu-io" | "qemu-img" => "qemu-utils",
        "fio" => "fio",
        "nbdkit" => "nbdkit",
        PYTHON => "python3-libnbd",
        "setpriv" => "util-linux",
        _ => panic!("client program {program} has no Debian package in client-tests' table"),
    }
}

/// The Debian 13 root; fails the test when it has not been built.
fn trixie_root() -> PathBuf {
    let root = workspace_root().join("client-tests/.cache/trixie/root");
    require_trixie_root(&root);
    root
}

fn require_trixie_root(root: &Path) {
    // build.sh writes the stamp last, so a half-built folder has none.
    assert!(
        root.join(".ramnbd-stamp").is_file(),
        "there is no Debian 13 client folder at {}: run client-tests/trixie/build.sh (as root; it \
         needs Debian package debootstrap and about 450 MiB)",
        root.display()
    );
}

/// Defines, for each named test body `fn NAME(clients: Clients)`, a module `NAME` with the tests
/// `debian12` and `debian13`, which run the body with that generation's clients: the test names
/// are then `NAME::debian12` and `NAME::debian13`, and `cargo test debian13` picks one
/// generation.
#[macro_export]
macro_rules! both_generations {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[test]
            fn debian12() {
                super::$name($crate::Clients::Debian12)
            }

            #[test]
            fn debian13() {
                super::$name($crate::Clients::Debian13)
            }
        }
    )+};
}

#[cfg(test)]
mod tests {
    use super::*;

    fn panic_message(f: impl FnOnce() + std::panic::UnwindSafe) -> String {
        let err = std::panic::catch_unwind(f).expect_err("must panic");
        err.downcast_ref::<String>().expect("string panic").clone()
    }

    #[test]
    fn a_missing_debian_13_folder_says_how_to_build_it() {
        let message = panic_message(|| require_trixie_root(Path::new("/nonexistent/root")));
        assert!(
            message.contains("run client-tests/trixie/build.sh"),
            "{message}"
        );
    }

    #[test]
    fn debian_13_programs_run_through_the_wrapper() {
        let command = Clients::Debian13.raw_command("qemu-img");
        assert_eq!(
            command.get_program(),
            workspace_root().join("client-tests/trixie/run")
        );
        assert_eq!(command.get_args().collect::<Vec<_>>(), ["qemu-img"]);
        assert_eq!(
            Clients::Debian12.raw_command("qemu-img").get_program(),
            "qemu-img"
        );
    }

    #[test]
    fn every_client_program_names_its_package() {
        assert_eq!(debian_package("nbdcopy"), "libnbd-bin");
        assert_eq!(debian_package("qemu-io"), "qemu-utils");
        assert_eq!(debian_package(PYTHON), "python3-libnbd");
        let message = panic_message(|| {
            debian_package("no-such-client");
        });
        assert!(message.contains("no Debian package"), "{message}");
    }
}
