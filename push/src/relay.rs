//! The push-relay: takes push events from the JetStream stream ([`run`], a durable pull consumer
//! shared by every replica) or from the embedded queue ([`run_memory`]) and POSTs each, signed, to the
//! configured URL, with retries, a dead-letter subject and a concurrency limit.
//!
//! JetStream: an event is acked only after a 2xx; otherwise it is nak'ed with the backoff delay
//! (exponential with jitter), and the server redelivers it then. The attempt number is the server's
//! delivery count, so it survives a relay restart. After `max_attempts` failures the event is
//! published to `<prefix>.push.dead` (same stream, not consumed) and terminated. An event whose
//! relay died mid-attempt is redelivered after the ack wait (timeout + 5 s).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy, AckKind};
use bytes::Bytes;
use futures::StreamExt as _;
use serde::Deserialize;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument as _};
use zhibo_bus::subject::{Subject, PUSH_CONSUMER};
use zhibo_telemetry::metrics::PushMetrics;

use crate::sign::{sign, IDEMPOTENCY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use crate::sink::ensure_stream;
use crate::{Error, PushConfig, PushEvent};

/// Makes one signed POST of an event: the delivery attempt shared by both relays.
#[derive(Debug, Clone)]
pub struct Deliverer {
    http: reqwest::Client,
    url: String,
    secret: Arc<[u8]>,
    metrics: PushMetrics,
}

impl Deliverer {
    /// A deliverer to `config.url`, signing with `config.secret`.
    ///
    /// # Errors
    /// [`Error::Http`] when the HTTP client cannot be built.
    pub fn new(config: &PushConfig, metrics: PushMetrics) -> Result<Self, Error> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout())
            .build()
            .map_err(|e| Error::Http(e.to_string()))?;
        Ok(Deliverer {
            http,
            url: config.url.clone(),
            secret: config.secret.as_bytes().into(),
            metrics,
        })
    }

    /// POSTs `body` (the event's JSON) once, signed now.
    ///
    /// # Errors
    /// Why the attempt failed (connection, timeout, non-2xx status), for the log.
    pub async fn attempt(&self, key: &str, body: &Bytes) -> Result<(), String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let started = Instant::now();
        let answer = self
            .http
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(TIMESTAMP_HEADER, now.to_string())
            .header(SIGNATURE_HEADER, sign(&self.secret, now, body))
            .header(IDEMPOTENCY_HEADER, key)
            .body(body.clone())
            .send()
            .await;
        self.metrics
            .delivery_seconds
            .observe(started.elapsed().as_secs_f64());
        match answer {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("HTTP {}", r.status())),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Only the key of an event body, when its header is missing.
#[derive(Deserialize)]
struct KeyOnly {
    idempotency_key: String,
}

/// Runs the JetStream relay on `client` until `shutdown`: ensures the stream and the durable consumer,
/// then delivers. On shutdown it stops taking events and finishes the attempts in flight (each bounded
/// by `config.timeout_ms`); what it had not acked is redelivered to the next relay.
///
/// # Errors
/// [`Error::JetStream`] when the stream or the consumer cannot be set up; [`Error::Http`] when the HTTP
/// client cannot be built.
pub async fn run(
    client: async_nats::Client,
    config: PushConfig,
    metrics: PushMetrics,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let js = jetstream::new(client);
    let stream = ensure_stream(&js, &config).await?;
    let max_ack_pending = i64::try_from(config.concurrency.saturating_mul(4)).unwrap_or(i64::MAX);
    let consumer = stream
        .get_or_create_consumer::<pull::Config>(
            PUSH_CONSUMER,
            pull::Config {
                durable_name: Some(PUSH_CONSUMER.into()),
                filter_subject: Subject::push_events().to_string(),
                ack_policy: AckPolicy::Explicit,
                ack_wait: config.timeout() + Duration::from_secs(5),
                max_ack_pending,
                ..pull::Config::default()
            },
        )
        .await
        .map_err(|e| Error::JetStream(format!("consumer {PUSH_CONSUMER}: {e}")))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| Error::JetStream(format!("consume: {e}")))?;
    let deliverer = Deliverer::new(&config, metrics.clone())?;
    let permits = Arc::new(Semaphore::new(config.concurrency));
    let tracker = TaskTracker::new();
    let config = Arc::new(config);
    info!(url = %config.url, "push-relay consuming");
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => p.unwrap_or_else(|_| unreachable!("never closed")),
        };
        let next = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = messages.next() => m,
        };
        let message = match next {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                warn!(error = %e, "push stream read failed");
                continue;
            }
            None => break,
        };
        let (deliverer, js, config) = (deliverer.clone(), js.clone(), config.clone());
        tracker.spawn(
            async move {
                handle(message, &deliverer, &js, &config).await;
                drop(permit);
            }
            .instrument(tracing::info_span!("push.deliver")),
        );
    }
    tracker.close();
    tracker.wait().await;
    info!("push-relay stopped");
    Ok(())
}

