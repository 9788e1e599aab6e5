//! Live-room moderation end to end (issue 17), embedded and over two gateways: bans kick the user's
//! connections on every gateway and refuse joins and sends with ROOM_BANNED until lifted; the pinned
//! announcement comes with a join and live to viewers; the viewer list spans the gateways.

use std::future::ready;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use reqwest::Method;
use serde_json::{json, Value};
use zhibo_loadtest::client::{Client, Credentials};
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{ErrorCode, Message, RoomKicked, RoomNotice};

use super::{join, next_frame_of, room_id, say, texts, RoomCluster, WAIT};
use crate::cluster::{eventually, ADMIN};

/// A user signed in on two devices (two credentials of one user id).
async fn two_devices(cluster: &RoomCluster, name: &str) -> (Credentials, Credentials) {
    let unique = zhibo_testkit::unique_name("m").replace('_', "");
    let username = format!("{name}{}", &unique[unique.len().saturating_sub(12)..]);
    let mut creds = Vec::new();
    for _ in 0..2 {
        let device = cluster
            .api
            .register_device("android")
            .await
            .expect("device");
        creds.push(
            cluster
                .api
                .sign_up_and_in(&username, "correct horse battery", device)
                .await
                .expect("sign up and in"),
        );
    }
    let b = creds.pop().expect("two");
    let a = creds.pop().expect("two");
    assert_eq!(a.user_id, b.user_id);
    (a, b)
}

fn bearer(c: &Credentials) -> (&'static str, String) {
    ("authorization", format!("Bearer {}", c.token))
}

async fn as_user(
    cluster: &RoomCluster,
    who: &Credentials,
    method: Method,
    path: &str,
    body: Value,
) -> (u16, Value) {
    let (name, value) = bearer(who);
    cluster.http(method, path, (name, &value), body).await
}

/// The next RoomKicked packet (other packets are skipped).
async fn next_kick(c: &mut Client) -> Option<RoomKicked> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.recv(left).await {
            Ok(Some(p)) => {
                if let Some(Body::RoomKicked(k)) = p.body {
                    return Some(k);
                }
            }
            _ => return None,
        }
    }
}

/// Room notices of `kind` in `room_id` until one arrives.
async fn next_notice(c: &mut Client, room_id: i64, kind: RoomNotice) -> Message {
    loop {
        let f = next_frame_of(c, room_id, WAIT)
            .await
            .unwrap_or_else(|| panic!("no {kind:?} notice arrived"));
        if let Some(m) = f
            .messages
            .into_iter()
            .find(|m| m.content_type == kind as i32)
        {
            return m;
        }
    }
}

