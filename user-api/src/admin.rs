//! The admin API for app backends that own their users ("bring your own auth"): users and token minting.
//! Sends (the user's and the admin's) are in `messages`, live rooms in `rooms`.

use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use zhibo_auth::Claims;
use zhibo_store::ids::now_ms;
use zhibo_store::{ErrorKind, Profile, User};

use crate::accounts::{apply_profile, user_not_found, username_taken, UserView};
use crate::auth::Admin;
use crate::error::{ApiError, ApiJson, ApiPath};
use crate::state::AppState;
use crate::validate;

/// Creates or updates a user owned by the app backend. Absent profile fields keep their value (empty
/// for a new user). Such users have no password: they sign in with tokens the backend mints.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpsertUser {
    username: String,
    #[serde(default)]
    nickname: Option<String>,
    #[serde(default)]
    avatar_url: Option<String>,
    #[serde(default)]
    extra: Option<String>,
}

pub(crate) async fn upsert_user(
    State(st): State<AppState>,
    _admin: Admin,
    ApiPath(user_id): ApiPath<i64>,
    ApiJson(req): ApiJson<UpsertUser>,
) -> Result<ApiJson<UserView>, ApiError> {
    validate::id("user_id", user_id)?;
    validate::username(&req.username)?;
    let now = now_ms();
    let mut user = st.stores.users.get_user(user_id).await?.unwrap_or(User {
        user_id,
        username: String::new(),
        password_hash: String::new(),
        profile: Profile::default(),
        created_at_ms: now,
        updated_at_ms: now,
    });
    user.username = req.username;
    user.updated_at_ms = now;
    apply_profile(&mut user.profile, req.nickname, req.avatar_url, req.extra)?;
    match st.stores.users.upsert_user(&user).await {
        Ok(()) => Ok(ApiJson(user.into())),
        Err(e) if e.kind == ErrorKind::Conflict => Err(username_taken()),
        Err(e) => Err(e.into()),
    }
}

/// Mints a token, as an app backend would with the shared secret.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct MintToken {
    user_id: i64,
    /// A device registered with `POST /v1/devices`.
    device_id: i64,
    /// Lifetime; the configured `token_ttl_secs` when absent.
    #[serde(default)]
    ttl_secs: Option<i64>,
}

/// A minted token.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct TokenMinted {
    token: String,
    /// Expiry, Unix seconds.
    expires_at: i64,
}

/// Longest lifetime of a minted token: one year.
const MAX_TTL_SECS: i64 = 365 * 24 * 3600;

pub(crate) async fn mint_token(
    State(st): State<AppState>,
    _admin: Admin,
    ApiJson(req): ApiJson<MintToken>,
) -> Result<ApiJson<TokenMinted>, ApiError> {
    let ttl = req.ttl_secs.unwrap_or(st.config.token_ttl_secs);
    if !(1..=MAX_TTL_SECS).contains(&ttl) {
        return Err(ApiError::invalid(format!(
            "ttl_secs must be 1..={MAX_TTL_SECS}"
        )));
    }
    if st.stores.users.get_user(req.user_id).await?.is_none() {
        return Err(user_not_found());
    }
    let device = st
        .stores
        .devices
        .get_device(req.device_id)
        .await?
        .ok_or_else(|| {
            ApiError::not_found("device_not_found", "no such device; register it first")
        })?;
    // A minted token binds the device too: a device serves one user, whoever signed it in.
    crate::accounts::bind_device(&st, device.device_id, req.user_id).await?;
    let now = now_ms();
    let exp = now / 1000 + ttl;
    let token = st.auth.key.mint(&Claims {
        user_id: req.user_id,
        device_id: req.device_id,
        exp,
        iat: now / 1000,
        iat_ms: Some(now.max(device.tokens_valid_after_ms)),
    });
    Ok(ApiJson(TokenMinted {
        token,
        expires_at: exp,
    }))
}
