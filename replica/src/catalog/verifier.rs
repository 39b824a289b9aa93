//! The verifier's tables (migrations/0004_verifier.sql): check results, mismatches, the
//! sweep's position, verify runs and repair requests.

use super::Catalog;
use crate::error::{ReplicaError, Result};
use cdp_shared::types::Seq;

/// Outcome of one chunk check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VerifyOutcome {
    Match,
    Mismatch,
    /// The agent refused (the chunk is being synced or resynced), or the point was not
    /// readable: retried later.
    Skipped,
    /// The agent, or the journal, did not get there in time.
    Timeout,
}

/// The period of a volume's verification coverage: the share of its chunks compared in it.
pub const COVERAGE_PERIOD: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

impl VerifyOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            VerifyOutcome::Match => "match",
            VerifyOutcome::Mismatch => "mismatch",
            VerifyOutcome::Skipped => "skipped",
            VerifyOutcome::Timeout => "timeout",
        }
    }
}

/// One row of `verify_results` to insert.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewVerifyResult {
    pub time_ns: i64,
    pub volume_id: i64,
    pub chunk: u64,
    pub seq: Option<Seq>,
    pub agent_hash: Option<String>,
    pub replica_hash: Option<String>,
    pub outcome: VerifyOutcome,
    pub reason: Option<String>,
    pub duration_us: u64,
    pub run_id: Option<i64>,
}

/// A row of `verify_mismatches`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MismatchRow {
    pub id: i64,
    pub volume_id: i64,
    pub chunk: u64,
    pub seq: Seq,
    pub found_ns: i64,
    pub reason: String,
    pub agent_hash: String,
    pub replica_hash: Option<String>,
    pub repaired_ns: Option<i64>,
    pub repaired_seq: Option<Seq>,
}

type MismatchTuple = (
    i64,
    i64,
    i64,
    i64,
    i64,
    String,
    String,
    Option<String>,
    Option<i64>,
    Option<i64>,
);

const MISMATCH_COLUMNS: &str = "id, volume_id, chunk, seq, found_ns, reason, agent_hash, replica_hash, repaired_ns, repaired_seq";

fn mismatch_of(t: MismatchTuple) -> MismatchRow {
    MismatchRow {
        id: t.0,
        volume_id: t.1,
        chunk: t.2 as u64,
        seq: Seq(t.3 as u64),
        found_ns: t.4,
        reason: t.5,
        agent_hash: t.6,
        replica_hash: t.7,
        repaired_ns: t.8,
        repaired_seq: t.9.map(|s| Seq(s as u64)),
    }
}

/// A row of `verify_runs`.
#[derive(Clone, Debug, PartialEq)]
pub struct RunRow {
    pub id: i64,
    pub volume_id: i64,
    pub full: bool,
    pub rate_per_sec: Option<f64>,
    pub state: String,
    pub requested_ns: i64,
    pub started_ns: Option<i64>,
    pub ended_ns: Option<i64>,
    pub chunks_total: u64,
    pub chunks_done: u64,
    pub mismatches: u64,
    pub skipped: u64,
    pub error: Option<String>,
}

type RunTuple = (
    i64,
    i64,
    i64,
    Option<f64>,
    String,
    i64,
    Option<i64>,
    Option<i64>,
    i64,
    i64,
    i64,
    i64,
    Option<String>,
);

const RUN_COLUMNS: &str = "id, volume_id, full, rate_per_sec, state, requested_ns, started_ns, ended_ns, chunks_total, chunks_done, mismatches, skipped, error";

fn run_of(t: RunTuple) -> RunRow {
    RunRow {
        id: t.0,
        volume_id: t.1,
        full: t.2 != 0,
        rate_per_sec: t.3,
        state: t.4,
        requested_ns: t.5,
        started_ns: t.6,
        ended_ns: t.7,
        chunks_total: t.8 as u64,
        chunks_done: t.9 as u64,
        mismatches: t.10 as u64,
        skipped: t.11 as u64,
        error: t.12,
    }
}

/// A row of `repair_requests`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepairRow {
    pub id: i64,
    pub volume_id: i64,
    pub state: String,
    pub requested_ns: i64,
    pub ended_ns: Option<i64>,
    pub message: Option<String>,
    /// When serve took it (None while requested).
    pub started_ns: Option<i64>,
    /// `asking`, `resending` or `checking` while running (see the migration).
    pub phase: Option<String>,
    /// Chunks checked again, of the chunks to repair.
    pub chunks_done: u64,
    pub chunks_total: u64,
}

