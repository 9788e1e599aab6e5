//! [`Presence`] backends: [`MemoryPresence`] (embedded mode: the one process's gateway) and
//! [`RedisPresence`] (distributed: every gateway's online users in Redis, with a TTL per gateway).
//!
//! # Redis layout
//! One hash per user, `<prefix>:presence:<user_id>`, field = gateway id, value = the ms timestamp until
//! which that gateway vouches for the user. A gateway writes the field when the user's first connection
//! registers there (`HSET` + `PEXPIRE` of the key, awaited before the sign-in completes), deletes it with
//! the user's last connection, and rewrites the fields of all its users every `ttl / 3` in one pipeline.
//! A dead gateway stops refreshing: its fields count as offline once their timestamp passes, and the
//! key itself expires after `2 × ttl` without refreshes. The reader sends one `HVALS` per recipient in
//! one pipeline and calls a user online when any value is in the future.
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
    ReconnectPolicy,
};
use tracing::warn;

use crate::ids::now_ms;
use crate::{Error, ErrorKind, Presence, PresenceListener, Result};

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
    async fn connected(&self, gateway_id: &str, user_id: i64) {
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

    async fn online(&self, users: &[i64]) -> Result<Vec<bool>> {
        let online = self.lock();
        Ok(users.iter().map(|u| online.contains_key(u)).collect())
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
    /// Itself, for the tasks of [`Presence::disconnected`].
    me: Weak<RedisPresence>,
    /// Told of transitions ([`Presence::watch`]).
    listener: OnceLock<PresenceListener>,
}

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
        let presence = Arc::new_cyclic(|me| RedisPresence {
            pool,
            prefix: prefix.to_owned(),
            ttl,
            local: Mutex::new(HashSet::new()),
            me: me.clone(),
            listener: OnceLock::new(),
        });
        tokio::spawn(refresh_loop(Arc::downgrade(&presence), ttl / 3));
        Ok(presence)
    }

    /// The Redis key of `user_id`'s presence hash. The only place the key format lives.
    pub fn key(&self, user_id: i64) -> String {
        format!("{}:presence:{user_id}", self.prefix)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<(String, i64)>> {
        self.local
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn ttl_ms(&self) -> i64 {
        i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX)
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

/// Rewrites every local pair every `every`, until the presence is dropped.
async fn refresh_loop(presence: Weak<RedisPresence>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(presence) = presence.upgrade() else {
            return;
        };
        let pairs: Vec<(String, i64)> = presence.lock().iter().cloned().collect();
        for chunk in pairs.chunks(1000) {
            if let Err(e) = presence.write(chunk).await {
                warn!(error = %e, "presence refresh failed");
                break;
            }
        }
    }
}

#[async_trait]
impl Presence for RedisPresence {
    async fn connected(&self, gateway_id: &str, user_id: i64) {
        let pair = (gateway_id.to_owned(), user_id);
        self.lock().insert(pair.clone());
        let Some(listener) = self.listener.get() else {
            if let Err(e) = self.write(&[pair]).await {
                warn!(user_id, error = %e, "presence write failed");
            }
            return;
        };
        // Read before the write: nobody else live means this connection makes the user online.
        let elsewhere = self.live_elsewhere(user_id, Some(gateway_id)).await;
        if let Err(e) = self.write(&[pair]).await {
            warn!(user_id, error = %e, "presence write failed");
        }
        match elsewhere {
            Ok(false) => listener(user_id, true),
            Ok(true) => {}
            Err(e) => warn!(user_id, error = %e, "presence read failed; no user.online event"),
        }
    }

    fn disconnected(&self, gateway_id: &str, user_id: i64) {
        let pair = (gateway_id.to_owned(), user_id);
        self.lock().remove(&pair);
        let Some(me) = self.me.upgrade() else { return };
        tokio::spawn(async move {
            let deleted: std::result::Result<i64, _> =
                me.pool.hdel(me.key(user_id), pair.0.as_str()).await;
            if let Err(e) = deleted {
                warn!(user_id, error = %e, "presence delete failed; it expires with the TTL");
            }
            // A new connection of the user registered here while the delete was in flight: its field
            // may have been written before the delete landed, so write it again.
            if me.lock().contains(&pair) {
                if let Err(e) = me.write(&[pair]).await {
                    warn!(user_id, error = %e, "presence write failed");
                }
                return;
            }
            if let Some(listener) = me.listener.get() {
                match me.live_elsewhere(user_id, None).await {
                    Ok(false) => listener(user_id, false),
                    Ok(true) => {}
                    Err(e) => {
                        warn!(user_id, error = %e, "presence read failed; no user.offline event");
                    }
                }
            }
        });
    }

    async fn online(&self, users: &[i64]) -> Result<Vec<bool>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let pipeline = self.pool.next().pipeline();
        for user in users {
            let () = pipeline
                .hvals(self.key(*user))
                .await
                .map_err(|e| redis_error("hvals", e))?;
        }
        let now = now_ms();
        pipeline
            .try_all::<Vec<i64>>()
            .await
            .into_iter()
            .map(|r| {
                r.map(|until| until.iter().any(|u| *u > now))
                    .map_err(|e| redis_error("hvals", e))
            })
            .collect()
    }

    fn watch(&self, listener: PresenceListener) {
        let _ = self.listener.set(listener);
    }
}
