//! The signature of a delivery: HMAC-SHA256 over `<timestamp>.<body>` with the shared secret.
//!
//! Headers of every POST: [`TIMESTAMP_HEADER`] (unix seconds), [`SIGNATURE_HEADER`] (`v1=<hex>`),
//! [`IDEMPOTENCY_HEADER`]. A receiver recomputes the MAC over the raw body, compares in constant time
//! and refuses timestamps outside its replay window ([`verify`]; README.md has the same in ~20 lines).

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Unix seconds when the request was signed.
pub const TIMESTAMP_HEADER: &str = "x-zhibo-timestamp";
/// `v1=<hex of HMAC-SHA256(secret, "<timestamp>.<body>")>`.
pub const SIGNATURE_HEADER: &str = "x-zhibo-signature";
/// The event's idempotency key (also in the body).
pub const IDEMPOTENCY_HEADER: &str = "x-zhibo-idempotency-key";

/// Why [`verify`] refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The timestamp is not a number.
    #[error("bad timestamp")]
    BadTimestamp,
    /// The timestamp is outside the replay window.
    #[error("timestamp outside the replay window")]
    Stale,
    /// The signature header is not `v1=<hex>`.
    #[error("bad signature header")]
    BadHeader,
    /// The MAC does not match (tampered body, wrong secret).
    #[error("signature mismatch")]
    Mismatch,
}

fn mac(secret: &[u8], timestamp: &str, body: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The [`SIGNATURE_HEADER`] value for `body` signed at `timestamp` (unix seconds).
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let tag = mac(secret, &timestamp.to_string(), body)
        .finalize()
        .into_bytes();
    let mut out = String::with_capacity(3 + tag.len() * 2);
    out.push_str("v1=");
    for b in tag {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Checks a received request: `timestamp` and `signature` are the header values, `now` unix seconds,
/// `window_secs` the accepted age (either way).
///
/// # Errors
/// [`VerifyError`] saying why the request must be refused.
pub fn verify(
    secret: &[u8],
    timestamp: &str,
    signature: &str,
    body: &[u8],
    now: i64,
    window_secs: i64,
) -> Result<(), VerifyError> {
    let ts: i64 = timestamp.parse().map_err(|_| VerifyError::BadTimestamp)?;
    if (now - ts).abs() > window_secs {
        return Err(VerifyError::Stale);
    }
    let hex = signature
        .strip_prefix("v1=")
        .ok_or(VerifyError::BadHeader)?;
    if hex.len() != 64 || !hex.is_ascii() {
        return Err(VerifyError::BadHeader);
    }
    let tag = (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| VerifyError::BadHeader)?;
    // Constant-time comparison.
    mac(secret, timestamp, body)
        .verify_slice(&tag)
        .map_err(|_| VerifyError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The format receivers implement (README example): the value below was computed independently,
    /// with Python's `hmac.new(key, b"1700000000." + body, hashlib.sha256).hexdigest()`.
    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        assert_eq!(
            sign(b"0123456789abcdef", 1_700_000_000, br#"{"type":"push"}"#),
            "v1=7dff155af7204cddb9c4ce6773c118936a1785cc71e573e69cbf758bd523b3b7"
        );
    }

    #[test]
    fn a_signature_verifies_and_any_change_fails() {
        let sig = sign(b"k", 1000, b"{\"a\":1}");
        assert_eq!(verify(b"k", "1000", &sig, b"{\"a\":1}", 1010, 300), Ok(()));
        assert_eq!(
            verify(b"k", "1000", &sig, b"{\"a\":2}", 1010, 300),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            verify(b"other", "1000", &sig, b"{\"a\":1}", 1010, 300),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            verify(b"k", "1001", &sig, b"{\"a\":1}", 1010, 300),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            verify(b"k", "1000", &sig, b"{\"a\":1}", 2000, 300),
            Err(VerifyError::Stale)
        );
        assert_eq!(
            verify(b"k", "x", &sig, b"{\"a\":1}", 1010, 300),
            Err(VerifyError::BadTimestamp)
        );
        assert_eq!(
            verify(b"k", "1000", "v2=00", b"{\"a\":1}", 1010, 300),
            Err(VerifyError::BadHeader)
        );
    }
}
