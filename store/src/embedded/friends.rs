//! [`FriendStore`] on redb: tables `friend_requests` ((to, from) → [`FriendRequest`] as JSON) and
//! `friends` ((user, friend) → [`Friend`] as JSON, one entry per direction).

use async_trait::async_trait;

use super::{from_json, json_range, to_json, Db, EmbeddedBackend, FRIENDS, FRIEND_REQUESTS};
use crate::{Friend, FriendRequest, FriendStore, Result};

#[async_trait]
impl FriendStore for EmbeddedBackend {
    async fn put_request(&self, req: &FriendRequest) -> Result<()> {
        let (key, bytes) = ((req.to_user_id, req.from_user_id), to_json(req)?);
        self.write(move |t| {
            t.friend_requests.insert(key, bytes.as_slice()).db()?;
            Ok(())
        })
        .await
    }

    async fn get_request(&self, from: i64, to: i64) -> Result<Option<FriendRequest>> {
        self.point(move |tx| {
            let table = tx.open_table(FRIEND_REQUESTS).db()?;
            let row = table.get((to, from)).db()?;
            row.map(|v| from_json(v.value(), "friend request"))
                .transpose()
        })
        .await
    }

    async fn list_requests_to(&self, to: i64) -> Result<Vec<FriendRequest>> {
        self.read(move |tx| {
            let table = tx.open_table(FRIEND_REQUESTS).db()?;
            json_range(&table, to, i64::MIN, usize::MAX, "friend request")
        })
        .await
    }

    async fn delete_request(&self, from: i64, to: i64) -> Result<()> {
        self.write(move |t| {
            t.friend_requests.remove((to, from)).db()?;
            Ok(())
        })
        .await
    }

    async fn put_friend(&self, friend: &Friend) -> Result<()> {
        let (key, bytes) = ((friend.user_id, friend.friend_id), to_json(friend)?);
        self.write(move |t| {
            t.friends.insert(key, bytes.as_slice()).db()?;
            Ok(())
        })
        .await
    }

    async fn get_friend(&self, user_id: i64, friend_id: i64) -> Result<Option<Friend>> {
        self.point(move |tx| {
            let table = tx.open_table(FRIENDS).db()?;
            let row = table.get((user_id, friend_id)).db()?;
            row.map(|v| from_json(v.value(), "friend")).transpose()
        })
        .await
    }

    async fn list_friends(&self, user_id: i64) -> Result<Vec<Friend>> {
        self.read(move |tx| {
            let table = tx.open_table(FRIENDS).db()?;
            json_range(&table, user_id, i64::MIN, usize::MAX, "friend")
        })
        .await
    }

    async fn delete_friend(&self, user_id: i64, friend_id: i64) -> Result<()> {
        self.write(move |t| {
            t.friends.remove((user_id, friend_id)).db()?;
            Ok(())
        })
        .await
    }
}
