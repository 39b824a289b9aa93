//! Readers' pins (see `pins`).

use cdp_shared::types::Seq;
use sqlx::Sqlite;

use super::{Catalog, WriteLock};
use crate::error::{ReplicaError, Result};

/// A reader's pin (see `pins`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinRow {
    pub id: i64,
    pub group_id: i64,
    pub volume_id: i64,
    pub seq: Seq,
    pub segment_min: Option<u64>,
    pub holder: String,
    pub pid: i64,
    pub pid_ns: Option<String>,
    pub created_ns: i64,
    pub expires_ns: i64,
    /// Bytes of the image the holder has read (restore), and of how many (None: a reader
    /// without an end).
    pub done_bytes: u64,
    pub total_bytes: Option<u64>,
}

type PinTuple = (
    i64,
    i64,
    i64,
    i64,
    Option<i64>,
    String,
    i64,
    Option<String>,
    i64,
    i64,
    i64,
    Option<i64>,
);
const PIN_COLUMNS: &str = "id, group_id, volume_id, seq, segment_min, holder, pid, pid_ns, created_ns, expires_ns, done_bytes, total_bytes";

fn pin_of(t: PinTuple) -> PinRow {
    PinRow {
        id: t.0,
        group_id: t.1,
        volume_id: t.2,
        seq: Seq(t.3 as u64),
        segment_min: t.4.map(|n| n as u64),
        holder: t.5,
        pid: t.6,
        pid_ns: t.7,
        created_ns: t.8,
        expires_ns: t.9,
        done_bytes: t.10.max(0) as u64,
        total_bytes: t.11.map(|n| n.max(0) as u64),
    }
}

/// A pin to record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewPin<'a> {
    pub group_id: i64,
    pub volume_id: i64,
    pub seq: Seq,
    pub segment_min: Option<u64>,
    pub holder: &'a str,
    pub pid: u32,
    pub pid_ns: Option<&'a str>,
    pub now_ns: i64,
    pub expires_ns: i64,
}

impl Catalog {
    /// Every pin of a group, oldest seq first.
    pub async fn pins_of_group(&self, group_id: i64) -> Result<Vec<PinRow>> {
        pins_of_group_on(&self.pool, group_id).await
    }

    /// Moves a pin's expiry; false when the pin is gone (the trimmer found it dead).
    pub async fn renew_pin(&self, id: i64, expires_ns: i64) -> Result<bool> {
        let n = sqlx::query("UPDATE pins SET expires_ns = ? WHERE id = ?")
            .bind(expires_ns)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(ReplicaError::catalog("renew a pin"))?
            .rows_affected();
        Ok(n == 1)
    }

    /// Records how far the pin's holder has read; false when the pin is gone.
    pub async fn pin_progress(&self, id: i64, done: u64, total: Option<u64>) -> Result<bool> {
        let n = sqlx::query("UPDATE pins SET done_bytes = ?, total_bytes = ? WHERE id = ?")
            .bind(i64::try_from(done).unwrap_or(i64::MAX))
            .bind(total.map(|t| i64::try_from(t).unwrap_or(i64::MAX)))
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(ReplicaError::catalog("record a reader's progress"))?
            .rows_affected();
        Ok(n == 1)
    }

    /// Counts one restore (`done`, `failed`) or export (`started`) of a volume.
    pub async fn count_reader(&self, volume_id: i64, kind: &str, outcome: &str) -> Result<()> {
        sqlx::query("INSERT INTO reader_totals (volume_id, kind, outcome, count) VALUES (?, ?, ?, 1) ON CONFLICT (volume_id, kind, outcome) DO UPDATE SET count = count + 1")
            .bind(volume_id)
            .bind(kind)
            .bind(outcome)
            .execute(&self.pool)
            .await
            .map_err(ReplicaError::catalog("count a restore or an export"))?;
        Ok(())
    }

    /// Every count of restores and exports: (group, volume, kind, outcome, count).
    pub async fn reader_totals(&self) -> Result<Vec<(String, String, String, String, u64)>> {
        let rows: Vec<(String, String, String, String, i64)> = sqlx::query_as(
            "SELECT g.name, v.name, t.kind, t.outcome, t.count FROM reader_totals t JOIN volumes v ON v.id = t.volume_id JOIN groups g ON g.id = v.group_id ORDER BY g.name, v.name, t.kind, t.outcome",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(ReplicaError::catalog("read the counts of restores and exports"))?;
        Ok(rows
            .into_iter()
            .map(|(g, v, k, o, n)| (g, v, k, o, n.max(0) as u64))
            .collect())
    }

    /// Removes a pin; false when it was already gone.
    pub async fn delete_pin(&self, id: i64) -> Result<bool> {
        let n = sqlx::query("DELETE FROM pins WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(ReplicaError::catalog("remove a pin"))?
            .rows_affected();
        Ok(n == 1)
    }
}

impl WriteLock {
    /// Every pin of the group, read inside the transaction.
    pub async fn pins_of_group(&mut self, group_id: i64) -> Result<Vec<PinRow>> {
        pins_of_group_on(self.conn()?, group_id).await
    }

    /// Records a pin; returns its id.
    pub async fn insert_pin(&mut self, pin: &NewPin<'_>) -> Result<i64> {
        sqlx::query_scalar("INSERT INTO pins (group_id, volume_id, seq, segment_min, holder, pid, pid_ns, created_ns, expires_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id")
            .bind(pin.group_id)
            .bind(pin.volume_id)
            .bind(pin.seq.0 as i64)
            .bind(pin.segment_min.map(|n| n as i64))
            .bind(pin.holder)
            .bind(i64::from(pin.pid))
            .bind(pin.pid_ns)
            .bind(pin.now_ns)
            .bind(pin.expires_ns)
            .fetch_one(self.conn()?)
            .await
            .map_err(ReplicaError::catalog("record a pin"))
    }

    /// Deletes a pin found dead, unless it was renewed since it was read (`expires_ns`).
    pub async fn delete_dead_pin(&mut self, pin: &PinRow) -> Result<()> {
        sqlx::query("DELETE FROM pins WHERE id = ? AND expires_ns = ?")
            .bind(pin.id)
            .bind(pin.expires_ns)
            .execute(self.conn()?)
            .await
            .map_err(ReplicaError::catalog("remove a dead pin"))?;
        Ok(())
    }
}

/// Every pin of a group, oldest seq first, on the pool or on one connection.
async fn pins_of_group_on<'e, E: sqlx::Executor<'e, Database = Sqlite>>(
    e: E,
    group_id: i64,
) -> Result<Vec<PinRow>> {
    let rows: Vec<PinTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {PIN_COLUMNS} FROM pins WHERE group_id = ? ORDER BY seq, id"
    )))
    .bind(group_id)
    .fetch_all(e)
    .await
    .map_err(ReplicaError::catalog("list pins"))?;
    Ok(rows.into_iter().map(pin_of).collect())
}
