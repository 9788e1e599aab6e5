//! In-memory limiters keyed by string. [`SlidingWindow`] counts attempts (sign-ups and device
//! registrations per client address); [`FailureBackoff`] counts failures and backs off (sign-in per
//! username + address and per address), so nobody can lock another user out by failing on purpose.
//!
//! Each key keeps the instants of its attempts inside the window, at most `limit` of them, so a key costs
//! `limit` × 16 bytes and the answer is exact: no burst of 2 × limit across a fixed-window boundary. Keys
//! whose attempts have all left the window are swept whenever the map doubles, so memory follows the
//! number of keys active in the last window. The limit is per process: N replicas allow N × limit.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Attempts allowed per key within a window.
#[derive(Debug)]
pub(crate) struct SlidingWindow {
    limit: usize,
    window: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    keys: HashMap<String, VecDeque<Instant>>,
    /// Sweep expired keys when the map grows past this.
    sweep_at: usize,
}

const MIN_SWEEP: usize = 1024;

impl SlidingWindow {
    /// At most `limit` attempts per key in any `window`.
    pub(crate) fn new(limit: u32, window: Duration) -> Self {
        SlidingWindow {
            limit: limit.max(1) as usize,
            window,
            state: Mutex::new(State {
                keys: HashMap::new(),
                sweep_at: MIN_SWEEP,
            }),
        }
    }

    /// Records an attempt at `now` under each of `keys` if every key allows it; a refused attempt is
    /// recorded under none, so it does not use up another key's budget.
    ///
    /// # Errors
    /// How long until the attempt would be allowed (the longest wait among the refusing keys).
    pub(crate) fn check_all(&self, keys: &[&str], now: Instant) -> Result<(), Duration> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut wait = Duration::ZERO;
        for key in keys {
            if let Some(log) = st.keys.get_mut(*key) {
                expire(log, now, self.window);
                if log.len() >= self.limit {
                    let oldest = log.front().copied().unwrap_or(now);
                    wait = wait.max((oldest + self.window).saturating_duration_since(now));
                }
            }
        }
        if !wait.is_zero() {
            return Err(wait);
        }
        for key in keys {
            let log = st.keys.entry((*key).to_owned()).or_default();
            log.push_back(now);
            if log.len() > self.limit {
                log.pop_front();
            }
        }
        if st.keys.len() >= st.sweep_at {
            let window = self.window;
            st.keys.retain(|_, log| {
                expire(log, now, window);
                !log.is_empty()
            });
            st.sweep_at = (st.keys.len() * 2).max(MIN_SWEEP);
        }
        Ok(())
    }
}

/// Failed attempts per key, with a growing refusal window once a key has failed `free` times: that
/// failure blocks the key for `base`, the next for 2 × `base`, … up to `max`. A key forgets its failures after
/// `forget` without one, and a success clears it. An attempt is counted as a failure when it starts
/// ([`FailureBackoff::begin`]) and forgiven on success, so a burst of concurrent attempts cannot all pass
/// the check before the first failure is recorded.
#[derive(Debug)]
pub(crate) struct FailureBackoff {
    free: u32,
    base: Duration,
    max: Duration,
    forget: Duration,
    state: Mutex<BackoffState>,
}

#[derive(Debug, Default)]
struct BackoffState {
    keys: HashMap<String, Failures>,
    sweep_at: usize,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
    blocked_until: Instant,
}

impl FailureBackoff {
    /// `free` failures per key before refusals start; refusal windows from `base`, doubling, up to `max`.
    pub(crate) fn new(free: u32, base: Duration, max: Duration) -> Self {
        FailureBackoff {
            free: free.max(1),
            base,
            max,
            forget: (max * 2).max(Duration::from_secs(600)),
            state: Mutex::new(BackoffState {
                keys: HashMap::new(),
                sweep_at: MIN_SWEEP,
            }),
        }
    }

    /// Starts an attempt under `keys`: refused while any key is blocked, otherwise counted as a failure
    /// under every key until [`FailureBackoff::succeeded`] forgives it.
    ///
    /// # Errors
    /// How long until the attempt would be allowed (the longest block among `keys`).
    pub(crate) fn begin(&self, keys: &[&str], now: Instant) -> Result<(), Duration> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let wait = keys
            .iter()
            .filter_map(|k| st.keys.get(*k))
            .map(|f| f.blocked_until.saturating_duration_since(now))
            .max()
            .unwrap_or_default();
        if !wait.is_zero() {
            return Err(wait);
        }
        for key in keys {
            let f = st.keys.entry((*key).to_owned()).or_insert(Failures {
                count: 0,
                last: now,
                blocked_until: now,
            });
            if now.saturating_duration_since(f.last) >= self.forget {
                f.count = 0;
            }
            f.count = f.count.saturating_add(1);
            f.last = now;
            if f.count >= self.free {
                let doublings = (f.count - self.free).min(20);
                f.blocked_until = now + (self.base * (1u32 << doublings)).min(self.max);
            }
        }
        if st.keys.len() >= st.sweep_at {
            let forget = self.forget;
            st.keys.retain(|_, f| {
                now.saturating_duration_since(f.last) < forget || f.blocked_until > now
            });
            st.sweep_at = (st.keys.len() * 2).max(MIN_SWEEP);
        }
        Ok(())
    }

    /// The attempt begun under these keys succeeded: `clear` keys forget every failure, `forgive` keys
    /// only this attempt (e.g. the address, which other usernames may have failed from).
    pub(crate) fn succeeded(&self, clear: &[&str], forgive: &[&str]) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for key in clear {
            st.keys.remove(*key);
        }
        for key in forgive {
            if let Some(f) = st.keys.get_mut(*key) {
                f.count = f.count.saturating_sub(1);
                if f.count == 0 {
                    // Nothing left to remember: the key costs no memory.
                    st.keys.remove(*key);
                } else if f.count < self.free {
                    f.blocked_until = f.last;
                }
            }
        }
    }
}

