//! [`GroupStore`] on Scylla: tables `groups`, `group_members` (partition: the group) and `user_groups`
//! (the reverse index, partition: the user), kept together with logged batches.

use async_trait::async_trait;
use futures::{StreamExt as _, TryStreamExt as _};
use scylla::client::session::Session;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::DeserializeRow;

use super::{corrupt_data, cql_limit, db_error, ScyllaBackend, WRITE_CONCURRENCY};
use crate::{Error, Group, GroupMember, GroupStore, Result, Role};

/// The group statements, prepared once.
pub(super) struct Statements {
    put_group: PreparedStatement,
    get_group: PreparedStatement,
    delete_group: PreparedStatement,
    put_member: PreparedStatement,
    put_user_group: PreparedStatement,
    get_member: PreparedStatement,
    delete_member: PreparedStatement,
    delete_user_group: PreparedStatement,
    delete_members: PreparedStatement,
    list_members: PreparedStatement,
    member_ids: PreparedStatement,
    groups_of_user: PreparedStatement,
}

impl Statements {
    pub(super) async fn prepare(session: &Session) -> Result<Self> {
        let p = |cql: String| super::prepare(session, cql);
        Ok(Statements {
            put_group: p(
                "INSERT INTO groups (group_id, name, avatar_url, introduction, owner_id, extra, \
                 created_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?)"
                    .into(),
            )
            .await?,
            get_group: p(
                "SELECT group_id, name, avatar_url, introduction, owner_id, extra, created_at_ms \
                 FROM groups WHERE group_id = ?"
                    .into(),
            )
            .await?,
            delete_group: p("DELETE FROM groups WHERE group_id = ?".into()).await?,
            put_member: p(
                "INSERT INTO group_members (group_id, user_id, role, remark, joined_at_ms) \
                 VALUES (?, ?, ?, ?, ?)"
                    .into(),
            )
            .await?,
            put_user_group: p("INSERT INTO user_groups (user_id, group_id) VALUES (?, ?)".into())
                .await?,
            get_member: p(
                "SELECT group_id, user_id, role, remark, joined_at_ms FROM group_members \
                 WHERE group_id = ? AND user_id = ?"
                    .into(),
            )
            .await?,
            delete_member: p("DELETE FROM group_members WHERE group_id = ? AND user_id = ?".into())
                .await?,
            delete_user_group: p(
                "DELETE FROM user_groups WHERE user_id = ? AND group_id = ?".into()
            )
            .await?,
            delete_members: p("DELETE FROM group_members WHERE group_id = ?".into()).await?,
            list_members: p(
                "SELECT group_id, user_id, role, remark, joined_at_ms FROM group_members \
                 WHERE group_id = ? AND user_id > ? LIMIT ?"
                    .into(),
            )
            .await?,
            member_ids: p("SELECT user_id FROM group_members WHERE group_id = ?".into()).await?,
            groups_of_user: p("SELECT group_id FROM user_groups WHERE user_id = ?".into()).await?,
        })
    }
}

#[derive(DeserializeRow)]
struct GroupRow {
    group_id: i64,
    name: String,
    avatar_url: String,
    introduction: String,
    owner_id: i64,
    extra: String,
    created_at_ms: i64,
}

impl From<GroupRow> for Group {
    fn from(r: GroupRow) -> Self {
        Group {
            group_id: r.group_id,
            name: r.name,
            avatar_url: r.avatar_url,
            introduction: r.introduction,
            owner_id: r.owner_id,
            extra: r.extra,
            created_at_ms: r.created_at_ms,
        }
    }
}

#[derive(DeserializeRow)]
struct MemberRow {
    group_id: i64,
    user_id: i64,
    role: i8,
    remark: String,
    joined_at_ms: i64,
}

impl TryFrom<MemberRow> for GroupMember {
    type Error = Error;

    fn try_from(r: MemberRow) -> Result<Self> {
        let role = Role::from_i8(r.role).ok_or_else(|| {
            corrupt_data(
                "group_members",
                format!(
                    "group {} user {}: unknown role {}",
                    r.group_id, r.user_id, r.role
                ),
            )
        })?;
        Ok(GroupMember {
            group_id: r.group_id,
            user_id: r.user_id,
            role,
            remark: r.remark,
            joined_at_ms: r.joined_at_ms,
        })
    }
}

#[async_trait]
impl GroupStore for ScyllaBackend {
    async fn put_group(&self, g: &Group) -> Result<()> {
        let values = (
            g.group_id,
            &g.name,
            &g.avatar_url,
            &g.introduction,
            g.owner_id,
            &g.extra,
            g.created_at_ms,
        );
        self.exec("put group", &self.groups.put_group, values)
            .await?;
        Ok(())
    }

