//! The write pipeline of one consistency group: every write, trim and zero-write of every
//! volume of the group gets its place in one log, is applied to its device, and is recorded in
//! log order in the group's batcher, whose sealed batches go to the spool.
//!
//! **Write-order fidelity** (DESIGN 3.1). An operation is *admitted* synchronously, in the order
//! the NBD server reads requests: it takes its place in its volume's range lock. It then waits
//! for every earlier overlapping operation, does its device I/O, and — still holding its place —
//! pushes its records to the batcher and releases its place. So overlapping operations reach
//! both the device and the log in admission order, and disjoint ones, which commute, may
//! complete in any order. Replaying the log in order over any earlier state therefore yields
//! the device's state at every later batch boundary. A record is pushed before the client's
//! reply, so every replied write is in the batch sealed by a later FLUSH.
//!
//! FLUSH and FUA cut the batch, then make the device and the spool durable up to the cut
//! before the reply; the two syncs run at once.
//!
//! **Never losing a write** (DESIGN 3.4). Before a write reaches the device, its chunks are
//! durably in the volume's activity log, so that after a crash the chunks whose writes may be
//! on the device but not in the spool are known. When the spool reaches its cap the group
//! *overflows*: the open batch is sealed, and from then on a write marks its chunks in the
//! dirty map instead of being recorded (the client never waits for the link or the replica).
//! Once the link is up and the spool has drained, the resync reads every dirty chunk through
//! the ordered log. While a volume is syncing, overflowing or has dirty chunks, batches are
//! sealed as not consistent; the batch that completes the resync is consistent again.
//!
//! Epochs: each volume's writes belong to an epoch that a flush of the volume ends; a chunk
//! may leave the activity log once its last write is in an epoch whose flush completed.
//!
//! This module holds the core: the group, its volumes, admission, recording
//! (`Place::complete`), cutting and making durable. The operations are split by caller:
//! `client` (the NBD client's writes, zero-writes, reads, flushes and bookmarks, and the age
//! cutter), `sync` (initial syncs, dirty-region and hash-compare resyncs, and what ends an
//! overflow or follows a rebase) and `verify` (the replica verifier's questions and repairs).

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use cdp_shared::batch::{self, RecordEncoder};
use cdp_shared::cause::{Cause, Primary};
use cdp_shared::nbd::{ExportError, ExportResult};
use cdp_shared::types::{CHUNK_BYTES, Seq, VolumeId};
use tokio::sync::{Notify, watch};

use crate::activity_log::{ActivityLog, AlFile};
use crate::batcher::{Batcher, BatcherConfig, SealedBatch};
use crate::clock::now_ns;
use crate::device::BlockDev;
use crate::dirty_map::{CountMismatch, DirtyMap};
use crate::fsutil::remove_if_exists;
use crate::range_lock::{Latch, RangeLock, Ticket};
use crate::spool::Spool;

mod client;
mod sync;
mod verify;

pub use client::INLINE_WRITE_BYTES_MAX;
pub use sync::SyncDone;

thread_local! {
    static ENCODER: RefCell<RecordEncoder> = RefCell::new(RecordEncoder::new());
}

/// A protected volume inside its group.
pub struct Volume {
    pub id: VolumeId,
    pub name: String,
    pub dev: Arc<dyn BlockDev>,
    pub size: u64,
    /// Chunks done by the running sync or resync (for progress).
    pub sync_chunks_done: AtomicU64,
    /// Chunks the running sync or resync has to go through.
    pub sync_chunks_total: AtomicU64,
    /// Whether the volume is inside its initial sync.
    pub syncing: AtomicBool,
    /// When the running sync or resync started (agent time), for its ETA.
    pub sync_started_ns: AtomicI64,
    /// Bytes of resync records pushed (dirty-chunk and hash-compare resyncs).
    pub resync_bytes_sent: AtomicU64,
    /// Bytes the NBD clients wrote (writes, not zero-writes or trims) since the start.
    pub written_bytes: AtomicU64,
    /// The seq of the batch that ended this volume's initial sync in this run; 0 when none
    /// did, or a rebase came after it (its seqs then name another chain). Set and cleared
    /// under the maintenance queue's lock.
    pub synced_at: AtomicU64,
}

