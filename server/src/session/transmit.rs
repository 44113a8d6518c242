//! The transmission phase: one task per connection that both receives and sends.
//!
//! A request's life, in one place each:
//! 1. **Decode** ([`decode_request`]) the header at the front of the receive buffer.
//! 2. **Check** it ([`Command::parse`]): flags, payload, permission and range, once.
//! 3. **Execute** it: most requests at once (a write is a memcpy, a flush nothing); a WRITE
//!    larger than [`WHOLE_PAYLOAD`] is applied to the store piece by piece as its payload
//!    arrives, and a TRIM or WRITE_ZEROES runs in bounded steps with a yield between them, so
//!    that neither a 4 GiB write nor a 1 TiB zeroing holds the connection's buffers or a
//!    runtime thread ([`Ongoing`]).
//! 4. **Complete** it at one point, [`Connection::complete`]: the reply is encoded into the
//!    send buffer (READ data copied from the store in pieces as room allows), and metered.
//!
//! The task then waits for whichever comes first: more requests, room to send replies, or a
//! change of shutdown phase. So requests are pipelined (the client may have any number in
//! flight; replies for a batch go out in one `write`), there is no queue or second task to wake
//! per request, and the memory a connection holds is fixed: a receive buffer of about 1 MiB
//! and a send buffer of 512 KiB, whatever the requests' lengths (reading stops while replies
//! wait, which pushes back on the client through TCP). Replies go out in request order, which
//! the protocol allows.
//!
//! A hand-over ([`crate::shutdown::Shutdown::hand_over`]) stops the loop at a request
//! boundary: no new request is started (a WRITE whose payload is streaming is received to its
//! end first), every request started completes and has its reply sent, and the stream is
//! returned with a [`Suspended`] state holding the bytes already read but not yet executed.
//! [`transmit`] given that state's pending bytes carries on exactly where it stopped.
//!
//! Metrics count each request when the last byte of its reply has been written. Latency runs
//! from the read that brought the request in. With metrics off nothing is recorded and no
//! clock is read.

use std::collections::VecDeque;
use std::io;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::buffers::{ReceiveBuffer, SendBuffer};
use super::command::{Command, Failure, MAX_DATA_CHUNK};
use super::socket::{Receive, Reply};
use super::{HandedOver, Negotiated, Suspended};
use crate::metrics::ExportMetrics;
use crate::proto::Errno;
use crate::proto::consts::*;
use crate::proto::transmission::{Decoded, EXTENDED_HEADER_LEN, ReplyMode, decode_request};
use crate::ramdisk::{Extent, NoSpace, RamDisk, Update, ZeroMode};
use crate::shutdown::{DRAIN_IDLE, LINGER, Phase, PhaseWatch};

/// A WRITE with a payload up to this size is received whole, then applied at once; a longer
/// one streams into the store as it arrives.
pub const WHOLE_PAYLOAD: usize = 1 << 20;
/// Over a plain socket, a WRITE payload from this size on whose bytes have not all arrived
/// yet is received straight into the store as it arrives ([`Receive::receive_into`]), one copy
/// per byte instead of two (socket → receive buffer → store). Smaller ones come in batches
/// of many requests per `read`, which costs fewer system calls than one `recv` each.
const DIRECT_PAYLOAD: usize = 64 * 1024;
/// Over a plain socket, READ data from this size on go straight from the store to the socket
/// ([`Reply::send_from`]) once the replies before them are written, instead of through the
/// send buffer; smaller reads are batched there, many replies per `write`.
const DIRECT_DATA: u64 = 64 * 1024;
/// The receive buffer holds one whole-payload request and its header.
pub(super) const RECEIVE_CAPACITY: usize = WHOLE_PAYLOAD + 4096;
/// Replies are encoded until this many bytes wait to be sent.
const SEND_BATCH: usize = 256 * 1024;
/// The send buffer has room for a batch plus one more piece of reply.
const SEND_CAPACITY: usize = 2 * SEND_BATCH;
/// The memory one connection can hold for requests in flight, whatever its clients send: its
/// receive and send buffers, fixed mappings of which only the pages used become resident.
/// All connections together hold at most `max-connections` times this.
pub const CONNECTION_BUFFER_BYTES: usize =
    RECEIVE_CAPACITY + SEND_CAPACITY + super::buffers::ALIASING_PAD;
