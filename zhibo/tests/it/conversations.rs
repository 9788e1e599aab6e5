//! Conversations (issue #13) end to end, both modes, over the real sockets: the list and its unread
//! counts across devices, reconnects and a Redis flush; read receipts; recall (live, by sync, and every
//! refusal with its code); history paging; typing; mute/pin; the HTTP routes.

use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use zhibo_loadtest::client::{Client, Transport};
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{
    Conversation, ConversationListInput, ConversationListOutput, ConversationRef,
    ConversationSettingsInput, ConversationUpdate, DeleteForMeInput, ErrorCode, GroupReadersInput,
    HistoryInput, HistoryOutput, MarkReadInput, Message, Packet, RecallInput, Recalled,
    ReceiverType, SendMessageInput, SendMessageOutput, SyncInput, TypingInput,
};

use crate::cluster::{eventually, flushdb, http, redis_command, Cluster};

const WAIT: Duration = Duration::from_secs(15);

/// `content_type` of a recalled copy (zhibo_store::CONTENT_TYPE_RECALLED).
const RECALLED: i32 = -10;
/// `content_type` of a copy deleted for its owner.
const DELETED: i32 = -11;

fn peer(user_id: i64) -> Option<ConversationRef> {
    Some(ConversationRef {
        r#type: ReceiverType::User as i32,
        id: user_id,
    })
}

fn group(group_id: i64) -> Option<ConversationRef> {
    Some(ConversationRef {
        r#type: ReceiverType::Group as i32,
        id: group_id,
    })
}

async fn send(
    c: &mut Client,
    receiver_type: ReceiverType,
    to: i64,
    id: &str,
    body: &str,
) -> SendMessageOutput {
    let input = Body::SendMessage(SendMessageInput {
        receiver_type: receiver_type as i32,
        receiver_id: to,
        client_msg_id: id.into(),
        content_type: 1,
        content: Bytes::from(body.to_owned()),
        ..Default::default()
    });
    match c.request(input, WAIT).await.expect("reply").body {
        Some(Body::SendMessageOutput(o)) => o,
        other => panic!("expected SendMessageOutput for {id}, got {other:?}"),
    }
}

/// The answer to `body`, which must not be an Error.
async fn ask(c: &mut Client, body: Body) -> Body {
    let reply = c.request(body, WAIT).await.expect("reply");
    match reply.body {
        Some(Body::Error(e)) => panic!("unexpected error {e:?}"),
        Some(b) => b,
        None => panic!("empty reply"),
    }
}

/// The error code answering `body`.
async fn refused(c: &mut Client, body: Body) -> ErrorCode {
    match c.request(body, WAIT).await.expect("reply").body {
        Some(Body::Error(e)) => ErrorCode::try_from(e.code).expect("known code"),
        other => panic!("expected an Error, got {other:?}"),
    }
}

async fn list(c: &mut Client, changed_after: u64) -> ConversationListOutput {
    let input = Body::ConversationList(ConversationListInput {
        changed_after,
        ..Default::default()
    });
    match ask(c, input).await {
        Body::ConversationListOutput(o) => o,
        other => panic!("expected ConversationListOutput, got {other:?}"),
    }
}

/// `c`'s row of the conversation `with`.
async fn row(c: &mut Client, with: Option<ConversationRef>) -> Conversation {
    list(c, 0)
        .await
        .conversations
        .into_iter()
        .find(|r| r.conversation == with)
        .unwrap_or_else(|| panic!("no row of {with:?}"))
}

async fn mark_read(c: &mut Client, with: Option<ConversationRef>, read_seq: u64) -> Conversation {
    let input = Body::MarkRead(MarkReadInput {
        conversation: with,
        read_seq,
    });
    match ask(c, input).await {
        Body::ConversationUpdate(ConversationUpdate {
            conversation: Some(row),
            ..
        }) => *row,
        other => panic!("expected ConversationUpdate, got {other:?}"),
    }
}

async fn history(
    c: &mut Client,
    with: Option<ConversationRef>,
    before: u64,
    after: u64,
    limit: u32,
) -> HistoryOutput {
    let input = Body::History(HistoryInput {
        conversation: with,
        before,
        after,
        limit,
    });
    match ask(c, input).await {
        Body::HistoryOutput(o) => o,
        other => panic!("expected HistoryOutput, got {other:?}"),
    }
}

/// The next pushed packet that `pick` accepts; heartbeats and messages are skipped, anything else
/// fails the test.
async fn next_push<T>(c: &mut Client, what: &str, pick: impl Fn(&Packet) -> Option<T>) -> T {
    loop {
        let p = c
            .recv(WAIT)
            .await
            .unwrap_or_else(|e| panic!("waiting for {what}: {e}"))
            .unwrap_or_else(|| panic!("connection closed waiting for {what}"));
        if let Some(v) = pick(&p) {
            return v;
        }
        match p.body {
            Some(Body::Heartbeat(_) | Body::Message(_)) => continue,
            other => panic!("waiting for {what}, got {other:?}"),
        }
    }
}

async fn next_message(c: &mut Client) -> Message {
    next_push(c, "a Message", |p| match &p.body {
        Some(Body::Message(m)) => Some(m.clone()),
        _ => None,
    })
    .await
}

async fn next_update(c: &mut Client) -> ConversationUpdate {
    next_push(c, "a ConversationUpdate", |p| match &p.body {
        Some(Body::ConversationUpdate(u)) => Some(u.clone()),
        _ => None,
    })
    .await
}

async fn next_recalled(c: &mut Client) -> Recalled {
    next_push(c, "Recalled", |p| match &p.body {
        Some(Body::Recalled(r)) => Some(*r),
        _ => None,
    })
    .await
}

/// Nothing but heartbeats and messages arrives within a short while.
async fn no_notice(c: &mut Client, what: &str) {
    let until = tokio::time::Instant::now() + Duration::from_millis(400);
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return;
        }
        match c.recv(left).await {
            Err(_) | Ok(None) => return,
            Ok(Some(p)) => match p.body {
                Some(Body::Heartbeat(_) | Body::Message(_)) => continue,
                other => panic!("expected no {what}, got {other:?}"),
            },
        }
    }
}

