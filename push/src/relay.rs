//! The push-relay: takes push events from the JetStream stream ([`run`], a durable pull consumer
//! shared by every replica) or from the embedded store's outbox ([`run_outbox`]) and POSTs each,
//! signed, to the configured URL, with retries, a dead-letter subject and a concurrency limit.
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
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument as _};
use zhibo_bus::subject::{Subject, PUSH_CONSUMER, WEBHOOK_CONSUMER};
use zhibo_store::{OutboxEntry, OutboxStore};
use zhibo_telemetry::metrics::PushMetrics;

use crate::sign::{sign, IDEMPOTENCY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use crate::sink::{ensure_stream, Topic};
use crate::{Error, PushConfig, WebhooksConfig};

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
        Self::to(&config.url, config, metrics)
    }

    /// A deliverer to `url` with `config`'s secret and timeout (webhooks: `webhooks.url`).
    ///
    /// # Errors
    /// [`Error::Http`] when the HTTP client cannot be built.
    pub fn to(url: &str, config: &PushConfig, metrics: PushMetrics) -> Result<Self, Error> {
        let http = crate::http::client(config.timeout())
            .build()
            .map_err(|e| Error::Http(e.to_string()))?;
        Ok(Deliverer {
            http,
            url: url.to_owned(),
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

/// Where each topic's events go: push events to `push.url`, webhook events to `webhooks.url`; a
/// topic whose URL is empty is not delivered.
#[derive(Debug, Clone)]
pub struct Targets {
    push: Option<Deliverer>,
    webhook: Option<Deliverer>,
}

impl Targets {
    /// The targets `config` and `webhooks` configure.
    ///
    /// # Errors
    /// [`Error::Http`] when an HTTP client cannot be built.
    pub fn new(
        config: &PushConfig,
        webhooks: &WebhooksConfig,
        metrics: &PushMetrics,
    ) -> Result<Self, Error> {
        let push = (!config.url.is_empty())
            .then(|| Deliverer::new(config, metrics.clone()))
            .transpose()?;
        let webhook = (webhooks.enabled() && !webhooks.url.is_empty())
            .then(|| Deliverer::to(&webhooks.url, config, metrics.clone()))
            .transpose()?;
        Ok(Targets { push, webhook })
    }

    fn of(&self, topic: Topic) -> Option<&Deliverer> {
        match topic {
            Topic::Push => self.push.as_ref(),
            Topic::Webhook => self.webhook.as_ref(),
        }
    }
}

/// Runs the JetStream relay on `client` until `shutdown`: ensures the stream and a durable consumer
/// per configured target (push events: [`PUSH_CONSUMER`]; webhook events: [`WEBHOOK_CONSUMER`]),
/// then delivers. On shutdown it stops taking events and finishes the attempts in flight (each bounded
/// by `config.timeout_ms`); what it had not acked is redelivered to the next relay.
///
/// # Errors
/// [`Error::JetStream`] when the stream or a consumer cannot be set up; [`Error::Http`] when the HTTP
/// client cannot be built.
pub async fn run(
    client: async_nats::Client,
    config: PushConfig,
    webhooks: WebhooksConfig,
    metrics: PushMetrics,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let js = jetstream::new(client);
    let stream = ensure_stream(&js, &config).await?;
    let targets = Targets::new(&config, &webhooks, &metrics)?;
    let config = Arc::new(config);
    let mut consumers = Vec::new();
    for (topic, name) in [
        (Topic::Push, PUSH_CONSUMER),
        (Topic::Webhook, WEBHOOK_CONSUMER),
    ] {
        let Some(deliverer) = targets.of(topic) else {
            continue;
        };
        let messages = consume(&stream, name, topic, &config).await?;
        info!(url = %deliverer.url, consumer = name, "push-relay consuming");
        consumers.push(deliver_stream(
            messages,
            deliverer.clone(),
            js.clone(),
            config.clone(),
            shutdown.clone(),
        ));
    }
    futures::future::join_all(consumers).await;
    info!("push-relay stopped");
    Ok(())
}

/// The durable consumer `name` of `topic`'s subject, as a message stream.
async fn consume(
    stream: &jetstream::stream::Stream,
    name: &str,
    topic: Topic,
    config: &PushConfig,
) -> Result<pull::Stream, Error> {
    let max_ack_pending = i64::try_from(config.concurrency.saturating_mul(4)).unwrap_or(i64::MAX);
    let consumer = stream
        .get_or_create_consumer::<pull::Config>(
            name,
            pull::Config {
                durable_name: Some(name.into()),
                filter_subject: topic.subject().to_string(),
                ack_policy: AckPolicy::Explicit,
                ack_wait: config.timeout() + Duration::from_secs(5),
                max_ack_pending,
                ..pull::Config::default()
            },
        )
        .await
        .map_err(|e| Error::JetStream(format!("consumer {name}: {e}")))?;
    consumer
        .messages()
        .await
        .map_err(|e| Error::JetStream(format!("consume {name}: {e}")))
}

/// Delivers a consumer's messages until `shutdown`, at most `config.concurrency` at once.
async fn deliver_stream(
    mut messages: pull::Stream,
    deliverer: Deliverer,
    js: jetstream::Context,
    config: Arc<PushConfig>,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(config.concurrency));
    let tracker = TaskTracker::new();
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

/// Entries read from the outbox at once.
const OUTBOX_PAGE: usize = 256;

/// Runs the embedded relay until `shutdown`: delivers what the store's `outbox` holds — first what a
/// previous run left, then new entries as `wake` is notified (by [`crate::sink::OutboxSink`], with
/// `notify_waiters`) — with the same attempts, backoff and concurrency limit as [`run`], and removes
/// each entry once delivered. One delivery loop per topic, each with its own cursor and
/// `push.concurrency` permits (as [`run`]'s consumers), so a failing webhook target never holds up
/// push events. An entry given up on after `max_attempts` is logged, counted as dead-lettered and
/// removed; one whose topic has no configured target (or none known) is logged and removed. At
/// shutdown, entries not delivered yet stay in the outbox for the next start; one delivered but not
/// yet removed is delivered again then (at least once, same key).
///
/// # Errors
/// [`Error::Http`] when the HTTP client cannot be built.
pub async fn run_outbox(
    outbox: Arc<dyn OutboxStore>,
    wake: Arc<Notify>,
    config: PushConfig,
    webhooks: WebhooksConfig,
    metrics: PushMetrics,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let targets = Targets::new(&config, &webhooks, &metrics)?;
    let config = Arc::new(config);
    info!(url = %config.url, "push-relay (embedded outbox) delivering");
    let loops = [Topic::Push, Topic::Webhook].map(|topic| {
        outbox_loop(
            topic,
            targets.of(topic).cloned(),
            outbox.clone(),
            wake.clone(),
            config.clone(),
            shutdown.clone(),
        )
    });
    futures::future::join_all(loops).await;
    Ok(())
}

/// Delivers the outbox entries of `topic` (the push loop also takes entries of unknown topics, to
/// drop them) to `deliverer` (`None`: dropped) until `shutdown`.
async fn outbox_loop(
    topic: Topic,
    deliverer: Option<Deliverer>,
    outbox: Arc<dyn OutboxStore>,
    wake: Arc<Notify>,
    config: Arc<PushConfig>,
    shutdown: CancellationToken,
) {
    let mine = |e: &OutboxEntry| match Topic::parse(&e.event.topic) {
        Some(t) => t == topic,
        None => topic == Topic::Push,
    };
    let permits = Arc::new(Semaphore::new(config.concurrency));
    let tracker = TaskTracker::new();
    let mut cursor = 0;
    let mut page = std::collections::VecDeque::new();
    'relay: loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => p.unwrap_or_else(|_| unreachable!("never closed")),
        };
        let entry: OutboxEntry = loop {
            if let Some(entry) = page.pop_front() {
                break entry;
            }
            // Registered before the read: a wake-up sent during it is not missed.
            let woken = wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            match outbox.pending(cursor, OUTBOX_PAGE).await {
                Ok(entries) if !entries.is_empty() => {
                    cursor = entries.last().map_or(cursor, |e| e.id);
                    page.extend(entries.into_iter().filter(|e| mine(e)));
                }
                Ok(_) => {
                    tokio::select! {
                        _ = shutdown.cancelled() => break 'relay,
                        _ = woken => {}
                    }
                }
                Err(e) => {
                    warn!(error = %e, "push outbox unreadable; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break 'relay,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        let (deliverer, config, stop, outbox) = (
            deliverer.clone(),
            config.clone(),
            shutdown.clone(),
            outbox.clone(),
        );
        tracker.spawn(
            async move {
                let key = entry.event.key.clone();
                let done = match &deliverer {
                    Some(deliverer) => {
                        deliver_with_retries(&key, &entry.event.body, deliverer, &config, &stop)
                            .await
                    }
                    None => {
                        warn!(key, topic = entry.event.topic, "outbox entry with no configured target; dropped");
                        true
                    }
                };
                if done {
                    if let Err(e) = outbox.remove(entry.id).await {
                        warn!(key, error = %e, "delivered event not removed from the outbox; it is sent again after a restart");
                    }
                }
                drop(permit);
            }
            .instrument(tracing::info_span!("push.deliver", topic = topic.as_str())),
        );
    }
    tracker.close();
    tracker.wait().await;
}

/// Attempts `body` until delivered (true), given up after `max_attempts` (true: counted as
/// dead-lettered) or stopped (false: left for the next start).
async fn deliver_with_retries(
    key: &str,
    body: &Bytes,
    deliverer: &Deliverer,
    config: &PushConfig,
    stop: &CancellationToken,
) -> bool {
    let metrics = &deliverer.metrics;
    for attempt in 1..=config.max_attempts {
        let e = match deliverer.attempt(key, body).await {
            Ok(()) => {
                metrics.delivered.inc();
                return true;
            }
            Err(e) => e,
        };
        if attempt == config.max_attempts {
            warn!(key, attempt, error = %e, "push event dead-lettered");
            metrics.dead_lettered.inc();
            return true;
        }
        let delay = config.backoff(attempt);
        info!(key, attempt, error = %e, retry_in_ms = delay.as_millis() as u64, "push delivery failed");
        metrics.retried.inc();
        tokio::select! {
            _ = stop.cancelled() => return false,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use bytes::Bytes;
    use zhibo_testkit::http_answering;

    use super::Deliverer;
    use crate::PushConfig;

    /// A redirect from the receiver is a failed attempt (retried, then dead-lettered), never followed:
    /// once a 302 made the relay GET the new address and count its 200 as delivered, losing the event
    /// (outside audit).
    #[tokio::test]
    async fn a_redirect_is_a_failed_attempt_not_followed() {
        let (target, target_hits) =
            http_answering("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".into()).await;
        for status in [
            "301 Moved Permanently",
            "302 Found",
            "307 Temporary Redirect",
        ] {
            let (url, hits) = http_answering(format!(
                "HTTP/1.1 {status}\r\nlocation: {target}\r\ncontent-length: 0\r\n\r\n"
            ))
            .await;
            let config = PushConfig {
                url: format!("{url}/push"),
                secret: "0123456789abcdef".into(),
                ..PushConfig::default()
            };
            let d = Deliverer::new(&config, Default::default()).expect("deliverer");
            let e = d
                .attempt("k", &Bytes::from_static(b"{}"))
                .await
                .expect_err(status);
            assert!(e.contains(&status[..3]), "{status}: {e}");
            assert_eq!(hits.load(Ordering::SeqCst), 1, "{status}");
        }
        assert_eq!(
            target_hits.load(Ordering::SeqCst),
            0,
            "a redirect was followed"
        );
    }
}
