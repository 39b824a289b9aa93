//! The copy-on-write overlay of a writable export: where the writes of an NBD client go, so
//! that the journal, the catalog and the target file are never written by an export.
//!
//! Granularity: 4 KiB blocks ([`OVERLAY_BLOCK_BYTES`]). The overlay is a sparse file of the
//! volume's size plus an in-memory bitmap of the blocks it holds (one bit per block: 32 MiB of
//! bitmap per TiB of volume). A block enters the overlay whole: a write that covers only part
//! of a block first reads the rest of it from the merged image (read-modify-write), so a set
//! bit always means "every byte of this block is in the overlay". A bit is set only after its
//! block is written, so a concurrent reader sees either the old block or the new one.
//! Zero-writes and trims punch holes in the overlay file (zeros written where that is
//! unsupported) and set the bits: the blocks read as zeros.
//!
//! The file is created in `DIR/tmp` and unlinked at once: it lives only as long as the open
//! descriptor, so it is gone when the export stops, however it stops (even SIGKILL), and it is
//! never mistaken for data. It is never fsynced: nothing in it survives the export, by design.
//!
//! # The persistent overlay of a failover
//! A failover ([`crate::failover`]) is the live volume, so its overlay lasts:
//! [`Overlay::open_persistent`] keeps the data in a named sparse file
//! (`DIR/failover/<volume>.overlay`) and the bitmap in a map file
//! (`DIR/failover/<volume>.map`). [`Overlay::sync`] (at every FLUSH and FUA) makes every write
//! applied before it durable:
//! 1. fdatasync the data file;
//! 2. when a bit was set since the last sync: write the whole map to `<volume>.map.tmp`,
//!    fsync it, rename it over `<volume>.map`, fsync the directory.
//!
//! So the map on disk only names blocks whose bytes were fdatasync'd before it was written,
//! and it is replaced whole (a crash leaves the old map or the new one, never a torn one). A
//! block written after the last sync is lost in a crash unless its bit was already set (then
//! it holds the old bytes or the new ones, as an unflushed write on any disk). Map format:
//! `"CDPOVMAP" | version 1 (u32) | 0 (u32) | volume bytes (u64) | blocks (u64) | the bitmap
//! as little-endian u64 words | blake3 of everything before`. The cost of a sync is one map
//! write per FLUSH that follows new blocks (32 MiB per TiB of volume).
//!
//! Sans-IO part: [`block_span`] and [`Bitmap`].

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rustix::fs::FallocateFlags;

use crate::error::{ReplicaError, Result};

/// The overlay's unit: a block is in the overlay whole or not at all.
pub const OVERLAY_BLOCK_BYTES: u64 = 4096;
/// Zeros written at once where a hole cannot be punched.
const ZEROS_BYTES: u64 = 1 << 20;
const _: () = assert!(cdp_shared::types::CHUNK_BYTES.is_multiple_of(OVERLAY_BLOCK_BYTES));

/// The blocks `[first, end)` that `[offset, offset + len)` touches (sans-IO).
pub fn block_span(offset: u64, len: u64) -> (u64, u64) {
    (
        offset / OVERLAY_BLOCK_BYTES,
        (offset + len).div_ceil(OVERLAY_BLOCK_BYTES),
    )
}

/// One bit per block, set atomically (sans-IO).
#[derive(Debug)]
pub struct Bitmap {
    words: Vec<AtomicU64>,
    blocks: u64,
}

impl Bitmap {
    pub fn new(blocks: u64) -> Bitmap {
        Bitmap {
            words: (0..blocks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            blocks,
        }
    }

    pub fn get(&self, block: u64) -> bool {
        block < self.blocks
            && self.words[(block / 64) as usize].load(Ordering::Acquire) & (1 << (block % 64)) != 0
    }

    /// Sets the bits of blocks `[first, end)`; true when one was not set before.
    ///
    /// The answer decides whether a failover's map is rewritten at its next FLUSH, so it is
    /// accumulated as bits of the words' old values, not as a flag fed from a comparison in
    /// the loop (the shape rustc 1.95 miscompiled in the agent's dirty map).
    pub fn set_range(&self, first: u64, end: u64) -> bool {
        let mut newly_set = 0u64;
        for b in first..end.min(self.blocks) {
            let bit = 1 << (b % 64);
            newly_set |= !self.words[(b / 64) as usize].fetch_or(bit, Ordering::Release) & bit;
        }
        newly_set != 0
    }

    /// The bitmap as little-endian u64 words.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.words
            .iter()
            .flat_map(|w| w.load(Ordering::Acquire).to_le_bytes())
            .collect()
    }