fn text(m: &Message) -> &str {
    std::str::from_utf8(&m.content).expect("utf-8")
}

/// Unread counts agree on two devices of one user through sends, a read on one device (the other
/// learns it live), reconnects and (distributed) a Redis flush; list sync returns only changed rows;
/// bad reads are refused with their codes and change nothing.
async fn unread_counts_match_across_devices(cluster: &Cluster) {
    let alice = cluster.user("alice").await;
    let alice2 = cluster.second_device(&alice).await;
    let bob = cluster.user("bob").await;
    let carol = cluster.user("carol").await;
    cluster.befriend(&alice, &bob).await;
    cluster.befriend(&alice, &carol).await;
    let mut a1 = cluster.connect(Transport::Tcp, 0, &alice).await;
    let mut a2 = cluster.connect(Transport::Ws, 1, &alice2).await;
    let mut b = cluster.connect(Transport::Quic, 1, &bob).await;
    let mut c = cluster.connect(Transport::Tcp, 0, &carol).await;
    for i in 1..=3 {
        send(
            &mut b,
            ReceiverType::User,
            alice.user_id,
            &format!("b{i}"),
            "hi",
        )
        .await;
    }
    send(&mut c, ReceiverType::User, alice.user_id, "c1", "yo").await;
    // Every delivered copy carries its conversation seq.
    let mut seen = Vec::new();
    for _ in 0..4 {
        let m = next_message(&mut a1).await;
        seen.push((m.sender_user_id, m.conv_seq));
    }
    let from_bob: Vec<u64> = seen
        .iter()
        .filter(|(s, _)| *s == bob.user_id)
        .map(|(_, c)| *c)
        .collect();
    assert_eq!(from_bob, [1, 2, 3], "{seen:?}");
    for d in [&mut a1, &mut a2] {
        let page = list(d, 0).await;
        let rows: Vec<(Option<ConversationRef>, u64)> = page
            .conversations
            .iter()
            .map(|r| (r.conversation, r.unread))
            .collect();
        // Newest activity first: carol's message came last.
        assert_eq!(
            rows,
            [(peer(carol.user_id), 1), (peer(bob.user_id), 3)],
            "{page:?}"
        );
    }
    let version = list(&mut a2, 0).await.version;

    // Read on device 1: device 2 learns it live, bob gets a receipt.
    let read = mark_read(&mut a1, peer(bob.user_id), 2).await;
    assert_eq!((read.read_seq, read.unread), (2, 1));
    let pushed = next_update(&mut a2).await.conversation.expect("row");
    assert_eq!((pushed.conversation, pushed.unread), (peer(bob.user_id), 1));
    let receipt = next_push(&mut b, "ReadReceipt", |p| match &p.body {
        Some(Body::ReadReceipt(r)) => Some(*r),
        _ => None,
    })
    .await;
    assert_eq!(
        (receipt.conversation, receipt.user_id, receipt.read_seq),
        (peer(alice.user_id), alice.user_id, 2)
    );
    // List sync: only the changed row.
    let changed = list(&mut a2, version).await;
    let rows: Vec<_> = changed
        .conversations
        .iter()
        .map(|r| r.conversation)
        .collect();
    assert_eq!(rows, [peer(bob.user_id)]);
    assert!(changed.version > version);
    assert!(list(&mut a2, changed.version)
        .await
        .conversations
        .is_empty());
    // At or below the position: answered with the row as it is and the receipt sent again, but
    // nothing changed: no new version for list sync, no update to the other device.
    for at in [2, 1] {
        let again = mark_read(&mut a1, peer(bob.user_id), at).await;
        assert_eq!(
            (again.read_seq, again.version),
            (read.read_seq, read.version),
            "a mark-read at {at} changes nothing"
        );
        let receipt = next_push(&mut b, "ReadReceipt", |p| match &p.body {
            Some(Body::ReadReceipt(r)) => Some(*r),
            _ => None,
        })
        .await;
        assert_eq!(receipt.read_seq, 2);
    }
    assert!(
        list(&mut a2, changed.version)
            .await
            .conversations
            .is_empty(),
        "a mark-read that changed nothing is not a change for list sync"
    );
    no_notice(&mut a2, "ConversationUpdate").await;

    // Bad input: beyond the last message, a conversation alice is not in, a bad reference.
    let beyond = Body::MarkRead(MarkReadInput {
        conversation: peer(bob.user_id),
        read_seq: 4,
    });
    assert_eq!(refused(&mut a1, beyond).await, ErrorCode::OutOfRange);
    let stranger = Body::MarkRead(MarkReadInput {
        conversation: peer(i64::from(i32::MAX)),
        read_seq: 1,
    });
    assert_eq!(
        refused(&mut a1, stranger).await,
        ErrorCode::NotInConversation
    );
    let bad = Body::MarkRead(MarkReadInput {
        conversation: Some(ConversationRef {
            r#type: ReceiverType::Room as i32,
            id: 1,
        }),
        read_seq: 1,
    });
    assert_eq!(refused(&mut a1, bad).await, ErrorCode::InvalidArgument);
    assert_eq!(row(&mut a2, peer(bob.user_id)).await.unread, 1);
    no_notice(&mut a2, "update after refused reads").await;
    // A list page after a negative activity time is a corrupted cursor, not an empty list.
    let corrupted = Body::ConversationList(ConversationListInput {
        after: peer(bob.user_id),
        after_activity_ms: -1,
        ..Default::default()
    });
    assert_eq!(
        refused(&mut a1, corrupted).await,
        ErrorCode::InvalidArgument
    );

    // Reconnects: the same counts from the store.
    drop(a2);
    let mut a2 = cluster.connect(Transport::Quic, 0, &alice2).await;
    assert_eq!(row(&mut a2, peer(bob.user_id)).await.unread, 1);
    assert_eq!(row(&mut a2, peer(carol.user_id)).await.unread, 1);

    // A Redis flush (distributed): conversation seqs go on increasing (the counter resumes above a
    // margin), counts stay right (the skipped seqs are not unread).
    let flushed = cluster.redis_url.is_some();
    if let Some(redis) = cluster.redis_url.as_deref() {
        // Distributed listings come from the list cache (on by default): losing it loses nothing.
        let cached = format!("zhibo:lc:{{{}}}", alice.user_id);
        assert_eq!(
            redis_command(redis, &["EXISTS", &cached]).await,
            ":1\r\n",
            "alice's list is cached"
        );
        flushdb(redis).await;
    }
    send(&mut b, ReceiverType::User, alice.user_id, "b4", "after").await;
    let m = next_message(&mut a1).await;
    assert!(m.conv_seq > 3, "conversation seqs increase: {}", m.conv_seq);
    if flushed {
        assert!(
            m.conv_seq > zhibo_store::redis_seq::RECOVERY_MARGIN,
            "the recovered counter skipped seqs: {}",
            m.conv_seq
        );
    }
    for d in [&mut a1, &mut a2] {
        let r = row(d, peer(bob.user_id)).await;
        assert_eq!(
            (r.unread, r.last_seq),
            (2, m.conv_seq),
            "the unread one from before and this one"
        );
        assert_eq!(
            r.last_message.as_ref().map(|m| text(m).to_owned()),
            Some("after".to_owned())
        );
    }
    // Bob's own row: he has read what he sent, and sees alice's read position.
    let bobs = row(&mut b, peer(alice.user_id)).await;
    assert_eq!((bobs.unread, bobs.peer_read_seq), (0, 2));
}

