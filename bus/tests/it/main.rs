//! One behaviour suite for every bus backend: the in-process bus and real NATS.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use zhibo_bus::memory::MemoryBus;
use zhibo_bus::nats::{NatsBus, NatsOptions};
use zhibo_bus::{Bus, BusMessage, Handler, Subject, Subscription};

async fn recv(sub: &mut Subscription) -> Option<zhibo_bus::BusMessage> {
    tokio::time::timeout(Duration::from_millis(500), sub.next())
        .await
        .ok()
        .flatten()
}

/// A unique subject per test run (subjects are built by the subject module only).
fn room() -> Subject {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    Subject::room(n & 0x7fff_ffff_ffff ^ i64::from(std::process::id()))
}

async fn conformance(bus: Arc<dyn Bus>) {
    // Fan-out: both plain subscribers get every message, in order, with headers.
    let subject = room();
    let mut a = bus.subscribe(&subject).await.expect("subscribe a");
    let mut b = bus.subscribe(&subject).await.expect("subscribe b");
    bus.flush().await.expect("flush");
    for i in 0..10u8 {
        bus.publish(
            &subject,
            vec![("traceparent".into(), format!("t{i}"))],
            Bytes::from(vec![i]),
        )
        .await
        .expect("publish");
    }
    for sub in [&mut a, &mut b] {
        for i in 0..10u8 {
            let m = recv(sub).await.expect("message arrives");
            assert_eq!(m.payload.as_ref(), &[i]);
            assert_eq!(m.subject, subject.as_str());
            assert!(m
                .headers
                .iter()
                .any(|(k, v)| k == "traceparent" && v == &format!("t{i}")));
        }
    }

    // Queue group: each message reaches exactly one member.
    let subject = room();
    let mut q1 = bus.queue_subscribe(&subject, "logic").await.expect("q1");
    let mut q2 = bus.queue_subscribe(&subject, "logic").await.expect("q2");
    bus.flush().await.expect("flush");
    for i in 0..20u8 {
        bus.publish(&subject, vec![], Bytes::from(vec![i]))
            .await
            .expect("publish");
    }
    let mut got = Vec::new();
    while let Some(m) = recv(&mut q1).await {
        got.push(m.payload[0]);
    }
    while let Some(m) = recv(&mut q2).await {
        got.push(m.payload[0]);
    }
    got.sort_unstable();
    assert_eq!(got, (0..20u8).collect::<Vec<_>>(), "each message once");

    // Dropping a subscription stops its traffic; the other keeps receiving.
    let subject = room();
    let keep = bus.subscribe(&subject).await.expect("keep");
    let gone = bus.subscribe(&subject).await.expect("gone");
    drop(gone);
    let mut keep = keep;
    bus.flush().await.expect("flush");
    bus.publish(&subject, vec![], Bytes::from_static(b"x"))
        .await
        .expect("publish after drop");
    assert_eq!(recv(&mut keep).await.expect("kept").payload.as_ref(), b"x");

    // Handler subscriptions: every message, in order, with headers, beside a stream subscriber; none
    // once dropped.
    let subject = room();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let handler: Handler = Arc::new(move |m: &BusMessage| {
        let _ = tx.send((m.subject.clone(), m.payload.clone(), m.headers.clone()));
    });
    let handled = bus
        .subscribe_handler(&subject, handler)
        .await
        .expect("subscribe handler");
    let mut stream = bus.subscribe(&subject).await.expect("stream beside it");
    bus.flush().await.expect("flush");
    for i in 0..10u8 {
        bus.publish(
            &subject,
            vec![("h".into(), format!("{i}"))],
            Bytes::from(vec![i]),
        )
        .await
        .expect("publish");
    }
    for i in 0..10u8 {
        let (s, payload, headers) = tokio::time::timeout(Duration::from_millis(500), rx.recv())
            .await
            .expect("handler called in time")
            .expect("handler alive");
        assert_eq!((s.as_str(), payload.as_ref()), (subject.as_str(), &[i][..]));
        assert_eq!(headers, vec![("h".to_owned(), format!("{i}"))]);
        assert_eq!(
            recv(&mut stream)
                .await
                .expect("stream too")
                .payload
                .as_ref(),
            &[i]
        );
    }
    drop(handled);
    bus.flush().await.expect("flush");
    bus.publish(&subject, vec![], Bytes::from_static(b"after"))
        .await
        .expect("publish after drop");
    assert_eq!(
        recv(&mut stream).await.expect("stream").payload.as_ref(),
        b"after"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .map_or(true, |m| m.is_none()),
        "a dropped handler subscription is called no more"
    );
    assert!(bus.is_connected());
}

