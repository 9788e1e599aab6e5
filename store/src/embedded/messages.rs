//! [`MessageStore`] and [`SeqAllocator`] on redb: tables `inbox` ((user, seq) → prost-encoded
//! [`Message`]), `dedup` / `dedup_by_time` (the send plans and their expiry order) and `acks`; the
//! in-memory seq counters (see the module docs of [`super`], "Seqs").

use std::ops::Bound;

use async_trait::async_trait;
use redb::{ReadTransaction, ReadableTable};
use zhibo_proto::client::Message;
use zhibo_proto::ProstMessage;

use super::{
    from_json, to_json, Db, EmbeddedBackend, Tables, ACKS, DEDUP, DEDUP_RETENTION_MS, INBOX, SEQ,
};
use crate::ids::now_ms;
use crate::{
    ConversationKey, ConversationSeqs, ConversationStore as _, Error, ErrorKind, MessageStore,
    Result, SendPlan, SeqAllocator,
};

fn decode_message(bytes: &[u8]) -> Result<Message> {
    Message::decode(bytes).map_err(|e| Error::wrap(ErrorKind::Corrupt, "inbox message", e))
}

/// Largest seq in `user_id`'s inbox, 0 when empty.
fn inbox_max_seq(
    inbox: &impl ReadableTable<(i64, u64), &'static [u8]>,
    user_id: i64,
) -> Result<u64> {
    let last = inbox
        .range((user_id, 0)..=(user_id, u64::MAX))
        .db()?
        .next_back();
    match last {
        Some(entry) => Ok(entry.db()?.0.value().1),
        None => Ok(0),
    }
}

/// The dedup record for `(device_id, client_msg_id)` if it has not expired at `now`.
fn live_dedup(
    table: &impl ReadableTable<(i64, &'static str), (i64, &'static [u8])>,
    device_id: i64,
    client_msg_id: &str,
    now: i64,
) -> Result<Option<SendPlan>> {
    let Some(row) = table.get((device_id, client_msg_id)).db()? else {
        return Ok(None);
    };
    let (written_ms, bytes) = row.value();
    if now.saturating_sub(written_ms) > DEDUP_RETENTION_MS {
        return Ok(None);
    }
    from_json(bytes, "dedup record").map(Some)
}

/// Inbox entries keyed and encoded on the caller's task, so the single writer thread only inserts bytes.
fn encode_entries(entries: &[(i64, Message)]) -> Vec<((i64, u64), Vec<u8>)> {
    entries
        .iter()
        .map(|(user_id, m)| ((*user_id, m.seq), m.encode_to_vec()))
        .collect()
}

fn insert_entries(t: &mut Tables<'_>, encoded: &[((i64, u64), Vec<u8>)]) -> Result<()> {
    for (key, bytes) in encoded {
        t.inbox.insert(*key, bytes.as_slice()).db()?;
    }
    Ok(())
}

/// Insert-if-absent of a dedup record at time `now`.
pub(super) fn put_dedup_at(
    t: &mut Tables<'_>,
    device_id: i64,
    client_msg_id: &str,
    bytes: &[u8],
    now: i64,
) -> Result<Option<SendPlan>> {
    if let Some(existing) = live_dedup(&t.dedup, device_id, client_msg_id, now)? {
        return Ok(Some(existing));
    }
    t.dedup
        .insert((device_id, client_msg_id), (now, bytes))
        .db()?;
    t.dedup_by_time
        .insert((now, device_id, client_msg_id), ())
        .db()?;
    t.dedup_written += 1;
    t.dedup_now = t.dedup_now.max(now);
    Ok(None)
}

#[async_trait]
impl MessageStore for EmbeddedBackend {
    async fn append(&self, user_id: i64, message: &Message) -> Result<()> {
        // Encoded here, on the caller's task, so the single writer thread only inserts bytes.
        let (seq, bytes) = (message.seq, message.encode_to_vec());
        self.write(move |t| {
            t.inbox.insert((user_id, seq), bytes.as_slice()).db()?;
            Ok(())
        })
        .await?;
        self.saw_seqs(std::iter::once((user_id, seq)));
        Ok(())
    }

    async fn append_many(&self, entries: &[(i64, Message)]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let encoded = encode_entries(entries);
        self.write(move |t| insert_entries(t, &encoded)).await?;
        self.saw_seqs(entries.iter().map(|(u, m)| (*u, m.seq)));
        Ok(())
    }

