//! Whole sessions in-process: a client speaks raw NBD over an in-memory stream
//! (`tokio::io::duplex`) to `negotiate` + `transmit`, with tokio's clock paused where time
//! matters. No sockets, no sleeps: what these tests assert does not depend on the machine's
//! speed.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;

use super::transmit::Stats;
use super::{negotiate, transmit};
use crate::config::ExportConfig;
use crate::export::Exports;
use crate::proto::consts::*;
use crate::shutdown::{Phase, Shutdown};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn exports(size: u64) -> Arc<Exports> {
    let config = ExportConfig {
        name: "disk".to_owned(),
        size,
        read_only: false,
        description: String::new(),
        max_memory: None,
        ..Default::default()
    };
    Arc::new(Exports::new(&[config]).expect("create the export"))
}

/// Runs one session on the server end of an in-memory stream; the task returns the
/// transmission's stats (`None` if the handshake ended the connection).
fn start(exports: &Arc<Exports>, shutdown: &Shutdown) -> (Client, JoinHandle<Option<Stats>>) {
    // Small buffers, so that a client that does not read soon blocks the server's writes.
    let (client, server) = tokio::io::duplex(64 * 1024);
    let exports = Arc::clone(exports);
    let mut watch = shutdown.watch();
    let task = tokio::spawn(async move {
        let (mut reader, mut writer) = tokio::io::split(server);
        let negotiated = negotiate::negotiate(&mut reader, &mut writer, &exports, &mut watch)
            .await
            .ok()??;
        transmit::transmit(reader, writer, negotiated, watch, None)
            .await
            .ok()
    });
    (Client { stream: client }, task)
}

/// The client end: raw bytes, big-endian fields.
struct Client<S = DuplexStream> {
    stream: S,
}

