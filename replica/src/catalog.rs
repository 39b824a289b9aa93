//! The catalog: the only module that talks to SQLite (`meta.db`, schema in `migrations/`).
//!
//! It holds what is in the journal and where (groups, volumes, batches, records, bookmarks),
//! the agent links, what `serve` saw of each agent, and events. Connections use WAL journal mode and `synchronous = FULL` (an
//! ack depends on a commit being durable), a busy timeout so that readers in other processes
//! (`status`, `points`, `restore`) and the server share the file, and foreign keys. Only
//! `init` and `serve` apply migrations ([`Catalog::open`] with `migrate`).
//!
//! All queries are runtime-checked (`sqlx::query`/`query_as`); integers are SQLite's i64 and
//! converted at this boundary. A catalog opened without `migrate` must already have every
//! migration this build knows applied (otherwise: "start `serve` once to upgrade it").
//!
//! [`Catalog::write_lock`] takes SQLite's write lock (`BEGIN IMMEDIATE`) for a transaction that
//! reads, decides and writes: while it is held no other transaction commits, so reads made
//! meanwhile — on the lock's connection or on any other — see exactly the state the writes are
//! made against. Pins and the trimmer's intent are serialized with it (see `pins` and
//! `trimmer`).

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use cdp_shared::batch::Hash;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Sqlite};

use crate::error::{ReplicaError, Result};
use crate::retention::{BatchWeight, Retention};

/// The migrations this build applies (and requires of a catalog it opens).
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

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
    pub retention: Retention,
    /// The base a trim under way is moving to (step (a) of the trim protocol).
    pub trimming_to: Option<u64>,
    /// Where the last trimmed journaled batch ended: (segment, offset).
    pub trimmed_end: Option<(u64, u64)>,
}

impl GroupRow {
    /// Where every window of the group starts at the earliest: the base, or the base a trim
    /// under way is moving to.
    pub fn window_floor(&self) -> u64 {
        self.base_seq.max(self.trimming_to.unwrap_or(0))
    }
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

/// What `serve` saw of an agent (table `agents`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentSeenRow {
    /// Hex.
    pub fingerprint: String,
    pub first_seen_ns: i64,
    /// The last Hello or end of a connection of the agent.
    pub last_seen_ns: i64,
    pub last_address: String,
}

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
        seq: r.1 as u64,
        idx: r.2 as u32,
        chunk_offset: r.3 as u32,
        length: r.4 as u32,
        kind: r.5 as u8,
        segment: r.6 as u64,
        position: r.7 as u64,
    }
}

type GroupTuple = (
    i64,
    String,
    String,
    String,
    i64,
    i64,
    Option<Vec<u8>>,
    i64,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);
const GROUP_COLUMNS: &str = "id, name, owner, generation, base_seq, head_seq, head_hash, retention_window_s, retention_journal_bytes_max, trimming_to, trimmed_end_segment, trimmed_end_offset";

fn group_of(t: GroupTuple) -> Result<GroupRow> {
    Ok(GroupRow {
        id: t.0,
        name: t.1,
        owner: t.2,
        generation: t.3,
        base_seq: t.4 as u64,
        head_seq: t.5 as u64,
        head_hash: hash_of(t.6)?,
        retention: Retention {
            window: Duration::from_secs(t.7.max(1) as u64),
            journal_bytes_max: t.8.map(|n| n as u64),
        },
        trimming_to: t.9.map(|n| n as u64),
        trimmed_end: match (t.10, t.11) {
            (Some(s), Some(o)) => Some((s as u64, o as u64)),
            _ => None,
        },
    })
}

/// A reader's pin (see `pins`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinRow {
    pub id: i64,
    pub group_id: i64,
    pub volume_id: i64,
    pub seq: u64,
    pub segment_min: Option<u64>,
    pub holder: String,
    pub pid: i64,
    pub pid_ns: Option<String>,
    pub created_ns: i64,
    pub expires_ns: i64,
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
);
const PIN_COLUMNS: &str =
    "id, group_id, volume_id, seq, segment_min, holder, pid, pid_ns, created_ns, expires_ns";

fn pin_of(t: PinTuple) -> PinRow {
    PinRow {
        id: t.0,
        group_id: t.1,
        volume_id: t.2,
        seq: t.3 as u64,
        segment_min: t.4.map(|n| n as u64),
        holder: t.5,
        pid: t.6,
        pid_ns: t.7,
        created_ns: t.8,
        expires_ns: t.9,
    }
}

/// A pin to record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewPin<'a> {
    pub group_id: i64,
    pub volume_id: i64,
    pub seq: u64,
    pub segment_min: Option<u64>,
    pub holder: &'a str,
    pub pid: u32,
    pub pid_ns: Option<&'a str>,
    pub now_ns: i64,
    pub expires_ns: i64,
}

/// What step (d) of a trim did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrimDone {
    /// Journal bytes of the batches trimmed (no longer counted in `journal_bytes`).
    pub journal_bytes: u64,
    pub batches: u64,
    pub records: u64,
}

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
    pub volume_id: i64,
    pub seq: u64,
    /// The lowest journal segment the image at `seq` may read.
    pub segment_min: Option<u64>,
    pub state: FailoverState,
    pub started_ns: i64,
    pub committed_ns: Option<i64>,
}

