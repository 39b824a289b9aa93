//! The verifier (DESIGN 3.9): inside `serve`, beside ingest and the trimmer, it compares chunks
//! of the agent's device at a batch boundary seq S with the replica's reconstruction at the
//! same S, stores every result, and turns a difference into an open *mismatch* (the volume is
//! `degraded` in `status`) until a repair resends the chunk from the agent.
//!
//! # One check ([`check_chunk`])
//! 1. Ask the agent of the chunk's group `VerifyRequest { id, group, volume, chunk }` on its
//!    control stream ([`AgentPorts`]). The agent seals a batch boundary, reads the chunk under
//!    its range lock and answers `VerifyReply { seq: S, hash }` (blake3 of the chunk, the last
//!    one over the volume's actual length), or `VerifyRefused { reason }` (the chunk is being
//!    synced or resynced, the group overflowed): outcome `skipped` with the reason (the chunk
//!    comes round again). No agent connected, or the connection lost: nothing is recorded and
//!    the verifier waits. No answer within [`ANSWER_TIMEOUT`]: outcome `timeout`.
//! 2. Wait until the group's durable head reaches S (ingest publishes every group's head
//!    after its commits, [`crate::ingest::IngestService::heads`]: a wait costs no query); not within [`HEAD_WAIT_TIMEOUT`]: outcome `timeout` (not a mismatch).
//! 3. Pin S (`pins`, holder `verifier`; at most [`RECONSTRUCTIONS_AT_ONCE`] checks are in
//!    this step at once) — the trimmer cannot move past it while the chunk is
//!    read — plan the chunk from its records in (base, S] that the image at S reads (newest
//!    first, only until they cover the chunk: a chunk under constant overwrite costs its last
//!    full rewrite, not the whole window), read it from the
//!    target file and the journal on a blocking thread, blake3 it (the last chunk over the
//!    volume's actual length, as the agent does), release the pin. A point outside the window
//!    (trimmed meanwhile): `skipped`.
//! 4. Compare. Equal: `match`. Different: `mismatch`. A journal record that fails its checks
//!    while the chunk is reconstructed is itself a finding: `mismatch` with reason
//!    `journal record damaged: …` (and no replica hash).
//! 5. Store the result (`verify_results`: time, volume, chunk, S, both hashes, outcome,
//!    reason, duration, run). A mismatch also opens a row in `verify_mismatches` (unless the
//!    chunk has one open already), a warning line and an event; with `auto_repair` it also
//!    requests a repair.
//!
//! The sources of a mismatch this catches: a flipped byte in the target file or in a journal
//! record, a journal record lost (its row gone: the reconstruction reads older bytes), and a
//! write the agent applied to its device but never shipped (the agent's bytes differ).
//!
//! # Which chunks ([`choose`]), and how fast
//! The background verifier checks `[verifier] chunks_per_sec` chunks per second (replica.toml,
//! read when serve starts; default 2; 0 turns it off), at most
//! [`BACKGROUND_CHECKS_IN_FLIGHT`] at once, of protecting volumes whose agent is connected.
//! Each round it queues first the *recent* chunks — the distinct chunks of records with seq in
//! (the volume's recent cursor, head] (one range of the `(volume_id, seq)` index), at most
//! [`RECENT_CHUNKS_PER_ROUND_MAX`] per volume, the cursor starting at the head when serve
//! starts — then [`SWEEP_CHUNKS_PER_ROUND`] chunks of the *uniform sweep*: a cursor per volume
//! persisted in `verify_sweep`, so that every chunk is covered over time, across restarts.
//! At 2 chunks per second a check reads 2 MiB per second from the replica's disks and the
//! agent's device: a few percent of ingest at most.
//!
//! # On-demand runs (`cdp-replica verify run`) and repairs (`verify repair`)
//! There is no control socket: the CLI writes a row and serve's verifier polls for them every
//! [`REQUEST_POLL_INTERVAL`].
//! * `verify run` inserts a `verify_runs` row per volume (`requested`, full flag, rate) and
//!   polls it (a progress bar on a terminal). Serve takes it (`running`, with its chunk count):
//!   `--full` checks every chunk of the volume, each at its own S; otherwise a sample of at most
//!   [`SAMPLE_RUN_CHUNKS`]: the chunks written in the window, then the sweep. At most
//!   [`RUN_CHECKS_IN_FLIGHT`] checks at once, not limited by `chunks_per_sec` (the CLI may give
//!   `--rate`). A chunk waits while no agent is connected (the CLI says so once). Progress is
//!   written after every
//!   chunk; the run ends `done` (mismatches are results, not a failure of the run) or
//!   `failed` with a sentence. A run or repair left `running` by a serve that stopped is marked
//!   `failed` when serve starts again. `verify run` refuses at once when serve is not running.
//! * `verify repair` inserts a `repair_requests` row and waits for it (`--timeout`). Serve
//!   sends `RepairRequest` with the volume's open mismatched chunks; the agent marks them
//!   dirty and answers `RepairStarted { seq: R }` (the bytes follow in batches after R, and a
//!   consistent batch ends the resync). Serve waits (at most [`REPAIR_WAIT_TIMEOUT`]) until a
//!   consistent batch C > R is durable, then checks each chunk again; one that matches at a
//!   seq ≥ C is marked repaired (`repaired_ns`, `repaired_seq = C`). The request ends `done`
//!   when every chunk matched, else `failed` with the chunks still wrong.
//!
//! # Bounds
//! Results older than [`RESULTS_KEEP`] (7 days), and beyond the newest
//! [`RESULTS_PER_VOLUME_MAX`] (1,000,000) of a volume, are deleted every [`PRUNE_INTERVAL`].
//! Mismatch rows are kept (they are few, and they are the history of the volume's damage).
//!
//! # Suspect points
//! For a mismatch of chunk C found at seq S, `verify report` names the points whose image of C
//! may hold the bad bytes: every point p with `from_seq ≤ p < before_seq`, where `from_seq` is
//! the first point of the volume's window (an honest over-approximation: a flipped byte of the
//! target file is in every point of the window that does not overwrite it, and the report
//! cannot tell when a byte was flipped), `before_seq` the repair's `repaired_seq` (null while
//! open: every point up to the head). `likely_from_seq` narrows it for the usual cases: the
//! seq of the last journaled write of C at or before S (the damaged record, or the one after
//! which a lost or unshipped write should have come), or the window's first point when C has
//! no record in the window.
//!
//! # `verify report --json`
//! ```json
//! { "since": "2024-05-01T12:00:00Z", "now": "2024-05-02T12:00:00Z",
//!   "volumes": [ {
//!     "group": "db", "volume": "db-data", "size": 8388608, "chunks": 8,
//!     "checks": { "total": 40, "chunks": 8, "match": 39, "mismatch": 1, "skipped": 0,
//!                 "timeout": 0 },
//!     "last_check": "2024-05-02T11:59:58.1Z",
//!     "coverage": { "chunks": 8, "of": 8, "share": 1.0 },
//!     "last_full_pass": "2024-05-02T11:00:00Z",
//!     "open_mismatches": 1,
//!     "mismatches": [ {
//!       "chunk": 3, "offset": 3145728, "length": 1048576, "seq": 57,
//!       "found": "2024-05-02T11:30:00Z", "reason": "the hashes differ",
//!       "agent_hash": "…64 hex…", "replica_hash": "…64 hex…" ,
//!       "repaired": null,
//!       "suspect_points": { "from_seq": 12, "likely_from_seq": 40, "before_seq": null } } ],
//!     "runs": [ { "id": 4, "full": true, "state": "done", "requested": "…", "started": "…",
//!                 "ended": "…", "chunks_total": 8, "chunks_done": 8, "mismatches": 0,
//!                 "skipped": 0, "error": null } ] } ] }
//! ```
//! `since` is the start of the period (default: 24 h before `now`); `checks` counts the
//! results in the period (`chunks`: distinct chunks checked, any outcome); `coverage` is
//! always over the last 24 h: distinct chunks compared (match or mismatch) / the volume's
//! chunks; `last_full_pass` the end of the newest `done` full run (null: none);
//! `mismatches` lists those found in the period and every open one, oldest first;
//! `repaired` is `{ "time": …, "seq": C }` or null; `hash` fields are 64 hex digits
//! (`replica_hash` null when the journal record was damaged); `runs` the runs requested in
//! the period, newest first (at most 20). Times are RFC 3339 UTC.
//!
//! [`check_chunk`]: check::check_chunk

