//! Creating the population: users through the admin API (no password hashing), devices through
//! `POST /v1/devices`, tokens minted locally with the shared secret. All concurrent.

use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use futures::{StreamExt, TryStreamExt};
use serde_json::json;

use super::server::Target;
use crate::client::Credentials;
use crate::http::Api;

/// HTTP calls in flight while creating users and devices.
const SETUP_CONCURRENCY: usize = 64;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A user id range nobody used before: `now_ms * 1000`, below the API's 2^53 limit.
pub fn fresh_user_base() -> i64 {
    now_ms() * 1000 + i64::from(rand::random::<u16>() % 1000)
}

/// Mints a token for `user_id` / `device_id` valid for a day.
pub fn mint(secret: &str, user_id: i64, device_id: i64) -> String {
    let now = now_ms();
    zhibo_auth::TokenKey::new(secret).mint(&zhibo_auth::Claims {
        user_id,
        device_id,
        exp: now / 1000 + 86_400,
        iat: now / 1000,
        iat_ms: Some(now),
    })
}

/// `n` signed-in identities: each a device (registered) of a user (created when `with_users`; viewers of
/// rooms and idle connections need no user record, only a device).
///
/// # Errors
/// When an API call fails.
pub async fn population(
    target: &Target,
    n: usize,
    with_users: bool,
) -> anyhow::Result<Vec<Credentials>> {
    let api = Api::new(&target.api);
    let base = fresh_user_base();
    let made: Vec<Credentials> = futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let user_id = base + i as i64;
                if with_users {
                    api.put_admin(
                        &format!("/v1/admin/users/{user_id}"),
                        &target.admin_secret,
                        json!({ "username": format!("lt{user_id}") }),
                    )
                    .await
                    .context("create user (is the admin secret right?)")?;
                }
                let device_id = api.register_device("android").await?;
                anyhow::Ok(Credentials {
                    user_id,
                    device_id,
                    token: mint(&target.token_secret, user_id, device_id),
                })
            }
        })
        .buffered(SETUP_CONCURRENCY)
        .try_collect()
        .await?;
    Ok(made)
}

/// Makes each pair friends (ignored when they already are, or when the server allows strangers).
pub async fn befriend_pairs(target: &Target, pairs: &[(Credentials, Credentials)]) {
    let api = Api::new(&target.api);
    futures::stream::iter(pairs)
        .for_each_concurrent(SETUP_CONCURRENCY, |(a, b)| {
            let api = api.clone();
            async move {
                let _ = api
                    .post(
                        "/v1/friends/requests",
                        Some(&a.token),
                        json!({"to_user_id": b.user_id, "message": "bench"}),
                    )
                    .await;
                let _ = api
                    .post(
                        &format!("/v1/friends/requests/{}/agree", a.user_id),
                        Some(&b.token),
                        json!({}),
                    )
                    .await;
            }
        })
        .await;
}

/// The source address for connection `i`: 127.0.0.2, .3, … spread over `ips` addresses (0 = let the
/// kernel choose).
pub fn source_ip(i: usize, ips: usize) -> Option<IpAddr> {
    (ips > 0).then(|| IpAddr::from([127, 0, 0, 2 + (i % ips.min(250)) as u8]))
}
