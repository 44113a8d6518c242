//! Whole sessions in-process: a client speaks raw NBD over an in-memory stream
//! (`tokio::io::duplex`) to `negotiate` + `transmit`, with tokio's clock paused where time
//! matters. No sleeps: what these tests assert does not depend on the machine's speed. The
//! hand-over tests at the end also pass real sockets (TCP and Unix) on as file descriptors.

use std::sync::Arc;

use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf,
};
use tokio::task::JoinHandle;

use super::transmit::Stats;
use super::{HandedOver, Suspended, negotiate, transmit};
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
    let (client, session) = start_suspendable(exports, shutdown);
    let stats = tokio::spawn(async move { session.await.unwrap().map(|(stats, _)| stats) });
    (client, stats)
}

/// The server's halves of the in-memory stream.
type Halves = HandedOver<ReadHalf<DuplexStream>, WriteHalf<DuplexStream>>;
/// How a transmission ended: its stats, and the stream and state if it was handed over.
type Ended = Option<(Stats, Option<Halves>)>;

/// Like [`start`], and a hand-over returns the stream and state.
fn start_suspendable(exports: &Arc<Exports>, shutdown: &Shutdown) -> (Client, JoinHandle<Ended>) {
    // Small buffers, so that a client that does not read soon blocks the server's writes.
    let (client, server) = tokio::io::duplex(64 * 1024);
    let exports = Arc::clone(exports);
    let mut watch = shutdown.watch();
    let task = tokio::spawn(async move {
        let (mut reader, mut writer) = tokio::io::split(server);
        let negotiated = negotiate::negotiate(
            &mut reader,
            &mut writer,
            &exports,
            &mut crate::access::Peer::unknown(),
            &mut watch,
        )
        .await
        .ok()??;
        transmit::transmit(reader, writer, negotiated, &[], watch, None)
            .await
            .ok()
    });
    (Client { stream: client }, task)
}

