//! The pipeline on the embedded store and the in-process bus: crash recovery and dedup keys.

use std::sync::Arc;

use bytes::Bytes;
use zhibo_bus::memory::MemoryBus;
use zhibo_logic::{Logic, LogicConfig};
use zhibo_proto::bus::Origin;
use zhibo_proto::client::{ReceiverType, SendMessageInput, SyncInput};
use zhibo_store::embedded::EmbeddedBackend;
use zhibo_store::{Profile, SendResult, Stores, User};

fn user(user_id: i64) -> User {
    User {
        user_id,
        username: format!("u{user_id}"),
        password_hash: String::new(),
        profile: Profile::default(),
        created_at_ms: 0,
        updated_at_ms: 0,
    }
}

async fn setup() -> (Stores, Logic) {
    let stores = Arc::new(EmbeddedBackend::temporary().expect("store")).stores();
    for id in [1, 2, 3] {
        stores.users.insert_user(&user(id)).await.expect("user");
    }
    let config = LogicConfig {
        allow_strangers: true,
        ..LogicConfig::default()
    };
    let logic = Logic::new(stores.clone(), Arc::new(MemoryBus::new()), config);
    (stores, logic)
}

fn input(to: i64, id: &str, text: &str) -> SendMessageInput {
    SendMessageInput {
        receiver_type: ReceiverType::User as i32,
        receiver_id: to,
        client_msg_id: id.into(),
        content_type: 1,
        content: Bytes::from(text.to_owned()),
    }
}

fn origin(user_id: i64, device_id: i64) -> Origin {
    Origin {
        user_id,
        device_id,
        gateway_id: String::new(),
        conn_id: 0,
    }
}

#[tokio::test]
async fn a_plan_written_before_a_crash_is_completed_by_the_resend() {
    let (stores, logic) = setup().await;
    // The worker allocated seqs and wrote the plan, then died before any inbox write.
    let seqs = stores.seq.next(&[1, 2]).await.expect("seqs");
    let plan = SendResult {
        message_id: 777,
        seq: seqs[0],
        server_time_ms: 5,
        recipients: vec![(1, seqs[0]), (2, seqs[1])],
    };
    assert!(stores
        .messages
        .put_dedup_if_absent(10, "c1", &plan)
        .await
        .expect("plan")
        .is_none());
    assert!(stores
        .messages
        .sync(2, 0, 10)
        .await
        .expect("sync")
        .is_empty());
    // The client got no ACK and resends.
    let out = logic
        .send_message(&origin(1, 10), &input(2, "c1", "hello"))
        .await
        .expect("resend");
    assert_eq!(
        (out.message_id, out.seq, out.duplicate),
        (777, seqs[0], true)
    );
    for (user_id, seq) in [(1, seqs[0]), (2, seqs[1])] {
        let inbox = stores.messages.sync(user_id, 0, 10).await.expect("sync");
        assert_eq!(inbox.len(), 1, "user {user_id} has it once");
        assert_eq!((inbox[0].message_id, inbox[0].seq), (777, seq));
        assert_eq!(inbox[0].content.as_ref(), b"hello");
    }
    // A third attempt changes nothing.
    logic
        .send_message(&origin(1, 10), &input(2, "c1", "hello"))
        .await
        .expect("again");
    assert_eq!(stores.messages.sync(2, 0, 10).await.expect("sync").len(), 1);
}

#[tokio::test]
async fn server_sends_of_two_users_do_not_share_client_msg_ids() {
    let (_, logic) = setup().await;
    let a = logic
        .send_message(&origin(1, 0), &input(3, "welcome", "from 1"))
        .await
        .expect("first");
    let b = logic
        .send_message(&origin(2, 0), &input(3, "welcome", "from 2"))
        .await
        .expect("second");
    assert!(!a.duplicate && !b.duplicate);
    assert_ne!(a.message_id, b.message_id);
    let out = logic
        .sync(3, &SyncInput { seq: 0, limit: 0 })
        .await
        .expect("sync");
    let texts: Vec<&[u8]> = out.messages.iter().map(|m| m.content.as_ref()).collect();
    assert_eq!(texts, vec![&b"from 1"[..], &b"from 2"[..]]);
}

#[tokio::test]
async fn content_and_id_limits() {
    let (_, logic) = setup().await;
    let big = SendMessageInput {
        content: Bytes::from(vec![0u8; 32 * 1024 + 1]),
        ..input(2, "big", "")
    };
    let e = logic
        .send_message(&origin(1, 10), &big)
        .await
        .expect_err("too big");
    assert_eq!(e.code, zhibo_proto::client::ErrorCode::InvalidArgument);
    let long_id = input(2, &"x".repeat(65), "x");
    let e = logic
        .send_message(&origin(1, 10), &long_id)
        .await
        .expect_err("long id");
    assert_eq!(e.code, zhibo_proto::client::ErrorCode::InvalidArgument);
}

#[tokio::test]
async fn a_resend_can_never_rewrite_what_was_stored() {
    let (stores, logic) = setup().await;
    let first = logic
        .send_message(&origin(1, 10), &input(2, "once", "original"))
        .await
        .expect("send");
    let again = logic
        .send_message(&origin(1, 10), &input(2, "once", "original"))
        .await
        .expect("same resend");
    assert_eq!(
        (again.message_id, again.duplicate),
        (first.message_id, true)
    );
    let e = logic
        .send_message(&origin(1, 10), &input(2, "once", "rewritten"))
        .await
        .expect_err("a different message under the same client_msg_id");
    assert_eq!(e.code, zhibo_proto::client::ErrorCode::InvalidArgument);
    for user_id in [1, 2] {
        let inbox = stores.messages.sync(user_id, 0, 10).await.expect("sync");
        assert_eq!(inbox.len(), 1);
        assert_eq!(
            inbox[0].content.as_ref(),
            b"original",
            "user {user_id} keeps the original"
        );
    }
}

/// Two pipelines created in the same millisecond of one process (as every pod is pid 1 on Kubernetes)
/// never mint the same message id: each leases its own node number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelines_started_together_never_share_message_ids() {
    let stores = Arc::new(EmbeddedBackend::temporary().expect("store")).stores();
    let bus: Arc<MemoryBus> = Arc::new(MemoryBus::new());
    let pipelines = [
        Arc::new(Logic::new(
            stores.clone(),
            bus.clone(),
            LogicConfig::default(),
        )),
        Arc::new(Logic::new(
            stores.clone(),
            bus.clone(),
            LogicConfig::default(),
        )),
    ];
    let mut tasks = Vec::new();
    for (i, logic) in pipelines.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in 0..3000 {
                let room = SendMessageInput {
                    receiver_type: ReceiverType::Room as i32,
                    receiver_id: 1,
                    client_msg_id: format!("{i}-{n}"),
                    content_type: 1,
                    content: Bytes::from_static(b"x"),
                };
                ids.push(
                    logic
                        .send_message(&origin(1, 10 + i as i64), &room)
                        .await
                        .expect("room send")
                        .message_id,
                );
            }
            ids
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    let mut distinct = all.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        all.len(),
        "{} duplicate ids",
        all.len() - distinct.len()
    );
}
