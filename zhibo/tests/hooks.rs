//! The before-send hook end to end, embedded and distributed: a real HTTP receiver (axum, in the test)
//! answers by the message's content, and clients on real sockets see the outcome.
//!
//! The receiver's answer for a content starting with: `reject` → reject 4001 with a text; `replace` →
//! replace with `[redacted]`; `slow` → an answer after 4 s (past the 1.5 s timeout); `garbage` → 200
//! with a body that is not JSON; `fail` → HTTP 500; anything else → allow. Every request's signature is
//! checked against the shared secret.
//!
//! A test binary of its own, unlike the rest (tests/it): the hook is a logic-worker setting, and every
//! distributed cluster of one test process shares the process's NATS subject prefix, so a worker of
//! another test's cluster (without the hook, or with another policy) would take this test's commands.
//! Here the distributed clusters run one at a time ([`SERIAL`]) on this process's own prefix.

#[path = "it/cluster.rs"]
#[allow(dead_code)]
mod cluster;

#[macro_use]
#[path = "it/both_modes.rs"]
mod both_modes;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zhibo_loadtest::client::{Client, Credentials, Transport};
use zhibo_logic::{FailurePolicy, HookReceiver};
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{
    Error as WireError, ErrorCode, Message, ReceiverType, SendMessageInput, SendMessageOutput,
    SyncInput,
};

use crate::cluster::{fresh_room_id, join_room, Cluster};

const WAIT: Duration = Duration::from_secs(15);
const HOOK_SECRET: &str = "e2e-hook-secret-0123456789";
const REJECT_CODE: i32 = 4001;
const REJECT_TEXT: &str = "links are not allowed here";
const REDACTED: &str = "[redacted]";

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Call {
    body: serde_json::Value,
    /// The signature header matched HMAC-SHA256(secret, "<timestamp>.<body>").
    signed: bool,
}

/// The app backend of the test: an axum server on port 0 recording every call.
#[derive(Clone)]
struct Backend {
    url: String,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl Backend {
    async fn start() -> Backend {
        let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
        let recorded = calls.clone();
        let app = axum::Router::new().route(
            "/before-send",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let recorded = recorded.clone();
                    async move { answer(&recorded, &headers, &body).await }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Backend {
            url: format!("http://{addr}/before-send"),
            calls,
        }
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("calls").clone()
    }

    /// The calls about `client_msg_id`.
    fn calls_for(&self, client_msg_id: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.body["client_msg_id"] == client_msg_id)
            .collect()
    }
}

async fn answer(
    recorded: &Mutex<Vec<Call>>,
    headers: &axum::http::HeaderMap,
    body: &[u8],
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(HOOK_SECRET.as_bytes()).expect("key");
    mac.update(header("x-zhibo-timestamp").as_bytes());
    mac.update(b".");
    mac.update(body);
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let signed = header("x-zhibo-signature") == format!("v1={expected}");
    let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let content = base64::engine::general_purpose::STANDARD
        .decode(json["content"].as_str().unwrap_or_default())
        .unwrap_or_default();
    recorded
        .lock()
        .expect("calls")
        .push(Call { body: json, signed });
    let reply = |v: serde_json::Value| axum::Json(v).into_response();
    if content.starts_with(b"reject") {
        reply(serde_json::json!({"action": "reject", "code": REJECT_CODE, "text": REJECT_TEXT}))
    } else if content.starts_with(b"replace") {
        let b64 = base64::engine::general_purpose::STANDARD.encode(REDACTED);
        reply(serde_json::json!({"action": "replace", "content": b64}))
    } else if content.starts_with(b"slow") {
        tokio::time::sleep(Duration::from_secs(4)).await;
        reply(serde_json::json!({"action": "allow"}))
    } else if content.starts_with(b"garbage") {
        "surely this is fine".into_response()
    } else if content.starts_with(b"fail") {
        axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response()
    } else {
        reply(serde_json::json!({"action": "allow"}))
    }
}

/// Held by the distributed cluster running now: their logic workers share one subject prefix.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A cluster whose logic workers call `backend` (when `policy` is set) before storing a message.
pub(crate) struct Hooked {
    cluster: Cluster,
    backend: Backend,
    _serial: Option<tokio::sync::MutexGuard<'static, ()>>,
}

impl Hooked {
    async fn start(distributed: bool, policy: Option<FailurePolicy>) -> Hooked {
        let backend = Backend::start().await;
        let url = backend.url.clone();
        let tweak = move |c: &mut zhibo::Config| {
            c.logic.allow_strangers = true;
            if let Some(policy) = policy {
                c.hooks.secret = HOOK_SECRET.into();
                c.hooks.before_send.url = url;
                c.hooks.before_send.timeout_ms = 1500;
                c.hooks.before_send.failure_policy = policy;
                c.hooks.before_send.receivers =
                    vec![HookReceiver::User, HookReceiver::Group, HookReceiver::Room];
            }
        };
        let (cluster, serial) = if distributed {
            let serial = SERIAL.lock().await;
            (Cluster::distributed_tweaked(2, tweak).await, Some(serial))
        } else {
            (Cluster::embedded_with(tweak).await, None)
        };
        Hooked {
            cluster,
            backend,
            _serial: serial,
        }
    }

