//! The conversation listing's snapshot (docs/ARCHITECTURE.md "Listing snapshot") when it cannot be
//! used: unreadable or past its listing's deadline, the next page is read afresh from its cursor.

use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use zhibo_bus::memory::MemoryBus;
use zhibo_logic::{Logic, LogicConfig};
use zhibo_proto::client::{
    Conversation, ConversationListInput, ConversationListOutput, ReceiverType,
};
use zhibo_store::embedded::EmbeddedBackend;
use zhibo_store::presence::MemoryPresence;
use zhibo_store::redis_seq::list_snapshot_key;
use zhibo_store::Stores;

async fn setup() -> (Stores, Logic) {
    let stores = Arc::new(EmbeddedBackend::temporary().expect("store")).stores();
    for id in 1..=6 {
        stores
            .users
            .insert_user(&super::user(id))
            .await
            .expect("user");
    }
    let logic = Logic::new(
        stores.clone(),
        Arc::new(MemoryBus::new()),
        Arc::new(MemoryPresence::new()),
        LogicConfig {
            allow_strangers: true,
            ..LogicConfig::default()
        },
    );
    // Users 2..=6 each write to 1, in that order, a millisecond apart at least: 1's list is 6, 5,
    // 4, 3, 2.
    for from in 2..=6 {
        send(&logic, from, "c").await;
    }
    (stores, logic)
}

/// `from` writes to user 1; returns once the clock is past the message's time (so the next message
/// sorts after it, not by the tie-break).
async fn send(logic: &Logic, from: i64, id: &str) {
    let out = logic
        .send_message(&super::origin(from, 100 + from), &super::input(1, id, "hi"))
        .await
        .expect("send");
    while zhibo_store::ids::now_ms() <= out.server_time_ms {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn page(logic: &Logic, after: Option<&Conversation>) -> ConversationListOutput {
    let input = ConversationListInput {
        after: after.and_then(|r| r.conversation),
        after_activity_ms: after
            .and_then(|r| r.last_message.as_ref())
            .map_or(0, |m| m.server_time_ms),
        limit: 2,
        ..Default::default()
    };
    logic.conversation_list(1, &input).await.expect("list")
}

fn ids(out: &ConversationListOutput) -> Vec<i64> {
    out.conversations
        .iter()
        .map(|r| r.conversation.expect("ref").id)
        .collect()
}

/// Page 1, then user 2 (the oldest row) writes again, then `spoil` does something to the snapshot
/// page 1 kept; returns page 2.
async fn second_page_after(
    spoil: impl AsyncFnOnce(&Stores, &str),
) -> (ConversationListOutput, ConversationListOutput) {
    let (stores, logic) = setup().await;
    let first = page(&logic, None).await;
    assert_eq!(ids(&first), [6, 5]);
    assert!(first.has_more);
    send(&logic, 2, "c2").await;
    let last = first.conversations.last().expect("a row");
    let at = last.last_message.as_ref().expect("message").server_time_ms;
    let key = list_snapshot_key(1, 0, ReceiverType::User as i32, 5, at);
    spoil(&stores, &key).await;
    let second = page(&logic, Some(last)).await;
    (first, second)
}

#[tokio::test]
async fn a_kept_snapshot_serves_the_next_page() {
    let (_, second) = second_page_after(async |_: &Stores, _: &str| {}).await;
    // From the snapshot: user 2's row is still where page 1's read had it.
    assert_eq!(ids(&second), [4, 3]);
    assert!(second.has_more, "user 2's row follows in the snapshot");
}

#[tokio::test]
async fn an_unreadable_snapshot_means_a_fresh_read() {
    let (_, second) = second_page_after(async |stores: &Stores, key: &str| {
        stores
            .seq
            .put_snapshot(
                key,
                bytes::Bytes::from_static(b"\xff\xffgarbage"),
                Duration::from_secs(10),
            )
            .await
            .expect("spoil");
    })
    .await;
    // Read afresh: user 2's row moved to the top, so nothing follows user 3's.
    assert_eq!(ids(&second), [4, 3]);
    assert!(!second.has_more);
}

#[tokio::test]
async fn a_snapshot_past_its_listing_deadline_means_a_fresh_read() {
    let (_, second) = second_page_after(async |stores: &Stores, key: &str| {
        let mut kept = ConversationListOutput::decode(
            stores.seq.snapshot(key).await.expect("read").expect("kept"),
        )
        .expect("decode");
        assert!(
            kept.version > 0,
            "the snapshot carries its listing's deadline"
        );
        kept.version = 1;
        stores
            .seq
            .put_snapshot(key, kept.encode_to_vec().into(), Duration::from_secs(10))
            .await
            .expect("age it");
    })
    .await;
    assert_eq!(ids(&second), [4, 3]);
    assert!(!second.has_more, "read afresh");
}
