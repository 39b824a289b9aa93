//! The sync machinery: the initial sync of a volume, dirty-region resyncs and hash-compare
//! resyncs, each reading chunks under the range lock and recording them through the ordered
//! log while `wait_for_room` bounds the backlog; the end of an overflow, the chunks of
//! batches lost from the spool, and the rebase after the replica's head.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use cdp_shared::batch::{self, RECORD_FLAG_SYNC, RecordKind};
use cdp_shared::cause::Cause;
use cdp_shared::nbd::{ExportError, ExportResult};
use cdp_shared::types::{CHUNK_BYTES, Seq, VolumeId};

use super::{Cut, Durable, ENCODER, Group, Inner, Recorded, blocking_err};
use crate::clock::now_ns;
use crate::range_lock::wait_all;

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

/// What an initial sync or a hash-compare resync did, and the group's rebase count when it
/// began: the caller marks it done only if the group has not rebased since (under the
/// maintenance queue's lock, which a rebase holds while it queues resyncs and counts itself).
#[derive(Debug)]
pub struct SyncDone<T> {
    pub result: T,
    pub rebases: u64,
}

impl Group {
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
            // Batches the spool lost (a crash tore its files): their regions are resent.
            v.note_dirty_cause(Cause::ResyncingAfterCrash);
            if lost.unknown_extents {
                v.dirty.set_all();
            } else {
                for (volume, offset, length) in &lost.extents {
                    if *volume as usize == i {
                        v.mark_extent(vol.size, *offset, *length);
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

    /// Marks volumes whose initial sync is due: until it begins, their client writes are not
    /// logged (the replica refuses records of a volume before its `SyncBegin`; the sync copies
    /// those writes from the device), and the group's points are not consistent.
    pub fn await_initial_sync(&self, volumes: impl IntoIterator<Item = VolumeId>) {
        let mut inner = self.lock();
        for v in volumes {
            inner.vols[v as usize].awaiting_sync = true;
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
    ///
    /// [`BlockDev::read_uncached`]: crate::device::BlockDev::read_uncached
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
    ) -> ExportResult<SyncDone<Seq>> {
        let vol = self.volume(volume).clone();
        vol.start_progress(vol.chunks());
        vol.syncing.store(true, Ordering::Relaxed);
        self.wait_for_room(backlog_max).await?;
        let began = {
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
            self.rebases()
        };
        let restart = || {
            ExportError::Io(format!(
                "the initial sync of volume {} starts again: the log was rebased while it ran (its records may be gone with the old chain)",
                vol.name
            ))
        };
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
            if self.rebases() != began {
                self.lock().syncing -= 1;
                vol.syncing.store(false, Ordering::Relaxed);
                return Err(restart());
            }
            self.sync_chunk(volume, chunk, true, |_| true).await?;
            bytes_read += vol.chunk_len(chunk);
            vol.sync_chunks_done.fetch_add(1, Ordering::Relaxed);
        }
        // `SyncEnd` must reach the log: wait for the end of an overflow.
        self.wait_for_room(backlog_max).await?;
        let seq = {
            let mut inner = self.lock();
            if self.rebases() != began {
                inner.syncing -= 1;
                vol.syncing.store(false, Ordering::Relaxed);
                return Err(restart());
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
        if self.make_durable(seq, began, &[]).await? == Durable::Rebased {
            return Err(restart());
        }
        self.bump();
        Ok(SyncDone {
            result: seq,
            rebases: began,
        })
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
            vol.start_progress(total);
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
        let Cut {
            seq,
            consistent,
            rebases,
            ..
        } = self.cut_point();
        if self.make_durable(seq, rebases, &[]).await? == Durable::Rebased {
            // The resync's records may be gone with the old chain: the rebase queued the
            // compares that send them again, or marked its dropped open records dirty.
            return Ok(sent);
        }
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
    ) -> ExportResult<SyncDone<(u64, u64)>>
    where
        F: FnMut(u64, u32) -> Fut,
        Fut: Future<Output = ExportResult<Vec<[u8; 32]>>>,
    {
        const RANGE: u64 = cdp_shared::wire::HASHES_PER_MESSAGE_MAX as u64 / 4;
        let vol = self.volume(volume).clone();
        let chunks = vol.chunks();
        vol.start_progress(chunks);
        let began = {
            let mut inner = self.lock();
            inner.syncing += 1;
            self.rebases()
        };
        let rebased = || {
            ExportError::Io(format!(
                "the hash-compare resync of volume {} starts again: the log was rebased while it ran (its records may be gone with the old chain)",
                vol.name
            ))
        };
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
                    if self.rebases() != began {
                        return Err(rebased());
                    }
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
        let Cut { seq, rebases, .. } = {
            self.lock().syncing -= 1;
            self.cut_point()
        };
        let durable = self.make_durable(seq, rebases, &[]).await?;
        self.bump();
        let done = result?;
        if durable == Durable::Rebased || rebases != began {
            return Err(rebased());
        }
        Ok(SyncDone {
            result: done,
            rebases: began,
        })
    }

    pub fn state_dir(&self) -> &std::path::Path {
        &self.options.state_dir
    }

    /// Continues the log after the replica's `seq` (header hash `hash`), forgetting the spool:
    /// for when the spool cannot bring the replica up to date. The caller queues the resyncs
    /// (hash compares, initial syncs). The records of the open batch, dropped here, become
    /// dirty: a rebase that compares nothing (the replica past the head on the agent's own
    /// chain) would otherwise never send them, and their epochs have not ended, so the
    /// activity log covers them until the dirty map is saved.
    pub fn rebase(&self, seq: Seq, hash: batch::Hash) -> Result<(), crate::spool::SpoolError> {
        let mut inner = self.lock();
        self.spool.reset_blocking(seq, hash)?;
        let dropped = inner.batcher.rebase(seq, hash);
        for vol in &self.volumes {
            vol.synced_at.store(0, Ordering::Relaxed);
        }
        for (volume, offset, length) in dropped {
            let (Some(vol), Some(v)) = (
                self.volumes.get(volume as usize),
                inner.vols.get_mut(volume as usize),
            ) else {
                continue;
            };
            v.note_dirty_cause(Cause::ResyncingAfterCrash);
            if v.mark_extent(vol.size, offset, length) {
                v.dirty_changed = true;
            }
        }
        // Counted before the new ack is seen (a `bookmark --wait` that sees the ack sees the
        // rebase too) and under the group's lock (a cut samples the count with its seq).
        self.rebased.send_modify(|n| *n += 1);
        self.acked.send_replace(seq);
        tracing::warn!(group = %self.name, seq = seq.0, "the spool cannot bring the replica up to date: continuing after the replica's seq {seq} with a resync");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::test_group;
    use std::time::Duration;

    const DEADLINE: Duration = Duration::from_secs(20);

    /// How the wait for `cut` to be durable ends, within [`DEADLINE`].
    async fn durable_within(g: &Group, cut: &Cut, what: &str) -> Durable {
        tokio::time::timeout(DEADLINE, g.spool_durable(cut.seq, cut.rebases))
            .await
            .unwrap_or_else(|_| panic!("{what}: the wait did not end"))
            .expect("no error")
    }

    /// The fault CI found: a wait for a seq sealed before a rebase (the spool's durable seq
    /// falls back to the replica's) waited for the new chain to reach that seq, which an idle
    /// group never does; the maintenance task hung in an initial sync's last wait.
    #[tokio::test]
    async fn a_wait_for_a_seq_sealed_before_a_rebase_ends_at_the_rebase() {
        let dir = tempfile::tempdir().expect("tempdir");
        let g = test_group(dir.path(), 1 << 20);
        let before = g.cut_point();
        assert_eq!(
            durable_within(&g, &before, "before the rebase").await,
            Durable::Reached
        );
        let sealed = g.cut_point();
        g.cut_point();
        assert!(sealed.seq > Seq(0));
        g.rebase(Seq(0), [0; 32]).expect("rebase");
        assert_eq!(
            durable_within(&g, &sealed, "across the rebase").await,
            Durable::Rebased
        );
        // A cut of the new chain waits for the new chain.
        let after = g.cut_point();
        assert_eq!(after.seq, Seq(1));
        assert_eq!(
            durable_within(&g, &after, "after the rebase").await,
            Durable::Reached
        );
    }

    /// A rebase drops the open batch; its records become dirty, so that a rebase that
    /// compares nothing still sends them.
    #[tokio::test]
    async fn the_records_a_rebase_drops_become_dirty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let g = test_group(dir.path(), 8 * CHUNK_BYTES);
        let mut rec = Vec::new();
        batch::encode_marker(
            0,
            RecordKind::Zero,
            3 * CHUNK_BYTES + 4096,
            4096,
            0,
            &mut rec,
        );
        batch::encode_marker(0, RecordKind::Zero, 5 * CHUNK_BYTES, 1024, 0, &mut rec);
        {
            let mut inner = g.lock();
            let sealed = inner
                .batcher
                .push(&rec, 2, false, false, Instant::now(), now_ns());
            assert!(sealed.is_empty(), "the records stay open");
            assert_eq!(inner.vols[0].dirty.recount(), 0);
        }
        g.rebase(Seq(0), [0; 32]).expect("rebase");
        let mut inner = g.lock();
        let v = &mut inner.vols[0];
        assert_eq!(v.dirty.recount(), 2);
        assert_eq!(v.dirty.next_set(0), Some(3));
        assert_eq!(v.dirty.next_set(4), Some(5));
        assert!(v.dirty_changed);
    }

    /// An initial sync running when the group rebases is void (its records went with the old
    /// chain): it ends with an error that says it starts again, instead of completing (or
    /// waiting for a seq of the old chain).
    #[tokio::test]
    async fn an_initial_sync_running_across_a_rebase_starts_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let g = test_group(dir.path(), 8 * CHUNK_BYTES);
        // 2 chunks a second: four seconds for the whole volume.
        let sync = tokio::spawn({
            let g = g.clone();
            async move { g.initial_sync(0, 64, 2 * CHUNK_BYTES).await }
        });
        let vol = g.volume(0).clone();
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while vol.sync_chunks_done.load(Ordering::Relaxed) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the sync never began"
            );
            let mut wake = g.wake.subscribe();
            let _ = tokio::time::timeout(Duration::from_millis(20), wake.changed()).await;
        }
        g.rebase(Seq(0), [0; 32]).expect("rebase");
        let ended = tokio::time::timeout(DEADLINE, sync)
            .await
            .expect("the sync must end")
            .expect("task");
        let err = ended.expect_err("a sync across a rebase must not complete");
        assert!(err.to_string().contains("starts again"), "{err}");
        assert!(!vol.syncing.load(Ordering::Relaxed));
        assert_eq!(g.lock().syncing, 0);
        // Run again, it completes on the new chain.
        let done = tokio::time::timeout(DEADLINE, g.initial_sync(0, 64, 0))
            .await
            .expect("the second sync must end")
            .expect("the second sync completes");
        assert_eq!(done.rebases, g.rebases());
        assert!(done.result > Seq(0));
    }
}