    pub(crate) async fn stop(self) {
        self.cluster.stop().await;
    }
}

macro_rules! hooked {
    ($name:ident, $policy:expr) => {
        pub(crate) struct $name;
        impl $name {
            pub(crate) async fn embedded() -> Hooked {
                Hooked::start(false, $policy).await
            }
            pub(crate) async fn distributed() -> Hooked {
                Hooked::start(true, $policy).await
            }
        }
    };
}

fn text(receiver_type: ReceiverType, to: i64, id: &str, content: &str) -> Body {
    Body::SendMessage(SendMessageInput {
        receiver_type: receiver_type as i32,
        receiver_id: to,
        client_msg_id: id.into(),
        content_type: 1,
        content: Bytes::from(content.to_owned()),
        ..Default::default()
    })
}

/// Sends and returns the answer: the output, or the Error.
async fn send(
    c: &mut Client,
    receiver_type: ReceiverType,
    to: i64,
    id: &str,
    content: &str,
) -> Result<SendMessageOutput, WireError> {
    let reply = c
        .request(text(receiver_type, to, id, content), WAIT)
        .await
        .expect("a reply");
    match reply.body {
        Some(Body::SendMessageOutput(o)) => Ok(o),
        Some(Body::Error(e)) => Err(e),
        other => panic!("expected an answer to {id}, got {other:?}"),
    }
}

fn code(e: &WireError) -> ErrorCode {
    ErrorCode::try_from(e.code).expect("known code")
}

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
    if let Ok(p) = c.recv(Duration::from_millis(300)).await {
        panic!("expected nothing, got {p:?}");
    }
}

/// The contents a user's sync returns, oldest first.
async fn synced(c: &mut Client) -> Vec<String> {
    match c
        .request(Body::Sync(SyncInput { seq: 0, limit: 0 }), WAIT)
        .await
        .expect("sync")
        .body
    {
        Some(Body::SyncOutput(o)) => o
            .messages
            .iter()
            .map(|m| String::from_utf8_lossy(&m.content).into_owned())
            .collect(),
        other => panic!("expected SyncOutput, got {other:?}"),
    }
}

/// The contents in `user_id`'s inbox, read from the store directly.
async fn stored(h: &Hooked, user_id: i64) -> Vec<String> {
    h.cluster
        .stores
        .messages
        .sync(user_id, 0, 100)
        .await
        .expect("store read")
        .iter()
        .map(|m| String::from_utf8_lossy(&m.content).into_owned())
        .collect()
}

