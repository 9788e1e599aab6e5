//! Servers for the SDK's tests: an embedded node (`zhibo dev` in-process, restartable on the same
//! ports) and a distributed cluster (two gateways, gateway 0 hinting at gateway 1 when it drains, two
//! logic workers and a user-api on real NATS, Redis and Cassandra).

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use zhibo::{Bound, Config, StoreKind};
use zhibo_client::proto::client::packet::Body;
use zhibo_client::proto::client::SyncInput;
use zhibo_client::{Api, Credentials, Transport};

pub(crate) const SECRET: &str = "sdk-e2e-secret";

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

pub(crate) struct Cluster {
    pub(crate) api: Api,
    pub(crate) gateways: Vec<GatewayAddrs>,
    config: Config,
    api_addr: SocketAddr,
    gateway_stops: Vec<CancellationToken>,
    shutdown: CancellationToken,
    nodes: Vec<JoinHandle<anyhow::Result<()>>>,
    embedded: bool,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn subject_prefix() -> &'static str {
    static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PREFIX.get_or_init(|| zhibo_testkit::unique_name("sdk"))
}

fn base_config() -> Config {
    let mut c = Config {
        token_secret: SECRET.into(),
        // An upper bound for `stop()` on a loaded machine, not a wait.
        grace_secs: 10,
        ..Config::default()
    };
    // Its own subjects on the shared NATS: another test process's workers never take our commands.
    c.bus.subject_prefix = subject_prefix().to_owned();
    c.gateway.tcp_addr = "127.0.0.1:0".parse().expect("addr");
    c.gateway.ws_addr = "127.0.0.1:0".parse().expect("addr");
    c.gateway.quic_addr = "127.0.0.1:0".parse().expect("addr");
    c.gateway.rate_per_sec = 200.0;
    c.gateway.rate_burst = 400.0;
    c.api_addr = "127.0.0.1:0".parse().expect("addr");
    c
}

async fn bind_gateway(config: &Config) -> (zhibo_gateway::Listeners, GatewayAddrs) {
    let l = zhibo_gateway::Listeners::bind(&config.gateway)
        .await
        .expect("bind gateway");
    let (tcp, ws, quic) = l.addrs().expect("addrs");
    (l, GatewayAddrs { tcp, ws, quic })
}

