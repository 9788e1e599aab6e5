//! Conversation requests (issue #13), the one implementation behind the client packets (from
//! `zhibo.cmd`) and user-api's HTTP routes: the list (with list sync), history pages, mark read (a
//! `ConversationUpdate` to the user's other devices, a `ReadReceipt` to the 1:1 peer or to the author
//! of the group message read up to), group readers, recall (a `Recalled` to every device of every
//! party), delete-for-me, mute/pin, and typing (relayed to online devices, never stored).
//!
//! Every live notice goes through [`Logic::deliver_to_user`], the path messages take. A change of a
//! user's row gets a fresh inbox seq of that user as its `version` (list sync: "rows changed after
//! v"); nothing is stored at that seq, so it is a hole in the user's inbox numbering, which sync
//! already treats as a normal gap (see proto/README.md).

use prost::Message as _;
use tracing::debug;
use zhibo_proto::bus::Origin;
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{
    self as pb, ConversationListInput, ConversationListOutput, ConversationRef,
    ConversationSettingsInput, ConversationUpdate, DeleteForMeInput, ErrorCode, GroupReadersInput,
    GroupReadersOutput, HistoryInput, HistoryOutput, MarkReadInput, Packet, ReadReceipt,
    RecallInput, Recalled, ReceiverType, TypingInput,
};
use zhibo_store::ids::now_ms;
use zhibo_store::redis_seq::list_snapshot_key;
use zhibo_store::{
    Conversation, ConversationId, ConversationKind, ConversationSettings, ErrorKind, HistoryPage,
    ListCursor, ListQuery, RecallRequest, Role,
};

use crate::sync::{fit_page, page_len};
use crate::{Logic, LogicError, Op};

/// Conversation-list page when the client asks for 0, and the largest it may ask for.
pub const LIST_PAGE: usize = 100;
/// Largest conversation-list page.
pub const MAX_LIST_PAGE: usize = 500;
/// Rows a conversation-list snapshot holds at most (~115 bytes each with a short last message): a
/// listing longer than this reads the partition again after them.
pub(crate) const SNAPSHOT_ROWS: usize = 2000;
/// Encoded bytes a conversation-list snapshot holds at most (rows with large last messages).
const SNAPSHOT_BYTES: usize = 1 << 20;
/// How long after its first page a listing is served from its snapshot, milliseconds: the time a
/// client takes to ask for the next pages, not a cache.
const SNAPSHOT_MS: i64 = 10_000;
/// History page when the client asks for 0.
pub const HISTORY_PAGE: usize = 50;
/// Largest history page.
pub const MAX_HISTORY_PAGE: usize = 200;

/// The client-facing error for a store error of a conversation request: the refusals the store
/// decides (`NotMember`, `OutOfRange`, `NotFound`, `NotAllowed`, `TooLate`, `AlreadyRecalled`) keep
/// their meaning and text; failures map as every other command's do.
pub(crate) fn conv_err(e: zhibo_store::Error) -> LogicError {
    let code = match e.kind {
        ErrorKind::NotMember => ErrorCode::NotInConversation,
        ErrorKind::OutOfRange => ErrorCode::OutOfRange,
        ErrorKind::NotFound => ErrorCode::NotFound,
        ErrorKind::NotAllowed => ErrorCode::NotAllowed,
        ErrorKind::TooLate => ErrorCode::TooLate,
        ErrorKind::AlreadyRecalled => ErrorCode::AlreadyRecalled,
        _ => return LogicError::store(Op::Conversation, &e),
    };
    LogicError::new(code, e.message)
}

/// The conversation a client names: `USER` + the peer's id, or `GROUP` + the group id.
///
/// # Errors
/// `INVALID_ARGUMENT` for a missing reference, another type, or an id ≤ 0.
pub fn conversation_id(r: Option<&ConversationRef>) -> Result<ConversationId, LogicError> {
    let r = r.ok_or_else(|| LogicError::new(ErrorCode::InvalidArgument, "conversation missing"))?;
    if r.id <= 0 {
        return Err(LogicError::new(
            ErrorCode::InvalidArgument,
            "conversation id must be > 0",
        ));
    }
    match ReceiverType::try_from(r.r#type) {
        Ok(ReceiverType::User) => Ok(ConversationId::direct(r.id)),
        Ok(ReceiverType::Group) => Ok(ConversationId::group(r.id)),
        _ => Err(LogicError::new(
            ErrorCode::InvalidArgument,
            "conversation type must be USER or GROUP",
        )),
    }
}

