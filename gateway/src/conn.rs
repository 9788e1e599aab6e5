//! The connection driver: runs one [`Session`] over any transport given as a packet stream and a
//! [`Frame`] sink. TCP, QUIC and WebSocket differ only in how they build those (see `tcp`, `quic`, `ws`).
//!
//! Writes come from the session's answers, the IM queue (hub → [`Outbound`]; full = close) and the room
//! queue (shared pre-encoded room frames; full = dropped by the hub). IM is served first.

use std::fmt::Display;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::{Sink, SinkExt, Stream, StreamExt};
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};
use zhibo_bus::Subject;
use zhibo_proto::bus::{Command, Origin};
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{ErrorCode, GoAway, Packet, RoomNotice, SubscribeRoomOutput};
use zhibo_proto::codec::CodecError;
use zhibo_store::Room;
use zhibo_telemetry::metrics::{KindLabel, TransportLabel};

use crate::context::GatewayContext;
use crate::frame::Frame;
use crate::hub::ConnHandle;
use crate::queue::{Outbound, QueueReceiver, QueueSender};
use crate::rooms::Viewer;
use crate::session::{Action, Phase, Session};

/// How long a draining connection waits for the replies of requests already forwarded.
const DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// How long a last packet (GoAway, Error) and the close may take on a connection that is going away:
/// a peer that stopped reading must not hold the task forever.
const LAST_WORDS: std::time::Duration = std::time::Duration::from_secs(2);

/// Most packets written before one flush.
const WRITE_BATCH: usize = 64;

/// Runs a connection until it closes. `first` is a packet the transport already has (the WebSocket
/// sign-in built from the URL).
///
/// A plain function over a boxed argument: an async fn keeps its arguments in its state for its whole
/// life, beside the locals they are moved into, and this future is what every idle connection holds.
pub fn drive<R, W>(
    ctx: Arc<GatewayContext>,
    conn_id: u64,
    transport: &'static str,
    reader: R,
    writer: W,
    first: Option<Packet>,
) -> impl std::future::Future<Output = ()> + Send
where
    R: Stream<Item = Result<Packet, CodecError>> + Unpin + Send,
    W: Sink<Frame> + Unpin + Send,
    W::Error: Display + Send,
{
    run(ctx, transport, Box::new((conn_id, reader, writer, first)))
}

