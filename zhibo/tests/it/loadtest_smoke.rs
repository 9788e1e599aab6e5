//! A few seconds of every loadtest scenario against an embedded node, so the benchmark tool cannot rot.
//! Asserts counts a broken tool would get wrong (messages acknowledged, delivered, synced, connections
//! held), never timings: the figures themselves belong in docs/BENCHMARKS.md.

use zhibo_loadtest::bench::{run_scenario, BenchArgs, Publish, Scenario, SpawnMode};
use zhibo_loadtest::client::Transport;

use crate::cluster::{distributed_keyspace, Cluster, ADMIN, SECRET};

async fn cluster() -> Cluster {
    Cluster::embedded_with(|c| {
        c.gateway.rate_per_sec = 100_000.0;
        c.gateway.rate_burst = 100_000.0;
        c.gateway.room_send_per_sec = 100_000.0;
        c.gateway.room_send_burst = 100_000.0;
        c.logic.allow_strangers = true;
    })
    .await
}

fn args(c: &Cluster, scenario: Scenario) -> BenchArgs {
    let gw = c.gw(0);
    let mut a = BenchArgs::new(scenario);
    a.spawn = SpawnMode::None;
    a.api = c.api_base.clone();
    a.tcp = gw.tcp.to_string();
    a.ws = gw.ws.to_string();
    a.quic = gw.quic.to_string();
    a.gateway_pid = Some(std::process::id());
    a.token_secret = SECRET.into();
    a.admin_secret = ADMIN.into();
    a.no_write = true;
    a.source_ips = 2;
    a.senders = 2;
    a.rates = vec![40.0];
    a.step_secs = 1.0;
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadtest_scenarios_run_and_count() {
    let c = cluster().await;

    let r = run_scenario(args(&c, Scenario::OneToOne))
        .await
        .expect("1:1");
    let s = &r.steps[0];
    assert_eq!(
        (s.sent, s.acked, s.delivered, s.errors),
        (40, 40, 40, 0),
        "{s:?}"
    );
    assert_eq!(s.ack_latency.count, 40);
    assert_eq!(s.deliver_latency.count, 40);
    assert!(r.metrics["max_acked_per_s"] > 0.0);
    assert_eq!(r.charts.len(), 2);

    let mut a = args(&c, Scenario::Group);
    a.group_size = 5;
    let r = run_scenario(a).await.expect("group");
    let s = &r.steps[0];
    assert_eq!((s.acked, s.delivered), (40, 40 * 4), "{s:?}");

    let mut a = args(&c, Scenario::Room);
    a.conns = 6;
    let r = run_scenario(a).await.expect("room");
    let s = &r.steps[0];
    assert_eq!((s.acked, s.delivered), (40, 40 * (6 + 2)), "{s:?}");
    // Published by a backend over HTTP: no sender in the room, every answer a 2xx.
    let mut a = args(&c, Scenario::Room);
    a.conns = 6;
    a.publish = Publish::Http;
    let r = run_scenario(a).await.expect("room over HTTP");
    let s = &r.steps[0];
    assert_eq!(
        (s.sent, s.acked, s.delivered, s.errors),
        (40, 40, 40 * 6, 0),
        "{s:?}"
    );
    assert_eq!(s.ack_latency.count, 40);

    let mut a = args(&c, Scenario::Sync);
    a.messages = 120;
    a.iterations = 2;
    let r = run_scenario(a).await.expect("sync");
    assert_eq!(r.steps[0].delivered, 240);
    assert_eq!(r.steps[0].ack_latency.count, 2);

    // The run itself checks the list is complete (unread summing to every message) and the history
    // gap- and repeat-free; it fails otherwise.
    let mut a = args(&c, Scenario::Conversations);
    a.conversations = 7;
    a.messages = 120;
    a.iterations = 2;
    let r = run_scenario(a).await.expect("conversations");
    assert_eq!(r.steps[0].delivered, 14);
    assert_eq!(r.metrics["history_messages"], 121.0);
    // 121 messages in pages of 50: 3 pages per iteration.
    assert_eq!(r.steps[0].deliver_latency.count, 6);
    // After each listing, 5 peers send once more and the list is taken again (checked: those 5
    // first, the unread sum grown by 5).
    assert_eq!(r.metrics["list_changes"], 5.0);
    assert!(r.metrics["list_after_changes_ms_p50"] > 0.0);

    let mut a = args(&c, Scenario::Reconnect);
    a.conns = 8;
    a.messages = 2;
    let r = run_scenario(a).await.expect("reconnect");
    let s = &r.steps[0];
    assert_eq!((s.acked, s.delivered, s.errors), (8, 16, 0), "{s:?}");

    for t in [Transport::Tcp, Transport::Ws, Transport::Quic] {
        let mut a = args(&c, Scenario::Idle);
        a.transport = t;
        a.conns = 5;
        a.hold_secs = 1.0;
        let r = run_scenario(a).await.expect("idle");
        assert_eq!(r.metrics["connections"], 5.0, "{t:?}");
        assert_eq!(r.steps[0].errors, 0, "{t:?}");
    }
    c.stop().await;
}

/// The room scenario's class mix (issue 17): `--mix` sends exactly that share of each class, and the
/// per-class report counts what every viewer got: gifts and chat as messages, likes as frame counts,
/// chat left out by the room's display rate as `chat_skipped`; the gateway's own counters come from
/// its `/metrics`. Every (message, viewer) pair is accounted for, which a miscount on either side
/// would break.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadtest_room_reports_each_class() {
    let c = cluster().await;
    let metrics = format!("http://{}/metrics", c.ops_addr.expect("ops endpoint"));

    // No shaping: everything reaches everyone, likes as counts.
    let mut a = args(&c, Scenario::Room);
    a.conns = 6;
    a.rates = vec![100.0];
    a.mix = "high=20,chat=60,like=20".parse().expect("mix");
    a.metrics_url = Some(metrics.clone());
    let r = run_scenario(a).await.expect("room with a mix");
    let everyone = 6 + 2;
    let room = r.steps[0].room.as_ref().expect("per-class report");
    assert_eq!(room.mix, "high=20,chat=60,like=20");
    let (h, ch, l) = (
        &room.classes["high"],
        &room.classes["chat"],
        &room.classes["like"],
    );
    assert_eq!((h.sent, ch.sent, l.sent), (20, 60, 20), "{room:?}");
    assert_eq!((h.acked, ch.acked, l.acked), (20, 60, 20), "{room:?}");
    assert_eq!(
        (h.delivered, ch.delivered, l.delivered),
        (20 * everyone, 60 * everyone, 20 * everyone),
        "{room:?}"
    );
    assert_eq!(
        (h.shown_ratio, ch.shown_ratio, l.shown_ratio),
        (1.0, 1.0, 1.0)
    );
    assert_eq!(ch.told_skipped, Some(0));
    assert_eq!(
        (h.deliver_latency.count, ch.deliver_latency.count),
        (20 * everyone, 60 * everyone)
    );
    assert_eq!(room.frames_dropped, Some(0), "scraped from the gateway");
    assert_eq!((ch.server_sampled, ch.server_dropped), (Some(0), Some(0)));
    // Likes are not messages: the step's delivered count (as before classes) holds gifts and chat.
    assert_eq!(r.steps[0].delivered, 80 * everyone);
    assert_eq!(r.server["room_mix"], "high=20,chat=60,like=20");

    // A display rate of 5 chat msgs/s against 180/s of chat: viewers are shown a sample and told the
    // rest was skipped; every gift still reaches every viewer.
    let mut a = args(&c, Scenario::Room);
    a.conns = 4;
    a.rates = vec![200.0];
    a.mix = "high=10,chat=90".parse().expect("mix");
    a.chat_per_sec = 5;
    a.metrics_url = Some(metrics);
    let r = run_scenario(a).await.expect("shaped room");
    let everyone = 4 + 2;
    let room = r.steps[0].room.as_ref().expect("per-class report");
    let (h, ch, l) = (
        &room.classes["high"],
        &room.classes["chat"],
        &room.classes["like"],
    );
    assert_eq!((h.acked, ch.acked, l.sent), (20, 180, 0), "{room:?}");
    assert_eq!(
        h.delivered,
        20 * everyone,
        "every gift to everyone: {room:?}"
    );
    assert!(ch.shown_ratio < 0.5, "chat was sampled: {room:?}");
    assert_eq!(
        ch.delivered + ch.told_skipped.expect("chat skipped"),
        180 * everyone,
        "each chat message shown to a viewer or counted as skipped for it: {room:?}"
    );
    assert!(ch.server_sampled.expect("scraped") > 0, "{room:?}");
    assert_eq!(room.frames_dropped, Some(0));
    c.stop().await;
}

