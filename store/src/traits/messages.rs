//! Per-user inboxes, send plans (dedup), device acks, and the seq allocator that numbers inbox entries.

use async_trait::async_trait;
use zhibo_proto::client::Message;

#[cfg(doc)]
use crate::ErrorKind;
use crate::{ConversationKey, Result, SeqGap};

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
    /// The message's conversation seq (shared by every copy; see [`crate::ConversationStore`]); 0 for
    /// plans written before conversations existed (their resends record no conversation).
    #[serde(default)]
    pub conv_seq: u64,
}

/// What [`SeqAllocator::next_in_conversation`] allocated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationSeqs {
    /// Each user's next inbox seq, in the order asked.
    pub inbox: Vec<u64>,
    /// The conversation's next seq.
    pub conv_seq: u64,
    /// Set when this call recovered the conversation's lost counter above a margin: the seqs it
    /// skipped (none of them will ever be allocated).
    pub skipped: Option<SeqGap>,
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
    /// With `plan.conv_seq > 0` (a 1:1 or group message) the backends also record the message in its
    /// conversation, as [`crate::ConversationStore::record_message`] does, inside the same per-user
    /// writes (Scylla: one single-partition batch per recipient holding the inbox row and the
    /// conversation rows; redb: the same transaction), so a send costs no extra round trip per copy.
    ///
    /// The default writes the record, then the entries (and no conversation rows): a crash in between
    /// leaves a plan whose resend completes it. Both backends override it.
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
    /// [`Self::record_send`] for a send whose plan is already the only one: the caller holds the send's
    /// claim with this plan ([`SeqAllocator::claim_send`] answered [`Claim::Free`]) and the client said
    /// it is the message's first transmission, so no earlier plan can exist and no racing resend can
    /// record another (it finds this plan in the claim). A backend whose insert-if-absent is costly
    /// writes the plan with a plain insert (Scylla: no lightweight transaction), still before the
    /// entries, so a crash in between leaves a plan a resend completes. Never returns a plan of its
    /// own: `Some` only from the default, which is [`Self::record_send`].
    ///
    /// # Errors
    /// As [`Self::record_send`].
    async fn record_claimed_send(
        &self,
        device_id: i64,
        client_msg_id: &str,
        plan: &SendPlan,
        entries: &[(i64, Message)],
    ) -> Result<Option<SendPlan>> {
        self.record_send(device_id, client_msg_id, plan, entries)
            .await
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
    /// [`Self::next`] plus the next conversation seq of `conversation`, in the same call (one Redis
    /// script call per master; the embedded counters under one lock). A lost conversation counter
    /// resumes above [`crate::ConversationStore::last_conversation_seq`], as a user's does above the
    /// inbox's largest seq; the call that recovered it reports the seqs it skipped
    /// ([`ConversationSeqs::skipped`]), for the caller to record with
    /// [`crate::ConversationStore::record_gap`] once its send is stored.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] when a counter or a recovery read fails.
    async fn next_in_conversation(
        &self,
        user_ids: &[i64],
        conversation: ConversationKey,
    ) -> Result<ConversationSeqs>;
    /// The last seq allocated for `user_id` (0 if none), without allocating.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn current(&self, user_id: i64) -> Result<u64>;
    /// What the claim of the send `(device_id, client_msg_id)` holds, without claiming: the plan a
    /// first attempt claimed ([`Claim::Planned`]: a resend within the claim window, answered from it
    /// with no database read), [`Claim::Free`] (none within the window: a first send, or a resend after
    /// the window or a loss of the claims, which the dedup plan's insert-if-absent then catches), or
    /// [`Claim::Unknown`] (claimed without a readable plan, or an allocator that keeps no claims: the
    /// default): read the dedup plan.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn claimed(&self, _device_id: i64, _client_msg_id: &str) -> Result<Claim> {
        Ok(Claim::Unknown)
    }
    /// Claims the send `(device_id, client_msg_id)`, atomically, with `plan` (a first attempt's) or,
    /// given `None`, with a marker that holds no plan: [`Claim::Free`] = it was free and now holds
    /// what was given for the claim window (with a plan: every racing attempt within it gets `plan`,
    /// from [`Self::claimed`] or this call; with the marker: every racing attempt is told
    /// [`Claim::Unknown`]); [`Claim::Planned`] = another attempt claimed it first with that plan
    /// (finish that one: the caller's seqs stay unused); [`Claim::Unknown`] = claimed before without a
    /// readable plan, or a plan too large to hold (the marker was stored instead), or no claims kept
    /// here (the default): arbitrate with the plan's insert-if-absent ([`MessageStore::record_send`]).
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn claim_send(
        &self,
        _device_id: i64,
        _client_msg_id: &str,
        _plan: Option<&SendPlan>,
    ) -> Result<Claim> {
        Ok(Claim::Unknown)
    }
    /// Keeps `value` under `key` for `ttl`, where every process of the cluster can read it
    /// ([`Self::snapshot`]): the rest of a paged read (the conversation list) that later pages are
    /// served from. The default keeps nothing (every page is read afresh).
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn put_snapshot(
        &self,
        _key: &str,
        _value: bytes::Bytes,
        _ttl: std::time::Duration,
    ) -> Result<()> {
        Ok(())
    }
    /// Forgets the snapshot under `key`, if any.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn drop_snapshot(&self, _key: &str) -> Result<()> {
        Ok(())
    }
    /// The value [`Self::put_snapshot`] kept under `key`, if it has not expired.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn snapshot(&self, _key: &str) -> Result<Option<bytes::Bytes>> {
        Ok(None)
    }
    /// Whether [`Self::put_snapshot`] keeps anything (a caller then reads ahead to fill one).
    fn keeps_snapshots(&self) -> bool {
        false
    }
    /// The current version of `group_id`'s membership, shared by every process of the cluster: an
    /// opaque value that [`Self::bump_group_version`] replaces after every membership change, and that
    /// a lost one (a Redis loss, an expiry) is replaced by a fresh random value on this read. A caller
    /// may keep a member list read *after* this call under the version it answered, and reuse it while
    /// the version is unchanged. `None`: this backend keeps no versions (read the members each time).
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn group_version(&self, _group_id: i64) -> Result<Option<u64>> {
        Ok(None)
    }
    /// Replaces `group_id`'s membership version with a fresh random value: called after every change
    /// of the group's members (join, leave, kick, dissolution) is written, before it is answered.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn bump_group_version(&self, _group_id: i64) -> Result<()> {
        Ok(())
    }
    /// Takes the lock `name` for `holder` unless another holder has it, for at most `ttl` (a holder
    /// that dies without [`Self::unlock`] frees it then): `true` when `holder` has it now. Serializes a
    /// read-check-write across every process of the cluster (user-api's group membership and role
    /// changes). Not a fence: a holder stalled past `ttl` may overlap the next one.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure (then it may have been taken: it expires).
    async fn try_lock(&self, name: &str, holder: &str, ttl: std::time::Duration) -> Result<bool>;
    /// Frees the lock `name` if `holder` still has it (one that expired and was taken by another
    /// holder is left to that holder).
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure (the lock then expires after its `ttl`).
    async fn unlock(&self, name: &str, holder: &str) -> Result<()>;
}

/// What a send's claim holds ([`SeqAllocator::claimed`], [`SeqAllocator::claim_send`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// No claim within the claim window (after [`SeqAllocator::claim_send`]: there was none, and the
    /// caller's plan now holds it).
    Free,
    /// Claimed with this plan.
    Planned(SendPlan),
    /// Nothing known: claimed without a readable plan, or claims are not kept.
    Unknown,
}
