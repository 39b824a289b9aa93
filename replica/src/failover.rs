//! `failover`: the image of a consistency group at a recovery point S made the live volumes
//! on the replica side, each volume served read-write as its own NBD export, and ended either
//! by `--undo` (everything as before) or by `--commit` (the group continues from S and the
//! writes made through the failover).
//!
//! # Scope
//! A failover acts on a whole consistency group (`--group G`; `--volume V` names a group of
//! one by its volume, and is refused for a volume of a larger group): every volume is failed
//! over at the same point S, the group is fenced (its agent's other groups replicate as
//! usual), and a commit moves the whole group to S.
//!
//! # State
//! The catalog's `failovers` row of the group (`migrations/0003_failover.sql`): the point S,
//! the lowest journal segment its image reads (`segment_min`), and a state:
//! * `active` — the failover exists, whether or not a process serves it. The row holds S like
//!   a pin that never expires: the trimmer never moves the base past S nor unlinks a segment
//!   from `segment_min` on ([`crate::trimmer`], step (a) and (e)). The journal after S is
//!   kept.
//! * `committing` — a `--commit` passed its point of no return (below); reads of the volume
//!   are refused ([`crate::points`]' window) until a `--commit` completes.
//! * `committed` — the target disk holds the failover image; the group's points are S alone.
//!
//! While a row exists the group is FENCED: `serve` refuses the group (only it) in its agent's
//! Welcome ([`FailoverRow::refusal`]); a connection already up is told `Fenced` for it within
//! [`crate::server::FENCE_CHECK_INTERVAL`] and stops sending it; and every group commit checks
//! the row inside its SQLite transaction (and before it writes), so no batch of the group is
//! committed once the row exists. The agent keeps spooling the group meanwhile; after
//! `--undo` the connection tells it `Rejoin`, it joins again on the same connection and
//! catches up from its spool. Its other groups are welcomed and replicate throughout.
//!
//! Files, in `DIR/failover/`: per volume `<volume>.overlay` (the sparse data of the blocks
//! written through the failover) and `<volume>.map` (their bitmap), see [`crate::overlay`];
//! and per group `<group>.group-lock`, flocked by the process that serves the failover (and by
//! `--undo` and `--commit` while they work, so they refuse to run while it is served).
//!
//! # `failover --at POINT`
//! 1. Take the lock (refused if another process serves the failover).
//! 2. With no row yet: remove overlay files left by an earlier failover.
//! 3. ONE write transaction ([`crate::catalog::Catalog::write_lock`]): resolve the point with
//!    the window check of every volume of the group ([`crate::pins`]' resolution, serialized
//!    with the trimmer exactly like a pin; the point is resolved on the first volume and must
//!    lie in each volume's window) and insert the `active` row. With a row already `active`
//!    at the same point, the failover is served again; at another point it is refused.
//! 4. Open each volume's image at S ([`LazyImage`]) and persistent overlay, and serve them on
//!    one listener like writable exports named after the volumes ([`crate::export`]) — but
//!    FLUSH and FUA make acknowledged writes durable ([`Overlay::sync`]: fdatasync the data,
//!    then replace the map whole). On SIGINT/SIGTERM the overlays are synced once more and the
//!    process exits; the row stays.
//!
//! The default listener is `DIR/failover-<volume>.sock` for a group of one volume and
//! `DIR/failover-<group>.sock` for a larger group. `failover` without `--at` serves the active
//! failover again, overlays kept.
//!
//! # `--undo`
//! Refused while a process serves the failover. Deletes the `active` row (one statement), then
//! every volume's overlay files. The journal and the target were never written: every point restores as
//! before the failover, and the agent is welcomed again.
//!
//! # `--commit` (crash-safe and idempotent)
//! Refused while a process serves the failover, and while `serve` runs on the data directory
//! (the serve lock is taken for the whole commit: it keeps the trimmer and ingest out).
//! 1. ONE write transaction: with the row `active`, refuse if live pins hold points of the group
//!    (readers would see the target change under them); set the row `committing`. This is the
//!    point of no return: `--undo` is refused from here on, and readers are refused until 4.
//! 2. Apply every journal record in (base, S] to the group's target files in seq order (the
//!    trimmer's apply code), then each volume's overlay blocks over its target (zeros as
//!    holes).
//! 3. fsync each target file.
//! 4. ONE transaction ([`crate::catalog::Catalog::finish_failover_commit`]): delete the group's
//!    record rows, its batches and bookmarks other than S (batch S stays, no longer
//!    journaled: the one point left); head = base = S; remember where the last journaled batch
//!    up to S ended as the journal's committed end (`trimmed_end_*`); clear `trimming_to`;
//!    mark the row `committed`.
//! 5. Remove the overlay files; make the journal agree with the catalog as a `serve` start
//!    would ([`Journal::recover`]: segments after the committed end deleted, the tail of its
//!    segment truncated) and unlink the segments before it.
//!
//! A crash in 2–3 leaves the row `committing`: the next `--commit` applies (base, S] and the
//! overlay again (the overlay wins last, so re-applying gives the same bytes) and goes on. A
//! crash in 5 leaves files a `serve` start or the next trim cleans (a committed row only keeps
//! the agent refused).
//!
//! Errors are one sentence naming the thing and what to do ([`ReplicaError::Failover`]).

