//! A raw, blocking NBD client for byte-exact and malformed-input tests.
//!
//! Unlike libnbd or qemu it sends exactly what a test asks for (unknown options, bad lengths,
//! unknown flags, requests without their payload) and hands back every byte the server sent, so
//! tests can assert the wire format itself. It also checks, on every reply it parses, the MUSTs
//! that apply to all replies (magic numbers, DONE on the last chunk, echoed cookies, extended
//! chunk offsets, only spec error values): a test gets them for free.
//!
//! * [`handshake`]: greeting, client flags, options and their replies, typed helpers per option.
//! * [`transmission`]: requests (compact and extended), simple replies, structured and extended
//!   chunks, responses matched by cookie, pipelining.
//!
//! The usual entry point is [`Negotiate`], which performs a complete handshake.

pub mod handshake;
pub mod transmission;

use std::collections::HashMap;
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use handshake::{ExportInfo, Greeting, ListedExport, OptReply};
pub use transmission::{
    Chunk, ChunkBody, Extent, Frame, ReplyReader, Request, RequestWriter, Response,
};

use crate::proto::*;

/// A read blocks at most this long by default, so a server that stops answering fails the test
/// instead of hanging it.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Where to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// A TCP or Unix stream socket.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub fn connect(target: &Target) -> io::Result<Stream> {
        let stream = match target {
            Target::Tcp(addr) => {
                let tcp = TcpStream::connect(addr)?;
                // Small requests and replies: do not let Nagle delay them (the spec's SHOULD).
                tcp.set_nodelay(true)?;
                Stream::Tcp(tcp)
            }
            Target::Unix(path) => Stream::Unix(UnixStream::connect(path)?),
        };
        stream.set_read_timeout(Some(DEFAULT_READ_TIMEOUT))?;
        Ok(stream)
    }

    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    /// Applies to every clone: they share one socket.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(timeout),
            Stream::Unix(s) => s.set_read_timeout(timeout),
        }
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// Which reply format the server must use, as negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReplyMode {
    /// Neither STRUCTURED_REPLY nor EXTENDED_HEADERS: 16-byte simple replies only.
    #[default]
    Simple,
    /// STRUCTURED_REPLY: READ replies MUST be 20-byte-header chunks; others may be either.
    Structured,
    /// EXTENDED_HEADERS: 32-byte requests, and every reply MUST be a 32-byte-header chunk.
    Extended,
}

/// What the handshake settled, as the client saw it.
#[derive(Debug, Clone, Default)]
pub struct Negotiated {
    pub mode: ReplyMode,
    /// The client flags sent after the greeting.
    pub client_flags: u32,
    /// Export size from INFO_EXPORT (GO) or the EXPORT_NAME reply.
    pub size: u64,
    /// Transmission flags from the same place.
    pub transmission_flags: u16,
    /// Meta contexts selected by the last SET_META_CONTEXT: (id, name).
    pub contexts: Vec<(u32, String)>,
}

impl Negotiated {
    /// The id the server gave `base:allocation`, if it was selected.
    pub fn base_allocation_id(&self) -> Option<u32> {
        self.contexts
            .iter()
            .find(|(_, name)| name == BASE_ALLOCATION)
            .map(|(id, _)| *id)
    }
}

/// Bookkeeping shared by the writer and the reader of one connection: what each in-flight cookie
/// asked for, so that a simple READ reply's data can be read and an extended chunk's offset
/// checked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pending {
    pub ty: u16,
    pub offset: u64,
    pub length: u64,
}

pub(crate) type PendingMap = Arc<Mutex<HashMap<u64, Pending>>>;

/// One connection: a [`RequestWriter`] and a [`ReplyReader`] over the same socket, plus the
/// negotiated state. Handshake methods are in [`handshake`], request helpers in
/// [`transmission`].
#[derive(Debug)]
pub struct RawClient {
    pub writer: RequestWriter,
    pub reader: ReplyReader,
    pub negotiated: Negotiated,
}

impl RawClient {
    /// Opens the socket; reads nothing yet.
    pub fn connect(target: &Target) -> RawClient {
        let stream =
            Stream::connect(target).unwrap_or_else(|e| panic!("connect to {target:?}: {e}"));
        let write_half = stream.try_clone().expect("clone the socket");
        let pending = PendingMap::default();
        RawClient {
            writer: RequestWriter::new(write_half, Arc::clone(&pending)),
            reader: ReplyReader::new(BufReader::new(stream), pending),
            negotiated: Negotiated::default(),
        }
    }

