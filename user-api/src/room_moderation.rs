//! Live-room moderation over HTTP (issue 17): bans, the pinned announcement and the viewer list. The
//! room's owner and admins act with their bearer token, the app backend with the admin secret. The work
//! (store, then tell the gateways) is in [`zhibo_logic::Logic`] (`moderation`).

use axum::extract::State;
use axum::http::StatusCode;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use zhibo_proto::client::{Message, ReceiverType};
use zhibo_store::{Room, RoomBan};

use crate::auth::{Admin, Caller};
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use crate::state::AppState;
use crate::validate;

/// The largest pinned announcement, in bytes (it rides in every join reply).
const MAX_PIN_BYTES: usize = 4096;
const MAX_BAN_PAGE: usize = 500;

/// A user banned from a room.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RoomBanView {
    room_id: i64,
    user_id: i64,
    /// 0 when banned by the app backend.
    banned_by: i64,
    banned_at_ms: i64,
}

impl From<RoomBan> for RoomBanView {
    fn from(b: RoomBan) -> Self {
        RoomBanView {
            room_id: b.room_id,
            user_id: b.user_id,
            banned_by: b.banned_by,
            banned_at_ms: b.banned_at_ms,
        }
    }
}

/// A page of a room's bans, by user id.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RoomBanList {
    bans: Vec<RoomBanView>,
    /// Pass as `after` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_after: Option<i64>,
}

/// `?after=<user id>&limit=<1..=500>`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BansQuery {
    #[serde(default)]
    after: i64,
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    100
}

/// A pinned announcement to set.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SetPin {
    /// The announcement bytes, standard base64 (with padding); at most 4096 bytes decoded.
    content: String,
}

/// A room's pinned announcement as viewers see it (a `ROOM_NOTICE_PINNED` notice).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PinView {
    room_id: i64,
    /// The announcement bytes, standard base64.
    content: String,
    /// 0 when pinned by the app backend.
    pinned_by: i64,
    pinned_at_ms: i64,
}

impl PinView {
    fn of(m: &Message) -> Self {
        PinView {
            room_id: m.receiver_id,
            content: STANDARD.encode(&m.content),
            pinned_by: m.sender_user_id,
            pinned_at_ms: m.server_time_ms,
        }
    }
}

/// `?limit=<1..=500>`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ViewersQuery {
    #[serde(default = "default_limit")]
    limit: usize,
}

/// One viewer of a room.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ViewerView {
    user_id: i64,
    /// The user's earliest join among its connections in the room.
    joined_at_ms: i64,
    /// The room's owner or an admin (listed first).
    manager: bool,
}

/// A room's top viewers across the cluster: the owner and admins first, then by join time.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ViewerListView {
    room_id: i64,
    viewers: Vec<ViewerView>,
    /// Connections in the room on the gateways that answered (a user with two devices counts twice).
    connections: u64,
    /// Gateways that answered.
    gateways: usize,
    /// False when a gateway known to have viewers did not answer in time (the list may miss some).
    complete: bool,
}

fn room_error(e: zhibo_logic::LogicError) -> ApiError {
    crate::messages::logic_error(e, ReceiverType::Room)
}

fn forbidden() -> ApiError {
    ApiError::forbidden(
        "forbidden",
        "only the room's owner and admins may moderate it",
    )
}

/// The room's record (a room never written is open and has no managers).
async fn room(st: &AppState, room_id: i64) -> Result<Room, ApiError> {
    validate::id("room_id", room_id)?;
    Ok(st
        .stores
        .rooms
        .get_room(room_id)
        .await?
        .unwrap_or_else(|| Room::open(room_id)))
}

/// The room, if `caller` is its owner or an admin.
async fn as_manager(st: &AppState, room_id: i64, caller: &Caller) -> Result<Room, ApiError> {
    let room = room(st, room_id).await?;
    if room.is_manager(caller.user_id) {
        Ok(room)
    } else {
        Err(forbidden())
    }
}

