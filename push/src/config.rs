//! [`PushConfig`]: the `[push]` settings of logic workers (publishing) and push-relay (delivering).

use std::time::Duration;

use serde::Deserialize;

/// Offline push settings (`[push]`, `ZHIBO_PUSH__*`). `Debug` hides the secret.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PushConfig {
    /// Emit a push event per offline recipient of each stored message. Off: no push work on the send
    /// path (presence, which routes deliveries, is read either way).
    pub enabled: bool,
    /// Put the start of text content in events (`preview`); off for privacy.
    pub preview: bool,
    /// Longest preview, in characters.
    pub preview_max_chars: usize,
    /// Where push-relay POSTs each event (`https://…` or `http://…`).
    pub url: String,
    /// HMAC-SHA256 key of the `x-zhibo-signature` header (at least 16 bytes when `url` is set).
    #[serde(deserialize_with = "scalar_string")]
    pub secret: String,
    /// One attempt's timeout, ms.
    pub timeout_ms: u64,
    /// Attempts per event before it goes to the dead-letter subject.
    pub max_attempts: u32,
    /// Delay before the second attempt, ms; doubles per attempt (with ±50 % jitter).
    pub backoff_initial_ms: u64,
    /// Longest delay between attempts, ms.
    pub backoff_max_ms: u64,
    /// Requests in flight to the target at once (per relay process).
    pub concurrency: usize,
    /// Events older than this are dropped from the stream (a relay down longer loses them), seconds.
    pub stream_max_age_secs: u64,
    /// Stream size limit; the oldest events are dropped beyond it, bytes.
    pub stream_max_bytes: i64,
    /// A gateway's presence entries (which route its users' deliveries, and say who is offline) count
    /// this long after its last refresh (distributed mode), s. Here for history: presence is not only
    /// push's.
    pub presence_ttl_secs: u64,
    /// Events waiting to be published per logic process; beyond it events are dropped and counted
    /// (`zhibo_push_publish_failures_total{kind="queue_full"}`): a send never waits for the stream.
    pub publish_queue: usize,
}

impl std::fmt::Debug for PushConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushConfig")
            .field("enabled", &self.enabled)
            .field("preview", &self.preview)
            .field("url", &self.url)
            .field("max_attempts", &self.max_attempts)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

/// A string from a string or any other TOML scalar: `ZHIBO_PUSH__SECRET=1234…` reads as a number, and
/// an error saying so would print the secret.
///
/// # Errors
/// For a table or an array (the value is not shown).
pub fn scalar_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        S(String),
        I(i64),
        F(f64),
        B(bool),
    }
    match <Scalar as serde::Deserialize>::deserialize(d) {
        Ok(Scalar::S(s)) => Ok(s),
        Ok(Scalar::I(i)) => Ok(i.to_string()),
        Ok(Scalar::F(f)) => Ok(f.to_string()),
        Ok(Scalar::B(b)) => Ok(b.to_string()),
        Err(_) => Err(serde::de::Error::custom(
            "expected a string (the value is not shown)",
        )),
    }
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            enabled: false,
            preview: true,
            preview_max_chars: 100,
            url: String::new(),
            secret: String::new(),
            timeout_ms: 5_000,
            max_attempts: 10,
            backoff_initial_ms: 1_000,
            backoff_max_ms: 300_000,
            concurrency: 16,
            stream_max_age_secs: 24 * 3600,
            stream_max_bytes: 1 << 30,
            presence_ttl_secs: 60,
            publish_queue: 10_000,
        }
    }
}

impl PushConfig {
    /// Checks the values. `relay`: also what push-relay needs (a URL and a secret).
    ///
    /// # Errors
    /// A message naming the bad field.
    pub fn validate(&self, relay: bool) -> Result<(), String> {
        if relay || !self.url.is_empty() {
            crate::http::check_url("push.url", &self.url)?;
            if self.secret.len() < 16 {
                return Err("push.secret must be at least 16 bytes".into());
            }
        }
        if self.max_attempts == 0 {
            return Err("push.max_attempts must be at least 1".into());
        }
        if self.concurrency == 0 || self.publish_queue == 0 {
            return Err("push.concurrency and push.publish_queue must be at least 1".into());
        }
        if self.timeout_ms == 0 || self.backoff_initial_ms == 0 {
            return Err("push.timeout_ms and push.backoff_initial_ms must be at least 1".into());
        }
        if self.backoff_max_ms < self.backoff_initial_ms {
            return Err("push.backoff_max_ms must be at least push.backoff_initial_ms".into());
        }
        if self.stream_max_age_secs == 0 || self.stream_max_bytes <= 0 {
            return Err(
                "push.stream_max_age_secs and push.stream_max_bytes must be positive".into(),
            );
        }
        if self.presence_ttl_secs < 3 {
            return Err("push.presence_ttl_secs must be at least 3".into());
        }
        Ok(())
    }

    /// The delay before attempt `attempt + 1` after `attempt` failed (1-based): initial × 2^(attempt-1),
    /// capped, times a random factor in [0.5, 1.5) so retries of many events spread out.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let base = self
            .backoff_initial_ms
            .saturating_mul(1u64 << attempt.saturating_sub(1).min(30))
            .min(self.backoff_max_ms);
        let jitter: f64 = rand::random::<f64>() + 0.5;
        // `base` ≤ backoff_max_ms: the product fits.
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        Duration::from_millis(((base as f64) * jitter) as u64)
    }

    /// One attempt's timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let c = PushConfig {
            backoff_initial_ms: 100,
            backoff_max_ms: 1_000,
            ..PushConfig::default()
        };
        for _ in 0..100 {
            let d1 = c.backoff(1).as_millis();
            assert!((50..150).contains(&d1), "{d1}");
            let d3 = c.backoff(3).as_millis();
            assert!((200..600).contains(&d3), "{d3}");
            let d40 = c.backoff(40).as_millis();
            assert!((500..1500).contains(&d40), "{d40}");
        }
    }

    #[test]
    fn a_relay_needs_a_url_and_a_secret() {
        let mut c = PushConfig::default();
        assert_eq!(c.validate(false), Ok(()));
        assert!(c.validate(true).is_err());
        c.url = "ftp://x".into();
        assert!(c.validate(false).is_err());
        c.url = "https://app.example.com/push".into();
        c.secret = "short".into();
        assert!(c.validate(true).is_err());
        c.secret = "0123456789abcdef".into();
        assert_eq!(c.validate(true), Ok(()));
        assert!(!format!("{c:?}").contains("0123456789abcdef"));
    }
}
