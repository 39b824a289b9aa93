//! Target disks: one sparse file per volume (`volumes/<name>/target`), the volume as it was at
//! its group's base. Ingest writes it only while the volume is in its initial sync; the
//! trimmer writes it once the volume protects (applying the journal records it trims);
//! reconstruction reads it. Zeroed and trimmed ranges become holes
//! (`fallocate(PUNCH_HOLE | KEEP_SIZE)`), or are written as zeros where holes are unsupported.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::FallocateFlags;

use crate::datadir::sync_dir;
use crate::error::{ReplicaError, Result};

/// Size of the zero buffer used when holes cannot be punched.
const ZEROS_BYTES: usize = 1 << 20;

/// An open target file.
pub struct TargetFile {
    path: PathBuf,
    file: File,
    size: u64,
    /// Written since the last [`TargetFile::sync`].
    dirty: bool,
}

/// Refuses a target file that is not exactly `size` bytes long (the volume's size: a volume
/// cannot be resized while protected), for writers and readers alike: a reader takes the
/// file's holes for zeros, so a short file would otherwise read as zeros past its end.
pub fn check_len(file: &File, path: &Path, size: u64) -> Result<()> {
    let len = file
        .metadata()
        .map_err(ReplicaError::io("stat", path))?
        .len();
    if len != size {
        return Err(ReplicaError::CatalogCorrupt(format!(
            "target file {} is {len} bytes long but the volume is {size}",
            path.display()
        )));
    }
    Ok(())
}

impl TargetFile {
    /// Creates (or recreates, empty) the sparse target file of a volume of `size` bytes, and
    /// makes its existence durable.
    pub fn create(path: &Path, size: u64) -> Result<TargetFile> {
        let parent = path.parent().ok_or_else(|| {
            ReplicaError::Task(format!("target path {} has no parent", path.display()))
        })?;
        fs::create_dir_all(parent).map_err(ReplicaError::io("create directory", parent))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(ReplicaError::io("create target file", path))?;
        file.set_len(size)
            .map_err(ReplicaError::io("size target file", path))?;
        file.sync_all().map_err(ReplicaError::io("fsync", path))?;
        sync_dir(parent)?;
        if let Some(volumes) = parent.parent() {
            sync_dir(volumes)?;
        }
        Ok(TargetFile {
            path: path.to_path_buf(),
            file,
            size,
            dirty: false,
        })
    }

    /// Opens an existing target file for writing.
    pub fn open(path: &Path, size: u64) -> Result<TargetFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(ReplicaError::io("open target file", path))?;
        check_len(&file, path, size)?;
        Ok(TargetFile {
            path: path.to_path_buf(),
            file,
            size,
            dirty: false,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        debug_assert!(offset + data.len() as u64 <= self.size);
        self.dirty = true;
        self.file
            .write_all_at(data, offset)
            .map_err(ReplicaError::io("write target file", &self.path))
    }

    /// Makes `[offset, offset+len)` read as zeros: a hole when the filesystem can punch one.
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        debug_assert!(offset + len <= self.size);
        self.dirty = true;
        match rustix::fs::fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            Err(
                rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS | rustix::io::Errno::INVAL,
            ) => {
                let zeros = vec![0u8; ZEROS_BYTES.min(len as usize)];
                let mut at = offset;
                while at < offset + len {
                    let n = zeros.len().min((offset + len - at) as usize);
                    self.file
                        .write_all_at(&zeros[..n], at)
                        .map_err(ReplicaError::io("write zeros to target file", &self.path))?;
                    at += n as u64;
                }
                Ok(())
            }
            Err(e) => Err(ReplicaError::io("punch a hole in target file", &self.path)(
                e.into(),
            )),
        }
    }

    /// fdatasync when written since the last sync. An error is fatal for the group.
    pub fn sync(&mut self) -> Result<()> {
        if self.dirty {
            self.file
                .sync_data()
                .map_err(ReplicaError::io("fsync target file", &self.path))?;
            self.dirty = false;
        }
        Ok(())
    }

    /// fsync (data and metadata, so punched holes are durable too) when written since the last
    /// sync: the trimmer's step (c). An error is fatal for the group.
    pub fn sync_all(&mut self) -> Result<()> {
        if self.dirty {
            self.file
                .sync_all()
                .map_err(ReplicaError::io("fsync target file", &self.path))?;
            self.dirty = false;
        }
        Ok(())
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_zero_and_read_back() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("v").join("target");
        let mut t = TargetFile::create(&path, 1 << 20).expect("create");
        t.write_at(4096, &[7u8; 8192]).expect("write");
        t.zero(8192, 4096).expect("zero");
        t.sync().expect("sync");
        let data = fs::read(&path).expect("read");
        assert_eq!(data.len(), 1 << 20);
        assert!(data[4096..8192].iter().all(|&b| b == 7));
        assert!(data[8192..12288].iter().all(|&b| b == 0));
        assert!(data[12288..].iter().all(|&b| b == 0));
        assert!(TargetFile::open(&path, 1 << 20).is_ok());
        assert!(TargetFile::open(&path, 1 << 21).is_err());
    }
}
