//! Conformance of [`zhibo_store::ConversationStore`]: conversation rows and unread, read positions
//! (1:1 peer and group readers), list paging and sync by version, history paging without gaps,
//! recall, delete-for-me and settings; and every refusal (typed, nothing changed).

use bytes::Bytes;
use futures::StreamExt as _;
use zhibo_proto::client::{Message, ReceiverType};
use zhibo_store::{
    Conversation, ConversationId, ConversationKey, ConversationSettings, ErrorKind, HistoryPage,
    ListCursor, ListQuery, RecallRequest, SeqGap, Stores, CONTENT_TYPE_DELETED,
    CONTENT_TYPE_RECALLED,
};

use super::id;

/// Server time of conversation message `conv_seq` in these checks.
const T0: i64 = 1_700_000_000_000;
/// Recall window used by the checks.
const WINDOW_MS: i64 = 120_000;

/// A 1:1 (`group` = None) or group message from `from`, body `"msg #<conv_seq>"`.
fn template(from: i64, to: i64, group: bool, conv_seq: u64) -> Message {
    Message {
        message_id: 5_000_000 + conv_seq,
        seq: 0,
        sender_user_id: from,
        sender_device_id: 77,
        receiver_type: if group {
            ReceiverType::Group as i32
        } else {
            ReceiverType::User as i32
        },
        receiver_id: to,
        client_msg_id: format!("conv-{from}-{conv_seq}"),
        server_time_ms: T0 + conv_seq as i64,
        content_type: 1,
        content: Bytes::from(format!("msg #{conv_seq}")),
        conv_seq: 0,
    }
}

/// Stores a message the way the send path does: inbox copies of every user in `users` (the sender
/// first), then the conversation record. Returns `(user, inbox seq)` of every copy.
async fn send(s: &Stores, conv_seq: u64, m: &Message, users: &[i64]) -> Vec<(i64, u64)> {
    let seqs = s.seq.next(users).await.expect("seq");
    let recipients: Vec<(i64, u64)> = users.iter().copied().zip(seqs).collect();
    let mut sender_copy = m.clone();
    sender_copy.seq = recipients[0].1;
    let entries: Vec<(i64, Message)> = recipients
        .iter()
        .map(|&(u, seq)| {
            let mut copy = m.clone();
            copy.seq = seq;
            if u != m.sender_user_id {
                copy.sender_device_id = 0;
            }
            (u, copy)
        })
        .collect();
    s.messages.append_many(&entries).await.expect("append");
    s.conversations
        .record_message(conv_seq, &sender_copy, &recipients)
        .await
        .expect("record_message");
    recipients
}

async fn row(s: &Stores, user: i64, c: ConversationId) -> Conversation {
    s.conversations
        .get(user, c)
        .await
        .expect("get")
        .unwrap_or_else(|| panic!("user {user} has a row of {c:?}"))
}

