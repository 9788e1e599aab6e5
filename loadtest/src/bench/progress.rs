//! Shared counters and the live progress line on stderr.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Counters every task of a scenario bumps.
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests sent.
    pub sent: AtomicU64,
    /// Successful answers.
    pub acked: AtomicU64,
    /// Messages received.
    pub delivered: AtomicU64,
    /// Failures.
    pub errors: AtomicU64,
    /// Open connections.
    pub connected: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot {
    /// Requests sent.
    pub sent: u64,
    /// Successful answers.
    pub acked: u64,
    /// Messages received.
    pub delivered: u64,
    /// Failures.
    pub errors: u64,
    /// Open connections.
    pub connected: u64,
}

impl Counters {
    /// Reads all counters.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            sent: self.sent.load(Ordering::Relaxed),
            acked: self.acked.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            connected: self.connected.load(Ordering::Relaxed),
        }
    }
}

impl Snapshot {
    /// `self - earlier`, counter by counter (`connected` is kept as is).
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        Snapshot {
            sent: self.sent - earlier.sent,
            acked: self.acked - earlier.acked,
            delivered: self.delivered - earlier.delivered,
            errors: self.errors - earlier.errors,
            connected: self.connected,
        }
    }
}

/// Prints a progress line every second until dropped: a rewritten line on a terminal, one line per
/// 5 s otherwise (logs stay short).
#[derive(Debug)]
pub struct Progress {
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    /// Starts printing `label` with `counters` and, if given, the gateway's RSS.
    pub fn start(
        label: String,
        counters: Arc<Counters>,
        rss: impl Fn() -> u64 + Send + 'static,
    ) -> Self {
        let task = tokio::spawn(async move {
            let tty = std::io::stderr().is_terminal();
            let start = Instant::now();
            let mut last = counters.snapshot();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let mut n = 0u64;
            loop {
                tick.tick().await;
                n += 1;
                let now = counters.snapshot();
                let d = now.since(&last);
                last = now;
                let line = format!(
                    "[{label} {:>4}s] conns {:>6} | sent {:>9} ({:>7}/s) | acked {:>9} ({:>7}/s) | delivered {:>10} ({:>8}/s) | errors {} | rss {} MiB",
                    start.elapsed().as_secs(),
                    now.connected,
                    now.sent,
                    d.sent,
                    now.acked,
                    d.acked,
                    now.delivered,
                    d.delivered,
                    now.errors,
                    rss() / 1024,
                );
                let mut err = std::io::stderr().lock();
                if tty {
                    let _ = write!(err, "\r{line}\x1b[K");
                } else if n.is_multiple_of(5) {
                    let _ = writeln!(err, "{line}");
                }
                let _ = err.flush();
            }
        });
        Progress { task }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.task.abort();
        if std::io::stderr().is_terminal() {
            eprintln!();
        }
    }
}
