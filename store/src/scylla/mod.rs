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
//!
//! # Layout
//! One file per domain (`devices`, `users`, `friends`, `groups`, `messages`, `rooms`, `invites`,
//! `leases`, `conversations`), each owning its `Statements` (prepared once in [`ScyllaBackend::new`]), its row types and
//! its trait impl, so a CQL column list sits next to the tuple that binds it. This file holds the
//! session, the query helpers and the error mapping; `migrate.rs` the migrations.

mod conversations;
mod devices;
mod friends;
mod groups;
mod invites;
mod leases;
mod messages;
mod migrate;
mod rooms;
mod users;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt as _;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::response::query_result::QueryResult;
use scylla::serialize::row::SerializeRow;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlValue, Row};

pub use migrate::{migrate, statements, valid_keyspace, Migration, MIGRATIONS};

use crate::{Error, ErrorKind, Result, SeqAllocator, Stores};

/// CQL operations executed by this process's Scylla backends, by kind: a cheap relaxed atomic per
/// statement, exported as the `zhibo_cql_operations_total{kind}` metric and read by the load tool to
/// print CQL operations per message. Process-wide (every backend of the process adds to it).
#[derive(Debug, Default)]
pub struct CqlOps {
    read: AtomicU64,
    write: AtomicU64,
    lwt: AtomicU64,
    batch: AtomicU64,
    /// Rows written: one per plain or conditional write, one per statement of a batch.
    rows: AtomicU64,
}

/// The counters of this process.
pub static CQL_OPS: CqlOps = CqlOps {
    read: AtomicU64::new(0),
    write: AtomicU64::new(0),
    lwt: AtomicU64::new(0),
    batch: AtomicU64::new(0),
    rows: AtomicU64::new(0),
};

/// What a CQL statement is, for [`CqlOps`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CqlOp {
    Read,
    Write,
    Lwt,
    Batch,
}

impl CqlOp {
    /// A prepared statement's kind from its text: `SELECT` reads, a conditional (`IF ...`) write is
    /// a lightweight transaction, anything else a plain write.
    fn of(cql: &str) -> CqlOp {
        let cql = cql.trim_start();
        if cql
            .get(..6)
            .is_some_and(|w| w.eq_ignore_ascii_case("select"))
        {
            CqlOp::Read
        } else if cql.to_ascii_uppercase().contains(" IF ") {
            CqlOp::Lwt
        } else {
            CqlOp::Write
        }
    }
}

