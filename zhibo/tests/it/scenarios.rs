//! Every scenario runs against the embedded cluster and the distributed one.

use std::time::Duration;

use bytes::Bytes;
use zhibo_loadtest::client::{Client, Transport};
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{
    ErrorCode, KickReason, Message, MessageAck, ReceiverType, SendMessageInput, SendMessageOutput,
    SyncInput, SyncOutput,
};

use crate::cluster::{flushdb, Cluster};
use zhibo_store::{Claim, ConversationKey, SendPlan};

/// Generous: only a failing test waits this long, and a cold Cassandra on a fresh CI machine is slow at first.
const WAIT: Duration = Duration::from_secs(15);

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

async fn send(
    c: &mut Client,
    receiver_type: ReceiverType,
    to: i64,
    id: &str,
    body: &str,
) -> SendMessageOutput {
    let reply = c
        .request(text(receiver_type, to, id, body), WAIT)
        .await
        .expect("reply");
    match reply.body {
        Some(Body::SendMessageOutput(o)) => o,
        other => panic!("expected SendMessageOutput for {id}, got {other:?}"),
    }
}

async fn send_err(c: &mut Client, receiver_type: ReceiverType, to: i64, id: &str) -> ErrorCode {
    let reply = c
        .request(text(receiver_type, to, id, "x"), WAIT)
        .await
        .expect("reply");
    match reply.body {
        Some(Body::Error(e)) => ErrorCode::try_from(e.code).expect("known code"),
        other => panic!("expected an Error for {id}, got {other:?}"),
    }
}

/// The next pushed Message, skipping nothing else silently.
async fn next_message(c: &mut Client) -> Message {
    loop {
        let p = c
            .recv(WAIT)
            .await
            .expect("a packet in time")
            .expect("connection open");
        match p.body {
            Some(Body::Message(m)) => return m,
            Some(Body::Heartbeat(_)) => continue,
            other => panic!("expected a Message, got {other:?}"),
        }
    }
}

async fn assert_quiet(c: &mut Client) {
    match c.recv(Duration::from_millis(300)).await {
        Err(_) => {}
        Ok(p) => panic!("expected nothing, got {p:?}"),
    }
}

async fn sync(c: &mut Client, seq: u64, limit: u32) -> SyncOutput {
    match c
        .request(Body::Sync(SyncInput { seq, limit }), WAIT)
        .await
        .expect("sync")
        .body
    {
        Some(Body::SyncOutput(o)) => o,
        other => panic!("expected SyncOutput, got {other:?}"),
    }
}

fn content(m: &Message) -> &str {
    std::str::from_utf8(&m.content).expect("utf-8")
}

/// Two users on each pair of transports exchange 1:1 messages; each side gets ACK and delivery.
async fn one_to_one_on_every_transport(cluster: &Cluster) {
    let transports = [Transport::Tcp, Transport::Ws, Transport::Quic];
    for (i, &ta) in transports.iter().enumerate() {
        let tb = transports[(i + 1) % 3];
        let alice = cluster.user("alice").await;
        let bob = cluster.user("bob").await;
        cluster.befriend(&alice, &bob).await;
        let mut a = cluster.connect(ta, 0, &alice).await;
        let mut b = cluster.connect(tb, 1, &bob).await;
        let out = send(&mut a, ReceiverType::User, bob.user_id, "m1", "hello bob").await;
        assert!(out.seq > 0 && out.message_id > 0 && !out.duplicate);
        let m = next_message(&mut b).await;
        assert_eq!(content(&m), "hello bob", "{ta:?} -> {tb:?}");
        // A recipient never learns the sender's device id (it names what a sign-out revokes).
        assert_eq!((m.sender_user_id, m.sender_device_id), (alice.user_id, 0));
        assert_eq!(m.message_id, out.message_id);
        assert!(m.seq > 0);
        let back = send(&mut b, ReceiverType::User, alice.user_id, "r1", "hi alice").await;
        let m = next_message(&mut a).await;
        assert_eq!(content(&m), "hi alice", "{tb:?} -> {ta:?}");
        assert_eq!(m.message_id, back.message_id);
        // The sender's own device gets the ACK, not a second copy.
        assert_quiet(&mut b).await;
    }
}

