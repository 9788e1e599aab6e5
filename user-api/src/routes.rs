//! The route table: one [`RouteSpec`] per (method, path) with its handler and its documentation. The
//! router ([`crate::router`]) and the OpenAPI document ([`openapi_json`]) are both built from [`table`], so
//! they cannot disagree; the integration tests check the served document against the served routes.

use std::sync::OnceLock;

use axum::extract::State;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter, MethodRouter};
use serde::Serialize;
use serde_json::{json, Map, Value};
use utoipa::{OpenApi, ToSchema};

use crate::error::{ApiError, ApiJson};
use crate::state::AppState;
use crate::{
    accounts, admin, conversations, error, friends, groups, messages, room_moderation, rooms,
};

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    Public,
    Bearer,
    Admin,
}

/// A route's documentation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Doc {
    summary: &'static str,
    access: Access,
    /// Schema name of the JSON body, if any.
    request: Option<&'static str>,
    /// The body is optional.
    request_optional: bool,
    /// Success status and schema name of its body (`None`: no body).
    ok: (u16, Option<&'static str>),
    /// Route-specific failures: (status, code).
    errors: &'static [(u16, &'static str)],
    /// Query parameters: (name, JSON type, required, description).
    query: &'static [(&'static str, &'static str, bool, &'static str)],
}

const fn doc(summary: &'static str, access: Access) -> Doc {
    Doc {
        summary,
        access,
        request: None,
        request_optional: false,
        ok: (200, None),
        errors: &[],
        query: &[],
    }
}

impl Doc {
    const fn body(mut self, schema: &'static str) -> Self {
        self.request = Some(schema);
        self
    }
    const fn optional_body(mut self, schema: &'static str) -> Self {
        self.request = Some(schema);
        self.request_optional = true;
        self
    }
    const fn ok(mut self, status: u16, schema: &'static str) -> Self {
        self.ok = (status, Some(schema));
        self
    }
    const fn no_content(mut self) -> Self {
        self.ok = (204, None);
        self
    }
    const fn errors(mut self, errors: &'static [(u16, &'static str)]) -> Self {
        self.errors = errors;
        self
    }
    const fn query(
        mut self,
        query: &'static [(&'static str, &'static str, bool, &'static str)],
    ) -> Self {
        self.query = query;
        self
    }
}

/// One route: what the router serves and what the document says about it.
pub(crate) struct RouteSpec {
    pub(crate) method: Method,
    pub(crate) path: &'static str,
    pub(crate) handler: MethodRouter<AppState>,
    pub(crate) doc: Doc,
}

/// Builds a [`RouteSpec`] whose router method and documented method come from the same token.
macro_rules! route {
    ($method:ident $path:literal => $handler:expr, $doc:expr) => {
        RouteSpec {
            method: Method::$method,
            path: $path,
            handler: on(MethodFilter::$method, $handler),
            doc: $doc,
        }
    };
}

use Access::{Admin, Bearer, Public};

