//! The in-process backend for embedded mode: the same semantics as NATS core (fan-out to subscribers,
//! one member per queue group), exact subjects only, no network.
//!
//! Handler subscriptions ([`Bus::subscribe_handler`], a gateway's user-event subscriptions) are called on the
//! publisher's task: no queue, no task, no memory per subscription beyond the handler. Each stream
//! subscription has a bounded channel (8192 messages). Like NATS core with a slow consumer, a
//! message for a subscriber whose channel is full is dropped (counted, logged), never waited for: waiting
//! could deadlock a task that publishes to a subject it also reads, and would stall every publisher.
//! Gateways drain their subscriptions into per-connection queues without blocking, so this is rare; an IM
//! message dropped here is still stored and reaches the device at its next sync.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

use crate::{Bus, BusMessage, Handler, HandlerSubscription, Result, Subject, Subscription};

const CHANNEL_CAPACITY: usize = 8192;

/// Shared between subscribers (one allocation per publish) and small in the channel's slots, which
/// tokio allocates 32 at a time for every subscription, idle or not.
type Sender = mpsc::Sender<Arc<BusMessage>>;

/// Members of one queue group and the round-robin cursor.
type Group = (Vec<(u64, Sender)>, Arc<AtomicUsize>);

#[derive(Default)]
struct Topic {
    plain: Vec<(u64, Sender)>,
    handlers: Vec<(u64, Handler)>,
    groups: HashMap<String, Group>,
}

impl Topic {
    fn is_empty(&self) -> bool {
        self.plain.is_empty() && self.handlers.is_empty() && self.groups.is_empty()
    }
}

#[derive(Default)]
struct Inner {
    topics: Mutex<HashMap<String, Topic>>,
    next_id: AtomicU64,
    dropped: AtomicU64,
}

/// An in-process [`Bus`]. Clones share the same subjects.
#[derive(Clone, Default)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemoryBus")
    }
}

impl MemoryBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Messages dropped because a subscriber's buffer was full.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// Number of subjects with at least one subscriber (for tests of unsubscription).
    pub fn subject_count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Topic>> {
        self.inner.topics.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(&self, subject: &Subject, group: Option<&str>) -> Subscription {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut topics = self.lock();
            let topic = topics.entry(subject.as_str().to_owned()).or_default();
            match group {
                None => topic.plain.push((id, tx)),
                Some(g) => topic
                    .groups
                    .entry(g.to_owned())
                    .or_default()
                    .0
                    .push((id, tx)),
            }
        }
        let guard = Unsubscribe {
            bus: self.clone(),
            subject: subject.as_str().to_owned(),
            id,
        };
        let stream = futures::stream::unfold((rx, guard), |(mut rx, guard)| async move {
            rx.recv()
                .await
                .map(|m| (Arc::unwrap_or_clone(m), (rx, guard)))
        });
        Subscription::new(stream)
    }

    fn remove(&self, subject: &str, id: u64) {
        let mut topics = self.lock();
        if let Some(topic) = topics.get_mut(subject) {
            topic.plain.retain(|(i, _)| *i != id);
            topic.handlers.retain(|(i, _)| *i != id);
            for (members, _) in topic.groups.values_mut() {
                members.retain(|(i, _)| *i != id);
            }
            topic.groups.retain(|_, (m, _)| !m.is_empty());
            if topic.is_empty() {
                topics.remove(subject);
            }
        }
    }
}

/// Removes the subscription from the bus when its stream is dropped.
struct Unsubscribe {
    bus: MemoryBus,
    subject: String,
    id: u64,
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        self.bus.remove(&self.subject, self.id);
    }
}

#[async_trait]
impl Bus for MemoryBus {
    async fn publish(
        &self,
        subject: &Subject,
        headers: Vec<(String, String)>,
        payload: Bytes,
    ) -> Result<()> {
        let (targets, handlers): (Vec<Sender>, Vec<Handler>) = {
            let topics = self.lock();
            let Some(topic) = topics.get(subject.as_str()) else {
                return Ok(());
            };
            let mut t: Vec<Sender> = topic.plain.iter().map(|(_, s)| s.clone()).collect();
            for (members, next) in topic.groups.values() {
                let i = next.fetch_add(1, Ordering::Relaxed) % members.len();
                t.push(members[i].1.clone());
            }
            (t, topic.handlers.iter().map(|(_, h)| h.clone()).collect())
        };
        let msg = Arc::new(BusMessage {
            subject: subject.as_str().to_owned(),
            payload,
            headers,
        });
        // Outside the lock: a handler may take it again (read the bus, or drop a subscription, e.g.
        // when it releases the last reference to its owner).
        for handler in handlers {
            handler(&msg);
        }
        for tx in targets {
            match tx.try_send(msg.clone()) {
                Ok(()) => {}
                // A closed receiver is a subscription being dropped: like NATS, nobody gets it.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
                // Like a NATS slow consumer: drop rather than wait. Waiting could deadlock a subscriber
                // that publishes to a subject it reads (and stall every publisher behind it).
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.inner.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(subject = %subject, "in-process bus: slow subscriber, message dropped");
                }
            }
        }
        Ok(())
    }

    async fn subscribe(&self, subject: &Subject) -> Result<Subscription> {
        Ok(self.add(subject, None))
    }

    async fn subscribe_handler(
        &self,
        subject: &Subject,
        handler: Handler,
    ) -> Result<HandlerSubscription> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock()
            .entry(subject.as_str().to_owned())
            .or_default()
            .handlers
            .push((id, handler));
        Ok(HandlerSubscription::new(Unsubscribe {
            bus: self.clone(),
            subject: subject.as_str().to_owned(),
            id,
        }))
    }

    async fn queue_subscribe(&self, subject: &Subject, group: &str) -> Result<Subscription> {
        Ok(self.add(subject, Some(group)))
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn is_connected(&self) -> bool {
        true
    }
}
