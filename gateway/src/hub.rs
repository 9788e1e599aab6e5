//! The gateway's registry of signed-in connections and its bus subscriptions.
//!
//! - No subscription per user: events for users (deliveries, kicks, room bans) are routed by gateway
//!   (`zhibo_bus::route`). Each user's first connection here is recorded in presence (awaited before the
//!   sign-in completes, so every event published after it reaches this gateway), the last one removes it.
//!   Two subscriptions carry them, whatever the number of connections: `zhibo.gwu.<id>` (this gateway's
//!   users) and `zhibo.users` (every gateway, used while presence is unreadable); events are
//!   demultiplexed here by their `user_id`, and those of users not held here are dropped.
//! - One subscription for this gateway (`zhibo.gw.<id>`) carrying replies addressed to a connection.
//! - A DeviceOnline event kicks every other connection of that device, on any gateway: a sign-in routes
//!   it to every gateway presence names for the user (this one included).
//! - A RoomBanned event removes each of the user's connections from that room and tells it (RoomKicked,
//!   through its IM queue).
//!
//! - Live rooms live in [`RoomHub`] (`rooms` module), owned here.
//! - Server-wide broadcast (`zhibo.broadcast`): one `RoomMessages` of room 0 per notice, encoded once, to
//!   every signed-in connection through its IM queue (at most half of it).
//!
//! Outbound policy: each connection has two bounds. IM traffic never waits and is never dropped
//! silently: when a connection's IM queue is full, the connection is closed (its client reconnects and
//! syncs what it missed, which is stored). Room frames are written to the connection's socket by the
//! room (`direct`), at most `room_queue` of them owed, and dropped (counted) past that, so a room flood
//! can never push IM out. Broadcasts ride the IM queue but only up to half of it, then are dropped likewise.
//! See docs/ARCHITECTURE.md.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prost::Message as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn, Instrument};
use zhibo_bus::route::{publish_user_event, Route};
use zhibo_bus::{Bus, BusMessage, Handler, HandlerSubscription, Subject};
use zhibo_proto::bus::{room_event, user_event, Delivery, DeviceOnline, RoomEvent, UserEvent};
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{ErrorCode, Kick, KickReason, Message, Packet, RoomKicked};

use crate::queue::{Outbound, QueueSender};
use crate::rooms::{encode_frame, RoomConfig, RoomHub};

/// A random first connection id, so a gateway restarted under the same id (a pod name) never reuses the
/// connection ids of its previous life: a late reply for an old connection then reaches nobody.
fn first_conn_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    // Leave room above so the counter never wraps in practice.
    (h.finish() >> 2).max(1)
}

/// The handle a connection registers with.
#[derive(Debug, Clone)]
pub struct ConnHandle {
    /// The user signed in on it.
    pub user_id: i64,
    /// The device signed in on it.
    pub device_id: i64,
    /// Its outbound queue (IM: full = close). Room frames bypass it (`direct`).
    pub tx: QueueSender<Outbound>,
    /// Cancelled when the connection must close because its queue overflowed.
    pub overflow: CancellationToken,
}

struct UserEntry {
    conns: Vec<u64>,
    presence: UserPresence,
}

/// A user's presence entry for this gateway: being written (every registration of the user waits for
/// its outcome), or written.
enum UserPresence {
    /// `None` until the writing registration knows; then whether it succeeded.
    Pending(watch::Receiver<Option<bool>>),
    /// Recorded: events for the user are routed here.
    Recorded,
}

#[derive(Default)]
struct Inner {
    conns: HashMap<u64, ConnHandle>,
    users: HashMap<i64, UserEntry>,
}

/// How long a sign-in waits for its presence write before failing (nothing would be routed to it).
const PRESENCE_WRITE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Registry and bus demultiplexer of one gateway.
pub struct Hub {
    gateway_id: String,
    bus: Arc<dyn Bus>,
    inner: Mutex<Inner>,
    next_conn: AtomicU64,
    overflow_closes: AtomicU64,
    broadcasts_dropped: AtomicU64,
    rooms: Arc<RoomHub>,
    /// Where the users of this gateway are recorded, so events for them are routed here ([`Hub::set_presence`],
    /// else an in-process one: one process, one gateway).
    presence: std::sync::OnceLock<Arc<dyn zhibo_store::Presence>>,
    /// The subscriptions carrying user events ([`Hub::serve_user_events`]), held for their effect.
    user_events: Mutex<Vec<HandlerSubscription>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("gateway_id", &self.gateway_id)
            .finish()
    }
}

impl Hub {
    /// A hub for gateway `gateway_id` on `bus`, with default room settings.
    pub fn new(gateway_id: String, bus: Arc<dyn Bus>) -> Arc<Self> {
        Self::with_rooms(gateway_id, bus, RoomConfig::default())
    }

