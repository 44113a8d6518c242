#!/usr/bin/env python3
"""Backing benchmark: ramnbd with `--backing anonymous` against `--backing memfd`.

What a memfd (a file in RAM that a service manager can keep across restarts) costs compared
with private anonymous memory, in one run over a Unix socket, the two backings interleaved
(their order alternating between rounds). fio's `nbd` engine (host fio) drives the load, as in
bench.py; server CPU time per request (over the fio run,
divided by the requests fio completed; here summed over the server's threads from
/proc/PID/task/*/schedstat, in nanoseconds) is the figure that matters on a shared, noisy box.

Rows (one group per mlock setting):
  first fill      1 MiB sequential writes, QD8, of the whole export of a freshly started,
                  empty server (a new server each round): the page-allocation path
  trim all        TRIMs of the whole filled export (qemu-io), 64 MiB each: the
                  page-release path (MADV_DONTNEED against hole punching); CPU per request
  4k randread     QD32, on a server whose export is filled with random data
  4k randwrite    QD32, overwriting that data
  1M read / write QD8, sequential, on the same server
and, per backing, the server's VmRSS, RssAnon and RssShmem (/proc/PID/status, MiB) at start,
after the first fill and after the trim.

In the mlock group (`--mlock`: pages locked as they fault in) the export must fit
RLIMIT_MEMLOCK unless the bench has CAP_IPC_LOCK (root), so without it that group uses an export
of at most the limit less 2 MiB; with a limit under 6 MiB it is left out.

    client-tests/backing-bench.py [--reps 3] [--seconds 3] [--size 512M] [--no-mlock]
                                  [--json FILE] [--ramnbd PATH]

ramnbd is RAMNBD_BIN, else target/release/ramnbd: build it first (`cargo build --release -p
ramnbd`). Progress goes to stderr, the tables (Markdown) to stdout.
"""

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import bench
import benchlib

MiB = 2**20
BACKINGS = ["anonymous", "memfd"]
TRIM_STEP = 64 * MiB
# Rows on the filled server: (label, fio row).
STEADY = [
    ("4k randread QD32", bench.Row("4k randread QD32", "randread", "4k", 32)),
    ("4k randwrite QD32", bench.Row("4k randwrite QD32", "randwrite", "4k", 32)),
    ("1M read QD8", bench.Row("1M read QD8", "read", "1M", 8)),
    ("1M write QD8", bench.Row("1M write QD8", "write", "1M", 8)),
]
FILL = bench.Row("1M first fill QD8", "write", "1M", 8)
RSS_KEYS = ["VmRSS", "RssAnon", "RssShmem"]


