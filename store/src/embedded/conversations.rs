//! [`ConversationStore`] on redb: tables `conversations` ((user, kind, peer) → [`Row`] as JSON),
//! `conversation_index` ((user, kind, peer, conv seq) → inbox seq), `conversation_messages`
//! ((kind, a, b, conv seq) → [`Record`] as JSON) and `group_reads` ((group, user) → read position).
//!
//! The Scylla backend orders concurrent blind writes with `USING TIMESTAMP`; here each write runs in
//! the writer's transaction and compares explicitly with the same "stamps" (`last_stamp` = 2 × conv seq
//! for a message, + 1 for its tombstone; read positions and versions by their own value), so both
//! backends agree on which write wins.

use std::ops::Bound;

use async_trait::async_trait;
use redb::ReadableTable;
use serde::{Deserialize, Serialize};
use zhibo_proto::client::Message;
use zhibo_proto::ProstMessage;

use super::{from_json, to_json, Db, EmbeddedBackend, Tables};
use super::{CONVERSATIONS, CONVERSATION_INDEX, CONVERSATION_MESSAGES, GROUP_READS, INBOX};
use crate::traits::conversations::{check_recall, copy_for, list_page, tombstone};
use crate::{
    Conversation, ConversationId, ConversationKey, ConversationKind, ConversationSettings,
    ConversationStore, Error, ErrorKind, HistoryEntry, HistoryPage, ListQuery, RecallRequest,
    Recalled, Result, SeqGap, CONTENT_TYPE_DELETED, CONTENT_TYPE_RECALLED,
};

/// One user's conversation row as stored.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Row {
    last_seq: u64,
    /// Which write set the last message: 2 × its conv seq, + 1 once tombstoned.
    last_stamp: u64,
    /// Prost-encoded copy of the last message.
    last_message: Option<Vec<u8>>,
    read_seq: u64,
    peer_read_seq: u64,
    muted: bool,
    pinned: bool,
    /// Version of the last settings change (a larger one wins).
    settings_version: u64,
    version: u64,
    /// The gap that ends highest (rows written before gaps existed: none).
    #[serde(default)]
    skipped: Option<SeqGap>,
}

/// A message's record in its conversation: what recall needs.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    message_id: u64,
    sender_user_id: i64,
    server_time_ms: i64,
    recipients: Vec<(i64, u64)>,
    recalled: bool,
}

type RowKey = (i64, i32, i64);

fn row_key(user_id: i64, c: ConversationId) -> RowKey {
    (user_id, c.kind.as_i32(), c.id)
}

fn decode_message(bytes: &[u8]) -> Result<Message> {
    Message::decode(bytes).map_err(|e| Error::wrap(ErrorKind::Corrupt, "conversation message", e))
}

fn load_row(table: &impl ReadableTable<RowKey, &'static [u8]>, key: RowKey) -> Result<Option<Row>> {
    match table.get(key).db()? {
        Some(v) => from_json(v.value(), "conversation row").map(Some),
        None => Ok(None),
    }
}

fn store_row(t: &mut Tables<'_>, key: RowKey, row: &Row) -> Result<()> {
    let bytes = to_json(row)?;
    t.conversations.insert(key, bytes.as_slice()).db()?;
    Ok(())
}

fn to_conversation(key: RowKey, row: Row) -> Result<Conversation> {
    let kind = ConversationKind::from_i32(key.1).ok_or_else(|| {
        Error::new(
            ErrorKind::Corrupt,
            format!("conversation kind {} unknown", key.1),
        )
    })?;
    Ok(Conversation {
        user_id: key.0,
        conversation: ConversationId { kind, id: key.2 },
        last_seq: row.last_seq,
        last_message: row
            .last_message
            .as_deref()
            .map(decode_message)
            .transpose()?,
        read_seq: row.read_seq,
        peer_read_seq: row.peer_read_seq,
        muted: row.muted,
        pinned: row.pinned,
        version: row.version,
        skipped: row.skipped,
    })
}

/// Replaces the content of `user_id`'s inbox copy at `inbox_seq` (if stored) by a tombstone.
fn tombstone_inbox(
    t: &mut Tables<'_>,
    user_id: i64,
    inbox_seq: u64,
    content_type: i32,
) -> Result<()> {
    let stored = t
        .inbox
        .get((user_id, inbox_seq))
        .db()?
        .map(|v| v.value().to_vec());
    if let Some(bytes) = stored {
        let mut m = decode_message(&bytes)?;
        tombstone(&mut m, content_type);
        t.inbox
            .insert((user_id, inbox_seq), m.encode_to_vec().as_slice())
            .db()?;
    }
    Ok(())
}

