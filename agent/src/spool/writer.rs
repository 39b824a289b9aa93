//! The spool's writer thread: the only code that appends to, syncs, cuts and deletes the
//! spool's segment files once the spool is open. It takes [`Cmd`]s in order, appends batches
//! to the current segment (a new one past [`SEGMENT_BYTES_TARGET`]), writes the durable end
//! into the segment's header just before each fdatasync, and deletes the segments an ack left
//! without a batch.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, mpsc};

use cdp_shared::Seq;
use cdp_shared::batch::Hash;

use super::{
    CACHE_BYTES_MAX, Cmd, DURABLE_END_AT, SEGMENT_BYTES_TARGET, SEGMENT_HEADER_BYTES,
    SEGMENT_MAGIC, Shared, State, durable_end_field, segment_header, segment_path, write_trimmed,
};
use crate::batcher::SealedBatch;

struct Writer {
    shared: Arc<Shared>,
    current: Option<(u64, File, u64)>,
    synced: bool,
    /// The durable end last written into the current segment's header.
    durable_end: u64,
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
        st.trim_to = None;
        drop(st);
        self.synced = true;
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
        for id in dead {
            fs::remove_file(segment_path(&self.shared.dir, id))?;
            self.lock().segments.remove(&id);
        }
        Ok(())
    }
}

pub(super) fn writer_thread(shared: Arc<Shared>, rx: mpsc::Receiver<Cmd>) {
    let mut w = Writer {
        shared: shared.clone(),
        current: None,
        synced: true,
        durable_end: 0,
    };
    let fail = |w: &Writer, what: &str, e: io::Error| {
        tracing::error!(dir = %w.shared.dir.display(), "spool {what} failed: {e}; the agent cannot keep its promise of durability and stops accepting flushes");
        w.lock().failed = Some(format!("{what}: {e}"));
    };
    if let Err(e) = w.resume_last_segment() {
        fail(&w, "open", e);
        return;
    }
    while let Ok(first) = rx.recv() {
        let mut cmds = vec![first];
        cmds.extend(rx.try_iter());
        let mut want_sync = false;
        let mut last_written = None;
        let mut trim = false;
        for cmd in cmds {
            match cmd {
                Cmd::Append(batch) => {
                    if let Err(e) = w.append(&batch) {
                        fail(&w, "append", e);
                        return;
                    }
                    last_written = Some(batch.seq);
                }
                Cmd::Sync => want_sync = true,
                Cmd::Trim => trim = true,
                Cmd::Reset(seq, hash, done) => {
                    // Whatever was queued before the reset belonged to the old chain.
                    last_written = None;
                    want_sync = false;
                    trim = false;
                    let _ = done.send(w.reset(seq, &hash));
                }
            }
        }
        if let Some(seq) = last_written {
            shared.written.send_replace(seq);
        }
        if want_sync {
            if let Err(e) = w.sync() {
                fail(&w, "fdatasync", e);
                return;
            }
            let written = *shared.written.borrow();
            shared.durable.send_replace(written);
        }
        if trim && let Err(e) = w.trim() {
            tracing::warn!(dir = %shared.dir.display(), "could not trim the spool: {e}");
        }
    }
}