async fn shared_keyspace(config: &Config) -> String {
    static KEYSPACE: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    KEYSPACE
        .get_or_init(|| async {
            let ks = zhibo_testkit::unique_name("sdk");
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

impl Cluster {
    pub(crate) async fn embedded() -> Cluster {
        Self::embedded_with(|_| {}).await
    }

    /// One node running every role on the in-process bus and an embedded store file.
    pub(crate) async fn embedded_with(tweak: impl FnOnce(&mut Config)) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = base_config();
        tweak(&mut config);
        config.store.kind = StoreKind::Embedded;
        config.store.path = dir.path().join("zhibo.redb").display().to_string();
        let api = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind api");
        let api_addr = api.local_addr().expect("addr");
        let mut cluster = Cluster {
            api: Api::new(format!("http://{api_addr}")),
            gateways: Vec::new(),
            config,
            api_addr,
            gateway_stops: Vec::new(),
            shutdown: CancellationToken::new(),
            nodes: Vec::new(),
            embedded: true,
            _dir: Some(dir),
        };
        cluster.start_embedded(api).await;
        cluster
    }

    async fn start_embedded(&mut self, api: tokio::net::TcpListener) {
        let backends = zhibo::connect(&self.config, "sdk-e2e")
            .await
            .expect("backends");
        let (listeners, addrs) = bind_gateway(&self.config).await;
        // A restart binds the same ports again.
        self.config.gateway.tcp_addr = addrs.tcp;
        self.config.gateway.ws_addr = addrs.ws;
        self.config.gateway.quic_addr = addrs.quic;
        self.gateways = vec![addrs];
        let bound = Bound {
            gateway: Some(listeners),
            api: Some(api),
            logic: true,
            ops: None,
        };
        self.shutdown = CancellationToken::new();
        self.nodes.push(tokio::spawn(zhibo::run(
            self.config.clone(),
            backends,
            bound,
            self.shutdown.clone(),
        )));
    }

    /// Stops the embedded node (as SIGTERM would) and waits until it is down.
    pub(crate) async fn stop_node(&mut self) {
        assert!(self.embedded, "restart is for the embedded node");
        self.shutdown.cancel();
        for n in self.nodes.drain(..) {
            n.await.expect("node task").expect("node ran cleanly");
        }
    }

    /// Starts the embedded node again on the same ports and store file.
    pub(crate) async fn start_node(&mut self) {
        let api = tokio::net::TcpListener::bind(self.api_addr)
            .await
            .expect("bind the api port again");
        self.start_embedded(api).await;
    }

    /// Two gateways (gateway 0's GoAway points at gateway 1), two logic workers and a user-api on real
    /// NATS, Redis and Cassandra.
    pub(crate) async fn distributed() -> Cluster {
        let nats = zhibo_testkit::require_nats_account().await;
        let redis = zhibo_testkit::require_redis().await;
        let cql = zhibo_testkit::require_cql().await;
        let mut config = base_config();
        config.bus.nats_url = nats;
        config.store.kind = StoreKind::Scylla;
        config.store.cql_nodes = vec![cql];
        config.store.keyspace = shared_keyspace(&config).await;
        config.store.redis_url = redis;
        let shutdown = CancellationToken::new();
        let mut nodes = Vec::new();
        let mut bound_gateways = Vec::new();
        // Gateway 1 first, so that gateway 0 can name it in its reconnect hints.
        for i in [1, 0] {
            let mut c = config.clone();
            c.gateway.gateway_id = format!("sdk-gw-{}-{i}", std::process::id());
            if i == 0 {
                let other: &GatewayAddrs = &bound_gateways
                    .iter()
                    .map(|(_, _, a)| a)
                    .next()
                    .copied()
                    .expect("gateway 1");
                c.gateway.reconnect_hint_tcp = other.tcp.to_string();
                c.gateway.reconnect_hint_quic = other.quic.to_string();
                c.gateway.reconnect_hint_ws = format!("ws://{}/ws", other.ws);
            }
            let (listeners, addrs) = bind_gateway(&c).await;
            bound_gateways.push((c, listeners, addrs));
        }
        bound_gateways.reverse();
        let mut gateways = Vec::new();
        let mut gateway_stops = Vec::new();
        for (c, listeners, addrs) in bound_gateways {
            let backends = zhibo::connect(&c, "sdk-gateway")
                .await
                .expect("gateway backends");
            gateways.push(addrs);
            let stop = shutdown.child_token();
            gateway_stops.push(stop.clone());
            let bound = Bound {
                gateway: Some(listeners),
                ..Bound::default()
            };
            nodes.push(tokio::spawn(zhibo::run(c, backends, bound, stop)));
        }
        for _ in 0..2 {
            let backends = zhibo::connect(&config, "sdk-logic")
                .await
                .expect("logic backends");
            let bound = Bound {
                logic: true,
                ..Bound::default()
            };
            nodes.push(tokio::spawn(zhibo::run(
                config.clone(),
                backends,
                bound,
                shutdown.clone(),
            )));
        }
        let backends = zhibo::connect(&config, "sdk-api")
            .await
            .expect("api backends");
        let api = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind api");
        let api_addr = api.local_addr().expect("addr");
        let bound = Bound {
            api: Some(api),
            ..Bound::default()
        };
        nodes.push(tokio::spawn(zhibo::run(
            config.clone(),
            backends,
            bound,
            shutdown.clone(),
        )));
        let cluster = Cluster {
            api: Api::new(format!("http://{api_addr}")),
            gateways,
            config,
            api_addr,
            gateway_stops,
            shutdown,
            nodes,
            embedded: false,
            _dir: None,
        };
        cluster.wait_until_serving().await;
        cluster
    }

    /// Waits until a command sent through each gateway is answered by a logic worker: queue
    /// subscriptions reach the NATS server asynchronously, and a command published before them is
    /// lost. A `Sync` round trip proves them live (the same wait as zhibo's e2e fixture).
    async fn wait_until_serving(&self) {
        let probe = self.user("probe").await;
        for gw in &self.gateways {
            let addr = gw.tcp.to_string();
            let mut client = zhibo_client::Client::connect(Transport::Tcp, &addr, &probe)
                .await
                .expect("connect the probe")
                .0;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                let sync = Body::Sync(SyncInput { seq: 0, limit: 1 });
                let reply = client.request(sync, Duration::from_millis(500)).await;
                if matches!(reply, Ok(ref p) if matches!(p.body, Some(Body::SyncOutput(_)))) {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no logic worker answered through gateway {addr}: {reply:?}"
                );
            }
        }
    }

    pub(crate) fn is_embedded(&self) -> bool {
        self.embedded
    }

    /// Stops every node and waits for them; fails if a node failed.
    pub(crate) async fn stop(mut self) {
        self.shutdown.cancel();
        for n in self.nodes.drain(..) {
            n.await.expect("node task").expect("node ran cleanly");
        }
    }

    /// Starts draining gateway `i` as SIGTERM would.
    pub(crate) fn drain_gateway(&self, i: usize) {
        self.gateway_stops[i].cancel();
    }

    pub(crate) fn gw(&self, i: usize) -> GatewayAddrs {
        self.gateways[i % self.gateways.len()]
    }

    /// A new user with one registered device, signed in.
    pub(crate) async fn user(&self, name: &str) -> Credentials {
        let device = self
            .api
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
        self.api
            .sign_up_and_in(&username, "correct horse battery", device)
            .await
            .expect("sign up and in")
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
}
