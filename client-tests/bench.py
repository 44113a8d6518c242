#!/usr/bin/env python3
"""Throughput benchmark: ramnbd against nbdkit's memory plugin 1.32 and 1.42, and nbdkit 1.42's
null plugin as the transport ceiling, in one run.

For each transport (a Unix socket, then TCP on 127.0.0.1) the four servers run side by side,
each with a 1 GiB export whose first 512 MiB are prefilled with random data, so that reads copy
real pages rather than holes. nbdkit-null stores nothing (reads return zeroes, writes are
dropped): it shows what the transport, fio and nbdkit's core cost with no store behind them,
so it gets no prefill and no first-fill row ("—"). Each round runs every row once against every
server, the servers' order rotating between rounds, with fio's `nbd` engine (host fio). Per row
the table shows each server's median throughput and median server CPU time per request: utime +
stime from /proc/PID/stat over the fio run, divided by the requests fio completed, and the
ratios ramnbd / each other server. On a 2-core box where fio shares the CPUs with the server
(and, here, with other people's work), wall-clock throughput is noisy; the CPU a server spends
per request is the part the server controls.

Under each table: the QD1 mean latency, the cores other processes used, and issue 12's targets,
one line each, judged on the medians (✓ holds, ✗ misses): throughput ≥ 1.1× both nbdkit
memory versions on every row; server CPU per request ≤ 0.7× nbdkit-1.32 on every row; 1 MiB
sequential reads and writes ≥ 1.0× nbdkit-null; 4k QD1 mean latency ≤ 0.9× both nbdkit
versions; first fill ≥ 1.3× both. A target whose row or server was not run is left out.

The chart (`--chart FILE`, .svg or .png; default: the --json FILE with .svg, else
/tmp/ramnbd-bench.svg) has, per transport, grouped bars per row by server in two panels:
throughput relative to nbdkit-1.32 (ramnbd's own figure written on its bar) and server CPU µs
per request on a log axis. It needs matplotlib (Debian's python3-matplotlib, for
/usr/bin/python3; when another python3 runs the script, it starts again under that one);
`--no-chart` leaves it out. `--from-json FILE` measures nothing: it prints the tables and draws
the chart again from an earlier run's --json.

fio's nbd engine (libnbd) asks for structured replies; the Linux kernel's client does not, and
`--replies simple` makes fio do the same (reads then come back as simple replies). Writes are
the same either way.

`--tls`: every server requires TLS (ramnbd `--tls require`, nbdkit `--tls=require`, both with
`--tls-certificates` naming a CA and server certificate the script makes with openssl), and fio
connects with `nbds://` / `nbds+unix://` URIs carrying `tls-certificates=DIR`. libnbd refuses a
URI that names local files unless allowed, so fio and nbdinfo run with a small shim preloaded
(built with gcc) that allows it. nbdkit-null requires TLS too, so it is the ceiling for TLS.
Unless --rows says otherwise, --tls runs the rows randread-qd32, randwrite-qd32, read-1m and
write-1m.

Rows (ids for --rows):
  randread-qd1    4k random reads, 1 in flight (the table also gives mean latency)
  randread-qd32   4k random reads, 32 in flight
  randwrite-qd32  4k random writes, 32 in flight
  randrw-2conn    4k random 70 % reads / 30 % writes, 2 connections of 32 in flight each
  read-1m         1 MiB sequential reads, 8 in flight
  write-1m        1 MiB sequential writes, 8 in flight (overwriting the prefilled data)
  first-fill      1 MiB sequential writes, 8 in flight, of the whole 1 GiB export of a freshly
                  started, empty server (a new server process each round): the allocation path

    client-tests/bench.py [--reps 4] [--seconds 5] [--transport unix|tcp|both]
                          [--rows ID,...] [--servers ramnbd,nbdkit-1.32,nbdkit-1.42,nbdkit-null]
                          [--replies structured|simple] [--tls] [--quick] [--json FILE]
                          [--chart FILE | --no-chart] [--ramnbd PATH]
    client-tests/bench.py --from-json FILE [--chart FILE]

ramnbd is RAMNBD_BIN, else target/release/ramnbd: build it first (`cargo build --release -p
ramnbd`); nbdkit-1.42 and nbdkit-null need the Debian 13 folder (client-tests/trixie/build.sh).
Progress goes to stderr, one Markdown table per transport to stdout, everything measured to
--json.
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
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
# Servers that keep no data: no prefill, and no first-fill row (there is nothing to allocate).
STORES_NOTHING = {"nbdkit-null"}
# The chart's file when neither --chart nor --json (nor --from-json) names one.
DEFAULT_CHART = "/tmp/ramnbd-bench.svg"



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
                if kind not in STORES_NOTHING:
                    fio(servers[kind].uri, ROWS["write-1m"], region, env=env)  # the prefill
        for rep in range(reps):
            order = kinds[rep % len(kinds):] + kinds[:rep % len(kinds)]
            for rid in rows:
                row = ROWS[rid]
                for kind in order:
                    if row.fresh and kind in STORES_NOTHING:
                        continue  # nothing to fill: its results stay empty, "—" in the table
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


def transport_report(transport, kinds, rows, results, info):
    """What --json keeps of one transport: per row and server, the medians and every sample;
    a server without samples (nbdkit-null on first fill) is left out of that row."""
    return {"advertised": info, "rows": {
        rid: {"label": ROWS[rid].label, "unit": ROWS[rid].unit, "servers": {
            k: {"median": {key: median_of(results[rid][k], key) for key in results[rid][k][0]},
                "samples": results[rid][k]} for k in kinds if results[rid][k]}}
        for rid in rows}}


def report_kinds(report):
    # Older JSON files have no settings.servers; their versions are in the same order.
    return report["settings"].get("servers") or list(report["versions"])


def median(trow, kind, key):
    """A server's median of `key` on a row of the report, None if it has no samples there."""
    server = trow["servers"].get(kind)
    return server["median"][key] if server else None


