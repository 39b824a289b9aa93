//! Domain newtypes and the limits every component shares.
//!
//! A *seq* numbers batches of one consistency group (dense, from 1); a *chunk* is the 1 MiB
//! unit that records never cross and that resync and verification work on; a *volume id* is
//! the small number a volume has inside its group. Limits are named constants with units,
//! and their relationships are checked at compile time.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Sequence number of a batch within a consistency group. Dense, starts at 1, never reused.
/// `Seq(0)` means "nothing yet". On the wire it is the bare number.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Seq(pub u64);

impl Seq {
    pub const ZERO: Seq = Seq(0);
    pub fn next(self) -> Seq {
        Seq(self.0 + 1)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Identifier of a volume inside its consistency group (assigned by the agent at `protect`).
pub type VolumeId = u32;

/// Size of a chunk: records never cross a chunk boundary.
pub const CHUNK_BYTES: u64 = 1 << 20;
/// Largest NBD request payload the agent accepts (READ or WRITE length).
pub const NBD_REQUEST_BYTES_MAX: u32 = 32 << 20;
/// A batch is cut when its payload reaches this size (default; configurable downwards).
pub const BATCH_PAYLOAD_BYTES_TARGET: usize = 4 << 20;
/// Hard bound on a batch payload: the target plus one full-chunk record and its header.
pub const BATCH_PAYLOAD_BYTES_MAX: usize = BATCH_PAYLOAD_BYTES_TARGET + 2 * (CHUNK_BYTES as usize);
/// Hard bound on records in one batch.
pub const BATCH_RECORDS_MAX: usize = 1 << 16;
/// Longest volume, group or bookmark name.
pub const NAME_BYTES_MAX: usize = 128;
/// Default age after which an open batch is cut.
pub const BATCH_AGE_MS_DEFAULT: u64 = 20;
/// Default number of batches in flight (sent, not acknowledged) per group.
pub const BATCHES_IN_FLIGHT_DEFAULT: usize = 32;

/// Number of chunks of a volume of `size` bytes (the last one may be short).
pub fn chunk_count(size: u64) -> u64 {
    size.div_ceil(CHUNK_BYTES)
}

/// The length of each chunk of a volume of `size` bytes (the last one may be short).
pub fn chunk_len_of(size: u64) -> impl Fn(u64) -> u64 {
    move |chunk| {
        size.saturating_sub(chunk.saturating_mul(CHUNK_BYTES))
            .min(CHUNK_BYTES)
    }
}

const _: () = assert!(CHUNK_BYTES.is_power_of_two());
const _: () = assert!(BATCH_PAYLOAD_BYTES_MAX > BATCH_PAYLOAD_BYTES_TARGET + CHUNK_BYTES as usize);
const _: () = assert!(BATCH_PAYLOAD_BYTES_MAX <= u32::MAX as usize);
const _: () = assert!(NBD_REQUEST_BYTES_MAX as u64 >= CHUNK_BYTES);

/// Checks a volume, group or bookmark name: 1..=128 bytes of `[A-Za-z0-9._-]`, not starting
/// with a dot. Names become file names on both sides, so nothing else is allowed.
pub fn check_name(kind: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > NAME_BYTES_MAX {
        return Err(format!(
            "{kind} name must be 1 to {NAME_BYTES_MAX} characters long"
        ));
    }
    if name.starts_with('.') {
        return Err(format!("{kind} name {name:?} must not start with a dot"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        return Err(format!(
            "{kind} name {name:?} may only hold letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// A byte count for people: `512 B`, `1.5 MiB`, `3.0 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Splits the byte range `[offset, offset+len)` at chunk boundaries.
pub fn split_at_chunks(offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = offset + len;
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let chunk_end = (at / CHUNK_BYTES + 1) * CHUNK_BYTES;
        let piece_end = chunk_end.min(end);
        let piece = (at, piece_end - at);
        at = piece_end;
        Some(piece)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_at_chunks_respects_boundaries() {
        let pieces: Vec<_> = split_at_chunks(CHUNK_BYTES - 10, 30).collect();
        assert_eq!(pieces, vec![(CHUNK_BYTES - 10, 10), (CHUNK_BYTES, 20)]);
        let pieces: Vec<_> = split_at_chunks(0, 3 * CHUNK_BYTES).collect();
        assert_eq!(pieces.len(), 3);
        assert_eq!(split_at_chunks(5, 0).count(), 0);
    }

    #[test]
    fn human_bytes_reads_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536 * 1024), "1.5 MiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("volume", "db-1.data_2").is_ok());
        assert!(check_name("volume", "").is_err());
        assert!(check_name("volume", ".hidden").is_err());
        assert!(check_name("volume", "a/b").is_err());
        assert!(check_name("volume", &"x".repeat(129)).is_err());
    }
}