/// Most descriptors in one block status reply, so that it fits the room a batch leaves. The
/// spec lets a reply cover less than the range asked for; clients ask again for the rest.
const MAX_EXTENTS_PER_REPLY: usize = (SEND_BATCH - 64) / 16;

/// What one connection did, for its closing log line.
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: u64,
}

/// What a reply needs to know about its request.
#[derive(Debug, Clone, Copy)]
struct Head {
    cookie: u64,
    offset: u64,
    command: u16,
    length: u64,
    /// When the bytes that brought it in were read (kept only with metrics on).
    arrived: Option<Instant>,
}

/// How a request ends.
#[derive(Debug)]
enum Outcome {
    Done,
    Failed(Failure),
    /// READ data to send.
    Data {
        offset: u64,
        len: u64,
    },
    /// A block status reply for the range.
    Extents {
        offset: u64,
        len: u64,
        one: bool,
        context: u32,
    },
}

/// A request that takes more than one turn of the loop.
#[derive(Debug)]
enum Ongoing<'a> {
    /// A WRITE whose payload is still arriving; it is applied as it comes.
    Receiving { head: Head, update: Update<'a> },
    /// A WRITE of up to [`WHOLE_PAYLOAD`] that was to stream, but whose reservation (every
    /// page of its range not held yet) did not fit the memory cap: its payload is gathered
    /// whole so that the cap counts only the pages it really fills, as for any whole write.
    Gathering { head: Head, offset: u64, len: u64 },
    /// The payload of a refused request, read and dropped before its error reply.
    Skipping {
        head: Head,
        left: u64,
        failure: Failure,
    },
    /// A TRIM or WRITE_ZEROES, applied in bounded steps.
    Zeroing { head: Head, update: Update<'a> },
    /// READ data still to be copied into the send buffer; `chunk_end` ends the current data
    /// chunk of a structured reply.
    Sending {
        head: Head,
        next: u64,
        end: u64,
        chunk_end: u64,
    },
}

/// Why [`Connection::produce`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Produced {
    /// The send buffer is full: send before producing more.
    SendBufferFull,
    /// A request (or its payload) is incomplete: receive more.
    NeedInput,
    /// A long request did one step: let other tasks run, then go on.
    Yield,
    /// The client sent DISC: no more requests will be read.
    Disconnect,
    /// Handing over: every request started has completed, and no new one is started.
    Boundary,
    /// READ data to send straight from the store: the send buffer is empty.
    SendDirect { offset: u64, len: u64 },
}

/// What metrics need to know about a request until its reply has been written.
#[derive(Debug, Clone, Copy)]
struct Meter {
    command: u16,
    length: u64,
    failed: bool,
    arrived: Instant,
    /// Where its reply ends in the connection's output.
    reply_end: u64,
}

/// Per-connection transmission state.
struct Connection<'a> {
    negotiated: &'a Negotiated,
    mode: ReplyMode,
    /// The stream is a plain socket: large WRITE payloads go straight to the store.
    direct: bool,
    /// The stream written to is a plain socket: large READ data go straight from the store.
    direct_send: bool,
    input: ReceiveBuffer,
    output: SendBuffer,
    ongoing: Option<Ongoing<'a>>,
    /// The client sent DISC, or the stream fell out of sync.
    disconnected: bool,
    /// The bad request magic that ended the connection.
    out_of_sync: Option<u32>,
    /// Shutdown has begun: new requests get ESHUTDOWN.
    draining: bool,
    /// A hand-over has begun: no new request is started.
    suspending: bool,
    /// A write failed on the memory cap already: warned once per connection, then debug.
    warned_full: bool,
    stats: Stats,
    /// Metrics for this connection's export; `None` when metrics are off.
    metrics: Option<&'a ExportMetrics>,
    /// When the latest bytes were received (kept only with metrics on).
    received_at: Option<Instant>,
    /// Requests whose replies are encoded but not yet completely written.
    unsent_meters: VecDeque<Meter>,
}

