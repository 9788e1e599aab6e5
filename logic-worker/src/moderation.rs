//! Live-room moderation: bans (stored, then the banned user's connections are removed from the room on
//! every gateway), the pinned announcement (stored, then announced to the room) and the viewer list
//! (a fan-in over the gateways that have viewers of the room).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use tracing::warn;
use zhibo_bus::Subject;
use zhibo_proto::bus::{
    room_event, user_event, RoomBanned, RoomEvent, RoomShapingChanged, RoomViewersQuery,
    RoomViewersReply, UserEvent,
};
use zhibo_proto::client::{ErrorCode, Message, ReceiverType, RoomClass, RoomNotice};
use zhibo_store::ids::now_ms;
use zhibo_store::{RoomBan, RoomPin, RoomShaping};

use crate::{Logic, LogicError, Op};

/// How long a viewer list waits for the gateways' answers at most. A room with viewers is answered as
/// soon as every gateway known to have viewers has replied (one bus round trip); a room without viewers
/// anywhere gets no reply and costs the whole wait, and so does a room one of whose gateways subscribed
/// less than a presence interval ago (it may not have heard of every other gateway yet).
pub const VIEWERS_WAIT: Duration = Duration::from_millis(500);

/// The most viewers a list returns.
pub const MAX_VIEWERS: u32 = 500;

/// One viewer in a [`ViewerList`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedViewer {
    /// The user (listed once, with its earliest join among its connections).
    pub user_id: i64,
    /// When it joined, ms since the Unix epoch.
    pub joined_at_ms: i64,
    /// The room's owner or an admin.
    pub manager: bool,
}

/// A room's top viewers across the cluster: managers first, then by join time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ViewerList {
    /// At most the requested number.
    pub viewers: Vec<ListedViewer>,
    /// Connections in the room over the gateways that answered.
    pub connections: u64,
    /// Gateways that answered.
    pub gateways: usize,
    /// False when a gateway known to have viewers did not answer within [`VIEWERS_WAIT`].
    pub complete: bool,
}

fn unavailable(what: &str, e: &zhibo_bus::Error) -> LogicError {
    warn!(error = %e, "{what} not published");
    LogicError::new(ErrorCode::Unavailable, "try again later")
}

impl Logic {
    /// Bans `user_id` from `room_id` (stored first, so a join or send that reads the store afterwards
    /// is refused), then removes the user's connections from the room on every gateway: the event is
    /// routed to each gateway presence names for the user (every gateway when presence is unknown).
    ///
    /// # Errors
    /// `UNAVAILABLE` when the store or the bus fails (the ban may be stored; repeating is safe).
    pub async fn ban_from_room(
        &self,
        room_id: i64,
        user_id: i64,
        banned_by: i64,
    ) -> Result<RoomBan, LogicError> {
        let ban = RoomBan {
            room_id,
            user_id,
            banned_by,
            banned_at_ms: now_ms(),
        };
        self.stores
            .rooms
            .ban(&ban)
            .await
            .map_err(|e| LogicError::store(Op::RoomSend, &e))?;
        let event = UserEvent {
            user_id,
            event: Some(user_event::Event::RoomBanned(RoomBanned {
                room_id,
                user_id,
            })),
        };
        self.route_user_event(user_id, event, Vec::new())
            .await
            .map_err(|e| unavailable("room ban kick", &e))?;
        Ok(ban)
    }

    /// Lifts a ban: the user may join and send again.
    ///
    /// # Errors
    /// `UNAVAILABLE` when the store fails.
    pub async fn unban_from_room(&self, room_id: i64, user_id: i64) -> Result<(), LogicError> {
        self.stores
            .rooms
            .unban(room_id, user_id)
            .await
            .map_err(|e| LogicError::store(Op::RoomSend, &e))
    }

    /// Sets (`Some`) or clears (`None`) the room's pinned announcement, then tells the room's viewers
    /// (a [`RoomNotice::Pinned`] / [`RoomNotice::Unpinned`] notice, as room traffic). Returns the pin as
    /// viewers see it.
    ///
    /// # Errors
    /// `UNAVAILABLE` when the store or the bus fails (the change may be stored; repeating is safe).
    pub async fn set_room_pin(
        &self,
        room_id: i64,
        content: Option<Bytes>,
        pinned_by: i64,
    ) -> Result<Option<Message>, LogicError> {
        let store = |e: zhibo_store::Error| LogicError::store(Op::RoomSend, &e);
        let (notice, pin) = match content {
            Some(content) => {
                let pin = RoomPin {
                    room_id,
                    content: content.to_vec(),
                    pinned_by,
                    pinned_at_ms: now_ms(),
                };
                self.stores.rooms.set_pin(&pin).await.map_err(store)?;
                let m = pin.to_message();
                (m.clone(), Some(m))
            }
            None => {
                // Nothing to remove: no notice (a retried or double-clicked DELETE would otherwise
                // tell the whole room about nothing, each time).
                if self
                    .stores
                    .rooms
                    .pin(room_id)
                    .await
                    .map_err(store)?
                    .is_none()
                {
                    return Ok(None);
                }
                self.stores.rooms.clear_pin(room_id).await.map_err(store)?;
                let m = Message {
                    sender_user_id: pinned_by,
                    receiver_type: ReceiverType::Room as i32,
                    receiver_id: room_id,
                    server_time_ms: now_ms(),
                    content_type: RoomNotice::Unpinned as i32,
                    ..Message::default()
                };
                (m, None)
            }
        };
        // A notice is high priority: never sampled away, never shed before chat.
        self.publish_room(&Subject::room(room_id), notice, RoomClass::High)
            .await?;
        Ok(pin)
    }

