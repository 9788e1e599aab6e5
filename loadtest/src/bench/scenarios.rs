//! The messaging scenarios: 1:1, group and room fan-out (open-loop rate sweeps), offline sync and the
//! reconnect storm. Idle memory is in [`super::idle`].

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{ReceiverType, SubscribeRoomInput, SyncInput};

use super::classes;
use super::cost;
use super::hist::{fmt_us, new_histogram, record, Latency};
use super::load::{self, LoadConn, Meter, SendTo};
use super::progress::Progress;
use super::report::{Chart, Report, Step};
use super::server::Target;
use super::setup;
use super::{BenchArgs, Publish, Scenario};
use crate::client::{Client, Credentials};
use crate::http::Api;

/// Requests in flight per sender connection before the generator sheds load (counted as errors).
const MAX_INFLIGHT: usize = 20_000;
/// Unanswered requests of the HTTP publisher at most (each may hold a connection of its own).
pub(super) const HTTP_MAX_INFLIGHT: usize = 256;

pub(super) fn progress(label: &str, meter: &Arc<Meter>, target: &Target) -> Progress {
    let pid = target.gateway_pid;
    Progress::start(label.into(), meter.counters.clone(), move || {
        pid.and_then(super::server::rss_kib).unwrap_or(0)
    })
}

/// Who sends in a [`sweep`].
pub(super) enum Senders<'a> {
    /// Connections, each sending where the function says (given its index and itself).
    Conns(&'a mut [LoadConn], &'a dyn Fn(usize, &LoadConn) -> SendTo),
    /// A backend over HTTP (room scenario, `--publish http`).
    Http(&'a load::HttpPublisher),
}

/// Runs the open-loop sweep: for each rate, every sender sends `rate / senders` per second for
/// `step_secs`; then waits (≤ 10 s) for the answers and the `fanout` deliveries per message.
pub(super) async fn sweep(
    args: &BenchArgs,
    target: &Target,
    meter: &Arc<Meter>,
    mut senders: Senders<'_>,
    fanout: u64,
    report: &mut Report,
) -> anyhow::Result<()> {
    // Room traffic is also counted per class (issue 17).
    let room = args.scenario == Scenario::Room;
    let dur = Duration::from_secs_f64(args.step_secs);
    for &rate in &args.rates {
        let before = meter.counters.snapshot();
        let classes_before = meter.classes.snapshot();
        let scraped_before = match room {
            true => target.scrape_shaping().await,
            false => None,
        };
        let _ = meter.take();
        let _ = meter.classes.take_latency();
        let cpu0 = target.cpu_secs();
        let start = Instant::now();
        match &mut senders {
            Senders::Http(p) => p
                .open_loop(rate, dur, args.payload, HTTP_MAX_INFLIGHT, meter)
                .await
                .context("HTTP publisher failed")?,
            Senders::Conns(conns, to) => {
                let per_conn = rate / conns.len() as f64;
                let targets: Vec<SendTo> =
                    conns.iter().enumerate().map(|(i, c)| to(i, c)).collect();
                let sends = conns.iter_mut().zip(targets).map(|(c, t)| {
                    load::open_loop(c, t, per_conn, dur, args.payload, MAX_INFLIGHT, meter)
                });
                for r in futures::future::join_all(sends).await {
                    r.context("sender connection failed")?;
                }
            }
        }
        let counters = meter.counters.clone();
        let mut last_change = Instant::now();
        let mut last = (0, 0);
        load::wait_until(Duration::from_secs(10), || {
            let now = counters.snapshot().since(&before);
            // Room traffic: every (message, viewer) pair ends as a message, a chat message the viewer
            // is told was skipped, or a counted like.
            let delivered = match room {
                true => meter.classes.snapshot().since(&classes_before).accounted(),
                false => now.delivered,
            };
            let done = now.acked + now.errors >= now.sent && delivered >= now.acked * fanout;
            if (delivered, now.acked) != last {
                last_change = Instant::now();
                last = (delivered, now.acked);
            }
            // Nothing moved for 2 s: what is missing will not come.
            done || last_change.elapsed() > Duration::from_secs(2)
        })
        .await;
        let elapsed = start.elapsed().as_secs_f64();
        let cpu = target.cpu_secs() - cpu0;
        let d = meter.counters.snapshot().since(&before);
        let (ack, deliver, s2d) = meter.take();
        let mut step = Step {
            offered_rate: rate,
            duration_s: elapsed,
            sent: d.sent,
            acked: d.acked,
            delivered: d.delivered,
            errors: d.errors,
            ack_rate: d.acked as f64 / elapsed,
            delivered_rate: d.delivered as f64 / elapsed,
            ack_latency: ack,
            deliver_latency: deliver,
            server_to_deliver: s2d,
            connections: d.connected,
            rss_kib: target.rss_kib(),
            server_cpu_cores: cpu / elapsed,
            room: None,
        };
        if room {
            let classes = meter.classes.snapshot().since(&classes_before);
            let latency = meter.classes.take_latency();
            let server = match scraped_before {
                // The gateway exports its room counters every 2 s.
                Some(before) => {
                    tokio::time::sleep(Duration::from_millis(2_500)).await;
                    target.scrape_shaping().await.map(|now| now.since(&before))
                }
                None => None,
            };
            step.room = Some(classes::room_step(
                &args.mix,
                &classes,
                latency,
                fanout,
                elapsed,
                server.as_ref(),
            ));
        }
        eprintln!(
            "\n  offered {rate:>8.0}/s: acked {:>9.0}/s delivered {:>10.0}/s errors {} server cpu {:.2} cores\n    send→ack     {}\n    send→deliver {}",
            step.ack_rate,
            step.delivered_rate,
            step.errors,
            step.server_cpu_cores,
            ack.line(),
            deliver.line()
        );
        if let Some(r) = &step.room {
            eprintln!("{}", classes::lines(r));
        }
        let saturated = step.ack_rate < 0.9 * rate;
        report.steps.push(step);
        if saturated && args.stop_at_saturation {
            report.notes.push(format!(
                "sweep stopped at {rate}/s: fewer than 90% of the offered messages were acknowledged"
            ));
            break;
        }
    }
    if let Some(e) = meter.first_error() {
        eprintln!("  first error answered by the server: {e}");
        report
            .notes
            .push(format!("first error answered by the server: {e}"));
    }
    latency_chart(report);
    Ok(())
}