/// Unread, read positions and the last message of a 1:1 conversation; refusals change nothing.
pub(crate) async fn direct(s: &Stores) {
    let (a, b, stranger) = (id(), id(), id());
    let (ab, ba) = (ConversationId::direct(b), ConversationId::direct(a));
    let key = ConversationKey::direct(a, b);
    assert_eq!(key, ConversationKey::direct(b, a), "one key per pair");
    assert_eq!(
        s.conversations
            .last_conversation_seq(key)
            .await
            .expect("last"),
        0,
        "a new conversation has no seq"
    );
    assert_eq!(s.conversations.get(a, ab).await.expect("get"), None);

    let mut b_seqs = Vec::new();
    for conv_seq in 1..=3 {
        let copies = send(s, conv_seq, &template(a, b, false, conv_seq), &[a, b]).await;
        b_seqs.push(copies[1].1);
    }
    assert_eq!(
        s.conversations
            .last_conversation_seq(key)
            .await
            .expect("last"),
        3,
        "the conversation's last seq is the floor for its counter"
    );
    let rb = row(s, b, ba).await;
    assert_eq!((rb.last_seq, rb.read_seq, rb.unread()), (3, 0, 3), "{rb:?}");
    assert_eq!(
        rb.peer_read_seq, 3,
        "the sender has read its own messages: the receiver sees them read"
    );
    assert_eq!(
        rb.version, b_seqs[2],
        "version = the owner's inbox seq of the change"
    );
    let last = rb.last_message.as_ref().expect("last message");
    assert_eq!(last.content, Bytes::from("msg #3"));
    assert_eq!(last.seq, b_seqs[2], "the last message is the owner's copy");
    assert_eq!(
        last.sender_device_id, 0,
        "other users never see the device id"
    );
    assert_eq!((last.sender_user_id, last.receiver_id), (a, b));
    let ra = row(s, a, ab).await;
    assert_eq!((ra.last_seq, ra.read_seq, ra.unread()), (3, 3, 0), "{ra:?}");
    assert_eq!(
        ra.last_message.as_ref().map(|m| m.sender_device_id),
        Some(77)
    );

    // A message recorded late (an older conv seq) does not replace the newer last message.
    send(s, 2, &template(a, b, false, 2), &[a, b]).await;
    let rb2 = row(s, b, ba).await;
    assert_eq!(rb2.last_seq, 3);
    assert_eq!(
        rb2.last_message.as_ref().map(|m| m.content.clone()),
        Some(Bytes::from("msg #3")),
        "the newest message stays the last one"
    );

    // Reads: b reads up to 2; both of b's rows and a's peer position follow.
    s.conversations
        .mark_read(b, ba, 2, 9_000)
        .await
        .expect("mark_read");
    let rb = row(s, b, ba).await;
    assert_eq!((rb.read_seq, rb.unread(), rb.version), (2, 1, 9_000));
    assert_eq!(
        row(s, a, ab).await.peer_read_seq,
        2,
        "a sees b's read position"
    );
    // Never moves back.
    s.conversations
        .mark_read(b, ba, 1, 9_001)
        .await
        .expect("mark_read lower");
    assert_eq!(
        row(s, b, ba).await.read_seq,
        2,
        "a read position never moves back"
    );
    assert_eq!(row(s, a, ab).await.peer_read_seq, 2);

    // Refusals: beyond the last message, not in the conversation. Nothing changes.
    let before = row(s, b, ba).await;
    let e = s
        .conversations
        .mark_read(b, ba, 4, 9_100)
        .await
        .expect_err("beyond last");
    assert_eq!(e.kind, ErrorKind::OutOfRange, "{e}");
    assert_eq!(
        row(s, b, ba).await,
        before,
        "a refused read changes nothing"
    );
    assert_eq!(row(s, a, ab).await.peer_read_seq, 2, "nor the peer's row");
    let e = s
        .conversations
        .mark_read(stranger, ConversationId::direct(a), 1, 1)
        .await
        .expect_err("stranger");
    assert_eq!(e.kind, ErrorKind::NotMember, "{e}");
    assert_eq!(
        s.conversations
            .get(stranger, ConversationId::direct(a))
            .await
            .expect("get"),
        None,
        "a refused read creates no row"
    );

    // Reading everything clears the badge.
    s.conversations
        .mark_read(b, ba, 3, 9_200)
        .await
        .expect("mark_read all");
    assert_eq!(row(s, b, ba).await.unread(), 0);

    // A room message has no conversation.
    let mut room = template(a, b, false, 9);
    room.receiver_type = ReceiverType::Room as i32;
    let e = s
        .conversations
        .record_message(9, &room, &[(a, 1)])
        .await
        .expect_err("room message");
    assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
}

