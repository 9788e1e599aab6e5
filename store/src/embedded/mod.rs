//! Embedded backend on [redb]: one database file holds every store.
//!
//! For `dev` and small installs: no Cassandra, no Redis. All tables live in one file (or in memory
//! for tests, see [`EmbeddedBackend::temporary`]).
//!
//! # Tables
//! | table             | key                          | value                                  |
//! |-------------------|------------------------------|----------------------------------------|
//! | `devices`         | device id                    | [`Device`](crate::Device) as JSON                     |
//! | `users`           | user id                      | [`User`](crate::User) as JSON                       |
//! | `usernames`       | username                     | user id (unique index)                 |
//! | `friend_requests` | (to user, from user)         | [`FriendRequest`](crate::FriendRequest) as JSON              |
//! | `friends`         | (user, friend)               | [`Friend`](crate::Friend) as JSON                     |
//! | `groups`          | group id                     | [`Group`](crate::Group) as JSON                      |
//! | `group_members`   | (group, user)                | [`GroupMember`](crate::GroupMember) as JSON                |
//! | `user_groups`     | (user, group)                | `()` (groups of a user)                |
//! | `inbox`           | (user, seq)                  | prost-encoded [`Message`](zhibo_proto::client::Message)              |
//! | `dedup`           | (device, client_msg_id)      | (written at, [`SendPlan`](crate::SendPlan) as JSON)   |
//! | `dedup_by_time`   | (written at, device, id)     | `()` (expiry order)                    |
//! | `acks`            | (user, device)               | acknowledged seq                       |
//! | `group_invites`   | (invitee, group)             | [`crate::GroupInvite`] as JSON (`invites.rs`) |
//! | `seq`             | user                         | highest seq used outside the inbox (a conversation row's `version`); a floor on resume |
//! | `node_leases`     | (pool, node number)          | (owner, expires at ms, high-water ms)  |
//! | `conversations`   | (user, kind, peer/group)     | one user's conversation row as JSON (`conversations.rs`) |
//! | `conversation_index` | (user, kind, peer/group, conv seq) | inbox seq (per-conversation history) |
//! | `conversation_messages` | (kind, a, b, conv seq) | the message's record as JSON (recall)  |
//! | `group_reads`     | (group, user)                | read position (group read receipts)    |
//! | `outbox`          | id (ascending)               | (topic, idempotency key, body): events for the in-process relay (`outbox.rs`) |
//!
//! Composite keys are tuples, so "everything of one user/group" is a contiguous key range.
//! Dedup records older than [`DEDUP_RETENTION_MS`] read as absent; each new record removes a few expired
//! ones (oldest first via `dedup_by_time`), which keeps the table bounded without a sweeper task.
//!
//! # Seqs
//! Counters live in memory, each resumed on first use from the user's largest stored seq. That is safe
//! because a new send's dedup plan and inbox entries commit in one transaction
//! ([`crate::MessageStore::record_send`]): a seq that was handed out but never stored is referenced by nothing,
//! so reusing it after a restart loses nothing. A seq given to a conversation row as its `version`
//! (a mark-read, a settings change, a join, a delete-for-me) is referenced without an inbox entry, so
//! that write also keeps it in `seq` ([`Tables::keep_seq`]), the other floor a counter resumes above:
//! otherwise a message after a restart could take the same seq as its row's version and list sync
//! (`changed_after`) would miss it. Counting in memory takes one write per message off the single
//! writer thread (row changes without a message are rare by comparison). The map grows with the users that received a message since the file was opened (~50 bytes
//! each). The one rule this relies on: inbox entries with seqs that did not come from
//! [`crate::SeqAllocator::next`] (imports through `append`/`append_many`) must not be written while the same
//! users are sending, or a counter may be resumed below them.
//!
//! # Layout
//! One file per domain (`devices`, `users`, `friends`, `groups`, `messages` with the seq counters,
//! `rooms`, `invites`, `leases`, `conversations`) holding its trait impl; this file holds the tables, [`EmbeddedBackend`]
//! and the transaction helpers, `writer.rs` the writer thread.
//!
//! # Threads and durability
//! redb is synchronous. Point reads run inline on the caller's task (microseconds from the page
//! cache); scans run on tokio's blocking pool (`spawn_blocking`). Writes go to one
//! dedicated writer thread that commits whatever is queued in a single transaction with
//! [`redb::Durability::Immediate`] (group commit): each call returns only once its write is on disk, and
//! one fsync covers every write that arrived meanwhile, which is what makes the `dev` throughput
//! possible without giving up durability.

