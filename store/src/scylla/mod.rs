//! ScyllaDB / Cassandra backend: every store trait over one [`Session`], with each statement
//! prepared once at [`ScyllaBackend::new`], and the CQL migrations from `sql/` ([`migrate()`]).
//!
//! Consistency is the driver default, `LOCAL_QUORUM` (lightweight transactions: `LOCAL_SERIAL`),
//! so a write is durable on a quorum of replicas when its future resolves. Driver failures map to
//! [`ErrorKind::Unavailable`], rows that do not decode to [`ErrorKind::Corrupt`].
//!
//! Where uniqueness or monotonicity matters:
//! - usernames are claimed with `INSERT ... IF NOT EXISTS` on `users_by_username` (Paxos);
//! - `insert_user` also creates the `users` row with `IF NOT EXISTS`, so a taken user id conflicts;
//! - device acks are written `USING TIMESTAMP <seq>`, so the largest seq wins without a read;
//! - token revocation is `UPDATE ... IF tokens_valid_after_ms < ?`, so it never moves back;
//! - node-number leases are claimed, renewed and released with conditional batches on `node_leases`
//!   (see `scylla/leases.rs`).

mod invites;
mod leases;
mod migrate;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::response::query_result::QueryResult;
use scylla::serialize::row::SerializeRow;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlValue, Row};
use scylla::DeserializeRow;
use zhibo_proto::client::Message;

pub use migrate::{migrate, statements, Migration, MIGRATIONS};

use crate::{
    Device, DeviceStore, Error, ErrorKind, Friend, FriendRequest, FriendStore, Group, GroupMember,
    GroupStore, MessageStore, Profile, Result, Role, Room, RoomStore, SendPlan, SeqAllocator,
    Stores, User, UserStore,
};

/// How many writes (or single-partition batches) one call keeps in flight.
const WRITE_CONCURRENCY: usize = 128;

/// A single-partition unlogged batch is cut before it reaches this many content bytes, well under
/// Cassandra's default `batch_size_fail_threshold` (50 KiB).
const BATCH_MAX_BYTES: usize = 16 * 1024;

/// Statements per single-partition unlogged batch, at most.
const BATCH_MAX_STATEMENTS: usize = 32;

/// Opens a session to `nodes` (`host:port` each), without choosing a keyspace.
///
/// # Errors
/// [`ErrorKind::Unavailable`] when no node can be reached.
pub async fn session(nodes: &[String]) -> Result<Session> {
    SessionBuilder::new()
        .known_nodes(nodes)
        .connection_timeout(Duration::from_secs(5))
        .build()
        .await
        .map_err(|e| db_error("connect", e))
}

/// Connects to `nodes`, creates and migrates `keyspace` (see [`migrate()`]) and prepares every
/// statement: the one call a process makes at start.
///
/// # Errors
/// [`ErrorKind::Unavailable`] when the cluster cannot be reached, a migration or a prepare fails.
pub async fn connect(
    nodes: &[String],
    keyspace: &str,
    replication_factor: u32,
) -> Result<ScyllaBackend> {
    let session = session(nodes).await?;
    migrate(&session, keyspace, replication_factor).await?;
    ScyllaBackend::new(Arc::new(session), keyspace).await
}

pub(crate) fn db_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Unavailable, format!("{what}: {e}"))
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Corrupt, format!("{what}: {e}"))
}

/// Every statement the backend runs, prepared once.
struct Statements {
    insert_device: PreparedStatement,
    get_device: PreparedStatement,
    revoke_tokens: PreparedStatement,
    bind_device: PreparedStatement,

    claim_username: PreparedStatement,
    release_username: PreparedStatement,
    get_username: PreparedStatement,
    insert_user_new: PreparedStatement,
    upsert_user: PreparedStatement,
    get_user: PreparedStatement,
    update_profile: PreparedStatement,

    put_request: PreparedStatement,
    get_request: PreparedStatement,
    list_requests_to: PreparedStatement,
    delete_request: PreparedStatement,
    put_friend: PreparedStatement,
    get_friend: PreparedStatement,
    list_friends: PreparedStatement,
    delete_friend: PreparedStatement,

    put_group: PreparedStatement,
    get_group: PreparedStatement,
    delete_group: PreparedStatement,
    put_member: PreparedStatement,
    put_user_group: PreparedStatement,
    get_member: PreparedStatement,
    delete_member: PreparedStatement,
    delete_user_group: PreparedStatement,
    delete_members: PreparedStatement,
    list_members: PreparedStatement,
    member_ids: PreparedStatement,
    groups_of_user: PreparedStatement,

    append: PreparedStatement,
    sync: PreparedStatement,
    max_seq: PreparedStatement,
    get_dedup: PreparedStatement,
    put_dedup: PreparedStatement,
    ack: PreparedStatement,
    acked: PreparedStatement,

    put_room: PreparedStatement,
    get_room: PreparedStatement,
    push_recent: PreparedStatement,
    recent: PreparedStatement,
    recent_ids: PreparedStatement,
    trim_recent: PreparedStatement,
}

const DEVICE_COLUMNS: &str = "device_id, device_type, brand, model, system_version, sdk_version, \
     tokens_valid_after_ms, created_at_ms, owner_user_id";