def throughput(trow, kind):
    return median(trow, kind, "iops" if trow["unit"] == "IOPS" else "mibs")


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt(value, unit=None):
    if value is None:
        return "—"
    if unit == "IOPS":
        return f"{value:.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def fmt_ratio(value):
    return "—" if value is None else f"{value:.2f}"


def markdown(report, transport):
    kinds, tr = report_kinds(report), report["transports"][transport]
    others = [k for k in kinds if k != "ramnbd"] if "ramnbd" in kinds else []
    head = ["row", "unit", *kinds, *(f"ramnbd / {k}" for k in others),
            *(f"CPU µs/req {k}" for k in kinds), *(f"CPU ramnbd / {k}" for k in others)]
    lines = [f"| {' | '.join(head)} |", "|---|---|" + "---:|" * (len(head) - 2)]
    for trow in tr["rows"].values():
        tput = {k: throughput(trow, k) for k in kinds}
        cpu = {k: median(trow, k, "cpu_us_per_req") for k in kinds}
        cells = [trow["label"], trow["unit"], *(fmt(tput[k], trow["unit"]) for k in kinds),
                 *(fmt_ratio(ratio(tput["ramnbd"], tput[k])) for k in others),
                 *(fmt(cpu[k]) for k in kinds),
                 *(fmt_ratio(ratio(cpu["ramnbd"], cpu[k])) for k in others)]
        lines.append(f"| {' | '.join(cells)} |")
    notes = []
    if "randread-qd1" in tr["rows"]:
        trow = tr["rows"]["randread-qd1"]
        notes.append("4k randread QD1 mean latency: " +
                     ", ".join(f"{k} {median(trow, k, 'lat_us'):.1f} µs" for k in kinds) + ".")
    if "first-fill" in tr["rows"] and STORES_NOTHING & set(kinds):
        notes.append(", ".join(sorted(STORES_NOTHING & set(kinds))) + " stores nothing: it gets "
                     "no prefill, and first fill is not run against it (—).")
    busy = [s["other_cores"] for trow in tr["rows"].values()
            for server in trow["servers"].values() for s in server["samples"]]
    notes.append(f"Other processes used a median {statistics.median(busy):.2f} cores "
                 f"(max {max(busy):.2f}) of the {report['cpus']} during the fio runs.")
    title = {"unix": "Unix socket", "tcp": "TCP 127.0.0.1"}[transport] + \
        (", TLS" if report["settings"]["tls"] else "")
    targets = target_lines(report, transport)
    if targets:
        notes += ["", "Targets (issue 12), from the medians:", "", *targets]
    return f"### {title}\n\n" + "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


