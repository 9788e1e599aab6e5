//! The Redis seq allocator against a real Redis and a real 3-master Redis Cluster (every test runs
//! on both, see [`on_both`]): seqs strictly increase, a 2,000-member fan-out is allocated in one
//! call (one per master on a cluster), and after Redis loses its keys (and its scripts) allocation
//! resumes above every stored seq without overwriting a stored message. On the cluster, one master
//! losing everything (FLUSHALL) recovers its users while the other masters' users carry on.
//!
//! Tests use fresh user ids and delete only their own keys, so they can share one Redis with
//! other tests (the FLUSHALL test flushes a master of the test cluster, whose only other users are
//! these tests' fresh users: it checks only its own users and re-seeds nothing).

use std::sync::Arc;
use std::sync::OnceLock;
use std::time::Instant;

use bytes::Bytes;
use fred::prelude::{
    Builder, Client, ClientLike as _, Config, KeysInterface as _, LuaInterface as _,
};
use zhibo_proto::client::Message;
use zhibo_store::embedded::EmbeddedBackend;
use zhibo_store::ids::IdGen;
use zhibo_store::redis_seq::{
    conversation_seq_key, group_version_key, seq_key, RedisSeq, RECOVERY_MARGIN,
};
use zhibo_store::{
    Claim, ConversationKey, ConversationSeqs, ConversationStore as _, MessageStore, SendPlan,
    SeqAllocator as _, SeqGap,
};

/// A fresh user id, unique in this process and across runs.
fn user_id() -> i64 {
    static IDS: OnceLock<IdGen> = OnceLock::new();
    IDS.get_or_init(|| IdGen::entities(u64::from(std::process::id()) ^ 0x5eed))
        .next_i64()
}

/// Which Redis a test runs against.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// One Redis server.
    Standalone,
    /// The 3-master Redis Cluster of the harness.
    Cluster,
}

/// A plain client on the Redis under test, for poking at it behind the allocator's back.
struct Redis {
    /// Routes each key to its master on a cluster.
    client: Client,
    /// One client per server (the single server, or each master).
    servers: Vec<Client>,
}

async fn client(url: &str) -> Client {
    let client = Builder::from_config(Config::from_url(url).expect("url"))
        .build()
        .expect("client");
    client.init().await.expect("connect client");
    client
}

impl Redis {
    /// Deletes `keys` one by one (they may live on different masters).
    async fn del(&self, keys: &[String]) {
        for key in keys {
            let _: i64 = self.client.del(key.as_str()).await.expect("del");
        }
    }

    /// Forgets the loaded scripts on every server, as a restart would.
    async fn script_flush(&self) {
        for server in &self.servers {
            server.script_flush(false).await.expect("script flush");
        }
    }
}

/// The allocator under test over `messages`, plus a plain client for poking at Redis.
async fn allocator(target: Target, messages: Arc<dyn MessageStore>) -> (RedisSeq, Redis) {
    let (url, servers) = match target {
        Target::Standalone => {
            let url = zhibo_testkit::require_redis().await;
            (url.clone(), vec![url])
        }
        Target::Cluster => {
            let masters = zhibo_testkit::require_redis_cluster().await;
            (zhibo_testkit::redis_cluster_url(&masters), masters)
        }
    };
    let seq = RedisSeq::connect(&url, messages)
        .await
        .expect("connect RedisSeq");
    let mut clients = Vec::new();
    for server in &servers {
        clients.push(client(server).await);
    }
    let redis = Redis {
        client: client(&url).await,
        servers: clients,
    };
    (seq, redis)
}

/// Held shared by every cluster test, exclusively by the one that flushes a master: a FLUSHALL
/// must not pull counters from under a test that expects them to count 1, 2, 3.
static CLUSTER_FLUSH: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Runs each listed test against one Redis (`standalone::name`) and the Redis Cluster
/// (`cluster::name`).
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod standalone {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Target::Standalone).await;
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test]
                async fn $name() {
                    let _shared = super::CLUSTER_FLUSH.read().await;
                    super::$name(super::Target::Cluster).await;
                }
            )*
        }
    };
}

