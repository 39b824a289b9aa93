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
//! 2. Wait until the group's durable head (the catalog's `head_seq`, read every
//!    [`HEAD_POLL_INTERVAL`] by one task, [`poll_heads`], for all the checks that wait)
//!    reaches S; not within [`HEAD_WAIT_TIMEOUT`]: outcome `timeout` (not a mismatch).
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

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cdp_shared::point::PointSpec;
use cdp_shared::types::CHUNK_BYTES;
use cdp_shared::wire::{Control, REPAIR_CHUNKS_PER_MESSAGE_MAX};
use serde::Serialize;
use tokio::sync::{Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::catalog::{
    Catalog, EventLevel, GroupRow, MismatchRow, NewVerifyResult, OpenMode, RunRow, VerifyOutcome,
    VolumeRow, VolumeState,
};
use crate::datadir::{DataDir, ServeLock, VerifierConfig};
use crate::error::{ReplicaError, Result};
use crate::hashes::chunk_count;
use crate::now_ns;
use crate::pins::{PinAt, pin_in};
use crate::recovery::{rfc3339, time_of};
use crate::server::{AgentPorts, Asked};

/// How long the agent has to answer a question.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a check waits for the journal to hold the agent's seq.
pub const HEAD_WAIT_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the group's head is read while waiting for it.
pub const HEAD_POLL_INTERVAL: Duration = Duration::from_millis(10);
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
/// The period of `coverage`.
pub const COVERAGE_PERIOD: Duration = Duration::from_secs(24 * 3600);
/// The holder name of the verifier's pins.
pub const PIN_HOLDER: &str = "verifier";

const _: () = assert!(REPAIR_CHUNKS_PER_MESSAGE_MAX >= 1);
const _: () = assert!(RUN_CHECKS_IN_FLIGHT <= crate::server::QUESTIONS_PER_CONNECTION_MAX);

fn ns(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

struct Ctx {
    dir: DataDir,
    catalog: Catalog,
    ports: AgentPorts,
    config: VerifierConfig,
    token: CancellationToken,
    /// Group id → durable head, published by [`poll_heads`] while checks wait on it.
    heads: watch::Sender<HashMap<i64, u64>>,
    /// Reconstructions at once (each reads and hashes a chunk).
    reconstructions: Semaphore,
}

/// Reads every group's durable head from the catalog each [`HEAD_POLL_INTERVAL`] while a
/// check waits on one, and publishes it: one query per interval however many checks wait.
async fn poll_heads(ctx: Arc<Ctx>) {
    loop {
        tokio::select! {
            _ = ctx.token.cancelled() => return,
            _ = tokio::time::sleep(HEAD_POLL_INTERVAL) => {}
        }
        if ctx.heads.receiver_count() == 0 {
            continue;
        }
        match ctx.catalog.groups().await {
            Ok(groups) => {
                ctx.heads.send_if_modified(|heads| {
                    let mut changed = false;
                    for g in &groups {
                        if heads.insert(g.id, g.head_seq) != Some(g.head_seq) {
                            changed = true;
                        }
                    }
                    changed
                });
            }
            Err(e) => tracing::warn!("the verifier could not read the groups' heads: {e}"),
        }
    }
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
    pub seq: Option<u64>,
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
        heads: watch::Sender::new(HashMap::new()),
        reconstructions: Semaphore::new(RECONSTRUCTIONS_AT_ONCE),
    });
    Ok(tokio::spawn(async move {
        let tasks = TaskTracker::new();
        tasks.spawn(poll_heads(ctx.clone()));
        if ctx.config.chunks_per_sec > 0.0 {
            tasks.spawn(background(ctx.clone()));
        }
        tasks.spawn(run_requests(ctx.clone()));
        tasks.spawn(repair_requests(ctx.clone()));
        tasks.close();
        tasks.wait().await;
    }))
}

