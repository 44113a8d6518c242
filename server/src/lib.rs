//! ramnbd: a RAM disk served over the NBD protocol.
//!
//! Module map:
//! * [`cli`] — the command-line contract (clap).
//! * [`config`] — validated configuration built from the command line.
//! * [`export`] — named exports and the transmission flags they advertise.
//! * [`ramdisk`] — the RAM store: anonymous mapping, chunk locks, allocation map. The only
//!   module with `unsafe` code.
//! * [`proto`] — the wire protocol without I/O: constants, errno values, option payloads,
//!   request decoding and reply encoding.
//! * [`session`] — one connection: handshake, then pipelined transmission.
//! * [`server`] — listeners, accept loop, connection cap and graceful shutdown.

pub mod cli;
pub mod config;
pub mod export;
pub mod proto;
pub mod ramdisk;
pub mod server;
pub mod session;