    /// A bitmap of `blocks` blocks from [`Bitmap::to_bytes`]; `None` when the length is wrong.
    pub fn from_bytes(blocks: u64, bytes: &[u8]) -> Option<Bitmap> {
        if bytes.len() as u64 != blocks.div_ceil(64) * 8 {
            return None;
        }
        Some(Bitmap {
            words: bytes
                .chunks_exact(8)
                .map(|c| AtomicU64::new(u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))))
                .collect(),
            blocks,
        })
    }

    /// The runs of set blocks inside `[first, end)`, as block ranges.
    pub fn runs(&self, first: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut run: Option<u64> = None;
        for b in first..end.min(self.blocks) {
            match (self.get(b), run) {
                (true, None) => run = Some(b),
                (false, Some(s)) => {
                    out.push((s, b));
                    run = None;
                }
                _ => {}
            }
        }
        if let Some(s) = run {
            out.push((s, end.min(self.blocks)));
        }
        out
    }
}

/// The magic of a persistent overlay's map file.
const MAP_MAGIC: &[u8; 8] = b"CDPOVMAP";
const MAP_VERSION: u32 = 1;
/// Magic, version, padding, volume bytes, blocks.
const MAP_HEADER_BYTES: usize = 8 + 4 + 4 + 8 + 8;

/// Where a persistent overlay keeps its map, and whether the map on disk is behind.
#[derive(Debug)]
struct Persist {
    map: PathBuf,
    /// A bit was set since the map was last written.
    dirty: AtomicBool,
    /// Serializes syncs (a FLUSH and an FUA write may sync at once).
    syncing: Mutex<()>,
}

/// The overlay of one writable export or failover (see the module docs).
#[derive(Debug)]
pub struct Overlay {
    file: File,
    /// The data file (already unlinked unless persistent), for error messages.
    path: PathBuf,
    size: u64,
    bits: Bitmap,
    persist: Option<Persist>,
}