/// Group read positions, "who read message X", and a late joiner's unread.
pub(crate) async fn group(s: &Stores) {
    let (g, owner, m1, m2, late) = (id(), id(), id(), id(), id());
    let gc = ConversationId::group(g);
    for conv_seq in 1..=2 {
        send(
            s,
            conv_seq,
            &template(owner, g, true, conv_seq),
            &[owner, m1, m2],
        )
        .await;
    }
    let r1 = row(s, m1, gc).await;
    assert_eq!(
        (r1.last_seq, r1.unread(), r1.peer_read_seq),
        (2, 2, 0),
        "{r1:?}"
    );
    assert_eq!(r1.last_message.as_ref().map(|m| m.receiver_id), Some(g));
    assert_eq!(
        row(s, owner, gc).await.unread(),
        0,
        "the sender read its own messages"
    );

    s.conversations
        .mark_read(m1, gc, 1, 10)
        .await
        .expect("m1 reads 1");
    let mut readers = s
        .conversations
        .group_readers(g, 1)
        .await
        .expect("readers of 1");
    readers.sort_unstable();
    let mut want = vec![owner, m1];
    want.sort_unstable();
    assert_eq!(readers, want, "who read message 1");
    assert_eq!(
        s.conversations
            .group_readers(g, 2)
            .await
            .expect("readers of 2"),
        vec![owner],
        "who read message 2"
    );
    let e = s
        .conversations
        .mark_read(m2, gc, 3, 11)
        .await
        .expect_err("beyond");
    assert_eq!(e.kind, ErrorKind::OutOfRange, "{e}");
    assert_eq!(
        s.conversations.group_readers(g, 2).await.expect("readers"),
        vec![owner],
        "a refused read is not a group read"
    );
    let e = s
        .conversations
        .mark_read(late, gc, 1, 1)
        .await
        .expect_err("not joined");
    assert_eq!(e.kind, ErrorKind::NotMember, "{e}");

    // A member who joins at seq 2 has nothing unread and cannot read past the last message.
    s.conversations.join(late, gc, 2, 20).await.expect("join");
    let rl = row(s, late, gc).await;
    assert_eq!(
        (rl.last_seq, rl.read_seq, rl.unread(), rl.version),
        (2, 2, 0, 20),
        "{rl:?}"
    );
    send(s, 3, &template(m2, g, true, 3), &[m2, owner, m1, late]).await;
    let rl = row(s, late, gc).await;
    assert_eq!((rl.last_seq, rl.unread()), (3, 1), "{rl:?}");
    assert_eq!(
        rl.last_message.as_ref().map(|m| m.content.clone()),
        Some(Bytes::from("msg #3"))
    );
    let e = s
        .conversations
        .mark_read(late, gc, 4, 21)
        .await
        .expect_err("beyond");
    assert_eq!(e.kind, ErrorKind::OutOfRange);
    // A join below the current positions moves nothing back.
    s.conversations
        .join(late, gc, 1, 22)
        .await
        .expect("join again");
    let rl = row(s, late, gc).await;
    assert_eq!((rl.last_seq, rl.read_seq), (3, 2), "{rl:?}");
}

