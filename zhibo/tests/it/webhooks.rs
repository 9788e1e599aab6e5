//! Event webhooks end to end: a real local app backend (axum, the push tests' [`Receiver`]) receives
//! the relay's signed POSTs of `user.online`, `user.offline`, `message.stored` and the group
//! membership events, in both modes (distributed: through JetStream and `push-relay`'s webhook
//! consumer; embedded: through the store's outbox).

use std::collections::HashSet;

use serde_json::json;
use zhibo::Config;
use zhibo_loadtest::client::Transport;
use zhibo_proto::client::ReceiverType;
use zhibo_push::webhook::WebhookEvent;
use zhibo_push::EventType;

use crate::cluster::{eventually, http, Cluster};
use crate::push::{distributed, embedded, push_config, send, Receiver, Relay, JETSTREAM, WAIT};

/// Push on (as in the push tests) and every webhook event type, to the receiver's `/webhook`.
fn webhooks_config(c: &mut Config, receiver: &str) {
    push_config(c, receiver);
    c.webhooks.url = receiver.replace("/push", "/webhook");
    c.webhooks.events = EventType::ALL.iter().map(|t| t.name().to_owned()).collect();
}

/// The first accepted webhook event of type `kind` whose data has every field of `fields`.
fn find(events: &[WebhookEvent], kind: &str, fields: &serde_json::Value) -> Option<WebhookEvent> {
    let fields = fields.as_object().expect("fields object");
    events
        .iter()
        .find(|e| e.kind == kind && fields.iter().all(|(k, v)| e.data.get(k) == Some(v)))
        .cloned()
}

/// Waits for the event of type `kind` with `fields`.
async fn arrives(receiver: &Receiver, kind: &str, fields: serde_json::Value) -> WebhookEvent {
    eventually(&format!("webhook {kind} {fields}"), WAIT, || {
        std::future::ready(find(&receiver.webhooks(), kind, &fields))
    })
    .await
}

