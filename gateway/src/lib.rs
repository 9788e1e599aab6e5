//! # Layout
//! - [`session`]: the I/O-free connection state machine (sign-in, heartbeat deadline, rate limit).
//! - [`config`]: [`GatewayConfig`] (every default in its `Default`) and the settings derived from it.
//! - [`context`]: [`GatewayContext`], what every connection of the gateway shares.
//! - [`conn`]: drives one session over any packet stream + [`frame::Frame`] sink; publishes commands to
//!   the bus; joins rooms (room record, hub, history).
//! - [`hub`]: registry of signed-in connections, their users' presence entries, user events routed
//!   here, kicks, outbound policy,
//!   server-wide broadcast.
//! - [`room_state`]: one live room without I/O — batching, online count, late joiners (fake-clock tests).
//! - [`rooms`]: live rooms' I/O — per-room subscription and task around a [`room_state::RoomState`].
//! - [`frame`]: a packet or a shared pre-encoded one, and the TCP/QUIC encoder for both.
//! - [`queue`]: a connection's bounded IM queue (of [`queue::Outbound`]), which holds no memory while empty.
//! - [`limits`]: before sign-in: the WebSocket `Origin` allow-list, unauthenticated connections per address.
//! - `listen`: the one accept loop of the three listeners (address cap, `conn_id`, `conn` span).
//! - [`tcp`], [`ws`], [`quic`]: the three transports, thin adapters over [`conn::drive`].
//! - [`run`]: starts the listeners and drains them on shutdown.
//!
//! Inbound: socket → transport → session → bus `zhibo.cmd`. Outbound: bus `zhibo.gwu.<id>` (events for
//! this gateway's users, routed by presence) / `zhibo.users` / `zhibo.gw.<id>` → hub → connection IM queue → socket; bus `zhibo.room.<id>` → room batcher → one
//! encoded frame → written to every viewer's socket or QUIC stream by the room (`direct`).
#![warn(missing_docs)]

pub mod config;
pub mod conn;
pub mod context;
pub mod direct;
pub mod frame;
pub mod hub;
pub mod limits;
mod listen;
pub mod queue;
pub mod quic;
pub mod room_state;
pub mod rooms;
pub mod session;
pub mod tcp;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, Instrument};
use zhibo_auth::TokenKey;
use zhibo_bus::Bus;
use zhibo_store::{DeviceStore, RoomStore};

pub use config::{random_gateway_id, GatewayConfig, ReconnectHints};
pub use context::GatewayContext;
pub use hub::Hub;
pub use rooms::RoomConfig;
pub use session::SessionConfig;

/// The gateway's bound sockets, so tests can bind port 0 and read the real addresses.
#[derive(Debug)]
pub struct Listeners {
    /// TCP.
    pub tcp: TcpListener,
    /// WebSocket.
    pub ws: TcpListener,
    /// QUIC.
    pub quic: quinn::Endpoint,
}

impl Listeners {
    /// Binds every listener of `config`.
    ///
    /// # Errors
    /// When a port is taken or TLS material is bad.
    pub async fn bind(config: &GatewayConfig) -> anyhow::Result<Self> {
        let identity = match (&config.tls_cert, &config.tls_key) {
            (Some(c), Some(k)) => quic::TlsIdentity::from_pem_files(c, k)?,
            _ => quic::TlsIdentity::self_signed()?,
        };
        // Each error names the listener's configuration key and address: "address in use" alone does
        // not say which of three ports is taken.
        let tcp = TcpListener::bind(config.tcp_addr)
            .await
            .with_context(|| format!("gateway.tcp_addr {}", config.tcp_addr))?;
        let ws = TcpListener::bind(config.ws_addr)
            .await
            .with_context(|| format!("gateway.ws_addr {}", config.ws_addr))?;
        let quic = quic::endpoint(
            config.quic_addr,
            identity,
            Duration::from_secs(config.heartbeat_timeout_secs + 5),
        )
        .with_context(|| format!("gateway.quic_addr {} (UDP)", config.quic_addr))?;
        Ok(Listeners { tcp, ws, quic })
    }

    /// The addresses actually bound (tcp, ws, quic).
    ///
    /// # Errors
    /// When a socket has no local address.
    pub fn addrs(&self) -> std::io::Result<(SocketAddr, SocketAddr, SocketAddr)> {
        Ok((
            self.tcp.local_addr()?,
            self.ws.local_addr()?,
            self.quic.local_addr()?,
        ))
    }
}

