//! Every NATS subject zhibo uses, built here and nowhere else.
//!
//! | subject                    | publisher                 | subscriber                                  |
//! |----------------------------|---------------------------|---------------------------------------------|
//! | `<prefix>.cmd`             | gateway, user-api         | logic workers, queue group `logic`          |
//! | `<prefix>.gw.<gateway_id>` | logic worker (replies)    | that gateway                                |
//! | `<prefix>.gwu.<gateway_id>`| logic worker, gateway, user-api | that gateway (events for its users)   |
//! | `<prefix>.users`           | same, when presence is unreadable | every gateway                       |
//! | `<prefix>.room.<room_id>`  | logic worker, gateway     | each gateway with a viewer in that room     |
//! | `<prefix>.broadcast`       | logic worker (user-api)   | every gateway                               |
//! | `<prefix>.authz`           | user-api                  | every process with a logic pipeline         |
//! | `<prefix>.push.event`      | logic worker (JetStream)  | push-relay (durable pull consumer)          |
//! | `<prefix>.push.dead`       | push-relay (JetStream)    | operators (events given up after N attempts)|
//! | `<prefix>.push.webhook`    | logic, gateway, user-api (JetStream) | push-relay (durable pull consumer) |
//!
//! The three `push` subjects are the JetStream stream [`push_stream`] (`<PREFIX>_push`).
//!
//! `<prefix>` is the configuration's `bus.subject_prefix` (default [`DEFAULT_PREFIX`], `zhibo`), fixed
//! once per process by [`set_prefix`] before the first subject is built: deployments (or test runs)
//! sharing one NATS server with different prefixes never see each other's traffic.
//!
//! Events for a user's devices (deliveries, kicks) go to the gateways that presence says hold the user
//! (see [`crate::route`] and docs/ARCHITECTURE.md, "Routing by gateway").

use std::fmt;
use std::sync::OnceLock;

/// Queue group of the logic workers on [`Subject::commands`].
pub const LOGIC_QUEUE_GROUP: &str = "logic";

/// The subject prefix when none is configured.
pub const DEFAULT_PREFIX: &str = "zhibo";

/// The process's prefix: set by [`set_prefix`], or [`DEFAULT_PREFIX`] once a subject was built first.
static PREFIX: OnceLock<String> = OnceLock::new();

/// Why [`set_prefix`] refused a prefix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    /// Not one NATS token (see [`is_valid_token`]).
    #[error("subject prefix {0:?} is not one token of ASCII letters, digits, '-' or '_'")]
    Invalid(String),
    /// The process already uses another prefix (set earlier, or the default once a subject was built).
    #[error("subject prefix {wanted:?} refused: this process already uses {current:?}")]
    AlreadySet {
        /// The prefix in use.
        current: String,
        /// The prefix refused.
        wanted: String,
    },
}

/// Checks that `prefix` is usable as the subject prefix: one token (see [`is_valid_token`]).
///
/// # Errors
/// [`PrefixError::Invalid`] otherwise.
pub fn validate_prefix(prefix: &str) -> Result<(), PrefixError> {
    if is_valid_token(prefix) {
        Ok(())
    } else {
        Err(PrefixError::Invalid(prefix.to_owned()))
    }
}

/// Fixes the prefix of every subject this process builds. Idempotent for the same prefix.
///
/// # Errors
/// [`PrefixError::Invalid`] for a prefix that is not one token; [`PrefixError::AlreadySet`] when the
/// process already uses another prefix (set before, or the default because a subject was built
/// first): subjects never change under a running process.
pub fn set_prefix(prefix: &str) -> Result<(), PrefixError> {
    validate_prefix(prefix)?;
    let current = PREFIX.get_or_init(|| prefix.to_owned());
    if current == prefix {
        Ok(())
    } else {
        Err(PrefixError::AlreadySet {
            current: current.clone(),
            wanted: prefix.to_owned(),
        })
    }
}

/// The process's subject prefix (fixing it to [`DEFAULT_PREFIX`] if [`set_prefix`] was not called).
pub fn prefix() -> &'static str {
    PREFIX.get_or_init(|| DEFAULT_PREFIX.to_owned())
}

/// A NATS subject name, built only by this module's constructors.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subject(String);

impl Subject {
    /// Client commands (send, sync, ack...) from gateways and user-api to logic workers.
    pub fn commands() -> Self {
        Subject(format!("{}.cmd", prefix()))
    }

    /// Events for the users of one gateway (`zhibo_proto::bus::UserEvent`, each naming its user):
    /// deliveries, kicks, room bans, routed here through presence.
    pub fn gateway_users(gateway_id: &str) -> Self {
        Subject(format!("{}.gwu.{gateway_id}", prefix()))
    }

    /// User events for every gateway: where an event goes when presence (which gateway holds the user)
    /// cannot be read. Each gateway keeps those of its own users.
    pub fn all_gateways_users() -> Self {
        Subject(format!("{}.users", prefix()))
    }

