//! The configuration file as an operator meets it: `--check-config` exit codes and messages,
//! the shipped example, bad files of every kind through the real binary, and command-line flags
//! overriding the file in a running server (checked with nbdinfo).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ramnbd_client_tests::server::{ramnbd_bin, workspace_root};
use ramnbd_client_tests::{MIB, Server, require_tool, run_ok};

fn ramnbd(args: &[&str]) -> Output {
    let out = Command::new(ramnbd_bin())
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run ramnbd");
    eprintln!(
        "$ ramnbd {}\n  -> {}\n  stdout: {}\n  stderr: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, text).expect("write the config file");
    path
}

#[test]
fn the_shipped_example_passes_check_config() {
    let example = workspace_root().join("config/ramnbd.toml");
    let out = ramnbd(&["--check-config", example.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("ramnbd.toml: OK"), "{stdout}");
    assert!(stdout.contains("exports: \"scratch\" 4 GiB"), "{stdout}");
    assert!(
        stdout.contains("listen: tcp 127.0.0.1:10809, unix /run/ramnbd/ramnbd.sock"),
        "{stdout}"
    );
    // -t is the short form, and --config FILE is what it checks when no FILE follows.
    let out = ramnbd(&["-c", example.to_str().unwrap(), "-t"]);
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn check_config_without_a_file_checks_the_builtin_default() {
    let out = ramnbd(&["--no-config", "--check-config"]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("built-in defaults (no config file): OK"),
        "{stdout}"
    );
    assert!(stdout.contains("exports: \"\" 1 GiB"), "{stdout}");
    assert!(stdout.contains("listen: tcp 127.0.0.1:10809"), "{stdout}");
}

/// Each bad file: exit status 1 and a message with the file, the line, the key and a fix.
#[test]
fn bad_files_are_refused_with_file_line_key_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "unknown-key.toml",
            "[[export]]\nname = \"a\"\nsize = \"1G\"\nread_only = true\n",
            ":4:1: export[0].read_only: unknown field `read_only`, expected one of",
            "fix: remove the key or correct its spelling",
        ),
        (
            "unknown-section.toml",
            "[listen]\ntcp = [\"127.0.0.1:10809\"]\n\n[metric]\nlisten = \"127.0.0.1:9109\"\n",
            ":4:2: metric: unknown field `metric`",
            "fix: remove the key or correct its spelling",
        ),
        (
            "bad-size.toml",
            "[[export]]\nname = \"a\"\nsize = \"4GG\"\n",
            ":3:8: export[0].size: bad size \"4GG\"",
            "fix: write a size with binary units",
        ),
        (
            "zero-size.toml",
            "[[export]]\nname = \"a\"\nsize = 0\n",
            ":3:8: export[0].size: bad size \"0\": size must be greater than zero",
            "fix: write a size with binary units",
        ),
        (
            "bad-max-memory.toml",
            "[memory]\nmax-memory = \"half\"\n",
            ":2:14: memory.max-memory: bad size \"half\"",
            "fix: write a size",
        ),
        (
            "duplicate-export.toml",
            "[[export]]\nname = \"disk\"\nsize = \"1G\"\n\n[[export]]\nname = \"disk\"\nsize = \"2G\"\n",
            ":6:8: export[1].name: export name \"disk\" is used twice (first at line 2)",
            "fix: give every [[export]] its own name",
        ),
        (
            "colliding-listeners.toml",
            "[listen]\ntcp = [\n  \"[::]:10809\",\n  \"127.0.0.1:10809\",\n]\n",
            ":4:3: listen.tcp[1]: \"127.0.0.1:10809\" collides with \"[::]:10809\" (line 3)",
            "fix: listen on each address and port once",
        ),
        (
            "metrics-on-nbd-port.toml",
            "[listen]\ntcp = [\"127.0.0.1:10809\"]\n[metrics]\nlisten = \"127.0.0.1:10809\"\n",
            ":4:10: metrics.listen: the metrics address \"127.0.0.1:10809\" collides",
            "fix: give metrics a port of its own",
        ),
        (
            "missing-size.toml",
            "[[export]]\nname = \"a\"\n",
            ":1:1: export[0].size: missing field `size`",
            "fix: add the key",
        ),
        (
            "wrong-type.toml",
            "[[export]]\nname = \"a\"\nsize = \"1G\"\nread-only = \"yes\"\n",
            ":4:13: export[0].read-only: invalid type: string \"yes\", expected a boolean",
            "fix: give the value the type named above",
        ),
        (
            "syntax.toml",
            "[server]\nshutdown-grace = 10s\n",
            ":2:",
            "fix: fix the TOML syntax",
        ),
        (
            "bad-grace.toml",
            "[server]\nshutdown-grace = \"a while\"\n",
            ":2:18: server.shutdown-grace: bad duration \"a while\"",
            "fix: write a duration such as \"10s\"",
        ),
    ];
    for &(name, text, location, fix) in cases {
        let path = write(dir.path(), name, text);
        let out = ramnbd(&["--check-config", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{name} must be refused");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let expected = format!("{}{location}", path.display());
        assert!(
            stderr.contains(&expected),
            "{name}: no {expected:?} in\n{stderr}"
        );
        assert!(stderr.contains(fix), "{name}: no {fix:?} in\n{stderr}");
        assert!(
            out.stdout.is_empty(),
            "{name}: nothing on stdout for a bad file"
        );
        // Starting the server with the file fails the same way, before binding anything.
        let out = ramnbd(&["--config", path.to_str().unwrap(), "-l", "127.0.0.1:0"]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{name}: the server must refuse to start"
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains(&expected));
    }
}

#[test]
fn a_missing_file_is_an_error() {
    let out = ramnbd(&["--check-config", "/nonexistent/ramnbd.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot read the config file /nonexistent/ramnbd.toml"),
        "{stderr}"
    );
}

#[test]
fn bad_flags_are_checked_too() {
    let out = ramnbd(&["--no-config", "--check-config", "--metrics", "localhost"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--metrics \"localhost\""));
}

/// A running server built from a file plus flags: the flags win where given, the file's
/// values stay elsewhere.
#[test]
fn flags_override_the_file_in_a_running_server() {
    let nbdinfo = require_tool("nbdinfo", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "ramnbd.toml",
        r#"
[listen]
tcp = ["127.0.0.1:1"]            # replaced by the harness's -l/-u flags

[[export]]
name = "from-file"
size = "3M"
description = "defined in the file"

[[export]]
name = "ro"
size = "1M"
read-only = true
"#,
    );
    let file_arg = file.to_str().unwrap();

    // File only (plus the harness's listeners): both exports, as the file says.
    let server = Server::start(&["--config", file_arg]);
    let list = run_ok(&nbdinfo, &["--list", "--json", &server.unix_uri("")]);
    let json: serde_json::Value = serde_json::from_str(&list).expect("nbdinfo --list --json");
    let exports = json["exports"].as_array().expect("exports array");
    let find = |name: &str| {
        exports
            .iter()
            .find(|e| e["export-name"] == name)
            .unwrap_or_else(|| panic!("no export {name:?} in {list}"))
    };
    assert_eq!(find("from-file")["export-size"], 3 * MIB);
    assert_eq!(find("from-file")["description"], "defined in the file");
    assert_eq!(find("ro")["is_read_only"], true);
    drop(server);

    // --export replaces the file's exports.
    let server = Server::start(&["--config", file_arg, "-e", "from-flags=5M"]);
    let list = run_ok(&nbdinfo, &["--list", "--json", &server.tcp_uri("")]);
    let json: serde_json::Value = serde_json::from_str(&list).unwrap();
    let names: Vec<&str> = json["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["from-flags"], "{list}");
    drop(server);

    // --read-only applies on top of the file's exports.
    let server = Server::start(&["--config", file_arg, "--read-only"]);
    let info = run_ok(&nbdinfo, &["--json", &server.unix_uri("from-file")]);
    let json: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(json["exports"][0]["is_read_only"], true, "{info}");
}

#[test]
fn check_config_shows_the_access_rules_and_the_request_memory_bound() {
    let out = ramnbd(&[
        "--no-config",
        "--check-config",
        "--max-connections",
        "8",
        "--allow",
        "10.0.0.0/8",
        "--tcp-keepalive",
        "2s",
        "-e",
        "a=1M,allow=10.1.0.0/16,allow-uid=0",
        "-e",
        "b=1M",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("tcp clients allowed from: 10.0.0.0/8\n"),
        "{text}"
    );
    assert!(
        text.contains("export access: \"a\": tcp from 10.1.0.0/16 or uid 0, \"b\": all\n"),
        "{text}"
    );
    assert!(
        text.contains("2s idle, then 3 probes 2s apart (a vanished client is closed within 8s)"),
        "{text}"
    );
    // 1 MiB + 4 KiB received, 512 KiB + 2 KiB sent: 1542 KiB a connection.
    assert!(
        text.contains("at most 1542 KiB per connection, 12336 KiB for all 8"),
        "{text}"
    );
}
