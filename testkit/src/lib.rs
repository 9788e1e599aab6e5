//! Test fixtures for the real servers that integration tests run against.
//!
//! # Layout
//! - Addresses: [`nats_url`], [`redis_url`], [`redis_cluster_urls`], [`cql_node`] read the
//!   `ZHIBO_TEST_*` variables that
//!   `scripts/infra.sh env` prints, defaulting to the harness's loopback ports.
//! - Presence: [`require_tcp`] (and the [`require_nats`], [`require_redis`],
//!   [`require_redis_cluster`], [`require_cql`]
//!   shorthands) panic loudly when a server is missing. A test never skips because a server is
//!   missing: a skipped test looks exactly like a passing one in CI.
//! - Isolation: [`unique_name`] gives each test its own keyspace, subject or key prefix, so tests
//!   running in parallel (and leftovers of earlier runs) never see each other's data.
//! - Private servers: [`NatsServer`] starts a `nats-server` with a test's own configuration
//!   (authentication, TLS) on a free port.
//!
//! Start the servers with `scripts/test` (which also runs the tests) or `scripts/infra.sh up`.
#![warn(missing_docs)]

mod nats_server;

pub use nats_server::NatsServer;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Environment variable holding the NATS URL.
pub const NATS_URL_VAR: &str = "ZHIBO_TEST_NATS_URL";
/// Environment variable holding the Redis URL.
pub const REDIS_URL_VAR: &str = "ZHIBO_TEST_REDIS_URL";
/// Environment variable holding the masters of the test Redis Cluster: comma-separated
/// `redis://host:port` URLs.
pub const REDIS_CLUSTER_URLS_VAR: &str = "ZHIBO_TEST_REDIS_CLUSTER_URLS";
/// Environment variable holding the Cassandra `host:port` (CQL native protocol).
pub const CQL_NODE_VAR: &str = "ZHIBO_TEST_CQL_NODE";

/// How long [`require_tcp`] waits for a connection before declaring the server missing.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// URL of the test NATS server (JetStream enabled): `$ZHIBO_TEST_NATS_URL`, or the harness's
/// `nats://127.0.0.1:14222`.
pub fn nats_url() -> String {
    env_or(NATS_URL_VAR, "nats://127.0.0.1:14222")
}

/// URL of the test Redis server: `$ZHIBO_TEST_REDIS_URL`, or the harness's
/// `redis://127.0.0.1:16379`.
pub fn redis_url() -> String {
    env_or(REDIS_URL_VAR, "redis://127.0.0.1:16379")
}

/// URLs of the test Redis Cluster's masters: `$ZHIBO_TEST_REDIS_CLUSTER_URLS` (comma-separated), or
/// the harness's three masters on ports 17001-17003.
pub fn redis_cluster_urls() -> Vec<String> {
    env_or(
        REDIS_CLUSTER_URLS_VAR,
        "redis://127.0.0.1:17001,redis://127.0.0.1:17002,redis://127.0.0.1:17003",
    )
    .split(',')
    .map(|u| u.trim().to_owned())
    .filter(|u| !u.is_empty())
    .collect()
}

/// The `redis-cluster://` URL (first master, the others as `node=` seeds) that zhibo's
/// `store.redis_url` takes for a Redis Cluster made of the masters `urls`.
pub fn redis_cluster_url(urls: &[String]) -> String {
    let nodes: Vec<&str> = urls.iter().map(|u| host_port(u)).collect();
    let (first, rest) = nodes.split_first().expect("at least one cluster node");
    let seeds: Vec<String> = rest.iter().map(|n| format!("node={n}")).collect();
    if seeds.is_empty() {
        format!("redis-cluster://{first}")
    } else {
        format!("redis-cluster://{first}?{}", seeds.join("&"))
    }
}

/// [`require_tcp`] on every master of [`redis_cluster_urls`]; returns the masters' URLs.
///
/// # Panics
///
/// Panics if a master is not reachable.
pub async fn require_redis_cluster() -> Vec<String> {
    let urls = redis_cluster_urls();
    for url in &urls {
        require_tcp(url, "Redis Cluster master").await;
    }
    urls
}

/// `host:port` of the test Cassandra node's CQL port: `$ZHIBO_TEST_CQL_NODE`, or the harness's
/// `127.0.0.1:19042`.
pub fn cql_node() -> String {
    env_or(CQL_NODE_VAR, "127.0.0.1:19042")
}

fn env_or(var: &str, default: &str) -> String {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => v.trim().to_owned(),
        _ => default.to_owned(),
    }
}

/// Checks that the server `what` accepts a TCP connection at `addr` within [`CONNECT_TIMEOUT`].
///
/// `addr` is `host:port` or a URL such as `nats://host:port` or `redis://host:port/0` (scheme,
/// credentials and path are ignored).
///
/// # Panics
///
/// Panics, with a message naming the missing server and how to start it, if the connection is
/// refused or times out. This is deliberate: integration tests never skip.
pub async fn require_tcp(addr: &str, what: &str) {
    let target = host_port(addr);
    let outcome =
        tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(target)).await;
    let problem = match outcome {
        Ok(Ok(_stream)) => return,
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {CONNECT_TIMEOUT:?}"),
    };
    panic!(
        "\n\n\
         ==================== TEST INFRASTRUCTURE MISSING ====================\n\
         {what} is not reachable at {target} ({problem}).\n\
         Integration tests run against real servers and never skip.\n\
         Run the whole suite with `scripts/test`, or start the servers with\n\
         `scripts/infra.sh up` and then `eval \"$(scripts/infra.sh env)\"`.\n\
         =====================================================================\n"
    );
}