NBDKITS = ("nbdkit-1.32", "nbdkit-1.42")


def target_lines(report, transport):
    """One Markdown list item per issue-12 target that this run's rows and servers allow
    judging: the figure that decides it, and ✓ or ✗."""
    kinds, rows = report_kinds(report), report["transports"][transport]["rows"]
    if "ramnbd" not in kinds:
        return []
    nbdkits = [k for k in NBDKITS if k in kinds]
    lines = []

    def mark(ok):
        return "✓" if ok else "✗"

    def worst(pairs, bound, higher):
        """pairs: (ratio, what); the worst ratio, what it was, and how many miss `bound`."""
        pairs = [p for p in pairs if p[0] is not None]
        r, what = min(pairs) if higher else max(pairs)
        missed = sum((x < bound) if higher else (x > bound) for x, _ in pairs)
        side = "lowest" if higher else "highest"
        miss = "below" if higher else "above"
        return f"{side} {r:.2f}× ({what}), {missed} of {len(pairs)} {miss}", missed == 0

    if nbdkits:
        pairs = [(ratio(throughput(trow, "ramnbd"), throughput(trow, k)),
                  f"{trow['label']} vs {k}") for trow in rows.values() for k in nbdkits]
        text, ok = worst(pairs, 1.1, True)
        lines.append(f"- throughput ≥ 1.1× {' and '.join(nbdkits)}, every row: "
                     f"{text} {mark(ok)}")
    if "nbdkit-1.32" in kinds:
        pairs = [(ratio(median(trow, "ramnbd", "cpu_us_per_req"),
                        median(trow, "nbdkit-1.32", "cpu_us_per_req")), trow["label"])
                 for trow in rows.values()]
        text, ok = worst(pairs, 0.7, False)
        lines.append(f"- server CPU/req ≤ 0.7× nbdkit-1.32, every row: {text} {mark(ok)}")
    if "nbdkit-null" in kinds:
        for rid in ("read-1m", "write-1m"):
            if rid in rows:
                r = ratio(throughput(rows[rid], "ramnbd"), throughput(rows[rid], "nbdkit-null"))
                lines.append(f"- {rows[rid]['label']} ≥ 1.0× nbdkit-null: {r:.2f}× "
                             f"{mark(r >= 1.0)}")

    def against(rid, key, what, bound, higher):
        figures = []
        for k in nbdkits:
            r = ratio(median(rows[rid], "ramnbd", key), median(rows[rid], k, key))
            ok = r >= bound if higher else r <= bound
            figures.append(f"{r:.2f}× {k} {mark(ok)}")
        lines.append(f"- {what}: " + ", ".join(figures))

    if nbdkits and "randread-qd1" in rows:
        against("randread-qd1", "lat_us", "4k randread QD1 mean latency ≤ 0.9× nbdkit",
                0.9, False)
    if nbdkits and "first-fill" in rows:
        key = "iops" if rows["first-fill"]["unit"] == "IOPS" else "mibs"
        against("first-fill", key, "first fill ≥ 1.3× nbdkit", 1.3, True)
    return lines


def ramnbd_at(report):
    """"ramnbd at COMMIT": the binary's own commit (its --version), else the script's tree."""
    found = re.search(r"commit (\w+)", report["versions"].get("ramnbd", ""))
    return f"ramnbd at {found.group(1) if found else report['git']}"


def header(report):
    st = report["settings"]
    tls = ", TLS required (P-256 server key)" if st["tls"] else ""
    return (f"fio {report['fio']} `nbd` engine, {st['replies']} replies{tls}; {st['reps']} "
            f"round{'s' if st['reps'] != 1 else ''} × {st['seconds']:g} s per row, servers interleaved; medians. {st['export_size']} "
            f"exports, {st['region']} prefilled region; {report['cpus']} CPUs; {report['date']}; "
            f"{ramnbd_at(report)}; load average {report['load_before'][0]:.2f} before, "
            f"{report['load_after'][0]:.2f} after; {report['wall_s']:.0f} s.\n"
            "ramnbd / X: throughput ratio (higher is better); CPU ramnbd / X: server CPU per "
            "request ratio (lower is better).\n")


DEBIAN_PYTHON = "/usr/bin/python3"


