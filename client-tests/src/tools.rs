//! External client programs and test data.

use std::env;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

/// Where `binary` is on PATH (or the path itself, if it contains a slash and exists).
pub fn find_tool(binary: &str) -> Option<PathBuf> {
    if binary.contains('/') {
        let path = PathBuf::from(binary);
        return path.is_file().then_some(path);
    }
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join(binary))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Fails the test unless `binary` is installed. Interop tests never skip: a missing client is a
/// broken test machine, and the message says how to fix it.
pub fn require_tool(binary: &str, debian_package: &str) -> PathBuf {
    find_tool(binary).unwrap_or_else(|| {
        panic!(
            "`{binary}` is not installed: install Debian package {debian_package} \
             (apt-get install {debian_package})"
        )
    })
}

/// Runs a command to completion with its output captured; returns the output whatever the exit
/// status. The command line, status, duration and output go to the test's captured output so a
/// failure shows them.
pub fn run<S: AsRef<OsStr>>(program: impl AsRef<OsStr>, args: &[S]) -> Output {
    run_command(Command::new(program).args(args))
}

/// Runs a command that must succeed; returns its stdout.
pub fn run_ok<S: AsRef<OsStr>>(program: impl AsRef<OsStr>, args: &[S]) -> String {
    run_command_ok(Command::new(program).args(args))
}

/// [`run`] for a prepared `Command` (e.g. from [`crate::Clients::command`]).
pub fn run_command(command: &mut Command) -> Output {
    let shown = describe(command);
    let started = Instant::now();
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    eprintln!(
        "$ {shown}\n  -> {} in {:.2?}\n  stdout: {}\n  stderr: {}",
        output.status,
        started.elapsed(),
        excerpt(&output.stdout),
        excerpt(&output.stderr)
    );
    output
}

/// [`run_ok`] for a prepared `Command`.
pub fn run_command_ok(command: &mut Command) -> String {
    let output = run_command(command);
    assert!(
        output.status.success(),
        "{} failed with {}\nstdout:\n{}\nstderr:\n{}",
        describe(command),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The command line for messages. A multi-line argument (a script passed with `-c`) is shown as
/// its line count: it is in the test's source, and printing it whole would drown the output.
fn describe(command: &Command) -> String {
    let mut shown = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        let arg = arg.to_string_lossy();
        shown.push(' ');
        match arg.lines().count() {
            0 | 1 => shown.push_str(&arg),
            lines => shown.push_str(&format!("'<script of {lines} lines>'")),
        }
    }
    shown
}

fn excerpt(bytes: &[u8]) -> String {
    const LIMIT: usize = 4000;
    let text = String::from_utf8_lossy(bytes);
    if text.len() <= LIMIT {
        text.trim_end().to_owned()
    } else {
        let cut = (0..=LIMIT)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        format!("{}... ({} bytes)", &text[..cut], text.len())
    }
}

/// `len` bytes from a small, fast generator seeded with `seed` (reproducible test data, not
/// cryptographic). No zero runs to speak of, so it never looks like a hole.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    // SplitMix64: good enough statistics for test data, and fast in unoptimised builds.
    let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `len` bytes (a multiple of 4 MiB) of reproducible random data to `path`: a disk image
/// for the copy tests.
pub fn write_random_file(path: &Path, seed: u64, len: u64) {
    const BLOCK: u64 = 4 << 20;
    assert_eq!(len % BLOCK, 0, "image sizes are whole 4 MiB blocks");
    let mut file = BufWriter::new(File::create(path).expect("create image"));
    for i in 0..len / BLOCK {
        file.write_all(&random_bytes(seed + i, BLOCK as usize))
            .expect("write image");
    }
    file.flush().expect("flush image");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_bytes_are_reproducible_and_seed_dependent() {
        assert_eq!(random_bytes(1, 100), random_bytes(1, 100));
        assert_ne!(random_bytes(1, 100), random_bytes(2, 100));
        assert_eq!(random_bytes(3, 13).len(), 13);
    }

    #[test]
    fn a_missing_tool_names_its_package() {
        let err = std::panic::catch_unwind(|| require_tool("no-such-tool-xyz", "pkg-xyz"))
            .expect_err("must panic");
        let message = err.downcast_ref::<String>().expect("string panic");
        assert!(
            message.contains("install Debian package pkg-xyz"),
            "{message}"
        );
    }

    #[test]
    fn an_installed_tool_is_found() {
        assert!(find_tool("sh").is_some());
    }
}
