//! `status`: per volume, its group, state, size, window, journal size, retention and live pins,
//! read from the catalog (works whether or not `serve` runs; `serve.lock` tells which), and
//! whether the running `serve` has paused its group's ingest (the pause board), the group's
//! failover, and whether the verifier found chunks that differ from the agent's (`degraded`
//! until they are repaired).

use std::path::Path;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::catalog::{Catalog, FailoverState, VolumeState};
use crate::datadir::{DataDir, ServeLock};
use crate::error::Result;
use crate::pause_board;
use crate::pins::live_pins;
use crate::recovery::{rfc3339, ser_time, time_of, window};
use crate::retention::{Retention, format_duration};

/// A point named in `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PointRef {
    pub seq: u64,
    #[serde(serialize_with = "ser_time")]
    pub time: DateTime<Utc>,
}

/// One volume in `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VolumeStatus {
    pub group: String,
    pub volume: String,
    /// `paused` (`serve` runs but cannot commit the group's batches: see `ingest_reason`),
    /// `degraded` (the verifier found chunks that differ from the agent's: see `degraded`),
    /// `syncing` (initial sync pending or running), `protecting`, or `disconnected` (no agent
    /// link is up, or `serve` is not running).
    pub state: String,
    /// The catalog's state: `new`, `syncing` or `protecting`.
    pub volume_state: String,
    /// Whether the agent link of the group is up.
    pub connected: bool,
    /// Bytes.
    pub size: u64,
    /// First and last crash-consistent points of the window (null before the initial sync
    /// completes).
    pub window_first: Option<PointRef>,
    pub window_last: Option<PointRef>,
    /// Bytes of the group's batches in journal segments.
    pub journal_bytes: u64,
    /// Last durable seq of the group.
    pub head_seq: u64,
    /// The group's base: every batch up to it is in the target files.
    pub base_seq: u64,
    /// The group's retention.
    pub retention: RetentionStatus,
    /// The live pins of the group (readers holding points; the base does not pass them).
    pub pins: PinsStatus,
    /// Why ingest of the group is paused (its disk is full), null when it is not.
    pub ingest_reason: Option<String>,
    /// Since when it is paused (RFC 3339), null when it is not.
    pub paused_since: Option<String>,
    /// The group's failover (see `failover`), null when there is none.
    pub failover: Option<FailoverStatus>,
    /// Open verification mismatches (null when there is none).
    pub degraded: Option<Degraded>,
}

/// A group's failover in `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FailoverStatus {
    /// The failover point.
    pub seq: u64,
    /// `active`, `committing` or `committed`.
    pub state: String,
    /// When it started (active, committing) or was committed (committed), RFC 3339.
    pub since: String,
}

/// A volume's open verification mismatches in `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Degraded {
    pub mismatches: u64,
    /// One sentence: which chunks, why, and what to do.
    pub reason: String,
}

/// A group's retention in `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RetentionStatus {
    /// The window as `cdp-replica retention` takes it (`24h`).
    pub window: String,
    /// The window in seconds.
    pub window_s: u64,
    /// The journal cap in bytes; null: none.
    pub max_journal_bytes: Option<u64>,
}

impl From<&Retention> for RetentionStatus {
    fn from(r: &Retention) -> Self {
        RetentionStatus {
            window: format_duration(r.window),
            window_s: r.window.as_secs(),
            max_journal_bytes: r.journal_bytes_max,
        }
    }
}

/// The live pins of a group in `status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PinsStatus {
    pub count: usize,
    /// The oldest pinned seq; null when there is no pin.
    pub oldest_seq: Option<u64>,
}

/// The whole `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StatusReport {
    /// Whether a `serve` holds `serve.lock` on this data directory.
    pub serving: bool,
    pub volumes: Vec<VolumeStatus>,
}

/// Reads the status of every volume.
pub async fn status(root: &Path) -> Result<StatusReport> {
    let dir = DataDir::existing(root)?;
    let serving = ServeLock::is_held(&dir)?;
    let board = if serving {
        pause_board::read(&dir)?
    } else {
        pause_board::Board::default()
    };
    let catalog = Catalog::open(&dir.catalog(), false, false).await?;
    let mut volumes = Vec::new();
    for v in catalog.volumes().await? {
        let group = catalog.group_by_id(v.group_id).await?;
        let connected = serving && catalog.link(group.id).await?.is_some_and(|l| l.connected);
        let journal_bytes = catalog.journal_bytes(group.id).await?;
        let pins = live_pins(&catalog, group.id).await?;
        let (window_first, window_last) = match window(&mut catalog.clone(), &v, &group).await? {
            Ok(w) => (
                w.first.map(|b| PointRef {
                    seq: b.seq,
                    time: time_of(b.agent_ns),
                }),
                w.last.map(|b| PointRef {
                    seq: b.seq,
                    time: time_of(b.agent_ns),
                }),
            ),
            Err(_) => (None, None),
        };
        let pause = board.groups.get(&group.name);
        let open = catalog.open_mismatches(v.id).await?;
        let degraded = open.first().map(|first| {
            let more = match open.len() {
                1 => String::new(),
                n => format!(" and {} more", n - 1),
            };
            Degraded {
                mismatches: open.len() as u64,
                reason: format!(
                    "the verifier found chunk {} (at seq {}: {}){more} different from the agent's device; run `cdp-replica verify repair --volume {}` and see `cdp-replica verify report --volume {}`",
                    first.chunk, first.seq, first.reason, v.name, v.name
                ),
            }
        });
        let failover = catalog.failover(group.id).await?;
        let state: String = if let Some(f) = &failover {
            match f.state {
                FailoverState::Active => format!("failed over at seq {}", f.seq),
                FailoverState::Committing => format!("failed over at seq {} (committing)", f.seq),
                FailoverState::Committed => format!("failed over at seq {} (committed)", f.seq),
            }
        } else if pause.is_some() {
            "paused".to_owned()
        } else if degraded.is_some() {
            "degraded".to_owned()
        } else if !connected {
            "disconnected".to_owned()
        } else if v.state == VolumeState::Protecting {
            "protecting".to_owned()
        } else {
            "syncing".to_owned()
        };
        volumes.push(VolumeStatus {
            group: group.name.clone(),
            volume: v.name.clone(),
            state,
            volume_state: v.state.as_str().to_owned(),
            connected,
            size: v.size,
            window_first,
            window_last,
            journal_bytes,
            head_seq: group.head_seq,
            base_seq: group.base_seq,
            retention: RetentionStatus::from(&group.retention),
            pins: PinsStatus {
                count: pins.len(),
                oldest_seq: pins.iter().map(|p| p.seq).min(),
            },
            ingest_reason: pause.map(|p| p.reason.clone()),
            paused_since: pause.map(|p| rfc3339(&time_of(p.since_ns))),
            failover: failover.map(|f| FailoverStatus {
                seq: f.seq,
                state: f.state.as_str().to_owned(),
                since: rfc3339(&time_of(f.committed_ns.unwrap_or(f.started_ns))),
            }),
            degraded,
        });
    }
    catalog.close().await;
    Ok(StatusReport { serving, volumes })
}
