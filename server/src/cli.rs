//! The command line. Its contract is relied on by scripts and systemd units; see `--help`.

use std::path::PathBuf;

use clap::Parser;

/// ramnbd: a RAM disk served over NBD, so the Linux kernel (nbd-client), qemu, libnbd and fio
/// see it as a real block device.
///
/// With no arguments, serves one 1 GiB export named "" (the default export) on
/// 127.0.0.1:10809. Memory is taken from the kernel only as data is written and given back on
/// TRIM; everything is lost when the server stops, unless the export has an image (--image).
#[derive(Debug, Clone, Parser)]
#[command(
    name = "ramnbd",
    version = env!("RAMNBD_VERSION"),
    after_help = "\
EXAMPLES:
  ramnbd                                   1 GiB default export on 127.0.0.1:10809
  ramnbd -s 16G -u /run/ramnbd.sock        16 GiB, on a Unix socket only
  ramnbd -e scratch=64G -e iso=4G,ro,description='install media'
  nbd-client 127.0.0.1 10809 /dev/nbd0 -N scratch    attach as a kernel block device
  nbdinfo nbd://127.0.0.1:10809                       show what the server offers

  ramnbd -c /etc/ramnbd/ramnbd.toml --metrics 127.0.0.1:9109
  ramnbd --check-config /etc/ramnbd/ramnbd.toml    validate a config file

Sizes take binary units: 512M = 512 MiB, 4G = 4 GiB, 1T = 1 TiB.
Logging: --log-level, else RUST_LOG (e.g. RUST_LOG=ramnbd=debug), else info.
Config file: --config, else /etc/ramnbd/ramnbd.toml if it exists; flags override it.
Under systemd socket activation (LISTEN_FDS), the inherited sockets are served and
nothing is bound; readiness and status go to NOTIFY_SOCKET (Type=notify)."
)]
pub struct Cli {
    /// Read settings from this TOML file. Without it, /etc/ramnbd/ramnbd.toml is read if it
    /// exists. Flags given here override the file.
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Do not read /etc/ramnbd/ramnbd.toml.
    #[arg(long, conflicts_with = "config")]
    pub no_config: bool,

    /// Validate the configuration and exit: 0 if it is valid, 1 if not. Checks FILE, else
    /// --config, else the default file, with any other flags applied on top.
    #[arg(short = 't', long, value_name = "FILE", num_args = 0..=1)]
    pub check_config: Option<Option<PathBuf>>,

    /// Serve Prometheus metrics over HTTP at http://HOST:PORT/metrics (off by default).
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics: Option<String>,

    /// How long a stopping server (SIGTERM, SIGINT) lets connections finish requests already
    /// sent before it closes them (e.g. 10s, 500ms, 1m30s; at most 1h; default 10s).
    #[arg(long, value_name = "DURATION")]
    pub shutdown_grace: Option<String>,

    /// Connections served at once; further clients wait until one leaves (default 1024). The
    /// soft open-files limit is raised at start to what this needs.
    #[arg(long, value_name = "N")]
    pub max_connections: Option<String>,

    /// Connections one client may hold at once, counted by IP address for TCP (0: no limit,
    /// the default). A connection over it is closed before the greeting.
    #[arg(long, value_name = "N")]
    pub max_connections_per_client: Option<String>,

    /// Close a connection that has not finished its handshake within this time (default 10s;
    /// 0: no deadline, which lets silent connections hold their slot for ever).
    #[arg(long, value_name = "DURATION")]
    pub handshake_timeout: Option<String>,

    /// Idle time before TCP keepalive probes find a vanished client (default 60s; 0: off).
    #[arg(long, value_name = "DURATION")]
    pub tcp_keepalive: Option<String>,

    /// Accept TCP clients only from this network (CIDR such as 10.0.0.0/8 or fd00::/8, or one
    /// address). Repeatable; replaces the config file's list. Without it, any address may
    /// connect. Others are closed before the greeting. Unix-socket clients are not affected.
    #[arg(long, value_name = "CIDR")]
    pub allow: Vec<String>,

    /// Size of the default export (binary units: 4G = 4 GiB).
    #[arg(short, long, value_name = "SIZE", conflicts_with = "exports")]
    pub size: Option<String>,

