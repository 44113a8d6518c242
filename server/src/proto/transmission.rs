//! Transmission-phase framing: request headers in (compact 28-byte or extended 32-byte) and
//! replies out (simple, structured or extended chunks, as negotiated).

use super::Errno;
use super::consts::*;

pub const COMPACT_HEADER_LEN: usize = 28;
pub const EXTENDED_HEADER_LEN: usize = 32;

/// A decoded request header. `length` is 64-bit so both header forms share one type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
    /// Bytes of payload that follow the header on the wire (WRITE data, or an extended
    /// request's payload). The session must consume exactly this many bytes.
    pub payload_len: u64,
}

/// Outcome of looking at the start of the receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    /// Not enough bytes for a header yet.
    Incomplete,
    /// Wrong magic: the stream is out of sync and the connection must be dropped.
    BadMagic(u32),
    /// A header of `header_len` bytes.
    Request { request: Request, header_len: usize },
}

/// Decodes the header at the start of `buf`. With extended headers only the 32-byte form is
/// valid. A WRITE always carries `length` bytes of payload, in both forms and whether or not
/// `PAYLOAD_LEN` is set (qemu ≥ 8.2 never sets it on writes, libnbd ≥ 1.18 always does); any
/// other extended request carries a payload of `length` bytes exactly when it sets
/// `PAYLOAD_LEN`, and its length is otherwise an effect length.
pub fn decode_request(buf: &[u8], extended: bool) -> Decoded {
    let (expected_magic, header_len) = if extended {
        (EXTENDED_REQUEST_MAGIC, EXTENDED_HEADER_LEN)
    } else {
        (REQUEST_MAGIC, COMPACT_HEADER_LEN)
    };
    if buf.len() < header_len {
        return Decoded::Incomplete;
    }
    let be32 = |at: usize| u32::from_be_bytes(buf[at..at + 4].try_into().expect("4 bytes"));
    let be64 = |at: usize| u64::from_be_bytes(buf[at..at + 8].try_into().expect("8 bytes"));
    let magic = be32(0);
    if magic != expected_magic {
        return Decoded::BadMagic(magic);
    }
    let flags = u16::from_be_bytes([buf[4], buf[5]]);
    let command = u16::from_be_bytes([buf[6], buf[7]]);
    let cookie = be64(8);
    let offset = be64(16);
    let (length, payload_len) = if extended {
        let length = be64(24);
        let has_payload = command == CMD_WRITE || flags & CMD_FLAG_PAYLOAD_LEN != 0;
        (length, if has_payload { length } else { 0 })
    } else {
        let length = u64::from(be32(24));
        (length, if command == CMD_WRITE { length } else { 0 })
    };
    let request = Request {
        flags,
        command,
        cookie,
        offset,
        length,
        payload_len,
    };
    Decoded::Request {
        request,
        header_len,
    }
}

/// Where replies are encoded: the connection's send buffer, or a `Vec` in tests.
pub trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// A reply header built on the stack, for headers written after their payload is known.
#[derive(Debug)]
pub struct HeaderBytes {
    bytes: [u8; 40],
    len: usize,
}

