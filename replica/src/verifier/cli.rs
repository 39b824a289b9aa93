//! The CLI side of the verifier: `verify run` and `verify repair` ask the running serve
//! through catalog rows and wait for the outcome.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{REQUEST_POLL_INTERVAL, SAMPLE_RUN_CHUNKS};
use crate::catalog::OpenMode;
use crate::catalog::{Catalog, RepairRow, VolumeRow, VolumeState};
use crate::clock::now_ns;
use crate::datadir::{DataDir, ServeLock};
use crate::error::{ReplicaError, Result};
use cdp_shared::types::chunk_count;

/// Progress of on-demand runs, for a progress bar.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunProgress {
    pub chunks_total: u64,
    pub chunks_done: u64,
    pub mismatches: u64,
    /// Whether a run that is not over waits for the agent of its group to connect.
    pub waiting_for_agent: bool,
}

/// How the runs of one `verify run` ended.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunSummary {
    pub volumes: Vec<RunVolumeSummary>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunVolumeSummary {
    pub volume: String,
    pub run_id: i64,
    pub state: String,
    pub chunks_total: u64,
    pub chunks_done: u64,
    pub mismatches: u64,
    pub skipped: u64,
    pub error: Option<String>,
}

fn serving(dir: &DataDir, command: &'static str) -> Result<()> {
    if ServeLock::is_held(dir)? {
        Ok(())
    } else {
        Err(ReplicaError::NotServing {
            dir: dir.root().to_path_buf(),
            command,
        })
    }
}

pub(super) async fn volumes_named(
    catalog: &Catalog,
    root: &Path,
    volume: Option<&str>,
) -> Result<Vec<VolumeRow>> {
    match volume {
        Some(name) => match catalog.volume_by_name(name).await? {
            Some(v) => Ok(vec![v]),
            None => Err(ReplicaError::UnknownVolume {
                volume: name.to_owned(),
                dir: root.to_path_buf(),
            }),
        },
        None => catalog.volumes().await,
    }
}

/// `verify run`: asks the running serve to verify `volume` (every protecting volume when
/// `None`), a sample or every chunk (`full`), at most `rate` chunks per second, and waits
/// until it is done, calling `progress` as it goes.
pub async fn run(
    root: &Path,
    volume: Option<&str>,
    full: bool,
    rate: Option<f64>,
    timeout: Option<Duration>,
    mut progress: impl FnMut(RunProgress),
) -> Result<RunSummary> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let dir = DataDir::existing(root)?;
    serving(&dir, "verify run")?;
    let catalog = Catalog::open(&dir.catalog(), OpenMode::Existing).await?;
    let result = async {
        let mut volumes = volumes_named(&catalog, root, volume).await?;
        if volume.is_none() {
            volumes.retain(|v| v.state == VolumeState::Protecting);
        }
        if volumes.is_empty() {
            return Err(ReplicaError::Verify(
                "no volume is protecting yet: there is nothing to verify".into(),
            ));
        }
        let mut ids = Vec::new();
        let mut groups = Vec::new();
        for v in &volumes {
            let total = if full {
                chunk_count(v.size)
            } else {
                SAMPLE_RUN_CHUNKS.min(chunk_count(v.size))
            };
            groups.push(v.group_id);
            ids.push((
                v.name.clone(),
                catalog
                    .insert_verify_run(v.id, full, rate, total, now_ns())
                    .await?,
            ));
        }
        loop {
            let mut rows = Vec::new();
            for (name, id) in &ids {
                let row = catalog.verify_run(*id).await?.ok_or_else(|| {
                    ReplicaError::Verify(format!("the verification run {id} disappeared"))
                })?;
                rows.push((name.clone(), row));
            }
            let mut waiting_for_agent = false;
            for ((_, r), g) in rows.iter().zip(&groups) {
                if r.state == "requested" || r.state == "running" {
                    waiting_for_agent |= !catalog.link(*g).await?.is_some_and(|l| l.connected);
                }
            }
            progress(RunProgress {
                chunks_total: rows.iter().map(|(_, r)| r.chunks_total).sum(),
                chunks_done: rows.iter().map(|(_, r)| r.chunks_done).sum(),
                mismatches: rows.iter().map(|(_, r)| r.mismatches).sum(),
                waiting_for_agent,
            });
            if rows.iter().all(|(_, r)| r.state == "done" || r.state == "failed") {
                return Ok(RunSummary {
                    volumes: rows
                        .into_iter()
                        .map(|(volume, r)| RunVolumeSummary {
                            volume,
                            run_id: r.id,
                            state: r.state,
                            chunks_total: r.chunks_total,
                            chunks_done: r.chunks_done,
                            mismatches: r.mismatches,
                            skipped: r.skipped,
                            error: r.error,
                        })
                        .collect(),
                });
            }
            if let (Some(d), Some(t)) = (deadline, timeout)
                && Instant::now() >= d
            {
                // Serve sees the run ended and stops it (`do_run`); the next round of this
                // loop reads the rows back as failed.
                let why = format!(
                    "stopped: not done within {} (verify run --timeout)",
                    crate::retention::format_duration(t)
                );
                for (_, id) in &ids {
                    catalog.finish_verify_run(*id, Some(&why), now_ns()).await?;
                }
                continue;
            }
            if !ServeLock::is_held(&dir)? {
                return Err(ReplicaError::Verify(format!(
                    "`cdp-replica serve` on {} stopped before the verification ended; start it and run `verify run` again",
                    root.display()
                )));
            }
            tokio::time::sleep(REQUEST_POLL_INTERVAL).await;
        }
    }
    .await;
    catalog.close().await;
    result
}