    /// Borrow both halves at once, e.g. to send from one thread while receiving on another
    /// (needed whenever more data is in flight than the socket buffers hold).
    pub fn split(&mut self) -> (&mut RequestWriter, &mut ReplyReader) {
        (&mut self.writer, &mut self.reader)
    }

    /// Writes raw bytes, whatever they are.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.send_raw(bytes);
    }

    /// Reads exactly `n` raw bytes (panics on EOF or timeout).
    pub fn recv_exact(&mut self, n: usize) -> Vec<u8> {
        self.reader.recv_exact(n)
    }

    pub fn set_read_timeout(&self, timeout: Duration) {
        self.reader
            .stream()
            .set_read_timeout(Some(timeout))
            .expect("set the read timeout");
    }

    /// Waits up to `timeout` for the server to close the connection. Returns `Ok(())` on EOF or
    /// a reset, and `Err(bytes)` if the server sent data instead. Panics if the connection is
    /// still open and silent after `timeout`.
    pub fn expect_closed(&mut self, timeout: Duration) -> Result<(), Vec<u8>> {
        self.reader.expect_closed(timeout)
    }

    /// Whether the server closed the connection within `timeout` (a reset counts), ignoring any
    /// bytes it sent first.
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        self.reader.closed_within(timeout)
    }
}

/// Builder for a complete fixed-newstyle handshake that ends in transmission.
///
/// ```no_run
/// # use ramnbd_client_tests::client::{Negotiate, Target};
/// # let target = Target::Unix("/tmp/s".into());
/// let mut conn = Negotiate::new("").structured().base_allocation().go(&target);
/// conn.write(0, b"hello").unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct Negotiate {
    export: String,
    client_flags: u32,
    structured: bool,
    extended: bool,
    contexts: Vec<String>,
    info_requests: Vec<u16>,
}

impl Negotiate {
    /// GO to `export` with client flags FIXED_NEWSTYLE|NO_ZEROES and simple replies.
    pub fn new(export: &str) -> Negotiate {
        Negotiate {
            export: export.to_owned(),
            client_flags: FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES,
            structured: false,
            extended: false,
            contexts: Vec::new(),
            info_requests: Vec::new(),
        }
    }

    /// Negotiate NBD_OPT_STRUCTURED_REPLY.
    pub fn structured(mut self) -> Self {
        self.structured = true;
        self
    }

    /// Negotiate NBD_OPT_EXTENDED_HEADERS (which implies structured replies).
    pub fn extended(mut self) -> Self {
        self.extended = true;
        self
    }

    /// SET_META_CONTEXT base:allocation (needs `structured` or `extended`).
    pub fn base_allocation(mut self) -> Self {
        self.contexts.push(BASE_ALLOCATION.to_owned());
        self
    }

    /// Info requests to put in the GO.
    pub fn info_requests(mut self, requests: &[u16]) -> Self {
        self.info_requests = requests.to_vec();
        self
    }

    pub fn client_flags(mut self, flags: u32) -> Self {
        self.client_flags = flags;
        self
    }

    /// Connects and negotiates; panics on any unexpected reply.
    pub fn go(self, target: &Target) -> RawClient {
        let mut client = RawClient::connect(target);
        client.read_greeting();
        client.send_client_flags(self.client_flags);
        if self.extended {
            let reply = client.opt_extended_headers();
            assert_eq!(reply.rep, REP_ACK, "EXTENDED_HEADERS: {reply:?}");
        } else if self.structured {
            let reply = client.opt_structured_reply();
            assert_eq!(reply.rep, REP_ACK, "STRUCTURED_REPLY: {reply:?}");
        }
        if !self.contexts.is_empty() {
            let queries: Vec<&str> = self.contexts.iter().map(String::as_str).collect();
            let selected = client
                .opt_set_meta_context(&self.export, &queries)
                .unwrap_or_else(|e| panic!("SET_META_CONTEXT {queries:?}: {e:?}"));
            for query in &queries {
                assert!(
                    selected.iter().any(|(_, name)| name == query),
                    "SET_META_CONTEXT did not select {query}: {selected:?}"
                );
            }
        }
        client
            .opt_go(&self.export, &self.info_requests)
            .unwrap_or_else(|e| panic!("GO {:?}: {e:?}", self.export));
        client
    }
}
