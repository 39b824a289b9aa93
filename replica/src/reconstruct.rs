//! Reconstruction: the image of a volume at seq S = its target file overlaid by its journal
//! records with seq in (base, S], the later winning (DESIGN 3.8). A reader holds a pin on S
//! (`pins`) for as long as it reads: the trimmer may meanwhile apply records ≤ S to the target
//! file and delete their rows, but every byte it writes there is covered by a record of the
//! plan, so the plan still reads the image at S, and no segment the plan reads is unlinked.
//!
//! * [`Plan`] is the sans-IO part: an extent map (a `BTreeMap` from start offset to
//!   (end, [`Source`])) built from the index rows in overlay order. Every byte of the volume
//!   maps to exactly one source: the target file (where no record covers it), zeros (zero and
//!   trim records), or one data record together with the volume offset where that record's
//!   data begins — so a piece split off an extent still reads the right bytes.
//! * [`ImageReader`] reads the image with `read_at`: each output byte is read once, from the
//!   target file or from one record; each record needed by a call is read from its segment once
//!   (record header + stored bytes in one pread), checked against its index row, decoded and
//!   checked against its blake3 hash. A caller that reads chunk-aligned ranges (restore reads
//!   whole chunks) reads every record exactly once, since records never cross chunks.
//! * [`RecordLoader`] is the one place that reads a journal record back (the image reader and
//!   the trimmer use it).

use cdp_shared::types::Seq;
use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use cdp_shared::batch::{Encoding, RECORD_HEADER_BYTES, RecordHeader, RecordKind};
use cdp_shared::types::CHUNK_BYTES;

use crate::catalog::RecordRow;
use crate::error::{ReplicaError, Result};
use crate::journal::SegmentReader;

/// Where a range of the image comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The target file at the same offset.
    Target,
    /// Zeros (a zero or trim record).
    Zero,
    /// Data record `record` (an index into [`Plan::records`]) whose data starts at volume
    /// offset `base`: the byte at offset `o` is the record's byte `o - base`.
    Record { record: u32, base: u64 },
}

/// A journaled record the plan may read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordRef {
    pub seq: Seq,
    pub idx: u32,
    pub offset: u64,
    pub length: u32,
    pub kind: RecordKind,
    pub segment: u64,
    pub position: u64,
}

impl RecordRef {
    pub fn from_row(row: &RecordRow) -> Result<RecordRef> {
        let kind = RecordKind::from_u8(row.kind)
            .filter(|k| k.changes_bytes())
            .ok_or_else(|| {
                ReplicaError::CatalogCorrupt(format!(
                    "record row of seq {} has kind {}",
                    row.seq, row.kind
                ))
            })?;
        Ok(RecordRef {
            seq: row.seq,
            idx: row.idx,
            offset: row.chunk * CHUNK_BYTES + u64::from(row.chunk_offset),
            length: row.length,
            kind,
            segment: row.segment,
            position: row.position,
        })
    }
}

/// A piece of a read: `len` bytes at volume offset `offset`, from `source`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub offset: u64,
    pub len: u64,
    pub source: Source,
}

/// The reconstruction plan of one volume at one point (sans-IO).
#[derive(Clone, Debug, Default)]
pub struct Plan {
    size: u64,
    records: Vec<RecordRef>,
    /// start -> (end, source); disjoint; gaps read from the target.
    extents: BTreeMap<u64, (u64, Source)>,
}

impl Plan {
    pub fn new(size: u64) -> Plan {
        Plan {
            size,
            records: Vec::new(),
            extents: BTreeMap::new(),
        }
    }

