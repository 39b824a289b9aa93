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

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use cdp_shared::batch::{self, BatchFlags, RECORD_FLAG_SYNC, RecordEncoder, RecordKind};
use cdp_shared::nbd::{ExportError, ExportResult};
use cdp_shared::types::{CHUNK_BYTES, Seq, VolumeId, split_at_chunks};
use tokio::sync::{Notify, watch};

use crate::batcher::{Batcher, BatcherConfig, SealedBatch};
use crate::device::BlockDev;
use crate::range_lock::{Latch, RangeLock, Ticket, wait_all};
use crate::spool::Spool;

/// Writes up to this size run on the async worker; larger ones on the blocking pool.
pub const INLINE_WRITE_BYTES_MAX: usize = 64 << 10;

thread_local! {
    static ENCODER: RefCell<RecordEncoder> = RefCell::new(RecordEncoder::new());
}

/// Wall-clock time as UTC nanoseconds, for batch headers.
pub fn now_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)
}

/// A protected volume inside its group.
pub struct Volume {
    pub id: VolumeId,
    pub name: String,
    pub dev: Arc<dyn BlockDev>,
    pub size: u64,
    /// Chunks read by the running initial sync (for progress).
    pub sync_chunks_done: AtomicU64,
    /// Whether the volume is inside its initial sync.
    pub syncing: std::sync::atomic::AtomicBool,
}

impl Volume {
    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(CHUNK_BYTES)
    }
}

struct Inner {
    locks: Vec<RangeLock>,
    batcher: Batcher,
    /// Volumes of the group inside a sync: batches sealed meanwhile are not consistent.
    syncing: usize,
}

/// One consistency group: its volumes, its log and its spool.
pub struct Group {
    pub name: String,
    pub volumes: Vec<Arc<Volume>>,
    inner: Mutex<Inner>,
    pub spool: Spool,
    age_notify: Notify,
    /// The newest seq the replica has acknowledged as durable (set by the sender).
    pub acked: watch::Sender<Seq>,
    /// Records pushed, for status.
    pub records_total: AtomicU64,
}

/// An admitted operation's place in its range lock; released on drop so that an operation
/// that fails (or whose task is dropped) never blocks later ones.
struct Place {
    group: Arc<Group>,
    volume: VolumeId,
    ticket: Option<Ticket>,
}

