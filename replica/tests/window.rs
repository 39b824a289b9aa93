//! Retention (issue 5) with in-process ingest: the window slides under continuous ingest, a
//! journal cap bounds the journal, pins keep points alive (and a killed or stalled reader's
//! pin expires), and a trim cut short after any step of its protocol completes, with the same
//! result, when the trimmer starts again.
//!
//! Every point still in the window is restored and compared byte for byte with the model;
//! points that left it are refused with a sentence that names the window.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cdp_replica::catalog::{Catalog, GroupRow, OpenMode};
use cdp_replica::datadir::DataDir;
use cdp_replica::ingest::IngestOptions;
use cdp_replica::journal::segment_name;
use cdp_replica::trimmer::{TrimLink, TrimStep, Trimmer};
use cdp_replica::{PointSpec, ReplicaError, Retention, RetentionChange};
use cdp_shared::batch::BatchFlags;
use cdp_shared::types::{CHUNK_BYTES, Seq};
use common::ops::{Kinds, Mix};
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

/// Two chunks, the second one short.
const VOL: (u32, &str, u64) = (0, "win-disk", CHUNK_BYTES + 8192);
const GROUP: &str = "g";
/// Small journal segments, so that trimming unlinks some.
const SEGMENT_BYTES: u64 = 64 << 10;
/// Pacing of the continuous ingest (a rate, not a wait for anything).
const INGEST_GAP: Duration = Duration::from_millis(20);
/// The writes of a batch: 1 to 6 of up to 24 KiB, data, sometimes zero or trim.
const WRITES: Mix = Mix {
    count: 1..=6,
    len: 1..=24 << 10,
    kinds: Kinds::PickZeroTrim(16),
};
/// Test-only: tells a re-executed test binary to hold a pin (see `pin_holder`).
const PIN_HOLDER_ENV: &str = "CDP_TEST_PIN_HOLDER";
/// The TTL (ms) of the pin holder child's pin, when set.
const PIN_HOLDER_TTL_ENV: &str = "CDP_TEST_PIN_HOLDER_TTL_MS";

fn options() -> IngestOptions {
    options_with(SEGMENT_BYTES)
}

fn options_with(segment_bytes_target: u64) -> IngestOptions {
    IngestOptions {
        segment_bytes_target,
    }
}

/// A replica with one protected volume, its ingest in-process, and the agent's model.
struct Rig {
    root: PathBuf,
    h: Harness,
    sim: AgentSim,
    catalog: Catalog,
    group_id: i64,
    synced: u64,
    rng: StdRng,
}

impl Rig {
    async fn start(root: &Path, retention: Retention, real_time: bool, seed: u64) -> Rig {
        Rig::start_with(root, retention, real_time, seed, options()).await
    }

    async fn start_with(
        root: &Path,
        retention: Retention,
        real_time: bool,
        seed: u64,
        options: IngestOptions,
    ) -> Rig {
        cdp_replica::init_with(root, "127.0.0.1:0".parse().expect("addr"), &retention)
            .await
            .expect("init");
        let mut h = Harness::open_with(root, options).await;
        let mut sim = AgentSim::new(GROUP, &[VOL]);
        sim.real_time = real_time;
        let mut rng = StdRng::seed_from_u64(seed);
        sim.images.insert(0, pattern(rng.random(), VOL.2 as usize));
        let mut sim = sim.checkpointed(32);
        h.hello(vec![sim.hello()]).await.expect("welcome");
        let synced = h.sync(&mut sim, 0).await;
        let catalog = Catalog::open(&DataDir::new(root).catalog(), OpenMode::Existing)
            .await
            .expect("catalog");
        let group_id = catalog
            .group_by_name(GROUP)
            .await
            .expect("query")
            .expect("group")
            .id;
        Rig {
            root: root.to_path_buf(),
            h,
            sim,
            catalog,
            group_id,
            synced,
            rng,
        }
    }

    /// One batch of random writes (data, sometimes zero or trim), acknowledged.
    async fn ingest(&mut self, bookmark: Option<&str>) -> u64 {
        let ops = WRITES.ops(&mut self.rng, VOL.2);
        self.h
            .commit(&mut self.sim, &ops, BatchFlags::FLUSH, bookmark)
            .await
    }

