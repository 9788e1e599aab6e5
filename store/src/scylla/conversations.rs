//! [`ConversationStore`] on Scylla: tables `conversations` (partition: the user), `conversation_index`
//! (partition: the user, clustering: kind, peer, conv seq), `conversation_messages` and
//! `conversation_seqs` (partition: the conversation) and `group_reads` (partition: the group); see
//! `sql/0007_conversations.cql` for the write timestamps that make every send-path write blind.

use std::collections::HashMap;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};
use scylla::client::session::Session;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::DeserializeRow;
use zhibo_proto::client::Message;

use super::messages::{MessageRow, MESSAGE_COLUMNS};
use super::{cql_limit, db_error, from_cql, to_cql, ScyllaBackend, WRITE_CONCURRENCY};
use crate::traits::conversations::{check_recall, copy_for, list_page};
use crate::{
    Conversation, ConversationId, ConversationKey, ConversationKind, ConversationSettings,
    ConversationStore, Error, ErrorKind, HistoryEntry, HistoryPage, ListQuery, RecallRequest,
    Recalled, Result, SeqGap, CONTENT_TYPE_DELETED, CONTENT_TYPE_RECALLED,
};

/// Columns of a conversation row after `user_id`, in the order of [`ConversationRow`].
const ROW_COLUMNS: &str = "kind, peer_id, last_seq, last_inbox_seq, last_message_id, \
     last_sender_user_id, last_sender_device_id, last_client_msg_id, last_server_time_ms, \
     last_content_type, last_content, read_seq, peer_read_seq, muted, pinned, version, skip_from, \
     skip_to";

/// `WHERE` of one conversation row: `user_id`, `kind`, `peer_id` bound in that order.
const ROW_KEY: &str = "WHERE user_id = ? AND kind = ? AND peer_id = ?";

/// The conversation statements, prepared once.
pub(super) struct Statements {
    set_last: PreparedStatement,
    set_last_seq: PreparedStatement,
    set_version: PreparedStatement,
    set_read: PreparedStatement,
    set_peer_read: PreparedStatement,
    set_settings: PreparedStatement,
    set_gap: PreparedStatement,
    tombstone_last: PreparedStatement,
    index: PreparedStatement,
    index_get: PreparedStatement,
    index_delete: PreparedStatement,
    history_before: PreparedStatement,
    history_after: PreparedStatement,
    inbox_by_seqs: PreparedStatement,
    inbox_tombstone: PreparedStatement,
    record: PreparedStatement,
    record_get: PreparedStatement,
    record_recalled: PreparedStatement,
    conv_seq: PreparedStatement,
    conv_seq_get: PreparedStatement,
    group_read: PreparedStatement,
    group_reads: PreparedStatement,
    get: PreparedStatement,
    list: PreparedStatement,
}

