//! # Layout
//! - [`Logic`]: the message pipeline — authorise, dedup, allocate seqs, persist (write diffusion), fan out,
//!   sync and acks. Called by [`run`] for commands from gateways and directly by user-api for server sends.
//! - [`run`]: consumes `zhibo.cmd` in the `logic` queue group with bounded concurrency and finishes
//!   in-flight commands on shutdown.
//!
//! Send path: dedup lookup → authorise → seqs for every recipient (sender included) → dedup plan written
//! (insert-if-absent) → inbox entries written (durable) → SendMessageOutput to the sender → Message to every
//! device of every recipient but the sending device.
#![warn(missing_docs)]

use std::sync::Arc;

use bytes::Bytes;
use prost::Message as _;
use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};
use zhibo_bus::{subject::LOGIC_QUEUE_GROUP, Bus, Subject};
use zhibo_proto::bus::{user_event, Command, Delivery, Origin, UserEvent};
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{
    ErrorCode, Message, MessageAck, Packet, ReceiverType, SendMessageInput, SendMessageOutput,
    SyncInput, SyncOutput,
};
use zhibo_store::ids::{now_ms, IdGen};
use zhibo_store::{SendResult, Stores};

/// Logic worker configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogicConfig {
    /// Let any user message any user; when false, 1:1 messages need friendship.
    pub allow_strangers: bool,
    /// Messages per sync page when the client asks for 0.
    pub sync_page: u32,
    /// Largest sync page a client may ask for.
    pub max_sync_page: u32,
    /// Largest message content, bytes.
    pub max_content: usize,
    /// Longest client_msg_id, bytes.
    pub max_client_msg_id: usize,
    /// Commands handled at once by one worker.
    pub concurrency: usize,
    /// Node number for message ids (0–1023); random when unset.
    pub node_id: Option<u64>,
}

impl Default for LogicConfig {
    fn default() -> Self {
        LogicConfig {
            allow_strangers: false,
            sync_page: 100,
            max_sync_page: 500,
            max_content: 32 * 1024,
            max_client_msg_id: 64,
            concurrency: 256,
            node_id: None,
        }
    }
}

impl LogicConfig {
    /// Checks the values.
    ///
    /// # Errors
    /// A message naming the bad field.
    pub fn validate(&self) -> Result<(), String> {
        if self.sync_page == 0 || self.sync_page > self.max_sync_page {
            return Err("sync_page must be between 1 and max_sync_page".into());
        }
        if self.concurrency == 0 {
            return Err("concurrency must be at least 1".into());
        }
        if self.node_id.is_some_and(|n| n > 1023) {
            return Err("node_id must be 0..=1023".into());
        }
        Ok(())
    }
}

/// A refused or failed command, answered to the client as an Error packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct LogicError {
    /// Wire error code.
    pub code: ErrorCode,
    /// Text for the client.
    pub message: String,
}

impl LogicError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        LogicError {
            code,
            message: message.into(),
        }
    }
}

impl From<zhibo_store::Error> for LogicError {
    fn from(e: zhibo_store::Error) -> Self {
        warn!(error = %e, "store error");
        LogicError::new(
            ErrorCode::Unavailable,
            "storage unavailable; retry with the same client_msg_id",
        )
    }
}

/// The message pipeline.
pub struct Logic {
    stores: Stores,
    bus: Arc<dyn Bus>,
    ids: IdGen,
    config: LogicConfig,
}

impl std::fmt::Debug for Logic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Logic")
            .field("config", &self.config)
            .finish()
    }
}