/// Every route of the API.
pub(crate) fn table() -> Vec<RouteSpec> {
    vec![
        route!(GET "/healthz" => healthz, doc("Liveness: the process serves requests", Public).ok(200, "Health")),
        route!(GET "/readyz" => readyz,
            doc("Readiness: the dependencies answer and an entity-id node lease is held", Public).ok(200, "Health").errors(&[(503, "not_ready")])),
        route!(GET "/openapi.json" => openapi,
            doc("This OpenAPI document", Public).ok(200, "OpenApiDocument")),
        // Devices, accounts, sessions.
        route!(POST "/v1/devices" => accounts::create_device,
            doc("Register an app install (limited per client address)", Public).body("CreateDevice")
                .ok(201, "DeviceCreated").errors(&[(429, "rate_limited")])),
        route!(POST "/v1/users" => accounts::sign_up,
            doc("Sign up with a username and password (limited per client address)", Public).body("SignUp")
                .ok(201, "UserCreated").errors(&[(409, "username_taken"), (429, "rate_limited")])),
        route!(POST "/v1/sessions" => accounts::sign_in,
            doc("Sign in on a device; returns a token. The first sign-in binds the device to the user; \
                another user is refused with `device_taken`. Failures back off per (username, address)", Public)
                .body("SignIn").ok(200, "SessionCreated")
                .errors(&[(401, "bad_credentials"), (403, "device_taken"), (404, "device_not_found"),
                    (429, "rate_limited")])),
        route!(DELETE "/v1/sessions" => accounts::sign_out,
            doc("Sign out: revoke every token of the caller's device (the caller's own: a device has one user)",
                Bearer).no_content()),
        route!(GET "/v1/users/me" => accounts::get_me,
            doc("The caller's profile", Bearer).ok(200, "UserView").errors(&[(404, "user_not_found")])),
        route!(PATCH "/v1/users/me" => accounts::update_me,
            doc("Change the caller's profile", Bearer).body("UpdateProfile").ok(200, "UserView")
                .errors(&[(404, "user_not_found")])),
        route!(GET "/v1/users/search" => accounts::search_users,
            doc("Find a user by exact username", Bearer).ok(200, "UserList")
                .query(&[("username", "string", true, "Exact username (no prefix or fuzzy matching)")])),
        route!(GET "/v1/users/{user_id}" => accounts::get_user,
            doc("A user's profile", Bearer).ok(200, "UserView").errors(&[(404, "user_not_found")])),
        // Messages.
        route!(POST "/v1/messages" => messages::send_message,
            doc("Send a message as the caller's device", Bearer).body("SendMessage").ok(200, "MessageSent")
                .errors(&[(403, "not_friends"), (403, "not_group_member"), (403, "hook_rejected"),
                    (404, "user_not_found"), (404, "group_not_found"), (503, "unavailable")])),
        // Conversations (the same calls as the client packets; live notices to devices included).
        route!(GET "/v1/conversations" => conversations::list_conversations,
            doc("The caller's conversations, newest activity first, with unread counts and read \
                positions; `changed_after` returns only rows changed since (list sync)", Bearer)
                .ok(200, "ConversationList")
                .query(&[("changed_after", "integer", false, "Only rows with a larger version (default 0: all)"),
                    ("cursor", "string", false, "`next_cursor` of the previous page"),
                    ("limit", "integer", false, "Page size, 1 to 500 (default 100)")])),
        route!(GET "/v1/conversations/{type}/{id}/messages" => conversations::history,
            doc("A page of a conversation's history (`type` user or group): `before` a conversation seq \
                (newest first; none = the latest page) or `after` one (oldest first)", Bearer)
                .ok(200, "HistoryPage").errors(&[(404, "not_in_conversation")])
                .query(&[("before", "integer", false, "Messages below this conversation seq"),
                    ("after", "integer", false, "Messages above this conversation seq"),
                    ("limit", "integer", false, "Page size, 1 to 200 (default 50)")])),
        route!(POST "/v1/conversations/{type}/{id}/read" => conversations::mark_read,
            doc("Mark a conversation read up to a conversation seq: the caller's other devices get \
                ConversationUpdate, a 1:1 peer ReadReceipt", Bearer)
                .body("MarkRead").ok(200, "ConversationChanged")
                .errors(&[(404, "not_in_conversation"), (409, "out_of_range")])),
        route!(PUT "/v1/conversations/{type}/{id}/settings" => conversations::update_settings,
            doc("Mute / pin a conversation (synced to the caller's other devices)", Bearer)
                .body("UpdateConversationSettings").ok(200, "ConversationChanged")
                .errors(&[(404, "not_in_conversation")])),
        route!(POST "/v1/conversations/{type}/{id}/messages/{conv_seq}/recall" => conversations::recall,
            doc("Recall a message (its sender within `logic.recall_window_secs`, or a group's owner/admin): \
                every copy becomes a tombstone, every device gets Recalled", Bearer)
                .ok(200, "RecalledView")
                .errors(&[(403, "not_allowed"), (403, "too_late"), (404, "not_found"),
                    (404, "not_in_conversation"), (409, "already_recalled")])),
        route!(DELETE "/v1/conversations/{type}/{id}/messages/{conv_seq}" => conversations::delete_for_me,
            doc("Delete a message for the caller only (their devices get ConversationUpdate)", Bearer)
                .ok(200, "ConversationChanged").errors(&[(404, "not_found"), (404, "not_in_conversation")])),
        route!(GET "/v1/groups/{group_id}/messages/{conv_seq}/readers" => conversations::group_readers,
            doc("Which current members have read a group message (members only; one read of at most \
                the group's size)", Bearer)
                .ok(200, "GroupReaders").errors(&[(404, "not_in_conversation")])),
        // Friends.
        route!(POST "/v1/friends/requests" => friends::create_request,
            doc("Ask a user to be friends", Bearer).body("CreateFriendRequest").ok(201, "FriendRequestView")
                .errors(&[(404, "user_not_found"), (409, "already_friends")])),
        route!(GET "/v1/friends/requests" => friends::list_requests,
            doc("Pending requests addressed to the caller", Bearer).ok(200, "FriendRequestList")),
        route!(POST "/v1/friends/requests/{from_user_id}/agree" => friends::agree_request,
            doc("Accept a request (friends in both directions)", Bearer).optional_body("AgreeRequest")
                .ok(200, "FriendView").errors(&[(404, "friend_request_not_found")])),
        route!(POST "/v1/friends/requests/{from_user_id}/refuse" => friends::refuse_request,
            doc("Refuse a request", Bearer).no_content().errors(&[(404, "friend_request_not_found")])),
        route!(GET "/v1/friends" => friends::list_friends,
            doc("The caller's friends", Bearer).ok(200, "FriendList")),
        route!(PATCH "/v1/friends/{friend_id}" => friends::update_friend,
            doc("Change the caller's remark or extra for a friend", Bearer).body("UpdateFriend")
                .ok(200, "FriendView").errors(&[(404, "friend_not_found")])),
        route!(DELETE "/v1/friends/{friend_id}" => friends::delete_friend,
            doc("End a friendship (both directions); 1:1 sends between the two are refused \
                (NOT_FRIENDS) from moments later on, on every worker", Bearer).no_content().errors(&[(404, "friend_not_found")])),
        // Groups.
        route!(POST "/v1/groups" => groups::create_group,
            doc("Create a group; the caller becomes its owner. Initial members who are not the caller's \
                friends are invited (policy `invite`, the default) or refused (`friends`)", Bearer)
                .body("CreateGroup").ok(201, "GroupCreated")
                .errors(&[(400, "group_too_large"), (403, "not_friends"), (404, "user_not_found")])),
        route!(GET "/v1/groups/invitations" => groups::list_invitations,
            doc("The caller's pending group invitations", Bearer).ok(200, "InvitationList")),
        route!(POST "/v1/groups/invitations/{group_id}/accept" => groups::accept_invitation,
            doc("Accept an invitation: the caller becomes a member", Bearer).ok(200, "GroupView")
                .errors(&[(400, "group_too_large"), (404, "group_invitation_not_found"),
                    (404, "group_not_found")])),
        route!(POST "/v1/groups/invitations/{group_id}/refuse" => groups::refuse_invitation,
            doc("Refuse an invitation", Bearer).no_content().errors(&[(404, "group_invitation_not_found")])),
        route!(GET "/v1/groups" => groups::list_groups,
            doc("The caller's groups", Bearer).ok(200, "GroupList")),
        route!(GET "/v1/groups/{group_id}" => groups::get_group,
            doc("A group (members only)", Bearer).ok(200, "GroupView")
                .errors(&[(403, "not_group_member"), (404, "group_not_found")])),
        route!(PATCH "/v1/groups/{group_id}" => groups::update_group,
            doc("Change a group (owner and admins)", Bearer).body("UpdateGroup").ok(200, "GroupView")
                .errors(&[(403, "forbidden"), (403, "not_group_member"), (404, "group_not_found")])),
        route!(DELETE "/v1/groups/{group_id}" => groups::dissolve_group,
            doc("Dissolve a group (owner only)", Bearer).no_content()
                .errors(&[(403, "forbidden"), (403, "not_group_member"), (404, "group_not_found")])),
        route!(POST "/v1/groups/{group_id}/leave" => groups::leave_group,
            doc("Leave a group (the owner must transfer or dissolve it)", Bearer).no_content()
                .errors(&[(400, "owner_cannot_leave"), (403, "not_group_member"), (404, "group_not_found")])),
        route!(GET "/v1/groups/{group_id}/members" => groups::list_members,
            doc("A page of members, ordered by user id (members only)", Bearer).ok(200, "MemberPage")
                .errors(&[(403, "not_group_member"), (404, "group_not_found")])
                .query(&[("after", "integer", false, "Return members with a user id above this (default 0)"),
                    ("limit", "integer", false, "Page size, 1 to 500 (default 100)")])),
        route!(POST "/v1/groups/{group_id}/members" => groups::add_members,
            doc("Add members (owner and admins); non-friends are invited (policy `invite`, the default) \
                or refused (`friends`)", Bearer).body("AddMembers").ok(200, "MembersAdded")
                .errors(&[(400, "group_too_large"), (403, "forbidden"), (403, "not_friends"), (403, "not_group_member"),
                    (404, "group_not_found"), (404, "user_not_found")])),
        route!(PATCH "/v1/groups/{group_id}/members/{user_id}" => groups::update_member,
            doc("Change a member's role (owner; `owner` transfers ownership) or remark (self, owner, admins)",
                Bearer).body("UpdateMember").ok(200, "MemberView")
                .errors(&[(403, "forbidden"), (403, "not_group_member"), (404, "group_not_found"),
                    (404, "member_not_found")])),
        route!(DELETE "/v1/groups/{group_id}/members/{user_id}" => groups::remove_member,
            doc("Remove a member (owner and admins; admins only by the owner)", Bearer).no_content()
                .errors(&[(403, "cannot_remove_owner"), (403, "forbidden"), (403, "not_group_member"),
                    (404, "group_not_found"), (404, "member_not_found")])),
        // Admin API for app backends.
        route!(PUT "/v1/admin/users/{user_id}" => admin::upsert_user,
            doc("Create or update a user owned by the app backend", Admin).body("UpsertUser").ok(200, "UserView")
                .errors(&[(409, "username_taken")])),
        route!(POST "/v1/admin/tokens" => admin::mint_token,
            doc("Mint a token for a user on a device (binds an unbound device to the user)", Admin)
                .body("MintToken").ok(200, "TokenMinted")
                .errors(&[(403, "device_taken"), (404, "user_not_found"), (404, "device_not_found")])),
        route!(POST "/v1/admin/messages" => messages::admin_send_message,
            doc("Send a message on behalf of a user (no friendship needed)", Admin).body("AdminSendMessage")
                .ok(200, "MessageSent")
                .errors(&[(403, "not_group_member"), (404, "user_not_found"), (404, "group_not_found"),
                    (503, "unavailable")])),
        route!(PUT "/v1/admin/rooms/{room_id}" => rooms::admin_update_room,
            doc("Set a live room's owner, admins, closed, muted and join notices", Admin)
                .body("AdminUpdateRoom").ok(200, "RoomView")),
        route!(PUT "/v1/admin/rooms/{room_id}/shaping" => rooms::admin_update_room_shaping,
            doc("Set a live room's per-viewer chat display rate (0 = all chat)", Admin)
                .body("UpdateRoomShaping").ok(200, "RoomShapingView")),
        route!(POST "/v1/admin/rooms/{room_id}/messages" => rooms::admin_room_message,
            doc("Send a system notice to a live room (also when closed or muted; class `high` unless \
                set)", Admin)
                .body("ServerNotice").ok(200, "NoticeSent").errors(&[(503, "unavailable")])),
        route!(POST "/v1/admin/broadcast" => rooms::admin_broadcast,
            doc("Send a notice to every connected device (room 0; not stored)", Admin)
                .body("ServerNotice").ok(200, "NoticeSent").errors(&[(503, "unavailable")])),
        // Live rooms.
        route!(GET "/v1/rooms/{room_id}" => rooms::get_room,
            doc("A live room's settings", Bearer).ok(200, "RoomView")),
        route!(PATCH "/v1/rooms/{room_id}" => rooms::update_room,
            doc("Close, reopen, mute or unmute a live room, or toggle join notices (owner and admins)", Bearer)
                .body("UpdateRoom").ok(200, "RoomView")
                .errors(&[(403, "forbidden"), (404, "room_not_found")])),
        route!(GET "/v1/rooms/{room_id}/shaping" => rooms::get_room_shaping,
            doc("A live room's shaping settings (per-viewer chat display rate)", Bearer)
                .ok(200, "RoomShapingView")),
        route!(PUT "/v1/rooms/{room_id}/shaping" => rooms::update_room_shaping,
            doc("Set a live room's per-viewer chat display rate (owner and admins; 0 = all chat)", Bearer)
                .body("UpdateRoomShaping").ok(200, "RoomShapingView")
                .errors(&[(403, "forbidden"), (404, "room_not_found")])),
        // Live-room moderation: owner and admins (bearer), or the app backend (admin secret).
        route!(PUT "/v1/rooms/{room_id}/bans/{user_id}" => room_moderation::ban,
            doc("Ban a user from a live room: their connections leave it on every gateway (RoomKicked), \
                joins and sends are refused with ROOM_BANNED (owner and admins)", Bearer)
                .ok(200, "RoomBanView").errors(&[(403, "forbidden"), (403, "cannot_ban_manager"),
                    (404, "user_not_found"), (503, "unavailable")])),
        route!(DELETE "/v1/rooms/{room_id}/bans/{user_id}" => room_moderation::unban,
            doc("Lift a ban (owner and admins)", Bearer).no_content().errors(&[(403, "forbidden")])),
        route!(GET "/v1/rooms/{room_id}/bans" => room_moderation::list_bans,
            doc("A page of a live room's bans, by user id (owner and admins)", Bearer).ok(200, "RoomBanList")
                .errors(&[(403, "forbidden")])
                .query(&[("after", "integer", false, "Return bans of user ids above this (default 0)"),
                    ("limit", "integer", false, "Page size, 1 to 500 (default 100)")])),
        route!(PUT "/v1/rooms/{room_id}/pin" => room_moderation::pin,
            doc("Set a live room's pinned announcement: returned on join, pushed to viewers now \
                (ROOM_NOTICE_PINNED) (owner and admins)", Bearer)
                .body("SetPin").ok(200, "PinView").errors(&[(403, "forbidden"), (503, "unavailable")])),
        route!(DELETE "/v1/rooms/{room_id}/pin" => room_moderation::unpin,
            doc("Remove a live room's pinned announcement (viewers get ROOM_NOTICE_UNPINNED) (owner and \
                admins)", Bearer).no_content().errors(&[(403, "forbidden"), (503, "unavailable")])),
        route!(GET "/v1/rooms/{room_id}/pin" => room_moderation::get_pin,
            doc("A live room's pinned announcement", Bearer).ok(200, "PinView")
                .errors(&[(404, "pin_not_found")])),
        route!(GET "/v1/rooms/{room_id}/viewers" => room_moderation::list_viewers,
            doc("A live room's top viewers across the cluster: owner and admins first, then by join time \
                (asks every gateway with viewers; up to 0.5 s for an empty room)", Bearer)
                .ok(200, "ViewerListView").errors(&[(503, "unavailable")])
                .query(&[("limit", "integer", false, "How many, 1 to 500 (default 100)")])),
        route!(PUT "/v1/admin/rooms/{room_id}/bans/{user_id}" => room_moderation::admin_ban,
            doc("Ban a user from a live room (as for owners; banned_by 0)", Admin).ok(200, "RoomBanView")
                .errors(&[(403, "cannot_ban_manager"), (404, "user_not_found"), (503, "unavailable")])),
        route!(DELETE "/v1/admin/rooms/{room_id}/bans/{user_id}" => room_moderation::admin_unban,
            doc("Lift a ban", Admin).no_content()),
        route!(GET "/v1/admin/rooms/{room_id}/bans" => room_moderation::admin_list_bans,
            doc("A page of a live room's bans, by user id", Admin).ok(200, "RoomBanList")
                .query(&[("after", "integer", false, "Return bans of user ids above this (default 0)"),
                    ("limit", "integer", false, "Page size, 1 to 500 (default 100)")])),
        route!(GET "/v1/admin/rooms/{room_id}/pin" => room_moderation::admin_get_pin,
            doc("A live room's pinned announcement", Admin).ok(200, "PinView")
                .errors(&[(404, "pin_not_found")])),
        route!(PUT "/v1/admin/rooms/{room_id}/pin" => room_moderation::admin_pin,
            doc("Set a live room's pinned announcement (pinned_by 0)", Admin).body("SetPin").ok(200, "PinView")
                .errors(&[(503, "unavailable")])),
        route!(DELETE "/v1/admin/rooms/{room_id}/pin" => room_moderation::admin_unpin,
            doc("Remove a live room's pinned announcement", Admin).no_content().errors(&[(503, "unavailable")])),
        route!(GET "/v1/admin/rooms/{room_id}/viewers" => room_moderation::admin_list_viewers,
            doc("A live room's top viewers (as for users)", Admin).ok(200, "ViewerListView")
                .errors(&[(503, "unavailable")])
                .query(&[("limit", "integer", false, "How many, 1 to 500 (default 100)")])),
    ]
}

