//! # Layout
//! - [`model`]: the domain records (devices, users, friends, groups, members) shared by every backend.
//! - Traits ([`DeviceStore`], [`UserStore`], [`FriendStore`], [`GroupStore`], [`MessageStore`],
//!   [`SeqAllocator`], [`RoomStore`]): what logic-worker, gateway and user-api call, always as
//!   `Arc<dyn Trait>` inside [`Stores`].
//! - [`invites`]: pending group invitations ([`GroupInviteStore`]); [`embedded::EmbeddedInvites`] implements it
//!   for the embedded backend (the Scylla one is in [`scylla`]).
//! - [`rooms`]: live-room records and recent history ([`RoomStore`]); [`embedded::EmbeddedRooms`] implements it
//!   for the embedded backend (the Scylla one is in [`scylla`]).
//! - [`scylla`]: ScyllaDB/Cassandra backend (prepared statements prepared once) and the CQL migrations
//!   from `sql/`; [`redis_seq`]: the Redis (fred) seq allocator with recovery from the message store.
//! - [`embedded`]: the redb backend for `dev` and small installs, seq allocation included.
//! - [`ids`]: cluster-unique id generation; [`leases`]: the node-number leases it needs
//!   ([`NodeLeases`], [`leases::LeasedIds`]).
//!
//! One conformance suite (`tests/it/conformance.rs`) runs against every backend.
#![warn(missing_docs)]

pub mod embedded;
pub mod ids;
pub mod invites;
pub mod leases;
pub mod model;
pub mod redis_seq;
pub mod rooms;
pub mod scylla;

use std::sync::Arc;

use async_trait::async_trait;
pub use invites::{GroupInvite, GroupInviteStore};
pub use leases::NodeLeases;
pub use model::*;
pub use rooms::{Room, RoomStore};
use zhibo_proto::client::Message;

/// What a storage call can fail with. Callers branch on [`ErrorKind`].
#[derive(Debug, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct Error {
    /// What went wrong, for branching.
    pub kind: ErrorKind,
    /// Human-readable detail, for logs; never shown to clients as-is.
    pub message: String,
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
}

impl Error {
    /// An error of `kind` with a message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }

    /// A backend failure.
    pub fn unavailable(e: impl std::fmt::Display) -> Self {
        Error::new(ErrorKind::Unavailable, e.to_string())
    }
}

/// Storage result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Devices: registered once per app install.
#[async_trait]
pub trait DeviceStore: Send + Sync {
    /// Stores a new device (its `device_id` already allocated).
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn insert_device(&self, device: &Device) -> Result<()>;
    /// The device, if registered.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn get_device(&self, device_id: i64) -> Result<Option<Device>>;
    /// Tokens of this device issued before `before_ms` (Unix ms) are no longer valid (sign-out).
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] for an unknown device.
    async fn revoke_tokens_before(&self, device_id: i64, before_ms: i64) -> Result<()>;
    /// Binds the device to `user_id` if it is not bound yet, atomically (the first of two racing users
    /// wins), and returns its owner after the call: `user_id`, or the other user it already belongs to.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] for an unknown device; [`ErrorKind::Unavailable`] on backend failure.
    async fn bind_device(&self, device_id: i64, user_id: i64) -> Result<i64>;
}

/// Users and their unique usernames.
#[async_trait]
pub trait UserStore: Send + Sync {
    /// Creates a user.
    ///
    /// # Errors
    /// [`ErrorKind::Conflict`] when the username or user id is taken.
    async fn insert_user(&self, user: &User) -> Result<()>;
    /// Creates or replaces a user by id (admin upsert from an app backend that owns its users).
    ///
    /// # Errors
    /// [`ErrorKind::Conflict`] when the username belongs to another user id.
    async fn upsert_user(&self, user: &User) -> Result<()>;
    /// The user, if any.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn get_user(&self, user_id: i64) -> Result<Option<User>>;
    /// The user with this exact username, if any.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn get_user_by_username(&self, username: &str) -> Result<Option<User>>;
    /// Replaces the profile fields (nickname, avatar, extra) of an existing user.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] for an unknown user.
    async fn update_profile(&self, user_id: i64, profile: &Profile) -> Result<()>;
}

