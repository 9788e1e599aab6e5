//! Distributed mode on clustered infrastructure: the seq allocator on a 3-master Redis Cluster (one
//! master flushed mid-run), and gateways and workers on a 3-node NATS cluster (the node a gateway
//! uses killed mid-run). Clients keep working and every ACKed message is in the receivers' sync.
//!
//! A test binary of its own (like tests/hooks.rs): its workers allocate seqs from the Redis Cluster,
//! and every distributed cluster of one test process shares the process's NATS subject prefix, so in
//! tests/it a worker of another test's cluster (on the standalone Redis) could take these commands and
//! allocate from the other Redis (seen in CI: alice's ACKed seqs went 1, 3, 4, 2). Here the Redis
//! Cluster test is the only cluster on the harness NATS; the NATS-cluster test runs on its own servers.

#[path = "it/cluster.rs"]
#[allow(dead_code)]
mod cluster;

use std::time::Duration;

use bytes::Bytes;
use zhibo_loadtest::client::{Client, Transport};
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{Message, ReceiverType, SendMessageInput, SyncInput, SyncOutput};
use zhibo_testkit::NatsServer;

use crate::cluster::{eventually, fresh_room_id, join_room, Cluster, Node};

/// How long one request waits before the client resends it (same client_msg_id: deduplicated).
const ATTEMPT: Duration = Duration::from_secs(2);
/// How long a send may take to be ACKed across a failover.
const FAILOVER: Duration = Duration::from_secs(30);

fn text(receiver_type: ReceiverType, receiver_id: i64, client_msg_id: &str, body: &str) -> Body {
    Body::SendMessage(SendMessageInput {
        receiver_type: receiver_type as i32,
        receiver_id,
        client_msg_id: client_msg_id.into(),
        content_type: 1,
        content: Bytes::from(body.to_owned()),
        ..Default::default()
    })
}

/// Sends until ACKed (resending the same client_msg_id, as an app does after a timeout); returns
/// the seq of the ACK.
async fn send_acked(c: &mut Client, to: (ReceiverType, i64), id: &str, body: &str) -> u64 {
    let deadline = tokio::time::Instant::now() + FAILOVER;
    loop {
        let reply = c.request(text(to.0, to.1, id, body), ATTEMPT).await;
        match reply {
            Ok(p) => match p.body {
                Some(Body::SendMessageOutput(o)) => return o.seq,
                // UNAVAILABLE while the bus reconnects: retry, as a client does.
                Some(Body::Error(e)) => tracing_error(id, &e.message),
                other => panic!("expected SendMessageOutput for {id}, got {other:?}"),
            },
            Err(e) => tracing_error(id, &e.to_string()),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} was not ACKed within {FAILOVER:?}"
        );
    }
}

fn tracing_error(id: &str, what: &str) {
    eprintln!("send {id}: {what}; retrying");
}

/// Every message of `c`'s inbox (paging through sync).
async fn sync_all(c: &mut Client) -> Vec<Message> {
    let mut all = Vec::new();
    let mut seq = 0;
    loop {
        let out: SyncOutput = match c
            .request(Body::Sync(SyncInput { seq, limit: 100 }), FAILOVER)
            .await
            .expect("sync")
            .body
        {
            Some(Body::SyncOutput(o)) => o,
            other => panic!("expected SyncOutput, got {other:?}"),
        };
        let Some(last) = out.messages.last() else {
            return all;
        };
        seq = last.seq;
        all.extend(out.messages);
    }
}

fn texts(ms: &[Message]) -> Vec<String> {
    ms.iter()
        .map(|m| String::from_utf8_lossy(&m.content).into_owned())
        .collect()
}

/// What runs before a round of [`traffic`] (a fault), if anything.
type MidRun = Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>>;

