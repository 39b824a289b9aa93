//! `cdp-replica serve --http ADDR` (or `http = "ADDR"` in `replica.toml`): `/metrics` in the
//! Prometheus text format (see [`cdp_shared::metrics`]). Each scrape brings the gauges up to
//! date from what `status` shows ([`crate::status::status`]) and the verifier's coverage; the
//! counters are kept where things happen (ingest commits, trimmer rounds, verifier checks)
//! and are no-ops in a process that serves no metrics; restores and exports, which other
//! processes run, are counted in the catalog (`reader_totals`) and read at each scrape. Each agent head report goes into the
//! RPO lag histogram ([`observe_lag`]).
//!
//! Labels: `group`, and `volume` on what is per volume; `cause` on the cause gauges, which
//! hold 1 for every cause that holds and 0 for the others.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use cdp_shared::cause::Cause;
use cdp_shared::metrics::seconds_of_ms;
use metrics::{Unit, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

use crate::catalog::{Catalog, OpenMode};
use crate::clock::now_ns;
use crate::datadir::DataDir;
use crate::error::Result;

/// HELP and TYPE of every metric (before the first scrape).
pub fn describe() {
    describe_gauge!(
        "cdp_replica_volume_cause",
        "1 for every named cause that holds for the volume (README, Causes), 0 for the others."
    );
    describe_gauge!(
        "cdp_replica_group_primary",
        "1 for the side that is primary for the group (side=agent|replica: the replica while the group is failed over), else 0."
    );
    describe_gauge!(
        "cdp_replica_connected",
        "1 while the group's agent link is up, else 0."
    );
    describe_gauge!(
        "cdp_replica_rpo_lag_seconds",
        Unit::Seconds,
        "RPO lag as the replica vouches for it: the agent's reported lag plus the report's age (NaN during the initial sync or without a report)."
    );
    describe_histogram!(
        "cdp_replica_rpo_lag_observed_seconds",
        Unit::Seconds,
        "The RPO lag each agent head report (every second) gives for the group."
    );
    describe_gauge!(
        "cdp_replica_rpo_target_seconds",
        Unit::Seconds,
        "The group's RPO target as its agent reports it (30 before a report)."
    );
    describe_gauge!(
        "cdp_replica_volume_size_bytes",
        Unit::Bytes,
        "Size of the volume."
    );
    describe_gauge!(
        "cdp_replica_head_seq",
        "The group's last durable batch seq."
    );
    describe_gauge!(
        "cdp_replica_journal_bytes",
        Unit::Bytes,
        "Bytes of the group's batches in journal segments."
    );
    describe_gauge!(
        "cdp_replica_journal_cap_bytes",
        Unit::Bytes,
        "The group's journal cap (NaN: none)."
    );
    describe_gauge!(
        "cdp_replica_retention_seconds",
        Unit::Seconds,
        "The group's configured window."
    );
    describe_gauge!(
        "cdp_replica_window_first_timestamp_seconds",
        Unit::Seconds,
        "Agent time of the window's first point (Unix seconds; NaN before the initial sync ends)."
    );
    describe_gauge!(
        "cdp_replica_window_last_timestamp_seconds",
        Unit::Seconds,
        "Agent time of the window's last point (Unix seconds; NaN before the initial sync ends)."
    );
    describe_gauge!(
        "cdp_replica_window_seconds",
        Unit::Seconds,
        "Agent time from the window's first point to its last (0 before the initial sync ends)."
    );
    describe_gauge!(
        "cdp_replica_pins",
        "Live pins (readers holding points) of the group."
    );
    describe_gauge!(
        "cdp_replica_paused",
        "1 while ingest of the group is paused (its disk is full), else 0."
    );
    describe_gauge!(
        "cdp_replica_verify_open_mismatches",
        "Chunks the verifier found different and that are not repaired yet."
    );
    describe_gauge!(
        "cdp_replica_verify_coverage_ratio",
        "Share of the volume's chunks the verifier compared in the last 24 hours."
    );
    describe_gauge!(
        "cdp_replica_verify_last_full_pass_timestamp_seconds",
        Unit::Seconds,
        "When the volume's last full verify pass ended (Unix seconds; NaN: never)."
    );
    describe_counter!(
        "cdp_replica_verify_checks_total",
        "Verifier checks of the volume since serve started, by outcome (match, mismatch, skipped, timeout)."
    );
    describe_counter!(
        "cdp_replica_ingested_batches_total",
        "Batches of the group committed since serve started."
    );
    describe_counter!(
        "cdp_replica_ingested_bytes_total",
        Unit::Bytes,
        "Bytes of the group's batches committed since serve started."
    );
    describe_counter!(
        "cdp_replica_trimmer_runs_total",
        "Trimmer rounds of the group since serve started."
    );
    describe_counter!(
        "cdp_replica_restores_total",
        "Restores of the volume that pinned their point, by outcome (done, failed); kept in the catalog."
    );
    describe_counter!(
        "cdp_replica_exports_total",
        "Exports of the volume that started serving; kept in the catalog."
    );
}

/// How far back the console's lag history goes ([`lag_history`]).
pub const LAG_HISTORY: Duration = Duration::from_secs(3600);

/// At most this many reports kept per group (one a second for [`LAG_HISTORY`], with room).
const LAG_HISTORY_REPORTS_MAX: usize = 4096;

/// One head report's lag, for the console: when it came (Unix ms) and the lag it gave
/// (`None` during the initial sync).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LagSample {
    pub at_ms: i64,
    pub lag_ms: Option<u64>,
}