/// Recall: refusals (someone else's, too late, unknown, recall of a recall) change nothing; a recall
/// tombstones every copy, the history and the last message; an admin may recall others' messages.
pub(crate) async fn recall(s: &Stores) {
    let (a, b) = (id(), id());
    let (ab, ba) = (ConversationId::direct(b), ConversationId::direct(a));
    let key = ConversationKey::direct(a, b);
    let mut copies = Vec::new();
    for conv_seq in 1..=3 {
        copies.push(send(s, conv_seq, &template(a, b, false, conv_seq), &[a, b]).await);
    }
    let request = |by: i64, now_ms: i64, admin: bool| RecallRequest {
        by_user_id: by,
        may_recall_others: admin,
        now_ms,
        window_ms: WINDOW_MS,
    };
    let snapshot = || async {
        (
            row(s, a, ab).await,
            row(s, b, ba).await,
            s.messages.sync(b, 0, 100).await.expect("sync"),
            s.conversations
                .history(b, ba, HistoryPage::After(0), 100)
                .await
                .expect("history"),
        )
    };
    let before = snapshot().await;
    for (conv_seq, req, kind) in [
        (3, request(b, T0 + 3, false), ErrorKind::NotAllowed),
        (
            3,
            request(a, T0 + 3 + WINDOW_MS + 1, false),
            ErrorKind::TooLate,
        ),
        (99, request(a, T0, false), ErrorKind::NotFound),
    ] {
        let e = s
            .conversations
            .recall(key, conv_seq, req)
            .await
            .expect_err("refused");
        assert_eq!(e.kind, kind, "recall {conv_seq} by {req:?}: {e}");
    }
    assert!(snapshot().await == before, "refused recalls change nothing");

    let done = s
        .conversations
        .recall(key, 3, request(a, T0 + 3 + WINDOW_MS, false))
        .await
        .expect("recall within the window");
    assert_eq!(done.message_id, 5_000_003);
    assert_eq!(done.sender_user_id, a);
    assert_eq!(done.recipients, copies[2], "every copy, to notify");
    for (user, c) in [(a, ab), (b, ba)] {
        let r = row(s, user, c).await;
        let last = r.last_message.expect("last message");
        assert_eq!(
            (last.content_type, last.content.len()),
            (CONTENT_TYPE_RECALLED, 0),
            "user {user}'s list shows the tombstone"
        );
        assert_eq!(r.last_seq, 3, "a recall keeps the seq (it still counts)");
        let inbox = s.messages.sync(user, 0, 100).await.expect("sync");
        let copy = inbox
            .iter()
            .find(|m| m.message_id == 5_000_003)
            .expect("copy");
        assert_eq!(
            (copy.content_type, copy.content.len()),
            (CONTENT_TYPE_RECALLED, 0)
        );
        assert!(
            inbox
                .iter()
                .filter(|m| m.message_id != 5_000_003)
                .all(|m| !m.content.is_empty()),
            "only the recalled message is tombstoned"
        );
    }
    let history = s
        .conversations
        .history(b, ba, HistoryPage::Before(u64::MAX), 10)
        .await
        .expect("history");
    assert_eq!(history.len(), 3);
    assert_eq!(history[0].conv_seq, 3);
    assert_eq!(history[0].message.content_type, CONTENT_TYPE_RECALLED);
    assert_eq!(history[1].message.content, Bytes::from("msg #2"));

    let e = s
        .conversations
        .recall(key, 3, request(a, T0 + 3, false))
        .await
        .expect_err("recall of a recall");
    assert_eq!(e.kind, ErrorKind::AlreadyRecalled, "{e}");

    // An admin may recall someone else's message, past the sender's window. Not the last message:
    // the list's last message stays the (recalled) message 3.
    s.conversations
        .recall(key, 1, request(b, T0 + 10 * WINDOW_MS, true))
        .await
        .expect("admin recall");
    let history = s
        .conversations
        .history(a, ab, HistoryPage::After(0), 10)
        .await
        .expect("history");
    let types: Vec<i32> = history.iter().map(|h| h.message.content_type).collect();
    assert_eq!(types, [CONTENT_TYPE_RECALLED, 1, CONTENT_TYPE_RECALLED]);
    assert_eq!(row(s, a, ab).await.last_seq, 3);

    // A rewrite of a recalled message (a resend after a crash) does not undo the recall's record.
    s.conversations
        .record_message(3, &template(a, b, false, 3), &copies[2])
        .await
        .expect("rewrite");
    let e = s
        .conversations
        .recall(key, 3, request(a, T0 + 3, false))
        .await
        .expect_err("still recalled");
    assert_eq!(e.kind, ErrorKind::AlreadyRecalled, "{e}");
}

