//! [`RoomStore`] for the embedded backend: room records in the redb file (table `rooms`: room id →
//! [`Room`] as JSON), bans (table `room_bans`: (room id, user id) → [`RoomBan`] as JSON) and pins (table
//! `room_pins`: room id → [`RoomPin`] as JSON) and shaping (table `room_shaping`: room id → [`RoomShaping`]
//! as JSON) in the redb file too, recent history in memory.
//!
//! Embedded mode is one process, so the one in-memory ring per room is shared by the logic worker that
//! writes it and the gateway that reads it; it is lost on restart, which is acceptable for chat that
//! expires within a day anyway. Room records change rarely (owner and admin actions), so they are written
//! in their own durable transaction rather than through the backend's group-commit writer.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use redb::{Database, TableDefinition, TableError};
use zhibo_proto::client::Message;

use crate::ids::now_ms;
use crate::{Error, ErrorKind, Result, Room, RoomBan, RoomPin, RoomShaping, RoomStore};

const ROOMS: TableDefinition<i64, &[u8]> = TableDefinition::new("rooms");
const BANS: TableDefinition<(i64, i64), &[u8]> = TableDefinition::new("room_bans");
const PINS: TableDefinition<i64, &[u8]> = TableDefinition::new("room_pins");
/// Room id → [`RoomShaping`] as JSON (Scylla: `sql/0005_room_shaping.cql`).
const ROOM_SHAPING: TableDefinition<i64, &[u8]> = TableDefinition::new("room_shaping");

/// A room's history is forgotten this long after its last message (like Scylla's TTL).
const RECENT_RETENTION_MS: i64 = 24 * 3600 * 1000;
/// Pushes between two sweeps of idle rooms.
const SWEEP_EVERY: u64 = 1024;

/// The embedded [`RoomStore`]; built by `EmbeddedBackend::stores`.
pub struct EmbeddedRooms {
    db: Arc<Database>,
    /// room id → (time of the last push, latest messages oldest first).
    recent: Mutex<HashMap<i64, (i64, VecDeque<Message>)>>,
    pushes: AtomicU64,
}

impl std::fmt::Debug for EmbeddedRooms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedRooms").finish_non_exhaustive()
    }
}

impl EmbeddedRooms {
    /// Room records in `db`, history in memory.
    pub fn new(db: Arc<Database>) -> Self {
        EmbeddedRooms {
            db,
            recent: Mutex::new(HashMap::new()),
            pushes: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, (i64, VecDeque<Message>)>> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::backend(e)
}

fn encode(what: &str, v: &impl serde::Serialize) -> Result<Vec<u8>> {
    serde_json::to_vec(v)
        .map_err(|e| Error::wrap(ErrorKind::Corrupt, format!("encoding {what}"), e))
}

fn decode<T: serde::de::DeserializeOwned>(what: String, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::wrap(ErrorKind::Corrupt, what, e))
}

impl EmbeddedRooms {
    /// Runs `f` on a write transaction and commits it (room moderation changes rarely: one durable
    /// transaction each, like room records).
    async fn write<F>(&self, f: F) -> Result<()>
    where
        F: FnOnce(&redb::WriteTransaction) -> Result<()> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let tx = db.begin_write().map_err(unavailable)?;
            f(&tx)?;
            tx.commit().map_err(unavailable)
        })
        .await
        .map_err(unavailable)?
    }

    /// Runs `f` on a read transaction; `None` from `f` means the table was never created.
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&redb::ReadTransaction) -> Result<T> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let tx = db.begin_read().map_err(unavailable)?;
            f(&tx)
        })
        .await
        .map_err(unavailable)?
    }
}

#[async_trait]
impl RoomStore for EmbeddedRooms {
    async fn put_room(&self, room: &Room) -> Result<()> {
        let db = self.db.clone();
        let json = serde_json::to_vec(room)
            .map_err(|e| Error::wrap(ErrorKind::Corrupt, "encoding room", e))?;
        let room_id = room.room_id;
        tokio::task::spawn_blocking(move || {
            let tx = db.begin_write().map_err(unavailable)?;
            {
                let mut t = tx.open_table(ROOMS).map_err(unavailable)?;
                t.insert(room_id, json.as_slice()).map_err(unavailable)?;
            }
            tx.commit().map_err(unavailable)
        })
        .await
        .map_err(unavailable)?
    }

