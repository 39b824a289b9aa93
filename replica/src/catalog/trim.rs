//! The trimmer's reads and its intent, and step (d) of the trim protocol (see `trimmer`).

use cdp_shared::types::Seq;
use sqlx::Sqlite;

use super::journal_index::PointReads;
use super::{Catalog, GroupRow, WriteLock};
use crate::error::{ReplicaError, Result};
use crate::retention::BatchWeight;

/// What step (d) of a trim did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrimDone {
    /// Journal bytes of the batches trimmed (no longer counted in `journal_bytes`).
    pub journal_bytes: u64,
    pub batches: u64,
    pub records: u64,
}

impl Catalog {
    /// The first batch with seq in `(after, upto]` whose agent time is at or after
    /// `cutoff_ns` (the trimmer's window test).
    pub async fn first_batch_since(
        &self,
        group_id: i64,
        after: Seq,
        upto: Seq,
        cutoff_ns: i64,
    ) -> Result<Option<Seq>> {
        first_batch_since_on(&self.pool, group_id, after, upto, cutoff_ns).await
    }

    /// The first `limit` batches after `after`, in seq order, as the trimmer weighs them.
    pub async fn batch_weights(
        &self,
        group_id: i64,
        after: Seq,
        limit: u64,
    ) -> Result<Vec<BatchWeight>> {
        batch_weights_on(&self.pool, group_id, after, limit).await
    }

    /// The lowest segment holding a journaled batch with seq in `(after, upto]`.
    pub async fn first_segment(&self, group_id: i64, after: Seq, upto: Seq) -> Result<Option<u64>> {
        first_segment_on(&self.pool, group_id, after, upto).await
    }

    /// Step (d) of the trim protocol, in ONE transaction: the records of the group's volumes
    /// with seq ≤ `to`, its batch rows and bookmarks with seq < `to` are deleted, batch `to`
    /// is kept but no longer counted as journaled, the end of the last trimmed journaled batch
    /// is remembered, the base moves to `to` and the intent is cleared. Does nothing (and
    /// returns `None`) unless the group's intent is `to`.
    pub async fn finish_trim(&self, group_id: i64, to: Seq) -> Result<Option<TrimDone>> {
        let mut lock = self.write_lock().await?;
        let done = lock.finish_trim(group_id, to).await?;
        lock.commit().await?;
        Ok(done)
    }
}

impl WriteLock {
    pub async fn first_batch_since(
        &mut self,
        group_id: i64,
        after: Seq,
        upto: Seq,
        cutoff_ns: i64,
    ) -> Result<Option<Seq>> {
        first_batch_since_on(self.conn()?, group_id, after, upto, cutoff_ns).await
    }

    pub async fn batch_weights(
        &mut self,
        group_id: i64,
        after: Seq,
        limit: u64,
    ) -> Result<Vec<BatchWeight>> {
        batch_weights_on(self.conn()?, group_id, after, limit).await
    }

    pub async fn first_segment(
        &mut self,
        group_id: i64,
        after: Seq,
        upto: Seq,
    ) -> Result<Option<u64>> {
        first_segment_on(self.conn()?, group_id, after, upto).await
    }

    /// Step (a) of the trim protocol: records the intent to move the base to `to`.
    pub async fn set_trimming_to(&mut self, group_id: i64, to: Seq) -> Result<()> {
        sqlx::query("UPDATE groups SET trimming_to = ? WHERE id = ?")
            .bind(to.0 as i64)
            .bind(group_id)
            .execute(self.conn()?)
            .await
            .map_err(ReplicaError::catalog("record the trimmer's intent"))?;
        Ok(())
    }

    /// See [`Catalog::finish_trim`].
    async fn finish_trim(&mut self, group_id: i64, to: Seq) -> Result<Option<TrimDone>> {
        let err = ReplicaError::catalog;
        let g = self.group(group_id).await?;
        if g.trimming_to != Some(to) {
            return Ok(None);
        }
        let conn = self.conn()?;
        let base = g.base_seq.0 as i64;
        let to_i = to.0 as i64;
        let (journal_bytes, batches): (Option<i64>, i64) = sqlx::query_as(
            "SELECT SUM(length), COUNT(*) FROM batches WHERE group_id = ? AND seq > ? AND seq <= ?",
        )
        .bind(group_id)
        .bind(base)
        .bind(to_i)
        .fetch_one(&mut *conn)
        .await
        .map_err(err("weigh the trimmed batches"))?;
        let end: Option<(i64, i64)> = sqlx::query_as(
            "SELECT segment, position + length FROM batches WHERE group_id = ? AND seq > ? AND seq <= ? AND segment IS NOT NULL ORDER BY seq DESC LIMIT 1",
        )
        .bind(group_id)
        .bind(base)
        .bind(to_i)
        .fetch_optional(&mut *conn)
        .await
        .map_err(err("find the end of the trimmed journal"))?;
        let (records, _) = move_base_on(&mut *conn, &g, to, end, BaseMove::Trim).await?;
        Ok(Some(TrimDone {
            journal_bytes: journal_bytes.unwrap_or(0) as u64,
            batches: batches as u64,
            records,
        }))
    }
}

