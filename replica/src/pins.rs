//! Pins: a reader's hold on a recovery point, so that the trimmer does not move the base past
//! it (or unlink a journal segment it reads) while it reads.
//!
//! Every reader of an image pins its point for as long as it reads: `restore` (from before it
//! plans until its output is complete), the chunk-hash service (the head, per request), and
//! later `export`, `diff` and the verifier. The API:
//!
//! * [`pin_point`] resolves a [`PointSpec`] for a volume and pins the point chosen, atomically
//!   with respect to the trimmer; it returns the [`ChosenPoint`] and a [`PinGuard`].
//! * [`PinGuard::open_image`] opens a reader of the image at the pinned point.
//! * The guard renews the pin in the background (a tokio task, every [`PIN_RENEW_INTERVAL`])
//!   until it is released ([`PinGuard::release`]) or dropped (the row is then removed
//!   best-effort; if that cannot happen, the pin expires).
//! * [`PinGuard::check_held`] says whether the pin held all along; a reader calls it before it
//!   declares its output complete (`restore` does, before renaming its file into place).
//!
//! # How a pin and the trimmer are serialized
//! Both take SQLite's write lock (`BEGIN IMMEDIATE`, [`Catalog::write_lock`]) for the
//! transaction that decides: the pin to resolve its point and record the pin row; the trimmer
//! (its step (a)) to read the live pins, choose the new base B' ≤ the oldest of them, and
//! record its intent `trimming_to = B'`. Write transactions are serialized, so one of the two
//! comes first:
//! * the pin first: the trimmer sees the pin and chooses B' ≤ its seq;
//! * the trimmer first: the pin sees `trimming_to`, and resolves only points ≥ B' (a
//!   window starts at max(base, trimming_to, the volume's sync_done_seq)).
//!
//! Either way the base never passes a live pin. The pin also records `segment_min`, the lowest
//! journal segment holding a batch in (base, seq] when it was taken: the reader's plan reads
//! records only from there on, and the trimmer's step (e) unlinks no segment numbered
//! `segment_min` or above while the pin lives.
//!
//! # When a pin is dead
//! A pin expires [`PIN_TTL`] after its last renewal. A pin taken in this machine's pid
//! namespace whose process no longer exists is dead at once (a reader killed with SIGKILL
//! never removes its pin). The trimmer deletes dead pins in the same transaction in which it
//! stops respecting them, so a pin row that still exists was respected: a holder that stalled
//! longer than the TTL finds its row gone at its next renewal, and [`PinGuard::check_held`]
//! fails rather than vouch for an image that may have been trimmed under it.
//!
//! Every reader of the replica's binaries pins with [`PinTiming::default`]; the library's
//! [`pin_point_with`] takes another timing, so that tests see a stalled reader's pin expire in
//! seconds.

use cdp_shared::types::Seq;
use std::path::Path;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use cdp_shared::point::PointSpec;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::catalog::OpenMode;
use crate::catalog::{Catalog, GroupRow, NewPin, PinRow, VolumeRow, WriteLock};
use crate::clock::now_ns;
use crate::datadir::DataDir;
use crate::error::{ReplicaError, Result};
use crate::lazy_image::{LazyImage, LazyImageSpec};
use crate::points::{ChosenPoint, resolve};
use crate::reconstruct::{ImageReader, Plan, RecordRef};

/// How long a pin lives after its last renewal.
pub const PIN_TTL: Duration = Duration::from_secs(30);
/// How often a holder renews its pin.
pub const PIN_RENEW_INTERVAL: Duration = Duration::from_secs(10);
/// How often a holder writes its progress ([`PinGuard::progress`]) to its pin's row.
pub const PIN_PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// Pins a group may hold at once (readers beyond are refused with a clear error).
pub const PINS_PER_GROUP_MAX: usize = 1024;

// A holder renews at least twice per TTL, so one late renewal does not lose its pin.
const _: () = assert!(PIN_RENEW_INTERVAL.as_millis() * 2 < PIN_TTL.as_millis());

/// How far a pin's holder has read its image, in bytes: `status` shows it with a rate and the
/// time left. The holder counts; the guard writes it to the pin's row about every second.
#[derive(Debug, Default)]
pub struct PinProgress {
    done: AtomicU64,
    /// 0: not known (a reader without an end).
    total: AtomicU64,
}

