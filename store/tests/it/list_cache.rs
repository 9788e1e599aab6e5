//! The conversation-list cache (`zhibo_store::list_cache`) in front of a real Cassandra and Redis:
//! after every kind of write the cached listing equals the backend's own; a write that bypasses the
//! cache proves listings are served from it, and is picked up once the listing is lost or expires;
//! concurrent sends and listings converge; the conformance suite passes through it.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fred::prelude::{KeysInterface as _, Pool};
use zhibo_proto::client::{Message, ReceiverType};
use zhibo_store::ids::now_ms;
use zhibo_store::list_cache::{list_cache_key, list_dirty_key, ListCache};
use zhibo_store::redis_seq::{connect_pool, RedisSeq};
use zhibo_store::scylla::{self as backend, ScyllaBackend};
use zhibo_store::{
    Conversation, ConversationId, ConversationKey, ConversationSeqs, ConversationSettings,
    ListQuery, RecallRequest, SendPlan, SeqAllocator, Stores,
};

use crate::conformance::id;
use crate::scylla::{session, with_keyspace};

const ALL: ListQuery = ListQuery {
    changed_after: 0,
    after: None,
    limit: usize::MAX,
};

/// The same backend twice: `plain` reads and writes it directly, `cached` through the list cache.
struct Pair {
    plain: Stores,
    cached: Stores,
    seq: Arc<RedisSeq>,
    pool: Pool,
}

async fn pair(store: Arc<ScyllaBackend>, redis_url: &str, max_age: Duration) -> Pair {
    let seq = Arc::new(
        RedisSeq::connect(redis_url, store.clone())
            .await
            .expect("redis")
            .with_conversations(store.clone()),
    );
    let pool = connect_pool(redis_url).await.expect("redis pool");
    Pair {
        plain: store.clone().stores(seq.clone()),
        cached: ListCache::wrap(store.stores(seq.clone()), pool.clone(), max_age),
        seq,
        pool,
    }
}

/// Runs `body` with a [`Pair`] over a fresh migrated keyspace (dropped afterwards) and the test Redis.
async fn with_pair<F, Fut>(max_age: Duration, body: F)
where
    F: FnOnce(Pair) -> Fut,
    Fut: Future<Output = ()>,
{
    let redis_url = zhibo_testkit::require_redis().await;
    with_keyspace(session().await, |session, keyspace| async move {
        backend::migrate(&session, &keyspace, 1)
            .await
            .expect("migrate");
        let store = Arc::new(
            ScyllaBackend::new(session, &keyspace)
                .await
                .expect("prepare"),
        );
        body(pair(store, &redis_url, max_age).await).await;
    })
    .await;
}

impl Pair {
    async fn listed(&self, stores: &Stores, user: i64) -> Vec<Conversation> {
        stores.conversations.list(user, ALL).await.expect("list")
    }

    /// The cached listing of `user` equals the backend's.
    async fn check(&self, user: i64, after: &str) {
        let want = self.listed(&self.plain, user).await;
        let got = self.listed(&self.cached, user).await;
        assert_eq!(got, want, "user {user}'s cached listing after {after}");
    }

