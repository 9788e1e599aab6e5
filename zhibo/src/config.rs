//! The configuration of every role, from a TOML file then `ZHIBO_*` environment variables.
//!
//! `ZHIBO_GATEWAY__TCP_ADDR=0.0.0.0:7001` sets `[gateway] tcp_addr`: the prefix is stripped, `__` separates
//! levels, names are lower-cased, and values are read as TOML scalars (numbers, booleans) or else strings.
//! The project's own non-config variables ([`NON_CONFIG_NAMES`], [`NON_CONFIG_PREFIXES`]: the config file
//! path, the log filter, the test and infra harness) are skipped; any other unknown name is fatal.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

/// Which store backs the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// redb file (or memory) in this process; seqs in it too.
    Embedded,
    /// ScyllaDB / Cassandra, seqs in Redis.
    Scylla,
}

/// Storage settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Backend.
    pub kind: StoreKind,
    /// Embedded database file; empty = in memory (lost at exit).
    pub path: String,
    /// CQL contact points.
    pub cql_nodes: Vec<String>,
    /// Keyspace.
    pub keyspace: String,
    /// Replication factor used when the keyspace is created.
    pub replication_factor: u32,
    /// Redis for seq counters (Scylla mode).
    pub redis_url: String,
    /// Scylla mode: keep each user's conversation list in Redis (`store::list_cache`), rebuilt from
    /// the database at least this often (seconds, at most [`MAX_LIST_CACHE_SECS`]); 0 = read the
    /// database on every listing.
    pub list_cache_secs: u64,
}

/// The largest `store.list_cache_secs`: it bounds how long a lost invalidation can go unseen.
pub const MAX_LIST_CACHE_SECS: u64 = 86_400;

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::Embedded,
            path: "zhibo-data/zhibo.redb".into(),
            cql_nodes: vec!["127.0.0.1:9042".into()],
            keyspace: "zhibo".into(),
            replication_factor: 1,
            redis_url: "redis://127.0.0.1:6379".into(),
            list_cache_secs: 60,
        }
    }
}

/// Bus settings. Anything that can publish on the bus can act as any user: production NATS needs
/// authentication (one of user/password, token, nkey seed, creds file) and, across hosts, TLS.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BusConfig {
    /// First token of every NATS subject (`<prefix>.cmd`, `<prefix>.gwu.<gateway>`…): deployments sharing
    /// one NATS server with different prefixes never see each other's traffic. One token: ASCII
    /// letters, digits, `-`, `_`.
    pub subject_prefix: String,
    /// NATS server URL(s), comma-separated; may carry `user:password@`; empty = in-process bus
    /// (embedded mode only).
    pub nats_url: String,
    /// NATS user (with `nats_password`).
    pub nats_user: String,
    /// NATS password.
    #[serde(deserialize_with = "zhibo_push::config::scalar_string")]
    pub nats_password: String,
    /// NATS authentication token.
    #[serde(deserialize_with = "zhibo_push::config::scalar_string")]
    pub nats_token: String,
    /// NATS nkey seed (`SU…`).
    pub nats_nkey_seed: String,
    /// NATS `.creds` file (JWT + seed).
    pub nats_creds_file: Option<PathBuf>,
    /// PEM CA the NATS server certificate must chain to; implies TLS.
    pub nats_tls_ca: Option<PathBuf>,
    /// Refuse a NATS connection that is not TLS.
    pub nats_tls_required: bool,
    /// PEM client certificate for NATS servers that verify clients.
    pub nats_tls_client_cert: Option<PathBuf>,
    /// PEM key of `nats_tls_client_cert`.
    pub nats_tls_client_key: Option<PathBuf>,
    /// Try the servers of `nats_url` in the listed order (e.g. the NATS node on the same host
    /// first) instead of a random one, on connect and on every reconnect. Default: random, which
    /// spreads a fleet over the cluster.
    pub nats_servers_in_order: bool,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            subject_prefix: zhibo_bus::subject::DEFAULT_PREFIX.into(),
            nats_url: String::new(),
            nats_user: String::new(),
            nats_password: String::new(),
            nats_token: String::new(),
            nats_nkey_seed: String::new(),
            nats_creds_file: None,
            nats_tls_ca: None,
            nats_tls_required: false,
            nats_tls_client_cert: None,
            nats_tls_client_key: None,
            nats_servers_in_order: false,
        }
    }
}