/// Delete-for-me hides a message from one user only; settings and touch move the version.
pub(crate) async fn delete_and_settings(s: &Stores) {
    let (a, b, stranger) = (id(), id(), id());
    let (ab, ba) = (ConversationId::direct(b), ConversationId::direct(a));
    let mut copies = Vec::new();
    for conv_seq in 1..=2 {
        copies.push(send(s, conv_seq, &template(a, b, false, conv_seq), &[a, b]).await);
    }
    s.conversations
        .delete_for_me(b, ba, 2, 500)
        .await
        .expect("delete");
    let hb: Vec<u64> = s
        .conversations
        .history(b, ba, HistoryPage::After(0), 10)
        .await
        .expect("history")
        .iter()
        .map(|h| h.conv_seq)
        .collect();
    assert_eq!(hb, [1], "gone from b's history");
    let ha = s
        .conversations
        .history(a, ab, HistoryPage::After(0), 10)
        .await
        .expect("history");
    assert_eq!(ha.len(), 2, "still in a's history");
    assert_eq!(ha[1].message.content, Bytes::from("msg #2"));
    let copy = s
        .messages
        .sync(b, copies[1][1].1 - 1, 1)
        .await
        .expect("sync")
        .pop()
        .expect("b's copy");
    assert_eq!(
        (copy.content_type, copy.content.len()),
        (CONTENT_TYPE_DELETED, 0),
        "b's other devices learn the deletion by sync"
    );
    let rb = row(s, b, ba).await;
    assert_eq!(rb.version, 500);
    assert_eq!(
        rb.last_message.as_ref().map(|m| m.content_type),
        Some(CONTENT_TYPE_DELETED),
        "the deleted last message is not shown in b's list"
    );
    assert_eq!(
        row(s, a, ab).await.last_message.map(|m| m.content),
        Some(Bytes::from("msg #2")),
        "a's list is untouched"
    );
    for (user, c, conv_seq) in [(b, ba, 2), (b, ba, 7), (stranger, ba, 1)] {
        let e = s
            .conversations
            .delete_for_me(user, c, conv_seq, 600)
            .await
            .expect_err("not in history");
        assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
    }
    assert_eq!(
        row(s, b, ba).await.version,
        500,
        "refused deletes change nothing"
    );

    // Settings: a newer version wins; an older one is ignored; a stranger is refused.
    let muted = ConversationSettings {
        muted: true,
        pinned: true,
    };
    s.conversations
        .set_settings(b, ba, muted, 700)
        .await
        .expect("settings");
    s.conversations
        .set_settings(b, ba, ConversationSettings::default(), 650)
        .await
        .expect("older settings");
    let rb = row(s, b, ba).await;
    assert_eq!(
        (rb.muted, rb.pinned, rb.version),
        (true, true, 700),
        "{rb:?}"
    );
    assert_eq!(rb.unread(), 2, "muted conversations still count unread");
    let e = s
        .conversations
        .set_settings(stranger, ba, muted, 800)
        .await
        .expect_err("stranger");
    assert_eq!(e.kind, ErrorKind::NotMember, "{e}");
    assert_eq!(s.conversations.get(stranger, ba).await.expect("get"), None);

    s.conversations
        .touch(&[(b, ba, 900), (a, ab, 1)])
        .await
        .expect("touch");
    assert_eq!(row(s, b, ba).await.version, 900, "touch raises the version");
    assert!(row(s, a, ab).await.version > 1, "touch never lowers it");
}

/// The list: newest activity first, paged by cursor without gaps or repeats, and sync by version.
pub(crate) async fn list(s: &Stores) {
    let me = id();
    assert!(s
        .conversations
        .list(
            me,
            ListQuery {
                changed_after: 0,
                after: None,
                limit: 10
            }
        )
        .await
        .expect("empty list")
        .is_empty());
    let peers: Vec<i64> = (0..7).map(|_| id()).collect();
    // Peer i's message has conv seq i + 1, so its activity time grows with i.
    for (i, &peer) in peers.iter().enumerate() {
        send(
            s,
            i as u64 + 1,
            &template(peer, me, false, i as u64 + 1),
            &[peer, me],
        )
        .await;
    }
    let all = s
        .conversations
        .list(
            me,
            ListQuery {
                changed_after: 0,
                after: None,
                limit: 100,
            },
        )
        .await
        .expect("list");
    let order: Vec<i64> = all.iter().map(|c| c.conversation.id).collect();
    let newest_first: Vec<i64> = peers.iter().rev().copied().collect();
    assert_eq!(order, newest_first, "newest activity first");
    assert!(all.iter().all(|c| c.unread() > 0 && c.user_id == me));

    let mut paged = Vec::new();
    let mut after = None;
    loop {
        let page = s
            .conversations
            .list(
                me,
                ListQuery {
                    changed_after: 0,
                    after,
                    limit: 3,
                },
            )
            .await
            .expect("page");
        paged.extend(page.iter().map(|c| c.conversation.id));
        match page.last() {
            Some(last) if page.len() == 3 => {
                after = Some(ListCursor {
                    last_activity_ms: last.last_activity_ms(),
                    conversation: last.conversation,
                });
            }
            _ => break,
        }
    }
    assert_eq!(paged, newest_first, "pages by 3: no gap, no repeat");

    // Sync by version: only the rows changed after what a device holds.
    let held = all.iter().map(|c| c.version).max().expect("versions");
    s.conversations
        .mark_read(me, ConversationId::direct(peers[1]), 2, held + 1)
        .await
        .expect("read");
    send(s, 8, &template(peers[4], me, false, 8), &[peers[4], me]).await;
    let changed = s
        .conversations
        .list(
            me,
            ListQuery {
                changed_after: held,
                after: None,
                limit: 100,
            },
        )
        .await
        .expect("changed");
    let ids: Vec<i64> = changed.iter().map(|c| c.conversation.id).collect();
    assert_eq!(
        ids,
        [peers[4], peers[1]],
        "the two changed rows, newest activity first"
    );
    assert_eq!(changed[1].unread(), 0);
    assert_eq!(changed[0].last_seq, 8);
}

