//! The catalog: the only module that talks to SQLite (`meta.db`, schema in `migrations/`).
//!
//! It holds what is in the journal and where (groups, volumes, batches, records, bookmarks),
//! the agent links and events. Connections use WAL journal mode and `synchronous = FULL` (an
//! ack depends on a commit being durable), a busy timeout so that readers in other processes
//! (`status`, `points`, `restore`) and the server share the file, and foreign keys. Only
//! `init` and `serve` apply migrations ([`Catalog::open`] with `migrate`).
//!
//! All queries are runtime-checked (`sqlx::query`/`query_as`); integers are SQLite's i64 and
//! converted at this boundary.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use cdp_shared::batch::Hash;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Sqlite};

use crate::error::{ReplicaError, Result};

/// How long a connection waits for another writer before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections in a pool (SQLite has one writer; readers share the rest).
pub const POOL_CONNECTIONS_MAX: u32 = 4;
/// Record rows per INSERT statement (9 parameters each; SQLite allows 32766).
const RECORD_ROWS_PER_INSERT: usize = 500;

/// State of a volume on the replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VolumeState {
    /// Announced by the agent; its initial sync has not begun.
    New,
    /// Initial sync running: records go straight to the target file, nothing is journaled.
    Syncing,
    /// Records are journaled; the window starts at `sync_done_seq`.
    Protecting,
}

impl VolumeState {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeState::New => "new",
            VolumeState::Syncing => "syncing",
            VolumeState::Protecting => "protecting",
        }
    }
}

