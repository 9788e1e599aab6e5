//! The real `zhibo` binary as an operator runs it: environment handling at start, and SIGTERM while a
//! dependency is down.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::cluster::{distributed_keyspace, SECRET};

/// `zhibo <role>` with none of the test run's `ZHIBO_*` variables, only `vars`.
fn zhibo(role: &str, vars: &[(&str, String)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_zhibo"));
    for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("ZHIBO_")) {
        command.env_remove(name);
    }
    command
        .arg(role)
        .env("ZHIBO_LOG", "info")
        .env("NO_COLOR", "1")
        .envs(vars.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// `zhibo dev`'s store in `dir` and every listener on a free loopback port.
fn dev_vars(dir: &std::path::Path) -> Vec<(&'static str, String)> {
    let any_port = "127.0.0.1:0".to_string();
    vec![
        (
            "ZHIBO_STORE__PATH",
            dir.join("z.redb").display().to_string(),
        ),
        ("ZHIBO_API_ADDR", any_port.clone()),
        ("ZHIBO_GATEWAY__TCP_ADDR", any_port.clone()),
        ("ZHIBO_GATEWAY__WS_ADDR", any_port.clone()),
        ("ZHIBO_GATEWAY__QUIC_ADDR", any_port),
    ]
}

/// Reads the child's stdout until a line contains `needle` (30 s), then keeps draining it.
async fn wait_for_line(child: &mut Child, needle: &str) {
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let found = async {
        while let Some(line) = lines.next_line().await.expect("read output") {
            if line.contains(needle) {
                return;
            }
        }
        panic!("exited before printing {needle:?}");
    };
    tokio::time::timeout(Duration::from_secs(30), found)
        .await
        .unwrap_or_else(|_| panic!("no {needle:?} within 30 s"));
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
}

fn sigterm(child: &Child) {
    let pid = child.id().expect("running");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM {pid}");
}

/// The harness's own variables are not configuration; an unknown configuration key still is fatal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_variables_are_ignored_and_unknown_keys_still_exit_64() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut base = dev_vars(dir.path());
    base.extend([
        ("ZHIBO_METRICS_ADDR", "127.0.0.1:0".to_string()),
        // Room for a loaded machine: stopping right after the banner waits for user-api's first
        // node lease, over a second in a debug build.
        ("ZHIBO_GRACE_SECS", "8".to_string()),
    ]);

    let mut harness = base.clone();
    harness.extend([
        ("ZHIBO_KEEP_INFRA", "1".to_string()),
        ("ZHIBO_CASSANDRA_JVM_OPTS", "-Xmx2g".to_string()),
        ("ZHIBO_SKIP_CHART_TEST", "1".to_string()),
        ("ZHIBO_INFRA_TIMEOUT", "180".to_string()),
        ("ZHIBO_TEST_WEB_BASE", "http://127.0.0.1:1".to_string()),
    ]);
    let mut dev = zhibo("dev", &harness).spawn().expect("start zhibo dev");
    wait_for_line(&mut dev, "zhibo dev is running").await;
    sigterm(&dev);
    let out = tokio::time::timeout(Duration::from_secs(20), dev.wait_with_output())
        .await
        .expect("dev stops after SIGTERM")
        .expect("wait");
    assert!(
        out.status.success(),
        "{}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    let mut unknown = base;
    unknown.push(("ZHIBO_GATEWAY__NO_SUCH_KEY", "1".to_string()));
    let out = tokio::time::timeout(Duration::from_secs(10), zhibo("dev", &unknown).output())
        .await
        .expect("exits at once")
        .expect("run zhibo dev");
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no_such_key"), "{stderr}");
}

/// Start-up errors name the setting at fault (outside operator audit): which of the listeners' ports
/// is taken, a `ZHIBO_LOG` that does not parse (once silently `info`), a store path under a file (once
/// only "File exists").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_errors_name_the_setting_at_fault() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dev_vars(dir.path());
    let run = |extra: Vec<(&'static str, String)>| {
        let mut vars = base.clone();
        vars.extend(extra);
        async move {
            let out = tokio::time::timeout(Duration::from_secs(30), zhibo("dev", &vars).output())
                .await
                .expect("exits at once")
                .expect("run zhibo dev");
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };

    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = taken.local_addr().expect("addr").to_string();
    let (code, stderr) = run(vec![("ZHIBO_GATEWAY__WS_ADDR", taken.clone())]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("gateway.ws_addr {taken}")) && stderr.contains("in use"),
        "{stderr}"
    );

    for bad in ["debg", "info,zhibo_gateway=loud"] {
        let (code, stderr) = run(vec![("ZHIBO_LOG", bad.to_string())]).await;
        assert_eq!(code, Some(64), "{bad}: {stderr}");
        assert!(stderr.contains("ZHIBO_LOG"), "{bad}: {stderr}");
    }

    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").expect("write");
    let under_file = file.join("data").join("z.redb").display().to_string();
    let (code, stderr) = run(vec![("ZHIBO_STORE__PATH", under_file)]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("{} is a file, not a directory", file.display())),
        "{stderr}"
    );
}

