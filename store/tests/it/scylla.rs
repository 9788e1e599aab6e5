//! The ScyllaDB / Cassandra backend against a real node: migrations (applied once, recorded), then
//! the conformance suite with the Redis seq allocator, then what only this backend can get wrong
//! (LWT outcomes, batch sizes, ack timestamps). Each test works in its own keyspace and drops it.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use ::scylla::client::session::Session;
use bytes::Bytes;
use futures::FutureExt as _;
use zhibo_proto::client::Message;
use zhibo_store::redis_seq::RedisSeq;
use zhibo_store::scylla::{self as backend, ScyllaBackend, MIGRATIONS};
use zhibo_store::{Device, ErrorKind, MessageStore as _, Profile, SendPlan, User};

use crate::conformance;

/// A session to the test node (fails loudly if it is not running).
pub(crate) async fn session() -> Arc<Session> {
    let node = zhibo_testkit::require_cql().await;
    Arc::new(backend::session(&[node]).await.expect("CQL session"))
}

/// A keyspace name of this run: letters, digits and `_`, at most 48.
fn keyspace_name() -> String {
    let mut name: String = zhibo_testkit::unique_name("zhibo_it")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    name.truncate(48);
    name
}

/// Runs `body` with a fresh keyspace name, then drops that keyspace even if `body` panicked.
pub(crate) async fn with_keyspace<F, Fut>(session: Arc<Session>, body: F)
where
    F: FnOnce(Arc<Session>, String) -> Fut,
    Fut: Future<Output = ()>,
{
    let keyspace = keyspace_name();
    let outcome = AssertUnwindSafe(body(session.clone(), keyspace.clone()))
        .catch_unwind()
        .await;
    let dropped = session
        .query_unpaged(format!("DROP KEYSPACE IF EXISTS {keyspace}"), ())
        .await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    dropped.expect("drop test keyspace");
}

fn device(device_id: i64) -> Device {
    Device {
        device_id,
        device_type: "android".to_owned(),
        brand: "xiaomi".to_owned(),
        model: "mi 14".to_owned(),
        system_version: "14".to_owned(),
        sdk_version: "1.0.0".to_owned(),
        tokens_valid_after_ms: 0,
        created_at_ms: 1_700_000_000_000,
        owner_user_id: 0,
    }
}

fn message(seq: u64, content: Bytes) -> Message {
    Message {
        message_id: 9_000_000 + seq,
        seq,
        sender_user_id: 7,
        sender_device_id: 8,
        receiver_type: 1,
        receiver_id: 7,
        client_msg_id: format!("c{seq}"),
        server_time_ms: 1_700_000_000_000 + seq as i64,
        content_type: 1,
        content,
        conv_seq: 0,
    }
}

#[tokio::test]
async fn migrations_apply_once_and_are_recorded() {
    with_keyspace(session().await, |session, keyspace| async move {
        let applied = backend::migrate(&session, &keyspace, 1)
            .await
            .expect("first migrate");
        let all: Vec<i32> = MIGRATIONS.iter().map(|m| m.version).collect();
        assert_eq!(applied, all, "a fresh keyspace gets every migration");
        let again = backend::migrate(&session, &keyspace, 1)
            .await
            .expect("second migrate");
        assert!(
            again.is_empty(),
            "a current keyspace gets nothing: {again:?}"
        );
        // A migration whose statements all ran but whose record was lost (a crash in between) runs
        // again without failing, `ALTER TABLE ... ADD` of an existing column included.
        session
            .query_unpaged(
                format!("DELETE FROM {keyspace}.schema_migrations WHERE version = 3"),
                (),
            )
            .await
            .expect("forget migration 3");
        let rerun = backend::migrate(&session, &keyspace, 1)
            .await
            .expect("re-run of an applied ALTER");
        assert_eq!(rerun, vec![3]);

        let rows = session
            .query_unpaged(
                format!("SELECT version, name FROM {keyspace}.schema_migrations"),
                (),
            )
            .await
            .expect("read schema_migrations")
            .into_rows_result()
            .expect("rows");
        let mut recorded: Vec<(i32, String)> = rows
            .rows::<(i32, String)>()
            .expect("types")
            .collect::<Result<_, _>>()
            .expect("decode");
        recorded.sort_unstable();
        let expected: Vec<(i32, String)> = MIGRATIONS
            .iter()
            .map(|m| (m.version, m.name.to_owned()))
            .collect();
        assert_eq!(
            recorded, expected,
            "one schema_migrations row per migration"
        );

        // The migrated schema holds data: a device written through the backend reads back.
        let store = ScyllaBackend::new(session.clone(), &keyspace)
            .await
            .expect("prepare");
        let d = device(4242);
        zhibo_store::DeviceStore::insert_device(&store, &d)
            .await
            .expect("insert");
        assert_eq!(
            zhibo_store::DeviceStore::get_device(&store, 4242)
                .await
                .expect("get"),
            Some(d)
        );
    })
    .await;
}

