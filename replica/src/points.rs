//! Recovery points: resolving a [`PointSpec`] against a volume's window, and listing the
//! points.
//!
//! A volume's window runs from max(its group's base, the base a trim under way moves to, its
//! `sync_done_seq` — the batch that completed its initial sync) to its group's head; its
//! first point is the image the target file holds once the trim is done. `latest` is the
//! latest consistent batch in the window; `seq:N` is batch N exactly (an inconsistent one is
//! allowed, with a warning, since it was asked for); a bookmark is the latest batch carrying
//! it; a time is the latest consistent batch whose agent time is at or before it. Anything else is refused with one sentence naming the window's
//! first and last restorable points.

use cdp_shared::types::Seq;
use std::path::Path;

use cdp_shared::batch::BatchFlags;
use cdp_shared::point::PointSpec;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::catalog::OpenMode;
use crate::catalog::{
    BatchRow, Catalog, GroupRow, PointReads, PointsFilter, VolumeRow, VolumeState,
};
use crate::clock::{rfc3339, ser_time, time_of};
use crate::datadir::DataDir;
use crate::error::{Decided, ReplicaError, Result};

/// The point a spec resolved to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChosenPoint {
    pub seq: Seq,
    /// Agent clock time of the batch.
    #[serde(serialize_with = "ser_time")]
    pub time: DateTime<Utc>,
    pub bookmark: Option<String>,
    pub consistent: bool,
}

impl ChosenPoint {
    fn of(b: &BatchRow) -> ChosenPoint {
        ChosenPoint {
            seq: b.seq,
            time: time_of(b.agent_ns),
            bookmark: b.bookmark.clone(),
            consistent: BatchFlags(b.flags).consistent(),
        }
    }
}

impl std::fmt::Display for ChosenPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "seq {} (agent time {}", self.seq, rfc3339(&self.time))?;
        if let Some(b) = &self.bookmark {
            write!(f, ", bookmark {b}")?;
        }
        if !self.consistent {
            write!(f, ", NOT crash-consistent")?;
        }
        write!(f, ")")
    }
}

/// One recovery point of `points`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PointInfo {
    pub seq: Seq,
    /// Agent clock time (RFC 3339).
    #[serde(serialize_with = "ser_time")]
    pub time: DateTime<Utc>,
    /// When the replica received the batch (RFC 3339).
    #[serde(serialize_with = "ser_time")]
    pub received: DateTime<Utc>,
    /// Crash-consistent (offered by `latest` and times).
    pub consistent: bool,
    /// Cut by a flush: a point the client made durable.
    pub flush: bool,
    pub bookmark: Option<String>,
    /// Records in the batch.
    pub records: u32,
}

/// A volume with its group, opened for reading.
pub(crate) struct VolumeContext {
    pub catalog: Catalog,
    pub volume: VolumeRow,
    pub group: GroupRow,
}

pub(crate) async fn open_volume(root: &Path, name: &str) -> Result<VolumeContext> {
    let dir = DataDir::existing(root)?;
    let catalog = Catalog::open(&dir.catalog(), OpenMode::Existing).await?;
    let Some(volume) = catalog.volume_by_name(name).await? else {
        catalog.close().await;
        return Err(ReplicaError::UnknownVolume {
            volume: name.to_owned(),
            dir: root.to_path_buf(),
        });
    };
    let group = catalog.group_by_id(volume.group_id).await?;
    Ok(VolumeContext {
        catalog,
        volume,
        group,
    })
}

/// The window of a volume: (start seq, first and last consistent batches in it).
pub(crate) struct Window {
    pub start: Seq,
    /// The window starts later than the volume's initial sync: retention trimmed it.
    pub trimmed: bool,
    pub start_batch: Option<BatchRow>,
    pub first: Option<BatchRow>,
    pub last: Option<BatchRow>,
}

impl Window {
    fn describe(&self) -> String {
        match (&self.first, &self.last) {
            (Some(f), Some(l)) => format!(
                "the first restorable point is seq {} ({}) and the last is seq {} ({})",
                f.seq,
                rfc3339(&time_of(f.agent_ns)),
                l.seq,
                rfc3339(&time_of(l.agent_ns))
            ),
            _ => "it has no crash-consistent point yet".to_owned(),
        }
    }

    fn start_reason(&self) -> &'static str {
        if self.trimmed {
            "(older points have left it: the group's retention trimmed them)"
        } else {
            "(when its initial sync completed)"
        }
    }

    fn start_text(&self) -> String {
        match &self.start_batch {
            Some(b) => format!("seq {} ({})", b.seq, rfc3339(&time_of(b.agent_ns))),
            None => format!("seq {}", self.start),
        }
    }
}

