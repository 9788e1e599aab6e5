//! [`RoomState`]: one live room on one gateway, without I/O — its local viewers, the batch being
//! gathered, the other gateways' viewer reports and the late-joiner bookkeeping. The room's task
//! (`rooms` module) feeds it bus events and deadlines with the current time and does what it returns;
//! tests drive it on a fake clock.
//!
//! - Batching (adaptive): a message that arrives when the room's last frame is older than the room's
//!   current window goes out at once (a quiet room never waits); one arriving sooner waits for the end
//!   of that window (or until [`RoomConfig::batch_max`] messages / a frame's worth of bytes), and the
//!   window's messages become one `RoomMessages` packet, encoded **once** and shared as [`Bytes`] by
//!   every viewer's room queue. The window grows with the room's load — its message rate (a decaying
//!   average over [`RATE_TAU`]) times its local viewers — reaching [`RoomConfig::batch_window`] at
//!   [`RoomConfig::batch_load`] deliveries per second: a busy, crowded room trades a little latency for
//!   far fewer frame writes, a small or slow one keeps the latency of a single hop. A frame that does
//!   not fit a viewer's queue is dropped for it and counted.
//! - Online count: every [`RoomConfig::presence_interval`] the room reports its local viewer count
//!   ([`RoomOutput::presence`]); the count is the local viewers plus the latest unexpired reports of
//!   the other gateways. When it changes and no messages are flowing, viewers get a `RoomMessages` with
//!   no messages.
//! - Joining: a viewer is added *before* the recent history is read; until [`RoomState::ready`], what
//!   arrives for it is buffered as messages, then merged into its `SubscribeRoomOutput` without the ones
//!   the history already holds. For [`SEEN_FOR`] after that, its frames leave out the ids its `recent`
//!   had (they may still be in the batch window or on their way through the bus). No gap, no repeat.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message as _;
use tokio::sync::mpsc;
use zhibo_proto::bus::RoomPresence;
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{Message, Packet, RoomMessages};

/// Room fan-out settings of a gateway.
#[derive(Debug, Clone)]
pub struct RoomConfig {
    /// Longest a room message waits to be batched with others: the window of a room whose load is
    /// [`RoomConfig::batch_load`] or more.
    pub batch_window: Duration,
    /// Deliveries per second (message rate × local viewers) at which the window reaches
    /// `batch_window`; a lighter room's window is proportionally shorter.
    pub batch_load: f64,
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

/// How long after its join a viewer's frames leave out what its `recent` had: longer than a batch
/// window plus a bus hop, so a message read from the history and still on its way is not sent twice.
pub const SEEN_FOR: Duration = Duration::from_secs(5);

/// Time constant of a room's message rate estimate: a burst raises it within a fraction of this, and
/// it decays by a factor e per `RATE_TAU` of silence.
pub const RATE_TAU: Duration = Duration::from_secs(1);

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

/// What the room's task must do after an event.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RoomOutput {
    /// Frames dropped for viewers whose room queue was full.
    pub dropped: u64,
    /// Publish this gateway's viewer count of the room (a presence report).
    pub presence: Option<u64>,
}

/// One live room on one gateway. No I/O: time comes in as `now`, frames go to the viewers' queues
/// without waiting, and bus publishes come out as [`RoomOutput`].
pub struct RoomState {
    room_id: i64,
    gateway_id: String,
    config: RoomConfig,
    viewers: HashMap<u64, ViewerEntry>,
    /// Announce joins and leaves (the room's setting, as last read at a join).
    join_notices: bool,
    /// Other gateways' viewer counts: gateway id → (viewers, expiry).
    reports: HashMap<String, (u64, Instant)>,
    /// Viewers on other gateways, from their latest reports.
    remote: u64,
    /// Messages waiting for the batch window, their encoded size, and when the window ends.
    batch: Vec<Message>,
    batch_bytes: usize,
    batch_due: Option<Instant>,
    /// When the last frame with messages went out (the batch window runs from there).
    last_flush: Option<Instant>,
    /// The room's message rate (per second, decaying average) as of `rate_at`.
    rate: f64,
    rate_at: Instant,
    /// The online count the last frame carried (`None` before the first presence tick).
    last_online: Option<u64>,
    next_presence: Instant,
}

