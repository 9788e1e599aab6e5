//! Cluster-unique ids.
//!
//! Entity ids (users, devices, groups) stay below 2^53 so JavaScript clients read them exactly from JSON:
//! 40 bits of milliseconds since 2025-01-01 (34 years), 5 bits of node number, 8 bits of sequence
//! (256 ids per millisecond per node). Message ids are full u64: 42 bits of milliseconds, 10 bits of node,
//! 12 bits of sequence.
//!
//! # Node numbers
//! Two generators with the same node number mint the same ids whenever their clocks meet, so a node
//! number must have one minter at a time, cluster-wide. A configured number (`logic.node_id`) is the
//! operator's promise of that. Otherwise each process *leases* one ([`crate::leases`]): one pool of
//! 512 numbers for message ids (the other 512 are for configured `logic.node_id`s), one of 32 for entity ids, in the durable store (Cassandra; the embedded
//! store belongs to one process, which holds its file locked). Redis is not used: it is treated as
//! volatile (it may be flushed), and a lost lease table would hand out numbers still in use.
//!
//! Why it holds:
//! - **Restarts**: a process that dies stops renewing; its lease expires after the TTL and the number
//!   returns to the pool. A restart gets whatever number is free, not necessarily the old one.
//! - **Pause past the lease** (GC, SIGSTOP, VM migration): the holder mints only before its local
//!   deadline, measured on the monotonic clock from *before* the acquire/renew request was sent, minus a
//!   margin; the server's TTL started later than that, so the holder stops minting before anyone else can
//!   take the number. A paused holder wakes up past its deadline and refuses (`UNAVAILABLE`, retryable)
//!   until it has a lease again.
//! - **Clock skew between hosts**: each acquire and renewal records a high-water mark in the lease row,
//!   its wall clock + TTL, which outlives the lease; the holder never mints with a timestamp at or above
//!   it. A new holder of the number starts its timestamps at the recorded high-water, so even a host
//!   whose clock is behind the previous holder's cannot replay an id: it mints on logical time until its
//!   clock catches up.
//! - **Store loss**: losing the lease table (a Cassandra keyspace restored from an old backup) loses the
//!   high-water marks, leaving wall-clock order only; the numbers in use are re-leased within a TTL.
//!   Redis loss does not matter here.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// The largest id a client names in JSON: entity ids, and the room ids clients choose, stay at or
/// below it (2^53 − 1) so JavaScript reads them exactly. user-api, the gateways and the logic workers
/// refuse larger ones.
pub const MAX_ID: i64 = (1 << 53) - 1;

const EPOCH_MS: u64 = 1_735_689_600_000; // 2025-01-01T00:00:00Z

/// Current Unix time in milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[derive(Debug)]
struct State {
    last_ms: u64,
    seq: u64,
    /// `last_ms` is a floor no id was minted at yet.
    fresh: bool,
}

/// A generator of time-ordered ids.
#[derive(Debug)]
pub struct IdGen {
    node: u64,
    node_bits: u32,
    seq_bits: u32,
    state: Mutex<State>,
}

impl IdGen {
    /// Entity ids (< 2^53) for node `node` (taken modulo 32).
    pub fn entities(node: u64) -> Self {
        Self::with_layout(node, 5, 8)
    }

    /// Message ids (u64) for node `node` (taken modulo 1024).
    pub fn messages(node: u64) -> Self {
        Self::with_layout(node, 10, 12)
    }

    fn with_layout(node: u64, node_bits: u32, seq_bits: u32) -> Self {
        IdGen {
            node: node & ((1 << node_bits) - 1),
            node_bits,
            seq_bits,
            state: Mutex::new(State {
                last_ms: 0,
                seq: 0,
                fresh: false,
            }),
        }
    }

    /// A generator whose ids all carry a timestamp at or above `floor_ms` (Unix ms): the high-water mark
    /// of the previous holder of this node number.
    pub fn starting_at(self, floor_ms: i64) -> Self {
        let floor = (floor_ms.max(0) as u64).saturating_sub(EPOCH_MS);
        {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if floor > st.last_ms {
                st.last_ms = floor;
                st.seq = 0;
                st.fresh = true;
            }
        }
        self
    }