    /// Builds the plan from records given in overlay order (for each byte, the later record
    /// comes later; the catalog's key order (chunk, seq, idx) is such an order).
    pub fn build(size: u64, records: impl IntoIterator<Item = RecordRef>) -> Result<Plan> {
        let mut plan = Plan::new(size);
        for r in records {
            plan.overlay(r)?;
        }
        Ok(plan)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn records(&self) -> &[RecordRef] {
        &self.records
    }

    /// Extents not read from the target.
    pub fn extent_count(&self) -> usize {
        self.extents.len()
    }

    /// Lays `r` over everything before it.
    pub fn overlay(&mut self, r: RecordRef) -> Result<()> {
        let start = r.offset;
        let end = r.offset + u64::from(r.length);
        if r.length == 0 || end > self.size {
            return Err(ReplicaError::CatalogCorrupt(format!(
                "record {}/{} lies outside the volume",
                r.seq, r.idx
            )));
        }
        let source = if r.kind == RecordKind::Data {
            let record = u32::try_from(self.records.len())
                .map_err(|_| ReplicaError::Task("too many records in one plan".into()))?;
            self.records.push(r);
            Source::Record {
                record,
                base: r.offset,
            }
        } else {
            Source::Zero
        };
        // An extent starting before `start` that reaches into it: keep its left part, and its
        // right part if it also reaches past `end`.
        if let Some((&s, &(e, src))) = self.extents.range(..start).next_back()
            && e > start
        {
            self.extents.insert(s, (start, src));
            if e > end {
                self.extents.insert(end, (e, src));
            }
        }
        // Extents starting inside [start, end): drop them, keeping a tail past `end`.
        let inside: Vec<u64> = self.extents.range(start..end).map(|(&s, _)| s).collect();
        for s in inside {
            if let Some((e, src)) = self.extents.remove(&s)
                && e > end
            {
                self.extents.insert(end, (e, src));
            }
        }
        self.extents.insert(start, (end, source));
        Ok(())
    }

    /// The pieces that make up `[offset, offset + len)`, in order, covering it exactly.
    pub fn pieces(&self, offset: u64, len: u64) -> Vec<Piece> {
        let end = (offset + len).min(self.size);
        let mut out = Vec::new();
        let mut at = offset;
        let first = self
            .extents
            .range(..=offset)
            .next_back()
            .filter(|(_, (e, _))| *e > offset)
            .map(|(&s, _)| s)
            .unwrap_or(offset);
        for (&s, &(e, src)) in self.extents.range(first..end) {
            if s > at {
                out.push(Piece {
                    offset: at,
                    len: s - at,
                    source: Source::Target,
                });
                at = s;
            }
            let piece_end = e.min(end);
            if piece_end > at {
                out.push(Piece {
                    offset: at,
                    len: piece_end - at,
                    source: src,
                });
                at = piece_end;
            }
        }
        if at < end {
            out.push(Piece {
                offset: at,
                len: end - at,
                source: Source::Target,
            });
        }
        out
    }
}

/// Reads journal records back from one group's segments: each record is read in one pread
/// (header + stored bytes), checked against its index row, decoded and checked against its
/// blake3 hash. Used by [`ImageReader`] and by the trimmer, which applies records to the target
/// files.
pub struct RecordLoader {
    segments: SegmentReader,
    decompressor: zstd::bulk::Decompressor<'static>,
    /// Record bytes as stored (header + data), reused.
    raw: Vec<u8>,
    records_read: u64,
    /// Where set, raw records checked whole by this loader are noted here, and
    /// [`RecordLoader::read_checked_part`] may read part of them again from the page cache.
    checked: Option<Arc<CheckedRecords>>,
    parts_read: u64,
}

/// Raw records (by segment and position) that a reader has read whole and found to match
/// their index row and hash, shared by the record loaders of one image (see
/// [`crate::lazy_image`]). Bounded: when [`CHECKED_RECORDS_MAX`] are noted, the set starts
/// again empty (a record forgotten is only read whole and checked again).
#[derive(Debug, Default)]
pub struct CheckedRecords {
    set: Mutex<HashSet<(u64, u64)>>,
}

/// The most records a [`CheckedRecords`] notes (about 40 MiB of memory at most).
pub const CHECKED_RECORDS_MAX: usize = 1 << 20;

impl CheckedRecords {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<(u64, u64)>> {
        // A set of keys cannot be left half-updated: a poisoned lock is used as it is.
        self.set.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn note(&self, r: &RecordRef) {
        let mut set = self.lock();
        if set.len() >= CHECKED_RECORDS_MAX {
            set.clear();
        }
        set.insert((r.segment, r.position));
    }

