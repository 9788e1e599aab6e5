//! Message ids: a configured node number, or one leased from the store's pool (no id without a valid lease).

use zhibo_store::ids::IdGen;
use zhibo_store::leases::{LeaseTiming, LeasedIds, Pool};
use zhibo_store::Stores;

use crate::{Logic, LogicError, Op};

/// Where message ids come from.
pub(crate) enum MessageIds {
    /// A configured node number.
    Fixed(IdGen),
    /// A leased node number: no id without a valid lease.
    Leased(LeasedIds),
}

impl MessageIds {
    /// Ids with the configured `node_id`, or else from a node number leased from `stores.leases` in the
    /// background (call inside a tokio runtime).
    pub(crate) fn new(stores: &Stores, node_id: Option<u64>) -> Self {
        match node_id {
            Some(node) => MessageIds::Fixed(IdGen::messages(node)),
            None => MessageIds::Leased(LeasedIds::start(
                stores.leases.clone(),
                Pool::Messages,
                LeaseTiming::default(),
            )),
        }
    }
}

impl Logic {
    /// Gives back the leased node number (at shutdown, once nothing sends any more); a no-op with a
    /// configured `node_id`.
    pub async fn release_ids(&self) {
        if let MessageIds::Leased(ids) = &self.ids {
            ids.release().await;
        }
    }

    /// A new message id for `op`.
    pub(crate) async fn next_id(&self, op: Op) -> Result<u64, LogicError> {
        match &self.ids {
            MessageIds::Fixed(gen) => Ok(gen.next()),
            MessageIds::Leased(ids) => ids.next().await.map_err(|e| LogicError::store(op, &e)),
        }
    }
}
