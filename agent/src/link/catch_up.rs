//! The catch-up decision (DESIGN 3.3; see the module doc of `link`): from the replica's
//! welcome, resume a group from the spool, or continue after the replica's head and resync.

use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use cdp_shared::Seq;
use cdp_shared::types::VolumeId;
use cdp_shared::wire;

use super::parse_hash;
use crate::pipeline::Group;

fn generation_path(g: &Group) -> std::path::PathBuf {
    g.state_dir().join(format!("{}.generation", g.name))
}

/// Decides, from the replica's welcome, how a group catches up (see the module doc):
/// * the replica's copy of the group is another one than last time (its generation changed):
///   continue after its head; volumes it holds are compared by hash, the others synced again;
/// * the replica has no complete image of a volume this agent considers sent: the same;
/// * the spool holds every batch after the replica's seq: resume from it;
/// * otherwise continue after the replica's head and compare every volume by hash.
pub(super) fn catch_up(g: &Arc<Group>, w: &wire::GroupWelcome) -> Result<Seq> {
    let head = g.last_sealed();
    let durable = Seq(w.durable);
    let first_held = g.spool.first_held().unwrap_or(head.next());
    let gen_path = generation_path(g);
    let known_generation = std::fs::read_to_string(&gen_path)
        .ok()
        .map(|s| s.trim().to_owned());
    let replaced = known_generation
        .as_ref()
        .is_some_and(|k| *k != w.generation);
    // A replica that lists no volumes (an older one) says nothing about them.
    let replica_state = |id: VolumeId| {
        if w.volumes.is_empty() {
            return "protecting";
        }
        w.volumes
            .iter()
            .find(|v| v.id == id)
            .map(|v| v.state.as_str())
            .unwrap_or("new")
    };
    let pending_sync = |id: VolumeId| {
        g.pending().initial_sync.contains(&id)
            && !g.volumes[id as usize]
                .syncing
                .load(std::sync::atomic::Ordering::Relaxed)
    };
    // Volumes the replica has no complete image of, while this agent thinks it has sent one.
    let lost: Vec<VolumeId> = g
        .volumes
        .iter()
        .filter(|v| {
            replica_state(v.id) == "new"
                && !pending_sync(v.id)
                && !v.syncing.load(std::sync::atomic::Ordering::Relaxed)
        })
        .map(|v| v.id)
        .collect();
    let resumable = !replaced && lost.is_empty() && durable <= head && durable.next() >= first_held;
    if !resumable {
        let hash = if durable.0 == 0 {
            [0u8; 32]
        } else {
            parse_hash(&w.head_hash).ok_or_else(|| {
                anyhow!("the replica sent no valid head hash for group {}", g.name)
            })?
        };
        if replaced {
            tracing::warn!(group = %g.name, "the replica's copy of group {} is a new one (generation {} instead of {}): the agent continues after its seq {durable} and resyncs", g.name, w.generation, known_generation.as_deref().unwrap_or("?"));
        } else {
            tracing::warn!(
                group = %g.name,
                "the replica is at seq {durable} but this agent's spool holds seqs {first_held}..={head}: the agent continues after seq {durable} and resyncs"
            );
        }
        let mut pending = g.pending();
        for v in &g.volumes {
            if replica_state(v.id) == "protecting" {
                if !pending.initial_sync.contains(&v.id) {
                    pending.compare.insert(v.id);
                }
            } else {
                tracing::warn!(group = %g.name, volume = %v.name, "the replica has no complete image of volume {}: it is synced again from the start", v.name);
                pending.compare.remove(&v.id);
                pending.initial_sync.insert(v.id);
                g.await_initial_sync([v.id]);
                if v.syncing.load(std::sync::atomic::Ordering::Relaxed) {
                    v.restart_sync
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        drop(pending);
        // After the flags above: a sync that sees its restart flag never reaches SyncEnd.
        g.rebase(durable, hash).context("reset the spool")?;
    }
    if known_generation.as_deref() != Some(w.generation.as_str()) {
        crate::fsutil::write_atomic(&gen_path, format!("{}\n", w.generation).as_bytes())
            .with_context(|| format!("write {}", gen_path.display()))?;
    }
    Ok(durable)
}
