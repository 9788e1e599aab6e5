//! Faults: a logic worker killed with SIGKILL mid-flow, a gateway drained under load, a reader that
//! stops reading, nats-server stopped and started again. Clients resend what got no ACK (same
//! client_msg_id); nothing ACKed is lost and nothing is stored twice.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::AsyncReadExt;
use zhibo_loadtest::client::{Client, Transport};
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{
    ErrorCode, ReceiverType, SendMessageInput, SendMessageOutput, SyncInput, SyncOutput,
};

use crate::cluster::Cluster;

/// What a resilient client does: keep up to `window` sends in flight, resend (same client_msg_id) what
/// got no ACK within `resend_after` or got an error; run `at_half` once half are ACKed.
async fn send_all<F, Fut>(
    client: &mut Client,
    to: i64,
    ids: &[String],
    at_half: F,
) -> HashMap<String, SendMessageOutput>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let window = 16;
    let resend_after = Duration::from_millis(1500);
    let mut queue: VecDeque<String> = ids.iter().cloned().collect();
    let mut in_flight: HashMap<u64, (String, Instant)> = HashMap::new();
    let mut acked = HashMap::new();
    let mut at_half = Some(at_half);
    let deadline = Instant::now() + Duration::from_secs(90);
    while acked.len() < ids.len() {
        assert!(
            Instant::now() < deadline,
            "all sends ACKed in time: {} of {}",
            acked.len(),
            ids.len()
        );
        while in_flight.len() < window {
            let Some(id) = queue.pop_front() else { break };
            let rid = client
                .send(Body::SendMessage(SendMessageInput {
                    receiver_type: ReceiverType::User as i32,
                    receiver_id: to,
                    client_msg_id: id.clone(),
                    content_type: 1,
                    content: Bytes::from(format!("body of {id}")),
                    ..Default::default()
                }))
                .await
                .expect("send");
            in_flight.insert(rid, (id, Instant::now()));
        }
        if let Ok(Some(p)) = client.recv(Duration::from_millis(100)).await {
            if let Some((id, _)) = in_flight.remove(&p.request_id) {
                match p.body {
                    Some(Body::SendMessageOutput(o)) => {
                        acked.insert(id, o);
                    }
                    _ => queue.push_back(id),
                }
            }
        }
        let now = Instant::now();
        let stale: Vec<u64> = in_flight
            .iter()
            .filter(|(_, (_, at))| now.duration_since(*at) > resend_after)
            .map(|(rid, _)| *rid)
            .collect();
        for rid in stale {
            if let Some((id, _)) = in_flight.remove(&rid) {
                queue.push_front(id);
            }
        }
        if acked.len() * 2 >= ids.len() {
            if let Some(f) = at_half.take() {
                f().await;
            }
        }
    }
    acked
}

async fn sync_all(client: &mut Client) -> Vec<zhibo_proto::client::Message> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let p = client
            .request(
                Body::Sync(SyncInput {
                    seq: after,
                    limit: 500,
                }),
                Duration::from_secs(10),
            )
            .await
            .expect("sync");
        let Some(Body::SyncOutput(SyncOutput { messages, has_more })) = p.body else {
            panic!("expected SyncOutput, got {p:?}");
        };
        if let Some(m) = messages.last() {
            after = m.seq;
        }
        all.extend(messages);
        if !has_more {
            return all;
        }
    }
}

