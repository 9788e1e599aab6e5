//! TCP transport: length-prefixed protobuf frames ([`PacketDecoder`]: a bad frame is an item, not the end
//! of the stream) over a socket.

use std::sync::Arc;

use futures::StreamExt;
use tokio::net::TcpListener;
use tokio_util::codec::FramedRead;
use tokio_util::task::TaskTracker;
use zhibo_proto::codec::PacketDecoder;

use crate::conn::drive;
use crate::context::GatewayContext;
use crate::limits::{until_signed_in, EdgeLimits};
use crate::listen::{accept_loop, Accepted};

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
        ctx,
        limits,
        tracker,
        "tcp",
        move |a: Accepted<_>| async move {
            let _ = a.conn.set_nodelay(true);
            let (r, w) = a.conn.into_split();
            let reader = FramedRead::with_capacity(r, PacketDecoder::new(max_frame), 512)
                .map(PacketDecoder::flatten);
            let writer =
                until_signed_in(crate::frame::lean_writer(w, max_frame), a.unauthenticated);
            drive(a.ctx, a.conn_id, "tcp", reader, writer, None).await;
        },
    )
    .await;
}
