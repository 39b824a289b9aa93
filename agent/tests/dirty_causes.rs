//! The agent remembers why each volume's chunks are dirty, so that `status` names the resync
//! (`resyncing/after-crash`, `after-restart`, `write-error`, `repair`; issue 13): the first
//! cause since the map was last empty, kept until the resync empties it. Runs optimized in
//! `make test`, like everything.

mod common;

use std::sync::Arc;
use std::time::Duration;

use cdp_agent::device::FileDev;
use cdp_shared::cause::Cause;
use cdp_shared::types::CHUNK_BYTES;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_dirty_map_keeps_the_cause_that_first_made_it_dirty() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = common::device_file(dir.path());
    // Batches are cut only at 1 MiB or after 10 minutes: an unflushed write dies with the
    // group, and only the activity log knows its chunk.
    let open = || {
        let dev = FileDev::open(&path).expect("open device");
        common::group_over(dir.path(), Arc::new(dev), Duration::from_secs(600))
    };
    let group = open();
    assert_eq!(group.dirty_total(), 0);
    group
        .write(0, CHUNK_BYTES + 4096, vec![3u8; 4096], false)
        .await
        .expect("write");
    // A crash: the group goes without its clean stop.
    drop(group);

    let group = open();
    assert_eq!(group.dirty_total(), 1, "the activity log's chunk is dirty");
    assert_eq!(group.state().dirty_causes, [Cause::ResyncingAfterCrash]);
    drop(group);

    // Stopped again before the resync: the chunk is carried over in the saved map.
    let group = open();
    assert_eq!(
        group.dirty_total(),
        1,
        "the saved map still holds the chunk"
    );
    assert_eq!(group.state().dirty_causes, [Cause::ResyncingAfterRestart]);
    assert_eq!(group.resync_dirty(64).await.expect("resync"), 1);
    assert_eq!(group.dirty_total(), 0);

    // Empty again: the next chunks bring their own cause.
    group.repair_chunks(0, &[2]).await.expect("repair");
    assert_eq!(group.state().dirty_causes, [Cause::ResyncingRepair]);
    group.repair_chunks(0, &[3]).await.expect("repair");
    assert_eq!(group.dirty_total(), 2);
    assert_eq!(group.state().dirty_causes, [Cause::ResyncingRepair]);
}
