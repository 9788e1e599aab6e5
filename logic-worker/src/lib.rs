//! # Layout
//! - [`Logic`]: the message pipeline — authorise, dedup, allocate seqs, persist (write diffusion), fan out,
//!   sync and acks. Called by [`run`] for commands from gateways and directly by user-api for server sends.
//! - [`run`]: consumes `zhibo.cmd` in the `logic` queue group with bounded concurrency and finishes
//!   in-flight commands on shutdown.
//!
//! Send path: dedup lookup → authorise → seqs for every recipient (sender included) → dedup plan written
//! (insert-if-absent) → inbox entries written (durable; one transaction with the plan where the backend
//! can, see `MessageStore::record_send`) → SendMessageOutput to the sender → Message to every device of
//! every recipient but the sending device. A resend (same `client_msg_id`) rewrites the same entries and
//! publishes them again: live delivery is at least once, clients drop repeats by seq / message id.
//!
//! Room send path (no seq, no inbox, no dedup): size and reserved-type checks → the room's record (closed,
//! muted) → recent history write (best effort, *before* the publish so a joiner's history read and its
//! live subscription leave no gap) → one publish on `zhibo.room.<id>` → SendMessageOutput with seq 0.
#![warn(missing_docs)]

use std::sync::Arc;

use bytes::Bytes;
use prost::Message as _;
use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn, Instrument};
use zhibo_bus::{subject::LOGIC_QUEUE_GROUP, Bus, Subject};
use zhibo_proto::bus::{room_event, user_event, Command, Delivery, Origin, RoomEvent, UserEvent};
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{
    ErrorCode, Message, MessageAck, Packet, ReceiverType, RoomNotice, SendMessageInput,
    SendMessageOutput, SyncInput, SyncOutput,
};
use zhibo_store::ids::{now_ms, IdGen};
use zhibo_store::leases::{LeaseTiming, LeasedIds, Pool};
use zhibo_store::{SendPlan, Stores};
use zhibo_telemetry::metrics::KindLabel;
use zhibo_telemetry::Metrics;

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
    /// Largest sync page, bytes: below the gateway's `max_frame` so a page always fits in one frame.
    pub max_sync_bytes: usize,
    /// Longest client_msg_id, bytes.
    pub max_client_msg_id: usize,
    /// Commands handled at once by one worker.
    pub concurrency: usize,
    /// Node number for message ids (0–1023). Unset (the default): leased from the store's pool of 1024,
    /// unique cluster-wide while held (see `zhibo_store::ids`). Set: the operator promises no other
    /// process mints with this number, ever at the same time (no lease is taken).
    pub node_id: Option<u64>,
    /// Largest room message content, bytes (danmaku are short; a frame batches many of them).
    pub max_room_content: usize,
    /// Room messages kept per room for late joiners.
    pub room_recent: usize,
}

