//! The journal index: batches, records, the group commit, coverage, bookmarks and the
//! queries that resolve recovery points.

use cdp_shared::batch::Hash;
use cdp_shared::types::Seq;
use sqlx::{QueryBuilder, Sqlite};

use super::executor::Executes;
use super::failover::failover_on;
use super::{
    BatchRow, Catalog, FailoverRow, NewRecord, RecordRow, VolumeState, WriteLock, hash_of,
};
use crate::error::{ReplicaError, Result};
use crate::journal::SegmentSpan;

/// Record rows per INSERT statement (9 parameters each; SQLite allows 32766).
const RECORD_ROWS_PER_INSERT: usize = 500;

/// Which points `points` lists ([`Catalog::points_page`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PointsFilter {
    /// Only batches whose agent time is at or after this.
    pub since_ns: Option<i64>,
    /// Only batches whose agent time is at or before this.
    pub until_ns: Option<i64>,
    /// Only batches that carry a bookmark.
    pub bookmarks_only: bool,
    /// At most this many.
    pub limit: Option<u64>,
    /// Newest (highest seq) first.
    pub newest_first: bool,
}

/// The query of [`Catalog::points_page`] (parameters: group, from, to, since, until, limit;
/// a limit of -1 is none).
fn points_sql(filter: &PointsFilter) -> String {
    format!(
        "SELECT {BATCH_COLUMNS} FROM batches WHERE group_id = ? AND seq >= ? AND seq <= ? \
         AND agent_ns >= ? AND agent_ns <= ?{} ORDER BY seq {} LIMIT ?",
        if filter.bookmarks_only {
            " AND bookmark IS NOT NULL"
        } else {
            ""
        },
        if filter.newest_first { "DESC" } else { "ASC" }
    )
}

/// Everything one group commit writes, in one transaction.
#[derive(Clone, Debug, Default)]
pub struct CommitRows {
    pub group_id: i64,
    pub head_seq: Seq,
    pub head_hash: Option<Hash>,
    pub batches: Vec<BatchRow>,
    pub records: Vec<NewRecord>,
    pub bookmarks: Vec<(String, Seq)>,
    /// (volume id, new state, sync_done_seq)
    pub volume_changes: Vec<(i64, VolumeState, Option<Seq>)>,
}

/// Rows of one page of [`Catalog::records_in_chunks`].
const COVER_PAGE_ROWS: i64 = 1024;

/// The byte ranges of a chunk that newer records already cover: sorted, disjoint, merged
/// (ranges that touch are one).
#[derive(Default)]
struct Coverage {
    ranges: Vec<(u64, u64)>,
}

impl Coverage {
    /// Adds `[start, end)`; true when it covers a byte not covered before.
    fn add(&mut self, start: u64, end: u64) -> bool {
        if start >= end {
            return false;
        }
        // The ranges that touch or overlap [start, end) are ranges[lo..hi].
        let lo = self.ranges.partition_point(|&(_, e)| e < start);
        let hi = self.ranges.partition_point(|&(s, _)| s <= end);
        if lo < hi && self.ranges[lo].0 <= start && self.ranges[lo].1 >= end {
            return false;
        }
        let (mut s, mut e) = (start, end);
        for &(rs, re) in &self.ranges[lo..hi] {
            s = s.min(rs);
            e = e.max(re);
        }
        self.ranges.splice(lo..hi, [(s, e)]);
        true
    }

    /// Whether `[0, len)` is covered (merged ranges: the first one must span it).
    fn covers(&self, len: u64) -> bool {
        self.ranges
            .first()
            .is_some_and(|&(s, e)| s == 0 && e >= len)
    }
}

type RecordTuple = (i64, i64, i64, i64, i64, i64, i64, i64);
fn record_of(r: RecordTuple) -> RecordRow {
    RecordRow {
        chunk: r.0 as u64,
        seq: Seq(r.1 as u64),
        idx: r.2 as u32,
        chunk_offset: r.3 as u32,
        length: r.4 as u32,
        kind: r.5 as u8,
        segment: r.6 as u64,
        position: r.7 as u64,
    }
}

