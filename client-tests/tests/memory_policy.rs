//! The memory model: zero writes cost nothing, only data pages are allocated, the memory cap
//! refuses writes cleanly and recovers after TRIM, mlock locks pages or explains the limit, the
//! memfd backing keeps data in shmem and gives it back on TRIM, and block status follows what
//! the store holds (checked against a model with the raw client and with Debian 12's and
//! Debian 13's `nbdinfo --map`).

use std::process::Command;

use ramnbd_client_tests::{
    Clients, MIB, Negotiate, RawClient, Request, Server, random_bytes, require_tool,
};

const PAGE: u64 = 4096;
const NBD_ENOSPC: u32 = 28;
const STATE_HOLE_ZERO: u64 = 3;

/// Sends `len` bytes of `data_at(i)` chunks at `offset`, eight 1 MiB requests in flight.
fn write_chunks(client: &mut RawClient, offset: u64, len: u64, data_at: impl Fn(u64) -> Vec<u8>) {
    let requests: Vec<Request> = (0..len / MIB)
        .map(|i| Request::write(offset + i * MIB, &data_at(i)))
        .collect();
    for group in requests.chunks(8) {
        for response in client.pipeline(group) {
            assert_eq!(response.result(), Ok(()), "write");
        }
    }
}

/// Reads `expected.len()` bytes at `offset` (in 1 MiB requests) and compares them without
/// dumping megabytes into the failure message.
fn assert_reads(client: &mut RawClient, offset: u64, expected: &[u8], what: &str) {
    for (i, want) in expected.chunks(MIB as usize).enumerate() {
        let at = offset + i as u64 * MIB;
        let got = client
            .read(at, want.len() as u64)
            .unwrap_or_else(|e| panic!("{what}: read error {e}"));
        if let Some(diff) = got.iter().zip(want).position(|(a, b)| a != b) {
            panic!(
                "{what}: byte {} differs (got {}, want {})",
                at + diff as u64,
                got[diff],
                want[diff]
            );
        }
    }
}

fn status_value(server: &Server, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("no {key}"));
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[test]
fn all_zero_writes_cost_no_memory_and_read_back_as_holes() {
    let server = Server::start(&["-s", "4G"]);
    let mut client = Negotiate::new("")
        .structured()
        .base_allocation()
        .go(&server.unix());
    let start = server.rss_bytes();
    write_chunks(&mut client, 0, 256 * MIB, |_| vec![0; MIB as usize]);
    let after = server.rss_bytes();
    assert!(
        after < start + 8 * MIB,
        "256 MiB of zero writes raised RSS from {} to {} MiB",
        start / MIB,
        after / MIB
    );
    assert_reads(&mut client, 100 * MIB, &vec![0; MIB as usize], "read back");
    let extents = client.block_status(0, 256 * MIB, 0).unwrap();
    assert_eq!(extents.len(), 1, "{extents:?}");
    assert_eq!(
        (extents[0].length, extents[0].flags),
        (256 * MIB, STATE_HOLE_ZERO)
    );

    // Zeroes written over data release it again.
    write_chunks(&mut client, 0, 64 * MIB, |i| random_bytes(i, MIB as usize));
    assert!(server.rss_bytes() >= start + 60 * MIB);
    write_chunks(&mut client, 0, 64 * MIB, |_| vec![0; MIB as usize]);
    let released = server.rss_bytes();
    assert!(
        released < start + 8 * MIB,
        "zero overwrite left RSS at {} MiB",
        released / MIB
    );
    assert_reads(&mut client, 0, &vec![0; MIB as usize], "read back");
}

