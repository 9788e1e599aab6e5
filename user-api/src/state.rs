//! [`AppState`]: what every handler shares (config, stores, token key, logic, limiter), cheap to clone.

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use zhibo_auth::TokenKey;
use zhibo_logic::Logic;
use zhibo_store::ids::{now_ms, IdGen};
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
    pub(crate) ids: IdGen,
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
        // No node id in the config: a random one makes a clash need two replicas drawing the same of 32
        // numbers and then the same millisecond and sequence.
        let node = rand::random::<u64>() ^ now_ms() as u64;
        AppState(Arc::new(Inner {
            sign_in_limit: SlidingWindow::new(config.sign_in_per_minute, Duration::from_secs(60)),
            config,
            stores: deps.stores,
            key: deps.key,
            logic: deps.logic,
            ready: deps.ready,
            ids: IdGen::entities(node),
            admin_tag,
            hashing: Semaphore::new(cores),
        }))
    }
}

impl Deref for AppState {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.0
    }
}
