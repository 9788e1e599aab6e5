//! Conversations over HTTP (issue #13): the list, history, mark read, mute/pin, recall, delete-for-me
//! and group readers, each through the same [`zhibo_logic::Logic`] call the client packets use (live
//! notices included), with the pipeline's refusals mapped to stable HTTP codes here.

use axum::extract::State;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use zhibo_logic::LogicError;
use zhibo_proto::bus::Origin;
use zhibo_proto::client::{
    self as pb, ConversationListInput, ConversationRef, ConversationSettingsInput,
    ConversationUpdate, DeleteForMeInput, ErrorCode, GroupReadersInput, HistoryInput,
    MarkReadInput, RecallInput, ReceiverType,
};

use crate::auth::Caller;
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use crate::messages::Receiver;
use crate::state::AppState;

/// A pipeline refusal of a conversation request as an HTTP error.
fn conversation_error(e: LogicError) -> ApiError {
    match e.code {
        ErrorCode::NotInConversation => ApiError::not_found("not_in_conversation", e.message),
        ErrorCode::NotFound => ApiError::not_found("not_found", e.message),
        ErrorCode::OutOfRange => ApiError::conflict("out_of_range", e.message),
        ErrorCode::AlreadyRecalled => ApiError::conflict("already_recalled", e.message),
        ErrorCode::NotAllowed => ApiError::forbidden("not_allowed", e.message),
        ErrorCode::TooLate => ApiError::forbidden("too_late", e.message),
        _ => crate::messages::logic_error(e, ReceiverType::User),
    }
}

fn origin(caller: &Caller) -> Origin {
    Origin {
        user_id: caller.user_id,
        device_id: caller.device_id,
        gateway_id: String::new(),
        conn_id: 0,
    }
}

/// `user` + a peer's user id or `group` + a group id.
fn conversation(kind: &str, id: i64) -> Result<ConversationRef, ApiError> {
    let r#type = match kind {
        "user" => ReceiverType::User,
        "group" => ReceiverType::Group,
        _ => return Err(ApiError::invalid("conversation type must be user or group")),
    };
    Ok(ConversationRef {
        r#type: r#type as i32,
        id,
    })
}

fn receiver(r#type: i32) -> Receiver {
    if r#type == ReceiverType::Group as i32 {
        Receiver::Group
    } else {
        Receiver::User
    }
}

/// A message as the caller's copy.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct MessageView {
    /// A u64, as a string: it does not fit a JavaScript number.
    message_id: String,
    /// The caller's inbox seq of this copy.
    seq: u64,
    /// The message's position in its conversation.
    conv_seq: u64,
    sender_user_id: i64,
    receiver_type: Receiver,
    receiver_id: i64,
    client_msg_id: String,
    server_time_ms: i64,
    /// Application-defined; -10 = recalled, -11 = deleted for the caller (no content).
    content_type: i32,
    /// Standard base64.
    content: String,
}

impl From<pb::Message> for MessageView {
    fn from(m: pb::Message) -> Self {
        MessageView {
            message_id: m.message_id.to_string(),
            seq: m.seq,
            conv_seq: m.conv_seq,
            sender_user_id: m.sender_user_id,
            receiver_type: receiver(m.receiver_type),
            receiver_id: m.receiver_id,
            client_msg_id: m.client_msg_id,
            server_time_ms: m.server_time_ms,
            content_type: m.content_type,
            content: STANDARD.encode(&m.content),
        }
    }
}

/// The caller's row of one conversation.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ConversationView {
    /// `user` (a 1:1 conversation, `id` = the peer) or `group` (`id` = the group).
    r#type: Receiver,
    id: i64,
    /// Conversation seq of the newest message (0: none yet).
    last_seq: u64,
    last_message: Option<MessageView>,
    /// The caller has read up to this conversation seq.
    read_seq: u64,
    /// 1:1: the peer has read up to this conversation seq.
    peer_read_seq: u64,
    unread: u64,
    muted: bool,
    pinned: bool,
    /// The caller's inbox seq of the row's latest change (list sync: `changed_after`).
    version: u64,
}