type FailoverTuple = (i64, i64, i64, Option<i64>, String, i64, Option<i64>);
const FAILOVER_COLUMNS: &str =
    "group_id, volume_id, seq, segment_min, state, started_ns, committed_ns";

fn failover_of(t: FailoverTuple) -> Result<FailoverRow> {
    Ok(FailoverRow {
        group_id: t.0,
        volume_id: t.1,
        seq: t.2 as u64,
        segment_min: t.3.map(|n| n as u64),
        state: t.4.parse()?,
        started_ns: t.5,
        committed_ns: t.6,
    })
}

/// What a failover commit's transaction did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FailoverCommitDone {
    /// Batch rows deleted (the points after the failover point, and the journaled ones
    /// before it).
    pub batches: u64,
    pub records: u64,
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
            MIGRATOR.run(&pool).await?;
        } else {
            let newest = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
            let applied: Option<i64> =
                sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
                    .fetch_one(&pool)
                    .await
                    .unwrap_or(None);
            if applied.unwrap_or(0) < newest {
                pool.close().await;
                return Err(ReplicaError::CatalogOutdated {
                    path: path.to_path_buf(),
                });
            }
        }
        Ok(Catalog { pool })
    }

    /// Takes SQLite's write lock for one transaction (see the module docs).
    pub async fn write_lock(&self) -> Result<WriteLock> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(ReplicaError::catalog("get a connection"))?;
        if let Err(e) = sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await {
            conn.close_on_drop();
            return Err(ReplicaError::catalog("take the write lock")(e));
        }
        Ok(WriteLock {
            conn: Some(conn),
            committed: false,
        })
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
        retention: &Retention,
        now_ns: i64,
    ) -> Result<GroupRow> {
        let id: i64 = sqlx::query_scalar("INSERT INTO groups (name, owner, generation, base_seq, head_seq, head_hash, created_ns, retention_window_s, retention_journal_bytes_max) VALUES (?, ?, ?, ?, ?, NULL, ?, ?, ?) RETURNING id")
            .bind(name)
            .bind(owner)
            .bind(generation)
            .bind(head as i64)
            .bind(head as i64)
            .bind(now_ns)
            .bind(retention.window.as_secs() as i64)
            .bind(retention.journal_bytes_max.map(|n| n as i64))
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
        volume_by_name_on(&self.pool, name).await
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
        // The fence: inside the write transaction, so no batch commits once a failover row
        // of the group exists (see `failover`).
        if let Some(f) = failover_on(&mut *tx, rows.group_id).await? {
            return Err(ReplicaError::Fenced(format!(
                "group {} is failed over on the replica at seq {}",
                rows.group_id, f.seq
            )));
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

    /// Every link as last recorded: (group id, link).
    pub async fn links(&self) -> Result<Vec<(i64, LinkRow)>> {
        let rows: Vec<(i64, bool, String, i64)> = sqlx::query_as(
            "SELECT group_id, connected, peer, since_ns FROM links ORDER BY group_id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(ReplicaError::catalog("read the links"))?;
        Ok(rows
            .into_iter()
            .map(|(g, connected, peer, since_ns)| {
                (
                    g,
                    LinkRow {
                        connected,
                        peer,
                        since_ns,
                    },
                )
            })
            .collect())
    }

    /// Records that `serve` had a connection from agent `fingerprint` (hex) at `now_ns`, from
    /// `address` (at its Hello and when the connection ends).
    pub async fn agent_seen(&self, fingerprint: &str, address: &str, now_ns: i64) -> Result<()> {
        sqlx::query("INSERT INTO agents (fingerprint, first_seen_ns, last_seen_ns, last_address) VALUES (?, ?, ?, ?) ON CONFLICT (fingerprint) DO UPDATE SET last_seen_ns = MAX(last_seen_ns, excluded.last_seen_ns), last_address = excluded.last_address")
            .bind(fingerprint)
            .bind(now_ns)
            .bind(now_ns)
            .bind(address)
            .execute(&self.pool)
            .await
            .map_err(ReplicaError::catalog("record when an agent was seen"))?;
        Ok(())
    }

    /// What `serve` saw of every agent that connected, by fingerprint.
    pub async fn agents_seen(&self) -> Result<Vec<AgentSeenRow>> {
        let rows: Vec<(String, i64, i64, String)> = sqlx::query_as(
            "SELECT fingerprint, first_seen_ns, last_seen_ns, last_address FROM agents ORDER BY fingerprint",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(ReplicaError::catalog("read when the agents were seen"))?;
        Ok(rows
            .into_iter()
            .map(
                |(fingerprint, first_seen_ns, last_seen_ns, last_address)| AgentSeenRow {
                    fingerprint,
                    first_seen_ns,
                    last_seen_ns,
                    last_address,
                },
            )
            .collect())
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
        batch_on(&self.pool, group_id, seq).await
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

    /// The number of batches of the group with seq in `[from, to]` (one range of the primary
    /// key).
    pub async fn batch_count_in(&self, group_id: i64, from: u64, to: u64) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM batches WHERE group_id = ? AND seq >= ? AND seq <= ?",
        )
        .bind(group_id)
        .bind(from as i64)
        .bind(to.min(i64::MAX as u64) as i64)
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
        from: u64,
        to: u64,
        filter: &PointsFilter,
    ) -> Result<Vec<BatchRow>> {
        let rows: Vec<BatchTuple> = sqlx::query_as(sqlx::AssertSqlSafe(points_sql(filter)))
            .bind(group_id)
            .bind(from as i64)
            .bind(to.min(i64::MAX as u64) as i64)
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
        from: u64,
        to: u64,
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
        after: u64,
        upto: u64,
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
            .bind(after as i64)
            .bind(upto as i64)
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
    pub async fn chunks_changed(&self, volume_id: i64, after: u64, upto: u64) -> Result<Vec<u64>> {
        let chunks: Vec<i64> = sqlx::query_scalar(
            "SELECT DISTINCT chunk FROM records WHERE volume_id = ? AND seq > ? AND seq <= ? \
             ORDER BY chunk",
        )
        .bind(volume_id)
        .bind(after as i64)
        .bind(upto as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(ReplicaError::catalog("read the journal index"))?;
        Ok(chunks.into_iter().map(|c| c as u64).collect())
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

    // ---- retention and the trimmer ----

    /// Sets a group's retention (picked up by a running `serve` at its trimmer's next round).
    pub async fn set_retention(&self, group_id: i64, retention: &Retention) -> Result<()> {
        sqlx::query("UPDATE groups SET retention_window_s = ?, retention_journal_bytes_max = ? WHERE id = ?")
            .bind(retention.window.as_secs() as i64)
            .bind(retention.journal_bytes_max.map(|n| n as i64))
            .bind(group_id)
            .execute(&self.pool)
            .await
            .map_err(ReplicaError::catalog("set a group's retention"))?;
        Ok(())
    }

    /// The first batch with seq in `(after, upto]` whose agent time is at or after
    /// `cutoff_ns` (the trimmer's window test).
    pub async fn first_batch_since(
        &self,
        group_id: i64,
        after: u64,
        upto: u64,
        cutoff_ns: i64,
    ) -> Result<Option<u64>> {
        first_batch_since_on(&self.pool, group_id, after, upto, cutoff_ns).await
    }

    /// The first `limit` batches after `after`, in seq order, as the trimmer weighs them.
    pub async fn batch_weights(
        &self,
        group_id: i64,
        after: u64,
        limit: u64,
    ) -> Result<Vec<BatchWeight>> {
        batch_weights_on(&self.pool, group_id, after, limit).await
    }

    /// The journaled records of a volume with seq in `(after, upto]` in the order they are
    /// applied: by seq, and within a batch by index.
    pub async fn records_in_seq_order(
        &self,
        volume_id: i64,
        after: u64,
        upto: u64,
    ) -> Result<Vec<RecordRow>> {
        let rows: Vec<RecordTuple> = sqlx::query_as(
            "SELECT chunk, seq, idx, chunk_offset, length, kind, segment, position FROM records \
             WHERE volume_id = ? AND seq > ? AND seq <= ? ORDER BY seq, idx",
        )
        .bind(volume_id)
        .bind(after as i64)
        .bind(upto as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(ReplicaError::catalog("read the journal index"))?;
        Ok(rows.into_iter().map(record_of).collect())
    }

    /// The lowest segment holding a journaled batch with seq in `(after, upto]`.
    pub async fn first_segment(&self, group_id: i64, after: u64, upto: u64) -> Result<Option<u64>> {
        first_segment_on(&self.pool, group_id, after, upto).await
    }

    /// Step (d) of the trim protocol, in ONE transaction: the records of the group's volumes
    /// with seq ≤ `to`, its batch rows and bookmarks with seq < `to` are deleted, batch `to`
    /// is kept but no longer counted as journaled, the end of the last trimmed journaled batch
    /// is remembered, the base moves to `to` and the intent is cleared. Does nothing (and
    /// returns `None`) unless the group's intent is `to`.
    pub async fn finish_trim(&self, group_id: i64, to: u64) -> Result<Option<TrimDone>> {
        let mut lock = self.write_lock().await?;
        let done = lock.finish_trim(group_id, to).await?;
        lock.commit().await?;
        Ok(done)
    }

    /// Every pin of a group, oldest seq first.
    pub async fn pins_of_group(&self, group_id: i64) -> Result<Vec<PinRow>> {
        let rows: Vec<PinTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {PIN_COLUMNS} FROM pins WHERE group_id = ? ORDER BY seq, id"
        )))
        .bind(group_id)
        .fetch_all(&self.pool)
        .await
        .map_err(ReplicaError::catalog("list pins"))?;
        Ok(rows.into_iter().map(pin_of).collect())
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

    /// Rows of `table` that name a volume (`column` = `volume_id`) or a group (`group_id`),
    /// for the tests of `forget`.
    #[doc(hidden)]
    pub async fn count_rows_for_test(&self, table: &str, column: &str, id: i64) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM {table} WHERE {column} = ?"
        )))
        .bind(id)
        .fetch_one(&self.pool)
        .await
        .map_err(ReplicaError::catalog("count rows"))?;
        Ok(n as u64)
    }

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
        seq: u64,
        now_ns: i64,
    ) -> Result<Option<FailoverCommitDone>> {
        let mut lock = self.write_lock().await?;
        let done = lock.finish_failover_commit(group_id, seq, now_ns).await?;
        lock.commit().await?;
        Ok(done)
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

/// SQLite's write lock, held for one transaction ([`Catalog::write_lock`]). Dropped without
/// [`WriteLock::commit`], its connection is closed, which rolls the transaction back.
pub struct WriteLock {
    conn: Option<sqlx::pool::PoolConnection<Sqlite>>,
    committed: bool,
}

impl WriteLock {
    fn conn(&mut self) -> Result<&mut sqlx::SqliteConnection> {
        self.conn
            .as_deref_mut()
            .ok_or_else(|| ReplicaError::Task("a catalog write lock was used after its end".into()))
    }

    /// Commits the transaction and releases the lock.
    pub async fn commit(mut self) -> Result<()> {
        let result = sqlx::query("COMMIT").execute(self.conn()?).await;
        match result {
            Ok(_) => {
                self.committed = true;
                Ok(())
            }
            Err(e) => Err(ReplicaError::catalog("commit")(e)),
        }
    }

    /// The group row, read inside the transaction.
    pub async fn group(&mut self, group_id: i64) -> Result<GroupRow> {
        let row: GroupTuple = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {GROUP_COLUMNS} FROM groups WHERE id = ?"
        )))
        .bind(group_id)
        .fetch_one(self.conn()?)
        .await
        .map_err(ReplicaError::catalog("read a group"))?;
        group_of(row)
    }

    pub async fn volume_by_name(&mut self, name: &str) -> Result<Option<VolumeRow>> {
        volume_by_name_on(self.conn()?, name).await
    }

    pub async fn journal_bytes(&mut self, group_id: i64) -> Result<u64> {
        journal_bytes_on(self.conn()?, group_id).await
    }

    pub async fn first_batch_since(
        &mut self,
        group_id: i64,
        after: u64,
        upto: u64,
        cutoff_ns: i64,
    ) -> Result<Option<u64>> {
        first_batch_since_on(self.conn()?, group_id, after, upto, cutoff_ns).await
    }

    pub async fn batch_weights(
        &mut self,
        group_id: i64,
        after: u64,
        limit: u64,
    ) -> Result<Vec<BatchWeight>> {
        batch_weights_on(self.conn()?, group_id, after, limit).await
    }

    pub async fn first_segment(
        &mut self,
        group_id: i64,
        after: u64,
        upto: u64,
    ) -> Result<Option<u64>> {
        first_segment_on(self.conn()?, group_id, after, upto).await
    }

    /// Every pin of the group, read inside the transaction.
    pub async fn pins_of_group(&mut self, group_id: i64) -> Result<Vec<PinRow>> {
        let rows: Vec<PinTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {PIN_COLUMNS} FROM pins WHERE group_id = ? ORDER BY seq, id"
        )))
        .bind(group_id)
        .fetch_all(self.conn()?)
        .await
        .map_err(ReplicaError::catalog("list pins"))?;
        Ok(rows.into_iter().map(pin_of).collect())
    }

    /// Records a pin; returns its id.
    pub async fn insert_pin(&mut self, pin: &NewPin<'_>) -> Result<i64> {
        sqlx::query_scalar("INSERT INTO pins (group_id, volume_id, seq, segment_min, holder, pid, pid_ns, created_ns, expires_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id")
            .bind(pin.group_id)
            .bind(pin.volume_id)
            .bind(pin.seq as i64)
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

    /// The group's failover row, read inside the transaction.
    pub async fn failover(&mut self, group_id: i64) -> Result<Option<FailoverRow>> {
        failover_on(self.conn()?, group_id).await
    }

    /// The number of volumes of a group, read inside the transaction.
    pub async fn volume_count(&mut self, group_id: i64) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM volumes WHERE group_id = ?")
            .bind(group_id)
            .fetch_one(self.conn()?)
            .await
            .map_err(ReplicaError::catalog("count volumes"))?;
        Ok(n as u64)
    }

    /// Records a group's failover (state `active`).
    pub async fn insert_failover(&mut self, f: &FailoverRow) -> Result<()> {
        sqlx::query("INSERT INTO failovers (group_id, volume_id, seq, segment_min, state, started_ns, committed_ns) VALUES (?, ?, ?, ?, ?, ?, ?)")
            .bind(f.group_id)
            .bind(f.volume_id)
            .bind(f.seq as i64)
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
        seq: u64,
        now_ns: i64,
    ) -> Result<Option<FailoverCommitDone>> {
        let err = ReplicaError::catalog;
        match self.failover(group_id).await? {
            Some(f) if f.state == FailoverState::Committing && f.seq == seq => {}
            _ => return Ok(None),
        }
        let g = self.group(group_id).await?;
        let conn = self.conn()?;
        let s = seq as i64;
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
        let mut records = 0u64;
        let volume_ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM volumes WHERE group_id = ?")
            .bind(group_id)
            .fetch_all(&mut *conn)
            .await
            .map_err(err("list volumes"))?;
        for v in volume_ids {
            records += sqlx::query("DELETE FROM records WHERE volume_id = ?")
                .bind(v)
                .execute(&mut *conn)
                .await
                .map_err(err("delete the records of a failed-over volume"))?
                .rows_affected();
        }
        let batches = sqlx::query("DELETE FROM batches WHERE group_id = ? AND seq != ?")
            .bind(group_id)
            .bind(s)
            .execute(&mut *conn)
            .await
            .map_err(err("delete the batches around the failover point"))?
            .rows_affected();
        sqlx::query(
            "UPDATE batches SET segment = NULL, position = NULL, length = NULL WHERE group_id = ? AND seq = ?",
        )
        .bind(group_id)
        .bind(s)
        .execute(&mut *conn)
        .await
        .map_err(err("mark the failover point's batch as applied"))?;
        sqlx::query("DELETE FROM bookmarks WHERE group_id = ? AND seq != ?")
            .bind(group_id)
            .bind(s)
            .execute(&mut *conn)
            .await
            .map_err(err("delete the bookmarks around the failover point"))?;
        let (end_segment, end_offset) = match (end, g.trimmed_end) {
            (Some((seg, off)), _) => (Some(seg), Some(off)),
            (None, Some((seg, off))) => (Some(seg as i64), Some(off as i64)),
            (None, None) => (None, None),
        };
        sqlx::query("UPDATE groups SET base_seq = ?, head_seq = ?, head_hash = ?, trimming_to = NULL, trimmed_end_segment = ?, trimmed_end_offset = ? WHERE id = ?")
            .bind(s)
            .bind(s)
            .bind(head_hash)
            .bind(end_segment)
            .bind(end_offset)
            .bind(group_id)
            .execute(&mut *conn)
            .await
            .map_err(err("move the group to the failover point"))?;
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
                "failovers",
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

    /// The volumes of a group, read inside the transaction.
    pub async fn volumes_of_group(&mut self, group_id: i64) -> Result<Vec<VolumeRow>> {
        let rows: Vec<VolumeTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {VOLUME_COLUMNS} FROM volumes WHERE group_id = ? ORDER BY agent_volume_id"
        )))
        .bind(group_id)
        .fetch_all(self.conn()?)
        .await
        .map_err(ReplicaError::catalog("list volumes"))?;
        rows.into_iter().map(volume_of).collect()
    }

    /// The group named `name`, read inside the transaction.
    pub async fn group_by_name(&mut self, name: &str) -> Result<Option<GroupRow>> {
        let row: Option<GroupTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {GROUP_COLUMNS} FROM groups WHERE name = ?"
        )))
        .bind(name)
        .fetch_optional(self.conn()?)
        .await
        .map_err(ReplicaError::catalog("read a group"))?;
        row.map(group_of).transpose()
    }

    /// Step (a) of the trim protocol: records the intent to move the base to `to`.
    pub async fn set_trimming_to(&mut self, group_id: i64, to: u64) -> Result<()> {
        sqlx::query("UPDATE groups SET trimming_to = ? WHERE id = ?")
            .bind(to as i64)
            .bind(group_id)
            .execute(self.conn()?)
            .await
            .map_err(ReplicaError::catalog("record the trimmer's intent"))?;
        Ok(())
    }

    /// See [`Catalog::finish_trim`].
    async fn finish_trim(&mut self, group_id: i64, to: u64) -> Result<Option<TrimDone>> {
        let err = ReplicaError::catalog;
        let g = self.group(group_id).await?;
        if g.trimming_to != Some(to) {
            return Ok(None);
        }
        let conn = self.conn()?;
        let base = g.base_seq as i64;
        let to_i = to as i64;
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
        let mut records = 0u64;
        let volume_ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM volumes WHERE group_id = ?")
            .bind(group_id)
            .fetch_all(&mut *conn)
            .await
            .map_err(err("list volumes"))?;
        for v in volume_ids {
            records += sqlx::query("DELETE FROM records WHERE volume_id = ? AND seq <= ?")
                .bind(v)
                .bind(to_i)
                .execute(&mut *conn)
                .await
                .map_err(err("delete trimmed records"))?
                .rows_affected();
        }
        sqlx::query("DELETE FROM batches WHERE group_id = ? AND seq < ?")
            .bind(group_id)
            .bind(to_i)
            .execute(&mut *conn)
            .await
            .map_err(err("delete trimmed batches"))?;
        sqlx::query(
            "UPDATE batches SET segment = NULL, position = NULL, length = NULL WHERE group_id = ? AND seq = ?",
        )
        .bind(group_id)
        .bind(to_i)
        .execute(&mut *conn)
        .await
        .map_err(err("mark the base batch as applied"))?;
        sqlx::query("DELETE FROM bookmarks WHERE group_id = ? AND seq < ?")
            .bind(group_id)
            .bind(to_i)
            .execute(&mut *conn)
            .await
            .map_err(err("delete trimmed bookmarks"))?;
        let (end_segment, end_offset) = match (end, g.trimmed_end) {
            (Some((s, o)), _) => (Some(s), Some(o)),
            (None, Some((s, o))) => (Some(s as i64), Some(o as i64)),
            (None, None) => (None, None),
        };
        sqlx::query("UPDATE groups SET base_seq = ?, trimming_to = NULL, trimmed_end_segment = ?, trimmed_end_offset = ? WHERE id = ?")
            .bind(to_i)
            .bind(end_segment)
            .bind(end_offset)
            .bind(group_id)
            .execute(&mut *conn)
            .await
            .map_err(err("advance the group's base"))?;
        Ok(Some(TrimDone {
            journal_bytes: journal_bytes.unwrap_or(0) as u64,
            batches: batches as u64,
            records,
        }))
    }
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        if !self.committed
            && let Some(mut conn) = self.conn.take()
        {
            // Closing the connection rolls back its open transaction; it is never reused.
            conn.close_on_drop();
        }
    }
}

