//! Replica crash safety (DESIGN 3.6, issue 4): the real `cdp-replica serve` binary is killed
//! with SIGKILL at random moments while a test agent streams batches of many writes to it;
//! it is restarted each time on the same data directory and port, the agent reconnects and
//! sends again everything not acknowledged. After every restart the test checks that
//!
//! * every batch acknowledged before the kill is durable (the Welcome's seq, and `points`
//!   lists every seq of the window up to it);
//! * the journal holds no half batch: the last segment ends exactly where the catalog's last
//!   journaled batch ends, and no newer segment exists;
//! * restores at random acknowledged points equal the model.
//!
//! Some kills land while `serve` is still starting (recovering its journal). The run is seeded
//! (`CDP_REPLICA_CRASH_SEED` replays one; the seed is printed); `CDP_REPLICA_KILLS` raises the
//! number of kills during ingest (default 20; `make soak` raises it), taken by a fresh replica
//! every 20 kills.

mod common;

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};

use cdp_replica::PointSpec;
use cdp_shared::batch::BatchFlags;
use cdp_shared::identity::Identity;
use cdp_shared::types::CHUNK_BYTES;
use common::journal::{assert_journal_ends_at_its_commit, group_row, open_catalog};
use common::ops::{Kinds, Mix, Write};
use common::test_agent::{FIRST_LISTEN, Restarted, TestAgent};
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Kills during ingest in `cargo test`.
const KILLS_DEFAULT: u32 = 20;
/// Kills one replica takes before the run goes on with a fresh one (restores grow with the
/// journal: this keeps a long soak linear in the number of kills).
const KILLS_PER_REPLICA: u32 = 20;
/// The volume: a few chunks, the last one short.
const VOL: (u32, &str, u64) = (0, "crash-disk", 2 * CHUNK_BYTES + 4608);
/// Batches the agent keeps unacknowledged (the agent's default window).
const WINDOW: u64 = 32;
/// The writes of a batch: 16 to 64 of up to 16 KiB, one in 16 a zero-write.
const WRITES: Mix = Mix {
    count: 16..=64,
    len: 1..=16 << 10,
    kinds: Kinds::RatioZero(16),
};
/// How long the agent streams before the kill, at most.
const STREAM_MS_MAX: u64 = 300;
/// Restores checked after each restart.
const RESTORES_PER_RESTART: usize = 3;
/// The model keeps a whole image every this many seqs and replays writes from there.
const CHECKPOINT_EVERY: u64 = 128;

/// The image of the volume after every seq, kept as checkpoints and the writes in between.
struct Model {
    checkpoints: BTreeMap<u64, Vec<u8>>,
    writes: BTreeMap<u64, Vec<Write>>,
}

impl Model {
    fn image_at(&self, seq: u64) -> Vec<u8> {
        let (&at, image) = self
            .checkpoints
            .range(..=seq)
            .next_back()
            .expect("a checkpoint at or before");
        let mut image = image.clone();
        for (_, writes) in self
            .writes
            .range((Bound::Excluded(at), Bound::Included(seq)))
        {
            for w in writes {
                w.apply(&mut image);
            }
        }
        image
    }
}

/// What the crash test's agent keeps besides the common test agent.
struct Extra {
    model: Model,
    next_seed: u64,
}

/// The agent's side of the run.
type Agent = TestAgent<Extra>;

/// Seals the next batch of random writes and records it in the model.
fn new_batch(agent: &mut Agent) {
    let extra = &mut agent.extra;
    let writes = WRITES.writes(&mut agent.rng, VOL.2, |_| {
        extra.next_seed += 1;
        extra.next_seed
    });
    let ops: Vec<Op> = writes.iter().map(|w| w.op(0)).collect();
    let (seq, _) = agent.sim.batch(&ops, BatchFlags::FLUSH, None);
    agent.extra.model.writes.insert(seq, writes);
    if seq.is_multiple_of(CHECKPOINT_EVERY) {
        agent
            .extra
            .model
            .checkpoints
            .insert(seq, agent.sim.images[&0].clone());
    }
}