/// What goes out next.
enum Output<'b> {
    /// Some of these encoded replies.
    Buffered(&'b [u8]),
    /// READ data straight from the store: `len` bytes at `offset`.
    Direct(&'b RamDisk, u64, u64),
    /// Nothing: flush what a TLS layer holds back.
    Flush,
}

/// Writes some of `output`; returns how many bytes went.
async fn send<W: Reply>(writer: &mut W, output: Output<'_>) -> io::Result<usize> {
    match output {
        Output::Buffered(unsent) => writer.write(unsent).await,
        Output::Direct(disk, offset, len) => writer.send_from(disk, offset, len).await,
        Output::Flush => writer.flush().await.map(|()| 0),
    }
}

/// Runs the transmission phase until the client leaves, the stream breaks, shutdown closes it
/// or a hand-over suspends it: then the stream and its state come back. `pending`: bytes
/// received before this call (a resumed session's), executed before anything is read.
pub async fn transmit<R, W>(
    mut reader: R,
    mut writer: W,
    negotiated: Negotiated,
    pending: &[u8],
    mut watch: PhaseWatch,
    metrics: Option<std::sync::Arc<ExportMetrics>>,
) -> io::Result<(Stats, Option<HandedOver<R, W>>)>
where
    R: Receive,
    W: Reply,
{
    if pending.len() > RECEIVE_CAPACITY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "more pending input than a receive buffer holds",
        ));
    }
    let mut conn = Connection {
        mode: negotiated.reply_mode(),
        direct: reader.is_socket(),
        direct_send: writer.is_socket(),
        negotiated: &negotiated,
        input: ReceiveBuffer::new(RECEIVE_CAPACITY)?,
        output: SendBuffer::new(SEND_CAPACITY)?,
        ongoing: None,
        disconnected: false,
        out_of_sync: None,
        draining: false,
        warned_full: false,
        suspending: false,
        stats: Stats::default(),
        metrics: metrics.as_deref(),
        received_at: None,
        unsent_meters: VecDeque::with_capacity(if metrics.is_some() { 256 } else { 0 }),
    };
    conn.input.spare()[..pending.len()].copy_from_slice(pending);
    conn.input.filled_by(pending.len());
    if conn.metrics.is_some() && !pending.is_empty() {
        conn.received_at = Some(Instant::now());
    }
    let mut end_of_input = false;
    // Over TLS a write may leave records in the TLS layer when the socket is full, reported as
    // written; they are flushed before the loop waits on anything else. Plain sockets hold
    // nothing back, so this stays false for them.
    let flush_writes = negotiated.secured;
    let mut unflushed = false;
    loop {
        // The phase is read at every turn (one atomic load), not only when `changed` wakes
        // the loop: the select below prefers I/O, so a client that never pauses would
        // otherwise keep its requests executing after the signal.
        match watch.refresh() {
            Phase::Running => {}
            Phase::Stopping if watch.handing_over() => conn.suspending = true,
            Phase::Stopping => conn.draining = true,
            Phase::Closing | Phase::Aborting => {
                // Too late to hand over: close as any stop does.
                conn.suspending = false;
                conn.draining = true;
                if !end_of_input {
                    // Stop reading: what needs more input is dropped unanswered.
                    end_of_input = true;
                    conn.abandon_input();
                }
            }
        }
        let produced = conn.produce();
        let unsent = conn.output.has_unsent();
        if produced == Produced::Boundary && !unsent {
            // Every request started has its reply on the wire, and the stream stays open for
            // the process that carries it on.
            writer.flush().await?;
            let state = Suspended::new(&negotiated, conn.input.filled());
            tracing::debug!(pending = state.pending.len(), "suspended for a hand-over");
            let stats = conn.stats;
            let handed_over = HandedOver {
                reader,
                writer,
                state,
            };
            return Ok((stats, Some(handed_over)));
        }
        let finished =
            produced == Produced::Disconnect || (end_of_input && produced == Produced::NeedInput);
        if finished && !unsent {
            // Every request received has its complete reply on the wire: DISC and EOF both
            // end here, never with replies still queued.
            writer.shutdown().await?;
            if conn.draining {
                // Stopped by shutdown, so the client may still be sending. Closing a socket
                // with unread input resets the connection, which can destroy replies still in
                // flight: read and discard until the client closes too (or LINGER passes).
                let mut sink = [0u8; 16 * 1024];
                let _ = tokio::time::timeout(LINGER, async {
                    while matches!(reader.read(&mut sink).await, Ok(n) if n > 0) {}
                })
                .await;
            }
            if let Some(magic) = conn.out_of_sync {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad request magic {magic:#x}: stream out of sync"),
                ));
            }
            return Ok((conn.stats, None));
        }
        let receive = produced == Produced::NeedInput && !end_of_input && conn.input.has_spare();
        let idle = receive && conn.draining && !unsent && conn.ongoing.is_none();
        let step = produced == Produced::Yield;
        let send_direct = matches!(produced, Produced::SendDirect { .. });
        let output = match produced {
            _ if unsent => Output::Buffered(conn.output.unsent()),
            Produced::SendDirect { offset, len } => {
                Output::Direct(&negotiated.export.disk, offset, len)
            }
            _ => Output::Flush,
        };
        // A streaming WRITE with nothing buffered takes its payload straight from the socket.
        let straight = match &mut conn.ongoing {
            Some(Ongoing::Receiving { update, .. }) if conn.direct && receive => Some(update),
            _ => None,
        };
        tokio::select! {
            // Receive first: replies for everything already pipelined then go out in one write.
            biased;
            input = next_input(&mut reader, conn.input.spare(), straight), if receive => {
                match input? {
                    Input::Buffered(0) | Input::Stored(0) => end_of_input = true,
                    got => {
                        if let Input::Buffered(n) = got {
                            conn.input.filled_by(n);
                        }
                        if conn.metrics.is_some() {
                            conn.received_at = Some(Instant::now());
                        }
                    }
                }
            }
            written = send(&mut writer, output), if unsent || unflushed || send_direct => {
                let written = written?;
                if unsent {
                    conn.sent(written);
                    unflushed = flush_writes;
                } else if send_direct {
                    conn.sent_direct(written);
                } else {
                    unflushed = false;
                }
            }
            // The loop's top applies the new phase.
            () = watch.changed() => {}
            // In an async block so the timer (and its clock read) is only made when this
            // branch is enabled: select! builds every branch's future on every turn.
            () = async { tokio::time::sleep(DRAIN_IDLE).await }, if idle => {
                tracing::debug!("shutdown: client idle, closing");
                end_of_input = true;
            }
            () = tokio::task::yield_now(), if step => {}
        }
    }
}

