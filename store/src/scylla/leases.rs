//! [`NodeLeases`] on Cassandra / ScyllaDB: table `node_leases` (`sql/0003_node_leases.cql`).
//!
//! - claim: read the row at `SERIAL` (creating it with `INSERT ... IF NOT EXISTS` when missing); if
//!   `owner` is null, a conditional batch `UPDATE ... USING TTL <ttl> SET owner ... IF owner = null AND
//!   high_water_ms = <as read>` plus `UPDATE ... SET high_water_ms` (no TTL). The condition on the
//!   high-water makes the floor the claimant read the one it claims above;
//! - renew: the same batch with `IF owner = <me>`; it fails once the TTL has run out;
//! - release: `UPDATE ... SET owner = null ... IF owner = <me>` with the high-water actually minted to.

use std::time::Duration;

use async_trait::async_trait;
use scylla::client::session::Session;
use scylla::response::query_result::QueryResult;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::Consistency;
use scylla::value::{CqlValue, Row};

use super::{corrupt, corrupt_data, db_error, ScyllaBackend};
use crate::leases::{Lease, NodeLeases, Pool};
use crate::{Error, ErrorKind, Result};

/// The lease statements, prepared once.
pub(super) struct Statements {
    create: PreparedStatement,
    read: PreparedStatement,
    claim: PreparedStatement,
    renew: PreparedStatement,
    high_water: PreparedStatement,
    release: PreparedStatement,
}

impl Statements {
    pub(super) async fn prepare(session: &Session) -> Result<Self> {
        let p = |cql: &'static str| async move {
            session
                .prepare(cql)
                .await
                .map_err(|e| db_error(&format!("prepare `{cql}`"), e))
        };
        let mut read =
            p("SELECT owner, high_water_ms FROM node_leases WHERE pool = ? AND node = ?").await?;
        // Sees every committed Paxos round (claims and renewals are lightweight transactions).
        read.set_consistency(Consistency::Serial);
        Ok(Statements {
            create: p("INSERT INTO node_leases (pool, node, high_water_ms) VALUES (?, ?, 0) IF NOT EXISTS")
                .await?,
            read,
            claim: p("UPDATE node_leases USING TTL ? SET owner = ? WHERE pool = ? AND node = ? \
                      IF owner = null AND high_water_ms = ?")
                .await?,
            renew: p("UPDATE node_leases USING TTL ? SET owner = ? WHERE pool = ? AND node = ? IF owner = ?")
                .await?,
            high_water: p("UPDATE node_leases SET high_water_ms = ? WHERE pool = ? AND node = ?").await?,
            release: p("UPDATE node_leases SET owner = null WHERE pool = ? AND node = ? IF owner = ?").await?,
        })
    }
}

fn ttl_secs(ttl: Duration) -> i32 {
    i32::try_from(ttl.as_secs().max(1)).unwrap_or(i32::MAX)
}

fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
}

/// Whether a lightweight transaction (or conditional batch) applied.
fn applied(what: &str, result: QueryResult) -> Result<bool> {
    let rows = result.into_rows_result().map_err(|e| db_error(what, e))?;
    let row: Row = rows.first_row().map_err(|e| corrupt(what, e))?;
    match row.columns.first() {
        Some(Some(CqlValue::Boolean(applied))) => Ok(*applied),
        other => Err(corrupt_data(
            what,
            format!("no [applied] column: {other:?}"),
        )),
    }
}

impl ScyllaBackend {
    /// `(owner, high_water_ms)` of a number, creating its row (high-water 0) when missing.
    async fn lease_row(&self, pool: Pool, node: i32) -> Result<(Option<String>, i64)> {
        for _ in 0..2 {
            let row: Option<(Option<String>, Option<i64>)> = self
                .one("read node lease", &self.leases.read, (pool.name(), node))
                .await?;
            match row {
                Some((owner, hw)) => return Ok((owner, hw.unwrap_or(0))),
                None => {
                    self.exec(
                        "create node lease",
                        &self.leases.create,
                        (pool.name(), node),
                    )
                    .await?;
                }
            }
        }
        Err(Error::new(
            ErrorKind::Unavailable,
            "node lease row missing after creation",
        ))
    }

    async fn conditional_pair(
        &self,
        what: &str,
        first: &PreparedStatement,
        first_values: impl scylla::serialize::row::SerializeRow,
        high_water: (i64, &str, i32),
    ) -> Result<bool> {
        let mut batch = Batch::new(BatchType::Logged);
        batch.append_statement(first.clone());
        batch.append_statement(self.leases.high_water.clone());
        super::count_batch(batch.statements.len());
        let result = self
            .session
            .batch(&batch, (first_values, high_water))
            .await
            .map_err(|e| db_error(what, e))?;
        applied(what, result)
    }
}

#[async_trait]
impl NodeLeases for ScyllaBackend {
    async fn acquire(&self, pool: Pool, owner: &str, ttl: Duration, now_ms: i64) -> Result<Lease> {
        let size = pool.size();
        let start = rand::random::<u32>() % size;
        for i in 0..size {
            let node = (start + i) % size;
            let n = node as i32;
            let (holder, floor) = self.lease_row(pool, n).await?;
            if holder.is_some() {
                continue;
            }
            let ceiling = now_ms.max(floor).saturating_add(ttl_ms(ttl));
            let claimed = self
                .conditional_pair(
                    "claim node lease",
                    &self.leases.claim,
                    (ttl_secs(ttl), owner, pool.name(), n, floor),
                    (ceiling, pool.name(), n),
                )
                .await?;
            if claimed {
                return Ok(Lease {
                    pool,
                    node,
                    owner: owner.to_owned(),
                    floor_ms: floor,
                    ceiling_ms: ceiling,
                });
            }
        }
        Err(Error::new(
            ErrorKind::Conflict,
            format!("every {} node number is leased", pool.name()),
        ))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration, high_water_ms: i64) -> Result<()> {
        let n = lease.node as i32;
        let pool = lease.pool.name();
        let renewed = self
            .conditional_pair(
                "renew node lease",
                &self.leases.renew,
                (
                    ttl_secs(ttl),
                    lease.owner.as_str(),
                    pool,
                    n,
                    lease.owner.as_str(),
                ),
                (high_water_ms, pool, n),
            )
            .await?;
        if renewed {
            Ok(())
        } else {
            Err(Error::new(ErrorKind::Conflict, "node lease not held"))
        }
    }

    async fn release(&self, lease: &Lease, high_water_ms: i64) -> Result<()> {
        let n = lease.node as i32;
        let pool = lease.pool.name();
        // Not applied = no longer ours: nothing to give back.
        self.conditional_pair(
            "release node lease",
            &self.leases.release,
            (pool, n, lease.owner.as_str()),
            (high_water_ms, pool, n),
        )
        .await?;
        Ok(())
    }
}
