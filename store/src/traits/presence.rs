//! [`Presence`]: which gateways hold each user's connections: how events for a user's devices are routed
//! (`zhibo_bus::route`), and who is offline for push (see docs/ARCHITECTURE.md, "Routing by gateway"
//! and "Push").

use async_trait::async_trait;

use crate::Result;

/// Told of a user's presence changes ([`Presence::watch`]): `(user_id, online)`, `true` when the user's
/// first device anywhere connected, `false` when their last one is gone. Called on the presence
/// caller's task: it must not block (hand the work to a task).
pub type PresenceListener = std::sync::Arc<dyn Fn(i64, bool) + Send + Sync>;

/// Where users are online, written by gateways and read by logic workers on the send path.
///
/// A gateway reports a user once when the user's first connection on it is registered and once when
/// the last one leaves; the reader asks about all recipients of a message at once.
#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// `user_id` has its first connection on gateway `gateway_id`. Returns once recorded: events for the
    /// user are routed to this gateway from then on.
    ///
    /// # Errors
    /// [`crate::ErrorKind::Unavailable`] when it could not be recorded (the gateway refuses the
    /// sign-in: nothing would be routed to it).
    async fn connected(&self, gateway_id: &str, user_id: i64) -> Result<()>;

    /// `user_id`'s last connection on gateway `gateway_id` is gone. Never waits.
    fn disconnected(&self, gateway_id: &str, user_id: i64);

    /// For each of `users`, the gateways holding a connection of theirs (empty: offline), or `None`
    /// when presence cannot tell: it lost entries moments ago (Redis flushed or restarted) and the
    /// gateways may not have written theirs again yet. Callers route a `None` to every gateway.
    ///
    /// # Errors
    /// [`crate::ErrorKind::Unavailable`] when presence cannot be read (callers route to every gateway
    /// and treat everyone as offline for push: a push too many rather than one too few).
    async fn gateways(&self, users: &[i64]) -> Result<Vec<Option<Vec<String>>>>;

    /// For each of `users`, whether any of their devices is known to be online on any gateway.
    ///
    /// # Errors
    /// As [`Presence::gateways`].
    async fn online(&self, users: &[i64]) -> Result<Vec<bool>> {
        Ok(self
            .gateways(users)
            .await?
            .iter()
            .map(|g| g.as_ref().is_some_and(|g| !g.is_empty()))
            .collect())
    }

    /// Calls `listener` on each user's online/offline transition (event webhooks). Set once, before
    /// the first connection; unset, [`Presence::connected`] and [`Presence::disconnected`] do no
    /// extra work.
    fn watch(&self, listener: PresenceListener);
}