/// Allow delivers as sent; reject gives the sender `HOOK_REJECTED` with the backend's code and text and
/// leaves nothing anywhere (no push, no sync, no inbox entry, no seq used), and its resend is asked
/// again; replace stores and delivers the backend's content and says so in the ACK (also to a resend);
/// group and room sends are checked too, over HTTP as well (403 `hook_rejected`). Every request is signed.
async fn allow_reject_and_replace(h: &Hooked) {
    let alice = h.cluster.user("alice").await;
    let bob = h.cluster.user("bob").await;
    let mut a = h.cluster.connect(Transport::Tcp, 0, &alice).await;
    let mut b = h.cluster.connect(Transport::Ws, 1, &bob).await;
    let uid = ReceiverType::User;

    let first = send(&mut a, uid, bob.user_id, "ok-1", "hello bob")
        .await
        .expect("allowed");
    assert!(!first.content_replaced && first.content.is_empty());
    assert_eq!(
        String::from_utf8_lossy(&next_message(&mut b).await.content),
        "hello bob"
    );
    let call = h.backend.calls_for("ok-1");
    assert_eq!(call.len(), 1, "{call:?}");
    let body = &call[0].body;
    assert_eq!(body["event"], "before_send");
    assert_eq!(body["sender"]["user_id"], alice.user_id);
    assert_eq!(body["sender"]["device_id"], alice.device_id);
    assert_eq!(body["receiver"]["type"], "user");
    assert_eq!(body["receiver"]["id"], bob.user_id);
    assert_eq!(body["content_type"], 1);

    let e = send(
        &mut a,
        uid,
        bob.user_id,
        "bad-1",
        "reject: buy now http://x",
    )
    .await
    .expect_err("rejected");
    assert_eq!(code(&e), ErrorCode::HookRejected, "{e:?}");
    assert_eq!(
        (e.hook_code, e.message.as_str()),
        (REJECT_CODE, REJECT_TEXT)
    );
    assert_quiet(&mut b).await;
    assert_eq!(synced(&mut b).await, ["hello bob"]);
    assert_eq!(synced(&mut a).await, ["hello bob"]);
    assert_eq!(stored(h, bob.user_id).await, ["hello bob"]);
    assert_eq!(stored(h, alice.user_id).await, ["hello bob"]);
    // A resend is asked again (nothing remembered the rejection) and rejected again.
    let e = send(
        &mut a,
        uid,
        bob.user_id,
        "bad-1",
        "reject: buy now http://x",
    )
    .await
    .expect_err("rejected again");
    assert_eq!(code(&e), ErrorCode::HookRejected);
    assert_eq!(h.backend.calls_for("bad-1").len(), 2);
    // No seq was used: the next message follows the first one directly.
    let next = send(&mut a, uid, bob.user_id, "ok-2", "still here")
        .await
        .expect("allowed");
    assert_eq!(next.seq, first.seq + 1, "a rejected message took no seq");
    assert_eq!(
        String::from_utf8_lossy(&next_message(&mut b).await.content),
        "still here"
    );

    let out = send(&mut a, uid, bob.user_id, "swap-1", "replace: darn")
        .await
        .expect("replaced");
    assert!(
        out.content_replaced && out.content == REDACTED.as_bytes(),
        "{out:?}"
    );
    let m = next_message(&mut b).await;
    assert_eq!(String::from_utf8_lossy(&m.content), REDACTED);
    assert_eq!(m.message_id, out.message_id);
    assert_eq!(
        stored(h, bob.user_id).await.last().map(String::as_str),
        Some(REDACTED)
    );
    // The resend (content as the client wrote it) is the same message: a duplicate, still replaced.
    let again = send(&mut a, uid, bob.user_id, "swap-1", "replace: darn")
        .await
        .expect("resend");
    assert!(again.duplicate && again.content_replaced, "{again:?}");
    assert_eq!(
        (again.message_id, again.content.as_ref()),
        (out.message_id, REDACTED.as_bytes())
    );
    let _ = next_message(&mut b).await; // the resend's republish (at least once)

    // Over HTTP the answer says so too, with the stored content and the conversation seq.
    let b64 = base64::engine::general_purpose::STANDARD;
    let answer = reqwest::Client::new()
        .post(format!("{}/v1/messages", h.cluster.api_base))
        .bearer_auth(&alice.token)
        .json(
            &serde_json::json!({"receiver_type": "user", "receiver_id": bob.user_id,
            "client_msg_id": "swap-http", "content": b64.encode("replace: heck")}),
        )
        .send()
        .await
        .expect("http send");
    assert_eq!(answer.status(), 200);
    let sent: serde_json::Value = answer.json().await.expect("a JSON answer");
    assert_eq!(sent["content_replaced"], true, "{sent}");
    assert_eq!(sent["content"], b64.encode(REDACTED), "{sent}");
    let m = next_message(&mut b).await;
    assert_eq!(String::from_utf8_lossy(&m.content), REDACTED);
    assert_eq!(sent["conv_seq"], m.conv_seq, "{sent}");
    // A rejection over HTTP: 403 hook_rejected with the backend's code and text.
    let (status, body) =
        http_send(h, &alice, "user", bob.user_id, "bad-http", "reject: spam").await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        body,
        serde_json::json!({"error": {"code": "hook_rejected", "message": REJECT_TEXT,
            "hook_code": REJECT_CODE}})
    );
    assert_quiet(&mut b).await;

    let every_call_signed = h.backend.calls().iter().all(|c| c.signed);
    assert!(every_call_signed, "{:?}", h.backend.calls());

    // Groups.
    let gid = h.cluster.group(&alice, &[&bob]).await;
    let e = send(&mut a, ReceiverType::Group, gid, "g-bad", "reject: spam")
        .await
        .expect_err("group reject");
    assert_eq!(
        (code(&e), e.hook_code),
        (ErrorCode::HookRejected, REJECT_CODE)
    );
    assert_eq!(
        h.backend.calls_for("g-bad")[0].body["receiver"]["type"],
        "group"
    );
    let (status, body) = http_send(h, &alice, "group", gid, "g-bad-http", "reject: spam").await;
    assert_eq!(
        (status, &body["error"]["code"], &body["error"]["hook_code"]),
        (403, &"hook_rejected".into(), &REJECT_CODE.into()),
        "{body}"
    );
    assert_quiet(&mut b).await;

    // Rooms: the viewer gets the replacement.
    let room = fresh_room_id();
    for c in [&mut a, &mut b] {
        join_room(c, room, WAIT).await;
    }
    let e = send(&mut a, ReceiverType::Room, room, "", "reject: flood")
        .await
        .expect_err("room reject");
    assert_eq!(code(&e), ErrorCode::HookRejected);
    let out = send(&mut a, ReceiverType::Room, room, "", "replace: boo")
        .await
        .expect("room replace");
    assert!(out.content_replaced, "{out:?}");
    // The next room frame with a message in it (online-count refreshes and join notices skipped).
    let contents = loop {
        let p = b
            .recv(WAIT)
            .await
            .expect("a room frame in time")
            .expect("connection open");
        if let Some(Body::RoomMessages(r)) = p.body {
            let c: Vec<String> = r
                .messages
                .iter()
                .filter(|m| m.content_type >= 0)
                .map(|m| String::from_utf8_lossy(&m.content).into_owned())
                .collect();
            if !c.is_empty() {
                break c;
            }
        }
    };
    assert_eq!(contents, [REDACTED]);
}

