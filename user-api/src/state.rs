//! [`AppState`]: what every handler shares (config, stores, token key, logic, limiter), cheap to clone.

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use zhibo_auth::TokenKey;
use zhibo_logic::Logic;
use zhibo_store::leases::{LeaseTiming, LeasedIds, Pool};
use zhibo_store::Stores;

use crate::client_ip::{ClientIpConfig, Networks};
use crate::rate_limit::{FailureBackoff, SlidingWindow};
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
    /// Failed sign-ins, keyed `u:<username>|<address>` and `ip:<address>`.
    pub(crate) sign_in_limit: FailureBackoff,
    /// Failed sign-ins per address across usernames (3 × the per-user budget).
    pub(crate) ip_sign_in_limit: FailureBackoff,
    /// Sign-ups per client address.
    pub(crate) sign_up_limit: SlidingWindow,
    /// Device registrations per client address.
    pub(crate) device_limit: SlidingWindow,
    /// Where the client address comes from.
    pub(crate) client_ip: ClientIpConfig,
    /// HMAC tag of the admin secret; `None` when the admin API is disabled.
    pub(crate) admin_tag: Option<Vec<u8>>,
    /// Bounds concurrent argon2 verification (sign-in) to the number of cores, so a burst of sign-ins
    /// queues instead of filling the blocking pool with memory-hungry hashes.
    pub(crate) hashing: Semaphore,
    /// A separate, smaller budget for sign-up hashing: a sign-up flood queues here and never holds a
    /// permit a sign-in waits for.
    pub(crate) sign_up_hashing: Semaphore,
    /// The PHC string unknown users are verified against (see `auth::verify_password`), built at start
    /// so the first unknown-user sign-in is not slower than the next (timing would reveal the user).
    pub(crate) dummy_hash: String,
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
            sign_in_limit: FailureBackoff::new(
                config.sign_in_per_minute,
                Duration::from_secs(1),
                Duration::from_secs(config.sign_in_max_backoff_secs),
            ),
            ip_sign_in_limit: FailureBackoff::new(
                config.sign_in_per_minute.saturating_mul(3),
                Duration::from_secs(1),
                Duration::from_secs(config.sign_in_max_backoff_secs),
            ),
            sign_up_limit: SlidingWindow::new(config.sign_ups_per_hour, Duration::from_secs(3600)),
            device_limit: SlidingWindow::new(config.devices_per_hour, Duration::from_secs(3600)),
            client_ip: ClientIpConfig {
                header: config.client_ip_header.to_ascii_lowercase(),
                // Checked by `ApiConfig::validate`; an unchecked bad list trusts nobody.
                proxies: Networks::parse(&config.trusted_proxies).unwrap_or_default(),
            },
            dummy_hash: crate::auth::dummy_hash(),
            config,
            stores: deps.stores,
            key: deps.key,
            logic: deps.logic,
            ready: deps.ready,
            ids,
            admin_tag,
            hashing: Semaphore::new(cores),
            sign_up_hashing: Semaphore::new(cores.div_ceil(2)),
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
