//! Groups and their members, and the rule every backend checks before an ownership transfer.

use async_trait::async_trait;

use crate::{Error, ErrorKind, Group, GroupMember, Result, Role};

/// Groups and their members.
#[async_trait]
pub trait GroupStore: Send + Sync {
    /// Creates or replaces a group's record.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn put_group(&self, group: &Group) -> Result<()>;
    /// The group, if it exists (dissolved groups are deleted).
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn get_group(&self, group_id: i64) -> Result<Option<Group>>;
    /// Deletes the group, its members and their `groups of user` entries.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn delete_group(&self, group_id: i64) -> Result<()>;
    /// Adds or replaces a member (also indexes the group under the user).
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn put_member(&self, member: &GroupMember) -> Result<()>;
    /// Transfers ownership in one atomic step: writes `group` (whose `owner_id` is `new_owner.user_id`),
    /// `new_owner` (role [`Role::Owner`]) and `old_owner` (its new role, e.g. admin) together, so a failure
    /// can never leave the group with two owners or none. Both are existing members of `group`.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure (then nothing, or in Scylla's logged batch
    /// everything eventually, is applied); [`ErrorKind::Conflict`] when the records disagree (another
    /// group, `owner_id` not the new owner, or the new owner's role not `Owner`), with nothing written.
    async fn transfer_ownership(
        &self,
        group: &Group,
        new_owner: &GroupMember,
        old_owner: &GroupMember,
    ) -> Result<()>;
    /// The member record, if `user_id` is in the group.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn get_member(&self, group_id: i64, user_id: i64) -> Result<Option<GroupMember>>;
    /// Removes a member (and the group from the user's list).
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn delete_member(&self, group_id: i64, user_id: i64) -> Result<()>;
    /// Members ordered by user id, those with `user_id > after`, at most `limit`.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn list_members(
        &self,
        group_id: i64,
        after: i64,
        limit: usize,
    ) -> Result<Vec<GroupMember>>;
    /// Ids of every member (fan-out).
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn member_ids(&self, group_id: i64) -> Result<Vec<i64>>;
    /// Ids of the groups `user_id` is in, ordered.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn groups_of_user(&self, user_id: i64) -> Result<Vec<i64>>;
}

/// Checks the records of [`GroupStore::transfer_ownership`] agree, for every backend.
///
/// # Errors
/// [`ErrorKind::Conflict`] naming the disagreement.
pub fn check_transfer(
    group: &Group,
    new_owner: &GroupMember,
    old_owner: &GroupMember,
) -> Result<()> {
    if new_owner.group_id != group.group_id || old_owner.group_id != group.group_id {
        return Err(Error::new(ErrorKind::Conflict, "members of another group"));
    }
    if group.owner_id != new_owner.user_id || new_owner.role != Role::Owner {
        return Err(Error::new(
            ErrorKind::Conflict,
            "the group's owner_id and the new owner's role must name the new owner",
        ));
    }
    if old_owner.user_id == new_owner.user_id || old_owner.role == Role::Owner {
        return Err(Error::new(
            ErrorKind::Conflict,
            "the old owner must be another member and lose the owner role",
        ));
    }
    Ok(())
}