    /// A hub for gateway `gateway_id` on `bus` whose live rooms use `rooms`.
    pub fn with_rooms(gateway_id: String, bus: Arc<dyn Bus>, rooms: RoomConfig) -> Arc<Self> {
        Arc::new(Hub {
            rooms: RoomHub::new(gateway_id.clone(), bus.clone(), rooms),
            gateway_id,
            bus,
            inner: Mutex::new(Inner::default()),
            next_conn: AtomicU64::new(first_conn_id()),
            overflow_closes: AtomicU64::new(0),
            broadcasts_dropped: AtomicU64::new(0),
            presence: std::sync::OnceLock::new(),
            user_events: Mutex::new(Vec::new()),
        })
    }

    /// Records each user's first and last connection on this gateway in `presence` (which routes
    /// events for them here, and tells push who is offline). Set once, before serving.
    pub fn set_presence(&self, presence: Arc<dyn zhibo_store::Presence>) {
        let _ = self.presence.set(presence);
    }

    fn presence(&self) -> &Arc<dyn zhibo_store::Presence> {
        self.presence
            .get_or_init(|| Arc::new(zhibo_store::presence::MemoryPresence::new()))
    }

    /// The live rooms of this gateway.
    pub fn rooms(&self) -> &Arc<RoomHub> {
        &self.rooms
    }

    /// Rooms this gateway is subscribed to: those with at least one local viewer.
    pub fn room_subscription_count(&self) -> usize {
        self.rooms.subscription_count()
    }

    /// Room frames dropped for connections owed a full `room_queue`, and broadcasts dropped for
    /// connections whose IM queue was half full.
    pub fn room_frames_dropped(&self) -> u64 {
        self.rooms.frames_dropped() + self.broadcasts_dropped.load(Ordering::Relaxed)
    }

    /// This gateway's id.
    pub fn gateway_id(&self) -> &str {
        &self.gateway_id
    }

    /// The bus.
    pub fn bus(&self) -> &Arc<dyn Bus> {
        &self.bus
    }

    /// A fresh connection id, unique within this gateway.
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Signed-in connections on this gateway.
    pub fn connection_count(&self) -> usize {
        self.lock().conns.len()
    }

    /// Users with a connection on this gateway.
    pub fn user_count(&self) -> usize {
        self.lock().users.len()
    }

