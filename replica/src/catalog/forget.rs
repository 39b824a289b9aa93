//! Forget: the requests `forget` hands to serve, its one transaction, and what was forgotten.

use super::{Catalog, WriteLock};
use crate::error::{ReplicaError, Result};

/// What one forget deletes ([`WriteLock::forget_rows`], see `forget`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForgetRows {
    pub group_id: i64,
    pub group: String,
    /// The whole group goes (its batches, bookmarks, link, failover, the group row), not only
    /// the volumes below.
    pub whole_group: bool,
    /// (id, name) of the volumes forgotten.
    pub volumes: Vec<(i64, String)>,
    /// Files and directories to delete afterwards, relative to the data directory.
    pub files: Vec<String>,
    /// The event recorded (with no group or volume: it must not be shown as the history of a
    /// group created again under the same name).
    pub message: String,
    pub now_ns: i64,
}

/// A row of `forget_requests`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForgetRequestRow {
    pub id: i64,
    /// `group` or `volume`.
    pub kind: String,
    pub name: String,
    pub state: String,
    pub requested_ns: i64,
    pub message: Option<String>,
}

type ForgetRequestTuple = (i64, String, String, String, i64, Option<String>);
const FORGET_REQUEST_COLUMNS: &str = "id, kind, name, state, requested_ns, message";

fn forget_request_of(t: ForgetRequestTuple) -> ForgetRequestRow {
    ForgetRequestRow {
        id: t.0,
        kind: t.1,
        name: t.2,
        state: t.3,
        requested_ns: t.4,
        message: t.5,
    }
}

impl Catalog {
    // ---- forget (migrations/0006_forget.sql) ----

    /// Asks the running serve to forget a group or a volume (`kind` `group` or `volume`);
    /// returns the request's id.
    pub async fn insert_forget_request(&self, kind: &str, name: &str, now_ns: i64) -> Result<i64> {
        sqlx::query_scalar("INSERT INTO forget_requests (kind, name, state, requested_ns) VALUES (?, ?, 'requested', ?) RETURNING id")
            .bind(kind)
            .bind(name)
            .bind(now_ns)
            .fetch_one(&self.pool)
            .await
            .map_err(ReplicaError::catalog("request a forget"))
    }

    pub async fn forget_request(&self, id: i64) -> Result<Option<ForgetRequestRow>> {
        let row: Option<ForgetRequestTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {FORGET_REQUEST_COLUMNS} FROM forget_requests WHERE id = ?"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(ReplicaError::catalog("read a forget request"))?;
        Ok(row.map(forget_request_of))
    }

    /// Requests still waiting for serve, oldest first.
    pub async fn requested_forgets(&self) -> Result<Vec<ForgetRequestRow>> {
        let rows: Vec<ForgetRequestTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {FORGET_REQUEST_COLUMNS} FROM forget_requests WHERE state = 'requested' ORDER BY id"
        )))
        .fetch_all(&self.pool)
        .await
        .map_err(ReplicaError::catalog("read forget requests"))?;
        Ok(rows.into_iter().map(forget_request_of).collect())
    }

    /// Moves a request from `from` to `to` (`running`, `done`, `failed`) with `message`; false
    /// when it was not in `from` (its command withdrew it, or serve took it first).
    pub async fn move_forget_request(
        &self,
        id: i64,
        from: &str,
        to: &str,
        message: Option<&str>,
        now_ns: i64,
    ) -> Result<bool> {
        let ended = (to != "running").then_some(now_ns);
        let n = sqlx::query(
            "UPDATE forget_requests SET state = ?, message = COALESCE(?, message), ended_ns = ? WHERE id = ? AND state = ?",
        )
        .bind(to)
        .bind(message)
        .bind(ended)
        .bind(id)
        .bind(from)
        .execute(&self.pool)
        .await
        .map_err(ReplicaError::catalog("update a forget request"))?
        .rows_affected();
        Ok(n == 1)
    }

    /// At serve's start: requests a previous serve left waiting or running fail with `why`.
    pub async fn fail_unfinished_forgets(&self, why: &str, now_ns: i64) -> Result<()> {
        sqlx::query("UPDATE forget_requests SET state = 'failed', message = ?, ended_ns = ? WHERE state IN ('requested', 'running')")
            .bind(why)
            .bind(now_ns)
            .execute(&self.pool)
            .await
            .map_err(ReplicaError::catalog("fail unfinished forget requests"))?;
        Ok(())
    }

    /// The files forgets still have to delete (relative to the data directory).
    pub async fn forget_files(&self) -> Result<Vec<String>> {
        sqlx::query_scalar("SELECT path FROM forget_files ORDER BY path")
            .fetch_all(&self.pool)
            .await
            .map_err(ReplicaError::catalog("read the files left to forget"))
    }

    /// A file of `forget_files` is gone.
    pub async fn forget_file_done(&self, path: &str) -> Result<()> {
        sqlx::query("DELETE FROM forget_files WHERE path = ?")
            .bind(path)
            .execute(&self.pool)
            .await
            .map_err(ReplicaError::catalog("record a forgotten file"))?;
        Ok(())
    }

    /// When the group or volume (`kind`) `name` was forgotten, if it was.
    pub async fn forgotten(&self, kind: &str, name: &str) -> Result<Option<i64>> {
        sqlx::query_scalar("SELECT forgotten_ns FROM forgotten WHERE kind = ? AND name = ?")
            .bind(kind)
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(ReplicaError::catalog("read what was forgotten"))
    }
}