impl Volume {
    pub fn new(id: VolumeId, name: &str, dev: Arc<dyn BlockDev>) -> Volume {
        Volume {
            id,
            name: name.to_owned(),
            size: dev.size(),
            dev,
            sync_chunks_done: AtomicU64::new(0),
            sync_chunks_total: AtomicU64::new(0),
            syncing: AtomicBool::new(false),
            sync_started_ns: AtomicI64::new(0),
            resync_bytes_sent: AtomicU64::new(0),
            written_bytes: AtomicU64::new(0),
            synced_at: AtomicU64::new(0),
        }
    }

    /// Starts counting a sync or resync of `total` chunks.
    pub(crate) fn start_progress(&self, total: u64) {
        self.sync_chunks_done.store(0, Ordering::Relaxed);
        self.sync_chunks_total.store(total, Ordering::Relaxed);
        self.sync_started_ns.store(now_ns(), Ordering::Relaxed);
    }

    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(CHUNK_BYTES)
    }

    fn chunk_len(&self, chunk: u64) -> u64 {
        CHUNK_BYTES.min(self.size - chunk * CHUNK_BYTES)
    }
}

/// How a group is run.
#[derive(Clone, Debug)]
pub struct GroupOptions {
    pub batcher: BatcherConfig,
    /// Cap of the spool; above it the group overflows to its dirty maps.
    pub spool_bytes_max: u64,
    /// Chunks each volume's activity log holds before it evicts.
    pub al_capacity: usize,
    /// Where the activity logs (`<volume>.al.N`) and dirty maps (`<volume>.dirty`) live.
    pub state_dir: PathBuf,
    /// The group's RPO target: a lag above it is an `rpo-breach`.
    pub rpo_target: std::time::Duration,
}

struct VolState {
    lock: RangeLock,
    al: ActivityLog,
    dirty: DirtyMap,
    /// Why `dirty` holds chunks: the first cause since it was last empty (a `resyncing/*`
    /// cause; meaningless while it is empty).
    dirty_cause: Cause,
    /// Whether `dirty` changed since it was last saved.
    dirty_changed: bool,
    /// The open epoch of this volume's writes, and the last one whose flush completed.
    epoch: u64,
    durable_epoch: u64,
    /// An initial sync of this volume is due and has not begun: the replica refuses records of
    /// a volume before its `SyncBegin`, so client writes are not logged (they are on the
    /// device, and the sync reads every chunk after its `SyncBegin`).
    awaiting_sync: bool,
}

impl VolState {
    /// Marks dirty the chunks of `length` bytes at `offset` (a zero length names its chunk),
    /// within a volume of `size` bytes; nothing past its end. Returns whether any bit was new.
    fn mark_extent(&mut self, size: u64, offset: u64, length: u32) -> bool {
        if offset >= size {
            return false;
        }
        let last = (offset + u64::from(length).max(1) - 1).min(size - 1);
        let mut new = false;
        for c in offset / CHUNK_BYTES..=last / CHUNK_BYTES {
            new |= self.dirty.set(c);
        }
        new
    }

    /// Chunks are about to be marked dirty for `cause`: it becomes the map's cause if the
    /// map is empty (a map keeps the first cause until its resync empties it).
    fn note_dirty_cause(&mut self, cause: Cause) {
        if self.dirty.count() == 0 {
            self.dirty_cause = cause;
        }
    }
}

struct Inner {
    vols: Vec<VolState>,
    batcher: Batcher,
    /// Initial syncs and hash-compare resyncs running.
    syncing: usize,
    /// Since when the spool is over its cap (writes go to the dirty maps).
    overflow_since: Option<i64>,
}

impl Inner {
    fn inconsistent(&self) -> bool {
        self.syncing > 0
            || self.overflow_since.is_some()
            || self
                .vols
                .iter()
                .any(|v| v.dirty.count() > 0 || v.awaiting_sync)
    }

