#!/usr/bin/env python3
"""Throughput benchmark: ramnbd against nbdkit's memory plugin 1.32 and 1.42, in one run.

For each transport (a Unix socket, then TCP on 127.0.0.1) the three servers run side by side,
each with a 1 GiB export whose first 512 MiB are prefilled with random data, so that reads copy
real pages rather than holes. Each round runs every row once against every server, the servers'
order rotating between rounds, with fio's `nbd` engine (host fio). Per row the table shows each
server's median throughput and median server CPU time per request: utime + stime from
/proc/PID/stat over the fio run, divided by the requests fio completed. On a 2-core box where fio
shares the CPUs with the server (and, here, with other people's work), wall-clock throughput is
noisy; the CPU a server spends per request is the part the server controls.

fio's nbd engine (libnbd) asks for structured replies; the Linux kernel's client does not, and
`--replies simple` makes fio do the same (reads then come back as simple replies). Writes are
the same either way.

`--tls`: every server requires TLS (ramnbd `--tls require`, nbdkit `--tls=require`, both with
`--tls-certificates` naming a CA and server certificate the script makes with openssl), and fio
connects with `nbds://` / `nbds+unix://` URIs carrying `tls-certificates=DIR`. libnbd refuses a
URI that names local files unless allowed, so fio and nbdinfo run with a small shim preloaded
(built with gcc) that allows it. Unless --rows says otherwise, --tls runs the rows randread-qd32,
randwrite-qd32, read-1m and write-1m.

Rows (ids for --rows):
  randread-qd1    4k random reads, 1 in flight (the table also gives mean latency)
  randread-qd32   4k random reads, 32 in flight
  randwrite-qd32  4k random writes, 32 in flight
  randrw-2conn    4k random 70 % reads / 30 % writes, 2 connections of 32 in flight each
  read-1m         1 MiB sequential reads, 8 in flight
  write-1m        1 MiB sequential writes, 8 in flight (overwriting the prefilled data)
  first-fill      1 MiB sequential writes, 8 in flight, of the whole 1 GiB export of a freshly
                  started, empty server (a new server process each round): the allocation path

    client-tests/bench.py [--reps 3] [--seconds 5] [--transport unix|tcp|both]
                          [--rows ID,...] [--servers ramnbd,nbdkit-1.32,nbdkit-1.42]
                          [--replies structured|simple] [--tls] [--quick] [--json FILE]
                          [--ramnbd PATH]

ramnbd is RAMNBD_BIN, else target/release/ramnbd: build it first (`cargo build --release -p
ramnbd`); nbdkit-1.42 needs the Debian 13 folder (client-tests/trixie/build.sh). Progress goes
to stderr, one Markdown table per transport to stdout, everything measured to --json.
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import benchlib


@dataclass
class Row:
    label: str
    rw: str
    bs: str
    iodepth: int
    jobs: int = 1  # fio's nbd engine opens one connection per job
    fresh: bool = False  # on a new, empty server, writing the whole export once

    @property
    def unit(self):
        return "IOPS" if self.bs == "4k" else "MiB/s"


ROWS = {
    "randread-qd1": Row("4k randread QD1", "randread", "4k", 1),
    "randread-qd32": Row("4k randread QD32", "randread", "4k", 32),
    "randwrite-qd32": Row("4k randwrite QD32", "randwrite", "4k", 32),
    "randrw-2conn": Row("4k randrw 70/30 QD32 ×2 conns", "randrw", "4k", 32, jobs=2),
    "read-1m": Row("1M read QD8", "read", "1M", 8),
    "write-1m": Row("1M write QD8", "write", "1M", 8),
    "first-fill": Row("1M first fill QD8", "write", "1M", 8, fresh=True),
}
EXPORT_SIZE = "1G"
# What --tls runs unless --rows says otherwise.
TLS_ROWS = ["randread-qd32", "randwrite-qd32", "read-1m", "write-1m"]
REGION = "512M"  # what the rows on the prefilled servers touch
QUICK_REGION = "64M"



def fio_env(replies, tmp, tls):
    """The environment fio runs in: as is, or with benchlib's client shim preloaded, which makes
    libnbd ask for simple replies (`--replies simple`; the Linux kernel's client never asks for
    structured ones) and lets it read an nbds URI's certificates directory (`--tls`)."""
    if replies == "structured" and not tls:
        return None
    return benchlib.client_env(tmp, simple_replies=replies == "simple")


