//! [`TestServer`]: the real API on 127.0.0.1:0 over the given stores, with helpers to call it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use zhibo_auth::TokenKey;
use zhibo_logic::{Logic, LogicConfig};
use zhibo_store::ids::IdGen;
use zhibo_store::Stores;
use zhibo_user_api::{ApiConfig, Deps};

pub(crate) const ADMIN_SECRET: &str = "test-admin-secret-0123456789";
pub(crate) const TOKEN_SECRET: &str = "test-token-secret";

/// A running server; stopped on drop.
pub(crate) struct TestServer {
    pub(crate) base: String,
    pub(crate) http: reqwest::Client,
    pub(crate) key: TokenKey,
    pub(crate) ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The server with the test config (admin API enabled).
pub(crate) async fn start(stores: Stores) -> TestServer {
    start_with(
        stores,
        ApiConfig {
            admin_secret: ADMIN_SECRET.to_owned(),
            ..ApiConfig::default()
        },
    )
    .await
}

/// The server with `config`, once `/readyz` answers 200 (its entity-id node lease is held: on a loaded
/// Cassandra the first lease can take longer than a request's wait for one).
pub(crate) async fn start_with(stores: Stores, config: ApiConfig) -> TestServer {
    let s = start_unready(stores, config).await;
    s.wait_ready().await;
    s
}

/// The server with `config`, without waiting for readiness.
pub(crate) async fn start_unready(stores: Stores, config: ApiConfig) -> TestServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let logic = Logic::new(
        stores.clone(),
        Arc::new(zhibo_bus::memory::MemoryBus::new()),
        Arc::new(zhibo_store::presence::MemoryPresence::new()),
        LogicConfig::default(),
    );
    let ready = Arc::new(AtomicBool::new(true));
    let ready_flag = ready.clone();
    let deps = Deps {
        stores,
        key: Arc::new(TokenKey::new(TOKEN_SECRET)),
        logic: Arc::new(logic),
        ready: Arc::new(move || ready_flag.load(Ordering::Relaxed)),
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(zhibo_user_api::run(
        config,
        listener,
        deps,
        shutdown.clone(),
    ));
    TestServer {
        base: format!("http://{addr}"),
        // Idle connections are dropped well before the server closes them (30 s without a request
        // head): on a loaded machine a case can pause that long, and a reused connection the server
        // just closed fails the request ("IncompleteMessage").
        http: reqwest::Client::builder()
            .pool_idle_timeout(std::time::Duration::from_secs(10))
            .build()
            .expect("HTTP client"),
        key: TokenKey::new(TOKEN_SECRET),
        ready,
        shutdown,
        task: Some(task),
    }
}

/// A response: status, `Retry-After` if any, and the JSON body (`Null` when empty).
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) retry_after: Option<u64>,
    pub(crate) body: Value,
}

impl Reply {
    /// Asserts `status` and returns the body.
    #[track_caller]
    pub(crate) fn ok(self, status: u16) -> Value {
        assert_eq!(
            self.status.as_u16(),
            status,
            "unexpected reply: {:?}",
            self.body
        );
        self.body
    }

    /// Asserts an error reply with `status` and `code`.
    #[track_caller]
    pub(crate) fn err(&self, status: u16, code: &str) {
        assert_eq!(
            (self.status.as_u16(), self.body["error"]["code"].as_str()),
            (status, Some(code)),
            "unexpected reply: {:?}",
            self.body
        );
        assert!(
            self.body["error"]["message"].is_string(),
            "error without message: {:?}",
            self.body
        );
    }
}

/// Who a call is made as.
#[derive(Clone, Copy)]
pub(crate) enum As<'a> {
    Anonymous,
    Token(&'a str),
    Admin(&'a str),
}

/// A user with a token, as the tests use them.
#[derive(Debug, Clone)]
pub(crate) struct TestUser {
    pub(crate) user_id: i64,
    pub(crate) device_id: i64,
    pub(crate) username: String,
    pub(crate) token: String,
}

impl TestUser {
    pub(crate) fn auth(&self) -> As<'_> {
        As::Token(&self.token)
    }
}