/// What the gateway needs from the rest of the system.
#[derive(Clone)]
pub struct Deps {
    /// The bus.
    pub bus: Arc<dyn Bus>,
    /// Device records (token revocation).
    pub devices: Arc<dyn DeviceStore>,
    /// Room records and recent history (joins).
    pub rooms: Arc<dyn RoomStore>,
    /// Token key shared with user-api.
    pub key: Arc<TokenKey>,
    /// Process metrics.
    pub metrics: Arc<zhibo_telemetry::Metrics>,
    /// Where users' first and last connections are recorded: routes their events to this gateway (and
    /// tells push who is offline). The logic workers must read the same one (in-process in embedded
    /// mode, Redis otherwise).
    pub presence: Arc<dyn zhibo_store::Presence>,
}

/// Copies the room hub's viewer count, dropped-frame count and shaping counts (sampled and dropped per
/// class, likes merged) into the metrics every 2 s.
async fn export_room_gauges(
    hub: Arc<Hub>,
    metrics: Arc<zhibo_telemetry::Metrics>,
    stop: CancellationToken,
) {
    let drops = metrics
        .queue_drops
        .get_or_create(&zhibo_telemetry::metrics::KindLabel { kind: "room_frame" })
        .clone();
    let kind = |kind| zhibo_telemetry::metrics::KindLabel { kind };
    let sampled_chat = metrics.room_sampled.get_or_create(&kind("chat")).clone();
    let [dropped_high, dropped_chat, dropped_like] =
        ["high", "chat", "like"].map(|k| metrics.room_dropped.get_or_create(&kind(k)).clone());
    let mut exported = 0;
    let mut shaped = crate::rooms::ShapeCounts::default();
    loop {
        metrics.room_viewers.set(hub.rooms().total_viewers() as i64);
        let dropped = hub.room_frames_dropped();
        drops.inc_by(dropped.saturating_sub(exported));
        exported = dropped;
        let now = hub.rooms().shape_counts();
        sampled_chat.inc_by(now.chat_sampled.saturating_sub(shaped.chat_sampled));
        dropped_high.inc_by(now.high_dropped.saturating_sub(shaped.high_dropped));
        dropped_chat.inc_by(now.chat_dropped.saturating_sub(shaped.chat_dropped));
        dropped_like.inc_by(now.like_dropped.saturating_sub(shaped.like_dropped));
        metrics
            .room_likes_merged
            .inc_by(now.likes_merged.saturating_sub(shaped.likes_merged));
        shaped = now;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// Runs the gateway on `listeners` until `shutdown` is cancelled, then tells every client to go away and
/// waits (up to `grace`) for connections to finish.
///
/// # Errors
/// When the gateway's reply subscription is refused by the bus.
pub async fn run(
    config: GatewayConfig,
    listeners: Listeners,
    deps: Deps,
    shutdown: CancellationToken,
    grace: Duration,
) -> anyhow::Result<()> {
    let hub = Hub::with_rooms(
        config.resolved_gateway_id(),
        deps.bus.clone(),
        config.room_config(),
    );
    serve(hub, config, listeners, deps, shutdown, grace).await
}

/// [`run`] with a hub built by the caller (tests read its counters); `hub` must be on `deps.bus`.
///
/// # Errors
/// When the gateway's reply or broadcast subscription is refused by the bus.
pub async fn serve(
    hub: Arc<Hub>,
    config: GatewayConfig,
    listeners: Listeners,
    deps: Deps,
    shutdown: CancellationToken,
    grace: Duration,
) -> anyhow::Result<()> {
    hub.set_presence(deps.presence.clone());
    let span = tracing::info_span!("gateway", gateway_id = %hub.gateway_id());
    async move {
        hub.serve_user_events().await?;
        let replies = hub.serve_replies().await?;
        let broadcast = hub.serve_broadcast().await?;
        let config = Arc::new(config);
        let ctx = Arc::new(GatewayContext::new(
            config.clone(),
            hub.clone(),
            deps,
            shutdown.clone(),
        ));
        let tracker = TaskTracker::new();
        tokio::spawn(export_room_gauges(
            hub.clone(),
            ctx.metrics.clone(),
            shutdown.clone(),
        ));
        let (tcp, ws, quic_addr) = listeners.addrs()?;
        info!(%tcp, %ws, quic = %quic_addr, "gateway listening");
        let max = config.max_frame;
        let limits = limits::EdgeLimits::new(
            &config.ws_allowed_origins,
            config.max_unauthenticated_per_ip,
        );
        let accept = tokio::join!(
            tcp::serve(
                listeners.tcp,
                ctx.clone(),
                limits.clone(),
                max,
                tracker.clone()
            ),
            ws::serve(
                listeners.ws,
                ctx.clone(),
                limits.clone(),
                max,
                tracker.clone()
            ),
            quic::serve(
                listeners.quic.clone(),
                ctx.clone(),
                limits,
                max,
                tracker.clone()
            ),
        );
        let () = accept.0;
        tracker.close();
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!("connections still open after the grace period");
        }
        quic::close(listeners.quic).await;
        replies.abort();
        broadcast.abort();
        info!("gateway stopped");
        Ok(())
    }
    .instrument(span)
    .await
}
