//! [`MessageStore`] on Scylla: tables `inbox` (partition: the user, clustering: seq), `dedup` (one
//! [`SendPlan`] per `(device, client_msg_id)`, insert-if-absent) and `device_acks` (written
//! `USING TIMESTAMP <seq>`, so the largest seq wins).

use std::collections::BTreeMap;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};
use scylla::client::session::Session;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::DeserializeRow;
use zhibo_proto::client::Message;

use super::{
    corrupt, corrupt_data, cql_limit, db_error, from_cql, to_cql, ScyllaBackend, WRITE_CONCURRENCY,
};
use crate::{MessageStore, Result, SendPlan};

/// A single-partition unlogged batch is cut before it reaches this many content bytes, well under
/// Cassandra's default `batch_size_fail_threshold` (50 KiB).
const BATCH_MAX_BYTES: usize = 16 * 1024;

/// Statements per single-partition unlogged batch, at most.
const BATCH_MAX_STATEMENTS: usize = 32;

/// Columns of an inbox entry after its partition key `user_id`, in the order of [`MessageRow`] and of
/// [`inbox_values`] (which binds `user_id` first).
pub(super) const MESSAGE_COLUMNS: &str =
    "seq, message_id, sender_user_id, sender_device_id, receiver_type, receiver_id, \
     client_msg_id, server_time_ms, content_type, content, conv_seq";

/// A claimed first attempt's plan (`record_claimed_send`): the claim arbitrated, so a plain insert (no
/// `IF`: no Paxos round, counted as a `write`).
const PUT_DEDUP_CLAIMED: &str =
    "INSERT INTO dedup (sender_device_id, client_msg_id, message_id, seq, \
     server_time_ms, recipients, conv_seq) VALUES (?, ?, ?, ?, ?, ?, ?)";

/// The message statements, prepared once.
pub(super) struct Statements {
    pub(super) append: PreparedStatement,
    sync: PreparedStatement,
    max_seq: PreparedStatement,
    get_dedup: PreparedStatement,
    put_dedup: PreparedStatement,
    put_dedup_claimed: PreparedStatement,
    ack: PreparedStatement,
    acked: PreparedStatement,
}

impl Statements {
    pub(super) async fn prepare(session: &Session) -> Result<Self> {
        let p = |cql: String| super::prepare(session, cql);
        Ok(Statements {
            append: p(format!(
                "INSERT INTO inbox (user_id, {MESSAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ))
            .await?,
            sync: p(format!(
                "SELECT {MESSAGE_COLUMNS} FROM inbox WHERE user_id = ? AND seq > ? ORDER BY seq ASC LIMIT ?"
            ))
            .await?,
            max_seq: p("SELECT seq FROM inbox WHERE user_id = ? ORDER BY seq DESC LIMIT 1".into()).await?,
            get_dedup: p("SELECT message_id, seq, server_time_ms, recipients, conv_seq FROM dedup \
                 WHERE sender_device_id = ? AND client_msg_id = ?"
                .into())
            .await?,
            put_dedup: p("INSERT INTO dedup (sender_device_id, client_msg_id, message_id, seq, server_time_ms, \
                 recipients, conv_seq) VALUES (?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS"
                .into())
            .await?,
            put_dedup_claimed: p(PUT_DEDUP_CLAIMED.into()).await?,
            // The write timestamp is the seq itself: the cell with the largest timestamp wins, so
            // acks commute and the stored value never moves back (see sql/0001_init.cql).
            ack: p("UPDATE device_acks USING TIMESTAMP ? SET acked_seq = ? \
                 WHERE user_id = ? AND device_id = ?"
                .into())
            .await?,
            acked: p("SELECT acked_seq FROM device_acks WHERE user_id = ? AND device_id = ?".into()).await?,
        })
    }
}

/// The values of [`Statements::append`]: `user_id`, then [`MESSAGE_COLUMNS`].
pub(super) type InboxValues<'a> = (
    i64,
    i64,
    i64,
    i64,
    i64,
    i32,
    i64,
    &'a str,
    i64,
    i32,
    &'a [u8],
    Option<i64>,
);

pub(super) fn inbox_values(user_id: i64, m: &Message) -> InboxValues<'_> {
    (
        user_id,
        to_cql(m.seq),
        to_cql(m.message_id),
        m.sender_user_id,
        m.sender_device_id,
        m.receiver_type,
        m.receiver_id,
        &m.client_msg_id,
        m.server_time_ms,
        m.content_type,
        &m.content,
        (m.conv_seq > 0).then(|| to_cql(m.conv_seq)),
    )
}

/// The bound values of a dedup insert (`put_dedup`, `put_dedup_claimed`).
type DedupValues<'a> = (i64, &'a str, i64, i64, i64, Vec<(i64, i64)>, Option<i64>);

