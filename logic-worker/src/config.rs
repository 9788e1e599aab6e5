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
    /// Largest sync page, bytes: below the gateway's `max_frame` so a page always fits in one frame.
    pub max_sync_bytes: usize,
    /// Longest client_msg_id, bytes.
    pub max_client_msg_id: usize,
    /// Commands handled at once by one worker.
    pub concurrency: usize,
    /// Node number for message ids (0–1023). Unset (the default): leased from the store's pool of 1024,
    /// unique cluster-wide while held (see `zhibo_store::ids`). Set: the operator promises no other
    /// process mints with this number, ever at the same time (no lease is taken).
    pub node_id: Option<u64>,
    /// Largest room message content, bytes (danmaku are short; a frame batches many of them).
    pub max_room_content: usize,
    /// Room messages kept per room for late joiners.
    pub room_recent: usize,
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
        if self.node_id.is_some_and(|n| n > 1023) {
            return Err("node_id must be 0..=1023".into());
        }
        if self.max_room_content > 60 * 1024 {
            return Err("max_room_content must be at most 60 KiB (one frame must hold it)".into());
        }
        Ok(())
    }
}
