//! The CQL migrations in `sql/`, embedded at build time, and the migrator that applies them.
//!
//! Applied versions are recorded in `schema_migrations`; a migration is applied once, in version
//! order. Its statements are all `IF NOT EXISTS`, so re-running one that failed half-way is safe.
//! Run migrations from one process at a time (e.g. a deploy step or the first instance to start):
//! concurrent `CREATE TABLE` of the same table on different coordinators can disagree on schema.

use std::collections::BTreeSet;

use scylla::client::session::Session;
use scylla::value::CqlTimestamp;

use super::db_error;
use crate::ids::now_ms;
use crate::{Error, ErrorKind, Result};

/// One numbered migration file from `sql/`.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Version, the file's number; migrations apply in ascending order.
    pub version: i32,
    /// File name without extension, recorded in `schema_migrations`.
    pub name: &'static str,
    /// The file's text: `;`-terminated statements and whole-line `--` comments.
    pub cql: &'static str,
}

/// Every migration, ascending by version. Add new files here.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_init",
        cql: include_str!("../../../sql/0001_init.cql"),
    },
    Migration {
        version: 2,
        name: "0002_rooms",
        cql: include_str!("../../../sql/0002_rooms.cql"),
    },
    Migration {
        version: 3,
        name: "0003_node_leases",
        cql: include_str!("../../../sql/0003_node_leases.cql"),
    },
    Migration {
        version: 4,
        name: "0004_security",
        cql: include_str!("../../../sql/0004_security.cql"),
    },
    Migration {
        version: 5,
        name: "0005_room_shaping",
        cql: include_str!("../../../sql/0005_room_shaping.cql"),
    },
    Migration {
        version: 6,
        name: "0006_room_moderation",
        cql: include_str!("../../../sql/0006_room_moderation.cql"),
    },
    Migration {
        version: 7,
        name: "0007_conversations",
        cql: include_str!("../../../sql/0007_conversations.cql"),
    },
    Migration {
        version: 8,
        name: "0008_conv_seq",
        cql: include_str!("../../../sql/0008_conv_seq.cql"),
    },
    Migration {
        version: 9,
        name: "0009_seq_gaps",
        cql: include_str!("../../../sql/0009_seq_gaps.cql"),
    },
];

