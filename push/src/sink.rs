//! Handing events ([`Outgoing`]: push events, webhook events) to the relay: [`PushSink`].
//! [`JetStreamSink`] queues them for the JetStream stream and returns at once (distributed);
//! [`OutboxSink`] writes them to the embedded store's durable outbox and returns once they are on
//! disk, then wakes the in-process relay ([`crate::relay::run_outbox`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, context::Publish, stream};
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt as _;
use tokio::sync::{mpsc, Notify};
use tracing::{warn, Instrument as _};
use zhibo_bus::subject::{push_stream, Subject};
use zhibo_store::{OutboxEvent, OutboxStore};
use zhibo_telemetry::metrics::{KindLabel, PushMetrics};

use crate::{Error, PushConfig, PushEvent};

/// Acks awaited at once by one publisher task.
const MAX_IN_FLIGHT: usize = 256;

/// Which target an event goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Topic {
    /// An offline push event, POSTed to `push.url`.
    Push,
    /// A webhook event, POSTed to `webhooks.url`.
    Webhook,
}

impl Topic {
    /// The name stored in the outbox.
    pub fn as_str(self) -> &'static str {
        match self {
            Topic::Push => "push",
            Topic::Webhook => "webhook",
        }
    }

    /// The topic named `name` in the outbox.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "push" => Some(Topic::Push),
            "webhook" => Some(Topic::Webhook),
            _ => None,
        }
    }

    /// The stream subject of the topic's events.
    pub fn subject(self) -> Subject {
        match self {
            Topic::Push => Subject::push_events(),
            Topic::Webhook => Subject::webhook_events(),
        }
    }
}

/// One event for the relay: its target, idempotency key and JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Where it goes.
    pub topic: Topic,
    /// The same on every attempt and redelivery.
    pub key: String,
    /// The JSON POSTed.
    pub body: Bytes,
}

impl Outgoing {
    /// A push event, encoded.
    ///
    /// # Errors
    /// When the event cannot be encoded (never, for a [`PushEvent`]).
    pub fn push(event: &PushEvent) -> Result<Self, serde_json::Error> {
        Ok(Outgoing {
            topic: Topic::Push,
            key: event.idempotency_key.clone(),
            body: Bytes::from(serde_json::to_vec(event)?),
        })
    }
}

/// Where logic workers (and, for webhooks, gateways and user-api) hand events.
#[async_trait::async_trait]
pub trait PushSink: Send + Sync + 'static {
    /// Hands `events` over for delivery. [`JetStreamSink`] queues them and never waits (what the
    /// queue cannot hold is dropped and counted); [`OutboxSink`] returns once they are durable.
    async fn publish(&self, events: Vec<Outgoing>);
}

/// Creates the push stream, or updates its limits to `config`'s (every role that publishes or
/// consumes calls it at start).
///
/// # Errors
/// [`Error::JetStream`] when JetStream refuses (not enabled on the server, conflicting stream).
pub async fn ensure_stream(
    js: &jetstream::Context,
    config: &PushConfig,
) -> Result<stream::Stream, Error> {
    let stream_config = stream::Config {
        name: push_stream(),
        subjects: vec![
            Subject::push_events().to_string(),
            Subject::push_dead_letters().to_string(),
            Subject::webhook_events().to_string(),
        ],
        max_age: Duration::from_secs(config.stream_max_age_secs),
        max_bytes: config.stream_max_bytes,
        discard: stream::DiscardPolicy::Old,
        storage: stream::StorageType::File,
        // Resends of a message publish its events again: the stream drops them by message id.
        duplicate_window: Duration::from_secs(120),
        ..stream::Config::default()
    };
    js.create_or_update_stream(stream_config)
        .await
        .map_err(|e| Error::JetStream(format!("create or update stream {}: {e}", push_stream())))?;
    js.get_stream(push_stream())
        .await
        .map_err(|e| Error::JetStream(format!("get stream {}: {e}", push_stream())))
}

/// Publishes push events to the JetStream stream from a bounded queue, acks awaited concurrently.
/// Each event's idempotency key is its `Nats-Msg-Id`, so a resend's repeat inside the stream's
/// duplicate window (2 min) is stored once.
pub struct JetStreamSink {
    tx: mpsc::Sender<Outgoing>,
    metrics: PushMetrics,
    /// Events queued and not yet acknowledged (or failed).
    pending: Arc<AtomicUsize>,
    settled: Arc<Notify>,
}

impl std::fmt::Debug for JetStreamSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamSink")
            .field("pending", &self.pending.load(Ordering::Relaxed))
            .finish()
    }
}

