//! `diff`: the extents of a volume whose bytes differ between two recovery points (the input
//! of a changed-block backup).
//!
//! The answer is 1 MiB-chunk granular and exact at that granularity: an extent is a run of
//! adjacent chunks whose bytes differ between the images at the two points — exactly the
//! chunks whose bytes differ between `restore`s of the two points. How:
//! 1. Both points are pinned ([`crate::pins`]) for the whole computation: the older pin keeps
//!    the base at or below it, so every record between the two points stays readable.
//! 2. Candidates: the chunks that records with seq in (older, newer] change (one catalog read,
//!    [`crate::catalog::Catalog::chunks_changed`]). A chunk no such record touches is the same
//!    at both points.
//! 3. Each candidate is reconstructed at both points ([`LazyImage`], chunk plans built on
//!    demand) and compared: a rewrite of identical bytes, or a write later undone, is not a
//!    difference.
//! 4. Adjacent differing chunks are merged into one extent ([`merge_chunks`]); the last chunk
//!    of a volume whose size is not a multiple of 1 MiB is reported short.
//!
//! The order of the two points does not matter to the extents; the report keeps them as
//! given. Both pins are checked before the report is returned (a lost pin fails the diff).

use std::path::Path;

use cdp_shared::point::PointSpec;
use cdp_shared::types::CHUNK_BYTES;
use serde::Serialize;

use crate::error::Result;
use crate::pins::{PinGuard, pin_point};
use crate::points::ChosenPoint;

/// Candidate chunks compared at once (each comparison holds two chunks in memory).
pub const DIFF_CHUNKS_IN_FLIGHT_MAX: usize = 4;

/// A byte range of the volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
}

/// What `diff` found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DiffReport {
    pub volume: String,
    pub from: ChosenPoint,
    pub to: ChosenPoint,
    /// Ascending, disjoint, not adjacent.
    pub extents: Vec<Extent>,
    /// Bytes the extents cover.
    pub bytes: u64,
}

/// Merges ascending chunk indexes into extents of a `size`-byte volume: adjacent chunks become
/// one extent, the last chunk ends at the volume's end (sans-IO).
pub fn merge_chunks(chunks: &[u64], size: u64) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for &c in chunks {
        let offset = c * CHUNK_BYTES;
        if offset >= size {
            continue;
        }
        let length = CHUNK_BYTES.min(size - offset);
        match out.last_mut() {
            Some(e) if e.offset + e.length == offset => e.length += length,
            _ => out.push(Extent { offset, length }),
        }
    }
    out
}

/// The extents of `volume` that differ between the points `from` and `to` (see the module
/// docs).
pub async fn diff(
    root: &Path,
    volume: &str,
    from: &PointSpec,
    to: &PointSpec,
) -> Result<DiffReport> {
    let holder = format!("diff of {volume}");
    let (from_point, from_pin) = pin_point(root, volume, from, &holder).await?;
    let (to_point, to_pin) = match pin_point(root, volume, to, &holder).await {
        Ok(p) => p,
        Err(e) => {
            let _ = from_pin.release().await;
            return Err(e);
        }
    };
    let result = compare(&from_pin, &to_pin).await;
    let held = match from_pin.check_held().await {
        Ok(()) => to_pin.check_held().await,
        Err(e) => Err(e),
    };
    for pin in [from_pin, to_pin] {
        if let Err(e) = pin.release().await {
            tracing::warn!(
                volume,
                "could not remove a diff's pin (it expires by itself): {e}"
            );
        }
    }
    let chunks = result?;
    held?;
    let extents = merge_chunks(&chunks.differing, chunks.size);
    Ok(DiffReport {
        volume: volume.to_owned(),
        bytes: extents.iter().map(|e| e.length).sum(),
        from: from_point,
        to: to_point,
        extents,
    })
}

struct Compared {
    size: u64,
    differing: Vec<u64>,
}

/// Steps 2 and 3 of the module docs.
async fn compare(a: &PinGuard, b: &PinGuard) -> Result<Compared> {
    let (lo, hi) = (a.seq().min(b.seq()), a.seq().max(b.seq()));
    let size = a.volume_row().size;
    let candidates = a
        .catalog()
        .chunks_changed(a.volume_row().id, lo, hi)
        .await?;
    let (ia, ib) = (a.lazy_image().await?, b.lazy_image().await?);
    let mut differing = Vec::new();
    for group in candidates.chunks(DIFF_CHUNKS_IN_FLIGHT_MAX) {
        let mut tasks = Vec::with_capacity(group.len());
        for &c in group {
            let offset = c * CHUNK_BYTES;
            if offset >= size {
                continue;
            }
            let len = CHUNK_BYTES.min(size - offset);
            let (ia, ib) = (ia.clone(), ib.clone());
            tasks.push(tokio::spawn(async move {
                let (x, y) = tokio::try_join!(ia.read(offset, len), ib.read(offset, len))?;
                Ok::<_, crate::ReplicaError>((c, x != y))
            }));
        }
        for t in tasks {
            let (c, differs) = t.await??;
            if differs {
                differing.push(c);
            }
        }
    }
    Ok(Compared { size, differing })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_chunks_merge_and_the_last_one_is_short() {
        let size = 5 * CHUNK_BYTES + 100;
        let e = |offset, length| Extent { offset, length };
        assert_eq!(merge_chunks(&[], size), vec![]);
        assert_eq!(
            merge_chunks(&[0, 1, 3, 5], size),
            vec![
                e(0, 2 * CHUNK_BYTES),
                e(3 * CHUNK_BYTES, CHUNK_BYTES),
                e(5 * CHUNK_BYTES, 100)
            ]
        );
        assert_eq!(
            merge_chunks(&[4, 5, 6], size),
            vec![e(4 * CHUNK_BYTES, CHUNK_BYTES + 100)]
        );
    }
}
