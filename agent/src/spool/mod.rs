//! The spool: a durable, append-only, segmented log on the agent's disk of the batches of one
//! consistency group that the replica has not acknowledged yet (DESIGN 3.4).
//!
//! Sealed batches are queued in seq order ([`Spool::append`]) and the sender may send them at
//! once, from memory (*appended*). A dedicated writer thread ([`writer`]) writes a batch into
//! the segment files only once it has waited [`writer::WRITE_LAG`] unacknowledged, and never
//! one the replica acknowledged first (*written*). *Durable* means safe: fdatasync'd in the
//! spool, or acknowledged by the replica. A FLUSH asks for durability up to its batch and
//! waits for whichever comes first. Segments whose
//! batches are all acknowledged are deleted; before that, the newest acknowledged seq and its
//! header hash are saved in `trimmed`, so the seq chain survives an empty spool.
//!
//! File layout: `DIR/<first seq, 20 digits>.spl`, each starting with a [`SEGMENT_HEADER_BYTES`]
//! header — [`SEGMENT_MAGIC`] | durable end u64 | check u64 (the first 8 bytes of the blake3 of
//! the durable end) — and then whole batches back to back; `DIR/trimmed` holds
//! `"<seq> <hash hex>\n"`. The *durable end* is the segment's length at its last fdatasync: it
//! is written into the header just before each fdatasync (the same fdatasync makes it
//! durable), and set to the whole length when the writer leaves the segment.
//!
//! **Torn tail versus damage.** On open, only bytes past a segment's durable end may be cut as
//! a torn tail: no flush was ever answered for them, and the activity log names their chunks.
//! A batch before the durable end that fails its checks is *damage*: its bytes were promised
//! durable. The spool then keeps the batches before it, moves the damaged batch and every
//! later one into `DIR/damaged/` (for a look), and reports them ([`LostBatches`]: the segment,
//! the seq range, the chunks their records touched, their bookmarks) so that the agent marks
//! those chunks dirty and resyncs them from the device, where the data is. The log continues
//! after the last good batch. (A power loss in the middle of an fdatasync may persist the
//! header before the data: that shows as damage of unflushed batches, and the same resync
//! covers it.) Segments of the first format (`CDPSPL01`, no durable end) are read as before:
//! a failing batch in the last one is a torn tail.

mod writer;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use bytes::Bytes;
use cdp_shared::Seq;
use cdp_shared::batch::{self, HEADER_FIXED_BYTES, Hash};
use tokio::sync::watch;

use crate::batcher::SealedBatch;
use writer::writer_thread;

/// Magic and format version at the start of every spool segment.
pub const SEGMENT_MAGIC: &[u8; 8] = b"CDPSPL02";
/// The first format: the magic alone, no durable end. Still read.
const SEGMENT_MAGIC_V1: &[u8; 8] = b"CDPSPL01";
/// Bytes of a segment's header: magic | durable end | its check.
pub const SEGMENT_HEADER_BYTES: u64 = 24;
/// Where the durable end sits in the header.
const DURABLE_END_AT: u64 = 8;
/// Where damaged batches are moved (see the module doc).
pub const DAMAGED_DIR: &str = "damaged";
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

/// What a spool appended and saw acknowledged since it was opened (for metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpoolTotals {
    pub appended_batches: u64,
    pub appended_bytes: u64,
    pub acked_batches: u64,
    pub acked_bytes: u64,
}

struct State {
    entries: BTreeMap<Seq, Entry>,
    /// Segment id (first seq) → bytes, in order.
    segments: BTreeMap<u64, u64>,
    cached_bytes: usize,
    /// Bytes of the batches held.
    held_bytes: u64,
    /// Since the spool was opened: batches and bytes appended, and acknowledged (so that
    /// `held_bytes` is what was found at the open plus the first less the second).
    totals: SpoolTotals,
    acked: Seq,
    /// The header hash of batch `acked` (zeros for seq 0).
    acked_hash: Hash,
    /// The newest acknowledged batch and its header hash, once acknowledged batches have been
    /// forgotten: the writer saves it in `trimmed` before it deletes their segments.
    trim_to: Option<(Seq, Hash)>,
    failed: Option<String>,
}

struct Shared {
    dir: PathBuf,
    state: Mutex<State>,
    /// The newest batch queued ([`Spool::append`]): the sender sends from memory up to it.
    appended: watch::Sender<Seq>,
    /// The newest batch the writer put in a segment file (or the trimmed one).
    written: watch::Sender<Seq>,
    /// Every batch up to it is safe: durable in a segment file, or acknowledged by the replica.
    durable: watch::Sender<Seq>,
    /// Batches the writer never wrote because the replica had acknowledged them first.
    skipped: AtomicU64,
}

