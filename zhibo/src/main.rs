//! `zhibo`: run the whole system (`dev`), or one role of a distributed deployment.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use zhibo::{Bound, Config, StoreKind};

#[derive(Parser)]
#[command(version, about = "zhibo: IM and live-room chat backend")]
struct Cli {
    /// TOML configuration file (environment variables ZHIBO_* override it).
    #[arg(long, short, global = true, env = "ZHIBO_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Role(Role),
    /// Chat in the terminal (a client of a running zhibo): sign up/in, then send lines.
    Chat(zhibo::chat::ChatArgs),
}

#[derive(Subcommand, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Everything in one process: gateway + logic worker + user-api, in-process bus, embedded store.
    Dev,
    /// The edge: TCP, WebSocket and QUIC listeners.
    Gateway,
    /// Consumes commands: seqs, persistence, fan-out, sync.
    LogicWorker,
    /// The HTTP/JSON API.
    UserApi,
    /// Applies the CQL migrations to the configured keyspace and exits.
    Migrate,
    /// Delivers offline push events from JetStream to `push.url` (signed POSTs, retries, dead letters).
    PushRelay,
}

impl Role {
    fn service_name(self) -> &'static str {
        match self {
            Role::Dev => "zhibo-dev",
            Role::Gateway => "zhibo-gateway",
            Role::LogicWorker => "zhibo-logic-worker",
            Role::UserApi => "zhibo-user-api",
            Role::Migrate => "zhibo-migrate",
            Role::PushRelay => "zhibo-push-relay",
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let role = match cli.command {
        Command::Chat(args) => return zhibo::chat::main(args),
        Command::Role(role) => role,
    };
    let mut config = match Config::load(cli.config.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("zhibo: bad configuration: {e}");
            return ExitCode::from(64);
        }
    };
    let filter = match log_filter(std::env::var("ZHIBO_LOG")) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("zhibo: bad configuration: {e}");
            return ExitCode::from(64);
        }
    };
    let otlp = Some(config.otlp_endpoint.as_str()).filter(|e| !e.is_empty());
    let _trace = match zhibo_telemetry::trace::init(role.service_name(), filter, otlp) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("zhibo: bad configuration: tracing: {e:#}");
            return ExitCode::from(64);
        }
    };
    if role == Role::Dev && config.token_secret.is_empty() {
        config.token_secret = zhibo::DEV_TOKEN_SECRET.to_owned();
    }
    if role == Role::PushRelay {
        if config.push.url.is_empty() && !config.webhooks.enabled() {
            eprintln!(
                "zhibo: bad configuration: push-relay has nothing to deliver: set push.url (offline \
                 push, with push.enabled on the logic workers and user-api) or webhooks.url and \
                 webhooks.events"
            );
            return ExitCode::from(64);
        }
        // A relay delivers push events unless it is configured for webhooks only.
        let delivers_push = !config.push.url.is_empty();
        if let Err(e) = config.push.validate(delivers_push) {
            eprintln!("zhibo: bad configuration: push: {e}");
            return ExitCode::from(64);
        }
    } else if role != Role::Migrate {
        if let Err(e) = zhibo::security::check_token_secret(&config, role == Role::Dev) {
            eprintln!("zhibo: bad configuration: {e}");
            return ExitCode::from(64);
        }
    }
    if role != Role::Dev && role != Role::Migrate && config.bus.nats_url.is_empty() {
        eprintln!(
            "zhibo: bad configuration: bus.nats_url (ZHIBO_BUS__NATS_URL) is required outside dev"
        );
        return ExitCode::from(64);
    }
    if matches!(role, Role::Gateway | Role::LogicWorker | Role::UserApi)
        && config.store.kind != StoreKind::Scylla
    {
        // The embedded store is one process's file: a separate role process on it would keep users,
        // messages and id leases of its own beside the cluster's, and answer from them.
        eprintln!(
            "zhibo: bad configuration: store.kind (ZHIBO_STORE__KIND) must be \"scylla\" for a \
             role of a distributed deployment (with store.cql_nodes and store.redis_url); the \
             embedded store runs only in `zhibo dev`, every role in one process"
        );
        return ExitCode::from(64);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("zhibo: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(role, config));
    // Tasks still parked on a dependency (a NATS reconnect loop, a blocking lookup) must not hold the
    // exit past the grace period that `run` already spent.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zhibo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The log filter from `ZHIBO_LOG`: `info` when unset or empty; a value that does not parse is a
/// configuration error, not a silent `info`. A lone word that is not a level parses as a target name
/// and would hide every log line, so it is refused too (`ZHIBO_LOG=debg`).
fn log_filter(
    value: Result<String, std::env::VarError>,
) -> Result<tracing_subscriber::EnvFilter, String> {
    use tracing_subscriber::EnvFilter;
    let value = match value {
        Err(std::env::VarError::NotPresent) => return Ok(EnvFilter::new("info")),
        Err(std::env::VarError::NotUnicode(_)) => return Err("ZHIBO_LOG is not UTF-8".into()),
        Ok(v) if v.trim().is_empty() => return Ok(EnvFilter::new("info")),
        Ok(v) => v,
    };
    const LEVELS: [&str; 12] = [
        "off", "error", "warn", "info", "debug", "trace", "0", "1", "2", "3", "4", "5",
    ];
    let names_a_level = value.split(',').any(|directive| {
        let level = directive.rsplit('=').next().unwrap_or_default().trim();
        LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level))
    });
    if !names_a_level {
        return Err(format!(
            "ZHIBO_LOG={value:?} names no level: write one of off, error, warn, info, debug, trace, \
             or directives such as \"info,zhibo_gateway=debug\""
        ));
    }
    EnvFilter::try_new(&value).map_err(|e| format!("ZHIBO_LOG={value:?}: {e}"))
}