impl Default for LogicConfig {
    fn default() -> Self {
        LogicConfig {
            allow_strangers: false,
            sync_page: 100,
            max_sync_page: 500,
            max_content: 32 * 1024,
            max_sync_bytes: 56 * 1024,
            max_client_msg_id: 64,
            concurrency: 256,
            node_id: None,
            max_room_content: 4096,
            room_recent: 50,
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
        if self.max_sync_bytes < self.max_content + 1024 {
            return Err(
                "max_sync_bytes must exceed max_content by 1 KiB (a page holds one message)".into(),
            );
        }
        if self.concurrency == 0 {
            return Err("concurrency must be at least 1".into());
        }
        if self.node_id.is_some_and(|n| n > 1023) {
            return Err("node_id must be 0..=1023".into());
        }
        if self.max_room_content > 60 * 1024 {
            return Err("max_room_content must be at most 60 KiB (one frame must hold it)".into());
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

/// The command a store failure interrupted: what the client should do next depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Op {
    /// An IM send (user or group): deduplicated, so a resend is safe.
    Send,
    /// A sync page.
    Sync,
    /// A message ack.
    Ack,
    /// A room send (no dedup: a retry may publish twice).
    RoomSend,
}

impl LogicError {
    /// The client-facing error for a store failure during `op`, by what is true of it: a transient
    /// backend failure ([`zhibo_store::ErrorKind::Unavailable`]) is `UNAVAILABLE` with the retry that is
    /// safe for `op`; anything else (corrupt stored data, an answer the pipeline cannot explain) is
    /// `INTERNAL`, which retrying does not fix. The cause is logged here, never sent.
    pub fn store(op: Op, e: &zhibo_store::Error) -> Self {
        use zhibo_store::ErrorKind;
        match e.kind {
            ErrorKind::Unavailable => {
                warn!(?op, error = %e, "store unavailable");
                let text = match op {
                    Op::Send => "storage unavailable; retry with the same client_msg_id",
                    Op::Sync => "storage unavailable; retry the sync",
                    Op::Ack => "storage unavailable; retry the ack",
                    Op::RoomSend => "storage unavailable; retry",
                };
                LogicError::new(ErrorCode::Unavailable, text)
            }
            ErrorKind::Corrupt => {
                error!(?op, error = %e, "corrupt stored data");
                LogicError::new(
                    ErrorCode::Internal,
                    "stored data could not be read; retrying will not help",
                )
            }
            _ => {
                error!(?op, error = %e, "unexpected store error");
                LogicError::new(ErrorCode::Internal, "internal error")
            }
        }
    }
}

fn send_err(e: zhibo_store::Error) -> LogicError {
    LogicError::store(Op::Send, &e)
}

/// Where message ids come from.
enum MessageIds {
    /// A configured node number.
    Fixed(IdGen),
    /// A leased node number: no id without a valid lease.
    Leased(LeasedIds),
}

/// The message pipeline.
pub struct Logic {
    stores: Stores,
    bus: Arc<dyn Bus>,
    ids: MessageIds,
    config: LogicConfig,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Logic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Logic")
            .field("config", &self.config)
            .finish()
    }
}

impl Logic {
    /// A pipeline over `stores` publishing deliveries on `bus`. Without `config.node_id` it leases a node
    /// number for message ids from `stores.leases` in the background (call inside a tokio runtime), and
    /// refuses to mint (`UNAVAILABLE`, retryable) while it holds no valid lease.
    pub fn new(stores: Stores, bus: Arc<dyn Bus>, config: LogicConfig) -> Self {
        let ids = match config.node_id {
            Some(node) => MessageIds::Fixed(IdGen::messages(node)),
            None => MessageIds::Leased(LeasedIds::start(
                stores.leases.clone(),
                Pool::Messages,
                LeaseTiming::default(),
            )),
        };
        Logic {
            stores,
            bus,
            ids,
            config,
            metrics: Arc::new(Metrics::new()),
        }
    }

    /// Gives back the leased node number (at shutdown, once nothing sends any more); a no-op with a
    /// configured `node_id`.
    pub async fn release_ids(&self) {
        if let MessageIds::Leased(ids) = &self.ids {
            ids.release().await;
        }
    }

    /// A new message id for `op`.
    async fn next_id(&self, op: Op) -> Result<u64, LogicError> {
        match &self.ids {
            MessageIds::Fixed(gen) => Ok(gen.next()),
            MessageIds::Leased(ids) => ids.next().await.map_err(|e| LogicError::store(op, &e)),
        }
    }

    /// Records into the process's `metrics` instead of a private registry.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
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
                    Err(e) => Err(LogicError::store(Op::Ack, &e)),
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
        if input.receiver_type == ReceiverType::Room as i32 {
            return self.send_room_message(origin, input).await;
        }
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
            .await
            .map_err(send_err)?
        {
            return self.replay(origin, input, plan).await;
        }
        let recipients = match ReceiverType::try_from(input.receiver_type) {
            Ok(ReceiverType::User) => {
                if self
                    .stores
                    .users
                    .get_user(input.receiver_id)
                    .await
                    .map_err(send_err)?
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
                        .await
                        .map_err(send_err)?
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
                    .await
                    .map_err(send_err)?
                    .is_none()
                {
                    let code = if self
                        .stores
                        .groups
                        .get_group(input.receiver_id)
                        .await
                        .map_err(send_err)?
                        .is_none()
                    {
                        ErrorCode::NotFound
                    } else {
                        ErrorCode::NotGroupMember
                    };
                    return Err(LogicError::new(code, "you are not a member of this group"));
                }
                self.stores
                    .groups
                    .member_ids(input.receiver_id)
                    .await
                    .map_err(send_err)?
            }
            _ => {
                return Err(LogicError::new(
                    ErrorCode::InvalidArgument,
                    "receiver_type must be USER, GROUP or ROOM",
                ))
            }
        };
        // Minted before the seqs, so a refusal (no node lease) wastes none.
        let message_id = self.next_id(Op::Send).await?;
        let seqs = self
            .stores
            .seq
            .next(&recipients)
            .instrument(tracing::info_span!("seq.allocate", n = recipients.len()))
            .await
            .inspect_err(|_| {
                self.metrics.store_errors.inc();
            })
            .map_err(send_err)?;
        let recipients: Vec<(i64, u64)> = recipients.into_iter().zip(seqs).collect();
        let plan = SendPlan {
            message_id,
            seq: recipients
                .iter()
                .find(|(u, _)| *u == sender)
                .map_or(0, |(_, s)| *s),
            server_time_ms: now_ms(),
            recipients,
        };
        let entries = inbox_entries(&plan, &new_message(origin, input, &plan));
        match self
            .stores
            .messages
            .record_send(dedup_key, &input.client_msg_id, &plan, &entries)
            .instrument(tracing::info_span!("store.write", n = entries.len()))
            .await
            .inspect_err(|_| {
                self.metrics.store_errors.inc();
            })
            .map_err(send_err)?
        {
            // A racing resend stored its plan first: finish that one; our seqs stay unused.
            Some(existing) => self.replay(origin, input, existing).await,
            None => {
                self.metrics.messages_sent.inc();
                Ok(self.deliver(origin, &plan, entries, false).await)
            }
        }
    }

    /// Finishes a resend of a planned message: writes the plan's inbox entries again (idempotent), and
    /// publishes them again (the first attempt may have died before publishing).
    async fn replay(
        &self,
        origin: &Origin,
        input: &SendMessageInput,
        plan: SendPlan,
    ) -> Result<SendMessageOutput, LogicError> {
        let fresh = new_message(origin, input, &plan);
        // A resend replays the plan from the message as first stored (the sender's own inbox entry), so a
        // resend can never rewrite what recipients already have; one that differs is refused. Only when
        // nothing was stored yet (a crash between plan and writes) does the resend's content go in.
        let stored = self.stored_original(origin.user_id, &plan).await?;
        let template = match stored {
            Some(original) => {
                let same = original.receiver_type == fresh.receiver_type
                    && original.receiver_id == fresh.receiver_id
                    && original.content_type == fresh.content_type
                    && original.content == fresh.content;
                if !same {
                    return Err(LogicError::new(
                        ErrorCode::InvalidArgument,
                        "client_msg_id already used for a different message",
                    ));
                }
                original
            }
            None => fresh,
        };
        let entries = inbox_entries(&plan, &template);
        self.stores
            .messages
            .append_many(&entries)
            .instrument(tracing::info_span!("store.write", n = entries.len()))
            .await
            .inspect_err(|_| {
                self.metrics.store_errors.inc();
            })
            .map_err(send_err)?;
        // Nothing records whether the first attempt published its deliveries: a worker killed after the
        // writes and before (or during) the publishes leaves a stored message no device was pushed. So a
        // replay always publishes them again; a device that already had it drops the repeat by its seq
        // and message_id (live delivery is at least once, see proto/README.md).
        Ok(self.deliver(origin, &plan, entries, true).await)
    }

    /// Publishes stored inbox entries to their users' devices (all but the sending device).
    async fn deliver(
        &self,
        origin: &Origin,
        plan: &SendPlan,
        entries: Vec<(i64, Message)>,
        duplicate: bool,
    ) -> SendMessageOutput {
        let publish = tracing::info_span!("delivery.publish", n = entries.len());
        let headers = zhibo_telemetry::trace::inject(&publish);
        async {
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
                        headers.clone(),
                        Bytes::from(event.encode_to_vec()),
                    )
                    .await
                {
                    // Stored already: the device gets it at its next sync.
                    self.metrics
                        .bus_errors
                        .get_or_create(&KindLabel {
                            kind: "publish_delivery",
                        })
                        .inc();
                    warn!(user_id, error = %e, "live delivery failed");
                } else {
                    self.metrics.messages_delivered.inc();
                }
            }
        }
        .instrument(publish)
        .await;
        output(plan, duplicate)
    }

    /// The sender's stored copy of a planned message, if the plan's writes reached the sender's inbox.
    async fn stored_original(
        &self,
        sender: i64,
        plan: &SendPlan,
    ) -> Result<Option<Message>, LogicError> {
        if plan.seq == 0 {
            return Ok(None);
        }
        let found = self
            .stores
            .messages
            .sync(sender, plan.seq - 1, 1)
            .await
            .map_err(send_err)?;
        Ok(found
            .into_iter()
            .find(|m| m.seq == plan.seq && m.message_id == plan.message_id))
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
            .await
            .map_err(|e| LogicError::store(Op::Sync, &e))?;
        let mut has_more = messages.len() > limit;
        messages.truncate(limit);
        // The page must fit in one frame: stop before the byte budget (always at least one message).
        let mut bytes = 0;
        if let Some(over) = messages.iter().position(|m| {
            bytes += m.encoded_len() + 8;
            bytes > self.config.max_sync_bytes
        }) {
            messages.truncate(over.max(1));
            has_more = true;
        }
        Ok(SyncOutput { messages, has_more })
    }
}