/// What one receive brought.
enum Input {
    /// Bytes read into the receive buffer.
    Buffered(usize),
    /// Payload bytes received straight into the store by a streaming WRITE's update.
    Stored(usize),
}

/// Reads the next input: into the receive buffer, or, for a streaming WRITE over a socket
/// (`straight`), into the store.
async fn next_input<R: Receive>(
    reader: &mut R,
    spare: &mut [u8],
    straight: Option<&mut Update<'_>>,
) -> io::Result<Input> {
    match straight {
        Some(update) => reader.receive_into(update).await.map(Input::Stored),
        None => reader.read(spare).await.map(Input::Buffered),
    }
}

impl<'a> Connection<'a> {
    /// Turns received requests into replies until the send buffer is full, more input is
    /// needed, a long request yields, or the client disconnects (or its stream falls out of
    /// sync).
    fn produce(&mut self) -> Produced {
        loop {
            if self.output.encoded() >= SEND_BATCH {
                return Produced::SendBufferFull;
            }
            if let Some(ongoing) = self.ongoing.take() {
                if let Some(wait) = self.advance(ongoing) {
                    return wait;
                }
                continue;
            }
            if self.disconnected {
                return Produced::Disconnect;
            }
            if self.suspending {
                return Produced::Boundary;
            }
            if let Some(wait) = self.next_request() {
                return wait;
            }
        }
    }

