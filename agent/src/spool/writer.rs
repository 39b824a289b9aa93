//! The spool's writer thread: the only code that appends to, syncs, cuts and deletes the
//! spool's segment files once the spool is open. It takes [`Cmd`]s in order, appends batches
//! to the current segment (a new one past [`SEGMENT_BYTES_TARGET`]), writes the durable end
//! into the segment's header just before each fdatasync, and deletes the segments an ack left
//! without a batch.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use cdp_shared::Seq;
use cdp_shared::batch::Hash;

use super::{
    CACHE_BYTES_MAX, Cmd, DURABLE_END_AT, SEGMENT_BYTES_TARGET, SEGMENT_HEADER_BYTES,
    SEGMENT_MAGIC, Shared, State, durable_end_field, segment_header, segment_path, write_trimmed,
};
use crate::batcher::SealedBatch;

/// How long a batch waits before the writer spools it: the replica usually acknowledges it
/// within that time, and an acknowledged batch is never written (nor read back). A flush
/// does not wait: it has everything queued written and synced at once.
pub const WRITE_LAG: Duration = Duration::from_millis(100);
/// Bytes queued for the writer beyond which it spools the oldest at once.
pub const QUEUED_BYTES_MAX: usize = 64 << 20;
/// How often, at most, the newest acknowledged seq is saved while batches are skipped.
pub const TRIMMED_REFRESH: Duration = Duration::from_secs(1);

struct Writer {
    shared: Arc<Shared>,
    current: Option<(u64, File, u64)>,
    synced: bool,
    /// The durable end last written into the current segment's header.
    durable_end: u64,
    /// The newest batch in a segment file (or the trimmed one): the next one written must
    /// follow it, or `trimmed` must name the batch before it (see [`Writer::write_or_skip`]).
    last_in_file: Seq,
    /// The seq `trimmed` holds on disk, and when it was last written.
    trimmed_on_disk: Seq,
    trimmed_at: Instant,
    /// The newest batch written or skipped: once the segment is synced, everything up to it
    /// is safe.
    done: Seq,
}

