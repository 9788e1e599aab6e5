//! Live-room latency and shaping end to end (issue 17), embedded and distributed (two gateways).
//!
//! - Adaptive batching: with a long configured window (1 s), a message in a quiet room still reaches a
//!   viewer on another gateway at once: the gateway sends the first message after an idle gap without
//!   waiting for the window.
//! - A crowded room's window grows with its audience (`gateway.room_batch_viewers`): a steady stream
//!   reaches viewers in far fewer, fuller frames than the base window would give.
//! - Shaping: a chat storm with gifts mixed in, in a room showing 20 chat msgs/s per viewer: every
//!   viewer gets every gift, its own chat, and at most the display rate of the others' chat; a rate
//!   set while viewers watch applies to them at once, on both gateways.

use std::time::{Duration, Instant};

use bytes::Bytes;
use zhibo_loadtest::client::{Client, Transport};
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{ReceiverType, RoomClass, SendMessageInput};

use crate::cluster::{fresh_room_id, join_room, Cluster, ADMIN};

const WAIT: Duration = Duration::from_secs(10);

/// The configured (maximum) batch window of these tests: long, so a message that waited for it
/// cannot pass for one that did not.
const LONG_WINDOW_MS: u64 = 1000;

fn say(room_id: i64, text: String) -> Body {
    say_as(room_id, text, RoomClass::Chat)
}

fn say_as(room_id: i64, text: String, class: RoomClass) -> Body {
    Body::SendMessage(SendMessageInput {
        receiver_type: ReceiverType::Room as i32,
        receiver_id: room_id,
        content_type: 1,
        content: Bytes::from(text),
        room_class: class as i32,
        ..Default::default()
    })
}

/// Waits for the room message with content `text`; returns when it arrived.
async fn arrival(c: &mut Client, room_id: i64, text: &str) -> Instant {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let p = c
            .recv(left)
            .await
            .expect("connection open")
            .unwrap_or_else(|| panic!("{text} never arrived"));
        if let Some(Body::RoomMessages(r)) = p.body {
            if r.room_id == room_id && r.messages.iter().any(|m| m.content == text.as_bytes()) {
                return Instant::now();
            }
        }
    }
}

/// Issue 17 item 1: a quiet room's messages reach a viewer on the other gateway without waiting for
/// the (1 s) batch window. Each message is sent after the previous one arrived (a quiet room: a few
/// messages a second, two viewers); the latency from the send to the viewer is printed and must be
/// under half the window (with the old fixed window every one waited the full second).
pub(crate) async fn a_quiet_room_message_does_not_wait_for_the_window(cluster: &Cluster) {
    let room = fresh_room_id();
    let sender = cluster.user("sender").await;
    let viewer = cluster.user("viewer").await;
    let mut s = cluster.connect(Transport::Tcp, 0, &sender).await;
    let mut v = cluster.connect(Transport::Tcp, 1, &viewer).await;
    join_room(&mut v, room, WAIT).await;
    join_room(&mut s, room, WAIT).await;
    let mut latencies = Vec::new();
    for i in 0..5 {
        let text = format!("quiet {i}");
        let sent = Instant::now();
        s.send(say(room, text.clone())).await.expect("send");
        let got = arrival(&mut v, room, &text).await;
        latencies.push(got - sent);
    }
    println!("quiet-room latencies (send to viewer, window {LONG_WINDOW_MS} ms): {latencies:?}");
    for l in &latencies {
        assert!(
            *l < Duration::from_millis(LONG_WINDOW_MS / 2),
            "a quiet message waited for the batch window: {latencies:?}"
        );
    }
}

/// The crowded-room test's base window and its viewers per window step: a gateway with 4 viewers of
/// the room gets 4 × the base window (200 ms).
const CROWD_BASE_MS: u64 = 50;

