//! Ceilings: what the raw infrastructure under zhibo does on the same machine in the same run, so
//! zhibo's figures can be read as a fraction of what is physically available here.
//!
//! - NATS core publish → one subscriber, the payload size of a zhibo command (one publisher, as fast
//!   as it can: the "raw NATS 1→1" throughput).
//! - NATS request/reply round trip (sequential): the floor of a distributed send → ACK.
//! - Redis INCR (one connection, pipelined 256 deep): the seq allocator's ceiling.
//! - Loopback WebSocket echo (tokio-tungstenite both ends): pipelined rate and sequential round trip.
//! - CQL on the node a distributed cluster uses (scylla driver, [`CQL_CONCURRENCY`] in flight, as a
//!   logic worker keeps): plain inserts, lightweight-transaction inserts and point reads per second,
//!   in a scratch keyspace dropped afterwards, and one insert at a time (its round trip). A 1:1 send
//!   costs [`INSERTS_PER_ONE_TO_ONE`] inbox inserts, so `acked_per_s / (cql_insert_per_s / 2)` says
//!   how close the send path is to what its writes alone would allow (the
//!   `zhibo_cql_operations_total{kind}` metric of the logic workers counts what a send really costs).

use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{Packet, ReceiverType, SendMessageInput};

use super::hist::{new_histogram, record, Latency};
use super::report::{Ceilings, Report};
use super::BenchArgs;

/// The size of a zhibo 1:1 command on the bus for `payload` content bytes: the encoded packet plus
/// ~32 bytes of origin (user, device, gateway id, connection id).
pub fn command_size(payload: usize) -> usize {
    let p = Packet::new(
        123_456,
        Body::SendMessage(SendMessageInput {
            receiver_type: ReceiverType::User as i32,
            receiver_id: 1_700_000_000_000_000,
            client_msg_id: "b123456".into(),
            content_type: 1,
            content: vec![b'z'; payload.max(8)].into(),
            ..Default::default()
        }),
    );
    zhibo_proto::codec::encode_body(&p).len() + 32
}

/// CQL statements kept in flight by the CQL ceiling (a logic worker's write concurrency order).
pub const CQL_CONCURRENCY: usize = 64;

/// Inbox inserts of one 1:1 message (the sender's copy and the receiver's).
pub const INSERTS_PER_ONE_TO_ONE: f64 = 2.0;

/// Measures every ceiling, `args.ceiling_secs` each.
///
/// # Errors
/// When NATS, Redis or the CQL node cannot be reached.
pub async fn measure(args: &BenchArgs) -> anyhow::Result<Ceilings> {
    let secs = Duration::from_secs_f64(args.ceiling_secs.max(0.2));
    let size = command_size(args.payload);
    eprintln!("  ceilings ({size}-byte payload, {secs:?} each)");
    let nats_pubsub_per_s = nats_pubsub(&args.nats_url, size, secs).await?;
    eprintln!("    NATS pub→sub: {nats_pubsub_per_s:.0} msgs/s");
    let nats_request_latency = nats_request(&args.nats_url, size, secs).await?;
    eprintln!("    NATS request/reply: {}", nats_request_latency.line());
    let redis_incr_per_s = redis_incr(&args.redis_url, secs).await?;
    eprintln!("    Redis INCR: {redis_incr_per_s:.0}/s");
    let (ws_echo_per_s, ws_echo_latency) = ws_echo(size, secs).await?;
    eprintln!(
        "    WebSocket echo: {ws_echo_per_s:.0}/s pipelined; {}",
        ws_echo_latency.line()
    );
    let (cql_insert_per_s, cql_lwt_per_s, cql_read_per_s, cql_insert_latency) =
        cql(&args.cql_node, args.payload, secs).await?;
    eprintln!(
        "    CQL ({CQL_CONCURRENCY} in flight): {cql_insert_per_s:.0} inserts/s, \
         {cql_lwt_per_s:.0} LWT inserts/s, {cql_read_per_s:.0} point reads/s; one insert at a \
         time: {}",
        cql_insert_latency.line()
    );
    Ok(Ceilings {
        cql_insert_per_s,
        cql_lwt_per_s,
        cql_read_per_s,
        cql_insert_latency,
        nats_pubsub_per_s,
        nats_request_latency,
        redis_incr_per_s,
        ws_echo_per_s,
        ws_echo_latency,
        payload_bytes: size,
    })
}

