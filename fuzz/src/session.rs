//! One whole connection, handshake and transmission, driven by a fuzzer's bytes.
//!
//! # Input
//! * byte 0, the **negotiation** ([`neg`]): whether a correct handshake is put in front of the
//!   raw bytes (so the fuzzer reaches the transmission phase at once) and which one;
//! * byte 1, the **delivery** ([`delivery`]): in what pieces the client writes its bytes, whether
//!   the server starts a graceful stop part way, whether the raw bytes are fill records
//!   ([`expand`]: megabyte requests from short inputs), and whether metrics are on;
//! * the rest: raw client bytes, after that prefix.
//!
//! # What is checked
//! The session runs `ramnbd::session::serve` on a current-thread runtime with tokio's clock
//! paused, against three small exports, while the client writes its bytes and a checker reads
//! everything the server sends. The checker follows the client's bytes as a real client
//! would (the input is known in full, so it knows every option and request the server will
//! see) and asserts:
//! * every option reply and transmission reply is well framed (magic, option, cookie, types,
//!   lengths), answers its option or request in order, and nothing follows where the
//!   connection must end (ABORT, DISC, a refused EXPORT_NAME, a bad magic);
//! * READ data and block status holes agree with a model of the disk that applies each write
//!   and zeroing the server acknowledged; nothing on a read-only export, past an export's
//!   end, or under an unnegotiated context succeeds; plain valid requests do succeed;
//! * the session ends once the client's input is over (no hang, no busy loop);
//! * with metrics on, the export's request and error counters match the replies read;
//! * afterwards the store holds what the model says, within its size and memory cap, and the
//!   exports the session did not use are untouched.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ramnbd::config::ExportConfig;
use ramnbd::export::{Export, Exports};
use ramnbd::metrics::Metrics;
use ramnbd::proto::consts::*;
use ramnbd::ramdisk::{Extent, PAGE_SIZE};
use ramnbd::shutdown::{CLOSE_FLUSH, Phase, Shutdown};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};

use crate::wire;

/// The exports every session sees: (name, size, read-only, memory cap). Sizes are not
/// page-aligned, and the first is larger than a whole-payload write (1 MiB), so streamed
/// writes are reachable.
pub const EXPORTS: [(&str, u64, bool, Option<u64>); 3] = [
    ("disk", (2 << 20) + 512, false, None),
    ("small", (64 << 10) + 1, true, None),
    ("capped", (256 << 10) + 7, false, Some(64 << 10)),
];
/// A name no export has.
pub const MISSING: &str = "missing";

/// Bits of the negotiation byte.
pub mod neg {
    /// Low two bits: the prefix. RAW: none, the raw bytes start with the client flags.
    pub const RAW: u8 = 0;
    /// Client flags, the options below, then GO (asking for name, description, block size).
    pub const GO: u8 = 1;
    /// Client flags, the options below, then EXPORT_NAME.
    pub const EXPORT_NAME: u8 = 2;
    /// Client flags only: the raw bytes are options.
    pub const FLAGS_ONLY: u8 = 3;
    /// STRUCTURED_REPLY before choosing the export.
    pub const STRUCTURED: u8 = 1 << 2;
    /// EXTENDED_HEADERS before choosing the export.
    pub const EXTENDED: u8 = 1 << 3;
    /// SET_META_CONTEXT base:allocation for the export before choosing it.
    pub const META: u8 = 1 << 4;
    /// Bits 5 and 6: the export, an index into `EXPORTS`, 3 for [`super::MISSING`].
    pub const SMALL: u8 = 1 << 5;
    pub const CAPPED: u8 = 2 << 5;
    pub const UNKNOWN_EXPORT: u8 = 3 << 5;
    /// The client flags leave out NO_ZEROES.
    pub const ZEROES: u8 = 1 << 7;
}

/// Bits of the delivery byte.
pub mod delivery {
    /// Low four bits: 0, no graceful stop (the client closes its side when its bytes are
    /// written); n > 0, the server starts stopping once the client has written (n - 1)
    /// fourteenths of its bytes (15: all of them), and closing a virtual second after the
    /// last byte.
    pub const STOP_MASK: u8 = 0x0f;
    /// Bits 4 and 5: the client writes pieces of `PIECES[i]` bytes (at most 4096 pieces),
    /// yielding between them.
    pub const PIECE_SHIFT: u8 = 4;
    /// The raw bytes are fill records (see [`super::expand`]), so that a short input can
    /// stream a request of megabytes.
    pub const FILLS: u8 = 1 << 6;
    /// Metrics on.
    pub const METRICS: u8 = 1 << 7;
}

const PIECES: [usize; 4] = [usize::MAX, 1, 29, 4096];

/// The most bytes fill records expand to: enough for a streamed write across the whole
/// `disk` export, little enough to keep a run to milliseconds.
pub const MAX_EXPANDED: usize = 3 << 20;

/// Expands fill records: a tag byte `t` below 0x80 is followed by `t + 1` literal bytes; a
/// tag of 0x80 or more, by two bytes that with its low 7 bits make a 23-bit count `n`, and a
/// byte repeated `n + 1` times.
pub fn expand(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some((&tag, rest)) = raw.split_first() {
        if out.len() >= MAX_EXPANDED {
            break;
        }
        if tag < 0x80 {
            let n = (usize::from(tag) + 1).min(rest.len());
            out.extend_from_slice(&rest[..n]);
            raw = &rest[n..];
        } else {
            let [hi, lo, byte, rest @ ..] = rest else {
                break;
            };
            let count = usize::from(tag & 0x7f) << 16 | usize::from(*hi) << 8 | usize::from(*lo);
            let count = (count + 1).min(MAX_EXPANDED - out.len());
            out.resize(out.len() + count, *byte);
            raw = rest;
        }
    }
    out.truncate(MAX_EXPANDED);
    out
}

