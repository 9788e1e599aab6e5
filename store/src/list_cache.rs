//! [`ListCache`]: a user's whole conversation list kept sorted in Redis, so listing does not read the
//! user's `conversations` partition again while nothing changed, and re-reads only the rows that did.
//!
//! # Why
//! The list order (last activity) is not the clustering order, so every listing of a CQL backend
//! reads the user's whole partition: 1,000 rows take 5–12 ms inside Cassandra on the benchmark box
//! (docs/BENCHMARKS.md §7). The cache turns a listing into one Redis read plus one point read per
//! conversation that changed since the last listing.
//!
//! # How it stays correct
//! Two keys per user, in one hash slot (`{user}` tag) so a Redis Cluster keeps them on one master:
//! - the **listing** `zhibo:lc:{user}`: a generation (8 random bytes), a format byte, the build time
//!   and every row, encoded; it expires `max_age` after the full read that built it (merges keep
//!   that TTL);
//! - the **dirty marks** `zhibo:lc:{user}:dirty`: a hash `kind:id → count`, kept alive 10 s longer
//!   than the listing (each mark and each store moves its expiry), so a mark never expires first.
//!
//! This type wraps the backend's [`ConversationStore`] and [`MessageStore`]; after **every** write
//! that can change a conversation row (a send's copies, `record_message`, `join`, `mark_read` and the
//! 1:1 peer's row, `set_settings`, `touch`, `record_gap`, `recall`'s copies, `delete_for_me`) it increments the mark
//! of each row it touched, whether the write succeeded or not (a failed batch may have landed; the
//! one exception is a group recall that fails, whose copies are not known), and only while the user
//! has a listing (a script checks, so users who never list cost one `EVAL` per row and no memory).
//! The mark comes *after* the write returned, so a listing that sees the mark re-reads a row that
//! already holds the change; a send marks before it is delivered or ACKed, so a client that saw a
//! message lists it. The marks run in a task of their own, so a caller that stops waiting (an HTTP
//! request dropped by its client, shutdown) after a write started does not skip them.
//!
//! A listing fetches both keys atomically (one script). With no listing it leaves a placeholder (its
//! own generation, no rows; 10 s), reads the whole partition, and stores the rows only if the
//! placeholder is still its own: marks made during the read land in the dirty hash (the placeholder
//! counts as a listing) and are re-read next time. With a listing and marks it re-reads the marked
//! rows (point reads, concurrently; more than [`MAX_DIRTY`] marks: the whole partition), merges, and
//! stores the result only if the generation it read is still there, decrementing each mark by the
//! count it read: a mark added meanwhile stays and is re-read by the next listing. Two listings racing
//! on one generation: the first one's result is stored, the second serves its own.
//!
//! # What can go stale, and for how long
//! A change whose mark is lost is missing from the cached listing until the listing expires: at most
//! `max_age` (default 60 s, `store.list_cache_secs`, at most a day) after its full read. Marks are
//! lost when the process dies between a write and its mark, when Redis refuses the mark, when a CQL
//! write lands after its mark was consumed (a write that timed out for the client, or a sibling write
//! of a multi-partition write that failed part-way: the backend returns at the first error), when a
//! group recall fails part-way, or when Redis drops the marks but keeps the listing (a failover to a
//! replica that missed the last writes — replication is asynchronous — or eviction under
//! `maxmemory`). A Redis that loses both keys (flush, restart) loses only the cache. Live events
//! (`Message`, `ConversationUpdate`) reach online devices regardless.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Buf as _, BufMut as _, Bytes};
use fred::prelude::{LuaInterface as _, Pool, Value};
use futures::{StreamExt as _, TryStreamExt as _};
use zhibo_proto::client::Message;
use zhibo_proto::ProstMessage as _;

use crate::ids::now_ms;
use crate::redis_seq::{redis_error, redis_failure};
use crate::traits::conversations::list_page;
use crate::{
    sort_for_list, Conversation, ConversationId, ConversationKey, ConversationKind,
    ConversationSettings, ConversationStore, HistoryEntry, HistoryPage, ListQuery, MessageStore,
    RecallRequest, Recalled, Result, SendPlan, SeqGap, Stores,
};

