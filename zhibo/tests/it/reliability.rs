//! Gateway reliability (issue #12): what a client sees on the socket when a frame is garbage, a room is
//! joined mid-burst, its reader stalls, it catches up a long inbox, or the gateway drains.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::{Decoder, Encoder, FramedRead};
use zhibo_loadtest::client::{Client, Credentials, Transport};
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{
    ErrorCode, Heartbeat, Packet, ReceiverType, SendMessageInput, SignInInput, SubscribeRoomInput,
    SyncInput, SyncOutput,
};
use zhibo_proto::codec::{PacketCodec, DEFAULT_MAX_FRAME};

use crate::cluster::Cluster;

/// Generous: only a failing test waits this long.
const WAIT: Duration = Duration::from_secs(15);

fn code(p: &Packet) -> Option<ErrorCode> {
    match &p.body {
        Some(Body::Error(e)) => ErrorCode::try_from(e.code).ok(),
        _ => None,
    }
}

fn frame(p: &Packet) -> BytesMut {
    let mut buf = BytesMut::new();
    PacketCodec::default().encode(p, &mut buf).expect("encode");
    buf
}

fn sign_in(creds: &Credentials) -> Packet {
    Packet::new(
        1,
        Body::SignIn(SignInInput {
            user_id: creds.user_id,
            device_id: creds.device_id,
            token: creds.token.clone(),
        }),
    )
}

/// A frame of a valid length whose body is no Packet ("invalid varint").
fn garbage_frame() -> BytesMut {
    let mut buf = BytesMut::new();
    buf.put_u32(4);
    buf.put_slice(&[0xff, 0xff, 0xff, 0xff]);
    buf
}

/// Reads packets from `r` until one matches `want` (returned with those before it), or the stream ends.
async fn read_until<R>(
    r: &mut FramedRead<R, PacketCodec>,
    want: impl Fn(&Packet) -> bool,
) -> Vec<Packet>
where
    R: tokio::io::AsyncRead + Unpin,
{
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, r.next()).await {
            Err(_) => panic!("nothing in time; so far {got:?}"),
            Ok(None) | Ok(Some(Err(_))) => return got,
            Ok(Some(Ok(p))) => {
                let done = want(&p);
                got.push(p);
                if done {
                    return got;
                }
            }
        }
    }
}

/// Signs in, sends a garbage frame and then a heartbeat on one stream: BAD_FRAME, then the heartbeat
/// is still answered (the connection goes on); an oversized length then closes it.
async fn garbage_then_heartbeat<R, W>(
    mut r: FramedRead<R, PacketCodec>,
    mut w: W,
    creds: &Credentials,
) where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    w.write_all(&frame(&sign_in(creds))).await.expect("sign in");
    let got = read_until(&mut r, |p| p.request_id == 1).await;
    assert!(
        matches!(
            got.last().and_then(|p| p.body.as_ref()),
            Some(Body::SignInOutput(_))
        ),
        "{got:?}"
    );
    let mut buf = garbage_frame();
    buf.extend_from_slice(&frame(&Packet::new(7, Body::Heartbeat(Heartbeat {}))));
    w.write_all(&buf).await.expect("garbage + heartbeat");
    let got = read_until(&mut r, |p| p.request_id == 7).await;
    assert_eq!(
        got.first().and_then(code),
        Some(ErrorCode::BadFrame),
        "{got:?}"
    );
    assert!(
        matches!(
            got.last().map(|p| (p.request_id, &p.body)),
            Some((7, Some(Body::Heartbeat(_))))
        ),
        "the heartbeat after the bad frame was answered: {got:?}"
    );
    // A sync is answered too.
    w.write_all(&frame(&Packet::new(
        8,
        Body::Sync(SyncInput { seq: 0, limit: 1 }),
    )))
    .await
    .expect("sync");
    let got = read_until(&mut r, |p| p.request_id == 8).await;
    assert!(
        matches!(got.last().map(|p| &p.body), Some(Some(Body::SyncOutput(_)))),
        "{got:?}"
    );
    // An oversized length still closes: the stream is out of sync.
    let mut buf = BytesMut::new();
    buf.put_u32((DEFAULT_MAX_FRAME + 1) as u32);
    buf.put_bytes(0, 8);
    w.write_all(&buf).await.expect("oversized");
    let got = read_until(&mut r, |_| false).await;
    assert_eq!(
        got.last().and_then(code),
        Some(ErrorCode::FrameTooLarge),
        "{got:?}"
    );
}

