//! `cdp-replica failover` (the real binary, driven by a small NBD client written here): a
//! failover serves the image at its point read-write with a persistent overlay (kept across
//! stops, SIGKILL included, for flushed writes); `--undo` gives back every point as it was;
//! the failed-over group alone is fenced while a failover exists (refused in the Welcome, told
//! `Fenced` on an open connection that stays up for the agent's other group, its batches not
//! committed) and joins again after `--undo` (`Rejoin`, `Join`, `Joined`); a group of two
//! volumes fails over at one point, each volume its own export; the trimmer never moves the base
//! past an active failover's point, even with nothing serving it; and `--commit` makes the
//! failover image (point + writes) the volume, drops the later points, survives a `serve`
//! start and keeps the agent refused. Refusals: commit while served or while `serve` runs, a
//! second failover at another point, `--volume` for a volume of a larger group.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use cdp_replica::catalog::{Catalog, OpenMode};
use cdp_replica::datadir::DataDir;
use cdp_replica::trimmer::{TrimLink, Trimmer};
use cdp_replica::{PointSpec, RetentionChange, Server};
use cdp_shared::batch::BatchFlags;
use cdp_shared::identity::Identity;
use cdp_shared::nbd::proto;
use cdp_shared::types::{CHUNK_BYTES, Seq};
use cdp_shared::wire::Control;
use common::export::{NbdProc, command_args};
use common::nbd::*;
use common::ops::{Kinds, Mix};
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BIN: &str = env!("CARGO_BIN_EXE_cdp-replica");
const GROUP: &str = "fg";
/// Two chunks and a bit: writes span chunks, the last block is short.
const VOL: (u32, &str, u64) = (0, "fo-disk", 2 * CHUNK_BYTES + 8192 + 100);
/// The volume of a second group of the same agent.
const OTHER_BYTES: u64 = 256 << 10;

// ---------------------------------------------------------------------------------------------
// The failover as a child process, and the other commands.

fn failover_args(root: &Path, extra: &[&str]) -> Vec<String> {
    command_args("failover", root, VOL.1, extra)
}

/// Starts `cdp-replica failover` and waits (with the deadline) for its line.
fn start_failover(root: &Path, at: Option<&str>) -> NbdProc {
    let extra: Vec<&str> = match at {
        Some(a) => vec!["--at", a],
        None => vec![],
    };
    NbdProc::start(BIN, "failover", root, VOL.1, &extra)
}

fn cli(root: &Path, extra: &[&str]) -> Output {
    Command::new(BIN)
        .args(failover_args(root, extra))
        .env("RUST_LOG", "warn")
        .output()
        .expect("run cdp-replica failover")
}