/// A username no other case uses (cases may share one keyspace).
pub(crate) fn unique_username(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    // Ends in a letter: no generated name is a prefix of another (the exact-match search test).
    format!("{prefix}{}_{n}x", std::process::id() % 10_000)
}

/// A fresh user id for admin upserts.
pub(crate) fn unique_user_id() -> i64 {
    static IDS: OnceLock<IdGen> = OnceLock::new();
    IDS.get_or_init(|| IdGen::entities(31)).next_i64()
}

impl TestServer {
    /// Calls `method path` as `who` with an optional JSON body.
    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        who: As<'_>,
        body: Option<Value>,
    ) -> Reply {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        req = match who {
            As::Anonymous => req,
            As::Token(t) => req.bearer_auth(t),
            As::Admin(secret) => req.header("x-admin-secret", secret),
        };
        if let Some(body) = body {
            req = req.json(&body);
        }
        self.send(req).await
    }

    /// Sends a prepared request.
    pub(crate) async fn send(&self, req: reqwest::RequestBuilder) -> Reply {
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let bytes = resp.bytes().await.expect("body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                panic!("non-JSON body ({e}): {}", String::from_utf8_lossy(&bytes))
            })
        };
        Reply {
            status,
            retry_after,
            body,
        }
    }

    pub(crate) async fn get(&self, path: &str, who: As<'_>) -> Reply {
        self.call(Method::GET, path, who, None).await
    }

    pub(crate) async fn post(&self, path: &str, who: As<'_>, body: Value) -> Reply {
        self.call(Method::POST, path, who, Some(body)).await
    }

    pub(crate) async fn patch(&self, path: &str, who: As<'_>, body: Value) -> Reply {
        self.call(Method::PATCH, path, who, Some(body)).await
    }

    pub(crate) async fn delete(&self, path: &str, who: As<'_>) -> Reply {
        self.call(Method::DELETE, path, who, None).await
    }

    /// Waits (60 s at most) until `/readyz` answers 200.
    pub(crate) async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let reply = self.get("/readyz", As::Anonymous).await;
            if reply.status == StatusCode::OK {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not ready within 60 s: {:?}",
                reply.body
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Registers a device.
    pub(crate) async fn device(&self) -> i64 {
        let body = self
            .post(
                "/v1/devices",
                As::Anonymous,
                json!({"type": "android", "brand": "xiaomi", "model": "mi 14", "system_version": "14",
                       "sdk_version": "1.0.0"}),
            )
            .await
            .ok(201);
        body["device_id"].as_i64().expect("device_id")
    }

    /// A user created through the admin API, with a minted token on a fresh device (no argon2: fast).
    pub(crate) async fn user(&self) -> TestUser {
        let username = unique_username("u");
        let user_id = unique_user_id();
        self.call(
            Method::PUT,
            &format!("/v1/admin/users/{user_id}"),
            As::Admin(ADMIN_SECRET),
            Some(json!({"username": username, "nickname": format!("nick {username}")})),
        )
        .await
        .ok(200);
        let device_id = self.device().await;
        let token = self
            .post(
                "/v1/admin/tokens",
                As::Admin(ADMIN_SECRET),
                json!({"user_id": user_id, "device_id": device_id}),
            )
            .await
            .ok(200)["token"]
            .as_str()
            .expect("token")
            .to_owned();
        TestUser {
            user_id,
            device_id,
            username,
            token,
        }
    }

    /// A user who signed up with a password and signed in on a fresh device.
    pub(crate) async fn signed_up(&self, password: &str) -> TestUser {
        let username = unique_username("s");
        let user_id = self
            .post(
                "/v1/users",
                As::Anonymous,
                json!({"username": username, "password": password}),
            )
            .await
            .ok(201)["user_id"]
            .as_i64()
            .expect("user_id");
        let device_id = self.device().await;
        let session = self
            .post(
                "/v1/sessions",
                As::Anonymous,
                json!({"username": username, "password": password, "device_id": device_id}),
            )
            .await
            .ok(200);
        assert_eq!(session["user_id"].as_i64(), Some(user_id));
        assert_eq!(session["device_id"].as_i64(), Some(device_id));
        TestUser {
            user_id,
            device_id,
            username,
            token: session["token"].as_str().expect("token").to_owned(),
        }
    }
}
