//! Direct SQL on a data directory's `meta.db`, for what only tests do to a catalog (count
//! rows of any table, lose records on purpose); the replica's own code has no such calls.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};

/// A one-connection pool on `meta.db` (waiting for a running serve's writes).
pub async fn open(db: &Path) -> SqlitePool {
    let options = SqliteConnectOptions::new()
        .filename(db)
        .busy_timeout(Duration::from_secs(30));
    SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .expect("open meta.db")
}

/// Rows of `table` whose `column` is `id`.
pub async fn count_rows(db: &Path, table: &str, column: &str, id: i64) -> u64 {
    let pool = open(db).await;
    let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT COUNT(*) FROM {table} WHERE {column} = ?"
    )))
    .bind(id)
    .fetch_one(&pool)
    .await
    .expect("count rows");
    pool.close().await;
    n as u64
}

/// Deletes the journal records of `chunk` of a volume in batches `after < seq <= upto` (the
/// index loses them while the journal keeps its bytes). Returns the rows deleted.
pub async fn delete_records_of_chunk(
    db: &Path,
    volume_id: i64,
    chunk: u64,
    after: u64,
    upto: u64,
) -> u64 {
    let pool = open(db).await;
    let n = sqlx::query(
        "DELETE FROM records WHERE volume_id = ? AND chunk = ? AND seq > ? AND seq <= ?",
    )
    .bind(volume_id)
    .bind(chunk as i64)
    .bind(after as i64)
    .bind(upto as i64)
    .execute(&pool)
    .await
    .expect("delete records")
    .rows_affected();
    pool.close().await;
    n
}