    async fn group(&self) -> GroupRow {
        self.catalog
            .group_by_id(self.group_id)
            .await
            .expect("read the group")
    }

    async fn journal_bytes(&self) -> u64 {
        self.catalog
            .journal_bytes(self.group_id)
            .await
            .expect("journal bytes")
    }

    /// Agent time (ns) between batch `seq` and the head.
    fn age_ns(&self, seq: u64) -> i64 {
        self.sim.times[&self.sim.seq] - self.sim.times[&seq]
    }

    /// The base the trimmer settles on for a window alone: the newest seq such that every
    /// batch up to it is older than the window, measured from the head's agent time.
    fn base_for_window(&self, window: Duration) -> u64 {
        let cutoff = self.sim.times[&self.sim.seq] - window.as_nanos() as i64;
        let first_young = self
            .sim
            .times
            .iter()
            .find(|(_, t)| **t >= cutoff)
            .map(|(s, _)| *s)
            .expect("the head is young");
        first_young - 1
    }

    /// The base the trimmer settles on for a journal cap alone: the smallest seq such that
    /// the batches after it (all journaled after the sync) fit under the cap.
    fn base_for_cap(&self, cap: u64) -> u64 {
        let mut bytes = 0u64;
        let mut base = self.sim.seq;
        for seq in (self.synced + 1..=self.sim.seq).rev() {
            bytes += self.sim.lengths[&seq];
            if bytes > cap {
                break;
            }
            base = seq - 1;
        }
        base.max(self.synced)
    }

    /// Waits (with the deadline) until the group's base is `seq` and no trim is under way.
    async fn wait_base(&self, seq: u64) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let g = self.group().await;
            if g.base_seq == Seq(seq) && g.trimming_to.is_none() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the base is {} (trimming to {:?}), not {seq}",
                g.base_seq,
                g.trimming_to
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Checks the window [start, head]: `points` lists exactly it, every point restores to
    /// the model, and points before it are refused with a sentence naming the window.
    async fn check_window(&self, start: u64) {
        check_window(&self.root, &self.sim, start, self.synced, self.sim.seq).await;
    }
}

/// The image of the volume at `at`, restored.
async fn restore_image(root: &Path, at: &PointSpec) -> Result<Vec<u8>, ReplicaError> {
    restore_bytes(root, VOL.1, at).await.map(|(bytes, _)| bytes)
}

async fn check_window(root: &Path, sim: &AgentSim, start: u64, synced: u64, head: u64) {
    let points = cdp_replica::points(root, VOL.1).await.expect("points");
    let seqs: Vec<u64> = points.iter().map(|p| p.seq.0).collect();
    assert_eq!(
        seqs,
        (start..=head).collect::<Vec<_>>(),
        "points lists the window"
    );
    for seq in start..=head {
        let got = restore_image(root, &PointSpec::Seq(seq))
            .await
            .unwrap_or_else(|e| panic!("restore at seq {seq}: {e}"));
        assert!(
            got == sim.model_image(seq, 0),
            "the restore at seq {seq} differs from the model"
        );
    }
    for n in [start.saturating_sub(1), synced, 1] {
        if n >= start || n == 0 {
            continue;
        }
        let e = cdp_replica::resolve_point(root, VOL.1, &PointSpec::Seq(n))
            .await
            .expect_err("a point before the window");
        let e = e.to_string();
        assert!(
            e.contains("before the window")
                && e.contains(&format!("the first restorable point is seq {start}"))
                && e.contains(&format!("the last is seq {head}")),
            "seq:{n}: {e}"
        );
    }
}

