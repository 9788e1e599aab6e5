//! The load engine: connections split into a reader task and a pipelined writer, open-loop senders (a
//! fixed arrival rate, each message stamped with its *intended* send time so a stalled server cannot hide
//! latency: no coordinated omission), and receivers that time deliveries.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use hdrhistogram::Histogram;
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{Heartbeat, Message, ReceiverType, RoomClass, SendMessageInput};

use super::classes::{self, ClassMeter, ClassMix};
use super::hist::{new_histogram, record, Latency};
use super::progress::Counters;
use super::setup::source_ip;
use crate::client::{Client, Credentials, RecvHalf, SendHalf, Transport};

/// Nanoseconds since the Unix epoch on a monotonic base (the wall clock read once per process), so
/// processes on one machine share a time line and none goes backwards.
pub fn now_ns() -> u64 {
    static BASE: std::sync::OnceLock<(u64, Instant)> = std::sync::OnceLock::new();
    let (wall, mono) = BASE.get_or_init(|| {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        (wall, Instant::now())
    });
    wall + mono.elapsed().as_nanos() as u64
}

/// Histograms of one scenario, swapped out at the end of every step.
#[derive(Debug)]
pub struct Meter {
    /// Counters (also shown by the progress line).
    pub counters: Arc<Counters>,
    ack: Mutex<Histogram<u64>>,
    deliver: Mutex<Histogram<u64>>,
    server_to_deliver: Mutex<Histogram<u64>>,
    pub(super) first_error: Mutex<Option<String>>,
    /// Room traffic per class (issue 17): sent, acknowledged, received, frames' counts.
    pub classes: ClassMeter,
}

impl Default for Meter {
    fn default() -> Self {
        Meter {
            counters: Arc::default(),
            ack: Mutex::new(new_histogram()),
            deliver: Mutex::new(new_histogram()),
            server_to_deliver: Mutex::new(new_histogram()),
            first_error: Mutex::new(None),
            classes: ClassMeter::default(),
        }
    }
}

fn take(h: &Mutex<Histogram<u64>>) -> Latency {
    let mut h = h.lock().unwrap_or_else(|e| e.into_inner());
    let l = Latency::of(&h);
    h.reset();
    l
}

impl Meter {
    /// A meter bumping `counters` (shared with a progress line).
    pub fn with_counters(counters: Arc<Counters>) -> Self {
        Meter {
            counters,
            ..Meter::default()
        }
    }

    /// The first error the server answered, if any (`code: message`).
    pub fn first_error(&self) -> Option<String> {
        self.first_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The three latency summaries since the last call (ack, deliver, server → deliver); resets them.
    pub fn take(&self) -> (Latency, Latency, Latency) {
        (
            take(&self.ack),
            take(&self.deliver),
            take(&self.server_to_deliver),
        )
    }

    /// A message arrived (`room`: in a room frame, counted per class too).
    pub(super) fn delivered(&self, m: &Message, room: bool) {
        self.counters.delivered.fetch_add(1, Ordering::Relaxed);
        let now = now_ns();
        let mut latency_us = None;
        if m.content.len() >= 8 {
            let sent = u64::from_be_bytes(m.content[..8].try_into().unwrap_or_default());
            if sent > 0 && sent <= now {
                let us = (now - sent) / 1_000;
                latency_us = Some(us);
                record(
                    &mut self.deliver.lock().unwrap_or_else(|e| e.into_inner()),
                    us,
                );
            }
        }
        if room {
            self.classes.delivered(m.content_type, latency_us);
        }
        let server_us = u64::try_from(m.server_time_ms).unwrap_or(0) * 1_000;
        let now_us = now / 1_000;
        if server_us > 0 && server_us <= now_us {
            record(
                &mut self
                    .server_to_deliver
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()),
                now_us - server_us,
            );
        }
    }
}

/// Intended send time (ns) of each request in flight on one connection, and the class of a room
/// message (counted per class when acknowledged).
pub type Pending = Arc<Mutex<HashMap<u64, (u64, Option<RoomClass>)>>>;

/// The content of a timed message: the intended send time, then padding up to `size` bytes.
pub fn timed_content(intended_ns: u64, size: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(size.max(8));
    b.put_u64(intended_ns);
    b.resize(size.max(8), b'z');
    b.freeze()
}