/// `POST /v1/messages` as `user`: the status and the JSON body.
async fn http_send(
    h: &Hooked,
    user: &Credentials,
    receiver_type: &str,
    receiver_id: i64,
    client_msg_id: &str,
    content: &str,
) -> (u16, serde_json::Value) {
    let b64 = base64::engine::general_purpose::STANDARD;
    let answer = reqwest::Client::new()
        .post(format!("{}/v1/messages", h.cluster.api_base))
        .bearer_auth(&user.token)
        .json(
            &serde_json::json!({"receiver_type": receiver_type, "receiver_id": receiver_id,
            "client_msg_id": client_msg_id, "content": b64.encode(content)}),
        )
        .send()
        .await
        .expect("http send");
    let status = answer.status().as_u16();
    (status, answer.json().await.expect("a JSON answer"))
}

/// The crash window of a send (its plan stored, no inbox entry yet: see tests/it/replay.rs) closed by a
/// resend: the hook is asked again, so a replacement is not lost and a rejection still holds.
async fn a_resend_after_a_crash_is_asked_again(h: &Hooked) {
    let alice = h.cluster.user("alice").await;
    let bob = h.cluster.user("bob").await;
    let mut a = h.cluster.connect(Transport::Tcp, 0, &alice).await;
    let mut b = h.cluster.connect(Transport::Tcp, 1, &bob).await;
    let stores = &h.cluster.stores;
    for (n, (id, content)) in [("crash-swap", "replace: darn"), ("crash-bad", "reject: x")]
        .into_iter()
        .enumerate()
    {
        let seqs = stores
            .seq
            .next(&[alice.user_id, bob.user_id])
            .await
            .expect("seqs");
        let plan = zhibo_store::SendPlan {
            message_id: 0x600d_0000_0000_0000 ^ (alice.user_id as u64) << 2 ^ n as u64,
            seq: seqs[0],
            server_time_ms: 1_000,
            recipients: vec![(alice.user_id, seqs[0]), (bob.user_id, seqs[1])],
            conv_seq: 0,
        };
        assert!(stores
            .messages
            .put_dedup_if_absent(alice.device_id, id, &plan)
            .await
            .expect("plan stored as the worker would")
            .is_none());
        let answer = send(&mut a, ReceiverType::User, bob.user_id, id, content).await;
        assert_eq!(h.backend.calls_for(id).len(), 1, "{id}: asked again");
        if n == 0 {
            let out = answer.expect("completed");
            assert!(out.duplicate && out.content_replaced, "{out:?}");
            assert_eq!(out.message_id, plan.message_id);
            let m = next_message(&mut b).await;
            assert_eq!(
                (m.message_id, String::from_utf8_lossy(&m.content).as_ref()),
                (plan.message_id, REDACTED)
            );
        } else {
            let e = answer.expect_err("still rejected");
            assert_eq!(code(&e), ErrorCode::HookRejected, "{e:?}");
        }
    }
    assert_eq!(stored(h, bob.user_id).await, [REDACTED]);
    assert_quiet(&mut b).await;
}