/// Fill records for `bytes` as literals.
pub fn literal(bytes: &[u8]) -> Vec<u8> {
    bytes
        .chunks(128)
        .flat_map(|chunk| {
            let mut record = vec![(chunk.len() - 1) as u8];
            record.extend_from_slice(chunk);
            record
        })
        .collect()
}

/// Fill records for `count` copies of `byte`.
pub fn fill(mut count: usize, byte: u8) -> Vec<u8> {
    let mut records = Vec::new();
    while count > 0 {
        let n = count.min(1 << 23);
        let m = n - 1;
        records.extend_from_slice(&[0x80 | (m >> 16) as u8, (m >> 8) as u8, m as u8, byte]);
        count -= n;
    }
    records
}

/// Polls of the server's future one session may take: far more than any input of a fuzzer's
/// size needs, so reaching it means a busy loop (a paused clock cannot catch one: virtual
/// time only moves when every task waits).
const MAX_POLLS: u64 = 2_000_000;
/// Virtual time one session may take. The paused clock jumps ahead whenever all tasks wait,
/// so this only expires when the session has stopped making progress: a hang.
const SESSION_LIMIT: Duration = Duration::from_secs(3600);

/// The fuzzer's input, split into its parts.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    pub negotiation: u8,
    pub delivery: u8,
}

impl Setup {
    /// The size of the client's pieces for a stream of `len` bytes.
    fn piece(self, len: usize) -> usize {
        PIECES[usize::from((self.delivery >> delivery::PIECE_SHIFT) & 3)].max(len / 4096)
    }

    /// After how many fourteenths of the client's bytes the server starts stopping.
    fn stop_at(self) -> Option<usize> {
        match self.delivery & delivery::STOP_MASK {
            0 => None,
            n => Some(usize::from(n - 1)),
        }
    }

    fn metrics(self) -> bool {
        self.delivery & delivery::METRICS != 0
    }
}

/// A fuzz input from its parts (what the seed corpus is made of).
pub fn input(negotiation: u8, delivery: u8, raw: &[u8]) -> Vec<u8> {
    let mut v = vec![negotiation, delivery];
    v.extend_from_slice(raw);
    v
}

/// The export name a negotiation byte picks.
pub fn export_name(negotiation: u8) -> &'static str {
    match negotiation >> 5 & 3 {
        3 => MISSING,
        i => EXPORTS[usize::from(i)].0,
    }
}

/// The bytes the client sends: the negotiation's prefix, then the raw bytes.
pub fn client_stream(data: &[u8]) -> (Setup, Vec<u8>) {
    let setup = Setup {
        negotiation: data.first().copied().unwrap_or(0),
        delivery: data.get(1).copied().unwrap_or(0),
    };
    let mut stream = prefix(setup.negotiation);
    let raw = data.get(2..).unwrap_or_default();
    if setup.delivery & delivery::FILLS != 0 {
        stream.extend(expand(raw));
    } else {
        stream.extend_from_slice(raw);
    }
    (setup, stream)
}

fn prefix(negotiation: u8) -> Vec<u8> {
    let kind = negotiation & 3;
    if kind == neg::RAW {
        return Vec::new();
    }
    let mut flags = FLAG_C_FIXED_NEWSTYLE;
    if negotiation & neg::ZEROES == 0 {
        flags |= FLAG_C_NO_ZEROES;
    }
    let mut v = flags.to_be_bytes().to_vec();
    if kind == neg::FLAGS_ONLY {
        return v;
    }
    let name = export_name(negotiation).as_bytes();
    if negotiation & neg::STRUCTURED != 0 {
        v.extend(wire::option(OPT_STRUCTURED_REPLY, &[]));
    }
    if negotiation & neg::EXTENDED != 0 {
        v.extend(wire::option(OPT_EXTENDED_HEADERS, &[]));
    }
    if negotiation & neg::META != 0 {
        let query = wire::meta_context_request(name, &[BASE_ALLOCATION.as_bytes()]);
        v.extend(wire::option(OPT_SET_META_CONTEXT, &query));
    }
    if kind == neg::GO {
        let infos = [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE];
        v.extend(wire::option(OPT_GO, &wire::info_request(name, &infos)));
    } else {
        v.extend(wire::option(OPT_EXPORT_NAME, name));
    }
    v
}

fn configs() -> Vec<ExportConfig> {
    EXPORTS
        .iter()
        .map(|&(name, size, read_only, max_memory)| ExportConfig {
            name: name.to_owned(),
            size,
            read_only,
            description: format!("the {name} export"),
            max_memory,
            ..Default::default()
        })
        .collect()
}

/// What one session did, for tests of the harness itself.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Options answered, final reply types in order.
    pub options: Vec<u32>,
    /// The export transmission used.
    pub export: Option<String>,
    /// Requests answered, errno in order (0: success).
    pub replies: Vec<u32>,
}

