//! `failover`: the image of a volume at a recovery point S made the live volume on the replica
//! side, served read-write over NBD, and ended either by `--undo` (everything as before) or by
//! `--commit` (the volume continues from S and the writes made through the failover).
//!
//! # Scope
//! A failover acts on the volume's whole consistency group: the group's agent is fenced, and a
//! commit moves the whole group to S. Only groups of one volume are supported for now; a
//! failover of a volume whose group holds more is refused ("not supported yet").
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
//! While a row exists the group is FENCED: `serve` refuses its agent at Hello with a
//! `Refused { reason }` ([`FailoverRow::refusal`]); a connection already up is closed within
//! [`crate::server::FENCE_CHECK_INTERVAL`]; and every group commit checks the row inside its
//! SQLite transaction (and before it writes), so no batch of the group is committed once the
//! row exists. The agent keeps spooling meanwhile (as on any refusal); after `--undo` it is
//! welcomed again at its next reconnection and catches up from its spool. The refusal covers
//! the agent's whole connection (one Hello names all its groups), so its other groups wait
//! too.
//!
//! Files, in `DIR/failover/`: `<volume>.overlay` (the sparse data of the blocks written
//! through the failover) and `<volume>.map` (their bitmap), see [`crate::overlay`]; and
//! `<volume>.lock`, flocked by the process that serves the failover (and by `--undo` and
//! `--commit` while they work, so they refuse to run while it is served).
//!
//! # `failover --at POINT`
//! 1. Take the lock (refused if another process serves the failover).
//! 2. With no row yet: remove overlay files left by an earlier failover.
//! 3. ONE write transaction ([`crate::catalog::Catalog::write_lock`]): resolve the point with
//!    the window check ([`crate::pins`]' resolution, serialized with the trimmer exactly like a
//!    pin) and insert the `active` row. With a row already `active` at the same point, the
//!    failover is served again; at another point it is refused.
//! 4. Open the image at S ([`LazyImage`]) and the persistent overlay, and serve them like a
//!    writable export ([`crate::export`]) — but FLUSH and FUA make acknowledged writes durable
//!    ([`Overlay::sync`]: fdatasync the data, then replace the map whole). On SIGINT/SIGTERM
//!    the overlay is synced once more and the process exits; the row stays.
//!
//! `failover --volume V` without `--at` serves the active failover again, overlay kept.
//!
//! # `--undo`
//! Refused while a process serves the failover. Deletes the `active` row (one statement), then
//! the overlay files. The journal and the target were never written: every point restores as
//! before the failover, and the agent is welcomed again.
//!
//! # `--commit` (crash-safe and idempotent)
//! Refused while a process serves the failover, and while `serve` runs on the data directory
//! (the serve lock is taken for the whole commit: it keeps the trimmer and ingest out).
//! 1. ONE write transaction: with the row `active`, refuse if live pins hold points of the group
//!    (readers would see the target change under them); set the row `committing`. This is the
//!    point of no return: `--undo` is refused from here on, and readers are refused until 4.
//! 2. Apply every journal record in (base, S] to the target file in seq order (the trimmer's
//!    apply code), then every overlay block over it (zeros as holes).
//! 3. fsync the target file.
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
use crate::catalog::{Catalog, EventLevel, FailoverRow, FailoverState, VolumeRow};
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

/// The files of a volume's failover.
#[derive(Clone, Debug)]
pub struct FailoverFiles {
    pub overlay: PathBuf,
    pub map: PathBuf,
    pub lock: PathBuf,
}

