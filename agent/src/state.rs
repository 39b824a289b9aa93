//! The agent's files: its configuration (`agent.toml`: the replica and the protected volumes)
//! and the persisted state of each volume (`state/<volume>.json`: syncing or protecting).
//! Every file is replaced atomically (temp file, fsync, rename, fsync of the directory).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

pub const CONFIG_FILE: &str = "agent.toml";

/// Writes `data` to `path` atomically and durably. The temporary file is named after the
/// whole file name and a per-process counter: `v.json` and `v.generation` (a volume and a
/// group of the same name) written at once must not share one (they did, with
/// `with_extension`, and one file got the other's contents).
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

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
    crate::write_pipeline::SPOOL_BYTES_MAX_DEFAULT
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

/// Where a volume is in its life.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum VolumeState {
    /// Its initial sync has not completed: it starts again from the beginning at the next run.
    Syncing,
    /// Synced; every write is journaled.
    Protecting,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VolumeStateFile {
    pub state: VolumeState,
    /// The seq of the batch that completed the initial sync.
    #[serde(default)]
    pub sync_done_seq: Option<u64>,
}

pub fn state_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("state")
}

pub fn load_volume_state(data_dir: &Path, volume: &str) -> Result<Option<VolumeStateFile>> {
    let path = state_dir(data_dir).join(format!("{volume}.json"));
    match fs::read(&path) {
        Ok(bytes) => {
            Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                format!("{} is damaged", path.display())
            })?))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

pub fn save_volume_state(data_dir: &Path, volume: &str, state: &VolumeStateFile) -> io::Result<()> {
    let dir = state_dir(data_dir);
    fs::create_dir_all(&dir)?;
    let bytes = serde_json::to_vec_pretty(state).map_err(io::Error::other)?;
    write_atomic(&dir.join(format!("{volume}.json")), &bytes)
}

#[cfg(test)]
mod write_atomic_tests {
    use super::write_atomic;

    /// Files whose names differ only in their extension, written at once from many threads,
    /// each end with their own contents.
    #[test]
    fn concurrent_writes_of_sibling_files_keep_their_own_contents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let threads: Vec<_> = ["v.json", "v.generation", "v.other"]
            .into_iter()
            .map(|name| {
                let path = dir.path().join(name);
                std::thread::spawn(move || {
                    for i in 0..200u32 {
                        let text = format!("{name} {i}");
                        write_atomic(&path, text.as_bytes()).expect("write");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        for name in ["v.json", "v.generation", "v.other"] {
            let got = std::fs::read_to_string(dir.path().join(name)).expect("read");
            assert_eq!(got, format!("{name} 199"));
        }
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "no temporary file is left");
    }
}
