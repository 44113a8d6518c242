//! One client connection: the handshake (`negotiate`), then the transmission phase
//! (`transmit`). Generic over the stream halves so TCP and Unix sockets share all code, and so
//! tests drive a whole session over an in-memory stream.

mod buffers;
mod command;
mod negotiate;
mod transmit;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::export::Exports;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

pub use negotiate::Negotiated;

/// Serves one connection until the client leaves, the stream breaks, or shutdown completes.
/// Errors are logged here: one connection's failure never affects another.
pub async fn serve<R, W>(
    mut reader: R,
    mut writer: W,
    exports: Arc<Exports>,
    shutdown: Shutdown,
    metrics: Option<Arc<Metrics>>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // One view of the shutdown phases for the whole connection, handshake and transmission.
    let mut watch = shutdown.watch();
    let negotiated =
        match negotiate::negotiate(&mut reader, &mut writer, &exports, &mut watch).await {
            Ok(Some(negotiated)) => negotiated,
            Ok(None) => return,
            Err(err) => {
                tracing::debug!(cause = %err, "handshake ended");
                return;
            }
        };
    tracing::Span::current().record("export", negotiated.export.name.as_str());
    tracing::info!(
        mode = ?negotiated.reply_mode(),
        size = negotiated.export.size(),
        "transmission started"
    );
    let metrics = metrics.and_then(|m| m.export(&negotiated.export.name));
    match transmit::transmit(reader, writer, negotiated, watch, metrics).await {
        Ok(stats) => tracing::info!(requests = stats.requests, "connection closed"),
        Err(err) => tracing::info!(cause = %err, "connection dropped"),
    }
}
