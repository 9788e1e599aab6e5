//! Which inbox seqs this device holds: the last contiguous seq (what a resume starts from, persisted
//! through a [`SeqStore`]), the seqs held above it, and whether a pushed seq left a gap. No I/O.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Where the last contiguous seq of one user's device is kept between sessions (and app restarts).
///
/// Called from the session's task on every advance: keep it cheap (memory, a small file, a row).
pub trait SeqStore: Send + Sync + 'static {
    /// The seq to resume from (0: nothing held yet).
    fn load(&self) -> u64;
    /// The device now holds every message up to `seq`.
    fn save(&self, seq: u64);
}

/// A [`SeqStore`] in memory: the default. Clones share the value, so a test or an app can hand the same
/// store to the next session.
#[derive(Debug, Clone, Default)]
pub struct MemorySeqStore(Arc<AtomicU64>);

impl MemorySeqStore {
    /// A store holding `seq`.
    pub fn new(seq: u64) -> Self {
        MemorySeqStore(Arc::new(AtomicU64::new(seq)))
    }
}

impl SeqStore for MemorySeqStore {
    fn load(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    fn save(&self, seq: u64) {
        self.0.fetch_max(seq, Ordering::SeqCst);
    }
}

/// How many seqs above the oldest remembered one are kept for deduplication.
const RECENT: usize = 4096;

/// The seqs a device holds.
///
/// Seqs are strictly increasing per user but may have holes (a seq allocated for a write that failed),
/// and two sends can commit out of seq order for a few milliseconds. So: a pushed seq that is not the
/// next one is a *gap* (sync from the contiguous seq); a completed sync proves that nothing else is
/// stored up to the last seq it returned, so the contiguous seq jumps there; a message that commits late
/// (inside the ordering window) still arrives by its push and is delivered, because deduplication is by
/// the seqs actually held, not by "below the contiguous seq".
#[derive(Debug, Clone)]
pub struct SeqTracker {
    contiguous: u64,
    /// Seqs at or below this one are treated as held (the resume point, or evicted from `recent`).
    floor: u64,
    recent: BTreeSet<u64>,
}

impl SeqTracker {
    /// A tracker resuming from `contiguous`.
    pub fn new(contiguous: u64) -> Self {
        SeqTracker {
            contiguous,
            floor: contiguous,
            recent: BTreeSet::new(),
        }
    }

    /// The last seq up to which every message is held: where a resume or a sync starts.
    pub fn contiguous(&self) -> u64 {
        self.contiguous
    }

    /// Records `seq` as held; `false` if it already was (a duplicate the app must not see again).
    /// Seq 0 (not an inbox message) is always new.
    pub fn observe(&mut self, seq: u64) -> bool {
        if seq == 0 {
            return true;
        }
        if seq <= self.floor || !self.recent.insert(seq) {
            return false;
        }
        while self.recent.len() > RECENT {
            if let Some(oldest) = self.recent.pop_first() {
                self.floor = self.floor.max(oldest);
            }
        }
        self.advance();
        true
    }

    /// Whether a seq above the contiguous one is held while the next one is not: sync to fill it.
    pub fn has_gap(&self) -> bool {
        self.recent
            .range(self.contiguous.saturating_add(1)..)
            .next()
            .is_some()
    }

    /// A sync completed (its last page had no more): nothing else is stored up to `covered`, the last
    /// seq it returned.
    pub fn sync_complete(&mut self, covered: u64) {
        self.contiguous = self.contiguous.max(covered);
        self.advance();
    }

    fn advance(&mut self) {
        while self.recent.contains(&(self.contiguous + 1)) {
            self.contiguous += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_pushes_advance_without_gap() {
        let mut t = SeqTracker::new(3);
        assert!(t.observe(4));
        assert!(t.observe(5));
        assert_eq!(t.contiguous(), 5);
        assert!(!t.has_gap());
    }

    #[test]
    fn a_skipped_seq_is_a_gap_until_filled() {
        let mut t = SeqTracker::new(0);
        assert!(t.observe(1));
        assert!(t.observe(3));
        assert!(t.has_gap());
        assert_eq!(t.contiguous(), 1);
        assert!(t.observe(2));
        assert_eq!(t.contiguous(), 3);
        assert!(!t.has_gap());
    }

    #[test]
    fn duplicates_are_refused_below_and_above_the_contiguous_seq() {
        let mut t = SeqTracker::new(10);
        assert!(!t.observe(10), "the resume point is held");
        assert!(t.observe(12));
        assert!(!t.observe(12));
        assert!(t.observe(11));
        assert!(!t.observe(11));
        assert_eq!(t.contiguous(), 12);
    }

    #[test]
    fn a_sync_jumps_over_a_hole_and_a_late_commit_is_still_delivered() {
        let mut t = SeqTracker::new(0);
        assert!(t.observe(1));
        assert!(t.observe(3));
        // The sync returned 3 only: 2 is a hole (or still committing).
        t.sync_complete(3);
        assert_eq!(t.contiguous(), 3);
        assert!(!t.has_gap());
        // 2 committed late and is pushed now: new, delivered once.
        assert!(t.observe(2));
        assert!(!t.observe(2));
    }

    #[test]
    fn memory_store_never_moves_back_and_is_shared_by_clones() {
        let s = MemorySeqStore::default();
        let c = s.clone();
        s.save(5);
        s.save(3);
        assert_eq!(c.load(), 5);
    }
}