on_both!(
    seqs_strictly_increase_per_user,
    fan_out_of_2000_users_in_one_call,
    allocation_resumes_above_stored_seqs_after_redis_loses_its_keys,
    conversation_seqs_share_the_call_and_recover_from_the_conversation_store,
    each_counter_gets_its_own_value_in_a_group_call,
    a_send_is_claimed_once_with_its_plan,
    a_lost_or_damaged_group_version_is_never_answered_again,
    a_claim_without_a_plan_is_unknown,
);

fn store() -> Arc<EmbeddedBackend> {
    Arc::new(EmbeddedBackend::temporary().expect("in-memory store"))
}

fn message(user: i64, seq: u64, body: &str) -> Message {
    Message {
        message_id: seq,
        seq,
        sender_user_id: user,
        receiver_type: 1,
        receiver_id: user,
        client_msg_id: format!("{user}-{seq}"),
        content: Bytes::from(body.to_owned()),
        ..Default::default()
    }
}

fn plan(message_id: u64, recipients: usize) -> SendPlan {
    SendPlan {
        message_id,
        seq: 7,
        server_time_ms: 1_764_570_000_000,
        recipients: (0..recipients)
            .map(|i| (i64::MAX - i as i64, 7 + i as u64))
            .collect(),
        conv_seq: 3,
    }
}

/// A send's claim: the first claim of `(device, client_msg_id)` wins and holds its plan, every later
/// one (another worker's racing resend) gets that plan, concurrent claims included; other devices and
/// ids are independent; the key carries the claim window as its expiry.
async fn a_send_is_claimed_once_with_its_plan(target: Target) {
    let (seq, redis) = allocator(target, store()).await;
    let device = user_id();
    let first = plan(1, 2);
    assert_eq!(
        seq.claimed(device, "m-1").await.expect("lookup"),
        Claim::Free
    );
    assert_eq!(
        seq.claim_send(device, "m-1", Some(&first))
            .await
            .expect("claim"),
        Claim::Free
    );
    assert_eq!(
        seq.claimed(device, "m-1").await.expect("lookup"),
        Claim::Planned(first.clone()),
        "a resend within the window finds the plan"
    );
    assert_eq!(
        seq.claim_send(device, "m-1", Some(&plan(2, 2)))
            .await
            .expect("claim again"),
        Claim::Planned(first.clone()),
        "a racing attempt gets the first plan, not its own"
    );
    assert_eq!(
        seq.claim_send(device, "m-2", Some(&plan(3, 1)))
            .await
            .expect("another id"),
        Claim::Free
    );
    assert_eq!(
        seq.claim_send(device + 1, "m-1", Some(&plan(4, 1)))
            .await
            .expect("another device"),
        Claim::Free
    );
    let seq = &seq;
    let racing = futures::future::try_join_all(
        (0..20u64)
            .map(|i| async move { seq.claim_send(device, "m-3", Some(&plan(100 + i, 2))).await }),
    )
    .await
    .expect("racing claims");
    assert_eq!(
        racing.iter().filter(|c| **c == Claim::Free).count(),
        1,
        "{racing:?}"
    );
    let planned: std::collections::BTreeSet<u64> = racing
        .iter()
        .filter_map(|c| match c {
            Claim::Planned(p) => Some(p.message_id),
            _ => None,
        })
        .collect();
    assert_eq!(
        planned.len(),
        1,
        "every loser got the same plan: {racing:?}"
    );
    let key = zhibo_store::redis_seq::send_claim_key(device, "m-1");
    let ttl: i64 = redis.client.ttl(key.as_str()).await.expect("ttl");
    assert!(
        ttl > 0 && ttl <= zhibo_store::redis_seq::SEND_CLAIM_SECS,
        "claim expiry {ttl}"
    );
    // Redis lost it (or it expired): free again; the plan's insert-if-absent in the database is what
    // then keeps a resend (which claims with the marker) from being stored twice.
    let _: i64 = redis.client.del(key.as_str()).await.expect("del");
    assert_eq!(
        seq.claimed(device, "m-1").await.expect("lookup"),
        Claim::Free
    );
}