/// The largest content allowed (`logic.max_content`, 32 KiB) crosses every transport intact, both ways
/// and through sync (the WebSocket read buffer is 512 bytes: a frame's length is reserved up front); one
/// byte more is refused and the connection goes on.
async fn largest_message_on_every_transport(cluster: &Cluster) {
    let max = zhibo_logic::LogicConfig::default().max_content;
    for t in [Transport::Tcp, Transport::Ws, Transport::Quic] {
        let alice = cluster.user("alice").await;
        let bob = cluster.user("bob").await;
        cluster.befriend(&alice, &bob).await;
        let mut a = cluster.connect(t, 0, &alice).await;
        let mut b = cluster.connect(t, 1, &bob).await;
        let big: String = (0..max)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let out = send(&mut a, ReceiverType::User, bob.user_id, "big", &big).await;
        let m = next_message(&mut b).await;
        assert!(
            content(&m) == big,
            "{t:?}: the largest message arrived altered"
        );
        let back = send(&mut b, ReceiverType::User, alice.user_id, "big-back", &big).await;
        assert!(
            content(&next_message(&mut a).await) == big,
            "{t:?}: reply altered"
        );
        // A sync page is bounded by bytes (`logic.max_sync_bytes`): one such message per page.
        let mut synced = Vec::new();
        let mut after = 0;
        while synced.len() < 2 {
            let page = sync(&mut b, after, 10).await;
            assert!(
                !page.messages.is_empty(),
                "{t:?}: sync stopped at {synced:?}"
            );
            after = page.messages.last().map_or(after, |m| m.seq);
            synced.extend(page.messages);
        }
        assert!(
            synced.iter().all(|m| content(m) == big),
            "{t:?}: sync altered"
        );
        let ids: Vec<u64> = synced.iter().map(|m| m.message_id).collect();
        assert_eq!(ids, [out.message_id, back.message_id], "{t:?}");

        let reply = a
            .request(
                text(
                    ReceiverType::User,
                    bob.user_id,
                    "too-big",
                    &format!("{big}!"),
                ),
                WAIT,
            )
            .await
            .expect("reply to an oversized message");
        match reply.body {
            Some(Body::Error(e)) => assert_eq!(e.code, ErrorCode::InvalidArgument as i32, "{t:?}"),
            other => panic!("{t:?}: expected INVALID_ARGUMENT, got {other:?}"),
        }
        send(
            &mut a,
            ReceiverType::User,
            bob.user_id,
            "after",
            "still here",
        )
        .await;
        assert_eq!(content(&next_message(&mut b).await), "still here");
    }
}

/// A message to a group reaches every member on every gateway, and the sender's other device.
async fn group_fan_out_and_second_device(cluster: &Cluster) {
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    let carol = cluster.user("carol").await;
    let alice2 = cluster.second_device(&alice).await;
    let gid = cluster.group(&alice, &[&bob, &carol]).await;
    let mut a = cluster.connect(Transport::Tcp, 0, &alice).await;
    let mut a2 = cluster.connect(Transport::Quic, 1, &alice2).await;
    let mut b = cluster.connect(Transport::Ws, 1, &bob).await;
    let mut c = cluster.connect(Transport::Quic, 0, &carol).await;
    let out = send(&mut a, ReceiverType::Group, gid, "g1", "hello group").await;
    for (who, client) in [
        ("bob", &mut b),
        ("carol", &mut c),
        ("alice's 2nd device", &mut a2),
    ] {
        let m = next_message(client).await;
        assert_eq!(content(&m), "hello group", "{who}");
        assert_eq!(m.receiver_type, ReceiverType::Group as i32);
        assert_eq!(m.receiver_id, gid);
        assert_eq!(m.message_id, out.message_id);
    }
    // Alice's second device gets her copy with the seq of her own inbox.
    assert_quiet(&mut a).await;
    // 1:1 from the first device also reaches the second.
    cluster.befriend(&alice, &bob).await;
    let out = send(
        &mut a,
        ReceiverType::User,
        bob.user_id,
        "d1",
        "from device 1",
    )
    .await;
    let m = next_message(&mut a2).await;
    assert_eq!((content(&m), m.seq), ("from device 1", out.seq));
    assert_eq!(
        m.sender_device_id, alice.device_id,
        "the sender's own devices see which of them sent it"
    );
    let m = next_message(&mut b).await;
    assert_eq!((m.sender_user_id, m.sender_device_id), (alice.user_id, 0));
}

