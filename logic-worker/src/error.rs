//! [`LogicError`]: what a refused or failed command answers, and how a store failure maps to it per [`Op`].

use tracing::{error, warn};
use zhibo_proto::client::ErrorCode;

/// A refused or failed command, answered to the client as an Error packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct LogicError {
    /// Wire error code.
    pub code: ErrorCode,
    /// Text for the client.
    pub message: String,
    /// With [`ErrorCode::HookRejected`]: the app backend's own code (0 otherwise).
    pub hook_code: i32,
}

impl LogicError {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        LogicError {
            code,
            message: message.into(),
            hook_code: 0,
        }
    }

    /// The Error packet answering `request_id` with this error.
    pub fn packet(self, request_id: u64) -> zhibo_proto::client::Packet {
        use zhibo_proto::client::{packet::Body, Error, Packet};
        Packet::new(
            request_id,
            Body::Error(Error {
                code: self.code as i32,
                message: self.message,
                hook_code: self.hook_code,
            }),
        )
    }
}

/// The command a store failure interrupted: what the client should do next depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Op {
    /// An IM send (user or group): deduplicated, so a resend is safe.
    Send,
    /// A sync page.
    Sync,
    /// A message ack.
    Ack,
    /// A room send (no dedup: a retry may publish twice).
    RoomSend,
    /// A conversation request (list, history, read, recall, settings...): safe to retry.
    Conversation,
}

impl LogicError {
    /// The client-facing error for a store failure during `op`, by what is true of it: a transient
    /// backend failure ([`zhibo_store::ErrorKind::Unavailable`]) is `UNAVAILABLE` with the retry that is
    /// safe for `op`; anything else (corrupt stored data, an answer the pipeline cannot explain) is
    /// `INTERNAL`, which retrying does not fix. The cause is logged here, never sent.
    pub fn store(op: Op, e: &zhibo_store::Error) -> Self {
        use zhibo_store::ErrorKind;
        match e.kind {
            ErrorKind::Unavailable => {
                warn!(?op, error = %e, "store unavailable");
                let text = match op {
                    Op::Send => "storage unavailable; retry with the same client_msg_id",
                    Op::Sync => "storage unavailable; retry the sync",
                    Op::Ack => "storage unavailable; retry the ack",
                    Op::RoomSend | Op::Conversation => "storage unavailable; retry",
                };
                LogicError::new(ErrorCode::Unavailable, text)
            }
            ErrorKind::Corrupt => {
                error!(?op, error = %e, "corrupt stored data");
                LogicError::new(
                    ErrorCode::Internal,
                    "stored data could not be read; retrying will not help",
                )
            }
            _ => {
                error!(?op, error = %e, "unexpected store error");
                LogicError::new(ErrorCode::Internal, "internal error")
            }
        }
    }
}

pub(crate) fn send_err(e: zhibo_store::Error) -> LogicError {
    LogicError::store(Op::Send, &e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use zhibo_store::{Error as StoreError, ErrorKind};

    #[test]
    fn store_errors_say_what_is_true_per_kind_and_command() {
        let down = StoreError::new(ErrorKind::Unavailable, "connection refused");
        let send = LogicError::store(Op::Send, &down);
        assert_eq!(send.code, ErrorCode::Unavailable);
        assert!(send.message.contains("same client_msg_id"), "{send}");
        let sync = LogicError::store(Op::Sync, &down);
        assert_eq!(sync.code, ErrorCode::Unavailable);
        assert!(sync.message.contains("retry the sync"), "{sync}");
        assert!(!sync.message.contains("client_msg_id"), "{sync}");
        let ack = LogicError::store(Op::Ack, &down);
        assert_eq!(ack.code, ErrorCode::Unavailable);
        assert!(!ack.message.contains("client_msg_id"), "{ack}");
        let room = LogicError::store(Op::RoomSend, &down);
        assert!(!room.message.contains("client_msg_id"), "{room}");

        let corrupt = StoreError::new(ErrorKind::Corrupt, "inbox message: invalid wire type");
        for op in [Op::Send, Op::Sync, Op::Ack, Op::RoomSend] {
            let e = LogicError::store(op, &corrupt);
            assert_eq!(e.code, ErrorCode::Internal, "{op:?}");
            assert!(!e.message.contains("retry with"), "{e}");
            assert!(!e.message.contains("wire type"), "no internals leak: {e}");
        }
        let odd = StoreError::new(ErrorKind::Conflict, "taken");
        assert_eq!(LogicError::store(Op::Send, &odd).code, ErrorCode::Internal);
    }
}