async fn run<R, W>(
    ctx: Arc<GatewayContext>,
    transport: &'static str,
    io: Box<(u64, R, W, Option<Packet>)>,
) where
    R: Stream<Item = Result<Packet, CodecError>> + Unpin + Send,
    W: Sink<Frame> + Unpin + Send,
    W::Error: Display + Send,
{
    // Moved out in a block of its own so the box is freed now, not when the connection ends.
    let (conn_id, reader, writer, first) = {
        let io = io;
        *io
    };
    let metrics = ctx.metrics.clone();
    let counted = metrics.clone();
    let mut reader = reader.inspect(move |_| {
        counted.frames_in.inc();
    });
    let counted = metrics.clone();
    let mut writer = writer.with(move |f: Frame| {
        counted.frames_out.inc();
        futures::future::ready(Ok::<_, W::Error>(f))
    });
    let label = TransportLabel { transport };
    let (tx, mut rx) = crate::queue::queue(ctx.config.outbound_queue);
    // The room queue is created at the first join: most connections never watch a room, and tokio
    // allocates a queue's first block of slots (32 frames) up front.
    let mut room_tx: Option<mpsc::Sender<Bytes>> = None;
    let mut room_rx: Option<mpsc::Receiver<Bytes>> = None;
    let overflow = CancellationToken::new();
    let mut session = Session::new(ctx.session.clone(), ctx.key.clone(), Instant::now());
    let mut registered = false;
    // Requests forwarded whose reply has not been written yet, the drain deadline once draining, and
    // whether the GoAway was said (a drain that starts mid-write says it once the write is done).
    let mut in_flight: usize = 0;
    let mut drain_until: Option<tokio::time::Instant> = None;
    let mut said_goaway = false;
    let mut pending = first.map(|p| session.on_packet(p, Instant::now()));
    'conn: loop {
        let actions = match pending.take() {
            Some(a) => a,
            None => tokio::select! {
                biased;
                _ = ctx.shutdown.cancelled(), if !said_goaway => {
                    // Drain: tell the client to go, stop reading, let the replies of requests already
                    // forwarded arrive (bounded by DRAIN_WAIT from the drain's start), then close.
                    said_goaway = true;
                    drain_until.get_or_insert_with(|| tokio::time::Instant::now() + DRAIN_WAIT);
                    let bye = Packet::new(0, Body::GoAway(GoAway {
                        reason: "gateway draining".into(),
                        reconnect_hint: ctx.reconnect_hints.for_transport(transport).to_owned(),
                        reconnect_after_ms: 100,
                    }));
                    let _ = tokio::time::timeout(LAST_WORDS, writer.send(bye.into())).await;
                    if in_flight == 0 {
                        break 'conn;
                    }
                    continue 'conn;
                }
                _ = tokio::time::sleep_until(drain_until.unwrap_or_else(tokio::time::Instant::now)),
                    if drain_until.is_some() => break 'conn,
                _ = overflow.cancelled() => {
                    say_too_slow(&mut writer).await;
                    break 'conn;
                }
                first = rx.recv() => {
                    // A reader that stopped reading blocks this write; the hub then cancels `overflow`
                    // when the queue fills, which ends the write (the client is told why). A drain that
                    // starts meanwhile lets the write finish within the drain deadline.
                    // The write futures are boxed: inline they would enlarge every idle connection's
                    // task by their size (~200 bytes), for a state it is in only while writing.
                    let write = tokio::time::timeout(
                        WRITE_TIMEOUT,
                        write_queued(&mut writer, first, &mut rx, &mut session),
                    );
                    let written =
                        Box::pin(finish_write(write, &overflow, &ctx.shutdown, &mut drain_until))
                            .await
                            .and_then(|w| w.ok().flatten());
                    if overflow.is_cancelled() {
                        say_too_slow(&mut writer).await;
                        break 'conn;
                    }
                    let Some(replies) = written else { break 'conn };
                    in_flight = in_flight.saturating_sub(replies);
                    if said_goaway && in_flight == 0 {
                        break 'conn;
                    }
                    continue 'conn;
                }
                frame = reader.next(), if drain_until.is_none() => match frame {
                    None => break 'conn,
                    Some(Ok(p)) => session.on_packet(p, Instant::now()),
                    Some(Err(CodecError::Io(e))) => {
                        debug!(error = %e, "read failed");
                        break 'conn;
                    }
                    Some(Err(e)) => {
                        warn!(error = %e, "bad frame");
                        session.on_bad_frame(&e)
                    }
                },
                _ = tokio::time::sleep_until(session.deadline().into()) => session.on_tick(Instant::now()),
                // Last: room traffic never delays IM, reads or deadlines.
                frame = recv_room(&mut room_rx) => {
                    let Some(first) = frame else { break 'conn };
                    // Like IM writes: an IM overflow or the drain deadline ends a write the peer never
                    // takes.
                    let write = tokio::time::timeout(
                        WRITE_TIMEOUT,
                        write_room(&mut writer, first, &mut room_rx),
                    );
                    let written =
                        Box::pin(finish_write(write, &overflow, &ctx.shutdown, &mut drain_until))
                            .await
                            .is_some_and(|w| w.unwrap_or(false));
                    if overflow.is_cancelled() {
                        say_too_slow(&mut writer).await;
                        break 'conn;
                    }
                    if !written {
                        break 'conn;
                    }
                    continue 'conn;
                }
            },
        };
        if actions.is_empty() {
            continue 'conn;
        }
        // Boxed: the actions' states (sign-in, publishing, joins) would otherwise be part of every idle
        // connection's task; they live only while a packet is being handled.
        let step = Box::pin(async {
            for action in actions {
                match action {
                    Action::Send(p) => {
                        if !send_in_time(&mut writer, p).await {
                            return Step::Close;
                        }
                    }
                    Action::Close(reason) => {
                        info!(?reason, "closing connection");
                        return Step::Close;
                    }
                    Action::Authenticate { request_id, claims } => {
                        let result = authenticate(&ctx, conn_id, &claims, &tx, &overflow).await;
                        registered = result.is_ok();
                        match &result {
                            Ok(_) => {
                                metrics.sign_ins.get_or_create(&label).inc();
                                metrics.connections.get_or_create(&label).inc();
                            }
                            Err((code, _)) => {
                                metrics
                                    .sign_in_failures
                                    .get_or_create(&KindLabel {
                                        kind: code.as_str_name(),
                                    })
                                    .inc();
                            }
                        }
                        if let Ok((user_id, device_id)) = result {
                            tracing::Span::current().record("user_id", user_id);
                            tracing::Span::current().record("device_id", device_id);
                        }
                        pending = Some(session.on_signed_in(request_id, result, Instant::now()));
                        return Step::Next;
                    }
                    Action::Forward(packet) => {
                        let Phase::Active { user_id, device_id } = session.phase() else {
                            continue;
                        };
                        let rid = packet.request_id;
                        let expects_reply =
                            matches!(packet.body, Some(Body::SendMessage(_) | Body::Sync(_)));
                        let cmd = Command {
                            origin: Some(Origin {
                                user_id,
                                device_id,
                                gateway_id: ctx.hub.gateway_id().to_owned(),
                                conn_id,
                            }),
                            packet: Some(packet),
                        };
                        // The trace of a command starts here and rides in the bus headers.
                        let span = tracing::info_span!("gateway.command", request_id = rid);
                        let headers = zhibo_telemetry::trace::inject(&span);
                        let published = ctx
                            .hub
                            .bus()
                            .publish(
                                &Subject::commands(),
                                headers,
                                Bytes::from(cmd.encode_to_vec()),
                            )
                            .instrument(span)
                            .await;
                        if let Err(e) = published {
                            metrics
                                .bus_errors
                                .get_or_create(&KindLabel {
                                    kind: "publish_command",
                                })
                                .inc();
                            warn!(error = %e, "cannot publish command");
                            let err = Packet::error(rid, ErrorCode::Unavailable, "try again later");
                            if !send_in_time(&mut writer, err).await {
                                return Step::Close;
                            }
                        } else if expects_reply {
                            in_flight += 1;
                        }
                    }
                    Action::JoinRoom {
                        request_id,
                        room_id,
                    } => {
                        let Phase::Active { user_id, device_id } = session.phase() else {
                            continue;
                        };
                        let tx = match &room_tx {
                            Some(tx) => tx.clone(),
                            None => {
                                let (tx, rx) = mpsc::channel(ctx.config.room_queue);
                                room_rx = Some(rx);
                                room_tx.insert(tx).clone()
                            }
                        };
                        let viewer = Viewer {
                            conn_id,
                            user_id,
                            device_id,
                            tx,
                        };
                        let (reply, notices) = match join_room(&ctx, viewer, room_id).await {
                            Ok((out, notices)) => (
                                Packet::new(request_id, Body::SubscribeRoomOutput(out)),
                                notices,
                            ),
                            Err((code, text)) => {
                                // Session and room hub must agree: a failed (re)join leaves the
                                // room in both, even when the connection was already a viewer.
                                session.on_join_failed(room_id);
                                ctx.hub.rooms().leave(conn_id, room_id);
                                (Packet::error(request_id, code, text), false)
                            }
                        };
                        if !send_in_time(&mut writer, reply).await {
                            return Step::Close;
                        }
                        if notices {
                            let rooms = ctx.hub.rooms();
                            if let Err(e) = rooms.notice(room_id, user_id, RoomNotice::Join).await {
                                debug!(room_id, error = %e, "join notice lost");
                            }
                        }
                    }
                    Action::LeaveRoom { room_id } => ctx.hub.rooms().leave(conn_id, room_id),
                }
            }
            Step::Next
        })
        .await;
        if let Step::Close = step {
            break 'conn;
        }
    }
    if overflow.is_cancelled() {
        metrics
            .queue_drops
            .get_or_create(&KindLabel {
                kind: "im_overflow_close",
            })
            .inc();
    }
    if registered {
        metrics.connections.get_or_create(&label).dec();
        ctx.hub.unregister(conn_id);
    }
    let _ = tokio::time::timeout(LAST_WORDS, writer.close()).await;
}

/// What the connection loop does after handling a packet's actions.
enum Step {
    /// Read on.
    Next,
    /// Close the connection.
    Close,
}

/// A peer that reads nothing for this long while we must answer it is closed.
const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Sends one packet; false when it failed or the peer did not take it within [`WRITE_TIMEOUT`].
async fn send_in_time<W>(writer: &mut W, p: Packet) -> bool
where
    W: Sink<Frame> + Unpin,
{
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, writer.send(p.into())).await,
        Ok(Ok(()))
    )
}

