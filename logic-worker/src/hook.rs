//! The before-send hook: an optional synchronous HTTP call to the app backend before a message is stored,
//! answering allow, reject (a code and text for the sender) or replace (new content).
//!
//! [`HooksConfig`] is the `[hooks]` configuration; [`BeforeSendHook`] holds one pooled HTTP client and
//! asks the backend. With no URL configured there is no hook at all: the send path tests an `Option` and
//! does nothing else (no copy of the message, no task). Decisions are never cached: every send is asked.
//!
//! The request is a JSON POST signed with HMAC-SHA256 over `<timestamp>.<body>`:
//! `X-Zhibo-Timestamp: <unix seconds>`, `X-Zhibo-Signature: v1=<hex>` (the push relay's scheme).
//! A timeout, a connection error or an answer zhibo cannot use (not 2xx, not the JSON below, a
//! replacement over the size limit) is a failure, handled by `failure_policy`: `open` stores the message
//! as sent, `closed` refuses it with `UNAVAILABLE` (retry with the same `client_msg_id`).

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tracing::warn;
use zhibo_proto::bus::Origin;
use zhibo_proto::client::{ErrorCode, ReceiverType, SendMessageInput};

use crate::LogicError;

/// Hooks into the app backend (`[hooks]`).
#[derive(Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HooksConfig {
    /// HMAC-SHA256 key signing every hook request (`X-Zhibo-Signature`); required (at least 16 bytes)
    /// when a hook is configured.
    #[serde(deserialize_with = "zhibo_push::config::scalar_string")]
    pub secret: String,
    /// The before-send hook.
    pub before_send: BeforeSendConfig,
}

impl std::fmt::Debug for HooksConfig {
    /// The secret is not shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HooksConfig")
            .field("secret_set", &!self.secret.is_empty())
            .field("before_send", &self.before_send)
            .finish()
    }
}

/// The before-send hook (`[hooks.before_send]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BeforeSendConfig {
    /// The app backend's URL (`http://` or `https://`, rustls with the webpki roots); empty = no hook.
    pub url: String,
    /// How long a send waits for the answer, milliseconds.
    pub timeout_ms: u64,
    /// What a timeout, connection error or unusable answer does.
    pub failure_policy: FailurePolicy,
    /// The receiver types whose messages are checked (`user`, `group`, `room`).
    pub receivers: Vec<HookReceiver>,
}

impl Default for BeforeSendConfig {
    fn default() -> Self {
        BeforeSendConfig {
            url: String::new(),
            timeout_ms: 500,
            failure_policy: FailurePolicy::Open,
            receivers: vec![HookReceiver::User, HookReceiver::Group],
        }
    }
}

/// What a send does when the hook cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    /// Store the message as sent.
    Open,
    /// Refuse it with `UNAVAILABLE` (nothing stored; the client resends with the same `client_msg_id`).
    Closed,
}

/// A receiver type the hook checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HookReceiver {
    /// 1:1 messages.
    User,
    /// Group messages.
    Group,
    /// Live-room messages.
    Room,
}

impl HooksConfig {
    /// Checks the values.
    ///
    /// # Errors
    /// A message naming the bad field.
    pub fn validate(&self) -> Result<(), String> {
        let b = &self.before_send;
        if b.url.is_empty() {
            return Ok(());
        }
        zhibo_push::http::check_url("before_send.url", &b.url)?;
        if self.secret.len() < 16 {
            return Err("secret must be at least 16 bytes when a hook is configured".into());
        }
        if b.timeout_ms == 0 || b.timeout_ms > 10_000 {
            return Err("before_send.timeout_ms must be 1..=10000".into());
        }
        if b.receivers.is_empty() {
            return Err(
                "before_send.receivers is empty (leave url empty to turn the hook off)".into(),
            );
        }
        Ok(())
    }
}

/// The configured before-send hook: one pooled HTTP client, shared by every send of the process.
pub(crate) struct BeforeSendHook {
    client: reqwest::Client,
    url: reqwest::Url,
    timeout: Duration,
    policy: FailurePolicy,
    receivers: Vec<HookReceiver>,
    /// The HMAC key (`hooks.secret`); never shown by `Debug`.
    secret: Vec<u8>,
}