/// zhibo's headline figures over the ceilings.
pub fn ratios(report: &mut Report, c: &Ceilings) {
    let get = |k: &str| report.metrics.get(k).copied();
    let mut r = Vec::new();
    if let Some(v) = get("max_acked_per_s") {
        if c.nats_pubsub_per_s > 0.0 {
            r.push(("acked_per_s / nats_pubsub_per_s", v / c.nats_pubsub_per_s));
        }
        if c.redis_incr_per_s > 0.0 {
            r.push(("acked_per_s / redis_incr_per_s", v / c.redis_incr_per_s));
        }
        if c.ws_echo_per_s > 0.0 {
            r.push(("acked_per_s / ws_echo_per_s", v / c.ws_echo_per_s));
        }
    }
    if let (Some(v), true, "one-to-one") = (
        get("max_acked_per_s"),
        c.cql_insert_per_s > 0.0,
        report.scenario.as_str(),
    ) {
        r.push((
            "acked_per_s / (cql_insert_per_s / inserts_per_message)",
            v / (c.cql_insert_per_s / INSERTS_PER_ONE_TO_ONE),
        ));
        // The same with the CQL operations the workers counted per message (reads, LWTs and batches
        // each count one; the ceiling is plain inserts).
        if let Some(ops) = get("cost.cql_ops").filter(|&ops| ops > 0.0) {
            r.push((
                "acked_per_s / (cql_insert_per_s / cql_ops_per_message)",
                v / (c.cql_insert_per_s / ops),
            ));
        }
        // And with the rows they wrote per message (each statement of a batch counts one): the
        // issue's "inserts per message" with every table a send writes.
        if let Some(rows) = get("cost.cql.rows_written").filter(|&rows| rows > 0.0) {
            r.push((
                "acked_per_s / (cql_insert_per_s / cql_rows_written_per_message)",
                v / (c.cql_insert_per_s / rows),
            ));
        }
    }
    if let Some(v) = get("max_delivered_per_s") {
        if c.nats_pubsub_per_s > 0.0 {
            r.push((
                "delivered_per_s / nats_pubsub_per_s",
                v / c.nats_pubsub_per_s,
            ));
        }
    }
    if let (Some(v), true) = (
        get("p99_ack_ms_at_half_load"),
        c.nats_request_latency.p99_us > 0,
    ) {
        r.push((
            "p99_ack_at_half_load / nats_request_p99",
            v * 1e3 / c.nats_request_latency.p99_us as f64,
        ));
    }
    // A send's CQL steps are sequential (the plan, then the entries): each costs at least one insert
    // round trip. (Room messages write no CQL.)
    if let (Some(v), true, "one-to-one" | "group") = (
        get("p99_ack_ms_at_half_load"),
        c.cql_insert_latency.p99_us > 0,
        report.scenario.as_str(),
    ) {
        r.push((
            "p99_ack_at_half_load / cql_insert_p99",
            v * 1e3 / c.cql_insert_latency.p99_us as f64,
        ));
    }
    for (k, v) in r {
        report
            .ratios
            .insert(k.into(), (v * 1000.0).round() / 1000.0);
    }
}

async fn nats_pubsub(url: &str, size: usize, secs: Duration) -> anyhow::Result<f64> {
    let subject = format!("zhibo.bench.{}", rand::random::<u32>());
    let sub_client = async_nats::connect(url)
        .await
        .with_context(|| format!("NATS at {url}"))?;
    let pub_client = async_nats::connect(url).await?;
    let mut sub = sub_client.subscribe(subject.clone()).await?;
    sub_client.flush().await?;
    let payload = Bytes::from(vec![b'z'; size]);
    let counter = tokio::spawn(async move {
        let mut n = 0u64;
        let mut first: Option<Instant> = None;
        let mut last = Instant::now();
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(1), sub.next()).await {
            first.get_or_insert_with(Instant::now);
            last = Instant::now();
            n += 1;
        }
        (n, first.map(|f| last - f))
    });
    let start = Instant::now();
    while start.elapsed() < secs {
        for _ in 0..256 {
            pub_client.publish(subject.clone(), payload.clone()).await?;
        }
    }
    pub_client.flush().await?;
    let (n, span) = counter.await?;
    let span = span.unwrap_or(secs).as_secs_f64().max(1e-3);
    Ok(n as f64 / span)
}