/// The statements of a migration file: whole-line `--` comments dropped, split on `;`, trimmed,
/// empty ones skipped. (So no `;` inside string literals in `sql/`.)
pub fn statements(cql: &str) -> Vec<String> {
    let without_comments: String = cql
        .lines()
        .filter(|line| !line.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    without_comments
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Whether `name` is a plain CQL identifier (it is formatted into `CREATE KEYSPACE`, so this
/// check is what keeps that statement injection-free).
pub fn valid_keyspace(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 48
}

/// Creates `keyspace` if missing (SimpleStrategy with `replication_factor`), makes it the session's
/// keyspace, and applies every migration of [`MIGRATIONS`] not yet recorded in `schema_migrations`.
/// Returns the versions applied by this call (empty when the schema was already current).
///
/// # Errors
/// [`ErrorKind::Unavailable`] for an invalid keyspace name or replication factor 0 (a configuration
/// error: [`ErrorKind`] has no closer kind), when a statement fails or schema agreement is not reached.
pub async fn migrate(
    session: &Session,
    keyspace: &str,
    replication_factor: u32,
) -> Result<Vec<i32>> {
    if !valid_keyspace(keyspace) {
        return Err(Error::new(
            ErrorKind::Unavailable,
            format!("invalid keyspace name {keyspace:?}: letters, digits and '_', at most 48"),
        ));
    }
    if replication_factor == 0 {
        return Err(Error::new(
            ErrorKind::Unavailable,
            "replication factor must be at least 1",
        ));
    }
    let create_keyspace = format!(
        "CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = \
         {{'class': 'SimpleStrategy', 'replication_factor': {replication_factor}}}"
    );
    ddl(session, &create_keyspace).await?;
    session
        .use_keyspace(keyspace, false)
        .await
        .map_err(|e| db_error("use keyspace", e))?;
    ddl(
        session,
        "CREATE TABLE IF NOT EXISTS schema_migrations (version int PRIMARY KEY, name text, applied_at timestamp)",
    )
    .await?;

    let applied = applied_versions(session).await?;
    let record = session
        .prepare("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)")
        .await
        .map_err(|e| db_error("prepare schema_migrations insert", e))?;
    let mut newly_applied = Vec::new();
    for migration in MIGRATIONS {
        if applied.contains(&migration.version) {
            continue;
        }
        tracing::info!(
            keyspace,
            version = migration.version,
            name = migration.name,
            "applying CQL migration"
        );
        for statement in statements(migration.cql) {
            if let Some((table, column)) = added_column(&statement) {
                // `ALTER TABLE ... ADD` is not idempotent (and `ADD IF NOT EXISTS` is not portable):
                // a migration re-run after a half-way failure skips a column that is already there.
                if column_exists(session, keyspace, &table, &column).await? {
                    continue;
                }
            }
            ddl(session, &statement).await?;
        }
        session
            .execute_unpaged(
                &record,
                (migration.version, migration.name, CqlTimestamp(now_ms())),
            )
            .await
            .map_err(|e| db_error("record migration", e))?;
        newly_applied.push(migration.version);
    }
    Ok(newly_applied)
}

/// Versions already recorded in `schema_migrations`.
async fn applied_versions(session: &Session) -> Result<BTreeSet<i32>> {
    let result = session
        .query_unpaged("SELECT version FROM schema_migrations", ())
        .await
        .map_err(|e| db_error("read schema_migrations", e))?
        .into_rows_result()
        .map_err(|e| db_error("read schema_migrations", e))?;
    let rows = result
        .rows::<(i32,)>()
        .map_err(|e| Error::wrap(ErrorKind::Corrupt, "schema_migrations", e))?;
    rows.map(|row| {
        row.map(|(v,)| v)
            .map_err(|e| Error::wrap(ErrorKind::Corrupt, "schema_migrations", e))
    })
    .collect()
}

/// `(table, column)` of an `ALTER TABLE <table> ADD <column> <type>` statement.
fn added_column(statement: &str) -> Option<(String, String)> {
    let words: Vec<&str> = statement.split_whitespace().collect();
    match words.as_slice() {
        [alter, table_kw, table, add, column, _type, ..]
            if alter.eq_ignore_ascii_case("ALTER")
                && table_kw.eq_ignore_ascii_case("TABLE")
                && add.eq_ignore_ascii_case("ADD") =>
        {
            Some((table.to_ascii_lowercase(), column.to_ascii_lowercase()))
        }
        _ => None,
    }
}

/// Whether `keyspace.table` already has `column` (read from `system_schema.columns`).
async fn column_exists(
    session: &Session,
    keyspace: &str,
    table: &str,
    column: &str,
) -> Result<bool> {
    let result = session
        .query_unpaged(
            "SELECT column_name FROM system_schema.columns \
             WHERE keyspace_name = ? AND table_name = ? AND column_name = ?",
            (keyspace, table, column),
        )
        .await
        .map_err(|e| db_error("read system_schema.columns", e))?
        .into_rows_result()
        .map_err(|e| db_error("read system_schema.columns", e))?;
    Ok(result.rows_num() > 0)
}

/// Runs one schema statement and waits until every node agrees on the resulting schema.
async fn ddl(session: &Session, statement: &str) -> Result<()> {
    session
        .query_unpaged(statement, ())
        .await
        .map_err(|e| db_error(&format!("schema statement `{}`", first_line(statement)), e))?;
    session
        .await_schema_agreement()
        .await
        .map_err(|e| db_error("schema agreement", e))?;
    Ok(())
}

fn first_line(statement: &str) -> &str {
    statement.lines().next().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_ascending_and_unique() {
        assert!(MIGRATIONS.windows(2).all(|w| w[0].version < w[1].version));
        for m in MIGRATIONS {
            assert!(
                m.name.starts_with(&format!("{:04}_", m.version)),
                "{}",
                m.name
            );
        }
    }

    #[test]
    fn splits_statements_and_drops_comment_lines() {
        let cql = "-- a comment; with a semicolon\nCREATE TABLE a (x int PRIMARY KEY);\n\n  -- indented\nCREATE TABLE b (\n  y int PRIMARY KEY\n) WITH comment = 'b';\n";
        assert_eq!(
            statements(cql),
            vec![
                "CREATE TABLE a (x int PRIMARY KEY)".to_owned(),
                "CREATE TABLE b (\n  y int PRIMARY KEY\n) WITH comment = 'b'".to_owned(),
            ]
        );
    }

    #[test]
    fn init_migration_is_idempotent_and_unqualified() {
        let stmts = statements(MIGRATIONS[0].cql);
        assert!(stmts.len() >= 12, "{}", stmts.len());
        for s in &stmts {
            assert!(s.starts_with("CREATE TABLE IF NOT EXISTS "), "{s}");
            let table = s["CREATE TABLE IF NOT EXISTS ".len()..]
                .split_whitespace()
                .next()
                .unwrap_or("");
            assert!(!table.contains('.'), "{s}");
        }
    }

    #[test]
    fn finds_added_columns() {
        assert_eq!(
            added_column("ALTER TABLE devices ADD owner_user_id bigint"),
            Some(("devices".to_owned(), "owner_user_id".to_owned()))
        );
        assert_eq!(
            added_column("CREATE TABLE IF NOT EXISTS a (x int PRIMARY KEY)"),
            None
        );
        for m in MIGRATIONS {
            for s in statements(m.cql) {
                assert!(
                    s.starts_with("CREATE TABLE IF NOT EXISTS ") || added_column(&s).is_some(),
                    "not idempotent: {s}"
                );
            }
        }
    }

    #[test]
    fn keyspace_names_are_checked() {
        assert!(valid_keyspace("zhibo"));
        assert!(valid_keyspace("zhibo_test_1"));
        assert!(!valid_keyspace(""));
        assert!(!valid_keyspace("1abc"));
        assert!(!valid_keyspace("a; DROP KEYSPACE x"));
        assert!(!valid_keyspace(&"a".repeat(49)));
    }
}