    /// One 1:1 or group message from `from` to `users` (the sender first) the way the send path
    /// stores it (`record_send` with a conversation seq), through the cache.
    async fn send(&self, from: i64, to: i64, group: bool, users: &[i64]) -> u64 {
        let key = if group {
            ConversationKey::Group(to)
        } else {
            ConversationKey::direct(from, to)
        };
        let ConversationSeqs {
            inbox: seqs,
            conv_seq,
            ..
        } = self
            .seq
            .next_in_conversation(users, key)
            .await
            .expect("allocate");
        let m = Message {
            message_id: u64::try_from(id()).expect("positive"),
            seq: 0,
            sender_user_id: from,
            sender_device_id: 5,
            receiver_type: if group {
                ReceiverType::Group as i32
            } else {
                ReceiverType::User as i32
            },
            receiver_id: to,
            client_msg_id: format!("lc-{}", id()),
            server_time_ms: now_ms(),
            content_type: 1,
            content: Bytes::from(format!("#{conv_seq}")),
            conv_seq,
        };
        let recipients: Vec<(i64, u64)> = users.iter().copied().zip(seqs).collect();
        let plan = SendPlan {
            message_id: m.message_id,
            seq: recipients[0].1,
            server_time_ms: m.server_time_ms,
            recipients: recipients.clone(),
            conv_seq,
        };
        let entries: Vec<(i64, Message)> = recipients
            .iter()
            .map(|&(u, seq)| {
                let mut copy = m.clone();
                copy.seq = seq;
                if u != from {
                    copy.sender_device_id = 0;
                }
                (u, copy)
            })
            .collect();
        let stored = self
            .cached
            .messages
            .record_send(5, &m.client_msg_id, &plan, &entries)
            .await
            .expect("record_send");
        assert_eq!(stored, None);
        conv_seq
    }

    async fn version(&self, user: i64) -> u64 {
        self.seq.next(&[user]).await.expect("version")[0]
    }

    async fn forget(&self, user: i64) {
        let _: i64 = self
            .pool
            .del(vec![list_cache_key(user), list_dirty_key(user)])
            .await
            .expect("del");
    }
}

/// Every write that changes a conversation row shows in the next cached listing, for every user whose
/// row it changed; a write behind the cache's back does not, until the listing is lost.
#[tokio::test]
async fn cached_listing_follows_every_write() {
    with_pair(Duration::from_secs(60), |p| async move {
        let (a, b, c, g) = (id(), id(), id(), id());
        for u in [a, b, c] {
            p.check(u, "nothing").await;
        }

        let first = p.send(a, b, false, &[a, b]).await;
        p.check(a, "a sent to b").await;
        p.check(b, "b received from a").await;
        let second = p.send(b, a, false, &[b, a]).await;
        p.check(a, "b replied").await;
        p.check(b, "b replied (sender)").await;
        assert_eq!(p.listed(&p.cached, a).await[0].unread(), 1);

        let v = p.version(a).await;
        p.cached
            .conversations
            .mark_read(a, ConversationId::direct(b), second, v)
            .await
            .expect("mark read");
        p.check(a, "a read").await;
        p.check(b, "a read (b's peer_read_seq)").await;
        assert_eq!(p.listed(&p.cached, b).await[0].peer_read_seq, second);

        let v = p.version(a).await;
        let settings = ConversationSettings {
            muted: true,
            pinned: true,
        };
        p.cached
            .conversations
            .set_settings(a, ConversationId::direct(b), settings, v)
            .await
            .expect("settings");
        p.check(a, "mute and pin").await;

        // A group: joins, a message, a delete-for-me.
        for u in [a, c] {
            let v = p.version(u).await;
            p.cached
                .conversations
                .join(u, ConversationId::group(g), 0, v)
                .await
                .expect("join");
            p.check(u, "join").await;
        }
        let in_group = p.send(c, g, true, &[c, a]).await;
        p.check(a, "group message").await;
        p.check(c, "group message (sender)").await;
        let v = p.version(a).await;
        p.cached
            .conversations
            .delete_for_me(a, ConversationId::group(g), in_group, v)
            .await
            .expect("delete for me");
        p.check(a, "delete for me").await;
        p.check(c, "a's delete for me (c unchanged)").await;

        // Recall of b's message: both rows' previews become tombstones.
        let recalled = p
            .cached
            .conversations
            .recall(
                ConversationKey::direct(a, b),
                second,
                RecallRequest {
                    by_user_id: b,
                    may_recall_others: false,
                    now_ms: now_ms(),
                    window_ms: 120_000,
                },
            )
            .await
            .expect("recall");
        assert_eq!(recalled.recipients.len(), 2);
        p.check(a, "recall").await;
        p.check(b, "recall (sender)").await;
        let touched: Vec<(i64, ConversationId, u64)> =
            vec![(a, ConversationId::direct(b), p.version(a).await)];
        p.cached.conversations.touch(&touched).await.expect("touch");
        p.check(a, "touch").await;
        assert!(first < second);

        // Behind the cache's back: the listing is served from Redis, so it does not see the change...
        let v = p.version(a).await;
        p.plain
            .conversations
            .set_settings(
                a,
                ConversationId::direct(b),
                ConversationSettings::default(),
                v,
            )
            .await
            .expect("settings, uncached");
        let stale = p.listed(&p.cached, a).await;
        let row = stale
            .iter()
            .find(|r| r.conversation == ConversationId::direct(b))
            .expect("row");
        assert!(
            row.pinned,
            "served from the cached listing, which missed the bypassing write"
        );
        // ...until the listing is lost (flush, restart, expiry): then it is rebuilt from the backend.
        p.forget(a).await;
        p.check(a, "losing the cached listing").await;
    })
    .await;
}

