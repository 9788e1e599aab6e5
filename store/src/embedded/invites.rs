//! [`GroupInviteStore`] for the embedded backend: table `group_invites`, (invitee, group) →
//! [`GroupInvite`] as JSON, so a user's invitations are one key range. Invitations are rare (one per
//! non-friend added), so each is written in its own durable transaction rather than through the
//! backend's group-commit writer.

use std::ops::Bound;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, TableDefinition, TableError};

use crate::{Error, ErrorKind, GroupInvite, GroupInviteStore, Result};

const INVITES: TableDefinition<(i64, i64), &[u8]> = TableDefinition::new("group_invites");

/// The embedded [`GroupInviteStore`]; built by `EmbeddedBackend::stores`.
pub struct EmbeddedInvites {
    db: Arc<Database>,
}

impl std::fmt::Debug for EmbeddedInvites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedInvites").finish_non_exhaustive()
    }
}

impl EmbeddedInvites {
    /// Invitations in `db`.
    pub fn new(db: Arc<Database>) -> Self {
        EmbeddedInvites { db }
    }

    async fn write(
        &self,
        op: impl FnOnce(&mut redb::Table<'_, (i64, i64), &[u8]>) -> Result<()> + Send + 'static,
    ) -> Result<()> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let tx = db.begin_write().map_err(Error::backend)?;
            {
                let mut t = tx.open_table(INVITES).map_err(Error::backend)?;
                op(&mut t)?;
            }
            tx.commit().map_err(Error::backend)
        })
        .await
        .map_err(Error::backend)?
    }

    async fn read<R: Send + 'static>(
        &self,
        op: impl FnOnce(&redb::ReadOnlyTable<(i64, i64), &[u8]>) -> Result<R> + Send + 'static,
        empty: R,
    ) -> Result<R> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let tx = db.begin_read().map_err(Error::backend)?;
            match tx.open_table(INVITES) {
                Ok(t) => op(&t),
                // Nobody was ever invited.
                Err(TableError::TableDoesNotExist(_)) => Ok(empty),
                Err(e) => Err(Error::backend(e)),
            }
        })
        .await
        .map_err(Error::backend)?
    }
}

fn decode(bytes: &[u8]) -> Result<GroupInvite> {
    serde_json::from_slice(bytes).map_err(|e| Error::wrap(ErrorKind::Corrupt, "group invite", e))
}

#[async_trait]
impl GroupInviteStore for EmbeddedInvites {
    async fn put_invite(&self, invite: &GroupInvite) -> Result<()> {
        let key = (invite.user_id, invite.group_id);
        let json = serde_json::to_vec(invite)
            .map_err(|e| Error::wrap(ErrorKind::Corrupt, "encoding group invite", e))?;
        self.write(move |t| {
            t.insert(key, json.as_slice()).map_err(Error::backend)?;
            Ok(())
        })
        .await
    }

    async fn get_invite(&self, group_id: i64, user_id: i64) -> Result<Option<GroupInvite>> {
        self.read(
            move |t| {
                t.get((user_id, group_id))
                    .map_err(Error::backend)?
                    .map(|v| decode(v.value()))
                    .transpose()
            },
            None,
        )
        .await
    }

    async fn list_invites(&self, user_id: i64) -> Result<Vec<GroupInvite>> {
        self.read(
            move |t| {
                let range = (
                    Bound::Included((user_id, i64::MIN)),
                    Bound::Included((user_id, i64::MAX)),
                );
                t.range::<(i64, i64)>(range)
                    .map_err(Error::backend)?
                    .map(|row| {
                        let (_, v) = row.map_err(Error::backend)?;
                        decode(v.value())
                    })
                    .collect()
            },
            Vec::new(),
        )
        .await
    }

    async fn delete_invite(&self, group_id: i64, user_id: i64) -> Result<()> {
        self.write(move |t| {
            t.remove((user_id, group_id)).map_err(Error::backend)?;
            Ok(())
        })
        .await
    }
}
