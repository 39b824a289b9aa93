//! The catalog: the only module that talks to SQLite (`meta.db`, schema in `migrations/`).
//!
//! It holds what is in the journal and where (groups, volumes, batches, records, bookmarks),
//! the agent links, what `serve` saw of each agent, and events. Connections use WAL journal mode and `synchronous = FULL` (an
//! ack depends on a commit being durable), a busy timeout so that readers in other processes
//! (`status`, `points`, `restore`) and the server share the file, and foreign keys. Only
//! `init` and `serve` apply migrations ([`Catalog::open`] with [`OpenMode::Create`] or
//! [`OpenMode::Migrate`]).
//!
//! All queries are runtime-checked (`sqlx::query`/`query_as`); integers are SQLite's i64 and
//! converted at this boundary. A catalog opened [`OpenMode::Existing`] must already have every
//! migration this build knows applied (otherwise: "start `serve` once to upgrade it").
//!
//! [`Catalog::write_lock`] takes SQLite's write lock (`BEGIN IMMEDIATE`) for a transaction that
//! reads, decides and writes: while it is held no other transaction commits, so reads made
//! meanwhile — on the lock's connection or on any other — see exactly the state the writes are
//! made against. Pins and the trimmer's intent are serialized with it (see `pins` and
//! `trimmer`).

use cdp_shared::types::Seq;
use std::path::Path;
use std::time::Duration;

use cdp_shared::batch::Hash;
use sqlx::Sqlite;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::error::{ReplicaError, Result};
use crate::journal::SegmentSpan;
use crate::retention::Retention;

mod failover;
mod forget;
mod groups;
mod journal_index;
mod pins;
mod trim;
mod verifier;

pub use failover::{FailoverCommitDone, FailoverRow, FailoverState};
pub use forget::{ForgetRequestRow, ForgetRows};
pub use groups::{AgentSeenRow, EventLevel, EventRow, LinkRow};
pub(crate) use journal_index::PointReads;
pub use journal_index::{CommitRows, PointsFilter};
pub use pins::{NewPin, PinRow};
pub use trim::TrimDone;
pub(crate) use trim::TrimReads;
pub use verifier::{
    COVERAGE_PERIOD, MismatchRow, NewVerifyResult, RepairRow, RunRow, VerifyCounts, VerifyOutcome,
};

/// The migrations this build applies (and requires of a catalog it opens).
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// How long a connection waits for another writer before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections in a pool (SQLite has one writer; readers share the rest).
pub const POOL_CONNECTIONS_MAX: u32 = 4;

/// State of a volume on the replica: the wire's type, stored as its name (`as_str`).
pub use cdp_shared::wire::VolumeState;

/// A volume state read from the catalog.
pub(crate) fn parse_volume_state(s: &str) -> Result<VolumeState> {
    match s {
        "new" => Ok(VolumeState::New),
        "syncing" => Ok(VolumeState::Syncing),
        "protecting" => Ok(VolumeState::Protecting),
        other => Err(ReplicaError::CatalogCorrupt(format!(
            "unknown volume state {other:?}"
        ))),
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupRow {
    pub id: i64,
    pub name: String,
    /// Fingerprint (hex) of the owning agent.
    pub owner: String,
    pub generation: String,
    pub base_seq: Seq,
    pub head_seq: Seq,
    pub head_hash: Option<Hash>,
    pub retention: Retention,
    /// The base a trim under way is moving to (step (a) of the trim protocol).
    pub trimming_to: Option<Seq>,
    /// Where the last trimmed journaled batch ended: (segment, offset).
    pub trimmed_end: Option<(u64, u64)>,
}

impl GroupRow {
    /// Where every window of the group starts at the earliest: the base, or the base a trim
    /// under way is moving to.
    pub fn window_floor(&self) -> Seq {
        self.base_seq.max(self.trimming_to.unwrap_or(Seq::ZERO))
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
    pub sync_done_seq: Option<Seq>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchRow {
    pub seq: Seq,
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
    pub seq: Seq,
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

fn hash_of(bytes: Option<Vec<u8>>) -> Result<Option<Hash>> {
    match bytes {
        None => Ok(None),
        Some(b) => Hash::try_from(b.as_slice())
            .map(Some)
            .map_err(|_| ReplicaError::CatalogCorrupt(format!("a hash of {} bytes", b.len()))),
    }
}

/// How [`Catalog::open`] opens `meta.db`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// The file must exist and have every migration this build knows applied (every command
    /// but `init` and `serve`).
    Existing,
    /// The file must exist; pending migrations are applied (`serve`).
    Migrate,
    /// The file is made if missing, and migrated (`init`).
    Create,
}

/// Handle on `meta.db` (a small connection pool; clone freely).
#[derive(Clone, Debug)]
pub struct Catalog {
    pool: SqlitePool,
}

impl Catalog {
    /// Opens `path` as `mode` says: [`OpenMode::Create`] makes the file if missing;
    /// [`OpenMode::Create`] and [`OpenMode::Migrate`] apply pending migrations (only `init` and
    /// `serve` do).
    pub async fn open(path: &Path, mode: OpenMode) -> Result<Catalog> {
        let (create, migrate) = match mode {
            OpenMode::Existing => (false, false),
            OpenMode::Migrate => (false, true),
            OpenMode::Create => (true, true),
        };
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
}

/// Where a catalog query runs: on the pool ([`Catalog`], which lends it one of its
/// connections) or on the write lock's connection, inside its transaction ([`WriteLock`]).
/// The reads both offer ([`PointReads`], [`TrimReads`]) are written once against it. Sealed in
/// a private module: only the catalog hands out executors.
mod executor {
    use super::{Catalog, Result, Sqlite, SqlitePool, WriteLock};

    pub trait Executes {
        /// What a query is executed on.
        type Executor<'c>: sqlx::Executor<'c, Database = Sqlite>
        where
            Self: 'c;

        /// The pool, or the lock's connection (an error once the lock has ended).
        fn executor(&mut self) -> Result<Self::Executor<'_>>;
    }

    impl Executes for Catalog {
        type Executor<'c> = &'c SqlitePool;

        fn executor(&mut self) -> Result<&SqlitePool> {
            Ok(&self.pool)
        }
    }

    impl Executes for WriteLock {
        type Executor<'c> = &'c mut sqlx::SqliteConnection;

        fn executor(&mut self) -> Result<&mut sqlx::SqliteConnection> {
            self.conn()
        }
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
