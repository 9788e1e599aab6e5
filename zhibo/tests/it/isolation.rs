//! Two deployments (or two test runs) on one NATS server, told apart by `bus.subject_prefix`: a logic
//! worker of the other one never takes this one's commands.

use std::time::Duration;

use bytes::Bytes;
use zhibo_loadtest::client::{Client, Transport};
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{ErrorCode, ReceiverType, SendMessageInput};

use crate::cluster::{subject_prefix, Cluster};

const WAIT: Duration = Duration::from_secs(15);

/// Sends `n` short messages to `to`; returns the error codes of the refused ones.
async fn send_many(client: &mut Client, to: i64, n: usize, tag: &str) -> Vec<ErrorCode> {
    let mut refused = Vec::new();
    for i in 0..n {
        let reply = client
            .request(
                Body::SendMessage(SendMessageInput {
                    receiver_type: ReceiverType::User as i32,
                    receiver_id: to,
                    client_msg_id: format!("{tag}{i}"),
                    content_type: 1,
                    content: Bytes::from_static(b"hello"),
                    ..Default::default()
                }),
                WAIT,
            )
            .await
            .expect("a reply");
        match reply.body {
            Some(Body::SendMessageOutput(_)) => {}
            Some(Body::Error(e)) => refused.push(ErrorCode::try_from(e.code).expect("code")),
            other => panic!("expected an ACK or an error, got {other:?}"),
        }
    }
    refused
}

/// A logic worker that refuses every message (`max_content` 1 byte) runs on the same NATS server with
/// another subject prefix, beside a normal worker of this cluster: every send is answered by ours. (With
/// the other worker on this process's prefix, about half the sends are refused: the test fails, as it
/// did before subject prefixes existed. The foreign worker connects as this cluster's NATS account, so
/// only the prefix keeps it apart.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_prefix_on_the_same_nats_never_takes_our_commands() {
    let cluster = Cluster::distributed_with(0).await;
    let other = format!("{}_other", subject_prefix());
    let _foreign = cluster
        .spawn_worker_process_with(&[
            ("ZHIBO_BUS__SUBJECT_PREFIX", &other),
            ("ZHIBO_LOGIC__MAX_CONTENT", "1"),
        ])
        .await;
    let _ours = cluster.spawn_worker_process().await;
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    cluster.befriend(&alice, &bob).await;
    let mut a = cluster.connect(Transport::Tcp, 0, &alice).await;
    assert_eq!(
        send_many(&mut a, bob.user_id, 30, "iso").await,
        vec![],
        "a worker of another prefix took some of our commands"
    );

    cluster.stop().await;
}