async fn do_ban(
    st: &AppState,
    room: &Room,
    user_id: i64,
    by: i64,
) -> Result<ApiJson<RoomBanView>, ApiError> {
    validate::id("user_id", user_id)?;
    if st.stores.users.get_user(user_id).await?.is_none() {
        return Err(crate::accounts::user_not_found());
    }
    if room.is_manager(user_id) {
        return Err(ApiError::forbidden(
            "cannot_ban_manager",
            "the room's owner and admins cannot be banned from it; change them first",
        ));
    }
    let ban = st
        .logic
        .ban_from_room(room.room_id, user_id, by)
        .await
        .map_err(room_error)?;
    Ok(ApiJson(ban.into()))
}

async fn do_unban(st: &AppState, room_id: i64, user_id: i64) -> Result<StatusCode, ApiError> {
    validate::id("user_id", user_id)?;
    st.logic
        .unban_from_room(room_id, user_id)
        .await
        .map_err(room_error)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn do_pin(
    st: &AppState,
    room_id: i64,
    req: &SetPin,
    by: i64,
) -> Result<ApiJson<PinView>, ApiError> {
    let content = STANDARD
        .decode(req.content.as_bytes())
        .map_err(|_| ApiError::invalid("content must be standard base64"))?;
    if content.is_empty() || content.len() > MAX_PIN_BYTES {
        return Err(ApiError::invalid(format!(
            "content must be 1 to {MAX_PIN_BYTES} bytes"
        )));
    }
    let pin = st
        .logic
        .set_room_pin(room_id, Some(content.into()), by)
        .await
        .map_err(room_error)?
        .ok_or_else(|| ApiError::internal("pin not returned"))?;
    Ok(ApiJson(PinView::of(&pin)))
}

async fn do_unpin(st: &AppState, room_id: i64, by: i64) -> Result<StatusCode, ApiError> {
    st.logic
        .set_room_pin(room_id, None, by)
        .await
        .map_err(room_error)?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn ban(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath((room_id, user_id)): ApiPath<(i64, i64)>,
) -> Result<ApiJson<RoomBanView>, ApiError> {
    let room = as_manager(&st, room_id, &caller).await?;
    do_ban(&st, &room, user_id, caller.user_id).await
}

pub(crate) async fn admin_ban(
    State(st): State<AppState>,
    _admin: Admin,
    ApiPath((room_id, user_id)): ApiPath<(i64, i64)>,
) -> Result<ApiJson<RoomBanView>, ApiError> {
    let room = room(&st, room_id).await?;
    do_ban(&st, &room, user_id, 0).await
}

pub(crate) async fn unban(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath((room_id, user_id)): ApiPath<(i64, i64)>,
) -> Result<StatusCode, ApiError> {
    as_manager(&st, room_id, &caller).await?;
    do_unban(&st, room_id, user_id).await
}

pub(crate) async fn admin_unban(
    State(st): State<AppState>,
    _admin: Admin,
    ApiPath((room_id, user_id)): ApiPath<(i64, i64)>,
) -> Result<StatusCode, ApiError> {
    validate::id("room_id", room_id)?;
    do_unban(&st, room_id, user_id).await
}

/// A page of the room's bans (the caller's right to see them already checked).
async fn bans_page(
    st: &AppState,
    room_id: i64,
    q: &BansQuery,
) -> Result<ApiJson<RoomBanList>, ApiError> {
    let mut bans = st.stores.rooms.bans(room_id, q.after, q.limit + 1).await?;
    let next_after = if bans.len() > q.limit {
        bans.truncate(q.limit);
        bans.last().map(|b| b.user_id)
    } else {
        None
    };
    Ok(ApiJson(RoomBanList {
        bans: bans.into_iter().map(Into::into).collect(),
        next_after,
    }))
}

fn check_ban_page(q: &BansQuery) -> Result<(), ApiError> {
    if !(1..=MAX_BAN_PAGE).contains(&q.limit) {
        return Err(ApiError::invalid(format!(
            "limit must be 1..={MAX_BAN_PAGE}"
        )));
    }
    Ok(())
}

pub(crate) async fn list_bans(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(room_id): ApiPath<i64>,
    ApiQuery(q): ApiQuery<BansQuery>,
) -> Result<ApiJson<RoomBanList>, ApiError> {
    check_ban_page(&q)?;
    as_manager(&st, room_id, &caller).await?;
    bans_page(&st, room_id, &q).await
}

pub(crate) async fn admin_list_bans(
    State(st): State<AppState>,
    _admin: Admin,
    ApiPath(room_id): ApiPath<i64>,
    ApiQuery(q): ApiQuery<BansQuery>,
) -> Result<ApiJson<RoomBanList>, ApiError> {
    check_ban_page(&q)?;
    validate::id("room_id", room_id)?;
    bans_page(&st, room_id, &q).await
}

pub(crate) async fn pin(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(room_id): ApiPath<i64>,
    ApiJson(req): ApiJson<SetPin>,
) -> Result<ApiJson<PinView>, ApiError> {
    as_manager(&st, room_id, &caller).await?;
    do_pin(&st, room_id, &req, caller.user_id).await
}

pub(crate) async fn admin_pin(
    State(st): State<AppState>,
    _admin: Admin,
    ApiPath(room_id): ApiPath<i64>,
    ApiJson(req): ApiJson<SetPin>,
) -> Result<ApiJson<PinView>, ApiError> {
    validate::id("room_id", room_id)?;
    do_pin(&st, room_id, &req, 0).await
}

pub(crate) async fn unpin(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(room_id): ApiPath<i64>,
) -> Result<StatusCode, ApiError> {
    as_manager(&st, room_id, &caller).await?;
    do_unpin(&st, room_id, caller.user_id).await
}

pub(crate) async fn admin_unpin(
    State(st): State<AppState>,
    _admin: Admin,
    ApiPath(room_id): ApiPath<i64>,
) -> Result<StatusCode, ApiError> {
    validate::id("room_id", room_id)?;
    do_unpin(&st, room_id, 0).await
}

/// The room's pinned announcement, or 404 `pin_not_found`.
async fn pin_of(st: &AppState, room_id: i64) -> Result<ApiJson<PinView>, ApiError> {
    validate::id("room_id", room_id)?;
    let pin = st
        .logic
        .room_pin(room_id)
        .await
        .map_err(room_error)?
        .ok_or_else(|| {
            ApiError::not_found("pin_not_found", "the room has no pinned announcement")
        })?;
    Ok(ApiJson(PinView::of(&pin)))
}

pub(crate) async fn get_pin(
    State(st): State<AppState>,
    _caller: Caller,
    ApiPath(room_id): ApiPath<i64>,
) -> Result<ApiJson<PinView>, ApiError> {
    pin_of(&st, room_id).await
}

pub(crate) async fn admin_get_pin(
    State(st): State<AppState>,
    _admin: Admin,
    ApiPath(room_id): ApiPath<i64>,
) -> Result<ApiJson<PinView>, ApiError> {
    pin_of(&st, room_id).await
}

async fn viewers(
    st: &AppState,
    room_id: i64,
    q: &ViewersQuery,
) -> Result<ApiJson<ViewerListView>, ApiError> {
    let max = zhibo_logic::MAX_VIEWERS as usize;
    if !(1..=max).contains(&q.limit) {
        return Err(ApiError::invalid(format!("limit must be 1..={max}")));
    }
    let room = room(st, room_id).await?;
    let mut managers = room.admin_user_ids.clone();
    if room.owner_user_id != 0 {
        managers.push(room.owner_user_id);
    }
    let list = st
        .logic
        .room_viewers(room_id, q.limit as u32, managers)
        .await
        .map_err(room_error)?;
    Ok(ApiJson(ViewerListView {
        room_id,
        viewers: list
            .viewers
            .into_iter()
            .map(|v| ViewerView {
                user_id: v.user_id,
                joined_at_ms: v.joined_at_ms,
                manager: v.manager,
            })
            .collect(),
        connections: list.connections,
        gateways: list.gateways,
        complete: list.complete,
    }))
}

pub(crate) async fn list_viewers(
    State(st): State<AppState>,
    _caller: Caller,
    ApiPath(room_id): ApiPath<i64>,
    ApiQuery(q): ApiQuery<ViewersQuery>,
) -> Result<ApiJson<ViewerListView>, ApiError> {
    viewers(&st, room_id, &q).await
}

pub(crate) async fn admin_list_viewers(
    State(st): State<AppState>,
    _admin: Admin,
    ApiPath(room_id): ApiPath<i64>,
    ApiQuery(q): ApiQuery<ViewersQuery>,
) -> Result<ApiJson<ViewerListView>, ApiError> {
    viewers(&st, room_id, &q).await
}