type BatchTuple = (
    i64,
    i64,
    i64,
    i64,
    i64,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    i64,
    Vec<u8>,
);
const BATCH_COLUMNS: &str = "seq, agent_ns, received_ns, durable_ns, flags, bookmark, segment, position, length, record_count, header_hash";

fn batch_of(t: BatchTuple) -> Result<BatchRow> {
    let span = match (t.6, t.7, t.8) {
        (Some(segment), Some(position), Some(length)) => Some(SegmentSpan {
            segment: segment as u64,
            position: position as u64,
            length: length as u64,
        }),
        (None, None, None) => None,
        _ => {
            return Err(ReplicaError::CatalogCorrupt(format!(
                "batch {} has a partial segment location",
                t.0
            )));
        }
    };
    Ok(BatchRow {
        seq: Seq(t.0 as u64),
        agent_ns: t.1,
        received_ns: t.2,
        durable_ns: t.3,
        flags: t.4 as u16,
        bookmark: t.5,
        span,
        record_count: t.9 as u32,
        header_hash: hash_of(Some(t.10))?.unwrap_or_default(),
    })
}

impl Catalog {
    // ---- ingest ----

    /// The header hash of batch `seq` of the group, if it is durable.
    pub async fn batch_hash(&self, group_id: i64, seq: Seq) -> Result<Option<Hash>> {
        let h: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT header_hash FROM batches WHERE group_id = ? AND seq = ?")
                .bind(group_id)
                .bind(seq.0 as i64)
                .fetch_optional(&self.pool)
                .await
                .map_err(ReplicaError::catalog("read a batch"))?;
        hash_of(h)
    }

    /// Where the last journaled batch of the group ends (the committed end of the journal).
    /// Once the trimmer has removed every journaled batch row, that is where the last trimmed
    /// one ended (a span of length 0 there).
    pub async fn last_journaled(&self, group_id: i64) -> Result<Option<SegmentSpan>> {
        let row: Option<(i64, i64, i64)> = sqlx::query_as(
            "SELECT segment, position, length FROM batches WHERE group_id = ? AND segment IS NOT NULL ORDER BY segment DESC, position DESC LIMIT 1",
        )
        .bind(group_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(ReplicaError::catalog("find the end of the journal"))?;
        if let Some((s, p, l)) = row {
            return Ok(Some(SegmentSpan {
                segment: s as u64,
                position: p as u64,
                length: l as u64,
            }));
        }
        Ok(self
            .group_by_id(group_id)
            .await?
            .trimmed_end
            .map(|(segment, offset)| SegmentSpan {
                segment,
                position: offset,
                length: 0,
            }))
    }

    /// Writes one group commit in ONE transaction: batch rows, record rows, bookmarks, volume
    /// state changes and the group's head. After it returns, the batches are durable. After an
    /// error the transaction is rolled back and its connection closed rather than reused (a
    /// failed COMMIT may leave SQLite and sqlx disagreeing about the open transaction); the
    /// caller that must know whether it took effect reads the head back ([`Catalog::head`]).
    pub async fn commit(&self, rows: &CommitRows) -> Result<()> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(ReplicaError::catalog("get a connection"))?;
        let result = Self::commit_on(&mut conn, rows).await;
        if result.is_err() {
            conn.close_on_drop();
        }
        result
    }

