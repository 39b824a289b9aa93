//! The replica verifier's questions: the hash of a chunk at a batch boundary
//! (`VerifyRequest`), and repairs (`RepairRequest`: chunks marked dirty and resent through the
//! log).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use cdp_shared::cause::Cause;
use cdp_shared::types::{CHUNK_BYTES, Seq, VolumeId};

use super::Group;
use crate::clock::now_ns;
use crate::range_lock::wait_all;

impl Group {
    /// The verifier's question: the blake3 of a chunk as the device holds it at a batch
    /// boundary, and that boundary's seq S. The chunk is read under its range lock after every
    /// earlier write to it completed and with the open batch sealed, so its bytes are exactly
    /// the image at S in that chunk; later writes wait until the read is done. Refused while
    /// the chunk's writes are not all in the log (an initial sync, an overflow, a dirty chunk,
    /// a hash-compare resync).
    pub async fn hash_chunk_at_boundary(
        self: &Arc<Self>,
        volume: VolumeId,
        chunk: u64,
    ) -> Result<(Seq, [u8; 32]), String> {
        let vol = self
            .volumes
            .get(volume as usize)
            .ok_or_else(|| format!("no volume {volume} in group {}", self.name))?
            .clone();
        if chunk >= vol.chunks() {
            return Err(format!(
                "chunk {chunk} is past the end of volume {}",
                vol.name
            ));
        }
        let start = chunk * CHUNK_BYTES;
        let len = vol.chunk_len(chunk);
        let (place, waits) = self.admit(volume, start, start + len);
        wait_all(waits).await;
        let seq = {
            let mut inner = self.lock();
            if vol.syncing.load(Ordering::Relaxed)
                || inner.syncing > 0
                || inner.vols[volume as usize].awaiting_sync
            {
                return Err(format!("volume {} is being synced", vol.name));
            }
            if inner.overflow_since.is_some() {
                return Err(format!(
                    "group {} overflowed: its latest writes are not in the log",
                    self.name
                ));
            }
            if inner.vols[volume as usize].dirty.is_set(chunk) {
                return Err(format!(
                    "chunk {chunk} of volume {} waits for a resync",
                    vol.name
                ));
            }
            let inconsistent = inner.inconsistent();
            let sealed = inner.batcher.seal(0, None, inconsistent, now_ns());
            self.to_spool(sealed);
            inner.batcher.last_sealed()
        };
        let dev = vol.dev.clone();
        let hash = tokio::task::spawn_blocking(move || -> std::io::Result<[u8; 32]> {
            let mut buf = vec![0u8; len as usize];
            dev.read_uncached(&mut buf, start, None)?;
            Ok(*blake3::hash(&buf).as_bytes())
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("read chunk {chunk} of volume {}: {e}", vol.name))?;
        drop(place);
        Ok((seq, hash))
    }

    /// Marks `chunks` of `volume` for resync (the verifier's repair): durably in the dirty
    /// map, then wakes the maintenance task, which sends them through the ordered log as the
    /// device holds them and seals the consistent point that ends the resync. Returns the last
    /// sealed seq: the repaired bytes arrive in batches after it. Refused for an unknown volume,
    /// a chunk past the end, or a volume in its initial sync (the sync sends every chunk).
    pub async fn repair_chunks(
        self: &Arc<Self>,
        volume: VolumeId,
        chunks: &[u64],
    ) -> Result<Seq, String> {
        let vol = self
            .volumes
            .get(volume as usize)
            .ok_or_else(|| format!("no volume {volume} in group {}", self.name))?
            .clone();
        if let Some(c) = chunks.iter().find(|c| **c >= vol.chunks()) {
            return Err(format!(
                "chunk {c} is past the end of volume {} ({} chunks)",
                vol.name,
                vol.chunks()
            ));
        }
        if vol.syncing.load(Ordering::Relaxed) {
            return Err(format!(
                "volume {} is in its initial sync, which sends every chunk anyway",
                vol.name
            ));
        }
        let seq = {
            let mut inner = self.lock();
            for c in chunks {
                inner.mark_dirty(volume, *c, *c, Cause::ResyncingRepair);
            }
            inner.batcher.last_sealed()
        };
        self.save_dirty_maps()
            .await
            .map_err(|e| format!("save the dirty map of volume {}: {e}", vol.name))?;
        tracing::info!(group = %self.name, volume = %vol.name, chunks = chunks.len(), "the replica asked for a repair: chunks marked for resync");
        self.bump();
        Ok(seq)
    }
}
