//! The transmission phase. Two tasks per connection:
//!
//! * the **reader** (this connection's task) parses requests out of one reusable receive
//!   buffer, validates them, and executes writes, trims and zeroes on the spot (a memcpy or a
//!   madvise: no reason to defer them);
//! * the **writer** task turns completions into replies, copying READ data straight from the
//!   store into one reusable send buffer, and batches as many replies per `write` as are ready.
//!
//! Requests are pipelined: the reader never waits for a reply to be sent, only for room in the
//! bounded completion queue, which is what bounds the memory a connection can hold (one receive
//! buffer of at most one maximum request, one send buffer, and a queue of small completions).
//! Replies go out in the order requests arrived, which the protocol allows (any order is).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Negotiated;
use crate::export::Export;
use crate::proto::Errno;
use crate::proto::consts::*;
use crate::proto::transmission::{Decoded, ReplyMode, Request, decode_request};
use crate::ramdisk::Extent;

/// Completions queued for the writer: comfortably more than the kernel's 128 requests in flight.
const COMPLETION_QUEUE: usize = 256;
/// Receive buffer size for ordinary traffic; grows to one maximum request when needed.
const RECEIVE_BUFFER: usize = 256 * 1024;
/// Replies are sent once this many bytes are ready (or nothing else is queued).
const SEND_BATCH: usize = 256 * 1024;
/// After shutdown starts, a connection idle for this long is closed.
const DRAIN_IDLE: Duration = Duration::from_millis(250);

/// What one connection did, for its closing log line.
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: u64,
}

/// A finished request, waiting to be sent.
#[derive(Debug)]
enum Completion {
    /// No data: success or an error.
    Done {
        cookie: u64,
        offset: u64,
        result: Result<(), Failure>,
    },
    /// A successful READ; the writer copies the data when it sends the reply.
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

pub async fn transmit<R, W>(
    mut reader: R,
    writer: W,
    negotiated: Negotiated,
    shutdown: CancellationToken,
) -> io::Result<Stats>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (completions, queue) = mpsc::channel(COMPLETION_QUEUE);
    let mode = negotiated.reply_mode();
    let writer = tokio::spawn(send_replies(
        writer,
        queue,
        Arc::clone(&negotiated.export),
        mode,
    ));
    let read_result = receive_requests(&mut reader, &completions, &negotiated, &shutdown).await;
    // Closing the queue lets the writer send every reply still queued, then finish: this is
    // what makes DISC and shutdown complete in-flight requests before the socket closes.
    drop(completions);
    let write_result = writer.await.map_err(io::Error::other)?;
    let stats = read_result?;
    write_result?;
    Ok(stats)
}

async fn receive_requests<R: AsyncRead + Unpin>(
    reader: &mut R,
    completions: &mpsc::Sender<Completion>,
    negotiated: &Negotiated,
    shutdown: &CancellationToken,
) -> io::Result<Stats> {
    let mut stats = Stats::default();
    let mut buf = BytesMut::with_capacity(RECEIVE_BUFFER);
    let mut draining = false;
    loop {
        let (request, header_len) = match decode_request(&buf, negotiated.extended) {
            Decoded::Request {
                request,
                header_len,
            } => (request, header_len),
            Decoded::Incomplete => {
                if !fill(reader, &mut buf, shutdown, &mut draining).await? {
                    return Ok(stats);
                }
                continue;
            }
            Decoded::BadMagic(magic) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad request magic {magic:#x}: stream out of sync"),
                ));
            }
        };
        stats.requests += 1;
        if request.command == CMD_DISC {
            tracing::debug!("client disconnect (DISC)");
            return Ok(stats);
        }
        let completion = if request.payload_len > u64::from(MAX_PAYLOAD) {
            // Refused without buffering it: drain the payload to stay in sync.
            buf.advance(header_len);
            discard(reader, &mut buf, request.payload_len).await?;
            done(
                &request,
                Err(Failure(Errno::Inval, "payload larger than 32 MiB")),
            )
        } else {
            let total = header_len + request.payload_len as usize;
            while buf.len() < total {
                buf.reserve(total - buf.len());
                if !fill(reader, &mut buf, shutdown, &mut draining).await? {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
            let completion = if draining {
                done(
                    &request,
                    Err(Failure(Errno::Shutdown, "server is shutting down")),
                )
            } else {
                execute(negotiated, &request, &buf[header_len..total])
            };
            buf.advance(total);
            completion
        };
        if buf.is_empty() && buf.capacity() > 2 * RECEIVE_BUFFER {
            // A maximum-size request grew the buffer; give that memory back.
            buf = BytesMut::with_capacity(RECEIVE_BUFFER);
        }
        if completions.send(completion).await.is_err() {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
    }
}

/// Reads more bytes into `buf`. Returns false at end of stream, or when draining after
/// shutdown and the client has gone quiet.
async fn fill<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    shutdown: &CancellationToken,
    draining: &mut bool,
) -> io::Result<bool> {
    if buf.capacity() - buf.len() < RECEIVE_BUFFER / 4 {
        buf.reserve(RECEIVE_BUFFER);
    }
    if !*draining {
        tokio::select! {
            read = reader.read_buf(buf) => return Ok(read? > 0),
            () = shutdown.cancelled() => {
                tracing::debug!("shutdown: answering further requests with ESHUTDOWN");
                *draining = true;
            }
        }
    }
    match tokio::time::timeout(DRAIN_IDLE, reader.read_buf(buf)).await {
        Ok(read) => Ok(read? > 0),
        Err(_idle) => Ok(false),
    }
}