/// Issue 17 item 1, "the window grows with the audience": with `room_batch_viewers` = 1, a room with
/// four viewers on a gateway batches over 4 × 50 ms there. A sender on the other gateway sends 201
/// messages 10 ms apart without waiting for the answers; a viewer gets every one once, in the order
/// sent, in at most ~2 s / 200 ms frames (with the base window it would be ~40: the test fails then).
pub(crate) async fn a_crowded_room_batches_over_a_longer_window(cluster: &Cluster) {
    let room = fresh_room_id();
    let sender = cluster.user("sender").await;
    let mut s = cluster.connect(Transport::Tcp, 0, &sender).await;
    let mut viewers = Vec::new();
    for i in 0..4 {
        let who = cluster.user(&format!("viewer{i}")).await;
        let mut v = cluster.connect(Transport::Tcp, 1, &who).await;
        join_room(&mut v, room, WAIT).await;
        viewers.push(v);
    }
    join_room(&mut s, room, WAIT).await;
    let mut v = viewers.remove(0);
    let watcher = tokio::spawn(async move {
        let mut frames = 0usize;
        let mut got = Vec::new();
        while got.len() < 201 {
            let p = match v.recv(WAIT).await {
                Ok(Some(p)) => p,
                other => panic!(
                    "{other:?} after {} messages in {frames} frames, the last {:?}",
                    got.len(),
                    got.last()
                ),
            };
            let Some(Body::RoomMessages(r)) = p.body else {
                continue;
            };
            let texts: Vec<String> = r
                .messages
                .iter()
                .filter(|m| r.room_id == room && m.content_type >= 0)
                .map(|m| String::from_utf8_lossy(&m.content).into_owned())
                .collect();
            if !texts.is_empty() {
                frames += 1;
                got.extend(texts);
            }
        }
        (frames, got)
    });
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut sent = Vec::new();
    for i in 0..200 {
        tick.tick().await;
        let text = format!("m{i}");
        s.send(say(room, text.clone())).await.expect("send");
        sent.push(text);
    }
    s.send(say(room, "end".into())).await.expect("send");
    sent.push("end".into());
    let (frames, got) = watcher.await.expect("watcher");
    println!("crowded room: {} messages in {frames} frames", got.len());
    // The sends are pipelined (none waits for its answer): the gateway still publishes them in order.
    assert_eq!(got, sent, "every message once, in the order sent");
    // 2 s of sending (or longer on a loaded machine, which only merges more) at one frame per 200 ms,
    // plus the first message (sent at once) and the last window's.
    assert!(
        frames <= 14,
        "{frames} frames for 201 messages: the window did not grow with the audience"
    );
}

/// The per-viewer chat display rate of the storm test.
const DISPLAY_RATE: u32 = 20;

/// Sends `texts` (with their classes) as fast as the connection takes them: a window of 100 sends in
/// flight, each window's answers read before the next (so the gateway's reply queue never overflows).
async fn blast(mut c: Client, room: i64, texts: Vec<(String, RoomClass)>) -> Client {
    for chunk in texts.chunks(100) {
        let mut pending = std::collections::HashSet::new();
        for (text, class) in chunk {
            pending.insert(
                c.send(say_as(room, text.clone(), *class))
                    .await
                    .expect("send"),
            );
        }
        while !pending.is_empty() {
            let p = c.recv(WAIT).await.expect("answers in time").expect("open");
            if pending.remove(&p.request_id) {
                assert!(
                    matches!(p.body, Some(Body::SendMessageOutput(_))),
                    "room send refused: {p:?}"
                );
            }
        }
    }
    c
}

/// What a viewer saw of the storm: (sender, text) of each message, until the "end" gift.
async fn watch(mut c: Client, room: i64) -> Vec<(i64, String)> {
    let mut seen = texts_until(&mut c, room, "end").await;
    seen.pop();
    seen
}