/// The window of a protecting volume, or the refusal for one that has none yet. It starts at
/// max(the group's base, the base a trim under way moves to, the volume's sync_done_seq) and
/// ends at the group's head.
pub(crate) async fn window(
    reads: &mut impl PointReads,
    v: &VolumeRow,
    g: &GroupRow,
) -> Decided<Window> {
    let sync_done = match (v.state, v.sync_done_seq) {
        (VolumeState::Protecting, Some(s)) => s,
        _ => {
            return Ok(Err(format!(
                "volume {} has no restorable point yet: its initial sync has not completed, and its window starts when it does",
                v.name
            ).into()));
        }
    };
    if let Some(f) = reads.failover(g.id).await?
        && f.state == crate::catalog::FailoverState::Committing
    {
        return Ok(Err(format!(
            "volume {} is being failed over for good at seq {} (a `cdp-replica failover --commit` began and has not completed, so its target disk is being rewritten): run `cdp-replica failover --volume {} --commit` again to complete it",
            v.name, f.seq, v.name
        ).into()));
    }
    let start = sync_done.max(g.window_floor());
    Ok(Ok(Window {
        start,
        trimmed: start > sync_done,
        start_batch: reads.batch(g.id, start).await?,
        first: reads
            .consistent_batch(g.id, start, g.head_seq, None, false)
            .await?,
        last: reads
            .consistent_batch(g.id, start, g.head_seq, None, true)
            .await?,
    }))
}

/// Resolves `spec` for volume `v` of group `g`; `Err(ReplicaError::Point)` says why it cannot
/// be restored.
pub(crate) async fn resolve(
    reads: &mut impl PointReads,
    v: &VolumeRow,
    g: &GroupRow,
    spec: &PointSpec,
) -> Result<ChosenPoint> {
    let w = window(reads, v, g)
        .await?
        .map_err(|r| ReplicaError::Point(r.0))?;
    let v = &v.name;
    let refuse = |what: String| ReplicaError::Point(what);
    let batch = match spec {
        PointSpec::Latest => w.last.clone().ok_or_else(|| {
            refuse(format!(
                "volume {v} has no crash-consistent point yet; its window starts at {}",
                w.start_text()
            ))
        })?,
        PointSpec::Seq(n) => {
            let n = Seq(*n);
            if n < w.start {
                return Err(refuse(format!(
                    "seq:{n} is before the window of volume {v}, which starts at {} {}; {}",
                    w.start_text(),
                    w.start_reason(),
                    w.describe()
                )));
            }
            if n > g.head_seq {
                return Err(refuse(format!(
                    "seq:{n} is past the end of the journal of volume {v} (durable up to seq {}); {}",
                    g.head_seq,
                    w.describe()
                )));
            }
            reads.batch(g.id, n).await?.ok_or_else(|| {
                refuse(format!(
                    "seq:{n} was never recorded for volume {v}; {}",
                    w.describe()
                ))
            })?
        }
        PointSpec::Bookmark(name) => {
            let b = reads.bookmark(g.id, name).await?.ok_or_else(|| {
                let left = if w.trimmed {
                    format!(
                        " (a bookmark older than the window, which starts at {}, has left it)",
                        w.start_text()
                    )
                } else {
                    String::new()
                };
                refuse(format!("group {} of volume {v} has no bookmark {name:?}{left}; {}; run `cdp-replica points --volume {v}` to list the points", g.name, w.describe()))
            })?;
            if b.seq < w.start || b.seq > g.head_seq {
                return Err(refuse(format!(
                    "bookmark {name:?} (seq {}) is outside the window of volume {v}; {}",
                    b.seq,
                    w.describe()
                )));
            }
            b
        }
        PointSpec::Time(t) => {
            let ns = t
                .timestamp_nanos_opt()
                .ok_or_else(|| refuse(format!("time {} is out of range", rfc3339(t))))?;
            reads
                .consistent_batch(g.id, w.start, g.head_seq, Some(ns), true)
                .await?
                .ok_or_else(|| {
                    refuse(format!(
                        "volume {v} has no crash-consistent point at or before {}; {}",
                        rfc3339(t),
                        w.describe()
                    ))
                })?
        }
    };
    Ok(ChosenPoint::of(&batch))
}

/// The point `at` resolves to for `volume` (what `restore --at` would choose).
pub async fn resolve_point(root: &Path, volume: &str, at: &PointSpec) -> Result<ChosenPoint> {
    let mut ctx = open_volume(root, volume).await?;
    let result = resolve(&mut ctx.catalog, &ctx.volume, &ctx.group, at).await;
    ctx.catalog.close().await;
    result
}

/// Every recovery point of the volume's group in the volume's window, in seq order (empty
/// before the initial sync completes).
pub async fn points(root: &Path, volume: &str) -> Result<Vec<PointInfo>> {
    points_filtered(root, volume, &PointsFilter::default()).await
}

/// The recovery points of the volume's window that `filter` keeps (agent time bounds, only
/// bookmarks), in the order it asks for and at most as many as its limit: filtered and
/// limited by the catalog along the batches' primary key ([`Catalog::points_page`]).
pub async fn points_filtered(
    root: &Path,
    volume: &str,
    filter: &PointsFilter,
) -> Result<Vec<PointInfo>> {
    let mut ctx = open_volume(root, volume).await?;
    let list = match window(&mut ctx.catalog, &ctx.volume, &ctx.group).await? {
        Err(_) => Vec::new(),
        Ok(w) => ctx
            .catalog
            .points_page(ctx.group.id, w.start, ctx.group.head_seq, filter)
            .await?
            .iter()
            .map(|b| PointInfo {
                seq: b.seq,
                time: time_of(b.agent_ns),
                received: time_of(b.received_ns),
                consistent: BatchFlags(b.flags).consistent(),
                flush: BatchFlags(b.flags).has(BatchFlags::FLUSH),
                bookmark: b.bookmark.clone(),
                records: b.record_count,
            })
            .collect(),
    };
    ctx.catalog.close().await;
    Ok(list)
}
