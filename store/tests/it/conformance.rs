//! The storage conformance suite, written once and run against every backend.
//!
//! Each check uses fresh ids from a process-wide, time-based generator, so the suite can run many times
//! against the same persistent database and concurrently against several backends in one process.

mod conversations;
pub(crate) mod outbox;

use std::sync::OnceLock;

use bytes::Bytes;
use zhibo_proto::client::{Message, ReceiverType};
use zhibo_store::ids::{now_ms, IdGen};
use zhibo_store::{
    Device, ErrorKind, Friend, FriendRequest, Group, GroupInvite, GroupMember, Profile, Role, Room,
    RoomBan, RoomPin, RoomShaping, SendPlan, Stores, User,
};

/// Runs every check against `stores`; panics with a message naming the broken behaviour.
pub(crate) async fn run_all(stores: Stores) {
    devices(&stores).await;
    users(&stores).await;
    upserted_users(&stores).await;
    friends(&stores).await;
    groups(&stores).await;
    ownership_transfer(&stores).await;
    group_invites(&stores).await;
    inbox(&stores).await;
    fan_out(&stores).await;
    dedup(&stores).await;
    record_send(&stores).await;
    acks(&stores).await;
    seq(&stores).await;
    locks(&stores).await;
    node_leases(&stores).await;
    rooms(&stores).await;
    room_history(&stores).await;
    conversations::run_all(&stores).await;
    room_shaping(&stores).await;
    room_moderation(&stores).await;
}

/// A lock has one holder until it is freed by that holder or expires; another holder's unlock
/// changes nothing; locks of other names are independent.
async fn locks(s: &Stores) {
    use std::time::Duration;
    let name = format!("conformance-{}", id());
    let other = format!("conformance-{}", id());
    let long = Duration::from_secs(60);
    let take = |holder: &'static str, name: String, ttl| {
        let seq = s.seq.clone();
        async move { seq.try_lock(&name, holder, ttl).await.expect("try_lock") }
    };
    assert!(take("a", name.clone(), long).await, "a free lock is taken");
    assert!(
        !take("b", name.clone(), long).await,
        "a held lock is refused"
    );
    assert!(!take("a", name.clone(), long).await, "not re-entrant");
    assert!(take("b", other.clone(), long).await, "another name is free");
    s.seq.unlock(&name, "b").await.expect("unlock by b");
    assert!(
        !take("c", name.clone(), long).await,
        "an unlock by someone else frees nothing"
    );
    s.seq.unlock(&name, "a").await.expect("unlock by a");
    assert!(take("c", name.clone(), long).await, "freed by its holder");
    s.seq.unlock(&name, "c").await.expect("unlock");
    s.seq.unlock(&other, "b").await.expect("unlock");
    // A holder that never unlocks: the lock frees itself after its ttl.
    assert!(take("d", name.clone(), Duration::from_millis(300)).await);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !take("e", name.clone(), long).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "an expired lock was never freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.seq.unlock(&name, "e").await.expect("unlock");
}

/// A fresh entity id, unique in this process and across runs.
pub(crate) fn id() -> i64 {
    static IDS: OnceLock<IdGen> = OnceLock::new();
    IDS.get_or_init(|| IdGen::entities(u64::from(std::process::id())))
        .next_i64()
}

fn user(user_id: i64, username: &str) -> User {
    User {
        user_id,
        username: username.to_owned(),
        password_hash: String::new(),
        profile: Profile {
            nickname: format!("nick {user_id}"),
            avatar_url: String::new(),
            extra: "{}".to_owned(),
        },
        created_at_ms: 1_700_000_000_000,
        updated_at_ms: 1_700_000_000_000,
    }
}

fn message(receiver_id: i64, seq: u64) -> Message {
    Message {
        message_id: 1_000_000 + seq,
        seq,
        sender_user_id: 42,
        sender_device_id: 43,
        receiver_type: ReceiverType::User as i32,
        receiver_id,
        client_msg_id: format!("client-{receiver_id}-{seq}"),
        server_time_ms: 1_700_000_000_000 + seq as i64,
        content_type: 1,
        content: Bytes::from(format!("hello #{seq}")),
        conv_seq: 0,
    }
}

fn seqs(messages: &[Message]) -> Vec<u64> {
    messages.iter().map(|m| m.seq).collect()
}

async fn devices(s: &Stores) {
    let device = Device {
        device_id: id(),
        device_type: "android".into(),
        brand: "xiaomi".into(),
        model: "mi 14".into(),
        system_version: "14".into(),
        sdk_version: "1.0.0".into(),
        tokens_valid_after_ms: 0,
        created_at_ms: 1_700_000_000_000,
        owner_user_id: 0,
    };
    s.devices
        .insert_device(&device)
        .await
        .expect("insert_device");
    let got = s
        .devices
        .get_device(device.device_id)
        .await
        .expect("get_device");
    assert_eq!(
        got.as_ref(),
        Some(&device),
        "a device reads back as inserted"
    );
    assert_eq!(
        s.devices
            .get_device(id())
            .await
            .expect("get_device unknown"),
        None,
        "an unknown device is None"
    );

    s.devices
        .revoke_tokens_before(device.device_id, 1_700_000_500_000)
        .await
        .expect("revoke_tokens_before");
    let got = s
        .devices
        .get_device(device.device_id)
        .await
        .expect("get_device")
        .expect("device");
    assert_eq!(
        got.tokens_valid_after_ms, 1_700_000_500_000,
        "sign-out revokes earlier tokens"
    );
    assert_eq!(
        got.brand, device.brand,
        "revoking keeps the rest of the device"
    );

    let err = s
        .devices
        .revoke_tokens_before(id(), 1)
        .await
        .expect_err("revoking an unknown device fails");
    assert_eq!(
        err.kind,
        ErrorKind::NotFound,
        "revoking an unknown device is NotFound"
    );

    // Binding: the first user wins, for good; the owner reads back; revocation keeps it.
    let (bob, carol) = (id(), id());
    assert_eq!(
        s.devices
            .bind_device(device.device_id, bob)
            .await
            .expect("bind"),
        bob,
        "an unbound device binds to its first user"
    );
    assert_eq!(
        s.devices
            .bind_device(device.device_id, bob)
            .await
            .expect("bind again"),
        bob,
        "binding the owner again is a no-op"
    );
    assert_eq!(
        s.devices
            .bind_device(device.device_id, carol)
            .await
            .expect("bind other"),
        bob,
        "another user gets the owner back, and the device stays bound to it"
    );
    s.devices
        .revoke_tokens_before(device.device_id, 1_700_000_600_000)
        .await
        .expect("revoke");
    let got = s
        .devices
        .get_device(device.device_id)
        .await
        .expect("get_device")
        .expect("device");
    assert_eq!(
        (got.owner_user_id, got.tokens_valid_after_ms),
        (bob, 1_700_000_600_000)
    );
    let err = s
        .devices
        .bind_device(id(), bob)
        .await
        .expect_err("binding an unknown device fails");
    assert_eq!(err.kind, ErrorKind::NotFound);
    assert_eq!(
        s.devices.get_device(id()).await.expect("get"),
        None,
        "a failed bind creates nothing"
    );
    // Two users racing for one fresh device: exactly one wins, and both are told the same owner.
    let race = Device {
        device_id: id(),
        ..device.clone()
    };
    s.devices.insert_device(&race).await.expect("insert");
    let (a, b) = tokio::join!(
        s.devices.bind_device(race.device_id, bob),
        s.devices.bind_device(race.device_id, carol)
    );
    let (a, b) = (a.expect("bind bob"), b.expect("bind carol"));
    assert_eq!(a, b, "one owner");
    assert!(a == bob || a == carol);
}

