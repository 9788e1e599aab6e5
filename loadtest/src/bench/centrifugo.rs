//! Centrifugo as the server under test (`--spawn centrifugo`): the room scenario run side by side
//! with zhibo by the same generator, so a comparison is made on the same box on the same day (issue
//! 17's Centrifugo column was measured on another day, and this box's speed moves from day to day).
//!
//! The setup is issue 17's: Centrifugo's memory engine and defaults, one channel, WebSocket viewers
//! speaking its JSON protocol (anonymous connect, then subscribe), messages published by a backend
//! through its HTTP server API (`POST /api/publish`). Each publication's data carries the same timed
//! content as a zhibo room message (the intended send time, padded to `--payload` bytes,
//! base64-encoded), and the viewers count and time deliveries into the same [`Meter`], so the
//! report is the room scenario's.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::process::Command;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use zhibo_proto::client::Message;

use super::load::{self, HttpPublisher, Meter};
use super::report::Report;
use super::server::Target;
use super::setup;
use super::{BenchArgs, Publish};
use crate::client::Transport;

/// The channel every viewer subscribes to.
const CHANNEL: &str = "bench-room";
/// Viewers connecting at once.
const CONNECT_CONCURRENCY: usize = 128;
/// The viewers' WebSocket read buffer: the same as zhibo's Rust client (`client/src/conn.rs`), so
/// the generator spends the same on both servers.
const WS_READ_BUFFER: usize = 8 * 1024;

/// Starts `args.centrifugo_bin` on a free loopback port with the benchmark's configuration (memory
/// engine and defaults, anonymous connections may subscribe, an API key) and waits for its health
/// check.
///
/// # Errors
/// When it cannot start or does not become healthy within 30 s.
pub async fn spawn(args: &BenchArgs) -> anyhow::Result<Target> {
    std::fs::create_dir_all(&args.out)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let key = format!("bench-{:016x}", rand::random::<u64>());
    let config = serde_json::json!({
        "http_server": { "address": "127.0.0.1", "port": port },
        "client": {
            "allow_anonymous_connect_without_token": true,
            "allowed_origins": ["*"],
        },
        "channel": {
            "without_namespace": {
                "allow_subscribe_for_anonymous": true,
                "allow_subscribe_for_client": true,
            },
        },
        "http_api": { "key": key },
        "health": { "enabled": true },
        "log": { "level": "warn" },
    });
    let config_path = args.out.join("centrifugo.json");
    std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
    let log_path = args.out.join("server.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("create {}", log_path.display()))?;
    let mut child = Command::new(&args.centrifugo_bin)
        .arg("--config")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {}", args.centrifugo_bin.display()))?;
    let api = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "centrifugo exited before it was ready ({status}); see {}",
                log_path.display()
            );
        }
        let healthy = http
            .get(format!("{api}/health"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if healthy {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "centrifugo was not healthy within 30 s; see {}",
                log_path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(Target::spawned_other(
        "centrifugo",
        api,
        format!("127.0.0.1:{port}"),
        key,
        child,
    ))
}

/// One line of what Centrifugo sends (its JSON protocol, several per WebSocket message): a reply to
/// a command (`id`, `error`), a push (a publication), or `{}`, a ping to answer with `{}`.
#[derive(Debug, Deserialize)]
struct Reply {
    #[serde(default)]
    id: u32,
    error: Option<serde_json::Value>,
    push: Option<Push>,
}

#[derive(Debug, Deserialize)]
struct Push {
    #[serde(rename = "pub")]
    publication: Option<Publication>,
}

#[derive(Debug, Deserialize)]
struct Publication {
    data: Data,
}

#[derive(Debug, Deserialize)]
struct Data {
    c: String,
}

/// Connects one viewer from `source`, connects it anonymously and subscribes it to [`CHANNEL`]; its
/// reader then counts publications as room deliveries (one frame per WebSocket message) and answers
/// pings. The subscribe reply counts as an ACK, a refused one as an error.
async fn viewer(
    server: SocketAddr,
    source: Option<std::net::IpAddr>,
    meter: Arc<Meter>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    if let Some(ip) = source {
        socket.bind((ip, 0).into())?;
    }
    let tcp = socket.connect(server).await?;
    tcp.set_nodelay(true)?;
    let url = format!("ws://{server}/connection/websocket");
    let config = WebSocketConfig::default().read_buffer_size(WS_READ_BUFFER);
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(url, tcp, Some(config)).await?;
    ws.send(WsMessage::text(format!(
        "{{\"id\":1,\"connect\":{{}}}}\n{{\"id\":2,\"subscribe\":{{\"channel\":\"{CHANNEL}\"}}}}"
    )))
    .await?;
    meter.counters.connected.fetch_add(1, Ordering::Relaxed);
    Ok(tokio::spawn(async move {
        let c = &meter.counters;
        while let Some(Ok(frame)) = ws.next().await {
            let text = match &frame {
                WsMessage::Text(t) => t.as_str(),
                WsMessage::Close(_) => break,
                _ => continue,
            };
            let mut delivered = 0;
            let mut pong = false;
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                match read_line(line) {
                    Line::Subscribed => {
                        c.acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Line::Publication(content) => {
                        let m = Message {
                            content: content.into(),
                            content_type: 1,
                            ..Message::default()
                        };
                        meter.delivered(&m, true);
                        delivered += 1;
                    }
                    Line::Ping => pong = true,
                    Line::Other => {}
                    Line::Failed(what) => {
                        c.errors.fetch_add(1, Ordering::Relaxed);
                        note_error(&meter, what);
                    }
                }
            }
            if delivered > 0 {
                meter.classes.frame(delivered, 0, 0);
            }
            if pong && ws.send(WsMessage::text("{}")).await.is_err() {
                break;
            }
        }
        c.connected.fetch_sub(1, Ordering::Relaxed);
    }))
}

/// What one line from Centrifugo means to a viewer.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// The reply to the subscribe command.
    Subscribed,
    /// A publication: its content (decoded from `data.c`).
    Publication(Vec<u8>),
    /// A ping (`{}`), to answer with `{}`.
    Ping,
    /// Another reply (the connect command's).
    Other,
    /// A refused command or a line that cannot be read.
    Failed(String),
}

fn read_line(line: &str) -> Line {
    let reply: Reply = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => return Line::Failed(format!("unreadable reply {line:?}: {e}")),
    };
    if let Some(e) = reply.error {
        return Line::Failed(format!("command {} refused: {e}", reply.id));
    }
    if let Some(p) = reply.push.and_then(|p| p.publication) {
        return match base64::engine::general_purpose::STANDARD.decode(&p.data.c) {
            Ok(content) => Line::Publication(content),
            Err(e) => Line::Failed(format!("publication data {:?}: {e}", p.data.c)),
        };
    }
    match reply.id {
        0 => Line::Ping,
        2 => Line::Subscribed,
        _ => Line::Other,
    }
}