impl Shared {
    /// Everything up to `seq` is safe now; the durable seq never goes back (but on a reset).
    fn advance_durable(&self, seq: Seq) {
        self.durable.send_if_modified(|d| {
            let moved = seq > *d;
            *d = (*d).max(seq);
            moved
        });
    }
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

/// Batches of the spool found damaged before their segment's durable end, and every batch
/// after them, all taken out of the spool (see the module doc).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LostBatches {
    /// The segment that held the first damaged batch.
    pub segment: PathBuf,
    /// The first seq lost (right after the last good batch).
    pub first_seq: Seq,
    /// The newest seq known lost (a damaged batch whose header is damaged too has no known
    /// seq; the newest readable one after it is named).
    pub last_seq: Seq,
    /// Batches taken out, and of those, damaged ones.
    pub batches: u64,
    pub damaged: u64,
    /// `(volume, offset, length)` of every record of the lost batches that could be read.
    pub extents: Vec<(cdp_shared::types::VolumeId, u64, u32)>,
    /// Whether some lost batch's records could not be read: their chunks are unknown, and
    /// every volume of the group must be resynced whole.
    pub unknown_extents: bool,
    /// Bookmarks among the lost batches: they are no longer points.
    pub bookmarks: Vec<String>,
    /// Where the lost bytes were moved.
    pub moved_to: PathBuf,
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
    /// Damaged batches found before a durable end, if any (they and everything after them
    /// are out of the spool).
    pub lost: Option<LostBatches>,
}

/// The header of a new segment whose durable end is `end`.
fn segment_header(end: u64) -> [u8; SEGMENT_HEADER_BYTES as usize] {
    let mut h = [0u8; SEGMENT_HEADER_BYTES as usize];
    h[..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..].copy_from_slice(&durable_end_field(end));
    h
}

/// The durable end and its check, as written at [`DURABLE_END_AT`].
fn durable_end_field(end: u64) -> [u8; 16] {
    let mut f = [0u8; 16];
    f[..8].copy_from_slice(&end.to_le_bytes());
    f[8..].copy_from_slice(&blake3::hash(&end.to_le_bytes()).as_bytes()[..8]);
    f
}

/// Where a segment's batches start and up to where they are durable: `None` when it has no
/// valid magic. A damaged durable-end field reads as "nothing durable" (the older rule).
fn segment_layout(data: &[u8]) -> Option<(usize, u64)> {
    if data.len() >= SEGMENT_HEADER_BYTES as usize && &data[..8] == SEGMENT_MAGIC {
        let mut end = [0u8; 8];
        end.copy_from_slice(&data[8..16]);
        let checked = data[8..24] == durable_end_field(u64::from_le_bytes(end));
        let end = if checked {
            u64::from_le_bytes(end)
        } else {
            tracing::warn!("a spool segment's durable end is damaged: its tail is read as torn");
            SEGMENT_HEADER_BYTES
        };
        return Some((SEGMENT_HEADER_BYTES as usize, end));
    }
    if data.len() >= SEGMENT_MAGIC_V1.len() && &data[..8] == SEGMENT_MAGIC_V1 {
        return Some((SEGMENT_MAGIC_V1.len(), SEGMENT_MAGIC_V1.len() as u64));
    }
    None
}

/// The next position at or after `from` where a whole, checked batch starts.
fn next_batch_at(data: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    while at + HEADER_FIXED_BYTES <= data.len() {
        let rel = data[at..].windows(4).position(|w| w == batch::MAGIC)?;
        at += rel;
        if let Ok(h) = batch::decode_header(&data[at..]) {
            let end = at + h.total_len();
            if end <= data.len() && batch::decode(&data[at..end]).is_ok() {
                return Some(at);
            }
        }
        at += 1;
    }
    None
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
    crate::fsutil::write_atomic(
        &dir.join("trimmed"),
        format!("{} {hex}\n", seq.0).as_bytes(),
    )
}

/// Adds to `lost` every batch of a segment's `data` from `from` on: whole ones by their
/// records, damaged ones by what [`batch::salvage`] can read, skipping to the next whole batch
/// when even a header is damaged. Batches already acknowledged (seq not after the last good
/// one) are not counted.
fn account_lost(lost: &mut LostBatches, data: &[u8], from: usize) {
    let mut pos = from;
    // A damaged batch of unknown seq seen and not yet counted.
    let mut unknown_before = false;
    while pos < data.len() {
        let whole = batch::decode_header(&data[pos..]).ok().and_then(|h| {
            let end = pos + h.total_len();
            if end > data.len() {
                return None;
            }
            batch::decode(&data[pos..end]).ok().map(|b| (b, end))
        });
        let was_whole = whole.is_some();
        let (seq, bookmark, extents, next) = match whole {
            Some((b, end)) => {
                let extents: Vec<_> = b
                    .records()
                    .filter(|r| r.header.kind.changes_bytes())
                    .map(|r| (r.header.volume, r.header.offset, r.header.length))
                    .collect();
                (Some(b.header.seq), b.header.bookmark, Some(extents), end)
            }
            None => {
                lost.damaged += 1;
                match batch::salvage(&data[pos..]) {
                    Some(d) => {
                        let next = pos + d.header.total_len();
                        let next = if next > data.len() {
                            data.len()
                        } else {
                            next_batch_at(data, next).unwrap_or(data.len())
                        };
                        (Some(d.header.seq), d.header.bookmark, d.extents, next)
                    }
                    None => (
                        None,
                        None,
                        None,
                        next_batch_at(data, pos + 1).unwrap_or(data.len()),
                    ),
                }
            }
        };
        match seq {
            Some(seq) if seq < lost.first_seq => {
                // Acknowledged before the stop: not lost, and neither is a damaged batch of
                // unknown seq before it.
                if !was_whole {
                    lost.damaged -= 1;
                }
                if std::mem::take(&mut unknown_before) {
                    lost.damaged -= 1;
                }
            }
            Some(seq) if seq == lost.first_seq && unknown_before => {
                // The unreadable batch before it came before the first seq lost.
                unknown_before = false;
                lost.damaged -= 1;
                count(lost, Some(seq), bookmark, extents);
            }
            None => {
                // Not known yet whether it was acknowledged: the next readable seq tells.
                if std::mem::replace(&mut unknown_before, true) {
                    count(lost, None, None, None);
                }
            }
            Some(seq) => {
                if std::mem::take(&mut unknown_before) {
                    count(lost, None, None, None);
                }
                count(lost, Some(seq), bookmark, extents);
            }
        }
        pos = next;
    }
    if unknown_before {
        count(lost, None, None, None);
    }
}