/// The window slides under continuous ingest: the base advances, exactly the batches of the
/// last few seconds (agent time) stay, and every one of them restores exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_window_slides_under_continuous_ingest() {
    const WINDOW: Duration = Duration::from_secs(2);
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("replica");
    let mut rig = Rig::start(&root, Retention::default(), true, 1).await;
    let early = rig.ingest(Some("early")).await;
    // Set while ingest and the trimmer run: picked up at the trimmer's next round.
    let r = cdp_replica::set_retention(
        &root,
        GROUP,
        &RetentionChange {
            window: Some(WINDOW),
            journal_bytes_max: None,
        },
    )
    .await
    .expect("set the retention");
    assert_eq!(r.window, WINDOW);

    let mut bases = vec![rig.group().await.base_seq];
    while rig.age_ns(early) < (WINDOW * 3).as_nanos() as i64 {
        rig.ingest(None).await;
        tokio::time::sleep(INGEST_GAP).await;
        let base = rig.group().await.base_seq;
        assert!(base >= *bases.last().expect("a base"), "the base went back");
        if base != *bases.last().expect("a base") {
            bases.push(base);
        }
    }
    assert!(
        bases.len() >= 3,
        "the base advanced only {} times: {bases:?}",
        bases.len() - 1
    );
    let late = rig.ingest(Some("late")).await;

    // Once the trimmer has caught up, the window holds exactly the last WINDOW of agent time.
    let start = rig.base_for_window(WINDOW);
    assert!(start > early, "the early batches left the window");
    rig.wait_base(start).await;
    rig.check_window(start).await;

    // Refusals name the window.
    let e = cdp_replica::resolve_point(&root, VOL.1, &PointSpec::Bookmark("early".into()))
        .await
        .expect_err("a bookmark that left the window")
        .to_string();
    assert!(
        e.contains("has left it")
            && e.contains(&format!("the first restorable point is seq {start}")),
        "{e}"
    );
    let before = chrono::DateTime::from_timestamp_nanos(rig.sim.times[&start] - 1);
    let e = cdp_replica::resolve_point(&root, VOL.1, &PointSpec::Time(before))
        .await
        .expect_err("a time before the window")
        .to_string();
    assert!(
        e.contains("no crash-consistent point at or before")
            && e.contains(&format!("the last is seq {late}")),
        "{e}"
    );
    let chosen = cdp_replica::resolve_point(&root, VOL.1, &PointSpec::Bookmark("late".into()))
        .await
        .expect("the late bookmark");
    assert_eq!(chosen.seq, Seq(late));

    // Trimmed segments are gone: the oldest one left holds the journal's committed end.
    let g = rig.group().await;
    let (end_segment, _) = g.trimmed_end.expect("journaled batches were trimmed");
    let oldest = segments(&root).first().copied().expect("a segment");
    assert_eq!(
        oldest, end_segment,
        "segments before {end_segment} are unlinked"
    );

    // status shows the window and the retention.
    let s = cdp_replica::status(&root).await.expect("status");
    let v = &s.volumes[0];
    assert_eq!(v.base_seq, Seq(start));
    assert_eq!(v.window_first.as_ref().map(|p| p.seq), Some(Seq(start)));
    assert_eq!(v.retention.window, "2s");
    assert_eq!(v.retention.window_s, 2);
    assert_eq!(v.retention.max_journal_bytes, None);
    assert_eq!((v.pins.count, v.pins.oldest_seq), (0, None));
    rig.h.shutdown().await;
}

/// The segment files of the group's journal, in order.
fn segments(root: &Path) -> Vec<u64> {
    let dir = DataDir::new(root).journal(GROUP);
    let mut n: Vec<u64> = std::fs::read_dir(&dir)
        .expect("journal dir")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".seg")?.parse().ok()
        })
        .collect();
    n.sort_unstable();
    n
}

fn segment_bytes_on_disk(root: &Path) -> u64 {
    let dir = DataDir::new(root).journal(GROUP);
    segments(root)
        .iter()
        .map(|n| {
            std::fs::metadata(dir.join(segment_name(*n)))
                .expect("stat")
                .len()
        })
        .sum()
}

