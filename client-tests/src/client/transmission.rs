//! The transmission phase: requests, replies, and responses matched by cookie.
//!
//! Replies are parsed by their magic, whatever was negotiated, and then checked against the
//! negotiated [`ReplyMode`]: a simple reply after EXTENDED_HEADERS, or a simple READ reply after
//! STRUCTURED_REPLY, is a protocol violation and panics with the bytes seen.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufReader, ErrorKind, Read, Write};
use std::thread;
use std::time::Duration;

use super::{Pending, PendingMap, RawClient, ReplyMode, Stream};
use crate::proto::*;

/// Largest reply chunk payload accepted: the spec says a server MUST NOT send a chunk larger
/// than the maximum payload (32 MiB) plus its fixed overhead (the 8-byte offset of
/// OFFSET_DATA), and libnbd and qemu drop a server that does. A longer length field is a
/// violation, or a desynchronised stream.
const MAX_REPLY_PAYLOAD: u64 = 32 * 1024 * 1024 + 8;

/// Header style of a request. By default it follows the negotiation (extended headers iff
/// EXTENDED_HEADERS was ACKed); tests may force either to send a wrong one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderStyle {
    /// 28 bytes, 32-bit length.
    Compact,
    /// 32 bytes, 64-bit length.
    Extended,
}

/// One request. Constructors fill in the usual fields; builder methods bend them.
#[derive(Clone)]
pub struct Request {
    pub flags: u16,
    pub ty: u16,
    /// `None`: the writer assigns the next free cookie.
    pub cookie: Option<u64>,
    pub offset: u64,
    /// The header's length field (for WRITE normally the payload length).
    pub length: u64,
    /// Bytes sent right after the header.
    pub payload: Vec<u8>,
    /// Send `flags` exactly; otherwise PAYLOAD_LEN is added under extended headers for a WRITE or
    /// any request with a payload, as libnbd does.
    pub exact_flags: bool,
    /// `None`: per negotiation.
    pub header: Option<HeaderStyle>,
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("ty", &self.ty)
            .field("flags", &format_args!("{:#x}", self.flags))
            .field("cookie", &self.cookie)
            .field("offset", &self.offset)
            .field("length", &self.length)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

impl Request {
    pub fn new(ty: u16, offset: u64, length: u64) -> Request {
        Request {
            flags: 0,
            ty,
            cookie: None,
            offset,
            length,
            payload: Vec::new(),
            exact_flags: false,
            header: None,
        }
    }

    pub fn read(offset: u64, length: u64) -> Request {
        Request::new(CMD_READ, offset, length)
    }

    /// A WRITE whose length field is the data's length.
    pub fn write(offset: u64, data: &[u8]) -> Request {
        Request::new(CMD_WRITE, offset, data.len() as u64).payload(data.to_vec())
    }

    pub fn trim(offset: u64, length: u64) -> Request {
        Request::new(CMD_TRIM, offset, length)
    }

    pub fn write_zeroes(offset: u64, length: u64) -> Request {
        Request::new(CMD_WRITE_ZEROES, offset, length)
    }

    pub fn flush() -> Request {
        Request::new(CMD_FLUSH, 0, 0)
    }

    pub fn cache(offset: u64, length: u64) -> Request {
        Request::new(CMD_CACHE, offset, length)
    }

    pub fn block_status(offset: u64, length: u64) -> Request {
        Request::new(CMD_BLOCK_STATUS, offset, length)
    }

    pub fn disc() -> Request {
        Request::new(CMD_DISC, 0, 0)
    }

    /// Adds command flags.
    pub fn flags(mut self, flags: u16) -> Request {
        self.flags |= flags;
        self
    }

    /// Sets the flags field to exactly `flags` (no automatic PAYLOAD_LEN).
    pub fn exact_flags(mut self, flags: u16) -> Request {
        self.flags = flags;
        self.exact_flags = true;
        self
    }

    pub fn cookie(mut self, cookie: u64) -> Request {
        self.cookie = Some(cookie);
        self
    }

    /// Replaces the payload without touching the length field.
    pub fn payload(mut self, payload: Vec<u8>) -> Request {
        self.payload = payload;
        self
    }

    /// Replaces the length field without touching the payload.
    pub fn length(mut self, length: u64) -> Request {
        self.length = length;
        self
    }

    pub fn header(mut self, style: HeaderStyle) -> Request {
        self.header = Some(style);
        self
    }

