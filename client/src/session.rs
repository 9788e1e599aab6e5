//! A session: one signed-in device that stays connected. A task owns the connection and applies the
//! protocol's rules (proto/README.md): heartbeat at the advertised interval, resume from the last
//! contiguous seq, sync on a gap, resend un-ACKed sends with the same `client_msg_id`, obey `GoAway`,
//! never reconnect after `Kick`, back off with jitter when the gateway cannot be reached. The app talks to
//! it through [`Session`] (commands) and [`Events`] (what happened, each inbox message once).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, info, Instrument};
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{
    ErrorCode, GoAway, Heartbeat, Kick, Message, MessageAck, Packet, ReceiverType, RoomMessages,
    SendMessageInput, SendMessageOutput, SignInOutput, SubscribeRoomInput, SubscribeRoomOutput,
    SyncInput, UnsubscribeRoomInput,
};

use crate::backoff::Backoff;
use crate::conn::{Client, Credentials, SendHalf, Transport};
use crate::error::{code_of, Error};
use crate::seq::{MemorySeqStore, SeqStore, SeqTracker};

type Result<T, E = Error> = std::result::Result<T, E>;

/// Sync page size asked for.
const SYNC_PAGE: u32 = 100;

/// How to connect and behave.
#[derive(Clone)]
pub struct Options {
    /// Transport.
    pub transport: Transport,
    /// Gateway: `host:port` (WebSocket: also a `ws://host:port/ws` URL).
    pub addr: String,
    /// What to sign in with.
    pub credentials: Credentials,
    /// Where the last contiguous seq is kept ([`MemorySeqStore`] by default).
    pub seq_store: Arc<dyn SeqStore>,
    /// First reconnection delay (jittered, doubling).
    pub backoff_min: Duration,
    /// Longest reconnection delay.
    pub backoff_max: Duration,
    /// Longest wait for a connection and its sign-in.
    pub connect_timeout: Duration,
    /// Delay before resending a send the server refused as retryable (`UNAVAILABLE`, `RATE_LIMITED`).
    pub retry_after: Duration,
    /// Events buffered for the app before the session stops reading the socket.
    pub events_capacity: usize,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("transport", &self.transport)
            .field("addr", &self.addr)
            .field("user_id", &self.credentials.user_id)
            .field("device_id", &self.credentials.device_id)
            .finish_non_exhaustive()
    }
}

impl Options {
    /// Defaults: memory seq store, back-off 200 ms to 30 s, 10 s connect timeout.
    pub fn new(transport: Transport, addr: impl Into<String>, credentials: Credentials) -> Self {
        Options {
            transport,
            addr: addr.into(),
            credentials,
            seq_store: Arc::new(MemorySeqStore::default()),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            retry_after: Duration::from_secs(1),
            events_capacity: 1024,
        }
    }

    /// Uses `store` for the last contiguous seq.
    pub fn with_seq_store(mut self, store: Arc<dyn SeqStore>) -> Self {
        self.seq_store = store;
        self
    }
}

/// Something the app should know.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// Signed in on a gateway (the first time and after every reconnection).
    Connected {
        /// The gateway's address.
        addr: String,
        /// The heartbeat interval it asked for.
        heartbeat_interval: Duration,
    },
    /// A sync completed: every message up to `seq` has been delivered.
    Synced {
        /// The last contiguous seq.
        seq: u64,
    },
    /// An inbox message (1:1 or group), pushed or synced: each seq exactly once, in arrival order.
    /// The device's own sends are answered by [`Session::send`] instead (unless found by a sync
    /// after the app restarted).
    Message(Message),
    /// Room traffic.
    RoomMessages(RoomMessages),
    /// A room joined again after a reconnection.
    RoomRejoined(SubscribeRoomOutput),
    /// A room could not be joined again after a reconnection (e.g. it closed meanwhile).
    RoomLost {
        /// The room.
        room_id: i64,
        /// Why.
        error: Error,
    },
    /// The gateway is draining: the session moves to `reconnect_hint` (if any) after the delay.
    GoAway(GoAway),
    /// The connection was lost; the session reconnects after `retry_in`.
    Disconnected {
        /// Why.
        reason: String,
        /// When the next attempt starts.
        retry_in: Duration,
    },
    /// An error the server pushed outside any request (e.g. the connection was too slow).
    ServerError(zhibo_proto::client::Error),
    /// The server kicked this device: the session stops and does not reconnect.
    Kicked(Kick),
    /// The session stopped (kicked, refused, or closed by the app); no more events follow.
    Closed {
        /// Why.
        error: Error,
    },
}

