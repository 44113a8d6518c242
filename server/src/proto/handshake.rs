//! Option-phase (handshake) payloads: parsing what clients send and encoding option replies.

use super::consts::*;

/// Why an option's payload was rejected; becomes `NBD_REP_ERR_INVALID` with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub &'static str);

/// An `NBD_OPT_INFO` / `NBD_OPT_GO` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub export: String,
    pub requested: Vec<u16>,
}

/// An `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

/// A big-endian cursor over option data that never reads past the end.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.0.len() < n {
            return Err(Malformed("option data is shorter than its fields say"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, Malformed> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    fn u32(&mut self) -> Result<u32, Malformed> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    /// A string with a 32-bit length prefix.
    fn string(&mut self) -> Result<String, Malformed> {
        let len = self.u32()? as usize;
        if len > MAX_STRING {
            return Err(Malformed("string longer than 4096 bytes"));
        }
        let bytes = self.take(len)?;
        let text =
            std::str::from_utf8(bytes).map_err(|_| Malformed("string is not valid UTF-8"))?;
        if text.contains('\0') {
            return Err(Malformed("string contains NUL"));
        }
        Ok(text.to_owned())
    }

    fn finish(&self) -> Result<(), Malformed> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Malformed("trailing bytes after the option's fields"))
        }
    }
}

pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, Malformed> {
    let mut cur = Cursor(data);
    let export = cur.string()?;
    let count = cur.u16()?;
    let requested = (0..count).map(|_| cur.u16()).collect::<Result<_, _>>()?;
    cur.finish()?;
    Ok(InfoRequest { export, requested })
}

pub fn parse_meta_context_request(data: &[u8]) -> Result<MetaContextRequest, Malformed> {
    let mut cur = Cursor(data);
    let export = cur.string()?;
    let count = cur.u32()?;
    // Each query needs at least its 4-byte length: refuse counts the data cannot hold before
    // allocating for them.
    if count as usize > cur.0.len() / 4 {
        return Err(Malformed("more queries than the option data can hold"));
    }
    let queries = (0..count).map(|_| cur.string()).collect::<Result<_, _>>()?;
    cur.finish()?;
    Ok(MetaContextRequest { export, queries })
}

/// The export name an INFO, GO or META_CONTEXT request starts with, as the raw bytes present,
/// whether or not the request parses: for logging what a refused client asked for. A length
/// beyond the data gives the bytes there are; too little data for the length, none.
pub fn requested_name(data: &[u8]) -> &[u8] {
    let Some((len, rest)) = data.split_first_chunk::<4>() else {
        return &[];
    };
    let len = u32::from_be_bytes(*len) as usize;
    &rest[..len.min(rest.len())]
}

/// Does this meta-context query select `base:allocation`? For LIST, an empty query list and the
/// bare namespace `base:` are wildcards; SET ignores `base:` alone (spec: "MUST be ignored by
/// SET"). Unknown namespaces and leaves are ignored, never errors.
pub fn selects_base_allocation(queries: &[String], listing: bool) -> bool {
    if listing && queries.is_empty() {
        return true;
    }
    queries
        .iter()
        .any(|q| q == BASE_ALLOCATION || (listing && q == "base:"))
}

/// Appends one option reply (header and payload) to `out`.
pub fn option_reply(out: &mut Vec<u8>, option: u32, reply: u32, payload: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    let len = u32::try_from(payload.len()).expect("option reply payloads are small");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
}

/// `NBD_REP_SERVER` payload: name with length prefix, then the description as free text.
pub fn server_entry(name: &str, description: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(4 + name.len() + description.len());
    p.extend_from_slice(&(name.len() as u32).to_be_bytes());
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(description.as_bytes());
    p
}

pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    p.extend_from_slice(&size.to_be_bytes());
    p.extend_from_slice(&flags.to_be_bytes());
    p
}

/// `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`: type then the raw string.
pub fn info_text(kind: u16, text: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(2 + text.len());
    p.extend_from_slice(&kind.to_be_bytes());
    p.extend_from_slice(text.as_bytes());
    p
}