/// A connection used by the load engine: its writer, and the requests in flight that its reader task
/// resolves.
#[derive(Debug)]
pub struct LoadConn {
    /// Whose connection.
    pub creds: Credentials,
    /// The write half.
    pub send: SendHalf,
    /// Requests awaiting their answer.
    pub pending: Pending,
    /// Next `client_msg_id` number.
    pub next_msg: u64,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for LoadConn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Reads packets until the connection ends: answers resolve `pending` (ack latency), messages and room
/// frames count as deliveries (deliver latency).
async fn read_loop(mut recv: RecvHalf, pending: Pending, meter: Arc<Meter>) {
    let c = &meter.counters;
    while let Ok(Some(p)) = recv.next().await {
        match p.body {
            Some(Body::SendMessageOutput(_))
            | Some(Body::SyncOutput(_))
            | Some(Body::SubscribeRoomOutput(_)) => {
                let sent = pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&p.request_id);
                c.acked.fetch_add(1, Ordering::Relaxed);
                if let Some((_, Some(class))) = sent {
                    meter.classes.acked(class);
                }
                if let Some((sent, _)) = sent {
                    let us = now_ns().saturating_sub(sent) / 1_000;
                    record(&mut meter.ack.lock().unwrap_or_else(|e| e.into_inner()), us);
                }
            }
            Some(Body::Error(e)) => {
                meter
                    .first_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert_with(|| {
                        let code = zhibo_proto::client::ErrorCode::try_from(e.code)
                            .unwrap_or(zhibo_proto::client::ErrorCode::Unspecified);
                        format!("{code:?}: {}", e.message)
                    });
                pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&p.request_id);
                c.errors.fetch_add(1, Ordering::Relaxed);
            }
            Some(Body::Message(m)) => meter.delivered(&m, false),
            Some(Body::RoomMessages(r)) => {
                let mut n = 0;
                for m in &r.messages {
                    if m.content_type >= 0 {
                        meter.delivered(m, true);
                        n += 1;
                    }
                }
                meter.classes.frame(n, r.likes, r.chat_skipped);
            }
            _ => {}
        }
    }
    c.connected.fetch_sub(1, Ordering::Relaxed);
}

/// Connects and signs in `creds` over `transport`, then splits the connection.
///
/// # Errors
/// When the connection or sign-in fails.
pub async fn connect(
    transport: Transport,
    addr: &str,
    creds: Credentials,
    source: Option<std::net::IpAddr>,
    endpoint: Option<&quinn::Endpoint>,
    meter: &Arc<Meter>,
) -> anyhow::Result<LoadConn> {
    let (client, _) = Client::connect_from(transport, addr, &creds, source, endpoint).await?;
    meter.counters.connected.fetch_add(1, Ordering::Relaxed);
    let (send, recv) = client.into_parts();
    let pending = Pending::default();
    let reader = tokio::spawn(read_loop(recv, pending.clone(), meter.clone()));
    Ok(LoadConn {
        creds,
        send,
        pending,
        next_msg: 1,
        reader,
    })
}

/// Connects every identity (`concurrency` at a time), spreading source addresses over `source_ips`.
///
/// # Errors
/// When any connection fails.
pub async fn connect_all(
    transport: Transport,
    addr: &str,
    creds: &[Credentials],
    source_ips: usize,
    meter: &Arc<Meter>,
) -> anyhow::Result<Vec<LoadConn>> {
    let endpoints = quic_endpoints(transport, source_ips)?;
    let conns = futures::stream::iter(creds.iter().cloned().enumerate())
        .map(|(i, c)| {
            let ep = (!endpoints.is_empty()).then(|| &endpoints[i % endpoints.len()]);
            connect(transport, addr, c, source_ip(i, source_ips), ep, meter)
        })
        .buffered(128)
        .collect::<Vec<_>>()
        .await;
    conns.into_iter().collect()
}

/// One QUIC endpoint (UDP socket) per source address, shared by that address's connections.
///
/// # Errors
/// When a socket cannot be bound.
pub fn quic_endpoints(
    transport: Transport,
    source_ips: usize,
) -> anyhow::Result<Vec<quinn::Endpoint>> {
    if transport != Transport::Quic {
        return Ok(Vec::new());
    }
    (0..source_ips.max(1))
        .map(|i| {
            let ip = source_ip(i, source_ips).unwrap_or([127, 0, 0, 1].into());
            crate::client::insecure_quic_endpoint((ip, 0).into()).map_err(anyhow::Error::from)
        })
        .collect()
}

