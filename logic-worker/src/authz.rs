//! The authorization cache of the 1:1 send path (issue #16 item 2): "the receiver exists" and "these
//! two are friends" are answered from memory once the store said yes, instead of two CQL point reads
//! per message.
//!
//! Only positive answers are kept (a refusal is read again each time, so a new friendship or a new
//! user is seen by the very next send). What can turn a kept answer false:
//! - a user never stops existing (there is no user deletion), so "exists" is kept until evicted;
//! - a friendship ends through user-api's `DELETE /v1/friends/{id}`, which deletes both rows and then
//!   publishes an [`AuthzEvent`] on [`Subject::authz`]; every process with a pipeline (workers,
//!   user-api, `zhibo dev`) drops the pair on receipt ([`Logic::watch_authz`]).
//!
//! A missed event (core NATS is at most once: a process disconnected from NATS while it was
//! published) is bounded by the entry's age: answers are kept at most `logic.authz_cache_secs`
//! (default 60 s; 0 turns the cache off). A read racing an invalidation cannot re-insert the stale
//! answer: an insertion carries the invalidation epoch observed before its read and is dropped when
//! an invalidation happened since.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message as _;
use tracing::warn;
use zhibo_bus::{HandlerSubscription, Subject};
use zhibo_proto::bus::{authz_event, AuthzEvent, FriendshipRemoved};

use crate::Logic;

/// Entries kept per map before it is emptied (a crude but hard bound on memory: ~40 bytes each).
const MAX_ENTRIES: usize = 200_000;

/// Positive answers of the send path's authorization reads, each kept at most `ttl`.
#[derive(Debug)]
pub(crate) struct AuthzCache {
    ttl: Duration,
    /// Bumped by every invalidation.
    epoch: AtomicU64,
    users: Mutex<HashMap<i64, Instant>>,
    friends: Mutex<HashMap<(i64, i64), Instant>>,
}

impl AuthzCache {
    /// A cache keeping answers `ttl` (zero: keeps nothing).
    pub(crate) fn new(ttl: Duration) -> Self {
        AuthzCache {
            ttl,
            epoch: AtomicU64::new(0),
            users: Mutex::default(),
            friends: Mutex::default(),
        }
    }

    /// The invalidation epoch: read it before the store read whose answer is then [`Self::remember_friends`]ed.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Whether the store said recently that `user_id` exists.
    pub(crate) fn user_exists(&self, user_id: i64) -> bool {
        fresh(&self.users, &user_id, self.ttl)
    }

    /// Remembers that `user_id` exists.
    pub(crate) fn remember_user(&self, user_id: i64) {
        remember(&self.users, user_id, self.ttl);
    }

    /// Whether the store said recently that `user_id` has `friend_id` as a friend.
    pub(crate) fn friends(&self, user_id: i64, friend_id: i64) -> bool {
        fresh(&self.friends, &(user_id, friend_id), self.ttl)
    }

    /// Remembers that `user_id` has `friend_id` as a friend, as read by a store read that started at
    /// `epoch` ([`Self::epoch`]); nothing if a friendship was removed since.
    pub(crate) fn remember_friends(&self, user_id: i64, friend_id: i64, epoch: u64) {
        let mut map = lock(&self.friends);
        // Under the lock: `forget_friendship` bumps the epoch while holding it.
        if self.epoch() == epoch {
            insert(&mut map, (user_id, friend_id), self.ttl);
        }
    }

    /// Forgets the friendship of the two users, both directions.
    pub(crate) fn forget_friendship(&self, user_id: i64, friend_id: i64) {
        let mut map = lock(&self.friends);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        map.remove(&(user_id, friend_id));
        map.remove(&(friend_id, user_id));
    }
}

fn lock<K, V>(m: &Mutex<HashMap<K, V>>) -> std::sync::MutexGuard<'_, HashMap<K, V>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn fresh<K: std::hash::Hash + Eq>(m: &Mutex<HashMap<K, Instant>>, k: &K, ttl: Duration) -> bool {
    !ttl.is_zero() && lock(m).get(k).is_some_and(|at| at.elapsed() < ttl)
}

