//! The correctness oracle (issue 2): thousands of random writes, zero-writes and trims of
//! random sizes and offsets, with flushes, FUA writes and bookmarks in between, driven through
//! a real NBD client (libnbd) while the initial sync of a device that already holds data is
//! running. The test keeps every operation, reconstructs the expected image at any point of the
//! log, and restores at least 20 random recorded points byte for byte: points before the sync
//! completed must be refused, the sync's completion point and every later one must be exact.
//!
//! `CDP_ORACLE_OPS` sets the number of operations (default 2500), `CDP_TEST_SEED` the seed.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;
const VOLUME_BYTES: u64 = 64 * MIB;
const DATA_BYTES: u64 = 40 * MIB;
const CHUNK: u64 = MIB;

#[derive(Clone, Copy, Debug)]
enum Op {
    Write { offset: u64, len: u64, seed: u64 },
    Zero { offset: u64, len: u64 },
}

impl Op {
    /// Records the agent makes of this operation: one per chunk it touches.
    fn records(&self) -> u64 {
        let (offset, len) = match *self {
            Op::Write { offset, len, .. } | Op::Zero { offset, len } => (offset, len),
        };
        (offset + len - 1) / CHUNK - offset / CHUNK + 1
    }

    fn apply(&self, image: &mut [u8]) {
        match *self {
            Op::Write { offset, len, seed } => {
                Lcg(seed).fill(&mut image[offset as usize..(offset + len) as usize])
            }
            Op::Zero { offset, len } => image[offset as usize..(offset + len) as usize].fill(0),
        }
    }
}

/// A random range: mostly small, sometimes up to 3 chunks, sometimes unaligned.
fn random_range(rng: &mut Lcg) -> (u64, u64) {
    let len = match rng.below(10) {
        0..=5 => (1 + rng.below(16)) * 4096,
        6 | 7 => 1 + rng.below(64 * 1024),
        8 => (1 + rng.below(256)) * 4096,
        _ => 1 + rng.below(3 * MIB),
    };
    let mut offset = rng.below(VOLUME_BYTES - len);
    if rng.below(3) != 0 {
        offset &= !511;
    }
    (offset, len)
}

