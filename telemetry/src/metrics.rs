//! Prometheus metrics (prometheus-client), one [`Metrics`] per process, shared as `Arc<Metrics>`.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// A label set with one `transport` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabel {
    /// `tcp`, `ws` or `quic`.
    pub transport: &'static str,
}

/// A label set with one `kind` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// What the sample is about.
    pub kind: &'static str,
}

/// Every metric zhibo exports. Cheap to update: atomics behind each handle.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Open connections by transport.
    pub connections: Family<TransportLabel, Gauge>,
    /// Completed sign-ins by transport.
    pub sign_ins: Family<TransportLabel, Counter>,
    /// Refused sign-ins, by reason kind.
    pub sign_in_failures: Family<KindLabel, Counter>,
    /// Frames read from clients.
    pub frames_in: Counter,
    /// Frames written to clients.
    pub frames_out: Counter,
    /// Messages accepted (stored and ACKed) by logic workers.
    pub messages_sent: Counter,
    /// Message deliveries published to recipients (one per recipient user).
    pub messages_delivered: Counter,
    /// Time from a logic worker taking a send to its ACK being published, seconds.
    pub send_ack_seconds: Histogram,
    /// The same for a new 1:1 or group message, by stage (`kind`): `authorize` (the claim or
    /// dedup read and the authorization), `allocate` (id, seqs, the claim with its plan), `store` (the
    /// CQL or redb writes), `deliver` (presence, push events, publishing the deliveries).
    pub send_stage_seconds: Family<KindLabel, Histogram, fn() -> Histogram>,
    /// Bus (NATS) errors, by operation.
    pub bus_errors: Family<KindLabel, Counter>,
    /// Store errors.
    pub store_errors: Counter,
    /// Live-room viewers on this gateway.
    pub room_viewers: Gauge,
    /// Packets dropped or connections closed because an outbound queue was full, by kind.
    pub queue_drops: Family<KindLabel, Counter>,
    /// Live-room messages left out of frames by sampling above a room's display rate, by class
    /// (`chat`; once per room per gateway).
    pub room_sampled: Family<KindLabel, Counter>,
    /// Live-room message deliveries dropped for slow viewers, by class (`high`, `chat`, `like`).
    pub room_dropped: Family<KindLabel, Counter>,
    /// Live-room likes merged into frame counts.
    pub room_likes_merged: Counter,
    /// Offline push events and webhooks (logic worker: published; push-relay: delivered).
    pub push: PushMetrics,
}

/// Push metrics: the publishing side (logic workers) and the delivering side (push-relay).
#[derive(Debug, Clone)]
pub struct PushMetrics {
    /// Push events handed to the stream (or the embedded queue).
    pub published: Counter,
    /// Push events not published, by kind (`queue_full`, `publish`, `presence`: presence unreadable,
    /// everyone treated as offline).
    pub publish_failures: Family<KindLabel, Counter>,
    /// Offline recipients not pushed because they muted the conversation.
    pub skipped_muted: Counter,
    /// Events delivered (2xx from the target).
    pub delivered: Counter,
    /// Failed attempts that will be retried.
    pub retried: Counter,
    /// Events given up on after the last attempt (sent to the dead-letter subject).
    pub dead_lettered: Counter,
    /// Time of one delivery attempt (HTTP request to answer), seconds.
    pub delivery_seconds: Histogram,
}

impl Default for PushMetrics {
    fn default() -> Self {
        PushMetrics {
            published: Counter::default(),
            publish_failures: Family::default(),
            skipped_muted: Counter::default(),
            delivered: Counter::default(),
            retried: Counter::default(),
            dead_lettered: Counter::default(),
            delivery_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
        }
    }
}