/// Backwards and forwards over 1,000 messages in pages of 50: every message once, in order.
pub(crate) async fn history_paging(s: &Stores) {
    let (a, b) = (id(), id());
    let ba = ConversationId::direct(a);
    const N: u64 = 1_000;
    // Concurrent sends, as the send path runs them; order of arrival does not matter.
    futures::stream::iter(1..=N)
        .for_each_concurrent(32, |conv_seq| async move {
            let from = if conv_seq % 3 == 0 { b } else { a };
            let to = if from == a { b } else { a };
            send(
                s,
                conv_seq,
                &template(from, to, false, conv_seq),
                &[from, to],
            )
            .await;
        })
        .await;
    let mut seen = Vec::new();
    let mut before = u64::MAX;
    loop {
        let page = s
            .conversations
            .history(b, ba, HistoryPage::Before(before), 50)
            .await
            .expect("history page");
        for h in &page {
            assert_eq!(
                h.message.content,
                Bytes::from(format!("msg #{}", h.conv_seq)),
                "entry {} carries its own message",
                h.conv_seq
            );
        }
        seen.extend(page.iter().map(|h| h.conv_seq));
        match page.last() {
            Some(last) if page.len() == 50 => before = last.conv_seq,
            _ => break,
        }
    }
    assert_eq!(
        seen,
        (1..=N).rev().collect::<Vec<_>>(),
        "backwards: no gap, no repeat"
    );

    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = s
            .conversations
            .history(b, ba, HistoryPage::After(after), 50)
            .await
            .expect("history page");
        seen.extend(page.iter().map(|h| h.conv_seq));
        match page.last() {
            Some(last) if page.len() == 50 => after = last.conv_seq,
            _ => break,
        }
    }
    assert_eq!(
        seen,
        (1..=N).collect::<Vec<_>>(),
        "forwards: no gap, no repeat"
    );
    let middle = s
        .conversations
        .history(b, ba, HistoryPage::Before(501), 3)
        .await
        .expect("page from the middle");
    let middle: Vec<u64> = middle.iter().map(|h| h.conv_seq).collect();
    assert_eq!(middle, [500, 499, 498], "load earlier from any message");
    assert!(s
        .conversations
        .history(b, ba, HistoryPage::After(N), 50)
        .await
        .expect("after the newest")
        .is_empty());
    assert!(s
        .conversations
        .history(
            b,
            ConversationId::direct(id()),
            HistoryPage::Before(u64::MAX),
            50
        )
        .await
        .expect("other conversation")
        .is_empty());
    assert!(s
        .conversations
        .history(b, ba, HistoryPage::Before(u64::MAX), 0)
        .await
        .expect("limit 0")
        .is_empty());
    let rb = row(s, b, ba).await;
    // b sent message 999: its read position is there, so only 1,000 is unread.
    assert_eq!(
        (rb.last_seq, rb.read_seq, rb.unread()),
        (N, 999, 1),
        "{rb:?}"
    );
}

/// A group of the maximum size (2,000): one send records 2,000 copies (its record holds 2,000 copies:
/// ~32 KB in one cell), "who read" reads 2,000 positions, a recall tombstones 2,000 copies.
pub(crate) async fn large_group(s: &Stores) {
    const MEMBERS: usize = 2_000;
    let g = id();
    let gc = ConversationId::group(g);
    let members: Vec<i64> = (0..MEMBERS).map(|_| id()).collect();
    let sender = members[0];
    let copies = send(s, 1, &template(sender, g, true, 1), &members).await;
    assert_eq!(copies.len(), MEMBERS);
    futures::stream::iter(members.iter().step_by(2))
        .for_each_concurrent(64, |&m| async move {
            s.conversations
                .mark_read(m, gc, 1, 1_000)
                .await
                .expect("read");
        })
        .await;
    let readers = s.conversations.group_readers(g, 1).await.expect("readers");
    assert_eq!(readers.len(), MEMBERS / 2, "every other member read it");
    let last = members[MEMBERS - 1];
    assert_eq!(row(s, last, gc).await.unread(), 1);
    let done = s
        .conversations
        .recall(
            ConversationKey::Group(g),
            1,
            RecallRequest {
                by_user_id: sender,
                may_recall_others: false,
                now_ms: T0 + 1,
                window_ms: WINDOW_MS,
            },
        )
        .await
        .expect("recall in a 2,000-member group");
    assert_eq!(done.recipients, copies);
    let copy = s
        .messages
        .sync(last, copies[MEMBERS - 1].1 - 1, 1)
        .await
        .expect("sync");
    assert_eq!(
        copy[0].content_type, CONTENT_TYPE_RECALLED,
        "the last member's copy too"
    );
    assert_eq!(
        row(s, last, gc).await.last_message.map(|m| m.content_type),
        Some(CONTENT_TYPE_RECALLED)
    );
}

