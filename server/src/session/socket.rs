//! The streams a session reads from and writes to. A plain TCP or Unix socket can also hand a
//! large WRITE's payload straight to the store ([`Update::receive`]: the kernel copies from
//! its socket buffer into the store's pages, one copy per byte), and take large READ data
//! straight from it ([`RamDisk::send`]); a TLS stream, whose bytes must be decrypted or
//! encrypted, or an in-memory test stream cannot, and its payloads go through the connection's
//! buffers.

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadHalf, WriteHalf};

use crate::ramdisk::{RamDisk, Update};

/// A stream the transmission phase reads from.
pub trait Receive: AsyncRead + Unpin {
    /// Whether [`Receive::receive_into`] can read from this stream.
    fn is_socket(&self) -> bool {
        false
    }

    /// Waits until the socket has input, then receives as much of `update`'s range as is
    /// waiting straight into the store. Returns the bytes received (0: the peer closed the
    /// stream). Cancel-safe: bytes received are recorded in `update` before it returns.
    fn receive_into(&self, update: &mut Update<'_>) -> impl Future<Output = io::Result<usize>> {
        let _ = update;
        std::future::ready(Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this stream is not a socket",
        )))
    }
}

/// The receiving loop shared by both socket kinds: `readable` waits for readiness, `try_io`
/// runs the receive and clears readiness when it finds nothing (`WouldBlock`).
macro_rules! socket_receive {
    ($half:ty, $stream:ty) => {
        impl Receive for $half {
            fn is_socket(&self) -> bool {
                true
            }

            async fn receive_into(&self, update: &mut Update<'_>) -> io::Result<usize> {
                let stream: &$stream = self.as_ref();
                loop {
                    stream.readable().await?;
                    let socket: BorrowedFd<'_> = stream.as_fd();
                    let mut bytes = 0;
                    // A receive that found the socket empty reports WouldBlock to `try_io`,
                    // which then clears the readiness it acted on (not any that came since),
                    // so the next wait goes to the reactor instead of a recv that would only
                    // fail with EAGAIN.
                    let received = stream.try_io(Interest::READABLE, || {
                        let received = update.receive(socket)?;
                        bytes = received.bytes;
                        if received.drained {
                            Err(io::ErrorKind::WouldBlock.into())
                        } else {
                            Ok(())
                        }
                    });
                    match received {
                        Ok(()) => return Ok(bytes),
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                            if bytes > 0 {
                                return Ok(bytes);
                            }
                        }
                        Err(err) => return Err(err),
                    }
                }
            }
        }
    };
}

socket_receive!(tokio::net::tcp::OwnedReadHalf, tokio::net::TcpStream);
socket_receive!(tokio::net::unix::OwnedReadHalf, tokio::net::UnixStream);

/// Halves of a joined stream: TLS sessions (and in-memory test streams) read through the
/// receive buffer.
impl<T: AsyncRead> Receive for ReadHalf<T> {}

/// A stream the transmission phase writes replies to.
pub trait Reply: AsyncWrite + Unpin {
    /// Whether [`Reply::send_from`] can write to this stream.
    fn is_socket(&self) -> bool {
        false
    }

    /// Waits until the socket has room, then sends as much of `len` bytes of `disk` at
    /// `offset` as it takes straight from the store. Returns the bytes sent.
    fn send_from(
        &self,
        disk: &RamDisk,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = io::Result<usize>> {
        let _ = (disk, offset, len);
        std::future::ready(Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this stream is not a socket",
        )))
    }
}

macro_rules! socket_reply {
    ($half:ty, $stream:ty) => {
        impl Reply for $half {
            fn is_socket(&self) -> bool {
                true
            }

            async fn send_from(&self, disk: &RamDisk, offset: u64, len: u64) -> io::Result<usize> {
                let stream: &$stream = self.as_ref();
                loop {
                    stream.writable().await?;
                    let socket: BorrowedFd<'_> = stream.as_fd();
                    match stream.try_io(Interest::WRITABLE, || disk.send(offset, len, socket)) {
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                        sent => return sent,
                    }
                }
            }
        }
    };
}

socket_reply!(tokio::net::tcp::OwnedWriteHalf, tokio::net::TcpStream);
socket_reply!(tokio::net::unix::OwnedWriteHalf, tokio::net::UnixStream);

impl<T: AsyncWrite> Reply for WriteHalf<T> {}
