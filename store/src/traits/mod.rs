//! The domain traits, one file per domain (the same names as `scylla/` and `embedded/`); the crate root
//! re-exports every trait and record.

pub(crate) mod conversations;
pub(crate) mod devices;
pub(crate) mod friends;
pub(crate) mod groups;
pub(crate) mod invites;
pub(crate) mod leases;
pub(crate) mod messages;
pub(crate) mod outbox;
pub(crate) mod presence;
pub(crate) mod rooms;
pub(crate) mod users;
