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
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};
use zhibo_bus::Subject;
use zhibo_proto::bus::{Command, Origin};
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{
    ErrorCode, GoAway, Packet, ReceiverType, RoomNotice, SubscribeRoomOutput,
};
use zhibo_proto::codec::CodecError;
use zhibo_store::Room;
use zhibo_telemetry::metrics::{KindLabel, TransportLabel};

use crate::context::GatewayContext;
use crate::direct::{Direct, RoomSink};
use crate::frame::Frame;
use crate::hub::ConnHandle;
use crate::queue::{Outbound, QueueReceiver, QueueSender};
use crate::rooms::Viewer;
use crate::session::{Action, CloseReason, Phase, Session};

/// How long a draining connection waits for the replies of requests already forwarded.
const DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// How long a last packet (GoAway, Error) and the close may take on a connection that is going away:
/// a peer that stopped reading must not hold the task forever.
const LAST_WORDS: std::time::Duration = std::time::Duration::from_secs(2);

/// How long, and how much of what the client still sends, a closing connection reads and drops so
/// that its close is not a reset ([`Direct::linger`]).
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

/// Most packets written before one flush.
const WRITE_BATCH: usize = 64;

/// Runs a connection until it closes. `first` is a packet the transport already has (the WebSocket
/// sign-in built from the URL). `direct`: the socket (or QUIC stream) `writer` writes to, which the
/// rooms this connection watches write their frames to as well (see `direct`).
///
/// A plain function returning [`Connection::run`]: the future every idle connection holds is then the
/// [`Connection`] and the state of its wait, nothing more (an async fn would also keep its arguments).
pub fn drive<R, W>(
    ctx: Arc<GatewayContext>,
    conn_id: u64,
    transport: &'static str,
    reader: R,
    writer: W,
    first: Option<Packet>,
    direct: Arc<Direct>,
) -> impl std::future::Future<Output = ()> + Send
where
    R: Stream<Item = Result<Packet, CodecError>> + Unpin + Send,
    W: Sink<Frame> + Unpin + Send,
    W::Error: Display + Send,
{
    let counted = ctx.metrics.clone();
    let reader = reader.inspect(move |_| {
        counted.frames_in.inc();
    });
    let counted = ctx.metrics.clone();
    let writer = writer.with(move |f: Frame| {
        counted.frames_out.inc();
        futures::future::ready(Ok::<_, W::Error>(f))
    });
    let (tx, rx) = crate::queue::queue(ctx.config.outbound_queue);
    let mut session = Session::new(ctx.session.clone(), ctx.key.clone(), Instant::now());
    let pending = first.map(|p| session.on_packet(p, Instant::now()));
    Connection {
        ctx,
        conn_id,
        transport,
        reader,
        writer,
        session,
        tx,
        rx,
        direct,
        overflow: CancellationToken::new(),
        registered: false,
        in_flight: 0,
        drain_until: None,
        said_goaway: false,
        closing: false,
        pending,
    }
    .run()
}

/// One connection: its session, its socket halves and its queues. [`Connection::run`] waits for the
/// next [`Event`], handles it, and runs the session's actions, until the connection closes.
struct Connection<R, W> {
    ctx: Arc<GatewayContext>,
    conn_id: u64,
    transport: &'static str,
    reader: R,
    writer: W,
    session: Session,
    /// The IM queue (the hub's side is in the registration).
    tx: QueueSender<Outbound>,
    rx: QueueReceiver<Outbound>,
    /// The socket rooms write this connection's room frames to.
    direct: Arc<Direct>,
    /// Cancelled by the hub when the IM queue overflows.
    overflow: CancellationToken,
    /// Registered with the hub (signed in).
    registered: bool,
    /// Requests forwarded whose reply has not been written yet.
    in_flight: usize,
    /// The drain deadline, once draining.
    drain_until: Option<tokio::time::Instant>,
    /// Whether the GoAway was said (a drain that starts mid-write says it once the write is done).
    said_goaway: bool,
    /// The session closed the connection while replies were owed: reading stopped, the replies are
    /// awaited (bounded like a drain's), then it closes.
    closing: bool,
    /// Actions to run before waiting again (the WebSocket sign-in, a sign-in's outcome).
    pending: Option<Vec<Action>>,
}