    async fn commit_on(
        conn: &mut sqlx::pool::PoolConnection<Sqlite>,
        rows: &CommitRows,
    ) -> Result<()> {
        let err = ReplicaError::catalog;
        let mut tx = sqlx::Connection::begin(&mut **conn)
            .await
            .map_err(err("begin a transaction"))?;
        for b in &rows.batches {
            sqlx::query(
                "INSERT INTO batches (group_id, seq, agent_ns, received_ns, durable_ns, flags, bookmark, segment, position, length, record_count, header_hash) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(rows.group_id)
            .bind(b.seq.0 as i64)
            .bind(b.agent_ns)
            .bind(b.received_ns)
            .bind(b.durable_ns)
            .bind(i64::from(b.flags))
            .bind(b.bookmark.as_deref())
            .bind(b.span.map(|s| s.segment as i64))
            .bind(b.span.map(|s| s.position as i64))
            .bind(b.span.map(|s| s.length as i64))
            .bind(i64::from(b.record_count))
            .bind(b.header_hash.as_slice())
            .execute(&mut *tx)
            .await
            .map_err(err("record a batch"))?;
        }
        for chunk in rows.records.chunks(RECORD_ROWS_PER_INSERT) {
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO records (volume_id, chunk, seq, idx, chunk_offset, length, kind, segment, position) ",
            );
            qb.push_values(chunk, |mut v, r| {
                v.push_bind(r.volume_id)
                    .push_bind(r.row.chunk as i64)
                    .push_bind(r.row.seq.0 as i64)
                    .push_bind(i64::from(r.row.idx))
                    .push_bind(i64::from(r.row.chunk_offset))
                    .push_bind(i64::from(r.row.length))
                    .push_bind(i64::from(r.row.kind))
                    .push_bind(r.row.segment as i64)
                    .push_bind(r.row.position as i64);
            });
            qb.build()
                .execute(&mut *tx)
                .await
                .map_err(err("record the records of a batch"))?;
        }
        for (name, seq) in &rows.bookmarks {
            sqlx::query("INSERT OR IGNORE INTO bookmarks (group_id, name, seq) VALUES (?, ?, ?)")
                .bind(rows.group_id)
                .bind(name)
                .bind(seq.0 as i64)
                .execute(&mut *tx)
                .await
                .map_err(err("record a bookmark"))?;
        }
        for (volume_id, state, sync_done) in &rows.volume_changes {
            sqlx::query("UPDATE volumes SET state = ?, sync_done_seq = COALESCE(?, sync_done_seq) WHERE id = ?")
                .bind(state.as_str())
                .bind(sync_done.map(|s| s.0 as i64))
                .bind(*volume_id)
                .execute(&mut *tx)
                .await
                .map_err(err("change a volume's state"))?;
        }
        // The fence: inside the write transaction, so no batch commits once a failover row
        // of the group exists (see `failover`).
        if let Some(f) = failover_on(&mut *tx, rows.group_id).await? {
            return Err(ReplicaError::Fenced(format!(
                "group {} is failed over on the replica at seq {}",
                rows.group_id, f.seq
            )));
        }
        sqlx::query("UPDATE groups SET head_seq = ?, head_hash = ? WHERE id = ?")
            .bind(rows.head_seq.0 as i64)
            .bind(rows.head_hash.as_ref().map(|h| h.as_slice()))
            .bind(rows.group_id)
            .execute(&mut *tx)
            .await
            .map_err(err("advance the group's head"))?;
        tx.commit().await.map_err(err("commit a batch"))?;
        Ok(())
    }

    // ---- readers ----

    pub async fn batch(&self, group_id: i64, seq: Seq) -> Result<Option<BatchRow>> {
        batch_on(&self.pool, group_id, seq).await
    }

