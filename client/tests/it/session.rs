//! The protocol's hard parts, as an app sees them.

use std::time::Duration;

use zhibo_client::proto::client::packet::Body;
use zhibo_client::proto::client::{Heartbeat, ReceiverType};
use zhibo_client::{Client, Credentials, Error, Transport};

use crate::app::{App, WAIT};
use crate::fixture::Cluster;
use crate::proxy::Proxy;

const ALL: [Transport; 3] = [Transport::Tcp, Transport::Ws, Transport::Quic];

both_modes!(
    send_and_receive,
    network_cut_loses_and_repeats_nothing,
    gap_in_pushed_seqs_triggers_a_sync,
    send_in_flight_during_a_reconnect_is_acked_once,
    kick_stops_reconnection,
    rooms_survive_a_reconnection,
);

async fn pair(c: &Cluster) -> (Credentials, Credentials) {
    let alice = c.user("alice").await;
    let bob = c.user("bob").await;
    c.befriend(&alice, &bob).await;
    (alice, bob)
}

async fn send(app: &App, to: &Credentials, text: &str) -> u64 {
    let ack = tokio::time::timeout(
        WAIT,
        app.session
            .send(ReceiverType::User, to.user_id, 1, text.to_owned()),
    )
    .await
    .expect("ACK in time")
    .expect("sent");
    assert!(ack.seq > 0, "{ack:?}");
    ack.seq
}

/// Over each transport: a send resolves with its ACK, the receiver's app gets the message once, and
/// the sender's app does not get its own send as a message. A message larger than the client's
/// WebSocket read buffer (8 KiB) arrives whole too.
async fn send_and_receive(c: &Cluster) {
    for t in ALL {
        let (alice, bob) = pair(c).await;
        let mut a = App::on(c, t, 0, &alice).await;
        let mut b = App::on(c, t, 1, &bob).await;
        let text = format!("hello over {t:?}");
        send(&a, &bob, &text).await;
        b.until("the message", |b| b.has(&text)).await;
        let big = format!("{t:?}:{}", "z".repeat(20_000));
        send(&a, &bob, &big).await;
        b.until("the large message", |b| b.has(&big)).await;
        // Bob answers: Alice's app gets it, never her own.
        send(&b, &alice, "hi alice").await;
        a.until("the answer", |a| a.has("hi alice")).await;
        a.drain().await;
        b.drain().await;
        a.assert_exactly(&["hi alice".to_owned()]);
        b.assert_exactly(&[text, big]);
    }
}

/// The network under Bob is cut (every socket closed) while Alice keeps sending: Bob's session
/// reconnects, resumes from the last contiguous seq, and his app holds every message exactly once.
async fn network_cut_loses_and_repeats_nothing(c: &Cluster) {
    let (alice, bob) = pair(c).await;
    let proxy = Proxy::start(c.gw(1).tcp).await;
    let a = App::on(c, Transport::Tcp, 0, &alice).await;
    let mut b = App::start(App::options(Transport::Tcp, proxy.addr.to_string(), &bob)).await;
    b.until("first sync", |b| b.synced >= 1).await;
    let first_seq = {
        send(&a, &bob, "m1").await;
        b.until("m1", |b| b.has("m1")).await;
        b.messages[0].seq
    };
    proxy.cut();
    let mut expected = vec!["m1".to_owned()];
    for i in 2..=6 {
        let text = format!("m{i}");
        send(&a, &bob, &text).await;
        expected.push(text);
    }
    b.until("every message", |b| b.messages.len() >= 6).await;
    send(&a, &bob, "last").await;
    expected.push("last".into());
    b.until("the last one", |b| b.has("last")).await;
    b.drain().await;
    assert!(!b.disconnected.is_empty(), "Bob's session saw the cut");
    assert!(b.connected.len() >= 2, "and reconnected: {:?}", b.connected);
    b.assert_exactly(&expected);
    // The resume started at the last seq up to which Bob held everything.
    let syncs = proxy.sent(|p| matches!(p.body, Some(Body::Sync(_))));
    let resumed_from: Vec<u64> = syncs
        .iter()
        .filter_map(|p| match &p.body {
            Some(Body::Sync(s)) => Some(s.seq),
            _ => None,
        })
        .collect();
    assert!(
        resumed_from.contains(&first_seq),
        "a sync from {first_seq} after the cut: {resumed_from:?}"
    );
}

