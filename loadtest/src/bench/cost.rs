//! What one message costs a spawned cluster: CPU time per role, NATS messages, Redis commands and
//! CQL operations, from counters read before and after the measured sweep (issue #16: the inputs of
//! the capacity model in docs/BENCHMARKS.md).
//!
//! - CPU: user + system time of each spawned process (`/proc/<pid>/stat`), summed per role; with a
//!   distributed cluster also of the servers `scripts/infra.sh` started (`--infra-run`, its pid
//!   files `nats.pid`, `redis.pid`, `cassandra.pid`).
//! - NATS: the server's `in_msgs` / `out_msgs` from its monitoring endpoint (`--nats-monitor`,
//!   `/varz`): messages published to it and messages it delivered.
//! - Redis: `total_commands_processed` of `INFO stats` (the two `INFO` calls included).
//! - CQL: the logic workers' `zhibo_cql_operations_total{kind}` (counted by the store layer).
//!
//! The servers are shared with whatever else runs on the host: measure on an otherwise idle machine.
//! A counter that cannot be read is left out of the report (with a note), never guessed.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::ceilings::redis_hostport;
use super::load::Meter;
use super::report::Report;
use super::server::{cpu_secs, Target};
use super::BenchArgs;

/// The counters at one moment.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    /// CPU seconds per role (`gateway`, `logic-worker`, `user-api`, `dev`).
    cpu: BTreeMap<String, f64>,
    /// NATS `(in_msgs, out_msgs)`.
    nats: Option<(u64, u64)>,
    /// Redis `total_commands_processed`.
    redis: Option<u64>,
    /// CQL operations by kind, summed over the logic workers.
    cql: Option<BTreeMap<String, u64>>,
    /// The workers' `zhibo_send_ack_seconds` (key `total`: time from a send command's receipt to its
    /// answer) and `zhibo_send_stage_seconds` (key: the stage) as `(sum, count)`, summed over the
    /// logic workers.
    worker_send: Option<BTreeMap<String, (f64, u64)>>,
}

/// The counters and the ACK count at the start of a measured sweep.
#[derive(Debug)]
pub struct Probe {
    counters: Counters,
    acked: u64,
}

impl Probe {
    /// Reads the counters before the sweep.
    pub async fn start(args: &BenchArgs, target: &Target, meter: &Meter) -> Probe {
        Probe {
            counters: read(args, target).await,
            acked: meter.counters.snapshot().acked,
        }
    }

    /// Reads them again and writes the cost per message ACKed since [`Probe::start`] (see
    /// [`per_message`]).
    pub async fn finish(
        self,
        args: &BenchArgs,
        target: &Target,
        meter: &Meter,
        report: &mut Report,
    ) {
        let after = read(args, target).await;
        let acked = meter.counters.snapshot().acked - self.acked;
        per_message(&self.counters, &after, acked, report);
    }
}

