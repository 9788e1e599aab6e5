//! Test clusters: `embedded()` is one `zhibo dev`-like node; `distributed()` runs two gateways, two logic
//! workers and a user-api, each with its own NATS connection, on a fresh Cassandra keyspace and Redis.
//!
//! Every node of this test process (and every `zhibo` process it starts on the shared NATS) uses the
//! process's own subject prefix ([`subject_prefix`]): two test runs on one NATS never take each other's
//! commands or see each other's rooms and broadcasts. Within the process, each distributed cluster
//! connects as its own account of the harness's NATS server ([`zhibo_testkit::require_nats_account`]),
//! so concurrent clusters with differently configured workers (push, webhooks, a short recall window)
//! never take each other's commands either.
//!
//! Fixtures wait on conditions, never fixed sleeps: [`eventually`] polls with a deadline, and
//! [`wait_until_serving`] waits for a command round trip through every gateway.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use zhibo::{Bound, Config, StoreKind};
use zhibo_loadtest::client::{Client, Credentials, Transport};
use zhibo_loadtest::http::Api;
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::SyncInput;

/// A `zhibo logic-worker` child process.
pub(crate) struct WorkerProcess {
    pub(crate) child: tokio::process::Child,
}

impl WorkerProcess {
    /// SIGKILL: no chance to finish anything.
    pub(crate) async fn kill(mut self) {
        self.child.kill().await.expect("kill -9 worker");
    }
}

/// Addresses of one gateway.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GatewayAddrs {
    pub(crate) tcp: SocketAddr,
    pub(crate) ws: SocketAddr,
    pub(crate) quic: SocketAddr,
}

impl GatewayAddrs {
    pub(crate) fn of(&self, t: Transport) -> String {
        match t {
            Transport::Tcp => self.tcp.to_string(),
            Transport::Ws => self.ws.to_string(),
            Transport::Quic => self.quic.to_string(),
        }
    }
}

/// A node of a distributed [`Cluster`], for per-node configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Node {
    /// Gateway `i` (0 or 1).
    Gateway(usize),
    /// An in-process logic worker.
    Worker,
    /// The user-api node.
    Api,
}

pub(crate) struct Cluster {
    pub(crate) api: Api,
    pub(crate) api_base: String,
    pub(crate) gateways: Vec<GatewayAddrs>,
    pub(crate) redis_url: Option<String>,
    /// The ops endpoint (`/metrics`, `/healthz`, `/readyz`) of the embedded node.
    pub(crate) ops_addr: Option<SocketAddr>,
    /// The distributed configuration, to start more nodes (e.g. worker processes).
    pub(crate) config: Option<Config>,
    /// One token per gateway (children of `shutdown`), to stop a single gateway.
    pub(crate) gateway_stops: Vec<CancellationToken>,
    /// The stores of the node running user-api, to set up states a client cannot (crash windows).
    pub(crate) stores: zhibo_store::Stores,
    shutdown: CancellationToken,
    nodes: Vec<JoinHandle<anyhow::Result<()>>>,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// At least 32 bytes: the distributed roles refuse shorter token secrets.
pub(crate) const SECRET: &str = "e2e-token-secret-0123456789abcdef";
pub(crate) const ADMIN: &str = "e2e-admin-secret";

/// How long a fixture waits for a condition (a node serving, a process ready) before failing the test.
pub(crate) const READY_WAIT: Duration = Duration::from_secs(30);

/// A number per distributed cluster of this process, for its gateways' ids: concurrent clusters share
/// the subject prefix, so gateways named alike would both get the replies (`<prefix>.gw.<id>`) meant
/// for one of them, connection ids included.
pub(crate) fn cluster_number() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The NATS subject prefix of this test process: unique per process, so parallel test runs sharing
/// one NATS server stay apart. Every configuration this suite builds uses it.
pub(crate) fn subject_prefix() -> &'static str {
    static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PREFIX.get_or_init(|| zhibo_testkit::unique_name("e2e"))
}

