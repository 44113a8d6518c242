//! The handshake phase: greeting, client flags, options and option replies.

use std::fmt;

use super::{RawClient, ReplyMode};
use crate::proto::*;

/// The 18-byte newstyle greeting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    pub raw: Vec<u8>,
    pub nbdmagic: u64,
    pub ihaveopt: u64,
    pub flags: u16,
}

/// One option reply: the 20-byte header's option and type fields, and the data.
#[derive(Clone, PartialEq, Eq)]
pub struct OptReply {
    pub option: u32,
    pub rep: u32,
    pub data: Vec<u8>,
}

impl OptReply {
    pub fn is_error(&self) -> bool {
        self.rep & REP_FLAG_ERROR != 0
    }
}

impl fmt::Debug for OptReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OptReply")
            .field("option", &self.option)
            .field("rep", &rep_name(self.rep))
            .field("data", &String::from_utf8_lossy(&self.data))
            .finish()
    }
}

/// What INFO or GO returned: every REP_INFO, parsed and checked for its mandatory length.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub name: Option<String>,
    pub description: Option<String>,
    /// (minimum, preferred, maximum payload)
    pub block_size: Option<(u32, u32, u32)>,
    /// The info types in the order the server sent them.
    pub order: Vec<u16>,
}

/// One REP_SERVER entry from LIST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedExport {
    pub name: String,
    /// The optional human-readable text after the name (empty if none).
    pub description: String,
}

/// Data for INFO/GO: name length, name, number of requests, requests.
pub fn info_payload(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut data = Vec::new();
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for request in requests {
        data.extend_from_slice(&request.to_be_bytes());
    }
    data
}