async fn users(s: &Stores) {
    let alice = user(id(), &format!("alice{}", id()));
    s.users.insert_user(&alice).await.expect("insert_user");
    assert_eq!(
        s.users.get_user(alice.user_id).await.expect("get_user"),
        Some(alice.clone()),
        "a user reads back by id"
    );
    assert_eq!(
        s.users
            .get_user_by_username(&alice.username)
            .await
            .expect("get_user_by_username"),
        Some(alice.clone()),
        "a user reads back by username"
    );
    assert_eq!(
        s.users.get_user(id()).await.expect("get_user unknown"),
        None,
        "unknown id is None"
    );
    assert_eq!(
        s.users
            .get_user_by_username(&format!("nobody{}", id()))
            .await
            .expect("by unknown username"),
        None,
        "unknown username is None"
    );

    let impostor = user(id(), &alice.username);
    let err = s
        .users
        .insert_user(&impostor)
        .await
        .expect_err("duplicate username");
    assert_eq!(
        err.kind,
        ErrorKind::Conflict,
        "a taken username is Conflict"
    );
    assert_eq!(
        s.users.get_user(impostor.user_id).await.expect("get_user"),
        None,
        "a conflicting insert creates nothing"
    );

    let same_id = user(alice.user_id, &format!("other{}", id()));
    let err = s
        .users
        .insert_user(&same_id)
        .await
        .expect_err("duplicate user id");
    assert_eq!(err.kind, ErrorKind::Conflict, "a taken user id is Conflict");
    assert_eq!(
        s.users
            .get_user_by_username(&same_id.username)
            .await
            .expect("get_user_by_username"),
        None,
        "a conflicting insert does not claim its username"
    );

    let profile = Profile {
        nickname: "Alice W.".into(),
        avatar_url: "https://example.com/a.png".into(),
        extra: r#"{"vip":true}"#.into(),
    };
    s.users
        .update_profile(alice.user_id, &profile)
        .await
        .expect("update_profile");
    let got = s
        .users
        .get_user(alice.user_id)
        .await
        .expect("get_user")
        .expect("alice");
    assert_eq!(got.profile, profile, "update_profile replaces the profile");
    assert_eq!(
        got.username, alice.username,
        "update_profile keeps the username"
    );
    let err = s
        .users
        .update_profile(id(), &profile)
        .await
        .expect_err("unknown user");
    assert_eq!(
        err.kind,
        ErrorKind::NotFound,
        "updating an unknown user is NotFound"
    );
}

async fn upserted_users(s: &Stores) {
    let mut bob = user(id(), &format!("bob{}", id()));
    s.users
        .upsert_user(&bob)
        .await
        .expect("upsert_user creates");
    assert_eq!(
        s.users
            .get_user_by_username(&bob.username)
            .await
            .expect("by username"),
        Some(bob.clone()),
        "upsert creates a missing user"
    );

    let old_name = bob.username.clone();
    bob.username = format!("robert{}", id());
    bob.profile.nickname = "Robert".into();
    s.users
        .upsert_user(&bob)
        .await
        .expect("upsert_user replaces");
    assert_eq!(
        s.users.get_user(bob.user_id).await.expect("get_user"),
        Some(bob.clone()),
        "upsert replaces the user"
    );
    assert_eq!(
        s.users
            .get_user_by_username(&bob.username)
            .await
            .expect("by new username")
            .map(|u| u.user_id),
        Some(bob.user_id),
        "the new username finds the user"
    );
    assert_eq!(
        s.users
            .get_user_by_username(&old_name)
            .await
            .expect("by old username"),
        None,
        "the old username is released"
    );

    let carol = user(id(), &bob.username);
    let err = s
        .users
        .upsert_user(&carol)
        .await
        .expect_err("username of another user");
    assert_eq!(
        err.kind,
        ErrorKind::Conflict,
        "upserting another user's username is Conflict"
    );
    assert_eq!(
        s.users.get_user(carol.user_id).await.expect("get_user"),
        None,
        "nothing created"
    );

    let dave = user(id(), &old_name);
    s.users
        .upsert_user(&dave)
        .await
        .expect("a released username can be reused");
}