    /// Connections closed because their outbound queue overflowed.
    pub fn overflow_closes(&self) -> u64 {
        self.overflow_closes.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Subscribes to the user events routed to this gateway and to every gateway, and dispatches them to
    /// the connections of their users until the hub is dropped. Call before serving connections.
    ///
    /// # Errors
    /// When a subscription is refused.
    pub async fn serve_user_events(self: &Arc<Self>) -> zhibo_bus::Result<()> {
        for subject in [
            Subject::gateway_users(&self.gateway_id),
            Subject::all_gateways_users(),
        ] {
            // Weak: the bus holds the handler, and the hub holds the bus.
            let hub = Arc::downgrade(self);
            let handler: Handler = Arc::new(move |m: &BusMessage| {
                let Some(hub) = hub.upgrade() else { return };
                hub.on_user_event(m);
            });
            let sub = self.bus.subscribe_handler(&subject, handler).await?;
            self.user_events
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(sub);
        }
        // Live at the server before the first sign-in is confirmed.
        self.bus.flush().await
    }

    /// Subscribes to this gateway's reply subject and dispatches what arrives until the bus ends.
    ///
    /// # Errors
    /// When the subscription is refused.
    pub async fn serve_replies(self: &Arc<Self>) -> zhibo_bus::Result<tokio::task::JoinHandle<()>> {
        let mut sub = self
            .bus
            .subscribe(&Subject::gateway(&self.gateway_id))
            .await?;
        let hub = Arc::clone(self);
        Ok(tokio::spawn(
            async move {
                while let Some(m) = sub.next().await {
                    match Delivery::decode(m.payload) {
                        Ok(d) => hub.deliver_to_conn(d.conn_id, d.packets),
                        Err(e) => warn!(error = %e, "undecodable reply on gateway subject"),
                    }
                }
            }
            .in_current_span(),
        ))
    }

    /// Subscribes to the server-wide broadcast subject and pushes each notice to every connection (as
    /// room 0, through its IM queue: broadcasts are rare, and most connections never join a room;
    /// a full queue drops the notice for that connection) until the bus ends.
    ///
    /// # Errors
    /// When the subscription is refused.
    pub async fn serve_broadcast(
        self: &Arc<Self>,
    ) -> zhibo_bus::Result<tokio::task::JoinHandle<()>> {
        let mut sub = self.bus.subscribe(&Subject::broadcast()).await?;
        let hub = Arc::clone(self);
        Ok(tokio::spawn(
            async move {
                while let Some(m) = sub.next().await {
                    match RoomEvent::decode(m.payload) {
                        Ok(RoomEvent {
                            event: Some(room_event::Event::Message(msg)),
                            ..
                        }) => {
                            hub.broadcast(msg);
                        }
                        Ok(_) => {}
                        Err(e) => warn!(error = %e, "undecodable broadcast"),
                    }
                }
            }
            .in_current_span(),
        ))
    }

    /// Registers a signed-in connection, recording its user in presence if the user has no connection
    /// here yet, then announces the device online so older connections of it are kicked cluster-wide.
    ///
    /// Every registration of a user waits until the user's presence entry is written, also one that
    /// finds it still being written by another connection. If that write fails, every registration
    /// waiting for it fails and none of those connections stays registered.
    ///
    /// # Errors
    /// When presence cannot be written, or the bus refuses the announcement.
    pub async fn register(
        self: &Arc<Self>,
        conn_id: u64,
        handle: ConnHandle,
    ) -> zhibo_bus::Result<()> {
        let user_id = handle.user_id;
        let device_id = handle.device_id;
        // `Ok(sender)`: this registration writes presence. `Err(receiver)`: another one does (or did).
        let role = {
            let mut inner = self.lock();
            inner.conns.insert(conn_id, handle);
            match inner.users.get_mut(&user_id) {
                Some(entry) => {
                    entry.conns.push(conn_id);
                    match &entry.presence {
                        UserPresence::Pending(rx) => Err(Some(rx.clone())),
                        UserPresence::Recorded => Err(None),
                    }
                }
                None => {
                    let (tx, rx) = watch::channel(None);
                    inner.users.insert(
                        user_id,
                        UserEntry {
                            conns: vec![conn_id],
                            presence: UserPresence::Pending(rx),
                        },
                    );
                    Ok(tx)
                }
            }
        };
        match role {
            Ok(outcome) => self.record_user(user_id, outcome).await?,
            Err(None) => {}
            Err(Some(mut pending)) => {
                let ok = matches!(
                    pending.wait_for(Option::is_some).await.as_deref(),
                    Ok(Some(true))
                );
                if !ok {
                    // The writer removed this connection with the user (or vanished): make sure.
                    self.unregister(conn_id);
                    return Err(zhibo_bus::Error::Subscribe {
                        subject: Subject::gateway_users(&self.gateway_id).to_string(),
                        message: "the user's presence could not be recorded".into(),
                    });
                }
            }
        }
        let online = UserEvent {
            user_id,
            event: Some(user_event::Event::DeviceOnline(DeviceOnline {
                user_id,
                device_id,
                gateway_id: self.gateway_id.clone(),
                conn_id,
            })),
        };
        // Every gateway holding the user, this one included (its own entry is written): the older
        // connections of the device are kicked wherever they are.
        let gateways = match self.presence().gateways(&[user_id]).await.as_deref() {
            Ok([Some(g)]) => {
                // This gateway's own older connections of the device too, even if Redis just lost
                // its entry.
                let mut g = g.clone();
                if !g.contains(&self.gateway_id) {
                    g.push(self.gateway_id.clone());
                }
                Some(g)
            }
            _ => None,
        };
        let route = Route::of(gateways.as_deref());
        publish_user_event(self.bus.as_ref(), user_id, online, route, Vec::new())
            .await
            .map(|_| ())
            .inspect_err(|_| self.unregister(conn_id))
    }

    /// Writes `user_id`'s presence entry for this gateway (bounded wait) and tells the registrations
    /// waiting for it the outcome. On failure the user and every connection registered under it
    /// meanwhile are forgotten.
    async fn record_user(
        self: &Arc<Self>,
        user_id: i64,
        outcome: watch::Sender<Option<bool>>,
    ) -> zhibo_bus::Result<()> {
        let connected = self.presence().connected(&self.gateway_id, user_id);
        let recorded = match tokio::time::timeout(PRESENCE_WRITE_WAIT, connected).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("presence write timed out".to_owned()),
        };
        let mut inner = self.lock();
        let result = match recorded {
            Ok(()) => {
                // Every connection of the user unregisters only after its registration returned, so
                // the entry is still this one.
                if let Some(entry) = inner.users.get_mut(&user_id) {
                    entry.presence = UserPresence::Recorded;
                }
                Ok(())
            }
            Err(message) => {
                warn!(user_id, %message, "presence write failed: sign-in refused");
                if let Some(entry) = inner.users.remove(&user_id) {
                    for c in entry.conns {
                        inner.conns.remove(&c);
                    }
                }
                Err(zhibo_bus::Error::Subscribe {
                    subject: Subject::gateway_users(&self.gateway_id).to_string(),
                    message,
                })
            }
        };
        if result.is_err() {
            // It may have been written after all (a timeout): take it back. Under the hub's lock, so
            // it is ordered before any later registration's write (it never waits).
            self.presence().disconnected(&self.gateway_id, user_id);
        }
        drop(inner);
        // Receivers gone (no waiter) is fine.
        let _ = outcome.send(Some(result.is_ok()));
        result
    }