    fn contains(&self, r: &RecordRef) -> bool {
        self.lock().contains(&(r.segment, r.position))
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl RecordLoader {
    pub fn new(journal_dir: &Path) -> Result<RecordLoader> {
        let decompressor = zstd::bulk::Decompressor::new()
            .map_err(|e| ReplicaError::Task(format!("zstd decompressor: {e}")))?;
        Ok(RecordLoader {
            segments: SegmentReader::new(journal_dir),
            decompressor,
            raw: Vec::new(),
            records_read: 0,
            checked: None,
            parts_read: 0,
        })
    }

    /// A loader that notes the raw records it checks in `checked`, and reads parts of the
    /// records noted there from the page cache ([`RecordLoader::read_checked_part`]).
    pub fn with_checked(journal_dir: &Path, checked: Arc<CheckedRecords>) -> Result<RecordLoader> {
        let mut l = RecordLoader::new(journal_dir)?;
        l.checked = Some(checked);
        Ok(l)
    }

    /// Data records read (whole, and checked) so far.
    pub fn records_read(&self) -> u64 {
        self.records_read
    }

    /// Parts of checked records read so far ([`RecordLoader::read_checked_part`]).
    pub fn parts_read(&self) -> u64 {
        self.parts_read
    }

    /// Fills `out` with the data bytes of record `r` from its byte `at`, if `r` is a raw
    /// record this image's loaders have read whole and checked already, its segment is open
    /// here, and the bytes are in the page cache; `Ok(false)` otherwise, and the caller loads
    /// the record whole (checking it again). What comes from the disk is thus always checked
    /// against its hash; a part comes unchecked only from pages the kernel kept since (see
    /// [`crate::lazy_image`] for what that trusts).
    pub fn read_checked_part(&mut self, r: &RecordRef, at: u64, out: &mut [u8]) -> Result<bool> {
        let Some(checked) = &self.checked else {
            return Ok(false);
        };
        if r.kind != RecordKind::Data
            || at + out.len() as u64 > u64::from(r.length)
            || !checked.contains(r)
        {
            return Ok(false);
        }
        let position = r.position + RECORD_HEADER_BYTES as u64 + at;
        let got = self.segments.read_cached_at(r.segment, position, out)?;
        if got {
            self.parts_read += 1;
        }
        Ok(got)
    }

    /// Reads data record `r` of volume `agent_volume_id` from its segment into `out`, after
    /// checking it against its row and its hash; returns where in `out` its decoded bytes lie
    /// (a raw record is checked where it was read, header in front, rather than copied again).
    pub fn load(
        &mut self,
        r: &RecordRef,
        agent_volume_id: u32,
        out: &mut Vec<u8>,
    ) -> Result<Range<usize>> {
        self.load_with(r, agent_volume_id, out, false)?
            .ok_or_else(|| ReplicaError::Task("a blocking record read declined".into()))
    }

    /// Like [`RecordLoader::load`] if the record's bytes are in the page cache and its segment
    /// is open here already; `Ok(None)` when that would mean waiting for the disk.
    pub fn load_cached(
        &mut self,
        r: &RecordRef,
        agent_volume_id: u32,
        out: &mut Vec<u8>,
    ) -> Result<Option<Range<usize>>> {
        self.load_with(r, agent_volume_id, out, true)
    }

    fn load_with(
        &mut self,
        r: &RecordRef,
        agent_volume_id: u32,
        out: &mut Vec<u8>,
        cached_only: bool,
    ) -> Result<Option<Range<usize>>> {
        let want = RECORD_HEADER_BYTES + r.length as usize;
        self.raw.resize(want, 0);
        let got = if cached_only {
            if !self
                .segments
                .read_cached_at(r.segment, r.position, &mut self.raw)?
            {
                return Ok(None);
            }
            want
        } else {
            self.segments
                .read_at(r.segment, r.position, &mut self.raw)?
        };
        let damaged = |why: String| {
            ReplicaError::JournalCorrupt(format!(
                "record {} of batch {} (segment {}, position {}): {why}",
                r.idx, r.seq, r.segment, r.position
            ))
        };
        let h =
            RecordHeader::decode(&self.raw[..got], r.idx).map_err(|e| damaged(e.to_string()))?;
        if h.volume != agent_volume_id
            || h.kind != r.kind
            || h.offset != r.offset
            || h.length != r.length
        {
            return Err(damaged("the record header does not match the index".into()));
        }
        let stored_end = RECORD_HEADER_BYTES + h.stored_len as usize;
        if stored_end > got {
            return Err(damaged("the segment ends inside the record".into()));
        }
        let stored = &self.raw[RECORD_HEADER_BYTES..stored_end];
        let range = match h.encoding {
            Encoding::Raw => {
                h.check_raw(stored).map_err(|e| damaged(e.to_string()))?;
                if let Some(checked) = &self.checked {
                    checked.note(r);
                }
                // The bytes read are the record's: hand them over, keep `out`'s buffer.
                std::mem::swap(&mut self.raw, out);
                RECORD_HEADER_BYTES..stored_end
            }
            Encoding::Zstd => {
                h.decode_data(stored, &mut self.decompressor, out)
                    .map_err(|e| damaged(e.to_string()))?;
                0..out.len()
            }
        };
        self.records_read += 1;
        Ok(Some(range))
    }
}

/// Decoded records of one read (reused between reads): what [`read_planned`] loaded, and
/// spare buffers.
#[derive(Default)]
pub struct ReadScratch {
    /// Records loaded by the current call: (record index in the plan, buffer, where in the
    /// buffer its decoded bytes lie).
    loaded: Vec<(u32, Vec<u8>, Range<usize>)>,
    /// Spare buffers for `loaded`.
    pool: Vec<Vec<u8>>,
}

/// Spare buffers a [`ReadScratch`] keeps between reads ([`ReadScratch::keep_small`]), and
/// the largest it keeps.
const SCRATCH_SPARES_MAX: usize = 64;
const SCRATCH_SPARE_BYTES_MAX: usize = 256 * 1024;

impl ReadScratch {
    /// Gives back this call's buffers, keeping at most [`SCRATCH_SPARES_MAX`] small ones for
    /// the next read (so that scratch kept idle in a pool holds little memory).
    pub fn keep_small(&mut self) {
        for (_, b, _) in self.loaded.drain(..) {
            self.pool.push(b);
        }
        self.pool
            .retain(|b| b.capacity() <= SCRATCH_SPARE_BYTES_MAX);
        self.pool.truncate(SCRATCH_SPARES_MAX);
    }
}

/// Where [`read_planned`] reads from: the target file and the group's journal.
pub struct ImageSources<'a> {
    pub target: &'a File,
    pub target_path: &'a Path,
    pub records: &'a mut RecordLoader,
    pub agent_volume_id: u32,
    /// Where set, [`ReadMode::Blocking`] reads of the target file skip its holes (zeros
    /// filled here instead of pages the kernel would allocate and zero): for a reader going
    /// through the image once, like a restore. Left `None` where reads repeat (an export),
    /// so the page cache keeps what they read.
    pub holes: Option<&'a mut TargetHoles>,
}

/// The target file's layout around the last read, learnt with `SEEK_DATA` / `SEEK_HOLE`, so
/// that a read of a hole costs a `memset` of a buffer already backed, not a page cache of
/// zeros (reading the holes of a sparse target was most of a restore's time).
///
/// Right while the trimmer runs, for the reason the target file's bytes are (see
/// [`crate::lazy_image`]): the target is only read where no record of the plan covers a
/// byte, and nothing writes such a byte while the pin holds, so a byte in a hole when the
/// layout was asked is zero in the image, whenever it is read.
#[derive(Debug, Default)]
pub struct TargetHoles {
    known: Option<Extent>,
}

/// `[from, data)` is a hole, `[data, hole)` holds data.
#[derive(Clone, Copy, Debug)]
struct Extent {
    from: u64,
    data: u64,
    hole: u64,
}

impl TargetHoles {
    /// Fills `out` with the target file's bytes at `offset`, reading only its data extents.
    fn read(&mut self, file: &File, path: &Path, out: &mut [u8], offset: u64) -> Result<()> {
        let end = offset + out.len() as u64;
        let mut pos = offset;
        while pos < end {
            let e = match self.known {
                Some(e) if e.from <= pos && pos < e.hole => e,
                _ => {
                    let e = extent_at(file, pos);
                    self.known = Some(e);
                    e
                }
            };
            let at = (pos - offset) as usize;
            if pos < e.data {
                let n = (e.data.min(end) - pos) as usize;
                out[at..at + n].fill(0);
                pos += n as u64;
            } else {
                let n = (e.hole.min(end) - pos) as usize;
                file.read_exact_at(&mut out[at..at + n], pos)
                    .map_err(ReplicaError::io("read target file", path))?;
                pos += n as u64;
            }
        }
        Ok(())
    }
}

/// The extent of `file` that `pos` starts: a hole up to the next data (none: the rest of the
/// file), then data up to the next hole. Where the file system cannot tell (or answers
/// something that makes no progress), all of it is taken as data, which reading gets right.
fn extent_at(file: &File, pos: u64) -> Extent {
    use rustix::fs::{SeekFrom, seek};
    let all_data = Extent {
        from: pos,
        data: pos,
        hole: u64::MAX,
    };
    match seek(file, SeekFrom::Data(pos)) {
        // No data at or after `pos` (the caller checked the file is as long as the volume).
        Err(rustix::io::Errno::NXIO) => Extent {
            from: pos,
            data: u64::MAX,
            hole: u64::MAX,
        },
        Err(_) => all_data,
        Ok(data) if data < pos => all_data,
        Ok(data) => match seek(file, SeekFrom::Hole(data)) {
            Ok(hole) if hole > data => Extent {
                from: pos,
                data,
                hole,
            },
            _ => Extent {
                from: pos,
                data,
                hole: u64::MAX,
            },
        },
    }
}

/// How [`read_planned`] may read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadMode {
    /// Wait for the disk where needed (on the blocking pool).
    Blocking,
    /// Only what the page cache holds, from segments already open: the read gives up
    /// (`Ok(false)`) rather than wait, so that it can run on an async task.
    CachedOnly,
}

/// Fills `buf` with the image bytes at `offset` as `plan` describes them: each byte is read
/// once, from the target file, from one record (each record needed is read and hash-checked
/// once per call), or zeros. `offset + buf.len()` must not pass the end of the volume.
/// `Ok(false)` only in [`ReadMode::CachedOnly`], when some byte is not cached (`buf` is then
/// partly filled, and the caller reads again with [`ReadMode::Blocking`]).
pub fn read_planned(
    plan: &Plan,
    offset: u64,
    buf: &mut [u8],
    src: &mut ImageSources<'_>,
    scratch: &mut ReadScratch,
    mode: ReadMode,
) -> Result<bool> {
    let len = buf.len() as u64;
    if offset + len > plan.size {
        return Err(ReplicaError::Task(format!(
            "read of {len} bytes at {offset} passes the end of the volume ({} bytes)",
            plan.size
        )));
    }
    for (_, b, _) in scratch.loaded.drain(..) {
        scratch.pool.push(b);
    }
    for piece in plan.pieces(offset, len) {
        let at = (piece.offset - offset) as usize;
        let out = &mut buf[at..at + piece.len as usize];
        match piece.source {
            Source::Zero => out.fill(0),
            Source::Target => match mode {
                ReadMode::Blocking => match src.holes.as_deref_mut() {
                    Some(holes) => holes.read(src.target, src.target_path, out, piece.offset)?,
                    None => src
                        .target
                        .read_exact_at(out, piece.offset)
                        .map_err(ReplicaError::io("read target file", src.target_path))?,
                },
                ReadMode::CachedOnly => {
                    let cached = cdp_shared::fileio::read_cached_at(src.target, out, piece.offset)
                        .map_err(ReplicaError::io("read target file", src.target_path))?;
                    if !cached {
                        return Ok(false);
                    }
                }
            },
            Source::Record { record, base } => {
                let i = match scratch.loaded.iter().position(|(r, _, _)| *r == record) {
                    Some(i) => i,
                    None => {
                        let r = plan.records[record as usize];
                        if src
                            .records
                            .read_checked_part(&r, piece.offset - base, out)?
                        {
                            continue;
                        }
                        let mut data = scratch.pool.pop().unwrap_or_default();
                        let got = match mode {
                            ReadMode::Blocking => {
                                Some(src.records.load(&r, src.agent_volume_id, &mut data)?)
                            }
                            ReadMode::CachedOnly => {
                                src.records
                                    .load_cached(&r, src.agent_volume_id, &mut data)?
                            }
                        };
                        let Some(range) = got else {
                            scratch.pool.push(data);
                            return Ok(false);
                        };
                        scratch.loaded.push((record, data, range));
                        scratch.loaded.len() - 1
                    }
                };
                let (_, data, range) = &scratch.loaded[i];
                let from = range.start + (piece.offset - base) as usize;
                out.copy_from_slice(&data[from..from + piece.len as usize]);
            }
        }
    }
    Ok(true)
}

/// Reads the image described by a [`Plan`] (target file + journal segments).
pub struct ImageReader {
    plan: Plan,
    agent_volume_id: u32,
    target_path: std::path::PathBuf,
    target: File,
    records: RecordLoader,
    scratch: ReadScratch,
    holes: TargetHoles,
}

impl ImageReader {
    pub fn open(
        plan: Plan,
        agent_volume_id: u32,
        target: &Path,
        journal_dir: &Path,
    ) -> Result<ImageReader> {
        let file = File::open(target).map_err(ReplicaError::io("open target file", target))?;
        crate::target::check_len(&file, target, plan.size)?;
        Ok(ImageReader {
            plan,
            agent_volume_id,
            target_path: target.to_path_buf(),
            target: file,
            records: RecordLoader::new(journal_dir)?,
            scratch: ReadScratch::default(),
            holes: TargetHoles::default(),
        })
    }

