//! Presence against a real Redis: a user is online while a gateway vouches for them, offline after the
//! last connection leaves, and offline once a dead gateway's entry outlives its TTL; the in-process
//! presence answers the same.
//!
//! Each test uses its own key prefix, so tests share one Redis.

use std::sync::Arc;
use std::time::Duration;

use zhibo_store::presence::{MemoryPresence, RedisPresence};
use zhibo_store::Presence;

/// Polls `check` every 20 ms until it holds; fails after `wait`.
async fn until(what: &str, wait: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + wait;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A Redis presence on a fresh prefix, once the window after its first use is over: a fresh prefix
/// has no since key yet, which looks like a loss (answers are "unknown" for a few seconds).
async fn redis(ttl: Duration) -> Arc<RedisPresence> {
    let url = zhibo_testkit::require_redis().await;
    let p = RedisPresence::connect(&url, &zhibo_testkit::unique_name("presence"), ttl)
        .await
        .expect("connect presence");
    until(
        "the fresh prefix settled",
        Duration::from_secs(10),
        async || p.gateways(&[0]).await.expect("read")[0].is_some(),
    )
    .await;
    p
}

async fn connect_and_leave(p: &dyn Presence) {
    assert_eq!(p.online(&[1, 2]).await.expect("read"), [false, false]);
    p.connected("gw-a", 1).await.expect("write");
    p.connected("gw-b", 1).await.expect("write");
    assert_eq!(p.online(&[1, 2]).await.expect("read"), [true, false]);
    // Still on gw-b.
    p.disconnected("gw-a", 1);
    assert_eq!(p.online(&[1]).await.expect("read"), [true]);
    p.disconnected("gw-b", 1);
    until(
        "offline after the last gateway",
        Duration::from_secs(5),
        async || p.online(&[1]).await.expect("read") == [false],
    )
    .await;
    assert_eq!(p.online(&[]).await.expect("read"), Vec::<bool>::new());
}

/// Deletes `keys` from the test Redis (a loss of those entries); how many there were.
async fn del(keys: &[String]) -> i64 {
    use fred::prelude::{ClientLike as _, KeysInterface as _};
    let url = zhibo_testkit::require_redis().await;
    let client =
        fred::prelude::Builder::from_config(fred::prelude::Config::from_url(&url).expect("url"))
            .build()
            .expect("client");
    client.init().await.expect("connect");
    client.del(keys.to_vec()).await.expect("del")
}

/// Which gateways hold a user, not only whether any does: what routes a user's events.
async fn names_the_gateways(p: &dyn Presence) {
    p.connected("gw-a", 1).await.expect("write");
    p.connected("gw-b", 1).await.expect("write");
    p.connected("gw-b", 2).await.expect("write");
    let named = async |users: &[i64]| -> Vec<Vec<String>> {
        let mut named: Vec<Vec<String>> = p
            .gateways(users)
            .await
            .expect("read")
            .into_iter()
            .map(Option::unwrap_or_default)
            .collect();
        named.iter_mut().for_each(|g| g.sort());
        named
    };
    assert_eq!(
        named(&[1, 2, 3]).await,
        [vec!["gw-a", "gw-b"], vec!["gw-b"], vec![]]
    );
    p.disconnected("gw-a", 1);
    until("gw-a no longer named", Duration::from_secs(5), async || {
        named(&[1]).await == [vec!["gw-b"]]
    })
    .await;
}

#[tokio::test]
async fn redis_presence_names_the_gateways() {
    let p = redis(Duration::from_secs(60)).await;
    names_the_gateways(p.as_ref()).await;
}

#[tokio::test]
async fn memory_presence_names_the_gateways() {
    names_the_gateways(&MemoryPresence::new()).await;
}

/// Redis loses a gateway's entry (a flush, a restart): the gateway notices within a probe or two and
/// writes it again, long before its full refresh (TTL / 3 = 20 s here).
#[tokio::test]
async fn an_entry_redis_lost_is_written_again() {
    let p = redis(Duration::from_secs(60)).await;
    for user in 1..=40 {
        p.connected("gw-a", user).await.expect("write");
    }
    // Lose one user's entry only: the probe samples a rotating slice of 16 of the 40.
    assert_eq!(del(&[p.key(33)]).await, 1);
    assert!(p.gateways(&[33]).await.expect("read")[0]
        .as_ref()
        .is_none_or(Vec::is_empty));
    until(
        "the lost entry rewritten",
        Duration::from_secs(8),
        async || p.gateways(&[33]).await.expect("read") == [Some(vec!["gw-a".to_owned()])],
    )
    .await;
}

/// Redis loses everything (the since key with the entries): readers answer "unknown" for every user,
/// so senders route to every gateway, while the gateways write their entries again; then answers are
/// known again (the gateway's user named, a user nobody holds offline).
#[tokio::test]
async fn after_a_loss_an_empty_answer_is_unknown_for_a_while() {
    let p = redis(Duration::from_secs(60)).await;
    p.connected("gw-a", 1).await.expect("write");
    assert_eq!(
        p.gateways(&[1, 2]).await.expect("read"),
        [Some(vec!["gw-a".to_owned()]), Some(vec![])]
    );
    // What a flush does to this prefix's keys.
    assert_eq!(del(&[p.key(1), p.since_key()]).await, 2);
    assert_eq!(
        p.gateways(&[1, 2]).await.expect("read"),
        [None, None],
        "nobody known: unknown"
    );
    // The gateway's probe writes its entry again; once the window ends, answers are known again:
    // the gateway's user named, the user nobody holds offline.
    until(
        "the entry written again",
        Duration::from_secs(10),
        async || p.gateways(&[1]).await.expect("read") == [Some(vec!["gw-a".to_owned()])],
    )
    .await;
    until(
        "offline again after the window",
        Duration::from_secs(10),
        async || p.gateways(&[2]).await.expect("read") == [Some(vec![])],
    )
    .await;
}

/// A user whose last connection leaves and who connects again at once (a network flap) stays
/// recorded: a delete queued or under way never removes the newer entry.
#[tokio::test]
async fn a_delete_never_removes_a_newer_entry() {
    let p = redis(Duration::from_secs(60)).await;
    for _ in 0..200 {
        p.connected("gw-a", 1).await.expect("write");
        p.disconnected("gw-a", 1);
    }
    p.connected("gw-a", 1).await.expect("write");
    // A delete queued after all of user 1's: once it has run, every earlier batch has too.
    p.connected("gw-a", 99).await.expect("write");
    p.disconnected("gw-a", 99);
    let named = async |user: i64| {
        p.gateways(&[user]).await.expect("read")[0]
            .clone()
            .unwrap_or_default()
    };
    until("the sentinel deleted", Duration::from_secs(5), async || {
        named(99).await.is_empty()
    })
    .await;
    assert_eq!(named(1).await, ["gw-a"], "the last entry stays");
}

#[tokio::test]
async fn redis_presence_follows_connections() {
    let p = redis(Duration::from_secs(60)).await;
    connect_and_leave(p.as_ref()).await;
}

#[tokio::test]
async fn memory_presence_follows_connections() {
    connect_and_leave(&MemoryPresence::new()).await;
}

/// A gateway that dies without cleaning up (here: its presence dropped, so it stops refreshing)
/// vouches for its users for at most the TTL; a live one keeps them online past it.
#[tokio::test]
async fn a_dead_gateways_users_go_offline_after_the_ttl() {
    let ttl = Duration::from_secs(3);
    let live = redis(ttl).await;
    let url = zhibo_testkit::require_redis().await;
    // The same prefix as `live`, another process's view.
    let dead = RedisPresence::connect(&url, live_prefix(&live), ttl)
        .await
        .expect("connect");
    dead.connected("gw-dead", 7).await.expect("write");
    live.connected("gw-live", 8).await.expect("write");
    assert_eq!(live.online(&[7, 8]).await.expect("read"), [true, true]);
    drop(dead);
    until(
        "the dead gateway's user offline",
        Duration::from_secs(10),
        async || live.online(&[7]).await.expect("read") == [false],
    )
    .await;
    // Refreshed every TTL/3: the live gateway's user is still online well past one TTL.
    assert_eq!(live.online(&[8]).await.expect("read"), [true]);
}

/// `RedisPresence::key` is `<prefix>:presence:<user>`: recover the prefix.
fn live_prefix(p: &RedisPresence) -> &str {
    let key = p.key(0);
    let end = key.len() - ":presence:0".len();
    // Leaked once per test: a &str with the presence's lifetime is all the API needs.
    Box::leak(key[..end].to_owned().into_boxed_str())
}

/// A watched presence reports a user's first device anywhere (online) and their last one gone
/// (offline), not each gateway's: the `user.online` / `user.offline` webhooks.
async fn transitions(p: &dyn Presence) {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    p.watch(Arc::new(move |user, online| {
        record.lock().expect("lock").push((user, online));
    }));
    let seen = || seen.lock().expect("lock").clone();
    p.connected("gw-a", 1).await.expect("write");
    assert_eq!(seen(), [(1, true)]);
    p.connected("gw-b", 1).await.expect("write");
    p.connected("gw-a", 2).await.expect("write");
    assert_eq!(
        seen(),
        [(1, true), (2, true)],
        "a second gateway is no transition"
    );
    p.disconnected("gw-a", 1);
    p.disconnected("gw-b", 1);
    until("user 1 offline once", Duration::from_secs(5), async || {
        seen().contains(&(1, false))
    })
    .await;
    // Redis: the two deletes run as concurrent tasks, and both may read the hash after both landed
    // (best effort, documented): repeats of the same transition only.
    let seen = seen();
    assert_eq!(seen[..3], [(1, true), (2, true), (1, false)]);
    assert!(
        seen[3..].iter().all(|e| *e == (1, false)),
        "offline only when the last gateway let go: {seen:?}"
    );
}

#[tokio::test]
async fn memory_presence_reports_transitions() {
    transitions(&MemoryPresence::new()).await;
}

#[tokio::test]
async fn redis_presence_reports_transitions() {
    let p = redis(Duration::from_secs(60)).await;
    transitions(p.as_ref()).await;
}
