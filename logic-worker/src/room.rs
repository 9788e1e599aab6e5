//! Room traffic: room sends (size, reserved types, closed and muted rooms, recent history), notices zhibo
//! generates, and server-wide broadcasts.

use bytes::Bytes;
use prost::Message as _;
use tracing::warn;
use zhibo_bus::Subject;
use zhibo_proto::bus::{room_event, Origin, RoomEvent};
use zhibo_proto::client::{
    ErrorCode, Message, ReceiverType, RoomNotice, SendMessageInput, SendMessageOutput,
};
use zhibo_store::ids::now_ms;

use crate::{Logic, LogicError, Op};

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
