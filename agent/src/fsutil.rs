//! File helpers shared by the agent's state files: atomic, durable replacement of a file
//! (temp file, fsync, rename, fsync of the directory) and removal of a file that may be absent.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

/// Writes `data` to `path` atomically and durably. The temporary file is named after the
/// whole file name and a per-process counter: `v.json` and `v.generation` (a volume and a
/// group of the same name) written at once must not share one (they did, with
/// `with_extension`, and one file got the other's contents).
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

pub fn remove_if_exists(path: &std::path::Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod write_atomic_tests {
    use super::write_atomic;

    /// Files whose names differ only in their extension, written at once from many threads,
    /// each end with their own contents.
    #[test]
    fn concurrent_writes_of_sibling_files_keep_their_own_contents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let threads: Vec<_> = ["v.json", "v.generation", "v.other"]
            .into_iter()
            .map(|name| {
                let path = dir.path().join(name);
                std::thread::spawn(move || {
                    for i in 0..200u32 {
                        let text = format!("{name} {i}");
                        write_atomic(&path, text.as_bytes()).expect("write");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        for name in ["v.json", "v.generation", "v.other"] {
            let got = std::fs::read_to_string(dir.path().join(name)).expect("read");
            assert_eq!(got, format!("{name} 199"));
        }
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "no temporary file is left");
    }
}
