//! The maintenance task of a group: everything that brings the replica back in step with the
//! devices, run one thing at a time, in this order:
//!
//! 1. end an overflow once the link is up and the spool has room again;
//! 2. initial syncs (a new volume, or one the replica lost);
//! 3. hash-compare resyncs (after the handshake found the spool cannot catch the replica up,
//!    or on demand: `cdp-agent resync`);
//! 4. dirty-region resyncs (after an overflow, or the chunks of the activity log after an
//!    unclean stop).
//!
//! It wakes on the group's `wake` signal (acks, link up, new work) and, as a fallback, once a
//! second. A failed step is logged and tried again later; nothing here blocks client writes.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::link::{ReplicaLink, SharedLink, link_connected};
use crate::pipeline::Group;
use crate::state::{self, VolumeState, VolumeStateFile};

/// Batches sealed but not acknowledged that a sync or resync allows before it waits.
pub const BACKLOG_BATCHES: u64 = 64;
/// How long a failed step waits before it is tried again.
const RETRY: Duration = Duration::from_secs(1);

pub struct Maintenance {
    pub group: Arc<Group>,
    pub link: ReplicaLink,
    pub link_state: SharedLink,
    pub data_dir: PathBuf,
    /// Read rate limit of initial syncs, bytes per second (0: unlimited).
    pub sync_bytes_per_sec_max: u64,
}

impl Maintenance {
    /// Runs until `shutdown`. Cancellation-safe: a step cut short leaves its work pending (an
    /// initial sync starts again, dirty chunks stay dirty).
    pub async fn run(self, shutdown: CancellationToken) {
        let mut wake = self.group.wake.subscribe();
        loop {
            let did = tokio::select! {
                r = self.step() => r,
                _ = shutdown.cancelled() => return,
            };
            match did {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(group = %self.group.name, "{e}; trying again");
                    tokio::select! {
                        _ = tokio::time::sleep(RETRY) => {}
                        _ = shutdown.cancelled() => return,
                    }
                    continue;
                }
            }
            tokio::select! {
                _ = wake.changed() => {}
                _ = tokio::time::sleep(RETRY) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Does the first thing that needs doing; `Ok(false)` when there was nothing.
    async fn step(&self) -> Result<bool, String> {
        let g = &self.group;
        let connected = link_connected(&self.link_state);
        if g.overflowing() {
            if connected && g.try_end_overflow() {
                return Ok(true);
            }
            return Ok(false);
        }
        let next_sync = g.pending().initial_sync.first().copied();
        if let Some(v) = next_sync {
            let name = g.volumes[v as usize].name.clone();
            tracing::info!(volume = %name, "initial sync started");
            let done = g
                .initial_sync(v, BACKLOG_BATCHES, self.sync_bytes_per_sec_max)
                .await
                .map_err(|e| format!("initial sync of volume {name} failed: {e}"))?;
            if !done_unless_rebased(g, done.rebases, |p| {
                p.initial_sync.remove(&v);
                g.volumes[v as usize]
                    .synced_at
                    .store(done.result.0, Ordering::Relaxed);
            }) {
                return Err(format!(
                    "the initial sync of volume {name} starts again: the log was rebased as it ended"
                ));
            }
            let seq = done.result;
            let st = VolumeStateFile {
                state: VolumeState::Protecting,
                sync_done_seq: Some(seq.0),
            };
            state::save_volume_state(&self.data_dir, &name, &st).map_err(|e| format!("initial sync of volume {name} complete but its state could not be saved ({e}); it will sync again at the next start"))?;
            tracing::info!(volume = %name, seq = seq.0, "initial sync complete");
            return Ok(true);
        }
        if !connected {
            return Ok(false);
        }
        let next_compare = g.pending().compare.first().copied();
        if let Some(v) = next_compare {
            let name = g.volumes[v as usize].name.clone();
            tracing::info!(volume = %name, "hash-compare resync started");
            let link = self.link.clone();
            let group_name = g.name.clone();
            let done = g
                .resync_by_hash(v, BACKLOG_BATCHES, move |first, count| {
                    let link = link.clone();
                    let group_name = group_name.clone();
                    async move { link.hashes(&group_name, v, first, count).await }
                })
                .await
                .map_err(|e| format!("hash-compare resync of volume {name} failed: {e}"))?;
            let (compared, sent) = done.result;
            let bytes = g.volumes[v as usize]
                .resync_bytes_sent
                .load(Ordering::Relaxed);
            tracing::info!(volume = %name, compared, sent, "hash-compare resync complete: {sent} of {compared} chunks differed ({bytes} bytes of records sent by resyncs so far)");
            let ended = done_unless_rebased(g, done.rebases, |p| {
                p.compare.remove(&v);
                p.compares_done += 1;
                p.last_compare = Some((v, compared, sent));
            });
            g.bump();
            if !ended {
                return Err(format!(
                    "the hash-compare resync of volume {name} starts again: the log was rebased as it ended"
                ));
            }
            return Ok(true);
        }
        if g.dirty_total() > 0 {
            let sent = g
                .resync_dirty(BACKLOG_BATCHES)
                .await
                .map_err(|e| format!("resync of dirty regions failed: {e}"))?;
            return Ok(sent > 0);
        }
        Ok(false)
    }
}

/// Marks a sync or resync that began at the group's rebase count `began` done (`mark`, on the
/// maintenance queue), unless the group rebased since: its records may then be gone with the
/// old chain, and the rebase queued it again (or the resyncs that cover it). Checked under
/// the queue's lock, which a rebase holds from queueing its resyncs until it is counted, so a
/// rebase is either seen here or comes after the mark and queues the work again. Returns
/// whether it was marked.
fn done_unless_rebased(
    g: &Group,
    began: u64,
    mark: impl FnOnce(&mut crate::pipeline::Pending),
) -> bool {
    let mut p = g.pending();
    if g.rebases() != began {
        return false;
    }
    mark(&mut p);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sync that ended before a rebase whose queueing it did not see (the rebase queued it
    /// again) must stay queued: marking it done would lose the volume's image on the replica.
    #[tokio::test]
    async fn a_sync_is_marked_done_only_if_the_group_did_not_rebase_since_it_began() {
        let dir = tempfile::tempdir().expect("tempdir");
        let g = crate::pipeline::test_group(dir.path(), 1 << 20);
        g.pending().initial_sync.insert(0);
        let began = g.rebases();
        g.rebase(cdp_shared::types::Seq(0), [0; 32])
            .expect("rebase");
        assert!(!done_unless_rebased(&g, began, |p| {
            p.initial_sync.remove(&0);
        }));
        assert!(g.pending().initial_sync.contains(&0), "still queued");
        assert!(done_unless_rebased(&g, g.rebases(), |p| {
            p.initial_sync.remove(&0);
        }));
        assert!(g.pending().initial_sync.is_empty());
    }
}