impl Statements {
    pub(super) async fn prepare(session: &Session) -> Result<Self> {
        let p = |cql: String| super::prepare(session, cql);
        Ok(Statements {
            // USING TIMESTAMP 2 * conv_seq: the newest message wins whatever the arrival order.
            set_last: p(format!(
                "UPDATE conversations USING TIMESTAMP ? SET last_seq = ?, last_inbox_seq = ?, \
                 last_message_id = ?, last_sender_user_id = ?, last_sender_device_id = ?, \
                 last_client_msg_id = ?, last_server_time_ms = ?, last_content_type = ?, \
                 last_content = ? {ROW_KEY}"
            ))
            .await?,
            set_last_seq: p(format!(
                "UPDATE conversations USING TIMESTAMP ? SET last_seq = ? {ROW_KEY}"
            ))
            .await?,
            set_version: p(format!(
                "UPDATE conversations USING TIMESTAMP ? SET version = ? {ROW_KEY}"
            ))
            .await?,
            set_read: p(format!(
                "UPDATE conversations USING TIMESTAMP ? SET read_seq = ? {ROW_KEY}"
            ))
            .await?,
            set_peer_read: p(format!(
                "UPDATE conversations USING TIMESTAMP ? SET peer_read_seq = ? {ROW_KEY}"
            ))
            .await?,
            set_settings: p(format!(
                "UPDATE conversations USING TIMESTAMP ? SET muted = ?, pinned = ?, version = ? {ROW_KEY}"
            ))
            .await?,
            // USING TIMESTAMP skip_to: the gap that ends highest wins.
            set_gap: p(format!(
                "UPDATE conversations USING TIMESTAMP ? SET skip_from = ?, skip_to = ? {ROW_KEY}"
            ))
            .await?,
            // USING TIMESTAMP 2 * conv_seq + 1: beats message conv_seq, loses to any newer one.
            tombstone_last: p(format!(
                "UPDATE conversations USING TIMESTAMP ? SET last_content_type = ?, last_content = null {ROW_KEY}"
            ))
            .await?,
            index: p("INSERT INTO conversation_index (user_id, kind, peer_id, conv_seq, inbox_seq) \
                 VALUES (?, ?, ?, ?, ?)"
                .into())
            .await?,
            index_get: p(format!("SELECT inbox_seq FROM conversation_index {ROW_KEY} AND conv_seq = ?"))
                .await?,
            index_delete: p(format!("DELETE FROM conversation_index {ROW_KEY} AND conv_seq = ?")).await?,
            history_before: p(format!(
                "SELECT conv_seq, inbox_seq FROM conversation_index {ROW_KEY} AND conv_seq < ? \
                 ORDER BY kind DESC, peer_id DESC, conv_seq DESC LIMIT ?"
            ))
            .await?,
            history_after: p(format!(
                "SELECT conv_seq, inbox_seq FROM conversation_index {ROW_KEY} AND conv_seq > ? \
                 ORDER BY kind ASC, peer_id ASC, conv_seq ASC LIMIT ?"
            ))
            .await?,
            inbox_by_seqs: p(format!(
                "SELECT {MESSAGE_COLUMNS} FROM inbox WHERE user_id = ? AND seq IN ?"
            ))
            .await?,
            inbox_tombstone: p("UPDATE inbox SET content_type = ?, content = null WHERE user_id = ? AND seq = ?".into())
                .await?,
            // `recalled` is not written here: a resend after a recall keeps it.
            record: p("INSERT INTO conversation_messages (kind, conv_a, conv_b, conv_seq, message_id, \
                 sender_user_id, server_time_ms, recipients) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                .into())
            .await?,
            record_get: p("SELECT message_id, sender_user_id, server_time_ms, recipients, recalled \
                 FROM conversation_messages WHERE kind = ? AND conv_a = ? AND conv_b = ? AND conv_seq = ?"
                .into())
            .await?,
            record_recalled: p("UPDATE conversation_messages SET recalled = true \
                 WHERE kind = ? AND conv_a = ? AND conv_b = ? AND conv_seq = ?"
                .into())
            .await?,
            conv_seq: p("UPDATE conversation_seqs USING TIMESTAMP ? SET last_seq = ? \
                 WHERE kind = ? AND conv_a = ? AND conv_b = ?"
                .into())
            .await?,
            conv_seq_get: p("SELECT last_seq FROM conversation_seqs WHERE kind = ? AND conv_a = ? AND conv_b = ?".into())
                .await?,
            group_read: p("UPDATE group_reads USING TIMESTAMP ? SET read_seq = ? WHERE group_id = ? AND user_id = ?".into())
                .await?,
            group_reads: p("SELECT user_id, read_seq FROM group_reads WHERE group_id = ?".into()).await?,
            get: p(format!("SELECT {ROW_COLUMNS} FROM conversations {ROW_KEY}")).await?,
            list: p(format!("SELECT {ROW_COLUMNS} FROM conversations WHERE user_id = ?")).await?,
        })
    }
}

#[derive(DeserializeRow)]
struct ConversationRow {
    kind: i32,
    peer_id: i64,
    last_seq: Option<i64>,
    last_inbox_seq: Option<i64>,
    last_message_id: Option<i64>,
    last_sender_user_id: Option<i64>,
    last_sender_device_id: Option<i64>,
    last_client_msg_id: Option<String>,
    last_server_time_ms: Option<i64>,
    last_content_type: Option<i32>,
    last_content: Option<Bytes>,
    read_seq: Option<i64>,
    peer_read_seq: Option<i64>,
    muted: Option<bool>,
    pinned: Option<bool>,
    version: Option<i64>,
    skip_from: Option<i64>,
    skip_to: Option<i64>,
}

impl ConversationRow {
    fn into_conversation(self, user_id: i64) -> Result<Conversation> {
        let kind = ConversationKind::from_i32(self.kind).ok_or_else(|| {
            Error::new(
                ErrorKind::Corrupt,
                format!("conversation kind {} unknown", self.kind),
            )
        })?;
        let conversation = ConversationId {
            kind,
            id: self.peer_id,
        };
        let last_message = self.last_message_id.map(|message_id| {
            let sender = self.last_sender_user_id.unwrap_or_default();
            // The receiver as the message named it: the group, or the party that did not send it.
            let receiver_id = match kind {
                ConversationKind::Group => self.peer_id,
                ConversationKind::Direct if sender == user_id => self.peer_id,
                ConversationKind::Direct => user_id,
            };
            Message {
                message_id: from_cql(message_id),
                seq: self.last_inbox_seq.map_or(0, from_cql),
                sender_user_id: sender,
                sender_device_id: self.last_sender_device_id.unwrap_or_default(),
                receiver_type: kind.as_i32(),
                receiver_id,
                client_msg_id: self.last_client_msg_id.unwrap_or_default(),
                server_time_ms: self.last_server_time_ms.unwrap_or_default(),
                content_type: self.last_content_type.unwrap_or_default(),
                content: self.last_content.unwrap_or_default(),
                conv_seq: self.last_seq.map_or(0, from_cql),
            }
        });
        Ok(Conversation {
            user_id,
            conversation,
            last_seq: self.last_seq.map_or(0, from_cql),
            last_message,
            read_seq: self.read_seq.map_or(0, from_cql),
            peer_read_seq: self.peer_read_seq.map_or(0, from_cql),
            muted: self.muted.unwrap_or(false),
            pinned: self.pinned.unwrap_or(false),
            version: self.version.map_or(0, from_cql),
            skipped: match (self.skip_from, self.skip_to) {
                (Some(from), Some(to)) => Some(SeqGap {
                    from: from_cql(from),
                    to: from_cql(to),
                }),
                _ => None,
            },
        })
    }
}

#[derive(DeserializeRow)]
struct RecordRow {
    message_id: i64,
    sender_user_id: i64,
    server_time_ms: i64,
    #[scylla(default_when_null)]
    recipients: Vec<(i64, i64)>,
    recalled: Option<bool>,
}

/// A seq as a CQL bound that keeps its order: seqs never reach 2^63, so a larger one (`u64::MAX` as
/// "no bound") saturates instead of wrapping negative.
fn bound(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// The write timestamp of message `conv_seq` in `last_*` cells (+ 1 for its tombstone).
fn last_stamp(conv_seq: u64) -> i64 {
    bound(conv_seq).saturating_mul(2)
}

type RowKey = (i64, i32, i64);

fn row_key(user_id: i64, c: ConversationId) -> RowKey {
    (user_id, c.kind.as_i32(), c.id)
}

/// `(timestamp, value, user_id, kind, peer_id)`: the values of the single-cell row updates.
type CellValues = (i64, i64, i64, i32, i64);

impl ScyllaBackend {
    async fn batch(
        &self,
        what: &str,
        batch: &Batch,
        values: impl scylla::serialize::batch::BatchValues,
    ) -> Result<()> {
        super::count_batch(batch.statements.len());
        self.session
            .batch(batch, values)
            .await
            .map_err(|e| db_error(what, e))?;
        Ok(())
    }

    fn unlogged(&self, statements: &[&PreparedStatement]) -> Batch {
        let mut batch = Batch::new(BatchType::Unlogged);
        for st in statements {
            batch.append_statement((*st).clone());
        }
        batch
    }

    async fn row(
        &self,
        user_id: i64,
        conversation: ConversationId,
    ) -> Result<Option<Conversation>> {
        let row: Option<ConversationRow> = self
            .one(
                "get conversation",
                &self.conversations.get,
                row_key(user_id, conversation),
            )
            .await?;
        row.map(|r| r.into_conversation(user_id)).transpose()
    }

    /// One recipient's send-path writes, one single-partition batch: last message, version, history
    /// index, and the read position the send implies; with `with_inbox`, the inbox row of `copy` too
    /// (the send path: the copy's whole write is one mutation).
    async fn record_copy(
        &self,
        key: ConversationKey,
        conv_seq: u64,
        copy: &Message,
        user_id: i64,
        with_inbox: bool,
    ) -> Result<()> {
        let st = &self.conversations;
        let conversation = key.seen_by(user_id);
        let (u, k, p) = row_key(user_id, conversation);
        let (seq, inbox) = (bound(conv_seq), to_cql(copy.seq));
        let last = (
            last_stamp(conv_seq),
            seq,
            inbox,
            to_cql(copy.message_id),
            copy.sender_user_id,
            copy.sender_device_id,
            copy.client_msg_id.as_str(),
            copy.server_time_ms,
            copy.content_type,
            copy.content.as_ref(),
            u,
            k,
            p,
        );
        let version: CellValues = (inbox, inbox, u, k, p);
        let index = (u, k, p, seq, inbox);
        let read: CellValues = (seq, seq, u, k, p);
        let what = "record conversation copy";
        let append = &self.messages.append;
        let row = super::messages::inbox_values(user_id, copy);
        // The read position this copy implies: the sender's own, or (1:1) the peer's.
        let position = if user_id == copy.sender_user_id {
            Some(&st.set_read)
        } else if conversation.kind == ConversationKind::Direct {
            Some(&st.set_peer_read)
        } else {
            None
        };
        match (with_inbox, position) {
            (true, Some(position)) => {
                let batch =
                    self.unlogged(&[append, &st.set_last, &st.set_version, &st.index, position]);
                self.batch(what, &batch, (row, last, version, index, read))
                    .await
            }
            (true, None) => {
                let batch = self.unlogged(&[append, &st.set_last, &st.set_version, &st.index]);
                self.batch(what, &batch, (row, last, version, index)).await
            }
            (false, Some(position)) => {
                let batch = self.unlogged(&[&st.set_last, &st.set_version, &st.index, position]);
                self.batch(what, &batch, (last, version, index, read)).await
            }
            (false, None) => {
                let batch = self.unlogged(&[&st.set_last, &st.set_version, &st.index]);
                self.batch(what, &batch, (last, version, index)).await
            }
        }
    }

    /// The conversation's own writes for a message: its record and last seq (one partition, one
    /// mutation) and, in a group, the sender's read position.
    async fn record_conversation(
        &self,
        key: ConversationKey,
        conv_seq: u64,
        message: &Message,
        recipients: &[(i64, u64)],
    ) -> Result<()> {
        let st = &self.conversations;
        let (kind, a, b) = key.parts();
        let seq = bound(conv_seq);
        let stored: Vec<(i64, i64)> = recipients.iter().map(|&(u, s)| (u, to_cql(s))).collect();
        let batch = self.unlogged(&[&st.record, &st.conv_seq]);
        let record = (
            kind,
            a,
            b,
            seq,
            to_cql(message.message_id),
            message.sender_user_id,
            message.server_time_ms,
            stored,
        );
        let record = self.batch(
            "record conversation message",
            &batch,
            (record, (seq, seq, kind, a, b)),
        );
        match key {
            ConversationKey::Group(g) => {
                let read = self.exec(
                    "group read",
                    &st.group_read,
                    (seq, seq, g, message.sender_user_id),
                );
                futures::try_join!(record, read).map(drop)
            }
            ConversationKey::Direct { .. } => record.await,
        }
    }

    /// `record_send`'s writes for a 1:1 or group message: every copy of `entries` with its
    /// conversation rows in one single-partition batch per recipient, and the conversation's record,
    /// all concurrently. No read.
    pub(super) async fn record_send_with_conversation(
        &self,
        conv_seq: u64,
        recipients: &[(i64, u64)],
        entries: &[(i64, Message)],
    ) -> Result<()> {
        let Some(template) = entries
            .iter()
            .find(|(u, m)| *u == m.sender_user_id)
            .or(entries.first())
            .map(|(_, m)| m)
        else {
            return Ok(());
        };
        let key = ConversationKey::of_message(template).ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                "not a 1:1 or group message: no conversation",
            )
        })?;
        // Collected first: a stream over a borrowing closure trips the compiler's higher-ranked
        // lifetime check inside the async-trait future.
        let writes: Vec<_> = entries
            .iter()
            .map(|(user_id, copy)| self.record_copy(key, conv_seq, copy, *user_id, true))
            .collect();
        let copies = futures::stream::iter(writes)
            .buffer_unordered(WRITE_CONCURRENCY)
            .try_collect::<Vec<()>>();
        futures::try_join!(
            self.record_conversation(key, conv_seq, template, recipients),
            copies
        )
        .map(drop)
    }

    /// Replaces `user_id`'s inbox copy `inbox_seq` and, if it is the last message of their row of
    /// `conversation`, that row's preview, by a tombstone.
    async fn tombstone_copy(
        &self,
        user_id: i64,
        conversation: ConversationId,
        conv_seq: u64,
        inbox_seq: u64,
        content_type: i32,
    ) -> Result<()> {
        let st = &self.conversations;
        let (u, k, p) = row_key(user_id, conversation);
        let batch = self.unlogged(&[&st.inbox_tombstone, &st.tombstone_last]);
        let values = (
            (content_type, u, to_cql(inbox_seq)),
            (last_stamp(conv_seq) + 1, content_type, u, k, p),
        );
        self.batch("tombstone copy", &batch, values).await
    }
}

