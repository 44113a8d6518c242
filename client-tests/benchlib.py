"""Starting, watching and stopping the servers the Python benches compare.

Four kinds, each serving one export on a Unix socket or a TCP port on 127.0.0.1:

  ramnbd        RAMNBD_BIN, else target/release/ramnbd (built by `cargo build --release -p ramnbd`)
  nbdkit-1.32   `nbdkit memory` on the host (Debian 12)
  nbdkit-1.42   `nbdkit memory` from the Debian 13 folder, through client-tests/trixie/run
  nbdkit-null   `nbdkit null` from the same folder: stores nothing (reads return zeroes, writes
                are dropped), so it measures what the transport and nbdkit's core cost, a
                ceiling for the servers that store data

    with benchlib.start("ramnbd", "1G", "unix", tmpdir) as server:
        run_fio(server.uri)
        print(server.cpu_seconds(), server.rss_bytes())

With `tls_dir` (a directory from `make_pki`), a server requires TLS (ramnbd `--tls require`,
nbdkit `--tls=require`) with the certificates there, and `uri` is an `nbds` URI naming that
directory for the client. libnbd refuses such a URI unless allowed to read local files, so
clients run in `client_env(tmpdir)`, which preloads a shim that allows it (built with gcc).

Every server runs in a session of its own, so a Ctrl-C reaches the bench (and its fio) but not
the servers, and the bench's `with` blocks then stop them (SIGTERM, SIGKILL after a timeout);
PR_SET_PDEATHSIG stops them if the bench itself is killed outright. Call `exit_on_signals()`
first so SIGTERM and SIGHUP unwind the same way. A server's stdout and stderr go to a log file
in tmpdir, shown if it fails.
"""

import ctypes
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TRIXIE_RUN = os.path.join(HERE, "trixie", "run")
TRIXIE_STAMP = os.path.join(HERE, ".cache", "trixie", "root", ".ramnbd-stamp")
KINDS = ["ramnbd", "nbdkit-1.32", "nbdkit-1.42", "nbdkit-null"]
# The nbdkit plugin each nbdkit kind runs, and which run from the Debian 13 folder.
PLUGINS = {"nbdkit-1.32": "memory", "nbdkit-1.42": "memory", "nbdkit-null": "null"}
TRIXIE_KINDS = ("nbdkit-1.42", "nbdkit-null")
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 30  # seconds; the Debian 13 nbdkit pays for unshare + chroot on a loaded box
PR_SET_PDEATHSIG = 1
_serial = itertools.count()  # unique socket and log names within one tmpdir


def _ramnbd_path():
    return os.environ.get("RAMNBD_BIN") or os.path.join(REPO, "target", "release", "ramnbd")


def ramnbd_binary():
    path = _ramnbd_path()
    if not os.access(path, os.X_OK):
        sys.exit(f"{path} not found: run cargo build --release -p ramnbd (or set RAMNBD_BIN)")
    return path


def missing(kind):
    """Why `kind` cannot be started here, or None."""
    if kind == "ramnbd":
        path = _ramnbd_path()
        return None if os.access(path, os.X_OK) else f"{path} not built"
    if kind == "nbdkit-1.32":
        return None if shutil.which("nbdkit") else "nbdkit not installed (Debian package nbdkit)"
    if kind in TRIXIE_KINDS:
        return None if os.path.exists(TRIXIE_STAMP) else \
            "no Debian 13 folder: run client-tests/trixie/build.sh"
    return f"unknown server kind {kind!r} (known: {', '.join(KINDS)})"


def free_tcp_port():
    # nbdkit cannot report a port it picked itself, so pick one for it. Another process could
    # take it before nbdkit binds; on this loopback-only box that has not been seen.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_on_signals():
    """Turns SIGTERM and SIGHUP into SystemExit, so `with` blocks stop servers on the way out."""
    def handler(signum, _frame):
        raise SystemExit(f"stopped by signal {signal.Signals(signum).name}")
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, handler)