/// Liveness or readiness.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Health {
    /// `ok` or `ready`.
    status: &'static str,
}

/// Any JSON object (the OpenAPI document itself).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct OpenApiDocument {}

async fn healthz() -> ApiJson<Health> {
    ApiJson(Health { status: "ok" })
}

/// Ready when the dependencies are and an entity-id node lease is held: until then a request that
/// creates an entity (a device, a user, a group) would wait and may answer 503.
async fn readyz(State(st): State<AppState>) -> Result<ApiJson<Health>, ApiError> {
    if !(st.ready)() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "dependencies are not ready",
        ));
    }
    if !st.ids.ready() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "no entity-id node lease held yet",
        ));
    }
    Ok(ApiJson(Health { status: "ready" }))
}

async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        openapi_json().as_str(),
    )
        .into_response()
}

/// The schemas of every request and response body.
#[derive(OpenApi)]
#[openapi(components(schemas(
    error::ErrorBody,
    error::ErrorDetail,
    Health,
    OpenApiDocument,
    accounts::DeviceType,
    accounts::CreateDevice,
    accounts::DeviceCreated,
    accounts::SignUp,
    accounts::UserCreated,
    accounts::SignIn,
    accounts::SessionCreated,
    accounts::UserView,
    accounts::UpdateProfile,
    accounts::UserList,
    admin::UpsertUser,
    admin::MintToken,
    admin::TokenMinted,
    messages::Receiver,
    messages::AdminSendMessage,
    messages::SendMessage,
    messages::MessageSent,
    conversations::MessageView,
    conversations::ConversationView,
    conversations::ConversationList,
    conversations::ConversationChanged,
    conversations::HistoryPage,
    conversations::MarkRead,
    conversations::UpdateConversationSettings,
    conversations::RecalledView,
    conversations::GroupReaders,
    rooms::RoomView,
    rooms::UpdateRoom,
    rooms::AdminUpdateRoom,
    rooms::ServerNotice,
    rooms::NoticeSent,
    rooms::RoomShapingView,
    rooms::UpdateRoomShaping,
    rooms::ClassName,
    room_moderation::RoomBanView,
    room_moderation::RoomBanList,
    room_moderation::SetPin,
    room_moderation::PinView,
    room_moderation::ViewerView,
    room_moderation::ViewerListView,
    friends::CreateFriendRequest,
    friends::FriendRequestView,
    friends::FriendRequestList,
    friends::AgreeRequest,
    friends::FriendView,
    friends::FriendList,
    friends::UpdateFriend,
    groups::RoleName,
    groups::GroupView,
    groups::GroupCreated,
    groups::InvitationView,
    groups::InvitationList,
    groups::GroupList,
    groups::MemberView,
    groups::MemberPage,
    groups::CreateGroup,
    groups::UpdateGroup,
    groups::AddMembers,
    groups::MembersAdded,
    groups::UpdateMember,
)))]
struct Schemas;

