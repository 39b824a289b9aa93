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
//! FLUSH and FUA make the device and the spool durable before the reply and cut the batch.
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

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use cdp_shared::batch::{self, BatchFlags, RECORD_FLAG_SYNC, RecordEncoder, RecordKind};
use cdp_shared::nbd::{ExportError, ExportResult};
use cdp_shared::types::{CHUNK_BYTES, Seq, VolumeId, split_at_chunks};
use tokio::sync::{Notify, watch};

use crate::activity_log::{ActivityLog, AlFile};
use crate::batcher::{Batcher, BatcherConfig, SealedBatch};
use crate::clock::now_ns;
use crate::device::BlockDev;
use crate::dirty_map::{CountMismatch, DirtyMap};
use crate::fsutil::remove_if_exists;
use crate::range_lock::{Latch, RangeLock, Ticket, wait_all};
use crate::spool::Spool;

/// Writes up to this size run on the async worker; larger ones on the blocking pool.
pub const INLINE_WRITE_BYTES_MAX: usize = 64 << 10;

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
    /// Bytes of resync records pushed (dirty-chunk and hash-compare resyncs).
    pub resync_bytes_sent: AtomicU64,
    /// Set when a running initial sync must stop and start again from the beginning (the
    /// replica lost what it had received of it).
    pub restart_sync: AtomicBool,
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
            resync_bytes_sent: AtomicU64::new(0),
            restart_sync: AtomicBool::new(false),
        }
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
}

struct VolState {
    lock: RangeLock,
    al: ActivityLog,
    dirty: DirtyMap,
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

struct Inner {
    vols: Vec<VolState>,
    batcher: Batcher,
    /// Initial syncs and hash-compare resyncs running.
    syncing: usize,
    /// Since when the spool is over its cap (writes go to the dirty maps).
    overflow_since: Option<i64>,
    /// Times the group continued after the replica's head (`rebase`): a batch sealed before
    /// one may have been dropped from the spool, so a wait for its seq must not trust acks
    /// that come after.
    rebases: u64,
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