/// What a sender sends.
#[derive(Debug, Clone, Copy)]
pub struct SendTo {
    /// User, group or room.
    pub receiver_type: ReceiverType,
    /// Its id.
    pub receiver_id: i64,
    /// Room sends: the class mix (each message's `room_class` and `content_type`); `None` = plain chat
    /// without a class (1:1, group).
    pub mix: Option<ClassMix>,
    /// `SendMessageInput.first_attempt` of every send.
    pub first_attempt: bool,
}

/// Sends on `conn` at `rate` messages per second for `dur` (open loop), each message stamped with its
/// intended send time; stops sending while more than `max_inflight` requests are unanswered (counted as
/// errors: the server is past saturation). Sends a heartbeat every 20 s of the step.
///
/// # Errors
/// When the connection fails.
pub async fn open_loop(
    conn: &mut LoadConn,
    to: SendTo,
    rate: f64,
    dur: Duration,
    payload: usize,
    max_inflight: usize,
    meter: &Meter,
) -> anyhow::Result<()> {
    if rate <= 0.0 {
        return Ok(());
    }
    let start_ns = now_ns();
    let start = Instant::now();
    let total = (rate * dur.as_secs_f64()).round() as u64;
    let mut done = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_beat = Instant::now();
    let mut picker = to.mix.map(|m| m.picker());
    while done < total {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * rate) as u64 + 1).min(total);
        let mut fed = false;
        while done < due {
            let intended = start_ns + (done as f64 * 1e9 / rate) as u64;
            done += 1;
            if conn.pending.lock().unwrap_or_else(|e| e.into_inner()).len() >= max_inflight {
                meter.counters.errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let n = conn.next_msg;
            conn.next_msg += 1;
            let class = picker.as_mut().map(classes::ClassPicker::next_class);
            let mut input = SendMessageInput {
                receiver_type: to.receiver_type as i32,
                receiver_id: to.receiver_id,
                client_msg_id: format!("b{n}"),
                content_type: class.map_or(1, classes::content_type),
                content: timed_content(intended, payload),
                first_attempt: to.first_attempt,
                ..Default::default()
            };
            input.set_room_class(class.unwrap_or(RoomClass::Chat));
            let id = conn.send.feed(Body::SendMessage(input)).await?;
            conn.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, (intended, class));
            meter.counters.sent.fetch_add(1, Ordering::Relaxed);
            if let Some(c) = class {
                meter.classes.sent(c);
            }
            fed = true;
        }
        if last_beat.elapsed() > Duration::from_secs(20) {
            conn.send.feed(Body::Heartbeat(Heartbeat {})).await?;
            last_beat = Instant::now();
            fed = true;
        }
        if fed {
            conn.send.flush().await?;
        }
    }
    Ok(())
}

/// Room messages published by a backend through user-api's admin route
/// (`POST /v1/admin/rooms/{id}/messages`, class chat): the room scenario's `--publish http`; or, with
/// [`HttpPublisher::centrifugo`], through Centrifugo's server API.
pub struct HttpPublisher {
    http: reqwest::Client,
    url: String,
    /// The header that authorizes a request, and its value.
    auth: (&'static str, String),
    /// Centrifugo's channel (`None`: zhibo's admin route).
    channel: Option<String>,
}

impl HttpPublisher {
    /// A publisher to `room_id` of the user-api at `api` (`http://host:port`).
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(api: &str, admin_secret: &str, room_id: i64) -> anyhow::Result<Self> {
        Ok(HttpPublisher {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
            url: format!("{api}/v1/admin/rooms/{room_id}/messages"),
            auth: ("x-admin-secret", admin_secret.to_owned()),
            channel: None,
        })
    }

    /// A publisher to Centrifugo's `channel` through its server API at `api` (`POST /api/publish`,
    /// `X-API-Key`); the content goes base64-encoded as the publication's `data.c`.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn centrifugo(api: &str, key: &str, channel: &str) -> anyhow::Result<Self> {
        Ok(HttpPublisher {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
            url: format!("{api}/api/publish"),
            auth: ("x-api-key", key.to_owned()),
            channel: Some(channel.to_owned()),
        })
    }

