//! The pipeline on the embedded store and the in-process bus: crash recovery and dedup keys.

use std::sync::Arc;

use bytes::Bytes;
use zhibo_bus::memory::MemoryBus;
use zhibo_logic::{Logic, LogicConfig};
use zhibo_proto::bus::Origin;
use zhibo_proto::client::{ReceiverType, SendMessageInput, SyncInput};
use zhibo_store::embedded::EmbeddedBackend;
use zhibo_store::presence::MemoryPresence;
use zhibo_store::{Profile, SendPlan, Stores, User};

mod claims;
mod groups;
mod snapshots;

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
    let logic = Logic::new(
        stores.clone(),
        Arc::new(MemoryBus::new()),
        Arc::new(MemoryPresence::new()),
        config,
    );
    (stores, logic)
}

fn input(to: i64, id: &str, text: &str) -> SendMessageInput {
    SendMessageInput {
        receiver_type: ReceiverType::User as i32,
        receiver_id: to,
        client_msg_id: id.into(),
        content_type: 1,
        content: Bytes::from(text.to_owned()),
        ..Default::default()
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
    let plan = SendPlan {
        message_id: 777,
        seq: seqs[0],
        server_time_ms: 5,
        recipients: vec![(1, seqs[0]), (2, seqs[1])],
        conv_seq: 0,
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

/// Negative content types are zhibo's (tombstones -10 / -11, room notices): no device and no
/// server-side send may store one, 1:1 or group, or it would pass for a recall on the recipients'
/// screens.
#[tokio::test]
async fn negative_content_types_are_refused_and_nothing_is_stored() {
    let (stores, logic) = setup().await;
    for (n, (content_type, origin)) in [
        (-10, origin(1, 10)),
        (-11, origin(1, 10)),
        (-1, origin(1, 0)),
    ]
    .into_iter()
    .enumerate()
    {
        let fake = SendMessageInput {
            content_type,
            ..input(2, &format!("fake-{n}"), "")
        };
        let e = logic
            .send_message(&origin, &fake)
            .await
            .expect_err("a reserved content type");
        assert_eq!(
            e.code,
            zhibo_proto::client::ErrorCode::InvalidArgument,
            "content_type {content_type}"
        );
    }
    let group = SendMessageInput {
        receiver_type: ReceiverType::Group as i32,
        receiver_id: 777,
        content_type: -10,
        ..input(2, "fake-group", "")
    };
    let e = logic
        .send_message(&origin(1, 10), &group)
        .await
        .expect_err("a reserved content type to a group");
    assert_eq!(e.code, zhibo_proto::client::ErrorCode::InvalidArgument);
    for user_id in [1, 2] {
        assert!(
            stores
                .messages
                .sync(user_id, 0, 10)
                .await
                .expect("sync")
                .is_empty(),
            "user {user_id} got a refused message"
        );
    }
    // Zero and positive types are the app's.
    let ok = SendMessageInput {
        content_type: 0,
        ..input(2, "plain", "hi")
    };
    logic
        .send_message(&origin(1, 10), &ok)
        .await
        .expect("type 0");
}

/// An unknown group is NOT_FOUND and says so (not "you are not a member").
#[tokio::test]
async fn a_send_to_an_unknown_group_says_no_such_group() {
    let (_, logic) = setup().await;
    let to_nowhere = SendMessageInput {
        receiver_type: ReceiverType::Group as i32,
        receiver_id: 31_337,
        ..input(0, "nowhere", "hi")
    };
    let e = logic
        .send_message(&origin(1, 10), &to_nowhere)
        .await
        .expect_err("unknown group");
    assert_eq!(
        (e.code, e.message.as_str()),
        (zhibo_proto::client::ErrorCode::NotFound, "no such group")
    );
}

/// A receiver id of 0 or less is a bad argument, not an unknown user or group; so is a readers
/// request for group 0 or less, or for conv_seq 0.
#[tokio::test]
async fn ids_of_zero_or_less_are_invalid_arguments() {
    let (stores, logic) = setup().await;
    for receiver_type in [ReceiverType::User, ReceiverType::Group] {
        for receiver_id in [0, -1] {
            let bad = SendMessageInput {
                receiver_type: receiver_type as i32,
                receiver_id,
                ..input(0, &format!("bad-{receiver_id}"), "hi")
            };
            let e = logic
                .send_message(&origin(1, 10), &bad)
                .await
                .expect_err("a receiver id <= 0");
            assert_eq!(
                e.code,
                zhibo_proto::client::ErrorCode::InvalidArgument,
                "{receiver_type:?} {receiver_id}: {e:?}"
            );
        }
    }
    assert!(stores
        .messages
        .sync(1, 0, 10)
        .await
        .expect("sync")
        .is_empty());
    for (group_id, conv_seq) in [(0, 1), (-1, 1), (7, 0)] {
        let e = logic
            .group_readers(
                1,
                &zhibo_proto::client::GroupReadersInput { group_id, conv_seq },
            )
            .await
            .expect_err("a bad readers request");
        assert_eq!(
            e.code,
            zhibo_proto::client::ErrorCode::InvalidArgument,
            "group {group_id}, conv_seq {conv_seq}"
        );
    }
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
            Arc::new(MemoryPresence::new()),
            LogicConfig::default(),
        )),
        Arc::new(Logic::new(
            stores.clone(),
            bus.clone(),
            Arc::new(MemoryPresence::new()),
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
                    ..Default::default()
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

/// A message store whose `sync` finds undecodable data and whose `ack` cannot reach the backend; the
/// rest is the real embedded store.
struct FailingInbox {
    real: Arc<dyn zhibo_store::MessageStore>,
}

#[async_trait::async_trait]
impl zhibo_store::MessageStore for FailingInbox {
    async fn append(
        &self,
        user_id: i64,
        m: &zhibo_proto::client::Message,
    ) -> zhibo_store::Result<()> {
        self.real.append(user_id, m).await
    }
    async fn append_many(
        &self,
        entries: &[(i64, zhibo_proto::client::Message)],
    ) -> zhibo_store::Result<()> {
        self.real.append_many(entries).await
    }
    async fn sync(
        &self,
        _user_id: i64,
        _after_seq: u64,
        _limit: usize,
    ) -> zhibo_store::Result<Vec<zhibo_proto::client::Message>> {
        Err(zhibo_store::Error::new(
            zhibo_store::ErrorKind::Corrupt,
            "inbox message: invalid wire type",
        ))
    }
    async fn max_seq(&self, user_id: i64) -> zhibo_store::Result<u64> {
        self.real.max_seq(user_id).await
    }
    async fn get_dedup(
        &self,
        device_id: i64,
        client_msg_id: &str,
    ) -> zhibo_store::Result<Option<SendPlan>> {
        self.real.get_dedup(device_id, client_msg_id).await
    }
    async fn put_dedup_if_absent(
        &self,
        device_id: i64,
        client_msg_id: &str,
        result: &SendPlan,
    ) -> zhibo_store::Result<Option<SendPlan>> {
        self.real
            .put_dedup_if_absent(device_id, client_msg_id, result)
            .await
    }
    async fn ack(&self, _user_id: i64, _device_id: i64, _seq: u64) -> zhibo_store::Result<()> {
        Err(zhibo_store::Error::unavailable("connection refused"))
    }
    async fn acked(&self, user_id: i64, device_id: i64) -> zhibo_store::Result<u64> {
        self.real.acked(user_id, device_id).await
    }
}

/// Hands `body` to the pipeline as a command from `from` and returns the Error packet it answers.
async fn answer(
    logic: &Logic,
    replies: &mut zhibo_bus::Subscription,
    from: &Origin,
    body: zhibo_proto::client::packet::Body,
    rid: u64,
) -> zhibo_proto::client::Error {
    use prost::Message as _;
    use zhibo_proto::bus::{Command, Delivery};
    use zhibo_proto::client::packet::Body;
    use zhibo_proto::client::Packet;
    logic
        .handle(Command {
            origin: Some(from.clone()),
            packet: Some(Packet::new(rid, body)),
        })
        .await;
    let m = tokio::time::timeout(std::time::Duration::from_secs(5), replies.next())
        .await
        .expect("a reply")
        .expect("bus open");
    let d = Delivery::decode(m.payload).expect("delivery");
    assert_eq!(d.conn_id, from.conn_id);
    let p = d.packets.into_iter().next().expect("a packet");
    assert_eq!(p.request_id, rid);
    match p.body {
        Some(Body::Error(e)) => e,
        other => panic!("expected an Error, got {other:?}"),
    }
}

/// What the client sees for a store failure depends on what is true of it: corrupt data during a sync
/// is INTERNAL (not retryable), an unreachable store during an ack is UNAVAILABLE with "retry the ack".
#[tokio::test]
async fn store_failures_reach_the_client_with_a_code_that_says_what_is_true() {
    use zhibo_bus::{Bus as _, Subject};
    use zhibo_proto::client::packet::Body;
    use zhibo_proto::client::{ErrorCode, MessageAck};

    let mut stores = Arc::new(EmbeddedBackend::temporary().expect("store")).stores();
    stores.messages = Arc::new(FailingInbox {
        real: stores.messages.clone(),
    });
    let bus = Arc::new(MemoryBus::new());
    let logic = Logic::new(
        stores,
        bus.clone(),
        Arc::new(MemoryPresence::new()),
        LogicConfig::default(),
    );
    let mut replies = bus
        .subscribe(&Subject::gateway("gw-test"))
        .await
        .expect("subscribe");
    let from = Origin {
        user_id: 1,
        device_id: 2,
        gateway_id: "gw-test".into(),
        conn_id: 7,
    };
    let sync = answer(
        &logic,
        &mut replies,
        &from,
        Body::Sync(SyncInput { seq: 0, limit: 10 }),
        1,
    )
    .await;
    assert_eq!(sync.code, ErrorCode::Internal as i32, "{sync:?}");
    assert!(
        !sync.message.contains("wire type"),
        "no internals: {sync:?}"
    );
    let ack = answer(
        &logic,
        &mut replies,
        &from,
        Body::MessageAck(MessageAck { seq: 3 }),
        2,
    )
    .await;
    assert_eq!(ack.code, ErrorCode::Unavailable as i32, "{ack:?}");
    assert!(ack.message.contains("retry the ack"), "{ack:?}");
    assert!(!ack.message.contains("client_msg_id"), "{ack:?}");
}

/// Presence that cannot be read (Redis down) but records writes.
struct Unreadable;

#[async_trait::async_trait]
impl zhibo_store::Presence for Unreadable {
    async fn connected(&self, _: &str, _: i64) -> zhibo_store::Result<()> {
        Ok(())
    }
    fn disconnected(&self, _: &str, _: i64) {}
    async fn gateways(&self, _: &[i64]) -> zhibo_store::Result<Vec<Option<Vec<String>>>> {
        Err(zhibo_store::Error::new(
            zhibo_store::ErrorKind::Unavailable,
            "redis down (test)",
        ))
    }
    fn watch(&self, _: zhibo_store::PresenceListener) {}
}

/// Deliveries are routed by presence: to the gateways it names for each recipient, and to every
/// gateway (`<prefix>.users`) when it cannot be read, so a Redis outage never stops live delivery.
#[tokio::test]
async fn deliveries_follow_presence_and_go_everywhere_when_it_is_unreadable() {
    use prost::Message as _;
    use zhibo_bus::{Bus as _, Subject};
    use zhibo_proto::bus::{user_event, UserEvent};
    use zhibo_store::Presence as _;

    /// The user and the message text of a routed delivery.
    fn delivered(m: Option<zhibo_bus::BusMessage>) -> (i64, String) {
        let event = UserEvent::decode(m.expect("an event").payload).expect("decode");
        match event.event {
            Some(user_event::Event::Delivery(d)) => match &d.packets[0].body {
                Some(zhibo_proto::client::packet::Body::Message(m)) => (
                    event.user_id,
                    String::from_utf8_lossy(&m.content).into_owned(),
                ),
                other => panic!("expected a message, got {other:?}"),
            },
            other => panic!("expected a delivery, got {other:?}"),
        }
    }

    let stores = Arc::new(EmbeddedBackend::temporary().expect("store")).stores();
    for id in [1, 2, 3] {
        stores.users.insert_user(&user(id)).await.expect("user");
    }
    let config = LogicConfig {
        allow_strangers: true,
        node_id: Some(512),
        ..LogicConfig::default()
    };
    let bus = Arc::new(MemoryBus::new());
    let mut gw_a = bus
        .subscribe(&Subject::gateway_users("gw-a"))
        .await
        .expect("sub");
    let mut everywhere = bus
        .subscribe(&Subject::all_gateways_users())
        .await
        .expect("sub");
    let presence = Arc::new(MemoryPresence::new());
    presence.connected("gw-a", 2).await.expect("write");
    let routed = Logic::new(stores.clone(), bus.clone(), presence, config.clone());
    routed
        .send_message(&origin(1, 10), &input(2, "r1", "to gw-a"))
        .await
        .expect("send");
    // Only user 2 is online (on gw-a): the sender's own copy goes nowhere.
    assert_eq!(delivered(gw_a.next().await), (2, "to gw-a".to_owned()));

    let blind = Logic::new(
        stores.clone(),
        bus.clone(),
        Arc::new(Unreadable),
        LogicConfig {
            node_id: Some(513),
            ..config
        },
    );
    blind
        .send_message(&origin(1, 10), &input(3, "r2", "everywhere"))
        .await
        .expect("a send goes on while presence is unreadable");
    // Both copies (the recipient's and the sender's, for the sender's other devices) go to every
    // gateway.
    let mut got = vec![
        delivered(everywhere.next().await),
        delivered(everywhere.next().await),
    ];
    got.sort();
    assert_eq!(
        got,
        [(1, "everywhere".to_owned()), (3, "everywhere".to_owned())]
    );
}
