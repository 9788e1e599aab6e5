//! # Layout
//! - [`subject`]: every NATS subject, built in one place.
//! - [`route`]: events for a user's devices, published to the gateways presence names for the user.
//! - [`Bus`]: publish / subscribe / queue-subscribe, as `Arc<dyn Bus>`, with two backends:
//!   [`nats::NatsBus`] (distributed) and [`memory::MemoryBus`] (embedded, one process).
//!
//! Payloads are the prost-encoded envelopes of `zhibo_proto::bus`; the bus never looks inside them.
#![warn(missing_docs)]

pub mod memory;
pub mod nats;
pub mod route;
pub mod subject;

use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{Stream, StreamExt};
pub use subject::Subject;

/// A bus failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Publishing failed (connection lost, buffer full).
    #[error("publish to {subject} failed: {message}")]
    Publish {
        /// Target subject.
        subject: String,
        /// Cause.
        message: String,
    },
    /// Subscribing failed.
    #[error("subscribe to {subject} failed: {message}")]
    Subscribe {
        /// Target subject.
        subject: String,
        /// Cause.
        message: String,
    },
    /// Connecting to the bus failed.
    #[error("connect failed: {0}")]
    Connect(String),
}

/// Bus result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A message received from the bus.
#[derive(Debug, Clone)]
pub struct BusMessage {
    /// The subject it was published to.
    pub subject: String,
    /// The payload, untouched.
    pub payload: Bytes,
    /// Headers (e.g. W3C trace context), possibly empty.
    pub headers: Vec<(String, String)>,
}

/// A live subscription; dropping it unsubscribes.
pub struct Subscription {
    inner: Pin<Box<dyn Stream<Item = BusMessage> + Send>>,
}

impl Subscription {
    /// Wraps a stream of messages.
    pub fn new(stream: impl Stream<Item = BusMessage> + Send + 'static) -> Self {
        Subscription {
            inner: Box::pin(stream),
        }
    }

    /// The next message, or `None` once the subscription has ended.
    pub async fn next(&mut self) -> Option<BusMessage> {
        self.inner.next().await
    }
}

impl Stream for Subscription {
    type Item = BusMessage;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<BusMessage>> {
        self.inner.as_mut().poll_next(cx)
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Subscription")
    }
}

/// Called with each message of a [`Bus::subscribe_handler`] subscription. It runs on the publisher's
/// task (in-process bus) or on the subscription's task (NATS), so it must not block or wait.
pub type Handler = Arc<dyn Fn(&BusMessage) + Send + Sync>;

/// A live handler subscription; dropping it unsubscribes. A publish already under way may still call
/// the handler once after the drop.
pub struct HandlerSubscription {
    _guard: Box<dyn Send + Sync>,
}

impl HandlerSubscription {
    /// Ends the subscription when `guard` is dropped.
    pub fn new(guard: impl Send + Sync + 'static) -> Self {
        HandlerSubscription {
            _guard: Box::new(guard),
        }
    }
}

impl std::fmt::Debug for HandlerSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HandlerSubscription")
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Publish/subscribe between zhibo processes.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Publishes `payload` with `headers` to `subject` (fire and forget; at most once).
    ///
    /// # Errors
    /// [`Error::Publish`] when the bus refuses it.
    async fn publish(
        &self,
        subject: &Subject,
        headers: Vec<(String, String)>,
        payload: Bytes,
    ) -> Result<()>;

    /// Every message published to `subject` from now on.
    ///
    /// # Errors
    /// [`Error::Subscribe`] when the bus refuses it.
    async fn subscribe(&self, subject: &Subject) -> Result<Subscription>;

    /// Every message published to `subject` from now on, handed to `handler` instead of a stream. The
    /// default reads a [`Bus::subscribe`] stream on a task of its own; the in-process bus calls the
    /// handler directly, with no queue and no task per subscription.
    ///
    /// # Errors
    /// [`Error::Subscribe`] when the bus refuses it.
    async fn subscribe_handler(
        &self,
        subject: &Subject,
        handler: Handler,
    ) -> Result<HandlerSubscription> {
        let mut sub = self.subscribe(subject).await?;
        let task = tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                handler(&m);
            }
        });
        Ok(HandlerSubscription::new(AbortOnDrop(task.abort_handle())))
    }

    /// Each message published to `subject` goes to one member of `group`.
    ///
    /// # Errors
    /// [`Error::Subscribe`] when the bus refuses it.
    async fn queue_subscribe(&self, subject: &Subject, group: &str) -> Result<Subscription>;

    /// Waits until everything published so far has been handed to the server.
    ///
    /// # Errors
    /// [`Error::Publish`] when the connection fails meanwhile.
    async fn flush(&self) -> Result<()>;

    /// Whether the bus is connected (readiness).
    fn is_connected(&self) -> bool;

    /// The NATS connection under this bus, for JetStream (push events); `None` for the in-process bus.
    fn nats_client(&self) -> Option<async_nats::Client> {
        None
    }
}