use cdp_shared::types::Seq;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use cdp_shared::wire::REPAIR_CHUNKS_PER_MESSAGE_MAX;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agent_ports::AgentPorts;
use crate::catalog::{Catalog, GroupRow, VerifyOutcome, VolumeRow};
use crate::clock::now_ns;
use crate::datadir::{DataDir, VerifierConfig};
use crate::error::Result;

mod check;
mod cli;
mod report;
mod requests;
mod schedule;

pub use self::cli::{RunProgress, RunSummary, RunVolumeSummary, repair, run};
pub use self::report::{
    ChecksReport, CoverageReport, MismatchReport, REPORT_RUNS_MAX, RepairedReport, RunReport,
    SuspectPoints, VerifyReport, VolumeReport, report,
};
use self::requests::{repair_requests, run_requests};
use self::schedule::background;
pub use self::schedule::choose;

/// How long the agent has to answer a question.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a check waits for the journal to hold the agent's seq.
pub const HEAD_WAIT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a check waits before asking again when no agent is connected.
pub const NO_AGENT_RETRY: Duration = Duration::from_millis(500);
/// How often serve looks for requested runs and repairs (and the CLI at their progress).
pub const REQUEST_POLL_INTERVAL: Duration = Duration::from_millis(250);
/// Checks of the background verifier at once. Most of a check's time under load is the wait
/// for its seq to become durable (the replication lag), which costs nothing, so many wait at
/// once; the agent's answers are bounded by its connection's question slots and the
/// reconstructions by [`RECONSTRUCTIONS_AT_ONCE`].
pub const BACKGROUND_CHECKS_IN_FLIGHT: usize = 128;
/// Chunks read and hashed by the replica at once.
pub const RECONSTRUCTIONS_AT_ONCE: usize = 2;
/// Checks of an on-demand run at once.
pub const RUN_CHECKS_IN_FLIGHT: usize = 4;
/// Recent chunks queued per volume and round.
pub const RECENT_CHUNKS_PER_ROUND_MAX: usize = 64;
/// Sweep chunks queued per volume and round.
pub const SWEEP_CHUNKS_PER_ROUND: u64 = 4;
/// Chunks of a run without `--full`.
pub const SAMPLE_RUN_CHUNKS: u64 = 64;
/// How long a repair waits for the agent's resync to be durable.
pub const REPAIR_WAIT_TIMEOUT: Duration = Duration::from_secs(240);
/// Results kept.
pub const RESULTS_KEEP: Duration = Duration::from_secs(7 * 24 * 3600);
/// Results kept per volume at most.
pub const RESULTS_PER_VOLUME_MAX: u64 = 1_000_000;
/// How often old results are deleted.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(600);
/// The period of `coverage` (kept with the verifier's tables, where metrics read it too).
pub use crate::catalog::COVERAGE_PERIOD;
/// The holder name of the verifier's pins.
pub const PIN_HOLDER: &str = "verifier";