/// Reads every counter of `target` (CPU of its processes; NATS, Redis, CQL when distributed).
pub async fn read(args: &BenchArgs, target: &Target) -> Counters {
    let mut cpu = BTreeMap::new();
    for (role, pid) in target.processes() {
        *cpu.entry(role.to_owned()).or_insert(0.0) += cpu_secs(pid).unwrap_or(0.0);
    }
    if target.mode != "distributed" {
        return Counters {
            cpu,
            ..Counters::default()
        };
    }
    for server in ["nats", "redis", "cassandra"] {
        let pid = std::fs::read_to_string(args.infra_run.join(format!("{server}.pid")))
            .ok()
            .and_then(|p| p.trim().parse().ok());
        if let Some(secs) = pid.and_then(cpu_secs) {
            cpu.insert(server.to_owned(), secs);
        }
    }
    let nats = match nats_msgs(&args.nats_monitor).await {
        Ok(v) => Some(v),
        Err(e) => {
            eprintln!("  NATS counters not read ({}): {e:#}", args.nats_monitor);
            None
        }
    };
    let redis = match redis_commands(&args.redis_url).await {
        Ok(v) => Some(v),
        Err(e) => {
            eprintln!("  Redis counters not read: {e:#}");
            None
        }
    };
    let mut cql = Some(BTreeMap::new());
    let mut worker_send = Some(BTreeMap::new());
    for url in target.worker_metrics() {
        match scrape(url).await {
            Ok(page) => {
                if let Some(sum) = cql.as_mut() {
                    for (k, v) in parse_cql_ops(&page) {
                        *sum.entry(k).or_insert(0) += v;
                    }
                }
                if let Some(sum) = worker_send.as_mut() {
                    for (k, (ds, dc)) in parse_send_times(&page) {
                        let e = sum.entry(k).or_insert((0.0, 0));
                        *e = (e.0 + ds, e.1 + dc);
                    }
                }
            }
            Err(e) => {
                eprintln!("  CQL counters not read from {url}: {e:#}");
                cql = None;
            }
        }
    }
    Counters {
        cpu,
        nats,
        redis,
        cql,
        worker_send,
    }
}

/// Writes the cost of one message between `before` and `after` (`messages` acknowledged sends) into
/// `report.metrics`: `cost.cpu_us.<role>`, `cost.nats_in`, `cost.nats_out`, `cost.redis_commands`,
/// `cost.cql.<kind>` and `cost.cql_ops` (all kinds), each per message.
pub fn per_message(before: &Counters, after: &Counters, messages: u64, report: &mut Report) {
    if messages == 0 {
        return;
    }
    let n = messages as f64;
    let mut put = |k: String, v: f64| {
        report.metrics.insert(k, (v * 1000.0).round() / 1000.0);
    };
    for (role, secs) in &after.cpu {
        let spent = secs - before.cpu.get(role).copied().unwrap_or(0.0);
        put(format!("cost.cpu_us.{role}"), spent * 1e6 / n);
    }
    if let (Some(b), Some(a)) = (before.nats, after.nats) {
        put("cost.nats_in".into(), a.0.saturating_sub(b.0) as f64 / n);
        put("cost.nats_out".into(), a.1.saturating_sub(b.1) as f64 / n);
    }
    if let (Some(b), Some(a)) = (before.redis, after.redis) {
        put("cost.redis_commands".into(), a.saturating_sub(b) as f64 / n);
    }
    if let (Some(b), Some(a)) = (&before.cql, &after.cql) {
        let mut total = 0;
        for (kind, v) in a {
            let d = v.saturating_sub(b.get(kind).copied().unwrap_or(0));
            // Rows written are not operations of their own (see `ROWS`).
            if kind != ROWS {
                total += d;
            }
            put(format!("cost.cql.{kind}"), d as f64 / n);
        }
        put("cost.cql_ops".into(), total as f64 / n);
    }
    // Per send handled (not per message ACKed): how much of send → ACK the worker holds, and in
    // which stage.
    if let (Some(b), Some(a)) = (&before.worker_send, &after.worker_send) {
        for (k, &(sum, count)) in a {
            let (b_sum, b_count) = b.get(k).copied().unwrap_or((0.0, 0));
            let sends = count.saturating_sub(b_count);
            if sends == 0 {
                continue;
            }
            let name = if k == "total" {
                "worker_send_us_mean".to_owned()
            } else {
                format!("worker_stage_us_mean.{k}")
            };
            put(name, (sum - b_sum) * 1e6 / sends as f64);
        }
    }
    report.notes.push(format!(
        "cost.*: per acknowledged message over the whole sweep ({messages} messages): CPU µs per role \
         (user + system), NATS messages in/out of the server (/varz), Redis commands \
         (INFO total_commands_processed), CQL operations by kind (the workers' \
         zhibo_cql_operations_total); worker_send_us_mean: the workers' mean time from a send \
         command's receipt to its answer (zhibo_send_ack_seconds), the rest of send → ACK being \
         the gateway, NATS and the client; worker_stage_us_mean.<stage>: the same for new 1:1 \
         and group messages by stage (zhibo_send_stage_seconds); shared servers: valid on an \
         otherwise idle host"
    ));
}

