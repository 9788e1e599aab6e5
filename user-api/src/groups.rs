//! Groups and their members. Only members read a group; owner and admins change it and its members;
//! only the owner changes roles, transfers ownership or dissolves it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use futures::{StreamExt as _, TryStreamExt as _};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use zhibo_logic::MembershipChange;
use zhibo_proto::client::ReceiverType;
use zhibo_store::ids::now_ms;
use zhibo_store::{Group, GroupInvite, GroupMember, Role, SeqAllocator};

use crate::accounts::user_not_found;
use crate::auth::Caller;
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use crate::state::AppState;
use crate::validate::{self, MAX_NAME, MAX_URL};
use crate::GroupAddPolicy;

/// Store calls one request keeps in flight when it touches many users.
const FAN_OUT: usize = 32;

/// How long a change may hold its group's lock: one whose process dies holding it frees it then.
const LOCK_TTL: Duration = Duration::from_secs(30);

/// How long a change waits for its group's lock before answering 503.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// The lock that serializes the changes of one group (its record, members, roles, invitations
/// accepted, dissolution) across every user-api process. Each change reads, checks, then writes:
/// two changes checked against the same state would both pass (two ownership transfers by one owner
/// made two owners; a transfer to a member being removed left the group owned by a non-member).
/// Taken only after a first check that the caller may act on the group, so an outsider cannot hold
/// it; the change then reads everything again under it. Freed when dropped (also when the request
/// is dropped half-way).
struct GroupLock {
    seq: Arc<dyn SeqAllocator>,
    name: String,
    holder: String,
}

impl GroupLock {
    /// Waits up to [`LOCK_WAIT`] for `group_id`'s lock.
    async fn take(st: &AppState, group_id: i64) -> Result<GroupLock, ApiError> {
        let mut lock = GroupLock {
            seq: st.stores.seq.clone(),
            name: format!("group:{group_id}"),
            holder: format!("{:016x}", rand::random::<u64>()),
        };
        let deadline = tokio::time::Instant::now() + LOCK_WAIT;
        let mut pause = Duration::from_millis(2);
        loop {
            match lock.seq.try_lock(&lock.name, &lock.holder, LOCK_TTL).await {
                Ok(true) => return Ok(lock),
                Ok(false) if tokio::time::Instant::now() < deadline => {}
                Ok(false) => {
                    // Another holder's: nothing to free.
                    lock.holder.clear();
                    return Err(ApiError::unavailable_with(
                        "another change of this group is in progress; retry",
                        format!("group {group_id} lock not taken in {LOCK_WAIT:?}"),
                    ));
                }
                Err(e) => {
                    // The lock may have been taken by the failed call: freed (or it expires).
                    drop(lock);
                    return Err(e.into());
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// [`as_member`], then [`Self::take`]: the caller reads everything again under the lock.
    async fn as_member(st: &AppState, group_id: i64, user_id: i64) -> Result<GroupLock, ApiError> {
        as_member(st, group_id, user_id).await?;
        Self::take(st, group_id).await
    }
}

impl Drop for GroupLock {
    fn drop(&mut self) {
        if self.holder.is_empty() {
            return;
        }
        let (seq, name, holder) = (
            self.seq.clone(),
            std::mem::take(&mut self.name),
            std::mem::take(&mut self.holder),
        );
        // Spawned: a handler answers without waiting for it. Outside a runtime (never in a handler)
        // the lock expires instead.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = seq.unlock(&name, &holder).await {
                    tracing::warn!(lock = %name, error = %e, "group lock not freed; it expires");
                }
            });
        }
    }
}

/// A member's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RoleName {
    Member,
    Admin,
    Owner,
}

impl From<Role> for RoleName {
    fn from(r: Role) -> Self {
        match r {
            Role::Member => RoleName::Member,
            Role::Admin => RoleName::Admin,
            Role::Owner => RoleName::Owner,
        }
    }
}

/// A group as its members see it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct GroupView {
    group_id: i64,
    name: String,
    avatar_url: String,
    introduction: String,
    owner_id: i64,
    extra: String,
    created_at_ms: i64,
}

impl From<Group> for GroupView {
    fn from(g: Group) -> Self {
        GroupView {
            group_id: g.group_id,
            name: g.name,
            avatar_url: g.avatar_url,
            introduction: g.introduction,
            owner_id: g.owner_id,
            extra: g.extra,
            created_at_ms: g.created_at_ms,
        }
    }
}