def busy_seconds():
    """CPU time all processes on the machine have used so far (every CPU, idle excluded)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / benchlib.CLK_TCK


def children_cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def fio(uri, row, size, seconds=None, env=None):
    """Runs one fio job; without `seconds`, writes `size` once instead of running for a time."""
    cmd = [
        "fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={row.rw}",
        f"--bs={row.bs}", f"--iodepth={row.iodepth}", f"--numjobs={row.jobs}", f"--size={size}",
        "--group_reporting", "--output-format=json", "--randrepeat=0", "--norandommap",
    ]
    if row.rw == "randrw":
        cmd.append("--rwmixread=70")
    if seconds is not None:
        cmd += [f"--runtime={seconds}", "--time_based"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"fio failed ({' '.join(cmd)}):\n{out.stderr.strip()}")
    # fio's nbd engine may print a line before the JSON document.
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    read, write = job["read"], job["write"]
    ios = read["total_ios"] + write["total_ios"]
    lat_ns = (read["lat_ns"]["mean"] * read["total_ios"] +
              write["lat_ns"]["mean"] * write["total_ios"]) / max(ios, 1)
    return {
        "ios": ios,
        "iops": read["iops"] + write["iops"],
        "mibs": (read["bw_bytes"] + write["bw_bytes"]) / 2**20,
        "lat_us": lat_ns / 1000,
    }


def measure(server, row, size, seconds, env):
    """One fio run against `server`, with its CPU time and what everything else on the box used."""
    cpu, busy, fio_cpu, began = (server.cpu_seconds(), busy_seconds(), children_cpu_seconds(),
                                 time.monotonic())
    sample = fio(server.uri, row, size, seconds, env)
    wall = time.monotonic() - began
    server_cpu = server.cpu_seconds() - cpu
    fio_cpu = children_cpu_seconds() - fio_cpu
    sample.update(
        server_cpu_s=server_cpu,
        cpu_us_per_req=server_cpu * 1e6 / max(sample["ios"], 1),
        fio_cpu_s=fio_cpu,
        # Cores' worth of CPU that neither this server nor fio used: the other benches, builds
        # and VMs on the box (and the idle servers, which use next to nothing).
        other_cores=(busy_seconds() - busy - server_cpu - fio_cpu) / wall,
        wall_s=wall,
    )
    return sample


def advertised(server, env, replies):
    """The export as nbdinfo sees it, minus what differs between runs, and whether a client
    in fio's environment gets structured replies."""
    info = server.info(env)
    if replies == "simple" and info["structured"]:
        sys.exit("the simple-replies shim did not take: nbdinfo still negotiates structured replies")
    export = info["exports"][0]
    if server.tls_dir and not info.get("TLS"):
        sys.exit(f"{server.kind}: nbdinfo did not negotiate TLS")
    return {"structured_replies": info["structured"], "tls": info.get("TLS", False),
            **{k: v for k, v in export.items() if k not in ("uri", "export-name")}}