pub fn info_block_size() -> Vec<u8> {
    let mut p = Vec::with_capacity(14);
    p.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    for v in [MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, MAX_PAYLOAD] {
        p.extend_from_slice(&v.to_be_bytes());
    }
    p
}

pub fn meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(4 + name.len());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(name.as_bytes());
    p
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags and, unless NO_ZEROES, 124 zero bytes.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut p = Vec::with_capacity(134);
    p.extend_from_slice(&size.to_be_bytes());
    p.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        p.resize(134, 0);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(s: &str) -> Vec<u8> {
        let mut v = (s.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        v
    }

    #[test]
    fn info_request_round_trip() {
        let mut data = string("disk");
        data.extend_from_slice(&2u16.to_be_bytes());
        data.extend_from_slice(&INFO_NAME.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        let req = parse_info_request(&data).unwrap();
        assert_eq!(req.export, "disk");
        assert_eq!(req.requested, vec![INFO_NAME, INFO_BLOCK_SIZE]);
    }

    #[test]
    fn malformed_info_requests_are_rejected() {
        // Name length beyond the data.
        let mut data = 100u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"abc");
        assert!(parse_info_request(&data).is_err());
        // Missing the count.
        assert!(parse_info_request(&string("x")).is_err());
        // Count larger than the requests present.
        let mut data = string("x");
        data.extend_from_slice(&5u16.to_be_bytes());
        assert!(parse_info_request(&data).is_err());
        // Trailing garbage.
        let mut data = string("x");
        data.extend_from_slice(&[0, 0, 9]);
        assert!(parse_info_request(&data).is_err());
        // Not UTF-8, and NUL inside.
        let mut data = 2u32.to_be_bytes().to_vec();
        data.extend_from_slice(&[0xff, 0xfe, 0, 0]);
        assert!(parse_info_request(&data).is_err());
        let mut data = string("a\0b");
        data.extend_from_slice(&0u16.to_be_bytes());
        assert!(parse_info_request(&data).is_err());
        assert!(parse_info_request(&[]).is_err());
    }

    #[test]
    fn the_requested_name_is_read_raw_even_from_a_malformed_request() {
        let mut data = 4u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"\xff\0ab");
        assert_eq!(requested_name(&data), b"\xff\0ab");
        // The count is missing: the request is malformed, the name is still there.
        assert!(parse_info_request(&data).is_err());
        // Length beyond the data: what there is.
        assert_eq!(requested_name(&data[..6]), b"\xff\0");
        assert_eq!(requested_name(&[0, 0]), b"");
    }

    #[test]
    fn meta_context_parsing_bounds_the_query_count() {
        let mut data = string("");
        data.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_context_request(&data).is_err());
        let mut data = string("e");
        data.extend_from_slice(&2u32.to_be_bytes());
        data.extend_from_slice(&string("base:allocation"));
        data.extend_from_slice(&string("qemu:dirty-bitmap:x"));
        let req = parse_meta_context_request(&data).unwrap();
        assert_eq!(req.queries.len(), 2);
        assert!(selects_base_allocation(&req.queries, false));
    }

    #[test]
    fn wildcards_apply_to_listing_only() {
        assert!(selects_base_allocation(&[], true));
        assert!(!selects_base_allocation(&[], false));
        let base = vec!["base:".to_owned()];
        assert!(selects_base_allocation(&base, true));
        assert!(!selects_base_allocation(&base, false));
        assert!(!selects_base_allocation(&["base:other".to_owned()], true));
    }

    #[test]
    fn export_name_reply_padding() {
        assert_eq!(export_name_reply(1, 2, false).len(), 134);
        assert_eq!(
            export_name_reply(1, 2, true),
            vec![0, 0, 0, 0, 0, 0, 0, 1, 0, 2]
        );
    }

    #[test]
    fn option_reply_layout() {
        let mut out = Vec::new();
        option_reply(&mut out, OPT_GO, REP_ACK, &[]);
        assert_eq!(out.len(), 20);
        assert_eq!(&out[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[8..12], &OPT_GO.to_be_bytes());
        assert_eq!(&out[12..16], &REP_ACK.to_be_bytes());
        assert_eq!(&out[16..], &[0, 0, 0, 0]);
    }
}