use cdp_shared::types::Seq;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cdp_shared::point::PointSpec;
use rustix::fs::FlockOperation;
use tokio_util::sync::CancellationToken;

use crate::catalog::OpenMode;
use crate::catalog::{Catalog, EventLevel, FailoverRow, FailoverState, GroupRow, VolumeRow};
use crate::clock::now_ns;
use crate::clock::{rfc3339, time_of};
use crate::datadir::{DataDir, ServeLock, sync_dir};
use crate::error::{ReplicaError, Result};
use crate::export::{self, Endpoint, ExportHandle, Hold, Served};
use crate::journal::{self, Journal};
use crate::lazy_image::{LazyImage, LazyImageSpec};
use crate::overlay::Overlay;
use crate::pins;
use crate::points::ChosenPoint;
use crate::target::TargetFile;

const FAILOVER_DIR: &str = "failover";
/// Bytes of the overlay copied to the target at once by a commit.
const COMMIT_COPY_BYTES: u64 = 1 << 20;

/// What a failover acts on: a group, named by itself or (a group of one) by its volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailoverTarget {
    /// `--volume V`: the group of V, which must hold V alone.
    Volume(String),
    /// `--group G`: every volume of G.
    Group(String),
}

impl FailoverTarget {
    /// How the target reads in a sentence: `volume V` or `group G`.
    pub fn what(&self) -> String {
        match self {
            FailoverTarget::Volume(v) => format!("volume {v}"),
            FailoverTarget::Group(g) => format!("group {g}"),
        }
    }

    /// The command-line option naming it: `--volume V` or `--group G`.
    fn flag(&self) -> String {
        match self {
            FailoverTarget::Volume(v) => format!("--volume {v}"),
            FailoverTarget::Group(g) => format!("--group {g}"),
        }
    }
}

/// The files of a volume's failover.
#[derive(Clone, Debug)]
pub struct FailoverFiles {
    pub overlay: PathBuf,
    pub map: PathBuf,
}

impl FailoverFiles {
    pub fn of(dir: &DataDir, volume: &str) -> FailoverFiles {
        let d = dir.root().join(FAILOVER_DIR);
        FailoverFiles {
            overlay: d.join(format!("{volume}.overlay")),
            map: d.join(format!("{volume}.map")),
        }
    }

    /// Removes the overlay and its map (and a map's temporary file); files already gone are
    /// fine.
    fn remove_overlay(&self) -> Result<()> {
        let mut removed = false;
        for p in [
            &self.overlay,
            &self.map,
            &self.map.with_extension("map.tmp"),
        ] {
            match std::fs::remove_file(p) {
                Ok(()) => removed = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(ReplicaError::io("remove", p)(e)),
            }
        }
        if removed && let Some(parent) = self.overlay.parent() {
            sync_dir(parent)?;
        }
        Ok(())
    }
}

/// The lock file of a group's failover: `DIR/failover/<group>.group-lock`.
pub fn group_lock(dir: &DataDir, group: &str) -> PathBuf {
    dir.root()
        .join(FAILOVER_DIR)
        .join(format!("{group}.group-lock"))
}

