//! # Layout
//! One module: [`TokenKey`] mints and verifies zhibo tokens.
//!
//! A token is a JWT signed with HS256 (HMAC-SHA256 over `header.payload`), so an app backend that already
//! has users can mint tokens with any JWT library and the shared secret. Claims: `user_id`, `device_id`,
//! `exp` and `iat` (seconds, as JWT defines them) and optionally `iat_ms` (milliseconds, used for revocation).
//! Gateways verify tokens locally, without a round trip; revocation is a per-device "tokens issued before
//! T are void" time stored with the device and read once per sign-in (see docs/ARCHITECTURE.md).
#![warn(missing_docs)]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The claims a zhibo token carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user the token acts for.
    pub user_id: i64,
    /// The device the token is bound to.
    pub device_id: i64,
    /// Expiry, Unix seconds.
    pub exp: i64,
    /// Issue time, Unix seconds.
    #[serde(default)]
    pub iat: i64,
    /// Issue time in Unix milliseconds, when the issuer sets it (finer revocation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat_ms: Option<i64>,
}

impl Claims {
    /// Issue time in milliseconds: `iat_ms` when present, else `iat` × 1000.
    pub fn issued_at_ms(&self) -> i64 {
        self.iat_ms.unwrap_or(self.iat.saturating_mul(1000))
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Not three base64url parts, bad JSON, or another algorithm than HS256.
    #[error("malformed token")]
    Malformed,
    /// The signature does not match: wrong secret or tampered token.
    #[error("bad token signature")]
    BadSignature,
    /// Past its `exp`.
    #[error("token expired")]
    Expired,
    /// Before its `nbf` (not before), or issued (`iat` / `iat_ms`) more than [`MAX_CLOCK_SKEW_SECS`] in
    /// the future. A future issue time would outlive every revocation cut-off (they are "tokens issued
    /// before T are void"), so such a token is refused instead.
    #[error("token not valid yet")]
    NotYetValid,
}

/// How far ahead of this host's clock a token's `iat`, `iat_ms` or `nbf` may be (clocks of issuers
/// differ a little).
pub const MAX_CLOCK_SKEW_SECS: i64 = 60;

/// Registered claims checked by [`TokenKey::verify`] but not carried in [`Claims`].
#[derive(Deserialize)]
struct Registered {
    #[serde(default)]
    nbf: Option<i64>,
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    typ: Option<String>,
}

/// A shared HMAC secret that mints and verifies tokens.
#[derive(Clone)]
pub struct TokenKey {
    secret: Vec<u8>,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

impl TokenKey {
    /// A key from the shared secret.
    pub fn new(secret: impl AsRef<[u8]>) -> Self {
        TokenKey {
            secret: secret.as_ref().to_vec(),
        }
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC accepts keys of any length; this cannot fail.
        HmacSha256::new_from_slice(&self.secret)
            .unwrap_or_else(|_| unreachable!("hmac takes any key"))
    }

    /// Mints a token for `claims`.
    pub fn mint(&self, claims: &Claims) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
        let signing_input = format!("{header}.{payload}");
        let mut mac = self.mac();
        mac.update(signing_input.as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{signing_input}.{sig}")
    }

    /// Verifies `token` at time `now_s` (Unix seconds) and returns its claims.
    ///
    /// # Errors
    /// [`TokenError`] saying why the token is refused.
    pub fn verify(&self, token: &str, now_s: i64) -> Result<Claims, TokenError> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let header: Header = URL_SAFE_NO_PAD
            .decode(h)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(TokenError::Malformed)?;
        if header.alg != "HS256" {
            return Err(TokenError::Malformed);
        }
        let sig = URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| TokenError::Malformed)?;
        let mut mac = self.mac();
        mac.update(h.as_bytes());
        mac.update(b".");
        mac.update(p.as_bytes());
        mac.verify_slice(&sig)
            .map_err(|_| TokenError::BadSignature)?;
        let payload = URL_SAFE_NO_PAD
            .decode(p)
            .map_err(|_| TokenError::Malformed)?;
        let claims: Claims = serde_json::from_slice(&payload).map_err(|_| TokenError::Malformed)?;
        let registered: Registered =
            serde_json::from_slice(&payload).map_err(|_| TokenError::Malformed)?;
        if claims.exp <= now_s {
            return Err(TokenError::Expired);
        }
        let latest = now_s.saturating_add(MAX_CLOCK_SKEW_SECS);
        if registered.nbf.is_some_and(|nbf| nbf > latest)
            || claims.iat > latest
            || claims
                .iat_ms
                .is_some_and(|ms| ms > latest.saturating_mul(1000))
        {
            return Err(TokenError::NotYetValid);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: i64) -> Claims {
        Claims {
            user_id: 7,
            device_id: 9,
            exp,
            iat: 100,
            iat_ms: None,
        }
    }