/// Runs a failover command that must succeed; returns its stdout.
fn cli_ok(root: &Path, extra: &[&str]) -> String {
    let o = cli(root, extra);
    assert!(
        o.status.success(),
        "failover {extra:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs a failover command that must fail with a one-line error containing `needle`.
fn cli_fails(root: &Path, extra: &[&str], needle: &str) {
    let o = cli(root, extra);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "failover {extra:?} succeeded");
    assert!(
        err.contains(needle) && err.starts_with("error: "),
        "failover {extra:?}: expected {needle:?} in {err:?}"
    );
}

async fn restore_at(root: &Path, at: PointSpec) -> Vec<u8> {
    restore_bytes(root, VOL.1, &at)
        .await
        .unwrap_or_else(|e| panic!("restore at {at:?}: {e}"))
        .0
}

async fn point_seqs(root: &Path) -> Vec<u64> {
    cdp_replica::points(root, VOL.1)
        .await
        .expect("points")
        .iter()
        .map(|p| p.seq.0)
        .collect()
}

fn overlay_files(root: &Path) -> Vec<String> {
    match std::fs::read_dir(root.join("failover")) {
        Ok(d) => {
            let mut names: Vec<String> = d
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .filter(|n| !n.ends_with("lock"))
                .collect();
            names.sort();
            names
        }
        Err(_) => Vec::new(),
    }
}

/// One batch of random writes (sometimes zero).
const WRITES: Mix = Mix {
    count: 1..=1,
    len: 1..=100 << 10,
    kinds: Kinds::PickZero(8),
};

fn random_ops(rng: &mut StdRng) -> Vec<Op> {
    WRITES.ops(rng, VOL.2)
}

/// Random writes (as [`random_ops`]) to volume `vol` of `size` bytes.
fn random_ops_in(rng: &mut StdRng, vol: u32, size: u64) -> Vec<Op> {
    WRITES
        .writes(rng, size, |rng| rng.random())
        .iter()
        .map(|w| w.op(vol))
        .collect()
}

/// A replica with the volume synced (from a random image) and `batches` more batches through
/// the in-process ingest (stopped on return). Returns the model and the seq of the sync.
async fn replica(root: &Path, batches: u64, seed: u64) -> (AgentSim, u64) {
    init_replica(root).await;
    let mut h = Harness::open(root).await;
    let mut sim = AgentSim::new(GROUP, &[VOL]);
    let mut rng = StdRng::seed_from_u64(seed);
    sim.images.insert(0, pattern(rng.random(), VOL.2 as usize));
    h.hello(vec![sim.hello()]).await.expect("welcome");
    let synced = h.sync(&mut sim, 0).await;
    for _ in 0..batches {
        let ops = random_ops(&mut rng);
        h.commit(&mut sim, &ops, BatchFlags::FLUSH, None).await;
    }
    h.shutdown().await;
    (sim, synced)
}

/// Writes through the failover's NBD export and into `model`: a block-aligned write, an
/// unaligned one across a chunk boundary, one at the short end; then a FLUSH.
fn write_some(nbd: &mut Nbd, model: &mut [u8], seed: u64) {
    let size = model.len() as u64;
    for (offset, len) in [
        (4096u64, 8192usize),
        (CHUNK_BYTES - 1000, 5000),
        (size - 300, 300),
    ] {
        let bytes = pattern(seed + offset, len);
        assert_eq!(nbd.write(offset, &bytes), 0, "write at {offset}");
        model[offset as usize..offset as usize + len].copy_from_slice(&bytes);
    }
    nbd.flush();
}

// ---------------------------------------------------------------------------------------------

/// A failover at a middle point reads as that point, takes writes, keeps them across a stop
/// and (flushed ones) across SIGKILL; `--undo` leaves every point as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_keeps_its_writes_until_undone() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let (sim, synced) = replica(root, 10, 11).await;
    let head = sim.seq;
    let mid = synced + 5;
    let seqs = [synced, mid - 1, mid, mid + 1, head];
    let mut before = Vec::new();
    for s in seqs {
        let img = restore_at(root, PointSpec::Seq(s)).await;
        assert_eq!(
            img,
            sim.image_at(s, 0),
            "restore at {s} before the failover"
        );
        before.push(img);
    }
    let points_before = point_seqs(root).await;

    let f = start_failover(root, Some(&format!("seq:{mid}")));
    assert!(
        f.line
            .starts_with(&format!("failover of volume {} at seq {mid} (", VOL.1))
            && f.line
                .contains("live read-write: nbd+unix:///fo-disk?socket=")
            && f.socket == root.join("failover-fo-disk.sock"),
        "{}",
        f.line
    );
    let mut model = sim.image_at(mid, 0).to_vec();
    let mut nbd = f.connect();
    assert_eq!(nbd.size, VOL.2);
    assert_eq!(nbd.flags & proto::NBD_FLAG_READ_ONLY, 0, "read-write");
    assert_eq!(
        nbd.read_all(300_000),
        model,
        "the failover reads as seq {mid}"
    );
    write_some(&mut nbd, &mut model, 1);
    assert_eq!(nbd.read_all(300_000), model, "writes read back");
    nbd.disconnect();

    // Refusals while it is served.
    cli_fails(root, &["--undo"], "is being served by another process");
    cli_fails(root, &["--commit"], "is being served by another process");
    cli_fails(root, &[], "already served by another process");
    f.stop();
    cli_fails(
        root,
        &["--at", &format!("seq:{}", mid + 1)],
        &format!(
            "a failover of volume fo-disk at seq {mid} is active: serve it with `cdp-replica failover --volume fo-disk`, or end it with --undo or --commit"
        ),
    );

    // Served again: the writes are there.
    let f = start_failover(root, None);
    assert!(f.line.contains("served again"), "{}", f.line);
    let mut nbd = f.connect();
    assert_eq!(nbd.read_all(300_000), model, "writes kept across a stop");
    write_some(&mut nbd, &mut model, 2);
    // Flushed, then SIGKILL: still there.
    f.kill();
    let f = start_failover(root, Some(&format!("seq:{mid}")));
    let mut nbd = f.connect();
    assert_eq!(
        nbd.read_all(300_000),
        model,
        "flushed writes kept across SIGKILL"
    );
    nbd.disconnect();
    f.stop();
    let status = cdp_replica::status(root).await.expect("status");
    let v = &status.volumes[0];
    assert_eq!(v.state, format!("failed over at seq {mid}"));
    let fo = v.failover.as_ref().expect("failover in status");
    assert_eq!((fo.seq, fo.state.as_str()), (Seq(mid), "active"));

    // Undo: everything as before.
    assert!(!overlay_files(root).is_empty());
    let out = cli_ok(root, &["--undo"]);
    assert!(
        out.starts_with(&format!("failover of volume fo-disk at seq {mid} undone")),
        "{out}"
    );
    assert_eq!(
        overlay_files(root),
        Vec::<String>::new(),
        "overlay files gone"
    );
    for (s, img) in seqs.iter().zip(&before) {
        assert_eq!(
            &restore_at(root, PointSpec::Seq(*s)).await,
            img,
            "restore at {s} after the undo"
        );
    }
    assert_eq!(point_seqs(root).await, points_before);
    assert!(
        cdp_replica::status(root).await.expect("status").volumes[0]
            .failover
            .is_none()
    );
    cli_fails(
        root,
        &["--undo"],
        "volume fo-disk is not failed over, so there is nothing to undo",
    );
    cli_fails(
        root,
        &["--commit"],
        "volume fo-disk is not failed over, so there is nothing to commit",
    );
}