/// Tells a client whose IM queue overflowed why it is closed. The error goes after what the socket
/// still holds for it, so a reader that stalled gets it when it reads again: it has [`WRITE_TIMEOUT`],
/// like any reply owed, before the connection closes.
async fn say_too_slow<W>(writer: &mut W)
where
    W: Sink<Frame> + Unpin,
{
    let too_slow = Packet::error(
        0,
        ErrorCode::Unavailable,
        "connection too slow: outbound queue full; reconnect and sync",
    );
    let _ = tokio::time::timeout(WRITE_TIMEOUT, writer.send(too_slow.into())).await;
}

/// Runs `write` to its end; `None` when it was cut: the IM queue overflowed, or the drain deadline
/// passed. A drain that starts mid-write does not cut it: it starts the drain clock (`drain_until`)
/// and the write goes on within it, so the GoAway and the replies owed still follow.
async fn finish_write<F>(
    write: F,
    overflow: &CancellationToken,
    shutdown: &CancellationToken,
    drain_until: &mut Option<tokio::time::Instant>,
) -> Option<F::Output>
where
    F: std::future::Future,
{
    tokio::pin!(write);
    loop {
        tokio::select! {
            w = write.as_mut() => return Some(w),
            _ = overflow.cancelled() => return None,
            _ = stop_writing(shutdown, *drain_until) => {
                if drain_until.is_some() {
                    return None;
                }
                *drain_until = Some(tokio::time::Instant::now() + DRAIN_WAIT);
            }
        }
    }
}