/// Item 2: a garbage frame after sign-in leaves TCP and QUIC connections open.
pub(crate) async fn a_bad_frame_keeps_tcp_and_quic_connections(cluster: &Cluster) {
    let creds = cluster.user("garbage").await;
    let s = tokio::net::TcpStream::connect(cluster.gw(0).tcp)
        .await
        .expect("connect");
    let (r, w) = s.into_split();
    garbage_then_heartbeat(FramedRead::new(r, PacketCodec::default()), w, &creds).await;

    let endpoint =
        zhibo_loadtest::client::insecure_quic_endpoint("127.0.0.1:0".parse().expect("addr"))
            .expect("endpoint");
    let conn = endpoint
        .connect(cluster.gw(0).quic, "localhost")
        .expect("connect")
        .await
        .expect("handshake");
    let (w, r) = conn.open_bi().await.expect("stream");
    garbage_then_heartbeat(FramedRead::new(r, PacketCodec::default()), w, &creds).await;
}

/// A TCP client that signs in and then reads nothing, with a small receive buffer so the gateway's
/// writes to it block early.
async fn stalled_reader(
    cluster: &Cluster,
    gw: usize,
    creds: &Credentials,
) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut s = socket.connect(cluster.gw(gw).tcp).await.expect("connect");
    s.write_all(&frame(&sign_in(creds))).await.expect("sign in");
    // Read the SignInOutput: signed in (and registered) before anything is sent to it.
    let mut codec = PacketCodec::default();
    let mut buf = BytesMut::new();
    loop {
        if let Some(p) = codec.decode(&mut buf).expect("decode") {
            assert!(matches!(p.body, Some(Body::SignInOutput(_))), "{p:?}");
            assert!(buf.is_empty());
            return s;
        }
        let n = tokio::time::timeout(WAIT, s.read_buf(&mut buf))
            .await
            .expect("signed in")
            .expect("read");
        assert!(n > 0, "closed before signing in");
    }
}

/// Every packet until the server closes the stream.
async fn read_to_close(s: &mut tokio::net::TcpStream) -> Vec<Packet> {
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut bytes))
        .await
        .expect("closed in time")
        .expect("read");
    let mut buf = BytesMut::from(&bytes[..]);
    let mut codec = PacketCodec::default();
    let mut out = Vec::new();
    while let Some(p) = codec.decode(&mut buf).expect("a clean stream of frames") {
        out.push(p);
    }
    assert!(buf.is_empty(), "a partial frame at the end");
    out
}

/// `sender` sends `n` messages of `size` bytes to `to`, in chunks whose ACKs fit its own queue;
/// returns once every one is ACKed (the deliveries have been handed to the receiver's gateway).
async fn flood(sender: &mut Client, to: i64, n: usize, size: usize, tag: &str) {
    let body = Bytes::from(vec![b'x'; size]);
    let mut acked = 0;
    for chunk in (0..n).collect::<Vec<_>>().chunks(30) {
        for i in chunk {
            sender
                .send(Body::SendMessage(SendMessageInput {
                    receiver_type: ReceiverType::User as i32,
                    receiver_id: to,
                    client_msg_id: format!("{tag}{i}"),
                    content_type: 1,
                    content: body.clone(),
                    ..Default::default()
                }))
                .await
                .expect("send");
        }
        while acked < chunk[chunk.len() - 1] + 1 {
            let p = sender.recv(WAIT).await.expect("ack").expect("open");
            match p.body {
                Some(Body::SendMessageOutput(_)) => acked += 1,
                other => panic!("expected an ACK, got {other:?}"),
            }
        }
    }
}