/// An offline device catches up by sync: exactly what it missed, in order, paged.
async fn offline_sync_no_gap_no_duplicate(cluster: &Cluster) {
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    cluster.befriend(&alice, &bob).await;
    let mut a = cluster.connect(Transport::Tcp, 0, &alice).await;
    let mut b = cluster.connect(Transport::Ws, 1, &bob).await;
    send(&mut a, ReceiverType::User, bob.user_id, "s0", "before").await;
    let seen = next_message(&mut b).await;
    b.send(Body::MessageAck(MessageAck { seq: seen.seq }))
        .await
        .expect("ack");
    b.close().await.ok();
    drop(b);
    for i in 1..=7 {
        send(
            &mut a,
            ReceiverType::User,
            bob.user_id,
            &format!("s{i}"),
            &format!("missed {i}"),
        )
        .await;
    }
    let mut b = cluster.connect(Transport::Quic, 0, &bob).await;
    let mut got = Vec::new();
    let mut after = seen.seq;
    loop {
        let page = sync(&mut b, after, 3).await;
        assert!(page.messages.len() <= 3);
        if let Some(last) = page.messages.last() {
            after = last.seq;
        }
        got.extend(page.messages);
        if !page.has_more {
            break;
        }
    }
    let texts: Vec<&str> = got.iter().map(content).collect();
    assert_eq!(
        texts,
        (1..=7).map(|i| format!("missed {i}")).collect::<Vec<_>>(),
        "exactly the missed ones"
    );
    assert!(
        got.windows(2).all(|w| w[0].seq < w[1].seq),
        "ordered by seq"
    );
    // From 0 a new device sees the whole history, the first message included.
    let all = sync(&mut b, 0, 100).await;
    assert_eq!(all.messages.len(), 8);
    assert!(!all.has_more);
}

/// Signing in the same device again, on any gateway, kicks the first connection.
async fn kick_on_relogin(cluster: &Cluster) {
    let alice = cluster.user("alice").await;
    let mut first = cluster.connect(Transport::Tcp, 0, &alice).await;
    let _second = cluster.connect(Transport::Ws, 1, &alice).await;
    let p = first
        .recv(WAIT)
        .await
        .expect("a packet")
        .expect("kick before close");
    match p.body {
        Some(Body::Kick(k)) => assert_eq!(k.reason, KickReason::SignedInElsewhere as i32),
        other => panic!("expected Kick, got {other:?}"),
    }
    assert!(
        first.recv(WAIT).await.expect("closed").is_none(),
        "kicked connection is closed"
    );
}

/// A resend with the same client_msg_id returns the first result and stores nothing twice.
async fn duplicate_client_msg_id_stored_once(cluster: &Cluster) {
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    cluster.befriend(&alice, &bob).await;
    let mut a = cluster.connect(Transport::Tcp, 0, &alice).await;
    let first = send(&mut a, ReceiverType::User, bob.user_id, "same", "once").await;
    let again = send(&mut a, ReceiverType::User, bob.user_id, "same", "once").await;
    assert!(again.duplicate);
    assert_eq!((again.message_id, again.seq), (first.message_id, first.seq));
    let mut b = cluster.connect(Transport::Ws, 1, &bob).await;
    let all = sync(&mut b, 0, 100).await;
    assert_eq!(all.messages.len(), 1, "stored once in bob's inbox");
    assert_eq!(
        sync(&mut a, 0, 100).await.messages.len(),
        1,
        "stored once in alice's inbox"
    );
}

