//! Trimmer crash safety (issue 5): the real `cdp-replica serve` binary trims all the time — a
//! 2 s window, a 1 MiB journal cap, 128 KiB journal segments — while a test agent streams
//! batches to it, and it is killed with SIGKILL at random moments (some while it starts, when
//! it completes a trim left under way). After every restart the test checks that
//!
//! * every acknowledged batch is durable, and the journal agrees with the catalog;
//! * `points` lists exactly the window, from max(base, trimming_to, sync) to the head;
//! * nothing the window still needs was trimmed: the window starts no later than retention
//!   allows (the newest seq older than the window, or the one the cap needs);
//! * restores at every point of the window equal the model.
//!
//! At the end, trimmed segments are unlinked. `CDP_TRIMMER_KILLS` raises the number of kills
//! (default 10); `CDP_TRIMMER_CRASH_SEED` replays a run (the seed is printed).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use cdp_replica::datadir::DataDir;
use cdp_replica::{PointSpec, Retention};
use cdp_shared::batch::BatchFlags;
use cdp_shared::identity::Identity;
use cdp_shared::types::CHUNK_BYTES;
use common::journal::{assert_journal_ends_at_its_commit, group_row, open_catalog};
use common::ops::{Kinds, Mix};
use common::serve::log_tail;
use common::test_agent::{FIRST_LISTEN, Restarted, TestAgent};
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const KILLS_DEFAULT: u32 = 10;
const VOL: (u32, &str, u64) = (0, "trim-disk", 2 * CHUNK_BYTES + 4608);
const GROUP: &str = "g";
const WINDOW: Duration = Duration::from_secs(2);
const CAP: u64 = 1 << 20;
const SEGMENT_SIZE: &str = "128KiB";
/// Batches the agent keeps unacknowledged.
const IN_FLIGHT: u64 = 32;
/// The writes of a batch: 4 to 16 of up to 16 KiB, one in 16 a zero-write.
const WRITES: Mix = Mix {
    count: 4..=16,
    len: 1..=16 << 10,
    kinds: Kinds::RatioZero(16),
};
/// How long the agent streams before the kill, at most.
const STREAM_MS_MAX: u64 = 400;

type Agent = TestAgent;

fn new_batch(agent: &mut Agent) {
    let ops = WRITES.ops(&mut agent.rng, VOL.2);
    agent.sim.batch(&ops, BatchFlags::FLUSH, None);
}

/// The base retention asks for with `head` as the head: the newest seq older than the
/// window, or the seq up to which the cap needs batches gone, whichever is further.
fn retention_base(agent: &Agent, head: u64) -> u64 {
    let cutoff = agent.sim.times[&head] - WINDOW.as_nanos() as i64;
    let first_young = agent
        .sim
        .times
        .range(..=head)
        .find(|(_, t)| **t >= cutoff)
        .map(|(s, _)| *s)
        .expect("the head is young");
    // Batches after the sync are journaled whole; the sync's are not journaled.
    let mut bytes = 0u64;
    let mut for_cap = 0;
    for seq in (agent.synced + 1..=head).rev() {
        bytes += agent.sim.lengths[&seq];
        if bytes > CAP {
            for_cap = seq;
            break;
        }
    }
    (first_young - 1).max(for_cap)
}

/// serve's environment: the trimmer's decisions logged.
fn serve_env() -> Vec<(&'static str, String)> {
    vec![("RUST_LOG", "info,cdp_replica::trimmer=debug".into())]
}

fn segments(root: &Path) -> Vec<u64> {
    let dir = DataDir::new(root).journal(GROUP);
    let mut n: Vec<u64> = std::fs::read_dir(&dir)
        .map(|d| {
            d.filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                name.strip_suffix(".seg")?.parse().ok()
            })
            .collect()
        })
        .unwrap_or_default();
    n.sort_unstable();
    n
}