    /// Publishes at `rate` messages per second for `dur` (open loop: each request is stamped with its
    /// intended send time and runs on its own task), at most `max_inflight` unanswered (past that a
    /// message is counted as an error, not sent). A 2xx answer counts as the ACK.
    ///
    /// # Errors
    /// Never for a refused request (counted); only if a request task panics.
    pub async fn open_loop(
        &self,
        rate: f64,
        dur: Duration,
        payload: usize,
        max_inflight: usize,
        meter: &Arc<Meter>,
    ) -> anyhow::Result<()> {
        use base64::Engine as _;
        if rate <= 0.0 {
            return Ok(());
        }
        let start_ns = now_ns();
        let start = Instant::now();
        let total = (rate * dur.as_secs_f64()).round() as u64;
        let inflight = Arc::new(tokio::sync::Semaphore::new(max_inflight));
        let mut tasks = tokio::task::JoinSet::new();
        let mut done = 0u64;
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        while done < total {
            tick.tick().await;
            let due = ((start.elapsed().as_secs_f64() * rate) as u64 + 1).min(total);
            while done < due {
                let intended = start_ns + (done as f64 * 1e9 / rate) as u64;
                done += 1;
                let Ok(permit) = inflight.clone().try_acquire_owned() else {
                    meter.counters.errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                meter.counters.sent.fetch_add(1, Ordering::Relaxed);
                meter.classes.sent(RoomClass::Chat);
                let content = base64::engine::general_purpose::STANDARD
                    .encode(timed_content(intended, payload));
                let body = match &self.channel {
                    None => serde_json::json!({
                        "content_type": 1,
                        "content": content,
                        "class": "chat",
                    }),
                    Some(channel) => serde_json::json!({
                        "channel": channel,
                        "data": { "c": content },
                    }),
                };
                let request = self
                    .http
                    .post(&self.url)
                    .header(self.auth.0, &self.auth.1)
                    .json(&body);
                let meter = meter.clone();
                let centrifugo = self.channel.is_some();
                tasks.spawn(async move {
                    let answer = match request.send().await {
                        Ok(r) if r.status().is_success() => match r.bytes().await {
                            // Centrifugo answers its errors with 200 and an `error` object.
                            Ok(b) if centrifugo && b.windows(7).any(|w| w == b"\"error\"") => {
                                Err(String::from_utf8_lossy(&b).into_owned())
                            }
                            Ok(_) => Ok(()),
                            Err(e) => Err(e.to_string()),
                        },
                        Ok(r) => Err(format!("HTTP {}", r.status())),
                        Err(e) => Err(e.to_string()),
                    };
                    drop(permit);
                    match answer {
                        Ok(()) => {
                            meter.counters.acked.fetch_add(1, Ordering::Relaxed);
                            meter.classes.acked(RoomClass::Chat);
                            let us = now_ns().saturating_sub(intended) / 1_000;
                            record(&mut meter.ack.lock().unwrap_or_else(|e| e.into_inner()), us);
                        }
                        Err(what) => {
                            meter.counters.errors.fetch_add(1, Ordering::Relaxed);
                            meter
                                .first_error
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .get_or_insert(what);
                        }
                    }
                });
            }
            // Reap finished requests as we go (a long step would otherwise hold every handle).
            while tasks.try_join_next().transpose()?.is_some() {}
        }
        while tasks.join_next().await.transpose()?.is_some() {}
        Ok(())
    }
}

/// Waits until `done()` or `limit` passes, checking every 10 ms.
pub async fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    done()
}

/// Keeps idle connections alive: a heartbeat on each every `every` until the task is aborted. A
/// connection whose heartbeat fails is dropped from `conns` (its writer must not be polled again).
pub fn heartbeats(
    conns: Arc<tokio::sync::Mutex<Vec<LoadConn>>>,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            // Taken out of the list, so connections made meanwhile are not held up behind the pass.
            let batch = std::mem::take(&mut *conns.lock().await);
            let mut alive = Vec::with_capacity(batch.len());
            for mut c in batch {
                let beat = c.send.send(Body::Heartbeat(Heartbeat {}));
                // A peer that takes nothing for this long is as good as gone.
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(5), beat).await {
                    alive.push(c);
                }
            }
            conns.lock().await.extend(alive);
        }
    })
}
