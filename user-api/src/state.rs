//! [`AppState`]: what every handler shares (config, stores, token key, logic, limiter), cheap to clone.

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use zhibo_auth::TokenKey;
use zhibo_logic::Logic;
use zhibo_store::leases::{LeaseTiming, LeasedIds, Pool};
use zhibo_store::Stores;

use crate::rate_limit::SlidingWindow;
use crate::{ApiConfig, Deps};

/// Shared handler state.
#[derive(Clone)]
pub(crate) struct AppState(Arc<Inner>);

pub(crate) struct Inner {
    pub(crate) config: ApiConfig,
    pub(crate) stores: Stores,
    pub(crate) key: Arc<TokenKey>,
    pub(crate) logic: Arc<Logic>,
    pub(crate) ready: Arc<dyn Fn() -> bool + Send + Sync>,
    /// Device, user and group ids.
    pub(crate) ids: EntityIds,
    /// Sign-in attempts, keyed `u:<username>` and `ip:<address>`.
    pub(crate) sign_in_limit: SlidingWindow,
    /// HMAC tag of the admin secret; `None` when the admin API is disabled.
    pub(crate) admin_tag: Option<Vec<u8>>,
    /// Bounds concurrent argon2 work to the number of cores, so a burst of sign-ins queues instead of
    /// filling the blocking pool with memory-hungry hashes.
    pub(crate) hashing: Semaphore,
}

impl AppState {
    pub(crate) fn new(config: ApiConfig, deps: Deps) -> Self {
        let admin_tag =
            (!config.admin_secret.is_empty()).then(|| crate::auth::admin_tag(&config.admin_secret));
        let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
        // Entity ids need a node number of the pool of 32 that no other replica holds: leased.
        let ids = EntityIds(LeasedIds::start(
            deps.stores.leases.clone(),
            Pool::Entities,
            LeaseTiming::default(),
        ));
        AppState(Arc::new(Inner {
            sign_in_limit: SlidingWindow::new(config.sign_in_per_minute, Duration::from_secs(60)),
            config,
            stores: deps.stores,
            key: deps.key,
            logic: deps.logic,
            ready: deps.ready,
            ids,
            admin_tag,
            hashing: Semaphore::new(cores),
        }))
    }
}

/// Entity ids (< 2^53) under a leased node number (see `zhibo_store::ids`).
pub(crate) struct EntityIds(LeasedIds);

impl EntityIds {
    /// The next id; `UNAVAILABLE` (503) while no valid lease is held.
    pub(crate) async fn next_i64(&self) -> Result<i64, zhibo_store::Error> {
        // Entity ids stay below 2^53, so the cast is exact.
        self.0.next().await.map(|id| id as i64)
    }

    /// Gives the leased node number back (shutdown).
    pub(crate) async fn release(&self) {
        self.0.release().await;
    }
}

impl Deref for AppState {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.0
    }
}
