//! The chunk-hash service: the blake3 hash of each 1 MiB chunk of a volume's latest image
//! (at its group's durable head when asked), for the agent's hash-compare resync (DESIGN 3.5)
//! and, later, the verifier.
//!
//! * [`check_request`] is the sans-IO part: which requests are answered, and the one-sentence
//!   refusal of the others.
//! * [`chunk_hashes`] reads the image: it pins the group's durable head S (`pins`), then makes
//!   ONE index query for the records of the chunk range with seq in (base, S], a
//!   reconstruction plan over them, and reads the target file and journal records through
//!   `ImageReader` (every record read once and checked against its hash) into one reused chunk
//!   buffer, on a blocking thread; then it releases the pin. Records with seq ≤ S never change
//!   once committed, ingest does not write a protecting volume's target file, and the pin
//!   keeps the trimmer from moving the base past S or unlinking a segment the plan reads; so
//!   the answer is the image at S however ingest and the trimmer move on meanwhile.

use cdp_shared::types::Seq;
use cdp_shared::types::{CHUNK_BYTES, VolumeId, chunk_count};
use cdp_shared::wire::{CONTROL_FRAME_BYTES_MAX, HASHES_PER_MESSAGE_MAX};

use crate::catalog::{Catalog, VolumeState};
use crate::datadir::DataDir;
use crate::error::{Decided, ReplicaError, Result};
use crate::pins::{PinAt, PinTiming, pin_in};

// A full reply (64 hex digits, quotes and a comma per hash, plus the envelope) fits a frame.
const _: () = assert!((HASHES_PER_MESSAGE_MAX as usize) * 70 + 1024 <= CONTROL_FRAME_BYTES_MAX);

/// The answer to a hash request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkHashes {
    /// The seq of the image hashed (the group's durable head when the hashes were taken).
    pub seq: Seq,
    pub first_chunk: u64,
    pub hashes: Vec<blake3::Hash>,
}

impl ChunkHashes {
    /// The hashes as the wire carries them (64 lowercase hex digits each).
    pub fn hex(&self) -> Vec<String> {
        self.hashes.iter().map(|h| h.to_hex().to_string()).collect()
    }
}

/// Whether a hash request for chunks `first_chunk..first_chunk + count` of volume `name`
/// (`size` bytes, in `state`) is answered; `Err` is the sentence for the agent.
pub fn check_request(
    name: &str,
    size: u64,
    state: VolumeState,
    first_chunk: u64,
    count: u32,
) -> std::result::Result<(), String> {
    if state != VolumeState::Protecting {
        return Err(format!(
            "volume {name} is {} on the replica, not protecting: it has no image to hash until its initial sync completes",
            state.as_str()
        ));
    }
    if count == 0 || count > HASHES_PER_MESSAGE_MAX {
        return Err(format!(
            "a hash request asks for {count} chunks; ask for 1 to {HASHES_PER_MESSAGE_MAX} at a time"
        ));
    }
    let chunks = chunk_count(size);
    let end = first_chunk.saturating_add(u64::from(count));
    if end > chunks {
        return Err(format!(
            "chunks {first_chunk} to {} are past the end of volume {name}, which has {chunks} chunks",
            end - 1
        ));
    }
    Ok(())
}

/// The hashes of chunks `first_chunk..first_chunk + count` of volume `volume` (the agent's
/// id) of group `group`, at the group's durable head. The outer error is the replica's own
/// failure (an unreadable catalog, target or journal record); the inner one the refusal
/// sentence for the agent.
pub async fn chunk_hashes(
    dir: &DataDir,
    catalog: &Catalog,
    group: &str,
    volume: VolumeId,
    first_chunk: u64,
    count: u32,
) -> Decided<ChunkHashes> {
    let Some(g) = catalog.group_by_name(group).await? else {
        return Ok(Err(format!("the replica has no group {group}").into()));
    };
    let Some(v) = catalog
        .volumes_of_group(g.id)
        .await?
        .into_iter()
        .find(|v| v.agent_volume_id == volume)
    else {
        return Ok(Err(format!(
            "group {group} has no volume with id {volume} on the replica"
        )
        .into()));
    };
    if let Err(reason) = check_request(&v.name, v.size, v.state, first_chunk, count) {
        return Ok(Err(reason.into()));
    }
    // The head, pinned for as long as the chunks are read (the trimmer may move the base up to
    // it meanwhile, but not past it).
    let (point, pin) = match pin_in(
        dir,
        catalog,
        &v.name,
        PinAt::Head,
        "hash service",
        false,
        PinTiming::default(),
    )
    .await
    {
        Ok(p) => p,
        Err(ReplicaError::Point(reason)) => return Ok(Err(reason.into())),
        Err(e) => return Err(e),
    };
    let seq = point.seq;
    let end_chunk = first_chunk + u64::from(count);
    let reader = match pin.open_image_chunks(first_chunk..end_chunk).await {
        Ok(r) => r,
        Err(e) => {
            let _ = pin.release().await;
            return Err(e);
        }
    };
    let size = v.size;
    let read = tokio::task::spawn_blocking(move || -> Result<Vec<blake3::Hash>> {
        let mut reader = reader;
        let mut buf = vec![0u8; CHUNK_BYTES as usize];
        let mut hashes = Vec::with_capacity(count as usize);
        for chunk in first_chunk..end_chunk {
            let offset = chunk * CHUNK_BYTES;
            let len = (size - offset).min(CHUNK_BYTES) as usize;
            reader.read_at(offset, &mut buf[..len])?;
            hashes.push(blake3::hash(&buf[..len]));
        }
        Ok(hashes)
    })
    .await;
    let released = pin.release().await;
    let hashes = read??;
    released?;
    Ok(Ok(ChunkHashes {
        seq,
        first_chunk,
        hashes,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked() {
        let size = 3 * CHUNK_BYTES + 1;
        assert_eq!(chunk_count(size), 4);
        assert!(check_request("v", size, VolumeState::Protecting, 0, 4).is_ok());
        assert!(check_request("v", size, VolumeState::Protecting, 3, 1).is_ok());
        let past = check_request("v", size, VolumeState::Protecting, 3, 2).expect_err("past");
        assert!(
            past.contains("past the end") && past.contains("4 chunks"),
            "{past}"
        );
        assert!(
            check_request("v", size, VolumeState::Protecting, u64::MAX, 1)
                .expect_err("overflow")
                .contains("past the end")
        );
        assert!(
            check_request(
                "v",
                u64::MAX,
                VolumeState::Protecting,
                0,
                HASHES_PER_MESSAGE_MAX + 1
            )
            .expect_err("too many")
            .contains("at a time")
        );
        assert!(check_request("v", size, VolumeState::Protecting, 0, 0).is_err());
        assert!(
            check_request("v", size, VolumeState::Syncing, 0, 1)
                .expect_err("syncing")
                .contains("not protecting")
        );
    }
}
