//! Who is calling: [`Caller`] (a bearer token, checked for revocation) and [`Admin`] (the shared admin
//! secret), plus password hashing ([`hash_password`], [`verify_password`]) off the async threads.

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zhibo_auth::TokenError;
use zhibo_store::ids::now_ms;

use crate::error::ApiError;
use crate::state::AppState;

/// The user and device a valid, unrevoked bearer token acts for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caller {
    pub(crate) user_id: i64,
    pub(crate) device_id: i64,
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then_some(token.trim())
            })
            .ok_or_else(|| ApiError::unauthorized("unauthenticated", "missing bearer token"))?;
        let claims = state
            .key
            .verify(token, now_ms() / 1000)
            .map_err(|e| match e {
                TokenError::Expired => {
                    ApiError::unauthorized("token_expired", "token expired; sign in again")
                }
                TokenError::NotYetValid => ApiError::unauthorized(
                    "unauthenticated",
                    "token not valid yet (nbf or iat in the future)",
                ),
                _ => ApiError::unauthorized("unauthenticated", "invalid token"),
            })?;
        // Same rule as the gateway: the device must exist and the token must postdate its revocation cut-off.
        let device = state
            .stores
            .devices
            .get_device(claims.device_id)
            .await?
            .ok_or_else(|| ApiError::unauthorized("unauthenticated", "unknown device"))?;
        // A device serves its one owner: a token for another user on it (minted by an app backend) is
        // refused, so nobody can act through, or sign out, a device that is not theirs.
        if device.owner_user_id != 0 && device.owner_user_id != claims.user_id {
            return Err(ApiError::unauthorized(
                "unauthenticated",
                "this device belongs to another user",
            ));
        }
        if device.tokens_valid_after_ms > claims.issued_at_ms() {
            return Err(ApiError::unauthorized(
                "token_revoked",
                "token revoked; sign in again",
            ));
        }
        Ok(Caller {
            user_id: claims.user_id,
            device_id: claims.device_id,
        })
    }
}

/// A request carrying the right `X-Admin-Secret`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Admin;

/// The HMAC key used to compare admin secrets. Comparing HMAC tags (constant time, in `hmac`) instead of
/// the secrets hides both the content and the length of the expected secret from timing.
const ADMIN_TAG_KEY: &[u8] = b"zhibo user-api admin secret";

/// The tag [`Admin`] compares a presented secret against.
pub(crate) fn admin_tag(secret: &str) -> Vec<u8> {
    admin_mac(secret.as_bytes())
        .finalize()
        .into_bytes()
        .to_vec()
}

fn admin_mac(secret: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(ADMIN_TAG_KEY)
        .unwrap_or_else(|_| unreachable!("any key length"));
    mac.update(secret);
    mac
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let Some(expected) = &state.admin_tag else {
            return Err(ApiError::not_found(
                "admin_disabled",
                "the admin API is disabled",
            ));
        };
        let presented = parts
            .headers
            .get("x-admin-secret")
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        admin_mac(presented)
            .verify_slice(expected)
            .map(|()| Admin)
            .map_err(|_| {
                ApiError::unauthorized("bad_admin_secret", "missing or wrong X-Admin-Secret")
            })
    }
}

/// Hashes `password` with argon2id (default parameters) into a PHC string, on a blocking thread, within
/// the sign-up hashing budget (separate from sign-in's, see [`AppState`]).
///
/// # Errors
/// 500 if hashing fails or the blocking pool is gone.
pub(crate) async fn hash_password(state: &AppState, password: String) -> Result<String, ApiError> {
    let _permit = state
        .sign_up_hashing
        .acquire()
        .await
        .map_err(ApiError::internal)?;
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(ApiError::internal)
    })
    .await
    .map_err(ApiError::internal)?
}

/// Whether `password` matches the PHC string `hash`. With `None` (unknown user, or a user without a
/// password) it verifies against the state's dummy hash and returns false, so the answer takes as long
/// either way.
///
/// # Errors
/// 500 if the blocking pool is gone.
pub(crate) async fn verify_password(
    state: &AppState,
    hash: Option<String>,
    password: String,
) -> Result<bool, ApiError> {
    let _permit = state.hashing.acquire().await.map_err(ApiError::internal)?;
    let real = hash.is_some();
    let phc = hash.unwrap_or_else(|| state.dummy_hash.clone());
    tokio::task::spawn_blocking(move || {
        let ok = PasswordHash::new(&phc)
            .map(|parsed| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok()
            })
            .unwrap_or(false);
        real && ok
    })
    .await
    .map_err(ApiError::internal)
}

/// A hash of a random password with the same parameters as [`hash_password`]. Called once per server,
/// when its state is built (eagerly: a lazy one made the first unknown-user sign-in slower).
pub(crate) fn dummy_hash() -> String {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(salt.as_str().as_bytes(), &salt)
        .map(|h| h.to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dummy_hash_has_the_real_parameters() {
        let real = Argon2::default()
            .hash_password(b"pw", &SaltString::generate(&mut OsRng))
            .expect("hash")
            .to_string();
        let dummy = dummy_hash();
        let params = |phc: &str| {
            let h = PasswordHash::new(phc).expect("phc");
            (h.algorithm.to_string(), h.version, h.params.to_string())
        };
        assert_eq!(params(&dummy), params(&real));
    }
}
