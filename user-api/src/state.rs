//! [`AppState`]: what every handler shares (config, stores, authentication, logic, limiters), cheap to
//! clone. Extractors take only their part of it through `FromRef` ([`AuthState`], [`ClientIpConfig`]).

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRef;
use zhibo_logic::Logic;
use zhibo_store::leases::{LeaseTiming, LeasedIds, Pool};
use zhibo_store::Stores;

use crate::auth::AuthState;
use crate::client_ip::{ClientIpConfig, Networks};
use crate::rate_limit::{FailureBackoff, SlidingWindow};
use crate::{ApiConfig, Deps};

/// Shared handler state.
#[derive(Clone)]
pub(crate) struct AppState(Arc<Inner>);

pub(crate) struct Inner {
    pub(crate) config: ApiConfig,
    pub(crate) stores: Stores,
    /// Tokens, device checks, the admin secret and password hashing.
    pub(crate) auth: AuthState,
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
    pub(crate) client_ip: Arc<ClientIpConfig>,
}

impl AppState {
    pub(crate) fn new(config: ApiConfig, deps: Deps) -> Self {
        let auth = AuthState::new(deps.key, deps.stores.devices.clone(), &config.admin_secret);
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
            client_ip: Arc::new(ClientIpConfig {
                header: config.client_ip_header.to_ascii_lowercase(),
                // Checked by `ApiConfig::validate`; an unchecked bad list trusts nobody.
                proxies: Networks::parse(&config.trusted_proxies).unwrap_or_default(),
            }),
            config,
            stores: deps.stores,
            auth,
            logic: deps.logic,
            ready: deps.ready,
            ids,
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

    /// Whether ids are minted without waiting: a valid node lease is held (readiness).
    pub(crate) fn ready(&self) -> bool {
        self.0.holds_lease()
    }

    /// Gives the leased node number back (shutdown).
    pub(crate) async fn release(&self) {
        self.0.release().await;
    }
}

impl FromRef<AppState> for AuthState {
    fn from_ref(state: &AppState) -> Self {
        state.auth.clone()
    }
}

impl FromRef<AppState> for Arc<ClientIpConfig> {
    fn from_ref(state: &AppState) -> Self {
        state.client_ip.clone()
    }
}

impl Deref for AppState {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.0
    }
}