#[tokio::test]
async fn conformance_with_redis_seq() {
    let redis_url = zhibo_testkit::require_redis().await;
    with_keyspace(session().await, |session, keyspace| async move {
        backend::migrate(&session, &keyspace, 1)
            .await
            .expect("migrate");
        let store = Arc::new(
            ScyllaBackend::new(session, &keyspace)
                .await
                .expect("prepare"),
        );
        let seq = RedisSeq::connect(&redis_url, store.clone())
            .await
            .expect("redis")
            .with_conversations(store.clone());
        conformance::run_all(store.stores(Arc::new(seq))).await;
    })
    .await;
}

/// A driver failure keeps the driver's error as the source of the store error.
#[tokio::test]
async fn a_driver_error_is_kept_as_the_source() {
    let session = session().await;
    let err = ScyllaBackend::new(session, "zhibo_it_no_such_keyspace")
        .await
        .expect_err("the keyspace does not exist");
    assert_eq!(err.kind, ErrorKind::Unavailable, "{err}");
    let source = std::error::Error::source(&err).expect("the driver error is the source");
    assert!(
        source
            .downcast_ref::<::scylla::errors::UseKeyspaceError>()
            .is_some(),
        "the source is the driver's error: {source:?}"
    );
}

#[tokio::test]
async fn backend_specific_edges() {
    with_keyspace(session().await, |session, keyspace| async move {
        backend::migrate(&session, &keyspace, 1)
            .await
            .expect("migrate");
        let store = ScyllaBackend::new(session, &keyspace)
            .await
            .expect("prepare");
        edges(&store).await;
    })
    .await;
}

async fn edges(store: &ScyllaBackend) {
    use zhibo_store::{DeviceStore as _, UserStore as _};

    // Token revocation never moves back, and an unknown device is NotFound.
    store
        .insert_device(&device(1))
        .await
        .expect("insert device");
    store.revoke_tokens_before(1, 500).await.expect("revoke");
    store
        .revoke_tokens_before(1, 100)
        .await
        .expect("earlier revoke is a no-op");
    let d = store.get_device(1).await.expect("get").expect("device");
    assert_eq!(
        d.tokens_valid_after_ms, 500,
        "revocation cut-off never moves back"
    );
    let err = store
        .revoke_tokens_before(2, 100)
        .await
        .expect_err("unknown device");
    assert_eq!(err.kind, ErrorKind::NotFound);

    // A username whose user row creation failed is not returned, and can be claimed by its id.
    let user = User {
        user_id: 10,
        username: "ann".to_owned(),
        password_hash: String::new(),
        profile: Profile::default(),
        created_at_ms: 1,
        updated_at_ms: 1,
    };
    let taken_id = User {
        username: "ann2".to_owned(),
        ..user.clone()
    };
    store.insert_user(&user).await.expect("insert ann");
    let err = store
        .insert_user(&taken_id)
        .await
        .expect_err("user id taken");
    assert_eq!(err.kind, ErrorKind::Conflict);
    // The losing insert released the name it had claimed.
    assert_eq!(
        store.get_user_by_username("ann2").await.expect("lookup"),
        None
    );
    store
        .insert_user(&User {
            user_id: 11,
            ..taken_id.clone()
        })
        .await
        .expect("ann2 is free again");

    // Acks: the largest seq wins whatever the order, including concurrent writers.
    assert_eq!(store.acked(10, 1).await.expect("acked"), 0);
    let acks: Vec<u64> = vec![5, 90, 3, 42, 90, 17, 1];
    futures::future::try_join_all(acks.iter().map(|&s| store.ack(10, 1, s)))
        .await
        .expect("acks");
    store.ack(10, 1, 2).await.expect("late low ack");
    assert_eq!(store.acked(10, 1).await.expect("acked"), 90);
    assert_eq!(store.acked(10, 2).await.expect("acked"), 0, "per device");

    // Many messages to one inbox, larger than one batch may be: split, all stored, in order.
    let big = Bytes::from(vec![b'x'; 6 * 1024]);
    let entries: Vec<(i64, Message)> = (1..=40)
        .map(|s| (10, message(s, big.clone())))
        .chain((1..=3).map(|s| (11, message(s, Bytes::new()))))
        .collect();
    store.append_many(&entries).await.expect("append_many");
    let got = store.sync(10, 0, 100).await.expect("sync");
    assert_eq!(got.len(), 40);
    assert!(got
        .iter()
        .zip(1..)
        .all(|(m, s)| m.seq == s && m.content == big));
    assert_eq!(store.max_seq(10).await.expect("max"), 40);
    assert_eq!(store.max_seq(11).await.expect("max"), 3);
    assert_eq!(
        store.sync(11, 0, 100).await.expect("sync")[0].content,
        Bytes::new()
    );
    assert!(store.sync(10, u64::MAX, 10).await.expect("sync").is_empty());
    assert!(store.sync(10, 0, 0).await.expect("sync").is_empty());

    // Dedup: insert-if-absent returns the stored plan to the loser, recipients included.
    let first = SendPlan {
        message_id: u64::MAX - 1,
        seq: 3,
        server_time_ms: 77,
        recipients: (0..2_000).map(|u| (u, u as u64 + 1)).collect(),
        conv_seq: 0,
    };
    let second = SendPlan {
        message_id: 5,
        seq: 4,
        server_time_ms: 78,
        recipients: vec![],
        conv_seq: 0,
    };
    assert_eq!(
        store
            .put_dedup_if_absent(1, "m1", &first)
            .await
            .expect("first"),
        None
    );
    assert_eq!(
        store
            .put_dedup_if_absent(1, "m1", &second)
            .await
            .expect("second"),
        Some(first.clone())
    );
    assert_eq!(store.get_dedup(1, "m1").await.expect("get"), Some(first));
}