/// A successful `GET url` (5 s timeout).
async fn get(url: &str) -> anyhow::Result<reqwest::Response> {
    Ok(reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await?
        .error_for_status()?)
}

/// `(in_msgs, out_msgs)` from a NATS monitoring `/varz` URL.
async fn nats_msgs(url: &str) -> anyhow::Result<(u64, u64)> {
    let v: serde_json::Value = get(url).await?.json().await?;
    let get = |k: &str| v[k].as_u64().with_context(|| format!("no {k} in /varz"));
    Ok((get("in_msgs")?, get("out_msgs")?))
}

/// `total_commands_processed` of the Redis at `url` (RESP over a plain connection).
async fn redis_commands(url: &str) -> anyhow::Result<u64> {
    let hostport = redis_hostport(url);
    let s = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(&hostport),
    )
    .await
    .context("connect timed out")??;
    let mut s = BufReader::new(s);
    s.get_mut()
        .write_all(b"*2\r\n$4\r\nINFO\r\n$5\r\nstats\r\n")
        .await?;
    let mut header = String::new();
    s.read_line(&mut header).await?;
    let len: usize = header
        .trim_end()
        .strip_prefix('$')
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("unexpected INFO answer {header:?}"))?;
    let mut body = vec![0; len];
    s.read_exact(&mut body).await?;
    parse_info_total(&String::from_utf8_lossy(&body))
}

fn parse_info_total(info: &str) -> anyhow::Result<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no total_commands_processed in INFO stats")
}

/// A `/metrics` page.
async fn scrape(url: &str) -> anyhow::Result<String> {
    Ok(get(url).await?.text().await?)
}

/// `(sum, count)` of `zhibo_send_ack_seconds` (under `total`) and of each stage (`kind`) of
/// `zhibo_send_stage_seconds` on a Prometheus text page; a histogram missing its sum or count is
/// left out.
fn parse_send_times(text: &str) -> BTreeMap<String, (f64, u64)> {
    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for line in text.lines() {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (key, is_sum) = match name {
            "zhibo_send_ack_seconds_sum" => ("total".to_owned(), true),
            "zhibo_send_ack_seconds_count" => ("total".to_owned(), false),
            _ => {
                let Some((metric, labels)) = name.split_once('{') else {
                    continue;
                };
                let is_sum = match metric {
                    "zhibo_send_stage_seconds_sum" => true,
                    "zhibo_send_stage_seconds_count" => false,
                    _ => continue,
                };
                let Some(kind) = labels
                    .split("kind=\"")
                    .nth(1)
                    .and_then(|k| k.split('"').next())
                else {
                    continue;
                };
                (kind.to_owned(), is_sum)
            }
        };
        if is_sum {
            sums.insert(key, value);
        } else {
            counts.insert(key, value as u64);
        }
    }
    sums.into_iter()
        .filter_map(|(k, sum)| Some((k.clone(), (sum, *counts.get(&k)?))))
        .collect()
}

/// The key under which [`parse_cql_ops`] puts `zhibo_cql_rows_written_total`: rows written (each
/// plain or conditional write, each statement of a batch), what the insert ceiling's single-row
/// inserts compare to (`cost.cql.rows_written`).
const ROWS: &str = "rows_written";

