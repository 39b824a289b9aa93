//! The activity log of a volume (like DRBD's): the set of chunks that may hold writes which are
//! on the device but not yet durable in the spool (or the dirty map). A chunk enters the set,
//! durably, *before* any write to it reaches the device; it leaves once it has no write in
//! flight and its last write belongs to a flushed epoch. After an unclean stop, exactly the
//! chunks in the set are resynced, instead of the whole device.
//!
//! [`ActivityLog`] is the sans-IO set (with LRU eviction above its capacity and per-chunk
//! counts of writes in flight); [`AlFile`] persists snapshots in two alternating files
//! (`state/<volume>.al.0` / `.al.1`), each `"CDPAL001" | seq u64 | count u64 | chunks u64* |
//! blake3`, so a torn write of one leaves the other valid. Persisting is one write and one
//! fdatasync, shared by every admission waiting for it (group commit).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const MAGIC: &[u8; 8] = b"CDPAL001";
/// Default number of chunks (1 MiB each) the log keeps before it evicts: the hot set that is
/// resynced after a crash, and the reach of writes that never wait for the log.
pub const CAPACITY_DEFAULT: usize = 4096;

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    in_flight: u32,
    /// The epoch of the last completed write (see `Group`: an epoch ends at a flush).
    last_epoch: u64,
    last_use: u64,
}

#[derive(Debug)]
pub struct ActivityLog {
    capacity: usize,
    entries: HashMap<u64, Entry>,
    clock: u64,
    /// Bumped whenever a chunk is added.
    version: u64,
    /// The version known durable on disk.
    persisted: u64,
}

impl ActivityLog {
    /// A log holding `chunks` (as loaded after a clean or unclean stop), all durable.
    pub fn new(capacity: usize, chunks: &[u64]) -> ActivityLog {
        let entries = chunks.iter().map(|c| (*c, Entry::default())).collect();
        ActivityLog {
            capacity: capacity.max(1),
            entries,
            clock: 0,
            version: 0,
            persisted: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A write to chunks `first..=last` is admitted. Returns the version that must be durable
    /// before the write may reach the device, or `None` when the chunks are already covered.
    pub fn begin(&mut self, first: u64, last: u64, durable_epoch: u64) -> Option<u64> {
        self.clock += 1;
        // Whether a chunk was added is read off the set itself, not kept in a flag set inside
        // the loop (a counter fed from a bool in an inlined loop is what rustc 1.95 miscompiled
        // in the dirty map; a lost version bump here would let a write reach the device before
        // its chunk is durable in the log).
        let before = self.entries.len();
        for c in first..=last {
            let e = self.entries.entry(c).or_default();
            e.in_flight += 1;
            e.last_use = self.clock;
        }
        if self.entries.len() != before {
            self.version += 1;
            self.evict(durable_epoch);
        }
        (self.persisted < self.version).then_some(self.version)
    }

    /// The write to `first..=last` completed in `epoch` (or failed, in which case it stays
    /// recorded: the device may hold part of it).
    pub fn end(&mut self, first: u64, last: u64, epoch: u64) {
        for c in first..=last {
            if let Some(e) = self.entries.get_mut(&c) {
                e.in_flight = e.in_flight.saturating_sub(1);
                e.last_epoch = e.last_epoch.max(epoch);
            }
        }
    }

    /// Drops least recently used chunks above the capacity that no write needs any more: no
    /// write in flight, and the last one in an epoch that is durable. When none can go, the log
    /// stays above its capacity until a flush makes some evictable.
    fn evict(&mut self, durable_epoch: u64) {
        while self.entries.len() > self.capacity {
            let victim = self
                .entries
                .iter()
                .filter(|(_, e)| e.in_flight == 0 && e.last_epoch <= durable_epoch)
                .min_by_key(|(_, e)| e.last_use)
                .map(|(c, _)| *c);
            match victim {
                Some(c) => {
                    self.entries.remove(&c);
                }
                None => break,
            }
        }
    }

    /// Drops every chunk that no write needs any more (at a clean stop, after the last flush).
    pub fn retire_all(&mut self, durable_epoch: u64) {
        self.entries
            .retain(|_, e| e.in_flight > 0 || e.last_epoch > durable_epoch);
        self.version += 1;
    }

    /// What to persist: the version and the chunks.
    pub fn snapshot(&self) -> (u64, Vec<u64>) {
        let mut chunks: Vec<u64> = self.entries.keys().copied().collect();
        chunks.sort_unstable();
        (self.version, chunks)
    }

    pub fn mark_persisted(&mut self, version: u64) {
        self.persisted = self.persisted.max(version);
    }

    pub fn is_persisted(&self, version: u64) -> bool {
        self.persisted >= version
    }
}

/// The two files that hold the last persisted snapshot. Both stay open for the volume's
/// life, so persisting needs no new file descriptor (a process out of descriptors must not
/// turn a client write into an error).
#[derive(Clone, Debug)]
pub struct AlFile {
    files: Arc<[File; 2]>,
    seq: u64,
}

fn encode(seq: u64, chunks: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + chunks.len() * 8 + 32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&(chunks.len() as u64).to_le_bytes());
    for c in chunks {
        out.extend_from_slice(&c.to_le_bytes());
    }
    let h = blake3::hash(&out);
    out.extend_from_slice(h.as_bytes());
    out
}

fn decode(bytes: &[u8]) -> Option<(u64, Vec<u64>)> {
    if bytes.len() < 24 + 32 || &bytes[..8] != MAGIC {
        return None;
    }
    let word = |at: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(a)
    };
    let seq = word(8);
    let count = word(16);
    let len = 24usize
        .checked_add(usize::try_from(count).ok()?.checked_mul(8)?)?
        .checked_add(32)?;
    if bytes.len() != len || blake3::hash(&bytes[..len - 32]).as_bytes() != &bytes[len - 32..] {
        return None;
    }
    Some((seq, (0..count as usize).map(|i| word(24 + i * 8)).collect()))
}