/// The push of one message is lost on the way: the next push leaves a gap, the session syncs from the
/// last contiguous seq and the app gets the lost message, once.
async fn gap_in_pushed_seqs_triggers_a_sync(c: &Cluster) {
    let (alice, bob) = pair(c).await;
    let proxy = Proxy::start(c.gw(1).tcp).await;
    let a = App::on(c, Transport::Tcp, 0, &alice).await;
    let mut b = App::start(App::options(Transport::Tcp, proxy.addr.to_string(), &bob)).await;
    b.until("first sync", |b| b.synced >= 1).await;
    let syncs_before = proxy.sent(|p| matches!(p.body, Some(Body::Sync(_)))).len();
    proxy.drop_pushes(1);
    send(&a, &bob, "swallowed").await;
    send(&a, &bob, "after the gap").await;
    b.until("both messages", |b| {
        b.has("swallowed") && b.has("after the gap")
    })
    .await;
    b.drain().await;
    b.assert_exactly(&["swallowed".to_owned(), "after the gap".to_owned()]);
    let syncs = proxy.sent(|p| matches!(p.body, Some(Body::Sync(_))));
    assert!(
        syncs.len() > syncs_before,
        "the gap was filled by a sync, on the same connection"
    );
    assert_eq!(b.connected.len(), 1, "no reconnection was needed");
}

/// Alice's send reaches the server but its ACK is lost with the connection: after the reconnection the
/// session resends it with the same `client_msg_id`; the send resolves once, Bob gets it once.
async fn send_in_flight_during_a_reconnect_is_acked_once(c: &Cluster) {
    let (alice, bob) = pair(c).await;
    let proxy = Proxy::start(c.gw(0).tcp).await;
    let mut a = App::start(App::options(Transport::Tcp, proxy.addr.to_string(), &alice)).await;
    a.until("first sync", |a| a.synced >= 1).await;
    let mut b = App::on(c, Transport::Tcp, 1, &bob).await;
    proxy.mute();
    let in_flight = tokio::spawn(
        a.session
            .send(ReceiverType::User, bob.user_id, 1, "in flight"),
    );
    b.until("the message", |b| b.has("in flight")).await;
    assert!(!in_flight.is_finished(), "the ACK was swallowed");
    proxy.cut();
    let ack = tokio::time::timeout(WAIT, in_flight)
        .await
        .expect("ACK after the reconnection")
        .expect("task")
        .expect("sent");
    assert!(ack.seq > 0);
    let sends = proxy.sent(|p| matches!(p.body, Some(Body::SendMessage(_))));
    let ids: Vec<String> = sends
        .iter()
        .filter_map(|p| match &p.body {
            Some(Body::SendMessage(s)) => Some(s.client_msg_id.clone()),
            _ => None,
        })
        .collect();
    assert!(ids.len() >= 2, "resent after the reconnection: {ids:?}");
    assert!(
        ids.iter().all(|i| *i == ids[0]),
        "with the same client_msg_id: {ids:?}"
    );
    let marks: Vec<bool> = sends
        .iter()
        .filter_map(|p| match &p.body {
            Some(Body::SendMessage(s)) => Some(s.first_attempt),
            _ => None,
        })
        .collect();
    assert!(
        marks[0] && !marks[1..].iter().any(|&m| m),
        "only the first transmission says first_attempt: {marks:?}"
    );
    // A later message proves Bob's queue is past any repeat.
    send(&a, &bob, "after").await;
    b.until("the later message", |b| b.has("after")).await;
    b.drain().await;
    b.assert_exactly(&["in flight".to_owned(), "after".to_owned()]);
    a.drain().await;
    a.assert_exactly(&[]);
}

/// The same device signs in elsewhere: the session is kicked, stops, and never comes back (the other
/// connection stays up).
async fn kick_stops_reconnection(c: &Cluster) {
    let alice = c.user("alice").await;
    for t in ALL {
        let mut a = App::on(c, t, 0, &alice).await;
        let (mut other, _) = Client::connect(Transport::Tcp, &c.gw(1).tcp.to_string(), &alice)
            .await
            .expect("the same device elsewhere");
        a.until("kicked and closed", |a| a.kicked && a.ended).await;
        assert!(a.closed, "Closed is the last event");
        assert_eq!(a.connected.len(), 1, "{t:?}: no reconnection");
        assert!(a.disconnected.is_empty(), "{t:?}: no retry was scheduled");
        let refused = a
            .session
            .send(ReceiverType::User, alice.user_id, 1, "x")
            .await;
        assert!(matches!(refused, Err(Error::Shutdown)), "{refused:?}");
        let answer = other
            .request(Body::Heartbeat(Heartbeat {}), WAIT)
            .await
            .expect("the other connection is still up");
        assert!(
            matches!(answer.body, Some(Body::Heartbeat(_))),
            "{answer:?}"
        );
    }
}

/// A joined room is joined again after a reconnection and its traffic keeps coming.
async fn rooms_survive_a_reconnection(c: &Cluster) {
    let (alice, bob) = pair(c).await;
    let room = i64::from(rand_room());
    let a = App::on(c, Transport::Ws, 0, &alice).await;
    let mut b = App::on(c, Transport::Quic, 1, &bob).await;
    let joined = b.session.join_room(room).await.expect("bob joins");
    assert_eq!(joined.room_id, room);
    a.session.join_room(room).await.expect("alice joins");
    let room_texts = |b: &App| -> Vec<String> {
        b.rooms
            .iter()
            .flat_map(|r| r.messages.iter())
            .filter(|m| m.content_type >= 0)
            .map(|m| String::from_utf8_lossy(&m.content).into_owned())
            .collect()
    };
    a.session
        .send_room(room, 1, "before")
        .await
        .expect("room send");
    b.until("room message", |b| {
        room_texts(b).contains(&"before".to_owned())
    })
    .await;
    b.session.reconnect();
    b.until("rejoined", |b| b.rejoined >= 1).await;
    a.session
        .send_room(room, 1, "after")
        .await
        .expect("room send");
    b.until("room message after the reconnection", |b| {
        room_texts(b).contains(&"after".to_owned())
    })
    .await;
}

