//! Shared code of the fuzz targets: the client's side of the wire (`wire`) and the
//! whole-session harness (`session`), the option phase under TLS modes (`tls`), also used to
//! write the seed corpus.

pub mod session;
pub mod tls;
pub mod wire;