    /// Decodes and starts the request at the front of the receive buffer.
    fn next_request(&mut self) -> Option<Produced> {
        let (request, header_len) = match decode_request(self.input.filled(), self.extended()) {
            Decoded::Request {
                request,
                header_len,
            } => (request, header_len),
            Decoded::Incomplete => return Some(Produced::NeedInput),
            Decoded::BadMagic(magic) => {
                // The stream is out of sync and nothing more can be read from it; the replies
                // to the requests before are still sent, then the connection ends.
                self.out_of_sync = Some(magic);
                self.disconnected = true;
                return Some(Produced::Disconnect);
            }
        };
        // A payload up to WHOLE_PAYLOAD is waited for whole, header included, so the request
        // is checked and applied in one go; over a socket, one from DIRECT_PAYLOAD on streams
        // into the store unless it is all here already.
        // (`payload_len` is the client's u64: the header's length is added only to one known
        // to be small, so no value can overflow.)
        let small = request.payload_len <= WHOLE_PAYLOAD as u64;
        let small_payload = if small {
            request.payload_len as usize
        } else {
            0
        };
        let total = header_len + small_payload;
        let whole = small
            && (request.payload_len < DIRECT_PAYLOAD as u64
                || !self.direct
                || self.input.len() >= total);
        if whole && self.input.len() < total {
            self.input.make_room_for(total);
            return Some(Produced::NeedInput);
        }
        self.input.consume(header_len);
        self.stats.requests += 1;
        let head = Head {
            cookie: request.cookie,
            offset: request.offset,
            command: request.command,
            length: request.length,
            arrived: self.received_at,
        };
        if request.command == CMD_DISC {
            tracing::debug!("client disconnect (DISC)");
            self.disconnected = true;
            return Some(Produced::Disconnect);
        }
        let command = if self.draining {
            Err(Failure(Errno::Shutdown, "server is shutting down"))
        } else {
            Command::parse(&request, self.negotiated)
        };
        match command {
            Ok(command) => self.start(head, command, whole),
            Err(failure) if whole => {
                self.input.consume(request.payload_len as usize);
                self.complete(head, Outcome::Failed(failure));
            }
            Err(failure) => {
                self.ongoing = Some(Ongoing::Skipping {
                    head,
                    left: request.payload_len,
                    failure,
                });
            }
        }
        None
    }

    /// Executes a checked request: at once, or by setting up its [`Ongoing`] work.
    fn start(&mut self, head: Head, command: Command, whole: bool) {
        let disk = &self.negotiated_ref().export.disk;
        let outcome = match command {
            Command::Read { offset, len } => Outcome::Data { offset, len },
            Command::Write { offset, len } if whole => {
                let written = disk.write(offset, &self.input.filled()[..len as usize]);
                self.input.consume(len as usize);
                match written {
                    Ok(()) => Outcome::Done,
                    Err(NoSpace) => Outcome::Failed(over_cap()),
                }
            }
            Command::Write { offset, len } => {
                self.ongoing = Some(match disk.start_write(offset, len) {
                    Ok(update) => Ongoing::Receiving { head, update },
                    Err(NoSpace) if len <= WHOLE_PAYLOAD as u64 => {
                        Ongoing::Gathering { head, offset, len }
                    }
                    // Refused before anything changed: skip the payload to stay in sync.
                    Err(NoSpace) => Ongoing::Skipping {
                        head,
                        left: len,
                        failure: over_cap(),
                    },
                });
                return;
            }
            Command::Trim { offset, len } => {
                return self.start_zero(head, offset, len, ZeroMode::Release);
            }
            Command::WriteZeroes { offset, len, mode } => {
                return self.start_zero(head, offset, len, mode);
            }
            Command::Flush | Command::Cache | Command::Disconnect => Outcome::Done,
            Command::BlockStatus {
                offset,
                len,
                one,
                context,
            } => Outcome::Extents {
                offset,
                len,
                one,
                context,
            },
        };
        self.complete(head, outcome);
    }

    /// Starts a TRIM or WRITE_ZEROES, to be done in steps.
    fn start_zero(&mut self, head: Head, offset: u64, len: u64, mode: ZeroMode) {
        let disk = &self.negotiated_ref().export.disk;
        match disk.start_zero(offset, len, mode) {
            Ok(update) => self.ongoing = Some(Ongoing::Zeroing { head, update }),
            Err(NoSpace) => self.complete(head, Outcome::Failed(over_cap())),
        }
    }