/// The reads that resolve a recovery point, on the pool ([`Catalog`]) or inside a transaction
/// ([`WriteLock`]).
pub(crate) trait PointReads {
    async fn batch(&mut self, group_id: i64, seq: u64) -> Result<Option<BatchRow>>;
    /// See [`Catalog::consistent_batch`].
    async fn consistent_batch(
        &mut self,
        group_id: i64,
        from: u64,
        to: u64,
        time_ns_max: Option<i64>,
        latest: bool,
    ) -> Result<Option<BatchRow>>;
    async fn bookmark(&mut self, group_id: i64, name: &str) -> Result<Option<BatchRow>>;
    async fn failover(&mut self, group_id: i64) -> Result<Option<FailoverRow>>;
}

impl PointReads for Catalog {
    async fn batch(&mut self, group_id: i64, seq: u64) -> Result<Option<BatchRow>> {
        batch_on(&self.pool, group_id, seq).await
    }
    async fn consistent_batch(
        &mut self,
        group_id: i64,
        from: u64,
        to: u64,
        time_ns_max: Option<i64>,
        latest: bool,
    ) -> Result<Option<BatchRow>> {
        consistent_batch_on(&self.pool, group_id, from, to, time_ns_max, latest).await
    }
    async fn bookmark(&mut self, group_id: i64, name: &str) -> Result<Option<BatchRow>> {
        bookmark_on(&self.pool, group_id, name).await
    }
    async fn failover(&mut self, group_id: i64) -> Result<Option<FailoverRow>> {
        failover_on(&self.pool, group_id).await
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
        after: u64,
        upto: u64,
        cutoff_ns: i64,
    ) -> Result<Option<u64>>;
    /// See [`Catalog::batch_weights`].
    async fn batch_weights(
        &mut self,
        group_id: i64,
        after: u64,
        limit: u64,
    ) -> Result<Vec<BatchWeight>>;
    /// Journal bytes of the group's batches after seq `after`.
    async fn journal_bytes_after(&mut self, group_id: i64, after: u64) -> Result<u64>;
}

