//! Event webhooks: user online/offline, message stored, group membership changes, POSTed to
//! `webhooks.url` by the same relay as push events, with the same signature, retries and dead letters
//! (topic `webhook`: the stream subject `<prefix>.push.webhook`, or the embedded outbox).
//!
//! Off by default and opt-in per event type (`webhooks.events`). When no type is configured nothing
//! holds a [`Webhooks`] and the emitting code does no work at all; when some are, an emitter checks
//! [`Webhooks::wants`] (a bit test) before building anything.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::sink::{Outgoing, PushSink, Topic};

/// The webhook event types, by their `type` in the JSON and in `webhooks.events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventType {
    /// A user's first device connected (no device of theirs was online).
    UserOnline,
    /// A user's last device is gone.
    UserOffline,
    /// A 1:1 or group message was stored (sent by a client or by the server).
    MessageStored,
    /// A user became a member of a group (added, or accepted an invitation).
    GroupMemberJoined,
    /// A member left a group.
    GroupMemberLeft,
    /// A member was removed from a group by its owner or an admin.
    GroupMemberKicked,
}

impl EventType {
    /// Every type.
    pub const ALL: [EventType; 6] = [
        EventType::UserOnline,
        EventType::UserOffline,
        EventType::MessageStored,
        EventType::GroupMemberJoined,
        EventType::GroupMemberLeft,
        EventType::GroupMemberKicked,
    ];

    /// The type's name (`type` in the JSON, an entry of `webhooks.events`).
    pub fn name(self) -> &'static str {
        match self {
            EventType::UserOnline => "user.online",
            EventType::UserOffline => "user.offline",
            EventType::MessageStored => "message.stored",
            EventType::GroupMemberJoined => "group.member_joined",
            EventType::GroupMemberLeft => "group.member_left",
            EventType::GroupMemberKicked => "group.member_kicked",
        }
    }

    /// The type named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// `[webhooks]` (`ZHIBO_WEBHOOKS__*`). Delivery uses the `[push]` settings: `push.secret` signs,
/// `push.timeout_ms`, `push.max_attempts`, the backoff and `push.concurrency` apply.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksConfig {
    /// Where the relay POSTs webhook events (`https://…` or `http://…`).
    pub url: String,
    /// The event types to send (names of [`EventType`]); empty: webhooks off.
    pub events: Vec<String>,
}

impl WebhooksConfig {
    /// Checks the values: known event types, and a URL when any is set.
    ///
    /// # Errors
    /// A message naming the bad field.
    pub fn validate(&self) -> Result<(), String> {
        for name in &self.events {
            if EventType::parse(name).is_none() {
                let known: Vec<&str> = EventType::ALL.iter().map(|t| t.name()).collect();
                return Err(format!(
                    "webhooks.events: unknown event type {name:?} (known: {})",
                    known.join(", ")
                ));
            }
        }
        if !self.events.is_empty() || !self.url.is_empty() {
            if self.url.is_empty() {
                return Err(
                    "webhooks.url must be an http:// or https:// URL when webhooks.events is set"
                        .into(),
                );
            }
            crate::http::check_url("webhooks.url", &self.url)?;
            if self.events.is_empty() {
                return Err("webhooks.url is set but webhooks.events names no event type".into());
            }
        }
        Ok(())
    }

    /// Whether any event type is on.
    pub fn enabled(&self) -> bool {
        !self.events.is_empty()
    }

    /// Whether `t` is on.
    pub fn wants(&self, t: EventType) -> bool {
        self.events.iter().any(|n| n == t.name())
    }
}

/// The JSON body of a webhook event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookEvent {
    /// The [`EventType`] name (`user.online`, …).
    #[serde(rename = "type")]
    pub kind: String,
    /// Unique per event, the same on every retry and redelivery (also in the
    /// `x-zhibo-idempotency-key` header): `<type>:<what it is about>`.
    pub idempotency_key: String,
    /// When it happened, ms since the epoch.
    pub time_ms: i64,
    /// The event's fields (see README.md, "Event webhooks").
    pub data: serde_json::Value,
}

/// Emits the configured webhook events into a sink.
#[derive(Clone)]
pub struct Webhooks {
    sink: Arc<dyn PushSink>,
    mask: u8,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks")
            .field("mask", &self.mask)
            .finish_non_exhaustive()
    }
}

impl Webhooks {
    /// An emitter of `config`'s event types into `sink`; `None` when no type is on.
    pub fn new(config: &WebhooksConfig, sink: Arc<dyn PushSink>) -> Option<Self> {
        let mask = EventType::ALL
            .into_iter()
            .filter(|t| config.wants(*t))
            .fold(0, |m, t| m | t.bit());
        (mask != 0).then_some(Webhooks { sink, mask })
    }

    /// Whether `t` is configured.
    pub fn wants(&self, t: EventType) -> bool {
        self.mask & t.bit() != 0
    }

    /// The event of type `t` about `about` (the key's tail: unique per event of that type), `None`
    /// when `t` is not configured.
    pub fn event(&self, t: EventType, about: &str, data: serde_json::Value) -> Option<Outgoing> {
        if !self.wants(t) {
            return None;
        }
        let key = format!("{}:{about}", t.name());
        let event = WebhookEvent {
            kind: t.name().to_owned(),
            idempotency_key: key.clone(),
            time_ms: now_ms(),
            data,
        };
        let body = serde_json::to_vec(&event).ok()?;
        Some(Outgoing {
            topic: Topic::Webhook,
            key,
            body: body.into(),
        })
    }

    /// Emits the event of type `t` (see [`Webhooks::event`]) when it is configured; returns once the
    /// sink has it.
    pub async fn emit(&self, t: EventType, about: &str, data: serde_json::Value) {
        if let Some(event) = self.event(t, about, data) {
            self.sink.publish(vec![event]).await;
        }
    }

    /// Emits the events (already built by [`Webhooks::event`]) at once.
    pub async fn emit_all(&self, events: Vec<Outgoing>) {
        if !events.is_empty() {
            self.sink.publish(events).await;
        }
    }
}

/// A key tail unique to this occurrence, for events with no natural id (a user going online twice
/// in one millisecond on two gateways still gets two keys).
pub fn occurrence() -> String {
    format!("{}-{:016x}", now_ms(), rand::random::<u64>())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_types_are_validated_and_named() {
        let mut c = WebhooksConfig::default();
        assert_eq!(c.validate(), Ok(()));
        assert!(!c.enabled());
        c.events = vec!["user.online".into()];
        assert!(c.validate().unwrap_err().contains("webhooks.url"));
        c.url = "https://app.example.com/hooks".into();
        assert_eq!(c.validate(), Ok(()));
        c.events.push("user.typing".into());
        assert!(c.validate().unwrap_err().contains("user.typing"));
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.name()), Some(t));
        }
    }
}