fn latency_chart(report: &mut Report) {
    let pts = |f: &dyn Fn(&Step) -> f64| -> Vec<(f64, f64)> {
        report
            .steps
            .iter()
            .map(|s| (s.offered_rate, f(s)))
            .collect()
    };
    let chart = Chart {
        title: format!("{}: latency vs offered rate", report.scenario),
        x_label: "offered messages/s".into(),
        y_label: "latency, ms".into(),
        series: vec![
            (
                "send→ack p50".into(),
                pts(&|s| s.ack_latency.p50_us as f64 / 1e3),
            ),
            (
                "send→ack p99".into(),
                pts(&|s| s.ack_latency.p99_us as f64 / 1e3),
            ),
            (
                "send→deliver p50".into(),
                pts(&|s| s.deliver_latency.p50_us as f64 / 1e3),
            ),
            (
                "send→deliver p99".into(),
                pts(&|s| s.deliver_latency.p99_us as f64 / 1e3),
            ),
        ],
    };
    let rate = Chart {
        title: format!("{}: throughput vs offered rate", report.scenario),
        x_label: "offered messages/s".into(),
        y_label: "per second".into(),
        series: vec![
            ("acked/s".into(), pts(&|s| s.ack_rate)),
            ("delivered/s".into(), pts(&|s| s.delivered_rate)),
        ],
    };
    report.charts.push(chart);
    report.charts.push(rate);
}

fn headline(report: &mut Report) {
    let max_ack = report.steps.iter().map(|s| s.ack_rate).fold(0.0, f64::max);
    let max_del = report
        .steps
        .iter()
        .map(|s| s.delivered_rate)
        .fold(0.0, f64::max);
    report
        .metrics
        .insert("max_acked_per_s".into(), max_ack.round());
    report
        .metrics
        .insert("max_delivered_per_s".into(), max_del.round());
    // p99 at the largest offered rate that was at most half of the best throughput.
    if let Some(s) = report
        .steps
        .iter()
        .rfind(|s| s.offered_rate <= max_ack / 2.0 + 1.0)
    {
        report.metrics.insert(
            "p99_ack_ms_at_half_load".into(),
            s.ack_latency.p99_us as f64 / 1e3,
        );
        report.metrics.insert(
            "p99_deliver_ms_at_half_load".into(),
            s.deliver_latency.p99_us as f64 / 1e3,
        );
    }
}

