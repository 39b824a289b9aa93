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
//! Sans-IO part: [`block_span`] and [`Bitmap`].

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

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

    /// Sets the bits of blocks `[first, end)`.
    pub fn set_range(&self, first: u64, end: u64) {
        for b in first..end.min(self.blocks) {
            self.words[(b / 64) as usize].fetch_or(1 << (b % 64), Ordering::Release);
        }
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

/// The overlay of one writable export (see the module docs).
#[derive(Debug)]
pub struct Overlay {
    file: File,
    /// Where the file was created (already unlinked), for error messages.
    path: PathBuf,
    size: u64,
    bits: Bitmap,
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
        })
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
            .map_err(ReplicaError::io("write the export's overlay", &self.path))?;
        let (first, end) = block_span(offset, data.len() as u64);
        self.bits.set_range(first, end);
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
                        .map_err(ReplicaError::io("write the export's overlay", &self.path))?;
                    at += n as u64;
                }
            }
            Err(e) => {
                return Err(ReplicaError::io(
                    "punch a hole in the export's overlay",
                    &self.path,
                )(e.into()));
            }
        }
        let (first, end) = block_span(offset, len);
        self.bits.set_range(first, end);
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
}
