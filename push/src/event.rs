//! [`PushEvent`]: what an app backend gets for each offline recipient of a stored message.

use serde::{Deserialize, Serialize};

/// One offline recipient of one stored message: what a notification needs.
///
/// Sent as the JSON body of the relay's POST. `idempotency_key` (`<message_id>:<recipient>`) is the
/// same on every retry and redelivery: delivery is at least once, the receiver drops repeats by it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushEvent {
    /// Always `"push"` (webhook events carry other types).
    #[serde(rename = "type")]
    pub kind: String,
    /// `<message_id>:<recipient_user_id>`: unique per event, stable across retries.
    pub idempotency_key: String,
    /// The user to notify.
    pub recipient_user_id: i64,
    /// Who sent the message.
    pub sender_user_id: i64,
    /// The conversation, as the recipient sees it.
    pub conversation: Conversation,
    /// The stored message's id, as a decimal string (64-bit ids exceed JavaScript's exact integers).
    pub message_id: String,
    /// The recipient's seq of the message (its position in the recipient's inbox).
    pub seq: u64,
    /// The message's content type (application-defined).
    pub content_type: i32,
    /// The start of the content, when it is UTF-8 text and `push.preview` is on; else absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview: Option<String>,
    /// The badge number and what it counts: see [`Badge`].
    pub badge: Badge,
    /// Notifications with one collapse key replace each other (APNs `apns-collapse-id`, FCM
    /// `collapse_key`): `user:<peer>` or `group:<group_id>`.
    pub collapse_key: String,
    /// When the server stored the message, ms since the epoch.
    pub server_time_ms: i64,
}

/// The conversation of a push event from the recipient's side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    /// `"user"` (1:1; `id` is the peer, i.e. the sender) or `"group"` (`id` is the group).
    #[serde(rename = "type")]
    pub kind: String,
    /// The peer's user id or the group id.
    pub id: i64,
}

/// The badge of a push event.
///
/// `source = "unread"`: `count` is the recipient's unread count in this message's conversation (its
/// conversation row, this message included). When that row cannot be read (a store error, a message
/// of no conversation), the event still goes out with `source = "latest_seq"` and `count` the
/// recipient's latest inbox seq, from which an app backend that records the last seq each device
/// acknowledged can derive a count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Badge {
    /// The number.
    pub count: u64,
    /// `"unread"` or `"latest_seq"`.
    pub source: String,
}

impl PushEvent {
    /// The event for `recipient` of a message. `group_id` is `Some` for a group message. `preview` is
    /// the content to preview (`None`: no preview), cut to at most `preview_max_chars` user-perceived characters (grapheme clusters).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        recipient: i64,
        sender: i64,
        group_id: Option<i64>,
        message_id: u64,
        seq: u64,
        content_type: i32,
        content: Option<&[u8]>,
        preview_max_chars: usize,
        server_time_ms: i64,
    ) -> Self {
        let conversation = match group_id {
            Some(g) => Conversation {
                kind: "group".into(),
                id: g,
            },
            None => Conversation {
                kind: "user".into(),
                id: sender,
            },
        };
        PushEvent {
            kind: "push".into(),
            idempotency_key: format!("{message_id}:{recipient}"),
            recipient_user_id: recipient,
            sender_user_id: sender,
            collapse_key: format!("{}:{}", conversation.kind, conversation.id),
            conversation,
            message_id: message_id.to_string(),
            seq,
            content_type,
            preview: content.and_then(|c| preview(c, preview_max_chars)),
            badge: Badge {
                count: seq,
                source: "latest_seq".into(),
            },
            server_time_ms,
        }
    }
}

impl PushEvent {
    /// The same event with the recipient's unread count in the conversation as its badge.
    #[must_use]
    pub fn with_unread(mut self, unread: u64) -> Self {
        self.badge = Badge {
            count: unread,
            source: "unread".into(),
        };
        self
    }
}

/// The first `max_chars` user-perceived characters (grapheme clusters) of `content` when it is UTF-8
/// text (binary and empty content have none).
pub fn preview(content: &[u8], max_chars: usize) -> Option<String> {
    let text = std::str::from_utf8(content).ok()?;
    if text.is_empty() || max_chars == 0 {
        return None;
    }
    // Grapheme clusters: a cut never splits an emoji sequence or a letter from its combining accent.
    Some(
        unicode_segmentation::UnicodeSegmentation::graphemes(text, true)
            .take(max_chars)
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preview_is_text_only_and_cut_between_characters() {
        assert_eq!(preview("héllo".as_bytes(), 2).as_deref(), Some("hé"));
        // User-perceived characters (outside audit: an emoji family cut after its first person, an
        // e losing its combining accent).
        let family = "👨\u{200d}👩\u{200d}👧\u{200d}👦";
        let text = format!("👍🏽{family}abc");
        assert_eq!(
            preview(text.as_bytes(), 2).as_deref(),
            Some(format!("👍🏽{family}").as_str())
        );
        let accented = "e\u{301}".repeat(3);
        assert_eq!(
            preview(accented.as_bytes(), 2).as_deref(),
            Some("e\u{301}e\u{301}")
        );
        assert_eq!(preview(&[0xff, 0xfe], 10), None);
        assert_eq!(preview(b"", 10), None);
        let e = PushEvent::new(2, 1, Some(9), 77, 5, 0, Some(b"hi"), 10, 1);
        assert_eq!(e.idempotency_key, "77:2");
        assert_eq!(e.collapse_key, "group:9");
        let e = PushEvent::new(2, 1, None, 77, 5, 0, None, 10, 1);
        assert_eq!(e.collapse_key, "user:1");
        assert_eq!(e.preview, None);
        let json = serde_json::to_value(&e).expect("json");
        assert_eq!(json["type"], "push");
        assert_eq!(json["conversation"]["type"], "user");
        assert!(json.get("preview").is_none());
    }
}
