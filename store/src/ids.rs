//! Cluster-unique ids without coordination.
//!
//! Entity ids (users, devices, groups) stay below 2^53 so JavaScript clients read them exactly from JSON:
//! 40 bits of milliseconds since 2025-01-01 (34 years), 5 bits of node id, 8 bits of sequence
//! (256 ids per millisecond per node). Message ids are full u64: 42 bits of milliseconds, 10 bits of node,
//! 12 bits of sequence. The node id comes from configuration, or at random when unset, which makes a clash
//! possible only for two nodes drawing the same number inside the same millisecond and sequence.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

const EPOCH_MS: u64 = 1_735_689_600_000; // 2025-01-01T00:00:00Z

/// Current Unix time in milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Debug)]
struct State {
    last_ms: u64,
    seq: u64,
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
            state: Mutex::new(State { last_ms: 0, seq: 0 }),
        }
    }

    /// The next id; strictly increasing for this generator.
    pub fn next(&self) -> u64 {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut ms = (now_ms() as u64).saturating_sub(EPOCH_MS);
        if ms <= st.last_ms {
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
        st.last_ms = ms;
        (ms << (self.node_bits + self.seq_bits)) | (self.node << self.seq_bits) | st.seq
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
}
