//! The dirty-region map of a volume: one bit per 1 MiB chunk whose writes are on the device
//! but not in the log (after a spool overflow, or an unclean stop found by the activity log).
//! A resync reads those chunks through the ordered log and clears their bits.
//!
//! File: `state/<volume>.dirty` = `"CDPDIRT1" | chunks u64 LE | bitmap | blake3 of the rest`,
//! replaced atomically. It is made durable at every flush while any bit is set, so that no
//! flushed write can be forgotten.

use std::io;
use std::path::Path;

use crate::state::write_atomic;

pub const MAGIC: &[u8; 8] = b"CDPDIRT1";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyMap {
    words: Vec<u64>,
    chunks: u64,
    count: u64,
}

impl DirtyMap {
    pub fn new(chunks: u64) -> DirtyMap {
        DirtyMap {
            words: vec![0; chunks.div_ceil(64) as usize],
            chunks,
            count: 0,
        }
    }

    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// Chunks marked.
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn is_set(&self, chunk: u64) -> bool {
        chunk < self.chunks && self.words[(chunk / 64) as usize] & (1 << (chunk % 64)) != 0
    }

    /// Marks a chunk; returns whether it was clear.
    pub fn set(&mut self, chunk: u64) -> bool {
        debug_assert!(chunk < self.chunks);
        let w = &mut self.words[(chunk / 64) as usize];
        let bit = 1u64 << (chunk % 64);
        let was_clear = *w & bit == 0;
        *w |= bit;
        self.count += u64::from(was_clear);
        was_clear
    }

    /// Clears a chunk; returns whether it was set.
    pub fn clear(&mut self, chunk: u64) -> bool {
        debug_assert!(chunk < self.chunks);
        let w = &mut self.words[(chunk / 64) as usize];
        let bit = 1u64 << (chunk % 64);
        let was_set = *w & bit != 0;
        *w &= !bit;
        self.count -= u64::from(was_set);
        was_set
    }

    /// The first marked chunk at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        let mut c = from;
        while c < self.chunks {
            let w = self.words[(c / 64) as usize] >> (c % 64);
            if w != 0 {
                let found = c + u64::from(w.trailing_zeros());
                return (found < self.chunks).then_some(found);
            }
            c = (c / 64 + 1) * 64;
        }
        None
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.words.len() * 8 + 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.chunks.to_le_bytes());
        for w in &self.words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        let hash = blake3::hash(&out);
        out.extend_from_slice(hash.as_bytes());
        out
    }

    /// Decodes a map of a volume with `chunks` chunks; `None` when the bytes are not one.
    pub fn decode(bytes: &[u8], chunks: u64) -> Option<DirtyMap> {
        let words = chunks.div_ceil(64) as usize;
        let len = 16 + words * 8 + 32;
        if bytes.len() != len || &bytes[..8] != MAGIC || bytes[8..16] != chunks.to_le_bytes() {
            return None;
        }
        if blake3::hash(&bytes[..len - 32]).as_bytes() != &bytes[len - 32..] {
            return None;
        }
        let mut map = DirtyMap::new(chunks);
        for (i, w) in map.words.iter_mut().enumerate() {
            let at = 16 + i * 8;
            let mut a = [0u8; 8];
            a.copy_from_slice(&bytes[at..at + 8]);
            *w = u64::from_le_bytes(a);
        }
        if let Some(last) = map.words.last_mut() {
            let tail = chunks % 64;
            if tail != 0 {
                *last &= (1u64 << tail) - 1;
            }
        }
        map.count = map.words.iter().map(|w| u64::from(w.count_ones())).sum();
        Some(map)
    }

    pub fn save(&self, path: &Path) -> io::Result<()> {
        write_atomic(path, &self.encode())
    }

    /// Loads the map at `path`: an empty map when there is none; an error when the file is
    /// damaged (the caller then resyncs the whole volume).
    pub fn load(path: &Path, chunks: u64) -> io::Result<DirtyMap> {
        match std::fs::read(path) {
            Ok(bytes) => DirtyMap::decode(&bytes, chunks).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} is damaged", path.display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(DirtyMap::new(chunks)),
            Err(e) => Err(e),
        }
    }

    /// Marks every chunk.
    pub fn set_all(&mut self) {
        for c in 0..self.chunks {
            self.set(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_clear_iterate_and_round_trip() {
        let mut m = DirtyMap::new(130);
        assert_eq!(m.next_set(0), None);
        assert!(m.set(3) && m.set(64) && m.set(129));
        assert!(!m.set(3));
        assert_eq!(m.count(), 3);
        assert_eq!(m.next_set(0), Some(3));
        assert_eq!(m.next_set(4), Some(64));
        assert_eq!(m.next_set(65), Some(129));
        let back = DirtyMap::decode(&m.encode(), 130).expect("decodes");
        assert_eq!(back, m);
        assert!(m.clear(64) && !m.clear(64));
        assert_eq!(m.count(), 2);
        let mut bytes = m.encode();
        bytes[20] ^= 1;
        assert!(
            DirtyMap::decode(&bytes, 130).is_none(),
            "a damaged map is refused"
        );
        assert!(
            DirtyMap::decode(&m.encode(), 131).is_none(),
            "a map of another size is refused"
        );
    }

    #[test]
    fn save_and_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("v.dirty");
        assert_eq!(DirtyMap::load(&p, 10).expect("none").count(), 0);
        let mut m = DirtyMap::new(10);
        m.set(7);
        m.save(&p).expect("save");
        assert!(DirtyMap::load(&p, 10).expect("load").is_set(7));
    }
}
