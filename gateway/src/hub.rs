//! The gateway's registry of signed-in connections and its bus subscriptions.
//!
//! - One subscription per user with at least one device on this gateway (`zhibo.user.<id>`), shared by that
//!   user's local connections and dropped with the last of them. Deliveries on it are demultiplexed here.
//! - One subscription for this gateway (`zhibo.gw.<id>`) carrying replies addressed to a connection.
//! - A DeviceOnline event on a user's subject kicks every other connection of that device, on any gateway.
//!
//! - Live rooms live in [`RoomHub`] (`rooms` module), owned here; `zhibo.broadcast` is served here too.
//!
//! Outbound policy: each connection has two bounded queues. IM traffic never waits and is never dropped
//! silently: when a connection's IM queue is full, the connection is closed (its client reconnects and
//! syncs what it missed, which is stored). Room traffic goes to a separate, small room queue, created at
//! the connection's first join, and is dropped (counted) when that is full, so a room flood can never
//! push IM out. Broadcasts ride the IM queue but only up to half of it, then are dropped likewise.
//! See docs/ARCHITECTURE.md.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use prost::Message as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn, Instrument};
use zhibo_bus::{Bus, BusMessage, Handler, HandlerSubscription, Subject};
use zhibo_proto::bus::{room_event, user_event, Delivery, DeviceOnline, RoomEvent, UserEvent};
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{Kick, KickReason, Packet};

use crate::queue::QueueSender;
use crate::rooms::{RoomConfig, RoomHub};

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

/// What the hub asks a connection to write. Boxed: a queued item is small, and the queue's buffer is
/// sized in items.
#[derive(Debug)]
pub enum Outbound {
    /// A packet to write.
    Packet(Box<Packet>),
    /// A reply to one of this connection's requests (counted to let in-flight requests finish on drain).
    Reply(Box<Packet>),
    /// Write this packet, then close (kick).
    Close(Box<Packet>),
    /// An encoded frame shared by many connections (a cluster-wide broadcast). Dropped, never closing
    /// the connection, when the queue is full.
    Encoded(Box<Bytes>),
}

/// The handle a connection registers with.
#[derive(Debug, Clone)]
pub struct ConnHandle {
    /// The user signed in on it.
    pub user_id: i64,
    /// The device signed in on it.
    pub device_id: i64,
    /// Its outbound queue (IM: full = close). Its room queue, created at its first join, is held by the
    /// room hub's viewers.
    pub tx: QueueSender<Outbound>,
    /// Cancelled when the connection must close because its queue overflowed.
    pub overflow: CancellationToken,
}

struct UserEntry {
    conns: Vec<u64>,
    sub: UserSub,
}

/// A user's subscription: being made (every registration of the user waits for its outcome), or live.
enum UserSub {
    /// `None` until the subscribing registration knows; then whether it succeeded.
    Pending(watch::Receiver<Option<bool>>),
    /// Held for its effect: dropping it unsubscribes.
    #[allow(dead_code)]
    Live(HandlerSubscription),
}

#[derive(Default)]
struct Inner {
    conns: HashMap<u64, ConnHandle>,
    users: HashMap<i64, UserEntry>,
}

