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
mod socket;
mod suspend;
mod transmit;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

use crate::access::Peer;
use crate::export::Exports;
use crate::logsafe::Untrusted;
use crate::metrics::Metrics;
use crate::shutdown::{PhaseWatch, Shutdown};
use crate::tls::{Established, Joined, Tls};
use negotiate::{ClientLog, Outcome};

pub use negotiate::{Negotiated, PROVOKED_LINES};
pub use socket::{Receive, Reply};
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
    R: Receive + Send + 'static,
    W: Reply + Send + 'static,
{
    serve_within(
        reader,
        writer,
        Peer::unknown(),
        &HandshakeOptions::default(),
        exports,
        shutdown,
        metrics,
    )
    .await
}

/// How handshakes are run: their deadline and TLS.
#[derive(Debug, Clone, Default)]
pub struct HandshakeOptions {
    /// A connection not in the transmission phase by then is closed (it covers the TLS
    /// handshake too); `None`: no deadline.
    pub deadline: Option<Duration>,
    /// Whether and how STARTTLS is served.
    pub tls: Tls,
}

/// Like [`serve`], for a client that is `peer` (whom the exports' access rules judge),
/// closing the connection if it has not reached the transmission phase within the
/// deadline of `options`: a client that connects and sends nothing, or too little, must not
/// hold its slot and file descriptor for ever.
///
/// A connection that started TLS runs the rest of its handshake and its transmission phase
/// over TLS, and is never handed over: a hand-over stops it as a plain stop does (its
/// requests finished, then closed), since its TLS keys cannot be passed on.
pub async fn serve_within<R, W>(
    reader: R,
    writer: W,
    mut peer: Peer,
    options: &HandshakeOptions,
    exports: Arc<Exports>,
    shutdown: Shutdown,
    metrics: Option<Arc<Metrics>>,
) -> Option<HandedOver<R, W>>
where
    R: Receive + Send + 'static,
    W: Reply + Send + 'static,
{
    // One view of the shutdown phases for the whole connection, handshake and transmission.
    let mut watch = shutdown.watch();
    let mut log = ClientLog::default();
    let handshake = handshake(
        reader,
        writer,
        &options.tls,
        &exports,
        &mut peer,
        &mut watch,
        &mut log,
    );
    let handshake = match options.deadline {
        None => handshake.await,
        Some(deadline) => match tokio::time::timeout(deadline, handshake).await {
            Ok(ended) => ended,
            Err(_elapsed) => {
                // Debug, not info: a flood of silent connections must not flood the log too.
                tracing::debug!(?deadline, "handshake not finished in time: closing");
                log.finish();
                return None;
            }
        },
    };
    log.finish();
    let handshake = match handshake {
        Ok(handshake) => handshake,
        Err(err) => {
            tracing::debug!(cause = %err, "handshake ended");
            return None;
        }
    };
    let negotiated = match &handshake {
        Handshake::Closed => return None,
        Handshake::Plain { negotiated, .. } | Handshake::Tls { negotiated, .. } => negotiated,
    };
    tracing::Span::current().record(
        "export",
        tracing::field::display(Untrusted::text(&negotiated.export.name)),
    );
    tracing::info!(
        mode = ?negotiated.reply_mode(),
        size = negotiated.export.size(),
        tls = negotiated.secured,
        "transmission started"
    );
    match handshake {
        Handshake::Closed => None,
        Handshake::Plain {
            reader,
            writer,
            negotiated,
        } => transmit_logged(reader, writer, negotiated, &[], watch, metrics).await,
        Handshake::Tls {
            reader,
            writer,
            negotiated,
        } => {
            watch.forbid_hand_over();
            let suspended = transmit_logged(reader, writer, negotiated, &[], watch, metrics);
            // Never Some: the watch does not suspend. Were it to, dropping it closes.
            drop(suspended.await);
            if shutdown.handing_over() {
                tracing::info!(
                    "TLS connection closed, not handed over: its TLS session cannot be \
                     passed on to another process"
                );
            }
            None
        }
    }
}

/// A connection upgraded to TLS, split again for the session.
type TlsStream<R, W> = tokio_rustls::server::TlsStream<Joined<R, W>>;

/// How a handshake ended.
enum Handshake<R, W> {
    Closed,
    Plain {
        reader: R,
        writer: W,
        negotiated: Negotiated,
    },
    Tls {
        reader: ReadHalf<TlsStream<R, W>>,
        writer: WriteHalf<TlsStream<R, W>>,
        negotiated: Negotiated,
    },
}

/// The whole handshake: greeting, options, and, on STARTTLS, the TLS handshake and the
/// options after it, judged with the identity TLS verified.
async fn handshake<R, W>(
    mut reader: R,
    mut writer: W,
    tls: &Tls,
    exports: &Exports,
    peer: &mut Peer,
    watch: &mut PhaseWatch,
    log: &mut ClientLog,
) -> std::io::Result<Handshake<R, W>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Some(state) = negotiate::greet(&mut reader, &mut writer, watch).await? else {
        return Ok(Handshake::Closed);
    };
    let mut state = state.with_tls_mode(tls.mode);
    let outcome = negotiate::options(
        &mut reader,
        &mut writer,
        exports,
        peer,
        watch,
        &mut state,
        log,
    );
    match outcome.await? {
        Outcome::Close => return Ok(Handshake::Closed),
        Outcome::Transmit(negotiated) => {
            return Ok(Handshake::Plain {
                reader,
                writer,
                negotiated,
            });
        }
        Outcome::StartTls => {}
    }
    // Only `Tls::without_credentials` acknowledges STARTTLS without them.
    let Some(credentials) = &tls.credentials else {
        return Ok(Handshake::Closed);
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(credentials.config());
    let stream = match acceptor.accept(Joined { reader, writer }).await {
        Ok(stream) => stream,
        Err(err) => {
            // The spec: a failed TLS handshake ends the connection.
            tracing::info!(cause = %err, "TLS handshake failed, closing");
            return Ok(Handshake::Closed);
        }
    };
    let established = Established::of(stream.get_ref().1);
    let shown = established.identity.as_deref().map(Untrusted::text);
    tracing::info!(
        version = %established.version,
        cipher = %established.cipher,
        identity = %shown.map_or_else(|| "(none)".to_owned(), |id| id.to_string()),
        "TLS established"
    );
    // What the exports' allow-identity rules match from now on.
    peer.tls_identity = established.identity.clone();
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut state = state.secured(established);
    let outcome = negotiate::options(
        &mut reader,
        &mut writer,
        exports,
        peer,
        watch,
        &mut state,
        log,
    );
    match outcome.await? {
        Outcome::Transmit(negotiated) => Ok(Handshake::Tls {
            reader,
            writer,
            negotiated,
        }),
        // StartTls is refused over TLS; Close closes.
        Outcome::Close | Outcome::StartTls => {
            let _ = writer.shutdown().await;
            Ok(Handshake::Closed)
        }
    }
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
    R: Receive + Send + 'static,
    W: Reply + Send + 'static,
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
    R: Receive,
    W: Reply,
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