impl TrimReads for Catalog {
    async fn first_batch_since(
        &mut self,
        group_id: i64,
        after: u64,
        upto: u64,
        cutoff_ns: i64,
    ) -> Result<Option<u64>> {
        first_batch_since_on(&self.pool, group_id, after, upto, cutoff_ns).await
    }
    async fn batch_weights(
        &mut self,
        group_id: i64,
        after: u64,
        limit: u64,
    ) -> Result<Vec<BatchWeight>> {
        batch_weights_on(&self.pool, group_id, after, limit).await
    }
    async fn journal_bytes_after(&mut self, group_id: i64, after: u64) -> Result<u64> {
        journal_bytes_after_on(&self.pool, group_id, after).await
    }
}

impl TrimReads for WriteLock {
    async fn first_batch_since(
        &mut self,
        group_id: i64,
        after: u64,
        upto: u64,
        cutoff_ns: i64,
    ) -> Result<Option<u64>> {
        first_batch_since_on(self.conn()?, group_id, after, upto, cutoff_ns).await
    }
    async fn batch_weights(
        &mut self,
        group_id: i64,
        after: u64,
        limit: u64,
    ) -> Result<Vec<BatchWeight>> {
        batch_weights_on(self.conn()?, group_id, after, limit).await
    }
    async fn journal_bytes_after(&mut self, group_id: i64, after: u64) -> Result<u64> {
        journal_bytes_after_on(self.conn()?, group_id, after).await
    }
}

