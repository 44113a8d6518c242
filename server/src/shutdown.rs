//! The phases of a graceful stop, shared by the accept loops and every session.
//!
//! 1. **Stopping** (the first SIGTERM or SIGINT): listeners stop accepting; sessions finish the
//!    requests they have read, answer further requests with `ESHUTDOWN` (and handshake options
//!    with `NBD_REP_ERR_SHUTDOWN`), and close once the client has been quiet for a moment.
//! 2. **Closing** (shortly before the grace period ends, or a second signal): sessions stop
//!    reading, send every reply still queued, and close. The server waits at most
//!    [`CLOSE_FLUSH`] more for them: a client that does not read its replies cannot hold the
//!    stop up.
//! 3. **Aborting** (a third signal): the server stops waiting at once and exits, dropping what
//!    is left.
//!
//! A session follows the phases through one [`PhaseWatch`]: it reads the phase it has seen,
//! and awaits [`PhaseWatch::changed`] next to its I/O.
//!
//! **Hand-over** ([`Shutdown::hand_over`]) is a stop whose sessions do not end: it enters
//! Stopping (listeners stop accepting, handshakes are refused and closed as in any stop), but
//! a session in transmission, instead of refusing new requests, stops at the next request
//! boundary, completes what it has started, sends every reply and returns its stream and state
//! (`session::Suspended`) for another process to resume. Closing still closes: a session that
//! has not reached a boundary by then (a client stalled in the middle of a write's payload) is
//! closed as in an ordinary stop.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// After stopping starts, a connection whose client is quiet for this long is closed.
pub const DRAIN_IDLE: Duration = Duration::from_millis(250);

/// How long a session keeps reading (and discarding) after it has sent its last reply and
/// half-closed the socket, so that closing with unread input does not reset the connection
/// while replies are still on their way (a reset discards them).
pub const LINGER: Duration = Duration::from_millis(500);

/// Once closing has begun, the longest the server waits for sessions to send what they have
/// queued.
pub const CLOSE_FLUSH: Duration = Duration::from_secs(1);

/// Where a server is in its stop. Phases only advance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running,
    Stopping,
    Closing,
    Aborting,
}

impl Phase {
    fn from_u8(value: u8) -> Phase {
        match value {
            0 => Phase::Running,
            1 => Phase::Stopping,
            2 => Phase::Closing,
            _ => Phase::Aborting,
        }
    }
}

/// The shutdown signals of one server: a phase, and one token per phase to await it.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// One atomic for code that polls: a cancellation token's own check takes a lock.
    phase: Arc<AtomicU8>,
    stopping: CancellationToken,
    closing: CancellationToken,
    aborting: CancellationToken,
    /// Set before the phase moves to Stopping, so a session that sees Stopping sees it too.
    handing_over: Arc<AtomicBool>,
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Moves to `phase` (and through the phases before it), unless already past it.
    pub fn advance(&self, phase: Phase) {
        self.phase.fetch_max(phase as u8, Ordering::AcqRel);
        let tokens = [
            (Phase::Stopping, &self.stopping),
            (Phase::Closing, &self.closing),
            (Phase::Aborting, &self.aborting),
        ];
        for (at, token) in tokens {
            if phase >= at {
                token.cancel();
            }
        }
    }

    /// Starts a hand-over: the stop of a server whose connections another process carries on.
    /// Sessions in transmission suspend at a request boundary instead of draining (see the
    /// module's documentation); everything else proceeds as from [`Phase::Stopping`], and
    /// later phases (a timeout, a further signal) still close what has not suspended yet.
    /// Call it instead of the stop's first step: after a plain stop has begun, sessions wake
    /// for no phase change, so they would see it only at their next turn, with some requests
    /// already refused.
    pub fn hand_over(&self) {
        self.handing_over.store(true, Ordering::Release);
        self.advance(Phase::Stopping);
    }

    /// Whether [`Shutdown::hand_over`] was called.
    pub fn handing_over(&self) -> bool {
        self.handing_over.load(Ordering::Acquire)
    }

    /// Moves to the next phase: what each further signal does.
    pub fn escalate(&self) -> Phase {
        let next = match self.phase() {
            Phase::Running => Phase::Stopping,
            Phase::Stopping => Phase::Closing,
            Phase::Closing | Phase::Aborting => Phase::Aborting,
        };
        self.advance(next);
        next
    }

    /// The current phase: one atomic load.
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    /// Completes when the server has reached `phase` (at once if it already has).
    pub async fn reached(&self, phase: Phase) {
        match phase {
            Phase::Running => {}
            Phase::Stopping => self.stopping.cancelled().await,
            Phase::Closing => self.closing.cancelled().await,
            Phase::Aborting => self.aborting.cancelled().await,
        }
    }

    /// A session's view of the phases.
    pub fn watch(&self) -> PhaseWatch {
        PhaseWatch {
            shutdown: self.clone(),
            seen: self.phase(),
            suspendable: true,
        }
    }
}

