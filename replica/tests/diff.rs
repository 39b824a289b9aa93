//! `diff`: for random pairs of points, the extents equal the runs of 1 MiB chunks whose bytes
//! differ between the two images (the model's, and `restore`'s for some pairs) — with writes
//! that sometimes rewrite identical bytes or undo themselves, which must not be reported; the
//! CLI's table and JSON; pins released afterwards.

mod common;

use std::path::Path;
use std::process::Command;

use cdp_replica::PointSpec;
use cdp_replica::diff::{Extent, merge_chunks};
use cdp_shared::batch::BatchFlags;
use cdp_shared::types::CHUNK_BYTES;
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BIN: &str = env!("CARGO_BIN_EXE_cdp-replica");
const GROUP: &str = "g";
/// Eight chunks and a short ninth.
const VOL: (u32, &str, u64) = (0, "diff-disk", 8 * CHUNK_BYTES + 1000);

/// The extents whose chunks differ between two images.
fn expected(a: &[u8], b: &[u8]) -> Vec<Extent> {
    let chunks: Vec<u64> = a
        .chunks(CHUNK_BYTES as usize)
        .zip(b.chunks(CHUNK_BYTES as usize))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i as u64)
        .collect();
    merge_chunks(&chunks, a.len() as u64)
}

fn run(root: &Path, args: &[&str]) -> String {
    let mut all = vec![
        "diff",
        "--data",
        root.to_str().expect("path"),
        "--volume",
        VOL.1,
    ];
    all.extend(args);
    let o = Command::new(BIN)
        .args(&all)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run diff");
    assert!(
        o.status.success(),
        "diff: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_reports_exactly_the_chunks_whose_images_differ() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("replica");
    init_replica(&root).await;
    let mut h = Harness::open(&root).await;
    let mut rng = StdRng::seed_from_u64(21);
    let mut sim = AgentSim::new(GROUP, &[VOL]);
    sim.images.insert(0, pattern(rng.random(), VOL.2 as usize));
    let mut sim = sim.checkpointed(8);
    h.hello(vec![sim.hello()]).await.expect("welcome");
    let synced = h.sync(&mut sim, 0).await;

    // Batches of: new bytes (some across chunks), identical rewrites of what is there,
    // zeros over zeros, and a write undone by the next batch.
    let mut identical_only = Vec::new();
    for i in 0..30 {
        let len = rng.random_range(1..=300u64 << 10);
        let offset = rng.random_range(0..=VOL.2 - len);
        let current = sim.images[&0][offset as usize..(offset + len) as usize].to_vec();
        let ops = match i % 4 {
            0 | 1 => vec![Op::Data {
                vol: 0,
                offset,
                bytes: pattern(rng.random(), len as usize),
            }],
            2 => vec![Op::Data {
                vol: 0,
                offset,
                bytes: current.clone(),
            }],
            _ => {
                // Changed, then put back as it was in the next batch.
                h.commit(
                    &mut sim,
                    &[Op::Data {
                        vol: 0,
                        offset,
                        bytes: pattern(rng.random(), len as usize),
                    }],
                    BatchFlags::FLUSH,
                    None,
                )
                .await;
                vec![Op::Data {
                    vol: 0,
                    offset,
                    bytes: current,
                }]
            }
        };
        let seq = h.commit(&mut sim, &ops, BatchFlags::FLUSH, None).await;
        if i % 4 == 2 {
            identical_only.push(seq);
        }
    }
    let head = sim.seq;

    // A batch that only rewrites identical bytes: no difference, though it has records.
    for &seq in &identical_only {
        let r = cdp_replica::diff(&root, VOL.1, &PointSpec::Seq(seq - 1), &PointSpec::Seq(seq))
            .await
            .expect("diff");
        assert!(r.extents.is_empty() && r.bytes == 0, "seq {seq}: {r:?}");
    }

    // Random pairs, either order, sometimes equal.
    let mut pairs: Vec<(u64, u64)> = (0..12)
        .map(|_| {
            (
                rng.random_range(synced..=head),
                rng.random_range(synced..=head),
            )
        })
        .collect();
    pairs.push((synced, head));
    pairs.push((head, head));
    for (k, &(a, b)) in pairs.iter().enumerate() {
        let r = cdp_replica::diff(&root, VOL.1, &PointSpec::Seq(a), &PointSpec::Seq(b))
            .await
            .unwrap_or_else(|e| panic!("diff {a} {b}: {e}"));
        let (ia, ib) = (sim.model_image(a, 0), sim.model_image(b, 0));
        let want = expected(&ia, &ib);
        assert_eq!(r.extents, want, "diff seq:{a} seq:{b}");
        assert_eq!(r.bytes, want.iter().map(|e| e.length).sum::<u64>());
        assert_eq!((r.from.seq.0, r.to.seq.0), (a, b));
        if k < 2 {
            // Against restores, not just the model.
            let ra = root.join(format!("a{k}.img"));
            let rb = root.join(format!("b{k}.img"));
            cdp_replica::restore(&root, VOL.1, &PointSpec::Seq(a), &ra)
                .await
                .expect("restore");
            cdp_replica::restore(&root, VOL.1, &PointSpec::Seq(b), &rb)
                .await
                .expect("restore");
            assert_eq!(expected(&read(&ra), &read(&rb)), r.extents);
        }
    }
    let s = cdp_replica::status(&root).await.expect("status");
    assert_eq!(s.volumes[0].pins.count, 0, "diff released its pins");

    // The CLI: JSON and the table.
    let (a, b) = (synced, head);
    let want = expected(&sim.model_image(a, 0), &sim.model_image(b, 0));
    assert!(!want.is_empty());
    let json: serde_json::Value = serde_json::from_str(&run(
        &root,
        &["--from", &format!("seq:{a}"), "--to", "latest", "--json"],
    ))
    .expect("JSON");
    assert_eq!(json["volume"], VOL.1);
    assert_eq!(json["from"]["seq"], a);
    assert_eq!(json["to"]["seq"], b);
    let extents: Vec<(u64, u64)> = json["extents"]
        .as_array()
        .expect("extents")
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().expect("offset"),
                e["length"].as_u64().expect("length"),
            )
        })
        .collect();
    assert_eq!(
        extents,
        want.iter()
            .map(|e| (e.offset, e.length))
            .collect::<Vec<_>>()
    );
    let total: u64 = want.iter().map(|e| e.length).sum();
    assert_eq!(json["bytes"], total);
    let table = run(&root, &["--from", &format!("seq:{a}"), "--to", "latest"]);
    assert!(
        table.contains(&format!(
            "{} extent{}, {total} bytes differ",
            want.len(),
            if want.len() == 1 { "" } else { "s" }
        )) && table.contains("OFFSET"),
        "{table}"
    );
    let o = Command::new(BIN)
        .args([
            "diff",
            "--data",
            root.to_str().expect("path"),
            "--volume",
            VOL.1,
            "--from",
            "seq:1",
            "--to",
            "latest",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run diff");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("error: ") && err.contains("before the window"),
        "{err}"
    );
    h.shutdown().await;
}