#[test]
fn a_write_with_some_zero_pages_allocates_only_the_data_pages() {
    let server = Server::start(&["-s", "1G"]);
    let mut client = Negotiate::new("")
        .structured()
        .base_allocation()
        .go(&server.unix());
    // 64 MiB where only every fourth page holds data: 16 MiB of data pages.
    let len = 64 * MIB;
    let mut data = vec![0u8; len as usize];
    for page in (0..len / PAGE).step_by(4) {
        let at = (page * PAGE) as usize;
        data[at..at + PAGE as usize].copy_from_slice(&random_bytes(page, PAGE as usize));
    }
    let start = server.rss_bytes();
    for (i, chunk) in data.chunks(MIB as usize).enumerate() {
        client.write(i as u64 * MIB, chunk).expect("write");
    }
    let grown = server.rss_bytes() - start;
    assert!(
        (15 * MIB..=20 * MIB).contains(&grown),
        "a 64 MiB write with 16 MiB of data pages grew RSS by {} MiB",
        grown / MIB
    );
    assert_reads(&mut client, 0, &data, "mixed pages");
    // Block status alternates: one data page, then three hole pages.
    let extents = client.block_status(0, 16 * PAGE, 0).unwrap();
    let expected: Vec<(u64, u64)> = (0..4)
        .flat_map(|_| [(PAGE, 0), (3 * PAGE, STATE_HOLE_ZERO)])
        .collect();
    let got: Vec<(u64, u64)> = extents.iter().map(|e| (e.length, e.flags)).collect();
    assert_eq!(got, expected);
}

#[test]
fn the_memory_cap_refuses_writes_keeps_data_and_recovers_after_trim() {
    let server = Server::start(&["-e", "capped=1G,max-memory=32M", "-e", "free=1G"]);
    let mut capped = Negotiate::new("capped").go(&server.unix());
    let mut free = Negotiate::new("free").go(&server.unix());

    write_chunks(&mut capped, 0, 32 * MIB, |i| {
        random_bytes(100 + i, MIB as usize)
    });
    // The cap is full: a write to a new page fails with ENOSPC...
    assert_eq!(capped.write(512 * MIB, &[1; 4096]), Err(NBD_ENOSPC));
    assert_reads(
        &mut capped,
        512 * MIB,
        &vec![0; 4096],
        "a refused write left data",
    );
    // ...while overwriting held pages and writing zeroes still work,
    capped
        .write(5 * MIB, &random_bytes(7, MIB as usize))
        .expect("overwrite a held page");
    capped
        .write(600 * MIB, &[0; 8192])
        .expect("zeroes need no memory");
    // data written before the cap is intact,
    for i in [0, 13, 31] {
        let expected = if i == 5 {
            random_bytes(7, MIB as usize)
        } else {
            random_bytes(100 + i, MIB as usize)
        };
        assert_reads(&mut capped, i * MIB, &expected, &format!("chunk {i}"));
    }
    // and another export is not affected.
    write_chunks(&mut free, 0, 48 * MIB, |i| {
        random_bytes(200 + i, MIB as usize)
    });
    assert_reads(
        &mut free,
        47 * MIB,
        &random_bytes(247, MIB as usize),
        "read back",
    );

    // TRIM makes room again.
    capped.trim(0, 4 * MIB).expect("trim");
    write_chunks(&mut capped, 512 * MIB, 4 * MIB, |i| {
        random_bytes(300 + i, MIB as usize)
    });
    assert_eq!(capped.write(520 * MIB, &[1; 4096]), Err(NBD_ENOSPC));
    assert_reads(
        &mut capped,
        515 * MIB,
        &random_bytes(303, MIB as usize),
        "read back",
    );
    // The server is still healthy for new clients.
    let mut again = Negotiate::new("capped").go(&server.tcp());
    assert_reads(
        &mut again,
        10 * MIB,
        &random_bytes(110, MIB as usize),
        "read back",
    );
}

#[test]
fn a_global_cap_is_shared_by_all_exports() {
    let server = Server::start(&["--max-memory", "16M", "-e", "a=1G", "-e", "b=1G"]);
    let mut a = Negotiate::new("a").go(&server.unix());
    let mut b = Negotiate::new("b").go(&server.unix());
    write_chunks(&mut a, 0, 12 * MIB, |i| random_bytes(i, MIB as usize));
    write_chunks(&mut b, 0, 4 * MIB, |i| random_bytes(50 + i, MIB as usize));
    assert_eq!(b.write(100 * MIB, &[9; 4096]), Err(NBD_ENOSPC));
    a.trim(0, MIB).expect("trim on a");
    b.write(100 * MIB, &[9; 4096])
        .expect("room made by a's trim");
}

