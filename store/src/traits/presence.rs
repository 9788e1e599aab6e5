//! [`Presence`]: which users have a device online, for offline push (see docs/ARCHITECTURE.md, "Push").

use async_trait::async_trait;

use crate::Result;

/// Told of a user's presence changes ([`Presence::watch`]): `(user_id, online)`, `true` when the user's
/// first device anywhere connected, `false` when their last one is gone. Called on the presence
/// caller's task: it must not block (hand the work to a task).
pub type PresenceListener = std::sync::Arc<dyn Fn(i64, bool) + Send + Sync>;

/// Online users, written by gateways and read by logic workers on the send path.
///
/// A gateway reports a user once when the user's first connection on it is registered and once when
/// the last one leaves; the reader asks about all recipients of a message at once.
#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// `user_id` has its first connection on gateway `gateway_id`. Returns once recorded, or failed
    /// (logged by the implementation: a lost "online" costs at most a redundant push).
    async fn connected(&self, gateway_id: &str, user_id: i64);

    /// `user_id`'s last connection on gateway `gateway_id` is gone. Never waits.
    fn disconnected(&self, gateway_id: &str, user_id: i64);

    /// For each of `users`, whether any of their devices is online on any gateway.
    ///
    /// # Errors
    /// [`crate::ErrorKind::Unavailable`] when presence cannot be read (callers treat everyone as
    /// offline: a push too many rather than one too few).
    async fn online(&self, users: &[i64]) -> Result<Vec<bool>>;

    /// Calls `listener` on each user's online/offline transition (event webhooks). Set once, before
    /// the first connection; unset, [`Presence::connected`] and [`Presence::disconnected`] do no
    /// extra work.
    fn watch(&self, listener: PresenceListener);
}