/// The caller's groups.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct GroupList {
    groups: Vec<GroupView>,
}

/// A member of a group.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct MemberView {
    user_id: i64,
    role: RoleName,
    /// The member's name inside this group.
    remark: String,
    joined_at_ms: i64,
}

impl From<GroupMember> for MemberView {
    fn from(m: GroupMember) -> Self {
        MemberView {
            user_id: m.user_id,
            role: m.role.into(),
            remark: m.remark,
            joined_at_ms: m.joined_at_ms,
        }
    }
}

/// One page of members, ordered by user id.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct MemberPage {
    members: Vec<MemberView>,
    /// Pass as `after` for the next page; null on the last page.
    next_after: Option<i64>,
}

fn group_not_found() -> ApiError {
    ApiError::not_found("group_not_found", "no such group")
}

fn not_member() -> ApiError {
    ApiError::forbidden("not_group_member", "you are not a member of this group")
}

fn forbidden(what: &str) -> ApiError {
    ApiError::forbidden("forbidden", format!("only {what} may do this"))
}

fn too_large(max: usize) -> ApiError {
    ApiError::invalid(format!("a group has at most {max} members")).with_code("group_too_large")
}

async fn load_group(st: &AppState, group_id: i64) -> Result<Group, ApiError> {
    st.stores
        .groups
        .get_group(group_id)
        .await?
        .ok_or_else(group_not_found)
}

/// The group and the caller's membership: 404 for an unknown group, 403 for a non-member.
async fn as_member(
    st: &AppState,
    group_id: i64,
    user_id: i64,
) -> Result<(Group, GroupMember), ApiError> {
    let group = load_group(st, group_id).await?;
    let member = st
        .stores
        .groups
        .get_member(group_id, user_id)
        .await?
        .ok_or_else(not_member)?;
    Ok((group, member))
}

/// [`as_member`] for an owner or admin.
async fn as_manager(
    st: &AppState,
    group_id: i64,
    user_id: i64,
) -> Result<(Group, GroupMember), ApiError> {
    let (group, member) = as_member(st, group_id, user_id).await?;
    if member.role < Role::Admin {
        return Err(forbidden("the owner and admins"));
    }
    Ok((group, member))
}

/// Distinct valid ids of `ids` without `except`; 404 if any is not a user.
async fn existing_users(st: &AppState, ids: &[i64], except: i64) -> Result<Vec<i64>, ApiError> {
    let ids: BTreeSet<i64> = ids.iter().copied().filter(|&id| id != except).collect();
    for &id in &ids {
        validate::id("user id", id)?;
    }
    let users = st.stores.users.clone();
    futures::stream::iter(ids)
        .map(|id| {
            let users = users.clone();
            async move {
                match users.get_user(id).await? {
                    Some(_) => Ok(id),
                    None => Err(user_not_found()),
                }
            }
        })
        .buffered(FAN_OUT)
        .try_collect()
        .await
}

/// Writes `user_ids` as members, then emits their `group.member_joined` webhook events (when
/// configured), `by_user_id` having added them (or themselves, accepting an invitation).
async fn put_members(
    st: &AppState,
    group_id: i64,
    user_ids: &[i64],
    now: i64,
    by_user_id: i64,
) -> Result<(), ApiError> {
    let written = futures::stream::iter(user_ids.iter().copied())
        .map(|user_id| {
            let groups = st.stores.groups.clone();
            async move {
                groups
                    .put_member(&GroupMember {
                        group_id,
                        user_id,
                        role: Role::Member,
                        remark: String::new(),
                        joined_at_ms: now,
                    })
                    .await?;
                join_conversation(st, group_id, user_id).await
            }
        })
        .buffer_unordered(FAN_OUT)
        .try_collect::<Vec<()>>()
        .await;
    // Before the answer: the next send, on any worker, includes them. Also after a failure: a write
    // that failed may still have landed (a timed-out batch), and a retry finds the member already in.
    st.logic.group_members_changed(group_id).await;
    written?;
    if st.logic.webhooks().is_some() {
        for &user_id in user_ids {
            st.logic
                .group_membership_changed(MembershipChange::Joined, group_id, user_id, by_user_id)
                .await;
        }
    }
    Ok(())
}