    /// The batches of the group with seq in `[from, to]`, in seq order.
    pub async fn batches(&self, group_id: i64, from: Seq, to: Seq) -> Result<Vec<BatchRow>> {
        let rows: Vec<BatchTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT {BATCH_COLUMNS} FROM batches WHERE group_id = ? AND seq >= ? AND seq <= ? ORDER BY seq")))
            .bind(group_id)
            .bind(from.0 as i64)
            .bind(to.0 as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(ReplicaError::catalog("list batches"))?;
        rows.into_iter().map(batch_of).collect()
    }

    /// The number of batches of the group with seq in `[from, to]` (one range of the primary
    /// key).
    pub async fn batch_count_in(&self, group_id: i64, from: Seq, to: Seq) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM batches WHERE group_id = ? AND seq >= ? AND seq <= ?",
        )
        .bind(group_id)
        .bind(from.0 as i64)
        .bind(to.0.min(i64::MAX as u64) as i64)
        .fetch_one(&self.pool)
        .await
        .map_err(ReplicaError::catalog("count batches"))?;
        Ok(n as u64)
    }

    /// The batches of the group with seq in `[from, to]` that `filter` keeps, in the order it
    /// asks for, at most `filter.limit` of them: one range of the primary key (group_id, seq),
    /// walked in that order and filtered row by row inside SQLite, so only the rows returned are
    /// held in memory (a window of millions of points is not read to print twenty).
    pub async fn points_page(
        &self,
        group_id: i64,
        from: Seq,
        to: Seq,
        filter: &PointsFilter,
    ) -> Result<Vec<BatchRow>> {
        let rows: Vec<BatchTuple> = sqlx::query_as(sqlx::AssertSqlSafe(points_sql(filter)))
            .bind(group_id)
            .bind(from.0 as i64)
            .bind(to.0.min(i64::MAX as u64) as i64)
            .bind(filter.since_ns.unwrap_or(i64::MIN))
            .bind(filter.until_ns.unwrap_or(i64::MAX))
            .bind(filter.limit.map_or(-1, |n| n.min(i64::MAX as u64) as i64))
            .fetch_all(&self.pool)
            .await
            .map_err(ReplicaError::catalog("list recovery points"))?;
        rows.into_iter().map(batch_of).collect()
    }

    /// The first (or last, `latest`) consistent batch with seq in `[from, to]` and, when given,
    /// agent time at or before `time_ns_max`.
    pub async fn consistent_batch(
        &self,
        group_id: i64,
        from: Seq,
        to: Seq,
        time_ns_max: Option<i64>,
        latest: bool,
    ) -> Result<Option<BatchRow>> {
        consistent_batch_on(&self.pool, group_id, from, to, time_ns_max, latest).await
    }

    /// The latest batch of the group that carries bookmark `name`.
    pub async fn bookmark(&self, group_id: i64, name: &str) -> Result<Option<BatchRow>> {
        bookmark_on(&self.pool, group_id, name).await
    }

    /// Bytes of the group's batches held in journal segments.
    pub async fn journal_bytes(&self, group_id: i64) -> Result<u64> {
        journal_bytes_on(&self.pool, group_id).await
    }

    /// The journaled records of a volume with seq in `(after, upto]`, in key order: chunk by
    /// chunk, and within a chunk in (seq, idx) order — the order in which they are overlaid.
    pub async fn records(&self, volume_id: i64, after: Seq, upto: Seq) -> Result<Vec<RecordRow>> {
        let rows: Vec<RecordTuple> = sqlx::query_as(
            "SELECT chunk, seq, idx, chunk_offset, length, kind, segment, position FROM records \
             WHERE volume_id = ? AND seq > ? AND seq <= ? ORDER BY chunk, seq, idx",
        )
        .bind(volume_id)
        .bind(after.0 as i64)
        .bind(upto.0 as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(ReplicaError::catalog("read the journal index"))?;
        Ok(rows.into_iter().map(record_of).collect())
    }

    /// The journaled records of a volume with seq in `(after, upto]` and chunk in
    /// `[first_chunk, end_chunk)` that the image at `upto` reads, in key order (chunk, seq,
    /// idx). A record whose bytes newer records of the range all overwrite is left out: each
    /// chunk is read newest first (backwards along the primary key, [`COVER_PAGE_ROWS`] rows
    /// a page) and only until its records cover all of it (`chunk_len(chunk)` bytes), so a
    /// chunk under constant overwrite costs about the records of its last full rewrite, not
    /// every record of the window. The records returned overlay, in order, to exactly the
    /// same bytes as all of them would.
    pub async fn records_in_chunks(
        &self,
        volume_id: i64,
        after: Seq,
        upto: Seq,
        first_chunk: u64,
        end_chunk: u64,
        chunk_len: impl Fn(u64) -> u64,
    ) -> Result<Vec<RecordRow>> {
        let mut out: Vec<RecordRow> = Vec::new();
        if first_chunk >= end_chunk || upto <= after {
            return Ok(out);
        }
        // Rows are read in descending key order, below the key `below`.
        let mut below = (end_chunk as i64, -1i64, -1i64);
        let mut cover: Option<(u64, Coverage)> = None;
        'pages: loop {
            let rows: Vec<RecordTuple> = sqlx::query_as(
                "SELECT chunk, seq, idx, chunk_offset, length, kind, segment, position FROM records \
                 WHERE volume_id = ? AND chunk >= ? AND (chunk, seq, idx) < (?, ?, ?) \
                 AND seq > ? AND seq <= ? ORDER BY chunk DESC, seq DESC, idx DESC LIMIT ?",
            )
            .bind(volume_id)
            .bind(first_chunk as i64)
            .bind(below.0)
            .bind(below.1)
            .bind(below.2)
            .bind(after.0 as i64)
            .bind(upto.0 as i64)
            .bind(COVER_PAGE_ROWS)
            .fetch_all(&self.pool)
            .await
            .map_err(ReplicaError::catalog("read the journal index"))?;
            let full_page = rows.len() as i64 == COVER_PAGE_ROWS;
            for t in rows {
                below = (t.0, t.1, t.2);
                let r = record_of(t);
                if cover.as_ref().is_none_or(|(c, _)| *c != r.chunk) {
                    cover = Some((r.chunk, Coverage::default()));
                }
                let Some((chunk, seen)) = cover.as_mut() else {
                    continue;
                };
                let start = u64::from(r.chunk_offset);
                if seen.add(start, start + u64::from(r.length)) {
                    out.push(r);
                }
                if seen.covers(chunk_len(*chunk)) {
                    // The rest of this chunk is hidden: go on below it.
                    below = (*chunk as i64, -1, -1);
                    cover = None;
                    continue 'pages;
                }
            }
            if !full_page {
                break;
            }
        }
        out.reverse();
        Ok(out)
    }

    /// The chunks of a volume that records with seq in `(after, upto]` change, ascending (the
    /// candidates of `diff`; one range of the `(volume_id, seq)` index).
    pub async fn chunks_changed(&self, volume_id: i64, after: Seq, upto: Seq) -> Result<Vec<u64>> {
        let chunks: Vec<i64> = sqlx::query_scalar(
            "SELECT DISTINCT chunk FROM records WHERE volume_id = ? AND seq > ? AND seq <= ? \
             ORDER BY chunk",
        )
        .bind(volume_id)
        .bind(after.0 as i64)
        .bind(upto.0 as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(ReplicaError::catalog("read the journal index"))?;
        Ok(chunks.into_iter().map(|c| c as u64).collect())
    }

    /// The group's durable head seq as committed (read back after a failed commit).
    pub async fn head(&self, group_id: i64) -> Result<Seq> {
        let n: i64 = sqlx::query_scalar("SELECT head_seq FROM groups WHERE id = ?")
            .bind(group_id)
            .fetch_one(&self.pool)
            .await
            .map_err(ReplicaError::catalog("read a group's head"))?;
        Ok(Seq(n as u64))
    }

    /// Number of record rows of a volume (tests and measurements).
    pub async fn record_count(&self, volume_id: i64) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM records WHERE volume_id = ?")
            .bind(volume_id)
            .fetch_one(&self.pool)
            .await
            .map_err(ReplicaError::catalog("count records"))?;
        Ok(n as u64)
    }

    /// The journaled records of a volume with seq in `(after, upto]` in the order they are
    /// applied: by seq, and within a batch by index.
    pub async fn records_in_seq_order(
        &self,
        volume_id: i64,
        after: Seq,
        upto: Seq,
    ) -> Result<Vec<RecordRow>> {
        let rows: Vec<RecordTuple> = sqlx::query_as(
            "SELECT chunk, seq, idx, chunk_offset, length, kind, segment, position FROM records \
             WHERE volume_id = ? AND seq > ? AND seq <= ? ORDER BY seq, idx",
        )
        .bind(volume_id)
        .bind(after.0 as i64)
        .bind(upto.0 as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(ReplicaError::catalog("read the journal index"))?;
        Ok(rows.into_iter().map(record_of).collect())
    }

    /// Number of batch rows of a group (tests and measurements).
    pub async fn batch_count(&self, group_id: i64) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM batches WHERE group_id = ?")
            .bind(group_id)
            .fetch_one(&self.pool)
            .await
            .map_err(ReplicaError::catalog("count batches"))?;
        Ok(n as u64)
    }
}