/// Writes `first` and up to [`WRITE_BATCH`] more queued packets with one flush. Returns how many were
/// replies to this connection's requests, or `None` when the connection must close (write failure, or
/// a packet that closes it such as a Kick). Sync pages written are shown to `session` (a sync that
/// continues one is not rate limited).
async fn write_queued<W>(
    writer: &mut W,
    first: Outbound,
    rx: &mut QueueReceiver<Outbound>,
    session: &mut Session,
) -> Option<usize>
where
    W: Sink<Frame> + Unpin,
    W::Error: Display,
{
    let mut next = Some(first);
    let mut n = 0;
    let mut replies = 0;
    while let Some(o) = next.take() {
        let p = match o {
            Outbound::Packet(p) => Frame::from(*p),
            Outbound::Reply(p) => {
                replies += 1;
                if let Some(Body::SyncOutput(page)) = &p.body {
                    session.on_sync_page(page);
                }
                Frame::from(*p)
            }
            Outbound::Close(p) => {
                let _ = writer.send((*p).into()).await;
                return None;
            }
            Outbound::Encoded(frame) => Frame::Encoded(*frame),
        };
        if let Err(e) = writer.feed(p).await {
            debug!(error = %e, "write failed");
            return None;
        }
        n += 1;
        if n < WRITE_BATCH {
            next = rx.try_recv();
        }
    }
    match writer.flush().await {
        Ok(()) => Some(replies),
        Err(e) => {
            debug!(error = %e, "flush failed");
            None
        }
    }
}

/// Resolves when writes must stop waiting for the peer: at the drain deadline while draining, else when
/// the gateway starts draining.
async fn stop_writing(shutdown: &CancellationToken, drain_until: Option<tokio::time::Instant>) {
    match drain_until {
        Some(t) => tokio::time::sleep_until(t).await,
        None => shutdown.cancelled().await,
    }
}

/// The next frame of the room queue; pending forever while the connection has none.
async fn recv_room(rx: &mut Option<mpsc::Receiver<Bytes>>) -> Option<Bytes> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Writes room frame `first` and up to [`WRITE_BATCH`] more queued ones with one flush. False when the
/// write failed.
async fn write_room<W>(writer: &mut W, first: Bytes, rx: &mut Option<mpsc::Receiver<Bytes>>) -> bool
where
    W: Sink<Frame> + Unpin,
    W::Error: Display,
{
    let mut next = Some(first);
    let mut n = 0;
    while let Some(f) = next.take() {
        if let Err(e) = writer.feed(Frame::Encoded(f)).await {
            debug!(error = %e, "write failed");
            return false;
        }
        n += 1;
        if n < WRITE_BATCH {
            next = rx.as_mut().and_then(|rx| rx.try_recv().ok());
        }
    }
    match writer.flush().await {
        Ok(()) => true,
        Err(e) => {
            debug!(error = %e, "flush failed");
            false
        }
    }
}

