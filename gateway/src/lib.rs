//! # Layout
//! - [`session`]: the I/O-free connection state machine (sign-in, heartbeat deadline, rate limit).
//! - [`conn`]: drives one session over any packet stream + [`frame::Frame`] sink; publishes commands to
//!   the bus; joins rooms (room record, hub, history).
//! - [`hub`]: registry of signed-in connections, per-user bus subscriptions, kicks, outbound policy,
//!   server-wide broadcast.
//! - [`rooms`]: live rooms — per-room subscription, batcher, shared encoded frames, online count.
//! - [`frame`]: a packet or a shared pre-encoded one, and the TCP/QUIC encoder for both.
//! - [`queue`]: a connection's bounded IM queue (of [`queue::Outbound`]), which holds no memory while empty.
//! - [`limits`]: before sign-in: the WebSocket `Origin` allow-list, unauthenticated connections per address.
//! - [`tcp`], [`ws`], [`quic`]: the three transports, thin adapters over [`conn::drive`].
//! - [`run`]: starts the listeners and drains them on shutdown.
//!
//! Inbound: socket → transport → session → bus `zhibo.cmd`. Outbound: bus `zhibo.user.<id>` /
//! `zhibo.gw.<id>` → hub → connection IM queue → socket; bus `zhibo.room.<id>` → room batcher → one
//! encoded frame → every viewer's room queue → socket.
#![warn(missing_docs)]

pub mod conn;
pub mod frame;
pub mod hub;
pub mod limits;
pub mod queue;
pub mod quic;
pub mod rooms;
pub mod session;
pub mod tcp;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, Instrument};
use zhibo_auth::TokenKey;
use zhibo_bus::Bus;
use zhibo_store::{DeviceStore, RoomStore};

pub use conn::{ReconnectHints, Shared};
pub use hub::Hub;
pub use rooms::RoomConfig;
pub use session::SessionConfig;

/// Gateway configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Unique id of this gateway in the cluster (letters, digits, `-`, `_`); random when empty.
    pub gateway_id: String,
    /// TCP listen address.
    pub tcp_addr: SocketAddr,
    /// WebSocket listen address.
    pub ws_addr: SocketAddr,
    /// QUIC (UDP) listen address.
    pub quic_addr: SocketAddr,
    /// PEM certificate chain for QUIC; a self-signed one is generated when unset.
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key for QUIC.
    pub tls_key: Option<std::path::PathBuf>,
    /// Largest frame accepted or sent, in bytes.
    pub max_frame: usize,
    /// Outbound packets queued per connection before it is closed as too slow.
    pub outbound_queue: usize,
    /// Heartbeat interval told to clients, seconds.
    pub heartbeat_interval_secs: u64,
    /// Silence after which a connection is closed, seconds.
    pub heartbeat_timeout_secs: u64,
    /// Commands per second per connection (sustained).
    pub rate_per_sec: f64,
    /// Command burst per connection.
    pub rate_burst: f64,
    /// Where TCP clients should reconnect when this gateway drains (`host:port`). Kept for backward
    /// compatibility: the TCP hint when `reconnect_hint_tcp` is empty.
    pub reconnect_hint: String,
    /// Where TCP clients should reconnect when this gateway drains (`host:port`; empty: no hint).
    pub reconnect_hint_tcp: String,
    /// Where WebSocket clients should reconnect when this gateway drains (a `ws://` or `wss://` URL).
    pub reconnect_hint_ws: String,
    /// Where QUIC clients should reconnect when this gateway drains (`host:port` of a UDP listener).
    pub reconnect_hint_quic: String,
    /// Live rooms one connection may be in at once.
    pub max_rooms_per_conn: usize,
    /// Room messages per second per connection (sustained).
    pub room_send_per_sec: f64,
    /// Room message burst per connection.
    pub room_send_burst: f64,
    /// Room frames queued per connection; a slow connection loses further room frames (never IM).
    pub room_queue: usize,
    /// Longest a room message waits to be batched with others, milliseconds.
    pub room_batch_ms: u64,
    /// Most messages in one room frame.
    pub room_batch_max: usize,
    /// How often this gateway reports its viewer count of each room, milliseconds.
    pub room_presence_ms: u64,
    /// Recent room messages handed to a joining viewer.
    pub room_recent: usize,
    /// `Origin` values (`scheme://host[:port]`) a WebSocket handshake may carry; another one gets
    /// HTTP 403. Empty = any (the dev default); set it when browsers connect.
    pub ws_allowed_origins: Vec<String>,
    /// Connections per client address (IPv6: per /64) that have not signed in yet, across TCP,
    /// WebSocket and QUIC; further ones are closed at once. 0 = no cap. Behind a proxy that hides
    /// client addresses every client shares one address: leave it 0 there.
    pub max_unauthenticated_per_ip: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            gateway_id: String::new(),
            tcp_addr: ([127, 0, 0, 1], 7001).into(),
            ws_addr: ([127, 0, 0, 1], 7002).into(),
            quic_addr: ([127, 0, 0, 1], 7003).into(),
            tls_cert: None,
            tls_key: None,
            max_frame: zhibo_proto::codec::DEFAULT_MAX_FRAME,
            outbound_queue: 1024,
            heartbeat_interval_secs: 30,
            heartbeat_timeout_secs: 100,
            rate_per_sec: 50.0,
            rate_burst: 100.0,
            reconnect_hint: String::new(),
            reconnect_hint_tcp: String::new(),
            reconnect_hint_ws: String::new(),
            reconnect_hint_quic: String::new(),
            max_rooms_per_conn: 8,
            room_send_per_sec: 5.0,
            room_send_burst: 10.0,
            room_queue: 64,
            room_batch_ms: 50,
            room_batch_max: 256,
            room_presence_ms: 2000,
            room_recent: 50,
            ws_allowed_origins: Vec::new(),
            max_unauthenticated_per_ip: 0,
        }
    }
}