/// Counts one lost batch in `lost`.
fn count(
    lost: &mut LostBatches,
    seq: Option<Seq>,
    bookmark: Option<String>,
    extents: Option<Vec<(cdp_shared::types::VolumeId, u64, u32)>>,
) {
    lost.batches += 1;
    if let Some(seq) = seq {
        lost.last_seq = lost.last_seq.max(seq);
    }
    if let Some(b) = bookmark {
        lost.bookmarks.push(b);
    }
    match extents {
        Some(e) => lost.extents.extend(e),
        None => lost.unknown_extents = true,
    }
}

/// Moves `data[from..]` of the segment at `path` into `DIR/damaged/` (the whole file when
/// `from` is 0) and cuts the segment there.
fn move_damaged(
    dir: &Path,
    path: &Path,
    data: &[u8],
    from: usize,
    lost: &LostBatches,
) -> Result<(), SpoolError> {
    let to = &lost.moved_to;
    fs::create_dir_all(to).map_err(io_err(to))?;
    let name = path.file_name().map(|n| n.to_owned()).unwrap_or_default();
    let target = to.join(name);
    if from == 0 {
        fs::rename(path, &target).map_err(io_err(&target))?;
        return Ok(());
    }
    let mut f = File::create(&target).map_err(io_err(&target))?;
    f.write_all(&data[from..])
        .and_then(|()| f.sync_all())
        .map_err(io_err(&target))?;
    File::open(to)
        .and_then(|d| d.sync_all())
        .map_err(io_err(to))?;
    let seg = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    seg.set_len(from as u64).map_err(io_err(path))?;
    seg.sync_all().map_err(io_err(path))?;
    let _ = dir;
    Ok(())
}

/// The names of the spool's segment files in `dir`, oldest first.
fn segment_ids(dir: &Path) -> Result<Vec<u64>, SpoolError> {
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
    Ok(ids)
}

/// What [`Spool::open`] has found so far, one segment after another, oldest first.
struct Scan {
    /// The newest trimmed batch: batches up to it are not held again.
    trimmed_seq: Seq,
    trimmed_hash: Hash,
    entries: BTreeMap<Seq, Entry>,
    /// Each segment's good length.
    segments: BTreeMap<u64, u64>,
    truncated_bytes: u64,
    last_seq: Seq,
    last_hash: Hash,
    /// Set at the first damaged batch: it and everything after it leave the spool.
    lost: Option<LostBatches>,
}

impl Scan {
    fn new(trimmed_seq: Seq, trimmed_hash: Hash) -> Scan {
        Scan {
            trimmed_seq,
            trimmed_hash,
            entries: BTreeMap::new(),
            segments: BTreeMap::new(),
            truncated_bytes: 0,
            last_seq: trimmed_seq,
            last_hash: trimmed_hash,
            lost: None,
        }
    }