const USER_COLUMNS: &str =
    "user_id, username, password_hash, nickname, avatar_url, extra, created_at_ms, updated_at_ms";
const MESSAGE_COLUMNS: &str =
    "seq, message_id, sender_user_id, sender_device_id, receiver_type, receiver_id, \
     client_msg_id, server_time_ms, content_type, content";

impl Statements {
    async fn prepare(session: &Session) -> Result<Self> {
        let p = |cql: String| async move {
            session
                .prepare(cql.clone())
                .await
                .map_err(|e| db_error(&format!("prepare `{cql}`"), e))
        };
        Ok(Statements {
            insert_device: p(format!(
                "INSERT INTO devices ({DEVICE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ))
            .await?,
            get_device: p(format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE device_id = ?")).await?,
            revoke_tokens: p("UPDATE devices SET tokens_valid_after_ms = ? WHERE device_id = ? \
                 IF tokens_valid_after_ms < ?"
                .into())
            .await?,
            // Only called for a device read as existing (devices are never deleted): on a missing row
            // `IF owner_user_id = null` would hold and create one.
            bind_device: p("UPDATE devices SET owner_user_id = ? WHERE device_id = ? \
                 IF owner_user_id = null"
                .into())
            .await?,

            claim_username: p(
                "INSERT INTO users_by_username (username, user_id) VALUES (?, ?) IF NOT EXISTS".into(),
            )
            .await?,
            release_username: p("DELETE FROM users_by_username WHERE username = ? IF user_id = ?".into())
                .await?,
            get_username: p("SELECT user_id FROM users_by_username WHERE username = ?".into()).await?,
            insert_user_new: p(format!(
                "INSERT INTO users ({USER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS"
            ))
            .await?,
            upsert_user: p(format!("INSERT INTO users ({USER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"))
                .await?,
            get_user: p(format!("SELECT {USER_COLUMNS} FROM users WHERE user_id = ?")).await?,
            update_profile: p("UPDATE users SET nickname = ?, avatar_url = ?, extra = ?, updated_at_ms = ? \
                 WHERE user_id = ? IF EXISTS"
                .into())
            .await?,

            put_request: p("INSERT INTO friend_requests (to_user_id, from_user_id, message, created_at_ms) \
                 VALUES (?, ?, ?, ?)"
                .into())
            .await?,
            get_request: p("SELECT from_user_id, to_user_id, message, created_at_ms FROM friend_requests \
                 WHERE to_user_id = ? AND from_user_id = ?"
                .into())
            .await?,
            list_requests_to: p("SELECT from_user_id, to_user_id, message, created_at_ms FROM friend_requests \
                 WHERE to_user_id = ?"
                .into())
            .await?,
            delete_request: p(
                "DELETE FROM friend_requests WHERE to_user_id = ? AND from_user_id = ?".into(),
            )
            .await?,
            put_friend: p("INSERT INTO friends (user_id, friend_id, remark, extra, created_at_ms) \
                 VALUES (?, ?, ?, ?, ?)"
                .into())
            .await?,
            get_friend: p("SELECT user_id, friend_id, remark, extra, created_at_ms FROM friends \
                 WHERE user_id = ? AND friend_id = ?"
                .into())
            .await?,
            list_friends: p("SELECT user_id, friend_id, remark, extra, created_at_ms FROM friends \
                 WHERE user_id = ?"
                .into())
            .await?,
            delete_friend: p("DELETE FROM friends WHERE user_id = ? AND friend_id = ?".into()).await?,

            put_group: p("INSERT INTO groups (group_id, name, avatar_url, introduction, owner_id, extra, \
                 created_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?)"
                .into())
            .await?,
            get_group: p("SELECT group_id, name, avatar_url, introduction, owner_id, extra, created_at_ms \
                 FROM groups WHERE group_id = ?"
                .into())
            .await?,
            delete_group: p("DELETE FROM groups WHERE group_id = ?".into()).await?,
            put_member: p("INSERT INTO group_members (group_id, user_id, role, remark, joined_at_ms) \
                 VALUES (?, ?, ?, ?, ?)"
                .into())
            .await?,
            put_user_group: p("INSERT INTO user_groups (user_id, group_id) VALUES (?, ?)".into()).await?,
            get_member: p("SELECT group_id, user_id, role, remark, joined_at_ms FROM group_members \
                 WHERE group_id = ? AND user_id = ?"
                .into())
            .await?,
            delete_member: p("DELETE FROM group_members WHERE group_id = ? AND user_id = ?".into()).await?,
            delete_user_group: p("DELETE FROM user_groups WHERE user_id = ? AND group_id = ?".into())
                .await?,
            delete_members: p("DELETE FROM group_members WHERE group_id = ?".into()).await?,
            list_members: p("SELECT group_id, user_id, role, remark, joined_at_ms FROM group_members \
                 WHERE group_id = ? AND user_id > ? LIMIT ?"
                .into())
            .await?,
            member_ids: p("SELECT user_id FROM group_members WHERE group_id = ?".into()).await?,
            groups_of_user: p("SELECT group_id FROM user_groups WHERE user_id = ?".into()).await?,

            append: p("INSERT INTO inbox (user_id, seq, message_id, sender_user_id, sender_device_id, \
                 receiver_type, receiver_id, client_msg_id, server_time_ms, content_type, content) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                .into())
            .await?,
            sync: p(format!(
                "SELECT {MESSAGE_COLUMNS} FROM inbox WHERE user_id = ? AND seq > ? ORDER BY seq ASC LIMIT ?"
            ))
            .await?,
            max_seq: p("SELECT seq FROM inbox WHERE user_id = ? ORDER BY seq DESC LIMIT 1".into()).await?,
            get_dedup: p("SELECT message_id, seq, server_time_ms, recipients FROM dedup \
                 WHERE sender_device_id = ? AND client_msg_id = ?"
                .into())
            .await?,
            put_dedup: p("INSERT INTO dedup (sender_device_id, client_msg_id, message_id, seq, server_time_ms, \
                 recipients) VALUES (?, ?, ?, ?, ?, ?) IF NOT EXISTS"
                .into())
            .await?,
            // The write timestamp is the seq itself: the cell with the largest timestamp wins, so
            // acks commute and the stored value never moves back (see sql/0001_init.cql).
            ack: p("UPDATE device_acks USING TIMESTAMP ? SET acked_seq = ? \
                 WHERE user_id = ? AND device_id = ?"
                .into())
            .await?,
            acked: p("SELECT acked_seq FROM device_acks WHERE user_id = ? AND device_id = ?".into()).await?,

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
        })
    }
}

/// The ScyllaDB / Cassandra implementation of every store trait except [`SeqAllocator`]
/// (pair it with [`crate::redis_seq::RedisSeq`]).
pub struct ScyllaBackend {
    session: Arc<Session>,
    st: Statements,
    leases: leases::Statements,
    invites: invites::Statements,
    /// Room messages pushed by this process, to trim each room's history every [`TRIM_EVERY`] pushes.
    recent_pushes: std::sync::atomic::AtomicU64,
}

/// A room's history is trimmed to its `keep` newest rows about once per this many pushes, so a busy
/// room's partition stays small instead of growing for the whole day its rows live.
const TRIM_EVERY: u64 = 32;

impl std::fmt::Debug for ScyllaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScyllaBackend")
            .field("keyspace", &self.session.get_keyspace())
            .finish_non_exhaustive()
    }
}

/// The outcome of a lightweight transaction: whether it applied and, if not, the current values
/// the server sent back.
struct Lwt {
    applied: bool,
    columns: Vec<(String, Option<CqlValue>)>,
}

impl Lwt {
    fn bigint(&self, name: &str) -> Option<i64> {
        self.columns.iter().find_map(|(n, v)| match v {
            Some(CqlValue::BigInt(x)) if n == name => Some(*x),
            _ => None,
        })
    }
}

impl ScyllaBackend {
    /// Uses `keyspace` (already migrated, see [`migrate()`]) on `session` and prepares every statement.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] when the keyspace is missing or a statement does not prepare
    /// (e.g. the schema is older than this code).
    pub async fn new(session: Arc<Session>, keyspace: &str) -> Result<Self> {
        session
            .use_keyspace(keyspace, false)
            .await
            .map_err(|e| db_error("use keyspace", e))?;
        let st = Statements::prepare(&session).await?;
        let leases = leases::Statements::prepare(&session).await?;
        let invites = invites::Statements::prepare(&session).await?;
        Ok(ScyllaBackend {
            session,
            st,
            leases,
            invites,
            recent_pushes: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The underlying session (e.g. for tests and admin tools).
    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }

    /// Every store of [`Stores`] backed by this backend, with `seq` as the allocator.
    pub fn stores(self: Arc<Self>, seq: Arc<dyn SeqAllocator>) -> Stores {
        Stores {
            devices: self.clone(),
            users: self.clone(),
            friends: self.clone(),
            groups: self.clone(),
            group_invites: self.clone(),
            messages: self.clone(),
            leases: self.clone(),
            rooms: self,
            seq,
        }
    }

    async fn exec(
        &self,
        what: &str,
        st: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<QueryResult> {
        self.session
            .execute_unpaged(st, values)
            .await
            .map_err(|e| db_error(what, e))
    }

    /// The first row of a query, if any.
    async fn one<R>(
        &self,
        what: &str,
        st: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<Option<R>>
    where
        R: for<'f> scylla::deserialize::row::DeserializeRow<'f, 'f>,
    {
        let rows = self
            .exec(what, st, values)
            .await?
            .into_rows_result()
            .map_err(|e| db_error(what, e))?;
        rows.maybe_first_row::<R>().map_err(|e| corrupt(what, e))
    }

    /// Every row of a query, fetched page by page.
    async fn all<R>(
        &self,
        what: &str,
        st: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<Vec<R>>
    where
        R: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm> + 'static,
    {
        self.session
            .execute_iter(st.clone(), values)
            .await
            .map_err(|e| db_error(what, e))?
            .rows_stream::<R>()
            .map_err(|e| corrupt(what, e))?
            .map_err(|e| match e {
                scylla::client::pager::NextRowError::RowDeserializationError(e) => corrupt(what, e),
                e => db_error(what, e),
            })
            .try_collect()
            .await
    }

    /// Runs a lightweight transaction and reads its `[applied]` row.
    async fn lwt(
        &self,
        what: &str,
        st: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<Lwt> {
        let rows = self
            .exec(what, st, values)
            .await?
            .into_rows_result()
            .map_err(|e| db_error(what, e))?;
        let names: Vec<String> = rows
            .column_specs()
            .iter()
            .map(|c| c.name().to_owned())
            .collect();
        let row: Row = rows.first_row().map_err(|e| corrupt(what, e))?;
        let applied = match row.columns.first() {
            Some(Some(CqlValue::Boolean(applied))) => *applied,
            other => return Err(corrupt(what, format!("no [applied] column: {other:?}"))),
        };
        Ok(Lwt {
            applied,
            columns: names.into_iter().zip(row.columns).collect(),
        })
    }

    /// Writes the messages of one user's inbox: a single insert, or unlogged batches (one partition,
    /// so each batch is a single mutation on the replicas).
    async fn append_partition(&self, user_id: i64, messages: &[&Message]) -> Result<()> {
        if let [message] = messages {
            return self.append(user_id, message).await;
        }
        let mut start = 0;
        while start < messages.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < messages.len()
                && end - start < BATCH_MAX_STATEMENTS
                && (end == start || bytes + messages[end].content.len() <= BATCH_MAX_BYTES)
            {
                bytes += messages[end].content.len();
                end += 1;
            }
            let chunk = &messages[start..end];
            let mut batch = Batch::new(BatchType::Unlogged);
            for _ in chunk {
                batch.append_statement(self.st.append.clone());
            }
            let values: Vec<_> = chunk.iter().map(|m| inbox_values(user_id, m)).collect();
            self.session
                .batch(&batch, values)
                .await
                .map_err(|e| db_error("append batch", e))?;
            start = end;
        }
        Ok(())
    }
}

/// Seqs and ids are `u64` in the protocol and `bigint` in CQL: stored bit-for-bit.
fn to_cql(v: u64) -> i64 {
    v as i64
}

fn from_cql(v: i64) -> u64 {
    v as u64
}

fn cql_limit(limit: usize) -> i32 {
    i32::try_from(limit).unwrap_or(i32::MAX)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

type InboxValues<'a> = (
    i64,
    i64,
    i64,
    i64,
    i64,
    i32,
    i64,
    &'a str,
    i64,
    i32,
    &'a [u8],
);

fn inbox_values(user_id: i64, m: &Message) -> InboxValues<'_> {
    (
        user_id,
        to_cql(m.seq),
        to_cql(m.message_id),
        m.sender_user_id,
        m.sender_device_id,
        m.receiver_type,
        m.receiver_id,
        &m.client_msg_id,
        m.server_time_ms,
        m.content_type,
        &m.content,
    )
}

#[derive(DeserializeRow)]
struct DeviceRow {
    device_id: i64,
    device_type: String,
    brand: String,
    model: String,
    system_version: String,
    sdk_version: String,
    tokens_valid_after_ms: i64,
    created_at_ms: i64,
    /// Null until the first sign-in binds the device (`0004_security.cql`).
    owner_user_id: Option<i64>,
}

impl From<DeviceRow> for Device {
    fn from(r: DeviceRow) -> Self {
        Device {
            device_id: r.device_id,
            device_type: r.device_type,
            brand: r.brand,
            model: r.model,
            system_version: r.system_version,
            sdk_version: r.sdk_version,
            tokens_valid_after_ms: r.tokens_valid_after_ms,
            created_at_ms: r.created_at_ms,
            owner_user_id: r.owner_user_id.unwrap_or(0),
        }
    }
}

#[derive(DeserializeRow)]
struct UserRow {
    user_id: i64,
    username: String,
    password_hash: String,
    nickname: String,
    avatar_url: String,
    extra: String,
    created_at_ms: i64,
    updated_at_ms: i64,
}

impl From<UserRow> for User {
    fn from(r: UserRow) -> Self {
        User {
            user_id: r.user_id,
            username: r.username,
            password_hash: r.password_hash,
            profile: Profile {
                nickname: r.nickname,
                avatar_url: r.avatar_url,
                extra: r.extra,
            },
            created_at_ms: r.created_at_ms,
            updated_at_ms: r.updated_at_ms,
        }
    }
}

fn user_values(u: &User) -> (i64, &str, &str, &str, &str, &str, i64, i64) {
    (
        u.user_id,
        &u.username,
        &u.password_hash,
        &u.profile.nickname,
        &u.profile.avatar_url,
        &u.profile.extra,
        u.created_at_ms,
        u.updated_at_ms,
    )
}

#[derive(DeserializeRow)]
struct FriendRequestRow {
    from_user_id: i64,
    to_user_id: i64,
    message: String,
    created_at_ms: i64,
}

impl From<FriendRequestRow> for FriendRequest {
    fn from(r: FriendRequestRow) -> Self {
        FriendRequest {
            from_user_id: r.from_user_id,
            to_user_id: r.to_user_id,
            message: r.message,
            created_at_ms: r.created_at_ms,
        }
    }
}

#[derive(DeserializeRow)]
struct FriendRow {
    user_id: i64,
    friend_id: i64,
    remark: String,
    extra: String,
    created_at_ms: i64,
}

impl From<FriendRow> for Friend {
    fn from(r: FriendRow) -> Self {
        Friend {
            user_id: r.user_id,
            friend_id: r.friend_id,
            remark: r.remark,
            extra: r.extra,
            created_at_ms: r.created_at_ms,
        }
    }
}

#[derive(DeserializeRow)]
struct GroupRow {
    group_id: i64,
    name: String,
    avatar_url: String,
    introduction: String,
    owner_id: i64,
    extra: String,
    created_at_ms: i64,
}

impl From<GroupRow> for Group {
    fn from(r: GroupRow) -> Self {
        Group {
            group_id: r.group_id,
            name: r.name,
            avatar_url: r.avatar_url,
            introduction: r.introduction,
            owner_id: r.owner_id,
            extra: r.extra,
            created_at_ms: r.created_at_ms,
        }
    }
}

#[derive(DeserializeRow)]
struct MemberRow {
    group_id: i64,
    user_id: i64,
    role: i8,
    remark: String,
    joined_at_ms: i64,
}

impl TryFrom<MemberRow> for GroupMember {
    type Error = Error;

    fn try_from(r: MemberRow) -> Result<Self> {
        let role = Role::from_i8(r.role).ok_or_else(|| {
            corrupt(
                "group_members",
                format!(
                    "group {} user {}: unknown role {}",
                    r.group_id, r.user_id, r.role
                ),
            )
        })?;
        Ok(GroupMember {
            group_id: r.group_id,
            user_id: r.user_id,
            role,
            remark: r.remark,
            joined_at_ms: r.joined_at_ms,
        })
    }
}

#[derive(DeserializeRow)]
struct MessageRow {
    seq: i64,
    message_id: i64,
    sender_user_id: i64,
    sender_device_id: i64,
    receiver_type: i32,
    receiver_id: i64,
    client_msg_id: String,
    server_time_ms: i64,
    content_type: i32,
    content: Option<Bytes>,
}

impl From<MessageRow> for Message {
    fn from(r: MessageRow) -> Self {
        Message {
            message_id: from_cql(r.message_id),
            seq: from_cql(r.seq),
            sender_user_id: r.sender_user_id,
            sender_device_id: r.sender_device_id,
            receiver_type: r.receiver_type,
            receiver_id: r.receiver_id,
            client_msg_id: r.client_msg_id,
            server_time_ms: r.server_time_ms,
            content_type: r.content_type,
            // An empty blob and a null read back alike.
            content: r.content.unwrap_or_default(),
        }
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
struct RecentRow {
    message_id: i64,
    sender_user_id: i64,
    sender_device_id: i64,
    client_msg_id: String,
    server_time_ms: i64,
    content_type: i32,
    content: Option<Bytes>,
}

#[derive(DeserializeRow)]
struct DedupRow {
    message_id: i64,
    seq: i64,
    server_time_ms: i64,
    #[scylla(default_when_null)]
    recipients: Vec<(i64, i64)>,
}

/// The row a not-applied `INSERT INTO dedup ... IF NOT EXISTS` returns: `[applied]` and every column.
#[derive(DeserializeRow)]
#[expect(
    dead_code,
    reason = "the key columns come back too and must be named, but are not needed"
)]
struct DedupConflictRow {
    #[scylla(rename = "[applied]")]
    applied: bool,
    sender_device_id: i64,
    client_msg_id: String,
    message_id: i64,
    seq: i64,
    server_time_ms: i64,
    #[scylla(default_when_null)]
    recipients: Vec<(i64, i64)>,
}

impl From<DedupRow> for SendPlan {
    fn from(r: DedupRow) -> Self {
        SendPlan {
            message_id: from_cql(r.message_id),
            seq: from_cql(r.seq),
            server_time_ms: r.server_time_ms,
            recipients: r
                .recipients
                .into_iter()
                .map(|(user_id, seq)| (user_id, from_cql(seq)))
                .collect(),
        }
    }
}

#[async_trait]
impl DeviceStore for ScyllaBackend {
    async fn insert_device(&self, d: &Device) -> Result<()> {
        let values = (
            d.device_id,
            &d.device_type,
            &d.brand,
            &d.model,
            &d.system_version,
            &d.sdk_version,
            d.tokens_valid_after_ms,
            d.created_at_ms,
            (d.owner_user_id != 0).then_some(d.owner_user_id),
        );
        self.exec("insert device", &self.st.insert_device, values)
            .await?;
        Ok(())
    }

    async fn get_device(&self, device_id: i64) -> Result<Option<Device>> {
        let row: Option<DeviceRow> = self
            .one("get device", &self.st.get_device, (device_id,))
            .await?;
        Ok(row.map(Device::from))
    }

    async fn revoke_tokens_before(&self, device_id: i64, before_ms: i64) -> Result<()> {
        // Conditional so the cut-off only moves forward: an earlier `before_ms` changes nothing.
        let lwt = self
            .lwt(
                "revoke tokens",
                &self.st.revoke_tokens,
                (before_ms, device_id, before_ms),
            )
            .await?;
        // Not applied: either the row is missing (no current value) or its cut-off is already later.
        if lwt.applied || lwt.bigint("tokens_valid_after_ms").is_some() {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::NotFound,
                format!("device {device_id}"),
            ))
        }
    }

    async fn bind_device(&self, device_id: i64, user_id: i64) -> Result<i64> {
        let device = self
            .get_device(device_id)
            .await?
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("device {device_id}")))?;
        if device.owner_user_id != 0 {
            return Ok(device.owner_user_id);
        }
        let lwt = self
            .lwt("bind device", &self.st.bind_device, (user_id, device_id))
            .await?;
        if lwt.applied {
            return Ok(user_id);
        }
        // Another user's bind won the race: the not-applied result carries the current owner.
        lwt.bigint("owner_user_id").ok_or_else(|| {
            Error::new(
                ErrorKind::Corrupt,
                format!("device {device_id}: bind not applied and no owner"),
            )
        })
    }
}

#[async_trait]
impl UserStore for ScyllaBackend {
    async fn insert_user(&self, user: &User) -> Result<()> {
        let claim = self
            .lwt(
                "claim username",
                &self.st.claim_username,
                (&user.username, user.user_id),
            )
            .await?;
        // A claim already pointing at this id is ours from an earlier attempt that failed before
        // creating the user row: carry on.
        if !claim.applied && claim.bigint("user_id") != Some(user.user_id) {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("username {:?} is taken", user.username),
            ));
        }
        let created = self
            .lwt("insert user", &self.st.insert_user_new, user_values(user))
            .await?;
        if !created.applied {
            if claim.applied {
                // Give back the name claimed just now for a user id that turned out to be taken.
                self.lwt(
                    "release username",
                    &self.st.release_username,
                    (&user.username, user.user_id),
                )
                .await?;
            }
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("user id {} is taken", user.user_id),
            ));
        }
        Ok(())
    }

    async fn upsert_user(&self, user: &User) -> Result<()> {
        let claim = self
            .lwt(
                "claim username",
                &self.st.claim_username,
                (&user.username, user.user_id),
            )
            .await?;
        if !claim.applied && claim.bigint("user_id") != Some(user.user_id) {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("username {:?} belongs to another user", user.username),
            ));
        }
        let previous: Option<UserRow> = self
            .one("get user", &self.st.get_user, (user.user_id,))
            .await?;
        self.exec("upsert user", &self.st.upsert_user, user_values(user))
            .await?;
        if let Some(previous) = previous.filter(|p| p.username != user.username) {
            // Renamed: free the old name, but only if it still points at this user.
            self.lwt(
                "release username",
                &self.st.release_username,
                (&previous.username, user.user_id),
            )
            .await?;
        }
        Ok(())
    }

    async fn get_user(&self, user_id: i64) -> Result<Option<User>> {
        let row: Option<UserRow> = self.one("get user", &self.st.get_user, (user_id,)).await?;
        Ok(row.map(User::from))
    }

    async fn get_user_by_username(&self, username: &str) -> Result<Option<User>> {
        let Some((user_id,)) = self
            .one::<(i64,)>("get username", &self.st.get_username, (username,))
            .await?
        else {
            return Ok(None);
        };
        // The index can point at a user whose creation failed after the claim, or who was renamed
        // since: only the user row itself is authoritative.
        Ok(self
            .get_user(user_id)
            .await?
            .filter(|u| u.username == username))
    }

    async fn update_profile(&self, user_id: i64, profile: &Profile) -> Result<()> {
        let lwt = self
            .lwt(
                "update profile",
                &self.st.update_profile,
                (
                    &profile.nickname,
                    &profile.avatar_url,
                    &profile.extra,
                    now_ms(),
                    user_id,
                ),
            )
            .await?;
        if lwt.applied {
            Ok(())
        } else {
            Err(Error::new(ErrorKind::NotFound, format!("user {user_id}")))
        }
    }
}