    /// The header bytes (without the payload).
    pub fn encode_header(&self, style: HeaderStyle, cookie: u64) -> Vec<u8> {
        let mut flags = self.flags;
        if style == HeaderStyle::Extended
            && !self.exact_flags
            && (self.ty == CMD_WRITE || !self.payload.is_empty())
        {
            // libnbd's way: PAYLOAD_LEN on every request with a payload. The flag is optional
            // on WRITE (qemu omits it; tests send that with `exact_flags`) and required on any
            // other request that carries a payload.
            flags |= CMD_FLAG_PAYLOAD_LEN;
        }
        let mut header = Vec::with_capacity(32);
        let magic = match style {
            HeaderStyle::Compact => REQUEST_MAGIC,
            HeaderStyle::Extended => EXTENDED_REQUEST_MAGIC,
        };
        header.extend_from_slice(&magic.to_be_bytes());
        header.extend_from_slice(&flags.to_be_bytes());
        header.extend_from_slice(&self.ty.to_be_bytes());
        header.extend_from_slice(&cookie.to_be_bytes());
        header.extend_from_slice(&self.offset.to_be_bytes());
        match style {
            HeaderStyle::Compact => {
                let length = u32::try_from(self.length).unwrap_or_else(|_| {
                    panic!("length {} does not fit a compact header", self.length)
                });
                header.extend_from_slice(&length.to_be_bytes());
            }
            HeaderStyle::Extended => header.extend_from_slice(&self.length.to_be_bytes()),
        }
        header
    }
}

/// The sending half of a connection.
#[derive(Debug)]
pub struct RequestWriter {
    stream: Stream,
    pending: PendingMap,
    next_cookie: u64,
    pub(crate) mode: ReplyMode,
}

impl RequestWriter {
    pub(crate) fn new(stream: Stream, pending: PendingMap) -> RequestWriter {
        RequestWriter {
            stream,
            pending,
            // Start well away from 0 so a server that zeroes or truncates cookies is caught.
            next_cookie: 0x1000_0000_0000_0001,
            mode: ReplyMode::Simple,
        }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("sending {} bytes: {e}", bytes.len()));
    }

    /// Like `send_raw`, but reports the error (for tests where the server may hang up).
    pub fn try_send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Registers the request as in flight (unless it is DISC, which gets no reply) and returns
    /// its header style and cookie.
    fn register(&mut self, request: &Request) -> (HeaderStyle, u64) {
        let style = request.header.unwrap_or(match self.mode {
            ReplyMode::Extended => HeaderStyle::Extended,
            _ => HeaderStyle::Compact,
        });
        let cookie = request.cookie.unwrap_or_else(|| {
            let cookie = self.next_cookie;
            self.next_cookie += 1;
            cookie
        });
        if request.ty != CMD_DISC {
            let previous = self.pending.lock().expect("pending map").insert(
                cookie,
                Pending {
                    ty: request.ty,
                    offset: request.offset,
                    length: request.length,
                },
            );
            assert!(
                previous.is_none(),
                "test bug: cookie {cookie:#x} is already in flight"
            );
        }
        (style, cookie)
    }

    /// Sends one request; returns its cookie.
    pub fn send(&mut self, request: &Request) -> u64 {
        let (style, cookie) = self.register(request);
        let header = request.encode_header(style, cookie);
        self.send_raw(&header);
        if !request.payload.is_empty() {
            self.send_raw(&request.payload);
        }
        cookie
    }

    /// Sends all requests with a single write, so they really are in flight together. Returns
    /// the cookies in request order.
    pub fn send_all(&mut self, requests: &[Request]) -> Vec<u64> {
        let mut bytes = Vec::new();
        let mut cookies = Vec::with_capacity(requests.len());
        for request in requests {
            let (style, cookie) = self.register(request);
            bytes.extend_from_slice(&request.encode_header(style, cookie));
            bytes.extend_from_slice(&request.payload);
            cookies.push(cookie);
        }
        self.send_raw(&bytes);
        cookies
    }
}

/// One reply unit off the wire.
#[derive(Debug, Clone)]
pub enum Frame {
    /// A 16-byte simple reply, plus the data of a successful READ.
    Simple {
        error: u32,
        cookie: u64,
        data: Vec<u8>,
    },
    /// A structured (20-byte header) or extended (32-byte header) chunk.
    Chunk(Chunk),
}

/// A structured or extended reply chunk.
#[derive(Clone)]
pub struct Chunk {
    /// Came with the 32-byte extended header.
    pub extended: bool,
    pub flags: u16,
    pub ty: u16,
    pub cookie: u64,
    /// The extended header's offset field.
    pub offset: Option<u64>,
    pub payload: Vec<u8>,
}