    /// Dirty chunks over all volumes (derived from the maps, not kept apart).
    fn dirty_total(&self) -> u64 {
        self.vols.iter().map(|v| v.dirty.count()).sum()
    }

    /// The same, each map's count checked against its bits first (the paired assertion that
    /// guards every resync decision; see [`DirtyMap::check`]).
    fn dirty_total_checked(&self) -> Result<u64, CountMismatch> {
        self.vols.iter().map(|v| v.dirty.check()).sum()
    }

    fn mark_dirty(&mut self, volume: VolumeId, first: u64, last: u64, cause: Cause) {
        let v = &mut self.vols[volume as usize];
        v.note_dirty_cause(cause);
        for c in first..=last {
            if v.dirty.set(c) {
                v.dirty_changed = true;
            }
        }
    }
}

/// Work the group's maintenance task has to do (see `maintenance`).
#[derive(Debug, Default)]
pub struct Pending {
    /// Volumes that need an initial sync.
    pub initial_sync: std::collections::BTreeSet<VolumeId>,
    /// Volumes that need a hash-compare resync.
    pub compare: std::collections::BTreeSet<VolumeId>,
    /// Hash-compare resyncs completed so far, and the last one's (compared, sent) chunks.
    pub compares_done: u64,
    pub last_compare: Option<(VolumeId, u64, u64)>,
}

/// What happened to the group, for `status`.
#[derive(Clone, Debug, Default)]
pub struct GroupState {
    pub overflow_since_ns: Option<i64>,
    pub dirty_chunks: Vec<u64>,
    /// Why each volume's dirty chunks are dirty (meaningful where its count is not 0).
    pub dirty_causes: Vec<Cause>,
    pub inconsistent: bool,
    pub open_since_ns: Option<i64>,
}

/// A point cut in the group's log: the batch sealed by a flush, a bookmark or the end of a
/// sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cut {
    /// The seq that covers every record pushed before the cut.
    pub seq: Seq,
    /// Whether the point is consistent (no volume of the group dirty or in a sync).
    pub consistent: bool,
    /// The epoch ended for each volume the cut named, in their order (none for a sync's
    /// point).
    pub ended: Vec<u64>,
    /// The group's rebases so far: a wait for this point ends at the next one too (the
    /// point's batch may be gone, and the new chain may never reach its seq).
    pub rebases: u64,
}

/// How a wait for a seq to be durable in the spool ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durable {
    /// The seq's batch is durable in the spool.
    Reached,
    /// The group rebased meanwhile ([`Group::rebase`]): the seq's batch was dropped with the
    /// old chain, and what it held is sent again by the resyncs the rebase queued.
    Rebased,
}

/// One consistency group: its volumes, its log and its spool.
pub struct Group {
    pub name: String,
    pub volumes: Vec<Arc<Volume>>,
    inner: Mutex<Inner>,
    pub spool: Spool,
    options: GroupOptions,
    al_files: Vec<tokio::sync::Mutex<AlFile>>,
    age_notify: Notify,
    /// The newest seq the replica has acknowledged as durable (set by the sender).
    pub acked: watch::Sender<Seq>,
    /// Bumped whenever a background task may have something to do (an ack, the end of an
    /// overflow, new dirty chunks, the link coming up).
    pub wake: watch::Sender<u64>,
    /// Records pushed, for status.
    pub records_total: AtomicU64,
    /// Batches and bytes handed to the link's streams (resends included), since the start.
    pub sent_batches: AtomicU64,
    pub sent_bytes: AtomicU64,
    pending: Mutex<Pending>,
    /// Times the group continued after the replica's head ([`Group::rebase`]), changed only
    /// under the group's lock: a batch sealed before a rebase may have been dropped from the
    /// spool, and the new chain may never reach its seq, so whoever waits for a seq (a flush,
    /// a sync's end, `bookmark --wait`) also watches this, and a sync or resync that saw one
    /// is void (its records may be gone) and runs again.
    rebased: watch::Sender<u64>,
    /// The replica is primary for the group (it is failed over there, as the link last heard):
    /// the group's exports are read-only meanwhile. In memory only: a restarted agent learns
    /// it again at its Hello.
    replica_primary: AtomicBool,
}

