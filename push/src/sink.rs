//! Publishing push events without ever holding up a send: [`PushSink`] queues an event and returns;
//! [`JetStreamSink`] publishes the queue to the JetStream stream, [`MemorySink`] hands it to the
//! in-process relay (embedded mode).

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
use zhibo_telemetry::metrics::{KindLabel, PushMetrics};

use crate::{Error, PushConfig, PushEvent};

/// Acks awaited at once by one publisher task.
const MAX_IN_FLIGHT: usize = 256;

/// Where a logic worker hands push events.
pub trait PushSink: Send + Sync + 'static {
    /// Queues `event` for delivery; never waits. What the queue cannot hold is dropped and counted.
    fn publish(&self, event: &PushEvent);
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
    tx: mpsc::Sender<(String, Bytes)>,
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

impl PushSink for JetStreamSink {
    fn publish(&self, event: &PushEvent) {
        let body = match serde_json::to_vec(event) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                warn!(error = %e, "push event not encodable");
                return;
            }
        };
        self.pending.fetch_add(1, Ordering::AcqRel);
        if self
            .tx
            .try_send((event.idempotency_key.clone(), body))
            .is_err()
        {
            settle(&self.pending, &self.settled);
            self.metrics
                .publish_failures
                .get_or_create(&KindLabel { kind: "queue_full" })
                .inc();
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
    mut rx: mpsc::Receiver<(String, Bytes)>,
    metrics: PushMetrics,
    pending: Arc<AtomicUsize>,
    settled: Arc<Notify>,
) {
    let subject = Subject::push_events().to_string();
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
                let Some((key, body)) = next else { break };
                let publish = Publish::build().payload(body).message_id(&key);
                match js.send_publish(subject.clone(), publish).await {
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

/// Embedded mode: events go to the in-process relay ([`crate::relay::run_memory`]) through a bounded
/// queue. Lost at a restart (documented in docs/ARCHITECTURE.md).
#[derive(Debug)]
pub struct MemorySink {
    tx: mpsc::Sender<PushEvent>,
    metrics: PushMetrics,
}

impl MemorySink {
    /// A sink and the queue's receiving end, for [`crate::relay::run_memory`].
    pub fn new(
        config: &PushConfig,
        metrics: PushMetrics,
    ) -> (Arc<Self>, mpsc::Receiver<PushEvent>) {
        let (tx, rx) = mpsc::channel(config.publish_queue);
        (Arc::new(MemorySink { tx, metrics }), rx)
    }
}

impl PushSink for MemorySink {
    fn publish(&self, event: &PushEvent) {
        if self.tx.try_send(event.clone()).is_ok() {
            self.metrics.published.inc();
        } else {
            self.metrics
                .publish_failures
                .get_or_create(&KindLabel { kind: "queue_full" })
                .inc();
        }
    }
}
