//! Write-order fidelity: overlapping writes, zero-writes and trims submitted concurrently to
//! the write pipeline, over a device that delays each operation at random, leave the devices
//! exactly as replaying the log (the sealed batches, in seq order) over the initial state does.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cdp_agent::batcher::BatcherConfig;
use cdp_agent::device::{BlockDev, FileDev};
use cdp_agent::pipeline::{Group, GroupOptions, Volume};
use cdp_agent::spool::Spool;
use cdp_shared::Seq;
use cdp_shared::batch::{self, RecordKind};
use cdp_shared::types::CHUNK_BYTES;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use rand::Rng;

/// A file that sleeps a random while before each write, so that operations admitted in one
/// order would complete in another if nothing kept them in order.
struct SlowDev(FileDev);

fn jitter() {
    let us = rand::rng().random_range(0..400);
    std::thread::sleep(Duration::from_micros(us));
}

impl BlockDev for SlowDev {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        jitter();
        self.0.write_at(data, offset)
    }
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        jitter();
        self.0.zero_range(offset, len)
    }
    fn sync(&self) -> io::Result<()> {
        self.0.sync()
    }
}

const VOLUME_BYTES: u64 = 2 * CHUNK_BYTES + 8192;

#[derive(Clone, Debug)]
enum Op {
    Write {
        vol: u32,
        offset: u64,
        len: u64,
        seed: u8,
    },
    Zero {
        vol: u32,
        offset: u64,
        len: u64,
    },
    Trim {
        vol: u32,
        offset: u64,
        len: u64,
    },
    Flush {
        vol: u32,
    },
}

fn op() -> impl Strategy<Value = Op> {
    // Offsets cluster around the first chunk boundary so that most operations overlap.
    let range = (
        0u32..2,
        CHUNK_BYTES - 64 * 1024..CHUNK_BYTES + 64 * 1024,
        1u64..96 * 1024,
    );
    prop_oneof![
        6 => (range.clone(), any::<u8>()).prop_map(|((vol, offset, len), seed)| Op::Write { vol, offset, len, seed }),
        1 => range.clone().prop_map(|(vol, offset, len)| Op::Zero { vol, offset, len }),
        1 => range.prop_map(|(vol, offset, len)| Op::Trim { vol, offset, len }),
        1 => (0u32..2).prop_map(|vol| Op::Flush { vol }),
    ]
}

fn pattern(seed: u8, offset: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add(((offset + i) % 251) as u8))
        .collect()
}

fn make_group(dir: &Path) -> Arc<Group> {
    let mut volumes = Vec::new();
    for id in 0..2u32 {
        let path = dir.join(format!("vol{id}"));
        let f = std::fs::File::create(&path).expect("create device");
        f.set_len(VOLUME_BYTES).expect("size device");
        let dev = SlowDev(FileDev::open(&path).expect("open device"));
        volumes.push(Arc::new(Volume::new(
            id,
            &format!("vol{id}"),
            Arc::new(dev),
        )));
    }
    let (spool, rec) = Spool::open(&dir.join("spool")).expect("spool");
    // Small batches so that the log spans many of them.
    let options = GroupOptions {
        batcher: BatcherConfig {
            payload_bytes_target: 64 * 1024,
            age_max: Duration::from_millis(5),
        },
        spool_bytes_max: 1 << 40,
        al_capacity: 64,
        state_dir: dir.join("state"),
        rpo_target: std::time::Duration::from_secs(30),
    };
    Group::new("g", volumes, spool, options, rec.last_seq, rec.last_hash)
        .expect("group")
        .0
}

fn replay(group: &Group, last: Seq) -> Vec<Vec<u8>> {
    let mut images = vec![vec![0u8; VOLUME_BYTES as usize]; 2];
    let mut d = zstd::bulk::Decompressor::new().expect("decompressor");
    let mut data = Vec::new();
    let mut prev_hash = [0u8; 32];
    for seq in 1..=last.0 {
        let bytes = group
            .spool
            .get(Seq(seq))
            .expect("spool read")
            .expect("batch held");
        let view = batch::decode(&bytes).expect("batch decodes");
        assert_eq!(view.header.seq, Seq(seq));
        assert_eq!(view.header.prev_hash, prev_hash, "batches are chained");
        prev_hash = view.header.header_hash;
        for r in view.records() {
            let h = r.header;
            let img = &mut images[h.volume as usize];
            let range = h.offset as usize..(h.offset + u64::from(h.length)) as usize;
            match h.kind {
                RecordKind::Data => {
                    h.decode_data(r.stored, &mut d, &mut data)
                        .expect("record data");
                    img[range].copy_from_slice(&data);
                }
                RecordKind::Zero | RecordKind::Trim => img[range].fill(0),
                RecordKind::SyncBegin | RecordKind::SyncEnd => unreachable!("no sync in this test"),
            }
        }
    }
    images
}