/// Fail open: a timeout, a 500 and an answer that is not JSON each store the message as sent.
async fn failures_fail_open(h: &Hooked) {
    let alice = h.cluster.user("alice").await;
    let bob = h.cluster.user("bob").await;
    let mut a = h.cluster.connect(Transport::Tcp, 0, &alice).await;
    let mut b = h.cluster.connect(Transport::Tcp, 1, &bob).await;
    for (id, content) in [("t", "slow down"), ("f", "fail me"), ("g", "garbage in")] {
        let started = tokio::time::Instant::now();
        let out = send(&mut a, ReceiverType::User, bob.user_id, id, content)
            .await
            .unwrap_or_else(|e| panic!("{content}: stored as sent, got {e:?}"));
        assert!(!out.content_replaced);
        assert_eq!(
            String::from_utf8_lossy(&next_message(&mut b).await.content),
            content
        );
        assert_eq!(h.backend.calls_for(id).len(), 1, "{content}");
        if id == "t" {
            assert!(
                started.elapsed() >= Duration::from_millis(1400),
                "waited the timeout"
            );
        }
    }
    assert_eq!(
        stored(h, bob.user_id).await,
        ["slow down", "fail me", "garbage in"]
    );
}

/// Fail closed: a timeout, a 500 and an answer that is not JSON each refuse the message with
/// `UNAVAILABLE` (retry with the same client_msg_id; a room send: send again) and store nothing; an
/// allowed send still works.
async fn failures_fail_closed(h: &Hooked) {
    let alice = h.cluster.user("alice").await;
    let bob = h.cluster.user("bob").await;
    let mut a = h.cluster.connect(Transport::Tcp, 0, &alice).await;
    let mut b = h.cluster.connect(Transport::Tcp, 1, &bob).await;
    for (id, content) in [("t", "slow down"), ("f", "fail me"), ("g", "garbage in")] {
        let e = send(&mut a, ReceiverType::User, bob.user_id, id, content)
            .await
            .expect_err("refused");
        assert_eq!(code(&e), ErrorCode::Unavailable, "{content}: {e:?}");
        assert!(e.message.contains("same client_msg_id"), "{e:?}");
    }
    // Over HTTP: 503, and the text says which retry is safe.
    let (status, body) = http_send(h, &alice, "user", bob.user_id, "f-http", "fail me").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    let text = body["error"]["message"].as_str().unwrap_or_default();
    assert!(text.contains("same client_msg_id"), "{body}");
    // A room send has no dedup: it is told to send again, not to reuse a client_msg_id.
    let room = fresh_room_id();
    join_room(&mut a, room, WAIT).await;
    let e = send(&mut a, ReceiverType::Room, room, "", "fail me")
        .await
        .expect_err("refused");
    assert_eq!(code(&e), ErrorCode::Unavailable, "{e:?}");
    assert!(
        e.message.contains("send again") && !e.message.contains("client_msg_id"),
        "{e:?}"
    );
    assert_quiet(&mut b).await;
    assert!(stored(h, bob.user_id).await.is_empty());
    assert!(stored(h, alice.user_id).await.is_empty());
    send(&mut a, ReceiverType::User, bob.user_id, "ok", "fine")
        .await
        .expect("allowed");
    assert_eq!(
        String::from_utf8_lossy(&next_message(&mut b).await.content),
        "fine"
    );
}