/// Checks one chunk (steps 1–4 of the module docs). `Ok(None)`: no agent connected (or the
/// connection was lost, or serve is stopping) — nothing to record, try again later.
async fn check_chunk(ctx: &Ctx, t: &Target, chunk: u64) -> Result<Option<Check>> {
    let Ctx {
        dir,
        catalog,
        ports,
        heads,
        reconstructions,
        token,
        ..
    } = ctx;
    let asked = ports
        .ask(
            t.group_id,
            |id| Control::VerifyRequest {
                id,
                group: t.group.clone(),
                volume: t.volume.agent_volume_id,
                chunk,
            },
            ANSWER_TIMEOUT,
        )
        .await;
    let (seq, agent_hash) = match asked {
        Asked::NoAgent | Asked::Lost => return Ok(None),
        Asked::Timeout => {
            return Ok(Some(Check::without_seq(
                VerifyOutcome::Timeout,
                format!(
                    "the agent did not answer within {} s",
                    ANSWER_TIMEOUT.as_secs()
                ),
            )));
        }
        Asked::Answer(Control::VerifyRefused { reason, .. }) => {
            return Ok(Some(Check::without_seq(VerifyOutcome::Skipped, reason)));
        }
        Asked::Answer(Control::VerifyReply { seq, hash, .. }) => (seq, hash),
        Asked::Answer(other) => {
            return Ok(Some(Check::without_seq(
                VerifyOutcome::Skipped,
                format!("the agent answered with {other:?}"),
            )));
        }
    };
    let with_seq = |outcome, replica_hash: Option<String>, reason: Option<String>| Check {
        outcome,
        seq: Some(seq),
        agent_hash: Some(agent_hash.clone()),
        replica_hash,
        reason,
    };
    // 2. The journal must hold S.
    let deadline = tokio::time::Instant::now() + HEAD_WAIT_TIMEOUT;
    let mut heads = heads.subscribe();
    let mut head = catalog.head(t.group_id).await?;
    while head < seq {
        tokio::select! {
            _ = token.cancelled() => return Ok(None),
            changed = heads.changed() => {
                if changed.is_err() {
                    return Ok(None);
                }
                head = head.max(heads.borrow_and_update().get(&t.group_id).copied().unwrap_or(0));
            }
            _ = tokio::time::sleep_until(deadline) => {
                return Ok(Some(with_seq(
                    VerifyOutcome::Timeout,
                    None,
                    Some(format!(
                        "the journal did not reach seq {seq} within {} s (durable up to {head})",
                        HEAD_WAIT_TIMEOUT.as_secs()
                    )),
                )));
            }
        }
    }
    // 3. Pin S and reconstruct the chunk (at most RECONSTRUCTIONS_AT_ONCE at once).
    let _slot = tokio::select! {
        _ = token.cancelled() => return Ok(None),
        s = reconstructions.acquire() => match s {
            Ok(s) => s,
            Err(_) => return Ok(None),
        },
    };
    let spec = PointSpec::Seq(seq);
    let (_, pin) = match pin_in(
        dir,
        catalog,
        &t.volume.name,
        PinAt::Spec(&spec),
        PIN_HOLDER,
        false,
    )
    .await
    {
        Ok(p) => p,
        Err(ReplicaError::Point(reason)) => {
            return Ok(Some(with_seq(VerifyOutcome::Skipped, None, Some(reason))));
        }
        Err(e) => return Err(e),
    };
    let hashed = replica_hash(&pin, chunk).await;
    let held = pin.check_held().await;
    let _ = pin.release().await;
    // 4. Compare.
    let check = match hashed {
        Ok(h) if held.is_err() => with_seq(
            VerifyOutcome::Skipped,
            Some(h),
            Some(format!(
                "the pin on seq {seq} was lost while the chunk was read"
            )),
        ),
        Ok(h) if h == agent_hash => with_seq(VerifyOutcome::Match, Some(h), None),
        Ok(h) => with_seq(
            VerifyOutcome::Mismatch,
            Some(h),
            Some("the hashes differ".into()),
        ),
        Err(ReplicaError::JournalCorrupt(what)) => with_seq(
            VerifyOutcome::Mismatch,
            None,
            Some(format!("journal record damaged: {what}")),
        ),
        Err(e) => return Err(e),
    };
    Ok(Some(check))
}

/// blake3 (hex) of `chunk` of the pinned image (the last chunk over the volume's length).
async fn replica_hash(pin: &crate::PinGuard, chunk: u64) -> Result<String> {
    let size = pin.volume_row().size;
    let offset = chunk.saturating_mul(CHUNK_BYTES);
    if offset >= size {
        return Err(ReplicaError::Verify(format!(
            "chunk {chunk} is past the end of volume {}",
            pin.volume_row().name
        )));
    }
    let mut reader = pin.open_image_chunks(chunk..chunk + 1).await?;
    let len = usize::try_from((size - offset).min(CHUNK_BYTES)).unwrap_or(0);
    tokio::task::spawn_blocking(move || -> Result<String> {
        let mut buf = vec![0u8; len];
        reader.read_at(offset, &mut buf)?;
        Ok(blake3::hash(&buf).to_hex().to_string())
    })
    .await?
}

