//! The integration test binary: the real API on port 0, called over HTTP with reqwest.
//!
//! Every case in `cases` takes the [`Stores`] to run against. Each runs as its own test on a fresh
//! embedded (in-memory redb) backend, and the whole list runs again as one test against the Scylla
//! backend on a real Cassandra node (one fresh keyspace, dropped afterwards) with the Redis seq
//! allocator. Cases never share users, so they run concurrently in that one keyspace.

mod cases;
mod server;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;

use futures::FutureExt as _;
use zhibo_store::embedded::EmbeddedBackend;
use zhibo_store::Stores;

type Case = fn(Stores) -> Pin<Box<dyn Future<Output = ()> + Send>>;

/// Declares the cases: one `#[tokio::test]` each on the embedded backend, and the list for Scylla.
macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::cases::$name(super::embedded_stores()).await;
                }
            )*
        }

        /// Every case, by name, for the backends that run them all in one test.
        fn all_cases() -> Vec<(&'static str, Case)> {
            vec![$((stringify!($name), |stores| Box::pin(cases::$name(stores)) as _)),*]
        }
    };
}

cases!(
    case_health_and_fallbacks,
    case_devices,
    case_sign_up_and_sign_in,
    case_sign_in_rate_limit,
    case_auth_refusals,
    case_profiles,
    case_admin,
    case_messages,
    case_friends,
    case_groups,
    case_openapi_matches_router,
    case_device_bound_to_its_user,
    case_sign_up_and_device_limits,
    case_group_add_policy,
    case_room_shaping,
    case_ready_needs_a_node_lease,
    case_failed_membership_writes_still_bump_the_version,
    case_group_changes_are_serialized,
);

fn embedded_stores() -> Stores {
    Arc::new(EmbeddedBackend::temporary().expect("in-memory redb")).stores()
}

/// Runs every case concurrently against `stores`; reports all failures, not just the first.
async fn run_all(stores: Stores) {
    let runs = all_cases().into_iter().map(|(name, case)| {
        let stores = stores.clone();
        async move {
            (
                name,
                AssertUnwindSafe(case(stores)).catch_unwind().await.is_err(),
            )
        }
    });
    let failed: Vec<&str> = futures::future::join_all(runs)
        .await
        .into_iter()
        .filter_map(|(name, failed)| failed.then_some(name))
        .collect();
    assert!(
        failed.is_empty(),
        "cases failed (see their panics above): {failed:?}"
    );
}

mod scylla {
    use std::panic::AssertUnwindSafe;
    use std::sync::Arc;

    use futures::FutureExt as _;
    use zhibo_store::redis_seq::RedisSeq;
    use zhibo_store::scylla::{self as backend, ScyllaBackend};

    /// The whole suite on Cassandra (never skipped: a missing server fails the test).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn all_cases_on_scylla_with_redis_seq() {
        let node = zhibo_testkit::cql_node();
        zhibo_testkit::require_tcp(&node, "Cassandra").await;
        let redis_url = zhibo_testkit::require_redis().await;
        let session = Arc::new(backend::session(&[node]).await.expect("CQL session"));
        let mut keyspace: String = zhibo_testkit::unique_name("zhibo_api")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect();
        keyspace.truncate(48);

        let outcome = AssertUnwindSafe(async {
            backend::migrate(&session, &keyspace, 1)
                .await
                .expect("migrate");
            let store = Arc::new(
                ScyllaBackend::new(session.clone(), &keyspace)
                    .await
                    .expect("prepare"),
            );
            let seq = RedisSeq::connect(&redis_url, store.clone())
                .await
                .expect("redis")
                .with_conversations(store.clone());
            super::run_all(store.stores(Arc::new(seq))).await;
        })
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
}
