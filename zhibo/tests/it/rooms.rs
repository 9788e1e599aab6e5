//! Live rooms end to end, embedded and distributed (two gateways on real NATS, Cassandra, Redis).
//!
//! These tests build their own cluster (same roles as `cluster.rs`) because they read each gateway's
//! [`Hub`] counters (room subscriptions, dropped room frames) and, embedded, the in-process bus.

use std::future::ready;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use zhibo::{Backends, Bound, Config, StoreKind};
use zhibo_bus::memory::MemoryBus;
use zhibo_gateway::Hub;
use zhibo_loadtest::client::{Client, Credentials, Transport};
use zhibo_loadtest::http::Api;
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{
    ErrorCode, Message, ReceiverType, RoomMessages, RoomNotice, SendMessageInput,
    SubscribeRoomInput, SubscribeRoomOutput, UnsubscribeRoomInput,
};

use crate::cluster::{eventually, subject_prefix, wait_until_serving, GatewayAddrs, ADMIN, SECRET};

const WAIT: Duration = Duration::from_secs(10);

struct RoomCluster {
    api: Api,
    api_base: String,
    /// (addresses, hub) per gateway.
    gateways: Vec<(GatewayAddrs, Arc<Hub>)>,
    /// The in-process bus (embedded) and its subject count with no client connected.
    bus: Option<(MemoryBus, usize)>,
    shutdown: CancellationToken,
    nodes: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl Drop for RoomCluster {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn config() -> Config {
    let mut c = Config {
        token_secret: SECRET.into(),
        grace_secs: 10,
        ..Config::default()
    };
    c.bus.subject_prefix = subject_prefix().into();
    let any = "127.0.0.1:0".parse().expect("addr");
    (c.gateway.tcp_addr, c.gateway.ws_addr, c.gateway.quic_addr) = (any, any, any);
    c.gateway.rate_per_sec = 5000.0;
    c.gateway.rate_burst = 10000.0;
    c.gateway.room_send_per_sec = 5000.0;
    c.gateway.room_send_burst = 10000.0;
    c.gateway.room_batch_ms = 20;
    c.gateway.room_presence_ms = 200;
    // The default queue: a smaller one drops frames for a viewer whose connection task is merely
    // starved on a loaded machine (CI saw 27 of 30 messages), and the slow-viewer test floods until
    // drops happen whatever the size.
    c.gateway.room_queue = 64;
    c.gateway.room_recent = 20;
    c.logic.room_recent = 20;
    c.logic.max_room_content = 16 * 1024;
    c.api_addr = any;
    c.api.admin_secret = ADMIN.into();
    // Every test client registers its devices from 127.0.0.1: one address for the whole suite.
    c.api.devices_per_hour = 100_000;
    c
}

async fn gateway(
    config: &Config,
    backends: &Backends,
    shutdown: &CancellationToken,
) -> (GatewayAddrs, Arc<Hub>, JoinHandle<anyhow::Result<()>>) {
    let listeners = zhibo_gateway::Listeners::bind(&config.gateway)
        .await
        .expect("bind gateway");
    let (tcp, ws, quic) = listeners.addrs().expect("addrs");
    let addrs = GatewayAddrs { tcp, ws, quic };
    let hub = Hub::with_rooms(
        config.gateway.resolved_gateway_id(),
        backends.bus.clone(),
        config.gateway.room_config(),
    );
    let deps = zhibo_gateway::Deps {
        bus: backends.bus.clone(),
        devices: backends.stores.devices.clone(),
        rooms: backends.stores.rooms.clone(),
        key: Arc::new(zhibo_auth::TokenKey::new(SECRET)),
        metrics: Arc::new(zhibo_telemetry::Metrics::new()),
        presence: backends.presence.clone(),
    };
    let task = tokio::spawn(zhibo_gateway::serve(
        hub.clone(),
        config.gateway.clone(),
        listeners,
        deps,
        shutdown.clone(),
        Duration::from_secs(2),
    ));
    (addrs, hub, task)
}

async fn api_and_logic(
    config: &Config,
    backends: Backends,
    shutdown: &CancellationToken,
    api: bool,
) -> (Option<String>, JoinHandle<anyhow::Result<()>>) {
    let (listener, base) = if api {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind api");
        let base = format!("http://{}", l.local_addr().expect("addr"));
        (Some(l), Some(base))
    } else {
        (None, None)
    };
    let bound = Bound {
        gateway: None,
        api: listener,
        logic: true,
        ops: None,
    };
    let task = tokio::spawn(zhibo::run(
        config.clone(),
        backends,
        bound,
        shutdown.clone(),
    ));
    (base, task)
}

impl RoomCluster {
    async fn embedded() -> RoomCluster {
        let config = config();
        let bus = MemoryBus::new();
        let backend =
            Arc::new(zhibo_store::embedded::EmbeddedBackend::temporary().expect("in-memory store"));
        let backends = Backends {
            bus: Arc::new(bus.clone()),
            stores: backend.stores(),
            outbox: None,
            presence: Arc::new(zhibo_store::presence::MemoryPresence::new()),
        };
        let shutdown = CancellationToken::new();
        let (addrs, hub, gw) = gateway(&config, &backends, &shutdown).await;
        let (base, node) = api_and_logic(&config, backends, &shutdown, true).await;
        let base = base.expect("api");
        let api = Api::new(base.clone());
        // Every subscription of the node is made once a command goes round.
        wait_until_serving(&api, &[addrs.of(Transport::Tcp)]).await;
        eventually("the probe connection is gone", WAIT, || {
            ready((hub.connection_count() == 0 && hub.user_count() == 0).then_some(()))
        })
        .await;
        let baseline = bus.subject_count();
        RoomCluster {
            api,
            api_base: base,
            gateways: vec![(addrs, hub)],
            bus: Some((bus, baseline)),
            shutdown,
            nodes: vec![gw, node],
        }
    }

    async fn distributed() -> RoomCluster {
        let mut config = config();
        config.bus.nats_url = zhibo_testkit::require_nats_account().await;
        config.store.redis_url = zhibo_testkit::require_redis().await;
        config.store.kind = StoreKind::Scylla;
        config.store.cql_nodes = vec![zhibo_testkit::require_cql().await];
        config.store.keyspace = crate::cluster::distributed_keyspace().await;
        let shutdown = CancellationToken::new();
        let mut nodes = Vec::new();
        let mut gateways = Vec::new();
        for i in 0..2 {
            let mut c = config.clone();
            c.gateway.gateway_id = format!(
                "rooms-{}-{}-{i}",
                std::process::id(),
                crate::cluster::cluster_number()
            );
            let backends = zhibo::connect(&c, "rooms-gateway").await.expect("backends");
            let (addrs, hub, task) = gateway(&c, &backends, &shutdown).await;
            gateways.push((addrs, hub));
            nodes.push(task);
        }
        let mut base = None;
        for i in 0..2 {
            let backends = zhibo::connect(&config, "rooms-logic")
                .await
                .expect("backends");
            let (b, task) = api_and_logic(&config, backends, &shutdown, i == 0).await;
            base = base.or(b);
            nodes.push(task);
        }
        let base = base.expect("api");
        let api = Api::new(base.clone());
        let tcp: Vec<String> = gateways.iter().map(|(a, _)| a.of(Transport::Tcp)).collect();
        wait_until_serving(&api, &tcp).await;
        RoomCluster {
            api,
            api_base: base,
            gateways,
            bus: None,
            shutdown,
            nodes,
        }
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        for n in self.nodes.drain(..) {
            n.await.expect("node task").expect("node ran cleanly");
        }
    }

    fn hub(&self, gw: usize) -> &Arc<Hub> {
        &self.gateways[gw % self.gateways.len()].1
    }

    async fn user(&self, name: &str) -> Credentials {
        let device = self.api.register_device("android").await.expect("device");
        let unique = zhibo_testkit::unique_name("r").replace('_', "");
        let username = format!("{name}{}", &unique[unique.len().saturating_sub(12)..]);
        self.api
            .sign_up_and_in(&username, "correct horse battery", device)
            .await
            .expect("sign up and in")
    }

    async fn connect(&self, gw: usize, creds: &Credentials) -> Client {
        self.connect_over(Transport::Tcp, gw, creds).await
    }

    async fn connect_over(&self, t: Transport, gw: usize, creds: &Credentials) -> Client {
        let addr = self.gateways[gw % self.gateways.len()].0.of(t);
        Client::connect(t, &addr, creds).await.expect("connect").0
    }

    /// A user-api request with a JSON body and one authentication header.
    async fn http(
        &self,
        method: Method,
        path: &str,
        auth: (&str, &str),
        body: Value,
    ) -> (u16, Value) {
        crate::cluster::http(&self.api_base, method, path, auth, body).await
    }
}

async fn join(c: &mut Client, room_id: i64) -> Result<SubscribeRoomOutput, ErrorCode> {
    let p = c
        .request(Body::SubscribeRoom(SubscribeRoomInput { room_id }), WAIT)
        .await
        .expect("join reply");
    match p.body {
        Some(Body::SubscribeRoomOutput(o)) => Ok(o),
        Some(Body::Error(e)) => Err(ErrorCode::try_from(e.code).expect("code")),
        other => panic!("expected SubscribeRoomOutput, got {other:?}"),
    }
}

async fn leave(c: &mut Client, room_id: i64) {
    c.send(Body::UnsubscribeRoom(UnsubscribeRoomInput { room_id }))
        .await
        .expect("leave");
    // A request answered after it: the leave has been applied.
    c.request(Body::Heartbeat(Default::default()), WAIT)
        .await
        .expect("heartbeat");
}

fn room_msg(room_id: i64, content_type: i32, body: impl Into<Bytes>) -> Body {
    Body::SendMessage(SendMessageInput {
        receiver_type: ReceiverType::Room as i32,
        receiver_id: room_id,
        client_msg_id: String::new(),
        content_type,
        content: body.into(),
        ..Default::default()
    })
}

async fn say(c: &mut Client, room_id: i64, text: &str) -> Result<u64, ErrorCode> {
    let p = c
        .request(room_msg(room_id, 1, text.to_owned()), WAIT)
        .await
        .expect("send reply");
    match p.body {
        Some(Body::SendMessageOutput(o)) => {
            assert_eq!(o.seq, 0, "room messages have no seq");
            Ok(o.message_id)
        }
        Some(Body::Error(e)) => Err(ErrorCode::try_from(e.code).expect("code")),
        other => panic!("expected SendMessageOutput, got {other:?}"),
    }
}

/// The next RoomMessages frame of `room_id` (other packets, and frames of other rooms, are skipped: a
/// broadcast, room 0, from a test running concurrently on the same bus reaches every connection).
async fn next_frame_of(c: &mut Client, room_id: i64, wait: Duration) -> Option<RoomMessages> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let f = next_frame(c, left).await?;
        if f.room_id == room_id {
            return Some(f);
        }
    }
}

