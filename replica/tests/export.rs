//! `cdp-replica export` (the real binary, driven by a small NBD client written here, and by
//! `nbdcopy` when it is installed): exports read exactly like restores at several points,
//! while ingest runs and when nothing serves; the first read plans one chunk, not the volume;
//! a writable export keeps its writes in an overlay that is thrown away, leaving the journal,
//! the catalog's points and the target file as they were; and an export holds its pin while
//! the trimmer trims up to it, its chunks planned before and after the base moved both reading
//! the pinned image.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use cdp_replica::catalog::{Catalog, GroupRow, OpenMode};
use cdp_replica::datadir::DataDir;
use cdp_replica::{PointSpec, Retention};
use cdp_shared::batch::BatchFlags;
use cdp_shared::nbd::proto;
use cdp_shared::types::{CHUNK_BYTES, Seq};
use common::export::NbdProc;
use common::nbd::*;
use common::ops::{Kinds, Mix};
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_cdp-replica");
const GROUP: &str = "g";
/// Three chunks and a bit: reads span chunks, the last one is short.
const VOL: (u32, &str, u64) = (0, "exp-disk", 3 * CHUNK_BYTES + 8192);

/// Starts `cdp-replica export` of the volume and waits (with the deadline) for its line.
fn start_export(root: &Path, at: &str, socket: Option<&Path>, writable: bool) -> NbdProc {
    NbdProc::export(BIN, root, VOL.1, at, socket, writable)
}

/// Runs `cdp-replica restore` and returns the image.
fn restore_bin(root: &Path, at: &str, name: &str) -> Vec<u8> {
    let out = root.join(format!("restored-{name}"));
    let o = Command::new(BIN)
        .args([
            "restore",
            "--data",
            root.to_str().expect("path"),
            "--volume",
            VOL.1,
            "--at",
            at,
            "--out",
            out.to_str().expect("path"),
        ])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run restore");
    assert!(
        o.status.success(),
        "restore: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let bytes = read(&out);
    std::fs::remove_file(&out).expect("remove");
    bytes
}

/// Whether `program` runs; outside CI a missing tool skips (with the reason printed), in CI
/// (`CI=true`) it fails.
fn have_tool(program: &str, probe: &[&str], package: &str) -> bool {
    let runs = Command::new(program)
        .args(probe)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !runs {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "`{program}` does not run; CI needs it: install the Debian package {package}"
        );
        eprintln!(
            "skipping the {program} check: it does not run; install the Debian package {package}"
        );
    }
    runs
}

async fn pin_count(root: &Path) -> usize {
    cdp_replica::status(root).await.expect("status").volumes[0]
        .pins
        .count
}

/// Random writes (sometimes across chunks, sometimes zero or trim), one batch each.
const WRITES: Mix = Mix {
    count: 1..=4,
    len: 1..=200 << 10,
    kinds: Kinds::PickZeroTrim(10),
};

fn random_ops(rng: &mut StdRng, size: u64) -> Vec<Op> {
    WRITES.ops(rng, size)
}

/// A replica with the volume synced (from a random image) and `batches` more batches, ingest
/// running in-process. Returns the harness, the model and the seq of the sync.
async fn replica(
    root: &Path,
    retention: Retention,
    real_time: bool,
    batches: u64,
    seed: u64,
) -> (Harness, AgentSim, u64) {
    cdp_replica::init_with(root, "127.0.0.1:0".parse().expect("addr"), &retention)
        .await
        .expect("init");
    let mut h = Harness::open(root).await;
    let mut sim = AgentSim::new(GROUP, &[VOL]);
    sim.real_time = real_time;
    let mut rng = StdRng::seed_from_u64(seed);
    sim.images.insert(0, pattern(rng.random(), VOL.2 as usize));
    let mut sim = sim.checkpointed(8);
    h.hello(vec![sim.hello()]).await.expect("welcome");
    let synced = h.sync(&mut sim, 0).await;
    for i in 0..batches {
        let bookmark = format!("b{i}");
        let ops = random_ops(&mut rng, VOL.2);
        h.commit(
            &mut sim,
            &ops,
            BatchFlags::FLUSH,
            (i % 5 == 0).then_some(bookmark.as_str()),
        )
        .await;
    }
    (h, sim, synced)
}

