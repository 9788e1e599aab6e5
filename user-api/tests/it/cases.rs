//! The test cases, each `async fn case_x(stores)`: written once, run against every backend (see main.rs).

use std::collections::BTreeSet;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use reqwest::Method;
use serde_json::{json, Value};
use zhibo_auth::Claims;
use zhibo_store::ids::now_ms;
use zhibo_store::Stores;
use zhibo_user_api::{ApiConfig, GroupAddPolicy};

use crate::server::{start, start_unready, start_with, As, TestServer, TestUser, ADMIN_SECRET};

const ADMIN: As<'static> = As::Admin(ADMIN_SECRET);

/// Health, readiness, the fallbacks and the generic request errors.
pub(crate) async fn case_health_and_fallbacks(stores: Stores) {
    let s = start(stores).await;
    assert_eq!(
        s.get("/healthz", As::Anonymous).await.ok(200)["status"],
        "ok"
    );
    assert_eq!(
        s.get("/readyz", As::Anonymous).await.ok(200)["status"],
        "ready"
    );
    s.ready.store(false, std::sync::atomic::Ordering::Relaxed);
    s.get("/readyz", As::Anonymous).await.err(503, "not_ready");
    assert_eq!(
        s.get("/healthz", As::Anonymous).await.ok(200)["status"],
        "ok",
        "liveness ignores deps"
    );

    s.get("/v1/nope", As::Anonymous).await.err(404, "not_found");
    s.call(Method::PUT, "/v1/devices", As::Anonymous, None)
        .await
        .err(405, "method_not_allowed");
    // Bad JSON, wrong shape, missing content type: all 400 bad_request with our error body.
    let raw = s
        .http
        .post(format!("{}/v1/devices", s.base))
        .header("content-type", "application/json")
        .body("{not json");
    s.send(raw).await.err(400, "bad_request");
    s.post("/v1/devices", As::Anonymous, json!({"type": "fridge"}))
        .await
        .err(400, "bad_request");
    s.post(
        "/v1/devices",
        As::Anonymous,
        json!({"type": "ios", "colour": "red"}),
    )
    .await
    .err(400, "bad_request");
    let untyped = s
        .http
        .post(format!("{}/v1/devices", s.base))
        .body(r#"{"type":"ios"}"#);
    s.send(untyped).await.err(400, "bad_request");
    // A JSON array is not the documented object, though serde would fill the fields by position
    // (outside audit: a user created from `["name", "password", null]`).
    let array = s
        .http
        .post(format!("{}/v1/devices", s.base))
        .header("content-type", "application/json")
        .body(r#"["ios"]"#);
    let v = s.send(array).await;
    v.err(400, "bad_request");
    assert_eq!(v.body["error"]["message"], "the body must be a JSON object");
    let typed = s
        .http
        .post(format!("{}/v1/devices", s.base))
        .header("content-type", "application/json; charset=utf-8")
        .body(r#"{"type":"ios"}"#);
    let v = s.send(typed).await;
    assert!(
        v.status.is_success(),
        "a content type with parameters is JSON too: {v:?}"
    );
    // Over the 64 KiB body limit.
    let big = json!({"type": "ios", "brand": "x".repeat(70 * 1024)});
    s.post("/v1/devices", As::Anonymous, big)
        .await
        .err(413, "payload_too_large");
    // Path parameters that are not ids.
    let u = s.user().await;
    s.get("/v1/users/abc", u.auth())
        .await
        .err(400, "bad_request");
}

/// Device registration and its validation.
pub(crate) async fn case_devices(stores: Stores) {
    let s = start(stores.clone()).await;
    let a = s.device().await;
    let b = s.device().await;
    assert!(
        a > 0 && b > a && b < (1 << 53),
        "ids increase and fit JavaScript: {a} {b}"
    );
    let d = stores
        .devices
        .get_device(a)
        .await
        .expect("get")
        .expect("stored");
    assert_eq!(
        (
            d.device_type.as_str(),
            d.brand.as_str(),
            d.tokens_valid_after_ms
        ),
        ("android", "xiaomi", 0)
    );
    // Only `type` is required.
    for t in ["ios", "web", "pc"] {
        s.post("/v1/devices", As::Anonymous, json!({"type": t}))
            .await
            .ok(201);
    }
    s.post(
        "/v1/devices",
        As::Anonymous,
        json!({"type": "web", "model": "m".repeat(65)}),
    )
    .await
    .err(400, "invalid_argument");
}

/// Sign-up, sign-in and their refusals; a signed-in token works.
pub(crate) async fn case_sign_up_and_sign_in(stores: Stores) {
    let s = start(stores).await;
    let pw = "correct horse";
    let u = s.signed_up(pw).await;
    let me = s.get("/v1/users/me", u.auth()).await.ok(200);
    assert_eq!(me["user_id"].as_i64(), Some(u.user_id));
    assert_eq!(me["username"], u.username.as_str());
    assert_eq!(
        me["nickname"],
        u.username.as_str(),
        "nickname defaults to the username"
    );

    // Duplicate username, bad username, bad password.
    s.post(
        "/v1/users",
        As::Anonymous,
        json!({"username": u.username, "password": "another password"}),
    )
    .await
    .err(409, "username_taken");
    for bad in ["ab", "Upper", "with space", "ünï", &"x".repeat(33)] {
        s.post(
            "/v1/users",
            As::Anonymous,
            json!({"username": bad, "password": "long enough"}),
        )
        .await
        .err(400, "invalid_argument");
    }
    s.post(
        "/v1/users",
        As::Anonymous,
        json!({"username": "short_pw_user", "password": "1234567"}),
    )
    .await
    .err(400, "invalid_argument");

    let dev = s.device().await;
    let sign_in = |username: &str, password: &str, device_id: i64| json!({"username": username, "password": password, "device_id": device_id});
    // Wrong password and unknown user look the same.
    s.post(
        "/v1/sessions",
        As::Anonymous,
        sign_in(&u.username, "wrong password", dev),
    )
    .await
    .err(401, "bad_credentials");
    s.post(
        "/v1/sessions",
        As::Anonymous,
        sign_in("nobody_here", pw, dev),
    )
    .await
    .err(401, "bad_credentials");
    s.post(
        "/v1/sessions",
        As::Anonymous,
        sign_in(&u.username, pw, 424242),
    )
    .await
    .err(404, "device_not_found");
    // A user without a password (admin-managed) cannot sign in with one.
    let managed = s.user().await;
    s.post(
        "/v1/sessions",
        As::Anonymous,
        sign_in(&managed.username, "", dev),
    )
    .await
    .err(401, "bad_credentials");

    // A second sign-in on another device: the token is valid for TTL and bound to that device.
    let session = s
        .post("/v1/sessions", As::Anonymous, sign_in(&u.username, pw, dev))
        .await
        .ok(200);
    let token = session["token"].as_str().expect("token");
    let claims = s.key.verify(token, now_ms() / 1000).expect("valid token");
    assert_eq!((claims.user_id, claims.device_id), (u.user_id, dev));
    let ttl = session["expires_at"].as_i64().expect("expires_at") - now_ms() / 1000;
    assert!(
        (7 * 24 * 3600 - 5..=7 * 24 * 3600).contains(&ttl),
        "ttl {ttl}"
    );
    assert_eq!(
        s.get("/v1/users/me", As::Token(token)).await.ok(200)["user_id"].as_i64(),
        Some(u.user_id)
    );
}

/// A server behind a trusted proxy (the test client, 127.0.0.1) that takes the client address from
/// `X-Forwarded-For`, so one test can speak from many addresses.
async fn behind_proxy(stores: Stores, config: ApiConfig) -> crate::server::TestServer {
    start_with(
        stores,
        ApiConfig {
            admin_secret: ADMIN_SECRET.to_owned(),
            trusted_proxies: "127.0.0.1, ::1".to_owned(),
            client_ip_header: "X-Forwarded-For".to_owned(),
            ..config
        },
    )
    .await
}

/// `POST path` with `body` from client address `from` (via the trusted proxy header).
async fn post_from(
    s: &crate::server::TestServer,
    from: &str,
    path: &str,
    body: Value,
) -> crate::server::Reply {
    let req = s
        .http
        .post(format!("{}{path}", s.base))
        .header("x-forwarded-for", from)
        .json(&body);
    s.send(req).await
}

/// Failed sign-ins back off per (username, address) with 429 and a growing Retry-After; the right
/// password from another address still works (issue 19, finding 2: anyone could lock alice out).
pub(crate) async fn case_sign_in_rate_limit(stores: Stores) {
    let s = behind_proxy(
        stores,
        ApiConfig {
            sign_in_per_minute: 3,
            sign_in_max_backoff_secs: 60,
            ..ApiConfig::default()
        },
    )
    .await;
    let pw = "correct horse";
    let alice = s.signed_up(pw).await;
    let dev = s.device().await;
    let attempt = |password: &str| json!({"username": alice.username, "password": password, "device_id": dev});
    let attacker = "203.0.113.7";
    // Failures until refused: the third failure starts the backoff, the fourth attempt gets 429.
    let mut waits = Vec::new();
    for _ in 0..12 {
        let r = post_from(&s, attacker, "/v1/sessions", attempt("wrong password")).await;
        if r.status.as_u16() == 429 {
            r.err(429, "rate_limited");
            waits.push(r.retry_after.expect("Retry-After"));
            if waits.len() == 2 {
                break;
            }
            // Wait out the refusal window (a condition on the clock, not a synchronisation).
            tokio::time::sleep(std::time::Duration::from_secs(waits[0])).await;
        } else {
            r.err(401, "bad_credentials");
        }
    }
    assert_eq!(waits.len(), 2, "the attacker was never refused");
    assert!(
        (1..=60).contains(&waits[0]) && waits[1] >= waits[0],
        "refusal windows grow: {waits:?}"
    );
    // The attacker's address is refused even with the right password...
    post_from(&s, attacker, "/v1/sessions", attempt(pw))
        .await
        .err(429, "rate_limited");
    // ...but the real alice, from her own address, signs in.
    let ok = post_from(&s, "198.51.100.20", "/v1/sessions", attempt(pw))
        .await
        .ok(200);
    assert_eq!(ok["user_id"].as_i64(), Some(alice.user_id));
    // Successes are not counted: many sign-ins with the right password are all accepted.
    for _ in 0..4 {
        post_from(&s, "198.51.100.20", "/v1/sessions", attempt(pw))
            .await
            .ok(200);
    }
    // One address failing across usernames is bounded too (3 × the per-user budget). The refusal
    // window starts at 1 s and doubles with each further failure: on a loaded machine an attempt (an
    // argon2 verification) can outlast the first windows, so allow attempts until one lands inside.
    let spray = "203.0.113.99";
    let mut refused = false;
    for i in 0..30 {
        let body = json!({"username": format!("nobody_{i}"), "password": "wrong password", "device_id": dev});
        let r = post_from(&s, spray, "/v1/sessions", body).await;
        if r.status.as_u16() == 429 {
            refused = true;
            break;
        }
        r.err(401, "bad_credentials");
    }
    assert!(refused, "an address spraying usernames is never refused");
}

/// Sign-ups and device registrations are limited per client address (429 with Retry-After); another
/// address is unaffected (issue 19, finding 4). Also: the proxy header is believed only from a trusted
/// proxy.
pub(crate) async fn case_sign_up_and_device_limits(stores: Stores) {
    let s = behind_proxy(
        stores.clone(),
        ApiConfig {
            sign_ups_per_hour: 2,
            devices_per_hour: 3,
            ..ApiConfig::default()
        },
    )
    .await;
    let device = json!({"type": "web"});
    for _ in 0..3 {
        post_from(&s, "203.0.113.1", "/v1/devices", device.clone())
            .await
            .ok(201);
    }
    let r = post_from(&s, "203.0.113.1", "/v1/devices", device.clone()).await;
    r.err(429, "rate_limited");
    assert!((1..=3600).contains(&r.retry_after.expect("Retry-After")));
    post_from(&s, "203.0.113.2", "/v1/devices", device.clone())
        .await
        .ok(201);

    let sign_up =
        || json!({"username": crate::server::unique_username("lim"), "password": "long enough"});
    for _ in 0..2 {
        post_from(&s, "203.0.113.1", "/v1/users", sign_up())
            .await
            .ok(201);
    }
    let r = post_from(&s, "203.0.113.1", "/v1/users", sign_up()).await;
    r.err(429, "rate_limited");
    assert!((1..=3600).contains(&r.retry_after.expect("Retry-After")));
    post_from(&s, "203.0.113.2", "/v1/users", sign_up())
        .await
        .ok(201);

    // Without a trusted proxy configured, the header is ignored: every request is the TCP peer's.
    let direct = start_with(
        stores,
        ApiConfig {
            devices_per_hour: 2,
            client_ip_header: "X-Forwarded-For".to_owned(),
            ..ApiConfig::default()
        },
    )
    .await;
    for (i, want) in [201, 201, 429].into_iter().enumerate() {
        let from = format!("203.0.113.{}", 10 + i);
        let r = post_from(&direct, &from, "/v1/devices", device.clone()).await;
        assert_eq!(r.status.as_u16(), want, "{from}: {:?}", r.body);
    }
}

/// Missing, malformed, foreign, expired and revoked tokens.
pub(crate) async fn case_auth_refusals(stores: Stores) {
    let s = start(stores).await;
    let u = s.user().await;
    s.get("/v1/users/me", As::Anonymous)
        .await
        .err(401, "unauthenticated");
    s.get("/v1/users/me", As::Token("not-a-token"))
        .await
        .err(401, "unauthenticated");
    let basic = s
        .http
        .get(format!("{}/v1/users/me", s.base))
        .header("authorization", format!("Basic {}", u.token));
    s.send(basic).await.err(401, "unauthenticated");

    let now = now_ms() / 1000;
    let claims = Claims {
        user_id: u.user_id,
        device_id: u.device_id,
        exp: now + 600,
        iat: now,
        iat_ms: None,
    };
    // Signed with another secret.
    let foreign = zhibo_auth::TokenKey::new("another secret").mint(&claims);
    s.get("/v1/users/me", As::Token(&foreign))
        .await
        .err(401, "unauthenticated");
    // Expired.
    let expired = s.key.mint(&Claims {
        exp: now - 1,
        iat: now - 100,
        ..claims.clone()
    });
    s.get("/v1/users/me", As::Token(&expired))
        .await
        .err(401, "token_expired");
    // Unknown device.
    let no_device = s.key.mint(&Claims {
        device_id: 777,
        ..claims.clone()
    });
    s.get("/v1/users/me", As::Token(&no_device))
        .await
        .err(401, "unauthenticated");
    // An app backend's token (seconds-only iat, as PyJWT would mint it) works.
    let backend = s.key.mint(&Claims {
        iat: now - 5,
        ..claims.clone()
    });
    s.get("/v1/users/me", As::Token(&backend)).await.ok(200);
    // A token "issued" far in the future would postdate every revocation cut-off: refused.
    let future = s.key.mint(&Claims {
        iat: now + 365 * 24 * 3600,
        exp: now + 400 * 24 * 3600,
        ..claims.clone()
    });
    s.get("/v1/users/me", As::Token(&future))
        .await
        .err(401, "unauthenticated");
    let future_ms = s.key.mint(&Claims {
        iat_ms: Some((now + 3600) * 1000),
        ..claims.clone()
    });
    s.get("/v1/users/me", As::Token(&future_ms))
        .await
        .err(401, "unauthenticated");

    // Sign-out revokes every token of the device issued so far, immediately.
    s.delete("/v1/sessions", u.auth()).await.ok(204);
    s.get("/v1/users/me", u.auth())
        .await
        .err(401, "token_revoked");
    s.get("/v1/users/me", As::Token(&backend))
        .await
        .err(401, "token_revoked");
    s.delete("/v1/sessions", u.auth())
        .await
        .err(401, "token_revoked");
    // A token issued after the sign-out works.
    let fresh = s
        .post(
            "/v1/admin/tokens",
            ADMIN,
            json!({"user_id": u.user_id, "device_id": u.device_id}),
        )
        .await
        .ok(200)["token"]
        .as_str()
        .expect("token")
        .to_owned();
    s.get("/v1/users/me", As::Token(&fresh)).await.ok(200);
}

/// Profiles: read any user, change only one's own, exact search.
pub(crate) async fn case_profiles(stores: Stores) {
    let s = start(stores).await;
    let (a, b) = (s.user().await, s.user().await);
    let got = s
        .get(&format!("/v1/users/{}", b.user_id), a.auth())
        .await
        .ok(200);
    assert_eq!(
        (got["user_id"].as_i64(), got["username"].as_str()),
        (Some(b.user_id), Some(b.username.as_str()))
    );
    s.get("/v1/users/123456", a.auth())
        .await
        .err(404, "user_not_found");

    let changed = s
        .patch(
            "/v1/users/me",
            a.auth(),
            json!({"nickname": "Ann", "avatar_url": "https://x/a.png", "extra": "{\"k\":1}"}),
        )
        .await
        .ok(200);
    assert_eq!(
        (changed["nickname"].as_str(), changed["avatar_url"].as_str()),
        (Some("Ann"), Some("https://x/a.png"))
    );
    // Absent fields keep their value.
    let again = s
        .patch("/v1/users/me", a.auth(), json!({"extra": ""}))
        .await
        .ok(200);
    assert_eq!(
        (again["nickname"].as_str(), again["extra"].as_str()),
        (Some("Ann"), Some(""))
    );
    // A's token changed A only.
    let b_now = s.get("/v1/users/me", b.auth()).await.ok(200);
    assert_eq!(b_now["nickname"], format!("nick {}", b.username).as_str());
    s.patch(
        "/v1/users/me",
        a.auth(),
        json!({"nickname": "n".repeat(65)}),
    )
    .await
    .err(400, "invalid_argument");
    // Names that disguise themselves and avatars that are not web URLs are refused.
    for nickname in ["ad\u{202E}nimda", "a\u{200B}dmin", "\u{2067}x"] {
        s.patch("/v1/users/me", a.auth(), json!({"nickname": nickname}))
            .await
            .err(400, "invalid_argument");
    }
    for avatar in [
        "javascript:alert(1)",
        "data:image/png;base64,AAAA",
        "ftp://x/a.png",
    ] {
        s.patch("/v1/users/me", a.auth(), json!({"avatar_url": avatar}))
            .await
            .err(400, "invalid_argument");
    }
    s.post(
        "/v1/users",
        As::Anonymous,
        json!({"username": crate::server::unique_username("bidi"), "password": "long enough",
               "nickname": "x\u{202E}y"}),
    )
    .await
    .err(400, "invalid_argument");
    s.patch("/v1/users/me", a.auth(), json!({"user_id": b.user_id}))
        .await
        .err(400, "bad_request");
    s.patch("/v1/users/me", As::Anonymous, json!({"nickname": "x"}))
        .await
        .err(401, "unauthenticated");

    let found = s
        .get(
            &format!("/v1/users/search?username={}", b.username),
            a.auth(),
        )
        .await
        .ok(200);
    assert_eq!(found["users"][0]["user_id"].as_i64(), Some(b.user_id));
    assert_eq!(found["users"].as_array().map(Vec::len), Some(1));
    let prefix = &b.username[..b.username.len() - 1];
    let none = s
        .get(&format!("/v1/users/search?username={prefix}"), a.auth())
        .await
        .ok(200);
    assert_eq!(none["users"], json!([]), "exact match only");
    s.get("/v1/users/search", a.auth())
        .await
        .err(400, "bad_request");
    s.get("/v1/users/search?username=x", As::Anonymous)
        .await
        .err(401, "unauthenticated");
}

/// The admin API: its secret, user upserts, token minting; disabled when no secret is configured.
pub(crate) async fn case_admin(stores: Stores) {
    let s = start(stores.clone()).await;
    let id = crate::server::unique_user_id();
    let name = crate::server::unique_username("adm");
    let path = format!("/v1/admin/users/{id}");
    let body = json!({"username": name, "nickname": "Boss"});
    s.call(Method::PUT, &path, As::Anonymous, Some(body.clone()))
        .await
        .err(401, "bad_admin_secret");
    s.call(
        Method::PUT,
        &path,
        As::Admin("wrong-secret-wrong-secret"),
        Some(body.clone()),
    )
    .await
    .err(401, "bad_admin_secret");
    let user = s.call(Method::PUT, &path, ADMIN, Some(body)).await.ok(200);
    assert_eq!(
        (user["user_id"].as_i64(), user["nickname"].as_str()),
        (Some(id), Some("Boss"))
    );
    // Upsert again: new username, nickname kept, old name freed.
    let renamed = crate::server::unique_username("adm");
    let user = s
        .call(
            Method::PUT,
            &path,
            ADMIN,
            Some(json!({"username": renamed})),
        )
        .await
        .ok(200);
    assert_eq!(
        (user["username"].as_str(), user["nickname"].as_str()),
        (Some(renamed.as_str()), Some("Boss"))
    );
    assert!(stores
        .users
        .get_user_by_username(&name)
        .await
        .expect("lookup")
        .is_none());
    // Another user's username.
    let other = s.user().await;
    s.call(
        Method::PUT,
        &path,
        ADMIN,
        Some(json!({"username": other.username})),
    )
    .await
    .err(409, "username_taken");
    s.call(
        Method::PUT,
        "/v1/admin/users/0",
        ADMIN,
        Some(json!({"username": "zero_id"})),
    )
    .await
    .err(400, "invalid_argument");

    // Minting.
    let dev = s.device().await;
    s.post(
        "/v1/admin/tokens",
        As::Anonymous,
        json!({"user_id": id, "device_id": dev}),
    )
    .await
    .err(401, "bad_admin_secret");
    s.post(
        "/v1/admin/tokens",
        ADMIN,
        json!({"user_id": 99, "device_id": dev}),
    )
    .await
    .err(404, "user_not_found");
    s.post(
        "/v1/admin/tokens",
        ADMIN,
        json!({"user_id": id, "device_id": 99}),
    )
    .await
    .err(404, "device_not_found");
    s.post(
        "/v1/admin/tokens",
        ADMIN,
        json!({"user_id": id, "device_id": dev, "ttl_secs": 0}),
    )
    .await
    .err(400, "invalid_argument");
    let minted = s
        .post(
            "/v1/admin/tokens",
            ADMIN,
            json!({"user_id": id, "device_id": dev, "ttl_secs": 60}),
        )
        .await
        .ok(200);
    let token = minted["token"].as_str().expect("token");
    assert_eq!(
        s.get("/v1/users/me", As::Token(token)).await.ok(200)["user_id"].as_i64(),
        Some(id)
    );

    // No secret configured: the admin API is off, whatever header is sent.
    let off = start_with(stores, ApiConfig::default()).await;
    off.post(
        "/v1/admin/tokens",
        ADMIN,
        json!({"user_id": id, "device_id": dev}),
    )
    .await
    .err(404, "admin_disabled");
    off.post(
        "/v1/admin/tokens",
        As::Admin(""),
        json!({"user_id": id, "device_id": dev}),
    )
    .await
    .err(404, "admin_disabled");
}

fn b64(s: &str) -> String {
    STANDARD.encode(s)
}

/// Message sends: server-side (no friendship needed) and as the caller (friends or group members only).
pub(crate) async fn case_messages(stores: Stores) {
    let s = start(stores.clone()).await;
    let (a, b, c) = (s.user().await, s.user().await, s.user().await);
    let msg_id = format!("srv-{}", crate::server::unique_username("m"));
    let send = json!({"from_user_id": a.user_id, "receiver_type": "user", "receiver_id": b.user_id,
                      "client_msg_id": msg_id, "content_type": 1, "content": b64("hello b")});
    s.post(
        "/v1/admin/messages",
        As::Admin("nope-nope-nope-nope"),
        send.clone(),
    )
    .await
    .err(401, "bad_admin_secret");
    let first = s
        .post("/v1/admin/messages", ADMIN, send.clone())
        .await
        .ok(200);
    let message_id: u64 = first["message_id"]
        .as_str()
        .expect("message_id is a string")
        .parse()
        .expect("u64");
    assert_eq!(first["seq"], 1);
    assert_eq!(first["duplicate"], false);
    let again = s.post("/v1/admin/messages", ADMIN, send).await.ok(200);
    assert_eq!(
        (again["message_id"].as_str(), again["duplicate"].as_bool()),
        (first["message_id"].as_str(), Some(true))
    );
    // Stored in both inboxes, content decoded from base64.
    let inbox = stores.messages.sync(b.user_id, 0, 10).await.expect("sync");
    assert_eq!(inbox.len(), 1);
    assert_eq!(
        (
            inbox[0].message_id,
            inbox[0].sender_user_id,
            inbox[0].sender_device_id
        ),
        (message_id, a.user_id, 0)
    );
    assert_eq!(&inbox[0].content[..], b"hello b");
    assert_eq!(
        stores
            .messages
            .sync(a.user_id, 0, 10)
            .await
            .expect("sync")
            .len(),
        1
    );

    let from_unknown = json!({"from_user_id": 5, "receiver_type": "user", "receiver_id": b.user_id,
                              "client_msg_id": "x1", "content": ""});
    s.post("/v1/admin/messages", ADMIN, from_unknown)
        .await
        .err(404, "user_not_found");

    // As the caller: strangers are refused, friends are not.
    let to_b = |id: &str| json!({"receiver_type": "user", "receiver_id": b.user_id, "client_msg_id": id, "content": b64("hi")});
    s.post("/v1/messages", a.auth(), to_b("m1"))
        .await
        .err(403, "not_friends");
    s.post(
        "/v1/friends/requests",
        a.auth(),
        json!({"to_user_id": b.user_id}),
    )
    .await
    .ok(201);
    s.post(
        &format!("/v1/friends/requests/{}/agree", a.user_id),
        b.auth(),
        json!({}),
    )
    .await
    .ok(200);
    let sent = s.post("/v1/messages", a.auth(), to_b("m1")).await.ok(200);
    assert_eq!(sent["seq"], 2, "A's second message");
    assert_eq!(
        sent["conv_seq"], 2,
        "the second message of A and B's conversation"
    );
    assert_eq!(sent["content_replaced"], false);
    assert!(sent.get("content").is_none(), "content only when replaced");
    // The recipient's copy names the sender but not the sending device; the sender's own copy does.
    let inbox = stores.messages.sync(b.user_id, 1, 10).await.expect("sync");
    assert_eq!(
        (inbox[0].sender_user_id, inbox[0].sender_device_id),
        (a.user_id, 0)
    );
    let own = stores.messages.sync(a.user_id, 1, 10).await.expect("sync");
    assert_eq!(
        (own[0].sender_user_id, own[0].sender_device_id),
        (a.user_id, a.device_id)
    );
    s.post("/v1/messages", a.auth(), to_b("m2")).await.ok(200);
    s.post("/v1/messages", As::Anonymous, to_b("m3"))
        .await
        .err(401, "unauthenticated");

    // Refusals mapped from the pipeline.
    let to = |kind: &str, id: i64, cid: &str, content: &str| json!({"receiver_type": kind, "receiver_id": id, "client_msg_id": cid, "content": content});
    s.post("/v1/messages", a.auth(), to("user", 31337, "m4", ""))
        .await
        .err(404, "user_not_found");
    s.post("/v1/messages", a.auth(), to("group", 31337, "m5", ""))
        .await
        .err(404, "group_not_found");
    s.post("/v1/messages", a.auth(), to("user", b.user_id, "", ""))
        .await
        .err(400, "invalid_argument");
    s.post(
        "/v1/messages",
        a.auth(),
        to("user", b.user_id, "m6", "not base64!"),
    )
    .await
    .err(400, "invalid_argument");
    // Negative content types are zhibo's (a -10 would show as a recall on B's screen).
    s.post(
        "/v1/messages",
        a.auth(),
        json!({"receiver_type": "user", "receiver_id": b.user_id, "client_msg_id": "m8",
               "content_type": -10, "content": ""}),
    )
    .await
    .err(400, "invalid_argument");
    s.post("/v1/messages", a.auth(), to("room", b.user_id, "m7", ""))
        .await
        .err(400, "bad_request");
    let group = s
        .post(
            "/v1/groups",
            b.auth(),
            json!({"name": "b's", "member_ids": [a.user_id]}),
        )
        .await
        .ok(201)["group_id"]
        .as_i64()
        .expect("group_id");
    s.post(
        "/v1/messages",
        c.auth(),
        to("group", group, "g1", &b64("let me in")),
    )
    .await
    .err(403, "not_group_member");
    let admin_to_group = json!({"from_user_id": c.user_id, "receiver_type": "group", "receiver_id": group,
                                "client_msg_id": "srv-g-1", "content": ""});
    s.post("/v1/admin/messages", ADMIN, admin_to_group)
        .await
        .err(403, "not_group_member");
    s.post(
        "/v1/messages",
        a.auth(),
        to("group", group, "g2", &b64("hi all")),
    )
    .await
    .ok(200);
    let b_inbox = stores.messages.sync(b.user_id, 0, 10).await.expect("sync");
    assert_eq!(
        b_inbox.last().map(|m| &m.content[..]),
        Some(&b"hi all"[..]),
        "group member got it"
    );
}

/// Friend requests, agreeing, refusing, remarks and unfriending.
pub(crate) async fn case_friends(stores: Stores) {
    let s = start(stores).await;
    let (a, b, c, d) = (
        s.user().await,
        s.user().await,
        s.user().await,
        s.user().await,
    );
    let ask = |to: i64| json!({"to_user_id": to, "message": "hi, it's me"});
    s.post("/v1/friends/requests", a.auth(), ask(a.user_id))
        .await
        .err(400, "invalid_argument");
    s.post("/v1/friends/requests", a.auth(), ask(4242))
        .await
        .err(404, "user_not_found");
    s.post("/v1/friends/requests", As::Anonymous, ask(b.user_id))
        .await
        .err(401, "unauthenticated");
    let req = s
        .post("/v1/friends/requests", a.auth(), ask(b.user_id))
        .await
        .ok(201);
    assert_eq!(
        (req["from_user_id"].as_i64(), req["to_user_id"].as_i64()),
        (Some(a.user_id), Some(b.user_id))
    );

    let incoming = s.get("/v1/friends/requests", b.auth()).await.ok(200);
    assert_eq!(
        incoming["requests"][0]["from_user_id"].as_i64(),
        Some(a.user_id)
    );
    assert_eq!(incoming["requests"][0]["message"], "hi, it's me");
    assert_eq!(
        s.get("/v1/friends/requests", a.auth()).await.ok(200)["requests"],
        json!([]),
        "incoming only"
    );

    // Only the addressee can answer: C has no request from A.
    let agree_a = format!("/v1/friends/requests/{}/agree", a.user_id);
    let refuse_a = format!("/v1/friends/requests/{}/refuse", a.user_id);
    s.post(&agree_a, c.auth(), json!({}))
        .await
        .err(404, "friend_request_not_found");
    s.post(&refuse_a, b.auth(), json!({})).await.ok(204);
    s.post(&refuse_a, b.auth(), json!({}))
        .await
        .err(404, "friend_request_not_found");
    assert_eq!(
        s.get("/v1/friends/requests", b.auth()).await.ok(200)["requests"],
        json!([])
    );

    s.post("/v1/friends/requests", a.auth(), ask(b.user_id))
        .await
        .ok(201);
    // Agree with no body at all.
    let agreed = s.call(Method::POST, &agree_a, b.auth(), None).await.ok(200);
    assert_eq!(agreed["friend_id"].as_i64(), Some(a.user_id));
    let ids = |v: &Value| -> Vec<i64> {
        v["friends"]
            .as_array()
            .expect("friends")
            .iter()
            .filter_map(|f| f["friend_id"].as_i64())
            .collect()
    };
    assert_eq!(
        ids(&s.get("/v1/friends", a.auth()).await.ok(200)),
        vec![b.user_id]
    );
    assert_eq!(
        ids(&s.get("/v1/friends", b.auth()).await.ok(200)),
        vec![a.user_id]
    );
    s.post("/v1/friends/requests", a.auth(), ask(b.user_id))
        .await
        .err(409, "already_friends");
    s.post("/v1/friends/requests", b.auth(), ask(a.user_id))
        .await
        .err(409, "already_friends");

    // Each side's remark is private.
    let path_b = format!("/v1/friends/{}", b.user_id);
    let f = s
        .patch(&path_b, a.auth(), json!({"remark": "Bee", "extra": "x"}))
        .await
        .ok(200);
    assert_eq!(
        (f["remark"].as_str(), f["extra"].as_str()),
        (Some("Bee"), Some("x"))
    );
    assert_eq!(
        s.get("/v1/friends", b.auth()).await.ok(200)["friends"][0]["remark"],
        ""
    );
    s.patch(
        &format!("/v1/friends/{}", c.user_id),
        a.auth(),
        json!({"remark": "no"}),
    )
    .await
    .err(404, "friend_not_found");

    // Both asked each other: agreeing one settles both.
    s.post("/v1/friends/requests", c.auth(), ask(d.user_id))
        .await
        .ok(201);
    s.post("/v1/friends/requests", d.auth(), ask(c.user_id))
        .await
        .ok(201);
    let f = s
        .post(
            &format!("/v1/friends/requests/{}/agree", c.user_id),
            d.auth(),
            json!({"remark": "Cee"}),
        )
        .await
        .ok(200);
    assert_eq!(f["remark"], "Cee");
    assert_eq!(
        s.get("/v1/friends/requests", c.auth()).await.ok(200)["requests"],
        json!([])
    );
    assert_eq!(
        s.get("/v1/friends/requests", d.auth()).await.ok(200)["requests"],
        json!([])
    );
    assert_eq!(
        ids(&s.get("/v1/friends", c.auth()).await.ok(200)),
        vec![d.user_id]
    );

    // Unfriending removes both directions.
    s.delete(&path_b, a.auth()).await.ok(204);
    assert_eq!(
        ids(&s.get("/v1/friends", a.auth()).await.ok(200)),
        Vec::<i64>::new()
    );
    assert_eq!(
        ids(&s.get("/v1/friends", b.auth()).await.ok(200)),
        Vec::<i64>::new()
    );
    s.delete(&path_b, a.auth())
        .await
        .err(404, "friend_not_found");
}

/// Groups: creation limits, who may read and change what, paging, leaving, transfer and dissolving.
pub(crate) async fn case_groups(stores: Stores) {
    let s = start_with(
        stores,
        ApiConfig {
            admin_secret: ADMIN_SECRET.to_owned(),
            max_group_size: 4,
            // Membership mechanics; consent is `case_group_add_policy`'s.
            group_add_policy: GroupAddPolicy::Open,
            ..ApiConfig::default()
        },
    )
    .await;
    let (a, b, c, d, e) = (
        s.user().await,
        s.user().await,
        s.user().await,
        s.user().await,
        s.user().await,
    );
    let create = |members: Vec<i64>| json!({"name": "crew", "introduction": "we chat", "member_ids": members});
    s.post("/v1/groups", a.auth(), create(vec![b.user_id, 4242]))
        .await
        .err(404, "user_not_found");
    s.post(
        "/v1/groups",
        a.auth(),
        create(vec![b.user_id, c.user_id, d.user_id, e.user_id]),
    )
    .await
    .err(400, "group_too_large");
    s.post(
        "/v1/groups",
        a.auth(),
        json!({"name": " ", "member_ids": []}),
    )
    .await
    .err(400, "invalid_argument");
    // The creator in member_ids and duplicates count once.
    let g = s
        .post(
            "/v1/groups",
            a.auth(),
            create(vec![b.user_id, c.user_id, c.user_id, a.user_id]),
        )
        .await
        .ok(201);
    assert_eq!(g["owner_id"].as_i64(), Some(a.user_id));
    let gid = g["group_id"].as_i64().expect("group_id");
    let path = format!("/v1/groups/{gid}");

    // Reading: members only.
    assert_eq!(s.get(&path, b.auth()).await.ok(200)["name"], "crew");
    s.get(&path, d.auth()).await.err(403, "not_group_member");
    s.get("/v1/groups/4242", a.auth())
        .await
        .err(404, "group_not_found");
    s.get(&path, As::Anonymous)
        .await
        .err(401, "unauthenticated");
    let mine = s.get("/v1/groups", b.auth()).await.ok(200);
    assert_eq!(mine["groups"][0]["group_id"].as_i64(), Some(gid));
    assert_eq!(
        s.get("/v1/groups", d.auth()).await.ok(200)["groups"],
        json!([])
    );

    // Member pages, ordered by user id.
    let members = format!("{path}/members");
    let page1 = s.get(&format!("{members}?limit=2"), b.auth()).await.ok(200);
    let first: Vec<i64> = page1["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m["user_id"].as_i64())
        .collect();
    assert_eq!(first.len(), 2);
    let after = page1["next_after"].as_i64().expect("next_after");
    assert_eq!(Some(&after), first.last());
    let page2 = s
        .get(&format!("{members}?limit=2&after={after}"), b.auth())
        .await
        .ok(200);
    assert_eq!(page2["members"].as_array().map(Vec::len), Some(1));
    assert_eq!(page2["next_after"], Value::Null);
    let all: BTreeSet<i64> = first
        .iter()
        .copied()
        .chain(page2["members"][0]["user_id"].as_i64())
        .collect();
    assert_eq!(all, BTreeSet::from([a.user_id, b.user_id, c.user_id]));
    let owner = s.get(&members, a.auth()).await.ok(200)["members"]
        .as_array()
        .expect("members")
        .iter()
        .find(|m| m["user_id"].as_i64() == Some(a.user_id))
        .cloned()
        .expect("owner listed");
    assert_eq!(owner["role"], "owner");
    s.get(&format!("{members}?limit=0"), a.auth())
        .await
        .err(400, "invalid_argument");
    s.get(&format!("{members}?limit=501"), a.auth())
        .await
        .err(400, "invalid_argument");
    s.get(&members, d.auth()).await.err(403, "not_group_member");

    // Changing the group: owner and admins.
    s.patch(&path, b.auth(), json!({"name": "mine now"}))
        .await
        .err(403, "forbidden");
    s.patch(&path, d.auth(), json!({"name": "mine now"}))
        .await
        .err(403, "not_group_member");
    assert_eq!(
        s.patch(&path, a.auth(), json!({"name": "crew 2"}))
            .await
            .ok(200)["name"],
        "crew 2"
    );
    s.post(&members, b.auth(), json!({"user_ids": [d.user_id]}))
        .await
        .err(403, "forbidden");

    // Roles: owner only.
    let member = |u: i64| format!("{path}/members/{u}");
    s.patch(&member(c.user_id), b.auth(), json!({"role": "admin"}))
        .await
        .err(403, "forbidden");
    let promoted = s
        .patch(&member(b.user_id), a.auth(), json!({"role": "admin"}))
        .await
        .ok(200);
    assert_eq!(promoted["role"], "admin");
    // An admin adds members, up to the size limit; already-members are skipped.
    let added = s
        .post(
            &members,
            b.auth(),
            json!({"user_ids": [d.user_id, c.user_id]}),
        )
        .await
        .ok(200);
    assert_eq!(added["added"], json!([d.user_id]));
    s.post(&members, b.auth(), json!({"user_ids": [e.user_id]}))
        .await
        .err(400, "group_too_large");
    s.post(&members, b.auth(), json!({"user_ids": [4242]}))
        .await
        .err(404, "user_not_found");
    s.patch(&member(d.user_id), b.auth(), json!({"role": "admin"}))
        .await
        .err(403, "forbidden");
    s.patch(&member(e.user_id), a.auth(), json!({"role": "admin"}))
        .await
        .err(404, "member_not_found");
    s.patch(&member(a.user_id), a.auth(), json!({"role": "member"}))
        .await
        .err(400, "invalid_argument");

    // Remarks: oneself, or the owner and admins.
    assert_eq!(
        s.patch(&member(d.user_id), d.auth(), json!({"remark": "dee"}))
            .await
            .ok(200)["remark"],
        "dee"
    );
    s.patch(&member(b.user_id), d.auth(), json!({"remark": "boss"}))
        .await
        .err(403, "forbidden");
    s.patch(&member(d.user_id), b.auth(), json!({"remark": "d."}))
        .await
        .ok(200);

    // Removing: owner and admins; never the owner; admins only by the owner.
    s.delete(&member(c.user_id), d.auth())
        .await
        .err(403, "forbidden");
    s.delete(&member(a.user_id), b.auth())
        .await
        .err(403, "cannot_remove_owner");
    s.delete(&member(c.user_id), b.auth()).await.ok(204);
    s.delete(&member(c.user_id), b.auth())
        .await
        .err(404, "member_not_found");
    s.get(&path, c.auth()).await.err(403, "not_group_member");

    // Leaving: not the owner.
    s.post(&format!("{path}/leave"), a.auth(), json!({}))
        .await
        .err(400, "owner_cannot_leave");
    s.post(&format!("{path}/leave"), d.auth(), json!({}))
        .await
        .ok(204);
    s.post(&format!("{path}/leave"), d.auth(), json!({}))
        .await
        .err(403, "not_group_member");
    s.get(&path, d.auth()).await.err(403, "not_group_member");

    // Dissolving: owner only. Transfer, then the old owner (now admin) may leave.
    s.delete(&path, b.auth()).await.err(403, "forbidden");
    let transferred = s
        .patch(&member(b.user_id), a.auth(), json!({"role": "owner"}))
        .await
        .ok(200);
    assert_eq!(transferred["role"], "owner");
    assert_eq!(
        s.get(&path, b.auth()).await.ok(200)["owner_id"].as_i64(),
        Some(b.user_id)
    );
    s.delete(&member(b.user_id), a.auth())
        .await
        .err(403, "cannot_remove_owner");
    s.post(&format!("{path}/leave"), a.auth(), json!({}))
        .await
        .ok(204);
    s.delete(&path, b.auth()).await.ok(204);
    s.get(&path, b.auth()).await.err(404, "group_not_found");
    assert_eq!(
        s.get("/v1/groups", b.auth()).await.ok(200)["groups"],
        json!([])
    );
}

/// Racing changes of one group are serialized (outside audit: two transfers by one owner made two
/// owners; a transfer racing the removal of its target left the group owned by a non-member): one of
/// two transfers wins and the other is refused; a transfer and a removal of the same member never both
/// succeed; the group always has exactly one owner, a member, named by `owner_id`.
pub(crate) async fn case_group_changes_are_serialized(stores: Stores) {
    let s = start_with(
        stores,
        ApiConfig {
            admin_secret: ADMIN_SECRET.to_owned(),
            group_add_policy: GroupAddPolicy::Open,
            ..ApiConfig::default()
        },
    )
    .await;
    let (o, a, m) = (s.user().await, s.user().await, s.user().await);
    for round in 0..8 {
        let create = json!({"name": format!("race {round}"), "member_ids": [a.user_id, m.user_id]});
        let gid = s.post("/v1/groups", o.auth(), create).await.ok(201)["group_id"]
            .as_i64()
            .expect("group_id");
        let member = |u: i64| format!("/v1/groups/{gid}/members/{u}");

        // Two transfers by the same owner at once.
        let (path_a, path_m) = (member(a.user_id), member(m.user_id));
        let (to_a, to_m) = tokio::join!(
            s.patch(&path_a, o.auth(), json!({"role": "owner"})),
            s.patch(&path_m, o.auth(), json!({"role": "owner"})),
        );
        let statuses = [to_a.status.as_u16(), to_m.status.as_u16()];
        let winner = match statuses {
            [200, 403] => a.user_id,
            [403, 200] => m.user_id,
            other => panic!("round {round}: two transfers answered {other:?}: {to_a:?} {to_m:?}"),
        };
        assert_eq!(
            group_owners(&s, gid, &[&o, &a, &m]).await,
            [winner],
            "round {round}: one owner"
        );
        let group = s.get(&format!("/v1/groups/{gid}"), o.auth()).await.ok(200);
        assert_eq!(group["owner_id"].as_i64(), Some(winner), "round {round}");

        // A transfer (by the new owner) racing the removal of its target (by the old owner, an admin
        // now): never both.
        let loser = if winner == a.user_id {
            m.user_id
        } else {
            a.user_id
        };
        let new_owner = if winner == a.user_id { &a } else { &m };
        // The old owner is an admin; the loser a member it may remove.
        let path_loser = member(loser);
        let (transfer, removal) = tokio::join!(
            s.patch(&path_loser, new_owner.auth(), json!({"role": "owner"})),
            s.delete(&path_loser, o.auth()),
        );
        match (transfer.status.as_u16(), removal.status.as_u16()) {
            // Transferred first: the owner cannot be removed.
            (200, 403) => {
                removal.err(403, "cannot_remove_owner");
                assert_eq!(
                    group_owners(&s, gid, &[&o, &a, &m]).await,
                    [loser],
                    "round {round}"
                );
            }
            // Removed first: no member to transfer to.
            (404, 204) => {
                transfer.err(404, "member_not_found");
                assert_eq!(
                    group_owners(&s, gid, &[&o, &a, &m]).await,
                    [winner],
                    "round {round}"
                );
            }
            other => panic!(
                "round {round}: transfer and removal answered {other:?}: {transfer:?} {removal:?}"
            ),
        }
        let owner = group_owners(&s, gid, &[&o, &a, &m]).await[0];
        let group = s
            .get(&format!("/v1/groups/{gid}"), new_owner.auth())
            .await
            .ok(200);
        assert_eq!(group["owner_id"].as_i64(), Some(owner), "round {round}");
    }
}

/// The `user_id`s with role `owner` in `gid`'s member list, asked as the first of `asking` still a member.
async fn group_owners(s: &TestServer, gid: i64, asking: &[&TestUser]) -> Vec<i64> {
    for who in asking {
        let reply = s
            .get(&format!("/v1/groups/{gid}/members?limit=500"), who.auth())
            .await;
        if reply.status.as_u16() != 200 {
            continue;
        }
        return reply.body["members"]
            .as_array()
            .expect("members")
            .iter()
            .filter(|m| m["role"] == "owner")
            .map(|m| m["user_id"].as_i64().expect("user_id"))
            .collect();
    }
    panic!("none of {asking:?} is a member of group {gid}");
}

/// `/openapi.json` lists exactly the routes the router serves.
pub(crate) async fn case_openapi_matches_router(stores: Stores) {
    let s = start(stores).await;
    let doc = s.get("/openapi.json", As::Anonymous).await.ok(200);
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "OpenAPI 3: {:?}",
        doc["openapi"]
    );
    let methods = [
        "get", "put", "post", "delete", "patch", "head", "options", "trace",
    ];
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .expect("path item")
                .keys()
                .filter(|k| methods.contains(&k.as_str()))
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect();
    let served: BTreeSet<(String, String)> = zhibo_user_api::route_table()
        .into_iter()
        .map(|(m, p)| (m.to_string(), p.to_owned()))
        .collect();
    assert_eq!(
        documented, served,
        "documented routes differ from the router's table"
    );

    // Every route in the table is really routed: no generic 404/405 for it.
    for (method, path) in &served {
        let concrete = path
            .split('/')
            .map(|seg| if seg.starts_with('{') { "1" } else { seg })
            .collect::<Vec<_>>()
            .join("/");
        let method = Method::from_bytes(method.as_bytes()).expect("method");
        let reply = s.call(method.clone(), &concrete, As::Anonymous, None).await;
        let code = reply.body["error"]["code"].as_str().unwrap_or_default();
        assert!(
            code != "not_found" && code != "method_not_allowed",
            "{method} {path} is documented but not routed: {:?}",
            reply.body
        );
        // Every documented schema reference resolves.
        let op = &doc["paths"][path][method.as_str().to_lowercase()];
        for r in refs(op) {
            let name = r.trim_start_matches("#/components/schemas/");
            assert!(
                doc["components"]["schemas"][name].is_object(),
                "{method} {path}: dangling {r}"
            );
        }
    }
    // And what is not in the table is not routed.
    s.call(Method::PUT, "/v1/devices", As::Anonymous, None)
        .await
        .err(405, "method_not_allowed");
    s.get("/v1/messages/1", As::Anonymous)
        .await
        .err(404, "not_found");
}

fn refs(v: &Value) -> Vec<String> {
    match v {
        Value::Object(map) => map
            .iter()
            .flat_map(|(k, v)| match (k.as_str(), v) {
                ("$ref", Value::String(r)) => vec![r.clone()],
                _ => refs(v),
            })
            .collect(),
        Value::Array(items) => items.iter().flat_map(refs).collect(),
        _ => Vec::new(),
    }
}

/// A device belongs to the first user who signs in on it: nobody else can sign in on it, use a token for
/// it or move its revocation cut-off (issue 19, finding 1: carol used to sign out bob's device).
pub(crate) async fn case_device_bound_to_its_user(stores: Stores) {
    let s = start(stores.clone()).await;
    let pw = "correct horse";
    let bob = s.signed_up(pw).await;
    let carol = s.signed_up(pw).await;
    let on_bobs = json!({"username": carol.username, "password": pw, "device_id": bob.device_id});
    s.post("/v1/sessions", As::Anonymous, on_bobs)
        .await
        .err(403, "device_taken");
    s.post(
        "/v1/admin/tokens",
        ADMIN,
        json!({"user_id": carol.user_id, "device_id": bob.device_id}),
    )
    .await
    .err(403, "device_taken");
    // A token for carol on bob's device from anyone holding the secret (an app backend) is refused too,
    // for the API and for sign-out.
    let now = now_ms() / 1000;
    let forged = s.key.mint(&Claims {
        user_id: carol.user_id,
        device_id: bob.device_id,
        exp: now + 600,
        iat: now,
        iat_ms: Some(now_ms()),
    });
    s.get("/v1/users/me", As::Token(&forged))
        .await
        .err(401, "unauthenticated");
    s.delete("/v1/sessions", As::Token(&forged))
        .await
        .err(401, "unauthenticated");
    // Bob is untouched.
    assert_eq!(
        s.get("/v1/users/me", bob.auth()).await.ok(200)["user_id"].as_i64(),
        Some(bob.user_id)
    );
    let device = stores
        .devices
        .get_device(bob.device_id)
        .await
        .expect("get")
        .expect("device");
    assert_eq!(
        (device.owner_user_id, device.tokens_valid_after_ms),
        (bob.user_id, 0)
    );
    // Bob signs in again on his own device; his sign-out revokes only his device.
    s.post(
        "/v1/sessions",
        As::Anonymous,
        json!({"username": bob.username, "password": pw, "device_id": bob.device_id}),
    )
    .await
    .ok(200);
    s.delete("/v1/sessions", carol.auth()).await.ok(204);
    s.get("/v1/users/me", bob.auth()).await.ok(200);
    s.get("/v1/users/me", carol.auth())
        .await
        .err(401, "token_revoked");
    // A device that only ever had minted tokens is bound at its first sign-out (or mint).
    let dev = s.device().await;
    let token = |user_id: i64| {
        s.key.mint(&Claims {
            user_id,
            device_id: dev,
            exp: now + 600,
            iat: now,
            iat_ms: Some(now_ms()),
        })
    };
    let (carols, bobs) = (token(carol.user_id), token(bob.user_id));
    s.delete("/v1/sessions", As::Token(&bobs)).await.ok(204);
    s.get("/v1/users/me", As::Token(&carols))
        .await
        .err(401, "unauthenticated");
    // An unbound device (registered before binding existed, or used only with minted tokens) is bound
    // by the first authenticated use of a valid token, so nobody can take it over with a password
    // sign-in afterwards (and then revoke its owner's tokens).
    let dev = s.device().await;
    let bobs = s.key.mint(&Claims {
        user_id: bob.user_id,
        device_id: dev,
        exp: now + 600,
        iat: now,
        iat_ms: Some(now_ms()),
    });
    s.get("/v1/users/me", As::Token(&bobs)).await.ok(200);
    let takeover = json!({"username": carol.username, "password": pw, "device_id": dev});
    s.post("/v1/sessions", As::Anonymous, takeover)
        .await
        .err(403, "device_taken");
    s.get("/v1/users/me", As::Token(&bobs)).await.ok(200);
}

/// Makes `a` and `b` friends.
async fn befriend(
    s: &crate::server::TestServer,
    a: &crate::server::TestUser,
    b: &crate::server::TestUser,
) {
    s.post(
        "/v1/friends/requests",
        a.auth(),
        json!({"to_user_id": b.user_id}),
    )
    .await
    .ok(201);
    s.post(
        &format!("/v1/friends/requests/{}/agree", a.user_id),
        b.auth(),
        json!({}),
    )
    .await
    .ok(200);
}

/// Nobody is put into a group without consent (issue 19, finding 3: a stranger refused `not_friends`
/// created a group with the target and wrote there). Default policy `invite`: friends are added,
/// strangers invited, and a stranger's group message never reaches someone who has not accepted.
/// Policy `friends`: strangers are refused.
pub(crate) async fn case_group_add_policy(stores: Stores) {
    let s = start(stores.clone()).await;
    let (stranger, target, friend) = (s.user().await, s.user().await, s.user().await);
    befriend(&s, &stranger, &friend).await;
    let dm = json!({"receiver_type": "user", "receiver_id": target.user_id, "client_msg_id": "dm",
                    "content": b64("hi")});
    s.post("/v1/messages", stranger.auth(), dm)
        .await
        .err(403, "not_friends");

    let created = s
        .post(
            "/v1/groups",
            stranger.auth(),
            json!({"name": "trap", "member_ids": [target.user_id, friend.user_id]}),
        )
        .await
        .ok(201);
    let group_id = created["group_id"].as_i64().expect("group_id");
    assert_eq!(created["invited"], json!([target.user_id]), "{created}");
    let members = s
        .get(&format!("/v1/groups/{group_id}/members"), stranger.auth())
        .await
        .ok(200);
    let ids: BTreeSet<i64> = members["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m["user_id"].as_i64())
        .collect();
    assert_eq!(ids, BTreeSet::from([stranger.user_id, friend.user_id]));
    // The stranger writes to the group: the target, only invited, gets nothing.
    let to_group = |id: &str| {
        json!({"receiver_type": "group", "receiver_id": group_id, "client_msg_id": id,
                                     "content": b64("buy now")})
    };
    s.post("/v1/messages", stranger.auth(), to_group("g1"))
        .await
        .ok(200);
    assert!(
        stores
            .messages
            .sync(target.user_id, 0, 10)
            .await
            .expect("sync")
            .is_empty(),
        "an invitee receives nothing from the group"
    );
    assert_eq!(
        stores
            .messages
            .sync(friend.user_id, 0, 10)
            .await
            .expect("sync")
            .len(),
        1
    );
    s.get(&format!("/v1/groups/{group_id}"), target.auth())
        .await
        .err(403, "not_group_member");
    // Adding the target again invites again; it does not add.
    let again = s
        .post(
            &format!("/v1/groups/{group_id}/members"),
            stranger.auth(),
            json!({"user_ids": [target.user_id]}),
        )
        .await
        .ok(200);
    assert_eq!(
        (again["added"].clone(), again["invited"].clone()),
        (json!([]), json!([target.user_id]))
    );

    // The target sees the invitation and refuses it: still not a member, nothing pending.
    let list = s.get("/v1/groups/invitations", target.auth()).await.ok(200);
    assert_eq!(
        list["invitations"].as_array().map(Vec::len),
        Some(1),
        "{list}"
    );
    assert_eq!(list["invitations"][0]["group_id"].as_i64(), Some(group_id));
    assert_eq!(list["invitations"][0]["group_name"], "trap");
    assert_eq!(
        list["invitations"][0]["inviter_id"].as_i64(),
        Some(stranger.user_id)
    );
    let refuse = format!("/v1/groups/invitations/{group_id}/refuse");
    s.post(&refuse, target.auth(), json!({})).await.ok(204);
    s.post(&refuse, target.auth(), json!({}))
        .await
        .err(404, "group_invitation_not_found");
    s.post(
        &format!("/v1/groups/invitations/{group_id}/accept"),
        target.auth(),
        json!({}),
    )
    .await
    .err(404, "group_invitation_not_found");
    assert_eq!(
        s.get("/v1/groups/invitations", target.auth()).await.ok(200)["invitations"],
        json!([])
    );

    // Invited once more, the target accepts: a member, and the group's messages arrive.
    s.post(
        &format!("/v1/groups/{group_id}/members"),
        stranger.auth(),
        json!({"user_ids": [target.user_id]}),
    )
    .await
    .ok(200);
    let joined = s
        .post(
            &format!("/v1/groups/invitations/{group_id}/accept"),
            target.auth(),
            json!({}),
        )
        .await
        .ok(200);
    assert_eq!(joined["group_id"].as_i64(), Some(group_id));
    s.get(&format!("/v1/groups/{group_id}"), target.auth())
        .await
        .ok(200);
    s.post("/v1/messages", stranger.auth(), to_group("g2"))
        .await
        .ok(200);
    assert_eq!(
        stores
            .messages
            .sync(target.user_id, 0, 10)
            .await
            .expect("sync")
            .len(),
        1,
        "after accepting, the next group message arrives"
    );

    // An invitation into a dissolved group is gone.
    let other = s.user().await;
    let g2 = s
        .post(
            "/v1/groups",
            stranger.auth(),
            json!({"name": "gone", "member_ids": [other.user_id]}),
        )
        .await
        .ok(201)["group_id"]
        .as_i64()
        .expect("group_id");
    s.delete(&format!("/v1/groups/{g2}"), stranger.auth())
        .await
        .ok(204);
    assert_eq!(
        s.get("/v1/groups/invitations", other.auth()).await.ok(200)["invitations"],
        json!([])
    );
    s.post(
        &format!("/v1/groups/invitations/{g2}/accept"),
        other.auth(),
        json!({}),
    )
    .await
    .err(404, "group_not_found");

    // Policy `friends`: a stranger cannot be put in a group at all; friends still can.
    let strict = start_with(
        stores,
        ApiConfig {
            admin_secret: ADMIN_SECRET.to_owned(),
            group_add_policy: GroupAddPolicy::Friends,
            ..ApiConfig::default()
        },
    )
    .await;
    strict
        .post(
            "/v1/groups",
            stranger.auth(),
            json!({"name": "trap2", "member_ids": [other.user_id, friend.user_id]}),
        )
        .await
        .err(403, "not_friends");
    let ok = strict
        .post(
            "/v1/groups",
            stranger.auth(),
            json!({"name": "pals", "member_ids": [friend.user_id]}),
        )
        .await
        .ok(201);
    assert_eq!(ok["invited"], json!([]));
    strict
        .post(
            &format!("/v1/groups/{}/members", ok["group_id"]),
            stranger.auth(),
            json!({"user_ids": [other.user_id]}),
        )
        .await
        .err(403, "not_friends");
}

/// Issue 17: a room's chat display rate — readable by any signed-in user (0 until set), set by the app
/// backend or the room's owner and admins (others: 403; a room without a record: 404), bounded.
pub(crate) async fn case_room_shaping(stores: Stores) {
    let s = start(stores).await;
    let owner = s.user().await;
    let viewer = s.user().await;
    let room = crate::server::unique_user_id();
    let path = format!("/v1/rooms/{room}/shaping");
    let shaping = s.get(&path, As::Token(&viewer.token)).await.ok(200);
    assert_eq!(shaping["chat_per_sec"].as_u64(), Some(0), "unset: all chat");
    s.call(
        Method::PUT,
        &path,
        As::Token(&owner.token),
        Some(json!({"chat_per_sec": 40})),
    )
    .await
    .err(404, "room_not_found");
    let admin_path = format!("/v1/admin/rooms/{room}");
    s.call(
        Method::PUT,
        &admin_path,
        ADMIN,
        Some(json!({"owner_user_id": owner.user_id})),
    )
    .await
    .ok(200);
    s.call(
        Method::PUT,
        &path,
        As::Token(&viewer.token),
        Some(json!({"chat_per_sec": 1})),
    )
    .await
    .err(403, "forbidden");
    let set = s
        .call(
            Method::PUT,
            &path,
            As::Token(&owner.token),
            Some(json!({"chat_per_sec": 40})),
        )
        .await
        .ok(200);
    assert_eq!(set["chat_per_sec"].as_u64(), Some(40));
    let read = s.get(&path, As::Token(&viewer.token)).await.ok(200);
    assert_eq!(read["chat_per_sec"].as_u64(), Some(40));
    let by_admin = format!("/v1/admin/rooms/{room}/shaping");
    s.call(
        Method::PUT,
        &by_admin,
        ADMIN,
        Some(json!({"chat_per_sec": 100_001})),
    )
    .await
    .err(400, "invalid_argument");
    let set = s
        .call(
            Method::PUT,
            &by_admin,
            ADMIN,
            Some(json!({"chat_per_sec": 0})),
        )
        .await
        .ok(200);
    assert_eq!(set["chat_per_sec"].as_u64(), Some(0));
}

/// Node leases that refuse to be acquired until opened (a lease store that is slow or down).
struct GatedLeases {
    inner: std::sync::Arc<dyn zhibo_store::leases::NodeLeases>,
    open: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl zhibo_store::leases::NodeLeases for GatedLeases {
    async fn acquire(
        &self,
        pool: zhibo_store::leases::Pool,
        owner: &str,
        ttl: std::time::Duration,
        now_ms: i64,
    ) -> zhibo_store::Result<zhibo_store::leases::Lease> {
        if !self.open.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(zhibo_store::Error::new(
                zhibo_store::ErrorKind::Unavailable,
                "gated",
            ));
        }
        self.inner.acquire(pool, owner, ttl, now_ms).await
    }

    async fn renew(
        &self,
        lease: &zhibo_store::leases::Lease,
        ttl: std::time::Duration,
        high_water_ms: i64,
    ) -> zhibo_store::Result<()> {
        self.inner.renew(lease, ttl, high_water_ms).await
    }

    async fn release(
        &self,
        lease: &zhibo_store::leases::Lease,
        high_water_ms: i64,
    ) -> zhibo_store::Result<()> {
        self.inner.release(lease, high_water_ms).await
    }
}

/// `/readyz` stays 503 until an entity-id node lease is held; meanwhile an entity creation answers
/// 503 `unavailable` (retryable); once the lease is held both succeed.
pub(crate) async fn case_ready_needs_a_node_lease(stores: Stores) {
    let gate = std::sync::Arc::new(GatedLeases {
        inner: stores.leases.clone(),
        open: std::sync::atomic::AtomicBool::new(false),
    });
    let s = start_unready(
        Stores {
            leases: gate.clone(),
            ..stores
        },
        ApiConfig {
            admin_secret: ADMIN_SECRET.to_owned(),
            ..ApiConfig::default()
        },
    )
    .await;
    s.get("/readyz", As::Anonymous).await.err(503, "not_ready");
    s.post("/v1/devices", As::Anonymous, json!({"type": "ios"}))
        .await
        .err(503, "unavailable");
    s.get("/readyz", As::Anonymous).await.err(503, "not_ready");
    gate.open.store(true, std::sync::atomic::Ordering::Relaxed);
    s.wait_ready().await;
    s.post("/v1/devices", As::Anonymous, json!({"type": "ios"}))
        .await
        .ok(201);
}

/// A group store whose member writes land and then report a failure (a write that timed out but was
/// applied) while `failing` is set.
struct LandsThenFails {
    inner: std::sync::Arc<dyn zhibo_store::GroupStore>,
    failing: std::sync::atomic::AtomicBool,
}

impl LandsThenFails {
    fn outcome(&self) -> zhibo_store::Result<()> {
        if self.failing.load(std::sync::atomic::Ordering::Relaxed) {
            Err(zhibo_store::Error::new(
                zhibo_store::ErrorKind::Unavailable,
                "timed out after it was applied",
            ))
        } else {
            Ok(())
        }
    }
}

#[async_trait::async_trait]
impl zhibo_store::GroupStore for LandsThenFails {
    async fn put_group(&self, group: &zhibo_store::Group) -> zhibo_store::Result<()> {
        self.inner.put_group(group).await
    }
    async fn get_group(&self, group_id: i64) -> zhibo_store::Result<Option<zhibo_store::Group>> {
        self.inner.get_group(group_id).await
    }
    async fn delete_group(&self, group_id: i64) -> zhibo_store::Result<()> {
        self.inner.delete_group(group_id).await?;
        self.outcome()
    }
    async fn put_member(&self, member: &zhibo_store::GroupMember) -> zhibo_store::Result<()> {
        self.inner.put_member(member).await?;
        self.outcome()
    }
    async fn transfer_ownership(
        &self,
        group: &zhibo_store::Group,
        new_owner: &zhibo_store::GroupMember,
        old_owner: &zhibo_store::GroupMember,
    ) -> zhibo_store::Result<()> {
        self.inner
            .transfer_ownership(group, new_owner, old_owner)
            .await
    }
    async fn get_member(
        &self,
        group_id: i64,
        user_id: i64,
    ) -> zhibo_store::Result<Option<zhibo_store::GroupMember>> {
        self.inner.get_member(group_id, user_id).await
    }
    async fn delete_member(&self, group_id: i64, user_id: i64) -> zhibo_store::Result<()> {
        self.inner.delete_member(group_id, user_id).await?;
        self.outcome()
    }
    async fn list_members(
        &self,
        group_id: i64,
        after_user_id: i64,
        limit: usize,
    ) -> zhibo_store::Result<Vec<zhibo_store::GroupMember>> {
        self.inner
            .list_members(group_id, after_user_id, limit)
            .await
    }
    async fn member_ids(&self, group_id: i64) -> zhibo_store::Result<Vec<i64>> {
        self.inner.member_ids(group_id).await
    }
    async fn groups_of_user(&self, user_id: i64) -> zhibo_store::Result<Vec<i64>> {
        self.inner.groups_of_user(user_id).await
    }
}

/// A membership write that fails after it landed still replaces the group's membership version
/// (cached member lists are read again): the request answers 503 and a retry finds nothing to do.
pub(crate) async fn case_failed_membership_writes_still_bump_the_version(stores: Stores) {
    let groups = std::sync::Arc::new(LandsThenFails {
        inner: stores.groups.clone(),
        failing: std::sync::atomic::AtomicBool::new(false),
    });
    let seq = stores.seq.clone();
    let s = start_with(
        Stores {
            groups: groups.clone(),
            ..stores
        },
        ApiConfig {
            admin_secret: ADMIN_SECRET.to_owned(),
            group_add_policy: GroupAddPolicy::Open,
            ..ApiConfig::default()
        },
    )
    .await;
    let (a, b, c) = (s.user().await, s.user().await, s.user().await);
    let g = s
        .post(
            "/v1/groups",
            a.auth(),
            json!({"name": "crew", "member_ids": [b.user_id]}),
        )
        .await
        .ok(201);
    let gid = g["group_id"].as_i64().expect("group_id");
    let version = || async { seq.group_version(gid).await.expect("version") };
    groups
        .failing
        .store(true, std::sync::atomic::Ordering::Relaxed);
    // Each write below lands, answers 503, and replaces the version all the same.
    let before = version().await;
    s.delete(&format!("/v1/groups/{gid}/members/{}", b.user_id), a.auth())
        .await
        .err(503, "unavailable");
    let after_kick = version().await;
    assert_ne!(after_kick, before, "a kick that failed after landing");
    s.post(
        &format!("/v1/groups/{gid}/members"),
        a.auth(),
        json!({"user_ids": [c.user_id]}),
    )
    .await
    .err(503, "unavailable");
    let after_add = version().await;
    assert_ne!(after_add, after_kick, "an add that failed after landing");
    s.post(&format!("/v1/groups/{gid}/leave"), c.auth(), json!({}))
        .await
        .err(503, "unavailable");
    assert_ne!(
        version().await,
        after_add,
        "a leave that failed after landing"
    );
    // The writes landed: the kicked member is out, the one who left too.
    groups
        .failing
        .store(false, std::sync::atomic::Ordering::Relaxed);
    let members = s
        .get(&format!("/v1/groups/{gid}/members"), a.auth())
        .await
        .ok(200);
    let ids: Vec<i64> = members["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m["user_id"].as_i64())
        .collect();
    assert_eq!(ids, vec![a.user_id]);
}
