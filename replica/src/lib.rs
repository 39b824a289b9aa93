//! cdp-replica: the recovery side of cdp. It receives batches from agents over QUIC, keeps for
//! every protected volume a target disk and a journal, and reconstructs any recorded point.
//!
//! # Modules
//! * [`datadir`] — the data directory layout, `replica.toml`, `authorized_agents.toml`,
//!   `serve.lock`.
//! * [`catalog`] — `meta.db` (SQLite): the only module that talks to SQLite.
//! * [`journal`] — append-only segments, the only code that fsyncs them; written vs durable.
//! * [`target`] — the sparse target files.
//! * [`ingest`] — semantic checks (sans-IO), per-group ordering and group commit.
//! * [`server`] — the QUIC shell: handshake, control stream, batch streams.
//! * [`reconstruct`] — the reconstruction plan (sans-IO extent map) and `read_at` reader.
//! * [`recovery`] — resolving recovery points, `points`, `restore`.
//! * [`status`] — `status`.
//!
//! # The commit protocol (what makes a batch acknowledged)
//! A batch arrives alone on its own QUIC stream.
//! 1. The connection task reads it whole (bounded by `BATCH_BYTES_MAX`, into one buffer sized
//!    from its header) and checks it: header, header hash, exact length, payload hash (which
//!    covers every byte of every record), every record's structure; and that its group was
//!    announced in this connection's Hello. A failure is a `Nack` and one warning line; nothing
//!    is written. Record data hashes are checked wherever record data is decoded: records
//!    applied to a syncing volume's target in step 4, and every journal record read by
//!    reconstruction.
//! 2. The batch goes through a bounded channel to its group's ingest task, which keeps the
//!    journal in seq order: seq ≤ head is a duplicate (re-acked when its header hash equals the
//!    stored one, otherwise refused as a conflict); seq > head + 1 waits for the gap (at most
//!    `PENDING_BATCHES_MAX` batches / `PENDING_BYTES_MAX` bytes, beyond that `Nack`).
//! 3. When batch head + 1 is there, a group commit takes the run of in-order batches that are
//!    waiting (at most `GROUP_COMMIT_BYTES_MAX` bytes). Each is checked against the hash chain
//!    (`prev_hash` = header hash of the batch before it, when that is known) and against the
//!    group's volumes as they will be at its turn (volume ids, ranges, SyncBegin first /
//!    SyncEnd last, no byte change to a volume whose sync has not begun). A batch that fails is
//!    refused (`Nack`) before anything of it is written; the batches after it wait.
//! 4. For each batch in seq order: records of volumes in their initial sync are applied to
//!    the target files (pwrite; zero and trim punch holes); a batch that changes bytes of a
//!    protecting volume is appended whole, byte for byte, to the open journal segment
//!    (*written*).
//! 5. fdatasync the segment (and its directory when the segment is new), then fdatasync the
//!    target files written: the journal's *durable* position moves up to *written*.
//! 6. ONE SQLite transaction (WAL, synchronous=FULL): batch rows, record rows of protecting
//!    volumes (segment and position of each record header), bookmarks, volume state changes
//!    (SyncBegin: new → syncing; SyncEnd: syncing → protecting with sync_done_seq), and the
//!    group's head seq and head hash. **The commit of this transaction makes the batches
//!    durable**; nothing is acknowledged before it.
//! 7. `Ack { group, durable: head }` on the control stream of each connection that sent one of
//!    the batches.
//!
//! A failure in steps 4–6 (a write, an fsync, the commit) stops ingest and the server (an
//! fsync error is never retried: the process stops rather than acknowledge what may be lost).
//! On the next start, each group's journal is made to agree with the catalog: the tail of the
//! last committed segment past the last committed batch is truncated, and segments newer than
//! that one are deleted (both logged, and recorded as events). Target writes of a crashed
//! commit are redone when the agent resends the unacknowledged batches (applying them is
//! idempotent).
//!
//! # JSON output
//! `status --json`:
//! ```json
//! { "serving": true,
//!   "volumes": [ { "group": "db", "volume": "db-data",
//!                  "state": "protecting",        // syncing | protecting | disconnected
//!                  "volume_state": "protecting", // new | syncing | protecting
//!                  "connected": true, "size": 1073741824,
//!                  "window_first": { "seq": 12, "time": "2024-05-01T12:00:00.123Z" },
//!                  "window_last":  { "seq": 90, "time": "2024-05-01T12:05:00Z" },
//!                  "journal_bytes": 5242880, "head_seq": 90 } ] }
//! ```
//! `window_first`/`window_last` are `null` before the initial sync completes.
//!
//! `points --json`: an array, in seq order, of every batch of the volume's group in the
//! volume's window (from its `sync_done_seq` to the head):
//! ```json
//! [ { "seq": 12, "time": "2024-05-01T12:00:00.123Z", "received": "2024-05-01T12:00:00.125Z",
//!     "consistent": true, "flush": true, "bookmark": null, "records": 3 } ]
//! ```
//! Times are RFC 3339 in UTC; `time` is the agent's clock, `received` the replica's.
//!
//! `points --at POINT --json`: the one point `restore --at POINT` would choose:
//! `{ "seq": 90, "time": "...", "bookmark": null, "consistent": true }`.