impl fmt::Debug for Chunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chunk")
            .field("extended", &self.extended)
            .field("flags", &self.flags)
            .field("ty", &self.ty)
            .field("cookie", &format_args!("{:#x}", self.cookie))
            .field("offset", &self.offset)
            .field("payload_len", &self.payload.len())
            .field("body", &self.body())
            .finish()
    }
}

/// A block status descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    pub flags: u64,
}

/// A parsed chunk payload.
#[derive(Clone, PartialEq, Eq)]
pub enum ChunkBody {
    None,
    OffsetData {
        offset: u64,
        data: Vec<u8>,
    },
    OffsetHole {
        offset: u64,
        length: u64,
    },
    BlockStatus {
        context: u32,
        extents: Vec<Extent>,
    },
    BlockStatusExt {
        context: u32,
        extents: Vec<Extent>,
    },
    Error {
        error: u32,
        message: String,
    },
    ErrorOffset {
        error: u32,
        message: String,
        offset: u64,
    },
    /// An unknown error type (bit 15 set): clients must treat it as an error.
    UnknownError {
        ty: u16,
        error: u32,
    },
}

impl fmt::Debug for ChunkBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChunkBody::None => write!(f, "NONE"),
            ChunkBody::OffsetData { offset, data } => {
                write!(f, "OFFSET_DATA {{ offset: {offset}, len: {} }}", data.len())
            }
            ChunkBody::OffsetHole { offset, length } => {
                write!(f, "OFFSET_HOLE {{ offset: {offset}, len: {length} }}")
            }
            ChunkBody::BlockStatus { context, extents } => {
                write!(f, "BLOCK_STATUS {{ context: {context}, {extents:?} }}")
            }
            ChunkBody::BlockStatusExt { context, extents } => {
                write!(f, "BLOCK_STATUS_EXT {{ context: {context}, {extents:?} }}")
            }
            ChunkBody::Error { error, message } => write!(f, "ERROR {{ {error}, {message:?} }}"),
            ChunkBody::ErrorOffset {
                error,
                message,
                offset,
            } => write!(
                f,
                "ERROR_OFFSET {{ {error}, {message:?}, offset {offset} }}"
            ),
            ChunkBody::UnknownError { ty, error } => write!(f, "error type {ty} {{ {error} }}"),
        }
    }
}

fn be_u16(bytes: &[u8]) -> u16 {
    u16::from_be_bytes(bytes[..2].try_into().expect("2 bytes"))
}

fn be_u32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes"))
}

fn be_u64(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"))
}

/// Checks a wire error value: nonzero (where an error is claimed) and one the spec allows.
fn check_errno(error: u32, context: &dyn fmt::Debug) {
    assert!(
        SPEC_ERRORS.contains(&error),
        "error value {error} is not one the spec allows on the wire ({SPEC_ERRORS:?}); in {context:?}"
    );
}

