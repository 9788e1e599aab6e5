//! # Layout
//! - [`config`]: one configuration for every role (TOML file, then `ZHIBO_*` environment variables).
//! - [`security`]: the token secret checked against the role and the listen addresses before binding.
//! - [`connect`]: builds the bus (NATS, or in-process) and the stores (Scylla + Redis seqs, or embedded).
//! - [`run`]: runs any set of roles (gateway, logic worker, user-api) on one bus and set of stores,
//!   with ordered graceful shutdown. `zhibo dev` runs all three on the in-process bus and embedded store.
//! - [`run_push_relay`]: `zhibo push-relay`, the JetStream push-event relay (`zhibo_push::relay`).
//!   With `push.enabled`, [`run`] also wires offline push: presence for gateways and pipelines
//!   (in-process in embedded mode, Redis otherwise), the push-event sink of the pipelines, and in
//!   embedded mode the in-process relay over the embedded store's durable outbox.
//! - [`chat`]: `zhibo chat`, the terminal client, on the `zhibo-client` SDK.
#![warn(missing_docs)]

pub mod chat;
pub mod config;
pub mod security;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use zhibo_auth::TokenKey;
use zhibo_bus::memory::MemoryBus;
use zhibo_bus::nats::NatsBus;
use zhibo_bus::Bus;
use zhibo_store::embedded::EmbeddedBackend;
use zhibo_store::Stores;
use zhibo_telemetry::Metrics;

pub use config::{Config, StoreKind};

/// The token secret `zhibo dev` uses when none is configured. Never use it in production.
pub const DEV_TOKEN_SECRET: &str = "zhibo-dev-insecure-token-secret";

/// The shared backends of a process.
#[derive(Clone)]
pub struct Backends {
    /// Bus.
    pub bus: Arc<dyn Bus>,
    /// Stores.
    pub stores: Stores,
    /// The embedded store's outbox (embedded store only): where push events wait for the in-process
    /// relay when there is no JetStream.
    pub outbox: Option<Arc<dyn zhibo_store::OutboxStore>>,
    /// Which gateways hold each user: written by gateways, read by the pipelines to route events for
    /// a user's devices (and for push). In-process on the in-process bus (one process holds every
    /// connection), else in Redis (`store.redis_url`), shared by every process.
    pub presence: Arc<dyn zhibo_store::Presence>,
}

impl std::fmt::Debug for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Backends")
    }
}

/// Connects the bus and the stores `config` names.
///
/// Fixes the process's NATS subject prefix (`bus.subject_prefix`) on the first call.
///
/// # Errors
/// When a server cannot be reached or the embedded file cannot be opened, or when the process already
/// uses another subject prefix.
pub async fn connect(config: &Config, name: &str) -> anyhow::Result<Backends> {
    // Before the first subject is built: every role of this process uses the configured prefix.
    zhibo_bus::subject::set_prefix(&config.bus.subject_prefix).context("bus.subject_prefix")?;
    let bus: Arc<dyn Bus> = if config.bus.nats_url.is_empty() {
        Arc::new(MemoryBus::new())
    } else {
        Arc::new(
            NatsBus::connect_with(&config.bus.nats(), name)
                .await
                .context("connecting to NATS")?,
        )
    };
    let mut outbox = None;
    let stores = match config.store.kind {
        StoreKind::Embedded => {
            let backend = if config.store.path.is_empty() {
                EmbeddedBackend::temporary()
            } else {
                let path = std::path::Path::new(&config.store.path);
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).with_context(|| {
                        // "File exists" alone hides that a part of the path is a file.
                        match dir.ancestors().find(|a| a.exists()) {
                            Some(file) if !file.is_dir() => format!(
                                "store.path {:?}: {} is a file, not a directory",
                                config.store.path,
                                file.display()
                            ),
                            _ => format!(
                                "store.path {:?}: creating {}",
                                config.store.path,
                                dir.display()
                            ),
                        }
                    })?;
                }
                EmbeddedBackend::open(path)
            }
            .context("opening the embedded store")?;
            let backend = Arc::new(backend);
            outbox = Some(backend.outbox());
            backend.stores()
        }
        StoreKind::Scylla => {
            let backend = zhibo_store::scylla::connect(
                &config.store.cql_nodes,
                &config.store.keyspace,
                config.store.replication_factor,
            )
            .await
            .context("connecting to ScyllaDB")?;
            let backend = Arc::new(backend);
            let seq =
                zhibo_store::redis_seq::RedisSeq::connect(&config.store.redis_url, backend.clone())
                    .await
                    .context("connecting to Redis")?
                    .with_conversations(backend.clone());
            let pool = seq.pool().clone();
            let stores = backend.stores(Arc::new(seq));
            match config.store.list_cache_secs {
                0 => stores,
                secs => zhibo_store::list_cache::ListCache::wrap(
                    stores,
                    pool,
                    Duration::from_secs(secs),
                ),
            }
        }
    };
    let presence: Arc<dyn zhibo_store::Presence> = if config.bus.nats_url.is_empty() {
        Arc::new(zhibo_store::presence::MemoryPresence::new())
    } else {
        zhibo_store::presence::RedisPresence::connect(
            &config.store.redis_url,
            &config.bus.subject_prefix,
            Duration::from_secs(config.push.presence_ttl_secs),
        )
        .await
        .context("connecting to Redis for presence (store.redis_url)")?
    };
    Ok(Backends {
        bus,
        stores,
        outbox,
        presence,
    })
}

