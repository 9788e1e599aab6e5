//! The friend graph: pending requests and accepted friendships.

use async_trait::async_trait;

#[cfg(doc)]
use crate::ErrorKind;
use crate::{Friend, FriendRequest, Result};

/// The friend graph: requests and accepted friendships (stored in both directions).
#[async_trait]
pub trait FriendStore: Send + Sync {
    /// Records (or replaces) a pending request from `req.from_user_id` to `req.to_user_id`.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn put_request(&self, req: &FriendRequest) -> Result<()>;
    /// The pending request from `from` to `to`, if any.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn get_request(&self, from: i64, to: i64) -> Result<Option<FriendRequest>>;
    /// Pending requests addressed to `to`.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn list_requests_to(&self, to: i64) -> Result<Vec<FriendRequest>>;
    /// Removes the request from `from` to `to` (agreed or refused).
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn delete_request(&self, from: i64, to: i64) -> Result<()>;
    /// Stores one direction of a friendship (call twice for both directions).
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn put_friend(&self, friend: &Friend) -> Result<()>;
    /// `user_id`'s entry for `friend_id`, if they are friends.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn get_friend(&self, user_id: i64, friend_id: i64) -> Result<Option<Friend>>;
    /// All of `user_id`'s friends, ordered by friend id.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn list_friends(&self, user_id: i64) -> Result<Vec<Friend>>;
    /// Removes one direction of a friendship.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn delete_friend(&self, user_id: i64, friend_id: i64) -> Result<()>;
}
