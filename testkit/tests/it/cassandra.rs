use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use zhibo_testkit::{require_cql, unique_name};

async fn connect() -> Session {
    let node = require_cql().await;
    SessionBuilder::new()
        .known_node(node)
        .build()
        .await
        .expect("connect to Cassandra")
}

#[tokio::test]
async fn a_written_row_reads_back() {
    let session = connect().await;
    let keyspace = unique_name("it_cql");
    session
        .query_unpaged(
            format!(
                "CREATE KEYSPACE {keyspace} WITH replication = \
                 {{'class': 'SimpleStrategy', 'replication_factor': 1}}"
            ),
            &[],
        )
        .await
        .expect("CREATE KEYSPACE");
    session
        .query_unpaged(
            format!("CREATE TABLE {keyspace}.messages (room text, seq bigint, body text, PRIMARY KEY (room, seq))"),
            &[],
        )
        .await
        .expect("CREATE TABLE");

    session
        .query_unpaged(
            format!("INSERT INTO {keyspace}.messages (room, seq, body) VALUES (?, ?, ?)"),
            ("lobby", 7_i64, "hello"),
        )
        .await
        .expect("INSERT");
    let (seq, body) = session
        .query_unpaged(
            format!("SELECT seq, body FROM {keyspace}.messages WHERE room = ?"),
            ("lobby",),
        )
        .await
        .expect("SELECT")
        .into_rows_result()
        .expect("SELECT returns rows")
        .single_row::<(i64, String)>()
        .expect("exactly one row");
    assert_eq!((seq, body.as_str()), (7, "hello"));

    session
        .query_unpaged(format!("DROP KEYSPACE {keyspace}"), &[])
        .await
        .expect("DROP KEYSPACE");
}