impl Writer {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn open_segment(&mut self, first_seq: Seq) -> io::Result<()> {
        if let Some((_, file, len)) = self.current.take() {
            // Everything before the current segment is durable: sync it, whole, before
            // leaving it.
            file.write_all_at(&durable_end_field(len), DURABLE_END_AT)?;
            file.sync_data()?;
        }
        let id = first_seq.0;
        let path = segment_path(&self.shared.dir, id);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)?;
        file.write_all(&segment_header(SEGMENT_HEADER_BYTES))?;
        file.sync_all()?;
        File::open(&self.shared.dir)?.sync_all()?;
        self.current = Some((id, file, SEGMENT_HEADER_BYTES));
        self.durable_end = SEGMENT_HEADER_BYTES;
        self.lock().segments.insert(id, SEGMENT_HEADER_BYTES);
        Ok(())
    }

    fn resume_last_segment(&mut self) -> io::Result<()> {
        let last = self
            .lock()
            .segments
            .iter()
            .next_back()
            .map(|(id, len)| (*id, *len));
        if let Some((id, len)) = last
            && len < SEGMENT_BYTES_TARGET
        {
            // Only a segment of the current format is appended to (a first-format one has no
            // durable end to keep).
            let path = segment_path(&self.shared.dir, id);
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            let mut magic = [0u8; 8];
            if file.read_exact_at(&mut magic, 0).is_ok() && &magic == SEGMENT_MAGIC {
                // Open cut the segment to its last whole batch: all of it is durable.
                file.write_all_at(&durable_end_field(len), DURABLE_END_AT)?;
                file.sync_data()?;
                self.durable_end = len;
                self.current = Some((id, file, len));
            }
        }
        Ok(())
    }

    fn append(&mut self, batch: &SealedBatch) -> io::Result<()> {
        let need_new = match &self.current {
            None => true,
            Some((_, _, len)) => *len >= SEGMENT_BYTES_TARGET,
        };
        if need_new {
            self.open_segment(batch.seq)?;
        }
        let Some((id, file, len)) = self.current.as_mut() else {
            return Err(io::Error::other("no segment"));
        };
        file.write_all_at(&batch.bytes, *len)?;
        let offset = *len;
        *len += batch.bytes.len() as u64;
        let (id, new_len) = (*id, *len);
        self.synced = false;
        let mut st = self.lock();
        st.segments.insert(id, new_len);
        if let Some(e) = st.entries.get_mut(&batch.seq) {
            e.segment = id;
            e.offset = offset;
            e.written = true;
        }
        // Keep the cache bounded: drop the oldest written batches' bytes.
        while st.cached_bytes > CACHE_BYTES_MAX {
            let Some((_, e)) = st
                .entries
                .iter_mut()
                .find(|(_, e)| e.cached.is_some() && e.written)
            else {
                break;
            };
            if let Some(b) = e.cached.take() {
                st.cached_bytes -= b.len();
            }
        }
        Ok(())
    }

    /// Writes `batch` into the spool, or skips it if the replica acknowledged it already
    /// (everything before it is acknowledged then too).
    ///
    /// Opening the spool reads the batches after the one `trimmed` names and wants their seqs
    /// to follow each other. So before the first batch written after skipped ones, `trimmed`
    /// is made to name the batch just before it (the newest acknowledged one: it is not
    /// acknowledged itself, or it would be skipped too).
    fn write_or_skip(&mut self, batch: &SealedBatch) -> io::Result<()> {
        let (acked, trim_to) = {
            let st = self.lock();
            (st.acked, st.trim_to)
        };
        if batch.seq <= acked {
            self.skip(batch);
            return Ok(());
        }
        if batch.seq != self.last_in_file.next() && self.trimmed_on_disk.next() != batch.seq {
            match trim_to {
                Some((seq, hash)) if seq.next() == batch.seq => {
                    write_trimmed(&self.shared.dir, seq, &hash)?;
                    self.trimmed_on_disk = seq;
                    self.trimmed_at = Instant::now();
                }
                _ => {
                    return Err(io::Error::other(format!(
                        "batch {} follows neither the last one spooled ({}) nor an acknowledged one",
                        batch.seq, self.last_in_file
                    )));
                }
            }
        }
        self.append(batch)?;
        self.last_in_file = batch.seq;
        self.done = batch.seq;
        Ok(())
    }

    /// Passes over a batch the replica acknowledged before it was written.
    fn skip(&mut self, batch: &SealedBatch) {
        self.done = batch.seq;
        self.shared.skipped.fetch_add(1, Ordering::Relaxed);
    }

    /// Saves the newest acknowledged seq in `trimmed` when batches were skipped since it was
    /// last saved, at most once per [`TRIMMED_REFRESH`]: after a crash the agent's head is
    /// then at most that far behind the replica, well inside its window, and the replica can
    /// tell that its chain runs through it (nothing is compared again).
    fn refresh_trimmed(&mut self, now: Instant) -> io::Result<()> {
        if now < self.trimmed_at + TRIMMED_REFRESH || self.done <= self.last_in_file {
            return Ok(());
        }
        let Some((seq, hash)) = self.lock().trim_to else {
            return Ok(());
        };
        if seq <= self.trimmed_on_disk || seq <= self.last_in_file {
            return Ok(());
        }
        write_trimmed(&self.shared.dir, seq, &hash)?;
        self.trimmed_on_disk = seq;
        self.trimmed_at = now;
        Ok(())
    }

    fn reset(&mut self, seq: Seq, hash: &Hash) -> io::Result<()> {
        self.current = None;
        write_trimmed(&self.shared.dir, seq, hash)?;
        let ids: Vec<u64> = self.lock().segments.keys().copied().collect();
        for id in ids {
            fs::remove_file(segment_path(&self.shared.dir, id))?;
        }
        File::open(&self.shared.dir)?.sync_all()?;
        let mut st = self.lock();
        st.segments.clear();
        st.entries.clear();
        st.cached_bytes = 0;
        st.held_bytes = 0;
        st.acked = seq;
        st.acked_hash = *hash;
        st.trim_to = None;
        drop(st);
        self.synced = true;
        self.last_in_file = seq;
        self.trimmed_on_disk = seq;
        self.done = seq;
        // The caller holds its group's lock: no batch of the new chain is appended before
        // this returns, and the sender must not look for the old chain's batches past `seq`.
        self.shared.appended.send_replace(seq);
        self.shared.written.send_replace(seq);
        self.shared.durable.send_replace(seq);
        Ok(())
    }

    /// Makes the current segment durable: its durable end is written into its header first,
    /// so that the same fdatasync makes both durable (see the module doc).
    fn sync(&mut self) -> io::Result<()> {
        if !self.synced
            && let Some((_, file, len)) = &self.current
        {
            if *len != self.durable_end {
                file.write_all_at(&durable_end_field(*len), DURABLE_END_AT)?;
            }
            file.sync_data()?;
            self.durable_end = *len;
        }
        self.synced = true;
        Ok(())
    }

    /// Deletes the segments that hold no batch (except the one being appended), after saving
    /// the newest acknowledged seq and hash in `trimmed` so the chain survives them.
    fn trim(&mut self) -> io::Result<()> {
        let st = self.lock();
        let Some((acked_seq, acked_hash)) = st.trim_to else {
            return Ok(());
        };
        let current = self.current.as_ref().map(|(id, _, _)| *id);
        let live: std::collections::BTreeSet<u64> =
            st.entries.values().map(|e| e.segment).collect();
        let dead: Vec<u64> = st
            .segments
            .keys()
            .copied()
            .filter(|id| Some(*id) != current && !live.contains(id))
            .collect();
        drop(st);
        if dead.is_empty() {
            return Ok(());
        }
        write_trimmed(&self.shared.dir, acked_seq, &acked_hash)?;
        self.trimmed_on_disk = self.trimmed_on_disk.max(acked_seq);
        self.trimmed_at = Instant::now();
        for id in dead {
            fs::remove_file(segment_path(&self.shared.dir, id))?;
            self.lock().segments.remove(&id);
        }
        Ok(())
    }
}