impl Chunk {
    pub fn is_done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }

    /// Parses the payload, panicking on a layout the spec forbids.
    pub fn body(&self) -> ChunkBody {
        let p = &self.payload;
        let bad = |why: &str| -> ! {
            panic!(
                "malformed chunk type {} ({why}); payload {:02x?}",
                self.ty,
                &p[..p.len().min(64)]
            )
        };
        match self.ty {
            REPLY_TYPE_NONE => {
                if !p.is_empty() {
                    bad("NONE must have length 0");
                }
                ChunkBody::None
            }
            REPLY_TYPE_OFFSET_DATA => {
                if p.len() < 9 {
                    bad("OFFSET_DATA needs an offset and at least one byte");
                }
                ChunkBody::OffsetData {
                    offset: be_u64(p),
                    data: p[8..].to_vec(),
                }
            }
            REPLY_TYPE_OFFSET_HOLE => {
                // 32-bit hole size; tolerate a 64-bit one under extended headers.
                let length = match (p.len(), self.extended) {
                    (12, _) => u64::from(be_u32(&p[8..])),
                    (16, true) => be_u64(&p[8..]),
                    _ => bad("OFFSET_HOLE must be 12 bytes"),
                };
                if length == 0 {
                    bad("hole size MUST be nonzero");
                }
                ChunkBody::OffsetHole {
                    offset: be_u64(p),
                    length,
                }
            }
            REPLY_TYPE_BLOCK_STATUS => {
                if p.len() < 12 || !(p.len() - 4).is_multiple_of(8) {
                    bad("BLOCK_STATUS must be 4 + 8n bytes with n >= 1");
                }
                let extents = p[4..]
                    .chunks_exact(8)
                    .map(|d| Extent {
                        length: u64::from(be_u32(d)),
                        flags: u64::from(be_u32(&d[4..])),
                    })
                    .collect();
                ChunkBody::BlockStatus {
                    context: be_u32(p),
                    extents,
                }
            }
            REPLY_TYPE_BLOCK_STATUS_EXT => {
                if p.len() < 24 || !(p.len() - 8).is_multiple_of(16) {
                    bad("BLOCK_STATUS_EXT must be 8 + 16n bytes with n >= 1");
                }
                let count = be_u32(&p[4..]) as usize;
                if count != (p.len() - 8) / 16 {
                    bad("BLOCK_STATUS_EXT descriptor count does not match its length");
                }
                let extents = p[8..]
                    .chunks_exact(16)
                    .map(|d| Extent {
                        length: be_u64(d),
                        flags: be_u64(&d[8..]),
                    })
                    .collect();
                ChunkBody::BlockStatusExt {
                    context: be_u32(p),
                    extents,
                }
            }
            REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
                if p.len() < 6 {
                    bad("error chunk shorter than 6 bytes");
                }
                let error = be_u32(p);
                let msg_len = be_u16(&p[4..]) as usize;
                let tail = if self.ty == REPLY_TYPE_ERROR { 0 } else { 8 };
                if p.len() != 6 + msg_len + tail {
                    bad("error chunk length disagrees with its message length");
                }
                let message = String::from_utf8_lossy(&p[6..6 + msg_len]).into_owned();
                if self.ty == REPLY_TYPE_ERROR {
                    ChunkBody::Error { error, message }
                } else {
                    ChunkBody::ErrorOffset {
                        error,
                        message,
                        offset: be_u64(&p[6 + msg_len..]),
                    }
                }
            }
            ty if ty & 0x8000 != 0 && p.len() >= 4 => ChunkBody::UnknownError {
                ty,
                error: be_u32(p),
            },
            // A client MUST hard-disconnect on an unknown non-error chunk type.
            _ => bad("unknown chunk type"),
        }
    }
}

/// Every frame the server sent for one cookie, up to the simple reply or the DONE chunk.
#[derive(Debug, Clone)]
pub struct Response {
    pub cookie: u64,
    pub frames: Vec<Frame>,
}

impl Response {
    /// A single simple reply.
    pub fn is_simple(&self) -> bool {
        matches!(self.frames.as_slice(), [Frame::Simple { .. }])
    }

    /// The chunks (empty for a simple reply).
    pub fn chunks(&self) -> Vec<&Chunk> {
        self.frames
            .iter()
            .filter_map(|f| match f {
                Frame::Chunk(c) => Some(c),
                Frame::Simple { .. } => None,
            })
            .collect()
    }

    /// 0 on success, otherwise the (first) error value.
    pub fn error(&self) -> u32 {
        for frame in &self.frames {
            match frame {
                Frame::Simple { error, .. } => return *error,
                Frame::Chunk(chunk) => match chunk.body() {
                    ChunkBody::Error { error, .. }
                    | ChunkBody::ErrorOffset { error, .. }
                    | ChunkBody::UnknownError { error, .. } => return error,
                    _ => {}
                },
            }
        }
        0
    }

    /// `Ok(())` or `Err(error value)`.
    pub fn result(&self) -> Result<(), u32> {
        match self.error() {
            0 => Ok(()),
            error => Err(error),
        }
    }

    /// The data of a successful READ of `length` bytes at `offset`. For chunks it checks that
    /// OFFSET_DATA/OFFSET_HOLE chunks cover the range exactly once (any split is valid).
    pub fn read_data(&self, offset: u64, length: u64) -> Result<Vec<u8>, u32> {
        self.result()?;
        if let [Frame::Simple { data, .. }] = self.frames.as_slice() {
            assert_eq!(data.len() as u64, length, "simple READ reply data length");
            return Ok(data.clone());
        }
        let mut data = vec![0u8; usize::try_from(length).expect("read length fits usize")];
        // (start, end) of every piece, to prove coverage without overlap.
        let mut pieces = Vec::new();
        for chunk in self.chunks() {
            let (start, bytes, len) = match chunk.body() {
                ChunkBody::OffsetData { offset: o, data: d } => {
                    let len = d.len() as u64;
                    (o, Some(d), len)
                }
                ChunkBody::OffsetHole {
                    offset: o,
                    length: l,
                } => (o, None, l),
                ChunkBody::None => continue,
                other => panic!("unexpected chunk in a successful READ reply: {other:?}"),
            };
            assert!(
                start >= offset && start + len <= offset + length,
                "READ chunk [{start}, +{len}) is outside the request [{offset}, +{length}): {self:?}"
            );
            let at = (start - offset) as usize;
            if let Some(bytes) = bytes {
                data[at..at + bytes.len()].copy_from_slice(&bytes);
            } // a hole reads as zeroes, which `data` already holds
            pieces.push((start, start + len));
        }
        pieces.sort_unstable();
        let mut next = offset;
        for (start, end) in &pieces {
            assert_eq!(
                *start, next,
                "READ chunks leave a gap or overlap at {next}: pieces {pieces:?}"
            );
            next = *end;
        }
        assert_eq!(
            next,
            offset + length,
            "READ chunks do not cover the whole range: pieces {pieces:?}"
        );
        Ok(data)
    }