/// Carries a handed-over session on, as another process would: its state through the
/// encoding, the same stream.
fn resume(handed_over: Halves, exports: &Arc<Exports>, shutdown: &Shutdown) -> JoinHandle<Ended> {
    let encoded = handed_over.state.encode();
    let state = Suspended::decode(&encoded).expect("decode what was encoded");
    assert_eq!(state, handed_over.state);
    let exports = Arc::clone(exports);
    let watch = shutdown.watch();
    tokio::spawn(async move {
        let negotiated = state.negotiated(&exports).expect("the same export");
        let HandedOver { reader, writer, .. } = handed_over;
        transmit::transmit(reader, writer, negotiated, &state.pending, watch, None)
            .await
            .ok()
    })
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

// Hand-over: a session suspended at a request boundary and carried on by another session (as
// another process would, through the encoded state) on the same stream.

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// A structured reply chunk: (flags, type, cookie, payload).
    async fn structured_chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let mut header = [0u8; 20];
        self.stream.read_exact(&mut header).await.unwrap();
        assert_eq!(&header[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        let flags = u16::from_be_bytes(header[4..6].try_into().unwrap());
        let kind = u16::from_be_bytes(header[6..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(header[8..16].try_into().unwrap());
        let len = u32::from_be_bytes(header[16..20].try_into().unwrap());
        let mut payload = vec![0u8; len as usize];
        self.stream.read_exact(&mut payload).await.unwrap();
        (flags, kind, cookie, payload)
    }

    /// The handshake with structured replies (or extended headers) and `base:allocation`
    /// selected; returns the context id.
    async fn go_with_block_status(&mut self, extended: bool) -> u32 {
        self.greet().await;
        let format = if extended {
            OPT_EXTENDED_HEADERS
        } else {
            OPT_STRUCTURED_REPLY
        };
        assert_eq!(self.option(format, &[]).await.last().unwrap().0, REP_ACK);
        let mut query = 4u32.to_be_bytes().to_vec();
        query.extend_from_slice(b"disk");
        query.extend_from_slice(&1u32.to_be_bytes());
        query.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
        query.extend_from_slice(BASE_ALLOCATION.as_bytes());
        let replies = self.option(OPT_SET_META_CONTEXT, &query).await;
        assert_eq!(replies[0].0, REP_META_CONTEXT);
        let context = u32::from_be_bytes(replies[0].1[..4].try_into().unwrap());
        let mut go = 4u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"disk");
        go.extend_from_slice(&0u16.to_be_bytes());
        assert_eq!(self.option(OPT_GO, &go).await.last().unwrap().0, REP_ACK);
        context
    }
}

/// The kernel's dialect (simple replies), 4 KiB to 128 KiB: WRITE, READ it back, WRITE_ZEROES
/// it, READ the zeroes, for every fourth request. Returns the requests' bytes and, per
/// request, the cookie and the READ data its reply carries.
fn kernel_like_requests(count: u64) -> (Vec<u8>, Vec<(u64, Vec<u8>)>) {
    let mut bytes = Vec::new();
    let mut expected = Vec::new();
    for i in 0..count {
        let group = i / 4;
        let offset = group * 128 * 1024;
        let len = 4096 * (1 + (group * 7) % 32) as u32;
        let fill = group as u8 + 1;
        let (request, data) = match i % 4 {
            0 => {
                let mut request = Client::request(CMD_WRITE, 0, i, offset, len);
                request.extend(vec![fill; len as usize]);
                (request, vec![])
            }
            1 => (
                Client::request(CMD_READ, 0, i, offset, len),
                vec![fill; len as usize],
            ),
            2 => (
                Client::request(CMD_WRITE_ZEROES, 0, i, offset, len / 2),
                vec![],
            ),
            _ => {
                let mut data = vec![0; len as usize / 2];
                data.extend(vec![fill; len as usize / 2]);
                (Client::request(CMD_READ, 0, i, offset, len), data)
            }
        };
        bytes.extend(request);
        expected.push((i, data));
    }
    (bytes, expected)
}

#[tokio::test]
async fn a_hand_over_mid_stream_answers_every_request_exactly_once() {
    // 128 requests pipelined and DISC, sent while replies are read; after 16 replies the old
    // session is handed over. Every request gets exactly one reply, in order, from the old
    // session or the resumed one, and the data written before is read back after.
    let exports = exports(64 * MIB);
    let old = Shutdown::new();
    let (mut client, session) = start_suspendable(&exports, &old);
    client.go(false).await;
    let (mut bytes, expected) = kernel_like_requests(128);
    bytes.extend(Client::request(CMD_DISC, 0, 9999, 0, 0));
    let (reader, mut writer) = tokio::io::split(client.stream);
    let sending = tokio::spawn(async move { writer.write_all(&bytes).await.unwrap() });
    let (sixteen_read, sixteen) = tokio::sync::oneshot::channel();
    let reading = tokio::spawn(async move {
        let mut client = Client {
            stream: tokio::io::join(reader, tokio::io::sink()),
        };
        let mut sixteen_read = Some(sixteen_read);
        for (n, (cookie, data)) in expected.into_iter().enumerate() {
            let reply = client.simple_reply(data.len()).await;
            assert_eq!(reply, (0, cookie, data), "reply {n}");
            if n == 15 {
                sixteen_read.take().unwrap().send(()).unwrap();
            }
        }
        // Nothing more: no reply was sent twice.
        assert!(client.closed().await, "DISC closes the connection");
    });
    sixteen.await.unwrap();
    old.hand_over();
    let (old_stats, handed_over) = session.await.unwrap().expect("a transmission");
    let handed_over = handed_over.expect("suspended by the hand-over");
    assert!(
        (16..128).contains(&old_stats.requests),
        "handed over mid-stream, after {} requests",
        old_stats.requests
    );
    let resumed = resume(handed_over, &exports, &Shutdown::new());
    reading.await.unwrap();
    sending.await.unwrap();
    let (new_stats, again) = resumed.await.unwrap().expect("a transmission");
    assert!(again.is_none(), "closed by DISC");
    assert_eq!(
        old_stats.requests + new_stats.requests,
        129,
        "each request executed once by one of the sessions, DISC included"
    );
}

#[tokio::test]
async fn a_write_whose_payload_is_partly_received_is_carried_over_as_pending_input() {
    let exports = exports(64 * MIB);
    let old = Shutdown::new();
    let (mut client, session) = start_suspendable(&exports, &old);
    client.go(false).await;
    // A 512 KiB write (received whole before it is applied), 100 KiB of its payload sent:
    // with a 64 KiB stream, the server has read at least 36 KiB of it.
    let header = Client::request(CMD_WRITE, 0, 1, 4096, 512 * 1024);
    client.send(&header).await;
    client.send(&vec![5u8; 100 * 1024]).await;
    old.hand_over();
    let (_, handed_over) = session.await.unwrap().unwrap();
    let handed_over = handed_over.expect("suspended");
    let pending = &handed_over.state.pending;
    assert_eq!(
        &pending[..28],
        &header[..],
        "the request is pending, not executed"
    );
    assert!(pending.len() >= 28 + 36 * 1024, "{} bytes", pending.len());
    assert!(pending[28..].iter().all(|&b| b == 5));
    let disk = &exports.get("disk").unwrap().disk;
    assert_eq!(
        disk.allocated_bytes(),
        0,
        "nothing applied before the hand-over"
    );
    let _resumed = resume(handed_over, &exports, &Shutdown::new());
    client.send(&vec![5u8; 412 * 1024]).await;
    assert_eq!(client.simple_reply(0).await, (0, 1, vec![]));
    client
        .send(&Client::request(CMD_READ, 0, 2, 0, 516 * 1024))
        .await;
    let (error, cookie, data) = client.simple_reply(516 * 1024).await;
    assert_eq!((error, cookie), (0, 2));
    assert!(data[..4096].iter().all(|&b| b == 0));
    assert!(data[4096..].iter().all(|&b| b == 5));
}

#[tokio::test(start_paused = true)]
async fn a_streaming_write_completes_before_the_session_suspends() {
    // An 8 MiB write streams into the store as it arrives: it cannot be carried over as
    // pending bytes, so the session reads it to its end, replies, and only then suspends; the
    // request after it is carried over.
    let exports = exports(64 * MIB);
    let old = Shutdown::new();
    let (mut client, mut session) = start_suspendable(&exports, &old);
    client.go(false).await;
    client
        .send(&Client::request(CMD_WRITE, 0, 1, 0, 8 << 20))
        .await;
    client.send(&vec![7u8; 2 << 20]).await;
    old.hand_over();
    let waiting = tokio::time::timeout(std::time::Duration::from_secs(5), &mut session).await;
    assert!(waiting.is_err(), "suspended in the middle of a write");
    let mut rest = vec![7u8; 6 << 20];
    rest.extend(Client::request(CMD_READ, 0, 2, (8 << 20) - 4096, 8192));
    client.send(&rest).await;
    assert_eq!(
        client.simple_reply(0).await,
        (0, 1, vec![]),
        "from the old session"
    );
    let (_, handed_over) = session.await.unwrap().unwrap();
    let handed_over = handed_over.expect("suspended after the write");
    let _resumed = resume(handed_over, &exports, &Shutdown::new());
    let (error, cookie, data) = client.simple_reply(8192).await;
    assert_eq!((error, cookie), (0, 2));
    assert_eq!(data[..4096], [7u8; 4096]);
    assert_eq!(data[4096..], [0u8; 4096]);
}

#[tokio::test(start_paused = true)]
async fn closing_closes_a_session_that_a_hand_over_could_not_bring_to_a_boundary() {
    // The client stalls in the middle of a streaming write's payload: the hand-over cannot
    // complete it, and when closing begins the session closes as in any stop.
    let exports = exports(64 * MIB);
    let old = Shutdown::new();
    let (mut client, session) = start_suspendable(&exports, &old);
    client.go(false).await;
    client
        .send(&Client::request(CMD_WRITE, 0, 1, 0, 8 << 20))
        .await;
    client.send(&vec![7u8; 2 << 20]).await;
    old.hand_over();
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    old.advance(Phase::Closing);
    let (_, handed_over) = session.await.unwrap().expect("a transmission");
    assert!(handed_over.is_none(), "closed, not handed over");
    assert!(client.closed().await);
}

#[tokio::test]
async fn structured_and_extended_sessions_keep_their_format_and_context_after_resuming() {
    for extended in [false, true] {
        let exports = exports(64 * MIB);
        let old = Shutdown::new();
        let (mut client, session) = start_suspendable(&exports, &old);
        let context = client.go_with_block_status(extended).await;
        let write = |cookie, offset, len: u32| {
            let mut bytes = if extended {
                Client::extended(CMD_WRITE, 0, cookie, offset, len.into())
            } else {
                Client::request(CMD_WRITE, 0, cookie, offset, len)
            };
            bytes.extend(vec![9u8; len as usize]);
            bytes
        };
        client.send(&write(1, MIB, 8192)).await;
        let done = if extended {
            client.extended_chunk().await
        } else {
            client.structured_chunk().await
        };
        assert_eq!(done, (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 1, vec![]));
        // Idle at the hand-over: suspends at once, nothing pending.
        old.hand_over();
        let (_, handed_over) = session.await.unwrap().unwrap();
        let handed_over = handed_over.expect("suspended");
        let state = &handed_over.state;
        assert_eq!(
            (state.structured, state.extended, state.base_allocation),
            (true, extended, Some(context))
        );
        assert!(state.pending.is_empty());
        let _resumed = resume(handed_over, &exports, &Shutdown::new());
        let (kind, descriptor) = if extended {
            let request = Client::extended(CMD_BLOCK_STATUS, 0, 2, 0, 4 * MIB);
            client.send(&request).await;
            (REPLY_TYPE_BLOCK_STATUS_EXT, 16)
        } else {
            let request = Client::request(CMD_BLOCK_STATUS, 0, 2, 0, 4 * MIB as u32);
            client.send(&request).await;
            (REPLY_TYPE_BLOCK_STATUS, 8)
        };
        let (flags, got_kind, cookie, payload) = if extended {
            client.extended_chunk().await
        } else {
            client.structured_chunk().await
        };
        assert_eq!((flags, got_kind, cookie), (REPLY_FLAG_DONE, kind, 2));
        assert_eq!(payload[..4], context.to_be_bytes());
        // Extended: context, count, then (u64 length, u64 flags); structured: context, then
        // (u32 length, u32 flags).
        let header = if extended { 8 } else { 4 };
        let extents: Vec<(u64, u64)> = payload[header..]
            .chunks(descriptor)
            .map(|d| {
                let half = descriptor / 2;
                let number = |b: &[u8]| b.iter().fold(0u64, |n, &x| n << 8 | u64::from(x));
                (number(&d[..half]), number(&d[half..]))
            })
            .collect();
        assert_eq!(
            extents,
            [(MIB, 3), (8192, 0), (3 * MIB - 8192, 3)],
            "extended: {extended}"
        );
    }
}

#[tokio::test]
async fn a_session_is_not_resumed_onto_an_export_that_changed() {
    let exports_before = exports(64 * MIB);
    let old = Shutdown::new();
    let (mut client, session) = start_suspendable(&exports_before, &old);
    client.go(false).await;
    old.hand_over();
    let (_, handed_over) = session.await.unwrap().unwrap();
    let HandedOver {
        reader,
        writer,
        state,
    } = handed_over.expect("suspended");
    let resized = exports(32 * MIB);
    assert_eq!(
        state.negotiated(&resized).unwrap_err(),
        super::ResumeError::SizeChanged {
            name: "disk".to_owned(),
            then: 64 * MIB,
            now: 32 * MIB
        }
    );
    let read_only = Arc::new(
        Exports::new(&[ExportConfig {
            name: "disk".to_owned(),
            size: 64 * MIB,
            read_only: true,
            description: String::new(),
            max_memory: None,
            ..Default::default()
        }])
        .unwrap(),
    );
    assert!(matches!(
        state.negotiated(&read_only).unwrap_err(),
        super::ResumeError::Capabilities { .. }
    ));
    let other = Arc::new(Exports::new(&[]).unwrap());
    assert!(matches!(
        state.negotiated(&other).unwrap_err(),
        super::ResumeError::NoExport(_)
    ));
    // The public entry point refuses it and closes the stream cleanly.
    let resumed = super::resume(
        reader,
        writer,
        crate::access::Peer::unknown(),
        state,
        resized,
        Shutdown::new(),
        None,
    );
    assert!(resumed.await.is_none());
    assert!(client.closed().await);
}

/// A socket's server half as a hand-over gives it to the service manager: a file descriptor
/// and the encoded state.
type Stored = (std::os::fd::OwnedFd, Vec<u8>);

/// Drives a session over a real socket through a hand-over: a WRITE and the first 10 bytes of
/// a READ sent together, the WRITE answered, the hand-over, the rest of the READ; the resumed
/// session answers the READ with the data written, then DISC. `pending`: how many bytes the
/// state must carry (for Unix sockets, where one write is one read: the 10).
async fn hand_over_a_socket<S: AsyncRead + AsyncWrite + Unpin>(
    client: S,
    old: Shutdown,
    serving: JoinHandle<Stored>,
    pending: Option<usize>,
    resume: impl FnOnce(Stored) -> JoinHandle<Option<()>>,
) {
    let mut client = Client { stream: client };
    client.go(false).await;
    let read = Client::request(CMD_READ, 0, 2, 0, 4096);
    let mut bytes = Client::request(CMD_WRITE, 0, 1, 0, 4096);
    bytes.extend([3u8; 4096]);
    bytes.extend(&read[..10]);
    client.send(&bytes).await;
    assert_eq!(client.simple_reply(0).await, (0, 1, vec![]));
    old.hand_over();
    let stored = serving.await.unwrap();
    if let Some(pending) = pending {
        let state = Suspended::decode(&stored.1).unwrap();
        assert_eq!(state.pending, read[..pending]);
    }
    let resumed = resume(stored);
    client.send(&read[10..]).await;
    assert_eq!(client.simple_reply(4096).await, (0, 2, vec![3u8; 4096]));
    client.send(&Client::request(CMD_DISC, 0, 3, 0, 0)).await;
    assert!(client.closed().await);
    assert_eq!(
        resumed.await.unwrap(),
        None,
        "closed by DISC, not handed over"
    );
}

#[tokio::test]
async fn real_sockets_are_handed_over_as_file_descriptors() {
    use std::os::fd::OwnedFd;

    use tokio::net::{TcpListener, TcpStream, UnixStream};

    let exports = exports(MIB);

    let (client, server) = UnixStream::pair().unwrap();
    let old = Shutdown::new();
    let serving = tokio::spawn({
        let (exports, old) = (Arc::clone(&exports), old.clone());
        async move {
            let (reader, writer) = server.into_split();
            let handed_over = super::serve(reader, writer, exports, old, None).await;
            let HandedOver {
                reader,
                writer,
                state,
            } = handed_over.expect("suspended");
            let socket = reader.reunite(writer).unwrap().into_std().unwrap();
            (OwnedFd::from(socket), state.encode())
        }
    });
    let resume = |(fd, state): Stored| {
        let exports = Arc::clone(&exports);
        tokio::spawn(async move {
            let state = Suspended::decode(&state).unwrap();
            let socket = std::os::unix::net::UnixStream::from(fd);
            socket.set_nonblocking(true).unwrap();
            let (reader, writer) = UnixStream::from_std(socket).unwrap().into_split();
            let ended = super::resume(
                reader,
                writer,
                crate::access::Peer::unknown(),
                state,
                exports,
                Shutdown::new(),
                None,
            );
            ended.await.map(|_| ())
        })
    };
    hand_over_a_socket(client, old, serving, Some(10), resume).await;

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = listener.accept().await.unwrap();
    let old = Shutdown::new();
    let serving = tokio::spawn({
        let (exports, old) = (Arc::clone(&exports), old.clone());
        async move {
            let (reader, writer) = server.into_split();
            let handed_over = super::serve(reader, writer, exports, old, None).await;
            let HandedOver {
                reader,
                writer,
                state,
            } = handed_over.expect("suspended");
            let socket = reader.reunite(writer).unwrap().into_std().unwrap();
            (OwnedFd::from(socket), state.encode())
        }
    });
    let resume = |(fd, state): Stored| {
        let exports = Arc::clone(&exports);
        tokio::spawn(async move {
            let state = Suspended::decode(&state).unwrap();
            let socket = std::net::TcpStream::from(fd);
            socket.set_nonblocking(true).unwrap();
            let (reader, writer) = TcpStream::from_std(socket).unwrap().into_split();
            let ended = super::resume(
                reader,
                writer,
                crate::access::Peer::unknown(),
                state,
                exports,
                Shutdown::new(),
                None,
            );
            ended.await.map(|_| ())
        })
    };
    hand_over_a_socket(client, old, serving, None, resume).await;
}

#[tokio::test]
async fn the_server_collects_suspended_connections_and_a_second_one_adopts_them() {
    use std::time::Duration;

    use crate::server::{self, Listener, ServeOptions};

    let exports = exports(MIB);
    let options = ServeOptions {
        max_connections: 4,
        max_connections_per_client: 0,
        handshake_timeout: None,
        tcp_keepalive: None,
        allow: Vec::new(),
        shutdown_grace: Duration::from_secs(5),
        metrics: None,
        tls: Default::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let old = Shutdown::new();
    let first = tokio::spawn(server::serve(
        vec![Listener::Tcp(listener)],
        Arc::clone(&exports),
        options.clone(),
        old.clone(),
    ));
    let mut clients = Vec::new();
    for i in 0..3u8 {
        let stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let mut client = Client { stream };
        client.go(false).await;
        let mut write = Client::request(CMD_WRITE, 0, 1, u64::from(i) * 4096, 4096);
        write.extend([i + 1; 4096]);
        client.send(&write).await;
        assert_eq!(client.simple_reply(0).await, (0, 1, vec![]));
        clients.push(client);
    }
    // A request sent just before the hand-over: the old server or the new one answers it.
    clients[0]
        .send(&Client::request(CMD_READ, 0, 2, 4096, 4096))
        .await;
    old.hand_over();
    let handed_over = first.await.unwrap();
    assert_eq!(handed_over.len(), 3, "every connection handed over");
    assert!(
        tokio::net::TcpStream::connect(address).await.is_err(),
        "listener closed"
    );

    let new = Shutdown::new();
    let second = tokio::spawn(server::serve_adopting(
        Vec::new(),
        handed_over,
        Arc::clone(&exports),
        options,
        new.clone(),
    ));
    assert_eq!(clients[0].simple_reply(4096).await, (0, 2, vec![2; 4096]));
    for (i, client) in clients.iter_mut().enumerate() {
        let offset = ((i + 1) % 3) as u64 * 4096;
        client
            .send(&Client::request(CMD_READ, 0, 3, offset, 4096))
            .await;
        let expected = vec![((i + 1) % 3) as u8 + 1; 4096];
        assert_eq!(client.simple_reply(4096).await, (0, 3, expected));
        client.send(&Client::request(CMD_DISC, 0, 4, 0, 0)).await;
        assert!(client.closed().await);
    }
    new.advance(Phase::Stopping);
    assert!(second.await.unwrap().is_empty(), "nothing handed over");
}

#[tokio::test]
async fn a_session_is_not_resumed_for_a_peer_the_new_rules_refuse() {
    let exports_before = exports(MIB);
    let old = Shutdown::new();
    let (mut client, session) = start_suspendable(&exports_before, &old);
    client.go(false).await;
    old.hand_over();
    let (_, handed_over) = session.await.unwrap().unwrap();
    let HandedOver {
        reader,
        writer,
        state,
    } = handed_over.expect("suspended");
    // The same export, now only for one network.
    let mut config = ExportConfig {
        name: "disk".to_owned(),
        size: MIB,
        ..Default::default()
    };
    config.access.networks = vec![crate::access::parse_network("10.0.0.0/8").unwrap()];
    let restricted = Arc::new(Exports::new(&[config]).unwrap());
    assert!(state.negotiated(&restricted).is_ok(), "otherwise resumable");
    let outsider = crate::access::Peer::tcp("192.0.2.1".parse().unwrap());
    let resumed = super::resume(
        reader,
        writer,
        outsider,
        state,
        restricted,
        Shutdown::new(),
        None,
    );
    assert!(resumed.await.is_none());
    assert!(client.closed().await);
}
