//! The systemd units, checked on the host with systemd's own tools (no systemd as PID 1
//! needed): `systemd-analyze verify` (syntax, dependencies, ordering cycles, binaries),
//! and `systemd-analyze security` (the service's exposure). The Debian package that installs
//! them is checked by `client-tests/package/run.sh`; the units run for real under systemd,
//! installed from that package, in `client-tests/systemd-vm/run.sh`.

use std::fs;
use std::path::Path;
use std::process::Command;

use ramnbd_client_tests::require_tool;
use ramnbd_client_tests::server::{ramnbd_bin, workspace_root};

const UNITS: [&str; 6] = [
    "ramnbd.socket",
    "ramnbd.service",
    "ramnbd-attach@.service",
    "ramnbd-attach-persist@.service",
    "ramnbd-mkfs@.service",
    "mnt-ramdisk.mount",
];
/// What `verify` loads: the templates as instances, the way the mount unit uses them.
const VERIFY: [&str; 6] = [
    "ramnbd.socket",
    "ramnbd.service",
    "ramnbd-attach@nbd0.service",
    "ramnbd-attach-persist@nbd1.service",
    "ramnbd-mkfs@nbd0.service",
    "mnt-ramdisk.mount",
];

/// The units copied to `dir`, with ExecStart= pointing at the binary under test (verify
/// checks that executables exist).
fn stage_units(dir: &Path) {
    for unit in UNITS {
        let text = fs::read_to_string(workspace_root().join("systemd").join(unit)).unwrap();
        let text = text.replace("/usr/bin/ramnbd", ramnbd_bin().to_str().unwrap());
        fs::write(dir.join(unit), text).unwrap();
    }
}

/// `systemd-analyze verify` on the units in `dir`: (success, everything it printed).
fn verify(dir: &Path) -> (bool, String) {
    let analyze = require_tool("systemd-analyze", "systemd");
    let out = Command::new(analyze)
        .arg("verify")
        .arg("--man=no")
        .args(VERIFY.iter().map(|u| format!("./{u}")))
        .current_dir(dir)
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("systemd-analyze verify: {}\n{text}", out.status);
    (out.status.success(), text)
}

#[test]
fn units_pass_systemd_analyze_verify_without_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    stage_units(dir.path());
    let (ok, text) = verify(dir.path());
    assert!(ok && text.trim().is_empty(), "verify complained:\n{text}");
}

/// The check above would catch the classic mistake: a local mount of the NBD device is an
/// ordering cycle (a local mount is ordered before local-fs.target, but the socket, server,
/// client and mkfs units it needs come after sysinit.target, which is after local-fs.target).
#[test]
fn verify_catches_a_mount_without_netdev() {
    let dir = tempfile::tempdir().unwrap();
    stage_units(dir.path());
    let mount = dir.path().join("mnt-ramdisk.mount");
    let text = fs::read_to_string(&mount).unwrap();
    assert!(text.contains("Options=_netdev,"));
    fs::write(&mount, text.replace("Options=_netdev,", "Options=")).unwrap();
    let (ok, text) = verify(dir.path());
    assert!(!ok, "verify accepted a cyclic mount");
    // Where systemd starts reporting the cycle varies; it always runs through these.
    for part in [
        "Found ordering cycle",
        "local-fs.target/start",
        "Found dependency on mnt-ramdisk.mount/start",
    ] {
        assert!(
            text.contains(part),
            "no {part:?} in:
{text}"
        );
    }
}

#[test]
fn the_service_is_well_confined() {
    let analyze = require_tool("systemd-analyze", "systemd");
    let dir = tempfile::tempdir().unwrap();
    stage_units(dir.path());
    let out = Command::new(analyze)
        .args([
            "security",
            "--offline=yes",
            "--no-pager",
            "./ramnbd.service",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level for ramnbd.service"))
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    let level: f64 = line
        .split(": ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse {line:?}"));
    eprintln!("{line}");
    // 0 is fully confined, 10 is unconfined; systemd calls below 2 "OK".
    assert!(level <= 2.0, "exposure {level}:\n{text}");
}

#[test]
fn the_units_say_what_the_issue_asks_for() {
    let read =
        |unit: &str| fs::read_to_string(workspace_root().join("systemd").join(unit)).unwrap();
    let service = read("ramnbd.service");
    for line in [
        "Type=notify",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "DynamicUser=yes",
        "CapabilityBoundingSet=CAP_SYS_RESOURCE\n",
        "MemoryDenyWriteExecute=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "SystemCallFilter=@system-service",
        "ManagedOOMPreference=omit",
        "OOMScoreAdjust=",
        "# LimitMEMLOCK=infinity",
        // Issue 10: the disks wait in the fd store across restarts and crashes.
        "FileDescriptorStoreMax=4096",
        "Restart=on-failure",
    ] {
        assert!(service.contains(line), "ramnbd.service lacks {line:?}");
    }
    let socket = read("ramnbd.socket");
    assert!(socket.contains("ListenStream=127.0.0.1:10809"));
    assert!(socket.contains("ListenStream=/run/ramnbd/ramnbd.sock"));
    let attach = read("ramnbd-attach@.service");
    for line in [
        "Type=oneshot",
        "RemainAfterExit=yes",
        "ExecStop=/usr/sbin/nbd-client -d /dev/%i",
        "After=modprobe@nbd.service network.target ramnbd.socket ramnbd.service",
    ] {
        assert!(
            attach.contains(line),
            "ramnbd-attach@.service lacks {line:?}"
        );
    }
    let persist = read("ramnbd-attach-persist@.service");
    for line in [
        "-nonetlink -persist -nofork",
        "Restart=always",
        "Conflicts=ramnbd-attach@%i.service",
        "ExecStop=/usr/sbin/nbd-client -d /dev/%i",
    ] {
        assert!(
            persist.contains(line),
            "ramnbd-attach-persist@.service lacks {line:?}"
        );
    }
    assert!(read("mnt-ramdisk.mount").contains("Options=_netdev,"));
}
