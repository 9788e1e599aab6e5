//! The command consumer: [`run`] takes `zhibo.cmd` in the `logic` queue group, [`Logic::handle`] dispatches
//! each command to its handler and answers the origin connection.

use std::sync::Arc;

use bytes::Bytes;
use prost::Message as _;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};
use zhibo_bus::{subject::LOGIC_QUEUE_GROUP, Subject};
use zhibo_proto::bus::{Command, Delivery, Origin};
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{ErrorCode, MessageAck, Packet};

use crate::{Logic, LogicError};

impl Logic {
    /// Handles one command from a gateway and answers the origin connection.
    pub async fn handle(&self, cmd: Command) {
        let (Some(origin), Some(packet)) = (cmd.origin, cmd.packet) else {
            warn!("command without origin or packet");
            return;
        };
        let rid = packet.request_id;
        let reply = match packet.body {
            Some(Body::SendMessage(input)) => self
                .send_message(&origin, &input)
                .await
                .map(Body::SendMessageOutput),
            Some(Body::Sync(input)) => self
                .sync(origin.user_id, &input)
                .await
                .map(Body::SyncOutput),
            Some(Body::MessageAck(MessageAck { seq })) => match self.ack(&origin, seq).await {
                Ok(()) => return,
                Err(e) => Err(e),
            },
            Some(Body::ConversationList(input)) => self
                .conversation_list(origin.user_id, &input)
                .await
                .map(Body::ConversationListOutput),
            Some(Body::History(input)) => self
                .history(origin.user_id, &input)
                .await
                .map(Body::HistoryOutput),
            Some(Body::MarkRead(input)) => self
                .mark_read(&origin, &input)
                .await
                .map(Body::ConversationUpdate),
            Some(Body::Recall(input)) => self.recall(&origin, &input).await.map(Body::Recalled),
            Some(Body::DeleteForMe(input)) => self
                .delete_for_me(&origin, &input)
                .await
                .map(Body::ConversationUpdate),
            Some(Body::ConversationSettings(input)) => self
                .conversation_settings(&origin, &input)
                .await
                .map(Body::ConversationUpdate),
            Some(Body::GroupReaders(input)) => self
                .group_readers(origin.user_id, &input)
                .await
                .map(Body::GroupReadersOutput),
            // No answer but an error: typing is fire and forget.
            Some(Body::TypingInput(input)) => match self.typing(&origin, &input).await {
                Ok(()) => return,
                Err(e) => Err(e),
            },
            _ => Err(LogicError::new(
                ErrorCode::UnexpectedPacket,
                format!("unexpected {}", packet.kind()),
            )),
        };
        let packet = match reply {
            Ok(body) => Packet::new(rid, body),
            Err(e) => e.packet(rid),
        };
        self.reply(&origin, packet).await;
    }

    async fn reply(&self, origin: &Origin, packet: Packet) {
        if origin.gateway_id.is_empty() {
            return;
        }
        let delivery = Delivery {
            conn_id: origin.conn_id,
            exclude_device_id: 0,
            packets: vec![packet],
        };
        if let Err(e) = self
            .bus
            .publish(
                &Subject::gateway(&origin.gateway_id),
                Vec::new(),
                Bytes::from(delivery.encode_to_vec()),
            )
            .await
        {
            warn!(error = %e, "reply lost; the client will time out and resend");
        }
    }
}

/// Consumes commands until `shutdown`, then waits for the ones in flight.
///
/// # Errors
/// When the queue subscription is refused.
pub async fn run(logic: Arc<Logic>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut sub = logic
        .bus
        .queue_subscribe(&Subject::commands(), LOGIC_QUEUE_GROUP)
        .await?;
    // The subscription must be live at the server before anyone is told this worker consumes.
    logic.bus.flush().await?;
    let limit = Arc::new(Semaphore::new(logic.config.concurrency));
    let tracker = TaskTracker::new();
    info!("logic worker consuming commands");
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = limit.clone().acquire_owned() => p?,
        };
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = sub.next() => match m { Some(m) => m, None => break },
        };
        let cmd = match Command::decode(msg.payload) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "undecodable command");
                continue;
            }
        };
        let logic = logic.clone();
        // Continues the trace the gateway started (its context rides in the bus headers).
        let span = tracing::info_span!(
            "logic.command",
            user_id = cmd.origin.as_ref().map(|o| o.user_id)
        );
        zhibo_telemetry::trace::set_parent(&span, &msg.headers);
        tracker.spawn(
            async move {
                let started = std::time::Instant::now();
                let is_send = matches!(
                    cmd.packet.as_ref().and_then(|p| p.body.as_ref()),
                    Some(Body::SendMessage(_))
                );
                logic.handle(cmd).await;
                if is_send {
                    logic
                        .metrics
                        .send_ack_seconds
                        .observe(started.elapsed().as_secs_f64());
                }
                drop(permit);
            }
            .instrument(span),
        );
    }
    // Stop taking new commands (unsubscribe), finish the ones in flight.
    drop(sub);
    tracker.close();
    tracker.wait().await;
    debug!("logic worker stopped");
    Ok(())
}
