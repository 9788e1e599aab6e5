//! Live rooms over HTTP: reading a room's settings, owner/admin actions (close, mute, join notices), and
//! the admin API's room settings, system notices to a room and server-wide broadcasts. Room records are
//! stored ([`zhibo_store::RoomStore`]) so every logic worker and gateway sees them; notices and broadcasts
//! go through [`zhibo_logic::Logic`] like any room message.

use axum::extract::State;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use zhibo_proto::bus::Origin;
use zhibo_proto::client::{ReceiverType, RoomClass, RoomNotice, SendMessageInput};
use zhibo_store::ids::now_ms;
use zhibo_store::{Room, RoomShaping};

use crate::auth::{Admin, Caller};
use crate::error::{ApiError, ApiJson, ApiPath};
use crate::messages::logic_error;
use crate::state::AppState;
use crate::validate;

/// A live room's settings.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RoomView {
    room_id: i64,
    /// 0 when the room has no owner.
    owner_user_id: i64,
    admin_user_ids: Vec<i64>,
    /// Joins and sends are refused.
    closed: bool,
    /// Sends are refused except from the owner and admins.
    muted: bool,
    /// Viewers' joins and leaves are announced as room messages.
    join_notices: bool,
    updated_at_ms: i64,
}

impl From<Room> for RoomView {
    fn from(r: Room) -> Self {
        RoomView {
            room_id: r.room_id,
            owner_user_id: r.owner_user_id,
            admin_user_ids: r.admin_user_ids,
            closed: r.closed,
            muted: r.muted,
            join_notices: r.join_notices,
            updated_at_ms: r.updated_at_ms,
        }
    }
}

/// What the owner or an admin may change; absent fields keep their value.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdateRoom {
    #[serde(default)]
    closed: Option<bool>,
    #[serde(default)]
    muted: Option<bool>,
    #[serde(default)]
    join_notices: Option<bool>,
}

/// A room's settings as the app backend sets them; absent fields keep their value (a room never set is
/// open, unmuted, without owner).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AdminUpdateRoom {
    #[serde(default)]
    owner_user_id: Option<i64>,
    #[serde(default)]
    admin_user_ids: Option<Vec<i64>>,
    #[serde(default)]
    closed: Option<bool>,
    #[serde(default)]
    muted: Option<bool>,
    #[serde(default)]
    join_notices: Option<bool>,
}

/// How gateways shape a busy room's chat for each viewer (issue 17).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RoomShapingView {
    room_id: i64,
    /// Chat messages per second a viewer is shown at most (0 = all). Above it each viewer gets a fair
    /// sample (every sender keeps a chance; its own messages always); gifts and system messages
    /// (`ROOM_CLASS_HIGH`) are never sampled. Applies at once to every viewer of the room, on every
    /// gateway, including those who joined before the change.
    chat_per_sec: u32,
    updated_at_ms: i64,
}

impl From<RoomShaping> for RoomShapingView {
    fn from(s: RoomShaping) -> Self {
        RoomShapingView {
            room_id: s.room_id,
            chat_per_sec: s.chat_per_sec,
            updated_at_ms: s.updated_at_ms,
        }
    }
}

/// A room's shaping settings.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdateRoomShaping {
    /// Chat messages per second a viewer is shown at most, 0..=10000 (0 = all).
    chat_per_sec: u32,
}

/// The most chat per second a room may be set to show (beyond it, shaping means nothing to a reader).
const MAX_CHAT_PER_SEC: u32 = 10_000;

/// A server-side room message or broadcast (not stored in any inbox; seq 0).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServerNotice {
    /// Shown as the sender: 0 (default) = the system, else a user id (1 to 2^53 - 1).
    #[serde(default)]
    from_user_id: i64,
    /// Application-defined, >= 0.
    #[serde(default)]
    content_type: i32,
    /// The message bytes, standard base64 (with padding).
    content: String,
    /// Room messages only: `high` (default: a system message is never sampled), `chat` or `like`.
    #[serde(default)]
    class: Option<ClassName>,
}