/// Scenario 2: `senders` pairs; sender i sends to receiver i.
///
/// # Errors
/// When setup or a connection fails.
pub async fn one_to_one(
    args: &BenchArgs,
    target: &Target,
    report: &mut Report,
) -> anyhow::Result<()> {
    let n = args.senders.max(1);
    let people = setup::population(target, 2 * n, true).await?;
    let pairs: Vec<(Credentials, Credentials)> = people
        .chunks(2)
        .map(|c| (c[0].clone(), c[1].clone()))
        .collect();
    setup::befriend_pairs(target, &pairs).await;
    let meter = Arc::new(Meter::default());
    let addr = target.addr(args.transport);
    let senders_creds: Vec<Credentials> = pairs.iter().map(|p| p.0.clone()).collect();
    let receivers_creds: Vec<Credentials> = pairs.iter().map(|p| p.1.clone()).collect();
    let mut senders = load::connect_all(
        args.transport,
        addr,
        &senders_creds,
        args.source_ips,
        &meter,
    )
    .await?;
    let receivers = load::connect_all(
        args.transport,
        addr,
        &receivers_creds,
        args.source_ips,
        &meter,
    )
    .await?;
    let _p = progress("1:1", &meter, target);
    let rx: Vec<i64> = receivers.iter().map(|r| r.creds.user_id).collect();
    let probe = cost::Probe::start(args, target, &meter).await;
    sweep(
        args,
        target,
        &meter,
        Senders::Conns(&mut senders, &|i, _| SendTo {
            receiver_type: ReceiverType::User,
            receiver_id: rx[i],
            mix: None,
            first_attempt: args.first_attempt,
        }),
        1,
        report,
    )
    .await?;
    probe.finish(args, target, &meter, report).await;
    headline(report);
    report.notes.push(format!(
        "{n} sender connections pipelining to {n} receivers; every message is durable in both inboxes before its ACK"
    ));
    drop(receivers);
    Ok(())
}

/// Scenario 3: one group of `group_size` members, all connected; `senders` of them send.
///
/// # Errors
/// When setup or a connection fails.
pub async fn group(args: &BenchArgs, target: &Target, report: &mut Report) -> anyhow::Result<()> {
    let size = args.group_size.max(2);
    let members = setup::population(target, size, true).await?;
    let api = Api::new(&target.api);
    let ids: Vec<i64> = members[1..].iter().map(|m| m.user_id).collect();
    let g = api
        .post(
            "/v1/groups",
            Some(&members[0].token),
            json!({"name": "bench", "member_ids": ids}),
        )
        .await
        .context("create group")?;
    let group_id = g["group_id"].as_i64().context("group_id")?;
    // Members who are not the creator's friends are invited (user-api's default group-add policy):
    // they accept, as their apps would.
    let invited: Vec<i64> = g["invited"]
        .as_array()
        .map(|a| a.iter().filter_map(serde_json::Value::as_i64).collect())
        .unwrap_or_default();
    for m in members.iter().filter(|m| invited.contains(&m.user_id)) {
        api.post(
            &format!("/v1/groups/invitations/{group_id}/accept"),
            Some(&m.token),
            json!({}),
        )
        .await
        .context("accept group invitation")?;
    }
    let meter = Arc::new(Meter::default());
    let addr = target.addr(args.transport);
    let mut conns =
        load::connect_all(args.transport, addr, &members, args.source_ips, &meter).await?;
    let s = args.senders.clamp(1, size);
    let _p = progress("group", &meter, target);
    let probe = cost::Probe::start(args, target, &meter).await;
    sweep(
        args,
        target,
        &meter,
        Senders::Conns(&mut conns[..s], &|_, _| SendTo {
            receiver_type: ReceiverType::Group,
            receiver_id: group_id,
            mix: None,
            first_attempt: args.first_attempt,
        }),
        size as u64 - 1,
        report,
    )
    .await?;
    probe.finish(args, target, &meter, report).await;
    headline(report);
    report.metrics.insert("group_size".into(), size as f64);
    report.notes.push(format!(
        "group of {size}, {s} members sending; each message is stored in {size} inboxes and delivered to {} devices",
        size - 1
    ));
    Ok(())
}