/// A journal cap bounds the journal: after every acknowledged batch (one batch per group
/// commit, since the agent waits for each ack) the journal holds at most the cap plus that
/// batch; once the trimmer has caught up, at most the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_cap_bounds_the_journal() {
    const CAP: u64 = 1 << 20;
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("replica");
    let retention = Retention {
        journal_bytes_max: Some(CAP),
        ..Retention::default()
    };
    let mut rig = Rig::start(&root, retention, false, 2).await;
    let mut most = 0u64;
    for _ in 0..150 {
        let seq = rig.ingest(None).await;
        let bytes = rig.journal_bytes().await;
        let batch = rig.sim.lengths[&seq];
        assert!(
            bytes <= CAP + batch,
            "after batch {seq} ({batch} bytes) the journal holds {bytes} bytes, over the cap of {CAP} by more than that batch"
        );
        most = most.max(bytes);
    }
    let start = rig.base_for_cap(CAP);
    assert!(start > rig.synced + 20, "the cap trimmed ({start})");
    rig.wait_base(start).await;
    let bytes = rig.journal_bytes().await;
    assert!(bytes <= CAP, "{bytes} journal bytes once caught up");
    // Segment files hold at most one segment more than the journal's bytes (the open one, and
    // the one holding the committed end).
    let on_disk = segment_bytes_on_disk(&root);
    let max_batch = rig.sim.lengths.values().max().copied().unwrap_or(0);
    assert!(
        on_disk <= CAP + 2 * (SEGMENT_BYTES + max_batch),
        "{on_disk} bytes of segment files for a {CAP}-byte cap"
    );
    eprintln!(
        "cap {CAP}: at most {most} journal bytes after a commit, {bytes} once caught up, {on_disk} in segment files"
    );
    rig.check_window(start).await;
    rig.h.shutdown().await;
}

/// A reader's pin keeps its point in the window, however old it gets, until it is released;
/// then the trimmer moves on and the point is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_keeps_its_point_until_released() {
    const WINDOW: Duration = Duration::from_secs(1);
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("replica");
    let retention = Retention {
        window: WINDOW,
        journal_bytes_max: None,
    };
    let mut rig = Rig::start(&root, retention, true, 3).await;
    for _ in 0..5 {
        rig.ingest(None).await;
    }
    let kept = rig.ingest(Some("keep")).await;
    let (point, pin) = cdp_replica::pin_point(
        &root,
        VOL.1,
        &PointSpec::Bookmark("keep".into()),
        "window test",
    )
    .await
    .expect("pin");
    assert_eq!((point.seq, pin.seq()), (Seq(kept), Seq(kept)));
    let s = cdp_replica::status(&root).await.expect("status");
    assert_eq!(
        (s.volumes[0].pins.count, s.volumes[0].pins.oldest_seq),
        (1, Some(Seq(kept)))
    );

    // Ingest on until the pinned point is far older than the window: the base stops at it,
    // and stays there for several trimmer rounds.
    let held_since = loop {
        rig.ingest(None).await;
        tokio::time::sleep(INGEST_GAP).await;
        let g = rig.group().await;
        assert!(g.base_seq <= Seq(kept), "the base passed a live pin");
        if g.base_seq == Seq(kept) && rig.age_ns(kept) > (2 * WINDOW).as_nanos() as i64 {
            break rig.sim.seq;
        }
        assert!(
            rig.age_ns(kept) < (20 * WINDOW).as_nanos() as i64,
            "the base never reached the pin"
        );
    };
    while rig.age_ns(held_since) < (2 * cdp_replica::trimmer::TRIM_INTERVAL).as_nanos() as i64 {
        rig.ingest(None).await;
        tokio::time::sleep(INGEST_GAP).await;
        assert_eq!(
            rig.group().await.base_seq,
            Seq(kept),
            "the base passed a live pin"
        );
    }
    // The pinned point still restores exactly, by the guard's reader and by `restore`.
    let mut reader = pin.open_image().await.expect("open the pinned image");
    let mut image = vec![0u8; VOL.2 as usize];
    tokio::task::spawn_blocking(move || {
        reader.read_at(0, &mut image).expect("read");
        image
    })
    .await
    .map(|image| assert!(image == rig.sim.model_image(kept, 0)))
    .expect("read the pinned image");
    let got = restore_image(&root, &PointSpec::Bookmark("keep".into()))
        .await
        .expect("restore the pinned point");
    assert!(got == rig.sim.model_image(kept, 0));
    pin.check_held().await.expect("the pin held");

    // Released: the trimmer moves on.
    pin.release().await.expect("release");
    let start = rig.base_for_window(WINDOW);
    assert!(start > kept);
    rig.wait_base(start).await;
    let e = restore_image(&root, &PointSpec::Seq(kept))
        .await
        .expect_err("the point left the window")
        .to_string();
    assert!(e.contains("before the window"), "{e}");
    let s = cdp_replica::status(&root).await.expect("status");
    assert_eq!(s.volumes[0].pins.count, 0);
    rig.h.shutdown().await;
}

