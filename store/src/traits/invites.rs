//! Group invitations: a user added to a group by someone who is not their friend (under the `invite`
//! group-add policy of user-api) gets a pending invitation and joins only by accepting it.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::Result;

/// A pending invitation of `user_id` into `group_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInvite {
    /// The group.
    pub group_id: i64,
    /// Who is invited.
    pub user_id: i64,
    /// The owner or admin who invited them.
    pub inviter_id: i64,
    /// When (the latest invitation, if invited again).
    pub created_at_ms: i64,
}

/// Pending group invitations, looked up by invitee.
#[async_trait]
pub trait GroupInviteStore: Send + Sync {
    /// Creates or replaces the invitation of `invite.user_id` into `invite.group_id`.
    ///
    /// # Errors
    /// [`crate::ErrorKind::Unavailable`] on backend failure.
    async fn put_invite(&self, invite: &GroupInvite) -> Result<()>;
    /// The invitation of `user_id` into `group_id`, if pending.
    ///
    /// # Errors
    /// [`crate::ErrorKind::Unavailable`] on backend failure.
    async fn get_invite(&self, group_id: i64, user_id: i64) -> Result<Option<GroupInvite>>;
    /// Every pending invitation of `user_id`, ordered by group id.
    ///
    /// # Errors
    /// [`crate::ErrorKind::Unavailable`] on backend failure.
    async fn list_invites(&self, user_id: i64) -> Result<Vec<GroupInvite>>;
    /// Removes the invitation (accepted, refused, or its group is gone); absent is not an error.
    ///
    /// # Errors
    /// [`crate::ErrorKind::Unavailable`] on backend failure.
    async fn delete_invite(&self, group_id: i64, user_id: i64) -> Result<()>;
}
