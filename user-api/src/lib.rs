//! # Layout
//! The HTTP/JSON API that apps and app backends call (axum). A request flows:
//! `routes` (the one route table: router and `/openapi.json` are both built from it) → an extractor
//! from `auth` (`Caller` for a bearer token checked against the device's revocation cut-off, `Admin`
//! for `X-Admin-Secret`; both need only the `AuthState` that `state` hands out through `FromRef`) and
//! from `error` (JSON/path/query extractors derived over axum's, their rejections become `ApiError`) →
//! a handler in `accounts` (devices, sign-up/in/out, profiles), `friends`, `groups`, `messages` (user and
//! admin sends through `zhibo_logic::Logic`, with the one `LogicError` → `ApiError` mapping), `admin`
//! (bring-your-own-auth users, token minting) or `rooms` (live-room settings, owner/admin close and
//! mute, room notices, broadcasts), `room_moderation` (bans, the pinned announcement, the viewer list),
//! `conversations` (list, history, read, mute/pin, recall, delete-for-me, group readers through
//! `zhibo_logic::Logic`'s conversation calls, the same as the client packets)
//! → the stores in `zhibo_store::Stores`.
//! `state` holds what handlers share; `rate_limit` the limiters (sign-in backoff, sign-ups and devices
//! per address) and `client_ip` the address they key on; `validate` the field checks.
//! Every failure is one `ApiError` with a stable code: `{"error": {"code", "message"}}`.
//! `web` serves the browser chat page at `/` when `web_ui` is on (outside `/v1` and the OpenAPI document).
#![warn(missing_docs)]

mod accounts;
mod admin;
mod auth;
mod client_ip;
mod conversations;
mod error;
mod friends;
mod groups;
mod messages;
mod rate_limit;
mod room_moderation;
mod rooms;
mod routes;
mod state;
mod validate;
mod web;

use std::sync::Arc;

use anyhow::Context as _;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, StatusCode};
use axum::Router;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, Instrument as _};

use crate::error::ApiError;
use crate::state::AppState;

/// Largest request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// How long a request's body may take to arrive: past it, `408 request_timeout` and the connection is
/// closed (a client that announced a body and stopped sending cannot hold it).
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// user-api configuration.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Lifetime of tokens issued at sign-in, seconds (default 7 days).
    pub token_ttl_secs: i64,
    /// Shared secret of the admin API (`X-Admin-Secret`); empty disables the admin API.
    #[serde(deserialize_with = "zhibo_push::config::scalar_string")]
    pub admin_secret: String,
    /// Most members a group may have, the owner included (default 2000).
    pub max_group_size: usize,
    /// Who an owner or admin may put into a group (creation or `POST .../members`): `open` (anyone,
    /// directly), `friends` (only their friends; adding anyone else is refused with `not_friends`) or
    /// `invite` (default: friends directly, anyone else gets an invitation to accept or refuse).
    pub group_add_policy: GroupAddPolicy,
    /// Failed sign-ins allowed per (username, client address) before backing off (default 10); an
    /// address gets 3 times as many across usernames. Past that, each failure refuses the key for a
    /// growing window (1 s, 2 s, 4 s, … up to `sign_in_max_backoff_secs`); quiet keys are forgotten.
    /// Failures only: the right password from another address is never refused.
    pub sign_in_per_minute: u32,
    /// Longest refusal window of the sign-in backoff, seconds (default 300).
    pub sign_in_max_backoff_secs: u64,
    /// Sign-ups allowed per client address per hour (default 20).
    pub sign_ups_per_hour: u32,
    /// Device registrations allowed per client address per hour (default 60).
    pub devices_per_hour: u32,
    /// Comma-separated addresses / CIDR networks of reverse proxies (ingress) whose
    /// `client_ip_header` is believed; empty (default): the TCP peer is the client address.
    pub trusted_proxies: String,
    /// The header trusted proxies put the client address in, e.g. `x-forwarded-for` (a list, the
    /// nearest untrusted entry wins) or `x-real-ip`; empty (default) = off.
    pub client_ip_header: String,
    /// Serve the browser chat page at `/` (`web/`). Unset: on in `zhibo dev`, off otherwise.
    pub web_ui: Option<bool>,
    /// The gateway WebSocket URL the page connects to, e.g. `ws://127.0.0.1:7002/ws`. Empty: `zhibo dev`
    /// fills in its own listener; elsewhere the page uses port 7002 on the host it was loaded from.
    pub web_ws_url: String,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            token_ttl_secs: 7 * 24 * 3600,
            admin_secret: String::new(),
            max_group_size: 2000,
            group_add_policy: GroupAddPolicy::default(),
            sign_in_per_minute: 10,
            sign_in_max_backoff_secs: 300,
            sign_ups_per_hour: 20,
            devices_per_hour: 60,
            trusted_proxies: String::new(),
            client_ip_header: String::new(),
            web_ui: None,
            web_ws_url: String::new(),
        }
    }
}

impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig")
            .field("token_ttl_secs", &self.token_ttl_secs)
            .field(
                "admin_secret",
                &if self.admin_secret.is_empty() {
                    ""
                } else {
                    "<redacted>"
                },
            )
            .field("max_group_size", &self.max_group_size)
            .field("group_add_policy", &self.group_add_policy)
            .field("sign_in_per_minute", &self.sign_in_per_minute)
            .field("sign_in_max_backoff_secs", &self.sign_in_max_backoff_secs)
            .field("sign_ups_per_hour", &self.sign_ups_per_hour)
            .field("devices_per_hour", &self.devices_per_hour)
            .field("trusted_proxies", &self.trusted_proxies)
            .field("client_ip_header", &self.client_ip_header)
            .field("web_ui", &self.web_ui)
            .field("web_ws_url", &self.web_ws_url)
            .finish()
    }
}

impl ApiConfig {
    /// Checks the values.
    ///
    /// # Errors
    /// A message naming the bad field.
    pub fn validate(&self) -> Result<(), String> {
        if !(60..=366 * 24 * 3600).contains(&self.token_ttl_secs) {
            return Err("token_ttl_secs must be between 60 and 31622400 (366 days)".into());
        }
        if !self.admin_secret.is_empty() && self.admin_secret.len() < 16 {
            return Err(
                "admin_secret must be empty (admin API disabled) or at least 16 bytes".into(),
            );
        }
        if !(2..=100_000).contains(&self.max_group_size) {
            return Err("max_group_size must be between 2 and 100000".into());
        }
        if self.sign_in_per_minute == 0 {
            return Err("sign_in_per_minute must be at least 1".into());
        }
        if !(1..=86_400).contains(&self.sign_in_max_backoff_secs) {
            return Err("sign_in_max_backoff_secs must be between 1 and 86400".into());
        }
        if self.sign_ups_per_hour == 0 || self.devices_per_hour == 0 {
            return Err("sign_ups_per_hour and devices_per_hour must be at least 1".into());
        }
        client_ip::Networks::parse(&self.trusted_proxies)
            .map_err(|e| format!("trusted_proxies: {e}"))?;
        if !self.client_ip_header.is_empty()
            && axum::http::HeaderName::from_bytes(self.client_ip_header.as_bytes()).is_err()
        {
            return Err("client_ip_header is not a valid header name".into());
        }
        let ws = &self.web_ws_url;
        if !(ws.is_empty() || ws.starts_with("ws://") || ws.starts_with("wss://")) {
            return Err("web_ws_url must be empty or a ws:// or wss:// URL".into());
        }
        Ok(())
    }
}

/// Who may be added to a group without their consent (see [`ApiConfig::group_add_policy`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupAddPolicy {
    /// Anyone is added directly: a stranger refused a direct message (`not_friends`) could still put
    /// the target in a group and write there.
    Open,
    /// Only the adder's friends; adding a non-friend is refused.
    Friends,
    /// The adder's friends directly; anyone else gets a pending invitation.
    #[default]
    Invite,
}