/// With the whole journal in one segment, the trimmer punches the trimmed bytes out of it
/// (they take no disk any more), but not while a reader that planned its image before the
/// trim may still read them: a pinned image opened before the base moved up to its point
/// reads that point exactly after the move, and the bytes are released once it is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimmed_bytes_are_released_only_when_no_reader_needs_them() {
    const WINDOW: Duration = Duration::from_secs(1);
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("replica");
    let retention = Retention {
        window: WINDOW,
        journal_bytes_max: None,
    };
    let one_segment = options_with(cdp_replica::journal::SEGMENT_BYTES_TARGET);
    let mut rig = Rig::start_with(&root, retention, true, 4, one_segment).await;
    for _ in 0..40 {
        rig.ingest(None).await;
    }
    let kept = rig.ingest(Some("keep")).await;
    let (_, pin) = cdp_replica::pin_point(
        &root,
        VOL.1,
        &PointSpec::Bookmark("keep".into()),
        "window test",
    )
    .await
    .expect("pin");
    // Opened now: its plan reads the journal's records up to `kept`.
    let mut early = pin.open_image().await.expect("open the pinned image");
    let seg = DataDir::new(&root).journal(GROUP).join(segment_name(1));
    assert_eq!(segments(&root), vec![1], "one segment");
    let allocated = |path: &Path| {
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(path).expect("stat")) * 512
    };

    // The base moves up to the pinned point; the records the early reader planned are
    // applied to the target file, and kept in the segment.
    let deadline = Instant::now() + DEADLINE;
    while rig.group().await.base_seq < Seq(kept) {
        assert!(Instant::now() < deadline, "the base never reached the pin");
        rig.ingest(None).await;
        tokio::time::sleep(INGEST_GAP).await;
    }
    rig.wait_base(kept).await;
    let before_release = allocated(&seg);
    let model = rig.sim.model_image(kept, 0);
    let image = tokio::task::spawn_blocking(move || {
        let mut image = vec![0u8; VOL.2 as usize];
        early.read_at(0, &mut image).map(|()| image)
    })
    .await
    .expect("join")
    .expect("the early reader reads its point after the trim");
    assert!(
        image == model,
        "the early reader's image differs from the model"
    );
    pin.check_held().await.expect("the pin held");

    // Released: the next trims punch the segment's trimmed bytes out.
    pin.release().await.expect("release");
    let deadline = Instant::now() + DEADLINE;
    loop {
        rig.ingest(None).await;
        tokio::time::sleep(INGEST_GAP).await;
        let g = rig.group().await;
        let on_disk = allocated(&seg);
        let journal = rig.journal_bytes().await;
        if g.base_seq > Seq(kept) && on_disk < before_release && on_disk <= journal + (256 << 10) {
            eprintln!(
                "segment: {before_release} bytes on disk while pinned, {on_disk} for a journal of {journal} bytes once released"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the trimmed bytes were not released: {on_disk} bytes on disk for a journal of {journal} (base {})",
            g.base_seq
        );
    }
    assert_eq!(segments(&root), vec![1], "still one segment");
    let got = restore_image(&root, &PointSpec::Latest)
        .await
        .expect("restore the latest point");
    assert!(
        got == rig.sim.model_image(rig.sim.seq, 0),
        "the latest point differs"
    );
    rig.h.shutdown().await;
}

