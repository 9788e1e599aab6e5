//! Conversations on top of the per-user inboxes: each user's conversation rows (last message, unread,
//! read positions, mute/pin, list version), the per-conversation history index, read receipts, recall
//! and delete-for-me. The model and its costs are in docs/ARCHITECTURE.md, "Conversations".
//!
//! Two numberings meet here. A message has a **conversation seq** (`conv_seq`), shared by every copy
//! of it: one counter per 1:1 pair or per group, allocated once per send. Each copy also has its
//! **inbox seq** (the per-user seq of [`crate::MessageStore`]). Read positions and unread counts are in
//! conversation seqs (so a peer's read position means the same in both inboxes); a conversation row's
//! `version` is in the owner's inbox seqs (so one number orders every change of one user's list).
//!
//! Every write on the send path ([`ConversationStore::record_message`]) is blind (no read): the
//! Scylla backend makes "newest wins" hold with `USING TIMESTAMP` (see `sql/0007_conversations.cql`),
//! the embedded backend compares inside its write transaction.

use async_trait::async_trait;
use zhibo_proto::client::{Message, ReceiverType};

use crate::{Error, ErrorKind, Result};

/// `content_type` of a copy whose message was recalled: content empty. Negative content types are
/// zhibo's own (applications use values >= 0).
pub const CONTENT_TYPE_RECALLED: i32 = -10;

/// `content_type` of a copy its owner deleted for themselves: content empty.
pub const CONTENT_TYPE_DELETED: i32 = -11;

/// The kind of a conversation; the numbers are those of [`ReceiverType`].
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum ConversationKind {
    /// Two users.
    Direct,
    /// A group chat.
    Group,
}

impl ConversationKind {
    /// The stored number (that of [`ReceiverType::User`] / [`ReceiverType::Group`]).
    pub fn as_i32(self) -> i32 {
        match self {
            ConversationKind::Direct => ReceiverType::User as i32,
            ConversationKind::Group => ReceiverType::Group as i32,
        }
    }

    /// The kind stored as `n`, if valid.
    pub fn from_i32(n: i32) -> Option<Self> {
        match ReceiverType::try_from(n).ok()? {
            ReceiverType::User => Some(ConversationKind::Direct),
            ReceiverType::Group => Some(ConversationKind::Group),
            _ => None,
        }
    }
}

/// A conversation as one user sees it: with a peer (`Direct`, `id` = the peer's user id) or in a group
/// (`Group`, `id` = the group id).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct ConversationId {
    /// Direct or group.
    pub kind: ConversationKind,
    /// The peer's user id or the group id.
    pub id: i64,
}

impl ConversationId {
    /// The 1:1 conversation with `peer`.
    pub fn direct(peer: i64) -> Self {
        ConversationId {
            kind: ConversationKind::Direct,
            id: peer,
        }
    }

    /// The conversation of group `group_id`.
    pub fn group(group_id: i64) -> Self {
        ConversationId {
            kind: ConversationKind::Group,
            id: group_id,
        }
    }

    /// The shared key of this conversation seen by `user_id`.
    pub fn key(self, user_id: i64) -> ConversationKey {
        match self.kind {
            ConversationKind::Direct => ConversationKey::direct(user_id, self.id),
            ConversationKind::Group => ConversationKey::Group(self.id),
        }
    }
}

/// A conversation shared by its parties, where its conversation seqs are numbered: a 1:1 pair (lower
/// user id first) or a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConversationKey {
    /// Two users, `low < high` (or equal: a note to oneself).
    Direct {
        /// The lower user id.
        low: i64,
        /// The higher user id.
        high: i64,
    },
    /// A group.
    Group(i64),
}

impl ConversationKey {
    /// The pair `a`, `b` in either order.
    pub fn direct(a: i64, b: i64) -> Self {
        ConversationKey::Direct {
            low: a.min(b),
            high: a.max(b),
        }
    }

    /// The conversation `message` (a 1:1 or group message) belongs to; `None` for other receivers.
    pub fn of_message(message: &Message) -> Option<Self> {
        match ReceiverType::try_from(message.receiver_type).ok()? {
            ReceiverType::User => Some(Self::direct(message.sender_user_id, message.receiver_id)),
            ReceiverType::Group => Some(ConversationKey::Group(message.receiver_id)),
            _ => None,
        }
    }

    /// How `user_id`, one of its parties, sees it.
    pub fn seen_by(self, user_id: i64) -> ConversationId {
        match self {
            ConversationKey::Direct { low, high } => {
                ConversationId::direct(if user_id == low { high } else { low })
            }
            ConversationKey::Group(g) => ConversationId::group(g),
        }
    }

