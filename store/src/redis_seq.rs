//! [`RedisSeq`]: per-user inbox seqs from Redis counters, recovered from the message store when
//! Redis has lost them.
//!
//! # Why a lost counter cannot move a seq back
//! Counters are only ever incremented by a Lua script that INCRs a key *only if it exists* and
//! answers nil otherwise. A missing key (Redis restarted without persistence, flushed, failed over
//! to an empty replica) is therefore never silently restarted from 1: the allocator reads the
//! user's largest stored seq from the [`MessageStore`] and seeds the counter with
//! `SET key (max_seq + RECOVERY_MARGIN) NX`, then runs the script again. Seqs stay strictly
//! increasing per user, but may jump by up to [`RECOVERY_MARGIN`] after a recovery. A conversation's
//! counter recovers the same way from [`ConversationStore::last_conversation_seq`]; the allocation
//! that seeded it reports the seqs it skipped ([`ConversationSeqs::skipped`]), which the send path
//! records in the recipients' rows ([`ConversationStore::record_gap`]) so they are not counted as
//! unread.
//!
//! # What this does not cover
//! A Redis that comes back with *stale* keys (an RDB snapshot or an `appendfsync everysec` AOF
//! restored after a crash, or a lagging replica promoted) still has the key, so the script cannot
//! tell. Run the seq Redis either without persistence (`save ""`, `appendonly no`: a restart loses
//! every key, which recovery handles) or with `appendfsync always`.
//! A user with an empty inbox is seeded at 0, not at the margin: seqs handed out just before the
//! loss and not yet written could be handed out again. The window is one in-flight send of a user's
//! very first messages, at the instant Redis loses its data.
//!
//! # Redis Cluster
//! The same allocator runs on a Redis Cluster (Redis 7 or later) when the URL is
//! `redis-cluster://host:port?node=host:port&node=host:port` (any reachable masters as seeds; the
//! rest are discovered). A fan-out's keys are grouped by the master that owns their hash slot, and
//! each master gets one script call for its whole group, all groups concurrently: a 2,000-member
//! group is one call per master, not 2,000. The cluster script is flagged `allow-cross-slot-keys`
//! and takes its keys as arguments (Redis refuses declared keys from several slots in one call);
//! it checks every key before it increments any, so a key that is not local to the node (a slot
//! moved since the client read the topology) fails the call before anything changed: the client
//! then refreshes its view of the cluster and retries once. Recovery is per key (`SET NX` routed by
//! slot), so a master that loses its keys (flushed, restarted empty) is recovered exactly like a
//! standalone Redis; the other masters are not touched.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::{
    Builder, Client, ClientLike as _, ClusterInterface as _, Config, KeysInterface as _,
    LuaInterface as _, Pool, ReconnectPolicy, SetOptions, Value,
};
use fred::types::cluster::ClusterRouting;
use fred::types::config::Server;
use fred::types::{ClusterHash, CustomCommand, Expiration, InfoKind};
use futures::{StreamExt as _, TryStreamExt as _};

use crate::{
    Claim, ConversationKey, ConversationSeqs, ConversationStore, Error, ErrorKind, MessageStore,
    Result, SendPlan, SeqAllocator, SeqGap,
};

/// How far above the largest stored seq a recovered counter restarts. It covers seqs that were
/// allocated from the lost counter but whose inbox writes had not landed when `max_seq` was read
/// (sends in flight at the moment Redis lost its keys); a user would need more than this many
/// messages in flight at once to be at risk.
pub const RECOVERY_MARGIN: u64 = 1000;

/// Keys per script call; larger fan-outs run several calls concurrently (pipelined on the pool).
/// Bounds how long one script blocks Redis.
const KEYS_PER_SCRIPT: usize = 1000;

/// Concurrent `max_seq` reads while recovering many users at once.
const RECOVERY_CONCURRENCY: usize = 64;

/// Rounds of recover-and-retry before giving up (keys would have to vanish again every time).
const RECOVERY_ROUNDS: usize = 3;

/// Clients in the pool.
const POOL_SIZE: usize = 4;

