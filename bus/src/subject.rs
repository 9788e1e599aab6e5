//! Every NATS subject zhibo uses, built here and nowhere else.
//!
//! | subject                 | publisher                 | subscriber                                  |
//! |-------------------------|---------------------------|---------------------------------------------|
//! | `zhibo.cmd`             | gateway, user-api         | logic workers, queue group `logic`          |
//! | `zhibo.user.<user_id>`  | logic worker, gateway     | each gateway holding a device of that user  |
//! | `zhibo.gw.<gateway_id>` | logic worker (replies)    | that gateway                                |
//! | `zhibo.room.<room_id>`  | logic worker, gateway     | each gateway with a viewer in that room     |
//! | `zhibo.broadcast`       | logic worker (user-api)   | every gateway                               |
//!
//! See docs/ARCHITECTURE.md for why deliveries go to per-user subjects.

use std::fmt;

/// Queue group of the logic workers on [`Subject::commands`].
pub const LOGIC_QUEUE_GROUP: &str = "logic";

/// A NATS subject name, built only by this module's constructors.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subject(String);

impl Subject {
    /// Client commands (send, sync, ack...) from gateways and user-api to logic workers.
    pub fn commands() -> Self {
        Subject("zhibo.cmd".to_owned())
    }

    /// Deliveries and presence events for every device of `user_id`.
    pub fn user(user_id: i64) -> Self {
        Subject(format!("zhibo.user.{user_id}"))
    }

    /// Replies addressed to one gateway's connections.
    pub fn gateway(gateway_id: &str) -> Self {
        Subject(format!("zhibo.gw.{gateway_id}"))
    }

    /// Live room traffic: room messages (published once, by a logic worker) and the gateways' viewer
    /// counts. A gateway subscribes only while it has a viewer in the room.
    pub fn room(room_id: i64) -> Self {
        Subject(format!("zhibo.room.{room_id}"))
    }

    /// Server-wide notices for every connected device (admin broadcast).
    pub fn broadcast() -> Self {
        Subject("zhibo.broadcast".to_owned())
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
        assert_eq!(Subject::user(7).as_str(), "zhibo.user.7");
        assert_eq!(Subject::room(7).as_str(), "zhibo.room.7");
        assert_eq!(Subject::gateway("gw-1").as_str(), "zhibo.gw.gw-1");
        assert_ne!(Subject::user(7), Subject::room(7));
        assert_eq!(Subject::broadcast().as_str(), "zhibo.broadcast");
        assert!(is_valid_token("gw_1-a"));
        assert!(!is_valid_token("gw.1"));
        assert!(!is_valid_token("gw*"));
        assert!(!is_valid_token(""));
    }
}
