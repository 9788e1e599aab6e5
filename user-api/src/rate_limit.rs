//! [`SlidingWindow`]: an in-memory sliding-window-log rate limiter keyed by string (sign-in attempts per
//! username and per IP).
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