#[async_trait]
impl FriendStore for ScyllaBackend {
    async fn put_request(&self, r: &FriendRequest) -> Result<()> {
        let values = (r.to_user_id, r.from_user_id, &r.message, r.created_at_ms);
        self.exec("put friend request", &self.st.put_request, values)
            .await?;
        Ok(())
    }

    async fn get_request(&self, from: i64, to: i64) -> Result<Option<FriendRequest>> {
        let row: Option<FriendRequestRow> = self
            .one("get friend request", &self.st.get_request, (to, from))
            .await?;
        Ok(row.map(FriendRequest::from))
    }

    async fn list_requests_to(&self, to: i64) -> Result<Vec<FriendRequest>> {
        let rows: Vec<FriendRequestRow> = self
            .all("list friend requests", &self.st.list_requests_to, (to,))
            .await?;
        Ok(rows.into_iter().map(FriendRequest::from).collect())
    }

    async fn delete_request(&self, from: i64, to: i64) -> Result<()> {
        self.exec("delete friend request", &self.st.delete_request, (to, from))
            .await?;
        Ok(())
    }

    async fn put_friend(&self, f: &Friend) -> Result<()> {
        let values = (f.user_id, f.friend_id, &f.remark, &f.extra, f.created_at_ms);
        self.exec("put friend", &self.st.put_friend, values).await?;
        Ok(())
    }