/// Tombstones the row's last message if it is message `conv_seq` (stamp 2 × seq + 1).
fn tombstone_last(row: &mut Row, conv_seq: u64, content_type: i32) -> Result<()> {
    let stamp = conv_seq.saturating_mul(2).saturating_add(1);
    if row.last_seq != conv_seq || row.last_stamp > stamp {
        return Ok(());
    }
    row.last_stamp = stamp;
    if let Some(bytes) = &row.last_message {
        let mut m = decode_message(bytes)?;
        tombstone(&mut m, content_type);
        row.last_message = Some(m.encode_to_vec());
    }
    Ok(())
}

/// The sender's copy among a send's inbox entries (the first entry when the sender has none): the
/// template [`Prepared`] derives every copy from.
pub(super) fn sender_copy(entries: &[(i64, Message)]) -> Option<&Message> {
    entries
        .iter()
        .find(|(u, m)| *u == m.sender_user_id)
        .or(entries.first())
        .map(|(_, m)| m)
}

/// A message's conversation writes, encoded on the caller's task so the writer thread only compares
/// and inserts: by [`ConversationStore::record_message`] and inside `record_send`'s transaction.
pub(super) struct Prepared {
    key: ConversationKey,
    conv_seq: u64,
    sender: i64,
    copies: Vec<(i64, u64, Vec<u8>)>,
    record: Vec<u8>,
}

impl Prepared {
    /// The writes recording `message` (the sender's copy) at `conv_seq` for `recipients`.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] when `message` is not a 1:1 or group message.
    pub(super) fn new(conv_seq: u64, message: &Message, recipients: &[(i64, u64)]) -> Result<Self> {
        let key = ConversationKey::of_message(message).ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                "not a 1:1 or group message: no conversation",
            )
        })?;
        let mut message = message.clone();
        message.conv_seq = conv_seq;
        let copies = recipients
            .iter()
            .map(|&(u, s)| (u, s, copy_for(&message, u, s).encode_to_vec()))
            .collect();
        let record = to_json(&Record {
            message_id: message.message_id,
            sender_user_id: message.sender_user_id,
            server_time_ms: message.server_time_ms,
            recipients: recipients.to_vec(),
            recalled: false,
        })?;
        Ok(Prepared {
            key,
            conv_seq,
            sender: message.sender_user_id,
            copies,
            record,
        })
    }

    /// Applies the writes in the writer's transaction `t`.
    pub(super) fn write(&self, t: &mut Tables<'_>) -> Result<()> {
        let (key, conv_seq, sender) = (self.key, self.conv_seq, self.sender);
        let stamp = conv_seq.saturating_mul(2);
        for (user_id, inbox_seq, bytes) in &self.copies {
            let conversation = key.seen_by(*user_id);
            let rk = row_key(*user_id, conversation);
            let mut row = load_row(&t.conversations, rk)?.unwrap_or_default();
            if stamp > row.last_stamp {
                row.last_stamp = stamp;
                row.last_seq = conv_seq;
                row.last_message = Some(bytes.clone());
            }
            row.version = row.version.max(*inbox_seq);
            if *user_id == sender {
                row.read_seq = row.read_seq.max(conv_seq);
            } else if conversation.kind == ConversationKind::Direct {
                row.peer_read_seq = row.peer_read_seq.max(conv_seq);
            }
            store_row(t, rk, &row)?;
            t.conversation_index
                .insert((rk.0, rk.1, rk.2, conv_seq), *inbox_seq)
                .db()?;
        }
        if let ConversationKey::Group(g) = key {
            let read = t
                .group_reads
                .get((g, sender))
                .db()?
                .map_or(0, |v| v.value());
            t.group_reads.insert((g, sender), read.max(conv_seq)).db()?;
        }
        let (kind, a, b) = key.parts();
        // A rewrite (a resend) keeps a recall that happened meanwhile.
        let recalled = match t.conversation_messages.get((kind, a, b, conv_seq)).db()? {
            Some(v) => from_json::<Record>(v.value(), "conversation record")?.recalled,
            None => false,
        };
        if !recalled {
            t.conversation_messages
                .insert((kind, a, b, conv_seq), self.record.as_slice())
                .db()?;
        }
        Ok(())
    }
}

#[async_trait]
impl ConversationStore for EmbeddedBackend {
    async fn record_message(
        &self,
        conv_seq: u64,
        message: &Message,
        recipients: &[(i64, u64)],
    ) -> Result<()> {
        let prepared = Prepared::new(conv_seq, message, recipients)?;
        self.write(move |t| prepared.write(t)).await
    }

