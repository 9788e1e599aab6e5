//! Scenario 7 (issue #13): a user's conversation list and one conversation's history pages.
//!
//! Setup: `--conversations` peers each send the subject one message (admin API, no friendship needed),
//! then one of them sends `--messages` more (over the socket) so that conversation has a long history.
//! Measured `--iterations` times on one signed-in connection of the subject:
//! - the whole list (`ConversationListInput`, pages of 500, newest first) — checked complete (one row
//!   per peer, unread summing to every message sent);
//! - the whole history of the long conversation, backwards by pages of 50 (`HistoryInput{before}`) —
//!   checked gap- and repeat-free (conv seqs `total, total-1, …, 1`);
//! - the list over HTTP (`GET /v1/conversations?limit=500`, following `next_cursor`);
//! - the whole list again after `--list-changes` other peers each sent one more message (admin API,
//!   ACKed before the list starts): what a user sees reopening the app — checked that those
//!   conversations come first and the unread sum grew by as many.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use futures::{StreamExt, TryStreamExt};
use serde_json::json;
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{
    ConversationListInput, ConversationListOutput, ConversationRef, HistoryInput, HistoryOutput,
    ReceiverType,
};

use super::hist::{new_histogram, record, Latency};
use super::report::{Chart, Report, Step};
use super::server::Target;
use super::{scenarios, setup, BenchArgs};
use crate::client::{Client, Credentials};
use crate::http::Api;

/// Rows per list page (the server's maximum).
const LIST_PAGE: u32 = 500;
/// Messages per history page (the "history page of 50").
const HISTORY_PAGE: u32 = 50;
/// How long one request may take before the run fails.
const WAIT: Duration = Duration::from_secs(30);
/// Admin sends in flight while seeding.
const SEED_CONCURRENCY: usize = 32;

/// Every row of the subject's list over the socket, page by page; records each page's time.
async fn list_all(
    client: &mut Client,
    page_h: &mut hdrhistogram::Histogram<u64>,
) -> anyhow::Result<Vec<zhibo_proto::client::Conversation>> {
    let mut rows = Vec::new();
    let mut input = ConversationListInput {
        limit: LIST_PAGE,
        ..ConversationListInput::default()
    };
    loop {
        let t = Instant::now();
        let p = client.request(Body::ConversationList(input), WAIT).await?;
        record(page_h, t.elapsed().as_micros() as u64);
        let out: ConversationListOutput = match p.body {
            Some(Body::ConversationListOutput(o)) => o,
            other => bail!("conversation list answered {other:?}"),
        };
        let last = out.conversations.last().cloned();
        rows.extend(out.conversations);
        match (out.has_more, last) {
            (true, Some(last)) => {
                input.after = last.conversation;
                input.after_activity_ms = last.last_message.map_or(0, |m| m.server_time_ms);
            }
            _ => return Ok(rows),
        }
    }
}

/// The conversation's conv seqs, newest first, page by page backwards; records each page's time.
async fn history_back(
    client: &mut Client,
    peer: i64,
    page_h: &mut hdrhistogram::Histogram<u64>,
) -> anyhow::Result<Vec<u64>> {
    let conversation = Some(ConversationRef {
        r#type: ReceiverType::User as i32,
        id: peer,
    });
    let mut seqs = Vec::new();
    let mut before = 0;
    loop {
        let input = HistoryInput {
            conversation,
            before,
            after: 0,
            limit: HISTORY_PAGE,
        };
        let t = Instant::now();
        let p = client.request(Body::History(input), WAIT).await?;
        record(page_h, t.elapsed().as_micros() as u64);
        let out: HistoryOutput = match p.body {
            Some(Body::HistoryOutput(o)) => o,
            other => bail!("history answered {other:?}"),
        };
        seqs.extend(out.messages.iter().map(|m| m.conv_seq));
        match out.messages.last() {
            Some(m) if out.has_more => before = m.conv_seq,
            _ => return Ok(seqs),
        }
    }
}