/// The head reports of the last [`LAG_HISTORY`] per group, oldest first (process-wide, like
/// the recorder: the reports come in on the ingest service, the console reads them).
static LAGS: Mutex<BTreeMap<String, VecDeque<LagSample>>> = Mutex::new(BTreeMap::new());

/// Records an agent's head report's RPO lag into the histogram and the console's history.
pub fn observe_lag(group: &str, lag_ms: Option<u64>) {
    if let Some(ms) = lag_ms {
        histogram!("cdp_replica_rpo_lag_observed_seconds", "group" => group.to_owned())
            .record(seconds_of_ms(ms));
    }
    let at_ms = now_ns() / 1_000_000;
    let mut lags = LAGS.lock().unwrap_or_else(|e| e.into_inner());
    let ring = lags.entry(group.to_owned()).or_default();
    ring.push_back(LagSample { at_ms, lag_ms });
    let oldest = at_ms.saturating_sub(LAG_HISTORY.as_millis() as i64);
    while ring.len() > LAG_HISTORY_REPORTS_MAX || ring.front().is_some_and(|s| s.at_ms < oldest) {
        ring.pop_front();
    }
}

/// The head reports of the last [`LAG_HISTORY`] by group, oldest first.
pub fn lag_history() -> BTreeMap<String, Vec<LagSample>> {
    let oldest = (now_ns() / 1_000_000).saturating_sub(LAG_HISTORY.as_millis() as i64);
    let lags = LAGS.lock().unwrap_or_else(|e| e.into_inner());
    lags.iter()
        .map(|(g, ring)| {
            let kept = ring.iter().filter(|s| s.at_ms >= oldest).copied().collect();
            (g.clone(), kept)
        })
        .collect()
}

fn unix_seconds(t: &chrono::DateTime<chrono::Utc>) -> f64 {
    t.timestamp_millis() as f64 / 1000.0
}

/// Brings every gauge up to date from the data directory `root` (per scrape). An error is
/// logged and leaves the last values (the scrape still answers).
pub async fn refresh(root: &Path) {
    match tokio::time::timeout(REFRESH_TIMEOUT, try_refresh(root)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("could not bring the metrics up to date: {e}"),
        Err(_) => tracing::warn!(
            "bringing the metrics up to date took more than {REFRESH_TIMEOUT:?}; the scrape gets the last values"
        ),
    }
}