/// Every statement is counted by kind in `CQL_OPS` (the `zhibo_cql_operations_total` metric): a read,
/// a plain write, a lightweight transaction and a batch each move their own counter. Other tests of
/// this binary run concurrently in the same process, so each counter is checked to have grown.
#[tokio::test]
async fn cql_operations_are_counted_by_kind() {
    with_keyspace(session().await, |session, keyspace| async move {
        backend::migrate(&session, &keyspace, 1)
            .await
            .expect("migrate");
        let store = ScyllaBackend::new(session, &keyspace)
            .await
            .expect("prepare");
        let count = |kind: &str| {
            backend::CQL_OPS
                .by_kind()
                .iter()
                .find(|(k, _)| *k == kind)
                .map(|&(_, n)| n)
                .expect("kind")
        };
        let message = |seq: u64| Message {
            message_id: seq,
            seq,
            sender_user_id: 7,
            receiver_type: 1,
            receiver_id: 7,
            content: Bytes::from_static(b"x"),
            ..Default::default()
        };
        let before = ["read", "write", "lwt", "batch"].map(count);
        let rows_before = backend::CQL_OPS.rows_written();
        store.max_seq(7).await.expect("read");
        store.append(7, &message(1)).await.expect("write");
        let plan = SendPlan {
            message_id: 9,
            seq: 1,
            server_time_ms: 1,
            recipients: vec![(7, 1)],
            conv_seq: 0,
        };
        store
            .put_dedup_if_absent(7, "counted", &plan)
            .await
            .expect("lwt");
        store
            .append_many(&[(7, message(2)), (7, message(3))])
            .await
            .expect("batch");
        let rows = backend::CQL_OPS.rows_written() - rows_before;
        assert!(
            rows >= 4,
            "a write, an LWT and a batch of two statements wrote {rows} rows"
        );
        // A send with a conversation: each copy's single-partition batch (inbox and conversation
        // rows) and the conversation's record are batches too.
        let batches = count("batch");
        let mut to_8 = message(4);
        to_8.receiver_id = 8;
        let conv_plan = SendPlan {
            message_id: 10,
            seq: 4,
            server_time_ms: 2,
            recipients: vec![(7, 4), (8, 1)],
            conv_seq: 1,
        };
        let copies = [(7, to_8.clone()), (8, Message { seq: 1, ..to_8 })];
        assert_eq!(
            store
                .record_send(7, "counted-conv", &conv_plan, &copies)
                .await
                .expect("send with a conversation"),
            None
        );
        assert!(
            count("batch") >= batches + 2,
            "a conversation send counted {} batches",
            count("batch") - batches
        );
        let after = ["read", "write", "lwt", "batch"].map(count);
        for (i, kind) in ["read", "write", "lwt", "batch"].iter().enumerate() {
            assert!(
                after[i] > before[i],
                "{kind}: {} -> {}",
                before[i],
                after[i]
            );
        }
    })
    .await;
}
