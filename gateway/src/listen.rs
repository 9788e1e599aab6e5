//! The gateway's one accept loop, shared by its three listeners (TCP, WebSocket, QUIC): accept, apply the
//! per-address cap on unauthenticated connections ([`EdgeLimits`]), give the connection its id and a
//! `conn` span (`conn_id`, `transport`, `peer`, later `user_id`, `device_id`), and run the transport's
//! handler on its own tracked task until shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;
use tracing::{debug, info_span, warn, Instrument};

use crate::context::GatewayContext;
use crate::limits::{EdgeLimits, Unauthenticated};

/// A source of new connections: a TCP listener (TCP and WebSocket) or a QUIC endpoint.
pub(crate) trait Listener: Send {
    /// A connection not handled yet.
    type Conn: Send + 'static;

    /// The next connection and its peer address; `None` once the listener is closed.
    fn next(
        &mut self,
    ) -> impl Future<Output = Option<std::io::Result<(Self::Conn, SocketAddr)>>> + Send;

    /// Turns away a connection over its address's cap.
    fn refuse(conn: Self::Conn);
}

impl Listener for TcpListener {
    type Conn = TcpStream;

    async fn next(&mut self) -> Option<std::io::Result<(TcpStream, SocketAddr)>> {
        Some(self.accept().await)
    }

    fn refuse(conn: TcpStream) {
        drop(conn);
    }
}

impl Listener for quinn::Endpoint {
    type Conn = quinn::Incoming;

    async fn next(&mut self) -> Option<std::io::Result<(quinn::Incoming, SocketAddr)>> {
        let incoming = self.accept().await?;
        let peer = incoming.remote_address();
        Some(Ok((incoming, peer)))
    }

    fn refuse(conn: quinn::Incoming) {
        conn.refuse();
    }
}

/// A connection admitted by the accept loop, handed to its transport.
pub(crate) struct Accepted<C> {
    /// The transport's connection.
    pub(crate) conn: C,
    /// The gateway's shared state.
    pub(crate) ctx: Arc<GatewayContext>,
    /// Counts the connection against its address until it signs in.
    pub(crate) unauthenticated: Unauthenticated,
    /// The connection's id on this gateway (also in its span).
    pub(crate) conn_id: u64,
}

/// Accepts connections from `listener` until shutdown (or until the listener closes) and runs `handle`
/// for each on its own task in `tracker`, inside a `conn` span. A connection beyond its address's cap of
/// unauthenticated connections is refused at once.
pub(crate) async fn accept_loop<L, F, Fut>(
    mut listener: L,
    ctx: Arc<GatewayContext>,
    limits: Arc<EdgeLimits>,
    tracker: TaskTracker,
    transport: &'static str,
    handle: F,
) where
    L: Listener,
    F: Fn(Accepted<L::Conn>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            a = listener.next() => a,
        };
        let (conn, peer) = match accepted {
            None => return,
            Some(Ok(a)) => a,
            Some(Err(e)) => {
                // Out of file descriptors and the like: back off briefly instead of spinning.
                warn!(transport, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(unauthenticated) = limits.admit(peer.ip()) else {
            debug!(transport, %peer, "too many connections from this address not signed in: refused");
            L::refuse(conn);
            continue;
        };
        let conn_id = ctx.hub.next_conn_id();
        let span = info_span!(
            "conn",
            conn_id,
            transport,
            %peer,
            user_id = tracing::field::Empty,
            device_id = tracing::field::Empty
        );
        let accepted = Accepted {
            conn,
            ctx: ctx.clone(),
            unauthenticated,
            conn_id,
        };
        tracker.spawn(handle(accepted).instrument(span));
    }
}
