//! Devices, sign-up, sign-in/out and profiles.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use zhibo_auth::Claims;
use zhibo_store::ids::now_ms;
use zhibo_store::{Device, ErrorKind, Profile, User};

use crate::auth::{hash_password, verify_password, Caller};
use crate::client_ip::ClientIp;
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use crate::rate_limit::SlidingWindow;
use crate::state::AppState;
use crate::validate::{self, MAX_NAME, MAX_URL};

/// The kind of app install.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum DeviceType {
    Android,
    Ios,
    Web,
    Pc,
}

impl DeviceType {
    fn as_str(self) -> &'static str {
        match self {
            DeviceType::Android => "android",
            DeviceType::Ios => "ios",
            DeviceType::Web => "web",
            DeviceType::Pc => "pc",
        }
    }
}

/// Registers an app install.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateDevice {
    #[serde(rename = "type")]
    device_type: DeviceType,
    #[serde(default)]
    brand: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    system_version: String,
    #[serde(default)]
    sdk_version: String,
}

/// The new device.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DeviceCreated {
    device_id: i64,
}

pub(crate) async fn create_device(
    State(st): State<AppState>,
    ClientIp(ip): ClientIp,
    ApiJson(req): ApiJson<CreateDevice>,
) -> Result<(StatusCode, ApiJson<DeviceCreated>), ApiError> {
    per_address(&st.device_limit, ip)?;
    for (field, value) in [
        ("brand", &req.brand),
        ("model", &req.model),
        ("system_version", &req.system_version),
        ("sdk_version", &req.sdk_version),
    ] {
        validate::text(field, value, MAX_NAME)?;
    }
    let device = Device {
        device_id: st.ids.next_i64().await?,
        device_type: req.device_type.as_str().to_owned(),
        brand: req.brand,
        model: req.model,
        system_version: req.system_version,
        sdk_version: req.sdk_version,
        tokens_valid_after_ms: 0,
        created_at_ms: now_ms(),
        // Bound by the first sign-in (or token minted) on it.
        owner_user_id: 0,
    };
    st.stores.devices.insert_device(&device).await?;
    Ok((
        StatusCode::CREATED,
        ApiJson(DeviceCreated {
            device_id: device.device_id,
        }),
    ))
}

/// Signs up with a username and password.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SignUp {
    /// 3 to 32 of `a-z 0-9 _ . -`.
    username: String,
    /// 8 to 128 characters.
    password: String,
    /// Display name; the username when absent.
    #[serde(default)]
    nickname: Option<String>,
}

/// The new user.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct UserCreated {
    user_id: i64,
}

/// Counts a request of `ip` against `limit`: 429 with `Retry-After` once the address used its budget.
fn per_address(limit: &SlidingWindow, ip: Option<IpAddr>) -> Result<(), ApiError> {
    let Some(ip) = ip else { return Ok(()) };
    limit
        .check_all(&[&ip.to_string()], Instant::now())
        .map_err(rate_limited)
}

fn rate_limited(wait: Duration) -> ApiError {
    ApiError::rate_limited(wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
}

pub(crate) async fn sign_up(
    State(st): State<AppState>,
    ClientIp(ip): ClientIp,
    ApiJson(req): ApiJson<SignUp>,
) -> Result<(StatusCode, ApiJson<UserCreated>), ApiError> {
    // Before any check: probing usernames counts too, and every counted sign-up may cost a hash.
    per_address(&st.sign_up_limit, ip)?;
    validate::username(&req.username)?;
    validate::password(&req.password)?;
    let nickname = req.nickname.unwrap_or_else(|| req.username.clone());
    validate::text("nickname", &nickname, MAX_NAME)?;
    // Cheap early answer; the store's unique insert below is what actually decides.
    if st
        .stores
        .users
        .get_user_by_username(&req.username)
        .await?
        .is_some()
    {
        return Err(username_taken());
    }
    let password_hash = hash_password(&st.auth, req.password).await?;
    let now = now_ms();
    let user = User {
        user_id: st.ids.next_i64().await?,
        username: req.username,
        password_hash,
        profile: Profile {
            nickname,
            ..Profile::default()
        },
        created_at_ms: now,
        updated_at_ms: now,
    };
    match st.stores.users.insert_user(&user).await {
        Ok(()) => Ok((
            StatusCode::CREATED,
            ApiJson(UserCreated {
                user_id: user.user_id,
            }),
        )),
        Err(e) if e.kind == ErrorKind::Conflict => Err(username_taken()),
        Err(e) => Err(e.into()),
    }
}

pub(crate) fn username_taken() -> ApiError {
    ApiError::conflict("username_taken", "this username is taken")
}

/// Signs in on a registered device.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SignIn {
    username: String,
    password: String,
    device_id: i64,
}