async fn friends(s: &Stores) {
    let (me, a, b, c) = (id(), id(), id(), id());
    let request = |from: i64| FriendRequest {
        from_user_id: from,
        to_user_id: me,
        message: format!("hi from {from}"),
        created_at_ms: 1_700_000_000_000,
    };
    assert_eq!(
        s.friends.get_request(a, me).await.expect("get_request"),
        None,
        "no request yet"
    );
    s.friends
        .put_request(&request(b))
        .await
        .expect("put_request");
    s.friends
        .put_request(&request(a))
        .await
        .expect("put_request");
    assert_eq!(
        s.friends.get_request(a, me).await.expect("get_request"),
        Some(request(a)),
        "a request reads back"
    );
    assert_eq!(
        s.friends.get_request(me, a).await.expect("get_request"),
        None,
        "requests are directed"
    );
    let mut to_me = s
        .friends
        .list_requests_to(me)
        .await
        .expect("list_requests_to");
    to_me.sort_by_key(|r| r.from_user_id);
    assert_eq!(
        to_me,
        vec![request(a), request(b)],
        "both requests are listed for their addressee"
    );
    assert!(
        s.friends
            .list_requests_to(a)
            .await
            .expect("list_requests_to")
            .is_empty(),
        "the sender has no incoming requests"
    );
    s.friends
        .delete_request(a, me)
        .await
        .expect("delete_request");
    assert_eq!(
        s.friends.get_request(a, me).await.expect("get_request"),
        None,
        "a deleted request is gone"
    );
    assert_eq!(
        s.friends
            .list_requests_to(me)
            .await
            .expect("list_requests_to"),
        vec![request(b)],
        "only the other request remains"
    );

    let friend = |friend_id: i64| Friend {
        user_id: me,
        friend_id,
        remark: format!("remark {friend_id}"),
        extra: String::new(),
        created_at_ms: 1_700_000_000_000,
    };
    for f in [c, a, b] {
        s.friends.put_friend(&friend(f)).await.expect("put_friend");
    }
    assert_eq!(
        s.friends.list_friends(me).await.expect("list_friends"),
        vec![friend(a), friend(b), friend(c)],
        "friends are listed ordered by friend id"
    );
    assert_eq!(
        s.friends.get_friend(me, b).await.expect("get_friend"),
        Some(friend(b)),
        "get_friend"
    );
    assert_eq!(
        s.friends.get_friend(b, me).await.expect("get_friend"),
        None,
        "one direction does not imply the other"
    );
    s.friends.delete_friend(me, b).await.expect("delete_friend");
    assert_eq!(
        s.friends.get_friend(me, b).await.expect("get_friend"),
        None,
        "a deleted friend is gone"
    );
    assert_eq!(
        s.friends.list_friends(me).await.expect("list_friends"),
        vec![friend(a), friend(c)],
        "the deleted friend leaves the list"
    );
}

async fn groups(s: &Stores) {
    let group = Group {
        group_id: id(),
        name: "gophers".into(),
        avatar_url: String::new(),
        introduction: "we chat".into(),
        owner_id: id(),
        extra: String::new(),
        created_at_ms: 1_700_000_000_000,
    };
    assert_eq!(
        s.groups.get_group(group.group_id).await.expect("get_group"),
        None,
        "no group yet"
    );
    s.groups.put_group(&group).await.expect("put_group");
    assert_eq!(
        s.groups.get_group(group.group_id).await.expect("get_group"),
        Some(group.clone()),
        "a group reads back"
    );

    let users: Vec<i64> = (0..5).map(|_| id()).collect();
    let member = |user_id: i64| GroupMember {
        group_id: group.group_id,
        user_id,
        role: if user_id == users[0] {
            Role::Owner
        } else {
            Role::Member
        },
        remark: format!("m{user_id}"),
        joined_at_ms: 1_700_000_000_000,
    };
    for &u in [users[3], users[0], users[4], users[1], users[2]].iter() {
        s.groups.put_member(&member(u)).await.expect("put_member");
    }
    let other_group = id();
    s.groups
        .put_member(&GroupMember {
            group_id: other_group,
            ..member(users[1])
        })
        .await
        .expect("put_member in another group");

    assert_eq!(
        s.groups
            .get_member(group.group_id, users[0])
            .await
            .expect("get_member"),
        Some(member(users[0])),
        "a member reads back with its role"
    );
    assert_eq!(
        s.groups
            .get_member(group.group_id, id())
            .await
            .expect("get_member"),
        None,
        "non-member"
    );

    let page1 = s
        .groups
        .list_members(group.group_id, 0, 2)
        .await
        .expect("list_members");
    assert_eq!(
        page1,
        vec![member(users[0]), member(users[1])],
        "first page: lowest user ids, limit 2"
    );
    let page2 = s
        .groups
        .list_members(group.group_id, users[1], 2)
        .await
        .expect("list_members");
    assert_eq!(
        page2,
        vec![member(users[2]), member(users[3])],
        "second page starts after the cursor"
    );
    let page3 = s
        .groups
        .list_members(group.group_id, users[3], 2)
        .await
        .expect("list_members");
    assert_eq!(page3, vec![member(users[4])], "last page is short");
    let page4 = s
        .groups
        .list_members(group.group_id, users[4], 2)
        .await
        .expect("list_members");
    assert!(page4.is_empty(), "nothing after the last member");

    let mut ids = s
        .groups
        .member_ids(group.group_id)
        .await
        .expect("member_ids");
    ids.sort_unstable();
    assert_eq!(ids, users, "member_ids lists every member");
    let mut expected_groups = vec![group.group_id, other_group];
    expected_groups.sort_unstable();
    assert_eq!(
        s.groups
            .groups_of_user(users[1])
            .await
            .expect("groups_of_user"),
        expected_groups,
        "groups of a user, ordered"
    );

    s.groups
        .delete_member(group.group_id, users[1])
        .await
        .expect("delete_member");
    assert_eq!(
        s.groups
            .get_member(group.group_id, users[1])
            .await
            .expect("get_member"),
        None,
        "removed"
    );
    assert_eq!(
        s.groups
            .groups_of_user(users[1])
            .await
            .expect("groups_of_user"),
        vec![other_group],
        "a removed member's group list drops the group"
    );
    let mut ids = s
        .groups
        .member_ids(group.group_id)
        .await
        .expect("member_ids");
    ids.sort_unstable();
    assert_eq!(
        ids,
        [users[0], users[2], users[3], users[4]],
        "member_ids drops the removed member"
    );

    s.groups
        .delete_group(group.group_id)
        .await
        .expect("delete_group");
    assert_eq!(
        s.groups.get_group(group.group_id).await.expect("get_group"),
        None,
        "dissolved group is gone"
    );
    assert!(
        s.groups
            .member_ids(group.group_id)
            .await
            .expect("member_ids")
            .is_empty(),
        "a dissolved group has no members"
    );
    assert!(
        s.groups
            .list_members(group.group_id, 0, 100)
            .await
            .expect("list_members")
            .is_empty(),
        "a dissolved group lists no members"
    );
    assert!(
        s.groups
            .groups_of_user(users[0])
            .await
            .expect("groups_of_user")
            .is_empty(),
        "members of a dissolved group no longer list it"
    );
    assert_eq!(
        s.groups
            .groups_of_user(users[1])
            .await
            .expect("groups_of_user"),
        vec![other_group],
        "other groups are untouched"
    );
}

