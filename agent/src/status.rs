//! What `cdp-agent status` shows: per volume its state (syncing, protecting, disconnected,
//! or stopped when no agent runs), the last sealed seq, the last seq the replica acknowledged,
//! and what the spool holds; and the state of the link.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use cdp_shared::cause::{self, Cause, Primary};

use crate::config::AgentConfig;
use crate::link::SharedLink;
use crate::pipeline::Group;
use crate::state::{self, VolumeState};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AgentStatus {
    pub running: bool,
    pub replica: String,
    pub link_connected: bool,
    pub link_error: Option<String>,
    /// Why the link is down (a `disconnected/*` cause, see [`Cause`]); null while it is up
    /// or the agent is stopped.
    #[serde(default)]
    pub link_cause: Option<Cause>,
    pub volumes: Vec<VolumeStatus>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub name: String,
    pub group: String,
    pub device: String,
    pub size: u64,
    /// `syncing` (initial sync), `resyncing` (dirty regions or a hash-compare resync),
    /// `overflow` (the spool is full: writes are tracked as dirty regions), `protecting`,
    /// `disconnected` (running, link down), `paused` (the replica paused the group's ingest)
    /// or `stopped` (no agent running): the part of `cause` before its `/`.
    pub state: String,
    /// The named cause of `state` (README, "Causes").
    pub cause: Cause,
    /// Every cause that holds, `cause` first: also the link's when it is down while the
    /// state is another, `paused/replica-disk-full`, and `rpo-breach`.
    pub causes: Vec<Cause>,
    /// Share of the running sync or resync done, 0..=1.
    pub sync_progress: Option<f64>,
    /// Seconds the running sync or resync still needs at its rate so far (None before its
    /// first chunk, or when none runs).
    #[serde(default)]
    pub sync_eta_s: Option<u64>,
    /// Bytes a second the running sync or resync has gone through so far (None before its
    /// first chunk, or when none runs).
    #[serde(default)]
    pub sync_rate_bytes_per_s: Option<u64>,
    /// The last seq sealed in the group (None when the agent is stopped).
    pub last_seq: Option<u64>,
    /// The last seq the replica acknowledged as durable.
    pub acked_seq: Option<u64>,
    /// Batches and bytes in the group's spool (sealed, not yet acknowledged).
    pub spool_batches: Option<u64>,
    pub spool_bytes: Option<u64>,
    /// The newest seq the spool has written to its files. Batches the replica acknowledged
    /// before the spool reached them are never written, so it may trail `acked_seq`.
    #[serde(default)]
    pub spool_written_seq: Option<u64>,
    /// Batches the spool never wrote, because the replica acknowledged them first, since the
    /// agent started.
    #[serde(default)]
    pub spool_skipped_batches: Option<u64>,
    /// 1 MiB regions written but not yet in the log (overflow, unclean stop), to be resynced.
    pub dirty_regions: Option<u64>,
    /// Bytes of records sent by resyncs since the agent started.
    pub resync_bytes_sent: Option<u64>,
    /// RPO lag: age, in milliseconds, of the oldest write not yet durable on the replica
    /// (0 when everything is); None while the volume is in its initial sync (not protected
    /// yet) or when the agent is stopped.
    pub rpo_lag_ms: Option<u64>,
    /// The group's RPO target (`rpo_target` in `agent.toml`), milliseconds.
    #[serde(default)]
    pub rpo_target_ms: Option<u64>,
    /// Whether the group's latest sealed point is crash-consistent.
    pub consistent: Option<bool>,
    /// Why the replica paused ingest of the group (e.g. its disk is full), if it did.
    pub replica_paused: Option<String>,
    /// Why the replica refuses the group on the open connection (it is failed over there),
    /// if it does; the agent's other groups replicate meanwhile.
    pub replica_refused: Option<String>,
    /// Which side is primary for the group: `agent`, or `replica (failed over)` (the volume
    /// is then served read-only here).
    pub primary: Primary,
}

/// Seconds left of a sync that did `done` of `total` chunks in `elapsed_ns`, at that rate.
fn eta_s(elapsed_ns: i64, done: u64, total: u64) -> u64 {
    let left = u128::from(total.saturating_sub(done));
    let ns = elapsed_ns.max(0) as u128 * left / u128::from(done.max(1));
    u64::try_from(ns / 1_000_000_000).unwrap_or(u64::MAX)
}

/// Bytes a second of a sync that did `done` chunks in `elapsed_ns`.
fn rate_bytes_per_s(elapsed_ns: i64, done: u64) -> u64 {
    let bytes = u128::from(done) * u128::from(cdp_shared::types::CHUNK_BYTES);
    let rate = bytes * 1_000_000_000 / elapsed_ns.max(1) as u128;
    u64::try_from(rate).unwrap_or(u64::MAX)
}

