//! Offline push: after a message is stored, one push event per recipient (sender excluded) with no
//! device online, handed to the push sink without waiting (see docs/ARCHITECTURE.md, "Push").

use std::sync::Arc;

use tracing::warn;
use zhibo_proto::client::{Message, ReceiverType};
use zhibo_push::sink::{Outgoing, PushSink};
use zhibo_push::PushEvent;
use zhibo_store::Presence;
use zhibo_telemetry::metrics::KindLabel;

use crate::Logic;

/// What the send path needs to emit push events.
#[derive(Clone)]
pub struct PushHook {
    /// Who is online (gateways write it).
    pub presence: Arc<dyn Presence>,
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
    /// own entry is skipped). One pipelined presence read for all of them; if it fails, everyone is
    /// treated as offline (a push too many rather than a message never notified). Returns once the sink
    /// has them: queued for JetStream, or durable in the embedded outbox.
    pub(crate) async fn push_offline(&self, sender: i64, entries: &[(i64, Message)]) {
        let Some(push) = &self.push else { return };
        let targets: Vec<&(i64, Message)> = entries.iter().filter(|(u, _)| *u != sender).collect();
        if targets.is_empty() {
            return;
        }
        let users: Vec<i64> = targets.iter().map(|(u, _)| *u).collect();
        let online = match push.presence.online(&users).await {
            Ok(o) if o.len() == users.len() => o,
            Ok(_) | Err(_) => {
                warn!("presence unreadable; pushing to every recipient");
                self.metrics
                    .push
                    .publish_failures
                    .get_or_create(&KindLabel { kind: "presence" })
                    .inc();
                vec![false; users.len()]
            }
        };
        let mut events = Vec::new();
        for ((user, message), online) in targets.into_iter().zip(online) {
            if online {
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