/// Read receipts in 1:1 (live and after a reconnect) and in a group (the author of the message read
/// up to is told live; anyone asks who read a message, also after reconnecting).
async fn read_receipts_one_to_one_and_group(cluster: &Cluster) {
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    let carol = cluster.user("carol").await;
    cluster.befriend(&alice, &bob).await;
    let mut a = cluster.connect(Transport::Tcp, 0, &alice).await;
    let mut b = cluster.connect(Transport::Ws, 1, &bob).await;
    let out = send(&mut a, ReceiverType::User, bob.user_id, "m1", "read me").await;
    let m = next_message(&mut b).await;
    assert_eq!(m.message_id, out.message_id);
    // The sender learns the conversation seq from the ACK (it gets no copy of its own message).
    assert_eq!(out.conv_seq, m.conv_seq);
    assert!(out.conv_seq > 0);
    mark_read(&mut b, peer(alice.user_id), m.conv_seq).await;
    let receipt = next_push(&mut a, "ReadReceipt", |p| match &p.body {
        Some(Body::ReadReceipt(r)) => Some(*r),
        _ => None,
    })
    .await;
    assert_eq!(
        (receipt.conversation, receipt.user_id, receipt.read_seq),
        (peer(bob.user_id), bob.user_id, m.conv_seq)
    );
    drop(a);
    let mut a = cluster.connect(Transport::Quic, 1, &alice).await;
    assert_eq!(
        row(&mut a, peer(bob.user_id)).await.peer_read_seq,
        m.conv_seq
    );

    let gid = cluster.group(&alice, &[&bob, &carol]).await;
    let mut c = cluster.connect(Transport::Tcp, 1, &carol).await;
    let out = send(&mut a, ReceiverType::Group, gid, "g1", "group news").await;
    let gm = next_message(&mut b).await;
    assert_eq!(gm.message_id, out.message_id);
    assert_eq!(out.conv_seq, gm.conv_seq);
    next_message(&mut c).await;
    let readers = |conv_seq| {
        Body::GroupReaders(GroupReadersInput {
            group_id: gid,
            conv_seq,
        })
    };
    let who = |b: Body| match b {
        Body::GroupReadersOutput(o) => o.user_ids,
        other => panic!("expected GroupReadersOutput, got {other:?}"),
    };
    // The sender has read their own message; nobody else yet.
    assert_eq!(
        who(ask(&mut a, readers(gm.conv_seq)).await),
        [alice.user_id]
    );
    mark_read(&mut b, group(gid), gm.conv_seq).await;
    let receipt = next_push(&mut a, "group ReadReceipt", |p| match &p.body {
        Some(Body::ReadReceipt(r)) => Some(*r),
        _ => None,
    })
    .await;
    assert_eq!(
        (receipt.conversation, receipt.user_id, receipt.read_seq),
        (group(gid), bob.user_id, gm.conv_seq)
    );
    drop(a);
    let mut a = cluster.connect(Transport::Ws, 0, &alice).await;
    let mut want = vec![alice.user_id, bob.user_id];
    want.sort_unstable();
    assert_eq!(who(ask(&mut a, readers(gm.conv_seq)).await), want);
    // Carol (not read) is not listed; an outsider may not ask.
    let dave = cluster.user("dave").await;
    let mut d = cluster.connect(Transport::Tcp, 0, &dave).await;
    assert_eq!(
        refused(&mut d, readers(gm.conv_seq)).await,
        ErrorCode::NotInConversation
    );
    assert_eq!(row(&mut c, group(gid)).await.unread, 1);

    // A member who joins later starts read up to the group's last message: nothing unread, and
    // the group is in their list before anyone writes again.
    add_to_group(cluster, &alice, gid, &dave).await;
    let joined = row(&mut d, group(gid)).await;
    assert_eq!(
        (joined.last_seq, joined.read_seq, joined.unread),
        (gm.conv_seq, gm.conv_seq, 0)
    );
    assert!(who(ask(&mut d, readers(gm.conv_seq)).await).contains(&bob.user_id));

    // A member removed from the group is told no more reads of their messages (they may not ask
    // GroupReaders either). Bob writes, is removed while connected, carol reads up to his message.
    let bm = send(&mut b, ReceiverType::Group, gid, "g2", "before removal").await;
    for member in [&mut a, &mut c, &mut d] {
        assert_eq!(next_message(member).await.message_id, bm.message_id);
    }
    let (status, body) = crate::cluster::http(
        &cluster.api_base,
        reqwest::Method::DELETE,
        &format!("/v1/groups/{gid}/members/{}", bob.user_id),
        ("authorization", &format!("Bearer {}", alice.token)),
        serde_json::json!(null),
    )
    .await;
    assert_eq!(status, 204, "{body}");
    mark_read(&mut c, group(gid), bm.conv_seq).await;
    assert_eq!(
        refused(&mut b, readers(bm.conv_seq)).await,
        ErrorCode::NotInConversation
    );
    // Anything sent to bob after carol's read comes after her receipt would have: a 1:1 message
    // from alice (still his friend) is the next thing he gets.
    let after = send(&mut a, ReceiverType::User, bob.user_id, "m2", "after").await;
    let next = next_push(&mut b, "alice's message", |p| match &p.body {
        Some(Body::ReadReceipt(r)) => panic!("a removed member got a read receipt: {r:?}"),
        Some(Body::Message(m)) if m.message_id == after.message_id => Some(()),
        _ => None,
    });
    next.await;
}