/// More marks than this re-read the whole partition instead of one row each.
pub const MAX_DIRTY: usize = 64;

/// Concurrent point reads of marked rows.
const REREAD_CONCURRENCY: usize = 16;

/// A listing of more rows (or bytes) than this is not cached: it is read from the backend each time.
pub const MAX_ROWS: usize = 5_000;
const MAX_BYTES: usize = 4 << 20;

/// How long a placeholder (a full read in progress) holds the key.
const BUILD_TTL_MS: i64 = 10_000;

/// Fetches the listing and the marks; with no listing, leaves the placeholder `ARGV[1]`.
/// Answers `{1, listing, marks}` or `{0, '', marks}` (placeholder set; `marks` flat field/count).
const FETCH: &str = r"
local v = redis.call('GET', KEYS[1])
local d = redis.call('HGETALL', KEYS[2])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {0, '', d}
end
return {1, v, d}
";

/// Increments the mark `ARGV[1]` while the user has a listing (or a placeholder); the marks live
/// `ARGV[2]` ms longer than the listing, so they never expire before it.
const MARK: &str = r"
local ttl = redis.call('PTTL', KEYS[1])
if ttl ~= -2 then
  redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
  if ttl > 0 then
    redis.call('PEXPIRE', KEYS[2], ttl + tonumber(ARGV[2]))
  end
end
return 0
";

/// If the listing's generation is still `ARGV[1]`: stores `ARGV[2]` (empty: deletes it) with TTL
/// `ARGV[3]` ms (0: keeps the current TTL) and makes the marks outlive it by `ARGV[4]` ms, then
/// decrements the marks `ARGV[5..]` (field, count) and drops those at zero. Answers 1 if stored.
const COMMIT: &str = r"
local cur = redis.call('GET', KEYS[1])
if (not cur) or string.sub(cur, 1, 8) ~= ARGV[1] then
  return 0
end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
elseif ARGV[3] == '0' then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[2], ttl + tonumber(ARGV[4]))
end
for i = 5, #ARGV, 2 do
  local n = redis.call('HGET', KEYS[2], ARGV[i])
  if n then
    if redis.call('HINCRBY', KEYS[2], ARGV[i], -tonumber(ARGV[i + 1])) <= 0 then
      redis.call('HDEL', KEYS[2], ARGV[i])
    end
  end
end
return 1
";

/// The Redis key of `user_id`'s cached listing. The only place the key formats live.
pub fn list_cache_key(user_id: i64) -> String {
    format!("zhibo:lc:{{{user_id}}}")
}

/// The Redis key of `user_id`'s dirty marks (same hash slot as [`list_cache_key`]).
pub fn list_dirty_key(user_id: i64) -> String {
    format!("zhibo:lc:{{{user_id}}}:dirty")
}

fn mark_field(conversation: ConversationId) -> String {
    format!("{}:{}", conversation.kind.as_i32(), conversation.id)
}

fn parse_field(field: &str) -> Option<ConversationId> {
    let (kind, id) = field.split_once(':')?;
    Some(ConversationId {
        kind: ConversationKind::from_i32(kind.parse().ok()?)?,
        id: id.parse().ok()?,
    })
}

/// The conversation store and message store of a CQL backend with the list cache in front.
#[derive(Clone)]
pub struct ListCache {
    conversations: Arc<dyn ConversationStore>,
    messages: Arc<dyn MessageStore>,
    pool: Pool,
    max_age: Duration,
}

impl std::fmt::Debug for ListCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListCache")
            .field("max_age", &self.max_age)
            .finish_non_exhaustive()
    }
}

/// What [`FETCH`] found.
enum Fetched {
    /// A listing (generation, encoded body).
    Listing([u8; 8], Bytes),
    /// None: our placeholder is there now.
    Claimed,
    /// Another listing's full read is in progress.
    Busy,
}

/// One dirty mark as fetched: its field, the row it names (`None`: unreadable, only cleared) and
/// its count.
struct Mark {
    field: String,
    conversation: Option<ConversationId>,
    count: i64,
}