impl From<pb::Conversation> for ConversationView {
    fn from(c: pb::Conversation) -> Self {
        let r = c.conversation.unwrap_or_default();
        ConversationView {
            r#type: receiver(r.r#type),
            id: r.id,
            last_seq: c.last_seq,
            last_message: c.last_message.map(|m| MessageView::from(*m)),
            read_seq: c.read_seq,
            peer_read_seq: c.peer_read_seq,
            unread: c.unread,
            muted: c.muted,
            pinned: c.pinned,
            version: c.version,
        }
    }
}

/// A page of the caller's conversations, newest activity first.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ConversationList {
    conversations: Vec<ConversationView>,
    /// A full page: ask again with `cursor = next_cursor`.
    has_more: bool,
    /// Where the next page starts (absent on an empty page).
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
    /// The largest version returned (or `changed_after`): the next `changed_after`.
    version: u64,
}

/// A changed row (read, settings, delete-for-me).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ConversationChanged {
    #[serde(flatten)]
    conversation: ConversationView,
    /// Delete-for-me: the conversation seq deleted (0 otherwise).
    deleted_conv_seq: u64,
}

impl From<ConversationUpdate> for ConversationChanged {
    fn from(u: ConversationUpdate) -> Self {
        ConversationChanged {
            conversation: (*u.conversation.unwrap_or_default()).into(),
            deleted_conv_seq: u.deleted_conv_seq,
        }
    }
}

/// A page of a conversation's history.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct HistoryPage {
    /// `before`: newest first; `after`: oldest first.
    messages: Vec<MessageView>,
    has_more: bool,
}

/// Mark read.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct MarkRead {
    /// A conversation seq, at most the conversation's last.
    read_seq: u64,
}

/// Mute / pin.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdateConversationSettings {
    muted: bool,
    pinned: bool,
}

/// A recalled message.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RecalledView {
    conv_seq: u64,
    /// A u64, as a string.
    message_id: String,
    recalled_by: i64,
    /// The caller's inbox seq of their copy (0 if they have none).
    seq: u64,
}

/// Who has read a group message.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct GroupReaders {
    group_id: i64,
    conv_seq: u64,
    /// Current members whose read position is at or past `conv_seq`, ascending.
    user_ids: Vec<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListParams {
    #[serde(default)]
    changed_after: u64,
    cursor: Option<String>,
    limit: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HistoryParams {
    #[serde(default)]
    before: u64,
    #[serde(default)]
    after: u64,
    limit: Option<u32>,
}

/// A page size from the query: absent is the default (0 to the logic), an explicit 0 is refused (the
/// documented range starts at 1); the logic refuses one over the maximum.
fn page_limit(limit: Option<u32>) -> Result<u32, ApiError> {
    match limit {
        Some(0) => Err(ApiError::invalid(
            "limit must be at least 1 (leave it out for the default page size)",
        )),
        Some(n) => Ok(n),
        None => Ok(0),
    }
}

/// `<activity ms>.<user|group>.<id>`: the list cursor.
fn parse_cursor(cursor: &str) -> Result<(i64, ConversationRef), ApiError> {
    let bad = || ApiError::invalid("cursor is not one this API returned");
    let mut parts = cursor.splitn(3, '.');
    let ms = parts
        .next()
        .and_then(|s| s.parse::<i64>().ok())
        .filter(|ms| *ms >= 0)
        .ok_or_else(bad)?;
    let kind = parts.next().ok_or_else(bad)?;
    let id = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    Ok((ms, conversation(kind, id)?))
}

fn cursor_of(c: &pb::Conversation) -> Option<String> {
    let r = c.conversation?;
    let kind = if r.r#type == ReceiverType::Group as i32 {
        "group"
    } else {
        "user"
    };
    let ms = c.last_message.as_ref().map_or(0, |m| m.server_time_ms);
    Some(format!("{ms}.{kind}.{}", r.id))
}

