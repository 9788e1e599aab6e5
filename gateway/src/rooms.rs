//! Live rooms on one gateway, the I/O around [`RoomState`]: room id → one bus subscription + one task.
//!
//! - The gateway subscribes to `zhibo.room.<id>` when the room's first local viewer joins and drops the
//!   subscription with the last one. A logic worker publishes each room message once; every subscribed
//!   gateway fans it out locally.
//! - The room's task feeds its [`RoomState`] (batching, online count, late joiners; see there) the
//!   room subject's events and the state's deadlines, and publishes the presence reports it asks for:
//!   every [`RoomConfig::presence_interval`] each subscribed gateway publishes its local viewer count on
//!   the room subject (`RoomPresence`, with a time to live). No Redis, same code in embedded mode.
//! - Slow viewers: each connection has a small room queue, separate from its IM queue. A frame that does
//!   not fit is dropped for that viewer and counted ([`RoomHub::frames_dropped`]); IM traffic is never
//!   affected.
//! - Joining: [`RoomHub::join`] registers the viewer and waits until the subscription is live, *before*
//!   the caller reads the recent history; [`RoomHub::ready`] then merges what arrived meanwhile.
//! - Viewer lists (moderation): the hub keeps each room's local viewers in join order ([`Members`]) and
//!   answers a `RoomViewersQuery` on the room subject with its first `limit` (managers first) and the
//!   gateways it knows to have viewers (from their presence reports), so the asker knows whom to wait for.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use prost::Message as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn, Instrument};
use zhibo_bus::{Bus, Subject};
use zhibo_proto::bus::{
    room_event, RoomEvent, RoomPresence, RoomViewer, RoomViewersQuery, RoomViewersReply,
};
use zhibo_proto::client::{Message, ReceiverType, RoomClass, RoomNotice};

pub(crate) use crate::room_state::encode_frame;
pub use crate::room_state::{
    RoomConfig, RoomOutput, RoomState, ShapeCounts, Viewer, JOINING_BUFFER, SEEN_FOR,
};

/// A room's state, shared by its task and the joins and leaves of its viewers.
type SharedRoom = Arc<Mutex<RoomState>>;

fn lock_room(room: &SharedRoom) -> MutexGuard<'_, RoomState> {
    room.lock().unwrap_or_else(|p| p.into_inner())
}

/// A room's local viewers in join order, for viewer lists: connection → join number, join number →
/// (connection, user, join time in ms).
#[derive(Default)]
struct Members {
    by_conn: HashMap<u64, u64>,
    order: BTreeMap<u64, (u64, i64, i64)>,
    next: u64,
}

impl Members {
    fn add(&mut self, conn_id: u64, user_id: i64) {
        if self.by_conn.contains_key(&conn_id) {
            return;
        }
        self.next += 1;
        self.by_conn.insert(conn_id, self.next);
        self.order
            .insert(self.next, (conn_id, user_id, zhibo_store::ids::now_ms()));
    }

    fn remove(&mut self, conn_id: u64) {
        if let Some(n) = self.by_conn.remove(&conn_id) {
            self.order.remove(&n);
        }
    }

    /// The first `limit` viewers: the managers' connections first (a scan of every local viewer), then
    /// the others by join time.
    fn top(&self, limit: usize, managers: &[i64]) -> Vec<RoomViewer> {
        let viewer = |&(_, user_id, joined_at_ms): &(u64, i64, i64)| RoomViewer {
            user_id,
            joined_at_ms,
        };
        let mut out: Vec<RoomViewer> = if managers.is_empty() {
            Vec::new()
        } else {
            self.order
                .values()
                .filter(|m| managers.contains(&m.1))
                .take(limit)
                .map(viewer)
                .collect()
        };
        let rest = self
            .order
            .values()
            .filter(|m| !managers.contains(&m.1))
            .take(limit.saturating_sub(out.len()))
            .map(viewer);
        out.extend(rest);
        out
    }
}

struct RoomEntry {
    room: SharedRoom,
    /// The local viewers in join order (viewer lists).
    members: Members,
    /// Stops the room's task (subscription + batcher).
    stop: CancellationToken,
    /// `Some(true)` once subscribed, `Some(false)` if the subscription failed.
    ready: watch::Receiver<Option<bool>>,
}

#[derive(Default)]
struct State {
    rooms: HashMap<i64, RoomEntry>,
    conn_rooms: HashMap<u64, Vec<i64>>,
}