const _: () = assert!(REPAIR_CHUNKS_PER_MESSAGE_MAX >= 1);
const _: () = assert!(RUN_CHECKS_IN_FLIGHT <= crate::agent_ports::QUESTIONS_PER_CONNECTION_MAX);

fn ns(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

struct Ctx {
    dir: DataDir,
    catalog: Catalog,
    ports: AgentPorts,
    config: VerifierConfig,
    token: CancellationToken,
    /// Group id → durable head, published by ingest after its commits.
    heads: watch::Receiver<HashMap<i64, Seq>>,
    /// Reconstructions at once (each reads and hashes a chunk).
    reconstructions: Semaphore,
}

/// A volume to check, with its group.
#[derive(Clone, Debug)]
pub struct Target {
    pub volume: VolumeRow,
    pub group_id: i64,
    pub group: String,
}

/// The result of one check, before it is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub outcome: VerifyOutcome,
    pub seq: Option<Seq>,
    pub agent_hash: Option<String>,
    pub replica_hash: Option<String>,
    pub reason: Option<String>,
}

impl Check {
    fn without_seq(outcome: VerifyOutcome, reason: String) -> Check {
        Check {
            outcome,
            seq: None,
            agent_hash: None,
            replica_hash: None,
            reason: Some(reason),
        }
    }
}

