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
use crate::direct::{Direct, DirectIo, Framing};
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
            // One socket for the codecs and the rooms this connection watches (see `direct`).
            let direct = Direct::new(
                a.conn,
                Framing::Length,
                max_frame,
                a.ctx.config.room_queue,
                a.ctx.metrics.frames_out.clone(),
            );
            let reader = FramedRead::with_capacity(
                DirectIo(direct.clone()),
                PacketDecoder::new(max_frame),
                512,
            )
            .map(PacketDecoder::flatten);
            let writer = until_signed_in(
                crate::frame::lean_writer(DirectIo(direct.clone()), max_frame),
                a.unauthenticated,
            );
            drive(a.ctx, a.conn_id, "tcp", reader, writer, None, direct).await;
        },
    )
    .await;
}