impl PinProgress {
    /// The bytes the holder reads in all.
    pub fn set_total(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
    }

    /// `n` more bytes read.
    pub fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes read, and of how many (None: not known).
    pub fn get(&self) -> (u64, Option<u64>) {
        let total = self.total.load(Ordering::Relaxed);
        (
            self.done.load(Ordering::Relaxed),
            (total > 0).then_some(total),
        )
    }
}

/// The TTL and renewal interval of the pins this process takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinTiming {
    pub ttl: Duration,
    pub renew: Duration,
}

impl Default for PinTiming {
    /// [`PIN_TTL`], renewed every [`PIN_RENEW_INTERVAL`].
    fn default() -> PinTiming {
        PinTiming {
            ttl: PIN_TTL,
            renew: PIN_RENEW_INTERVAL,
        }
    }
}

impl PinTiming {
    /// A TTL of `ttl` (at least 30 ms), renewed every third of it.
    pub fn with_ttl(ttl: Duration) -> PinTiming {
        let ttl = ttl.max(Duration::from_millis(30));
        PinTiming {
            ttl,
            renew: ttl / 3,
        }
    }
}

fn ns_of(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// This process's pid namespace (`pid:[4026531836]`), when it can be read.
pub(crate) fn pid_namespace() -> Option<&'static str> {
    static NS: OnceLock<Option<String>> = OnceLock::new();
    NS.get_or_init(|| {
        std::fs::read_link("/proc/self/ns/pid")
            .ok()
            .and_then(|p| p.to_str().map(str::to_owned))
    })
    .as_deref()
}

/// Whether process `pid` exists (in this pid namespace). A process of another user exists too.
fn process_exists(pid: i64) -> bool {
    match i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        Some(pid) => !matches!(
            rustix::process::test_kill_process(pid),
            Err(rustix::io::Errno::SRCH)
        ),
        None => false,
    }
}

/// Whether a pin is live at `now_ns` (sans-IO): not expired, and — when it was taken in the
/// pid namespace `here` — its process exists (`exists` is asked only then).
pub fn is_live(
    pin: &PinRow,
    now_ns: i64,
    here: Option<&str>,
    exists: impl FnOnce(i64) -> bool,
) -> bool {
    if pin.expires_ns <= now_ns {
        return false;
    }
    match (pin.pid_ns.as_deref(), here) {
        (Some(theirs), Some(ours)) if theirs == ours => exists(pin.pid),
        _ => true,
    }
}

/// Whether a pin is live now, on this machine.
pub(crate) fn is_live_now(pin: &PinRow, now_ns: i64) -> bool {
    is_live(pin, now_ns, pid_namespace(), process_exists)
}

/// The live pins of a group, oldest seq first (dead ones are left for the trimmer).
pub async fn live_pins(catalog: &Catalog, group_id: i64) -> Result<Vec<PinRow>> {
    let now = now_ns();
    Ok(catalog
        .pins_of_group(group_id)
        .await?
        .into_iter()
        .filter(|p| is_live_now(p, now))
        .collect())
}

/// Under the write lock: deletes the group's dead pins (logging each) and returns the live
/// ones, oldest seq first. Used by the trimmer's step (a).
pub(crate) async fn collect_dead_pins(
    lock: &mut WriteLock,
    group: &GroupRow,
) -> Result<Vec<PinRow>> {
    let now = now_ns();
    let mut live = Vec::new();
    for pin in lock.pins_of_group(group.id).await? {
        if is_live_now(&pin, now) {
            live.push(pin);
        } else {
            let why = if pin.expires_ns <= now {
                "it expired"
            } else {
                "its process is gone"
            };
            tracing::info!(
                group = %group.name,
                "dropped the pin of {} (pid {}) on seq {}: {why}",
                pin.holder,
                pin.pid,
                pin.seq
            );
            lock.delete_dead_pin(&pin).await?;
        }
    }
    Ok(live)
}

/// What a pin is taken on.
pub(crate) enum PinAt<'a> {
    /// A recovery point as the operator wrote it.
    Spec(&'a PointSpec),
    /// The group's durable head (the chunk-hash service).
    Head,
}

/// Resolves `at` for `volume` and pins the chosen point, atomically with respect to the
/// trimmer (see the module docs). `holder` says who reads, for people (`status`, logs). The
/// guard renews the pin until it is released or dropped.
pub async fn pin_point(
    root: &Path,
    volume: &str,
    at: &PointSpec,
    holder: &str,
) -> Result<(ChosenPoint, PinGuard)> {
    pin_point_with(root, volume, at, holder, PinTiming::default()).await
}