/// Ownership moves in one operation: afterwards exactly one owner, the group names them; inconsistent
/// records are refused with nothing written.
async fn ownership_transfer(s: &Stores) {
    let (old, new, other) = (id(), id(), id());
    let mut group = Group {
        group_id: id(),
        name: "transfer".into(),
        avatar_url: String::new(),
        introduction: String::new(),
        owner_id: old,
        extra: String::new(),
        created_at_ms: 1_700_000_000_000,
    };
    let member = |user_id: i64, role: Role| GroupMember {
        group_id: group.group_id,
        user_id,
        role,
        remark: format!("r{user_id}"),
        joined_at_ms: 1_700_000_000_000,
    };
    let (mut old_m, mut new_m) = (member(old, Role::Owner), member(new, Role::Member));
    s.groups.put_group(&group).await.expect("put_group");
    for m in [&old_m, &new_m, &member(other, Role::Member)] {
        s.groups.put_member(m).await.expect("put_member");
    }

    // Records that disagree (the group still names the old owner) are refused, nothing written.
    new_m.role = Role::Owner;
    old_m.role = Role::Admin;
    let e = s
        .groups
        .transfer_ownership(&group, &new_m, &old_m)
        .await
        .expect_err("owner_id must name the new owner");
    assert_eq!(e.kind, ErrorKind::Conflict, "{e}");
    assert_eq!(
        s.groups
            .get_member(group.group_id, new)
            .await
            .expect("get_member")
            .map(|m| m.role),
        Some(Role::Member),
        "a refused transfer writes nothing"
    );

    group.owner_id = new;
    new_m.remark = "the new boss".into();
    s.groups
        .transfer_ownership(&group, &new_m, &old_m)
        .await
        .expect("transfer_ownership");
    assert_eq!(
        s.groups
            .get_group(group.group_id)
            .await
            .expect("get_group")
            .map(|g| g.owner_id),
        Some(new),
        "the group names the new owner"
    );
    let members = s
        .groups
        .list_members(group.group_id, 0, 10)
        .await
        .expect("list_members");
    let owners: Vec<i64> = members
        .iter()
        .filter(|m| m.role == Role::Owner)
        .map(|m| m.user_id)
        .collect();
    assert_eq!(owners, vec![new], "exactly one owner after a transfer");
    let role_of = |u: i64| members.iter().find(|m| m.user_id == u).map(|m| m.role);
    assert_eq!(role_of(old), Some(Role::Admin), "the old owner is an admin");
    assert_eq!(role_of(other), Some(Role::Member), "others unchanged");
    assert_eq!(
        members
            .iter()
            .find(|m| m.user_id == new)
            .map(|m| m.remark.as_str()),
        Some("the new boss"),
        "the new owner's record is written whole"
    );
    assert!(
        s.groups
            .groups_of_user(new)
            .await
            .expect("groups_of_user")
            .contains(&group.group_id),
        "still indexed under the new owner"
    );
}

async fn inbox(s: &Stores) {
    let u = id();
    assert_eq!(
        s.messages.max_seq(u).await.expect("max_seq"),
        0,
        "an empty inbox has max_seq 0"
    );
    assert!(
        s.messages.sync(u, 0, 10).await.expect("sync").is_empty(),
        "an empty inbox syncs nothing"
    );

    for seq in [3, 1, 5, 2, 4] {
        s.messages
            .append(u, &message(u, seq))
            .await
            .expect("append");
    }
    // A retried append of the same seq must not duplicate the message.
    s.messages
        .append(u, &message(u, 3))
        .await
        .expect("append again");

    let all = s.messages.sync(u, 0, 100).await.expect("sync");
    assert_eq!(
        seqs(&all),
        [1, 2, 3, 4, 5],
        "sync returns ascending seq, each once"
    );
    assert_eq!(
        all[2],
        message(u, 3),
        "a message reads back exactly as appended"
    );
    assert_eq!(
        s.messages.max_seq(u).await.expect("max_seq"),
        5,
        "max_seq is the largest seq"
    );

    // Client paging: ask for `limit`, continue after the last seq until a short page.
    let mut after = 0;
    let mut pages = Vec::new();
    loop {
        let page = s.messages.sync(u, after, 2).await.expect("sync page");
        pages.push(seqs(&page));
        match page.last() {
            Some(last) if page.len() == 2 => after = last.seq,
            _ => break,
        }
    }
    assert_eq!(
        pages,
        vec![vec![1, 2], vec![3, 4], vec![5]],
        "paging by 2 with after = last seq"
    );
    assert!(
        s.messages.sync(u, 5, 10).await.expect("sync").is_empty(),
        "nothing after the newest"
    );
    assert_eq!(
        seqs(&s.messages.sync(u, 3, 10).await.expect("sync")),
        [4, 5],
        "only seq > after"
    );
    assert!(
        s.messages.sync(u, 0, 0).await.expect("sync").is_empty(),
        "limit 0 returns nothing"
    );
    assert!(
        s.messages.sync(id(), 0, 10).await.expect("sync").is_empty(),
        "inboxes are per user"
    );
}

async fn fan_out(s: &Stores) {
    let (a, b, c) = (id(), id(), id());
    let group_message = |seq: u64| Message {
        receiver_type: ReceiverType::Group as i32,
        ..message(a, seq)
    };
    let entries = vec![
        (a, group_message(1)),
        (b, group_message(7)),
        (c, group_message(3)),
        (a, group_message(2)),
    ];
    s.messages.append_many(&entries).await.expect("append_many");
    s.messages
        .append_many(&[])
        .await
        .expect("append_many with nothing");
    assert_eq!(
        seqs(&s.messages.sync(a, 0, 10).await.expect("sync a")),
        [1, 2],
        "a got both entries"
    );
    assert_eq!(
        s.messages.sync(b, 0, 10).await.expect("sync b"),
        vec![group_message(7)],
        "b's entry"
    );
    assert_eq!(
        seqs(&s.messages.sync(c, 0, 10).await.expect("sync c")),
        [3],
        "c's entry"
    );
    assert_eq!(
        s.messages.max_seq(b).await.expect("max_seq"),
        7,
        "max_seq after fan-out"
    );
}

