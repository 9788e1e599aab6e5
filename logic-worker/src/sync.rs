//! Sync pages (a user's inbox after a seq, bounded by count and by bytes so a page fits in one frame) and
//! acks (how far a device has read).

use zhibo_proto::bus::Origin;
use zhibo_proto::client::{SyncInput, SyncOutput};

use crate::{Logic, LogicError, Op};

/// Cuts a page read with one item more than `limit` (to know whether more exist) to at most `limit`
/// items and to the items that fit in `max_bytes` once encoded (always at least one), so the answer
/// fits in one frame whatever the contents. Returns `has_more`: whether anything was cut.
pub(crate) fn fit_page<T: prost::Message>(
    items: &mut Vec<T>,
    limit: usize,
    max_bytes: usize,
) -> bool {
    let n = page_len(items, limit, max_bytes);
    let has_more = items.len() > n;
    items.truncate(n);
    has_more
}

/// How many of `items` [`fit_page`] keeps: at most `limit`, and no more than fit in `max_bytes`
/// (never fewer than one).
pub(crate) fn page_len<T: prost::Message>(items: &[T], limit: usize, max_bytes: usize) -> usize {
    let n = items.len().min(limit);
    let mut bytes = 0;
    items[..n]
        .iter()
        .position(|m| {
            bytes += m.encoded_len() + 8;
            bytes > max_bytes
        })
        .map_or(n, |over| over.max(1))
}

impl Logic {
    /// The messages of `user_id` after `input.seq`, oldest first, one page.
    ///
    /// # Errors
    /// [`LogicError`] when the store fails.
    pub async fn sync(&self, user_id: i64, input: &SyncInput) -> Result<SyncOutput, LogicError> {
        let limit = match input.limit {
            0 => self.config.sync_page,
            n => n.min(self.config.max_sync_page),
        } as usize;
        let mut messages = self
            .stores
            .messages
            .sync(user_id, input.seq, limit + 1)
            .await
            .map_err(|e| LogicError::store(Op::Sync, &e))?;
        let has_more = fit_page(&mut messages, limit, self.config.max_sync_bytes);
        Ok(SyncOutput { messages, has_more })
    }

    /// Records that `origin`'s device has read up to `seq`; no answer is sent for an ack.
    ///
    /// # Errors
    /// [`LogicError`] when the store fails.
    pub(crate) async fn ack(&self, origin: &Origin, seq: u64) -> Result<(), LogicError> {
        self.stores
            .messages
            .ack(origin.user_id, origin.device_id, seq)
            .await
            .map_err(|e| LogicError::store(Op::Ack, &e))
    }
}
