//! [`GroupStore`] on redb: tables `groups`, `group_members` ((group, user) → [`GroupMember`] as JSON) and
//! `user_groups` (the reverse index), written together in one transaction.

use async_trait::async_trait;

use super::{
    from_json, json_range, second_keys, to_json, Db, EmbeddedBackend, GROUPS, MEMBERS, USER_GROUPS,
};
use crate::{Group, GroupMember, GroupStore, Result};

#[async_trait]
impl GroupStore for EmbeddedBackend {
    async fn put_group(&self, group: &Group) -> Result<()> {
        let (id, bytes) = (group.group_id, to_json(group)?);
        self.write(move |t| {
            t.groups.insert(id, bytes.as_slice()).db()?;
            Ok(())
        })
        .await
    }

    async fn get_group(&self, group_id: i64) -> Result<Option<Group>> {
        self.point(move |tx| {
            let table = tx.open_table(GROUPS).db()?;
            let row = table.get(group_id).db()?;
            row.map(|v| from_json(v.value(), "group")).transpose()
        })
        .await
    }

    async fn delete_group(&self, group_id: i64) -> Result<()> {
        self.write(move |t| {
            let members = &mut t.members;
            let user_groups = &mut t.user_groups;
            for user_id in second_keys(members, group_id)? {
                members.remove((group_id, user_id)).db()?;
                user_groups.remove((user_id, group_id)).db()?;
            }
            t.groups.remove(group_id).db()?;
            Ok(())
        })
        .await
    }

    async fn put_member(&self, member: &GroupMember) -> Result<()> {
        let (group_id, user_id, bytes) = (member.group_id, member.user_id, to_json(member)?);
        self.write(move |t| {
            t.members
                .insert((group_id, user_id), bytes.as_slice())
                .db()?;
            t.user_groups.insert((user_id, group_id), ()).db()?;
            Ok(())
        })
        .await
    }

    async fn transfer_ownership(
        &self,
        group: &Group,
        new_owner: &GroupMember,
        old_owner: &GroupMember,
    ) -> Result<()> {
        crate::check_transfer(group, new_owner, old_owner)?;
        let id = group.group_id;
        let group_bytes = to_json(group)?;
        let rows = [
            (new_owner.user_id, to_json(new_owner)?),
            (old_owner.user_id, to_json(old_owner)?),
        ];
        // One redb write transaction: all three records commit together or none does.
        self.write(move |t| {
            t.groups.insert(id, group_bytes.as_slice()).db()?;
            for (user_id, bytes) in &rows {
                t.members.insert((id, *user_id), bytes.as_slice()).db()?;
                t.user_groups.insert((*user_id, id), ()).db()?;
            }
            Ok(())
        })
        .await
    }

    async fn get_member(&self, group_id: i64, user_id: i64) -> Result<Option<GroupMember>> {
        self.point(move |tx| {
            let table = tx.open_table(MEMBERS).db()?;
            let row = table.get((group_id, user_id)).db()?;
            row.map(|v| from_json(v.value(), "group member"))
                .transpose()
        })
        .await
    }

    async fn delete_member(&self, group_id: i64, user_id: i64) -> Result<()> {
        self.write(move |t| {
            t.members.remove((group_id, user_id)).db()?;
            t.user_groups.remove((user_id, group_id)).db()?;
            Ok(())
        })
        .await
    }

    async fn list_members(
        &self,
        group_id: i64,
        after: i64,
        limit: usize,
    ) -> Result<Vec<GroupMember>> {
        self.read(move |tx| {
            let table = tx.open_table(MEMBERS).db()?;
            json_range(&table, group_id, after, limit, "group member")
        })
        .await
    }

    async fn member_ids(&self, group_id: i64) -> Result<Vec<i64>> {
        self.read(move |tx| second_keys(&tx.open_table(MEMBERS).db()?, group_id))
            .await
    }

    async fn groups_of_user(&self, user_id: i64) -> Result<Vec<i64>> {
        self.read(move |tx| second_keys(&tx.open_table(USER_GROUPS).db()?, user_id))
            .await
    }
}
