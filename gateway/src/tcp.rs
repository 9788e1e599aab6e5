//! TCP transport: length-prefixed protobuf frames ([`PacketDecoder`]: a bad frame is an item, not the end
//! of the stream) over a socket.

use std::sync::Arc;

use futures::StreamExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::FramedRead;
use tokio_util::task::TaskTracker;
use tracing::{debug, info_span, warn, Instrument};
use zhibo_proto::codec::PacketDecoder;

use crate::conn::drive;
use crate::context::GatewayContext;
use crate::limits::{until_signed_in, EdgeLimits, Unauthenticated};

/// Accepts TCP connections until shutdown and runs `handle` for each on its own task, inside a `conn`
/// span (ctx by the TCP and WebSocket listeners). A connection beyond the address's cap of
/// unauthenticated connections is closed at once.
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    ctx: Arc<GatewayContext>,
    limits: Arc<EdgeLimits>,
    tracker: TaskTracker,
    transport: &'static str,
    handle: F,
) where
    F: Fn(TcpStream, Arc<GatewayContext>, Unauthenticated) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off briefly instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(unauthenticated) = limits.admit(peer.ip()) else {
            debug!(transport, %peer, "too many connections from this address not signed in: closed");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let span = info_span!("conn", transport, %peer, user_id = tracing::field::Empty, device_id = tracing::field::Empty);
        tracker.spawn(handle(stream, ctx.clone(), unauthenticated).instrument(span));
    }
}

/// Accepts TCP connections until shutdown, each driven on its own task.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<GatewayContext>,
    limits: Arc<EdgeLimits>,
    max_frame: usize,
    tracker: TaskTracker,
) {
    accept_loop(
        listener,
        ctx.clone(),
        limits,
        tracker,
        "tcp",
        move |stream, ctx, unauthenticated| async move {
            let (r, w) = stream.into_split();
            let reader = FramedRead::with_capacity(r, PacketDecoder::new(max_frame), 512)
                .map(PacketDecoder::flatten);
            let writer = until_signed_in(crate::frame::lean_writer(w, max_frame), unauthenticated);
            drive(ctx, "tcp", reader, writer, None).await;
        },
    )
    .await;
}