impl FailoverFiles {
    pub fn of(dir: &DataDir, volume: &str) -> FailoverFiles {
        let d = dir.root().join(FAILOVER_DIR);
        FailoverFiles {
            overlay: d.join(format!("{volume}.overlay")),
            map: d.join(format!("{volume}.map")),
            lock: d.join(format!("{volume}.lock")),
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

/// The default socket of a failover of `volume`: `DIR/failover-<volume>.sock`.
pub fn default_socket(root: &Path, volume: &str) -> PathBuf {
    root.join(format!("failover-{volume}.sock"))
}

/// The flock on `DIR/failover/<volume>.lock`; released when dropped.
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

fn served_elsewhere(volume: &str, lock: &Path, what: &str) -> ReplicaError {
    refuse(format!(
        "the failover of volume {volume} is being served by another process (it holds {}): stop it first (Ctrl-C or SIGTERM), then {what}",
        lock.display()
    ))
}

fn not_failed_over(volume: &str, what: &str) -> ReplicaError {
    refuse(format!(
        "volume {volume} is not failed over, so there is nothing to {what}: start one with `cdp-replica failover --volume {volume} --at POINT`"
    ))
}

fn already_committed(volume: &str, f: &FailoverRow) -> ReplicaError {
    refuse(format!(
        "the failover of volume {volume} at seq {} was committed{}: the volume continues from it (`cdp-replica restore --at latest` gives it), and failback is not built yet",
        f.seq,
        f.committed_ns
            .map(|ns| format!(" on {}", rfc3339(&time_of(ns))))
            .unwrap_or_default()
    ))
}

fn commit_under_way(volume: &str, f: &FailoverRow) -> ReplicaError {
    refuse(format!(
        "a commit of the failover of volume {volume} at seq {} began and has not completed: run `cdp-replica failover --volume {volume} --commit` again to complete it",
        f.seq
    ))
}

/// Opens the catalog and finds `volume`.
async fn open(root: &Path, volume: &str) -> Result<(DataDir, Catalog, VolumeRow)> {
    let dir = DataDir::existing(root)?;
    let catalog = Catalog::open(&dir.catalog(), OpenMode::Existing).await?;
    match catalog.volume_by_name(volume).await {
        Ok(Some(v)) => Ok((dir, catalog, v)),
        Ok(None) => {
            catalog.close().await;
            Err(ReplicaError::UnknownVolume {
                volume: volume.to_owned(),
                dir: root.to_path_buf(),
            })
        }
        Err(e) => {
            catalog.close().await;
            Err(e)
        }
    }
}

/// What a running failover serves, and where.
#[derive(Clone, Debug)]
pub struct FailoverInfo {
    pub volume: String,
    pub point: ChosenPoint,
    /// The failover existed already (served again, overlay kept).
    pub resumed: bool,
    /// `nbd+unix:///<volume>?socket=<path>` or `nbd://<addr>/<volume>`.
    pub uri: String,
    pub endpoint: Endpoint,
}

impl std::fmt::Display for FailoverInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "failover of volume {} at {}{}, live read-write: {}",
            self.volume,
            self.point,
            if self.resumed {
                " (served again, earlier writes kept)"
            } else {
                ""
            },
            self.uri
        )
    }
}

/// A served failover; [`FailoverHandle::wait`] for it after cancelling its token.
pub struct FailoverHandle {
    info: FailoverInfo,
    export: ExportHandle,
    overlay: Arc<Overlay>,
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

    /// Waits until serving has stopped, then makes the overlay durable once more and releases
    /// the lock. The failover itself stays.
    pub async fn wait(self) -> Result<()> {
        let served = self.export.wait().await;
        let o = self.overlay.clone();
        let synced = tokio::task::spawn_blocking(move || o.sync()).await?;
        self.catalog.close().await;
        served.and(synced)
    }
}

/// Starts a failover of `volume` at `at`, or (`at` `None`) serves the active one again (see
/// the module docs); `endpoint` `None` is the default socket. Returns once it serves.
pub async fn start(
    root: &Path,
    volume: &str,
    at: Option<&PointSpec>,
    endpoint: Option<Endpoint>,
) -> Result<FailoverHandle> {
    let (dir, catalog, v) = open(root, volume).await?;
    match start_in(&dir, &catalog, &v, at, endpoint).await {
        Ok(h) => Ok(h),
        Err(e) => {
            catalog.close().await;
            Err(e)
        }
    }
}