/// Scenario 4: `conns` viewers in one room; `senders` connections send room messages.
///
/// # Errors
/// When setup or a connection fails.
pub async fn room(args: &BenchArgs, target: &Target, report: &mut Report) -> anyhow::Result<()> {
    let viewers_n = args.conns.max(1);
    let s = args.senders.max(1);
    let http = args.publish == Publish::Http;
    let senders_creds = match http {
        true => Vec::new(),
        false => setup::population(target, s, true).await?,
    };
    let viewer_creds = setup::population(target, viewers_n, false).await?;
    let room_id = setup::fresh_user_base();
    if args.chat_per_sec > 0 {
        Api::new(&target.api)
            .put_admin(
                &format!("/v1/admin/rooms/{room_id}/shaping"),
                &target.admin_secret,
                json!({ "chat_per_sec": args.chat_per_sec }),
            )
            .await
            .context("set the room's chat display rate")?;
    }
    let meter = Arc::new(Meter::default());
    let addr = target.addr(args.transport);
    let _p = progress("room", &meter, target);
    let mut viewers =
        load::connect_all(args.transport, addr, &viewer_creds, args.source_ips, &meter).await?;
    // Join, then wait for every SubscribeRoomOutput (counted as acks).
    let before = meter.counters.snapshot();
    for v in viewers.iter_mut() {
        v.send
            .feed(Body::SubscribeRoom(SubscribeRoomInput { room_id }))
            .await?;
        v.send.flush().await?;
    }
    let counters = meter.counters.clone();
    let n = viewers.len() as u64;
    load::wait_until(Duration::from_secs(30), || {
        let d = counters.snapshot().since(&before);
        d.acked + d.errors >= n
    })
    .await;
    let joined = meter.counters.snapshot().since(&before);
    if joined.errors > 0 {
        bail!("{} viewers could not join the room", joined.errors);
    }
    if joined.acked < n {
        bail!(
            "only {} of {n} viewers joined the room within 30 s",
            joined.acked
        );
    }
    let publisher = match http {
        true => Some(load::HttpPublisher::new(
            &target.api,
            &target.admin_secret,
            room_id,
        )?),
        false => None,
    };
    let mut senders = Vec::new();
    if !http {
        senders = load::connect_all(
            args.transport,
            addr,
            &senders_creds,
            args.source_ips,
            &meter,
        )
        .await?;
        // Senders are in the room too (a connection sends only to rooms it joined).
        let before = meter.counters.snapshot();
        for c in senders.iter_mut() {
            c.send
                .send(Body::SubscribeRoom(SubscribeRoomInput { room_id }))
                .await?;
        }
        let counters = meter.counters.clone();
        let sn = senders.len() as u64;
        load::wait_until(Duration::from_secs(30), || {
            let d = counters.snapshot().since(&before);
            d.acked + d.errors >= sn
        })
        .await;
    }
    let in_room = if http { viewers_n } else { viewers_n + s };
    let to_room = |_: usize, _: &LoadConn| SendTo {
        receiver_type: ReceiverType::Room,
        receiver_id: room_id,
        mix: Some(args.mix),
        first_attempt: false,
    };
    sweep(
        args,
        target,
        &meter,
        match &publisher {
            Some(p) => Senders::Http(p),
            None => Senders::Conns(&mut senders, &to_room),
        },
        in_room as u64,
        report,
    )
    .await?;
    room_metrics(args, report, viewers_n);
    report.notes.push(match http {
        true => format!(
            "{viewers_n} viewers in the room; messages published through user-api's admin route over HTTP (class chat: --mix and --senders do not apply; send→ack = the HTTP answer; at most {HTTP_MAX_INFLIGHT} unanswered); deliveries = room messages received by viewers (frames batch several messages); server CPU is the whole spawned process"
        ),
        false => format!(
            "{viewers_n} viewers plus {s} sender connections, all in the room; deliveries = room messages received by viewers (frames batch several messages); server CPU is the whole spawned process"
        ),
    });
    report.notes.push(
        "step.room: per class (mix of the sent messages), sent / acked / delivered, shown_ratio = delivered / (acked × everyone in the room), told_skipped = RoomMessages.chat_skipped summed over viewers, likes delivered = RoomMessages.likes summed over viewers; server_* and frames_dropped from the gateway's /metrics when known".into(),
    );
    Ok(())
}