async fn run(role: Role, mut config: Config) -> anyhow::Result<()> {
    if role == Role::Migrate {
        anyhow::ensure!(
            config.store.kind == StoreKind::Scylla,
            "migrate needs store.kind = \"scylla\""
        );
        let session = zhibo_store::scylla::session(&config.store.cql_nodes).await?;
        let applied = zhibo_store::scylla::migrate(
            &session,
            &config.store.keyspace,
            config.store.replication_factor,
        )
        .await?;
        println!(
            "migrations applied to {}: {applied:?}",
            config.store.keyspace
        );
        return Ok(());
    }
    if role == Role::PushRelay {
        let ops = if config.metrics_addr.is_empty() {
            None
        } else {
            Some(
                tokio::net::TcpListener::bind(&config.metrics_addr)
                    .await
                    .with_context(|| {
                        format!(
                            "binding the ops endpoint on metrics_addr {}",
                            config.metrics_addr
                        )
                    })?,
            )
        };
        let shutdown = shutdown_on_signal();
        return zhibo::run_push_relay(config, ops, shutdown).await;
    }
    let backends = zhibo::connect(&config, role.service_name()).await?;
    let mut bound = Bound::default();
    if matches!(role, Role::Dev | Role::Gateway) {
        bound.gateway = Some(
            zhibo_gateway::Listeners::bind(&config.gateway)
                .await
                .context("binding the gateway")?,
        );
    }
    if matches!(role, Role::Dev | Role::UserApi) {
        bound.api = Some(
            tokio::net::TcpListener::bind(config.api_addr)
                .await
                .with_context(|| format!("binding user-api on api_addr {}", config.api_addr))?,
        );
    }
    bound.logic = matches!(role, Role::Dev | Role::LogicWorker);
    if !config.metrics_addr.is_empty() {
        bound.ops = Some(
            tokio::net::TcpListener::bind(&config.metrics_addr)
                .await
                .with_context(|| {
                    format!(
                        "binding the ops endpoint on metrics_addr {}",
                        config.metrics_addr
                    )
                })?,
        );
    }
    // Registered before the banner: a supervisor may send SIGTERM as soon as it reads it.
    let shutdown = shutdown_on_signal();
    if role == Role::Dev {
        let (tcp, ws, quic) = bound
            .gateway
            .as_ref()
            .map(|g| g.addrs())
            .transpose()?
            .unwrap_or_else(|| unreachable!());
        println!(
            "zhibo dev is running (embedded: in-process bus, store {:?})",
            config.store.path
        );
        println!("  user-api   http://{}", config.api_addr);
        println!("  tcp        {tcp}");
        println!("  websocket  ws://{ws}/ws?user_id=&device_id=&token=");
        println!("  quic       {quic} (self-signed certificate, ALPN zhibo/1)");
        println!("  try: zhibo chat --help");
        if !config.metrics_addr.is_empty() {
            println!("  metrics    http://{}/metrics", config.metrics_addr);
        }
        // The browser chat page, pointed at this process's own WebSocket listener.
        if *config.api.web_ui.get_or_insert(true) {
            if config.api.web_ws_url.is_empty() {
                let host = if ws.ip().is_unspecified() {
                    std::net::SocketAddr::from(([127, 0, 0, 1], ws.port()))
                } else {
                    ws
                };
                config.api.web_ws_url = format!("ws://{host}/ws");
            }
            println!("  web page   http://{}/", config.api_addr);
        }
    }
    zhibo::run(config, backends, bound, shutdown).await
}

/// A token cancelled at SIGTERM or Ctrl-C. The SIGTERM handler is registered before this returns, so a
/// signal sent right after the caller announces readiness is not lost to the default action.
fn shutdown_on_signal() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::spawn(async move {
        #[cfg(unix)]
        match term {
            Some(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        signal.cancel();
    });
    shutdown
}

#[cfg(test)]
mod tests {
    use super::log_filter;
    use std::env::VarError;

    #[test]
    fn zhibo_log_unset_or_empty_is_info() {
        assert_eq!(
            log_filter(Err(VarError::NotPresent)).unwrap().to_string(),
            "info"
        );
        assert_eq!(log_filter(Ok("  ".into())).unwrap().to_string(), "info");
    }

    #[test]
    fn zhibo_log_levels_and_directives_parse() {
        for ok in [
            "debug",
            "WARN",
            "info,zhibo_gateway=debug",
            "zhibo_logic=trace",
            "off",
        ] {
            assert!(log_filter(Ok(ok.into())).is_ok(), "{ok}");
        }
    }

    #[test]
    fn zhibo_log_garbage_is_an_error_naming_the_variable() {
        for bad in ["debg", "verbose", "info,zhibo=loud", "zhibo_gateway"] {
            let e = log_filter(Ok(bad.into())).expect_err(bad);
            assert!(e.contains("ZHIBO_LOG"), "{bad}: {e}");
        }
    }
}
