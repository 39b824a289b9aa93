//! The replica's error type: every variant renders as one sentence for the operator that names
//! the thing and what to do. Errors are logged where they are handled (the CLI prints them as
//! `error: ...`; the server logs the ones it survives), never where they are passed on.

use cdp_shared::types::Seq;
use std::io;
use std::path::PathBuf;

use cdp_shared::identity::IdentityError;

pub type Result<T, E = ReplicaError> = std::result::Result<T, E>;

/// A request the replica declines, with the one sentence that says why (to the operator or
/// the agent): nothing was changed. Unlike a [`ReplicaError`], the replica itself is fine.
/// (A fence refuses one group, with its cause, in the Welcome: `wire::GroupRefused`.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal(pub String);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for Refusal {
    fn from(reason: String) -> Refusal {
        Refusal(reason)
    }
}

impl From<Refusal> for String {
    fn from(r: Refusal) -> String {
        r.0
    }
}

/// The outcome of a request that may be declined: `Ok(Ok(t))` done, `Ok(Err(refusal))`
/// declined (nothing changed), `Err` the replica failed.
pub type Decided<T> = Result<std::result::Result<T, Refusal>>;

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("no replica in {}: run `cdp-replica init --data {}` first", dir.display(), dir.display())]
    NotInitialized { dir: PathBuf },

    #[error("a replica already exists in {}: use it as it is, or choose another --data directory", dir.display())]
    AlreadyInitialized { dir: PathBuf },

    #[error("another `cdp-replica serve` is already running on {}: stop it first, or use another --data directory", dir.display())]
    AlreadyServing { dir: PathBuf },

    #[error("no volume named {volume:?} on the replica in {}: run `cdp-replica status --data {}` to list the volumes", dir.display(), dir.display())]
    UnknownVolume { volume: String, dir: PathBuf },

    #[error("no group named {group:?} on the replica in {}: run `cdp-replica status --data {}` to see the groups (a group appears when its agent first connects)", dir.display(), dir.display())]
    UnknownGroup { group: String, dir: PathBuf },

    /// A retention setting that is not valid; the sentence says why and what is.
    #[error("{0}")]
    Retention(String),

    /// A reader lost its pin (its process stalled longer than the pin's time to live): what it
    /// read may have been trimmed meanwhile.
    #[error("{0}")]
    PinLost(String),

    /// A recovery point that cannot be restored; the sentence says why and what can be.
    #[error("{0}")]
    Point(String),

    #[error("{} already exists: remove it or choose another --out path (a block device is written in place)", path.display())]
    OutExists { path: PathBuf },

    #[error("{} is not a regular file or a block device: choose another --out path", path.display())]
    OutNotWritable { path: PathBuf },

    #[error("block device {} holds {device_bytes} bytes but volume {volume:?} needs {volume_bytes}: choose a larger device", path.display())]
    OutTooSmall {
        path: PathBuf,
        volume: String,
        device_bytes: u64,
        volume_bytes: u64,
    },

    #[error("the configuration file {} is invalid: {reason}; fix it or remove it to use the defaults", path.display())]
    Config { path: PathBuf, reason: String },

    #[error("the authorized agents file {} is invalid: {reason}; fix it or authorize the agents again", path.display())]
    AuthorizedAgents { path: PathBuf, reason: String },

    /// An authorization change that cannot be made (the replica's own fingerprint, an
    /// unknown or ambiguous agent); the sentence says why and what to do. Nothing changed.
    #[error("{0}")]
    Agent(String),

    /// A forget refused (a reader, a failover or a connected agent holds it) or cut short;
    /// the sentence names the holder and what to do.
    #[error("{0}")]
    Forget(String),

    #[error(transparent)]
    Identity(#[from] IdentityError),

    #[error("could not {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("the catalog (meta.db) could not {action}: {source}")]
    Catalog {
        action: &'static str,
        #[source]
        source: sqlx::Error,
    },

    #[error("the catalog (meta.db) schema could not be brought up to date: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),

    #[error("the catalog {} was written by an older cdp-replica: start `cdp-replica serve --data` on that directory once to bring it up to date", path.display())]
    CatalogOutdated { path: PathBuf },

    #[error("the catalog (meta.db) is inconsistent: {0}; restore the data directory from a backup")]
    CatalogCorrupt(String),

    #[error("the journal is damaged: {0}; restore the data directory from a backup")]
    JournalCorrupt(String),

    #[error("could not listen on {addr}: {source}; choose another --listen address")]
    Listen {
        addr: String,
        #[source]
        source: io::Error,
    },

    #[error("could not serve on the socket {}: {reason}; choose another --socket path", path.display())]
    ExportSocket { path: PathBuf, reason: String },

    /// A failover refused (or an ingest commit refused because its group is failed over);
    /// the sentence says why and what to do.
    #[error("{0}")]
    Failover(String),

    /// A group commit found its group failed over (the fence, see `failover`): nothing of it
    /// is committed. Handled inside ingest, never shown to an operator.
    #[error("ingest of a failed-over group: {0}")]
    Fenced(String),

    /// A group commit found a record of batch `seq` whose data fails its check (its hash, or
    /// its compression) while writing it to a target: only a damaged or faulty agent sends
    /// one, since the payload hash held. Handled inside ingest: the batch is refused (Nack),
    /// the commit undone, the batches before it committed again.
    #[error("batch {seq}: {reason}")]
    BadRecord { seq: Seq, reason: String },

    #[error("`cdp-replica serve` is not running on {}: `{command}` works through the running serve; start it (`cdp-replica serve --data {}`) and try again", dir.display(), dir.display())]
    NotServing { dir: PathBuf, command: &'static str },

    /// A verification or repair that could not be done or did not succeed; the sentence says
    /// what and what to do.
    #[error("{0}")]
    Verify(String),

    #[error("ingest stopped: {0}")]
    Ingest(String),

    #[error("a background task failed: {0}")]
    Task(String),
}

impl ReplicaError {
    pub fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> ReplicaError {
        let path = path.into();
        move |source| ReplicaError::Io {
            action,
            path,
            source,
        }
    }

    pub fn catalog(action: &'static str) -> impl FnOnce(sqlx::Error) -> ReplicaError {
        move |source| ReplicaError::Catalog { action, source }
    }

    /// Whether this is a full disk (ENOSPC, or a disk quota reached), which ingest waits out
    /// rather than stopping: a file write, an fsync (ext4 reports delayed-allocation ENOSPC
    /// there) or SQLite's `SQLITE_FULL`. Any other error, EIO above all, is not.
    pub fn is_disk_full(&self) -> bool {
        match self {
            ReplicaError::Io { source, .. } => matches!(
                rustix::io::Errno::from_io_error(source),
                Some(rustix::io::Errno::NOSPC | rustix::io::Errno::DQUOT)
            ),
            ReplicaError::Catalog {
                source: sqlx::Error::Database(e),
                ..
            } => e.code().is_some_and(|c| c == SQLITE_FULL),
            _ => false,
        }
    }
}

/// SQLite's result code for "database or disk is full".
const SQLITE_FULL: &str = "13";

impl From<tokio::task::JoinError> for ReplicaError {
    fn from(e: tokio::task::JoinError) -> Self {
        ReplicaError::Task(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_full_disk_is_waited_out() {
        let io = |errno: rustix::io::Errno| {
            ReplicaError::io("append to", "/d/journal/g/1.seg")(io::Error::from(errno))
        };
        assert!(io(rustix::io::Errno::NOSPC).is_disk_full());
        assert!(io(rustix::io::Errno::DQUOT).is_disk_full());
        assert!(!io(rustix::io::Errno::IO).is_disk_full());
        assert!(!io(rustix::io::Errno::ROFS).is_disk_full());
        assert!(!ReplicaError::JournalCorrupt("x".into()).is_disk_full());
        assert!(!ReplicaError::catalog("commit a batch")(sqlx::Error::PoolTimedOut).is_disk_full());
    }
}