fn dedup_values<'a>(device_id: i64, client_msg_id: &'a str, plan: &SendPlan) -> DedupValues<'a> {
    (
        device_id,
        client_msg_id,
        to_cql(plan.message_id),
        to_cql(plan.seq),
        plan.server_time_ms,
        plan.recipients
            .iter()
            .map(|&(user_id, seq)| (user_id, to_cql(seq)))
            .collect(),
        (plan.conv_seq > 0).then(|| to_cql(plan.conv_seq)),
    )
}

#[derive(DeserializeRow)]
pub(super) struct MessageRow {
    seq: i64,
    message_id: i64,
    sender_user_id: i64,
    sender_device_id: i64,
    receiver_type: i32,
    receiver_id: i64,
    client_msg_id: String,
    server_time_ms: i64,
    content_type: i32,
    content: Option<Bytes>,
    conv_seq: Option<i64>,
}

impl From<MessageRow> for Message {
    fn from(r: MessageRow) -> Self {
        Message {
            message_id: from_cql(r.message_id),
            seq: from_cql(r.seq),
            sender_user_id: r.sender_user_id,
            sender_device_id: r.sender_device_id,
            receiver_type: r.receiver_type,
            receiver_id: r.receiver_id,
            client_msg_id: r.client_msg_id,
            server_time_ms: r.server_time_ms,
            content_type: r.content_type,
            // An empty blob and a null read back alike.
            content: r.content.unwrap_or_default(),
            conv_seq: r.conv_seq.map_or(0, from_cql),
        }
    }
}

#[derive(DeserializeRow)]
struct DedupRow {
    message_id: i64,
    seq: i64,
    server_time_ms: i64,
    #[scylla(default_when_null)]
    recipients: Vec<(i64, i64)>,
    conv_seq: Option<i64>,
}

/// The row a not-applied `INSERT INTO dedup ... IF NOT EXISTS` returns: `[applied]` and every column.
#[derive(DeserializeRow)]
#[expect(
    dead_code,
    reason = "the key columns come back too and must be named, but are not needed"
)]
struct DedupConflictRow {
    #[scylla(rename = "[applied]")]
    applied: bool,
    sender_device_id: i64,
    client_msg_id: String,
    message_id: i64,
    seq: i64,
    server_time_ms: i64,
    #[scylla(default_when_null)]
    recipients: Vec<(i64, i64)>,
    conv_seq: Option<i64>,
}

impl From<DedupRow> for SendPlan {
    fn from(r: DedupRow) -> Self {
        SendPlan {
            message_id: from_cql(r.message_id),
            seq: from_cql(r.seq),
            server_time_ms: r.server_time_ms,
            recipients: r
                .recipients
                .into_iter()
                .map(|(user_id, seq)| (user_id, from_cql(seq)))
                .collect(),
            conv_seq: r.conv_seq.map_or(0, from_cql),
        }
    }
}

impl ScyllaBackend {
    /// Writes the messages of one user's inbox: a single insert, or unlogged batches (one partition,
    /// so each batch is a single mutation on the replicas).
    async fn append_partition(&self, user_id: i64, messages: &[&Message]) -> Result<()> {
        if let [message] = messages {
            return self.append(user_id, message).await;
        }
        let mut start = 0;
        while start < messages.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < messages.len()
                && end - start < BATCH_MAX_STATEMENTS
                && (end == start || bytes + messages[end].content.len() <= BATCH_MAX_BYTES)
            {
                bytes += messages[end].content.len();
                end += 1;
            }
            let chunk = &messages[start..end];
            let mut batch = Batch::new(BatchType::Unlogged);
            for _ in chunk {
                batch.append_statement(self.messages.append.clone());
            }
            let values: Vec<_> = chunk.iter().map(|m| inbox_values(user_id, m)).collect();
            super::count_batch(batch.statements.len());
            self.session
                .batch(&batch, values)
                .await
                .map_err(|e| db_error("append batch", e))?;
            start = end;
        }
        Ok(())
    }

    /// A send's inbox `entries`: with `plan.conv_seq > 0`, each copy's inbox row and conversation rows
    /// in one single-partition batch plus the conversation's own record (no round trip beyond the
    /// inbox writes but that one); all concurrently.
    async fn write_entries(&self, plan: &SendPlan, entries: &[(i64, Message)]) -> Result<()> {
        if plan.conv_seq == 0 {
            self.append_many(entries).await
        } else {
            self.record_send_with_conversation(plan.conv_seq, &plan.recipients, entries)
                .await
        }
    }
}

#[async_trait]
impl MessageStore for ScyllaBackend {
    async fn append(&self, user_id: i64, message: &Message) -> Result<()> {
        self.exec(
            "append",
            &self.messages.append,
            inbox_values(user_id, message),
        )
        .await?;
        Ok(())
    }

