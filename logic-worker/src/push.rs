//! Offline push: after a message is stored, one push event per recipient (sender excluded) with no
//! device online, handed to the push sink without waiting (see docs/ARCHITECTURE.md, "Push").

use std::sync::Arc;

use futures::StreamExt as _;
use tracing::warn;
use zhibo_proto::client::{Message, ReceiverType};
use zhibo_push::sink::{Outgoing, PushSink};
use zhibo_push::PushEvent;
use zhibo_store::{unread_count, Conversation, ConversationId, ConversationKey};
use zhibo_telemetry::metrics::KindLabel;

use crate::Logic;

/// Conversation rows read at once for the offline recipients of one message (a big group's).
const ROW_READS: usize = 64;

/// What the send path needs to emit push events (who is online: the pipeline's presence).
#[derive(Clone)]
pub struct PushHook {
    /// Where events go (JetStream, or the embedded store's outbox).
    pub sink: Arc<dyn PushSink>,
    /// Put the start of text content in events.
    pub preview: bool,
    /// Longest preview, characters.
    pub preview_max_chars: usize,
}

impl std::fmt::Debug for PushHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushHook")
            .field("preview", &self.preview)
            .finish_non_exhaustive()
    }
}

impl Logic {
    /// Emits push events for the offline recipients among `entries` (stored inbox entries; the sender's
    /// own entry is skipped). `gateways` holds, per entry, the gateways presence names for its user
    /// (the read the deliveries are routed by); a `None` (unknown: presence unreadable, or just lost
    /// entries) counts as offline (a push too many rather than a message never notified). Then each offline
    /// recipient's conversation row (point reads, [`ROW_READS`] at a time): muted → no event; the
    /// badge is the conversation's unread count. Returns once the sink has them: queued for JetStream,
    /// or durable in the embedded outbox.
    pub(crate) async fn push_offline(
        &self,
        sender: i64,
        entries: &[(i64, Message)],
        gateways: &[Option<Vec<String>>],
    ) {
        let Some(push) = &self.push else { return };
        let offline: Vec<&(i64, Message)> = entries
            .iter()
            .zip(gateways)
            .filter(|((user, _), g)| *user != sender && g.as_ref().is_none_or(Vec::is_empty))
            .map(|(e, _)| e)
            .collect();
        if gateways.iter().any(Option::is_none) {
            // Logged (rate-limited) where presence is read; expected for a few seconds after a loss.
            self.metrics
                .push
                .publish_failures
                .get_or_create(&KindLabel { kind: "presence" })
                .inc();
        }
        if offline.is_empty() {
            return;
        }
        // The offline recipients' conversation rows, one point read each, concurrently (only here:
        // with push on and someone offline): a muted conversation is not pushed, and the badge is the
        // conversation's unread count. An unreadable row pushes anyway (badge: the latest seq).
        let asks: Vec<(i64, Option<ConversationId>)> = offline
            .iter()
            .map(|(user, m)| {
                (
                    *user,
                    ConversationKey::of_message(m).map(|k| k.seen_by(*user)),
                )
            })
            .collect();
        let rows: Vec<Option<Conversation>> = futures::stream::iter(asks)
            .map(|(user, conversation)| {
                let store = self.stores.conversations.clone();
                async move {
                    match store.get(user, conversation?).await {
                        Ok(row) => row,
                        Err(e) => {
                            warn!(user_id = user, error = %e, "conversation row unreadable; pushing without unread");
                            None
                        }
                    }
                }
            })
            .buffered(ROW_READS)
            .collect()
            .await;
        let mut events = Vec::new();
        for ((user, message), row) in offline.into_iter().zip(rows) {
            if row.as_ref().is_some_and(|r| r.muted) {
                self.metrics.push.skipped_muted.inc();
                continue;
            }
            let group = (message.receiver_type == ReceiverType::Group as i32)
                .then_some(message.receiver_id);
            let event = PushEvent::new(
                *user,
                message.sender_user_id,
                group,
                message.message_id,
                message.seq,
                message.content_type,
                push.preview.then_some(&message.content[..]),
                push.preview_max_chars,
                message.server_time_ms,
            );
            // The row may predate this message's write only if another writer raced it: count it in.
            let event = match &row {
                Some(r) => event.with_unread(unread_count(
                    r.last_seq.max(message.conv_seq),
                    r.read_seq,
                    r.skipped,
                )),
                None => event,
            };
            match Outgoing::push(&event) {
                Ok(e) => events.push(e),
                Err(e) => warn!(error = %e, "push event not encodable"),
            }
        }
        if !events.is_empty() {
            push.sink.publish(events).await;
        }
    }
}