#[test]
fn mlock_locks_pages_and_a_low_limit_is_explained() {
    let server = Server::start(&["--mlock", "-s", "64M"]);
    let mut client = Negotiate::new("").go(&server.unix());
    write_chunks(&mut client, 0, 32 * MIB, |i| random_bytes(i, MIB as usize));
    let locked = status_value(&server, "VmLck:");
    assert!(
        locked >= 32 * MIB,
        "VmLck is {} MiB after writing 32 MiB",
        locked / MIB
    );
    // TRIM still releases locked pages (they are unlocked around MADV_DONTNEED).
    let before = server.rss_bytes();
    client.trim(0, 32 * MIB).expect("trim");
    assert!(
        server.rss_bytes() + 24 * MIB <= before,
        "trim of locked pages freed nothing"
    );
    assert_reads(&mut client, 0, &vec![0; MIB as usize], "read back");

    // Without CAP_IPC_LOCK and with a 1 MiB RLIMIT_MEMLOCK, a 64 MiB mlock'd export cannot start,
    // and the error names the limit and how to raise it.
    let prlimit = require_tool("prlimit", "util-linux");
    let setpriv = require_tool("setpriv", "util-linux");
    let output = Command::new(prlimit)
        .arg("--memlock=1048576:1048576")
        .arg(setpriv)
        .args(["--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock"])
        .arg(ramnbd_client_tests::server::ramnbd_bin())
        .args(["--no-config", "--mlock", "-s", "64M", "-l", "127.0.0.1:0"])
        .output()
        .expect("run ramnbd under prlimit");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "started despite the limit: {stderr}"
    );
    for needle in ["RLIMIT_MEMLOCK", "LimitMEMLOCK", "1048576 bytes"] {
        assert!(
            stderr.contains(needle),
            "error does not mention {needle}: {stderr}"
        );
    }
}

#[test]
fn the_memfd_backing_holds_data_in_shmem_and_trim_frees_it() {
    let server = Server::start(&["--backing", "memfd", "-s", "256M"]);
    let fds = std::fs::read_dir(format!("/proc/{}/fd", server.pid())).unwrap();
    let memfds = fds
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter(|link| link.to_string_lossy().starts_with("/memfd:ramnbd:"))
        .count();
    assert_eq!(memfds, 1, "one memfd for the one export");
    let mut client = Negotiate::new("").go(&server.unix());
    let before = status_value(&server, "RssShmem:");
    write_chunks(&mut client, 0, 32 * MIB, |i| random_bytes(i, MIB as usize));
    let filled = status_value(&server, "RssShmem:");
    assert!(
        filled >= before + 32 * MIB,
        "RssShmem grew by {} KiB for 32 MiB of data",
        (filled - before) / 1024
    );
    assert!(
        status_value(&server, "RssAnon:") < 16 * MIB,
        "the data went to anonymous memory"
    );
    let data: Vec<u8> = (0..4).flat_map(|i| random_bytes(i, MIB as usize)).collect();
    assert_reads(&mut client, 0, &data, "read back");
    // TRIM punches holes: the shmem pages go back.
    client.trim(0, 32 * MIB).expect("trim");
    let trimmed = status_value(&server, "RssShmem:");
    assert!(
        trimmed + 30 * MIB <= filled,
        "trim freed only {} KiB",
        (filled - trimmed) / 1024
    );
    assert_reads(&mut client, 0, &vec![0; MIB as usize], "read after trim");

    // The default, auto, is anonymous memory outside a service manager (the server inherits
    // this process's environment).
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        return;
    }
    let plain = Server::start(&["-s", "64M"]);
    let mut client = Negotiate::new("").go(&plain.unix());
    write_chunks(&mut client, 0, 8 * MIB, |i| random_bytes(i, MIB as usize));
    assert!(
        status_value(&plain, "RssShmem:") < MIB,
        "auto used shmem without a service manager"
    );
}