    /// Takes a long request one step further. `Some(wait)`: it is not done and waits for
    /// that; `None`: it completed (or made progress and the loop can go on).
    fn advance(&mut self, ongoing: Ongoing<'a>) -> Option<Produced> {
        match ongoing {
            Ongoing::Receiving { head, mut update } => {
                let n = update.remaining().min(self.input.len() as u64) as usize;
                update.write(&self.input.filled()[..n]);
                self.input.consume(n);
                if update.remaining() > 0 {
                    self.ongoing = Some(Ongoing::Receiving { head, update });
                    return Some(Produced::NeedInput);
                }
                drop(update);
                self.complete(head, Outcome::Done);
            }
            Ongoing::Gathering { head, offset, len } => {
                let len_usize = len as usize;
                if self.input.len() < len_usize {
                    self.input.make_room_for(len_usize);
                    self.ongoing = Some(Ongoing::Gathering { head, offset, len });
                    return Some(Produced::NeedInput);
                }
                let disk = &self.negotiated_ref().export.disk;
                let written = disk.write(offset, &self.input.filled()[..len_usize]);
                self.input.consume(len_usize);
                let outcome = match written {
                    Ok(()) => Outcome::Done,
                    Err(NoSpace) => Outcome::Failed(over_cap()),
                };
                self.complete(head, outcome);
            }
            Ongoing::Skipping {
                head,
                mut left,
                failure,
            } => {
                let n = left.min(self.input.len() as u64);
                self.input.consume(n as usize);
                left -= n;
                if left > 0 {
                    self.ongoing = Some(Ongoing::Skipping {
                        head,
                        left,
                        failure,
                    });
                    return Some(Produced::NeedInput);
                }
                self.complete(head, Outcome::Failed(failure));
            }
            Ongoing::Zeroing { head, mut update } => {
                if !update.zero_step() {
                    self.ongoing = Some(Ongoing::Zeroing { head, update });
                    return Some(Produced::Yield);
                }
                drop(update);
                self.complete(head, Outcome::Done);
            }
            Ongoing::Sending {
                head,
                mut next,
                end,
                mut chunk_end,
            } => {
                if next == end {
                    // Only a zero-length read with simple replies gets here: header only.
                    self.meter(head, false);
                    return None;
                }
                if next == chunk_end {
                    // Structured replies: the next data chunk starts here (a simple reply's
                    // one header covers everything, so its `chunk_end` is the end).
                    let len = (end - next).min(MAX_DATA_CHUNK);
                    chunk_end = next + len;
                    let last = chunk_end == end;
                    self.mode.read_data(
                        &mut self.output,
                        head.cookie,
                        head.offset,
                        next,
                        len,
                        last,
                    );
                }
                if self.direct_send && chunk_end - next >= DIRECT_DATA {
                    // The data go straight from the store once everything before them (this
                    // reply's header among it) has been written.
                    let wait = if self.output.has_unsent() {
                        Produced::SendBufferFull
                    } else {
                        Produced::SendDirect {
                            offset: next,
                            len: chunk_end - next,
                        }
                    };
                    self.ongoing = Some(Ongoing::Sending {
                        head,
                        next,
                        end,
                        chunk_end,
                    });
                    return Some(wait);
                }
                // Up to a batch's worth: smaller copies stay in cache for the socket write.
                let batch_left = SEND_BATCH.saturating_sub(self.output.encoded()).max(4096);
                let n = (chunk_end - next).min(batch_left as u64) as usize;
                let disk = &self.negotiated_ref().export.disk;
                disk.read(next, self.output.spare(n));
                self.output.commit(n);
                next += n as u64;
                self.read_data_through(head, next, end, chunk_end);
            }
        }
        None
    }

    /// The completion point: encodes the reply to a finished request and meters it (a READ's
    /// data follows through [`Ongoing::Sending`], which meters it when the last byte is in).
    fn complete(&mut self, head: Head, outcome: Outcome) {
        let Head { cookie, offset, .. } = head;
        let mode = self.mode;
        let out = &mut self.output;
        match outcome {
            Outcome::Done => {
                mode.done(out, cookie, offset);
                self.meter(head, false);
            }
            Outcome::Failed(Failure(errno, message)) => {
                let command = crate::metrics::command_name(head.command);
                if errno == Errno::NoSpc && !self.warned_full {
                    // The operator's signal that the cap is too small or a client fills the
                    // disk; once per connection, so a filling client cannot flood the log.
                    self.warned_full = true;
                    tracing::warn!(
                        command,
                        %errno,
                        offset,
                        "{message} (further such failures on this connection at debug level)"
                    );
                } else {
                    tracing::debug!(command, %errno, message, offset, "request failed");
                }
                mode.error(out, cookie, offset, errno, message);
                self.meter(head, true);
            }
            Outcome::Data { offset: at, len } => {
                if len == 0 && mode != ReplyMode::Simple {
                    // A zero-length read needs no data chunk.
                    mode.done(out, cookie, offset);
                    self.meter(head, false);
                    return;
                }
                // Simple replies: one header, then all the data. Structured: the first data
                // chunk's header is written by the first `Sending` step.
                let chunk_end = if mode == ReplyMode::Simple {
                    mode.read_data(out, cookie, offset, at, len, true);
                    at + len
                } else {
                    at
                };
                self.ongoing = Some(Ongoing::Sending {
                    head,
                    next: at,
                    end: at + len,
                    chunk_end,
                });
            }
            Outcome::Extents {
                offset: at,
                len,
                one,
                context,
            } => {
                let limit = if one { 1 } else { MAX_EXTENTS_PER_REPLY };
                // The header goes first but says how many descriptors follow: leave room for
                // it and write it once they are counted.
                let header_at = out.encoded();
                out.commit(mode.block_status_header_len());
                let mut count = 0;
                let disk = &self.negotiated.export.disk;
                for (length, extent) in disk.extents(at, len).take(limit) {
                    let flags = match extent {
                        Extent::Hole => STATE_HOLE | STATE_ZERO,
                        Extent::Data => 0,
                    };
                    mode.block_status_descriptor(out, length, flags);
                    count += 1;
                }
                let header = mode.block_status_header(cookie, offset, context, count);
                out.patch(header_at, header.as_slice());
                self.meter(head, false);
            }
        }
    }

