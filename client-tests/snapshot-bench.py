#!/usr/bin/env python3
"""Image benchmark: how long saving and loading an export's image take, and how long a save
holds client writes back, while a client writes.

Starts ramnbd with a SIZE export and an image in DIR, writes DATA of random data through
libnbd, then starts a writer process (4 KiB writes at random offsets of the data, each waiting
for its reply, timing each) and sends SIGHUP SAVES times, one save after the other. Then it
stops the writer, stops the server (the save on stop), and starts a new server on the image
(the load). Prints, per save: data, time, passes, the pause the server measured (the final
pass, writes held back) and the longest write latency the writer saw meanwhile; then the load.

    client-tests/snapshot-bench.py [--ramnbd PATH] [--size 2G] [--data-mib 1024] [--saves 3]
                                   [--dir /var/tmp]

The default binary is $RAMNBD_BIN, else target/release/ramnbd.
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

MiB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = "/usr/bin/python3"

WRITER = r"""
import os, random, sys, time, nbd
uri, data, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
h = nbd.NBD()
h.connect_uri(uri)
rand = random.Random(1)
buf = os.urandom(4096)
count, worst, marks = 0, 0.0, []
while not os.path.exists(stop):
    at = rand.randrange(data // 4096) * 4096
    t = time.monotonic()
    h.pwrite(buf, at)
    took = time.monotonic() - t
    worst = max(worst, took)
    count += 1
    if os.path.exists(stop + ".mark"):
        # The bench asks for the worst latency since its last question.
        os.unlink(stop + ".mark")
        print("worst %.6f count %d" % (worst, count), flush=True)
        worst = 0.0
print("worst %.6f count %d" % (worst, count), flush=True)
"""


def wait_for(log_path, pattern, after, timeout=600):
    """The first line of the log from byte `after` on that matches `pattern`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log_path, encoding="utf-8", errors="replace") as log:
            log.seek(after)
            for line in log:
                if re.search(pattern, line):
                    return line.strip()
        time.sleep(0.05)
    sys.exit("no %r in the server log within %d s" % (pattern, timeout))


def start(binary, size, image, sock, log_path):
    log = open(log_path, "a")
    proc = subprocess.Popen(
        [binary, "--no-config", "-s", size, "--image", image, "-u", sock, "-l", "127.0.0.1:0"],
        stderr=log, stdout=subprocess.DEVNULL, env=dict(os.environ, NO_COLOR="1"))
    wait_for(log_path, "listening on unix", 0)
    return proc


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.environ.get("RAMNBD_BIN", os.path.join(ROOT, "target/release/ramnbd"))
    parser.add_argument("--ramnbd", default=default)
    parser.add_argument("--size", default="2G")
    parser.add_argument("--data-mib", type=int, default=1024)
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--dir", default="/var/tmp")
    args = parser.parse_args()
    import nbd

    with tempfile.TemporaryDirectory(prefix="ramnbd-image-bench-", dir=args.dir) as tmp:
        image, sock, log_path = (os.path.join(tmp, n) for n in ("disk.img", "s.sock", "log"))
        stop = os.path.join(tmp, "stop")
        server = start(args.ramnbd, args.size, image, sock, log_path)
        uri = "nbd+unix:///?socket=" + sock
        h = nbd.NBD()
        h.connect_uri(uri)
        chunk = os.urandom(4 * MiB)
        for at in range(0, args.data_mib * MiB, 4 * MiB):
            h.pwrite(chunk, at)
        h.shutdown()
        writer = subprocess.Popen([PYTHON, "-c", WRITER, uri, str(args.data_mib * MiB), stop],
                                  stdout=subprocess.PIPE, text=True)
        time.sleep(1)
        print("%-8s %10s %8s %7s %10s %14s" % ("save", "data MiB", "time s", "passes",
                                               "pause ms", "worst write ms"))
        for i in range(args.saves):
            open(stop + ".mark", "w").close()
            writer.stdout.readline()  # resets the writer's worst latency
            after = os.path.getsize(log_path)
            server.send_signal(signal.SIGHUP)
            line = wait_for(log_path, "saved image", after)
            if os.environ.get("BENCH_VERBOSE"):
                print(line)
            open(stop + ".mark", "w").close()
            worst = float(writer.stdout.readline().split()[1]) * 1000
            m = re.search(r": ([\d.]+) MiB of data .* in ([\d.]+) s, longest pause ([\d.]+) ms.*"
                          r"passes=(\d+)", line)
            data, secs, pause, passes = m.group(1), m.group(2), m.group(3), m.group(4)
            print("%-8s %10s %8s %7s %10s %14.1f" % ("SIGHUP %d" % (i + 1), data, secs, passes,
                                                     pause, worst))
        open(stop, "w").close()
        print("writer:", writer.stdout.read().strip())
        writer.wait()
        after = os.path.getsize(log_path)
        server.send_signal(signal.SIGTERM)
        server.wait()
        print("stop:  ", wait_for(log_path, "saved image", after).split("saved image ")[1])
        st = os.stat(image)
        print("image:  %d MiB file, %d MiB allocated" % (st.st_size // MiB,
                                                        st.st_blocks * 512 // MiB))
        # Drop the image from the page cache where we may, so the load reads the disk.
        try:
            fd = os.open(image, os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        except OSError:
            pass
        after = os.path.getsize(log_path)
        t = time.monotonic()
        server = start(args.ramnbd, args.size, image, sock, log_path)
        ready = time.monotonic() - t
        print("load:  ", wait_for(log_path, "loaded image", after).split("loaded image: ")[1],
              "(serving %.2f s after start)" % ready)
        server.send_signal(signal.SIGKILL)
        server.wait()


if __name__ == "__main__":
    main()