/// The room scenario's headline and metrics: the best step's deliveries per second and per server
/// core, the viewers, the class mix and display rate.
pub(super) fn room_metrics(args: &BenchArgs, report: &mut Report, viewers_n: usize) {
    headline(report);
    let best = report
        .steps
        .iter()
        .max_by(|a, b| a.delivered_rate.total_cmp(&b.delivered_rate))
        .cloned()
        .unwrap_or_default();
    report.metrics.insert("viewers".into(), viewers_n as f64);
    report
        .server
        .insert("room_mix".into(), args.mix.to_string());
    if args.chat_per_sec > 0 {
        report
            .server
            .insert("room_chat_per_sec".into(), args.chat_per_sec.to_string());
    }
    report
        .metrics
        .insert("deliveries_per_s".into(), best.delivered_rate.round());
    if best.server_cpu_cores > 0.0 {
        report.metrics.insert(
            "deliveries_per_s_per_server_core".into(),
            (best.delivered_rate / best.server_cpu_cores).round(),
        );
    }
}

/// Sends `count` messages from `from` to `to_user`, pipelined, and waits for every ACK.
pub(super) async fn fill_inbox(
    addr: &str,
    args: &BenchArgs,
    from: &Credentials,
    to_user: i64,
    count: usize,
) -> anyhow::Result<()> {
    let (client, _) = Client::connect_from(args.transport, addr, from, None, None).await?;
    let (mut send, mut recv) = client.into_parts();
    let reader = tokio::spawn(async move {
        let mut ok = 0usize;
        while ok < count {
            match recv.next().await? {
                Some(p) => match p.body {
                    Some(Body::SendMessageOutput(_)) => ok += 1,
                    Some(Body::Error(e)) => bail!("send refused: {e:?}"),
                    _ => {}
                },
                None => bail!("closed after {ok} acks"),
            }
        }
        anyhow::Ok(())
    });
    for i in 0..count {
        send.feed(Body::SendMessage(zhibo_proto::client::SendMessageInput {
            receiver_type: ReceiverType::User as i32,
            receiver_id: to_user,
            client_msg_id: format!("fill{to_user}-{i}"),
            content_type: 1,
            content: load::timed_content(load::now_ns(), args.payload),
            first_attempt: args.first_attempt,
            ..Default::default()
        }))
        .await?;
        if i % 64 == 63 {
            send.flush().await?;
        }
    }
    send.flush().await?;
    tokio::time::timeout(Duration::from_secs(120), reader)
        .await
        .context("filling the inbox took over 120 s")???;
    Ok(())
}

/// Syncs everything after `seq` on `client`; returns the messages received.
async fn sync_all(client: &mut Client, mut seq: u64) -> anyhow::Result<u64> {
    let mut got = 0u64;
    loop {
        let p = client
            .request(
                Body::Sync(SyncInput { seq, limit: 500 }),
                Duration::from_secs(30),
            )
            .await?;
        match p.body {
            Some(Body::SyncOutput(out)) => {
                got += out.messages.len() as u64;
                if let Some(last) = out.messages.last() {
                    seq = last.seq;
                }
                if !out.has_more || out.messages.is_empty() {
                    return Ok(got);
                }
            }
            other => bail!("sync answered {other:?}"),
        }
    }
}