async fn dedup(s: &Stores) {
    let (device, other_device) = (id(), id());
    let client_msg_id = format!("cmid-{}", id());
    assert_eq!(
        s.messages
            .get_dedup(device, &client_msg_id)
            .await
            .expect("get_dedup"),
        None,
        "no record for a first send"
    );
    let first = SendPlan {
        message_id: 77,
        seq: 9,
        server_time_ms: now_ms(),
        recipients: vec![(id(), 9), (id(), 4)],
        conv_seq: 0,
    };
    assert_eq!(
        s.messages
            .put_dedup_if_absent(device, &client_msg_id, &first)
            .await
            .expect("put_dedup_if_absent"),
        None,
        "the first record is written"
    );
    assert_eq!(
        s.messages
            .get_dedup(device, &client_msg_id)
            .await
            .expect("get_dedup"),
        Some(first.clone()),
        "a resend finds the first result, recipients included"
    );
    let racing = SendPlan {
        message_id: 78,
        seq: 10,
        ..first.clone()
    };
    assert_eq!(
        s.messages
            .put_dedup_if_absent(device, &client_msg_id, &racing)
            .await
            .expect("put_dedup_if_absent"),
        Some(first.clone()),
        "a second record for the same key returns the stored one"
    );
    assert_eq!(
        s.messages
            .get_dedup(device, &client_msg_id)
            .await
            .expect("get_dedup"),
        Some(first),
        "the second record was not written"
    );
    assert_eq!(
        s.messages
            .get_dedup(other_device, &client_msg_id)
            .await
            .expect("get_dedup"),
        None,
        "client message ids are per device"
    );
}

async fn record_send(s: &Stores) {
    let (device, alice, bob) = (id(), id(), id());
    let client_msg_id = format!("cmid-{}", id());
    let plan = SendPlan {
        message_id: 91,
        seq: 1,
        server_time_ms: now_ms(),
        recipients: vec![(alice, 1), (bob, 1)],
        conv_seq: 0,
    };
    let entries = vec![(alice, message(bob, 1)), (bob, message(bob, 1))];
    assert_eq!(
        s.messages
            .record_send(device, &client_msg_id, &plan, &entries)
            .await
            .expect("record_send"),
        None,
        "a first send is recorded"
    );
    assert_eq!(
        s.messages
            .get_dedup(device, &client_msg_id)
            .await
            .expect("get_dedup"),
        Some(plan.clone()),
        "record_send stores the plan"
    );
    for user in [alice, bob] {
        assert_eq!(
            seqs(&s.messages.sync(user, 0, 10).await.expect("sync")),
            [1],
            "record_send stores every inbox entry"
        );
    }
    let racing = SendPlan {
        message_id: 92,
        seq: 2,
        server_time_ms: now_ms(),
        recipients: vec![(alice, 2), (bob, 2)],
        conv_seq: 0,
    };
    let racing_entries = vec![(alice, message(bob, 2)), (bob, message(bob, 2))];
    assert_eq!(
        s.messages
            .record_send(device, &client_msg_id, &racing, &racing_entries)
            .await
            .expect("record_send again"),
        Some(plan),
        "a second send with the same key gets the stored plan"
    );
    for user in [alice, bob] {
        assert_eq!(
            seqs(&s.messages.sync(user, 0, 10).await.expect("sync")),
            [1],
            "a refused record_send writes no inbox entry"
        );
    }
    // A claimed first attempt (Scylla: a plain insert of the plan) is a plan like any other: a resend
    // arbitrated by the insert-if-absent afterwards (its claim lost) gets it, and writes nothing.
    let claimed_id = format!("cmid-{}", id());
    let claimed = SendPlan {
        message_id: 93,
        seq: 3,
        server_time_ms: now_ms(),
        recipients: vec![(alice, 3), (bob, 3)],
        conv_seq: 0,
    };
    let claimed_entries = vec![(alice, message(bob, 3)), (bob, message(bob, 3))];
    assert_eq!(
        s.messages
            .record_claimed_send(device, &claimed_id, &claimed, &claimed_entries)
            .await
            .expect("record_claimed_send"),
        None,
        "a claimed send is recorded"
    );
    assert_eq!(
        s.messages
            .get_dedup(device, &claimed_id)
            .await
            .expect("get_dedup"),
        Some(claimed.clone()),
        "record_claimed_send stores the plan"
    );
    let late = SendPlan {
        message_id: 94,
        seq: 4,
        server_time_ms: now_ms(),
        recipients: vec![(alice, 4), (bob, 4)],
        conv_seq: 0,
    };
    let late_entries = vec![(alice, message(bob, 4)), (bob, message(bob, 4))];
    assert_eq!(
        s.messages
            .record_send(device, &claimed_id, &late, &late_entries)
            .await
            .expect("record_send of a late resend"),
        Some(claimed),
        "the insert-if-absent finds the claimed send's plan"
    );
    for user in [alice, bob] {
        assert_eq!(
            seqs(&s.messages.sync(user, 0, 10).await.expect("sync")),
            [1, 3],
            "the claimed send's entries, and none of the late resend's"
        );
    }
}

async fn acks(s: &Stores) {
    let (u, d1, d2) = (id(), id(), id());
    assert_eq!(
        s.messages.acked(u, d1).await.expect("acked"),
        0,
        "nothing acknowledged yet"
    );
    s.messages.ack(u, d1, 5).await.expect("ack");
    assert_eq!(
        s.messages.acked(u, d1).await.expect("acked"),
        5,
        "ack records the seq"
    );
    s.messages.ack(u, d1, 3).await.expect("ack lower");
    assert_eq!(
        s.messages.acked(u, d1).await.expect("acked"),
        5,
        "a late, lower ack does not move back"
    );
    s.messages.ack(u, d1, 8).await.expect("ack higher");
    assert_eq!(
        s.messages.acked(u, d1).await.expect("acked"),
        8,
        "a higher ack moves forward"
    );
    assert_eq!(
        s.messages.acked(u, d2).await.expect("acked"),
        0,
        "acks are per device"
    );
}