/// The friend graph: requests and accepted friendships (stored in both directions).
#[async_trait]
pub trait FriendStore: Send + Sync {
    /// Records (or replaces) a pending request from `req.from_user_id` to `req.to_user_id`.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn put_request(&self, req: &FriendRequest) -> Result<()>;
    /// The pending request from `from` to `to`, if any.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn get_request(&self, from: i64, to: i64) -> Result<Option<FriendRequest>>;
    /// Pending requests addressed to `to`.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn list_requests_to(&self, to: i64) -> Result<Vec<FriendRequest>>;
    /// Removes the request from `from` to `to` (agreed or refused).
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn delete_request(&self, from: i64, to: i64) -> Result<()>;
    /// Stores one direction of a friendship (call twice for both directions).
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn put_friend(&self, friend: &Friend) -> Result<()>;
    /// `user_id`'s entry for `friend_id`, if they are friends.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn get_friend(&self, user_id: i64, friend_id: i64) -> Result<Option<Friend>>;
    /// All of `user_id`'s friends, ordered by friend id.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn list_friends(&self, user_id: i64) -> Result<Vec<Friend>>;
    /// Removes one direction of a friendship.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn delete_friend(&self, user_id: i64, friend_id: i64) -> Result<()>;
}

/// Groups and their members.
#[async_trait]
pub trait GroupStore: Send + Sync {
    /// Creates or replaces a group's record.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn put_group(&self, group: &Group) -> Result<()>;
    /// The group, if it exists (dissolved groups are deleted).
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn get_group(&self, group_id: i64) -> Result<Option<Group>>;
    /// Deletes the group, its members and their `groups of user` entries.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn delete_group(&self, group_id: i64) -> Result<()>;
    /// Adds or replaces a member (also indexes the group under the user).
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn put_member(&self, member: &GroupMember) -> Result<()>;
    /// Transfers ownership in one atomic step: writes `group` (whose `owner_id` is `new_owner.user_id`),
    /// `new_owner` (role [`Role::Owner`]) and `old_owner` (its new role, e.g. admin) together, so a failure
    /// can never leave the group with two owners or none. Both are existing members of `group`.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure (then nothing, or in Scylla's logged batch
    /// everything eventually, is applied); [`ErrorKind::Conflict`] when the records disagree (another
    /// group, `owner_id` not the new owner, or the new owner's role not `Owner`), with nothing written.
    async fn transfer_ownership(
        &self,
        group: &Group,
        new_owner: &GroupMember,
        old_owner: &GroupMember,
    ) -> Result<()>;
    /// The member record, if `user_id` is in the group.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn get_member(&self, group_id: i64, user_id: i64) -> Result<Option<GroupMember>>;
    /// Removes a member (and the group from the user's list).
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn delete_member(&self, group_id: i64, user_id: i64) -> Result<()>;
    /// Members ordered by user id, those with `user_id > after`, at most `limit`.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn list_members(
        &self,
        group_id: i64,
        after: i64,
        limit: usize,
    ) -> Result<Vec<GroupMember>>;
    /// Ids of every member (fan-out).
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn member_ids(&self, group_id: i64) -> Result<Vec<i64>>;
    /// Ids of the groups `user_id` is in, ordered.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn groups_of_user(&self, user_id: i64) -> Result<Vec<i64>>;
}

/// The result remembered for a `(sender device, client_msg_id)` so a resend returns it again.
///
/// It holds the whole fan-out plan (every recipient's seq), written *before* the inbox entries: a resend
/// after a crash between the two finds the plan and rewrites the same entries (idempotent), so an ACKed
/// message is never lost and a retried one is never stored twice.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SendPlan {
    /// The message id assigned the first time.
    pub message_id: u64,
    /// The sender's inbox seq for it.
    pub seq: u64,
    /// Server time of the first acceptance.
    pub server_time_ms: i64,
    /// `(user_id, seq)` of every inbox the message goes to, the sender's included.
    pub recipients: Vec<(i64, u64)>,
}