impl std::fmt::Debug for RoomState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoomState")
            .field("room_id", &self.room_id)
            .field("viewers", &self.viewers.len())
            .field("remote", &self.remote)
            .field("batched", &self.batch.len())
            .finish_non_exhaustive()
    }
}

impl RoomState {
    /// Room `room_id` as seen by gateway `gateway_id`, created at `now` (its first presence report is
    /// due at once).
    pub fn new(room_id: i64, gateway_id: String, config: RoomConfig, now: Instant) -> Self {
        RoomState {
            room_id,
            gateway_id,
            config,
            viewers: HashMap::new(),
            join_notices: false,
            reports: HashMap::new(),
            remote: 0,
            batch: Vec::new(),
            batch_bytes: 0,
            batch_due: None,
            last_flush: None,
            rate: 0.0,
            rate_at: now,
            last_online: None,
            next_presence: now,
        }
    }

    /// Local viewers.
    pub fn viewer_count(&self) -> usize {
        self.viewers.len()
    }

    /// Whether the room has no local viewer left.
    pub fn is_empty(&self) -> bool {
        self.viewers.is_empty()
    }

    /// The approximate cluster-wide viewer count: local viewers plus the other gateways' reports.
    pub fn online(&self) -> u64 {
        self.viewers.len() as u64 + self.remote
    }

    /// Whether the room announces joins and leaves.
    pub fn join_notices(&self) -> bool {
        self.join_notices
    }

    /// Adds `viewer` in its joining phase (it gets no frames until [`RoomState::ready`]); records the
    /// room's `join_notices` setting as read for this join.
    pub fn add_viewer(&mut self, viewer: Viewer, join_notices: bool) {
        self.join_notices = join_notices;
        self.viewers.insert(
            viewer.conn_id,
            ViewerEntry {
                viewer,
                joining: Some(Vec::new()),
                seen: None,
            },
        );
    }

    /// Removes a viewer; `None` if it was not in the room.
    pub fn remove_viewer(&mut self, conn_id: u64) -> Option<Viewer> {
        self.viewers.remove(&conn_id).map(|v| v.viewer)
    }