    /// The stored form `(kind, a, b)`: `(direct, low, high)` or `(group, group_id, 0)`.
    pub fn parts(self) -> (i32, i64, i64) {
        match self {
            ConversationKey::Direct { low, high } => (ConversationKind::Direct.as_i32(), low, high),
            ConversationKey::Group(g) => (ConversationKind::Group.as_i32(), g, 0),
        }
    }
}

/// One user's row of one conversation: what the conversation list shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    /// The owner of this row.
    pub user_id: i64,
    /// Which conversation.
    pub conversation: ConversationId,
    /// Conversation seq of the newest message (0: none yet).
    pub last_seq: u64,
    /// The owner's copy of that message (its `seq` is the owner's inbox seq); a recalled or deleted
    /// one has content type [`CONTENT_TYPE_RECALLED`] / [`CONTENT_TYPE_DELETED`] and no content.
    pub last_message: Option<Message>,
    /// The owner has read everything up to this conversation seq (never moves back).
    pub read_seq: u64,
    /// Direct only: the peer has read up to this conversation seq (never moves back); 0 in groups.
    pub peer_read_seq: u64,
    /// Muted: still counts unread, flagged for push.
    pub muted: bool,
    /// Pinned to the top of the list.
    pub pinned: bool,
    /// The owner's inbox seq of the latest change to this row (list sync: "rows with version > v").
    pub version: u64,
    /// The latest range of conversation seqs that were never allocated (a counter recovered after
    /// Redis lost it resumes above a margin, see [`crate::redis_seq`]): not counted as unread.
    pub skipped: Option<SeqGap>,
}

impl Conversation {
    /// Messages newer than the read position (including recalled ones and the gaps of sends that
    /// failed after allocating their conversation seq, which a later read clears), less the
    /// [`Self::skipped`] seqs: see [`unread_count`].
    pub fn unread(&self) -> u64 {
        unread_count(self.last_seq, self.read_seq, self.skipped)
    }

    /// Time of the last activity (the last message's server time, 0 without one): the list order.
    pub fn last_activity_ms(&self) -> i64 {
        self.last_message.as_ref().map_or(0, |m| m.server_time_ms)
    }
}

/// Conversation seqs `from..=to` that a recovered counter skipped: no message has them (see
/// [`ConversationStore::record_gap`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SeqGap {
    /// The first skipped seq.
    pub from: u64,
    /// The last skipped seq (inclusive).
    pub to: u64,
}

impl SeqGap {
    /// How many of the seqs in `(after, up_to]` the gap holds.
    pub fn overlap(&self, after: u64, up_to: u64) -> u64 {
        let low = self.from.max(after.saturating_add(1));
        let high = self.to.min(up_to);
        if high >= low {
            high - low + 1
        } else {
            0
        }
    }
}

/// Unread messages of a row whose last message is `last_seq` and read position `read_seq`: the seqs in
/// between, less those `skipped` holds. A message recorded in flight below the gap's end (allocated
/// before Redis lost the counter, written after) is not counted either: an under-count of at most the
/// sends in flight at that moment, until the next read.
pub fn unread_count(last_seq: u64, read_seq: u64, skipped: Option<SeqGap>) -> u64 {
    let between = last_seq.saturating_sub(read_seq);
    between.saturating_sub(skipped.map_or(0, |g| g.overlap(read_seq, last_seq)))
}

/// Sorts rows the way the list shows them: newest activity first, ties by conversation.
pub fn sort_for_list(rows: &mut [Conversation]) {
    rows.sort_by(|a, b| {
        b.last_activity_ms()
            .cmp(&a.last_activity_ms())
            .then(a.conversation.cmp(&b.conversation))
    });
}

/// Applies `query` to every row of one user: the version filter, the order of [`sort_for_list`], the
/// cursor and the limit (both backends read the user's rows, then call this).
pub(crate) fn list_page(mut rows: Vec<Conversation>, query: &ListQuery) -> Vec<Conversation> {
    rows.retain(|r| r.version > query.changed_after);
    sort_for_list(&mut rows);
    let start = match query.after {
        None => 0,
        Some(c) => rows.partition_point(|r| {
            (std::cmp::Reverse(r.last_activity_ms()), r.conversation)
                <= (std::cmp::Reverse(c.last_activity_ms), c.conversation)
        }),
    };
    rows.into_iter().skip(start).take(query.limit).collect()
}

