//! The spool: a durable, append-only, segmented log on the agent's disk of the batches of one
//! consistency group that the replica has not acknowledged yet (DESIGN 3.4).
//!
//! Sealed batches are appended in seq order by a dedicated writer thread. Two numbers are kept
//! apart: *written* (the bytes are in the segment file) and *durable* (fdatasync'd). A FLUSH
//! asks for durability up to its batch and waits for it. Segments whose batches are all
//! acknowledged are deleted; before that, the newest acknowledged seq and its header hash are
//! saved in `trimmed`, so the seq chain survives an empty spool.
//!
//! File layout: `DIR/<first seq, 20 digits>.spl`, each starting with [`SEGMENT_MAGIC`] and then
//! whole batches back to back; `DIR/trimmed` holds `"<seq> <hash hex>\n"`. On open, a segment
//! tail that does not decode as a whole, checked batch (a torn write) is truncated.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};

use bytes::Bytes;
use cdp_shared::Seq;
use cdp_shared::batch::{self, HEADER_FIXED_BYTES, Hash};
use tokio::sync::watch;

use crate::batcher::SealedBatch;

/// Magic and format version at the start of every spool segment.
pub const SEGMENT_MAGIC: &[u8; 8] = b"CDPSPL01";
/// A new segment is started once the current one reaches this size.
pub const SEGMENT_BYTES_TARGET: u64 = 64 << 20;
/// Bytes of unacknowledged batches kept in memory for the sender; older ones are read back
/// from the segment files.
pub const CACHE_BYTES_MAX: usize = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool directory {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("spool file {path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

struct Entry {
    /// The batch's agent time (when it was sealed).
    time_ns: i64,
    segment: u64,
    offset: u64,
    len: u64,
    hash: Hash,
    /// The bytes, while they are cached.
    cached: Option<Bytes>,
    /// Whether the writer has put them in the segment file.
    written: bool,
}

struct State {
    entries: BTreeMap<Seq, Entry>,
    /// Segment id (first seq) → bytes, in order.
    segments: BTreeMap<u64, u64>,
    cached_bytes: usize,
    /// Bytes of the batches held.
    held_bytes: u64,
    acked: Seq,
    /// The newest acknowledged batch and its header hash, once acknowledged batches have been
    /// forgotten: the writer saves it in `trimmed` before it deletes their segments.
    trim_to: Option<(Seq, Hash)>,
    failed: Option<String>,
}

struct Shared {
    dir: PathBuf,
    state: Mutex<State>,
    written: watch::Sender<Seq>,
    durable: watch::Sender<Seq>,
}

enum Cmd {
    Append(SealedBatch),
    Sync,
    /// Delete the segments that hold no batch any more (see [`Spool::ack`]).
    Trim,
    /// Forget everything and continue the chain after `seq` (see [`Spool::reset`]).
    Reset(Seq, Hash, mpsc::Sender<io::Result<()>>),
}

/// Handle to a group's spool; cheap to clone.
#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Cmd>,
}

/// What [`Spool::open`] found on disk.
pub struct Recovered {
    /// The newest batch known (in the spool, or trimmed): the batcher continues after it.
    pub last_seq: Seq,
    pub last_hash: Hash,
    /// The oldest batch the spool still holds (`last_seq + 1` when it holds none).
    pub first_held: Seq,
    /// Bytes cut off torn segment tails.
    pub truncated_bytes: u64,
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.spl"))
}

fn read_trimmed(dir: &Path) -> Result<(Seq, Hash), SpoolError> {
    let path = dir.join("trimmed");
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Seq(0), [0; 32])),
        Err(e) => return Err(io_err(&path)(e)),
    };
    let damaged = |reason: &str| SpoolError::Damaged {
        path: path.clone(),
        reason: reason.to_owned(),
    };
    let mut parts = text.split_whitespace();
    let seq: u64 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| damaged("no seq"))?;
    let hex = parts.next().ok_or_else(|| damaged("no hash"))?;
    let mut hash = [0u8; 32];
    if hex.len() != 64 {
        return Err(damaged("hash is not 64 hex digits"));
    }
    for (i, byte) in hash.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|_| damaged("hash is not hex"))?;
    }
    Ok((Seq(seq), hash))
}

fn write_trimmed(dir: &Path, seq: Seq, hash: &Hash) -> io::Result<()> {
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    crate::state::write_atomic(
        &dir.join("trimmed"),
        format!("{} {hex}\n", seq.0).as_bytes(),
    )
}

