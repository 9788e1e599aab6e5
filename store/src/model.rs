//! Domain records, identical for every backend. Times are Unix milliseconds.

use serde::{Deserialize, Serialize};

/// A registered app install.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// Cluster-unique id.
    pub device_id: i64,
    /// `android`, `ios`, `web` or `pc`.
    pub device_type: String,
    /// Maker, e.g. `xiaomi`.
    pub brand: String,
    /// Model, e.g. `mi 14`.
    pub model: String,
    /// OS version.
    pub system_version: String,
    /// App SDK version.
    pub sdk_version: String,
    /// Tokens for this device issued before this time are revoked (0 = none revoked).
    pub tokens_valid_after_ms: i64,
    /// Registration time.
    pub created_at_ms: i64,
    /// The one user this device belongs to, bound at its first sign-in (0 = not bound yet). Only that
    /// user may sign in on it, use it, or move its revocation cut-off.
    #[serde(default)]
    pub owner_user_id: i64,
}

/// The editable part of a user.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// Display name.
    pub nickname: String,
    /// Avatar URL.
    pub avatar_url: String,
    /// Free-form application data (e.g. JSON).
    pub extra: String,
}

/// A user account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Cluster-unique id.
    pub user_id: i64,
    /// Unique login name.
    pub username: String,
    /// argon2id PHC string; empty for users managed by an app backend (they sign in with minted tokens).
    pub password_hash: String,
    /// Profile.
    pub profile: Profile,
    /// Creation time.
    pub created_at_ms: i64,
    /// Last profile change.
    pub updated_at_ms: i64,
}

/// A pending friend request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FriendRequest {
    /// Who asks.
    pub from_user_id: i64,
    /// Who is asked.
    pub to_user_id: i64,
    /// The greeting sent with the request.
    pub message: String,
    /// When it was sent.
    pub created_at_ms: i64,
}

/// One direction of a friendship: `user_id`'s view of `friend_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Friend {
    /// Owner of this entry.
    pub user_id: i64,
    /// The friend.
    pub friend_id: i64,
    /// `user_id`'s private name for the friend.
    pub remark: String,
    /// Free-form data.
    pub extra: String,
    /// When they became friends.
    pub created_at_ms: i64,
}

/// A group chat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// Cluster-unique id.
    pub group_id: i64,
    /// Display name.
    pub name: String,
    /// Avatar URL.
    pub avatar_url: String,
    /// Description shown to members.
    pub introduction: String,
    /// Current owner.
    pub owner_id: i64,
    /// Free-form data.
    pub extra: String,
    /// Creation time.
    pub created_at_ms: i64,
}

/// A member's role in a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Ordinary member.
    Member = 1,
    /// May change the group and its members.
    Admin = 2,
    /// Created the group (or received it); may dissolve it.
    Owner = 3,
}

impl Role {
    /// The stored number of this role.
    pub fn as_i8(self) -> i8 {
        self as i8
    }

    /// The role stored as `n`, if valid.
    pub fn from_i8(n: i8) -> Option<Role> {
        match n {
            1 => Some(Role::Member),
            2 => Some(Role::Admin),
            3 => Some(Role::Owner),
            _ => None,
        }
    }
}

/// A user's membership of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMember {
    /// The group.
    pub group_id: i64,
    /// The member.
    pub user_id: i64,
    /// Role.
    pub role: Role,
    /// The member's name inside this group.
    pub remark: String,
    /// When they joined.
    pub joined_at_ms: i64,
}