/// The OpenAPI 3 document, built once from [`table`] and the derived schemas.
pub(crate) fn openapi_json() -> &'static String {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| openapi_value().to_string())
}

fn schema_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn error_response(codes: &[&str]) -> Value {
    json!({
        "description": format!("Error codes: {}", codes.join(", ")),
        "content": { "application/json": { "schema": schema_ref("ErrorBody") } },
    })
}

pub(crate) fn openapi_value() -> Value {
    let mut doc = serde_json::to_value(Schemas::openapi()).unwrap_or_else(|_| json!({}));
    let mut paths = Map::new();
    for spec in table() {
        let d = spec.doc;
        let mut errors: Vec<(u16, &str)> = d.errors.to_vec();
        if d.request.is_some() || !d.query.is_empty() || spec.path.contains('{') {
            errors.extend([(400, "bad_request"), (400, "invalid_argument")]);
        }
        if d.request.is_some() {
            errors.push((413, "payload_too_large"));
        }
        match d.access {
            Access::Public => {}
            Access::Bearer => errors.extend([
                (401, "unauthenticated"),
                (401, "token_expired"),
                (401, "token_revoked"),
            ]),
            Access::Admin => errors.extend([(401, "bad_admin_secret"), (404, "admin_disabled")]),
        }
        if spec.path.starts_with("/v1/") {
            errors.push((503, "unavailable"));
        }
        errors.sort_unstable();
        errors.dedup();

        let mut responses = Map::new();
        let (ok_status, ok_schema) = d.ok;
        responses.insert(
            ok_status.to_string(),
            match ok_schema {
                Some(name) => json!({
                    "description": "Success",
                    "content": { "application/json": { "schema": schema_ref(name) } },
                }),
                None => json!({ "description": "Success, no body" }),
            },
        );
        let mut i = 0;
        while i < errors.len() {
            let status = errors[i].0;
            let codes: Vec<&str> = errors[i..]
                .iter()
                .take_while(|e| e.0 == status)
                .map(|e| e.1)
                .collect();
            i += codes.len();
            responses.insert(status.to_string(), error_response(&codes));
        }

        let mut parameters: Vec<Value> = spec
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| match name {
                // A conversation's type: `user` or `group`.
                "type" => json!({ "name": name, "in": "path", "required": true,
                        "schema": { "type": "string", "enum": ["user", "group"] } }),
                _ => json!({ "name": name, "in": "path", "required": true,
                        "schema": { "type": "integer", "format": "int64" } }),
            })
            .collect();
        parameters.extend(d.query.iter().map(|(name, ty, required, description)| {
            json!({ "name": name, "in": "query", "required": required, "description": description,
                    "schema": { "type": ty } })
        }));

        let mut op = json!({
            "summary": d.summary,
            "operationId": format!("{}_{}", spec.method.as_str().to_lowercase(),
                spec.path.trim_start_matches('/').replace(['/', '.'], "_").replace(['{', '}'], "")),
            "tags": [tag(spec.path)],
            "responses": responses,
        });
        if !parameters.is_empty() {
            op["parameters"] = Value::Array(parameters);
        }
        if let Some(name) = d.request {
            op["requestBody"] = json!({
                "required": !d.request_optional,
                "content": { "application/json": { "schema": schema_ref(name) } },
            });
        }
        match d.access {
            Access::Public => {}
            Access::Bearer => op["security"] = json!([{ "bearer": [] }]),
            Access::Admin => op["security"] = json!([{ "adminSecret": [] }]),
        }
        let item = paths.entry(spec.path).or_insert_with(|| json!({}));
        item[spec.method.as_str().to_lowercase()] = op;
    }
    doc["openapi"] = json!("3.1.0");
    doc["info"] = json!({
        "title": "zhibo user-api",
        "version": env!("CARGO_PKG_VERSION"),
        "description": "Accounts, devices, tokens, friends, groups and server-side sends. Entity ids are \
            JSON numbers below 2^53; message ids are strings. Errors are {\"error\": {\"code\", \"message\"}}.",
    });
    doc["paths"] = Value::Object(paths);
    doc["components"]["securitySchemes"] = json!({
        "bearer": { "type": "http", "scheme": "bearer", "bearerFormat": "JWT (HS256)" },
        "adminSecret": { "type": "apiKey", "in": "header", "name": "X-Admin-Secret" },
    });
    doc
}

fn tag(path: &str) -> &str {
    match path
        .trim_start_matches('/')
        .split('/')
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["v1", "admin", ..] => "admin",
        ["v1", "sessions", ..] | ["v1", "users", ..] | ["v1", "devices", ..] => "accounts",
        ["v1", section, ..] => section,
        _ => "health",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_referenced_schema_exists_and_routes_are_unique() {
        let doc = openapi_value();
        let schemas = doc["components"]["schemas"].as_object().expect("schemas");
        let mut seen = std::collections::BTreeSet::new();
        for spec in table() {
            assert!(
                seen.insert((spec.method.to_string(), spec.path)),
                "duplicate {} {}",
                spec.method,
                spec.path
            );
            for name in spec.doc.request.into_iter().chain(spec.doc.ok.1) {
                assert!(
                    schemas.contains_key(name),
                    "{} {} names unknown schema {name}",
                    spec.method,
                    spec.path
                );
            }
        }
        assert!(schemas.contains_key("ErrorBody"));
    }
}