impl GatewayConfig {
    /// Checks values that would otherwise fail later.
    ///
    /// # Errors
    /// A message naming the bad field.
    pub fn validate(&self) -> Result<(), String> {
        if !self.gateway_id.is_empty() && !zhibo_bus::subject::is_valid_token(&self.gateway_id) {
            return Err(format!(
                "gateway_id {:?}: use letters, digits, '-' and '_'",
                self.gateway_id
            ));
        }
        if self.max_frame < 64 || self.max_frame > 16 * 1024 * 1024 {
            return Err("max_frame must be between 64 B and 16 MiB".into());
        }
        if self.outbound_queue == 0 {
            return Err("outbound_queue must be at least 1".into());
        }
        if self.heartbeat_timeout_secs <= self.heartbeat_interval_secs {
            return Err("heartbeat_timeout_secs must exceed heartbeat_interval_secs".into());
        }
        if self.rate_per_sec <= 0.0 || self.rate_burst < 1.0 {
            return Err("rate_per_sec must be > 0 and rate_burst >= 1".into());
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err("set both tls_cert and tls_key, or neither".into());
        }
        if self.max_rooms_per_conn == 0 || self.room_queue == 0 || self.room_batch_max == 0 {
            return Err(
                "max_rooms_per_conn, room_queue and room_batch_max must be at least 1".into(),
            );
        }
        if self.room_send_per_sec <= 0.0 || self.room_send_burst < 1.0 {
            return Err("room_send_per_sec must be > 0 and room_send_burst >= 1".into());
        }
        let ws = &self.reconnect_hint_ws;
        if !(ws.is_empty() || ws.starts_with("ws://") || ws.starts_with("wss://")) {
            return Err("reconnect_hint_ws must be a ws:// or wss:// URL".into());
        }
        if self.room_batch_ms > 1000 || self.room_presence_ms < 100 {
            return Err(
                "room_batch_ms must be at most 1000 and room_presence_ms at least 100".into(),
            );
        }
        for origin in &self.ws_allowed_origins {
            limits::check_origin(origin)?;
        }
        Ok(())
    }

    fn session(&self) -> SessionConfig {
        SessionConfig {
            heartbeat_interval: Duration::from_secs(self.heartbeat_interval_secs),
            heartbeat_timeout: Duration::from_secs(self.heartbeat_timeout_secs),
            rate_per_sec: self.rate_per_sec,
            rate_burst: self.rate_burst,
            max_rooms: self.max_rooms_per_conn,
            room_send_per_sec: self.room_send_per_sec,
            room_send_burst: self.room_send_burst,
            ..SessionConfig::default()
        }
    }