/// The marks of a listing never expire before it (a mark that expired first would be a change the
/// listing never re-reads).
#[tokio::test]
async fn marks_outlive_their_listing() {
    with_pair(Duration::from_secs(30), |p| async move {
        let (a, b) = (id(), id());
        p.send(a, b, false, &[a, b]).await;
        p.check(a, "a sent").await;
        p.send(b, a, false, &[b, a]).await;
        let listing: i64 = p.pool.pttl(list_cache_key(a)).await.expect("pttl");
        let marks: i64 = p.pool.pttl(list_dirty_key(a)).await.expect("pttl");
        assert!(listing > 0, "a's list is cached with a TTL: {listing}");
        assert!(
            marks > listing,
            "marks expire after the listing: {marks} vs {listing} ms"
        );
        p.check(a, "b replied").await;
    })
    .await;
}

/// A change that bypassed the cache shows once the listing is `max_age` old.
#[tokio::test]
async fn a_missed_change_lasts_at_most_max_age() {
    let max_age = Duration::from_secs(2);
    with_pair(max_age, |p| async move {
        let (a, b) = (id(), id());
        p.send(a, b, false, &[a, b]).await;
        p.check(a, "a sent").await;
        let v = p.version(a).await;
        let pinned = ConversationSettings {
            muted: false,
            pinned: true,
        };
        p.plain
            .conversations
            .set_settings(a, ConversationId::direct(b), pinned, v)
            .await
            .expect("settings, uncached");
        let changed = Instant::now();
        let deadline = changed + Duration::from_secs(60);
        loop {
            if p.listed(&p.cached, a).await[0].pinned {
                break;
            }
            assert!(Instant::now() < deadline, "the missed change never showed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Expiry is Redis's (PX on the listing): the change shows within max_age plus scheduling.
        assert!(
            changed.elapsed() < max_age + Duration::from_secs(30),
            "showed after {:?}",
            changed.elapsed()
        );
    })
    .await;
}

/// Sends to one user from many peers while other tasks list: the final cached listing equals the
/// backend's (marks made during a rebuild or a merge are never consumed by it).
#[tokio::test]
async fn concurrent_sends_and_listings_converge() {
    with_pair(Duration::from_secs(60), |p| async move {
        let p = Arc::new(p);
        let a = id();
        let peers: Vec<i64> = (0..12).map(|_| id()).collect();
        let mut tasks = Vec::new();
        for (i, &peer) in peers.iter().enumerate() {
            let p = p.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..3 {
                    p.send(peer, a, false, &[peer, a]).await;
                    if i % 3 == 0 {
                        p.listed(&p.cached, a).await;
                    }
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        p.check(a, "concurrent sends and listings").await;
        let rows = p.listed(&p.cached, a).await;
        assert_eq!(rows.len(), peers.len());
        assert!(rows.iter().all(|r| r.unread() == 3), "{rows:?}");
    })
    .await;
}

/// The whole storage conformance suite through the cache.
#[tokio::test]
async fn conformance_through_the_list_cache() {
    with_pair(Duration::from_secs(60), |p| async move {
        crate::conformance::run_all(p.cached).await;
    })
    .await;
}