async fn nats_request(url: &str, size: usize, secs: Duration) -> anyhow::Result<Latency> {
    let subject = format!("zhibo.bench.rr.{}", rand::random::<u32>());
    let responder = async_nats::connect(url).await?;
    let requester = async_nats::connect(url).await?;
    let mut sub = responder.subscribe(subject.clone()).await?;
    responder.flush().await?;
    let r2 = responder.clone();
    let serve = tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if let Some(reply) = m.reply {
                let _ = r2.publish(reply, m.payload).await;
            }
        }
    });
    let payload = Bytes::from(vec![b'z'; size]);
    let mut h = new_histogram();
    let start = Instant::now();
    while start.elapsed() < secs {
        let t = Instant::now();
        requester.request(subject.clone(), payload.clone()).await?;
        record(&mut h, t.elapsed().as_micros() as u64);
    }
    serve.abort();
    Ok(Latency::of(&h))
}

/// `host:port` of a `redis://[user:password@]host:port[/]` URL (the load tool speaks RESP itself).
pub(super) fn redis_hostport(url: &str) -> String {
    url.trim_start_matches("redis://")
        .trim_end_matches('/')
        .rsplit('@')
        .next()
        .unwrap_or("127.0.0.1:6379")
        .to_owned()
}

async fn redis_incr(url: &str, secs: Duration) -> anyhow::Result<f64> {
    let hostport = redis_hostport(url);
    let mut s = tokio::net::TcpStream::connect(&hostport)
        .await
        .with_context(|| format!("Redis at {hostport}"))?;
    s.set_nodelay(true)?;
    let key = format!("zhibo:bench:{}", rand::random::<u32>());
    let cmd = format!("*2\r\n$4\r\nINCR\r\n${}\r\n{key}\r\n", key.len());
    const DEPTH: usize = 256;
    let batch = cmd.repeat(DEPTH).into_bytes();
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0u64;
    let start = Instant::now();
    while start.elapsed() < secs {
        s.write_all(&batch).await?;
        let mut replies = 0;
        while replies < DEPTH {
            let k = s.read(&mut buf).await?;
            anyhow::ensure!(k > 0, "Redis closed the connection");
            replies += buf[..k].iter().filter(|&&b| b == b'\n').count();
        }
        n += DEPTH as u64;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let del = format!("*2\r\n$3\r\nDEL\r\n${}\r\n{key}\r\n", key.len());
    s.write_all(del.as_bytes()).await?;
    let _ = s.read(&mut buf).await?;
    Ok(rate)
}

/// Plain inserts, LWT inserts and point reads per second against `node`, each for `secs` with
/// [`CQL_CONCURRENCY`] statements in flight, then the round trip of one plain insert at a time (for
/// `secs`), in a scratch keyspace dropped afterwards.
async fn cql(
    node: &str,
    payload: usize,
    secs: Duration,
) -> anyhow::Result<(f64, f64, f64, Latency)> {
    use scylla::client::session_builder::SessionBuilder;
    let session = SessionBuilder::new()
        .known_node(node)
        .connection_timeout(Duration::from_secs(5))
        .build()
        .await
        .with_context(|| format!("CQL node at {node}"))?;
    let keyspace = format!("zhibo_ceiling_{}", rand::random::<u32>());
    session
        .query_unpaged(
            format!(
                "CREATE KEYSPACE {keyspace} WITH replication = \
                 {{'class': 'SimpleStrategy', 'replication_factor': 1}}"
            ),
            (),
        )
        .await?;
    let outcome = async {
        session
            .query_unpaged(
                format!("CREATE TABLE {keyspace}.t (k bigint PRIMARY KEY, v blob)"),
                (),
            )
            .await?;
        session.await_schema_agreement().await?;
        let insert = session
            .prepare(format!("INSERT INTO {keyspace}.t (k, v) VALUES (?, ?)"))
            .await?;
        let lwt = session
            .prepare(format!(
                "INSERT INTO {keyspace}.t (k, v) VALUES (?, ?) IF NOT EXISTS"
            ))
            .await?;
        let read = session
            .prepare(format!("SELECT v FROM {keyspace}.t WHERE k = ?"))
            .await?;
        let value = vec![b'z'; payload];
        let (inserts, inserted) = cql_rate(secs, 0, |k| {
            let (s, st, v) = (&session, &insert, value.clone());
            async move { s.execute_unpaged(st, (k, v)).await.map(drop) }
        })
        .await?;
        // LWT keys above the plain ones: every LWT inserts a new row (the costly path).
        let (lwts, _) = cql_rate(secs, inserted, |k| {
            let (s, st, v) = (&session, &lwt, value.clone());
            async move { s.execute_unpaged(st, (k, v)).await.map(drop) }
        })
        .await?;
        let written = inserted.max(1);
        let (reads, _) = cql_rate(secs, 0, |k| {
            let (s, st) = (&session, &read);
            async move { s.execute_unpaged(st, (k % written,)).await.map(drop) }
        })
        .await?;
        let mut h = new_histogram();
        let start = Instant::now();
        let mut k: i64 = -1;
        while start.elapsed() < secs {
            let t = Instant::now();
            session.execute_unpaged(&insert, (k, value.clone())).await?;
            record(&mut h, t.elapsed().as_micros() as u64);
            k -= 1;
        }
        anyhow::Ok((inserts, lwts, reads, Latency::of(&h)))
    }
    .await;
    let dropped = session
        .query_unpaged(format!("DROP KEYSPACE IF EXISTS {keyspace}"), ())
        .await;
    let rates = outcome?;
    dropped.context("drop the ceiling's scratch keyspace")?;
    Ok(rates)
}

/// Runs `op(first_key + i)` for i = 0, 1, … with [`CQL_CONCURRENCY`] in flight until `secs` pass;
/// returns the rate per second and the number of operations done.
async fn cql_rate<F, Fut, E>(secs: Duration, first_key: i64, op: F) -> anyhow::Result<(f64, i64)>
where
    F: Fn(i64) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    let start = Instant::now();
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut next = first_key;
    let mut done = 0i64;
    loop {
        while in_flight.len() < CQL_CONCURRENCY && start.elapsed() < secs {
            in_flight.push(op(next));
            next += 1;
        }
        match in_flight.next().await {
            Some(result) => {
                result?;
                done += 1;
            }
            None => break,
        }
    }
    Ok((done as f64 / start.elapsed().as_secs_f64(), done))
}