/// For each key: INCR it if it exists, else nil (Lua `false` becomes a nil reply). Never creates
/// a key: creation is recovery's job.
const INCR_EXISTING: &str = r"
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    out[i] = redis.call('INCR', key)
  else
    out[i] = false
  end
end
return out
";

/// [`INCR_EXISTING`] for one node of a Redis Cluster: the keys come as `ARGV` (they may span
/// slots, which Redis refuses for declared keys) and must all be local to the node. The first loop
/// only reads, so a non-local key fails the call before any counter moved.
const INCR_EXISTING_CLUSTER: &str = r"#!lua flags=allow-cross-slot-keys
local exists = {}
for i, key in ipairs(ARGV) do
  exists[i] = redis.call('EXISTS', key)
end
local out = {}
for i, key in ipairs(ARGV) do
  if exists[i] == 1 then
    out[i] = redis.call('INCR', key)
  else
    out[i] = false
  end
end
return out
";

/// The Redis key of `user_id`'s seq counter. The only place the key format lives.
pub fn seq_key(user_id: i64) -> String {
    format!("zhibo:seq:{user_id}")
}

/// The Redis key of the claim of the send `(device_id, client_msg_id)` ([`SeqAllocator::claim_send`]).
/// The client's id is hex-encoded: a `{…}` in it would otherwise be a hash tag choosing the slot.
pub fn send_claim_key(device_id: i64, client_msg_id: &str) -> String {
    use std::fmt::Write as _;
    let mut key = format!("zhibo:claim:{device_id}:");
    for b in client_msg_id.bytes() {
        let _ = write!(key, "{b:02x}");
    }
    key
}

/// How long a send's claim is kept, seconds: resends come within this window (a reconnection); a
/// later one is still answered with the stored plan (see [`SeqAllocator::claim_send`]). Memory: one
/// small key per message of the last five minutes (~65 bytes of plan for a 1:1 message).
pub const SEND_CLAIM_SECS: i64 = 300;

/// The largest fan-out whose plan a claim holds (16 bytes per recipient: 4 KiB). A larger group's
/// send is claimed with the marker instead: its plan's insert-if-absent arbitrates, one operation among
/// its hundreds.
pub const MAX_CLAIMED_RECIPIENTS: usize = 256;

/// First byte of an encoded claim plan.
const CLAIM_PLAN_VERSION: u8 = 2;

/// A claim without a plan (a send that may be a resend, or too large a fan-out): racing attempts
/// then arbitrate with the plan's insert-if-absent. Older workers' claims hold the same value.
const CLAIM_MARKER: &str = "1";

/// A [`SendPlan`] as a claim's value: the version byte, then little-endian `message_id`, `seq`,
/// `server_time_ms`, `conv_seq` and each recipient's `(user_id, seq)`.
pub fn encode_claim_plan(plan: &SendPlan) -> Vec<u8> {
    let mut out = Vec::with_capacity(33 + 16 * plan.recipients.len());
    out.push(CLAIM_PLAN_VERSION);
    out.extend_from_slice(&plan.message_id.to_le_bytes());
    out.extend_from_slice(&plan.seq.to_le_bytes());
    out.extend_from_slice(&plan.server_time_ms.to_le_bytes());
    out.extend_from_slice(&plan.conv_seq.to_le_bytes());
    for &(user_id, seq) in &plan.recipients {
        out.extend_from_slice(&user_id.to_le_bytes());
        out.extend_from_slice(&seq.to_le_bytes());
    }
    out
}

/// The plan [`encode_claim_plan`] wrote, or `None` for anything else (an older worker's claim).
pub fn decode_claim_plan(bytes: &[u8]) -> Option<SendPlan> {
    let (&version, rest) = bytes.split_first()?;
    if version != CLAIM_PLAN_VERSION || rest.len() < 32 || (rest.len() - 32) % 16 != 0 {
        return None;
    }
    let word = |i: usize| -> [u8; 8] {
        let mut w = [0; 8];
        w.copy_from_slice(&rest[i * 8..i * 8 + 8]);
        w
    };
    Some(SendPlan {
        message_id: u64::from_le_bytes(word(0)),
        seq: u64::from_le_bytes(word(1)),
        server_time_ms: i64::from_le_bytes(word(2)),
        conv_seq: u64::from_le_bytes(word(3)),
        recipients: (0..(rest.len() - 32) / 16)
            .map(|r| {
                (
                    i64::from_le_bytes(word(4 + 2 * r)),
                    u64::from_le_bytes(word(5 + 2 * r)),
                )
            })
            .collect(),
    })
}