impl Overlay {
    /// Creates the overlay of a `size`-byte volume in `dir` (created if needed), and unlinks
    /// its file at once.
    pub fn create(dir: &Path, size: u64) -> Result<Overlay> {
        std::fs::create_dir_all(dir).map_err(ReplicaError::io("create directory", dir))?;
        let mut n = 0u32;
        let (file, path) = loop {
            let path = dir.join(format!("export-{}-{n}.overlay", std::process::id()));
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(f) => break (f, path),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => return Err(ReplicaError::io("create the export's overlay", &path)(e)),
            }
        };
        let sized = file.set_len(size);
        let unlinked = std::fs::remove_file(&path);
        sized.map_err(ReplicaError::io("size the export's overlay", &path))?;
        unlinked.map_err(ReplicaError::io("unlink the export's overlay", &path))?;
        Ok(Overlay {
            file,
            path,
            bits: Bitmap::new(size.div_ceil(OVERLAY_BLOCK_BYTES)),
            size,
            persist: None,
        })
    }

    /// Opens (or creates) the persistent overlay of a `size`-byte volume: its data in `data`
    /// (a sparse file) and its bitmap in `map` (see the module docs). A missing map is an
    /// empty overlay; a map that does not check out is an error.
    pub fn open_persistent(data: &Path, map: &Path, size: u64) -> Result<Overlay> {
        if let Some(parent) = data.parent() {
            std::fs::create_dir_all(parent)
                .map_err(ReplicaError::io("create directory", parent))?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(data)
            .map_err(ReplicaError::io("open the failover's overlay", data))?;
        let len = file
            .metadata()
            .map_err(ReplicaError::io("stat the failover's overlay", data))?
            .len();
        if len != size {
            file.set_len(size)
                .map_err(ReplicaError::io("size the failover's overlay", data))?;
        }
        let blocks = size.div_ceil(OVERLAY_BLOCK_BYTES);
        let bits = match std::fs::read(map) {
            Ok(bytes) => decode_map(&bytes, size).ok_or_else(|| {
                ReplicaError::Failover(format!(
                    "the failover's overlay map {} is damaged or belongs to another volume; the writes made through the failover cannot be trusted: end it with `cdp-replica failover --undo`",
                    map.display()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Bitmap::new(blocks),
            Err(e) => return Err(ReplicaError::io("read the failover's overlay map", map)(e)),
        };
        Ok(Overlay {
            file,
            path: data.to_path_buf(),
            bits,
            size,
            persist: Some(Persist {
                map: map.to_path_buf(),
                dirty: AtomicBool::new(false),
                syncing: Mutex::new(()),
            }),
        })
    }

    /// Makes every write applied so far durable (persistent overlays; nothing otherwise):
    /// fdatasync the data, then replace the map when a bit was set since the last sync.
    pub fn sync(&self) -> Result<()> {
        let Some(p) = &self.persist else {
            return Ok(());
        };
        let _one_at_a_time = p.syncing.lock().unwrap_or_else(|e| e.into_inner());
        self.file.sync_data().map_err(ReplicaError::io(
            "fdatasync the failover's overlay",
            &self.path,
        ))?;
        if !p.dirty.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        let written = write_map(&p.map, &encode_map(&self.bits, self.size));
        if written.is_err() {
            p.dirty.store(true, Ordering::SeqCst);
        }
        written
    }

    fn mark(&self, first: u64, end: u64) {
        if self.bits.set_range(first, end)
            && let Some(p) = &self.persist
        {
            p.dirty.store(true, Ordering::SeqCst);
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether block `block` is in the overlay.
    pub fn holds(&self, block: u64) -> bool {
        self.bits.get(block)
    }

    /// The byte ranges of `[offset, offset + len)` that the overlay holds, in order.
    pub fn held_ranges(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let (first, end) = block_span(offset, len);
        self.bits
            .runs(first, end)
            .into_iter()
            .map(|(s, e)| {
                let from = (s * OVERLAY_BLOCK_BYTES).max(offset);
                let to = (e * OVERLAY_BLOCK_BYTES).min(offset + len);
                (from, to - from)
            })
            .collect()
    }

    /// Reads `buf.len()` bytes at `offset` from the overlay file.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(ReplicaError::io("read the export's overlay", &self.path))
    }

    /// Writes whole blocks at block-aligned `offset` (the last one may end at the volume's
    /// end), then marks them held.
    pub fn write_blocks(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_blocks(offset, data.len() as u64)?;
        self.file
            .write_all_at(data, offset)
            .map_err(ReplicaError::io("write the overlay", &self.path))?;
        let (first, end) = block_span(offset, data.len() as u64);
        self.mark(first, end);
        Ok(())
    }

    /// Makes whole blocks at block-aligned `offset` read as zeros, then marks them held.
    pub fn zero_blocks(&self, offset: u64, len: u64) -> Result<()> {
        self.check_blocks(offset, len)?;
        match rustix::fs::fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => {}
            Err(
                rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS | rustix::io::Errno::INVAL,
            ) => {
                let zeros = vec![0u8; ZEROS_BYTES.min(len) as usize];
                let mut at = offset;
                while at < offset + len {
                    let n = zeros.len().min((offset + len - at) as usize);
                    self.file
                        .write_all_at(&zeros[..n], at)
                        .map_err(ReplicaError::io("write the overlay", &self.path))?;
                    at += n as u64;
                }
            }
            Err(e) => {
                return Err(ReplicaError::io("punch a hole in the overlay", &self.path)(
                    e.into(),
                ));
            }
        }
        let (first, end) = block_span(offset, len);
        self.mark(first, end);
        Ok(())
    }

    fn check_blocks(&self, offset: u64, len: u64) -> Result<()> {
        let end = offset + len;
        if !offset.is_multiple_of(OVERLAY_BLOCK_BYTES)
            || !(end.is_multiple_of(OVERLAY_BLOCK_BYTES) || end == self.size)
            || end > self.size
        {
            return Err(ReplicaError::Task(format!(
                "overlay write of {len} bytes at {offset} is not whole blocks"
            )));
        }
        Ok(())
    }
}

/// The map file's bytes (sans-IO).
fn encode_map(bits: &Bitmap, size: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAP_HEADER_BYTES + bits.words.len() * 8 + 32);
    out.extend_from_slice(MAP_MAGIC);
    out.extend_from_slice(&MAP_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&size.to_le_bytes());
    out.extend_from_slice(&bits.blocks.to_le_bytes());
    out.extend_from_slice(&bits.to_bytes());
    let hash = blake3::hash(&out);
    out.extend_from_slice(hash.as_bytes());
    out
}

/// The bitmap of a map file of a `size`-byte volume; `None` when it does not check out
/// (sans-IO).
fn decode_map(bytes: &[u8], size: u64) -> Option<Bitmap> {
    if bytes.len() < MAP_HEADER_BYTES + 32 {
        return None;
    }
    let (body, hash) = bytes.split_at(bytes.len() - 32);
    if blake3::hash(body).as_bytes() != hash
        || &body[0..8] != MAP_MAGIC
        || body[8..12] != MAP_VERSION.to_le_bytes()
        || body[16..24] != size.to_le_bytes()
    {
        return None;
    }
    let blocks = u64::from_le_bytes(body[24..32].try_into().ok()?);
    if blocks != size.div_ceil(OVERLAY_BLOCK_BYTES) {
        return None;
    }
    Bitmap::from_bytes(blocks, &body[MAP_HEADER_BYTES..])
}

/// Replaces the map file whole: temporary file, fsync, rename, fsync of the directory.
fn write_map(map: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = map.with_extension("map.tmp");
    let mut f = File::create(&tmp).map_err(ReplicaError::io("create", &tmp))?;
    f.write_all(bytes)
        .map_err(ReplicaError::io("write", &tmp))?;
    f.sync_all().map_err(ReplicaError::io("fsync", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, map).map_err(ReplicaError::io("rename into place", map))?;
    if let Some(parent) = map.parent() {
        crate::datadir::sync_dir(parent)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_spans_and_runs() {
        assert_eq!(block_span(0, 4096), (0, 1));
        assert_eq!(block_span(1, 4096), (0, 2));
        assert_eq!(block_span(4095, 2), (0, 2));
        assert_eq!(block_span(8192, 1), (2, 3));
        let b = Bitmap::new(70);
        b.set_range(2, 4);
        b.set_range(63, 66);
        b.set_range(69, 80);
        assert!(!b.get(1) && b.get(2) && b.get(3) && !b.get(4) && b.get(64) && !b.get(70));
        assert_eq!(b.runs(0, 70), vec![(2, 4), (63, 66), (69, 70)]);
        assert_eq!(b.runs(3, 64), vec![(3, 4), (63, 64)]);
    }

    /// Each range's answer says whether it set a new bit, in a loop that branches on it (the
    /// shape rustc 1.95 miscompiled in the agent's dirty map). Runs optimized in `make test`.
    #[inline(never)]
    fn new_ranges(b: &Bitmap, ranges: &[(u64, u64)]) -> u64 {
        let mut n = 0;
        for (first, end) in ranges {
            if b.set_range(*first, *end) {
                n += 1;
            }
        }
        n
    }

    #[test]
    fn set_range_says_whether_a_bit_was_new() {
        let b = Bitmap::new(200);
        let ranges: Vec<(u64, u64)> = std::hint::black_box(vec![
            (0, 1),
            (0, 1),
            (1, 3),
            (2, 3),
            (60, 70),
            (64, 65),
            (199, 300),
        ]);
        assert_eq!(new_ranges(&b, &ranges), 4);
        assert!(!b.set_range(0, 3) && b.set_range(0, 4));
    }

    #[test]
    fn the_overlay_file_is_unlinked_and_reads_back() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let size = 3 * OVERLAY_BLOCK_BYTES + 100;
        let o = Overlay::create(tmp.path(), size).expect("overlay");
        assert_eq!(std::fs::read_dir(tmp.path()).expect("ls").count(), 0);
        o.write_blocks(OVERLAY_BLOCK_BYTES, &[7u8; 4096])
            .expect("write");
        o.write_blocks(3 * OVERLAY_BLOCK_BYTES, &[9u8; 100])
            .expect("the short last block");
        assert!(o.write_blocks(1, &[0u8; 4096]).is_err());
        assert_eq!(
            o.held_ranges(100, size - 100),
            vec![(4096, 4096), (3 * 4096, 100)]
        );
        o.zero_blocks(OVERLAY_BLOCK_BYTES, OVERLAY_BLOCK_BYTES)
            .expect("zero");
        let mut buf = vec![1u8; 4096];
        o.read_at(OVERLAY_BLOCK_BYTES, &mut buf).expect("read");
        assert!(buf.iter().all(|&b| b == 0));
        assert!(o.holds(1) && !o.holds(0));
    }

    #[test]
    fn a_persistent_overlay_keeps_what_was_synced() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (data, map) = (tmp.path().join("v.overlay"), tmp.path().join("v.map"));
        let size = 5 * OVERLAY_BLOCK_BYTES + 10;
        let o = Overlay::open_persistent(&data, &map, size).expect("open");
        o.write_blocks(0, &[3u8; 4096]).expect("write");
        o.zero_blocks(2 * OVERLAY_BLOCK_BYTES, OVERLAY_BLOCK_BYTES)
            .expect("zero");
        o.sync().expect("sync");
        // Written after the last sync: not in the map on disk.
        o.write_blocks(4 * OVERLAY_BLOCK_BYTES, &[4u8; 4096])
            .expect("write");
        drop(o);
        let o = Overlay::open_persistent(&data, &map, size).expect("reopen");
        assert!(o.holds(0) && !o.holds(1) && o.holds(2) && !o.holds(4));
        let mut buf = vec![0u8; 4096];
        o.read_at(0, &mut buf).expect("read");
        assert!(buf.iter().all(|&b| b == 3));
        // A map of another size, or a damaged one, is refused.
        assert!(Overlay::open_persistent(&data, &map, size + 4096).is_err());
        let mut bytes = std::fs::read(&map).expect("map");
        bytes[MAP_HEADER_BYTES] ^= 1;
        std::fs::write(&map, &bytes).expect("damage");
        assert!(Overlay::open_persistent(&data, &map, size).is_err());
    }
}
