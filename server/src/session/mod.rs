//! One client connection: the handshake (`negotiate`), then the transmission phase
//! (`transmit`). Generic over the stream halves so TCP and Unix sockets share all code, and so
//! tests drive a whole session over an in-memory stream.
//!
//! A session ends in one of two ways: closed (the client left, the stream broke, shutdown
//! closed it), or handed over ([`crate::shutdown::Shutdown::hand_over`]): suspended at a
//! request boundary, its stream returned open with a [`Suspended`] state, which [`resume`]
//! (in this process or, encoded, in another) carries on. Sessions still in the handshake when
//! a hand-over starts are not handed over: they are refused and closed as in any stop
//! (`NBD_REP_ERR_SHUTDOWN`, then closed when the client is quiet).

mod buffers;
mod command;
mod negotiate;
mod suspend;
mod transmit;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::access::Peer;
use crate::export::Exports;
use crate::logsafe::Untrusted;
use crate::metrics::Metrics;
use crate::shutdown::{PhaseWatch, Shutdown};

pub use negotiate::{Negotiated, PROVOKED_LINES};
pub use suspend::{MAX_PENDING, ResumeError, STATE_VERSION, StateError, Suspended};
pub use transmit::CONNECTION_BUFFER_BYTES;

/// A connection suspended by a hand-over: its stream, open, and the state to resume it with.
/// For sockets, reunite the halves (`OwnedReadHalf::reunite`) to get the socket back.
#[derive(Debug)]
pub struct HandedOver<R, W> {
    pub reader: R,
    pub writer: W,
    pub state: Suspended,
}

/// Serves one connection until the client leaves, the stream breaks, or shutdown completes;
/// `Some` if a hand-over suspended it. Errors are logged here: one connection's failure never
/// affects another.
pub async fn serve<R, W>(
    reader: R,
    writer: W,
    exports: Arc<Exports>,
    shutdown: Shutdown,
    metrics: Option<Arc<Metrics>>,
) -> Option<HandedOver<R, W>>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    serve_within(
        reader,
        writer,
        Peer::unknown(),
        None,
        exports,
        shutdown,
        metrics,
    )
    .await
}

/// Like [`serve`], for a client that is `peer` (whom the exports' access rules judge),
/// closing the connection if it has not reached the transmission phase within
/// `handshake_deadline` (`None`: no deadline): a client that connects and sends nothing, or
/// too little, must not hold its slot and file descriptor for ever.
pub async fn serve_within<R, W>(
    mut reader: R,
    mut writer: W,
    mut peer: Peer,
    handshake_deadline: Option<Duration>,
    exports: Arc<Exports>,
    shutdown: Shutdown,
    metrics: Option<Arc<Metrics>>,
) -> Option<HandedOver<R, W>>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // One view of the shutdown phases for the whole connection, handshake and transmission.
    let mut watch = shutdown.watch();
    let handshake = negotiate::negotiate(&mut reader, &mut writer, &exports, &mut peer, &mut watch);
    let handshake = match handshake_deadline {
        None => handshake.await,
        Some(deadline) => match tokio::time::timeout(deadline, handshake).await {
            Ok(ended) => ended,
            Err(_elapsed) => {
                // Debug, not info: a flood of silent connections must not flood the log too.
                tracing::debug!(?deadline, "handshake not finished in time: closing");
                return None;
            }
        },
    };
    let negotiated = match handshake {
        Ok(Some(negotiated)) => negotiated,
        Ok(None) => return None,
        Err(err) => {
            tracing::debug!(cause = %err, "handshake ended");
            return None;
        }
    };
    tracing::Span::current().record(
        "export",
        tracing::field::display(Untrusted::text(&negotiated.export.name)),
    );
    tracing::info!(
        mode = ?negotiated.reply_mode(),
        size = negotiated.export.size(),
        "transmission started"
    );
    transmit_logged(reader, writer, negotiated, &[], watch, metrics).await
}

/// Carries on a session suspended by a hand-over, on the same stream (its socket, passed on
/// from the process that suspended it): its pending input first, then what the stream brings.
/// A state this server cannot honour (the export is gone, resized or now read-only: see
/// [`Suspended::negotiated`]), or an export whose access rules now refuse `peer`, is logged
/// and the stream closed. Ends as [`serve`] does.
pub async fn resume<R, W>(
    reader: R,
    mut writer: W,
    peer: Peer,
    state: Suspended,
    exports: Arc<Exports>,
    shutdown: Shutdown,
    metrics: Option<Arc<Metrics>>,
) -> Option<HandedOver<R, W>>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    tracing::Span::current().record(
        "export",
        tracing::field::display(Untrusted::text(&state.export)),
    );
    let negotiated = match state.negotiated(&exports) {
        Ok(negotiated) => negotiated,
        Err(err) => {
            tracing::warn!(cause = %err, "cannot resume a handed-over connection: closing it");
            let _ = writer.shutdown().await;
            return None;
        }
    };
    // The rules may have changed with the new process's configuration.
    if let Err(refusal) = negotiated.export.access.check(&peer) {
        tracing::warn!(
            %peer,
            reason = %refusal,
            "the export's access rules refuse a handed-over connection: closing it"
        );
        let _ = writer.shutdown().await;
        return None;
    }
    tracing::info!(
        mode = ?negotiated.reply_mode(),
        pending = state.pending.len(),
        "transmission resumed"
    );
    let watch = shutdown.watch();
    transmit_logged(reader, writer, negotiated, &state.pending, watch, metrics).await
}

async fn transmit_logged<R, W>(
    reader: R,
    writer: W,
    negotiated: Negotiated,
    pending: &[u8],
    watch: PhaseWatch,
    metrics: Option<Arc<Metrics>>,
) -> Option<HandedOver<R, W>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let metrics = metrics.and_then(|m| m.export(&negotiated.export.name));
    match transmit::transmit(reader, writer, negotiated, pending, watch, metrics).await {
        Ok((stats, None)) => {
            tracing::info!(requests = stats.requests, "connection closed");
            None
        }
        Ok((stats, Some(handed_over))) => {
            tracing::info!(requests = stats.requests, "connection handed over");
            Some(handed_over)
        }
        Err(err) => {
            tracing::info!(cause = %err, "connection dropped");
            None
        }
    }
}