/// Sends `n` rounds of 1:1 (alice to bob and back) and group (alice to bob and carol) messages,
/// awaiting `mid_run(i)` before round `i`, then checks that every ACKed message is in each inbox
/// exactly once, in send order. Returns alice's ACKed seqs.
async fn traffic(
    cluster: &Cluster,
    n: usize,
    mut mid_run: impl FnMut(usize) -> MidRun,
) -> Vec<u64> {
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    let carol = cluster.user("carol").await;
    cluster.befriend(&alice, &bob).await;
    let gid = cluster.group(&alice, &[&bob, &carol]).await;
    let mut a = cluster.connect(Transport::Tcp, 0, &alice).await;
    let mut b = cluster.connect(Transport::Ws, 1, &bob).await;
    let mut c = cluster.connect(Transport::Tcp, 1, &carol).await;
    let (mut want_a, mut want_b, mut want_c) = (Vec::new(), Vec::new(), Vec::new());
    let (mut seqs_a, mut seqs_b) = (Vec::new(), Vec::new());
    for i in 0..n {
        if let Some(f) = mid_run(i) {
            f.await;
        }
        let d = format!("a->b {i}");
        seqs_a.push(
            send_acked(
                &mut a,
                (ReceiverType::User, bob.user_id),
                &format!("d{i}"),
                &d,
            )
            .await,
        );
        want_a.push(d.clone());
        want_b.push(d);
        let r = format!("b->a {i}");
        seqs_b.push(
            send_acked(
                &mut b,
                (ReceiverType::User, alice.user_id),
                &format!("r{i}"),
                &r,
            )
            .await,
        );
        want_a.push(r.clone());
        want_b.push(r);
        let g = format!("group {i}");
        seqs_a.push(send_acked(&mut a, (ReceiverType::Group, gid), &format!("g{i}"), &g).await);
        want_a.push(g.clone());
        want_b.push(g.clone());
        want_c.push(g);
    }
    for (who, seqs) in [("alice", &seqs_a), ("bob", &seqs_b)] {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{who}'s ACKed seqs strictly increase: {seqs:?}"
        );
    }
    // Every ACKed message is in each inbox exactly once, in send order (nothing lost or duplicated).
    for (who, client, want) in [
        ("alice", &mut a, want_a),
        ("bob", &mut b, want_b),
        ("carol", &mut c, want_c),
    ] {
        let inbox = sync_all(client).await;
        assert_eq!(texts(&inbox), want, "{who}'s inbox");
        assert!(inbox.windows(2).all(|w| w[0].seq < w[1].seq), "{who}");
    }
    seqs_a
}

/// 1:1 and group traffic with the seq counters on a 3-master Redis Cluster; one master loses every
/// key (FLUSHALL) mid-run: seqs keep increasing (recovered from the store), nothing ACKed is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_to_one_and_group_on_a_redis_cluster_with_a_master_flushed() {
    let masters = zhibo_testkit::require_redis_cluster().await;
    let url = zhibo_testkit::redis_cluster_url(&masters);
    let cluster = Cluster::distributed_tweaked(2, |c| c.store.redis_url = url).await;
    // One master at a time (rounds 2, 4 and 6), so whichever master holds a user's counter, one
    // flush takes it while the other masters keep theirs.
    let seqs = traffic(&cluster, 8, |i| {
        let master = masters
            .get(i.checked_sub(2)? / 2)
            .filter(|_| i % 2 == 0)?
            .clone();
        Some(Box::pin(async move { flushall(&master).await }))
    })
    .await;
    assert!(
        seqs.windows(2)
            .any(|w| w[1] - w[0] > zhibo_store::redis_seq::RECOVERY_MARGIN),
        "alice's counter was lost and recovered above her stored seqs: {seqs:?}"
    );
    cluster.stop().await;
}