    /// The GoAway reconnect hint of each transport (`reconnect_hint` is the TCP one when
    /// `reconnect_hint_tcp` is unset).
    pub fn reconnect_hints(&self) -> ReconnectHints {
        let tcp = if self.reconnect_hint_tcp.is_empty() {
            &self.reconnect_hint
        } else {
            &self.reconnect_hint_tcp
        };
        ReconnectHints {
            tcp: tcp.clone(),
            ws: self.reconnect_hint_ws.clone(),
            quic: self.reconnect_hint_quic.clone(),
        }
    }

    /// The live-room settings of the hub.
    pub fn room_config(&self) -> RoomConfig {
        RoomConfig {
            batch_window: Duration::from_millis(self.room_batch_ms),
            batch_max: self.room_batch_max,
            max_frame: self.max_frame,
            presence_interval: Duration::from_millis(self.room_presence_ms),
            ..RoomConfig::default()
        }
    }

    /// The configured gateway id, or a random one when none is.
    pub fn resolved_gateway_id(&self) -> String {
        if self.gateway_id.is_empty() {
            random_gateway_id()
        } else {
            self.gateway_id.clone()
        }
    }
}

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
        Ok(Listeners {
            tcp: TcpListener::bind(config.tcp_addr).await?,
            ws: TcpListener::bind(config.ws_addr).await?,
            quic: quic::endpoint(
                config.quic_addr,
                identity,
                Duration::from_secs(config.heartbeat_timeout_secs + 5),
            )?,
        })
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
}

/// Copies the room hub's viewer count and dropped-frame count into the metrics every 2 s.
async fn export_room_gauges(
    hub: Arc<Hub>,
    metrics: Arc<zhibo_telemetry::Metrics>,
    stop: CancellationToken,
) {
    let drops = metrics
        .queue_drops
        .get_or_create(&zhibo_telemetry::metrics::KindLabel { kind: "room_frame" })
        .clone();
    let mut exported = 0;
    loop {
        metrics.room_viewers.set(hub.rooms().total_viewers() as i64);
        let dropped = hub.room_frames_dropped();
        drops.inc_by(dropped.saturating_sub(exported));
        exported = dropped;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// A random gateway id, for when none is configured.
pub fn random_gateway_id() -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32))
        .unwrap_or(0);
    format!("gw-{:08x}{:04x}", n, std::process::id() & 0xffff)
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
    let span = tracing::info_span!("gateway", gateway_id = %hub.gateway_id());
    async move {
        let replies = hub.serve_replies().await?;
        let broadcast = hub.serve_broadcast().await?;
        let shared = Arc::new(Shared {
            hub: hub.clone(),
            session: Arc::new(config.session()),
            key: deps.key,
            devices: deps.devices,
            outbound_queue: config.outbound_queue,
            rooms: deps.rooms,
            room_queue: config.room_queue,
            room_recent: config.room_recent,
            max_frame: config.max_frame,
            shutdown: shutdown.clone(),
            reconnect_hints: config.reconnect_hints(),
            metrics: deps.metrics,
        });
        let tracker = TaskTracker::new();
        tokio::spawn(export_room_gauges(
            hub.clone(),
            shared.metrics.clone(),
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
                shared.clone(),
                limits.clone(),
                max,
                tracker.clone()
            ),
            ws::serve(
                listeners.ws,
                shared.clone(),
                limits.clone(),
                max,
                tracker.clone()
            ),
            quic::serve(
                listeners.quic.clone(),
                shared.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_hints_per_transport_with_the_old_key_as_tcp() {
        let mut c = GatewayConfig {
            reconnect_hint: "old:7001".into(),
            reconnect_hint_ws: "wss://gw.example/ws".into(),
            reconnect_hint_quic: "gw.example:7003".into(),
            ..GatewayConfig::default()
        };
        c.validate().expect("valid");
        let h = c.reconnect_hints();
        assert_eq!(h.for_transport("tcp"), "old:7001");
        assert_eq!(h.for_transport("ws"), "wss://gw.example/ws");
        assert_eq!(h.for_transport("quic"), "gw.example:7003");
        c.reconnect_hint_tcp = "new:7001".into();
        assert_eq!(c.reconnect_hints().tcp, "new:7001", "the new key wins");
        c.reconnect_hint_ws = "gw.example:7002".into();
        assert!(c.validate().is_err(), "a WebSocket hint must be a URL");
    }
}
