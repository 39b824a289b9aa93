//! Recovery: resolving a [`PointSpec`] against a volume's window, listing the recovery points,
//! and `restore` (the image at a point written to a file or a block device).
//!
//! A volume's window runs from max(its group's base, the base a trim under way moves to, its
//! `sync_done_seq` — the batch that completed its initial sync) to its group's head; its
//! first point is the image the target file holds once the trim is done. `latest` is the
//! latest consistent batch in the window; `seq:N` is batch N exactly (an inconsistent one is
//! allowed, with a warning, since it was asked for); a bookmark is the latest batch carrying
//! it; a time is the latest consistent batch whose agent time is at or before it. Anything else is refused with one sentence naming the window's
//! first and last restorable points.
//!
//! `restore` writes to a new regular file as `PATH.partial`, sparse (all-zero 4 KiB blocks
//! are not written, leaving holes), fsyncs it and renames it into place. An existing block
//! device is written in place, every byte including zeros (a device's old contents are not
//! known to be zero, and holes mean nothing there), then fsynced; it must be at least as
//! large as the volume. A progress bar (bytes, rate, time left) is drawn on stderr when
//! stderr is a terminal, and nothing otherwise.
//!
//! Every reader of an image pins its point first ([`crate::pins`]): [`restore`] pins before it
//! plans, and releases the pin once its output is complete (after checking it held all
//! along).

use std::fs::{self, File, OpenOptions};
use std::io::{IsTerminal, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use cdp_shared::batch::BatchFlags;
use cdp_shared::point::PointSpec;
use cdp_shared::types::CHUNK_BYTES;
use chrono::{DateTime, SecondsFormat, Utc};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Serialize, Serializer};

use crate::catalog::{
    BatchRow, Catalog, GroupRow, OpenMode, PointReads, PointsFilter, VolumeRow, VolumeState,
};
use crate::datadir::{DataDir, sync_dir};
use crate::error::{ReplicaError, Result};
use crate::pins::{PinGuard, pin_point};
use crate::reconstruct::ImageReader;

/// Restore writes skip all-zero blocks of this size (leaving holes in a regular file).
pub const SPARSE_BLOCK_BYTES: usize = 4096;
/// Chunks rebuilt ahead of the restore's writer.
const RESTORE_BUFFERS: usize = 4;
/// The restore's writer syncs the output every this many bytes (the final fsync then has little
/// left to do).
const RESTORE_SYNC_BYTES: u64 = 64 << 20;
const _: () = assert!((CHUNK_BYTES as usize).is_multiple_of(SPARSE_BLOCK_BYTES));

pub(crate) fn time_of(ns: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_nanos(ns)
}

