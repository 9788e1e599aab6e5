//! The gateway's configuration ([`GatewayConfig`], one serde struct whose `Default` holds every default)
//! and the settings derived from it for the session, the rooms and the GoAway hints.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::rooms::RoomConfig;
use crate::session::SessionConfig;

/// Gateway configuration. Its `Default` is the one place the gateway's defaults are written:
/// [`SessionConfig::default`] and [`RoomConfig::default`] derive from it. `Debug` shows no key
/// material (the TLS key's path is shown only as set or not).
#[derive(Clone, Deserialize)]
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
    /// Room frames owed to a connection's socket or QUIC stream at most; a slow connection loses
    /// further room frames (never IM).
    pub room_queue: usize,
    /// Longest a room message waits to be batched with others, milliseconds: the window of a room at or
    /// above `room_batch_load`. A quieter room waits less, and the first message after an idle gap not at
    /// all (adaptive batching, see `room_state`).
    pub room_batch_ms: u64,
    /// Deliveries per second (a room's message rate × its viewers on this gateway) at which the room's
    /// batch window reaches `room_batch_ms`; below it the window shrinks in proportion.
    pub room_batch_load: f64,
    /// Viewers of a room on this gateway above which its full window (`room_batch_ms`) grows in
    /// proportion to them, up to `room_batch_max_ms`: a crowded room's frame writes per second (one
    /// syscall per viewer per frame) stay near `room_batch_viewers × 1000 / room_batch_ms`.
    pub room_batch_viewers: usize,
    /// Longest batch window of a crowded room, milliseconds (at most 1000; a value below
    /// `room_batch_ms` means `room_batch_ms`: the window does not grow with the audience).
    pub room_batch_max_ms: u64,
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
            room_batch_load: 200_000.0,
            room_batch_viewers: 2000,
            room_batch_max_ms: 250,
            room_batch_max: 256,
            room_presence_ms: 2000,
            room_recent: 50,
            ws_allowed_origins: Vec::new(),
            max_unauthenticated_per_ip: 0,
        }
    }
}

