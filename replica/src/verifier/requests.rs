//! On-demand runs and repairs, requested by the CLI through catalog rows and carried out by
//! serve's verifier.

use cdp_shared::types::Seq;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cdp_shared::wire::{Control, REPAIR_CHUNKS_PER_MESSAGE_MAX};
use tokio::task::JoinSet;

use super::check::check_and_record;
use super::{
    ANSWER_TIMEOUT, Check, Ctx, NO_AGENT_RETRY, REPAIR_WAIT_TIMEOUT, REQUEST_POLL_INTERVAL,
    RUN_CHECKS_IN_FLIGHT, SAMPLE_RUN_CHUNKS, Target, window_floor,
};
use crate::agent_ports::Asked;
use crate::catalog::{Catalog, EventLevel, GroupRow, RunRow, VerifyOutcome, VolumeState};
use crate::clock::now_ns;
use crate::error::{ReplicaError, Result};
use cdp_shared::types::chunk_count;

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
pub(super) async fn run_requests(ctx: Arc<Ctx>) {
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
pub(super) async fn repair_requests(ctx: Arc<Ctx>) {
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
            let (state, message) = match do_repair(&ctx, req.id, req.volume_id).await {
                Ok(Repair::Done(m)) => ("done", m),
                Ok(Repair::Failed(m)) => ("failed", m),
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

/// How a repair ended, with the sentence the CLI shows.
enum Repair {
    Done(String),
    /// The agent refused or did not resend in time, or the chunks are still wrong.
    Failed(String),
}

// Over 120 lines: the repair protocol (ask, wait for the resync, check again) reads best in order.
/// One repair (see the module docs).
async fn do_repair(ctx: &Arc<Ctx>, id: i64, volume_id: i64) -> Result<Repair> {
    let Some((t, _)) = target_of(&ctx.catalog, volume_id).await? else {
        return Ok(Repair::Failed("the volume no longer exists".into()));
    };
    let open = ctx.catalog.open_mismatches(volume_id).await?;
    if open.is_empty() {
        return Ok(Repair::Done(format!(
            "volume {} has no open mismatch: nothing to repair",
            t.volume.name
        )));
    }
    // `status` and `verify repair` show where it is (best effort: a repair does not fail for
    // want of a progress row).
    let progress = |phase: &'static str, done: usize| {
        let (catalog, total) = (ctx.catalog.clone(), open.len() as u64);
        async move {
            if let Err(e) = catalog
                .set_repair_progress(id, phase, done as u64, total)
                .await
            {
                tracing::debug!("could not record a repair's progress: {e}");
            }
        }
    };
    progress("asking", 0).await;
    let deadline = Instant::now() + REPAIR_WAIT_TIMEOUT;
    let chunks: Vec<u64> = open
        .iter()
        .map(|m| m.chunk)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    // Ask the agent to resend them; R is the newest seq it named.
    let mut started = Seq::ZERO;
    for part in chunks.chunks(REPAIR_CHUNKS_PER_MESSAGE_MAX) {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Repair::Failed(format!(
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
                    return Ok(Repair::Failed(format!(
                        "the agent refused the repair: {reason}"
                    )));
                }
                Asked::Answer(other) => {
                    return Ok(Repair::Failed(format!(
                        "the agent answered the repair with {other:?}"
                    )));
                }
                Asked::NoAgent | Asked::Lost | Asked::Timeout => {
                    tokio::select! {
                        _ = ctx.token.cancelled() => return Ok(Repair::Failed("serve stopped".into())),
                        _ = tokio::time::sleep(NO_AGENT_RETRY) => {}
                    }
                }
            }
        }
    }
    tracing::info!(volume = %t.volume.name, chunks = chunks.len(), after = started.0, "the agent resends the mismatched chunks");
    progress("resending", 0).await;
    // The resync is durable once a consistent batch after R is: looked for again at every
    // commit of the group (ingest publishes its head).
    let mut heads = ctx.heads.clone();
    let consistent = loop {
        let head = ctx.catalog.head(t.group_id).await?;
        if head > started
            && let Some(b) = ctx
                .catalog
                .consistent_batch(t.group_id, started.next(), head, None, false)
                .await?
        {
            break b.seq;
        }
        if Instant::now() >= deadline {
            return Ok(Repair::Failed(format!(
                "the agent's resend of {} chunks did not complete within {} s (no consistent point after seq {started})",
                chunks.len(),
                REPAIR_WAIT_TIMEOUT.as_secs()
            )));
        }
        tokio::select! {
            _ = ctx.token.cancelled() => return Ok(Repair::Failed("serve stopped".into())),
            changed = heads.changed() => {
                if changed.is_err() {
                    return Ok(Repair::Failed("serve stopped".into()));
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => {}
        }
    };
    // Check each chunk again.
    let t = Arc::new(t);
    let mut still = Vec::new();
    progress("checking", 0).await;
    for (i, m) in open.iter().enumerate() {
        let outcome = loop {
            let check = check_and_record(ctx.clone(), t.clone(), m.chunk, None, true).await?;
            match check {
                None => return Ok(Repair::Failed("serve stopped".into())),
                Some(c)
                    if matches!(c.outcome, VerifyOutcome::Skipped | VerifyOutcome::Timeout)
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(NO_AGENT_RETRY).await;
                }
                Some(c) => break c,
            }
        };
        if outcome.outcome == VerifyOutcome::Match && outcome.seq.unwrap_or(Seq::ZERO) >= consistent
        {
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
        progress("checking", i + 1).await;
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
        Ok(Repair::Done(msg))
    } else {
        Ok(Repair::Failed(format!(
            "{msg}; still wrong: {}",
            still.join(", ")
        )))
    }
}
