//! [`UserStore`] on Scylla: tables `users` and `users_by_username` (the unique-name index, claimed with
//! `INSERT ... IF NOT EXISTS`).

use async_trait::async_trait;
use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;
use scylla::DeserializeRow;

use super::ScyllaBackend;
use crate::ids::now_ms;
use crate::{Error, ErrorKind, Profile, Result, User, UserStore};

const USER_COLUMNS: &str =
    "user_id, username, password_hash, nickname, avatar_url, extra, created_at_ms, updated_at_ms";

/// The user statements, prepared once.
pub(super) struct Statements {
    claim_username: PreparedStatement,
    release_username: PreparedStatement,
    get_username: PreparedStatement,
    insert_user_new: PreparedStatement,
    upsert_user: PreparedStatement,
    get_user: PreparedStatement,
    update_profile: PreparedStatement,
}

impl Statements {
    pub(super) async fn prepare(session: &Session) -> Result<Self> {
        let p = |cql: String| super::prepare(session, cql);
        Ok(Statements {
            claim_username: p(
                "INSERT INTO users_by_username (username, user_id) VALUES (?, ?) IF NOT EXISTS"
                    .into(),
            )
            .await?,
            release_username: p(
                "DELETE FROM users_by_username WHERE username = ? IF user_id = ?".into(),
            )
            .await?,
            get_username: p("SELECT user_id FROM users_by_username WHERE username = ?".into())
                .await?,
            insert_user_new: p(format!(
                "INSERT INTO users ({USER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS"
            ))
            .await?,
            upsert_user: p(format!(
                "INSERT INTO users ({USER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            ))
            .await?,
            get_user: p(format!(
                "SELECT {USER_COLUMNS} FROM users WHERE user_id = ?"
            ))
            .await?,
            update_profile: p(
                "UPDATE users SET nickname = ?, avatar_url = ?, extra = ?, updated_at_ms = ? \
                 WHERE user_id = ? IF EXISTS"
                    .into(),
            )
            .await?,
        })
    }
}

#[derive(DeserializeRow)]
struct UserRow {
    user_id: i64,
    username: String,
    password_hash: String,
    nickname: String,
    avatar_url: String,
    extra: String,
    created_at_ms: i64,
    updated_at_ms: i64,
}

impl From<UserRow> for User {
    fn from(r: UserRow) -> Self {
        User {
            user_id: r.user_id,
            username: r.username,
            password_hash: r.password_hash,
            profile: Profile {
                nickname: r.nickname,
                avatar_url: r.avatar_url,
                extra: r.extra,
            },
            created_at_ms: r.created_at_ms,
            updated_at_ms: r.updated_at_ms,
        }
    }
}

fn user_values(u: &User) -> (i64, &str, &str, &str, &str, &str, i64, i64) {
    (
        u.user_id,
        &u.username,
        &u.password_hash,
        &u.profile.nickname,
        &u.profile.avatar_url,
        &u.profile.extra,
        u.created_at_ms,
        u.updated_at_ms,
    )
}

#[async_trait]
impl UserStore for ScyllaBackend {
    async fn insert_user(&self, user: &User) -> Result<()> {
        let claim = self
            .lwt(
                "claim username",
                &self.users.claim_username,
                (&user.username, user.user_id),
            )
            .await?;
        // A claim already pointing at this id is ours from an earlier attempt that failed before
        // creating the user row: carry on.
        if !claim.applied && claim.bigint("user_id") != Some(user.user_id) {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("username {:?} is taken", user.username),
            ));
        }
        let created = self
            .lwt(
                "insert user",
                &self.users.insert_user_new,
                user_values(user),
            )
            .await?;
        if !created.applied {
            if claim.applied {
                // Give back the name claimed just now for a user id that turned out to be taken.
                self.lwt(
                    "release username",
                    &self.users.release_username,
                    (&user.username, user.user_id),
                )
                .await?;
            }
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("user id {} is taken", user.user_id),
            ));
        }
        Ok(())
    }

    async fn upsert_user(&self, user: &User) -> Result<()> {
        let claim = self
            .lwt(
                "claim username",
                &self.users.claim_username,
                (&user.username, user.user_id),
            )
            .await?;
        if !claim.applied && claim.bigint("user_id") != Some(user.user_id) {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("username {:?} belongs to another user", user.username),
            ));
        }
        let previous: Option<UserRow> = self
            .one("get user", &self.users.get_user, (user.user_id,))
            .await?;
        self.exec("upsert user", &self.users.upsert_user, user_values(user))
            .await?;
        if let Some(previous) = previous.filter(|p| p.username != user.username) {
            // Renamed: free the old name, but only if it still points at this user.
            self.lwt(
                "release username",
                &self.users.release_username,
                (&previous.username, user.user_id),
            )
            .await?;
        }
        Ok(())
    }

    async fn get_user(&self, user_id: i64) -> Result<Option<User>> {
        let row: Option<UserRow> = self
            .one("get user", &self.users.get_user, (user_id,))
            .await?;
        Ok(row.map(User::from))
    }

    async fn get_user_by_username(&self, username: &str) -> Result<Option<User>> {
        let Some((user_id,)) = self
            .one::<(i64,)>("get username", &self.users.get_username, (username,))
            .await?
        else {
            return Ok(None);
        };
        // The index can point at a user whose creation failed after the claim, or who was renamed
        // since: only the user row itself is authoritative.
        Ok(self
            .get_user(user_id)
            .await?
            .filter(|u| u.username == username))
    }

    async fn update_profile(&self, user_id: i64, profile: &Profile) -> Result<()> {
        let lwt = self
            .lwt(
                "update profile",
                &self.users.update_profile,
                (
                    &profile.nickname,
                    &profile.avatar_url,
                    &profile.extra,
                    now_ms(),
                    user_id,
                ),
            )
            .await?;
        if lwt.applied {
            Ok(())
        } else {
            Err(Error::new(ErrorKind::NotFound, format!("user {user_id}")))
        }
    }
}