impl std::fmt::Debug for BeforeSendHook {
    /// The key is not shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BeforeSendHook")
            .field("url", &self.url.as_str())
            .field("timeout", &self.timeout)
            .field("policy", &self.policy)
            .field("receivers", &self.receivers)
            .finish()
    }
}

/// What the backend decided for a send that goes ahead.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Store as sent (an allow, or a failure under the open policy).
    AsSent,
    /// Store this content instead.
    Replace(Bytes),
}

/// The JSON body of a hook request.
#[derive(Serialize)]
struct HookRequest<'a> {
    event: &'static str,
    sender: Sender,
    receiver: Receiver,
    client_msg_id: &'a str,
    content_type: i32,
    /// Base64 (standard, padded).
    content: String,
}

#[derive(Serialize)]
struct Sender {
    user_id: i64,
    device_id: i64,
}

#[derive(Serialize)]
struct Receiver {
    #[serde(rename = "type")]
    kind: &'static str,
    id: i64,
}

/// The backend's answer.
#[derive(Deserialize)]
#[serde(tag = "action", rename_all = "lowercase")]
enum HookAnswer {
    Allow,
    Reject {
        #[serde(default)]
        code: i32,
        #[serde(default)]
        text: String,
    },
    Replace {
        /// Base64.
        content: String,
    },
}

/// Longest reject text passed on to the sender, bytes.
const MAX_REJECT_TEXT: usize = 1024;

impl BeforeSendHook {
    /// The hook `config` describes, or `None` when no URL is configured.
    ///
    /// # Errors
    /// When the configuration is invalid or the HTTP client cannot be built.
    pub(crate) fn new(config: &HooksConfig) -> Result<Option<Self>, String> {
        config.validate()?;
        let b = &config.before_send;
        if b.url.is_empty() {
            return Ok(None);
        }
        let url = reqwest::Url::parse(&b.url).map_err(|e| e.to_string())?;
        let timeout = Duration::from_millis(b.timeout_ms);
        let client = zhibo_push::http::client(timeout)
            .connect_timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| format!("hook HTTP client: {e}"))?;
        Ok(Some(BeforeSendHook {
            client,
            url,
            timeout,
            policy: b.failure_policy,
            receivers: b.receivers.clone(),
            secret: config.secret.as_bytes().to_vec(),
        }))
    }

    /// Whether messages to `receiver_type` are checked.
    pub(crate) fn applies(&self, receiver_type: i32) -> bool {
        let kind = match ReceiverType::try_from(receiver_type) {
            Ok(ReceiverType::User) => HookReceiver::User,
            Ok(ReceiverType::Group) => HookReceiver::Group,
            Ok(ReceiverType::Room) => HookReceiver::Room,
            _ => return false,
        };
        self.receivers.contains(&kind)
    }

    /// Asks the backend about `input` from `origin`. A replacement longer than `max_content` is an
    /// unusable answer.
    ///
    /// # Errors
    /// `HOOK_REJECTED` with the backend's code and text; `UNAVAILABLE` when the hook failed and the policy
    /// is closed.
    pub(crate) async fn check(
        &self,
        origin: &Origin,
        input: &SendMessageInput,
        max_content: usize,
    ) -> Result<Verdict, LogicError> {
        let outcome = tokio::time::timeout(self.timeout, self.ask(origin, input, max_content))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {:?}", self.timeout)));
        match outcome {
            Ok(Decision::Allow) => Ok(Verdict::AsSent),
            Ok(Decision::Replace(content)) => Ok(Verdict::Replace(content)),
            Ok(Decision::Reject { code, text }) => Err(LogicError {
                code: ErrorCode::HookRejected,
                message: text,
                hook_code: code,
            }),
            Err(why) => {
                warn!(user_id = origin.user_id, error = %why, policy = ?self.policy, "before-send hook failed");
                match self.policy {
                    FailurePolicy::Open => Ok(Verdict::AsSent),
                    FailurePolicy::Closed => Err(LogicError::new(
                        ErrorCode::Unavailable,
                        // Rooms have no dedup: a room send is simply sent again.
                        if input.receiver_type == ReceiverType::Room as i32 {
                            "message check unavailable; send again"
                        } else {
                            "message check unavailable; retry with the same client_msg_id"
                        },
                    )),
                }
            }
        }
    }

    async fn ask(
        &self,
        origin: &Origin,
        input: &SendMessageInput,
        max_content: usize,
    ) -> Result<Decision, String> {
        let kind = match ReceiverType::try_from(input.receiver_type) {
            Ok(ReceiverType::Group) => "group",
            Ok(ReceiverType::Room) => "room",
            _ => "user",
        };
        let body = serde_json::to_vec(&HookRequest {
            event: "before_send",
            sender: Sender {
                user_id: origin.user_id,
                device_id: origin.device_id,
            },
            receiver: Receiver {
                kind,
                id: input.receiver_id,
            },
            client_msg_id: &input.client_msg_id,
            content_type: input.content_type,
            content: base64::engine::general_purpose::STANDARD.encode(&input.content),
        })
        .map_err(|e| format!("encoding the request: {e}"))?;
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        // The push relay's signature scheme (`v1=` HMAC-SHA256 over `timestamp.body`), shared code.
        let signature = zhibo_push::sign::sign(
            &self.secret,
            i64::try_from(timestamp).unwrap_or(i64::MAX),
            &body,
        );
        let response = self
            .client
            .post(self.url.clone())
            .header("content-type", "application/json")
            .header("x-zhibo-timestamp", timestamp.to_string())
            .header("x-zhibo-signature", signature)
            .body(body)
            .send()
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("answered HTTP {status}"));
        }
        // An answer is small (a replacement is base64 of at most `max_content` bytes): a huge one is
        // unusable, not read to its end.
        let limit = 64 * 1024 + 2 * max_content;
        let mut response = response;
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
        {
            if bytes.len() + chunk.len() > limit {
                return Err(format!("unusable answer: over {limit} bytes"));
            }
            bytes.extend_from_slice(&chunk);
        }
        decide(&bytes, max_content)
    }
}