    /// Reads segment `id` (`is_last`: the one the writer was appending to), holds its good
    /// batches, and cuts a torn tail, or moves out what follows damage.
    fn segment(&mut self, dir: &Path, id: u64, is_last: bool) -> Result<(), SpoolError> {
        let path = segment_path(dir, id);
        let data = fs::read(&path).map_err(io_err(&path))?;
        if let Some(lost) = self.lost.as_mut() {
            // Everything after damage is out of the spool, read only to know its chunks.
            account_lost(
                lost,
                &data,
                segment_layout(&data).map_or(data.len(), |l| l.0),
            );
            move_damaged(dir, &path, &data, 0, lost)?;
            return Ok(());
        }
        let Some((start, durable_end)) = segment_layout(&data) else {
            // Not even a whole header: a segment torn while it was being created.
            self.truncated_bytes += data.len() as u64;
            tracing::warn!(segment = %path.display(), bytes = data.len(), "removed a spool segment torn at its creation");
            fs::remove_file(&path).map_err(io_err(&path))?;
            return Ok(());
        };
        // A segment the writer left was synced whole before it went on.
        let durable_end = if is_last {
            durable_end
        } else {
            data.len() as u64
        };
        let good = self.batches(dir, &path, id, &data, start, durable_end)?;
        if good < data.len() as u64 {
            if self.lost.is_none() {
                self.truncated_bytes += data.len() as u64 - good;
                tracing::warn!(segment = %path.display(), bytes = data.len() as u64 - good, "truncated a torn spool segment tail (past the segment's durable end: no flush was answered for it)");
            }
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io_err(&path))?;
            f.set_len(good).map_err(io_err(&path))?;
            f.sync_all().map_err(io_err(&path))?;
        }
        self.segments.insert(id, good);
        Ok(())
    }

    /// Checks the batches of segment `id` (`data`, at `path`) from `start` and holds those
    /// past the trimmed one; returns where the last good batch ends. A batch that fails its
    /// checks ends the segment: past `durable_end` a torn tail, before it damage.
    fn batches(
        &mut self,
        dir: &Path,
        path: &Path,
        id: u64,
        data: &[u8],
        start: usize,
        durable_end: u64,
    ) -> Result<u64, SpoolError> {
        let mut pos = start;
        let mut good = start as u64;
        while pos < data.len() {
            let decoded = batch::decode_header(&data[pos..]).ok().and_then(|h| {
                let end = pos + h.total_len();
                (end <= data.len() && batch::decode(&data[pos..end]).is_ok()).then_some((h, end))
            });
            let Some((header, end)) = decoded else {
                if (pos as u64) < durable_end {
                    self.damaged(dir, path, data, pos)?;
                }
                break;
            };
            if header.seq > self.trimmed_seq {
                if self.last_seq.0 != 0 && header.seq != self.last_seq.next() {
                    return Err(SpoolError::Damaged {
                        path: path.to_path_buf(),
                        reason: format!("seq {} follows seq {}", header.seq, self.last_seq),
                    });
                }
                self.entries.insert(
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
                self.last_seq = header.seq;
                self.last_hash = header.header_hash;
            }
            pos = end;
            good = pos as u64;
        }
        Ok(good)
    }

    /// The batch at `pos` of `data` (segment `path`) is damaged, before the segment's durable
    /// end: it and every later batch leave the spool, unless only acknowledged ones did.
    fn damaged(
        &mut self,
        dir: &Path,
        path: &Path,
        data: &[u8],
        pos: usize,
    ) -> Result<(), SpoolError> {
        let mut l = LostBatches {
            segment: path.to_path_buf(),
            first_seq: self.last_seq.next(),
            last_seq: self.last_seq,
            moved_to: dir.join(DAMAGED_DIR),
            ..LostBatches::default()
        };
        account_lost(&mut l, data, pos);
        if l.batches == 0 {
            // Only acknowledged batches were damaged: nothing is lost.
            tracing::warn!(segment = %path.display(), offset = pos, "a damaged spool batch was acknowledged already; it is dropped");
            return Ok(());
        }
        let l = self.lost.insert(l);
        move_damaged(dir, path, data, pos, l)
    }
}

/// Makes the moves of damaged batches out of `dir` durable and tells the operator.
fn report_lost(dir: &Path, l: &LostBatches) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    tracing::error!(
        segment = %l.segment.display(),
        "the spool is damaged: {} batch(es) from seq {} (up to seq {} at least) failed their checks or follow one that did, {} of them damaged; they are moved to {}, their chunks are resynced from the devices{}",
        l.batches,
        l.first_seq,
        l.last_seq,
        l.damaged,
        l.moved_to.display(),
        if l.bookmarks.is_empty() {
            String::new()
        } else {
            format!(
                ", and their bookmarks ({}) are no longer points: take them again",
                l.bookmarks.join(", ")
            )
        }
    );
    Ok(())
}