/// Runs one fuzz input; panics on any broken invariant.
pub fn run(data: &[u8]) -> Summary {
    let (setup, stream) = client_stream(data);
    let exports = Arc::new(Exports::new(&configs()).expect("create the exports"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    let metrics = setup.metrics().then(|| Metrics::new(Arc::clone(&exports)));
    let outcome = runtime.block_on(session(&exports, &stream, setup, metrics.clone()));
    if let Some(metrics) = metrics {
        check_metrics(&metrics.render(), &outcome);
    }
    check_stores(&exports, &outcome);
    outcome.summary
}

async fn session(
    exports: &Arc<Exports>,
    stream: &[u8],
    setup: Setup,
    metrics: Option<Arc<Metrics>>,
) -> Outcome {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let (server_reader, server_writer) = tokio::io::split(server);
    let (client_reader, client_writer) = tokio::io::split(client);
    let shutdown = Shutdown::new();
    let server = PollLimit {
        inner: Box::pin(ramnbd::session::serve(
            server_reader,
            server_writer,
            Arc::clone(exports),
            shutdown.clone(),
            metrics,
        )),
        left: MAX_POLLS,
    };
    let client = deliver(client_writer, stream, setup, &shutdown);
    let checker = Checker {
        out: Output(client_reader),
        input: stream,
        pos: 0,
        exports,
        lenient: setup.stop_at().is_some(),
        diverged: false,
        answered: Vec::new(),
    }
    .run();
    let all = async { tokio::join!(server, client, checker) };
    let (handed_over, (), outcome) = tokio::time::timeout(SESSION_LIMIT, all)
        .await
        .expect("the session did not end after the client's input was over");
    assert!(handed_over.is_none(), "no hand-over was asked for");
    outcome
}

/// Writes the client's bytes in pieces, starting and advancing a graceful stop if the setup
/// says so, then closes the client's sending side.
async fn deliver(
    mut writer: WriteHalf<DuplexStream>,
    stream: &[u8],
    setup: Setup,
    shutdown: &Shutdown,
) {
    let stop_at = setup.stop_at().map(|k| stream.len() * k / 14);
    let (before, after) = stream.split_at(stop_at.unwrap_or(stream.len()));
    for (part, bytes) in [before, after].into_iter().enumerate() {
        if part == 1 && stop_at.is_some() {
            // Once the server has done all it can with the bytes so far: with the clock
            // paused, a sleep ends only when every future waits.
            tokio::time::sleep(Duration::from_millis(1)).await;
            shutdown.advance(Phase::Stopping);
        }
        for piece in bytes.chunks(setup.piece(stream.len())) {
            if writer.write_all(piece).await.is_err() {
                break; // the server has closed the connection
            }
            tokio::task::yield_now().await;
        }
    }
    if stop_at.is_some() {
        shutdown.advance(Phase::Stopping);
        // As the server does: closing shortly before the grace period ends, then a flush.
        tokio::time::sleep(Duration::from_secs(1)).await;
        shutdown.advance(Phase::Closing);
        tokio::time::sleep(CLOSE_FLUSH).await;
    }
    let _ = writer.shutdown().await;
}

/// A future that panics if polled more than `left` times.
struct PollLimit<F> {
    inner: Pin<Box<F>>,
    left: u64,
}

impl<F: Future> Future for PollLimit<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        assert!(
            self.left > 0,
            "the session was polled {MAX_POLLS} times: a busy loop"
        );
        self.left -= 1;
        self.inner.as_mut().poll(cx)
    }
}

/// What the session left for the checks on the stores.
#[derive(Debug, Default)]
struct Outcome {
    summary: Summary,
    /// The checker could not insist on every reply (see `Checker`).
    lenient: bool,
    diverged: bool,
    /// The export transmission used, with the model of its bytes.
    export: Option<(Arc<Export>, Vec<u8>)>,
    /// Requests that may have changed the store without an acknowledgement: the last one
    /// whose reply did not come, and, after a bad magic, those whose replies were dropped.
    uncertain: Vec<Uncertain>,
}

/// A request that may or may not have been applied, even partly.
#[derive(Debug)]
struct Uncertain {
    offset: u64,
    len: u64,
    /// The WRITE payload that arrived (possibly shorter than `len`); `None` for a zeroing.
    payload: Option<Vec<u8>>,
}

impl Uncertain {
    /// Whether `byte` at `at` is what this request may have left there.
    fn explains(&self, at: u64, byte: u8) -> bool {
        if at < self.offset || at - self.offset >= self.len {
            return false;
        }
        match &self.payload {
            None => byte == 0,
            Some(payload) => payload.get((at - self.offset) as usize) == Some(&byte),
        }
    }
}

/// The export's request and error counters match the replies the client read. Only when it
/// read every reply the server made: a graceful stop or a bad magic can end the stream with
/// replies counted but not followed.
fn check_metrics(text: &str, outcome: &Outcome) {
    let (Some(export), false) = (&outcome.summary.export, outcome.lenient || outcome.diverged)
    else {
        return;
    };
    let label = format!("export=\"{export}\"");
    let count = |family: &str| -> usize {
        text.lines()
            .filter(|line| line.starts_with(family) && line.contains(&label))
            .map(|line| line.rsplit(' ').next().unwrap().parse::<usize>().unwrap())
            .sum()
    };
    let replies = &outcome.summary.replies;
    let errors = replies.iter().filter(|&&e| e != 0).count();
    assert_eq!(
        count("ramnbd_requests_total{"),
        replies.len(),
        "requests counted"
    );
    assert_eq!(
        count("ramnbd_request_errors_total{"),
        errors,
        "errors counted"
    );
}