/// Starts the verifier of a serve: the background verifier (unless its budget is 0) and the
/// pollers of requested runs and repairs. It stops when `token` is cancelled; an aborted check
/// loses at most that check (nothing is half-written: each row is one statement).
pub async fn start(
    dir: DataDir,
    catalog: Catalog,
    ports: AgentPorts,
    heads: watch::Receiver<HashMap<i64, Seq>>,
    config: VerifierConfig,
    token: CancellationToken,
) -> Result<JoinHandle<()>> {
    match catalog
        .fail_unfinished_verifier_work("serve stopped before it ended", now_ns())
        .await
    {
        Err(e) if e.is_disk_full() => tracing::warn!("could not end unfinished verifications: {e}"),
        other => other?,
    }
    let ctx = Arc::new(Ctx {
        dir,
        catalog,
        ports,
        config,
        token,
        heads,
        reconstructions: Semaphore::new(RECONSTRUCTIONS_AT_ONCE),
    });
    Ok(tokio::spawn(async move {
        let tasks = TaskTracker::new();
        if ctx.config.chunks_per_sec > 0.0 {
            tasks.spawn(background(ctx.clone()));
        }
        tasks.spawn(run_requests(ctx.clone()));
        tasks.spawn(repair_requests(ctx.clone()));
        tasks.close();
        tasks.wait().await;
    }))
}