    async fn last_conversation_seq(&self, key: ConversationKey) -> Result<u64> {
        let (kind, a, b) = key.parts();
        self.point(move |tx| {
            let table = tx.open_table(CONVERSATION_MESSAGES).db()?;
            let last = table
                .range((kind, a, b, 0)..=(kind, a, b, u64::MAX))
                .db()?
                .next_back();
            match last {
                Some(entry) => Ok(entry.db()?.0.value().3),
                None => Ok(0),
            }
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
        let rk = row_key(user_id, conversation);
        self.write(move |t| {
            let mut row = load_row(&t.conversations, rk)?.unwrap_or_default();
            let stamp = from_seq.saturating_mul(2);
            if stamp > row.last_stamp {
                row.last_stamp = stamp;
                row.last_seq = from_seq;
            }
            row.read_seq = row.read_seq.max(from_seq);
            row.version = row.version.max(version);
            t.keep_seq(user_id, version)?;
            store_row(t, rk, &row)
        })
        .await
    }

    async fn record_gap(&self, key: ConversationKey, users: &[i64], gap: SeqGap) -> Result<()> {
        let rows: Vec<RowKey> = users.iter().map(|&u| row_key(u, key.seen_by(u))).collect();
        self.write(move |t| {
            for &rk in &rows {
                let mut row = load_row(&t.conversations, rk)?.unwrap_or_default();
                // As the Scylla cells written USING TIMESTAMP gap.to: the gap that ends highest wins.
                if row.skipped.is_none_or(|g| gap.to > g.to) {
                    row.skipped = Some(gap);
                    store_row(t, rk, &row)?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn get(
        &self,
        user_id: i64,
        conversation: ConversationId,
    ) -> Result<Option<Conversation>> {
        let rk = row_key(user_id, conversation);
        self.point(move |tx| {
            let table = tx.open_table(CONVERSATIONS).db()?;
            load_row(&table, rk)?
                .map(|row| to_conversation(rk, row))
                .transpose()
        })
        .await
    }

    async fn list(&self, user_id: i64, query: ListQuery) -> Result<Vec<Conversation>> {
        if query.limit == 0 {
            return Ok(Vec::new());
        }
        let rows = self
            .read(move |tx| {
                let table = tx.open_table(CONVERSATIONS).db()?;
                let mut rows = Vec::new();
                for entry in table
                    .range((user_id, i32::MIN, i64::MIN)..=(user_id, i32::MAX, i64::MAX))
                    .db()?
                {
                    let (k, v) = entry.db()?;
                    let row: Row = from_json(v.value(), "conversation row")?;
                    rows.push(to_conversation(k.value(), row)?);
                }
                Ok(rows)
            })
            .await?;
        Ok(list_page(rows, &query))
    }

    async fn mark_read(
        &self,
        user_id: i64,
        conversation: ConversationId,
        read_seq: u64,
        version: u64,
    ) -> Result<()> {
        let rk = row_key(user_id, conversation);
        self.write(move |t| {
            // Every check before the first write: a refusal changes nothing.
            let Some(mut row) = load_row(&t.conversations, rk)? else {
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
            row.read_seq = row.read_seq.max(read_seq);
            row.version = row.version.max(version);
            t.keep_seq(user_id, version)?;
            store_row(t, rk, &row)?;
            match conversation.kind {
                ConversationKind::Direct => {
                    let pk = row_key(conversation.id, ConversationId::direct(user_id));
                    let mut peer = load_row(&t.conversations, pk)?.unwrap_or_default();
                    peer.peer_read_seq = peer.peer_read_seq.max(read_seq);
                    store_row(t, pk, &peer)?;
                }
                ConversationKind::Group => {
                    let g = conversation.id;
                    let read = t
                        .group_reads
                        .get((g, user_id))
                        .db()?
                        .map_or(0, |v| v.value());
                    t.group_reads
                        .insert((g, user_id), read.max(read_seq))
                        .db()?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn group_readers(&self, group_id: i64, conv_seq: u64) -> Result<Vec<i64>> {
        self.read(move |tx| {
            let table = tx.open_table(GROUP_READS).db()?;
            let mut out = Vec::new();
            for entry in table
                .range((group_id, i64::MIN)..=(group_id, i64::MAX))
                .db()?
            {
                let (k, v) = entry.db()?;
                if v.value() >= conv_seq {
                    out.push(k.value().1);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn set_settings(
        &self,
        user_id: i64,
        conversation: ConversationId,
        settings: ConversationSettings,
        version: u64,
    ) -> Result<()> {
        let rk = row_key(user_id, conversation);
        self.write(move |t| {
            let Some(mut row) = load_row(&t.conversations, rk)? else {
                return Err(not_member(user_id, conversation));
            };
            if version > row.settings_version {
                row.settings_version = version;
                row.muted = settings.muted;
                row.pinned = settings.pinned;
            }
            row.version = row.version.max(version);
            t.keep_seq(user_id, version)?;
            store_row(t, rk, &row)
        })
        .await
    }

    async fn touch(&self, rows: &[(i64, ConversationId, u64)]) -> Result<()> {
        let rows = rows.to_vec();
        self.write(move |t| {
            for &(user_id, conversation, version) in &rows {
                let rk = row_key(user_id, conversation);
                let mut row = load_row(&t.conversations, rk)?.unwrap_or_default();
                row.version = row.version.max(version);
                t.keep_seq(user_id, version)?;
                store_row(t, rk, &row)?;
            }
            Ok(())
        })
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
        let (u, k, p) = row_key(user_id, conversation);
        self.read(move |tx| {
            let index = tx.open_table(CONVERSATION_INDEX).db()?;
            let inbox = tx.open_table(INBOX).db()?;
            let mut seqs = Vec::with_capacity(limit);
            match page {
                HistoryPage::Before(before) => {
                    let range = (
                        Bound::Included((u, k, p, 0)),
                        Bound::Excluded((u, k, p, before)),
                    );
                    for entry in index.range(range).db()?.rev().take(limit) {
                        let (key, v) = entry.db()?;
                        seqs.push((key.value().3, v.value()));
                    }
                }
                HistoryPage::After(after) => {
                    let range = (
                        Bound::Excluded((u, k, p, after)),
                        Bound::Included((u, k, p, u64::MAX)),
                    );
                    for entry in index.range(range).db()?.take(limit) {
                        let (key, v) = entry.db()?;
                        seqs.push((key.value().3, v.value()));
                    }
                }
            }
            let mut out = Vec::with_capacity(seqs.len());
            for (conv_seq, inbox_seq) in seqs {
                if let Some(v) = inbox.get((u, inbox_seq)).db()? {
                    out.push(HistoryEntry {
                        conv_seq,
                        message: decode_message(v.value())?,
                    });
                }
            }
            Ok(out)
        })
        .await
    }

    async fn recall(
        &self,
        key: ConversationKey,
        conv_seq: u64,
        request: RecallRequest,
    ) -> Result<Recalled> {
        let (kind, a, b) = key.parts();
        self.write(move |t| {
            let Some(bytes) = t
                .conversation_messages
                .get((kind, a, b, conv_seq))
                .db()?
                .map(|v| v.value().to_vec())
            else {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("no message {conv_seq} in this conversation"),
                ));
            };
            let mut record: Record = from_json(&bytes, "conversation record")?;
            check_recall(
                record.recalled,
                record.sender_user_id,
                record.server_time_ms,
                &request,
            )?;
            for &(user_id, inbox_seq) in &record.recipients {
                tombstone_inbox(t, user_id, inbox_seq, CONTENT_TYPE_RECALLED)?;
                let rk = row_key(user_id, key.seen_by(user_id));
                if let Some(mut row) = load_row(&t.conversations, rk)? {
                    tombstone_last(&mut row, conv_seq, CONTENT_TYPE_RECALLED)?;
                    store_row(t, rk, &row)?;
                }
            }
            record.recalled = true;
            let bytes = to_json(&record)?;
            t.conversation_messages
                .insert((kind, a, b, conv_seq), bytes.as_slice())
                .db()?;
            Ok(Recalled {
                message_id: record.message_id,
                sender_user_id: record.sender_user_id,
                recipients: record.recipients,
            })
        })
        .await
    }

    async fn delete_for_me(
        &self,
        user_id: i64,
        conversation: ConversationId,
        conv_seq: u64,
        version: u64,
    ) -> Result<()> {
        let rk = row_key(user_id, conversation);
        self.write(move |t| {
            let ik = (rk.0, rk.1, rk.2, conv_seq);
            let Some(inbox_seq) = t.conversation_index.get(ik).db()?.map(|v| v.value()) else {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("message {conv_seq} is not in this user's history"),
                ));
            };
            t.conversation_index.remove(ik).db()?;
            tombstone_inbox(t, user_id, inbox_seq, CONTENT_TYPE_DELETED)?;
            let mut row = load_row(&t.conversations, rk)?.unwrap_or_default();
            tombstone_last(&mut row, conv_seq, CONTENT_TYPE_DELETED)?;
            row.version = row.version.max(version);
            t.keep_seq(user_id, version)?;
            store_row(t, rk, &row)
        })
        .await
    }
}

fn not_member(user_id: i64, conversation: ConversationId) -> Error {
    Error::new(
        ErrorKind::NotMember,
        format!("user {user_id} is not in conversation {conversation:?}"),
    )
}