/// The next RoomMessages frame (other packets are skipped).
async fn next_frame(c: &mut Client, wait: Duration) -> Option<RoomMessages> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.recv(left).await {
            Ok(Some(p)) => {
                if let Some(Body::RoomMessages(r)) = p.body {
                    return Some(r);
                }
            }
            _ => return None,
        }
    }
}

/// Collects room messages of `room_id` with application content types until `n` arrived.
async fn collect(c: &mut Client, room_id: i64, n: usize) -> Vec<Message> {
    let mut got = Vec::new();
    while got.len() < n {
        let f = next_frame_of(c, room_id, WAIT)
            .await
            .unwrap_or_else(|| panic!("only {} of {n} room messages arrived", got.len()));
        got.extend(f.messages.into_iter().filter(|m| m.content_type >= 0));
    }
    got
}

fn texts(ms: &[Message]) -> Vec<String> {
    ms.iter()
        .map(|m| String::from_utf8_lossy(&m.content).into_owned())
        .collect()
}

fn room_id() -> i64 {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as i64;
    (n & 0x1f_ffff_ffff_ffff) | 1
}

/// Viewers on both gateways get every message in order, over each transport (the room writes every
/// viewer's frames itself, `direct`); a late joiner gets the recent history; the online count
/// converges; leaving stops traffic; the last viewer's leave unsubscribes the gateway.
async fn fan_out_history_count_and_leave(cluster: &RoomCluster) {
    let room = room_id();
    let sender = cluster.user("sender").await;
    let v0 = cluster.user("v0").await;
    let v1 = cluster.user("v1").await;
    let late = cluster.user("late").await;
    let mut s = cluster.connect(0, &sender).await;
    let mut a = cluster.connect_over(Transport::Quic, 0, &v0).await;
    let mut b = cluster.connect_over(Transport::Ws, 1, &v1).await;
    for c in [&mut s, &mut a, &mut b] {
        join(c, room).await.expect("join");
    }
    for gw in 0..cluster.gateways.len() {
        assert_eq!(cluster.hub(gw).room_subscription_count(), 1);
    }
    // Refused sends: not joined, content over the limit, a reserved content type.
    let mut stranger = cluster.connect(1, &late).await;
    assert_eq!(
        say(&mut stranger, room, "x").await,
        Err(ErrorCode::InvalidArgument)
    );
    let big = s
        .request(room_msg(room, 1, vec![0u8; 16 * 1024 + 1]), WAIT)
        .await
        .expect("reply");
    assert!(
        matches!(big.body, Some(Body::Error(e)) if e.code == ErrorCode::InvalidArgument as i32)
    );
    let reserved = s
        .request(room_msg(room, -1, "x"), WAIT)
        .await
        .expect("reply");
    assert!(matches!(reserved.body, Some(Body::Error(_))));

    let sent: Vec<String> = (0..30).map(|i| format!("danmaku {i}")).collect();
    for t in &sent {
        say(&mut s, room, t).await.expect("room send");
    }
    for (who, c) in [("sender", &mut s), ("v0", &mut a), ("v1", &mut b)] {
        let got = collect(c, room, sent.len()).await;
        assert_eq!(texts(&got), sent, "{who} got every message in order");
        assert!(got.iter().all(|m| m.seq == 0 && m.receiver_id == room));
        assert!(got.iter().all(|m| m.sender_user_id == sender.user_id));
        assert!(
            got.iter().all(|m| m.sender_device_id == 0),
            "{who}: room viewers never learn the sender's device id"
        );
    }

    // A late joiner sees the last 20 (room_recent) in order, with the count including itself.
    let out = join(&mut stranger, room).await.expect("late join");
    assert_eq!(texts(&out.recent), sent[10..].to_vec(), "recent history");
    assert!(out.recent.iter().all(|m| m.sender_device_id == 0));
    assert!(out.online_count >= 1);

    // The count converges to 4 on every viewer, whichever gateway it is on: told by a frame, or for the
    // late joiner possibly already by its SubscribeRoomOutput (then no count-only frame is owed to it).
    let joined_with = out.online_count;
    for (who, c, known) in [
        ("sender", &mut s, 0),
        ("v0", &mut a, 0),
        ("v1", &mut b, 0),
        ("late", &mut stranger, joined_with),
    ] {
        if known == 4 {
            continue;
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let f = next_frame_of(
                c,
                room,
                deadline.saturating_duration_since(tokio::time::Instant::now()),
            )
            .await
            .unwrap_or_else(|| panic!("{who}: online count never reached 4"));
            if f.online_count == 4 {
                break;
            }
        }
    }

    // v1 leaves: no more room traffic for it; the others still get it.
    leave(&mut b, room).await;
    while next_frame_of(&mut b, room, Duration::from_millis(300))
        .await
        .is_some()
    {}
    say(&mut s, room, "after leave").await.expect("send");
    assert_eq!(texts(&collect(&mut a, room, 1).await), vec!["after leave"]);
    assert!(
        next_frame_of(&mut b, room, Duration::from_millis(500))
            .await
            .is_none(),
        "a viewer that left gets nothing"
    );

    // Everyone leaves (one by closing its connection): the gateways unsubscribe.
    leave(&mut a, room).await;
    leave(&mut stranger, room).await;
    drop(s);
    for gw in 0..cluster.gateways.len() {
        let hub = cluster.hub(gw).clone();
        eventually("gateway unsubscribes with its last viewer", WAIT, || {
            ready((hub.room_subscription_count() == 0).then_some(()))
        })
        .await;
    }
    drop((a, b, stranger));
    if let Some((bus, baseline)) = &cluster.bus {
        eventually("bus subjects back to the baseline", WAIT, || {
            ready((bus.subject_count() == *baseline).then_some(()))
        })
        .await;
    }
}