async fn try_refresh(root: &Path) -> Result<()> {
    let report = crate::status::status(root).await?;
    for v in &report.volumes {
        let labels = [("group", v.group.clone()), ("volume", v.volume.clone())];
        let group = [("group", v.group.clone())];
        for &c in Cause::ALL {
            let on = v.causes.contains(&c);
            let mut l = labels.to_vec();
            l.push(("cause", c.as_str().to_owned()));
            gauge!("cdp_replica_volume_cause", &l).set(f64::from(u8::from(on)));
        }
        for &side in cdp_shared::cause::Primary::ALL {
            let l = [
                ("group", v.group.clone()),
                ("side", side.label().to_owned()),
            ];
            gauge!("cdp_replica_group_primary", &l).set(f64::from(u8::from(v.primary == side)));
        }
        // Counters exist at 0 from the group's first scrape (absent would read "no data").
        for name in [
            "cdp_replica_ingested_batches_total",
            "cdp_replica_ingested_bytes_total",
            "cdp_replica_trimmer_runs_total",
        ] {
            metrics::counter!(name, &group).increment(0);
        }
        gauge!("cdp_replica_connected", &group).set(f64::from(u8::from(v.connected)));
        gauge!("cdp_replica_rpo_lag_seconds", &labels)
            .set(v.rpo_lag_ms.map_or(f64::NAN, seconds_of_ms));
        gauge!("cdp_replica_rpo_target_seconds", &group).set(seconds_of_ms(
            v.rpo_target_ms
                .unwrap_or(crate::status::RPO_TARGET_DEFAULT_MS),
        ));
        gauge!("cdp_replica_volume_size_bytes", &labels).set(v.size as f64);
        gauge!("cdp_replica_head_seq", &group).set(v.head_seq.0 as f64);
        gauge!("cdp_replica_journal_bytes", &group).set(v.journal_bytes as f64);
        gauge!("cdp_replica_journal_cap_bytes", &group)
            .set(v.retention.max_journal_bytes.map_or(f64::NAN, |b| b as f64));
        gauge!("cdp_replica_retention_seconds", &group).set(v.retention.window_s as f64);
        let first = v.window_first.as_ref().map(|p| unix_seconds(&p.time));
        let last = v.window_last.as_ref().map(|p| unix_seconds(&p.time));
        gauge!("cdp_replica_window_first_timestamp_seconds", &labels)
            .set(first.unwrap_or(f64::NAN));
        gauge!("cdp_replica_window_last_timestamp_seconds", &labels).set(last.unwrap_or(f64::NAN));
        gauge!("cdp_replica_window_seconds", &labels).set(match (first, last) {
            (Some(f), Some(l)) => (l - f).max(0.0),
            _ => 0.0,
        });
        gauge!("cdp_replica_pins", &group).set(v.pins.count as f64);
        gauge!("cdp_replica_paused", &group).set(f64::from(u8::from(v.ingest_reason.is_some())));
        gauge!("cdp_replica_verify_open_mismatches", &labels)
            .set(v.degraded.as_ref().map_or(0, |d| d.mismatches) as f64);
    }
    // Restores and exports (other processes) count themselves in the catalog.
    for v in &report.volumes {
        let labels = [("group", v.group.clone()), ("volume", v.volume.clone())];
        for outcome in ["done", "failed"] {
            let mut l = labels.to_vec();
            l.push(("outcome", outcome.to_owned()));
            metrics::counter!("cdp_replica_restores_total", &l).increment(0);
        }
        metrics::counter!("cdp_replica_exports_total", &labels).increment(0);
    }
    for (group, volume, kind, outcome, n) in reader_totals(root).await? {
        let mut l = vec![("group", group), ("volume", volume)];
        match kind.as_str() {
            "restore" => {
                l.push(("outcome", outcome));
                metrics::counter!("cdp_replica_restores_total", &l).absolute(n);
            }
            _ => metrics::counter!("cdp_replica_exports_total", &l).absolute(n),
        }
    }
    for c in coverage(root).await? {
        let labels = [("group", c.group), ("volume", c.volume)];
        gauge!("cdp_replica_verify_coverage_ratio", &labels).set(c.ratio);
        gauge!(
            "cdp_replica_verify_last_full_pass_timestamp_seconds",
            &labels
        )
        .set(c.last_full_pass_ns.map_or(f64::NAN, |ns| ns as f64 / 1e9));
    }
    Ok(())
}

/// The counts of restores and exports of every volume (see `Catalog::reader_totals`).
async fn reader_totals(root: &Path) -> Result<Vec<(String, String, String, String, u64)>> {
    let dir = DataDir::existing(root)?;
    let catalog = Catalog::open(&dir.catalog(), OpenMode::Existing).await?;
    let totals = catalog.reader_totals().await;
    catalog.close().await;
    totals
}

/// The verifier's coverage of one volume, as `verify report` reckons it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Coverage {
    pub group: String,
    pub volume: String,
    /// Chunks of the volume.
    pub chunks: u64,
    /// Chunks compared in the last [`crate::catalog::COVERAGE_PERIOD`].
    pub covered: u64,
    /// `covered / chunks` (0 for an empty volume).
    pub ratio: f64,
    /// When the last full pass ended (Unix ns), null if none did.
    pub last_full_pass_ns: Option<i64>,
}

/// The verifier's coverage of every volume of the data directory `root`.
pub async fn coverage(root: &Path) -> Result<Vec<Coverage>> {
    let dir = DataDir::existing(root)?;
    let catalog = Catalog::open(&dir.catalog(), OpenMode::Existing).await?;
    let result = async {
        let period = i64::try_from(crate::catalog::COVERAGE_PERIOD.as_nanos()).unwrap_or(i64::MAX);
        let mut out = Vec::new();
        for v in catalog.volumes().await? {
            let g = catalog.group_by_id(v.group_id).await?;
            let chunks = v.size.div_ceil(cdp_shared::types::CHUNK_BYTES);
            let covered = catalog
                .chunks_compared_since(v.id, now_ns().saturating_sub(period))
                .await?;
            out.push(Coverage {
                group: g.name.clone(),
                volume: v.name.clone(),
                chunks,
                covered,
                ratio: if chunks == 0 {
                    0.0
                } else {
                    covered as f64 / chunks as f64
                },
                last_full_pass_ns: catalog.last_full_pass(v.id).await?,
            });
        }
        Ok::<_, crate::error::ReplicaError>(out)
    }
    .await;
    catalog.close().await;
    result
}

/// How long a scrape waits for the catalog at most before it answers with the last values.
pub const REFRESH_TIMEOUT: Duration = Duration::from_secs(5);