fn rand_room() -> u32 {
    // Distinct per test run: rooms are shared server state.
    (std::process::id() % 100_000) * 1000
        + (zhibo_testkit::unique_name("r").len() as u32 % 1000)
        + 1
}

/// The embedded node restarts under two connected apps: they back off with growing jittered delays
/// while it is down, come back, a send made meanwhile is ACKed once, and nothing is lost or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_loses_and_repeats_nothing() {
    let mut c = Cluster::embedded().await;
    let (alice, bob) = pair(&c).await;
    let mut a = App::on(&c, Transport::Ws, 0, &alice).await;
    let mut b = App::on(&c, Transport::Tcp, 0, &bob).await;
    send(&a, &bob, "before").await;
    b.until("before", |b| b.has("before")).await;
    c.stop_node().await;
    // Refused while down: at least three attempts.
    b.until("three failed attempts", |b| b.disconnected.len() >= 4)
        .await;
    let delays: Vec<Duration> = b.disconnected[1..].iter().map(|d| d.1).collect();
    assert!(delays[2] > delays[0], "backing off: {delays:?}");
    let during = tokio::spawn(a.session.send(ReceiverType::User, bob.user_id, 1, "during"));
    c.start_node().await;
    let ack = tokio::time::timeout(WAIT, during)
        .await
        .expect("ACK after the restart")
        .expect("task")
        .expect("sent");
    assert!(ack.seq > 0);
    send(&a, &bob, "after").await;
    b.until("everything", |b| b.has("during") && b.has("after"))
        .await;
    b.drain().await;
    b.assert_exactly(&["before".into(), "during".into(), "after".into()]);
    assert!(b.connected.len() >= 2);
    a.drain().await;
    a.assert_exactly(&[]);
    assert!(c.is_embedded());
    c.stop().await;
}

/// Heartbeats go out at the advertised interval: with a 1 s interval and a 2 s timeout, an idle
/// session stays connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_at_the_advertised_interval_keeps_an_idle_session() {
    let c = Cluster::embedded_with(|c| {
        c.gateway.heartbeat_interval_secs = 1;
        c.gateway.heartbeat_timeout_secs = 2;
    })
    .await;
    let bob = c.user("bob").await;
    let proxy = Proxy::start(c.gw(0).tcp).await;
    let mut b = App::start(App::options(Transport::Tcp, proxy.addr.to_string(), &bob)).await;
    b.until("first sync", |b| b.synced >= 1).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while proxy
        .sent(|p| matches!(p.body, Some(Body::Heartbeat(_))))
        .len()
        < 4
    {
        assert!(tokio::time::Instant::now() < deadline, "heartbeats");
        b.drain().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.drain().await;
    assert!(
        b.disconnected.is_empty(),
        "an idle session outlived the 2 s timeout: {:?}",
        b.disconnected
    );
    c.stop().await;
}

/// Gateway 0 drains: each session (one per transport) gets GoAway, moves to gateway 1 (the hint for
/// its transport), syncs, and its app holds every message exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_away_moves_to_the_other_gateway_with_nothing_lost() {
    let c = Cluster::distributed().await;
    let bob = c.user("bob").await;
    let mut apps = Vec::new();
    for t in ALL {
        let alice = c.user("alice").await;
        c.befriend(&alice, &bob).await;
        apps.push((t, alice.clone(), App::on(&c, t, 0, &alice).await));
    }
    let b = App::on(&c, Transport::Tcp, 1, &bob).await;
    for (_, alice, _) in &apps {
        send(&b, alice, "before").await;
    }
    c.drain_gateway(0);
    for (_, alice, _) in &apps {
        send(&b, alice, "during").await;
    }
    for (t, alice, a) in &mut apps {
        a.until("moved", |a| a.go_aways >= 1 && a.connected.len() >= 2)
            .await;
        let moved_to = a.connected.last().expect("connected").clone();
        assert!(
            moved_to.contains(&c.gw(1).of(*t)),
            "{t:?}: moved to {moved_to}, gateway 1 is {:?}",
            c.gw(1)
        );
        send(&b, alice, "after").await;
        a.until("every message", |a| {
            a.has("before") && a.has("during") && a.has("after")
        })
        .await;
        a.drain().await;
        a.assert_exactly(&["before".into(), "during".into(), "after".into()]);
    }
    c.stop().await;
}