mod conversations;
mod devices;
mod friends;
mod groups;
mod invites;
mod leases;
mod messages;
mod outbox;
mod rooms;
mod users;
mod writer;

use std::collections::HashMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, Mutex};

use redb::{Database, ReadTransaction, ReadableTable, Table, TableDefinition, WriteTransaction};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{Error, ErrorKind, Result, Stores};
use writer::Writer;

pub use invites::EmbeddedInvites;
pub use rooms::EmbeddedRooms;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const DEVICES: TableDefinition<i64, &[u8]> = TableDefinition::new("devices");
const USERS: TableDefinition<i64, &[u8]> = TableDefinition::new("users");
const USERNAMES: TableDefinition<&str, i64> = TableDefinition::new("usernames");
/// Keyed (to, from) so the requests addressed to a user are one range.
const FRIEND_REQUESTS: TableDefinition<(i64, i64), &[u8]> = TableDefinition::new("friend_requests");
const FRIENDS: TableDefinition<(i64, i64), &[u8]> = TableDefinition::new("friends");
const GROUPS: TableDefinition<i64, &[u8]> = TableDefinition::new("groups");
const MEMBERS: TableDefinition<(i64, i64), &[u8]> = TableDefinition::new("group_members");
const USER_GROUPS: TableDefinition<(i64, i64), ()> = TableDefinition::new("user_groups");
const INBOX: TableDefinition<(i64, u64), &[u8]> = TableDefinition::new("inbox");
/// (device, client_msg_id) -> (written at ms, [`SendPlan`](crate::SendPlan) as JSON).
const DEDUP: TableDefinition<(i64, &str), (i64, &[u8])> = TableDefinition::new("dedup");
/// (written at ms, device, client_msg_id): the dedup records oldest first, for expiry.
const DEDUP_BY_TIME: TableDefinition<(i64, i64, &str), ()> = TableDefinition::new("dedup_by_time");
const ACKS: TableDefinition<(i64, i64), u64> = TableDefinition::new("acks");
const SEQ: TableDefinition<i64, u64> = TableDefinition::new("seq");
/// (pool, node) -> (owner, expires at ms, high-water ms); see [`leases`].
const NODE_LEASES: TableDefinition<(&str, u32), (&str, i64, i64)> =
    TableDefinition::new("node_leases");
/// (user, kind, peer or group) -> one user's conversation row as JSON (`conversations.rs`).
const CONVERSATIONS: TableDefinition<(i64, i32, i64), &[u8]> =
    TableDefinition::new("conversations");
/// (user, kind, peer or group, conversation seq) -> inbox seq: one user's history of one conversation.
const CONVERSATION_INDEX: TableDefinition<(i64, i32, i64, u64), u64> =
    TableDefinition::new("conversation_index");
/// (kind, a, b, conversation seq) -> the message's record as JSON (sender, time, copies, recalled).
const CONVERSATION_MESSAGES: TableDefinition<(i32, i64, i64, u64), &[u8]> =
    TableDefinition::new("conversation_messages");