/// The phase one session has seen, and a way to wait for the next.
#[derive(Debug, Clone)]
pub struct PhaseWatch {
    shutdown: Shutdown,
    seen: Phase,
    /// False for a session that cannot be handed over (TLS): a hand-over is a stop for it.
    suspendable: bool,
}

impl PhaseWatch {
    /// The phase as of the last [`PhaseWatch::refresh`] or [`PhaseWatch::changed`].
    pub fn seen(&self) -> Phase {
        self.seen
    }

    /// Whether the stop is a hand-over (see [`Shutdown::hand_over`]). Once the watch has seen
    /// Stopping, one atomic load; always false while running.
    pub fn handing_over(&self) -> bool {
        self.suspendable && self.seen >= Phase::Stopping && self.shutdown.handing_over()
    }

    /// For a session whose stream cannot be passed on (TLS: its keys live in this process):
    /// a hand-over then stops it as a plain stop does, requests in flight finished and the
    /// connection closed.
    pub fn forbid_hand_over(&mut self) {
        self.suspendable = false;
    }

    /// Catches up with the server's phase (one atomic load) and returns it.
    pub fn refresh(&mut self) -> Phase {
        self.seen = self.shutdown.phase();
        self.seen
    }

    /// Completes when the server's phase moves past the one seen, and records the new one.
    /// Cancel-safe: dropping it loses nothing.
    pub async fn changed(&mut self) {
        let next = match self.seen {
            Phase::Running => Phase::Stopping,
            Phase::Stopping => Phase::Closing,
            Phase::Closing => Phase::Aborting,
            Phase::Aborting => return std::future::pending().await,
        };
        self.shutdown.reached(next).await;
        self.refresh();
    }
}

/// When, within the grace period, sessions are told to close: late enough for ordinary
/// clients to finish, early enough to send what is queued (up to a second before the end).
pub fn closing_after(grace: Duration) -> Duration {
    grace.saturating_sub((grace / 4).min(CLOSE_FLUSH))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_only_advance() {
        let shutdown = Shutdown::new();
        assert_eq!(shutdown.phase(), Phase::Running);
        shutdown.advance(Phase::Closing);
        shutdown.advance(Phase::Stopping);
        assert_eq!(shutdown.phase(), Phase::Closing);
    }

    #[test]
    fn each_signal_escalates_one_phase() {
        let shutdown = Shutdown::new();
        assert_eq!(shutdown.escalate(), Phase::Stopping);
        assert_eq!(shutdown.escalate(), Phase::Closing);
        assert_eq!(shutdown.escalate(), Phase::Aborting);
        assert_eq!(shutdown.escalate(), Phase::Aborting);
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_sees_every_phase_change_once() {
        let shutdown = Shutdown::new();
        let mut watch = shutdown.watch();
        let waiting = tokio::spawn(async move {
            watch.changed().await;
            let first = watch.seen();
            watch.changed().await;
            (first, watch.seen())
        });
        tokio::task::yield_now().await;
        shutdown.advance(Phase::Stopping);
        tokio::task::yield_now().await;
        // Jumping two phases at once is seen as the latest one.
        shutdown.advance(Phase::Aborting);
        assert_eq!(waiting.await.unwrap(), (Phase::Stopping, Phase::Aborting));
    }

    #[test]
    fn a_hand_over_is_a_stop_that_watches_see_with_the_phase() {
        let shutdown = Shutdown::new();
        let mut watch = shutdown.watch();
        assert!(!shutdown.handing_over() && !watch.handing_over());
        shutdown.hand_over();
        // Not seen until the watch has caught up with the phase it came with.
        assert!(!watch.handing_over());
        assert_eq!(watch.refresh(), Phase::Stopping);
        assert!(watch.handing_over());
        // Later phases keep the mark: sessions decide by phase whether they may still suspend.
        shutdown.escalate();
        assert_eq!(watch.refresh(), Phase::Closing);
        assert!(watch.handing_over());
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