/// A token for the gateway and this API.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SessionCreated {
    user_id: i64,
    device_id: i64,
    /// `Authorization: Bearer <token>` here; the sign-in token on the gateway.
    token: String,
    /// Expiry, Unix seconds.
    expires_at: i64,
}

pub(crate) async fn sign_in(
    State(st): State<AppState>,
    ClientIp(ip): ClientIp,
    ApiJson(req): ApiJson<SignIn>,
) -> Result<ApiJson<SessionCreated>, ApiError> {
    // Failures are counted per (username, address) and per address, never per username alone: someone
    // failing on purpose from elsewhere cannot lock the real user out. An attempt counts as a failure
    // from its start (forgiven on success), which also bounds the argon2 CPU an address can spend.
    // Usernames are short and lowercase; anything else cannot exist, but still counts against the address.
    let name: String = req.username.chars().take(32).collect();
    let (user_key, ip_key) = match ip {
        Some(ip) => (format!("u:{name}|{ip}"), Some(format!("ip:{ip}"))),
        None => (format!("u:{name}"), None),
    };
    let now = Instant::now();
    // The address first: a blocked address (one cycling usernames) adds no per-username entry.
    if let Some(ip_key) = &ip_key {
        st.ip_sign_in_limit
            .begin(&[ip_key], now)
            .map_err(rate_limited)?;
    }
    if let Err(wait) = st.sign_in_limit.begin(&[&user_key], now) {
        // Not attempted after all: no failure for this address either.
        if let Some(ip_key) = &ip_key {
            st.ip_sign_in_limit.succeeded(&[], &[ip_key]);
        }
        return Err(rate_limited(wait));
    }

    let device = st
        .stores
        .devices
        .get_device(req.device_id)
        .await?
        .ok_or_else(|| {
            ApiError::not_found("device_not_found", "no such device; register it first")
        })?;
    let user = st.stores.users.get_user_by_username(&req.username).await?;
    let hash = user
        .as_ref()
        .map(|u| u.password_hash.clone())
        .filter(|h| !h.is_empty());
    let ok = verify_password(&st.auth, hash, req.password).await?;
    if ok {
        st.sign_in_limit.succeeded(&[&user_key], &[]);
        if let Some(ip_key) = &ip_key {
            st.ip_sign_in_limit.succeeded(&[], &[ip_key]);
        }
    }
    let user = match user {
        Some(user) if ok => user,
        _ => {
            return Err(ApiError::unauthorized(
                "bad_credentials",
                "wrong username or password",
            ))
        }
    };
    // Only after the password is checked: the first user to sign in on a device owns it for good.
    bind_device(&st, device.device_id, user.user_id).await?;
    let now = now_ms();
    let exp = now / 1000 + st.config.token_ttl_secs;
    let claims = Claims {
        user_id: user.user_id,
        device_id: device.device_id,
        exp,
        iat: now / 1000,
        // Never before the device's revocation cut-off, which a sign-out in this very millisecond may
        // have set just ahead of the clock (see `sign_out`).
        iat_ms: Some(now.max(device.tokens_valid_after_ms)),
    };
    Ok(ApiJson(SessionCreated {
        user_id: user.user_id,
        device_id: device.device_id,
        token: st.auth.key.mint(&claims),
        expires_at: exp,
    }))
}

/// Binds `device_id` to `user_id` unless it belongs to another user: 403 `device_taken` then (the device
/// stays with its owner; register a new one).
///
/// # Errors
/// `device_taken`, `device_not_found`, or a store failure.
pub(crate) async fn bind_device(
    st: &AppState,
    device_id: i64,
    user_id: i64,
) -> Result<(), ApiError> {
    match st.stores.devices.bind_device(device_id, user_id).await {
        Ok(owner) if owner == user_id => Ok(()),
        Ok(_) => Err(device_taken()),
        Err(e) if e.kind == ErrorKind::NotFound => Err(ApiError::not_found(
            "device_not_found",
            "no such device; register it first",
        )),
        Err(e) => Err(e.into()),
    }
}

pub(crate) fn device_taken() -> ApiError {
    ApiError::forbidden(
        "device_taken",
        "this device belongs to another user; register a new device",
    )
}