/// FLUSHALL on the Redis at `url` (one master of the cluster).
async fn flushall(url: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = url.trim_start_matches("redis://");
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the master");
    s.write_all(b"*1\r\n$8\r\nFLUSHALL\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"+OK\r\n");
}

/// A node of a 3-node NATS cluster: routes to `seed` (none for the first), monitoring on.
fn nats_node(name: &str, seed: Option<&NatsServer>) -> NatsServer {
    let routes = seed
        .map(|s| {
            format!(
                "routes: [\"nats-route://127.0.0.1:{}\"]",
                s.route_port().expect("route port")
            )
        })
        .unwrap_or_default();
    NatsServer::start_cluster_node(&format!(
        "server_name: {name}\nhttp: \"127.0.0.1:-1\"\n\
         cluster {{ name: zhibo_e2e, listen: \"127.0.0.1:-1\", {routes} }}"
    ))
}

/// A counter of `node`'s monitoring endpoint: `num_routes` of `/routez`, `num_connections` of
/// `/connz`.
async fn monitored(node: &NatsServer, endpoint: &str, field: &str) -> Option<u64> {
    let port = node.monitor_port()?;
    let v: serde_json::Value = reqwest::get(format!("http://127.0.0.1:{port}/{endpoint}"))
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    v[field].as_u64()
}

async fn routes(node: &NatsServer) -> Option<u64> {
    monitored(node, "routez", "num_routes").await
}

/// Two gateways on different nodes of a 3-node NATS cluster, the workers and user-api on the third,
/// exchange 1:1, group and room traffic; the node of gateway 1 (configured with every node, in
/// order, its own first) is killed mid-run: gateway 1 fails over, its clients keep working, and
/// every ACKed message is in the receivers' sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_and_workers_on_a_nats_cluster_survive_a_node_kill() {
    let n1 = nats_node("n1", None);
    let n2 = nats_node("n2", Some(&n1));
    let n3 = nats_node("n3", Some(&n1));
    // A full mesh: each node routes to the two others (n2 and n3 find each other through n1).
    for node in [&n1, &n2, &n3] {
        eventually("the NATS cluster forms a full mesh", FAILOVER, || async {
            (routes(node).await == Some(2)).then_some(())
        })
        .await;
    }
    let (u1, u2, u3) = (n1.url(), n2.url(), n3.url());
    let gateway1_seeds = format!("{u2},{u1},{u3}");
    let cluster = Cluster::distributed_per_node(
        2,
        |_| {},
        |node, c| match node {
            Node::Gateway(0) => c.bus.nats_url = u1.clone(),
            Node::Gateway(_) => {
                c.bus.nats_url = gateway1_seeds.clone();
                c.bus.nats_servers_in_order = true;
            }
            Node::Worker | Node::Api => c.bus.nats_url = u3.clone(),
        },
    )
    .await;

    // Gateway 1 (its own node first) is the only client of n2: the node about to be killed.
    assert_eq!(
        monitored(&n2, "connz", "num_connections").await,
        Some(1),
        "gateway 1 is connected to n2"
    );

    // Room traffic across the gateways before the kill.
    let room = fresh_room_id();
    let speaker = cluster.user("speaker").await;
    let viewer = cluster.user("viewer").await;
    let mut s = cluster.connect(Transport::Tcp, 0, &speaker).await;
    let mut v = cluster.connect(Transport::Tcp, 1, &viewer).await;
    // Only members may speak: both join.
    join_room(&mut s, room, FAILOVER).await;
    join_room(&mut v, room, FAILOVER).await;
    room_reaches(&mut s, &mut v, room, "before").await;

    let mut n2 = Some(n2);
    traffic(&cluster, 8, |i| {
        // Mid-run, kill -9 the node gateway 1 is connected to.
        if i == 4 {
            drop(n2.take()?);
        }
        None
    })
    .await;

    // The viewer's gateway resubscribed its room on the new node: room traffic flows again.
    room_reaches(&mut s, &mut v, room, "after").await;
    cluster.stop().await;
    drop((n1, n3));
}

/// Room messages are best-effort: `s` says `tag` lines in `room` until one reaches `v`.
async fn room_reaches(s: &mut Client, v: &mut Client, room: i64, tag: &str) {
    let deadline = tokio::time::Instant::now() + FAILOVER;
    for i in 0.. {
        let line = format!("{tag} {i}");
        let reply = s
            .request(text(ReceiverType::Room, room, "", &line), ATTEMPT)
            .await;
        assert!(
            matches!(reply, Ok(ref p) if matches!(p.body, Some(Body::SendMessageOutput(_))))
                || tokio::time::Instant::now() < deadline,
            "room message not accepted: {reply:?}"
        );
        let until = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(Some(p)) = v
            .recv(until.saturating_duration_since(tokio::time::Instant::now()))
            .await
        {
            if let Some(Body::RoomMessages(f)) = p.body {
                if f.room_id == room
                    && f.messages
                        .iter()
                        .any(|m| m.content.starts_with(tag.as_bytes()))
                {
                    return;
                }
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no room message '{tag}' reached the viewer within {FAILOVER:?}"
        );
    }
}