/// Sets up room `room` owned by `owner` through the admin API.
async fn owned_room(cluster: &RoomCluster, room: i64, owner: &Credentials) {
    let (status, v) = cluster
        .http(
            Method::PUT,
            &format!("/v1/admin/rooms/{room}"),
            ("x-admin-secret", ADMIN),
            json!({"owner_user_id": owner.user_id}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
}

/// A ban removes the user's connections from the room on both gateways (RoomKicked with ROOM_BANNED,
/// no more room traffic), refuses their joins and sends with ROOM_BANNED, leaves other viewers alone;
/// only the owner and admins (or the app backend) may ban, and never a manager; unbanning lets the user
/// back in.
async fn a_ban_kicks_everywhere_and_refuses_until_lifted(cluster: &RoomCluster) {
    let room = room_id();
    let owner = cluster.user("owner").await;
    let bystander = cluster.user("bystander").await;
    let (victim_a, victim_b) = two_devices(cluster, "victim").await;
    owned_room(cluster, room, &owner).await;

    let mut o = cluster.connect(0, &owner).await;
    let mut w = cluster.connect(1, &bystander).await;
    let mut va = cluster.connect(0, &victim_a).await;
    let mut vb = cluster.connect(1, &victim_b).await;
    for c in [&mut o, &mut w, &mut va, &mut vb] {
        join(c, room).await.expect("join");
    }
    say(&mut va, room, "before the ban")
        .await
        .expect("may speak before the ban");

    // Who may ban.
    let path = |u: i64| format!("/v1/rooms/{room}/bans/{u}");
    let (status, v) = as_user(
        cluster,
        &bystander,
        Method::PUT,
        &path(victim_a.user_id),
        json!({}),
    )
    .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{v}"
    );
    let (status, v) = as_user(
        cluster,
        &owner,
        Method::PUT,
        &path(owner.user_id),
        json!({}),
    )
    .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (403, Some("cannot_ban_manager")),
        "{v}"
    );

    // A user id that names nobody is not stored as a ban.
    let (status, v) = as_user(
        cluster,
        &owner,
        Method::PUT,
        &path(zhibo_store::ids::MAX_ID),
        json!({}),
    )
    .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("user_not_found")),
        "{v}"
    );

    let (status, v) = as_user(
        cluster,
        &owner,
        Method::PUT,
        &path(victim_a.user_id),
        json!({}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["user_id"], victim_a.user_id);
    assert_eq!(v["banned_by"], owner.user_id);

    // Both of the victim's connections, one per gateway, are told and leave the room.
    for (who, c) in [("device a", &mut va), ("device b", &mut vb)] {
        let k = next_kick(c)
            .await
            .unwrap_or_else(|| panic!("{who}: no RoomKicked"));
        assert_eq!(k.room_id, room, "{who}");
        assert_eq!(k.code, ErrorCode::RoomBanned as i32, "{who}");
    }
    for gw in 0..cluster.gateways.len() {
        let hub = cluster.hub(gw).clone();
        let want = if cluster.gateways.len() == 1 { 2 } else { 1 };
        eventually("the banned user's viewers are gone", WAIT, || {
            ready((hub.rooms().viewer_count(room) == want).then_some(()))
        })
        .await;
    }
    // No more room traffic for them; the others still get it.
    say(&mut o, room, "after the ban")
        .await
        .expect("owner speaks");
    let got = loop {
        let f = next_frame_of(&mut w, room, WAIT)
            .await
            .expect("bystander gets traffic");
        let t = texts(&f.messages);
        if t.contains(&"after the ban".to_owned()) {
            break t;
        }
    };
    assert!(got.contains(&"after the ban".to_owned()));
    for c in [&mut va, &mut vb] {
        while let Some(f) = next_frame_of(c, room, Duration::from_millis(300)).await {
            assert!(
                !texts(&f.messages).contains(&"after the ban".to_owned()),
                "a banned viewer got room traffic"
            );
        }
    }
    // Sends and joins are refused with the code, on both devices.
    assert_eq!(say(&mut va, room, "x").await, Err(ErrorCode::RoomBanned));
    assert_eq!(join(&mut vb, room).await.err(), Some(ErrorCode::RoomBanned));
    assert_eq!(join(&mut va, room).await.err(), Some(ErrorCode::RoomBanned));
    // A refused rejoin keeps the reason for sends (outside audit: it turned into INVALID_ARGUMENT).
    assert_eq!(
        say(&mut va, room, "x").await,
        Err(ErrorCode::RoomBanned),
        "a send after a refused rejoin"
    );
    // A connection of the victim that connects now is refused too, joins and sends.
    let mut vc = cluster.connect(1, &victim_a).await;
    assert_eq!(join(&mut vc, room).await.err(), Some(ErrorCode::RoomBanned));
    assert_eq!(say(&mut vc, room, "x").await, Err(ErrorCode::RoomBanned));
    drop(vc);

    // The ban list (owner and admins only).
    let (status, v) = as_user(
        cluster,
        &owner,
        Method::GET,
        &format!("/v1/rooms/{room}/bans"),
        json!(null),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let listed: Vec<i64> = v["bans"]
        .as_array()
        .expect("bans")
        .iter()
        .map(|b| b["user_id"].as_i64().expect("user id"))
        .collect();
    assert_eq!(listed, vec![victim_a.user_id]);
    let (status, _) = as_user(
        cluster,
        &bystander,
        Method::GET,
        &format!("/v1/rooms/{room}/bans"),
        json!(null),
    )
    .await;
    assert_eq!(status, 403);

    // Unbanned: joins and sends work again.
    let (status, v) = as_user(
        cluster,
        &owner,
        Method::DELETE,
        &path(victim_a.user_id),
        json!(null),
    )
    .await;
    assert_eq!(status, 204, "{v}");
    join(&mut vb, room).await.expect("join after unban");
    say(&mut vb, room, "back again")
        .await
        .expect("send after unban");
    let got = loop {
        let f = next_frame_of(&mut o, room, WAIT)
            .await
            .expect("owner gets it");
        if texts(&f.messages).contains(&"back again".to_owned()) {
            break true;
        }
    };
    assert!(got);

    // The app backend bans with the admin secret too.
    let admin = ("x-admin-secret", ADMIN);
    let (status, v) = cluster
        .http(
            Method::PUT,
            &format!("/v1/admin/rooms/{room}/bans/{}", bystander.user_id),
            admin,
            json!({}),
        )
        .await;
    assert_eq!((status, v["banned_by"].as_i64()), (200, Some(0)), "{v}");
    // ...and lists the bans with it (victim_a's ban was lifted).
    let (status, v) = cluster
        .http(
            Method::GET,
            &format!("/v1/admin/rooms/{room}/bans?limit=10"),
            admin,
            json!(null),
        )
        .await;
    let banned: Vec<i64> = v["bans"]
        .as_array()
        .map(|b| b.iter().filter_map(|b| b["user_id"].as_i64()).collect())
        .unwrap_or_default();
    assert_eq!(status, 200, "{v}");
    assert!(banned.contains(&bystander.user_id), "{v}");
    assert!(!banned.contains(&victim_a.user_id), "{v}");
    let (status, _) = cluster
        .http(
            Method::GET,
            &format!("/v1/admin/rooms/{room}/bans"),
            ("x-admin-secret", "wrong"),
            json!(null),
        )
        .await;
    assert_eq!(status, 401, "a wrong admin secret lists nothing");
    let k = next_kick(&mut w).await.expect("bystander kicked");
    assert_eq!((k.room_id, k.code), (room, ErrorCode::RoomBanned as i32));
    assert_eq!(say(&mut w, room, "x").await, Err(ErrorCode::RoomBanned));
}

/// The pinned announcement: given on join, pushed live to viewers on both gateways when set or
/// removed, settable only by the owner and admins (or the app backend).
async fn the_pin_comes_with_the_join_and_live(cluster: &RoomCluster) {
    let room = room_id();
    let owner = cluster.user("owner").await;
    let viewer = cluster.user("viewer").await;
    let late = cluster.user("late").await;
    owned_room(cluster, room, &owner).await;
    let pin_path = format!("/v1/rooms/{room}/pin");
    let content = |s: &str| json!({"content": STANDARD.encode(s)});

    let (status, _) = as_user(cluster, &viewer, Method::PUT, &pin_path, content("mine")).await;
    assert_eq!(status, 403, "a viewer may not pin");
    let (status, v) = as_user(cluster, &owner, Method::PUT, &pin_path, content("welcome")).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["content"], STANDARD.encode("welcome"));

    // On join.
    let mut w = cluster.connect(1, &viewer).await;
    let out = join(&mut w, room).await.expect("join");
    let pinned = out.pinned.expect("the pin comes with the join");
    assert_eq!(pinned.content_type, RoomNotice::Pinned as i32);
    assert_eq!(&pinned.content[..], b"welcome");
    assert_eq!(pinned.sender_user_id, owner.user_id);
    assert_eq!(pinned.receiver_id, room);

    // Live, on both gateways.
    let mut o = cluster.connect(0, &owner).await;
    join(&mut o, room).await.expect("owner joins");
    let (status, v) = as_user(
        cluster,
        &owner,
        Method::PUT,
        &pin_path,
        content("new rules"),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    for c in [&mut w, &mut o] {
        let m = next_notice(c, room, RoomNotice::Pinned).await;
        assert_eq!(&m.content[..], b"new rules");
        assert_eq!(m.sender_user_id, owner.user_id);
    }
    let (status, v) = as_user(cluster, &viewer, Method::GET, &pin_path, json!(null)).await;
    assert_eq!(
        (status, v["content"].as_str()),
        (200, Some(STANDARD.encode("new rules").as_str()))
    );

    // Removed: viewers are told, a new joiner gets none.
    let (status, _) = as_user(cluster, &owner, Method::DELETE, &pin_path, json!(null)).await;
    assert_eq!(status, 204);
    for c in [&mut w, &mut o] {
        let m = next_notice(c, room, RoomNotice::Unpinned).await;
        assert!(m.content.is_empty());
    }
    let mut l = cluster.connect(0, &late).await;
    assert_eq!(join(&mut l, room).await.expect("join").pinned, None);
    let (status, _) = as_user(cluster, &viewer, Method::GET, &pin_path, json!(null)).await;
    assert_eq!(status, 404);
    // Removing it again changes nothing and tells nobody (outside audit: every DELETE announced an
    // unpin to the whole room): the next thing a viewer gets is the next message.
    let (status, _) = as_user(cluster, &owner, Method::DELETE, &pin_path, json!(null)).await;
    assert_eq!(status, 204);
    say(&mut o, room, "after a second unpin")
        .await
        .expect("owner speaks");
    loop {
        let f = next_frame_of(&mut w, room, WAIT)
            .await
            .expect("the message arrives");
        assert!(
            !f.messages
                .iter()
                .any(|m| m.content_type == RoomNotice::Unpinned as i32),
            "an unpin notice for a pin that was not there: {f:?}"
        );
        if texts(&f.messages).contains(&"after a second unpin".to_owned()) {
            break;
        }
    }

    // The app backend pins with the admin secret.
    let (status, v) = cluster
        .http(
            Method::PUT,
            &format!("/v1/admin/rooms/{room}/pin"),
            ("x-admin-secret", ADMIN),
            content("sys"),
        )
        .await;
    assert_eq!((status, v["pinned_by"].as_i64()), (200, Some(0)), "{v}");
    let m = next_notice(&mut l, room, RoomNotice::Pinned).await;
    assert_eq!(&m.content[..], b"sys");
    // ...and reads it with it.
    let admin_pin = format!("/v1/admin/rooms/{room}/pin");
    let (status, v) = cluster
        .http(
            Method::GET,
            &admin_pin,
            ("x-admin-secret", ADMIN),
            json!(null),
        )
        .await;
    assert_eq!(
        (status, v["content"].as_str(), v["pinned_by"].as_i64()),
        (200, Some(STANDARD.encode("sys").as_str()), Some(0)),
        "{v}"
    );
}

/// The viewer list spans the gateways: the owner first, then by join time, one entry per user.
async fn the_viewer_list_spans_the_gateways(cluster: &RoomCluster) {
    let room = room_id();
    let owner = cluster.user("owner").await;
    let a = cluster.user("a").await;
    let b = cluster.user("b").await;
    let (c1, c2) = two_devices(cluster, "c").await;
    owned_room(cluster, room, &owner).await;
    let mut conns = Vec::new();
    // Join order: a (gw 0), b (gw 1), c twice (gw 0 and 1), the owner last (gw 1).
    for (gw, who) in [(0, &a), (1, &b), (0, &c1), (1, &c2), (1, &owner)] {
        let mut c = cluster.connect(gw, who).await;
        join(&mut c, room).await.expect("join");
        conns.push(c);
        // Distinct join times (ms).
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let path = format!("/v1/rooms/{room}/viewers?limit=3");
    let gateways = cluster.gateways.len() as u64;
    // Gateways learn of each other from presence reports: a list right after the joins may miss a
    // gateway not yet heard of; it converges within a presence interval.
    let v = eventually("the full viewer list", WAIT, || async {
        let (status, v) = as_user(cluster, &a, Method::GET, &path, json!(null)).await;
        assert_eq!(status, 200, "{v}");
        (v["connections"] == 5 && v["gateways"] == gateways && v["complete"] == true).then_some(v)
    })
    .await;
    let listed: Vec<(i64, bool)> = v["viewers"]
        .as_array()
        .expect("viewers")
        .iter()
        .map(|x| {
            (
                x["user_id"].as_i64().expect("id"),
                x["manager"].as_bool().expect("manager"),
            )
        })
        .collect();
    assert_eq!(
        listed,
        vec![
            (owner.user_id, true),
            (a.user_id, false),
            (b.user_id, false)
        ],
        "{v}"
    );
    let (status, v) = cluster
        .http(
            Method::GET,
            &format!("/v1/admin/rooms/{room}/viewers?limit=10"),
            ("x-admin-secret", ADMIN),
            json!(null),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let ids: Vec<i64> = v["viewers"]
        .as_array()
        .expect("viewers")
        .iter()
        .map(|x| x["user_id"].as_i64().expect("id"))
        .collect();
    assert_eq!(
        ids,
        vec![owner.user_id, a.user_id, b.user_id, c1.user_id],
        "one entry per user: {v}"
    );
    let (status, _) = as_user(
        cluster,
        &a,
        Method::GET,
        &format!("/v1/rooms/{room}/viewers?limit=0"),
        json!(null),
    )
    .await;
    assert_eq!(status, 400);
    // An empty room: an empty list (after the bounded wait).
    let (status, v) = as_user(
        cluster,
        &a,
        Method::GET,
        &format!("/v1/rooms/{}/viewers", room_id()),
        json!(null),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["viewers"], json!([]));
    drop(conns);
}

both_modes!(
    crate::rooms::RoomCluster,
    4,
    a_ban_kicks_everywhere_and_refuses_until_lifted,
    the_pin_comes_with_the_join_and_live,
    the_viewer_list_spans_the_gateways,
);