def _die_with_parent():
    # Runs in the child between fork and exec; the setting survives exec (not set-uid).
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Server:
    """One running server process; a context manager that stops it on exit."""

    def __init__(self, kind, cmd, transport, tmpdir, unix_path=None, port=None, tls_dir=None):
        self.kind, self.transport, self.tls_dir = kind, transport, tls_dir
        # What nbdinfo runs in: with TLS, libnbd must be allowed the certificates directory.
        self.client_env = client_env(tmpdir) if tls_dir else None
        self.log_path = os.path.join(tmpdir, f"{kind}-{next(_serial)}.log")
        self.unix_path, self.port = unix_path, port
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        self.pid = self.proc.pid

    @property
    def uri(self):
        if self.tls_dir:
            if self.transport == "unix":
                return f"nbds+unix:///?socket={self.unix_path}&tls-certificates={self.tls_dir}"
            return f"nbds://127.0.0.1:{self.port}/?tls-certificates={self.tls_dir}"
        if self.transport == "unix":
            return f"nbd+unix:///?socket={self.unix_path}"
        return f"nbd://127.0.0.1:{self.port}/"

    def log_tail(self, lines=20):
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def fail(self, why):
        self.stop()
        sys.exit(f"{self.kind}: {why}\n--- {self.log_path}:\n{self.log_tail()}")

    def check_alive(self):
        if self.proc.poll() is not None:
            self.fail(f"exited with status {self.proc.returncode}")

    def wait_ready(self):
        """Returns once the server answers an NBD handshake on its socket or port."""
        # A whole handshake rather than a bare connect, which nbdkit would log as an error.
        deadline = time.monotonic() + START_TIMEOUT
        while self._nbdinfo().returncode != 0:
            self.check_alive()
            if time.monotonic() > deadline:
                self.fail(f"no NBD handshake after {START_TIMEOUT} s")
            time.sleep(0.05)

    def _nbdinfo(self, env=None):
        return subprocess.run(["nbdinfo", "--json", "--no-content", self.uri],
                              capture_output=True, text=True, timeout=20,
                              env=env or self.client_env)

    def info(self, env=None):
        """What the server advertises (nbdinfo --json): sizes, flags, block size constraints."""
        out = self._nbdinfo(env)
        if out.returncode != 0:
            self.fail(f"nbdinfo failed: {out.stderr.strip()}")
        return json.loads(out.stdout)

    def _proc_file(self, name):
        with open(f"/proc/{self.pid}/{name}") as f:
            return f.read()

    def cpu_seconds(self):
        """utime + stime of the whole process, threads included (also those that have exited)."""
        fields = self._proc_file("stat").rsplit(")", 1)[1].split()
        # After the ")" ending comm, fields[11] and [12] are stat fields 14 and 15.
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def rss_bytes(self):
        for line in self._proc_file("status").splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{self.kind}: no VmRSS in /proc/{self.pid}/status")

    def stop(self, timeout=10):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        self.stop()


class _Ramnbd(Server):
    def wait_ready(self):
        # ramnbd logs "listening on tcp 127.0.0.1:PORT" (or "unix PATH") once it accepts; with
        # port 0 it picks the port, read back from that line.
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            with open(self.log_path, errors="replace") as f:
                found = re.search(r"listening on (?:tcp \S+:(\d+)|unix )", f.read())
            if found:
                break
            self.check_alive()
            if time.monotonic() > deadline:
                self.fail(f"no 'listening on' line after {START_TIMEOUT} s")
            time.sleep(0.02)
        if found.group(1):
            self.port = int(found.group(1))


def start(kind, size, transport, tmpdir, extra=(), tls_dir=None):
    """Starts a server of `kind` with one export of `size` (binary units, e.g. "1G") on
    `transport` ("unix": a socket in tmpdir, which must lie under /tmp for the Debian 13 kinds;
    "tcp": 127.0.0.1). `extra` goes to the command line: ramnbd options, or nbdkit plugin
    parameters such as "allocator=malloc". With `tls_dir` (see `make_pki`; under /tmp for the
    Debian 13 kinds),
    the server requires TLS with the certificates there. Returns the Server once it answers
    NBD."""
    if why := missing(kind):
        sys.exit(f"cannot start {kind}: {why}")
    if transport not in ("unix", "tcp"):
        raise ValueError(f"transport {transport!r}")
    unix_path = port = None
    if transport == "unix":
        unix_path = os.path.join(tmpdir, f"{kind}-{next(_serial)}.sock")
        listen = ["-u" if kind == "ramnbd" else "-U", unix_path]
    elif kind == "ramnbd":
        listen = ["-l", "127.0.0.1:0"]
    else:
        port = free_tcp_port()
        listen = ["-i", "127.0.0.1", "-p", str(port)]
    if kind == "ramnbd":
        # Keep the log level at info or above: the "listening on" lines are the ready signal.
        tls = ["--tls", "require", "--tls-certificates", tls_dir] if tls_dir else []
        cmd = [ramnbd_binary(), "--no-config", "-s", size, *listen, *tls, *extra]
        server = _Ramnbd(kind, cmd, transport, tmpdir, unix_path, port, tls_dir)
    else:
        tls = ["--tls=require", f"--tls-certificates={tls_dir}"] if tls_dir else []
        cmd = ["nbdkit", "-f", *listen, *tls, PLUGINS[kind], size, *extra]
        if kind in TRIXIE_KINDS:
            # The wrapper execs all the way (unshare, sh, chroot, sh, nbdkit), so the PID is
            # nbdkit's own and /proc/PID/stat counts nbdkit's CPU; checked below.
            if unix_path and not unix_path.startswith("/tmp/"):
                raise ValueError(f"{kind} sees only the host's /tmp: put tmpdir under /tmp")
            if tls_dir and not tls_dir.startswith("/tmp/"):
                raise ValueError(f"{kind} sees only the host's /tmp: put tls_dir under /tmp")
            cmd = [TRIXIE_RUN, *cmd]
        server = Server(kind, cmd, transport, tmpdir, unix_path, port, tls_dir)
    try:
        server.wait_ready()
        comm = server._proc_file("comm").strip()
        if comm != ("ramnbd" if kind == "ramnbd" else "nbdkit"):
            server.fail(f"PID {server.pid} is {comm!r}, not the server: wrong CPU time and RSS")
    except BaseException:
        server.stop()
        raise
    return server