/// `--spawn distributed`: the tool starts `zhibo migrate`, a gateway, a logic worker and user-api as
/// processes on the test NATS, Redis and Cassandra (each with its own ops port), runs, and stops them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadtest_spawns_a_distributed_cluster() {
    let out = tempfile::tempdir().expect("tempdir");
    let mut a = BenchArgs::new(Scenario::OneToOne);
    a.spawn = SpawnMode::Distributed;
    a.zhibo_bin = env!("CARGO_BIN_EXE_zhibo").into();
    a.nats_url = zhibo_testkit::require_nats().await;
    a.redis_url = zhibo_testkit::require_redis().await;
    a.cql_node = zhibo_testkit::require_cql().await;
    a.keyspace = distributed_keyspace().await;
    a.out = out.path().to_path_buf();
    a.no_write = true;
    a.senders = 2;
    a.rates = vec![20.0];
    a.step_secs = 1.0;
    let r = run_scenario(a)
        .await
        .expect("1:1 on a spawned distributed cluster");
    let s = &r.steps[0];
    assert_eq!(
        (s.sent, s.acked, s.delivered, s.errors),
        (20, 20, 20, 0),
        "{s:?}"
    );
    assert_eq!(r.server["mode"], "distributed");
    // What a message cost, from the processes' and servers' counters (shared servers: other tests
    // add NATS and Redis traffic, so those are lower bounds; the CQL counts are this cluster's own).
    let cost = |k: &str| {
        r.metrics
            .get(k)
            .copied()
            .unwrap_or_else(|| panic!("no {k} in {:?}", r.metrics))
    };
    assert!(cost("cost.cql_ops") >= 1.0, "{:?}", r.metrics);
    assert!(
        cost("cost.redis_commands") >= 1.0,
        "a seq allocation per message"
    );
    assert!(
        cost("cost.nats_in") >= 2.0,
        "a command and a delivery per message"
    );
    assert!(cost("cost.cpu_us.gateway") > 0.0 && cost("cost.cpu_us.logic-worker") > 0.0);
    // Read from the workers' /metrics: rows (two inbox copies at least per 1:1 message) and the
    // worker's time, in total and by stage.
    assert!(cost("cost.cql.rows_written") >= 2.0, "{:?}", r.metrics);
    assert!(cost("worker_send_us_mean") > 0.0);
    for stage in ["authorize", "allocate", "store", "deliver"] {
        assert!(cost(&format!("worker_stage_us_mean.{stage}")) > 0.0);
    }
}

