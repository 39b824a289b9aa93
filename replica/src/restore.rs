//! Restore: the image at a point written to a file or a block device.
//!
//! `restore` writes to a new regular file as `PATH.partial`, sparse (all-zero 4 KiB blocks
//! are not written, leaving holes), fsyncs it and renames it into place. An existing block
//! device is written in place, every byte including zeros (a device's old contents are not
//! known to be zero, and holes mean nothing there), then fsynced; it must be at least as
//! large as the volume. A progress bar (bytes, rate, time left) is drawn on stderr when
//! stderr is a terminal, and nothing otherwise; `status` shows the same progress from the
//! restore's pin ([`crate::pins::PinProgress`]).
//!
//! Every reader of an image pins its point first ([`crate::pins`]): [`restore`] pins before it
//! plans, and releases the pin once its output is complete (after checking it held all
//! along).

use std::fs::{self, File, OpenOptions};
use std::io::{IsTerminal, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use cdp_shared::point::PointSpec;
use cdp_shared::types::CHUNK_BYTES;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::datadir::sync_dir;
use crate::error::{ReplicaError, Result};
use crate::pins::{PinGuard, PinProgress, pin_point};
use crate::points::ChosenPoint;
use crate::reconstruct::ImageReader;

/// Restore writes skip all-zero blocks of this size (leaving holes in a regular file).
pub const SPARSE_BLOCK_BYTES: usize = 4096;
/// Chunks rebuilt ahead of the restore's writer.
const RESTORE_BUFFERS: usize = 4;
/// The restore's writer syncs the output every this many bytes (the final fsync then has little
/// left to do).
const RESTORE_SYNC_BYTES: u64 = 64 << 20;
const _: () = assert!((CHUNK_BYTES as usize).is_multiple_of(SPARSE_BLOCK_BYTES));

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
            seq = point.seq.0,
            "seq {} is not a crash-consistent point (it lies inside a sync); restoring it because it was asked for",
            point.seq
        );
    }
    eprintln!("restoring volume {volume} at {point}");
    let bytes = reader.size();
    // `status` shows how far it is, with the rate and the time left.
    let progress = pin.progress();
    progress.set_total(bytes);
    let out_path = out.to_path_buf();
    let name = volume.to_owned();
    let partial = match &output {
        Output::File { partial } => Some(partial.clone()),
        Output::Device => None,
    };
    let written = tokio::task::spawn_blocking(move || {
        let records = write_image(reader, &name, &out_path, &output, &progress)?;
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
            count(&pin, "failed").await;
            let _ = pin.release().await;
            return Err(e);
        }
    };
    // The pin held all along, or what was read may have been trimmed under the reader.
    if let Err(e) = pin.check_held().await {
        if let Output::File { partial } = &output {
            let _ = fs::remove_file(partial);
        }
        count(&pin, "failed").await;
        let _ = pin.release().await;
        return Err(e);
    }
    let finished = finish_output(&output, out);
    count(&pin, if finished.is_ok() { "done" } else { "failed" }).await;
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

/// Counts the restore's outcome for /metrics (best effort: a restore does not fail for it).
async fn count(pin: &PinGuard, outcome: &str) {
    if let Err(e) = pin
        .catalog()
        .count_reader(pin.volume_row().id, "restore", outcome)
        .await
    {
        tracing::debug!("could not count a restore: {e}");
    }
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
fn write_image(
    mut reader: ImageReader,
    volume: &str,
    out: &Path,
    output: &Output,
    done: &PinProgress,
) -> Result<u64> {
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
            done.add(n as u64);
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