    /// Shutdown's closing phase: nothing more will be read, so a request still waiting for
    /// its payload is dropped unanswered (its write partly applied, as a power cut would
    /// leave it).
    fn abandon_input(&mut self) {
        if matches!(
            self.ongoing,
            Some(Ongoing::Receiving { .. } | Ongoing::Gathering { .. } | Ongoing::Skipping { .. })
        ) {
            tracing::debug!("shutdown: dropping a request whose payload is still arriving");
            self.ongoing = None;
        }
    }

    /// Notes, for metrics, a request whose reply is now completely encoded.
    fn meter(&mut self, head: Head, failed: bool) {
        if self.metrics.is_none() {
            return;
        }
        self.unsent_meters.push_back(Meter {
            command: head.command,
            length: head.length,
            failed,
            arrived: head.arrived.unwrap_or_else(Instant::now),
            reply_end: self.output.stream_position(),
        });
    }

    /// Accounts for `sent` bytes of READ data sent straight from the store
    /// ([`Produced::SendDirect`]).
    fn sent_direct(&mut self, sent: usize) {
        let Some(Ongoing::Sending {
            head,
            next,
            end,
            chunk_end,
        }) = self.ongoing.take()
        else {
            unreachable!("data sent straight from the store with no READ being sent");
        };
        let next = next + sent as u64;
        assert!(next <= chunk_end, "sent past the data chunk");
        self.output.sent_elsewhere(sent);
        self.read_data_through(head, next, end, chunk_end);
        self.record_sent();
    }

    /// A READ's data are on their way up to `next` (encoded, or sent straight from the
    /// store): the READ is metered if that was its last byte, and goes on sending otherwise.
    fn read_data_through(&mut self, head: Head, next: u64, end: u64, chunk_end: u64) {
        if next == end {
            self.meter(head, false);
        } else {
            self.ongoing = Some(Ongoing::Sending {
                head,
                next,
                end,
                chunk_end,
            });
        }
    }

    /// Accounts for `written` bytes of replies having been written. A request whose reply is
    /// now completely written is counted for metrics.
    fn sent(&mut self, written: usize) {
        self.output.written(written);
        self.record_sent();
    }

    /// Counts, for metrics, the requests whose replies are now completely written.
    fn record_sent(&mut self) {
        if let Some(metrics) = self.metrics {
            let sent_through = self.output.sent_total();
            let mut now = None;
            while let Some(meter) = self.unsent_meters.front() {
                if meter.reply_end > sent_through {
                    break;
                }
                let now = *now.get_or_insert_with(Instant::now);
                metrics.record(
                    meter.command,
                    meter.length,
                    meter.failed,
                    now.saturating_duration_since(meter.arrived),
                );
                self.unsent_meters.pop_front();
            }
        }
    }

    fn extended(&self) -> bool {
        self.negotiated.extended
    }

    /// The negotiated state, borrowed for as long as the connection lives (not just `self`),
    /// so that store updates started from it can be kept in [`Ongoing`].
    fn negotiated_ref(&self) -> &'a Negotiated {
        self.negotiated
    }
}

/// The memory cap is full: ENOSPC, which the spec names for "no space" conditions.
fn over_cap() -> Failure {
    Failure(
        Errno::NoSpc,
        "memory cap reached: trim or zero data to make room",
    )
}

// A whole-payload request and its header always fit the receive buffer.
const _: () = assert!(RECEIVE_CAPACITY >= WHOLE_PAYLOAD + EXTENDED_HEADER_LEN);
