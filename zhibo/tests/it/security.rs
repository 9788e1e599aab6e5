//! The operator side of security, checked on the real binary and real servers: token secrets refused
//! before anything binds, NATS authentication.

use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncBufReadExt;
use zhibo_loadtest::client::Transport;
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{ReceiverType, SendMessageInput};

use crate::cluster::{Cluster, SECRET};

/// `zhibo <role>` with only `env` as its `ZHIBO_*` configuration (none inherited from the test run).
fn zhibo(role: &str, env: &[(&str, &str)]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_zhibo"));
    for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("ZHIBO_")) {
        command.env_remove(name);
    }
    command
        .arg(role)
        .envs(env.iter().copied())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Runs `command` to its end (bounded) and returns (exit code, stdout + stderr).
async fn exit_of(mut command: tokio::process::Command) -> (Option<i32>, String) {
    let out = tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("exited in time")
        .expect("ran");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// Loopback port-0 listeners for every role, so a process that does start binds nothing shared.
const LOOPBACK: [(&str, &str); 5] = [
    ("ZHIBO_API_ADDR", "127.0.0.1:0"),
    ("ZHIBO_GATEWAY__TCP_ADDR", "127.0.0.1:0"),
    ("ZHIBO_GATEWAY__WS_ADDR", "127.0.0.1:0"),
    ("ZHIBO_GATEWAY__QUIC_ADDR", "127.0.0.1:0"),
    ("ZHIBO_METRICS_ADDR", ""),
];

#[tokio::test]
async fn distributed_roles_refuse_a_short_token_secret() {
    let nats = zhibo_testkit::nats_url();
    for role in ["gateway", "logic-worker", "user-api"] {
        let mut env = LOOPBACK.to_vec();
        env.extend([
            ("ZHIBO_TOKEN_SECRET", "change-me"),
            ("ZHIBO_BUS__NATS_URL", nats.as_str()),
        ]);
        let (code, text) = exit_of(zhibo(role, &env)).await;
        assert_eq!(code, Some(64), "{role}: {text}");
        assert!(text.contains("at least 32"), "{role}: {text}");
        assert!(
            !text.contains("change-me"),
            "{role} printed the secret: {text}"
        );
    }
}

#[tokio::test]
async fn dev_refuses_its_public_secret_beyond_loopback() {
    for (name, addr) in [
        ("ZHIBO_GATEWAY__WS_ADDR", "0.0.0.0:0"),
        ("ZHIBO_API_ADDR", "0.0.0.0:0"),
        ("ZHIBO_METRICS_ADDR", "0.0.0.0:0"),
    ] {
        let mut env: Vec<(&str, &str)> = LOOPBACK
            .iter()
            .filter(|(n, _)| *n != name)
            .copied()
            .collect();
        env.extend([(name, addr), ("ZHIBO_STORE__PATH", "")]);
        let (code, text) = exit_of(zhibo("dev", &env)).await;
        assert_eq!(code, Some(64), "{name}={addr}: {text}");
        assert!(text.contains("public development token secret"), "{text}");
        assert!(!text.contains("zhibo dev is running"), "{text}");
        // A short secret of one's own is no better.
        env.push(("ZHIBO_TOKEN_SECRET", "short"));
        let (code, text) = exit_of(zhibo("dev", &env)).await;
        assert_eq!(code, Some(64), "{name}={addr}: {text}");
        assert!(text.contains("shorter than 32"), "{text}");
    }
}

/// Waits until `command`'s stdout prints `needle`; returns the running child.
async fn started(mut command: tokio::process::Command, needle: &str) -> tokio::process::Child {
    let mut child = command.spawn().expect("spawn zhibo");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let wait = async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            if line.contains(needle) {
                return;
            }
        }
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            use tokio::io::AsyncReadExt;
            e.read_to_string(&mut err).await.ok();
        }
        panic!("zhibo exited before printing {needle:?}: {err}");
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .unwrap_or_else(|_| panic!("no {needle:?} in time"));
    child
}