/// The default socket of a failover: `DIR/failover-<name>.sock`, where `name` is the volume
/// of a group of one, or the group.
pub fn default_socket(root: &Path, name: &str) -> PathBuf {
    root.join(format!("failover-{name}.sock"))
}

/// The flock on a group's failover lock file; released when dropped.
#[derive(Debug)]
struct FailoverLock {
    _file: File,
}

impl FailoverLock {
    /// Takes the lock; `None` when another process holds it.
    fn try_acquire(path: &Path) -> Result<Option<FailoverLock>> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(ReplicaError::io("create directory", parent))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(ReplicaError::io("open", path))?;
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(FailoverLock { _file: file })),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(ReplicaError::io("lock", path)(e.into())),
        }
    }
}

fn refuse(sentence: String) -> ReplicaError {
    ReplicaError::Failover(sentence)
}

/// A failover's group, opened: the catalog, the group and its volumes (in agent id order).
struct Opened {
    dir: DataDir,
    catalog: Catalog,
    target: FailoverTarget,
    group: GroupRow,
    volumes: Vec<VolumeRow>,
}

impl Opened {
    fn what(&self) -> String {
        self.target.what()
    }

    fn flag(&self) -> String {
        self.target.flag()
    }

    fn lock_path(&self) -> PathBuf {
        group_lock(&self.dir, &self.group.name)
    }

    /// The volume named in events: the volume of a group of one, none for a larger group.
    fn event_volume(&self) -> Option<&str> {
        match self.volumes.as_slice() {
            [only] => Some(only.name.as_str()),
            _ => None,
        }
    }

    fn served_elsewhere(&self, what: &str) -> ReplicaError {
        refuse(format!(
            "the failover of {} is being served by another process (it holds {}): stop it first (Ctrl-C or SIGTERM), then {what}",
            self.what(),
            self.lock_path().display()
        ))
    }

    fn not_failed_over(&self, what: &str) -> ReplicaError {
        refuse(format!(
            "{} is not failed over, so there is nothing to {what}: start one with `cdp-replica failover {} --at POINT`",
            self.what(),
            self.flag()
        ))
    }

    fn already_committed(&self, f: &FailoverRow) -> ReplicaError {
        refuse(format!(
            "the failover of {} at seq {} was committed{}: the group continues from it (`cdp-replica restore --at latest` gives each volume), and failback is not built yet",
            self.what(),
            f.seq,
            f.committed_ns
                .map(|ns| format!(" on {}", rfc3339(&time_of(ns))))
                .unwrap_or_default()
        ))
    }

    fn commit_under_way(&self, f: &FailoverRow) -> ReplicaError {
        refuse(format!(
            "a commit of the failover of {} at seq {} began and has not completed: run `cdp-replica failover {} --commit` again to complete it",
            self.what(),
            f.seq,
            self.flag()
        ))
    }

    async fn event(&self, level: EventLevel, msg: &str) {
        tracing::info!("{msg}");
        if let Err(e) = self
            .catalog
            .event(
                level,
                Some(&self.group.name),
                self.event_volume(),
                msg,
                now_ns(),
            )
            .await
        {
            tracing::warn!("could not record an event: {e}");
        }
    }
}

/// Opens the catalog and finds the target's group and volumes.
async fn open(root: &Path, target: &FailoverTarget) -> Result<Opened> {
    let dir = DataDir::existing(root)?;
    let catalog = Catalog::open(&dir.catalog(), OpenMode::Existing).await?;
    match find(root, &catalog, target).await {
        Ok((group, volumes)) => Ok(Opened {
            dir,
            catalog,
            target: target.clone(),
            group,
            volumes,
        }),
        Err(e) => {
            catalog.close().await;
            Err(e)
        }
    }
}

