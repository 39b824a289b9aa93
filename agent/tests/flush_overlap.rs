//! A FLUSH cuts its batch first, then syncs the device and makes the batch durable in the
//! spool at the same time (issue 12: a FLUSH waits for the longer of the two fsyncs, not their
//! sum); it replies only when both are done, and a write that completes while the device
//! syncs belongs to the next batch. Runs optimized in `make test`, like everything.

mod common;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use cdp_agent::device::{BlockDev, FileDev};
use cdp_shared::batch::{self, BatchFlags, RecordKind};
use cdp_shared::types::CHUNK_BYTES;

const DEADLINE: Duration = Duration::from_secs(20);

/// A file whose `sync` (while `gated` is set) says it started and then waits to be released.
struct GatedDev {
    file: FileDev,
    gated: Arc<AtomicBool>,
    entered: mpsc::Sender<()>,
    release: Mutex<mpsc::Receiver<()>>,
}

impl BlockDev for GatedDev {
    fn size(&self) -> u64 {
        self.file.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_at(data, offset)
    }
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.file.zero_range(offset, len)
    }
    fn sync(&self) -> io::Result<()> {
        if self.gated.load(Ordering::SeqCst) {
            let _ = self.entered.send(());
            let release = self.release.lock().expect("release lock");
            release
                .recv_timeout(DEADLINE)
                .map_err(|_| io::Error::other("the test never released the device sync"))?;
        }
        self.file.sync()
    }
}

/// Waits for `cond` with a deadline.
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_makes_its_batch_durable_while_the_device_syncs_and_replies_after_both() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = common::device_file(dir.path());
    let gated = Arc::new(AtomicBool::new(false));
    let (entered_tx, entered_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    let dev = GatedDev {
        file: FileDev::open(&path).expect("open device"),
        gated: gated.clone(),
        entered: entered_tx,
        release: Mutex::new(release_rx),
    };
    let group = common::group_over(dir.path(), Arc::new(dev), Duration::from_secs(60));

    group
        .write(0, 0, vec![1u8; 8192], false)
        .await
        .expect("first write");
    let before = group.last_sealed();
    gated.store(true, Ordering::SeqCst);
    let flush = tokio::spawn(group.flush_volume(0));
    let entered = tokio::task::spawn_blocking(move || entered_rx.recv_timeout(DEADLINE))
        .await
        .expect("join");
    assert!(entered.is_ok(), "the flush syncs the device");

    // The device sync is held: the flush's batch is sealed and becomes durable meanwhile.
    let cut = group.last_sealed();
    assert_eq!(
        cut.0,
        before.0 + 1,
        "the flush sealed one batch before the device sync"
    );
    wait_for("the flush's batch to be durable in the spool", || {
        group.spool.durable() >= cut
    })
    .await;
    assert!(
        !flush.is_finished(),
        "the flush does not reply before its device sync"
    );

    // A write that completes while the device syncs is not part of the flush's point.
    group
        .write(0, CHUNK_BYTES, vec![2u8; 4096], false)
        .await
        .expect("write during the device sync");
    assert_eq!(group.last_sealed(), cut, "nothing else was sealed");

    release_tx.send(()).expect("release the device sync");
    let replied = tokio::time::timeout(DEADLINE, flush)
        .await
        .expect("the flush replies once the device is synced")
        .expect("join");
    assert!(replied.is_ok(), "flush: {replied:?}");

    let bytes = group.spool.get(cut).expect("read").expect("held");
    let view = batch::decode(&bytes).expect("decodes");
    assert!(
        view.header.flags.0 & BatchFlags::FLUSH != 0,
        "a flush point"
    );
    let offsets: Vec<u64> = view
        .records()
        .filter(|r| r.header.kind == RecordKind::Data)
        .map(|r| r.header.offset)
        .collect();
    assert_eq!(
        offsets,
        vec![0],
        "the flush's batch holds the write before it and not the one during its device sync"
    );
}
