//! Scenario 1: idle memory per connection. Connects `conns` devices (over `procs` generator processes
//! and several source addresses), holds them with heartbeats, and reads the gateway's RSS as they come.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncReadExt};

use super::load::{self, Meter};
use super::progress::{Counters, Progress};
use super::report::{Chart, Report, Step};
use super::server::Target;
use super::setup;
use super::BenchArgs;
use crate::client::{Credentials, Transport};

/// Heartbeat interval of idle connections, seconds (the gateway's default interval).
const HEARTBEAT_SECS: u64 = 30;

/// Connection attempts in flight, over all generator processes together: each of `--procs` takes its
/// share, so more processes do not mean bigger bursts of handshakes (QUIC Initials that overflow the
/// gateway's UDP receive buffer are resent only on the retransmission timer: 1 s, 3 s, 7 s, 15 s…).
const IN_FLIGHT: usize = 256;

/// Options of the hidden `idle-worker` command: one generator process of the idle scenario.
#[derive(Debug, Clone, clap::Args)]
pub struct IdleWorkerArgs {
    /// Transport.
    #[arg(long, value_enum)]
    pub transport: Transport,
    /// Gateway address.
    #[arg(long)]
    pub addr: String,
    /// JSON file of `[user_id, device_id, token]` triples.
    #[arg(long)]
    pub creds: PathBuf,
    /// First index of this worker's slice.
    #[arg(long)]
    pub from: usize,
    /// End (exclusive) of this worker's slice.
    #[arg(long)]
    pub to: usize,
    /// Source addresses to spread over.
    #[arg(long, default_value_t = 4)]
    pub source_ips: usize,
    /// Heartbeat interval, seconds.
    #[arg(long, default_value_t = HEARTBEAT_SECS)]
    pub heartbeat_secs: u64,
    /// Connection attempts at a time.
    #[arg(long, default_value_t = IN_FLIGHT)]
    pub in_flight: usize,
}