async fn find(
    root: &Path,
    catalog: &Catalog,
    target: &FailoverTarget,
) -> Result<(GroupRow, Vec<VolumeRow>)> {
    let group = match target {
        FailoverTarget::Volume(volume) => {
            let v = catalog.volume_by_name(volume).await?.ok_or_else(|| {
                ReplicaError::UnknownVolume {
                    volume: volume.clone(),
                    dir: root.to_path_buf(),
                }
            })?;
            catalog.group_by_id(v.group_id).await?
        }
        FailoverTarget::Group(group) => {
            catalog
                .group_by_name(group)
                .await?
                .ok_or_else(|| ReplicaError::UnknownGroup {
                    group: group.clone(),
                    dir: root.to_path_buf(),
                })?
        }
    };
    let mut volumes = catalog.volumes_of_group(group.id).await?;
    volumes.sort_by_key(|v| v.agent_volume_id);
    if volumes.is_empty() {
        return Err(refuse(format!(
            "group {} has no volume on this replica, so there is nothing to fail over",
            group.name
        )));
    }
    if let FailoverTarget::Volume(volume) = target
        && volumes.len() > 1
    {
        return Err(refuse(format!(
            "volume {volume} belongs to group {} of {} volumes ({}), and a failover acts on a whole consistency group: use `cdp-replica failover --group {}`",
            group.name,
            volumes.len(),
            volumes
                .iter()
                .map(|v| v.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            group.name
        )));
    }
    Ok((group, volumes))
}

/// One volume of a running failover, and where it is served.
#[derive(Clone, Debug)]
pub struct FailoverVolume {
    pub volume: String,
    /// `nbd+unix:///<volume>?socket=<path>` or `nbd://<addr>/<volume>`.
    pub uri: String,
}

/// What a running failover serves, and where.
#[derive(Clone, Debug)]
pub struct FailoverInfo {
    pub group: String,
    /// Each volume of the group, in agent id order, with its export's URI.
    pub volumes: Vec<FailoverVolume>,
    pub point: ChosenPoint,
    /// The failover existed already (served again, overlays kept).
    pub resumed: bool,
    pub endpoint: Endpoint,
}

impl std::fmt::Display for FailoverInfo {
    /// One line for a group of one volume; for a larger group a line for the group, then one
    /// per volume (`  <volume>: <uri>`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let resumed = if self.resumed {
            " (served again, earlier writes kept)"
        } else {
            ""
        };
        match self.volumes.as_slice() {
            [only] => write!(
                f,
                "failover of volume {} at {}{resumed}, live read-write: {}",
                only.volume, self.point, only.uri
            ),
            many => {
                write!(
                    f,
                    "failover of group {} ({} volumes) at {}{resumed}, live read-write:",
                    self.group,
                    many.len(),
                    self.point
                )?;
                for v in many {
                    write!(f, "\n  {}: {}", v.volume, v.uri)?;
                }
                Ok(())
            }
        }
    }
}

/// A served failover; [`FailoverHandle::wait`] for it after cancelling its token.
pub struct FailoverHandle {
    info: FailoverInfo,
    export: ExportHandle,
    overlays: Vec<Arc<Overlay>>,
    catalog: Catalog,
    _lock: FailoverLock,
}

impl FailoverHandle {
    pub fn info(&self) -> &FailoverInfo {
        &self.info
    }

    /// Cancelling it stops serving (the failover stays).
    pub fn token(&self) -> CancellationToken {
        self.export.token()
    }

    /// Waits until serving has stopped, then makes the overlays durable once more and
    /// releases the lock. The failover itself stays.
    pub async fn wait(self) -> Result<()> {
        let served = self.export.wait().await;
        let overlays = self.overlays.clone();
        let synced = tokio::task::spawn_blocking(move || -> Result<()> {
            for o in &overlays {
                o.sync()?;
            }
            Ok(())
        })
        .await?;
        self.catalog.close().await;
        served.and(synced)
    }
}

/// Starts a failover of `target` at `at`, or (`at` `None`) serves the active one again (see
/// the module docs); `endpoint` `None` is the default socket. Returns once it serves.
pub async fn start(
    root: &Path,
    target: &FailoverTarget,
    at: Option<&PointSpec>,
    endpoint: Option<Endpoint>,
) -> Result<FailoverHandle> {
    let o = open(root, target).await?;
    match start_in(&o, at, endpoint).await {
        Ok(h) => Ok(h),
        Err(e) => {
            o.catalog.close().await;
            Err(e)
        }
    }
}