    /// Ends the joining phase of `conn_id`: returns `recent` followed by the messages that arrived since
    /// it was added and are not in `recent`, and the online count. From now on it gets frames, leaving
    /// out until `now + SEEN_FOR` the messages it was handed. `None` if it is not joining here.
    pub fn ready(
        &mut self,
        conn_id: u64,
        mut recent: Vec<Message>,
        now: Instant,
    ) -> Option<(Vec<Message>, u64)> {
        let online = self.online();
        let v = self.viewers.get_mut(&conn_id)?;
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
            v.seen = Some((known, now + SEEN_FOR));
        }
        Some((recent, online))
    }

    /// The room's message rate (per second) at `now`: a decaying average over [`RATE_TAU`].
    pub fn rate(&self, now: Instant) -> f64 {
        let dt = now.saturating_duration_since(self.rate_at).as_secs_f64();
        self.rate * (-dt / RATE_TAU.as_secs_f64()).exp()
    }

    /// The batch window at `now`: [`RoomConfig::batch_window`] scaled by the room's load (message rate ×
    /// local viewers) over [`RoomConfig::batch_load`], at most the full window.
    pub fn window(&self, now: Instant) -> Duration {
        let load = self.rate(now) * self.viewers.len() as f64;
        let share = (load / self.config.batch_load).clamp(0.0, 1.0);
        self.config.batch_window.mul_f64(share)
    }

    /// A room message from the bus: sent at once when the room's last frame is older than its window
    /// (a quiet room), else batched until that window ends; the batch also goes when it is full.
    pub fn on_message(&mut self, message: Message, now: Instant) -> RoomOutput {
        let mut out = RoomOutput::default();
        self.rate = self.rate(now) + 1.0 / RATE_TAU.as_secs_f64();
        self.rate_at = now;
        let len = message.encoded_len() + 8;
        // Keep the frame under the transport's maximum (with room for the header).
        if self.batch_bytes + len > self.config.max_frame.saturating_sub(64)
            && !self.batch.is_empty()
        {
            out.dropped += self.flush(now);
        }
        self.batch_bytes += len;
        self.batch.push(message);
        if self.batch_due.is_none() {
            let due = match self.last_flush {
                Some(last) => last + self.window(now),
                None => now,
            };
            self.batch_due = Some(due);
        }
        if self.batch.len() >= self.config.batch_max || self.batch_due.is_some_and(|d| d <= now) {
            out.dropped += self.flush(now);
        }
        out
    }

    /// Another gateway's (or this one's own, ignored) viewer count of the room.
    pub fn on_presence(&mut self, report: RoomPresence, now: Instant) {
        if report.gateway_id == self.gateway_id {
            return;
        }
        if report.viewers == 0 {
            self.reports.remove(&report.gateway_id);
        } else {
            let ttl = Duration::from_millis(u64::from(report.ttl_ms));
            self.reports
                .insert(report.gateway_id, (report.viewers, now + ttl));
        }
        self.remote = self.reports.values().map(|(n, _)| n).sum();
    }

    /// Whatever is due at `now`: the batch window's end (send the batch), the presence interval
    /// (expire old reports, report this gateway's count, tell viewers a changed count).
    pub fn on_tick(&mut self, now: Instant) -> RoomOutput {
        let mut out = RoomOutput::default();
        if self.batch_due.is_some_and(|due| due <= now) {
            out.dropped += self.flush(now);
        }
        if self.next_presence <= now {
            self.next_presence = now + self.config.presence_interval;
            self.reports.retain(|_, (_, expiry)| *expiry > now);
            self.remote = self.reports.values().map(|(n, _)| n).sum();
            let online = self.online();
            out.presence = Some(self.viewers.len() as u64);
            // Tell viewers a changed count even when no message carries it.
            if self.batch.is_empty() && self.last_online.is_some_and(|o| o != online) {
                out.dropped += self.flush(now);
            } else if self.last_online.is_none() {
                self.last_online = Some(online);
            }
        }
        out
    }

    /// When [`RoomState::on_tick`] must next be called: the batch window's end or the next presence
    /// report, whichever comes first.
    pub fn next_deadline(&self) -> Instant {
        match self.batch_due {
            Some(due) => due.min(self.next_presence),
            None => self.next_presence,
        }
    }

    /// The time to live of this gateway's presence reports: three intervals.
    pub fn presence_ttl(&self) -> Duration {
        self.config.presence_interval * 3
    }

    /// Sends the batch (possibly empty: a count refresh) to every viewer as one shared frame; returns
    /// the frames dropped for full queues.
    fn flush(&mut self, now: Instant) -> u64 {
        let messages = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        self.batch_due = None;
        if !messages.is_empty() {
            self.last_flush = Some(now);
        }
        let online = self.online();
        self.last_online = Some(online);
        let room_id = self.room_id;
        let special = self
            .viewers
            .values()
            .any(|v| v.joining.is_some() || v.seen.is_some());
        let copy = (special && !messages.is_empty()).then(|| messages.clone());
        let frame = encode_frame(room_id, messages, online);
        let mut dropped = 0;
        for v in self.viewers.values_mut() {
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
                    if let Some(msgs) = &copy {
                        buf.extend(msgs.iter().cloned());
                        let over = buf.len().saturating_sub(self.config.joining_buffer);
                        buf.drain(..over);
                    }
                }
            }
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_millis(30);
    const PRESENCE: Duration = Duration::from_millis(100);

    fn config() -> RoomConfig {
        RoomConfig {
            batch_window: WINDOW,
            // Any traffic makes the window full: these tests are about what a window holds.
            batch_load: f64::MIN_POSITIVE,
            batch_max: 100,
            presence_interval: PRESENCE,
            ..RoomConfig::default()
        }
    }

    fn viewer(conn_id: u64, cap: usize) -> (Viewer, mpsc::Receiver<Bytes>) {
        let (tx, rx) = mpsc::channel(cap);
        let v = Viewer {
            conn_id,
            user_id: conn_id as i64,
            device_id: conn_id as i64,
            tx,
        };
        (v, rx)
    }

    fn msg(id: u64) -> Message {
        Message {
            message_id: id,
            receiver_id: 5,
            content: Bytes::from(format!("m{id}")),
            ..Message::default()
        }
    }

    fn frame_of(b: &Bytes) -> RoomMessages {
        match Packet::decode(b.clone()).expect("packet").body {
            Some(Body::RoomMessages(r)) => r,
            other => panic!("expected RoomMessages, got {other:?}"),
        }
    }

    fn ids(b: &Bytes) -> Vec<u64> {
        frame_of(b).messages.iter().map(|m| m.message_id).collect()
    }

    /// A room at `t0` past its first presence tick (so only the batch window is pending), with
    /// `viewers` ready viewers whose queues hold `cap` frames.
    fn room(t0: Instant, viewers: u64, cap: usize) -> (RoomState, Vec<mpsc::Receiver<Bytes>>) {
        let mut r = RoomState::new(5, "gw".into(), config(), t0);
        let mut rxs = Vec::new();
        for c in 1..=viewers {
            let (v, rx) = viewer(c, cap);
            r.add_viewer(v, false);
            r.ready(c, vec![], t0).expect("ready");
            rxs.push(rx);
        }
        assert_eq!(r.on_tick(t0).presence, Some(viewers));
        (r, rxs)
    }

    #[test]
    fn a_batch_waits_for_its_window_then_goes_out_once_encoded() {
        let t0 = Instant::now();
        let (mut r, mut rxs) = room(t0, 2, 8);
        // The first message of a quiet room goes at once; the ones right behind it wait.
        r.on_message(msg(1), t0);
        assert_eq!(ids(&rxs[0].try_recv().expect("a's first")), vec![1]);
        assert_eq!(ids(&rxs[1].try_recv().expect("b's first")), vec![1]);
        for id in 2..=5 {
            assert_eq!(r.on_message(msg(id), t0), RoomOutput::default());
        }
        assert_eq!(r.next_deadline(), t0 + WINDOW);
        r.on_tick(t0 + WINDOW - Duration::from_millis(1));
        assert!(rxs[0].try_recv().is_err(), "sent before the window ended");
        assert_eq!(r.on_tick(t0 + WINDOW).dropped, 0);
        let fa = rxs[0].try_recv().expect("a's frame");
        let fb = rxs[1].try_recv().expect("b's frame");
        assert_eq!(fa.as_ptr(), fb.as_ptr(), "one encoding shared by both");
        assert_eq!(ids(&fa), vec![2, 3, 4, 5]);
        let f = frame_of(&fa);
        assert_eq!((f.room_id, f.online_count), (5, 2));
        assert_eq!(r.next_deadline(), t0 + PRESENCE, "nothing batched");
    }

    #[test]
    fn a_full_batch_or_frame_goes_out_without_waiting() {
        let t0 = Instant::now();
        let mut r = RoomState::new(
            5,
            "gw".into(),
            RoomConfig {
                batch_max: 3,
                ..config()
            },
            t0,
        );
        let (v, mut rx) = viewer(1, 8);
        r.add_viewer(v, false);
        r.ready(1, vec![], t0);
        for id in 1..=5 {
            r.on_message(msg(id), t0);
        }
        assert_eq!(ids(&rx.try_recv().expect("at once")), vec![1]);
        assert_eq!(ids(&rx.try_recv().expect("full batch")), vec![2, 3, 4]);
        assert!(rx.try_recv().is_err());
        // A frame's worth of bytes goes out before the next message would overflow it.
        let mut r = RoomState::new(
            5,
            "gw".into(),
            RoomConfig {
                max_frame: 1024,
                ..config()
            },
            t0,
        );
        let (v, mut rx) = viewer(1, 8);
        r.add_viewer(v, false);
        r.ready(1, vec![], t0);
        let big = |id| Message {
            content: Bytes::from(vec![b'x'; 400]),
            ..msg(id)
        };
        for id in 1..=4 {
            r.on_message(big(id), t0);
        }
        assert_eq!(ids(&rx.try_recv().expect("at once")), vec![1]);
        let second = rx.try_recv().expect("flushed before overflowing");
        assert!(second.len() <= 1024, "{} bytes", second.len());
        assert_eq!(ids(&second), vec![2, 3]);
    }

    /// A quiet room (light load) never makes a message wait, even with a long configured window: each
    /// message after a gap goes out in the call that brought it.
    #[test]
    fn a_quiet_room_flushes_at_once() {
        let t0 = Instant::now();
        let config = RoomConfig {
            batch_window: Duration::from_secs(1),
            batch_load: 200_000.0,
            presence_interval: Duration::from_secs(60),
            ..RoomConfig::default()
        };
        let mut r = RoomState::new(5, "gw".into(), config, t0);
        let mut rxs = Vec::new();
        for c in 1..=50 {
            let (v, rx) = viewer(c, 8);
            r.add_viewer(v, false);
            r.ready(c, vec![], t0);
            rxs.push(rx);
        }
        r.on_tick(t0);
        // One message every 100 ms (10/s × 50 viewers = 500 deliveries/s): a window of ~2.5 ms.
        for i in 0..20u64 {
            let t = t0 + Duration::from_millis(100 * i);
            assert!(r.next_deadline() > t, "nothing pending");
            r.on_message(msg(i + 1), t);
            for rx in &mut rxs {
                assert_eq!(ids(&rx.try_recv().expect("sent at once")), vec![i + 1]);
            }
            assert!(r.window(t) < Duration::from_millis(5), "{:?}", r.window(t));
        }
    }

    /// A storm in a crowded room: messages are batched, each waits at most the configured window,
    /// and once the rate has built up frames go out once per full window.
    #[test]
    fn a_storm_batches_up_to_the_max_window() {
        let t0 = Instant::now();
        let window = Duration::from_millis(50);
        let config = RoomConfig {
            batch_window: window,
            batch_max: 10_000,
            batch_load: 10_000.0,
            presence_interval: Duration::from_secs(60),
            ..RoomConfig::default()
        };
        let mut r = RoomState::new(5, "gw".into(), config, t0);
        let mut rxs = Vec::new();
        for c in 1..=100 {
            let (v, rx) = viewer(c, 1024);
            r.add_viewer(v, false);
            r.ready(c, vec![], t0);
            rxs.push(rx);
        }
        r.on_tick(t0);
        // 1000 messages/s for 2 s, 100 viewers: 100k deliveries/s, ten times the full-window load.
        let mut sent_at = HashMap::new();
        let mut frames = Vec::new(); // (time, ids)
        let step = Duration::from_millis(1);
        let mut drain = |t: Instant, rxs: &mut Vec<mpsc::Receiver<Bytes>>| {
            let first = rxs[0].try_recv().ok().map(|f| ids(&f));
            for rx in rxs.iter_mut().skip(1) {
                assert_eq!(rx.try_recv().ok().map(|f| ids(&f)), first, "same frames");
            }
            if let Some(ids) = first {
                frames.push((t, ids));
            }
        };
        for i in 0..2000u64 {
            let t = t0 + step * i as u32;
            if r.next_deadline() <= t {
                r.on_tick(t);
                drain(t, &mut rxs);
            }
            sent_at.insert(i + 1, t);
            r.on_message(msg(i + 1), t);
            drain(t, &mut rxs);
        }
        // The last batch goes at its window's end.
        let end = r.next_deadline();
        assert!(
            end <= t0 + Duration::from_secs(2) + window,
            "last batch pending"
        );
        r.on_tick(end);
        drain(end, &mut rxs);
        let got: Vec<u64> = frames.iter().flat_map(|(_, ids)| ids.clone()).collect();
        assert_eq!(
            got,
            (1..=2000).collect::<Vec<_>>(),
            "every message, in order"
        );
        for (t, ids) in &frames {
            for id in ids {
                assert!(*t - sent_at[id] <= window, "message {id} waited too long");
            }
        }
        // Once the rate is known (a tenth of a second at 1000/s), one frame per full window.
        let steady: Vec<Instant> = frames
            .iter()
            .map(|(t, _)| *t)
            .filter(|t| *t >= t0 + Duration::from_millis(200) && *t < end)
            .collect();
        for pair in steady.windows(2) {
            assert_eq!(pair[1] - pair[0], window, "frames one full window apart");
        }
        assert!(
            frames.len() <= 2000 / 50 + 15,
            "{} frames for 2000 messages",
            frames.len()
        );
        assert_eq!(r.window(t0 + Duration::from_millis(1999)), window);
    }

    /// The window grows with the rate and with the audience, up to the configured maximum.
    #[test]
    fn the_window_grows_with_rate_and_audience() {
        let t0 = Instant::now();
        let config = RoomConfig {
            batch_window: Duration::from_millis(50),
            batch_load: 100_000.0,
            presence_interval: Duration::from_secs(60),
            ..RoomConfig::default()
        };
        let window_at = |viewers: u64, per_sec: u32| {
            let mut r = RoomState::new(5, "gw".into(), config.clone(), t0);
            let mut rxs = Vec::new();
            for c in 1..=viewers {
                let (v, rx) = viewer(c, 1);
                r.add_viewer(v, false);
                rxs.push(rx);
            }
            // Three seconds at `per_sec`: the decaying average has settled.
            let gap = Duration::from_secs(1) / per_sec;
            let mut t = t0;
            for id in 0..3 * u64::from(per_sec) {
                t = t0 + gap * id as u32;
                r.on_message(msg(id + 1), t);
            }
            r.window(t)
        };
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let (small, crowded) = (window_at(100, 50), window_at(1000, 50));
        let fast = window_at(100, 500);
        assert!(ms(small) > 1.5 && ms(small) < 4.0, "{small:?}");
        assert!(ms(crowded) > 8.0 * ms(small), "{crowded:?} vs {small:?}");
        assert!(ms(fast) > 8.0 * ms(small), "{fast:?} vs {small:?}");
        assert_eq!(window_at(1000, 500), Duration::from_millis(50), "capped");
    }

    #[test]
    fn joining_viewer_gets_the_gap_without_repeats() {
        let t0 = Instant::now();
        let (mut r, _) = room(t0, 0, 8);
        let (a, mut ra) = viewer(1, 8);
        r.add_viewer(a, false);
        // Published while the history is being read: 2 is in the history, 3 is not.
        r.on_message(msg(2), t0);
        r.on_message(msg(3), t0);
        r.on_tick(t0 + WINDOW);
        assert!(ra.try_recv().is_err(), "nothing pushed while joining");
        let (recent, online) = r
            .ready(1, vec![msg(1), msg(2)], t0 + WINDOW)
            .expect("ready");
        assert_eq!(
            recent.iter().map(|m| m.message_id).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(online, 1);
        assert!(r.ready(1, vec![], t0).is_none(), "ready once");
        let t1 = t0 + WINDOW * 2;
        r.on_message(msg(4), t1);
        r.on_tick(t1 + WINDOW);
        assert_eq!(ids(&ra.try_recv().expect("frame")), vec![4]);
    }

    /// Messages the history already holds but still waiting in the batch window when the viewer
    /// becomes ready (or arriving just after) are not sent to it again; newer ones are. After
    /// [`SEEN_FOR`] it gets every message again.
    #[test]
    fn a_viewer_ready_mid_window_gets_no_repeat_of_its_recent() {
        let t0 = Instant::now();
        let (mut r, mut rxs) = room(t0, 1, 8);
        for id in 1..=8 {
            r.on_message(msg(id), t0);
        }
        assert_eq!(ids(&rxs[0].try_recv().expect("at once")), vec![1]);
        let (b, mut rb) = viewer(2, 8);
        r.add_viewer(b, false);
        let history: Vec<Message> = (1..=8).map(msg).collect();
        let (recent, _) = r.ready(2, history, t0).expect("ready b");
        assert_eq!(recent.len(), 8);
        r.on_message(msg(9), t0);
        r.on_tick(t0 + WINDOW);
        assert_eq!(
            ids(&rxs[0].try_recv().expect("a")),
            (2..=9).collect::<Vec<_>>()
        );
        assert_eq!(
            ids(&rb.try_recv().expect("b")),
            vec![9],
            "b got its recent again"
        );
        // A late copy of one it had, while it is remembered: left out (no frame at all).
        r.on_message(msg(3), t0 + WINDOW);
        r.on_tick(t0 + WINDOW * 2);
        assert_eq!(ids(&rxs[0].try_recv().expect("a")), vec![3]);
        assert!(rb.try_recv().is_err(), "nothing left for b");
        // Forgotten after SEEN_FOR.
        let later = t0 + SEEN_FOR;
        r.on_message(msg(3), later);
        r.on_tick(later + WINDOW);
        assert_eq!(ids(&rb.try_recv().expect("b")), vec![3]);
    }

    #[test]
    fn a_joining_viewers_buffer_is_bounded() {
        let t0 = Instant::now();
        let mut r = RoomState::new(
            5,
            "gw".into(),
            RoomConfig {
                joining_buffer: 3,
                ..config()
            },
            t0,
        );
        let (a, _ra) = viewer(1, 8);
        r.add_viewer(a, false);
        for id in 1..=5 {
            r.on_message(msg(id), t0);
        }
        r.on_tick(t0 + WINDOW);
        let (recent, _) = r.ready(1, vec![], t0 + WINDOW).expect("ready");
        assert_eq!(
            recent.iter().map(|m| m.message_id).collect::<Vec<_>>(),
            vec![3, 4, 5],
            "the newest are kept"
        );
    }

    #[test]
    fn full_room_queue_drops_frames_and_counts_them() {
        let t0 = Instant::now();
        let mut r = RoomState::new(
            5,
            "gw".into(),
            RoomConfig {
                batch_max: 1,
                ..config()
            },
            t0,
        );
        let (a, mut ra) = viewer(1, 2);
        r.add_viewer(a, false);
        r.ready(1, vec![], t0);
        let dropped: u64 = (1..=10).map(|id| r.on_message(msg(id), t0).dropped).sum();
        assert_eq!(dropped, 8);
        assert_eq!(ids(&ra.try_recv().expect("1")), vec![1]);
        assert_eq!(ids(&ra.try_recv().expect("2")), vec![2]);
    }

    fn report(gateway_id: &str, viewers: u64, ttl: Duration) -> RoomPresence {
        RoomPresence {
            gateway_id: gateway_id.into(),
            viewers,
            ttl_ms: ttl.as_millis() as u32,
        }
    }

    /// The online count sums this gateway's viewers and the other gateways' unexpired reports; a
    /// gateway reporting 0 stops being counted at once; this gateway's own report is not counted.
    #[test]
    fn online_count_sums_unexpired_reports_of_other_gateways() {
        let t0 = Instant::now();
        let (mut r, _rxs) = room(t0, 2, 8);
        r.on_presence(report("gw", 2, PRESENCE * 3), t0);
        assert_eq!(r.online(), 2, "own report ignored");
        r.on_presence(report("g2", 3, PRESENCE * 3), t0);
        r.on_presence(report("g3", 4, PRESENCE), t0);
        assert_eq!(r.online(), 9);
        r.on_presence(report("g2", 0, PRESENCE * 3), t0);
        assert_eq!(r.online(), 6, "a gateway whose last viewer left");
        // g3's report expires; it is dropped at the next presence tick.
        assert_eq!(r.on_tick(t0 + PRESENCE).presence, Some(2));
        assert_eq!(r.online(), 2);
    }

    /// Each presence interval reports the local count; a changed count reaches viewers in a frame
    /// without messages when none is flowing, an unchanged one does not.
    #[test]
    fn a_changed_count_is_told_without_messages() {
        let t0 = Instant::now();
        let (mut r, mut rxs) = room(t0, 1, 8);
        assert_eq!(r.next_deadline(), t0 + PRESENCE);
        let t1 = t0 + PRESENCE;
        assert_eq!(r.on_tick(t1).presence, Some(1));
        assert!(rxs[0].try_recv().is_err(), "unchanged count: no frame");
        r.on_presence(report("g2", 2, PRESENCE * 3), t1);
        let t2 = t1 + PRESENCE;
        assert_eq!(r.next_deadline(), t2);
        assert_eq!(r.on_tick(t2).presence, Some(1));
        let f = frame_of(&rxs[0].try_recv().expect("count refresh"));
        assert!(f.messages.is_empty());
        assert_eq!(f.online_count, 3);
    }
}