    /// The next id whose timestamp is below `ceiling_ms` (Unix ms), or `None` (nothing consumed) when
    /// the next id would be at or above it: a leased generator never mints past its lease's high-water.
    pub fn next_below(&self, ceiling_ms: i64) -> Option<u64> {
        let ceiling = (ceiling_ms.max(0) as u64).saturating_sub(EPOCH_MS);
        self.next_inner(Some(ceiling))
    }

    /// The next id; strictly increasing for this generator.
    pub fn next(&self) -> u64 {
        self.next_inner(None)
            .unwrap_or_else(|| unreachable!("no ceiling"))
    }

    fn next_inner(&self, ceiling: Option<u64>) -> Option<u64> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (last_ms, last_seq) = (st.last_ms, st.seq);
        let mut ms = (now_ms() as u64).saturating_sub(EPOCH_MS);
        if ms <= st.last_ms && st.fresh {
            // The first id at a floor: sequence 0 of the floor's millisecond.
            ms = st.last_ms;
            st.seq = 0;
        } else if ms <= st.last_ms {
            ms = st.last_ms;
            st.seq += 1;
            if st.seq >> self.seq_bits != 0 {
                // Sequence exhausted in this millisecond: borrow the next one.
                ms += 1;
                st.seq = 0;
            }
        } else {
            st.seq = 0;
        }
        if ceiling.is_some_and(|c| ms >= c) {
            st.last_ms = last_ms;
            st.seq = last_seq;
            return None;
        }
        st.fresh = false;
        st.last_ms = ms;
        Some((ms << (self.node_bits + self.seq_bits)) | (self.node << self.seq_bits) | st.seq)
    }

    /// One past the largest timestamp (Unix ms) this generator minted at or was floored to: what a
    /// holder that stopped minting records as its number's high-water when it gives the number back.
    pub fn high_water_ms(&self) -> i64 {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (st.last_ms + EPOCH_MS + 1) as i64
    }

    /// This generator's node number.
    pub fn node(&self) -> u64 {
        self.node
    }

    /// The next id as i64 (entity ids always fit).
    pub fn next_i64(&self) -> i64 {
        self.next() as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_and_entities_fit_javascript() {
        let g = IdGen::entities(3);
        let mut last = 0;
        for _ in 0..10_000 {
            let id = g.next();
            assert!(id > last);
            assert!(id < (1 << 53));
            last = id;
        }
        let m = IdGen::messages(1023);
        let (a, b) = (m.next(), m.next());
        assert!(b > a);
    }

    #[test]
    fn a_floor_in_the_future_is_respected_and_a_ceiling_refuses() {
        let floor = now_ms() + 60_000;
        let g = IdGen::messages(5).starting_at(floor);
        let first = g
            .next_below(floor + 1)
            .expect("the floor's millisecond is below the ceiling");
        let ms_of = |id: u64| (id >> 22) + EPOCH_MS;
        assert_eq!(
            ms_of(first),
            floor as u64,
            "starts at the floor, not the wall clock"
        );
        assert_eq!(first & 0xfff, 0, "sequence 0 at the floor");
        assert_eq!((first >> 12) & 0x3ff, 5, "node number");
        // 4095 more fit in the floor's millisecond; the next would be at the ceiling.
        let mut last = first;
        for _ in 0..4095 {
            let id = g.next_below(floor + 1).expect("same millisecond");
            assert!(id > last);
            last = id;
        }
        assert_eq!(
            g.next_below(floor + 1),
            None,
            "never at or above the ceiling"
        );
        let after = g.next_below(floor + 2).expect("a higher ceiling");
        assert!(after > last, "refusals consume nothing");
        // A generator with a ceiling in the past mints nothing.
        assert_eq!(IdGen::messages(1).next_below(now_ms() - 1_000), None);
    }
}