/// What woke a connection up.
enum Event {
    /// The gateway started draining.
    Drain,
    /// The drain deadline passed.
    DrainDeadline,
    /// The IM queue overflowed.
    Overflow,
    /// The first of the queued IM packets.
    Queued(Outbound),
    /// A packet (or the end, or a bad frame) from the client.
    Read(Option<Result<Packet, CodecError>>),
    /// The session's deadline passed.
    Tick,
    /// Room frames are owed to the socket (see `direct`).
    RoomOwed,
}

/// Whether the connection goes on after an event.
enum Flow {
    /// Wait for the next event.
    Continue,
    /// Run the session's actions.
    Act(Vec<Action>),
    /// Close the connection.
    Close,
}

impl<R, W> Connection<R, W>
where
    R: Stream<Item = Result<Packet, CodecError>> + Unpin + Send,
    W: Sink<Frame> + Unpin + Send,
    W::Error: Display + Send,
{
    /// Runs the connection until it closes, then cleans up.
    ///
    /// Not an async fn: that would keep `self` twice in the future (the argument, and the local it is
    /// moved into); the async block uses its capture in place. Every handler that awaits is boxed:
    /// inline, its state would be part of every idle connection's task (see
    /// `an_idle_tcp_connection_task_stays_small`), for a state it is in only while handling.
    #[allow(clippy::manual_async_fn)] // deliberate: see above
    fn run(mut self) -> impl std::future::Future<Output = ()> + Send {
        async move {
            loop {
                let actions = match self.pending.take() {
                    Some(a) => Some(a),
                    None => match self.wait().await {
                        Event::Drain => Box::pin(self.on_drain()).await,
                        Event::DrainDeadline => Flow::Close,
                        Event::Overflow => {
                            Box::pin(say_too_slow(&mut self.writer)).await;
                            Flow::Close
                        }
                        Event::Queued(first) => Box::pin(self.on_queued(first)).await,
                        Event::Read(frame) => self.on_read(frame),
                        Event::Tick => Flow::Act(self.session.on_tick(Instant::now())),
                        Event::RoomOwed => Box::pin(self.on_room()).await,
                    }
                    .into_actions(),
                };
                let Some(actions) = actions else { break };
                if actions.is_empty() {
                    continue;
                }
                if let Step::Close = Box::pin(self.act(actions)).await {
                    break;
                }
            }
            Box::pin(self.finish()).await;
        }
    }

    /// The next event; IM before reads and deadlines, room traffic last (it never delays them).
    async fn wait(&mut self) -> Event {
        let drain_at = self.drain_until;
        tokio::select! {
            biased;
            _ = self.ctx.shutdown.cancelled(), if !self.said_goaway => Event::Drain,
            _ = tokio::time::sleep_until(drain_at.unwrap_or_else(tokio::time::Instant::now)),
                if drain_at.is_some() => Event::DrainDeadline,
            _ = self.overflow.cancelled() => Event::Overflow,
            first = self.rx.recv() => Event::Queued(first),
            frame = self.reader.next(), if drain_at.is_none() => Event::Read(frame),
            _ = tokio::time::sleep_until(self.session.deadline().into()) => Event::Tick,
            () = std::future::poll_fn(|cx| self.direct.poll_owed(cx)) => Event::RoomOwed,
        }
    }

    /// Drain: tell the client to go, stop reading, let the replies of requests already forwarded
    /// arrive (bounded by [`DRAIN_WAIT`] from the drain's start), then close.
    async fn on_drain(&mut self) -> Flow {
        self.said_goaway = true;
        self.drain_until
            .get_or_insert_with(|| tokio::time::Instant::now() + DRAIN_WAIT);
        let bye = Packet::new(
            0,
            Body::GoAway(GoAway {
                reason: "gateway draining".into(),
                reconnect_hint: self
                    .ctx
                    .reconnect_hints
                    .for_transport(self.transport)
                    .to_owned(),
                reconnect_after_ms: 100,
            }),
        );
        let _ = tokio::time::timeout(LAST_WORDS, self.writer.send(bye.into())).await;
        if self.in_flight == 0 {
            Flow::Close
        } else {
            Flow::Continue
        }
    }

    /// Writes queued IM packets. A reader that stopped reading blocks this write; the hub then cancels
    /// `overflow` when the queue fills, which ends the write (the client is told why). A drain that
    /// starts meanwhile lets the write finish within the drain deadline.
    async fn on_queued(&mut self, first: Outbound) -> Flow {
        let mut kicked = Vec::new();
        let mut released = Vec::new();
        let write = tokio::time::timeout(
            WRITE_TIMEOUT,
            write_queued(
                &mut self.writer,
                first,
                &mut self.rx,
                &mut self.session,
                &mut kicked,
                &mut released,
            ),
        );
        let written = finish_write(
            write,
            &self.overflow,
            &self.ctx.shutdown,
            &mut self.drain_until,
        )
        .await
        .and_then(|w| w.ok().flatten());
        // Rooms this connection was removed from (banned): the hub removed it already, unless a join was
        // in progress then; leaving again covers that.
        for room_id in kicked {
            self.ctx.hub.rooms().leave(self.conn_id, room_id);
        }
        if self.overflow.is_cancelled() {
            say_too_slow(&mut self.writer).await;
            return Flow::Close;
        }
        let Some(replies) = written else {
            return Flow::Close;
        };
        self.in_flight = self.in_flight.saturating_sub(replies);
        if self.said_goaway || self.closing {
            // Room sends still held are not forwarded any more, like packets not read yet.
            if self.in_flight == 0 {
                Flow::Close
            } else {
                Flow::Continue
            }
        } else if released.is_empty() {
            Flow::Continue
        } else {
            Flow::Act(released.into_iter().map(Action::Forward).collect())
        }
    }

    /// A packet, the end of the stream or a bad frame from the client.
    fn on_read(&mut self, frame: Option<Result<Packet, CodecError>>) -> Flow {
        match frame {
            None => Flow::Close,
            Some(Ok(p)) => Flow::Act(self.session.on_packet(p, Instant::now())),
            Some(Err(CodecError::Io(e))) => {
                debug!(error = %e, "read failed");
                Flow::Close
            }
            Some(Err(e)) => {
                // The client's fault, answered with an error: not worth an operator's warning, and
                // at warn level a garbage flood would flood the log too (a flood close is logged).
                debug!(error = %e, "bad frame");
                Flow::Act(self.session.on_bad_frame(&e))
            }
        }
    }

    /// Writes the room frames owed to the socket (`direct`: it was full, or this task was mid-write,
    /// when a room wrote them): a flush of the sink writes what is owed. Like IM writes: an IM overflow
    /// or the drain deadline ends a write the peer never takes.
    async fn on_room(&mut self) -> Flow {
        let write = tokio::time::timeout(WRITE_TIMEOUT, flush(&mut self.writer));
        let written = finish_write(
            write,
            &self.overflow,
            &self.ctx.shutdown,
            &mut self.drain_until,
        )
        .await
        .is_some_and(|w| w.unwrap_or(false));
        if self.overflow.is_cancelled() {
            say_too_slow(&mut self.writer).await;
            return Flow::Close;
        }
        if written {
            Flow::Continue
        } else {
            Flow::Close
        }
    }

    /// Runs the session's actions in order.
    async fn act(&mut self, actions: Vec<Action>) -> Step {
        let mut refused = None;
        for action in actions {
            let step = match action {
                Action::Send(p) => {
                    if let Some(Body::Error(e)) = &p.body {
                        refused = ErrorCode::try_from(e.code).ok();
                    }
                    self.send(p).await
                }
                Action::Close(reason) => {
                    info!(?reason, "closing connection");
                    // A sign-in refused by the session (bad or expired token, no sign-in in time);
                    // refusals after the token checked out are counted in `sign_in`.
                    if matches!(
                        reason,
                        CloseReason::Unauthenticated | CloseReason::NotSignedIn
                    ) {
                        let kind = refused.map_or("ERROR_CODE_UNSPECIFIED", |c| c.as_str_name());
                        self.ctx
                            .metrics
                            .sign_in_failures
                            .get_or_create(&KindLabel { kind })
                            .inc();
                    }
                    if self.in_flight == 0 {
                        Step::Close
                    } else {
                        // Replies to requests already forwarded are owed (e.g. the ACKs of sends
                        // accepted before a flood): stop reading, let them arrive, then close.
                        self.closing = true;
                        self.drain_until
                            .get_or_insert_with(|| tokio::time::Instant::now() + DRAIN_WAIT);
                        return Step::Next;
                    }
                }
                Action::Authenticate { request_id, claims } => {
                    // The session's answer comes next, before anything else is read.
                    self.sign_in(request_id, &claims).await;
                    return Step::Next;
                }
                Action::Forward(packet) => self.forward(packet).await,
                Action::JoinRoom {
                    request_id,
                    room_id,
                } => self.join(request_id, room_id).await,
                Action::LeaveRoom { room_id } => {
                    self.ctx.hub.rooms().leave(self.conn_id, room_id);
                    Step::Next
                }
            };
            if let Step::Close = step {
                return Step::Close;
            }
        }
        Step::Next
    }

    /// Sends one packet in time, or closes.
    async fn send(&mut self, p: Packet) -> Step {
        if send_in_time(&mut self.writer, p).await {
            Step::Next
        } else {
            Step::Close
        }
    }

    /// Checks the device, registers with the hub, and hands the outcome to the session.
    async fn sign_in(&mut self, request_id: u64, claims: &zhibo_auth::Claims) {
        let result = authenticate(&self.ctx, self.conn_id, claims, &self.tx, &self.overflow).await;
        self.registered = result.is_ok();
        let metrics = &self.ctx.metrics;
        match &result {
            Ok((user_id, device_id)) => {
                let label = TransportLabel {
                    transport: self.transport,
                };
                metrics.sign_ins.get_or_create(&label).inc();
                metrics.connections.get_or_create(&label).inc();
                tracing::Span::current().record("user_id", user_id);
                tracing::Span::current().record("device_id", device_id);
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
        self.pending = Some(
            self.session
                .on_signed_in(request_id, result, Instant::now()),
        );
    }

    /// Publishes a command on the bus (answering an error when the bus refuses it).
    async fn forward(&mut self, packet: Packet) -> Step {
        let Phase::Active { user_id, device_id } = self.session.phase() else {
            return Step::Next;
        };
        let rid = packet.request_id;
        // Requests always answered (a reply or an error); acks and typing are answered only on error.
        let expects_reply = matches!(
            packet.body,
            Some(
                Body::SendMessage(_)
                    | Body::Sync(_)
                    | Body::ConversationList(_)
                    | Body::History(_)
                    | Body::MarkRead(_)
                    | Body::Recall(_)
                    | Body::DeleteForMe(_)
                    | Body::ConversationSettings(_)
                    | Body::GroupReaders(_)
            )
        );
        // What to do if the bus refuses it (proto/README: the text says how to retry the command).
        let retry = match &packet.body {
            Some(Body::SendMessage(m)) if m.receiver_type == ReceiverType::Room as i32 => {
                "message bus unavailable; send again"
            }
            Some(Body::SendMessage(_)) => {
                "message bus unavailable; retry with the same client_msg_id"
            }
            Some(Body::Sync(_)) => "message bus unavailable; retry the sync",
            _ => "message bus unavailable; retry",
        };
        let cmd = Command {
            origin: Some(Origin {
                user_id,
                device_id,
                gateway_id: self.ctx.hub.gateway_id().to_owned(),
                conn_id: self.conn_id,
            }),
            packet: Some(packet),
        };
        // The trace of a command starts here and rides in the bus headers.
        let span = tracing::info_span!("gateway.command", request_id = rid);
        let headers = zhibo_telemetry::trace::inject(&span);
        let bus = self.ctx.hub.bus();
        // Disconnected, the NATS client would buffer the command until it reconnects, and the client
        // would wait in silence: refuse it now instead, so the client retries.
        let published = if bus.is_connected() {
            bus.publish(
                &Subject::commands(),
                headers,
                Bytes::from(cmd.encode_to_vec()),
            )
            .instrument(span)
            .await
        } else {
            Err(zhibo_bus::Error::Publish {
                subject: Subject::commands().to_string(),
                message: "not connected to NATS".into(),
            })
        };
        match published {
            Err(e) => {
                self.ctx
                    .metrics
                    .bus_errors
                    .get_or_create(&KindLabel {
                        kind: "publish_command",
                    })
                    .inc();
                warn!(error = %e, "cannot publish command");
                let step = self
                    .send(Packet::error(rid, ErrorCode::Unavailable, retry))
                    .await;
                // A room send answered here releases the next one held behind it.
                match self.session.on_answer(rid, Instant::now()) {
                    Some(next) if matches!(step, Step::Next) => Box::pin(self.forward(next)).await,
                    _ => step,
                }
            }
            Ok(()) => {
                if expects_reply {
                    self.in_flight += 1;
                }
                Step::Next
            }
        }
    }

    /// Joins a live room and answers; announces the join when the room has notices on.
    async fn join(&mut self, request_id: u64, room_id: i64) -> Step {
        let Phase::Active { user_id, device_id } = self.session.phase() else {
            return Step::Next;
        };
        let viewer = Viewer {
            conn_id: self.conn_id,
            user_id,
            device_id,
            tx: RoomSink::Direct(self.direct.clone()),
        };
        let (reply, notices) = match join_room(&self.ctx, viewer, room_id).await {
            Ok((out, notices)) => (
                Packet::new(request_id, Body::SubscribeRoomOutput(out)),
                notices,
            ),
            Err((code, text)) => {
                // Session and room hub must agree: a failed (re)join leaves the room in both, even
                // when the connection was already a viewer.
                self.session
                    .on_join_failed(room_id, code == ErrorCode::RoomBanned);
                self.ctx.hub.rooms().leave(self.conn_id, room_id);
                (Packet::error(request_id, code, text), false)
            }
        };
        if let Step::Close = self.send(reply).await {
            return Step::Close;
        }
        if notices {
            let rooms = self.ctx.hub.rooms();
            if let Err(e) = rooms.notice(room_id, user_id, RoomNotice::Join).await {
                debug!(room_id, error = %e, "join notice lost");
            }
        }
        Step::Next
    }

    /// Counts an overflow close, unregisters, and closes the socket (bounded).
    async fn finish(mut self) {
        let metrics = &self.ctx.metrics;
        if self.overflow.is_cancelled() {
            metrics
                .queue_drops
                .get_or_create(&KindLabel {
                    kind: "im_overflow_close",
                })
                .inc();
        }
        if self.registered {
            let label = TransportLabel {
                transport: self.transport,
            };
            metrics.connections.get_or_create(&label).dec();
            self.ctx.hub.unregister(self.conn_id);
        }
        let _ = tokio::time::timeout(LAST_WORDS, self.writer.close()).await;
        self.direct.close();
        self.direct.linger(LINGER, LINGER_BYTES).await;
    }
}

impl Flow {
    /// The actions to run, or `None` when the connection closes.
    fn into_actions(self) -> Option<Vec<Action>> {
        match self {
            Flow::Continue => Some(Vec::new()),
            Flow::Act(a) => Some(a),
            Flow::Close => None,
        }
    }
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
///
/// The write is polled first: most writes finish in their first poll (the socket has room), and then
/// the overflow and shutdown tokens are never polled, which would register a waiter on each and remove
/// it again (a lock each, per written frame: measurable at room fan-out rates, see BENCHMARKS.md §4).
/// A write that waits still ends when either token fires.
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
            biased;
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
/// continues one is not rate limited), and so are answers: the room sends they release (the next of
/// the connection's, held until the previous one was answered) go into `released`.
async fn write_queued<W>(
    writer: &mut W,
    first: Outbound,
    rx: &mut QueueReceiver<Outbound>,
    session: &mut Session,
    kicked: &mut Vec<i64>,
    released: &mut Vec<Packet>,
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
            Outbound::Packet(p) => {
                if let Some(Body::RoomKicked(k)) = &p.body {
                    // Only a connection in (or joining) the room is told; the session forgets it.
                    if !session.in_room(k.room_id) {
                        next = if n < WRITE_BATCH { rx.try_recv() } else { None };
                        continue;
                    }
                    session.on_room_kicked(k.room_id);
                    kicked.push(k.room_id);
                }
                Frame::from(*p)
            }
            Outbound::Reply(p) => {
                replies += 1;
                if let Some(Body::SyncOutput(page)) = &p.body {
                    session.on_sync_page(page);
                }
                released.extend(session.on_answer(p.request_id, Instant::now()));
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

/// Flushes `writer` (which writes the room frames owed to its socket). False when it failed.
async fn flush<W>(writer: &mut W) -> bool
where
    W: Sink<Frame> + Unpin,
    W::Error: Display,
{
    match writer.flush().await {
        Ok(()) => true,
        Err(e) => {
            debug!(error = %e, "flush failed");
            false
        }
    }
}

/// Joins a live room: the room's record (closed?) and the user's ban, the hub (subscribed before the history is read, so
/// nothing falls between the two), the recent history and the pinned announcement. Returns the output and whether the room announces
/// joins.
async fn join_room(
    ctx: &Arc<GatewayContext>,
    viewer: Viewer,
    room_id: i64,
) -> Result<(SubscribeRoomOutput, bool), (ErrorCode, String)> {
    let conn_id = viewer.conn_id;
    let (room, ban) = tokio::join!(
        ctx.rooms.get_room(room_id),
        ctx.rooms.get_ban(room_id, viewer.user_id),
    );
    let (room, ban) = match (room, ban) {
        (Ok(r), Ok(b)) => (r.unwrap_or_else(|| Room::open(room_id)), b),
        (Err(e), _) | (_, Err(e)) => {
            warn!(room_id, error = %e, "room lookup failed");
            return Err((ErrorCode::Unavailable, "try again later".to_owned()));
        }
    };
    if ban.is_some() {
        return Err((
            ErrorCode::RoomBanned,
            "you are banned from this room".to_owned(),
        ));
    }
    if room.closed {
        return Err((ErrorCode::RoomClosed, "the room is closed".to_owned()));
    }
    let rooms = ctx.hub.rooms();
    if let Err(e) = rooms.join(viewer, room_id, room.join_notices).await {
        warn!(room_id, error = %e, "cannot join room");
        return Err((ErrorCode::Unavailable, "try again later".to_owned()));
    }
    // Read after the subscription is live: a pin or shaping changed meanwhile also arrives on it.
    let (history, pin, shaping) = tokio::join!(
        ctx.rooms.recent(room_id, ctx.config.room_recent),
        ctx.rooms.pin(room_id),
        ctx.rooms.get_room_shaping(room_id)
    );
    match shaping {
        Ok(Some(s)) => rooms.apply_shaping(room_id, s.chat_per_sec, s.updated_at_ms),
        // Never set: the room shows all chat (the state's default).
        Ok(None) => {}
        // Shaping only thins a busy room's chat: the room keeps what it had.
        Err(e) => warn!(room_id, error = %e, "room shaping lookup failed"),
    }
    let history = history.unwrap_or_else(|e| {
        // Live traffic still works; only the late joiner's backlog is missing.
        warn!(room_id, error = %e, "room history read failed");
        Vec::new()
    });
    let pinned = pin
        .unwrap_or_else(|e| {
            warn!(room_id, error = %e, "room pin read failed");
            None
        })
        .map(|p| Box::new(p.to_message()));
    let Some((mut recent, online_count)) = rooms.ready(conn_id, room_id, history) else {
        return Err((ErrorCode::Unavailable, "try again later".to_owned()));
    };
    // The answer must fit in one frame whatever the room's history holds: keep the newest that fit.
    let budget = ctx
        .config
        .max_frame
        .saturating_sub(1024 + pinned.as_ref().map_or(0, |p| p.encoded_len()));
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
            pinned,
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
    // another user on it is refused, as user-api refuses it. A device not bound yet (registered before
    // binding existed, or only ever used with tokens an app backend minted) is bound here to the first
    // user whose valid token uses it: one conditional write, once per device.
    let owner = match device.owner_user_id {
        0 => ctx
            .devices
            .bind_device(claims.device_id, claims.user_id)
            .await
            .map_err(|e| {
                warn!(error = %e, "device binding failed");
                (ErrorCode::Unavailable, "try again later".to_owned())
            })?,
        owner => owner,
    };
    if owner != claims.user_id {
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
            presence: Arc::new(zhibo_store::presence::MemoryPresence::new()),
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
        let direct = crate::direct::Direct::new(
            stream,
            crate::direct::Framing::Length,
            64 * 1024,
            16,
            prometheus_client::metrics::counter::Counter::default(),
        );
        let reader = tokio_util::codec::FramedRead::with_capacity(
            crate::direct::DirectIo(direct.clone()),
            zhibo_proto::codec::PacketDecoder::new(64 * 1024),
            512,
        )
        .map(zhibo_proto::codec::PacketDecoder::flatten);
        let writer = crate::frame::lean_writer(crate::direct::DirectIo(direct.clone()), 64 * 1024);
        let task = drive(ctx, 1, "tcp", reader, writer, None, direct);
        let size = std::mem::size_of_val(&task);
        // 1,432 bytes when written (2,560 before the arguments were boxed and the actions moved out);
        // 1,488 as a `Connection` (the `conn_id` it keeps, the handlers boxed); 1,464 without the
        // room queue (every transport's rooms write to its socket directly).
        assert!(size <= 1536, "the connection future grew to {size} bytes");
    }
}
