//! Friend requests and friendships. A friendship is stored in both directions; each side has its own
//! remark and extra.

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use zhibo_store::ids::now_ms;
use zhibo_store::{Friend, FriendRequest};

use crate::accounts::user_not_found;
use crate::auth::Caller;
use crate::error::{ApiError, ApiJson, ApiPath, OptionalJson};
use crate::state::AppState;
use crate::validate::{self, MAX_NAME};

/// Longest request greeting (characters).
const MAX_GREETING: usize = 256;

/// Asks a user to be friends.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateFriendRequest {
    to_user_id: i64,
    /// Greeting shown to the other user.
    #[serde(default)]
    message: String,
}

/// A pending friend request.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct FriendRequestView {
    from_user_id: i64,
    to_user_id: i64,
    message: String,
    created_at_ms: i64,
}

impl From<FriendRequest> for FriendRequestView {
    fn from(r: FriendRequest) -> Self {
        FriendRequestView {
            from_user_id: r.from_user_id,
            to_user_id: r.to_user_id,
            message: r.message,
            created_at_ms: r.created_at_ms,
        }
    }
}

/// Pending requests addressed to the caller.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct FriendRequestList {
    requests: Vec<FriendRequestView>,
}

/// The caller's view of a friend.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct FriendView {
    friend_id: i64,
    remark: String,
    extra: String,
    created_at_ms: i64,
}

impl From<Friend> for FriendView {
    fn from(f: Friend) -> Self {
        FriendView {
            friend_id: f.friend_id,
            remark: f.remark,
            extra: f.extra,
            created_at_ms: f.created_at_ms,
        }
    }
}

/// The caller's friends, ordered by id.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct FriendList {
    friends: Vec<FriendView>,
}

fn friend_not_found() -> ApiError {
    ApiError::not_found("friend_not_found", "this user is not your friend")
}

fn request_not_found() -> ApiError {
    ApiError::not_found(
        "friend_request_not_found",
        "no pending request from this user",
    )
}

pub(crate) async fn create_request(
    State(st): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<CreateFriendRequest>,
) -> Result<(StatusCode, ApiJson<FriendRequestView>), ApiError> {
    validate::text("message", &req.message, MAX_GREETING)?;
    if req.to_user_id == caller.user_id {
        return Err(ApiError::invalid("you cannot befriend yourself"));
    }
    if st.stores.users.get_user(req.to_user_id).await?.is_none() {
        return Err(user_not_found());
    }
    if st
        .stores
        .friends
        .get_friend(caller.user_id, req.to_user_id)
        .await?
        .is_some()
    {
        return Err(ApiError::conflict(
            "already_friends",
            "you are already friends",
        ));
    }
    let request = FriendRequest {
        from_user_id: caller.user_id,
        to_user_id: req.to_user_id,
        message: req.message,
        created_at_ms: now_ms(),
    };
    st.stores.friends.put_request(&request).await?;
    Ok((StatusCode::CREATED, ApiJson(request.into())))
}

pub(crate) async fn list_requests(
    State(st): State<AppState>,
    caller: Caller,
) -> Result<ApiJson<FriendRequestList>, ApiError> {
    let requests = st.stores.friends.list_requests_to(caller.user_id).await?;
    Ok(ApiJson(FriendRequestList {
        requests: requests.into_iter().map(Into::into).collect(),
    }))
}

/// Accepts a request, optionally naming the new friend.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AgreeRequest {
    #[serde(default)]
    remark: Option<String>,
}

pub(crate) async fn agree_request(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(from): ApiPath<i64>,
    OptionalJson(body): OptionalJson<AgreeRequest>,
) -> Result<ApiJson<FriendView>, ApiError> {
    let req = body.unwrap_or_default();
    let remark = req.remark.unwrap_or_default();
    validate::text("remark", &remark, MAX_NAME)?;
    let me = caller.user_id;
    if st.stores.friends.get_request(from, me).await?.is_none() {
        return Err(request_not_found());
    }
    let now = now_ms();
    let mine = Friend {
        user_id: me,
        friend_id: from,
        remark,
        extra: String::new(),
        created_at_ms: now,
    };
    // The requester's side keeps its remark if it somehow exists already.
    if st.stores.friends.get_friend(from, me).await?.is_none() {
        st.stores
            .friends
            .put_friend(&Friend {
                user_id: from,
                friend_id: me,
                remark: String::new(),
                extra: String::new(),
                created_at_ms: now,
            })
            .await?;
    }
    st.stores.friends.put_friend(&mine).await?;
    // Both directions: when both asked, agreeing one settles the other too.
    st.stores.friends.delete_request(from, me).await?;
    st.stores.friends.delete_request(me, from).await?;
    Ok(ApiJson(mine.into()))
}

pub(crate) async fn refuse_request(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(from): ApiPath<i64>,
) -> Result<StatusCode, ApiError> {
    if st
        .stores
        .friends
        .get_request(from, caller.user_id)
        .await?
        .is_none()
    {
        return Err(request_not_found());
    }
    st.stores
        .friends
        .delete_request(from, caller.user_id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn list_friends(
    State(st): State<AppState>,
    caller: Caller,
) -> Result<ApiJson<FriendList>, ApiError> {
    let friends = st.stores.friends.list_friends(caller.user_id).await?;
    Ok(ApiJson(FriendList {
        friends: friends.into_iter().map(Into::into).collect(),
    }))
}

/// The caller's private fields for a friend; absent fields keep their value.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdateFriend {
    #[serde(default)]
    remark: Option<String>,
    #[serde(default)]
    extra: Option<String>,
}

pub(crate) async fn update_friend(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(friend_id): ApiPath<i64>,
    ApiJson(req): ApiJson<UpdateFriend>,
) -> Result<ApiJson<FriendView>, ApiError> {
    let mut friend = st
        .stores
        .friends
        .get_friend(caller.user_id, friend_id)
        .await?
        .ok_or_else(friend_not_found)?;
    if let Some(remark) = req.remark {
        validate::text("remark", &remark, MAX_NAME)?;
        friend.remark = remark;
    }
    if let Some(extra) = req.extra {
        validate::extra("extra", &extra)?;
        friend.extra = extra;
    }
    st.stores.friends.put_friend(&friend).await?;
    Ok(ApiJson(friend.into()))
}

pub(crate) async fn delete_friend(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(friend_id): ApiPath<i64>,
) -> Result<StatusCode, ApiError> {
    if st
        .stores
        .friends
        .get_friend(caller.user_id, friend_id)
        .await?
        .is_none()
    {
        return Err(friend_not_found());
    }
    st.stores
        .friends
        .delete_friend(caller.user_id, friend_id)
        .await?;
    let other_side = st
        .stores
        .friends
        .delete_friend(friend_id, caller.user_id)
        .await;
    // Every pipeline drops the cached friendship now, even if the other side's row could not be
    // deleted (a retry would find the caller's row gone: 404). A refused event leaves it to the cache's
    // age limit, `logic.authz_cache_secs`.
    if let Err(e) = st.logic.friendship_removed(caller.user_id, friend_id).await {
        tracing::warn!(error = %e, "friendship removal not announced; caches expire it");
    }
    other_side?;
    Ok(StatusCode::NO_CONTENT)
}
