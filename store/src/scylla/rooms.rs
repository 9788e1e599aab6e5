//! [`RoomStore`] on Scylla: tables `rooms` (one row per room) and `room_recent` (partition: the room,
//! newest message first, a day's TTL, trimmed to the kept head every [`TRIM_EVERY`] pushes); moderation
//! in `room_bans` (partition: the room, one row per banned user) and `room_pins` (one row per room).

use async_trait::async_trait;
use bytes::Bytes;
use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;
use scylla::DeserializeRow;
use zhibo_proto::client::Message;

use super::{cql_limit, from_cql, to_cql, ScyllaBackend};
use crate::{Result, Room, RoomBan, RoomPin, RoomShaping, RoomStore};

/// A room's history is trimmed to its `keep` newest rows about once per this many pushes, so a busy
/// room's partition stays small instead of growing for the whole day its rows live.
const TRIM_EVERY: u64 = 32;

/// The room statements, prepared once.
pub(super) struct Statements {
    put_room: PreparedStatement,
    get_room: PreparedStatement,
    push_recent: PreparedStatement,
    recent: PreparedStatement,
    recent_ids: PreparedStatement,
    trim_recent: PreparedStatement,
    put_shaping: PreparedStatement,
    get_shaping: PreparedStatement,
    ban: PreparedStatement,
    unban: PreparedStatement,
    get_ban: PreparedStatement,
    bans: PreparedStatement,
    set_pin: PreparedStatement,
    clear_pin: PreparedStatement,
    pin: PreparedStatement,
}

