//! The agent's configuration (`agent.toml`: the replica and the protected volumes), replaced
//! atomically (see [`write_atomic`]).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::fsutil::write_atomic;

pub const CONFIG_FILE: &str = "agent.toml";
/// Default cap of the spool (bytes of batches not yet acknowledged).
pub const SPOOL_BYTES_MAX_DEFAULT: u64 = 4 << 30;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeConfig {
    pub name: String,
    pub device: PathBuf,
    pub group: String,
    /// The volume's id inside its group, fixed at `protect`.
    pub id: u32,
}

/// `agent.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentConfig {
    /// The replica, `HOST:PORT`.
    pub replica: String,
    /// The replica's certificate fingerprint (hex).
    pub replica_fingerprint: String,
    /// Age limit of an open batch, in milliseconds.
    #[serde(default = "default_batch_age_ms")]
    pub batch_age_ms: u64,
    /// Batches sent but not acknowledged, at most.
    #[serde(default = "default_in_flight")]
    pub batches_in_flight: usize,
    /// Read rate limit of the initial sync, bytes per second (0: unlimited), so that a first
    /// sync does not saturate the device or the link.
    #[serde(default)]
    pub sync_bytes_per_sec_max: u64,
    /// Cap of each group's spool, in bytes. Above it the group tracks dirty regions instead
    /// of batches, and resyncs them when the replica has caught up.
    #[serde(default = "default_spool_bytes_max")]
    pub spool_bytes_max: u64,
    /// Chunks (1 MiB) each volume's activity log holds: what is resynced after a crash.
    #[serde(default = "default_al_chunks")]
    pub activity_log_chunks: usize,
    /// NBD connections served at once, in the handshake or in transmission; one more is
    /// refused. `run` lowers it to what the agent's file-descriptor limit leaves.
    #[serde(default = "default_nbd_connections_max")]
    pub nbd_connections_max: usize,
    #[serde(default, rename = "volume")]
    pub volumes: Vec<VolumeConfig>,
}

fn default_batch_age_ms() -> u64 {
    cdp_shared::types::BATCH_AGE_MS_DEFAULT
}
fn default_spool_bytes_max() -> u64 {
    SPOOL_BYTES_MAX_DEFAULT
}
fn default_al_chunks() -> usize {
    crate::activity_log::CAPACITY_DEFAULT
}
fn default_nbd_connections_max() -> usize {
    cdp_shared::nbd::server::CONNECTIONS_MAX_DEFAULT
}
fn default_in_flight() -> usize {
    cdp_shared::types::BATCHES_IN_FLIGHT_DEFAULT
}

impl AgentConfig {
    pub fn load(data_dir: &Path) -> Result<AgentConfig> {
        let path = data_dir.join(CONFIG_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                bail!(
                    "no agent in {}: run `cdp-agent init --data {}` first",
                    data_dir.display(),
                    data_dir.display()
                )
            }
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        let config: AgentConfig = toml::from_str(&text)
            .with_context(|| format!("{} is not a valid agent configuration", path.display()))?;
        if config.spool_bytes_max < 2 * cdp_shared::types::BATCH_PAYLOAD_BYTES_MAX as u64 {
            bail!(
                "{}: spool_bytes_max must be at least {} bytes (two batches)",
                path.display(),
                2 * cdp_shared::types::BATCH_PAYLOAD_BYTES_MAX
            );
        }
        if config.batch_age_ms == 0
            || config.batches_in_flight == 0
            || config.activity_log_chunks == 0
            || config.nbd_connections_max == 0
        {
            bail!(
                "{}: batch_age_ms, batches_in_flight, activity_log_chunks and nbd_connections_max must be at least 1",
                path.display()
            );
        }
        Ok(config)
    }

    pub fn save(&self, data_dir: &Path) -> Result<()> {
        let text = toml::to_string(self).context("serialize the agent configuration")?;
        let path = data_dir.join(CONFIG_FILE);
        write_atomic(&path, text.as_bytes()).with_context(|| format!("write {}", path.display()))
    }

    /// Volumes by group, in a stable order.
    pub fn groups(&self) -> BTreeMap<String, Vec<VolumeConfig>> {
        let mut groups: BTreeMap<String, Vec<VolumeConfig>> = BTreeMap::new();
        for v in &self.volumes {
            groups.entry(v.group.clone()).or_default().push(v.clone());
        }
        groups
    }
}