    pub fn size(&self) -> u64 {
        self.plan.size
    }

    /// Data records read from the journal so far.
    pub fn records_read(&self) -> u64 {
        self.records.records_read()
    }

    /// Fills `buf` with the image bytes at `offset` (`offset + buf.len()` must not pass the
    /// end of the volume).
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut src = ImageSources {
            target: &self.target,
            target_path: &self.target_path,
            records: &mut self.records,
            agent_volume_id: self.agent_volume_id,
            holes: Some(&mut self.holes),
        };
        read_planned(
            &self.plan,
            offset,
            buf,
            &mut src,
            &mut self.scratch,
            ReadMode::Blocking,
        )
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(n: u32, offset: u64, length: u32, kind: RecordKind) -> RecordRef {
        RecordRef {
            seq: Seq(u64::from(n)),
            idx: 0,
            offset,
            length,
            kind,
            segment: 1,
            position: 0,
        }
    }

    /// The plan applied to a model: which "writer" (0 = target, 255 = zero, n = record n) owns
    /// each byte.
    fn owners(plan: &Plan) -> Vec<u8> {
        let mut v = Vec::new();
        for p in plan.pieces(0, plan.size()) {
            let who = match p.source {
                Source::Target => 0,
                Source::Zero => 255,
                Source::Record { record, base } => {
                    let r = plan.records()[record as usize];
                    assert!(
                        base == r.offset
                            && p.offset >= base
                            && p.offset + p.len <= base + u64::from(r.length)
                    );
                    r.seq.0 as u8
                }
            };
            v.extend(std::iter::repeat_n(who, p.len as usize));
        }
        v
    }