fn run_case(ops: Vec<Op>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let group = make_group(dir.path());
        let stop = tokio_util::sync::CancellationToken::new();
        let cutter = tokio::spawn(group.clone().run_age_cutter(stop.clone()));
        // Admit every operation in order (as the NBD server does), then let them all run at once.
        let mut tasks = tokio::task::JoinSet::new();
        for op in &ops {
            match *op {
                Op::Write {
                    vol,
                    offset,
                    len,
                    seed,
                } => {
                    tasks.spawn(group.write(vol, offset, pattern(seed, offset, len), false));
                }
                Op::Zero { vol, offset, len } => {
                    tasks.spawn(group.zero(vol, offset, len, RecordKind::Zero, false));
                }
                Op::Trim { vol, offset, len } => {
                    tasks.spawn(group.zero(vol, offset, len, RecordKind::Trim, false));
                }
                Op::Flush { vol } => {
                    tasks.spawn(group.flush_volume(vol));
                }
            }
        }
        while let Some(r) = tasks.join_next().await {
            r.expect("task").expect("operation");
        }
        let last = group.seal_and_sync().await.expect("seal");
        stop.cancel();
        cutter.await.expect("age cutter stops");
        let images = replay(&group, last);
        for (id, image) in images.iter().enumerate() {
            let on_disk = std::fs::read(dir.path().join(format!("vol{id}"))).expect("read device");
            assert!(
                on_disk == *image,
                "volume {id}: the device differs from the replayed log"
            );
        }
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn concurrent_overlapping_writes_match_the_replayed_log(ops in proptest::collection::vec(op(), 1..120)) {
        run_case(ops);
    }
}

/// The same property without proptest's shrinking, many times with many more operations, so a
/// rare reordering has a chance to show.
#[test]
fn heavy_overlap_many_rounds() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    for _ in 0..4 {
        let ops = proptest::collection::vec(op(), 400)
            .new_tree(&mut runner)
            .expect("ops")
            .current();
        run_case(ops);
    }
}

/// The verifier's hash service: a chunk hashed at a batch boundary while overlapping writes
/// keep coming equals that chunk of the log replayed up to the boundary's seq.
#[test]
fn chunk_hashes_at_batch_boundaries_match_the_replayed_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let group = make_group(dir.path());
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let ops = proptest::collection::vec(op(), 300)
            .new_tree(&mut runner)
            .expect("ops")
            .current();
        let mut writes = tokio::task::JoinSet::new();
        let mut hashes = tokio::task::JoinSet::new();
        for (i, op) in ops.iter().enumerate() {
            match *op {
                Op::Write {
                    vol,
                    offset,
                    len,
                    seed,
                } => {
                    writes.spawn(group.write(vol, offset, pattern(seed, offset, len), false));
                }
                Op::Zero { vol, offset, len } | Op::Trim { vol, offset, len } => {
                    writes.spawn(group.zero(vol, offset, len, RecordKind::Zero, false));
                }
                Op::Flush { vol } => {
                    writes.spawn(group.flush_volume(vol));
                }
            }
            if i % 10 == 0 {
                let g = group.clone();
                let (vol, chunk) = ((i / 10 % 2) as u32, (i / 20 % 2) as u64);
                hashes
                    .spawn(async move { (vol, chunk, g.hash_chunk_at_boundary(vol, chunk).await) });
            }
        }
        while let Some(r) = writes.join_next().await {
            r.expect("task").expect("operation");
        }
        let mut answers = Vec::new();
        while let Some(r) = hashes.join_next().await {
            let (vol, chunk, answer) = r.expect("task");
            answers.push((vol, chunk, answer.expect("hash")));
        }
        let last = group.seal_and_sync().await.expect("seal");
        assert!(answers.len() >= 25);
        for (vol, chunk, (seq, hash)) in answers {
            assert!(seq <= last);
            let images = replay(&group, seq);
            let start = (chunk * CHUNK_BYTES) as usize;
            let end = (start + CHUNK_BYTES as usize).min(VOLUME_BYTES as usize);
            assert_eq!(
                *blake3::hash(&images[vol as usize][start..end]).as_bytes(),
                hash,
                "volume {vol} chunk {chunk} at seq {seq}"
            );
        }
    });
}