impl HeaderBytes {
    fn new() -> Self {
        Self {
            bytes: [0; 40],
            len: 0,
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl Sink for HeaderBytes {
    fn put(&mut self, bytes: &[u8]) {
        self.bytes[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }
}

/// Which reply framing the connection negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMode {
    /// 16-byte simple replies (the Linux kernel's dialect).
    Simple,
    /// 20-byte structured chunks (`NBD_OPT_STRUCTURED_REPLY`).
    Structured,
    /// 32-byte extended chunks (`NBD_OPT_EXTENDED_HEADERS`).
    Extended,
}

impl ReplyMode {
    /// A successful reply to any command that returns no data.
    pub fn done(self, out: &mut impl Sink, cookie: u64, offset: u64) {
        match self {
            ReplyMode::Simple => simple(out, cookie, 0),
            _ => self.chunk(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, offset, 0),
        }
    }

    /// A failed reply. Structured modes carry `message` for humans.
    pub fn error(self, out: &mut impl Sink, cookie: u64, offset: u64, errno: Errno, message: &str) {
        match self {
            ReplyMode::Simple => simple(out, cookie, errno.code()),
            _ => {
                let message = &message.as_bytes()[..message.len().min(4096)];
                let len = 6 + message.len() as u64;
                self.chunk(out, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, offset, len);
                out.put(&errno.code().to_be_bytes());
                out.put(&(message.len() as u16).to_be_bytes());
                out.put(message);
            }
        }
    }

    /// What precedes `len` bytes of READ data for `data_offset`: with simple replies the one
    /// reply header (call it once, for the whole read); otherwise an `OFFSET_DATA` chunk,
    /// `last` marking the final one. Every chunk header carries the request's `offset`, as
    /// extended replies require; the chunk's own place is the payload's offset field.
    #[allow(clippy::too_many_arguments)]
    pub fn read_data(
        self,
        out: &mut impl Sink,
        cookie: u64,
        offset: u64,
        data_offset: u64,
        len: u64,
        last: bool,
    ) {
        match self {
            ReplyMode::Simple => simple(out, cookie, 0),
            _ => {
                let flags = if last { REPLY_FLAG_DONE } else { 0 };
                let kind = REPLY_TYPE_OFFSET_DATA;
                self.chunk(out, flags, kind, cookie, offset, len + 8);
                out.put(&data_offset.to_be_bytes());
            }
        }
    }

    /// Bytes of a `base:allocation` reply's header, before its descriptors.
    pub fn block_status_header_len(self) -> usize {
        match self {
            ReplyMode::Simple => 0,
            ReplyMode::Structured => 20 + 4,
            ReplyMode::Extended => 32 + 8,
        }
    }

    /// The header of a `base:allocation` reply with `count` descriptors: one status chunk,
    /// marked DONE. Written after the descriptors, once their number is known.
    pub fn block_status_header(
        self,
        cookie: u64,
        offset: u64,
        context: u32,
        count: usize,
    ) -> HeaderBytes {
        let mut out = HeaderBytes::new();
        match self {
            ReplyMode::Simple => unreachable!("block status needs structured replies"),
            ReplyMode::Structured => {
                let len = 4 + 8 * count as u64;
                let kind = REPLY_TYPE_BLOCK_STATUS;
                self.chunk(&mut out, REPLY_FLAG_DONE, kind, cookie, offset, len);
                out.put(&context.to_be_bytes());
            }
            ReplyMode::Extended => {
                let len = 8 + 16 * count as u64;
                let kind = REPLY_TYPE_BLOCK_STATUS_EXT;
                self.chunk(&mut out, REPLY_FLAG_DONE, kind, cookie, offset, len);
                out.put(&context.to_be_bytes());
                out.put(&(count as u32).to_be_bytes());
            }
        }
        out
    }

    /// One `base:allocation` descriptor. Compact replies need the length to fit 32 bits, which
    /// holds because a compact request's length does and extents never exceed it.
    pub fn block_status_descriptor(self, out: &mut impl Sink, length: u64, flags: u32) {
        match self {
            ReplyMode::Simple => unreachable!("block status needs structured replies"),
            ReplyMode::Structured => {
                let length = u32::try_from(length).expect("compact extents fit 32 bits");
                out.put(&length.to_be_bytes());
                out.put(&flags.to_be_bytes());
            }
            ReplyMode::Extended => {
                out.put(&length.to_be_bytes());
                out.put(&u64::from(flags).to_be_bytes());
            }
        }
    }

    /// Bytes one descriptor takes.
    pub fn block_status_descriptor_len(self) -> usize {
        match self {
            ReplyMode::Simple => 0,
            ReplyMode::Structured => 8,
            ReplyMode::Extended => 16,
        }
    }

    fn chunk(self, out: &mut impl Sink, flags: u16, kind: u16, cookie: u64, offset: u64, len: u64) {
        match self {
            ReplyMode::Simple => unreachable!("simple replies have no chunks"),
            ReplyMode::Structured => {
                out.put(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
                out.put(&flags.to_be_bytes());
                out.put(&kind.to_be_bytes());
                out.put(&cookie.to_be_bytes());
                let len = u32::try_from(len).expect("structured chunk length fits 32 bits");
                out.put(&len.to_be_bytes());
            }
            ReplyMode::Extended => {
                out.put(&EXTENDED_REPLY_MAGIC.to_be_bytes());
                out.put(&flags.to_be_bytes());
                out.put(&kind.to_be_bytes());
                out.put(&cookie.to_be_bytes());
                out.put(&offset.to_be_bytes());
                out.put(&len.to_be_bytes());
            }
        }
    }
}

fn simple(out: &mut impl Sink, cookie: u64, error: u32) {
    out.put(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.put(&error.to_be_bytes());
    out.put(&cookie.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compact(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
        let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&command.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&length.to_be_bytes());
        v
    }

    #[test]
    fn compact_write_carries_its_length_as_payload() {
        let buf = compact(CMD_FLAG_FUA, CMD_WRITE, 7, 4096, 512);
        let Decoded::Request {
            request,
            header_len,
        } = decode_request(&buf, false)
        else {
            panic!("not decoded")
        };
        assert_eq!(header_len, 28);
        assert_eq!(request.cookie, 7);
        assert_eq!(request.payload_len, 512);
        let read = compact(0, CMD_READ, 1, 0, u32::MAX);
        let Decoded::Request { request, .. } = decode_request(&read, false) else {
            panic!()
        };
        assert_eq!(request.payload_len, 0);
        assert_eq!(request.length, u64::from(u32::MAX));
    }

    #[test]
    fn short_and_bad_headers() {
        let buf = compact(0, CMD_READ, 1, 0, 1);
        assert_eq!(decode_request(&buf[..27], false), Decoded::Incomplete);
        let mut bad = buf.clone();
        bad[0] = 0;
        assert!(matches!(decode_request(&bad, false), Decoded::BadMagic(_)));
        // A compact header is not valid once extended headers are negotiated.
        let mut long = buf;
        long.extend_from_slice(&[0; 4]);
        assert!(matches!(
            decode_request(&long, true),
            Decoded::BadMagic(REQUEST_MAGIC)
        ));
    }

    fn extended(flags: u16, command: u16, length: u64) -> Vec<u8> {
        let mut v = EXTENDED_REQUEST_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&command.to_be_bytes());
        v.extend_from_slice(&9u64.to_be_bytes());
        v.extend_from_slice(&0u64.to_be_bytes());
        v.extend_from_slice(&length.to_be_bytes());
        v
    }

    #[test]
    fn extended_write_carries_its_length_with_or_without_payload_len() {
        // qemu >= 8.2 sends WRITE without PAYLOAD_LEN, libnbd >= 1.18 with it: same payload.
        for flags in [0, CMD_FLAG_PAYLOAD_LEN, CMD_FLAG_FUA] {
            let v = extended(flags, CMD_WRITE, 1 << 20);
            let Decoded::Request { request, .. } = decode_request(&v, true) else {
                panic!()
            };
            assert_eq!(request.payload_len, 1 << 20, "flags {flags:#x}");
        }
        // Other commands: the length is an effect length unless PAYLOAD_LEN says otherwise.
        let v = extended(0, CMD_WRITE_ZEROES, 1 << 40);
        let Decoded::Request { request, .. } = decode_request(&v, true) else {
            panic!()
        };
        assert_eq!((request.length, request.payload_len), (1 << 40, 0));
    }

    #[test]
    fn extended_payload_follows_the_flag() {
        let mut v = EXTENDED_REQUEST_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&CMD_FLAG_PAYLOAD_LEN.to_be_bytes());
        v.extend_from_slice(&CMD_BLOCK_STATUS.to_be_bytes());
        v.extend_from_slice(&9u64.to_be_bytes());
        v.extend_from_slice(&0u64.to_be_bytes());
        v.extend_from_slice(&(1u64 << 33).to_be_bytes());
        let Decoded::Request {
            request,
            header_len,
        } = decode_request(&v, true)
        else {
            panic!()
        };
        assert_eq!(header_len, 32);
        assert_eq!(request.length, 1 << 33);
        assert_eq!(request.payload_len, 1 << 33);
        v[5] = 0; // clear PAYLOAD_LEN: the length is then an effect length only
        let Decoded::Request { request, .. } = decode_request(&v, true) else {
            panic!()
        };
        assert_eq!(request.payload_len, 0);
    }

    #[test]
    fn reply_layouts() {
        let mut out = Vec::new();
        ReplyMode::Simple.error(&mut out, 5, 0, Errno::Inval, "ignored");
        assert_eq!(out.len(), 16);
        assert_eq!(&out[4..8], &22u32.to_be_bytes());

        out.clear();
        ReplyMode::Structured.read_data(&mut out, 5, 4096, 4096, 100, true);
        assert_eq!(out.len(), 28);
        assert_eq!(&out[4..6], &REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&out[6..8], &REPLY_TYPE_OFFSET_DATA.to_be_bytes());
        assert_eq!(&out[16..20], &108u32.to_be_bytes());
        assert_eq!(&out[20..28], &4096u64.to_be_bytes());

        out.clear();
        ReplyMode::Extended.done(&mut out, 5, 77);
        assert_eq!(out.len(), 32);
        assert_eq!(&out[16..24], &77u64.to_be_bytes());

        out.clear();
        ReplyMode::Structured.error(&mut out, 1, 0, Errno::NoSpc, "full");
        assert_eq!(out.len(), 20 + 6 + 4);
        assert_eq!(&out[6..8], &REPLY_TYPE_ERROR.to_be_bytes());
        assert_eq!(&out[20..24], &28u32.to_be_bytes());

        out.clear();
        let header = ReplyMode::Extended.block_status_header(1, 0, 3, 1);
        out.extend_from_slice(header.as_slice());
        assert_eq!(out.len(), ReplyMode::Extended.block_status_header_len());
        ReplyMode::Extended.block_status_descriptor(&mut out, 1 << 40, STATE_HOLE);
        assert_eq!(out.len(), 32 + 8 + 16);
        assert_eq!(&out[24..32], &24u64.to_be_bytes(), "chunk length");
        assert_eq!(&out[36..40], &1u32.to_be_bytes(), "descriptor count");
        assert_eq!(&out[40..48], &(1u64 << 40).to_be_bytes());
    }

    #[test]
    fn every_extended_chunk_carries_the_request_offset() {
        // The second data chunk of a read at 1000: header offset 1000, payload offset its own.
        let mut out = Vec::new();
        ReplyMode::Extended.read_data(&mut out, 7, 1000, 1000 + (32 << 20), 512, true);
        assert_eq!(&out[16..24], &1000u64.to_be_bytes());
        assert_eq!(&out[32..40], &(1000u64 + (32 << 20)).to_be_bytes());
        assert_eq!(&out[4..6], &REPLY_FLAG_DONE.to_be_bytes());
        out.clear();
        ReplyMode::Extended.read_data(&mut out, 7, 1000, 1000, 32 << 20, false);
        assert_eq!(&out[4..6], &0u16.to_be_bytes(), "not the last chunk");
        out.clear();
        ReplyMode::Extended.error(&mut out, 7, 1000, Errno::Inval, "x");
        assert_eq!(&out[16..24], &1000u64.to_be_bytes());
    }
}
