//! A client write that fails on the device (while it could not be known how much of it
//! reached the device) leaves its chunks dirty, makes the group's points inconsistent, and the
//! dirty-region resync sends those chunks as the device holds them; the point that ends the
//! resync is consistent again (issue 10). Runs optimized in `make test`, like everything.

mod common;

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cdp_agent::device::{BlockDev, FileDev};
use cdp_shared::Seq;
use cdp_shared::batch::{self, RecordKind};
use cdp_shared::types::CHUNK_BYTES;

/// A file whose writes fail with EIO while `failing` is set — after writing half of the data,
/// like a device that tore the write.
struct FlakyDev {
    file: FileDev,
    failing: Arc<AtomicBool>,
}

impl BlockDev for FlakyDev {
    fn size(&self) -> u64 {
        self.file.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        if self.failing.load(Ordering::SeqCst) {
            self.file.write_at(&data[..data.len() / 2], offset)?;
            return Err(io::Error::from_raw_os_error(5));
        }
        self.file.write_at(data, offset)
    }
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.file.zero_range(offset, len)
    }
    fn sync(&self) -> io::Result<()> {
        self.file.sync()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_leaves_its_chunk_dirty_and_the_resync_sends_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = common::device_file(dir.path());
    let failing = Arc::new(AtomicBool::new(false));
    let dev = FlakyDev {
        file: FileDev::open(&path).expect("open device"),
        failing: failing.clone(),
    };
    let group = common::group_over(dir.path(), Arc::new(dev), Duration::from_millis(5));

    group
        .write(0, 4096, vec![1u8; 8192], true)
        .await
        .expect("a healthy write");
    failing.store(true, Ordering::SeqCst);
    let at = 2 * CHUNK_BYTES + 100;
    let failed = group.write(0, at, vec![7u8; 64 << 10], false).await;
    assert!(failed.is_err(), "the device's error reaches the client");
    failing.store(false, Ordering::SeqCst);
    assert_eq!(group.dirty_total(), 1, "the failed write's chunk is dirty");
    assert_eq!(
        group.state().dirty_causes,
        [cdp_shared::cause::Cause::ResyncingWriteError],
        "status names the resync's cause"
    );
    assert!(group.state().inconsistent, "points are not consistent now");
    let cdp_agent::pipeline::Cut {
        seq, consistent, ..
    } = group.bookmark("while-dirty").await.expect("bookmark");
    assert!(
        !consistent,
        "a point while a chunk is dirty is not consistent"
    );

    let sent = group.resync_dirty(64).await.expect("resync");
    assert_eq!(sent, 1, "the dirty chunk is resynced");
    assert_eq!(group.dirty_total(), 0);
    assert!(!group.state().inconsistent);
    // The resync's record carries chunk 2 as the device holds it (half the failed write).
    let last = group.last_sealed();
    let mut device = vec![0u8; CHUNK_BYTES as usize];
    std::fs::File::open(&path)
        .and_then(|f| {
            use std::os::unix::fs::FileExt;
            f.read_exact_at(&mut device, 2 * CHUNK_BYTES)
        })
        .expect("read device");
    assert_eq!(device[100..100 + (32 << 10)], [7u8; 32 << 10][..]);
    let mut found = false;
    let mut d = zstd::bulk::Decompressor::new().expect("zstd");
    let mut data = Vec::new();
    for s in seq.0 + 1..=last.0 {
        let bytes = group.spool.get(Seq(s)).expect("read").expect("held");
        let view = batch::decode(&bytes).expect("decodes");
        for r in view.records() {
            if r.header.kind == RecordKind::Data && r.header.offset == 2 * CHUNK_BYTES {
                r.header
                    .decode_data(r.stored, &mut d, &mut data)
                    .expect("data");
                assert!(r.header.is_sync(), "sent by the resync");
                assert_eq!(data, device, "the chunk as the device holds it");
                found = true;
            }
        }
        if s == last.0 {
            assert!(view.header.flags.consistent(), "the resync ends consistent");
        }
    }
    assert!(found, "the resync sent chunk 2");
}
