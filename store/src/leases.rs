//! Node-number leases: [`LeasedIds`], an id generator that mints only while it holds a lease from a
//! [`NodeLeases`] store (the trait and its records are in `traits/leases.rs`, re-exported here). The
//! reasoning (restarts, pauses, clock skew, store loss) is in [`crate::ids`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tracing::{info, warn, Instrument};

use crate::ids::{now_ms, IdGen};
pub use crate::traits::leases::{Lease, NodeLeases, Pool};
use crate::{Error, ErrorKind, Result};

/// Timing of a [`LeasedIds`].
#[derive(Debug, Clone, Copy)]
pub struct LeaseTiming {
    /// Lease time to live in the store.
    pub ttl: Duration,
    /// Renew this often (well under `ttl`).
    pub renew_every: Duration,
    /// Stop minting this long before the lease's local deadline (the store's TTL started later).
    pub margin: Duration,
    /// How long [`LeasedIds::next`] waits for a lease before refusing.
    pub wait: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        LeaseTiming {
            ttl: Duration::from_secs(30),
            renew_every: Duration::from_secs(5),
            margin: Duration::from_secs(5),
            wait: Duration::from_secs(3),
        }
    }
}

/// What is minted with while a lease is held.
struct Held {
    gen: IdGen,
    /// Monotonic: no id once this passes.
    deadline: Instant,
    /// Wall clock (Unix ms): no id at or above it.
    ceiling_ms: i64,
}

struct Shared {
    held: Mutex<Option<Held>>,
    /// Bumped whenever a lease is (re)gained, to wake waiting minters.
    gained: watch::Sender<u64>,
    wait: Duration,
    pool: Pool,
}

/// An id generator that mints only under a lease of its node number, renewed in the background.
///
/// Dropping it stops the renewals and releases the lease.
pub struct LeasedIds {
    shared: Arc<Shared>,
    /// Dropped or fired: the holder task stops and releases.
    stop: Mutex<Option<oneshot::Sender<()>>>,
    /// Fires once the holder task has released its lease.
    released: Mutex<Option<oneshot::Receiver<()>>>,
}

impl std::fmt::Debug for LeasedIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeasedIds")
            .field("pool", &self.shared.pool)
            .field("node", &self.node())
            .finish_non_exhaustive()
    }
}

impl LeasedIds {
    /// Starts leasing a node number of `pool` from `leases` in the background (needs a tokio runtime).
    pub fn start(leases: Arc<dyn NodeLeases>, pool: Pool, timing: LeaseTiming) -> Self {
        let (gained, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            held: Mutex::new(None),
            gained,
            wait: timing.wait,
            pool,
        });
        let (stop, stopped) = oneshot::channel();
        let (done, released) = oneshot::channel();
        let owner = format!(
            "{}-{:016x}",
            std::process::id(),
            rand::random::<u64>() ^ now_ms() as u64
        );
        let span = tracing::info_span!("node_lease", pool = pool.name(), %owner);
        let shared_task = shared.clone();
        tokio::spawn(
            async move {
                hold(leases, shared_task, owner, timing, stopped).await;
                let _ = done.send(());
            }
            .instrument(span),
        );
        LeasedIds {
            shared,
            stop: Mutex::new(Some(stop)),
            released: Mutex::new(Some(released)),
        }
    }

    /// Stops minting and gives the lease back now (at shutdown), rather than when dropped; waits for the
    /// release (bound the wait: with the store down it lasts until the store's own timeout).
    pub async fn release(&self) {
        drop(self.stop.lock().unwrap_or_else(|p| p.into_inner()).take());
        let released = self
            .released
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(r) = released {
            let _ = r.await;
        }
    }

    /// The node number currently held, if any.
    pub fn node(&self) -> Option<u64> {
        self.lock().as_ref().map(|h| h.gen.node())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Held>> {
        self.shared.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a lease is held and still valid now: [`Self::next`] answers without waiting (a
    /// replica's readiness).
    pub fn holds_lease(&self) -> bool {
        self.lock()
            .as_ref()
            .is_some_and(|h| Instant::now() < h.deadline && now_ms() < h.ceiling_ms)
    }

    /// An id now, if the lease is valid.
    pub fn try_next(&self) -> Option<u64> {
        let held = self.lock();
        let h = held.as_ref()?;
        if Instant::now() >= h.deadline {
            return None;
        }
        h.gen.next_below(h.ceiling_ms)
    }

    /// The next id, waiting (a few seconds at most) for a lease to be acquired or renewed.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] when no valid lease is held in time: retrying later may work.
    pub async fn next(&self) -> Result<u64> {
        // The hot path: a valid lease, no waiting.
        if let Some(id) = self.try_next() {
            return Ok(id);
        }
        let mut gained = self.shared.gained.subscribe();
        let until = Instant::now() + self.shared.wait;
        loop {
            if let Some(id) = self.try_next() {
                return Ok(id);
            }
            // Woken by a new lease, or polled: a renewal may restore the deadline without a new lease.
            let poll = (Instant::now() + Duration::from_millis(50)).min(until);
            if Instant::now() >= until {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    format!("no {} node lease held", self.shared.pool.name()),
                ));
            }
            let _ = tokio::time::timeout_at(poll, gained.changed()).await;
        }
    }
}