/// The events of a [`Session`].
#[derive(Debug)]
pub struct Events {
    rx: mpsc::Receiver<Event>,
}

impl Events {
    /// The next event; `None` once the session has stopped and every event was read.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
}

enum Command {
    Send {
        input: SendMessageInput,
        reply: oneshot::Sender<Result<SendMessageOutput>>,
    },
    Request {
        body: Body,
        reply: oneshot::Sender<Result<Packet>>,
    },
    Join {
        room_id: i64,
        reply: oneshot::Sender<Result<SubscribeRoomOutput>>,
    },
    Leave {
        room_id: i64,
    },
    Cut,
    Close,
}

/// A handle on a running session. Dropping every handle closes it.
#[derive(Debug, Clone)]
pub struct Session {
    tx: mpsc::UnboundedSender<Command>,
    user_id: i64,
    device_id: i64,
    nonce: u64,
    next_msg: Arc<AtomicU64>,
}

impl Session {
    /// Connects and signs in (the first attempt is not retried: its error is returned), then keeps the
    /// session connected in a background task.
    ///
    /// # Errors
    /// When the first connection or sign-in fails.
    pub async fn connect(options: Options) -> Result<(Session, Events)> {
        let (client, signed_in) = connect_once(&options, &options.addr).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (events_tx, events) = mpsc::channel(options.events_capacity.max(1));
        let creds = &options.credentials;
        let session = Session {
            tx,
            user_id: creds.user_id,
            device_id: creds.device_id,
            nonce: rand::random(),
            next_msg: Arc::new(AtomicU64::new(1)),
        };
        let span = tracing::info_span!(
            "session",
            user_id = creds.user_id,
            device_id = creds.device_id,
            transport = ?options.transport
        );
        let driver = Driver::new(options, rx, events_tx);
        tokio::spawn(driver.run(client, signed_in).instrument(span));
        Ok((session, Events { rx: events }))
    }

    /// The signed-in user.
    pub fn user_id(&self) -> i64 {
        self.user_id
    }

    /// The signed-in device.
    pub fn device_id(&self) -> i64 {
        self.device_id
    }

    /// A fresh `client_msg_id`, unique for this device.
    pub fn new_client_msg_id(&self) -> String {
        let n = self.next_msg.fetch_add(1, Ordering::Relaxed);
        format!("{}-{:x}-{n}", self.device_id, self.nonce)
    }

    /// Sends `content` to a user or a group; resolves with the server's ACK exactly once, resending
    /// with the same `client_msg_id` across reconnections until it comes.
    ///
    /// # Errors
    /// When the server refuses the message (not friends, not a member…) or the session stops first.
    pub fn send(
        &self,
        receiver_type: ReceiverType,
        receiver_id: i64,
        content_type: i32,
        content: impl Into<Bytes>,
    ) -> impl std::future::Future<Output = Result<SendMessageOutput>> + Send + 'static {
        self.send_input(SendMessageInput {
            receiver_type: receiver_type as i32,
            receiver_id,
            client_msg_id: self.new_client_msg_id(),
            content_type,
            content: content.into(),
            // A fresh id: this is its first transmission (cleared for every resend).
            first_attempt: true,
            ..Default::default()
        })
    }

    /// [`Session::send`] with a prepared input (its `client_msg_id` is the app's). Set
    /// `first_attempt` only if this id was never sent before (not by an earlier run of the app either);
    /// the session clears it for every resend.
    ///
    /// # Errors
    /// As [`Session::send`].
    pub fn send_input(
        &self,
        input: SendMessageInput,
    ) -> impl std::future::Future<Output = Result<SendMessageOutput>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let sent = self.tx.send(Command::Send { input, reply });
        async move {
            sent.map_err(|_| Error::Shutdown)?;
            rx.await.map_err(|_| Error::Shutdown)?
        }
    }

    /// Joins a live room (joined again after every reconnection until [`Session::leave_room`]).
    ///
    /// # Errors
    /// When the server refuses (`ROOM_CLOSED`, `TOO_MANY_ROOMS`) or the session stops.
    pub async fn join_room(&self, room_id: i64) -> Result<SubscribeRoomOutput> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Join { room_id, reply })
            .map_err(|_| Error::Shutdown)?;
        rx.await.map_err(|_| Error::Shutdown)?
    }

    /// Leaves a live room.
    pub fn leave_room(&self, room_id: i64) {
        let _ = self.tx.send(Command::Leave { room_id });
    }

    /// Sends a room message (not stored, not resent: a room message lost with a connection is gone).
    ///
    /// # Errors
    /// When the server refuses it or the connection is lost before the answer.
    pub async fn send_room(
        &self,
        room_id: i64,
        content_type: i32,
        content: impl Into<Bytes>,
    ) -> Result<SendMessageOutput> {
        let p = self
            .request(Body::SendMessage(SendMessageInput {
                receiver_type: ReceiverType::Room as i32,
                receiver_id: room_id,
                client_msg_id: self.new_client_msg_id(),
                content_type,
                content: content.into(),
                ..Default::default()
            }))
            .await?;
        match p.body {
            Some(Body::SendMessageOutput(o)) => Ok(o),
            other => Err(Error::Unexpected(format!("{other:?}"))),
        }
    }

    /// Sends any request and waits for its answer on the current connection (not resent).
    ///
    /// # Errors
    /// When the server answers with an error or the connection is lost before the answer.
    pub async fn request(&self, body: Body) -> Result<Packet> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Request { body, reply })
            .map_err(|_| Error::Shutdown)?;
        rx.await.map_err(|_| Error::Shutdown)?
    }

    /// Drops the current connection as a network failure would; the session reconnects at once.
    pub fn reconnect(&self) {
        let _ = self.tx.send(Command::Cut);
    }

    /// Closes the session: pending sends fail with [`Error::Shutdown`], events end with `Closed`.
    pub fn close(&self) {
        let _ = self.tx.send(Command::Close);
    }
}