/// With a short window the trimmer moves the base up to an active failover's point and no
/// further, with no process serving it; the image at the point still restores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trimmer_stops_at_an_active_failover() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let (sim, synced) = replica(root, 10, 12).await;
    let mid = synced + 4;
    start_failover(root, Some(&format!("seq:{mid}"))).stop();
    cdp_replica::set_retention(
        root,
        GROUP,
        &RetentionChange {
            window: Some(Duration::from_secs(1)),
            journal_bytes_max: None,
        },
    )
    .await
    .expect("retention");
    let dir = DataDir::existing(root).expect("dir");
    let catalog = Catalog::open(&dir.catalog(), OpenMode::Existing)
        .await
        .expect("catalog");
    let group = catalog
        .group_by_name(GROUP)
        .await
        .expect("group")
        .expect("exists");
    let mut t = Trimmer::new(&catalog, &dir, &group, TrimLink::new(0, None));
    // Agent times are one second apart: retention alone would trim to head - 1.
    let mut held = false;
    for _ in 0..100 {
        let o = t.round().await.expect("round");
        held |= o.held_by_pin;
        if !o.more && o.trimmed_to.is_none() {
            break;
        }
    }
    let g = catalog.group_by_id(group.id).await.expect("group");
    assert_eq!(g.base_seq, Seq(mid), "the base stops at the failover point");
    assert!(held, "the round said a hold kept the base back");
    catalog.close().await;
    assert_eq!(
        restore_at(root, PointSpec::Seq(mid)).await,
        sim.image_at(mid, 0)
    );
    // Undone, the trimmer goes on.
    cli_ok(root, &["--undo"]);
    let catalog = Catalog::open(&dir.catalog(), OpenMode::Existing)
        .await
        .expect("catalog");
    let mut t = Trimmer::new(&catalog, &dir, &group, TrimLink::new(0, None));
    for _ in 0..100 {
        let o = t.round().await.expect("round");
        if !o.more && o.trimmed_to.is_none() {
            break;
        }
    }
    let g = catalog.group_by_id(group.id).await.expect("group");
    assert!(g.base_seq > Seq(mid), "the base moves on after the undo");
    catalog.close().await;
}

