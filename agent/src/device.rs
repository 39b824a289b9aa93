//! The protected device: a block device or a regular file opened by path, behind the narrow
//! [`BlockDev`] trait so tests can put a slow or failing double in its place.
//!
//! All methods block; callers run them on tokio's blocking pool.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Blocking I/O on a volume's backing store.
pub trait BlockDev: Send + Sync + 'static {
    fn size(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// Makes `[offset, offset+len)` read as zeros (hole punched where the device allows it).
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn sync(&self) -> io::Result<()>;
    /// Reads like [`BlockDev::read_at`], for the agent's own reads of whole chunks (syncs,
    /// resyncs, the verifier), leaving as little as it can in the page cache. A sync reads
    /// the whole device: left cached, its pages would crowd out the client's and, cached as
    /// large folios by readahead, make every later small write into them cost several times
    /// as much (measured: 4 KiB random writes at half the IOPS after an initial sync).
    /// `then`: the range the caller reads next, when it knows (a sync reads every chunk in
    /// order), so that reading it in overlaps with the caller's work on this one.
    fn read_uncached(
        &self,
        buf: &mut [u8],
        offset: u64,
        _then: Option<(u64, u64)>,
    ) -> io::Result<()> {
        self.read_at(buf, offset)
    }
}

/// A device or file on the local machine.
pub struct FileDev {
    file: File,
    /// A second descriptor for [`BlockDev::read_uncached`], with readahead off (so the pages
    /// a read brings in are exactly the ones it asked for, as small folios) and its pages
    /// dropped after each read. Readahead on `file`, which the client's reads use, is kept.
    scan: File,
    size: u64,
    path: PathBuf,
}

impl FileDev {
    /// Opens `path` read-write. The size of a block device comes from seeking to its end,
    /// which Linux answers with the device size (the same number as BLKGETSIZE64).
    pub fn open(path: &Path) -> io::Result<FileDev> {
        let mut file = OpenOptions::new().read(true).write(true).open(path)?;
        let meta = file.metadata()?;
        use std::os::unix::fs::FileTypeExt;
        let ft = meta.file_type();
        if !(ft.is_file() || ft.is_block_device()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or a block device",
            ));
        }
        let size = file.seek(SeekFrom::End(0))?;
        let scan = OpenOptions::new().read(true).open(path)?;
        // Advice only: a kernel that ignores it reads with readahead.
        let _ = rustix::fs::fadvise(&scan, 0, None, rustix::fs::Advice::Random);
        Ok(FileDev {
            file,
            scan,
            size,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Writes zeros over a range in bounded pieces (the fallback when a hole cannot be punched).
pub fn write_zeros(dev: &dyn BlockDev, offset: u64, len: u64) -> io::Result<()> {
    const PIECE: usize = 1 << 20;
    let zeros = vec![0u8; PIECE.min(len as usize)];
    let mut at = offset;
    let end = offset + len;
    while at < end {
        let n = ((end - at) as usize).min(PIECE);
        dev.write_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

impl BlockDev for FileDev {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::{FallocateFlags, fallocate};
        match fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            Err(e)
                if e == rustix::io::Errno::OPNOTSUPP
                    || e == rustix::io::Errno::NOSYS
                    || e == rustix::io::Errno::INVAL =>
            {
                write_zeros(self, offset, len)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn read_uncached(
        &self,
        buf: &mut [u8],
        offset: u64,
        then: Option<(u64, u64)>,
    ) -> io::Result<()> {
        use rustix::fs::{Advice, fadvise};
        use std::num::NonZeroU64;
        self.scan.read_exact_at(buf, offset)?;
        // Advice only, failures ignored. The next range is read in as small folios, in the
        // background; of this one, clean pages are dropped, dirty ones (the client's writes)
        // are queued for writeback and stay, and so do folios the client's own I/O cached
        // that reach past the range (the kernel drops only whole folios).
        if let Some((at, len)) = then
            && let Some(len) = NonZeroU64::new(len)
        {
            let _ = fadvise(&self.scan, at, Some(len), Advice::WillNeed);
        }
        if let Some(len) = NonZeroU64::new(buf.len() as u64) {
            let _ = fadvise(&self.scan, offset, Some(len), Advice::DontNeed);
        }
        Ok(())
    }
}