/// Item 6: a stalled reader whose IM queue overflows gets Error{UNAVAILABLE} before the end of the
/// stream, when it reads again.
pub(crate) async fn im_overflow_says_unavailable_before_closing(cluster: &Cluster) {
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    cluster.befriend(&alice, &bob).await;
    let mut stuck = stalled_reader(cluster, 0, &bob).await;
    let mut a = cluster.connect(Transport::Tcp, 0, &alice).await;
    // 260 × 30 KB = 7.8 MB: more than the gateway's socket buffer (at most 4 MB here) and the 64-slot
    // queue hold, so the queue overflowed before the last ACK.
    flood(&mut a, bob.user_id, 260, 30 * 1024, "of").await;
    let got = read_to_close(&mut stuck).await;
    assert!(
        got.len() < 260,
        "the stalled reader was not closed: {} packets",
        got.len()
    );
    let last = got.last().expect("packets");
    assert_eq!(
        code(last),
        Some(ErrorCode::Unavailable),
        "last packet: {:?}",
        last.body
    );
}

/// Item 11: a drain that starts while the gateway is blocked writing to a slow reader still ends with
/// the GoAway and the replies the connection was owed.
pub(crate) async fn a_drain_mid_write_still_says_goaway_and_replies(cluster: &Cluster) {
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    cluster.befriend(&alice, &bob).await;
    let mut stuck = stalled_reader(cluster, 0, &bob).await;
    // Requests owed a reply, forwarded before the writes block.
    let mut syncs = BytesMut::new();
    for rid in 100..120 {
        syncs.extend_from_slice(&frame(&Packet::new(
            rid,
            Body::Sync(SyncInput { seq: 0, limit: 1 }),
        )));
    }
    stuck.write_all(&syncs).await.expect("syncs");
    let mut a = cluster.connect(Transport::Tcp, 0, &alice).await;
    // 200 × 30 KB = 6 MB pushed to bob (queue 1024: no overflow): his gateway is blocked mid-write.
    flood(&mut a, bob.user_id, 200, 30 * 1024, "dr").await;
    cluster.drain_gateway(0);
    let got = read_to_close(&mut stuck).await;
    let go_away = got
        .iter()
        .position(|p| matches!(p.body, Some(Body::GoAway(_))));
    assert!(go_away.is_some(), "no GoAway in {} packets", got.len());
    let replies: HashSet<u64> = got
        .iter()
        .filter(|p| matches!(p.body, Some(Body::SyncOutput(_))))
        .map(|p| p.request_id)
        .collect();
    assert_eq!(
        replies,
        (100..120).collect::<HashSet<u64>>(),
        "every sync answered"
    );
}