/// What a claim's value (or its absence) says.
fn claim_of(value: &Value) -> Claim {
    match value {
        Value::Null => Claim::Free,
        other => other
            .as_bytes()
            .and_then(decode_claim_plan)
            .map_or(Claim::Unknown, Claim::Planned),
    }
}

/// The Redis key of the snapshot of `user_id`'s conversation list after the row `(kind, id)` whose
/// last activity is `activity_ms`, for list sync `changed_after` ([`SeqAllocator::put_snapshot`]).
pub fn list_snapshot_key(
    user_id: i64,
    changed_after: u64,
    kind: i32,
    id: i64,
    activity_ms: i64,
) -> String {
    format!("zhibo:list:{user_id}:{changed_after}:{kind}:{id}:{activity_ms}")
}

/// The Redis key of lock `name` ([`SeqAllocator::try_lock`]).
pub fn lock_key(name: &str) -> String {
    format!("zhibo:lock:{name}")
}

/// Deletes a lock's key only if it still holds the caller's holder value.
const UNLOCK: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// The Redis key of `group_id`'s membership version ([`SeqAllocator::group_version`]).
pub fn group_version_key(group_id: i64) -> String {
    format!("zhibo:gver:{group_id}")
}

/// How long a membership version is kept after it was last set: an expired one is replaced by a fresh
/// value on its next read (caches keyed by it then read the members once more).
const GROUP_VERSION_SECS: i64 = 86_400;

/// The Redis key of a conversation's conversation-seq counter (`zhibo:cseq:<kind>:<a>:<b>`, the parts
/// of [`ConversationKey::parts`]). Like [`seq_key`], no hash tag: conversations spread over every slot.
pub fn conversation_seq_key(key: ConversationKey) -> String {
    let (kind, a, b) = key.parts();
    format!("zhibo:cseq:{kind}:{a}:{b}")
}

/// The Redis-backed [`SeqAllocator`], recovering lost counters from a [`MessageStore`].
pub struct RedisSeq {
    pool: Pool,
    /// The allocation script: [`INCR_EXISTING_CLUSTER`] on a cluster, else [`INCR_EXISTING`].
    script: &'static str,
    /// SHA1 of `script`, as returned by `SCRIPT LOAD`.
    script_sha: String,
    /// Whether `pool` talks to a Redis Cluster.
    clustered: bool,
    messages: Arc<dyn MessageStore>,
    /// Read only to recover lost conversation counters ([`Self::with_conversations`]).
    conversations: Option<Arc<dyn ConversationStore>>,
}

impl std::fmt::Debug for RedisSeq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSeq")
            .field("script_sha", &self.script_sha)
            .field("clustered", &self.clustered)
            .finish_non_exhaustive()
    }
}

/// `SCRIPT LOAD` of `script` on the cluster node `node`; returns its SHA1.
async fn load_on(client: &Client, node: &Server, script: &'static str) -> Result<String> {
    client
        .with_cluster_node(node.clone())
        .custom(
            CustomCommand::new_static("SCRIPT", ClusterHash::Random, false),
            vec!["LOAD", script],
        )
        .await
        .map_err(|e| redis_error("script load", e))
}

/// The major version in an `INFO server` answer (`redis_version:7.0.15`), if it says.
pub fn redis_major_version(info: &str) -> Option<u32> {
    info.lines()
        .find_map(|l| l.strip_prefix("redis_version:"))?
        .trim()
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// A Redis failure while doing `what`, the client's error kept as the source.
pub(crate) fn redis_error(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::wrap(ErrorKind::Unavailable, format_args!("redis {what}"), e)
}

/// An answer from Redis that makes no sense, with no underlying error to keep.
pub(crate) fn redis_failure(what: &str, detail: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Unavailable, format!("redis {what}: {detail}"))
}