    async fn get_group(&self, group_id: i64) -> Result<Option<Group>> {
        let row: Option<GroupRow> = self
            .one("get group", &self.groups.get_group, (group_id,))
            .await?;
        Ok(row.map(Group::from))
    }

    async fn delete_group(&self, group_id: i64) -> Result<()> {
        // Reverse index first, the group row last: if this stops half-way the group still exists
        // and deleting it again finishes the job.
        let members = self.member_ids(group_id).await?;
        futures::stream::iter(members)
            .map(Ok)
            .try_for_each_concurrent(WRITE_CONCURRENCY, |user_id| async move {
                self.exec(
                    "delete user group",
                    &self.groups.delete_user_group,
                    (user_id, group_id),
                )
                .await
                .map(drop)
            })
            .await?;
        self.exec(
            "delete group members",
            &self.groups.delete_members,
            (group_id,),
        )
        .await?;
        self.exec("delete group", &self.groups.delete_group, (group_id,))
            .await?;
        Ok(())
    }

    async fn put_member(&self, m: &GroupMember) -> Result<()> {
        // Logged batch: the member row and its reverse index land together or not at all.
        let mut batch = Batch::new(BatchType::Logged);
        batch.append_statement(self.groups.put_member.clone());
        batch.append_statement(self.groups.put_user_group.clone());
        let values = (
            (
                m.group_id,
                m.user_id,
                m.role.as_i8(),
                &m.remark,
                m.joined_at_ms,
            ),
            (m.user_id, m.group_id),
        );
        super::count_batch(batch.statements.len());
        self.session
            .batch(&batch, values)
            .await
            .map_err(|e| db_error("put member", e))?;
        Ok(())
    }

    async fn transfer_ownership(
        &self,
        group: &Group,
        new_owner: &GroupMember,
        old_owner: &GroupMember,
    ) -> Result<()> {
        crate::check_transfer(group, new_owner, old_owner)?;
        // One logged batch: the coordinator writes the batch log first, so once it is accepted every
        // statement is applied eventually, even if the coordinator dies; never only some of them.
        let mut batch = Batch::new(BatchType::Logged);
        batch.append_statement(self.groups.put_group.clone());
        batch.append_statement(self.groups.put_member.clone());
        batch.append_statement(self.groups.put_member.clone());
        let g = group;
        let member = |m: &GroupMember| {
            (
                m.group_id,
                m.user_id,
                m.role.as_i8(),
                m.remark.clone(),
                m.joined_at_ms,
            )
        };
        let values = (
            (
                g.group_id,
                &g.name,
                &g.avatar_url,
                &g.introduction,
                g.owner_id,
                &g.extra,
                g.created_at_ms,
            ),
            member(new_owner),
            member(old_owner),
        );
        super::count_batch(batch.statements.len());
        self.session
            .batch(&batch, values)
            .await
            .map_err(|e| db_error("transfer ownership", e))?;
        Ok(())
    }

    async fn get_member(&self, group_id: i64, user_id: i64) -> Result<Option<GroupMember>> {
        let row: Option<MemberRow> = self
            .one("get member", &self.groups.get_member, (group_id, user_id))
            .await?;
        row.map(GroupMember::try_from).transpose()
    }

    async fn delete_member(&self, group_id: i64, user_id: i64) -> Result<()> {
        let mut batch = Batch::new(BatchType::Logged);
        batch.append_statement(self.groups.delete_member.clone());
        batch.append_statement(self.groups.delete_user_group.clone());
        super::count_batch(batch.statements.len());
        self.session
            .batch(&batch, ((group_id, user_id), (user_id, group_id)))
            .await
            .map_err(|e| db_error("delete member", e))?;
        Ok(())
    }

    async fn list_members(
        &self,
        group_id: i64,
        after: i64,
        limit: usize,
    ) -> Result<Vec<GroupMember>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let rows: Vec<MemberRow> = self
            .all(
                "list members",
                &self.groups.list_members,
                (group_id, after, cql_limit(limit)),
            )
            .await?;
        rows.into_iter().map(GroupMember::try_from).collect()
    }

    async fn member_ids(&self, group_id: i64) -> Result<Vec<i64>> {
        let rows: Vec<(i64,)> = self
            .all("member ids", &self.groups.member_ids, (group_id,))
            .await?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    async fn groups_of_user(&self, user_id: i64) -> Result<Vec<i64>> {
        let rows: Vec<(i64,)> = self
            .all("groups of user", &self.groups.groups_of_user, (user_id,))
            .await?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }
}
