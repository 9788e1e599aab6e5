//! Live rooms on one gateway: room id → local viewers + one bus subscription + one batcher.
//!
//! - The gateway subscribes to `zhibo.room.<id>` when the room's first local viewer joins and drops the
//!   subscription with the last one. A logic worker publishes each room message once; every subscribed
//!   gateway fans it out locally.
//! - Batching: messages arriving within [`RoomConfig::batch_window`] (or until [`RoomConfig::batch_max`]
//!   messages / a frame's worth of bytes) become one `RoomMessages` packet, encoded **once** and shared
//!   as [`Bytes`] by every viewer's queue, so a delivery costs a refcount, not an encode or a syscall each.
//! - Slow viewers: each connection has a small room queue, separate from its IM queue. A frame that does
//!   not fit is dropped for that viewer and counted ([`RoomHub::frames_dropped`]); IM traffic is never
//!   affected.
//! - Online count: every [`RoomConfig::presence_interval`] each subscribed gateway publishes its local
//!   viewer count on the room subject (`RoomPresence`, with a time to live); each gateway sums its own
//!   count and the latest unexpired reports of the others. No Redis, same code in embedded mode. When the
//!   count changes and no messages are flowing, viewers get a `RoomMessages` with no messages.
//! - Joining: a viewer is registered (and the subscription live) *before* the recent history is read;
//!   until [`RoomHub::ready`], frames for it are buffered as messages instead, then merged into its
//!   `SubscribeRoomOutput` without the ones the history already holds. Messages the history holds can
//!   also still be in the batch window at `ready` (or on their way through the bus): for
//!   [`SEEN_FOR`] after it, the viewer's frames leave out the ids its `recent` had. No gap, no repeat.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn, Instrument};
use zhibo_bus::{Bus, Subject};
use zhibo_proto::bus::{room_event, RoomEvent, RoomPresence};
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{Message, Packet, ReceiverType, RoomMessages, RoomNotice};

/// Room fan-out settings of a gateway.
#[derive(Debug, Clone)]
pub struct RoomConfig {
    /// Longest a room message waits to be batched with others.
    pub batch_window: Duration,
    /// Most messages in one `RoomMessages` frame.
    pub batch_max: usize,
    /// Largest encoded frame (the transports' maximum).
    pub max_frame: usize,
    /// How often each gateway reports its viewer count of a room.
    pub presence_interval: Duration,
    /// Messages buffered for a viewer between its registration and its SubscribeRoomOutput.
    pub joining_buffer: usize,
}

/// Messages buffered for a joining viewer (not a configuration key).
pub const JOINING_BUFFER: usize = 1024;

impl Default for RoomConfig {
    /// [`crate::GatewayConfig`]'s defaults: they are written there only.
    fn default() -> Self {
        crate::GatewayConfig::default().room_config()
    }
}

/// A connection watching a room.
#[derive(Debug, Clone)]
pub struct Viewer {
    /// The connection.
    pub conn_id: u64,
    /// Its user, for join/leave notices.
    pub user_id: i64,
    /// Its device.
    pub device_id: i64,
    /// Its room queue (encoded frames); full = the frame is dropped for it.
    pub tx: mpsc::Sender<Bytes>,
}

struct ViewerEntry {
    viewer: Viewer,
    /// `Some` while joining: messages to hand over with the SubscribeRoomOutput.
    joining: Option<Vec<Message>>,
    /// After joining, for a while: ids the SubscribeRoomOutput had, left out of its frames.
    seen: Option<(HashSet<u64>, Instant)>,
}

/// How long after its join a viewer's frames leave out what its `recent` had: longer than a batch
/// window plus a bus hop, so a message read from the history and still on its way is not sent twice.
pub const SEEN_FOR: Duration = Duration::from_secs(5);

struct RoomEntry {
    viewers: HashMap<u64, ViewerEntry>,
    /// Stops the room's task (subscription + batcher).
    stop: CancellationToken,
    /// `Some(true)` once subscribed, `Some(false)` if the subscription failed.
    ready: watch::Receiver<Option<bool>>,
    /// Announce joins and leaves (the room's setting, as last read at a join).
    join_notices: bool,
    /// Viewers on other gateways, from their latest unexpired reports.
    remote: u64,
}

impl RoomEntry {
    fn online(&self) -> u64 {
        self.viewers.len() as u64 + self.remote
    }
}