/// Gives a new member their row of the group's conversation, read up to its current last message
/// (older messages are not in their inbox and must not count as unread).
async fn join_conversation(st: &AppState, group_id: i64, user_id: i64) -> Result<(), ApiError> {
    st.logic
        .join_group_conversation(user_id, group_id)
        .await
        .map_err(|e| crate::messages::logic_error(e, ReceiverType::Group))
}

/// Splits `users` (existing users, not members yet) into those `adder` may add directly and those who get
/// an invitation, by [`GroupAddPolicy`]: only the adder's friends are added without their consent.
///
/// # Errors
/// 403 `not_friends` under the `friends` policy when one of `users` is not the adder's friend.
async fn split_by_policy(
    st: &AppState,
    adder: i64,
    users: Vec<i64>,
) -> Result<(Vec<i64>, Vec<i64>), ApiError> {
    if st.config.group_add_policy == GroupAddPolicy::Open {
        return Ok((users, Vec::new()));
    }
    let friends = st.stores.friends.clone();
    // The target's own friend list decides: they agreed to this friendship.
    let is_friend: Vec<(i64, bool)> = futures::stream::iter(users)
        .map(|user_id| {
            let friends = friends.clone();
            async move {
                Ok::<_, ApiError>((user_id, friends.get_friend(user_id, adder).await?.is_some()))
            }
        })
        .buffered(FAN_OUT)
        .try_collect()
        .await?;
    let (direct, others): (Vec<_>, Vec<_>) = is_friend.into_iter().partition(|(_, f)| *f);
    if st.config.group_add_policy == GroupAddPolicy::Friends && !others.is_empty() {
        return Err(ApiError::forbidden(
            "not_friends",
            "only your friends can be added to a group",
        ));
    }
    Ok((
        direct.into_iter().map(|(u, _)| u).collect(),
        others.into_iter().map(|(u, _)| u).collect(),
    ))
}

async fn put_invites(
    st: &AppState,
    group_id: i64,
    inviter_id: i64,
    user_ids: &[i64],
    now: i64,
) -> Result<(), ApiError> {
    futures::stream::iter(user_ids.iter().copied())
        .map(|user_id| {
            let invites = st.stores.group_invites.clone();
            async move {
                invites
                    .put_invite(&GroupInvite {
                        group_id,
                        user_id,
                        inviter_id,
                        created_at_ms: now,
                    })
                    .await
            }
        })
        .buffer_unordered(FAN_OUT)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// A new group; the caller becomes its owner.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateGroup {
    /// 1 to 64 characters.
    name: String,
    #[serde(default)]
    avatar_url: String,
    #[serde(default)]
    introduction: String,
    #[serde(default)]
    extra: String,
    /// Initial members besides the creator: added directly or invited, by the server's group-add
    /// policy (see `GroupCreated.invited`).
    #[serde(default)]
    member_ids: Vec<i64>,
}

/// The new group, and who was invited instead of added (they join by accepting).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct GroupCreated {
    #[serde(flatten)]
    group: GroupView,
    /// Users who got an invitation rather than membership (not the creator's friends).
    invited: Vec<i64>,
}

fn check_name(name: &str) -> Result<(), ApiError> {
    if name.trim().is_empty() {
        return Err(ApiError::invalid("name must not be empty"));
    }
    validate::text("name", name, MAX_NAME)
}

pub(crate) async fn create_group(
    State(st): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<CreateGroup>,
) -> Result<(StatusCode, ApiJson<GroupCreated>), ApiError> {
    check_name(&req.name)?;
    validate::url("avatar_url", &req.avatar_url, MAX_URL)?;
    validate::extra("introduction", &req.introduction)?;
    validate::extra("extra", &req.extra)?;
    let max = st.config.max_group_size;
    if req.member_ids.len() > max {
        return Err(too_large(max));
    }
    let users = existing_users(&st, &req.member_ids, caller.user_id).await?;
    let (members, invited) = split_by_policy(&st, caller.user_id, users).await?;
    if members.len() + 1 > max {
        return Err(too_large(max));
    }
    let now = now_ms();
    let group = Group {
        group_id: st.ids.next_i64().await?,
        name: req.name,
        avatar_url: req.avatar_url,
        introduction: req.introduction,
        owner_id: caller.user_id,
        extra: req.extra,
        created_at_ms: now,
    };
    st.stores.groups.put_group(&group).await?;
    st.stores
        .groups
        .put_member(&GroupMember {
            group_id: group.group_id,
            user_id: caller.user_id,
            role: Role::Owner,
            remark: String::new(),
            joined_at_ms: now,
        })
        .await?;
    join_conversation(&st, group.group_id, caller.user_id).await?;
    put_members(&st, group.group_id, &members, now, caller.user_id).await?;
    put_invites(&st, group.group_id, caller.user_id, &invited, now).await?;
    Ok((
        StatusCode::CREATED,
        ApiJson(GroupCreated {
            group: group.into(),
            invited,
        }),
    ))
}