/// The checks after a restart (serve has recovered: it answered the hello).
async fn check(root: &Path, out_dir: &Path, agent: &mut Agent, acked_before: u64, durable: u64) {
    agent.check_durable(acked_before, durable);

    let (dir, catalog) = open_catalog(root).await;
    let g = group_row(&catalog, GROUP).await;
    assert_eq!(g.head_seq.0, durable);
    assert_journal_ends_at_its_commit(&dir, &catalog, GROUP, &g).await;
    catalog.close().await;
    if durable < agent.synced {
        return;
    }
    let start = g.window_floor().0.max(agent.synced);
    let allowed = retention_base(agent, durable).max(agent.synced);
    assert!(
        start <= allowed,
        "the window starts at {start} (base {}, trimming to {:?}) but retention allows trimming only up to {allowed}",
        g.base_seq,
        g.trimming_to
    );
    // `serve` runs meanwhile and its trimmer may go on moving the window up to `allowed`
    // (the head's agent time is fixed while the agent does not stream, so retention allows
    // no more): a point may leave the window while this check reads, but never one that
    // retention still keeps.
    let points = cdp_replica::points(root, VOL.1).await.expect("points");
    let seqs: Vec<u64> = points.iter().map(|p| p.seq.0).collect();
    let first = seqs.first().copied().unwrap_or(durable);
    assert!(
        first >= start && first <= allowed.max(start),
        "the window starts at {first}, outside {start}..={allowed}"
    );
    assert_eq!(seqs, (first..=durable).collect::<Vec<_>>());
    for seq in first..=durable {
        let out = out_dir.join(format!("restore-{seq}"));
        let _ = std::fs::remove_file(&out);
        if let Err(e) = cdp_replica::restore(root, VOL.1, &PointSpec::Seq(seq), &out).await {
            let floor = window_floor(root).await;
            assert!(
                seq < floor && floor <= allowed.max(start),
                "restore at seq {seq}: {e} (the window now starts at {floor}; retention allows up to {allowed})"
            );
            continue;
        }
        assert!(
            read(&out) == agent.sim.model_image(seq, 0),
            "the restore at seq {seq} differs from the model"
        );
        std::fs::remove_file(&out).expect("remove restored image");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_trimming_loses_nothing_the_window_needs() {
    let kills: u32 = std::env::var("CDP_TRIMMER_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(KILLS_DEFAULT);
    let seed: u64 = std::env::var("CDP_TRIMMER_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!(
        "trimmer crash test: {kills} kills, seed {seed} (CDP_TRIMMER_CRASH_SEED={seed} replays it)"
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("replica");
    let log: PathBuf = tmp.path().join("serve.log");
    let retention = Retention {
        window: WINDOW,
        journal_bytes_max: Some(CAP),
    };
    let replica_fp =
        cdp_replica::init_with(&root, "127.0.0.1:0".parse().expect("addr"), &retention)
            .await
            .expect("init");
    set_segment_size(&root, SEGMENT_SIZE);
    let identity = Identity::generate("trim-agent").expect("identity");
    cdp_replica::authorize(&root, identity.fingerprint(), "trim").expect("authorize");

    let mut rng = StdRng::seed_from_u64(seed);
    let mut sim = AgentSim::new(GROUP, &[VOL]);
    sim.real_time = true;
    sim.images.insert(0, pattern(rng.random(), VOL.2 as usize));
    let mut sim = sim.checkpointed(64);
    let mut batches = Vec::new();
    let synced = sim.sync_volume(0, &mut batches);
    let mut agent = Agent {
        identity,
        sim,
        acked: 0,
        synced,
        rng,
        extra: (),
    };

    let started = std::time::Instant::now();
    let mut listen = FIRST_LISTEN.to_owned();
    let mut startup_kills = 0u32;
    for _ in 0..kills {
        if agent
            .maybe_kill_while_starting(&root, &listen, &log, &serve_env(), 4, 0..40)
            .await
        {
            startup_kills += 1;
        }
        let Restarted {
            serve,
            q,
            acked_before,
            durable,
        } = agent
            .restart(&root, &mut listen, &log, &serve_env(), replica_fp)
            .await;
        check(&root, tmp.path(), &mut agent, acked_before, durable).await;
        agent
            .stream_then_kill(serve, q, IN_FLIGHT, 50..=STREAM_MS_MAX, new_batch)
            .await;
    }

    // A last start: everything sent is acknowledged; the window settles where retention says
    // and the trimmed segments are unlinked.
    let Restarted {
        serve,
        mut q,
        acked_before,
        durable,
    } = agent
        .restart(&root, &mut listen, &log, &serve_env(), replica_fp)
        .await;
    check(&root, tmp.path(), &mut agent, acked_before, durable).await;
    let last = agent.send_the_rest(&q, new_batch).await;
    if let Err(e) = q.try_wait_ack(GROUP, last).await {
        panic!(
            "{e} (sent {}..={last}); serve's log:\n{}",
            agent.acked + 1,
            log_tail(&log)
        );
    }
    agent.saw_ack(last);
    let settled = retention_base(&agent, last);
    let (_, catalog) = open_catalog(&root).await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let g = group_row(&catalog, GROUP).await;
        let first = segments(&root).first().copied();
        if g.base_seq.0 == settled && g.trimming_to.is_none() && g.trimmed_end.map(|e| e.0) == first
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the trimmer did not settle: base {} (want {settled}), trimming to {:?}, oldest segment {first:?}, committed end {:?}",
            g.base_seq,
            g.trimming_to,
            g.trimmed_end
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    catalog.close().await;
    check(&root, tmp.path(), &mut agent, last, last).await;
    q.conn.close(0u32.into(), b"done");
    drop(q);
    serve.stop_and_wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    eprintln!(
        "trimmer crash test: {kills} kills during ingest and trimming, {startup_kills} during start, {last} batches, {} trims, {} trims completed after a kill, {} s",
        text.matches("trimmed to seq").count(),
        text.matches("completing the trim to seq").count(),
        started.elapsed().as_secs()
    );
}

/// Where the window of the test's group starts now.
async fn window_floor(root: &Path) -> u64 {
    let (_, catalog) = open_catalog(root).await;
    let g = group_row(&catalog, GROUP).await;
    catalog.close().await;
    g.window_floor().0
}
