//! Live rooms: the room record (owner, admins, closed/muted, join notices) and the recent history a late
//! joiner sees. Rooms need no creation: a room without a record is open, unmuted and has no owner.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use zhibo_proto::client::Message;

use crate::Result;

/// A live room's settings, written by user-api (owner, admins, app backend) and read by logic workers
/// (sends) and gateways (joins).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Room {
    /// The room.
    pub room_id: i64,
    /// May close, reopen, mute and unmute the room, and sends while it is muted (0 = none).
    pub owner_user_id: i64,
    /// Same rights as the owner, granted by the app backend.
    pub admin_user_ids: Vec<i64>,
    /// Joins and sends are refused.
    pub closed: bool,
    /// Sends are refused except from the owner, admins and server-side sends.
    pub muted: bool,
    /// Gateways announce each viewer's join and leave as a room message.
    pub join_notices: bool,
    /// Last change.
    pub updated_at_ms: i64,
}

impl Room {
    /// An open room with no owner: what a room without a record is.
    pub fn open(room_id: i64) -> Self {
        Room {
            room_id,
            ..Room::default()
        }
    }

    /// Whether `user_id` is the owner or an admin.
    pub fn is_manager(&self, user_id: i64) -> bool {
        user_id != 0 && (user_id == self.owner_user_id || self.admin_user_ids.contains(&user_id))
    }
}

/// A user banned from a live room: joins and sends are refused until the ban is lifted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomBan {
    /// The room.
    pub room_id: i64,
    /// The banned user.
    pub user_id: i64,
    /// Who banned them (0 = the app backend).
    pub banned_by: i64,
    /// When.
    pub banned_at_ms: i64,
}

/// A live room's pinned announcement (at most one per room), shown to each viewer on join.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomPin {
    /// The room.
    pub room_id: i64,
    /// The announcement bytes, application-defined.
    pub content: Vec<u8>,
    /// Who pinned it (0 = the app backend).
    pub pinned_by: i64,
    /// When.
    pub pinned_at_ms: i64,
}

impl RoomPin {
    /// The pin as viewers see it (live and in SubscribeRoomOutput): a `ROOM_NOTICE_PINNED` notice
    /// (message id 0) from the user who pinned it.
    pub fn to_message(&self) -> Message {
        Message {
            sender_user_id: self.pinned_by,
            receiver_type: zhibo_proto::client::ReceiverType::Room as i32,
            receiver_id: self.room_id,
            server_time_ms: self.pinned_at_ms,
            content_type: zhibo_proto::client::RoomNotice::Pinned as i32,
            content: self.content.clone().into(),
            ..Message::default()
        }
    }
}

/// Room records and each room's recent messages.
#[async_trait]
pub trait RoomStore: Send + Sync {
    /// Creates or replaces a room's record.
    ///
    /// # Errors
    /// [`crate::ErrorKind::Unavailable`] on backend failure.
    async fn put_room(&self, room: &Room) -> Result<()>;
    /// The room's record, if one was ever written.
    ///
    /// # Errors
    /// [`crate::ErrorKind::Unavailable`] on backend failure.
    async fn get_room(&self, room_id: i64) -> Result<Option<Room>>;
    /// Remembers a room message (seq 0) for late joiners; at least the latest `keep` stay readable.
    /// Best effort: entries expire (a day in Scylla), and those beyond `keep` are trimmed, so a busy
    /// room's history stays within a few dozen entries of `keep` (Scylla trims every 32 pushes of the
    /// process, the embedded ring at once).
    ///
    /// # Errors
    /// [`crate::ErrorKind::Unavailable`] on backend failure.
    async fn push_recent(&self, room_id: i64, message: &Message, keep: usize) -> Result<()>;
    /// The room's latest `limit` messages, oldest first.
    ///
    /// # Errors
    /// [`crate::ErrorKind::Unavailable`] on backend failure.
    async fn recent(&self, room_id: i64, limit: usize) -> Result<Vec<Message>>;
    /// Creates or replaces a room's shaping settings.
    ///
    /// # Errors
    /// [`crate::ErrorKind::Unavailable`] on backend failure.
    async fn put_room_shaping(&self, shaping: &RoomShaping) -> Result<()>;
    /// The room's shaping settings, if any were ever written.
    ///
    /// # Errors
    /// [`crate::ErrorKind::Unavailable`] on backend failure.
    async fn get_room_shaping(&self, room_id: i64) -> Result<Option<RoomShaping>>;

    /// Bans `ban.user_id` from `ban.room_id`, replacing an earlier ban of the same user there.
    ///
    /// # Errors
    /// [`crate::ErrorKind::Unavailable`] on backend failure.
    async fn ban(&self, ban: &RoomBan) -> Result<()>;
    /// Lifts a ban; lifting one that does not exist is not an error.
    ///
    /// # Errors
    /// [`crate::ErrorKind::Unavailable`] on backend failure.
    async fn unban(&self, room_id: i64, user_id: i64) -> Result<()>;
    /// The user's ban in the room, if banned.
    ///
    /// # Errors
    /// [`crate::ErrorKind::Unavailable`] on backend failure.
    async fn get_ban(&self, room_id: i64, user_id: i64) -> Result<Option<RoomBan>>;
    /// The room's bans with `user_id > after_user_id`, ascending by user id, at most `limit`.
    ///
    /// # Errors
    /// [`crate::ErrorKind::Unavailable`] on backend failure.
    async fn bans(&self, room_id: i64, after_user_id: i64, limit: usize) -> Result<Vec<RoomBan>>;
    /// Sets the room's pinned announcement, replacing any earlier one.
    ///
    /// # Errors
    /// [`crate::ErrorKind::Unavailable`] on backend failure.
    async fn set_pin(&self, pin: &RoomPin) -> Result<()>;
    /// Removes the room's pinned announcement (none is not an error).
    ///
    /// # Errors
    /// [`crate::ErrorKind::Unavailable`] on backend failure.
    async fn clear_pin(&self, room_id: i64) -> Result<()>;
    /// The room's pinned announcement, if any.
    ///
    /// # Errors
    /// [`crate::ErrorKind::Unavailable`] on backend failure.
    async fn pin(&self, room_id: i64) -> Result<Option<RoomPin>>;
}

/// How gateways shape a busy room's traffic for each viewer (issue 17), written by user-api and read by
/// gateways at each join. A room without settings shows all chat.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomShaping {
    /// The room.
    pub room_id: i64,
    /// Chat messages per second a viewer is shown at most (0 = all); above it a fair sample.
    pub chat_per_sec: u32,
    /// Last change.
    pub updated_at_ms: i64,
}