/// A send marked `first_attempt` (the fast path: no dedup read, and in the distributed mode the plan
/// claimed in Redis and written without a compare-and-set) is still stored once: a resend (unmarked,
/// or wrongly marked) within the claim window gets its plan; attempts of one message racing on two
/// workers agree on one plan; in the distributed mode a resend after Redis lost the claims is answered
/// by the database's insert-if-absent, which finds the plan the first attempt wrote without one.
async fn first_attempts_are_stored_once(cluster: &Cluster) {
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    cluster.befriend(&alice, &bob).await;
    let mut a = cluster.connect(Transport::Tcp, 0, &alice).await;
    let first_attempt = |id: &str, body: &str| match text(ReceiverType::User, bob.user_id, id, body)
    {
        Body::SendMessage(input) => Body::SendMessage(SendMessageInput {
            first_attempt: true,
            ..input
        }),
        _ => unreachable!(),
    };
    let answer = |p: zhibo_proto::client::Packet| match p.body {
        Some(Body::SendMessageOutput(o)) => o,
        other => panic!("expected SendMessageOutput, got {other:?}"),
    };
    let first = answer(
        a.request(first_attempt("fa-1", "one"), WAIT)
            .await
            .expect("first attempt"),
    );
    assert!(!first.duplicate, "{first:?}");
    if let Some(redis) = cluster.redis_url.as_deref() {
        // The claim holds the plan (65 bytes for two recipients), not the marker a resend claims with.
        let hex: String = "fa-1".bytes().map(|b| format!("{b:02x}")).collect();
        let key = format!("zhibo:claim:{}:{hex}", alice.device_id);
        assert_eq!(
            crate::cluster::redis_command(redis, &["GET", &key]).await,
            "$65\r\n",
            "the first attempt's claim holds its plan"
        );
    }
    let resend = send(&mut a, ReceiverType::User, bob.user_id, "fa-1", "one").await;
    let lying = answer(
        a.request(first_attempt("fa-1", "one"), WAIT)
            .await
            .expect("a resend marked first"),
    );
    for again in [&resend, &lying] {
        assert!(again.duplicate, "{again:?}");
        assert_eq!((again.message_id, again.seq), (first.message_id, first.seq));
    }
    // One marked attempt and three resends of another message, pipelined: the gateway hands them to
    // the workers at once.
    let mut ids = vec![a.send(first_attempt("fa-2", "two")).await.expect("send")];
    for _ in 0..3 {
        ids.push(
            a.send(text(ReceiverType::User, bob.user_id, "fa-2", "two"))
                .await
                .expect("send"),
        );
    }
    let mut answers = Vec::new();
    while answers.len() < ids.len() {
        let p = a
            .recv(WAIT)
            .await
            .expect("an answer in time")
            .expect("connection open");
        if ids.contains(&p.request_id) {
            answers.push(answer(p));
        }
    }
    assert!(
        answers
            .iter()
            .all(|o| (o.message_id, o.seq) == (answers[0].message_id, answers[0].seq)),
        "racing attempts agree on one plan: {answers:?}"
    );
    assert_eq!(
        answers.iter().filter(|o| !o.duplicate).count(),
        1,
        "one attempt stored it: {answers:?}"
    );
    let mut expected = vec!["one", "two"];
    if let Some(redis) = cluster.redis_url.as_deref() {
        // A first attempt that claimed its plan and died before writing anything: only the claim
        // knows its plan. A resend (unmarked, then marked) finishes that plan; once the claim is
        // gone (expired, lost), a resend still finds it, because finishing it wrote it to the database.
        let seq = &cluster.stores.seq;
        let zhibo_store::ConversationSeqs {
            inbox: seqs,
            conv_seq,
            ..
        } = seq
            .next_in_conversation(
                &[alice.user_id, bob.user_id],
                ConversationKey::direct(alice.user_id, bob.user_id),
            )
            .await
            .expect("seqs");
        let orphan = SendPlan {
            message_id: 4_000_000_000_000_000_000
                + zhibo_store::ids::now_ms().unsigned_abs() % 1_000_000,
            seq: seqs[0],
            server_time_ms: zhibo_store::ids::now_ms(),
            recipients: vec![(alice.user_id, seqs[0]), (bob.user_id, seqs[1])],
            conv_seq,
        };
        assert_eq!(
            seq.claim_send(alice.device_id, "fa-4", Some(&orphan))
                .await
                .expect("claim"),
            Claim::Free
        );
        let finished = send(&mut a, ReceiverType::User, bob.user_id, "fa-4", "four").await;
        let marked = answer(
            a.request(first_attempt("fa-4", "four"), WAIT)
                .await
                .expect("a marked resend"),
        );
        let hex: String = "fa-4".bytes().map(|b| format!("{b:02x}")).collect();
        let key = format!("zhibo:claim:{}:{hex}", alice.device_id);
        assert_eq!(crate::cluster::redis_del(redis, &key).await, 1);
        let late = send(&mut a, ReceiverType::User, bob.user_id, "fa-4", "four").await;
        for o in [&finished, &marked, &late] {
            assert_eq!(
                (o.message_id, o.seq),
                (orphan.message_id, orphan.seq),
                "the claimed plan, and only it: {o:?}"
            );
        }
        expected.push("four");
        flushdb(redis).await;
        let late = send(&mut a, ReceiverType::User, bob.user_id, "fa-1", "one").await;
        assert!(late.duplicate, "{late:?}");
        assert_eq!((late.message_id, late.seq), (first.message_id, first.seq));
        let after = answer(
            a.request(first_attempt("fa-3", "three"), WAIT)
                .await
                .expect("a first attempt after the flush"),
        );
        assert!(!after.duplicate && after.seq > orphan.seq, "{after:?}");
        expected.push("three");
    }
    let mut b = cluster.connect(Transport::Ws, 1, &bob).await;
    let all = sync(&mut b, 0, 100).await;
    let texts: Vec<&str> = all.messages.iter().map(content).collect();
    assert_eq!(texts, expected, "each message stored once in bob's inbox");
    assert_eq!(
        sync(&mut a, 0, 100).await.messages.len(),
        expected.len(),
        "and once in alice's"
    );
}