async fn seq(s: &Stores) {
    let (a, b) = (id(), id());
    // Paged-read snapshots: kept under their key, readable back, nothing under another.
    assert!(s.seq.keeps_snapshots(), "both backends keep snapshots");
    let key = format!("zhibo:list:{a}:0:1:{b}:123");
    let value = bytes::Bytes::from(vec![0_u8, 1, 2, 255]);
    let long = std::time::Duration::from_secs(10);
    s.seq
        .put_snapshot(&key, value.clone(), long)
        .await
        .expect("put snapshot");
    assert_eq!(s.seq.snapshot(&key).await.expect("snapshot"), Some(value));
    assert_eq!(
        s.seq
            .snapshot(&format!("{key}0"))
            .await
            .expect("no snapshot"),
        None
    );
    s.seq.drop_snapshot(&key).await.expect("drop snapshot");
    assert_eq!(s.seq.snapshot(&key).await.expect("dropped"), None);
    // A snapshot is gone once its time is up.
    let short = format!("{key}-short");
    s.seq
        .put_snapshot(
            &short,
            bytes::Bytes::from_static(b"x"),
            std::time::Duration::from_millis(50),
        )
        .await
        .expect("put a short snapshot");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while s.seq.snapshot(&short).await.expect("snapshot").is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "a 50 ms snapshot outlived 5 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Membership versions: stable until bumped, per group, a bump gives a value not seen before.
    let (g1, g2) = (id(), id());
    let v1 = s.seq.group_version(g1).await.expect("version");
    assert!(v1.is_some(), "both backends keep membership versions");
    assert_eq!(s.seq.group_version(g1).await.expect("version again"), v1);
    // (Two groups may answer the same version: a list is kept per group, under its group's version.)
    let other = s.seq.group_version(g2).await.expect("another group");
    s.seq.bump_group_version(g1).await.expect("bump");
    let v2 = s.seq.group_version(g1).await.expect("bumped version");
    assert!(v2.is_some() && v2 != v1, "a bump changes the version");
    assert_eq!(
        s.seq.group_version(g2).await.expect("untouched group"),
        other,
        "a bump changes that group's version only"
    );
    s.seq
        .bump_group_version(g2)
        .await
        .expect("bump a never-read group");
    assert_ne!(s.seq.group_version(g2).await.expect("version"), other);
    assert_eq!(
        s.seq.current(a).await.expect("current"),
        0,
        "a fresh user has current 0"
    );
    assert_eq!(
        s.seq.next(&[]).await.expect("next of nobody"),
        Vec::<u64>::new(),
        "empty in, empty out"
    );

    let first = s.seq.next(&[a]).await.expect("next");
    assert_eq!(first.len(), 1, "one seq per user id");
    assert!(first[0] >= 1, "seqs start above 0");
    assert_eq!(
        s.seq.current(a).await.expect("current"),
        first[0],
        "current is the last allocated"
    );

    let batch = s.seq.next(&[a, b, a]).await.expect("next batch");
    assert_eq!(batch.len(), 3, "one seq per position");
    assert!(
        first[0] < batch[0] && batch[0] < batch[2],
        "a user repeated in one call gets distinct increasing seqs: {first:?} then {batch:?}"
    );
    assert_eq!(
        s.seq.current(a).await.expect("current"),
        batch[2],
        "current after a batch"
    );
    assert_eq!(
        s.seq.current(b).await.expect("current"),
        batch[1],
        "current of the other user"
    );

    let mut last = batch[2];
    for _ in 0..20 {
        let next = s.seq.next(&[a]).await.expect("next")[0];
        assert!(next > last, "seq strictly increases: {next} after {last}");
        last = next;
    }
    for _ in 0..50 {
        s.seq.next(&[b]).await.expect("next b");
    }
    let after_b = s.seq.next(&[a]).await.expect("next")[0];
    assert!(
        after_b > last && after_b < last + 50,
        "allocating for another user does not advance this one: {after_b} after {last}"
    );

    // Recovery floor: a user whose inbox already holds seq 100 never gets a seq at or below it.
    let c = id();
    s.messages
        .append(c, &message(c, 100))
        .await
        .expect("append");
    let next = s.seq.next(&[c]).await.expect("next")[0];
    assert!(next > 100, "seq stays above the stored inbox ({next})");
}

/// Node-number leases: distinct numbers per claimant, owner-only renewal, expiry frees a number, and the
/// high-water a holder recorded becomes the next holder's floor.
async fn node_leases(s: &Stores) {
    use std::time::Duration;
    use zhibo_store::leases::Pool;
    let ttl = Duration::from_secs(2);
    // Filling the pool takes 32 claims of several lightweight transactions each: on a loaded CQL
    // server that can outlast a 2 s lease, whose number would then be claimed twice. The renewals
    // below bring every lease down to `ttl`.
    let fill_ttl = Duration::from_secs(60);
    let tag = id();
    let mut held = Vec::new();
    loop {
        match s
            .leases
            .acquire(
                Pool::Entities,
                &format!("c{tag}-{}", held.len()),
                fill_ttl,
                now_ms(),
            )
            .await
        {
            Ok(l) => held.push(l),
            Err(e) => {
                assert_eq!(e.kind, ErrorKind::Conflict, "a full pool says so: {e}");
                break;
            }
        }
        assert!(held.len() <= 32, "more leases than numbers");
    }
    // Leases of an earlier run on the same database may still be live: most numbers are ours.
    assert!(held.len() >= 16, "claimed {} of 32", held.len());
    let mut nodes: Vec<u32> = held.iter().map(|l| l.node).collect();
    nodes.sort_unstable();
    nodes.dedup();
    assert_eq!(
        nodes.len(),
        held.len(),
        "every claimant got a different number"
    );
    for l in &held {
        assert!(l.ceiling_ms > l.floor_ms, "a range to mint in");
    }

    let mut thief = held[0].clone();
    thief.owner = "someone else".into();
    let e = s
        .leases
        .renew(&thief, ttl, now_ms() + 2_000)
        .await
        .expect_err("renewal by a non-owner");
    assert_eq!(e.kind, ErrorKind::Conflict, "{e}");

    // Released (having minted up to a moment ago): the next claimant gets that number, starting at the
    // high-water the holder recorded when it gave the number back, not a TTL ahead.
    let released = held.remove(0);
    let minted_to = now_ms() + 1;
    s.leases
        .release(&released, minted_to)
        .await
        .expect("release");
    let next = s
        .leases
        .acquire(Pool::Entities, &format!("n{tag}"), ttl, now_ms())
        .await
        .expect("a released number is free");
    assert_eq!(next.node, released.node, "the only free number");
    assert_eq!(
        next.floor_ms, minted_to,
        "the floor is the high-water recorded at release"
    );
    held.push(next);

    // Renewals record far-future high-waters (a holder whose clock runs ahead).
    let ahead = now_ms() + 600_000;
    let mut recorded = std::collections::HashMap::new();
    for l in &held {
        let hw = ahead + i64::from(l.node);
        s.leases.renew(l, ttl, hw).await.expect("owner renews");
        recorded.insert(l.node, hw);
    }
    let renewed_by = tokio::time::Instant::now();
    // Once they expire, a claimant gets a number again, floored at that number's high-water.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let late = loop {
        match s
            .leases
            .acquire(Pool::Entities, &format!("late{tag}"), ttl, now_ms())
            .await
        {
            Ok(l) => break l,
            Err(e) if e.kind == ErrorKind::Conflict => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no lease expired within 15 s"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("acquire: {e}"),
        }
    };
    if let Some(hw) = recorded.get(&late.node) {
        assert!(
            late.floor_ms >= *hw,
            "floor {} below the expired holder's high-water {hw}",
            late.floor_ms
        );
        assert!(late.ceiling_ms > late.floor_ms, "a range above the floor");
    }
    let expired = held
        .iter()
        .find(|l| l.node != late.node)
        .expect("another expired lease");
    // The claimant above got the first number to expire; the others were renewed a little later and
    // CQL TTLs count whole seconds, so wait out the last renewal's TTL (plus that second) before
    // asserting this one lapsed too.
    tokio::time::sleep_until(renewed_by + ttl + Duration::from_secs(1)).await;
    // Its TTL ran out (another claimant could take it): the old owner cannot renew it back.
    let e = s
        .leases
        .renew(expired, ttl, now_ms() + 2_000)
        .await
        .expect_err("renewal of an expired lease");
    assert_eq!(e.kind, ErrorKind::Conflict, "{e}");
    s.leases
        .release(&late, late.floor_ms + 1)
        .await
        .expect("release");
}