/// The copy of `message` (the sender's) that lands in `user_id`'s inbox at `inbox_seq`: only the
/// sender's own copies name the sending device.
pub(crate) fn copy_for(message: &Message, user_id: i64, inbox_seq: u64) -> Message {
    let mut copy = message.clone();
    copy.seq = inbox_seq;
    if user_id != message.sender_user_id {
        copy.sender_device_id = 0;
    }
    copy
}

/// `message` with its content replaced by a tombstone of `content_type`.
pub(crate) fn tombstone(message: &mut Message, content_type: i32) {
    message.content_type = content_type;
    message.content = bytes::Bytes::new();
}

/// The recall rules, shared by both backends: a recall of a recall, of someone else's message
/// (unless `may_recall_others`), or of one's own past the window is refused.
pub(crate) fn check_recall(
    recalled: bool,
    sender_user_id: i64,
    server_time_ms: i64,
    request: &RecallRequest,
) -> Result<()> {
    if recalled {
        return Err(Error::new(
            ErrorKind::AlreadyRecalled,
            "message already recalled",
        ));
    }
    if request.may_recall_others {
        return Ok(());
    }
    if sender_user_id != request.by_user_id {
        return Err(Error::new(
            ErrorKind::NotAllowed,
            "only the sender or a group owner/admin may recall a message",
        ));
    }
    if request.now_ms.saturating_sub(server_time_ms) > request.window_ms {
        return Err(Error::new(
            ErrorKind::TooLate,
            "the recall window has passed",
        ));
    }
    Ok(())
}

/// Where a list page starts: after the row with this activity time and conversation (exclusive), in
/// the order of [`sort_for_list`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListCursor {
    /// [`Conversation::last_activity_ms`] of the last row of the previous page.
    pub last_activity_ms: i64,
    /// Its conversation.
    pub conversation: ConversationId,
}

/// A page of the conversation list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListQuery {
    /// Only rows with `version` greater than this (0: every row).
    pub changed_after: u64,
    /// Start after this row (`None`: from the newest).
    pub after: Option<ListCursor>,
    /// At most this many rows.
    pub limit: usize,
}

/// Which way a history page goes from its (exclusive) conversation seq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryPage {
    /// Older messages, newest first: `Before(u64::MAX)` is the latest page.
    Before(u64),
    /// Newer messages, oldest first.
    After(u64),
}

/// One message of a conversation's history: the owner's copy and its conversation seq.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryEntry {
    /// The message's conversation seq.
    pub conv_seq: u64,
    /// The owner's inbox copy (`seq` = inbox seq); tombstoned if recalled or deleted.
    pub message: Message,
}

/// Mute/pin settings of one user's conversation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConversationSettings {
    /// Muted.
    pub muted: bool,
    /// Pinned.
    pub pinned: bool,
}

/// Who asks for a recall, and the rule it is judged by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecallRequest {
    /// The user recalling.
    pub by_user_id: i64,
    /// A group owner or admin (decided by the caller): may recall anyone's message, with no window.
    pub may_recall_others: bool,
    /// Now, Unix ms.
    pub now_ms: i64,
    /// How long after its server time a sender may recall their own message.
    pub window_ms: i64,
}

/// What a recall changed: every copy that was replaced by a tombstone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recalled {
    /// The recalled message's id.
    pub message_id: u64,
    /// Its sender.
    pub sender_user_id: i64,
    /// `(user_id, inbox seq)` of every copy (the sender's included): the users to notify.
    pub recipients: Vec<(i64, u64)>,
}

/// Conversation rows, history index, read positions, recall and delete-for-me.
#[async_trait]
pub trait ConversationStore: Send + Sync {
    /// Records a stored 1:1 or group message in its conversation, blind writes only (the send path):
    /// every recipient's row gets it as last message (unless a newer one is there) and version = that
    /// recipient's inbox seq, its history index gets `conv_seq`; the sender's read position moves to
    /// `conv_seq` (and, in 1:1, the peer row's `peer_read_seq`; in a group, the sender's group read
    /// position); the conversation's record (sender, time, copies) is kept for recall and its last
    /// seq for [`Self::last_conversation_seq`]. `message` is the sender's copy; `recipients` is
    /// `(user_id, inbox seq)` of every copy, the sender's included (the send plan). Idempotent.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] when `message` is not a 1:1 or group message (nothing written);
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn record_message(
        &self,
        conv_seq: u64,
        message: &Message,
        recipients: &[(i64, u64)],
    ) -> Result<()>;

    /// The largest conversation seq recorded for `key` (0 when none): the floor from which a
    /// conversation seq counter resumes after Redis lost it.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn last_conversation_seq(&self, key: ConversationKey) -> Result<u64>;