    /// Forgets a connection (and its room seats); removes the user's presence entry with its last
    /// local connection.
    pub fn unregister(&self, conn_id: u64) {
        self.rooms.leave_all(conn_id);
        let mut inner = self.lock();
        let Some(handle) = inner.conns.remove(&conn_id) else {
            return;
        };
        if let Some(entry) = inner.users.get_mut(&handle.user_id) {
            entry.conns.retain(|c| *c != conn_id);
            if entry.conns.is_empty() {
                let recorded = matches!(
                    inner.users.remove(&handle.user_id).map(|e| e.presence),
                    Some(UserPresence::Recorded)
                );
                // A failed write took its entry back itself. Under the hub's lock (it never waits):
                // a new connection of the user registering meanwhile writes its entry after this.
                if recorded {
                    self.presence()
                        .disconnected(&self.gateway_id, handle.user_id);
                }
                drop(inner);
            }
        }
    }

    fn on_user_event(&self, m: &BusMessage) {
        let (user_id, event) = match UserEvent::decode(m.payload.clone()) {
            Ok(UserEvent {
                user_id,
                event: Some(e),
            }) => (user_id, e),
            Ok(_) => return,
            Err(e) => {
                warn!(error = %e, "undecodable user event");
                return;
            }
        };
        let inner = self.lock();
        let Some(entry) = inner.users.get(&user_id) else {
            // Routed everywhere (presence unreadable), or the user just left.
            return;
        };
        // The delivery's trace continues here from the publisher's.
        let span = tracing::info_span!("gateway.deliver", user_id);
        zhibo_telemetry::trace::set_parent(&span, &m.headers);
        let _entered = span.enter();
        match event {
            user_event::Event::Delivery(d) => {
                for conn_id in &entry.conns {
                    if let Some(h) = inner.conns.get(conn_id) {
                        if h.device_id != d.exclude_device_id {
                            self.push(*conn_id, h, &d.packets, false);
                        }
                    }
                }
            }
            user_event::Event::DeviceSignedOut(o) => {
                for conn_id in &entry.conns {
                    let Some(h) = inner.conns.get(conn_id) else {
                        continue;
                    };
                    if h.device_id == o.device_id {
                        debug!(conn_id, device_id = o.device_id, "kicking: signed out");
                        let kick = Packet::new(
                            0,
                            Body::Kick(Kick {
                                reason: KickReason::SignedOut as i32,
                                text: "this device signed out".into(),
                            }),
                        );
                        if h.tx.try_send(Outbound::Close(Box::new(kick))).is_err() {
                            h.overflow.cancel();
                        }
                    }
                }
            }
            user_event::Event::RoomBanned(b) => {
                // Every connection of the user: out of the room here at once, and told through its IM
                // queue; the connection forgets the room (and leaves it again, for a join that was in
                // progress) when it writes the notice, or drops the notice if it was not in the room.
                let kicked = Packet::new(
                    0,
                    Body::RoomKicked(RoomKicked {
                        room_id: b.room_id,
                        code: ErrorCode::RoomBanned as i32,
                        text: "you were banned from this room".into(),
                    }),
                );
                for conn_id in &entry.conns {
                    let Some(h) = inner.conns.get(conn_id) else {
                        continue;
                    };
                    debug!(conn_id, room_id = b.room_id, "removing from room: banned");
                    self.rooms.leave(*conn_id, b.room_id);
                    self.push(*conn_id, h, std::slice::from_ref(&kicked), false);
                }
            }
            user_event::Event::DeviceOnline(o) => {
                for conn_id in &entry.conns {
                    let Some(h) = inner.conns.get(conn_id) else {
                        continue;
                    };
                    let same = o.gateway_id == self.gateway_id && o.conn_id == *conn_id;
                    if h.device_id == o.device_id && !same {
                        debug!(
                            conn_id,
                            device_id = o.device_id,
                            "kicking: signed in elsewhere"
                        );
                        let kick = Packet::new(
                            0,
                            Body::Kick(Kick {
                                reason: KickReason::SignedInElsewhere as i32,
                                text: "this device signed in on another connection".into(),
                            }),
                        );
                        if h.tx.try_send(Outbound::Close(Box::new(kick))).is_err() {
                            h.overflow.cancel();
                        }
                    }
                }
            }
        }
    }