/// Issue 17 item 2: a chat storm (4 senders over both gateways, as fast as they can) with a gift every
/// 50 chat messages, in a room set (through user-api) to show 20 chat msgs/s per viewer. Each viewer
/// (one per gateway) also chats a little. Every viewer gets every gift, all of its own chat, and of
/// the others' chat at most 20/s over the time it watched plus one burst (half a second's worth,
/// `room_state::CHAT_BURST`) and one more message per gateway window for rounding: the sampling runs
/// on the gateway's clock within the span the test measures, so no further slack is needed.
pub(crate) async fn a_chat_storm_is_shaped_gifts_and_own_messages_arrive(cluster: &Cluster) {
    let room = fresh_room_id();
    let (status, body) = crate::cluster::http(
        &cluster.api_base,
        reqwest::Method::PUT,
        &format!("/v1/admin/rooms/{room}/shaping"),
        ("x-admin-secret", ADMIN),
        serde_json::json!({ "chat_per_sec": DISPLAY_RATE }),
    )
    .await;
    assert_eq!(
        (status, body["chat_per_sec"].as_u64()),
        (200, Some(20)),
        "{body}"
    );
    let mut viewers = Vec::new();
    for gw in 0..2 {
        let creds = cluster.user(&format!("viewer{gw}")).await;
        let mut v = cluster.connect(Transport::Tcp, gw, &creds).await;
        join_room(&mut v, room, WAIT).await;
        viewers.push((creds.user_id, v));
    }
    let mut senders = Vec::new();
    for i in 0..4 {
        let creds = cluster.user(&format!("storm{i}")).await;
        let mut s = cluster.connect(Transport::Tcp, i, &creds).await;
        join_room(&mut s, room, WAIT).await;
        senders.push(s);
    }
    let started = Instant::now();
    let mut watchers = Vec::new();
    let mut own = Vec::new();
    for (user_id, mut v) in viewers {
        let mine: Vec<String> = (0..5).map(|k| format!("own-{user_id}-{k}")).collect();
        for text in &mine {
            v.send(say(room, text.clone())).await.expect("own send");
        }
        own.push((user_id, mine));
        watchers.push(tokio::spawn(watch(v, room)));
    }
    let per_sender = 1000;
    let mut gifts = Vec::new();
    let mut blasts = Vec::new();
    for (i, s) in senders.into_iter().enumerate() {
        let texts: Vec<(String, RoomClass)> = (0..per_sender)
            .map(|k| {
                if k % 50 == 49 {
                    (format!("gift-{i}-{k}"), RoomClass::High)
                } else {
                    (format!("chat-{i}-{k}"), RoomClass::Chat)
                }
            })
            .collect();
        gifts.extend(
            texts
                .iter()
                .filter(|(_, c)| *c == RoomClass::High)
                .map(|(t, _)| t.clone()),
        );
        blasts.push(tokio::spawn(blast(s, room, texts)));
    }
    let mut senders = Vec::new();
    for b in blasts {
        senders.push(b.await.expect("sender"));
    }
    let storm = started.elapsed();
    let sent = 4 * per_sender;
    println!(
        "storm: {sent} room messages in {storm:?} ({:.0}/s), {} gifts",
        f64::from(sent) / storm.as_secs_f64(),
        gifts.len()
    );
    // The end marker: a gift, so it is never sampled away.
    let mut last = senders.pop().expect("a sender");
    let end = last
        .request(say_as(room, "end".into(), RoomClass::High), WAIT)
        .await
        .expect("end sent");
    assert!(matches!(end.body, Some(Body::SendMessageOutput(_))));
    for (w, (user_id, mine)) in watchers.into_iter().zip(own) {
        let seen = w.await.expect("viewer");
        let watched = started.elapsed();
        let texts: std::collections::HashSet<&str> = seen.iter().map(|(_, t)| t.as_str()).collect();
        let missing: Vec<&String> = gifts
            .iter()
            .filter(|g| !texts.contains(g.as_str()))
            .collect();
        assert!(
            missing.is_empty(),
            "viewer {user_id} missed gifts {missing:?}"
        );
        for t in &mine {
            assert!(
                texts.contains(t.as_str()),
                "viewer {user_id} missed its own {t}"
            );
        }
        let others = seen
            .iter()
            .filter(|(s, t)| *s != user_id && t.starts_with("chat-"))
            .count();
        let rate = f64::from(DISPLAY_RATE);
        let most = rate * watched.as_secs_f64() + rate * 0.5 + 2.0;
        println!(
            "viewer {user_id}: {} gifts, {} own, {others} of {} others' chat in {watched:?} (at most {most:.0})",
            gifts.len(),
            mine.len(),
            sent as usize - gifts.len()
        );
        assert!(
            others as f64 <= most,
            "viewer {user_id} saw {others} chat messages"
        );
        assert!(others > 0, "no chat at all reached viewer {user_id}");
    }
}

/// The room messages a viewer gets (notices left out), as (sender, text), up to and including the one
/// whose text is `last`.
async fn texts_until(c: &mut Client, room: i64, last: &str) -> Vec<(i64, String)> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let p = c.recv(left).await.expect("traffic").expect("open");
        let Some(Body::RoomMessages(r)) = p.body else {
            continue;
        };
        if r.room_id != room {
            continue;
        }
        for m in r.messages.iter().filter(|m| m.content_type >= 0) {
            let text = String::from_utf8_lossy(&m.content).into_owned();
            let done = text == last;
            seen.push((m.sender_user_id, text));
            if done {
                return seen;
            }
        }
    }
}