impl AlFile {
    /// Opens the log files of a volume (`<base>.al.0`, `<base>.al.1`) and returns the chunks of
    /// the newest valid snapshot (empty when there is none).
    pub fn open(base: &Path) -> io::Result<(AlFile, Vec<u64>)> {
        let paths = [0, 1].map(|i| {
            let mut p = base.as_os_str().to_owned();
            p.push(format!(".al.{i}"));
            PathBuf::from(p)
        });
        let mut best: Option<(u64, Vec<u64>)> = None;
        let mut files = Vec::with_capacity(2);
        for p in &paths {
            let mut f = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(p)?;
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes)?;
            if let Some((seq, chunks)) = decode(&bytes)
                && best.as_ref().is_none_or(|(s, _)| seq > *s)
            {
                best = Some((seq, chunks));
            }
            files.push(f);
        }
        let (seq, chunks) = best.unwrap_or_default();
        let files: [File; 2] = files
            .try_into()
            .map_err(|_| io::Error::other("two activity log files"))?;
        Ok((
            AlFile {
                files: Arc::new(files),
                seq,
            },
            chunks,
        ))
    }

    /// Persists a snapshot: written over the older of the two files (then cut to its length),
    /// then fdatasync'd. A torn write leaves the other file, which holds the previous snapshot.
    pub fn write(&mut self, chunks: &[u64]) -> io::Result<()> {
        let seq = self.seq + 1;
        let f = &self.files[(seq % 2) as usize];
        let bytes = encode(seq, chunks);
        f.write_all_at(&bytes, 0)?;
        f.set_len(bytes.len() as u64)?;
        f.sync_data()?;
        self.seq = seq;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_enter_before_writes_and_leave_after_a_flush() {
        let mut al = ActivityLog::new(2, &[]);
        let v = al.begin(0, 1, 0).expect("new chunks need persisting");
        assert!(!al.is_persisted(v));
        al.mark_persisted(v);
        assert_eq!(al.begin(1, 1, 0), None, "a covered chunk needs nothing");
        al.end(0, 1, 1);
        al.end(1, 1, 1);
        // Above capacity, but nothing is evictable before epoch 1 is durable.
        assert!(al.begin(5, 5, 0).is_some());
        assert_eq!(al.len(), 3);
        al.end(5, 5, 1);
        // Epoch 1 durable: the least recently used idle chunk goes.
        assert!(al.begin(9, 9, 1).is_some());
        assert_eq!(al.len(), 2);
        let (_, chunks) = al.snapshot();
        assert!(chunks.contains(&9) && !chunks.contains(&0));
        al.end(9, 9, 2);
        al.retire_all(2);
        assert!(al.is_empty());
    }

    /// Adds a new chunk in a loop and branches on the answer, the shape rustc 1.95
    /// miscompiled in the dirty map: every new chunk must bump the version to persist.
    /// Runs optimized in `make test`.
    #[inline(never)]
    fn begin_each(al: &mut ActivityLog, chunks: &[u64]) -> u64 {
        let mut need = 0;
        for c in chunks {
            if let Some(v) = al.begin(*c, *c, 0) {
                need += 1;
                al.mark_persisted(v);
            }
        }
        need
    }

    #[test]
    fn every_new_chunk_must_be_persisted_first() {
        let mut al = ActivityLog::new(64, &[]);
        let chunks: Vec<u64> = std::hint::black_box(vec![0, 1, 2, 3, 1, 0, 7]);
        assert_eq!(
            begin_each(&mut al, &chunks),
            5,
            "each new chunk asks for a persist"
        );
        assert_eq!(al.len(), 5);
        // A chunk already covered asks for nothing, a new one does.
        assert_eq!(al.begin(2, 2, 0), None);
        assert!(al.begin(8, 9, 0).is_some());
    }

    #[test]
    fn files_survive_a_torn_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("v");
        let (mut f, chunks) = AlFile::open(&base).expect("open");
        assert!(chunks.is_empty());
        f.write(&[1, 2, 3]).expect("write");
        f.write(&[4]).expect("write");
        let (_, chunks) = AlFile::open(&base).expect("reopen");
        assert_eq!(chunks, vec![4]);
        // Tear the newest file: the older snapshot is still there.
        let newest = dir.path().join("v.al.0");
        let bytes = std::fs::read(&newest).expect("read");
        std::fs::write(&newest, &bytes[..bytes.len() - 5]).expect("tear");
        let (_, chunks) = AlFile::open(&base).expect("reopen");
        assert_eq!(chunks, vec![1, 2, 3]);
    }
}
