//! The transmission phase: one task per connection that both receives and sends.
//!
//! Requests are parsed out of one reusable receive buffer, validated and executed on the spot
//! (a write, trim or zero is a memcpy or a madvise: nothing to gain by deferring it), and their
//! replies are encoded into one reusable send buffer, READ data copied straight from the store.
//! The task then waits for whichever comes first: more requests, or room to send replies. So
//! requests are pipelined (the client may have any number in flight; replies for a batch go out
//! in one `write`), there is no queue or second task to wake per request, and the memory a
//! connection holds is bounded: a receive buffer of at most one maximum request, and a send
//! buffer that stops growing at [`SEND_BATCH`] (reading stops too until it drains, which pushes
//! back on the client through TCP). Replies go out in request order, which the protocol allows.
//!
//! Metrics count each request at one completion point, [`Connection::sent`]: when the last byte
//! of its reply has been written. Latency runs from the read that brought the request in. With
//! metrics off nothing is recorded and no clock is read.

use std::collections::VecDeque;
use std::io;
use std::time::Instant;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::Negotiated;
use crate::export::Export;
use crate::metrics::ExportMetrics;
use crate::proto::Errno;
use crate::proto::consts::*;
use crate::proto::transmission::{Decoded, ReplyMode, Request, decode_request};
use crate::ramdisk::{Extent, NoSpace};
use crate::shutdown::{DRAIN_IDLE, LINGER, Phase, Shutdown};

/// Receive buffer size for ordinary traffic; grows to one maximum request when needed.
const RECEIVE_BUFFER: usize = 256 * 1024;
/// A receive buffer grown beyond this by a large request is replaced once it is empty.
const RECEIVE_BUFFER_KEPT: usize = 4 * 1024 * 1024 + 64;
/// Replies are encoded until this many bytes wait to be sent.
const SEND_BATCH: usize = 256 * 1024;

/// Room reserved for the send buffer's alignment pad.
const ALIASING_PAD_SPAN: usize = 4096;

/// Bytes to leave unused at the start of the send buffer so that the replies begin about 2 KiB
/// into a page. The store's pages are page-aligned, and a copy whose destination sits just
/// after its source modulo 4 KiB stalls on "4K aliasing" (the CPU takes loads to depend on the
/// stores just made): a page-aligned send buffer (large buffers are mmap'd, see
/// `ramdisk::return_large_buffers_to_kernel`) halved 1 MiB READ throughput.
fn aliasing_pad(buffer: *const u8) -> usize {
    const TARGET: usize = 2048;
    (TARGET + ALIASING_PAD_SPAN - buffer as usize % ALIASING_PAD_SPAN) % ALIASING_PAD_SPAN
}

/// What one connection did, for its closing log line.
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: u64,
}

/// A finished request, ready to be encoded as a reply.
#[derive(Debug)]
enum Completion {
    /// No data: success or an error.
    Done {
        cookie: u64,
        offset: u64,
        result: Result<(), Failure>,
    },
    /// A successful READ; its data is copied from the store as the reply is encoded.
    Read { cookie: u64, offset: u64, len: u64 },
    /// A successful BLOCK_STATUS: (length, base:allocation flags) runs.
    BlockStatus {
        cookie: u64,
        offset: u64,
        context: u32,
        extents: Vec<(u64, u32)>,
    },
}

/// An error reply: the wire value and a message for clients that can show one.
#[derive(Debug, Clone, Copy)]
struct Failure(Errno, &'static str);

/// Why [`Connection::produce`] stopped.
#[derive(Debug, PartialEq, Eq)]
enum Produced {
    /// The send buffer is full: send before producing more.
    SendBufferFull,
    /// A request is incomplete: receive more.
    NeedInput,
    /// The client sent DISC: no more requests will be read.
    Disconnect,
}

/// Per-connection transmission state.
struct Connection<'a> {
    negotiated: &'a Negotiated,
    mode: ReplyMode,
    received: BytesMut,
    /// Payload bytes of a refused oversized request still to be skipped.
    skip: u64,
    /// Replies waiting to be written, after `pad` unused bytes.
    send: Vec<u8>,
    /// Leading bytes of `send` that are never written: see [`aliasing_pad`].
    pad: usize,
    /// Bytes of `send` already written (or skipped, the pad).
    sent: usize,
    /// The part of a READ reply's data not yet copied into `send`: (offset, length).
    read_tail: Option<(u64, u64)>,
    /// Shutdown has begun: new requests get ESHUTDOWN.
    draining: bool,
    stats: Stats,
    /// Metrics for this connection's export; `None` when metrics are off.
    metrics: Option<&'a ExportMetrics>,
    /// When the latest bytes were received (kept only with metrics on).
    received_at: Option<Instant>,
    /// Bytes written before the start of `send` (kept only with metrics on).
    send_base: u64,
    /// Requests whose replies are encoded but not yet completely written.
    unsent_meters: VecDeque<Meter>,
}