def run_transport(transport, kinds, rows, reps, seconds, region, replies, tls, log):
    results = {rid: {k: [] for k in kinds} for rid in rows}
    info = {}
    steady_rows = [rid for rid in rows if not ROWS[rid].fresh]
    with tempfile.TemporaryDirectory(prefix="ramnbd-bench-", dir="/tmp") as tmp, \
            contextlib.ExitStack() as stack:
        env = fio_env(replies, tmp, tls)
        tls_dir = benchlib.make_pki(tmp) if tls else None
        servers = {}
        if steady_rows:
            for kind in kinds:
                servers[kind] = stack.enter_context(
                    benchlib.start(kind, EXPORT_SIZE, transport, tmp, tls_dir=tls_dir))
                info[kind] = advertised(servers[kind], env, replies)
                fio(servers[kind].uri, ROWS["write-1m"], region, env=env)  # the prefill
        for rep in range(reps):
            order = kinds[rep % len(kinds):] + kinds[:rep % len(kinds)]
            for rid in rows:
                row = ROWS[rid]
                for kind in order:
                    if row.fresh:
                        with benchlib.start(kind, EXPORT_SIZE, transport, tmp,
                                            tls_dir=tls_dir) as fresh:
                            info.setdefault(kind, advertised(fresh, env, replies))
                            sample = measure(fresh, row, EXPORT_SIZE, None, env)
                            sample["rss_after_mib"] = fresh.rss_bytes() / 2**20
                    else:
                        sample = measure(servers[kind], row, region, seconds, env)
                    results[rid][kind].append(sample)
                    value = sample["iops"] if row.unit == "IOPS" else sample["mibs"]
                    log(f"{transport} round {rep + 1}/{reps} {row.label:30} {kind:12} "
                        f"{value:9.1f} {row.unit:5} {sample['cpu_us_per_req']:8.2f} µs CPU/req "
                        f"(others: {sample['other_cores']:.2f} cores)")
    return results, info


def median_of(samples, key):
    return statistics.median(s[key] for s in samples)