impl Logic {
    /// Sends a room message from `origin` (a device, or device 0 for a server-side send, which bypasses
    /// closed and muted rooms): remembered for late joiners, then published once to the room's subject.
    /// Room messages have seq 0, no inbox and no dedup (`client_msg_id` is optional and only echoed).
    ///
    /// # Errors
    /// [`LogicError`] with `INVALID_ARGUMENT` (size, reserved content type, room id), `ROOM_CLOSED`,
    /// `MUTED`, or `UNAVAILABLE` when the room record cannot be read or the publish fails.
    pub async fn send_room_message(
        &self,
        origin: &Origin,
        input: &SendMessageInput,
    ) -> Result<SendMessageOutput, LogicError> {
        if input.receiver_id <= 0 {
            return Err(LogicError::new(
                ErrorCode::InvalidArgument,
                "room ids are > 0",
            ));
        }
        if input.content.len() > self.config.max_room_content {
            return Err(LogicError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "room message content exceeds {} bytes",
                    self.config.max_room_content
                ),
            ));
        }
        if input.client_msg_id.len() > self.config.max_client_msg_id {
            return Err(LogicError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "client_msg_id must be at most {} bytes",
                    self.config.max_client_msg_id
                ),
            ));
        }
        if input.content_type < 0 {
            return Err(LogicError::new(
                ErrorCode::InvalidArgument,
                "negative content types are reserved for room notices",
            ));
        }
        let server_side = origin.device_id == 0;
        if !server_side {
            if let Some(room) = self
                .stores
                .rooms
                .get_room(input.receiver_id)
                .await
                .map_err(|e| LogicError::store(Op::RoomSend, &e))?
            {
                if room.closed {
                    return Err(LogicError::new(ErrorCode::RoomClosed, "the room is closed"));
                }
                if room.muted && !room.is_manager(origin.user_id) {
                    return Err(LogicError::new(ErrorCode::Muted, "the room is muted"));
                }
            }
        }
        let message = Message {
            message_id: self.next_id(Op::RoomSend).await?,
            seq: 0,
            sender_user_id: origin.user_id,
            // Every viewer gets the same copy, so no device id: see `inbox_entries`.
            sender_device_id: 0,
            receiver_type: ReceiverType::Room as i32,
            receiver_id: input.receiver_id,
            client_msg_id: input.client_msg_id.clone(),
            server_time_ms: now_ms(),
            content_type: input.content_type,
            content: input.content.clone(),
        };
        if let Err(e) = self
            .stores
            .rooms
            .push_recent(input.receiver_id, &message, self.config.room_recent)
            .await
        {
            // History is a convenience for late joiners; live viewers still get the message.
            warn!(room_id = input.receiver_id, error = %e, "room history write failed");
        }
        let out = SendMessageOutput {
            message_id: message.message_id,
            seq: 0,
            server_time_ms: message.server_time_ms,
            duplicate: false,
        };
        self.publish_room(&Subject::room(input.receiver_id), message)
            .await?;
        Ok(out)
    }

    /// Publishes a notice zhibo itself generates (e.g. [`RoomNotice::Closed`]) to a room's viewers; not
    /// kept in the room's history.
    ///
    /// # Errors
    /// `UNAVAILABLE` when the publish fails.
    pub async fn room_notice(&self, room_id: i64, notice: RoomNotice) -> Result<(), LogicError> {
        let message = Message {
            receiver_type: ReceiverType::Room as i32,
            receiver_id: room_id,
            server_time_ms: now_ms(),
            content_type: notice as i32,
            ..Message::default()
        };
        self.publish_room(&Subject::room(room_id), message).await
    }

    /// Closes every live connection of a device that signed out (its tokens are already revoked, so it
    /// cannot sign in again with them).
    ///
    /// # Errors
    /// [`LogicError`] with `UNAVAILABLE` when the bus refuses the event.
    pub async fn kick_signed_out(&self, user_id: i64, device_id: i64) -> Result<(), LogicError> {
        let event = UserEvent {
            event: Some(user_event::Event::DeviceSignedOut(
                zhibo_proto::bus::DeviceSignedOut { user_id, device_id },
            )),
        };
        self.bus
            .publish(
                &Subject::user(user_id),
                Vec::new(),
                Bytes::from(event.encode_to_vec()),
            )
            .await
            .map_err(|e| {
                warn!(user_id, device_id, error = %e, "sign-out kick not published");
                LogicError::new(ErrorCode::Unavailable, "try again later")
            })
    }

    /// Sends a notice from `sender_user_id` (0 = the system) to every connected device of the cluster,
    /// as room traffic of room 0: not stored, dropped for connections too slow to take it.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for oversized content or a reserved content type; `UNAVAILABLE` when the publish
    /// fails.
    pub async fn broadcast(
        &self,
        sender_user_id: i64,
        content_type: i32,
        content: Bytes,
    ) -> Result<SendMessageOutput, LogicError> {
        if content.len() > self.config.max_room_content || content_type < 0 {
            return Err(LogicError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "content must be at most {} bytes, content_type >= 0",
                    self.config.max_room_content
                ),
            ));
        }
        let message = Message {
            message_id: self.next_id(Op::RoomSend).await?,
            sender_user_id,
            receiver_type: ReceiverType::Room as i32,
            server_time_ms: now_ms(),
            content_type,
            content,
            ..Message::default()
        };
        let out = SendMessageOutput {
            message_id: message.message_id,
            seq: 0,
            server_time_ms: message.server_time_ms,
            duplicate: false,
        };
        self.publish_room(&Subject::broadcast(), message).await?;
        Ok(out)
    }

    async fn publish_room(&self, subject: &Subject, message: Message) -> Result<(), LogicError> {
        let event = RoomEvent {
            event: Some(room_event::Event::Message(message)),
        };
        self.bus
            .publish(subject, Vec::new(), Bytes::from(event.encode_to_vec()))
            .await
            .map_err(|e| {
                warn!(%subject, error = %e, "room publish failed");
                LogicError::new(ErrorCode::Unavailable, "try again later")
            })
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

/// The message `input` becomes under `plan`, before a seq is set per inbox.
fn new_message(origin: &Origin, input: &SendMessageInput, plan: &SendPlan) -> Message {
    Message {
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
    }
}

/// One inbox entry per recipient of `plan`: `template` at that recipient's seq. Only the sender's own
/// copy names the sending device: device ids are the sender's business (they identify the install whose
/// tokens a sign-out revokes), so other users get `sender_device_id` 0.
fn inbox_entries(plan: &SendPlan, template: &Message) -> Vec<(i64, Message)> {
    plan.recipients
        .iter()
        .map(|&(user_id, seq)| {
            let sender_device_id = if user_id == template.sender_user_id {
                template.sender_device_id
            } else {
                0
            };
            (
                user_id,
                Message {
                    seq,
                    sender_device_id,
                    ..template.clone()
                },
            )
        })
        .collect()
}

fn output(plan: &SendPlan, duplicate: bool) -> SendMessageOutput {
    SendMessageOutput {
        message_id: plan.message_id,
        seq: plan.seq,
        server_time_ms: plan.server_time_ms,
        duplicate,
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

#[cfg(test)]
mod tests {
    use super::*;
    use zhibo_store::{Error as StoreError, ErrorKind};

    #[test]
    fn store_errors_say_what_is_true_per_kind_and_command() {
        let down = StoreError::new(ErrorKind::Unavailable, "connection refused");
        let send = LogicError::store(Op::Send, &down);
        assert_eq!(send.code, ErrorCode::Unavailable);
        assert!(send.message.contains("same client_msg_id"), "{send}");
        let sync = LogicError::store(Op::Sync, &down);
        assert_eq!(sync.code, ErrorCode::Unavailable);
        assert!(sync.message.contains("retry the sync"), "{sync}");
        assert!(!sync.message.contains("client_msg_id"), "{sync}");
        let ack = LogicError::store(Op::Ack, &down);
        assert_eq!(ack.code, ErrorCode::Unavailable);
        assert!(!ack.message.contains("client_msg_id"), "{ack}");
        let room = LogicError::store(Op::RoomSend, &down);
        assert!(!room.message.contains("client_msg_id"), "{room}");

        let corrupt = StoreError::new(ErrorKind::Corrupt, "inbox message: invalid wire type");
        for op in [Op::Send, Op::Sync, Op::Ack, Op::RoomSend] {
            let e = LogicError::store(op, &corrupt);
            assert_eq!(e.code, ErrorCode::Internal, "{op:?}");
            assert!(!e.message.contains("retry with"), "{e}");
            assert!(!e.message.contains("wire type"), "no internals leak: {e}");
        }
        let odd = StoreError::new(ErrorKind::Conflict, "taken");
        assert_eq!(LogicError::store(Op::Send, &odd).code, ErrorCode::Internal);
    }
}