/// Refusals: stranger, non-member, unknown user, bad argument — each an Error packet; the
/// connection goes on working.
async fn refusals_keep_the_connection(cluster: &Cluster) {
    let alice = cluster.user("alice").await;
    let stranger = cluster.user("stranger").await;
    let bob = cluster.user("bob").await;
    let gid = cluster.group(&bob, &[]).await;
    let mut a = cluster.connect(Transport::Quic, 0, &alice).await;
    assert_eq!(
        send_err(&mut a, ReceiverType::User, stranger.user_id, "x1").await,
        ErrorCode::NotFriends
    );
    assert_eq!(
        send_err(&mut a, ReceiverType::Group, gid, "x2").await,
        ErrorCode::NotGroupMember
    );
    assert_eq!(
        send_err(&mut a, ReceiverType::Group, 1, "x3").await,
        ErrorCode::NotFound
    );
    assert_eq!(
        send_err(&mut a, ReceiverType::User, 1, "x4").await,
        ErrorCode::NotFound
    );
    assert_eq!(
        send_err(&mut a, ReceiverType::Unspecified, bob.user_id, "x5").await,
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        send_err(&mut a, ReceiverType::User, bob.user_id, "").await,
        ErrorCode::InvalidArgument
    );
    // Still usable: a message to oneself works (notes to self).
    let out = send(&mut a, ReceiverType::User, alice.user_id, "self", "note").await;
    assert!(out.seq > 0);
}

/// A user-api server-side send takes the same path: stored, delivered live to every device, visible to
/// sync, deduplicated by client_msg_id.
async fn server_side_send(cluster: &Cluster) {
    let bob = cluster.user("bob").await;
    let system = cluster.user("system").await;
    let mut b = cluster.connect(Transport::Ws, 1, &bob).await;
    let body = serde_json::json!({"from_user_id": system.user_id, "receiver_type": "user",
        "receiver_id": bob.user_id, "client_msg_id": "srv-1", "content_type": 1, "content": "d2VsY29tZQ=="}); // base64 of "welcome"
    let v = cluster
        .api
        .post_admin("/v1/admin/messages", crate::cluster::ADMIN, body.clone())
        .await
        .expect("send");
    let m = next_message(&mut b).await;
    assert_eq!(content(&m), "welcome");
    assert_eq!(m.sender_user_id, system.user_id);
    assert_eq!(
        m.message_id.to_string(),
        v["message_id"].as_str().expect("message_id string")
    );
    let again = cluster
        .api
        .post_admin("/v1/admin/messages", crate::cluster::ADMIN, body)
        .await
        .expect("resend");
    assert_eq!(again["duplicate"], serde_json::Value::Bool(true));
    assert_eq!(sync(&mut b, 0, 10).await.messages.len(), 1);
    // The wrong admin secret is refused.
    let refused = cluster
        .api
        .post_admin("/v1/admin/messages", "wrong", serde_json::json!({}))
        .await;
    assert!(refused.is_err());
}

