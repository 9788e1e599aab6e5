//! The ops endpoint every role serves: `/metrics`, `/healthz`, `/readyz`; and [`serve_router`], the
//! HTTP server of the ops endpoint and of user-api (closes connections that send no request head in
//! time, so slow or silent clients cannot hold sockets for ever).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Metrics;

/// Whether the process's dependencies (bus connected, store reachable) are ready.
pub type Readiness = Arc<dyn Fn() -> bool + Send + Sync>;

#[derive(Clone)]
struct Ops {
    metrics: Arc<Metrics>,
    ready: Readiness,
}

/// The ops router: `/metrics` (Prometheus text), `/healthz` (always 200 while the process serves:
/// liveness must not depend on dependencies), `/readyz` (200 only when `ready()`).
pub fn router(metrics: Arc<Metrics>, ready: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready_handler))
        .with_state(Ops { metrics, ready })
}

async fn metrics_handler(State(ops): State<Ops>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        ops.metrics.render(),
    )
}

async fn ready_handler(State(ops): State<Ops>) -> impl IntoResponse {
    if (ops.ready)() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

/// Serves the ops router on `listener` until `shutdown`.
///
/// # Errors
/// When the server fails.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    ready: Readiness,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve_router(listener, router(metrics, ready), shutdown).await;
    Ok(())
}

/// How long a connection may take to send a complete request head (request line and headers), the
/// wait for the next request on a kept-alive HTTP/1 connection included: past it, it is closed.
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves `router` on `listener` (HTTP/1 and HTTP/2, upgrades allowed, each request carrying the
/// peer's [`axum::extract::ConnectInfo<SocketAddr>`]) until `shutdown`, then lets the requests in
/// flight finish. Unlike `axum::serve`, an HTTP/1 connection that sends no complete request head
/// within [`HEADER_TIMEOUT`] is closed (slowloris, idle kept-alive connections).
pub async fn serve_router(listener: TcpListener, router: Router, shutdown: CancellationToken) {
    serve_router_with(listener, router, shutdown, HEADER_TIMEOUT).await;
}

/// [`serve_router`] with another header timeout (tests).
pub async fn serve_router_with(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    header_timeout: std::time::Duration,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;

    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    builder.http2().timer(TokioTimer::new());
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors or the like: keep serving the connections there are.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let router = router.clone();
        let builder = builder.clone();
        let graceful = graceful.watcher();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            // The HTTP version is detected from the first bytes, before any HTTP/1 timer runs: a
            // connection that sends none is closed here.
            let mut first = [0u8; 1];
            let first = tokio::select! {
                () = stop.cancelled() => return,
                peeked = tokio::time::timeout(header_timeout, stream.peek(&mut first)) => peeked,
            };
            if !matches!(first, Ok(Ok(1..))) {
                return;
            }
            let service = hyper::service::service_fn(move |mut request: hyper::Request<_>| {
                request
                    .extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                tower_service::Service::call(&mut router.clone(), request)
            });
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(e) = graceful.watch(connection).await {
                tracing::debug!(error = %e, %peer, "HTTP connection ended");
            }
        });
    }
    drop(listener);
    // Idle connections close at once, requests in flight finish; a client still sending its head is
    // not waited for (past this, its task ends with its header timeout).
    if tokio::time::timeout(SHUTDOWN_WAIT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::info!("HTTP connections still open at shutdown left to their timeouts");
    }
}

/// How long a stopping server waits for its connections' requests in flight.
const SHUTDOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    use axum::extract::ConnectInfo;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// Reads until the server closes the connection (or `limit`): what it sent.
    async fn until_closed(s: &mut tokio::net::TcpStream, limit: Duration) -> Option<String> {
        let mut got = Vec::new();
        let read = tokio::time::timeout(limit, s.read_to_end(&mut got)).await;
        read.ok()
            .map(|_| String::from_utf8_lossy(&got).into_owned())
    }

    #[tokio::test]
    async fn slow_and_silent_clients_are_cut_off_and_others_served() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let router = Router::new().route(
            "/peer",
            get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }),
        );
        let stop = CancellationToken::new();
        let timeout = Duration::from_millis(500);
        let server = tokio::spawn(serve_router_with(listener, router, stop.clone(), timeout));

        // Silent, half a head, and a head dripped a line at a time: each closed after the timeout.
        let mut silent = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut half = tokio::net::TcpStream::connect(addr).await.expect("connect");
        half.write_all(b"GET /peer HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        let mut drip = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let started = Instant::now();
        drip.write_all(b"GET /peer HTTP/1.1\r\n")
            .await
            .expect("write");
        let mut dripped_until_closed = false;
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if drip.write_all(b"X-Drip: 1\r\n").await.is_err() {
                dripped_until_closed = true;
                break;
            }
        }
        let closed = until_closed(&mut drip, Duration::from_secs(10)).await;
        assert!(
            dripped_until_closed || closed.is_some(),
            "a dripped head is cut off"
        );
        assert!(started.elapsed() >= timeout, "not before the timeout");
        for (what, s) in [("silent", &mut silent), ("half a head", &mut half)] {
            let got = until_closed(s, Duration::from_secs(10)).await;
            assert!(got.is_some(), "{what}: still open");
        }

        // A client sending requests in time is served, with its address.
        let mut good = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let local = good.local_addr().expect("local");
        good.write_all(b"GET /peer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let answer = until_closed(&mut good, Duration::from_secs(10))
            .await
            .expect("answered and closed");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with(&local.to_string()), "{answer}");

        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("stops")
            .expect("no panic");
    }

    /// A stopping server does not wait for connections that have sent nothing, or half a head.
    #[tokio::test]
    async fn a_silent_connection_does_not_hold_up_a_stop() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let long = Duration::from_secs(600);
        let server = tokio::spawn(serve_router_with(
            listener,
            Router::new(),
            stop.clone(),
            long,
        ));
        let _silent = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut half = tokio::net::TcpStream::connect(addr).await.expect("connect");
        half.write_all(b"GET / HTTP/1.1\r\n").await.expect("write");
        // Both accepted before the stop: a request on a third connection is answered.
        let mut probe = tokio::net::TcpStream::connect(addr).await.expect("connect");
        probe
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let answer = until_closed(&mut probe, Duration::from_secs(10)).await;
        assert!(answer.is_some_and(|a| a.starts_with("HTTP/1.1 404")));
        stop.cancel();
        tokio::time::timeout(SHUTDOWN_WAIT + Duration::from_secs(5), server)
            .await
            .expect("stopped without waiting for the silent connections")
            .expect("no panic");
    }
}