    fn mark_dirty(&mut self, volume: VolumeId, first: u64, last: u64) {
        let v = &mut self.vols[volume as usize];
        for c in first..=last {
            if v.dirty.set(c) {
                v.dirty_changed = true;
            }
        }
    }
}

/// Work the group's maintenance task has to do (see `resync`).
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
    pub inconsistent: bool,
    pub open_since_ns: Option<i64>,
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
    pending: Mutex<Pending>,
    /// When the open batch got its first record (for the RPO lag).
    open_since_ns: AtomicU64,
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
                group
                    .open_since_ns
                    .store(now_ns() as u64, Ordering::Relaxed);
                group.age_notify.notify_one();
            }
            group
                .records_total
                .fetch_add(u64::from(records), Ordering::Relaxed);
            logged = true;
        } else if let Recorded::Sync(_, chunk) = what {
            // A sync read that cannot be recorded now (overflow) is read again later.
            inner.mark_dirty(self.volume, chunk, chunk);
        } else if let Some((first, last)) = self.write_chunks {
            inner.mark_dirty(self.volume, first, last);
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
                inner.mark_dirty(self.volume, first, last);
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

/// Encodes a chunk read by a sync or resync: a zero record when it is all zeros.
fn encode_chunk(volume: VolumeId, start: u64, buf: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    if buf.iter().all(|b| *b == 0) {
        batch::encode_marker(
            volume,
            RecordKind::Zero,
            start,
            buf.len() as u32,
            RECORD_FLAG_SYNC,
            &mut out,
        );
    } else {
        ENCODER.with(|e| {
            e.borrow_mut()
                .encode_data(volume, start, buf, RECORD_FLAG_SYNC, &mut out)
        });
    }
    out
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
            let mut dirty = match DirtyMap::load(&dirty_path, v.chunks()) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(volume = %v.name, "{e}; the whole volume will be resynced");
                    let mut m = DirtyMap::new(v.chunks());
                    m.set_all();
                    m
                }
            };
            let (mut al_file, al_chunks) = AlFile::open(&options.state_dir.join(&v.name))?;
            for c in al_chunks.iter().filter(|c| **c < v.chunks()) {
                if dirty.set(*c) {
                    recovery.al_chunks += 1;
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
                rebases: 0,
            }),
            spool,
            options,
            al_files,
            age_notify: Notify::new(),
            acked,
            wake,
            records_total: AtomicU64::new(0),
            pending: Mutex::new(Pending::default()),
            open_since_ns: AtomicU64::new(0),
        });
        Ok((group, recovery))
    }

    /// Marks dirty, durably, every chunk that batches lost from the spool touched (see
    /// [`crate::spool::LostBatches`]): every chunk of every volume when some lost batch's
    /// records could not be read. Called at start, before anything is served. Returns the
    /// chunks newly marked.
    pub fn mark_lost(&self, lost: &crate::spool::LostBatches) -> std::io::Result<u64> {
        let mut inner = self.lock();
        let mut marked = 0;
        for (i, vol) in self.volumes.iter().enumerate() {
            let v = &mut inner.vols[i];
            let before = v.dirty.recount();
            if lost.unknown_extents {
                v.dirty.set_all();
            } else {
                for (volume, offset, length) in &lost.extents {
                    if *volume as usize == i && *offset < vol.size {
                        let last = (offset + u64::from(*length).max(1) - 1).min(vol.size - 1);
                        for c in offset / CHUNK_BYTES..=last / CHUNK_BYTES {
                            v.dirty.set(c);
                        }
                    }
                }
            }
            let after = v.dirty.check().map_err(std::io::Error::other)?;
            if after != before {
                marked += after - before;
                v.dirty
                    .save(&self.options.state_dir.join(format!("{}.dirty", vol.name)))?;
            }
        }
        Ok(marked)
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
            let header = match batch::decode_header(&s.bytes) {
                Ok(h) => h,
                Err(e) => panic!("the batcher sealed a batch that does not decode: {e}"),
            };
            self.spool
                .append(s, header.header_hash, header.agent_time_ns);
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

    /// The last sealed seq.
    pub fn last_sealed(&self) -> Seq {
        self.lock().batcher.last_sealed()
    }

    /// A snapshot for `status`.
    pub fn state(&self) -> GroupState {
        let inner = self.lock();
        let open = !inner.batcher.is_empty();
        GroupState {
            overflow_since_ns: inner.overflow_since,
            dirty_chunks: inner.vols.iter().map(|v| v.dirty.count()).collect(),
            inconsistent: inner.inconsistent(),
            open_since_ns: open.then(|| self.open_since_ns.load(Ordering::Relaxed) as i64),
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
        self.lock().rebases
    }

    /// Marks volumes whose initial sync is due: until it begins, their client writes are not
    /// logged (the replica refuses records of a volume before its `SyncBegin`; the sync copies
    /// those writes from the device), and the group's points are not consistent.
    pub fn await_initial_sync(&self, volumes: impl IntoIterator<Item = VolumeId>) {
        let mut inner = self.lock();
        for v in volumes {
            inner.vols[v as usize].awaiting_sync = true;
        }
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

    /// Makes the activity log of `volume` durable up to `version` (one write and one fdatasync
    /// for every admission waiting at that moment).
    async fn persist_al(self: &Arc<Self>, volume: VolumeId, version: u64) -> ExportResult<()> {
        let mut file = self.al_files[volume as usize].lock().await;
        let (current, chunks) = {
            let inner = self.lock();
            let al = &inner.vols[volume as usize].al;
            if al.is_persisted(version) {
                return Ok(());
            }
            al.snapshot()
        };
        let mut f = file.clone();
        let (f, result) = tokio::task::spawn_blocking(move || {
            let r = f.write(&chunks);
            (f, r)
        })
        .await
        .map_err(blocking_err)?;
        *file = f;
        result.map_err(io_err("write the activity log"))?;
        self.lock().vols[volume as usize].al.mark_persisted(current);
        Ok(())
    }

    fn volume(&self, id: VolumeId) -> &Arc<Volume> {
        &self.volumes[id as usize]
    }

    /// Writes `data` at `offset` of volume `volume`. Admission happens in this call; the
    /// returned future does the rest (see the module doc).
    pub fn write(
        self: &Arc<Self>,
        volume: VolumeId,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> impl Future<Output = ExportResult<()>> + Send + 'static + use<> {
        let len = data.len();
        let (place, waits, need) = self.admit_write(volume, offset, offset + len as u64);
        let group = self.clone();
        async move {
            wait_all(waits).await;
            if let Some(v) = need {
                group.persist_al(volume, v).await?;
            }
            let dev = group.volume(volume).dev.clone();
            let work = move || -> std::io::Result<(Vec<u8>, u32)> {
                dev.write_at(&data, offset)?;
                let mut out = Vec::with_capacity(data.len() + 64);
                let mut n = 0;
                ENCODER.with(|e| {
                    let mut e = e.borrow_mut();
                    for (at, len) in split_at_chunks(offset, data.len() as u64) {
                        let from = (at - offset) as usize;
                        e.encode_data(volume, at, &data[from..from + len as usize], 0, &mut out);
                        n += 1;
                    }
                });
                Ok((out, n))
            };
            // A small write into the page cache takes microseconds: handing it to the blocking
            // pool would cost more than doing it here.
            let (encoded, records) = if len <= INLINE_WRITE_BYTES_MAX {
                work()?
            } else {
                tokio::task::spawn_blocking(work)
                    .await
                    .map_err(blocking_err)??
            };
            place.complete(Recorded::Write(&encoded, records));
            if fua {
                group.flush_volume(volume).await
            } else {
                Ok(())
            }
        }
    }

    /// Zero-writes (`kind` Zero) or trims (`kind` Trim) a range. Both read back as zeros.
    pub fn zero(
        self: &Arc<Self>,
        volume: VolumeId,
        offset: u64,
        len: u64,
        kind: RecordKind,
        fua: bool,
    ) -> impl Future<Output = ExportResult<()>> + Send + 'static + use<> {
        debug_assert!(matches!(kind, RecordKind::Zero | RecordKind::Trim));
        let (place, waits, need) = self.admit_write(volume, offset, offset + len);
        let group = self.clone();
        async move {
            wait_all(waits).await;
            if let Some(v) = need {
                group.persist_al(volume, v).await?;
            }
            let dev = group.volume(volume).dev.clone();
            tokio::task::spawn_blocking(move || dev.zero_range(offset, len))
                .await
                .map_err(blocking_err)??;
            let mut out = Vec::new();
            let mut n = 0;
            for (at, piece) in split_at_chunks(offset, len) {
                batch::encode_marker(volume, kind, at, piece as u32, 0, &mut out);
                n += 1;
            }
            place.complete(Recorded::Write(&out, n));
            if fua {
                group.flush_volume(volume).await
            } else {
                Ok(())
            }
        }
    }

    /// Reads a range of a volume (not ordered against concurrent writes, as NBD allows).
    pub fn read(
        &self,
        volume: VolumeId,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = ExportResult<Vec<u8>>> + Send + 'static + use<> {
        let dev = self.volume(volume).dev.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; len as usize];
                dev.read_at(&mut buf, offset).map(|_| buf)
            })
            .await
            .map_err(blocking_err)?
            .map_err(ExportError::from)
        }
    }

    /// Seals the open batch with `flags` (and a bookmark name) and returns the seq that now
    /// covers every record pushed so far, and whether the point is consistent. Ends the open
    /// epoch of `volumes`, returning the epochs ended.
    fn cut(
        &self,
        flags: u16,
        bookmark: Option<&str>,
        volumes: &[VolumeId],
    ) -> (Seq, bool, Vec<u64>, u64) {
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
        (
            inner.batcher.last_sealed(),
            !inconsistent,
            ended,
            inner.rebases,
        )
    }

    /// Seals a point even if nothing is open (a sync or resync just ended: its last records may
    /// all sit in batches sealed as not consistent, and the point that says the group is
    /// consistent again must exist).
    fn cut_point(&self) -> (Seq, bool) {
        let mut inner = self.lock();
        let inconsistent = inner.inconsistent();
        let sealed = inner.batcher.seal_always(0, None, inconsistent, now_ns());
        self.to_spool([sealed]);
        (inner.batcher.last_sealed(), !inconsistent)
    }

    async fn sync_devices(&self, which: Vec<Arc<dyn BlockDev>>) -> ExportResult<()> {
        tokio::task::spawn_blocking(move || which.iter().try_for_each(|d| d.sync()))
            .await
            .map_err(blocking_err)??;
        Ok(())
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
    /// epochs are durable.
    async fn make_durable(&self, seq: Seq, ended: &[(VolumeId, u64)]) -> ExportResult<()> {
        self.spool
            .wait_durable(seq)
            .await
            .map_err(|e| ExportError::Io(e.to_string()))?;
        self.save_dirty_maps().await?;
        let mut inner = self.lock();
        for (v, e) in ended {
            let vs = &mut inner.vols[*v as usize];
            vs.durable_epoch = vs.durable_epoch.max(*e);
        }
        Ok(())
    }

    /// FLUSH on one volume: its device durable, the batch cut as a flush point, the spool
    /// (and, if any, the dirty maps) durable up to it.
    pub fn flush_volume(
        self: &Arc<Self>,
        volume: VolumeId,
    ) -> impl Future<Output = ExportResult<()>> + Send + 'static + use<> {
        let group = self.clone();
        async move {
            group
                .sync_devices(vec![group.volume(volume).dev.clone()])
                .await?;
            let (seq, _, ended, _) = group.cut(BatchFlags::FLUSH, None, &[volume]);
            group.make_durable(seq, &[(volume, ended[0])]).await
        }
    }

    fn all_volumes(&self) -> Vec<VolumeId> {
        self.volumes.iter().map(|v| v.id).collect()
    }

    /// Makes every device of the group durable and seals a batch named `name`; returns its seq,
    /// once it is durable in the spool, and whether it is a consistent point.
    pub async fn bookmark(self: &Arc<Self>, name: &str) -> ExportResult<(Seq, bool, u64)> {
        self.sync_devices(self.volumes.iter().map(|v| v.dev.clone()).collect())
            .await?;
        let all = self.all_volumes();
        let (seq, consistent, ended, rebases) = self.cut(BatchFlags::FLUSH, Some(name), &all);
        let ended: Vec<_> = all.into_iter().zip(ended).collect();
        self.make_durable(seq, &ended).await?;
        Ok((seq, consistent, rebases))
    }

    /// Seals the open batch and makes everything durable (used at a clean stop); then empties
    /// the activity logs, which only hold chunks of durable epochs now.
    pub async fn seal_and_sync(self: &Arc<Self>) -> ExportResult<Seq> {
        self.sync_devices(self.volumes.iter().map(|v| v.dev.clone()).collect())
            .await?;
        let all = self.all_volumes();
        let (seq, _, ended, _) = self.cut(BatchFlags::FLUSH, None, &all);
        let ended: Vec<_> = all.iter().copied().zip(ended).collect();
        self.make_durable(seq, &ended).await?;
        for v in all {
            let version = {
                let mut inner = self.lock();
                let vs = &mut inner.vols[v as usize];
                let durable = vs.durable_epoch;
                vs.al.retire_all(durable);
                vs.al.snapshot().0
            };
            self.persist_al(v, version).await?;
        }
        Ok(seq)
    }

    /// Cuts open batches when they reach their age limit, until `shutdown`. Cancellation-safe
    /// (it only seals under the lock).
    pub async fn run_age_cutter(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        loop {
            let notified = self.age_notify.notified();
            let deadline = self.lock().batcher.deadline();
            match deadline {
                Some(d) => tokio::select! {
                    _ = tokio::time::sleep_until(d.into()) => {}
                    _ = shutdown.cancelled() => return,
                },
                None => {
                    tokio::select! {
                        _ = notified => {}
                        _ = shutdown.cancelled() => return,
                    }
                    continue;
                }
            }
            let mut inner = self.lock();
            let inconsistent = inner.inconsistent();
            let sealed = inner
                .batcher
                .poll_age(Instant::now(), inconsistent, now_ns());
            self.to_spool(sealed);
        }
    }

    /// Waits until the group may add more sync or resync records: not overflowing, and fewer
    /// than `backlog_max` batches sealed but not acknowledged.
    async fn wait_for_room(&self, backlog_max: u64) -> ExportResult<()> {
        let mut wake = self.wake.subscribe();
        let mut acked = self.acked.subscribe();
        loop {
            if self.overflowing() {
                self.try_end_overflow();
            }
            let sealed = self.last_sealed().0;
            let ack = acked.borrow_and_update().0;
            if !self.overflowing()
                && sealed.saturating_sub(ack) < backlog_max
                && self.spool.held_bytes() < self.options.spool_bytes_max / 2
            {
                return Ok(());
            }
            tokio::select! {
                r = acked.changed() => r.map_err(|_| ExportError::Shutdown)?,
                r = wake.changed() => r.map_err(|_| ExportError::Shutdown)?,
            }
        }
    }

    /// Reads one chunk under the range lock and records it through the log as a sync record.
    /// `keep` decides from the chunk's bytes whether it is sent (a hash-compare resync skips
    /// chunks the replica already holds). `in_order`: the caller reads the next chunk next
    /// (initial sync, hash-compare resync), which is then read in while this one is
    /// recorded. The read leaves nothing cached ([`BlockDev::read_uncached`]). Returns the
    /// bytes of the records pushed.
    async fn sync_chunk(
        self: &Arc<Self>,
        volume: VolumeId,
        chunk: u64,
        in_order: bool,
        keep: impl FnOnce(&[u8]) -> bool + Send + 'static,
    ) -> ExportResult<u64> {
        let vol = self.volume(volume).clone();
        let start = chunk * CHUNK_BYTES;
        let len = vol.chunk_len(chunk);
        let then = (in_order && chunk + 1 < vol.chunks())
            .then(|| (start + CHUNK_BYTES, vol.chunk_len(chunk + 1)));
        let (place, waits) = self.admit(volume, start, start + len);
        wait_all(waits).await;
        let dev = vol.dev.clone();
        let encoded = tokio::task::spawn_blocking(move || -> std::io::Result<Option<Vec<u8>>> {
            let mut buf = vec![0u8; len as usize];
            dev.read_uncached(&mut buf, start, then)?;
            Ok(keep(&buf).then(|| encode_chunk(volume, start, &buf)))
        })
        .await
        .map_err(blocking_err)??;
        match encoded {
            Some(e) => {
                let n = e.len() as u64;
                Ok(if place.complete(Recorded::Sync(&e, chunk)) {
                    n
                } else {
                    0
                })
            }
            None => {
                // The replica holds this chunk already: nothing to send, and nothing dirty.
                let group = self.clone();
                let mut inner = group.lock();
                let v = &mut inner.vols[volume as usize];
                if v.dirty.clear(chunk) {
                    v.dirty_changed = true;
                }
                drop(inner);
                drop(place);
                Ok(0)
            }
        }
    }

    /// Seals what is open (records of a sync: not consistent) and pushes `kind` (`SyncBegin` or
    /// `SyncEnd`) as the first record of a fresh batch.
    fn push_sync_marker(&self, inner: &mut Inner, volume: VolumeId, kind: RecordKind) {
        let sealed = inner.batcher.seal(0, None, true, now_ns());
        self.to_spool(sealed);
        let mut rec = Vec::new();
        batch::encode_marker(volume, kind, 0, 0, RECORD_FLAG_SYNC, &mut rec);
        let sealed = inner
            .batcher
            .push(&rec, 1, true, true, Instant::now(), now_ns());
        self.to_spool(sealed);
    }

    /// The initial sync of a volume (DESIGN 3.5): a `SyncBegin` record first in its batch, every
    /// chunk read under the range lock and recorded through the log (all-zero chunks as zero
    /// records), and a `SyncEnd` record last in its batch. Returns the seq of that batch.
    /// `backlog_max` bounds the batches sealed but not acknowledged while it runs;
    /// `bytes_per_sec_max` (0: unlimited) bounds its read rate.
    pub async fn initial_sync(
        self: &Arc<Self>,
        volume: VolumeId,
        backlog_max: u64,
        bytes_per_sec_max: u64,
    ) -> ExportResult<Seq> {
        let vol = self.volume(volume).clone();
        vol.sync_chunks_done.store(0, Ordering::Relaxed);
        vol.sync_chunks_total.store(vol.chunks(), Ordering::Relaxed);
        vol.syncing.store(true, Ordering::Relaxed);
        vol.restart_sync.store(false, Ordering::Relaxed);
        self.wait_for_room(backlog_max).await?;
        {
            let mut inner = self.lock();
            inner.syncing += 1;
            self.push_sync_marker(&mut inner, volume, RecordKind::SyncBegin);
            // The whole volume is being copied: nothing of it is dirty any more once it is.
            let v = &mut inner.vols[volume as usize];
            v.awaiting_sync = false;
            if v.dirty.recount() > 0 {
                v.dirty.clear_all();
                v.dirty_changed = true;
            }
        }
        let started = tokio::time::Instant::now();
        let mut bytes_read = 0u64;
        for chunk in 0..vol.chunks() {
            if bytes_per_sec_max > 0 {
                let due = started
                    + std::time::Duration::from_secs_f64(
                        bytes_read as f64 / bytes_per_sec_max as f64,
                    );
                tokio::time::sleep_until(due).await;
            }
            // Bound the backlog: the sync must not fill the spool with the whole device.
            self.wait_for_room(backlog_max).await?;
            if vol.restart_sync.swap(false, Ordering::Relaxed) {
                self.lock().syncing -= 1;
                vol.syncing.store(false, Ordering::Relaxed);
                return Err(ExportError::Io(format!(
                    "the initial sync of volume {} starts again: the replica lost what it had received of it",
                    vol.name
                )));
            }
            self.sync_chunk(volume, chunk, true, |_| true).await?;
            bytes_read += vol.chunk_len(chunk);
            vol.sync_chunks_done.fetch_add(1, Ordering::Relaxed);
        }
        // `SyncEnd` must reach the log: wait for the end of an overflow.
        self.wait_for_room(backlog_max).await?;
        let seq = {
            let mut inner = self.lock();
            if vol.restart_sync.swap(false, Ordering::Relaxed) {
                inner.syncing -= 1;
                vol.syncing.store(false, Ordering::Relaxed);
                return Err(ExportError::Io(format!(
                    "the initial sync of volume {} starts again: the replica lost what it had received of it",
                    vol.name
                )));
            }
            // The records so far belong to the sync: their batch is not consistent. `SyncEnd`
            // then goes alone into a fresh batch, which is consistent when nothing else of
            // the group is syncing or dirty.
            self.push_sync_marker(&mut inner, volume, RecordKind::SyncEnd);
            inner.syncing -= 1;
            let inconsistent = inner.inconsistent();
            let sealed = inner.batcher.seal(0, None, inconsistent, now_ns());
            self.to_spool(sealed);
            inner.batcher.last_sealed()
        };
        vol.syncing.store(false, Ordering::Relaxed);
        self.make_durable(seq, &[]).await?;
        self.bump();
        Ok(seq)
    }

    /// The verifier's question: the blake3 of a chunk as the device holds it at a batch
    /// boundary, and that boundary's seq S. The chunk is read under its range lock after every
    /// earlier write to it completed and with the open batch sealed, so its bytes are exactly
    /// the image at S in that chunk; later writes wait until the read is done. Refused while
    /// the chunk's writes are not all in the log (an initial sync, an overflow, a dirty chunk,
    /// a hash-compare resync).
    pub async fn hash_chunk_at_boundary(
        self: &Arc<Self>,
        volume: VolumeId,
        chunk: u64,
    ) -> Result<(Seq, [u8; 32]), String> {
        let vol = self
            .volumes
            .get(volume as usize)
            .ok_or_else(|| format!("no volume {volume} in group {}", self.name))?
            .clone();
        if chunk >= vol.chunks() {
            return Err(format!(
                "chunk {chunk} is past the end of volume {}",
                vol.name
            ));
        }
        let start = chunk * CHUNK_BYTES;
        let len = vol.chunk_len(chunk);
        let (place, waits) = self.admit(volume, start, start + len);
        wait_all(waits).await;
        let seq = {
            let mut inner = self.lock();
            if vol.syncing.load(Ordering::Relaxed)
                || inner.syncing > 0
                || inner.vols[volume as usize].awaiting_sync
            {
                return Err(format!("volume {} is being synced", vol.name));
            }
            if inner.overflow_since.is_some() {
                return Err(format!(
                    "group {} overflowed: its latest writes are not in the log",
                    self.name
                ));
            }
            if inner.vols[volume as usize].dirty.is_set(chunk) {
                return Err(format!(
                    "chunk {chunk} of volume {} waits for a resync",
                    vol.name
                ));
            }
            let inconsistent = inner.inconsistent();
            let sealed = inner.batcher.seal(0, None, inconsistent, now_ns());
            self.to_spool(sealed);
            inner.batcher.last_sealed()
        };
        let dev = vol.dev.clone();
        let hash = tokio::task::spawn_blocking(move || -> std::io::Result<[u8; 32]> {
            let mut buf = vec![0u8; len as usize];
            dev.read_uncached(&mut buf, start, None)?;
            Ok(*blake3::hash(&buf).as_bytes())
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("read chunk {chunk} of volume {}: {e}", vol.name))?;
        drop(place);
        Ok((seq, hash))
    }

    /// Marks `chunks` of `volume` for resync (the verifier's repair): durably in the dirty
    /// map, then wakes the maintenance task, which sends them through the ordered log as the
    /// device holds them and seals the consistent point that ends the resync. Returns the last
    /// sealed seq: the repaired bytes arrive in batches after it. Refused for an unknown volume,
    /// a chunk past the end, or a volume in its initial sync (the sync sends every chunk).
    pub async fn repair_chunks(
        self: &Arc<Self>,
        volume: VolumeId,
        chunks: &[u64],
    ) -> Result<Seq, String> {
        let vol = self
            .volumes
            .get(volume as usize)
            .ok_or_else(|| format!("no volume {volume} in group {}", self.name))?
            .clone();
        if let Some(c) = chunks.iter().find(|c| **c >= vol.chunks()) {
            return Err(format!(
                "chunk {c} is past the end of volume {} ({} chunks)",
                vol.name,
                vol.chunks()
            ));
        }
        if vol.syncing.load(Ordering::Relaxed) {
            return Err(format!(
                "volume {} is in its initial sync, which sends every chunk anyway",
                vol.name
            ));
        }
        let seq = {
            let mut inner = self.lock();
            for c in chunks {
                inner.mark_dirty(volume, *c, *c);
            }
            inner.batcher.last_sealed()
        };
        self.save_dirty_maps()
            .await
            .map_err(|e| format!("save the dirty map of volume {}: {e}", vol.name))?;
        tracing::info!(group = %self.name, volume = %vol.name, chunks = chunks.len(), "the replica asked for a repair: chunks marked for resync");
        self.bump();
        Ok(seq)
    }

    /// Ends an overflow once the spool has room again (at most half its cap).
    pub fn try_end_overflow(&self) -> bool {
        let mut inner = self.lock();
        if inner.overflow_since.is_some()
            && self.spool.held_bytes() <= self.options.spool_bytes_max / 2
        {
            inner.overflow_since = None;
            tracing::info!(group = %self.name, dirty_chunks = inner.dirty_total(), "the spool has room again: journaling resumes and the dirty regions are resynced");
            drop(inner);
            self.bump();
            return true;
        }
        false
    }

    /// Resyncs the dirty chunks of the volumes not in their initial sync, through the log, and
    /// seals the batch that completes it (consistent, when nothing else is pending). Returns
    /// the chunks sent. Stops early (leaving the rest dirty) when the group overflows again.
    pub async fn resync_dirty(self: &Arc<Self>, backlog_max: u64) -> ExportResult<u64> {
        let mut sent = 0;
        for vol in self.volumes.clone() {
            if vol.syncing.load(Ordering::Relaxed) {
                continue;
            }
            let checked = self.lock().vols[vol.id as usize].dirty.check();
            let total = match checked {
                Ok(n) => n,
                Err(e) => crate::stop_on_internal_error(&format!("volume {}: {e}", vol.name)),
            };
            if total == 0 {
                continue;
            }
            vol.sync_chunks_done.store(0, Ordering::Relaxed);
            vol.sync_chunks_total.store(total, Ordering::Relaxed);
            tracing::info!(group = %self.name, volume = %vol.name, chunks = total, "resyncing dirty regions");
            let mut next = 0;
            loop {
                self.wait_for_room(backlog_max).await?;
                let Some(chunk) = self.lock().vols[vol.id as usize].dirty.next_set(next) else {
                    break;
                };
                let n = self.sync_chunk(vol.id, chunk, false, |_| true).await?;
                vol.resync_bytes_sent.fetch_add(n, Ordering::Relaxed);
                vol.sync_chunks_done.fetch_add(1, Ordering::Relaxed);
                sent += 1;
                next = chunk + 1;
            }
        }
        if sent == 0 {
            return Ok(0);
        }
        let (seq, consistent) = self.cut_point();
        self.make_durable(seq, &[]).await?;
        if consistent {
            tracing::info!(group = %self.name, seq = seq.0, "resync complete: seq {seq} is consistent again");
        }
        Ok(sent)
    }

    /// Hash-compare resync of one volume: `hashes` gives, for a range of chunks, the blake3 of
    /// the replica's latest image of each; only chunks whose bytes differ are sent through the
    /// log. Batches are not consistent while it runs. Returns (chunks compared, chunks sent).
    pub async fn resync_by_hash<F, Fut>(
        self: &Arc<Self>,
        volume: VolumeId,
        backlog_max: u64,
        mut hashes: F,
    ) -> ExportResult<(u64, u64)>
    where
        F: FnMut(u64, u32) -> Fut,
        Fut: Future<Output = ExportResult<Vec<[u8; 32]>>>,
    {
        const RANGE: u64 = cdp_shared::wire::HASHES_PER_MESSAGE_MAX as u64 / 4;
        let vol = self.volume(volume).clone();
        let chunks = vol.chunks();
        vol.sync_chunks_done.store(0, Ordering::Relaxed);
        vol.sync_chunks_total.store(chunks, Ordering::Relaxed);
        self.lock().syncing += 1;
        let result = async {
            let (mut compared, mut sent) = (0, 0);
            let mut first = 0;
            while first < chunks {
                let count = RANGE.min(chunks - first);
                let theirs = hashes(first, count as u32).await?;
                if theirs.len() as u64 != count {
                    return Err(ExportError::Io(format!(
                        "the replica answered {} hashes for {count} chunks",
                        theirs.len()
                    )));
                }
                for (i, their) in theirs.into_iter().enumerate() {
                    self.wait_for_room(backlog_max).await?;
                    let chunk = first + i as u64;
                    let n = self
                        .sync_chunk(volume, chunk, true, move |buf| {
                            *blake3::hash(buf).as_bytes() != their
                        })
                        .await?;
                    if n > 0 {
                        sent += 1;
                        vol.resync_bytes_sent.fetch_add(n, Ordering::Relaxed);
                    }
                    compared += 1;
                    vol.sync_chunks_done.fetch_add(1, Ordering::Relaxed);
                }
                first += count;
            }
            Ok((compared, sent))
        }
        .await;
        let (seq, _) = {
            self.lock().syncing -= 1;
            self.cut_point()
        };
        self.make_durable(seq, &[]).await?;
        self.bump();
        result
    }

    /// Continues the log after the replica's `seq` (header hash `hash`), forgetting the spool:
    /// for when the spool cannot bring the replica up to date. Every volume then needs a
    /// hash-compare resync (the caller starts it).
    pub fn state_dir(&self) -> &std::path::Path {
        &self.options.state_dir
    }

    pub fn rebase(&self, seq: Seq, hash: batch::Hash) -> Result<(), crate::spool::SpoolError> {
        let mut inner = self.lock();
        self.spool.reset_blocking(seq, hash)?;
        inner.batcher.rebase(seq, hash);
        inner.rebases += 1;
        self.acked.send_replace(seq);
        tracing::warn!(group = %self.name, seq = seq.0, "the spool cannot bring the replica up to date: continuing after the replica's seq {seq} with a resync");
        Ok(())
    }
}
