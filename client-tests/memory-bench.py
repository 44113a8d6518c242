#!/usr/bin/env python3
"""Memory benchmark: what a RAM disk really costs, ramnbd against nbdkit's memory plugin.

Servers one after another: ramnbd, nbdkit 1.32's `nbdkit memory` (default sparse allocator) and
`nbdkit memory allocator=malloc`, and nbdkit 1.42's `nbdkit memory` when the Debian 13 folder is
there (client-tests/trixie/build.sh). Each gets the same steps, and one table prints server RSS
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

    client-tests/memory-bench.py [--ramnbd PATH]   (default $RAMNBD_BIN, else target/release/ramnbd)

Servers start and stop through benchlib.py, as in bench.py.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import benchlib

MiB = 2**20
MKFS_ROWS = {"mkfs.ext4": []}


def rss(server):
    """VmRSS of `server`, half a second after the last client left, so each server has finished
    tearing the connection down."""
    time.sleep(0.5)
    return server.rss_bytes()


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


def mkfs_rss(kind, extra, tmp, mkfs_options):
    """Starts a 16 GiB server, runs mkfs.ext4 on it through nbdfuse, returns the server's RSS."""
    with benchlib.start(kind, "16G", "unix", tmp, extra) as server:
        mnt = os.path.join(tmp, "fuse")
        os.makedirs(mnt, exist_ok=True)
        disk = os.path.join(mnt, "disk")
        fuse = subprocess.Popen(["nbdfuse", disk, "--unix", server.unix_path])
        try:
            deadline = time.time() + 20
            while not os.path.exists(disk):
                if time.time() > deadline:
                    sys.exit("nbdfuse did not come up")
                time.sleep(0.05)
            subprocess.run(["mkfs.ext4", "-q", "-F", *mkfs_options, disk], check=True)
            return rss(server)
        finally:
            subprocess.run(["fusermount3", "-u", mnt], capture_output=True)
            fuse.wait(timeout=20)


# Column -> (server kind, export size for the first steps, plugin parameters).
COLUMNS = {
    "ramnbd": ("ramnbd", "1T", []),
    "nbdkit-sparse": ("nbdkit-1.32", "1T", []),
    # The malloc allocator fills the whole disk at start, so it gets 1 GiB, and no mkfs row.
    "nbdkit-malloc": ("nbdkit-1.32", "1G", ["allocator=malloc"]),
    "nbdkit-1.42": ("nbdkit-1.42", "1T", []),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ramnbd", help="the ramnbd binary (default: $RAMNBD_BIN, else "
                        "target/release/ramnbd)")
    args = parser.parse_args()
    if args.ramnbd:
        os.environ["RAMNBD_BIN"] = os.path.abspath(args.ramnbd)
    for tool, package in [("fio", "fio"), ("nbdkit", "nbdkit"), ("qemu-io", "qemu-utils"),
                          ("nbdfuse", "libnbd-bin"), ("mkfs.ext4", "e2fsprogs")]:
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: install the Debian package {package}")
    benchlib.ramnbd_binary()  # exits with a hint when it is not built
    columns = dict(COLUMNS)
    if why := benchlib.missing("nbdkit-1.42"):
        print(f"leaving out nbdkit-1.42: {why}", file=sys.stderr)
        del columns["nbdkit-1.42"]
    benchlib.exit_on_signals()

    table = {}
    with tempfile.TemporaryDirectory(prefix="ramnbd-membench-", dir="/tmp") as tmp:
        for name, (kind, size, extra) in columns.items():
            row = table.setdefault(name, {})
            with benchlib.start(kind, size, "unix", tmp, extra) as server:
                row["start"] = rss(server)
                fio_write(server.uri, 0, "512M", zero=False)
                row["+512M data"] = rss(server)
                row["zero time"] = fio_write(server.uri, "512M", "512M", zero=True)
                row["+512M zero"] = rss(server)
                trim(server.uri, "1G")
                row["trim all"] = rss(server)
            if "allocator=malloc" not in extra:
                for step, options in MKFS_ROWS.items():
                    row[step] = mkfs_rss(kind, extra, tmp, options)

    names = list(table)
    print("server RSS in MiB (VmRSS); 1 TiB export (nbdkit-malloc: 1 GiB); "
          "mkfs.ext4 on a fresh 16 GiB export; nbdkit-sparse/-malloc are nbdkit 1.32")
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