    async fn append_many(&self, entries: &[(i64, Message)]) -> Result<()> {
        // One task per inbox partition (batching only within a partition, where a batch is a single
        // mutation), at most WRITE_CONCURRENCY in flight; all are durable before this returns.
        let mut by_user: BTreeMap<i64, Vec<&Message>> = BTreeMap::new();
        for (user_id, message) in entries {
            by_user.entry(*user_id).or_default().push(message);
        }
        futures::stream::iter(by_user)
            .map(Ok)
            .try_for_each_concurrent(WRITE_CONCURRENCY, |(user_id, messages)| async move {
                self.append_partition(user_id, &messages).await
            })
            .await
    }

    async fn sync(&self, user_id: i64, after_seq: u64, limit: usize) -> Result<Vec<Message>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // Saturate rather than wrap: a nonsense cursor beyond i64::MAX means "nothing newer".
        let after = i64::try_from(after_seq).unwrap_or(i64::MAX);
        let rows: Vec<MessageRow> = self
            .all(
                "sync",
                &self.messages.sync,
                (user_id, after, cql_limit(limit)),
            )
            .await?;
        Ok(rows.into_iter().map(Message::from).collect())
    }

    async fn max_seq(&self, user_id: i64) -> Result<u64> {
        let row: Option<(i64,)> = self
            .one("max seq", &self.messages.max_seq, (user_id,))
            .await?;
        Ok(row.map_or(0, |(seq,)| from_cql(seq)))
    }

    async fn get_dedup(&self, device_id: i64, client_msg_id: &str) -> Result<Option<SendPlan>> {
        let row: Option<DedupRow> = self
            .one(
                "get dedup",
                &self.messages.get_dedup,
                (device_id, client_msg_id),
            )
            .await?;
        Ok(row.map(SendPlan::from))
    }

    async fn put_dedup_if_absent(
        &self,
        device_id: i64,
        client_msg_id: &str,
        r: &SendPlan,
    ) -> Result<Option<SendPlan>> {
        let what = "put dedup";
        let rows = self
            .exec(
                what,
                &self.messages.put_dedup,
                dedup_values(device_id, client_msg_id, r),
            )
            .await?
            .into_rows_result()
            .map_err(|e| db_error(what, e))?;
        // Applied: the only column is [applied]. Not applied: [applied] = false and the stored row.
        if rows.column_specs().len() == 1 {
            let (applied,): (bool,) = rows.first_row().map_err(|e| corrupt(what, e))?;
            return if applied {
                Ok(None)
            } else {
                Err(corrupt_data(
                    what,
                    "not applied, yet no stored row returned",
                ))
            };
        }
        let stored: DedupConflictRow = rows.first_row().map_err(|e| corrupt(what, e))?;
        if stored.applied {
            return Err(corrupt_data(what, "applied, yet a stored row returned"));
        }
        Ok(Some(SendPlan::from(DedupRow {
            message_id: stored.message_id,
            seq: stored.seq,
            server_time_ms: stored.server_time_ms,
            recipients: stored.recipients,
            conv_seq: stored.conv_seq,
        })))
    }

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
        self.write_entries(plan, entries).await?;
        Ok(None)
    }

    async fn record_claimed_send(
        &self,
        device_id: i64,
        client_msg_id: &str,
        plan: &SendPlan,
        entries: &[(i64, Message)],
    ) -> Result<Option<SendPlan>> {
        // The plan before the entries, as `record_send`: a crash in between leaves a plan a resend
        // completes, never entries without a plan (which a resend after the claim window would store
        // again).
        self.exec(
            "put claimed dedup",
            &self.messages.put_dedup_claimed,
            dedup_values(device_id, client_msg_id, plan),
        )
        .await?;
        self.write_entries(plan, entries).await?;
        Ok(None)
    }

    async fn ack(&self, user_id: i64, device_id: i64, seq: u64) -> Result<()> {
        let seq = i64::try_from(seq).unwrap_or(i64::MAX);
        self.exec("ack", &self.messages.ack, (seq, seq, user_id, device_id))
            .await?;
        Ok(())
    }

    async fn acked(&self, user_id: i64, device_id: i64) -> Result<u64> {
        let row: Option<(Option<i64>,)> = self
            .one("acked", &self.messages.acked, (user_id, device_id))
            .await?;
        Ok(row.and_then(|(seq,)| seq).map_or(0, from_cql))
    }
}

#[cfg(test)]
mod tests {
    use super::super::CqlOp;

    #[test]
    fn a_claimed_plan_is_a_plain_write() {
        assert_eq!(CqlOp::of(super::PUT_DEDUP_CLAIMED), CqlOp::Write);
    }
}
