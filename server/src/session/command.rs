//! A request header turned into a [`Command`]: every check a request must pass (flags,
//! payload, permission, range) is made here, once, before the store is touched.

use super::Negotiated;
use crate::proto::Errno;
use crate::proto::consts::*;
use crate::proto::transmission::Request;
use crate::ramdisk::ZeroMode;

/// Data chunks of a structured or extended READ reply carry at most this much: the spec says a
/// chunk must not exceed the maximum payload (libnbd and qemu drop a server that sends larger
/// ones), so a longer read goes out in several chunks, which it allows unless the client set DF.
pub const MAX_DATA_CHUNK: u64 = MAX_PAYLOAD as u64;

/// An error reply: the wire value and a message for clients that can show one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure(pub Errno, pub &'static str);

/// A valid request, ready to execute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u64,
    },
    /// `len` bytes of payload follow the header.
    Write {
        offset: u64,
        len: u64,
    },
    Disconnect,
    Flush,
    Trim {
        offset: u64,
        len: u64,
    },
    Cache,
    WriteZeroes {
        offset: u64,
        len: u64,
        mode: ZeroMode,
    },
    BlockStatus {
        offset: u64,
        len: u64,
        /// `REQ_ONE`: exactly one extent.
        one: bool,
        context: u32,
    },
}

impl Command {
    /// Checks `request` against what the connection negotiated. The order follows the spec's
    /// error table: command and flags first, then permission, then range.
    pub fn parse(request: &Request, negotiated: &Negotiated) -> Result<Command, Failure> {
        let caps = &negotiated.capabilities;
        let Request {
            flags,
            command,
            offset,
            length: len,
            payload_len,
            ..
        } = *request;
        if !caps.supports(command) {
            return Err(Failure(Errno::Inval, "unknown command"));
        }
        if flags & !caps.allowed_flags(command) != 0 {
            return Err(Failure(
                Errno::Inval,
                "unknown or invalid flag for this command",
            ));
        }
        if command != CMD_WRITE && payload_len != 0 {
            return Err(Failure(Errno::Inval, "this command takes no payload"));
        }
        let size = negotiated.export.size();
        let range = |past_end: Errno| match offset.checked_add(len) {
            None => Err(Failure(Errno::Inval, "offset + length overflows")),
            Some(end) if end > size => Err(Failure(past_end, "beyond the end of the export")),
            Some(_) => Ok(()),
        };
        let writable = || {
            if caps.read_only() {
                Err(Failure(Errno::Perm, "export is read-only"))
            } else {
                Ok(())
            }
        };
        Ok(match command {
            CMD_READ => {
                range(Errno::Inval)?;
                if flags & CMD_FLAG_DF != 0 && len > MAX_DATA_CHUNK {
                    return Err(Failure(
                        Errno::Overflow,
                        "a DF read larger than 32 MiB cannot be sent in one chunk",
                    ));
                }
                Command::Read { offset, len }
            }
            CMD_WRITE => {
                writable()?;
                range(Errno::NoSpc)?;
                Command::Write { offset, len }
            }
            CMD_DISC => Command::Disconnect,
            // Writes are in RAM, visible to every connection, by the time they are replied
            // to: nothing to flush.
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => {
                writable()?;
                range(Errno::Inval)?;
                Command::Trim { offset, len }
            }
            CMD_CACHE => {
                range(Errno::Inval)?;
                Command::Cache
            }
            CMD_WRITE_ZEROES => {
                writable()?;
                range(Errno::NoSpc)?;
                // NO_HOLE asks for the range to stay allocated, so real zeroes are written.
                let mode = if flags & CMD_FLAG_NO_HOLE != 0 {
                    ZeroMode::Allocate
                } else {
                    ZeroMode::Release
                };
                Command::WriteZeroes { offset, len, mode }
            }
            CMD_BLOCK_STATUS => {
                let Some(context) = negotiated.base_allocation else {
                    return Err(Failure(Errno::Inval, "no metadata context negotiated"));
                };
                if len == 0 {
                    return Err(Failure(Errno::Inval, "zero-length block status"));
                }
                range(Errno::Inval)?;
                Command::BlockStatus {
                    offset,
                    len,
                    one: flags & CMD_FLAG_REQ_ONE != 0,
                    context,
                }
            }
            _ => return Err(Failure(Errno::Inval, "unknown command")),
        })
    }
}