/// Batches waiting for the writer, oldest first, with when each was queued.
#[derive(Default)]
struct Queue {
    batches: VecDeque<(SealedBatch, Instant)>,
    bytes: usize,
}

impl Queue {
    fn push(&mut self, batch: SealedBatch, now: Instant) {
        self.bytes += batch.bytes.len();
        self.batches.push_back((batch, now));
    }

    /// When the oldest batch is due, if any is queued.
    fn deadline(&self) -> Option<Instant> {
        self.batches.front().map(|(_, at)| *at + WRITE_LAG)
    }

    /// The oldest batch, if it is due: `all` (a flush waits), its lag is over, or the queue
    /// holds too many bytes.
    fn pop_due(&mut self, now: Instant, all: bool) -> Option<SealedBatch> {
        let (_, at) = self.batches.front()?;
        if !(all || *at + WRITE_LAG <= now || self.bytes > QUEUED_BYTES_MAX) {
            return None;
        }
        let (batch, _) = self.batches.pop_front()?;
        self.bytes -= batch.bytes.len();
        Some(batch)
    }

    /// The oldest batch, if `acked` covers it.
    fn pop_acked(&mut self, acked: Seq) -> Option<SealedBatch> {
        if self.batches.front()?.0.seq > acked {
            return None;
        }
        let (batch, _) = self.batches.pop_front()?;
        self.bytes -= batch.bytes.len();
        Some(batch)
    }

    fn clear(&mut self) {
        self.batches.clear();
        self.bytes = 0;
    }
}

/// The commands waiting, the first one waited for until `deadline` (or for ever): empty when
/// the deadline passed; `None` when every handle is gone.
fn next_commands(rx: &mpsc::Receiver<Cmd>, deadline: Option<Instant>) -> Option<Vec<Cmd>> {
    let first = match deadline {
        None => rx.recv().ok()?,
        Some(d) => match rx.recv_timeout(d.saturating_duration_since(Instant::now())) {
            Ok(cmd) => cmd,
            Err(mpsc::RecvTimeoutError::Timeout) => return Some(Vec::new()),
            Err(mpsc::RecvTimeoutError::Disconnected) => return None,
        },
    };
    let mut cmds = vec![first];
    cmds.extend(rx.try_iter());
    Some(cmds)
}

pub(super) fn writer_thread(
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Cmd>,
    trimmed_seq: Seq,
    last_seq: Seq,
) {
    let mut w = Writer {
        shared: shared.clone(),
        current: None,
        synced: true,
        durable_end: 0,
        last_in_file: last_seq,
        trimmed_on_disk: trimmed_seq,
        trimmed_at: Instant::now(),
        done: last_seq,
    };
    let fail = |w: &Writer, what: &str, e: io::Error| {
        tracing::error!(dir = %w.shared.dir.display(), "spool {what} failed: {e}; the agent cannot keep its promise of durability and stops accepting flushes");
        w.lock().failed = Some(format!("{what}: {e}"));
    };
    if let Err(e) = w.resume_last_segment() {
        fail(&w, "open", e);
        return;
    }
    let mut queue = Queue::default();
    loop {
        // Every handle gone (the agent stops): what is queued and not acknowledged is
        // written and synced all the same, then the thread ends.
        let (cmds, stopping) = match next_commands(&rx, queue.deadline()) {
            Some(cmds) => (cmds, false),
            None => (Vec::new(), true),
        };
        let mut want_sync = stopping;
        let mut trim = false;
        for cmd in cmds {
            match cmd {
                Cmd::Append(batch) => queue.push(batch, Instant::now()),
                Cmd::Sync => want_sync = true,
                Cmd::Trim => trim = true,
                Cmd::Reset(seq, hash, done) => {
                    // Whatever was queued before the reset belonged to the old chain.
                    queue.clear();
                    want_sync = false;
                    trim = false;
                    let _ = done.send(w.reset(seq, &hash));
                }
            }
        }
        let now = Instant::now();
        let before = w.last_in_file;
        // Batches acknowledged while they waited are dropped at once (their bytes with them).
        let acked = w.lock().acked;
        while let Some(batch) = queue.pop_acked(acked) {
            w.skip(&batch);
        }
        while let Some(batch) = queue.pop_due(now, want_sync) {
            if let Err(e) = w.write_or_skip(&batch) {
                fail(&w, "append", e);
                return;
            }
        }
        if w.last_in_file != before {
            shared.written.send_replace(w.last_in_file);
        }
        if want_sync {
            if let Err(e) = w.sync() {
                fail(&w, "fdatasync", e);
                return;
            }
            shared.advance_durable(w.done);
        }
        if trim && let Err(e) = w.trim() {
            tracing::warn!(dir = %shared.dir.display(), "could not trim the spool: {e}");
        }
        if let Err(e) = w.refresh_trimmed(now) {
            tracing::warn!(dir = %shared.dir.display(), "could not save the acknowledged seq: {e}");
        }
        if stopping {
            return;
        }
    }
}