/// Each configured event reaches the app backend, signed, with what it is about: a user's first
/// device online and last one gone, a stored message, a member added, one leaving, one removed.
async fn webhook_events_reach_the_app_backend(cluster: &Cluster, receiver: &Receiver) {
    let relay = Relay::start(cluster, |_| {});
    let a = cluster.user("wa").await;
    let b = cluster.user("wb").await;
    let c = cluster.user("wc").await;
    cluster.befriend(&a, &b).await;
    cluster.befriend(&a, &c).await;
    // b is a's friend: added directly.
    let group = cluster.group(&a, &[&b]).await;
    arrives(
        receiver,
        "group.member_joined",
        json!({"group_id": group, "user_id": b.user_id, "by_user_id": a.user_id}),
    )
    .await;

    // Two devices of b on two gateways (distributed): online once (the second device's gateway sees
    // the first's entry, written before the first sign-in completed), offline once both are gone.
    let cb = cluster.connect(Transport::Tcp, 0, &b).await;
    let b2 = cluster.second_device(&b).await;
    let cb2 = cluster.connect(Transport::Tcp, 1, &b2).await;
    arrives(receiver, "user.online", json!({"user_id": b.user_id})).await;
    let mut ca = cluster.connect(Transport::Tcp, 0, &a).await;
    let out = send(&mut ca, ReceiverType::User, b.user_id, "w-1").await;
    let stored = arrives(
        receiver,
        "message.stored",
        json!({"message_id": out.message_id.to_string()}),
    )
    .await;
    assert_eq!(
        stored.idempotency_key,
        format!("message.stored:{}", out.message_id)
    );
    assert_eq!(stored.data["sender_user_id"], a.user_id);
    assert_eq!(stored.data["receiver_type"], "user");
    assert_eq!(stored.data["receiver_id"], b.user_id);
    assert_eq!(stored.data["server_time_ms"], out.server_time_ms);

    let bearer = |t: &str| format!("Bearer {t}");
    let (status, _) = http(
        &cluster.api_base,
        reqwest::Method::POST,
        &format!("/v1/groups/{group}/members"),
        ("authorization", &bearer(&a.token)),
        json!({"user_ids": [c.user_id]}),
    )
    .await;
    assert_eq!(status, 200);
    arrives(
        receiver,
        "group.member_joined",
        json!({"group_id": group, "user_id": c.user_id, "by_user_id": a.user_id}),
    )
    .await;
    let (status, _) = http(
        &cluster.api_base,
        reqwest::Method::POST,
        &format!("/v1/groups/{group}/leave"),
        ("authorization", &bearer(&c.token)),
        json!({}),
    )
    .await;
    assert_eq!(status, 204);
    arrives(
        receiver,
        "group.member_left",
        json!({"group_id": group, "user_id": c.user_id}),
    )
    .await;
    let (status, _) = http(
        &cluster.api_base,
        reqwest::Method::DELETE,
        &format!("/v1/groups/{group}/members/{}", b.user_id),
        ("authorization", &bearer(&a.token)),
        json!({}),
    )
    .await;
    assert_eq!(status, 204);
    arrives(
        receiver,
        "group.member_kicked",
        json!({"group_id": group, "user_id": b.user_id, "by_user_id": a.user_id}),
    )
    .await;

    drop(cb);
    drop(cb2);
    arrives(receiver, "user.offline", json!({"user_id": b.user_id})).await;

    let mine: Vec<WebhookEvent> = receiver
        .webhooks()
        .into_iter()
        .filter(|e| {
            [a.user_id, b.user_id, c.user_id]
                .iter()
                .any(|u| e.data["user_id"] == *u || e.data["sender_user_id"] == *u)
        })
        .collect();
    let online_b = mine
        .iter()
        .filter(|e| e.kind == "user.online" && e.data["user_id"] == b.user_id)
        .count();
    assert_eq!(online_b, 1, "b came online once with two devices: {mine:?}");
    let keys: HashSet<&str> = mine.iter().map(|e| e.idempotency_key.as_str()).collect();
    assert_eq!(keys.len(), mine.len(), "one key per event: {mine:?}");
    for e in &mine {
        assert!(
            e.idempotency_key.starts_with(&format!("{}:", e.kind)),
            "{e:?}"
        );
    }
    assert_eq!(receiver.bad_signatures(), 0);
    if let Some(relay) = relay {
        relay.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_webhook_events_reach_the_app_backend() {
    let receiver = Receiver::start().await;
    let url = receiver.url.clone();
    let cluster = embedded(&receiver, |c| webhooks_config(c, &url)).await;
    webhook_events_reach_the_app_backend(&cluster, &receiver).await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn distributed_webhook_events_reach_the_app_backend() {
    let _one = JETSTREAM.lock().await;
    let receiver = Receiver::start().await;
    let url = receiver.url.clone();
    let cluster = distributed(&receiver, |c| webhooks_config(c, &url)).await;
    webhook_events_reach_the_app_backend(&cluster, &receiver).await;
    cluster.stop().await;
}

/// Embedded: the webhook target unreachable (its events retried forever) does not hold up push events,
/// even with one request in flight at a time: each topic has its own delivery loop and permits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_failing_webhook_target_does_not_hold_up_push_events() {
    let receiver = Receiver::start().await;
    // A port nobody listens on: every webhook attempt is refused.
    let unreachable = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}/webhook", l.local_addr().expect("addr"))
    };
    let cluster = embedded(&receiver, |c| {
        c.push.concurrency = 1;
        c.webhooks.url = unreachable;
        c.webhooks.events = vec!["message.stored".into()];
    })
    .await;
    let a = cluster.user("xa").await;
    let b = cluster.user("xb").await;
    cluster.befriend(&a, &b).await;
    let mut ca = cluster.connect(Transport::Tcp, 0, &a).await;
    let mut expected = HashSet::new();
    for i in 0..3 {
        let out = send(&mut ca, ReceiverType::User, b.user_id, &format!("x-{i}")).await;
        expected.insert(crate::push::key(&out, b.user_id));
    }
    let got = receiver.wait_for_keys(b.user_id, &expected).await;
    assert_eq!(got.len(), expected.len());
    assert!(receiver.webhooks().is_empty());
    cluster.stop().await;
}