/// Step 3 of a failover (see the module docs), in one write transaction: the failover row
/// recorded at `at` (or the active one resumed: `at`, if given, must name its point), with
/// an event when it is new. Returns the point and whether an active failover was resumed.
async fn record_failover(o: &Opened, at: Option<&PointSpec>) -> Result<(ChosenPoint, bool)> {
    let first = &o.volumes[0];
    let mut w = o.catalog.write_lock().await?;
    let g = w.group(o.group.id).await?;
    let (point, resumed) = match (w.failover(g.id).await?, at) {
        (Some(f), _) if f.state == FailoverState::Committed => {
            return Err(o.already_committed(&f));
        }
        (Some(f), _) if f.state == FailoverState::Committing => {
            return Err(o.commit_under_way(&f));
        }
        (Some(f), spec) => {
            let (point, _) =
                pins::resolve_held(&mut w, first, &g, &PointSpec::Seq(f.seq.0)).await?;
            if let Some(spec) = spec {
                let asked = pins::resolve_held(&mut w, first, &g, spec).await;
                if !matches!(&asked, Ok((p, _)) if p.seq == f.seq) {
                    return Err(refuse(format!(
                        "a failover of {} at seq {} is active: serve it with `cdp-replica failover {}`, or end it with --undo or --commit",
                        o.what(),
                        f.seq,
                        o.flag()
                    )));
                }
            }
            (point, true)
        }
        (None, None) => return Err(o.not_failed_over("serve")),
        (None, Some(spec)) => {
            let (point, mut segment_min) = pins::resolve_held(&mut w, first, &g, spec).await?;
            // The one point must lie in every volume's window.
            for v in &o.volumes[1..] {
                let (_, m) = pins::resolve_held(&mut w, v, &g, &PointSpec::Seq(point.seq.0))
                    .await
                    .map_err(|e| {
                        refuse(format!(
                            "group {} cannot fail over at seq {} (resolved on volume {}): volume {} has no image there: {e}",
                            g.name, point.seq, first.name, v.name
                        ))
                    })?;
                segment_min = match (segment_min, m) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            w.insert_failover(&FailoverRow {
                group_id: g.id,
                seq: point.seq,
                segment_min,
                state: FailoverState::Active,
                started_ns: now_ns(),
                committed_ns: None,
            })
            .await?;
            (point, false)
        }
    };
    w.commit().await?;
    if !resumed {
        let msg = format!(
            "{} failed over at seq {}: group {} is fenced until `failover {} --undo` or `--commit`",
            o.what(),
            point.seq,
            g.name,
            o.flag()
        );
        o.event(EventLevel::Warn, &msg).await;
    }
    Ok((point, resumed))
}

async fn start_in(
    o: &Opened,
    at: Option<&PointSpec>,
    endpoint: Option<Endpoint>,
) -> Result<FailoverHandle> {
    let lock_path = o.lock_path();
    let lock = FailoverLock::try_acquire(&lock_path)?.ok_or_else(|| {
        refuse(format!(
            "the failover of {} is already served by another process (it holds {}): use that one, or stop it first",
            o.what(),
            lock_path.display()
        ))
    })?;
    let endpoint = endpoint.unwrap_or_else(|| {
        let name = match o.volumes.as_slice() {
            [only] => only.name.as_str(),
            _ => o.group.name.as_str(),
        };
        Endpoint::Unix(default_socket(o.dir.root(), name))
    });
    if let Endpoint::Unix(path) = &endpoint {
        export::clear_stale_socket(path)?;
    }
    if o.catalog.failover(o.group.id).await?.is_none() {
        // Left by an earlier failover that ended with a crash (the lock keeps others out).
        for v in &o.volumes {
            FailoverFiles::of(&o.dir, &v.name).remove_overlay()?;
        }
    }

    let (point, resumed) = record_failover(o, at).await?;

    // Step 4: serve each volume's image with its persistent overlay.
    let g = o.catalog.group_by_id(o.group.id).await?;
    let mut served = Vec::new();
    let mut overlays = Vec::new();
    for v in &o.volumes {
        let image = LazyImage::open(
            LazyImageSpec {
                volume_id: v.id,
                agent_volume_id: v.agent_volume_id,
                size: v.size,
                seq: point.seq,
                base_floor: g.base_seq.min(point.seq),
                target: o.dir.target(&v.name),
                journal_dir: o.dir.journal(&g.name),
            },
            o.catalog.clone(),
        )?;
        let files = FailoverFiles::of(&o.dir, &v.name);
        let (data, map, size) = (files.overlay, files.map, v.size);
        let overlay = Arc::new(
            tokio::task::spawn_blocking(move || Overlay::open_persistent(&data, &map, size))
                .await??,
        );
        overlays.push(overlay.clone());
        served.push(Served {
            name: v.name.clone(),
            point: point.clone(),
            image,
            hold: Hold::Failover,
            overlay: Some(overlay),
            durable: true,
        });
    }
    let listener = export::bind(&endpoint).await?;
    let export = export::serve_images(served, listener);
    let info = FailoverInfo {
        group: g.name.clone(),
        volumes: export
            .infos()
            .iter()
            .map(|e| FailoverVolume {
                volume: e.volume.clone(),
                uri: e.uri.clone(),
            })
            .collect(),
        point,
        resumed,
        endpoint: export.info().endpoint.clone(),
    };
    Ok(FailoverHandle {
        info,
        export,
        overlays,
        catalog: o.catalog.clone(),
        _lock: lock,
    })
}

/// Ends the active failover of `target`'s group without a trace (see the module docs).
/// Returns its point.
pub async fn undo(root: &Path, target: &FailoverTarget) -> Result<Seq> {
    let o = open(root, target).await?;
    let result = undo_in(&o).await;
    o.catalog.close().await;
    result
}

async fn undo_in(o: &Opened) -> Result<Seq> {
    let Some(_lock) = FailoverLock::try_acquire(&o.lock_path())? else {
        return Err(o.served_elsewhere("run --undo again"));
    };
    let f = match o.catalog.failover(o.group.id).await? {
        None => return Err(o.not_failed_over("undo")),
        Some(f) if f.state == FailoverState::Active => f,
        Some(f) => {
            return Err(refuse(format!(
                "the failover of {} at seq {} was committed (or its commit began), so it cannot be undone{}",
                o.what(),
                f.seq,
                if f.state == FailoverState::Committing {
                    format!(
                        ": run `cdp-replica failover {} --commit` again to complete it",
                        o.flag()
                    )
                } else {
                    String::new()
                }
            )));
        }
    };
    if !o.catalog.delete_active_failover(o.group.id).await? {
        return Err(o.not_failed_over("undo"));
    }
    for v in &o.volumes {
        FailoverFiles::of(&o.dir, &v.name).remove_overlay()?;
    }
    let msg = format!(
        "the failover of {} at seq {} was undone: its writes are discarded and group {} is protected again",
        o.what(),
        f.seq,
        o.group.name
    );
    o.event(EventLevel::Info, &msg).await;
    Ok(f.seq)
}

/// What a failover commit did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitSummary {
    pub seq: Seq,
    /// Target files written from the journal.
    pub targets_from_journal: usize,
    /// Bytes copied from the overlays to the targets.
    pub overlay_bytes: u64,
    /// Batch rows removed (the points after S, and the journaled ones before it).
    pub batches_removed: u64,
    /// Journal segments unlinked.
    pub segments_removed: usize,
}