    /// The descriptors of the (single) block status chunk for `context`.
    pub fn extents(&self, context: u32) -> Result<Vec<Extent>, u32> {
        self.result()?;
        let mut found = Vec::new();
        for chunk in self.chunks() {
            match chunk.body() {
                ChunkBody::BlockStatus {
                    context: c,
                    extents,
                }
                | ChunkBody::BlockStatusExt {
                    context: c,
                    extents,
                } => {
                    assert_eq!(c, context, "block status for an unselected context");
                    found.push(extents);
                }
                ChunkBody::None => {}
                other => panic!("unexpected chunk in a BLOCK_STATUS reply: {other:?}"),
            }
        }
        assert_eq!(
            found.len(),
            1,
            "exactly one status chunk per selected context: {self:?}"
        );
        let extents = found.pop().expect("one");
        assert!(
            extents.iter().all(|e| e.length > 0),
            "every descriptor length must be nonzero: {extents:?}"
        );
        Ok(extents)
    }
}

/// The receiving half of a connection.
#[derive(Debug)]
pub struct ReplyReader {
    stream: BufReader<Stream>,
    pending: PendingMap,
    pub(crate) mode: ReplyMode,
    /// Chunks of responses not yet DONE.
    partial: HashMap<u64, Vec<Frame>>,
    /// Responses complete but not yet asked for.
    completed: HashMap<u64, Response>,
}

impl ReplyReader {
    pub(crate) fn new(stream: BufReader<Stream>, pending: PendingMap) -> ReplyReader {
        ReplyReader {
            stream,
            pending,
            mode: ReplyMode::Simple,
            partial: HashMap::new(),
            completed: HashMap::new(),
        }
    }

    pub(crate) fn stream(&self) -> &Stream {
        self.stream.get_ref()
    }

