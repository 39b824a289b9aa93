//! Catalog + journal + reconstruction against a reference model: batches are ingested
//! in-process (no QUIC), then every volume is restored at every seq and compared byte for byte
//! with the model's image at that seq.

mod common;

use std::path::Path;

use cdp_replica::catalog::{Catalog, OpenMode};
use cdp_replica::datadir::DataDir;
use cdp_replica::journal::segment_name;
use cdp_replica::{PointSpec, ReplicaError};
use cdp_shared::batch::BatchFlags;
use cdp_shared::types::{CHUNK_BYTES, Seq};
use common::*;
use proptest::prelude::*;

const VOL_A: (u32, &str, u64) = (0, "vol-a", 3 * CHUNK_BYTES + 4096);
const VOL_B: (u32, &str, u64) = (1, "vol-b", 2 * CHUNK_BYTES + 512);

/// One random byte-changing op: (volume, offset, length, kind).
type RandomOp = (u32, u64, u64, u8);

fn op_of(sim: &AgentSim, (vol, offset, len, kind): RandomOp, seed: u64) -> Op {
    let size = sim.volumes[vol as usize].size;
    let offset = offset % size;
    let len = len.clamp(1, size - offset);
    match kind {
        0 | 1 => Op::Data {
            vol,
            offset,
            bytes: pattern(seed, len as usize),
        },
        2 => Op::Zero { vol, offset, len },
        _ => Op::Trim { vol, offset, len },
    }
}

/// Runs a whole scenario and checks every restore. Returns the harness root's sim.
async fn scenario(root: &Path, ops: &[RandomOp], ops_per_batch: usize) -> AgentSim {
    init_replica(root).await;
    let mut h = Harness::open(root).await;
    let mut sim = AgentSim::new("g", &[VOL_A, VOL_B]);
    // What the devices hold before protection starts.
    let a0 = pattern(11, VOL_A.2 as usize);
    sim.images.insert(0, a0);
    let mut b0 = vec![0u8; VOL_B.2 as usize];
    b0[100..300_000].copy_from_slice(&pattern(12, 299_900));
    sim.images.insert(1, b0);
    sim.history[0] = sim.images.clone();

    let welcome = h.hello(vec![sim.hello()]).await.expect("welcome");
    assert_eq!(welcome[0].durable.0, 0);
    assert_eq!(welcome[0].generation.len(), 32);

    let mut batches = Vec::new();
    // Volume A syncs first; then journaled writes on A while B is still new; then B syncs;
    // then writes on both.
    let a_done = sim.sync_volume(0, &mut batches);
    let split = ops.len() / 3;
    let mut n = 0u64;
    fn push_ops(sim: &mut AgentSim, batches: &mut Vec<(u64, Vec<u8>)>, ops: Vec<Op>, n: &mut u64) {
        *n += 1;
        let bookmark = n.is_multiple_of(4).then(|| format!("bm-{}", *n % 8));
        let flags = if n.is_multiple_of(5) {
            BatchFlags::INCONSISTENT
        } else {
            BatchFlags::FLUSH
        };
        batches.push(sim.batch(&ops, flags, bookmark.as_deref()));
    }
    for group in ops[..split].chunks(ops_per_batch) {
        let ops: Vec<Op> = group
            .iter()
            .enumerate()
            .map(|(i, &o)| op_of(&sim, (0, o.1, o.2, o.3), n * 100 + i as u64))
            .collect();
        push_ops(&mut sim, &mut batches, ops, &mut n);
    }
    let b_done = sim.sync_volume(1, &mut batches);
    for group in ops[split..].chunks(ops_per_batch) {
        let ops: Vec<Op> = group
            .iter()
            .enumerate()
            .map(|(i, &o)| op_of(&sim, o, n * 100 + i as u64 + 7))
            .collect();
        push_ops(&mut sim, &mut batches, ops, &mut n);
    }
    let last = sim.seq;
    for (_, bytes) in batches {
        h.submit(bytes).await;
    }
    h.wait_ack("g", last).await;

    check_every_restore(root, &sim, &[(VOL_A, a_done), (VOL_B, b_done)]).await;
    h.shutdown().await;
    sim
}

