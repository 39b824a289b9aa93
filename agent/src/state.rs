//! The persisted state of each volume (`state/<volume>.json`: syncing or protecting),
//! replaced atomically (see [`write_atomic`]).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::fsutil::write_atomic;

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
