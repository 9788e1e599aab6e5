//! [`LeasedIds`]: minting only under a valid lease, on the embedded backend's lease table.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use zhibo_store::embedded::EmbeddedBackend;
use zhibo_store::leases::{Lease, LeaseTiming, LeasedIds, NodeLeases, Pool};
use zhibo_store::{Error, ErrorKind, Result};

/// The real lease table, with renewals that fail while `down` is set (the store unreachable).
struct Flaky {
    real: Arc<dyn NodeLeases>,
    down: AtomicBool,
    /// Per node number: when the last claim or renewal that succeeded was asked for (the holder's
    /// deadline counts from before it).
    last_renewed: Mutex<HashMap<u32, tokio::time::Instant>>,
}

#[async_trait]
impl NodeLeases for Flaky {
    async fn acquire(&self, pool: Pool, owner: &str, ttl: Duration, now_ms: i64) -> Result<Lease> {
        let asked = tokio::time::Instant::now();
        let lease = self.real.acquire(pool, owner, ttl, now_ms).await?;
        self.last_renewed
            .lock()
            .expect("lock")
            .insert(lease.node, asked);
        Ok(lease)
    }
    async fn renew(&self, lease: &Lease, ttl: Duration, high_water_ms: i64) -> Result<()> {
        if self.down.load(Ordering::SeqCst) {
            return Err(Error::unavailable("connection refused"));
        }
        let asked = tokio::time::Instant::now();
        self.real.renew(lease, ttl, high_water_ms).await?;
        self.last_renewed
            .lock()
            .expect("lock")
            .insert(lease.node, asked);
        Ok(())
    }
    async fn release(&self, lease: &Lease, high_water_ms: i64) -> Result<()> {
        self.real.release(lease, high_water_ms).await
    }
}

/// Polls `cond` every 20 ms until true or `within` passes.
async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let until = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < until {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

#[tokio::test]
async fn a_holder_that_cannot_renew_stops_minting_at_its_deadline_and_resumes_after() {
    let backend = Arc::new(EmbeddedBackend::temporary().expect("store"));
    let flaky = Arc::new(Flaky {
        real: backend.stores().leases,
        down: AtomicBool::new(false),
        last_renewed: Mutex::new(HashMap::new()),
    });
    let timing = LeaseTiming {
        ttl: Duration::from_secs(2),
        renew_every: Duration::from_millis(200),
        margin: Duration::from_millis(500),
        wait: Duration::from_millis(300),
    };
    let a = LeasedIds::start(flaky.clone(), Pool::Messages, timing);
    let b = LeasedIds::start(flaky.clone(), Pool::Messages, timing);
    let (ida, idb) = (
        a.next().await.expect("a mints"),
        b.next().await.expect("b mints"),
    );
    assert_ne!(a.node(), b.node(), "two holders, two numbers");
    assert_ne!(ida, idb);

    // The store goes away: renewals fail, and minting stops by ttl - margin after the last renewal.
    let a_node = u32::try_from(a.node().expect("a holds a number")).expect("a node number");
    flaky.down.store(true, Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(3), || a.try_next().is_none()).await,
        "still minting 3 s after renewals stopped (ttl 2 s)"
    );
    // Not before ttl - margin (1.5 s) from the last renewal that succeeded, however late that one was on
    // a loaded machine (its request was sent by then; 50 ms for the holder's clock read before it).
    let last = *flaky
        .last_renewed
        .lock()
        .expect("lock")
        .get(&a_node)
        .expect("claimed");
    assert!(
        last.elapsed() >= Duration::from_millis(1450),
        "stopped early: {:?} after the last renewal",
        last.elapsed()
    );
    let e = a.next().await.expect_err("no valid lease");
    assert_eq!(e.kind, ErrorKind::Unavailable, "{e}");

    // Back: the holder renews (or claims again) and mints again, above everything it minted.
    let last = ida.max(idb);
    flaky.down.store(false, Ordering::SeqCst);
    let mut again = None;
    assert!(
        eventually(Duration::from_secs(3), || {
            again = a.try_next();
            again.is_some()
        })
        .await,
        "minting resumes within 3 s of the store coming back"
    );
    let again = again.expect("minted");
    assert!(again > ida, "ids keep increasing: {again} after {last}");
}
