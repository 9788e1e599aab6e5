//! Offline push events end to end: a real local app backend (axum) receives the relay's signed POSTs.
//!
//! Distributed runs use the real NATS JetStream: one stream and one durable consumer per subject
//! prefix, i.e. per test process. So the distributed push tests take [`JETSTREAM`] one at a time, each
//! starting its own relay and stopping it before the next, and every test looks only at events of its
//! own (fresh) users: a redelivery of an earlier test's event to a later test's receiver is ignored.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;
use zhibo::Config;
use zhibo_loadtest::client::{Client, Transport};
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{ReceiverType, SendMessageInput, SendMessageOutput};
use zhibo_push::sign::{verify, IDEMPOTENCY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use zhibo_push::webhook::WebhookEvent;
use zhibo_push::PushEvent;

use crate::cluster::{eventually, http, Cluster, READY_WAIT, SECRET};

pub(crate) const WAIT: Duration = Duration::from_secs(30);

/// The HMAC key shared by the relay and the test receiver.
pub(crate) const PUSH_SECRET: &str = "e2e-push-secret-0123456789";

/// One distributed push test at a time (see the module documentation).
pub(crate) static JETSTREAM: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A request the receiver accepted: verified signature, event parsed.
#[derive(Debug, Clone)]
pub(crate) struct Received {
    event: PushEvent,
    body: Bytes,
    timestamp: String,
    signature: String,
}

#[derive(Default)]
struct ReceiverState {
    accepted: Mutex<Vec<Received>>,
    /// Refusals (503) per idempotency key.
    refused: Mutex<HashMap<String, u32>>,
    /// Recipients whose events are refused (the app backend is "down" for them).
    refuse_users: Mutex<HashSet<i64>>,
    /// Requests whose signature did not verify.
    bad_signatures: Mutex<u32>,
    /// Webhook events accepted on `/webhook` (signature verified), in arrival order.
    webhooks: Mutex<Vec<WebhookEvent>>,
}

/// A local app backend on port 0: verifies each request's signature, answers 503 for the users it is
/// told to refuse, records the rest. It can also go away altogether ([`Receiver::go_down`]: its port
/// refuses connections) and come back on the same port ([`Receiver::come_up`]).
pub(crate) struct Receiver {
    pub(crate) url: String,
    addr: std::net::SocketAddr,
    state: Arc<ReceiverState>,
    /// The running server: its stop token and task (`None` while down).
    server: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some((stop, _)) = &self.server {
            stop.cancel();
        }
    }
}

/// Serves the receiver's routes on `listener` until the returned token is cancelled.
fn serve_receiver(
    listener: tokio::net::TcpListener,
    state: Arc<ReceiverState>,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let app = axum::Router::new()
        .route("/push", axum::routing::post(receive))
        .route("/webhook", axum::routing::post(receive_webhook))
        .with_state(state);
    let stop = CancellationToken::new();
    let until = stop.clone();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(until.cancelled_owned())
            .await
            .expect("receiver");
    });
    (stop, task)
}

/// A delivery's headers, checked: the body's signature (a bad one is counted in `bad_signatures`),
/// then the body decoded as `T` whose idempotency key must be the header's. `Err` is the status to
/// answer.
struct Signed<T> {
    event: T,
    timestamp: String,
    signature: String,
}

fn check_signed<T: serde::de::DeserializeOwned>(
    state: &ReceiverState,
    headers: &HeaderMap,
    body: &[u8],
    key_of: impl Fn(&T) -> &str,
) -> Result<Signed<T>, StatusCode> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (timestamp, signature) = (header(TIMESTAMP_HEADER), header(SIGNATURE_HEADER));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    if verify(
        PUSH_SECRET.as_bytes(),
        &timestamp,
        &signature,
        body,
        now,
        300,
    )
    .is_err()
    {
        *state.bad_signatures.lock().expect("lock") += 1;
        return Err(StatusCode::UNAUTHORIZED);
    }
    let event: T = serde_json::from_slice(body).map_err(|_| StatusCode::BAD_REQUEST)?;
    if header(IDEMPOTENCY_HEADER) != key_of(&event) {
        return Err(StatusCode::BAD_REQUEST);
    }
    Ok(Signed {
        event,
        timestamp,
        signature,
    })
}