/// A running `serve` fences the failed-over group alone, on the open connection: the
/// connection is told `Fenced` and stays up, the group's batches are not committed while the
/// agent's other group is acknowledged throughout, a new Hello is welcomed for the other group
/// and refuses the fenced one with its reason; after `--undo` the open connection is told
/// `Rejoin`, the group joins again (`Join` / `Joined`) and its batches are committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_fences_its_group_alone_until_undone() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    init_replica(root).await;
    let agent = Identity::generate("test-agent").expect("identity");
    cdp_replica::authorize(root, agent.fingerprint(), "t").expect("authorize");
    let server = Server::start(root, "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("serve");
    let mut sim = AgentSim::new(GROUP, &[VOL]);
    let mut other = AgentSim::new("other", &[(0, "other-disk", OTHER_BYTES)]);
    let mut rng = StdRng::seed_from_u64(13);
    sim.images.insert(0, pattern(rng.random(), VOL.2 as usize));
    other
        .images
        .insert(0, pattern(rng.random(), OTHER_BYTES as usize));
    let mut q = QuicAgent::connect(&agent, server.fingerprint(), server.local_addr())
        .await
        .expect("connect");
    let answer = q
        .hello(vec![sim.hello(), other.hello()])
        .await
        .expect("an answer to hello");
    assert!(
        matches!(&answer, Control::Welcome { groups, refused, .. } if groups.len() == 2 && refused.is_empty()),
        "{answer:?}"
    );
    let mut out = Vec::new();
    let synced = sim.sync_volume(0, &mut out);
    for (_, b) in out.drain(..) {
        q.send_batch(&b).await.expect("send");
    }
    q.wait_ack(GROUP, synced).await;
    let other_synced = other.sync_volume(0, &mut out);
    for (_, b) in out.drain(..) {
        q.send_batch(&b).await.expect("send");
    }
    q.wait_ack("other", other_synced).await;
    for _ in 0..3 {
        let (seq, b) = sim.batch(&random_ops(&mut rng), BatchFlags::FLUSH, None);
        q.send_batch(&b).await.expect("send");
        q.wait_ack(GROUP, seq).await;
    }
    let s = sim.seq;

    let f = start_failover(root, Some("latest"));
    assert!(f.line.contains(&format!("at seq {s} (")), "{}", f.line);
    // The connection is told that the group is fenced, and stays up.
    let fenced = loop {
        match q.next_control().await.expect("a control message") {
            Control::Fenced(r) => break r,
            Control::Ack { group, .. } if group == "other" => {}
            other => panic!("expected Fenced, got {other:?}"),
        }
    };
    assert_eq!(fenced.name, GROUP);
    assert_eq!(
        fenced.cause,
        cdp_shared::cause::Cause::DisconnectedFencedByFailover
    );
    assert!(
        fenced.reason.starts_with(&format!(
            "group {GROUP} is failed over on the replica at seq {s} since "
        )) && fenced
            .reason
            .contains(&format!("`cdp-replica failover --group {GROUP} --undo`")),
        "{}",
        fenced.reason
    );
    // A batch of the fenced group is not committed; the other group's are, on the same
    // connection.
    let (next, b) = sim.batch(&random_ops(&mut rng), BatchFlags::FLUSH, None);
    q.send_batch(&b).await.expect("send");
    for _ in 0..3 {
        let (seq, b) = other.batch(
            &random_ops_in(&mut rng, 0, OTHER_BYTES),
            BatchFlags::FLUSH,
            None,
        );
        q.send_batch(&b)
            .await
            .expect("send the other group's batch");
        q.wait_ack("other", seq).await;
    }
    // A second connection of the agent: the other group welcomed, the fenced one refused.
    let mut q2 = QuicAgent::connect(&agent, server.fingerprint(), server.local_addr())
        .await
        .expect("connect");
    match q2
        .hello(vec![sim.hello(), other.hello()])
        .await
        .expect("answer")
    {
        Control::Welcome {
            groups, refused, ..
        } => {
            assert_eq!(
                groups.iter().map(|g| g.name.as_str()).collect::<Vec<_>>(),
                vec!["other"]
            );
            assert_eq!(refused.len(), 1, "{refused:?}");
            assert_eq!(refused[0].name, GROUP);
            assert_eq!(refused[0].reason, fenced.reason);
        }
        other => panic!("expected Welcome, got {other:?}"),
    }
    drop(q2);
    let catalog = Catalog::open(
        &DataDir::existing(root).expect("dir").catalog(),
        OpenMode::Existing,
    )
    .await
    .expect("catalog");
    let gid = catalog
        .group_by_name(GROUP)
        .await
        .expect("group")
        .expect("exists")
        .id;
    assert_eq!(
        catalog.head(gid).await.expect("head"),
        Seq(s),
        "nothing journaled after the failover"
    );
    f.stop();

    // Undo: the open connection is asked to join the group again.
    cli_ok(root, &["--undo"]);
    loop {
        match q.next_control().await.expect("a control message") {
            Control::Rejoin { group } => {
                assert_eq!(group, GROUP);
                break;
            }
            Control::Ack { group, .. } if group == "other" => {}
            other => panic!("expected Rejoin, got {other:?}"),
        }
    }
    q.send_control(&Control::Join { group: sim.hello() })
        .await
        .expect("join");
    match q.next_control().await.expect("an answer to join") {
        Control::Joined { group } => {
            assert_eq!((group.name.as_str(), group.durable.0), (GROUP, s));
        }
        other => panic!("expected Joined, got {other:?}"),
    }
    q.send_batch(&sim.batches[&next].clone())
        .await
        .expect("send");
    q.wait_ack(GROUP, next).await;
    assert_eq!(catalog.head(gid).await.expect("head"), Seq(next));
    catalog.close().await;
    drop(q);
    server.shutdown().await.expect("shutdown");
    assert_eq!(
        restore_at(root, PointSpec::Latest).await,
        sim.image_at(next, 0)
    );
}