/// Makes the failover of `target`'s group the group for good (see the module docs).
pub async fn commit(root: &Path, target: &FailoverTarget) -> Result<CommitSummary> {
    let o = open(root, target).await?;
    let result = commit_in(&o).await;
    o.catalog.close().await;
    result
}

/// Step 3 of a commit: every byte the failover's overlay (files `data` and `map`) holds
/// copied onto the volume's `target` file (zeros as holes), then the target fsynced. Returns
/// the bytes copied.
fn copy_overlay(data: &Path, map: &Path, target: &Path, size: u64) -> Result<u64> {
    let overlay = Overlay::open_persistent(data, map, size)?;
    let mut target = TargetFile::open(target, size)?;
    let mut copied = 0u64;
    let mut buf = Vec::new();
    for (from, len) in overlay.held_ranges(0, size) {
        let mut at = from;
        while at < from + len {
            let n = COMMIT_COPY_BYTES.min(from + len - at);
            buf.resize(n as usize, 0);
            overlay.read_at(at, &mut buf)?;
            if buf.iter().all(|&b| b == 0) {
                target.zero(at, n)?;
            } else {
                target.write_at(at, &buf)?;
            }
            at += n;
        }
        copied += len;
    }
    target.sync_all()?;
    Ok(copied)
}