impl BusConfig {
    /// The NATS connection options.
    pub fn nats(&self) -> zhibo_bus::nats::NatsOptions {
        zhibo_bus::nats::NatsOptions {
            url: self.nats_url.clone(),
            user: self.nats_user.clone(),
            password: self.nats_password.clone(),
            token: self.nats_token.clone(),
            nkey_seed: self.nats_nkey_seed.clone(),
            creds_file: self.nats_creds_file.clone(),
            tls_ca: self.nats_tls_ca.clone(),
            tls_required: self.nats_tls_required,
            tls_client_cert: self.nats_tls_client_cert.clone(),
            tls_client_key: self.nats_tls_client_key.clone(),
            servers_in_order: self.nats_servers_in_order,
        }
    }
}

impl std::fmt::Debug for BusConfig {
    /// Secrets are not shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusConfig")
            .field("subject_prefix", &self.subject_prefix)
            .field("nats", &self.nats())
            .finish()
    }
}

/// Everything, for every role; each role reads its part.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Shared HMAC secret of the tokens (user-api mints, gateways verify; app backends may mint too).
    #[serde(deserialize_with = "zhibo_push::config::scalar_string")]
    pub token_secret: String,
    /// user-api listen address.
    pub api_addr: SocketAddr,
    /// Ops endpoint (`/metrics`, `/healthz`, `/readyz`) listen address; empty = off.
    pub metrics_addr: String,
    /// OTLP/HTTP traces endpoint (e.g. `http://otel-collector:4318/v1/traces`); empty = no export.
    pub otlp_endpoint: String,
    /// Seconds to let connections and in-flight work finish after SIGTERM.
    pub grace_secs: u64,
    /// Bus.
    pub bus: BusConfig,
    /// Storage.
    pub store: StoreConfig,
    /// Gateway.
    pub gateway: zhibo_gateway::GatewayConfig,
    /// Logic worker.
    pub logic: zhibo_logic::LogicConfig,
    /// user-api.
    pub api: zhibo_user_api::ApiConfig,
    /// Offline push events (logic workers, user-api) and their delivery (push-relay).
    pub push: zhibo_push::PushConfig,
    /// Hooks into the app backend (the before-send hook), called by logic workers.
    pub hooks: zhibo_logic::HooksConfig,
    /// Event webhooks (user online/offline, message stored, group membership), delivered like push
    /// events (signed with `push.secret`, by push-relay or in embedded mode in-process).
    pub webhooks: zhibo_push::WebhooksConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            token_secret: String::new(),
            api_addr: ([127, 0, 0, 1], 7000).into(),
            grace_secs: 20,
            metrics_addr: "127.0.0.1:9100".into(),
            otlp_endpoint: String::new(),
            bus: BusConfig::default(),
            store: StoreConfig::default(),
            gateway: zhibo_gateway::GatewayConfig::default(),
            logic: zhibo_logic::LogicConfig::default(),
            api: zhibo_user_api::ApiConfig::default(),
            push: zhibo_push::PushConfig::default(),
            hooks: zhibo_logic::HooksConfig::default(),
            webhooks: zhibo_push::WebhooksConfig::default(),
        }
    }
}

/// `ZHIBO_*` variables that are not configuration (after the `ZHIBO_` prefix): the config file path
/// (`ZHIBO_CONFIG`), the log filter (`ZHIBO_LOG`) and the harness's own switches (`scripts/test`,
/// `scripts/infra.sh`, `scripts/chart-test`). Listed again in the README's configuration paragraph.
pub const NON_CONFIG_NAMES: &[&str] = &[
    "CONFIG",
    "LOG",
    "KEEP_INFRA",
    "SKIP_CHART_TEST",
    "CASSANDRA_JVM_OPTS",
];

/// Prefixes (after `ZHIBO_`) of harness variables that are not configuration: `ZHIBO_TEST_*` (test
/// fixtures, web test) and `ZHIBO_INFRA_*` (`scripts/infra.sh`).
pub const NON_CONFIG_PREFIXES: &[&str] = &["TEST_", "INFRA_"];

/// Whether `rest` (a variable name without `ZHIBO_`) is a documented non-config name.
fn is_non_config(rest: &str) -> bool {
    NON_CONFIG_NAMES.contains(&rest) || NON_CONFIG_PREFIXES.iter().any(|p| rest.starts_with(p))
}