/// The `zhibo_cql_operations_total{kind="…"} N` samples of a Prometheus text page, and its
/// `zhibo_cql_rows_written_total` under [`ROWS`].
fn parse_cql_ops(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let value = || l.rsplit(' ').next()?.parse::<f64>().ok();
            if l.starts_with("zhibo_cql_rows_written_total") {
                return Some((ROWS.to_owned(), value()? as u64));
            }
            let rest = l.strip_prefix("zhibo_cql_operations_total{")?;
            let kind = rest.split("kind=\"").nth(1)?.split('"').next()?;
            Some((kind.to_owned(), value()? as u64))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_cql_counters_of_a_metrics_page() {
        let page = "# HELP zhibo_cql_operations_total CQL operations\n\
                    # TYPE zhibo_cql_operations_total counter\n\
                    zhibo_cql_operations_total{kind=\"read\"} 12\n\
                    zhibo_cql_operations_total{kind=\"batch\",node=\"w1\"} 7\n\
                    zhibo_other_total{kind=\"read\"} 99\n\
                    zhibo_cql_rows_written_total{kind=\"all\"} 30\n";
        let ops = parse_cql_ops(page);
        assert_eq!(ops.get("read"), Some(&12));
        assert_eq!(ops.get("batch"), Some(&7));
        assert_eq!(ops.get(ROWS), Some(&30));
        assert_eq!(ops.len(), 3);
        let page = "zhibo_send_ack_seconds_bucket{le=\"0.001\"} 3\n\
                    zhibo_send_ack_seconds_sum 0.25\n\
                    zhibo_send_ack_seconds_count 10\n\
                    zhibo_send_stage_seconds_sum{kind=\"store\"} 0.125\n\
                    zhibo_send_stage_seconds_count{kind=\"store\"} 5\n\
                    zhibo_send_stage_seconds_bucket{kind=\"store\",le=\"0.001\"} 2\n\
                    zhibo_send_stage_seconds_sum{kind=\"deliver\"} 0.5\n";
        let times = parse_send_times(page);
        assert_eq!(times.get("total"), Some(&(0.25, 10)));
        assert_eq!(times.get("store"), Some(&(0.125, 5)));
        assert_eq!(times.len(), 2, "deliver has no count: left out");
    }

    #[test]
    fn reads_the_redis_total_and_refuses_a_page_without_it() {
        let info = "# Stats\r\ntotal_connections_received:3\r\ntotal_commands_processed:4242\r\n";
        assert_eq!(parse_info_total(info).unwrap(), 4242);
        assert!(parse_info_total("# Stats\r\n").is_err());
    }

    #[test]
    fn per_message_divides_the_differences() {
        let before = Counters {
            cpu: [("gateway".to_owned(), 1.0)].into(),
            nats: Some((100, 200)),
            redis: Some(10),
            cql: Some([("batch".to_owned(), 5)].into()),
            worker_send: Some([("total".to_owned(), (1.0, 100))].into()),
        };
        let after = Counters {
            cpu: [("gateway".to_owned(), 3.0)].into(),
            nats: Some((1100, 2200)),
            redis: Some(510),
            cql: Some(
                [
                    ("batch".to_owned(), 2005),
                    ("read".to_owned(), 1000),
                    (ROWS.to_owned(), 8000),
                ]
                .into(),
            ),
            worker_send: Some(
                [
                    ("total".to_owned(), (5.0, 1100)),
                    ("store".to_owned(), (0.5, 1000)),
                ]
                .into(),
            ),
        };
        let mut report = Report::default();
        per_message(&before, &after, 1000, &mut report);
        let m = &report.metrics;
        assert_eq!(m["cost.cpu_us.gateway"], 2000.0);
        assert_eq!((m["cost.nats_in"], m["cost.nats_out"]), (1.0, 2.0));
        assert_eq!(m["cost.redis_commands"], 0.5);
        assert_eq!((m["cost.cql.batch"], m["cost.cql.read"]), (2.0, 1.0));
        assert_eq!(m["cost.cql_ops"], 3.0, "rows written are not operations");
        assert_eq!(m["cost.cql.rows_written"], 8.0);
        assert_eq!(m["worker_send_us_mean"], 4000.0, "4 s over 1,000 sends");
        assert_eq!(m["worker_stage_us_mean.store"], 500.0);
    }
}
