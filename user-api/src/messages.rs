//! Message sending over HTTP: `POST /v1/messages` (as the caller's device) and `POST /v1/admin/messages`
//! (on behalf of a user, as a server-side send), both through [`zhibo_logic::Logic::send_message`].

use axum::extract::State;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use zhibo_logic::LogicError;
use zhibo_proto::bus::Origin;
use zhibo_proto::client::{ErrorCode, ReceiverType, SendMessageInput};

use crate::accounts::user_not_found;
use crate::auth::{Admin, Caller};
use crate::error::{ApiError, ApiJson};
use crate::state::AppState;

/// Who receives a message.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Receiver {
    User,
    Group,
}

/// A message sent on behalf of `from_user_id` (no friendship needed).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AdminSendMessage {
    from_user_id: i64,
    receiver_type: Receiver,
    receiver_id: i64,
    /// Unique among server-side sends (they all count as device 0), e.g. a UUID; a resend with the same id
    /// returns the first result with `duplicate: true`.
    client_msg_id: String,
    /// Application-defined, 0 or more (negative types are zhibo's: tombstones and room notices).
    #[serde(default)]
    content_type: i32,
    /// The message bytes, standard base64 (with padding).
    content: String,
}

/// A message to a user or a group.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SendMessage {
    receiver_type: Receiver,
    receiver_id: i64,
    /// Unique per sending device; a resend with the same id returns the first result with `duplicate: true`.
    client_msg_id: String,
    /// Application-defined, 0 or more (negative types are zhibo's: tombstones and room notices).
    #[serde(default)]
    content_type: i32,
    /// The message bytes, standard base64 (with padding).
    content: String,
}

/// The stored message.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct MessageSent {
    /// A u64, as a string: it does not fit a JavaScript number.
    message_id: String,
    /// The sender's inbox seq of this message.
    seq: u64,
    server_time_ms: i64,
    /// True when this answers a resend of an already-stored `client_msg_id`.
    duplicate: bool,
    /// The message's conversation seq: what read receipts, recall and history pages use.
    conv_seq: u64,
    /// True when the app backend's before-send hook replaced the content.
    content_replaced: bool,
    /// The stored content (standard base64), only when `content_replaced`.
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<String>,
}

pub(crate) async fn admin_send_message(
    State(st): State<AppState>,
    _admin: Admin,
    ApiJson(req): ApiJson<AdminSendMessage>,
) -> Result<ApiJson<MessageSent>, ApiError> {
    if st.stores.users.get_user(req.from_user_id).await?.is_none() {
        return Err(user_not_found());
    }
    // Device 0 marks a server-side send (no friendship check); an empty gateway id means no reply packet.
    let message = SendMessage {
        receiver_type: req.receiver_type,
        receiver_id: req.receiver_id,
        client_msg_id: req.client_msg_id,
        content_type: req.content_type,
        content: req.content,
    };
    send(&st, req.from_user_id, 0, message).await
}

pub(crate) async fn send_message(
    State(st): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<SendMessage>,
) -> Result<ApiJson<MessageSent>, ApiError> {
    send(&st, caller.user_id, caller.device_id, req).await
}

async fn send(
    st: &AppState,
    user_id: i64,
    device_id: i64,
    req: SendMessage,
) -> Result<ApiJson<MessageSent>, ApiError> {
    let content = STANDARD
        .decode(req.content.as_bytes())
        .map_err(|_| ApiError::invalid("content must be standard base64"))?;
    let receiver_type = match req.receiver_type {
        Receiver::User => ReceiverType::User,
        Receiver::Group => ReceiverType::Group,
    };
    let origin = Origin {
        user_id,
        device_id,
        gateway_id: String::new(),
        conn_id: 0,
    };
    let input = SendMessageInput {
        receiver_type: receiver_type as i32,
        receiver_id: req.receiver_id,
        client_msg_id: req.client_msg_id,
        content_type: req.content_type,
        content: content.into(),
        ..Default::default()
    };
    let out = st
        .logic
        .send_message(&origin, &input)
        .await
        .map_err(|e| logic_error(e, receiver_type))?;
    Ok(ApiJson(MessageSent {
        message_id: out.message_id.to_string(),
        seq: out.seq,
        server_time_ms: out.server_time_ms,
        duplicate: out.duplicate,
        conv_seq: out.conv_seq,
        content_replaced: out.content_replaced,
        content: out.content_replaced.then(|| STANDARD.encode(&out.content)),
    }))
}