/// Merges `ZHIBO_*` variables (`vars`) over `base`, skipping the non-config names.
fn overlay_env(base: &mut toml::Table, vars: impl Iterator<Item = (String, String)>) {
    for (name, value) in vars {
        let Some(rest) = name.strip_prefix("ZHIBO_") else {
            continue;
        };
        if is_non_config(rest) {
            continue;
        }
        let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
        // An integer only when it reads back as written: `1_000`, `0x1f` or `+5` as a secret (or any
        // string setting) must stay those characters, not become "1000", "31" or "5". A float only
        // when finite and the same as Rust reads it (`2.50` is a rate; `1_0.5` or `inf` stay text).
        let parsed = format!("v = {value}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .filter(|v| !v.is_str() && !v.is_table())
            .filter(|v| match v {
                toml::Value::Integer(i) => i.to_string() == value.trim(),
                toml::Value::Float(f) => {
                    f.is_finite() && value.trim().parse::<f64>().is_ok_and(|r| r == *f)
                }
                _ => true,
            })
            .unwrap_or(toml::Value::String(value));
        let mut table = &mut *base;
        for key in &path[..path.len() - 1] {
            let entry = table
                .entry(key.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !entry.is_table() {
                *entry = toml::Value::Table(toml::Table::new());
            }
            let toml::Value::Table(t) = entry else {
                unreachable!("made a table above")
            };
            table = t;
        }
        if let Some(last) = path.last() {
            table.insert(last.clone(), parsed);
        }
    }
}

impl Config {
    /// Reads `file` (if given), then the environment, then checks the values.
    ///
    /// # Errors
    /// A message saying what is wrong; the binary exits 64 with it before binding anything.
    pub fn load(file: Option<&PathBuf>) -> Result<Config, String> {
        Self::load_from(file, std::env::vars())
    }

    /// [`Config::load`] with explicit variables (tests).
    ///
    /// # Errors
    /// A message saying what is wrong.
    pub fn load_from(
        file: Option<&PathBuf>,
        vars: impl Iterator<Item = (String, String)>,
    ) -> Result<Config, String> {
        let mut table = match file {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|e| format!("{}: {e}", p.display()))?
                .parse::<toml::Table>()
                .map_err(|e| format!("{}: {e}", p.display()))?,
            None => toml::Table::new(),
        };
        overlay_env(&mut table, vars);
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| e.to_string())?;
        config
            .gateway
            .validate()
            .map_err(|e| format!("gateway: {e}"))?;
        config.logic.validate().map_err(|e| format!("logic: {e}"))?;
        if !config.metrics_addr.is_empty() && config.metrics_addr.parse::<SocketAddr>().is_err() {
            return Err(format!(
                "metrics_addr {:?} is not host:port",
                config.metrics_addr
            ));
        }
        if config.store.list_cache_secs > MAX_LIST_CACHE_SECS {
            return Err(format!(
                "store: list_cache_secs {} is above {MAX_LIST_CACHE_SECS} (one day)",
                config.store.list_cache_secs
            ));
        }
        // The distributed store and presence need Redis; checked now, not after connecting to the rest.
        if config.store.kind == StoreKind::Scylla || !config.bus.nats_url.is_empty() {
            zhibo_store::redis_seq::check_url(&config.store.redis_url)
                .map_err(|e| format!("store: redis_url {e}"))?;
        }
        if config.store.kind == StoreKind::Scylla
            && !zhibo_store::scylla::valid_keyspace(&config.store.keyspace)
        {
            return Err(format!(
                "store: keyspace {:?} is not a CQL identifier (a letter, then letters, digits or _; \
                 at most 48)",
                config.store.keyspace
            ));
        }
        config.api.validate().map_err(|e| format!("api: {e}"))?;
        config.hooks.validate().map_err(|e| format!("hooks: {e}"))?;
        config
            .bus
            .nats()
            .validate()
            .map_err(|e| format!("bus: {e}"))?;
        zhibo_bus::subject::validate_prefix(&config.bus.subject_prefix)
            .map_err(|e| format!("bus: {e}"))?;
        // Embedded mode delivers in-process, so enabling push there needs the target as well.
        let embedded_push = config.push.enabled && config.bus.nats_url.is_empty();
        config
            .push
            .validate(embedded_push)
            .map_err(|e| format!("push: {e}"))?;
        config
            .webhooks
            .validate()
            .map_err(|e| format!("webhooks: {e}"))?;
        if !config.webhooks.url.is_empty() && config.push.secret.len() < 16 {
            return Err(
                "push: push.secret must be at least 16 bytes (it signs webhooks too)".into(),
            );
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_cache_secs_is_bounded() {
        let load = |v: &str| Config::load_from(None, vars(&[("ZHIBO_STORE__LIST_CACHE_SECS", v)]));
        assert_eq!(load("0").expect("off").store.list_cache_secs, 0);
        assert_eq!(load("86400").expect("a day").store.list_cache_secs, 86_400);
        let Err(err) = load("86401") else {
            panic!("a list cache longer than a day is refused")
        };
        assert!(err.contains("list_cache_secs"), "{err}");
    }

    /// A distributed store's Redis URL and keyspace are checked before anything connects.
    #[test]
    fn redis_url_and_keyspace_are_checked_at_load() {
        let load = |extra: &[(&str, &str)]| {
            let mut v = vec![("ZHIBO_STORE__KIND", "scylla")];
            v.extend_from_slice(extra);
            Config::load_from(None, vars(&v))
        };
        assert!(load(&[]).is_ok(), "the defaults");
        assert!(load(&[("ZHIBO_STORE__REDIS_URL", "redis-cluster://127.0.0.1:7001")]).is_ok());
        for bad in ["", "http://127.0.0.1:6379", "127.0.0.1:6379"] {
            let Err(err) = load(&[("ZHIBO_STORE__REDIS_URL", bad)]) else {
                panic!("redis_url {bad:?} accepted")
            };
            assert!(err.contains("redis_url"), "{err}");
        }
        let Err(err) = load(&[("ZHIBO_STORE__KEYSPACE", "bad-name;drop")]) else {
            panic!("a keyspace that is not an identifier accepted")
        };
        assert!(err.contains("keyspace"), "{err}");
        // The embedded store without NATS uses neither.
        assert!(Config::load_from(None, vars(&[("ZHIBO_STORE__REDIS_URL", "")])).is_ok());
    }

    fn vars(v: &[(&str, &str)]) -> impl Iterator<Item = (String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn env_overrides_with_types() {
        let c = Config::load_from(
            None,
            vars(&[
                ("ZHIBO_GATEWAY__TCP_ADDR", "0.0.0.0:9001"),
                ("ZHIBO_GATEWAY__OUTBOUND_QUEUE", "7"),
                ("ZHIBO_LOGIC__ALLOW_STRANGERS", "true"),
                ("ZHIBO_TOKEN_SECRET", "s3cret"),
                ("ZHIBO_STORE__KIND", "scylla"),
                ("ZHIBO_TEST_NATS_URL", "ignored"),
                ("OTHER", "x"),
            ]),
        )
        .expect("valid");
        assert_eq!(
            c.gateway.tcp_addr,
            "0.0.0.0:9001".parse::<SocketAddr>().expect("addr")
        );
        assert_eq!(c.gateway.outbound_queue, 7);
        assert!(c.logic.allow_strangers);
        assert_eq!(c.token_secret, "s3cret");
        assert_eq!(c.store.kind, StoreKind::Scylla);
    }

    /// Secrets of digits come through the environment as written (outside audit: a 16-digit
    /// `ZHIBO_HOOKS__SECRET` was refused as "invalid type: integer"), and a number TOML would rewrite
    /// (`1_000`, `0x1f`, `1e3`) stays the characters given.
    #[test]
    fn secrets_from_env_are_taken_as_written() {
        for secret in [
            "1234567890123456",
            "1234567890123456789",
            "1111_2222_3333_4444",
            "0x1f2e3d4c5b6a7988",
            "+1234567890123456",
        ] {
            let c = Config::load_from(
                None,
                vars(&[
                    ("ZHIBO_HOOKS__SECRET", secret),
                    ("ZHIBO_HOOKS__BEFORE_SEND__URL", "http://backend:8080/check"),
                    ("ZHIBO_PUSH__SECRET", secret),
                    ("ZHIBO_TOKEN_SECRET", secret),
                ]),
            )
            .unwrap_or_else(|e| panic!("{secret}: {e}"));
            assert_eq!(c.hooks.secret, secret);
            assert_eq!(c.push.secret, secret);
            assert_eq!(c.token_secret, secret);
        }
        // Numbers still read as numbers, floats written with trailing zeros included.
        let c = Config::load_from(None, vars(&[("ZHIBO_GATEWAY__RATE_PER_SEC", "2.50")]))
            .expect("a float");
        assert!((c.gateway.rate_per_sec - 2.5).abs() < f64::EPSILON);
    }

    #[test]
    fn harness_variables_are_not_configuration() {
        // Every ZHIBO_* name the scripts, the web test and the testkit read (README's list).
        let c = Config::load_from(
            None,
            vars(&[
                ("ZHIBO_KEEP_INFRA", "1"),
                ("ZHIBO_CASSANDRA_JVM_OPTS", "-Xmx2g"),
                ("ZHIBO_SKIP_CHART_TEST", "1"),
                ("ZHIBO_INFRA_DIR", "/tmp/x"),
                ("ZHIBO_INFRA_TIMEOUT", "180"),
                ("ZHIBO_INFRA_CDS", "0"),
                ("ZHIBO_INFRA_STARTED_FILE", "/tmp/y"),
                ("ZHIBO_TEST_WEB_BASE", "http://x"),
                ("ZHIBO_TEST_REQUIRE_INFRA", "1"),
                ("ZHIBO_CONFIG", "/etc/zhibo.toml"),
                ("ZHIBO_LOG", "debug"),
            ]),
        );
        assert!(c.is_ok(), "{c:?}");
    }

    #[test]
    fn bad_values_are_refused_with_the_field_named() {
        let e = Config::load_from(None, vars(&[("ZHIBO_GATEWAY__OUTBOUND_QUEUE", "0")]))
            .expect_err("bad");
        assert!(e.contains("outbound_queue"), "{e}");
        let e = Config::load_from(None, vars(&[("ZHIBO_NO_SUCH", "1")])).expect_err("unknown");
        assert!(e.contains("no_such"), "{e}");
        let e = Config::load_from(None, vars(&[("ZHIBO_GATEWAY__NO_SUCH_KEY", "1")]))
            .expect_err("unknown nested");
        assert!(e.contains("no_such_key"), "{e}");
        let e = Config::load_from(None, vars(&[("ZHIBO_GATEWAY__GATEWAY_ID", "a.b")]))
            .expect_err("bad id");
        assert!(e.contains("gateway_id"), "{e}");
        for bad in ["a.b", "", "zhibo.*", ">"] {
            let e = Config::load_from(None, vars(&[("ZHIBO_BUS__SUBJECT_PREFIX", bad)]))
                .expect_err("bad prefix");
            assert!(e.contains("bus: subject prefix"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn webhooks_are_configured_from_env_and_off_by_default() {
        let c = Config::load_from(None, vars(&[])).expect("defaults");
        assert!(!c.webhooks.enabled(), "off by default");
        let c = Config::load_from(
            None,
            vars(&[
                ("ZHIBO_PUSH__SECRET", "0123456789abcdef0123"),
                ("ZHIBO_WEBHOOKS__URL", "https://backend/events"),
                (
                    "ZHIBO_WEBHOOKS__EVENTS",
                    r#"["user.online","message.stored"]"#,
                ),
            ]),
        )
        .expect("webhooks");
        assert!(c.webhooks.wants(zhibo_push::EventType::UserOnline));
        assert!(!c.webhooks.wants(zhibo_push::EventType::UserOffline));
        let e = Config::load_from(
            None,
            vars(&[
                ("ZHIBO_WEBHOOKS__URL", "https://backend/events"),
                ("ZHIBO_WEBHOOKS__EVENTS", r#"["user.online"]"#),
            ]),
        )
        .expect_err("no secret");
        assert!(e.contains("push.secret"), "{e}");
    }

    #[test]
    fn the_before_send_hook_is_configured_from_env() {
        let c = Config::load_from(None, vars(&[])).expect("defaults");
        assert!(c.hooks.before_send.url.is_empty(), "off by default");
        let c = Config::load_from(
            None,
            vars(&[
                ("ZHIBO_HOOKS__SECRET", "0123456789abcdef0123"),
                ("ZHIBO_HOOKS__BEFORE_SEND__URL", "http://backend:8080/check"),
                ("ZHIBO_HOOKS__BEFORE_SEND__TIMEOUT_MS", "250"),
                ("ZHIBO_HOOKS__BEFORE_SEND__FAILURE_POLICY", "closed"),
            ]),
        )
        .expect("hook");
        assert_eq!(c.hooks.before_send.timeout_ms, 250);
        assert_eq!(
            c.hooks.before_send.failure_policy,
            zhibo_logic::FailurePolicy::Closed
        );
        assert!(!format!("{c:?}").contains("0123456789abcdef0123"));
        let e = Config::load_from(
            None,
            vars(&[("ZHIBO_HOOKS__BEFORE_SEND__URL", "http://backend:8080/check")]),
        )
        .expect_err("no secret");
        assert!(e.contains("hooks: secret"), "{e}");
        let e = Config::load_from(
            None,
            vars(&[("ZHIBO_HOOKS__BEFORE_SEND__FAILURE_POLICY", "maybe")]),
        )
        .expect_err("bad policy");
        assert!(e.contains("maybe"), "{e}");
    }

    #[test]
    fn subject_prefix_defaults_to_zhibo_and_is_configurable() {
        let c = Config::load_from(None, vars(&[])).expect("defaults");
        assert_eq!(c.bus.subject_prefix, "zhibo");
        let c = Config::load_from(None, vars(&[("ZHIBO_BUS__SUBJECT_PREFIX", "staging-2")]))
            .expect("prefix");
        assert_eq!(c.bus.subject_prefix, "staging-2");
    }
}