/// Every conversation check.
pub(crate) async fn run_all(s: &Stores) {
    direct(s).await;
    group(s).await;
    recall(s).await;
    delete_and_settings(s).await;
    list(s).await;
    history_paging(s).await;
    large_group(s).await;
    send_path(s).await;
    seq_gaps(s).await;
}

/// The seqs a recovered counter skipped are remembered per row and not counted as unread: in the
/// row, in the list, past a read; a row keeps the gap that ends highest.
pub(crate) async fn seq_gaps(s: &Stores) {
    let (a, b, g) = (id(), id(), id());
    let (ba, key) = (ConversationId::direct(a), ConversationKey::direct(a, b));
    for conv_seq in 1..=3 {
        send(s, conv_seq, &template(a, b, false, conv_seq), &[a, b]).await;
    }
    // Redis lost the counter: it resumed at 3 + 1,000; the first send after it records the gap.
    let gap = SeqGap { from: 4, to: 1_003 };
    s.conversations
        .record_gap(key, &[a, b], gap)
        .await
        .expect("record_gap");
    send(s, 1_004, &template(a, b, false, 1_004), &[a, b]).await;
    let rb = row(s, b, ba).await;
    assert_eq!(
        (rb.last_seq, rb.read_seq, rb.skipped, rb.unread()),
        (1_004, 0, Some(gap), 4),
        "three messages before the gap and one after it: {rb:?}"
    );
    assert_eq!(
        row(s, a, ConversationId::direct(b)).await.skipped,
        Some(gap),
        "the sender's row too"
    );
    let listed = s
        .conversations
        .list(
            b,
            ListQuery {
                changed_after: 0,
                after: None,
                limit: 10,
            },
        )
        .await
        .expect("list");
    let listed = listed
        .iter()
        .find(|r| r.conversation == ba)
        .expect("listed");
    assert_eq!(
        (listed.skipped, listed.unread()),
        (Some(gap), 4),
        "{listed:?}"
    );
    // A read inside the gap leaves the message after it; a read past it, nothing.
    s.conversations
        .mark_read(b, ba, 500, 20_000)
        .await
        .expect("read into the gap");
    assert_eq!(row(s, b, ba).await.unread(), 1);
    s.conversations
        .mark_read(b, ba, 1_004, 20_001)
        .await
        .expect("read all");
    assert_eq!(row(s, b, ba).await.unread(), 0);

    // A group: an older gap never replaces a newer one (the writes may arrive in any order).
    let (gk, gc) = (ConversationKey::Group(g), ConversationId::group(g));
    send(s, 1, &template(a, g, true, 1), &[a, b]).await;
    let newer = SeqGap { from: 2, to: 1_001 };
    s.conversations
        .record_gap(gk, &[a, b], newer)
        .await
        .expect("record_gap");
    s.conversations
        .record_gap(gk, &[a, b], SeqGap { from: 2, to: 500 })
        .await
        .expect("record an older gap");
    send(s, 1_002, &template(a, g, true, 1_002), &[a, b]).await;
    let rb = row(s, b, gc).await;
    assert_eq!(
        (rb.skipped, rb.unread()),
        (Some(newer), 2),
        "one message before the gap, one after: {rb:?}"
    );
}

