//! The journal of one consistency group: append-only segment files of batches exactly as
//! received, and the only code that fsyncs them.
//!
//! ```text
//! journal/<group>/<16-digit segment number>.seg
//! segment = header batch*
//! header  = magic "CDPJ" | version u16 | reserved u16 (0) | segment number u64   (16 bytes)
//! ```
//! Batches are appended byte for byte as they arrived (the batch format of
//! `cdp_shared::batch`); the catalog knows where each one starts. A segment is closed once it
//! holds [`SEGMENT_BYTES_TARGET`] (a batch is never split, so a segment may exceed the target
//! by at most one batch) and the next number is opened.
//!
//! Segments only ever get new numbers (a segment number is never reused while older ones are
//! still on disk), so segment order is seq order. The trimmer unlinks the segments at the
//! front whose batches have all been applied to the target files
//! ([`remove_segments_before`]); the committed end's segment is never among them. In the
//! segment where the trimmed part of the journal ends, it releases the trimmed bytes' disk
//! blocks at once by punching a hole over them ([`punch_trimmed`]): a journal of one large
//! segment shrinks on disk as soon as retention trims it.
//!
//! A batch of at least [`DIRECT_BYTES_MIN`] is written with `O_DIRECT`, from an aligned buffer
//! the journal reuses, at the next multiple of [`DIRECT_ALIGN`] (the bytes skipped to get
//! there, and those after the batch up to the next multiple, belong to no batch and are never
//! read): writing fresh page-cache pages cost more than half the replica's CPU at full speed on
//! a VM (about 10 µs a page), and the journal is read back rarely (restores, exports, the
//! trimmer). Smaller batches are written buffered, packed. On a filesystem that refuses
//! `O_DIRECT`, every batch is written buffered.
//!
//! Two positions are kept apart: *written* (appended, maybe only in the page cache) and
//! *durable* (fsynced). [`Journal::sync`] moves durable up to written. Bytes past the durable
//! end, or past what committed catalog rows describe, are not part of the journal: on start
//! [`Journal::recover`] truncates them away.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use cdp_shared::batch::BATCH_BYTES_MAX;

use crate::datadir::sync_dir;
use crate::error::{ReplicaError, Result};

/// Where a journaled batch lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentSpan {
    pub segment: u64,
    pub position: u64,
    pub length: u64,
}

impl SegmentSpan {
    pub fn end(&self) -> u64 {
        self.position + self.length
    }
}

pub const SEGMENT_MAGIC: [u8; 4] = *b"CDPJ";
pub const SEGMENT_VERSION: u16 = 1;
pub const SEGMENT_HEADER_BYTES: u64 = 16;
/// A segment is rotated once it holds this many bytes.
pub const SEGMENT_BYTES_TARGET: u64 = 256 << 20;
/// Largest possible segment: the target plus one batch (aligned for `O_DIRECT`).
pub const SEGMENT_BYTES_MAX: u64 = SEGMENT_BYTES_TARGET + BATCH_BYTES_MAX as u64 + DIRECT_ALIGN;
/// Batches at least this long are written with `O_DIRECT` (see the module doc).
pub const DIRECT_BYTES_MIN: usize = 256 << 10;
/// Alignment of a direct write's position, length and memory: the largest logical block
/// size of the devices Linux knows, and the page size.
pub const DIRECT_ALIGN: u64 = 4096;

const _: () = assert!(SEGMENT_BYTES_TARGET > BATCH_BYTES_MAX as u64);
const _: () = assert!(SEGMENT_BYTES_TARGET.is_multiple_of(DIRECT_ALIGN));
const _: () = assert!(SEGMENT_BYTES_TARGET == crate::datadir::SEGMENT_SIZE_MAX);
/// Bytes a group commit leaves free on the journal's filesystem ([`Journal::check_room`]).
pub const DISK_RESERVE_BYTES: u64 = 2 << 20;
const _: () = assert!(SEGMENT_BYTES_MAX <= u32::MAX as u64);

/// File name of segment `n`.
pub fn segment_name(n: u64) -> String {
    format!("{n:016}.seg")
}