/// Exports of several points (while ingest runs, and after it stopped) read exactly like the
/// model and like `restore`, through two connections at once, by name and by the empty name;
/// stopping removes the socket and the pin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_read_like_restores_at_several_points() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("replica");
    let (h, sim, synced) = replica(&root, Retention::default(), false, 24, 11).await;
    let head = sim.seq;
    let points = [
        (format!("seq:{synced}"), synced),
        ("bookmark:b5".to_owned(), synced + 6),
        (format!("seq:{}", synced + 13), synced + 13),
        ("latest".to_owned(), head),
    ];
    for (i, (at, seq)) in points.iter().enumerate() {
        let socket = root.join(format!("e{i}.sock"));
        let e = start_export(&root, at, Some(&socket), false);
        assert!(
            e.line
                .starts_with(&format!("export of volume {} at seq {seq} (", VOL.1))
                && e.line.contains(&format!(
                    "read-only: nbd+unix:///{}?socket={}",
                    VOL.1,
                    socket.display()
                )),
            "{}",
            e.line
        );
        assert_eq!(pin_count(&root).await, 1, "the export holds a pin");
        let want = sim.model_image(*seq, 0);
        // Two connections reading at once (one by the empty name), in odd-sized steps.
        let (s1, s2) = (e.socket.clone(), e.socket.clone());
        let a = std::thread::spawn(move || Nbd::connect(&s1, VOL.1).read_all(1_500_000));
        let b = std::thread::spawn(move || {
            let mut c = Nbd::connect(&s2, "");
            assert!(c.flags & proto::NBD_FLAG_READ_ONLY != 0);
            c.read_all(CHUNK_BYTES + 4096 + 17)
        });
        let (a, b) = (a.join().expect("reader"), b.join().expect("reader"));
        assert!(
            a == want && b == want,
            "the export at {at} differs from the model"
        );
        assert!(
            restore_bin(&root, at, &i.to_string()) == want,
            "restore at {at} differs from the model"
        );
        if i == 1 && have_tool("nbdcopy", &["--version"], "libnbd-bin") {
            let out = root.join("nbdcopy.img");
            let uri = format!("nbd+unix:///{}?socket={}", VOL.1, e.socket.display());
            let o = Command::new("nbdcopy")
                .args([uri.as_str(), out.to_str().expect("path")])
                .output()
                .expect("run nbdcopy");
            assert!(
                o.status.success(),
                "nbdcopy: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(read(&out) == want, "nbdcopy's copy differs from the model");
        }
        e.stop();
        assert!(!socket.exists(), "the socket is removed");
        assert_eq!(pin_count(&root).await, 0, "the pin is released");
    }

    // Nothing serving now; the default socket.
    h.shutdown().await;
    let e = start_export(&root, "bookmark:b10", None, false);
    assert_eq!(e.socket, root.join(format!("export-{}.sock", VOL.1)));
    assert!(e.connect().read_all(3 << 20) == sim.model_image(synced + 11, 0));
    e.stop();

    // Refusals: one sentence, exit 1.
    for (at, needle) in [
        (format!("seq:{}", head + 10), "past the end of the journal"),
        ("bookmark:nope".to_owned(), "has no bookmark"),
    ] {
        let o = Command::new(BIN)
            .args([
                "export",
                "--data",
                root.to_str().expect("path"),
                "--volume",
                VOL.1,
                "--at",
                &at,
            ])
            .env("RUST_LOG", "warn")
            .output()
            .expect("run export");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains("error: ") && err.contains(needle), "{err}");
    }
    assert_eq!(pin_count(&root).await, 0);
}