/// Not a test by itself: run by `a_dead_readers_pin_expires` as a child process (this test
/// binary, re-executed with `CDP_TEST_PIN_HOLDER=root<TAB>volume<TAB>seq`). It pins the point,
/// says `pinned SEQ`, and holds the pin until it is killed.
#[test]
#[ignore]
fn pin_holder() {
    let Ok(spec) = std::env::var(PIN_HOLDER_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split('\t').collect();
    let (root, volume, seq) = (
        PathBuf::from(parts[0]),
        parts[1].to_owned(),
        parts[2].parse::<u64>().expect("seq"),
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let timing = match std::env::var(PIN_HOLDER_TTL_ENV) {
            Ok(ms) => cdp_replica::pins::PinTiming::with_ttl(Duration::from_millis(
                ms.parse::<u64>().expect("ttl ms"),
            )),
            Err(_) => cdp_replica::pins::PinTiming::default(),
        };
        let (point, _pin) = cdp_replica::pins::pin_point_with(
            &root,
            &volume,
            &PointSpec::Seq(seq),
            "pin holder child",
            timing,
        )
        .await
        .expect("pin");
        println!("pinned {}", point.seq);
        std::future::pending::<()>().await;
    });
}

/// A child process holding a pin on `seq`; `ttl_ms` sets its pins' TTL (test-only knob).
struct Holder {
    child: Child,
}

impl Holder {
    fn spawn(root: &Path, seq: u64, ttl_ms: Option<u64>) -> Holder {
        let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
        cmd.args(["pin_holder", "--exact", "--ignored", "--nocapture"])
            .env(
                PIN_HOLDER_ENV,
                format!("{}\t{}\t{seq}", root.display(), VOL.1),
            )
            .env_remove(PIN_HOLDER_TTL_ENV)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(ms) = ttl_ms {
            cmd.env(PIN_HOLDER_TTL_ENV, ms.to_string());
        }
        let mut child = cmd.spawn().expect("spawn the pin holder");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if line.starts_with("pinned ") {
                    let _ = tx.send(line);
                    return;
                }
            }
        });
        let line = rx
            .recv_timeout(DEADLINE)
            .expect("the pin holder pins its point");
        assert_eq!(line, format!("pinned {seq}"));
        Holder { child }
    }

    fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("pid");
        rustix::process::kill_process(pid, sig).expect("signal the pin holder");
    }

    fn kill(mut self) {
        self.child.kill().expect("SIGKILL the pin holder");
        self.child.wait().expect("reap the pin holder");
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A pin left by a reader killed with SIGKILL is dead at once (its process is gone); the pin
/// of a reader that stalls (SIGSTOP) expires after its TTL. Either way the trimmer moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_readers_pin_expires() {
    const WINDOW: Duration = Duration::from_secs(1);
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("replica");
    let retention = Retention {
        window: WINDOW,
        journal_bytes_max: None,
    };
    let mut rig = Rig::start(&root, retention, true, 4).await;

    for (ttl_ms, stall) in [(None, false), (Some(1500), true)] {
        let pinned = rig.ingest(None).await;
        let holder = Holder::spawn(&root, pinned, ttl_ms);
        // The base stops at the live pin.
        loop {
            rig.ingest(None).await;
            tokio::time::sleep(INGEST_GAP).await;
            let g = rig.group().await;
            assert!(g.base_seq <= Seq(pinned), "the base passed a live pin");
            if g.base_seq == Seq(pinned) && rig.age_ns(pinned) > (2 * WINDOW).as_nanos() as i64 {
                break;
            }
            assert!(
                rig.age_ns(pinned) < (20 * WINDOW).as_nanos() as i64,
                "the base never reached the pin"
            );
        }
        let s = cdp_replica::status(&root).await.expect("status");
        assert_eq!(s.volumes[0].pins.oldest_seq, Some(Seq(pinned)));
        let dead = std::time::Instant::now();
        if stall {
            // Stopped, its process exists but it renews nothing: the pin expires.
            holder.signal(rustix::process::Signal::STOP);
            rig.wait_base(rig.base_for_window(WINDOW)).await;
            holder.kill();
        } else {
            holder.kill();
            rig.wait_base(rig.base_for_window(WINDOW)).await;
        }
        // Well before the default TTL: the killed reader's pin died with its process.
        assert!(
            dead.elapsed() < cdp_replica::pins::PIN_TTL / 3,
            "the dead pin held for {:?}",
            dead.elapsed()
        );
        assert!(rig.group().await.base_seq > Seq(pinned));
        let s = cdp_replica::status(&root).await.expect("status");
        assert_eq!(s.volumes[0].pins.count, 0);
    }
    let start = rig.group().await.base_seq;
    rig.check_window(start.0).await;
    rig.h.shutdown().await;
}