    async fn get_friend(&self, user_id: i64, friend_id: i64) -> Result<Option<Friend>> {
        let row: Option<FriendRow> = self
            .one("get friend", &self.st.get_friend, (user_id, friend_id))
            .await?;
        Ok(row.map(Friend::from))
    }

    async fn list_friends(&self, user_id: i64) -> Result<Vec<Friend>> {
        let rows: Vec<FriendRow> = self
            .all("list friends", &self.st.list_friends, (user_id,))
            .await?;
        Ok(rows.into_iter().map(Friend::from).collect())
    }

    async fn delete_friend(&self, user_id: i64, friend_id: i64) -> Result<()> {
        self.exec(
            "delete friend",
            &self.st.delete_friend,
            (user_id, friend_id),
        )
        .await?;
        Ok(())
    }
}

#[async_trait]
impl GroupStore for ScyllaBackend {
    async fn put_group(&self, g: &Group) -> Result<()> {
        let values = (
            g.group_id,
            &g.name,
            &g.avatar_url,
            &g.introduction,
            g.owner_id,
            &g.extra,
            g.created_at_ms,
        );
        self.exec("put group", &self.st.put_group, values).await?;
        Ok(())
    }

    async fn get_group(&self, group_id: i64) -> Result<Option<Group>> {
        let row: Option<GroupRow> = self
            .one("get group", &self.st.get_group, (group_id,))
            .await?;
        Ok(row.map(Group::from))
    }