/// Checks a Redis URL without connecting (configuration is checked before anything connects): one of
/// the schemes the client speaks (`redis`, `rediss`, their `-cluster` and `-sentinel` forms) and a
/// URL it parses.
///
/// # Errors
/// A message saying what is wrong.
pub fn check_url(url: &str) -> std::result::Result<(), String> {
    const SCHEMES: [&str; 6] = [
        "redis",
        "rediss",
        "redis-cluster",
        "rediss-cluster",
        "redis-sentinel",
        "rediss-sentinel",
    ];
    let Some((scheme, _)) = url.split_once("://") else {
        return Err(format!("{url:?} is not a URL (redis://host:port)"));
    };
    if !SCHEMES.contains(&scheme) {
        return Err(format!(
            "{url:?}: scheme {scheme:?} is not one of {}",
            SCHEMES.join(", ")
        ));
    }
    Config::from_url(url)
        .map(drop)
        .map_err(|e| format!("{url:?}: {e}"))
}

/// A pool of [`POOL_SIZE`] clients to the Redis (or Redis Cluster) at `url`, connected: 5 s command
/// and connect timeouts, unlimited reconnects (100 ms doubling up to 5 s).
///
/// # Errors
/// [`ErrorKind::Unavailable`] when the URL is invalid or Redis cannot be reached.
pub async fn connect_pool(url: &str) -> Result<Pool> {
    let config = Config::from_url(url).map_err(|e| redis_error("url", e))?;
    let pool = Builder::from_config(config)
        .with_performance_config(|p| p.default_command_timeout = Duration::from_secs(5))
        .with_connection_config(|c| c.connection_timeout = Duration::from_secs(5))
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
        .build_pool(POOL_SIZE)
        .map_err(|e| redis_error("pool", e))?;
    // The connection task ends with the pool; its result is reported through commands.
    let _connection = pool.init().await.map_err(|e| redis_error("connect", e))?;
    Ok(pool)
}

impl RedisSeq {
    /// Connects to the Redis at `url` (`redis://host:port/db`, or
    /// `redis-cluster://host:port?node=host:port...` for a Redis Cluster) and loads the allocation
    /// script. `messages` is read only to recover lost counters.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] when the URL is invalid or Redis cannot be reached.
    pub async fn connect(url: &str, messages: Arc<dyn MessageStore>) -> Result<Self> {
        Self::with_pool(connect_pool(url).await?, messages).await
    }