/// The send path's calls: one allocator call gives the inbox seqs and the conversation seq, and
/// `record_send` with a plan's `conv_seq` writes the conversation rows with the inbox entries (a
/// resend's plan keeps its `conv_seq`; a second `record_send` of the key writes nothing).
pub(crate) async fn send_path(s: &Stores) {
    let (a, b, g) = (id(), id(), id());
    let key = ConversationKey::direct(a, b);
    let mut plans = Vec::new();
    for i in 1..=2u64 {
        let zhibo_store::ConversationSeqs {
            inbox: seqs,
            conv_seq,
            ..
        } = s
            .seq
            .next_in_conversation(&[a, b], key)
            .await
            .expect("allocate");
        assert_eq!(seqs.len(), 2);
        let mut m = template(a, b, false, conv_seq);
        m.conv_seq = conv_seq;
        let recipients: Vec<(i64, u64)> = vec![(a, seqs[0]), (b, seqs[1])];
        let plan = zhibo_store::SendPlan {
            message_id: m.message_id,
            seq: seqs[0],
            server_time_ms: m.server_time_ms,
            recipients: recipients.clone(),
            conv_seq,
        };
        let entries: Vec<(i64, Message)> = recipients
            .iter()
            .map(|&(u, seq)| {
                let mut copy = m.clone();
                copy.seq = seq;
                if u != a {
                    copy.sender_device_id = 0;
                }
                (u, copy)
            })
            .collect();
        let cmid = format!("send-path-{a}-{i}");
        assert_eq!(
            s.messages
                .record_send(77, &cmid, &plan, &entries)
                .await
                .expect("record_send"),
            None
        );
        // A racing resend finds the plan, conversation seq included, and writes nothing.
        let other = zhibo_store::SendPlan {
            conv_seq: conv_seq + 100,
            ..plan.clone()
        };
        let existing = s
            .messages
            .record_send(77, &cmid, &other, &entries)
            .await
            .expect("record_send again");
        assert_eq!(existing.map(|p| p.conv_seq), Some(conv_seq));
        plans.push(plan);
    }
    assert_eq!(
        plans.iter().map(|p| p.conv_seq).collect::<Vec<_>>(),
        [1, 2],
        "a new conversation counts 1, 2"
    );
    assert_eq!(
        s.conversations
            .last_conversation_seq(key)
            .await
            .expect("last"),
        2
    );
    let rb = row(s, b, ConversationId::direct(a)).await;
    assert_eq!(
        (rb.last_seq, rb.unread(), rb.peer_read_seq),
        (2, 2, 2),
        "{rb:?}"
    );
    let ra = row(s, a, ConversationId::direct(b)).await;
    assert_eq!((ra.read_seq, ra.unread()), (2, 0), "{ra:?}");
    // Synced copies and history entries carry the conversation seq.
    let synced = s.messages.sync(b, 0, 10).await.expect("sync");
    assert_eq!(
        synced.iter().map(|m| m.conv_seq).collect::<Vec<_>>(),
        [1, 2]
    );
    let page = s
        .conversations
        .history(
            b,
            ConversationId::direct(a),
            HistoryPage::Before(u64::MAX),
            10,
        )
        .await
        .expect("history");
    assert_eq!(
        page.iter()
            .map(|e| (e.conv_seq, e.message.conv_seq))
            .collect::<Vec<_>>(),
        [(2, 2), (1, 1)]
    );

    // A group send: the sender's group read position is part of it.
    let gkey = ConversationKey::Group(g);
    let zhibo_store::ConversationSeqs {
        inbox: seqs,
        conv_seq,
        ..
    } = s
        .seq
        .next_in_conversation(&[a, b], gkey)
        .await
        .expect("allocate");
    let mut m = template(a, g, true, conv_seq);
    m.conv_seq = conv_seq;
    let recipients = vec![(a, seqs[0]), (b, seqs[1])];
    let plan = zhibo_store::SendPlan {
        message_id: m.message_id,
        seq: seqs[0],
        server_time_ms: m.server_time_ms,
        recipients: recipients.clone(),
        conv_seq,
    };
    let entries: Vec<(i64, Message)> = recipients
        .iter()
        .map(|&(u, seq)| (u, Message { seq, ..m.clone() }))
        .collect();
    s.messages
        .record_send(78, &format!("send-path-g-{g}"), &plan, &entries)
        .await
        .expect("record_send");
    assert_eq!(
        s.conversations
            .group_readers(g, conv_seq)
            .await
            .expect("readers"),
        [a]
    );
    assert_eq!(row(s, b, ConversationId::group(g)).await.unread(), 1);
}