/// Item 7: catching up an inbox of more than 100 pages back to back is never rate limited (bucket of
/// 100): 1,440 messages of 4 KiB, about 13 to a server page (the page's byte budget), as in the report.
pub(crate) async fn a_long_catch_up_is_not_rate_limited(cluster: &Cluster) {
    const SENDERS: usize = 15;
    const EACH: usize = 96;
    let bob = cluster.user("bob").await;
    let mut senders = Vec::new();
    for i in 0..SENDERS {
        let s = cluster.user(&format!("s{i}")).await;
        cluster.befriend(&s, &bob).await;
        senders.push(s);
    }
    // Each sender within its own burst.
    for (i, s) in senders.iter().enumerate() {
        let mut c = cluster.connect(Transport::Tcp, i % 2, s).await;
        flood(&mut c, bob.user_id, EACH, 4096, &format!("cu{i}-")).await;
    }
    let mut b = cluster.connect(Transport::Tcp, 0, &bob).await;
    let (mut after, mut pages, mut got) = (0, 0, 0);
    loop {
        let p = b
            .request(
                Body::Sync(SyncInput {
                    seq: after,
                    limit: 0,
                }),
                WAIT,
            )
            .await
            .expect("page");
        let Some(Body::SyncOutput(SyncOutput { messages, has_more })) = p.body else {
            panic!("page {pages} refused: {p:?}");
        };
        pages += 1;
        got += messages.len();
        if let Some(m) = messages.last() {
            after = m.seq;
        }
        if !has_more {
            break;
        }
    }
    assert_eq!(got, SENDERS * EACH, "every message caught up");
    assert!(pages > 100, "more pages than the bucket holds: {pages}");
    // A sync that continues nothing is charged: a flood of them still meets RATE_LIMITED.
    for _ in 0..150 {
        b.send(Body::Sync(SyncInput { seq: 0, limit: 1 }))
            .await
            .expect("send");
    }
    let mut limited = 0;
    for _ in 0..150 {
        let p = b.recv(WAIT).await.expect("answer").expect("open");
        if code(&p) == Some(ErrorCode::RateLimited) {
            limited += 1;
        }
    }
    assert!(limited > 0, "a sync flood is still limited");
}

/// Item 8: each transport's GoAway carries that transport's reconnect hint.
pub(crate) async fn goaway_hints_per_transport(cluster: &Cluster) {
    let mut clients = Vec::new();
    for t in [Transport::Tcp, Transport::Ws, Transport::Quic] {
        let creds = cluster.user("hint").await;
        clients.push((t, cluster.connect(t, 0, &creds).await));
    }
    cluster.drain_gateway(0);
    let mut hints = HashMap::new();
    for (t, c) in &mut clients {
        loop {
            match c.recv(WAIT).await.expect("GoAway in time") {
                Some(Packet {
                    body: Some(Body::GoAway(g)),
                    ..
                }) => {
                    hints.insert(format!("{t:?}"), g.reconnect_hint);
                    break;
                }
                Some(_) => {}
                None => panic!("{t:?}: closed without GoAway"),
            }
        }
    }
    assert_eq!(
        hints["Tcp"], "tcp.example:7001",
        "the old key is the TCP hint"
    );
    assert_eq!(hints["Ws"], "wss://ws.example/ws");
    assert_eq!(hints["Quic"], "quic.example:7003");
}

/// Item 3: a viewer joining while the batch window still holds a burst gets each message once: in
/// `recent` or live, never both, none missing.
pub(crate) async fn a_late_joiner_gets_no_repeat(cluster: &Cluster) {
    let room = {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos() as i64;
        (n & 0x1f_ffff_ffff_ffff) | 1
    };
    let join = Body::SubscribeRoom(SubscribeRoomInput { room_id: room });
    let watcher = cluster.user("watcher").await;
    let sender = cluster.user("sender").await;
    let joiner = cluster.user("joiner").await;
    // The watcher keeps gateway 0 subscribed (and batching) before the burst.
    let mut w = cluster.connect(Transport::Tcp, 0, &watcher).await;
    w.request(join.clone(), WAIT).await.expect("watcher joins");
    let mut s = cluster.connect(Transport::Tcp, 1, &sender).await;
    s.request(join.clone(), WAIT).await.expect("sender joins");
    let say = |i: usize| {
        Body::SendMessage(SendMessageInput {
            receiver_type: ReceiverType::Room as i32,
            receiver_id: room,
            content_type: 1,
            content: Bytes::from(format!("m{i}")),
            ..Default::default()
        })
    };
    let mut sent = Vec::new();
    for i in 0..12 {
        match s.request(say(i), WAIT).await.expect("ack").body {
            Some(Body::SendMessageOutput(o)) => sent.push(o.message_id),
            other => panic!("room send refused: {other:?}"),
        }
    }
    // Within the 1 s batch window of the burst's first message.
    let mut j = cluster.connect(Transport::Tcp, 0, &joiner).await;
    let recent = match j.request(join, WAIT).await.expect("join").body {
        Some(Body::SubscribeRoomOutput(o)) => o.recent,
        other => panic!("join refused: {other:?}"),
    };
    let mut seen: Vec<u64> = recent.iter().map(|m| m.message_id).collect();
    assert_eq!(seen, sent, "the burst is in the history");
    // A last message after the join marks the end of what to read.
    let last = match s.request(say(99), WAIT).await.expect("ack").body {
        Some(Body::SendMessageOutput(o)) => o.message_id,
        other => panic!("room send refused: {other:?}"),
    };
    sent.push(last);
    while !seen.contains(&last) {
        let p = j.recv(WAIT).await.expect("room traffic").expect("open");
        if let Some(Body::RoomMessages(r)) = p.body {
            seen.extend(
                r.messages
                    .iter()
                    .filter(|m| m.content_type >= 0 && m.message_id != 0)
                    .map(|m| m.message_id),
            );
        }
    }
    assert_eq!(seen, sent, "each message once, in order, none missing");
}

