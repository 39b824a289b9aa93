//! The NBD client's path through the group: writes, zero-writes and trims, reads, FLUSH and
//! FUA, bookmarks, the seal of a clean stop, and the age cutter. Each operation is admitted
//! in the call; the returned future does the rest (see the module doc of `pipeline`).

use std::sync::Arc;
use std::time::Instant;

use cdp_shared::batch::{self, BatchFlags, RecordKind};
use cdp_shared::nbd::{ExportError, ExportResult};
use cdp_shared::types::{Seq, VolumeId, split_at_chunks};

use super::{Cut, Durable, ENCODER, Group, Recorded, blocking_err, io_err};
use crate::clock::now_ns;
use crate::device::BlockDev;
use crate::range_lock::wait_all;

/// Writes up to this size run on the async worker; larger ones on the blocking pool.
pub const INLINE_WRITE_BYTES_MAX: usize = 64 << 10;
/// Reads up to this size are tried from the page cache on the async worker first.
pub const INLINE_READ_BYTES_MAX: usize = 64 << 10;

impl Group {
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
            group
                .volume(volume)
                .written_bytes
                .fetch_add(len as u64, std::sync::atomic::Ordering::Relaxed);
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
            let mut buf = vec![0u8; len as usize];
            // A read the page cache holds takes microseconds: served here, without a handoff
            // to the blocking pool (the NBD server then answers it without a task either).
            if len as usize <= INLINE_READ_BYTES_MAX && dev.read_cached(&mut buf, offset)? {
                return Ok(buf);
            }
            tokio::task::spawn_blocking(move || dev.read_at(&mut buf, offset).map(|_| buf))
                .await
                .map_err(blocking_err)?
                .map_err(ExportError::from)
        }
    }

    async fn sync_devices(&self, which: Vec<Arc<dyn BlockDev>>) -> ExportResult<()> {
        tokio::task::spawn_blocking(move || which.iter().try_for_each(|d| d.sync()))
            .await
            .map_err(blocking_err)??;
        Ok(())
    }

    /// FLUSH on one volume: the batch cut as a flush point, then its device and the spool
    /// (and, if any, the dirty maps) durable up to it, at the same time (see
    /// [`Group::flush_cut`]).
    pub fn flush_volume(
        self: &Arc<Self>,
        volume: VolumeId,
    ) -> impl Future<Output = ExportResult<()>> + Send + 'static + use<> {
        let group = self.clone();
        async move {
            let cut = group.cut(BatchFlags::FLUSH, None, &[volume]);
            group.flush_cut(&cut, &[volume]).await
        }
    }

    /// Makes a cut of `volumes` durable: their devices synced and the spool durable up to the
    /// cut, the two at once (a FLUSH waits for the longer of the two fsyncs, not their sum);
    /// then the cut's epochs end. The cut comes first: every write of an ended epoch
    /// completed on its device before the cut, so the device sync, begun after it, covers it.
    /// (Cutting after the sync would put a write that reached the device while the sync ran
    /// into the ended epoch, and its chunk could leave the activity log undurable.)
    async fn flush_cut(self: &Arc<Self>, cut: &Cut, volumes: &[VolumeId]) -> ExportResult<()> {
        let devices = volumes
            .iter()
            .map(|v| self.volume(*v).dev.clone())
            .collect();
        let (synced, durable) = tokio::join!(
            self.sync_devices(devices),
            self.spool_durable(cut.seq, cut.rebases)
        );
        synced?;
        if durable? == Durable::Rebased {
            // The cut's batch went with the old chain; the writes are durable on their
            // devices, and the rebase's resyncs send them. Their epochs stay open (their
            // chunks in the activity logs) until a later cut is durable.
            return Ok(());
        }
        let ended: Vec<_> = volumes
            .iter()
            .copied()
            .zip(cut.ended.iter().copied())
            .collect();
        self.end_epochs(&ended);
        Ok(())
    }

    fn all_volumes(&self) -> Vec<VolumeId> {
        self.volumes.iter().map(|v| v.id).collect()
    }

    /// Seals a batch named `name` and makes it and every device of the group durable;
    /// returns its point once it is durable in the spool.
    pub async fn bookmark(self: &Arc<Self>, name: &str) -> ExportResult<Cut> {
        let all = self.all_volumes();
        let cut = self.cut(BatchFlags::FLUSH, Some(name), &all);
        self.flush_cut(&cut, &all).await?;
        Ok(cut)
    }

    /// Seals the open batch and makes everything durable (used at a clean stop); then empties
    /// the activity logs, which only hold chunks of durable epochs now.
    pub async fn seal_and_sync(self: &Arc<Self>) -> ExportResult<Seq> {
        let all = self.all_volumes();
        let cut = self.cut(BatchFlags::FLUSH, None, &all);
        self.flush_cut(&cut, &all).await?;
        let seq = cut.seq;
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
}