/// An admitted operation's place in its range lock; released on drop so that an operation
/// that fails (or whose task is dropped) never blocks later ones. A write's place also holds
/// its chunks in the activity log.
struct Place {
    group: Arc<Group>,
    volume: VolumeId,
    ticket: Option<Ticket>,
    /// For writes: the chunks it covers.
    write_chunks: Option<(u64, u64)>,
}

/// How a completed operation is recorded.
enum Recorded<'a> {
    /// A client write: its records, or (while overflowing) its chunks marked dirty.
    Write(&'a [u8], u32),
    /// A sync or resync read of one chunk; clears the chunk's dirty bit when recorded.
    Sync(&'a [u8], u64),
}

impl Place {
    /// Records the operation and releases its place, atomically with respect to the other
    /// operations of the group. Returns whether its records went into the log.
    fn complete(mut self, what: Recorded<'_>) -> bool {
        let group = self.group.clone();
        let mut inner = group.lock();
        if inner.vols[self.volume as usize].awaiting_sync {
            // A client write is on the device already, and the volume's initial sync, not
            // begun yet, copies it. A sync read here belongs to a sync that starts again from
            // the beginning (the replica lost what it had received of it).
            self.release(&mut inner);
            return false;
        }
        let (encoded, records, sync) = match what {
            Recorded::Write(e, n) => (e, n, false),
            Recorded::Sync(e, _) => (e, 1, true),
        };
        let mut logged = false;
        if records > 0 && inner.overflow_since.is_none() {
            let over =
                group.spool.held_bytes() + inner.batcher.open_bytes() as u64 + encoded.len() as u64;
            if over > group.options.spool_bytes_max {
                group.enter_overflow(&mut inner);
            }
        }
        if records > 0 && inner.overflow_since.is_none() {
            let was_empty = inner.batcher.is_empty();
            if let Recorded::Sync(_, chunk) = what {
                let v = &mut inner.vols[self.volume as usize];
                if v.dirty.clear(chunk) {
                    v.dirty_changed = true;
                }
            }
            let inconsistent = inner.inconsistent();
            let sealed = inner.batcher.push(
                encoded,
                records,
                sync,
                inconsistent,
                Instant::now(),
                now_ns(),
            );
            group.to_spool(sealed);
            if was_empty {
                group.age_notify.notify_one();
            }
            group
                .records_total
                .fetch_add(u64::from(records), Ordering::Relaxed);
            logged = true;
        } else if let Recorded::Sync(_, chunk) = what {
            // A sync read that cannot be recorded now (overflow) is read again later.
            inner.mark_dirty(self.volume, chunk, chunk, Cause::ResyncingOverflow);
        } else if let Some((first, last)) = self.write_chunks {
            inner.mark_dirty(self.volume, first, last, Cause::ResyncingOverflow);
        }
        self.release(&mut inner);
        logged
    }

    fn release(&mut self, inner: &mut Inner) {
        let v = &mut inner.vols[self.volume as usize];
        if let Some((first, last)) = self.write_chunks.take() {
            let epoch = v.epoch;
            v.al.end(first, last, epoch);
        }
        if let Some(t) = self.ticket.take() {
            v.lock.release(t);
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if self.ticket.is_some() {
            let group = self.group.clone();
            let mut inner = group.lock();
            // A write that failed (or was dropped) may have reached part of the device: its
            // chunks are resynced.
            if let Some((first, last)) = self.write_chunks {
                inner.mark_dirty(self.volume, first, last, Cause::ResyncingWriteError);
            }
            self.release(&mut inner);
        }
    }
}

fn blocking_err(e: tokio::task::JoinError) -> ExportError {
    ExportError::Io(format!("I/O task failed: {e}"))
}

fn io_err(what: &str) -> impl FnOnce(std::io::Error) -> ExportError + '_ {
    move |e| ExportError::Io(format!("{what}: {e}"))
}

/// What `Group::new` found on disk.
pub struct Recovery {
    /// Chunks found in activity logs (an unclean stop): now dirty.
    pub al_chunks: u64,
    /// Dirty chunks in all, after merging.
    pub dirty_chunks: u64,
}
impl Group {
    /// A group whose volumes are indexed by id (`volumes[i].id == i`), continuing its log after
    /// `last_seq` (whose header hash is `last_hash`). Loads each volume's dirty map and activity
    /// log: chunks left in an activity log (an unclean stop) become dirty, the merged map is
    /// saved, and the activity log starts empty.
    pub fn new(
        name: &str,
        volumes: Vec<Arc<Volume>>,
        spool: Spool,
        options: GroupOptions,
        last_seq: Seq,
        last_hash: batch::Hash,
    ) -> std::io::Result<(Arc<Group>, Recovery)> {
        let mut vols = Vec::new();
        let mut al_files = Vec::new();
        let mut recovery = Recovery {
            al_chunks: 0,
            dirty_chunks: 0,
        };
        std::fs::create_dir_all(&options.state_dir)?;
        for (i, v) in volumes.iter().enumerate() {
            assert_eq!(v.id as usize, i, "volume ids are dense indexes");
            let dirty_path = options.state_dir.join(format!("{}.dirty", v.name));
            // Chunks carried over from the last run (a clean stop with a resync still to
            // do), unless the map was lost or the activity log names more (a crash).
            let (mut dirty, mut dirty_cause) = match DirtyMap::load(&dirty_path, v.chunks()) {
                Ok(m) => (m, Cause::ResyncingAfterRestart),
                Err(e) => {
                    tracing::warn!(volume = %v.name, "{e}; the whole volume will be resynced");
                    let mut m = DirtyMap::new(v.chunks());
                    m.set_all();
                    (m, Cause::ResyncingAfterCrash)
                }
            };
            let (mut al_file, al_chunks) = AlFile::open(&options.state_dir.join(&v.name))?;
            for c in al_chunks.iter().filter(|c| **c < v.chunks()) {
                if dirty.set(*c) {
                    recovery.al_chunks += 1;
                    dirty_cause = Cause::ResyncingAfterCrash;
                }
            }
            // The paired assertion at load: the count that decides the resync follows the bits.
            recovery.dirty_chunks += dirty.check().map_err(std::io::Error::other)?;
            if !al_chunks.is_empty() {
                dirty.save(&dirty_path)?;
                al_file.write(&[])?;
            }
            vols.push(VolState {
                lock: RangeLock::new(),
                al: ActivityLog::new(options.al_capacity, &[]),
                dirty,
                dirty_cause,
                dirty_changed: false,
                epoch: 1,
                durable_epoch: 0,
                awaiting_sync: false,
            });
            al_files.push(tokio::sync::Mutex::new(al_file));
        }
        let (acked, _) = watch::channel(Seq(0));
        let (wake, _) = watch::channel(0);
        let group = Arc::new(Group {
            name: name.to_owned(),
            volumes,
            inner: Mutex::new(Inner {
                vols,
                batcher: Batcher::new(name, options.batcher.clone(), last_seq, last_hash),
                syncing: 0,
                overflow_since: None,
            }),
            spool,
            options,
            al_files,
            age_notify: Notify::new(),
            acked,
            wake,
            records_total: AtomicU64::new(0),
            sent_batches: AtomicU64::new(0),
            sent_bytes: AtomicU64::new(0),
            pending: Mutex::new(Pending::default()),
            rebased: watch::channel(0).0,
            replica_primary: AtomicBool::new(false),
        });
        Ok((group, recovery))
    }

    /// Which side is primary for the group, as the link last heard from the replica.
    pub fn primary(&self) -> Primary {
        if self.replica_primary.load(Ordering::Acquire) {
            Primary::Replica
        } else {
            Primary::Agent
        }
    }

    /// Records which side is primary (the link, from the replica's Welcome, Fenced and
    /// Joined); said once in the log when it changes. While the replica is, the group's
    /// exports refuse writes, trims and zero-writes (EPERM) and say they are read-only.
    pub fn set_primary(&self, primary: Primary) {
        let replica = primary == Primary::Replica;
        if self.replica_primary.swap(replica, Ordering::AcqRel) != replica {
            if replica {
                tracing::warn!(
                    group = %self.name,
                    "the replica is primary for group {} (it is failed over there): its volumes are served read-only until the replica gives the group back",
                    self.name
                );
            } else {
                tracing::info!(group = %self.name, "this agent is primary for group {} again: its volumes are served read-write", self.name);
            }
            // Whoever waits for the group's acks (a `bookmark --wait`) looks again.
            self.bump();
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The maintenance work waiting.
    pub fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn bump(&self) {
        self.wake.send_modify(|v| *v += 1);
    }

    fn to_spool(&self, sealed: impl IntoIterator<Item = SealedBatch>) {
        for s in sealed {
            self.spool.append(s);
        }
    }

    /// The spool is full: seal what is open (the cap is exceeded by at most one batch) and
    /// send later writes to the dirty maps.
    fn enter_overflow(&self, inner: &mut Inner) {
        let sealed = inner.batcher.seal(0, None, true, now_ns());
        self.to_spool(sealed);
        inner.overflow_since = Some(now_ns());
        tracing::warn!(
            group = %self.name,
            spool_bytes = self.spool.held_bytes(),
            "the spool reached its cap of {} bytes: writes are now tracked as dirty regions and resynced when the replica catches up",
            self.options.spool_bytes_max
        );
        self.bump();
    }

    /// The RPO lag of the group at `now` given its state `gs`: the age of its oldest write not
    /// yet durable on the replica (in the spool, in the open batch, or tracked as dirty since
    /// an overflow began), 0 when there is none.
    pub fn lag_ms_at(&self, gs: &GroupState, now: i64) -> u64 {
        [
            self.spool.oldest_held_time_ns(),
            gs.open_since_ns,
            gs.overflow_since_ns,
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|t| (now.saturating_sub(t).max(0) / 1_000_000) as u64)
        .unwrap_or(0)
    }

    /// The group's spool cap (bytes).
    pub fn spool_bytes_max(&self) -> u64 {
        self.options.spool_bytes_max
    }

    /// The group's RPO target in milliseconds.
    pub fn rpo_target_ms(&self) -> u64 {
        u64::try_from(self.options.rpo_target.as_millis()).unwrap_or(u64::MAX)
    }

    /// The group's RPO lag now, for the replica ([`cdp_shared::wire::Control::Head`]): `None`
    /// while a volume of the group is in its initial sync (nothing to recover yet).
    pub fn rpo_lag_ms(&self) -> Option<u64> {
        if self
            .volumes
            .iter()
            .any(|v| v.syncing.load(Ordering::Relaxed))
        {
            return None;
        }
        Some(self.lag_ms_at(&self.state(), now_ns()))
    }

    /// The last sealed seq.
    pub fn last_sealed(&self) -> Seq {
        self.lock().batcher.last_sealed()
    }

    /// The last sealed seq and its header hash, read together.
    pub fn head(&self) -> (Seq, batch::Hash) {
        let inner = self.lock();
        (inner.batcher.last_sealed(), inner.batcher.last_hash())
    }

    /// A snapshot for `status`.
    pub fn state(&self) -> GroupState {
        let inner = self.lock();
        GroupState {
            overflow_since_ns: inner.overflow_since,
            dirty_chunks: inner.vols.iter().map(|v| v.dirty.count()).collect(),
            dirty_causes: inner.vols.iter().map(|v| v.dirty_cause).collect(),
            inconsistent: inner.inconsistent(),
            open_since_ns: inner.batcher.opened_ns(),
        }
    }

    /// Operations admitted to the range locks and not yet released, over all volumes.
    pub fn operations_in_flight(&self) -> usize {
        self.lock().vols.iter().map(|v| v.lock.in_flight()).sum()
    }

    /// Whether the group is overflowing.
    pub fn overflowing(&self) -> bool {
        self.lock().overflow_since.is_some()
    }

    /// How many times the group continued after the replica's head (see [`Group::rebase`]).
    pub fn rebases(&self) -> u64 {
        *self.rebased.borrow()
    }

    /// Dirty chunks over all volumes, each map's count checked against its bits: a count that
    /// disagrees stops the agent (see [`crate::stop_on_internal_error`]) instead of letting
    /// the caller skip a resync.
    pub fn dirty_total(&self) -> u64 {
        match self.lock().dirty_total_checked() {
            Ok(n) => n,
            Err(e) => crate::stop_on_internal_error(&format!("group {}: {e}", self.name)),
        }
    }

    fn admit(self: &Arc<Self>, volume: VolumeId, start: u64, end: u64) -> (Place, Vec<Latch>) {
        let (ticket, waits) = self.lock().vols[volume as usize].lock.admit(start, end);
        (
            Place {
                group: self.clone(),
                volume,
                ticket: Some(ticket),
                write_chunks: None,
            },
            waits,
        )
    }

    /// Admits a write (or zero-write or trim): its place in the range lock and its chunks in
    /// the activity log. Returns the activity-log version to make durable before the I/O.
    fn admit_write(
        self: &Arc<Self>,
        volume: VolumeId,
        start: u64,
        end: u64,
    ) -> (Place, Vec<Latch>, Option<u64>) {
        let first = start / CHUNK_BYTES;
        let last = (end - 1) / CHUNK_BYTES;
        let mut inner = self.lock();
        let v = &mut inner.vols[volume as usize];
        let (ticket, waits) = v.lock.admit(start, end);
        let durable_epoch = v.durable_epoch;
        let need = v.al.begin(first, last, durable_epoch);
        drop(inner);
        (
            Place {
                group: self.clone(),
                volume,
                ticket: Some(ticket),
                write_chunks: Some((first, last)),
            },
            waits,
            need,
        )
    }

    fn volume(&self, id: VolumeId) -> &Arc<Volume> {
        &self.volumes[id as usize]
    }

    /// Seals the open batch with `flags` (and a bookmark name): the point that now covers
    /// every record pushed so far. Ends the open epoch of `volumes` (see [`Cut::ended`]).
    fn cut(&self, flags: u16, bookmark: Option<&str>, volumes: &[VolumeId]) -> Cut {
        let mut inner = self.lock();
        // The paired assertion at a flush: whether this point is consistent depends on the
        // dirty counts, so they must be the bits'.
        if let Err(e) = inner.dirty_total_checked() {
            drop(inner);
            crate::stop_on_internal_error(&format!("group {}: {e}", self.name));
        }
        let ended = volumes
            .iter()
            .map(|v| {
                let vs = &mut inner.vols[*v as usize];
                vs.epoch += 1;
                vs.epoch - 1
            })
            .collect();
        let inconsistent = inner.inconsistent();
        let sealed = inner.batcher.seal(flags, bookmark, inconsistent, now_ns());
        self.to_spool(sealed);
        Cut {
            seq: inner.batcher.last_sealed(),
            consistent: !inconsistent,
            ended,
            rebases: *self.rebased.borrow(),
        }
    }

    /// Seals a point even if nothing is open (a sync or resync just ended: its last records may
    /// all sit in batches sealed as not consistent, and the point that says the group is
    /// consistent again must exist).
    fn cut_point(&self) -> Cut {
        let mut inner = self.lock();
        let inconsistent = inner.inconsistent();
        let sealed = inner.batcher.seal_always(0, None, inconsistent, now_ns());
        self.to_spool([sealed]);
        Cut {
            seq: inner.batcher.last_sealed(),
            consistent: !inconsistent,
            ended: Vec::new(),
            rebases: *self.rebased.borrow(),
        }
    }

    /// Saves the dirty maps that changed. Under the group lock only to take the snapshots.
    async fn save_dirty_maps(&self) -> ExportResult<()> {
        let mut todo = Vec::new();
        {
            let mut inner = self.lock();
            for (i, v) in inner.vols.iter_mut().enumerate() {
                if v.dirty_changed {
                    v.dirty_changed = false;
                    todo.push((
                        self.options
                            .state_dir
                            .join(format!("{}.dirty", self.volumes[i].name)),
                        v.dirty.clone(),
                        i,
                    ));
                }
            }
        }
        for (path, map, i) in todo {
            // The paired assertion at a flush: an empty map's file is removed, so its count
            // must be the bits'.
            if let Err(e) = map.check() {
                crate::stop_on_internal_error(&format!("volume {}: {e}", self.volumes[i].name));
            }
            let result = tokio::task::spawn_blocking(move || {
                if map.count() == 0 {
                    remove_if_exists(&path)
                } else {
                    map.save(&path)
                }
            })
            .await
            .map_err(blocking_err)?;
            if let Err(e) = result {
                self.lock().vols[i].dirty_changed = true;
                return Err(ExportError::Io(format!("save the dirty map: {e}")));
            }
        }
        Ok(())
    }

    /// Everything up to `seq` durable in the spool and the dirty maps saved; then the ended
    /// epochs are durable (for cuts whose devices need no sync; a flush uses
    /// `client::flush_cut`).
    async fn make_durable(
        &self,
        seq: Seq,
        rebases: u64,
        ended: &[(VolumeId, u64)],
    ) -> ExportResult<Durable> {
        let durable = self.spool_durable(seq, rebases).await?;
        if durable == Durable::Reached {
            self.end_epochs(ended);
        }
        Ok(durable)
    }

    /// Everything up to `seq` durable in the spool, and the dirty maps saved; or the group
    /// rebased since `rebases` (sampled under the group's lock with `seq`), and `seq`'s batch
    /// belongs to a chain the spool dropped: the wait ends then too, as [`Durable::Rebased`].
    async fn spool_durable(&self, seq: Seq, rebases: u64) -> ExportResult<Durable> {
        let mut rebased = self.rebased.subscribe();
        let durable = tokio::select! {
            r = self.spool.wait_durable(seq) => {
                r.map_err(|e| ExportError::Io(e.to_string()))?;
                Durable::Reached
            }
            _ = rebased.wait_for(|n| *n != rebases) => Durable::Rebased,
        };
        // A rebase racing a durable wait: the seq reached may be the new chain's.
        let durable = if self.rebases() != rebases {
            Durable::Rebased
        } else {
            durable
        };
        self.save_dirty_maps().await?;
        Ok(durable)
    }

    /// The ended epochs of a cut are durable: their chunks may leave the activity logs.
    fn end_epochs(&self, ended: &[(VolumeId, u64)]) {
        let mut inner = self.lock();
        for (v, e) in ended {
            let vs = &mut inner.vols[*v as usize];
            vs.durable_epoch = vs.durable_epoch.max(*e);
        }
    }
}

/// A group of one file-backed volume of `size` bytes in `dir` (spool and state included), for
/// the unit tests of the pipeline and of the tasks that drive it.
#[cfg(test)]
pub(crate) fn test_group(dir: &std::path::Path, size: u64) -> Arc<Group> {
    use crate::device::FileDev;
    let path = dir.join("vol0");
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(size))
        .expect("device");
    let vol = Volume::new(0, "vol0", Arc::new(FileDev::open(&path).expect("open")));
    let (spool, rec) = Spool::open(&dir.join("spool")).expect("spool");
    let options = GroupOptions {
        batcher: BatcherConfig::default(),
        spool_bytes_max: 1 << 30,
        al_capacity: 64,
        state_dir: dir.join("state"),
        rpo_target: std::time::Duration::from_secs(30),
    };
    let (g, _) = Group::new(
        "g",
        vec![Arc::new(vol)],
        spool,
        options,
        rec.last_seq,
        rec.last_hash,
    )
    .expect("group");
    g
}
