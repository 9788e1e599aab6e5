//! [`Presence`] backends: [`MemoryPresence`] (embedded mode: the one process's gateway) and
//! [`RedisPresence`] (distributed: every gateway's online users in Redis, with a TTL per gateway).
//! Presence routes every event for a user's devices (`zhibo_bus::route`), so an entry must exist
//! whenever the user has a connection: see "Lost entries" below.
//!
//! # Redis layout
//! One hash per user, `<prefix>:presence:<user_id>`, field = gateway id, value = the ms timestamp until
//! which that gateway vouches for the user. A gateway writes the field when the user's first connection
//! registers there (`HSET` + `PEXPIRE` of the key, awaited before the sign-in completes), deletes it with
//! the user's last connection (queued; one task sends the queue in pipelines of 1,000, and a
//! new connection of the same user cancels a queued delete or waits for one under way, so a delete
//! never removes a newer entry), and rewrites the fields of all its users every `ttl / 3` in one pipeline.
//! A dead gateway stops refreshing: its fields count as offline once their timestamp passes, and the
//! key itself expires after `2 × ttl` without refreshes. The reader sends one `HGETALL` per recipient in
//! one pipeline; the gateways whose value is in the future hold the user.
//!
//! # Lost entries
//! Redis may lose entries that should be there (flushed, restarted empty, a cluster master failed over
//! to an empty replica). Each gateway checks every [`PROBE_EVERY`] that its own field is still in the
//! hashes of a rotating sample of [`PROBE_SAMPLE`] of its users (`HEXISTS`, one pipeline) and rewrites
//! all of its entries at once when one is missing; the full rewrite every `ttl / 3` also repairs them.
//!
//! A loss is also marked: the key [`RedisPresence::since_key`] holds when the current entries began
//! and is lost with them. The reader fetches it in the same pipeline as the hashes; whoever finds it
//! missing sets it (`SET NX`, now), and each gateway's probe sees it missing or changed and writes
//! all its entries again (the loss counts as settled only once that succeeded). For
//! [`UNCERTAIN_FOR_MS`] after that time every answer is `None` ("unknown"), which the sender routes to
//! every gateway: no live delivery is lost while the gateways write their entries again (a user on two
//! gateways, one of which has written again, is unknown too).
//!
//! A process that finds the key missing as it starts takes it for a fresh Redis (or prefix) and sets
//! it with its window already over: else every new deployment would begin with 5 s of events routed
//! everywhere and everyone pushed. If Redis had in fact just lost its data, the other gateways'
//! entries are missing until their next probe (about a second), and events for their users in that
//! second are not delivered live. A loss that spares the since key (one master of a Redis Cluster, a
//! failover to a replica that lags) is found only by the sampled probe — a gateway of N users checks
//! them all in N / 16 seconds, and rewrites everything at its TTL / 3 refresh anyway; until then an
//! event for an affected user reaches no gateway, and the device gets the message at its next sync
//! (the next message's seq gap, or a reconnect), not live.
//!
//! Transitions ([`Presence::watch`], for the `user.online` / `user.offline` webhooks): with a listener
//! set, the write of a user's first connection on a gateway reads the hash back in the same pipeline,
//! and the user came online when no other gateway's entry is live; after the delete of a user's last
//! connection on a gateway, the hash is read, and the user went offline when no entry is live. Two
//! gateways changing one user's presence in the same instant can both (or neither) see the transition:
//! best effort, as presence itself.
//!
//! Failure modes: a stale "online" (a gateway killed without cleanup) suppresses pushes for at most
//! `ttl`; Redis unreachable → the reader fails and the caller treats everyone as offline (push, at least
//! once). Timestamps are compared across hosts: clock skew between gateways and workers shifts the TTL
//! by the skew.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::{
    Builder, ClientLike as _, Config, HashesInterface as _, KeysInterface as _, Pool,
    ReconnectPolicy, SetOptions, Value,
};
use tracing::warn;

use crate::ids::now_ms;
use crate::{Error, ErrorKind, Presence, PresenceListener, Result};

/// How often a gateway checks that Redis still has its entries (see "Lost entries").
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Users checked per probe.
pub const PROBE_SAMPLE: usize = 16;

/// How long after a loss of entries was noticed an empty answer counts as "unknown" (the gateways
/// probe every [`PROBE_EVERY`] and then write all their entries again), ms.
const UNCERTAIN_FOR_MS: i64 = 5_000;