#[async_trait]
impl ConversationStore for ScyllaBackend {
    async fn record_message(
        &self,
        conv_seq: u64,
        message: &Message,
        recipients: &[(i64, u64)],
    ) -> Result<()> {
        let key = ConversationKey::of_message(message).ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                "not a 1:1 or group message: no conversation",
            )
        })?;
        self.record_conversation(key, conv_seq, message, recipients)
            .await?;
        futures::stream::iter(recipients)
            .map(Ok)
            .try_for_each_concurrent(WRITE_CONCURRENCY, |&(user_id, inbox_seq)| async move {
                let mut copy = copy_for(message, user_id, inbox_seq);
                copy.conv_seq = conv_seq;
                self.record_copy(key, conv_seq, &copy, user_id, false).await
            })
            .await
    }

    async fn last_conversation_seq(&self, key: ConversationKey) -> Result<u64> {
        let row: Option<(Option<i64>,)> = self
            .one(
                "last conversation seq",
                &self.conversations.conv_seq_get,
                key.parts(),
            )
            .await?;
        Ok(row.and_then(|(s,)| s).map_or(0, from_cql))
    }

    async fn record_gap(&self, key: ConversationKey, users: &[i64], gap: SeqGap) -> Result<()> {
        let st = &self.conversations;
        let (from, to) = (bound(gap.from), bound(gap.to));
        futures::stream::iter(users)
            .map(Ok)
            .try_for_each_concurrent(WRITE_CONCURRENCY, |&user_id| async move {
                let (u, k, p) = row_key(user_id, key.seen_by(user_id));
                self.exec("record seq gap", &st.set_gap, (to, from, to, u, k, p))
                    .await
                    .map(drop)
            })
            .await
    }

    async fn join(
        &self,
        user_id: i64,
        conversation: ConversationId,
        from_seq: u64,
        version: u64,
    ) -> Result<()> {
        let st = &self.conversations;
        let (u, k, p) = row_key(user_id, conversation);
        let (seq, v) = (bound(from_seq), bound(version));
        let batch = self.unlogged(&[&st.set_last_seq, &st.set_read, &st.set_version]);
        let values: (CellValues, CellValues, CellValues) = (
            (last_stamp(from_seq), seq, u, k, p),
            (seq, seq, u, k, p),
            (v, v, u, k, p),
        );
        self.batch("join conversation", &batch, values).await
    }

    async fn get(
        &self,
        user_id: i64,
        conversation: ConversationId,
    ) -> Result<Option<Conversation>> {
        self.row(user_id, conversation).await
    }

    async fn list(&self, user_id: i64, query: ListQuery) -> Result<Vec<Conversation>> {
        if query.limit == 0 {
            return Ok(Vec::new());
        }
        let rows: Vec<ConversationRow> = self
            .all("list conversations", &self.conversations.list, (user_id,))
            .await?;
        let rows = rows
            .into_iter()
            .map(|r| r.into_conversation(user_id))
            .collect::<Result<Vec<_>>>()?;
        Ok(list_page(rows, &query))
    }

    async fn mark_read(
        &self,
        user_id: i64,
        conversation: ConversationId,
        read_seq: u64,
        version: u64,
    ) -> Result<()> {
        let Some(row) = self.row(user_id, conversation).await? else {
            return Err(not_member(user_id, conversation));
        };
        if read_seq > row.last_seq {
            return Err(Error::new(
                ErrorKind::OutOfRange,
                format!(
                    "read position {read_seq} is beyond the last message {}",
                    row.last_seq
                ),
            ));
        }
        let st = &self.conversations;
        let (u, k, p) = row_key(user_id, conversation);
        let (seq, v) = (bound(read_seq), bound(version));
        let batch = self.unlogged(&[&st.set_read, &st.set_version]);
        let values: (CellValues, CellValues) = ((seq, seq, u, k, p), (v, v, u, k, p));
        self.batch("mark read", &batch, values).await?;
        match conversation.kind {
            ConversationKind::Direct => {
                let (pu, pk, pp) = row_key(conversation.id, ConversationId::direct(user_id));
                self.exec("peer read", &st.set_peer_read, (seq, seq, pu, pk, pp))
                    .await?;
            }
            ConversationKind::Group => {
                self.exec(
                    "group read",
                    &st.group_read,
                    (seq, seq, conversation.id, user_id),
                )
                .await?;
            }
        }
        Ok(())
    }

    async fn group_readers(&self, group_id: i64, conv_seq: u64) -> Result<Vec<i64>> {
        let rows: Vec<(i64, Option<i64>)> = self
            .all(
                "group readers",
                &self.conversations.group_reads,
                (group_id,),
            )
            .await?;
        Ok(rows
            .into_iter()
            .filter(|(_, read)| read.is_some_and(|r| from_cql(r) >= conv_seq))
            .map(|(user_id, _)| user_id)
            .collect())
    }

    async fn set_settings(
        &self,
        user_id: i64,
        conversation: ConversationId,
        settings: ConversationSettings,
        version: u64,
    ) -> Result<()> {
        if self.row(user_id, conversation).await?.is_none() {
            return Err(not_member(user_id, conversation));
        }
        let (u, k, p) = row_key(user_id, conversation);
        let v = bound(version);
        self.exec(
            "conversation settings",
            &self.conversations.set_settings,
            (v, settings.muted, settings.pinned, v, u, k, p),
        )
        .await?;
        Ok(())
    }

    async fn touch(&self, rows: &[(i64, ConversationId, u64)]) -> Result<()> {
        futures::stream::iter(rows)
            .map(Ok)
            .try_for_each_concurrent(
                WRITE_CONCURRENCY,
                |&(user_id, conversation, version)| async move {
                    let (u, k, p) = row_key(user_id, conversation);
                    let v = bound(version);
                    self.exec(
                        "touch conversation",
                        &self.conversations.set_version,
                        (v, v, u, k, p),
                    )
                    .await
                    .map(drop)
                },
            )
            .await
    }

    async fn history(
        &self,
        user_id: i64,
        conversation: ConversationId,
        page: HistoryPage,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let st = &self.conversations;
        let (u, k, p) = row_key(user_id, conversation);
        let (statement, from) = match page {
            HistoryPage::Before(s) => (&st.history_before, s),
            HistoryPage::After(s) => (&st.history_after, s),
        };
        let index: Vec<(i64, i64)> = self
            .all(
                "history index",
                statement,
                (u, k, p, bound(from), cql_limit(limit)),
            )
            .await?;
        if index.is_empty() {
            return Ok(Vec::new());
        }
        let seqs: Vec<i64> = index.iter().map(|&(_, inbox)| inbox).collect();
        let rows: Vec<MessageRow> = self
            .all("history messages", &st.inbox_by_seqs, (u, seqs))
            .await?;
        let mut by_seq: HashMap<u64, Message> = rows
            .into_iter()
            .map(Message::from)
            .map(|m| (m.seq, m))
            .collect();
        Ok(index
            .into_iter()
            .filter_map(|(conv_seq, inbox)| {
                by_seq.remove(&from_cql(inbox)).map(|message| HistoryEntry {
                    conv_seq: from_cql(conv_seq),
                    message,
                })
            })
            .collect())
    }

    async fn recall(
        &self,
        key: ConversationKey,
        conv_seq: u64,
        request: RecallRequest,
    ) -> Result<Recalled> {
        let st = &self.conversations;
        let (kind, a, b) = key.parts();
        let id = (kind, a, b, bound(conv_seq));
        let Some(record): Option<RecordRow> = self.one("recall lookup", &st.record_get, id).await?
        else {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("no message {conv_seq} in this conversation"),
            ));
        };
        check_recall(
            record.recalled.unwrap_or(false),
            record.sender_user_id,
            record.server_time_ms,
            &request,
        )?;
        let recipients: Vec<(i64, u64)> = record
            .recipients
            .iter()
            .map(|&(u, s)| (u, from_cql(s)))
            .collect();
        futures::stream::iter(&recipients)
            .map(Ok)
            .try_for_each_concurrent(WRITE_CONCURRENCY, |&(user_id, inbox_seq)| async move {
                self.tombstone_copy(
                    user_id,
                    key.seen_by(user_id),
                    conv_seq,
                    inbox_seq,
                    CONTENT_TYPE_RECALLED,
                )
                .await
            })
            .await?;
        self.exec("mark recalled", &st.record_recalled, id).await?;
        Ok(Recalled {
            message_id: from_cql(record.message_id),
            sender_user_id: record.sender_user_id,
            recipients,
        })
    }

    async fn delete_for_me(
        &self,
        user_id: i64,
        conversation: ConversationId,
        conv_seq: u64,
        version: u64,
    ) -> Result<()> {
        let st = &self.conversations;
        let (u, k, p) = row_key(user_id, conversation);
        let seq = bound(conv_seq);
        let found: Option<(Option<i64>,)> = self
            .one("delete lookup", &st.index_get, (u, k, p, seq))
            .await?;
        let Some(inbox_seq) = found.and_then(|(s,)| s) else {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("message {conv_seq} is not in this user's history"),
            ));
        };
        // One partition (the user's): index row, inbox copy, preview and version in one mutation.
        let batch = self.unlogged(&[
            &st.index_delete,
            &st.inbox_tombstone,
            &st.tombstone_last,
            &st.set_version,
        ]);
        let v = bound(version);
        let values = (
            (u, k, p, seq),
            (CONTENT_TYPE_DELETED, u, inbox_seq),
            (last_stamp(conv_seq) + 1, CONTENT_TYPE_DELETED, u, k, p),
            (v, v, u, k, p),
        );
        self.batch("delete for me", &batch, values).await
    }
}

fn not_member(user_id: i64, conversation: ConversationId) -> Error {
    Error::new(
        ErrorKind::NotMember,
        format!("user {user_id} is not in conversation {conversation:?}"),
    )
}