/// A model of what the store holds per 4 KiB page: data or a hole.
#[test]
fn block_status_matches_a_model_after_random_writes_zeroes_and_trims() {
    let size = 64 * MIB;
    let pages = (size / PAGE) as usize;
    let server = Server::start(&["-s", "64M"]);
    let mut client = Negotiate::new("")
        .structured()
        .base_allocation()
        .go(&server.unix());
    let mut holds_data = vec![false; pages];
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |bound: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % bound
    };
    for step in 0..300 {
        let first = next(pages as u64 - 64) as usize;
        let count = 1 + next(64) as usize;
        let offset = first as u64 * PAGE;
        let len = count as u64 * PAGE;
        match next(4) {
            0 | 1 => {
                client
                    .write(offset, &random_bytes(step, len as usize))
                    .unwrap();
                holds_data[first..first + count].fill(true);
            }
            2 => {
                client.write(offset, &vec![0; len as usize]).unwrap(); // zero data: a hole
                holds_data[first..first + count].fill(false);
            }
            _ => {
                if next(2) == 0 {
                    client.trim(offset, len).unwrap();
                } else {
                    client.write_zeroes(offset, len, 0).unwrap();
                }
                holds_data[first..first + count].fill(false);
            }
        }
    }
    // Expected extents: runs of equal state.
    let mut expected: Vec<(u64, u64)> = Vec::new();
    for &data in &holds_data {
        let flags = if data { 0 } else { STATE_HOLE_ZERO };
        match expected.last_mut() {
            Some((len, f)) if *f == flags => *len += PAGE,
            _ => expected.push((PAGE, flags)),
        }
    }
    let got: Vec<(u64, u64)> = client
        .block_status(0, size, 0)
        .unwrap()
        .iter()
        .map(|e| (e.length, e.flags))
        .collect();
    assert_eq!(got, expected, "raw client block status");

    // libnbd's view, through both generations (1.22 asks for 64-bit extents with extended
    // headers): nbdinfo --map prints "offset length type description".
    for clients in Clients::ALL {
        let map = clients.run_ok("nbdinfo", &["--map", &server.unix_uri("")]);
        let from_nbdinfo: Vec<(u64, u64)> = map
            .lines()
            .map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                (fields[1].parse().unwrap(), fields[2].parse().unwrap())
            })
            .collect();
        assert_eq!(
            from_nbdinfo,
            expected,
            "{} nbdinfo --map:\n{map}",
            clients.name()
        );
    }
}

#[test]
fn hugepages_back_written_data_with_transparent_huge_pages() {
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .expect("this kernel has no transparent huge pages");
    assert!(
        !thp.contains("[never]"),
        "THP is disabled on this host ({thp}); --hugepages cannot be tested"
    );
    let server = Server::start(&["--hugepages", "-s", "1G"]);
    let mut client = Negotiate::new("").go(&server.unix());
    let huge = |server: &Server| {
        let rollup =
            std::fs::read_to_string(format!("/proc/{}/smaps_rollup", server.pid())).unwrap();
        let line = rollup
            .lines()
            .find(|l| l.starts_with("AnonHugePages:"))
            .unwrap()
            .to_owned();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 1024
    };
    write_chunks(&mut client, 0, 16 * MIB, |i| random_bytes(i, MIB as usize));
    assert!(
        huge(&server) >= 8 * MIB,
        "only {} KiB in huge pages",
        huge(&server) / 1024
    );
    // TRIM of whole huge pages gives them back.
    client.trim(0, 16 * MIB).expect("trim");
    assert_eq!(huge(&server), 0, "huge pages left after trimming them");
    assert_reads(&mut client, 0, &vec![0; MIB as usize], "trimmed");
}