/// An option reply: (type, data).
type OptionReply = (u32, Vec<u8>);

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    async fn greet(&mut self) {
        let mut greeting = [0u8; 18];
        self.stream.read_exact(&mut greeting).await.unwrap();
        assert_eq!(&greeting[..8], &NBDMAGIC.to_be_bytes());
        let flags = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
        self.stream.write_all(&flags.to_be_bytes()).await.unwrap();
    }

    async fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut bytes = IHAVEOPT.to_be_bytes().to_vec();
        bytes.extend_from_slice(&option.to_be_bytes());
        bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
        bytes.extend_from_slice(data);
        self.stream.write_all(&bytes).await.unwrap();
    }

    async fn option_reply(&mut self) -> OptionReply {
        let mut header = [0u8; 20];
        self.stream.read_exact(&mut header).await.unwrap();
        assert_eq!(&header[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        let kind = u32::from_be_bytes(header[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(header[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        self.stream.read_exact(&mut data).await.unwrap();
        (kind, data)
    }

    /// Sends an option and collects its replies up to the final one (ACK or an error).
    async fn option(&mut self, option: u32, data: &[u8]) -> Vec<OptionReply> {
        self.send_option(option, data).await;
        let mut replies = Vec::new();
        loop {
            let reply = self.option_reply().await;
            let last = reply.0 == REP_ACK || reply.0 & (1 << 31) != 0;
            replies.push(reply);
            if last {
                return replies;
            }
        }
    }

    async fn go(&mut self, extended: bool) {
        self.greet().await;
        if extended {
            let replies = self.option(OPT_EXTENDED_HEADERS, &[]).await;
            assert_eq!(replies.last().unwrap().0, REP_ACK);
        }
        let mut data = 4u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"disk");
        data.extend_from_slice(&0u16.to_be_bytes());
        let replies = self.option(OPT_GO, &data).await;
        assert_eq!(replies.last().unwrap().0, REP_ACK, "{replies:?}");
    }
}

impl Client {
    /// A compact request header.
    fn request(command: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut bytes = REQUEST_MAGIC.to_be_bytes().to_vec();
        bytes.extend_from_slice(&flags.to_be_bytes());
        bytes.extend_from_slice(&command.to_be_bytes());
        bytes.extend_from_slice(&cookie.to_be_bytes());
        bytes.extend_from_slice(&offset.to_be_bytes());
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes
    }

    /// An extended request header.
    fn extended(command: u16, flags: u16, cookie: u64, offset: u64, len: u64) -> Vec<u8> {
        let mut bytes = EXTENDED_REQUEST_MAGIC.to_be_bytes().to_vec();
        bytes.extend_from_slice(&flags.to_be_bytes());
        bytes.extend_from_slice(&command.to_be_bytes());
        bytes.extend_from_slice(&cookie.to_be_bytes());
        bytes.extend_from_slice(&offset.to_be_bytes());
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// A simple reply: (error, cookie), then `data_len` bytes of READ data if it succeeded.
    async fn simple_reply(&mut self, data_len: usize) -> (u32, u64, Vec<u8>) {
        let mut header = [0u8; 16];
        self.stream.read_exact(&mut header).await.unwrap();
        assert_eq!(&header[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        let error = u32::from_be_bytes(header[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(header[8..16].try_into().unwrap());
        let mut data = vec![0u8; if error == 0 { data_len } else { 0 }];
        self.stream.read_exact(&mut data).await.unwrap();
        (error, cookie, data)
    }

    /// An extended reply chunk: (flags, type, cookie, payload).
    async fn extended_chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let mut header = [0u8; 32];
        self.stream.read_exact(&mut header).await.unwrap();
        assert_eq!(&header[..4], &EXTENDED_REPLY_MAGIC.to_be_bytes());
        let flags = u16::from_be_bytes(header[4..6].try_into().unwrap());
        let kind = u16::from_be_bytes(header[6..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(header[8..16].try_into().unwrap());
        let len = u64::from_be_bytes(header[24..32].try_into().unwrap());
        let mut payload = vec![0u8; len as usize];
        self.stream.read_exact(&mut payload).await.unwrap();
        (flags, kind, cookie, payload)
    }

    /// Whether the server closed its end (EOF).
    async fn closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.stream.read(&mut byte).await, Ok(0) | Err(_))
    }
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_and_disc_is_counted_once() {
    let exports = exports(64 * MIB);
    let shutdown = Shutdown::new();
    let (mut client, session) = start(&exports, &shutdown);
    client.go(false).await;
    // 200 requests and DISC in one go, replies unread: 200 × 4 KiB of READ data is more than
    // the stream holds, so the server has to wait with DISC decoded.
    let mut bytes = Vec::new();
    for i in 0..100u64 {
        bytes.extend(Client::request(CMD_WRITE, 0, i, i * 4096, 4096));
        bytes.extend(vec![i as u8 + 1; 4096]);
    }
    for i in 0..100u64 {
        bytes.extend(Client::request(CMD_READ, 0, 1000 + i, i * 4096, 4096));
    }
    bytes.extend(Client::request(CMD_DISC, 0, 9999, 0, 0));
    // Written from a second task while this one reads the replies.
    let (reader, mut writer) = tokio::io::split(client.stream);
    let sending = tokio::spawn(async move { writer.write_all(&bytes).await.unwrap() });
    let mut client = Client {
        stream: tokio::io::join(reader, tokio::io::sink()),
    };
    for i in 0..100u64 {
        assert_eq!(client.simple_reply(0).await, (0, i, vec![]));
    }
    for i in 0..100u64 {
        let (error, cookie, data) = client.simple_reply(4096).await;
        assert_eq!((error, cookie), (0, 1000 + i));
        assert_eq!(data, vec![i as u8 + 1; 4096]);
    }
    assert!(client.closed().await, "DISC closes the connection");
    sending.await.unwrap();
    let stats = session.await.unwrap().expect("a transmission");
    assert_eq!(
        stats.requests, 201,
        "each request, DISC included, counted once"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_huge_zeroing_yields_to_other_connections() {
    // One runtime thread, two sessions: a 1 TiB WRITE_ZEROES (one page held per GiB, so it
    // has real work all along) runs in steps with a yield between them, so a 4 KiB read on
    // the other connection is answered long before the zeroing is.
    let exports = exports(1 << 40);
    let disk = &exports.get("disk").unwrap().disk;
    for gib in 0..1024u64 {
        disk.write(gib * GIB, &[1; 4096]).unwrap();
    }
    let shutdown = Shutdown::new();
    let (mut zeroing, _a) = start(&exports, &shutdown);
    let (mut reading, _b) = start(&exports, &shutdown);
    zeroing.go(true).await;
    reading.go(false).await;
    zeroing
        .send(&Client::extended(CMD_WRITE_ZEROES, 0, 1, 0, 1 << 40))
        .await;
    reading
        .send(&Client::request(CMD_READ, 0, 2, 512 * GIB, 4096))
        .await;
    let first = tokio::select! {
        biased;
        reply = zeroing.extended_chunk() => format!("the zeroing {reply:?}"),
        reply = reading.simple_reply(4096) => {
            assert_eq!(reply, (0, 2, [1u8; 4096].to_vec()), "read before the zeroing reached it");
            "the read".to_owned()
        }
    };
    assert_eq!(first, "the read", "the zeroing held the runtime thread");
    let (flags, kind, cookie, _) = zeroing.extended_chunk().await;
    assert_eq!((flags, kind, cookie), (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 1));
    assert_eq!(disk.allocated_bytes(), 0);
}

#[tokio::test(start_paused = true)]
async fn stopping_answers_what_was_read_refuses_the_rest_and_closes_when_idle() {
    let exports = exports(64 * MIB);
    let shutdown = Shutdown::new();
    let (mut client, session) = start(&exports, &shutdown);
    client.go(false).await;
    client.send(&Client::request(CMD_READ, 0, 1, 0, 512)).await;
    assert_eq!(client.simple_reply(512).await, (0, 1, vec![0; 512]));
    shutdown.advance(Phase::Stopping);
    tokio::task::yield_now().await;
    client.send(&Client::request(CMD_READ, 0, 2, 0, 512)).await;
    let (error, cookie, _) = client.simple_reply(512).await;
    assert_eq!((error, cookie), (108, 2), "ESHUTDOWN once stopping");
    // Then the client is quiet: the (paused) clock runs to the idle deadline and the server
    // closes the connection.
    assert!(client.closed().await);
    assert_eq!(session.await.unwrap().unwrap().requests, 2);
}

#[tokio::test(start_paused = true)]
async fn closing_drops_a_write_whose_payload_is_still_arriving() {
    let exports = exports(64 * MIB);
    let shutdown = Shutdown::new();
    let (mut client, session) = start(&exports, &shutdown);
    client.go(false).await;
    // An 8 MiB write (streamed: larger than a whole-payload write), 2 MiB of it sent.
    client
        .send(&Client::request(CMD_WRITE, 0, 1, 0, 8 << 20))
        .await;
    client.send(&vec![7u8; 2 << 20]).await;
    shutdown.advance(Phase::Closing);
    assert!(client.closed().await, "closed without a reply");
    session.await.unwrap();
    // What the server had read was applied (all of it but what was still in the stream's
    // 64 KiB buffer), and nothing past it.
    let mut back = vec![0u8; 8 << 20];
    exports.get("disk").unwrap().disk.read(0, &mut back);
    let applied = back.iter().position(|&b| b != 7).unwrap();
    assert!(
        applied >= (2 << 20) - 64 * 1024,
        "only {applied} bytes applied"
    );
    assert!(
        back[applied..].iter().all(|&b| b == 0),
        "nothing past what arrived"
    );
}

#[tokio::test]
async fn a_block_status_reply_fits_one_send_batch() {
    // Every other page held over 256 MiB: 65536 extents. One reply carries at most what fits
    // a send batch and covers a prefix of the range, as the spec allows; asking again from
    // where it ended continues.
    let exports = exports(256 * MIB);
    let disk = &exports.get("disk").unwrap().disk;
    for page in (0..65536u64).step_by(2) {
        disk.write(page * 4096, &[1]).unwrap();
    }
    let shutdown = Shutdown::new();
    let (mut client, _session) = start(&exports, &shutdown);
    client.greet().await;
    client.option(OPT_EXTENDED_HEADERS, &[]).await;
    let mut query = 4u32.to_be_bytes().to_vec();
    query.extend_from_slice(b"disk");
    query.extend_from_slice(&1u32.to_be_bytes());
    query.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
    query.extend_from_slice(BASE_ALLOCATION.as_bytes());
    let replies = client.option(OPT_SET_META_CONTEXT, &query).await;
    let context = u32::from_be_bytes(replies[0].1[..4].try_into().unwrap());
    let mut go = 4u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"disk");
    go.extend_from_slice(&0u16.to_be_bytes());
    client.option(OPT_GO, &go).await;

    let mut offset = 0;
    let mut replies = 0;
    while offset < 256 * MIB {
        client
            .send(&Client::extended(
                CMD_BLOCK_STATUS,
                0,
                5,
                offset,
                256 * MIB - offset,
            ))
            .await;
        let (flags, kind, _, payload) = client.extended_chunk().await;
        assert_eq!(
            (flags, kind),
            (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS_EXT)
        );
        assert!(
            payload.len() <= 256 * 1024,
            "a {}-byte reply",
            payload.len()
        );
        assert_eq!(
            u32::from_be_bytes(payload[..4].try_into().unwrap()),
            context
        );
        let count = u32::from_be_bytes(payload[4..8].try_into().unwrap()) as usize;
        assert_eq!(payload.len(), 8 + 16 * count);
        for descriptor in payload[8..].chunks(16) {
            let length = u64::from_be_bytes(descriptor[..8].try_into().unwrap());
            let flags = u64::from_be_bytes(descriptor[8..].try_into().unwrap());
            let expected = if (offset / 4096) % 2 == 0 { 0 } else { 3 };
            assert_eq!((length, flags), (4096, expected), "at {offset}");
            offset += length;
        }
        replies += 1;
    }
    assert_eq!(replies, 65536_usize.div_ceil(16380));
}

#[tokio::test(start_paused = true)]
async fn handshake_edge_cases_keep_the_option_stream_in_sync() {
    let exports = exports(MIB);
    let shutdown = Shutdown::new();
    let (mut client, _session) = start(&exports, &shutdown);
    client.greet().await;
    // Too much option data: drained without buffering it, refused, stream in sync.
    let replies = client.option(0x4242, &vec![0; 100_000]).await;
    assert_eq!(
        replies,
        [(REP_ERR_TOO_BIG, b"option data too large".to_vec())]
    );
    assert_eq!(client.option(0x4242, b"x").await[0].0, REP_ERR_UNSUP);
    assert_eq!(client.option(OPT_LIST, b"junk").await[0].0, REP_ERR_INVALID);
    let listing = client.option(OPT_LIST, &[]).await;
    assert_eq!(listing.len(), 2, "one export, then ACK: {listing:?}");
    // Once stopping, options get ERR_SHUTDOWN, and ABORT still its ACK.
    shutdown.advance(Phase::Stopping);
    assert_eq!(client.option(OPT_LIST, &[]).await[0].0, REP_ERR_SHUTDOWN);
    assert_eq!(client.option(OPT_ABORT, &[]).await, [(REP_ACK, vec![])]);
    assert!(client.closed().await);
}

#[tokio::test(start_paused = true)]
async fn a_client_quiet_in_the_handshake_is_closed_when_closing_begins() {
    let exports = exports(MIB);
    let shutdown = Shutdown::new();
    let (mut client, session) = start(&exports, &shutdown);
    client.greet().await;
    shutdown.advance(Phase::Closing);
    assert!(client.closed().await);
    assert!(session.await.unwrap().is_none());
}

#[tokio::test]
async fn export_name_after_extended_headers_closes_the_connection() {
    let exports = exports(MIB);
    let (mut client, session) = start(&exports, &Shutdown::new());
    client.greet().await;
    client.option(OPT_EXTENDED_HEADERS, &[]).await;
    client.send_option(OPT_EXPORT_NAME, b"disk").await;
    assert!(client.closed().await);
    assert!(session.await.unwrap().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_client_that_never_sends_its_flags_is_closed_once_stopping() {
    // Every read of the handshake follows the phases, the client flags' included: a client
    // that connects and sends nothing cannot hold a stopping server for its grace period.
    let exports = exports(MIB);
    let shutdown = Shutdown::new();
    let (mut client, session) = start(&exports, &shutdown);
    let mut greeting = [0u8; 18];
    client.stream.read_exact(&mut greeting).await.unwrap();
    shutdown.advance(Phase::Stopping);
    let started = tokio::time::Instant::now();
    assert!(client.closed().await);
    assert!(session.await.unwrap().is_none());
    assert!(started.elapsed() <= crate::shutdown::DRAIN_IDLE * 2);
}

#[tokio::test]
async fn a_bad_magic_still_gets_the_replies_before_it_sent() {
    // The stream is out of sync after a bad request magic; the requests before it were valid
    // and are answered in full before the connection closes.
    let exports = exports(MIB);
    let (mut client, session) = start(&exports, &Shutdown::new());
    client.go(false).await;
    let mut bytes = Vec::new();
    for i in 0..8u64 {
        bytes.extend(Client::request(CMD_READ, 0, i, 0, 64 * 1024));
    }
    bytes.extend([0xab; 28]);
    client.send(&bytes).await;
    for i in 0..8u64 {
        let (error, cookie, data) = client.simple_reply(64 * 1024).await;
        assert_eq!((error, cookie, data.len()), (0, i, 64 * 1024));
    }
    assert!(client.closed().await);
    assert!(
        session.await.unwrap().is_none(),
        "ends as an error: out of sync"
    );
}