impl ListCache {
    /// Wraps `stores.conversations` and `stores.messages` (which must be the same backend's) with the
    /// cache on `pool`; a listing is rebuilt from the backend at least every `max_age`.
    pub fn wrap(mut stores: Stores, pool: Pool, max_age: Duration) -> Stores {
        let cache = Arc::new(ListCache {
            conversations: stores.conversations.clone(),
            messages: stores.messages.clone(),
            pool,
            max_age,
        });
        stores.conversations = cache.clone();
        stores.messages = cache;
        stores
    }

    /// Every row of `user_id`, sorted for the list: from the cache, the backend, or both.
    async fn rows(&self, user_id: i64) -> Result<Vec<Conversation>> {
        let claim: [u8; 8] = rand::random::<u64>().max(1).to_be_bytes();
        let (fetched, marks) = match self.fetch(user_id, claim).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(user_id, error = %e, "list cache unavailable; reading the backend");
                return self.read_all(user_id).await;
            }
        };
        match fetched {
            Fetched::Busy => self.read_all(user_id).await,
            Fetched::Claimed => {
                let rows = self.read_all(user_id).await?;
                let ttl = i64::try_from(self.max_age.as_millis()).unwrap_or(i64::MAX);
                self.store(user_id, claim, &rows, now_ms(), ttl.max(1), &marks)
                    .await;
                Ok(rows)
            }
            Fetched::Listing(generation, body) => {
                let Some((built_at_ms, mut rows)) = decode(user_id, body) else {
                    tracing::warn!(user_id, "unreadable cached listing; reading the backend");
                    let rows = self.read_all(user_id).await?;
                    self.commit(user_id, generation, Bytes::new(), 0, &marks)
                        .await;
                    return Ok(rows);
                };
                if marks.is_empty() {
                    return Ok(rows);
                }
                if marks.len() > MAX_DIRTY {
                    rows = self.read_all(user_id).await?;
                } else {
                    let marked: Vec<ConversationId> =
                        marks.iter().filter_map(|m| m.conversation).collect();
                    let fresh: Vec<(ConversationId, Option<Conversation>)> =
                        futures::stream::iter(marked)
                            .map(|c| async move {
                                Ok::<_, crate::Error>((
                                    c,
                                    self.conversations.get(user_id, c).await?,
                                ))
                            })
                            .buffer_unordered(REREAD_CONCURRENCY)
                            .try_collect()
                            .await?;
                    let mut by_id: HashMap<ConversationId, Option<Conversation>> =
                        fresh.into_iter().collect();
                    rows.retain_mut(|row| match by_id.remove(&row.conversation) {
                        None => true,
                        Some(Some(new)) => {
                            *row = new;
                            true
                        }
                        Some(None) => false,
                    });
                    rows.extend(by_id.into_values().flatten());
                    sort_for_list(&mut rows);
                }
                self.store(user_id, generation, &rows, built_at_ms, 0, &marks)
                    .await;
                Ok(rows)
            }
        }
    }

    /// Every row from the backend, sorted.
    async fn read_all(&self, user_id: i64) -> Result<Vec<Conversation>> {
        let all = ListQuery {
            changed_after: 0,
            after: None,
            limit: usize::MAX,
        };
        self.conversations.list(user_id, all).await
    }

    async fn fetch(&self, user_id: i64, claim: [u8; 8]) -> Result<(Fetched, Vec<Mark>)> {
        let keys = vec![list_cache_key(user_id), list_dirty_key(user_id)];
        let args: Vec<Value> = vec![
            Value::Bytes(Bytes::copy_from_slice(&claim)),
            BUILD_TTL_MS.into(),
        ];
        let reply: Value = self
            .pool
            .eval(FETCH, keys, args)
            .await
            .map_err(|e| redis_error("list cache", e))?;
        let bad = || redis_failure("list cache", "unexpected reply");
        let Value::Array(parts) = reply else {
            return Err(bad());
        };
        let [found, body, marks] = <[Value; 3]>::try_from(parts).map_err(|_| bad())?;
        let mut dirty = Vec::new();
        if let Value::Array(flat) = marks {
            for pair in flat.chunks(2) {
                let [field, count] = pair else { continue };
                let Some(field) = field.as_str().map(|f| f.to_string()) else {
                    continue;
                };
                let count = count
                    .as_i64()
                    .or_else(|| count.as_str()?.parse().ok())
                    .unwrap_or(0);
                dirty.push(Mark {
                    conversation: parse_field(&field),
                    field,
                    count,
                });
            }
        }
        let fetched = match found.as_i64() {
            Some(0) => Fetched::Claimed,
            _ => {
                let body = match body {
                    Value::Bytes(b) => b,
                    Value::String(s) => s.into_inner(),
                    _ => return Err(bad()),
                };
                match <[u8; 8]>::try_from(body.get(..8).ok_or_else(bad)?) {
                    Ok(generation) if body.len() > 8 => {
                        Fetched::Listing(generation, body.slice(8..))
                    }
                    _ => Fetched::Busy,
                }
            }
        };
        Ok((fetched, dirty))
    }

    /// Stores `rows` in place of generation `generation` (too many: drops the listing instead);
    /// `ttl_ms` 0 keeps the listing's TTL.
    async fn store(
        &self,
        user_id: i64,
        generation: [u8; 8],
        rows: &[Conversation],
        built_at_ms: i64,
        ttl_ms: i64,
        marks: &[Mark],
    ) {
        let body = if rows.len() > MAX_ROWS {
            Bytes::new()
        } else {
            let fresh: [u8; 8] = rand::random::<u64>().max(1).to_be_bytes();
            let body = encode(fresh, built_at_ms, rows);
            if body.len() > MAX_BYTES {
                Bytes::new()
            } else {
                body
            }
        };
        self.commit(user_id, generation, body, ttl_ms, marks).await;
    }

    async fn commit(
        &self,
        user_id: i64,
        generation: [u8; 8],
        body: Bytes,
        ttl_ms: i64,
        marks: &[Mark],
    ) {
        let keys = vec![list_cache_key(user_id), list_dirty_key(user_id)];
        let mut args: Vec<Value> = Vec::with_capacity(4 + 2 * marks.len());
        args.push(Value::Bytes(Bytes::copy_from_slice(&generation)));
        args.push(Value::Bytes(body));
        args.push(ttl_ms.into());
        args.push(BUILD_TTL_MS.into());
        for mark in marks {
            args.push(mark.field.as_str().into());
            args.push(mark.count.into());
        }
        if let Err(e) = self.pool.eval::<Value, _, _, _>(COMMIT, keys, args).await {
            tracing::warn!(user_id, error = %e, "could not store the cached listing");
        }
    }

    /// Runs `write`, then marks `rows` (see the module docs) in a task of their own: a caller that
    /// stops waiting (a dropped HTTP request, shutdown) after the write started still gets its rows
    /// marked. A failed mark is logged: the write stands, the listing may miss it until it expires.
    async fn marked<T>(
        &self,
        rows: Vec<(i64, ConversationId)>,
        write: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let mut guard = MarkOnDrop {
            pool: self.pool.clone(),
            rows,
        };
        let result = write.await;
        let rows = std::mem::take(&mut guard.rows);
        if !rows.is_empty() {
            // A dropped `JoinHandle` does not cancel the task: the marks complete either way.
            let _ = tokio::spawn(mark(self.pool.clone(), rows)).await;
        }
        result
    }
}

