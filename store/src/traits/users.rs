//! Users and their unique usernames.

use async_trait::async_trait;

#[cfg(doc)]
use crate::ErrorKind;
use crate::{Profile, Result, User};

/// Users and their unique usernames.
#[async_trait]
pub trait UserStore: Send + Sync {
    /// Creates a user.
    ///
    /// # Errors
    /// [`ErrorKind::Conflict`] when the username or user id is taken.
    async fn insert_user(&self, user: &User) -> Result<()>;
    /// Creates or replaces a user by id (admin upsert from an app backend that owns its users).
    ///
    /// # Errors
    /// [`ErrorKind::Conflict`] when the username belongs to another user id.
    async fn upsert_user(&self, user: &User) -> Result<()>;
    /// The user, if any.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn get_user(&self, user_id: i64) -> Result<Option<User>>;
    /// The user with this exact username, if any.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn get_user_by_username(&self, username: &str) -> Result<Option<User>>;
    /// Replaces the profile fields (nickname, avatar, extra) of an existing user.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] for an unknown user.
    async fn update_profile(&self, user_id: i64, profile: &Profile) -> Result<()>;
}