impl Place {
    /// Pushes the operation's records and releases its place, atomically with respect to
    /// other operations of the group.
    fn complete(mut self, encoded: &[u8], records: u32, sync: bool) {
        let mut inner = self.group.lock();
        if records > 0 {
            let was_empty = inner.batcher.is_empty();
            let inconsistent = inner.syncing > 0;
            let sealed = inner.batcher.push(
                encoded,
                records,
                sync,
                inconsistent,
                Instant::now(),
                now_ns(),
            );
            self.group.to_spool(sealed);
            if was_empty {
                self.group.age_notify.notify_one();
            }
            self.group
                .records_total
                .fetch_add(u64::from(records), Ordering::Relaxed);
        }
        if let Some(t) = self.ticket.take() {
            inner.locks[self.volume as usize].release(t);
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Some(t) = self.ticket.take() {
            self.group.lock().locks[self.volume as usize].release(t);
        }
    }
}

fn blocking_err(e: tokio::task::JoinError) -> ExportError {
    ExportError::Io(format!("I/O task failed: {e}"))
}

impl Group {
    /// A group whose volumes are indexed by id (`volumes[i].id == i`), continuing its log after
    /// `last_seq` (whose header hash is `last_hash`).
    pub fn new(
        name: &str,
        volumes: Vec<Arc<Volume>>,
        spool: Spool,
        config: BatcherConfig,
        last_seq: Seq,
        last_hash: batch::Hash,
    ) -> Arc<Group> {
        for (i, v) in volumes.iter().enumerate() {
            assert_eq!(v.id as usize, i, "volume ids are dense indexes");
        }
        let locks = volumes.iter().map(|_| RangeLock::new()).collect();
        let (acked, _) = watch::channel(Seq(0));
        Arc::new(Group {
            name: name.to_owned(),
            volumes,
            inner: Mutex::new(Inner {
                locks,
                batcher: Batcher::new(name, config, last_seq, last_hash),
                syncing: 0,
            }),
            spool,
            age_notify: Notify::new(),
            acked,
            records_total: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn to_spool(&self, sealed: impl IntoIterator<Item = SealedBatch>) {
        for s in sealed {
            let hash = match batch::decode_header(&s.bytes) {
                Ok(h) => h.header_hash,
                Err(e) => panic!("the batcher sealed a batch that does not decode: {e}"),
            };
            self.spool.append(s, hash);
        }
    }

    /// The last sealed seq.
    pub fn last_sealed(&self) -> Seq {
        self.lock().batcher.last_sealed()
    }

    fn admit(self: &Arc<Self>, volume: VolumeId, start: u64, end: u64) -> (Place, Vec<Latch>) {
        let (ticket, waits) = self.lock().locks[volume as usize].admit(start, end);
        (
            Place {
                group: self.clone(),
                volume,
                ticket: Some(ticket),
            },
            waits,
        )
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
    ) -> impl Future<Output = ExportResult<()>> + Send + 'static {
        let len = data.len();
        let (place, waits) = self.admit(volume, offset, offset + len as u64);
        let group = self.clone();
        async move {
            wait_all(waits).await;
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
            place.complete(&encoded, records, false);
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
    ) -> impl Future<Output = ExportResult<()>> + Send + 'static {
        debug_assert!(matches!(kind, RecordKind::Zero | RecordKind::Trim));
        let (place, waits) = self.admit(volume, offset, offset + len);
        let group = self.clone();
        async move {
            wait_all(waits).await;
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
            place.complete(&out, n, false);
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
    ) -> impl Future<Output = ExportResult<Vec<u8>>> + Send + 'static {
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
    /// covers every record pushed so far.
    fn cut(&self, flags: u16, bookmark: Option<&str>) -> Seq {
        let mut inner = self.lock();
        let inconsistent = inner.syncing > 0;
        let sealed = inner.batcher.seal(flags, bookmark, inconsistent, now_ns());
        self.to_spool(sealed);
        inner.batcher.last_sealed()
    }

    async fn sync_devices(&self, which: Vec<Arc<dyn BlockDev>>) -> ExportResult<()> {
        tokio::task::spawn_blocking(move || which.iter().try_for_each(|d| d.sync()))
            .await
            .map_err(blocking_err)??;
        Ok(())
    }

    async fn make_durable(&self, seq: Seq) -> ExportResult<()> {
        self.spool
            .wait_durable(seq)
            .await
            .map_err(|e| ExportError::Io(e.to_string()))
    }

    /// FLUSH on one volume: its device durable, the batch cut as a flush point, the spool
    /// durable up to it.
    pub fn flush_volume(
        self: &Arc<Self>,
        volume: VolumeId,
    ) -> impl Future<Output = ExportResult<()>> + Send + 'static {
        let group = self.clone();
        async move {
            group
                .sync_devices(vec![group.volume(volume).dev.clone()])
                .await?;
            let seq = group.cut(BatchFlags::FLUSH, None);
            group.make_durable(seq).await
        }
    }

    /// Makes every device of the group durable and seals a batch named `name`; returns its seq
    /// once it is durable in the spool.
    pub async fn bookmark(self: &Arc<Self>, name: &str) -> ExportResult<Seq> {
        self.sync_devices(self.volumes.iter().map(|v| v.dev.clone()).collect())
            .await?;
        let seq = self.cut(BatchFlags::FLUSH, Some(name));
        self.make_durable(seq).await?;
        Ok(seq)
    }

    /// Seals the open batch (used at shutdown) and makes it durable.
    pub async fn seal_and_sync(self: &Arc<Self>) -> ExportResult<Seq> {
        self.sync_devices(self.volumes.iter().map(|v| v.dev.clone()).collect())
            .await?;
        let seq = self.cut(BatchFlags::FLUSH, None);
        self.make_durable(seq).await?;
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
            let inconsistent = inner.syncing > 0;
            let sealed = inner
                .batcher
                .poll_age(Instant::now(), inconsistent, now_ns());
            self.to_spool(sealed);
        }
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
        vol.syncing.store(true, Ordering::Relaxed);
        {
            let mut inner = self.lock();
            inner.syncing += 1;
            let inconsistent = true;
            let sealed = inner.batcher.seal(0, None, inconsistent, now_ns());
            self.to_spool(sealed);
            let mut rec = Vec::new();
            batch::encode_marker(
                volume,
                RecordKind::SyncBegin,
                0,
                0,
                RECORD_FLAG_SYNC,
                &mut rec,
            );
            let sealed = inner
                .batcher
                .push(&rec, 1, true, inconsistent, Instant::now(), now_ns());
            self.to_spool(sealed);
        }
        let mut acked = self.acked.subscribe();
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
            loop {
                let sealed = self.last_sealed().0;
                if sealed.saturating_sub(acked.borrow_and_update().0) < backlog_max {
                    break;
                }
                if acked.changed().await.is_err() {
                    return Err(ExportError::Shutdown);
                }
            }
            let start = chunk * CHUNK_BYTES;
            let len = CHUNK_BYTES.min(vol.size - start);
            let (place, waits) = self.admit(volume, start, start + len);
            wait_all(waits).await;
            let dev = vol.dev.clone();
            let encoded = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
                let mut buf = vec![0u8; len as usize];
                dev.read_at(&mut buf, start)?;
                let mut out = Vec::new();
                if buf.iter().all(|b| *b == 0) {
                    batch::encode_marker(
                        volume,
                        RecordKind::Zero,
                        start,
                        len as u32,
                        RECORD_FLAG_SYNC,
                        &mut out,
                    );
                } else {
                    ENCODER.with(|e| {
                        e.borrow_mut()
                            .encode_data(volume, start, &buf, RECORD_FLAG_SYNC, &mut out)
                    });
                }
                Ok(out)
            })
            .await
            .map_err(blocking_err)??;
            place.complete(&encoded, 1, true);
            bytes_read += len;
            vol.sync_chunks_done.fetch_add(1, Ordering::Relaxed);
        }
        let seq = {
            let mut inner = self.lock();
            // The records so far belong to the sync: their batch is not consistent. `SyncEnd`
            // then goes alone into a fresh batch, which is consistent when no other volume of
            // the group is syncing.
            let sealed = inner.batcher.seal(0, None, true, now_ns());
            self.to_spool(sealed);
            let mut rec = Vec::new();
            batch::encode_marker(
                volume,
                RecordKind::SyncEnd,
                0,
                0,
                RECORD_FLAG_SYNC,
                &mut rec,
            );
            let sealed = inner
                .batcher
                .push(&rec, 1, true, true, Instant::now(), now_ns());
            self.to_spool(sealed);
            inner.syncing -= 1;
            let inconsistent = inner.syncing > 0;
            let sealed = inner.batcher.seal(0, None, inconsistent, now_ns());
            self.to_spool(sealed);
            inner.batcher.last_sealed()
        };
        vol.syncing.store(false, Ordering::Relaxed);
        self.make_durable(seq).await?;
        Ok(seq)
    }
}