/// The status of a running agent.
pub fn collect(
    groups: &[Arc<Group>],
    link: &SharedLink,
    devices: &dyn Fn(&str) -> String,
) -> AgentStatus {
    let l = link.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let now = crate::clock::now_ns();
    let mut volumes = Vec::new();
    for g in groups {
        let last = g.last_sealed().0;
        let acked = g.acked.borrow().0;
        let (batches, bytes) = g.spool.held();
        let gs = g.state();
        let lag_ms = g.lag_ms_at(&gs, now);
        let compare: Vec<_> = g.pending().compare.iter().copied().collect();
        let paused = l.paused.get(&g.name).cloned();
        let refused = l.refused.get(&g.name).cloned();
        let rpo_target_ms = g.rpo_target_ms();
        for v in &g.volumes {
            let dirty = gs.dirty_chunks.get(v.id as usize).copied().unwrap_or(0);
            let dirty_cause = gs
                .dirty_causes
                .get(v.id as usize)
                .copied()
                .unwrap_or(Cause::ResyncingAfterCrash);
            let syncing = v.syncing.load(Ordering::Relaxed);
            let comparing = compare.contains(&v.id);
            let resyncing = dirty > 0 || comparing;
            let link_cause = l.cause.unwrap_or(Cause::DisconnectedLinkDown);
            let cause = if syncing {
                Cause::SyncingInitial
            } else if gs.overflow_since_ns.is_some() {
                Cause::OverflowSpoolFull
            } else if dirty > 0 {
                dirty_cause
            } else if comparing {
                Cause::ResyncingHashCompare
            } else if !l.connected {
                link_cause
            } else if let Some((_, c)) = &refused {
                *c
            } else if paused.is_some() {
                Cause::PausedReplicaDiskFull
            } else {
                Cause::Protecting
            };
            let breach = !syncing && lag_ms > rpo_target_ms;
            let causes = cause::ordered(
                cause,
                [
                    (dirty > 0 && cause.state() != "resyncing").then_some(dirty_cause),
                    comparing.then_some(Cause::ResyncingHashCompare),
                    (!l.connected).then_some(link_cause),
                    refused.as_ref().map(|(_, c)| *c),
                    paused.is_some().then_some(Cause::PausedReplicaDiskFull),
                    breach.then_some(Cause::RpoBreach),
                ]
                .into_iter()
                .flatten(),
            );
            let total = v.sync_chunks_total.load(Ordering::Relaxed).max(1);
            let done = v.sync_chunks_done.load(Ordering::Relaxed).min(total);
            let progress = (syncing || resyncing).then(|| done as f64 / total as f64);
            let elapsed_ns = now.saturating_sub(v.sync_started_ns.load(Ordering::Relaxed));
            let eta = progress
                .filter(|_| done > 0 && elapsed_ns > 0)
                .map(|_| eta_s(elapsed_ns, done, total));
            let rate = eta.map(|_| rate_bytes_per_s(elapsed_ns, done));
            volumes.push(VolumeStatus {
                name: v.name.clone(),
                group: g.name.clone(),
                device: devices(&v.name),
                size: v.size,
                state: cause.state().to_owned(),
                cause,
                causes,
                sync_progress: progress,
                sync_eta_s: eta,
                sync_rate_bytes_per_s: rate,
                last_seq: Some(last),
                acked_seq: Some(acked),
                spool_batches: Some(batches),
                spool_bytes: Some(bytes),
                spool_written_seq: Some(g.spool.written().0),
                spool_skipped_batches: Some(g.spool.skipped_batches()),
                dirty_regions: Some(dirty),
                resync_bytes_sent: Some(v.resync_bytes_sent.load(Ordering::Relaxed)),
                // An initial sync has no point to lose writes from yet: not protected.
                rpo_lag_ms: (!syncing).then_some(lag_ms),
                rpo_target_ms: Some(rpo_target_ms),
                consistent: Some(!gs.inconsistent),
                replica_paused: paused.clone(),
                replica_refused: refused.as_ref().map(|(r, _)| r.clone()),
                primary: g.primary(),
            });
        }
    }
    AgentStatus {
        running: true,
        replica: l.replica,
        link_connected: l.connected,
        link_error: l.last_error,
        link_cause: (!l.connected).then(|| l.cause.unwrap_or(Cause::DisconnectedLinkDown)),
        volumes,
    }
}