/// Stores a check (step 5). Returns true when it opened a new mismatch.
async fn record(
    ctx: &Ctx,
    t: &Target,
    chunk: u64,
    check: &Check,
    duration: Duration,
    run_id: Option<i64>,
) -> Result<bool> {
    let now = now_ns();
    ctx.catalog
        .insert_verify_result(&NewVerifyResult {
            time_ns: now,
            volume_id: t.volume.id,
            chunk,
            seq: check.seq,
            agent_hash: check.agent_hash.clone(),
            replica_hash: check.replica_hash.clone(),
            outcome: check.outcome,
            reason: check.reason.clone(),
            duration_us: u64::try_from(duration.as_micros()).unwrap_or(u64::MAX),
            run_id,
        })
        .await?;
    match check.outcome {
        VerifyOutcome::Mismatch => {}
        VerifyOutcome::Skipped | VerifyOutcome::Timeout => {
            tracing::debug!(volume = %t.volume.name, chunk, "verification {}: {}", check.outcome.as_str(), check.reason.as_deref().unwrap_or(""));
            return Ok(false);
        }
        VerifyOutcome::Match => return Ok(false),
    }
    let seq = check.seq.unwrap_or(0);
    let reason = check.reason.clone().unwrap_or_default();
    let new = ctx
        .catalog
        .insert_mismatch(&MismatchRow {
            id: 0,
            volume_id: t.volume.id,
            chunk,
            seq,
            found_ns: now,
            reason: reason.clone(),
            agent_hash: check.agent_hash.clone().unwrap_or_default(),
            replica_hash: check.replica_hash.clone(),
            repaired_ns: None,
            repaired_seq: None,
        })
        .await?;
    if new {
        let msg = format!(
            "verification MISMATCH: volume {} chunk {chunk} at seq {seq}: {reason}; run `cdp-replica verify repair --volume {}`",
            t.volume.name, t.volume.name
        );
        tracing::warn!("{msg}");
        if let Err(e) = ctx
            .catalog
            .event(
                EventLevel::Warn,
                Some(&t.group),
                Some(&t.volume.name),
                &msg,
                now,
            )
            .await
        {
            tracing::warn!("could not record an event: {e}");
        }
        if ctx.config.auto_repair && !ctx.catalog.repair_pending(t.volume.id).await? {
            ctx.catalog.insert_repair_request(t.volume.id, now).await?;
            tracing::info!(volume = %t.volume.name, "repair requested automatically");
        }
    }
    Ok(new)
}

/// Checks a chunk until an outcome is known (waiting while no agent is connected) and stores
/// it. `None` when serve stops first.
async fn check_and_record(
    ctx: Arc<Ctx>,
    t: Arc<Target>,
    chunk: u64,
    run_id: Option<i64>,
    wait_for_agent: bool,
) -> Result<Option<Check>> {
    loop {
        let started = Instant::now();
        match check_chunk(&ctx, &t, chunk).await? {
            Some(check) => {
                record(&ctx, &t, chunk, &check, started.elapsed(), run_id).await?;
                return Ok(Some(check));
            }
            None if wait_for_agent && !ctx.token.is_cancelled() => {
                tokio::select! {
                    _ = ctx.token.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(NO_AGENT_RETRY) => {}
                }
            }
            None => return Ok(None),
        }
    }
}

/// The background verifier: `chunks_per_sec` checks per second of chunks from [`choose`].
async fn background(ctx: Arc<Ctx>) {
    let period = Duration::from_secs_f64(1.0 / ctx.config.chunks_per_sec);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut queue: VecDeque<(Arc<Target>, u64)> = VecDeque::new();
    let mut cursors: HashMap<i64, u64> = HashMap::new();
    let mut jobs: JoinSet<()> = JoinSet::new();
    let mut last_prune: Option<Instant> = None;
    'outer: loop {
        tokio::select! {
            _ = ctx.token.cancelled() => break,
            _ = tick.tick() => {}
        }
        while jobs.len() >= BACKGROUND_CHECKS_IN_FLIGHT {
            tokio::select! {
                _ = ctx.token.cancelled() => break 'outer,
                _ = jobs.join_next() => {}
            }
        }
        if last_prune.is_none_or(|t| t.elapsed() >= PRUNE_INTERVAL) {
            last_prune = Some(Instant::now());
            match ctx
                .catalog
                .prune_verify_results(now_ns() - ns(RESULTS_KEEP), RESULTS_PER_VOLUME_MAX)
                .await
            {
                Ok(0) => {}
                Ok(n) => tracing::debug!("deleted {n} old verification results"),
                Err(e) => tracing::warn!("could not delete old verification results: {e}"),
            }
        }
        if queue.is_empty() {
            match choose(&ctx.catalog, &ctx.ports, &mut cursors).await {
                Ok(q) => queue = q,
                Err(e) => tracing::warn!("the verifier could not choose chunks: {e}"),
            }
        }
        let Some((t, chunk)) = queue.pop_front() else {
            continue;
        };
        let ctx = ctx.clone();
        jobs.spawn(async move {
            let name = t.volume.name.clone();
            if let Err(e) = check_and_record(ctx, t, chunk, None, false).await {
                tracing::warn!(volume = %name, chunk, "verification failed: {e}");
            }
        });
    }
    jobs.shutdown().await;
}

/// The next round of the background verifier: for each protecting volume whose agent is
/// connected, its recent chunks, then its next sweep chunks (see the module docs).
/// `cursors`: volume id → the seq up to which its recent chunks were queued.
pub async fn choose(
    catalog: &Catalog,
    ports: &AgentPorts,
    cursors: &mut HashMap<i64, u64>,
) -> Result<VecDeque<(Arc<Target>, u64)>> {
    let mut recent = VecDeque::new();
    let mut sweep = VecDeque::new();
    for g in catalog.groups().await? {
        if !ports.connected(g.id) {
            continue;
        }
        for v in catalog.volumes_of_group(g.id).await? {
            if v.state != VolumeState::Protecting {
                continue;
            }
            let n = chunk_count(v.size);
            if n == 0 {
                continue;
            }
            let t = Arc::new(Target {
                volume: v.clone(),
                group_id: g.id,
                group: g.name.clone(),
            });
            let cursor = cursors.entry(v.id).or_insert(g.head_seq);
            let after = (*cursor).max(window_floor(&g, &v));
            if g.head_seq > after {
                for c in catalog
                    .chunks_changed(v.id, after, g.head_seq)
                    .await?
                    .into_iter()
                    .take(RECENT_CHUNKS_PER_ROUND_MAX)
                {
                    recent.push_back((t.clone(), c));
                }
            }
            *cursor = g.head_seq;
            let next = catalog.sweep_next(v.id).await? % n;
            let k = SWEEP_CHUNKS_PER_ROUND.min(n);
            for i in 0..k {
                sweep.push_back((t.clone(), (next + i) % n));
            }
            catalog.set_sweep_next(v.id, (next + k) % n).await?;
        }
    }
    recent.extend(sweep);
    Ok(recent)
}