    /// Uses an already initialised pool.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] when the script cannot be loaded.
    pub async fn with_pool(pool: Pool, messages: Arc<dyn MessageStore>) -> Result<Self> {
        let clustered = pool.next().is_clustered();
        let script = if clustered {
            INCR_EXISTING_CLUSTER
        } else {
            INCR_EXISTING
        };
        let client = pool.next();
        let script_sha: String = if clustered {
            // Every master needs the script; one that joins later loads it on its first NOSCRIPT.
            let masters = client
                .cached_cluster_state()
                .map(|state| state.unique_primary_nodes())
                .unwrap_or_default();
            if masters.is_empty() {
                return Err(redis_failure("cluster", "no master node known"));
            }
            let mut sha = String::new();
            for master in &masters {
                sha = load_on(client, master, script).await?;
            }
            sha
        } else {
            client
                .script_load(script)
                .await
                .map_err(|e| redis_error("script load", e))?
        };
        // Send claims are `SET … NX GET` (Redis 7): on an older Redis every send would fail.
        match client.info::<String>(Some(InfoKind::Server)).await {
            Ok(info) => {
                if let Some(major) = redis_major_version(&info).filter(|&v| v < 7) {
                    return Err(redis_failure(
                        "version",
                        format!("Redis {major} found: zhibo needs Redis 7 or later (SET … NX GET)"),
                    ));
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not read the Redis version"),
        }
        Ok(RedisSeq {
            pool,
            script,
            script_sha,
            clustered,
            messages,
            conversations: None,
        })
    }

    /// The Redis client pool (shared with [`crate::list_cache::ListCache`]).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Recovers lost conversation counters from `conversations`
    /// ([`ConversationStore::last_conversation_seq`]); without it,
    /// [`SeqAllocator::next_in_conversation`] refuses to recover one.
    #[must_use]
    pub fn with_conversations(mut self, conversations: Arc<dyn ConversationStore>) -> Self {
        self.conversations = Some(conversations);
        self
    }

    /// Runs [`INCR_EXISTING`] over `keys` (in chunks, concurrently): the new value of each key, or
    /// `None` where the key is missing.
    async fn incr_existing(&self, keys: &[String]) -> Result<Vec<Option<u64>>> {
        if self.clustered {
            return match self.incr_existing_per_node(keys).await {
                // A slot moved (or a master failed over) since this client read the topology: the
                // script failed before changing anything. Refresh the topology and retry once.
                Err(e) if e.kind == ErrorKind::Unavailable => {
                    tracing::warn!(error = %e, "redis cluster call failed; refreshing the topology and retrying");
                    self.pool
                        .next()
                        .sync_cluster()
                        .await
                        .map_err(|e| redis_error("cluster sync", e))?;
                    self.incr_existing_per_node(keys).await
                }
                other => other,
            };
        }
        let chunks = futures::future::try_join_all(
            keys.chunks(KEYS_PER_SCRIPT)
                .map(|chunk| self.incr_existing_chunk(chunk, None)),
        )
        .await?;
        Ok(chunks.into_iter().flatten().collect())
    }

    /// [`Self::incr_existing`] on a cluster: keys grouped by the master owning their slot, one
    /// script call per master (per [`KEYS_PER_SCRIPT`] keys), all concurrently.
    async fn incr_existing_per_node(&self, keys: &[String]) -> Result<Vec<Option<u64>>> {
        let client = self.pool.next();
        let state = client
            .cached_cluster_state()
            .ok_or_else(|| redis_failure("cluster", "topology unknown"))?;
        let mut groups: Vec<(Server, Vec<usize>)> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let slot = ClusterRouting::hash_key(key.as_bytes());
            let server = state
                .get_server(slot)
                .ok_or_else(|| redis_failure("cluster", format!("no master for slot {slot}")))?;
            match groups.iter_mut().find(|(s, _)| s == server) {
                Some((_, indices)) => indices.push(i),
                None => groups.push((server.clone(), vec![i])),
            }
        }
        let calls = groups.iter().flat_map(|(server, indices)| {
            indices
                .chunks(KEYS_PER_SCRIPT)
                .map(move |chunk| async move {
                    let chunk_keys: Vec<String> = chunk.iter().map(|&i| keys[i].clone()).collect();
                    let seqs = self
                        .incr_existing_chunk(&chunk_keys, Some(server.clone()))
                        .await?;
                    Ok::<_, Error>(chunk.iter().copied().zip(seqs).collect::<Vec<_>>())
                })
        });
        let mut out = vec![None; keys.len()];
        for (i, seq) in futures::future::try_join_all(calls)
            .await?
            .into_iter()
            .flatten()
        {
            out[i] = seq;
        }
        Ok(out)
    }

    /// One script call over `keys`: on the default connection, or on the cluster master `node`
    /// (keys as arguments, see [`INCR_EXISTING_CLUSTER`]).
    async fn incr_existing_chunk(
        &self,
        keys: &[String],
        node: Option<Server>,
    ) -> Result<Vec<Option<u64>>> {
        let reply = match self.evalsha(keys, node.as_ref()).await {
            // A restarted or SCRIPT FLUSHed Redis has forgotten the script: load it and retry.
            Err(e) if e.details().contains("NOSCRIPT") => {
                let client = self.pool.next();
                match &node {
                    Some(node) => {
                        load_on(client, node, self.script).await?;
                    }
                    None => {
                        let _: String = client
                            .script_load(self.script)
                            .await
                            .map_err(|e| redis_error("script load", e))?;
                    }
                }
                self.evalsha(keys, node.as_ref())
                    .await
                    .map_err(|e| redis_error("evalsha", e))?
            }
            other => other.map_err(|e| redis_error("evalsha", e))?,
        };
        let values = match reply {
            Value::Array(values) => values,
            // A one-key call may come back unwrapped.
            single @ (Value::Integer(_) | Value::Null) => vec![single],
            other => {
                return Err(redis_failure(
                    "evalsha",
                    format!("unexpected reply {other:?}"),
                ))
            }
        };
        if values.len() != keys.len() {
            return Err(redis_failure(
                "evalsha",
                format!("{} replies for {} keys", values.len(), keys.len()),
            ));
        }
        values
            .into_iter()
            .map(|v| match v {
                Value::Integer(n) => u64::try_from(n)
                    .map(Some)
                    .map_err(|_| redis_failure("evalsha", format!("negative seq {n}"))),
                Value::Null => Ok(None),
                other => Err(redis_failure(
                    "evalsha",
                    format!("unexpected element {other:?}"),
                )),
            })
            .collect()
    }

    /// EVALSHA of the allocation script over `keys`, on `node` when given.
    async fn evalsha(
        &self,
        keys: &[String],
        node: Option<&Server>,
    ) -> std::result::Result<Value, fred::error::Error> {
        let sha = self.script_sha.as_str();
        match node {
            Some(node) => {
                // fred's `LuaInterface` is not implemented for `WithOptions`: a custom command
                // keeps the node option.
                let mut args: Vec<Value> = Vec::with_capacity(keys.len() + 2);
                args.push(sha.into());
                args.push(0.into());
                args.extend(keys.iter().map(|k| Value::from(k.as_str())));
                self.pool
                    .next()
                    .with_cluster_node(node.clone())
                    .custom(
                        CustomCommand::new_static("EVALSHA", ClusterHash::Random, false),
                        args,
                    )
                    .await
            }
            None => self.pool.evalsha(sha, keys.to_vec(), ()).await,
        }
    }

    /// Seeds a missing counter: a user's from the message store, a conversation's from the
    /// conversation store (see the module docs). The seqs skipped, when this call seeded it above
    /// a stored one (another allocator may have seeded it first: then `None`).
    async fn recover(&self, counter: Counter) -> Result<Option<SeqGap>> {
        let (max, key) = match counter {
            Counter::User(user_id) => (self.messages.max_seq(user_id).await?, seq_key(user_id)),
            Counter::Conversation(key) => {
                let Some(conversations) = &self.conversations else {
                    return Err(redis_failure(
                        "recover",
                        "no conversation store to recover a conversation counter from",
                    ));
                };
                (
                    conversations.last_conversation_seq(key).await?,
                    conversation_seq_key(key),
                )
            }
        };
        let floor = if max > 0 {
            max.saturating_add(RECOVERY_MARGIN)
        } else {
            0
        };
        let floor = i64::try_from(floor)
            .map_err(|_| redis_failure("recover", format!("seq {floor} overflows")))?;
        // NX: another allocator may have recovered (and started allocating from) it already.
        let set: Value = self
            .pool
            .set(key, floor, None, Some(SetOptions::NX), false)
            .await
            .map_err(|e| redis_error("set", e))?;
        if set.is_null() {
            return Ok(None);
        }
        tracing::warn!(
            counter = ?counter,
            stored_max_seq = max,
            floor,
            "recovered a missing seq counter"
        );
        Ok((max > 0).then(|| SeqGap {
            from: max + 1,
            to: max.saturating_add(RECOVERY_MARGIN),
        }))
    }

    /// One allocation over `counters` (users' and conversations' counters in one script call per
    /// master), recovering missing ones; with the seqs skipped by the conversation counter this call
    /// recovered (a call holds at most one conversation counter).
    async fn allocate(&self, counters: &[Counter]) -> Result<(Vec<u64>, Option<SeqGap>)> {
        let keys: Vec<String> = counters.iter().map(Counter::key).collect();
        let mut seqs = self.incr_existing(&keys).await?;
        let mut skipped = None;
        for _ in 0..RECOVERY_ROUNDS {
            let missing: Vec<usize> = (0..seqs.len()).filter(|&i| seqs[i].is_none()).collect();
            if missing.is_empty() {
                break;
            }
            let lost: BTreeSet<Counter> = missing.iter().map(|&i| counters[i]).collect();
            let recovered: Vec<(Counter, Option<SeqGap>)> = futures::stream::iter(lost)
                .map(|counter| async move { Ok((counter, self.recover(counter).await?)) })
                .buffer_unordered(RECOVERY_CONCURRENCY)
                .try_collect()
                .await?;
            // A user's skipped inbox seqs need nothing: no count is taken over them.
            skipped = skipped.or(recovered
                .into_iter()
                .find_map(|(counter, gap)| match counter {
                    Counter::Conversation(_) => gap,
                    Counter::User(_) => None,
                }));
            let retry_keys: Vec<String> = missing.iter().map(|&i| keys[i].clone()).collect();
            let retried = self.incr_existing(&retry_keys).await?;
            for (i, seq) in missing.into_iter().zip(retried) {
                seqs[i] = seq;
            }
        }
        let seqs = seqs
            .into_iter()
            .zip(counters)
            .map(|(seq, counter)| {
                seq.ok_or_else(|| {
                    redis_failure(
                        "next",
                        format!(
                            "counter {counter:?} vanished {RECOVERY_ROUNDS} times during recovery"
                        ),
                    )
                })
            })
            .collect::<Result<Vec<u64>>>()?;
        Ok((seqs, skipped))
    }
}

/// A counter [`RedisSeq`] allocates from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Counter {
    /// A user's inbox seq.
    User(i64),
    /// A conversation's conversation seq.
    Conversation(ConversationKey),
}