def need_matplotlib(log):
    """Makes sure the chart can be drawn, before anything is measured. Debian's
    python3-matplotlib serves /usr/bin/python3; when another python3 runs this script (one
    first on PATH, without it), the script starts again under Debian's."""
    try:
        import matplotlib  # noqa: F401
        return
    except ImportError:
        pass
    if (os.path.realpath(sys.executable) != os.path.realpath(DEBIAN_PYTHON)
            and os.access(DEBIAN_PYTHON, os.X_OK)
            and subprocess.run([DEBIAN_PYTHON, "-c", "import matplotlib"],
                               capture_output=True).returncode == 0):
        log(f"{sys.executable} has no matplotlib; starting again with {DEBIAN_PYTHON}")
        os.execv(DEBIAN_PYTHON, [DEBIAN_PYTHON, os.path.abspath(__file__), *sys.argv[1:]])
    sys.exit("the chart needs matplotlib: install the Debian package python3-matplotlib (for "
             f"{DEBIAN_PYTHON}), or leave the chart out with --no-chart")


COLOURS = {"ramnbd": "#1f77b4", "nbdkit-1.32": "#ff7f0e", "nbdkit-1.42": "#2ca02c",
           "nbdkit-null": "#b0b0b0"}


def absolute(value, unit):
    if unit == "IOPS":
        return f"{value / 1000:.0f}k IOPS" if value >= 10000 else f"{value:.0f} IOPS"
    return f"{value:.0f} MiB/s"