pub(crate) async fn sign_out(
    State(st): State<AppState>,
    caller: Caller,
) -> Result<StatusCode, ApiError> {
    // The cut-off is per device, so only the device's owner may move it: a device used so far only with
    // tokens minted elsewhere is bound to the caller now (the `Caller` check refused any other user).
    match st
        .stores
        .devices
        .bind_device(caller.device_id, caller.user_id)
        .await
    {
        Ok(owner) if owner == caller.user_id => {}
        Ok(_) => return Err(device_taken()),
        Err(e) if e.kind == ErrorKind::NotFound => {
            return Err(ApiError::unauthorized("unauthenticated", "unknown device"))
        }
        Err(e) => return Err(e.into()),
    }
    // +1: a token issued in this same millisecond is revoked too (the check is `cut-off > issued_at`).
    // Every token of this device is revoked, not only this one: the store keeps one cut-off per device.
    match st
        .stores
        .devices
        .revoke_tokens_before(caller.device_id, now_ms() + 1)
        .await
    {
        Ok(()) => {
            // Connections already open with the revoked token go too. Best effort: the revocation
            // itself is durable, so a lost kick only leaves a live connection until it reconnects.
            let _ = st
                .logic
                .kick_signed_out(caller.user_id, caller.device_id)
                .await;
            Ok(StatusCode::NO_CONTENT)
        }
        Err(e) if e.kind == ErrorKind::NotFound => {
            Err(ApiError::unauthorized("unauthenticated", "unknown device"))
        }
        Err(e) => Err(e.into()),
    }
}

/// A user's public profile.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct UserView {
    user_id: i64,
    username: String,
    nickname: String,
    avatar_url: String,
    extra: String,
    created_at_ms: i64,
    updated_at_ms: i64,
}

impl From<User> for UserView {
    fn from(u: User) -> Self {
        UserView {
            user_id: u.user_id,
            username: u.username,
            nickname: u.profile.nickname,
            avatar_url: u.profile.avatar_url,
            extra: u.profile.extra,
            created_at_ms: u.created_at_ms,
            updated_at_ms: u.updated_at_ms,
        }
    }
}

pub(crate) fn user_not_found() -> ApiError {
    ApiError::not_found("user_not_found", "no such user")
}

pub(crate) async fn get_me(
    State(st): State<AppState>,
    caller: Caller,
) -> Result<ApiJson<UserView>, ApiError> {
    get_user_view(&st, caller.user_id).await
}

pub(crate) async fn get_user(
    State(st): State<AppState>,
    _caller: Caller,
    ApiPath(user_id): ApiPath<i64>,
) -> Result<ApiJson<UserView>, ApiError> {
    get_user_view(&st, user_id).await
}

async fn get_user_view(st: &AppState, user_id: i64) -> Result<ApiJson<UserView>, ApiError> {
    let user = st
        .stores
        .users
        .get_user(user_id)
        .await?
        .ok_or_else(user_not_found)?;
    Ok(ApiJson(user.into()))
}

/// Profile fields to change; absent fields keep their value.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdateProfile {
    #[serde(default)]
    nickname: Option<String>,
    #[serde(default)]
    avatar_url: Option<String>,
    #[serde(default)]
    extra: Option<String>,
}

/// Checks the fields of a profile update and applies them over `profile`.
pub(crate) fn apply_profile(
    profile: &mut Profile,
    nickname: Option<String>,
    avatar_url: Option<String>,
    extra: Option<String>,
) -> Result<(), ApiError> {
    if let Some(v) = nickname {
        validate::text("nickname", &v, MAX_NAME)?;
        profile.nickname = v;
    }
    if let Some(v) = avatar_url {
        validate::url("avatar_url", &v, MAX_URL)?;
        profile.avatar_url = v;
    }
    if let Some(v) = extra {
        validate::extra("extra", &v)?;
        profile.extra = v;
    }
    Ok(())
}

pub(crate) async fn update_me(
    State(st): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<UpdateProfile>,
) -> Result<ApiJson<UserView>, ApiError> {
    let mut user = st
        .stores
        .users
        .get_user(caller.user_id)
        .await?
        .ok_or_else(user_not_found)?;
    apply_profile(&mut user.profile, req.nickname, req.avatar_url, req.extra)?;
    match st
        .stores
        .users
        .update_profile(caller.user_id, &user.profile)
        .await
    {
        Ok(()) => {}
        Err(e) if e.kind == ErrorKind::NotFound => return Err(user_not_found()),
        Err(e) => return Err(e.into()),
    }
    get_user_view(&st, caller.user_id).await
}

/// `?username=`: an exact, case-sensitive match (usernames are lowercase).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SearchQuery {
    username: String,
}

/// Search results: the user with exactly that username, or none.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct UserList {
    users: Vec<UserView>,
}

pub(crate) async fn search_users(
    State(st): State<AppState>,
    _caller: Caller,
    ApiQuery(q): ApiQuery<SearchQuery>,
) -> Result<ApiJson<UserList>, ApiError> {
    // Exact match only: the stores index usernames, not prefixes.
    let users = match st.stores.users.get_user_by_username(&q.username).await? {
        Some(user) => vec![user.into()],
        None => Vec::new(),
    };
    Ok(ApiJson(UserList { users }))
}