/// A usable answer.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    Allow,
    Reject { code: i32, text: String },
    Replace(Bytes),
}

/// Reads the backend's answer `body`.
fn decide(body: &[u8], max_content: usize) -> Result<Decision, String> {
    let answer: HookAnswer =
        serde_json::from_slice(body).map_err(|e| format!("unusable answer: {e}"))?;
    Ok(match answer {
        HookAnswer::Allow => Decision::Allow,
        HookAnswer::Reject { code, mut text } => {
            if text.len() > MAX_REJECT_TEXT {
                let mut end = MAX_REJECT_TEXT;
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                text.truncate(end);
            }
            Decision::Reject { code, text }
        }
        HookAnswer::Replace { content } => {
            let content = base64::engine::general_purpose::STANDARD
                .decode(content.as_bytes())
                .map_err(|e| format!("replacement is not base64: {e}"))?;
            if content.len() > max_content {
                return Err(format!(
                    "replacement of {} bytes exceeds {max_content}",
                    content.len()
                ));
            }
            Decision::Replace(Bytes::from(content))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_strictly() {
        assert_eq!(decide(br#"{"action":"allow"}"#, 10), Ok(Decision::Allow));
        assert_eq!(
            decide(br#"{"action":"reject","code":4001,"text":"no links"}"#, 10),
            Ok(Decision::Reject {
                code: 4001,
                text: "no links".into()
            })
        );
        assert_eq!(
            decide(br#"{"action":"replace","content":"aGk="}"#, 10),
            Ok(Decision::Replace(Bytes::from_static(b"hi")))
        );
        for bad in [
            &br#"{"action":"replace","content":"aGk="}"#[..],
            b"not json",
            br#"{"action":"maybe"}"#,
            br#"{"action":"replace","content":"%%"}"#,
            br#"{}"#,
        ] {
            assert!(decide(bad, 1).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let long = format!(
            r#"{{"action":"reject","code":1,"text":"{}"}}"#,
            "é".repeat(MAX_REJECT_TEXT)
        );
        match decide(long.as_bytes(), 10) {
            Ok(Decision::Reject { text, .. }) => assert!(text.len() <= MAX_REJECT_TEXT),
            other => panic!("{other:?}"),
        }
    }

    fn closed_hook(url: &str) -> BeforeSendHook {
        let mut c = HooksConfig {
            secret: "0123456789abcdef".into(),
            ..HooksConfig::default()
        };
        c.before_send.url = format!("{url}/check");
        c.before_send.failure_policy = FailurePolicy::Closed;
        BeforeSendHook::new(&c).expect("valid").expect("on")
    }

    fn sender() -> Origin {
        Origin {
            user_id: 1,
            device_id: 1,
            ..Origin::default()
        }
    }

    fn user_send() -> SendMessageInput {
        SendMessageInput {
            receiver_type: ReceiverType::User as i32,
            receiver_id: 2,
            client_msg_id: "c1".into(),
            content: Bytes::from_static(b"hi"),
            ..SendMessageInput::default()
        }
    }

    /// A redirect is a failed hook (the failure policy decides), never followed: the signed body does
    /// not go to another address, and the page redirected to does not decide (outside audit).
    #[tokio::test]
    async fn a_redirect_is_a_failure_not_followed() {
        let ok = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 18\r\n\r\n{\"action\":\"allow\"}";
        let (target, target_hits) = zhibo_testkit::http_answering(ok.into()).await;
        let redirect = format!(
            "HTTP/1.1 307 Temporary Redirect\r\nlocation: {target}\r\ncontent-length: 0\r\n\r\n"
        );
        let (url, hits) = zhibo_testkit::http_answering(redirect).await;
        let verdict = closed_hook(&url).check(&sender(), &user_send(), 100).await;
        assert_eq!(
            verdict.err().map(|e| e.code),
            Some(ErrorCode::Unavailable),
            "closed policy: a redirect fails the check"
        );
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(target_hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    /// An answer far larger than any usable one is not read to its end: it is a failed hook.
    #[tokio::test]
    async fn a_huge_answer_is_unusable() {
        let body = format!("{{\"action\":\"allow\"}}{}", " ".repeat(1 << 20));
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let (url, _) = zhibo_testkit::http_answering(answer).await;
        let verdict = closed_hook(&url).check(&sender(), &user_send(), 100).await;
        assert_eq!(verdict.err().map(|e| e.code), Some(ErrorCode::Unavailable));
    }

    /// Only the configured receiver types are checked; no URL means no hook at all.
    #[test]
    fn the_hook_applies_to_its_receiver_types_only() {
        let mut c = HooksConfig {
            secret: "0123456789abcdef".into(),
            ..HooksConfig::default()
        };
        assert!(BeforeSendHook::new(&c).expect("valid").is_none());
        c.before_send.url = "http://127.0.0.1:9/check".into();
        c.before_send.receivers = vec![HookReceiver::Group];
        let hook = BeforeSendHook::new(&c).expect("valid").expect("configured");
        assert!(hook.applies(ReceiverType::Group as i32));
        assert!(!hook.applies(ReceiverType::User as i32));
        assert!(!hook.applies(ReceiverType::Room as i32));
        assert!(!hook.applies(99));
        assert!(!format!("{hook:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn configuration_is_checked() {
        let mut c = HooksConfig::default();
        assert_eq!(c.validate(), Ok(()), "no hook is valid");
        c.before_send.url = "http://127.0.0.1:9/check".into();
        assert!(c.validate().expect_err("no secret").contains("secret"));
        c.secret = "0123456789abcdef".into();
        assert_eq!(c.validate(), Ok(()));
        c.before_send.url = "https://backend.example/check".into();
        assert_eq!(c.validate(), Ok(()), "https (rustls) is accepted");
        c.before_send.url = "ftp://backend.example/check".into();
        assert!(c.validate().expect_err("ftp").contains("http://"));
        c.before_send.url = "http://127.0.0.1:9/check".into();
        c.before_send.timeout_ms = 0;
        assert!(c.validate().expect_err("timeout").contains("timeout_ms"));
        c.before_send.timeout_ms = 500;
        c.before_send.receivers.clear();
        assert!(c.validate().expect_err("receivers").contains("receivers"));
        assert!(
            !format!("{c:?}").contains("0123456789abcdef"),
            "secret hidden"
        );
    }
}