impl Counter {
    fn key(&self) -> String {
        match *self {
            Counter::User(u) => seq_key(u),
            Counter::Conversation(c) => conversation_seq_key(c),
        }
    }
}

#[async_trait]
impl SeqAllocator for RedisSeq {
    async fn next(&self, user_ids: &[i64]) -> Result<Vec<u64>> {
        let counters: Vec<Counter> = user_ids.iter().map(|&u| Counter::User(u)).collect();
        Ok(self.allocate(&counters).await?.0)
    }

    async fn next_in_conversation(
        &self,
        user_ids: &[i64],
        conversation: ConversationKey,
    ) -> Result<ConversationSeqs> {
        let mut counters: Vec<Counter> = user_ids.iter().map(|&u| Counter::User(u)).collect();
        counters.push(Counter::Conversation(conversation));
        let (mut seqs, skipped) = self.allocate(&counters).await?;
        let conv_seq = seqs
            .pop()
            .ok_or_else(|| redis_failure("next", "no conversation seq allocated"))?;
        Ok(ConversationSeqs {
            inbox: seqs,
            conv_seq,
            skipped,
        })
    }

    async fn claimed(&self, device_id: i64, client_msg_id: &str) -> Result<Claim> {
        let value: Value = self
            .pool
            .get(send_claim_key(device_id, client_msg_id))
            .await
            .map_err(|e| redis_error("claim", e))?;
        Ok(claim_of(&value))
    }

