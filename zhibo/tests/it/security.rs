//! The operator side of security, checked on the real binary and real servers: token secrets refused
//! before anything binds.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;

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