    async fn get_room(&self, room_id: i64) -> Result<Option<Room>> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let tx = db.begin_read().map_err(unavailable)?;
            let table = match tx.open_table(ROOMS) {
                Ok(t) => t,
                // No room was ever written.
                Err(TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(unavailable(e)),
            };
            match table.get(room_id).map_err(unavailable)? {
                None => Ok(None),
                Some(v) => serde_json::from_slice(v.value())
                    .map(Some)
                    .map_err(|e| Error::wrap(ErrorKind::Corrupt, format!("room {room_id}"), e)),
            }
        })
        .await
        .map_err(unavailable)?
    }

    async fn push_recent(&self, room_id: i64, message: &Message, keep: usize) -> Result<()> {
        let now = now_ms();
        let mut recent = self.lock();
        let (last, ring) = recent.entry(room_id).or_default();
        *last = now;
        ring.push_back(message.clone());
        while ring.len() > keep {
            ring.pop_front();
        }
        if self.pushes.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            recent.retain(|_, (last, _)| now - *last < RECENT_RETENTION_MS);
        }
        Ok(())
    }

    async fn recent(&self, room_id: i64, limit: usize) -> Result<Vec<Message>> {
        let recent = self.lock();
        Ok(match recent.get(&room_id) {
            Some((last, ring)) if now_ms() - *last < RECENT_RETENTION_MS => ring
                .iter()
                .skip(ring.len().saturating_sub(limit))
                .cloned()
                .collect(),
            _ => Vec::new(),
        })
    }

    async fn ban(&self, ban: &RoomBan) -> Result<()> {
        let json = encode("room ban", ban)?;
        let key = (ban.room_id, ban.user_id);
        self.write(move |tx| {
            tx.open_table(BANS)
                .map_err(unavailable)?
                .insert(key, json.as_slice())
                .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn unban(&self, room_id: i64, user_id: i64) -> Result<()> {
        self.write(move |tx| {
            tx.open_table(BANS)
                .map_err(unavailable)?
                .remove((room_id, user_id))
                .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn get_ban(&self, room_id: i64, user_id: i64) -> Result<Option<RoomBan>> {
        self.read(move |tx| {
            let table = match tx.open_table(BANS) {
                Ok(t) => t,
                Err(TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(unavailable(e)),
            };
            match table.get((room_id, user_id)).map_err(unavailable)? {
                None => Ok(None),
                Some(v) => decode(format!("room ban {room_id}/{user_id}"), v.value()).map(Some),
            }
        })
        .await
    }

    async fn bans(&self, room_id: i64, after_user_id: i64, limit: usize) -> Result<Vec<RoomBan>> {
        if limit == 0 || after_user_id == i64::MAX {
            return Ok(Vec::new());
        }
        self.read(move |tx| {
            let table = match tx.open_table(BANS) {
                Ok(t) => t,
                Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(unavailable(e)),
            };
            let mut out = Vec::new();
            for row in table
                .range((room_id, after_user_id + 1)..=(room_id, i64::MAX))
                .map_err(unavailable)?
                .take(limit)
            {
                let (_, v) = row.map_err(unavailable)?;
                out.push(decode(format!("room ban in {room_id}"), v.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn set_pin(&self, pin: &RoomPin) -> Result<()> {
        let json = encode("room pin", pin)?;
        let room_id = pin.room_id;
        self.write(move |tx| {
            tx.open_table(PINS)
                .map_err(unavailable)?
                .insert(room_id, json.as_slice())
                .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn clear_pin(&self, room_id: i64) -> Result<()> {
        self.write(move |tx| {
            tx.open_table(PINS)
                .map_err(unavailable)?
                .remove(room_id)
                .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn pin(&self, room_id: i64) -> Result<Option<RoomPin>> {
        self.read(move |tx| {
            let table = match tx.open_table(PINS) {
                Ok(t) => t,
                Err(TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(unavailable(e)),
            };
            match table.get(room_id).map_err(unavailable)? {
                None => Ok(None),
                Some(v) => decode(format!("room pin {room_id}"), v.value()).map(Some),
            }
        })
        .await
    }

    async fn put_room_shaping(&self, shaping: &RoomShaping) -> Result<()> {
        let json = encode("room shaping", shaping)?;
        let room_id = shaping.room_id;
        self.write(move |tx| {
            tx.open_table(ROOM_SHAPING)
                .map_err(unavailable)?
                .insert(room_id, json.as_slice())
                .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn get_room_shaping(&self, room_id: i64) -> Result<Option<RoomShaping>> {
        self.read(move |tx| {
            let table = match tx.open_table(ROOM_SHAPING) {
                Ok(t) => t,
                // No shaping was ever written.
                Err(TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(unavailable(e)),
            };
            match table.get(room_id).map_err(unavailable)? {
                None => Ok(None),
                Some(v) => decode(format!("room shaping {room_id}"), v.value()).map(Some),
            }
        })
        .await
    }
}