/// (group, user) -> read position: the group's read receipts.
const GROUP_READS: TableDefinition<(i64, i64), u64> = TableDefinition::new("group_reads");
/// id -> (topic, idempotency key, body): events waiting for the in-process relay (`outbox.rs`).
const OUTBOX: TableDefinition<u64, OutboxValue> = TableDefinition::new("outbox");
/// A row of [`OUTBOX`]: (topic, idempotency key, body).
type OutboxValue = (&'static str, &'static str, &'static [u8]);

/// Layout version stored in `meta`; bumped when a table's key or value encoding changes.
const SCHEMA_VERSION: u64 = 1;

/// How long a dedup record is honoured: far longer than any client keeps resending.
pub const DEDUP_RETENTION_MS: i64 = 7 * 24 * 3600 * 1000;
/// Expired dedup records removed per new one: more than one, so a backlog shrinks in steady state.
const DEDUP_PRUNE_PER_PUT: usize = 4;

/// Every table of one write transaction, opened once per batch rather than once per write: opening
/// a table costs about as much as a small insert.
struct Tables<'tx> {
    /// The transaction, for tables opened only by the jobs that use them ([`Tables::outbox`]).
    tx: &'tx WriteTransaction,
    /// Opened on first use: most batches never touch it.
    outbox: Option<Table<'tx, u64, OutboxValue>>,
    /// Opened on first use: only conversation-row changes without a message write it.
    seq: Option<Table<'tx, i64, u64>>,
    devices: Table<'tx, i64, &'static [u8]>,
    users: Table<'tx, i64, &'static [u8]>,
    usernames: Table<'tx, &'static str, i64>,
    friend_requests: Table<'tx, (i64, i64), &'static [u8]>,
    friends: Table<'tx, (i64, i64), &'static [u8]>,
    groups: Table<'tx, i64, &'static [u8]>,
    members: Table<'tx, (i64, i64), &'static [u8]>,
    user_groups: Table<'tx, (i64, i64), ()>,
    inbox: Table<'tx, (i64, u64), &'static [u8]>,
    dedup: Table<'tx, (i64, &'static str), (i64, &'static [u8])>,
    dedup_by_time: Table<'tx, (i64, i64, &'static str), ()>,
    acks: Table<'tx, (i64, i64), u64>,
    node_leases: Table<'tx, (&'static str, u32), (&'static str, i64, i64)>,
    conversations: Table<'tx, (i64, i32, i64), &'static [u8]>,
    conversation_index: Table<'tx, (i64, i32, i64, u64), u64>,
    conversation_messages: Table<'tx, (i32, i64, i64, u64), &'static [u8]>,
    group_reads: Table<'tx, (i64, i64), u64>,
    /// Dedup records written in this batch, which sizes the expiry work of [`Tables::housekeeping`].
    dedup_written: usize,
    /// The latest time a dedup record of this batch was written at: the clock for expiry.
    dedup_now: i64,
}

impl<'tx> Tables<'tx> {
    /// Opens (creating if missing) every table in `tx`.
    fn open(tx: &'tx WriteTransaction) -> Result<Self> {
        Ok(Tables {
            tx,
            outbox: None,
            seq: None,
            devices: tx.open_table(DEVICES).db()?,
            users: tx.open_table(USERS).db()?,
            usernames: tx.open_table(USERNAMES).db()?,
            friend_requests: tx.open_table(FRIEND_REQUESTS).db()?,
            friends: tx.open_table(FRIENDS).db()?,
            groups: tx.open_table(GROUPS).db()?,
            members: tx.open_table(MEMBERS).db()?,
            user_groups: tx.open_table(USER_GROUPS).db()?,
            inbox: tx.open_table(INBOX).db()?,
            dedup: tx.open_table(DEDUP).db()?,
            dedup_by_time: tx.open_table(DEDUP_BY_TIME).db()?,
            acks: tx.open_table(ACKS).db()?,
            node_leases: tx.open_table(NODE_LEASES).db()?,
            conversations: tx.open_table(CONVERSATIONS).db()?,
            conversation_index: tx.open_table(CONVERSATION_INDEX).db()?,
            conversation_messages: tx.open_table(CONVERSATION_MESSAGES).db()?,
            group_reads: tx.open_table(GROUP_READS).db()?,
            dedup_written: 0,
            dedup_now: i64::MIN,
        })
    }

