//! [`LeasedIds`]: minting only under a valid lease, on the embedded backend's lease table.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use zhibo_store::embedded::EmbeddedBackend;
use zhibo_store::leases::{Lease, LeaseTiming, LeasedIds, NodeLeases, Pool};
use zhibo_store::{Error, ErrorKind, Result};

/// The real lease table, with renewals that fail while `down` is set (the store unreachable).
struct Flaky {
    real: Arc<dyn NodeLeases>,
    down: AtomicBool,
}

#[async_trait]
impl NodeLeases for Flaky {
    async fn acquire(&self, pool: Pool, owner: &str, ttl: Duration, now_ms: i64) -> Result<Lease> {
        self.real.acquire(pool, owner, ttl, now_ms).await
    }
    async fn renew(&self, lease: &Lease, ttl: Duration, high_water_ms: i64) -> Result<()> {
        if self.down.load(Ordering::SeqCst) {
            return Err(Error::unavailable("connection refused"));
        }
        self.real.renew(lease, ttl, high_water_ms).await
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
    flaky.down.store(true, Ordering::SeqCst);
    let started = tokio::time::Instant::now();
    assert!(
        eventually(Duration::from_secs(3), || a.try_next().is_none()).await,
        "still minting 3 s after renewals stopped (ttl 2 s)"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "stopped early: {:?}",
        started.elapsed()
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
