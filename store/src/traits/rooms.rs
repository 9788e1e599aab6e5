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
