//! Failovers (table `failovers`, see `failover`): the fence's row and the commit's transaction.

use cdp_shared::types::Seq;
use std::str::FromStr;

use sqlx::Sqlite;

use super::trim::{BaseMove, move_base_on};
use super::{Catalog, WriteLock};
use crate::clock::{rfc3339, time_of};
use crate::error::{ReplicaError, Result};

/// Where a failover stands (see `failover`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailoverState {
    /// Served (or servable) read-write; the journal after its point is kept; undoable.
    Active,
    /// `--commit` passed its point of no return and has not completed.
    Committing,
    /// The target holds the failover image; the points after it are gone.
    Committed,
}

impl FailoverState {
    pub fn as_str(self) -> &'static str {
        match self {
            FailoverState::Active => "active",
            FailoverState::Committing => "committing",
            FailoverState::Committed => "committed",
        }
    }
}

impl FromStr for FailoverState {
    type Err = ReplicaError;
    fn from_str(s: &str) -> Result<FailoverState> {
        match s {
            "active" => Ok(FailoverState::Active),
            "committing" => Ok(FailoverState::Committing),
            "committed" => Ok(FailoverState::Committed),
            other => Err(ReplicaError::CatalogCorrupt(format!(
                "unknown failover state {other:?}"
            ))),
        }
    }
}

/// A group's failover (table `failovers`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailoverRow {
    pub group_id: i64,
    pub seq: Seq,
    /// The lowest journal segment the image at `seq` may read.
    pub segment_min: Option<u64>,
    pub state: FailoverState,
    pub started_ns: i64,
    pub committed_ns: Option<i64>,
}

type FailoverTuple = (i64, i64, Option<i64>, String, i64, Option<i64>);
const FAILOVER_COLUMNS: &str = "group_id, seq, segment_min, state, started_ns, committed_ns";

fn failover_of(t: FailoverTuple) -> Result<FailoverRow> {
    Ok(FailoverRow {
        group_id: t.0,
        seq: Seq(t.1 as u64),
        segment_min: t.2.map(|n| n as u64),
        state: t.3.parse()?,
        started_ns: t.4,
        committed_ns: t.5,
    })
}

impl FailoverRow {
    /// The sentence with which `serve` refuses the failed-over group `group` to its agent.
    pub fn refusal(&self, group: &str) -> String {
        let f = self;
        match f.state {
            FailoverState::Active => format!(
                "group {group} is failed over on the replica at seq {} since {}: its protection resumes after `cdp-replica failover --group {group} --undo` on the replica (this agent keeps spooling it until then; its other groups replicate as usual)",
                f.seq,
                rfc3339(&time_of(f.started_ns))
            ),
            FailoverState::Committing | FailoverState::Committed => format!(
                "group {group} was failed over on the replica at seq {} and that failover was committed{}: this agent's devices are no longer the group's history, and failback is not built yet, so group {group} stays refused",
                f.seq,
                f.committed_ns
                    .map(|ns| format!(" on {}", rfc3339(&time_of(ns))))
                    .unwrap_or_default()
            ),
        }
    }
}

/// What a failover commit's transaction did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FailoverCommitDone {
    /// Batch rows deleted (the points after the failover point, and the journaled ones
    /// before it).
    pub batches: u64,
    pub records: u64,
}

impl Catalog {
    // ---- failovers ----

    /// The group's failover row, if any.
    pub async fn failover(&self, group_id: i64) -> Result<Option<FailoverRow>> {
        failover_on(&self.pool, group_id).await
    }

    /// Every failover row.
    pub async fn failovers(&self) -> Result<Vec<FailoverRow>> {
        let rows: Vec<FailoverTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {FAILOVER_COLUMNS} FROM failovers ORDER BY group_id"
        )))
        .fetch_all(&self.pool)
        .await
        .map_err(ReplicaError::catalog("list failovers"))?;
        rows.into_iter().map(failover_of).collect()
    }

    /// Deletes the group's failover row if it is `active` (`failover --undo`); false when
    /// there was none in that state.
    pub async fn delete_active_failover(&self, group_id: i64) -> Result<bool> {
        let n = sqlx::query("DELETE FROM failovers WHERE group_id = ? AND state = 'active'")
            .bind(group_id)
            .execute(&self.pool)
            .await
            .map_err(ReplicaError::catalog("remove a failover"))?
            .rows_affected();
        Ok(n == 1)
    }

    /// The transaction of a failover commit (see `failover`), in ONE transaction: the group's
    /// batch rows and bookmarks after `seq` and its record rows are deleted, batch `seq` is
    /// kept but no longer journaled (like a trim's base batch) and every batch before it is
    /// deleted; head = base = `seq` (with batch `seq`'s hash), `trimming_to` cleared, the end
    /// of the last journaled batch up to `seq` remembered as the journal's committed end, and
    /// the failover row marked `committed`. Does nothing (`None`) unless the row is
    /// `committing` at `seq`.
    pub async fn finish_failover_commit(
        &self,
        group_id: i64,
        seq: Seq,
        now_ns: i64,
    ) -> Result<Option<FailoverCommitDone>> {
        let mut lock = self.write_lock().await?;
        let done = lock.finish_failover_commit(group_id, seq, now_ns).await?;
        lock.commit().await?;
        Ok(done)
    }
}

