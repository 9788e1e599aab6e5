//! The benchmark suite: scenarios that drive real clients against a running or spawned cluster and
//! write a report (JSON + SVG charts). `zhibo-loadtest bench <scenario>`; see `loadtest/README.md`.
//!
//! # Layout
//! - [`server`]: spawns `zhibo dev` or the distributed roles (or targets a running cluster); RSS, CPU.
//! - [`setup`]: users, devices and locally minted tokens, created concurrently.
//! - [`load`]: connections split into reader and pipelined writer, open-loop senders, delivery timing.
//! - [`scenarios`]: idle memory, 1:1, group, room, offline sync, reconnect storm.
//! - [`classes`]: the room scenario's class mix (high, chat, like) and its per-class report.
//! - [`conversations`]: the conversation list and history pages (scenario 7).
//! - [`centrifugo`]: Centrifugo as the server under test, for the room scenario side by side.
//! - [`ceilings`]: raw NATS, Redis and WebSocket figures measured in the same run.
//! - [`report`], [`hist`], [`progress`]: the report with charts, HDR histograms, the live line.

pub mod ceilings;
pub mod centrifugo;
pub mod classes;
pub mod conversations;
pub mod cost;
pub mod hist;
pub mod idle;
pub mod load;
pub mod progress;
pub mod report;
pub mod scenarios;
pub mod server;
pub mod setup;

use std::path::PathBuf;

use clap::Parser;

use crate::client::Transport;
pub use report::Report;

/// How the room scenario sends room messages (`--publish`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Publish {
    /// Sender connections in the room.
    Socket,
    /// user-api's admin route, over HTTP.
    Http,
}

/// Which scenario to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// 1. Idle memory per connection: gateway RSS delta / connections, with heartbeats.
    Idle,
    /// 2. 1:1 send → ACK and send → delivered, open-loop rate sweep.
    OneToOne,
    /// 3. Group fan-out (default 100 members).
    Group,
    /// 4. Live-room fan-out to many viewers.
    Room,
    /// 5. Offline sync of N stored messages by a fresh connection.
    Sync,
    /// 6. Reconnect storm: every client drops, reconnects, signs in and syncs.
    Reconnect,
    /// 7. Conversation list of `--conversations` and history pages of 50 over `--messages` (issue #13).
    Conversations,
    /// Only the ceilings: NATS pub/sub and request/reply, Redis INCR, loopback WebSocket echo.
    Ceilings,
}

/// How the cluster under test is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SpawnMode {
    /// `zhibo dev` (embedded: in-process bus, redb), spawned and stopped by the loadtest.
    Dev,
    /// `zhibo migrate`, `gateway`, `logic-worker` × `--workers`, `user-api` on NATS, Redis, Cassandra.
    Distributed,
    /// A cluster that is already running at `--api`, `--tcp`, `--ws`, `--quic`.
    None,
    /// Centrifugo (`--centrifugo-bin`: memory engine, defaults), for the room scenario side by side
    /// (`--transport ws --publish http`).
    Centrifugo,
}

/// Where a spawned `zhibo dev` keeps its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreMode {
    /// redb file in the results folder (durable commits).
    Disk,
    /// redb in memory.
    Memory,
}

