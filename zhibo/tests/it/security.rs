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
        env.push(("ZHIBO_TOKEN_SECRET", SECRET));
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