/// Marks its rows from a task of their own if dropped before [`ListCache::marked`] took them.
struct MarkOnDrop {
    pool: Pool,
    rows: Vec<(i64, ConversationId)>,
}

impl Drop for MarkOnDrop {
    fn drop(&mut self) {
        if self.rows.is_empty() {
            return;
        }
        let rows = std::mem::take(&mut self.rows);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(mark(self.pool.clone(), rows));
            }
            Err(_) => tracing::warn!("no runtime to mark cached listings stale from"),
        }
    }
}

/// One `EVAL` of [`MARK`] per row, concurrently.
async fn mark(pool: Pool, rows: Vec<(i64, ConversationId)>) {
    let calls = rows.into_iter().map(|(user_id, conversation)| {
        let keys = vec![list_cache_key(user_id), list_dirty_key(user_id)];
        let args: Vec<Value> = vec![mark_field(conversation).into(), BUILD_TTL_MS.into()];
        let pool = &pool;
        async move {
            if let Err(e) = pool.eval::<Value, _, _, _>(MARK, keys, args).await {
                tracing::warn!(user_id, error = %e, "could not mark a cached listing stale");
            }
        }
    });
    futures::future::join_all(calls).await;
}

/// The rows a recorded message touches: every copy's owner's row of its conversation.
fn copies(message: &Message, recipients: &[(i64, u64)]) -> Vec<(i64, ConversationId)> {
    ConversationKey::of_message(message).map_or_else(Vec::new, |key| {
        recipients
            .iter()
            .map(|&(u, _)| (u, key.seen_by(u)))
            .collect()
    })
}