fn expire(log: &mut VecDeque<Instant>, now: Instant, window: Duration) {
    while log
        .front()
        .is_some_and(|t| now.saturating_duration_since(*t) >= window)
    {
        log.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl SlidingWindow {
        fn check(&self, key: &str, now: Instant) -> Result<(), Duration> {
            self.check_all(&[key], now)
        }
    }

    #[test]
    fn allows_limit_per_window_then_slides() {
        let rl = SlidingWindow::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..3 {
            assert_eq!(rl.check("ann", t0 + Duration::from_secs(i * 10)), Ok(()));
        }
        // The 4th at t=30 s waits until the first leaves the window at t=60 s.
        assert_eq!(
            rl.check("ann", t0 + Duration::from_secs(30)),
            Err(Duration::from_secs(30))
        );
        assert_eq!(
            rl.check("bob", t0 + Duration::from_secs(30)),
            Ok(()),
            "keys are independent"
        );
        assert_eq!(rl.check("ann", t0 + Duration::from_secs(60)), Ok(()));
        assert_eq!(
            rl.check("ann", t0 + Duration::from_secs(61)),
            Err(Duration::from_secs(9))
        );
    }

    #[test]
    fn refused_attempt_charges_no_key() {
        let rl = SlidingWindow::new(1, Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(rl.check_all(&["ip", "ann"], t0), Ok(()));
        // "bob" from the same IP is refused by the IP key and must not be charged.
        assert!(rl.check_all(&["ip", "bob"], t0).is_err());
        assert_eq!(rl.check("bob", t0), Ok(()));
    }

    #[test]
    fn backoff_counts_failures_and_grows() {
        let rl = FailureBackoff::new(2, Duration::from_secs(1), Duration::from_secs(4));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(rl.begin(&["k"], at(0)), Ok(()));
        // The second failure is allowed but blocks for 1 s, the next ones 2 s, 4 s, 4 s (capped).
        assert_eq!(rl.begin(&["k"], at(0)), Ok(()));
        assert_eq!(rl.begin(&["k"], at(0)), Err(Duration::from_secs(1)));
        assert_eq!(rl.begin(&["k"], at(1)), Ok(()));
        assert_eq!(rl.begin(&["k"], at(2)), Err(Duration::from_secs(1)));
        assert_eq!(rl.begin(&["k"], at(3)), Ok(()));
        assert_eq!(rl.begin(&["k"], at(3)), Err(Duration::from_secs(4)));
        assert_eq!(rl.begin(&["k"], at(7)), Ok(()));
        assert_eq!(rl.begin(&["k"], at(7)), Err(Duration::from_secs(4)));
        assert_eq!(rl.begin(&["other"], at(7)), Ok(()), "keys are independent");
        // A success clears the key.
        rl.succeeded(&["k"], &[]);
        assert_eq!(rl.begin(&["k"], at(7)), Ok(()));
        // Failures are forgotten after a quiet period.
        let quiet = at(7) + rl.forget;
        for _ in 0..2 {
            assert_eq!(rl.begin(&["other"], quiet), Ok(()));
        }
    }

    #[test]
    fn backoff_forgives_one_attempt() {
        let rl = FailureBackoff::new(2, Duration::from_secs(5), Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(rl.begin(&["ip"], t0), Ok(()));
        // The second attempt reaches the limit, but succeeds: the address is not blocked by it.
        assert_eq!(rl.begin(&["ip"], t0), Ok(()));
        rl.succeeded(&[], &["ip"]);
        assert_eq!(rl.begin(&["ip"], t0), Ok(()));
        assert_eq!(rl.begin(&["ip"], t0), Err(Duration::from_secs(5)));
    }

    #[test]
    fn sweeps_idle_keys() {
        let rl = SlidingWindow::new(1, Duration::from_secs(1));
        let t0 = Instant::now();
        for i in 0..MIN_SWEEP - 1 {
            rl.check(&i.to_string(), t0).expect("fresh key");
        }
        rl.check("late", t0 + Duration::from_secs(2))
            .expect("fresh key");
        let st = rl.state.lock().expect("lock");
        assert!(st.keys.len() < MIN_SWEEP, "{} keys kept", st.keys.len());
    }
}
