//! The client's side of the wire, written independently of the server's `proto` module: encoders
//! for what a client sends, and reference parsers for the option payloads, so the targets
//! compare the server's code against a second reading of the specification rather than
//! against itself.

use ramnbd::proto::consts::*;

/// A fixed-newstyle option: IHAVEOPT, option, length, data.
pub fn option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// A string with its 32-bit length prefix.
pub fn string(s: &[u8]) -> Vec<u8> {
    let mut v = (s.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub fn info_request(export: &[u8], infos: &[u16]) -> Vec<u8> {
    let mut v = string(export);
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for info in infos {
        v.extend_from_slice(&info.to_be_bytes());
    }
    v
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
pub fn meta_context_request(export: &[u8], queries: &[&[u8]]) -> Vec<u8> {
    let mut v = string(export);
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for query in queries {
        v.extend_from_slice(&string(query));
    }
    v
}

/// A compact (28-byte) request header.
pub fn compact(command: u16, flags: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&command.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&length.to_be_bytes());
    v
}

/// An extended (32-byte) request header.
pub fn extended(command: u16, flags: u16, cookie: u64, offset: u64, length: u64) -> Vec<u8> {
    let mut v = EXTENDED_REQUEST_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&command.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&length.to_be_bytes());
    v
}

/// Takes `n` bytes off the front of `data`.
fn take<'a>(data: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if data.len() < n {
        return None;
    }
    let (head, rest) = data.split_at(n);
    *data = rest;
    Some(head)
}

fn be16(data: &mut &[u8]) -> Option<u16> {
    take(data, 2).map(|b| u16::from_be_bytes([b[0], b[1]]))
}

fn be32(data: &mut &[u8]) -> Option<u32> {
    take(data, 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// A spec string: at most 4096 bytes, UTF-8, no NUL.
fn spec_string(data: &mut &[u8]) -> Option<String> {
    let len = be32(data)? as usize;
    if len > 4096 {
        return None;
    }
    let bytes = take(data, len)?;
    if bytes.contains(&0) {
        return None;
    }
    String::from_utf8(bytes.to_vec()).ok()
}

/// Reference reading of INFO / GO data: (export, info requests), or `None` if malformed.
pub fn parse_info(mut data: &[u8]) -> Option<(String, Vec<u16>)> {
    let export = spec_string(&mut data)?;
    let count = be16(&mut data)?;
    let mut infos = Vec::new();
    for _ in 0..count {
        infos.push(be16(&mut data)?);
    }
    data.is_empty().then_some((export, infos))
}

/// Reference reading of LIST / SET_META_CONTEXT data: (export, queries), or `None`.
pub fn parse_meta_context(mut data: &[u8]) -> Option<(String, Vec<String>)> {
    let export = spec_string(&mut data)?;
    let count = be32(&mut data)?;
    let mut queries = Vec::new();
    for _ in 0..count {
        // Every query takes at least its length, so this loop ends with the data.
        queries.push(spec_string(&mut data)?);
    }
    data.is_empty().then_some((export, queries))
}

/// A request header, as a client means it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Req {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
    /// Payload bytes after the header: a WRITE's data, or an extended request's payload.
    pub payload_len: u64,
    pub header_len: usize,
}

/// What the front of a request stream holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// Fewer bytes than a header.
    Short,
    BadMagic,
    Request(Req),
}

/// Reads the request header at the front of `buf`: 28 bytes compact, 32 with extended
/// headers. A WRITE's payload is its length; any other request has one only under extended
/// headers with PAYLOAD_LEN.
pub fn request(buf: &[u8], extended: bool) -> Header {
    let (magic, header_len) = if extended {
        (EXTENDED_REQUEST_MAGIC, 32)
    } else {
        (REQUEST_MAGIC, 28)
    };
    let Some(mut h) = buf.get(..header_len) else {
        return Header::Short;
    };
    let h = &mut h;
    if be32(h) != Some(magic) {
        return Header::BadMagic;
    }
    let flags = be16(h).unwrap();
    let command = be16(h).unwrap();
    let cookie = be64(h).unwrap();
    let offset = be64(h).unwrap();
    let length = if extended {
        be64(h).unwrap()
    } else {
        u64::from(be32(h).unwrap())
    };
    let payload = command == CMD_WRITE || (extended && flags & CMD_FLAG_PAYLOAD_LEN != 0);
    Header::Request(Req {
        flags,
        command,
        cookie,
        offset,
        length,
        payload_len: if payload { length } else { 0 },
        header_len,
    })
}

fn be64(data: &mut &[u8]) -> Option<u64> {
    take(data, 8).map(|b| u64::from_be_bytes(b.try_into().unwrap()))
}