fn window_floor(g: &GroupRow, v: &VolumeRow) -> u64 {
    g.window_floor().max(v.sync_done_seq.unwrap_or(0))
}

async fn target_of(catalog: &Catalog, volume_id: i64) -> Result<Option<(Target, GroupRow)>> {
    let Some(v) = catalog
        .volumes()
        .await?
        .into_iter()
        .find(|v| v.id == volume_id)
    else {
        return Ok(None);
    };
    let g = catalog.group_by_id(v.group_id).await?;
    Ok(Some((
        Target {
            volume: v,
            group_id: g.id,
            group: g.name.clone(),
        },
        g,
    )))
}

/// Takes requested runs, one at a time.
async fn run_requests(ctx: Arc<Ctx>) {
    loop {
        tokio::select! {
            _ = ctx.token.cancelled() => return,
            _ = tokio::time::sleep(REQUEST_POLL_INTERVAL) => {}
        }
        let runs = match ctx.catalog.verify_runs_in_state("requested").await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("could not read requested verification runs: {e}");
                continue;
            }
        };
        for run in runs {
            let result = do_run(&ctx, &run).await;
            let error = match result {
                Ok(()) => None,
                Err(e) => Some(e.to_string()),
            };
            if ctx.token.is_cancelled() {
                let _ = ctx
                    .catalog
                    .finish_verify_run(run.id, Some("serve stopped during the run"), now_ns())
                    .await;
                return;
            }
            if let Some(e) = &error {
                tracing::warn!(run = run.id, "verification run failed: {e}");
            }
            if let Err(e) = ctx
                .catalog
                .finish_verify_run(run.id, error.as_deref(), now_ns())
                .await
            {
                tracing::warn!(run = run.id, "could not end a verification run: {e}");
            }
        }
    }
}

/// One on-demand run (see the module docs).
async fn do_run(ctx: &Arc<Ctx>, run: &RunRow) -> Result<()> {
    let Some((t, g)) = target_of(&ctx.catalog, run.volume_id).await? else {
        return Err(ReplicaError::Verify(
            "the volume of the run no longer exists".into(),
        ));
    };
    if t.volume.state != VolumeState::Protecting {
        return Err(ReplicaError::Verify(format!(
            "volume {} is {}, not protecting: there is nothing to verify until its initial sync completes",
            t.volume.name,
            t.volume.state.as_str()
        )));
    }
    let n = chunk_count(t.volume.size);
    let chunks: Vec<u64> = if run.full {
        (0..n).collect()
    } else {
        let want = SAMPLE_RUN_CHUNKS.min(n);
        let mut set: BTreeSet<u64> = BTreeSet::new();
        let mut list = Vec::new();
        for c in ctx
            .catalog
            .chunks_changed(t.volume.id, window_floor(&g, &t.volume), g.head_seq)
            .await?
        {
            if list.len() as u64 >= want {
                break;
            }
            set.insert(c);
            list.push(c);
        }
        let mut next = ctx.catalog.sweep_next(t.volume.id).await? % n;
        while (list.len() as u64) < want {
            if set.insert(next) {
                list.push(next);
            }
            next = (next + 1) % n;
        }
        ctx.catalog.set_sweep_next(t.volume.id, next).await?;
        list
    };
    if !ctx
        .catalog
        .start_verify_run(run.id, chunks.len() as u64, now_ns())
        .await?
    {
        // Ended by its command before serve took it (`verify run --timeout`).
        return Ok(());
    }
    tracing::info!(run = run.id, volume = %t.volume.name, chunks = chunks.len(), full = run.full, "verification run started");
    let t = Arc::new(t);
    let mut pace = run
        .rate_per_sec
        .filter(|r| *r > 0.0)
        .map(|r| tokio::time::interval(Duration::from_secs_f64(1.0 / r)));
    let mut jobs: JoinSet<Result<Option<Check>>> = JoinSet::new();
    let (mut done, mut mismatches, mut skipped) = (0u64, 0u64, 0u64);
    let mut pending = chunks.into_iter();
    loop {
        while jobs.len() < RUN_CHECKS_IN_FLIGHT {
            let Some(chunk) = pending.next() else { break };
            if let Some(p) = pace.as_mut() {
                tokio::select! {
                    _ = ctx.token.cancelled() => return Ok(()),
                    _ = p.tick() => {}
                }
            }
            jobs.spawn(check_and_record(
                ctx.clone(),
                t.clone(),
                chunk,
                Some(run.id),
                true,
            ));
        }
        let joined = tokio::select! {
            _ = ctx.token.cancelled() => return Ok(()),
            j = jobs.join_next() => j,
        };
        let Some(joined) = joined else { break };
        match joined?? {
            Some(check) => {
                done += 1;
                match check.outcome {
                    VerifyOutcome::Mismatch => mismatches += 1,
                    VerifyOutcome::Skipped | VerifyOutcome::Timeout => skipped += 1,
                    VerifyOutcome::Match => {}
                }
            }
            None => return Ok(()),
        }
        if !ctx
            .catalog
            .verify_run_progress(run.id, done, mismatches, skipped)
            .await?
        {
            // Ended from outside (`verify run --timeout`): let the checks under way record
            // their results, start no more.
            tracing::info!(run = run.id, volume = %t.volume.name, done, "verification run stopped by its command");
            while jobs.join_next().await.is_some() {}
            return Ok(());
        }
    }
    tracing::info!(run = run.id, volume = %t.volume.name, done, mismatches, skipped, "verification run done");
    Ok(())
}

