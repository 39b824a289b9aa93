//! Which chunks the background verifier checks, and how fast: recent chunks first, then the
//! persisted uniform sweep.

use cdp_shared::types::Seq;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::check::check_and_record;
use super::{
    BACKGROUND_CHECKS_IN_FLIGHT, Ctx, PRUNE_INTERVAL, RECENT_CHUNKS_PER_ROUND_MAX, RESULTS_KEEP,
    RESULTS_PER_VOLUME_MAX, SWEEP_CHUNKS_PER_ROUND, Target, ns, window_floor,
};
use crate::agent_ports::AgentPorts;
use crate::catalog::{Catalog, VolumeState};
use crate::clock::now_ns;
use crate::error::Result;
use cdp_shared::types::chunk_count;

/// The background verifier: `chunks_per_sec` checks per second of chunks from [`choose`].
pub(super) async fn background(ctx: Arc<Ctx>) {
    let period = Duration::from_secs_f64(1.0 / ctx.config.chunks_per_sec);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut queue: VecDeque<(Arc<Target>, u64)> = VecDeque::new();
    let mut cursors: HashMap<i64, Seq> = HashMap::new();
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
    cursors: &mut HashMap<i64, Seq>,
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
