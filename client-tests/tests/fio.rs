//! fio's `nbd` engine (libnbd underneath; one connection per job) with data verification, each
//! test with Debian 12's fio 3.33 on libnbd 1.14 and Debian 13's fio 3.39 on libnbd 1.22
//! (extended headers).

use ramnbd_client_tests::{Clients, MIB, Negotiate, Server, both_generations, random_bytes};
use serde_json::Value;

/// Per job: (error code, bytes written, bytes read).
#[derive(Debug)]
struct JobResult {
    error: u64,
    written: u64,
    read: u64,
}

/// Runs fio with JSON output; returns (exit success, per-job results, full output for messages).
fn fio(clients: Clients, args: &[&str]) -> (bool, Vec<JobResult>, String) {
    // No verify state files: fio would drop them in the working directory (the crate root).
    let mut all = vec![
        "--output-format=json",
        "--ioengine=nbd",
        "--verify_state_save=0",
    ];
    all.extend_from_slice(args);
    let output = clients.run("fio", &all);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let shown = format!("{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    // fio prints "fio: connected to NBD server" lines before the JSON document.
    let start = stdout
        .find('{')
        .unwrap_or_else(|| panic!("no JSON in fio's output:\n{shown}"));
    let report: Value = serde_json::Deserializer::from_str(&stdout[start..])
        .into_iter()
        .next()
        .expect("a JSON document")
        .unwrap_or_else(|e| panic!("fio JSON ({e}):\n{shown}"));
    let jobs = report["jobs"]
        .as_array()
        .unwrap_or_else(|| panic!("no jobs in fio's report:\n{shown}"))
        .iter()
        .map(|job| JobResult {
            error: job["error"].as_u64().expect("error"),
            written: job["write"]["io_bytes"].as_u64().expect("write io_bytes"),
            read: job["read"]["io_bytes"].as_u64().expect("read io_bytes"),
        })
        .collect();
    (output.status.success(), jobs, shown)
}

fn fio_randwrite_verify_over_four_connections(clients: Clients) {
    let server = Server::start(&["-s", "256M"]);
    let uri = format!("--uri={}", server.unix_uri(""));
    // Four jobs on disjoint 64 MiB slices (verification of overlapping jobs would race), each
    // writing its slice in random order and then reading all of it back through crc32c.
    let (ok, jobs, out) = fio(
        clients,
        &[
            "--name=verify4",
            &uri,
            "--rw=randwrite",
            "--bsrange=4k-64k",
            "--iodepth=16",
            "--numjobs=4",
            "--size=64M",
            "--offset_increment=64M",
            "--verify=crc32c",
            "--verify_fatal=1",
        ],
    );
    assert!(ok, "fio failed:\n{out}");
    assert_eq!(jobs.len(), 4, "{out}");
    for job in &jobs {
        assert_eq!(job.error, 0, "{job:?}\n{out}");
        assert_eq!(job.written, 64 * MIB, "{job:?}");
        // Every written byte was read back for verification.
        assert_eq!(job.read, 64 * MIB, "{job:?}");
    }
    clients.assert_headers(&server);
}

fn fio_inline_verify_at_depth_64_over_tcp(clients: Clients) {
    let server = Server::start(&["-e", "fio=128M"]);
    let uri = format!("--uri={}", server.tcp_uri("fio"));
    let (ok, jobs, out) = fio(
        clients,
        &[
            "--name=backlog",
            &uri,
            "--rw=randwrite",
            "--bsrange=512-128k",
            "--bs_unaligned=1",
            "--iodepth=64",
            "--numjobs=2",
            "--size=48M",
            "--offset_increment=64M",
            "--verify=crc32c",
            // Verify while writing, not only at the end.
            "--verify_backlog=64",
            "--verify_fatal=1",
        ],
    );
    assert!(ok, "fio failed:\n{out}");
    assert_eq!(jobs.len(), 2, "{out}");
    for job in &jobs {
        assert_eq!(job.error, 0, "{job:?}\n{out}");
        // Unaligned random block sizes stop a little short of the size.
        assert!(job.written > 47 * MIB, "{job:?}");
        assert_eq!(
            job.read, job.written,
            "everything written was verified: {job:?}"
        );
    }
    clients.assert_headers(&server);
}

fn fio_verify_reports_corruption(clients: Clients) {
    // The negative control: corrupt what fio wrote and check that its verify pass (replaying the
    // same random sequence) reports it, so a clean report above really means clean data.
    let server = Server::start(&["-s", "64M"]);
    let uri = format!("--uri={}", server.unix_uri(""));
    let job = [
        "--name=corrupt",
        uri.as_str(),
        "--rw=randwrite",
        "--bsrange=4k-64k",
        "--iodepth=16",
        "--size=16M",
        "--verify=crc32c",
    ];
    let mut write_phase = job.to_vec();
    write_phase.push("--do_verify=0");
    let (ok, jobs, out) = fio(clients, &write_phase);
    assert!(ok && jobs[0].error == 0, "write phase failed:\n{out}");

    let mut client = Negotiate::new("").go(&server.tcp());
    client
        .write(MIB, &random_bytes(99, 64 * 1024))
        .expect("corrupt 64 KiB");

    let mut verify_phase = job.to_vec();
    verify_phase.push("--verify_only");
    let (ok, jobs, out) = fio(clients, &verify_phase);
    assert!(!ok, "fio accepted corrupted data:\n{out}");
    const EILSEQ: u64 = 84;
    assert_eq!(jobs[0].error, EILSEQ, "{out}");
}
both_generations!(
    fio_randwrite_verify_over_four_connections,
    fio_inline_verify_at_depth_64_over_tcp,
    fio_verify_reports_corruption,
);