#[test]
fn oracle_random_operations_restore_byte_for_byte() {
    if !require_python_nbd() {
        return;
    }
    let seed = test_seed();
    let n_ops: usize = std::env::var("CDP_ORACLE_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2500);
    let mut rng = Lcg(seed);
    let mut c = Cluster::new();
    let device = c.make_device("vol.img", VOLUME_BYTES, DATA_BYTES, seed ^ 0x5eed);
    let initial = read_file(&device);
    c.protect("vol", &device, None);
    // Slow the initial sync down so that operations run while it is in progress.
    let cfg_path = c.agent_dir.join("agent.toml");
    let cfg = std::fs::read_to_string(&cfg_path).expect("agent.toml");
    assert!(
        cfg.contains("sync_bytes_per_sec_max = 0"),
        "agent.toml: {cfg}"
    );
    std::fs::write(
        &cfg_path,
        cfg.replace(
            "sync_bytes_per_sec_max = 0",
            &format!("sync_bytes_per_sec_max = {}", 12 * MIB),
        ),
    )
    .expect("agent.toml");
    c.start_replica();
    c.start_agent();
    let mut nbd = NbdDriver::connect(&c.nbd_uri("vol"));
    assert_eq!(nbd.size(), VOLUME_BYTES);

    // State-changing operations in log order, and anchors: (seq, operations done) learned right
    // after a flush, a FUA write or a bookmark, when every completed operation is sealed.
    let mut ops: Vec<Op> = Vec::new();
    let mut anchors: Vec<(u64, usize)> = Vec::new();
    let mut bookmarks: Vec<(String, u64, usize)> = Vec::new();
    let mut model = initial.clone();
    let mut data = Vec::new();
    for i in 0..n_ops {
        if i == n_ops / 3 {
            // The first third ran during the initial sync; the rest runs after it completed.
            c.wait_protecting("vol", Duration::from_secs(120));
        }
        let roll = rng.below(100);
        match roll {
            0..=69 => {
                let (offset, len) = random_range(&mut rng);
                let op_seed = rng.next_u64();
                let fua = rng.below(20) == 0;
                data.resize(len as usize, 0);
                Lcg(op_seed).fill(&mut data);
                nbd.write(offset, &data, fua)
                    .unwrap_or_else(|e| panic!("write #{i} at {offset}+{len}: {e}"));
                let op = Op::Write {
                    offset,
                    len,
                    seed: op_seed,
                };
                op.apply(&mut model);
                ops.push(op);
                if fua {
                    anchors.push((c.agent_last_seq("vol"), ops.len()));
                }
            }
            70..=79 => {
                let (offset, len) = random_range(&mut rng);
                nbd.zero(offset, len, false)
                    .unwrap_or_else(|e| panic!("zero #{i}: {e}"));
                let op = Op::Zero { offset, len };
                op.apply(&mut model);
                ops.push(op);
            }
            80..=89 => {
                let (offset, len) = random_range(&mut rng);
                nbd.trim(offset, len, false)
                    .unwrap_or_else(|e| panic!("trim #{i}: {e}"));
                let op = Op::Zero { offset, len };
                op.apply(&mut model);
                ops.push(op);
            }
            90..=96 => {
                nbd.flush().unwrap_or_else(|e| panic!("flush #{i}: {e}"));
                anchors.push((c.agent_last_seq("vol"), ops.len()));
            }
            _ => {
                let name = format!("bm-{i}");
                let wait = rng.below(2) == 0;
                let mut args = vec!["bookmark", name.as_str()];
                if wait {
                    args.push("--wait");
                }
                let out = run_ok(&mut c.agent_cmd(&args));
                let seq: u64 = out
                    .split_whitespace()
                    .skip_while(|w| *w != "seq")
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("bookmark output names its seq: {out}"));
                anchors.push((seq, ops.len()));
                bookmarks.push((name, seq, ops.len()));
            }
        }
        if i % 250 == 0 {
            // Reads through the agent see what was written.
            let (offset, len) = random_range(&mut rng);
            let len = len.min(256 * 1024);
            let got = nbd.read(offset, len).expect("read");
            assert_same_image(
                &format!("NBD read after op {i}"),
                &got,
                &model[offset as usize..(offset + len) as usize],
            );
        }
    }
    nbd.flush().expect("final flush");
    anchors.push((c.agent_last_seq("vol"), ops.len()));
    drop(nbd);
    assert_same_image(
        "the device after all operations",
        &read_file(&device),
        &model,
    );

    c.wait_protecting("vol", Duration::from_secs(120));
    let head = c.wait_caught_up("vol", Duration::from_secs(120));

    // The window: from the batch that completed the initial sync to the head.
    let points = c.points("vol");
    assert!(!points.is_empty(), "the replica lists recovery points");
    let window_start = points[0]["seq"].as_u64().expect("seq");
    let records: BTreeMap<u64, u64> = points
        .iter()
        .map(|p| {
            (
                p["seq"].as_u64().expect("seq"),
                p["records"].as_u64().expect("records"),
            )
        })
        .collect();
    assert_eq!(
        *records.keys().next_back().expect("points"),
        head,
        "the window ends at the head"
    );
    for w in records.keys().collect::<Vec<_>>().windows(2) {
        assert_eq!(*w[0] + 1, *w[1], "points are dense seqs");
    }
    let during_sync: Vec<_> = anchors
        .iter()
        .filter(|(s, _)| *s < window_start)
        .copied()
        .collect();
    assert!(
        !during_sync.is_empty(),
        "no point was taken during the initial sync (it completed at seq {window_start}); the test needs a slower sync"
    );

    // Operations covered by every point in the window, walking the records from an anchor.
    let (anchor_seq, anchor_ops) = *anchors
        .iter()
        .find(|(s, _)| *s >= window_start)
        .expect("an anchor after the sync");
    let mut ops_at: BTreeMap<u64, usize> = BTreeMap::new();
    ops_at.insert(anchor_seq, anchor_ops);
    let (mut k, mut consumed) = (anchor_ops, 0u64);
    for (&seq, &n) in records.range(anchor_seq + 1..) {
        consumed += n;
        while consumed > 0 {
            assert!(
                k < ops.len(),
                "batch {seq} holds more records than operations remain"
            );
            let r = ops[k].records();
            assert!(
                r <= consumed,
                "batch {seq} ends inside operation {k}: an operation was split across batches"
            );
            consumed -= r;
            k += 1;
        }
        ops_at.insert(seq, k);
    }
    let (mut k, mut owed) = (anchor_ops, 0u64);
    for &seq in records
        .range(window_start..anchor_seq)
        .rev()
        .map(|(s, _)| s)
    {
        owed += records[&(seq + 1)];
        while owed > 0 {
            assert!(k > 0, "batch {seq}: more records than operations");
            k -= 1;
            let r = ops[k].records();
            assert!(r <= owed, "batch {seq} ends inside operation {k}");
            owed -= r;
        }
        ops_at.insert(seq, k);
    }
    for &(seq, k) in anchors.iter().filter(|(s, _)| *s >= window_start) {
        assert_eq!(
            ops_at[&seq], k,
            "anchor at seq {seq}: the log and the client disagree on what it covers"
        );
    }

    // Points to restore: the sync's completion, the head, bookmarks, flush points and random
    // batch boundaries (age and size cuts) — at least 20.
    let mut chosen: BTreeMap<u64, String> = BTreeMap::new();
    chosen.insert(window_start, format!("seq:{window_start}"));
    chosen.insert(head, "latest".into());
    for (name, seq, _) in bookmarks
        .iter()
        .filter(|(_, s, _)| *s >= window_start)
        .take(4)
    {
        chosen.insert(*seq, format!("bookmark:{name}"));
    }
    let seqs: Vec<u64> = records.keys().copied().collect();
    while chosen.len() < 22.min(seqs.len()) {
        let s = seqs[rng.below(seqs.len() as u64) as usize];
        chosen.entry(s).or_insert_with(|| format!("seq:{s}"));
    }
    let mut image = initial.clone();
    let mut applied = 0;
    for (&seq, point) in &chosen {
        let k = ops_at[&seq];
        while applied < k {
            ops[applied].apply(&mut image);
            applied += 1;
        }
        let got = c
            .restore("vol", point)
            .unwrap_or_else(|e| panic!("restore at {point} (seq {seq}) failed: {e}"));
        assert_same_image(
            &format!("restore at {point} (seq {seq}, {k} operations)"),
            &got,
            &image,
        );
    }
    eprintln!(
        "restored {} points exactly (window {window_start}..={head}, {} operations)",
        chosen.len(),
        ops.len()
    );

    // Points taken before the sync completed are refused, saying why.
    for (seq, _) in during_sync.iter().take(3) {
        let err = c
            .restore("vol", &format!("seq:{seq}"))
            .expect_err("a point inside the initial sync must be refused");
        assert!(
            err.contains("sync") || err.contains("window"),
            "refusal names the reason: {err}"
        );
    }
    for (name, seq, _) in bookmarks
        .iter()
        .filter(|(_, s, _)| *s < window_start)
        .take(2)
    {
        let err = c
            .restore("vol", &format!("bookmark:{name}"))
            .expect_err("a bookmark inside the initial sync must be refused");
        assert!(
            err.contains("sync") || err.contains("window"),
            "refusal of bookmark at seq {seq} names the reason: {err}"
        );
    }
}
