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
            let seq = g
                .initial_sync(v, BACKLOG_BATCHES, self.sync_bytes_per_sec_max)
                .await
                .map_err(|e| format!("initial sync of volume {name} failed: {e}"))?;
            g.pending().initial_sync.remove(&v);
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
            let (compared, sent) = g
                .resync_by_hash(v, BACKLOG_BATCHES, move |first, count| {
                    let link = link.clone();
                    let group_name = group_name.clone();
                    async move { link.hashes(&group_name, v, first, count).await }
                })
                .await
                .map_err(|e| format!("hash-compare resync of volume {name} failed: {e}"))?;
            let bytes = g.volumes[v as usize]
                .resync_bytes_sent
                .load(Ordering::Relaxed);
            tracing::info!(volume = %name, compared, sent, "hash-compare resync complete: {sent} of {compared} chunks differed ({bytes} bytes of records sent by resyncs so far)");
            let mut p = g.pending();
            p.compare.remove(&v);
            p.compares_done += 1;
            p.last_compare = Some((v, compared, sent));
            drop(p);
            g.bump();
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