/// What metrics need to know about a request until its reply has been written.
#[derive(Debug, Clone, Copy)]
struct Meter {
    command: u16,
    length: u64,
    failed: bool,
    arrived: Instant,
    /// Where its reply ends in the connection's output (counted like `send_base`).
    reply_end: u64,
}

pub async fn transmit<R, W>(
    mut reader: R,
    mut writer: W,
    negotiated: Negotiated,
    shutdown: &Shutdown,
    metrics: Option<std::sync::Arc<ExportMetrics>>,
) -> io::Result<Stats>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut send = Vec::with_capacity(2 * SEND_BATCH + ALIASING_PAD_SPAN);
    let pad = aliasing_pad(send.as_ptr());
    send.resize(pad, 0);
    let mut conn = Connection {
        mode: negotiated.reply_mode(),
        negotiated: &negotiated,
        received: BytesMut::with_capacity(RECEIVE_BUFFER),
        skip: 0,
        send,
        pad,
        sent: pad,
        read_tail: None,
        draining: false,
        stats: Stats::default(),
        metrics: metrics.as_deref(),
        received_at: None,
        send_base: 0,
        unsent_meters: VecDeque::with_capacity(if metrics.is_some() { 256 } else { 0 }),
    };
    let mut end_of_input = false;
    loop {
        // Polled at every turn (one atomic load), not only when the client is quiet: the
        // select below prefers I/O, so a client that never pauses would otherwise keep its
        // requests executing after the signal, and its connection open past the grace period.
        match shutdown.phase() {
            Phase::Running => {}
            Phase::Stopping => conn.draining = true,
            Phase::Closing => {
                conn.draining = true;
                end_of_input = true;
            }
        }
        let produced = conn.produce()?;
        let unsent = conn.sent < conn.send.len();
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
            return Ok(conn.stats);
        }
        let receive = produced == Produced::NeedInput && !end_of_input;
        if receive && conn.received.capacity() - conn.received.len() < RECEIVE_BUFFER / 4 {
            conn.received.reserve(RECEIVE_BUFFER);
        }
        tokio::select! {
            // Receive first: replies for everything already pipelined then go out in one write.
            biased;
            read = reader.read_buf(&mut conn.received), if receive => {
                if read? == 0 {
                    end_of_input = true;
                } else if conn.metrics.is_some() {
                    conn.received_at = Some(Instant::now());
                }
            }
            written = writer.write(&conn.send[conn.sent..]), if unsent => {
                conn.sent(written?);
            }
            () = shutdown.stopping(), if receive && !conn.draining => {
                tracing::debug!("shutdown: answering further requests with ESHUTDOWN");
                conn.draining = true;
            }
            // In an async block so the timer (and its clock read) is only made when this
            // branch is enabled: select! builds every branch's future on every turn.
            () = async { tokio::time::sleep(DRAIN_IDLE).await }, if receive && conn.draining && !unsent => {
                tracing::debug!("shutdown: client idle, closing");
                end_of_input = true;
            }
            () = shutdown.closing(), if receive && conn.draining => {
                // The grace period is nearly over: answer what has been read, then close.
                tracing::debug!("shutdown: closing after the replies already due");
                end_of_input = true;
            }
        }
    }
}