/// `verify repair`: asks the running serve to resend the open mismatched chunks of `volume`
/// from the agent and verify them again; waits at most `timeout`. Returns the sentence that
/// says what happened; a repair that failed is an error. `on_progress` gets the request's row
/// at every poll (its phase and the chunks checked again).
pub async fn repair(
    root: &Path,
    volume: &str,
    timeout: Duration,
    mut on_progress: impl FnMut(&RepairRow),
) -> Result<String> {
    let dir = DataDir::existing(root)?;
    serving(&dir, "verify repair")?;
    let catalog = Catalog::open(&dir.catalog(), OpenMode::Existing).await?;
    let result = async {
        let v = volumes_named(&catalog, root, Some(volume)).await?.remove(0);
        if catalog.open_mismatches(v.id).await?.is_empty() {
            return Ok(format!(
                "volume {volume} has no open mismatch: nothing to repair"
            ));
        }
        let id = catalog.insert_repair_request(v.id, now_ns()).await?;
        let deadline = Instant::now() + timeout;
        loop {
            let row = catalog.repair_request(id).await?.ok_or_else(|| {
                ReplicaError::Verify(format!("the repair request {id} disappeared"))
            })?;
            on_progress(&row);
            match row.state.as_str() {
                "done" => return Ok(row.message.unwrap_or_default()),
                "failed" => {
                    return Err(ReplicaError::Verify(format!(
                        "the repair of volume {volume} failed: {}; see `cdp-replica verify report --volume {volume}`",
                        row.message.unwrap_or_default()
                    )));
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(ReplicaError::Verify(format!(
                    "the repair of volume {volume} did not end within {} s; serve goes on with it: see `cdp-replica verify report --volume {volume}` later",
                    timeout.as_secs()
                )));
            }
            if !ServeLock::is_held(&dir)? {
                return Err(ReplicaError::Verify(format!(
                    "`cdp-replica serve` on {} stopped before the repair ended; start it and run `verify repair` again",
                    root.display()
                )));
            }
            tokio::time::sleep(REQUEST_POLL_INTERVAL).await;
        }
    }
    .await;
    catalog.close().await;
    result
}