/// A display rate set while viewers watch applies to them at once, on every gateway, with nobody
/// joining after the change (outside audit: it waited for the next join on each gateway, so one room
/// ran unshaped on a gateway where nobody joined, while the API said it applied to later joins).
pub(crate) async fn a_shaping_change_applies_to_viewers_already_watching(cluster: &Cluster) {
    let room = fresh_room_id();
    let mut viewers = Vec::new();
    for gw in 0..2 {
        let creds = cluster.user(&format!("watcher{gw}")).await;
        let mut v = cluster.connect(Transport::Tcp, gw, &creds).await;
        join_room(&mut v, room, WAIT).await;
        viewers.push(v);
    }
    let creds = cluster.user("talker").await;
    let mut sender = cluster.connect(Transport::Tcp, 0, &creds).await;
    join_room(&mut sender, room, WAIT).await;

    // Unshaped: every viewer gets every chat message.
    let mut before: Vec<(String, RoomClass)> = (0..20)
        .map(|k| (format!("free-{k}"), RoomClass::Chat))
        .collect();
    before.push(("mark".into(), RoomClass::High));
    sender = blast(sender, room, before).await;
    for v in &mut viewers {
        let seen = texts_until(v, room, "mark").await;
        assert_eq!(seen.len(), 21, "unshaped room: {seen:?}");
    }

    let rate = 1;
    let (status, body) = crate::cluster::http(
        &cluster.api_base,
        reqwest::Method::PUT,
        &format!("/v1/admin/rooms/{room}/shaping"),
        ("x-admin-secret", ADMIN),
        serde_json::json!({ "chat_per_sec": rate }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let changed = Instant::now();
    let mut storm: Vec<(String, RoomClass)> = (0..200)
        .map(|k| (format!("chat-{k}"), RoomClass::Chat))
        .collect();
    storm.push(("end".into(), RoomClass::High));
    let _sender = blast(sender, room, storm).await;
    for (gw, v) in viewers.iter_mut().enumerate() {
        let seen = texts_until(v, room, "end").await;
        let chat = seen.iter().filter(|(_, t)| t.starts_with("chat-")).count();
        // The display rate over the time watched, one burst (at least one message) and one more
        // per gateway window for rounding, as in the storm test.
        let most = f64::from(rate) * changed.elapsed().as_secs_f64() + 1.0 + 2.0;
        assert!(
            chat as f64 <= most,
            "viewer on gateway {gw} saw {chat} of 200 chat messages after the change (at most {most:.1})"
        );
    }
}

/// A fixture `$name` whose clusters (embedded, and distributed with two logic workers) get `$tweak`.
macro_rules! tweaked_fixture {
    ($name:ident, $tweak:path) => {
        pub(crate) struct $name;

        impl $name {
            pub(crate) async fn embedded() -> Cluster {
                Cluster::embedded_with($tweak).await
            }
            pub(crate) async fn distributed() -> Cluster {
                Cluster::distributed_tweaked(2, $tweak).await
            }
        }
    };
}

mod quiet {
    use super::*;

    fn tweak(c: &mut zhibo::Config) {
        c.gateway.room_batch_ms = LONG_WINDOW_MS;
        c.gateway.room_send_per_sec = 1000.0;
        c.gateway.room_send_burst = 1000.0;
    }

    tweaked_fixture!(LongWindow, tweak);

    both_modes!(
        super::LongWindow,
        2,
        a_quiet_room_message_does_not_wait_for_the_window
    );
    use super::a_quiet_room_message_does_not_wait_for_the_window;
}

mod crowded {
    use super::*;

    fn tweak(c: &mut zhibo::Config) {
        c.gateway.room_batch_ms = CROWD_BASE_MS;
        c.gateway.room_batch_viewers = 1;
        c.gateway.room_batch_max_ms = 10 * CROWD_BASE_MS;
        // Any traffic makes the window full: the test is about its length.
        c.gateway.room_batch_load = f64::MIN_POSITIVE;
        c.gateway.room_send_per_sec = 1000.0;
        c.gateway.room_send_burst = 1000.0;
    }

    tweaked_fixture!(SmallCrowd, tweak);

    both_modes!(
        super::SmallCrowd,
        2,
        a_crowded_room_batches_over_a_longer_window
    );
    use super::a_crowded_room_batches_over_a_longer_window;
}

mod storm {
    use super::*;

    fn tweak(c: &mut zhibo::Config) {
        c.gateway.rate_per_sec = 100_000.0;
        c.gateway.rate_burst = 100_000.0;
        c.gateway.room_send_per_sec = 100_000.0;
        c.gateway.room_send_burst = 100_000.0;
        // A full room queue refuses frames by design (a viewer too slow to read loses room
        // traffic, gifts included). This test is about shaping, not slow readers (room_state's
        // unit tests cover those): on a loaded test machine a watcher task can be starved for
        // seconds, so its queue gets room for that instead of the default 64 frames.
        c.gateway.room_queue = 4096;
    }

    tweaked_fixture!(Unthrottled, tweak);

    both_modes!(
        super::Unthrottled,
        4,
        a_chat_storm_is_shaped_gifts_and_own_messages_arrive,
        a_shaping_change_applies_to_viewers_already_watching
    );
    use super::{
        a_chat_storm_is_shaped_gifts_and_own_messages_arrive,
        a_shaping_change_applies_to_viewers_already_watching,
    };
}