/// The live rooms of one gateway. Shared by its connections and the rooms' tasks. Locks: the registry
/// first, then a room's state; a room's task takes only its room's.
pub struct RoomHub {
    gateway_id: String,
    bus: Arc<dyn Bus>,
    config: RoomConfig,
    state: Mutex<State>,
    dropped: AtomicU64,
    /// What shaping did, over every room (issue 17).
    shaped: Mutex<ShapeCounts>,
}

impl std::fmt::Debug for RoomHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoomHub")
            .field("gateway_id", &self.gateway_id)
            .finish_non_exhaustive()
    }
}

/// Why a join failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot subscribe to room {0}")]
pub struct JoinError(pub i64);

impl RoomHub {
    /// Rooms of gateway `gateway_id` on `bus`.
    pub fn new(gateway_id: String, bus: Arc<dyn Bus>, config: RoomConfig) -> Arc<Self> {
        Arc::new(RoomHub {
            gateway_id,
            bus,
            config,
            state: Mutex::new(State::default()),
            dropped: AtomicU64::new(0),
            shaped: Mutex::new(ShapeCounts::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn room(&self, room_id: i64) -> Option<SharedRoom> {
        self.lock().rooms.get(&room_id).map(|e| e.room.clone())
    }

    /// Rooms this gateway is subscribed to (has at least one viewer in).
    pub fn subscription_count(&self) -> usize {
        self.lock().rooms.len()
    }

    /// Local viewers of `room_id`.
    pub fn viewer_count(&self, room_id: i64) -> usize {
        self.room(room_id)
            .map_or(0, |r| lock_room(&r).viewer_count())
    }

    /// The room's approximate cluster-wide viewer count as this gateway sees it (0 when not subscribed).
    pub fn online_count(&self, room_id: i64) -> u64 {
        self.room(room_id).map_or(0, |r| lock_room(&r).online())
    }

    /// Room frames dropped because a viewer's room queue was full.
    pub fn frames_dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// What shaping did over every room so far: chat sampled away, per-class deliveries dropped for
    /// slow viewers, likes merged.
    pub fn shape_counts(&self) -> ShapeCounts {
        *self.shaped.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Viewers on this gateway over all rooms (a connection in two rooms counts twice).
    pub fn total_viewers(&self) -> usize {
        let rooms: Vec<SharedRoom> = self.lock().rooms.values().map(|e| e.room.clone()).collect();
        rooms.iter().map(|r| lock_room(r).viewer_count()).sum()
    }

    /// Registers `viewer` in `room_id` (subscribing if it is the room's first here) and waits until the
    /// subscription is live. `join_notices` is the room's setting as read for this join (the room keeps
    /// the latest read); its shaping comes with [`RoomHub::apply_shaping`], read once the subscription is
    /// live. The viewer gets no frames until [`RoomHub::ready`]: what arrives meanwhile is
    /// kept for its SubscribeRoomOutput.
    ///
    /// # Errors
    /// [`JoinError`] when the bus refuses the subscription; the viewer is then removed again.
    pub async fn join(
        self: &Arc<Self>,
        viewer: Viewer,
        room_id: i64,
        join_notices: bool,
    ) -> Result<(), JoinError> {
        let conn_id = viewer.conn_id;
        let mut ready = {
            let mut st = self.lock();
            let entry = st
                .rooms
                .entry(room_id)
                .or_insert_with(|| self.start_room(room_id));
            entry.members.add(conn_id, viewer.user_id);
            {
                let mut room = lock_room(&entry.room);
                room.add_viewer(viewer, join_notices);
            }
            let ready = entry.ready.clone();
            let rooms = st.conn_rooms.entry(conn_id).or_default();
            if !rooms.contains(&room_id) {
                rooms.push(room_id);
            }
            ready
        };
        let ok = matches!(
            ready.wait_for(Option::is_some).await.as_deref(),
            Ok(Some(true))
        );
        if ok {
            Ok(())
        } else {
            self.leave(conn_id, room_id);
            Err(JoinError(room_id))
        }
    }

    /// Applies the room's shaping setting as read by a join ([`RoomState::apply_shaping`]: an older
    /// version than the room has is ignored).
    pub fn apply_shaping(&self, room_id: i64, chat_per_sec: u32, version: i64) {
        if let Some(room) = self.room(room_id) {
            lock_room(&room).apply_shaping(chat_per_sec, version, std::time::Instant::now());
        }
    }

    /// Ends the joining phase of `conn_id` in `room_id` ([`RoomState::ready`]): `recent` followed by what
    /// arrived since the viewer was registered and is not in `recent`, and the online count. `None` if the
    /// viewer is not in the room.
    pub fn ready(
        &self,
        conn_id: u64,
        room_id: i64,
        recent: Vec<Message>,
    ) -> Option<(Vec<Message>, u64)> {
        let room = self.room(room_id)?;
        let mut room = lock_room(&room);
        room.ready(conn_id, recent, std::time::Instant::now())
    }

    /// Removes `conn_id` from `room_id`, unsubscribing with the room's last local viewer. Announces the
    /// leave when the room has join notices on.
    pub fn leave(&self, conn_id: u64, room_id: i64) {
        let left = {
            let mut st = self.lock();
            if let Some(rooms) = st.conn_rooms.get_mut(&conn_id) {
                rooms.retain(|r| *r != room_id);
                if rooms.is_empty() {
                    st.conn_rooms.remove(&conn_id);
                }
            }
            Self::remove_viewer(&mut st, conn_id, room_id)
        };
        if let Some((viewer, true)) = left {
            self.spawn_notice(room_id, &viewer, RoomNotice::Leave);
        }
    }

    /// Removes `conn_id` from every room (its connection closed).
    pub fn leave_all(&self, conn_id: u64) {
        let left: Vec<(i64, Viewer)> = {
            let mut st = self.lock();
            let rooms = st.conn_rooms.remove(&conn_id).unwrap_or_default();
            rooms
                .into_iter()
                .filter_map(
                    |room_id| match Self::remove_viewer(&mut st, conn_id, room_id) {
                        Some((viewer, true)) => Some((room_id, viewer)),
                        _ => None,
                    },
                )
                .collect()
        };
        for (room_id, viewer) in left {
            self.spawn_notice(room_id, &viewer, RoomNotice::Leave);
        }
    }

    /// Returns the removed viewer and whether the room announces leaves.
    fn remove_viewer(st: &mut State, conn_id: u64, room_id: i64) -> Option<(Viewer, bool)> {
        let entry = st.rooms.get_mut(&room_id)?;
        entry.members.remove(conn_id);
        let (removed, notices, empty) = {
            let mut room = lock_room(&entry.room);
            let removed = room.remove_viewer(conn_id)?;
            (removed, room.join_notices(), room.is_empty())
        };
        if empty {
            entry.stop.cancel();
            st.rooms.remove(&room_id);
        }
        Some((removed, notices))
    }

    /// Publishes a join or leave notice of a viewer to the room (message id 0, not kept in history). It
    /// names the user only: viewers never learn another user's device id (issue 19).
    ///
    /// # Errors
    /// When the bus refuses the publish.
    pub async fn notice(
        &self,
        room_id: i64,
        user_id: i64,
        notice: RoomNotice,
    ) -> zhibo_bus::Result<()> {
        publish_notice(&*self.bus, room_id, user_id, notice).await
    }

    fn spawn_notice(&self, room_id: i64, viewer: &Viewer, notice: RoomNotice) {
        let bus = self.bus.clone();
        let user_id = viewer.user_id;
        tokio::spawn(
            async move {
                if let Err(e) = publish_notice(&*bus, room_id, user_id, notice).await {
                    debug!(room_id, error = %e, "leave notice lost");
                }
            }
            .in_current_span(),
        );
    }

    /// Creates a room entry and starts its task: subscribe, then feed the room's state.
    fn start_room(self: &Arc<Self>, room_id: i64) -> RoomEntry {
        let stop = CancellationToken::new();
        let (ready_tx, ready) = watch::channel(None);
        let room = Arc::new(Mutex::new(RoomState::new(
            room_id,
            self.gateway_id.clone(),
            self.config.clone(),
            std::time::Instant::now(),
        )));
        let hub = Arc::clone(self);
        tokio::spawn(
            hub.run_room(room_id, room.clone(), stop.clone(), ready_tx)
                .instrument(tracing::debug_span!("room", room_id)),
        );
        RoomEntry {
            room,
            members: Members::default(),
            stop,
            ready,
        }
    }

    /// The room's task: the bus subscription and the state's deadlines in, frames (through the state)
    /// and presence reports out.
    async fn run_room(
        self: Arc<Self>,
        room_id: i64,
        room: SharedRoom,
        stop: CancellationToken,
        ready: watch::Sender<Option<bool>>,
    ) {
        let subject = Subject::room(room_id);
        let mut sub = match self.bus.subscribe(&subject).await {
            Ok(s) => s,
            Err(e) => {
                warn!(room_id, error = %e, "room subscription refused");
                let _ = ready.send(Some(false));
                return;
            }
        };
        // A NATS subscription takes effect at the server asynchronously: a round trip (flush) makes it
        // effective before the join completes, so nothing published after the join (a message, another
        // viewer's join notice from another gateway) can miss this gateway.
        if let Err(e) = self.bus.flush().await {
            warn!(room_id, error = %e, "room subscription not confirmed");
            let _ = ready.send(Some(false));
            return;
        }
        let _ = ready.send(Some(true));
        debug!(room_id, "room subscribed");
        let ttl = lock_room(&room).presence_ttl();
        // Other gateways with viewers of the room (from their presence reports), for viewer lists.
        let mut peers: HashMap<String, std::time::Instant> = HashMap::new();
        // Until a presence interval has passed since subscribing, `peers` may miss gateways.
        let peers_known_at = std::time::Instant::now() + self.config.presence_interval;
        loop {
            let deadline = lock_room(&room).next_deadline();
            let mut out = tokio::select! {
                _ = stop.cancelled() => break,
                m = sub.next() => {
                    let Some(m) = m else { break };
                    let now = std::time::Instant::now();
                    match RoomEvent::decode(m.payload) {
                        Ok(RoomEvent { event: Some(room_event::Event::Message(msg)), class }) => {
                            // An unknown class (a newer publisher) is treated as chat.
                            let class = RoomClass::try_from(class).unwrap_or(RoomClass::Chat);
                            lock_room(&room).on_classed(msg, class, now)
                        }
                        Ok(RoomEvent { event: Some(room_event::Event::Presence(p)), .. }) => {
                            if p.viewers == 0 {
                                peers.remove(&p.gateway_id);
                            } else if p.gateway_id != self.gateway_id {
                                let ttl = std::time::Duration::from_millis(p.ttl_ms.into());
                                peers.insert(p.gateway_id.clone(), now + ttl);
                            }
                            lock_room(&room).on_presence(p, now);
                            RoomOutput::default()
                        }
                        Ok(RoomEvent { event: Some(room_event::Event::Shaping(c)), .. }) => {
                            lock_room(&room).apply_shaping(c.chat_per_sec, c.updated_at_ms, now);
                            RoomOutput::default()
                        }
                        Ok(RoomEvent { event: Some(room_event::Event::ViewersQuery(q)), .. }) => {
                            peers.retain(|_, until| *until > now);
                            let known = now >= peers_known_at;
                            self.answer_viewers(room_id, &q, peers.keys(), known).await;
                            RoomOutput::default()
                        }
                        Ok(_) => RoomOutput::default(),
                        Err(e) => {
                            warn!(room_id, error = %e, "undecodable room event");
                            RoomOutput::default()
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    lock_room(&room).on_tick(std::time::Instant::now())
                }
            };
            // Written with the room let go: a join waits for the room's lock, not for sockets.
            if !out.owed.0.is_empty() {
                crate::direct::write_owed(std::mem::take(&mut out.owed.0));
            }
            if out.dropped > 0 {
                self.dropped.fetch_add(out.dropped, Ordering::Relaxed);
            }
            if out.shaped != ShapeCounts::default() {
                self.shaped
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .add(&out.shaped);
            }
            if let Some(viewers) = out.presence {
                self.publish_presence(room_id, viewers, ttl).await;
            }
        }
        // Unsubscribe first: publishing to a subject we still subscribe to (and no longer read) could wait
        // on our own full buffer. Then others stop counting this gateway's viewers now rather than when
        // the report expires.
        drop(sub);
        self.publish_presence(room_id, 0, ttl).await;
        debug!(room_id, "room unsubscribed");
    }

    /// Answers a viewer-list query with this gateway's first `q.limit` viewers of the room.
    async fn answer_viewers(
        &self,
        room_id: i64,
        q: &RoomViewersQuery,
        peers: impl Iterator<Item = &String>,
        peers_known: bool,
    ) {
        if !zhibo_bus::subject::is_valid_token(&q.query_id) {
            debug!(room_id, "viewers query with a bad id ignored");
            return;
        }
        let limit = usize::try_from(q.limit).unwrap_or(usize::MAX);
        let (viewers, local_viewers) = {
            let st = self.lock();
            match st.rooms.get(&room_id) {
                Some(e) => (
                    e.members.top(limit, &q.manager_user_ids),
                    e.members.by_conn.len() as u64,
                ),
                None => return,
            }
        };
        let mut gateway_ids: Vec<String> = peers.cloned().collect();
        gateway_ids.push(self.gateway_id.clone());

        let reply = RoomViewersReply {
            gateway_id: self.gateway_id.clone(),
            viewers,
            gateway_ids,
            local_viewers,
            peers_known,
        };
        if let Err(e) = self
            .bus
            .publish(
                &Subject::room_viewers_reply(&q.query_id),
                Vec::new(),
                Bytes::from(reply.encode_to_vec()),
            )
            .await
        {
            debug!(room_id, error = %e, "viewers reply lost");
        }
    }

    async fn publish_presence(&self, room_id: i64, viewers: u64, ttl: std::time::Duration) {
        let event = RoomEvent {
            event: Some(room_event::Event::Presence(RoomPresence {
                gateway_id: self.gateway_id.clone(),
                viewers,
                ttl_ms: u32::try_from(ttl.as_millis()).unwrap_or(u32::MAX),
            })),
            ..RoomEvent::default()
        };
        if let Err(e) = self
            .bus
            .publish(
                &Subject::room(room_id),
                Vec::new(),
                Bytes::from(event.encode_to_vec()),
            )
            .await
        {
            debug!(room_id, error = %e, "presence report lost");
        }
    }
}

async fn publish_notice(
    bus: &dyn Bus,
    room_id: i64,
    user_id: i64,
    notice: RoomNotice,
) -> zhibo_bus::Result<()> {
    let event = RoomEvent {
        event: Some(room_event::Event::Message(Message {
            sender_user_id: user_id,
            receiver_type: ReceiverType::Room as i32,
            receiver_id: room_id,
            server_time_ms: zhibo_store::ids::now_ms(),
            content_type: notice as i32,
            ..Message::default()
        })),
        // Join and leave notices are chat: sampled like it in a busy room.
        class: RoomClass::Chat as i32,
    };
    bus.publish(
        &Subject::room(room_id),
        Vec::new(),
        Bytes::from(event.encode_to_vec()),
    )
    .await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use zhibo_bus::memory::MemoryBus;
    use zhibo_proto::client::packet::Body;
    use zhibo_proto::client::{Packet, RoomMessages};

    use super::*;

    fn viewer(conn_id: u64, cap: usize) -> (Viewer, tokio::sync::mpsc::Receiver<Bytes>) {
        let (tx, rx) = tokio::sync::mpsc::channel(cap);
        (
            Viewer {
                conn_id,
                user_id: conn_id as i64,
                device_id: conn_id as i64,
                tx: crate::direct::RoomSink::Queue(tx),
            },
            rx,
        )
    }

    fn frame_of(b: &Bytes) -> RoomMessages {
        match Packet::decode(b.clone()).expect("packet").body {
            Some(Body::RoomMessages(r)) => r,
            other => panic!("expected RoomMessages, got {other:?}"),
        }
    }

    async fn publish(bus: &MemoryBus, room_id: i64, id: u64) {
        let event = RoomEvent {
            event: Some(room_event::Event::Message(Message {
                message_id: id,
                receiver_id: room_id,
                content: Bytes::from(format!("m{id}")),
                ..Message::default()
            })),
            ..RoomEvent::default()
        };
        bus.publish(
            &Subject::room(room_id),
            Vec::new(),
            Bytes::from(event.encode_to_vec()),
        )
        .await
        .expect("publish");
    }

    fn config() -> RoomConfig {
        RoomConfig {
            batch_window: Duration::from_millis(30),
            batch_load: f64::MIN_POSITIVE,
            batch_max: 100,
            presence_interval: Duration::from_millis(100),
            ..RoomConfig::default()
        }
    }

    /// Waits (bounded) until `check` holds, polling.
    async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while !check() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
    }

    /// The shell: one subscription per room with viewers, messages from the bus reach ready viewers
    /// through the room's state, the subscription goes with the last viewer.
    #[tokio::test]
    async fn bus_messages_reach_viewers_and_the_subscription_goes_with_the_last() {
        let bus = MemoryBus::new();
        let hub = RoomHub::new("gw".into(), Arc::new(bus.clone()), config());
        let (a, mut ra) = viewer(1, 8);
        let (b, mut rb) = viewer(2, 8);
        hub.join(a, 5, false).await.expect("join a");
        hub.join(b, 5, false).await.expect("join b");
        assert_eq!((hub.subscription_count(), bus.subject_count()), (1, 1));
        assert_eq!((hub.viewer_count(5), hub.total_viewers()), (2, 2));
        for conn in [1, 2] {
            let (recent, online) = hub.ready(conn, 5, vec![]).expect("ready");
            assert!(recent.is_empty());
            assert_eq!(online, 2);
        }
        for id in 1..=5 {
            publish(&bus, 5, id).await;
        }
        // The first goes at once (a quiet room), the rest in the window behind it: the same frames,
        // encoded once, reach both.
        let wait = Duration::from_secs(5);
        let mut ids = Vec::new();
        while ids.len() < 5 {
            let fa = tokio::time::timeout(wait, ra.recv())
                .await
                .expect("in time")
                .expect("frame");
            let fb = tokio::time::timeout(wait, rb.recv())
                .await
                .expect("in time")
                .expect("frame");
            assert_eq!(fa.as_ptr(), fb.as_ptr());
            ids.extend(frame_of(&fa).messages.iter().map(|m| m.message_id));
        }
        assert_eq!(ids, vec![1, 2, 3, 4, 5]);
        hub.leave(1, 5);
        assert_eq!(hub.subscription_count(), 1);
        hub.leave_all(2);
        assert_eq!(hub.subscription_count(), 0);
        assert!(hub.ready(2, 5, vec![]).is_none());
        eventually("the room's unsubscription", || bus.subject_count() == 0).await;
    }

    /// Presence reports travel between gateways over the bus: each sees the sum, and a gateway whose
    /// last viewer leaves stops being counted without waiting for expiry.
    #[tokio::test]
    async fn online_count_sums_the_gateways() {
        let bus = MemoryBus::new();
        let g1 = RoomHub::new("g1".into(), Arc::new(bus.clone()), config());
        let g2 = RoomHub::new("g2".into(), Arc::new(bus.clone()), config());
        let mut queues = Vec::new();
        for (hub, conns) in [(&g1, 1..=2u64), (&g2, 3..=5u64)] {
            for c in conns {
                let (v, rx) = viewer(c, 8);
                queues.push(rx);
                hub.join(v, 7, false).await.expect("join");
                hub.ready(c, 7, vec![]).expect("ready");
            }
        }
        eventually("both gateways count 5", || {
            (g1.online_count(7), g2.online_count(7)) == (5, 5)
        })
        .await;
        for c in 3..=5 {
            g2.leave_all(c);
        }
        eventually("g1 counts 2", || g1.online_count(7) == 2).await;
    }

    /// A room whose subscription the bus refuses fails the join and keeps no viewer.
    #[tokio::test]
    async fn a_refused_subscription_fails_the_join() {
        let bus = zhibo_bus::memory::MemoryBus::new();
        let hub = RoomHub::new("gw".into(), Arc::new(Refusing(bus)), config());
        let (a, _ra) = viewer(1, 8);
        assert!(hub.join(a, 5, false).await.is_err());
        assert_eq!((hub.subscription_count(), hub.total_viewers()), (0, 0));
    }

    /// A bus that refuses every plain subscription.
    struct Refusing(MemoryBus);

    #[async_trait::async_trait]
    impl Bus for Refusing {
        async fn publish(
            &self,
            subject: &Subject,
            headers: Vec<(String, String)>,
            payload: Bytes,
        ) -> zhibo_bus::Result<()> {
            self.0.publish(subject, headers, payload).await
        }
        async fn subscribe(&self, subject: &Subject) -> zhibo_bus::Result<zhibo_bus::Subscription> {
            Err(zhibo_bus::Error::Subscribe {
                subject: subject.to_string(),
                message: "refused (test)".into(),
            })
        }
        async fn subscribe_handler(
            &self,
            subject: &Subject,
            handler: zhibo_bus::Handler,
        ) -> zhibo_bus::Result<zhibo_bus::HandlerSubscription> {
            self.0.subscribe_handler(subject, handler).await
        }
        async fn queue_subscribe(
            &self,
            subject: &Subject,
            group: &str,
        ) -> zhibo_bus::Result<zhibo_bus::Subscription> {
            self.0.queue_subscribe(subject, group).await
        }
        async fn flush(&self) -> zhibo_bus::Result<()> {
            self.0.flush().await
        }
        fn is_connected(&self) -> bool {
            true
        }
    }
}