/// A claim without a plan (a send that may be a resend, a fan-out too large to hold, an older
/// worker's `1`) says nothing: every later attempt is told `Unknown` and arbitrates in the database,
/// and so does a first attempt whose plan was too large to hold.
/// A membership version lost with Redis (or expired) comes back as a value no process answered before,
/// so a member list cached under the old one is never reused; a damaged value is never answered twice.
async fn a_lost_or_damaged_group_version_is_never_answered_again(target: Target) {
    let (seq, redis) = allocator(target, store()).await;
    let group = user_id();
    let key = group_version_key(group);
    let first = seq.group_version(group).await.expect("version");
    let stored: Option<String> = redis.client.get(key.as_str()).await.expect("get");
    assert_eq!(
        stored.and_then(|s| s.parse::<u64>().ok()),
        first,
        "the version answered is the one every process reads"
    );
    assert_eq!(seq.group_version(group).await.expect("again"), first);
    redis.del(std::slice::from_ref(&key)).await;
    let after_loss = seq.group_version(group).await.expect("after the loss");
    assert!(
        after_loss.is_some() && after_loss != first,
        "a new version after a loss"
    );
    assert_eq!(
        seq.group_version(group).await.expect("stable again"),
        after_loss
    );
    let _: () = redis
        .client
        .set(key.as_str(), "not a number", None, None, false)
        .await
        .expect("damage");
    let a = seq.group_version(group).await.expect("damaged");
    let b = seq.group_version(group).await.expect("damaged again");
    assert!(
        a != b && a != after_loss && b != after_loss,
        "a damaged version is never answered twice"
    );
    let ttl: i64 = redis.client.ttl(key.as_str()).await.expect("ttl");
    assert_eq!(ttl, -1, "the damaged value was left as it is");
    seq.bump_group_version(group).await.expect("bump");
    let ttl: i64 = redis.client.ttl(key.as_str()).await.expect("ttl");
    assert!(ttl > 0, "versions expire (a day after they were set)");
}

async fn a_claim_without_a_plan_is_unknown(target: Target) {
    let (seq, redis) = allocator(target, store()).await;
    let device = user_id();
    assert_eq!(
        seq.claim_send(device, "r-1", None)
            .await
            .expect("marker claim"),
        Claim::Free,
        "it was free"
    );
    assert_eq!(
        seq.claim_send(device, "r-1", None)
            .await
            .expect("marker claim again"),
        Claim::Unknown
    );
    assert_eq!(
        seq.claimed(device, "r-1").await.expect("lookup"),
        Claim::Unknown
    );
    assert_eq!(
        seq.claim_send(device, "r-1", Some(&plan(1, 2)))
            .await
            .expect("first attempt after it"),
        Claim::Unknown,
        "a plan never replaces the marker"
    );
    let big = plan(2, zhibo_store::redis_seq::MAX_CLAIMED_RECIPIENTS + 1);
    assert_eq!(
        seq.claim_send(device, "r-2", Some(&big))
            .await
            .expect("large fan-out"),
        Claim::Unknown
    );
    assert_eq!(
        seq.claimed(device, "r-2").await.expect("lookup"),
        Claim::Unknown
    );
    let most = plan(3, zhibo_store::redis_seq::MAX_CLAIMED_RECIPIENTS);
    assert_eq!(
        seq.claim_send(device, "r-3", Some(&most))
            .await
            .expect("largest held"),
        Claim::Free
    );
    assert_eq!(
        seq.claimed(device, "r-3").await.expect("lookup"),
        Claim::Planned(most)
    );
    let key = zhibo_store::redis_seq::send_claim_key(device, "r-4");
    let _: () = redis
        .client
        .set(key.as_str(), 1, None, None, false)
        .await
        .expect("an older worker's claim");
    assert_eq!(
        seq.claimed(device, "r-4").await.expect("lookup"),
        Claim::Unknown
    );
    let _: () = redis
        .client
        .set(key.as_str(), "\u{2}garbage", None, None, false)
        .await
        .expect("a damaged claim");
    assert_eq!(
        seq.claimed(device, "r-4").await.expect("lookup"),
        Claim::Unknown
    );
}