fn window_floor(g: &GroupRow, v: &VolumeRow) -> Seq {
    g.window_floor().max(v.sync_done_seq.unwrap_or(Seq::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{MismatchRow, NewVerifyResult, OpenMode};
    use crate::retention::Retention;
    use cdp_shared::types::CHUNK_BYTES;

    fn result(volume_id: i64, chunk: u64, time_ns: i64, outcome: VerifyOutcome) -> NewVerifyResult {
        NewVerifyResult {
            time_ns,
            volume_id,
            chunk,
            seq: Some(Seq(1)),
            agent_hash: None,
            replica_hash: None,
            outcome,
            reason: None,
            duration_us: 10,
            run_id: None,
        }
    }

    #[tokio::test]
    async fn results_are_counted_bounded_and_mismatches_open_once() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let catalog = Catalog::open(&tmp.path().join("meta.db"), OpenMode::Create)
            .await
            .expect("catalog");
        let g = catalog
            .create_group("g", "owner", "gen", Seq(0), &Retention::default(), 0)
            .await
            .expect("group");
        let v = catalog
            .insert_volume(g.id, 0, "v", 4 * CHUNK_BYTES)
            .await
            .expect("volume");
        // 10 results at times 100..110: chunks 0..5 twice, one mismatch, one skipped.
        for i in 0..10u64 {
            let outcome = match i {
                3 => VerifyOutcome::Mismatch,
                4 => VerifyOutcome::Skipped,
                _ => VerifyOutcome::Match,
            };
            catalog
                .insert_verify_result(&result(v.id, i % 5, 100 + i as i64, outcome))
                .await
                .expect("insert");
        }
        let c = catalog.verify_counts(v.id, 0).await.expect("counts");
        assert_eq!(
            (
                c.checks,
                c.chunks,
                c.matches,
                c.mismatches,
                c.skipped,
                c.last_ns
            ),
            (10, 5, 8, 1, 1, Some(109))
        );
        // Compared since 105: chunks 0..5 at 105..110, but 4 was skipped at 104 only.
        assert_eq!(
            catalog.chunks_compared_since(v.id, 105).await.expect("n"),
            5
        );
        assert_eq!(
            catalog.chunks_compared_since(v.id, 108).await.expect("n"),
            2
        );
        // Older than 102 go, then all but the newest 4.
        assert_eq!(
            catalog.prune_verify_results(102, 100).await.expect("prune"),
            2
        );
        assert_eq!(catalog.prune_verify_results(0, 4).await.expect("prune"), 4);
        let c = catalog.verify_counts(v.id, 0).await.expect("counts");
        assert_eq!((c.checks, c.last_ns), (4, Some(109)));

        // A run its command ended before serve took it is not started; a requested one is,
        // once, and its progress is recorded only while it runs.
        let stopped = catalog
            .insert_verify_run(v.id, true, None, 4, 1)
            .await
            .expect("run");
        catalog
            .finish_verify_run(stopped, Some("stopped"), 2)
            .await
            .expect("finish");
        assert!(
            !catalog
                .start_verify_run(stopped, 4, 3)
                .await
                .expect("start")
        );
        let row = catalog
            .verify_run(stopped)
            .await
            .expect("read")
            .expect("row");
        assert_eq!(row.state, "failed");
        let run = catalog
            .insert_verify_run(v.id, true, None, 4, 4)
            .await
            .expect("run");
        assert!(catalog.start_verify_run(run, 4, 5).await.expect("start"));
        assert!(!catalog.start_verify_run(run, 4, 6).await.expect("start"));
        assert!(
            catalog
                .verify_run_progress(run, 1, 0, 0)
                .await
                .expect("progress")
        );
        catalog
            .finish_verify_run(run, Some("stopped"), 7)
            .await
            .expect("finish");
        assert!(
            !catalog
                .verify_run_progress(run, 2, 0, 0)
                .await
                .expect("progress")
        );

        let m = MismatchRow {
            id: 0,
            volume_id: v.id,
            chunk: 2,
            seq: Seq(7),
            found_ns: 50,
            reason: "the hashes differ".into(),
            agent_hash: "a".into(),
            replica_hash: Some("b".into()),
            repaired_ns: None,
            repaired_seq: None,
        };
        assert!(catalog.insert_mismatch(&m).await.expect("insert"));
        assert!(
            !catalog.insert_mismatch(&m).await.expect("insert"),
            "one open row per chunk"
        );
        let open = catalog.open_mismatches(v.id).await.expect("open");
        assert_eq!(open.len(), 1);
        catalog
            .mark_repaired(open[0].id, 60, Seq(9))
            .await
            .expect("repair");
        assert!(
            catalog
                .open_mismatches(v.id)
                .await
                .expect("open")
                .is_empty()
        );
        // Repaired, it is still reported (found in the period), with its repair.
        let listed = catalog.mismatches_for_report(v.id, 0).await.expect("list");
        assert_eq!(
            (listed[0].repaired_ns, listed[0].repaired_seq),
            (Some(60), Some(Seq(9)))
        );
        assert!(
            catalog
                .mismatches_for_report(v.id, 51)
                .await
                .expect("list")
                .is_empty()
        );
        // Found again later: a new open row.
        assert!(catalog.insert_mismatch(&m).await.expect("insert"));
        catalog.close().await;
    }
}
