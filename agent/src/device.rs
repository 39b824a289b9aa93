//! The protected device: a block device or a regular file opened by path, behind the narrow
//! [`BlockDev`] trait so tests can put a slow or failing double in its place.
//!
//! All methods block; callers run them on tokio's blocking pool.
//!
//! **Exclusive claim.** A [`FileDev`] holds an exclusive `flock` on its device for as long as
//! it lives, and opens a block device with `O_EXCL` too (which the kernel refuses while the
//! device is mounted or claimed by another program). So two agents, whatever their data
//! directories, never serve one device: the second one's `protect` or `run` fails with one
//! sentence naming the device and the holder's pid (read from `/proc/locks`).

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
    /// Reads like [`BlockDev::read_at`] when every byte is in the page cache already, without
    /// waiting for the disk; `Ok(false)` when it would have to wait (or cannot tell), and the
    /// caller then reads on the blocking pool. `buf` may be partly filled then.
    fn read_cached(&self, _buf: &mut [u8], _offset: u64) -> io::Result<bool> {
        Ok(false)
    }
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
    /// Opens `path` read-write and claims it exclusively (see the module doc): an error of
    /// kind [`io::ErrorKind::ResourceBusy`] whose message is the whole sentence to show when
    /// another process holds it. The size of a block device comes from seeking to its end,
    /// which Linux answers with the device size (the same number as BLKGETSIZE64).
    pub fn open(path: &Path) -> io::Result<FileDev> {
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
        let ft = std::fs::metadata(path)?.file_type();
        if !(ft.is_file() || ft.is_block_device()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or a block device",
            ));
        }
        let mut options = OpenOptions::new();
        options.read(true).write(true);
        if ft.is_block_device() {
            options.custom_flags(rustix::fs::OFlags::EXCL.bits() as i32);
        }
        let mut file = match options.open(path) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error()) => {
                return Err(io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    format!(
                        "device {} is in use: it is mounted or claimed by another program ({})",
                        path.display(),
                        holders(path).unwrap_or_else(|| "holder unknown".into())
                    ),
                ));
            }
            Err(e) => return Err(e),
        };
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    format!(
                        "device {} is already served by another process ({}): stop that cdp-agent, or unprotect the volume there, first",
                        path.display(),
                        holders(path).unwrap_or_else(|| "holder unknown".into())
                    ),
                ));
            }
            Err(e) => return Err(e.into()),
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

/// The pids holding a lock on the inode at `path`, from `/proc/locks` ("pid 1234"), if any.
fn holders(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    let dev = meta.dev();
    let key = format!(
        "{:02x}:{:02x}:{}",
        rustix::fs::major(dev),
        rustix::fs::minor(dev),
        meta.ino()
    );
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let pids: Vec<String> = locks
        .lines()
        // "N: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE START END"; waiters have "->" and are
        // not holders.
        .filter(|l| !l.contains("->") && l.split_whitespace().any(|f| f == key))
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_owned))
        .collect();
    match pids.as_slice() {
        [] => None,
        [one] => Some(format!("pid {one}")),
        many => Some(format!("pids {}", many.join(", "))),
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

    fn read_cached(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        cdp_shared::fileio::read_cached_at(&self.file, buf, offset)
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
