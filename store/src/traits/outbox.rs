//! [`OutboxStore`]: events waiting for delivery to the app backend (push events, webhooks), kept
//! durably so a restart resumes them (see docs/ARCHITECTURE.md, "Offline push").

use async_trait::async_trait;
use bytes::Bytes;

use crate::Result;

/// An event to deliver: what the relay POSTs, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    /// Which target the event goes to (`"push"`, `"webhook"`): the relay's routing, opaque here.
    pub topic: String,
    /// The event's idempotency key (the same on every attempt).
    pub key: String,
    /// The body to POST (JSON).
    pub body: Bytes,
}

/// An [`OutboxEvent`] as stored, with its position in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Position: ids grow with every enqueue and are never reused while the store is open.
    pub id: u64,
    /// The event.
    pub event: OutboxEvent,
}

/// A durable queue of events for the embedded (single-process) relay.
///
/// Implemented by the embedded store only. In distributed mode the outbox is the JetStream stream
/// `<PREFIX>_push` (limits, redelivery and the attempt count are the server's), so the Scylla backend
/// has none: nothing in distributed mode calls this trait.
///
/// Use: the logic worker enqueues a stored message's events before it acknowledges the send; the relay
/// reads [`OutboxStore::pending`] (at start from id 0, which resumes what a stop left), delivers, and
/// removes each entry once the target took it (or it was given up on). Delivery is therefore at
/// least once: an event delivered just before a stop, not yet removed, is delivered again after the
/// restart, with the same key.
#[async_trait]
pub trait OutboxStore: Send + Sync + 'static {
    /// Appends `events`, in order, durably (on disk when it returns); returns their ids, ascending.
    ///
    /// # Errors
    /// [`crate::ErrorKind::Unavailable`] when the write failed (nothing was added).
    async fn enqueue(&self, events: &[OutboxEvent]) -> Result<Vec<u64>>;

    /// At most `limit` entries with an id above `after`, by ascending id.
    ///
    /// # Errors
    /// [`crate::ErrorKind::Unavailable`] or [`crate::ErrorKind::Corrupt`] when the read failed.
    async fn pending(&self, after: u64, limit: usize) -> Result<Vec<OutboxEntry>>;

    /// Removes entry `id`; removing an entry that is not there is not an error.
    ///
    /// # Errors
    /// [`crate::ErrorKind::Unavailable`] when the write failed.
    async fn remove(&self, id: u64) -> Result<()>;
}