async fn seqs_strictly_increase_per_user(target: Target) {
    let (seq, _redis) = allocator(target, store()).await;
    let (a, b) = (user_id(), user_id());
    let mut last = 0;
    for _ in 0..100 {
        let got = seq.next(&[a]).await.expect("next")[0];
        assert_eq!(got, last + 1, "a fresh counter counts 1, 2, 3...");
        last = got;
    }
    // Concurrent callers never get the same seq.
    let pair = [a, b];
    let mut concurrent: Vec<u64> = futures::future::try_join_all((0..50).map(|_| seq.next(&pair)))
        .await
        .expect("concurrent next")
        .into_iter()
        .map(|v| v[0])
        .collect();
    concurrent.sort_unstable();
    assert_eq!(concurrent, (101..=150).collect::<Vec<_>>());
    assert_eq!(seq.current(a).await.expect("current"), 150);
    assert_eq!(seq.current(b).await.expect("current"), 50);
    // The same user twice in one call: two seqs, in call order.
    assert_eq!(
        seq.next(&[a, b, a]).await.expect("next"),
        vec![151, 51, 152]
    );
}

async fn fan_out_of_2000_users_in_one_call(target: Target) {
    let (seq, _redis) = allocator(target, store()).await;
    let users: Vec<i64> = (0..2_000).map(|_| user_id()).collect();
    let started = Instant::now();
    let first = seq.next(&users).await.expect("first fan-out");
    let second = seq.next(&users).await.expect("second fan-out");
    let elapsed = started.elapsed();
    assert_eq!(first, vec![1; 2_000], "fresh users start at 1");
    assert_eq!(second, vec![2; 2_000], "each user advanced by exactly one");
    // Two fan-outs are a handful of round trips, not 4,000 (generous for a loaded test machine).
    assert!(
        elapsed.as_secs() < 5,
        "two 2,000-user fan-outs took {elapsed:?}"
    );
}

async fn allocation_resumes_above_stored_seqs_after_redis_loses_its_keys(target: Target) {
    let messages = store();
    let (seq, redis) = allocator(target, messages.clone()).await;
    let (busy, empty, group_member) = (user_id(), user_id(), user_id());

    // Normal traffic: seqs allocated, messages stored at them.
    for i in 0..5 {
        let s = seq.next(&[busy, group_member]).await.expect("next");
        messages
            .append_many(&[
                (busy, message(busy, s[0], &format!("old {i}"))),
                (
                    group_member,
                    message(group_member, s[1], &format!("old {i}")),
                ),
            ])
            .await
            .expect("append");
    }
    // Allocated for `empty` but never stored (the send failed): the counter is ahead of the store.
    seq.next(&[empty, empty]).await.expect("next");
    let busy_max = messages.max_seq(busy).await.expect("max");
    assert_eq!(busy_max, 5);

    // Redis restarts without persistence: every key and every loaded script is gone.
    let keys: Vec<String> = [busy, empty, group_member]
        .iter()
        .map(|&u| seq_key(u))
        .collect();
    redis.del(&keys).await;
    redis.script_flush().await;
    assert_eq!(
        seq.current(busy).await.expect("current"),
        busy_max,
        "current falls back to the stored max"
    );

    let after = seq
        .next(&[busy, empty, group_member])
        .await
        .expect("next after loss");
    assert_eq!(
        after[0],
        busy_max + RECOVERY_MARGIN + 1,
        "recovered counter restarts above the stored max, with the margin"
    );
    assert!(after[2] > messages.max_seq(group_member).await.expect("max"));
    assert_eq!(
        after[1], 1,
        "a user with an empty inbox restarts from the bottom"
    );

    // New messages land above the old ones; nothing stored before the loss is overwritten.
    messages
        .append_many(&[
            (busy, message(busy, after[0], "new")),
            (group_member, message(group_member, after[2], "new")),
        ])
        .await
        .expect("append after loss");
    for user in [busy, group_member] {
        let inbox = messages.sync(user, 0, 100).await.expect("sync");
        let bodies: Vec<&[u8]> = inbox.iter().map(|m| m.content.as_ref()).collect();
        assert_eq!(
            bodies,
            vec![
                &b"old 0"[..],
                b"old 1",
                b"old 2",
                b"old 3",
                b"old 4",
                b"new"
            ],
            "user {user}: old messages intact, new one after them"
        );
        assert!(inbox.windows(2).all(|w| w[0].seq < w[1].seq));
    }
    // And allocation simply continues from the recovered counter.
    assert_eq!(seq.next(&[busy]).await.expect("next")[0], after[0] + 1);
}