def parse_size(text):
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def rss(server):
    """The server's VmRSS, RssAnon and RssShmem in MiB."""
    values = {}
    with open(f"/proc/{server.pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in RSS_KEYS:
                values[key] = int(rest.split()[0]) / 1024
    return values


def trim_all(server, size):
    """TRIMs the whole export in TRIM_STEP requests (qemu-io, as memory-bench.py); returns
    (requests, server CPU seconds)."""
    commands = []
    for off in range(0, size, TRIM_STEP):
        commands += ["-c", f"discard {off} {min(TRIM_STEP, size - off)}"]
    cpu = server.cpu_seconds()
    subprocess.run(["qemu-io", "-f", "raw", *commands, server.uri], check=True,
                   stdout=subprocess.DEVNULL)
    return len(commands) // 2, server.cpu_seconds() - cpu


def schedstat_seconds(pid):
    """CPU time of the process's live threads, to the nanosecond (/proc/PID/task/*/schedstat):
    /proc/PID/stat counts in clock ticks (10 ms), too coarse for a few TRIMs. ramnbd's runtime
    threads live as long as the server, so no exited thread's time is missed."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
    return total / 1e9


def can_lock_any():
    """Whether this process (and so the server it starts) has CAP_IPC_LOCK, which lifts
    RLIMIT_MEMLOCK."""
    with open("/proc/self/status") as f:
        caps = next(line for line in f if line.startswith("CapEff:")).split()[1]
    return bool(int(caps, 16) & (1 << 14))


def start(backing, mlock, size, tmp):
    extra = ["--backing", backing] + (["--mlock"] if mlock else [])
    server = benchlib.start("ramnbd", str(size), "unix", tmp, extra)
    server.cpu_seconds = lambda: schedstat_seconds(server.pid)
    # Check that the backing asked for is the one in use: a memfd shows in /proc/PID/fd.
    fds = [os.readlink(f"/proc/{server.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{server.pid}/fd")]
    has_memfd = any(link.startswith("/memfd:ramnbd") for link in fds)
    if has_memfd != (backing == "memfd"):
        server.fail(f"--backing {backing}, but a ramnbd memfd is {'' if has_memfd else 'not '}open")
    return server


def run_group(mlock, size, reps, seconds, log):
    """All rows for both backings at one mlock setting: {row: {backing: [samples]}}."""
    results = {}

    def add(row, backing, sample):
        results.setdefault(row, {b: [] for b in BACKINGS})[backing].append(sample)

    rss_rows = {}
    with tempfile.TemporaryDirectory(prefix="ramnbd-backing-bench-", dir="/tmp") as tmp:
        for rep in range(reps):
            order = BACKINGS if rep % 2 == 0 else BACKINGS[::-1]
            # Fresh servers: first fill, then trim, with RSS after each.
            for backing in order:
                with start(backing, mlock, size, tmp) as server:
                    at_start = rss(server)
                    sample = bench.measure(server, FILL, str(size), None, None)
                    add("1M first fill QD8", backing, sample)
                    filled = rss(server)
                    requests, cpu = trim_all(server, size)
                    add("trim all (64 MiB TRIMs)", backing,
                        {"cpu_us_per_req": cpu * 1e6 / requests, "mibs": None})
                    trimmed = rss(server)
                    rss_rows.setdefault(backing, []).append(
                        {"start": at_start, "filled": filled, "trimmed": trimmed})
                    log(f"mlock={mlock} round {rep + 1}/{reps} {backing:9} first fill "
                        f"{sample['mibs']:7.1f} MiB/s {sample['cpu_us_per_req']:7.2f} µs CPU/req; "
                        f"trim {cpu * 1e6 / requests:8.1f} µs CPU/req; RSS filled "
                        f"{filled['VmRSS']:.0f}, trimmed {trimmed['VmRSS']:.0f} MiB")
        with contextlib.ExitStack() as stack:
            servers = {}
            for backing in BACKINGS:
                servers[backing] = stack.enter_context(start(backing, mlock, size, tmp))
                bench.fio(servers[backing].uri, STEADY[3][1], str(size))  # the prefill
            for rep in range(reps):
                order = BACKINGS if rep % 2 == 0 else BACKINGS[::-1]
                for label, row in STEADY:
                    for backing in order:
                        sample = bench.measure(servers[backing], row, str(size), seconds, None)
                        add(label, backing, sample)
                        value = sample["iops"] if row.unit == "IOPS" else sample["mibs"]
                        log(f"mlock={mlock} round {rep + 1}/{reps} {label:18} {backing:9} "
                            f"{value:9.1f} {row.unit:5} {sample['cpu_us_per_req']:7.2f} µs CPU/req "
                            f"(others: {sample['other_cores']:.2f} cores)")
    return results, rss_rows


def median(samples, key):
    values = [s[key] for s in samples if s.get(key) is not None]
    return statistics.median(values) if values else None


def fmt(value):
    if value is None:
        return "–"
    return f"{value:.0f}" if value >= 100 else f"{value:.2f}" if value < 10 else f"{value:.1f}"


def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b else "–"


def tables(mlock, size, results, rss_rows):
    title = f"### mlock {'on' if mlock else 'off'}, {size // MiB} MiB export\n\n"
    lines = ["| row | throughput anonymous | memfd | memfd / anon | CPU µs/req anonymous "
             "| memfd | memfd / anon |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row, by in results.items():
        unit = "IOPS" if row.startswith("4k") else "MiB/s"
        key = "iops" if unit == "IOPS" else "mibs"
        tput = {b: median(by[b], key) for b in BACKINGS}
        cpu = {b: median(by[b], "cpu_us_per_req") for b in BACKINGS}
        lines.append(f"| {row} | {fmt(tput['anonymous'])} {unit if tput['anonymous'] else ''} "
                     f"| {fmt(tput['memfd'])} | {ratio(tput['memfd'], tput['anonymous'])} "
                     f"| {fmt(cpu['anonymous'])} | {fmt(cpu['memfd'])} "
                     f"| {ratio(cpu['memfd'], cpu['anonymous'])} |")
    rss_lines = ["| backing | when | " + " | ".join(f"{k} MiB" for k in RSS_KEYS) + " |",
                 "|---|---|" + "---:|" * len(RSS_KEYS)]
    for backing in BACKINGS:
        for when in ["start", "filled", "trimmed"]:
            cells = [fmt(statistics.median(r[when].get(k, 0) for r in rss_rows[backing]))
                     for k in RSS_KEYS]
            rss_lines.append(f"| {backing} | {when} | " + " | ".join(cells) + " |")
    return title + "\n".join(lines) + "\n\n" + "\n".join(rss_lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--size", default="512M", help="export size without mlock")
    parser.add_argument("--no-mlock", action="store_true", help="leave out the mlock group")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--ramnbd", metavar="PATH")
    args = parser.parse_args()
    if args.ramnbd:
        os.environ["RAMNBD_BIN"] = os.path.abspath(args.ramnbd)
    benchlib.ramnbd_binary()
    for tool, package in [("fio", "fio"), ("nbdinfo", "libnbd-bin"), ("qemu-io", "qemu-utils")]:
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: install the Debian package {package}")
    benchlib.exit_on_signals()

    def log(line):
        print(line, file=sys.stderr, flush=True)

    groups = [(False, parse_size(args.size))]
    limit = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    if not args.no_mlock:
        if limit == resource.RLIM_INFINITY or can_lock_any():
            groups.append((True, groups[0][1]))
        elif limit - 2 * MiB >= 4 * MiB:
            groups.append((True, (limit - 2 * MiB) // MiB * MiB))
        else:
            log(f"mlock group left out: RLIMIT_MEMLOCK is {limit // 1024} KiB (needs 6 MiB; "
                f"ulimit -l)")
    began = time.monotonic()
    out, report = [], {}
    for mlock, size in groups:
        results, rss_rows = run_group(mlock, size, args.reps, args.seconds, log)
        out.append(tables(mlock, size, results, rss_rows))
        report[f"mlock={mlock}"] = {"size": size, "rows": results, "rss": rss_rows}
    print(f"ramnbd {benchlib.version('ramnbd')}, fio `nbd` engine over a Unix socket; "
          f"{args.reps} rounds × {args.seconds} s per row, backings interleaved; medians; "
          f"{os.cpu_count()} CPUs; {time.monotonic() - began:.0f} s. memfd / anon: lower CPU "
          f"is better, higher throughput is better.\n")
    print("\n".join(out), end="")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