/// `--commit` makes the failover image the volume: `restore latest` gives it, the later points
/// are gone, `serve` starts on the directory and keeps the agent refused. Refused while `serve`
/// runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_failover_is_the_volume() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let (sim, synced) = replica(root, 10, 14).await;
    let mid = synced + 6;
    let f = start_failover(root, Some(&format!("seq:{mid}")));
    let mut model = sim.image_at(mid, 0).to_vec();
    let mut nbd = f.connect();
    write_some(&mut nbd, &mut model, 3);
    nbd.disconnect();
    f.stop();

    let server = Server::start(root, "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("serve");
    cli_fails(root, &["--commit"], "is running on");
    server.shutdown().await.expect("shutdown");

    let out = cli_ok(root, &["--commit"]);
    assert!(
        out.starts_with(&format!(
            "failover of volume fo-disk at seq {mid} committed"
        )),
        "{out}"
    );
    assert_eq!(
        restore_at(root, PointSpec::Latest).await,
        model,
        "latest is the failover image"
    );
    assert_eq!(
        point_seqs(root).await,
        vec![mid],
        "the points after the failover are gone"
    );
    assert_eq!(overlay_files(root), Vec::<String>::new());
    cli_fails(
        root,
        &["--commit"],
        &format!("the failover of volume fo-disk at seq {mid} was committed on "),
    );
    cli_fails(root, &["--undo"], "cannot be undone");
    cli_fails(root, &["--at", "latest"], "was committed");
    let v = &cdp_replica::status(root).await.expect("status").volumes[0];
    assert_eq!(v.state, format!("failed over at seq {mid} (committed)"));
    assert_eq!((v.head_seq, v.base_seq), (Seq(mid), Seq(mid)));

    // serve starts (journal recovery agrees with the catalog) and stops; the agent (the
    // group's owner, through the in-process ingest) is refused.
    let server = Server::start(root, "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("serve after a commit");
    server.shutdown().await.expect("shutdown");
    let mut h = Harness::open(root).await;
    match h.hello(vec![sim.hello()]).await {
        Err(reason) => assert!(
            reason.contains(&format!(
                "was failed over on the replica at seq {mid} and that failover was committed on "
            )) && reason.contains("failback is not built yet"),
            "{reason}"
        ),
        Ok(w) => panic!("expected a refusal, got {w:?}"),
    }
    h.shutdown().await;
    assert_eq!(restore_at(root, PointSpec::Latest).await, model);
}

/// A group of two volumes fails over at one point: `--volume` names a group of one only (the
/// refusal names the group); `failover --group` serves both volumes on one socket, each under
/// its own name, at the same seq; their writes persist across a stop and a resumption;
/// `--commit --group` makes both target disks the failover images.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_two_fails_over_at_one_point() {
    const SIZE: u64 = CHUNK_BYTES + 8192;
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    init_replica(root).await;
    let mut h = Harness::open(root).await;
    let mut sim = AgentSim::new("two", &[(0, "fo-a", SIZE), (1, "fo-b", SIZE)]);
    let mut rng = StdRng::seed_from_u64(17);
    sim.images.insert(0, pattern(rng.random(), SIZE as usize));
    sim.images.insert(1, pattern(rng.random(), SIZE as usize));
    h.hello(vec![sim.hello()]).await.expect("welcome");
    h.sync(&mut sim, 0).await;
    h.sync(&mut sim, 1).await;
    for i in 0..8u32 {
        let ops = random_ops_in(&mut rng, i % 2, SIZE);
        let (seq, b) = sim.batch(&ops, BatchFlags::FLUSH, None);
        h.submit(b).await;
        h.wait_ack("two", seq).await;
    }
    let mid = sim.seq - 3;
    h.shutdown().await;

    let group_cli = |extra: &[&str]| {
        let mut args = vec!["failover".to_owned(), "--data".into()];
        args.push(root.display().to_string());
        args.extend(["--group".to_owned(), "two".to_owned()]);
        args.extend(extra.iter().map(|a| a.to_string()));
        Command::new(BIN)
            .args(&args)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run cdp-replica failover --group")
    };
    let refused = Command::new(BIN)
        .args(command_args("failover", root, "fo-a", &["--at", "latest"]))
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && err.contains("volume fo-a belongs to group two of 2 volumes (fo-a, fo-b)")
            && err.contains("`cdp-replica failover --group two`"),
        "{err}"
    );

    let f = GroupFailover::start(root, "two", &["--at", &format!("seq:{mid}")], 2);
    assert!(
        f.lines[0].starts_with(&format!("failover of group two (2 volumes) at seq {mid} (")),
        "{:?}",
        f.lines
    );
    assert_eq!(f.socket, root.join("failover-two.sock"));
    let mut models = Vec::new();
    for (vol, name) in [(0u32, "fo-a"), (1, "fo-b")] {
        assert!(
            f.lines[1 + vol as usize].starts_with(&format!("  {name}: nbd+unix:///{name}?socket=")),
            "{:?}",
            f.lines
        );
        let mut nbd = Nbd::connect(&f.socket, name);
        let mut model = sim.image_at(mid, vol).to_vec();
        assert_eq!(nbd.read_all(64 << 10), model, "{name} reads as seq {mid}");
        write_some(&mut nbd, &mut model, 100 + u64::from(vol));
        nbd.disconnect();
        models.push(model);
    }
    f.stop();
    // Served again: the writes of both volumes are kept.
    let f = GroupFailover::start(root, "two", &[], 2);
    assert!(
        f.lines[0].contains("(served again, earlier writes kept)"),
        "{:?}",
        f.lines
    );
    for (vol, name) in [(0usize, "fo-a"), (1, "fo-b")] {
        let mut nbd = Nbd::connect(&f.socket, name);
        assert_eq!(nbd.read_all(64 << 10), models[vol], "{name} after a stop");
        nbd.disconnect();
    }
    f.stop();

    let out = group_cli(&["--commit"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .starts_with(&format!("failover of group two at seq {mid} committed")),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    for (vol, name) in [(0usize, "fo-a"), (1, "fo-b")] {
        let (image, _) = restore_bytes(root, name, &PointSpec::Latest)
            .await
            .expect("restore");
        assert_eq!(image, models[vol], "{name}: latest is the failover image");
    }
    assert_eq!(overlay_files(root), Vec::<String>::new());
}

/// `cdp-replica failover --group G ARGS…` as a child process, up once it printed its lines
/// (one for the group, one per volume).
struct GroupFailover {
    child: std::process::Child,
    lines: Vec<String>,
    socket: std::path::PathBuf,
}

impl GroupFailover {
    fn start(root: &Path, group: &str, args: &[&str], volumes: usize) -> GroupFailover {
        use std::io::BufRead;
        let mut child = Command::new(BIN)
            .arg("failover")
            .arg("--data")
            .arg(root)
            .args(["--group", group])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("spawn cdp-replica failover --group");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = std::io::BufReader::new(out);
            let mut lines = Vec::new();
            for _ in 0..=volumes {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                lines.push(line.trim_end().to_owned());
            }
            let _ = tx.send(lines);
        });
        let lines = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("failover prints its lines");
        assert_eq!(lines.len(), volumes + 1, "failover exited: {lines:?}");
        let socket = std::path::PathBuf::from(
            lines[1]
                .rsplit_once("?socket=")
                .unwrap_or_else(|| panic!("no socket in {lines:?}"))
                .1,
        );
        GroupFailover {
            child,
            lines,
            socket,
        }
    }

    /// SIGTERM, then a clean exit.
    fn stop(mut self) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("pid");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("signal");
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "failover exited with {status}");
    }
}

impl Drop for GroupFailover {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
