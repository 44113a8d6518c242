//! Test harness for driving the `ramnbd` binary with real NBD clients.
//!
//! The integration tests in `tests/` start the real server binary and talk to it through:
//!
//! * [`server`]: [`Server`], a handle on one ramnbd process (builds the binary once per test
//!   process, starts it on a private Unix socket and `127.0.0.1:0`, collects its stderr, measures
//!   its RSS, stops it on drop).
//! * [`client`]: a raw, blocking NBD client for byte-exact and malformed-input tests, with
//!   pipelining and compact/extended headers.
//! * [`proto`]: wire constants, written independently of the server's.
//! * [`scrape`]: the server's `/metrics` endpoint, read back.
//! * [`tools`]: external clients (`require_tool`, running a command and reporting its output),
//!   random data.
//! * [`netns`]: network namespaces as client hosts with addresses of their own.
//! * [`clients`]: [`Clients`], the two generations of libnbd, qemu and fio (Debian 12's on the
//!   host, Debian 13's in `client-tests/trixie`), and [`both_generations!`], which turns a test
//!   body into one test per generation.
//!
//! The tests do not skip when a client is missing: [`tools::require_tool`] and
//! [`Clients::command`] fail with the Debian package to install (or the script that builds the
//! Debian 13 folder), with or without `CI=true`.

pub mod client;
pub mod clients;
pub mod netns;
pub mod proto;
pub mod scrape;
pub mod server;
pub mod tools;

pub use client::{Negotiate, RawClient, Request, Target};
pub use clients::Clients;
pub use server::Server;
pub use tools::{random_bytes, require_tool, run_ok};

/// 1 KiB, 1 MiB, 1 GiB, for readable sizes in tests.
pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;