/// The layout [`encode`] writes; a listing of another layout (a rollout of another version) is
/// rebuilt, never misread.
const FORMAT: u8 = 2;

/// `generation | FORMAT | built_at_ms | rows`, each row fixed fields then its last message (prost).
fn encode(generation: [u8; 8], built_at_ms: i64, rows: &[Conversation]) -> Bytes {
    let mut out = Vec::with_capacity(17 + rows.len() * 160);
    out.put_slice(&generation);
    out.put_u8(FORMAT);
    out.put_i64(built_at_ms);
    for row in rows {
        out.put_i32(row.conversation.kind.as_i32());
        out.put_i64(row.conversation.id);
        out.put_u64(row.last_seq);
        out.put_u64(row.read_seq);
        out.put_u64(row.peer_read_seq);
        out.put_u8(u8::from(row.muted) | (u8::from(row.pinned) << 1));
        out.put_u64(row.version);
        // No gap: (0, 0) (a gap starts above a stored seq, so never at 0).
        let gap = row.skipped.map_or((0, 0), |g| (g.from, g.to));
        out.put_u64(gap.0);
        out.put_u64(gap.1);
        match &row.last_message {
            None => out.put_u32(0),
            Some(m) => {
                let len = m.encoded_len();
                out.put_u32(u32::try_from(len + 1).unwrap_or(u32::MAX));
                m.encode(&mut out).expect("a Vec grows");
            }
        }
    }
    Bytes::from(out)
}

/// The inverse of [`encode`] after the generation; `None` if damaged.
fn decode(user_id: i64, mut body: Bytes) -> Option<(i64, Vec<Conversation>)> {
    const FIXED: usize = 4 + 8 + 8 + 8 + 8 + 1 + 8 + 8 + 8 + 4;
    if body.len() < 9 || body.get_u8() != FORMAT {
        return None;
    }
    let built_at_ms = body.get_i64();
    let mut rows = Vec::new();
    while body.has_remaining() {
        if body.remaining() < FIXED {
            return None;
        }
        let kind = ConversationKind::from_i32(body.get_i32())?;
        let id = body.get_i64();
        let last_seq = body.get_u64();
        let read_seq = body.get_u64();
        let peer_read_seq = body.get_u64();
        let flags = body.get_u8();
        let version = body.get_u64();
        let (from, to) = (body.get_u64(), body.get_u64());
        let skipped = (from > 0).then_some(SeqGap { from, to });
        let len = body.get_u32() as usize;
        let last_message = if len == 0 {
            None
        } else {
            let len = len - 1;
            if body.remaining() < len {
                return None;
            }
            Some(Message::decode(body.split_to(len)).ok()?)
        };
        rows.push(Conversation {
            user_id,
            conversation: ConversationId { kind, id },
            last_seq,
            last_message,
            read_seq,
            peer_read_seq,
            muted: flags & 1 != 0,
            pinned: flags & 2 != 0,
            version,
            skipped,
        });
    }
    Some((built_at_ms, rows))
}

#[async_trait]
impl ConversationStore for ListCache {
    async fn record_message(
        &self,
        conv_seq: u64,
        message: &Message,
        recipients: &[(i64, u64)],
    ) -> Result<()> {
        let write = self
            .conversations
            .record_message(conv_seq, message, recipients);
        self.marked(copies(message, recipients), write).await
    }