/// After the session: each store holds its model (or what an unacknowledged request may have
/// left), its extents cover it, and it is within its size and cap; an export the session did
/// not use holds nothing. Compares in pieces with `==` (one memcmp): a byte loop under the
/// fuzzer's instrumentation would cost more than the session.
fn check_stores(exports: &Exports, outcome: &Outcome) {
    let mut buf = vec![0u8; ZEROES.len()];
    for (export, &(name, size, _, cap)) in exports.iter().zip(&EXPORTS) {
        let disk = &export.disk;
        assert_eq!(disk.size(), size);
        let held = disk.allocated_bytes();
        assert!(
            held <= size.next_multiple_of(PAGE_SIZE),
            "{name}: {held} bytes held"
        );
        if let Some(cap) = cap {
            assert!(held <= cap, "{name}: {held} bytes held over a cap of {cap}");
        }
        let extents: Vec<_> = disk.extents(0, size).collect();
        let covered: u64 = extents.iter().map(|&(len, _)| len).sum();
        assert_eq!(covered, size, "{name}: extents cover {covered} bytes");
        let model = match &outcome.export {
            Some((used, model)) if used.name == export.name => model,
            _ => {
                assert_eq!(held, 0, "{name}: unused, yet {held} bytes held");
                assert_eq!(
                    extents,
                    [(size, Extent::Hole)],
                    "{name}: unused, yet not a hole"
                );
                continue;
            }
        };
        for at in (0..size).step_by(buf.len()) {
            let n = (size - at).min(buf.len() as u64) as usize;
            disk.read(at, &mut buf[..n]);
            let want = &model[at as usize..at as usize + n];
            if buf[..n] == *want {
                continue;
            }
            for (i, (&have, &want)) in buf[..n].iter().zip(want).enumerate() {
                let i = at + i as u64;
                assert!(
                    have == want || outcome.uncertain.iter().any(|u| u.explains(i, have)),
                    "{name}: byte {i} is {have}, the model says {want}"
                );
            }
        }
    }
}

static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

/// Whether `bytes` are all zero, in memcmp-sized pieces.
fn is_zero(bytes: &[u8]) -> bool {
    bytes
        .chunks(ZEROES.len())
        .all(|piece| *piece == ZEROES[..piece.len()])
}

/// The server's side of the stream, as the client reads it.
struct Output(ReadHalf<DuplexStream>);

impl Output {
    /// Fills `buf`. `false` if the stream ended before its first byte; an end inside it
    /// panics unless `truncation_ok`.
    async fn fill(&mut self, buf: &mut [u8], truncation_ok: bool) -> bool {
        let mut got = 0;
        while got < buf.len() {
            match self.0.read(&mut buf[got..]).await {
                Ok(0) | Err(_) => {
                    assert!(
                        got == 0 || truncation_ok,
                        "the server's output ended {got} bytes into a {}-byte message",
                        buf.len()
                    );
                    return false;
                }
                Ok(n) => got += n,
            }
        }
        true
    }

    /// Reads everything left.
    async fn drain(&mut self) -> u64 {
        let mut sink = vec![0u8; 64 * 1024];
        let mut total = 0;
        while let Ok(n @ 1..) = self.0.read(&mut sink).await {
            total += n as u64;
        }
        total
    }
}

/// How replies are framed on the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Simple,
    Structured,
    Extended,
}

/// What the option phase has agreed on so far.
#[derive(Debug, Default)]
struct Negotiation {
    structured: bool,
    extended: bool,
    /// The export and context id that SET_META_CONTEXT selected base:allocation for.
    meta: Option<(String, u32)>,
}

impl Negotiation {
    fn mode(&self) -> Mode {
        if self.extended {
            Mode::Extended
        } else if self.structured {
            Mode::Structured
        } else {
            Mode::Simple
        }
    }
}

/// Follows the client's input and checks the server's output against it.
struct Checker<'a> {
    out: Output,
    /// The client's whole stream.
    input: &'a [u8],
    /// How far into `input` the server has (logically) read.
    pos: usize,
    exports: &'a Exports,
    /// A graceful stop runs: the server may refuse anything with a shutdown error and end
    /// the connection at any message boundary.
    lenient: bool,
    /// A bad request magic lies ahead: the server drops the connection there, with whatever
    /// replies it had not yet sent, so from here on output may end anywhere.
    diverged: bool,
    /// Final replies of the options answered, in order.
    answered: Vec<u32>,
}

/// The stream ended where it may: nothing more to follow.
struct Ended;

