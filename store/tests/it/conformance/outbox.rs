//! Conformance of [`zhibo_store::OutboxStore`] (the backends that have one: embedded only; in
//! distributed mode JetStream is the outbox): order, paging by id, removal, ids never reused while
//! open. Tolerates entries left by other runs on the same database (it looks only above its own ids).

use bytes::Bytes;
use zhibo_store::{OutboxEvent, OutboxStore};

fn event(topic: &str, n: u32) -> OutboxEvent {
    OutboxEvent {
        topic: topic.into(),
        key: format!("{}:{n}", super::id()),
        body: Bytes::from(format!("{{\"n\":{n}}}")),
    }
}

/// Runs every outbox check against `outbox`.
pub(crate) async fn run_all(outbox: &dyn OutboxStore) {
    assert!(
        outbox.enqueue(&[]).await.expect("empty enqueue").is_empty(),
        "an empty enqueue adds nothing"
    );
    let events = [event("push", 1), event("webhook", 2), event("push", 3)];
    let ids = outbox.enqueue(&events).await.expect("enqueue");
    assert_eq!(ids.len(), 3);
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids ascend in enqueue order: {ids:?}"
    );
    let before = ids[0] - 1;
    let pending = outbox.pending(before, 10).await.expect("pending");
    assert_eq!(
        pending.iter().map(|e| e.id).collect::<Vec<_>>(),
        ids,
        "pending lists the entries by id"
    );
    assert_eq!(
        pending.iter().map(|e| e.event.clone()).collect::<Vec<_>>(),
        events,
        "topic, key and body come back as enqueued"
    );
    let page = outbox.pending(ids[0], 1).await.expect("page");
    assert_eq!(page.len(), 1, "limit holds");
    assert_eq!(page[0].id, ids[1], "pages start after the cursor");

    outbox.remove(ids[1]).await.expect("remove");
    outbox.remove(ids[1]).await.expect("removing twice is fine");
    let left: Vec<u64> = outbox
        .pending(before, 10)
        .await
        .expect("pending")
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(left, [ids[0], ids[2]], "only the removed entry is gone");

    outbox.remove(ids[0]).await.expect("remove");
    outbox.remove(ids[2]).await.expect("remove");
    assert!(outbox
        .pending(before, 10)
        .await
        .expect("pending")
        .is_empty());
    // The outbox may now be empty; a relay whose cursor is at ids[2] must still see the next one.
    let next = outbox.enqueue(&[event("push", 4)]).await.expect("enqueue");
    assert!(
        next[0] > ids[2],
        "an id is never reused: {next:?} after {ids:?}"
    );
    assert_eq!(
        outbox.pending(ids[2], 10).await.expect("pending")[0].id,
        next[0]
    );
    outbox.remove(next[0]).await.expect("remove");
}