    async fn delete_group(&self, group_id: i64) -> Result<()> {
        // Reverse index first, the group row last: if this stops half-way the group still exists
        // and deleting it again finishes the job.
        let members = self.member_ids(group_id).await?;
        futures::stream::iter(members)
            .map(Ok)
            .try_for_each_concurrent(WRITE_CONCURRENCY, |user_id| async move {
                self.exec(
                    "delete user group",
                    &self.st.delete_user_group,
                    (user_id, group_id),
                )
                .await
                .map(drop)
            })
            .await?;
        self.exec("delete group members", &self.st.delete_members, (group_id,))
            .await?;
        self.exec("delete group", &self.st.delete_group, (group_id,))
            .await?;
        Ok(())
    }

    async fn put_member(&self, m: &GroupMember) -> Result<()> {
        // Logged batch: the member row and its reverse index land together or not at all.
        let mut batch = Batch::new(BatchType::Logged);
        batch.append_statement(self.st.put_member.clone());
        batch.append_statement(self.st.put_user_group.clone());
        let values = (
            (
                m.group_id,
                m.user_id,
                m.role.as_i8(),
                &m.remark,
                m.joined_at_ms,
            ),
            (m.user_id, m.group_id),
        );
        self.session
            .batch(&batch, values)
            .await
            .map_err(|e| db_error("put member", e))?;
        Ok(())
    }

