//! Progress of a long load or save, shown where the operator looks: a bar on a terminal
//! (stderr is a tty), `STATUS=` under systemd (`NOTIFY_SOCKET`, with `EXTEND_TIMEOUT_USEC` so a
//! big image does not run into the start timeout), log lines every 10 % otherwise.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

use crate::config::format_size;

/// Operations quicker than this show no progress at all.
const QUIET: Duration = Duration::from_secs(1);
/// How often a bar is redrawn at most.
const REDRAW: Duration = Duration::from_millis(100);
/// How long systemd is asked to wait past each status update.
const EXTEND_USEC: u32 = 30_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Bar,
    Systemd,
    Log,
}

/// One operation's progress; see the module documentation.
#[derive(Debug)]
pub struct Progress {
    what: String,
    mode: Mode,
    /// The last percentage shown.
    shown: Option<u64>,
    drawn: Option<Instant>,
    started: Instant,
}

impl Progress {
    /// `what` names the operation ("loading image /var/lib/ramnbd/disk.img").
    pub fn new(what: String) -> Self {
        let mode = if std::io::stderr().is_terminal() {
            Mode::Bar
        } else if std::env::var_os("NOTIFY_SOCKET").is_some() {
            Mode::Systemd
        } else {
            Mode::Log
        };
        Self {
            what,
            mode,
            shown: None,
            drawn: None,
            started: Instant::now(),
        }
    }

    pub fn update(&mut self, done: u64, total: u64) {
        if self.started.elapsed() < QUIET {
            return;
        }
        let percent = (done * 100).checked_div(total).unwrap_or(100);
        match self.mode {
            Mode::Bar => {
                let due = self.drawn.is_none_or(|at| at.elapsed() >= REDRAW);
                if !due && percent != 100 {
                    return;
                }
                self.drawn = Some(Instant::now());
                let filled = (percent / 4) as usize;
                let mut stderr = std::io::stderr().lock();
                let _ = write!(
                    stderr,
                    "\r{}: [{}{}] {percent:3}% {} of {}",
                    self.what,
                    "#".repeat(filled),
                    " ".repeat(25 - filled),
                    format_mib(done),
                    format_mib(total),
                );
                let _ = stderr.flush();
            }
            Mode::Systemd => {
                if self.shown == Some(percent) {
                    return;
                }
                let status = format!("{} {percent}%", self.what);
                let _ = sd_notify::notify(&[
                    NotifyState::Status(&status),
                    NotifyState::ExtendTimeoutUsec(EXTEND_USEC),
                ]);
            }
            Mode::Log => {
                let step = percent / 10 * 10;
                if self.shown.is_some_and(|shown| shown / 10 * 10 == step) {
                    return;
                }
                tracing::info!(
                    "{}: {step}% ({} of {})",
                    self.what,
                    format_mib(done),
                    format_mib(total)
                );
            }
        }
        self.shown = Some(percent);
    }

    /// Ends the bar's line.
    pub fn finish(&mut self) {
        if self.mode == Mode::Bar && self.drawn.is_some() {
            let _ = writeln!(std::io::stderr());
        }
    }
}

/// A byte count in MiB with one decimal, or the exact size below 1 MiB.
pub fn format_mib(bytes: u64) -> String {
    if bytes < 1 << 20 {
        format_size(bytes)
    } else {
        format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
    }
}