fn segment_number(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 16 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn segment_header(n: u64) -> [u8; SEGMENT_HEADER_BYTES as usize] {
    let mut h = [0u8; SEGMENT_HEADER_BYTES as usize];
    h[0..4].copy_from_slice(&SEGMENT_MAGIC);
    h[4..6].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    h[8..16].copy_from_slice(&n.to_le_bytes());
    h
}

/// Checks a segment header read from disk.
pub fn check_segment_header(bytes: &[u8], n: u64) -> std::result::Result<(), String> {
    if bytes.len() < SEGMENT_HEADER_BYTES as usize {
        return Err("the segment header is truncated".into());
    }
    if bytes[0..4] != SEGMENT_MAGIC {
        return Err("the segment has bad magic".into());
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version != SEGMENT_VERSION {
        return Err(format!(
            "segment format version {version} is not supported (this build reads {SEGMENT_VERSION})"
        ));
    }
    if bytes[8..16] != n.to_le_bytes() {
        return Err("the segment header names another segment number".into());
    }
    Ok(())
}

/// A position in the journal: a segment and a byte offset in it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct JournalPos {
    pub segment: u64,
    pub offset: u64,
}

/// What [`Journal::recover`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// (segment, bytes cut from its tail)
    pub truncated: Option<(u64, u64)>,
    /// Segment files deleted because no committed row references them.
    pub deleted: Vec<u64>,
}

struct OpenSegment {
    number: u64,
    file: File,
    /// The same file opened with `O_DIRECT`, once a direct write needed it; `None` before.
    direct: Option<File>,
}

/// `n` rounded up to a multiple of [`DIRECT_ALIGN`].
fn align_up(n: u64) -> u64 {
    n.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN
}

/// Whether the bytes of `file` from `end` to `len` are a direct write's padding: zeros, up to
/// the next multiple of [`DIRECT_ALIGN`] after `end`. A read error says no.
fn is_padding(file: &File, end: u64, len: u64) -> bool {
    if len > align_up(end) {
        return false;
    }
    let mut tail = vec![0u8; (len - end) as usize];
    file.read_exact_at(&mut tail, end).is_ok() && tail.iter().all(|&b| b == 0)
}

/// The reused, aligned buffer of direct writes.
#[derive(Default)]
struct DirectBuffer {
    buf: Vec<u8>,
}

impl DirectBuffer {
    /// `batch` followed by zeros up to a multiple of [`DIRECT_ALIGN`], in memory aligned to it.
    fn fill(&mut self, batch: &[u8]) -> &[u8] {
        let len = align_up(batch.len() as u64) as usize;
        let align = DIRECT_ALIGN as usize;
        if self.buf.len() < len + align {
            // Grown once to the largest batch there is, so its pages stay backed.
            self.buf = vec![0; align_up(BATCH_BYTES_MAX as u64) as usize + align];
        }
        let start = self.buf.as_ptr().align_offset(align);
        let out = &mut self.buf[start..start + len];
        out[..batch.len()].copy_from_slice(batch);
        out[batch.len()..].fill(0);
        out
    }
}

/// The append side of one group's journal.
pub struct Journal {
    dir: PathBuf,
    /// A segment is rotated once it holds this many bytes ([`SEGMENT_BYTES_TARGET`] unless a
    /// test shrinks it).
    segment_bytes_target: u64,
    open: Option<OpenSegment>,
    written: JournalPos,
    durable: JournalPos,
    /// A segment file was created since the last sync: the directory needs an fsync too.
    dir_dirty: bool,
    /// Whether large batches are written with `O_DIRECT`: cleared for good when the
    /// filesystem refuses it.
    direct_io: bool,
    direct_buf: DirectBuffer,
}