impl PointReads for WriteLock {
    async fn batch(&mut self, group_id: i64, seq: u64) -> Result<Option<BatchRow>> {
        batch_on(self.conn()?, group_id, seq).await
    }
    async fn consistent_batch(
        &mut self,
        group_id: i64,
        from: u64,
        to: u64,
        time_ns_max: Option<i64>,
        latest: bool,
    ) -> Result<Option<BatchRow>> {
        consistent_batch_on(self.conn()?, group_id, from, to, time_ns_max, latest).await
    }
    async fn bookmark(&mut self, group_id: i64, name: &str) -> Result<Option<BatchRow>> {
        bookmark_on(self.conn()?, group_id, name).await
    }
    async fn failover(&mut self, group_id: i64) -> Result<Option<FailoverRow>> {
        WriteLock::failover(self, group_id).await
    }
}

// ---- queries on the pool or on one connection ----

async fn volume_by_name_on<'e, E: sqlx::Executor<'e, Database = Sqlite>>(
    e: E,
    name: &str,
) -> Result<Option<VolumeRow>> {
    let row: Option<VolumeTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {VOLUME_COLUMNS} FROM volumes WHERE name = ?"
    )))
    .bind(name)
    .fetch_optional(e)
    .await
    .map_err(ReplicaError::catalog("read a volume"))?;
    row.map(volume_of).transpose()
}

