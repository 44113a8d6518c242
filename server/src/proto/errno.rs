//! The error values allowed on the wire. Never send a raw host errno: clients map unknown
//! values to EINVAL, and only these are defined by the specification.

/// An NBD transmission error, as carried in a reply's error field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[repr(u32)]
pub enum Errno {
    /// Write, trim or write-zeroes on a read-only export.
    #[error("operation not permitted (EPERM)")]
    Perm = 1,
    #[error("I/O error (EIO)")]
    Io = 5,
    /// Out of range, unknown command or flag, bad alignment, no metadata context.
    #[error("invalid argument (EINVAL)")]
    Inval = 22,
    /// Write or write-zeroes past the end of the export, or over the memory cap.
    #[error("no space left (ENOSPC)")]
    NoSpc = 28,
    #[error("value too large (EOVERFLOW)")]
    Overflow = 75,
    #[error("operation not supported (ENOTSUP)")]
    NotSup = 95,
    /// The server is shutting down; the client should disconnect.
    #[error("server shutting down (ESHUTDOWN)")]
    Shutdown = 108,
}

impl Errno {
    /// The value on the wire.
    pub fn code(self) -> u32 {
        self as u32
    }
}