impl PushMetrics {
    fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("push");
        r.register("published", "Push events published", self.published.clone());
        r.register(
            "publish_failures",
            "Push events not published, by kind",
            self.publish_failures.clone(),
        );
        r.register(
            "skipped_muted",
            "Offline recipients not pushed: the conversation is muted",
            self.skipped_muted.clone(),
        );
        r.register("delivered", "Push events delivered", self.delivered.clone());
        r.register(
            "retried",
            "Push delivery attempts to retry",
            self.retried.clone(),
        );
        r.register(
            "dead_lettered",
            "Push events given up on after the last attempt",
            self.dead_lettered.clone(),
        );
        r.register(
            "delivery_seconds",
            "Push delivery attempt latency",
            self.delivery_seconds.clone(),
        );
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered under the `zhibo_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("zhibo");
        let m = Metrics {
            connections: Family::default(),
            sign_ins: Family::default(),
            sign_in_failures: Family::default(),
            frames_in: Counter::default(),
            frames_out: Counter::default(),
            messages_sent: Counter::default(),
            messages_delivered: Counter::default(),
            send_ack_seconds: Histogram::new(exponential_buckets(0.000_25, 2.0, 16)),
            send_stage_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
            }),
            bus_errors: Family::default(),
            store_errors: Counter::default(),
            room_viewers: Gauge::default(),
            queue_drops: Family::default(),
            push: PushMetrics::default(),
            room_sampled: Family::default(),
            room_dropped: Family::default(),
            room_likes_merged: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "connections",
            "Open client connections",
            m.connections.clone(),
        );
        registry.register("sign_ins", "Completed sign-ins", m.sign_ins.clone());
        registry.register(
            "sign_in_failures",
            "Refused sign-ins",
            m.sign_in_failures.clone(),
        );
        registry.register("frames_in", "Frames read from clients", m.frames_in.clone());
        registry.register(
            "frames_out",
            "Frames written to clients",
            m.frames_out.clone(),
        );
        registry.register(
            "messages_sent",
            "Messages stored and acknowledged",
            m.messages_sent.clone(),
        );
        registry.register(
            "messages_delivered",
            "Deliveries published to recipient users",
            m.messages_delivered.clone(),
        );
        registry.register(
            "send_ack_seconds",
            "Logic-worker time from taking a send to publishing its ACK",
            m.send_ack_seconds.clone(),
        );
        registry.register(
            "send_stage_seconds",
            "Logic-worker time of a new 1:1 or group message, by stage (kind: authorize, allocate, \
             store, deliver)",
            m.send_stage_seconds.clone(),
        );
        registry.register("bus_errors", "Bus (NATS) errors", m.bus_errors.clone());
        registry.register("store_errors", "Storage errors", m.store_errors.clone());
        registry.register(
            "room_viewers",
            "Live-room viewers on this gateway",
            m.room_viewers.clone(),
        );
        registry.register(
            "queue_drops",
            "Outbound queue overflows",
            m.queue_drops.clone(),
        );
        m.push.register(&mut registry);
        registry.register(
            "room_sampled",
            "Live-room messages sampled away above a room's display rate, by class",
            m.room_sampled.clone(),
        );
        registry.register(
            "room_dropped",
            "Live-room deliveries dropped for slow viewers, by class",
            m.room_dropped.clone(),
        );
        registry.register(
            "room_likes_merged",
            "Live-room likes merged into frame counts",
            m.room_likes_merged.clone(),
        );
        // Label sets known in advance are exported at 0 from the start, so a dashboard or a `rate()`
        // sees them before the first event (a family shows only the label sets created so far).
        for transport in ["tcp", "ws", "quic"] {
            let label = TransportLabel { transport };
            let _ = m.connections.get_or_create(&label);
            let _ = m.sign_ins.get_or_create(&label);
        }
        for kind in ["authorize", "allocate", "store", "deliver"] {
            let _ = m.send_stage_seconds.get_or_create(&KindLabel { kind });
        }
        for kind in ["high", "chat", "like"] {
            let _ = m.room_dropped.get_or_create(&KindLabel { kind });
        }
        let _ = m.room_sampled.get_or_create(&KindLabel { kind: "chat" });
        Metrics { registry, ..m }
    }

    /// Adds a counter family `name{kind}` whose values `read` returns at each scrape: counters kept
    /// by a library that does not depend on this crate (e.g. the store's CQL operations).
    #[must_use]
    pub fn with_counter_source(
        mut self,
        name: &'static str,
        help: &'static str,
        read: fn() -> Vec<(&'static str, u64)>,
    ) -> Self {
        self.registry
            .register_collector(Box::new(CounterSource { name, help, read }));
        self
    }

    /// The text exposition format, for `/metrics`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// See [`Metrics::with_counter_source`].
#[derive(Debug)]
struct CounterSource {
    name: &'static str,
    help: &'static str,
    read: fn() -> Vec<(&'static str, u64)>,
}

impl Collector for CounterSource {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family =
            encoder.encode_descriptor(self.name, self.help, None, MetricType::Counter)?;
        for (kind, value) in (self.read)() {
            let labels = KindLabel { kind };
            ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_render() {
        let m = Metrics::new();
        m.sign_ins
            .get_or_create(&TransportLabel { transport: "ws" })
            .inc();
        m.messages_sent.inc_by(3);
        m.send_ack_seconds.observe(0.002);
        m.send_stage_seconds
            .get_or_create(&KindLabel { kind: "store" })
            .observe(0.001);
        let text = m.render();
        assert!(
            text.contains(r#"zhibo_sign_ins_total{transport="ws"} 1"#),
            "{text}"
        );
        assert!(text.contains("zhibo_messages_sent_total 3"), "{text}");
        assert!(text.contains("zhibo_send_ack_seconds_count 1"), "{text}");
        assert!(
            text.contains(r#"zhibo_send_stage_seconds_count{kind="store"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn known_label_sets_are_exported_at_zero_from_the_start() {
        let text = Metrics::new().render();
        for line in [
            r#"zhibo_connections{transport="quic"} 0"#,
            r#"zhibo_sign_ins_total{transport="tcp"} 0"#,
            r#"zhibo_send_stage_seconds_count{kind="deliver"} 0"#,
            r#"zhibo_room_dropped_total{kind="high"} 0"#,
            r#"zhibo_room_sampled_total{kind="chat"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
    }

    #[test]
    fn a_counter_source_is_read_at_each_scrape() {
        let m = Metrics::new().with_counter_source("cql_operations", "CQL operations", || {
            vec![("read", 3), ("lwt", 1)]
        });
        let text = m.render();
        assert!(
            text.contains(r#"zhibo_cql_operations_total{kind="read"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"zhibo_cql_operations_total{kind="lwt"} 1"#),
            "{text}"
        );
    }
}