/// Opening an export builds no plan: the first read plans only the chunk it reads, however
/// many records the journal holds (and a read across chunks plans just those).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_read_plans_one_chunk_not_the_volume() {
    const BIG: (u32, &str, u64) = (0, "exp-disk", 16 * CHUNK_BYTES);
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("replica");
    init_replica(&root).await;
    let mut h = Harness::open(&root).await;
    let mut sim = AgentSim::new(GROUP, &[BIG]).checkpointed(1000);
    h.hello(vec![sim.hello()]).await.expect("welcome");
    h.sync(&mut sim, 0).await;
    // 12 000 small records all over the volume.
    let mut rng = StdRng::seed_from_u64(5);
    for _ in 0..120 {
        let ops: Vec<Op> = (0..100)
            .map(|_| Op::Data {
                vol: 0,
                offset: rng.random_range(0..BIG.2 / 512) * 512,
                bytes: pattern(rng.random(), 512),
            })
            .collect();
        h.commit(&mut sim, &ops, BatchFlags::FLUSH, None).await;
    }
    let want = sim.model_image(sim.seq, 0);

    let (_, pin) = cdp_replica::pin_point(&root, BIG.1, &PointSpec::Latest, "test")
        .await
        .expect("pin");
    let image = pin.lazy_image().await.expect("open");
    assert_eq!(image.plans_built(), 0, "opening plans nothing");
    let at = 10 * CHUNK_BYTES + 4096;
    let got = image.read(at, 4096).await.expect("read");
    assert_eq!(got, want[at as usize..at as usize + 4096]);
    assert_eq!(image.plans_built(), 1, "the first read planned one chunk");
    let at = 3 * CHUNK_BYTES - 100;
    let got = image.read(at, 2 * CHUNK_BYTES + 200).await.expect("read");
    assert_eq!(
        got,
        want[at as usize..(at + 2 * CHUNK_BYTES + 200) as usize]
    );
    assert_eq!(
        image.plans_built(),
        1 + 4,
        "chunks 2..=5 planned, once each"
    );
    image.read(at, 4096).await.expect("read again");
    assert_eq!(image.plans_built(), 5, "cached plans are reused");
    pin.release().await.expect("release");

    // The binary serves its first read (and the whole volume) right.
    let e = start_export(&root, "latest", None, false);
    let mut c = e.connect();
    assert_eq!(
        c.read(12 * CHUNK_BYTES, 4096),
        want[12 << 20..(12 << 20) + 4096]
    );
    assert!(c.read_all(4 << 20) == want);
    e.stop();
    h.shutdown().await;
}

/// A raw record is read whole and hash-checked the first time an export reads it; later reads
/// of parts of it come from the page cache without reading (and hashing) the whole record
/// again, and give the right bytes. A record damaged in its segment before its first read is
/// refused, not served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checked_record_is_read_in_parts_and_a_damaged_one_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("replica");
    init_replica(&root).await;
    let mut h = Harness::open(&root).await;
    let mut sim = AgentSim::new(GROUP, &[VOL]).checkpointed(1000);
    h.hello(vec![sim.hello()]).await.expect("welcome");
    h.sync(&mut sim, 0).await;
    // Two incompressible 64 KiB records (stored raw), in two chunks.
    let seq = h
        .commit(
            &mut sim,
            &[
                Op::Data {
                    vol: 0,
                    offset: 0,
                    bytes: pattern(7, 64 << 10),
                },
                Op::Data {
                    vol: 0,
                    offset: CHUNK_BYTES,
                    bytes: pattern(8, 64 << 10),
                },
            ],
            BatchFlags::FLUSH,
            None,
        )
        .await;
    let want = sim.model_image(sim.seq, 0);

    // Damage the second record's payload in its segment.
    let catalog = Catalog::open(&DataDir::new(&root).catalog(), OpenMode::Existing)
        .await
        .expect("catalog");
    let volume = catalog
        .volume_by_name(VOL.1)
        .await
        .expect("query")
        .expect("volume");
    let rows = catalog
        .records(volume.id, Seq(seq - 1), Seq(seq))
        .await
        .expect("records");
    let row = rows
        .iter()
        .find(|r| r.chunk == 1)
        .expect("the second record");
    let seg = DataDir::new(&root)
        .journal(GROUP)
        .join(cdp_replica::journal::segment_name(row.segment));
    let mut data = std::fs::read(&seg).expect("segment");
    data[row.position as usize + cdp_shared::batch::RECORD_HEADER_BYTES + 5000] ^= 0x40;
    std::fs::write(&seg, &data).expect("damage the segment");

    let (_, pin) = cdp_replica::pin_point(&root, VOL.1, &PointSpec::Latest, "test")
        .await
        .expect("pin");
    let image = pin.lazy_image().await.expect("open");
    let got = image.read(8192, 4096).await.expect("read");
    assert_eq!(got, want[8192..8192 + 4096]);
    assert_eq!(
        (image.records_read(), image.parts_read()),
        (1, 0),
        "the first read loads and checks the record whole"
    );
    for (at, len) in [
        (16384u64, 4096u64),
        (0, 512),
        (60 << 10, 4096),
        (0, 64 << 10),
    ] {
        let got = image.read(at, len).await.expect("read");
        assert_eq!(got, want[at as usize..(at + len) as usize], "{at}+{len}");
    }
    assert_eq!(
        (image.records_read(), image.parts_read()),
        (1, 4),
        "later reads take parts of the checked record"
    );
    // A read spanning the record and the target around it.
    let got = image.read(60 << 10, 8192).await.expect("read");
    assert_eq!(got, want[60 << 10..(68 << 10)]);
    assert_eq!(image.records_read(), 1);

    let err = image
        .read(CHUNK_BYTES + 4096, 4096)
        .await
        .expect_err("the damaged record is refused");
    assert!(err.to_string().contains("batch"), "{err}");
    let err = image
        .read(CHUNK_BYTES + 8192, 4096)
        .await
        .expect_err("and refused again: a refused record is never noted as checked");
    assert!(err.to_string().contains("batch"), "{err}");
    assert_eq!(image.parts_read(), 5);
    pin.release().await.expect("release");
    drop(catalog);
    h.shutdown().await;
}

