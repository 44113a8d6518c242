//! The two phases of a graceful stop, shared by the accept loops and every session.
//!
//! 1. **Stopping** (SIGTERM or SIGINT): listeners stop accepting; sessions finish the requests
//!    they have read, answer further requests with `ESHUTDOWN` (and handshake options with
//!    `NBD_REP_ERR_SHUTDOWN`), and close once the client has been quiet for a moment.
//! 2. **Closing** (shortly before the grace period ends): sessions stop reading, send every
//!    reply still queued, and close. Nothing is cut off mid-reply.
//!
//! When the grace period is over the process exits whatever is left.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// After stopping starts, a connection whose client is quiet for this long is closed.
pub const DRAIN_IDLE: Duration = Duration::from_millis(250);

/// How long a session keeps reading (and discarding) after it has sent its last reply and
/// half-closed the socket, so that closing with unread input does not reset the connection
/// while replies are still on their way (a reset discards them).
pub const LINGER: Duration = Duration::from_millis(500);

/// Where a server is in its stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running,
    Stopping,
    Closing,
}

/// The shutdown signals of one server. Change phases with [`Shutdown::stop`] and
/// [`Shutdown::close`] only.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    stopping: CancellationToken,
    closing: CancellationToken,
    /// The phase as one atomic, for busy loops to poll: a cancellation token's own check
    /// takes a lock.
    phase: Arc<AtomicU8>,
}

impl Shutdown {
    /// `stopping` is the token the signal handler cancels.
    pub fn new(stopping: CancellationToken) -> Shutdown {
        Shutdown {
            stopping,
            closing: CancellationToken::new(),
            phase: Arc::default(),
        }
    }

    /// Starts phase 1.
    pub fn stop(&self) {
        self.phase
            .fetch_max(Phase::Stopping as u8, Ordering::Release);
        self.stopping.cancel();
    }

    /// The current phase: one atomic load.
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Running,
            1 => Phase::Stopping,
            _ => Phase::Closing,
        }
    }

    pub fn is_stopping(&self) -> bool {
        self.phase() >= Phase::Stopping
    }

    /// Completes when phase 1 starts.
    pub async fn stopping(&self) {
        self.stopping.cancelled().await;
    }

    /// Starts phase 2 (and phase 1, if it has not started).
    pub fn close(&self) {
        self.phase
            .fetch_max(Phase::Closing as u8, Ordering::Release);
        self.stopping.cancel();
        self.closing.cancel();
    }

    /// Completes when phase 2 starts.
    pub async fn closing(&self) {
        self.closing.cancelled().await;
    }

    /// A token cancelled when phase 1 starts, for tasks that only need that.
    pub fn stopping_token(&self) -> CancellationToken {
        self.stopping.clone()
    }
}

/// When, within the grace period, sessions are told to close: late enough for ordinary
/// clients to finish, early enough to send what is queued (up to a second before the end).
pub fn closing_after(grace: Duration) -> Duration {
    grace.saturating_sub((grace / 4).min(Duration::from_secs(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_only_advance() {
        let shutdown = Shutdown::default();
        assert_eq!(shutdown.phase(), Phase::Running);
        shutdown.close();
        shutdown.stop();
        assert_eq!(shutdown.phase(), Phase::Closing);
        assert!(shutdown.is_stopping());
    }

    #[test]
    fn closing_leaves_time_to_flush() {
        assert_eq!(
            closing_after(Duration::from_secs(10)),
            Duration::from_secs(9)
        );
        assert_eq!(
            closing_after(Duration::from_secs(2)),
            Duration::from_millis(1500)
        );
        assert_eq!(closing_after(Duration::ZERO), Duration::ZERO);
    }
}