    async fn last_conversation_seq(&self, key: ConversationKey) -> Result<u64> {
        self.conversations.last_conversation_seq(key).await
    }

    async fn record_gap(&self, key: ConversationKey, users: &[i64], gap: SeqGap) -> Result<()> {
        let rows = users.iter().map(|&u| (u, key.seen_by(u))).collect();
        self.marked(rows, self.conversations.record_gap(key, users, gap))
            .await
    }

    async fn join(
        &self,
        user_id: i64,
        conversation: ConversationId,
        from_seq: u64,
        version: u64,
    ) -> Result<()> {
        let write = self
            .conversations
            .join(user_id, conversation, from_seq, version);
        self.marked(vec![(user_id, conversation)], write).await
    }

    async fn get(
        &self,
        user_id: i64,
        conversation: ConversationId,
    ) -> Result<Option<Conversation>> {
        self.conversations.get(user_id, conversation).await
    }

    async fn list(&self, user_id: i64, query: ListQuery) -> Result<Vec<Conversation>> {
        if query.limit == 0 {
            return Ok(Vec::new());
        }
        Ok(list_page(self.rows(user_id).await?, &query))
    }

    async fn mark_read(
        &self,
        user_id: i64,
        conversation: ConversationId,
        read_seq: u64,
        version: u64,
    ) -> Result<()> {
        let mut rows = vec![(user_id, conversation)];
        if conversation.kind == ConversationKind::Direct {
            // The peer's row learns the position as `peer_read_seq`.
            rows.push((conversation.id, ConversationId::direct(user_id)));
        }
        let write = self
            .conversations
            .mark_read(user_id, conversation, read_seq, version);
        self.marked(rows, write).await
    }

    async fn group_readers(&self, group_id: i64, conv_seq: u64) -> Result<Vec<i64>> {
        self.conversations.group_readers(group_id, conv_seq).await
    }

    async fn set_settings(
        &self,
        user_id: i64,
        conversation: ConversationId,
        settings: ConversationSettings,
        version: u64,
    ) -> Result<()> {
        let write = self
            .conversations
            .set_settings(user_id, conversation, settings, version);
        self.marked(vec![(user_id, conversation)], write).await
    }

    async fn touch(&self, rows: &[(i64, ConversationId, u64)]) -> Result<()> {
        let marks = rows.iter().map(|&(u, c, _)| (u, c)).collect();
        self.marked(marks, self.conversations.touch(rows)).await
    }

    async fn history(
        &self,
        user_id: i64,
        conversation: ConversationId,
        page: HistoryPage,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>> {
        self.conversations
            .history(user_id, conversation, page, limit)
            .await
    }

    async fn recall(
        &self,
        key: ConversationKey,
        conv_seq: u64,
        request: RecallRequest,
    ) -> Result<Recalled> {
        match key {
            // Both rows are known up front: marked whatever the outcome.
            ConversationKey::Direct { low, high } => {
                let rows = vec![(low, key.seen_by(low)), (high, key.seen_by(high))];
                self.marked(rows, self.conversations.recall(key, conv_seq, request))
                    .await
            }
            // A group's copies are known from the answer only. A recall that fails after changing
            // some of them leaves those rows stale in cached lists until they expire (the worker's
            // `touch` of the recipients, after a successful one, marks them again).
            ConversationKey::Group(_) => {
                let recalled = self.conversations.recall(key, conv_seq, request).await?;
                let rows = recalled
                    .recipients
                    .iter()
                    .map(|&(u, _)| (u, key.seen_by(u)))
                    .collect();
                self.marked(rows, async { Ok::<(), crate::Error>(()) })
                    .await?;
                Ok(recalled)
            }
        }
    }

    async fn delete_for_me(
        &self,
        user_id: i64,
        conversation: ConversationId,
        conv_seq: u64,
        version: u64,
    ) -> Result<()> {
        let write = self
            .conversations
            .delete_for_me(user_id, conversation, conv_seq, version);
        self.marked(vec![(user_id, conversation)], write).await
    }
}

#[async_trait]
impl MessageStore for ListCache {
    async fn append(&self, user_id: i64, message: &Message) -> Result<()> {
        self.messages.append(user_id, message).await
    }

