//! Numbered migrations: `api/migrations/NNNN_name.sql`, applied in order at start, each in its
//! own transaction, recorded in `schema_migrations`. `{serial}` in a migration becomes the
//! backend's auto-incrementing primary key; `--` lines are comments. On PostgreSQL replicas
//! starting together take turns through an advisory lock.

use super::{Backend, Result, Store, StoreError};
use sqlx::Row;

/// (version, name, SQL).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "initial schema", include_str!("../../migrations/0001_initial.sql")),
    (2, "enrolment token mac", include_str!("../../migrations/0002_enrolment_mac.sql")),
    (3, "free machine index", include_str!("../../migrations/0003_free_machine_index.sql")),
    (4, "secrets", include_str!("../../migrations/0004_secrets.sql")),
    (5, "event source", include_str!("../../migrations/0005_event_source.sql")),
];

/// Applies the migrations the database has not seen yet.
pub(super) async fn run(store: &Store) -> Result<()> {
    let mut conn = store.pool.acquire().await?;
    if store.backend == Backend::Postgres {
        // Replicas starting together take turns.
        sqlx::query("SELECT pg_advisory_lock(7460001)").execute(&mut *conn).await?;
    }
    let result = async {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_ms BIGINT NOT NULL)",
        )
        .execute(&mut *conn)
        .await?;
        let applied: Vec<i64> = sqlx::query("SELECT version FROM schema_migrations")
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(|r| r.try_get::<i64, _>("version"))
            .collect::<Result<_, _>>()?;
        let serial = match store.backend {
            Backend::Sqlite => "INTEGER PRIMARY KEY AUTOINCREMENT",
            Backend::Postgres => "BIGSERIAL PRIMARY KEY",
        };
        for (version, name, sql) in MIGRATIONS {
            if applied.contains(version) {
                continue;
            }
            let sql: String = sql
                .replace("{serial}", serial)
                .lines()
                .filter(|l| !l.trim_start().starts_with("--"))
                .collect::<Vec<_>>()
                .join("\n");
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            for stmt in sql.split(';') {
                if stmt.trim().is_empty() {
                    continue;
                }
                sqlx::query(stmt).execute(&mut *tx).await?;
            }
            sqlx::query("INSERT INTO schema_migrations (version, name, applied_ms) VALUES ($1, $2, $3)")
                .bind(*version)
                .bind(*name)
                .bind(store.now_ms())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            tracing::info!(version, name, "applied migration");
        }
        Ok::<(), StoreError>(())
    }
    .await;
    if store.backend == Backend::Postgres {
        sqlx::query("SELECT pg_advisory_unlock(7460001)").execute(&mut *conn).await?;
    }
    result
}