/// Presence of the users of this process's gateways (embedded mode: one process holds every
/// connection, so this is exact, transitions included).
#[derive(Default)]
pub struct MemoryPresence {
    /// Per online user, the gateways vouching for them.
    online: Mutex<HashMap<i64, HashSet<String>>>,
    listener: OnceLock<PresenceListener>,
}

impl std::fmt::Debug for MemoryPresence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryPresence").finish_non_exhaustive()
    }
}

impl MemoryPresence {
    /// Nobody online.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, HashSet<String>>> {
        self.online
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl Presence for MemoryPresence {
    async fn connected(&self, gateway_id: &str, user_id: i64) -> Result<()> {
        let first = {
            let mut online = self.lock();
            let gateways = online.entry(user_id).or_default();
            gateways.insert(gateway_id.to_owned()) && gateways.len() == 1
        };
        if first {
            if let Some(listener) = self.listener.get() {
                listener(user_id, true);
            }
        }
        Ok(())
    }

    fn disconnected(&self, gateway_id: &str, user_id: i64) {
        let last = {
            let mut online = self.lock();
            let emptied = online
                .get_mut(&user_id)
                .is_some_and(|gateways| gateways.remove(gateway_id) && gateways.is_empty());
            if emptied {
                online.remove(&user_id);
            }
            emptied
        };
        if last {
            if let Some(listener) = self.listener.get() {
                listener(user_id, false);
            }
        }
    }

    async fn gateways(&self, users: &[i64]) -> Result<Vec<Option<Vec<String>>>> {
        let online = self.lock();
        Ok(users
            .iter()
            .map(|u| {
                Some(
                    online
                        .get(u)
                        .map(|g| g.iter().cloned().collect())
                        .unwrap_or_default(),
                )
            })
            .collect())
    }

    fn watch(&self, listener: PresenceListener) {
        let _ = self.listener.set(listener);
    }
}

/// Presence in Redis (see the module documentation for the layout and failure modes).
pub struct RedisPresence {
    pool: Pool,
    prefix: String,
    ttl: Duration,
    /// The (gateway, user) pairs this process vouches for, rewritten every `ttl / 3`.
    local: Mutex<HashSet<(String, i64)>>,
    /// Entries to delete, deleted in batches by one task (a mass disconnect is a few pipelines, not a
    /// task per user).
    deletes: Mutex<Deletes>,
    /// Wakes the delete task (`notify_one` keeps a permit when it is busy).
    wake_deletes: Arc<tokio::sync::Notify>,
    /// Bumped after each delete batch: a `connected` of a pair being deleted waits for it.
    deleted: tokio::sync::watch::Sender<u64>,
    /// Told of transitions ([`Presence::watch`]).
    listener: OnceLock<PresenceListener>,
    /// The value of [`RedisPresence::since_key`] this process's entries were written under.
    since_seen: Mutex<Option<i64>>,
}

/// The delete queue of [`RedisPresence`].
#[derive(Default)]
struct Deletes {
    /// Not sent yet: a `connected` of the same pair just takes it out.
    queued: HashSet<(String, i64)>,
    /// In the batch under way: a `connected` of the same pair waits for it, so the delete can never
    /// land after (and remove) the new entry.
    in_flight: HashSet<(String, i64)>,
}

/// What [`RedisPresence::lost_entries`] found.
#[derive(Debug, Clone, Copy)]
enum Loss {
    /// The since key is new (its value): settled once every entry is written again.
    Marked(i64),
    /// One of the sampled entries is missing.
    Sampled,
}

/// Entries deleted per pipeline.
const DELETE_BATCH: usize = 1000;

impl std::fmt::Debug for RedisPresence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPresence")
            .field("prefix", &self.prefix)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

fn redis_error(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::wrap(
        ErrorKind::Unavailable,
        format_args!("redis presence {what}"),
        e,
    )
}

impl RedisPresence {
    /// Connects to the Redis at `url`. Keys start with `prefix` (the bus subject prefix, so deployments
    /// sharing a Redis stay apart); a gateway's entries count for `ttl` after its last refresh. Spawns
    /// the refresh task (call inside a tokio runtime); it ends when the returned value is dropped.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] when the URL is invalid or Redis cannot be reached.
    pub async fn connect(url: &str, prefix: &str, ttl: Duration) -> Result<Arc<Self>> {
        let config = Config::from_url(url).map_err(|e| redis_error("url", e))?;
        let pool = Builder::from_config(config)
            .with_performance_config(|p| p.default_command_timeout = Duration::from_secs(2))
            .with_connection_config(|c| c.connection_timeout = Duration::from_secs(5))
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
            .build_pool(2)
            .map_err(|e| redis_error("pool", e))?;
        let _connection = pool.init().await.map_err(|e| redis_error("connect", e))?;
        let presence = Arc::new(RedisPresence {
            pool,
            prefix: prefix.to_owned(),
            ttl,
            local: Mutex::new(HashSet::new()),
            listener: OnceLock::new(),
            since_seen: Mutex::new(None),
            deletes: Mutex::new(Deletes::default()),
            wake_deletes: Arc::new(tokio::sync::Notify::new()),
            deleted: tokio::sync::watch::channel(0).0,
        });
        let since = presence.current_since(true).await?;
        *presence
            .since_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(since);
        tokio::spawn(refresh_loop(Arc::downgrade(&presence), ttl / 3));
        tokio::spawn(delete_loop(Arc::downgrade(&presence)));
        Ok(presence)
    }