impl Journal {
    /// Opens the journal directory of a group after a start, making it agree with the catalog:
    /// `committed` is where the last committed journaled batch lies (None when there is none;
    /// once the trimmer has removed every journaled batch row, a span of length 0 where the
    /// last trimmed one ended).
    /// Segment files newer than the committed one are deleted, and the committed segment's
    /// tail past the committed end is truncated.
    pub fn recover(
        dir: &Path,
        committed: Option<SegmentSpan>,
    ) -> Result<(Journal, RecoveryReport)> {
        fs::create_dir_all(dir).map_err(ReplicaError::io("create directory", dir))?;
        let mut numbers = Vec::new();
        for entry in fs::read_dir(dir).map_err(ReplicaError::io("list", dir))? {
            let entry = entry.map_err(ReplicaError::io("list", dir))?;
            if let Some(n) = entry.file_name().to_str().and_then(segment_number) {
                numbers.push(n);
            }
        }
        numbers.sort_unstable();
        let mut report = RecoveryReport::default();
        let last_committed = committed.map(|c| c.segment).unwrap_or(0);
        for &n in numbers.iter().filter(|&&n| n > last_committed) {
            let path = dir.join(segment_name(n));
            fs::remove_file(&path)
                .map_err(ReplicaError::io("delete uncommitted segment", &path))?;
            report.deleted.push(n);
        }
        if !report.deleted.is_empty() {
            sync_dir(dir)?;
        }
        let mut journal = Journal {
            dir: dir.to_path_buf(),
            segment_bytes_target: SEGMENT_BYTES_TARGET,
            open: None,
            written: JournalPos::default(),
            durable: JournalPos::default(),
            dir_dirty: false,
            direct_io: true,
            direct_buf: DirectBuffer::default(),
        };
        let Some(c) = committed else {
            journal.written = JournalPos {
                segment: 0,
                offset: 0,
            };
            journal.durable = journal.written;
            return Ok((journal, report));
        };
        let path = dir.join(segment_name(c.segment));
        if !numbers.contains(&c.segment) {
            return Err(ReplicaError::JournalCorrupt(format!(
                "segment {} holds committed batches but is missing",
                path.display()
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(ReplicaError::io("open", &path))?;
        let mut header = [0u8; SEGMENT_HEADER_BYTES as usize];
        file.read_exact_at(&mut header, 0)
            .map_err(ReplicaError::io("read the header of", &path))?;
        check_segment_header(&header, c.segment)
            .map_err(|e| ReplicaError::JournalCorrupt(format!("{}: {e}", path.display())))?;
        let len = file
            .metadata()
            .map_err(ReplicaError::io("stat", &path))?
            .len();
        let end = c.end();
        if len < end {
            return Err(ReplicaError::JournalCorrupt(format!(
                "segment {} is {len} bytes long but committed batches end at {end}",
                path.display()
            )));
        }
        if len > end {
            // A direct write's zeros after the last batch are no uncommitted bytes to report.
            let padding = is_padding(&file, end, len);
            file.set_len(end)
                .map_err(ReplicaError::io("truncate", &path))?;
            file.sync_all().map_err(ReplicaError::io("fsync", &path))?;
            if !padding {
                report.truncated = Some((c.segment, len - end));
            }
        }
        journal.written = JournalPos {
            segment: c.segment,
            offset: end,
        };
        journal.durable = journal.written;
        journal.open = Some(OpenSegment {
            number: c.segment,
            file,
            direct: None,
        });
        Ok((journal, report))
    }

    /// Rotates segments at `bytes` instead of [`SEGMENT_BYTES_TARGET`] (tests make many small
    /// segments; at most the default, at least one segment header).
    pub fn set_segment_bytes_target(&mut self, bytes: u64) {
        self.segment_bytes_target = bytes.clamp(SEGMENT_HEADER_BYTES + 1, SEGMENT_BYTES_TARGET);
    }

    /// Where the next append goes (appended, not necessarily durable).
    pub fn written(&self) -> JournalPos {
        self.written
    }

    /// The end of what is fsynced.
    pub fn durable(&self) -> JournalPos {
        self.durable
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Refuses, as a full disk (`ENOSPC` on the journal's directory), a commit that would
    /// leave less than [`DISK_RESERVE_BYTES`] free on the journal's filesystem once `bytes`
    /// more are appended: the catalog, often on the same filesystem, keeps room for the
    /// transaction of the trim that frees the disk again.
    pub fn check_room(&self, bytes: u64) -> Result<()> {
        let st = rustix::fs::statvfs(&self.dir)
            .map_err(|e| ReplicaError::io("statvfs", &self.dir)(e.into()))?;
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        if free < bytes.saturating_add(DISK_RESERVE_BYTES) {
            return Err(ReplicaError::io("append to", &self.dir)(
                std::io::Error::from_raw_os_error(rustix::io::Errno::NOSPC.raw_os_error()),
            ));
        }
        Ok(())
    }

    /// Appends one whole batch; returns where it starts. Rotates to a new segment first when
    /// the open one has reached its target size. Not durable until [`Journal::sync`].
    pub fn append(&mut self, batch: &[u8]) -> Result<SegmentSpan> {
        assert!(!batch.is_empty() && batch.len() <= BATCH_BYTES_MAX);
        let rotate = match &self.open {
            None => true,
            Some(_) => self.written.offset >= self.segment_bytes_target,
        };
        if rotate {
            self.rotate()?;
        }
        let Some(open) = &mut self.open else {
            unreachable!("rotate opens a segment")
        };
        let path = self.dir.join(segment_name(open.number));
        let mut position = self.written.offset;
        let mut written = false;
        if self.direct_io && batch.len() >= DIRECT_BYTES_MIN {
            match write_direct(open, &path, position, &mut self.direct_buf, batch) {
                Ok(at) => {
                    position = at;
                    written = true;
                }
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                    tracing::warn!(
                        "the journal's filesystem refuses O_DIRECT writes to {} ({e}); \
                         writing every batch through the page cache",
                        path.display()
                    );
                    self.direct_io = false;
                    open.direct = None;
                }
                Err(e) => return Err(ReplicaError::io("append to", &path)(e)),
            }
        }
        if !written {
            open.file
                .write_all_at(batch, position)
                .map_err(ReplicaError::io("append to", &path))?;
        }
        self.written.offset = position + batch.len() as u64;
        debug_assert!(self.written.offset <= SEGMENT_BYTES_MAX);
        Ok(SegmentSpan {
            segment: open.number,
            position,
            length: batch.len() as u64,
        })
    }

    fn rotate(&mut self) -> Result<()> {
        // The old segment's bytes must be durable before a newer segment can be relied on.
        self.sync()?;
        let number = self.written.segment + 1;
        let path = self.dir.join(segment_name(number));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(ReplicaError::io("create segment", &path))?;
        file.write_all_at(&segment_header(number), 0)
            .map_err(ReplicaError::io("write the header of", &path))?;
        self.open = Some(OpenSegment {
            number,
            file,
            direct: None,
        });
        self.written = JournalPos {
            segment: number,
            offset: SEGMENT_HEADER_BYTES,
        };
        self.dir_dirty = true;
        Ok(())
    }

    /// Makes everything written durable: fdatasync of the open segment, and of the directory
    /// when a segment was created. An error here is fatal for the group (the caller stops
    /// rather than acknowledge bytes that may not be on disk).
    pub fn sync(&mut self) -> Result<()> {
        if self.written == self.durable && !self.dir_dirty {
            return Ok(());
        }
        if let Some(open) = &self.open {
            let path = self.dir.join(segment_name(open.number));
            open.file
                .sync_data()
                .map_err(ReplicaError::io("fsync", &path))?;
        }
        if self.dir_dirty {
            sync_dir(&self.dir)?;
            self.dir_dirty = false;
        }
        self.durable = self.written;
        Ok(())
    }

    /// Undoes a group commit that failed on a full disk: forgets everything appended after
    /// `to` (the durable end when the commit began). Segment files newer than `to.segment`
    /// are deleted (one the commit created, even one whose header could not be written), and
    /// the segment of `to` is cut back to `to.offset`. Afterwards the journal is as it was
    /// before the commit began. Nothing is fsynced here: bytes past `to` that a crash might
    /// leave behind are described by no committed row, so recovery removes them anyway, and the
    /// next [`Journal::sync`] makes the shorter length durable with the next bytes.
    pub fn rollback_to(&mut self, to: JournalPos) -> Result<()> {
        assert!(to <= self.written, "a rollback goes back, not forth");
        let mut newer = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(ReplicaError::io("list", &self.dir))? {
            let entry = entry.map_err(ReplicaError::io("list", &self.dir))?;
            if let Some(n) = entry.file_name().to_str().and_then(segment_number)
                && n > to.segment
            {
                newer.push(n);
            }
        }
        if self.open.as_ref().is_some_and(|o| o.number != to.segment) {
            self.open = None;
        }
        for n in newer {
            let path = self.dir.join(segment_name(n));
            fs::remove_file(&path)
                .map_err(ReplicaError::io("delete an uncommitted segment", &path))?;
            self.dir_dirty = true;
        }
        if to.segment > 0 {
            let path = self.dir.join(segment_name(to.segment));
            if self.open.is_none() {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(ReplicaError::io("open", &path))?;
                self.open = Some(OpenSegment {
                    number: to.segment,
                    file,
                    direct: None,
                });
            }
            if let Some(open) = &self.open {
                let len = open
                    .file
                    .metadata()
                    .map_err(ReplicaError::io("stat", &path))?
                    .len();
                if len > to.offset {
                    open.file
                        .set_len(to.offset)
                        .map_err(ReplicaError::io("truncate", &path))?;
                }
            }
        }
        self.written = to;
        self.durable = to;
        Ok(())
    }
}

/// Writes `batch` with `O_DIRECT` at the first multiple of [`DIRECT_ALIGN`] at or after `end`
/// (the segment's written end), padded with zeros to a multiple of it; returns the position.
/// `EINVAL` means the filesystem refuses direct I/O (nothing was written).
fn write_direct(
    open: &mut OpenSegment,
    path: &Path,
    end: u64,
    buf: &mut DirectBuffer,
    batch: &[u8],
) -> io::Result<u64> {
    if open.direct.is_none() {
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(path)?;
        open.direct = Some(file);
    }
    let Some(direct) = &open.direct else {
        unreachable!("opened above")
    };
    let position = align_up(end);
    direct.write_all_at(buf.fill(batch), position)?;
    Ok(position)
}

/// Unlinks the segment files of the journal in `dir` numbered below `keep_from` (the trimmer's
/// step (e): every batch in them has been applied to the target files and no reader needs
/// them), then fsyncs the directory. Returns the numbers unlinked, in order. A file already
/// gone is skipped, so a step cut short by a crash is simply done again.
pub fn remove_segments_before(dir: &Path, keep_from: u64) -> Result<Vec<u64>> {
    let mut old = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(old),
        Err(e) => return Err(ReplicaError::io("list", dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(ReplicaError::io("list", dir))?;
        if let Some(n) = entry.file_name().to_str().and_then(segment_number)
            && n < keep_from
        {
            old.push(n);
        }
    }
    old.sort_unstable();
    for &n in &old {
        let path = dir.join(segment_name(n));
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(ReplicaError::io("unlink trimmed segment", &path)(e)),
        }
    }
    if !old.is_empty() {
        sync_dir(dir)?;
    }
    Ok(old)
}

/// The granularity of [`punch_trimmed`]: the segment's first page (its header) is kept, and
/// only whole pages are released.
pub const PUNCH_ALIGN_BYTES: u64 = 4096;

/// Frees the disk blocks of segment `segment` of the journal in `dir` before `end` (the
/// trimmer's step (e) on the segment that holds the journal's trimmed end: every byte of it
/// before `end` belongs to batches applied to the target files, and no reader needs them).
/// The bytes become a hole (`fallocate(PUNCH_HOLE | KEEP_SIZE)`): offsets and the file's
/// length stay as they were, so the catalog's positions and the segment's header (the first
/// page is kept) are unchanged. Returns the bytes released; 0 when there is less than a page
/// to release, when the segment is gone, or when the filesystem cannot punch holes (the
/// bytes are then freed only when the whole segment is unlinked). Idempotent.
pub fn punch_trimmed(dir: &Path, segment: u64, end: u64) -> Result<u64> {
    let from = PUNCH_ALIGN_BYTES;
    let to = end - end % PUNCH_ALIGN_BYTES;
    if to <= from {
        return Ok(0);
    }
    let path = dir.join(segment_name(segment));
    let file = match OpenOptions::new().write(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(ReplicaError::io("open", &path)(e)),
    };
    match rustix::fs::fallocate(
        &file,
        rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
        from,
        to - from,
    ) {
        Ok(()) => Ok(to - from),
        Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS) => Ok(0),
        Err(e) => Err(ReplicaError::io("punch the trimmed bytes out of", &path)(
            io::Error::from(e),
        )),
    }
}

/// Reads records back from the segments of one group (opens each segment once).
pub struct SegmentReader {
    dir: PathBuf,
    files: Vec<(u64, File)>,
}

/// Segment files a reader keeps open at once.
const READER_FILES_MAX: usize = 16;

impl SegmentReader {
    pub fn new(dir: &Path) -> SegmentReader {
        SegmentReader {
            dir: dir.to_path_buf(),
            files: Vec::new(),
        }
    }

    /// Reads up to `buf.len()` bytes at `position` of segment `segment`; returns the count
    /// (short only at the end of the file).
    pub fn read_at(&mut self, segment: u64, position: u64, buf: &mut [u8]) -> Result<usize> {
        let path = self.dir.join(segment_name(segment));
        let i = self.open(segment, &path)?;
        let file = &self.files[i].1;
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], position + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReplicaError::io("read journal segment", &path)(e)),
            }
        }
        Ok(done)
    }