/// `owner` adds `user` to group `gid` (invited: they are not friends; the user accepts).
async fn add_to_group(
    cluster: &Cluster,
    owner: &zhibo_loadtest::client::Credentials,
    gid: i64,
    user: &zhibo_loadtest::client::Credentials,
) {
    cluster
        .api
        .post(
            &format!("/v1/groups/{gid}/members"),
            Some(&owner.token),
            json!({"user_ids": [user.user_id]}),
        )
        .await
        .expect("add member");
    cluster
        .api
        .post(
            &format!("/v1/groups/invitations/{gid}/accept"),
            Some(&user.token),
            json!({}),
        )
        .await
        .expect("accept");
}

/// Recall: every device of both parties gets `Recalled` live, a device offline then finds the tombstone
/// by sync, in the list and in history; the refused cases answer their codes and change nothing.
async fn recall_live_by_sync_and_refusals(cluster: &Cluster) {
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    let bob2 = cluster.second_device(&bob).await;
    cluster.befriend(&alice, &bob).await;
    let mut a = cluster.connect(Transport::Tcp, 0, &alice).await;
    let mut b = cluster.connect(Transport::Quic, 1, &bob).await;
    let keep = send(&mut a, ReceiverType::User, bob.user_id, "k", "keep").await;
    let gone = send(&mut a, ReceiverType::User, bob.user_id, "g", "oops").await;
    next_message(&mut b).await;
    let m = next_message(&mut b).await;
    assert_eq!(m.message_id, gone.message_id);
    let recall = |conv_seq| {
        Body::Recall(RecallInput {
            conversation: peer(bob.user_id),
            conv_seq,
        })
    };
    // Bob may not recall alice's message; nothing changes.
    let bobs = Body::Recall(RecallInput {
        conversation: peer(alice.user_id),
        conv_seq: m.conv_seq,
    });
    assert_eq!(refused(&mut b, bobs).await, ErrorCode::NotAllowed);
    assert_eq!(refused(&mut a, recall(999)).await, ErrorCode::NotFound);
    let answer = match ask(&mut a, recall(m.conv_seq)).await {
        Body::Recalled(r) => r,
        other => panic!("expected Recalled, got {other:?}"),
    };
    assert_eq!(
        (answer.message_id, answer.conv_seq, answer.seq),
        (gone.message_id, m.conv_seq, gone.seq)
    );
    let live = next_recalled(&mut b).await;
    assert_eq!(
        (
            live.conversation,
            live.message_id,
            live.seq,
            live.recalled_by
        ),
        (peer(alice.user_id), gone.message_id, m.seq, alice.user_id)
    );
    assert_eq!(
        refused(&mut a, recall(m.conv_seq)).await,
        ErrorCode::AlreadyRecalled
    );

    // By sync: bob's second device was offline.
    let mut b2 = cluster.connect(Transport::Ws, 0, &bob2).await;
    let synced = match ask(&mut b2, Body::Sync(SyncInput { seq: 0, limit: 0 })).await {
        Body::SyncOutput(o) => o.messages,
        other => panic!("expected SyncOutput, got {other:?}"),
    };
    let contents: Vec<(i32, &str)> = synced.iter().map(|m| (m.content_type, text(m))).collect();
    assert_eq!(contents, [(1, "keep"), (RECALLED, "")]);
    let r = row(&mut b2, peer(alice.user_id)).await;
    let last = r.last_message.expect("last message");
    assert_eq!((last.content_type, last.content.len()), (RECALLED, 0));
    let page = history(&mut b2, peer(alice.user_id), 0, 0, 10).await;
    let kinds: Vec<(u64, i32)> = page
        .messages
        .iter()
        .map(|m| (m.conv_seq, m.content_type))
        .collect();
    assert_eq!(kinds, [(m.conv_seq, RECALLED), (m.conv_seq - 1, 1)]);
    // Alice's own copy is gone too.
    let mine = history(&mut a, peer(bob.user_id), 0, 0, 1).await;
    assert_eq!(mine.messages[0].content_type, RECALLED);
    assert_eq!(keep.seq + 1, gone.seq);

    // Delete for me: gone from bob's history on his devices only.
    let del = Body::DeleteForMe(DeleteForMeInput {
        conversation: peer(alice.user_id),
        conv_seq: m.conv_seq - 1,
    });
    match ask(&mut b2, del).await {
        Body::ConversationUpdate(u) => assert_eq!(u.deleted_conv_seq, m.conv_seq - 1),
        other => panic!("expected ConversationUpdate, got {other:?}"),
    }
    assert_eq!(next_update(&mut b).await.deleted_conv_seq, m.conv_seq - 1);
    let page = history(&mut b, peer(alice.user_id), 0, 0, 10).await;
    assert_eq!(page.messages.len(), 1, "{page:?}");
    let synced = match ask(&mut b, Body::Sync(SyncInput { seq: 0, limit: 0 })).await {
        Body::SyncOutput(o) => o.messages,
        other => panic!("expected SyncOutput, got {other:?}"),
    };
    assert_eq!(synced[0].content_type, DELETED);
    let hers = history(&mut a, peer(bob.user_id), 0, 0, 10).await;
    assert_eq!(text(&hers.messages[1]), "keep", "alice still has it");

    // Groups: the owner may recall a member's message, a member may not recall another's.
    let carol = cluster.user("carol").await;
    let gid = cluster.group(&alice, &[&bob, &carol]).await;
    let mut c = cluster.connect(Transport::Tcp, 1, &carol).await;
    send(&mut c, ReceiverType::Group, gid, "c1", "from carol").await;
    let gm = next_message(&mut b).await;
    let grecall = Body::Recall(RecallInput {
        conversation: group(gid),
        conv_seq: gm.conv_seq,
    });
    assert_eq!(
        refused(&mut b, grecall.clone()).await,
        ErrorCode::NotAllowed
    );
    ask(&mut a, grecall).await;
    let live = next_recalled(&mut c).await;
    assert_eq!(
        (live.conversation, live.recalled_by),
        (group(gid), alice.user_id)
    );
    let dave = cluster.user("dave").await;
    let mut d = cluster.connect(Transport::Tcp, 0, &dave).await;
    let outsider = Body::Recall(RecallInput {
        conversation: group(gid),
        conv_seq: gm.conv_seq,
    });
    assert_eq!(
        refused(&mut d, outsider).await,
        ErrorCode::NotInConversation
    );
}

