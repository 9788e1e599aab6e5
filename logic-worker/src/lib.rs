//! # Layout
//! - [`Logic`] (this file): the message pipeline's state — stores, bus, id source, config, metrics. Called
//!   by [`run`] for commands from gateways and directly by user-api for server sends. One file per command:
//!   - `send`: 1:1 and group sends — authorise, dedup, allocate seqs, persist (write diffusion), replay a
//!     resend, deliver to every device.
//!   - `sync`: sync pages and acks.
//!   - `conversations`: conversation list, history, mark read, group readers, recall, delete-for-me,
//!     mute/pin, typing (issue #13), shared by the packets and user-api's HTTP routes; live notices go
//!     through `send`'s `deliver_to_user`.
//!   - `room`: room sends (size, reserved types, closed, muted), room notices, server-wide broadcasts.
//!   - `moderation`: room bans (stored, then the user's connections are removed from the room on every
//!     gateway), the pinned announcement, the viewer list (a fan-in over the gateways with viewers).
//!   - `events`: bus events other than messages (a signed-out device is kicked).
//!   - `consumer`: [`run`] consumes `zhibo.cmd` in the `logic` queue group with bounded concurrency and
//!     finishes in-flight commands on shutdown; [`Logic::handle`] dispatches one command.
//!   - `ids`: message ids from a configured or leased node number.
//!   - `push`: [`PushHook`] — after a 1:1 or group message is stored, one push event per offline
//!     recipient (one pipelined presence read), handed to the push sink without waiting.
//!   - `webhooks`: the `message.stored` event webhook (when configured), before the ACK.
//!   - `hook`: the optional before-send hook (an HTTP call to the app backend: allow, reject, replace).
//! - `config`: [`LogicConfig`]; `error`: [`LogicError`], [`Op`] and the store-error mapping.
//!
//! Send path: dedup lookup → authorise → before-send hook (only when configured for the receiver type)
//! → seqs for every recipient (sender included) and the conversation seq, in one allocator call → dedup
//! plan written (insert-if-absent) → inbox entries and their conversation rows written (durable; one
//! transaction with the plan where the backend can, see `MessageStore::record_send`) → SendMessageOutput to the sender → Message to every device of
//! every recipient but the sending device. A resend (same `client_msg_id`) rewrites the same entries and
//! publishes them again: live delivery is at least once, clients drop repeats by seq / message id.
//!
//! Room send path (no seq, no inbox, no dedup): size and reserved-type checks → the room's record (closed,
//! muted) and the sender's ban, read concurrently → recent history write (best effort, *before* the publish so a joiner's history read and its
//! live subscription leave no gap) → one publish on `zhibo.room.<id>` → SendMessageOutput with seq 0.
#![warn(missing_docs)]

mod authz;
mod config;
mod consumer;
mod conversations;
mod error;
mod events;
mod hook;
mod ids;
mod moderation;
mod push;
mod room;
mod send;
mod sync;
mod webhooks;

use std::sync::Arc;

use zhibo_bus::Bus;
use zhibo_store::Stores;
use zhibo_telemetry::Metrics;

pub use config::LogicConfig;
pub use consumer::run;
pub use conversations::{
    conversation_id, conversation_ref, to_wire, HISTORY_PAGE, LIST_PAGE, MAX_HISTORY_PAGE,
    MAX_LIST_PAGE,
};
pub use error::{LogicError, Op};
use hook::BeforeSendHook;
pub use hook::{BeforeSendConfig, FailurePolicy, HookReceiver, HooksConfig};
use ids::MessageIds;
pub use moderation::{ListedViewer, ViewerList, MAX_VIEWERS, VIEWERS_WAIT};
pub use push::PushHook;
pub use webhooks::MembershipChange;

/// The message pipeline.
pub struct Logic {
    stores: Stores,
    bus: Arc<dyn Bus>,
    /// Which gateways hold each user: where events for the user's devices are published.
    presence: Arc<dyn zhibo_store::Presence>,
    ids: MessageIds,
    config: LogicConfig,
    metrics: Arc<Metrics>,
    push: Option<PushHook>,
    /// `None` when no webhook event type is configured: then no webhook work at all.
    webhooks: Option<zhibo_push::Webhooks>,
    /// `None` when no hook is configured: the send path then does no hook work at all.
    before_send: Option<BeforeSendHook>,
    /// Positive answers of the 1:1 send path's authorization reads (see `authz.rs`).
    authz: authz::AuthzCache,
}

impl std::fmt::Debug for Logic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Logic")
            .field("config", &self.config)
            .field("before_send", &self.before_send.is_some())
            .finish()
    }
}

impl Logic {
    /// A pipeline over `stores` publishing deliveries on `bus` to the gateways `presence` names for
    /// each user (the gateways' presence: in-process in embedded mode, Redis otherwise). Without
    /// `config.node_id` it leases a node number for message ids from `stores.leases` in the background
    /// (call inside a tokio runtime), and refuses to mint (`UNAVAILABLE`, retryable) while it holds no
    /// valid lease.
    pub fn new(
        stores: Stores,
        bus: Arc<dyn Bus>,
        presence: Arc<dyn zhibo_store::Presence>,
        config: LogicConfig,
    ) -> Self {
        let ids = MessageIds::new(&stores, config.node_id);
        let authz = authz::AuthzCache::new(std::time::Duration::from_secs(config.authz_cache_secs));
        Logic {
            stores,
            bus,
            presence,
            ids,
            config,
            metrics: Arc::new(Metrics::new()),
            push: None,
            webhooks: None,
            before_send: None,
            authz,
        }
    }

    /// Calls the hooks `config` configures (none when its URLs are empty).
    ///
    /// # Errors
    /// When the hook configuration is invalid or its HTTP client cannot be built.
    pub fn with_hooks(mut self, config: &HooksConfig) -> Result<Self, String> {
        self.before_send = BeforeSendHook::new(config)?;
        Ok(self)
    }

    /// Records into the process's `metrics` instead of a private registry.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Emits the configured event webhooks (`message.stored` here; user-api the group events).
    pub fn with_webhooks(mut self, webhooks: zhibo_push::Webhooks) -> Self {
        self.webhooks = Some(webhooks);
        self
    }

    /// Emits offline push events for stored 1:1 and group messages.
    pub fn with_push(mut self, push: PushHook) -> Self {
        self.push = Some(push);
        self
    }
}