/// Consumes `len` payload bytes, some possibly already in `buf`, without keeping them.
async fn discard<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    len: u64,
) -> io::Result<()> {
    let buffered = (buf.len() as u64).min(len);
    buf.advance(buffered as usize);
    let rest = len - buffered;
    let copied = tokio::io::copy(&mut reader.take(rest), &mut tokio::io::sink()).await?;
    if copied < rest {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
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
            if negotiated.extended && flags & CMD_FLAG_PAYLOAD_LEN == 0 {
                return Err(Failure(Errno::Inval, "extended WRITE without PAYLOAD_LEN"));
            }
            check_writable(export)?;
            check_range(export, offset, length, Errno::NoSpc)?;
            export.disk.write(offset, payload);
            ok
        }
        // Writes are in RAM, visible to every connection, by the time they are replied to:
        // nothing to flush.
        CMD_FLUSH => ok,
        CMD_TRIM => {
            check_writable(export)?;
            check_range(export, offset, length, Errno::Inval)?;
            export.disk.zero(offset, length, true);
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
                .zero(offset, length, flags & CMD_FLAG_NO_HOLE == 0);
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

/// The writer task: encodes completions into a reusable buffer and sends them in batches.
async fn send_replies<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut queue: mpsc::Receiver<Completion>,
    export: Arc<Export>,
    mode: ReplyMode,
) -> io::Result<()> {
    let mut out = Vec::with_capacity(2 * SEND_BATCH);
    while let Some(first) = queue.recv().await {
        let mut next = Some(first);
        while let Some(completion) = next {
            encode(completion, mode, &export, &mut out, &mut writer).await?;
            next = if out.len() < SEND_BATCH {
                queue.try_recv().ok()
            } else {
                None
            };
        }
        writer.write_all(&out).await?;
        out.clear();
    }
    writer.shutdown().await
}

async fn encode<W: AsyncWrite + Unpin>(
    completion: Completion,
    mode: ReplyMode,
    export: &Export,
    out: &mut Vec<u8>,
    writer: &mut W,
) -> io::Result<()> {
    match completion {
        Completion::Done {
            cookie,
            offset,
            result: Ok(()),
        } => mode.done(out, cookie, offset),
        Completion::Done {
            cookie,
            offset,
            result: Err(Failure(errno, message)),
        } => {
            tracing::debug!(%errno, message, offset, "request failed");
            mode.error(out, cookie, offset, errno, message);
        }
        Completion::Read {
            cookie,
            offset,
            len,
        } => {
            mode.read_header(out, cookie, offset, len);
            // Copy in batch-sized pieces so a 32 MiB read never needs a 32 MiB buffer.
            let mut at = offset;
            let end = offset + len;
            while at < end {
                let piece = (end - at).min(SEND_BATCH as u64);
                export.disk.read_into(at, piece as usize, out);
                at += piece;
                if out.len() >= SEND_BATCH {
                    writer.write_all(out).await?;
                    out.clear();
                }
            }
        }
        Completion::BlockStatus {
            cookie,
            offset,
            context,
            extents,
        } => {
            mode.block_status(out, cookie, offset, context, &extents);
        }
    }
    Ok(())
}