/// Group invitations: one partition per invitee, replace on re-invite, idempotent delete.
async fn group_invites(s: &Stores) {
    let (user, other) = (id(), id());
    let (g1, g2) = (id(), id());
    let inv = s.group_invites.clone();
    assert_eq!(inv.list_invites(user).await.expect("list"), vec![]);
    assert_eq!(inv.get_invite(g1, user).await.expect("get"), None);
    let first = GroupInvite {
        group_id: g2,
        user_id: user,
        inviter_id: other,
        created_at_ms: 1_700_000_000_000,
    };
    let second = GroupInvite {
        group_id: g1,
        ..first.clone()
    };
    inv.put_invite(&first).await.expect("put");
    inv.put_invite(&second).await.expect("put");
    inv.put_invite(&GroupInvite {
        user_id: other,
        ..first.clone()
    })
    .await
    .expect("put other");
    assert_eq!(
        inv.list_invites(user).await.expect("list"),
        vec![second.clone(), first.clone()],
        "a user's invitations, ordered by group id, nobody else's"
    );
    assert_eq!(
        inv.get_invite(g2, user).await.expect("get"),
        Some(first.clone())
    );
    // Inviting again replaces the invitation.
    let again = GroupInvite {
        created_at_ms: 1_700_000_001_000,
        ..first.clone()
    };
    inv.put_invite(&again).await.expect("put again");
    assert_eq!(inv.get_invite(g2, user).await.expect("get"), Some(again));
    inv.delete_invite(g2, user).await.expect("delete");
    inv.delete_invite(g2, user)
        .await
        .expect("deleting an absent invitation is fine");
    assert_eq!(inv.list_invites(user).await.expect("list"), vec![second]);
    assert_eq!(inv.list_invites(other).await.expect("list").len(), 1);
}

/// A room message as the logic worker stores it for late joiners (seq 0: rooms have no inboxes).
fn room_message(room_id: i64, message_id: u64) -> Message {
    Message {
        message_id,
        seq: 0,
        sender_user_id: 42,
        sender_device_id: 43,
        receiver_type: ReceiverType::Room as i32,
        receiver_id: room_id,
        client_msg_id: format!("room-{room_id}-{message_id}"),
        server_time_ms: 1_700_000_000_000 + message_id as i64,
        content_type: 1,
        content: Bytes::from(format!("live #{message_id}")),
        conv_seq: 0,
    }
}

fn message_ids(messages: &[Message]) -> Vec<u64> {
    messages.iter().map(|m| m.message_id).collect()
}

async fn rooms(s: &Stores) {
    let room_id = id();
    assert_eq!(
        s.rooms.get_room(room_id).await.expect("get_room unknown"),
        None,
        "a room never written has no record (it is open, see Room::open)"
    );
    let (owner, admin_a, admin_b) = (id(), id(), id());
    let room = Room {
        room_id,
        owner_user_id: owner,
        // Ascending and distinct: Scylla stores the admins as a set.
        admin_user_ids: vec![admin_a, admin_b],
        closed: false,
        muted: true,
        join_notices: true,
        updated_at_ms: 1_700_000_000_000,
    };
    s.rooms.put_room(&room).await.expect("put_room");
    assert_eq!(
        s.rooms.get_room(room_id).await.expect("get_room"),
        Some(room.clone()),
        "a room reads back as written"
    );
    let closed = Room {
        admin_user_ids: Vec::new(),
        closed: true,
        muted: false,
        updated_at_ms: 1_700_000_001_000,
        ..room.clone()
    };
    s.rooms.put_room(&closed).await.expect("put_room again");
    assert_eq!(
        s.rooms.get_room(room_id).await.expect("get_room"),
        Some(closed),
        "writing a room replaces its record, admins included"
    );
    assert_eq!(
        s.rooms.get_room(id()).await.expect("get_room other"),
        None,
        "records are per room"
    );
}

/// A room's shaping settings (issue 17): none until written, then as last written, per room.
async fn room_shaping(s: &Stores) {
    let room_id = id();
    assert_eq!(
        s.rooms
            .get_room_shaping(room_id)
            .await
            .expect("get_room_shaping unknown"),
        None,
        "a room never shaped has no settings (it shows all chat)"
    );
    let shaping = RoomShaping {
        room_id,
        chat_per_sec: 40,
        updated_at_ms: 1_700_000_000_000,
    };
    s.rooms
        .put_room_shaping(&shaping)
        .await
        .expect("put_room_shaping");
    assert_eq!(
        s.rooms.get_room_shaping(room_id).await.expect("get"),
        Some(shaping.clone()),
        "settings read back as written"
    );
    let unlimited = RoomShaping {
        chat_per_sec: 0,
        updated_at_ms: 1_700_000_001_000,
        ..shaping
    };
    s.rooms
        .put_room_shaping(&unlimited)
        .await
        .expect("put_room_shaping again");
    assert_eq!(
        s.rooms.get_room_shaping(room_id).await.expect("get"),
        Some(unlimited),
        "writing replaces the settings"
    );
    assert_eq!(
        s.rooms.get_room_shaping(id()).await.expect("get other"),
        None,
        "settings are per room"
    );
    assert_eq!(
        s.rooms.get_room(room_id).await.expect("get_room"),
        None,
        "shaping a room writes no room record"
    );
}