    async fn claim_send(
        &self,
        device_id: i64,
        client_msg_id: &str,
        plan: Option<&SendPlan>,
    ) -> Result<Claim> {
        let with_plan = plan.is_some();
        let plan = plan.filter(|p| p.recipients.len() <= MAX_CLAIMED_RECIPIENTS);
        let value = plan.map_or_else(
            || Value::from(CLAIM_MARKER),
            |p| Value::Bytes(encode_claim_plan(p).into()),
        );
        // SET … NX GET (Redis 7): set only if absent, answer the value already there (nil when this
        // call set it), in one atomic command on the key's slot.
        let previous: Value = self
            .pool
            .set(
                send_claim_key(device_id, client_msg_id),
                value,
                Some(Expiration::EX(SEND_CLAIM_SECS)),
                Some(SetOptions::NX),
                true,
            )
            .await
            .map_err(|e| redis_error("claim", e))?;
        Ok(match claim_of(&previous) {
            // Claimed now, but with the marker instead of the plan asked for (too large a fan-out):
            // a racing attempt will arbitrate in the database, so must this one.
            Claim::Free if with_plan && plan.is_none() => Claim::Unknown,
            other => other,
        })
    }

    async fn put_snapshot(&self, key: &str, value: bytes::Bytes, ttl: Duration) -> Result<()> {
        let ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        let _: Value = self
            .pool
            .set(
                key,
                Value::Bytes(value),
                Some(Expiration::PX(ms)),
                None,
                false,
            )
            .await
            .map_err(|e| redis_error("snapshot", e))?;
        Ok(())
    }