/// Scenario 5: a user with `messages` stored messages syncs them on a fresh connection, `iterations`
/// times (pages of 500).
///
/// # Errors
/// When setup, a connection or a sync fails.
pub async fn sync(args: &BenchArgs, target: &Target, report: &mut Report) -> anyhow::Result<()> {
    let people = setup::population(target, 2, true).await?;
    let (sender, reader) = (&people[0], &people[1]);
    setup::befriend_pairs(target, &[(sender.clone(), reader.clone())]).await;
    let addr = target.addr(args.transport);
    let fill = Instant::now();
    fill_inbox(addr, args, sender, reader.user_id, args.messages).await?;
    report.metrics.insert(
        "fill_msgs_per_s".into(),
        (args.messages as f64 / fill.elapsed().as_secs_f64()).round(),
    );
    let mut sync_h = new_histogram();
    let mut full_h = new_histogram();
    let mut series = Vec::new();
    let mut got_total = 0u64;
    for i in 0..args.iterations.max(1) {
        let t0 = Instant::now();
        let (mut client, _) =
            Client::connect_from(args.transport, addr, reader, None, None).await?;
        let t1 = Instant::now();
        let got = sync_all(&mut client, 0).await?;
        let sync_us = t1.elapsed().as_micros() as u64;
        record(&mut sync_h, sync_us);
        record(&mut full_h, t0.elapsed().as_micros() as u64);
        series.push((i as f64 + 1.0, sync_us as f64 / 1e3));
        got_total += got;
        if got < args.messages as u64 {
            bail!("synced {got} of {} messages", args.messages);
        }
        let _ = client.close().await;
    }
    let sync_l = Latency::of(&sync_h);
    let full_l = Latency::of(&full_h);
    eprintln!(
        "  sync of {} messages: {}\n  connect + sign-in + sync: {}",
        args.messages,
        sync_l.line(),
        full_l.line()
    );
    report.steps.push(Step {
        sent: args.iterations as u64,
        acked: args.iterations as u64,
        delivered: got_total,
        ack_latency: sync_l,
        deliver_latency: full_l,
        ..Step::default()
    });
    report
        .metrics
        .insert("messages".into(), args.messages as f64);
    report
        .metrics
        .insert("sync_ms_p50".into(), sync_l.p50_us as f64 / 1e3);
    report
        .metrics
        .insert("sync_ms_p99".into(), sync_l.p99_us as f64 / 1e3);
    report
        .metrics
        .insert("sync_ms_max".into(), sync_l.max_us as f64 / 1e3);
    report
        .metrics
        .insert("connect_and_sync_ms_p50".into(), full_l.p50_us as f64 / 1e3);
    report.charts.push(Chart {
        title: format!("offline sync of {} messages (pages of 500)", args.messages),
        x_label: "iteration".into(),
        y_label: "sync time, ms".into(),
        series: vec![("SyncInput → last SyncOutput".into(), series)],
    });
    report.notes.push(format!(
        "step.ack_latency = sync time (first SyncInput → last page), step.deliver_latency = connect + sign-in + sync; p50 {}",
        fmt_us(sync_l.p50_us)
    ));
    Ok(())
}