impl Connection<'_> {
    /// Accounts for `written` bytes of `send` having been written. This is the completion
    /// point: a request whose reply is now completely written is counted for metrics.
    fn sent(&mut self, written: usize) {
        self.sent += written;
        if let Some(metrics) = self.metrics {
            let sent_through = self.send_base + (self.sent - self.pad) as u64;
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
        if self.sent == self.send.len() {
            self.send_base += (self.send.len() - self.pad) as u64;
            self.send.truncate(self.pad);
            self.sent = self.pad;
        }
    }

    /// Notes, for metrics, a request whose reply has just been encoded.
    fn meter(&mut self, request: &Request, failed: bool) {
        if self.metrics.is_none() {
            return;
        }
        let tail = self.read_tail.map_or(0, |(_, len)| len);
        self.unsent_meters.push_back(Meter {
            command: request.command,
            length: request.length,
            failed,
            arrived: self.received_at.unwrap_or_else(Instant::now),
            reply_end: self.send_base + (self.send.len() - self.pad) as u64 + tail,
        });
    }

    /// Turns received requests into replies until the send buffer is full, a request is
    /// incomplete, or the client disconnects. Errors only for a stream out of sync.
    fn produce(&mut self) -> io::Result<Produced> {
        loop {
            if self.send.len() >= SEND_BATCH {
                return Ok(Produced::SendBufferFull);
            }
            if let Some((offset, len)) = self.read_tail {
                // Copy READ data in batch-sized pieces so a 32 MiB read never needs a 32 MiB
                // send buffer.
                let piece = len.min(SEND_BATCH as u64);
                self.negotiated
                    .export
                    .disk
                    .read_into(offset, piece as usize, &mut self.send);
                self.read_tail = (piece < len).then_some((offset + piece, len - piece));
                continue;
            }
            if self.skip > 0 {
                let skipped = self.skip.min(self.received.len() as u64);
                self.received.advance(skipped as usize);
                self.skip -= skipped;
                if self.skip > 0 {
                    return Ok(Produced::NeedInput);
                }
            }
            let (request, header_len) =
                match decode_request(&self.received, self.negotiated.extended) {
                    Decoded::Request {
                        request,
                        header_len,
                    } => (request, header_len),
                    Decoded::Incomplete => return Ok(Produced::NeedInput),
                    Decoded::BadMagic(magic) => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("bad request magic {magic:#x}: stream out of sync"),
                        ));
                    }
                };
            self.stats.requests += 1;
            if request.command == CMD_DISC {
                tracing::debug!("client disconnect (DISC)");
                return Ok(Produced::Disconnect);
            }
            let completion = if request.payload_len > u64::from(MAX_PAYLOAD) {
                // Refused without buffering it: skip the payload to stay in sync.
                self.received.advance(header_len);
                self.skip = request.payload_len;
                done(
                    &request,
                    Err(Failure(Errno::Inval, "payload larger than 32 MiB")),
                )
            } else {
                let total = header_len + request.payload_len as usize;
                if self.received.len() < total {
                    self.received.reserve(total - self.received.len());
                    return Ok(Produced::NeedInput);
                }
                let completion = if self.draining {
                    done(
                        &request,
                        Err(Failure(Errno::Shutdown, "server is shutting down")),
                    )
                } else {
                    execute(self.negotiated, &request, &self.received[header_len..total])
                };
                self.received.advance(total);
                if self.received.is_empty() && self.received.capacity() > RECEIVE_BUFFER_KEPT {
                    // A very large request grew the buffer; give that memory back. Buffers for
                    // ordinary large I/O (1-4 MiB) are kept: reallocating one per request
                    // costs more than the copy it holds.
                    self.received = BytesMut::with_capacity(RECEIVE_BUFFER);
                }
                completion
            };
            let failed = matches!(completion, Completion::Done { result: Err(_), .. });
            self.encode(completion);
            self.meter(&request, failed);
        }
    }

    /// Appends a reply to the send buffer; READ data follows through `read_tail`.
    fn encode(&mut self, completion: Completion) {
        let out = &mut self.send;
        match completion {
            Completion::Done {
                cookie,
                offset,
                result: Ok(()),
            } => self.mode.done(out, cookie, offset),
            Completion::Done {
                cookie,
                offset,
                result: Err(Failure(errno, message)),
            } => {
                tracing::debug!(%errno, message, offset, "request failed");
                self.mode.error(out, cookie, offset, errno, message);
            }
            Completion::Read {
                cookie,
                offset,
                len,
            } => {
                self.mode.read_header(out, cookie, offset, len);
                self.read_tail = (len > 0).then_some((offset, len));
            }
            Completion::BlockStatus {
                cookie,
                offset,
                context,
                extents,
            } => {
                self.mode
                    .block_status(out, cookie, offset, context, &extents);
            }
        }
    }
}

fn done(request: &Request, result: Result<(), Failure>) -> Completion {
    Completion::Done {
        cookie: request.cookie,
        offset: request.offset,
        result,
    }
}