async fn connect_once(options: &Options, addr: &str) -> Result<(Client, SignInOutput)> {
    tokio::time::timeout(
        options.connect_timeout,
        Client::connect(options.transport, addr, &options.credentials),
    )
    .await
    .map_err(|_| Error::Timeout(options.connect_timeout))?
}

/// An IM send waiting for its ACK.
struct PendingSend {
    input: SendMessageInput,
    reply: oneshot::Sender<Result<SendMessageOutput>>,
    /// Whether it went out on the current connection (and is not waiting for a retry).
    in_flight: bool,
}

/// What a request id on the current connection was for.
enum InFlight {
    Send(u64),
    Request(oneshot::Sender<Result<Packet>>),
    Join(i64),
    Sync,
    Heartbeat,
}

/// How a connection ended.
enum End {
    /// Connect again after this delay, to this address.
    Reconnect { delay: Duration, reason: String },
    /// Stop for good.
    Stop(Error),
}

struct Driver {
    options: Options,
    addr: String,
    commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::Sender<Event>,
    tracker: SeqTracker,
    saved: u64,
    acked: u64,
    /// IM sends by submission order.
    sends: BTreeMap<u64, PendingSend>,
    next_send: u64,
    rooms: BTreeSet<i64>,
    join_waiters: HashMap<i64, Vec<oneshot::Sender<Result<SubscribeRoomOutput>>>>,
    in_flight: HashMap<u64, InFlight>,
    next_request: u64,
    sync_running: bool,
    sync_again: bool,
    backoff: Backoff,
}

impl Driver {
    fn new(
        options: Options,
        commands: mpsc::UnboundedReceiver<Command>,
        events: mpsc::Sender<Event>,
    ) -> Self {
        let start = options.seq_store.load();
        Driver {
            addr: options.addr.clone(),
            backoff: Backoff::new(options.backoff_min, options.backoff_max),
            options,
            commands,
            events,
            tracker: SeqTracker::new(start),
            saved: start,
            acked: start,
            sends: BTreeMap::new(),
            next_send: 0,
            rooms: BTreeSet::new(),
            join_waiters: HashMap::new(),
            in_flight: HashMap::new(),
            next_request: 1,
            sync_running: false,
            sync_again: false,
        }
    }

    async fn emit(&self, event: Event) {
        // The app dropped its Events: it no longer listens, which is not our failure.
        let _ = self.events.send(event).await;
    }