    pub fn try_recv_exact(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; n];
        self.stream.read_exact(&mut buf)?;
        Ok(buf)
    }

    pub fn recv_exact(&mut self, n: usize) -> Vec<u8> {
        self.try_recv_exact(n)
            .unwrap_or_else(|e| panic!("reading {n} bytes from the server: {e}"))
    }

    /// See [`RawClient::expect_closed`].
    pub fn expect_closed(&mut self, timeout: Duration) -> Result<(), Vec<u8>> {
        self.stream()
            .set_read_timeout(Some(timeout))
            .expect("set the read timeout");
        let mut buf = [0u8; 4096];
        let result = match self.stream.read(&mut buf) {
            Ok(0) => Ok(()),
            Ok(n) => Err(buf[..n].to_vec()),
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
                Ok(())
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("the server kept the connection open for {timeout:?}")
            }
            Err(e) => panic!("reading from the server: {e}"),
        };
        self.stream()
            .set_read_timeout(Some(super::DEFAULT_READ_TIMEOUT))
            .expect("restore the read timeout");
        result
    }

    /// See [`RawClient::closed_within`].
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        self.stream()
            .set_read_timeout(Some(timeout))
            .expect("set the read timeout");
        let mut buf = [0u8; 65536];
        let closed = loop {
            match self.stream.read(&mut buf) {
                Ok(0) => break true,
                Ok(_) => continue,
                Err(e)
                    if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) =>
                {
                    break true;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break false,
            }
        };
        self.stream()
            .set_read_timeout(Some(super::DEFAULT_READ_TIMEOUT))
            .expect("restore the read timeout");
        closed
    }

    fn pending_for(&self, cookie: u64, header: &[u8]) -> Pending {
        *self
            .pending
            .lock()
            .expect("pending map")
            .get(&cookie)
            .unwrap_or_else(|| {
                panic!("reply for cookie {cookie:#x}, which is not in flight; header {header:02x?}")
            })
    }

    fn finish(&mut self, cookie: u64) {
        self.pending.lock().expect("pending map").remove(&cookie);
    }

    /// Reads one frame and checks it against the spec's rules for every reply.
    pub fn recv_frame(&mut self) -> Frame {
        let magic_bytes = self.recv_exact(4);
        let magic = be_u32(&magic_bytes);
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let rest = self.recv_exact(12);
                let header = [magic_bytes, rest.clone()].concat();
                let error = be_u32(&rest);
                let cookie = be_u64(&rest[4..]);
                let pending = self.pending_for(cookie, &header);
                assert!(
                    self.mode != ReplyMode::Extended,
                    "simple reply after EXTENDED_HEADERS (every reply MUST be an extended chunk): {header:02x?}"
                );
                assert!(
                    !(self.mode == ReplyMode::Structured && pending.ty == CMD_READ),
                    "simple reply to READ after STRUCTURED_REPLY (MUST be structured): {header:02x?}"
                );
                if error != 0 {
                    check_errno(error, &header);
                }
                let data = if pending.ty == CMD_READ && error == 0 {
                    let length = usize::try_from(pending.length).expect("read length");
                    self.recv_exact(length)
                } else {
                    Vec::new()
                };
                self.finish(cookie);
                Frame::Simple {
                    error,
                    cookie,
                    data,
                }
            }
            STRUCTURED_REPLY_MAGIC | EXTENDED_REPLY_MAGIC => {
                let extended = magic == EXTENDED_REPLY_MAGIC;
                let rest = self.recv_exact(if extended { 28 } else { 16 });
                let header = [magic_bytes, rest.clone()].concat();
                let flags = be_u16(&rest);
                let ty = be_u16(&rest[2..]);
                let cookie = be_u64(&rest[4..]);
                let (offset, length) = if extended {
                    (Some(be_u64(&rest[12..])), be_u64(&rest[20..]))
                } else {
                    (None, u64::from(be_u32(&rest[12..])))
                };
                match self.mode {
                    ReplyMode::Simple => {
                        panic!("chunk without STRUCTURED_REPLY/EXTENDED_HEADERS: {header:02x?}")
                    }
                    ReplyMode::Structured => assert!(
                        !extended,
                        "extended chunk without EXTENDED_HEADERS: {header:02x?}"
                    ),
                    ReplyMode::Extended => assert!(
                        extended,
                        "20-byte structured chunk after EXTENDED_HEADERS: {header:02x?}"
                    ),
                }
                let pending = self.pending_for(cookie, &header);
                if let Some(offset) = offset {
                    assert_eq!(
                        offset, pending.offset,
                        "extended chunk offset MUST equal the request offset: {header:02x?}"
                    );
                }
                assert!(
                    length <= MAX_REPLY_PAYLOAD,
                    "chunk claims {length} payload bytes: {header:02x?}"
                );
                let payload = self.recv_exact(length as usize);
                let chunk = Chunk {
                    extended,
                    flags,
                    ty,
                    cookie,
                    offset,
                    payload,
                };
                // Parse now so that malformed chunks fail at the point of reception.
                match chunk.body() {
                    ChunkBody::None => {
                        assert!(chunk.is_done(), "NONE chunk without DONE: {header:02x?}")
                    }
                    ChunkBody::Error { error, .. }
                    | ChunkBody::ErrorOffset { error, .. }
                    | ChunkBody::UnknownError { error, .. } => {
                        assert_ne!(error, 0, "error chunk with error 0: {chunk:?}");
                        check_errno(error, &chunk);
                    }
                    _ => {}
                }
                if chunk.is_done() {
                    self.finish(cookie);
                }
                Frame::Chunk(chunk)
            }
            _ => {
                let more = self.try_recv_exact(28).unwrap_or_default();
                panic!("unknown reply magic {magic:#010x}; next bytes {more:02x?}")
            }
        }
    }

    /// The next response to complete, whichever cookie it belongs to.
    pub fn recv_response(&mut self) -> Response {
        if let Some(cookie) = self.completed.keys().next().copied() {
            return self.completed.remove(&cookie).expect("present");
        }
        loop {
            let frame = self.recv_frame();
            let (cookie, done) = match &frame {
                Frame::Simple { cookie, .. } => (*cookie, true),
                Frame::Chunk(chunk) => (chunk.cookie, chunk.is_done()),
            };
            let mut frames = self.partial.remove(&cookie).unwrap_or_default();
            if let (Frame::Simple { .. }, false) = (&frame, frames.is_empty()) {
                panic!("simple reply for cookie {cookie:#x} after chunks for it: {frames:?}");
            }
            frames.push(frame);
            if done {
                return Response { cookie, frames };
            }
            self.partial.insert(cookie, frames);
        }
    }

    /// Waits for the response to `cookie`, keeping others for later.
    pub fn wait(&mut self, cookie: u64) -> Response {
        loop {
            if let Some(response) = self.completed.remove(&cookie) {
                return response;
            }
            let response = self.recv_response();
            if response.cookie == cookie {
                return response;
            }
            self.completed.insert(response.cookie, response);
        }
    }

    /// Reads `n` complete responses, keyed by cookie.
    pub fn recv_responses(&mut self, n: usize) -> HashMap<u64, Response> {
        let mut responses = HashMap::with_capacity(n);
        for _ in 0..n {
            let response = self.recv_response();
            let cookie = response.cookie;
            assert!(
                responses.insert(cookie, response).is_none(),
                "two responses for cookie {cookie:#x}"
            );
        }
        responses
    }

    /// How many requests are still awaiting a reply.
    pub fn in_flight(&self) -> usize {
        self.pending.lock().expect("pending map").len()
    }
}