mod garbage {
    both_modes!(
        crate::cluster::Cluster,
        2,
        a_bad_frame_keeps_tcp_and_quic_connections
    );
    use super::a_bad_frame_keeps_tcp_and_quic_connections;
}

/// A fixture of [`Cluster`] with a configuration tweak, for `both_modes!`.
macro_rules! tweaked {
    ($name:ident, $tweak:expr) => {
        pub(crate) struct $name;
        impl $name {
            pub(crate) async fn embedded() -> crate::cluster::Cluster {
                crate::cluster::Cluster::embedded_with($tweak).await
            }
            pub(crate) async fn distributed() -> crate::cluster::Cluster {
                crate::cluster::Cluster::distributed_tweaked(2, $tweak).await
            }
        }
    };
}

mod overflow {
    tweaked!(Small, |c: &mut zhibo::Config| c.gateway.outbound_queue = 64);
    both_modes!(super::Small, 2, im_overflow_says_unavailable_before_closing);
    use super::im_overflow_says_unavailable_before_closing;
}

mod drain {
    both_modes!(
        crate::cluster::Cluster,
        2,
        a_drain_mid_write_still_says_goaway_and_replies
    );
    use super::a_drain_mid_write_still_says_goaway_and_replies;
}

mod catch_up {
    // The production defaults: 50 commands/s, burst 100.
    tweaked!(Defaults, |c: &mut zhibo::Config| {
        c.gateway.rate_per_sec = 50.0;
        c.gateway.rate_burst = 100.0;
    });
    both_modes!(super::Defaults, 2, a_long_catch_up_is_not_rate_limited);
    use super::a_long_catch_up_is_not_rate_limited;
}

mod hints {
    tweaked!(Hinted, |c: &mut zhibo::Config| {
        c.gateway.reconnect_hint = "tcp.example:7001".into();
        c.gateway.reconnect_hint_ws = "wss://ws.example/ws".into();
        c.gateway.reconnect_hint_quic = "quic.example:7003".into();
    });
    both_modes!(super::Hinted, 2, goaway_hints_per_transport);
    use super::goaway_hints_per_transport;
}

mod late_joiner {
    tweaked!(SlowBatch, |c: &mut zhibo::Config| {
        c.gateway.room_batch_ms = 1000;
        // Any traffic makes the window full (the burst is batched behind its first message).
        c.gateway.room_batch_load = f64::MIN_POSITIVE;
        c.gateway.room_send_per_sec = 1000.0;
        c.gateway.room_send_burst = 1000.0;
    });
    both_modes!(super::SlowBatch, 2, a_late_joiner_gets_no_repeat);
    use super::a_late_joiner_gets_no_repeat;
}