impl WriteLock {
    /// The one transaction of a forget (step 1 in `forget`): deletes every catalog row of the
    /// volumes (records, verifier rows, pins, events naming them) and, for a whole group,
    /// every row of the group (batches, bookmarks, pins, failover, link, events, the volume
    /// and group rows); records them in `forgotten`, the files left to delete in
    /// `forget_files`, and one event. Returns the record rows deleted.
    pub async fn forget_rows(&mut self, f: &ForgetRows) -> Result<u64> {
        let err = ReplicaError::catalog;
        let conn = self.conn()?;
        let mut records = 0u64;
        for (id, name) in &f.volumes {
            records += sqlx::query("DELETE FROM records WHERE volume_id = ?")
                .bind(id)
                .execute(&mut *conn)
                .await
                .map_err(err("delete the records of a forgotten volume"))?
                .rows_affected();
            for table in [
                "verify_results",
                "verify_mismatches",
                "verify_runs",
                "verify_sweep",
                "repair_requests",
                "pins",
                "reader_totals",
            ] {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DELETE FROM {table} WHERE volume_id = ?"
                )))
                .bind(id)
                .execute(&mut *conn)
                .await
                .map_err(err("delete the rows of a forgotten volume"))?;
            }
            sqlx::query("DELETE FROM events WHERE volume = ?")
                .bind(name)
                .execute(&mut *conn)
                .await
                .map_err(err("delete the events of a forgotten volume"))?;
            sqlx::query("DELETE FROM volumes WHERE id = ?")
                .bind(id)
                .execute(&mut *conn)
                .await
                .map_err(err("delete a forgotten volume"))?;
            sqlx::query("INSERT OR REPLACE INTO forgotten (kind, name, forgotten_ns) VALUES ('volume', ?, ?)")
                .bind(name)
                .bind(f.now_ns)
                .execute(&mut *conn)
                .await
                .map_err(err("record a forgotten volume"))?;
        }
        if f.whole_group {
            for table in ["pins", "failovers", "batches", "bookmarks", "links"] {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DELETE FROM {table} WHERE group_id = ?"
                )))
                .bind(f.group_id)
                .execute(&mut *conn)
                .await
                .map_err(err("delete the rows of a forgotten group"))?;
            }
            let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM volumes WHERE group_id = ?")
                .bind(f.group_id)
                .fetch_one(&mut *conn)
                .await
                .map_err(err("count the volumes of a forgotten group"))?;
            if left != 0 {
                return Err(ReplicaError::CatalogCorrupt(format!(
                    "group {} still has {left} volumes that its forget does not name",
                    f.group
                )));
            }
            sqlx::query("DELETE FROM events WHERE group_name = ?")
                .bind(&f.group)
                .execute(&mut *conn)
                .await
                .map_err(err("delete the events of a forgotten group"))?;
            sqlx::query("DELETE FROM groups WHERE id = ?")
                .bind(f.group_id)
                .execute(&mut *conn)
                .await
                .map_err(err("delete a forgotten group"))?;
            sqlx::query("INSERT OR REPLACE INTO forgotten (kind, name, forgotten_ns) VALUES ('group', ?, ?)")
                .bind(&f.group)
                .bind(f.now_ns)
                .execute(&mut *conn)
                .await
                .map_err(err("record a forgotten group"))?;
        }
        for path in &f.files {
            sqlx::query("INSERT OR IGNORE INTO forget_files (path) VALUES (?)")
                .bind(path)
                .execute(&mut *conn)
                .await
                .map_err(err("record the files to forget"))?;
        }
        sqlx::query("INSERT INTO events (time_ns, level, group_name, volume, message) VALUES (?, 'info', NULL, NULL, ?)")
            .bind(f.now_ns)
            .bind(&f.message)
            .execute(&mut *conn)
            .await
            .map_err(err("record an event"))?;
        Ok(records)
    }
}