/// Copies a data directory (files and directories).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("list") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// A trim stopped right after each step of its protocol (as a crash would leave it) is
/// completed by the next trimmer, with the same result as a trim never interrupted; readers
/// see the right window and images all along; and ingest goes on afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trim_cut_short_after_any_step_completes_the_same() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("replica");
    let mut rig = Rig::start(&root, Retention::default(), false, 5).await;
    for i in 0..40 {
        rig.ingest((i % 10 == 0).then_some("tenth")).await;
    }
    // Empty batches at the end (nothing journaled): a trim of every journaled batch.
    let mut sim = rig.sim;
    for _ in 0..4 {
        rig.h.commit(&mut sim, &[], BatchFlags::FLUSH, None).await;
    }
    rig.h.shutdown().await;
    rig.catalog.close().await;
    let head = sim.seq;
    // The batch each copy receives after its trim.
    let (next, next_bytes) = sim.batch(
        &[Op::Data {
            vol: 0,
            offset: 4096,
            bytes: pattern(99, 5000),
        }],
        BatchFlags::FLUSH,
        None,
    );
    // One batch per agent second: a 10 s window keeps the last 10 batches; 3 s keeps only
    // empty batches.
    let cases = [
        (Some(TrimStep::Intent), 10),
        (Some(TrimStep::Apply), 10),
        (Some(TrimStep::Sync), 3),
        (Some(TrimStep::Commit), 10),
        (None, 3),
    ];
    for (i, (stop, window_s)) in cases.into_iter().enumerate() {
        let copy = tmp.path().join(format!("copy-{i}"));
        copy_dir(&root, &copy);
        let dir = DataDir::existing(&copy).expect("data dir");
        let catalog = Catalog::open(&dir.catalog(), OpenMode::Existing)
            .await
            .expect("catalog");
        let window = Duration::from_secs(window_s);
        cdp_replica::set_retention(
            &copy,
            GROUP,
            &RetentionChange {
                window: Some(window),
                journal_bytes_max: None,
            },
        )
        .await
        .expect("retention");
        let start = head - window_s - 1;
        let g = catalog
            .group_by_name(GROUP)
            .await
            .expect("query")
            .expect("group");
        let link = TrimLink::new(catalog.journal_bytes(g.id).await.expect("bytes"), None);
        let mut t = Trimmer::new(&catalog, &dir, &g, link.clone());
        t.round_stopping_after(stop).await.expect("a round");
        drop(t);
        // Cut short: readers already see the window from the intent on.
        check_window(&copy, &sim, start, rig.synced, head).await;
        // A new trimmer completes it.
        let mut t = Trimmer::new(&catalog, &dir, &g, link.clone());
        while t.round().await.expect("a round").more {}
        let g = catalog
            .group_by_name(GROUP)
            .await
            .expect("query")
            .expect("group");
        assert_eq!((g.base_seq, g.trimming_to), (Seq(start), None), "{stop:?}");
        assert_eq!(
            catalog.batch_count(g.id).await.expect("count"),
            head - start + 1,
            "batches from the base on are kept"
        );
        assert_eq!(
            link.journal_bytes(),
            catalog.journal_bytes(g.id).await.expect("bytes")
        );
        check_window(&copy, &sim, start, rig.synced, head).await;
        // Once more: nothing changes.
        let again = t.round().await.expect("a round");
        assert_eq!(again.trimmed_to, None);
        // Segments before the one holding the committed end are gone, that one is not.
        let end = catalog
            .last_journaled(g.id)
            .await
            .expect("query")
            .expect("a committed end");
        assert_eq!(
            segments(&copy).first(),
            Some(&g.trimmed_end.expect("end").0)
        );
        assert_eq!(
            std::fs::metadata(dir.journal(GROUP).join(segment_name(end.segment)))
                .expect("the end's segment")
                .len(),
            end.end()
        );
        catalog.close().await;

        // Ingest goes on over the trimmed journal (its recovery finds the committed end).
        let mut h = Harness::open_with(&copy, options()).await;
        h.hello(vec![sim.hello()]).await.expect("welcome");
        h.submit(next_bytes.clone()).await;
        h.wait_ack(GROUP, next).await;
        h.shutdown().await;
        let got = restore_image(&copy, &PointSpec::Latest)
            .await
            .expect("restore latest");
        assert!(
            got == sim.model_image(next, 0),
            "{stop:?}: latest after more ingest"
        );
    }
}