impl FromStr for VolumeState {
    type Err = ReplicaError;
    fn from_str(s: &str) -> Result<VolumeState> {
        match s {
            "new" => Ok(VolumeState::New),
            "syncing" => Ok(VolumeState::Syncing),
            "protecting" => Ok(VolumeState::Protecting),
            other => Err(ReplicaError::CatalogCorrupt(format!(
                "unknown volume state {other:?}"
            ))),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupRow {
    pub id: i64,
    pub name: String,
    /// Fingerprint (hex) of the owning agent.
    pub owner: String,
    pub generation: String,
    pub base_seq: u64,
    pub head_seq: u64,
    pub head_hash: Option<Hash>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeRow {
    pub id: i64,
    pub group_id: i64,
    pub agent_volume_id: u32,
    pub name: String,
    pub size: u64,
    pub state: VolumeState,
    pub sync_done_seq: Option<u64>,
}

/// Where a journaled batch lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentSpan {
    pub segment: u64,
    pub position: u64,
    pub length: u64,
}

impl SegmentSpan {
    pub fn end(&self) -> u64 {
        self.position + self.length
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchRow {
    pub seq: u64,
    pub agent_ns: i64,
    pub received_ns: i64,
    pub durable_ns: i64,
    pub flags: u16,
    pub bookmark: Option<String>,
    pub span: Option<SegmentSpan>,
    pub record_count: u32,
    pub header_hash: Hash,
}

/// A journaled record as the reconstructor needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordRow {
    pub chunk: u64,
    pub seq: u64,
    pub idx: u32,
    pub chunk_offset: u32,
    pub length: u32,
    pub kind: u8,
    pub segment: u64,
    pub position: u64,
}

/// A record row to insert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewRecord {
    pub volume_id: i64,
    pub row: RecordRow,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkRow {
    pub connected: bool,
    pub peer: String,
    pub since_ns: i64,
}

/// Everything one group commit writes, in one transaction.
#[derive(Clone, Debug, Default)]
pub struct CommitRows {
    pub group_id: i64,
    pub head_seq: u64,
    pub head_hash: Option<Hash>,
    pub batches: Vec<BatchRow>,
    pub records: Vec<NewRecord>,
    pub bookmarks: Vec<(String, u64)>,
    /// (volume id, new state, sync_done_seq)
    pub volume_changes: Vec<(i64, VolumeState, Option<u64>)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventLevel {
    Info,
    Warn,
    Error,
}

impl EventLevel {
    fn as_str(self) -> &'static str {
        match self {
            EventLevel::Info => "info",
            EventLevel::Warn => "warn",
            EventLevel::Error => "error",
        }
    }
}

fn hash_of(bytes: Option<Vec<u8>>) -> Result<Option<Hash>> {
    match bytes {
        None => Ok(None),
        Some(b) => Hash::try_from(b.as_slice())
            .map(Some)
            .map_err(|_| ReplicaError::CatalogCorrupt(format!("a hash of {} bytes", b.len()))),
    }
}

type RecordTuple = (i64, i64, i64, i64, i64, i64, i64, i64);
fn record_of(r: RecordTuple) -> RecordRow {
    RecordRow {
        chunk: r.0 as u64,
        seq: r.1 as u64,
        idx: r.2 as u32,
        chunk_offset: r.3 as u32,
        length: r.4 as u32,
        kind: r.5 as u8,
        segment: r.6 as u64,
        position: r.7 as u64,
    }
}

type GroupTuple = (i64, String, String, String, i64, i64, Option<Vec<u8>>);
const GROUP_COLUMNS: &str = "id, name, owner, generation, base_seq, head_seq, head_hash";

fn group_of(t: GroupTuple) -> Result<GroupRow> {
    Ok(GroupRow {
        id: t.0,
        name: t.1,
        owner: t.2,
        generation: t.3,
        base_seq: t.4 as u64,
        head_seq: t.5 as u64,
        head_hash: hash_of(t.6)?,
    })
}

type VolumeTuple = (i64, i64, i64, String, i64, String, Option<i64>);
const VOLUME_COLUMNS: &str = "id, group_id, agent_volume_id, name, size, state, sync_done_seq";

fn volume_of(t: VolumeTuple) -> Result<VolumeRow> {
    Ok(VolumeRow {
        id: t.0,
        group_id: t.1,
        agent_volume_id: t.2 as u32,
        name: t.3,
        size: t.4 as u64,
        state: t.5.parse()?,
        sync_done_seq: t.6.map(|s| s as u64),
    })
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
        seq: t.0 as u64,
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

/// Handle on `meta.db` (a small connection pool; clone freely).
#[derive(Clone, Debug)]
pub struct Catalog {
    pool: SqlitePool,
}

impl Catalog {
    /// Opens `path`. `create` makes the file if missing; `migrate` applies pending migrations
    /// (only `init` and `serve` do).
    pub async fn open(path: &Path, create: bool, migrate: bool) -> Result<Catalog> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(create)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(POOL_CONNECTIONS_MAX)
            .connect_with(options)
            .await
            .map_err(ReplicaError::catalog("be opened"))?;
        if migrate {
            sqlx::migrate!("../migrations").run(&pool).await?;
        }
        Ok(Catalog { pool })
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    // ---- groups and volumes ----

    pub async fn groups(&self) -> Result<Vec<GroupRow>> {
        let rows: Vec<GroupTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {GROUP_COLUMNS} FROM groups ORDER BY name"
        )))
        .fetch_all(&self.pool)
        .await
        .map_err(ReplicaError::catalog("list groups"))?;
        rows.into_iter().map(group_of).collect()
    }

    pub async fn group_by_name(&self, name: &str) -> Result<Option<GroupRow>> {
        let row: Option<GroupTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {GROUP_COLUMNS} FROM groups WHERE name = ?"
        )))
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(ReplicaError::catalog("read a group"))?;
        row.map(group_of).transpose()
    }

    pub async fn group_by_id(&self, id: i64) -> Result<GroupRow> {
        let row: GroupTuple = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {GROUP_COLUMNS} FROM groups WHERE id = ?"
        )))
        .bind(id)
        .fetch_one(&self.pool)
        .await
        .map_err(ReplicaError::catalog("read a group"))?;
        group_of(row)
    }

    /// Creates a group with its volumes (state `new`) in one transaction. `head` is where its
    /// journal starts (base = head; 0 for an agent that starts at seq 1).
    pub async fn create_group(
        &self,
        name: &str,
        owner: &str,
        generation: &str,
        head: u64,
        now_ns: i64,
    ) -> Result<GroupRow> {
        let id: i64 = sqlx::query_scalar("INSERT INTO groups (name, owner, generation, base_seq, head_seq, head_hash, created_ns) VALUES (?, ?, ?, ?, ?, NULL, ?) RETURNING id")
            .bind(name)
            .bind(owner)
            .bind(generation)
            .bind(head as i64)
            .bind(head as i64)
            .bind(now_ns)
            .fetch_one(&self.pool)
            .await
            .map_err(ReplicaError::catalog("create a group"))?;
        self.group_by_id(id).await
    }

    /// Moves an empty group's start (no batch committed yet) to `head`.
    pub async fn rebase_empty_group(&self, group_id: i64, head: u64) -> Result<()> {
        sqlx::query("UPDATE groups SET base_seq = ?, head_seq = ?, head_hash = NULL WHERE id = ? AND NOT EXISTS (SELECT 1 FROM batches WHERE group_id = ?)")
            .bind(head as i64)
            .bind(head as i64)
            .bind(group_id)
            .bind(group_id)
            .execute(&self.pool)
            .await
            .map_err(ReplicaError::catalog("rebase a group"))?;
        Ok(())
    }

    pub async fn group_has_batches(&self, group_id: i64) -> Result<bool> {
        let n: i64 = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM batches WHERE group_id = ?)")
            .bind(group_id)
            .fetch_one(&self.pool)
            .await
            .map_err(ReplicaError::catalog("read batches"))?;
        Ok(n != 0)
    }

    pub async fn volumes_of_group(&self, group_id: i64) -> Result<Vec<VolumeRow>> {
        let rows: Vec<VolumeTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {VOLUME_COLUMNS} FROM volumes WHERE group_id = ? ORDER BY agent_volume_id"
        )))
        .bind(group_id)
        .fetch_all(&self.pool)
        .await
        .map_err(ReplicaError::catalog("list volumes"))?;
        rows.into_iter().map(volume_of).collect()
    }

    pub async fn volumes(&self) -> Result<Vec<VolumeRow>> {
        let rows: Vec<VolumeTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {VOLUME_COLUMNS} FROM volumes ORDER BY name"
        )))
        .fetch_all(&self.pool)
        .await
        .map_err(ReplicaError::catalog("list volumes"))?;
        rows.into_iter().map(volume_of).collect()
    }

    pub async fn volume_by_name(&self, name: &str) -> Result<Option<VolumeRow>> {
        let row: Option<VolumeTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {VOLUME_COLUMNS} FROM volumes WHERE name = ?"
        )))
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(ReplicaError::catalog("read a volume"))?;
        row.map(volume_of).transpose()
    }

    pub async fn insert_volume(
        &self,
        group_id: i64,
        agent_volume_id: u32,
        name: &str,
        size: u64,
    ) -> Result<VolumeRow> {
        let id: i64 = sqlx::query_scalar("INSERT INTO volumes (group_id, agent_volume_id, name, size, state, sync_done_seq) VALUES (?, ?, ?, ?, 'new', NULL) RETURNING id")
            .bind(group_id)
            .bind(i64::from(agent_volume_id))
            .bind(name)
            .bind(size as i64)
            .fetch_one(&self.pool)
            .await
            .map_err(ReplicaError::catalog("add a volume"))?;
        Ok(VolumeRow {
            id,
            group_id,
            agent_volume_id,
            name: name.to_owned(),
            size,
            state: VolumeState::New,
            sync_done_seq: None,
        })
    }

    // ---- ingest ----

    /// The header hash of batch `seq` of the group, if it is durable.
    pub async fn batch_hash(&self, group_id: i64, seq: u64) -> Result<Option<Hash>> {
        let h: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT header_hash FROM batches WHERE group_id = ? AND seq = ?")
                .bind(group_id)
                .bind(seq as i64)
                .fetch_optional(&self.pool)
                .await
                .map_err(ReplicaError::catalog("read a batch"))?;
        hash_of(h)
    }

    /// Where the last journaled batch of the group ends (the committed end of the journal).
    pub async fn last_journaled(&self, group_id: i64) -> Result<Option<SegmentSpan>> {
        let row: Option<(i64, i64, i64)> = sqlx::query_as(
            "SELECT segment, position, length FROM batches WHERE group_id = ? AND segment IS NOT NULL ORDER BY segment DESC, position DESC LIMIT 1",
        )
        .bind(group_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(ReplicaError::catalog("find the end of the journal"))?;
        Ok(row.map(|(s, p, l)| SegmentSpan {
            segment: s as u64,
            position: p as u64,
            length: l as u64,
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
            .bind(b.seq as i64)
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
                    .push_bind(r.row.seq as i64)
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
                .bind(*seq as i64)
                .execute(&mut *tx)
                .await
                .map_err(err("record a bookmark"))?;
        }
        for (volume_id, state, sync_done) in &rows.volume_changes {
            sqlx::query("UPDATE volumes SET state = ?, sync_done_seq = COALESCE(?, sync_done_seq) WHERE id = ?")
                .bind(state.as_str())
                .bind(sync_done.map(|s| s as i64))
                .bind(*volume_id)
                .execute(&mut *tx)
                .await
                .map_err(err("change a volume's state"))?;
        }
        sqlx::query("UPDATE groups SET head_seq = ?, head_hash = ? WHERE id = ?")
            .bind(rows.head_seq as i64)
            .bind(rows.head_hash.as_ref().map(|h| h.as_slice()))
            .bind(rows.group_id)
            .execute(&mut *tx)
            .await
            .map_err(err("advance the group's head"))?;
        tx.commit().await.map_err(err("commit a batch"))?;
        Ok(())
    }

    // ---- links and events ----

    pub async fn set_link(
        &self,
        group_id: i64,
        connected: bool,
        peer: &str,
        since_ns: i64,
    ) -> Result<()> {
        sqlx::query("INSERT INTO links (group_id, connected, peer, since_ns) VALUES (?, ?, ?, ?) ON CONFLICT (group_id) DO UPDATE SET connected = excluded.connected, peer = excluded.peer, since_ns = excluded.since_ns")
            .bind(group_id)
            .bind(connected)
            .bind(peer)
            .bind(since_ns)
            .execute(&self.pool)
            .await
            .map_err(ReplicaError::catalog("record a link"))?;
        Ok(())
    }

    /// Marks every link down (a previous `serve` may have stopped without doing so).
    pub async fn reset_links(&self, now_ns: i64) -> Result<()> {
        sqlx::query("UPDATE links SET connected = 0, since_ns = ? WHERE connected != 0")
            .bind(now_ns)
            .execute(&self.pool)
            .await
            .map_err(ReplicaError::catalog("reset links"))?;
        Ok(())
    }

    pub async fn link(&self, group_id: i64) -> Result<Option<LinkRow>> {
        let row: Option<(bool, String, i64)> =
            sqlx::query_as("SELECT connected, peer, since_ns FROM links WHERE group_id = ?")
                .bind(group_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(ReplicaError::catalog("read a link"))?;
        Ok(row.map(|(connected, peer, since_ns)| LinkRow {
            connected,
            peer,
            since_ns,
        }))
    }

    pub async fn event(
        &self,
        level: EventLevel,
        group: Option<&str>,
        volume: Option<&str>,
        message: &str,
        now_ns: i64,
    ) -> Result<()> {
        sqlx::query("INSERT INTO events (time_ns, level, group_name, volume, message) VALUES (?, ?, ?, ?, ?)")
            .bind(now_ns)
            .bind(level.as_str())
            .bind(group)
            .bind(volume)
            .bind(message)
            .execute(&self.pool)
            .await
            .map_err(ReplicaError::catalog("record an event"))?;
        Ok(())
    }

    // ---- readers ----

    /// The latest `limit` events of a group, newest first: (level, message).
    pub async fn events(&self, group: &str, limit: u32) -> Result<Vec<(String, String)>> {
        sqlx::query_as(
            "SELECT level, message FROM events WHERE group_name = ? ORDER BY time_ns DESC, id DESC LIMIT ?",
        )
        .bind(group)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(ReplicaError::catalog("read events"))
    }

    pub async fn batch(&self, group_id: i64, seq: u64) -> Result<Option<BatchRow>> {
        let row: Option<BatchTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE group_id = ? AND seq = ?"
        )))
        .bind(group_id)
        .bind(seq as i64)
        .fetch_optional(&self.pool)
        .await
        .map_err(ReplicaError::catalog("read a batch"))?;
        row.map(batch_of).transpose()
    }

    /// The batches of the group with seq in `[from, to]`, in seq order.
    pub async fn batches(&self, group_id: i64, from: u64, to: u64) -> Result<Vec<BatchRow>> {
        let rows: Vec<BatchTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT {BATCH_COLUMNS} FROM batches WHERE group_id = ? AND seq >= ? AND seq <= ? ORDER BY seq")))
            .bind(group_id)
            .bind(from as i64)
            .bind(to as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(ReplicaError::catalog("list batches"))?;
        rows.into_iter().map(batch_of).collect()
    }

    /// The first (or last, `latest`) consistent batch with seq in `[from, to]` and, when given,
    /// agent time at or before `time_ns_max`.
    pub async fn consistent_batch(
        &self,
        group_id: i64,
        from: u64,
        to: u64,
        time_ns_max: Option<i64>,
        latest: bool,
    ) -> Result<Option<BatchRow>> {
        let order = if latest { "DESC" } else { "ASC" };
        let row: Option<BatchTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE group_id = ? AND seq >= ? AND seq <= ? AND (flags & 8) = 0 AND agent_ns <= ? ORDER BY seq {order} LIMIT 1"
        )))
        .bind(group_id)
        .bind(from as i64)
        .bind(to as i64)
        .bind(time_ns_max.unwrap_or(i64::MAX))
        .fetch_optional(&self.pool)
        .await
        .map_err(ReplicaError::catalog("find a recovery point"))?;
        row.map(batch_of).transpose()
    }

    /// The latest batch of the group that carries bookmark `name`.
    pub async fn bookmark(&self, group_id: i64, name: &str) -> Result<Option<BatchRow>> {
        let seq: Option<i64> =
            sqlx::query_scalar("SELECT MAX(seq) FROM bookmarks WHERE group_id = ? AND name = ?")
                .bind(group_id)
                .bind(name)
                .fetch_one(&self.pool)
                .await
                .map_err(ReplicaError::catalog("find a bookmark"))?;
        match seq {
            Some(seq) => self.batch(group_id, seq as u64).await,
            None => Ok(None),
        }
    }

    /// Bytes of the group's batches held in journal segments.
    pub async fn journal_bytes(&self, group_id: i64) -> Result<u64> {
        let n: Option<i64> = sqlx::query_scalar(
            "SELECT SUM(length) FROM batches WHERE group_id = ? AND segment IS NOT NULL",
        )
        .bind(group_id)
        .fetch_one(&self.pool)
        .await
        .map_err(ReplicaError::catalog("sum the journal"))?;
        Ok(n.unwrap_or(0) as u64)
    }

    /// The journaled records of a volume with seq in `(after, upto]`, in key order: chunk by
    /// chunk, and within a chunk in (seq, idx) order — the order in which they are overlaid.
    pub async fn records(&self, volume_id: i64, after: u64, upto: u64) -> Result<Vec<RecordRow>> {
        let rows: Vec<RecordTuple> = sqlx::query_as(
            "SELECT chunk, seq, idx, chunk_offset, length, kind, segment, position FROM records \
             WHERE volume_id = ? AND seq > ? AND seq <= ? ORDER BY chunk, seq, idx",
        )
        .bind(volume_id)
        .bind(after as i64)
        .bind(upto as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(ReplicaError::catalog("read the journal index"))?;
        Ok(rows.into_iter().map(record_of).collect())
    }

    /// The journaled records of a volume with seq in `(after, upto]` and chunk in
    /// `[first_chunk, end_chunk)`, in key order (one range of the primary key).
    pub async fn records_in_chunks(
        &self,
        volume_id: i64,
        after: u64,
        upto: u64,
        first_chunk: u64,
        end_chunk: u64,
    ) -> Result<Vec<RecordRow>> {
        let rows: Vec<RecordTuple> = sqlx::query_as(
            "SELECT chunk, seq, idx, chunk_offset, length, kind, segment, position FROM records \
             WHERE volume_id = ? AND chunk >= ? AND chunk < ? AND seq > ? AND seq <= ? ORDER BY chunk, seq, idx",
        )
        .bind(volume_id)
        .bind(first_chunk as i64)
        .bind(end_chunk as i64)
        .bind(after as i64)
        .bind(upto as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(ReplicaError::catalog("read the journal index"))?;
        Ok(rows.into_iter().map(record_of).collect())
    }

    /// The group's durable head seq as committed (read back after a failed commit).
    pub async fn head(&self, group_id: i64) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT head_seq FROM groups WHERE id = ?")
            .bind(group_id)
            .fetch_one(&self.pool)
            .await
            .map_err(ReplicaError::catalog("read a group's head"))?;
        Ok(n as u64)
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