pub(crate) fn rfc3339(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

pub(crate) fn ser_time<S: Serializer>(
    t: &DateTime<Utc>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(&rfc3339(t))
}

/// The point a spec resolved to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChosenPoint {
    pub seq: u64,
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
    pub seq: u64,
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
    pub start: u64,
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
) -> Result<std::result::Result<Window, String>> {
    let sync_done = match (v.state, v.sync_done_seq) {
        (VolumeState::Protecting, Some(s)) => s,
        _ => {
            return Ok(Err(format!(
                "volume {} has no restorable point yet: its initial sync has not completed, and its window starts when it does",
                v.name
            )));
        }
    };
    if let Some(f) = reads.failover(g.id).await?
        && f.state == crate::catalog::FailoverState::Committing
    {
        return Ok(Err(format!(
            "volume {} is being failed over for good at seq {} (a `cdp-replica failover --commit` began and has not completed, so its target disk is being rewritten): run `cdp-replica failover --volume {} --commit` again to complete it",
            v.name, f.seq, v.name
        )));
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
    let w = window(reads, v, g).await?.map_err(ReplicaError::Point)?;
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
            if *n < w.start {
                return Err(refuse(format!(
                    "seq:{n} is before the window of volume {v}, which starts at {} {}; {}",
                    w.start_text(),
                    w.start_reason(),
                    w.describe()
                )));
            }
            if *n > g.head_seq {
                return Err(refuse(format!(
                    "seq:{n} is past the end of the journal of volume {v} (durable up to seq {}); {}",
                    g.head_seq,
                    w.describe()
                )));
            }
            reads.batch(g.id, *n).await?.ok_or_else(|| {
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

/// What a restore did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RestoreSummary {
    pub volume: String,
    pub point: ChosenPoint,
    pub out: PathBuf,
    /// Bytes of the image (the volume size).
    pub bytes: u64,
    /// Journal records read and applied over the target.
    pub records_applied: u64,
}

enum Output {
    /// A new regular file, written as `<path>.partial` and renamed.
    File { partial: PathBuf },
    /// A block device, written in place.
    Device,
}

fn check_out(out: &Path) -> Result<Output> {
    match fs::metadata(out) {
        Ok(m) if m.file_type().is_block_device() => Ok(Output::Device),
        Ok(m) if m.is_file() => Err(ReplicaError::OutExists {
            path: out.to_path_buf(),
        }),
        Ok(_) => Err(ReplicaError::OutNotWritable {
            path: out.to_path_buf(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut partial = out.as_os_str().to_owned();
            partial.push(".partial");
            Ok(Output::File {
                partial: PathBuf::from(partial),
            })
        }
        Err(e) => Err(ReplicaError::io("check", out)(e)),
    }
}

/// Resolves `at` for `volume`, pins the point chosen (see [`crate::pins`]) and opens a reader
/// of the image there (the reconstruction plan is built from the index in one query).
/// `restore` streams it to a file; an NBD export or the verifier can read it at random with
/// [`ImageReader::read_at`]. The image stays readable as long as the guard lives.
pub async fn open_image(
    root: &Path,
    volume: &str,
    at: &PointSpec,
    holder: &str,
) -> Result<(ChosenPoint, ImageReader, PinGuard)> {
    let (point, pin) = pin_point(root, volume, at, holder).await?;
    match pin.open_image().await {
        Ok(reader) => Ok((point, reader, pin)),
        Err(e) => {
            let _ = pin.release().await;
            Err(e)
        }
    }
}

/// Restores volume `volume` at `at` to `out` (see the module docs). Prints the chosen point
/// (and a warning for an inconsistent one) on stderr, and a progress bar when stderr is a
/// terminal.
pub async fn restore(
    root: &Path,
    volume: &str,
    at: &PointSpec,
    out: &Path,
) -> Result<RestoreSummary> {
    let output = check_out(out)?;
    let holder = format!("restore to {}", out.display());
    let (point, reader, pin) = open_image(root, volume, at, &holder).await?;
    if !point.consistent {
        tracing::warn!(
            volume,
            seq = point.seq,
            "seq {} is not a crash-consistent point (it lies inside a sync); restoring it because it was asked for",
            point.seq
        );
    }
    eprintln!("restoring volume {volume} at {point}");
    let bytes = reader.size();
    let out_path = out.to_path_buf();
    let name = volume.to_owned();
    let partial = match &output {
        Output::File { partial } => Some(partial.clone()),
        Output::Device => None,
    };
    let written = tokio::task::spawn_blocking(move || {
        let records = write_image(reader, &name, &out_path, &output)?;
        Ok::<_, ReplicaError>((records, output))
    })
    .await
    .map_err(ReplicaError::from)
    .and_then(|w| w);
    let (records_applied, output) = match written {
        Ok(w) => w,
        Err(e) => {
            // Nothing half done is left behind (a full disk gets its space back).
            if let Some(p) = &partial {
                let _ = fs::remove_file(p);
            }
            let _ = pin.release().await;
            return Err(e);
        }
    };
    // The pin held all along, or what was read may have been trimmed under the reader.
    if let Err(e) = pin.check_held().await {
        if let Output::File { partial } = &output {
            let _ = fs::remove_file(partial);
        }
        let _ = pin.release().await;
        return Err(e);
    }
    let finished = finish_output(&output, out);
    if let Err(e) = pin.release().await {
        // The output is complete; the pin just expires by itself.
        tracing::warn!(volume, "could not remove the restore's pin: {e}");
    }
    finished?;
    Ok(RestoreSummary {
        volume: volume.to_owned(),
        point,
        out: out.to_path_buf(),
        bytes,
        records_applied,
    })
}

fn progress(size: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(size), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
    {
        bar.set_style(style);
    }
    bar
}

/// Streams the image chunk by chunk into `out` (a new file's `.partial` first) and fsyncs it;
/// returns the records read from the journal.
fn write_image(mut reader: ImageReader, volume: &str, out: &Path, output: &Output) -> Result<u64> {
    let size = reader.size();
    let bar = progress(size);
    let (file, path) = match output {
        Output::File { partial } => {
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(partial)
                .map_err(ReplicaError::io("create", partial))?;
            f.set_len(size).map_err(ReplicaError::io("size", partial))?;
            (f, partial.clone())
        }
        Output::Device => {
            let mut f = OpenOptions::new()
                .write(true)
                .open(out)
                .map_err(ReplicaError::io("open", out))?;
            let device_bytes = f
                .seek(SeekFrom::End(0))
                .map_err(ReplicaError::io("measure", out))?;
            if device_bytes < size {
                return Err(ReplicaError::OutTooSmall {
                    path: out.to_path_buf(),
                    volume: volume.to_owned(),
                    device_bytes,
                    volume_bytes: size,
                });
            }
            (f, out.to_path_buf())
        }
    };
    let sparse = matches!(output, Output::File { .. });
    // Two threads: this one rebuilds chunks (reads of the target and the journal, hash checks),
    // a writer writes them and syncs every RESTORE_SYNC_BYTES, so that the rebuilding, the
    // writing and the disk's writeback overlap instead of taking turns. Buffers go round
    // between the two (fresh memory is slow to back).
    let (to_writer, written) = std::sync::mpsc::sync_channel::<(u64, Vec<u8>)>(RESTORE_BUFFERS);
    let (give_back, spare) = std::sync::mpsc::channel::<Vec<u8>>();
    let (out_file, out_path) = (&file, &path);
    let wrote = std::thread::scope(|scope| -> Result<()> {
        let writer = scope.spawn(move || -> Result<()> {
            let mut unsynced = 0u64;
            for (offset, buf) in written {
                write_chunk(out_file, out_path, offset, &buf, sparse)?;
                unsynced += buf.len() as u64;
                if unsynced >= RESTORE_SYNC_BYTES {
                    out_file
                        .sync_data()
                        .map_err(ReplicaError::io("fsync", out_path))?;
                    unsynced = 0;
                }
                let _ = give_back.send(buf);
            }
            Ok(())
        });
        let mut offset = 0u64;
        let mut read = Ok(());
        while offset < size {
            let n = (size - offset).min(CHUNK_BYTES) as usize;
            let mut buf = spare
                .try_recv()
                .unwrap_or_else(|_| vec![0u8; CHUNK_BYTES as usize]);
            buf.resize(n, 0);
            if let Err(e) = reader.read_at(offset, &mut buf) {
                read = Err(e);
                break;
            }
            if to_writer.send((offset, buf)).is_err() {
                break; // the writer failed: its error says why
            }
            offset += n as u64;
            bar.inc(n as u64);
        }
        drop(to_writer);
        let write = writer
            .join()
            .unwrap_or_else(|_| Err(ReplicaError::Task("the restore's writer panicked".into())));
        read.and(write)
    });
    wrote?;
    file.sync_all().map_err(ReplicaError::io("fsync", &path))?;
    drop(file);
    bar.finish_and_clear();
    Ok(reader.records_read())
}

/// Puts a restored file in place (a block device is already).
fn finish_output(output: &Output, out: &Path) -> Result<()> {
    if let Output::File { partial } = output {
        fs::rename(partial, out).map_err(ReplicaError::io("rename into place", out))?;
        let parent = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        sync_dir(parent)?;
    }
    Ok(())
}

/// Whether `block` (at most [`SPARSE_BLOCK_BYTES`]) is all zeros: a comparison with a zero
/// block, which the C library does many bytes at a time (a byte loop with an early exit was a
/// fifth of a restore's CPU).
fn is_zero(block: &[u8]) -> bool {
    static ZEROS: [u8; SPARSE_BLOCK_BYTES] = [0; SPARSE_BLOCK_BYTES];
    block.len() <= SPARSE_BLOCK_BYTES && block == &ZEROS[..block.len()]
}

/// Writes `chunk` at `offset`; with `sparse`, skips all-zero blocks (runs of non-zero blocks
/// are written with one call each).
fn write_chunk(file: &File, path: &Path, offset: u64, chunk: &[u8], sparse: bool) -> Result<()> {
    if !sparse {
        return file
            .write_all_at(chunk, offset)
            .map_err(ReplicaError::io("write", path));
    }
    let mut run_start: Option<usize> = None;
    let mut at = 0;
    while at < chunk.len() {
        let end = (at + SPARSE_BLOCK_BYTES).min(chunk.len());
        let zero = is_zero(&chunk[at..end]);
        match (zero, run_start) {
            (false, None) => run_start = Some(at),
            (true, Some(s)) => {
                file.write_all_at(&chunk[s..at], offset + s as u64)
                    .map_err(ReplicaError::io("write", path))?;
                run_start = None;
            }
            _ => {}
        }
        at = end;
    }
    if let Some(s) = run_start {
        file.write_all_at(&chunk[s..], offset + s as u64)
            .map_err(ReplicaError::io("write", path))?;
    }
    Ok(())
}