/// Restores every volume at every seq: before the volume's sync completed it is refused,
/// from there on it equals the model.
async fn check_every_restore(root: &Path, sim: &AgentSim, vols: &[((u32, &str, u64), u64)]) {
    for &((id, name, _), done) in vols {
        for seq in 1..=sim.seq {
            let got = restore_bytes(root, name, &PointSpec::Seq(seq)).await;
            if seq < done {
                let e = got.expect_err("a restore before the initial sync completed is refused");
                assert!(matches!(e, ReplicaError::Point(_)), "{e}");
                assert!(
                    e.to_string().contains("before the window")
                        && e.to_string().contains(&format!("seq {done}")),
                    "{e}"
                );
            } else {
                let (bytes, summary) =
                    got.unwrap_or_else(|e| panic!("restore {name} at seq {seq}: {e}"));
                assert_eq!(summary.point.seq, Seq(seq));
                assert!(
                    bytes == sim.image_at(seq, id),
                    "{name} at seq {seq} differs from the model"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_match_the_model_at_every_seq() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("replica");
    let ops: Vec<RandomOp> = vec![
        (0, 0, 4096, 0),
        (0, CHUNK_BYTES - 100, 300, 0), // crosses a chunk: split in two records
        (0, 5000, 20_000, 2),
        (0, 2 * CHUNK_BYTES, CHUNK_BYTES + 4096, 1), // a whole chunk and a bit
        (1, 10, 1000, 0),
        (0, 3000, 2000, 3),
        (1, 2 * CHUNK_BYTES, 512, 0), // the last bytes of B
        (1, 0, 2 * CHUNK_BYTES + 512, 3),
        (1, 4096, 8192, 0),
        (0, 6000, 10, 0),
        (0, 6002, 4, 2),
        (1, CHUNK_BYTES - 1, 2, 0),
    ];
    let sim = scenario(&root, &ops, 2).await;

    // latest: the last batch is consistent unless it was marked otherwise.
    let (bytes, s) = restore_bytes(&root, "vol-a", &PointSpec::Latest)
        .await
        .expect("latest");
    assert!(s.point.consistent);
    assert!(bytes == sim.image_at(s.point.seq.0, 0));
    let last_consistent = (1..=sim.seq)
        .rev()
        .find(|&q| q % 5 != 0 || q < 5)
        .expect("a consistent seq");
    assert!(s.point.seq.0 <= sim.seq && s.point.seq.0 >= last_consistent.saturating_sub(1));

    // A bookmark: the latest batch carrying it.
    let points = cdp_replica::points(&root, "vol-b").await.expect("points");
    let bm = points
        .iter()
        .rev()
        .find(|p| p.bookmark.is_some())
        .expect("a bookmark in the window");
    let name = bm.bookmark.clone().expect("name");
    let (bytes, s) = restore_bytes(&root, "vol-b", &PointSpec::Bookmark(name.clone()))
        .await
        .expect("bookmark");
    assert_eq!(s.point.seq, bm.seq);
    assert_eq!(s.point.bookmark.as_deref(), Some(name.as_str()));
    assert!(bytes == sim.image_at(bm.seq.0, 1));

    // A time: the latest consistent batch at or before it.
    let t = chrono::DateTime::from_timestamp_nanos(AgentSim::agent_time(sim.seq - 1) + 500_000_000);
    let (_, s) = restore_bytes(&root, "vol-a", &PointSpec::Time(t))
        .await
        .expect("time");
    assert!(s.point.seq.0 < sim.seq && s.point.consistent);

    // Outside the window.
    let e = restore_bytes(&root, "vol-a", &PointSpec::Seq(sim.seq + 1))
        .await
        .expect_err("past the head");
    assert!(
        e.to_string().contains("first restorable point is seq"),
        "{e}"
    );
    let early = chrono::DateTime::from_timestamp_nanos(TIME_BASE_NS);
    let e = restore_bytes(&root, "vol-b", &PointSpec::Time(early))
        .await
        .expect_err("before the window");
    assert!(
        e.to_string()
            .contains("no crash-consistent point at or before"),
        "{e}"
    );
    let e = restore_bytes(&root, "vol-a", &PointSpec::Bookmark("nope".into()))
        .await
        .expect_err("unknown bookmark");
    assert!(e.to_string().contains("no bookmark"), "{e}");
    let e = restore_bytes(&root, "vol-zz", &PointSpec::Latest)
        .await
        .expect_err("unknown volume");
    assert!(matches!(e, ReplicaError::UnknownVolume { .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_segment_tail_is_truncated_on_start() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("replica");
    let ops: Vec<RandomOp> = (0..12u64)
        .map(|i| ((i % 2) as u32, i * 77_777, 5000 + i * 999, (i % 4) as u8))
        .collect();
    let mut sim = scenario(&root, &ops, 3).await;

    let dir = DataDir::existing(&root).expect("dir");
    let jdir = dir.journal("g");
    let mut segs: Vec<_> = std::fs::read_dir(&jdir)
        .expect("journal")
        .map(|e| e.expect("entry").file_name().into_string().expect("name"))
        .collect();
    segs.sort();
    let last = jdir.join(segs.last().expect("a segment"));
    let committed_len = std::fs::metadata(&last).expect("stat").len();
    // Half a batch and some garbage after the committed end, and a newer segment nobody
    // references (as a crash between append and commit would leave them).
    let (_, next) = sim.batch(
        &[Op::Data {
            vol: 0,
            offset: 0,
            bytes: pattern(99, 10_000),
        }],
        BatchFlags::FLUSH,
        None,
    );
    let mut torn = next[..next.len() / 2].to_vec();
    torn.extend_from_slice(&[0xAB; 77]);
    let f = std::fs::OpenOptions::new()
        .append(true)
        .open(&last)
        .expect("open");
    std::io::Write::write_all(&mut &f, &torn).expect("tear");
    drop(f);
    let newer = jdir.join(segment_name(9_999));
    std::fs::write(&newer, b"CDPJ garbage").expect("newer segment");

    let mut h = Harness::open(&root).await;
    assert_eq!(
        std::fs::metadata(&last).expect("stat").len(),
        committed_len,
        "the torn tail is truncated"
    );
    assert!(!newer.exists(), "the uncommitted newer segment is deleted");
    // Everything committed still restores.
    let catalog = Catalog::open(&dir.catalog(), OpenMode::Existing)
        .await
        .expect("catalog");
    let a = catalog
        .volume_by_name("vol-a")
        .await
        .expect("query")
        .expect("vol-a");
    let b = catalog
        .volume_by_name("vol-b")
        .await
        .expect("query")
        .expect("vol-b");
    catalog.close().await;
    let (a_done, b_done) = (
        a.sync_done_seq.expect("a synced"),
        b.sync_done_seq.expect("b synced"),
    );
    // The batch that was torn was never acknowledged: the agent sends it again.
    h.hello(vec![sim.hello()]).await.expect("welcome again");
    h.submit(next).await;
    h.wait_ack("g", sim.seq).await;
    check_every_restore(&root, &sim, &[(VOL_A, a_done.0), (VOL_B, b_done.0)]).await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_duplicates_and_semantic_refusals() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("replica");
    init_replica(&root).await;
    let mut h = Harness::open(&root).await;
    let mut sim = AgentSim::new("g", &[VOL_A]);
    h.hello(vec![sim.hello()]).await.expect("welcome");

    // Data for a volume whose sync has not begun is refused; nothing is recorded.
    let mut bad = AgentSim::new("g", &[VOL_A]);
    let (_, early) = bad.batch(
        &[Op::Data {
            vol: 0,
            offset: 0,
            bytes: vec![1; 10],
        }],
        BatchFlags::FLUSH,
        None,
    );
    h.submit(early).await;
    match h.next_reply().await {
        cdp_shared::wire::Control::Nack {
            seq: cdp_shared::types::Seq(1),
            reason,
            ..
        } => {
            assert!(reason.contains("SyncBegin must come first"), "{reason}")
        }
        other => panic!("expected a nack, got {other:?}"),
    }

    let mut batches = Vec::new();
    sim.sync_volume(0, &mut batches);
    let (_, w) = sim.batch(
        &[Op::Data {
            vol: 0,
            offset: 10,
            bytes: vec![2; 10],
        }],
        BatchFlags::FLUSH,
        None,
    );
    batches.push((sim.seq, w));
    // Reverse order: all wait for seq 1, then commit in order.
    for (_, b) in batches.iter().rev() {
        h.submit(b.clone()).await;
    }
    h.wait_ack("g", sim.seq).await;
    // A duplicate is re-acked.
    h.submit(batches[0].1.clone()).await;
    h.wait_ack("g", sim.seq).await;
    // A conflicting batch with a durable seq is refused.
    let mut other = AgentSim::new("g", &[VOL_A]);
    let (_, conflicting) = other.batch(&[Op::SyncBegin(0)], BatchFlags::SYNC, None);
    h.submit(conflicting).await;
    match h.next_reply().await {
        cdp_shared::wire::Control::Nack {
            seq: cdp_shared::types::Seq(1),
            reason,
            ..
        } => {
            assert!(reason.contains("conflicts with the journal"), "{reason}")
        }
        other => panic!("expected a nack, got {other:?}"),
    }
    // A batch too far ahead is refused.
    let mut ahead = sim.batch(&[], BatchFlags::FLUSH, None);
    for _ in 0..200 {
        ahead = sim.batch(&[], BatchFlags::FLUSH, None);
    }
    h.submit(ahead.1).await;
    match h.next_reply().await {
        cdp_shared::wire::Control::Nack { reason, .. } => {
            assert!(reason.contains("too far ahead"), "{reason}")
        }
        other => panic!("expected a nack, got {other:?}"),
    }
    // Another agent cannot take the group.
    let mut intruder = Harness {
        agent: cdp_shared::identity::Fingerprint([9; 32]),
        ..h
    };
    let refused = intruder
        .hello(vec![sim.hello()])
        .await
        .expect_err("refused");
    assert!(refused.contains("belongs to another agent"), "{refused}");
    // Nor resize a volume or reuse its name in another group.
    intruder.agent = cdp_shared::identity::Fingerprint([7; 32]);
    let mut resized = sim.hello();
    resized.volumes[0].size += 4096;
    assert!(
        intruder
            .hello(vec![resized])
            .await
            .expect_err("resized")
            .contains("cannot be renamed or resized")
    );
    let thief = AgentSim::new("g2", &[VOL_A]);
    assert!(
        intruder
            .hello(vec![thief.hello()])
            .await
            .expect_err("name taken")
            .contains("already used")
    );
    intruder.shutdown().await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    #[test]
    fn random_writes_restore_exactly(
        ops in proptest::collection::vec((0u32..2, 0u64..4 * CHUNK_BYTES, 1u64..400_000, 0u8..4), 3..24),
        per_batch in 1usize..4,
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        rt.block_on(async {
            let tmp = tempfile::tempdir().expect("tempdir");
            scenario(&tmp.path().join("replica"), &ops, per_batch).await;
        });
    }
}