async fn room_history(s: &Stores) {
    let (room_id, other_room) = (id(), id());
    let base = 2_000_000 + id().unsigned_abs() % 1_000_000_000;
    assert_eq!(
        s.rooms.recent(room_id, 10).await.expect("recent empty"),
        vec![],
        "a room without messages has no history"
    );
    for i in 0..3 {
        s.rooms
            .push_recent(room_id, &room_message(room_id, base + i), 10)
            .await
            .expect("push_recent");
    }
    s.rooms
        .push_recent(other_room, &room_message(other_room, base + 100), 10)
        .await
        .expect("push_recent other");
    let all = s.rooms.recent(room_id, 10).await.expect("recent");
    assert_eq!(
        all,
        (0..3)
            .map(|i| room_message(room_id, base + i))
            .collect::<Vec<_>>(),
        "the history reads back oldest first, as pushed, without the other room's"
    );
    assert_eq!(
        message_ids(&s.rooms.recent(room_id, 2).await.expect("recent 2")),
        vec![base + 1, base + 2],
        "a limit keeps the latest messages"
    );
    assert_eq!(
        s.rooms.recent(room_id, 0).await.expect("recent 0"),
        vec![],
        "limit 0 reads nothing"
    );
    assert_eq!(
        message_ids(&s.rooms.recent(other_room, 10).await.expect("recent other")),
        vec![base + 100],
        "histories are per room"
    );

    // A busy room: its history is trimmed towards `keep` (Scylla: every few dozen pushes, so a
    // partition does not grow for the whole day its rows live), never below the latest `keep`.
    let busy = id();
    let keep = 5;
    let pushed: u64 = 96;
    for i in 0..pushed {
        s.rooms
            .push_recent(busy, &room_message(busy, base + i), keep)
            .await
            .expect("push_recent busy");
    }
    let history = s.rooms.recent(busy, 1000).await.expect("recent busy");
    let ids = message_ids(&history);
    assert!(
        ids.len() >= keep,
        "at least the latest {keep} stay readable: {ids:?}"
    );
    assert_eq!(
        ids[ids.len() - keep..],
        ((pushed - keep as u64)..pushed)
            .map(|i| base + i)
            .collect::<Vec<_>>(),
        "the latest {keep}, oldest first"
    );
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "oldest first: {ids:?}");
    assert!(
        ids.len() < (pushed / 2) as usize,
        "the history of {pushed} pushes with keep {keep} is trimmed, not kept whole: {} entries",
        ids.len()
    );
}

/// Bans per (room, user), listed by user id; one pin per room, replaced and cleared.
async fn room_moderation(s: &Stores) {
    let (room_id, other_room) = (id(), id());
    let (a, b, c) = (id(), id(), id());
    assert_eq!(s.rooms.get_ban(room_id, a).await.expect("get_ban"), None);
    assert!(s.rooms.bans(room_id, 0, 10).await.expect("bans").is_empty());
    let ban = |user_id: i64, at: i64| RoomBan {
        room_id,
        user_id,
        banned_by: 7,
        banned_at_ms: at,
    };
    for (u, at) in [(c, 3), (a, 1), (b, 2)] {
        s.rooms.ban(&ban(u, at)).await.expect("ban");
    }
    assert_eq!(
        s.rooms.get_ban(room_id, b).await.expect("get_ban"),
        Some(ban(b, 2)),
        "a ban reads back as written"
    );
    assert_eq!(
        s.rooms.get_ban(other_room, b).await.expect("get_ban other"),
        None,
        "bans are per room"
    );
    // Banning again replaces the ban.
    s.rooms.ban(&ban(b, 5)).await.expect("ban again");
    assert_eq!(
        s.rooms.get_ban(room_id, b).await.expect("get_ban"),
        Some(ban(b, 5))
    );
    let all = s.rooms.bans(room_id, 0, 10).await.expect("bans");
    assert_eq!(
        all.iter().map(|x| x.user_id).collect::<Vec<_>>(),
        vec![a, b, c],
        "bans are listed by ascending user id"
    );
    let page = s.rooms.bans(room_id, a, 1).await.expect("bans page");
    assert_eq!(page, vec![ban(b, 5)], "paged after a user id, limited");
    assert!(s
        .rooms
        .bans(room_id, c, 10)
        .await
        .expect("bans end")
        .is_empty());
    s.rooms.unban(room_id, b).await.expect("unban");
    s.rooms
        .unban(room_id, b)
        .await
        .expect("unban twice is fine");
    assert_eq!(s.rooms.get_ban(room_id, b).await.expect("get_ban"), None);
    assert_eq!(
        s.rooms
            .bans(room_id, 0, 10)
            .await
            .expect("bans")
            .iter()
            .map(|x| x.user_id)
            .collect::<Vec<_>>(),
        vec![a, c]
    );

    assert_eq!(s.rooms.pin(room_id).await.expect("pin none"), None);
    let pin = RoomPin {
        room_id,
        content: b"welcome".to_vec(),
        pinned_by: a,
        pinned_at_ms: 10,
    };
    s.rooms.set_pin(&pin).await.expect("set_pin");
    assert_eq!(s.rooms.pin(room_id).await.expect("pin"), Some(pin.clone()));
    assert_eq!(s.rooms.pin(other_room).await.expect("pin other"), None);
    let newer = RoomPin {
        content: b"new rules".to_vec(),
        pinned_at_ms: 11,
        ..pin
    };
    s.rooms.set_pin(&newer).await.expect("set_pin again");
    assert_eq!(
        s.rooms.pin(room_id).await.expect("pin"),
        Some(newer),
        "a pin replaces the last"
    );
    s.rooms.clear_pin(room_id).await.expect("clear_pin");
    s.rooms
        .clear_pin(room_id)
        .await
        .expect("clear_pin twice is fine");
    assert_eq!(s.rooms.pin(room_id).await.expect("pin cleared"), None);
}