/// Per-user inboxes (write diffusion), dedup records and per-device acknowledged seq.
#[async_trait]
pub trait MessageStore: Send + Sync {
    /// Stores `message` in `user_id`'s inbox at `message.seq`, replacing an entry at that seq. Durable
    /// when this returns. Seqs come from [`SeqAllocator::next`]; an import with seqs of its own must not
    /// run while the same users receive messages (the allocators resume above the stored seqs, but only
    /// when they first count a user).
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn append(&self, user_id: i64, message: &Message) -> Result<()>;
    /// Stores many `(user_id, message)` inbox entries (group fan-out); durable when this returns.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn append_many(&self, entries: &[(i64, Message)]) -> Result<()>;
    /// Messages of `user_id` with seq > `after_seq`, ascending, at most `limit`.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn sync(&self, user_id: i64, after_seq: u64, limit: usize) -> Result<Vec<Message>>;
    /// The largest seq stored in `user_id`'s inbox (0 when empty): the floor for seq recovery.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn max_seq(&self, user_id: i64) -> Result<u64>;
    /// The remembered result of a previous send from `device_id` with `client_msg_id`.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn get_dedup(&self, device_id: i64, client_msg_id: &str) -> Result<Option<SendPlan>>;
    /// Remembers the result of a send unless one is already stored for this key, in which case the stored
    /// one is returned and nothing is written (insert-if-absent: two racing resends agree on one plan).
    /// Records expire after a retention period (days), longer than any client retries.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn put_dedup_if_absent(
        &self,
        device_id: i64,
        client_msg_id: &str,
        result: &SendPlan,
    ) -> Result<Option<SendPlan>>;
    /// Records a new send in one step: the dedup record `plan` (insert-if-absent, as
    /// [`Self::put_dedup_if_absent`]) and, only when no record existed, the inbox `entries`. When one
    /// exists it is returned and nothing is written. Durable when this returns.
    ///
    /// The default writes the record, then the entries: a crash in between leaves a plan whose resend
    /// completes it. A backend that can write both in one transaction overrides it (fewer round trips).
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure; the record may then be stored without the entries.
    async fn record_send(
        &self,
        device_id: i64,
        client_msg_id: &str,
        plan: &SendPlan,
        entries: &[(i64, Message)],
    ) -> Result<Option<SendPlan>> {
        if let Some(existing) = self
            .put_dedup_if_absent(device_id, client_msg_id, plan)
            .await?
        {
            return Ok(Some(existing));
        }
        self.append_many(entries).await?;
        Ok(None)
    }
    /// Records that `device_id` of `user_id` has received everything up to `seq` (never moves back).
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn ack(&self, user_id: i64, device_id: i64, seq: u64) -> Result<()>;
    /// The device's acknowledged seq (0 if none).
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn acked(&self, user_id: i64, device_id: i64) -> Result<u64>;
}

/// Allocates each user's strictly increasing inbox seq.
#[async_trait]
pub trait SeqAllocator: Send + Sync {
    /// The next seq of each user in `user_ids`, in the same order.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] when the counter or the recovery read fails.
    async fn next(&self, user_ids: &[i64]) -> Result<Vec<u64>>;
    /// The last seq allocated for `user_id` (0 if none), without allocating.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn current(&self, user_id: i64) -> Result<u64>;
}

/// Checks the records of [`GroupStore::transfer_ownership`] agree, for every backend.
///
/// # Errors
/// [`ErrorKind::Conflict`] naming the disagreement.
pub fn check_transfer(
    group: &Group,
    new_owner: &GroupMember,
    old_owner: &GroupMember,
) -> Result<()> {
    if new_owner.group_id != group.group_id || old_owner.group_id != group.group_id {
        return Err(Error::new(ErrorKind::Conflict, "members of another group"));
    }
    if group.owner_id != new_owner.user_id || new_owner.role != Role::Owner {
        return Err(Error::new(
            ErrorKind::Conflict,
            "the group's owner_id and the new owner's role must name the new owner",
        ));
    }
    if old_owner.user_id == new_owner.user_id || old_owner.role == Role::Owner {
        return Err(Error::new(
            ErrorKind::Conflict,
            "the old owner must be another member and lose the owner role",
        ));
    }
    Ok(())
}

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
}