/// The reads from which the trimmer chooses its next base ([`crate::trimmer`]), inside its
/// transaction ([`WriteLock`]) or on the pool ([`Catalog`]: `retention` reckoning what a change
/// would drop).
pub(crate) trait TrimReads: PointReads {
    /// See [`Catalog::first_batch_since`].
    async fn first_batch_since(
        &mut self,
        group_id: i64,
        after: Seq,
        upto: Seq,
        cutoff_ns: i64,
    ) -> Result<Option<Seq>> {
        first_batch_since_on(self.executor()?, group_id, after, upto, cutoff_ns).await
    }
    /// See [`Catalog::batch_weights`].
    async fn batch_weights(
        &mut self,
        group_id: i64,
        after: Seq,
        limit: u64,
    ) -> Result<Vec<BatchWeight>> {
        batch_weights_on(self.executor()?, group_id, after, limit).await
    }
    /// Journal bytes of the group's batches after seq `after`.
    async fn journal_bytes_after(&mut self, group_id: i64, after: Seq) -> Result<u64> {
        journal_bytes_after_on(self.executor()?, group_id, after).await
    }
}

impl TrimReads for Catalog {}

impl TrimReads for WriteLock {}

/// Why a group's base moves ([`move_base_on`]): which of its rows go, and what a statement
/// that fails says.
pub(super) enum BaseMove {
    /// Step (d) of a trim: the records up to the new base, the batches and bookmarks before it.
    Trim,
    /// A failover commit: every record, every batch and bookmark but the new base's; the head
    /// moves back to the base, whose batch's hash is `head_hash`.
    FailoverCommit { head_hash: Vec<u8> },
}

/// What step (d) of a trim and a failover commit both do, on the write lock's connection:
/// deletes the rows of group `g` that `how` says, keeps batch `base` but no longer counted as
/// journaled, moves the base to `base`, clears the intent (`trimming_to`) and remembers the
/// journal's committed end: `end` (where the last journaled batch no longer kept ended) or
/// else the end remembered so far. Returns (records deleted, batches deleted).
pub(super) async fn move_base_on(
    conn: &mut sqlx::SqliteConnection,
    g: &GroupRow,
    base: Seq,
    end: Option<(i64, i64)>,
    how: BaseMove,
) -> Result<(u64, u64)> {
    let err = ReplicaError::catalog;
    let trim = matches!(how, BaseMove::Trim);
    let says = |trim_says: &'static str, failover_says: &'static str| {
        if trim { trim_says } else { failover_says }
    };
    let group_id = g.id;
    let b = base.0 as i64;
    let mut records = 0u64;
    let volume_ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM volumes WHERE group_id = ?")
        .bind(group_id)
        .fetch_all(&mut *conn)
        .await
        .map_err(err("list volumes"))?;
    for v in volume_ids {
        let delete = if trim {
            sqlx::query("DELETE FROM records WHERE volume_id = ? AND seq <= ?")
                .bind(v)
                .bind(b)
        } else {
            sqlx::query("DELETE FROM records WHERE volume_id = ?").bind(v)
        };
        records += delete
            .execute(&mut *conn)
            .await
            .map_err(err(says(
                "delete trimmed records",
                "delete the records of a failed-over volume",
            )))?
            .rows_affected();
    }
    let batches = sqlx::query(if trim {
        "DELETE FROM batches WHERE group_id = ? AND seq < ?"
    } else {
        "DELETE FROM batches WHERE group_id = ? AND seq != ?"
    })
    .bind(group_id)
    .bind(b)
    .execute(&mut *conn)
    .await
    .map_err(err(says(
        "delete trimmed batches",
        "delete the batches around the failover point",
    )))?
    .rows_affected();
    sqlx::query(
        "UPDATE batches SET segment = NULL, position = NULL, length = NULL WHERE group_id = ? AND seq = ?",
    )
    .bind(group_id)
    .bind(b)
    .execute(&mut *conn)
    .await
    .map_err(err(says(
        "mark the base batch as applied",
        "mark the failover point's batch as applied",
    )))?;
    sqlx::query(if trim {
        "DELETE FROM bookmarks WHERE group_id = ? AND seq < ?"
    } else {
        "DELETE FROM bookmarks WHERE group_id = ? AND seq != ?"
    })
    .bind(group_id)
    .bind(b)
    .execute(&mut *conn)
    .await
    .map_err(err(says(
        "delete trimmed bookmarks",
        "delete the bookmarks around the failover point",
    )))?;
    let (end_segment, end_offset) = match (end, g.trimmed_end) {
        (Some((s, o)), _) => (Some(s), Some(o)),
        (None, Some((s, o))) => (Some(s as i64), Some(o as i64)),
        (None, None) => (None, None),
    };
    let update = match how {
        BaseMove::Trim => sqlx::query(
            "UPDATE groups SET base_seq = ?, trimming_to = NULL, trimmed_end_segment = ?, trimmed_end_offset = ? WHERE id = ?",
        )
        .bind(b),
        BaseMove::FailoverCommit { head_hash } => sqlx::query(
            "UPDATE groups SET base_seq = ?, head_seq = ?, head_hash = ?, trimming_to = NULL, trimmed_end_segment = ?, trimmed_end_offset = ? WHERE id = ?",
        )
        .bind(b)
        .bind(b)
        .bind(head_hash),
    };
    update
        .bind(end_segment)
        .bind(end_offset)
        .bind(group_id)
        .execute(&mut *conn)
        .await
        .map_err(err(says(
            "advance the group's base",
            "move the group to the failover point",
        )))?;
    Ok((records, batches))
}