#[tokio::test]
async fn memory_bus_conformance() {
    conformance(Arc::new(MemoryBus::new())).await;
}

#[tokio::test]
async fn memory_bus_forgets_subjects_without_subscribers() {
    let bus = MemoryBus::new();
    let s = bus.subscribe(&Subject::room(1)).await.expect("subscribe");
    assert_eq!(bus.subject_count(), 1);
    drop(s);
    assert_eq!(bus.subject_count(), 0);
    let h = bus
        .subscribe_handler(&Subject::gateway_users("g1"), Arc::new(|_: &BusMessage| {}))
        .await
        .expect("subscribe handler");
    assert_eq!(bus.subject_count(), 1);
    drop(h);
    assert_eq!(
        bus.subject_count(),
        0,
        "a dropped handler leaves no subject behind"
    );

    // A handler runs outside the bus's lock: it may use the bus itself, and even drop its own
    // subscription (as a gateway does when a delivery releases the last reference to its hub).
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let slot: Arc<std::sync::Mutex<Option<zhibo_bus::HandlerSubscription>>> = Arc::default();
    let handler: Handler = {
        let (bus, seen, slot) = (bus.clone(), seen.clone(), slot.clone());
        Arc::new(move |_: &BusMessage| {
            seen.lock().expect("seen").push(bus.subject_count());
            drop(slot.lock().expect("slot").take());
        })
    };
    let sub = bus
        .subscribe_handler(&Subject::gateway_users("g2"), handler)
        .await
        .expect("subscribe handler");
    *slot.lock().expect("slot") = Some(sub);
    // On a thread of its own, so that a deadlock fails the test instead of hanging it.
    let (done, finished) = std::sync::mpsc::channel();
    let publisher = bus.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let r = rt.block_on(publisher.publish(
            &Subject::gateway_users("g2"),
            vec![],
            Bytes::from_static(b"x"),
        ));
        let _ = done.send(r.is_ok());
    });
    assert_eq!(
        finished.recv_timeout(Duration::from_secs(5)),
        Ok(true),
        "the publish completed (no deadlock on the bus lock)"
    );
    assert_eq!(*seen.lock().expect("seen"), [1]);
    assert_eq!(
        bus.subject_count(),
        0,
        "the handler dropped its own subscription"
    );
}

#[tokio::test]
async fn nats_bus_conformance() {
    let url = zhibo_testkit::nats_url();
    zhibo_testkit::require_tcp(url.trim_start_matches("nats://"), "NATS").await;
    let bus = NatsBus::connect(&url, "zhibo-bus-test")
        .await
        .expect("connect to NATS");
    conformance(Arc::new(bus)).await;
}

#[tokio::test]
async fn nats_connect_error_is_clear() {
    // Nothing listens on port 1 of loopback.
    let err = NatsBus::connect("nats://127.0.0.1:1", "x")
        .await
        .expect_err("no server there");
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
}

