#!/usr/bin/env python3
"""Throughput benchmark: ramnbd against nbdkit's memory plugin, side by side in one run.

Both servers run at once on Unix sockets, each prefilled with random data over the region the
jobs touch (so neither serves reads from never-written holes). Every row runs fio's `nbd` engine
against each server in turn, the order alternating between repetitions, and the table shows
medians, the ramnbd / nbdkit ratio, and the server's CPU time per request (utime + stime from
/proc, divided by the requests fio completed): on a 2-core box where fio shares the CPUs, the
CPU a server spends per request is the part the server controls.

    client-tests/bench.py [--reps 3] [--runtime 4] [--ramnbd target/release/ramnbd]

Builds nothing itself: run `cargo build --release -p ramnbd` first.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROWS = [
    # (label, rw, block size, iodepth, connections)
    ("4k randread  QD32 x1", "randread", "4k", 32, 1),
    ("4k randread  QD32 x2", "randread", "4k", 32, 2),
    ("4k randwrite QD32 x1", "randwrite", "4k", 32, 1),
    ("4k randwrite QD32 x2", "randwrite", "4k", 32, 2),
    ("4k randread  QD1  x1", "randread", "4k", 1, 1),
    ("1M read      QD8  x1", "read", "1M", 8, 1),
    ("1M write     QD8  x1", "write", "1M", 8, 1),
]
REGION = "512M"  # what every job touches
EXPORT_SIZE = "1G"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[11], fields[12] are utime and stime (stat fields 14 and 15).
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wait_for_socket(path, proc, name):
    deadline = time.time() + 20
    while time.time() < deadline:
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            sys.exit(f"{name} exited early with status {proc.returncode}")
        time.sleep(0.05)
    sys.exit(f"{name} did not create {path}")


def fio(uri, rw, bs, iodepth, jobs, runtime, size=REGION, time_based=True):
    cmd = [
        "fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
        f"--iodepth={iodepth}", f"--numjobs={jobs}", f"--size={size}", "--group_reporting",
        "--output-format=json", "--randrepeat=0", "--norandommap",
    ]
    if time_based:
        cmd += [f"--runtime={runtime}", "--time_based"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    # fio's nbd engine prints a line before the JSON document.
    job = json.loads(out[out.index("{"):])["jobs"][0]
    ios = job["read"]["total_ios"] + job["write"]["total_ios"]
    iops = job["read"]["iops"] + job["write"]["iops"]
    mibs = (job["read"]["bw_bytes"] + job["write"]["bw_bytes"]) / 2**20
    return ios, iops, mibs


def main():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--runtime", type=int, default=4, help="seconds per fio run")
    parser.add_argument("--ramnbd", default=os.path.join(repo, "target/release/ramnbd"))
    args = parser.parse_args()
    for tool, package in [("fio", "fio"), ("nbdkit", "nbdkit")]:
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: install the Debian package {package}")
    if not os.access(args.ramnbd, os.X_OK):
        sys.exit(f"{args.ramnbd} not found: run cargo build --release -p ramnbd")

    tmp = tempfile.mkdtemp(prefix="ramnbd-bench-")
    servers = {}
    try:
        sock = os.path.join(tmp, "ramnbd.sock")
        servers["ramnbd"] = (subprocess.Popen(
            [args.ramnbd, "-s", EXPORT_SIZE, "-u", sock, "--log-level", "warn"]), sock)
        sock = os.path.join(tmp, "nbdkit.sock")
        servers["nbdkit"] = (subprocess.Popen(
            ["nbdkit", "-f", "-U", sock, "memory", EXPORT_SIZE]), sock)
        for name, (proc, sock) in servers.items():
            wait_for_socket(sock, proc, name)
            # Prefill with random data so reads copy real pages on both servers.
            fio(f"nbd+unix:///?socket={sock}", "write", "1M", 8, 1, 0, time_based=False)

        print(f"fio nbd engine, Unix sockets, {args.reps} reps x {args.runtime}s per row, "
              f"{os.cpu_count()} CPUs, region {REGION}; medians", flush=True)
        results = {}  # (row, server) -> list of (iops, mibs, cpu_us_per_request)
        for rep in range(args.reps):
            order = list(servers) if rep % 2 == 0 else list(reversed(servers))
            for label, rw, bs, qd, jobs in ROWS:
                for name in order:
                    proc, sock = servers[name]
                    before = cpu_seconds(proc.pid)
                    ios, iops, mibs = fio(f"nbd+unix:///?socket={sock}", rw, bs, qd, jobs,
                                          args.runtime)
                    cpu_us = (cpu_seconds(proc.pid) - before) * 1e6 / max(ios, 1)
                    results.setdefault((label, name), []).append((iops, mibs, cpu_us))

        header = (f"{'row':22} {'ramnbd IOPS':>12} {'nbdkit IOPS':>12} {'ratio':>6} "
                  f"{'ramnbd MiB/s':>12} {'nbdkit MiB/s':>12} "
                  f"{'ramnbd CPU us/req':>17} {'nbdkit CPU us/req':>17} {'CPU ratio':>9}")
        print(header)
        print("-" * len(header))
        for label, *_ in ROWS:
            med = {name: [statistics.median(col) for col in zip(*results[(label, name)])]
                   for name in servers}
            (r_iops, r_mibs, r_cpu), (k_iops, k_mibs, k_cpu) = med["ramnbd"], med["nbdkit"]
            print(f"{label:22} {r_iops:12.0f} {k_iops:12.0f} {r_iops / k_iops:6.2f} "
                  f"{r_mibs:12.1f} {k_mibs:12.1f} {r_cpu:17.2f} {k_cpu:17.2f} "
                  f"{r_cpu / k_cpu if k_cpu else float('nan'):9.2f}")
        print("ratio = ramnbd / nbdkit throughput (higher is better); "
              "CPU ratio = ramnbd / nbdkit CPU per request (lower is better)")
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
