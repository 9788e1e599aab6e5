//! A connection's outbound IM queue: bounded, filled by the hub (many senders, never waiting), drained
//! by the connection's task (one receiver), and holding no memory while it is empty.
//!
//! Every signed-in connection has one, mostly idle. A tokio `mpsc` channel costs ~1 KB up front (a
//! cache-padded channel and a first block of 32 slots); this is a mutex over a `VecDeque` that
//! allocates on the first push and is released when a burst has drained, plus a [`Notify`]: ~120 bytes
//! when empty.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::Notify;
use zhibo_proto::client::Packet;

/// What the hub asks a connection to write. Boxed: a queued item is small, and the queue's buffer is
/// sized in items.
#[derive(Debug)]
pub enum Outbound {
    /// A packet to write.
    Packet(Box<Packet>),
    /// A reply to one of this connection's requests (counted to let in-flight requests finish on drain).
    Reply(Box<Packet>),
    /// Write this packet, then close (kick).
    Close(Box<Packet>),
    /// An encoded frame shared by many connections (a cluster-wide broadcast). Dropped, never closing
    /// the connection, when the queue is full.
    Encoded(Box<Bytes>),
}

/// Slots kept after a burst has drained; a larger buffer is released.
const KEEP: usize = 16;

struct Shared<T> {
    items: Mutex<VecDeque<T>>,
    capacity: usize,
    ready: Notify,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, VecDeque<T>> {
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A queue of at most `capacity` items.
pub fn queue<T>(capacity: usize) -> (QueueSender<T>, QueueReceiver<T>) {
    let shared = Arc::new(Shared {
        items: Mutex::new(VecDeque::new()),
        capacity,
        ready: Notify::new(),
    });
    (QueueSender(shared.clone()), QueueReceiver(shared))
}

/// The sending side; clones share the queue.
pub struct QueueSender<T>(Arc<Shared<T>>);

impl<T> Clone for QueueSender<T> {
    fn clone(&self) -> Self {
        QueueSender(self.0.clone())
    }
}

impl<T> std::fmt::Debug for QueueSender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueSender")
            .field("capacity", &self.0.capacity)
            .finish()
    }
}

impl<T> QueueSender<T> {
    /// Queues `item`, or gives it back when the queue is full. Never waits.
    ///
    /// # Errors
    /// The item, when `capacity` items are queued already.
    pub fn try_send(&self, item: T) -> Result<(), T> {
        self.try_send_below(item, self.0.capacity)
    }

    /// Queues `item` only while fewer than `limit` items are queued (for droppable traffic that must
    /// leave room for what may not be dropped).
    ///
    /// # Errors
    /// The item, when `limit` (or `capacity`) items are queued already.
    pub fn try_send_below(&self, item: T, limit: usize) -> Result<(), T> {
        {
            let mut items = self.0.lock();
            if items.len() >= limit.min(self.0.capacity) {
                return Err(item);
            }
            items.push_back(item);
        }
        self.0.ready.notify_one();
        Ok(())
    }

    /// Most items the queue holds.
    pub fn capacity(&self) -> usize {
        self.0.capacity
    }
}

/// The receiving side.
pub struct QueueReceiver<T>(Arc<Shared<T>>);

impl<T> std::fmt::Debug for QueueReceiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QueueReceiver")
    }
}

impl<T> QueueReceiver<T> {
    /// The oldest queued item, if any.
    pub fn try_recv(&mut self) -> Option<T> {
        let mut items = self.0.lock();
        let item = items.pop_front();
        if items.is_empty() && items.capacity() > KEEP {
            *items = VecDeque::new();
        }
        item
    }

    /// The oldest item, waiting for one. Cancel-safe: an item is taken only when it is returned.
    pub async fn recv(&mut self) -> T {
        loop {
            if let Some(item) = self.try_recv() {
                return item;
            }
            // A push between the check and here leaves a permit, so this returns at once.
            self.0.ready.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn bounded_fifo_that_refuses_when_full() {
        let (tx, mut rx) = queue(3);
        for i in 0..3 {
            tx.try_send(i).expect("room");
        }
        assert_eq!(tx.try_send(3), Err(3), "a full queue gives the item back");
        assert_eq!(rx.recv().await, 0);
        tx.clone().try_send(4).expect("room again");
        let got: Vec<i32> = std::iter::from_fn(|| rx.try_recv()).collect();
        assert_eq!(got, [1, 2, 4]);
        assert_eq!(rx.try_recv(), None);
    }

    #[tokio::test]
    async fn droppable_items_leave_room_for_the_rest() {
        let (tx, mut rx) = queue(4);
        tx.try_send_below("room", 2).expect("below the limit");
        tx.try_send_below("room", 2).expect("below the limit");
        assert_eq!(tx.try_send_below("room", 2), Err("room"), "limit reached");
        tx.try_send("im")
            .expect("the rest of the capacity stays for IM");
        tx.try_send("im")
            .expect("the rest of the capacity stays for IM");
        assert_eq!(tx.try_send("im"), Err("im"), "full");
        assert_eq!(rx.recv().await, "room");
    }

    #[tokio::test]
    async fn recv_wakes_on_a_send_from_another_task() {
        let (tx, mut rx) = queue(8);
        let mut recv = std::pin::pin!(rx.recv());
        assert!(futures::poll!(&mut recv).is_pending(), "nothing queued yet");
        tokio::spawn(async move { tx.try_send("hello") })
            .await
            .expect("sender")
            .expect("room");
        let got = tokio::time::timeout(Duration::from_secs(5), recv)
            .await
            .expect("woken by the send");
        assert_eq!(got, "hello");
    }

    #[tokio::test]
    async fn a_cancelled_recv_loses_nothing() {
        let (tx, mut rx) = queue(8);
        // Cancelled while waiting (as in a select! whose other branch won).
        {
            let mut recv = std::pin::pin!(rx.recv());
            assert!(futures::poll!(&mut recv).is_pending());
        }
        tx.try_send(1).expect("room");
        tx.try_send(2).expect("room");
        assert_eq!(rx.recv().await, 1);
        assert_eq!(rx.recv().await, 2);
    }

    #[test]
    fn a_drained_burst_gives_its_memory_back() {
        let (tx, mut rx) = queue(1024);
        for i in 0..500 {
            tx.try_send(i).expect("room");
        }
        while rx.try_recv().is_some() {}
        assert!(
            rx.0.lock().capacity() <= KEEP,
            "the burst's buffer was kept"
        );
    }
}