impl JetStreamSink {
    /// Ensures the stream and starts the publishing task on `client`.
    ///
    /// # Errors
    /// As [`ensure_stream`].
    pub async fn start(
        client: async_nats::Client,
        config: &PushConfig,
        metrics: PushMetrics,
    ) -> Result<Arc<Self>, Error> {
        let js = jetstream::new(client);
        ensure_stream(&js, config).await?;
        let (tx, rx) = mpsc::channel(config.publish_queue);
        let pending = Arc::new(AtomicUsize::new(0));
        let settled = Arc::new(Notify::new());
        tokio::spawn(
            publish_loop(js, rx, metrics.clone(), pending.clone(), settled.clone())
                .instrument(tracing::info_span!("push.publisher")),
        );
        Ok(Arc::new(JetStreamSink {
            tx,
            metrics,
            pending,
            settled,
        }))
    }

    /// Waits until every event queued so far is acknowledged by the stream or has failed (at
    /// shutdown, after the last send).
    pub async fn flush(&self) {
        loop {
            let settled = self.settled.notified();
            if self.pending.load(Ordering::Acquire) == 0 {
                return;
            }
            settled.await;
        }
    }
}

#[async_trait::async_trait]
impl PushSink for JetStreamSink {
    async fn publish(&self, events: Vec<Outgoing>) {
        for event in events {
            self.pending.fetch_add(1, Ordering::AcqRel);
            if self.tx.try_send(event).is_err() {
                settle(&self.pending, &self.settled);
                self.metrics
                    .publish_failures
                    .get_or_create(&KindLabel { kind: "queue_full" })
                    .inc();
            }
        }
    }
}

fn settle(pending: &AtomicUsize, settled: &Notify) {
    if pending.fetch_sub(1, Ordering::AcqRel) == 1 {
        settled.notify_waiters();
    }
}

async fn publish_loop(
    js: jetstream::Context,
    mut rx: mpsc::Receiver<Outgoing>,
    metrics: PushMetrics,
    pending: Arc<AtomicUsize>,
    settled: Arc<Notify>,
) {
    let (push_subject, webhook_subject) = (
        Subject::push_events().to_string(),
        Subject::webhook_events().to_string(),
    );
    let mut acks = FuturesUnordered::new();
    let failed = |kind: &'static str| {
        metrics
            .publish_failures
            .get_or_create(&KindLabel { kind })
            .inc();
    };
    loop {
        tokio::select! {
            next = rx.recv(), if acks.len() < MAX_IN_FLIGHT => {
                let Some(Outgoing { topic, key, body }) = next else { break };
                let publish = Publish::build().payload(body).message_id(&key);
                let subject = match topic {
                    Topic::Push => push_subject.clone(),
                    Topic::Webhook => webhook_subject.clone(),
                };
                match js.send_publish(subject, publish).await {
                    Ok(ack) => acks.push(std::future::IntoFuture::into_future(ack)),
                    Err(e) => {
                        warn!(key, error = %e, "push event publish failed");
                        failed("publish");
                        settle(&pending, &settled);
                    }
                }
            }
            Some(ack) = acks.next(), if !acks.is_empty() => {
                match ack {
                    Ok(_) => {
                        metrics.published.inc();
                    }
                    Err(e) => {
                        warn!(error = %e, "push event not acknowledged by the stream");
                        failed("publish");
                    }
                }
                settle(&pending, &settled);
            }
        }
    }
    while let Some(ack) = acks.next().await {
        if ack.is_ok() {
            metrics.published.inc();
        } else {
            failed("publish");
        }
        settle(&pending, &settled);
    }
}

/// Embedded mode: events are written to the store's durable outbox (before the send they are about is
/// acknowledged), then the in-process relay ([`crate::relay::run_outbox`]) is woken. An event the
/// outbox refused (a store failure) is dropped and counted (`publish_failures{kind="outbox"}`).
pub struct OutboxSink {
    outbox: Arc<dyn OutboxStore>,
    wake: Arc<Notify>,
    metrics: PushMetrics,
}

impl std::fmt::Debug for OutboxSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxSink").finish_non_exhaustive()
    }
}

impl OutboxSink {
    /// A sink writing to `outbox` and waking `wake` (the relay's) after each write.
    pub fn new(outbox: Arc<dyn OutboxStore>, wake: Arc<Notify>, metrics: PushMetrics) -> Arc<Self> {
        Arc::new(OutboxSink {
            outbox,
            wake,
            metrics,
        })
    }
}

#[async_trait::async_trait]
impl PushSink for OutboxSink {
    async fn publish(&self, events: Vec<Outgoing>) {
        if events.is_empty() {
            return;
        }
        let n = events.len() as u64;
        let events: Vec<OutboxEvent> = events
            .into_iter()
            .map(|e| OutboxEvent {
                topic: e.topic.as_str().to_owned(),
                key: e.key,
                body: e.body,
            })
            .collect();
        match self.outbox.enqueue(&events).await {
            Ok(_) => {
                self.metrics.published.inc_by(n);
                // Every delivery loop (one per topic) reads on.
                self.wake.notify_waiters();
            }
            Err(e) => {
                warn!(error = %e, "push events not written to the outbox");
                self.metrics
                    .publish_failures
                    .get_or_create(&KindLabel { kind: "outbox" })
                    .inc_by(n);
            }
        }
    }
}
