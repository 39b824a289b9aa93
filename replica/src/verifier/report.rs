//! The report of `verify report` (human tables in the binary, JSON as documented in the
//! module docs of [`crate::verifier`]).

use cdp_shared::types::Seq;
use std::path::Path;

use cdp_shared::types::CHUNK_BYTES;
use serde::Serialize;

use super::cli::volumes_named;
use super::{COVERAGE_PERIOD, ns, window_floor};
use crate::catalog::Catalog;
use crate::catalog::OpenMode;
use crate::clock::now_ns;
use crate::clock::{rfc3339, time_of};
use crate::datadir::DataDir;
use crate::error::Result;
use cdp_shared::types::chunk_count;

/// `verify report` (its JSON is documented in the module docs).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VerifyReport {
    pub since: String,
    pub now: String,
    pub volumes: Vec<VolumeReport>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VolumeReport {
    pub group: String,
    pub volume: String,
    pub size: u64,
    pub chunks: u64,
    pub checks: ChecksReport,
    pub last_check: Option<String>,
    pub coverage: CoverageReport,
    pub last_full_pass: Option<String>,
    pub open_mismatches: u64,
    pub mismatches: Vec<MismatchReport>,
    pub runs: Vec<RunReport>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ChecksReport {
    pub total: u64,
    pub chunks: u64,
    #[serde(rename = "match")]
    pub matched: u64,
    pub mismatch: u64,
    pub skipped: u64,
    pub timeout: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CoverageReport {
    pub chunks: u64,
    pub of: u64,
    pub share: f64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MismatchReport {
    pub chunk: u64,
    pub offset: u64,
    pub length: u64,
    pub seq: Seq,
    pub found: String,
    pub reason: String,
    pub agent_hash: String,
    pub replica_hash: Option<String>,
    pub repaired: Option<RepairedReport>,
    pub suspect_points: SuspectPoints,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RepairedReport {
    pub time: String,
    pub seq: Seq,
}

/// Points whose image of the chunk may hold the bad bytes: `from_seq ≤ p < before_seq`
/// (`before_seq` null: up to the head). See the module docs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SuspectPoints {
    pub from_seq: Seq,
    pub likely_from_seq: Seq,
    pub before_seq: Option<Seq>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunReport {
    pub id: i64,
    pub full: bool,
    pub state: String,
    pub requested: String,
    pub started: Option<String>,
    pub ended: Option<String>,
    pub chunks_total: u64,
    pub chunks_done: u64,
    pub mismatches: u64,
    pub skipped: u64,
    pub error: Option<String>,
}

fn time_text(ns: i64) -> String {
    rfc3339(&time_of(ns))
}

/// Runs listed per volume in the report.
pub const REPORT_RUNS_MAX: u32 = 20;

/// Reads the report of `volume` (every volume when `None`) for the period since `since_ns`
/// (default: 24 h ago). Works whether or not serve runs.
pub async fn report(
    root: &Path,
    volume: Option<&str>,
    since_ns: Option<i64>,
) -> Result<VerifyReport> {
    let dir = DataDir::existing(root)?;
    let catalog = Catalog::open(&dir.catalog(), OpenMode::Existing).await?;
    let result = async {
        let now = now_ns();
        let since = since_ns.unwrap_or(now - ns(COVERAGE_PERIOD));
        let mut out = Vec::new();
        for v in volumes_named(&catalog, root, volume).await? {
            let g = catalog.group_by_id(v.group_id).await?;
            let chunks = chunk_count(v.size);
            let counts = catalog.verify_counts(v.id, since).await?;
            let covered = catalog
                .chunks_compared_since(v.id, now - ns(COVERAGE_PERIOD))
                .await?;
            let floor = window_floor(&g, &v);
            let mut mismatches = Vec::new();
            let mut open = 0;
            for m in catalog.mismatches_for_report(v.id, since).await? {
                if m.repaired_ns.is_none() {
                    open += 1;
                }
                let offset = m.chunk * CHUNK_BYTES;
                let likely = catalog
                    .last_write_of_chunk(v.id, m.chunk, floor, m.seq)
                    .await?
                    .unwrap_or(floor)
                    .max(floor);
                mismatches.push(MismatchReport {
                    chunk: m.chunk,
                    offset,
                    length: v.size.saturating_sub(offset).min(CHUNK_BYTES),
                    seq: m.seq,
                    found: time_text(m.found_ns),
                    reason: m.reason,
                    agent_hash: m.agent_hash,
                    replica_hash: m.replica_hash,
                    repaired: m
                        .repaired_ns
                        .zip(m.repaired_seq)
                        .map(|(t, s)| RepairedReport {
                            time: time_text(t),
                            seq: s,
                        }),
                    suspect_points: SuspectPoints {
                        from_seq: floor,
                        likely_from_seq: likely,
                        before_seq: m.repaired_seq,
                    },
                });
            }
            let runs = catalog
                .verify_runs_of_volume(v.id, since, REPORT_RUNS_MAX)
                .await?
                .into_iter()
                .map(|r| RunReport {
                    id: r.id,
                    full: r.full,
                    state: r.state,
                    requested: time_text(r.requested_ns),
                    started: r.started_ns.map(time_text),
                    ended: r.ended_ns.map(time_text),
                    chunks_total: r.chunks_total,
                    chunks_done: r.chunks_done,
                    mismatches: r.mismatches,
                    skipped: r.skipped,
                    error: r.error,
                })
                .collect();
            out.push(VolumeReport {
                group: g.name.clone(),
                volume: v.name.clone(),
                size: v.size,
                chunks,
                checks: ChecksReport {
                    total: counts.checks,
                    chunks: counts.chunks,
                    matched: counts.matches,
                    mismatch: counts.mismatches,
                    skipped: counts.skipped,
                    timeout: counts.timeouts,
                },
                last_check: counts.last_ns.map(time_text),
                coverage: CoverageReport {
                    chunks: covered,
                    of: chunks,
                    share: if chunks == 0 {
                        0.0
                    } else {
                        covered as f64 / chunks as f64
                    },
                },
                last_full_pass: catalog.last_full_pass(v.id).await?.map(time_text),
                open_mismatches: open,
                mismatches,
                runs,
            });
        }
        Ok(VerifyReport {
            since: time_text(since),
            now: time_text(now),
            volumes: out,
        })
    }
    .await;
    catalog.close().await;
    result
}