/// A viewer that stops reading loses room frames (counted) while its IM messages still arrive.
async fn slow_viewer_drops_room_traffic_not_im(cluster: &RoomCluster) {
    let room = room_id();
    let slow = cluster.user("slow").await;
    let friend = cluster.user("friend").await;
    let flooder = cluster.user("flood").await;
    cluster
        .api
        .post(
            "/v1/friends/requests",
            Some(&friend.token),
            json!({"to_user_id": slow.user_id, "message": "hi"}),
        )
        .await
        .expect("friend request");
    cluster
        .api
        .post(
            &format!("/v1/friends/requests/{}/agree", friend.user_id),
            Some(&slow.token),
            json!({}),
        )
        .await
        .expect("agree");
    let mut v = cluster.connect(0, &slow).await;
    let mut f = cluster.connect(1, &friend).await;
    let mut fl = cluster.connect(1, &flooder).await;
    join(&mut v, room).await.expect("join");
    join(&mut fl, room).await.expect("join");
    let hub = cluster.hub(0).clone();
    let dropped_before = hub.room_frames_dropped();
    // `v` reads nothing from here on. Flood until its gateway drops room frames for it (the socket
    // buffers fill first), and with more than the socket buffers (~4 MiB on the sending side here) and
    // the room queue can hold, so that messages, not just count refreshes, were dropped.
    let chunk = vec![b'x'; 15 * 1024];
    let mut sent = 0;
    while hub.room_frames_dropped() == dropped_before || sent < 500 {
        assert!(sent < 4000, "no room frame was ever dropped");
        for _ in 0..50 {
            fl.send(room_msg(room, 1, chunk.clone()))
                .await
                .expect("send");
            sent += 1;
        }
        // Keep the flooder's own socket drained (it is a viewer too).
        while matches!(fl.recv(Duration::from_millis(20)).await, Ok(Some(_))) {}
    }
    // IM still goes through, and after it everything the slow viewer missed is room traffic only.
    for i in 0..3 {
        let p = f
            .request(
                Body::SendMessage(SendMessageInput {
                    receiver_type: ReceiverType::User as i32,
                    receiver_id: slow.user_id,
                    client_msg_id: format!("im{i}"),
                    content_type: 1,
                    content: Bytes::from(format!("im {i}")),
                    ..Default::default()
                }),
                WAIT,
            )
            .await
            .expect("im reply");
        assert!(matches!(p.body, Some(Body::SendMessageOutput(_))), "{p:?}");
    }
    let mut ims = Vec::new();
    let mut room_messages = 0;
    while ims.len() < 3 {
        let p = v
            .recv(WAIT)
            .await
            .expect("a packet in time")
            .expect("connection stays open");
        match p.body {
            Some(Body::Message(m)) => ims.push(String::from_utf8_lossy(&m.content).into_owned()),
            Some(Body::RoomMessages(r)) => room_messages += r.messages.len(),
            Some(Body::Error(e)) => panic!("slow viewer got an error: {e:?}"),
            _ => {}
        }
    }
    assert_eq!(ims, vec!["im 0", "im 1", "im 2"], "IM is never dropped");
    assert!(
        room_messages < sent,
        "room traffic was dropped: {room_messages} of {sent} arrived"
    );
    assert!(hub.room_frames_dropped() > dropped_before);
    assert_eq!(hub.overflow_closes(), 0, "no IM overflow close");
}

