//! [`GroupInviteStore`] on Scylla: table `group_invites` (`0004_security.cql`), partition key the
//! invitee, clustering the group: "my invitations" is one partition, one invitation one row.

use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;
use scylla::DeserializeRow;

use super::{db_error, ScyllaBackend};
use crate::{GroupInvite, GroupInviteStore, Result};

/// Columns of `group_invites`, in the order of [`InviteRow`] and of the insert's values.
const COLUMNS: &str = "user_id, group_id, inviter_id, created_at_ms";

/// The invitation statements, prepared once.
pub(super) struct Statements {
    put: PreparedStatement,
    get: PreparedStatement,
    list: PreparedStatement,
    delete: PreparedStatement,
}

impl Statements {
    pub(super) async fn prepare(session: &Session) -> Result<Self> {
        let p = |cql: String| async move {
            session
                .prepare(cql.clone())
                .await
                .map_err(|e| db_error(&format!("prepare `{cql}`"), e))
        };
        Ok(Statements {
            put: p(format!(
                "INSERT INTO group_invites ({COLUMNS}) VALUES (?, ?, ?, ?)"
            ))
            .await?,
            get: p(format!(
                "SELECT {COLUMNS} FROM group_invites WHERE user_id = ? AND group_id = ?"
            ))
            .await?,
            list: p(format!(
                "SELECT {COLUMNS} FROM group_invites WHERE user_id = ?"
            ))
            .await?,
            delete: p("DELETE FROM group_invites WHERE user_id = ? AND group_id = ?".into())
                .await?,
        })
    }
}

#[derive(DeserializeRow)]
struct InviteRow {
    user_id: i64,
    group_id: i64,
    inviter_id: i64,
    created_at_ms: i64,
}

impl From<InviteRow> for GroupInvite {
    fn from(r: InviteRow) -> Self {
        GroupInvite {
            group_id: r.group_id,
            user_id: r.user_id,
            inviter_id: r.inviter_id,
            created_at_ms: r.created_at_ms,
        }
    }
}

#[async_trait::async_trait]
impl GroupInviteStore for ScyllaBackend {
    async fn put_invite(&self, i: &GroupInvite) -> Result<()> {
        let values = (i.user_id, i.group_id, i.inviter_id, i.created_at_ms);
        self.exec("put group invite", &self.invites.put, values)
            .await?;
        Ok(())
    }

    async fn get_invite(&self, group_id: i64, user_id: i64) -> Result<Option<GroupInvite>> {
        let row: Option<InviteRow> = self
            .one("get group invite", &self.invites.get, (user_id, group_id))
            .await?;
        Ok(row.map(GroupInvite::from))
    }

    async fn list_invites(&self, user_id: i64) -> Result<Vec<GroupInvite>> {
        let rows: Vec<InviteRow> = self
            .all("list group invites", &self.invites.list, (user_id,))
            .await?;
        Ok(rows.into_iter().map(GroupInvite::from).collect())
    }

    async fn delete_invite(&self, group_id: i64, user_id: i64) -> Result<()> {
        self.exec(
            "delete group invite",
            &self.invites.delete,
            (user_id, group_id),
        )
        .await?;
        Ok(())
    }
}