fn file_hash(path: &Path) -> String {
    blake3::hash(&read(path)).to_hex().to_string()
}

/// Every file of the group's journal with its hash.
fn journal_hashes(root: &Path) -> Vec<(String, String)> {
    let dir = DataDir::new(root).journal(GROUP);
    let mut v: Vec<(String, String)> = std::fs::read_dir(&dir)
        .expect("journal dir")
        .map(|e| {
            let p = e.expect("entry").path();
            (p.display().to_string(), file_hash(&p))
        })
        .collect();
    v.sort();
    v
}

fn overlay_files(root: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(root.join("tmp")) {
        Ok(d) => d.map(|e| e.expect("entry").path()).collect(),
        Err(_) => Vec::new(),
    }
}

/// A writable export: writes (partial blocks, across chunks), zero-writes and trims read back
/// on every connection; a flush succeeds; afterwards the journal, the points and the target
/// file are unchanged, restores give what they gave before, the overlay is gone, and a
/// read-only export refuses writes with EPERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writable_export_writes_to_a_throwaway_overlay() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("replica");
    let (h, sim, synced) = replica(&root, Retention::default(), false, 10, 12).await;
    h.shutdown().await;
    let at = format!("seq:{}", synced + 6);
    let target = DataDir::new(&root).target(VOL.1);
    let before = (
        file_hash(&target),
        journal_hashes(&root),
        cdp_replica::points(&root, VOL.1).await.expect("points"),
        restore_bin(&root, &at, "before"),
        restore_bin(&root, "latest", "before-latest"),
    );
    let mut model = sim.model_image(synced + 6, 0);
    assert!(before.3 == model);

    let e = start_export(&root, &at, None, true);
    assert!(e.line.contains("writable"), "{}", e.line);
    assert!(
        overlay_files(&root).is_empty(),
        "the overlay is unlinked at once"
    );
    let mut c = e.connect();
    assert!(c.flags & proto::NBD_FLAG_READ_ONLY == 0);
    let mut rng = StdRng::seed_from_u64(99);
    // A write across a chunk boundary starting and ending inside blocks; a whole block; a
    // write inside one block; a zero-write and a trim, unaligned and aligned.
    for (offset, len) in [
        (CHUNK_BYTES - 1000, 5000u64),
        (8192, 4096),
        (2 * CHUNK_BYTES + 10, 100),
        (VOL.2 - 3000, 3000),
    ] {
        let data = pattern(rng.random(), len as usize);
        assert_eq!(c.write(offset, &data), 0, "write at {offset}");
        model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
    }
    for (cmd, offset, len) in [
        (proto::NBD_CMD_WRITE_ZEROES, 100u64, 10_000u32),
        (proto::NBD_CMD_TRIM, CHUNK_BYTES + 4096, 3 * 4096),
        (proto::NBD_CMD_WRITE_ZEROES, 2 * CHUNK_BYTES + 5, 20),
    ] {
        assert_eq!(
            c.request(cmd, offset, len, &[]).0,
            0,
            "command {cmd} at {offset}"
        );
        model[offset as usize..offset as usize + len as usize].fill(0);
    }
    assert_eq!(c.request(proto::NBD_CMD_FLUSH, 0, 0, &[]).0, 0, "flush");
    assert!(c.read_all(777_777) == model, "the writes read back");
    assert!(
        e.connect().read_all(CHUNK_BYTES) == model,
        "on another connection too"
    );
    c.disconnect();
    e.stop();

    assert!(overlay_files(&root).is_empty(), "no overlay left");
    assert_eq!(file_hash(&target), before.0, "the target file is unchanged");
    assert_eq!(journal_hashes(&root), before.1, "the journal is unchanged");
    assert_eq!(
        cdp_replica::points(&root, VOL.1).await.expect("points"),
        before.2
    );
    assert!(restore_bin(&root, &at, "after") == before.3);
    assert!(restore_bin(&root, "latest", "after-latest") == before.4);

    // A read-only export of the same point: the original image, and writes refused.
    let e = start_export(&root, &at, None, false);
    let mut c = e.connect();
    assert!(c.read_all(3 << 20) == before.3, "the writes are gone");
    assert_eq!(c.write(0, &[1u8; 512]), NBD_EPERM);
    assert_eq!(c.request(proto::NBD_CMD_TRIM, 0, 4096, &[]).0, NBD_EPERM);
    c.disconnect();
    e.stop();
    assert_eq!(file_hash(&target), before.0);
}

