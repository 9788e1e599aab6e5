//! A group send's member list (docs/ARCHITECTURE.md "Send, persistence and seq", step 2): read once per
//! membership version, and a change of members seen by the very next send of every pipeline.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use zhibo_bus::memory::MemoryBus;
use zhibo_logic::{Logic, LogicConfig};
use zhibo_proto::client::{ErrorCode, ReceiverType, SendMessageInput, SyncInput};
use zhibo_store::embedded::EmbeddedBackend;
use zhibo_store::presence::MemoryPresence;
use zhibo_store::{
    ConversationKey, ConversationSeqs, Error, ErrorKind, Group, GroupMember, GroupStore, Result,
    Role, SeqAllocator, Stores,
};

const GROUP: i64 = 900;

/// The embedded group store, counting the send path's two membership reads.
struct CountingGroups {
    inner: Arc<dyn GroupStore>,
    reads: AtomicUsize,
}

#[async_trait]
impl GroupStore for CountingGroups {
    async fn put_group(&self, group: &Group) -> Result<()> {
        self.inner.put_group(group).await
    }
    async fn get_group(&self, group_id: i64) -> Result<Option<Group>> {
        self.inner.get_group(group_id).await
    }
    async fn delete_group(&self, group_id: i64) -> Result<()> {
        self.inner.delete_group(group_id).await
    }
    async fn put_member(&self, member: &GroupMember) -> Result<()> {
        self.inner.put_member(member).await
    }
    async fn transfer_ownership(
        &self,
        group: &Group,
        new_owner: &GroupMember,
        old_owner: &GroupMember,
    ) -> Result<()> {
        self.inner
            .transfer_ownership(group, new_owner, old_owner)
            .await
    }
    async fn get_member(&self, group_id: i64, user_id: i64) -> Result<Option<GroupMember>> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.get_member(group_id, user_id).await
    }
    async fn delete_member(&self, group_id: i64, user_id: i64) -> Result<()> {
        self.inner.delete_member(group_id, user_id).await
    }
    async fn list_members(
        &self,
        group_id: i64,
        after: i64,
        limit: usize,
    ) -> Result<Vec<GroupMember>> {
        self.inner.list_members(group_id, after, limit).await
    }
    async fn member_ids(&self, group_id: i64) -> Result<Vec<i64>> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.member_ids(group_id).await
    }
    async fn groups_of_user(&self, user_id: i64) -> Result<Vec<i64>> {
        self.inner.groups_of_user(user_id).await
    }
}

/// The embedded allocator whose version bumps can be made to fail (Redis unreachable).
struct Versions {
    inner: Arc<dyn SeqAllocator>,
    fail_bumps: AtomicBool,
}

#[async_trait]
impl SeqAllocator for Versions {
    async fn next(&self, user_ids: &[i64]) -> Result<Vec<u64>> {
        self.inner.next(user_ids).await
    }
    async fn next_in_conversation(
        &self,
        user_ids: &[i64],
        conversation: ConversationKey,
    ) -> Result<ConversationSeqs> {
        self.inner
            .next_in_conversation(user_ids, conversation)
            .await
    }
    async fn current(&self, user_id: i64) -> Result<u64> {
        self.inner.current(user_id).await
    }
    async fn group_version(&self, group_id: i64) -> Result<Option<u64>> {
        self.inner.group_version(group_id).await
    }
    async fn try_lock(&self, name: &str, holder: &str, ttl: std::time::Duration) -> Result<bool> {
        self.inner.try_lock(name, holder, ttl).await
    }
    async fn unlock(&self, name: &str, holder: &str) -> Result<()> {
        self.inner.unlock(name, holder).await
    }
    async fn bump_group_version(&self, group_id: i64) -> Result<()> {
        if self.fail_bumps.load(Ordering::Relaxed) {
            return Err(Error::new(ErrorKind::Unavailable, "redis down (test)"));
        }
        self.inner.bump_group_version(group_id).await
    }
}

struct Setup {
    stores: Stores,
    groups: Arc<CountingGroups>,
    versions: Arc<Versions>,
    /// Two pipelines (two workers) over the same stores and bus.
    logic: [Arc<Logic>; 2],
    _watches: Vec<zhibo_bus::HandlerSubscription>,
}

fn member(user_id: i64) -> GroupMember {
    GroupMember {
        group_id: GROUP,
        user_id,
        role: if user_id == 1 {
            Role::Owner
        } else {
            Role::Member
        },
        remark: String::new(),
        joined_at_ms: 0,
    }
}

/// `announce`: whether the pipelines apply each other's `GroupMembersChanged` events (without them,
/// only the membership version carries a change from one pipeline to the other).
async fn setup(authz_cache_secs: u64, announce: bool) -> Setup {
    let mut stores: Stores = Arc::new(EmbeddedBackend::temporary().expect("store")).stores();
    for id in [1, 2, 3] {
        stores
            .users
            .insert_user(&super::user(id))
            .await
            .expect("user");
    }
    stores
        .groups
        .put_group(&Group {
            group_id: GROUP,
            name: "g".into(),
            avatar_url: String::new(),
            introduction: String::new(),
            owner_id: 1,
            extra: String::new(),
            created_at_ms: 0,
        })
        .await
        .expect("group");
    for id in [1, 2] {
        stores.groups.put_member(&member(id)).await.expect("member");
    }
    let groups = Arc::new(CountingGroups {
        inner: stores.groups.clone(),
        reads: AtomicUsize::new(0),
    });
    let versions = Arc::new(Versions {
        inner: stores.seq.clone(),
        fail_bumps: AtomicBool::new(false),
    });
    stores.groups = groups.clone();
    stores.seq = versions.clone();
    let bus = Arc::new(MemoryBus::new());
    let pipeline = |node_id| {
        Arc::new(Logic::new(
            stores.clone(),
            bus.clone(),
            Arc::new(MemoryPresence::new()),
            LogicConfig {
                authz_cache_secs,
                node_id: Some(node_id),
                ..LogicConfig::default()
            },
        ))
    };
    let logic = [pipeline(600), pipeline(601)];
    let mut watches = Vec::new();
    for l in logic.iter().filter(|_| announce) {
        watches.push(l.watch_authz().await.expect("watch"));
    }
    Setup {
        stores,
        groups,
        versions,
        logic,
        _watches: watches,
    }
}

