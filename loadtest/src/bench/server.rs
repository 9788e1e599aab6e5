//! The server under test: spawned here (`zhibo dev`, or the distributed roles on NATS, Redis and
//! Cassandra) or already running (`--spawn none`); and what the loadtest reads of it (RSS, CPU time).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::process::{Child, Command};

use super::classes::ShapingScrape;
use super::{BenchArgs, SpawnMode, StoreMode};
use crate::client::Transport;

/// The dev token secret `zhibo dev` uses when none is configured.
pub const DEV_TOKEN_SECRET: &str = "zhibo-dev-insecure-token-secret";
/// The admin secret given to spawned servers.
pub const BENCH_ADMIN_SECRET: &str = "zhibo-bench-admin-secret";

/// Where the cluster under test listens, and the processes spawned for it (killed on drop).
#[derive(Debug)]
pub struct Target {
    /// user-api base URL.
    pub api: String,
    /// Gateway TCP address.
    pub tcp: String,
    /// Gateway WebSocket address.
    pub ws: String,
    /// Gateway QUIC address.
    pub quic: String,
    /// The gateway process (or `zhibo dev`, or the other server), for RSS and CPU.
    pub gateway_pid: Option<u32>,
    /// Token secret, to mint tokens locally.
    pub token_secret: String,
    /// Admin secret, to create users.
    pub admin_secret: String,
    /// `dev`, `distributed` or `external`.
    pub mode: String,
    /// The gateway's (or `zhibo dev`'s) `/metrics` URL, when known.
    pub metrics_url: Option<String>,
    /// The logic workers' `/metrics` URLs (spawned distributed cluster), for their CQL counters.
    worker_metrics: Vec<String>,
    /// The role of each spawned process, in `children` order.
    roles: Vec<String>,
    children: Vec<Child>,
}

impl Target {
    /// Another server than zhibo (`mode`), spawned: its HTTP API at `api`, its WebSocket listener at
    /// `ws`, the key of its server API in `admin_secret`; `child` is killed on stop.
    pub fn spawned_other(mode: &str, api: String, ws: String, key: String, child: Child) -> Self {
        Target {
            api,
            tcp: String::new(),
            quic: String::new(),
            gateway_pid: child.id(),
            ws,
            token_secret: String::new(),
            admin_secret: key,
            mode: mode.to_owned(),
            metrics_url: None,
            worker_metrics: Vec::new(),
            roles: vec![mode.to_owned()],
            children: vec![child],
        }
    }

    /// The gateway address for `t`.
    pub fn addr(&self, t: Transport) -> &str {
        match t {
            Transport::Tcp => &self.tcp,
            Transport::Ws => &self.ws,
            Transport::Quic => &self.quic,
        }
    }

    /// The gateway's resident memory, KiB.
    pub fn rss_kib(&self) -> u64 {
        self.gateway_pid.and_then(rss_kib).unwrap_or(0)
    }

    /// The gateway's CPU time (user + system), seconds.
    pub fn cpu_secs(&self) -> f64 {
        self.gateway_pid.and_then(cpu_secs).unwrap_or(0.0)
    }

    /// `(role, pid)` of each spawned process (none for `--spawn none`).
    pub fn processes(&self) -> impl Iterator<Item = (&str, u32)> {
        self.roles
            .iter()
            .zip(&self.children)
            .filter_map(|(role, c)| Some((role.as_str(), c.id()?)))
    }

    /// The logic workers' `/metrics` URLs (spawned distributed cluster only).
    pub fn worker_metrics(&self) -> &[String] {
        &self.worker_metrics
    }

