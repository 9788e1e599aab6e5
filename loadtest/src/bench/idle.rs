//! Scenario 1: idle memory per connection. Connects `conns` devices (over `procs` generator processes
//! and several source addresses), holds them with heartbeats, and reads the gateway's RSS as they come.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
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
    #[arg(long, default_value_t = 30)]
    pub heartbeat_secs: u64,
}

/// Connects a slice of the population and holds it until stdin closes, printing
/// `connected <n> errors <e>` every 250 ms.
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
    let counters = meter.counters.clone();
    let printer = tokio::spawn(async move {
        loop {
            let s = counters.snapshot();
            println!("connected {} errors {}", s.connected, s.errors);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    let conns = hold(&a.addr, a.transport, &creds, a.source_ips, &meter, a.from).await;
    let conns = Arc::new(tokio::sync::Mutex::new(conns));
    let beats = load::heartbeats(conns.clone(), Duration::from_secs(a.heartbeat_secs));
    // Hold until the parent closes our stdin.
    let mut buf = [0u8; 64];
    while tokio::io::stdin().read(&mut buf).await.unwrap_or(0) > 0 {}
    beats.abort();
    printer.abort();
    Ok(())
}

/// Connects `creds` (256 at a time), counting failures instead of failing.
async fn hold(
    addr: &str,
    transport: Transport,
    creds: &[Credentials],
    source_ips: usize,
    meter: &Arc<Meter>,
    offset: usize,
) -> Vec<load::LoadConn> {
    use futures::StreamExt;
    let endpoints = load::quic_endpoints(transport, source_ips).unwrap_or_default();
    futures::stream::iter(creds.iter().cloned().enumerate())
        .map(|(i, c)| {
            let ep = (!endpoints.is_empty()).then(|| &endpoints[(i + offset) % endpoints.len()]);
            let source = setup::source_ip(i + offset, source_ips);
            async move {
                match load::connect(transport, addr, c, source, ep, meter).await {
                    Ok(conn) => Some(conn),
                    Err(_) => {
                        meter.counters.errors.fetch_add(1, Ordering::Relaxed);
                        None
                    }
                }
            }
        })
        .buffer_unordered(256)
        .filter_map(|c| async move { c })
        .collect()
        .await
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
    let mut local = Vec::new();
    let connect_secs;
    if args.procs <= 1 {
        let meter = Arc::new(Meter::with_counters(counters.clone()));
        local = hold(&addr, args.transport, &creds, args.source_ips, &meter, 0).await;
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
        let latest: Arc<std::sync::Mutex<Vec<(u64, u64)>>> =
            Arc::new(std::sync::Mutex::new(vec![(0, 0); args.procs]));
        for p in 0..args.procs {
            let (from, to) = (p * per, ((p + 1) * per).min(n));
            let mut child = tokio::process::Command::new(&exe)
                .args(["idle-worker", "--transport"])
                .arg(format!("{:?}", args.transport).to_lowercase())
                .args(["--addr", &addr, "--creds"])
                .arg(&file)
                .args(["--from", &from.to_string(), "--to", &to.to_string()])
                .args(["--source-ips", &args.source_ips.to_string()])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .context("spawn idle-worker")?;
            let out = child.stdout.take().context("stdout")?;
            let (latest, counters) = (latest.clone(), counters.clone());
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(out).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    let f: Vec<u64> = l
                        .split_whitespace()
                        .filter_map(|w| w.parse().ok())
                        .collect();
                    if let [c, e] = f[..] {
                        let mut v = latest.lock().unwrap_or_else(|e| e.into_inner());
                        v[p] = (c, e);
                        counters
                            .connected
                            .store(v.iter().map(|x| x.0).sum(), Ordering::Relaxed);
                        counters
                            .errors
                            .store(v.iter().map(|x| x.1).sum(), Ordering::Relaxed);
                    }
                }
            });
            children.push(child);
        }
        let c = counters.clone();
        let all = load::wait_until(Duration::from_secs(300), || {
            let s = c.snapshot();
            s.connected + s.errors >= n as u64
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