/// The number of rows of the subject's list over HTTP, following `next_cursor`.
async fn http_list_all(api: &Api, token: &str) -> anyhow::Result<usize> {
    let mut rows = 0;
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/conversations?limit={LIST_PAGE}&cursor={c}"),
            None => format!("/v1/conversations?limit={LIST_PAGE}"),
        };
        let page = api.get(&path, token).await?;
        rows += page["conversations"]
            .as_array()
            .context("conversations in the list")?
            .len();
        if page["has_more"].as_bool() != Some(true) {
            return Ok(rows);
        }
        cursor = Some(
            page["next_cursor"]
                .as_str()
                .context("next_cursor on a full page")?
                .to_owned(),
        );
    }
}

/// Each peer sends the subject one message through the admin API.
async fn seed(target: &Target, subject: i64, peers: &[Credentials]) -> anyhow::Result<()> {
    seed_round(target, subject, peers, 0).await
}

/// Each of `peers` sends the subject one message (its `round`th extra) through the admin API.
async fn seed_round(
    target: &Target,
    subject: i64,
    peers: &[Credentials],
    round: usize,
) -> anyhow::Result<()> {
    let api = Api::new(&target.api);
    futures::stream::iter(peers)
        .map(|p| {
            let api = api.clone();
            async move {
                api.post_admin(
                    "/v1/admin/messages",
                    &target.admin_secret,
                    json!({
                        "from_user_id": p.user_id,
                        "receiver_type": "user",
                        "receiver_id": subject,
                        "client_msg_id": format!("conv-seed-{}-{round}", p.user_id),
                        "content_type": 1,
                        "content": STANDARD.encode(format!("hello from {}", p.user_id)),
                    }),
                )
                .await
                .context("admin send")
            }
        })
        .buffer_unordered(SEED_CONCURRENCY)
        .try_for_each(|_| async { Ok(()) })
        .await
}

