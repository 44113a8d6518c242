//! Passing handed-over connections straight to another process over a Unix stream socket
//! (SCM_RIGHTS), for a take-over without the service manager's fd store: the old process
//! [`send`]s the [`SuspendedConnection`]s its `server::serve` returned, the new one
//! [`receive`]s them and adopts them with `server::serve_adopting`.
//!
//! On the channel, per connection: a header of 12 bytes, `RNBDCONN` and the encoded state's
//! length (u32, big-endian), carrying the connection's socket as SCM_RIGHTS, then the state
//! (`Suspended::encode`). After the last one, the header `RNBDDONE` with length 0 and no
//! socket. The calls block: run them outside the runtime or under `spawn_blocking`.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

use crate::server::SuspendedConnection;
use crate::session::{MAX_PENDING, Suspended};

const CONNECTION: &[u8; 8] = b"RNBDCONN";
const DONE: &[u8; 8] = b"RNBDDONE";
const HEADER_LEN: usize = 12;
/// The longest encoded state: its fixed fields, a 4096-byte name, the pending input.
const MAX_STATE: usize = 32 + 4096 + MAX_PENDING;
/// More connections than any server holds: a channel sending more is broken.
const MAX_CONNECTIONS: usize = 1 << 20;

/// Sends every connection, then the end mark. The sockets stay open here too until
/// `connections` is dropped (the receiver has its own descriptors by then).
pub fn send(channel: &UnixStream, connections: &[SuspendedConnection]) -> io::Result<()> {
    for connection in connections {
        let state = connection.state.encode();
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(CONNECTION);
        header[8..].copy_from_slice(&(state.len() as u32).to_be_bytes());
        let fds = [connection.socket.as_fd()];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        assert!(
            control.push(SendAncillaryMessage::ScmRights(&fds)),
            "room for one fd"
        );
        // The socket goes with the header's first byte; the rest follows as plain bytes.
        let sent = rustix::net::sendmsg(
            channel,
            &[IoSlice::new(&header)],
            &mut control,
            SendFlags::NOSIGNAL,
        )?;
        (&*channel).write_all(&header[sent..])?;
        (&*channel).write_all(&state)?;
    }
    let mut done = [0u8; HEADER_LEN];
    done[..8].copy_from_slice(DONE);
    (&*channel).write_all(&done)
}

/// Receives connections until the end mark. A connection whose state this binary cannot read
/// (a newer layout, or damage) is logged and closed, and the others are still taken; a broken
/// channel is an error.
pub fn receive(channel: &UnixStream) -> io::Result<Vec<SuspendedConnection>> {
    let mut connections = Vec::new();
    loop {
        let (header, socket) = receive_header(channel)?;
        if &header[..8] == DONE {
            return Ok(connections);
        }
        if &header[..8] != CONNECTION {
            return Err(broken("a header that is not one"));
        }
        let Some(socket) = socket else {
            return Err(broken("a connection without its socket"));
        };
        let len = u32::from_be_bytes(header[8..].try_into().expect("4 bytes")) as usize;
        if len > MAX_STATE {
            return Err(broken("a state longer than any session's"));
        }
        let mut state = vec![0u8; len];
        (&*channel).read_exact(&mut state)?;
        match Suspended::decode(&state) {
            Ok(state) => connections.push(SuspendedConnection { socket, state }),
            Err(err) => {
                tracing::warn!(cause = %err, "closing a connection passed on with a bad state");
                let _ = rustix::net::shutdown(&socket, rustix::net::Shutdown::Both);
            }
        }
        if connections.len() > MAX_CONNECTIONS {
            return Err(broken("more connections than any server holds"));
        }
    }
}