/// Takes requested repairs, one at a time.
async fn repair_requests(ctx: Arc<Ctx>) {
    loop {
        tokio::select! {
            _ = ctx.token.cancelled() => return,
            _ = tokio::time::sleep(REQUEST_POLL_INTERVAL) => {}
        }
        let reqs = match ctx.catalog.repair_requests_in_state("requested").await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("could not read repair requests: {e}");
                continue;
            }
        };
        for req in reqs {
            if let Err(e) = ctx
                .catalog
                .set_repair_state(req.id, "running", None, now_ns())
                .await
            {
                tracing::warn!("could not start a repair: {e}");
                continue;
            }
            let (state, message) = match do_repair(&ctx, req.volume_id).await {
                Ok(Ok(m)) => ("done", m),
                Ok(Err(m)) => ("failed", m),
                Err(e) => ("failed", e.to_string()),
            };
            if ctx.token.is_cancelled() {
                let _ = ctx
                    .catalog
                    .set_repair_state(
                        req.id,
                        "failed",
                        Some("serve stopped during the repair"),
                        now_ns(),
                    )
                    .await;
                return;
            }
            tracing::info!(repair = req.id, "repair {state}: {message}");
            if let Err(e) = ctx
                .catalog
                .set_repair_state(req.id, state, Some(&message), now_ns())
                .await
            {
                tracing::warn!("could not end a repair: {e}");
            }
        }
    }
}

/// One repair (see the module docs): `Ok(Ok(message))` done, `Ok(Err(message))` failed.
async fn do_repair(ctx: &Arc<Ctx>, volume_id: i64) -> Result<std::result::Result<String, String>> {
    let Some((t, _)) = target_of(&ctx.catalog, volume_id).await? else {
        return Ok(Err("the volume no longer exists".into()));
    };
    let open = ctx.catalog.open_mismatches(volume_id).await?;
    if open.is_empty() {
        return Ok(Ok(format!(
            "volume {} has no open mismatch: nothing to repair",
            t.volume.name
        )));
    }
    let deadline = Instant::now() + REPAIR_WAIT_TIMEOUT;
    let chunks: Vec<u64> = open
        .iter()
        .map(|m| m.chunk)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    // Ask the agent to resend them; R is the newest seq it named.
    let mut started = 0u64;
    for part in chunks.chunks(REPAIR_CHUNKS_PER_MESSAGE_MAX) {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Err(format!(
                    "no agent of group {} connected within {} s to resend the chunks",
                    t.group,
                    REPAIR_WAIT_TIMEOUT.as_secs()
                )));
            }
            let asked = ctx
                .ports
                .ask(
                    t.group_id,
                    |id| Control::RepairRequest {
                        id,
                        group: t.group.clone(),
                        volume: t.volume.agent_volume_id,
                        chunks: part.to_vec(),
                    },
                    left.min(ANSWER_TIMEOUT),
                )
                .await;
            match asked {
                Asked::Answer(Control::RepairStarted { seq, .. }) => {
                    started = started.max(seq);
                    break;
                }
                Asked::Answer(Control::RepairRefused { reason, .. }) => {
                    return Ok(Err(format!("the agent refused the repair: {reason}")));
                }
                Asked::Answer(other) => {
                    return Ok(Err(format!("the agent answered the repair with {other:?}")));
                }
                Asked::NoAgent | Asked::Lost | Asked::Timeout => {
                    tokio::select! {
                        _ = ctx.token.cancelled() => return Ok(Err("serve stopped".into())),
                        _ = tokio::time::sleep(NO_AGENT_RETRY) => {}
                    }
                }
            }
        }
    }
    tracing::info!(volume = %t.volume.name, chunks = chunks.len(), after = started, "the agent resends the mismatched chunks");
    // The resync is durable once a consistent batch after R is.
    let consistent = loop {
        let head = ctx.catalog.head(t.group_id).await?;
        if head > started
            && let Some(b) = ctx
                .catalog
                .consistent_batch(t.group_id, started + 1, head, None, false)
                .await?
        {
            break b.seq;
        }
        if Instant::now() >= deadline {
            return Ok(Err(format!(
                "the agent's resend of {} chunks did not complete within {} s (no consistent point after seq {started})",
                chunks.len(),
                REPAIR_WAIT_TIMEOUT.as_secs()
            )));
        }
        tokio::select! {
            _ = ctx.token.cancelled() => return Ok(Err("serve stopped".into())),
            _ = tokio::time::sleep(HEAD_POLL_INTERVAL * 5) => {}
        }
    };
    // Check each chunk again.
    let t = Arc::new(t);
    let mut still = Vec::new();
    for m in &open {
        let outcome = loop {
            let check = check_and_record(ctx.clone(), t.clone(), m.chunk, None, true).await?;
            match check {
                None => return Ok(Err("serve stopped".into())),
                Some(c)
                    if matches!(c.outcome, VerifyOutcome::Skipped | VerifyOutcome::Timeout)
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(NO_AGENT_RETRY).await;
                }
                Some(c) => break c,
            }
        };
        if outcome.outcome == VerifyOutcome::Match && outcome.seq.unwrap_or(0) >= consistent {
            ctx.catalog
                .mark_repaired(m.id, now_ns(), consistent)
                .await?;
        } else {
            still.push(format!(
                "chunk {} ({})",
                m.chunk,
                outcome
                    .reason
                    .as_deref()
                    .unwrap_or(outcome.outcome.as_str())
            ));
        }
    }
    let repaired = open.len() - still.len();
    let msg = format!(
        "repaired {repaired} of {} mismatched chunks of volume {} (good from seq {consistent} on)",
        open.len(),
        t.volume.name
    );
    let level = if still.is_empty() {
        EventLevel::Info
    } else {
        EventLevel::Warn
    };
    if let Err(e) = ctx
        .catalog
        .event(level, Some(&t.group), Some(&t.volume.name), &msg, now_ns())
        .await
    {
        tracing::warn!("could not record an event: {e}");
    }
    if still.is_empty() {
        Ok(Ok(msg))
    } else {
        Ok(Err(format!("{msg}; still wrong: {}", still.join(", "))))
    }
}

