//! The authorization cache of the send path (issue #16 item 2): "the receiver exists" and "these
//! two are friends" are answered from memory once the store said yes, instead of two CQL point reads
//! per message; a group's member list is kept under the group's membership version.
//!
//! Group members: every group send reads the group's membership version
//! ([`zhibo_store::SeqAllocator::group_version`], one Redis command) and uses the member list kept
//! under that version, else reads the members (the two CQL reads) and keeps them under it. Every
//! membership change replaces the version after it is written and before it is answered
//! ([`Logic::group_members_changed`]), so the next send on any worker reads the new members: a member
//! who just joined gets the very next message, one who was removed does not. The version is read
//! before the members, so a list read while a change lands is kept under the older version and not
//! reused. A lost version (Redis flushed or failed over) is replaced by a fresh random value, so lists
//! kept under the lost one are read again. The change is also announced on [`Subject::authz`]
//! (`GroupMembersChanged`), which drops the list everywhere: with the version bump failed too, a list
//! is used at most the TTL. A refused send (the sender is not in the kept list) reads the store.
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
use tracing::{debug, error, warn};
use zhibo_bus::{HandlerSubscription, Subject};
use zhibo_proto::bus::{authz_event, AuthzEvent, FriendshipRemoved, GroupMembersChanged};

use crate::Logic;

/// Entries kept per map before it is emptied (a crude but hard bound on memory: ~40 bytes each).
const MAX_ENTRIES: usize = 200_000;

/// Member ids kept over all cached groups before the group cache is emptied (8 bytes each: 16 MB).
const MAX_MEMBER_IDS: usize = 2_000_000;

/// A group's member list, read under a membership version.
#[derive(Debug)]
struct GroupEntry {
    version: u64,
    /// Sorted.
    members: Arc<[i64]>,
    at: Instant,
}

/// Positive answers of the send path's authorization reads, each kept at most `ttl`.
#[derive(Debug)]
pub(crate) struct AuthzCache {
    ttl: Duration,
    /// Bumped by every invalidation.
    epoch: AtomicU64,
    users: Mutex<HashMap<i64, Instant>>,
    friends: Mutex<HashMap<(i64, i64), Instant>>,
    /// Member lists by group, and the number of ids they hold.
    groups: Mutex<(HashMap<i64, GroupEntry>, usize)>,
}

impl AuthzCache {
    /// A cache keeping answers `ttl` (zero: keeps nothing).
    pub(crate) fn new(ttl: Duration) -> Self {
        AuthzCache {
            ttl,
            epoch: AtomicU64::new(0),
            users: Mutex::default(),
            friends: Mutex::default(),
            groups: Mutex::default(),
        }
    }

    /// Whether member lists are kept at all (a caller then reads the membership version).
    pub(crate) fn keeps_groups(&self) -> bool {
        !self.ttl.is_zero()
    }

    /// `group_id`'s members (sorted), if they were read under membership `version` less than the
    /// TTL ago.
    pub(crate) fn group_members(&self, group_id: i64, version: u64) -> Option<Arc<[i64]>> {
        let groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        groups
            .0
            .get(&group_id)
            .filter(|e| e.version == version && e.at.elapsed() < self.ttl)
            .map(|e| e.members.clone())
    }

    /// Remembers `group_id`'s `members` (sorted) as read under membership `version` by a read that
    /// started at `epoch` ([`Self::epoch`]); nothing if an invalidation happened since.
    pub(crate) fn remember_group(
        &self,
        group_id: i64,
        version: u64,
        members: Arc<[i64]>,
        epoch: u64,
    ) {
        if !self.keeps_groups() || members.len() > MAX_MEMBER_IDS {
            return;
        }
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        // Under the lock: `forget_group` bumps the epoch while holding it.
        if self.epoch() != epoch {
            return;
        }
        let (map, ids) = &mut *groups;
        // The entry it replaces first (its ids do not count against the bound).
        if let Some(old) = map.remove(&group_id) {
            *ids -= old.members.len();
        }
        if *ids + members.len() > MAX_MEMBER_IDS {
            map.clear();
            *ids = 0;
        }
        *ids += members.len();
        map.insert(
            group_id,
            GroupEntry {
                version,
                members,
                at: Instant::now(),
            },
        );
    }