async fn failover_on<'e, E: sqlx::Executor<'e, Database = Sqlite>>(
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

async fn batch_on<'e, E: sqlx::Executor<'e, Database = Sqlite>>(
    e: E,
    group_id: i64,
    seq: u64,
) -> Result<Option<BatchRow>> {
    let row: Option<BatchTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {BATCH_COLUMNS} FROM batches WHERE group_id = ? AND seq = ?"
    )))
    .bind(group_id)
    .bind(seq as i64)
    .fetch_optional(e)
    .await
    .map_err(ReplicaError::catalog("read a batch"))?;
    row.map(batch_of).transpose()
}

async fn consistent_batch_on<'e, E: sqlx::Executor<'e, Database = Sqlite>>(
    e: E,
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

async fn journal_bytes_after_on<'e, E: sqlx::Executor<'e, Database = Sqlite>>(
    e: E,
    group_id: i64,
    after: u64,
) -> Result<u64> {
    let n: Option<i64> = sqlx::query_scalar(
        "SELECT SUM(length) FROM batches WHERE group_id = ? AND seq > ? AND segment IS NOT NULL",
    )
    .bind(group_id)
    .bind(after as i64)
    .fetch_one(e)
    .await
    .map_err(ReplicaError::catalog("sum the journal"))?;
    Ok(n.unwrap_or(0) as u64)
}

async fn first_batch_since_on<'e, E: sqlx::Executor<'e, Database = Sqlite>>(
    e: E,
    group_id: i64,
    after: u64,
    upto: u64,
    cutoff_ns: i64,
) -> Result<Option<u64>> {
    let seq: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(seq) FROM batches WHERE group_id = ? AND seq > ? AND seq <= ? AND agent_ns >= ?",
        )
        .bind(group_id)
        .bind(after as i64)
        .bind(upto as i64)
        .bind(cutoff_ns)
        .fetch_one(e)
        .await
        .map_err(ReplicaError::catalog("find the window's start"))?;
    Ok(seq.map(|s| s as u64))
}