    async fn drop_snapshot(&self, key: &str) -> Result<()> {
        let _: Value = self
            .pool
            .del(key)
            .await
            .map_err(|e| redis_error("snapshot", e))?;
        Ok(())
    }

    fn keeps_snapshots(&self) -> bool {
        true
    }

    async fn snapshot(&self, key: &str) -> Result<Option<bytes::Bytes>> {
        let value: Value = self
            .pool
            .get(key)
            .await
            .map_err(|e| redis_error("snapshot", e))?;
        Ok(match value {
            Value::Null => None,
            Value::Bytes(b) => Some(b),
            other => other.as_bytes().map(bytes::Bytes::copy_from_slice),
        })
    }

    async fn group_version(&self, group_id: i64) -> Result<Option<u64>> {
        // SET … NX GET: the version there, or (none: never set, expired or lost with Redis) ours, now
        // set for every process. A lost version is thus never answered again: values are random.
        let fresh: u64 = rand::random();
        let previous: Value = self
            .pool
            .set(
                group_version_key(group_id),
                fresh.to_string(),
                Some(Expiration::EX(GROUP_VERSION_SECS)),
                Some(SetOptions::NX),
                true,
            )
            .await
            .map_err(|e| redis_error("group version", e))?;
        Ok(Some(match previous {
            Value::Null => fresh,
            other => other
                .as_str()
                .and_then(|s| s.parse().ok())
                // Damaged: a value no cache was keyed by.
                .unwrap_or(fresh),
        }))
    }

    async fn try_lock(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool> {
        let ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        let set: Value = self
            .pool
            .set(
                lock_key(name),
                holder,
                Some(Expiration::PX(ms)),
                Some(SetOptions::NX),
                false,
            )
            .await
            .map_err(|e| redis_error("lock", e))?;
        Ok(!set.is_null())
    }

    async fn unlock(&self, name: &str, holder: &str) -> Result<()> {
        let _: Value = self
            .pool
            .eval(UNLOCK, vec![lock_key(name)], vec![holder.to_owned()])
            .await
            .map_err(|e| redis_error("unlock", e))?;
        Ok(())
    }

    async fn bump_group_version(&self, group_id: i64) -> Result<()> {
        let _: Value = self
            .pool
            .set(
                group_version_key(group_id),
                rand::random::<u64>().to_string(),
                Some(Expiration::EX(GROUP_VERSION_SECS)),
                None,
                false,
            )
            .await
            .map_err(|e| redis_error("group version", e))?;
        Ok(())
    }

    async fn current(&self, user_id: i64) -> Result<u64> {
        let (counter, stored) = futures::try_join!(
            async {
                self.pool
                    .get::<Option<i64>, _>(seq_key(user_id))
                    .await
                    .map_err(|e| redis_error("get", e))
            },
            self.messages.max_seq(user_id),
        )?;
        let counter = counter.and_then(|n| u64::try_from(n).ok()).unwrap_or(0);
        Ok(counter.max(stored))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_key_has_no_client_chosen_hash_tag() {
        assert_eq!(send_claim_key(7, "a{b}"), "zhibo:claim:7:617b627d");
        assert!(!send_claim_key(7, "{tag}x").contains('{'));
    }

    #[test]
    fn key_format() {
        assert_eq!(
            conversation_seq_key(ConversationKey::direct(9, 4)),
            "zhibo:cseq:1:4:9"
        );
        assert_eq!(
            conversation_seq_key(ConversationKey::Group(7)),
            "zhibo:cseq:2:7:0"
        );
        assert_eq!(seq_key(42), "zhibo:seq:42");
        assert_eq!(seq_key(-1), "zhibo:seq:-1");
    }
}