pub(crate) async fn get_group(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(group_id): ApiPath<i64>,
) -> Result<ApiJson<GroupView>, ApiError> {
    let (group, _) = as_member(&st, group_id, caller.user_id).await?;
    Ok(ApiJson(group.into()))
}

pub(crate) async fn list_groups(
    State(st): State<AppState>,
    caller: Caller,
) -> Result<ApiJson<GroupList>, ApiError> {
    let ids = st.stores.groups.groups_of_user(caller.user_id).await?;
    let groups: Vec<Option<Group>> = futures::stream::iter(ids)
        .map(|id| {
            let groups = st.stores.groups.clone();
            async move { groups.get_group(id).await }
        })
        .buffered(FAN_OUT)
        .try_collect()
        .await?;
    Ok(ApiJson(GroupList {
        // A group dissolved between the two reads is skipped.
        groups: groups.into_iter().flatten().map(Into::into).collect(),
    }))
}

/// Group fields to change; absent fields keep their value.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdateGroup {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    avatar_url: Option<String>,
    #[serde(default)]
    introduction: Option<String>,
    #[serde(default)]
    extra: Option<String>,
}

pub(crate) async fn update_group(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(group_id): ApiPath<i64>,
    ApiJson(req): ApiJson<UpdateGroup>,
) -> Result<ApiJson<GroupView>, ApiError> {
    let _lock = GroupLock::as_member(&st, group_id, caller.user_id).await?;
    let (mut group, _) = as_manager(&st, group_id, caller.user_id).await?;
    if let Some(v) = req.name {
        check_name(&v)?;
        group.name = v;
    }
    if let Some(v) = req.avatar_url {
        validate::url("avatar_url", &v, MAX_URL)?;
        group.avatar_url = v;
    }
    if let Some(v) = req.introduction {
        validate::extra("introduction", &v)?;
        group.introduction = v;
    }
    if let Some(v) = req.extra {
        validate::extra("extra", &v)?;
        group.extra = v;
    }
    st.stores.groups.put_group(&group).await?;
    Ok(ApiJson(group.into()))
}

pub(crate) async fn dissolve_group(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(group_id): ApiPath<i64>,
) -> Result<StatusCode, ApiError> {
    let _lock = GroupLock::as_member(&st, group_id, caller.user_id).await?;
    let (group, _) = as_member(&st, group_id, caller.user_id).await?;
    if group.owner_id != caller.user_id {
        return Err(forbidden("the owner"));
    }
    // Announced also after a failure: the delete may have landed in part (see `put_members`).
    let deleted = st.stores.groups.delete_group(group_id).await;
    st.logic.group_members_changed(group_id).await;
    deleted?;
    Ok(StatusCode::NO_CONTENT)
}

/// Users to add as members.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AddMembers {
    user_ids: Vec<i64>,
}

/// Who was added (users already in the group are left as they are), and who was invited instead.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct MembersAdded {
    added: Vec<i64>,
    /// Users who got an invitation rather than membership (not the adder's friends, under the
    /// `invite` group-add policy); they join by accepting it.
    invited: Vec<i64>,
}

pub(crate) async fn add_members(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(group_id): ApiPath<i64>,
    ApiJson(req): ApiJson<AddMembers>,
) -> Result<ApiJson<MembersAdded>, ApiError> {
    let _lock = GroupLock::as_member(&st, group_id, caller.user_id).await?;
    as_manager(&st, group_id, caller.user_id).await?;
    let max = st.config.max_group_size;
    if req.user_ids.len() > max {
        return Err(too_large(max));
    }
    let current: BTreeSet<i64> = st
        .stores
        .groups
        .member_ids(group_id)
        .await?
        .into_iter()
        .collect();
    let wanted: Vec<i64> = req
        .user_ids
        .iter()
        .copied()
        .filter(|id| !current.contains(id))
        .collect();
    let users = existing_users(&st, &wanted, caller.user_id).await?;
    let (added, invited) = split_by_policy(&st, caller.user_id, users).await?;
    // Checked under the group's lock: two additions cannot both pass it.
    if current.len() + added.len() > max {
        return Err(too_large(max));
    }
    let now = now_ms();
    put_members(&st, group_id, &added, now, caller.user_id).await?;
    put_invites(&st, group_id, caller.user_id, &invited, now).await?;
    Ok(ApiJson(MembersAdded { added, invited }))
}

