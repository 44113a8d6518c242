//! ramnbd: a RAM disk served over the NBD protocol.
//!
//! Module map:
//! * [`access`] — who the peer is and the access rules: allowed networks, uids, gids, TLS
//!   identities, for the whole server and per export.
//! * [`cli`] — the command-line contract (clap).
//! * [`config`] — validated configuration: the TOML file ([`config::file`]) with the command
//!   line on top.
//! * [`export`] — named exports and the transmission flags they advertise.
//! * [`image`] — snapshots of exports in image files: loaded at start, saved on stop, SIGHUP
//!   and every `save-interval`.
//! * [`ramdisk`] — the RAM store: anonymous or memfd mapping, chunk locks, allocation map,
//!   dirty pages for snapshots. The only module with `unsafe` code.
//! * [`proto`] — the wire protocol without I/O: constants, errno values, option payloads,
//!   request decoding and reply encoding.
//! * [`session`] — one connection: handshake, then pipelined transmission.
//! * [`server`] — listeners, accept loop, connection cap and graceful shutdown.
//! * [`shutdown`] — the phases of a graceful stop, shared by listeners and sessions.
//! * [`systemd`] — socket activation (`LISTEN_FDS`) and readiness notification (`sd_notify`).
//! * [`logsafe`] — client-supplied text shown safely in log lines ([`logsafe::Untrusted`]).
//! * [`metrics`] — request and connection counters, served in the Prometheus text format.
//! * [`handover`] — handed-over connections passed to another process over a Unix socket.
//! * [`tls`] — TLS (STARTTLS): the mode, X.509 credentials and their reload, the handshake.

pub mod access;
pub mod cli;
pub mod config;
pub mod export;
pub mod handover;
pub mod image;
pub mod journal;
pub mod logsafe;
pub mod metrics;
pub mod proto;
pub mod ramdisk;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod systemd;
pub mod tls;