    #[test]
    fn round_trip_and_refusals() {
        let key = TokenKey::new("secret");
        let t = key.mint(&claims(2_000));
        assert_eq!(key.verify(&t, 1_000), Ok(claims(2_000)));
        assert_eq!(key.verify(&t, 2_000), Err(TokenError::Expired));
        assert_eq!(
            TokenKey::new("other").verify(&t, 1_000),
            Err(TokenError::BadSignature)
        );
        assert_eq!(key.verify("a.b", 0), Err(TokenError::Malformed));
        assert_eq!(key.verify("", 0), Err(TokenError::Malformed));
        assert_eq!(key.verify("a.b.c.d", 0), Err(TokenError::Malformed));
        // Tampered payload: claims of another user under the old signature.
        let mut parts: Vec<&str> = t.split('.').collect();
        let forged = URL_SAFE_NO_PAD.encode(br#"{"user_id":8,"device_id":9,"exp":2000}"#);
        parts[1] = &forged;
        assert_eq!(
            key.verify(&parts.join("."), 1_000),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn refuses_future_issue_times_and_honours_nbf() {
        let key = TokenKey::new("secret");
        let now = 10_000;
        let at = |iat: i64, iat_ms: Option<i64>| {
            key.verify(
                &key.mint(&Claims {
                    iat,
                    iat_ms,
                    ..claims(20_000)
                }),
                now,
            )
        };
        assert!(
            at(now + MAX_CLOCK_SKEW_SECS, None).is_ok(),
            "within the skew"
        );
        assert_eq!(
            at(now + MAX_CLOCK_SKEW_SECS + 1, None),
            Err(TokenError::NotYetValid)
        );
        assert_eq!(
            at(now, Some((now + 3600) * 1000)),
            Err(TokenError::NotYetValid)
        );
        assert!(at(now, Some(now * 1000)).is_ok());
        // `nbf`, as another JWT library would set it.
        let signed = |payload: &str| {
            let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256"}"#);
            let p = URL_SAFE_NO_PAD.encode(payload);
            let mut mac = key.mac();
            mac.update(format!("{h}.{p}").as_bytes());
            let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
            format!("{h}.{p}.{sig}")
        };
        let early = signed(r#"{"user_id":1,"device_id":1,"exp":20000,"nbf":15000}"#);
        assert_eq!(key.verify(&early, now), Err(TokenError::NotYetValid));
        assert!(key.verify(&early, 15_000).is_ok());
        let bad_nbf = signed(r#"{"user_id":1,"device_id":1,"exp":20000,"nbf":"x"}"#);
        assert_eq!(key.verify(&bad_nbf, now), Err(TokenError::Malformed));
    }

    #[test]
    fn refuses_alg_none() {
        let key = TokenKey::new("secret");
        let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#);
        let p = URL_SAFE_NO_PAD.encode(br#"{"user_id":1,"device_id":1,"exp":9999999999}"#);
        assert_eq!(
            key.verify(&format!("{h}.{p}."), 0),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn verifies_a_jwt_minted_by_pyjwt() {
        // Printed by PyJWT 2: jwt.encode({"user_id":1,"device_id":2,"exp":4102444800,"iat":1700000000},
        // "shared", algorithm="HS256").
        let token = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.\
            eyJ1c2VyX2lkIjoxLCJkZXZpY2VfaWQiOjIsImV4cCI6NDEwMjQ0NDgwMCwiaWF0IjoxNzAwMDAwMDAwfQ.\
            6FvQrAgaL9Jf-Pd06fq7ZwYUGYXpITMtUOl4oE2rcYc";
        let c = TokenKey::new("shared")
            .verify(token, 1_800_000_000)
            .expect("valid");
        assert_eq!(
            (c.user_id, c.device_id, c.issued_at_ms()),
            (1, 2, 1_700_000_000_000)
        );
        assert_eq!(
            TokenKey::new("shared!").verify(token, 1_800_000_000),
            Err(TokenError::BadSignature)
        );
    }
}