/// Step 3 of a failover (see the module docs), in one write transaction: the failover row
/// recorded at `at` (or the active one resumed: `at`, if given, must name its point), with
/// an event when it is new. Returns the point and whether an active failover was resumed.
async fn record_failover(
    catalog: &Catalog,
    v: &VolumeRow,
    at: Option<&PointSpec>,
) -> Result<(ChosenPoint, bool)> {
    let volume = v.name.as_str();
    let mut w = catalog.write_lock().await?;
    let g = w.group(v.group_id).await?;
    let (point, resumed) = match (w.failover(g.id).await?, at) {
        (Some(f), _) if f.state == FailoverState::Committed => {
            return Err(already_committed(volume, &f));
        }
        (Some(f), _) if f.state == FailoverState::Committing => {
            return Err(commit_under_way(volume, &f));
        }
        (Some(f), spec) => {
            let (point, _) = pins::resolve_held(&mut w, v, &g, &PointSpec::Seq(f.seq.0)).await?;
            if let Some(spec) = spec {
                let asked = pins::resolve_held(&mut w, v, &g, spec).await;
                if !matches!(&asked, Ok((p, _)) if p.seq == f.seq) {
                    return Err(refuse(format!(
                        "a failover of volume {volume} at seq {} is active: serve it with `cdp-replica failover --volume {volume}`, or end it with --undo or --commit",
                        f.seq
                    )));
                }
            }
            (point, true)
        }
        (None, None) => return Err(not_failed_over(volume, "serve")),
        (None, Some(spec)) => {
            let n = w.volume_count(g.id).await?;
            if n != 1 {
                return Err(refuse(format!(
                    "volume {volume} belongs to group {} of {n} volumes, and a failover of a group of more than one volume is not supported yet",
                    g.name
                )));
            }
            let (point, segment_min) = pins::resolve_held(&mut w, v, &g, spec).await?;
            w.insert_failover(&FailoverRow {
                group_id: g.id,
                volume_id: v.id,
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
            "volume {volume} failed over at seq {}: group {} is fenced until `failover --undo` or `--commit`",
            point.seq, g.name
        );
        tracing::info!("{msg}");
        if let Err(e) = catalog
            .event(
                EventLevel::Warn,
                Some(&g.name),
                Some(volume),
                &msg,
                now_ns(),
            )
            .await
        {
            tracing::warn!("could not record an event: {e}");
        }
    }

    Ok((point, resumed))
}

async fn start_in(
    dir: &DataDir,
    catalog: &Catalog,
    v: &VolumeRow,
    at: Option<&PointSpec>,
    endpoint: Option<Endpoint>,
) -> Result<FailoverHandle> {
    let volume = v.name.as_str();
    let files = FailoverFiles::of(dir, volume);
    let lock = FailoverLock::try_acquire(&files.lock)?.ok_or_else(|| {
        refuse(format!(
            "the failover of volume {volume} is already served by another process (it holds {}): use that one, or stop it first",
            files.lock.display()
        ))
    })?;
    let endpoint = endpoint.unwrap_or_else(|| Endpoint::Unix(default_socket(dir.root(), volume)));
    if let Endpoint::Unix(path) = &endpoint {
        export::clear_stale_socket(path)?;
    }
    if catalog.failover(v.group_id).await?.is_none() {
        // Left by an earlier failover that ended with a crash (the lock keeps others out).
        files.remove_overlay()?;
    }

    let (point, resumed) = record_failover(catalog, v, at).await?;

    // Step 4: serve the image with the persistent overlay.
    let g = catalog.group_by_id(v.group_id).await?;
    let image = LazyImage::open(
        LazyImageSpec {
            volume_id: v.id,
            agent_volume_id: v.agent_volume_id,
            size: v.size,
            seq: point.seq,
            base_floor: g.base_seq.min(point.seq),
            target: dir.target(volume),
            journal_dir: dir.journal(&g.name),
        },
        catalog.clone(),
    )?;
    let (data, map, size) = (files.overlay.clone(), files.map.clone(), v.size);
    let overlay = Arc::new(
        tokio::task::spawn_blocking(move || Overlay::open_persistent(&data, &map, size)).await??,
    );
    let listener = export::bind(&endpoint).await?;
    let export = export::serve_image(
        Served {
            name: volume.to_owned(),
            point: point.clone(),
            image,
            hold: Hold::Failover,
            overlay: Some(overlay.clone()),
            durable: true,
        },
        listener,
    );
    let e = export.info();
    let info = FailoverInfo {
        volume: volume.to_owned(),
        point,
        resumed,
        uri: e.uri.clone(),
        endpoint: e.endpoint.clone(),
    };
    Ok(FailoverHandle {
        info,
        export,
        overlay,
        catalog: catalog.clone(),
        _lock: lock,
    })
}

/// Ends the active failover of `volume` without a trace (see the module docs). Returns its
/// point.
pub async fn undo(root: &Path, volume: &str) -> Result<Seq> {
    let (dir, catalog, v) = open(root, volume).await?;
    let result = async {
        let files = FailoverFiles::of(&dir, volume);
        let Some(_lock) = FailoverLock::try_acquire(&files.lock)? else {
            return Err(served_elsewhere(volume, &files.lock, "run --undo again"));
        };
        let f = match catalog.failover(v.group_id).await? {
            None => return Err(not_failed_over(volume, "undo")),
            Some(f) if f.state == FailoverState::Active => f,
            Some(f) => {
                return Err(refuse(format!(
                    "the failover of volume {volume} at seq {} was committed (or its commit began), so it cannot be undone{}",
                    f.seq,
                    if f.state == FailoverState::Committing {
                        format!(": run `cdp-replica failover --volume {volume} --commit` again to complete it")
                    } else {
                        String::new()
                    }
                )));
            }
        };
        if !catalog.delete_active_failover(v.group_id).await? {
            return Err(not_failed_over(volume, "undo"));
        }
        files.remove_overlay()?;
        let g = catalog.group_by_id(v.group_id).await?;
        let msg = format!(
            "the failover of volume {volume} at seq {} was undone: its writes are discarded and group {} is protected again",
            f.seq, g.name
        );
        tracing::info!("{msg}");
        if let Err(e) = catalog
            .event(EventLevel::Info, Some(&g.name), Some(volume), &msg, now_ns())
            .await
        {
            tracing::warn!("could not record an event: {e}");
        }
        Ok(f.seq)
    }
    .await;
    catalog.close().await;
    result
}

/// What a failover commit did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitSummary {
    pub seq: Seq,
    /// Target files written from the journal (0 or 1).
    pub targets_from_journal: usize,
    /// Bytes copied from the overlay to the target.
    pub overlay_bytes: u64,
    /// Batch rows removed (the points after S, and the journaled ones before it).
    pub batches_removed: u64,
    /// Journal segments unlinked.
    pub segments_removed: usize,
}

/// Makes the failover of `volume` the volume for good (see the module docs).
pub async fn commit(root: &Path, volume: &str) -> Result<CommitSummary> {
    let (dir, catalog, v) = open(root, volume).await?;
    let result = commit_in(&dir, &catalog, &v).await;
    catalog.close().await;
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

async fn commit_in(dir: &DataDir, catalog: &Catalog, v: &VolumeRow) -> Result<CommitSummary> {
    let volume = v.name.as_str();
    let files = FailoverFiles::of(dir, volume);
    let Some(_lock) = FailoverLock::try_acquire(&files.lock)? else {
        return Err(served_elsewhere(volume, &files.lock, "run --commit again"));
    };
    let _serve = match ServeLock::acquire(dir) {
        Ok(l) => l,
        Err(ReplicaError::AlreadyServing { dir: d }) => {
            return Err(refuse(format!(
                "`cdp-replica serve` is running on {}: stop it first, then run --commit again (a commit rewrites the volume's target disk, which serve writes too)",
                d.display()
            )));
        }
        Err(e) => return Err(e),
    };

    // Step 1: the point of no return.
    let mut w = catalog.write_lock().await?;
    let f = match w.failover(v.group_id).await? {
        None => return Err(not_failed_over(volume, "commit")),
        Some(f) if f.state == FailoverState::Committed => {
            return Err(already_committed(volume, &f));
        }
        Some(f) => f,
    };
    if f.state == FailoverState::Active {
        let now = now_ns();
        let live: Vec<_> = w
            .pins_of_group(v.group_id)
            .await?
            .into_iter()
            .filter(|p| pins::is_live_now(p, now))
            .collect();
        if let Some(p) = live.first() {
            return Err(refuse(format!(
                "{} reader(s) hold points of volume {volume} (the first: {}, pid {}, on seq {}): stop them first, then run --commit again (a commit rewrites the target disk they read)",
                live.len(),
                p.holder,
                p.pid,
                p.seq
            )));
        }
        w.set_failover_state(v.group_id, FailoverState::Committing)
            .await?;
    }
    w.commit().await?;
    let g = catalog.group_by_id(v.group_id).await?;

    // Steps 2-3: the journal up to S, the overlay over it, fsync.
    let targets_from_journal =
        crate::apply::apply_journal(catalog, dir, g.id, &g.name, g.base_seq, f.seq, false).await?;
    let (data, map, target, size) = (
        files.overlay.clone(),
        files.map.clone(),
        dir.target(volume),
        v.size,
    );
    let overlay_bytes =
        tokio::task::spawn_blocking(move || copy_overlay(&data, &map, &target, size)).await??;

    // Step 4: one transaction.
    let done = catalog
        .finish_failover_commit(g.id, f.seq, now_ns())
        .await?
        .ok_or_else(|| {
            ReplicaError::Task(format!(
                "the failover row of volume {volume} changed during its commit"
            ))
        })?;

    // Step 5: files no row needs any more.
    files.remove_overlay()?;
    let committed = catalog.last_journaled(g.id).await?;
    let jdir = dir.journal(&g.name);
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
        "the failover of volume {volume} at seq {} was committed: the volume continues from it ({} bytes written through the failover); the points after it are gone and the agent of group {} stays refused",
        f.seq, overlay_bytes, g.name
    );
    tracing::info!("{msg}");
    if let Err(e) = catalog
        .event(
            EventLevel::Warn,
            Some(&g.name),
            Some(volume),
            &msg,
            now_ns(),
        )
        .await
    {
        tracing::warn!("could not record an event: {e}");
    }
    Ok(CommitSummary {
        seq: f.seq,
        targets_from_journal,
        overlay_bytes,
        batches_removed: done.batches,
        segments_removed,
    })
}