/// A spawned cluster whose process exits before it is ready fails the run with the log's path instead
/// of waiting for a server that will never answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadtest_fails_fast_when_a_spawned_process_exits() {
    let out = tempfile::tempdir().expect("tempdir");
    let mut a = BenchArgs::new(Scenario::OneToOne);
    a.spawn = SpawnMode::Dev;
    // Stands in for a server that dies at start (a port in use, a bad configuration).
    a.zhibo_bin = "/bin/false".into();
    a.out = out.path().to_path_buf();
    a.no_write = true;
    // Without the check the tool polls for 60 s and then blames readiness, not the dead process.
    let e = tokio::time::timeout(std::time::Duration::from_secs(30), run_scenario(a))
        .await
        .expect("the tool noticed the exit instead of waiting for readiness")
        .expect_err("the server cannot start");
    assert!(
        e.to_string()
            .contains("exited before the cluster was ready"),
        "{e:#}"
    );
}

/// `bench ceilings` measures the CQL ceiling too (plain inserts, LWT inserts, point reads on the test
/// node, in a scratch keyspace it drops): every figure comes back positive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ceilings_include_cql() {
    let out = tempfile::tempdir().expect("tempdir");
    let mut a = BenchArgs::new(Scenario::Ceilings);
    a.nats_url = zhibo_testkit::require_nats().await;
    a.redis_url = zhibo_testkit::require_redis().await;
    a.cql_node = zhibo_testkit::require_cql().await;
    a.out = out.path().to_path_buf();
    a.no_write = true;
    a.ceiling_secs = 0.2;
    let r = run_scenario(a).await.expect("ceilings");
    let c = r.ceilings.expect("ceilings measured");
    assert!(
        c.cql_insert_per_s > 0.0 && c.cql_lwt_per_s > 0.0 && c.cql_read_per_s > 0.0,
        "{c:?}"
    );
    // One insert at a time: a round trip is measured, its p99 no lower than its p50.
    assert!(
        c.cql_insert_latency.p50_us > 0
            && c.cql_insert_latency.p99_us >= c.cql_insert_latency.p50_us,
        "{c:?}"
    );
}