/// Joins a live room: the room's record (closed?), the hub (subscribed before the history is read, so
/// nothing falls between the two), the recent history. Returns the output and whether the room announces
/// joins.
async fn join_room(
    ctx: &Arc<GatewayContext>,
    viewer: Viewer,
    room_id: i64,
) -> Result<(SubscribeRoomOutput, bool), (ErrorCode, String)> {
    let conn_id = viewer.conn_id;
    let room = match ctx.rooms.get_room(room_id).await {
        Ok(r) => r.unwrap_or_else(|| Room::open(room_id)),
        Err(e) => {
            warn!(room_id, error = %e, "room lookup failed");
            return Err((ErrorCode::Unavailable, "try again later".to_owned()));
        }
    };
    if room.closed {
        return Err((ErrorCode::RoomClosed, "the room is closed".to_owned()));
    }
    let rooms = ctx.hub.rooms();
    if let Err(e) = rooms.join(viewer, room_id, room.join_notices).await {
        warn!(room_id, error = %e, "cannot join room");
        return Err((ErrorCode::Unavailable, "try again later".to_owned()));
    }
    let history = ctx
        .rooms
        .recent(room_id, ctx.config.room_recent)
        .await
        .unwrap_or_else(|e| {
            // Live traffic still works; only the late joiner's backlog is missing.
            warn!(room_id, error = %e, "room history read failed");
            Vec::new()
        });
    let Some((mut recent, online_count)) = rooms.ready(conn_id, room_id, history) else {
        return Err((ErrorCode::Unavailable, "try again later".to_owned()));
    };
    // The answer must fit in one frame whatever the room's history holds: keep the newest that fit.
    let budget = ctx.config.max_frame.saturating_sub(1024);
    let mut bytes = 0;
    let keep = recent
        .iter()
        .rev()
        .take_while(|m| {
            bytes += m.encoded_len() + 8;
            bytes <= budget
        })
        .count();
    recent.drain(..recent.len() - keep);
    Ok((
        SubscribeRoomOutput {
            room_id,
            online_count,
            recent,
        },
        room.join_notices,
    ))
}

async fn authenticate(
    ctx: &Arc<GatewayContext>,
    conn_id: u64,
    claims: &zhibo_auth::Claims,
    tx: &QueueSender<Outbound>,
    overflow: &CancellationToken,
) -> Result<(i64, i64), (ErrorCode, String)> {
    let device = ctx
        .devices
        .get_device(claims.device_id)
        .await
        .map_err(|e| {
            warn!(error = %e, "device lookup failed");
            (ErrorCode::Unavailable, "try again later".to_owned())
        })?
        .ok_or((ErrorCode::Unauthenticated, "unknown device".to_owned()))?;
    // A device serves the one user it was bound to at its first sign-in (user-api): a token for
    // another user on it is refused, as user-api refuses it.
    if device.owner_user_id != 0 && device.owner_user_id != claims.user_id {
        return Err((
            ErrorCode::Unauthenticated,
            "this device belongs to another user".to_owned(),
        ));
    }
    if claims.issued_at_ms() < device.tokens_valid_after_ms {
        return Err((
            ErrorCode::Unauthenticated,
            "token revoked; sign in again".to_owned(),
        ));
    }
    let handle = ConnHandle {
        user_id: claims.user_id,
        device_id: claims.device_id,
        tx: tx.clone(),
        overflow: overflow.clone(),
    };
    ctx.hub.register(conn_id, handle).await.map_err(|e| {
        warn!(error = %e, "cannot register connection on the bus");
        (ErrorCode::Unavailable, "try again later".to_owned())
    })?;
    Ok((claims.user_id, claims.device_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GatewayConfig;

    /// Every idle connection holds its task's future: keep it small (measured in docs/BENCHMARKS.md,
    /// section 1). Fails when a change makes the TCP connection task grow past the budget.
    #[tokio::test]
    async fn an_idle_tcp_connection_task_stays_small() {
        let backend = Arc::new(zhibo_store::embedded::EmbeddedBackend::temporary().expect("db"));
        let stores = backend.stores();
        let config = Arc::new(GatewayConfig {
            outbound_queue: 16,
            room_queue: 16,
            room_recent: 10,
            max_frame: 64 * 1024,
            ..GatewayConfig::default()
        });
        let deps = crate::Deps {
            bus: Arc::new(zhibo_bus::memory::MemoryBus::new()),
            devices: stores.devices,
            rooms: stores.rooms,
            key: Arc::new(zhibo_auth::TokenKey::new("secret")),
            metrics: Arc::new(zhibo_telemetry::Metrics::new()),
        };
        let hub = crate::Hub::new("gw".into(), deps.bus.clone());
        let ctx = Arc::new(GatewayContext::new(
            config,
            hub,
            deps,
            CancellationToken::new(),
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let _client = tokio::net::TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (stream, _) = listener.accept().await.expect("accept");
        let (r, w) = stream.into_split();
        let reader = tokio_util::codec::FramedRead::with_capacity(
            r,
            zhibo_proto::codec::PacketDecoder::new(64 * 1024),
            512,
        )
        .map(zhibo_proto::codec::PacketDecoder::flatten);
        let writer = crate::frame::lean_writer(w, 64 * 1024);
        let task = drive(ctx, 1, "tcp", reader, writer, None);
        let size = std::mem::size_of_val(&task);
        // 1,432 bytes when written (2,560 before the arguments were boxed and the actions moved out).
        assert!(size <= 1536, "the connection future grew to {size} bytes");
    }
}