/// The wire form of a conversation id.
pub fn conversation_ref(c: ConversationId) -> ConversationRef {
    ConversationRef {
        r#type: c.kind.as_i32(),
        id: c.id,
    }
}

/// The wire form of a user's conversation row.
pub fn to_wire(c: &Conversation) -> pb::Conversation {
    pb::Conversation {
        conversation: Some(conversation_ref(c.conversation)),
        last_seq: c.last_seq,
        last_message: c.last_message.clone().map(|mut m| {
            m.conv_seq = c.last_seq;
            Box::new(m)
        }),
        read_seq: c.read_seq,
        peer_read_seq: c.peer_read_seq,
        unread: c.unread(),
        muted: c.muted,
        pinned: c.pinned,
        version: c.version,
    }
}

fn not_in(conversation: ConversationId) -> LogicError {
    LogicError::new(
        ErrorCode::NotInConversation,
        format!(
            "you are not in conversation {:?} {}",
            conversation.kind, conversation.id
        ),
    )
}

impl Logic {
    /// A page of `user_id`'s conversation list (list sync with `changed_after`).
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for a bad cursor or a limit above [`MAX_LIST_PAGE`]; store failures.
    pub async fn conversation_list(
        &self,
        user_id: i64,
        input: &ConversationListInput,
    ) -> Result<ConversationListOutput, LogicError> {
        let limit = match input.limit as usize {
            0 => LIST_PAGE,
            n if n > MAX_LIST_PAGE => {
                return Err(LogicError::new(
                    ErrorCode::InvalidArgument,
                    format!("limit must be at most {MAX_LIST_PAGE}"),
                ))
            }
            n => n,
        };
        if input.after_activity_ms < 0 {
            // No activity time is negative: a corrupted cursor, not the end of the list.
            return Err(LogicError::new(
                ErrorCode::InvalidArgument,
                "after_activity_ms must be 0 or more",
            ));
        }
        let after = match &input.after {
            None => None,
            Some(r) => Some(ListCursor {
                last_activity_ms: input.after_activity_ms,
                conversation: conversation_id(Some(r))?,
            }),
        };
        // A later page of a listing read moments ago comes from the snapshot its previous page kept
        // (every row after that page, in Redis for a few seconds): one partition read per listing,
        // not one per page, and the pages of one listing agree with each other.
        if let Some(r) = &input.after {
            let key = list_snapshot_key(
                user_id,
                input.changed_after,
                r.r#type,
                r.id,
                input.after_activity_ms,
            );
            if let Some(rest) = self.list_snapshot(&key).await {
                // The snapshot's `version` carries the listing's expiry (see `list_page`).
                let expires_ms = i64::try_from(rest.version).unwrap_or(0);
                return Ok(self
                    .list_page(
                        user_id,
                        input,
                        limit,
                        rest.conversations,
                        rest.has_more,
                        expires_ms,
                    )
                    .await);
            }
        }
        let snapshots = self.stores.seq.keeps_snapshots();
        let rows = self
            .stores
            .conversations
            .list(
                user_id,
                ListQuery {
                    changed_after: input.changed_after,
                    after,
                    // With snapshots, read ahead what later pages will need (the partition is read
                    // whole anyway); without, one row more than the page tells whether more exist.
                    limit: if snapshots {
                        SNAPSHOT_ROWS + 1
                    } else {
                        limit + 1
                    },
                },
            )
            .await
            .map_err(conv_err)?;
        let mut conversations: Vec<_> = rows.iter().map(to_wire).collect();
        let beyond = snapshots && conversations.len() > SNAPSHOT_ROWS;
        conversations.truncate(SNAPSHOT_ROWS);
        Ok(self
            .list_page(
                user_id,
                input,
                limit,
                conversations,
                beyond,
                now_ms().saturating_add(SNAPSHOT_MS),
            )
            .await)
    }