/// A cluster whose recall window is one second.
pub(crate) struct ShortRecall(Cluster);

impl ShortRecall {
    pub(crate) async fn embedded() -> Self {
        ShortRecall(Cluster::embedded_with(|c| c.logic.recall_window_secs = 1).await)
    }

    pub(crate) async fn distributed() -> Self {
        ShortRecall(Cluster::distributed_tweaked(1, |c| c.logic.recall_window_secs = 1).await)
    }

    pub(crate) async fn stop(self) {
        self.0.stop().await;
    }
}

/// One's own message past `logic.recall_window_secs` is refused with TOO_LATE and stays.
async fn recall_too_late(fixture: &ShortRecall) {
    let cluster = &fixture.0;
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    cluster.befriend(&alice, &bob).await;
    let mut a = cluster.connect(Transport::Tcp, 0, &alice).await;
    let out = send(&mut a, ReceiverType::User, bob.user_id, "late", "late").await;
    let conv_seq = row(&mut a, peer(bob.user_id)).await.last_seq;
    // The window is measured from the message's server time on the server's clock.
    let until = out.server_time_ms + 1_100;
    eventually("the recall window passed", WAIT, || async {
        (zhibo_store::ids::now_ms() > until).then_some(())
    })
    .await;
    let late = Body::Recall(RecallInput {
        conversation: peer(bob.user_id),
        conv_seq,
    });
    assert_eq!(refused(&mut a, late).await, ErrorCode::TooLate);
    let page = history(&mut a, peer(bob.user_id), 0, 0, 1).await;
    assert_eq!(text(&page.messages[0]), "late");
}

