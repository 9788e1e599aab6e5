//! Room traffic: room sends (size, reserved types, bans, closed and muted rooms, recent history), notices zhibo
//! generates, and server-wide broadcasts.

use bytes::Bytes;
use prost::Message as _;
use tracing::warn;
use zhibo_bus::Subject;
use zhibo_proto::bus::{room_event, Origin, RoomEvent};
use zhibo_proto::client::{
    ErrorCode, Message, ReceiverType, RoomClass, RoomNotice, SendMessageInput, SendMessageOutput,
};
use zhibo_store::ids::now_ms;

use crate::hook::Verdict;
use crate::{Logic, LogicError, Op};

impl Logic {
    /// Sends a room message from `origin` (a device, or device 0 for a server-side send, which bypasses
    /// closed and muted rooms): remembered for late joiners, then published once to the room's subject.
    /// Room messages have seq 0, no inbox and no dedup (`client_msg_id` is optional and only echoed).
    ///
    /// # Errors
    /// [`LogicError`] with `INVALID_ARGUMENT` (size, reserved content type, room id), `ROOM_BANNED`,
    /// `ROOM_CLOSED`, `MUTED`, or `UNAVAILABLE` when the room record cannot be read or the publish fails.
    pub async fn send_room_message(
        &self,
        origin: &Origin,
        input: &SendMessageInput,
    ) -> Result<SendMessageOutput, LogicError> {
        if !(1..=zhibo_store::ids::MAX_ID).contains(&input.receiver_id) {
            return Err(LogicError::new(
                ErrorCode::InvalidArgument,
                "room ids are 1 to 2^53-1",
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
        let Ok(class) = RoomClass::try_from(input.room_class) else {
            return Err(LogicError::new(
                ErrorCode::InvalidArgument,
                "unknown room_class",
            ));
        };
        let server_side = origin.device_id == 0;
        if !server_side {
            // The record and the sender's ban are read concurrently: one round trip of latency.
            let rooms = &self.stores.rooms;
            let (room, ban) = tokio::join!(
                rooms.get_room(input.receiver_id),
                rooms.get_ban(input.receiver_id, origin.user_id)
            );
            let store = |e: zhibo_store::Error| LogicError::store(Op::RoomSend, &e);
            if ban.map_err(store)?.is_some() {
                return Err(LogicError::new(
                    ErrorCode::RoomBanned,
                    "you are banned from this room",
                ));
            }
            if let Some(room) = room.map_err(store)? {
                if room.closed {
                    return Err(LogicError::new(ErrorCode::RoomClosed, "the room is closed"));
                }
                if room.muted && !room.is_manager(origin.user_id) {
                    return Err(LogicError::new(ErrorCode::Muted, "the room is muted"));
                }
            }
        }
        let replaced = match self.hook_for(origin, input.receiver_type) {
            Some(hook) => match hook
                .check(origin, input, self.config.max_room_content)
                .await?
            {
                Verdict::AsSent => None,
                Verdict::Replace(content) => Some(content),
            },
            None => None,
        };
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
            content: replaced.clone().unwrap_or_else(|| input.content.clone()),
            conv_seq: 0,
        };
        // Likes are counters, not chat a late joiner reads.
        let remembered = if class == RoomClass::Like {
            Ok(())
        } else {
            self.stores
                .rooms
                .push_recent(input.receiver_id, &message, self.config.room_recent)
                .await
        };
        if let Err(e) = remembered {
            // History is a convenience for late joiners; live viewers still get the message.
            warn!(room_id = input.receiver_id, error = %e, "room history write failed");
        }
        let out = SendMessageOutput {
            message_id: message.message_id,
            seq: 0,
            server_time_ms: message.server_time_ms,
            duplicate: false,
            content_replaced: replaced.is_some(),
            content: replaced.unwrap_or_default(),
            ..SendMessageOutput::default()
        };
        self.publish_room(&Subject::room(input.receiver_id), message, class)
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
        // A notice (e.g. the room closed) is never sampled away.
        self.publish_room(&Subject::room(room_id), message, RoomClass::High)
            .await
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
            ..SendMessageOutput::default()
        };
        self.publish_room(&Subject::broadcast(), message, RoomClass::High)
            .await?;
        Ok(out)
    }

    pub(crate) async fn publish_room(
        &self,
        subject: &Subject,
        message: Message,
        class: RoomClass,
    ) -> Result<(), LogicError> {
        let event = RoomEvent {
            event: Some(room_event::Event::Message(message)),
            class: class as i32,
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use prost::Message as _;
    use zhibo_bus::memory::MemoryBus;
    use zhibo_bus::{Bus, Subject, Subscription};
    use zhibo_proto::bus::{room_event, Origin, RoomEvent};
    use zhibo_proto::client::{ErrorCode, Message, ReceiverType, SendMessageInput};
    use zhibo_store::embedded::EmbeddedBackend;
    use zhibo_store::Room;

    use crate::{Logic, LogicConfig, LogicError};

    const ROOM: i64 = 42;
    const OWNER: i64 = 1;
    const ADMIN: i64 = 2;
    const VIEWER: i64 = 3;

    struct Fixture {
        logic: Logic,
        stores: zhibo_store::Stores,
        /// What the room's viewers receive.
        viewers: Subscription,
    }

    async fn fixture() -> Fixture {
        let stores = Arc::new(EmbeddedBackend::temporary().expect("store")).stores();
        let bus = Arc::new(MemoryBus::new());
        let viewers = bus
            .subscribe(&Subject::room(ROOM))
            .await
            .expect("subscribe");
        let config = LogicConfig {
            node_id: Some(512),
            ..LogicConfig::default()
        };
        let logic = Logic::new(
            stores.clone(),
            bus as Arc<dyn Bus>,
            Arc::new(zhibo_store::presence::MemoryPresence::new()),
            config,
        );
        Fixture {
            logic,
            stores,
            viewers,
        }
    }

    impl Fixture {
        async fn set_room(&self, closed: bool, muted: bool) {
            let room = Room {
                room_id: ROOM,
                owner_user_id: OWNER,
                admin_user_ids: vec![ADMIN],
                closed,
                muted,
                ..Room::default()
            };
            self.stores.rooms.put_room(&room).await.expect("put room");
        }

        async fn send(&self, user_id: i64, device_id: i64, text: &[u8]) -> Result<u64, LogicError> {
            let input = SendMessageInput {
                receiver_type: ReceiverType::Room as i32,
                receiver_id: ROOM,
                client_msg_id: String::new(),
                content_type: 1,
                content: Bytes::copy_from_slice(text),
                ..Default::default()
            };
            self.send_input(user_id, device_id, &input).await
        }

        async fn send_input(
            &self,
            user_id: i64,
            device_id: i64,
            input: &SendMessageInput,
        ) -> Result<u64, LogicError> {
            let origin = Origin {
                user_id,
                device_id,
                gateway_id: String::new(),
                conn_id: 0,
            };
            let out = self.logic.send_message(&origin, input).await?;
            assert_eq!(out.seq, 0, "room messages have no seq");
            Ok(out.message_id)
        }

        /// The next message the room's viewers get. The in-process bus hands a publish to subscribers
        /// before `publish` returns, so a refused send followed by an accepted one shows here as the
        /// accepted one alone.
        async fn next_seen(&mut self) -> Message {
            let m = tokio::time::timeout(Duration::from_secs(5), self.viewers.next())
                .await
                .expect("a room message within 5 s")
                .expect("subscription open");
            match RoomEvent::decode(m.payload).expect("room event").event {
                Some(room_event::Event::Message(message)) => message,
                other => panic!("expected a room message, got {other:?}"),
            }
        }

        /// Sends a marker the room accepts and checks it is the next thing viewers see: nothing refused
        /// before it was published.
        async fn assert_nothing_published(&mut self) {
            self.set_room(false, false).await;
            let id = self.send(VIEWER, 30, b"marker").await.expect("marker send");
            let seen = self.next_seen().await;
            assert_eq!(
                (seen.message_id, seen.content.as_ref()),
                (id, &b"marker"[..]),
                "a refused send reached the viewers"
            );
        }
    }

    fn code(r: Result<u64, LogicError>) -> ErrorCode {
        r.expect_err("refused").code
    }

    #[tokio::test]
    async fn room_content_size_is_bounded_by_max_room_content() {
        let mut f = fixture().await;
        let max = LogicConfig::default().max_room_content;
        let at_max = vec![b'a'; max];
        let id = f.send(VIEWER, 30, &at_max).await.expect("at the limit");
        let seen = f.next_seen().await;
        assert_eq!((seen.message_id, seen.content.len()), (id, max));
        assert_eq!(seen.sender_user_id, VIEWER);
        assert_eq!(seen.sender_device_id, 0, "viewers never see device ids");

        let over = vec![b'a'; max + 1];
        assert_eq!(
            code(f.send(VIEWER, 30, &over).await),
            ErrorCode::InvalidArgument
        );
        // Not even a server-side send may exceed it.
        assert_eq!(code(f.send(0, 0, &over).await), ErrorCode::InvalidArgument);
        f.assert_nothing_published().await;
    }

    #[tokio::test]
    async fn negative_content_types_are_reserved_for_notices() {
        let mut f = fixture().await;
        for (user, device) in [(VIEWER, 30), (OWNER, 10), (0, 0)] {
            let input = SendMessageInput {
                receiver_type: ReceiverType::Room as i32,
                receiver_id: ROOM,
                client_msg_id: String::new(),
                content_type: -1,
                content: Bytes::from_static(b"fake notice"),
                ..Default::default()
            };
            let refused = f.send_input(user, device, &input).await;
            assert_eq!(code(refused), ErrorCode::InvalidArgument, "user {user}");
        }
        f.assert_nothing_published().await;
    }

    #[tokio::test]
    async fn a_closed_room_refuses_every_device_but_not_the_server() {
        let mut f = fixture().await;
        f.set_room(true, false).await;
        for (user, device) in [(VIEWER, 30), (OWNER, 10), (ADMIN, 20)] {
            assert_eq!(
                code(f.send(user, device, b"hi").await),
                ErrorCode::RoomClosed,
                "user {user}"
            );
        }
        let id = f.send(0, 0, b"server").await.expect("server send");
        assert_eq!(f.next_seen().await.message_id, id);
        f.assert_nothing_published().await;
    }

    #[tokio::test]
    async fn a_muted_room_takes_only_owner_admins_and_server() {
        let mut f = fixture().await;
        f.set_room(false, true).await;
        assert_eq!(code(f.send(VIEWER, 30, b"hi").await), ErrorCode::Muted);
        for (user, device) in [(OWNER, 10), (ADMIN, 20), (0, 0)] {
            let id = f
                .send(user, device, b"allowed")
                .await
                .expect("manager send");
            let seen = f.next_seen().await;
            assert_eq!((seen.message_id, seen.sender_user_id), (id, user));
        }
        // Unmuted, the viewer is heard again.
        f.set_room(false, false).await;
        let id = f.send(VIEWER, 30, b"back").await.expect("unmuted");
        assert_eq!(f.next_seen().await.message_id, id);
    }

    #[tokio::test]
    async fn a_room_without_a_record_is_open() {
        let mut f = fixture().await;
        let id = f.send(VIEWER, 30, b"hello").await.expect("open room");
        assert_eq!(f.next_seen().await.message_id, id);
        let recent = f.stores.rooms.recent(ROOM, 10).await.expect("recent");
        assert_eq!(recent.len(), 1, "kept for late joiners");
        assert_eq!(recent[0].message_id, id);
    }

    /// Issue 17: the class of a room send travels with it to the gateways; a send without one is chat;
    /// likes are not kept for late joiners; an unknown class is refused.
    #[tokio::test]
    async fn a_room_send_carries_its_class() {
        use zhibo_proto::client::RoomClass;
        let mut f = fixture().await;
        let send = |class: i32, text: &'static [u8]| SendMessageInput {
            receiver_type: ReceiverType::Room as i32,
            receiver_id: ROOM,
            content_type: 1,
            content: Bytes::from_static(text),
            room_class: class,
            ..Default::default()
        };
        let next_class = async |f: &mut Fixture| {
            let m = tokio::time::timeout(Duration::from_secs(5), f.viewers.next())
                .await
                .expect("in time")
                .expect("open");
            let e = RoomEvent::decode(m.payload).expect("room event");
            let Some(room_event::Event::Message(msg)) = e.event else {
                panic!("expected a message");
            };
            (msg.content, RoomClass::try_from(e.class).expect("class"))
        };
        for (class, text) in [
            (RoomClass::Chat, &b"chat"[..]),
            (RoomClass::High, b"gift"),
            (RoomClass::Like, b"like"),
        ] {
            let input = send(class as i32, text);
            f.send_input(VIEWER, 30, &input).await.expect("sent");
            assert_eq!(next_class(&mut f).await, (Bytes::from_static(text), class));
        }
        let recent = f.stores.rooms.recent(ROOM, 10).await.expect("recent");
        let kept: Vec<&[u8]> = recent.iter().map(|m| m.content.as_ref()).collect();
        assert_eq!(kept, [&b"chat"[..], b"gift"], "likes are not history");
        let refused = f.send_input(VIEWER, 30, &send(7, b"odd")).await;
        assert_eq!(code(refused), ErrorCode::InvalidArgument);
        f.assert_nothing_published().await;
    }
}