impl WriteLock {
    pub async fn journal_bytes(&mut self, group_id: i64) -> Result<u64> {
        journal_bytes_on(self.conn()?, group_id).await
    }
}

/// The reads that resolve a recovery point, on the pool ([`Catalog`]) or inside a transaction
/// ([`WriteLock`]).
pub(crate) trait PointReads: Executes {
    async fn batch(&mut self, group_id: i64, seq: Seq) -> Result<Option<BatchRow>> {
        batch_on(self.executor()?, group_id, seq).await
    }
    /// See [`Catalog::consistent_batch`].
    async fn consistent_batch(
        &mut self,
        group_id: i64,
        from: Seq,
        to: Seq,
        time_ns_max: Option<i64>,
        latest: bool,
    ) -> Result<Option<BatchRow>> {
        consistent_batch_on(self.executor()?, group_id, from, to, time_ns_max, latest).await
    }
    async fn bookmark(&mut self, group_id: i64, name: &str) -> Result<Option<BatchRow>> {
        bookmark_on(self.executor()?, group_id, name).await
    }
    async fn failover(&mut self, group_id: i64) -> Result<Option<FailoverRow>> {
        failover_on(self.executor()?, group_id).await
    }
}

impl PointReads for Catalog {}

impl PointReads for WriteLock {}