/// Scenario 7: see the module docs.
///
/// # Errors
/// When setup fails, a request fails, or a list / history is incomplete or out of order.
pub async fn run(args: &BenchArgs, target: &Target, report: &mut Report) -> anyhow::Result<()> {
    let n = args.conversations.max(1);
    let people = setup::population(target, n + 1, true).await?;
    let (subject, peers) = (&people[0], &people[1..]);
    let t = Instant::now();
    seed(target, subject.user_id, peers).await?;
    let long = &peers[0];
    setup::befriend_pairs(target, &[(long.clone(), subject.clone())]).await;
    scenarios::fill_inbox(
        target.addr(args.transport),
        args,
        long,
        subject.user_id,
        args.messages,
    )
    .await?;
    let total = args.messages as u64 + 1;
    report.metrics.insert(
        "seed_s".into(),
        (t.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    );

    let (mut client, _) = Client::connect_from(
        args.transport,
        target.addr(args.transport),
        subject,
        None,
        None,
    )
    .await?;
    let api = Api::new(&target.api);
    let (mut list_h, mut list_page_h) = (new_histogram(), new_histogram());
    let (mut hist_h, mut http_h) = (new_histogram(), new_histogram());
    let (mut changed_h, mut extra) = (new_histogram(), 0u64);
    // The peers whose conversations change between listings: never the long one.
    let movers = &peers[1..];
    let per_round = args.list_changes.min(movers.len());
    let mut series = Vec::new();
    for i in 0..args.iterations.max(1) {
        let t = Instant::now();
        let rows = list_all(&mut client, &mut list_page_h).await?;
        let list_us = t.elapsed().as_micros() as u64;
        record(&mut list_h, list_us);
        ensure!(
            rows.len() == n,
            "listed {} of {n} conversations",
            rows.len()
        );
        let unread: u64 = rows.iter().map(|r| r.unread).sum();
        ensure!(
            unread == n as u64 + args.messages as u64 + extra,
            "unread sums to {unread}, expected {}",
            n as u64 + args.messages as u64 + extra
        );

        let seqs = history_back(&mut client, long.user_id, &mut hist_h).await?;
        ensure!(
            seqs.iter().copied().eq((1..=total).rev()),
            "history of {} messages has a gap or a repeat ({} returned)",
            total,
            seqs.len()
        );

        let t = Instant::now();
        let http_rows = http_list_all(&api, &subject.token).await?;
        record(&mut http_h, t.elapsed().as_micros() as u64);
        ensure!(
            http_rows == n,
            "HTTP listed {http_rows} of {n} conversations"
        );
        series.push((i as f64 + 1.0, list_us as f64 / 1e3));

        if per_round > 0 {
            let start = (i * per_round) % movers.len();
            let round: Vec<Credentials> = movers
                .iter()
                .cycle()
                .skip(start)
                .take(per_round)
                .cloned()
                .collect();
            seed_round(target, subject.user_id, &round, i + 1).await?;
            extra += per_round as u64;
            let t = Instant::now();
            let rows = list_all(&mut client, &mut list_page_h).await?;
            record(&mut changed_h, t.elapsed().as_micros() as u64);
            ensure!(
                rows.len() == n,
                "listed {} of {n} conversations after changes",
                rows.len()
            );
            let unread: u64 = rows.iter().map(|r| r.unread).sum();
            ensure!(
                unread == n as u64 + args.messages as u64 + extra,
                "unread sums to {unread} after changes, expected {}",
                n as u64 + args.messages as u64 + extra
            );
            let mut top: Vec<i64> = rows[..per_round]
                .iter()
                .filter_map(|r| r.conversation.as_ref().map(|c| c.id))
                .collect();
            let mut want: Vec<i64> = round.iter().map(|p| p.user_id).collect();
            top.sort_unstable();
            want.sort_unstable();
            ensure!(
                top == want,
                "the changed conversations are not first: {top:?}, expected {want:?}"
            );
        }
    }
    let _ = client.close().await;

    let list = Latency::of(&list_h);
    let page = Latency::of(&list_page_h);
    let hist = Latency::of(&hist_h);
    let http = Latency::of(&http_h);
    let changed = Latency::of(&changed_h);
    eprintln!(
        "  list of {n} conversations (socket): {}\n  list after {per_round} changed: {}\n  list page of {LIST_PAGE}: {}\n  history page of {HISTORY_PAGE}: {}\n  list over HTTP: {}",
        list.line(),
        changed.line(),
        page.line(),
        hist.line(),
        http.line()
    );
    report.steps.push(Step {
        sent: args.iterations as u64,
        acked: args.iterations as u64,
        delivered: (n * args.iterations) as u64,
        ack_latency: list,
        deliver_latency: hist,
        ..Step::default()
    });
    for (name, l) in [
        ("list", &list),
        ("list_page", &page),
        ("history_page", &hist),
        ("http_list", &http),
        ("list_after_changes", &changed),
    ] {
        report
            .metrics
            .insert(format!("{name}_ms_p50"), l.p50_us as f64 / 1e3);
        report
            .metrics
            .insert(format!("{name}_ms_p99"), l.p99_us as f64 / 1e3);
    }
    report.metrics.insert("conversations".into(), n as f64);
    report
        .metrics
        .insert("list_changes".into(), per_round as f64);
    report
        .metrics
        .insert("history_messages".into(), total as f64);
    report.charts.push(Chart {
        title: format!("conversation list of {n} (pages of {LIST_PAGE}) over the socket"),
        x_label: "iteration".into(),
        y_label: "list time, ms".into(),
        series: vec![("all pages".into(), series)],
    });
    report.notes.push(format!(
        "step.ack_latency = the whole list of {n} conversations over the socket; step.deliver_latency = one history page of {HISTORY_PAGE} ({} pages per iteration)",
        total.div_ceil(u64::from(HISTORY_PAGE))
    ));
    Ok(())
}