    /// Forgets `group_id`'s member list.
    pub(crate) fn forget_group(&self, group_id: i64) {
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        self.epoch.fetch_add(1, Ordering::AcqRel);
        let (map, ids) = &mut *groups;
        if let Some(old) = map.remove(&group_id) {
            *ids -= old.members.len();
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

    /// The members of `group_id` changed (written in the store): replaces its membership version, which
    /// every group send reads before it trusts a cached member list, drops the list from this
    /// process's cache and tells every other process with a pipeline on [`Subject::authz`] (a second
    /// path, for when the version could not be replaced). Call it after the change is written and
    /// before it is answered: the next send, on any worker, then reads the new members.
    ///
    /// Failures are logged, not returned (the change is made): with both paths failed, other
    /// processes may use the old member list at most `logic.authz_cache_secs`.
    pub async fn group_members_changed(&self, group_id: i64) {
        self.authz.forget_group(group_id);
        let event = AuthzEvent {
            event: Some(authz_event::Event::GroupMembersChanged(
                GroupMembersChanged { group_id },
            )),
        };
        let published = async {
            self.bus
                .publish(
                    &Subject::authz(),
                    Vec::new(),
                    Bytes::from(event.encode_to_vec()),
                )
                .await?;
            self.bus.flush().await
        };
        // Both at once, each bounded: a membership request must not hang on a Redis or NATS that is
        // away (async-nats's flush waits for a reconnect).
        let (bumped, published) = tokio::join!(
            bounded(self.stores.seq.bump_group_version(group_id)),
            bounded(published)
        );
        match (bumped, published) {
            (Ok(()), Ok(())) => {}
            (Err(e), Ok(())) => {
                warn!(group_id, error = %e, "membership version not replaced; announced only");
            }
            (Ok(()), Err(e)) => {
                debug!(group_id, error = %e, "membership change versioned, not announced");
            }
            (Err(v), Err(e)) => error!(
                group_id,
                version_error = %v,
                event_error = %e,
                "membership change neither versioned nor announced: other processes may send on \
                 the old member list for up to logic.authz_cache_secs"
            ),
        }
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
                        Ok(AuthzEvent {
                            event: Some(authz_event::Event::GroupMembersChanged(g)),
                        }) => logic.authz.forget_group(g.group_id),
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

/// How long a membership change waits for its version replacement or its event.
const ANNOUNCE_WAIT: Duration = Duration::from_secs(2);

/// `step`'s outcome as text, or "timed out" after [`ANNOUNCE_WAIT`].
async fn bounded<E: std::fmt::Display>(
    step: impl std::future::Future<Output = Result<(), E>>,
) -> Result<(), String> {
    match tokio::time::timeout(ANNOUNCE_WAIT, step).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("timed out after {ANNOUNCE_WAIT:?}")),
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
    fn a_group_list_is_answered_under_its_version_only() {
        let c = AuthzCache::new(Duration::from_secs(60));
        let members: Arc<[i64]> = Arc::from(vec![1, 2, 3]);
        c.remember_group(7, 10, members.clone(), c.epoch());
        assert_eq!(c.group_members(7, 10).as_deref(), Some(&[1, 2, 3][..]));
        assert!(c.group_members(7, 11).is_none(), "another version");
        assert!(c.group_members(8, 10).is_none(), "another group");
        // A read that started before a change of any group is not kept.
        let before = c.epoch();
        c.forget_group(9);
        c.remember_group(8, 10, members.clone(), before);
        assert!(c.group_members(8, 10).is_none());
        c.forget_group(7);
        assert!(c.group_members(7, 10).is_none(), "forgotten");
    }

    #[test]
    fn replacing_a_large_list_keeps_the_other_lists() {
        let c = AuthzCache::new(Duration::from_secs(60));
        let big: Arc<[i64]> = (0..MAX_MEMBER_IDS as i64 - 10).collect::<Vec<_>>().into();
        c.remember_group(1, 1, big.clone(), c.epoch());
        c.remember_group(2, 1, Arc::from(vec![5, 6]), c.epoch());
        // The same group again, under a new version: its old list does not count against the bound.
        c.remember_group(1, 2, big, c.epoch());
        assert!(c.group_members(1, 2).is_some());
        assert!(c.group_members(2, 1).is_some(), "the other list stays");
        // Over the bound with a new group: everything is dropped first, then the new list kept.
        c.remember_group(3, 1, Arc::from(vec![0; 20]), c.epoch());
        assert!(c.group_members(1, 2).is_none() && c.group_members(2, 1).is_none());
        assert!(c.group_members(3, 1).is_some());
    }

    #[test]
    fn a_zero_ttl_keeps_nothing() {
        let c = AuthzCache::new(Duration::ZERO);
        c.remember_user(1);
        c.remember_friends(1, 2, c.epoch());
        assert!(!c.user_exists(1) && !c.friends(1, 2));
    }
}