/// Options of `zhibo-loadtest bench`.
#[derive(Debug, Clone, Parser)]
#[command(name = "bench")]
pub struct BenchArgs {
    /// The scenario.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Start the cluster (`dev`, `distributed`) or use a running one (`none`).
    #[arg(long, value_enum, default_value = "dev")]
    pub spawn: SpawnMode,
    /// The `zhibo` binary to spawn.
    #[arg(long, default_value = "target/release/zhibo")]
    pub zhibo_bin: PathBuf,
    /// The Centrifugo binary to spawn (`--spawn centrifugo`).
    #[arg(long, default_value = "centrifugo")]
    pub centrifugo_bin: PathBuf,
    /// Store of a spawned `zhibo dev`.
    #[arg(long, value_enum, default_value = "disk")]
    pub store: StoreMode,
    /// Logic workers of a spawned distributed cluster.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// user-api of a running cluster.
    #[arg(long, default_value = "http://127.0.0.1:7000")]
    pub api: String,
    /// Gateway TCP address of a running cluster.
    #[arg(long, default_value = "127.0.0.1:7001")]
    pub tcp: String,
    /// Gateway WebSocket address of a running cluster.
    #[arg(long, default_value = "127.0.0.1:7002")]
    pub ws: String,
    /// Gateway QUIC address of a running cluster.
    #[arg(long, default_value = "127.0.0.1:7003")]
    pub quic: String,
    /// The gateway's (or `zhibo dev`'s) `/metrics` URL of a running cluster, for the room scenario's
    /// shaping counters (a spawned cluster's is found by the tool).
    #[arg(long)]
    pub metrics_url: Option<String>,
    /// Gateway (or `zhibo dev`) process of a running cluster, for RSS and CPU.
    #[arg(long)]
    pub gateway_pid: Option<u32>,
    /// Token secret of the cluster (tokens are minted locally); empty = the `zhibo dev` default with
    /// `--spawn none`, a random one for a spawned cluster.
    #[arg(
        long,
        env = "ZHIBO_TOKEN_SECRET",
        default_value = "",
        hide_env_values = true
    )]
    pub token_secret: String,
    /// Admin secret of the cluster (users are created through the admin API).
    #[arg(
        long,
        env = "ZHIBO_API__ADMIN_SECRET",
        default_value = "",
        hide_env_values = true
    )]
    pub admin_secret: String,
    /// NATS (distributed spawn and ceilings).
    #[arg(
        long,
        env = "ZHIBO_TEST_NATS_URL",
        default_value = "nats://127.0.0.1:14222"
    )]
    pub nats_url: String,
    /// NATS monitoring `/varz` URL, for the NATS messages per message of a spawned distributed
    /// cluster (the harness's server: `scripts/infra.sh`).
    #[arg(
        long,
        env = "ZHIBO_TEST_NATS_MONITOR",
        default_value = "http://127.0.0.1:18222/varz"
    )]
    pub nats_monitor: String,
    /// Pid files of the servers `scripts/infra.sh` started (`nats.pid`, `redis.pid`, `cassandra.pid`),
    /// for their CPU per message with a spawned distributed cluster (missing files are left out).
    #[arg(long, default_value = ".cache/infra/run")]
    pub infra_run: PathBuf,
    /// Redis (distributed spawn and ceilings).
    #[arg(
        long,
        env = "ZHIBO_TEST_REDIS_URL",
        default_value = "redis://127.0.0.1:16379"
    )]
    pub redis_url: String,
    /// Cassandra / ScyllaDB node (distributed spawn).
    #[arg(long, env = "ZHIBO_TEST_CQL_NODE", default_value = "127.0.0.1:19042")]
    pub cql_node: String,
    /// Keyspace of a spawned distributed cluster (migrated if needed; users are fresh every run).
    #[arg(long, default_value = "zhibo_bench")]
    pub keyspace: String,
    /// Transport of the clients.
    #[arg(long, value_enum, default_value = "tcp")]
    pub transport: Transport,
    /// Connections (idle, reconnect), or viewers (room).
    #[arg(long, default_value_t = 1000)]
    pub conns: usize,
    /// Conversations of the listing user (conversations).
    #[arg(long, default_value_t = 1000)]
    pub conversations: usize,
    /// Conversations that get a new message before each "list after changes" (conversations).
    #[arg(long, default_value_t = 5)]
    pub list_changes: usize,
    /// Load generator processes for `idle` (each holds at most ~19,000 sockets).
    #[arg(long, default_value_t = 1)]
    pub procs: usize,
    /// Source addresses 127.0.0.2 … to spread client sockets over (0 = 127.0.0.1 only).
    #[arg(long, default_value_t = 4)]
    pub source_ips: usize,
    /// Sender connections (1:1: sender/receiver pairs; group and room: senders).
    #[arg(long, default_value_t = 8)]
    pub senders: usize,
    /// Room scenario: shares of the sent messages per class, `high=2,chat=90,like=8` (weights, usually
    /// percentages; a class left out is not sent).
    #[arg(long, default_value = "chat=100")]
    pub mix: classes::ClassMix,
    /// Room scenario: how room messages are sent. `socket`: by the `--senders` connections, which join
    /// the room (their messages reach them too); `http`: by a backend through user-api's admin route
    /// (`POST /v1/admin/rooms/{id}/messages`, class chat), as a server publishes to a room — the setup
    /// Centrifugo's figures in issue 17 were measured with.
    #[arg(long, value_enum, default_value = "socket")]
    pub publish: Publish,
    /// Room scenario: the room's per-viewer chat display rate, set through the admin API before the
    /// viewers join (0 = leave the room's setting: all chat shown).
    #[arg(long, default_value_t = 0)]
    pub chat_per_sec: u32,
    /// Group members (group scenario).
    #[arg(long, default_value_t = 100)]
    pub group_size: usize,
    /// Offered rates, messages per second, comma-separated: one step each (open loop).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1000,2000,5000,10000,20000"
    )]
    pub rates: Vec<f64>,
    /// Seconds per rate step.
    #[arg(long, default_value_t = 10.0)]
    pub step_secs: f64,
    /// Stop the sweep after the first step where ACKs fall below 90% of the offered rate.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub stop_at_saturation: bool,
    /// Message content size, bytes (at least 8: the send timestamp).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// 1:1 and group sends: mark each as its first transmission (`SendMessageInput.first_attempt`, as
    /// the SDKs do; the tool never resends). `false` measures an older client: the server's full dedup
    /// checks on every send.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub first_attempt: bool,
    /// Messages stored before an offline sync (sync), per client while offline (reconnect), or in the
    /// long conversation (conversations).
    #[arg(long, default_value_t = 1000)]
    pub messages: usize,
    /// Repetitions (sync, conversations).
    #[arg(long, default_value_t = 20)]
    pub iterations: usize,
    /// Seconds idle connections are held after all are connected (idle).
    #[arg(long, default_value_t = 5.0)]
    pub hold_secs: f64,
    /// Measure the ceilings too and print ratios.
    #[arg(long)]
    pub ceilings: bool,
    /// Seconds per ceiling measurement.
    #[arg(long, default_value_t = 3.0)]
    pub ceiling_secs: f64,
    /// Results folder.
    #[arg(long, default_value = "results")]
    pub out: PathBuf,
    /// Suffix of the report's file names (default: transport and mode).
    #[arg(long)]
    pub label: Option<String>,
    /// Don't write files (tests).
    #[arg(long)]
    pub no_write: bool,
}