    /// Add an export: NAME=SIZE[,OPTION]..., where each OPTION is one of ro, max-memory=SIZE,
    /// image=PATH, save-interval=DURATION, tls=require, allow=CIDR, allow-uid=UID,
    /// allow-gid=GID, allow-identity=NAME, description=TEXT. Repeatable; when given, there is no default export. An empty NAME (`=1G`) is the default
    /// export. The description runs to the end of the argument, commas included. The allow
    /// options repeat and restrict who may see and use the export: allow= TCP networks,
    /// allow-uid=/allow-gid= Unix-socket peers, allow-identity= verified TLS certificate
    /// identities; an export with rules for only TCP or only Unix peers refuses the other kind.
    #[arg(short = 'e', long = "export", value_name = "SPEC")]
    pub exports: Vec<String>,

    /// Listen on a TCP address (HOST:PORT; port 0 picks a free one). Repeatable. Without
    /// --listen or --unix: 127.0.0.1:10809.
    #[arg(short, long = "listen", value_name = "HOST:PORT")]
    pub listen: Vec<String>,

    /// Listen on a Unix socket. Repeatable.
    #[arg(short, long = "unix", value_name = "PATH")]
    pub unix: Vec<PathBuf>,

    /// Make every export read-only.
    #[arg(long)]
    pub read_only: bool,

    /// Cap on the RAM all exports together may hold (binary units). A write that would go over
    /// it fails with ENOSPC; TRIM and zero writes make room again.
    #[arg(long, value_name = "SIZE")]
    pub max_memory: Option<String>,

    /// Lock export pages in RAM as they are written (never swapped). Needs RLIMIT_MEMLOCK
    /// (systemd: LimitMEMLOCK=) at least as large as the memory the exports will hold.
    #[arg(long)]
    pub mlock: bool,

    /// Back exports with transparent huge pages (MADV_HUGEPAGE): fewer TLB misses, but RAM is
    /// then taken and returned in 2 MiB units, so TRIMs smaller than 2 MiB free less.
    #[arg(long)]
    pub hugepages: bool,

    /// Where export bytes live: anonymous (memory that dies with the process), memfd (a file
    /// in RAM that a service manager's file-descriptor store can keep across restarts), or
    /// auto: memfd when NOTIFY_SOCKET is set (under systemd), anonymous otherwise. Default:
    /// auto.
    #[arg(long, value_name = "KIND")]
    pub backing: Option<String>,
    /// Load the default export from this image file at start (if it exists) and save it there
    /// on stop, on SIGHUP (systemctl reload) and every --save-interval. A raw, sparse image of
    /// the export's size; other exports take image=PATH in --export or the config file.
    #[arg(long, value_name = "PATH")]
    pub image: Option<PathBuf>,

    /// Also save images this often (e.g. 10m, 1h; 0: only on stop and SIGHUP, the default).
    /// An export's own save-interval wins. A periodic save is skipped if nothing changed.
    #[arg(long, value_name = "DURATION")]
    pub save_interval: Option<String>,

    /// TLS (STARTTLS): off (the default), on (offered; exports with tls=require need it) or
    /// require (every client must start TLS before any option but ABORT). On and require need
    /// --tls-certificates.
    #[arg(long, value_name = "MODE")]
    pub tls: Option<String>,

    /// The TLS credentials directory, in the layout of nbdkit and qemu: server-cert.pem,
    /// server-key.pem and (for --tls-verify-peer) ca-cert.pem. Read again on SIGHUP.
    #[arg(long, value_name = "DIR")]
    pub tls_certificates: Option<PathBuf>,

    /// Require a client certificate signed by a CA in ca-cert.pem; its subject CN is the
    /// client's identity.
    #[arg(long)]
    pub tls_verify_peer: bool,

    /// TLS with pre-shared keys (identity:hexkey file): not supported by ramnbd's TLS stack;
    /// refused at start with an explanation.
    #[arg(long, value_name = "FILE")]
    pub tls_psk: Option<PathBuf>,

    /// Log level or filter (error, warn, info, debug, trace, or a RUST_LOG-style directive).
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
}
