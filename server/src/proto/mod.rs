//! The NBD wire protocol, with no sockets: constants, the errno values that may go on the wire,
//! option (handshake) payload parsing, and transmission request decoding and reply encoding.
//!
//! Everything here works on byte slices and `Vec<u8>` / `BytesMut`, so it is unit-tested without
//! I/O; `session` owns the stream and drives these functions.

pub mod capabilities;
pub mod consts;
pub mod errno;
pub mod handshake;
pub mod transmission;

pub use capabilities::Capabilities;
pub use errno::Errno;