/// Reads one header, and the socket that came with it, if any.
fn receive_header(channel: &UnixStream) -> io::Result<([u8; HEADER_LEN], Option<OwnedFd>)> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    let mut socket = None;
    while got < HEADER_LEN {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let received = rustix::net::recvmsg(
            channel,
            &mut [IoSliceMut::new(&mut header[got..])],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        if received.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
            return Err(broken("more descriptors than one per connection"));
        }
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = message {
                for fd in fds {
                    if socket.replace(fd).is_some() {
                        return Err(broken("more descriptors than one per connection"));
                    }
                }
            }
        }
        if received.bytes == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += received.bytes;
    }
    Ok((header, socket))
}

fn broken(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("take-over channel sent {what}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(export: &str, pending: &[u8]) -> Suspended {
        Suspended {
            export: export.to_owned(),
            export_size: 1 << 20,
            structured: false,
            extended: false,
            transmission_flags: 0x0d6d,
            base_allocation: None,
            pending: pending.to_vec(),
        }
    }

    #[test]
    fn connections_arrive_with_their_sockets_and_states() {
        let (old, new) = UnixStream::pair().unwrap();
        let mut clients = Vec::new();
        let mut connections = Vec::new();
        for i in 0..3u8 {
            let (client, server) = UnixStream::pair().unwrap();
            clients.push(client);
            let pending = vec![i; usize::from(i) * 100_000];
            connections.push(SuspendedConnection {
                socket: server.into(),
                state: state("disk", &pending),
            });
        }
        let expected: Vec<Suspended> = connections.iter().map(|c| c.state.clone()).collect();
        let receiving = std::thread::spawn(move || receive(&new).unwrap());
        send(&old, &connections).unwrap();
        // The old process's descriptors close; the new process's keep the connections.
        drop(connections);
        let received = receiving.join().unwrap();
        let states: Vec<Suspended> = received.iter().map(|c| c.state.clone()).collect();
        assert_eq!(states, expected);
        for (i, (client, connection)) in clients.iter_mut().zip(received).enumerate() {
            client.write_all(&[i as u8; 3]).unwrap();
            let mut server = UnixStream::from(connection.socket);
            let mut got = [0u8; 3];
            server.read_exact(&mut got).unwrap();
            assert_eq!(got, [i as u8; 3], "connection {i} is the same socket");
        }
    }

    #[test]
    fn a_state_this_binary_cannot_read_closes_its_connection_only() {
        let (old, new) = UnixStream::pair().unwrap();
        let (mut bad_client, bad_server) = UnixStream::pair().unwrap();
        let (_good_client, good_server) = UnixStream::pair().unwrap();
        // A state from a newer release: version 2.
        let mut newer = state("disk", b"").encode();
        newer[9] = 2;
        let mut header = CONNECTION.to_vec();
        header.extend((newer.len() as u32).to_be_bytes());
        let fds = [bad_server.as_fd()];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        control.push(SendAncillaryMessage::ScmRights(&fds));
        let flags = SendFlags::empty();
        rustix::net::sendmsg(&old, &[IoSlice::new(&header)], &mut control, flags).unwrap();
        (&old).write_all(&newer).unwrap();
        drop(bad_server);
        let good = SuspendedConnection {
            socket: good_server.into(),
            state: state("disk", b"x"),
        };
        send(&old, std::slice::from_ref(&good)).unwrap();
        let received = receive(&new).unwrap();
        assert_eq!(received.len(), 1);
        assert_eq!(received[0].state, good.state);
        let mut byte = [0u8; 1];
        assert_eq!(bad_client.read(&mut byte).unwrap(), 0, "closed cleanly");
    }

    #[test]
    fn a_broken_channel_is_an_error() {
        let (old, new) = UnixStream::pair().unwrap();
        (&old).write_all(b"RNBDCONN\0\0\0\x10").unwrap();
        let err = receive(&new).unwrap_err();
        assert!(err.to_string().contains("without its socket"), "{err}");
        let (old, new) = UnixStream::pair().unwrap();
        (&old).write_all(b"garbage!\0\0\0\0").unwrap();
        assert_eq!(
            receive(&new).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        let (old, new) = UnixStream::pair().unwrap();
        (&old).write_all(b"RNBD").unwrap();
        drop(old);
        assert_eq!(
            receive(&new).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}