#[tokio::test]
async fn dev_starts_on_loopback_and_with_a_real_secret_anywhere() {
    let mut env = LOOPBACK.to_vec();
    env.push(("ZHIBO_STORE__PATH", ""));
    let mut dev = started(zhibo("dev", &env), "zhibo dev is running").await;
    dev.kill().await.expect("kill");
    let secret = "0123456789abcdef0123456789abcdef";
    env.extend([
        ("ZHIBO_GATEWAY__TCP_ADDR", "0.0.0.0:0"),
        ("ZHIBO_TOKEN_SECRET", secret),
    ]);
    let mut dev = started(zhibo("dev", &env), "zhibo dev is running").await;
    dev.kill().await.expect("kill");
}

const NATS_PASSWORD: &str = "the-bus-password-4f2a";

/// A private nats-server that wants user `zhibo` with [`NATS_PASSWORD`].
fn authed_nats() -> zhibo_testkit::NatsServer {
    zhibo_testkit::NatsServer::start(&format!(
        r#"authorization {{ users = [ {{ user: "zhibo", password: "{NATS_PASSWORD}" }} ] }}"#
    ))
}

/// A distributed cluster on a NATS server that requires a password: every node (and a logic worker
/// process, the only one consuming commands) connects with `bus.nats_user` / `bus.nats_password`,
/// and a 1:1 message goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_runs_on_a_nats_server_with_authentication() {
    let nats = authed_nats();
    let cluster = Cluster::distributed_tweaked(0, |c| {
        c.bus.nats_url = nats.url();
        c.bus.nats_user = "zhibo".into();
        c.bus.nats_password = NATS_PASSWORD.into();
    })
    .await;
    let _worker = cluster.spawn_worker_process().await;
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    cluster.befriend(&alice, &bob).await;
    let mut a = cluster.connect(Transport::Tcp, 0, &alice).await;
    let mut b = cluster.connect(Transport::Ws, 1, &bob).await;
    let send = Body::SendMessage(SendMessageInput {
        receiver_type: ReceiverType::User as i32,
        receiver_id: bob.user_id,
        client_msg_id: "auth-1".into(),
        content_type: 1,
        content: Bytes::from_static(b"over an authenticated bus"),
        ..Default::default()
    });
    let reply = a
        .request(send, Duration::from_secs(15))
        .await
        .expect("reply");
    assert!(
        matches!(reply.body, Some(Body::SendMessageOutput(ref o)) if o.seq > 0),
        "{reply:?}"
    );
    let delivered = async {
        loop {
            let p = b
                .recv(Duration::from_secs(15))
                .await
                .expect("packet")
                .expect("open");
            if let Some(Body::Message(m)) = p.body {
                return m;
            }
        }
    };
    let m = delivered.await;
    assert_eq!(&m.content[..], b"over an authenticated bus");
    assert_eq!(m.sender_user_id, alice.user_id);
    cluster.stop().await;
}

/// Wrong or missing NATS credentials: the role exits at start with a message that names the server and
/// the refusal, never the password.
#[tokio::test]
async fn wrong_nats_credentials_fail_the_start_without_printing_them() {
    let nats = authed_nats();
    let url_with_password = format!("nats://zhibo:wrong-pass-9c1d@127.0.0.1:{}", nats.port());
    let url = nats.url();
    let cases: [&[(&str, &str)]; 3] = [
        &[
            ("ZHIBO_BUS__NATS_URL", &url),
            ("ZHIBO_BUS__NATS_USER", "zhibo"),
            ("ZHIBO_BUS__NATS_PASSWORD", "wrong-pass-9c1d"),
        ],
        &[("ZHIBO_BUS__NATS_URL", &url_with_password)],
        &[("ZHIBO_BUS__NATS_URL", &url)],
    ];
    for case in cases {
        let mut env = LOOPBACK.to_vec();
        // NATS is connected first: the store is never reached.
        env.push(("ZHIBO_TOKEN_SECRET", SECRET));
        env.push(("ZHIBO_STORE__KIND", "scylla"));
        env.extend_from_slice(case);
        let (code, text) = exit_of(zhibo("logic-worker", &env)).await;
        assert_eq!(code, Some(1), "{case:?}: {text}");
        assert!(text.contains("connecting to NATS"), "{text}");
        assert!(text.contains("authorization violation"), "{text}");
        assert!(
            text.contains(&format!("127.0.0.1:{}", nats.port())),
            "{text}"
        );
        assert!(
            !text.contains("wrong-pass-9c1d"),
            "the password was printed: {text}"
        );
    }
}

