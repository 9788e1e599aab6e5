//! Message ids stay unique across processes that mint them at once with `logic.node_id` unset: worker
//! processes started together, in-process workers, and user-api's server-side sends, on real Cassandra.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use zhibo_loadtest::client::{Client, Transport};
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{ReceiverType, SendMessageInput};

use crate::cluster::{Cluster, ADMIN};

/// Sends `n` messages to oneself with up to 32 in flight; returns every ACKed message id.
async fn send_many(mut client: Client, user_id: i64, tag: String, n: usize) -> Vec<u64> {
    let mut ids = Vec::with_capacity(n);
    let mut in_flight: HashMap<u64, usize> = HashMap::new();
    let mut next = 0;
    while ids.len() < n {
        while in_flight.len() < 32 && next < n {
            let rid = client
                .send(Body::SendMessage(SendMessageInput {
                    receiver_type: ReceiverType::User as i32,
                    receiver_id: user_id,
                    client_msg_id: format!("{tag}-{next}"),
                    content_type: 1,
                    content: Bytes::from_static(b"id?"),
                    ..Default::default()
                }))
                .await
                .expect("send");
            in_flight.insert(rid, next);
            next += 1;
        }
        let p = client
            .recv(Duration::from_secs(20))
            .await
            .expect("a reply in time")
            .expect("connection open");
        if in_flight.remove(&p.request_id).is_none() {
            continue; // a pushed copy to another device, or a heartbeat
        }
        match p.body {
            Some(Body::SendMessageOutput(o)) => ids.push(o.message_id),
            other => panic!("expected SendMessageOutput, got {other:?}"),
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_started_at_once_never_mint_the_same_message_id() {
    // Two in-process workers and user-api (all one pid, created within milliseconds), plus three worker
    // processes started together.
    let cluster = Cluster::distributed_with(2).await;
    let (w1, w2, w3) = tokio::join!(
        cluster.spawn_worker_process(),
        cluster.spawn_worker_process(),
        cluster.spawn_worker_process(),
    );
    let mut users = Vec::new();
    for i in 0..8 {
        users.push(cluster.user(&format!("ids{i}")).await);
    }
    let mut tasks = Vec::new();
    for (i, u) in users.iter().enumerate() {
        let client = cluster.connect(Transport::Tcp, i, u).await;
        let (user_id, tag) = (u.user_id, format!("m{i}"));
        tasks.push(tokio::spawn(send_many(client, user_id, tag, 375)));
    }
    // Server-side sends mint in user-api's own pipeline meanwhile.
    let system = cluster.user("system").await;
    let mut all = Vec::new();
    for n in 0..50 {
        let v = cluster
            .api
            .post_admin(
                "/v1/admin/messages",
                ADMIN,
                serde_json::json!({"from_user_id": system.user_id, "receiver_type": "user",
                    "receiver_id": users[n % users.len()].user_id, "client_msg_id": format!("srv-{n}"),
                    "content_type": 1, "content": "aWQ="}),
            )
            .await
            .expect("server-side send");
        let id: u64 = v["message_id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("message_id string");
        all.push(id);
    }
    for t in tasks {
        all.extend(t.await.expect("sender"));
    }
    assert_eq!(all.len(), 8 * 375 + 50);
    let mut sorted = all.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        all.len(),
        "{} duplicate message ids among {}",
        all.len() - sorted.len(),
        all.len()
    );
    // The ids came from more than one node number (several minters took part).
    let mut nodes: Vec<u64> = all.iter().map(|id| (id >> 12) & 0x3ff).collect();
    nodes.sort_unstable();
    nodes.dedup();
    assert!(nodes.len() >= 2, "node numbers used: {nodes:?}");
    drop((w1, w2, w3));
    cluster.stop().await;
}
