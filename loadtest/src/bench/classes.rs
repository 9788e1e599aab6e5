//! The room scenario's class mix (issue 17): which share of the sent room messages is high priority
//! (gifts), chat or likes, how the senders pick a class for each message, how receivers tell the
//! classes apart, and the per-class part of a step's report (including the gateway's own shaping
//! counters, scraped from its `/metrics`).
//!
//! A message's class travels in `SendMessageInput.room_class`; receivers recognise it by the
//! `content_type` the sender gave it ([`content_type`]): likes never arrive as messages, only as the
//! `RoomMessages.likes` count of a frame.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use zhibo_proto::client::RoomClass;

use super::hist::{new_histogram, record, Latency};

/// The classes in report order; [`class_index`] maps a class to its position.
pub const CLASSES: [RoomClass; 3] = [RoomClass::High, RoomClass::Chat, RoomClass::Like];

/// The report's name of a class.
pub fn class_name(c: RoomClass) -> &'static str {
    match c {
        RoomClass::High => "high",
        RoomClass::Chat => "chat",
        RoomClass::Like => "like",
    }
}

/// Position of `c` in [`CLASSES`].
pub fn class_index(c: RoomClass) -> usize {
    match c {
        RoomClass::High => 0,
        RoomClass::Chat => 1,
        RoomClass::Like => 2,
    }
}

/// The `content_type` the generator gives a message of class `c` (chat keeps 1, the generator's
/// content type everywhere), so a receiver can tell the classes apart.
pub fn content_type(c: RoomClass) -> i32 {
    match c {
        RoomClass::Chat => 1,
        RoomClass::High => 2,
        RoomClass::Like => 3,
    }
}

/// The class of a received message, from its `content_type` (anything unknown counts as chat).
pub fn class_of_content_type(t: i32) -> RoomClass {
    match t {
        2 => RoomClass::High,
        3 => RoomClass::Like,
        _ => RoomClass::Chat,
    }
}

/// Shares of the sent room messages per class, as weights (`--mix high=2,chat=90,like=8`: percentages,
/// but any positive weights work). The default is all chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassMix {
    /// Weights in [`CLASSES`] order.
    pub weights: [u32; 3],
}

impl Default for ClassMix {
    fn default() -> Self {
        ClassMix {
            weights: [0, 100, 0],
        }
    }
}

impl std::fmt::Display for ClassMix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = CLASSES
            .iter()
            .zip(self.weights)
            .map(|(c, w)| format!("{}={w}", class_name(*c)))
            .collect();
        f.write_str(&parts.join(","))
    }
}

impl FromStr for ClassMix {
    type Err = String;

    /// `high=2,chat=90,like=8`; classes left out weigh 0; at least one weight must be positive.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut weights = [0u32; 3];
        let mut seen = [false; 3];
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, w) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not class=weight"))?;
            let c = CLASSES
                .iter()
                .find(|c| class_name(**c) == name.trim())
                .ok_or_else(|| format!("unknown class {name:?} (high, chat, like)"))?;
            let i = class_index(*c);
            if seen[i] {
                return Err(format!("class {name:?} given twice"));
            }
            seen[i] = true;
            weights[i] = w
                .trim()
                .parse()
                .map_err(|_| format!("weight {w:?} of {name} is not a whole number"))?;
        }
        if weights.iter().all(|w| *w == 0) {
            return Err("the mix needs at least one positive weight".into());
        }
        if weights.iter().map(|w| u64::from(*w)).sum::<u64>() > u64::from(u32::MAX) {
            return Err("the weights add up to too much".into());
        }
        Ok(ClassMix { weights })
    }
}

impl ClassMix {
    /// Whether every message is chat (the scenario as it was before classes).
    pub fn all_chat(&self) -> bool {
        self.weights[0] == 0 && self.weights[2] == 0
    }

    /// A picker of classes in this mix for one sender.
    pub fn picker(&self) -> ClassPicker {
        ClassPicker {
            weights: self.weights.map(i64::from),
            total: self.weights.iter().map(|w| i64::from(*w)).sum(),
            current: [0; 3],
        }
    }
}

/// Smooth weighted round robin over the mix: every run of `total weight` picks gives each class exactly
/// its weight, spread out (a 2% class comes every 50th message, not in a clump), and any prefix is within
/// one message of its share per class. Deterministic, so a report's counts can be checked exactly.
#[derive(Debug, Clone)]
pub struct ClassPicker {
    weights: [i64; 3],
    total: i64,
    current: [i64; 3],
}