/// Connects a slice of the population and holds it until stdin closes, printing
/// `connected <n> errors <e> attempted <a>` every 250 ms.
///
/// # Errors
/// When the credentials cannot be read.
pub async fn idle_worker(a: IdleWorkerArgs) -> anyhow::Result<()> {
    let all: Vec<(i64, i64, String)> = serde_json::from_slice(&std::fs::read(&a.creds)?)?;
    let creds: Vec<Credentials> = all[a.from..a.to.min(all.len())]
        .iter()
        .map(|(u, d, t)| Credentials {
            user_id: *u,
            device_id: *d,
            token: t.clone(),
        })
        .collect();
    let meter = Arc::new(Meter::default());
    let attempted = Arc::new(AtomicU64::new(0));
    let printer = {
        let (counters, attempted) = (meter.counters.clone(), attempted.clone());
        tokio::spawn(async move {
            loop {
                let s = counters.snapshot();
                let a = attempted.load(Ordering::Relaxed);
                println!(
                    "connected {} errors {} attempted {a}",
                    s.connected, s.errors
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let conns = Arc::default();
    let beats = load::heartbeats(Arc::clone(&conns), Duration::from_secs(a.heartbeat_secs));
    let dial = Dial {
        addr: &a.addr,
        transport: a.transport,
        source_ips: a.source_ips,
        offset: a.from,
        in_flight: a.in_flight,
    };
    if let Some(e) = hold(&dial, &creds, &meter, &conns, &attempted).await {
        let failed = meter.counters.errors.load(Ordering::Relaxed);
        eprintln!(
            "\n  idle-worker {}..{}: {failed} connections failed, the first with: {e}",
            a.from, a.to
        );
    }
    // Hold until the parent closes our stdin.
    let mut buf = [0u8; 64];
    while tokio::io::stdin().read(&mut buf).await.unwrap_or(0) > 0 {}
    beats.abort();
    printer.abort();
    Ok(())
}

/// Where [`hold`] connects and how it spreads its connections.
struct Dial<'a> {
    addr: &'a str,
    transport: Transport,
    source_ips: usize,
    /// Index of the first credential in the whole population (picks source address and endpoint).
    offset: usize,
    /// Connection attempts at a time.
    in_flight: usize,
}

/// Connects `creds` (`dial.in_flight` at a time) into `conns` as each succeeds, so that a heartbeat task
/// on `conns` keeps the early ones alive while the rest connect; counts failures instead of failing, and
/// every finished attempt in `attempted`. Returns the first failure.
async fn hold(
    dial: &Dial<'_>,
    creds: &[Credentials],
    meter: &Arc<Meter>,
    conns: &tokio::sync::Mutex<Vec<load::LoadConn>>,
    attempted: &AtomicU64,
) -> Option<String> {
    use futures::StreamExt;
    let endpoints = load::quic_endpoints(dial.transport, dial.source_ips).unwrap_or_default();
    let first_error = std::sync::Mutex::new(None);
    futures::stream::iter(creds.iter().cloned().enumerate())
        .map(|(i, c)| {
            let i = i + dial.offset;
            let ep = (!endpoints.is_empty()).then(|| &endpoints[i % endpoints.len()]);
            let source = setup::source_ip(i, dial.source_ips);
            load::connect(dial.transport, dial.addr, c, source, ep, meter)
        })
        .buffer_unordered(dial.in_flight.max(1))
        .for_each(|r| async {
            match r {
                Ok(conn) => conns.lock().await.push(conn),
                Err(e) => {
                    meter.counters.errors.fetch_add(1, Ordering::Relaxed);
                    first_error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert_with(|| format!("{e:#}"));
                }
            }
            attempted.fetch_add(1, Ordering::Relaxed);
        })
        .await;
    first_error.into_inner().unwrap_or_else(|e| e.into_inner())
}

/// Runs scenario 1.
///
/// # Errors
/// When setup fails or no connection succeeds.
pub async fn run(args: &BenchArgs, target: &Target, report: &mut Report) -> anyhow::Result<()> {
    let n = args.conns.max(1);
    eprintln!("  registering {n} devices");
    let creds = setup::population(target, n, false).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base = target.rss_kib();
    let addr = target.addr(args.transport).to_owned();
    let counters = Arc::new(Counters::default());
    let pid = target.gateway_pid;
    let _p = Progress::start("idle".into(), counters.clone(), move || {
        pid.and_then(super::server::rss_kib).unwrap_or(0)
    });
    let start = Instant::now();
    // Memory as connections arrive.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (counters, stop) = (counters.clone(), stop.clone());
        tokio::spawn(async move {
            let mut pts = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let c = counters.connected.load(Ordering::Relaxed);
                let rss = pid.and_then(super::server::rss_kib).unwrap_or(0);
                pts.push((c as f64, rss as f64 / 1024.0));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            pts
        })
    };
    let mut children = Vec::new();
    let local: Arc<tokio::sync::Mutex<Vec<load::LoadConn>>> = Arc::default();
    let local_beats = load::heartbeats(local.clone(), Duration::from_secs(HEARTBEAT_SECS));
    let connect_secs;
    if args.procs <= 1 {
        let meter = Arc::new(Meter::with_counters(counters.clone()));
        let dial = Dial {
            addr: &addr,
            transport: args.transport,
            source_ips: args.source_ips,
            offset: 0,
            in_flight: IN_FLIGHT,
        };
        let attempted = AtomicU64::new(0);
        if let Some(e) = hold(&dial, &creds, &meter, &local, &attempted).await {
            report.notes.push(format!("first failed connection: {e}"));
        }
        connect_secs = start.elapsed().as_secs_f64();
    } else {
        let file = args.out.join("idle-creds.json");
        std::fs::create_dir_all(&args.out)?;
        let triples: Vec<(i64, i64, &str)> = creds
            .iter()
            .map(|c| (c.user_id, c.device_id, c.token.as_str()))
            .collect();
        std::fs::write(&file, serde_json::to_vec(&triples)?)?;
        let per = n.div_ceil(args.procs);
        let exe = std::env::current_exe().context("own executable")?;
        // Per child: connected (open now), errors, attempted (finished, either way).
        let latest: Arc<std::sync::Mutex<Vec<[u64; 3]>>> =
            Arc::new(std::sync::Mutex::new(vec![[0; 3]; args.procs]));
        let attempted = Arc::new(AtomicU64::new(0));
        for p in 0..args.procs {
            let (from, to) = (p * per, ((p + 1) * per).min(n));
            let mut child = tokio::process::Command::new(&exe)
                .args(["idle-worker", "--transport"])
                .arg(format!("{:?}", args.transport).to_lowercase())
                .args(["--addr", &addr, "--creds"])
                .arg(&file)
                .args(["--from", &from.to_string(), "--to", &to.to_string()])
                .args(["--source-ips", &args.source_ips.to_string()])
                .args(["--heartbeat-secs", &HEARTBEAT_SECS.to_string()])
                .args(["--in-flight", &(IN_FLIGHT / args.procs).max(1).to_string()])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .context("spawn idle-worker")?;
            let out = child.stdout.take().context("stdout")?;
            let (latest, counters, attempted) =
                (latest.clone(), counters.clone(), attempted.clone());
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(out).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    let f: Vec<u64> = l
                        .split_whitespace()
                        .filter_map(|w| w.parse().ok())
                        .collect();
                    if let Ok(f) = <[u64; 3]>::try_from(f) {
                        let mut v = latest.lock().unwrap_or_else(|e| e.into_inner());
                        v[p] = f;
                        let sum = |k: usize| v.iter().map(|x| x[k]).sum();
                        counters.connected.store(sum(0), Ordering::Relaxed);
                        counters.errors.store(sum(1), Ordering::Relaxed);
                        attempted.store(sum(2), Ordering::Relaxed);
                    }
                }
            });
            children.push(child);
        }
        // Attempts, not open connections: one that closes meanwhile must not keep us waiting.
        let all = load::wait_until(Duration::from_secs(300), || {
            attempted.load(Ordering::Relaxed) >= n as u64
        })
        .await;
        connect_secs = start.elapsed().as_secs_f64();
        if !all {
            report
                .notes
                .push("not every connection was attempted within 300 s".into());
        }
    }
    let connected = counters.connected.load(Ordering::Relaxed);
    if connected == 0 {
        bail!("no connection succeeded");
    }
    // Let allocations settle, hold (heartbeats keep them), then measure.
    tokio::time::sleep(Duration::from_secs_f64(args.hold_secs.max(1.0))).await;
    let full = target.rss_kib();
    let connected = counters.connected.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let mut pts = sampler.await.unwrap_or_default();
    pts.push((connected as f64, full as f64 / 1024.0));
    local_beats.abort();
    drop(local);
    for c in &mut children {
        drop(c.stdin.take());
    }
    for c in &mut children {
        let _ = tokio::time::timeout(Duration::from_secs(10), c.wait()).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = target.rss_kib();
    let per_conn = (full.saturating_sub(base)) as f64 * 1024.0 / connected as f64;
    eprintln!(
        "\n  {connected} {:?} connections ({} failed) in {connect_secs:.1} s: gateway RSS {} → {} KiB = {per_conn:.0} bytes per connection; {} KiB after they closed",
        args.transport,
        counters.errors.load(Ordering::Relaxed),
        base,
        full,
        after
    );
    report.steps.push(Step {
        duration_s: connect_secs,
        sent: n as u64,
        acked: connected,
        errors: counters.errors.load(Ordering::Relaxed),
        connections: connected,
        rss_kib: full,
        ..Step::default()
    });
    report
        .metrics
        .insert("connections".into(), connected as f64);
    report
        .metrics
        .insert("bytes_per_conn".into(), per_conn.round());
    report.metrics.insert("rss_base_kib".into(), base as f64);
    report.metrics.insert("rss_full_kib".into(), full as f64);
    report
        .metrics
        .insert("rss_after_close_kib".into(), after as f64);
    report.metrics.insert(
        "connects_per_s".into(),
        (connected as f64 / connect_secs).round(),
    );
    report.charts.push(Chart {
        title: format!("{:?}: gateway RSS vs idle connections", args.transport),
        x_label: "connections".into(),
        y_label: "RSS, MiB".into(),
        series: vec![("gateway RSS".into(), pts)],
    });
    report.notes.push(format!(
        "RSS of the whole gateway process{}; base taken after the devices were registered; {} generator process(es)",
        if target.mode == "dev" { " (zhibo dev: gateway + logic + user-api)" } else { "" },
        args.procs.max(1)
    ));
    Ok(())
}