/// Validates a request and performs it. Check order follows the spec's error table: flags
/// first, then permission, then range.
fn execute(negotiated: &Negotiated, request: &Request, payload: &[u8]) -> Completion {
    match try_execute(negotiated, request, payload) {
        Ok(completion) => completion,
        Err(failure) => done(request, Err(failure)),
    }
}

fn try_execute(
    negotiated: &Negotiated,
    request: &Request,
    payload: &[u8],
) -> Result<Completion, Failure> {
    let export = &negotiated.export;
    let Request {
        flags,
        command,
        cookie,
        offset,
        length,
        ..
    } = *request;
    if flags & !allowed_flags(command, negotiated) != 0 {
        return Err(Failure(
            Errno::Inval,
            "unknown or invalid flag for this command",
        ));
    }
    if negotiated.extended && command != CMD_WRITE && request.payload_len != 0 {
        return Err(Failure(Errno::Inval, "this command takes no payload"));
    }
    let ok = Ok(done(request, Ok(())));
    match command {
        CMD_READ => {
            if length > u64::from(MAX_PAYLOAD) {
                return Err(Failure(Errno::Inval, "read larger than 32 MiB"));
            }
            check_range(export, offset, length, Errno::Inval)?;
            Ok(Completion::Read {
                cookie,
                offset,
                len: length,
            })
        }
        CMD_WRITE => {
            check_writable(export)?;
            check_range(export, offset, length, Errno::NoSpc)?;
            export.disk.write(offset, payload).map_err(over_cap)?;
            ok
        }
        // Writes are in RAM, visible to every connection, by the time they are replied to:
        // nothing to flush.
        CMD_FLUSH => ok,
        CMD_TRIM => {
            check_writable(export)?;
            check_range(export, offset, length, Errno::Inval)?;
            export.disk.zero(offset, length, true).map_err(over_cap)?;
            ok
        }
        CMD_CACHE => {
            check_range(export, offset, length, Errno::Inval)?;
            ok
        }
        CMD_WRITE_ZEROES => {
            check_writable(export)?;
            check_range(export, offset, length, Errno::NoSpc)?;
            // NO_HOLE asks for the range to stay allocated, so write real zeroes then.
            export
                .disk
                .zero(offset, length, flags & CMD_FLAG_NO_HOLE == 0)
                .map_err(over_cap)?;
            ok
        }
        CMD_BLOCK_STATUS => {
            let Some(context) = negotiated.base_allocation else {
                return Err(Failure(Errno::Inval, "no metadata context negotiated"));
            };
            if length == 0 {
                return Err(Failure(Errno::Inval, "zero-length block status"));
            }
            check_range(export, offset, length, Errno::Inval)?;
            let limit = if flags & CMD_FLAG_REQ_ONE != 0 {
                1
            } else {
                MAX_EXTENTS
            };
            let extents = export
                .disk
                .extents(offset, length, limit)
                .into_iter()
                .map(|(len, state)| {
                    (
                        len,
                        if state == Extent::Hole {
                            STATE_HOLE | STATE_ZERO
                        } else {
                            0
                        },
                    )
                })
                .collect();
            Ok(Completion::BlockStatus {
                cookie,
                offset,
                context,
                extents,
            })
        }
        _ => Err(Failure(Errno::Inval, "unknown command")),
    }
}

/// Flags each command accepts. FUA is accepted on every command, as the spec requires once
/// SEND_FUA is advertised.
fn allowed_flags(command: u16, negotiated: &Negotiated) -> u16 {
    let specific = match command {
        CMD_READ if negotiated.structured => CMD_FLAG_DF,
        CMD_WRITE if negotiated.extended => CMD_FLAG_PAYLOAD_LEN,
        CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        _ => 0,
    };
    CMD_FLAG_FUA | specific
}

/// The memory cap is full: ENOSPC, which the spec names for "no space" conditions.
fn over_cap(_: NoSpace) -> Failure {
    Failure(
        Errno::NoSpc,
        "memory cap reached: trim or zero data to make room",
    )
}

fn check_writable(export: &Export) -> Result<(), Failure> {
    if export.read_only {
        Err(Failure(Errno::Perm, "export is read-only"))
    } else {
        Ok(())
    }
}

fn check_range(export: &Export, offset: u64, len: u64, past_end: Errno) -> Result<(), Failure> {
    match offset.checked_add(len) {
        None => Err(Failure(Errno::Inval, "offset + length overflows")),
        Some(end) if end > export.size() => Err(Failure(past_end, "beyond the end of the export")),
        Some(_) => Ok(()),
    }
}