    /// Remembers in each of `users`' rows of `key` that its conversation seqs `gap` were never
    /// allocated (a counter that Redis lost resumed above them), so they do not count as unread. A row
    /// keeps one gap: the one that ends highest. Blind: callers pass rows that exist (the recipients of
    /// the first send recorded after the recovery, see [`crate::SeqAllocator::next_in_conversation`]).
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn record_gap(&self, key: ConversationKey, users: &[i64], gap: SeqGap) -> Result<()>;

    /// Creates `user_id`'s row of `conversation` read up to `from_seq` (a group join: messages before
    /// it are not theirs and do not count as unread), version `version`. Existing positions are kept
    /// where larger.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn join(
        &self,
        user_id: i64,
        conversation: ConversationId,
        from_seq: u64,
        version: u64,
    ) -> Result<()>;

    /// `user_id`'s row of `conversation`, if they have one.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn get(&self, user_id: i64, conversation: ConversationId)
        -> Result<Option<Conversation>>;

    /// A page of `user_id`'s conversation list in the order of [`sort_for_list`].
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn list(&self, user_id: i64, query: ListQuery) -> Result<Vec<Conversation>>;

    /// Marks `conversation` read by `user_id` up to `read_seq` (a smaller position than the stored one
    /// changes nothing) with version `version`; in 1:1 the peer's row learns it as `peer_read_seq`, in a
    /// group the group's read positions do.
    ///
    /// # Errors
    /// [`ErrorKind::NotMember`] when `user_id` has no row of `conversation`;
    /// [`ErrorKind::OutOfRange`] when `read_seq` is beyond its last message (nothing changed either
    /// way); [`ErrorKind::Unavailable`] on backend failure.
    async fn mark_read(
        &self,
        user_id: i64,
        conversation: ConversationId,
        read_seq: u64,
        version: u64,
    ) -> Result<()>;

    /// The members of `group_id` who have read its message `conv_seq`, ascending, from the group's
    /// read positions (one partition of at most the group's size). Positions of users who left stay:
    /// the caller intersects with the current members.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn group_readers(&self, group_id: i64, conv_seq: u64) -> Result<Vec<i64>>;

    /// Sets mute/pin of `user_id`'s `conversation`, version `version` (a larger version wins).
    ///
    /// # Errors
    /// [`ErrorKind::NotMember`] when `user_id` has no row of `conversation` (nothing changed);
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn set_settings(
        &self,
        user_id: i64,
        conversation: ConversationId,
        settings: ConversationSettings,
        version: u64,
    ) -> Result<()>;

    /// Raises the version of rows to the given one (e.g. the inbox seq of a recall notice), blind:
    /// a missing row is created (with no message), so callers touch only rows that exist, such as a
    /// recall's recipients.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn touch(&self, rows: &[(i64, ConversationId, u64)]) -> Result<()>;

    /// A page of `user_id`'s history of `conversation`, at most `limit` entries, without gaps or
    /// repeats across pages (messages deleted for this user are left out).
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn history(
        &self,
        user_id: i64,
        conversation: ConversationId,
        page: HistoryPage,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>>;

    /// Recalls message `conv_seq` of `key`: every copy (and every row whose last message it is) is
    /// replaced by a [`CONTENT_TYPE_RECALLED`] tombstone, its content gone.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] for an unknown `conv_seq` (or one whose record expired);
    /// [`ErrorKind::AlreadyRecalled`] for a recalled one; [`ErrorKind::NotAllowed`] for someone
    /// else's message without `may_recall_others`; [`ErrorKind::TooLate`] for one's own message
    /// past the window. Nothing is changed in these cases. [`ErrorKind::Unavailable`] on backend failure.
    async fn recall(
        &self,
        key: ConversationKey,
        conv_seq: u64,
        request: RecallRequest,
    ) -> Result<Recalled>;

    /// Deletes message `conv_seq` of `conversation` for `user_id` only: gone from their history, their
    /// inbox copy becomes a [`CONTENT_TYPE_DELETED`] tombstone (so their other devices learn it by
    /// sync), and so does their row's last message if it was this one; version `version`.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] when the message is not in their history (nothing changed);
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn delete_for_me(
        &self,
        user_id: i64,
        conversation: ConversationId,
        conv_seq: u64,
        version: u64,
    ) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(
        user_id: i64,
        conversation: ConversationId,
        time: Option<i64>,
        version: u64,
    ) -> Conversation {
        Conversation {
            user_id,
            conversation,
            last_seq: 1,
            last_message: time.map(|t| Message {
                server_time_ms: t,
                ..Default::default()
            }),
            read_seq: 0,
            peer_read_seq: 0,
            muted: false,
            pinned: false,
            version,
            skipped: None,
        }
    }

    #[test]
    fn keys_are_shared_by_both_parties() {
        let m = Message {
            sender_user_id: 9,
            receiver_type: ReceiverType::User as i32,
            receiver_id: 4,
            ..Default::default()
        };
        let key = ConversationKey::of_message(&m).expect("1:1");
        assert_eq!(key, ConversationKey::Direct { low: 4, high: 9 });
        assert_eq!(key.seen_by(9), ConversationId::direct(4));
        assert_eq!(key.seen_by(4), ConversationId::direct(9));
        assert_eq!(ConversationId::direct(9).key(4), key);
        assert_eq!(key.parts(), (1, 4, 9));
        let g = Message {
            receiver_type: ReceiverType::Group as i32,
            receiver_id: 7,
            ..m.clone()
        };
        let key = ConversationKey::of_message(&g).expect("group");
        assert_eq!(
            (key.seen_by(9), key.parts()),
            (ConversationId::group(7), (2, 7, 0))
        );
        let room = Message {
            receiver_type: ReceiverType::Room as i32,
            ..m
        };
        assert_eq!(ConversationKey::of_message(&room), None);
        assert_eq!(ConversationKind::from_i32(3), None);
    }

    #[test]
    fn list_pages_break_ties_without_gaps_and_filter_by_version() {
        // Three rows with the same activity time, one newer, one without a message.
        let rows = vec![
            conv(1, ConversationId::direct(3), Some(100), 5),
            conv(1, ConversationId::group(2), Some(100), 6),
            conv(1, ConversationId::direct(2), Some(100), 7),
            conv(1, ConversationId::direct(8), Some(200), 8),
            conv(1, ConversationId::group(9), None, 9),
        ];
        let want = [
            ConversationId::direct(8),
            ConversationId::direct(2),
            ConversationId::direct(3),
            ConversationId::group(2),
            ConversationId::group(9),
        ];
        let mut got = Vec::new();
        let mut after = None;
        loop {
            let page = list_page(
                rows.clone(),
                &ListQuery {
                    changed_after: 0,
                    after,
                    limit: 2,
                },
            );
            got.extend(page.iter().map(|c| c.conversation));
            match page.last() {
                Some(last) if page.len() == 2 => {
                    after = Some(ListCursor {
                        last_activity_ms: last.last_activity_ms(),
                        conversation: last.conversation,
                    })
                }
                _ => break,
            }
        }
        assert_eq!(got, want);
        let changed = list_page(
            rows,
            &ListQuery {
                changed_after: 6,
                after: None,
                limit: 10,
            },
        );
        let changed: Vec<u64> = changed.iter().map(|c| c.version).collect();
        assert_eq!(changed, [8, 7, 9]);
    }

    #[test]
    fn recall_rules() {
        let req = |by, admin, now| RecallRequest {
            by_user_id: by,
            may_recall_others: admin,
            now_ms: now,
            window_ms: 100,
        };
        let kind = |r: Result<()>| r.err().map(|e| e.kind);
        assert_eq!(
            kind(check_recall(false, 1, 1_000, &req(1, false, 1_100))),
            None
        );
        assert_eq!(
            kind(check_recall(false, 1, 1_000, &req(1, false, 1_101))),
            Some(ErrorKind::TooLate)
        );
        assert_eq!(
            kind(check_recall(false, 1, 1_000, &req(2, false, 1_000))),
            Some(ErrorKind::NotAllowed)
        );
        assert_eq!(
            kind(check_recall(false, 1, 1_000, &req(2, true, 9_999))),
            None
        );
        assert_eq!(
            kind(check_recall(true, 1, 1_000, &req(1, true, 1_000))),
            Some(ErrorKind::AlreadyRecalled)
        );
    }

    #[test]
    fn skipped_seqs_are_not_unread() {
        let gap = Some(SeqGap { from: 6, to: 1_005 });
        // Read before the gap, last message after it: only the real messages count.
        assert_eq!(unread_count(1_006, 5, gap), 1);
        assert_eq!(unread_count(1_010, 3, gap), 7);
        // Read inside the gap.
        assert_eq!(unread_count(1_006, 500, gap), 1);
        // Read past it, or no gap.
        assert_eq!(unread_count(1_010, 1_006, gap), 4);
        assert_eq!(unread_count(1_006, 5, None), 1_001);
        // A message allocated before the loss and recorded in flight lands inside the gap: not
        // counted (the documented under-count).
        assert_eq!(unread_count(7, 5, gap), 0);
        assert_eq!(unread_count(5, 5, gap), 0);
    }
}
