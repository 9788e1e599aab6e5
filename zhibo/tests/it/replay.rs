//! A worker that died after storing a message and before publishing it: the client's resend must get the
//! message pushed to the receiver, not only answered `duplicate`.

use std::time::Duration;

use bytes::Bytes;
use zhibo_loadtest::client::Transport;
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{Message, ReceiverType, SendMessageInput};
use zhibo_store::SendPlan;

use crate::cluster::Cluster;

const WAIT: Duration = Duration::from_secs(15);

/// The crash window, set up deterministically: the plan and every inbox entry are stored exactly as a
/// worker writes them (`record_send`), and nothing is published. Bob, connected all along, must get the
/// message pushed when Alice resends it with the same client_msg_id.
async fn resend_after_a_crash_before_publish_pushes_the_stored_message(cluster: &Cluster) {
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    cluster.befriend(&alice, &bob).await;
    let mut a = cluster.connect(Transport::Tcp, 0, &alice).await;
    let mut b = cluster.connect(Transport::Ws, 1, &bob).await;

    let stores = &cluster.stores;
    let seqs = stores
        .seq
        .next(&[alice.user_id, bob.user_id])
        .await
        .expect("seqs");
    let plan = SendPlan {
        message_id: 0x5eed_0000_0000_0001 ^ (alice.user_id as u64),
        seq: seqs[0],
        server_time_ms: 1_000,
        recipients: vec![(alice.user_id, seqs[0]), (bob.user_id, seqs[1])],
        conv_seq: 0,
    };
    let template = Message {
        message_id: plan.message_id,
        seq: 0,
        sender_user_id: alice.user_id,
        sender_device_id: alice.device_id,
        receiver_type: ReceiverType::User as i32,
        receiver_id: bob.user_id,
        client_msg_id: "crashed-1".into(),
        server_time_ms: plan.server_time_ms,
        content_type: 1,
        content: Bytes::from_static(b"stored, never pushed"),
        conv_seq: 0,
    };
    let entries: Vec<(i64, Message)> = plan
        .recipients
        .iter()
        .map(|&(u, seq)| {
            (
                u,
                Message {
                    seq,
                    ..template.clone()
                },
            )
        })
        .collect();
    assert!(stores
        .messages
        .record_send(alice.device_id, "crashed-1", &plan, &entries)
        .await
        .expect("stored as the worker would")
        .is_none());

    // No ACK reached Alice: she resends.
    let reply = a
        .request(
            Body::SendMessage(SendMessageInput {
                receiver_type: ReceiverType::User as i32,
                receiver_id: bob.user_id,
                client_msg_id: "crashed-1".into(),
                content_type: 1,
                content: Bytes::from_static(b"stored, never pushed"),
                ..Default::default()
            }),
            WAIT,
        )
        .await
        .expect("reply");
    match reply.body {
        Some(Body::SendMessageOutput(o)) => {
            assert!(o.duplicate);
            assert_eq!((o.message_id, o.seq), (plan.message_id, plan.seq));
        }
        other => panic!("expected SendMessageOutput, got {other:?}"),
    }
    let pushed = loop {
        let p = b
            .recv(WAIT)
            .await
            .expect("bob gets the message pushed")
            .expect("connection open");
        match p.body {
            Some(Body::Message(m)) => break m,
            Some(Body::Heartbeat(_)) => continue,
            other => panic!("expected a Message, got {other:?}"),
        }
    };
    assert_eq!(pushed.message_id, plan.message_id);
    assert_eq!(pushed.seq, seqs[1]);
    assert_eq!(&pushed.content[..], b"stored, never pushed");
}

both_modes!(
    crate::cluster::Cluster,
    2,
    resend_after_a_crash_before_publish_pushes_the_stored_message,
);
