//! Checking one chunk: the agent's hash at a batch boundary S against the replica's
//! reconstruction at S, and storing the result (steps 1–5 of the module docs of
//! [`crate::verifier`]).

use cdp_shared::types::Seq;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cdp_shared::point::PointSpec;
use cdp_shared::types::CHUNK_BYTES;
use cdp_shared::wire::Control;

use super::{ANSWER_TIMEOUT, Check, Ctx, HEAD_WAIT_TIMEOUT, NO_AGENT_RETRY, PIN_HOLDER, Target};
use crate::agent_ports::Asked;
use crate::catalog::{EventLevel, MismatchRow, NewVerifyResult, VerifyOutcome};
use crate::clock::now_ns;
use crate::error::{ReplicaError, Result};
use crate::pins::{PinAt, PinTiming, pin_in};

// Over 120 lines: steps 1–4 of one check read best in order, each with its early outcomes.
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
    let mut heads = heads.clone();
    let mut head = catalog.head(t.group_id).await?;
    while head < seq {
        tokio::select! {
            _ = token.cancelled() => return Ok(None),
            changed = heads.changed() => {
                if changed.is_err() {
                    return Ok(None);
                }
                head = head.max(heads.borrow_and_update().get(&t.group_id).copied().unwrap_or(Seq::ZERO));
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
    let spec = PointSpec::Seq(seq.0);
    let (_, pin) = match pin_in(
        dir,
        catalog,
        &t.volume.name,
        PinAt::Spec(&spec),
        PIN_HOLDER,
        false,
        PinTiming::default(),
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
    metrics::counter!(
        "cdp_replica_verify_checks_total",
        "volume" => t.volume.name.clone(),
        "outcome" => check.outcome.as_str()
    )
    .increment(1);
    match check.outcome {
        VerifyOutcome::Mismatch => {}
        VerifyOutcome::Skipped | VerifyOutcome::Timeout => {
            tracing::debug!(volume = %t.volume.name, chunk, "verification {}: {}", check.outcome.as_str(), check.reason.as_deref().unwrap_or(""));
            return Ok(false);
        }
        VerifyOutcome::Match => return Ok(false),
    }
    let seq = check.seq.unwrap_or(Seq::ZERO);
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
pub(super) async fn check_and_record(
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