impl Statements {
    pub(super) async fn prepare(session: &Session) -> Result<Self> {
        let p = |cql: String| super::prepare(session, cql);
        Ok(Statements {
            put_room: p("INSERT INTO rooms (room_id, owner_user_id, admin_user_ids, closed, muted, join_notices, \
                 updated_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?)"
                .into())
            .await?,
            get_room: p("SELECT room_id, owner_user_id, admin_user_ids, closed, muted, join_notices, updated_at_ms \
                 FROM rooms WHERE room_id = ?"
                .into())
            .await?,
            // The table's default TTL (a day) applies; see sql/0001_init.cql.
            push_recent: p("INSERT INTO room_recent (room_id, message_id, sender_user_id, sender_device_id, \
                 client_msg_id, server_time_ms, content_type, content) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                .into())
            .await?,
            // Clustering order is message_id DESC: the latest N are the partition head.
            recent: p("SELECT message_id, sender_user_id, sender_device_id, client_msg_id, server_time_ms, \
                 content_type, content FROM room_recent WHERE room_id = ? LIMIT ?"
                .into())
            .await?,
            recent_ids: p("SELECT message_id FROM room_recent WHERE room_id = ? LIMIT ?".into()).await?,
            // One range tombstone drops everything older than the kept head.
            trim_recent: p("DELETE FROM room_recent WHERE room_id = ? AND message_id < ?".into()).await?,
            put_shaping: p("INSERT INTO room_shaping (room_id, chat_per_sec, updated_at_ms) VALUES (?, ?, ?)".into())
                .await?,
            get_shaping: p("SELECT room_id, chat_per_sec, updated_at_ms FROM room_shaping WHERE room_id = ?".into())
                .await?,
            ban: p("INSERT INTO room_bans (room_id, user_id, banned_by, banned_at_ms) VALUES (?, ?, ?, ?)".into())
                .await?,
            unban: p("DELETE FROM room_bans WHERE room_id = ? AND user_id = ?".into()).await?,
            get_ban: p("SELECT room_id, user_id, banned_by, banned_at_ms FROM room_bans \
                 WHERE room_id = ? AND user_id = ?"
                .into())
            .await?,
            bans: p("SELECT room_id, user_id, banned_by, banned_at_ms FROM room_bans \
                 WHERE room_id = ? AND user_id > ? LIMIT ?"
                .into())
            .await?,
            set_pin: p("INSERT INTO room_pins (room_id, content, pinned_by, pinned_at_ms) VALUES (?, ?, ?, ?)"
                .into())
            .await?,
            clear_pin: p("DELETE FROM room_pins WHERE room_id = ?".into()).await?,
            pin: p("SELECT room_id, content, pinned_by, pinned_at_ms FROM room_pins WHERE room_id = ?".into())
                .await?,
        })
    }
}

#[derive(DeserializeRow)]
struct RoomRow {
    room_id: i64,
    owner_user_id: Option<i64>,
    #[scylla(default_when_null)]
    admin_user_ids: Vec<i64>,
    closed: Option<bool>,
    muted: Option<bool>,
    join_notices: Option<bool>,
    updated_at_ms: Option<i64>,
}

impl From<RoomRow> for Room {
    fn from(r: RoomRow) -> Self {
        Room {
            room_id: r.room_id,
            owner_user_id: r.owner_user_id.unwrap_or(0),
            admin_user_ids: r.admin_user_ids,
            closed: r.closed.unwrap_or(false),
            muted: r.muted.unwrap_or(false),
            join_notices: r.join_notices.unwrap_or(false),
            updated_at_ms: r.updated_at_ms.unwrap_or(0),
        }
    }
}

#[derive(DeserializeRow)]
struct ShapingRow {
    room_id: i64,
    chat_per_sec: Option<i32>,
    updated_at_ms: Option<i64>,
}

impl From<ShapingRow> for RoomShaping {
    fn from(r: ShapingRow) -> Self {
        RoomShaping {
            room_id: r.room_id,
            chat_per_sec: r.chat_per_sec.map_or(0, |n| u32::try_from(n).unwrap_or(0)),
            updated_at_ms: r.updated_at_ms.unwrap_or(0),
        }
    }
}

#[derive(DeserializeRow)]
struct BanRow {
    room_id: i64,
    user_id: i64,
    banned_by: Option<i64>,
    banned_at_ms: Option<i64>,
}

impl From<BanRow> for RoomBan {
    fn from(r: BanRow) -> Self {
        RoomBan {
            room_id: r.room_id,
            user_id: r.user_id,
            banned_by: r.banned_by.unwrap_or(0),
            banned_at_ms: r.banned_at_ms.unwrap_or(0),
        }
    }
}

#[derive(DeserializeRow)]
struct PinRow {
    room_id: i64,
    content: Option<Vec<u8>>,
    pinned_by: Option<i64>,
    pinned_at_ms: Option<i64>,
}

#[derive(DeserializeRow)]
struct RecentRow {
    message_id: i64,
    sender_user_id: i64,
    sender_device_id: i64,
    client_msg_id: String,
    server_time_ms: i64,
    content_type: i32,
    content: Option<Bytes>,
}

#[async_trait]
impl RoomStore for ScyllaBackend {
    async fn put_room(&self, room: &Room) -> Result<()> {
        let values = (
            room.room_id,
            room.owner_user_id,
            &room.admin_user_ids,
            room.closed,
            room.muted,
            room.join_notices,
            room.updated_at_ms,
        );
        self.exec("put_room", &self.rooms.put_room, values).await?;
        Ok(())
    }

    async fn get_room(&self, room_id: i64) -> Result<Option<Room>> {
        let row: Option<RoomRow> = self
            .one("get_room", &self.rooms.get_room, (room_id,))
            .await?;
        Ok(row.map(Room::from))
    }

    async fn push_recent(&self, room_id: i64, m: &Message, keep: usize) -> Result<()> {
        let values = (
            room_id,
            to_cql(m.message_id),
            m.sender_user_id,
            m.sender_device_id,
            &m.client_msg_id,
            m.server_time_ms,
            m.content_type,
            m.content.as_ref(),
        );
        self.exec("push_recent", &self.rooms.push_recent, values)
            .await?;
        let n = self
            .recent_pushes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n % TRIM_EVERY == TRIM_EVERY - 1 && keep > 0 {
            let ids: Vec<(i64,)> = self
                .all(
                    "recent_ids",
                    &self.rooms.recent_ids,
                    (room_id, cql_limit(keep)),
                )
                .await?;
            if let (true, Some((oldest_kept,))) = (ids.len() == keep, ids.last()) {
                self.exec(
                    "trim_recent",
                    &self.rooms.trim_recent,
                    (room_id, *oldest_kept),
                )
                .await?;
            }
        }
        Ok(())
    }