/// The checks after a restart (serve has recovered: it answered the hello).
async fn check(root: &Path, out_dir: &Path, agent: &mut Agent, acked_before: u64, durable: u64) {
    agent.check_durable(acked_before, durable);

    // The journal agrees with the catalog.
    let (dir, catalog) = open_catalog(root).await;
    let g = group_row(&catalog, "g").await;
    assert_eq!(g.head_seq.0, durable);
    assert_eq!(catalog.batch_count(g.id).await.expect("count"), durable);
    assert_journal_ends_at_its_commit(&dir, &catalog, "g", &g).await;
    catalog.close().await;

    if durable < agent.synced {
        return;
    }
    // Every point of the window is listed, up to the head.
    let points = cdp_replica::points(root, VOL.1).await.expect("points");
    let seqs: Vec<u64> = points.iter().map(|p| p.seq.0).collect();
    assert_eq!(seqs, (agent.synced..=durable).collect::<Vec<_>>());
    // Restores at random acknowledged points, and the head.
    let mut at: Vec<u64> = (0..RESTORES_PER_RESTART - 1)
        .map(|_| agent.rng.random_range(agent.synced..=durable))
        .collect();
    at.push(durable);
    for seq in at {
        let out = out_dir.join(format!("restore-{seq}"));
        let _ = std::fs::remove_file(&out);
        cdp_replica::restore(root, VOL.1, &PointSpec::Seq(seq), &out)
            .await
            .unwrap_or_else(|e| panic!("restore at seq {seq}: {e}"));
        assert!(
            read(&out) == agent.extra.model.image_at(seq),
            "the restore at seq {seq} differs from the model"
        );
        std::fs::remove_file(&out).expect("remove restored image");
    }
}

/// What one replica's run did.
struct RunStats {
    kills: u32,
    startup_kills: u32,
    batches: u64,
    torn_tails: usize,
}

/// One replica, from `init` to a clean stop, killed `kills` times during ingest.
async fn one_replica(kills: u32, seed: u64) -> RunStats {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("replica");
    let log: PathBuf = tmp.path().join("serve.log");
    let replica_fp = init_replica(&root).await;
    let identity = Identity::generate("crash-agent").expect("identity");
    cdp_replica::authorize(&root, identity.fingerprint(), "crash").expect("authorize");

    let mut rng = StdRng::seed_from_u64(seed);
    let mut sim = AgentSim::new("g", &[VOL]);
    sim.keep_history = false;
    sim.images.insert(0, pattern(rng.random(), VOL.2 as usize));
    let mut batches = Vec::new();
    let synced = sim.sync_volume(0, &mut batches);
    let images = sim.images[&0].clone();
    let mut agent = Agent {
        identity,
        sim,
        acked: 0,
        synced,
        rng,
        extra: Extra {
            model: Model {
                checkpoints: [(synced, images)].into_iter().collect(),
                writes: BTreeMap::new(),
            },
            next_seed: seed % 1000 * 1_000_000,
        },
    };

    let mut listen = FIRST_LISTEN.to_owned();
    let mut done = 0u32;
    let mut startup_kills = 0u32;
    while done < kills {
        // Sometimes the kill lands while serve is starting (recovering its journal).
        if agent
            .maybe_kill_while_starting(&root, &listen, &log, &[], 6, 0..30)
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
            .restart(&root, &mut listen, &log, &[], replica_fp)
            .await;
        check(&root, tmp.path(), &mut agent, acked_before, durable).await;
        // Stream for a random while, then kill -9 mid-ingest.
        agent
            .stream_then_kill(serve, q, WINDOW, 0..=STREAM_MS_MAX, new_batch)
            .await;
        done += 1;
    }

    // A last start: everything sent is acknowledged, and the head restores exactly.
    let Restarted {
        serve,
        mut q,
        acked_before,
        durable,
    } = agent
        .restart(&root, &mut listen, &log, &[], replica_fp)
        .await;
    check(&root, tmp.path(), &mut agent, acked_before, durable).await;
    let last = agent.send_the_rest(&q, new_batch).await;
    q.wait_ack("g", last).await;
    agent.saw_ack(last);
    check(&root, tmp.path(), &mut agent, last, last).await;
    q.conn.close(0u32.into(), b"done");
    drop(q);
    serve.stop_and_wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    RunStats {
        kills: done,
        startup_kills,
        batches: last,
        torn_tails: text.matches("uncommitted bytes from the tail").count(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_nothing_acknowledged() {
    let kills: u32 = std::env::var("CDP_REPLICA_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(KILLS_DEFAULT);
    let seed: u64 = std::env::var("CDP_REPLICA_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("crash test: {kills} kills, seed {seed} (CDP_REPLICA_CRASH_SEED={seed} replays it)");
    let started = std::time::Instant::now();
    let mut left = kills;
    let mut run = 0u64;
    while left > 0 {
        let n = left.min(KILLS_PER_REPLICA);
        let s = one_replica(n, seed.wrapping_add(run)).await;
        eprintln!(
            "crash test, replica {run}: {} kills during ingest and {} during start, {} batches, {} torn segment tails truncated, {} s so far",
            s.kills,
            s.startup_kills,
            s.batches,
            s.torn_tails,
            started.elapsed().as_secs()
        );
        left -= n;
        run += 1;
    }
}