fn to_group(id: &str) -> SendMessageInput {
    SendMessageInput {
        receiver_type: ReceiverType::Group as i32,
        receiver_id: GROUP,
        client_msg_id: id.into(),
        content_type: 1,
        content: Bytes::from(id.to_owned()),
        ..Default::default()
    }
}

impl Setup {
    fn reads(&self) -> usize {
        self.groups.reads.load(Ordering::Relaxed)
    }

    /// Sends `id` from `user` through pipeline `worker`: the recipients it stored the message for.
    async fn send(&self, worker: usize, user: i64, id: &str) -> Vec<i64> {
        let out = self.logic[worker]
            .send_message(&super::origin(user, 10 + user), &to_group(id))
            .await
            .unwrap_or_else(|e| panic!("send {id} by {user}: {e:?}"));
        assert!(!out.duplicate);
        let mut got = Vec::new();
        for u in [1, 2, 3] {
            let inbox = self.logic[0]
                .sync(u, &SyncInput { seq: 0, limit: 0 })
                .await
                .expect("sync");
            if inbox.messages.iter().any(|m| m.client_msg_id == id) {
                got.push(u);
            }
        }
        got
    }

    async fn refused(&self, worker: usize, user: i64, id: &str) -> ErrorCode {
        let e = self.logic[worker]
            .send_message(&super::origin(user, 10 + user), &to_group(id))
            .await
            .expect_err("refused");
        e.code
    }
}

#[tokio::test]
async fn members_are_read_once_per_version_and_every_change_is_seen_by_the_next_send() {
    // No events: the version alone must carry every change.
    let s = setup(60, false).await;
    assert_eq!(s.send(0, 1, "a").await, [1, 2]);
    let first = s.reads();
    assert_eq!(first, 2, "the first send reads membership and the members");
    assert_eq!(s.send(0, 2, "b").await, [1, 2]);
    assert_eq!(s.send(0, 1, "c").await, [1, 2]);
    assert_eq!(s.reads(), first, "steady sends read nothing");
    assert_eq!(s.send(1, 1, "d").await, [1, 2]);
    assert_eq!(s.reads(), first + 2, "the other pipeline reads once too");

    // User 3 joins: the next send of either pipeline includes them.
    s.stores.groups.put_member(&member(3)).await.expect("join");
    s.logic[0].group_members_changed(GROUP).await;
    assert_eq!(s.send(1, 1, "e").await, [1, 2, 3]);
    assert_eq!(s.send(0, 3, "f").await, [1, 2, 3], "and they may send");

    // User 2 is removed: refused at once on both pipelines, and no longer a recipient.
    s.stores
        .groups
        .delete_member(GROUP, 2)
        .await
        .expect("remove");
    s.logic[1].group_members_changed(GROUP).await;
    assert_eq!(s.refused(0, 2, "g").await, ErrorCode::NotGroupMember);
    assert_eq!(s.refused(1, 2, "h").await, ErrorCode::NotGroupMember);
    assert_eq!(s.send(0, 1, "i").await, [1, 3]);
    assert_eq!(s.send(1, 3, "j").await, [1, 3]);
    let before = s.reads();
    assert_eq!(s.refused(0, 2, "k").await, ErrorCode::NotGroupMember);
    assert!(
        s.reads() > before,
        "a refusal is read, never answered from the list"
    );
}

/// A change whose version bump fails (Redis unreachable) is still seen at once through the event.
#[tokio::test]
async fn a_change_that_could_not_be_versioned_is_announced() {
    let s = setup(60, true).await;
    assert_eq!(s.send(0, 1, "a").await, [1, 2]);
    assert_eq!(s.send(1, 1, "b").await, [1, 2]);
    s.versions.fail_bumps.store(true, Ordering::Relaxed);
    s.stores
        .groups
        .delete_member(GROUP, 2)
        .await
        .expect("remove");
    s.logic[0].group_members_changed(GROUP).await;
    for worker in [0, 1] {
        assert_eq!(
            s.refused(worker, 2, &format!("r{worker}")).await,
            ErrorCode::NotGroupMember
        );
        assert_eq!(s.send(worker, 1, &format!("s{worker}")).await, [1]);
    }
}

/// With the cache off (`logic.authz_cache_secs = 0`) every send reads the members.
#[tokio::test]
async fn without_the_cache_every_send_reads() {
    let s = setup(0, true).await;
    for id in ["a", "b", "c"] {
        assert_eq!(s.send(0, 1, id).await, [1, 2]);
    }
    assert_eq!(s.reads(), 6);
}