pub(crate) async fn list_conversations(
    State(st): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<ListParams>,
) -> Result<ApiJson<ConversationList>, ApiError> {
    // Versions are inbox seqs, int64 in the schema: beyond it is no version this server gave.
    if i64::try_from(q.changed_after).is_err() {
        return Err(ApiError::invalid("changed_after must be at most 2^63-1"));
    }
    // An empty `cursor=` is no cursor (a client that sends the field always): the first page.
    let (after_activity_ms, after) = match q.cursor.as_deref().filter(|c| !c.is_empty()) {
        Some(c) => {
            let (ms, r) = parse_cursor(c)?;
            (ms, Some(r))
        }
        None => (0, None),
    };
    let out = st
        .logic
        .conversation_list(
            caller.user_id,
            &ConversationListInput {
                changed_after: q.changed_after,
                after,
                after_activity_ms,
                limit: page_limit(q.limit)?,
            },
        )
        .await
        .map_err(conversation_error)?;
    Ok(ApiJson(ConversationList {
        next_cursor: out.conversations.last().and_then(cursor_of),
        has_more: out.has_more,
        version: out.version,
        conversations: out
            .conversations
            .into_iter()
            .map(ConversationView::from)
            .collect(),
    }))
}

pub(crate) async fn history(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath((kind, id)): ApiPath<(String, i64)>,
    ApiQuery(q): ApiQuery<HistoryParams>,
) -> Result<ApiJson<HistoryPage>, ApiError> {
    let out = st
        .logic
        .history(
            caller.user_id,
            &HistoryInput {
                conversation: Some(conversation(&kind, id)?),
                before: q.before,
                after: q.after,
                limit: page_limit(q.limit)?,
            },
        )
        .await
        .map_err(conversation_error)?;
    Ok(ApiJson(HistoryPage {
        has_more: out.has_more,
        messages: out.messages.into_iter().map(MessageView::from).collect(),
    }))
}

pub(crate) async fn mark_read(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath((kind, id)): ApiPath<(String, i64)>,
    ApiJson(req): ApiJson<MarkRead>,
) -> Result<ApiJson<ConversationChanged>, ApiError> {
    let input = MarkReadInput {
        conversation: Some(conversation(&kind, id)?),
        read_seq: req.read_seq,
    };
    let out = st
        .logic
        .mark_read(&origin(&caller), &input)
        .await
        .map_err(conversation_error)?;
    Ok(ApiJson(out.into()))
}

pub(crate) async fn update_settings(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath((kind, id)): ApiPath<(String, i64)>,
    ApiJson(req): ApiJson<UpdateConversationSettings>,
) -> Result<ApiJson<ConversationChanged>, ApiError> {
    let input = ConversationSettingsInput {
        conversation: Some(conversation(&kind, id)?),
        muted: req.muted,
        pinned: req.pinned,
    };
    let out = st
        .logic
        .conversation_settings(&origin(&caller), &input)
        .await
        .map_err(conversation_error)?;
    Ok(ApiJson(out.into()))
}

pub(crate) async fn recall(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath((kind, id, conv_seq)): ApiPath<(String, i64, u64)>,
) -> Result<ApiJson<RecalledView>, ApiError> {
    let input = RecallInput {
        conversation: Some(conversation(&kind, id)?),
        conv_seq,
    };
    let out = st
        .logic
        .recall(&origin(&caller), &input)
        .await
        .map_err(conversation_error)?;
    Ok(ApiJson(RecalledView {
        conv_seq: out.conv_seq,
        message_id: out.message_id.to_string(),
        recalled_by: out.recalled_by,
        seq: out.seq,
    }))
}

pub(crate) async fn delete_for_me(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath((kind, id, conv_seq)): ApiPath<(String, i64, u64)>,
) -> Result<ApiJson<ConversationChanged>, ApiError> {
    let input = DeleteForMeInput {
        conversation: Some(conversation(&kind, id)?),
        conv_seq,
    };
    let out = st
        .logic
        .delete_for_me(&origin(&caller), &input)
        .await
        .map_err(conversation_error)?;
    Ok(ApiJson(out.into()))
}

pub(crate) async fn group_readers(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath((group_id, conv_seq)): ApiPath<(i64, u64)>,
) -> Result<ApiJson<GroupReaders>, ApiError> {
    // The schema's integers are int64: a seq beyond it names no message.
    if i64::try_from(conv_seq).is_err() {
        return Err(ApiError::invalid("conv_seq must be at most 2^63-1"));
    }
    let out = st
        .logic
        .group_readers(caller.user_id, &GroupReadersInput { group_id, conv_seq })
        .await
        .map_err(conversation_error)?;
    Ok(ApiJson(GroupReaders {
        group_id: out.group_id,
        conv_seq: out.conv_seq,
        user_ids: out.user_ids,
    }))
}
