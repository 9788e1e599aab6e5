//! [`LogicConfig`]: the logic worker's settings and their checks.

use serde::Deserialize;

/// Logic worker configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogicConfig {
    /// Let any user message any user; when false, 1:1 messages need friendship.
    pub allow_strangers: bool,
    /// Messages per sync page when the client asks for 0.
    pub sync_page: u32,
    /// Largest sync page a client may ask for.
    pub max_sync_page: u32,
    /// Largest message content, bytes.
    pub max_content: usize,
    /// Largest sync, conversation-list or history page, bytes: below the gateway's `max_frame` so a page
    /// always fits in one frame.
    pub max_sync_bytes: usize,
    /// Longest client_msg_id, bytes.
    pub max_client_msg_id: usize,
    /// Commands handled at once by one worker.
    pub concurrency: usize,
    /// Node number for message ids (512–1023). Unset (the default): leased from the store's pool
    /// (0–511), unique cluster-wide while held (see `zhibo_store::ids`). Set: no lease is taken; numbers
    /// from 512 up are never leased, so the operator only promises that no two configured workers share
    /// one.
    pub node_id: Option<u64>,
    /// Largest room message content, bytes (danmaku are short; a frame batches many of them).
    pub max_room_content: usize,
    /// Room messages kept per room for late joiners.
    pub room_recent: usize,
    /// How long after sending it a user may recall their own 1:1 or group message, seconds (group
    /// owners and admins may recall any message, without a window).
    pub recall_window_secs: u64,
    /// How long the send path trusts what it read for authorization, seconds (0: reads it for every
    /// message): 1:1 "the receiver exists" and "these two are friends", and a group's member list. An
    /// ended friendship is dropped at once everywhere by an event, a membership change by its version
    /// and an event; this bounds only a change that reached neither.
    pub authz_cache_secs: u64,
    /// Write the dedup plan of a send marked `first_attempt` with a plain insert when its Redis claim
    /// holds (no compare-and-set in the database). Set false while workers older than this option still
    /// serve the cluster (a rolling upgrade): they do not read a plan from a claim, so a resend landing
    /// on one while its first attempt is still writing could be stored twice. Then set it true.
    pub claimed_plans: bool,
}

impl Default for LogicConfig {
    fn default() -> Self {
        LogicConfig {
            allow_strangers: false,
            sync_page: 100,
            max_sync_page: 500,
            max_content: 32 * 1024,
            max_sync_bytes: 56 * 1024,
            max_client_msg_id: 64,
            concurrency: 256,
            node_id: None,
            max_room_content: 4096,
            room_recent: 50,
            recall_window_secs: 120,
            authz_cache_secs: 60,
            claimed_plans: true,
        }
    }
}

impl LogicConfig {
    /// Checks the values.
    ///
    /// # Errors
    /// A message naming the bad field.
    pub fn validate(&self) -> Result<(), String> {
        if self.sync_page == 0 || self.sync_page > self.max_sync_page {
            return Err("sync_page must be between 1 and max_sync_page".into());
        }
        if self.max_sync_bytes < self.max_content + 1024 {
            return Err(
                "max_sync_bytes must exceed max_content by 1 KiB (a page holds one message)".into(),
            );
        }
        if self.concurrency == 0 {
            return Err("concurrency must be at least 1".into());
        }
        // 0..512 are leased (see `zhibo_store::Pool::Messages`): a configured number must be one no
        // leasing process can hold.
        if self.node_id.is_some_and(|n| !(512..=1023).contains(&n)) {
            return Err("node_id must be 512..=1023 (0..=511 are leased automatically)".into());
        }
        if self.max_room_content > 60 * 1024 {
            return Err("max_room_content must be at most 60 KiB (one frame must hold it)".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configured node number comes from the half of the pool that is never leased, so a worker with
    /// `node_id` set and a leasing process can never mint with the same number.
    #[test]
    fn a_configured_node_id_is_outside_the_leased_numbers() {
        let leased = zhibo_store::leases::Pool::Messages.size();
        for n in [0, 1, 5, u64::from(leased) - 1, 1024] {
            let c = LogicConfig {
                node_id: Some(n),
                ..LogicConfig::default()
            };
            assert!(c.validate().is_err(), "node_id {n} accepted");
        }
        for n in [u64::from(leased), 1023] {
            let c = LogicConfig {
                node_id: Some(n),
                ..LogicConfig::default()
            };
            assert_eq!(c.validate(), Ok(()), "node_id {n}");
        }
        assert_eq!(leased, 512);
    }
}