/// Every ACKed message is stored exactly once in the receiver's inbox, with the ACKed id.
fn assert_exactly_once(
    inbox: &[zhibo_proto::client::Message],
    acked: &HashMap<String, SendMessageOutput>,
) {
    let mut seen: HashMap<&str, u64> = HashMap::new();
    for m in inbox {
        assert!(
            seen.insert(m.client_msg_id.as_str(), m.message_id)
                .is_none(),
            "{} stored twice",
            m.client_msg_id
        );
    }
    for (id, out) in acked {
        assert_eq!(
            seen.get(id.as_str()),
            Some(&out.message_id),
            "ACKed {id} is stored once with its id"
        );
    }
    assert_eq!(inbox.len(), acked.len(), "nothing else stored");
    assert!(inbox.windows(2).all(|w| w[0].seq < w[1].seq));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_a_logic_worker_loses_no_acked_message() {
    let cluster = Cluster::distributed_with(0).await;
    let victim = cluster.spawn_worker_process().await;
    let _survivor = cluster.spawn_worker_process().await;
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    cluster.befriend(&alice, &bob).await;
    let mut a = cluster.connect(Transport::Tcp, 0, &alice).await;
    let ids: Vec<String> = (0..300).map(|i| format!("k{i}")).collect();
    let acked = send_all(&mut a, bob.user_id, &ids, || victim.kill()).await;
    let mut b = cluster.connect(Transport::Ws, 1, &bob).await;
    assert_exactly_once(&sync_all(&mut b).await, &acked);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_gateway_under_load_loses_nothing() {
    let cluster = Cluster::distributed().await;
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    cluster.befriend(&alice, &bob).await;
    let mut a = cluster.connect(Transport::Tcp, 0, &alice).await;
    let ids: Vec<String> = (0..100).map(|i| format!("d{i}")).collect();
    let mut acked = send_all(&mut a, bob.user_id, &ids[..40], || async {}).await;
    // Ten more sends in flight, then SIGTERM-equivalent for gateway 0 while they are being handled.
    let mut waiting = HashMap::new();
    for id in &ids[40..50] {
        let rid = a
            .send(Body::SendMessage(SendMessageInput {
                receiver_type: ReceiverType::User as i32,
                receiver_id: bob.user_id,
                client_msg_id: id.clone(),
                content_type: 1,
                content: Bytes::from(format!("body of {id}")),
                ..Default::default()
            }))
            .await
            .expect("send");
        waiting.insert(rid, id.clone());
    }
    // A heartbeat behind them: the gateway reads frames in order, so its answer means all ten sends were
    // read and forwarded (ACKs that arrive first are kept).
    let fence = a
        .send(Body::Heartbeat(Default::default()))
        .await
        .expect("heartbeat");
    loop {
        let p = a
            .recv(Duration::from_secs(10))
            .await
            .expect("heartbeat answered")
            .expect("open");
        if p.request_id == fence {
            break;
        }
        if let Some(Body::SendMessageOutput(o)) = p.body {
            let id = waiting.remove(&p.request_id).expect("an ACK of ours");
            acked.insert(id, o);
        }
    }
    cluster.gateway_stops[0].cancel();
    // The draining gateway says GoAway, still writes the ACKs of the sends it had forwarded, then closes.
    let mut go_away = None;
    while let Some(p) = a
        .recv(Duration::from_secs(10))
        .await
        .expect("closed in time")
    {
        match p.body {
            Some(Body::GoAway(g)) => go_away = Some(g),
            Some(Body::SendMessageOutput(o)) => {
                let id = waiting.remove(&p.request_id).expect("an ACK of ours");
                acked.insert(id, o);
            }
            _ => {}
        }
    }
    let go_away = go_away.expect("GoAway before the close");
    assert!(go_away.reconnect_after_ms > 0);
    assert!(
        waiting.is_empty(),
        "in-flight sends finished during the drain; unanswered: {waiting:?}"
    );
    // Reconnect to the other gateway and carry on.
    let mut a = cluster.connect(Transport::Quic, 1, &alice).await;
    acked.extend(send_all(&mut a, bob.user_id, &ids[50..], || async {}).await);
    let mut b = cluster.connect(Transport::Ws, 1, &bob).await;
    assert_exactly_once(&sync_all(&mut b).await, &acked);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_reading_is_closed_and_catches_up_by_sync() {
    let cluster = Cluster::embedded_with(|c| {
        c.gateway.outbound_queue = 64;
        c.gateway.rate_burst = 2000.0;
        c.gateway.rate_per_sec = 2000.0;
    })
    .await;
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    cluster.befriend(&alice, &bob).await;
    // Bob signs in on a raw socket and then never reads.
    let mut stuck = tokio::net::TcpStream::connect(cluster.gw(0).tcp)
        .await
        .expect("connect");
    {
        use tokio::io::AsyncWriteExt;
        use tokio_util::codec::Encoder;
        let mut buf = bytes::BytesMut::new();
        zhibo_proto::codec::PacketCodec::default()
            .encode(
                &zhibo_proto::client::Packet::new(
                    1,
                    Body::SignIn(zhibo_proto::client::SignInInput {
                        user_id: bob.user_id,
                        device_id: bob.device_id,
                        token: bob.token.clone(),
                    }),
                ),
                &mut buf,
            )
            .expect("encode");
        stuck.write_all(&buf).await.expect("sign in");
    }
    // Its sign-in answer: bob is online (his deliveries are routed to this connection) from here on.
    let mut read = bytes::BytesMut::new();
    let signed_in = tokio::time::timeout(Duration::from_secs(10), async {
        use tokio_util::codec::Decoder;
        let mut codec = zhibo_proto::codec::PacketCodec::default();
        loop {
            if let Some(p) = codec.decode(&mut read).expect("decode") {
                return p;
            }
            assert_ne!(stuck.read_buf(&mut read).await.expect("read"), 0, "closed");
        }
    })
    .await
    .expect("sign-in answered");
    assert!(
        matches!(signed_in.body, Some(Body::SignInOutput(_))),
        "{signed_in:?}"
    );
    let mut a = cluster.connect(Transport::Tcp, 0, &alice).await;
    // ~600 × 30 KB = 18 MB: more than the loopback socket buffers hold.
    let big = "x".repeat(30 * 1024);
    let ids: Vec<String> = (0..600).map(|i| format!("slow{i}")).collect();
    let mut acked = HashMap::new();
    // Chunks below the queue length: the ACKs of one chunk must fit in alice's own queue.
    for (i, chunk) in ids.chunks(30).enumerate() {
        for id in chunk {
            a.send(Body::SendMessage(SendMessageInput {
                receiver_type: ReceiverType::User as i32,
                receiver_id: bob.user_id,
                client_msg_id: id.clone(),
                content_type: 1,
                content: Bytes::from(big.clone()),
                ..Default::default()
            }))
            .await
            .expect("send");
        }
        while acked.len() < (i + 1) * 30 {
            let p = a
                .recv(Duration::from_secs(10))
                .await
                .expect("ack")
                .expect("open");
            match p.body {
                Some(Body::SendMessageOutput(o)) => {
                    acked.insert(o.message_id, o);
                }
                other => panic!("expected an ACK, got {other:?}"),
            }
        }
    }
    assert_eq!(
        acked.len(),
        600,
        "the sender is never held back by a slow receiver"
    );
    // The stuck connection was closed by the gateway: reading it now drains what was buffered and
    // reaches the end of the stream.
    let mut sink = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stuck.read_to_end(&mut sink))
        .await
        .expect("the gateway closed the stuck connection")
        .expect("read");
    assert!(
        sink.len() < 600 * 30 * 1024,
        "it did not get everything live"
    );
    // Reconnecting and syncing gets every message.
    let mut b = cluster.connect(Transport::Tcp, 0, &bob).await;
    let inbox = sync_all(&mut b).await;
    assert_eq!(inbox.len(), 600);
    cluster.stop().await;
}

/// nats-server stopped under a signed-in client: a send is refused with `UNAVAILABLE` (the gateway does
/// not leave it buffered in silence), the connection stays up, and once a server is back on the same
/// port the same connection sends again and the message is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_while_nats_is_down_is_refused_and_works_once_it_is_back() {
    let nats = zhibo_testkit::NatsServer::start("");
    let port = nats.port();
    let cluster = Cluster::distributed_tweaked(1, |c| c.bus.nats_url = nats.url()).await;
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    cluster.befriend(&alice, &bob).await;
    let mut a = cluster.connect(Transport::Tcp, 0, &alice).await;
    let mut b = cluster.connect(Transport::Ws, 1, &bob).await;
    let text = |id: &str| {
        Body::SendMessage(SendMessageInput {
            receiver_type: ReceiverType::User as i32,
            receiver_id: bob.user_id,
            client_msg_id: id.to_owned(),
            content_type: 1,
            content: Bytes::from(format!("body of {id}")),
            ..Default::default()
        })
    };
    let wait = Duration::from_secs(15);
    let reply = a.request(text("before"), wait).await.expect("reply");
    assert!(
        matches!(reply.body, Some(Body::SendMessageOutput(_))),
        "{reply:?}"
    );

    drop(nats);
    // A send the gateway published just before it noticed gets no answer; the next ones are refused.
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0.. {
        assert!(Instant::now() < deadline, "no UNAVAILABLE within 30 s");
        match a
            .request(text(&format!("down-{i}")), Duration::from_secs(2))
            .await
        {
            Ok(p) => match p.body {
                Some(Body::Error(e)) if e.code == ErrorCode::Unavailable as i32 => {
                    assert!(e.message.contains("same client_msg_id"), "{e:?}");
                    break;
                }
                other => panic!("a send while NATS is down answered {other:?}"),
            },
            Err(zhibo_client::Error::Timeout(_)) => {}
            Err(e) => panic!("the connection did not survive the outage: {e}"),
        }
    }

    let _nats = zhibo_testkit::NatsServer::start_on(port, "");
    let deadline = Instant::now() + Duration::from_secs(60);
    let sent = loop {
        assert!(
            Instant::now() < deadline,
            "sends not accepted 60 s after NATS came back"
        );
        match a.request(text("after"), Duration::from_secs(2)).await {
            Ok(p) => match p.body {
                Some(Body::SendMessageOutput(o)) => break o,
                Some(Body::Error(e)) if e.code == ErrorCode::Unavailable as i32 => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => panic!("a send after the outage answered {other:?}"),
            },
            Err(zhibo_client::Error::Timeout(_)) => {}
            Err(e) => panic!("the connection did not survive the outage: {e}"),
        }
    };
    // Bob gets it live (messages of the outage, if any reached the worker, may come first).
    let deadline = Instant::now() + wait;
    loop {
        let p = b
            .recv(deadline.saturating_duration_since(Instant::now()))
            .await
            .expect("the message after the outage, live")
            .expect("bob's connection open");
        if let Some(Body::Message(m)) = p.body {
            if m.message_id == sent.message_id {
                break;
            }
        }
    }
    cluster.stop().await;
}

/// A redis-server of this test's own on `port` (no persistence), killed when dropped.
async fn own_redis(port: u16) -> tokio::process::Child {
    let child = tokio::process::Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server on PATH (scripts/infra.sh installs it)");
    crate::cluster::eventually(
        "redis-server listening",
        Duration::from_secs(10),
        || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(drop)
        },
    )
    .await;
    child
}

/// Polls `url` until it answers `status` (30 s).
async fn until_status(url: &str, status: u16) {
    let http = reqwest::Client::new();
    let what = format!("{url} answers {status}");
    crate::cluster::eventually(&what, Duration::from_secs(30), || {
        let request = http.get(url).send();
        async move { (request.await.ok()?.status().as_u16() == status).then_some(()) }
    })
    .await;
}

/// Redis stopped: `/readyz` says so (outside audit: it stayed 200 while every send waited 5 s and
/// failed), and is ready again once a redis-server is back on the same port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_redis() {
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        probe.local_addr().expect("addr").port()
    };
    let redis = own_redis(port).await;
    let cluster = Cluster::distributed_tweaked(1, |c| {
        c.store.redis_url = format!("redis://127.0.0.1:{port}");
    })
    .await;
    let readyz = format!("{}/readyz", cluster.api_base);
    until_status(&readyz, 200).await;
    drop(redis);
    until_status(&readyz, 503).await;
    let _redis = own_redis(port).await;
    until_status(&readyz, 200).await;
    cluster.stop().await;
}