impl Spool {
    /// Opens (creating) the spool in `dir`, checks every batch in it, truncates a torn tail, and
    /// starts the writer thread.
    pub fn open(dir: &Path) -> Result<(Spool, Recovered), SpoolError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let (trimmed_seq, trimmed_hash) = read_trimmed(dir)?;
        let mut ids: Vec<u64> = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(stem) = name.strip_suffix(".spl")
                && let Ok(id) = stem.parse::<u64>()
            {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        let mut entries = BTreeMap::new();
        let mut segments = BTreeMap::new();
        let mut truncated_bytes = 0;
        let (mut last_seq, mut last_hash) = (trimmed_seq, trimmed_hash);
        for id in ids {
            let path = segment_path(dir, id);
            let data = fs::read(&path).map_err(io_err(&path))?;
            let mut good = 0u64;
            if data.len() >= SEGMENT_MAGIC.len() && &data[..SEGMENT_MAGIC.len()] == SEGMENT_MAGIC {
                good = SEGMENT_MAGIC.len() as u64;
                let mut pos = SEGMENT_MAGIC.len();
                while pos + HEADER_FIXED_BYTES <= data.len() {
                    let Ok(header) = batch::decode_header(&data[pos..]) else {
                        break;
                    };
                    let end = pos + header.total_len();
                    if end > data.len() || batch::decode(&data[pos..end]).is_err() {
                        break;
                    }
                    if header.seq > trimmed_seq {
                        if last_seq.0 != 0 && header.seq != last_seq.next() {
                            return Err(SpoolError::Damaged {
                                path,
                                reason: format!("seq {} follows seq {}", header.seq, last_seq),
                            });
                        }
                        entries.insert(
                            header.seq,
                            Entry {
                                time_ns: header.agent_time_ns,
                                segment: id,
                                offset: pos as u64,
                                len: (end - pos) as u64,
                                hash: header.header_hash,
                                cached: None,
                                written: true,
                            },
                        );
                        last_seq = header.seq;
                        last_hash = header.header_hash;
                    }
                    pos = end;
                    good = pos as u64;
                }
            }
            if good < data.len() as u64 {
                truncated_bytes += data.len() as u64 - good;
                tracing::warn!(segment = %path.display(), bytes = data.len() as u64 - good, "truncated a torn spool segment tail");
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err(&path))?;
                f.set_len(good).map_err(io_err(&path))?;
                f.sync_all().map_err(io_err(&path))?;
            }
            segments.insert(id, good);
        }
        let first_held = entries.keys().next().copied().unwrap_or(last_seq.next());
        let held_bytes = entries.values().map(|e| e.len).sum();
        let (written, _) = watch::channel(last_seq);
        let (durable, _) = watch::channel(last_seq);
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            state: Mutex::new(State {
                entries,
                segments,
                cached_bytes: 0,
                held_bytes,
                acked: trimmed_seq,
                trim_to: None,
                failed: None,
            }),
            written,
            durable,
        });
        let (tx, rx) = mpsc::channel();
        let writer_shared = shared.clone();
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer_thread(writer_shared, rx))
            .map_err(io_err(dir))?;
        Ok((
            Spool { shared, tx },
            Recovered {
                last_seq,
                last_hash,
                first_held,
                truncated_bytes,
            },
        ))
    }

    /// Queues a sealed batch (seq must follow the last appended one). Returns at once.
    pub fn append(&self, batch: SealedBatch, header_hash: Hash, time_ns: i64) {
        {
            let mut st = self.lock();
            st.cached_bytes += batch.bytes.len();
            st.held_bytes += batch.bytes.len() as u64;
            st.entries.insert(
                batch.seq,
                Entry {
                    time_ns,
                    segment: 0,
                    offset: 0,
                    len: batch.bytes.len() as u64,
                    hash: header_hash,
                    cached: Some(batch.bytes.clone()),
                    written: false,
                },
            );
        }
        // The writer thread only stops when every handle is gone.
        let _ = self.tx.send(Cmd::Append(batch));
    }

    /// Waits until every batch up to `seq` is durable.
    pub async fn wait_durable(&self, seq: Seq) -> Result<(), SpoolError> {
        if *self.shared.durable.borrow() >= seq {
            return Ok(());
        }
        let _ = self.tx.send(Cmd::Sync);
        let mut rx = self.shared.durable.subscribe();
        loop {
            if *rx.borrow_and_update() >= seq {
                return Ok(());
            }
            if let Some(reason) = self.lock().failed.clone() {
                return Err(SpoolError::Io {
                    path: self.shared.dir.clone(),
                    source: io::Error::other(reason),
                });
            }
            if rx.changed().await.is_err() {
                return Err(SpoolError::Io {
                    path: self.shared.dir.clone(),
                    source: io::Error::other("spool writer stopped"),
                });
            }
        }
    }

    /// Everything up to `seq` is acknowledged by the replica: forget it and delete the segments
    /// that hold nothing newer.
    ///
    /// The batches are forgotten (and `held_bytes` drops) before this returns, so whoever
    /// waits for room in the spool and is woken by the acknowledgement sees it; only the
    /// deletion of the segment files is left to the writer thread.
    pub fn ack(&self, seq: Seq) {
        {
            let mut st = self.lock();
            if seq <= st.acked {
                return;
            }
            let Some((&acked_seq, acked_entry)) = st.entries.range(..=seq).next_back() else {
                return;
            };
            let acked_hash = acked_entry.hash;
            let keep = st.entries.split_off(&seq.next());
            let (mut freed_cached, mut freed_held) = (0, 0);
            for (_, e) in std::mem::replace(&mut st.entries, keep) {
                freed_held += e.len;
                if let Some(b) = e.cached {
                    freed_cached += b.len();
                }
            }
            st.cached_bytes -= freed_cached;
            st.held_bytes -= freed_held;
            st.acked = acked_seq;
            st.trim_to = Some((acked_seq, acked_hash));
        }
        let _ = self.tx.send(Cmd::Trim);
    }

    /// The bytes of batch `seq`, from memory or read back from its segment.
    pub fn get(&self, seq: Seq) -> Result<Option<Bytes>, SpoolError> {
        let (segment, offset, len) = {
            let st = self.lock();
            match st.entries.get(&seq) {
                None => return Ok(None),
                Some(e) => {
                    if let Some(b) = &e.cached {
                        return Ok(Some(b.clone()));
                    }
                    (e.segment, e.offset, e.len)
                }
            }
        };
        let path = segment_path(&self.shared.dir, segment);
        let file = File::open(&path).map_err(io_err(&path))?;
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, offset)
            .map_err(io_err(&path))?;
        Ok(Some(Bytes::from(buf)))
    }

    /// The newest seq in the spool or already trimmed.
    pub fn written(&self) -> Seq {
        *self.shared.written.borrow()
    }
    pub fn durable(&self) -> Seq {
        *self.shared.durable.borrow()
    }
    pub fn subscribe_written(&self) -> watch::Receiver<Seq> {
        self.shared.written.subscribe()
    }

    /// Batches and bytes held (not yet acknowledged).
    pub fn held(&self) -> (u64, u64) {
        let st = self.lock();
        (st.entries.len() as u64, st.held_bytes)
    }

    /// Bytes held (not yet acknowledged).
    pub fn held_bytes(&self) -> u64 {
        self.lock().held_bytes
    }

    /// Agent time of the oldest batch held, if any.
    pub fn oldest_held_time_ns(&self) -> Option<i64> {
        self.lock().entries.values().next().map(|e| e.time_ns)
    }

    /// Forgets every batch and continues the chain after `seq` (header hash `hash`): for an
    /// agent that cannot resume from its spool (the replica is behind what the spool still
    /// holds, or ahead of it). Deletes every segment and blocks until that is durable, so the
    /// caller holds its group's lock across it and no batch of the new chain can interleave.
    pub fn reset_blocking(&self, seq: Seq, hash: Hash) -> Result<(), SpoolError> {
        let (tx, rx) = mpsc::channel();
        let _ = self.tx.send(Cmd::Reset(seq, hash, tx));
        let dir = self.shared.dir.clone();
        match rx.recv() {
            Ok(r) => r.map_err(|source| SpoolError::Io { path: dir, source }),
            Err(_) => Err(SpoolError::Io {
                path: dir,
                source: io::Error::other("spool writer stopped"),
            }),
        }
    }

    /// The oldest seq still held, if any.
    pub fn first_held(&self) -> Option<Seq> {
        self.lock().entries.keys().next().copied()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Writer {
    shared: Arc<Shared>,
    current: Option<(u64, File, u64)>,
    synced: bool,
}

impl Writer {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn open_segment(&mut self, first_seq: Seq) -> io::Result<()> {
        if let Some((_, file, _)) = self.current.take() {
            // Everything before the current segment is durable: sync it before leaving it.
            file.sync_data()?;
        }
        let id = first_seq.0;
        let path = segment_path(&self.shared.dir, id);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)?;
        file.write_all(SEGMENT_MAGIC)?;
        file.sync_all()?;
        File::open(&self.shared.dir)?.sync_all()?;
        self.current = Some((id, file, SEGMENT_MAGIC.len() as u64));
        self.lock().segments.insert(id, SEGMENT_MAGIC.len() as u64);
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
            let path = segment_path(&self.shared.dir, id);
            let file = OpenOptions::new().write(true).open(&path)?;
            self.current = Some((id, file, len));
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

    fn sync(&mut self) -> io::Result<()> {
        if !self.synced
            && let Some((_, file, _)) = &self.current
        {
            file.sync_data()?;
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

fn writer_thread(shared: Arc<Shared>, rx: mpsc::Receiver<Cmd>) {
    let mut w = Writer {
        shared: shared.clone(),
        current: None,
        synced: true,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batcher::{Batcher, BatcherConfig};
    use cdp_shared::batch::{BatchFlags, RecordKind, encode_marker};
    use std::time::Instant;

    fn make(b: &mut Batcher) -> (SealedBatch, Hash) {
        let mut rec = Vec::new();
        encode_marker(0, RecordKind::Zero, 0, 512, 0, &mut rec);
        b.push(&rec, 1, false, false, Instant::now(), 0);
        let s = b.seal(BatchFlags::FLUSH, None, false, 0).expect("sealed");
        let h = batch::decode_header(&s.bytes).expect("header").header_hash;
        (s, h)
    }

    #[tokio::test]
    async fn append_sync_reopen_truncate_and_trim() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut b = Batcher::new("g", BatcherConfig::default(), Seq(0), [0; 32]);
        let (spool, rec) = Spool::open(dir.path()).expect("open");
        assert_eq!(rec.last_seq, Seq(0));
        let mut hashes = Vec::new();
        for _ in 0..5 {
            let (s, h) = make(&mut b);
            hashes.push(h);
            spool.append(s, h, 0);
        }
        spool.wait_durable(Seq(5)).await.expect("durable");
        assert_eq!(spool.durable(), Seq(5));
        assert!(spool.get(Seq(3)).expect("get").is_some());
        drop(spool);

        // A torn tail: half a batch appended after the last one.
        let seg = segment_path(dir.path(), 1);
        let mut data = fs::read(&seg).expect("read");
        let half = data[SEGMENT_MAGIC.len()..SEGMENT_MAGIC.len() + 100].to_vec();
        data.extend_from_slice(&half);
        fs::write(&seg, &data).expect("write");

        let (spool, rec) = Spool::open(dir.path()).expect("reopen");
        assert_eq!(rec.last_seq, Seq(5));
        assert_eq!(rec.last_hash, hashes[4]);
        assert_eq!(rec.first_held, Seq(1));
        assert_eq!(rec.truncated_bytes, 100);
        let got = spool.get(Seq(2)).expect("get").expect("held");
        assert_eq!(batch::decode(&got).expect("decode").header.seq, Seq(2));

        // Acknowledge everything; the chain continues after the acknowledged batches.
        let mut b = Batcher::new("g", BatcherConfig::default(), rec.last_seq, rec.last_hash);
        let (s6, h6) = make(&mut b);
        assert!(spool.held_bytes() > 0);
        spool.ack(Seq(5));
        // Whoever the acknowledgement wakes sees the room it made, without waiting for the
        // writer thread.
        assert_eq!(
            spool.held(),
            (0, 0),
            "acknowledged batches are forgotten at once"
        );
        spool.append(s6, h6, 0);
        spool.wait_durable(Seq(6)).await.expect("durable");
        spool.ack(Seq(6));
        spool.wait_durable(Seq(6)).await.expect("still durable");
        drop(spool);
        let (_spool, rec) = Spool::open(dir.path()).expect("reopen");
        assert_eq!(rec.last_seq, Seq(6));
        assert_eq!(rec.last_hash, h6);
    }
}