impl ClassPicker {
    /// The class of the next message.
    pub fn next_class(&mut self) -> RoomClass {
        let mut best = 0;
        for i in 0..3 {
            self.current[i] += self.weights[i];
            if self.current[i] > self.current[best] {
                best = i;
            }
        }
        self.current[best] -= self.total;
        CLASSES[best]
    }
}

/// What the generator counts per class while a room step runs (sender and receiver sides).
#[derive(Debug)]
pub struct ClassMeter {
    sent: [AtomicU64; 3],
    acked: [AtomicU64; 3],
    /// Messages received per class (likes: never, they come as counts).
    delivered: [AtomicU64; 3],
    /// Send → delivered per class (high, chat; likes have no per-message time).
    latency: [Mutex<Histogram<u64>>; 2],
    /// Sum of `RoomMessages.chat_skipped` over every received frame: chat the viewers were told was
    /// left out for them.
    chat_skipped: AtomicU64,
    /// Sum of `RoomMessages.likes` over every received frame.
    likes: AtomicU64,
    /// `RoomMessages` frames received (with messages, likes or skips; count refreshes not counted).
    frames: AtomicU64,
}

impl Default for ClassMeter {
    fn default() -> Self {
        ClassMeter {
            sent: Default::default(),
            acked: Default::default(),
            delivered: Default::default(),
            latency: [Mutex::new(new_histogram()), Mutex::new(new_histogram())],
            chat_skipped: AtomicU64::new(0),
            likes: AtomicU64::new(0),
            frames: AtomicU64::new(0),
        }
    }
}

/// A snapshot of a [`ClassMeter`]'s counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClassSnapshot {
    /// Sent per class ([`CLASSES`] order).
    pub sent: [u64; 3],
    /// Acknowledged per class.
    pub acked: [u64; 3],
    /// Received as messages per class.
    pub delivered: [u64; 3],
    /// Sum of the frames' `chat_skipped`.
    pub chat_skipped: u64,
    /// Sum of the frames' `likes`.
    pub likes: u64,
    /// Frames received.
    pub frames: u64,
}

impl ClassSnapshot {
    /// `self - earlier`, counter by counter.
    pub fn since(&self, earlier: &ClassSnapshot) -> ClassSnapshot {
        let sub = |a: [u64; 3], b: [u64; 3]| [a[0] - b[0], a[1] - b[1], a[2] - b[2]];
        ClassSnapshot {
            sent: sub(self.sent, earlier.sent),
            acked: sub(self.acked, earlier.acked),
            delivered: sub(self.delivered, earlier.delivered),
            chat_skipped: self.chat_skipped - earlier.chat_skipped,
            likes: self.likes - earlier.likes,
            frames: self.frames - earlier.frames,
        }
    }

    /// Per-viewer outcomes accounted for: every (message, viewer) pair of an acknowledged message ends
    /// as a message received, a chat message the viewer was told was skipped, or a like counted.
    pub fn accounted(&self) -> u64 {
        self.delivered.iter().sum::<u64>() + self.chat_skipped + self.likes
    }
}

impl ClassMeter {
    /// Reads the counters.
    pub fn snapshot(&self) -> ClassSnapshot {
        let load = |a: &[AtomicU64; 3]| a.each_ref().map(|x| x.load(Ordering::Relaxed));
        ClassSnapshot {
            sent: load(&self.sent),
            acked: load(&self.acked),
            delivered: load(&self.delivered),
            chat_skipped: self.chat_skipped.load(Ordering::Relaxed),
            likes: self.likes.load(Ordering::Relaxed),
            frames: self.frames.load(Ordering::Relaxed),
        }
    }

    /// A message of class `c` was sent.
    pub fn sent(&self, c: RoomClass) {
        self.sent[class_index(c)].fetch_add(1, Ordering::Relaxed);
    }

    /// A message of class `c` was acknowledged.
    pub fn acked(&self, c: RoomClass) {
        self.acked[class_index(c)].fetch_add(1, Ordering::Relaxed);
    }

    /// A message with `content_type` arrived `latency_us` after it was meant to be sent (`None`: no
    /// timestamp in it).
    pub fn delivered(&self, content_type: i32, latency_us: Option<u64>) {
        let c = class_of_content_type(content_type);
        self.delivered[class_index(c)].fetch_add(1, Ordering::Relaxed);
        let h = match c {
            RoomClass::High => &self.latency[0],
            RoomClass::Chat => &self.latency[1],
            RoomClass::Like => return,
        };
        if let Some(us) = latency_us {
            record(&mut h.lock().unwrap_or_else(|e| e.into_inner()), us);
        }
    }