    async fn recent(&self, room_id: i64, limit: usize) -> Result<Vec<Message>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let rows: Vec<RecentRow> = self
            .all("recent", &self.rooms.recent, (room_id, cql_limit(limit)))
            .await?;
        // Newest first from the table; oldest first for the client.
        Ok(rows
            .into_iter()
            .rev()
            .map(|r| Message {
                message_id: from_cql(r.message_id),
                seq: 0,
                sender_user_id: r.sender_user_id,
                sender_device_id: r.sender_device_id,
                receiver_type: zhibo_proto::client::ReceiverType::Room as i32,
                receiver_id: room_id,
                client_msg_id: r.client_msg_id,
                server_time_ms: r.server_time_ms,
                content_type: r.content_type,
                content: r.content.unwrap_or_default(),
                conv_seq: 0,
            })
            .collect())
    }

    async fn put_room_shaping(&self, shaping: &RoomShaping) -> Result<()> {
        let chat_per_sec = i32::try_from(shaping.chat_per_sec).unwrap_or(i32::MAX);
        let values = (shaping.room_id, chat_per_sec, shaping.updated_at_ms);
        self.exec("put_room_shaping", &self.rooms.put_shaping, values)
            .await?;
        Ok(())
    }

    async fn ban(&self, ban: &RoomBan) -> Result<()> {
        let values = (ban.room_id, ban.user_id, ban.banned_by, ban.banned_at_ms);
        self.exec("ban", &self.rooms.ban, values).await?;
        Ok(())
    }

    async fn unban(&self, room_id: i64, user_id: i64) -> Result<()> {
        self.exec("unban", &self.rooms.unban, (room_id, user_id))
            .await?;
        Ok(())
    }

    async fn get_room_shaping(&self, room_id: i64) -> Result<Option<RoomShaping>> {
        let row: Option<ShapingRow> = self
            .one("get_room_shaping", &self.rooms.get_shaping, (room_id,))
            .await?;
        Ok(row.map(RoomShaping::from))
    }

    async fn get_ban(&self, room_id: i64, user_id: i64) -> Result<Option<RoomBan>> {
        let row: Option<BanRow> = self
            .one("get_ban", &self.rooms.get_ban, (room_id, user_id))
            .await?;
        Ok(row.map(RoomBan::from))
    }

    async fn bans(&self, room_id: i64, after_user_id: i64, limit: usize) -> Result<Vec<RoomBan>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let rows: Vec<BanRow> = self
            .all(
                "bans",
                &self.rooms.bans,
                (room_id, after_user_id, cql_limit(limit)),
            )
            .await?;
        Ok(rows.into_iter().map(RoomBan::from).collect())
    }

    async fn set_pin(&self, pin: &RoomPin) -> Result<()> {
        let values = (
            pin.room_id,
            pin.content.as_slice(),
            pin.pinned_by,
            pin.pinned_at_ms,
        );
        self.exec("set_pin", &self.rooms.set_pin, values).await?;
        Ok(())
    }

    async fn clear_pin(&self, room_id: i64) -> Result<()> {
        self.exec("clear_pin", &self.rooms.clear_pin, (room_id,))
            .await?;
        Ok(())
    }

    async fn pin(&self, room_id: i64) -> Result<Option<RoomPin>> {
        let row: Option<PinRow> = self.one("pin", &self.rooms.pin, (room_id,)).await?;
        Ok(row.map(|r| RoomPin {
            room_id: r.room_id,
            content: r.content.unwrap_or_default(),
            pinned_by: r.pinned_by.unwrap_or(0),
            pinned_at_ms: r.pinned_at_ms.unwrap_or(0),
        }))
    }
}