/// A journal record damaged in its segment (a flipped byte of its payload) does not stop the
/// trimmer: the window slides past it, an error event names it, and ingest goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_record_is_left_out_by_the_trimmer_which_goes_on() {
    const WINDOW: Duration = Duration::from_secs(1);
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("replica");
    let retention = Retention {
        window: WINDOW,
        journal_bytes_max: None,
    };
    let mut rig = Rig::start(&root, retention, true, 11).await;
    // A batch with one data record, then damage the record's payload in its segment.
    let seq = rig
        .h
        .commit(
            &mut rig.sim,
            &[Op::Data {
                vol: 0,
                offset: 4096,
                bytes: pattern(77, 16 << 10),
            }],
            BatchFlags::FLUSH,
            None,
        )
        .await;
    let volume = rig
        .catalog
        .volume_by_name(VOL.1)
        .await
        .expect("query")
        .expect("volume");
    let rows = rig
        .catalog
        .records(volume.id, Seq(seq - 1), Seq(seq))
        .await
        .expect("records");
    let row = rows.first().expect("the record");
    let seg = root
        .join("journal")
        .join(GROUP)
        .join(segment_name(row.segment));
    let mut data = std::fs::read(&seg).expect("segment");
    let at = row.position as usize + 60;
    data[at] ^= 0x40;
    std::fs::write(&seg, &data).expect("damage the segment");

    // Batches go on arriving; the window must slide past the damaged batch.
    let deadline = Instant::now() + DEADLINE;
    loop {
        rig.ingest(None).await;
        if rig.group().await.base_seq >= Seq(seq) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the trimmer did not pass the damaged batch {seq}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let events = rig.catalog.events(Some(GROUP), 100).await.expect("events");
    assert!(
        events
            .iter()
            .any(|e| e.message.contains("damaged journal record was left out")),
        "an event names the damaged record: {events:?}"
    );
    // Ingest still acknowledges.
    rig.ingest(None).await;
    rig.h.shutdown().await;
}

/// A reader's progress (a restore's bytes) reaches `status` through its pin, with a rate and
/// the time left; internal readers are not listed, and a released reader is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_readers_progress_shows_in_status_as_work() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("replica");
    let retention = Retention {
        window: Duration::from_secs(3600),
        journal_bytes_max: None,
    };
    let mut rig = Rig::start(&root, retention, true, 3).await;
    let head = rig.ingest(None).await;
    let (_, restore) =
        cdp_replica::pin_point(&root, VOL.1, &PointSpec::Seq(head), "restore to /x.img")
            .await
            .expect("pin");
    let (_, other) = cdp_replica::pin_point(&root, VOL.1, &PointSpec::Seq(head), "window test")
        .await
        .expect("pin");
    let progress = restore.progress();
    progress.set_total(1000);
    progress.add(250);
    let deadline = Instant::now() + DEADLINE;
    let work = loop {
        let s = cdp_replica::status(&root).await.expect("status");
        let work = s.volumes[0].work.clone();
        if work.iter().any(|w| w.done == 250) {
            break work;
        }
        assert!(Instant::now() < deadline, "no progress in status: {work:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(work.len(), 1, "only the restore is listed: {work:?}");
    let w = &work[0];
    assert_eq!(
        (w.kind.as_str(), w.unit, w.total),
        ("restore", "bytes", Some(1000))
    );
    assert!(
        w.what.contains("restore to /x.img") && w.what.contains(&format!("at seq {head}")),
        "{w:?}"
    );
    let rate = w.rate_per_s.expect("a rate");
    let eta = w.eta_s.expect("a time left");
    assert!(rate > 0 && eta >= 750 / rate, "{w:?}");
    restore.release().await.expect("release");
    other.release().await.expect("release");
    let s = cdp_replica::status(&root).await.expect("status");
    assert!(s.volumes[0].work.is_empty(), "{:?}", s.volumes[0].work);
    rig.h.shutdown().await;
}