fn member_not_found() -> ApiError {
    ApiError::not_found("member_not_found", "this user is not a member of the group")
}

pub(crate) async fn remove_member(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath((group_id, user_id)): ApiPath<(i64, i64)>,
) -> Result<StatusCode, ApiError> {
    let _lock = GroupLock::as_member(&st, group_id, caller.user_id).await?;
    let (_, me) = as_manager(&st, group_id, caller.user_id).await?;
    let target = st
        .stores
        .groups
        .get_member(group_id, user_id)
        .await?
        .ok_or_else(member_not_found)?;
    if target.role == Role::Owner {
        return Err(ApiError::forbidden(
            "cannot_remove_owner",
            "the owner cannot be removed",
        ));
    }
    if target.role == Role::Admin && me.role != Role::Owner && target.user_id != me.user_id {
        return Err(forbidden("the owner"));
    }
    let deleted = st.stores.groups.delete_member(group_id, user_id).await;
    st.logic.group_members_changed(group_id).await;
    deleted?;
    st.logic
        .group_membership_changed(MembershipChange::Kicked, group_id, user_id, caller.user_id)
        .await;
    Ok(StatusCode::NO_CONTENT)
}

/// A member's role or remark. `role: "owner"` transfers ownership (the old owner becomes an admin).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdateMember {
    /// Owner only.
    #[serde(default)]
    role: Option<RoleName>,
    /// The member themselves, or the owner or an admin.
    #[serde(default)]
    remark: Option<String>,
}

pub(crate) async fn update_member(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath((group_id, user_id)): ApiPath<(i64, i64)>,
    ApiJson(req): ApiJson<UpdateMember>,
) -> Result<ApiJson<MemberView>, ApiError> {
    let _lock = GroupLock::as_member(&st, group_id, caller.user_id).await?;
    let (mut group, mut me) = as_member(&st, group_id, caller.user_id).await?;
    let mut target = st
        .stores
        .groups
        .get_member(group_id, user_id)
        .await?
        .ok_or_else(member_not_found)?;
    if let Some(remark) = req.remark {
        if user_id != caller.user_id && me.role < Role::Admin {
            return Err(forbidden("the member, the owner and admins"));
        }
        validate::text("remark", &remark, MAX_NAME)?;
        target.remark = remark;
    }
    let mut transfer = false;
    if let Some(role) = req.role {
        if me.role != Role::Owner {
            return Err(forbidden("the owner"));
        }
        if user_id == caller.user_id {
            if role != RoleName::Owner {
                return Err(ApiError::invalid(
                    "the owner's role changes only by transferring ownership",
                ));
            }
        } else {
            target.role = match role {
                RoleName::Member => Role::Member,
                RoleName::Admin => Role::Admin,
                RoleName::Owner => Role::Owner,
            };
            transfer = role == RoleName::Owner;
        }
    }
    let written = if transfer {
        // One store operation: a failure part-way must never leave two owners.
        group.owner_id = user_id;
        me.role = Role::Admin;
        st.stores
            .groups
            .transfer_ownership(&group, &target, &me)
            .await
    } else {
        st.stores.groups.put_member(&target).await
    };
    // These upserts write back a member read above: one removed meanwhile is in again, and the
    // next send must deliver to them as the store now says.
    st.logic.group_members_changed(group_id).await;
    written?;
    Ok(ApiJson(target.into()))
}

pub(crate) async fn leave_group(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(group_id): ApiPath<i64>,
) -> Result<StatusCode, ApiError> {
    let _lock = GroupLock::as_member(&st, group_id, caller.user_id).await?;
    let (_, me) = as_member(&st, group_id, caller.user_id).await?;
    if me.role == Role::Owner {
        return Err(
            ApiError::invalid("transfer ownership or dissolve the group first")
                .with_code("owner_cannot_leave"),
        );
    }
    let deleted = st
        .stores
        .groups
        .delete_member(group_id, caller.user_id)
        .await;
    st.logic.group_members_changed(group_id).await;
    deleted?;
    st.logic
        .group_membership_changed(
            MembershipChange::Left,
            group_id,
            caller.user_id,
            caller.user_id,
        )
        .await;
    Ok(StatusCode::NO_CONTENT)
}