/// One master of the cluster loses every key (FLUSHALL) mid-run: its users' counters restart above
/// their stored seqs (with the margin), the other masters' users advance by exactly one, and no
/// stored message is overwritten.
#[tokio::test]
async fn cluster_master_flushall_mid_run() {
    let _exclusive = CLUSTER_FLUSH.write().await;
    let messages = store();
    let (seq, redis) = allocator(Target::Cluster, messages.clone()).await;
    // Enough users that every master owns some (60 random slots miss one of 3 masters with
    // probability (2/3)^60).
    let users: Vec<i64> = (0..60).map(|_| user_id()).collect();
    for round in 1..=3u64 {
        let seqs = seq.next(&users).await.expect("next");
        assert_eq!(
            seqs,
            vec![round; users.len()],
            "one call across every master"
        );
        let rows: Vec<(i64, Message)> = users
            .iter()
            .zip(&seqs)
            .map(|(&u, &s)| (u, message(u, s, &format!("old {round}"))))
            .collect();
        messages.append_many(&rows).await.expect("append");
    }

    let _: () = redis.servers[0].flushall(false).await.expect("flushall");

    let after = seq
        .next(&users)
        .await
        .expect("next after one master lost its keys");
    let recovered = 3 + RECOVERY_MARGIN + 1;
    let flushed = after.iter().filter(|&&s| s == recovered).count();
    let kept = after.iter().filter(|&&s| s == 4).count();
    assert_eq!(
        flushed + kept,
        users.len(),
        "every user either recovered above its stored seqs or carried on: {after:?}"
    );
    assert!(
        flushed > 0,
        "the flushed master owned some users: {after:?}"
    );
    assert!(kept > 0, "the other masters kept theirs: {after:?}");

    let rows: Vec<(i64, Message)> = users
        .iter()
        .zip(&after)
        .map(|(&u, &s)| (u, message(u, s, "new")))
        .collect();
    messages
        .append_many(&rows)
        .await
        .expect("append after the flush");
    for &user in &users {
        let inbox = messages.sync(user, 0, 100).await.expect("sync");
        let bodies: Vec<&[u8]> = inbox.iter().map(|m| m.content.as_ref()).collect();
        assert_eq!(bodies, vec![&b"old 1"[..], b"old 2", b"old 3", b"new"]);
        assert!(inbox.windows(2).all(|w| w[0].seq < w[1].seq));
    }
    // Allocation goes on from wherever each counter stands.
    let next = seq.next(&users).await.expect("next");
    assert!(next.iter().zip(&after).all(|(n, a)| *n == a + 1));
}