    /// The outbox table, opened in this transaction on first use.
    fn outbox(&mut self) -> Result<&mut Table<'tx, u64, OutboxValue>> {
        if self.outbox.is_none() {
            self.outbox = Some(self.tx.open_table(OUTBOX).db()?);
        }
        Ok(self
            .outbox
            .as_mut()
            .unwrap_or_else(|| unreachable!("opened above")))
    }

    /// Records that `user_id`'s seq `seq` is in use outside the inbox (a conversation row's
    /// `version` taken from the user's counter with nothing stored at it), so the counter resumes
    /// above it after a restart ([`crate::SeqAllocator::current`] reads this table as a floor).
    fn keep_seq(&mut self, user_id: i64, seq: u64) -> Result<()> {
        if self.seq.is_none() {
            self.seq = Some(self.tx.open_table(SEQ).db()?);
        }
        let table = self
            .seq
            .as_mut()
            .unwrap_or_else(|| unreachable!("opened above"));
        let kept = table.get(user_id).db()?.map_or(0, |v| v.value());
        if seq > kept {
            table.insert(user_id, seq).db()?;
        }
        Ok(())
    }

    /// End-of-batch upkeep: removes up to [`DEDUP_PRUNE_PER_PUT`] expired dedup records per record
    /// written, oldest first. Once per batch, as one range scan, rather than once per write.
    fn housekeeping(&mut self) -> Result<()> {
        if self.dedup_written == 0 {
            return Ok(());
        }
        let cutoff = self.dedup_now.saturating_sub(DEDUP_RETENTION_MS);
        let mut expired = Vec::new();
        for entry in self
            .dedup_by_time
            .range(..(cutoff, i64::MIN, ""))
            .db()?
            .take(self.dedup_written * DEDUP_PRUNE_PER_PUT)
        {
            let (key, _) = entry.db()?;
            let (written_ms, device, id) = key.value();
            expired.push((written_ms, device, id.to_owned()));
        }
        for (written_ms, device, id) in &expired {
            self.dedup_by_time
                .remove((*written_ms, *device, id.as_str()))
                .db()?;
            // The key may have been rewritten after it expired; only the matching record goes.
            let current = self
                .dedup
                .get((*device, id.as_str()))
                .db()?
                .map(|v| v.value().0);
            if current == Some(*written_ms) {
                self.dedup.remove((*device, id.as_str())).db()?;
            }
        }
        self.dedup_written = 0;
        Ok(())
    }
}

/// The redb backend: implements every storage trait over one [`Database`].
pub struct EmbeddedBackend {
    writer: Writer,
    db: Arc<Database>,
    /// Last seq handed out per user since the database was opened (see [`crate::SeqAllocator`] in `messages.rs`).
    seqs: Mutex<HashMap<i64, u64>>,
    /// The highest outbox id handed out since the database was opened (`outbox.rs`).
    outbox_high: Arc<std::sync::atomic::AtomicU64>,
    /// Last conversation seq handed out per conversation since the database was opened (resumed from
    /// the largest recorded one, `conversation_messages`).
    conv_seqs: Mutex<HashMap<crate::ConversationKey, u64>>,
    /// Paged-read snapshots ([`crate::SeqAllocator::put_snapshot`]): value and expiry.
    snapshots: Mutex<HashMap<String, (std::time::Instant, bytes::Bytes)>>,
    /// Membership versions ([`crate::SeqAllocator::group_version`]); lost with the process, like
    /// every cache keyed by them.
    group_versions: Mutex<HashMap<i64, u64>>,
    /// Locks ([`crate::SeqAllocator::try_lock`]): name → holder and expiry.
    locks: Mutex<HashMap<String, (String, std::time::Instant)>>,
}

impl std::fmt::Debug for EmbeddedBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBackend").finish_non_exhaustive()
    }
}