/// A role of a distributed deployment refuses the embedded store (the default `store.kind`): it would
/// keep users and messages of its own beside the cluster's (outside audit: a user-api that answered
/// sign-ups into a local file, a logic worker that answered "no such user" to real friends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_distributed_role_without_the_scylla_store_exits_64() {
    let dir = tempfile::tempdir().expect("tempdir");
    for role in ["gateway", "logic-worker", "user-api"] {
        let vars = [
            ("ZHIBO_BUS__NATS_URL", "nats://127.0.0.1:1".to_string()),
            ("ZHIBO_TOKEN_SECRET", SECRET.to_string()),
            (
                "ZHIBO_STORE__PATH",
                dir.path().join("z.redb").display().to_string(),
            ),
        ];
        let out = tokio::time::timeout(Duration::from_secs(10), zhibo(role, &vars).output())
            .await
            .expect("exits at once")
            .expect("run zhibo");
        assert_eq!(out.status.code(), Some(64), "{role}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("store.kind"), "{role}: {stderr}");
        assert!(
            !dir.path().join("z.redb").exists(),
            "{role} opened the embedded store"
        );
    }
}

/// A nats-server of this test's own, on a free port, killed when dropped.
struct OwnNats {
    child: Child,
    url: String,
}

impl OwnNats {
    async fn start() -> OwnNats {
        let mut child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", "-1"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("nats-server on PATH (scripts/infra.sh installs it)");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let find = async {
            while let Some(line) = lines.next_line().await.expect("read nats log") {
                if let Some((_, addr)) = line.split_once("Listening for client connections on ") {
                    return addr.trim().to_string();
                }
            }
            panic!("nats-server exited before listening");
        };
        let addr = tokio::time::timeout(Duration::from_secs(10), find)
            .await
            .expect("nats-server listening");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        OwnNats {
            child,
            url: format!("nats://{addr}"),
        }
    }
}

/// With NATS gone, every role still exits within its grace period after SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_exits_within_grace_after_sigterm_while_nats_is_down() {
    const GRACE_SECS: u64 = 3;
    let cql = zhibo_testkit::require_cql().await;
    let redis = zhibo_testkit::require_redis().await;
    let keyspace = distributed_keyspace().await;
    let mut nats = OwnNats::start().await;
    let any_port = "127.0.0.1:0".to_string();
    let vars = vec![
        ("ZHIBO_TOKEN_SECRET", SECRET.to_string()),
        ("ZHIBO_BUS__NATS_URL", nats.url.clone()),
        ("ZHIBO_STORE__KIND", "scylla".to_string()),
        ("ZHIBO_STORE__CQL_NODES", format!("[{cql:?}]")),
        ("ZHIBO_STORE__KEYSPACE", keyspace),
        ("ZHIBO_STORE__REDIS_URL", redis),
        ("ZHIBO_GRACE_SECS", GRACE_SECS.to_string()),
        ("ZHIBO_METRICS_ADDR", any_port.clone()),
        ("ZHIBO_API_ADDR", any_port.clone()),
        ("ZHIBO_GATEWAY__TCP_ADDR", any_port.clone()),
        ("ZHIBO_GATEWAY__WS_ADDR", any_port.clone()),
        ("ZHIBO_GATEWAY__QUIC_ADDR", any_port),
    ];
    let mut roles = Vec::new();
    for (role, ready) in [
        ("logic-worker", "consuming commands"),
        ("gateway", "gateway listening"),
        ("user-api", "user-api listening"),
    ] {
        let mut child = zhibo(role, &vars).spawn().expect("start zhibo");
        wait_for_line(&mut child, ready).await;
        roles.push((role, child));
    }

    nats.child.kill().await.expect("stop nats-server");
    for (_, child) in &roles {
        sigterm(child);
    }
    let signalled = Instant::now();
    let limit = Duration::from_secs(GRACE_SECS) + Duration::from_secs(2);
    for (role, child) in &mut roles {
        let left = limit.saturating_sub(signalled.elapsed());
        match tokio::time::timeout(left, child.wait()).await {
            Ok(status) => {
                status.expect("wait");
            }
            Err(_) => panic!(
                "{role} still running {:?} after SIGTERM (grace {GRACE_SECS}s)",
                signalled.elapsed()
            ),
        }
    }
}