// ---- the CLI side ----

/// Progress of on-demand runs, for a progress bar.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunProgress {
    pub chunks_total: u64,
    pub chunks_done: u64,
    pub mismatches: u64,
    /// Whether a run that is not over waits for the agent of its group to connect.
    pub waiting_for_agent: bool,
}

/// How the runs of one `verify run` ended.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunSummary {
    pub volumes: Vec<RunVolumeSummary>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunVolumeSummary {
    pub volume: String,
    pub run_id: i64,
    pub state: String,
    pub chunks_total: u64,
    pub chunks_done: u64,
    pub mismatches: u64,
    pub skipped: u64,
    pub error: Option<String>,
}

fn serving(dir: &DataDir, command: &'static str) -> Result<()> {
    if ServeLock::is_held(dir)? {
        Ok(())
    } else {
        Err(ReplicaError::NotServing {
            dir: dir.root().to_path_buf(),
            command,
        })
    }
}

async fn volumes_named(
    catalog: &Catalog,
    root: &Path,
    volume: Option<&str>,
) -> Result<Vec<VolumeRow>> {
    match volume {
        Some(name) => match catalog.volume_by_name(name).await? {
            Some(v) => Ok(vec![v]),
            None => Err(ReplicaError::UnknownVolume {
                volume: name.to_owned(),
                dir: root.to_path_buf(),
            }),
        },
        None => catalog.volumes().await,
    }
}