/// `/webhook`: verifies the signature and the key header, records the event.
async fn receive_webhook(
    State(state): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    match check_signed(&state, &headers, &body, |e: &WebhookEvent| {
        &e.idempotency_key
    }) {
        Ok(signed) => {
            state.webhooks.lock().expect("lock").push(signed.event);
            StatusCode::OK
        }
        Err(status) => status,
    }
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let Signed {
        event,
        timestamp,
        signature,
    } = match check_signed(&state, &headers, &body, |e: &PushEvent| &e.idempotency_key) {
        Ok(signed) => signed,
        Err(status) => return status,
    };
    if state
        .refuse_users
        .lock()
        .expect("lock")
        .contains(&event.recipient_user_id)
    {
        *state
            .refused
            .lock()
            .expect("lock")
            .entry(event.idempotency_key)
            .or_default() += 1;
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    state.accepted.lock().expect("lock").push(Received {
        event,
        body,
        timestamp,
        signature,
    });
    StatusCode::OK
}

impl Receiver {
    pub(crate) async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().expect("addr");
        let url = format!("http://{addr}/push");
        let state = Arc::new(ReceiverState::default());
        let server = Some(serve_receiver(listener, state.clone()));
        Receiver {
            url,
            addr,
            state,
            server,
        }
    }

    /// Stops serving and closes the listener (and every connection): until [`Receiver::come_up`],
    /// connecting to its port is refused.
    async fn go_down(&mut self) {
        let (stop, task) = self.server.take().expect("receiver is up");
        stop.cancel();
        tokio::time::timeout(WAIT, task)
            .await
            .expect("receiver stops in time")
            .expect("receiver task");
        assert!(
            tokio::net::TcpStream::connect(self.addr).await.is_err(),
            "the receiver's port still accepts connections"
        );
    }

    /// Listens again on the same port.
    async fn come_up(&mut self) {
        assert!(self.server.is_none(), "receiver is up already");
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("SO_REUSEADDR");
        socket.bind(self.addr).expect("rebind the receiver's port");
        let listener = socket.listen(1024).expect("listen");
        self.server = Some(serve_receiver(listener, self.state.clone()));
    }

    fn refuse(&self, user_id: i64, refuse: bool) {
        let mut users = self.state.refuse_users.lock().expect("lock");
        if refuse {
            users.insert(user_id);
        } else {
            users.remove(&user_id);
        }
    }

    /// The webhook events accepted so far.
    pub(crate) fn webhooks(&self) -> Vec<WebhookEvent> {
        self.state.webhooks.lock().expect("lock").clone()
    }

    /// Requests refused for a bad signature.
    pub(crate) fn bad_signatures(&self) -> u32 {
        *self.state.bad_signatures.lock().expect("lock")
    }

    /// Accepted events for `user_id`, in arrival order.
    fn events_for(&self, user_id: i64) -> Vec<Received> {
        self.state
            .accepted
            .lock()
            .expect("lock")
            .iter()
            .filter(|r| r.event.recipient_user_id == user_id)
            .cloned()
            .collect()
    }

    fn refusals(&self, key: &str) -> u32 {
        self.state
            .refused
            .lock()
            .expect("lock")
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// Waits until every key of `keys` was accepted for `user_id`; returns the accepted events.
    pub(crate) async fn wait_for_keys(
        &self,
        user_id: i64,
        keys: &HashSet<String>,
    ) -> Vec<Received> {
        eventually("every push event accepted", WAIT, || {
            let got = self.events_for(user_id);
            let seen: HashSet<String> = got
                .iter()
                .map(|r| r.event.idempotency_key.clone())
                .collect();
            std::future::ready(keys.is_subset(&seen).then_some(got))
        })
        .await
    }
}

/// Push on, to `url`, with short retries for tests.
pub(crate) fn push_config(c: &mut Config, url: &str) {
    c.push.enabled = true;
    c.push.url = url.into();
    c.push.secret = PUSH_SECRET.into();
    c.push.timeout_ms = 2_000;
    c.push.backoff_initial_ms = 100;
    c.push.backoff_max_ms = 400;
    c.push.max_attempts = 1_000;
}

/// A relay task (distributed clusters only; the embedded node runs its own).
pub(crate) struct Relay {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Relay {
    pub(crate) fn start(cluster: &Cluster, tweak: impl FnOnce(&mut Config)) -> Option<Relay> {
        Self::start_with_ops(cluster, tweak, None)
    }

    fn start_with_ops(
        cluster: &Cluster,
        tweak: impl FnOnce(&mut Config),
        ops: Option<tokio::net::TcpListener>,
    ) -> Option<Relay> {
        let mut config = cluster.config.clone()?;
        tweak(&mut config);
        let stop = CancellationToken::new();
        let task = tokio::spawn(zhibo::run_push_relay(config, ops, stop.clone()));
        Some(Relay { stop, task })
    }

    /// A relay with its ops endpoint (distributed), else none; and the address of the ops endpoint
    /// whose `/metrics` count the relay's attempts (the relay's own, or the embedded node's).
    async fn start_observed(cluster: &Cluster) -> (Option<Relay>, std::net::SocketAddr) {
        if cluster.config.is_none() {
            return (None, cluster.ops_addr.expect("embedded ops endpoint"));
        }
        let ops = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind relay ops");
        let addr = ops.local_addr().expect("addr");
        (Self::start_with_ops(cluster, |_| {}, Some(ops)), addr)
    }

    pub(crate) async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("relay stops in time")
            .expect("relay task")
            .expect("relay ran cleanly");
    }
}

pub(crate) async fn send(
    c: &mut Client,
    receiver_type: ReceiverType,
    to: i64,
    id: &str,
) -> SendMessageOutput {
    let body = Body::SendMessage(SendMessageInput {
        receiver_type: receiver_type as i32,
        receiver_id: to,
        client_msg_id: id.into(),
        content_type: 1,
        content: Bytes::from(format!("text of {id}")),
        ..Default::default()
    });
    match c.request(body, WAIT).await.expect("reply").body {
        Some(Body::SendMessageOutput(o)) => o,
        other => panic!("expected SendMessageOutput for {id}, got {other:?}"),
    }
}

pub(crate) fn key(out: &SendMessageOutput, user_id: i64) -> String {
    format!("{}:{user_id}", out.message_id)
}

pub(crate) async fn embedded(receiver: &Receiver, tweak: impl FnOnce(&mut Config)) -> Cluster {
    let url = receiver.url.clone();
    Cluster::embedded_with(move |c| {
        push_config(c, &url);
        tweak(c);
    })
    .await
}

pub(crate) async fn distributed(receiver: &Receiver, tweak: impl FnOnce(&mut Config)) -> Cluster {
    let url = receiver.url.clone();
    Cluster::distributed_tweaked(2, move |c| {
        push_config(c, &url);
        tweak(c);
    })
    .await
}

/// An offline recipient gets exactly one push event per message (1:1 and group), an online one none;
/// the events say what a notification needs, and their signatures fail on a tampered body.
async fn offline_recipient_gets_one_event_per_message(cluster: &Cluster, receiver: &Receiver) {
    let relay = Relay::start(cluster, |_| {});
    let a = cluster.user("pa").await;
    let offline = cluster.user("pb").await;
    let online = cluster.user("pc").await;
    cluster.befriend(&a, &offline).await;
    cluster.befriend(&a, &online).await;
    let group = cluster.group(&a, &[&offline, &online]).await;
    // Signed in: the gateway has recorded the presence before answering the sign-in.
    let _online_conn = cluster.connect(Transport::Tcp, 1, &online).await;
    let mut ca = cluster.connect(Transport::Tcp, 0, &a).await;

    let to_online = send(&mut ca, ReceiverType::User, online.user_id, "p-c1").await;
    let mut expected = HashSet::new();
    let mut outs = Vec::new();
    for i in 0..3 {
        let out = send(
            &mut ca,
            ReceiverType::User,
            offline.user_id,
            &format!("p-b{i}"),
        )
        .await;
        expected.insert(key(&out, offline.user_id));
        outs.push(out);
    }
    let in_group = send(&mut ca, ReceiverType::Group, group, "p-g1").await;
    expected.insert(key(&in_group, offline.user_id));

    let got = receiver.wait_for_keys(offline.user_id, &expected).await;
    let keys: Vec<&str> = got
        .iter()
        .map(|r| r.event.idempotency_key.as_str())
        .collect();
    assert_eq!(
        keys.len(),
        expected.len(),
        "one event per message: {keys:?}"
    );
    assert!(
        receiver.events_for(online.user_id).is_empty(),
        "the online recipient got a push event"
    );
    assert!(
        receiver.events_for(a.user_id).is_empty(),
        "the sender got a push event"
    );
    assert_ne!(to_online.message_id, 0);

    let first = got
        .iter()
        .find(|r| r.event.idempotency_key == key(&outs[0], offline.user_id))
        .expect("first event");
    assert_eq!(first.event.kind, "push");
    assert_eq!(first.event.sender_user_id, a.user_id);
    assert_eq!(first.event.conversation.kind, "user");
    assert_eq!(first.event.conversation.id, a.user_id);
    assert_eq!(first.event.collapse_key, format!("user:{}", a.user_id));
    assert_eq!(first.event.message_id, outs[0].message_id.to_string());
    assert_eq!(first.event.preview.as_deref(), Some("text of p-b0"));
    // The badge: the recipient's unread count in the conversation (nothing read yet).
    for (i, out) in outs.iter().enumerate() {
        let event = got
            .iter()
            .find(|r| r.event.idempotency_key == key(out, offline.user_id))
            .expect("event");
        assert_eq!(event.event.badge.source, "unread");
        assert_eq!(event.event.badge.count, i as u64 + 1);
    }
    let grouped = got
        .iter()
        .find(|r| r.event.idempotency_key == key(&in_group, offline.user_id))
        .expect("group event");
    assert_eq!(grouped.event.conversation.kind, "group");
    assert_eq!(grouped.event.conversation.id, group);
    assert_eq!(grouped.event.collapse_key, format!("group:{group}"));
    assert_eq!(
        (
            grouped.event.badge.source.as_str(),
            grouped.event.badge.count
        ),
        ("unread", 1)
    );

    // A muted conversation is not pushed (it still counts unread): the group muted by the offline
    // user, a group message, then a 1:1 message whose event comes through with the unread count.
    let (status, body) = http(
        &cluster.api_base,
        reqwest::Method::PUT,
        &format!("/v1/conversations/group/{group}/settings"),
        ("authorization", &format!("Bearer {}", offline.token)),
        serde_json::json!({"muted": true, "pinned": false}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let muted = send(&mut ca, ReceiverType::Group, group, "p-g2").await;
    let after = send(&mut ca, ReceiverType::User, offline.user_id, "p-b3").await;
    let later = receiver
        .wait_for_keys(
            offline.user_id,
            &HashSet::from([key(&after, offline.user_id)]),
        )
        .await;
    let last = later
        .iter()
        .find(|r| r.event.idempotency_key == key(&after, offline.user_id))
        .expect("event after the muted one");
    assert_eq!(last.event.badge.count, 4);
    // Distributed: Redis loses every counter; the conversation's counter resumes above a margin of
    // skipped seqs, which the badge does not count.
    if let Some(redis) = cluster.redis_url.as_deref() {
        crate::cluster::flushdb(redis).await;
        let resumed = send(&mut ca, ReceiverType::User, offline.user_id, "p-b4").await;
        assert!(
            resumed.conv_seq > zhibo_store::redis_seq::RECOVERY_MARGIN,
            "the counter was recovered: {}",
            resumed.conv_seq
        );
        let got = receiver
            .wait_for_keys(
                offline.user_id,
                &HashSet::from([key(&resumed, offline.user_id)]),
            )
            .await;
        let event = got
            .iter()
            .find(|r| r.event.idempotency_key == key(&resumed, offline.user_id))
            .expect("event after the flush");
        assert_eq!(
            event.event.badge.count, 5,
            "the skipped seqs are not unread"
        );
    }
    assert!(
        receiver
            .events_for(offline.user_id)
            .iter()
            .all(|r| r.event.idempotency_key != key(&muted, offline.user_id)),
        "a muted conversation was pushed"
    );
    // Embedded (one process): the worker's counter says the muted recipient was skipped, not lost.
    if let Some(ops) = cluster.ops_addr {
        assert_eq!(scrape(ops, "zhibo_push_skipped_muted_total").await, 1.0);
    }

    // The signature covers the body: one byte changed and it no longer verifies.
    let now = first.timestamp.parse::<i64>().expect("timestamp");
    let verified = |body: &[u8]| {
        verify(
            PUSH_SECRET.as_bytes(),
            &first.timestamp,
            &first.signature,
            body,
            now,
            300,
        )
    };
    assert_eq!(verified(&first.body), Ok(()));
    let mut tampered = first.body.to_vec();
    let at = tampered
        .windows(4)
        .position(|w| w == b"text")
        .expect("preview in the body");
    tampered[at] = b'T';
    assert_eq!(
        verified(&tampered),
        Err(zhibo_push::sign::VerifyError::Mismatch)
    );
    assert_eq!(*receiver.state.bad_signatures.lock().expect("lock"), 0);
    assert!(
        receiver.webhooks().is_empty(),
        "webhook events sent while webhooks are off"
    );
    if let Some(relay) = relay {
        relay.stop().await;
    }
}

/// The app backend refuses (503) every event of a user until each was tried at least 3 times, then
/// accepts: every event arrives, none more than once.
async fn receiver_down_then_up_gets_every_event(cluster: &Cluster, receiver: &Receiver) {
    let relay = Relay::start(cluster, |_| {});
    let a = cluster.user("qa").await;
    let b = cluster.user("qb").await;
    cluster.befriend(&a, &b).await;
    receiver.refuse(b.user_id, true);
    let mut ca = cluster.connect(Transport::Tcp, 0, &a).await;
    let mut expected = HashSet::new();
    for i in 0..5 {
        let out = send(&mut ca, ReceiverType::User, b.user_id, &format!("q-{i}")).await;
        expected.insert(key(&out, b.user_id));
    }
    eventually("every event refused 3 times", WAIT, || {
        std::future::ready(
            expected
                .iter()
                .all(|k| receiver.refusals(k) >= 3)
                .then_some(()),
        )
    })
    .await;
    receiver.refuse(b.user_id, false);
    let got = receiver.wait_for_keys(b.user_id, &expected).await;
    let keys: HashSet<&str> = got
        .iter()
        .map(|r| r.event.idempotency_key.as_str())
        .collect();
    assert_eq!(keys.len(), got.len(), "an accepted event came again");
    if let Some(relay) = relay {
        relay.stop().await;
    }
}

/// A `zhibo_push_*` counter read from `/metrics` at `ops`.
pub(crate) async fn scrape(ops: std::net::SocketAddr, name: &str) -> f64 {
    let text = reqwest::get(format!("http://{ops}/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter(|l| l.split([' ', '{']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// How long the app backend stays unreachable.
const DOWNTIME: Duration = Duration::from_secs(10);

/// The app backend is really gone for 10 s — its port refuses connections — while messages to an
/// offline user are sent; the relay's failed attempts are observed on its `/metrics`; then the backend
/// listens again on the same port and receives every event. A key may arrive more than once only as a
/// retry of the same event (at least once, the key identifies it).
async fn receiver_unreachable_for_10s_then_back_gets_every_event(
    cluster: &Cluster,
    receiver: &mut Receiver,
) {
    let (relay, ops) = Relay::start_observed(cluster).await;
    let a = cluster.user("ua").await;
    let b = cluster.user("ub").await;
    cluster.befriend(&a, &b).await;
    let mut ca = cluster.connect(Transport::Tcp, 0, &a).await;
    let retried_before = scrape(ops, "zhibo_push_retried_total").await;

    receiver.go_down().await;
    let down_at = tokio::time::Instant::now();
    let mut expected = HashSet::new();
    for i in 0..5 {
        let out = send(&mut ca, ReceiverType::User, b.user_id, &format!("u-{i}")).await;
        expected.insert(key(&out, b.user_id));
    }
    // The relay is trying and failing (connection refused), not idle.
    eventually("the relay failed at least 2 attempts", WAIT, || async {
        (scrape(ops, "zhibo_push_retried_total").await - retried_before >= 2.0).then_some(())
    })
    .await;
    // Down for the whole downtime (a duration under test, not a synchronisation): retries go on.
    tokio::time::sleep_until(down_at + DOWNTIME).await;
    let failed = scrape(ops, "zhibo_push_retried_total").await - retried_before;
    assert!(
        failed >= expected.len() as f64,
        "each event was retried while the receiver was down: {failed} failed attempts"
    );
    assert!(receiver.events_for(b.user_id).is_empty());

    receiver.come_up().await;
    let got = receiver.wait_for_keys(b.user_id, &expected).await;
    let mut by_key: HashMap<&str, Vec<&Received>> = HashMap::new();
    for r in &got {
        by_key
            .entry(r.event.idempotency_key.as_str())
            .or_default()
            .push(r);
    }
    let keys: HashSet<String> = by_key.keys().map(|k| (*k).to_owned()).collect();
    assert_eq!(keys, expected, "exactly the events of the messages sent");
    for (k, copies) in &by_key {
        // A repeat is a redelivery of the same event (same body), which the key lets the app drop.
        assert!(
            copies.iter().all(|r| r.event == copies[0].event),
            "two different events under one key {k}"
        );
    }
    if let Some(relay) = relay {
        relay.stop().await;
    }
}

mod embedded_mode {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn offline_recipient_gets_one_push_per_message() {
        let receiver = Receiver::start().await;
        let cluster = embedded(&receiver, |_| {}).await;
        offline_recipient_gets_one_event_per_message(&cluster, &receiver).await;
        cluster.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn push_receiver_down_then_up_gets_every_event() {
        let receiver = Receiver::start().await;
        let cluster = embedded(&receiver, |_| {}).await;
        receiver_down_then_up_gets_every_event(&cluster, &receiver).await;
        cluster.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn push_receiver_unreachable_for_10s_then_back_gets_every_event() {
        let mut receiver = Receiver::start().await;
        let cluster = embedded(&receiver, |_| {}).await;
        receiver_unreachable_for_10s_then_back_gets_every_event(&cluster, &mut receiver).await;
        cluster.stop().await;
    }

    /// The embedded node keeps push events in its store's outbox: sent while the app backend is
    /// unreachable, the node stopped (graceful) and started again on the same data with the backend
    /// up, each event arrives exactly once; events of messages sent after that arrive as well.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn push_events_survive_a_restart_of_the_embedded_node() {
        let mut receiver = Receiver::start().await;
        let url = receiver.url.clone();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("zhibo.redb");
        receiver.go_down().await;
        let cluster = Cluster::embedded_at(&path, |c| push_config(c, &url)).await;
        let ops = cluster.ops_addr.expect("ops endpoint");
        let a = cluster.user("sa").await;
        let b = cluster.user("sb").await;
        cluster.befriend(&a, &b).await;
        let mut ca = cluster.connect(Transport::Tcp, 0, &a).await;
        let mut expected = HashSet::new();
        for i in 0..3 {
            let out = send(&mut ca, ReceiverType::User, b.user_id, &format!("s-{i}")).await;
            expected.insert(key(&out, b.user_id));
        }
        // The node is trying to deliver them (and failing: nobody listens).
        eventually("the relay failed an attempt", WAIT, || async {
            (scrape(ops, "zhibo_push_retried_total").await >= 1.0).then_some(())
        })
        .await;
        drop(ca);
        cluster.stop().await;

        receiver.come_up().await;
        let cluster = Cluster::embedded_at(&path, |c| push_config(c, &url)).await;
        let got = receiver.wait_for_keys(b.user_id, &expected).await;
        let keys: Vec<&str> = got
            .iter()
            .map(|r| r.event.idempotency_key.as_str())
            .collect();
        assert_eq!(got.len(), expected.len(), "each event once: {keys:?}");
        // Delivered events leave the outbox: a further restart delivers nothing again.
        eventually("the outbox is empty", WAIT, || async {
            (scrape(cluster.ops_addr.expect("ops"), "zhibo_push_delivered_total").await
                >= expected.len() as f64)
                .then_some(())
        })
        .await;
        // Events of messages sent after the resumed ones were delivered arrive too (their outbox ids
        // once restarted below the relay's cursor and waited for the next restart).
        let mut ca = cluster.connect(Transport::Tcp, 0, &a).await;
        let out = send(&mut ca, ReceiverType::User, b.user_id, "after").await;
        let after = HashSet::from([key(&out, b.user_id)]);
        receiver.wait_for_keys(b.user_id, &after).await;
        eventually("the new event is removed too", WAIT, || async {
            (scrape(cluster.ops_addr.expect("ops"), "zhibo_push_delivered_total").await
                > expected.len() as f64)
                .then_some(())
        })
        .await;
        drop(ca);
        cluster.stop().await;
        let backend = eventually("the store file opens", WAIT, || {
            std::future::ready(zhibo_store::embedded::EmbeddedBackend::open(&path).ok())
        })
        .await;
        let left = zhibo_store::OutboxStore::pending(&backend, 0, 10)
            .await
            .expect("read the outbox");
        assert!(
            left.is_empty(),
            "delivered events left in the outbox: {left:?}"
        );
    }

    /// `push.preview = false`: events carry no content.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn push_preview_can_be_turned_off() {
        let receiver = Receiver::start().await;
        let cluster = embedded(&receiver, |c| c.push.preview = false).await;
        let a = cluster.user("ra").await;
        let b = cluster.user("rb").await;
        cluster.befriend(&a, &b).await;
        let mut ca = cluster.connect(Transport::Tcp, 0, &a).await;
        let out = send(&mut ca, ReceiverType::User, b.user_id, "r-1").await;
        let got = receiver
            .wait_for_keys(b.user_id, &HashSet::from([key(&out, b.user_id)]))
            .await;
        assert_eq!(got[0].event.preview, None);
        assert!(!String::from_utf8_lossy(&got[0].body).contains("text of"));
        cluster.stop().await;
    }
}

mod distributed_mode {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn offline_recipient_gets_one_push_per_message() {
        let _one = JETSTREAM.lock().await;
        let receiver = Receiver::start().await;
        let cluster = distributed(&receiver, |_| {}).await;
        offline_recipient_gets_one_event_per_message(&cluster, &receiver).await;
        cluster.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn push_receiver_down_then_up_gets_every_event() {
        let _one = JETSTREAM.lock().await;
        let receiver = Receiver::start().await;
        let cluster = distributed(&receiver, |_| {}).await;
        receiver_down_then_up_gets_every_event(&cluster, &receiver).await;
        cluster.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn push_receiver_unreachable_for_10s_then_back_gets_every_event() {
        let _one = JETSTREAM.lock().await;
        let mut receiver = Receiver::start().await;
        let cluster = distributed(&receiver, |_| {}).await;
        receiver_unreachable_for_10s_then_back_gets_every_event(&cluster, &mut receiver).await;
        cluster.stop().await;
    }

    /// After `push.max_attempts` refusals an event goes to `<prefix>.push.dead` and is not tried again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn push_event_is_dead_lettered_after_max_attempts() {
        let _one = JETSTREAM.lock().await;
        let receiver = Receiver::start().await;
        let cluster = distributed(&receiver, |_| {}).await;
        let config = cluster.config.clone().expect("distributed");
        // As the nodes connect (credentials in the URL: the cluster's own NATS account).
        let bus = zhibo_bus::nats::NatsBus::connect(&config.bus.nats_url, "e2e-dead-letters")
            .await
            .expect("nats");
        let nats = bus.client().clone();
        let mut dead = nats
            .subscribe(format!("{}.push.dead", config.bus.subject_prefix))
            .await
            .expect("subscribe dead letters");
        nats.flush().await.expect("flush");
        let relay = Relay::start(&cluster, |c| c.push.max_attempts = 3).expect("relay");
        let a = cluster.user("da").await;
        let b = cluster.user("db").await;
        cluster.befriend(&a, &b).await;
        receiver.refuse(b.user_id, true);
        let mut ca = cluster.connect(Transport::Tcp, 0, &a).await;
        let out = send(&mut ca, ReceiverType::User, b.user_id, "d-1").await;
        let want = key(&out, b.user_id);
        let letter = tokio::time::timeout(WAIT, async {
            loop {
                let m = dead.next().await.expect("subscription open");
                let event: PushEvent = serde_json::from_slice(&m.payload).expect("event json");
                if event.idempotency_key == want {
                    return m;
                }
            }
        })
        .await
        .expect("dead letter in time");
        assert!(letter
            .headers
            .as_ref()
            .and_then(|h| h.get("Zhibo-Last-Error"))
            .is_some_and(|v| v.as_str().contains("503")));
        assert_eq!(
            receiver.refusals(&want),
            3,
            "tried exactly max_attempts times"
        );
        relay.stop().await;
        // Terminated, not redelivered: a new relay accepting everything never sees it.
        receiver.refuse(b.user_id, false);
        let relay = Relay::start(&cluster, |_| {}).expect("relay");
        let probe = send(&mut ca, ReceiverType::User, b.user_id, "d-2").await;
        receiver
            .wait_for_keys(b.user_id, &HashSet::from([key(&probe, b.user_id)]))
            .await;
        assert!(receiver
            .events_for(b.user_id)
            .iter()
            .all(|r| r.event.idempotency_key != want));
        relay.stop().await;
        cluster.stop().await;
    }

    /// `zhibo push-relay` killed (SIGKILL) while events are pending, events published while it is down,
    /// then started again: every event is delivered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn push_events_survive_a_relay_restart() {
        let _one = JETSTREAM.lock().await;
        let receiver = Receiver::start().await;
        let cluster = distributed(&receiver, |_| {}).await;
        let a = cluster.user("ka").await;
        let b = cluster.user("kb").await;
        cluster.befriend(&a, &b).await;
        let mut ca = cluster.connect(Transport::Tcp, 0, &a).await;
        let mut expected = HashSet::new();

        let relay = spawn_relay_process(&cluster, &receiver).await;
        let first = send(&mut ca, ReceiverType::User, b.user_id, "k-0").await;
        receiver
            .wait_for_keys(b.user_id, &HashSet::from([key(&first, b.user_id)]))
            .await;
        expected.insert(key(&first, b.user_id));
        // Pending while it dies: refused, being retried.
        receiver.refuse(b.user_id, true);
        let pending = send(&mut ca, ReceiverType::User, b.user_id, "k-1").await;
        let pending_key = key(&pending, b.user_id);
        eventually("the pending event was tried", WAIT, || {
            std::future::ready((receiver.refusals(&pending_key) >= 1).then_some(()))
        })
        .await;
        expected.insert(pending_key);
        relay.kill().await;

        // Published while no relay runs.
        for i in 2..6 {
            let out = send(&mut ca, ReceiverType::User, b.user_id, &format!("k-{i}")).await;
            expected.insert(key(&out, b.user_id));
        }
        receiver.refuse(b.user_id, false);
        let relay = spawn_relay_process(&cluster, &receiver).await;
        let got = receiver.wait_for_keys(b.user_id, &expected).await;
        let keys: HashSet<&str> = got
            .iter()
            .map(|r| r.event.idempotency_key.as_str())
            .collect();
        assert_eq!(keys.len(), expected.len());
        relay.kill().await;
        cluster.stop().await;
    }
}

/// A `zhibo push-relay` child process on the cluster's NATS, posting to `receiver`.
async fn spawn_relay_process(
    cluster: &Cluster,
    receiver: &Receiver,
) -> crate::cluster::WorkerProcess {
    use tokio::io::AsyncBufReadExt;
    let c = cluster.config.as_ref().expect("distributed cluster");
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_zhibo"));
    for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("ZHIBO_")) {
        command.env_remove(name);
    }
    let mut child = command
        .arg("push-relay")
        .env("ZHIBO_TOKEN_SECRET", SECRET)
        .env("ZHIBO_BUS__NATS_URL", &c.bus.nats_url)
        .env("ZHIBO_BUS__SUBJECT_PREFIX", &c.bus.subject_prefix)
        .env("ZHIBO_PUSH__URL", &receiver.url)
        .env("ZHIBO_PUSH__SECRET", PUSH_SECRET)
        .env("ZHIBO_PUSH__TIMEOUT_MS", "2000")
        .env("ZHIBO_PUSH__BACKOFF_INITIAL_MS", "100")
        .env("ZHIBO_PUSH__BACKOFF_MAX_MS", "400")
        .env(
            "ZHIBO_PUSH__STREAM_MAX_BYTES",
            crate::cluster::TEST_STREAM_MAX_BYTES.to_string(),
        )
        .env("ZHIBO_LOG", "info")
        .env("ZHIBO_METRICS_ADDR", "127.0.0.1:0")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start zhibo push-relay");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut output = Vec::new();
    let ready = async {
        while let Some(line) = lines.next_line().await.expect("read relay output") {
            if line.contains("push-relay consuming") {
                return true;
            }
            output.push(line);
        }
        false
    };
    match tokio::time::timeout(READY_WAIT, ready).await {
        Ok(true) => {}
        other => panic!(
            "push-relay not consuming ({other:?}):\n{}",
            output.join("\n")
        ),
    }
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    crate::cluster::WorkerProcess { child }
}

/// `zhibo push-relay` (and `zhibo dev` with push on) refuse a configuration they cannot deliver with:
/// exit 64 before connecting, naming the field, never printing the secret.
#[tokio::test]
async fn push_relay_refuses_a_bad_configuration() {
    let nats = zhibo_testkit::nats_url();
    /// (role, variables, the field the refusal names)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str);
    let cases: [Case; 9] = [
        (
            "push-relay",
            vec![("ZHIBO_PUSH__SECRET", PUSH_SECRET)],
            "push.url",
        ),
        // No host (outside audit: accepted, then every event dead-lettered with "builder error").
        (
            "push-relay",
            vec![
                ("ZHIBO_PUSH__URL", "http://:80/push"),
                ("ZHIBO_PUSH__SECRET", PUSH_SECRET),
            ],
            "push.url",
        ),
        (
            "dev",
            vec![
                ("ZHIBO_WEBHOOKS__URL", "https://"),
                ("ZHIBO_WEBHOOKS__EVENTS", r#"["user.online"]"#),
                ("ZHIBO_PUSH__SECRET", PUSH_SECRET),
            ],
            "webhooks.url",
        ),
        (
            "push-relay",
            vec![
                ("ZHIBO_PUSH__URL", "ftp://app.example.com/push"),
                ("ZHIBO_PUSH__SECRET", PUSH_SECRET),
            ],
            "push.url",
        ),
        (
            "push-relay",
            vec![
                ("ZHIBO_PUSH__URL", "https://app.example.com/push"),
                ("ZHIBO_PUSH__SECRET", "987654321"),
            ],
            "push.secret",
        ),
        (
            "dev",
            vec![
                ("ZHIBO_PUSH__ENABLED", "true"),
                ("ZHIBO_PUSH__SECRET", PUSH_SECRET),
            ],
            "push.url",
        ),
        (
            "dev",
            vec![
                ("ZHIBO_WEBHOOKS__EVENTS", r#"["user.online"]"#),
                ("ZHIBO_PUSH__SECRET", PUSH_SECRET),
            ],
            "webhooks.url",
        ),
        (
            "dev",
            vec![
                ("ZHIBO_WEBHOOKS__URL", "https://app.example.com/events"),
                ("ZHIBO_WEBHOOKS__EVENTS", r#"["user.typing"]"#),
                ("ZHIBO_PUSH__SECRET", PUSH_SECRET),
            ],
            "user.typing",
        ),
        (
            "push-relay",
            vec![
                ("ZHIBO_WEBHOOKS__URL", "https://app.example.com/events"),
                ("ZHIBO_WEBHOOKS__EVENTS", r#"["message.stored"]"#),
                ("ZHIBO_PUSH__SECRET", "987654321"),
            ],
            "push.secret",
        ),
    ];
    for (role, env, field) in cases {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_zhibo"));
        for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("ZHIBO_")) {
            command.env_remove(name);
        }
        if role != "dev" {
            // Embedded mode is `dev` without NATS.
            command.env("ZHIBO_BUS__NATS_URL", &nats);
        }
        // Should a case start after all, it binds nothing shared and writes no file.
        command
            .arg(role)
            .env("ZHIBO_STORE__PATH", "")
            .env("ZHIBO_API_ADDR", "127.0.0.1:0")
            .env("ZHIBO_GATEWAY__TCP_ADDR", "127.0.0.1:0")
            .env("ZHIBO_GATEWAY__WS_ADDR", "127.0.0.1:0")
            .env("ZHIBO_GATEWAY__QUIC_ADDR", "127.0.0.1:0")
            .env("ZHIBO_METRICS_ADDR", "")
            .envs(env.iter().copied())
            .kill_on_drop(true);
        let out = tokio::time::timeout(WAIT, command.output())
            .await
            .expect("exited in time")
            .expect("ran");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(64), "{role} {env:?}: {text}");
        assert!(text.contains(field), "{role} {env:?}: {text}");
        assert!(!text.contains("987654321"), "printed the secret: {text}");
    }
}
