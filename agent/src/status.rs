//! What `cdp-agent status` shows: per volume its state (syncing, protecting, disconnected,
//! or stopped when no agent runs), the last sealed seq, the last seq the replica acknowledged,
//! and what the spool holds; and the state of the link.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::sender::SharedLink;
use crate::state::{self, AgentConfig, VolumeState};
use crate::write_pipeline::Group;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AgentStatus {
    pub running: bool,
    pub replica: String,
    pub link_connected: bool,
    pub link_error: Option<String>,
    pub volumes: Vec<VolumeStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub name: String,
    pub group: String,
    pub device: String,
    pub size: u64,
    /// `syncing`, `protecting`, `disconnected` (running, link down) or `stopped`.
    pub state: String,
    /// Share of the initial sync done, 0..=1, while syncing.
    pub sync_progress: Option<f64>,
    /// The last seq sealed in the group (None when the agent is stopped).
    pub last_seq: Option<u64>,
    /// The last seq the replica acknowledged as durable.
    pub acked_seq: Option<u64>,
    pub spool_batches: Option<u64>,
    pub spool_bytes: Option<u64>,
}

/// The status of a running agent.
pub fn collect(
    groups: &[Arc<Group>],
    link: &SharedLink,
    devices: &dyn Fn(&str) -> String,
) -> AgentStatus {
    let l = link.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut volumes = Vec::new();
    for g in groups {
        let last = g.last_sealed().0;
        let acked = g.acked.borrow().0;
        let (batches, bytes) = g.spool.held();
        for v in &g.volumes {
            let syncing = v.syncing.load(Ordering::Relaxed);
            let state = if syncing {
                "syncing"
            } else if l.connected {
                "protecting"
            } else {
                "disconnected"
            };
            volumes.push(VolumeStatus {
                name: v.name.clone(),
                group: g.name.clone(),
                device: devices(&v.name),
                size: v.size,
                state: state.to_owned(),
                sync_progress: syncing.then(|| {
                    v.sync_chunks_done.load(Ordering::Relaxed) as f64 / v.chunks().max(1) as f64
                }),
                last_seq: Some(last),
                acked_seq: Some(acked),
                spool_batches: Some(batches),
                spool_bytes: Some(bytes),
            });
        }
    }
    AgentStatus {
        running: true,
        replica: l.replica,
        link_connected: l.connected,
        link_error: l.last_error,
        volumes,
    }
}

/// The status of a stopped agent, from its files.
pub fn offline(data_dir: &Path, config: &AgentConfig) -> Result<AgentStatus> {
    let mut volumes = Vec::new();
    for v in &config.volumes {
        let st = state::load_volume_state(data_dir, &v.name)?;
        let size = std::fs::metadata(&v.device).map(|m| m.len()).unwrap_or(0);
        let state = match st.map(|s| s.state) {
            Some(VolumeState::Protecting) => "stopped",
            _ => "stopped (initial sync not complete)",
        };
        volumes.push(VolumeStatus {
            name: v.name.clone(),
            group: v.group.clone(),
            device: v.device.display().to_string(),
            size,
            state: state.to_owned(),
            sync_progress: None,
            last_seq: None,
            acked_seq: None,
            spool_batches: None,
            spool_bytes: None,
        });
    }
    Ok(AgentStatus {
        running: false,
        replica: config.replica.clone(),
        link_connected: false,
        link_error: None,
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
            "disconnected from {} ({})",
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
            "STATE",
            "SIZE",
            "LAST SEQ",
            "ACKED SEQ",
            "SPOOL",
            "DEVICE",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for v in &s.volumes {
        let state = match v.sync_progress {
            Some(p) => format!("{} {:.0}%", v.state, p * 100.0),
            None => v.state.clone(),
        };
        let spool = match (v.spool_batches, v.spool_bytes) {
            (Some(n), Some(b)) => format!("{n} batches, {}", cdp_shared::types::human_bytes(b)),
            _ => "-".into(),
        };
        rows.push(vec![
            v.name.clone(),
            v.group.clone(),
            state,
            cdp_shared::types::human_bytes(v.size),
            opt(v.last_seq),
            opt(v.acked_seq),
            spool,
            v.device.clone(),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