    async fn run(mut self, client: Client, signed_in: SignInOutput) {
        let mut connection = Some((client, signed_in));
        let error = loop {
            let (client, signed_in) = match connection.take() {
                Some(c) => c,
                None => match connect_once(&self.options, &self.addr).await {
                    Ok(c) => c,
                    Err(e) if !e.is_transient() => break e,
                    Err(e) => {
                        let delay = self.backoff.next_delay();
                        debug!(error = %e, ?delay, "connect failed");
                        match self.wait(delay, e.to_string()).await {
                            Ok(()) => continue,
                            Err(e) => break e,
                        }
                    }
                },
            };
            self.backoff.reset();
            match self.connected(client, signed_in).await {
                End::Stop(e) => break e,
                End::Reconnect { delay, reason } => {
                    self.disconnected();
                    if let Err(e) = self.wait(delay, reason).await {
                        break e;
                    }
                }
            }
        };
        info!(error = %error, "session stopped");
        self.fail_all(&error);
        self.emit(Event::Closed { error }).await;
    }

    /// Waits `delay` before the next attempt, taking commands meanwhile.
    async fn wait(&mut self, delay: Duration, reason: String) -> Result<()> {
        self.emit(Event::Disconnected {
            reason,
            retry_in: delay,
        })
        .await;
        let until = Instant::now() + delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return Ok(()),
                cmd = self.commands.recv() => match cmd {
                    None | Some(Command::Close) => return Err(Error::Shutdown),
                    Some(cmd) => self.queue_offline(cmd),
                },
            }
        }
    }

    /// A command while no connection is up: sends and joins wait for the next one.
    fn queue_offline(&mut self, cmd: Command) {
        match cmd {
            Command::Send { input, reply } => self.add_send(input, reply),
            Command::Request { reply, .. } => {
                let _ = reply.send(Err(Error::Closed));
            }
            Command::Join { room_id, reply } => {
                self.rooms.insert(room_id);
                self.join_waiters.entry(room_id).or_default().push(reply);
            }
            Command::Leave { room_id } => {
                self.rooms.remove(&room_id);
            }
            Command::Cut | Command::Close => {}
        }
    }

    fn add_send(
        &mut self,
        input: SendMessageInput,
        reply: oneshot::Sender<Result<SendMessageOutput>>,
    ) {
        let key = self.next_send;
        self.next_send += 1;
        self.sends.insert(
            key,
            PendingSend {
                input,
                reply,
                in_flight: false,
            },
        );
    }

    /// The connection is gone: sends wait to be resent, other requests fail.
    fn disconnected(&mut self) {
        for (_, f) in self.in_flight.drain() {
            if let InFlight::Request(reply) = f {
                let _ = reply.send(Err(Error::Closed));
            }
        }
        for s in self.sends.values_mut() {
            s.in_flight = false;
        }
        self.sync_running = false;
        self.sync_again = false;
    }

    fn fail_all(&mut self, error: &Error) {
        let copy = || match error {
            Error::Kicked(t) => Error::Kicked(t.clone()),
            Error::Refused { code, message } => Error::Refused {
                code: *code,
                message: message.clone(),
            },
            _ => Error::Shutdown,
        };
        for (_, s) in std::mem::take(&mut self.sends) {
            let _ = s.reply.send(Err(copy()));
        }
        for (_, waiters) in self.join_waiters.drain() {
            for w in waiters {
                let _ = w.send(Err(copy()));
            }
        }
        for (_, f) in self.in_flight.drain() {
            if let InFlight::Request(reply) = f {
                let _ = reply.send(Err(copy()));
            }
        }
    }

    fn request_id(&mut self, what: InFlight) -> u64 {
        let id = self.next_request;
        self.next_request += 1;
        self.in_flight.insert(id, what);
        id
    }

    async fn connected(&mut self, client: Client, signed_in: SignInOutput) -> End {
        let interval = Duration::from_millis(u64::from(signed_in.heartbeat_interval_ms))
            .max(Duration::from_millis(100));
        info!(addr = %self.addr, ?interval, "signed in");
        self.emit(Event::Connected {
            addr: self.addr.clone(),
            heartbeat_interval: interval,
        })
        .await;
        let (mut tx, mut rx) = client.into_parts();
        match self.on_connect(&mut tx).await {
            Ok(()) => {}
            Err(e) => {
                return End::Reconnect {
                    delay: self.backoff.next_delay(),
                    reason: e.to_string(),
                }
            }
        }
        let mut heartbeat = tokio::time::interval_at(Instant::now() + interval, interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Silence this long means the path is dead even if no error surfaced (the server answers
        // every heartbeat).
        let dead_after = interval * 2 + Duration::from_secs(5);
        let mut last_heard = Instant::now();
        let mut retry: Option<Instant> = None;
        let mut going_away: Option<(Instant, String)> = None;
        loop {
            let retry_at = retry.unwrap_or_else(Instant::now);
            let leave_at = going_away.as_ref().map_or_else(Instant::now, |g| g.0);
            let result: Result<Option<End>> = tokio::select! {
                p = rx.next() => match p {
                    Ok(Some(p)) => {
                        last_heard = Instant::now();
                        self.on_packet(p, &mut tx, &mut retry, &mut going_away).await
                    }
                    Ok(None) => Ok(Some(self.lost("connection closed by the server", &going_away))),
                    Err(e) => Ok(Some(self.lost(&e.to_string(), &going_away))),
                },
                cmd = self.commands.recv(), if going_away.is_none() => match cmd {
                    None | Some(Command::Close) => {
                        let _ = tx.close().await;
                        Ok(Some(End::Stop(Error::Shutdown)))
                    }
                    Some(Command::Cut) => Ok(Some(End::Reconnect {
                        delay: Duration::ZERO,
                        reason: "reconnect asked by the app".into(),
                    })),
                    Some(cmd) => self.on_command(cmd, &mut tx).await.map(|()| None),
                },
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() > dead_after {
                        Ok(Some(self.lost("no answer to heartbeats", &going_away)))
                    } else {
                        self.on_heartbeat(&mut tx).await.map(|()| None)
                    }
                }
                _ = tokio::time::sleep_until(retry_at), if retry.is_some() => {
                    retry = None;
                    self.on_retry(&mut tx).await.map(|()| None)
                }
                _ = tokio::time::sleep_until(leave_at), if going_away.is_some() => {
                    Ok(Some(End::Reconnect { delay: Duration::ZERO, reason: "gateway going away".into() }))
                }
            };
            match result {
                Ok(None) => {}
                Ok(Some(end)) => {
                    if let Some((_, hint)) = going_away.take() {
                        if !hint.is_empty() {
                            info!(%hint, "moving to the gateway hinted by GoAway");
                            self.addr = hint;
                        }
                    }
                    return end;
                }
                Err(e) => return self.lost(&e.to_string(), &going_away),
            }
        }
    }

    /// The connection failed: reconnect after a back-off, or when the GoAway delay is over.
    fn lost(&mut self, reason: &str, going_away: &Option<(Instant, String)>) -> End {
        let delay = match going_away {
            Some((at, _)) => at.saturating_duration_since(Instant::now()),
            None => self.backoff.next_delay(),
        };
        End::Reconnect {
            delay,
            reason: reason.to_owned(),
        }
    }

    /// A fresh connection: join the rooms again, resend what was not ACKed, sync from the last
    /// contiguous seq.
    async fn on_connect(&mut self, tx: &mut SendHalf) -> Result<()> {
        for room_id in self.rooms.clone() {
            let id = self.request_id(InFlight::Join(room_id));
            tx.feed_with_id(id, Body::SubscribeRoom(SubscribeRoomInput { room_id }))
                .await?;
        }
        self.resend(tx).await?;
        self.start_sync(tx).await
    }

    async fn resend(&mut self, tx: &mut SendHalf) -> Result<()> {
        let keys: Vec<u64> = self
            .sends
            .iter()
            .filter(|(_, s)| !s.in_flight)
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            let id = self.request_id(InFlight::Send(key));
            let Some(s) = self.sends.get_mut(&key) else {
                continue;
            };
            s.in_flight = true;
            let input = s.input.clone();
            // Whatever happens to this transmission, any later one is a resend.
            s.input.first_attempt = false;
            tx.feed_with_id(id, Body::SendMessage(input)).await?;
        }
        tx.flush().await
    }

    /// The retry timer: resend refused sends, run a refused sync again.
    async fn on_retry(&mut self, tx: &mut SendHalf) -> Result<()> {
        self.resend(tx).await?;
        if self.sync_again && !self.sync_running {
            self.start_sync(tx).await?;
        }
        Ok(())
    }

    async fn start_sync(&mut self, tx: &mut SendHalf) -> Result<()> {
        if self.sync_running {
            self.sync_again = true;
            return Ok(());
        }
        self.sync_running = true;
        self.sync_again = false;
        self.sync_from(self.tracker.contiguous(), tx).await
    }

    async fn sync_from(&mut self, seq: u64, tx: &mut SendHalf) -> Result<()> {
        let id = self.request_id(InFlight::Sync);
        tx.feed_with_id(
            id,
            Body::Sync(SyncInput {
                seq,
                limit: SYNC_PAGE,
            }),
        )
        .await?;
        tx.flush().await
    }

    async fn on_heartbeat(&mut self, tx: &mut SendHalf) -> Result<()> {
        let id = self.request_id(InFlight::Heartbeat);
        tx.feed_with_id(id, Body::Heartbeat(Heartbeat {})).await?;
        self.ack(tx).await?;
        tx.flush().await
    }

    /// Tells the server how far this device holds everything (and persists it).
    async fn ack(&mut self, tx: &mut SendHalf) -> Result<()> {
        let seq = self.tracker.contiguous();
        if seq > self.acked {
            self.acked = seq;
            tx.feed_with_id(0, Body::MessageAck(MessageAck { seq }))
                .await?;
        }
        Ok(())
    }

    fn persist(&mut self) {
        let seq = self.tracker.contiguous();
        if seq > self.saved {
            self.saved = seq;
            self.options.seq_store.save(seq);
        }
    }

    async fn on_command(&mut self, cmd: Command, tx: &mut SendHalf) -> Result<()> {
        match cmd {
            Command::Send { input, reply } => {
                self.add_send(input, reply);
                self.resend(tx).await
            }
            Command::Request { body, reply } => {
                let id = self.request_id(InFlight::Request(reply));
                tx.feed_with_id(id, body).await?;
                tx.flush().await
            }
            Command::Join { room_id, reply } => {
                self.join_waiters.entry(room_id).or_default().push(reply);
                self.rooms.insert(room_id);
                let id = self.request_id(InFlight::Join(room_id));
                tx.feed_with_id(id, Body::SubscribeRoom(SubscribeRoomInput { room_id }))
                    .await?;
                tx.flush().await
            }
            Command::Leave { room_id } => {
                self.rooms.remove(&room_id);
                tx.feed_with_id(0, Body::UnsubscribeRoom(UnsubscribeRoomInput { room_id }))
                    .await?;
                tx.flush().await
            }
            Command::Cut | Command::Close => Ok(()),
        }
    }

    async fn on_packet(
        &mut self,
        p: Packet,
        tx: &mut SendHalf,
        retry: &mut Option<Instant>,
        going_away: &mut Option<(Instant, String)>,
    ) -> Result<Option<End>> {
        let Some(body) = p.body else {
            return Ok(None);
        };
        if p.request_id != 0 {
            let Some(what) = self.in_flight.remove(&p.request_id) else {
                debug!(request_id = p.request_id, "answer to no request");
                return Ok(None);
            };
            self.on_answer(what, body, tx, retry).await?;
            return Ok(None);
        }
        match body {
            Body::Message(m) => {
                self.deliver(m).await;
                if self.tracker.has_gap() {
                    debug!(
                        contiguous = self.tracker.contiguous(),
                        "gap in pushed seqs: sync"
                    );
                    self.start_sync(tx).await?;
                }
            }
            Body::RoomMessages(r) => self.emit(Event::RoomMessages(r)).await,
            Body::Kick(k) => {
                info!(reason = k.reason, text = %k.text, "kicked");
                let text = k.text.clone();
                self.emit(Event::Kicked(k)).await;
                return Ok(Some(End::Stop(Error::Kicked(text))));
            }
            Body::GoAway(g) => {
                info!(hint = %g.reconnect_hint, after_ms = g.reconnect_after_ms, "GoAway");
                let at = Instant::now() + Duration::from_millis(u64::from(g.reconnect_after_ms));
                *going_away = Some((at, g.reconnect_hint.clone()));
                self.emit(Event::GoAway(g)).await;
            }
            Body::Error(e) => self.emit(Event::ServerError(e)).await,
            other => debug!(packet = ?other, "unexpected push"),
        }
        Ok(None)
    }

    /// An inbox message: the device's own send waiting for its ACK is answered by it; anything else is
    /// delivered to the app unless it already was.
    async fn deliver(&mut self, m: Message) {
        let own = m.sender_device_id == self.options.credentials.device_id
            && m.sender_user_id == self.options.credentials.user_id;
        if own {
            let key = self
                .sends
                .iter()
                .find(|(_, s)| s.input.client_msg_id == m.client_msg_id)
                .map(|(k, _)| *k);
            if let Some(s) = key.and_then(|k| self.sends.remove(&k)) {
                self.tracker.observe(m.seq);
                self.persist();
                // A before-send hook may have replaced the content: say so, as the server's answer would.
                let replaced = m.content != s.input.content;
                let _ = s.reply.send(Ok(SendMessageOutput {
                    message_id: m.message_id,
                    seq: m.seq,
                    server_time_ms: m.server_time_ms,
                    duplicate: true,
                    content_replaced: replaced,
                    content: if replaced {
                        m.content.clone()
                    } else {
                        Default::default()
                    },
                    conv_seq: m.conv_seq,
                }));
                return;
            }
        }
        if self.tracker.observe(m.seq) {
            self.persist();
            self.emit(Event::Message(m)).await;
        }
    }

    async fn on_answer(
        &mut self,
        what: InFlight,
        body: Body,
        tx: &mut SendHalf,
        retry: &mut Option<Instant>,
    ) -> Result<()> {
        match (what, body) {
            (InFlight::Send(key), Body::SendMessageOutput(out)) => {
                if let Some(s) = self.sends.remove(&key) {
                    self.tracker.observe(out.seq);
                    self.persist();
                    let _ = s.reply.send(Ok(out));
                }
            }
            (InFlight::Send(key), Body::Error(e)) => {
                let code = code_of(&e);
                if matches!(code, ErrorCode::Unavailable | ErrorCode::RateLimited) {
                    if let Some(s) = self.sends.get_mut(&key) {
                        s.in_flight = false;
                    }
                    retry.get_or_insert_with(|| Instant::now() + self.options.retry_after);
                } else if let Some(s) = self.sends.remove(&key) {
                    let _ = s.reply.send(Err(Error::Server {
                        code,
                        message: e.message,
                    }));
                }
            }
            (InFlight::Request(reply), Body::Error(e)) => {
                let _ = reply.send(Err(Error::Server {
                    code: code_of(&e),
                    message: e.message,
                }));
            }
            (InFlight::Request(reply), body) => {
                let _ = reply.send(Ok(Packet::new(0, body)));
            }
            (InFlight::Join(room_id), Body::SubscribeRoomOutput(out)) => {
                match self.join_waiters.remove(&room_id) {
                    Some(waiters) => {
                        for w in waiters {
                            let _ = w.send(Ok(out.clone()));
                        }
                    }
                    None => self.emit(Event::RoomRejoined(out)).await,
                }
            }
            (InFlight::Join(room_id), Body::Error(e)) => {
                self.rooms.remove(&room_id);
                let error = || Error::Server {
                    code: code_of(&e),
                    message: e.message.clone(),
                };
                match self.join_waiters.remove(&room_id) {
                    Some(waiters) => {
                        for w in waiters {
                            let _ = w.send(Err(error()));
                        }
                    }
                    None => {
                        self.emit(Event::RoomLost {
                            room_id,
                            error: error(),
                        })
                        .await;
                    }
                }
            }
            (InFlight::Sync, Body::SyncOutput(page)) => {
                let last = page.messages.last().map(|m| m.seq);
                for m in page.messages {
                    self.deliver(m).await;
                }
                match last {
                    Some(last) if page.has_more => self.sync_from(last, tx).await?,
                    _ => {
                        if let Some(last) = last {
                            self.tracker.sync_complete(last);
                        }
                        self.sync_running = false;
                        self.persist();
                        self.ack(tx).await?;
                        tx.flush().await?;
                        let seq = self.tracker.contiguous();
                        self.emit(Event::Synced { seq }).await;
                        if last.is_some() && (self.sync_again || self.tracker.has_gap()) {
                            self.start_sync(tx).await?;
                        } else if self.sync_again || self.tracker.has_gap() {
                            // Nothing new came back: ask again later rather than in a tight loop.
                            self.sync_again = true;
                            retry.get_or_insert_with(|| Instant::now() + self.options.retry_after);
                        }
                    }
                }
            }
            (InFlight::Sync, Body::Error(e)) => {
                debug!(code = ?code_of(&e), "sync refused: retrying");
                self.sync_running = false;
                self.sync_again = true;
                retry.get_or_insert_with(|| Instant::now() + self.options.retry_after);
            }
            (InFlight::Heartbeat, _) => {}
            (_, other) => debug!(packet = ?other, "unexpected answer"),
        }
        Ok(())
    }
}