    async fn append_many(&self, entries: &[(i64, Message)]) -> Result<()> {
        self.messages.append_many(entries).await
    }

    async fn sync(&self, user_id: i64, after_seq: u64, limit: usize) -> Result<Vec<Message>> {
        self.messages.sync(user_id, after_seq, limit).await
    }

    async fn max_seq(&self, user_id: i64) -> Result<u64> {
        self.messages.max_seq(user_id).await
    }

    async fn get_dedup(&self, device_id: i64, client_msg_id: &str) -> Result<Option<SendPlan>> {
        self.messages.get_dedup(device_id, client_msg_id).await
    }

    async fn put_dedup_if_absent(
        &self,
        device_id: i64,
        client_msg_id: &str,
        result: &SendPlan,
    ) -> Result<Option<SendPlan>> {
        self.messages
            .put_dedup_if_absent(device_id, client_msg_id, result)
            .await
    }

    async fn record_send(
        &self,
        device_id: i64,
        client_msg_id: &str,
        plan: &SendPlan,
        entries: &[(i64, Message)],
    ) -> Result<Option<SendPlan>> {
        let write = self
            .messages
            .record_send(device_id, client_msg_id, plan, entries);
        self.marked(entry_rows(plan, entries), write).await
    }

    async fn record_claimed_send(
        &self,
        device_id: i64,
        client_msg_id: &str,
        plan: &SendPlan,
        entries: &[(i64, Message)],
    ) -> Result<Option<SendPlan>> {
        let write = self
            .messages
            .record_claimed_send(device_id, client_msg_id, plan, entries);
        self.marked(entry_rows(plan, entries), write).await
    }

    async fn ack(&self, user_id: i64, device_id: i64, seq: u64) -> Result<()> {
        self.messages.ack(user_id, device_id, seq).await
    }

    async fn acked(&self, user_id: i64, device_id: i64) -> Result<u64> {
        self.messages.acked(user_id, device_id).await
    }
}

/// A send's copies' rows (conversation rows are written only with a conversation seq).
fn entry_rows(plan: &SendPlan, entries: &[(i64, Message)]) -> Vec<(i64, ConversationId)> {
    if plan.conv_seq == 0 {
        return Vec::new();
    }
    entries
        .iter()
        .filter_map(|(u, m)| ConversationKey::of_message(m).map(|key| (*u, key.seen_by(*u))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_survive_encoding() {
        let rows = vec![
            Conversation {
                user_id: 7,
                conversation: ConversationId::direct(9),
                last_seq: 3,
                last_message: Some(Message {
                    seq: 12,
                    content: Bytes::from_static(b"hi"),
                    server_time_ms: 5,
                    ..Message::default()
                }),
                read_seq: 2,
                peer_read_seq: 1,
                muted: true,
                pinned: false,
                version: 12,
                skipped: Some(SeqGap { from: 4, to: 1_003 }),
            },
            Conversation {
                user_id: 7,
                conversation: ConversationId::group(-4),
                last_seq: 0,
                last_message: None,
                read_seq: 0,
                peer_read_seq: 0,
                muted: false,
                pinned: true,
                version: 1,
                skipped: None,
            },
        ];
        let body = encode([1; 8], 99, &rows);
        let (built, back) = decode(7, body.slice(8..)).expect("decodes");
        assert_eq!((built, back), (99, rows));
        // Truncated anywhere: refused, never a panic.
        for cut in 9..body.len() - 1 {
            let _ = decode(7, body.slice(8..cut));
        }
        assert!(decode(7, body.slice(8..body.len() - 1)).is_none());
        // Another layout (a rollout of another version) is rebuilt, never misread.
        let mut other = body.to_vec();
        other[8] = FORMAT + 1;
        assert!(decode(7, Bytes::from(other).slice(8..)).is_none());
    }

    #[test]
    fn mark_fields_round_trip() {
        for c in [ConversationId::direct(-3), ConversationId::group(i64::MAX)] {
            assert_eq!(parse_field(&mark_field(c)), Some(c));
        }
        assert_eq!(parse_field("x:1"), None);
        assert_eq!(parse_field("9:1"), None);
    }
}