/// `?after=<user id>&limit=<1..=500>`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MembersQuery {
    #[serde(default)]
    after: i64,
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    100
}

const MAX_PAGE: usize = 500;

pub(crate) async fn list_members(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(group_id): ApiPath<i64>,
    ApiQuery(q): ApiQuery<MembersQuery>,
) -> Result<ApiJson<MemberPage>, ApiError> {
    if !(1..=MAX_PAGE).contains(&q.limit) {
        return Err(ApiError::invalid(format!("limit must be 1..={MAX_PAGE}")));
    }
    as_member(&st, group_id, caller.user_id).await?;
    let mut members = st
        .stores
        .groups
        .list_members(group_id, q.after, q.limit + 1)
        .await?;
    let next_after = if members.len() > q.limit {
        members.truncate(q.limit);
        members.last().map(|m| m.user_id)
    } else {
        None
    };
    Ok(ApiJson(MemberPage {
        members: members.into_iter().map(Into::into).collect(),
        next_after,
    }))
}

/// A pending invitation into a group, as the invitee sees it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct InvitationView {
    group_id: i64,
    /// The group's current name.
    group_name: String,
    inviter_id: i64,
    created_at_ms: i64,
}

/// The caller's pending group invitations, ordered by group id.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct InvitationList {
    invitations: Vec<InvitationView>,
}

fn invitation_not_found() -> ApiError {
    ApiError::not_found(
        "group_invitation_not_found",
        "no pending invitation into this group",
    )
}

pub(crate) async fn list_invitations(
    State(st): State<AppState>,
    caller: Caller,
) -> Result<ApiJson<InvitationList>, ApiError> {
    let invites = st.stores.group_invites.list_invites(caller.user_id).await?;
    let views: Vec<Option<InvitationView>> =
        futures::stream::iter(invites)
            .map(|inv| {
                let groups = st.stores.groups.clone();
                async move {
                    // An invitation into a dissolved group is skipped (and dropped when answered).
                    Ok::<_, ApiError>(groups.get_group(inv.group_id).await?.map(|g| {
                        InvitationView {
                            group_id: inv.group_id,
                            group_name: g.name,
                            inviter_id: inv.inviter_id,
                            created_at_ms: inv.created_at_ms,
                        }
                    }))
                }
            })
            .buffered(FAN_OUT)
            .try_collect()
            .await?;
    Ok(ApiJson(InvitationList {
        invitations: views.into_iter().flatten().collect(),
    }))
}

pub(crate) async fn accept_invitation(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(group_id): ApiPath<i64>,
) -> Result<ApiJson<GroupView>, ApiError> {
    let invites = &st.stores.group_invites;
    if invites
        .get_invite(group_id, caller.user_id)
        .await?
        .is_none()
    {
        return Err(invitation_not_found());
    }
    let _lock = GroupLock::take(&st, group_id).await?;
    let Some(group) = st.stores.groups.get_group(group_id).await? else {
        invites.delete_invite(group_id, caller.user_id).await?;
        return Err(group_not_found());
    };
    if st
        .stores
        .groups
        .get_member(group_id, caller.user_id)
        .await?
        .is_none()
    {
        let max = st.config.max_group_size;
        // Under the group's lock, like `add_members`.
        if st.stores.groups.member_ids(group_id).await?.len() + 1 > max {
            return Err(too_large(max));
        }
        put_members(&st, group_id, &[caller.user_id], now_ms(), caller.user_id).await?;
    }
    invites.delete_invite(group_id, caller.user_id).await?;
    Ok(ApiJson(group.into()))
}

pub(crate) async fn refuse_invitation(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(group_id): ApiPath<i64>,
) -> Result<StatusCode, ApiError> {
    let invites = &st.stores.group_invites;
    if invites
        .get_invite(group_id, caller.user_id)
        .await?
        .is_none()
    {
        return Err(invitation_not_found());
    }
    invites.delete_invite(group_id, caller.user_id).await?;
    Ok(StatusCode::NO_CONTENT)
}
