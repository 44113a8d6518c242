#!/usr/bin/env python3
"""Memory benchmark: what a RAM disk really costs, ramnbd against nbdkit's memory plugin.

Three servers side by side: ramnbd, `nbdkit memory` (default sparse allocator) and
`nbdkit memory allocator=malloc`. Each gets the same steps, and one table prints server RSS
(VmRSS, MiB) after each:

  start       right after start: a 1 TiB export (malloc: 1 GiB, as it fills the disk at start)
  +512M data  after writing 512 MiB of random data at offset 0 (fio, 1 MiB writes)
  +512M zero  after writing 512 MiB of zeroes at offset 512 MiB (ordinary WRITEs of zero bytes)
  trim all    after a TRIM of the first 1 GiB
  mkfs.ext4   a fresh 16 GiB export after `mkfs.ext4` through nbdfuse (it discards the device
              first, then writes little)
              (malloc: not run; it would preallocate all 16 GiB)
The "+512M zero" row is also what `dd if=/dev/zero` and the Linux 6.1 NBD driver's zero-out
fallback (ext4's lazy inode-table init after mkfs) send: plain WRITEs of zero bytes.

plus the wall time of the zero writes.

    client-tests/memory-bench.py [--ramnbd target/release/ramnbd]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

MiB = 2**20
MKFS_ROWS = {"mkfs.ext4": []}


def rss(pid):
    """VmRSS of `pid`, half a second after the last client left, so each server has finished
    tearing the connection down."""
    time.sleep(0.5)
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def start(cmd, sock):
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not os.path.exists(sock):
        if proc.poll() is not None or time.time() > deadline:
            sys.exit(f"{cmd[0]} did not start: {' '.join(cmd)}")
        time.sleep(0.05)
    time.sleep(0.2)  # let the server settle after creating the socket
    return proc


def fio_write(uri, offset, size, zero):
    cmd = ["fio", "--name=fill", "--ioengine=nbd", f"--uri={uri}", "--rw=write", "--bs=1M",
           "--iodepth=8", f"--offset={offset}", f"--size={size}", "--output-format=json"]
    cmd.append("--zero_buffers" if zero else "--refill_buffers")
    began = time.monotonic()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.monotonic() - began


def trim(uri, length):
    subprocess.run(["qemu-io", "-f", "raw", "-c", f"discard 0 {length}", uri], check=True,
                   capture_output=True)


def mkfs_rss(cmd, sock, tmp, mkfs_options):
    """Starts a 16 GiB server, runs mkfs.ext4 on it through nbdfuse, returns the server's RSS."""
    proc = start(cmd, sock)
    mnt = os.path.join(tmp, "fuse")
    os.makedirs(mnt, exist_ok=True)
    disk = os.path.join(mnt, "disk")
    fuse = subprocess.Popen(["nbdfuse", disk, "--unix", sock])
    try:
        deadline = time.time() + 20
        while not os.path.exists(disk):
            if time.time() > deadline:
                sys.exit("nbdfuse did not come up")
            time.sleep(0.05)
        subprocess.run(["mkfs.ext4", "-q", "-F", *mkfs_options, disk], check=True)
        return rss(proc.pid)
    finally:
        subprocess.run(["fusermount3", "-u", mnt], capture_output=True)
        fuse.wait(timeout=20)
        proc.terminate()
        proc.wait(timeout=20)


def main():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ramnbd", default=os.path.join(repo, "target/release/ramnbd"))
    args = parser.parse_args()
    for tool, package in [("fio", "fio"), ("nbdkit", "nbdkit"), ("qemu-io", "qemu-utils"),
                          ("nbdfuse", "libnbd-bin"), ("mkfs.ext4", "e2fsprogs")]:
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: install the Debian package {package}")
    if not os.access(args.ramnbd, os.X_OK):
        sys.exit(f"{args.ramnbd} not found: run cargo build --release -p ramnbd")

    def commands(sock, size):
        return {
            "ramnbd": [args.ramnbd, "-s", size, "-u", sock, "--log-level", "warn"],
            "nbdkit-sparse": ["nbdkit", "-f", "-U", sock, "memory", size],
            "nbdkit-malloc": ["nbdkit", "-f", "-U", sock, "memory", "1G" if size == "1T" else size,
                              "allocator=malloc"],
        }

    tmp = tempfile.mkdtemp(prefix="ramnbd-membench-")
    table = {}
    try:
        for name in ["ramnbd", "nbdkit-sparse", "nbdkit-malloc"]:
            sock = os.path.join(tmp, f"{name}.sock")
            proc = start(commands(sock, "1T")[name], sock)
            uri = f"nbd+unix:///?socket={sock}"
            row = table.setdefault(name, {})
            try:
                row["start"] = rss(proc.pid)
                fio_write(uri, 0, "512M", zero=False)
                row["+512M data"] = rss(proc.pid)
                row["zero time"] = fio_write(uri, "512M", "512M", zero=True)
                row["+512M zero"] = rss(proc.pid)
                trim(uri, "1G")
                row["trim all"] = rss(proc.pid)
            finally:
                proc.terminate()
                proc.wait(timeout=20)
            if name != "nbdkit-malloc":
                for step, options in MKFS_ROWS.items():
                    sock = os.path.join(tmp, f"{name}-{len(row)}.sock")
                    row[step] = mkfs_rss(commands(sock, "16G")[name], sock, tmp, options)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    names = list(table)
    print("server RSS in MiB (VmRSS); 1 TiB export (nbdkit-malloc: 1 GiB); "
          "mkfs.ext4 on a fresh 16 GiB export")
    print(f"{'step':14}" + "".join(f"{n:>15}" for n in names))
    for step in ["start", "+512M data", "+512M zero", "trim all", *MKFS_ROWS]:
        cells = []
        for n in names:
            value = table[n].get(step)
            cells.append(f"{value / MiB:15.1f}" if value is not None else f"{'not run':>15}")
        print(f"{step:14}" + "".join(cells))
    print(f"{'zero write s':14}" + "".join(f"{table[n]['zero time']:15.2f}" for n in names))
    print(json.dumps({n: {k: round(v / MiB, 1) if k != "zero time" else round(v, 2)
                          for k, v in row.items()} for n, row in table.items()}))


if __name__ == "__main__":
    main()
