//! Live-room latency and shaping end to end (issue 17), embedded and distributed (two gateways).
//!
//! - Adaptive batching: with a long configured window (1 s), a message in a quiet room still reaches a
//!   viewer on another gateway at once: the gateway sends the first message after an idle gap without
//!   waiting for the window.

use std::time::{Duration, Instant};

use bytes::Bytes;
use zhibo_loadtest::client::{Client, Transport};
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{ReceiverType, SendMessageInput, SubscribeRoomInput};

use crate::cluster::Cluster;

const WAIT: Duration = Duration::from_secs(10);

/// The configured (maximum) batch window of these tests: long, so a message that waited for it
/// cannot pass for one that did not.
const LONG_WINDOW_MS: u64 = 1000;

fn room_id() -> i64 {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as i64;
    (n & 0x1f_ffff_ffff_ffff) | 1
}

async fn join(c: &mut Client, room_id: i64) {
    let p = c
        .request(Body::SubscribeRoom(SubscribeRoomInput { room_id }), WAIT)
        .await
        .expect("join reply");
    assert!(
        matches!(p.body, Some(Body::SubscribeRoomOutput(_))),
        "join refused: {p:?}"
    );
}

fn say(room_id: i64, text: String) -> Body {
    Body::SendMessage(SendMessageInput {
        receiver_type: ReceiverType::Room as i32,
        receiver_id: room_id,
        content_type: 1,
        content: Bytes::from(text),
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
    let room = room_id();
    let sender = cluster.user("sender").await;
    let viewer = cluster.user("viewer").await;
    let mut s = cluster.connect(Transport::Tcp, 0, &sender).await;
    let mut v = cluster.connect(Transport::Tcp, 1, &viewer).await;
    join(&mut v, room).await;
    join(&mut s, room).await;
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

mod quiet {
    use super::*;

    pub(crate) struct LongWindow;

    impl LongWindow {
        fn tweak(c: &mut zhibo::Config) {
            c.gateway.room_batch_ms = LONG_WINDOW_MS;
            c.gateway.room_send_per_sec = 1000.0;
            c.gateway.room_send_burst = 1000.0;
        }
        pub(crate) async fn embedded() -> Cluster {
            Cluster::embedded_with(Self::tweak).await
        }
        pub(crate) async fn distributed() -> Cluster {
            Cluster::distributed_tweaked(2, Self::tweak).await
        }
    }

    both_modes!(
        super::LongWindow,
        2,
        a_quiet_room_message_does_not_wait_for_the_window
    );
    use super::a_quiet_room_message_does_not_wait_for_the_window;
}