impl RawClient {
    pub(crate) fn set_mode(&mut self, mode: ReplyMode) {
        self.negotiated.mode = mode;
        self.writer.mode = mode;
        self.reader.mode = mode;
    }

    /// Sends one request; returns its cookie.
    pub fn send(&mut self, request: &Request) -> u64 {
        self.writer.send(request)
    }

    /// Waits for the response to `cookie`.
    pub fn wait(&mut self, cookie: u64) -> Response {
        self.reader.wait(cookie)
    }

    /// Sends a request and waits for its response.
    pub fn roundtrip(&mut self, request: &Request) -> Response {
        let cookie = self.send(request);
        self.wait(cookie)
    }

    /// Sends all requests at once from a second thread while this one collects the responses
    /// (so neither side can stall on full socket buffers). Responses come back in request order.
    pub fn pipeline(&mut self, requests: &[Request]) -> Vec<Response> {
        let (writer, reader) = self.split();
        let (cookies, mut responses) = thread::scope(|scope| {
            let sender = scope.spawn(|| writer.send_all(requests));
            let responses = reader.recv_responses(requests.len());
            (sender.join().expect("sender thread"), responses)
        });
        cookies
            .iter()
            .map(|cookie| {
                responses
                    .remove(cookie)
                    .unwrap_or_else(|| panic!("no response for cookie {cookie:#x}"))
            })
            .collect()
    }

    pub fn read_flags(&mut self, offset: u64, length: u64, flags: u16) -> Result<Vec<u8>, u32> {
        self.roundtrip(&Request::read(offset, length).flags(flags))
            .read_data(offset, length)
    }

    pub fn read(&mut self, offset: u64, length: u64) -> Result<Vec<u8>, u32> {
        self.read_flags(offset, length, 0)
    }

    pub fn write_flags(&mut self, offset: u64, data: &[u8], flags: u16) -> Result<(), u32> {
        self.roundtrip(&Request::write(offset, data).flags(flags))
            .result()
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), u32> {
        self.write_flags(offset, data, 0)
    }

    pub fn trim(&mut self, offset: u64, length: u64) -> Result<(), u32> {
        self.roundtrip(&Request::trim(offset, length)).result()
    }

    pub fn write_zeroes(&mut self, offset: u64, length: u64, flags: u16) -> Result<(), u32> {
        self.roundtrip(&Request::write_zeroes(offset, length).flags(flags))
            .result()
    }

    pub fn flush(&mut self) -> Result<(), u32> {
        self.roundtrip(&Request::flush()).result()
    }

    pub fn cache(&mut self, offset: u64, length: u64) -> Result<(), u32> {
        self.roundtrip(&Request::cache(offset, length)).result()
    }

    /// BLOCK_STATUS for the negotiated base:allocation context.
    pub fn block_status(
        &mut self,
        offset: u64,
        length: u64,
        flags: u16,
    ) -> Result<Vec<Extent>, u32> {
        let context = self
            .negotiated
            .base_allocation_id()
            .expect("base:allocation was not negotiated on this connection");
        self.roundtrip(&Request::block_status(offset, length).flags(flags))
            .extents(context)
    }