#[derive(Default)]
struct State {
    rooms: HashMap<i64, RoomEntry>,
    conn_rooms: HashMap<u64, Vec<i64>>,
}

/// The live rooms of one gateway. Shared by its connections and the rooms' tasks.
pub struct RoomHub {
    gateway_id: String,
    bus: Arc<dyn Bus>,
    config: RoomConfig,
    state: Mutex<State>,
    dropped: AtomicU64,
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

/// A room frame: messages plus the count, encoded once.
pub(crate) fn encode_frame(room_id: i64, messages: Vec<Message>, online_count: u64) -> Bytes {
    let packet = Packet::new(
        0,
        Body::RoomMessages(RoomMessages {
            room_id,
            messages,
            online_count,
        }),
    );
    Bytes::from(packet.encode_to_vec())
}

/// Messages waiting for the batch window.
struct Batch {
    messages: Vec<Message>,
    bytes: usize,
    due: Option<Instant>,
}

impl Batch {
    fn new() -> Self {
        Batch {
            messages: Vec::new(),
            bytes: 0,
            due: None,
        }
    }
}

impl RoomHub {
    /// Rooms of gateway `gateway_id` on `bus`.
    pub fn new(gateway_id: String, bus: Arc<dyn Bus>, config: RoomConfig) -> Arc<Self> {
        Arc::new(RoomHub {
            gateway_id,
            bus,
            config,
            state: Mutex::new(State::default()),
            dropped: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rooms this gateway is subscribed to (has at least one viewer in).
    pub fn subscription_count(&self) -> usize {
        self.lock().rooms.len()
    }

    /// Local viewers of `room_id`.
    pub fn viewer_count(&self, room_id: i64) -> usize {
        self.lock()
            .rooms
            .get(&room_id)
            .map_or(0, |r| r.viewers.len())
    }

    /// The room's approximate cluster-wide viewer count as this gateway sees it (0 when not subscribed).
    pub fn online_count(&self, room_id: i64) -> u64 {
        self.lock().rooms.get(&room_id).map_or(0, RoomEntry::online)
    }

    /// Room frames dropped because a viewer's room queue was full.
    pub fn frames_dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Viewers on this gateway over all rooms (a connection in two rooms counts twice).
    pub fn total_viewers(&self) -> usize {
        self.lock().rooms.values().map(|r| r.viewers.len()).sum()
    }

    /// Registers `viewer` in `room_id` (subscribing if it is the room's first here) and waits until the
    /// subscription is live. The viewer gets no frames until [`RoomHub::ready`]: what arrives meanwhile is
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
            entry.join_notices = join_notices;
            entry.viewers.insert(
                conn_id,
                ViewerEntry {
                    viewer,
                    joining: Some(Vec::new()),
                    seen: None,
                },
            );
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

    /// Ends the joining phase of `conn_id` in `room_id`: returns `recent` followed by the messages that
    /// arrived since the viewer was registered and are not in `recent`, and the online count. From now on
    /// the viewer gets frames. `None` if the viewer is not in the room.
    pub fn ready(
        &self,
        conn_id: u64,
        room_id: i64,
        mut recent: Vec<Message>,
    ) -> Option<(Vec<Message>, u64)> {
        let mut st = self.lock();
        let entry = st.rooms.get_mut(&room_id)?;
        let online = entry.online();
        let v = entry.viewers.get_mut(&conn_id)?;
        let buffered = v.joining.take()?;
        let mut known: HashSet<u64> = recent
            .iter()
            .map(|m| m.message_id)
            .filter(|id| *id != 0)
            .collect();
        recent.extend(
            buffered
                .into_iter()
                .filter(|m| m.message_id == 0 || !known.contains(&m.message_id)),
        );
        known.extend(recent.iter().map(|m| m.message_id).filter(|id| *id != 0));
        if !known.is_empty() {
            v.seen = Some((known, Instant::now() + SEEN_FOR));
        }
        Some((recent, online))
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
        let removed = entry.viewers.remove(&conn_id)?;
        let notices = entry.join_notices;
        if entry.viewers.is_empty() {
            entry.stop.cancel();
            st.rooms.remove(&room_id);
        }
        Some((removed.viewer, notices))
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

    /// Creates a room entry and starts its task: subscribe, then batch, fan out and report presence.
    fn start_room(self: &Arc<Self>, room_id: i64) -> RoomEntry {
        let stop = CancellationToken::new();
        let (ready_tx, ready) = watch::channel(None);
        let hub = Arc::clone(self);
        tokio::spawn(
            hub.run_room(room_id, stop.clone(), ready_tx)
                .instrument(tracing::debug_span!("room", room_id)),
        );
        RoomEntry {
            viewers: HashMap::new(),
            stop,
            ready,
            join_notices: false,
            remote: 0,
        }
    }

    async fn run_room(
        self: Arc<Self>,
        room_id: i64,
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
        let _ = ready.send(Some(true));
        debug!(room_id, "room subscribed");
        let mut batch = Batch::new();
        // gateway id → (viewers, expiry)
        let mut reports: HashMap<String, (u64, Instant)> = HashMap::new();
        let mut presence = tokio::time::interval(self.config.presence_interval);
        presence.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_online = None;
        loop {
            let due = batch.due;
            tokio::select! {
                _ = stop.cancelled() => break,
                m = sub.next() => {
                    let Some(m) = m else { break };
                    match RoomEvent::decode(m.payload) {
                        Ok(RoomEvent { event: Some(room_event::Event::Message(msg)) }) => {
                            let len = msg.encoded_len() + 8;
                            // Keep the frame under the transport's maximum (with room for the header).
                            if batch.bytes + len > self.config.max_frame.saturating_sub(64)
                                && !batch.messages.is_empty()
                            {
                                last_online = Some(self.flush(room_id, &mut batch));
                            }
                            batch.bytes += len;
                            batch.messages.push(msg);
                            batch.due.get_or_insert_with(|| Instant::now() + self.config.batch_window);
                            if batch.messages.len() >= self.config.batch_max {
                                last_online = Some(self.flush(room_id, &mut batch));
                            }
                        }
                        Ok(RoomEvent { event: Some(room_event::Event::Presence(p)) }) => {
                            if p.gateway_id != self.gateway_id {
                                let ttl = Duration::from_millis(u64::from(p.ttl_ms));
                                if p.viewers == 0 {
                                    reports.remove(&p.gateway_id);
                                } else {
                                    reports.insert(p.gateway_id, (p.viewers, Instant::now() + ttl));
                                }
                                self.set_remote(room_id, &reports);
                            }
                        }
                        Ok(_) => {}
                        Err(e) => warn!(room_id, error = %e, "undecodable room event"),
                    }
                }
                _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    last_online = Some(self.flush(room_id, &mut batch));
                }
                _ = presence.tick() => {
                    let now = Instant::now();
                    reports.retain(|_, (_, expiry)| *expiry > now);
                    let online = self.set_remote(room_id, &reports);
                    self.publish_presence(room_id, self.viewer_count(room_id) as u64).await;
                    // Tell viewers a changed count even when no message carries it.
                    if batch.messages.is_empty() && last_online.is_some_and(|o| o != online) {
                        last_online = Some(self.flush(room_id, &mut batch));
                    } else if last_online.is_none() {
                        last_online = Some(online);
                    }
                }
            }
        }
        // Unsubscribe first: publishing to a subject we still subscribe to (and no longer read) could wait
        // on our own full buffer. Then others stop counting this gateway's viewers now rather than when
        // the report expires.
        drop(sub);
        self.publish_presence(room_id, 0).await;
        debug!(room_id, "room unsubscribed");
    }

    async fn publish_presence(&self, room_id: i64, viewers: u64) {
        let ttl = self.config.presence_interval * 3;
        let event = RoomEvent {
            event: Some(room_event::Event::Presence(RoomPresence {
                gateway_id: self.gateway_id.clone(),
                viewers,
                ttl_ms: u32::try_from(ttl.as_millis()).unwrap_or(u32::MAX),
            })),
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

    /// Stores the other gateways' viewer sum; returns the room's online count.
    fn set_remote(&self, room_id: i64, reports: &HashMap<String, (u64, Instant)>) -> u64 {
        let remote = reports.values().map(|(n, _)| n).sum();
        let mut st = self.lock();
        match st.rooms.get_mut(&room_id) {
            Some(entry) => {
                entry.remote = remote;
                entry.online()
            }
            None => 0,
        }
    }

    /// Sends the batch (possibly empty: a count refresh) to every viewer as one shared frame. Returns the
    /// online count it carried.
    fn flush(&self, room_id: i64, batch: &mut Batch) -> u64 {
        let messages = std::mem::take(&mut batch.messages);
        batch.bytes = 0;
        batch.due = None;
        // Count and joining viewers under the lock; encode outside it; fan out under it again.
        let (online, special) = {
            let st = self.lock();
            let Some(entry) = st.rooms.get(&room_id) else {
                return 0;
            };
            let special = entry
                .viewers
                .values()
                .any(|v| v.joining.is_some() || v.seen.is_some());
            (entry.online(), special)
        };
        let copy = (special && !messages.is_empty()).then(|| messages.clone());
        let frame = encode_frame(room_id, messages, online);
        let now = Instant::now();
        let mut st = self.lock();
        let Some(entry) = st.rooms.get_mut(&room_id) else {
            return online;
        };
        let mut dropped = 0;
        for v in entry.viewers.values_mut() {
            if v.seen.as_ref().is_some_and(|(_, until)| *until <= now) {
                v.seen = None;
            }
            match &mut v.joining {
                None => {
                    // Just joined: leave out what its SubscribeRoomOutput had (rare: its own frame).
                    let own = match (&v.seen, &copy) {
                        (Some((seen, _)), Some(msgs))
                            if msgs.iter().any(|m| seen.contains(&m.message_id)) =>
                        {
                            let rest: Vec<Message> = msgs
                                .iter()
                                .filter(|m| !seen.contains(&m.message_id))
                                .cloned()
                                .collect();
                            if rest.is_empty() {
                                continue;
                            }
                            Some(encode_frame(room_id, rest, online))
                        }
                        _ => None,
                    };
                    let f = own.unwrap_or_else(|| frame.clone());
                    if v.viewer.tx.try_send(f).is_err() {
                        dropped += 1;
                    }
                }
                Some(buf) => {
                    // Rare: a viewer that started joining between the two locks gets a decoded copy.
                    let msgs = match &copy {
                        Some(c) => c.clone(),
                        None => decode_messages(&frame),
                    };
                    buf.extend(msgs);
                    let over = buf.len().saturating_sub(self.config.joining_buffer);
                    buf.drain(..over);
                }
            }
        }
        if dropped > 0 {
            self.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
        online
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
    };
    bus.publish(
        &Subject::room(room_id),
        Vec::new(),
        Bytes::from(event.encode_to_vec()),
    )
    .await
}

fn decode_messages(frame: &Bytes) -> Vec<Message> {
    match Packet::decode(frame.clone()) {
        Ok(Packet {
            body: Some(Body::RoomMessages(r)),
            ..
        }) => r.messages,
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zhibo_bus::memory::MemoryBus;

    fn viewer(conn_id: u64, cap: usize) -> (Viewer, mpsc::Receiver<Bytes>) {
        let (tx, rx) = mpsc::channel(cap);
        (
            Viewer {
                conn_id,
                user_id: conn_id as i64,
                device_id: conn_id as i64,
                tx,
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
            batch_max: 100,
            presence_interval: Duration::from_millis(100),
            ..RoomConfig::default()
        }
    }

    #[tokio::test]
    async fn batches_fan_out_once_and_unsubscribe_with_the_last_viewer() {
        let bus = MemoryBus::new();
        let hub = RoomHub::new("gw".into(), Arc::new(bus.clone()), config());
        let (a, mut ra) = viewer(1, 8);
        let (b, mut rb) = viewer(2, 8);
        hub.join(a, 5, false).await.expect("join a");
        hub.join(b, 5, false).await.expect("join b");
        assert_eq!(hub.subscription_count(), 1);
        assert_eq!(bus.subject_count(), 1);
        for (conn, history) in [(1, vec![]), (2, vec![])] {
            let (recent, online) = hub.ready(conn, 5, history).expect("ready");
            assert!(recent.is_empty());
            assert_eq!(online, 2);
        }
        for id in 1..=5 {
            publish(&bus, 5, id).await;
        }
        let fa = ra.recv().await.expect("frame");
        let fb = rb.recv().await.expect("frame");
        // One encoding shared by both viewers.
        assert_eq!(fa.as_ptr(), fb.as_ptr());
        let f = frame_of(&fa);
        assert_eq!(
            f.messages.iter().map(|m| m.message_id).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        assert_eq!((f.room_id, f.online_count), (5, 2));

        hub.leave(1, 5);
        assert_eq!(hub.subscription_count(), 1);
        hub.leave_all(2);
        assert_eq!(hub.subscription_count(), 0);
        let deadline = Instant::now() + Duration::from_secs(2);
        while bus.subject_count() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(bus.subject_count(), 0, "unsubscribed from the bus");
    }

    #[tokio::test]
    async fn joining_viewer_gets_the_gap_without_repeats() {
        let bus = MemoryBus::new();
        let hub = RoomHub::new("gw".into(), Arc::new(bus.clone()), config());
        let (a, mut ra) = viewer(1, 8);
        hub.join(a, 9, false).await.expect("join");
        // Published while the history is being read: 2 is in the history, 3 is not.
        publish(&bus, 9, 2).await;
        publish(&bus, 9, 3).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let history = vec![
            Message {
                message_id: 1,
                ..Message::default()
            },
            Message {
                message_id: 2,
                ..Message::default()
            },
        ];
        let (recent, _) = hub.ready(1, 9, history).expect("ready");
        assert_eq!(
            recent.iter().map(|m| m.message_id).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert!(ra.try_recv().is_err(), "nothing pushed while joining");
        publish(&bus, 9, 4).await;
        let f = frame_of(&ra.recv().await.expect("frame"));
        assert_eq!(f.messages[0].message_id, 4);
    }

    /// Messages the history already holds but still waiting in the batch window when the viewer
    /// becomes ready (or arriving just after) are not sent to it again; newer ones are.
    #[tokio::test]
    async fn a_viewer_ready_mid_window_gets_no_repeat_of_its_recent() {
        let bus = MemoryBus::new();
        let hub = RoomHub::new(
            "gw".into(),
            Arc::new(bus.clone()),
            RoomConfig {
                batch_window: Duration::from_millis(300),
                ..config()
            },
        );
        let (a, mut ra) = viewer(1, 8);
        hub.join(a, 4, false).await.expect("join a");
        hub.ready(1, 4, vec![]).expect("ready a");
        // A burst waits in the batch window; b joins meanwhile and reads them from the history.
        for id in 1..=8 {
            publish(&bus, 4, id).await;
        }
        let (b, mut rb) = viewer(2, 8);
        hub.join(b, 4, false).await.expect("join b");
        let history: Vec<Message> = (1..=8)
            .map(|message_id| Message {
                message_id,
                ..Message::default()
            })
            .collect();
        let (recent, _) = hub.ready(2, 4, history).expect("ready b");
        assert_eq!(recent.len(), 8);
        publish(&bus, 4, 9).await;
        let ids = |f: &Bytes| {
            frame_of(f)
                .messages
                .iter()
                .map(|m| m.message_id)
                .collect::<Vec<_>>()
        };
        let fa = ra.recv().await.expect("a's frame");
        assert_eq!(ids(&fa), (1..=9).collect::<Vec<_>>());
        let fb = rb.recv().await.expect("b's frame");
        assert_eq!(ids(&fb), vec![9], "b got its recent again");
    }

    #[tokio::test]
    async fn full_room_queue_drops_frames_and_counts_them() {
        let bus = MemoryBus::new();
        let cfg = RoomConfig {
            batch_max: 1,
            ..config()
        };
        let hub = RoomHub::new("gw".into(), Arc::new(bus.clone()), cfg);
        let (a, mut ra) = viewer(1, 2);
        hub.join(a, 3, false).await.expect("join");
        hub.ready(1, 3, vec![]).expect("ready");
        for id in 1..=10 {
            publish(&bus, 3, id).await;
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while hub.frames_dropped() < 8 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(hub.frames_dropped(), 8);
        assert_eq!(
            frame_of(&ra.recv().await.expect("1")).messages[0].message_id,
            1
        );
        assert_eq!(
            frame_of(&ra.recv().await.expect("2")).messages[0].message_id,
            2
        );
    }

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
        let deadline = Instant::now() + Duration::from_secs(3);
        while (g1.online_count(7), g2.online_count(7)) != (5, 5) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!((g1.online_count(7), g2.online_count(7)), (5, 5));
        // A gateway whose last viewer leaves stops being counted without waiting for expiry.
        g2.leave_all(3);
        g2.leave_all(4);
        g2.leave_all(5);
        let deadline = Instant::now() + Duration::from_secs(3);
        while g1.online_count(7) != 2 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(g1.online_count(7), 2);
    }
}