impl std::fmt::Debug for GatewayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Written out (no `..`) so a new field has to be placed here, shown or hidden on purpose.
        let GatewayConfig {
            gateway_id,
            tcp_addr,
            ws_addr,
            quic_addr,
            tls_cert,
            tls_key,
            max_frame,
            outbound_queue,
            heartbeat_interval_secs,
            heartbeat_timeout_secs,
            rate_per_sec,
            rate_burst,
            reconnect_hint,
            reconnect_hint_tcp,
            reconnect_hint_ws,
            reconnect_hint_quic,
            max_rooms_per_conn,
            room_send_per_sec,
            room_send_burst,
            room_queue,
            room_batch_ms,
            room_batch_load,
            room_batch_viewers,
            room_batch_max_ms,
            room_batch_max,
            room_presence_ms,
            room_recent,
            ws_allowed_origins,
            max_unauthenticated_per_ip,
        } = self;
        f.debug_struct("GatewayConfig")
            .field("gateway_id", gateway_id)
            .field("tcp_addr", tcp_addr)
            .field("ws_addr", ws_addr)
            .field("quic_addr", quic_addr)
            .field("tls_cert", tls_cert)
            .field("tls_key", &tls_key.as_ref().map(|_| "<set, not shown>"))
            .field("max_frame", max_frame)
            .field("outbound_queue", outbound_queue)
            .field("heartbeat_interval_secs", heartbeat_interval_secs)
            .field("heartbeat_timeout_secs", heartbeat_timeout_secs)
            .field("rate_per_sec", rate_per_sec)
            .field("rate_burst", rate_burst)
            .field("reconnect_hint", reconnect_hint)
            .field("reconnect_hint_tcp", reconnect_hint_tcp)
            .field("reconnect_hint_ws", reconnect_hint_ws)
            .field("reconnect_hint_quic", reconnect_hint_quic)
            .field("max_rooms_per_conn", max_rooms_per_conn)
            .field("room_send_per_sec", room_send_per_sec)
            .field("room_send_burst", room_send_burst)
            .field("room_queue", room_queue)
            .field("room_batch_ms", room_batch_ms)
            .field("room_batch_load", room_batch_load)
            .field("room_batch_viewers", room_batch_viewers)
            .field("room_batch_max_ms", room_batch_max_ms)
            .field("room_batch_max", room_batch_max)
            .field("room_presence_ms", room_presence_ms)
            .field("room_recent", room_recent)
            .field("ws_allowed_origins", ws_allowed_origins)
            .field("max_unauthenticated_per_ip", max_unauthenticated_per_ip)
            .finish()
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
        if !(self.room_batch_load.is_finite() && self.room_batch_load > 0.0) {
            return Err("room_batch_load must be > 0".into());
        }
        if self.room_batch_ms > 1000 || self.room_presence_ms < 100 {
            return Err(
                "room_batch_ms must be at most 1000 and room_presence_ms at least 100".into(),
            );
        }
        if self.room_batch_max_ms > 1000 {
            return Err("room_batch_max_ms must be at most 1000".into());
        }
        if self.room_batch_viewers == 0 {
            return Err("room_batch_viewers must be at least 1".into());
        }
        for origin in &self.ws_allowed_origins {
            crate::limits::check_origin(origin)?;
        }
        Ok(())
    }

    /// The session limits of a connection.
    pub fn session(&self) -> SessionConfig {
        SessionConfig {
            heartbeat_interval: Duration::from_secs(self.heartbeat_interval_secs),
            heartbeat_timeout: Duration::from_secs(self.heartbeat_timeout_secs),
            rate_per_sec: self.rate_per_sec,
            rate_burst: self.rate_burst,
            max_rooms: self.max_rooms_per_conn,
            room_send_per_sec: self.room_send_per_sec,
            room_send_burst: self.room_send_burst,
            sign_in_timeout: crate::session::SIGN_IN_TIMEOUT,
            flood_close_after: crate::session::FLOOD_CLOSE_AFTER,
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
            batch_load: self.room_batch_load,
            batch_viewers: self.room_batch_viewers,
            batch_window_max: Duration::from_millis(self.room_batch_max_ms),
            batch_max: self.room_batch_max,
            max_frame: self.max_frame,
            presence_interval: Duration::from_millis(self.room_presence_ms),
            joining_buffer: crate::rooms::JOINING_BUFFER,
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

/// The `GoAway.reconnect_hint` of each transport: a client can only use an address of its own kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconnectHints {
    /// `host:port` of a TCP listener.
    pub tcp: String,
    /// A `ws://` or `wss://` URL.
    pub ws: String,
    /// `host:port` of a QUIC (UDP) listener.
    pub quic: String,
}

impl ReconnectHints {
    /// The hint for a connection over `transport` (`"tcp"`, `"ws"` or `"quic"`).
    pub fn for_transport(&self, transport: &str) -> &str {
        match transport {
            "ws" => &self.ws,
            "quic" => &self.quic,
            _ => &self.tcp,
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

    /// The crowded-room window: a maximum below `room_batch_ms` is allowed (no growth), one above
    /// a second or zero viewers is refused, naming the field.
    #[test]
    fn crowded_room_window_bounds() {
        let ok = |f: &dyn Fn(&mut GatewayConfig)| {
            let mut c = GatewayConfig::default();
            f(&mut c);
            c.validate()
        };
        assert!(ok(&|c| c.room_batch_max_ms = 10).is_ok());
        assert!(ok(&|c| c.room_batch_max_ms = 1000).is_ok());
        let e = ok(&|c| c.room_batch_max_ms = 1001).expect_err("over a second");
        assert!(e.contains("room_batch_max_ms"), "{e}");
        let e = ok(&|c| c.room_batch_viewers = 0).expect_err("no viewers");
        assert!(e.contains("room_batch_viewers"), "{e}");
        let c = GatewayConfig {
            room_batch_ms: 80,
            room_batch_max_ms: 10,
            ..GatewayConfig::default()
        };
        let r = c.room_config();
        assert_eq!(r.batch_window_max, Duration::from_millis(10));
        assert_eq!(r.batch_window, Duration::from_millis(80));
    }

    #[test]
    fn debug_shows_no_key_material() {
        let c = GatewayConfig {
            tls_cert: Some("/etc/zhibo/cert.pem".into()),
            tls_key: Some("/etc/zhibo/secret-key.pem".into()),
            ..GatewayConfig::default()
        };
        let shown = format!("{c:?}");
        assert!(!shown.contains("secret-key"), "{shown}");
        assert!(
            shown.contains("cert.pem") && shown.contains("tls_key"),
            "{shown}"
        );
    }

    /// The session's and the rooms' defaults are the configuration's.
    #[test]
    fn derived_defaults_are_the_configs() {
        let c = GatewayConfig::default();
        let (s, d) = (c.session(), SessionConfig::default());
        assert_eq!(
            (s.heartbeat_interval, s.heartbeat_timeout, s.max_rooms),
            (d.heartbeat_interval, d.heartbeat_timeout, d.max_rooms)
        );
        assert_eq!(s.heartbeat_timeout, Duration::from_secs(100));
        let (r, d) = (c.room_config(), RoomConfig::default());
        assert_eq!(
            (
                r.batch_window,
                r.batch_viewers,
                r.batch_window_max,
                r.batch_max,
                r.presence_interval,
                r.max_frame
            ),
            (
                d.batch_window,
                d.batch_viewers,
                d.batch_window_max,
                d.batch_max,
                d.presence_interval,
                d.max_frame
            )
        );
        assert_eq!(r.batch_window, Duration::from_millis(50));
    }
}