/// Registry and bus demultiplexer of one gateway.
pub struct Hub {
    gateway_id: String,
    bus: Arc<dyn Bus>,
    inner: Mutex<Inner>,
    next_conn: AtomicU64,
    overflow_closes: AtomicU64,
    rooms: Arc<RoomHub>,
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
        })
    }

    /// The live rooms of this gateway.
    pub fn rooms(&self) -> &Arc<RoomHub> {
        &self.rooms
    }

    /// Rooms this gateway is subscribed to: those with at least one local viewer.
    pub fn room_subscription_count(&self) -> usize {
        self.rooms.subscription_count()
    }

    /// Room frames dropped for connections whose room queue was full, and broadcasts dropped for
    /// connections whose IM queue was half full.
    pub fn room_frames_dropped(&self) -> u64 {
        self.rooms.frames_dropped()
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

    /// Users with a subscription on this gateway.
    pub fn user_subscription_count(&self) -> usize {
        self.lock().users.len()
    }

    /// Connections closed because their outbound queue overflowed.
    pub fn overflow_closes(&self) -> u64 {
        self.overflow_closes.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
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
    /// room 0, through its IM queue: broadcasts are rare, and most connections never open a room queue;
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
                        }) => {
                            let inner = hub.lock();
                            hub.rooms
                                .broadcast(msg, inner.conns.values().map(|h| &h.tx));
                        }
                        Ok(_) => {}
                        Err(e) => warn!(error = %e, "undecodable broadcast"),
                    }
                }
            }
            .in_current_span(),
        ))
    }

    /// Registers a signed-in connection, subscribing to its user's subject if the user has none here
    /// yet, then announces the device online so older connections of it are kicked cluster-wide.
    ///
    /// Every registration of a user waits until the user's subscription is live, also one that finds it
    /// still being made by another connection. If that subscription fails, every registration waiting
    /// for it fails and none of those connections stays registered.
    ///
    /// # Errors
    /// When the bus refuses the subscription or the announcement.
    pub async fn register(
        self: &Arc<Self>,
        conn_id: u64,
        handle: ConnHandle,
    ) -> zhibo_bus::Result<()> {
        let user_id = handle.user_id;
        let device_id = handle.device_id;
        // `Ok(sender)`: this registration subscribes. `Err(receiver)`: another one does (or did).
        let role = {
            let mut inner = self.lock();
            inner.conns.insert(conn_id, handle);
            match inner.users.get_mut(&user_id) {
                Some(entry) => {
                    entry.conns.push(conn_id);
                    match &entry.sub {
                        UserSub::Pending(rx) => Err(Some(rx.clone())),
                        UserSub::Live(_) => Err(None),
                    }
                }
                None => {
                    let (tx, rx) = watch::channel(None);
                    inner.users.insert(
                        user_id,
                        UserEntry {
                            conns: vec![conn_id],
                            sub: UserSub::Pending(rx),
                        },
                    );
                    Ok(tx)
                }
            }
        };
        match role {
            Ok(outcome) => self.subscribe_user(user_id, outcome).await?,
            Err(None) => {}
            Err(Some(mut pending)) => {
                let ok = matches!(
                    pending.wait_for(Option::is_some).await.as_deref(),
                    Ok(Some(true))
                );
                if !ok {
                    // The subscriber removed this connection with the user (or vanished): make sure.
                    self.unregister(conn_id);
                    return Err(zhibo_bus::Error::Subscribe {
                        subject: Subject::user(user_id).to_string(),
                        message: "the user's subscription failed".into(),
                    });
                }
            }
        }
        let online = UserEvent {
            event: Some(user_event::Event::DeviceOnline(DeviceOnline {
                user_id,
                device_id,
                gateway_id: self.gateway_id.clone(),
                conn_id,
            })),
        };
        self.bus
            .publish(
                &Subject::user(user_id),
                Vec::new(),
                Bytes::from(online.encode_to_vec()),
            )
            .await
            .inspect_err(|_| self.unregister(conn_id))
    }

    /// Makes `user_id`'s subscription (flushed, so it is live at the server before any of the user's
    /// connections is told it is signed in) and tells the registrations waiting for it the outcome. On
    /// failure the user and every connection registered under it meanwhile are forgotten.
    async fn subscribe_user(
        self: &Arc<Self>,
        user_id: i64,
        outcome: watch::Sender<Option<bool>>,
    ) -> zhibo_bus::Result<()> {
        // A handler, not a stream: on the in-process bus it costs no queue and no task per user.
        // Weak: the bus holds the handler, and the hub holds the bus.
        let hub = Arc::downgrade(self);
        let handler: Handler = Arc::new(move |m: &BusMessage| {
            let Some(hub) = hub.upgrade() else { return };
            // The delivery's trace continues here from the logic worker's publish.
            let span = tracing::info_span!("gateway.deliver", user_id);
            zhibo_telemetry::trace::set_parent(&span, &m.headers);
            span.in_scope(|| hub.on_user_event(user_id, m.payload.clone()));
        });
        let subscribed = match self
            .bus
            .subscribe_handler(&Subject::user(user_id), handler)
            .await
        {
            Ok(s) => self.bus.flush().await.map(|()| s),
            Err(e) => Err(e),
        };
        let mut inner = self.lock();
        let result = match subscribed {
            Ok(sub) => {
                // Every connection of the user unregisters only after its registration returned, so
                // the entry is still this one.
                if let Some(entry) = inner.users.get_mut(&user_id) {
                    entry.sub = UserSub::Live(sub);
                }
                Ok(())
            }
            Err(e) => {
                if let Some(entry) = inner.users.remove(&user_id) {
                    for c in entry.conns {
                        inner.conns.remove(&c);
                    }
                }
                Err(e)
            }
        };
        drop(inner);
        // Receivers gone (no waiter) is fine.
        let _ = outcome.send(Some(result.is_ok()));
        result
    }

    /// Forgets a connection (and its room seats); drops the user's subscription with its last local
    /// connection.
    pub fn unregister(&self, conn_id: u64) {
        self.rooms.leave_all(conn_id);
        let mut inner = self.lock();
        let Some(handle) = inner.conns.remove(&conn_id) else {
            return;
        };
        if let Some(entry) = inner.users.get_mut(&handle.user_id) {
            entry.conns.retain(|c| *c != conn_id);
            if entry.conns.is_empty() {
                // Unsubscribes when dropped (after the hub's lock is released).
                let sub = inner.users.remove(&handle.user_id).map(|e| e.sub);
                drop(inner);
                drop(sub);
            }
        }
    }

    fn on_user_event(&self, user_id: i64, payload: Bytes) {
        let event = match UserEvent::decode(payload) {
            Ok(UserEvent { event: Some(e) }) => e,
            Ok(_) => return,
            Err(e) => {
                warn!(user_id, error = %e, "undecodable event on user subject");
                return;
            }
        };
        let inner = self.lock();
        let Some(entry) = inner.users.get(&user_id) else {
            return;
        };
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

    use zhibo_bus::memory::MemoryBus;
    use zhibo_bus::Subscription;
    use zhibo_proto::bus::Delivery;

    use super::*;
    use crate::queue::{queue, QueueReceiver};

    /// The in-process bus, whose handler subscriptions (the users') wait until `open`, then fail while
    /// `fail` is set.
    struct GatedBus {
        inner: MemoryBus,
        open: watch::Sender<bool>,
        fail: AtomicBool,
        subscribes: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Bus for GatedBus {
        async fn publish(
            &self,
            subject: &Subject,
            headers: Vec<(String, String)>,
            payload: Bytes,
        ) -> zhibo_bus::Result<()> {
            self.inner.publish(subject, headers, payload).await
        }
        async fn subscribe(&self, subject: &Subject) -> zhibo_bus::Result<Subscription> {
            self.inner.subscribe(subject).await
        }
        async fn subscribe_handler(
            &self,
            subject: &Subject,
            handler: Handler,
        ) -> zhibo_bus::Result<HandlerSubscription> {
            self.subscribes.fetch_add(1, Ordering::SeqCst);
            let mut open = self.open.subscribe();
            let _ = open.wait_for(|o| *o).await;
            if self.fail.load(Ordering::SeqCst) {
                return Err(zhibo_bus::Error::Subscribe {
                    subject: subject.to_string(),
                    message: "refused (test)".into(),
                });
            }
            self.inner.subscribe_handler(subject, handler).await
        }
        async fn queue_subscribe(
            &self,
            subject: &Subject,
            group: &str,
        ) -> zhibo_bus::Result<Subscription> {
            self.inner.queue_subscribe(subject, group).await
        }
        async fn flush(&self) -> zhibo_bus::Result<()> {
            self.inner.flush().await
        }
        fn is_connected(&self) -> bool {
            true
        }
    }

    fn gated(fail: bool) -> Arc<GatedBus> {
        Arc::new(GatedBus {
            inner: MemoryBus::new(),
            open: watch::channel(false).0,
            fail: AtomicBool::new(fail),
            subscribes: AtomicUsize::new(0),
        })
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

    /// Waits (bounded) until the bus saw `n` user subscriptions.
    async fn subscribes_reach(bus: &GatedBus, n: usize) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while bus.subscribes.load(Ordering::SeqCst) < n {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("subscription attempted");
    }

    /// Two devices of a user register while the user's subscription is in flight: the second is not
    /// confirmed before the subscription is live, one subscription serves both, deliveries reach both.
    #[tokio::test]
    async fn a_second_registration_waits_for_the_users_subscription() {
        let bus = gated(false);
        let hub = Hub::new("gw".into(), bus.clone());
        let (h1, mut rx1) = handle(7, 1);
        let (h2, mut rx2) = handle(7, 2);
        let first = tokio::spawn({
            let hub = hub.clone();
            async move { hub.register(1, h1).await }
        });
        subscribes_reach(&bus, 1).await;
        let second = tokio::spawn({
            let hub = hub.clone();
            async move { hub.register(2, h2).await }
        });
        // Still pending while the subscription is: it must not be told it is signed in.
        assert!(
            tokio::time::timeout(Duration::from_millis(200), async {
                while !second.is_finished() {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .is_err(),
            "the second registration returned before the subscription was live"
        );
        bus.open.send_replace(true);
        first.await.expect("task").expect("first registered");
        second.await.expect("task").expect("second registered");
        assert_eq!(
            bus.subscribes.load(Ordering::SeqCst),
            1,
            "one subscription per user"
        );
        assert_eq!(
            (hub.connection_count(), hub.user_subscription_count()),
            (2, 1)
        );
        let delivery = UserEvent {
            event: Some(user_event::Event::Delivery(Delivery {
                packets: vec![Packet::new(0, Body::Heartbeat(Default::default()))],
                ..Default::default()
            })),
        };
        bus.publish(
            &Subject::user(7),
            Vec::new(),
            Bytes::from(delivery.encode_to_vec()),
        )
        .await
        .expect("publish");
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

    /// The user's subscription fails while two registrations wait for it: both fail, and neither the
    /// connections nor the user stay registered (nothing left registered without a subscription). A
    /// later registration subscribes afresh.
    #[tokio::test]
    async fn a_failed_subscription_fails_every_waiting_registration() {
        let bus = gated(true);
        let hub = Hub::new("gw".into(), bus.clone());
        let (h1, _rx1) = handle(7, 1);
        let (h2, _rx2) = handle(7, 2);
        let first = tokio::spawn({
            let hub = hub.clone();
            async move { hub.register(1, h1).await }
        });
        subscribes_reach(&bus, 1).await;
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
        bus.open.send_replace(true);
        assert!(first.await.expect("task").is_err());
        assert!(
            second.await.expect("task").is_err(),
            "second confirmed without a subscription"
        );
        assert_eq!(
            (hub.connection_count(), hub.user_subscription_count()),
            (0, 0)
        );
        // The bus recovers: the next registration subscribes again.
        bus.fail.store(false, Ordering::SeqCst);
        let (h3, _rx3) = handle(7, 3);
        hub.register(3, h3).await.expect("registered");
        assert_eq!(bus.subscribes.load(Ordering::SeqCst), 2);
        assert_eq!(
            (hub.connection_count(), hub.user_subscription_count()),
            (1, 1)
        );
    }
}