type RepairTuple = (
    i64,
    i64,
    String,
    i64,
    Option<i64>,
    Option<String>,
    Option<i64>,
    Option<String>,
    i64,
    i64,
);
const REPAIR_COLUMNS: &str = "id, volume_id, state, requested_ns, ended_ns, message, started_ns, phase, chunks_done, chunks_total";

fn repair_of(t: RepairTuple) -> RepairRow {
    RepairRow {
        id: t.0,
        volume_id: t.1,
        state: t.2,
        requested_ns: t.3,
        ended_ns: t.4,
        message: t.5,
        started_ns: t.6,
        phase: t.7,
        chunks_done: t.8.max(0) as u64,
        chunks_total: t.9.max(0) as u64,
    }
}

/// Counts of a volume's checks in a period (`verify report`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerifyCounts {
    /// Every check recorded.
    pub checks: u64,
    /// Distinct chunks checked (any outcome).
    pub chunks: u64,
    pub matches: u64,
    pub mismatches: u64,
    pub skipped: u64,
    pub timeouts: u64,
    /// The newest check's time.
    pub last_ns: Option<i64>,
}

impl Catalog {
    /// Records one check.
    pub async fn insert_verify_result(&self, r: &NewVerifyResult) -> Result<()> {
        sqlx::query(
            "INSERT INTO verify_results (time_ns, volume_id, chunk, seq, agent_hash, replica_hash, outcome, reason, duration_us, run_id) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(r.time_ns)
        .bind(r.volume_id)
        .bind(r.chunk as i64)
        .bind(r.seq.map(|s| s.0 as i64))
        .bind(r.agent_hash.as_deref())
        .bind(r.replica_hash.as_deref())
        .bind(r.outcome.as_str())
        .bind(r.reason.as_deref())
        .bind(i64::try_from(r.duration_us).unwrap_or(i64::MAX))
        .bind(r.run_id)
        .execute(&self.pool)
        .await
        .map_err(ReplicaError::catalog("record a verification result"))?;
        Ok(())
    }

    /// Deletes results older than `before_ns`, and those of each volume beyond its newest
    /// `keep_per_volume` (by time). Every statement is one range of the `(volume_id, time_ns)`
    /// index. Returns the rows deleted.
    pub async fn prune_verify_results(&self, before_ns: i64, keep_per_volume: u64) -> Result<u64> {
        let volumes: Vec<i64> = sqlx::query_scalar("SELECT id FROM volumes")
            .fetch_all(&self.pool)
            .await
            .map_err(ReplicaError::catalog("prune verification results"))?;
        let keep = i64::try_from(keep_per_volume).unwrap_or(i64::MAX);
        let mut n = 0;
        for v in volumes {
            n += sqlx::query("DELETE FROM verify_results WHERE volume_id = ? AND time_ns < ?")
                .bind(v)
                .bind(before_ns)
                .execute(&self.pool)
                .await
                .map_err(ReplicaError::catalog("prune verification results"))?
                .rows_affected();
            let count: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM verify_results WHERE volume_id = ?")
                    .bind(v)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(ReplicaError::catalog("prune verification results"))?;
            if count <= keep {
                continue;
            }
            n += sqlx::query(
                "DELETE FROM verify_results WHERE volume_id = ? AND time_ns <= \
                 (SELECT time_ns FROM verify_results WHERE volume_id = ? ORDER BY time_ns DESC LIMIT 1 OFFSET ?)",
            )
            .bind(v)
            .bind(v)
            .bind(keep)
            .execute(&self.pool)
            .await
            .map_err(ReplicaError::catalog("prune verification results"))?
            .rows_affected();
        }
        Ok(n)
    }

    /// Counts of a volume's checks with time ≥ `since_ns`.
    pub async fn verify_counts(&self, volume_id: i64, since_ns: i64) -> Result<VerifyCounts> {
        let row: (i64, i64, i64, i64, i64, i64, Option<i64>) = sqlx::query_as(
            "SELECT COUNT(*), COUNT(DISTINCT chunk), \
             COALESCE(SUM(outcome = 'match'), 0), COALESCE(SUM(outcome = 'mismatch'), 0), \
             COALESCE(SUM(outcome = 'skipped'), 0), COALESCE(SUM(outcome = 'timeout'), 0), MAX(time_ns) \
             FROM verify_results WHERE volume_id = ? AND time_ns >= ?",
        )
        .bind(volume_id)
        .bind(since_ns)
        .fetch_one(&self.pool)
        .await
        .map_err(ReplicaError::catalog("count verification results"))?;
        Ok(VerifyCounts {
            checks: row.0 as u64,
            chunks: row.1 as u64,
            matches: row.2 as u64,
            mismatches: row.3 as u64,
            skipped: row.4 as u64,
            timeouts: row.5 as u64,
            last_ns: row.6,
        })
    }

    /// Distinct chunks of a volume compared (outcome match or mismatch) since `since_ns`.
    pub async fn chunks_compared_since(&self, volume_id: i64, since_ns: i64) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(DISTINCT chunk) FROM verify_results \
             WHERE volume_id = ? AND time_ns >= ? AND outcome IN ('match', 'mismatch')",
        )
        .bind(volume_id)
        .bind(since_ns)
        .fetch_one(&self.pool)
        .await
        .map_err(ReplicaError::catalog("count verified chunks"))?;
        Ok(n as u64)
    }

    /// Records a mismatch, unless the chunk already has an open one. Returns whether it is new.
    pub async fn insert_mismatch(&self, m: &MismatchRow) -> Result<bool> {
        // One statement (a read-then-write transaction could not upgrade its lock while
        // ingest writes).
        let n = sqlx::query(
            "INSERT INTO verify_mismatches (volume_id, chunk, seq, found_ns, reason, agent_hash, replica_hash) \
             SELECT ?, ?, ?, ?, ?, ?, ? WHERE NOT EXISTS \
             (SELECT 1 FROM verify_mismatches WHERE volume_id = ? AND chunk = ? AND repaired_ns IS NULL)",
        )
        .bind(m.volume_id)
        .bind(m.chunk as i64)
        .bind(m.seq.0 as i64)
        .bind(m.found_ns)
        .bind(&m.reason)
        .bind(&m.agent_hash)
        .bind(m.replica_hash.as_deref())
        .bind(m.volume_id)
        .bind(m.chunk as i64)
        .execute(&self.pool)
        .await
        .map_err(ReplicaError::catalog("record a mismatch"))?
        .rows_affected();
        Ok(n == 1)
    }

    /// The open mismatches of a volume, by chunk.
    pub async fn open_mismatches(&self, volume_id: i64) -> Result<Vec<MismatchRow>> {
        let rows: Vec<MismatchTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {MISMATCH_COLUMNS} FROM verify_mismatches WHERE volume_id = ? AND repaired_ns IS NULL ORDER BY chunk"
        )))
        .bind(volume_id)
        .fetch_all(&self.pool)
        .await
        .map_err(ReplicaError::catalog("read mismatches"))?;
        Ok(rows.into_iter().map(mismatch_of).collect())
    }

    /// The mismatches of a volume found since `since_ns` or still open, oldest first.
    pub async fn mismatches_for_report(
        &self,
        volume_id: i64,
        since_ns: i64,
    ) -> Result<Vec<MismatchRow>> {
        let rows: Vec<MismatchTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {MISMATCH_COLUMNS} FROM verify_mismatches WHERE volume_id = ? AND (found_ns >= ? OR repaired_ns IS NULL) ORDER BY found_ns, id"
        )))
        .bind(volume_id)
        .bind(since_ns)
        .fetch_all(&self.pool)
        .await
        .map_err(ReplicaError::catalog("read mismatches"))?;
        Ok(rows.into_iter().map(mismatch_of).collect())
    }

    /// Marks a mismatch repaired: the chunk is right again from `seq` on.
    pub async fn mark_repaired(&self, id: i64, now_ns: i64, seq: Seq) -> Result<()> {
        sqlx::query("UPDATE verify_mismatches SET repaired_ns = ?, repaired_seq = ? WHERE id = ? AND repaired_ns IS NULL")
            .bind(now_ns)
            .bind(seq.0 as i64)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(ReplicaError::catalog("mark a mismatch repaired"))?;
        Ok(())
    }

    /// The sweep's next chunk of a volume (0 when it has not started).
    pub async fn sweep_next(&self, volume_id: i64) -> Result<u64> {
        let n: Option<i64> =
            sqlx::query_scalar("SELECT next_chunk FROM verify_sweep WHERE volume_id = ?")
                .bind(volume_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(ReplicaError::catalog("read the verifier's sweep"))?;
        Ok(n.unwrap_or(0) as u64)
    }

    pub async fn set_sweep_next(&self, volume_id: i64, next_chunk: u64) -> Result<()> {
        sqlx::query("INSERT INTO verify_sweep (volume_id, next_chunk) VALUES (?, ?) ON CONFLICT (volume_id) DO UPDATE SET next_chunk = excluded.next_chunk")
            .bind(volume_id)
            .bind(next_chunk as i64)
            .execute(&self.pool)
            .await
            .map_err(ReplicaError::catalog("save the verifier's sweep"))?;
        Ok(())
    }

    /// The newest seq in `(after, upto]` of a record of `chunk` of a volume.
    pub async fn last_write_of_chunk(
        &self,
        volume_id: i64,
        chunk: u64,
        after: Seq,
        upto: Seq,
    ) -> Result<Option<Seq>> {
        let n: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(seq) FROM records WHERE volume_id = ? AND chunk = ? AND seq > ? AND seq <= ?",
        )
        .bind(volume_id)
        .bind(chunk as i64)
        .bind(after.0 as i64)
        .bind(upto.0 as i64)
        .fetch_one(&self.pool)
        .await
        .map_err(ReplicaError::catalog("read the journal index"))?;
        Ok(n.map(|s| Seq(s as u64)))
    }

    // ---- verify runs ----

    /// Asks the running serve for a run; returns its id.
    pub async fn insert_verify_run(
        &self,
        volume_id: i64,
        full: bool,
        rate_per_sec: Option<f64>,
        chunks_total: u64,
        now_ns: i64,
    ) -> Result<i64> {
        sqlx::query_scalar("INSERT INTO verify_runs (volume_id, full, rate_per_sec, state, requested_ns, chunks_total) VALUES (?, ?, ?, 'requested', ?, ?) RETURNING id")
            .bind(volume_id)
            .bind(i64::from(full))
            .bind(rate_per_sec)
            .bind(now_ns)
            .bind(chunks_total as i64)
            .fetch_one(&self.pool)
            .await
            .map_err(ReplicaError::catalog("request a verification run"))
    }

    pub async fn verify_run(&self, id: i64) -> Result<Option<RunRow>> {
        let row: Option<RunTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {RUN_COLUMNS} FROM verify_runs WHERE id = ?"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(ReplicaError::catalog("read a verification run"))?;
        Ok(row.map(run_of))
    }

    /// Runs in `state`, oldest first.
    pub async fn verify_runs_in_state(&self, state: &str) -> Result<Vec<RunRow>> {
        let rows: Vec<RunTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {RUN_COLUMNS} FROM verify_runs WHERE state = ? ORDER BY id"
        )))
        .bind(state)
        .fetch_all(&self.pool)
        .await
        .map_err(ReplicaError::catalog("read verification runs"))?;
        Ok(rows.into_iter().map(run_of).collect())
    }

    /// The runs of a volume requested since `since_ns`, newest first (at most `limit`).
    pub async fn verify_runs_of_volume(
        &self,
        volume_id: i64,
        since_ns: i64,
        limit: u32,
    ) -> Result<Vec<RunRow>> {
        let rows: Vec<RunTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {RUN_COLUMNS} FROM verify_runs WHERE volume_id = ? AND requested_ns >= ? ORDER BY id DESC LIMIT ?"
        )))
        .bind(volume_id)
        .bind(since_ns)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(ReplicaError::catalog("read verification runs"))?;
        Ok(rows.into_iter().map(run_of).collect())
    }

    /// When the volume's last full run that completed ended.
    pub async fn last_full_pass(&self, volume_id: i64) -> Result<Option<i64>> {
        sqlx::query_scalar(
            "SELECT MAX(ended_ns) FROM verify_runs WHERE volume_id = ? AND full = 1 AND state = 'done'",
        )
        .bind(volume_id)
        .fetch_one(&self.pool)
        .await
        .map_err(ReplicaError::catalog("read verification runs"))
    }

    /// A requested run becomes running (with its real chunk count); false when it is no
    /// longer requested (its command ended it first: `verify run --timeout`).
    pub async fn start_verify_run(&self, id: i64, chunks_total: u64, now_ns: i64) -> Result<bool> {
        let started = sqlx::query("UPDATE verify_runs SET state = 'running', started_ns = ?, chunks_total = ? WHERE id = ? AND state = 'requested'")
            .bind(now_ns)
            .bind(chunks_total as i64)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(ReplicaError::catalog("start a verification run"))?;
        Ok(started.rows_affected() == 1)
    }

    /// Records a running run's progress; false when the run is no longer `running` (ended by
    /// its command: `verify run --timeout`).
    pub async fn verify_run_progress(
        &self,
        id: i64,
        chunks_done: u64,
        mismatches: u64,
        skipped: u64,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE verify_runs SET chunks_done = ?, mismatches = ?, skipped = ? WHERE id = ? AND state = 'running'",
        )
        .bind(chunks_done as i64)
        .bind(mismatches as i64)
        .bind(skipped as i64)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(ReplicaError::catalog("record a run's progress"))?;
        Ok(done.rows_affected() == 1)
    }

    /// Ends a run: `done`, or `failed` with `error`.
    pub async fn finish_verify_run(&self, id: i64, error: Option<&str>, now_ns: i64) -> Result<()> {
        sqlx::query("UPDATE verify_runs SET state = ?, error = ?, ended_ns = ? WHERE id = ? AND state IN ('requested', 'running')")
            .bind(if error.is_some() { "failed" } else { "done" })
            .bind(error)
            .bind(now_ns)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(ReplicaError::catalog("finish a verification run"))?;
        Ok(())
    }

    /// At serve's start: runs and repairs a previous serve left running failed with `why`.
    pub async fn fail_unfinished_verifier_work(&self, why: &str, now_ns: i64) -> Result<()> {
        sqlx::query("UPDATE verify_runs SET state = 'failed', error = ?, ended_ns = ? WHERE state = 'running'")
            .bind(why)
            .bind(now_ns)
            .execute(&self.pool)
            .await
            .map_err(ReplicaError::catalog("fail unfinished runs"))?;
        sqlx::query("UPDATE repair_requests SET state = 'failed', message = ?, ended_ns = ? WHERE state = 'running'")
            .bind(why)
            .bind(now_ns)
            .execute(&self.pool)
            .await
            .map_err(ReplicaError::catalog("fail unfinished repairs"))?;
        Ok(())
    }

    // ---- repair requests ----

    pub async fn insert_repair_request(&self, volume_id: i64, now_ns: i64) -> Result<i64> {
        sqlx::query_scalar("INSERT INTO repair_requests (volume_id, state, requested_ns) VALUES (?, 'requested', ?) RETURNING id")
            .bind(volume_id)
            .bind(now_ns)
            .fetch_one(&self.pool)
            .await
            .map_err(ReplicaError::catalog("request a repair"))
    }

    pub async fn repair_request(&self, id: i64) -> Result<Option<RepairRow>> {
        let row: Option<RepairTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {REPAIR_COLUMNS} FROM repair_requests WHERE id = ?"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(ReplicaError::catalog("read a repair request"))?;
        Ok(row.map(repair_of))
    }

    /// Repair requests in `state`, oldest first.
    pub async fn repair_requests_in_state(&self, state: &str) -> Result<Vec<RepairRow>> {
        let rows: Vec<RepairTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {REPAIR_COLUMNS} FROM repair_requests WHERE state = ? ORDER BY id"
        )))
        .bind(state)
        .fetch_all(&self.pool)
        .await
        .map_err(ReplicaError::catalog("read repair requests"))?;
        Ok(rows.into_iter().map(repair_of).collect())
    }

    /// Moves a repair request to `state` (`running`, `done`, `failed`) with `message`.
    pub async fn set_repair_state(
        &self,
        id: i64,
        state: &str,
        message: Option<&str>,
        now_ns: i64,
    ) -> Result<()> {
        let ended = (state != "running").then_some(now_ns);
        let started = (state == "running").then_some(now_ns);
        sqlx::query("UPDATE repair_requests SET state = ?, message = ?, ended_ns = ?, started_ns = COALESCE(?, started_ns) WHERE id = ?")
            .bind(state)
            .bind(message)
            .bind(ended)
            .bind(started)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(ReplicaError::catalog("update a repair request"))?;
        Ok(())
    }

    /// Records a running repair's phase and the chunks checked again of how many.
    pub async fn set_repair_progress(
        &self,
        id: i64,
        phase: &str,
        chunks_done: u64,
        chunks_total: u64,
    ) -> Result<()> {
        sqlx::query("UPDATE repair_requests SET phase = ?, chunks_done = ?, chunks_total = ? WHERE id = ? AND state = 'running'")
            .bind(phase)
            .bind(i64::try_from(chunks_done).unwrap_or(i64::MAX))
            .bind(i64::try_from(chunks_total).unwrap_or(i64::MAX))
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(ReplicaError::catalog("record a repair's progress"))?;
        Ok(())
    }

    /// Whether a repair of the volume is requested or running.
    pub async fn repair_pending(&self, volume_id: i64) -> Result<bool> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM repair_requests WHERE volume_id = ? AND state IN ('requested', 'running')")
            .bind(volume_id)
            .fetch_one(&self.pool)
            .await
            .map_err(ReplicaError::catalog("read repair requests"))?;
        Ok(n > 0)
    }
}