    /// Sends NBD_CMD_DISC (no reply is expected).
    pub fn disc(&mut self) {
        self.send(&Request::disc());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_header_layout() {
        let header = Request::read(0x0102_0304_0506_0708, 0x1000)
            .flags(CMD_FLAG_FUA)
            .encode_header(HeaderStyle::Compact, 0xaabb);
        assert_eq!(header.len(), 28);
        assert_eq!(&header[0..4], &REQUEST_MAGIC.to_be_bytes());
        assert_eq!(&header[4..8], &[0, 1, 0, 0]);
        assert_eq!(&header[8..16], &0xaabbu64.to_be_bytes());
        assert_eq!(&header[16..24], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&header[24..28], &[0, 0, 0x10, 0]);
    }

    #[test]
    fn extended_write_gets_payload_len() {
        let header = Request::write(0, &[1, 2, 3]).encode_header(HeaderStyle::Extended, 1);
        assert_eq!(header.len(), 32);
        assert_eq!(&header[0..4], &EXTENDED_REQUEST_MAGIC.to_be_bytes());
        assert_eq!(be_u16(&header[4..]), CMD_FLAG_PAYLOAD_LEN);
        assert_eq!(be_u64(&header[24..]), 3);
        // ...unless the test asks for exact flags.
        let header = Request::write(0, &[1])
            .exact_flags(0)
            .encode_header(HeaderStyle::Extended, 1);
        assert_eq!(be_u16(&header[4..]), 0);
    }

    fn chunk(ty: u16, flags: u16, payload: Vec<u8>) -> Chunk {
        Chunk {
            extended: false,
            flags,
            ty,
            cookie: 7,
            offset: None,
            payload,
        }
    }

    fn data_chunk(offset: u64, data: &[u8], flags: u16) -> Frame {
        let mut payload = offset.to_be_bytes().to_vec();
        payload.extend_from_slice(data);
        Frame::Chunk(chunk(REPLY_TYPE_OFFSET_DATA, flags, payload))
    }

    fn hole_chunk(offset: u64, length: u32, flags: u16) -> Frame {
        let mut payload = offset.to_be_bytes().to_vec();
        payload.extend_from_slice(&length.to_be_bytes());
        Frame::Chunk(chunk(REPLY_TYPE_OFFSET_HOLE, flags, payload))
    }

    #[test]
    fn read_data_assembles_any_valid_cover() {
        let response = Response {
            cookie: 7,
            frames: vec![
                hole_chunk(102, 2, 0),
                data_chunk(100, &[1, 2], 0),
                data_chunk(104, &[5], REPLY_FLAG_DONE),
            ],
        };
        assert_eq!(response.read_data(100, 5), Ok(vec![1, 2, 0, 0, 5]));
    }

    #[test]
    #[should_panic(expected = "gap or overlap")]
    fn read_data_rejects_overlapping_chunks() {
        let response = Response {
            cookie: 7,
            frames: vec![
                data_chunk(100, &[1, 2], 0),
                data_chunk(101, &[2, 3], REPLY_FLAG_DONE),
            ],
        };
        let _ = response.read_data(100, 3);
    }

    #[test]
    #[should_panic(expected = "do not cover")]
    fn read_data_rejects_a_short_cover() {
        let response = Response {
            cookie: 7,
            frames: vec![data_chunk(100, &[1, 2], REPLY_FLAG_DONE)],
        };
        let _ = response.read_data(100, 3);
    }

    #[test]
    fn error_chunk_is_parsed() {
        let mut payload = EINVAL.to_be_bytes().to_vec();
        payload.extend_from_slice(&2u16.to_be_bytes());
        payload.extend_from_slice(b"no");
        let response = Response {
            cookie: 7,
            frames: vec![Frame::Chunk(chunk(
                REPLY_TYPE_ERROR,
                REPLY_FLAG_DONE,
                payload,
            ))],
        };
        assert_eq!(response.error(), EINVAL);
        assert_eq!(response.read_data(0, 1), Err(EINVAL));
    }

    #[test]
    fn block_status_ext_checks_its_count() {
        let mut payload = 9u32.to_be_bytes().to_vec();
        payload.extend_from_slice(&1u32.to_be_bytes());
        payload.extend_from_slice(&4096u64.to_be_bytes());
        payload.extend_from_slice(&3u64.to_be_bytes());
        let c = chunk(REPLY_TYPE_BLOCK_STATUS_EXT, REPLY_FLAG_DONE, payload);
        assert_eq!(
            c.body(),
            ChunkBody::BlockStatusExt {
                context: 9,
                extents: vec![Extent {
                    length: 4096,
                    flags: 3
                }]
            }
        );
    }
}
