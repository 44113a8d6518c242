//! External client programs and test data.

use std::env;
use std::ffi::OsStr;
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
    let program = program.as_ref();
    let shown = describe(program, args);
    let started = Instant::now();
    let output = Command::new(program)
        .args(args)
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

/// Runs a command that must succeed; returns its stdout.
pub fn run_ok<S: AsRef<OsStr>>(program: impl AsRef<OsStr>, args: &[S]) -> String {
    let shown = describe(program.as_ref(), args);
    let output = run(program, args);
    assert!(
        output.status.success(),
        "{shown} failed with {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn describe<S: AsRef<OsStr>>(program: &OsStr, args: &[S]) -> String {
    let mut shown = program.to_string_lossy().into_owned();
    for arg in args {
        shown.push(' ');
        shown.push_str(&arg.as_ref().to_string_lossy());
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
