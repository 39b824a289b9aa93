//! Instant exports (issue 5), with real peers:
//! * `cdp-replica export` of 20 random recorded points, read whole through `nbdcopy`, equals
//!   `restore` of the same points byte for byte, while the agent keeps replicating;
//! * `--writable` accepts writes and reads them back (libnbd), and when it stops the journal,
//!   the target files, the recovery points and later restores are exactly as before.
//!
//! `CDP_TEST_SEED` replays a run (the seed is printed).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;
const VOLUME_BYTES: u64 = 24 * MIB;

/// Random writes, zero-writes and trims through the agent, with bookmarks in between.
fn drive(c: &Cluster, rng: &mut Lcg, ops: usize) {
    let mut nbd = NbdDriver::connect(&c.nbd_uri("v"));
    for i in 0..ops {
        let len = match rng.below(4) {
            0 | 1 => (1 + rng.below(16)) * 4096,
            2 => 1 + rng.below(200_000),
            _ => (1 + rng.below(3 * 256)) * 4096,
        };
        let offset = rng.below(VOLUME_BYTES - len);
        match rng.below(10) {
            0 => nbd.zero(offset, len, false).expect("zero"),
            1 => nbd.trim(offset, len, false).expect("trim"),
            _ => {
                let mut data = vec![0u8; len as usize];
                rng.fill(&mut data);
                nbd.write(offset, &data, rng.below(8) == 0).expect("write");
            }
        }
        if i % 10 == 9 {
            nbd.flush().expect("flush");
        }
        if i % 25 == 24 {
            c.bookmark(&format!("b{i}"), false);
        }
    }
    nbd.flush().expect("flush");
}

/// blake3 of every file under `dir`, by relative path.
fn tree_hashes(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries {
        let e = e.expect("dir entry");
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            for (k, v) in tree_hashes(&path) {
                out.insert(format!("{name}/{k}"), v);
            }
        } else {
            out.insert(name, blake3::hash(&read_file(&path)).to_hex().to_string());
        }
    }
    out
}

#[test]
fn exports_of_random_points_equal_their_restores() {
    if !require_tool("nbdcopy") || !require_python_nbd() {
        return;
    }
    let seed = test_seed();
    let mut rng = Lcg(seed);
    let mut c = Cluster::new();
    let dev = c.make_device("v.img", VOLUME_BYTES, 6 * MIB, seed);
    c.protect("v", &dev, None);
    c.start_replica();
    c.start_agent();
    c.wait_protecting("v", Duration::from_secs(120));
    drive(&c, &mut rng, 400);
    c.wait_caught_up("v", Duration::from_secs(120));

    let points: Vec<u64> = c
        .points("v")
        .iter()
        .filter(|p| p["consistent"] == true)
        .map(|p| p["seq"].as_u64().expect("seq"))
        .collect();
    assert!(
        points.len() >= 20,
        "only {} consistent points",
        points.len()
    );
    let mut chosen: Vec<u64> = (0..19)
        .map(|_| points[rng.below(points.len() as u64) as usize])
        .collect();
    chosen.push(*points.last().expect("a point"));

    // The agent keeps writing while the points are exported.
    let writer = {
        let uri = c.nbd_uri("v");
        let mut wrng = Lcg(seed ^ 0x5555);
        std::thread::spawn(move || {
            let mut nbd = NbdDriver::connect(&uri);
            for _ in 0..200 {
                let mut data = vec![0u8; 64 << 10];
                wrng.fill(&mut data);
                let offset = wrng.below(VOLUME_BYTES / 4096 - 16) * 4096;
                nbd.write(offset, &data, false).expect("write");
            }
            nbd.flush().expect("flush");
        })
    };

    let socket = c.path("export.sock");
    for (i, seq) in chosen.iter().enumerate() {
        let at = format!("seq:{seq}");
        let restored = c.restore("v", &at).expect("restore");
        let mut export = c.start_export("v", &at, &socket, &[]);
        let out = c.path(&format!("export-{i}.img"));
        run_ok(
            Command::new("nbdcopy")
                .arg(format!("nbd+unix:///v?socket={}", socket.display()))
                .arg(&out),
        );
        let exported = read_file(&out);
        let _ = std::fs::remove_file(&out);
        assert_same_image(&format!("export of {at}"), &exported, &restored);
        assert!(
            export.stop(Duration::from_secs(10)),
            "the export exits 0 on SIGTERM"
        );
        assert!(!socket.exists(), "the export removes its socket");
    }
    writer.join().expect("writer");
}

#[test]
fn a_writable_export_keeps_its_writes_to_itself() {
    if !require_python_nbd() {
        return;
    }
    let seed = test_seed() ^ 0xabcd;
    let mut rng = Lcg(seed);
    let mut c = Cluster::new();
    let dev = c.make_device("v.img", VOLUME_BYTES, 4 * MIB, seed);
    c.protect("v", &dev, None);
    c.start_replica();
    c.start_agent();
    c.wait_protecting("v", Duration::from_secs(120));
    drive(&c, &mut rng, 100);
    c.wait_caught_up("v", Duration::from_secs(120));
    // Nothing changes the replica's data from here on but the export under test.
    c.agent
        .as_mut()
        .expect("agent")
        .stop(Duration::from_secs(30));

    let points_before = c.points("v");
    let latest_before = c.restore("v", "latest").expect("restore");
    let files_before = {
        let mut h = tree_hashes(&c.replica_dir.join("volumes"));
        h.extend(tree_hashes(&c.replica_dir.join("journal")));
        h
    };
    assert!(
        !files_before.is_empty(),
        "the replica holds target and journal files"
    );

    let socket = c.path("rw.sock");
    let mut export = c.start_export("v", "latest", &socket, &["--writable"]);
    let mut nbd = NbdDriver::connect(&format!("nbd+unix:///v?socket={}", socket.display()));
    let mut expected = latest_before.clone();
    for _ in 0..50 {
        let len = (1 + rng.below(64)) * 4096;
        let offset = rng.below(VOLUME_BYTES - len);
        let mut data = vec![0u8; len as usize];
        rng.fill(&mut data);
        nbd.write(offset, &data, false)
            .expect("write to the writable export");
        expected[offset as usize..(offset + len) as usize].copy_from_slice(&data);
    }
    nbd.zero(MIB, 3 * 4096, false).expect("zero");
    expected[MIB as usize..(MIB + 3 * 4096) as usize].fill(0);
    nbd.flush().expect("flush");
    let got = nbd.read(0, VOLUME_BYTES).expect("read back");
    assert_same_image("the writable export reads back its writes", &got, &expected);
    drop(nbd);
    assert!(export.stop(Duration::from_secs(10)), "the export exits 0");

    let files_after = {
        let mut h = tree_hashes(&c.replica_dir.join("volumes"));
        h.extend(tree_hashes(&c.replica_dir.join("journal")));
        h
    };
    assert_eq!(
        files_after, files_before,
        "target and journal files are untouched"
    );
    assert_eq!(
        c.points("v"),
        points_before,
        "the recovery points are unchanged"
    );
    let latest_after = c.restore("v", "latest").expect("restore");
    assert_same_image(
        "latest after the writable export",
        &latest_after,
        &latest_before,
    );
    let leftovers: Vec<_> = std::fs::read_dir(&c.replica_dir)
        .expect("replica dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("overlay"))
        .collect();
    assert!(leftovers.is_empty(), "the overlay is gone: {leftovers:?}");
}