/// A room message's priority class (`zhibo.v1.RoomClass`).
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ClassName {
    High,
    Chat,
    Like,
}

/// A published room message or broadcast.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct NoticeSent {
    /// A u64, as a string: it does not fit a JavaScript number.
    message_id: String,
    server_time_ms: i64,
}

/// A notice's `from_user_id`: 0 (the system) or a user id.
fn sender(from_user_id: i64) -> Result<(), ApiError> {
    if from_user_id != 0 {
        validate::id("from_user_id", from_user_id)?;
    }
    Ok(())
}

fn room_not_found() -> ApiError {
    ApiError::not_found("room_not_found", "no such room")
}

fn room_id(id: i64) -> Result<i64, ApiError> {
    validate::id("room_id", id)?;
    Ok(id)
}

/// Stores `room`, telling its viewers when this closes it.
async fn save(st: &AppState, mut room: Room, was_closed: bool) -> Result<RoomView, ApiError> {
    room.updated_at_ms = now_ms();
    st.stores.rooms.put_room(&room).await?;
    if room.closed && !was_closed {
        // Viewers learn it; joins and sends are refused from now on either way.
        if let Err(e) = st.logic.room_notice(room.room_id, RoomNotice::Closed).await {
            tracing::warn!(room_id = room.room_id, error = %e, "room-closed notice lost");
        }
    }
    Ok(room.into())
}

pub(crate) async fn get_room(
    State(st): State<AppState>,
    _caller: Caller,
    ApiPath(id): ApiPath<i64>,
) -> Result<ApiJson<RoomView>, ApiError> {
    let id = room_id(id)?;
    let room = st.stores.rooms.get_room(id).await?;
    Ok(ApiJson(room.unwrap_or_else(|| Room::open(id)).into()))
}

pub(crate) async fn update_room(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<i64>,
    ApiJson(req): ApiJson<UpdateRoom>,
) -> Result<ApiJson<RoomView>, ApiError> {
    let id = room_id(id)?;
    let mut room = st
        .stores
        .rooms
        .get_room(id)
        .await?
        .ok_or_else(room_not_found)?;
    if !room.is_manager(caller.user_id) {
        return Err(ApiError::forbidden(
            "forbidden",
            "only the room's owner and admins may change it",
        ));
    }
    let was_closed = room.closed;
    room.closed = req.closed.unwrap_or(room.closed);
    room.muted = req.muted.unwrap_or(room.muted);
    room.join_notices = req.join_notices.unwrap_or(room.join_notices);
    Ok(ApiJson(save(&st, room, was_closed).await?))
}

pub(crate) async fn get_room_shaping(
    State(st): State<AppState>,
    _caller: Caller,
    ApiPath(id): ApiPath<i64>,
) -> Result<ApiJson<RoomShapingView>, ApiError> {
    let id = room_id(id)?;
    let shaping = st.stores.rooms.get_room_shaping(id).await?;
    Ok(ApiJson(
        shaping
            .unwrap_or(RoomShaping {
                room_id: id,
                ..RoomShaping::default()
            })
            .into(),
    ))
}

async fn save_shaping(
    st: &AppState,
    id: i64,
    req: UpdateRoomShaping,
) -> Result<RoomShapingView, ApiError> {
    if req.chat_per_sec > MAX_CHAT_PER_SEC {
        return Err(ApiError::invalid(format!(
            "chat_per_sec: at most {MAX_CHAT_PER_SEC}"
        )));
    }
    let shaping = RoomShaping {
        room_id: id,
        chat_per_sec: req.chat_per_sec,
        updated_at_ms: now_ms(),
    };
    st.logic
        .set_room_shaping(&shaping)
        .await
        .map_err(|e| logic_error(e, ReceiverType::Room))?;
    Ok(shaping.into())
}

pub(crate) async fn update_room_shaping(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<i64>,
    ApiJson(req): ApiJson<UpdateRoomShaping>,
) -> Result<ApiJson<RoomShapingView>, ApiError> {
    let id = room_id(id)?;
    let room = st
        .stores
        .rooms
        .get_room(id)
        .await?
        .ok_or_else(room_not_found)?;
    if !room.is_manager(caller.user_id) {
        return Err(ApiError::forbidden(
            "forbidden",
            "only the room's owner and admins may change it",
        ));
    }
    Ok(ApiJson(save_shaping(&st, id, req).await?))
}