fn note_error(meter: &Meter, what: String) {
    meter
        .first_error
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert(what);
}

/// The room scenario against Centrifugo: `--conns` WebSocket viewers subscribed to one channel,
/// messages published over its HTTP API, the same open-loop sweep and report as zhibo's
/// `--publish http` room.
///
/// # Errors
/// When the options are not the ones this setup supports, or the viewers cannot connect and
/// subscribe.
pub async fn room(args: &BenchArgs, target: &Target, report: &mut Report) -> anyhow::Result<()> {
    if args.publish != Publish::Http || args.transport != Transport::Ws {
        bail!("Centrifugo is measured with WebSocket viewers and HTTP publishing only: pass --transport ws --publish http");
    }
    if args.chat_per_sec > 0 || args.mix.weights[0] + args.mix.weights[2] > 0 {
        bail!("Centrifugo has no message classes or display rate: leave --mix and --chat-per-sec at their defaults");
    }
    let viewers_n = args.conns.max(1);
    let meter = Arc::new(Meter::default());
    let _p = super::scenarios::progress("room", &meter, target);
    let server: SocketAddr = target.ws.parse()?;
    let before = meter.counters.snapshot();
    let readers: Vec<_> = futures::stream::iter(0..viewers_n)
        .map(|i| viewer(server, setup::source_ip(i, args.source_ips), meter.clone()))
        .buffered(CONNECT_CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()
        .context("connect a viewer to centrifugo")?;
    let counters = meter.counters.clone();
    let n = viewers_n as u64;
    load::wait_until(Duration::from_secs(30), || {
        let d = counters.snapshot().since(&before);
        d.acked + d.errors >= n
    })
    .await;
    let joined = meter.counters.snapshot().since(&before);
    if joined.errors > 0 || joined.acked < n {
        bail!(
            "{} of {n} viewers subscribed within 30 s ({} refused; first error: {:?})",
            joined.acked,
            joined.errors,
            meter.first_error()
        );
    }
    let publisher = HttpPublisher::centrifugo(&target.api, &target.admin_secret, CHANNEL)?;
    super::scenarios::sweep(
        args,
        target,
        &meter,
        super::scenarios::Senders::Http(&publisher),
        n,
        report,
    )
    .await?;
    for r in readers {
        r.abort();
    }
    super::scenarios::room_metrics(args, report, viewers_n);
    report.notes.push(format!(
        "Centrifugo (memory engine, defaults): {viewers_n} WebSocket viewers subscribed anonymously to one channel over its JSON protocol; messages published through its HTTP API (POST /api/publish, at most {} unanswered; send→ack = the HTTP answer); each publication's data carries the timed content base64-encoded; deliveries = publications received by viewers (frames = WebSocket messages); server CPU is the whole centrifugo process",
        super::scenarios::HTTP_MAX_INFLIGHT
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lines of Centrifugo's JSON protocol a viewer meets, as v6 writes them.
    #[test]
    fn reads_centrifugo_lines() {
        assert_eq!(
            read_line(
                r#"{"id":1,"connect":{"client":"c1","version":"6.9.1","ping":25,"pong":true}}"#
            ),
            Line::Other
        );
        assert_eq!(read_line(r#"{"id":2,"subscribe":{}}"#), Line::Subscribed);
        assert_eq!(
            read_line(r#"{"push":{"channel":"bench-room","pub":{"data":{"c":"AAEC"}}}}"#),
            Line::Publication(vec![0, 1, 2])
        );
        assert_eq!(read_line("{}"), Line::Ping);
        assert!(matches!(
            read_line(r#"{"id":2,"error":{"code":103,"message":"permission denied"}}"#),
            Line::Failed(e) if e.contains("permission denied")
        ));
        assert!(matches!(read_line("not json"), Line::Failed(_)));
        assert!(matches!(
            read_line(r#"{"push":{"channel":"x","pub":{"data":{"c":"!!"}}}}"#),
            Line::Failed(_)
        ));
    }
}
