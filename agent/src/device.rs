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
}

/// A device or file on the local machine.
pub struct FileDev {
    file: File,
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
        Ok(FileDev {
            file,
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
}