async fn group(catalog: &Catalog) -> GroupRow {
    catalog
        .group_by_name(GROUP)
        .await
        .expect("query")
        .expect("group")
}

/// With a one-second window and the trimmer running, an export's pin holds the base at its
/// point however old it gets; reads while the trimmer applies batches up to it, from a chunk
/// planned before the base moved and from chunks first planned after it, all read the pinned
/// image; once the export stops, the trimmer moves past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_holds_its_pin_while_the_trimmer_trims() {
    const WINDOW: Duration = Duration::from_secs(1);
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("replica");
    let retention = Retention {
        window: WINDOW,
        journal_bytes_max: None,
    };
    let (mut h, mut sim, _) = replica(&root, retention, true, 0, 13).await;
    let mut ops_rng = StdRng::seed_from_u64(14);
    let mut rng = StdRng::seed_from_u64(15);
    let mut ingest = async |h: &mut Harness, sim: &mut AgentSim, bookmark: Option<&str>| {
        let ops = random_ops(&mut ops_rng, VOL.2);
        h.commit(sim, &ops, BatchFlags::FLUSH, bookmark).await
    };
    for _ in 0..4 {
        ingest(&mut h, &mut sim, None).await;
    }
    let kept = ingest(&mut h, &mut sim, Some("keep")).await;
    let catalog = Catalog::open(&DataDir::new(&root).catalog(), OpenMode::Existing)
        .await
        .expect("catalog");
    let e = start_export(&root, "bookmark:keep", None, false);
    let base_at_pin = group(&catalog).await.base_seq;
    assert!(
        base_at_pin < Seq(kept),
        "the test needs batches to trim up to the pin"
    );
    let want = sim.model_image(kept, 0);
    let mut c = e.connect();
    // Chunk 0 is planned now, with the records (base, kept] that the trimmer will delete.
    assert!(c.read(0, CHUNK_BYTES as u32) == want[..CHUNK_BYTES as usize]);

    // Ingest until the pinned point is far older than the window: the base stops at it. Reads
    // of chunk 0 go on meanwhile, while the trimmer applies batches to the target file.
    let deadline = Instant::now() + DEADLINE;
    loop {
        ingest(&mut h, &mut sim, None).await;
        let off = rng.random_range(0..CHUNK_BYTES - 65536);
        assert!(
            c.read(off, 65536) == want[off as usize..off as usize + 65536],
            "a read during trimming differs from the pinned image"
        );
        let g = group(&catalog).await;
        assert!(g.base_seq <= Seq(kept), "the base passed the export's pin");
        let age = sim.times[&sim.seq] - sim.times[&kept];
        if g.base_seq == Seq(kept)
            && g.trimming_to.is_none()
            && age > (2 * WINDOW).as_nanos() as i64
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the base never reached the pin ({})",
            g.base_seq
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Chunks 1.. are planned only now, after the rows ≤ kept are gone.
    assert!(
        c.read_all(1_000_003) == want,
        "the pinned image, read after the trim"
    );
    let got = cdp_replica::restore(
        &root,
        VOL.1,
        &PointSpec::Bookmark("keep".into()),
        &root.join("r.img"),
    )
    .await
    .expect("the pinned point is still restorable");
    assert_eq!(got.point.seq, Seq(kept));
    assert!(read(&root.join("r.img")) == want);
    c.disconnect();
    e.stop();

    // Released: the base moves on past the point.
    let deadline = Instant::now() + DEADLINE;
    loop {
        ingest(&mut h, &mut sim, None).await;
        if group(&catalog).await.base_seq > Seq(kept) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the base stayed at the released point"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    catalog.close().await;
    h.shutdown().await;
}