pub(crate) async fn admin_update_room_shaping(
    State(st): State<AppState>,
    _admin: Admin,
    ApiPath(id): ApiPath<i64>,
    ApiJson(req): ApiJson<UpdateRoomShaping>,
) -> Result<ApiJson<RoomShapingView>, ApiError> {
    let id = room_id(id)?;
    Ok(ApiJson(save_shaping(&st, id, req).await?))
}

pub(crate) async fn admin_update_room(
    State(st): State<AppState>,
    _admin: Admin,
    ApiPath(id): ApiPath<i64>,
    ApiJson(req): ApiJson<AdminUpdateRoom>,
) -> Result<ApiJson<RoomView>, ApiError> {
    let id = room_id(id)?;
    let mut room = st
        .stores
        .rooms
        .get_room(id)
        .await?
        .unwrap_or_else(|| Room::open(id));
    if let Some(owner) = req.owner_user_id {
        if owner != 0 {
            validate::id("owner_user_id", owner)?;
        }
        room.owner_user_id = owner;
    }
    if let Some(admins) = req.admin_user_ids {
        if admins.len() > 100 {
            return Err(ApiError::invalid("admin_user_ids: at most 100"));
        }
        for a in &admins {
            validate::id("admin_user_ids", *a)?;
        }
        room.admin_user_ids = admins;
    }
    let was_closed = room.closed;
    room.closed = req.closed.unwrap_or(room.closed);
    room.muted = req.muted.unwrap_or(room.muted);
    room.join_notices = req.join_notices.unwrap_or(room.join_notices);
    Ok(ApiJson(save(&st, room, was_closed).await?))
}

fn decode(content: &str) -> Result<bytes::Bytes, ApiError> {
    STANDARD
        .decode(content.as_bytes())
        .map(Into::into)
        .map_err(|_| ApiError::invalid("content must be standard base64"))
}

pub(crate) async fn admin_room_message(
    State(st): State<AppState>,
    _admin: Admin,
    ApiPath(id): ApiPath<i64>,
    ApiJson(req): ApiJson<ServerNotice>,
) -> Result<ApiJson<NoticeSent>, ApiError> {
    let id = room_id(id)?;
    sender(req.from_user_id)?;
    // Device 0: a server-side send, allowed in closed and muted rooms.
    let origin = Origin {
        user_id: req.from_user_id,
        device_id: 0,
        gateway_id: String::new(),
        conn_id: 0,
    };
    let input = SendMessageInput {
        receiver_type: ReceiverType::Room as i32,
        receiver_id: id,
        client_msg_id: String::new(),
        content_type: req.content_type,
        content: decode(&req.content)?,
        room_class: match req.class.unwrap_or(ClassName::High) {
            ClassName::High => RoomClass::High,
            ClassName::Chat => RoomClass::Chat,
            ClassName::Like => RoomClass::Like,
        } as i32,
        first_attempt: false,
    };
    let out = st
        .logic
        .send_room_message(&origin, &input)
        .await
        .map_err(|e| logic_error(e, ReceiverType::Room))?;
    Ok(ApiJson(NoticeSent {
        message_id: out.message_id.to_string(),
        server_time_ms: out.server_time_ms,
    }))
}

pub(crate) async fn admin_broadcast(
    State(st): State<AppState>,
    _admin: Admin,
    ApiJson(req): ApiJson<ServerNotice>,
) -> Result<ApiJson<NoticeSent>, ApiError> {
    sender(req.from_user_id)?;
    let out = st
        .logic
        .broadcast(req.from_user_id, req.content_type, decode(&req.content)?)
        .await
        .map_err(|e| logic_error(e, ReceiverType::Room))?;
    Ok(ApiJson(NoticeSent {
        message_id: out.message_id.to_string(),
        server_time_ms: out.server_time_ms,
    }))
}