/// Signing out (user-api) closes the device's live connections with Kick{SIGNED_OUT}, and its token no
/// longer signs in.
async fn sign_out_closes_live_connections(cluster: &Cluster) {
    let alice = cluster.user("alice").await;
    let mut a = cluster.connect(Transport::Quic, 1, &alice).await;
    let http = reqwest::Client::new();
    let status = http
        .delete(format!("{}/v1/sessions", cluster.api_base))
        .bearer_auth(&alice.token)
        .send()
        .await
        .expect("sign out")
        .status();
    assert_eq!(status, 204);
    let p = a
        .recv(WAIT)
        .await
        .expect("a packet")
        .expect("kick before close");
    match p.body {
        Some(Body::Kick(k)) => assert_eq!(k.reason, KickReason::SignedOut as i32),
        other => panic!("expected Kick, got {other:?}"),
    }
    assert!(a.recv(WAIT).await.expect("closed").is_none());
    let refused = zhibo_loadtest::client::Client::connect(
        Transport::Tcp,
        &cluster.gw(0).of(Transport::Tcp),
        &alice,
    )
    .await;
    let err = refused.expect_err("revoked token");
    assert!(err.to_string().contains("revoked"), "{err}");
}

/// The 1:1 send path caches "these two are friends" (authz.rs); ending the friendship reaches every
/// worker's cache through the authz event, long before the cache's 60 s age limit: once a send is
/// refused, every later one is, whichever worker takes it. A new friendship is seen by the very next
/// send (refusals are never cached).
async fn unfriending_reaches_every_workers_cache(cluster: &Cluster) {
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    cluster.befriend(&alice, &bob).await;
    let mut a = cluster.connect(Transport::Tcp, 0, &alice).await;
    // Warm the caches: with two workers, each takes some of these.
    for i in 0..12 {
        send(
            &mut a,
            ReceiverType::User,
            bob.user_id,
            &format!("w{i}"),
            "hi",
        )
        .await;
    }
    let (status, body) = crate::cluster::http(
        &cluster.api_base,
        reqwest::Method::DELETE,
        &format!("/v1/friends/{}", alice.user_id),
        ("authorization", &format!("Bearer {}", bob.token)),
        serde_json::json!(null),
    )
    .await;
    assert_eq!(status, 204, "{body}");
    // The event is asynchronous (each worker gets it a moment after the 204): within moments, not
    // after the cache's 60 s, every send is refused, whichever worker takes it — 12 in a row.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let (mut n, mut refused_in_a_row) = (0, 0);
    while refused_in_a_row < 12 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "sends still accepted 5 s after the friendship ended"
        );
        n += 1;
        let reply = a
            .request(
                text(ReceiverType::User, bob.user_id, &format!("u{n}"), "x"),
                WAIT,
            )
            .await
            .expect("reply");
        match reply.body {
            Some(Body::Error(e)) if e.code == ErrorCode::NotFriends as i32 => refused_in_a_row += 1,
            Some(Body::SendMessageOutput(_)) => refused_in_a_row = 0,
            other => panic!("expected an ACK or NOT_FRIENDS, got {other:?}"),
        }
    }
    // A resend of a message stored while they were friends is answered with its stored plan, not
    // refused — also when its claim is gone (expired, or lost with Redis), so the send path found no
    // hint that it is a resend before the refusal.
    if let Some(redis) = cluster.redis_url.as_deref() {
        // 1, or 0 when a concurrent test flushed the shared Redis meanwhile: gone either way.
        let key = zhibo_store::redis_seq::send_claim_key(alice.device_id, "w0");
        crate::cluster::redis_del(redis, &key).await;
    }
    let again = send(&mut a, ReceiverType::User, bob.user_id, "w0", "hi").await;
    assert!(again.duplicate, "{again:?}");
    cluster.befriend(&bob, &alice).await;
    send(&mut a, ReceiverType::User, bob.user_id, "again", "back").await;
}