    /// A sparse target read through its holes: every byte as a plain read of the file says,
    /// in any order of reads (the layout kept from one read is reused by the next, forwards
    /// and backwards), and the holes were known as holes where the file system tells.
    #[test]
    fn target_reads_skip_holes_and_return_every_byte() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("target");
        let size = 8 * CHUNK_BYTES;
        let file = File::create(&path).expect("create");
        file.set_len(size).expect("size");
        let mut model = vec![0u8; size as usize];
        // Data extents of several sizes; everything else is a hole.
        for (n, (at, len)) in [
            (0u64, 4096u64),
            (CHUNK_BYTES + 12 * 4096, 8 * 4096),
            (3 * CHUNK_BYTES - 4096, 2 * 4096),
            (5 * CHUNK_BYTES, CHUNK_BYTES + 4096),
            (size - 4096, 4096),
        ]
        .into_iter()
        .enumerate()
        {
            let data: Vec<u8> = (0..len).map(|i| ((i + n as u64) % 251) as u8 + 1).collect();
            file.write_all_at(&data, at).expect("write");
            model[at as usize..(at + len) as usize].copy_from_slice(&data);
        }
        file.sync_all().expect("sync");
        // Zero records over part of a data extent: read as zeros whatever the target says.
        let plan = Plan::build(
            size,
            [rec(1, 5 * CHUNK_BYTES + 8192, 4096, RecordKind::Zero)],
        )
        .expect("plan");
        model[(5 * CHUNK_BYTES + 8192) as usize..(5 * CHUNK_BYTES + 3 * 4096) as usize].fill(0);
        let journal = dir.path().join("journal");
        std::fs::create_dir(&journal).expect("journal dir");
        let mut reader = ImageReader::open(plan, 1, &path, &journal).expect("open");
        let mut reads: Vec<(u64, u64)> = (0..size / CHUNK_BYTES)
            .map(|c| (c * CHUNK_BYTES, CHUNK_BYTES))
            .collect();
        reads.extend([
            (CHUNK_BYTES + 11 * 4096, 3 * 4096),
            (4096, 4096),
            (3 * CHUNK_BYTES - 6000, 9000),
            (0, size),
            (6 * CHUNK_BYTES + 1, 5),
            (5 * CHUNK_BYTES - 1, 2),
        ]);
        for (at, len) in reads {
            let mut buf = vec![0xeeu8; len as usize];
            reader.read_at(at, &mut buf).expect("read");
            assert!(
                buf == model[at as usize..(at + len) as usize],
                "bytes differ in the read of {len} at {at}"
            );
        }
        // Where the file system reports holes at all, the one after the first block is one,
        // and the reader went through the layout (the last read, 2 bytes at the end of chunk
        // 4, lies in the hole that runs up to chunk 5's data).
        let e = extent_at(&file, 4096);
        if e.data != 4096 {
            assert_eq!((e.from, e.data), (4096, CHUNK_BYTES + 12 * 4096));
            let known = reader.holes.known.expect("the reader asked for the layout");
            assert_eq!(known.data, 5 * CHUNK_BYTES, "{known:?}");
        }
        drop(dir);
    }