impl BenchArgs {
    /// The defaults for `scenario`, as the CLI would parse them.
    pub fn new(scenario: Scenario) -> Self {
        let name = match scenario {
            Scenario::Idle => "idle",
            Scenario::OneToOne => "one-to-one",
            Scenario::Group => "group",
            Scenario::Room => "room",
            Scenario::Sync => "sync",
            Scenario::Reconnect => "reconnect",
            Scenario::Conversations => "conversations",
            Scenario::Ceilings => "ceilings",
        };
        BenchArgs::parse_from(["bench", name])
    }
}

/// Runs one scenario end to end: starts the cluster (unless `--spawn none`), creates the population,
/// measures, stops what it started, writes the report (unless `no_write`) and returns it.
///
/// # Errors
/// When the cluster cannot start or the scenario cannot set up its clients.
pub async fn run_scenario(args: BenchArgs) -> anyhow::Result<Report> {
    let mut report = Report {
        scenario: serde_json::to_value(args.scenario)?
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        started_at: setup::now_ms() as u64 / 1000,
        ..Report::default()
    };
    report.machine.insert(
        "cores".into(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .to_string(),
    );
    if let Ok(k) = std::fs::read_to_string("/proc/sys/kernel/osrelease") {
        report.machine.insert("kernel".into(), k.trim().into());
    }
    report.machine.insert(
        "note".into(),
        "load generator and server share the machine's cores".into(),
    );
    if args.scenario != Scenario::Ceilings {
        let target = server::start(&args).await?;
        report.server.insert("mode".into(), target.mode.clone());
        report.server.insert(
            "transport".into(),
            format!("{:?}", args.transport).to_lowercase(),
        );
        if target.mode == "dev" {
            report
                .server
                .insert("store".into(), format!("{:?}", args.store).to_lowercase());
        }
        let result = match args.scenario {
            Scenario::Idle => idle::run(&args, &target, &mut report).await,
            Scenario::OneToOne => scenarios::one_to_one(&args, &target, &mut report).await,
            Scenario::Group => scenarios::group(&args, &target, &mut report).await,
            Scenario::Room if target.mode == "centrifugo" => {
                centrifugo::room(&args, &target, &mut report).await
            }
            _ if target.mode == "centrifugo" => Err(anyhow::anyhow!(
                "only the room scenario runs against centrifugo"
            )),
            Scenario::Room => scenarios::room(&args, &target, &mut report).await,
            Scenario::Sync => scenarios::sync(&args, &target, &mut report).await,
            Scenario::Reconnect => scenarios::reconnect(&args, &target, &mut report).await,
            Scenario::Conversations => conversations::run(&args, &target, &mut report).await,
            Scenario::Ceilings => Ok(()),
        };
        target.stop().await;
        result?;
    }
    if args.ceilings || args.scenario == Scenario::Ceilings {
        let c = ceilings::measure(&args).await?;
        ceilings::ratios(&mut report, &c);
        report.ceilings = Some(c);
    }
    if !args.no_write {
        let label = args.label.clone().unwrap_or_else(|| {
            let mode = report.server.get("mode").cloned().unwrap_or_default();
            match args.scenario {
                Scenario::Ceilings | Scenario::Sync | Scenario::Conversations => mode,
                _ => format!("{:?}-{mode}", args.transport).to_lowercase(),
            }
        });
        let files = report.write(&args.out, &label)?;
        for f in files {
            eprintln!("wrote {}", f.display());
        }
    }
    Ok(report)
}