impl EmbeddedBackend {
    /// Opens the database file at `path`, creating it (and its tables) if missing.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] when the file cannot be opened (e.g. another process holds it);
    /// [`ErrorKind::Corrupt`] when it was written by an incompatible layout version.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let db = Database::create(path).map_err(|e| {
            Error::wrap(
                ErrorKind::Unavailable,
                format!("opening {}", path.display()),
                e,
            )
        })?;
        Self::init(db)
    }

    /// An in-memory database, gone when the backend is dropped (tests, `dev` without a disk).
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] when the database cannot be created.
    pub fn temporary() -> Result<Self> {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(Error::backend)?;
        Self::init(db)
    }

    /// The outbox of the in-process relay (not part of [`Stores`]: only embedded mode has one).
    pub fn outbox(self: &Arc<Self>) -> Arc<dyn crate::OutboxStore> {
        self.clone()
    }

    /// Every store as a trait object backed by this database, seq allocation included.
    pub fn stores(self: Arc<Self>) -> Stores {
        Stores {
            devices: self.clone(),
            users: self.clone(),
            friends: self.clone(),
            groups: self.clone(),
            group_invites: Arc::new(EmbeddedInvites::new(self.db.clone())),
            messages: self.clone(),
            rooms: Arc::new(EmbeddedRooms::new(self.db.clone())),
            leases: self.clone(),
            conversations: self.clone(),
            seq: self,
        }
    }

    /// Creates every table so read transactions never meet a missing one, and checks the layout.
    fn init(db: Database) -> Result<Self> {
        let tx = db.begin_write().map_err(Error::backend)?;
        let outbox_last;
        {
            let mut meta = tx.open_table(META).map_err(Error::backend)?;
            let stored = meta
                .get("schema_version")
                .map_err(Error::backend)?
                .map(|v| v.value());
            match stored {
                Some(v) if v != SCHEMA_VERSION => {
                    return Err(Error::new(
                        ErrorKind::Corrupt,
                        format!(
                            "embedded database has layout v{v}, this build reads v{SCHEMA_VERSION}"
                        ),
                    ));
                }
                Some(_) => {}
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION)
                        .map_err(Error::backend)?;
                }
            }
            Tables::open(&tx)?;
            // Read as a floor only (see Seqs), but it must exist for read transactions.
            tx.open_table(SEQ).map_err(Error::backend)?;
            // Ids continue above what a previous run left: the relay's cursor passes those entries
            // while resuming them, so a new id below it would never be read.
            let outbox = tx.open_table(OUTBOX).map_err(Error::backend)?;
            outbox_last = outbox
                .last()
                .map_err(Error::backend)?
                .map_or(0, |(k, _)| k.value());
        }
        tx.commit().map_err(Error::backend)?;
        let db = Arc::new(db);
        Ok(EmbeddedBackend {
            writer: Writer::start(db.clone())?,
            db,
            seqs: Mutex::new(HashMap::new()),
            outbox_high: Arc::new(std::sync::atomic::AtomicU64::new(outbox_last)),
            conv_seqs: Mutex::new(HashMap::new()),
            snapshots: Mutex::new(HashMap::new()),
            group_versions: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
        })
    }

    /// Runs `f` in a read transaction on the blocking pool.
    async fn read<R, F>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&ReadTransaction) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let tx = db.begin_read().map_err(Error::backend)?;
            f(&tx)
        })
        .await
        .map_err(Error::backend)?
    }

    /// Runs a point read (one key, or the last key of a range) inline on the calling task.
    ///
    /// Such a read takes microseconds from redb's page cache, a fraction of what handing it to the
    /// blocking pool and waking the task again costs (the hand-offs were a quarter of the CPU of the 1:1
    /// path in the profile of docs/BENCHMARKS.md). Scans stay on the pool ([`Self::read`]).
    async fn point<R, F>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&ReadTransaction) -> Result<R>,
    {
        let tx = self.db.begin_read().map_err(Error::backend)?;
        f(&tx)
    }

    fn counters(&self) -> std::sync::MutexGuard<'_, HashMap<i64, u64>> {
        self.seqs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn conv_counters(&self) -> std::sync::MutexGuard<'_, HashMap<crate::ConversationKey, u64>> {
        self.conv_seqs.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn locks(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (String, std::time::Instant)>> {
        self.locks.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn group_versions(&self) -> std::sync::MutexGuard<'_, HashMap<i64, u64>> {
        self.group_versions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn snapshots(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (std::time::Instant, bytes::Bytes)>> {
        self.snapshots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Raises the counters of users already counted to the seqs just stored (appends with seqs that
    /// did not come from [`SeqAllocator::next`], such as imports). Users not counted yet read their
    /// floor from the inbox when first counted.
    fn saw_seqs(&self, stored: impl Iterator<Item = (i64, u64)>) {
        let mut counters = self.counters();
        for (user_id, seq) in stored {
            if let Some(c) = counters.get_mut(&user_id) {
                *c = (*c).max(seq);
            }
        }
    }

    /// Runs `op` in a durable write transaction on the writer thread (see [`writer`]).
    async fn write<R, F>(&self, op: F) -> Result<R>
    where
        F: FnMut(&mut Tables<'_>) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        self.writer.run(op).await
    }
}

/// `?` for redb errors: they all mean the backend failed.
trait Db<T> {
    fn db(self) -> Result<T>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> Db<T> for std::result::Result<T, E> {
    fn db(self) -> Result<T> {
        self.map_err(Error::backend)
    }
}

fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| Error::wrap(ErrorKind::Corrupt, "encoding", e))
}

fn from_json<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::wrap(ErrorKind::Corrupt, what, e))
}

fn not_found(what: &str, id: i64) -> Error {
    Error::new(ErrorKind::NotFound, format!("{what} {id} does not exist"))
}

/// Values of a JSON table whose keys are `(prefix, x)` with `x > after`, ascending, at most `limit`.
fn json_range<T: DeserializeOwned>(
    table: &impl ReadableTable<(i64, i64), &'static [u8]>,
    prefix: i64,
    after: i64,
    limit: usize,
    what: &str,
) -> Result<Vec<T>> {
    let range = (
        Bound::Excluded((prefix, after)),
        Bound::Included((prefix, i64::MAX)),
    );
    let mut out = Vec::new();
    for entry in table.range::<(i64, i64)>(range).db()?.take(limit) {
        out.push(from_json(entry.db()?.1.value(), what)?);
    }
    Ok(out)
}

/// Second key parts of a `(prefix, x)` table, ascending.
fn second_keys<V: redb::Value + 'static>(
    table: &impl ReadableTable<(i64, i64), V>,
    prefix: i64,
) -> Result<Vec<i64>> {
    let mut out = Vec::new();
    for entry in table.range((prefix, i64::MIN)..=(prefix, i64::MAX)).db()? {
        out.push(entry.db()?.0.value().1);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use zhibo_proto::client::Message;

    use super::messages::put_dedup_at;
    use super::*;
    use crate::{MessageStore, Profile, SendPlan, SeqAllocator, User, UserStore};

    fn message(seq: u64) -> Message {
        Message {
            message_id: 1000 + seq,
            seq,
            client_msg_id: format!("c{seq}"),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn seq_counters_resume_above_every_floor() {
        let backend = Arc::new(EmbeddedBackend::temporary().expect("temporary db"));
        // A counter persisted by an earlier build is a floor.
        let tx = backend.db.begin_write().expect("write");
        tx.open_table(SEQ)
            .expect("seq table")
            .insert(7, 500)
            .expect("insert");
        tx.commit().expect("commit");
        assert_eq!(backend.current(7).await.expect("current"), 500);
        assert_eq!(backend.next(&[7]).await.expect("next"), [501]);
        // An append above a counted user's counter raises it.
        backend.append(7, &message(900)).await.expect("append");
        assert_eq!(backend.next(&[7]).await.expect("next"), [901]);
        // Racing first allocations for a user not counted yet are all distinct.
        backend.append(8, &message(40)).await.expect("append");
        let all = futures::future::join_all((0..50).map(|_| backend.next(&[8]))).await;
        let mut seqs: Vec<u64> = all.into_iter().map(|r| r.expect("next")[0]).collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (41..=90).collect::<Vec<u64>>());
        // A group larger than the inline limit loads its floors on the blocking pool, same result.
        let users: Vec<i64> = (100..120).collect();
        backend.append(119, &message(3)).await.expect("append");
        let next = backend.next(&users).await.expect("next of a group");
        assert_eq!(next.len(), 20);
        assert_eq!(next[..19], [1; 19]);
        assert_eq!(next[19], 4);
    }

    /// A seq given to a conversation row as its `version` (nothing stored at it) is a floor after a
    /// restart: a message must not take it again, or list sync (`changed_after` = that version)
    /// would never return the message's row.
    #[tokio::test]
    async fn row_versions_are_seq_floors_after_a_restart() {
        use crate::{ConversationId, ConversationSettings, ConversationStore};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("zhibo.redb");
        let conv = ConversationId::direct(99);
        {
            let backend = Arc::new(EmbeddedBackend::open(&path).expect("open"));
            // User 1: a message (seq 1), then a join whose version is a fresh seq (2).
            backend.append(1, &message(1)).await.expect("append");
            backend.join(1, conv, 1, 2).await.expect("join");
            // Users 2–4: a row joined at version 0, then one change each with a fresh seq.
            for user in 2..=4 {
                backend.join(user, conv, 0, 0).await.expect("join");
            }
            backend.mark_read(2, conv, 0, 5).await.expect("mark read");
            let settings = ConversationSettings {
                muted: true,
                pinned: false,
            };
            backend
                .set_settings(3, conv, settings, 6)
                .await
                .expect("settings");
            backend.touch(&[(4, conv, 7)]).await.expect("touch");
            // A lower version later changes no floor.
            backend.mark_read(2, conv, 0, 3).await.expect("mark read");
        }
        let backend = Arc::new(EmbeddedBackend::open(&path).expect("reopen"));
        for (user, version) in [(1, 2), (2, 5), (3, 6), (4, 7)] {
            assert_eq!(
                backend.current(user).await.expect("current"),
                version,
                "user {user}'s counter resumes at its row's version"
            );
            assert_eq!(backend.next(&[user]).await.expect("next"), [version + 1]);
        }
        // A user with no row change resumes from the inbox alone.
        assert_eq!(backend.current(5).await.expect("current"), 0);
    }

    #[tokio::test]
    async fn concurrent_writes_share_commits_and_all_land() {
        let backend = Arc::new(EmbeddedBackend::temporary().expect("temporary db"));
        let mut tasks = Vec::new();
        for user_id in 1..=8_i64 {
            let backend = backend.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..50 {
                    let seq = backend.next(&[user_id]).await?[0];
                    backend.append(user_id, &message(seq)).await?;
                }
                Ok::<_, Error>(())
            }));
        }
        for task in tasks {
            task.await.expect("task").expect("writes");
        }
        for user_id in 1..=8_i64 {
            let seqs: Vec<u64> = backend
                .sync(user_id, 0, 1000)
                .await
                .expect("sync")
                .iter()
                .map(|m| m.seq)
                .collect();
            assert_eq!(seqs, (1..=50).collect::<Vec<_>>(), "user {user_id}");
        }
    }

    #[tokio::test]
    async fn a_conflict_in_a_batch_does_not_fail_its_neighbours() {
        let backend = Arc::new(EmbeddedBackend::temporary().expect("temporary db"));
        let user = |id: i64, name: &str| User {
            user_id: id,
            username: name.into(),
            password_hash: String::new(),
            profile: Profile::default(),
            created_at_ms: 0,
            updated_at_ms: 0,
        };
        let results = futures::future::join_all(
            [user(1, "a"), user(2, "a"), user(3, "b")]
                .iter()
                .map(|u| backend.insert_user(u)),
        )
        .await;
        let conflicts = results
            .iter()
            .filter(|r| r.as_ref().is_err_and(|e| e.kind == ErrorKind::Conflict))
            .count();
        assert_eq!(
            conflicts, 1,
            "exactly one of the two 'a' inserts conflicts: {results:?}"
        );
        assert!(backend
            .get_user_by_username("b")
            .await
            .expect("get")
            .is_some());
    }

    #[tokio::test]
    async fn dedup_records_expire_and_are_pruned() {
        let backend = EmbeddedBackend::temporary().expect("temporary db");
        let result = |message_id| SendPlan {
            message_id,
            seq: 1,
            server_time_ms: 0,
            recipients: vec![(7, 1)],
            conv_seq: 0,
        };
        let put = |device: i64, id: &'static str, r: SendPlan, now: i64| {
            let bytes = to_json(&r).expect("json");
            backend.write(move |t| put_dedup_at(t, device, id, &bytes, now))
        };
        assert_eq!(put(1, "old", result(1), 1_000).await.expect("put"), None);
        assert_eq!(
            put(1, "old", result(2), 2_000).await.expect("put"),
            Some(result(1))
        );
        // Past retention the old record no longer counts, and the next write removes it.
        let later = 1_000 + DEDUP_RETENTION_MS + 1;
        assert_eq!(put(2, "new", result(3), later).await.expect("put"), None);
        let (old, new) = backend
            .read(move |tx| {
                let t = tx.open_table(DEDUP).db()?;
                Ok((
                    t.get((1, "old")).db()?.is_some(),
                    t.get((2, "new")).db()?.is_some(),
                ))
            })
            .await
            .expect("read");
        assert!(!old, "the expired record was pruned");
        assert!(new, "the new record is stored");
        assert_eq!(
            put(1, "old", result(4), later).await.expect("put"),
            None,
            "expired key is reusable"
        );
    }
}
