//! [`GatewayContext`]: what every connection of a gateway shares (its configuration, hub, stores, key,
//! shutdown token and metrics).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use zhibo_auth::TokenKey;
use zhibo_store::{DeviceStore, RoomStore};
use zhibo_telemetry::Metrics;

use crate::config::{GatewayConfig, ReconnectHints};
use crate::hub::Hub;
use crate::session::SessionConfig;

/// Everything a connection needs, shared by all connections of a gateway.
pub struct GatewayContext {
    /// The gateway's configuration (queue lengths, frame size, room history length …).
    pub config: Arc<GatewayConfig>,
    /// Registry and bus.
    pub hub: Arc<Hub>,
    /// Session limits (from `config`).
    pub session: Arc<SessionConfig>,
    /// Where clients should reconnect when this gateway drains, per transport (from `config`).
    pub reconnect_hints: ReconnectHints,
    /// Token key.
    pub key: Arc<TokenKey>,
    /// Device records, for token revocation.
    pub devices: Arc<dyn DeviceStore>,
    /// Room records and recent history, for joins.
    pub rooms: Arc<dyn RoomStore>,
    /// Cancelled when the gateway drains.
    pub shutdown: CancellationToken,
    /// Process metrics.
    pub metrics: Arc<Metrics>,
}

impl GatewayContext {
    /// The context of a gateway with `config`, `hub` and the rest of the system in `deps`.
    pub fn new(
        config: Arc<GatewayConfig>,
        hub: Arc<Hub>,
        deps: crate::Deps,
        shutdown: CancellationToken,
    ) -> Self {
        GatewayContext {
            session: Arc::new(config.session()),
            reconnect_hints: config.reconnect_hints(),
            config,
            hub,
            key: deps.key,
            devices: deps.devices,
            rooms: deps.rooms,
            shutdown,
            metrics: deps.metrics,
        }
    }
}

impl std::fmt::Debug for GatewayContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayContext")
            .field("hub", &self.hub)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}
