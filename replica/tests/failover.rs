//! `cdp-replica failover` (the real binary, driven by a small NBD client written here): a
//! failover serves the image at its point read-write with a persistent overlay (kept across
//! stops, SIGKILL included, for flushed writes); `--undo` gives back every point as it was;
//! the agent is fenced while a failover exists (refused at Hello, its connection closed, its
//! batches not committed) and accepted again after `--undo`; the trimmer never moves the base
//! past an active failover's point, even with nothing serving it; and `--commit` makes the
//! failover image (point + writes) the volume, drops the later points, survives a `serve`
//! start and keeps the agent refused. Refusals: commit while served or while `serve` runs, a
//! second failover at another point, a group of several volumes.

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
                .filter(|n| !n.ends_with(".lock"))
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

async fn connect(
    identity: &Identity,
    server: &cdp_replica::ServerHandle,
    sim: &AgentSim,
) -> (QuicAgent, Control) {
    let mut q = QuicAgent::connect(identity, server.fingerprint(), server.local_addr())
        .await
        .expect("connect");
    let answer = q
        .hello(vec![sim.hello()])
        .await
        .expect("an answer to hello");
    (q, answer)
}

/// A running `serve` fences the agent while a failover exists: its connection is closed, its
/// batches are not committed, a new hello is refused; after `--undo` it is welcomed and its
/// batches are committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_fences_the_agent_until_undone() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    init_replica(root).await;
    let agent = Identity::generate("test-agent").expect("identity");
    cdp_replica::authorize(root, agent.fingerprint(), "t").expect("authorize");
    let server = Server::start(root, "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("serve");
    let mut sim = AgentSim::new(GROUP, &[VOL]);
    let mut rng = StdRng::seed_from_u64(13);
    sim.images.insert(0, pattern(rng.random(), VOL.2 as usize));
    let (mut q, answer) = connect(&agent, &server, &sim).await;
    assert!(matches!(answer, Control::Welcome { .. }), "{answer:?}");
    let mut out = Vec::new();
    let synced = sim.sync_volume(0, &mut out);
    for (_, b) in out {
        q.send_batch(&b).await.expect("send");
    }
    q.wait_ack(GROUP, synced).await;
    for _ in 0..3 {
        let (seq, b) = sim.batch(&random_ops(&mut rng), BatchFlags::FLUSH, None);
        q.send_batch(&b).await.expect("send");
        q.wait_ack(GROUP, seq).await;
    }
    let s = sim.seq;

    let f = start_failover(root, Some("latest"));
    assert!(f.line.contains(&format!("at seq {s} (")), "{}", f.line);
    // A batch sent now is not committed, and the connection is closed.
    let (next, b) = sim.batch(&random_ops(&mut rng), BatchFlags::FLUSH, None);
    let _ = q.send_batch(&b).await;
    let ended = loop {
        match q.next_control().await {
            Ok(Control::Ack { durable, .. }) => {
                assert!(
                    durable.0 < next,
                    "batch {next} was committed after the failover"
                )
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(e) => break e,
        }
    };
    assert!(!ended.contains("no control message in time"), "{ended}");
    let (_q2, answer) = connect(&agent, &server, &sim).await;
    match answer {
        Control::Refused { reason, .. } => assert!(
            reason.starts_with(&format!(
                "volume fo-disk (group {GROUP}) is failed over on the replica at seq {s} since "
            )) && reason.contains("`cdp-replica failover --volume fo-disk --undo`"),
            "{reason}"
        ),
        other => panic!("expected Refused, got {other:?}"),
    }
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

    cli_ok(root, &["--undo"]);
    let (mut q, answer) = connect(&agent, &server, &sim).await;
    match answer {
        Control::Welcome { groups, .. } => assert_eq!(groups[0].durable.0, s),
        other => panic!("expected Welcome, got {other:?}"),
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
/// runs; a group of two volumes cannot fail over.
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

    // A group of two volumes.
    let tmp2 = tempfile::tempdir().expect("tempdir");
    let root2 = tmp2.path();
    init_replica(root2).await;
    let mut h = Harness::open(root2).await;
    let mut sim2 = AgentSim::new("two", &[(0, "fo-disk", 8192), (1, "fo-other", 8192)]);
    h.hello(vec![sim2.hello()]).await.expect("welcome");
    let mut out = Vec::new();
    sim2.sync_volume(0, &mut out);
    let last = sim2.sync_volume(1, &mut out);
    for (_, b) in out {
        h.submit(b).await;
    }
    h.wait_ack("two", last).await;
    h.shutdown().await;
    cli_fails(
        root2,
        &["--at", "latest"],
        "a failover of a group of more than one volume is not supported yet",
    );
}
