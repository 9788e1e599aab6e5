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
    sub: Option<HandlerSubscription>,
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

    /// Registers a signed-in connection, subscribing to its user's subject if it is the user's first here,
    /// then announces the device online so older connections of it are kicked cluster-wide.
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
        let first = {
            let mut inner = self.lock();
            inner.conns.insert(conn_id, handle);
            let entry = inner.users.entry(user_id).or_insert_with(|| UserEntry {
                conns: Vec::new(),
                sub: None,
            });
            entry.conns.push(conn_id);
            entry.conns.len() == 1 && entry.sub.is_none()
        };
        if first {
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
            // Flushed so the subscription is live at the server before the client, told it is signed in,
            // can cause deliveries published from other connections.
            let subscribed = match self
                .bus
                .subscribe_handler(&Subject::user(user_id), handler)
                .await
            {
                Ok(s) => self.bus.flush().await.map(|()| s),
                Err(e) => Err(e),
            };
            let sub = match subscribed {
                Ok(s) => s,
                Err(e) => {
                    self.unregister(conn_id);
                    return Err(e);
                }
            };
            let mut inner = self.lock();
            match inner.users.get_mut(&user_id) {
                // Still wanted: keep it.
                Some(e) if e.sub.is_none() => e.sub = Some(sub),
                // The connection left meanwhile, or a racing registration won: dropped after the lock.
                _ => {
                    drop(inner);
                    drop(sub);
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
                let sub = inner.users.remove(&handle.user_id).and_then(|e| e.sub);
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