/// A client failure keeps fred's error as the source of the store error.
#[tokio::test]
async fn a_client_error_is_kept_as_the_source() {
    let messages = Arc::new(EmbeddedBackend::temporary().expect("temporary db"));
    let err = RedisSeq::connect("not a redis url", messages)
        .await
        .expect_err("the url does not parse");
    assert_eq!(err.kind, zhibo_store::ErrorKind::Unavailable, "{err}");
    let source = std::error::Error::source(&err).expect("fred's error is the source");
    assert!(
        source.downcast_ref::<fred::error::Error>().is_some(),
        "the source is fred's error: {source:?}"
    );
}

/// A conversation seq comes from the same call as the inbox seqs, counts 1, 2, 3 per conversation,
/// and after its key is lost resumes above the largest recorded one (the conversation store's
/// floor), never reusing one. Without a conversation store, recovery is refused, not guessed.
async fn conversation_seqs_share_the_call_and_recover_from_the_conversation_store(target: Target) {
    let backend = store();
    let (seq, redis) = allocator(target, backend.clone()).await;
    let seq = seq.with_conversations(backend.clone());
    let (a, b) = (user_id(), user_id());
    let key = ConversationKey::direct(a, b);
    let mut conv_seqs = Vec::new();
    for i in 1..=3u64 {
        let ConversationSeqs {
            inbox,
            conv_seq,
            skipped,
        } = seq.next_in_conversation(&[a, b], key).await.expect("next");
        assert_eq!(skipped, None, "a fresh counter skips nothing");
        assert_eq!(inbox, vec![i, i], "inbox seqs as next() would give");
        conv_seqs.push(conv_seq);
    }
    assert_eq!(conv_seqs, [1, 2, 3], "a fresh conversation counts 1, 2, 3");
    // Message 3 is recorded; then Redis loses the conversation's counter.
    let mut m = message(a, 3, "third");
    m.receiver_id = b;
    backend
        .record_message(3, &m, &[(a, 3), (b, 3)])
        .await
        .expect("record");
    redis.del(&[conversation_seq_key(key)]).await;
    let ConversationSeqs {
        inbox,
        conv_seq,
        skipped,
    } = seq
        .next_in_conversation(&[a, b], key)
        .await
        .expect("recover");
    assert_eq!(inbox, vec![4, 4], "user counters untouched");
    assert_eq!(
        conv_seq,
        3 + RECOVERY_MARGIN + 1,
        "resumed above the recorded seq"
    );
    assert_eq!(
        skipped,
        Some(SeqGap {
            from: 4,
            to: 3 + RECOVERY_MARGIN
        }),
        "the recovering call reports the seqs it skipped"
    );
    let next = seq.next_in_conversation(&[a, b], key).await.expect("next");
    assert_eq!(
        (next.conv_seq, next.skipped),
        (3 + RECOVERY_MARGIN + 2, None),
        "the gap is reported once"
    );
    // An allocator without a conversation store refuses to guess a lost counter's floor.
    let (bare, _) = allocator(target, backend.clone()).await;
    redis.del(&[conversation_seq_key(key)]).await;
    let err = bare
        .next_in_conversation(&[a], key)
        .await
        .expect_err("no floor to recover from");
    assert_eq!(err.kind, zhibo_store::ErrorKind::Unavailable, "{err}");
}

/// A group send allocates every member's inbox seq and the group's conversation seq in one call:
/// each value goes to its own counter (on a cluster the keys live on different masters), round after
/// round.
async fn each_counter_gets_its_own_value_in_a_group_call(target: Target) {
    let backend = store();
    let (seq, _redis) = allocator(target, backend.clone()).await;
    let seq = seq.with_conversations(backend);
    let members: Vec<i64> = (0..5).map(|_| user_id()).collect();
    let key = ConversationKey::Group(user_id());
    for i in 1..=6u64 {
        let ConversationSeqs {
            inbox, conv_seq, ..
        } = seq.next_in_conversation(&members, key).await.expect("next");
        assert_eq!(
            inbox,
            vec![i; members.len()],
            "round {i}: every member's own counter"
        );
        assert_eq!(conv_seq, i, "round {i}: the group's counter");
    }
}