async fn commit_in(o: &Opened) -> Result<CommitSummary> {
    let Some(_lock) = FailoverLock::try_acquire(&o.lock_path())? else {
        return Err(o.served_elsewhere("run --commit again"));
    };
    let _serve = match ServeLock::acquire(&o.dir) {
        Ok(l) => l,
        Err(ReplicaError::AlreadyServing { dir: d }) => {
            return Err(refuse(format!(
                "`cdp-replica serve` is running on {}: stop it first, then run --commit again (a commit rewrites the group's target disks, which serve writes too)",
                d.display()
            )));
        }
        Err(e) => return Err(e),
    };
    let gid = o.group.id;

    // Step 1: the point of no return.
    let mut w = o.catalog.write_lock().await?;
    let f = match w.failover(gid).await? {
        None => return Err(o.not_failed_over("commit")),
        Some(f) if f.state == FailoverState::Committed => {
            return Err(o.already_committed(&f));
        }
        Some(f) => f,
    };
    if f.state == FailoverState::Active {
        let now = now_ns();
        let live: Vec<_> = w
            .pins_of_group(gid)
            .await?
            .into_iter()
            .filter(|p| pins::is_live_now(p, now))
            .collect();
        if let Some(p) = live.first() {
            return Err(refuse(format!(
                "{} reader(s) hold points of group {} (the first: {}, pid {}, on seq {}): stop them first, then run --commit again (a commit rewrites the target disks they read)",
                live.len(),
                o.group.name,
                p.holder,
                p.pid,
                p.seq
            )));
        }
        w.set_failover_state(gid, FailoverState::Committing).await?;
    }
    w.commit().await?;
    let g = o.catalog.group_by_id(gid).await?;

    // Steps 2-3: the journal up to S, each overlay over its target, fsync.
    let targets_from_journal =
        crate::apply::apply_journal(&o.catalog, &o.dir, g.id, &g.name, g.base_seq, f.seq, false)
            .await?;
    let mut overlay_bytes = 0;
    for v in &o.volumes {
        let files = FailoverFiles::of(&o.dir, &v.name);
        let (target, size) = (o.dir.target(&v.name), v.size);
        overlay_bytes += tokio::task::spawn_blocking(move || {
            copy_overlay(&files.overlay, &files.map, &target, size)
        })
        .await??;
    }

    // Step 4: one transaction.
    let done = o
        .catalog
        .finish_failover_commit(g.id, f.seq, now_ns())
        .await?
        .ok_or_else(|| {
            ReplicaError::Task(format!(
                "the failover row of group {} changed during its commit",
                g.name
            ))
        })?;

    // Step 5: files no row needs any more.
    for v in &o.volumes {
        FailoverFiles::of(&o.dir, &v.name).remove_overlay()?;
    }
    let committed = o.catalog.last_journaled(g.id).await?;
    let jdir = o.dir.journal(&g.name);
    let segments_removed = tokio::task::spawn_blocking(move || -> Result<usize> {
        let (journal, report) = Journal::recover(&jdir, committed)?;
        drop(journal);
        let before = match committed {
            Some(c) => journal::remove_segments_before(&jdir, c.segment)?,
            None => Vec::new(),
        };
        Ok(report.deleted.len() + before.len())
    })
    .await??;
    let msg = format!(
        "the failover of {} at seq {} was committed: the group continues from it ({} bytes written through the failover); the points after it are gone and the agent of group {} stays refused",
        o.what(),
        f.seq,
        overlay_bytes,
        g.name
    );
    o.event(EventLevel::Warn, &msg).await;
    Ok(CommitSummary {
        seq: f.seq,
        targets_from_journal,
        overlay_bytes,
        batches_removed: done.batches,
        segments_removed,
    })
}