impl CqlOps {
    fn count(&self, op: CqlOp) {
        let counter = match op {
            CqlOp::Read => &self.read,
            CqlOp::Write => &self.write,
            CqlOp::Lwt => &self.lwt,
            CqlOp::Batch => &self.batch,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if matches!(op, CqlOp::Write | CqlOp::Lwt) {
            self.rows.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts one batch of `statements` row writes.
    fn count_batch(&self, statements: usize) {
        self.count(CqlOp::Batch);
        self.rows.fetch_add(statements as u64, Ordering::Relaxed);
    }

    /// Rows written (see [`Self::by_kind`]): what the insert ceiling's single-row inserts compare to.
    pub fn rows_written(&self) -> u64 {
        self.rows.load(Ordering::Relaxed)
    }

    /// `(kind, count)` for `read`, `write`, `lwt` and `batch` (single-partition batches of plain
    /// writes, and the conditional batches of node leases).
    pub fn by_kind(&self) -> [(&'static str, u64); 4] {
        [
            ("read", self.read.load(Ordering::Relaxed)),
            ("write", self.write.load(Ordering::Relaxed)),
            ("lwt", self.lwt.load(Ordering::Relaxed)),
            ("batch", self.batch.load(Ordering::Relaxed)),
        ]
    }
}

/// [`CQL_OPS`]`.by_kind()`, as a plain function (for a metrics collector).
pub fn cql_ops_by_kind() -> Vec<(&'static str, u64)> {
    CQL_OPS.by_kind().to_vec()
}

/// Counts one batch of `statements` row writes in [`CQL_OPS`] (the batch call sites of the domain
/// files).
fn count_batch(statements: usize) {
    CQL_OPS.count_batch(statements);
}

/// [`CQL_OPS`]`.rows_written()` as `(kind, count)` with the one kind `all` (a counter source, as
/// [`cql_ops_by_kind`]).
pub fn cql_rows_written() -> Vec<(&'static str, u64)> {
    vec![("all", CQL_OPS.rows_written())]
}

/// How many writes (or single-partition batches) one call keeps in flight.
const WRITE_CONCURRENCY: usize = 128;

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

/// A driver failure while doing `what`, kept as the error's source.
pub(crate) fn db_error(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::wrap(ErrorKind::Unavailable, what, e)
}

/// A row that does not decode, the decoding error kept as the source.
fn corrupt(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::wrap(ErrorKind::Corrupt, what, e)
}

/// Data that makes no sense, with no underlying error to keep.
fn corrupt_data(what: &str, detail: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Corrupt, format!("{what}: {detail}"))
}

/// Prepares one statement, naming it in the error: what each domain's `Statements::prepare` calls.
async fn prepare(session: &Session, cql: String) -> Result<PreparedStatement> {
    session
        .prepare(cql.clone())
        .await
        .map_err(|e| db_error(&format!("prepare `{cql}`"), e))
}

/// The ScyllaDB / Cassandra implementation of every store trait except [`SeqAllocator`]
/// (pair it with [`crate::redis_seq::RedisSeq`]).
pub struct ScyllaBackend {
    session: Arc<Session>,
    devices: devices::Statements,
    users: users::Statements,
    friends: friends::Statements,
    groups: groups::Statements,
    messages: messages::Statements,
    rooms: rooms::Statements,
    leases: leases::Statements,
    invites: invites::Statements,
    conversations: conversations::Statements,
    /// Room messages pushed by this process, to trim each room's history now and then (see `rooms.rs`).
    recent_pushes: std::sync::atomic::AtomicU64,
}

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
        Ok(ScyllaBackend {
            devices: devices::Statements::prepare(&session).await?,
            users: users::Statements::prepare(&session).await?,
            friends: friends::Statements::prepare(&session).await?,
            groups: groups::Statements::prepare(&session).await?,
            messages: messages::Statements::prepare(&session).await?,
            rooms: rooms::Statements::prepare(&session).await?,
            leases: leases::Statements::prepare(&session).await?,
            invites: invites::Statements::prepare(&session).await?,
            conversations: conversations::Statements::prepare(&session).await?,
            session,
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
            conversations: self.clone(),
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
        CQL_OPS.count(CqlOp::of(st.get_statement()));
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
        CQL_OPS.count(CqlOp::Read);
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
            other => {
                return Err(corrupt_data(
                    what,
                    format!("no [applied] column: {other:?}"),
                ))
            }
        };
        Ok(Lwt {
            applied,
            columns: names.into_iter().zip(row.columns).collect(),
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_are_counted_by_kind() {
        assert_eq!(CqlOp::of("SELECT a FROM t WHERE k = ?"), CqlOp::Read);
        assert_eq!(CqlOp::of("  select a from t"), CqlOp::Read);
        assert_eq!(CqlOp::of("INSERT INTO t (k) VALUES (?)"), CqlOp::Write);
        assert_eq!(
            CqlOp::of("INSERT INTO t (k) VALUES (?) IF NOT EXISTS"),
            CqlOp::Lwt
        );
        assert_eq!(
            CqlOp::of("UPDATE t SET a = ? WHERE k = ? if a < ?"),
            CqlOp::Lwt
        );
        assert_eq!(CqlOp::of("DELETE FROM t WHERE k = ?"), CqlOp::Write);
        let ops = CqlOps::default();
        ops.count(CqlOp::Lwt);
        ops.count(CqlOp::Batch);
        ops.count(CqlOp::Batch);
        assert_eq!(
            ops.by_kind(),
            [("read", 0), ("write", 0), ("lwt", 1), ("batch", 2)]
        );
        // Rows: one per write or LWT, one per statement of a batch, none per read or empty batch.
        let ops = CqlOps::default();
        ops.count(CqlOp::Read);
        ops.count(CqlOp::Write);
        ops.count(CqlOp::Lwt);
        ops.count_batch(5);
        ops.count_batch(0);
        assert_eq!(ops.rows_written(), 7);
        assert_eq!(
            ops.by_kind(),
            [("read", 1), ("write", 1), ("lwt", 1), ("batch", 2)]
        );
    }
}