/// An address that accepts but never speaks NATS (a blackhole; the Redis port by mistake, which
/// answers in its own protocol) fails the connection within `CONNECT_WAIT` instead of holding the
/// start for good.
#[tokio::test]
async fn a_server_that_never_speaks_nats_fails_the_connection() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    for speaks in [None, Some(&b"-ERR unknown command 'CONNECT'\r\n"[..])] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                if let Some(reply) = speaks {
                    // Answers whatever comes in its own protocol, never with NATS' INFO.
                    let _ = socket.write_all(reply).await;
                    let mut buf = [0u8; 1024];
                    let _ = socket.read(&mut buf).await;
                    let _ = socket.write_all(reply).await;
                }
                held.push(socket);
            }
        });
        let err = tokio::time::timeout(
            zhibo_bus::nats::CONNECT_WAIT + std::time::Duration::from_secs(10),
            NatsBus::connect(&format!("nats://{addr}"), "x"),
        )
        .await
        .expect("gave up within CONNECT_WAIT")
        .expect_err("not a NATS server");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
        server.abort();
    }
}

/// `nats_url` is a comma-separated list of seeds: a dead first server does not stop the connection.
#[tokio::test]
async fn nats_url_takes_a_list_of_servers() {
    let url = zhibo_testkit::require_nats().await;
    let bus = NatsBus::connect(&format!("nats://127.0.0.1:1, {url}"), "zhibo-bus-test")
        .await
        .expect("connect through the second server of the list");
    round_trip(&bus).await;
    let err = NatsBus::connect("nats://127.0.0.1:1,nats://[bad", "x")
        .await
        .expect_err("a malformed URL in the list");
    assert!(err.to_string().contains("invalid"), "{err}");
}

#[tokio::test]
async fn memory_bus_drops_for_a_full_subscriber_instead_of_waiting() {
    let bus = MemoryBus::new();
    let subject = Subject::room(9);
    // A subscriber that never reads (e.g. a task publishing to a subject it also reads).
    let _stuck = bus.subscribe(&subject).await.expect("subscribe");
    let publish_all = async {
        for i in 0..8200u32 {
            bus.publish(&subject, vec![], Bytes::from(i.to_be_bytes().to_vec()))
                .await
                .expect("publish");
        }
    };
    tokio::time::timeout(Duration::from_secs(5), publish_all)
        .await
        .expect("publishing never waits on a full subscriber");
    assert_eq!(bus.dropped(), 8200 - 8192);
}

/// A private nats-server that wants `zhibo` / `the-nats-password`.
fn authed_server() -> zhibo_testkit::NatsServer {
    zhibo_testkit::NatsServer::start(
        r#"authorization { users = [ { user: "zhibo", password: "the-nats-password" } ] }"#,
    )
}

async fn round_trip(bus: &NatsBus) {
    let subject = room();
    let mut sub = bus.subscribe(&subject).await.expect("subscribe");
    bus.flush().await.expect("flush");
    bus.publish(&subject, vec![], Bytes::from_static(b"hi"))
        .await
        .expect("publish");
    let got = recv(&mut sub).await.expect("message");
    assert_eq!(got.payload, Bytes::from_static(b"hi"));
}

#[tokio::test]
async fn nats_user_and_password_authenticate() {
    let server = authed_server();
    let mut options = NatsOptions::new(server.url());
    options.user = "zhibo".into();
    options.password = "the-nats-password".into();
    let bus = NatsBus::connect_with(&options, "auth-test")
        .await
        .expect("right credentials");
    round_trip(&bus).await;
    // The same credentials in the URL.
    let url = format!("nats://zhibo:the-nats-password@127.0.0.1:{}", server.port());
    round_trip(
        &NatsBus::connect(&url, "auth-test")
            .await
            .expect("URL credentials"),
    )
    .await;
}

#[tokio::test]
async fn nats_bad_credentials_fail_without_printing_them() {
    let server = authed_server();
    let mut wrong = NatsOptions::new(server.url());
    wrong.user = "zhibo".into();
    wrong.password = "not-the-password".into();
    let url_wrong = NatsOptions::new(format!(
        "nats://zhibo:not-the-password@127.0.0.1:{}",
        server.port()
    ));
    for options in [wrong, url_wrong, NatsOptions::new(server.url())] {
        let err = NatsBus::connect_with(&options, "auth-test")
            .await
            .expect_err("refused");
        let text = err.to_string();
        assert!(!text.contains("not-the-password"), "{text}");
        assert!(
            text.contains(&format!("127.0.0.1:{}", server.port())),
            "{text}"
        );
        assert!(text.to_lowercase().contains("auth"), "says why: {text}");
    }
}