fn remember<K: std::hash::Hash + Eq>(m: &Mutex<HashMap<K, Instant>>, k: K, ttl: Duration) {
    insert(&mut lock(m), k, ttl);
}

fn insert<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Instant>, k: K, ttl: Duration) {
    if ttl.is_zero() {
        return;
    }
    if map.len() >= MAX_ENTRIES {
        map.clear();
    }
    map.insert(k, Instant::now());
}

impl Logic {
    /// The friendship of `user_id` and `friend_id` ended (both rows are deleted): drops it from this
    /// process's cache and tells every other process with a pipeline on [`Subject::authz`].
    ///
    /// # Errors
    /// When the bus refuses the event; the other processes then keep the answer at most
    /// `logic.authz_cache_secs`.
    pub async fn friendship_removed(
        &self,
        user_id: i64,
        friend_id: i64,
    ) -> Result<(), zhibo_bus::Error> {
        self.authz.forget_friendship(user_id, friend_id);
        let event = AuthzEvent {
            event: Some(authz_event::Event::FriendshipRemoved(FriendshipRemoved {
                user_id,
                friend_id,
            })),
        };
        self.bus
            .publish(
                &Subject::authz(),
                Vec::new(),
                Bytes::from(event.encode_to_vec()),
            )
            .await?;
        // At the server before the caller answers: the other processes get it within moments.
        self.bus.flush().await
    }

    /// Applies the [`AuthzEvent`]s of every process (its own included) to this process's cache, for as
    /// long as the returned subscription is held.
    ///
    /// # Errors
    /// When the bus refuses the subscription.
    pub async fn watch_authz(self: &Arc<Self>) -> Result<HandlerSubscription, zhibo_bus::Error> {
        let logic = Arc::downgrade(self);
        let sub = self
            .bus
            .subscribe_handler(
                &Subject::authz(),
                Arc::new(move |m| {
                    let Some(logic) = logic.upgrade() else {
                        return;
                    };
                    match AuthzEvent::decode(m.payload.clone()) {
                        Ok(AuthzEvent {
                            event: Some(authz_event::Event::FriendshipRemoved(f)),
                        }) => logic.authz.forget_friendship(f.user_id, f.friend_id),
                        Ok(AuthzEvent { event: None }) => {}
                        Err(e) => warn!(error = %e, "undecodable authz event"),
                    }
                }),
            )
            .await?;
        // Live at the server before anyone relies on it.
        self.bus.flush().await?;
        Ok(sub)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_positive_answers_for_the_ttl_only() {
        let c = AuthzCache::new(Duration::from_millis(50));
        assert!(!c.user_exists(1));
        c.remember_user(1);
        assert!(c.user_exists(1));
        let e = c.epoch();
        c.remember_friends(1, 2, e);
        assert!(c.friends(1, 2));
        assert!(!c.friends(2, 1), "each direction is its own answer");
        std::thread::sleep(Duration::from_millis(60));
        assert!(!c.user_exists(1) && !c.friends(1, 2), "expired");
    }

    #[test]
    fn a_removed_friendship_is_forgotten_both_ways() {
        let c = AuthzCache::new(Duration::from_secs(60));
        c.remember_friends(1, 2, c.epoch());
        c.remember_friends(2, 1, c.epoch());
        c.forget_friendship(2, 1);
        assert!(!c.friends(1, 2) && !c.friends(2, 1));
    }

    #[test]
    fn a_read_that_raced_an_invalidation_is_not_remembered() {
        let c = AuthzCache::new(Duration::from_secs(60));
        let before_read = c.epoch();
        // The friendship ends while the read is in flight; the read saw it still there.
        c.forget_friendship(1, 2);
        c.remember_friends(1, 2, before_read);
        assert!(!c.friends(1, 2));
        c.remember_friends(1, 2, c.epoch());
        assert!(c.friends(1, 2), "a read after the invalidation is kept");
    }

    #[test]
    fn a_zero_ttl_keeps_nothing() {
        let c = AuthzCache::new(Duration::ZERO);
        c.remember_user(1);
        c.remember_friends(1, 2, c.epoch());
        assert!(!c.user_exists(1) && !c.friends(1, 2));
    }
}