/// Spawns a role; if it fails (e.g. a subscription refused at start), the whole process shuts down and
/// [`run`] returns that error instead of running on without the role.
fn spawn_role(
    shutdown: CancellationToken,
    role: impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        let result = role.await;
        if result.is_err() {
            shutdown.cancel();
        }
        result
    })
}

/// Waits for a role's task until `deadline`; past it, aborts the task, records `name` in `abandoned` and
/// returns `None`.
async fn bounded(
    deadline: tokio::time::Instant,
    name: &'static str,
    mut task: tokio::task::JoinHandle<anyhow::Result<()>>,
    abandoned: &mut Vec<&'static str>,
) -> Option<anyhow::Result<()>> {
    match tokio::time::timeout_at(deadline, &mut task).await {
        Ok(joined) => Some(
            joined
                .with_context(|| format!("{name} task"))
                .and_then(|r| r),
        ),
        Err(_) => {
            warn!(
                role = name,
                "did not stop within the grace period; abandoned"
            );
            task.abort();
            abandoned.push(name);
            None
        }
    }
}

/// Readiness of the real dependencies: the bus is connected and the stores answered a probe read
/// within the last few seconds: the database (a device read) and the seq allocator (a counter read:
/// Redis in a distributed deployment, without which no send, sign-in or group change gets through),
/// probed in the background every 2 s, so `/readyz` never waits on them.
fn readiness(backends: &Backends, shutdown: CancellationToken) -> zhibo_telemetry::http::Readiness {
    let store_ok = Arc::new(AtomicBool::new(false));
    let probe_ok = store_ok.clone();
    let devices = backends.stores.devices.clone();
    let seq = backends.stores.seq.clone();
    tokio::spawn(async move {
        loop {
            let probes = async { tokio::try_join!(devices.get_device(0), seq.current(0)) };
            let ok = matches!(
                tokio::time::timeout(Duration::from_secs(2), probes).await,
                Ok(Ok(_))
            );
            probe_ok.store(ok, Ordering::Relaxed);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    });
    let bus = backends.bus.clone();
    Arc::new(move || bus.is_connected() && store_ok.load(Ordering::Relaxed))
}

/// What `push.enabled` and `webhooks.events` add to a process.
struct EventParts {
    /// What the pipelines emit push events through (with pipelines and push only).
    hook: Option<zhibo_logic::PushHook>,
    /// The webhook emitter (when any event type is configured and this process emits some).
    webhooks: Option<zhibo_push::Webhooks>,
    /// The JetStream publisher, flushed at shutdown (distributed).
    jetstream: Option<Arc<zhibo_push::sink::JetStreamSink>>,
    /// The in-process relay's outbox and its wake-up (embedded).
    outbox: Option<(Arc<dyn zhibo_store::OutboxStore>, Arc<tokio::sync::Notify>)>,
}

/// Whether `config` asks for the `user.online` / `user.offline` webhooks (which gateways emit).
fn presence_webhooks(config: &Config) -> bool {
    config.webhooks.wants(zhibo_push::EventType::UserOnline)
        || config.webhooks.wants(zhibo_push::EventType::UserOffline)
}

/// The event sink (JetStream on NATS, else the embedded store's outbox, delivered by the in-process
/// relay) when this process emits events: `pipelines` (push events, `message.stored`, the group
/// events) or a `gateway` (`user.online` / `user.offline`, watched on `presence`).
async fn event_parts(
    config: &Config,
    backends: &Backends,
    metrics: &Metrics,
    presence: &Arc<dyn zhibo_store::Presence>,
    pipelines: bool,
    gateway: bool,
) -> anyhow::Result<EventParts> {
    let nats = backends.bus.nats_client();
    let watch = gateway && presence_webhooks(config);
    let mut parts = EventParts {
        hook: None,
        webhooks: None,
        jetstream: None,
        outbox: None,
    };
    let emits = (pipelines && (config.push.enabled || config.webhooks.enabled())) || watch;
    if !emits {
        return Ok(parts);
    }
    let sink: Arc<dyn zhibo_push::sink::PushSink> = match nats {
        Some(client) => {
            let sink =
                zhibo_push::sink::JetStreamSink::start(client, &config.push, metrics.push.clone())
                    .await
                    .context("push event stream")?;
            parts.jetstream = Some(sink.clone());
            sink
        }
        None => {
            let outbox = backends.outbox.clone().context(
                "push or webhooks without NATS need the embedded store (store.kind = \"embedded\"): its outbox keeps the events",
            )?;
            let wake = Arc::new(tokio::sync::Notify::new());
            parts.outbox = Some((outbox.clone(), wake.clone()));
            zhibo_push::sink::OutboxSink::new(outbox, wake, metrics.push.clone())
        }
    };
    parts.webhooks = zhibo_push::Webhooks::new(&config.webhooks, sink.clone());
    if let (true, Some(webhooks)) = (watch, &parts.webhooks) {
        let webhooks = webhooks.clone();
        presence.watch(Arc::new(move |user_id, online| {
            let t = if online {
                zhibo_push::EventType::UserOnline
            } else {
                zhibo_push::EventType::UserOffline
            };
            if !webhooks.wants(t) {
                return;
            }
            let webhooks = webhooks.clone();
            tokio::spawn(async move {
                let about = format!("{user_id}:{}", zhibo_push::webhook::occurrence());
                webhooks
                    .emit(t, &about, serde_json::json!({ "user_id": user_id }))
                    .await;
            });
        }));
    }
    if pipelines && config.push.enabled {
        parts.hook = Some(zhibo_logic::PushHook {
            sink,
            preview: config.push.preview,
            preview_max_chars: config.push.preview_max_chars,
        });
    }
    Ok(parts)
}

/// Runs `zhibo push-relay` until `shutdown`: connects to NATS (`bus`), ensures the push stream and
/// the durable consumer, and delivers events to `push.url` (see `zhibo_push::relay`). Serves the ops
/// endpoint on `ops` (ready while NATS is connected).
///
/// # Errors
/// When NATS cannot be reached or JetStream refuses the stream or the consumer.
pub async fn run_push_relay(
    config: Config,
    ops: Option<TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    zhibo_bus::subject::set_prefix(&config.bus.subject_prefix).context("bus.subject_prefix")?;
    let bus = NatsBus::connect_with(&config.bus.nats(), "zhibo-push-relay")
        .await
        .context("connecting to NATS")?;
    let metrics = Arc::new(Metrics::new());
    let probe = bus.clone();
    let ready: zhibo_telemetry::http::Readiness = Arc::new(move || probe.is_connected());
    let ops_task = ops.map(|listener| {
        spawn_role(
            shutdown.clone(),
            zhibo_telemetry::http::serve(listener, metrics.clone(), ready, shutdown.clone()),
        )
    });
    let relayed = zhibo_push::relay::run(
        bus.client().clone(),
        config.push.clone(),
        config.webhooks.clone(),
        metrics.push.clone(),
        shutdown.clone(),
    )
    .await
    .context("push relay");
    shutdown.cancel();
    if let Some(t) = ops_task {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(config.grace_secs);
        if let Some(r) = bounded(deadline, "ops endpoint", t, &mut Vec::new()).await {
            r?;
        }
    }
    relayed
}

/// The sockets of the roles a process runs; `None` = that role is off.
#[derive(Debug, Default)]
pub struct Bound {
    /// Gateway listeners.
    pub gateway: Option<zhibo_gateway::Listeners>,
    /// user-api listener.
    pub api: Option<TcpListener>,
    /// Run a logic worker.
    pub logic: bool,
    /// Ops endpoint (`/metrics`, `/healthz`, `/readyz`).
    pub ops: Option<TcpListener>,
}

/// Runs the roles in `bound` until `shutdown`, then stops them in order: gateways tell clients to go away
/// and drain, user-api finishes its requests, logic workers finish in-flight commands. The whole stop
/// takes at most `grace_secs`, whatever the dependencies do: what has not finished by then is abandoned.
///
/// # Errors
/// When a role fails to start, or does not stop within the grace period.
pub async fn run(
    config: Config,
    backends: Backends,
    bound: Bound,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    anyhow::ensure!(!config.token_secret.is_empty(), "token_secret is required");
    let key = Arc::new(TokenKey::new(&config.token_secret));
    let grace = Duration::from_secs(config.grace_secs);
    let metrics = Arc::new(
        Metrics::new()
            .with_counter_source(
                "cql_operations",
                "CQL statements executed by this process's store, by kind (read, write, lwt, batch)",
                zhibo_store::scylla::cql_ops_by_kind,
            )
            .with_counter_source(
                "cql_rows_written",
                "Rows this process's store wrote: one per plain or conditional write, one per \
                 statement of a batch (kind all)",
                zhibo_store::scylla::cql_rows_written,
            )
            .with_counter_source(
                "nats_dropped",
                "Messages the NATS client dropped for a full subscription (kind slow_consumer)",
                zhibo_bus::nats::slow_consumer_drops,
            ),
    );
    let ready = readiness(&backends, shutdown.clone());
    let pipelines = bound.logic || bound.api.is_some();
    let gateway = bound.gateway.is_some();
    let presence = backends.presence.clone();
    let push = if (config.push.enabled || config.webhooks.enabled()) && (pipelines || gateway) {
        Some(event_parts(&config, &backends, &metrics, &presence, pipelines, gateway).await?)
    } else {
        None
    };
    // Only roles that mint message ids (logic worker, user-api's server-side sends) hold a pipeline and
    // with it a node lease; a gateway holds none.
    let logic = match pipelines {
        true => {
            let logic = zhibo_logic::Logic::new(
                backends.stores.clone(),
                backends.bus.clone(),
                presence.clone(),
                config.logic.clone(),
            )
            .with_metrics(metrics.clone())
            .with_hooks(&config.hooks)
            .map_err(|e| anyhow::anyhow!("hooks: {e}"))?;
            let logic = match push.as_ref().and_then(|p| p.hook.clone()) {
                Some(hook) => logic.with_push(hook),
                None => logic,
            };
            Some(Arc::new(
                match push.as_ref().and_then(|p| p.webhooks.clone()) {
                    Some(webhooks) => logic.with_webhooks(webhooks),
                    None => logic,
                },
            ))
        }
        false => None,
    };
    // Held until the roles stop: ended friendships reach this process's authorization cache.
    let _authz_events = match &logic {
        Some(l) => Some(l.watch_authz().await.context("subscribe to authz events")?),
        None => None,
    };
    let (jetstream_sink, outbox_relay) = match push {
        Some(p) => (p.jetstream, p.outbox),
        None => (None, None),
    };
    // Embedded mode: the relay runs in this process, over the store's outbox (resuming what the last
    // run left). It stops with the logic workers, after the last send has written its events.
    let relay_stop = CancellationToken::new();
    let outbox_relay_task = outbox_relay.map(|(outbox, wake)| {
        let (push_config, webhooks, push_metrics, stop) = (
            config.push.clone(),
            config.webhooks.clone(),
            metrics.push.clone(),
            relay_stop.clone(),
        );
        spawn_role(shutdown.clone(), async move {
            zhibo_push::relay::run_outbox(outbox, wake, push_config, webhooks, push_metrics, stop)
                .await
                .context("push relay")
        })
    });
    let ops_task = bound.ops.map(|listener| {
        spawn_role(
            shutdown.clone(),
            zhibo_telemetry::http::serve(
                listener,
                metrics.clone(),
                ready.clone(),
                shutdown.clone(),
            ),
        )
    });
    // Logic workers stop last, after the gateways and user-api have stopped producing commands.
    let logic_stop = CancellationToken::new();
    let logic_task = logic.clone().filter(|_| bound.logic).map(|logic| {
        spawn_role(
            shutdown.clone(),
            zhibo_logic::run(logic, logic_stop.clone()),
        )
    });
    let gateway_task = bound.gateway.map(|listeners| {
        let deps = zhibo_gateway::Deps {
            bus: backends.bus.clone(),
            devices: backends.stores.devices.clone(),
            rooms: backends.stores.rooms.clone(),
            key: key.clone(),
            metrics: metrics.clone(),
            presence: presence.clone(),
        };
        spawn_role(
            shutdown.clone(),
            zhibo_gateway::run(
                config.gateway.clone(),
                listeners,
                deps,
                shutdown.clone(),
                grace,
            ),
        )
    });
    let api_task = bound.api.zip(logic.clone()).map(|(listener, logic)| {
        let deps = zhibo_user_api::Deps {
            stores: backends.stores.clone(),
            key: key.clone(),
            logic,
            ready: ready.clone(),
        };
        spawn_role(
            shutdown.clone(),
            zhibo_user_api::run(config.api.clone(), listener, deps, shutdown.clone()),
        )
    });
    shutdown.cancelled().await;
    info!("shutting down");
    // Every step is bounded by one deadline, whatever the bus or the store do (a NATS server that is
    // down makes flushes and drains wait for a reconnect that may never come): the process exits
    // within the grace period, abandoning what has not finished by then.
    let deadline = tokio::time::Instant::now() + grace;
    let mut abandoned = Vec::new();
    if let Some(t) = gateway_task {
        if let Some(r) = bounded(deadline, "gateway", t, &mut abandoned).await {
            r?;
        }
    }
    if let Some(t) = api_task {
        if let Some(r) = bounded(deadline, "user-api", t, &mut abandoned).await {
            r?;
        }
    }
    logic_stop.cancel();
    if let Some(t) = logic_task {
        // In-flight commands get what is left of the grace period, no more.
        if let Some(r) = bounded(deadline, "logic worker", t, &mut abandoned).await {
            r?;
        }
    }
    relay_stop.cancel();
    if let Some(t) = outbox_relay_task {
        if let Some(r) = bounded(deadline, "push relay", t, &mut abandoned).await {
            r?;
        }
    }
    if let Some(sink) = &jetstream_sink {
        // Every send is answered: hand the stream what the pipelines queued.
        if tokio::time::timeout_at(deadline, sink.flush())
            .await
            .is_err()
        {
            warn!("push events still unpublished at the end of the grace period are lost");
        }
    }
    if let Some(t) = ops_task {
        if let Some(r) = bounded(deadline, "ops endpoint", t, &mut abandoned).await {
            r?;
        }
    }
    // Nothing mints any more: give the message-id node number back to the pool.
    if let Some(logic) = &logic {
        if tokio::time::timeout_at(deadline, logic.release_ids())
            .await
            .is_err()
        {
            warn!("node lease not released in time; it expires on its own");
        }
    }
    // Pushes out what is buffered for the bus; never waits past the deadline (nor for more than a
    // second: with the server down, a flush waits for a reconnect).
    let flush_by = deadline.min(tokio::time::Instant::now() + Duration::from_secs(1));
    if tokio::time::timeout_at(flush_by, backends.bus.flush())
        .await
        .is_err()
    {
        warn!("bus flush did not complete; buffered publishes are dropped");
    }
    anyhow::ensure!(
        abandoned.is_empty(),
        "stopped at the end of the grace period ({}s) without finishing: {}",
        grace.as_secs(),
        abandoned.join(", ")
    );
    info!("stopped");
    Ok(())
}
