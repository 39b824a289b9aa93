//! What the agent's in-process tests share: a device file and one group over one volume.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cdp_agent::batcher::BatcherConfig;
use cdp_agent::device::BlockDev;
use cdp_agent::pipeline::{Group, GroupOptions, Volume};
use cdp_agent::spool::Spool;
use cdp_shared::types::CHUNK_BYTES;

/// Creates `dir/vol`, four chunks long, and returns its path.
pub fn device_file(dir: &Path) -> PathBuf {
    let path = dir.join("vol");
    let f = std::fs::File::create(&path).expect("create device");
    f.set_len(4 * CHUNK_BYTES).expect("size device");
    path
}

/// A group "g" over one volume on `dev`, with its spool and state under `dir`; batches are cut
/// at 1 MiB or when they are `age_max` old.
pub fn group_over(dir: &Path, dev: Arc<dyn BlockDev>, age_max: Duration) -> Arc<Group> {
    let volume = Arc::new(Volume::new(0, "vol", dev));
    let (spool, rec) = Spool::open(&dir.join("spool")).expect("spool");
    let options = GroupOptions {
        batcher: BatcherConfig {
            payload_bytes_target: 1 << 20,
            age_max,
        },
        spool_bytes_max: 1 << 40,
        al_capacity: 64,
        state_dir: dir.join("state"),
        rpo_target: std::time::Duration::from_secs(30),
    };
    let (group, _) = Group::new(
        "g",
        vec![volume],
        spool,
        options,
        rec.last_seq,
        rec.last_hash,
    )
    .expect("group");
    group
}