    /// Fills `buf` at `position` of segment `segment` if the segment is open here already and
    /// every byte is in the page cache ([`cdp_shared::fileio::read_cached_at`]): `Ok(false)`
    /// when that would mean waiting for the disk (or the range passes the end of the file),
    /// and the caller then uses [`SegmentReader::read_at`] on the blocking pool.
    pub fn read_cached_at(&mut self, segment: u64, position: u64, buf: &mut [u8]) -> Result<bool> {
        let Some((_, file)) = self.files.iter().find(|(n, _)| *n == segment) else {
            return Ok(false);
        };
        cdp_shared::fileio::read_cached_at(file, buf, position).map_err(ReplicaError::io(
            "read journal segment",
            &self.dir.join(segment_name(segment)),
        ))
    }

    /// The index in `files` of segment `segment`, opened (and its header checked) if needed.
    fn open(&mut self, segment: u64, path: &Path) -> Result<usize> {
        Ok(match self.files.iter().position(|(n, _)| *n == segment) {
            Some(i) => i,
            None => {
                let file =
                    File::open(path).map_err(ReplicaError::io("open journal segment", path))?;
                let mut header = [0u8; SEGMENT_HEADER_BYTES as usize];
                file.read_exact_at(&mut header, 0)
                    .map_err(ReplicaError::io("read the header of", path))?;
                check_segment_header(&header, segment).map_err(|e| {
                    ReplicaError::JournalCorrupt(format!("{}: {e}", path.display()))
                })?;
                if self.files.len() >= READER_FILES_MAX {
                    self.files.remove(0);
                }
                self.files.push((segment, file));
                self.files.len() - 1
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_sync_recover_truncates_tail_and_newer_segments() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("g");
        let (mut j, report) = Journal::recover(&dir, None).expect("new journal");
        assert_eq!(report, RecoveryReport::default());
        let a = j.append(&[1u8; 100]).expect("append");
        assert_eq!(
            a,
            SegmentSpan {
                segment: 1,
                position: SEGMENT_HEADER_BYTES,
                length: 100
            }
        );
        assert_eq!(j.durable(), JournalPos::default());
        j.sync().expect("sync");
        assert_eq!(j.durable(), j.written());
        let b = j.append(&[2u8; 50]).expect("append");
        j.sync().expect("sync");
        // Garbage after b, and a newer segment nobody references.
        drop(j);
        let seg1 = dir.join(segment_name(1));
        let f = OpenOptions::new().append(true).open(&seg1).expect("open");
        std::io::Write::write_all(&mut &f, &[9u8; 33]).expect("garbage");
        fs::write(dir.join(segment_name(2)), segment_header(2)).expect("newer");
        let (j, report) = Journal::recover(&dir, Some(b)).expect("recover");
        assert_eq!(report.truncated, Some((1, 33)));
        assert_eq!(report.deleted, vec![2]);
        assert_eq!(
            j.written(),
            JournalPos {
                segment: 1,
                offset: b.end()
            }
        );
        assert_eq!(fs::metadata(&seg1).expect("stat").len(), b.end());
        let mut r = SegmentReader::new(&dir);
        let mut buf = [0u8; 100];
        assert_eq!(r.read_at(1, a.position, &mut buf).expect("read"), 100);
        assert_eq!(buf, [1u8; 100]);
    }

    #[test]
    fn large_batches_go_direct_and_aligned_small_ones_packed_and_all_read_back() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("g");
        let (mut j, _) = Journal::recover(&dir, None).expect("new journal");
        j.set_segment_bytes_target(2 << 20);
        let big = |n: u8, len: usize| -> Vec<u8> { (0..len).map(|i| (i as u8) ^ n).collect() };
        let batches: Vec<Vec<u8>> = vec![
            vec![1u8; 100],
            big(2, DIRECT_BYTES_MIN + 1),
            vec![3u8; 200],
            big(4, (2 << 20) + 3),
            big(5, DIRECT_BYTES_MIN),
            vec![6u8; 10],
        ];
        let mut spans = Vec::new();
        for b in &batches {
            let prev = j.written();
            let span = j.append(b).expect("append");
            if b.len() >= DIRECT_BYTES_MIN {
                assert_eq!(span.position % DIRECT_ALIGN, 0, "{span:?}");
            } else if span.segment == prev.segment {
                assert_eq!(span.position, prev.offset, "small batches are packed");
            }
            spans.push(span);
        }
        assert!(
            spans.last().expect("spans").segment > 1,
            "the test crosses a rotation"
        );
        j.sync().expect("sync");
        let direct = j.direct_io;
        drop(j);
        let mut r = SegmentReader::new(&dir);
        // Open segment 1 in the reader (reading its first page only), then ask the page cache
        // for the second page of the first direct batch.
        let mut small = [0u8; 100];
        r.read_at(1, spans[0].position, &mut small).expect("read");
        let mut page = vec![0u8; 4096];
        let cached = r
            .read_cached_at(1, spans[1].position + 4096, &mut page)
            .expect("read");
        if direct {
            assert!(!cached, "a direct write leaves no copy in the page cache");
        } else {
            println!("the temporary directory's filesystem refuses O_DIRECT");
            assert!(
                std::env::var_os("CI").is_none(),
                "CI's filesystem takes O_DIRECT"
            );
        }
        for (b, span) in batches.iter().zip(&spans) {
            let mut buf = vec![0u8; b.len()];
            assert_eq!(
                r.read_at(span.segment, span.position, &mut buf)
                    .expect("read"),
                b.len()
            );
            assert!(buf == *b, "batch at {span:?} reads back");
        }
        drop(r);
        // Only zeros past a batch that ended up last in its segment: recovery reports no
        // uncommitted bytes, and the next append continues right after it.
        assert_ne!(spans[3].end() % DIRECT_ALIGN, 0, "the batch has padding");
        let (mut j, report) = Journal::recover(&dir, Some(spans[3])).expect("recover");
        assert_eq!(report.truncated, None, "{report:?}");
        assert_eq!(report.deleted, vec![2]);
        let next = j.append(&[7u8; 5]).expect("append");
        assert_eq!((next.segment, next.position), (1, spans[3].end()));
    }

    #[test]
    fn rollback_forgets_a_failed_commit_across_a_rotation() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("g");
        let (mut j, _) = Journal::recover(&dir, None).expect("new journal");
        // Nothing durable yet: a rollback removes the segment the failed commit created.
        j.append(&[1u8; 10]).expect("append");
        j.rollback_to(JournalPos::default()).expect("rollback");
        assert!(!dir.join(segment_name(1)).exists());
        let a = j.append(&[1u8; 10]).expect("append");
        assert_eq!(a.segment, 1);
        j.sync().expect("sync");
        let durable = j.durable();
        // A commit that filled the segment, rotated, and appended to the next one.
        j.append(&[2u8; 20]).expect("append");
        j.written.offset = SEGMENT_BYTES_TARGET;
        j.append(&[3u8; 30]).expect("append after rotation");
        assert_eq!(j.written().segment, 2);
        // A half-made segment file too.
        fs::write(dir.join(segment_name(3)), b"CD").expect("half a header");
        j.rollback_to(durable).expect("rollback");
        assert_eq!((j.written(), j.durable()), (durable, durable));
        assert!(!dir.join(segment_name(2)).exists());
        assert!(!dir.join(segment_name(3)).exists());
        assert_eq!(
            fs::metadata(dir.join(segment_name(1))).expect("stat").len(),
            a.end()
        );
        // The journal carries on where it was.
        let b = j.append(&[4u8; 40]).expect("append");
        assert_eq!((b.segment, b.position), (1, a.end()));
        j.sync().expect("sync");
        let mut r = SegmentReader::new(&dir);
        let mut buf = [0u8; 40];
        assert_eq!(r.read_at(1, b.position, &mut buf).expect("read"), 40);
        assert_eq!(buf, [4u8; 40]);
    }

    #[test]
    fn recover_without_committed_batches_deletes_every_segment() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("g");
        let (mut j, _) = Journal::recover(&dir, None).expect("new journal");
        j.append(&[1u8; 10]).expect("append");
        j.sync().expect("sync");
        drop(j);
        let (mut j, report) = Journal::recover(&dir, None).expect("recover");
        assert_eq!(report.deleted, vec![1]);
        let span = j.append(&[1u8; 10]).expect("append");
        assert_eq!(span.segment, 1);
    }
}
