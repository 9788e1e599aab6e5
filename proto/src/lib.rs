//! # Layout
//! - [`client`]: the packets apps exchange with a gateway (generated from `proto/zhibo/v1/client.proto`).
//! - [`bus`]: the envelope gateways, logic workers and user-api exchange over NATS.
//! - [`codec`]: the TCP/QUIC frame codec, a u32 length prefix under prost.
//!
//! Helpers on [`client::Packet`] build the common replies so every transport answers alike.
#![warn(missing_docs)]

pub mod codec;

/// Generated code, nested as the protobuf packages are so cross-package references resolve.
#[allow(missing_docs, unreachable_pub, clippy::all)]
mod pb {
    pub mod zhibo {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/zhibo.v1.rs"));
        }
        pub mod bus {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/zhibo.bus.v1.rs"));
            }
        }
    }
}

/// Client wire protocol, package `zhibo.v1`.
pub use pb::zhibo::v1 as client;

/// Internal bus envelope, package `zhibo.bus.v1`.
pub use pb::zhibo::bus::v1 as bus;

pub use prost::Message as ProstMessage;

use client::packet::Body;
use client::{ErrorCode, Packet};

impl Packet {
    /// A packet with the given request id and body.
    pub fn new(request_id: u64, body: Body) -> Self {
        Packet {
            request_id,
            body: Some(body),
        }
    }

    /// An Error packet answering `request_id`.
    pub fn error(request_id: u64, code: ErrorCode, message: impl Into<String>) -> Self {
        Packet::new(
            request_id,
            Body::Error(client::Error {
                code: code as i32,
                message: message.into(),
                hook_code: 0,
            }),
        )
    }

    /// The packet's kind as a short static name, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match &self.body {
            None => "empty",
            Some(Body::SignIn(_)) => "sign_in",
            Some(Body::SignInOutput(_)) => "sign_in_output",
            Some(Body::Sync(_)) => "sync",
            Some(Body::SyncOutput(_)) => "sync_output",
            Some(Body::Heartbeat(_)) => "heartbeat",
            Some(Body::Message(_)) => "message",
            Some(Body::MessageAck(_)) => "message_ack",
            Some(Body::SendMessage(_)) => "send_message",
            Some(Body::SendMessageOutput(_)) => "send_message_output",
            Some(Body::SubscribeRoom(_)) => "subscribe_room",
            Some(Body::SubscribeRoomOutput(_)) => "subscribe_room_output",
            Some(Body::UnsubscribeRoom(_)) => "unsubscribe_room",
            Some(Body::RoomMessages(_)) => "room_messages",
            Some(Body::Kick(_)) => "kick",
            Some(Body::GoAway(_)) => "go_away",
            Some(Body::Error(_)) => "error",
            Some(Body::RoomKicked(_)) => "room_kicked",
            Some(Body::ConversationList(_)) => "conversation_list",
            Some(Body::ConversationListOutput(_)) => "conversation_list_output",
            Some(Body::History(_)) => "history",
            Some(Body::HistoryOutput(_)) => "history_output",
            Some(Body::MarkRead(_)) => "mark_read",
            Some(Body::Recall(_)) => "recall",
            Some(Body::DeleteForMe(_)) => "delete_for_me",
            Some(Body::ConversationSettings(_)) => "conversation_settings",
            Some(Body::GroupReaders(_)) => "group_readers",
            Some(Body::GroupReadersOutput(_)) => "group_readers_output",
            Some(Body::TypingInput(_)) => "typing_input",
            Some(Body::Typing(_)) => "typing",
            Some(Body::ConversationUpdate(_)) => "conversation_update",
            Some(Body::ReadReceipt(_)) => "read_receipt",
            Some(Body::Recalled(_)) => "recalled",
        }
    }
}