    #[test]
    fn a_target_shorter_than_the_volume_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("target");
        File::create(&path)
            .expect("create")
            .set_len(CHUNK_BYTES)
            .expect("size");
        let err = ImageReader::open(Plan::new(2 * CHUNK_BYTES), 1, &path, dir.path())
            .err()
            .expect("a short target is refused");
        assert!(err.to_string().contains("bytes long"), "{err}");
    }

    #[test]
    fn later_records_win_and_split_pieces_keep_their_base() {
        let plan = Plan::build(
            100,
            [
                rec(1, 10, 50, RecordKind::Data),
                rec(2, 20, 10, RecordKind::Data),
                rec(3, 25, 2, RecordKind::Zero),
                rec(4, 55, 20, RecordKind::Trim),
                rec(5, 0, 5, RecordKind::Data),
            ],
        )
        .expect("plan");
        let mut model = vec![0u8; 100];
        for (n, (o, l)) in [
            (1u8, (10, 50)),
            (2, (20, 10)),
            (255, (25, 2)),
            (255, (55, 20)),
            (5, (0, 5)),
        ] {
            model[o..o + l].fill(n);
        }
        assert_eq!(owners(&plan), model);
        // A sub-range starting inside an extent.
        let pieces = plan.pieces(22, 10);
        assert_eq!(pieces.first().map(|p| p.offset), Some(22));
        assert_eq!(pieces.iter().map(|p| p.len).sum::<u64>(), 10);
    }

    proptest::proptest! {
        #[test]
        fn plan_matches_a_byte_model(ops in proptest::collection::vec((0u64..200, 1u32..60, 0u8..3), 0..40)) {
            let size = 256u64;
            let mut model = vec![0u8; size as usize];
            let mut records = Vec::new();
            for (i, (o, l, k)) in ops.into_iter().enumerate() {
                let l = l.min((size - o) as u32);
                let kind = [RecordKind::Data, RecordKind::Zero, RecordKind::Trim][k as usize];
                let n = i as u8 + 1;
                model[o as usize..(o + u64::from(l)) as usize].fill(if kind == RecordKind::Data { n } else { 255 });
                records.push(rec(u32::from(n), o, l, kind));
            }
            let plan = Plan::build(size, records).expect("plan");
            proptest::prop_assert_eq!(owners(&plan), model);
        }
    }
}