/// With no hook configured, sends never call the backend (which is up and listening).
async fn unconfigured_calls_nothing(h: &Hooked) {
    let alice = h.cluster.user("alice").await;
    let bob = h.cluster.user("bob").await;
    let mut a = h.cluster.connect(Transport::Tcp, 0, &alice).await;
    let mut b = h.cluster.connect(Transport::Tcp, 1, &bob).await;
    for (i, content) in ["reject: x", "replace: y", "fail"].iter().enumerate() {
        let out = send(
            &mut a,
            ReceiverType::User,
            bob.user_id,
            &format!("m{i}"),
            content,
        )
        .await
        .expect("stored");
        assert!(!out.content_replaced);
        assert_eq!(
            String::from_utf8_lossy(&next_message(&mut b).await.content),
            *content
        );
    }
    assert!(h.backend.calls().is_empty(), "{:?}", h.backend.calls());
}

mod open {
    use super::{FailurePolicy, Hooked};
    hooked!(Open, Some(FailurePolicy::Open));
    both_modes!(
        super::Open,
        2,
        allow_reject_and_replace,
        failures_fail_open,
        a_resend_after_a_crash_is_asked_again
    );
    use super::{
        a_resend_after_a_crash_is_asked_again, allow_reject_and_replace, failures_fail_open,
    };
}

mod closed {
    use super::{FailurePolicy, Hooked};
    hooked!(Closed, Some(FailurePolicy::Closed));
    both_modes!(super::Closed, 2, failures_fail_closed);
    use super::failures_fail_closed;
}

mod off {
    use super::Hooked;
    hooked!(Off, None);
    both_modes!(super::Off, 2, unconfigured_calls_nothing);
    use super::unconfigured_calls_nothing;
}