/// Owner/admin close and mute through user-api, join notices, server notices and broadcasts.
async fn moderation_notices_and_broadcast(cluster: &RoomCluster) {
    let room = room_id();
    let owner = cluster.user("owner").await;
    let viewer = cluster.user("viewer").await;
    let other = cluster.user("other").await;
    let admin = ("x-admin-secret", ADMIN);
    let (status, v) = cluster
        .http(
            Method::PUT,
            &format!("/v1/admin/rooms/{room}"),
            admin,
            json!({"owner_user_id": owner.user_id, "join_notices": true}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["owner_user_id"], owner.user_id);

    let mut o = cluster.connect(0, &owner).await;
    let mut w = cluster.connect(1, &viewer).await;
    join(&mut o, room).await.expect("owner joins");
    join(&mut w, room).await.expect("viewer joins");
    // The owner sees the viewer's join notice (after its own).
    let notice = loop {
        let f = next_frame_of(&mut o, room, WAIT)
            .await
            .expect("join notice");
        if let Some(m) = f
            .messages
            .into_iter()
            .find(|m| m.content_type < 0 && m.sender_user_id != owner.user_id)
        {
            break m;
        }
    };
    assert_eq!(notice.content_type, RoomNotice::Join as i32);
    assert_eq!(notice.sender_user_id, viewer.user_id);
    assert_eq!(notice.sender_device_id, 0, "no device id in room notices");

    // Only the owner and admins may mute; muted: the viewer is refused, the owner is not.
    let bearer = |c: &Credentials| ("authorization", format!("Bearer {}", c.token));
    let (b_name, b_value) = bearer(&viewer);
    let (status, _) = cluster
        .http(
            Method::PATCH,
            &format!("/v1/rooms/{room}"),
            (b_name, &b_value),
            json!({"muted": true}),
        )
        .await;
    assert_eq!(status, 403);
    let (b_name, b_value) = bearer(&owner);
    let (status, v) = cluster
        .http(
            Method::PATCH,
            &format!("/v1/rooms/{room}"),
            (b_name, &b_value),
            json!({"muted": true}),
        )
        .await;
    assert_eq!((status, v["muted"].as_bool()), (200, Some(true)), "{v}");
    assert_eq!(say(&mut w, room, "hello?").await, Err(ErrorCode::Muted));
    say(&mut o, room, "owner speaks")
        .await
        .expect("owner may speak");

    // A system notice reaches viewers even in a muted room.
    let (status, v) = cluster
        .http(
            Method::POST,
            &format!("/v1/admin/rooms/{room}/messages"),
            admin,
            json!({"content_type": 7, "content": "c3lzdGVt"}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let got = collect(&mut w, room, 2).await;
    assert_eq!(texts(&got), vec!["owner speaks", "system"]);
    // The shown sender is the system (0) or a user id, nothing else.
    for bad in [-7_i64, 1 << 62] {
        let (status, v) = cluster
            .http(
                Method::POST,
                &format!("/v1/admin/rooms/{room}/messages"),
                admin,
                json!({"from_user_id": bad, "content": "c3lzdGVt"}),
            )
            .await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (400, Some("invalid_argument")),
            "from_user_id {bad}: {v}"
        );
    }
    assert_eq!(got[1].content_type, 7);

    // A broadcast reaches every connection, as room 0: viewers and connections that never joined a room
    // (they have no room queue; the broadcast rides their IM queue).
    let mut x = cluster.connect(0, &other).await;
    let (status, v) = cluster
        .http(
            Method::POST,
            "/v1/admin/broadcast",
            admin,
            json!({"content": "YnJvYWRjYXN0"}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    for c in [&mut w, &mut x] {
        let f = loop {
            let f = next_frame(c, WAIT).await.expect("broadcast");
            if f.room_id == 0 {
                break f;
            }
        };
        assert_eq!(texts(&f.messages), vec!["broadcast"]);
    }

    // Closed: viewers are told, sends and joins are refused.
    let (status, _) = cluster
        .http(
            Method::PATCH,
            &format!("/v1/rooms/{room}"),
            (b_name, &b_value),
            json!({"closed": true}),
        )
        .await;
    assert_eq!(status, 200);
    let closed = loop {
        let f = next_frame_of(&mut w, room, WAIT)
            .await
            .expect("closed notice");
        if let Some(m) = f.messages.into_iter().find(|m| m.content_type < 0) {
            break m;
        }
    };
    assert_eq!(closed.content_type, RoomNotice::Closed as i32);
    assert_eq!(
        say(&mut o, room, "anyone?").await,
        Err(ErrorCode::RoomClosed)
    );
    assert_eq!(join(&mut x, room).await.err(), Some(ErrorCode::RoomClosed));

    // The leave notice of a viewer (rooms with join notices).
    let room2 = room_id();
    cluster
        .http(
            Method::PUT,
            &format!("/v1/admin/rooms/{room2}"),
            admin,
            json!({"join_notices": true}),
        )
        .await;
    join(&mut o, room2).await.expect("join");
    join(&mut x, room2).await.expect("join");
    leave(&mut x, room2).await;
    let mut kinds = Vec::new();
    while !kinds.contains(&(RoomNotice::Leave as i32)) {
        let f = next_frame_of(&mut o, room2, WAIT)
            .await
            .expect("leave notice");
        kinds.extend(f.messages.iter().map(|m| m.content_type));
    }

    // At most 8 rooms per connection.
    for i in 0..8 {
        let got = join(&mut x, room2 + 1 + i).await;
        assert!(got.is_ok(), "room {i}: {got:?}");
    }
    assert_eq!(
        join(&mut x, room2 + 100).await.err(),
        Some(ErrorCode::TooManyRooms)
    );
}

both_modes!(
    crate::rooms::RoomCluster,
    4,
    fan_out_history_count_and_leave,
    slow_viewer_drops_room_traffic_not_im,
    moderation_notices_and_broadcast,
);

mod moderation;