/// The status of a stopped agent, from its files.
pub fn offline(data_dir: &Path, config: &AgentConfig) -> Result<AgentStatus> {
    let mut volumes = Vec::new();
    for v in &config.volumes {
        let st = state::load_volume_state(data_dir, &v.name)?;
        let size = std::fs::metadata(&v.device).map(|m| m.len()).unwrap_or(0);
        let cause = match st.map(|s| s.state) {
            Some(VolumeState::Protecting) => Cause::StoppedNotRunning,
            _ => Cause::StoppedSyncIncomplete,
        };
        volumes.push(VolumeStatus {
            name: v.name.clone(),
            group: v.group.clone(),
            device: v.device.display().to_string(),
            size,
            state: cause.state().to_owned(),
            cause,
            causes: vec![cause],
            rpo_target_ms: Some(
                u64::try_from(config.rpo_target(&v.group).as_millis()).unwrap_or(u64::MAX),
            ),
            ..VolumeStatus::default()
        });
    }
    Ok(AgentStatus {
        running: false,
        replica: config.replica.clone(),
        link_connected: false,
        link_error: None,
        link_cause: None,
        volumes,
    })
}

/// An aligned table for a terminal.
pub fn render(s: &AgentStatus) -> String {
    let mut out = String::new();
    let link = if !s.running {
        "agent not running".to_owned()
    } else if s.link_connected {
        format!("connected to {}", s.replica)
    } else {
        format!(
            "{} from {} ({})",
            s.link_cause.unwrap_or(Cause::DisconnectedLinkDown),
            s.replica,
            s.link_error.as_deref().unwrap_or("connecting")
        )
    };
    out.push_str(&format!("link: {link}\n"));
    let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
    let mut rows = vec![
        [
            "VOLUME",
            "GROUP",
            "PRIMARY",
            "STATE",
            "SIZE",
            "LAST SEQ",
            "ACKED SEQ",
            "RPO LAG",
            "SPOOL",
            "DIRTY",
            "DEVICE",
        ]
        .map(String::from)
        .to_vec(),
    ];
    let mut paused = Vec::new();
    for v in &s.volumes {
        // The causes name the state (`resyncing/overflow`), then what else holds.
        let causes = v
            .causes
            .iter()
            .map(|c| c.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        let state = match (v.sync_progress, v.sync_eta_s) {
            (Some(p), Some(eta)) => format!(
                "{causes} {:.0}% ({}ETA {})",
                p * 100.0,
                v.sync_rate_bytes_per_s
                    .map(|r| format!("{}/s, ", cdp_shared::types::human_bytes(r)))
                    .unwrap_or_default(),
                cdp_shared::units::format_duration(std::time::Duration::from_secs(eta))
            ),
            (Some(p), None) => format!("{causes} {:.0}%", p * 100.0),
            _ => causes,
        };
        let spool = match (v.spool_batches, v.spool_bytes) {
            (Some(n), Some(b)) => format!("{n} batches, {}", cdp_shared::types::human_bytes(b)),
            _ => "-".into(),
        };
        rows.push(vec![
            v.name.clone(),
            v.group.clone(),
            v.primary.to_string(),
            state,
            cdp_shared::types::human_bytes(v.size),
            opt(v.last_seq),
            opt(v.acked_seq),
            v.rpo_lag_ms
                .map(cdp_shared::units::format_lag_ms)
                .unwrap_or_else(|| {
                    if v.state == "syncing" {
                        "not protected yet".into()
                    } else {
                        "-".into()
                    }
                }),
            spool,
            v.dirty_regions
                .map(|d| {
                    if d == 0 {
                        "-".into()
                    } else {
                        format!("{d} MiB")
                    }
                })
                .unwrap_or_else(|| "-".into()),
            v.device.clone(),
        ]);
        if let Some(reason) = &v.replica_paused {
            paused.push(format!("replica paused group {}: {reason}", v.group));
        }
        if let Some(reason) = &v.replica_refused {
            paused.push(format!("replica refuses group {}: {reason}", v.group));
        }
    }
    out.push_str(&cdp_shared::table::render(&rows));
    paused.dedup();
    for p in paused {
        out.push_str(&p);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod rate_tests {
    use super::*;

    #[test]
    fn the_sync_rate_is_the_chunks_done_over_the_time_taken() {
        let chunk = cdp_shared::types::CHUNK_BYTES;
        assert_eq!(rate_bytes_per_s(2_000_000_000, 8), 4 * chunk);
        assert_eq!(rate_bytes_per_s(500_000_000, 1), 2 * chunk);
        // No time yet is not a division by zero.
        assert_eq!(rate_bytes_per_s(0, 1), chunk * 1_000_000_000);
        assert_eq!(eta_s(2_000_000_000, 8, 24), 4);
    }
}