    /// A `RoomMessages` frame arrived with `messages` messages and these counts.
    pub fn frame(&self, messages: usize, likes: u64, chat_skipped: u64) {
        if messages > 0 || likes > 0 || chat_skipped > 0 {
            self.frames.fetch_add(1, Ordering::Relaxed);
        }
        self.likes.fetch_add(likes, Ordering::Relaxed);
        self.chat_skipped.fetch_add(chat_skipped, Ordering::Relaxed);
    }

    /// The latency summaries since the last call (high, chat); resets them.
    pub fn take_latency(&self) -> [Latency; 2] {
        self.latency.each_ref().map(|h| {
            let mut h = h.lock().unwrap_or_else(|e| e.into_inner());
            let l = Latency::of(&h);
            h.reset();
            l
        })
    }
}

/// One class in a room step of the report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClassStep {
    /// Messages of the class sent.
    pub sent: u64,
    /// Of them, acknowledged.
    pub acked: u64,
    /// Received by viewers (likes: the likes counted in frames, `RoomMessages.likes` summed over
    /// viewers).
    pub delivered: u64,
    /// `delivered / (acked × viewers in the room)`: the share of the class each viewer was shown.
    pub shown_ratio: f64,
    /// Received per second per viewer (`delivered / duration / viewers`).
    pub per_viewer_rate: f64,
    /// Send → delivered (none for likes).
    pub deliver_latency: Latency,
    /// Chat only: what the viewers were told was left out for them (`RoomMessages.chat_skipped`
    /// summed over viewers: sampled above the display rate, or shed because the viewer was slow).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub told_skipped: Option<u64>,
    /// From the gateway's metrics, when scraped: messages of the class sampled away, once per window
    /// and gateway (`zhibo_room_sampled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_sampled: Option<u64>,
    /// From the gateway's metrics, when scraped: per-viewer deliveries of the class dropped for slow
    /// viewers (`zhibo_room_dropped`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_dropped: Option<u64>,
}

/// The room part of a step: the class mix and what each class became.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoomStep {
    /// The mix sent (`high=2,chat=90,like=8`).
    pub mix: String,
    /// Per class (`high`, `chat`, `like`).
    pub classes: BTreeMap<String, ClassStep>,
    /// Room frames received over all viewers.
    pub frames: u64,
    /// Frames the gateway dropped for viewers whose room queue was full (`zhibo_queue_drops{kind =
    /// room_frame}`), when scraped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frames_dropped: Option<u64>,
    /// Messages (all classes) received per second per viewer.
    pub per_viewer_rate: f64,
}

/// The gateway's shaping counters at one moment (from its `/metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShapingScrape {
    /// `zhibo_room_sampled{kind}` per class ([`CLASSES`] order).
    pub sampled: [u64; 3],
    /// `zhibo_room_dropped{kind}` per class.
    pub dropped: [u64; 3],
    /// `zhibo_queue_drops{kind="room_frame"}`.
    pub frames_dropped: u64,
}

