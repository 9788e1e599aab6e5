//! # Layout
//! - [`event`]: [`PushEvent`], the JSON an app backend receives per offline recipient of a message.
//! - [`sign`]: the HMAC-SHA256 signature headers, [`sign::sign`] and [`sign::verify`] (the README's
//!   example receiver does the same).
//! - [`config`]: [`PushConfig`] (`[push]`), its checks and the retry backoff.
//! - [`sink`]: [`sink::PushSink`], where logic workers hand events ([`sink::Outgoing`]): the JetStream
//!   publisher ([`sink::JetStreamSink`], stream `<PREFIX>_push` created or updated at start; never
//!   waits) and the embedded store's durable outbox ([`sink::OutboxSink`]; returns once on disk).
//! - [`relay`]: `zhibo push-relay` — [`relay::run`] (durable JetStream pull consumer) and
//!   [`relay::run_outbox`] (embedded: delivers from the outbox, resumes it at start), both POSTing
//!   through one [`relay::Deliverer`].
//! - [`http`]: the URL check and HTTP client setup shared by push, webhooks and the before-send hook
//!   (redirects not followed).
//! - [`webhook`]: event webhooks ([`webhook::Webhooks`], `[webhooks]`): user online/offline, message
//!   stored, group membership changes, through the same sinks and relay (topic `webhook`).
//!
//! Flow: logic worker (stored message, recipients offline per `Presence`) → sink → stream
//! `<prefix>.push.event` → push-relay → signed POST to `push.url` (ack on 2xx, nak with backoff,
//! `<prefix>.push.dead` after `push.max_attempts`).
#![warn(missing_docs)]

pub mod config;
pub mod event;
pub mod http;
pub mod relay;
pub mod sign;
pub mod sink;
pub mod webhook;

pub use config::PushConfig;
pub use event::PushEvent;
pub use webhook::{EventType, Webhooks, WebhooksConfig};

/// A push failure at start (the relay's or publisher's setup).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// JetStream refused (not enabled, stream or consumer conflict).
    #[error("jetstream: {0}")]
    JetStream(String),
    /// The HTTP client could not be built.
    #[error("http client: {0}")]
    Http(String),
}
