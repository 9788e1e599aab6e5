//! [`NodeLeases`] on redb. One process owns the database file (redb locks it), so the only claimants
//! are this process's own generators; the table still implements the full lease semantics (expiry,
//! owner checks, a high-water that outlives the lease) so the conformance suite holds here too, and a
//! restart never mints below the high-water recorded before it (the table is on disk).

use std::time::Duration;

use async_trait::async_trait;
use redb::ReadableTable;

use super::{Db, EmbeddedBackend};
use crate::ids::now_ms;
use crate::leases::{Lease, NodeLeases, Pool};
use crate::{Error, ErrorKind, Result};

fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
}

#[async_trait]
impl NodeLeases for EmbeddedBackend {
    async fn acquire(
        &self,
        pool: Pool,
        owner: &str,
        ttl: Duration,
        claimant_now_ms: i64,
    ) -> Result<Lease> {
        let owner = owner.to_owned();
        let ttl = ttl_ms(ttl);
        self.write(move |t| {
            let now = now_ms();
            for node in 0..pool.size() {
                let current = t.node_leases.get((pool.name(), node)).db()?.map(|v| {
                    let (o, expires, hw) = v.value();
                    (o.to_owned(), expires, hw)
                });
                let floor = match current {
                    Some((o, expires, _)) if expires > now && o != owner => continue,
                    Some((_, _, hw)) => hw,
                    None => 0,
                };
                let ceiling = claimant_now_ms.max(floor).saturating_add(ttl);
                t.node_leases
                    .insert((pool.name(), node), (owner.as_str(), now + ttl, ceiling))
                    .db()?;
                return Ok(Lease {
                    pool,
                    node,
                    owner: owner.clone(),
                    floor_ms: floor,
                    ceiling_ms: ceiling,
                });
            }
            Err(Error::new(
                ErrorKind::Conflict,
                format!("every {} node number is leased", pool.name()),
            ))
        })
        .await
    }

    async fn renew(&self, lease: &Lease, ttl: Duration, high_water_ms: i64) -> Result<()> {
        let (pool, node, owner) = (lease.pool, lease.node, lease.owner.clone());
        let ttl = ttl_ms(ttl);
        self.write(move |t| {
            let now = now_ms();
            let hw = match t.node_leases.get((pool.name(), node)).db()? {
                Some(v) => {
                    let (o, expires, hw) = v.value();
                    if o != owner || expires <= now {
                        return Err(Error::new(ErrorKind::Conflict, "lease not held"));
                    }
                    hw
                }
                None => return Err(Error::new(ErrorKind::Conflict, "lease not held")),
            };
            t.node_leases
                .insert(
                    (pool.name(), node),
                    (owner.as_str(), now + ttl, hw.max(high_water_ms)),
                )
                .db()?;
            Ok(())
        })
        .await
    }

    async fn release(&self, lease: &Lease, high_water_ms: i64) -> Result<()> {
        let (pool, node, owner) = (lease.pool, lease.node, lease.owner.clone());
        self.write(move |t| {
            let mine = t
                .node_leases
                .get((pool.name(), node))
                .db()?
                .is_some_and(|v| v.value().0 == owner);
            if mine {
                t.node_leases
                    .insert((pool.name(), node), ("", i64::MIN, high_water_ms))
                    .db()?;
            }
            Ok(())
        })
        .await
    }
}