    /// Fans a broadcast message out to every signed-in connection's IM queue as one frame of room 0,
    /// dropped (and counted with the room frames) for a connection whose queue is half full.
    pub fn broadcast(&self, message: Message) {
        let frame = encode_frame(0, vec![message], 0);
        let mut dropped = 0;
        let inner = self.lock();
        for h in inner.conns.values() {
            // At most half the IM queue: a burst of broadcasts must never fill it and get a slow
            // reader closed for an IM message that follows.
            let room = (h.tx.capacity() / 2).max(1);
            if h.tx
                .try_send_below(Outbound::Encoded(Box::new(frame.clone())), room)
                .is_err()
            {
                dropped += 1;
            }
        }
        drop(inner);
        if dropped > 0 {
            self.broadcasts_dropped
                .fetch_add(dropped, Ordering::Relaxed);
        }
    }

    fn deliver_to_conn(&self, conn_id: u64, packets: Vec<Packet>) {
        let inner = self.lock();
        if let Some(h) = inner.conns.get(&conn_id) {
            self.push(conn_id, h, &packets, true);
        }
    }

    fn push(&self, conn_id: u64, h: &ConnHandle, packets: &[Packet], replies: bool) {
        for p in packets {
            let out = if replies {
                Outbound::Reply(Box::new(p.clone()))
            } else {
                Outbound::Packet(Box::new(p.clone()))
            };
            if h.tx.try_send(out).is_err() {
                warn!(conn_id, "outbound queue full: closing slow connection");
                self.overflow_closes.fetch_add(1, Ordering::Relaxed);
                h.overflow.cancel();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::time::Duration;

    use bytes::Bytes;
    use zhibo_bus::memory::MemoryBus;
    use zhibo_proto::bus::Delivery;
    use zhibo_store::Presence as _;

    use super::*;
    use crate::queue::{queue, QueueReceiver};

    /// In-process presence whose writes wait until `open`, then fail while `fail` is set.
    struct GatedPresence {
        inner: zhibo_store::presence::MemoryPresence,
        open: watch::Sender<bool>,
        fail: AtomicBool,
        writes: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl zhibo_store::Presence for GatedPresence {
        async fn connected(&self, gateway_id: &str, user_id: i64) -> zhibo_store::Result<()> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            let mut open = self.open.subscribe();
            let _ = open.wait_for(|o| *o).await;
            if self.fail.load(Ordering::SeqCst) {
                return Err(zhibo_store::Error::new(
                    zhibo_store::ErrorKind::Unavailable,
                    "refused (test)",
                ));
            }
            self.inner.connected(gateway_id, user_id).await
        }
        fn disconnected(&self, gateway_id: &str, user_id: i64) {
            self.inner.disconnected(gateway_id, user_id);
        }
        async fn gateways(&self, users: &[i64]) -> zhibo_store::Result<Vec<Option<Vec<String>>>> {
            self.inner.gateways(users).await
        }
        fn watch(&self, listener: zhibo_store::PresenceListener) {
            self.inner.watch(listener);
        }
    }

    /// A hub on the in-process bus with gated presence, serving its user events.
    async fn gated(fail: bool) -> (Arc<Hub>, MemoryBus, Arc<GatedPresence>) {
        let presence = Arc::new(GatedPresence {
            inner: zhibo_store::presence::MemoryPresence::new(),
            open: watch::channel(false).0,
            fail: AtomicBool::new(fail),
            writes: AtomicUsize::new(0),
        });
        let bus = MemoryBus::new();
        let hub = Hub::new("gw".into(), Arc::new(bus.clone()));
        hub.set_presence(presence.clone());
        hub.serve_user_events().await.expect("user events");
        (hub, bus, presence)
    }

    fn handle(user_id: i64, device_id: i64) -> (ConnHandle, QueueReceiver<Outbound>) {
        let (tx, rx) = queue(16);
        let h = ConnHandle {
            user_id,
            device_id,
            tx,
            overflow: CancellationToken::new(),
        };
        (h, rx)
    }

    /// Waits (bounded) until presence saw `n` writes.
    async fn writes_reach(presence: &GatedPresence, n: usize) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while presence.writes.load(Ordering::SeqCst) < n {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("presence write attempted");
    }

    /// Two devices of a user register while the user's presence write is in flight: the second is not
    /// confirmed before it is recorded, one write serves both, deliveries reach both.
    #[tokio::test]
    async fn a_second_registration_waits_for_the_users_presence() {
        let (hub, bus, presence) = gated(false).await;
        let (h1, mut rx1) = handle(7, 1);
        let (h2, mut rx2) = handle(7, 2);
        let first = tokio::spawn({
            let hub = hub.clone();
            async move { hub.register(1, h1).await }
        });
        writes_reach(&presence, 1).await;
        let second = tokio::spawn({
            let hub = hub.clone();
            async move { hub.register(2, h2).await }
        });
        // Still pending while the write is: it must not be told it is signed in.
        assert!(
            tokio::time::timeout(Duration::from_millis(200), async {
                while !second.is_finished() {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .is_err(),
            "the second registration returned before the user was recorded"
        );
        presence.open.send_replace(true);
        first.await.expect("task").expect("first registered");
        second.await.expect("task").expect("second registered");
        assert_eq!(
            presence.writes.load(Ordering::SeqCst),
            1,
            "one presence write per user"
        );
        assert_eq!((hub.connection_count(), hub.user_count()), (2, 1));
        publish_user(
            &bus,
            7,
            user_event::Event::Delivery(Delivery {
                packets: vec![Packet::new(0, Body::Heartbeat(Default::default()))],
                ..Default::default()
            }),
        )
        .await;
        for rx in [&mut rx1, &mut rx2] {
            let got = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    if let Outbound::Packet(p) = rx.recv().await {
                        return p;
                    }
                }
            })
            .await
            .expect("delivered");
            assert!(matches!(got.body, Some(Body::Heartbeat(_))));
        }
    }

    /// The user's presence write fails while two registrations wait for it: both fail, and neither the
    /// connections nor the user stay registered (nothing left registered that events could not reach).
    /// A later registration writes afresh.
    #[tokio::test]
    async fn a_failed_presence_write_fails_every_waiting_registration() {
        let (hub, _bus, presence) = gated(true).await;
        let (h1, _rx1) = handle(7, 1);
        let (h2, _rx2) = handle(7, 2);
        let first = tokio::spawn({
            let hub = hub.clone();
            async move { hub.register(1, h1).await }
        });
        writes_reach(&presence, 1).await;
        let second = tokio::spawn({
            let hub = hub.clone();
            async move { hub.register(2, h2).await }
        });
        // Let the second reach its wait (it takes the hub's lock first).
        tokio::time::timeout(Duration::from_secs(5), async {
            while hub.connection_count() < 2 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("second registration under way");
        presence.open.send_replace(true);
        assert!(first.await.expect("task").is_err());
        assert!(
            second.await.expect("task").is_err(),
            "second confirmed without presence"
        );
        assert_eq!((hub.connection_count(), hub.user_count()), (0, 0));
        assert_eq!(
            presence.gateways(&[7]).await.expect("read"),
            [Some(vec![])],
            "nothing left recorded"
        );
        // Presence recovers: the next registration writes again.
        presence.fail.store(false, Ordering::SeqCst);
        let (h3, _rx3) = handle(7, 3);
        hub.register(3, h3).await.expect("registered");
        assert_eq!(presence.writes.load(Ordering::SeqCst), 2);
        assert_eq!((hub.connection_count(), hub.user_count()), (1, 1));
    }

    /// A hub on the in-process bus (whose handlers run inside `publish`, so what a publish delivers
    /// is queued when it returns) with connection `conn_id` of `user_id`/`device_id` registered.
    async fn registered(
        hub: &Arc<Hub>,
        conn_id: u64,
        user_id: i64,
        device_id: i64,
    ) -> QueueReceiver<Outbound> {
        let (h, rx) = handle(user_id, device_id);
        hub.register(conn_id, h).await.expect("registered");
        rx
    }

    /// Publishes a user event to gateway `gw`, as a logic worker does.
    async fn publish_user(bus: &MemoryBus, user_id: i64, event: user_event::Event) {
        let event = UserEvent {
            user_id: 0,
            event: Some(event),
        };
        zhibo_bus::route::publish_user_event(
            bus,
            user_id,
            event,
            zhibo_bus::route::Route::Gateways(&["gw".to_owned()]),
            Vec::new(),
        )
        .await
        .expect("publish");
    }

    /// A hub on the in-process bus, serving its user events.
    async fn served(bus: &MemoryBus) -> Arc<Hub> {
        let hub = Hub::new("gw".into(), Arc::new(bus.clone()));
        hub.serve_user_events().await.expect("user events");
        hub
    }

    fn heartbeat() -> Packet {
        Packet::new(0, Body::Heartbeat(Default::default()))
    }

    /// Registration records each user once in presence, counts connections, holds no subscription
    /// per user, and the last unregistration removes the user from presence.
    #[tokio::test]
    async fn register_and_unregister_track_connections_and_presence() {
        let bus = MemoryBus::new();
        let hub = served(&bus).await;
        let subjects = bus.subject_count();
        let _a = registered(&hub, 1, 7, 1).await;
        let _b = registered(&hub, 2, 7, 2).await;
        let _c = registered(&hub, 3, 8, 3).await;
        assert_eq!((hub.connection_count(), hub.user_count()), (3, 2));
        assert_eq!(bus.subject_count(), subjects, "no subscription per user");
        assert_eq!(
            hub.presence().gateways(&[7, 8, 9]).await.expect("read"),
            [
                Some(vec!["gw".to_owned()]),
                Some(vec!["gw".to_owned()]),
                Some(vec![])
            ]
        );
        hub.unregister(1);
        assert_eq!((hub.connection_count(), hub.user_count()), (2, 2));
        hub.unregister(2);
        hub.unregister(3);
        hub.unregister(3);
        assert_eq!((hub.connection_count(), hub.user_count()), (0, 0));
        assert_eq!(
            hub.presence().gateways(&[7, 8]).await.expect("read"),
            [Some(vec![]), Some(vec![])],
            "out of presence with the last connection"
        );
    }

    /// A user's delivery reaches each of the user's connections except the excluded device's, and no
    /// other user's; a reply on the gateway subject reaches only the connection it names, as a reply.
    #[tokio::test]
    async fn deliveries_are_demultiplexed_by_user_device_and_connection() {
        let bus = MemoryBus::new();
        let hub = served(&bus).await;
        let replies = hub.serve_replies().await.expect("replies");
        let mut a = registered(&hub, 1, 7, 1).await;
        let mut b = registered(&hub, 2, 7, 2).await;
        let mut c = registered(&hub, 3, 8, 3).await;
        publish_user(
            &bus,
            7,
            user_event::Event::Delivery(Delivery {
                packets: vec![heartbeat(), heartbeat()],
                exclude_device_id: 2,
                ..Default::default()
            }),
        )
        .await;
        for _ in 0..2 {
            assert!(matches!(a.try_recv(), Some(Outbound::Packet(_))));
        }
        assert!(a.try_recv().is_none());
        assert!(b.try_recv().is_none(), "the sending device is left out");
        assert!(c.try_recv().is_none(), "another user's connection");
        // Routed to every gateway (presence unreadable): this gateway keeps its user's, drops the rest.
        for user in [8, 99] {
            zhibo_bus::route::publish_user_event(
                &bus,
                user,
                UserEvent {
                    user_id: 0,
                    event: Some(user_event::Event::Delivery(Delivery {
                        packets: vec![heartbeat()],
                        ..Default::default()
                    })),
                },
                zhibo_bus::route::Route::Everywhere,
                Vec::new(),
            )
            .await
            .expect("publish");
        }
        assert!(matches!(c.try_recv(), Some(Outbound::Packet(_))));
        assert!(c.try_recv().is_none() && a.try_recv().is_none() && b.try_recv().is_none());
        let reply = Delivery {
            conn_id: 2,
            packets: vec![heartbeat()],
            ..Default::default()
        };
        bus.publish(
            &Subject::gateway("gw"),
            Vec::new(),
            Bytes::from(reply.encode_to_vec()),
        )
        .await
        .expect("publish");
        let got = tokio::time::timeout(Duration::from_secs(5), b.recv())
            .await
            .expect("reply delivered");
        assert!(matches!(got, Outbound::Reply(_)), "{got:?}");
        assert!(a.try_recv().is_none() && c.try_recv().is_none());
        replies.abort();
    }

    fn kick_reason(o: Option<Outbound>) -> KickReason {
        match o {
            Some(Outbound::Close(p)) => match p.body {
                Some(Body::Kick(k)) => KickReason::try_from(k.reason).expect("reason"),
                other => panic!("expected a kick, got {other:?}"),
            },
            other => panic!("expected a close, got {other:?}"),
        }
    }

    /// A device signing in again kicks its older connection (not the new one, not the user's other
    /// devices); signing a device out kicks its connections only.
    #[tokio::test]
    async fn kicks_reach_the_devices_older_and_signed_out_connections() {
        let bus = MemoryBus::new();
        let hub = served(&bus).await;
        let mut old = registered(&hub, 1, 7, 1).await;
        let mut other = registered(&hub, 2, 7, 2).await;
        assert!(
            old.try_recv().is_none(),
            "its own DeviceOnline kicks nobody"
        );
        let mut new = registered(&hub, 3, 7, 1).await;
        assert_eq!(kick_reason(old.try_recv()), KickReason::SignedInElsewhere);
        assert!(new.try_recv().is_none() && other.try_recv().is_none());
        // The same device signing in on another gateway.
        publish_user(
            &bus,
            7,
            user_event::Event::DeviceOnline(DeviceOnline {
                user_id: 7,
                device_id: 2,
                gateway_id: "gw-2".into(),
                conn_id: 3,
            }),
        )
        .await;
        assert_eq!(kick_reason(other.try_recv()), KickReason::SignedInElsewhere);
        assert!(new.try_recv().is_none());
        publish_user(
            &bus,
            7,
            user_event::Event::DeviceSignedOut(zhibo_proto::bus::DeviceSignedOut {
                user_id: 7,
                device_id: 1,
            }),
        )
        .await;
        assert_eq!(kick_reason(new.try_recv()), KickReason::SignedOut);
    }

    /// A full IM queue closes its connection (counted), never blocks the others.
    #[tokio::test]
    async fn a_full_im_queue_closes_its_connection() {
        let bus = MemoryBus::new();
        let hub = served(&bus).await;
        let (h, _rx) = {
            let (tx, rx) = queue(2);
            (
                ConnHandle {
                    user_id: 7,
                    device_id: 1,
                    tx,
                    overflow: CancellationToken::new(),
                },
                rx,
            )
        };
        let overflow = h.overflow.clone();
        hub.register(1, h).await.expect("registered");
        let mut roomy = registered(&hub, 2, 7, 2).await;
        publish_user(
            &bus,
            7,
            user_event::Event::Delivery(Delivery {
                packets: vec![heartbeat(), heartbeat(), heartbeat()],
                ..Default::default()
            }),
        )
        .await;
        assert!(overflow.is_cancelled(), "the slow connection is closed");
        assert_eq!(hub.overflow_closes(), 1);
        let got: Vec<_> = std::iter::from_fn(|| roomy.try_recv()).collect();
        assert_eq!(got.len(), 3, "the other connection got everything");
    }

    #[tokio::test]
    async fn broadcasts_fill_at_most_half_an_im_queue() {
        let hub = Hub::new("gw".into(), Arc::new(MemoryBus::new()));
        let (tx, mut rx) = queue::<Outbound>(8);
        let h = ConnHandle {
            user_id: 7,
            device_id: 1,
            tx: tx.clone(),
            overflow: CancellationToken::new(),
        };
        hub.register(1, h).await.expect("registered");
        for i in 0..10 {
            let notice = Message {
                message_id: i,
                ..Message::default()
            };
            hub.broadcast(notice);
        }
        assert_eq!(
            hub.room_frames_dropped(),
            6,
            "4 of 10 broadcasts fit in half the queue"
        );
        for _ in 0..4 {
            tx.try_send(Outbound::Packet(Box::default()))
                .expect("the other half stays for IM");
        }
        let first = rx.recv().await;
        assert!(matches!(first, Outbound::Encoded(_)), "{first:?}");
    }

    /// Presence whose `disconnected` tells the test it started, then waits to be released.
    struct SlowLeave {
        inner: zhibo_store::presence::MemoryPresence,
        entered: std::sync::mpsc::Sender<()>,
        release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    }

    #[async_trait::async_trait]
    impl zhibo_store::Presence for SlowLeave {
        async fn connected(&self, g: &str, u: i64) -> zhibo_store::Result<()> {
            self.inner.connected(g, u).await
        }
        fn disconnected(&self, g: &str, u: i64) {
            let _ = self.entered.send(());
            let _ = self.release.lock().expect("lock").recv();
            self.inner.disconnected(g, u);
        }
        async fn gateways(&self, users: &[i64]) -> zhibo_store::Result<Vec<Option<Vec<String>>>> {
            self.inner.gateways(users).await
        }
        fn watch(&self, l: zhibo_store::PresenceListener) {
            self.inner.watch(l);
        }
    }

    /// The user's last connection leaves while a new one of the same user registers (found in
    /// review): the removal of the old entry can never land after the new one is recorded, so the
    /// user stays routed here.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leave_racing_a_new_registration_keeps_the_user_routed() {
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel();
        let presence = Arc::new(SlowLeave {
            inner: zhibo_store::presence::MemoryPresence::new(),
            entered: entered_tx,
            release: std::sync::Mutex::new(release_rx),
        });
        let bus = MemoryBus::new();
        let hub = served(&bus).await;
        hub.set_presence(presence.clone());
        let _a = registered(&hub, 1, 7, 1).await;
        let leaving = std::thread::spawn({
            let hub = hub.clone();
            move || hub.unregister(1)
        });
        entered.recv().expect("the leave started");
        let joining = tokio::spawn({
            let hub = hub.clone();
            async move {
                let (h, _rx) = handle(7, 2);
                hub.register(2, h).await
            }
        });
        release.send(()).expect("release");
        leaving.join().expect("leave");
        joining.await.expect("task").expect("registered");
        assert_eq!((hub.connection_count(), hub.user_count()), (1, 1));
        assert_eq!(
            presence.gateways(&[7]).await.expect("read"),
            [Some(vec!["gw".to_owned()])],
            "user 7 has a connection here, so presence must name this gateway"
        );
    }
}