    async fn sync(&self, user_id: i64, after_seq: u64, limit: usize) -> Result<Vec<Message>> {
        self.read(move |tx| {
            let inbox = tx.open_table(INBOX).db()?;
            let range = (
                Bound::Excluded((user_id, after_seq)),
                Bound::Included((user_id, u64::MAX)),
            );
            let mut out = Vec::new();
            for entry in inbox.range::<(i64, u64)>(range).db()?.take(limit) {
                out.push(decode_message(entry.db()?.1.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn max_seq(&self, user_id: i64) -> Result<u64> {
        self.point(move |tx| inbox_max_seq(&tx.open_table(INBOX).db()?, user_id))
            .await
    }

    async fn get_dedup(&self, device_id: i64, client_msg_id: &str) -> Result<Option<SendPlan>> {
        self.point(move |tx| {
            let table = tx.open_table(DEDUP).db()?;
            live_dedup(&table, device_id, client_msg_id, now_ms())
        })
        .await
    }

    async fn put_dedup_if_absent(
        &self,
        device_id: i64,
        client_msg_id: &str,
        result: &SendPlan,
    ) -> Result<Option<SendPlan>> {
        let client_msg_id = client_msg_id.to_owned();
        let bytes = to_json(result)?;
        self.write(move |t| put_dedup_at(t, device_id, &client_msg_id, &bytes, now_ms()))
            .await
    }

    async fn record_send(
        &self,
        device_id: i64,
        client_msg_id: &str,
        plan: &SendPlan,
        entries: &[(i64, Message)],
    ) -> Result<Option<SendPlan>> {
        // One job, one transaction: the plan, the entries and the conversation rows land together or
        // not at all.
        let client_msg_id = client_msg_id.to_owned();
        let conversation = match plan.conv_seq {
            0 => None,
            conv_seq => super::conversations::sender_copy(entries)
                .map(|m| super::conversations::Prepared::new(conv_seq, m, &plan.recipients))
                .transpose()?,
        };
        let plan = to_json(plan)?;
        let encoded = encode_entries(entries);
        let existing = self
            .write(move |t| {
                if let Some(existing) = put_dedup_at(t, device_id, &client_msg_id, &plan, now_ms())?
                {
                    return Ok(Some(existing));
                }
                insert_entries(t, &encoded)?;
                if let Some(conversation) = &conversation {
                    conversation.write(t)?;
                }
                Ok(None)
            })
            .await?;
        if existing.is_none() {
            self.saw_seqs(entries.iter().map(|(u, m)| (*u, m.seq)));
        }
        Ok(existing)
    }

    async fn ack(&self, user_id: i64, device_id: i64, seq: u64) -> Result<()> {
        self.write(move |t| {
            let acks = &mut t.acks;
            let current = acks
                .get((user_id, device_id))
                .db()?
                .map_or(0, |v| v.value());
            if seq > current {
                acks.insert((user_id, device_id), seq).db()?;
            }
            Ok(())
        })
        .await
    }

    async fn acked(&self, user_id: i64, device_id: i64) -> Result<u64> {
        self.point(move |tx| {
            let acks = tx.open_table(ACKS).db()?;
            let row = acks.get((user_id, device_id)).db()?;
            Ok(row.map_or(0, |v| v.value()))
        })
        .await
    }
}

#[async_trait]
impl SeqAllocator for EmbeddedBackend {
    async fn put_snapshot(
        &self,
        key: &str,
        value: bytes::Bytes,
        ttl: std::time::Duration,
    ) -> Result<()> {
        let now = std::time::Instant::now();
        let mut snapshots = self.snapshots();
        // Expired ones go at the next write (snapshots are few: listings of the last seconds).
        snapshots.retain(|_, (expires, _)| *expires > now);
        snapshots.insert(key.to_owned(), (now + ttl, value));
        Ok(())
    }

    async fn drop_snapshot(&self, key: &str) -> Result<()> {
        self.snapshots().remove(key);
        Ok(())
    }

    async fn snapshot(&self, key: &str) -> Result<Option<bytes::Bytes>> {
        let now = std::time::Instant::now();
        Ok(self
            .snapshots()
            .get(key)
            .filter(|(expires, _)| *expires > now)
            .map(|(_, value)| value.clone()))
    }

    fn keeps_snapshots(&self) -> bool {
        true
    }

    async fn group_version(&self, group_id: i64) -> Result<Option<u64>> {
        // One process, nothing to lose: a group never changed is at 0, and reading stores nothing
        // (sends to unknown groups must not grow the map).
        Ok(Some(
            self.group_versions().get(&group_id).copied().unwrap_or(0),
        ))
    }

    async fn bump_group_version(&self, group_id: i64) -> Result<()> {
        self.group_versions().insert(group_id, rand::random());
        Ok(())
    }

    async fn try_lock(&self, name: &str, holder: &str, ttl: std::time::Duration) -> Result<bool> {
        let now = std::time::Instant::now();
        let mut locks = self.locks();
        // Expired ones go here, so the map holds only locks in use.
        locks.retain(|_, (_, expires)| *expires > now);
        if locks.contains_key(name) {
            return Ok(false);
        }
        locks.insert(name.to_owned(), (holder.to_owned(), now + ttl));
        Ok(true)
    }

    async fn unlock(&self, name: &str, holder: &str) -> Result<()> {
        let mut locks = self.locks();
        if locks.get(name).is_some_and(|(h, _)| h == holder) {
            locks.remove(name);
        }
        Ok(())
    }

    async fn next(&self, user_ids: &[i64]) -> Result<Vec<u64>> {
        if user_ids.is_empty() {
            return Ok(Vec::new());
        }
        // Floors of users not counted yet in this process, read outside the lock.
        let missing: Vec<i64> = {
            let counters = self.counters();
            user_ids
                .iter()
                .copied()
                .filter(|u| !counters.contains_key(u))
                .collect()
        };
        let count = missing.len();
        let load = move |tx: &ReadTransaction| {
            let (table, inbox) = (tx.open_table(SEQ).db()?, tx.open_table(INBOX).db()?);
            missing
                .into_iter()
                .map(|u| Ok((u, seq_floor(&table, &inbox, u)?)))
                .collect::<Result<Vec<_>>>()
        };
        // A few lookups inline; a large group's first send after a restart on the blocking pool.
        let floors = match count {
            0 => Vec::new(),
            1..=INLINE_FLOORS => self.point(load).await?,
            _ => self.read(load).await?,
        };
        let mut counters = self.counters();
        for (user_id, floor) in floors {
            // A racing call may have counted this user meanwhile: never move a counter back.
            let c = counters.entry(user_id).or_insert(0);
            *c = (*c).max(floor);
        }
        Ok(user_ids
            .iter()
            .map(|u| {
                let c = counters.entry(*u).or_insert(0);
                *c += 1;
                *c
            })
            .collect())
    }

    async fn next_in_conversation(
        &self,
        user_ids: &[i64],
        conversation: ConversationKey,
    ) -> Result<ConversationSeqs> {
        let seqs = self.next(user_ids).await?;
        let counted = self.conv_counters().contains_key(&conversation);
        // Read outside the lock; the record of every conversation seq handed out before a restart
        // was committed with its message (record_send), so the largest one is the floor.
        let floor = if counted {
            0
        } else {
            self.last_conversation_seq(conversation).await?
        };
        let mut counters = self.conv_counters();
        let c = counters.entry(conversation).or_insert(0);
        *c = (*c).max(floor) + 1;
        // No margin, so never a gap: the floor is exact.
        Ok(ConversationSeqs {
            inbox: seqs,
            conv_seq: *c,
            skipped: None,
        })
    }

    async fn current(&self, user_id: i64) -> Result<u64> {
        if let Some(c) = self.counters().get(&user_id) {
            return Ok(*c);
        }
        self.point(move |tx| {
            seq_floor(
                &tx.open_table(SEQ).db()?,
                &tx.open_table(INBOX).db()?,
                user_id,
            )
        })
        .await
    }
}

/// Counters loaded inline by one [`SeqAllocator::next`] call; more go to the blocking pool.
const INLINE_FLOORS: usize = 8;

/// Where a user's counter resumes: above the largest stored seq (the inbox) and above the counter of
/// a database written by an earlier version (which persisted counters).
fn seq_floor(
    table: &impl ReadableTable<i64, u64>,
    inbox: &impl ReadableTable<(i64, u64), &'static [u8]>,
    user_id: i64,
) -> Result<u64> {
    let stored = table.get(user_id).db()?.map_or(0, |v| v.value());
    Ok(stored.max(inbox_max_seq(inbox, user_id)?))
}