/// Counts one more failed try and logs the first of a run, then one in 20 (every ~10 s); true when it
/// logged.
fn retry_failed(failures: &mut u32, what: &str, e: &Error) -> bool {
    *failures += 1;
    let log = *failures == 1 || failures.is_multiple_of(20);
    if log {
        warn!(error = %e, failures = *failures, "{what}; retrying every 0.5 s");
    }
    log
}

/// The holder task: acquire, renew, re-acquire when lost, release at the end.
async fn hold(
    leases: Arc<dyn NodeLeases>,
    shared: Arc<Shared>,
    owner: String,
    timing: LeaseTiming,
    mut stop: oneshot::Receiver<()>,
) {
    let lock = |s: &Shared| {
        s.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|h| h.ceiling_ms)
    };
    let mut lease: Option<Lease> = None;
    let mut gained = 0u64;
    // Consecutive failed tries: a store outage retries every 0.5 s, but logs the first failure and
    // then one line in 20 (every ~10 s), not two lines a second.
    let mut failures = 0u32;
    loop {
        let ttl = timing.ttl;
        // Measured before the request: the store's TTL starts later than this.
        let sent = Instant::now();
        let now = now_ms();
        let high_water = now + ttl.as_millis() as i64;
        let next_try = match &lease {
            None => match leases.acquire(shared.pool, &owner, ttl, now).await {
                Ok(l) => {
                    failures = 0;
                    info!(node = l.node, floor_ms = l.floor_ms, "node lease acquired");
                    let gen = shared.pool.generator(l.node).starting_at(l.floor_ms);
                    *shared.held.lock().unwrap_or_else(|p| p.into_inner()) = Some(Held {
                        gen,
                        deadline: sent + ttl.saturating_sub(timing.margin),
                        ceiling_ms: l.ceiling_ms,
                    });
                    lease = Some(l);
                    gained += 1;
                    shared.gained.send_replace(gained);
                    timing.renew_every
                }
                Err(e) => {
                    retry_failed(&mut failures, "node lease not acquired", &e);
                    Duration::from_millis(500)
                }
            },
            Some(l) => {
                let raised = high_water.max(lock(&shared).unwrap_or(high_water));
                match leases.renew(l, ttl, raised).await {
                    Ok(()) => {
                        if failures > 0 {
                            info!(node = l.node, failures, "node lease renewed again");
                            failures = 0;
                        }
                        if let Some(h) = shared
                            .held
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .as_mut()
                        {
                            h.deadline = sent + ttl.saturating_sub(timing.margin);
                            h.ceiling_ms = raised;
                        }
                        if let Some(l) = lease.as_mut() {
                            l.ceiling_ms = raised;
                        }
                        gained += 1;
                        shared.gained.send_replace(gained);
                        timing.renew_every
                    }
                    Err(e) if e.kind == ErrorKind::Conflict => {
                        // Expired in the store: someone may hold the number now. Stop minting with it.
                        warn!(node = l.node, "node lease lost; acquiring a new one");
                        *shared.held.lock().unwrap_or_else(|p| p.into_inner()) = None;
                        lease = None;
                        Duration::ZERO
                    }
                    Err(e) => {
                        // Keep minting until the local deadline; retry soon.
                        retry_failed(&mut failures, "node lease renewal failed", &e);
                        Duration::from_millis(500)
                    }
                }
            }
        };
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(next_try) => {}
        }
    }
    // Stop minting first; then the high-water is what was actually minted.
    let stopped_at = shared
        .held
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .map(|h| h.gen.high_water_ms());
    if let (Some(l), Some(high_water)) = (lease, stopped_at) {
        if let Err(e) = leases.release(&l, high_water).await {
            warn!(error = %e, "node lease not released; it expires on its own");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::retry_failed;
    use crate::{Error, ErrorKind};

    #[test]
    fn a_store_outage_logs_the_first_failure_then_one_in_twenty() {
        let e = Error::new(ErrorKind::Unavailable, "down");
        let mut failures = 0;
        let logged: Vec<u32> = (1..=60)
            .filter(|_| retry_failed(&mut failures, "renewal", &e))
            .collect();
        assert_eq!(logged, [1, 20, 40, 60]);
    }
}