    /// The Redis key of `user_id`'s presence hash. The only place the key format lives.
    pub fn key(&self, user_id: i64) -> String {
        format!("{}:presence:{user_id}", self.prefix)
    }

    /// The key whose value is when the current set of entries began (ms): written once, lost with
    /// the entries, written again by whoever notices first (see "Lost entries").
    pub fn since_key(&self) -> String {
        format!("{}:presence:since", self.prefix)
    }

    /// The value of [`RedisPresence::since_key`], set if it is missing: to now (a loss), or — at
    /// this process's start (`starting`) — to a time whose window is over, since a key missing then
    /// is most likely a fresh Redis or prefix, where nothing was lost (see "Lost entries").
    async fn current_since(&self, starting: bool) -> Result<i64> {
        for _ in 0..2 {
            let since: Option<i64> = self
                .pool
                .get(self.since_key())
                .await
                .map_err(|e| redis_error("get", e))?;
            if let Some(since) = since {
                return Ok(since);
            }
            let now = now_ms();
            self.mark_loss(if starting {
                now.saturating_sub(UNCERTAIN_FOR_MS)
            } else {
                now
            })
            .await;
        }
        Err(Error::new(
            ErrorKind::Unavailable,
            "redis presence: the since key vanished twice",
        ))
    }