async fn batch_weights_on<'e, E: sqlx::Executor<'e, Database = Sqlite>>(
    e: E,
    group_id: i64,
    after: u64,
    limit: u64,
) -> Result<Vec<BatchWeight>> {
    let rows: Vec<(i64, Option<i64>, i64)> = sqlx::query_as(
            "SELECT seq, length, record_count FROM batches WHERE group_id = ? AND seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(group_id)
        .bind(after as i64)
        .bind(limit as i64)
        .fetch_all(e)
        .await
        .map_err(ReplicaError::catalog("weigh batches"))?;
    Ok(rows
        .into_iter()
        .map(|(seq, length, records)| BatchWeight {
            seq: seq as u64,
            journal_bytes: length.unwrap_or(0) as u64,
            records: records as u64,
        })
        .collect())
}

async fn first_segment_on<'e, E: sqlx::Executor<'e, Database = Sqlite>>(
    e: E,
    group_id: i64,
    after: u64,
    upto: u64,
) -> Result<Option<u64>> {
    let n: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(segment) FROM batches WHERE group_id = ? AND seq > ? AND seq <= ? AND segment IS NOT NULL",
        )
        .bind(group_id)
        .bind(after as i64)
        .bind(upto as i64)
        .fetch_one(e)
        .await
        .map_err(ReplicaError::catalog("find the first journal segment"))?;
    Ok(n.map(|n| n as u64))
}

// ---- the verifier (migrations/0004_verifier.sql) ----

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
    pub seq: Option<u64>,
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
    pub seq: u64,
    pub found_ns: i64,
    pub reason: String,
    pub agent_hash: String,
    pub replica_hash: Option<String>,
    pub repaired_ns: Option<i64>,
    pub repaired_seq: Option<u64>,
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
        seq: t.3 as u64,
        found_ns: t.4,
        reason: t.5,
        agent_hash: t.6,
        replica_hash: t.7,
        repaired_ns: t.8,
        repaired_seq: t.9.map(|s| s as u64),
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
}

type RepairTuple = (i64, i64, String, i64, Option<i64>, Option<String>);