/// The verifier's repair: a chunk whose bytes on the device were never shipped (changed behind
/// the agent's back) is marked durably, refused by the hash service until it is resynced, and
/// then sent through the log as the device holds it; the log replayed then equals the device.
#[test]
fn a_repair_resends_the_named_chunks_as_the_device_holds_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let group = make_group(dir.path());
        let len = VOLUME_BYTES.min(3 * CHUNK_BYTES);
        group
            .write(0, 0, pattern(7, 0, len), false)
            .await
            .expect("write");
        group.flush_volume(0).await.expect("flush");
        // A write that reaches the device but never the log.
        let path = dir.path().join("vol0");
        let mut device = std::fs::read(&path).expect("device");
        device[(CHUNK_BYTES + 5) as usize] ^= 0xff;
        std::fs::write(&path, &device).expect("device");

        assert!(
            group
                .repair_chunks(0, &[VOLUME_BYTES.div_ceil(CHUNK_BYTES)])
                .await
                .is_err(),
            "a chunk past the end is refused"
        );
        let before = group.repair_chunks(0, &[1]).await.expect("repair");
        assert!(
            dir.path().join("state/vol0.dirty").exists(),
            "the chunk is marked durably"
        );
        assert!(
            group.hash_chunk_at_boundary(0, 1).await.is_err(),
            "a chunk waiting for its repair is not verified"
        );
        assert_eq!(group.resync_dirty(u64::MAX / 2).await.expect("resync"), 1);
        let last = group.seal_and_sync().await.expect("seal");
        assert!(last > before);
        let images = replay(&group, last);
        assert_eq!(images[0], device, "the log replayed equals the device");
        assert!(!dir.path().join("state/vol0.dirty").exists());
        let (seq, hash) = group.hash_chunk_at_boundary(0, 1).await.expect("hash");
        let start = CHUNK_BYTES as usize;
        let end = (2 * CHUNK_BYTES).min(VOLUME_BYTES) as usize;
        assert!(seq >= last);
        assert_eq!(hash, *blake3::hash(&device[start..end]).as_bytes());
    });
}

/// Volumes waiting for their initial sync: the replica refuses a volume's records before its
/// `SyncBegin`, so writes to a volume whose sync has not begun must not be logged (the sync
/// copies them from the device), while another volume of the group syncs and takes writes.
/// Every record of a volume follows its `SyncBegin`, and the log replayed equals the devices.
#[test]
fn no_record_of_a_volume_precedes_its_sync_begin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let group = {
            // make_group creates the device files: data goes in after, as on a device that
            // held data before it was protected.
            let g = make_group(dir.path());
            for id in 0..2u8 {
                let path = dir.path().join(format!("vol{id}"));
                std::fs::write(&path, pattern(id + 40, 0, VOLUME_BYTES)).expect("device");
            }
            g
        };
        group.await_initial_sync([0, 1]);
        // Writes to both before any sync begins, then while volume 0 syncs.
        for i in 0..8u64 {
            let off = i * 8192;
            group
                .write(1, off, pattern(1, off, 4096), false)
                .await
                .expect("write 1");
            group
                .write(0, off, pattern(2, off, 4096), false)
                .await
                .expect("write 0");
        }
        let g = group.clone();
        let writer = tokio::spawn(async move {
            for i in 0..64u64 {
                let off = (i * 37 % 200) * 4096;
                g.write(1, off, pattern(3, off, 4096), false)
                    .await
                    .expect("write 1");
                g.write(0, off, pattern(4, off, 4096), false)
                    .await
                    .expect("write 0");
            }
        });
        group
            .initial_sync(0, u64::MAX / 2, 0)
            .await
            .expect("sync 0");
        writer.await.expect("writer");
        group
            .initial_sync(1, u64::MAX / 2, 0)
            .await
            .expect("sync 1");
        let last = group.seal_and_sync().await.expect("seal");

        let mut begun = [false; 2];
        let mut images = vec![vec![0u8; VOLUME_BYTES as usize]; 2];
        let mut d = zstd::bulk::Decompressor::new().expect("decompressor");
        let mut data = Vec::new();
        for seq in 1..=last.0 {
            let bytes = group.spool.get(Seq(seq)).expect("spool").expect("held");
            let view = batch::decode(&bytes).expect("decodes");
            for r in view.records() {
                let h = r.header;
                let v = h.volume as usize;
                match h.kind {
                    RecordKind::SyncBegin => begun[v] = true,
                    RecordKind::SyncEnd => assert!(begun[v]),
                    _ => {
                        assert!(
                            begun[v],
                            "a record of volume {v} in batch {seq} precedes its SyncBegin"
                        );
                        let range = h.offset as usize..(h.offset + u64::from(h.length)) as usize;
                        if h.kind == RecordKind::Data {
                            h.decode_data(r.stored, &mut d, &mut data).expect("data");
                            images[v][range].copy_from_slice(&data);
                        } else {
                            images[v][range].fill(0);
                        }
                    }
                }
            }
        }
        for (id, image) in images.iter().enumerate() {
            let device = std::fs::read(dir.path().join(format!("vol{id}"))).expect("device");
            assert!(
                *image == device,
                "volume {id}: the log replayed equals the device"
            );
        }
    });
}
