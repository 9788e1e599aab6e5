//! [`FriendStore`] on Scylla: tables `friend_requests` (partition: the addressee) and `friends` (one row
//! per direction, partition: the user).

use async_trait::async_trait;
use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;
use scylla::DeserializeRow;

use super::ScyllaBackend;
use crate::{Friend, FriendRequest, FriendStore, Result};

/// The friend statements, prepared once.
pub(super) struct Statements {
    put_request: PreparedStatement,
    get_request: PreparedStatement,
    list_requests_to: PreparedStatement,
    delete_request: PreparedStatement,
    put_friend: PreparedStatement,
    get_friend: PreparedStatement,
    list_friends: PreparedStatement,
    delete_friend: PreparedStatement,
}

impl Statements {
    pub(super) async fn prepare(session: &Session) -> Result<Self> {
        let p = |cql: String| super::prepare(session, cql);
        Ok(Statements {
            put_request: p(
                "INSERT INTO friend_requests (to_user_id, from_user_id, message, created_at_ms) \
                 VALUES (?, ?, ?, ?)"
                    .into(),
            )
            .await?,
            get_request: p(
                "SELECT from_user_id, to_user_id, message, created_at_ms FROM friend_requests \
                 WHERE to_user_id = ? AND from_user_id = ?"
                    .into(),
            )
            .await?,
            list_requests_to: p(
                "SELECT from_user_id, to_user_id, message, created_at_ms FROM friend_requests \
                 WHERE to_user_id = ?"
                    .into(),
            )
            .await?,
            delete_request: p(
                "DELETE FROM friend_requests WHERE to_user_id = ? AND from_user_id = ?".into(),
            )
            .await?,
            put_friend: p(
                "INSERT INTO friends (user_id, friend_id, remark, extra, created_at_ms) \
                 VALUES (?, ?, ?, ?, ?)"
                    .into(),
            )
            .await?,
            get_friend: p(
                "SELECT user_id, friend_id, remark, extra, created_at_ms FROM friends \
                 WHERE user_id = ? AND friend_id = ?"
                    .into(),
            )
            .await?,
            list_friends: p(
                "SELECT user_id, friend_id, remark, extra, created_at_ms FROM friends \
                 WHERE user_id = ?"
                    .into(),
            )
            .await?,
            delete_friend: p("DELETE FROM friends WHERE user_id = ? AND friend_id = ?".into())
                .await?,
        })
    }
}

#[derive(DeserializeRow)]
struct FriendRequestRow {
    from_user_id: i64,
    to_user_id: i64,
    message: String,
    created_at_ms: i64,
}

impl From<FriendRequestRow> for FriendRequest {
    fn from(r: FriendRequestRow) -> Self {
        FriendRequest {
            from_user_id: r.from_user_id,
            to_user_id: r.to_user_id,
            message: r.message,
            created_at_ms: r.created_at_ms,
        }
    }
}

#[derive(DeserializeRow)]
struct FriendRow {
    user_id: i64,
    friend_id: i64,
    remark: String,
    extra: String,
    created_at_ms: i64,
}

impl From<FriendRow> for Friend {
    fn from(r: FriendRow) -> Self {
        Friend {
            user_id: r.user_id,
            friend_id: r.friend_id,
            remark: r.remark,
            extra: r.extra,
            created_at_ms: r.created_at_ms,
        }
    }
}

#[async_trait]
impl FriendStore for ScyllaBackend {
    async fn put_request(&self, r: &FriendRequest) -> Result<()> {
        let values = (r.to_user_id, r.from_user_id, &r.message, r.created_at_ms);
        self.exec("put friend request", &self.friends.put_request, values)
            .await?;
        Ok(())
    }

    async fn get_request(&self, from: i64, to: i64) -> Result<Option<FriendRequest>> {
        let row: Option<FriendRequestRow> = self
            .one("get friend request", &self.friends.get_request, (to, from))
            .await?;
        Ok(row.map(FriendRequest::from))
    }

    async fn list_requests_to(&self, to: i64) -> Result<Vec<FriendRequest>> {
        let rows: Vec<FriendRequestRow> = self
            .all(
                "list friend requests",
                &self.friends.list_requests_to,
                (to,),
            )
            .await?;
        Ok(rows.into_iter().map(FriendRequest::from).collect())
    }

    async fn delete_request(&self, from: i64, to: i64) -> Result<()> {
        self.exec(
            "delete friend request",
            &self.friends.delete_request,
            (to, from),
        )
        .await?;
        Ok(())
    }

    async fn put_friend(&self, f: &Friend) -> Result<()> {
        let values = (f.user_id, f.friend_id, &f.remark, &f.extra, f.created_at_ms);
        self.exec("put friend", &self.friends.put_friend, values)
            .await?;
        Ok(())
    }

    async fn get_friend(&self, user_id: i64, friend_id: i64) -> Result<Option<Friend>> {
        let row: Option<FriendRow> = self
            .one("get friend", &self.friends.get_friend, (user_id, friend_id))
            .await?;
        Ok(row.map(Friend::from))
    }

    async fn list_friends(&self, user_id: i64) -> Result<Vec<Friend>> {
        let rows: Vec<FriendRow> = self
            .all("list friends", &self.friends.list_friends, (user_id,))
            .await?;
        Ok(rows.into_iter().map(Friend::from).collect())
    }

    async fn delete_friend(&self, user_id: i64, friend_id: i64) -> Result<()> {
        self.exec(
            "delete friend",
            &self.friends.delete_friend,
            (user_id, friend_id),
        )
        .await?;
        Ok(())
    }
}
