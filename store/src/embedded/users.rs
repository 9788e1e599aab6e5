//! [`UserStore`] on redb: tables `users` (user id → [`User`] as JSON) and `usernames` (the unique index,
//! username → user id), written together in one transaction.

use async_trait::async_trait;
use redb::ReadableTable;

use super::{from_json, not_found, to_json, Db, EmbeddedBackend, USERNAMES, USERS};
use crate::ids::now_ms;
use crate::{Error, ErrorKind, Profile, Result, User, UserStore};

#[async_trait]
impl UserStore for EmbeddedBackend {
    async fn insert_user(&self, user: &User) -> Result<()> {
        let (id, name, bytes) = (user.user_id, user.username.clone(), to_json(user)?);
        self.write(move |t| {
            let users = &mut t.users;
            let names = &mut t.usernames;
            if users.get(id).db()?.is_some() {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!("user id {id} is taken"),
                ));
            }
            if names.get(name.as_str()).db()?.is_some() {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!("username {name:?} is taken"),
                ));
            }
            users.insert(id, bytes.as_slice()).db()?;
            names.insert(name.as_str(), id).db()?;
            Ok(())
        })
        .await
    }

    async fn upsert_user(&self, user: &User) -> Result<()> {
        let (id, name, bytes) = (user.user_id, user.username.clone(), to_json(user)?);
        self.write(move |t| {
            let users = &mut t.users;
            let names = &mut t.usernames;
            let owner = names.get(name.as_str()).db()?.map(|v| v.value());
            if owner.is_some_and(|owner| owner != id) {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!("username {name:?} belongs to another user"),
                ));
            }
            let previous: Option<User> = match users.get(id).db()? {
                Some(v) => Some(from_json(v.value(), "user")?),
                None => None,
            };
            if let Some(old) = previous.filter(|old| old.username != name) {
                let old_owner = names.get(old.username.as_str()).db()?.map(|v| v.value());
                if old_owner == Some(id) {
                    names.remove(old.username.as_str()).db()?;
                }
            }
            users.insert(id, bytes.as_slice()).db()?;
            names.insert(name.as_str(), id).db()?;
            Ok(())
        })
        .await
    }

    async fn get_user(&self, user_id: i64) -> Result<Option<User>> {
        self.point(move |tx| {
            let table = tx.open_table(USERS).db()?;
            let row = table.get(user_id).db()?;
            row.map(|v| from_json(v.value(), "user")).transpose()
        })
        .await
    }

    async fn get_user_by_username(&self, username: &str) -> Result<Option<User>> {
        let name = username.to_owned();
        self.point(move |tx| {
            let names = tx.open_table(USERNAMES).db()?;
            let Some(id) = names.get(name.as_str()).db()?.map(|v| v.value()) else {
                return Ok(None);
            };
            let users = tx.open_table(USERS).db()?;
            let row = users.get(id).db()?;
            row.map(|v| from_json(v.value(), "user")).transpose()
        })
        .await
    }

    async fn update_profile(&self, user_id: i64, profile: &Profile) -> Result<()> {
        let profile = profile.clone();
        self.write(move |t| {
            let users = &mut t.users;
            let mut user: User = match users.get(user_id).db()? {
                Some(v) => from_json(v.value(), "user")?,
                None => return Err(not_found("user", user_id)),
            };
            user.profile = profile.clone();
            user.updated_at_ms = now_ms();
            users.insert(user_id, to_json(&user)?.as_slice()).db()?;
            Ok(())
        })
        .await
    }
}