impl WriteLock {
    /// The group's failover row, read inside the transaction.
    pub async fn failover(&mut self, group_id: i64) -> Result<Option<FailoverRow>> {
        failover_on(self.conn()?, group_id).await
    }

    /// Records a group's failover (state `active`).
    pub async fn insert_failover(&mut self, f: &FailoverRow) -> Result<()> {
        sqlx::query("INSERT INTO failovers (group_id, seq, segment_min, state, started_ns, committed_ns) VALUES (?, ?, ?, ?, ?, ?)")
            .bind(f.group_id)
            .bind(f.seq.0 as i64)
            .bind(f.segment_min.map(|n| n as i64))
            .bind(f.state.as_str())
            .bind(f.started_ns)
            .bind(f.committed_ns)
            .execute(self.conn()?)
            .await
            .map_err(ReplicaError::catalog("record a failover"))?;
        Ok(())
    }

    /// Sets the state of the group's failover row.
    pub async fn set_failover_state(&mut self, group_id: i64, state: FailoverState) -> Result<()> {
        sqlx::query("UPDATE failovers SET state = ? WHERE group_id = ?")
            .bind(state.as_str())
            .bind(group_id)
            .execute(self.conn()?)
            .await
            .map_err(ReplicaError::catalog("change a failover's state"))?;
        Ok(())
    }

    /// See [`Catalog::finish_failover_commit`].
    async fn finish_failover_commit(
        &mut self,
        group_id: i64,
        seq: Seq,
        now_ns: i64,
    ) -> Result<Option<FailoverCommitDone>> {
        let err = ReplicaError::catalog;
        match self.failover(group_id).await? {
            Some(f) if f.state == FailoverState::Committing && f.seq == seq => {}
            _ => return Ok(None),
        }
        let g = self.group(group_id).await?;
        let conn = self.conn()?;
        let s = seq.0 as i64;
        let head_hash: Vec<u8> =
            sqlx::query_scalar("SELECT header_hash FROM batches WHERE group_id = ? AND seq = ?")
                .bind(group_id)
                .bind(s)
                .fetch_one(&mut *conn)
                .await
                .map_err(err("read the failover point's batch"))?;
        let end: Option<(i64, i64)> = sqlx::query_as(
            "SELECT segment, position + length FROM batches WHERE group_id = ? AND seq <= ? AND segment IS NOT NULL ORDER BY seq DESC LIMIT 1",
        )
        .bind(group_id)
        .bind(s)
        .fetch_optional(&mut *conn)
        .await
        .map_err(err("find the end of the journal at the failover point"))?;
        let (records, batches) = move_base_on(
            &mut *conn,
            &g,
            seq,
            end,
            BaseMove::FailoverCommit { head_hash },
        )
        .await?;
        sqlx::query(
            "UPDATE failovers SET state = 'committed', committed_ns = ? WHERE group_id = ?",
        )
        .bind(now_ns)
        .bind(group_id)
        .execute(&mut *conn)
        .await
        .map_err(err("mark the failover committed"))?;
        Ok(Some(FailoverCommitDone { batches, records }))
    }
}

pub(super) async fn failover_on<'e, E: sqlx::Executor<'e, Database = Sqlite>>(
    e: E,
    group_id: i64,
) -> Result<Option<FailoverRow>> {
    let row: Option<FailoverTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {FAILOVER_COLUMNS} FROM failovers WHERE group_id = ?"
    )))
    .bind(group_id)
    .fetch_optional(e)
    .await
    .map_err(ReplicaError::catalog("read a failover"))?;
    row.map(failover_of).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_sentences_name_the_volume_and_the_remedy() {
        let mut f = FailoverRow {
            group_id: 1,
            seq: Seq(123),
            segment_min: None,
            state: FailoverState::Active,
            started_ns: 1_700_000_000_000_000_000,
            committed_ns: None,
        };
        let r = f.refusal("g");
        assert!(
            r.starts_with(
                "group g is failed over on the replica at seq 123 since 2023-11-14T22:13:20"
            ),
            "{r}"
        );
        assert!(r.contains("failover --group g --undo"), "{r}");
        f.state = FailoverState::Committed;
        f.committed_ns = Some(f.started_ns);
        let r = f.refusal("g");
        assert!(r.contains("committed on 2023-11-14T22:13:20"), "{r}");
        assert!(r.contains("failback is not built yet"), "{r}");
    }
}