/// Polls `check` (every 20 ms) until it returns `Some`, and returns that; fails the test with `what`
/// when `wait` passes first.
pub(crate) async fn eventually<T, F, Fut>(what: &str, wait: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {wait:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A live-room id no other test, and no earlier run against the same servers, uses.
pub(crate) fn fresh_room_id() -> i64 {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as i64;
    (n & 0x1f_ffff_ffff_ffff) | 1
}

/// Joins live room `room_id` on `c`; fails the test unless `SubscribeRoomOutput` comes within `wait`.
pub(crate) async fn join_room(c: &mut Client, room_id: i64, wait: Duration) {
    let p = c
        .request(
            Body::SubscribeRoom(zhibo_proto::client::SubscribeRoomInput { room_id }),
            wait,
        )
        .await
        .expect("join reply");
    assert!(
        matches!(p.body, Some(Body::SubscribeRoomOutput(_))),
        "join refused: {p:?}"
    );
}

/// A new user with one registered device, signed in through `api`.
pub(crate) async fn sign_up(api: &Api, name: &str) -> Credentials {
    let device = api
        .register_device("android")
        .await
        .expect("register device");
    let username = format!(
        "{name}_{}",
        zhibo_testkit::unique_name("u")
            .replace('_', "")
            .chars()
            .rev()
            .take(12)
            .collect::<String>()
    );
    api.sign_up_and_in(&username, "correct horse battery", device)
        .await
        .expect("sign up and in")
}

/// Waits until user-api is ready and a command sent through each gateway (TCP addresses `gateways`) is answered by a logic
/// worker: a `Sync` round trip proves the workers' queue subscription is live at the server (commands
/// published before it are lost, as on any NATS core subject) and the gateway's own subscriptions too.
pub(crate) async fn wait_until_serving(api: &Api, gateways: &[String]) {
    // user-api is ready once it holds an entity-id node lease: a device registration before that may
    // answer 503 on a loaded Cassandra.
    eventually("user-api /readyz answers 200", READY_WAIT, || async {
        api.get("/readyz", "").await.ok().map(|_| ())
    })
    .await;
    let probe = sign_up(api, "probe").await;
    for gw in gateways {
        let mut client = Client::connect(Transport::Tcp, gw, &probe)
            .await
            .expect("connect the probe")
            .0;
        let deadline = tokio::time::Instant::now() + READY_WAIT;
        loop {
            let sync = Body::Sync(SyncInput { seq: 0, limit: 1 });
            let reply = client.request(sync, Duration::from_millis(500)).await;
            if matches!(reply, Ok(ref p) if matches!(p.body, Some(Body::SyncOutput(_)))) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no logic worker answered through gateway {gw} within {READY_WAIT:?}: {reply:?}"
            );
        }
    }
}

/// An HTTP request with a JSON body and one authentication header (`x-admin-secret` or
/// `authorization`) to user-api at `base`; returns the status and the JSON answer (`Null` if none).
pub(crate) async fn http(
    base: &str,
    method: reqwest::Method,
    path: &str,
    auth: (&str, &str),
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let response = reqwest::Client::new()
        .request(method, format!("{base}{path}"))
        .header(auth.0, auth.1)
        .json(&body)
        .send()
        .await
        .expect("user-api answers");
    let status = response.status().as_u16();
    let json = response.json().await.unwrap_or(serde_json::Value::Null);
    (status, json)
}

/// `push.stream_max_bytes` of every test cluster: JetStream reserves a stream's `max_bytes` against
/// the server's storage limit (~75% of the free disk), and each distributed test cluster has its own
/// NATS account, so its own push stream: at the 1 GiB default, a few runs on one server (or one run on
/// a small disk) exhaust the reservations and a push-enabled node fails to start.
pub(crate) const TEST_STREAM_MAX_BYTES: i64 = 64 << 20;

fn base_config() -> Config {
    let mut c = Config {
        token_secret: SECRET.into(),
        // An upper bound for `stop()`, which is quick when nothing is in flight: generous, so a loaded
        // machine (two suites in parallel) does not fail a clean stop.
        grace_secs: 10,
        ..Config::default()
    };
    c.bus.subject_prefix = subject_prefix().into();
    c.push.stream_max_bytes = TEST_STREAM_MAX_BYTES;
    c.gateway.tcp_addr = "127.0.0.1:0".parse().expect("addr");
    c.gateway.ws_addr = "127.0.0.1:0".parse().expect("addr");
    c.gateway.quic_addr = "127.0.0.1:0".parse().expect("addr");
    c.gateway.rate_per_sec = 200.0;
    c.gateway.rate_burst = 400.0;
    c.api_addr = "127.0.0.1:0".parse().expect("addr");
    c.api.admin_secret = ADMIN.into();
    // Every test client registers its devices from 127.0.0.1: one address for the whole suite.
    c.api.devices_per_hour = 100_000;
    c
}

async fn bind_gateway(config: &Config) -> (zhibo_gateway::Listeners, GatewayAddrs) {
    let l = zhibo_gateway::Listeners::bind(&config.gateway)
        .await
        .expect("bind gateway");
    let (tcp, ws, quic) = l.addrs().expect("addrs");
    (l, GatewayAddrs { tcp, ws, quic })
}

/// One keyspace for every distributed test of this process, migrated once: concurrent schema changes
/// are slow on Cassandra and each test isolates itself with fresh users anyway.
async fn shared_keyspace(config: &Config) -> String {
    static KEYSPACE: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    KEYSPACE
        .get_or_init(|| async {
            let ks = zhibo_testkit::unique_name("e2e");
            let session = zhibo_store::scylla::session(&config.store.cql_nodes)
                .await
                .expect("cql session");
            zhibo_store::scylla::migrate(&session, &ks, 1)
                .await
                .expect("migrate");
            ks
        })
        .await
        .clone()
}

/// The migrated keyspace shared by this process's distributed tests, on the test Cassandra.
pub(crate) async fn distributed_keyspace() -> String {
    let mut config = base_config();
    config.store.cql_nodes = vec![zhibo_testkit::require_cql().await];
    shared_keyspace(&config).await
}

impl Cluster {
    /// One node running every role on the in-process bus and an embedded store file.
    pub(crate) async fn embedded() -> Cluster {
        Self::embedded_with(|_| {}).await
    }

    /// [`Cluster::embedded`] with a configuration tweak.
    pub(crate) async fn embedded_with(tweak: impl FnOnce(&mut Config)) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("zhibo.redb");
        let mut cluster = Self::embedded_at(&path, tweak).await;
        cluster._dir = Some(dir);
        cluster
    }

    /// [`Cluster::embedded_with`] on the store file at `path`, which outlives the node: a node started
    /// again on it after [`Cluster::stop`] finds what the last one stored (waiting, with a deadline,
    /// until the stopped node's last tasks have released the file).
    pub(crate) async fn embedded_at(
        path: &std::path::Path,
        tweak: impl FnOnce(&mut Config),
    ) -> Cluster {
        let mut config = base_config();
        tweak(&mut config);
        config.store.kind = StoreKind::Embedded;
        config.store.path = path.display().to_string();
        let backends = eventually("the embedded store file opens", READY_WAIT, || async {
            zhibo::connect(&config, "e2e").await.ok()
        })
        .await;
        let (listeners, addrs) = bind_gateway(&config).await;
        let api = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind api");
        let api_addr = api.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let ops = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind ops");
        let ops_addr = ops.local_addr().expect("addr");
        let bound = Bound {
            gateway: Some(listeners),
            api: Some(api),
            logic: true,
            ops: Some(ops),
        };
        let stores = backends.stores.clone();
        let node = tokio::spawn(zhibo::run(config, backends, bound, shutdown.clone()));
        let base = format!("http://{api_addr}");
        Cluster {
            api: Api::new(base.clone()),
            api_base: base,
            gateways: vec![addrs],
            redis_url: None,
            ops_addr: Some(ops_addr),
            config: None,
            gateway_stops: Vec::new(),
            stores,
            shutdown,
            nodes: vec![node],
            _dir: None,
        }
    }

    /// Two gateways, two logic workers and a user-api as separate nodes on real NATS, Redis and Cassandra.
    pub(crate) async fn distributed() -> Cluster {
        Self::distributed_with(2).await
    }

    /// [`Cluster::distributed`] with `workers` in-process logic workers (0: start them as processes).
    pub(crate) async fn distributed_with(workers: usize) -> Cluster {
        Self::distributed_tweaked(workers, |_| {}).await
    }

    /// [`Cluster::distributed_with`] with a configuration tweak applied to every node (e.g. another NATS
    /// server or Redis, smaller queues).
    pub(crate) async fn distributed_tweaked(
        workers: usize,
        tweak: impl FnOnce(&mut Config),
    ) -> Cluster {
        Self::distributed_per_node(workers, tweak, |_, _| {}).await
    }

    /// [`Cluster::distributed_tweaked`], then `per_node` applied to each node's own copy of the
    /// configuration (e.g. each gateway on another NATS server of a cluster).
    pub(crate) async fn distributed_per_node(
        workers: usize,
        tweak: impl FnOnce(&mut Config),
        per_node: impl Fn(Node, &mut Config),
    ) -> Cluster {
        let nats = zhibo_testkit::require_nats_account().await;
        let redis = zhibo_testkit::require_redis().await;
        let cql = zhibo_testkit::require_cql().await;
        let mut config = base_config();
        config.bus.nats_url = nats;
        // A database of its own (1-15, round robin; 0 is the other tests'): a test that flushes
        // Redis (a Redis loss) flushes only this cluster's counters and claims.
        static NEXT_DB: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let db = 1 + NEXT_DB.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 15;
        config.store.redis_url = format!("{}/{db}", redis.trim_end_matches('/'));
        tweak(&mut config);
        config.store.kind = StoreKind::Scylla;
        config.store.cql_nodes = vec![cql];
        config.store.keyspace = shared_keyspace(&config).await;
        let shutdown = CancellationToken::new();
        let mut nodes = Vec::new();
        let mut gateways = Vec::new();
        let mut gateway_stops = Vec::new();
        for i in 0..2 {
            let mut c = config.clone();
            c.gateway.gateway_id = format!("gw-{}-{}-{i}", std::process::id(), cluster_number());
            per_node(Node::Gateway(i), &mut c);
            let backends = zhibo::connect(&c, "e2e-gateway")
                .await
                .expect("gateway backends");
            let (listeners, addrs) = bind_gateway(&c).await;
            gateways.push(addrs);
            let bound = Bound {
                gateway: Some(listeners),
                ..Bound::default()
            };
            let stop = shutdown.child_token();
            gateway_stops.push(stop.clone());
            nodes.push(tokio::spawn(zhibo::run(c, backends, bound, stop)));
        }
        for _ in 0..workers {
            let mut c = config.clone();
            per_node(Node::Worker, &mut c);
            let backends = zhibo::connect(&c, "e2e-logic")
                .await
                .expect("logic backends");
            let bound = Bound {
                logic: true,
                ..Bound::default()
            };
            nodes.push(tokio::spawn(zhibo::run(
                c,
                backends,
                bound,
                shutdown.clone(),
            )));
        }
        let mut api_config = config.clone();
        per_node(Node::Api, &mut api_config);
        let backends = zhibo::connect(&api_config, "e2e-api")
            .await
            .expect("api backends");
        let stores = backends.stores.clone();
        let api = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind api");
        let api_addr = api.local_addr().expect("addr");
        let bound = Bound {
            api: Some(api),
            ..Bound::default()
        };
        nodes.push(tokio::spawn(zhibo::run(
            api_config,
            backends,
            bound,
            shutdown.clone(),
        )));
        let base = format!("http://{api_addr}");
        let api = Api::new(base.clone());
        if workers > 0 {
            let tcp: Vec<String> = gateways.iter().map(|g| g.tcp.to_string()).collect();
            wait_until_serving(&api, &tcp).await;
        }
        Cluster {
            api,
            api_base: base,
            gateways,
            redis_url: Some(config.store.redis_url.clone()),
            ops_addr: None,
            config: Some(config),
            gateway_stops,
            stores,
            shutdown,
            nodes,
            _dir: None,
        }
    }

    /// Starts `zhibo logic-worker` as a child process on this distributed cluster's servers and waits
    /// until it consumes commands. Killed when dropped.
    pub(crate) async fn spawn_worker_process(&self) -> WorkerProcess {
        self.spawn_worker_process_with(&[]).await
    }

    /// [`Cluster::spawn_worker_process`] with more `ZHIBO_*` variables (overriding the cluster's).
    pub(crate) async fn spawn_worker_process_with(&self, env: &[(&str, &str)]) -> WorkerProcess {
        use tokio::io::AsyncBufReadExt;
        let c = self.config.as_ref().expect("distributed cluster");
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_zhibo"));
        // zhibo reads every ZHIBO_* variable as configuration: pass only ours, none from the test run.
        for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("ZHIBO_")) {
            command.env_remove(name);
        }
        let mut child = command
            .arg("logic-worker")
            .env("ZHIBO_TOKEN_SECRET", SECRET)
            .env("ZHIBO_BUS__NATS_URL", &c.bus.nats_url)
            .env("ZHIBO_BUS__SUBJECT_PREFIX", &c.bus.subject_prefix)
            .env("ZHIBO_BUS__NATS_USER", &c.bus.nats_user)
            .env("ZHIBO_BUS__NATS_PASSWORD", &c.bus.nats_password)
            .env("ZHIBO_STORE__KIND", "scylla")
            .env("ZHIBO_STORE__CQL_NODES", format!("{:?}", c.store.cql_nodes))
            .env("ZHIBO_STORE__KEYSPACE", &c.store.keyspace)
            .env("ZHIBO_STORE__REDIS_URL", &c.store.redis_url)
            .env("ZHIBO_LOG", "info")
            .env("ZHIBO_METRICS_ADDR", "127.0.0.1:0")
            .env("NO_COLOR", "1")
            .env(
                "ZHIBO_PUSH__STREAM_MAX_BYTES",
                TEST_STREAM_MAX_BYTES.to_string(),
            )
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start zhibo logic-worker");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        // Its output so far, to show why it did not get ready.
        let mut output = Vec::new();
        let ready = async {
            while let Some(line) = lines.next_line().await.expect("read worker output") {
                if line.contains("consuming commands") {
                    return true;
                }
                output.push(line);
            }
            false
        };
        match tokio::time::timeout(READY_WAIT, ready).await {
            Ok(true) => {}
            Ok(false) => panic!(
                "logic-worker exited before consuming commands:\n{}",
                output.join("\n")
            ),
            Err(_) => panic!(
                "logic-worker not consuming commands within {READY_WAIT:?}:\n{}",
                output.join("\n")
            ),
        }
        // Keep draining its output so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        WorkerProcess { child }
    }

    /// Stops every node and waits for them; fails if a node failed.
    pub(crate) async fn stop(mut self) {
        self.shutdown.cancel();
        for n in self.nodes.drain(..) {
            n.await.expect("node task").expect("node ran cleanly");
        }
    }

    /// Starts draining gateway `i` as SIGTERM would (embedded: the whole node, which has the one gateway).
    pub(crate) fn drain_gateway(&self, i: usize) {
        match self.gateway_stops.get(i) {
            Some(stop) => stop.cancel(),
            None => self.shutdown.cancel(),
        }
    }

    /// Gateway `i` (wrapping), so tests spread users over gateways in distributed mode.
    pub(crate) fn gw(&self, i: usize) -> GatewayAddrs {
        self.gateways[i % self.gateways.len()]
    }

    /// A new user with one registered device, signed in.
    pub(crate) async fn user(&self, name: &str) -> Credentials {
        sign_up(&self.api, name).await
    }

    /// Another device of the same user (`creds`' username is unknown here, so mint through the admin-free
    /// path: sign in again needs the username; we keep it simple by registering via the token route).
    pub(crate) async fn second_device(&self, creds: &Credentials) -> Credentials {
        let device = self
            .api
            .register_device("ios")
            .await
            .expect("register device");
        let key = zhibo_auth::TokenKey::new(SECRET);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64;
        Credentials {
            user_id: creds.user_id,
            device_id: device,
            token: key.mint(&zhibo_auth::Claims {
                user_id: creds.user_id,
                device_id: device,
                exp: now + 3600,
                iat: now,
                iat_ms: None,
            }),
        }
    }

    /// Makes `a` and `b` friends through the API.
    pub(crate) async fn befriend(&self, a: &Credentials, b: &Credentials) {
        self.api
            .post(
                "/v1/friends/requests",
                Some(&a.token),
                json!({"to_user_id": b.user_id, "message": "hi"}),
            )
            .await
            .expect("friend request");
        self.api
            .post(
                &format!("/v1/friends/requests/{}/agree", a.user_id),
                Some(&b.token),
                json!({}),
            )
            .await
            .expect("agree");
    }

    /// Creates a group owned by `owner` with `members`; returns its id.
    pub(crate) async fn group(&self, owner: &Credentials, members: &[&Credentials]) -> i64 {
        let ids: Vec<i64> = members.iter().map(|m| m.user_id).collect();
        let v = self
            .api
            .post(
                "/v1/groups",
                Some(&owner.token),
                json!({"name": "e2e", "member_ids": ids}),
            )
            .await
            .expect("create group");
        let group_id = v["group_id"].as_i64().expect("group_id");
        // Members who are not the owner's friends are invited (the default group-add policy): they
        // accept, as their app would.
        let invited: Vec<i64> = v["invited"]
            .as_array()
            .expect("invited")
            .iter()
            .filter_map(serde_json::Value::as_i64)
            .collect();
        for m in members.iter().filter(|m| invited.contains(&m.user_id)) {
            self.api
                .post(
                    &format!("/v1/groups/invitations/{group_id}/accept"),
                    Some(&m.token),
                    json!({}),
                )
                .await
                .expect("accept group invitation");
        }
        group_id
    }

    /// Connects and signs in `creds` over `t` on gateway `gw`.
    pub(crate) async fn connect(&self, t: Transport, gw: usize, creds: &Credentials) -> Client {
        Client::connect(t, &self.gw(gw).of(t), creds)
            .await
            .expect("connect and sign in")
            .0
    }
}