def version(kind):
    """The server's version line, e.g. "nbdkit 1.42.3"."""
    if kind == "ramnbd":
        cmd = [ramnbd_binary(), "--version"]
    else:
        cmd = ["nbdkit", "--version"]
        if kind in TRIXIE_KINDS:
            cmd = [TRIXIE_RUN, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()


SERVER_EXT = """subjectAltName=DNS:localhost,IP:127.0.0.1
extendedKeyUsage=serverAuth
basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment
"""


def make_pki(tmpdir):
    """A CA and a server certificate for 127.0.0.1 (P-256 keys) in a new directory in tmpdir,
    in nbdkit's layout, which ramnbd reads too and libnbd, for the CA, as well: ca-cert.pem,
    server-cert.pem, server-key.pem. Returns the directory."""
    if shutil.which("openssl") is None:
        sys.exit("openssl not found: install the Debian package openssl")
    pki = os.path.join(tmpdir, "pki")
    os.mkdir(pki)

    def openssl(*args):
        out = subprocess.run(["openssl", *args], cwd=pki, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"openssl {' '.join(args)} failed:\n{out.stderr.strip()}")

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "30",
            "-subj", "/CN=ramnbd bench CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    with open(os.path.join(pki, "server.ext"), "w") as f:
        f.write(SERVER_EXT)
    openssl("req", "-new", *ec, "-keyout", "server-key.pem", "-out", "server.csr",
            "-subj", "/CN=localhost")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
            "-CAcreateserial", "-out", "server-cert.pem", "-days", "30", "-extfile", "server.ext")
    # nbdkit reads the key as whoever runs it; keep it from other users all the same.
    os.chmod(os.path.join(pki, "server-key.pem"), 0o600)
    return pki


# Preloaded into a libnbd client (fio, nbdinfo): each new handle may read local files, which an
# nbds URI's tls-certificates=DIR needs (libnbd refuses it by default), and, with
# SIMPLE_REPLIES defined, does not ask for structured replies. No libnbd headers needed.
CLIENT_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdbool.h>
struct nbd_handle;
extern int nbd_set_request_structured_replies(struct nbd_handle *, bool);
extern int nbd_set_uri_allow_local_file(struct nbd_handle *, bool);
struct nbd_handle *nbd_create(void) {
    struct nbd_handle *(*real)(void) = (struct nbd_handle *(*)(void))dlsym(RTLD_NEXT, "nbd_create");
    struct nbd_handle *h = real();
    if (h) {
        nbd_set_uri_allow_local_file(h, true);
#ifdef SIMPLE_REPLIES
        nbd_set_request_structured_replies(h, false);
#endif
    }
    return h;
}
"""


def client_env(tmpdir, simple_replies=False):
    """The environment for a libnbd client in tmpdir: CLIENT_SHIM preloaded (built once)."""
    name = "client-shim-simple" if simple_replies else "client-shim"
    source, shim = os.path.join(tmpdir, name + ".c"), os.path.join(tmpdir, name + ".so")
    if not os.path.exists(shim):
        if shutil.which("gcc") is None:
            sys.exit("the libnbd client shim needs gcc (Debian package gcc)")
        with open(source, "w") as f:
            f.write(CLIENT_SHIM)
        defines = ["-DSIMPLE_REPLIES"] if simple_replies else []
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", *defines, "-o", shim, source, "-ldl"],
                       check=True)
    return dict(os.environ, LD_PRELOAD=shim)