    /// Replies addressed to one gateway's connections.
    pub fn gateway(gateway_id: &str) -> Self {
        Subject(format!("{}.gw.{gateway_id}", prefix()))
    }

    /// Live room traffic: room messages (published once, by a logic worker) and the gateways' viewer
    /// counts. A gateway subscribes only while it has a viewer in the room.
    pub fn room(room_id: i64) -> Self {
        Subject(format!("{}.room.{room_id}", prefix()))
    }

    /// Server-wide notices for every connected device (admin broadcast).
    pub fn broadcast() -> Self {
        Subject(format!("{}.broadcast", prefix()))
    }

    /// Changes of what the send path may cache (a friendship ended): every logic worker and user-api
    /// drops the cached answer (`zhibo_proto::bus::AuthzEvent`).
    pub fn authz() -> Self {
        Subject(format!("{}.authz", prefix()))
    }

    /// Offline push events (JSON), one per offline recipient per stored message; captured by the
    /// JetStream stream [`push_stream`] and delivered by `zhibo push-relay`.
    pub fn push_events() -> Self {
        Subject(format!("{}.push.event", prefix()))
    }

    /// Push events the relay gave up on after its last attempt (same stream, not consumed).
    pub fn push_dead_letters() -> Self {
        Subject(format!("{}.push.dead", prefix()))
    }

    /// Webhook events (JSON, `webhooks.events`), in the same stream [`push_stream`]; delivered to
    /// `webhooks.url` by `zhibo push-relay` (its own durable consumer [`WEBHOOK_CONSUMER`]).
    pub fn webhook_events() -> Self {
        Subject(format!("{}.push.webhook", prefix()))
    }

    /// Answers to one room-viewers query (`RoomViewersQuery`): the asker subscribes before publishing the
    /// query on the room subject, each gateway with viewers of the room replies here. `query_id` must be
    /// a valid token ([`is_valid_token`]).
    pub fn room_viewers_reply(query_id: &str) -> Self {
        Subject(format!("{}.roomviewers.{query_id}", prefix()))
    }

    /// The subject name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The JetStream stream holding [`Subject::push_events`], [`Subject::push_dead_letters`] and
/// [`Subject::webhook_events`]:
/// `<PREFIX>_push` (stream names cannot contain `.`; the prefix is one token, so this is unique per
/// prefix up to letter case).
pub fn push_stream() -> String {
    format!("{}_push", prefix().to_ascii_uppercase())
}

/// The durable consumer of [`push_stream`] shared by every push-relay replica.
pub const PUSH_CONSUMER: &str = "push-relay";

/// The durable consumer of [`Subject::webhook_events`] in [`push_stream`], shared by every push-relay.
pub const WEBHOOK_CONSUMER: &str = "webhook-relay";

/// Whether `id` is usable inside a subject token (a gateway id): non-empty, ASCII alphanumerics, `-`, `_`.
pub fn is_valid_token(id: &str) -> bool {
    !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_distinct_and_tokenised() {
        assert_eq!(Subject::room(7).as_str(), "zhibo.room.7");
        assert_eq!(Subject::gateway("gw-1").as_str(), "zhibo.gw.gw-1");
        assert_eq!(Subject::gateway_users("gw-1").as_str(), "zhibo.gwu.gw-1");
        assert_eq!(Subject::all_gateways_users().as_str(), "zhibo.users");
        assert_ne!(Subject::gateway_users("7"), Subject::gateway("7"));
        assert_eq!(Subject::broadcast().as_str(), "zhibo.broadcast");
        assert_eq!(Subject::authz().as_str(), "zhibo.authz");
        assert_eq!(Subject::push_events().as_str(), "zhibo.push.event");
        assert_eq!(Subject::push_dead_letters().as_str(), "zhibo.push.dead");
        assert_eq!(Subject::webhook_events().as_str(), "zhibo.push.webhook");
        assert_eq!(push_stream(), "ZHIBO_push");
        assert_eq!(
            Subject::room_viewers_reply("q-1").as_str(),
            "zhibo.roomviewers.q-1"
        );
        assert!(is_valid_token("gw_1-a"));
        assert!(!is_valid_token("gw.1"));
        assert!(!is_valid_token("gw*"));
        assert!(!is_valid_token(""));
    }

    #[test]
    fn the_prefix_is_one_token_and_fixed_once() {
        // This test binary builds subjects with the default prefix (test above): it is fixed.
        assert_eq!(Subject::commands().as_str(), "zhibo.cmd");
        assert_eq!(set_prefix(DEFAULT_PREFIX), Ok(()));
        assert!(matches!(
            set_prefix("other"),
            Err(PrefixError::AlreadySet { ref current, .. }) if current == "zhibo"
        ));
        assert_eq!(prefix(), "zhibo");
        for bad in ["", "a.b", "a*", ">", "a b"] {
            assert_eq!(validate_prefix(bad), Err(PrefixError::Invalid(bad.into())));
            assert!(matches!(set_prefix(bad), Err(PrefixError::Invalid(_))));
        }
        assert_eq!(validate_prefix("e2e_123-x"), Ok(()));
    }
}