/// [`require_tcp`] on [`nats_url`]; returns the URL.
///
/// # Panics
///
/// Panics if NATS is not reachable.
pub async fn require_nats() -> String {
    let url = nats_url();
    require_tcp(&url, "NATS").await;
    url
}

/// Accounts of the harness's NATS server (`scripts/infra.sh`): `t0` … `t31`, user = password.
pub const NATS_ACCOUNTS: u32 = 32;

/// [`require_nats`], with the credentials of the next of the harness's [`NATS_ACCOUNTS`] accounts
/// (round robin in this process, `t1` first; `t0` is what clients without credentials get): each
/// account has its own subjects and JetStream, so a test cluster given its own account never takes
/// another concurrent cluster's commands or replies, whatever their subject prefixes. A NATS server
/// without authorization ignores the credentials; clusters on it are kept apart by their subject
/// prefix and gateway ids only.
///
/// # Panics
///
/// Panics if NATS is not reachable.
pub async fn require_nats_account() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let url = require_nats().await;
    let account = 1 + NEXT.fetch_add(1, Ordering::Relaxed) % (NATS_ACCOUNTS - 1);
    match url.split_once("://") {
        Some((scheme, rest)) if !rest.contains('@') => {
            format!("{scheme}://t{account}:t{account}@{rest}")
        }
        // Credentials of its own: a server this harness did not start.
        _ => url,
    }
}

/// [`require_tcp`] on [`redis_url`]; returns the URL.
///
/// # Panics
///
/// Panics if Redis is not reachable.
pub async fn require_redis() -> String {
    let url = redis_url();
    require_tcp(&url, "Redis").await;
    url
}

/// [`require_tcp`] on [`cql_node`]; returns the node address.
///
/// # Panics
///
/// Panics if Cassandra is not reachable.
pub async fn require_cql() -> String {
    let node = cql_node();
    require_tcp(&node, "Cassandra (CQL)").await;
    node
}

/// The `host:port` part of `addr`, which may be a bare `host:port` or a URL.
fn host_port(addr: &str) -> &str {
    let rest = addr.split_once("://").map_or(addr, |(_, rest)| rest);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host)
}

/// A name no other test (in this process, a parallel process, or an earlier run) uses:
/// `{prefix}_{pid}_{counter}_{nanos}`.
///
/// Lower-case ASCII letters, digits and `_` only (given such a prefix), so it is valid as a CQL
/// keyspace or table name, a NATS subject token and a Redis key. Keep `prefix` under 16 bytes to
/// stay within CQL's 48-character limit for keyspace names.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "{prefix}_{pid}_{n}_{secs}{nanos:09}",
        pid = std::process::id(),
        secs = now.as_secs() % 100_000,
        nanos = now.subsec_nanos(),
    )
}

/// An HTTP server on loopback that answers every request with the bytes of `answer` (a whole
/// response: status line, headers, body) and closes; returns its `http://host:port` and the count of
/// connections it took. For the calls zhibo makes to an app backend (push, webhooks, hooks).
pub async fn http_answering(answer: String) -> (String, std::sync::Arc<AtomicU64>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let base = format!("http://{}", listener.local_addr().expect("local address"));
    let hits = std::sync::Arc::new(AtomicU64::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut request = vec![0u8; 64 * 1024];
                let _ = socket.read(&mut request).await;
                let _ = socket.write_all(answer.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    (base, hits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_cluster_url_names_every_master() {
        let urls = ["redis://127.0.0.1:1", "redis://127.0.0.1:2", "127.0.0.1:3"].map(String::from);
        assert_eq!(
            redis_cluster_url(&urls),
            "redis-cluster://127.0.0.1:1?node=127.0.0.1:2&node=127.0.0.1:3"
        );
        assert_eq!(redis_cluster_url(&urls[..1]), "redis-cluster://127.0.0.1:1");
    }

    #[test]
    fn host_port_accepts_urls_and_bare_addresses() {
        assert_eq!(host_port("127.0.0.1:19042"), "127.0.0.1:19042");
        assert_eq!(host_port("nats://127.0.0.1:14222"), "127.0.0.1:14222");
        assert_eq!(host_port("redis://127.0.0.1:16379/0"), "127.0.0.1:16379");
        assert_eq!(
            host_port("redis://user:pw@127.0.0.1:16379"),
            "127.0.0.1:16379"
        );
    }

    #[test]
    fn unique_names_differ_and_fit_cql_identifiers() {
        let a = unique_name("ks_test");
        let b = unique_name("ks_test");
        assert_ne!(a, b);
        for name in [&a, &b] {
            assert!(name.len() <= 48, "{name} is too long for a keyspace");
            assert!(name
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_'));
        }
    }

    #[tokio::test]
    #[should_panic(expected = "TEST INFRASTRUCTURE MISSING")]
    async fn require_tcp_panics_when_nothing_listens() {
        // Port 1 on loopback: nothing listens there, the connection is refused at once.
        require_tcp("127.0.0.1:1", "nothing").await;
    }
}