impl Checker<'_> {
    async fn run(mut self) -> Outcome {
        let mut outcome = Outcome::default();
        // Every path ends where the connection must: the server then sends nothing more.
        // When the checker gave up following (a diverged stream) it reads what is left.
        let _ended = self.handshake(&mut outcome).await;
        let extra = self.out.drain().await;
        assert!(self.diverged || extra == 0, "{extra} bytes after the end");
        outcome.summary.options = self.answered;
        outcome.lenient = self.lenient;
        outcome.diverged = self.diverged;
        outcome
    }

    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let bytes = self.input.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(bytes)
    }

    /// Reads the first `n` bytes of a message; `Err(Ended)` if the stream ended first,
    /// which must be allowed (`may_end`, a graceful stop, a diverged stream) or the check
    /// fails with `what`.
    async fn start(&mut self, n: usize, may_end: bool, what: &str) -> Result<Vec<u8>, Ended> {
        let mut buf = vec![0u8; n];
        if self.out.fill(&mut buf, self.diverged).await {
            return Ok(buf);
        }
        assert!(
            may_end || self.lenient || self.diverged,
            "the server closed the connection instead of sending {what}"
        );
        Err(Ended)
    }

    /// Reads `n` more bytes of a message begun: it may end here only in a diverged stream.
    async fn inside(&mut self, buf: &mut [u8], what: &str) -> Result<(), Ended> {
        if self.out.fill(buf, self.diverged).await {
            return Ok(());
        }
        assert!(self.diverged, "the server's output ended inside {what}");
        Err(Ended)
    }

    async fn rest(&mut self, n: usize, what: &str) -> Result<Vec<u8>, Ended> {
        let mut buf = vec![0u8; n];
        self.inside(&mut buf, what).await?;
        Ok(buf)
    }

    async fn handshake(&mut self, outcome: &mut Outcome) -> Result<(), Ended> {
        let greeting = self.start(18, false, "the greeting").await?;
        let mut expected = NBDMAGIC.to_be_bytes().to_vec();
        expected.extend_from_slice(&IHAVEOPT.to_be_bytes());
        expected.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        assert_eq!(greeting, expected, "greeting");
        let Some(flags) = self.take(4) else {
            return Err(Ended); // the client flags never came
        };
        let flags = be32(flags);
        if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(Ended); // unknown client flags: the server must drop the connection
        }
        let fixed = flags & FLAG_C_FIXED_NEWSTYLE != 0;
        let no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
        let mut state = Negotiation::default();
        loop {
            let Some(header) = self.take(16) else {
                return Err(Ended);
            };
            let (magic, option, len) = (
                be64(&header[..8]),
                be32(&header[8..12]),
                be32(&header[12..]),
            );
            if magic != IHAVEOPT || (!fixed && option != OPT_EXPORT_NAME) {
                return Err(Ended);
            }
            if len > MAX_OPTION_DATA {
                if option == OPT_EXPORT_NAME {
                    return Err(Ended);
                }
                // Drained, then refused, whatever the phase.
                let complete = self.take(len as usize).is_some();
                if !complete {
                    self.pos = self.input.len();
                }
                let (reply, _) = self.option_reply(option, !complete).await?;
                assert_eq!(reply, REP_ERR_TOO_BIG, "an oversized option's reply");
                self.answered.push(reply);
                if !complete {
                    return Err(Ended);
                }
                continue;
            }
            let Some(data) = self.take(len as usize).map(<[u8]>::to_vec) else {
                return Err(Ended);
            };
            if option == OPT_EXPORT_NAME {
                let export = std::str::from_utf8(&data)
                    .ok()
                    .and_then(|name| self.exports.get(name))
                    .filter(|_| !state.extended)
                    .cloned();
                let size = self
                    .start(8, export.is_none(), "the EXPORT_NAME reply")
                    .await?;
                let export = export.expect("EXPORT_NAME answered for an unusable export");
                assert_eq!(be64(&size), export.size(), "EXPORT_NAME size");
                let tflags = self.rest(2, "the EXPORT_NAME reply").await?;
                check_transmission_flags(&export, u16::from_be_bytes([tflags[0], tflags[1]]));
                if !no_zeroes {
                    let zeroes = self.rest(124, "the EXPORT_NAME reply").await?;
                    assert!(is_zero(&zeroes), "padding is not zeroes");
                }
                return self.transmission(export, &state, outcome).await;
            }
            if let Some(export) = self.option(option, &data, &mut state).await? {
                return self.transmission(export, &state, outcome).await;
            }
        }
    }

    /// Reads one option reply, checking its header: (type, data).
    async fn option_reply(&mut self, option: u32, may_end: bool) -> Result<(u32, Vec<u8>), Ended> {
        let header = self.start(20, may_end, "an option reply").await?;
        assert_eq!(be64(&header[..8]), OPTION_REPLY_MAGIC, "option reply magic");
        assert_eq!(be32(&header[8..12]), option, "a reply for another option");
        let reply = be32(&header[12..16]);
        let len = be32(&header[16..20]);
        assert!(len <= MAX_OPTION_DATA, "a {len}-byte option reply");
        let data = self.rest(len as usize, "an option reply").await?;
        Ok((reply, data))
    }

    /// Reads the replies to one option up to the final one and applies what they agree.
    /// `Some(export)`: GO succeeded.
    async fn option(
        &mut self,
        option: u32,
        data: &[u8],
        state: &mut Negotiation,
    ) -> Result<Option<Arc<Export>>, Ended> {
        let info = wire::parse_info(data);
        let meta = wire::parse_meta_context(data);
        let mut info_export_sent = false;
        let mut selected = None;
        let final_reply = loop {
            let (reply, payload) = self.option_reply(option, false).await?;
            match reply {
                REP_ACK => break reply,
                REP_SERVER => {
                    assert_eq!(option, OPT_LIST, "REP_SERVER for another option");
                    assert!(payload.len() >= 4);
                    let name_len = be32(&payload[..4]) as usize;
                    let name = payload.get(4..4 + name_len).expect("a REP_SERVER name");
                    let name = std::str::from_utf8(name).expect("a UTF-8 export name");
                    assert!(self.exports.get(name).is_some(), "listed {name:?}");
                }
                REP_INFO => {
                    assert!(matches!(option, OPT_INFO | OPT_GO), "REP_INFO for {option}");
                    let (name, _) = info.as_ref().expect("INFO for a malformed request");
                    let export = self.exports.get(name).expect("INFO for an unknown export");
                    assert!(payload.len() >= 2, "an empty REP_INFO");
                    if u16::from_be_bytes([payload[0], payload[1]]) == INFO_EXPORT {
                        assert_eq!(payload.len(), 12, "NBD_INFO_EXPORT length");
                        assert_eq!(be64(&payload[2..10]), export.size(), "INFO size");
                        check_transmission_flags(export, be16(&payload[10..]));
                        info_export_sent = true;
                    }
                }
                REP_META_CONTEXT => {
                    assert!(
                        matches!(option, OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT),
                        "REP_META_CONTEXT for {option}"
                    );
                    let (name, _) = meta.as_ref().expect("a context for a malformed request");
                    assert!(payload.len() >= 4, "a short REP_META_CONTEXT");
                    assert!(self.exports.get(name).is_some(), "a context for {name:?}");
                    assert_eq!(&payload[4..], BASE_ALLOCATION.as_bytes(), "context name");
                    selected = Some((name.clone(), be32(&payload[..4])));
                }
                error if error & (1 << 31) != 0 => {
                    let known = [
                        REP_ERR_UNSUP,
                        REP_ERR_POLICY,
                        REP_ERR_INVALID,
                        REP_ERR_UNKNOWN,
                        REP_ERR_TOO_BIG,
                    ];
                    assert!(
                        known.contains(&error) || (self.lenient && error == REP_ERR_SHUTDOWN),
                        "option {option}: error reply {error:#x}"
                    );
                    break error;
                }
                other => panic!("option {option}: reply type {other}"),
            }
        };
        self.answered.push(final_reply);
        // SET_META_CONTEXT replaces earlier contexts even when it fails; refused for
        // shutdown it was never handled.
        if option == OPT_SET_META_CONTEXT && final_reply != REP_ERR_SHUTDOWN {
            state.meta = None;
        }
        if final_reply != REP_ACK {
            return Ok(None);
        }
        match option {
            OPT_ABORT => return Err(Ended),
            OPT_STRUCTURED_REPLY => state.structured = true,
            OPT_EXTENDED_HEADERS => state.extended = true,
            OPT_SET_META_CONTEXT => state.meta = selected,
            OPT_INFO | OPT_GO => {
                assert!(
                    info_export_sent,
                    "INFO/GO acknowledged without NBD_INFO_EXPORT"
                );
                if option == OPT_GO {
                    let (name, _) = info.expect("GO acknowledged for a malformed request");
                    return Ok(Some(Arc::clone(self.exports.get(&name).unwrap())));
                }
            }
            OPT_LIST | OPT_LIST_META_CONTEXT => {}
            _ => panic!("option {option} acknowledged"),
        }
        Ok(None)
    }

    async fn transmission(
        &mut self,
        export: Arc<Export>,
        state: &Negotiation,
        outcome: &mut Outcome,
    ) -> Result<(), Ended> {
        // The exports are new: all zeroes, and a zeroed allocation costs no page faults.
        let model = vec![0u8; export.size() as usize];
        let context = state
            .meta
            .as_ref()
            .filter(|(name, _)| *name == export.name)
            .map(|&(_, id)| id);
        let mut tx = Transmission {
            mode: state.mode(),
            export: Arc::clone(&export),
            context,
            model,
        };
        self.diverged = has_bad_magic(&self.input[self.pos..], state.extended);
        outcome.summary.export = Some(export.name.clone());
        let result = self.requests(&mut tx, outcome).await;
        outcome.export = Some((export, tx.model));
        result
    }

    async fn requests(
        &mut self,
        tx: &mut Transmission,
        outcome: &mut Outcome,
    ) -> Result<(), Ended> {
        loop {
            let wire::Header::Request(req) = wire::request(&self.input[self.pos..], tx.extended())
            else {
                return Err(Ended); // a bad magic, or a header cut short: no reply
            };
            if req.command == CMD_DISC {
                return Err(Ended);
            }
            self.pos += req.header_len;
            let available = (self.input.len() - self.pos) as u64;
            let complete = available >= req.payload_len;
            let payload = self
                .take(req.payload_len.min(available) as usize)
                .unwrap()
                .to_vec();
            let changes = match req.command {
                CMD_WRITE => Some(Some(payload.clone())),
                CMD_TRIM | CMD_WRITE_ZEROES => Some(None),
                _ => None,
            };
            let uncertain = changes.map(|payload| Uncertain {
                offset: req.offset,
                len: req.length,
                payload,
            });
            if !complete {
                outcome.uncertain.extend(uncertain);
                return Err(Ended); // the rest of the payload never comes: no reply
            }
            let result = match self.reply(tx, &req).await {
                Ok(result) => result,
                Err(Ended) => {
                    outcome.uncertain.extend(uncertain);
                    if self.diverged {
                        // Later requests may have run too, their replies dropped.
                        self.rest_uncertain(tx.extended(), outcome);
                    }
                    return Err(Ended);
                }
            };
            tx.check(&req, &payload, result, self.lenient);
            outcome.summary.replies.push(result);
        }
    }

    /// Marks every complete request left in the input as possibly applied.
    fn rest_uncertain(&mut self, extended: bool, outcome: &mut Outcome) {
        while let wire::Header::Request(req) = wire::request(&self.input[self.pos..], extended) {
            self.pos += req.header_len;
            let available = (self.input.len() - self.pos) as u64;
            let payload = self
                .take(req.payload_len.min(available) as usize)
                .unwrap()
                .to_vec();
            let payload = match req.command {
                CMD_WRITE => Some(payload),
                CMD_TRIM | CMD_WRITE_ZEROES => None,
                _ => continue,
            };
            outcome.uncertain.push(Uncertain {
                offset: req.offset,
                len: req.length,
                payload,
            });
        }
    }

    /// Reads the whole reply to `req`, checking READ data and block status against the model
    /// as they come: `Ok(errno)`, 0 for success.
    async fn reply(&mut self, tx: &Transmission, req: &wire::Req) -> Result<u32, Ended> {
        let what = format!("the reply to {req:?}");
        if tx.mode == Mode::Simple {
            let header = self.start(16, false, &what).await?;
            assert_eq!(be32(&header[..4]), SIMPLE_REPLY_MAGIC, "simple reply magic");
            assert_eq!(be64(&header[8..]), req.cookie, "cookie");
            let error = be32(&header[4..8]);
            if error == 0 && req.command == CMD_READ {
                tx.assert_in_range(req, "READ");
                self.data(tx, req.offset, req.length).await?;
            }
            return Ok(error);
        }
        let mut error = 0;
        let mut next = req.offset; // where the next READ data chunk must start
        let mut data_chunks = 0;
        let mut status_chunks = 0;
        loop {
            let (flags, kind, len) = self.chunk_header(tx.mode, req, &what).await?;
            assert_eq!(flags & !REPLY_FLAG_DONE, 0, "chunk flags {flags:#x}");
            match kind {
                REPLY_TYPE_NONE => {
                    assert_eq!(len, 0, "a NONE chunk with a payload");
                    assert_ne!(flags, 0, "a NONE chunk that is not the last");
                }
                REPLY_TYPE_OFFSET_DATA => {
                    assert_eq!(req.command, CMD_READ, "data for {req:?}");
                    assert!(
                        len > 8 && len - 8 <= u64::from(MAX_PAYLOAD),
                        "a {len}-byte data chunk"
                    );
                    let at = be64(&self.rest(8, &what).await?);
                    assert_eq!(at, next, "data chunk offset");
                    tx.assert_in_range(req, "READ");
                    assert!(
                        at + (len - 8) <= req.offset + req.length,
                        "data past the request"
                    );
                    self.data(tx, at, len - 8).await?;
                    next = at + (len - 8);
                    data_chunks += 1;
                }
                REPLY_TYPE_BLOCK_STATUS | REPLY_TYPE_BLOCK_STATUS_EXT => {
                    let expected = match tx.mode {
                        Mode::Extended => REPLY_TYPE_BLOCK_STATUS_EXT,
                        _ => REPLY_TYPE_BLOCK_STATUS,
                    };
                    assert_eq!(kind, expected, "block status chunk type");
                    assert!(len <= 1 << 20, "a {len}-byte block status chunk");
                    let payload = self.rest(len as usize, &what).await?;
                    tx.block_status(req, &payload);
                    status_chunks += 1;
                }
                REPLY_TYPE_ERROR => {
                    assert!((6..=6 + 4096).contains(&len), "a {len}-byte error chunk");
                    let payload = self.rest(len as usize, &what).await?;
                    error = be32(&payload[..4]);
                    assert_ne!(error, 0, "an error chunk with error 0");
                    assert_eq!(
                        6 + u64::from(be16(&payload[4..6])),
                        len,
                        "error message length"
                    );
                }
                other => panic!("chunk type {other} for {req:?}"),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        if error == 0 {
            if req.command == CMD_READ {
                assert_eq!(
                    next,
                    req.offset + req.length,
                    "READ data short of the request"
                );
                if req.flags & CMD_FLAG_DF != 0 {
                    assert!(data_chunks <= 1, "a DF read in {data_chunks} chunks");
                }
            }
            if req.command == CMD_BLOCK_STATUS {
                assert_eq!(status_chunks, 1, "block status chunks");
            }
        }
        Ok(error)
    }

    /// Reads a chunk header: (flags, type, payload length).
    async fn chunk_header(
        &mut self,
        mode: Mode,
        req: &wire::Req,
        what: &str,
    ) -> Result<(u16, u16, u64), Ended> {
        let (magic, header_len) = match mode {
            Mode::Extended => (EXTENDED_REPLY_MAGIC, 32),
            _ => (STRUCTURED_REPLY_MAGIC, 20),
        };
        let header = self.start(header_len, false, what).await?;
        assert_eq!(be32(&header[..4]), magic, "chunk magic");
        assert_eq!(be64(&header[8..16]), req.cookie, "chunk cookie");
        let len = if mode == Mode::Extended {
            assert_eq!(be64(&header[16..24]), req.offset, "extended chunk offset");
            be64(&header[24..32])
        } else {
            u64::from(be32(&header[16..20]))
        };
        Ok((be16(&header[4..6]), be16(&header[6..8]), len))
    }

    /// Reads `len` bytes of READ data for `offset` and compares them with the model.
    async fn data(&mut self, tx: &Transmission, offset: u64, len: u64) -> Result<(), Ended> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            self.inside(&mut buf[..n], "READ data").await?;
            let at = (offset + done) as usize;
            assert!(
                buf[..n] == tx.model[at..at + n],
                "READ data at {at}..{} differ from what was written",
                at + n
            );
            done += n as u64;
        }
        Ok(())
    }
}