def fmt(value, unit=None):
    if unit == "IOPS":
        return f"{value:.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def markdown(transport, kinds, rows, results, tls=False):
    nbdkits = [k for k in kinds if k != "ramnbd"] if "ramnbd" in kinds else []
    head = ["row", "unit", *kinds, *(f"ramnbd / {k}" for k in nbdkits),
            *(f"CPU µs/req {k}" for k in kinds), *(f"CPU ramnbd / {k}" for k in nbdkits)]
    lines = [f"| {' | '.join(head)} |", "|---|---|" + "---:|" * (len(head) - 2)]
    for rid in rows:
        row, res = ROWS[rid], results[rid]
        key = "iops" if row.unit == "IOPS" else "mibs"
        tput = {k: median_of(res[k], key) for k in kinds}
        cpu = {k: median_of(res[k], "cpu_us_per_req") for k in kinds}
        cells = [row.label, row.unit, *(fmt(tput[k], row.unit) for k in kinds),
                 *(f"{tput['ramnbd'] / tput[k]:.2f}" for k in nbdkits),
                 *(fmt(cpu[k]) for k in kinds),
                 *(f"{cpu['ramnbd'] / cpu[k]:.2f}" if cpu[k] else "–" for k in nbdkits)]
        lines.append(f"| {' | '.join(cells)} |")
    notes = []
    if "randread-qd1" in rows:
        lat = {k: median_of(results["randread-qd1"][k], "lat_us") for k in kinds}
        notes.append("4k randread QD1 mean latency: " +
                     ", ".join(f"{k} {lat[k]:.1f} µs" for k in kinds) + ".")
    others = [s["other_cores"] for res in results.values() for k in kinds for s in res[k]]
    notes.append(f"Other processes used a median {statistics.median(others):.2f} cores "
                 f"(max {max(others):.2f}) of the {os.cpu_count()} during the fio runs.")
    title = {"unix": "Unix socket", "tcp": "TCP 127.0.0.1"}[transport] + (", TLS" if tls else "")
    return f"### {title}\n\n" + "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, help="rounds per row (default 3; --quick: 1)")
    parser.add_argument("--seconds", type=int, help="seconds per fio run (default 5; --quick: 1)")
    parser.add_argument("--transport", choices=["unix", "tcp", "both"], default="both")
    parser.add_argument("--rows", help="comma-separated row ids (default: all; --tls: "
                        + ",".join(TLS_ROWS) + ")")
    parser.add_argument("--tls", action="store_true",
                        help="every server requires TLS (certificates made with openssl), and "
                        "fio connects with nbds URIs (through benchlib's shim; needs gcc)")
    parser.add_argument("--servers", default=",".join(benchlib.KINDS),
                        help="comma-separated, from: " + ", ".join(benchlib.KINDS))
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: 1 round of 1 s, {QUICK_REGION} region")
    parser.add_argument("--replies", choices=["structured", "simple"], default="structured",
                        help="the read replies fio asks for: structured (libnbd's default) or "
                        "simple (the Linux kernel's dialect, through a preloaded shim; needs gcc)")
    parser.add_argument("--json", metavar="FILE", help="write every sample and the medians here")
    parser.add_argument("--ramnbd", metavar="PATH", help="the ramnbd binary (default: "
                        "$RAMNBD_BIN, else target/release/ramnbd)")
    args = parser.parse_args()
    if args.ramnbd:
        os.environ["RAMNBD_BIN"] = os.path.abspath(args.ramnbd)
    reps = args.reps or (1 if args.quick else 3)
    seconds = args.seconds or (1 if args.quick else 5)
    region = QUICK_REGION if args.quick else REGION
    rows = args.rows.split(",") if args.rows else TLS_ROWS if args.tls else list(ROWS)
    kinds = args.servers.split(",")
    transports = ["unix", "tcp"] if args.transport == "both" else [args.transport]
    for rid in rows:
        if rid not in ROWS:
            sys.exit(f"unknown row {rid!r}; rows: {', '.join(ROWS)}")
    for kind in kinds:
        if why := benchlib.missing(kind):
            sys.exit(f"server {kind}: {why} (or leave it out with --servers)")
    tools = [("fio", "fio"), ("nbdinfo", "libnbd-bin")]
    if args.tls:
        tools += [("openssl", "openssl"), ("gcc", "gcc")]
    for tool, package in tools:
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: install the Debian package {package}")
    benchlib.exit_on_signals()

    def log(line):
        print(line, file=sys.stderr, flush=True)

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
        "fio": subprocess.run(["fio", "--version"], capture_output=True, text=True).stdout.strip(),
        "versions": {k: benchlib.version(k) for k in kinds},
        # Which ramnbd: the binary, and the commit of the tree the script runs from.
        "ramnbd_bin": benchlib.ramnbd_binary() if "ramnbd" in kinds else None,
        "git": subprocess.run(["git", "-C", benchlib.REPO, "describe", "--always", "--dirty"],
                              capture_output=True, text=True).stdout.strip(),
        "settings": {"reps": reps, "seconds": seconds, "replies": args.replies, "tls": args.tls,
                     "export_size": EXPORT_SIZE,
                     "region": region, "rows": {rid: vars(ROWS[rid]) for rid in rows}},
        "load_before": loadavg(), "transports": {},
    }
    log(f"load average before: {report['load_before']}; " + ", ".join(report["versions"].values()))
    began = time.monotonic()
    tables = []
    for transport in transports:
        results, info = run_transport(transport, kinds, rows, reps, seconds, region,
                                      args.replies, args.tls, log)
        report["transports"][transport] = {"advertised": info, "rows": {
            rid: {"label": ROWS[rid].label, "unit": ROWS[rid].unit, "servers": {
                k: {"median": {key: median_of(results[rid][k], key)
                               for key in results[rid][k][0]},
                    "samples": results[rid][k]} for k in kinds}} for rid in rows}}
        tables.append(markdown(transport, kinds, rows, results, args.tls))
    report["wall_s"] = time.monotonic() - began
    report["load_after"] = loadavg()

    tls = ", TLS required (P-256 server key)" if args.tls else ""
    print(f"fio {report['fio']} `nbd` engine, {args.replies} replies{tls}; {reps} rounds × "
          f"{seconds:g} s per row, servers interleaved; medians. {EXPORT_SIZE} exports, {region} prefilled region; "
          f"{os.cpu_count()} CPUs; {report['date']}; "
          f"load average {report['load_before'][0]:.2f} before, "
          f"{report['load_after'][0]:.2f} after; {report['wall_s']:.0f} s.")
    print("ramnbd / X: throughput ratio (higher is better); CPU ramnbd / X: server CPU per "
          "request ratio (lower is better).\n")
    print("\n".join(tables), end="")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