/// `verify run`: asks the running serve to verify `volume` (every protecting volume when
/// `None`), a sample or every chunk (`full`), at most `rate` chunks per second, and waits
/// until it is done, calling `progress` as it goes.
pub async fn run(
    root: &Path,
    volume: Option<&str>,
    full: bool,
    rate: Option<f64>,
    timeout: Option<Duration>,
    mut progress: impl FnMut(RunProgress),
) -> Result<RunSummary> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let dir = DataDir::existing(root)?;
    serving(&dir, "verify run")?;
    let catalog = Catalog::open(&dir.catalog(), OpenMode::Existing).await?;
    let result = async {
        let mut volumes = volumes_named(&catalog, root, volume).await?;
        if volume.is_none() {
            volumes.retain(|v| v.state == VolumeState::Protecting);
        }
        if volumes.is_empty() {
            return Err(ReplicaError::Verify(
                "no volume is protecting yet: there is nothing to verify".into(),
            ));
        }
        let mut ids = Vec::new();
        let mut groups = Vec::new();
        for v in &volumes {
            let total = if full {
                chunk_count(v.size)
            } else {
                SAMPLE_RUN_CHUNKS.min(chunk_count(v.size))
            };
            groups.push(v.group_id);
            ids.push((
                v.name.clone(),
                catalog
                    .insert_verify_run(v.id, full, rate, total, now_ns())
                    .await?,
            ));
        }
        loop {
            let mut rows = Vec::new();
            for (name, id) in &ids {
                let row = catalog.verify_run(*id).await?.ok_or_else(|| {
                    ReplicaError::Verify(format!("the verification run {id} disappeared"))
                })?;
                rows.push((name.clone(), row));
            }
            let mut waiting_for_agent = false;
            for ((_, r), g) in rows.iter().zip(&groups) {
                if r.state == "requested" || r.state == "running" {
                    waiting_for_agent |= !catalog.link(*g).await?.is_some_and(|l| l.connected);
                }
            }
            progress(RunProgress {
                chunks_total: rows.iter().map(|(_, r)| r.chunks_total).sum(),
                chunks_done: rows.iter().map(|(_, r)| r.chunks_done).sum(),
                mismatches: rows.iter().map(|(_, r)| r.mismatches).sum(),
                waiting_for_agent,
            });
            if rows.iter().all(|(_, r)| r.state == "done" || r.state == "failed") {
                return Ok(RunSummary {
                    volumes: rows
                        .into_iter()
                        .map(|(volume, r)| RunVolumeSummary {
                            volume,
                            run_id: r.id,
                            state: r.state,
                            chunks_total: r.chunks_total,
                            chunks_done: r.chunks_done,
                            mismatches: r.mismatches,
                            skipped: r.skipped,
                            error: r.error,
                        })
                        .collect(),
                });
            }
            if let (Some(d), Some(t)) = (deadline, timeout)
                && Instant::now() >= d
            {
                // Serve sees the run ended and stops it (`do_run`); the next round of this
                // loop reads the rows back as failed.
                let why = format!(
                    "stopped: not done within {} (verify run --timeout)",
                    crate::retention::format_duration(t)
                );
                for (_, id) in &ids {
                    catalog.finish_verify_run(*id, Some(&why), now_ns()).await?;
                }
                continue;
            }
            if !ServeLock::is_held(&dir)? {
                return Err(ReplicaError::Verify(format!(
                    "`cdp-replica serve` on {} stopped before the verification ended; start it and run `verify run` again",
                    root.display()
                )));
            }
            tokio::time::sleep(REQUEST_POLL_INTERVAL).await;
        }
    }
    .await;
    catalog.close().await;
    result
}