async fn journal_bytes_after_on<'e, E: sqlx::Executor<'e, Database = Sqlite>>(
    e: E,
    group_id: i64,
    after: Seq,
) -> Result<u64> {
    let n: Option<i64> = sqlx::query_scalar(
        "SELECT SUM(length) FROM batches WHERE group_id = ? AND seq > ? AND segment IS NOT NULL",
    )
    .bind(group_id)
    .bind(after.0 as i64)
    .fetch_one(e)
    .await
    .map_err(ReplicaError::catalog("sum the journal"))?;
    Ok(n.unwrap_or(0) as u64)
}

async fn first_batch_since_on<'e, E: sqlx::Executor<'e, Database = Sqlite>>(
    e: E,
    group_id: i64,
    after: Seq,
    upto: Seq,
    cutoff_ns: i64,
) -> Result<Option<Seq>> {
    let seq: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(seq) FROM batches WHERE group_id = ? AND seq > ? AND seq <= ? AND agent_ns >= ?",
        )
        .bind(group_id)
        .bind(after.0 as i64)
        .bind(upto.0 as i64)
        .bind(cutoff_ns)
        .fetch_one(e)
        .await
        .map_err(ReplicaError::catalog("find the window's start"))?;
    Ok(seq.map(|s| Seq(s as u64)))
}

async fn batch_weights_on<'e, E: sqlx::Executor<'e, Database = Sqlite>>(
    e: E,
    group_id: i64,
    after: Seq,
    limit: u64,
) -> Result<Vec<BatchWeight>> {
    let rows: Vec<(i64, Option<i64>, i64)> = sqlx::query_as(
            "SELECT seq, length, record_count FROM batches WHERE group_id = ? AND seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(group_id)
        .bind(after.0 as i64)
        .bind(limit as i64)
        .fetch_all(e)
        .await
        .map_err(ReplicaError::catalog("weigh batches"))?;
    Ok(rows
        .into_iter()
        .map(|(seq, length, records)| BatchWeight {
            seq: Seq(seq as u64),
            journal_bytes: length.unwrap_or(0) as u64,
            records: records as u64,
        })
        .collect())
}

async fn first_segment_on<'e, E: sqlx::Executor<'e, Database = Sqlite>>(
    e: E,
    group_id: i64,
    after: Seq,
    upto: Seq,
) -> Result<Option<u64>> {
    let n: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(segment) FROM batches WHERE group_id = ? AND seq > ? AND seq <= ? AND segment IS NOT NULL",
        )
        .bind(group_id)
        .bind(after.0 as i64)
        .bind(upto.0 as i64)
        .fetch_one(e)
        .await
        .map_err(ReplicaError::catalog("find the first journal segment"))?;
    Ok(n.map(|n| n as u64))
}