fn repair_of(t: RepairTuple) -> RepairRow {
    RepairRow {
        id: t.0,
        volume_id: t.1,
        state: t.2,
        requested_ns: t.3,
        ended_ns: t.4,
        message: t.5,
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
        .bind(r.seq.map(|s| s as i64))
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
        .bind(m.seq as i64)
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
    pub async fn mark_repaired(&self, id: i64, now_ns: i64, seq: u64) -> Result<()> {
        sqlx::query("UPDATE verify_mismatches SET repaired_ns = ?, repaired_seq = ? WHERE id = ? AND repaired_ns IS NULL")
            .bind(now_ns)
            .bind(seq as i64)
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
        after: u64,
        upto: u64,
    ) -> Result<Option<u64>> {
        let n: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(seq) FROM records WHERE volume_id = ? AND chunk = ? AND seq > ? AND seq <= ?",
        )
        .bind(volume_id)
        .bind(chunk as i64)
        .bind(after as i64)
        .bind(upto as i64)
        .fetch_one(&self.pool)
        .await
        .map_err(ReplicaError::catalog("read the journal index"))?;
        Ok(n.map(|s| s as u64))
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
        let row: Option<RepairTuple> = sqlx::query_as(
            "SELECT id, volume_id, state, requested_ns, ended_ns, message FROM repair_requests WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(ReplicaError::catalog("read a repair request"))?;
        Ok(row.map(repair_of))
    }

    /// Repair requests in `state`, oldest first.
    pub async fn repair_requests_in_state(&self, state: &str) -> Result<Vec<RepairRow>> {
        let rows: Vec<RepairTuple> = sqlx::query_as(
            "SELECT id, volume_id, state, requested_ns, ended_ns, message FROM repair_requests WHERE state = ? ORDER BY id",
        )
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
        sqlx::query("UPDATE repair_requests SET state = ?, message = ?, ended_ns = ? WHERE id = ?")
            .bind(state)
            .bind(message)
            .bind(ended)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(ReplicaError::catalog("update a repair request"))?;
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

    /// Test-only fault injection ("a journal record lost"): deletes the record rows of a
    /// chunk of a volume with seq in `(after, upto]`; returns how many.
    #[doc(hidden)]
    pub async fn delete_records_of_chunk_for_test(
        &self,
        volume_id: i64,
        chunk: u64,
        after: u64,
        upto: u64,
    ) -> Result<u64> {
        Ok(sqlx::query(
            "DELETE FROM records WHERE volume_id = ? AND chunk = ? AND seq > ? AND seq <= ?",
        )
        .bind(volume_id)
        .bind(chunk as i64)
        .bind(after as i64)
        .bind(upto as i64)
        .execute(&self.pool)
        .await
        .map_err(ReplicaError::catalog("delete records"))?
        .rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconstruct::{Plan, RecordRef, Source};
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
        let catalog = Catalog::open(&dir.path().join("meta.db"), true, true)
            .await
            .unwrap();
        let g = catalog
            .create_group("g", "agent", "gen", 0, &Retention::default(), 0)
            .await
            .unwrap();
        let batches: Vec<BatchRow> = (1..=1000u64)
            .map(|seq| BatchRow {
                seq,
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
                head_seq: 1000,
                batches,
                ..CommitRows::default()
            })
            .await
            .unwrap();
        let seqs = |rows: Vec<BatchRow>| rows.iter().map(|b| b.seq).collect::<Vec<_>>();
        let newest = PointsFilter {
            limit: Some(3),
            newest_first: true,
            ..PointsFilter::default()
        };
        assert_eq!(
            seqs(catalog.points_page(g.id, 10, 1000, &newest).await.unwrap()),
            [1000, 999, 998]
        );
        let f = PointsFilter {
            since_ns: Some(500_000),
            until_ns: Some(503_000),
            ..PointsFilter::default()
        };
        assert_eq!(
            seqs(catalog.points_page(g.id, 10, 1000, &f).await.unwrap()),
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
            seqs(catalog.points_page(g.id, 150, 1000, &f).await.unwrap()),
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
                        Some((r.seq, r.idx, p.offset - base)),
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
        let catalog = Catalog::open(&dir.path().join("meta.db"), true, true)
            .await
            .unwrap();
        let g = catalog
            .create_group("g", "agent", "gen", 0, &Retention::default(), 0)
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
                    seq,
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
                head_seq: 60,
                records,
                ..CommitRows::default()
            })
            .await
            .unwrap();
        for (after, upto) in [(0, 60), (0, 30), (10, 60), (59, 60), (0, 1), (30, 30)] {
            for (first, end) in [(0, 4), (1, 2), (0, 1), (2, 4), (3, 4)] {
                let every: Vec<RecordRow> = catalog
                    .records_in_seq_order(v.id, after, upto)
                    .await
                    .unwrap()
                    .into_iter()
                    .filter(|r| r.chunk >= first && r.chunk < end)
                    .collect();
                let some = catalog
                    .records_in_chunks(
                        v.id,
                        after,
                        upto,
                        first,
                        end,
                        crate::hashes::chunk_len_of(size),
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
