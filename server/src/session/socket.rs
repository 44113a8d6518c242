//! The stream a session reads from. A plain TCP or Unix socket can also hand a large WRITE's
//! payload straight to the store ([`Update::receive`]: the kernel copies from its socket
//! buffer into the store's pages, one copy per byte); a TLS stream, whose bytes must be
//! decrypted first, or an in-memory test stream cannot, and its payloads go through the
//! receive buffer.

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use tokio::io::{AsyncRead, Interest, ReadHalf};

use crate::ramdisk::Update;

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
