//! Node-number leases: the pools, a lease, and the [`NodeLeases`] store that hands them out. The
//! generator that mints under a lease is [`crate::leases::LeasedIds`].

use std::time::Duration;

use async_trait::async_trait;

use crate::ids::IdGen;
#[cfg(doc)]
use crate::ErrorKind;
use crate::Result;

/// A pool of node numbers, one per id layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Pool {
    /// Message ids: 10-bit node numbers, of which the lower half (0..512) is leased; the upper half
    /// (512..1024) is left to operators who configure `logic.node_id`, so a configured number can never
    /// be handed to a leasing process.
    Messages,
    /// Entity ids (users, devices, groups): 5-bit node numbers (0..32).
    Entities,
}

impl Pool {
    /// How many node numbers the pool has.
    pub fn size(self) -> u32 {
        match self {
            Pool::Messages => 512,
            Pool::Entities => 32,
        }
    }

    /// The pool's name in the lease table.
    pub fn name(self) -> &'static str {
        match self {
            Pool::Messages => "messages",
            Pool::Entities => "entities",
        }
    }

    pub(crate) fn generator(self, node: u32) -> IdGen {
        match self {
            Pool::Messages => IdGen::messages(u64::from(node)),
            Pool::Entities => IdGen::entities(u64::from(node)),
        }
    }
}

/// A node number held by one owner until its TTL runs out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The pool.
    pub pool: Pool,
    /// The node number.
    pub node: u32,
    /// The holder (unique per holder: a new one for every [`LeasedIds`]).
    pub owner: String,
    /// The previous holders' high-water (Unix ms): this holder's ids must carry timestamps at or above.
    pub floor_ms: i64,
    /// This holder's high-water as recorded by the last acquire or renewal (Unix ms): it never mints at
    /// or above it.
    pub ceiling_ms: i64,
}

/// Leases of node numbers, in the durable store.
#[async_trait]
pub trait NodeLeases: Send + Sync {
    /// Claims a node number of `pool` that no one holds, for `owner`, for `ttl`. The lease's floor is the
    /// number's recorded high-water (0 if none); its ceiling, recorded as the new high-water, is
    /// `max(now_ms, floor) + ttl` (`now_ms`: the claimant's wall clock), so a claimant whose clock is
    /// behind the previous holder's still has a range to mint in.
    ///
    /// # Errors
    /// [`ErrorKind::Conflict`] when every number of the pool is held; [`ErrorKind::Unavailable`] on
    /// backend failure (the claim may then have been taken: it expires after `ttl`).
    async fn acquire(&self, pool: Pool, owner: &str, ttl: Duration, now_ms: i64) -> Result<Lease>;
    /// Extends `lease` by `ttl` from now and records `high_water_ms` as its high-water (the caller never
    /// passes less than its lease's ceiling).
    ///
    /// # Errors
    /// [`ErrorKind::Conflict`] when `lease.owner` no longer holds the number (it expired, someone else may
    /// hold it); [`ErrorKind::Unavailable`] on backend failure.
    async fn renew(&self, lease: &Lease, ttl: Duration, high_water_ms: i64) -> Result<()>;
    /// Gives the number back, recording `high_water_ms` (one past the largest timestamp the holder
    /// minted with; it has stopped minting) so the next holder starts there rather than at the lease's
    /// ceiling, up to a TTL ahead of the clock. Does nothing if `lease.owner` no longer holds it.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure (the lease then expires on its own).
    async fn release(&self, lease: &Lease, high_water_ms: i64) -> Result<()>;
}