/// Runs one command on the Redis at `redis_url` (`redis://host:port[/db]`, the database selected
/// first) over raw RESP; returns the first line of its answer.
pub(crate) async fn redis_command(redis_url: &str, args: &[&str]) -> String {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let rest = redis_url.trim_start_matches("redis://");
    let (addr, db) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = tokio::io::BufReader::new(
        tokio::net::TcpStream::connect(addr)
            .await
            .expect("connect redis"),
    );
    let resp = |args: &[&str]| {
        let mut cmd = format!("*{}\r\n", args.len());
        for a in args {
            cmd.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        cmd
    };
    let mut line = String::new();
    if !db.is_empty() {
        s.get_mut()
            .write_all(resp(&["SELECT", db]).as_bytes())
            .await
            .expect("write");
        s.read_line(&mut line).await.expect("read");
        assert_eq!(line, "+OK\r\n", "SELECT {db}");
        line.clear();
    }
    s.get_mut()
        .write_all(resp(args).as_bytes())
        .await
        .expect("write");
    s.read_line(&mut line).await.expect("read");
    line
}

/// `FLUSHDB` on the Redis database of `redis_url` (a Redis loss, as the tests inject it): each
/// distributed test cluster has its own database, so only its own keys go.
pub(crate) async fn flushdb(redis_url: &str) {
    assert_eq!(redis_command(redis_url, &["FLUSHDB"]).await, "+OK\r\n");
}

/// `DEL key` on the Redis database of `redis_url`; returns how many keys went.
pub(crate) async fn redis_del(redis_url: &str, key: &str) -> u64 {
    let line = redis_command(redis_url, &["DEL", key]).await;
    line.trim_end()
        .strip_prefix(':')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected DEL answer {line:?}"))
}