/// One delivery attempt of a stream message, then ack, nak with backoff, or dead-letter.
async fn handle(
    message: jetstream::Message,
    deliverer: &Deliverer,
    js: &jetstream::Context,
    config: &PushConfig,
) {
    let attempt = message
        .info()
        .map_or(1, |i| u32::try_from(i.delivered).unwrap_or(u32::MAX));
    let key = message
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Msg-Id"))
        .map(|v| v.as_str().to_owned())
        .or_else(|| {
            serde_json::from_slice::<KeyOnly>(&message.payload)
                .ok()
                .map(|k| k.idempotency_key)
        })
        .unwrap_or_default();
    let metrics = &deliverer.metrics;
    let outcome = deliverer.attempt(&key, &message.payload).await;
    let ack = match outcome {
        Ok(()) => {
            metrics.delivered.inc();
            message.ack().await
        }
        Err(e) if attempt >= config.max_attempts => {
            warn!(key, attempt, error = %e, "push event dead-lettered");
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Zhibo-Last-Error", e.as_str());
            match js
                .publish_with_headers(
                    Subject::push_dead_letters().to_string(),
                    headers,
                    message.payload.clone(),
                )
                .await
            {
                Ok(ack) => {
                    if let Err(e) = ack.await {
                        warn!(key, error = %e, "dead letter not stored");
                    }
                }
                Err(e) => warn!(key, error = %e, "dead letter not published"),
            }
            metrics.dead_lettered.inc();
            message.ack_with(AckKind::Term).await
        }
        Err(e) => {
            let delay = config.backoff(attempt);
            info!(key, attempt, error = %e, retry_in_ms = delay.as_millis() as u64, "push delivery failed");
            metrics.retried.inc();
            message.ack_with(AckKind::Nak(Some(delay))).await
        }
    };
    if let Err(e) = ack {
        // The server redelivers after the ack wait.
        warn!(key, error = %e, "push ack failed");
    }
}

/// Runs the embedded relay until `shutdown`: the same delivery, retries (with the same backoff) and
/// limit over the in-process queue. Events given up on are logged and counted as dead-lettered. What
/// is queued or being retried at shutdown is lost (embedded mode keeps no outbox).
///
/// # Errors
/// [`Error::Http`] when the HTTP client cannot be built.
pub async fn run_memory(
    mut events: mpsc::Receiver<PushEvent>,
    config: PushConfig,
    metrics: PushMetrics,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let deliverer = Deliverer::new(&config, metrics)?;
    let permits = Arc::new(Semaphore::new(config.concurrency));
    let tracker = TaskTracker::new();
    let config = Arc::new(config);
    info!(url = %config.url, "push-relay (embedded) delivering");
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => p.unwrap_or_else(|_| unreachable!("never closed")),
        };
        let event = tokio::select! {
            _ = shutdown.cancelled() => break,
            e = events.recv() => e,
        };
        let Some(event) = event else { break };
        let (deliverer, config, stop) = (deliverer.clone(), config.clone(), shutdown.clone());
        tracker.spawn(
            async move {
                deliver_with_retries(&event, &deliverer, &config, &stop).await;
                drop(permit);
            }
            .instrument(tracing::info_span!("push.deliver")),
        );
    }
    tracker.close();
    tracker.wait().await;
    Ok(())
}

async fn deliver_with_retries(
    event: &PushEvent,
    deliverer: &Deliverer,
    config: &PushConfig,
    stop: &CancellationToken,
) {
    let body = match serde_json::to_vec(event) {
        Ok(b) => Bytes::from(b),
        Err(e) => {
            warn!(error = %e, "push event not encodable");
            return;
        }
    };
    let key = &event.idempotency_key;
    let metrics = &deliverer.metrics;
    for attempt in 1..=config.max_attempts {
        let e = match deliverer.attempt(key, &body).await {
            Ok(()) => {
                metrics.delivered.inc();
                return;
            }
            Err(e) => e,
        };
        if attempt == config.max_attempts {
            warn!(key, attempt, error = %e, "push event dead-lettered");
            metrics.dead_lettered.inc();
            return;
        }
        metrics.retried.inc();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(config.backoff(attempt)) => {}
        }
    }
}
