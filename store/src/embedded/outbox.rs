//! [`OutboxStore`] on redb: table `outbox`, id → (topic, key, body). Enqueues go through the writer
//! thread (durable on return, group-committed with the sends around them).
//!
//! Ids: one above the largest of the table's last id and the highest id handed out since the file was
//! opened (seeded at open with the last id left by the previous run), so an id is never reused while
//! the relay's cursor may still be behind it, even once the table has been emptied. After a reopen the
//! relay's cursor starts from 0: it resumes what is left, then reads the new entries above it.

use std::ops::Bound;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use bytes::Bytes;
use redb::ReadableTable;

use super::{Db, EmbeddedBackend, OUTBOX};
use crate::{OutboxEntry, OutboxEvent, OutboxStore, Result};

#[async_trait]
impl OutboxStore for EmbeddedBackend {
    async fn enqueue(&self, events: &[OutboxEvent]) -> Result<Vec<u64>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let events = events.to_vec();
        let high = self.outbox_high.clone();
        self.write(move |t| {
            let table = t.outbox()?;
            let last = table.last().db()?.map_or(0, |(k, _)| k.value());
            let first = last.max(high.load(Ordering::Acquire)) + 1;
            let mut ids = Vec::with_capacity(events.len());
            for (id, e) in (first..).zip(&events) {
                table
                    .insert(id, (e.topic.as_str(), e.key.as_str(), &e.body[..]))
                    .db()?;
                ids.push(id);
            }
            if let Some(&top) = ids.last() {
                high.fetch_max(top, Ordering::AcqRel);
            }
            Ok(ids)
        })
        .await
    }

    async fn pending(&self, after: u64, limit: usize) -> Result<Vec<OutboxEntry>> {
        self.read(move |tx| {
            let table = tx.open_table(OUTBOX).db()?;
            let mut out = Vec::new();
            for entry in table
                .range::<u64>((Bound::Excluded(after), Bound::Unbounded))
                .db()?
                .take(limit)
            {
                let (id, value) = entry.db()?;
                let (topic, key, body) = value.value();
                out.push(OutboxEntry {
                    id: id.value(),
                    event: OutboxEvent {
                        topic: topic.to_owned(),
                        key: key.to_owned(),
                        body: Bytes::copy_from_slice(body),
                    },
                });
            }
            Ok(out)
        })
        .await
    }

    async fn remove(&self, id: u64) -> Result<()> {
        self.write(move |t| {
            t.outbox()?.remove(id).db()?;
            Ok(())
        })
        .await
    }
}