/// A group's member list is kept per membership version (docs/ARCHITECTURE.md "Send, persistence and
/// seq", step 2): a member added through the API gets the very next message, whichever worker takes
/// it, and a member removed neither gets the next one nor may send — no waiting for a cache to age.
async fn group_membership_changes_reach_the_next_send(cluster: &Cluster) {
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    let carol = cluster.user("carol").await;
    let gid = cluster.group(&alice, &[&bob]).await;
    let mut a = cluster.connect(Transport::Tcp, 0, &alice).await;
    let mut b = cluster.connect(Transport::Ws, 1, &bob).await;
    // Warm the member lists: with two workers, each takes some of these.
    for i in 0..8 {
        send(&mut a, ReceiverType::Group, gid, &format!("w{i}"), "warm").await;
        assert_eq!(content(&next_message(&mut b).await), "warm");
    }
    let api = |method, path: String, token: &str| {
        let auth = format!("Bearer {token}");
        let base = cluster.api_base.clone();
        async move {
            crate::cluster::http(
                &base,
                method,
                &path,
                ("authorization", &auth),
                serde_json::json!(null),
            )
            .await
        }
    };
    // Carol is added (invited: not alice's friend) and accepts; the next sends all reach her.
    let (status, body) = crate::cluster::http(
        &cluster.api_base,
        reqwest::Method::POST,
        &format!("/v1/groups/{gid}/members"),
        ("authorization", &format!("Bearer {}", alice.token)),
        serde_json::json!({"user_ids": [carol.user_id]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = crate::cluster::http(
        &cluster.api_base,
        reqwest::Method::POST,
        &format!("/v1/groups/invitations/{gid}/accept"),
        ("authorization", &format!("Bearer {}", carol.token)),
        serde_json::json!({}),
    )
    .await;
    assert!((200..300).contains(&status), "{status} {body}");
    let mut c = cluster.connect(Transport::Tcp, 1, &carol).await;
    let mut bob_seq = 0;
    for i in 0..8 {
        let text = format!("after join {i}");
        send(&mut a, ReceiverType::Group, gid, &format!("j{i}"), &text).await;
        assert_eq!(content(&next_message(&mut c).await), text, "carol");
        let m = next_message(&mut b).await;
        assert_eq!(content(&m), text, "bob");
        bob_seq = m.seq;
    }
    // Bob is removed: refused at once, and not a recipient of the next sends.
    let (status, body) = api(
        reqwest::Method::DELETE,
        format!("/v1/groups/{gid}/members/{}", bob.user_id),
        &alice.token,
    )
    .await;
    assert_eq!(status, 204, "{body}");
    for i in 0..8 {
        assert_eq!(
            send_err(&mut b, ReceiverType::Group, gid, &format!("b{i}")).await,
            ErrorCode::NotGroupMember
        );
        let text = format!("after removal {i}");
        send(&mut a, ReceiverType::Group, gid, &format!("r{i}"), &text).await;
        assert_eq!(content(&next_message(&mut c).await), text, "carol");
    }
    let later = sync(&mut b, bob_seq, 100).await;
    assert!(
        later
            .messages
            .iter()
            .all(|m| !content(m).starts_with("after removal")),
        "bob got a message sent after his removal: {:?}",
        later.messages
    );
}

both_modes!(
    crate::cluster::Cluster,
    2,
    group_membership_changes_reach_the_next_send,
    one_to_one_on_every_transport,
    largest_message_on_every_transport,
    group_fan_out_and_second_device,
    offline_sync_no_gap_no_duplicate,
    kick_on_relogin,
    duplicate_client_msg_id_stored_once,
    first_attempts_are_stored_once,
    refusals_keep_the_connection,
    server_side_send,
    sign_out_closes_live_connections,
    unfriending_reaches_every_workers_cache,
);

/// Redis loses every counter mid-run (FLUSHDB): seqs keep strictly increasing and no stored message is
/// overwritten, because allocation recovers from the store's max seq. The sends' claims are lost too:
/// a resend of a message from before the flush is claimed afresh, skips the dedup read, and is still
/// answered with the stored plan (the plan's insert-if-absent), never stored twice.
async fn redis_flush_mid_run(cluster: &Cluster) {
    let redis = cluster
        .redis_url
        .as_deref()
        .expect("distributed cluster has Redis");
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    cluster.befriend(&alice, &bob).await;
    let mut a = cluster.connect(Transport::Tcp, 0, &alice).await;
    let mut acked = Vec::new();
    let mut f2 = None;
    for i in 0..10 {
        if i == 5 {
            flushdb(redis).await;
        }
        let out = send(
            &mut a,
            ReceiverType::User,
            bob.user_id,
            &format!("f{i}"),
            &format!("flush {i}"),
        )
        .await;
        if i == 2 {
            f2 = Some(out.clone());
        }
        acked.push(out.seq);
    }
    assert!(
        acked.windows(2).all(|w| w[0] < w[1]),
        "sender seqs strictly increase: {acked:?}"
    );
    let f2 = f2.expect("f2 sent");
    let again = send(&mut a, ReceiverType::User, bob.user_id, "f2", "flush 2").await;
    assert!(
        again.duplicate,
        "a resend after the flush is answered as one"
    );
    assert_eq!(
        (again.message_id, again.seq),
        (f2.message_id, f2.seq),
        "with the stored plan"
    );
    let mut b = cluster.connect(Transport::Ws, 1, &bob).await;
    let all = sync(&mut b, 0, 100).await;
    let texts: Vec<&str> = all.messages.iter().map(content).collect();
    assert_eq!(
        texts,
        (0..10).map(|i| format!("flush {i}")).collect::<Vec<_>>(),
        "nothing lost or overwritten"
    );
    assert!(all.messages.windows(2).all(|w| w[0].seq < w[1].seq));
}

/// Redis loses the gateways' presence entries (which route deliveries) while bob is connected: live
/// delivery goes on without bob reconnecting (routed to every gateway while presence is unknown), the
/// gateway writes bob's entry again by itself within seconds (long before its 20 s full refresh), and
/// bob's sync returns every message once, in order.
async fn live_delivery_resumes_after_presence_is_lost(cluster: &Cluster) {
    let redis = cluster
        .redis_url
        .as_deref()
        .expect("distributed cluster has Redis");
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    cluster.befriend(&alice, &bob).await;
    let mut a = cluster.connect(Transport::Tcp, 0, &alice).await;
    let mut b = cluster.connect(Transport::Tcp, 1, &bob).await;
    send(&mut a, ReceiverType::User, bob.user_id, "p0", "before").await;
    assert_eq!(content(&next_message(&mut b).await), "before");
    flushdb(redis).await;
    // One message a quarter second until one arrives live; bounded well under the full refresh.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut sent = 1;
    let live = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no live delivery within 10 s of losing presence ({sent} sent)"
        );
        let out = send(
            &mut a,
            ReceiverType::User,
            bob.user_id,
            &format!("p{sent}"),
            &format!("after {sent}"),
        )
        .await;
        sent += 1;
        if let Ok(Some(p)) = b.recv(Duration::from_millis(250)).await {
            match p.body {
                Some(Body::Message(m)) => break (m, out.seq),
                Some(Body::Heartbeat(_)) => {}
                other => panic!("expected a Message, got {other:?}"),
            }
        }
    };
    assert!(content(&live.0).starts_with("after "), "{:?}", live.0);
    // What made it live may be the fallback (every gateway, while presence is unknown): the gateway
    // must also have written bob's entry again, by itself (its probe), for routing to work after.
    let key = format!(
        "{}:presence:{}",
        crate::cluster::subject_prefix(),
        bob.user_id
    );
    crate::cluster::eventually("bob's presence entry written again", WAIT, || async {
        let exists = crate::cluster::redis_command(redis, &["EXISTS", &key]).await;
        (exists == ":1\r\n").then_some(())
    })
    .await;
    let all = sync(&mut b, 0, 100).await;
    let texts: Vec<&str> = all.messages.iter().map(content).collect();
    let expected: Vec<String> = std::iter::once("before".to_owned())
        .chain((1..sent).map(|i| format!("after {i}")))
        .collect();
    assert_eq!(texts, expected, "every message stored once, in order");
}

mod distributed_only {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn live_delivery_resumes_after_presence_is_lost() {
        let cluster = crate::cluster::Cluster::distributed().await;
        super::live_delivery_resumes_after_presence_is_lost(&cluster).await;
        cluster.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_flush_mid_run() {
        let cluster = crate::cluster::Cluster::distributed().await;
        super::redis_flush_mid_run(&cluster).await;
        cluster.stop().await;
    }
}