def chart(report, path):
    """Per transport, two panels of grouped horizontal bars, one group per row and one bar per
    server: throughput relative to nbdkit-1.32 (IOPS and MiB/s share no axis; ramnbd's own
    figure is written on its bar) and server CPU µs per request on a log axis. SVG or PNG by
    the file's suffix."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    # Text stays text (small, searchable files); no date or random ids, so re-rendering the
    # same JSON gives the same file.
    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "ramnbd-bench",
                         "font.size": 9})
    kinds, transports = report_kinds(report), list(report["transports"])
    base = "nbdkit-1.32" if "nbdkit-1.32" in kinds else kinds[0]
    nrows = max(len(report["transports"][t]["rows"]) for t in transports)
    height = 0.8 / len(kinds)
    inches = 1.3 + len(transports) * (0.9 + 0.16 * nrows * len(kinds))
    fig, axes = plt.subplots(len(transports), 2, squeeze=False, sharey="row",
                             figsize=(13, inches))
    for t, transport in enumerate(transports):
        trows = list(report["transports"][transport]["rows"].values())
        name = {"unix": "Unix socket", "tcp": "TCP 127.0.0.1"}[transport] + \
            (", TLS" if report["settings"]["tls"] else "")
        tput_ax, cpu_ax = axes[t]
        for i, kind in enumerate(kinds):
            ys = [r + (i - (len(kinds) - 1) / 2) * height for r in range(len(trows))]
            rel = [ratio(throughput(trow, kind), throughput(trow, base)) for trow in trows]
            cpu = [median(trow, kind, "cpu_us_per_req") for trow in trows]
            style = dict(height=height, color=COLOURS.get(kind), edgecolor="white", linewidth=0.5,
                         hatch="///" if kind in STORES_NOTHING else None)
            tput_ax.barh(ys, [v or 0 for v in rel], **style)
            cpu_ax.barh(ys, [v or 0 for v in cpu], **style)
            for y, trow, r, c in zip(ys, trows, rel, cpu):
                if r is None:
                    tput_ax.text(0.02, y, "not run (stores nothing)", va="center", fontsize=7,
                                 color="#666")
                    continue
                if kind == "ramnbd":
                    label = f"{r:.2f}× · {absolute(throughput(trow, kind), trow['unit'])}"
                    tput_ax.text(r + 0.02, y, label, va="center", fontsize=7, fontweight="bold")
                    cpu_ax.text(c * 1.06, y, f"{c:.0f} µs" if c >= 100 else f"{fmt(c)} µs",
                                va="center", fontsize=7,
                                fontweight="bold")
        tput_ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
        tput_ax.set_title(f"{name}: throughput / {base} (higher is better)")
        cpu_ax.set_xscale("log")
        cpu_ax.set_title(f"{name}: server CPU µs per request (log scale; lower is better)")
        tput_ax.set_yticks(range(len(trows)), [trow["label"] for trow in trows])
        tput_ax.invert_yaxis()
        right = max((ratio(throughput(trow, k), throughput(trow, base)) or 0)
                    for trow in trows for k in kinds)
        tput_ax.set_xlim(0, right * 1.3)
        cpus = [median(trow, k, "cpu_us_per_req") for trow in trows for k in kinds]
        cpus = [c for c in cpus if c]
        cpu_ax.set_xlim(min(cpus) / 1.5, max(cpus) * 2.5)  # room for the labels
        for ax in (tput_ax, cpu_ax):
            ax.grid(axis="x", color="#ddd", linewidth=0.6, which="both")
            ax.set_axisbelow(True)
    st = report["settings"]
    handles = [Patch(facecolor=COLOURS.get(k), hatch="///" if k in STORES_NOTHING else None,
                     label=f"{k} ({report['versions'][k]})") for k in kinds]
    fig.legend(handles=handles, loc="lower center", ncol=len(kinds), frameon=False)
    tls = ", TLS" if st["tls"] else ""
    fig.suptitle(f"ramnbd against nbdkit — fio nbd engine, {st['replies']} replies{tls}; "
                 f"medians of {st['reps']} × {st['seconds']:g} s\n{report['date']}, "
                 f"{ramnbd_at(report)}, {report['cpus']} CPUs, load average "
                 f"{report['load_before'][0]:.2f} → {report['load_after'][0]:.2f}", fontsize=11)
    # Room for the two title lines above and the legend below.
    fig.tight_layout(rect=(0, 0.4 / inches, 1, 1 - 0.42 / inches))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, metadata={"Date": None} if path.endswith(".svg") else None, dpi=110)
    plt.close(fig)


def chart_path(args):
    if args.chart:
        return args.chart
    source = args.json or args.from_json
    return os.path.splitext(source)[0] + ".svg" if source else DEFAULT_CHART


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, help="rounds per row (default 4; --quick: 1)")
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
    parser.add_argument("--chart", metavar="FILE", help="the chart, SVG or PNG by suffix "
                        "(default: --json's or --from-json's FILE with .svg, else "
                        f"{DEFAULT_CHART}); needs python3-matplotlib")
    parser.add_argument("--no-chart", action="store_true", help="tables only")
    parser.add_argument("--from-json", metavar="FILE", help="measure nothing: print the tables "
                        "and draw the chart from a --json FILE of an earlier run")
    parser.add_argument("--ramnbd", metavar="PATH", help="the ramnbd binary (default: "
                        "$RAMNBD_BIN, else target/release/ramnbd)")
    args = parser.parse_args()

    def log(line):
        print(line, file=sys.stderr, flush=True)

    if not args.no_chart:
        need_matplotlib(log)
    if args.from_json:
        with open(args.from_json) as f:
            report = json.load(f)
        print(header(report))
        print("\n".join(markdown(report, t) for t in report["transports"]), end="")
        if not args.no_chart:
            chart(report, chart_path(args))
            log(f"wrote {chart_path(args)}")
        return
    if args.ramnbd:
        os.environ["RAMNBD_BIN"] = os.path.abspath(args.ramnbd)
    reps = args.reps or (1 if args.quick else 4)
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
                     "export_size": EXPORT_SIZE, "servers": kinds,
                     "region": region, "rows": {rid: vars(ROWS[rid]) for rid in rows}},
        "load_before": loadavg(), "transports": {},
    }
    log(f"load average before: {report['load_before']}; "
        + ", ".join(f"{k}: {v}" for k, v in report["versions"].items()))
    began = time.monotonic()
    for transport in transports:
        results, info = run_transport(transport, kinds, rows, reps, seconds, region,
                                      args.replies, args.tls, log)
        report["transports"][transport] = transport_report(transport, kinds, rows, results, info)
    report["wall_s"] = time.monotonic() - began
    report["load_after"] = loadavg()

    print(header(report))
    print("\n".join(markdown(report, t) for t in transports), end="")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        log(f"wrote {args.json}")
    if not args.no_chart:
        chart(report, chart_path(args))
        log(f"wrote {chart_path(args)}")


if __name__ == "__main__":
    main()