async fn ws_echo(size: usize, secs: Duration) -> anyhow::Result<(f64, Latency)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                if let Ok(ws) = tokio_tungstenite::accept_async(s).await {
                    let (mut tx, mut rx) = ws.split();
                    while let Some(Ok(m)) = rx.next().await {
                        if m.is_binary() && tx.send(m).await.is_err() {
                            break;
                        }
                    }
                }
            });
        }
    });
    let payload = Bytes::from(vec![b'z'; size]);
    // Sequential round trips.
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/")).await?;
    let (mut tx, mut rx) = ws.split();
    let mut h = new_histogram();
    let start = Instant::now();
    while start.elapsed() < secs / 2 {
        let t = Instant::now();
        tx.send(WsMessage::Binary(payload.clone())).await?;
        rx.next().await.context("echo closed")??;
        record(&mut h, t.elapsed().as_micros() as u64);
    }
    // Pipelined: a window of 256 in flight.
    let reader = tokio::spawn(async move {
        let mut n = 0u64;
        while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(1), rx.next()).await {
            n += 1;
        }
        n
    });
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < secs / 2 {
        for _ in 0..256 {
            tx.feed(WsMessage::Binary(payload.clone())).await?;
        }
        tx.flush().await?;
        sent += 256;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let got = reader.await?;
    server.abort();
    Ok((got.min(sent) as f64 / elapsed, Latency::of(&h)))
}