/// 1,000 messages paged backwards by 50 (packets) and forwards (HTTP): every conversation seq once, in
/// order, none missing.
async fn history_pages_across_1000_messages(cluster: &Cluster) {
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    cluster.befriend(&alice, &bob).await;
    let mut a = cluster.connect(Transport::Tcp, 0, &alice).await;
    // One by one; a send refused by the connection's rate limit (200/s) is sent again.
    const N: u64 = 1_000;
    for i in 0..N {
        let input = || {
            Body::SendMessage(SendMessageInput {
                receiver_type: ReceiverType::User as i32,
                receiver_id: bob.user_id,
                client_msg_id: format!("h{i}"),
                content_type: 1,
                content: Bytes::from(format!("m{i}")),
                ..Default::default()
            })
        };
        for attempt in 1.. {
            match a.request(input(), WAIT).await {
                Ok(p) => match p.body {
                    Some(Body::SendMessageOutput(_)) => break,
                    Some(Body::Error(e)) if e.code == ErrorCode::RateLimited as i32 => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    other => panic!("expected an ACK, got {other:?}"),
                },
                // No answer (a command lost with a stopping worker, as the docs say a client may
                // see): resend with the same client_msg_id, as a client does; it is deduplicated.
                Err(e) => {
                    assert!(attempt < 4, "h{i} unanswered {attempt} times: {e}");
                    eprintln!("h{i}: {e}; resending");
                }
            }
        }
    }
    let mut b = cluster.connect(Transport::Ws, 1, &bob).await;
    let mut got = Vec::new();
    let mut before = 0;
    loop {
        let page = history(&mut b, peer(alice.user_id), before, 0, 50).await;
        assert!(page.messages.len() <= 50);
        for m in &page.messages {
            // Sent one by one: conversation seq n is the n-th message.
            assert_eq!(text(m), format!("m{}", m.conv_seq - 1));
            got.push(m.conv_seq);
        }
        match page.messages.last() {
            Some(last) if page.has_more => before = last.conv_seq,
            _ => break,
        }
    }
    let want: Vec<u64> = (1..=N).rev().collect();
    assert_eq!(got, want, "backwards: no gap, no repeat");

    let (status, body) = http(
        &cluster.api_base,
        reqwest::Method::GET,
        &format!(
            "/v1/conversations/user/{}/messages?after=500&limit=200",
            alice.user_id
        ),
        ("authorization", &format!("Bearer {}", bob.token)),
        json!(null),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let seqs: Vec<u64> = body["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["conv_seq"].as_u64().expect("conv_seq"))
        .collect();
    assert_eq!(seqs, (501..=700).collect::<Vec<_>>());
    assert_eq!(body["has_more"], json!(true));

    // Refused with a code, nothing answered: a conversation the asker is not in — bob's history
    // with a user he never talked to, and carol (an outsider) asking for hers with bob, over the
    // socket and HTTP.
    let carol = cluster.user("carol").await;
    let ask_history = |with: i64, before: u64| {
        Body::History(HistoryInput {
            conversation: peer(with),
            before,
            after: 0,
            limit: 50,
        })
    };
    assert_eq!(
        refused(&mut b, ask_history(carol.user_id, 0)).await,
        ErrorCode::NotInConversation
    );
    let mut c = cluster.connect(Transport::Tcp, 0, &carol).await;
    for before in [0, 500] {
        assert_eq!(
            refused(&mut c, ask_history(bob.user_id, before)).await,
            ErrorCode::NotInConversation
        );
    }
    let (status, body) = http(
        &cluster.api_base,
        reqwest::Method::GET,
        &format!("/v1/conversations/user/{}/messages?limit=50", bob.user_id),
        ("authorization", &format!("Bearer {}", carol.token)),
        json!(null),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    // The connection that was refused still works.
    let page = history(&mut b, peer(alice.user_id), 0, 0, 1).await;
    assert_eq!(page.messages.len(), 1);
}

/// Pages of large messages fit in one frame: a list or history page stops before the byte budget
/// (`logic.max_sync_bytes`, under the gateway's 64 KiB `max_frame`) with `has_more`, so a client
/// asking the largest page of 30 KiB messages gets every one across pages, on a connection that stays
/// up; and `has_more` is exact: a page that ends on the last item says so.
async fn large_pages_fit_in_one_frame(cluster: &Cluster) {
    let bob = cluster.user("bob").await;
    let mut b = cluster.connect(Transport::Tcp, 0, &bob).await;
    let big = |tag: &str| format!("{tag}{}", "x".repeat(30 * 1024));
    let mut peers = Vec::new();
    for name in ["alice", "carol", "dave", "erin"] {
        let u = cluster.user(name).await;
        cluster.befriend(&u, &bob).await;
        let mut c = cluster.connect(Transport::Ws, 1, &u).await;
        send(&mut c, ReceiverType::User, bob.user_id, "b0", &big(name)).await;
        if name == "alice" {
            for i in 1..5 {
                send(
                    &mut c,
                    ReceiverType::User,
                    bob.user_id,
                    &format!("b{i}"),
                    &big("alice"),
                )
                .await;
            }
        }
        peers.push(u.user_id);
    }

    // The whole list by the largest pages: more than one page, each row once.
    let mut rows: Vec<Conversation> = Vec::new();
    let mut pages = 0;
    loop {
        let after = rows.last().map(|r| {
            let at = r.last_message.as_ref().map_or(0, |m| m.server_time_ms);
            (r.conversation, at)
        });
        let input = Body::ConversationList(ConversationListInput {
            after: after.and_then(|(c, _)| c),
            after_activity_ms: after.map_or(0, |(_, at)| at),
            limit: 500,
            ..Default::default()
        });
        let page = match ask(&mut b, input).await {
            Body::ConversationListOutput(o) => o,
            other => panic!("expected ConversationListOutput, got {other:?}"),
        };
        pages += 1;
        assert!(
            !page.conversations.is_empty(),
            "an empty page after has_more"
        );
        rows.extend(page.conversations);
        if !page.has_more {
            break;
        }
    }
    let mut got: Vec<i64> = rows.iter().map(|r| r.conversation.unwrap().id).collect();
    got.sort_unstable();
    let mut want = peers.clone();
    want.sort_unstable();
    assert_eq!(got, want, "every conversation once");
    assert!(pages > 1, "four 30 KiB rows cannot fit one frame");

    // Alice's five messages backwards by the largest pages: no gap, no repeat.
    let alice = peers[0];
    let mut seqs = Vec::new();
    let mut before = 0;
    loop {
        let page = history(&mut b, peer(alice), before, 0, 200).await;
        assert!(!page.messages.is_empty(), "an empty page after has_more");
        seqs.extend(page.messages.iter().map(|m| m.conv_seq));
        before = page.messages.last().unwrap().conv_seq;
        if !page.has_more {
            break;
        }
    }
    assert_eq!(seqs, [5, 4, 3, 2, 1]);

    // Exact has_more: a page whose last item is the last one says there is no more.
    let last = history(&mut b, peer(alice), 2, 0, 1).await;
    assert_eq!(
        (
            last.messages.len(),
            last.messages[0].conv_seq,
            last.has_more
        ),
        (1, 1, false)
    );
    let first = history(&mut b, peer(alice), 3, 0, 1).await;
    assert!(first.has_more, "conv seq 1 is left");
}

/// The pages of one listing are one snapshot (later pages come from what the first page read): a
/// conversation that gets a message while the list is paged neither jumps out of the listing nor shows
/// twice; list sync from the listing's version then returns its new state.
async fn a_listing_is_one_snapshot(cluster: &Cluster) {
    let bob = cluster.user("bob").await;
    let mut b = cluster.connect(Transport::Tcp, 0, &bob).await;
    let mut peers = Vec::new();
    for name in ["alice", "carol", "dave", "erin", "frank"] {
        let u = cluster.user(name).await;
        cluster.befriend(&u, &bob).await;
        let mut c = cluster.connect(Transport::Ws, 1, &u).await;
        send(
            &mut c,
            ReceiverType::User,
            bob.user_id,
            "s0",
            &format!("hi from {name}"),
        )
        .await;
        peers.push((u, c));
    }
    let page = |after: Option<&Conversation>| {
        Body::ConversationList(ConversationListInput {
            after: after.and_then(|r| r.conversation),
            after_activity_ms: after
                .and_then(|r| r.last_message.as_ref())
                .map_or(0, |m| m.server_time_ms),
            limit: 2,
            ..Default::default()
        })
    };
    let mut rows: Vec<Conversation> = Vec::new();
    let mut version = 0;
    loop {
        let out = match ask(&mut b, page(rows.last())).await {
            Body::ConversationListOutput(o) => o,
            other => panic!("expected ConversationListOutput, got {other:?}"),
        };
        version = version.max(out.version);
        if rows.is_empty() {
            // Alice, the oldest activity (the last page), writes again after the first page.
            send(
                &mut peers[0].1,
                ReceiverType::User,
                bob.user_id,
                "s1",
                "alice again",
            )
            .await;
        }
        rows.extend(out.conversations);
        if !out.has_more {
            break;
        }
    }
    let order: Vec<i64> = rows.iter().map(|r| r.conversation.unwrap().id).collect();
    let want: Vec<i64> = peers.iter().rev().map(|(u, _)| u.user_id).collect();
    assert_eq!(
        order, want,
        "every conversation once, in the order of the first page's read"
    );
    assert_eq!(
        text(rows[4].last_message.as_ref().expect("a last message")),
        "hi from alice",
        "alice's row as the listing read it"
    );
    let changed = list(&mut b, version).await;
    let alice = changed
        .conversations
        .iter()
        .find(|r| r.conversation == peer(peers[0].0.user_id))
        .expect("list sync returns the row that changed during the listing");
    assert_eq!(
        text(alice.last_message.as_ref().expect("last")),
        "alice again"
    );
    assert_eq!(alice.unread, 2);
}

/// Typing reaches the peer's devices online now, never a device that connects later; a flood is
/// refused with RATE_LIMITED; typing in a conversation one is not in is refused.
async fn typing_reaches_online_devices_only(cluster: &Cluster) {
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    let bob2 = cluster.second_device(&bob).await;
    cluster.befriend(&alice, &bob).await;
    let mut a = cluster.connect(Transport::Tcp, 0, &alice).await;
    let mut b = cluster.connect(Transport::Ws, 1, &bob).await;
    send(&mut a, ReceiverType::User, bob.user_id, "t0", "hello").await;
    next_message(&mut b).await;
    let typing = || {
        Body::TypingInput(TypingInput {
            conversation: peer(bob.user_id),
        })
    };
    a.send(typing()).await.expect("typing");
    let t = next_push(&mut b, "Typing", |p| match &p.body {
        Some(Body::Typing(t)) => Some(*t),
        _ => None,
    })
    .await;
    assert_eq!(
        (t.conversation, t.user_id),
        (peer(alice.user_id), alice.user_id)
    );
    // Bob's second device connects afterwards: nothing was stored for it.
    let mut b2 = cluster.connect(Transport::Quic, 0, &bob2).await;
    let synced = match ask(&mut b2, Body::Sync(SyncInput { seq: 0, limit: 0 })).await {
        Body::SyncOutput(o) => o.messages,
        other => panic!("expected SyncOutput, got {other:?}"),
    };
    assert_eq!(synced.len(), 1, "only the message: {synced:?}");
    no_notice(&mut b2, "Typing").await;
    // A flood: the burst passes, then RATE_LIMITED.
    let mut limited = false;
    for _ in 0..10 {
        a.send(typing()).await.expect("typing");
    }
    let until = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < until {
        match a.recv(WAIT).await.expect("answer").expect("open").body {
            Some(Body::Error(e)) if e.code == ErrorCode::RateLimited as i32 => {
                limited = true;
                break;
            }
            Some(Body::Heartbeat(_)) => {}
            other => panic!("expected RATE_LIMITED, got {other:?}"),
        }
    }
    assert!(limited, "typing flood refused");
    let dave = cluster.user("dave").await;
    let mut d = cluster.connect(Transport::Tcp, 1, &dave).await;
    d.send(Body::TypingInput(TypingInput {
        conversation: peer(bob.user_id),
    }))
    .await
    .expect("typing");
    let e = next_push(&mut d, "an Error", |p| match &p.body {
        Some(Body::Error(e)) => Some(e.code),
        _ => None,
    })
    .await;
    assert_eq!(e, ErrorCode::NotInConversation as i32);
}

/// Mute and pin set on one device reach the other live and by the list.
async fn mute_and_pin_synced_to_other_device(cluster: &Cluster) {
    let alice = cluster.user("alice").await;
    let alice2 = cluster.second_device(&alice).await;
    let bob = cluster.user("bob").await;
    cluster.befriend(&alice, &bob).await;
    let mut b = cluster.connect(Transport::Tcp, 0, &bob).await;
    send(&mut b, ReceiverType::User, alice.user_id, "x", "hey").await;
    let mut a1 = cluster.connect(Transport::Tcp, 1, &alice).await;
    let mut a2 = cluster.connect(Transport::Ws, 0, &alice2).await;
    let set = Body::ConversationSettings(ConversationSettingsInput {
        conversation: peer(bob.user_id),
        muted: true,
        pinned: true,
    });
    match ask(&mut a1, set).await {
        Body::ConversationUpdate(u) => {
            let r = u.conversation.expect("row");
            assert!(r.muted && r.pinned);
        }
        other => panic!("expected ConversationUpdate, got {other:?}"),
    }
    let pushed = next_update(&mut a2).await.conversation.expect("row");
    assert!(pushed.muted && pushed.pinned);
    let r = row(&mut a2, peer(bob.user_id)).await;
    assert!(r.muted && r.pinned);
    assert_eq!(r.unread, 1, "muted still counts unread");
    let not_in = Body::ConversationSettings(ConversationSettingsInput {
        conversation: peer(i64::from(i32::MAX)),
        muted: true,
        pinned: false,
    });
    assert_eq!(refused(&mut a1, not_in).await, ErrorCode::NotInConversation);
}

/// The HTTP routes: list, read (with its refusals), settings, recall, delete, group readers, each with
/// its status and body.
async fn http_routes(cluster: &Cluster) {
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    cluster.befriend(&alice, &bob).await;
    let mut a = cluster.connect(Transport::Tcp, 0, &alice).await;
    let out = send(&mut a, ReceiverType::User, bob.user_id, "h1", "over http").await;
    send(&mut a, ReceiverType::User, bob.user_id, "h2", "second").await;
    let base = &cluster.api_base;
    let bearer = format!("Bearer {}", bob.token);
    let auth = ("authorization", bearer.as_str());
    let get = reqwest::Method::GET;
    let post = reqwest::Method::POST;
    let (status, body) = http(base, get.clone(), "/v1/conversations", auth, json!(null)).await;
    assert_eq!(status, 200, "{body}");
    let rows = body["conversations"].as_array().expect("rows");
    assert_eq!(rows.len(), 1, "{body}");
    assert_eq!(rows[0]["type"], json!("user"));
    assert_eq!(rows[0]["id"], json!(alice.user_id));
    assert_eq!(rows[0]["unread"], json!(2));
    assert_eq!(rows[0]["last_message"]["content"], json!("c2Vjb25k"));
    // An empty cursor is none: the first page.
    let (status, again) = http(
        base,
        get.clone(),
        "/v1/conversations?cursor=",
        auth,
        json!(null),
    )
    .await;
    assert_eq!((status, &again), (200, &body), "{again}");
    // An empty page has no cursor; a page size is 1 or more (absent: the default); a cursor is one
    // the API returned.
    let (status, body) = http(
        base,
        get.clone(),
        "/v1/conversations?changed_after=1000000000",
        auth,
        json!(null),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["conversations"], json!([]), "{body}");
    assert!(body.get("next_cursor").is_none(), "{body}");
    for path in [
        "/v1/conversations?limit=0".to_owned(),
        format!("/v1/conversations/user/{}/messages?limit=0", alice.user_id),
        "/v1/conversations?limit=501".to_owned(),
        // A cursor this API never returns (activity times are never negative).
        "/v1/conversations?cursor=-1.user.1".to_owned(),
        // Versions and seqs are int64 in the schema (outside audit: u64::MAX was echoed back).
        format!("/v1/conversations?changed_after={}", u64::MAX),
        format!("/v1/groups/1/messages/{}/readers", u64::MAX),
        "/v1/conversations?cursor=garbage".to_owned(),
        format!(
            "/v1/conversations/user/{}/messages?limit=201",
            alice.user_id
        ),
    ] {
        let (status, body) = http(base, get.clone(), &path, auth, json!(null)).await;
        assert_eq!(
            (status, body["error"]["code"].clone()),
            (400, json!("invalid_argument")),
            "{path}: {body}"
        );
    }
    let conv = format!("/v1/conversations/user/{}", alice.user_id);
    let (status, body) = http(
        base,
        post.clone(),
        &format!("{conv}/read"),
        auth,
        json!({"read_seq": 1}),
    )
    .await;
    assert_eq!((status, body["unread"].clone()), (200, json!(1)), "{body}");
    let (status, body) = http(
        base,
        post.clone(),
        &format!("{conv}/read"),
        auth,
        json!({"read_seq": 9}),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (409, json!("out_of_range")),
        "{body}"
    );
    let (status, body) = http(
        base,
        post.clone(),
        &format!("/v1/conversations/user/{}/read", i32::MAX),
        auth,
        json!({"read_seq": 1}),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (404, json!("not_in_conversation")),
        "{body}"
    );
    let (status, body) = http(
        base,
        post.clone(),
        "/v1/conversations/room/1/read",
        auth,
        json!({"read_seq": 1}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = http(
        base,
        reqwest::Method::PUT,
        &format!("{conv}/settings"),
        auth,
        json!({"muted": true, "pinned": false}),
    )
    .await;
    assert_eq!(
        (status, body["muted"].clone()),
        (200, json!(true)),
        "{body}"
    );
    // Bob may not recall alice's message; alice may.
    let (status, body) = http(
        base,
        post.clone(),
        &format!("{conv}/messages/1/recall"),
        auth,
        json!(null),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (403, json!("not_allowed")),
        "{body}"
    );
    let alice_bearer = format!("Bearer {}", alice.token);
    let alice_auth = ("authorization", alice_bearer.as_str());
    let to_bob = format!("/v1/conversations/user/{}", bob.user_id);
    let (status, body) = http(
        base,
        post.clone(),
        &format!("{to_bob}/messages/1/recall"),
        alice_auth,
        json!(null),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["message_id"], json!(out.message_id.to_string()));
    let (status, body) = http(
        base,
        post.clone(),
        &format!("{to_bob}/messages/1/recall"),
        alice_auth,
        json!(null),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (409, json!("already_recalled")),
        "{body}"
    );
    let (status, body) = http(
        base,
        post,
        &format!("{to_bob}/messages/77/recall"),
        alice_auth,
        json!(null),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (404, json!("not_found")),
        "{body}"
    );
    let (status, body) = http(
        base,
        reqwest::Method::DELETE,
        &format!("{conv}/messages/2"),
        auth,
        json!(null),
    )
    .await;
    assert_eq!(
        (status, body["deleted_conv_seq"].clone()),
        (200, json!(2)),
        "{body}"
    );
    let (status, body) = http(
        base,
        get.clone(),
        &format!("{conv}/messages"),
        auth,
        json!(null),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let messages = body["messages"].as_array().expect("messages");
    assert_eq!(messages.len(), 1, "{body}");
    assert_eq!(messages[0]["content_type"], json!(RECALLED));
    let gid = cluster.group(&alice, &[&bob]).await;
    send(&mut a, ReceiverType::Group, gid, "g", "group").await;
    let (status, body) = http(
        base,
        get.clone(),
        &format!("/v1/groups/{gid}/messages/1/readers"),
        alice_auth,
        json!(null),
    )
    .await;
    assert_eq!(
        (status, body["user_ids"].clone()),
        (200, json!([alice.user_id])),
        "{body}"
    );
    let (status, _) = http(
        base,
        get,
        "/v1/conversations",
        ("authorization", "Bearer nope"),
        json!(null),
    )
    .await;
    assert_eq!(status, 401);
}

both_modes!(
    crate::cluster::Cluster,
    2,
    unread_counts_match_across_devices,
    read_receipts_one_to_one_and_group,
    recall_live_by_sync_and_refusals,
    history_pages_across_1000_messages,
    large_pages_fit_in_one_frame,
    a_listing_is_one_snapshot,
    typing_reaches_online_devices_only,
    mute_and_pin_synced_to_other_device,
    http_routes,
);

mod short_recall {
    use super::recall_too_late;
    both_modes!(crate::conversations::ShortRecall, 2, recall_too_late);
}