/// Scenario 6: `conns` clients connected; all drop at once; each gets `messages` (capped at 10) while
/// offline; all reconnect at once, sign in and sync. Time until every one is signed in and synced.
///
/// # Errors
/// When setup fails.
pub async fn reconnect(
    args: &BenchArgs,
    target: &Target,
    report: &mut Report,
) -> anyhow::Result<()> {
    let n = args.conns.max(1);
    let mut people = setup::population(target, n + 1, true).await?;
    let sender = people.pop().context("sender")?;
    let meter = Arc::new(Meter::default());
    let addr = target.addr(args.transport).to_owned();
    let _p = progress("reconnect", &meter, target);
    let conns = load::connect_all(args.transport, &addr, &people, args.source_ips, &meter).await?;
    let rss_connected = target.rss_kib();
    eprintln!("\n  {n} connected; dropping all");
    drop(conns);
    load::wait_until(Duration::from_secs(10), || {
        meter.counters.connected.load(Ordering::Relaxed) == 0
    })
    .await;
    // While they are offline, each gets messages to sync.
    let per = args.messages.clamp(1, 10);
    let (client, _) = Client::connect_from(args.transport, &addr, &sender, None, None).await?;
    let (mut send, mut recv) = client.into_parts();
    let total = per * n;
    let acks = tokio::spawn(async move {
        let mut ok = 0usize;
        while ok < total {
            match recv.next().await {
                Ok(Some(p))
                    if matches!(
                        p.body,
                        Some(Body::SendMessageOutput(_)) | Some(Body::Error(_))
                    ) =>
                {
                    ok += 1
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        ok
    });
    for (i, p) in people.iter().enumerate() {
        for k in 0..per {
            send.feed(Body::SendMessage(zhibo_proto::client::SendMessageInput {
                receiver_type: ReceiverType::User as i32,
                receiver_id: p.user_id,
                client_msg_id: format!("storm{i}-{k}"),
                content_type: 1,
                content: load::timed_content(load::now_ns(), args.payload),
                first_attempt: args.first_attempt,
                ..Default::default()
            }))
            .await?;
        }
        if i % 32 == 31 {
            send.flush().await?;
        }
    }
    send.flush().await?;
    let acked = tokio::time::timeout(Duration::from_secs(120), acks).await??;
    drop(send);
    eprintln!("  {acked} offline messages stored; reconnecting all {n} at once");
    let start = Instant::now();
    let signed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let synced = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let endpoints = load::quic_endpoints(args.transport, args.source_ips)?;
    let sampler = {
        let (signed, synced) = (signed.clone(), synced.clone());
        tokio::spawn(async move {
            let mut pts = Vec::new();
            loop {
                let t = start.elapsed().as_secs_f64() * 1e3;
                let (a, b) = (
                    signed.load(Ordering::Relaxed),
                    synced.load(Ordering::Relaxed),
                );
                pts.push((t, a as f64, b as f64));
                if b >= n as u64 || t > 120_000.0 {
                    return pts;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let mut tasks = tokio::task::JoinSet::new();
    let mut sign_h = new_histogram();
    let mut sync_h = new_histogram();
    for (i, c) in people.into_iter().enumerate() {
        let addr = addr.clone();
        let ep = (!endpoints.is_empty()).then(|| endpoints[i % endpoints.len()].clone());
        let source = setup::source_ip(i, args.source_ips);
        let (signed, synced, transport) = (signed.clone(), synced.clone(), args.transport);
        let counters = meter.counters.clone();
        tasks.spawn(async move {
            let deadline = start + Duration::from_secs(120);
            let mut backoff = Duration::from_millis(50);
            loop {
                let attempt = async {
                    let (mut client, _) =
                        Client::connect_from(transport, &addr, &c, source, ep.as_ref()).await?;
                    let t_signed = start.elapsed();
                    signed.fetch_add(1, Ordering::Relaxed);
                    let got = sync_all(&mut client, 0).await?;
                    anyhow::Ok((client, t_signed, start.elapsed(), got))
                };
                match attempt.await {
                    Ok((client, a, b, got)) => {
                        synced.fetch_add(1, Ordering::Relaxed);
                        counters.acked.fetch_add(1, Ordering::Relaxed);
                        counters.delivered.fetch_add(got, Ordering::Relaxed);
                        return Some((client, a, b));
                    }
                    Err(_) if Instant::now() < deadline => {
                        counters.errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                    Err(_) => return None,
                }
            }
        });
    }
    let mut clients = Vec::with_capacity(n);
    let mut failed = 0u64;
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Some((client, a, b))) => {
                record(&mut sign_h, a.as_micros() as u64);
                record(&mut sync_h, b.as_micros() as u64);
                clients.push(client);
            }
            _ => failed += 1,
        }
    }
    let all = start.elapsed();
    let pts = sampler.await.unwrap_or_default();
    let sign_l = Latency::of(&sign_h);
    let sync_l = Latency::of(&sync_h);
    let retries = meter.counters.errors.load(Ordering::Relaxed);
    eprintln!(
        "\n  all {} reconnected and synced in {:.0} ms ({failed} failed, {retries} retried attempts)\n    signed in at: {}\n    synced at:    {}",
        clients.len(),
        all.as_secs_f64() * 1e3,
        sign_l.line(),
        sync_l.line()
    );
    report.steps.push(Step {
        duration_s: all.as_secs_f64(),
        sent: n as u64,
        acked: clients.len() as u64,
        delivered: meter.counters.delivered.load(Ordering::Relaxed),
        errors: failed,
        ack_latency: sign_l,
        deliver_latency: sync_l,
        connections: clients.len() as u64,
        rss_kib: rss_connected,
        ..Step::default()
    });
    report.metrics.insert("clients".into(), n as f64);
    report
        .metrics
        .insert("all_signed_in_ms".into(), sign_l.max_us as f64 / 1e3);
    report
        .metrics
        .insert("all_synced_ms".into(), sync_l.max_us as f64 / 1e3);
    report.metrics.insert("failed".into(), failed as f64);
    report
        .metrics
        .insert("retried_attempts".into(), retries as f64);
    report.charts.push(Chart {
        title: format!("reconnect storm: {n} clients"),
        x_label: "ms since the storm began".into(),
        y_label: "clients".into(),
        series: vec![
            ("signed in".into(), pts.iter().map(|p| (p.0, p.1)).collect()),
            (
                "signed in and synced".into(),
                pts.iter().map(|p| (p.0, p.2)).collect(),
            ),
        ],
    });
    report.notes.push(format!(
        "every client reconnects at the same instant (retrying with backoff from 50 ms), then syncs {per} offline message(s); step.ack_latency = time to signed in, step.deliver_latency = time to synced"
    ));
    drop(clients);
    Ok(())
}