/// The status line of a WebSocket handshake sent by hand to `ws`, with `origin` if given.
async fn ws_handshake_status(ws: std::net::SocketAddr, origin: Option<&str>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(ws).await.expect("connect");
    let origin = origin
        .map(|o| format!("Origin: {o}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "GET /ws?user_id=1&device_id=1&token=x HTTP/1.1\r\nHost: {ws}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n{origin}\r\n"
    );
    s.write_all(request.as_bytes()).await.expect("write");
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 512];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("an answer in time");
    String::from_utf8_lossy(&got)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// With `gateway.ws_allowed_origins` set, a browser page from another origin gets 403 at the
/// handshake; the listed origin and clients that send no Origin are let through.
async fn ws_origin_allow_list(cluster: &Cluster) {
    let ws = cluster.gw(0).ws;
    let status = ws_handshake_status(ws, Some("https://evil.example")).await;
    assert!(status.starts_with("HTTP/1.1 403"), "{status}");
    let status = ws_handshake_status(ws, Some("https://Chat.Example")).await;
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    let status = ws_handshake_status(ws, None).await;
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    // A real client without an Origin header still signs in and talks.
    let u = cluster.user("origin").await;
    let mut c = cluster.connect(Transport::Ws, 0, &u).await;
    let p = c
        .request(Body::Heartbeat(Default::default()), Duration::from_secs(10))
        .await
        .expect("heartbeat");
    assert!(matches!(p.body, Some(Body::Heartbeat(_))), "{p:?}");
}

fn origins(c: &mut zhibo::Config) {
    c.gateway.ws_allowed_origins = vec!["https://chat.example".into()];
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_origin_allow_list_embedded() {
    let cluster = Cluster::embedded_with(origins).await;
    ws_origin_allow_list(&cluster).await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_origin_allow_list_distributed() {
    let cluster = Cluster::distributed_tweaked(2, origins).await;
    ws_origin_allow_list(&cluster).await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_allow_list_any_origin_is_accepted() {
    let cluster = Cluster::embedded().await;
    let status = ws_handshake_status(cluster.gw(0).ws, Some("https://evil.example")).await;
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    cluster.stop().await;
}

/// Waits until the server closes `s` (EOF or reset); panics if it is still open after `wait`.
async fn closed_by_server(s: &mut tokio::net::TcpStream, wait: Duration) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(wait, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the connection is still open after {wait:?}"),
        }
    }
}

/// Signs in on a connection opened without signing in; the server must accept.
async fn sign_in_late(
    c: &mut zhibo_loadtest::client::Client,
    u: &zhibo_loadtest::client::Credentials,
) {
    let p = c
        .request(
            Body::SignIn(zhibo_proto::client::SignInInput {
                user_id: u.user_id,
                device_id: u.device_id,
                token: u.token.clone(),
            }),
            Duration::from_secs(10),
        )
        .await
        .expect("sign-in answered");
    assert!(matches!(p.body, Some(Body::SignInOutput(_))), "{p:?}");
}

const CAP: usize = 3;

/// `gateway.max_unauthenticated_per_ip`: connections that never sign in fill the address's budget
/// (TCP, WebSocket and QUIC together) and the next one is closed at once; signed-in connections are
/// not counted, and a sign-in frees a place.
async fn unauthenticated_cap(cluster: &Cluster) {
    use zhibo_loadtest::client::Client;
    let gw = cluster.gw(0);
    // Signed in on every transport (one user each: a device signing in again replaces its
    // connection): none of these count.
    let mut signed_in = Vec::new();
    for t in [
        Transport::Tcp,
        Transport::Ws,
        Transport::Quic,
        Transport::Tcp,
    ] {
        let u = cluster.user("capped").await;
        signed_in.push(cluster.connect(t, 0, &u).await);
    }
    let late = cluster.user("late").await;
    let later = cluster.user("later").await;
    // Three that never sign in: a TCP socket, a WebSocket whose handshake never comes, and QUIC.
    let _idle_tcp = tokio::net::TcpStream::connect(gw.tcp).await.expect("tcp");
    let _idle_ws = tokio::net::TcpStream::connect(gw.ws).await.expect("ws");
    let mut idle_quic = Client::connect_raw(Transport::Quic, &gw.quic.to_string())
        .await
        .expect("quic");
    // The fourth, on any transport, is closed at once (the sign-in timeout is 10 s).
    for port in [gw.tcp, gw.ws] {
        let mut s = tokio::net::TcpStream::connect(port).await.expect("connect");
        closed_by_server(&mut s, Duration::from_secs(3)).await;
    }
    let quic = async {
        let mut c = Client::connect_raw(Transport::Quic, &gw.quic.to_string()).await?;
        c.request(Body::Heartbeat(Default::default()), Duration::from_secs(3))
            .await
    };
    assert!(quic.await.is_err(), "a fourth QUIC connection is refused");
    // Once one signs in, there is room for one more, which can sign in too.
    sign_in_late(&mut idle_quic, &late).await;
    let mut next = Client::connect_raw(Transport::Tcp, &gw.tcp.to_string())
        .await
        .expect("tcp");
    sign_in_late(&mut next, &later).await;
    // The signed-in connections were never disturbed.
    for c in &mut signed_in {
        let p = c
            .request(Body::Heartbeat(Default::default()), Duration::from_secs(10))
            .await
            .expect("heartbeat");
        assert!(matches!(p.body, Some(Body::Heartbeat(_))), "{p:?}");
    }
}

fn capped(c: &mut zhibo::Config) {
    c.gateway.max_unauthenticated_per_ip = CAP;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_connections_are_capped_per_address_embedded() {
    let cluster = Cluster::embedded_with(capped).await;
    unauthenticated_cap(&cluster).await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_connections_are_capped_per_address_distributed() {
    let cluster = Cluster::distributed_tweaked(2, capped).await;
    unauthenticated_cap(&cluster).await;
    cluster.stop().await;
}

/// Issue 19 finding 1, for devices that were never bound at a password sign-in (registered before
/// binding existed, or used only with tokens an app backend minted): the first connection with a valid
/// token binds the device at the gateway, so another user can no longer take it over by signing in on
/// it with a password (and then revoke its owner's tokens by signing out).
async fn an_unbound_device_is_bound_by_its_first_connection(cluster: &Cluster) {
    let alice = cluster.user("alice").await;
    let minted = cluster.second_device(&alice).await;
    let mut c = cluster.connect(Transport::Tcp, 0, &minted).await;
    let carol_name = format!("carol{}", minted.device_id % 1_000_000);
    let carol = cluster
        .api
        .sign_up_and_in(&carol_name, "correct horse battery", minted.device_id)
        .await;
    let e = carol.expect_err("a device bound at the gateway cannot be taken over");
    assert!(e.to_string().contains("device_taken"), "{e}");
    // Alice's connection is untouched.
    let p = c
        .request(Body::Heartbeat(Default::default()), Duration::from_secs(10))
        .await
        .expect("heartbeat");
    assert!(matches!(p.body, Some(Body::Heartbeat(_))), "{p:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unbound_device_is_bound_by_its_first_connection_embedded() {
    let cluster = Cluster::embedded().await;
    an_unbound_device_is_bound_by_its_first_connection(&cluster).await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unbound_device_is_bound_by_its_first_connection_distributed() {
    let cluster = Cluster::distributed().await;
    an_unbound_device_is_bound_by_its_first_connection(&cluster).await;
    cluster.stop().await;
}