/// [`pin_point`] with another TTL and renewal interval than the default.
pub async fn pin_point_with(
    root: &Path,
    volume: &str,
    at: &PointSpec,
    holder: &str,
    timing: PinTiming,
) -> Result<(ChosenPoint, PinGuard)> {
    let dir = DataDir::existing(root)?;
    let catalog = Catalog::open(&dir.catalog(), OpenMode::Existing).await?;
    let result = pin_in(
        &dir,
        &catalog,
        volume,
        PinAt::Spec(at),
        holder,
        true,
        timing,
    )
    .await;
    if result.is_err() {
        catalog.close().await;
    }
    result
}

/// [`pin_point`] on an open catalog, with `timing`; `owns_catalog` makes the guard close it
/// at the end.
pub(crate) async fn pin_in(
    dir: &DataDir,
    catalog: &Catalog,
    volume: &str,
    at: PinAt<'_>,
    holder: &str,
    owns_catalog: bool,
    timing: PinTiming,
) -> Result<(ChosenPoint, PinGuard)> {
    let mut lock = catalog.write_lock().await?;
    // Every read below is made inside the transaction that records the pin.
    let Some(v) = lock.volume_by_name(volume).await? else {
        return Err(ReplicaError::UnknownVolume {
            volume: volume.to_owned(),
            dir: dir.root().to_path_buf(),
        });
    };
    let group = lock.group(v.group_id).await?;
    let pins = lock.pins_of_group(group.id).await?;
    if pins.len() >= PINS_PER_GROUP_MAX {
        return Err(ReplicaError::Point(format!(
            "group {} already has {} readers holding points (at most {PINS_PER_GROUP_MAX}); wait for some to finish and try again",
            group.name,
            pins.len()
        )));
    }
    let spec = match at {
        PinAt::Spec(s) => s.clone(),
        PinAt::Head => PointSpec::Seq(group.head_seq.0),
    };
    let (point, segment_min) = resolve_held(&mut lock, &v, &group, &spec).await?;
    let now = now_ns();
    let id = lock
        .insert_pin(&NewPin {
            group_id: group.id,
            volume_id: v.id,
            seq: point.seq,
            segment_min,
            holder,
            pid: std::process::id(),
            pid_ns: pid_namespace(),
            now_ns: now,
            expires_ns: now.saturating_add(ns_of(timing.ttl)),
        })
        .await?;
    lock.commit().await?;
    tracing::debug!(volume, seq = point.seq.0, holder, "pinned");
    let guard = PinGuard::start(PinInner {
        id,
        seq: point.seq,
        volume: v,
        dir: dir.clone(),
        catalog: catalog.clone(),
        owns_catalog,
        lost: Arc::new(AtomicBool::new(false)),
        progress: Arc::new(PinProgress::default()),
        stop: CancellationToken::new(),
        renewer: None,
        timing,
    });
    Ok((point, guard))
}

/// Inside the write transaction that records a hold on a point (a pin, or a failover row):
/// resolves `spec` for `v` (the window check included) and returns the point with the lowest
/// journal segment a reader of its image may read (`segment_min`).
pub(crate) async fn resolve_held(
    lock: &mut WriteLock,
    v: &VolumeRow,
    group: &GroupRow,
    spec: &PointSpec,
) -> Result<(ChosenPoint, Option<u64>)> {
    let point = resolve(lock, v, group, spec).await?;
    let segment_min = lock
        .first_segment(group.id, group.base_seq, point.seq)
        .await?;
    Ok((point, segment_min))
}

struct PinInner {
    id: i64,
    seq: Seq,
    volume: VolumeRow,
    dir: DataDir,
    catalog: Catalog,
    owns_catalog: bool,
    /// Set when a renewal found the pin gone.
    lost: Arc<AtomicBool>,
    progress: Arc<PinProgress>,
    stop: CancellationToken,
    renewer: Option<JoinHandle<()>>,
    timing: PinTiming,
}

/// A live pin on one point of one volume (see the module docs). Renews itself in the
/// background until [`PinGuard::release`]d or dropped.
pub struct PinGuard {
    inner: Option<PinInner>,
}