    async fn transfer_ownership(
        &self,
        group: &Group,
        new_owner: &GroupMember,
        old_owner: &GroupMember,
    ) -> Result<()> {
        crate::check_transfer(group, new_owner, old_owner)?;
        // One logged batch: the coordinator writes the batch log first, so once it is accepted every
        // statement is applied eventually, even if the coordinator dies; never only some of them.
        let mut batch = Batch::new(BatchType::Logged);
        batch.append_statement(self.st.put_group.clone());
        batch.append_statement(self.st.put_member.clone());
        batch.append_statement(self.st.put_member.clone());
        let g = group;
        let member = |m: &GroupMember| {
            (
                m.group_id,
                m.user_id,
                m.role.as_i8(),
                m.remark.clone(),
                m.joined_at_ms,
            )
        };
        let values = (
            (
                g.group_id,
                &g.name,
                &g.avatar_url,
                &g.introduction,
                g.owner_id,
                &g.extra,
                g.created_at_ms,
            ),
            member(new_owner),
            member(old_owner),
        );
        self.session
            .batch(&batch, values)
            .await
            .map_err(|e| db_error("transfer ownership", e))?;
        Ok(())
    }

    async fn get_member(&self, group_id: i64, user_id: i64) -> Result<Option<GroupMember>> {
        let row: Option<MemberRow> = self
            .one("get member", &self.st.get_member, (group_id, user_id))
            .await?;
        row.map(GroupMember::try_from).transpose()
    }