pub mod catalog;
pub mod datadir;
pub mod error;
pub mod ingest;
pub mod journal;
pub mod reconstruct;
pub mod recovery;
pub mod server;
pub mod status;
pub mod target;

use std::fs;
use std::net::SocketAddr;
use std::path::Path;

use cdp_shared::identity::{Fingerprint, Identity};

pub use cdp_shared::point::PointSpec;
pub use error::{ReplicaError, Result};
pub use recovery::{
    ChosenPoint, PointInfo, RestoreSummary, open_image, points, resolve_point, restore,
};
pub use server::{Server, ServerHandle};
pub use status::{PointRef, StatusReport, VolumeStatus, status};

use crate::catalog::Catalog;
use crate::datadir::{AuthorizedAgent, DataDir};

/// Common name of the replica's certificate.
pub const CERT_COMMON_NAME: &str = "cdp-replica";

/// Now, as UTC nanoseconds since the Unix epoch.
pub fn now_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX)
}

/// Prepares a new data directory: configuration, identity, empty authorized agents list,
/// catalog. Refuses a directory that already holds a replica. Returns the fingerprint agents
/// must pin.
pub async fn init(root: &Path, listen: SocketAddr) -> Result<Fingerprint> {
    let dir = DataDir::new(root);
    if dir.catalog().exists() || root.join("identity").exists() {
        return Err(ReplicaError::AlreadyInitialized {
            dir: root.to_path_buf(),
        });
    }
    fs::create_dir_all(root).map_err(ReplicaError::io("create directory", root))?;
    let identity = Identity::generate(CERT_COMMON_NAME)?;
    identity.save(root)?;
    datadir::write_config(&dir, listen)?;
    if !dir.agents().exists() {
        datadir::write_agents(&dir, &[])?;
    }
    for d in [dir.journals(), dir.volumes()] {
        fs::create_dir_all(&d).map_err(ReplicaError::io("create directory", &d))?;
    }
    fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.lock())
        .map_err(ReplicaError::io("create", dir.lock()))?;
    // The catalog last: its presence marks a complete data directory.
    let catalog = Catalog::open(&dir.catalog(), true, true).await?;
    catalog.close().await;
    datadir::sync_dir(root)?;
    Ok(identity.fingerprint())
}

/// The replica's certificate fingerprint.
pub fn fingerprint(root: &Path) -> Result<Fingerprint> {
    Ok(DataDir::existing(root)?.identity()?.fingerprint())
}

/// Authorizes an agent (takes effect at its next handshake, also while `serve` runs).
/// Returns false when it was already authorized (its name is updated).
pub fn authorize(root: &Path, agent: Fingerprint, name: &str) -> Result<bool> {
    let dir = DataDir::existing(root)?;
    let mut agents = datadir::read_agents(&dir)?;
    let added = match agents.iter_mut().find(|a| a.fingerprint == agent) {
        Some(a) => {
            a.name = name.to_owned();
            false
        }
        None => {
            agents.push(AuthorizedAgent {
                fingerprint: agent,
                name: name.to_owned(),
            });
            true
        }
    };
    datadir::write_agents(&dir, &agents)?;
    Ok(added)
}

/// The listen address from `replica.toml` (defaults applied).
pub fn configured_listen(root: &Path) -> Result<SocketAddr> {
    let dir = DataDir::existing(root)?;
    Ok(datadir::load_config(&dir)?.listen)
}