    /// The page of `rows` (every row from the request's position on, in list order; `beyond`: more
    /// rows follow the last of them), keeping the rest as the snapshot the next page is served from
    /// until `expires_ms` (the listing's first read plus [`SNAPSHOT_MS`]: paging does not extend it).
    async fn list_page(
        &self,
        user_id: i64,
        input: &ConversationListInput,
        limit: usize,
        mut conversations: Vec<pb::Conversation>,
        beyond: bool,
        expires_ms: i64,
    ) -> ConversationListOutput {
        let n = page_len(&conversations, limit, self.config.max_sync_bytes);
        let mut rest = conversations.split_off(n);
        let has_more = beyond || !rest.is_empty();
        let ttl = expires_ms.saturating_sub(now_ms());
        if !rest.is_empty() && ttl > 0 && self.stores.seq.keeps_snapshots() {
            if let Some(last) = conversations.last() {
                let r = last.conversation.unwrap_or_default();
                let activity = last.last_message.as_ref().map_or(0, |m| m.server_time_ms);
                let key = list_snapshot_key(user_id, input.changed_after, r.r#type, r.id, activity);
                // At most SNAPSHOT_BYTES: the rows after that are read afresh by their page.
                let kept = page_len(&rest, rest.len(), SNAPSHOT_BYTES);
                let cut = kept < rest.len();
                rest.truncate(kept);
                let snapshot = ConversationListOutput {
                    conversations: rest,
                    has_more: beyond || cut,
                    version: u64::try_from(expires_ms).unwrap_or(0),
                };
                let ttl = std::time::Duration::from_millis(ttl.unsigned_abs());
                let seq = &self.stores.seq;
                // Best effort: without it the next page reads the partition again. An older
                // listing's snapshot under the same key must not serve this one's next page.
                if let Err(e) = seq
                    .put_snapshot(&key, snapshot.encode_to_vec().into(), ttl)
                    .await
                {
                    debug!(error = %e, "conversation list snapshot not kept");
                    let _ = seq.drop_snapshot(&key).await;
                }
            }
        }
        let version = conversations
            .iter()
            .map(|c| c.version)
            .max()
            .unwrap_or(0)
            .max(input.changed_after);
        ConversationListOutput {
            has_more,
            conversations,
            version,
        }
    }

    /// The snapshot kept under `key`, if any and readable.
    async fn list_snapshot(&self, key: &str) -> Option<ConversationListOutput> {
        let bytes = match self.stores.seq.snapshot(key).await {
            Ok(found) => found?,
            Err(e) => {
                debug!(error = %e, "conversation list snapshot unreadable; reading the list");
                return None;
            }
        };
        ConversationListOutput::decode(bytes)
            .ok()
            .filter(|s| i64::try_from(s.version).is_ok_and(|expires| expires > now_ms()))
    }

    /// A page of `user_id`'s history of a conversation.
    ///
    /// # Errors
    /// `NOT_IN_CONVERSATION` when the user has no such conversation; `INVALID_ARGUMENT` for a bad
    /// reference or limit; store failures.
    pub async fn history(
        &self,
        user_id: i64,
        input: &HistoryInput,
    ) -> Result<HistoryOutput, LogicError> {
        let conversation = conversation_id(input.conversation.as_ref())?;
        let limit = match input.limit as usize {
            0 => HISTORY_PAGE,
            n if n > MAX_HISTORY_PAGE => {
                return Err(LogicError::new(
                    ErrorCode::InvalidArgument,
                    format!("limit must be at most {MAX_HISTORY_PAGE}"),
                ))
            }
            n => n,
        };
        let page = match (input.before, input.after) {
            (0, 0) => HistoryPage::Before(u64::MAX),
            (before, 0) => HistoryPage::Before(before),
            (0, after) => HistoryPage::After(after),
            _ => {
                return Err(LogicError::new(
                    ErrorCode::InvalidArgument,
                    "give before or after, not both",
                ))
            }
        };
        let store = &self.stores.conversations;
        // The membership check and the page are independent reads: issued together, a page costs
        // the slower of them, not their sum. The page is dropped unread when the check fails.
        let (row, entries) = tokio::join!(
            store.get(user_id, conversation),
            store.history(user_id, conversation, page, limit + 1)
        );
        if row.map_err(conv_err)?.is_none() {
            return Err(not_in(conversation));
        }
        let entries = entries.map_err(conv_err)?;
        let mut messages: Vec<_> = entries
            .into_iter()
            .map(|e| {
                let mut m = e.message;
                m.conv_seq = e.conv_seq;
                m
            })
            .collect();
        let has_more = fit_page(&mut messages, limit, self.config.max_sync_bytes);
        Ok(HistoryOutput { messages, has_more })
    }

    /// A fresh inbox seq of `user_id`: the version of a change of one of their rows.
    async fn next_version(&self, user_id: i64) -> Result<u64, LogicError> {
        let seqs = self
            .stores
            .seq
            .next(&[user_id])
            .await
            .map_err(|e| LogicError::store(Op::Conversation, &e))?;
        seqs.first()
            .copied()
            .ok_or_else(|| LogicError::new(ErrorCode::Internal, "no seq allocated for the version"))
    }

    /// `user_id`'s row, or `NOT_IN_CONVERSATION`.
    async fn row(
        &self,
        user_id: i64,
        conversation: ConversationId,
    ) -> Result<Conversation, LogicError> {
        self.stores
            .conversations
            .get(user_id, conversation)
            .await
            .map_err(conv_err)?
            .ok_or_else(|| not_in(conversation))
    }

    /// Pushes the changed `row` (with `deleted_conv_seq`, 0 unless a delete-for-me) to the user's
    /// devices but `origin`'s and returns the update (the answer).
    async fn announce(
        &self,
        origin: &Origin,
        row: &Conversation,
        deleted_conv_seq: u64,
    ) -> ConversationUpdate {
        let update = ConversationUpdate {
            conversation: Some(Box::new(to_wire(row))),
            deleted_conv_seq,
        };
        self.deliver_to_user(
            origin.user_id,
            origin.device_id,
            Packet::new(0, Body::ConversationUpdate(update.clone())),
            Vec::new(),
        )
        .await;
        update
    }

    /// Marks a conversation read by `origin`'s user: the user's other devices get a
    /// `ConversationUpdate`, the 1:1 peer (or, in a group, the author of the message read up to) a
    /// `ReadReceipt`. At or below the current position nothing changes; the receipt is still sent.
    ///
    /// # Errors
    /// `NOT_IN_CONVERSATION`, `OUT_OF_RANGE` (beyond the last message; nothing changed either way);
    /// `INVALID_ARGUMENT`; store failures.
    pub async fn mark_read(
        &self,
        origin: &Origin,
        input: &MarkReadInput,
    ) -> Result<ConversationUpdate, LogicError> {
        let user_id = origin.user_id;
        let conversation = conversation_id(input.conversation.as_ref())?;
        let row = self.row(user_id, conversation).await?;
        if input.read_seq > row.last_seq {
            return Err(LogicError::new(
                ErrorCode::OutOfRange,
                format!(
                    "read position {} is beyond the last message {}",
                    input.read_seq, row.last_seq
                ),
            ));
        }
        // At or below the current position nothing changes: no new version (list sync would return
        // the row again for nothing), no update to the other devices; still answered, and the
        // receipt still sent (a client may use it to restate its position).
        let unchanged = input.read_seq <= row.read_seq;
        let store = &self.stores.conversations;
        let row = if unchanged {
            row
        } else {
            let version = self.next_version(user_id).await?;
            store
                .mark_read(user_id, conversation, input.read_seq, version)
                .await
                .map_err(conv_err)?;
            self.row(user_id, conversation).await?
        };
        // Who learns it live: the 1:1 peer; in a group, the author of the message read up to while
        // still a member (the others ask GroupReaders when they want to know: bounded by the group's
        // size, on demand; a former member may not ask it, so is not told either).
        let notify = match conversation.kind {
            ConversationKind::Direct => Some(conversation.id),
            ConversationKind::Group => {
                let author = store
                    .history(
                        user_id,
                        conversation,
                        HistoryPage::After(input.read_seq.saturating_sub(1)),
                        1,
                    )
                    .await
                    .map_err(conv_err)?
                    .into_iter()
                    .find(|e| e.conv_seq == input.read_seq)
                    .map(|e| e.message.sender_user_id)
                    .filter(|&author| author != user_id);
                match author {
                    Some(author) => self
                        .stores
                        .groups
                        .get_member(conversation.id, author)
                        .await
                        .map_err(conv_err)?
                        .map(|_| author),
                    None => None,
                }
            }
        };
        if let Some(to) = notify.filter(|&to| to != user_id) {
            let seen_by_peer = conversation.key(user_id).seen_by(to);
            let receipt = ReadReceipt {
                conversation: Some(conversation_ref(seen_by_peer)),
                user_id,
                read_seq: row.read_seq,
            };
            self.deliver_to_user(
                to,
                0,
                Packet::new(0, Body::ReadReceipt(receipt)),
                Vec::new(),
            )
            .await;
        }
        if unchanged {
            return Ok(ConversationUpdate {
                conversation: Some(Box::new(to_wire(&row))),
                deleted_conv_seq: 0,
            });
        }
        Ok(self.announce(origin, &row, 0).await)
    }

    /// The current members of a group who have read its message `conv_seq`.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for an id ≤ 0 or `conv_seq` 0; `NOT_IN_CONVERSATION` for a user who is not a
    /// member; store failures.
    pub async fn group_readers(
        &self,
        user_id: i64,
        input: &GroupReadersInput,
    ) -> Result<GroupReadersOutput, LogicError> {
        if input.group_id <= 0 || input.conv_seq == 0 {
            return Err(LogicError::new(
                ErrorCode::InvalidArgument,
                "group_id and conv_seq must be > 0",
            ));
        }
        let group = ConversationId::group(input.group_id);
        let groups = &self.stores.groups;
        if groups
            .get_member(input.group_id, user_id)
            .await
            .map_err(conv_err)?
            .is_none()
        {
            return Err(not_in(group));
        }
        let members = groups.member_ids(input.group_id).await.map_err(conv_err)?;
        let readers = self
            .stores
            .conversations
            .group_readers(input.group_id, input.conv_seq)
            .await
            .map_err(conv_err)?;
        let mut user_ids: Vec<i64> = readers
            .into_iter()
            .filter(|u| members.contains(u))
            .collect();
        user_ids.sort_unstable();
        Ok(GroupReadersOutput {
            group_id: input.group_id,
            conv_seq: input.conv_seq,
            user_ids,
        })
    }

    /// Recalls a message: its sender within `logic.recall_window_secs`, or a group's owner/admin. Every
    /// device of every party gets `Recalled` (the recalling device as the answer); rows get a new
    /// version so list sync reports them.
    ///
    /// # Errors
    /// `NOT_FOUND` (unknown or expired), `ALREADY_RECALLED`, `NOT_ALLOWED`, `TOO_LATE`,
    /// `NOT_IN_CONVERSATION` (not a member of the group); store failures. Nothing changes when refused.
    pub async fn recall(
        &self,
        origin: &Origin,
        input: &RecallInput,
    ) -> Result<Recalled, LogicError> {
        let user_id = origin.user_id;
        let conversation = conversation_id(input.conversation.as_ref())?;
        let may_recall_others = match conversation.kind {
            ConversationKind::Direct => false,
            ConversationKind::Group => {
                let member = self
                    .stores
                    .groups
                    .get_member(conversation.id, user_id)
                    .await
                    .map_err(conv_err)?
                    .ok_or_else(|| not_in(conversation))?;
                matches!(member.role, Role::Owner | Role::Admin)
            }
        };
        let key = conversation.key(user_id);
        let recalled = self
            .stores
            .conversations
            .recall(
                key,
                input.conv_seq,
                RecallRequest {
                    by_user_id: user_id,
                    may_recall_others,
                    now_ms: now_ms(),
                    window_ms: i64::try_from(self.config.recall_window_secs.saturating_mul(1000))
                        .unwrap_or(i64::MAX),
                },
            )
            .await
            .map_err(conv_err)?;
        // New versions for every party's row, so a device that was offline learns it by list sync.
        let users: Vec<i64> = recalled.recipients.iter().map(|&(u, _)| u).collect();
        let versions = self
            .stores
            .seq
            .next(&users)
            .await
            .map_err(|e| LogicError::store(Op::Conversation, &e))?;
        let touched: Vec<(i64, ConversationId, u64)> = users
            .iter()
            .zip(versions)
            .map(|(&u, v)| (u, key.seen_by(u), v))
            .collect();
        self.stores
            .conversations
            .touch(&touched)
            .await
            .map_err(conv_err)?;
        let notice = |to: i64, seq: u64| Recalled {
            conversation: Some(conversation_ref(key.seen_by(to))),
            conv_seq: input.conv_seq,
            message_id: recalled.message_id,
            recalled_by: user_id,
            seq,
        };
        let mut answer = None;
        for &(to, seq) in &recalled.recipients {
            let exclude = if to == user_id { origin.device_id } else { 0 };
            if to == user_id {
                answer = Some(notice(to, seq));
            }
            self.deliver_to_user(
                to,
                exclude,
                Packet::new(0, Body::Recalled(notice(to, seq))),
                Vec::new(),
            )
            .await;
        }
        // An owner/admin who is not a party of the record (joined later) still gets an answer.
        Ok(answer.unwrap_or_else(|| notice(user_id, 0)))
    }

    /// Deletes a message from the user's own history and devices.
    ///
    /// # Errors
    /// `NOT_FOUND` (not in the user's history); `INVALID_ARGUMENT`; store failures.
    pub async fn delete_for_me(
        &self,
        origin: &Origin,
        input: &DeleteForMeInput,
    ) -> Result<ConversationUpdate, LogicError> {
        let user_id = origin.user_id;
        let conversation = conversation_id(input.conversation.as_ref())?;
        self.row(user_id, conversation).await?;
        let version = self.next_version(user_id).await?;
        self.stores
            .conversations
            .delete_for_me(user_id, conversation, input.conv_seq, version)
            .await
            .map_err(conv_err)?;
        let row = self.row(user_id, conversation).await?;
        Ok(self.announce(origin, &row, input.conv_seq).await)
    }

    /// Sets mute/pin of a conversation, synced to the user's other devices.
    ///
    /// # Errors
    /// `NOT_IN_CONVERSATION`; `INVALID_ARGUMENT`; store failures.
    pub async fn conversation_settings(
        &self,
        origin: &Origin,
        input: &ConversationSettingsInput,
    ) -> Result<ConversationUpdate, LogicError> {
        let user_id = origin.user_id;
        let conversation = conversation_id(input.conversation.as_ref())?;
        self.row(user_id, conversation).await?;
        let version = self.next_version(user_id).await?;
        self.stores
            .conversations
            .set_settings(
                user_id,
                conversation,
                ConversationSettings {
                    muted: input.muted,
                    pinned: input.pinned,
                },
                version,
            )
            .await
            .map_err(conv_err)?;
        let row = self.row(user_id, conversation).await?;
        Ok(self.announce(origin, &row, 0).await)
    }

    /// Relays "typing" to the peer's / other members' devices online now (never stored). The rate
    /// limit is the gateway's, per connection.
    ///
    /// # Errors
    /// `NOT_IN_CONVERSATION` (no such conversation of the user / not a member); `INVALID_ARGUMENT`;
    /// store failures.
    pub async fn typing(&self, origin: &Origin, input: &TypingInput) -> Result<(), LogicError> {
        let user_id = origin.user_id;
        let conversation = conversation_id(input.conversation.as_ref())?;
        let to: Vec<i64> = match conversation.kind {
            ConversationKind::Direct => {
                self.row(user_id, conversation).await?;
                vec![conversation.id]
            }
            ConversationKind::Group => {
                let groups = &self.stores.groups;
                if groups
                    .get_member(conversation.id, user_id)
                    .await
                    .map_err(conv_err)?
                    .is_none()
                {
                    return Err(not_in(conversation));
                }
                groups.member_ids(conversation.id).await.map_err(conv_err)?
            }
        };
        let key = conversation.key(user_id);
        for peer in to.into_iter().filter(|&u| u != user_id) {
            let typing = pb::Typing {
                conversation: Some(conversation_ref(key.seen_by(peer))),
                user_id,
            };
            self.deliver_to_user(peer, 0, Packet::new(0, Body::Typing(typing)), Vec::new())
                .await;
        }
        Ok(())
    }

    /// A new member of `group_id`: their row starts read up to the group's current last message, so
    /// older messages (not in their inbox) do not count as unread.
    ///
    /// # Errors
    /// Store failures.
    pub async fn join_group_conversation(
        &self,
        user_id: i64,
        group_id: i64,
    ) -> Result<(), LogicError> {
        let key = zhibo_store::ConversationKey::Group(group_id);
        let last = self
            .stores
            .conversations
            .last_conversation_seq(key)
            .await
            .map_err(conv_err)?;
        let version = self.next_version(user_id).await?;
        self.stores
            .conversations
            .join(user_id, ConversationId::group(group_id), last, version)
            .await
            .map_err(conv_err)
    }
}