    async fn delete_member(&self, group_id: i64, user_id: i64) -> Result<()> {
        let mut batch = Batch::new(BatchType::Logged);
        batch.append_statement(self.st.delete_member.clone());
        batch.append_statement(self.st.delete_user_group.clone());
        self.session
            .batch(&batch, ((group_id, user_id), (user_id, group_id)))
            .await
            .map_err(|e| db_error("delete member", e))?;
        Ok(())
    }

    async fn list_members(
        &self,
        group_id: i64,
        after: i64,
        limit: usize,
    ) -> Result<Vec<GroupMember>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let rows: Vec<MemberRow> = self
            .all(
                "list members",
                &self.st.list_members,
                (group_id, after, cql_limit(limit)),
            )
            .await?;
        rows.into_iter().map(GroupMember::try_from).collect()
    }

    async fn member_ids(&self, group_id: i64) -> Result<Vec<i64>> {
        let rows: Vec<(i64,)> = self
            .all("member ids", &self.st.member_ids, (group_id,))
            .await?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    async fn groups_of_user(&self, user_id: i64) -> Result<Vec<i64>> {
        let rows: Vec<(i64,)> = self
            .all("groups of user", &self.st.groups_of_user, (user_id,))
            .await?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }
}

#[async_trait]
impl MessageStore for ScyllaBackend {
    async fn append(&self, user_id: i64, message: &Message) -> Result<()> {
        self.exec("append", &self.st.append, inbox_values(user_id, message))
            .await?;
        Ok(())
    }