    /// Stores the room's shaping setting, then tells the gateways with viewers of the room, which apply
    /// it to those viewers at once (a gateway whose room starts later reads it at the join).
    ///
    /// # Errors
    /// `UNAVAILABLE` when the store or the bus fails (the change may be stored; repeating is safe).
    pub async fn set_room_shaping(&self, shaping: &RoomShaping) -> Result<(), LogicError> {
        self.stores
            .rooms
            .put_room_shaping(shaping)
            .await
            .map_err(|e| LogicError::store(Op::RoomSend, &e))?;
        let event = RoomEvent {
            event: Some(room_event::Event::Shaping(RoomShapingChanged {
                chat_per_sec: shaping.chat_per_sec,
                updated_at_ms: shaping.updated_at_ms,
            })),
            ..RoomEvent::default()
        };
        self.bus
            .publish(
                &Subject::room(shaping.room_id),
                Vec::new(),
                Bytes::from(event.encode_to_vec()),
            )
            .await
            .map_err(|e| unavailable("room shaping change", &e))?;
        // At the NATS server before the caller is answered: room traffic published after the answer
        // is routed after the change.
        self.bus
            .flush()
            .await
            .map_err(|e| unavailable("room shaping change", &e))
    }

    /// The room's top `limit` viewers across the cluster (managers = `manager_user_ids` first, then by
    /// join time). Each gateway with viewers of the room answers a query on the room subject with its own
    /// top `limit`; this merges them. Cost: one message to each gateway with viewers and one reply from
    /// each, and O(local viewers) work on each of those gateways.
    ///
    /// # Errors
    /// `UNAVAILABLE` when the bus fails.
    pub async fn room_viewers(
        &self,
        room_id: i64,
        limit: u32,
        manager_user_ids: Vec<i64>,
    ) -> Result<ViewerList, LogicError> {
        let limit = limit.min(MAX_VIEWERS);
        let query_id = format!(
            "{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        );
        let reply = Subject::room_viewers_reply(&query_id);
        let mut sub = self
            .bus
            .subscribe(&reply)
            .await
            .map_err(|e| unavailable("viewers reply subscription", &e))?;
        // The reply subscription must be live at the server before any gateway can answer.
        self.bus
            .flush()
            .await
            .map_err(|e| unavailable("viewers reply subscription", &e))?;
        let managers: HashSet<i64> = manager_user_ids.iter().copied().collect();
        let event = RoomEvent {
            event: Some(room_event::Event::ViewersQuery(RoomViewersQuery {
                query_id,
                limit,
                manager_user_ids,
            })),
            ..RoomEvent::default()
        };
        self.bus
            .publish(
                &Subject::room(room_id),
                Vec::new(),
                Bytes::from(event.encode_to_vec()),
            )
            .await
            .map_err(|e| unavailable("viewers query", &e))?;

        let mut expected: HashSet<String> = HashSet::new();
        let mut answered: HashSet<String> = HashSet::new();
        // A gateway that subscribed to the room moments ago may not know every other one yet: then
        // only the deadline ends the wait.
        let mut unsure = false;
        let mut connections = 0;
        let mut earliest: HashMap<i64, i64> = HashMap::new();
        let deadline = tokio::time::Instant::now() + VIEWERS_WAIT;
        while unsure || answered.is_empty() || !expected.is_subset(&answered) {
            let Ok(Some(m)) = tokio::time::timeout_at(deadline, sub.next()).await else {
                break;
            };
            let Ok(r) = RoomViewersReply::decode(m.payload) else {
                warn!(room_id, "undecodable viewers reply");
                continue;
            };
            if !answered.insert(r.gateway_id.clone()) {
                continue;
            }
            unsure |= !r.peers_known;
            expected.extend(r.gateway_ids);
            connections += r.local_viewers;
            for v in r.viewers {
                let t = earliest.entry(v.user_id).or_insert(v.joined_at_ms);
                *t = (*t).min(v.joined_at_ms);
            }
        }
        let complete = expected.is_subset(&answered);
        let mut viewers: Vec<ListedViewer> = earliest
            .into_iter()
            .map(|(user_id, joined_at_ms)| ListedViewer {
                user_id,
                joined_at_ms,
                manager: managers.contains(&user_id),
            })
            .collect();
        viewers.sort_by_key(|v| (!v.manager, v.joined_at_ms, v.user_id));
        viewers.truncate(limit as usize);
        Ok(ViewerList {
            viewers,
            connections,
            gateways: answered.len(),
            complete,
        })
    }

    /// The room's pinned announcement as viewers see it (also in SubscribeRoomOutput), if any.
    ///
    /// # Errors
    /// `UNAVAILABLE` when the store fails.
    pub async fn room_pin(&self, room_id: i64) -> Result<Option<Message>, LogicError> {
        let pin = self
            .stores
            .rooms
            .pin(room_id)
            .await
            .map_err(|e| LogicError::store(Op::RoomSend, &e))?;
        Ok(pin.as_ref().map(RoomPin::to_message))
    }
}