    /// Records that entries were lost at `now` (`SET NX`: the first to notice sets it).
    async fn mark_loss(&self, now: i64) {
        let set: std::result::Result<Value, _> = self
            .pool
            .set(self.since_key(), now, None, Some(SetOptions::NX), false)
            .await;
        if let Err(e) = set {
            warn!(error = %e, "presence: could not mark the loss of entries");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<(String, i64)>> {
        self.local
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn ttl_ms(&self) -> i64 {
        i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX)
    }

    fn lock_deletes(&self) -> std::sync::MutexGuard<'_, Deletes> {
        self.deletes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Deletes the given entries in one pipeline (a failure is logged: they expire with the TTL).
    async fn delete_batch(&self, pairs: &[(String, i64)]) {
        let pipeline = self.pool.next().pipeline();
        for (gateway, user) in pairs {
            let queued: std::result::Result<(), _> =
                pipeline.hdel(self.key(*user), gateway.as_str()).await;
            if let Err(e) = queued {
                warn!(error = %e, "presence delete failed; the entries expire with the TTL");
                return;
            }
        }
        for r in pipeline.try_all::<i64>().await {
            if let Err(e) = r {
                warn!(error = %e, "presence delete failed; the entry expires with the TTL");
            }
        }
    }

    /// Whether any gateway's entry of `user_id` is live, other than `except`'s.
    async fn live_elsewhere(&self, user_id: i64, except: Option<&str>) -> Result<bool> {
        let entries: HashMap<String, i64> = self
            .pool
            .hgetall(self.key(user_id))
            .await
            .map_err(|e| redis_error("hgetall", e))?;
        let now = now_ms();
        Ok(entries
            .iter()
            .any(|(gateway, until)| *until > now && Some(gateway.as_str()) != except))
    }

    /// Whether Redis lost this process's entries: the since key is missing or was set again since
    /// they were written (a loss anyone noticed: settled by the caller once it wrote everything
    /// again), or one of a sample of them (the `round`-th slice of [`PROBE_SAMPLE`]) is missing;
    /// `None` when nothing is missing or it cannot tell (Redis unreachable: the refresh retries).
    async fn lost_entries(&self, round: usize) -> Option<Loss> {
        let since = self.current_since(false).await.ok()?;
        let seen = *self
            .since_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen != Some(since) {
            warn!("presence entries lost (Redis flushed or restarted?): writing them all again");
            return Some(Loss::Marked(since));
        }
        let sample: Vec<(String, i64)> = {
            let local = self.lock();
            if local.is_empty() {
                return None;
            }
            let skip = round.wrapping_mul(PROBE_SAMPLE) % local.len();
            local
                .iter()
                .cycle()
                .skip(skip)
                .take(PROBE_SAMPLE.min(local.len()))
                .cloned()
                .collect()
        };
        let pipeline = self.pool.next().pipeline();
        for (gateway, user) in &sample {
            let queued: std::result::Result<(), _> =
                pipeline.hexists(self.key(*user), gateway.as_str()).await;
            if queued.is_err() {
                return None;
            }
        }
        let answers = pipeline.try_all::<bool>().await;
        let local = self.lock();
        let lost = sample
            .iter()
            .zip(answers)
            .any(|(pair, exists)| matches!(exists, Ok(false)) && local.contains(pair));
        if lost {
            warn!(
                "presence entries missing from Redis (flushed or restarted?): rewriting them all"
            );
        }
        lost.then_some(Loss::Sampled)
    }

    /// Writes the given (gateway, user) pairs as online until now + ttl, in one pipeline.
    async fn write(&self, pairs: &[(String, i64)]) -> Result<()> {
        if pairs.is_empty() {
            return Ok(());
        }
        let until = now_ms().saturating_add(self.ttl_ms());
        let pipeline = self.pool.next().pipeline();
        for (gateway, user) in pairs {
            let key = self.key(*user);
            let () = pipeline
                .hset(&key, (gateway.as_str(), until))
                .await
                .map_err(|e| redis_error("hset", e))?;
            let () = pipeline
                .pexpire(&key, self.ttl_ms().saturating_mul(2), None)
                .await
                .map_err(|e| redis_error("pexpire", e))?;
        }
        for r in pipeline.try_all::<i64>().await {
            r.map_err(|e| redis_error("write", e))?;
        }
        Ok(())
    }
}

/// Rewrites every local pair every `every`, and in between checks a sample of them every
/// [`PROBE_EVERY`] (rewriting all at once when Redis lost one), until the presence is dropped.
async fn refresh_loop(presence: Weak<RedisPresence>, every: Duration) {
    let probe = PROBE_EVERY.min(every);
    let mut since_refresh = Duration::ZERO;
    let mut round = 0usize;
    loop {
        tokio::time::sleep(probe).await;
        since_refresh += probe;
        let Some(presence) = presence.upgrade() else {
            return;
        };
        round = round.wrapping_add(1);
        let lost = presence.lost_entries(round).await;
        if since_refresh < every && lost.is_none() {
            continue;
        }
        since_refresh = Duration::ZERO;
        let pairs: Vec<(String, i64)> = presence.lock().iter().cloned().collect();
        let mut written = true;
        for chunk in pairs.chunks(1000) {
            if let Err(e) = presence.write(chunk).await {
                warn!(error = %e, "presence refresh failed");
                written = false;
                break;
            }
        }
        // The loss is settled only once everything is written again: else the next probe retries.
        if let (true, Some(Loss::Marked(since))) = (written, lost) {
            *presence
                .since_seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(since);
        }
    }
}

/// Deletes the queued entries in batches of [`DELETE_BATCH`] (one pipeline each), then tells the
/// listener of users gone offline, until the presence is dropped.
async fn delete_loop(presence: Weak<RedisPresence>) {
    let Some(wake) = presence.upgrade().map(|p| p.wake_deletes.clone()) else {
        return;
    };
    loop {
        let Some(p) = presence.upgrade() else { return };
        let batch: Vec<(String, i64)> = {
            let mut deletes = p.lock_deletes();
            let batch: Vec<(String, i64)> =
                deletes.queued.iter().take(DELETE_BATCH).cloned().collect();
            for pair in &batch {
                deletes.queued.remove(pair);
                deletes.in_flight.insert(pair.clone());
            }
            batch
        };
        if batch.is_empty() {
            drop(p);
            // No strong reference while waiting; the timeout ends the task soon after the presence
            // is dropped (nobody wakes it then).
            let _ = tokio::time::timeout(Duration::from_secs(5), wake.notified()).await;
            continue;
        }
        p.delete_batch(&batch).await;
        {
            let mut deletes = p.lock_deletes();
            for pair in &batch {
                deletes.in_flight.remove(pair);
            }
        }
        p.deleted.send_modify(|n| *n = n.wrapping_add(1));
        if let Some(listener) = p.listener.get() {
            for (_, user_id) in &batch {
                // Still (or again) held by this process: no transition.
                if p.lock().iter().any(|(_, u)| u == user_id) {
                    continue;
                }
                match p.live_elsewhere(*user_id, None).await {
                    Ok(false) => listener(*user_id, false),
                    Ok(true) => {}
                    Err(e) => {
                        warn!(user_id, error = %e, "presence read failed; no user.offline event");
                    }
                }
            }
        }
    }
}

#[async_trait]
impl Presence for RedisPresence {
    async fn connected(&self, gateway_id: &str, user_id: i64) -> Result<()> {
        let pair = (gateway_id.to_owned(), user_id);
        self.lock().insert(pair.clone());
        // A delete of this pair not sent yet is cancelled; one under way is waited for.
        loop {
            let mut batches = self.deleted.subscribe();
            {
                let mut deletes = self.lock_deletes();
                deletes.queued.remove(&pair);
                if !deletes.in_flight.contains(&pair) {
                    break;
                }
            }
            if batches.changed().await.is_err() {
                break;
            }
        }
        let Some(listener) = self.listener.get() else {
            return self.write(&[pair]).await;
        };
        // Read before the write: nobody else live means this connection makes the user online.
        let elsewhere = self.live_elsewhere(user_id, Some(gateway_id)).await;
        self.write(&[pair]).await?;
        match elsewhere {
            Ok(false) => listener(user_id, true),
            Ok(true) => {}
            Err(e) => warn!(user_id, error = %e, "presence read failed; no user.online event"),
        }
        Ok(())
    }

    fn disconnected(&self, gateway_id: &str, user_id: i64) {
        let pair = (gateway_id.to_owned(), user_id);
        self.lock().remove(&pair);
        self.lock_deletes().queued.insert(pair);
        self.wake_deletes.notify_one();
    }

    async fn gateways(&self, users: &[i64]) -> Result<Vec<Option<Vec<String>>>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let pipeline = self.pool.next().pipeline();
        let () = pipeline
            .get(self.since_key())
            .await
            .map_err(|e| redis_error("get", e))?;
        for user in users {
            let () = pipeline
                .hgetall(self.key(*user))
                .await
                .map_err(|e| redis_error("hgetall", e))?;
        }
        let mut answers = pipeline.try_all::<Value>().await.into_iter();
        let since = answers
            .next()
            .unwrap_or(Ok(Value::Null))
            .map_err(|e| redis_error("get", e))?;
        let now = now_ms();
        let since: Option<i64> = since.convert().map_err(|e| redis_error("get", e))?;
        let uncertain = match since {
            Some(since) => now < since.saturating_add(UNCERTAIN_FOR_MS),
            None => {
                // Lost with the entries: mark the loss (the gateways see it and write theirs again).
                self.mark_loss(now).await;
                true
            }
        };
        answers
            .map(|r| {
                let entries: HashMap<String, i64> = r
                    .and_then(|v| v.convert())
                    .map_err(|e| redis_error("hgetall", e))?;
                let live: Vec<String> = entries
                    .into_iter()
                    .filter_map(|(gateway, until)| (until > now).then_some(gateway))
                    .collect();
                // While the gateways may still be writing their entries again, an answer may miss
                // some of them (a user on two gateways, one of which has written again): unknown.
                Ok((!uncertain).then_some(live))
            })
            .collect()
    }

    fn watch(&self, listener: PresenceListener) {
        let _ = self.listener.set(listener);
    }
}