/// The transmission phase's state: the negotiated framing and the model of the export.
struct Transmission {
    mode: Mode,
    export: Arc<Export>,
    context: Option<u32>,
    model: Vec<u8>,
}

impl Transmission {
    fn extended(&self) -> bool {
        self.mode == Mode::Extended
    }

    fn in_range(&self, req: &wire::Req) -> bool {
        req.offset
            .checked_add(req.length)
            .is_some_and(|end| end <= self.export.size())
    }

    fn assert_in_range(&self, req: &wire::Req, what: &str) {
        assert!(self.in_range(req), "{what} past the end succeeded: {req:?}");
    }

    /// Checks a request's outcome (`error`, 0 for success) and applies it to the model.
    fn check(&mut self, req: &wire::Req, payload: &[u8], error: u32, lenient: bool) {
        // The errno values the protocol defines (ESHUTDOWN only while stopping).
        let known = [1, 5, 22, 28, 75, 95];
        assert!(
            error == 0 || known.contains(&error) || (lenient && error == 108),
            "error {error} for {req:?}"
        );
        if error != 0 {
            assert!(
                lenient || !self.must_succeed(req),
                "a valid request failed with {error}: {req:?}"
            );
            return;
        }
        let writes = matches!(req.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        assert!(
            !(writes && self.export.read_only),
            "a change to a read-only export succeeded: {req:?}"
        );
        match req.command {
            CMD_FLUSH => {}
            CMD_READ | CMD_CACHE | CMD_BLOCK_STATUS => self.assert_in_range(req, "a request"),
            CMD_WRITE => {
                self.assert_in_range(req, "WRITE");
                let at = req.offset as usize;
                self.model[at..at + payload.len()].copy_from_slice(payload);
            }
            CMD_TRIM | CMD_WRITE_ZEROES => {
                self.assert_in_range(req, "a zeroing");
                let at = req.offset as usize;
                self.model[at..at + req.length as usize].fill(0);
            }
            _ => panic!("command {} succeeded: {req:?}", req.command),
        }
        if req.command == CMD_BLOCK_STATUS {
            assert!(
                self.context.is_some(),
                "BLOCK_STATUS without a context succeeded"
            );
        }
    }

    /// Requests no server may refuse: a supported command with no flags (or FUA), in range,
    /// on an export that allows it, with the payload its command takes.
    fn must_succeed(&self, req: &wire::Req) -> bool {
        let capped = EXPORTS
            .iter()
            .any(|e| e.0 == self.export.name && e.3.is_some());
        // No PAYLOAD_LEN either: so the payload is the command's own.
        let plain_flags = req.flags & !CMD_FLAG_FUA == 0;
        let allowed = match req.command {
            CMD_READ | CMD_FLUSH | CMD_CACHE => true,
            // A write may need room under a cap; a zeroing with plain flags gives room back.
            CMD_WRITE => !self.export.read_only && !capped,
            CMD_TRIM | CMD_WRITE_ZEROES => !self.export.read_only,
            CMD_BLOCK_STATUS => self.context.is_some() && req.length > 0,
            _ => false,
        };
        allowed && plain_flags && self.in_range(req)
    }

    /// Checks a block status payload against the model.
    fn block_status(&self, req: &wire::Req, payload: &[u8]) {
        assert_eq!(req.command, CMD_BLOCK_STATUS, "block status for {req:?}");
        let context = self.context.expect("block status without a context");
        self.assert_in_range(req, "BLOCK_STATUS");
        assert!(payload.len() >= 4);
        assert_eq!(be32(&payload[..4]), context, "block status context id");
        let descriptors: Vec<(u64, u64)> = if self.extended() {
            assert!(
                payload.len() >= 8 && (payload.len() - 8).is_multiple_of(16),
                "BLOCK_STATUS_EXT length"
            );
            let count = be32(&payload[4..8]) as usize;
            assert_eq!(count, (payload.len() - 8) / 16, "descriptor count");
            payload[8..]
                .chunks(16)
                .map(|d| (be64(&d[..8]), be64(&d[8..])))
                .collect()
        } else {
            assert_eq!((payload.len() - 4) % 8, 0, "BLOCK_STATUS length");
            payload[4..]
                .chunks(8)
                .map(|d| (u64::from(be32(&d[..4])), u64::from(be32(&d[4..]))))
                .collect()
        };
        assert!(!descriptors.is_empty(), "no descriptors");
        if req.flags & CMD_FLAG_REQ_ONE != 0 {
            assert_eq!(descriptors.len(), 1, "REQ_ONE with several descriptors");
        }
        let mut at = req.offset;
        for (len, flags) in descriptors {
            assert!(len > 0, "a zero-length extent");
            assert_eq!(
                flags & !u64::from(STATE_HOLE | STATE_ZERO),
                0,
                "extent flags {flags:#x}"
            );
            let end = at.checked_add(len).expect("extents overflow");
            assert!(end <= req.offset + req.length, "extents past the request");
            if flags & u64::from(STATE_ZERO) != 0 {
                let range = &self.model[at as usize..end as usize];
                assert!(is_zero(range), "a zero extent at {at} holds data");
            }
            at = end;
        }
    }
}

/// Whether the request stream `input` reaches a bad magic before it ends or disconnects.
fn has_bad_magic(input: &[u8], extended: bool) -> bool {
    let mut pos = 0u64;
    loop {
        let Some(rest) = input.get(pos as usize..) else {
            return false;
        };
        match wire::request(rest, extended) {
            wire::Header::Short => return false,
            wire::Header::BadMagic => return true,
            wire::Header::Request(req) if req.command == CMD_DISC => return false,
            wire::Header::Request(req) => {
                pos = match (req.header_len as u64).checked_add(req.payload_len) {
                    Some(len) => pos.saturating_add(len),
                    None => return false,
                };
            }
        }
    }
}

/// The transmission flags an export must advertise: HAS_FLAGS, and READ_ONLY as configured.
fn check_transmission_flags(export: &Export, flags: u16) {
    assert_ne!(
        flags & TFLAG_HAS_FLAGS,
        0,
        "transmission flags without HAS_FLAGS"
    );
    assert_eq!(
        flags & TFLAG_READ_ONLY != 0,
        export.read_only,
        "READ_ONLY flag"
    );
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}