impl ShapingScrape {
    /// Reads the counters out of a Prometheus text exposition (absent counters are 0).
    pub fn parse(text: &str) -> ShapingScrape {
        let mut s = ShapingScrape::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((key, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.trim().parse::<f64>() else {
                continue;
            };
            let value = value as u64;
            let (name, labels) = key.split_once('{').unwrap_or((key, ""));
            let name = name.strip_suffix("_total").unwrap_or(name);
            let kind = labels
                .split(',')
                .find_map(|l| l.trim().strip_prefix("kind=\""))
                .and_then(|l| l.split('"').next())
                .unwrap_or("");
            let class = CLASSES.iter().position(|c| class_name(*c) == kind);
            match (name, class) {
                ("zhibo_room_sampled", Some(i)) => s.sampled[i] = value,
                ("zhibo_room_dropped", Some(i)) => s.dropped[i] = value,
                ("zhibo_queue_drops", None) if kind == "room_frame" => s.frames_dropped = value,
                _ => {}
            }
        }
        s
    }

    /// `self - earlier`, counter by counter (0 where a counter went back: a restarted server).
    pub fn since(&self, earlier: &ShapingScrape) -> ShapingScrape {
        let sub = |a: [u64; 3], b: [u64; 3]| {
            [
                a[0].saturating_sub(b[0]),
                a[1].saturating_sub(b[1]),
                a[2].saturating_sub(b[2]),
            ]
        };
        ShapingScrape {
            sampled: sub(self.sampled, earlier.sampled),
            dropped: sub(self.dropped, earlier.dropped),
            frames_dropped: self.frames_dropped.saturating_sub(earlier.frames_dropped),
        }
    }
}

/// The room part of a step from what the generator counted (`d`, over `duration_s`), the latencies per
/// class (high, chat), the number of viewers each message goes to (`fanout`) and, when scraped, what the
/// gateway counted (`server`).
pub fn room_step(
    mix: &ClassMix,
    d: &ClassSnapshot,
    latency: [Latency; 2],
    fanout: u64,
    duration_s: f64,
    server: Option<&ShapingScrape>,
) -> RoomStep {
    let per_viewer = |n: u64| {
        if duration_s > 0.0 && fanout > 0 {
            n as f64 / duration_s / fanout as f64
        } else {
            0.0
        }
    };
    let mut classes = BTreeMap::new();
    for c in CLASSES {
        let i = class_index(c);
        let delivered = match c {
            RoomClass::Like => d.likes,
            _ => d.delivered[i],
        };
        let expected = d.acked[i] * fanout;
        let step = ClassStep {
            sent: d.sent[i],
            acked: d.acked[i],
            delivered,
            shown_ratio: if expected > 0 {
                delivered as f64 / expected as f64
            } else {
                0.0
            },
            per_viewer_rate: per_viewer(delivered),
            deliver_latency: match c {
                RoomClass::High => latency[0],
                RoomClass::Chat => latency[1],
                RoomClass::Like => Latency::default(),
            },
            told_skipped: (c == RoomClass::Chat).then_some(d.chat_skipped),
            server_sampled: server.map(|s| s.sampled[i]),
            server_dropped: server.map(|s| s.dropped[i]),
        };
        classes.insert(class_name(c).to_owned(), step);
    }
    RoomStep {
        mix: mix.to_string(),
        classes,
        frames: d.frames,
        frames_dropped: server.map(|s| s.frames_dropped),
        per_viewer_rate: per_viewer(d.delivered.iter().sum()),
    }
}

/// The per-class lines of a room step for the console.
pub fn lines(r: &RoomStep) -> String {
    let mut out = format!(
        "    classes {} ({} frames, {:.1} msgs/s per viewer{})",
        r.mix,
        r.frames,
        r.per_viewer_rate,
        r.frames_dropped
            .map(|n| format!(", {n} frames dropped by the gateway"))
            .unwrap_or_default()
    );
    for c in CLASSES {
        let Some(s) = r.classes.get(class_name(c)) else {
            continue;
        };
        if s.sent == 0 {
            continue;
        }
        out.push_str(&format!(
            "\n    {:<4} sent {:>8} acked {:>8} shown {:>6.1}%{}{}{}  {}",
            class_name(c),
            s.sent,
            s.acked,
            s.shown_ratio * 100.0,
            s.told_skipped
                .map(|n| format!(" told skipped {n}"))
                .unwrap_or_default(),
            s.server_sampled
                .filter(|n| *n > 0)
                .map(|n| format!(" sampled {n}"))
                .unwrap_or_default(),
            s.server_dropped
                .map(|n| format!(" dropped {n}"))
                .unwrap_or_default(),
            match c {
                RoomClass::Like => "(merged into counts)".to_owned(),
                _ => s.deliver_latency.line(),
            }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mix_parses_and_prints_back() {
        let m: ClassMix = "high=2,chat=90,like=8".parse().expect("mix");
        assert_eq!(m.weights, [2, 90, 8]);
        assert_eq!(m.to_string(), "high=2,chat=90,like=8");
        assert!(!m.all_chat());
        let m: ClassMix = " like=1 , chat=3".parse().expect("mix");
        assert_eq!(m.weights, [0, 3, 1]);
        assert!(ClassMix::default().all_chat());
        for bad in [
            "",
            "chat=0",
            "gift=3",
            "chat",
            "chat=x",
            "chat=-1",
            "chat=1,chat=2",
        ] {
            assert!(bad.parse::<ClassMix>().is_err(), "{bad:?} accepted");
        }
    }

    /// Every run of 100 picks holds the mix exactly, every prefix is within one message per class of its
    /// share, and a rare class is spread out rather than clumped.
    #[test]
    fn the_picker_keeps_the_mix_exactly_and_spread() {
        let m: ClassMix = "high=2,chat=90,like=8".parse().expect("mix");
        let mut p = m.picker();
        let mut counts = [0i64; 3];
        let mut highs = Vec::new();
        for n in 1..=1000i64 {
            let c = p.next_class();
            counts[class_index(c)] += 1;
            if c == RoomClass::High {
                highs.push(n);
            }
            for (i, w) in m.weights.iter().enumerate() {
                let share = n * i64::from(*w) / 100;
                assert!(
                    (counts[i] - share).abs() <= 1,
                    "after {n}: {counts:?} (class {i})"
                );
            }
            if n % 100 == 0 {
                assert_eq!(counts, [2 * n / 100, 90 * n / 100, 8 * n / 100]);
            }
        }
        for pair in highs.windows(2) {
            assert_eq!(pair[1] - pair[0], 50, "high messages every 50th: {highs:?}");
        }
        // All chat: nothing else, ever.
        let mut p = ClassMix::default().picker();
        assert!((0..500).all(|_| p.next_class() == RoomClass::Chat));
    }

    #[test]
    fn content_types_round_trip() {
        for c in CLASSES {
            assert_eq!(class_of_content_type(content_type(c)), c);
        }
        assert_eq!(class_of_content_type(77), RoomClass::Chat);
    }

    /// The meter counts receptions by content type and frames' counts; the step divides by the right
    /// expectation per class and carries the scraped server counters.
    #[test]
    fn per_class_counting_and_ratios() {
        let meter = ClassMeter::default();
        let before = meter.snapshot();
        for c in [
            RoomClass::High,
            RoomClass::Chat,
            RoomClass::Chat,
            RoomClass::Like,
        ] {
            meter.sent(c);
            meter.acked(c);
        }
        // 3 viewers: each gets the gift, one chat message (the other sampled away) and the like.
        for _ in 0..3 {
            meter.delivered(content_type(RoomClass::High), Some(1_000));
            meter.delivered(content_type(RoomClass::Chat), Some(3_000));
            meter.frame(2, 1, 1);
        }
        meter.frame(0, 0, 0); // a count refresh
        let d = meter.snapshot().since(&before);
        assert_eq!(d.sent, [1, 2, 1]);
        assert_eq!(d.delivered, [3, 3, 0]);
        assert_eq!((d.likes, d.chat_skipped, d.frames), (3, 3, 3));
        assert_eq!(d.accounted(), (1 + 2 + 1) * 3, "every pair accounted for");
        let server = ShapingScrape::parse(
            "# HELP x\nzhibo_room_sampled_total{kind=\"chat\"} 1\nzhibo_room_dropped_total{kind=\"high\"} 0\nzhibo_room_dropped_total{kind=\"chat\"} 4\nzhibo_queue_drops_total{kind=\"room_frame\"} 2\nzhibo_queue_drops_total{kind=\"im\"} 9\n",
        );
        assert_eq!(server.sampled, [0, 1, 0]);
        assert_eq!(server.dropped, [0, 4, 0]);
        assert_eq!(server.frames_dropped, 2);
        let lat = meter.take_latency();
        assert_eq!((lat[0].count, lat[1].count), (3, 3));
        assert!(lat[0].p50_us < lat[1].p50_us);
        let mix: ClassMix = "high=1,chat=2,like=1".parse().expect("mix");
        let r = room_step(&mix, &d, lat, 3, 2.0, Some(&server));
        assert_eq!(r.mix, "high=1,chat=2,like=1");
        let (h, c, l) = (&r.classes["high"], &r.classes["chat"], &r.classes["like"]);
        assert_eq!((h.sent, h.delivered, h.shown_ratio), (1, 3, 1.0));
        assert_eq!((c.sent, c.delivered, c.shown_ratio), (2, 3, 0.5));
        assert_eq!((l.sent, l.delivered, l.shown_ratio), (1, 3, 1.0));
        assert_eq!((c.told_skipped, h.told_skipped), (Some(3), None));
        assert_eq!((c.server_sampled, c.server_dropped), (Some(1), Some(4)));
        assert_eq!(r.frames_dropped, Some(2));
        assert_eq!(c.per_viewer_rate, 0.5, "3 over 2 s and 3 viewers");
        assert_eq!(r.per_viewer_rate, 1.0);
        assert_eq!(l.deliver_latency.count, 0);
        assert_eq!(
            ShapingScrape::parse("zhibo_room_sampled_total{kind=\"chat\"} 5\n")
                .since(&server)
                .sampled,
            [0, 4, 0]
        );
    }
}