impl Logic {
    /// A pipeline over `stores` publishing deliveries on `bus`.
    pub fn new(stores: Stores, bus: Arc<dyn Bus>, config: LogicConfig) -> Self {
        let node = config
            .node_id
            .unwrap_or_else(|| u64::from(std::process::id()) ^ (now_ms() as u64));
        Logic {
            stores,
            bus,
            ids: IdGen::messages(node),
            config,
        }
    }

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
            Some(Body::MessageAck(MessageAck { seq })) => {
                match self
                    .stores
                    .messages
                    .ack(origin.user_id, origin.device_id, seq)
                    .await
                {
                    Ok(()) => return,
                    Err(e) => Err(e.into()),
                }
            }
            _ => Err(LogicError::new(
                ErrorCode::UnexpectedPacket,
                format!("unexpected {}", packet.kind()),
            )),
        };
        let packet = match reply {
            Ok(body) => Packet::new(rid, body),
            Err(e) => Packet::error(rid, e.code, e.message),
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

    /// Sends a message from `origin` (a device, or device 0 for a server-side send). Returns only after
    /// the message is durable in every recipient's inbox.
    ///
    /// # Errors
    /// [`LogicError`] with the code the client sees.
    pub async fn send_message(
        &self,
        origin: &Origin,
        input: &SendMessageInput,
    ) -> Result<SendMessageOutput, LogicError> {
        if input.client_msg_id.is_empty()
            || input.client_msg_id.len() > self.config.max_client_msg_id
        {
            return Err(LogicError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "client_msg_id must be 1..={} bytes",
                    self.config.max_client_msg_id
                ),
            ));
        }
        if input.content.len() > self.config.max_content {
            return Err(LogicError::new(
                ErrorCode::InvalidArgument,
                format!("content exceeds {} bytes", self.config.max_content),
            ));
        }
        let sender = origin.user_id;
        let dedup_key = dedup_device(origin);
        if let Some(plan) = self
            .stores
            .messages
            .get_dedup(dedup_key, &input.client_msg_id)
            .await?
        {
            return self.complete(origin, input, plan, true).await;
        }
        let recipients = match ReceiverType::try_from(input.receiver_type) {
            Ok(ReceiverType::User) => {
                if self
                    .stores
                    .users
                    .get_user(input.receiver_id)
                    .await?
                    .is_none()
                {
                    return Err(LogicError::new(ErrorCode::NotFound, "no such user"));
                }
                if input.receiver_id != sender
                    && !self.config.allow_strangers
                    && origin.device_id != 0
                    && self
                        .stores
                        .friends
                        .get_friend(sender, input.receiver_id)
                        .await?
                        .is_none()
                {
                    return Err(LogicError::new(
                        ErrorCode::NotFriends,
                        "you are not friends with this user",
                    ));
                }
                if input.receiver_id == sender {
                    vec![sender]
                } else {
                    vec![sender, input.receiver_id]
                }
            }
            Ok(ReceiverType::Group) => {
                if self
                    .stores
                    .groups
                    .get_member(input.receiver_id, sender)
                    .await?
                    .is_none()
                {
                    let code = if self
                        .stores
                        .groups
                        .get_group(input.receiver_id)
                        .await?
                        .is_none()
                    {
                        ErrorCode::NotFound
                    } else {
                        ErrorCode::NotGroupMember
                    };
                    return Err(LogicError::new(code, "you are not a member of this group"));
                }
                self.stores.groups.member_ids(input.receiver_id).await?
            }
            _ => {
                return Err(LogicError::new(
                    ErrorCode::InvalidArgument,
                    "receiver_type must be USER or GROUP",
                ))
            }
        };
        let seqs = self.stores.seq.next(&recipients).await?;
        let recipients: Vec<(i64, u64)> = recipients.into_iter().zip(seqs).collect();
        let plan = SendResult {
            message_id: self.ids.next(),
            seq: recipients
                .iter()
                .find(|(u, _)| *u == sender)
                .map_or(0, |(_, s)| *s),
            server_time_ms: now_ms(),
            recipients,
        };
        match self
            .stores
            .messages
            .put_dedup_if_absent(dedup_key, &input.client_msg_id, &plan)
            .await?
        {
            // A racing resend stored its plan first: finish that one; our seqs stay unused.
            Some(existing) => self.complete(origin, input, existing, true).await,
            None => self.complete(origin, input, plan, false).await,
        }
    }

    /// Writes the plan's inbox entries (idempotent: a replay rewrites the same entries), then delivers.
    async fn complete(
        &self,
        origin: &Origin,
        input: &SendMessageInput,
        plan: SendResult,
        duplicate: bool,
    ) -> Result<SendMessageOutput, LogicError> {
        let template = Message {
            message_id: plan.message_id,
            seq: 0,
            sender_user_id: origin.user_id,
            sender_device_id: origin.device_id,
            receiver_type: input.receiver_type,
            receiver_id: input.receiver_id,
            client_msg_id: input.client_msg_id.clone(),
            server_time_ms: plan.server_time_ms,
            content_type: input.content_type,
            content: input.content.clone(),
        };
        let entries: Vec<(i64, Message)> = plan
            .recipients
            .iter()
            .map(|&(user_id, seq)| {
                (
                    user_id,
                    Message {
                        seq,
                        ..template.clone()
                    },
                )
            })
            .collect();
        self.stores.messages.append_many(&entries).await?;
        for (user_id, message) in entries {
            let exclude = if user_id == origin.user_id {
                origin.device_id
            } else {
                0
            };
            let event = UserEvent {
                event: Some(user_event::Event::Delivery(Delivery {
                    conn_id: 0,
                    exclude_device_id: exclude,
                    packets: vec![Packet::new(0, Body::Message(message))],
                })),
            };
            if let Err(e) = self
                .bus
                .publish(
                    &Subject::user(user_id),
                    Vec::new(),
                    Bytes::from(event.encode_to_vec()),
                )
                .await
            {
                // Stored already: the device gets it at its next sync.
                warn!(user_id, error = %e, "live delivery failed");
            }
        }
        Ok(SendMessageOutput {
            message_id: plan.message_id,
            seq: plan.seq,
            server_time_ms: plan.server_time_ms,
            duplicate,
        })
    }

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
            .await?;
        let has_more = messages.len() > limit;
        messages.truncate(limit);
        Ok(SyncOutput { messages, has_more })
    }
}

/// The device part of the dedup key: the sending device, or for a server-side send (device 0) the
/// negated user id, so two users' server sends never share a `client_msg_id` space (device ids are > 0).
fn dedup_device(origin: &Origin) -> i64 {
    if origin.device_id == 0 {
        -origin.user_id
    } else {
        origin.device_id
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
        let span =
            tracing::debug_span!("command", user_id = cmd.origin.as_ref().map(|o| o.user_id));
        tracker.spawn(
            async move {
                logic.handle(cmd).await;
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