/// `verify repair`: asks the running serve to resend the open mismatched chunks of `volume`
/// from the agent and verify them again; waits at most `timeout`. Returns the sentence that
/// says what happened; a repair that failed is an error.
pub async fn repair(root: &Path, volume: &str, timeout: Duration) -> Result<String> {
    let dir = DataDir::existing(root)?;
    serving(&dir, "verify repair")?;
    let catalog = Catalog::open(&dir.catalog(), OpenMode::Existing).await?;
    let result = async {
        let v = volumes_named(&catalog, root, Some(volume)).await?.remove(0);
        if catalog.open_mismatches(v.id).await?.is_empty() {
            return Ok(format!(
                "volume {volume} has no open mismatch: nothing to repair"
            ));
        }
        let id = catalog.insert_repair_request(v.id, now_ns()).await?;
        let deadline = Instant::now() + timeout;
        loop {
            let row = catalog.repair_request(id).await?.ok_or_else(|| {
                ReplicaError::Verify(format!("the repair request {id} disappeared"))
            })?;
            match row.state.as_str() {
                "done" => return Ok(row.message.unwrap_or_default()),
                "failed" => {
                    return Err(ReplicaError::Verify(format!(
                        "the repair of volume {volume} failed: {}; see `cdp-replica verify report --volume {volume}`",
                        row.message.unwrap_or_default()
                    )));
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(ReplicaError::Verify(format!(
                    "the repair of volume {volume} did not end within {} s; serve goes on with it: see `cdp-replica verify report --volume {volume}` later",
                    timeout.as_secs()
                )));
            }
            if !ServeLock::is_held(&dir)? {
                return Err(ReplicaError::Verify(format!(
                    "`cdp-replica serve` on {} stopped before the repair ended; start it and run `verify repair` again",
                    root.display()
                )));
            }
            tokio::time::sleep(REQUEST_POLL_INTERVAL).await;
        }
    }
    .await;
    catalog.close().await;
    result
}

// ---- the report ----

/// `verify report` (its JSON is documented in the module docs).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VerifyReport {
    pub since: String,
    pub now: String,
    pub volumes: Vec<VolumeReport>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VolumeReport {
    pub group: String,
    pub volume: String,
    pub size: u64,
    pub chunks: u64,
    pub checks: ChecksReport,
    pub last_check: Option<String>,
    pub coverage: CoverageReport,
    pub last_full_pass: Option<String>,
    pub open_mismatches: u64,
    pub mismatches: Vec<MismatchReport>,
    pub runs: Vec<RunReport>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ChecksReport {
    pub total: u64,
    pub chunks: u64,
    #[serde(rename = "match")]
    pub matched: u64,
    pub mismatch: u64,
    pub skipped: u64,
    pub timeout: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CoverageReport {
    pub chunks: u64,
    pub of: u64,
    pub share: f64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MismatchReport {
    pub chunk: u64,
    pub offset: u64,
    pub length: u64,
    pub seq: u64,
    pub found: String,
    pub reason: String,
    pub agent_hash: String,
    pub replica_hash: Option<String>,
    pub repaired: Option<RepairedReport>,
    pub suspect_points: SuspectPoints,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RepairedReport {
    pub time: String,
    pub seq: u64,
}

/// Points whose image of the chunk may hold the bad bytes: `from_seq ≤ p < before_seq`
/// (`before_seq` null: up to the head). See the module docs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SuspectPoints {
    pub from_seq: u64,
    pub likely_from_seq: u64,
    pub before_seq: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunReport {
    pub id: i64,
    pub full: bool,
    pub state: String,
    pub requested: String,
    pub started: Option<String>,
    pub ended: Option<String>,
    pub chunks_total: u64,
    pub chunks_done: u64,
    pub mismatches: u64,
    pub skipped: u64,
    pub error: Option<String>,
}

fn time_text(ns: i64) -> String {
    rfc3339(&time_of(ns))
}

/// Runs listed per volume in the report.
pub const REPORT_RUNS_MAX: u32 = 20;

/// Reads the report of `volume` (every volume when `None`) for the period since `since_ns`
/// (default: 24 h ago). Works whether or not serve runs.
pub async fn report(
    root: &Path,
    volume: Option<&str>,
    since_ns: Option<i64>,
) -> Result<VerifyReport> {
    let dir = DataDir::existing(root)?;
    let catalog = Catalog::open(&dir.catalog(), OpenMode::Existing).await?;
    let result = async {
        let now = now_ns();
        let since = since_ns.unwrap_or(now - ns(COVERAGE_PERIOD));
        let mut out = Vec::new();
        for v in volumes_named(&catalog, root, volume).await? {
            let g = catalog.group_by_id(v.group_id).await?;
            let chunks = chunk_count(v.size);
            let counts = catalog.verify_counts(v.id, since).await?;
            let covered = catalog
                .chunks_compared_since(v.id, now - ns(COVERAGE_PERIOD))
                .await?;
            let floor = window_floor(&g, &v);
            let mut mismatches = Vec::new();
            let mut open = 0;
            for m in catalog.mismatches_for_report(v.id, since).await? {
                if m.repaired_ns.is_none() {
                    open += 1;
                }
                let offset = m.chunk * CHUNK_BYTES;
                let likely = catalog
                    .last_write_of_chunk(v.id, m.chunk, floor, m.seq)
                    .await?
                    .unwrap_or(floor)
                    .max(floor);
                mismatches.push(MismatchReport {
                    chunk: m.chunk,
                    offset,
                    length: v.size.saturating_sub(offset).min(CHUNK_BYTES),
                    seq: m.seq,
                    found: time_text(m.found_ns),
                    reason: m.reason,
                    agent_hash: m.agent_hash,
                    replica_hash: m.replica_hash,
                    repaired: m
                        .repaired_ns
                        .zip(m.repaired_seq)
                        .map(|(t, s)| RepairedReport {
                            time: time_text(t),
                            seq: s,
                        }),
                    suspect_points: SuspectPoints {
                        from_seq: floor,
                        likely_from_seq: likely,
                        before_seq: m.repaired_seq,
                    },
                });
            }
            let runs = catalog
                .verify_runs_of_volume(v.id, since, REPORT_RUNS_MAX)
                .await?
                .into_iter()
                .map(|r| RunReport {
                    id: r.id,
                    full: r.full,
                    state: r.state,
                    requested: time_text(r.requested_ns),
                    started: r.started_ns.map(time_text),
                    ended: r.ended_ns.map(time_text),
                    chunks_total: r.chunks_total,
                    chunks_done: r.chunks_done,
                    mismatches: r.mismatches,
                    skipped: r.skipped,
                    error: r.error,
                })
                .collect();
            out.push(VolumeReport {
                group: g.name.clone(),
                volume: v.name.clone(),
                size: v.size,
                chunks,
                checks: ChecksReport {
                    total: counts.checks,
                    chunks: counts.chunks,
                    matched: counts.matches,
                    mismatch: counts.mismatches,
                    skipped: counts.skipped,
                    timeout: counts.timeouts,
                },
                last_check: counts.last_ns.map(time_text),
                coverage: CoverageReport {
                    chunks: covered,
                    of: chunks,
                    share: if chunks == 0 {
                        0.0
                    } else {
                        covered as f64 / chunks as f64
                    },
                },
                last_full_pass: catalog.last_full_pass(v.id).await?.map(time_text),
                open_mismatches: open,
                mismatches,
                runs,
            });
        }
        Ok(VerifyReport {
            since: time_text(since),
            now: time_text(now),
            volumes: out,
        })
    }
    .await;
    catalog.close().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retention::Retention;

    fn result(volume_id: i64, chunk: u64, time_ns: i64, outcome: VerifyOutcome) -> NewVerifyResult {
        NewVerifyResult {
            time_ns,
            volume_id,
            chunk,
            seq: Some(1),
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
            .create_group("g", "owner", "gen", 0, &Retention::default(), 0)
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
            seq: 7,
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
            .mark_repaired(open[0].id, 60, 9)
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
            (Some(60), Some(9))
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
