//! # Layout
//! One rule: a storage domain (devices, users, friends, groups, messages, rooms, invites, leases) has
//! the same file name in three places:
//! - `traits/<domain>.rs`: its trait and the records only it uses ([`DeviceStore`], [`UserStore`],
//!   [`FriendStore`], [`GroupStore`], [`MessageStore`] with [`SendPlan`] and [`SeqAllocator`],
//!   [`RoomStore`] with [`Room`], [`GroupInviteStore`] with [`GroupInvite`], [`NodeLeases`] with
//!   [`Lease`] and [`leases::Pool`], [`ConversationStore`] with [`Conversation`] and its queries,
//!   [`OutboxStore`] with [`OutboxEvent`] (embedded only: JetStream is the outbox when distributed)), all
//!   re-exported here; what logic-worker, gateway and user-api
//!   call, always as `Arc<dyn Trait>` inside [`Stores`];
//! - `scylla/<domain>.rs`: the ScyllaDB/Cassandra implementation, owning its prepared statements (a
//!   `Statements` struct prepared once), its row types and its trait impl ([`scylla`]; `scylla/mod.rs`
//!   holds the session and the query helpers, `scylla/migrate.rs` the CQL migrations from `sql/`);
//! - `embedded/<domain>.rs`: the redb implementation ([`embedded`]; `embedded/mod.rs` holds the tables
//!   and the transaction helpers, `embedded/writer.rs` the group-commit writer thread).
//!
//! Records shared by several domains are in [`model`]; this file holds [`Error`] and [`Stores`].
//! Outside the rule: [`redis_seq`], the Redis (fred) [`SeqAllocator`] with recovery from the message
//! store (and of conversation counters from the conversation store); [`ids`], cluster-unique id generation, and [`leases`], the [`leases::LeasedIds`] generator
//! that mints under a node-number lease.
//!
//! One conformance suite (`tests/it/conformance.rs`) runs against every backend.
#![warn(missing_docs)]

pub mod embedded;
pub mod ids;
pub mod leases;
pub mod list_cache;
pub mod model;
pub mod presence;
pub mod redis_seq;
pub mod scylla;
mod traits;

use std::sync::Arc;

pub use model::*;
pub use traits::conversations::{
    sort_for_list, unread_count, Conversation, ConversationId, ConversationKey, ConversationKind,
    ConversationSettings, ConversationStore, HistoryEntry, HistoryPage, ListCursor, ListQuery,
    RecallRequest, Recalled, SeqGap, CONTENT_TYPE_DELETED, CONTENT_TYPE_RECALLED,
};
pub use traits::devices::DeviceStore;
pub use traits::friends::FriendStore;
pub use traits::groups::{check_transfer, GroupStore};
pub use traits::invites::{GroupInvite, GroupInviteStore};
pub use traits::leases::{Lease, NodeLeases};
pub use traits::messages::{Claim, ConversationSeqs, MessageStore, SendPlan, SeqAllocator};
pub use traits::outbox::{OutboxEntry, OutboxEvent, OutboxStore};
pub use traits::presence::{Presence, PresenceListener};
pub use traits::rooms::{Room, RoomBan, RoomPin, RoomShaping, RoomStore};
pub use traits::users::UserStore;

/// What a storage call can fail with. Callers branch on [`ErrorKind`]; the driver error that caused it,
/// if any, is its [`std::error::Error::source`] (as in async-nats' `Error<Kind>`).
#[derive(Debug, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct Error {
    /// What went wrong, for branching.
    pub kind: ErrorKind,
    /// Human-readable detail, for logs; never shown to clients as-is.
    pub message: String,
    /// The underlying failure (a driver, redb or codec error), kept for error reports.
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

/// The kind of a storage [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A unique key is taken (e.g. a username).
    Conflict,
    /// The record does not exist.
    NotFound,
    /// The backend could not be reached or failed; retrying later may work.
    Unavailable,
    /// Stored data could not be decoded.
    Corrupt,
    /// The user is not in the conversation (has no row of it).
    NotMember,
    /// A position beyond what exists (e.g. a read position past the conversation's last message).
    OutOfRange,
    /// Not this user's to do (e.g. recalling someone else's message without being a group admin).
    NotAllowed,
    /// Too late (e.g. a recall past its window).
    TooLate,
    /// The message was recalled already.
    AlreadyRecalled,
}

impl ErrorKind {
    /// A refusal of bad input (a taken key, a missing record, a conversation rule), as opposed to a
    /// failure: the operation changed nothing and retrying it unchanged gets the same answer.
    pub fn is_refusal(self) -> bool {
        matches!(
            self,
            ErrorKind::Conflict
                | ErrorKind::NotFound
                | ErrorKind::NotMember
                | ErrorKind::OutOfRange
                | ErrorKind::NotAllowed
                | ErrorKind::TooLate
                | ErrorKind::AlreadyRecalled
        )
    }
}

impl Error {
    /// An error of `kind` with a message and no underlying cause.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// A backend failure described by `e` (no underlying cause kept: see [`Self::backend`]).
    pub fn unavailable(e: impl std::fmt::Display) -> Self {
        Error::new(ErrorKind::Unavailable, e.to_string())
    }

    /// A backend failure caused by the driver error `source`, which is kept as the source; the message
    /// is its text.
    pub fn backend(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Error {
            kind: ErrorKind::Unavailable,
            message: source.to_string(),
            source: Some(Box::new(source)),
        }
    }

    /// An error of `kind` caused by `source`, which is kept as the source; the message is
    /// `"{context}: {source}"`.
    pub fn wrap(
        kind: ErrorKind,
        context: impl std::fmt::Display,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error {
            kind,
            message: format!("{context}: {source}"),
            source: Some(Box::new(source)),
        }
    }

    /// One failure handed to several callers (the embedded writer's group commit): see [`Shared`].
    pub(crate) fn into_shared(self) -> Shared {
        Shared {
            kind: self.kind,
            message: self.message,
            source: self.source.map(std::sync::Arc::from),
        }
    }
}

/// An [`Error`] whose cause several callers share; each gets its own copy with [`Shared::to_error`].
#[derive(Debug)]
pub(crate) struct Shared {
    kind: ErrorKind,
    message: String,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl Shared {
    /// A copy of the error: same kind and message, the same cause as its source.
    pub(crate) fn to_error(&self) -> Error {
        Error {
            kind: self.kind,
            message: self.message.clone(),
            source: self
                .source
                .clone()
                .map(|s| Box::new(s) as Box<dyn std::error::Error + Send + Sync>),
        }
    }
}

/// Storage result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every store a process needs, as shared trait objects.
#[derive(Clone)]
pub struct Stores {
    /// Devices.
    pub devices: Arc<dyn DeviceStore>,
    /// Users.
    pub users: Arc<dyn UserStore>,
    /// Friend graph.
    pub friends: Arc<dyn FriendStore>,
    /// Groups and members.
    pub groups: Arc<dyn GroupStore>,
    /// Pending group invitations.
    pub group_invites: Arc<dyn GroupInviteStore>,
    /// Inboxes, dedup, acks.
    pub messages: Arc<dyn MessageStore>,
    /// Seq counters.
    pub seq: Arc<dyn SeqAllocator>,
    /// Live-room records and recent history.
    pub rooms: Arc<dyn RoomStore>,
    /// Node-number leases for id generation.
    pub leases: Arc<dyn NodeLeases>,
    /// Conversation rows, history index, read receipts, recall.
    pub conversations: Arc<dyn ConversationStore>,
}