/// The one mapping of a pipeline refusal to an HTTP error, for every send user-api makes through
/// [`zhibo_logic::Logic`] (user and group messages here, room messages and broadcasts in `rooms`).
/// `receiver` says what a `NOT_FOUND` was about.
pub(crate) fn logic_error(e: LogicError, receiver: ReceiverType) -> ApiError {
    match e.code {
        ErrorCode::NotFound if receiver == ReceiverType::Group => {
            ApiError::not_found("group_not_found", "no such group")
        }
        ErrorCode::NotFound => user_not_found(),
        ErrorCode::NotFriends => ApiError::forbidden("not_friends", e.message),
        ErrorCode::NotGroupMember => ApiError::forbidden("not_group_member", e.message),
        ErrorCode::InvalidArgument => ApiError::invalid(e.message),
        ErrorCode::RateLimited => ApiError::rate_limited(1),
        ErrorCode::HookRejected => ApiError::hook_rejected(e.hook_code, e.message),
        // The pipeline's text is for the client: it says which retry is safe.
        ErrorCode::Unavailable => ApiError::unavailable_with(e.message.clone(), e),
        _ => ApiError::internal(e),
    }
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;

    use super::*;

    async fn answer_body(e: LogicError, receiver: ReceiverType) -> (StatusCode, serde_json::Value) {
        let response = logic_error(e, receiver).into_response();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .expect("body");
        (status, serde_json::from_slice(&body).expect("json"))
    }

    async fn answer(code: ErrorCode, receiver: ReceiverType) -> (StatusCode, String) {
        let e = LogicError {
            code,
            message: "detail".into(),
            hook_code: 0,
        };
        let (status, body) = answer_body(e, receiver).await;
        (
            status,
            body["error"]["code"].as_str().expect("code").to_owned(),
        )
    }

    #[tokio::test]
    async fn a_hook_rejection_carries_the_backends_code_and_text() {
        let e = LogicError {
            code: ErrorCode::HookRejected,
            message: "no links".into(),
            hook_code: 4001,
        };
        let (status, body) = answer_body(e, ReceiverType::User).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(
            body,
            serde_json::json!({"error": {"code": "hook_rejected", "message": "no links", "hook_code": 4001}})
        );
        // Other errors have no hook_code; an unavailable send says which retry is safe.
        let e = LogicError {
            code: ErrorCode::Unavailable,
            message: "message check unavailable; retry with the same client_msg_id".into(),
            hook_code: 0,
        };
        let (status, body) = answer_body(e, ReceiverType::User).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body,
            serde_json::json!({"error": {"code": "unavailable",
                "message": "message check unavailable; retry with the same client_msg_id"}})
        );
    }

    #[tokio::test]
    async fn pipeline_refusals_map_to_stable_http_errors() {
        use ReceiverType::{Group, Room, User};
        let cases = [
            (ErrorCode::NotFound, User, 404, "user_not_found"),
            (ErrorCode::NotFound, Group, 404, "group_not_found"),
            (ErrorCode::NotFriends, User, 403, "not_friends"),
            (ErrorCode::NotGroupMember, Group, 403, "not_group_member"),
            (ErrorCode::InvalidArgument, Room, 400, "invalid_argument"),
            (ErrorCode::RateLimited, User, 429, "rate_limited"),
            (ErrorCode::HookRejected, Group, 403, "hook_rejected"),
            (ErrorCode::Unavailable, Room, 503, "unavailable"),
            (ErrorCode::Internal, Group, 500, "internal"),
        ];
        for (code, receiver, status, api_code) in cases {
            let got = answer(code, receiver).await;
            assert_eq!(
                (got.0.as_u16(), got.1.as_str()),
                (status, api_code),
                "{code:?} to {receiver:?}"
            );
        }
    }
}