/// What the API needs from the rest of the process.
#[derive(Clone)]
pub struct Deps {
    /// Storage.
    pub stores: zhibo_store::Stores,
    /// Mints and verifies tokens (the secret shared with gateways and app backends).
    pub key: Arc<zhibo_auth::TokenKey>,
    /// The message pipeline, for `POST /v1/messages` and `POST /v1/admin/messages`.
    pub logic: Arc<zhibo_logic::Logic>,
    /// Whether the dependencies are ready (answers `GET /readyz`).
    pub ready: Arc<dyn Fn() -> bool + Send + Sync>,
}

impl std::fmt::Debug for Deps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deps").finish_non_exhaustive()
    }
}

/// The API's router, state included. Serve it with connect info (as [`run`] does): the sign-in backoff
/// and the sign-up and device limits key on the client address; without it, sign-in failures are
/// counted per username alone and sign-ups and devices are not limited.
pub fn router(config: ApiConfig, deps: Deps) -> Router {
    app(config, deps).0
}

/// [`router`] and the state its handlers share.
fn app(config: ApiConfig, deps: Deps) -> (Router, AppState) {
    let web_ui = config
        .web_ui
        .unwrap_or(false)
        .then(|| web::router(&config.web_ws_url));
    let state = AppState::new(config, deps);
    let shared = state.clone();
    let mut router = Router::new();
    for spec in routes::table() {
        router = router.route(spec.path, spec.handler);
    }
    if let Some(web_ui) = web_ui {
        router = router.merge(web_ui);
    }
    let router = router
        .fallback(|| async { ApiError::not_found("not_found", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(|req, next| {
            body_in_time(req, next, BODY_TIMEOUT)
        }))
        .layer(axum::middleware::from_fn(trace_request))
        .with_state(state);
    (router, shared)
}

/// Reads the request's body (at most [`MAX_BODY_BYTES`] + 1: the extractors answer a larger one)
/// within `limit` before the handler runs.
async fn body_in_time(
    req: axum::extract::Request,
    next: axum::middleware::Next,
    limit: std::time::Duration,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let (parts, body) = req.into_parts();
    let read = tokio::time::timeout(limit, axum::body::to_bytes(body, MAX_BODY_BYTES + 1)).await;
    let body = match read {
        Ok(Ok(bytes)) => axum::body::Body::from(bytes),
        Ok(Err(e)) => {
            let too_large = e
                .into_inner()
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            return if too_large {
                ApiError::payload_too_large()
            } else {
                ApiError::bad_request("the request body could not be read")
            }
            .into_response();
        }
        Err(_) => {
            let mut response = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                "the request body did not arrive in time",
            )
            .into_response();
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
            return response;
        }
    };
    next.run(axum::extract::Request::from_parts(parts, body))
        .await
}

/// One span per request (method and route template, never the raw path with its ids), and a debug line
/// with status and latency. 5xx are logged by `ApiError` itself, inside this span.
async fn trace_request(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("<unmatched>", |p| p.as_str())
        .to_owned();
    let span = tracing::debug_span!("http", method = %req.method(), route = %route);
    let started = std::time::Instant::now();
    let response = next.run(req).instrument(span.clone()).await;
    span.in_scope(|| {
        tracing::debug!(
            status = response.status().as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "request"
        );
    });
    response
}

/// Every `(method, path)` the router serves (fallbacks aside). The router and `GET /openapi.json` are both
/// built from this one table; path parameters are written `{name}`.
pub fn route_table() -> Vec<(Method, &'static str)> {
    routes::table()
        .into_iter()
        .map(|r| (r.method, r.path))
        .collect()
}

/// Serves the API on `listener` until `shutdown`, then finishes the requests in flight.
///
/// # Errors
/// An invalid config, or when serving fails.
pub async fn run(
    config: ApiConfig,
    listener: tokio::net::TcpListener,
    deps: Deps,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config
        .validate()
        .map_err(anyhow::Error::msg)
        .context("invalid user-api config")?;
    let addr = listener.local_addr().context("listener address")?;
    info!(%addr, "user-api listening");
    let (app, state) = app(config, deps);
    // Each request carries the peer address (ConnectInfo); slow or silent clients are cut off.
    zhibo_telemetry::http::serve_router(listener, app, shutdown).await;
    // The entity-id node number goes back to the pool now, not a lease TTL later.
    state.ids.release().await;
    info!("user-api stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body that stops arriving gets 408 `request_timeout` and the connection closes; a complete
    /// one reaches the handler; one over the limit gets 413.
    #[tokio::test]
    async fn a_body_that_stops_arriving_is_refused_in_time() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let limit = std::time::Duration::from_millis(300);
        let router = Router::new()
            .route(
                "/echo",
                axum::routing::post(|body: String| async move { body }),
            )
            .layer(axum::middleware::from_fn(move |req, next| {
                body_in_time(req, next, limit)
            }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, router).await });
        let exchange = |request: Vec<u8>| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            s.write_all(&request).await.expect("write");
            let mut answer = Vec::new();
            tokio::time::timeout(
                std::time::Duration::from_secs(10),
                s.read_to_end(&mut answer),
            )
            .await
            .expect("answered and closed in time")
            .expect("read");
            String::from_utf8_lossy(&answer).into_owned()
        };
        let stalled = exchange(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789".to_vec(),
        )
        .await;
        assert!(stalled.starts_with("HTTP/1.1 408"), "{stalled}");
        assert!(stalled.contains(r#""code":"request_timeout""#), "{stalled}");
        let whole = exchange(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello"
                .to_vec(),
        )
        .await;
        assert!(
            whole.starts_with("HTTP/1.1 200") && whole.ends_with("hello"),
            "{whole}"
        );
        let mut big = format!(
            "POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY_BYTES + 10
        )
        .into_bytes();
        // Just over what is read is sent (and read): nothing unread to reset the connection.
        big.resize(big.len() + MAX_BODY_BYTES + 2, b'a');
        let big = exchange(big).await;
        assert!(big.starts_with("HTTP/1.1 413"), "{big}");
    }

    #[test]
    fn config_defaults_and_validation() {
        let c: ApiConfig = serde_json::from_str("{}").expect("defaults");
        assert_eq!(
            (c.token_ttl_secs, c.max_group_size, c.sign_in_per_minute),
            (604_800, 2000, 10)
        );
        assert!(c.admin_secret.is_empty());
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(
            c.group_add_policy,
            GroupAddPolicy::Invite,
            "no adds without consent"
        );
        let open: ApiConfig =
            serde_json::from_str(r#"{"group_add_policy": "open"}"#).expect("open");
        assert_eq!(open.group_add_policy, GroupAddPolicy::Open);
        assert!(serde_json::from_str::<ApiConfig>(r#"{"group_add_policy": "any"}"#).is_err());
        assert!(
            serde_json::from_str::<ApiConfig>(r#"{"nope": 1}"#).is_err(),
            "unknown fields refused"
        );
        let short = ApiConfig {
            admin_secret: "short".into(),
            ..ApiConfig::default()
        };
        assert!(short.validate().is_err());
        assert!(!format!("{short:?}").contains("short"), "secret redacted");
        let zero = ApiConfig {
            sign_in_per_minute: 0,
            ..ApiConfig::default()
        };
        assert!(zero.validate().is_err());
        assert_eq!(
            (c.web_ui, c.web_ws_url.as_str()),
            (None, ""),
            "web page off"
        );
        let http = ApiConfig {
            web_ws_url: "http://127.0.0.1:7002/ws".into(),
            ..ApiConfig::default()
        };
        assert!(http.validate().is_err(), "the page needs a ws:// URL");
    }
}