    /// The gateway's room shaping counters, from its `/metrics` (`None` when it has no known ops
    /// endpoint or does not answer).
    pub async fn scrape_shaping(&self) -> Option<ShapingScrape> {
        let url = self.metrics_url.as_ref()?;
        let text = reqwest::Client::new()
            .get(url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?
            .error_for_status()
            .ok()?
            .text()
            .await
            .ok()?;
        Some(ShapingScrape::parse(&text))
    }

    /// Stops spawned processes.
    pub async fn stop(mut self) {
        for c in &mut self.children {
            let _ = c.start_kill();
        }
        for c in &mut self.children {
            let _ = c.wait().await;
        }
    }
}

/// `VmRSS` of a process, KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// utime + stime of a process, seconds (assumes the usual 100 clock ticks per second).
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts (or points at) the cluster the arguments describe and waits until it answers.
///
/// # Errors
/// When a process cannot start or does not become ready within 60 s.
pub async fn start(args: &BenchArgs) -> anyhow::Result<Target> {
    let secret = if args.token_secret.is_empty() {
        DEV_TOKEN_SECRET.to_owned()
    } else {
        args.token_secret.clone()
    };
    if args.spawn == SpawnMode::Centrifugo {
        return super::centrifugo::spawn(args).await;
    }
    if args.spawn == SpawnMode::None {
        return Ok(Target {
            api: args.api.clone(),
            tcp: args.tcp.clone(),
            ws: args.ws.clone(),
            quic: args.quic.clone(),
            gateway_pid: args.gateway_pid,
            token_secret: secret,
            admin_secret: args.admin_secret.clone(),
            mode: "external".into(),
            metrics_url: args.metrics_url.clone(),
            worker_metrics: Vec::new(),
            roles: Vec::new(),
            children: Vec::new(),
        });
    }
    // A spawned cluster gets a fresh random secret unless one is given: the distributed roles refuse
    // short or public ones.
    let secret = if args.token_secret.is_empty() {
        random_secret()
    } else {
        secret
    };
    std::fs::create_dir_all(&args.out)?;
    // Free ports are found by binding and releasing them, so another process on the host may take one
    // before the server binds it: start again on fresh ports when that is why a process exited.
    let mut attempt = 1;
    loop {
        match spawn_cluster(args, &secret).await {
            Err(e) if attempt < 3 && format!("{e:#}").contains("Address already in use") => {
                eprintln!(
                    "  a port was taken before the server bound it; starting again on others"
                );
                attempt += 1;
            }
            done => return done,
        }
    }
}

/// 32 random bytes, hex-encoded: a token secret the distributed roles accept.
fn random_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Starts `zhibo dev` or the distributed roles on free ports and waits until they answer.
async fn spawn_cluster(args: &BenchArgs, secret: &str) -> anyhow::Result<Target> {
    let secret = secret.to_owned();
    let (api_port, tcp_port, ws_port) = (free_tcp_port()?, free_tcp_port()?, free_tcp_port()?);
    // The gateway's (or `zhibo dev`'s) ops endpoint, for the room scenario's shaping counters.
    let metrics_port = free_tcp_port()?;
    let quic_port = free_udp_port()?;
    let admin = if args.admin_secret.is_empty() {
        BENCH_ADMIN_SECRET.to_owned()
    } else {
        args.admin_secret.clone()
    };
    let mut common: Vec<(String, String)> = vec![
        ("ZHIBO_TOKEN_SECRET".into(), secret.clone()),
        ("ZHIBO_API__ADMIN_SECRET".into(), admin.clone()),
        ("ZHIBO_API_ADDR".into(), format!("127.0.0.1:{api_port}")),
        (
            "ZHIBO_GATEWAY__TCP_ADDR".into(),
            format!("127.0.0.1:{tcp_port}"),
        ),
        (
            "ZHIBO_GATEWAY__WS_ADDR".into(),
            format!("127.0.0.1:{ws_port}"),
        ),
        (
            "ZHIBO_GATEWAY__QUIC_ADDR".into(),
            format!("127.0.0.1:{quic_port}"),
        ),
        // The generator pipelines from few connections: lift the per-connection limits.
        ("ZHIBO_GATEWAY__RATE_PER_SEC".into(), "10000000".into()),
        ("ZHIBO_GATEWAY__RATE_BURST".into(), "10000000".into()),
        ("ZHIBO_GATEWAY__ROOM_SEND_PER_SEC".into(), "10000000".into()),
        ("ZHIBO_GATEWAY__ROOM_SEND_BURST".into(), "10000000".into()),
        ("ZHIBO_LOGIC__ALLOW_STRANGERS".into(), "true".into()),
        // Every simulated client registers its device from this host.
        ("ZHIBO_API__DEVICES_PER_HOUR".into(), "100000000".into()),
        ("ZHIBO_LOG".into(), "warn".into()),
        ("NO_COLOR".into(), "1".into()),
    ];
    let log_path = args.out.join("server.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("create {}", log_path.display()))?;
    let mut children = Vec::new();
    let mut roles = Vec::new();
    let mut worker_metrics = Vec::new();
    // `ops`: the process's ops endpoint (`ZHIBO_METRICS_ADDR`, empty = none): each process that has
    // one needs its own port, or several roles on one host would all bind the default 127.0.0.1:9100.
    let spawn = |role: &str, env: &[(String, String)], ops: &str| -> anyhow::Result<Child> {
        Command::new(&args.zhibo_bin)
            .arg(role)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("ZHIBO_METRICS_ADDR", ops)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log.try_clone()?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {} {role}", args.zhibo_bin.display()))
    };
    let gateway_pid;
    match args.spawn {
        SpawnMode::Dev => {
            let path = match args.store {
                StoreMode::Memory => String::new(),
                StoreMode::Disk => {
                    let p = args.out.join("bench-store.redb");
                    let _ = std::fs::remove_file(&p);
                    p.display().to_string()
                }
            };
            common.push(("ZHIBO_STORE__PATH".into(), path));
            let child = spawn("dev", &common, &format!("127.0.0.1:{metrics_port}"))?;
            gateway_pid = child.id();
            children.push(child);
            roles.push("dev".to_owned());
        }
        SpawnMode::Distributed => {
            common.extend([
                ("ZHIBO_BUS__NATS_URL".into(), args.nats_url.clone()),
                ("ZHIBO_STORE__KIND".into(), "scylla".into()),
                (
                    "ZHIBO_STORE__CQL_NODES".into(),
                    format!("[\"{}\"]", args.cql_node),
                ),
                ("ZHIBO_STORE__KEYSPACE".into(), args.keyspace.clone()),
                ("ZHIBO_STORE__REDIS_URL".into(), args.redis_url.clone()),
                // The spawned cluster is private: its own subjects, whoever else uses this NATS.
                (
                    "ZHIBO_BUS__SUBJECT_PREFIX".into(),
                    format!("bench_{}", std::process::id()),
                ),
            ]);
            let status = spawn("migrate", &common, "")?.wait().await?;
            if !status.success() {
                bail!(
                    "zhibo migrate failed ({status}); see {}",
                    log_path.display()
                );
            }
            let gw = spawn("gateway", &common, &format!("127.0.0.1:{metrics_port}"))?;
            gateway_pid = gw.id();
            children.push(gw);
            roles.push("gateway".to_owned());
            for _ in 0..args.workers.max(1) {
                let ops = format!("127.0.0.1:{}", free_tcp_port()?);
                children.push(spawn("logic-worker", &common, &ops)?);
                roles.push("logic-worker".to_owned());
                worker_metrics.push(format!("http://{ops}/metrics"));
            }
            children.push(spawn("user-api", &common, "")?);
            roles.push("user-api".to_owned());
        }
        SpawnMode::None | SpawnMode::Centrifugo => unreachable!("handled above"),
    }
    let mut target = Target {
        api: format!("http://127.0.0.1:{api_port}"),
        tcp: format!("127.0.0.1:{tcp_port}"),
        ws: format!("127.0.0.1:{ws_port}"),
        quic: format!("127.0.0.1:{quic_port}"),
        gateway_pid,
        token_secret: secret,
        admin_secret: admin,
        mode: format!("{:?}", args.spawn).to_lowercase(),
        metrics_url: Some(format!("http://127.0.0.1:{metrics_port}/metrics")),
        worker_metrics,
        roles,
        children,
    };
    wait_ready(&mut target, &log_path).await?;
    Ok(target)
}

async fn wait_ready(t: &mut Target, log: &Path) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        for child in &mut t.children {
            if let Some(status) = child.try_wait()? {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
                bail!(
                    "a zhibo process exited before the cluster was ready ({status}); {} ends with:\n{}",
                    log.display(),
                    lines[lines.len().saturating_sub(5)..].join("\n")
                );
            }
        }
        let api_ok = http
            .get(format!("{}/readyz", t.api))
            .send()
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(false);
        let gw_ok = tokio::net::TcpStream::connect(&t.tcp).await.is_ok();
        if api_ok && gw_ok {
            // Distributed: queue subscriptions of the workers reach NATS asynchronously.
            if t.mode == "distributed" {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the server did not become ready in 60 s; see {}",
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