impl Spool {
    /// Opens (creating) the spool in `dir`, checks every batch in it, truncates a torn tail, and
    /// starts the writer thread.
    pub fn open(dir: &Path) -> Result<(Spool, Recovered), SpoolError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let (trimmed_seq, trimmed_hash) = read_trimmed(dir)?;
        let ids = segment_ids(dir)?;
        let mut scan = Scan::new(trimmed_seq, trimmed_hash);
        let last_id = ids.last().copied();
        for id in ids {
            scan.segment(dir, id, Some(id) == last_id)?;
        }
        if let Some(l) = &scan.lost {
            report_lost(dir, l)?;
        }
        Spool::start(dir, scan)
    }

    /// Starts the writer thread over what `scan` found in `dir`.
    fn start(dir: &Path, scan: Scan) -> Result<(Spool, Recovered), SpoolError> {
        let Scan {
            trimmed_seq,
            trimmed_hash,
            entries,
            segments,
            truncated_bytes,
            last_seq,
            last_hash,
            lost,
        } = scan;
        let first_held = entries.keys().next().copied().unwrap_or(last_seq.next());
        let held_bytes = entries.values().map(|e| e.len).sum();
        let (appended, _) = watch::channel(last_seq);
        let (written, _) = watch::channel(last_seq);
        let (durable, _) = watch::channel(last_seq);
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            state: Mutex::new(State {
                entries,
                segments,
                cached_bytes: 0,
                held_bytes,
                totals: SpoolTotals::default(),
                acked: trimmed_seq,
                acked_hash: trimmed_hash,
                trim_to: None,
                failed: None,
            }),
            appended,
            written,
            durable,
            skipped: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::channel();
        let writer_shared = shared.clone();
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer_thread(writer_shared, rx, trimmed_seq, last_seq))
            .map_err(io_err(dir))?;
        Ok((
            Spool { shared, tx },
            Recovered {
                last_seq,
                last_hash,
                first_held,
                truncated_bytes,
                lost,
            },
        ))
    }

    /// Queues a sealed batch (seq must follow the last appended one). Returns at once.
    pub fn append(&self, batch: SealedBatch) {
        {
            let mut st = self.lock();
            st.cached_bytes += batch.bytes.len();
            st.held_bytes += batch.bytes.len() as u64;
            st.totals.appended_batches += 1;
            st.totals.appended_bytes += batch.bytes.len() as u64;
            st.entries.insert(
                batch.seq,
                Entry {
                    time_ns: batch.agent_time_ns,
                    segment: 0,
                    offset: 0,
                    len: batch.bytes.len() as u64,
                    hash: batch.header_hash,
                    cached: Some(batch.bytes.clone()),
                    written: false,
                },
            );
        }
        let seq = batch.seq;
        // The writer thread only stops when every handle is gone.
        let _ = self.tx.send(Cmd::Append(batch));
        self.shared.appended.send_replace(seq);
    }

    /// Waits until every batch up to `seq` is safe: durable in the spool, or acknowledged by
    /// the replica, whichever comes first (the writer is asked to write and sync at once).
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
        let acked_seq = {
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
                st.totals.acked_batches += 1;
                if let Some(b) = e.cached {
                    freed_cached += b.len();
                }
            }
            st.cached_bytes -= freed_cached;
            st.held_bytes -= freed_held;
            st.totals.acked_bytes += freed_held;
            st.acked = acked_seq;
            st.acked_hash = acked_hash;
            st.trim_to = Some((acked_seq, acked_hash));
            acked_seq
        };
        // What the replica holds durably is safe: a flush waiting for it is answered now,
        // whether or not the writer has reached it.
        self.shared.advance_durable(acked_seq);
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

    /// The newest seq queued: what the sender may send (from memory).
    pub fn appended(&self) -> Seq {
        *self.shared.appended.borrow()
    }
    pub fn subscribe_appended(&self) -> watch::Receiver<Seq> {
        self.shared.appended.subscribe()
    }
    /// The newest seq the writer put in a segment file, or the trimmed one. Batches the
    /// replica acknowledged before the writer reached them are never written.
    pub fn written(&self) -> Seq {
        *self.shared.written.borrow()
    }
    /// Every batch up to it is safe: durable in the spool or acknowledged by the replica.
    pub fn durable(&self) -> Seq {
        *self.shared.durable.borrow()
    }
    /// Batches never written because the replica acknowledged them first.
    pub fn skipped_batches(&self) -> u64 {
        self.shared.skipped.load(Ordering::Relaxed)
    }

    /// Batches and bytes held (not yet acknowledged).
    pub fn held(&self) -> (u64, u64) {
        let st = self.lock();
        (st.entries.len() as u64, st.held_bytes)
    }

    /// Batches and bytes appended and acknowledged since the spool was opened.
    pub fn totals(&self) -> SpoolTotals {
        self.lock().totals
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

    /// The header hash of batch `seq`, if the spool knows it: a batch it holds, or the
    /// newest acknowledged one.
    pub fn hash_of(&self, seq: Seq) -> Option<Hash> {
        let st = self.lock();
        match st.entries.get(&seq) {
            Some(e) => Some(e.hash),
            None => (seq == st.acked).then_some(st.acked_hash),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batcher::{Batcher, BatcherConfig};
    use cdp_shared::batch::{BatchFlags, RecordKind, encode_marker};
    use std::time::Instant;

    fn make(b: &mut Batcher) -> SealedBatch {
        let mut rec = Vec::new();
        encode_marker(0, RecordKind::Zero, 0, 512, 0, &mut rec);
        b.push(&rec, 1, false, false, Instant::now(), 0);
        b.seal(BatchFlags::FLUSH, None, false, 0).expect("sealed")
    }

    /// The catch-up asks the spool for its batch at the replica's seq: held batches and the
    /// newest acknowledged one are known (also after a reopen and a reset), older ones not.
    #[tokio::test]
    async fn the_hash_of_a_held_or_the_newest_acknowledged_batch_is_known() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut b = Batcher::new("g", BatcherConfig::default(), Seq(0), [0; 32]);
        let (spool, _) = Spool::open(dir.path()).expect("open");
        assert_eq!(spool.hash_of(Seq(0)), Some([0; 32]));
        let mut hashes = Vec::new();
        for _ in 0..4 {
            let s = make(&mut b);
            hashes.push(s.header_hash);
            spool.append(s);
        }
        assert_eq!(spool.hash_of(Seq(3)), Some(hashes[2]));
        assert_eq!(spool.hash_of(Seq(5)), None);
        spool.ack(Seq(2));
        assert_eq!(spool.hash_of(Seq(2)), Some(hashes[1]));
        assert_eq!(spool.hash_of(Seq(1)), None);
        spool.wait_durable(Seq(4)).await.expect("durable");
        drop(spool);
        let (spool, _) = Spool::open(dir.path()).expect("reopen");
        assert_eq!(spool.hash_of(Seq(2)), Some(hashes[1]));
        assert_eq!(spool.hash_of(Seq(4)), Some(hashes[3]));
        spool.reset_blocking(Seq(9), [7; 32]).expect("reset");
        assert_eq!(spool.hash_of(Seq(9)), Some([7; 32]));
        assert_eq!(spool.hash_of(Seq(4)), None);
    }

    #[tokio::test]
    async fn append_sync_reopen_truncate_and_trim() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut b = Batcher::new("g", BatcherConfig::default(), Seq(0), [0; 32]);
        let (spool, rec) = Spool::open(dir.path()).expect("open");
        assert_eq!(rec.last_seq, Seq(0));
        let mut hashes = Vec::new();
        for _ in 0..5 {
            let s = make(&mut b);
            hashes.push(s.header_hash);
            spool.append(s);
        }
        spool.wait_durable(Seq(5)).await.expect("durable");
        assert_eq!(spool.durable(), Seq(5));
        assert!(spool.get(Seq(3)).expect("get").is_some());
        drop(spool);

        // A torn tail: half a batch appended after the last one.
        let seg = segment_path(dir.path(), 1);
        let mut data = fs::read(&seg).expect("read");
        let start = SEGMENT_HEADER_BYTES as usize;
        let half = data[start..start + 100].to_vec();
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
        let s6 = make(&mut b);
        let h6 = s6.header_hash;
        assert!(spool.held_bytes() > 0);
        spool.ack(Seq(5));
        // Whoever the acknowledgement wakes sees the room it made, without waiting for the
        // writer thread.
        assert_eq!(
            spool.held(),
            (0, 0),
            "acknowledged batches are forgotten at once"
        );
        spool.append(s6);
        spool.wait_durable(Seq(6)).await.expect("durable");
        spool.ack(Seq(6));
        spool.wait_durable(Seq(6)).await.expect("still durable");
        drop(spool);
        let (_spool, rec) = Spool::open(dir.path()).expect("reopen");
        assert_eq!(rec.last_seq, Seq(6));
        assert_eq!(rec.last_hash, h6);
    }

    /// Waits, with a deadline, until `cond` holds.
    async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Batches the replica acknowledges before the writer reaches them are never written; a
    /// batch written after them is readable on reopen (the trimmed seq names the batch before
    /// it), and a spool that stopped with acknowledged batches unwritten reopens at a head the
    /// replica's chain runs through.
    #[tokio::test]
    async fn acknowledged_batches_are_never_written_and_the_chain_survives_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut b = Batcher::new("g", BatcherConfig::default(), Seq(0), [0; 32]);
        let (spool, _) = Spool::open(dir.path()).expect("open");
        let mut hashes = Vec::new();
        for _ in 0..5 {
            let s = make(&mut b);
            hashes.push(s.header_hash);
            spool.append(s);
        }
        assert_eq!(
            spool.appended(),
            Seq(5),
            "the sender may send from memory at once"
        );
        spool.ack(Seq(5));
        // Safe through the ack: a flush waiting for seq 5 is answered without the spool.
        assert_eq!(spool.durable(), Seq(5));
        spool.wait_durable(Seq(5)).await.expect("durable");
        eventually("the writer to skip the acknowledged batches", || {
            spool.skipped_batches() == 5
        })
        .await;
        assert_eq!(spool.written(), Seq(0), "nothing acknowledged is written");

        // Two more, made durable by the spool itself.
        for _ in 0..2 {
            let s = make(&mut b);
            hashes.push(s.header_hash);
            spool.append(s);
        }
        spool.wait_durable(Seq(7)).await.expect("durable");
        assert_eq!(spool.written(), Seq(7));
        assert_eq!(spool.skipped_batches(), 5);
        drop(spool);
        let (spool, rec) = Spool::open(dir.path()).expect("reopen");
        assert_eq!(rec.last_seq, Seq(7));
        assert_eq!(rec.last_hash, hashes[6]);
        assert_eq!(
            rec.first_held,
            Seq(6),
            "the acknowledged batches are not held again"
        );
        let got = spool.get(Seq(6)).expect("get").expect("held");
        assert_eq!(batch::decode(&got).expect("decode").header.seq, Seq(6));

        // Acknowledged and never written, then the agent stops: the spool reopens at a head
        // it holds the hash of, on the chain the replica continues.
        let mut b = Batcher::new("g", BatcherConfig::default(), rec.last_seq, rec.last_hash);
        for _ in 0..3 {
            let s = make(&mut b);
            hashes.push(s.header_hash);
            spool.append(s);
        }
        spool.ack(Seq(10));
        eventually("the writer to skip the acknowledged batches", || {
            spool.skipped_batches() == 3
        })
        .await;
        drop(spool);
        let (_spool, rec) = Spool::open(dir.path()).expect("reopen");
        assert!(
            rec.last_seq == Seq(7) || rec.last_seq == Seq(10),
            "head {} is the last batch written or the acknowledged one",
            rec.last_seq
        );
        assert_eq!(rec.last_hash, hashes[rec.last_seq.0 as usize - 1]);
        // Batches 6 and 7 are held again until the trimmed seq passes them (the replica's
        // welcome acknowledges them at once).
        let first_held = if rec.last_seq == Seq(7) {
            Seq(6)
        } else {
            Seq(11)
        };
        assert_eq!(rec.first_held, first_held);
    }

    /// A reset (a rebase on the replica's head) takes the sender's view back too: batches of
    /// the old chain past the new head are not there to send.
    #[tokio::test]
    async fn a_reset_to_an_earlier_seq_takes_the_appended_seq_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut b = Batcher::new("g", BatcherConfig::default(), Seq(0), [0; 32]);
        let (spool, _) = Spool::open(dir.path()).expect("open");
        for _ in 0..3 {
            spool.append(make(&mut b));
        }
        assert_eq!(spool.appended(), Seq(3));
        spool.reset_blocking(Seq(0), [0; 32]).expect("reset");
        assert_eq!(spool.appended(), Seq(0));
        assert_eq!(spool.get(Seq(1)).expect("get"), None);
        assert_eq!(spool.written(), Seq(0));
    }

    /// The held bytes decide when a group overflows: they must follow every append and ack
    /// exactly (a release-mode test, like every counter that drives a decision).
    #[tokio::test]
    async fn held_bytes_follow_appends_and_acks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut b = Batcher::new("g", BatcherConfig::default(), Seq(0), [0; 32]);
        let (spool, _) = Spool::open(dir.path()).expect("open");
        let mut lens = Vec::new();
        for _ in 0..20 {
            let s = make(&mut b);
            lens.push(s.bytes.len() as u64);
            spool.append(s);
        }
        assert_eq!(spool.held(), (20, lens.iter().sum()));
        for (acked, seq) in [(5usize, 5u64), (5, 3), (12, 12), (20, 20)] {
            spool.ack(Seq(seq));
            assert_eq!(
                spool.held(),
                ((20 - acked) as u64, lens[acked..].iter().sum()),
                "after an ack of seq {seq}"
            );
            // The metrics' totals, recomputed: appended less acknowledged is what is held.
            let t = spool.totals();
            assert_eq!(
                (t.appended_batches, t.appended_bytes),
                (20, lens.iter().sum())
            );
            assert_eq!(
                (t.acked_batches, t.acked_bytes),
                (acked as u64, lens[..acked].iter().sum()),
                "after an ack of seq {seq}"
            );
        }
        spool.wait_durable(Seq(20)).await.expect("durable");
    }

    /// The past fault (a sync stuck in `wait_for_room`): the link frees the spool with `ack`
    /// and then publishes the ack to the group's waiters. A waiter that looks at the spool's
    /// room once the ack is published, whether it was already waiting (woken by it) or starts
    /// looking only afterwards, must see the room the ack made, without the writer thread.
    #[tokio::test]
    async fn an_ack_frees_room_before_its_waiters_look() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut b = Batcher::new("g", BatcherConfig::default(), Seq(0), [0; 32]);
        let (spool, _) = Spool::open(dir.path()).expect("open");
        let mut lens = Vec::new();
        for _ in 0..4 {
            let s = make(&mut b);
            lens.push(s.bytes.len() as u64);
            spool.append(s);
        }
        // Room once at most two batches are held.
        let room_below = lens[..2].iter().sum::<u64>() + 1;
        let (acked, _) = watch::channel(Seq(0));
        // The waiter of `wait_for_room`: look, then wait for the next ack, and look again.
        let wait_for_room = |spool: Spool, mut rx: watch::Receiver<Seq>| async move {
            loop {
                rx.borrow_and_update();
                if spool.held_bytes() < room_below {
                    return;
                }
                if rx.changed().await.is_err() {
                    panic!("the ack watch closed");
                }
            }
        };

        // Waiting already when the ack comes.
        let waiter = tokio::spawn(wait_for_room(spool.clone(), acked.subscribe()));
        tokio::task::yield_now().await;
        spool.ack(Seq(2));
        acked.send_replace(Seq(2));
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("the waiter woken by the ack sees its room")
            .expect("waiter");

        // Looking only after the ack: the first look sees the room.
        let s = make(&mut b);
        spool.append(s);
        spool.ack(Seq(4));
        acked.send_replace(Seq(4));
        let rx = acked.subscribe();
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            wait_for_room(spool.clone(), rx),
        )
        .await
        .expect("a waiter looking after the ack sees its room");
        assert_eq!(spool.held().0, 1);
        spool.wait_durable(Seq(5)).await.expect("durable");
    }

    /// Five durable batches (the third a bookmark); `damage` changes the segment's bytes.
    async fn spool_of_five(dir: &Path) -> (Vec<Hash>, Vec<(u64, u64)>) {
        let mut b = Batcher::new("g", BatcherConfig::default(), Seq(0), [0; 32]);
        let (spool, _) = Spool::open(dir).expect("open");
        let mut hashes = Vec::new();
        let mut spans = Vec::new();
        let mut at = SEGMENT_HEADER_BYTES;
        for i in 0..5u64 {
            let mut rec = Vec::new();
            encode_marker(0, RecordKind::Zero, i << 20, 512, 0, &mut rec);
            b.push(&rec, 1, false, false, Instant::now(), 0);
            let name = (i == 2).then_some("mark");
            let s = b.seal(BatchFlags::FLUSH, name, false, 0).expect("sealed");
            let h = s.header_hash;
            spans.push((at, s.bytes.len() as u64));
            at += s.bytes.len() as u64;
            hashes.push(h);
            spool.append(s);
        }
        spool.wait_durable(Seq(5)).await.expect("durable");
        (hashes, spans)
    }

    #[tokio::test]
    async fn a_damaged_durable_batch_is_reported_not_cut_as_a_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (hashes, spans) = spool_of_five(dir.path()).await;
        // One byte of batch 3's payload flipped while the agent was stopped.
        let seg = segment_path(dir.path(), 1);
        let mut data = fs::read(&seg).expect("read");
        let (at, len) = spans[2];
        data[(at + len - 1) as usize] ^= 0x10;
        fs::write(&seg, &data).expect("write");

        let (spool, rec) = Spool::open(dir.path()).expect("reopen");
        assert_eq!(rec.truncated_bytes, 0, "damage is not a torn tail");
        let lost = rec.lost.expect("the damage is reported");
        assert_eq!((lost.first_seq, lost.last_seq), (Seq(3), Seq(5)));
        assert_eq!((lost.batches, lost.damaged), (3, 1));
        assert!(
            !lost.unknown_extents,
            "the damaged batch's records are readable"
        );
        assert_eq!(
            lost.extents,
            vec![(0, 2 << 20, 512), (0, 3 << 20, 512), (0, 4 << 20, 512)],
            "the chunks of every lost batch are named"
        );
        assert_eq!(lost.bookmarks, vec!["mark".to_owned()]);
        assert_eq!(lost.segment, seg);
        // The log continues after the last good batch; the lost bytes are kept aside.
        assert_eq!((rec.last_seq, rec.last_hash), (Seq(2), hashes[1]));
        assert_eq!(spool.held().0, 2);
        let kept = fs::read(
            dir.path()
                .join(DAMAGED_DIR)
                .join(seg.file_name().expect("name")),
        )
        .expect("moved bytes");
        assert_eq!(kept.len() as u64, spans[2].1 + spans[3].1 + spans[4].1);
        drop(spool);
        // Opening again finds a clean spool.
        let (_spool, rec) = Spool::open(dir.path()).expect("reopen");
        assert!(rec.lost.is_none());
        assert_eq!(rec.last_seq, Seq(2));
    }

    #[tokio::test]
    async fn a_batch_with_a_damaged_header_is_skipped_to_the_next_whole_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, spans) = spool_of_five(dir.path()).await;
        let seg = segment_path(dir.path(), 1);
        let mut data = fs::read(&seg).expect("read");
        data[(spans[1].0 + 30) as usize] ^= 1; // batch 2's seq
        fs::write(&seg, &data).expect("write");
        let (_spool, rec) = Spool::open(dir.path()).expect("reopen");
        let lost = rec.lost.expect("reported");
        assert_eq!((lost.first_seq, lost.last_seq), (Seq(2), Seq(5)));
        assert_eq!((lost.batches, lost.damaged), (4, 1));
        assert!(lost.unknown_extents, "batch 2's records cannot be read");
        assert_eq!(lost.extents.len(), 3, "batches 3 to 5 are read whole");
        assert_eq!(rec.last_seq, Seq(1));
    }

    #[tokio::test]
    async fn a_torn_tail_past_the_durable_end_is_still_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, spans) = spool_of_five(dir.path()).await;
        let seg = segment_path(dir.path(), 1);
        // The last batch's bytes torn: the durable end is past it, so this is damage...
        let mut data = fs::read(&seg).expect("read");
        let (at, len) = spans[4];
        data.truncate((at + len / 2) as usize);
        fs::write(&seg, &data).expect("write");
        let (_spool, rec) = Spool::open(dir.path()).expect("reopen");
        assert!(
            rec.lost.is_some(),
            "bytes before the durable end are damage"
        );
        // ... while bytes appended after the durable end are a torn tail.
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, spans) = spool_of_five(dir.path()).await;
        let seg = segment_path(dir.path(), 1);
        let mut data = fs::read(&seg).expect("read");
        let extra = data[spans[0].0 as usize..(spans[0].0 + 50) as usize].to_vec();
        data.extend_from_slice(&extra);
        fs::write(&seg, &data).expect("write");
        let (_spool, rec) = Spool::open(dir.path()).expect("reopen");
        assert!(rec.lost.is_none());
        assert_eq!((rec.truncated_bytes, rec.last_seq), (50, Seq(5)));
    }
}
