//! Who is calling: [`Caller`] (a bearer token, checked for revocation) and [`Admin`] (the shared admin
//! secret), plus password hashing ([`hash_password`], [`verify_password`]) off the async threads. All of
//! it runs on [`AuthState`], which the app state hands out through axum's `FromRef`: this module never
//! sees the rest of the app state.

use std::ops::Deref;
use std::sync::Arc;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::extract::{FromRef, FromRequestParts};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::Semaphore;
use zhibo_auth::{TokenError, TokenKey};
use zhibo_store::ids::now_ms;
use zhibo_store::DeviceStore;

use crate::error::ApiError;

/// What authentication needs, cheap to clone: the token key, the device records (owner and revocation
/// cut-off), the admin secret's tag and the password-hashing budgets.
#[derive(Clone)]
pub(crate) struct AuthState(Arc<Auth>);

pub(crate) struct Auth {
    /// Mints and verifies tokens.
    pub(crate) key: Arc<TokenKey>,
    devices: Arc<dyn DeviceStore>,
    /// HMAC tag of the admin secret; `None` when the admin API is disabled.
    admin_tag: Option<Vec<u8>>,
    /// Bounds concurrent argon2 verification (sign-in) to the number of cores, so a burst of sign-ins
    /// queues instead of filling the blocking pool with memory-hungry hashes.
    hashing: Semaphore,
    /// A separate, smaller budget for sign-up hashing: a sign-up flood queues here and never holds a
    /// permit a sign-in waits for.
    sign_up_hashing: Semaphore,
    /// The PHC string unknown users are verified against (see [`verify_password`]), built at start so the
    /// first unknown-user sign-in is not slower than the next (timing would reveal the user).
    dummy_hash: String,
}

impl AuthState {
    /// Authentication with `key`, checking devices in `devices`; an empty `admin_secret` disables the
    /// admin API.
    pub(crate) fn new(
        key: Arc<TokenKey>,
        devices: Arc<dyn DeviceStore>,
        admin_secret: &str,
    ) -> Self {
        let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
        AuthState(Arc::new(Auth {
            key,
            devices,
            admin_tag: (!admin_secret.is_empty()).then(|| admin_tag(admin_secret)),
            hashing: Semaphore::new(cores),
            sign_up_hashing: Semaphore::new(cores.div_ceil(2)),
            dummy_hash: dummy_hash(),
        }))
    }
}

impl Deref for AuthState {
    type Target = Auth;

    fn deref(&self) -> &Auth {
        &self.0
    }
}

/// The user and device a valid, unrevoked bearer token acts for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caller {
    pub(crate) user_id: i64,
    pub(crate) device_id: i64,
}

impl<S> FromRequestParts<S> for Caller
where
    AuthState: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let state = AuthState::from_ref(state);
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
            .devices
            .get_device(claims.device_id)
            .await?
            .ok_or_else(|| ApiError::unauthorized("unauthenticated", "unknown device"))?;
        // A device serves its one owner: a token for another user on it (minted by an app backend) is
        // refused, so nobody can act through, or sign out, a device that is not theirs. A device not bound
        // yet (registered before binding existed, or only ever used with minted tokens) is bound to the
        // first user whose valid token uses it: one conditional write, once per device.
        let owner = match device.owner_user_id {
            0 => {
                state
                    .devices
                    .bind_device(claims.device_id, claims.user_id)
                    .await?
            }
            owner => owner,
        };
        if owner != claims.user_id {
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
fn admin_tag(secret: &str) -> Vec<u8> {
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

impl<S> FromRequestParts<S> for Admin
where
    AuthState: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let state = AuthState::from_ref(state);
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
/// the sign-up hashing budget (separate from sign-in's, see [`Auth`]).
///
/// # Errors
/// 500 if hashing fails or the blocking pool is gone.
pub(crate) async fn hash_password(state: &AuthState, password: String) -> Result<String, ApiError> {
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
    state: &AuthState,
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
fn dummy_hash() -> String {
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
