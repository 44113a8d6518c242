//! Shared code of the fuzz targets: the client's side of the wire (`wire`) and the
//! whole-session harness (`session`), also used to write the seed corpus.

pub mod session;
pub mod wire;