// ---- queries on the pool or on one connection ----

async fn batch_on<'e, E: sqlx::Executor<'e, Database = Sqlite>>(
    e: E,
    group_id: i64,
    seq: Seq,
) -> Result<Option<BatchRow>> {
    let row: Option<BatchTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {BATCH_COLUMNS} FROM batches WHERE group_id = ? AND seq = ?"
    )))
    .bind(group_id)
    .bind(seq.0 as i64)
    .fetch_optional(e)
    .await
    .map_err(ReplicaError::catalog("read a batch"))?;
    row.map(batch_of).transpose()
}

async fn consistent_batch_on<'e, E: sqlx::Executor<'e, Database = Sqlite>>(
    e: E,
    group_id: i64,
    from: Seq,
    to: Seq,
    time_ns_max: Option<i64>,
    latest: bool,
) -> Result<Option<BatchRow>> {
    let order = if latest { "DESC" } else { "ASC" };
    let row: Option<BatchTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE group_id = ? AND seq >= ? AND seq <= ? AND (flags & 8) = 0 AND agent_ns <= ? ORDER BY seq {order} LIMIT 1"
        )))
        .bind(group_id)
        .bind(from.0 as i64)
        .bind(to.0 as i64)
        .bind(time_ns_max.unwrap_or(i64::MAX))
        .fetch_optional(e)
        .await
        .map_err(ReplicaError::catalog("find a recovery point"))?;
    row.map(batch_of).transpose()
}

async fn bookmark_on<'e, E: sqlx::Executor<'e, Database = Sqlite>>(
    e: E,
    group_id: i64,
    name: &str,
) -> Result<Option<BatchRow>> {
    let row: Option<BatchTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {BATCH_COLUMNS} FROM batches WHERE group_id = ? AND seq = (SELECT MAX(seq) FROM bookmarks WHERE group_id = ? AND name = ?)"
    )))
    .bind(group_id)
    .bind(group_id)
    .bind(name)
    .fetch_optional(e)
    .await
    .map_err(ReplicaError::catalog("find a bookmark"))?;
    row.map(batch_of).transpose()
}