/// Data for LIST_META_CONTEXT / SET_META_CONTEXT: export name, number of queries, queries.
pub fn meta_context_payload(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut data = Vec::new();
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for query in queries {
        data.extend_from_slice(&(query.len() as u32).to_be_bytes());
        data.extend_from_slice(query.as_bytes());
    }
    data
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

fn utf8(bytes: &[u8], what: &str) -> String {
    String::from_utf8(bytes.to_vec())
        .unwrap_or_else(|_| panic!("{what} is not UTF-8 (the spec requires UTF-8): {bytes:02x?}"))
}

/// The largest option reply this client accepts; a longer length field means a desynchronised
/// or broken stream, and allocating it would only hide that.
const MAX_OPTION_REPLY: u32 = 16 * 1024 * 1024;

impl RawClient {
    /// Reads the 18-byte greeting (no checks: tests assert it).
    pub fn read_greeting(&mut self) -> Greeting {
        let raw = self.recv_exact(18);
        Greeting {
            nbdmagic: be_u64(&raw[0..8]),
            ihaveopt: be_u64(&raw[8..16]),
            flags: be_u16(&raw[16..18]),
            raw,
        }
    }

    pub fn send_client_flags(&mut self, flags: u32) {
        self.negotiated.client_flags = flags;
        self.send_raw(&flags.to_be_bytes());
    }

    /// Sends the 16-byte option header announcing `length` bytes of data, and nothing else.
    pub fn send_option_header(&mut self, option: u32, length: u32) {
        let mut header = Vec::with_capacity(16);
        header.extend_from_slice(&IHAVEOPT.to_be_bytes());
        header.extend_from_slice(&option.to_be_bytes());
        header.extend_from_slice(&length.to_be_bytes());
        self.send_raw(&header);
    }

    /// Sends an option with its data.
    pub fn send_option(&mut self, option: u32, data: &[u8]) {
        let length = u32::try_from(data.len()).expect("option data fits in 32 bits");
        let mut message = Vec::with_capacity(16 + data.len());
        message.extend_from_slice(&IHAVEOPT.to_be_bytes());
        message.extend_from_slice(&option.to_be_bytes());
        message.extend_from_slice(&length.to_be_bytes());
        message.extend_from_slice(data);
        self.send_raw(&message);
    }

    /// Reads one option reply, checking its magic.
    pub fn read_option_reply(&mut self) -> OptReply {
        let header = self.recv_exact(20);
        let magic = be_u64(&header[0..8]);
        assert_eq!(
            magic, OPTION_REPLY_MAGIC,
            "option reply magic is wrong; header bytes {header:02x?}"
        );
        let length = be_u32(&header[16..20]);
        assert!(
            length <= MAX_OPTION_REPLY,
            "option reply claims {length} bytes of data; header {header:02x?}"
        );
        OptReply {
            option: be_u32(&header[8..12]),
            rep: be_u32(&header[12..16]),
            data: self.recv_exact(length as usize),
        }
    }

    /// Reads replies to `option` up to and including the final one (ACK or an error). Each
    /// reply must name `option` in its header.
    pub fn read_option_replies(&mut self, option: u32) -> Vec<OptReply> {
        let mut replies = Vec::new();
        loop {
            let reply = self.read_option_reply();
            assert_eq!(
                reply.option, option,
                "reply names the wrong option: {reply:?} (earlier: {replies:?})"
            );
            let last = reply.rep == REP_ACK || reply.is_error();
            replies.push(reply);
            if last {
                return replies;
            }
            assert!(replies.len() < 100_000, "endless option replies");
        }
    }

    /// Sends an option and reads all of its replies.
    pub fn option(&mut self, option: u32, data: &[u8]) -> Vec<OptReply> {
        self.send_option(option, data);
        self.read_option_replies(option)
    }

    /// Sends an option that must get exactly one reply, and returns it.
    pub fn option_single(&mut self, option: u32, data: &[u8]) -> OptReply {
        let mut replies = self.option(option, data);
        assert_eq!(
            replies.len(),
            1,
            "expected a single reply to option {option}: {replies:?}"
        );
        replies.pop().expect("one reply")
    }

    /// NBD_OPT_ABORT; the caller checks the reply (the server MUST ACK).
    pub fn opt_abort(&mut self) -> OptReply {
        self.option_single(OPT_ABORT, &[])
    }

    /// NBD_OPT_LIST: the REP_SERVER entries, or the error reply.
    pub fn opt_list(&mut self) -> Result<Vec<ListedExport>, OptReply> {
        let mut replies = self.option(OPT_LIST, &[]);
        let last = replies.pop().expect("at least one reply");
        if last.rep != REP_ACK {
            return Err(last);
        }
        Ok(replies
            .iter()
            .map(|reply| {
                assert_eq!(reply.rep, REP_SERVER, "LIST sent {reply:?}");
                parse_rep_server(&reply.data)
            })
            .collect())
    }

    /// NBD_OPT_INFO.
    pub fn opt_info(&mut self, name: &str, requests: &[u16]) -> Result<ExportInfo, OptReply> {
        let replies = self.option(OPT_INFO, &info_payload(name, requests));
        parse_info_replies(replies)
    }

    /// NBD_OPT_GO; on ACK the connection is in transmission.
    pub fn opt_go(&mut self, name: &str, requests: &[u16]) -> Result<ExportInfo, OptReply> {
        let replies = self.option(OPT_GO, &info_payload(name, requests));
        let info = parse_info_replies(replies)?;
        self.negotiated.size = info.size;
        self.negotiated.transmission_flags = info.flags;
        Ok(info)
    }

    /// NBD_OPT_STRUCTURED_REPLY (no data). An ACK switches the expected reply format.
    pub fn opt_structured_reply(&mut self) -> OptReply {
        let reply = self.option_single(OPT_STRUCTURED_REPLY, &[]);
        if reply.rep == REP_ACK && self.negotiated.mode == ReplyMode::Simple {
            self.set_mode(ReplyMode::Structured);
        }
        reply
    }

    /// NBD_OPT_EXTENDED_HEADERS (no data). An ACK switches both header formats.
    pub fn opt_extended_headers(&mut self) -> OptReply {
        let reply = self.option_single(OPT_EXTENDED_HEADERS, &[]);
        if reply.rep == REP_ACK {
            self.set_mode(ReplyMode::Extended);
        }
        reply
    }

    /// NBD_OPT_LIST_META_CONTEXT: (id, name) per REP_META_CONTEXT, or the error reply.
    pub fn opt_list_meta_context(
        &mut self,
        export: &str,
        queries: &[&str],
    ) -> Result<Vec<(u32, String)>, OptReply> {
        let data = meta_context_payload(export, queries);
        parse_meta_context_replies(self.option(OPT_LIST_META_CONTEXT, &data))
    }

    /// NBD_OPT_SET_META_CONTEXT. The selection replaces earlier ones even when it fails.
    pub fn opt_set_meta_context(
        &mut self,
        export: &str,
        queries: &[&str],
    ) -> Result<Vec<(u32, String)>, OptReply> {
        let data = meta_context_payload(export, queries);
        let result = parse_meta_context_replies(self.option(OPT_SET_META_CONTEXT, &data));
        self.negotiated.contexts = result.clone().unwrap_or_default();
        result
    }

    /// NBD_OPT_EXPORT_NAME: returns (size, transmission flags, the raw reply bytes). Reads the
    /// 124 zero bytes unless NO_ZEROES was among the client flags. An unknown export makes the
    /// server close the connection, which panics here; test that case by hand.
    pub fn opt_export_name(&mut self, name: &str) -> (u64, u16, Vec<u8>) {
        self.send_option(OPT_EXPORT_NAME, name.as_bytes());
        let no_zeroes = self.negotiated.client_flags & FLAG_C_NO_ZEROES != 0;
        let raw = self.recv_exact(if no_zeroes { 10 } else { 134 });
        let size = be_u64(&raw[0..8]);
        let flags = be_u16(&raw[8..10]);
        self.negotiated.size = size;
        self.negotiated.transmission_flags = flags;
        (size, flags, raw)
    }
}

fn parse_rep_server(data: &[u8]) -> ListedExport {
    assert!(
        data.len() >= 4,
        "REP_SERVER shorter than 4 bytes: {data:02x?}"
    );
    let name_len = be_u32(data) as usize;
    assert!(
        4 + name_len <= data.len(),
        "REP_SERVER name length {name_len} exceeds its {} bytes of data",
        data.len()
    );
    ListedExport {
        name: utf8(&data[4..4 + name_len], "export name"),
        description: utf8(&data[4 + name_len..], "export description"),
    }
}

/// Parses the REP_INFOs before the ACK of INFO/GO, enforcing the lengths the spec fixes and
/// that at least one INFO_EXPORT precedes the ACK.
fn parse_info_replies(mut replies: Vec<OptReply>) -> Result<ExportInfo, OptReply> {
    let last = replies.pop().expect("at least one reply");
    if last.rep != REP_ACK {
        assert!(
            replies.is_empty(),
            "REP_INFO sent before a failure: {replies:?} then {last:?}"
        );
        return Err(last);
    }
    let mut info = ExportInfo::default();
    let mut saw_export = false;
    for reply in &replies {
        assert_eq!(reply.rep, REP_INFO, "INFO/GO sent {reply:?}");
        let data = &reply.data;
        assert!(data.len() >= 2, "REP_INFO without an info type: {reply:?}");
        let ty = be_u16(data);
        info.order.push(ty);
        let payload = &data[2..];
        match ty {
            INFO_EXPORT => {
                assert_eq!(data.len(), 12, "INFO_EXPORT must be 12 bytes: {data:02x?}");
                info.size = be_u64(payload);
                info.flags = be_u16(&payload[8..]);
                saw_export = true;
            }
            INFO_NAME => info.name = Some(utf8(payload, "INFO_NAME")),
            INFO_DESCRIPTION => info.description = Some(utf8(payload, "INFO_DESCRIPTION")),
            INFO_BLOCK_SIZE => {
                assert_eq!(
                    data.len(),
                    14,
                    "INFO_BLOCK_SIZE must be 14 bytes: {data:02x?}"
                );
                info.block_size = Some((
                    be_u32(payload),
                    be_u32(&payload[4..]),
                    be_u32(&payload[8..]),
                ));
            }
            // Clients MUST ignore unknown info types; the order list still records them.
            _ => {}
        }
    }
    assert!(
        saw_export,
        "ACK without INFO_EXPORT (the spec requires one): {replies:?}"
    );
    Ok(info)
}

fn parse_meta_context_replies(mut replies: Vec<OptReply>) -> Result<Vec<(u32, String)>, OptReply> {
    let last = replies.pop().expect("at least one reply");
    if last.rep != REP_ACK {
        return Err(last);
    }
    Ok(replies
        .iter()
        .map(|reply| {
            assert_eq!(
                reply.rep, REP_META_CONTEXT,
                "meta context option sent {reply:?}"
            );
            assert!(
                reply.data.len() > 4,
                "REP_META_CONTEXT too short: {reply:?}"
            );
            (
                be_u32(&reply.data),
                utf8(&reply.data[4..], "meta context name"),
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_payload_layout() {
        assert_eq!(
            info_payload("ab", &[INFO_NAME, INFO_BLOCK_SIZE]),
            [0, 0, 0, 2, b'a', b'b', 0, 2, 0, 1, 0, 3]
        );
    }

    #[test]
    fn meta_context_payload_layout() {
        assert_eq!(
            meta_context_payload("", &["base:"]),
            [
                0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 5, b'b', b'a', b's', b'e', b':'
            ]
        );
    }

    #[test]
    fn rep_server_splits_name_and_description() {
        let entry = parse_rep_server(&[0, 0, 0, 2, b'h', b'i', b'y', b'o']);
        assert_eq!(entry.name, "hi");
        assert_eq!(entry.description, "yo");
    }

    #[test]
    #[should_panic(expected = "exceeds")]
    fn rep_server_with_overlong_name_is_rejected() {
        parse_rep_server(&[0, 0, 0, 9, b'h']);
    }

    #[test]
    fn info_replies_are_parsed_and_checked() {
        let mut export = vec![0, 0];
        export.extend_from_slice(&4096u64.to_be_bytes());
        export.extend_from_slice(&0x0d6du16.to_be_bytes());
        let mut block = vec![0, 3];
        for v in [1u32, 4096, 33_554_432] {
            block.extend_from_slice(&v.to_be_bytes());
        }
        let rep = |rep, data: Vec<u8>| OptReply {
            option: OPT_GO,
            rep,
            data,
        };
        let info = parse_info_replies(vec![
            rep(REP_INFO, export),
            rep(REP_INFO, block),
            rep(REP_ACK, vec![]),
        ])
        .unwrap();
        assert_eq!(info.size, 4096);
        assert_eq!(info.flags, 0x0d6d);
        assert_eq!(info.block_size, Some((1, 4096, 33_554_432)));
        assert_eq!(info.order, [INFO_EXPORT, INFO_BLOCK_SIZE]);
    }
}