#[tokio::test]
async fn nats_token_authenticates() {
    let server = zhibo_testkit::NatsServer::start(r#"authorization { token: "s3cr3t-token" }"#);
    let mut options = NatsOptions::new(server.url());
    options.token = "s3cr3t-token".into();
    round_trip(
        &NatsBus::connect_with(&options, "token-test")
            .await
            .expect("token"),
    )
    .await;
    options.token = "other-token".into();
    let err = NatsBus::connect_with(&options, "token-test")
        .await
        .expect_err("wrong token");
    assert!(!err.to_string().contains("other-token"), "{err}");
}

/// A CA and a certificate for 127.0.0.1 signed by it, written to `dir`: (ca.pem, cert.pem, key.pem).
fn tls_files(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("params")
        .signed_by(&key, &ca, &ca_key)
        .expect("cert");
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, ca.pem()).expect("write ca");
    std::fs::write(&paths.1, cert.pem()).expect("write cert");
    std::fs::write(&paths.2, key.serialize_pem()).expect("write key");
    paths
}

/// A NATS server that requires TLS and a password: zhibo connects with `tls_ca` and credentials;
/// without the CA the server's certificate is refused.
#[tokio::test]
async fn nats_tls_with_a_private_ca() {
    let dir = std::env::temp_dir().join(zhibo_testkit::unique_name("natstls"));
    std::fs::create_dir_all(&dir).expect("dir");
    let (ca, cert, key) = tls_files(&dir);
    let server = zhibo_testkit::NatsServer::start(&format!(
        "tls {{ cert_file: {cert:?}, key_file: {key:?} }}\n\
         authorization {{ users = [ {{ user: \"zhibo\", password: \"tls-pass\" }} ] }}"
    ));
    let mut options = NatsOptions::new(server.url());
    options.user = "zhibo".into();
    options.password = "tls-pass".into();
    options.tls_ca = Some(ca);
    round_trip(
        &NatsBus::connect_with(&options, "tls-test")
            .await
            .expect("TLS"),
    )
    .await;
    options.tls_ca = None;
    options.tls_required = true;
    let err = NatsBus::connect_with(&options, "tls-test")
        .await
        .expect_err("an unknown CA is refused");
    assert!(!err.to_string().contains("tls-pass"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// An nkey user: the seed signs the server's nonce; another seed is refused and never printed.
#[tokio::test]
async fn nats_nkey_authenticates() {
    let user = nkeys::KeyPair::new_user();
    let server = zhibo_testkit::NatsServer::start(&format!(
        "authorization {{ users = [ {{ nkey: {:?} }} ] }}",
        user.public_key()
    ));
    let mut options = NatsOptions::new(server.url());
    options.nkey_seed = user.seed().expect("seed");
    round_trip(
        &NatsBus::connect_with(&options, "nkey-test")
            .await
            .expect("nkey"),
    )
    .await;
    let other = nkeys::KeyPair::new_user().seed().expect("seed");
    options.nkey_seed = other.clone();
    let err = NatsBus::connect_with(&options, "nkey-test")
        .await
        .expect_err("unknown nkey");
    assert!(!err.to_string().contains(&other), "{err}");
}

/// A creds file that cannot be read fails the connect with its path named.
#[tokio::test]
async fn nats_missing_creds_file_is_named() {
    let server = authed_server();
    let mut options = NatsOptions::new(server.url());
    options.creds_file = Some("/nonexistent/zhibo.creds".into());
    let err = NatsBus::connect_with(&options, "creds-test")
        .await
        .expect_err("no file");
    assert!(
        err.to_string().contains("/nonexistent/zhibo.creds"),
        "{err}"
    );
}