    async fn append_many(&self, entries: &[(i64, Message)]) -> Result<()> {
        // One task per inbox partition (batching only within a partition, where a batch is a single
        // mutation), at most WRITE_CONCURRENCY in flight; all are durable before this returns.
        let mut by_user: BTreeMap<i64, Vec<&Message>> = BTreeMap::new();
        for (user_id, message) in entries {
            by_user.entry(*user_id).or_default().push(message);
        }
        futures::stream::iter(by_user)
            .map(Ok)
            .try_for_each_concurrent(WRITE_CONCURRENCY, |(user_id, messages)| async move {
                self.append_partition(user_id, &messages).await
            })
            .await
    }

    async fn sync(&self, user_id: i64, after_seq: u64, limit: usize) -> Result<Vec<Message>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // Saturate rather than wrap: a nonsense cursor beyond i64::MAX means "nothing newer".
        let after = i64::try_from(after_seq).unwrap_or(i64::MAX);
        let rows: Vec<MessageRow> = self
            .all("sync", &self.st.sync, (user_id, after, cql_limit(limit)))
            .await?;
        Ok(rows.into_iter().map(Message::from).collect())
    }

    async fn max_seq(&self, user_id: i64) -> Result<u64> {
        let row: Option<(i64,)> = self.one("max seq", &self.st.max_seq, (user_id,)).await?;
        Ok(row.map_or(0, |(seq,)| from_cql(seq)))
    }

    async fn get_dedup(&self, device_id: i64, client_msg_id: &str) -> Result<Option<SendPlan>> {
        let row: Option<DedupRow> = self
            .one("get dedup", &self.st.get_dedup, (device_id, client_msg_id))
            .await?;
        Ok(row.map(SendPlan::from))
    }

    async fn put_dedup_if_absent(
        &self,
        device_id: i64,
        client_msg_id: &str,
        r: &SendPlan,
    ) -> Result<Option<SendPlan>> {
        let recipients: Vec<(i64, i64)> = r
            .recipients
            .iter()
            .map(|&(user_id, seq)| (user_id, to_cql(seq)))
            .collect();
        let values = (
            device_id,
            client_msg_id,
            to_cql(r.message_id),
            to_cql(r.seq),
            r.server_time_ms,
            recipients,
        );
        let what = "put dedup";
        let rows = self
            .exec(what, &self.st.put_dedup, values)
            .await?
            .into_rows_result()
            .map_err(|e| db_error(what, e))?;
        // Applied: the only column is [applied]. Not applied: [applied] = false and the stored row.
        if rows.column_specs().len() == 1 {
            let (applied,): (bool,) = rows.first_row().map_err(|e| corrupt(what, e))?;
            return if applied {
                Ok(None)
            } else {
                Err(corrupt(what, "not applied, yet no stored row returned"))
            };
        }
        let stored: DedupConflictRow = rows.first_row().map_err(|e| corrupt(what, e))?;
        if stored.applied {
            return Err(corrupt(what, "applied, yet a stored row returned"));
        }
        Ok(Some(SendPlan::from(DedupRow {
            message_id: stored.message_id,
            seq: stored.seq,
            server_time_ms: stored.server_time_ms,
            recipients: stored.recipients,
        })))
    }

    async fn ack(&self, user_id: i64, device_id: i64, seq: u64) -> Result<()> {
        let seq = i64::try_from(seq).unwrap_or(i64::MAX);
        self.exec("ack", &self.st.ack, (seq, seq, user_id, device_id))
            .await?;
        Ok(())
    }

    async fn acked(&self, user_id: i64, device_id: i64) -> Result<u64> {
        let row: Option<(Option<i64>,)> = self
            .one("acked", &self.st.acked, (user_id, device_id))
            .await?;
        Ok(row.and_then(|(seq,)| seq).map_or(0, from_cql))
    }
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
        self.exec("put_room", &self.st.put_room, values).await?;
        Ok(())
    }

    async fn get_room(&self, room_id: i64) -> Result<Option<Room>> {
        let row: Option<RoomRow> = self.one("get_room", &self.st.get_room, (room_id,)).await?;
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
        self.exec("push_recent", &self.st.push_recent, values)
            .await?;
        let n = self
            .recent_pushes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n % TRIM_EVERY == TRIM_EVERY - 1 && keep > 0 {
            let ids: Vec<(i64,)> = self
                .all(
                    "recent_ids",
                    &self.st.recent_ids,
                    (room_id, cql_limit(keep)),
                )
                .await?;
            if let (true, Some((oldest_kept,))) = (ids.len() == keep, ids.last()) {
                self.exec("trim_recent", &self.st.trim_recent, (room_id, *oldest_kept))
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
            .all("recent", &self.st.recent, (room_id, cql_limit(limit)))
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
            })
            .collect())
    }
}