async fn journal_bytes_on<'e, E: sqlx::Executor<'e, Database = Sqlite>>(
    e: E,
    group_id: i64,
) -> Result<u64> {
    let n: Option<i64> = sqlx::query_scalar(
        "SELECT SUM(length) FROM batches WHERE group_id = ? AND segment IS NOT NULL",
    )
    .bind(group_id)
    .fetch_one(e)
    .await
    .map_err(ReplicaError::catalog("sum the journal"))?;
    Ok(n.unwrap_or(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::OpenMode;
    use crate::reconstruct::{Plan, RecordRef, Source};
    use crate::retention::Retention;
    use cdp_shared::types::CHUNK_BYTES;

    #[test]
    fn coverage_merges_and_says_what_is_new() {
        let mut c = Coverage::default();
        assert!(c.add(10, 20));
        assert!(!c.add(12, 18), "inside a covered range");
        assert!(c.add(30, 40));
        assert!(c.add(20, 30), "joins the two");
        assert_eq!(c.ranges, vec![(10, 40)]);
        assert!(!c.add(10, 40));
        assert!(c.add(0, 5));
        assert!(!c.covers(40));
        assert!(c.add(5, 10));
        assert!(c.covers(40));
        assert!(!c.covers(41));
        assert_eq!(c.ranges, vec![(0, 40)]);
        assert!(!c.add(7, 7), "empty");
    }

    /// `points_page` walks the primary key in the order asked for (no scan of the table, no
    /// sort), whatever the filters, and returns what they keep.
    #[tokio::test]
    async fn points_are_filtered_and_limited_along_the_primary_key() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(&dir.path().join("meta.db"), OpenMode::Create)
            .await
            .unwrap();
        let g = catalog
            .create_group("g", "agent", "gen", Seq(0), &Retention::default(), 0)
            .await
            .unwrap();
        let batches: Vec<BatchRow> = (1..=1000u64)
            .map(|seq| BatchRow {
                seq: Seq(seq),
                agent_ns: seq as i64 * 1000,
                received_ns: seq as i64 * 1000 + 1,
                durable_ns: seq as i64 * 1000 + 2,
                flags: 0,
                bookmark: seq.is_multiple_of(100).then(|| format!("b{seq}")),
                span: None,
                record_count: 0,
                header_hash: [seq as u8; 32],
            })
            .collect();
        catalog
            .commit(&CommitRows {
                group_id: g.id,
                head_seq: Seq(1000),
                batches,
                ..CommitRows::default()
            })
            .await
            .unwrap();
        let seqs = |rows: Vec<BatchRow>| rows.iter().map(|b| b.seq.0).collect::<Vec<_>>();
        let newest = PointsFilter {
            limit: Some(3),
            newest_first: true,
            ..PointsFilter::default()
        };
        assert_eq!(
            seqs(
                catalog
                    .points_page(g.id, Seq(10), Seq(1000), &newest)
                    .await
                    .unwrap()
            ),
            [1000, 999, 998]
        );
        let f = PointsFilter {
            since_ns: Some(500_000),
            until_ns: Some(503_000),
            ..PointsFilter::default()
        };
        assert_eq!(
            seqs(
                catalog
                    .points_page(g.id, Seq(10), Seq(1000), &f)
                    .await
                    .unwrap()
            ),
            [500, 501, 502, 503]
        );
        let f = PointsFilter {
            bookmarks_only: true,
            until_ns: Some(450_000),
            limit: Some(2),
            newest_first: true,
            ..PointsFilter::default()
        };
        assert_eq!(
            seqs(
                catalog
                    .points_page(g.id, Seq(150), Seq(1000), &f)
                    .await
                    .unwrap()
            ),
            [400, 300]
        );
        for filter in [
            PointsFilter::default(),
            newest,
            f,
            PointsFilter {
                since_ns: Some(1),
                ..PointsFilter::default()
            },
        ] {
            let plan: Vec<(i64, i64, i64, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "EXPLAIN QUERY PLAN {}",
                points_sql(&filter)
            )))
            .bind(g.id)
            .bind(1i64)
            .bind(1000i64)
            .bind(0i64)
            .bind(i64::MAX)
            .bind(10i64)
            .fetch_all(&catalog.pool)
            .await
            .unwrap();
            let plan = plan.into_iter().map(|r| r.3).collect::<Vec<_>>().join("; ");
            assert!(
                plan.contains("SEARCH batches USING PRIMARY KEY (group_id=? AND seq>? AND seq<?)")
                    && !plan.contains("TEMP B-TREE")
                    && !plan.contains("SCAN"),
                "{filter:?}: {plan}"
            );
        }
    }

    /// A piece as (offset, len, (seq, idx, byte within the record) or none, zero).
    type Origin = (u64, u64, Option<(u64, u32, u64)>, bool);

    /// Where each byte of the image comes from: comparable between plans built from
    /// different record lists.
    fn sources(plan: &Plan) -> Vec<Origin> {
        plan.pieces(0, plan.size())
            .into_iter()
            .map(|p| match p.source {
                Source::Target => (p.offset, p.len, None, false),
                Source::Zero => (p.offset, p.len, None, true),
                Source::Record { record, base } => {
                    let r = plan.records()[record as usize];
                    (
                        p.offset,
                        p.len,
                        Some((r.seq.0, r.idx, p.offset - base)),
                        false,
                    )
                }
            })
            .collect()
    }

    /// The records `records_in_chunks` leaves out are exactly ones that change nothing: a plan
    /// of what it returns reads every byte from the same place as a plan of every record; a
    /// chunk overwritten many times returns few records.
    #[tokio::test]
    async fn records_in_chunks_returns_what_the_image_reads() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(&dir.path().join("meta.db"), OpenMode::Create)
            .await
            .unwrap();
        let g = catalog
            .create_group("g", "agent", "gen", Seq(0), &Retention::default(), 0)
            .await
            .unwrap();
        // 3 chunks and a half: chunk 0 cold (a few small writes), chunk 1 rewritten whole
        // many times in 4 KiB writes, chunk 2 half written, chunk 3 short and rewritten.
        let size = 3 * CHUNK_BYTES + CHUNK_BYTES / 2;
        let v = catalog.insert_volume(g.id, 0, "v", size).await.unwrap();
        let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut records = Vec::new();
        let mut push = |chunk: u64, seq: u64, idx: u32, off: u64, len: u64, kind: u8| {
            records.push(NewRecord {
                volume_id: v.id,
                row: RecordRow {
                    chunk,
                    seq: Seq(seq),
                    idx,
                    chunk_offset: off as u32,
                    length: len as u32,
                    kind,
                    segment: 1,
                    position: seq * 1000 + u64::from(idx),
                },
            });
        };
        for seq in 1..=60u64 {
            for idx in 0..100u32 {
                let chunk = next() % 4;
                let chunk_len = if chunk == 3 {
                    CHUNK_BYTES / 2
                } else {
                    CHUNK_BYTES
                };
                let (off, len) = match chunk {
                    0 if idx % 50 != 0 => continue,
                    2 => ((next() % 128) * 4096, 4096 * (1 + next() % 3)),
                    _ => ((next() % (chunk_len / 4096)) * 4096, 4096),
                };
                let len = len.min(chunk_len - off);
                let kind = [1u8, 1, 1, 2, 3][(next() % 5) as usize];
                push(chunk, seq, idx, off, len, kind);
            }
        }
        let total = records.len();
        catalog
            .commit(&CommitRows {
                group_id: g.id,
                head_seq: Seq(60),
                records,
                ..CommitRows::default()
            })
            .await
            .unwrap();
        for (after, upto) in [(0, 60), (0, 30), (10, 60), (59, 60), (0, 1), (30, 30)] {
            for (first, end) in [(0, 4), (1, 2), (0, 1), (2, 4), (3, 4)] {
                let every: Vec<RecordRow> = catalog
                    .records_in_seq_order(v.id, Seq(after), Seq(upto))
                    .await
                    .unwrap()
                    .into_iter()
                    .filter(|r| r.chunk >= first && r.chunk < end)
                    .collect();
                let some = catalog
                    .records_in_chunks(
                        v.id,
                        Seq(after),
                        Seq(upto),
                        first,
                        end,
                        cdp_shared::types::chunk_len_of(size),
                    )
                    .await
                    .unwrap();
                let mut sorted = some.clone();
                sorted.sort_by_key(|r| (r.chunk, r.seq, r.idx));
                assert_eq!(some, sorted, "in key order");
                assert!(some.iter().all(|r| every.contains(r)));
                let plan = |rows: &[RecordRow]| {
                    let mut rows = rows.to_vec();
                    rows.sort_by_key(|r| (r.seq, r.idx));
                    Plan::build(size, rows.iter().map(|r| RecordRef::from_row(r).unwrap())).unwrap()
                };
                assert_eq!(
                    sources(&plan(&every)),
                    sources(&plan(&some)),
                    "({after}, {upto}] chunks {first}..{end}"
                );
                if (after, upto, first, end) == (0, 60, 1, 2) {
                    assert!(
                        some.len() * 2 < every.len(),
                        "hidden records of a rewritten chunk are left out: {} of {}",
                        some.len(),
                        every.len()
                    );
                }
            }
        }
        assert!(total > 4000);
    }
}