impl std::fmt::Debug for PinGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Some(i) => write!(
                f,
                "PinGuard({} at seq {}, pin {})",
                i.volume.name, i.seq, i.id
            ),
            None => write!(f, "PinGuard(released)"),
        }
    }
}

impl PinGuard {
    fn start(mut inner: PinInner) -> PinGuard {
        let (catalog, id, lost, stop, timing) = (
            inner.catalog.clone(),
            inner.id,
            inner.lost.clone(),
            inner.stop.clone(),
            inner.timing,
        );
        let progress = inner.progress.clone();
        let volume = inner.volume.name.clone();
        inner.renewer = Some(tokio::spawn(async move {
            let tick = PIN_PROGRESS_INTERVAL.min(timing.renew);
            let mut renew_at = tokio::time::Instant::now() + timing.renew;
            let mut written = (0, None);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(tick) => {}
                }
                let now = progress.get();
                if now != written {
                    match catalog.pin_progress(id, now.0, now.1).await {
                        Ok(_) => written = now,
                        Err(e) => {
                            tracing::debug!(volume, "could not record a reader's progress: {e}")
                        }
                    }
                }
                if tokio::time::Instant::now() < renew_at {
                    continue;
                }
                renew_at = tokio::time::Instant::now() + timing.renew;
                match catalog
                    .renew_pin(id, now_ns().saturating_add(ns_of(timing.ttl)))
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(
                            volume,
                            "the pin of this reader expired before it was renewed (the process stalled?); what it reads is no longer protected from trimming"
                        );
                        lost.store(true, Ordering::SeqCst);
                        return;
                    }
                    Err(e) => tracing::debug!(volume, "could not renew a pin (trying again): {e}"),
                }
            }
        }));
        PinGuard { inner: Some(inner) }
    }

    fn inner(&self) -> &PinInner {
        match &self.inner {
            Some(i) => i,
            None => unreachable!("a PinGuard is only emptied by release or drop"),
        }
    }

    /// The pinned seq.
    pub fn seq(&self) -> Seq {
        self.inner().seq
    }

    /// The pinned volume's name.
    pub fn volume(&self) -> &str {
        &self.inner().volume.name
    }

    /// The pin's row id in the catalog.
    pub fn id(&self) -> i64 {
        self.inner().id
    }

    /// The holder's progress through the image (see [`PinProgress`]).
    pub fn progress(&self) -> Arc<PinProgress> {
        self.inner().progress.clone()
    }

    /// False once a renewal found the pin gone (see [`PinGuard::check_held`]).
    pub fn is_held(&self) -> bool {
        !self.inner().lost.load(Ordering::SeqCst)
    }

    /// Renews the pin now and succeeds when it held all along; `Err(PinLost)` when it was lost
    /// (the holder stalled past the TTL and the trimmer dropped it), in which case what was
    /// read since may not be the image at the pinned point.
    pub async fn check_held(&self) -> Result<()> {
        let i = self.inner();
        let renewed = i
            .catalog
            .renew_pin(i.id, now_ns().saturating_add(ns_of(i.timing.ttl)))
            .await?;
        if renewed && self.is_held() {
            return Ok(());
        }
        i.lost.store(true, Ordering::SeqCst);
        Err(ReplicaError::PinLost(format!(
            "the pin on seq {} of volume {} was lost while reading (the process stalled for more than the pin's {} s time to live, so the trimmer may have moved past it); the output is incomplete: run the command again",
            i.seq,
            i.volume.name,
            i.timing.ttl.as_secs_f64()
        )))
    }

    /// Opens a reader of the image at the pinned point: the target file overlaid by the
    /// volume's journal records in (base, seq] (one index query, as the base stands now).
    pub async fn open_image(&self) -> Result<ImageReader> {
        let i = self.inner();
        let group = i.catalog.group_by_id(i.volume.group_id).await?;
        let rows = i
            .catalog
            .records(i.volume.id, group.base_seq, i.seq)
            .await?;
        self.reader(&group, &rows)
    }

    /// Like [`PinGuard::open_image`], for reads inside chunks `chunks` only (the records of
    /// other chunks are left out of the plan: reads there are not the image).
    pub async fn open_image_chunks(&self, chunks: std::ops::Range<u64>) -> Result<ImageReader> {
        let i = self.inner();
        let group = i.catalog.group_by_id(i.volume.group_id).await?;
        let rows = i
            .catalog
            .records_in_chunks(
                i.volume.id,
                group.base_seq,
                i.seq,
                chunks.start,
                chunks.end,
                cdp_shared::types::chunk_len_of(i.volume.size),
            )
            .await?;
        self.reader(&group, &rows)
    }

    /// Opens the image at the pinned point for reads at random, planned chunk by chunk as
    /// reads reach them ([`LazyImage`]: no full plan, so this is quick however long the
    /// journal). It shares the guard's catalog: read it before the guard is released.
    pub async fn lazy_image(&self) -> Result<LazyImage> {
        let i = self.inner();
        let group = i.catalog.group_by_id(i.volume.group_id).await?;
        LazyImage::open(
            LazyImageSpec {
                volume_id: i.volume.id,
                agent_volume_id: i.volume.agent_volume_id,
                size: i.volume.size,
                seq: i.seq,
                base_floor: group.base_seq.min(i.seq),
                target: i.dir.target(&i.volume.name),
                journal_dir: i.dir.journal(&group.name),
            },
            i.catalog.clone(),
        )
    }

    /// The guard's catalog (the readers of the pinned image query it).
    pub fn catalog(&self) -> &Catalog {
        &self.inner().catalog
    }

    /// The pinned volume.
    pub fn volume_row(&self) -> &VolumeRow {
        &self.inner().volume
    }

    fn reader(&self, group: &GroupRow, rows: &[crate::catalog::RecordRow]) -> Result<ImageReader> {
        let i = self.inner();
        let plan = Plan::build(
            i.volume.size,
            rows.iter()
                .map(RecordRef::from_row)
                .collect::<Result<Vec<_>>>()?,
        )?;
        ImageReader::open(
            plan,
            i.volume.agent_volume_id,
            &i.dir.target(&i.volume.name),
            &i.dir.journal(&group.name),
        )
    }

    /// Removes the pin (the trimmer may then move past its point) and stops renewing it.
    pub async fn release(mut self) -> Result<()> {
        let Some(mut i) = self.inner.take() else {
            return Ok(());
        };
        i.stop.cancel();
        if let Some(r) = i.renewer.take() {
            let _ = r.await;
        }
        let result = i.catalog.delete_pin(i.id).await.map(|_| ());
        if i.owns_catalog {
            i.catalog.close().await;
        }
        result
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let Some(i) = self.inner.take() else {
            return;
        };
        i.stop.cancel();
        // Best-effort: without a runtime the pin just expires.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = i.catalog.delete_pin(i.id).await {
                    tracing::debug!("could not remove a pin (it expires by itself): {e}");
                }
                if i.owns_catalog {
                    i.catalog.close().await;
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pin(expires_ns: i64, pid_ns: Option<&str>) -> PinRow {
        PinRow {
            id: 1,
            group_id: 1,
            volume_id: 1,
            seq: Seq(5),
            segment_min: None,
            holder: "t".into(),
            pid: 42,
            pid_ns: pid_ns.map(str::to_owned),
            created_ns: 0,
            expires_ns,
            done_bytes: 0,
            total_bytes: None,
        }
    }

    #[test]
    fn a_pin_dies_when_it_expires_or_its_process_is_gone_here() {
        let here = Some("pid:[1]");
        let alive = |_| true;
        let gone = |_| false;
        assert!(is_live(&pin(100, here), 99, here, alive));
        assert!(!is_live(&pin(100, here), 100, here, alive));
        assert!(!is_live(&pin(100, here), 99, here, gone));
        // Another pid namespace (or an unknown one): only the TTL counts.
        assert!(is_live(&pin(100, Some("pid:[2]")), 99, here, gone));
        assert!(is_live(&pin(100, None), 99, here, gone));
        assert!(is_live(&pin(100, here), 99, None, gone));
        assert!(process_exists(i64::from(std::process::id())));
    }

    #[test]
    fn a_pin_is_renewed_at_least_twice_per_ttl() {
        let t = PinTiming::default();
        assert_eq!((t.ttl, t.renew), (PIN_TTL, PIN_RENEW_INTERVAL));
        for ms in [0, 30, 31, 1000, 60_000] {
            let t = PinTiming::with_ttl(Duration::from_millis(ms));
            assert!(t.ttl >= Duration::from_millis(30), "{ms}");
            assert!(t.renew * 2 < t.ttl, "{ms}: {t:?}");
        }
    }
}
