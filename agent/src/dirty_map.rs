//! The dirty-region map of a volume: one bit per 1 MiB chunk whose writes are on the device
//! but not in the log (after a spool overflow, or an unclean stop found by the activity log).
//! A resync reads those chunks through the ordered log and clears their bits.
//!
//! File: `state/<volume>.dirty` = `"CDPDIRT1" | chunks u64 LE | bitmap | blake3 of the rest`,
//! replaced atomically. It is made durable at every flush while any bit is set, so that no
//! flushed write can be forgotten.

use std::io;
use std::path::Path;

use crate::fsutil::write_atomic;

pub const MAGIC: &[u8; 8] = b"CDPDIRT1";

/// A dirty map whose kept count disagrees with its bits: an internal fault (a miscompile or
/// a bug), never a property of the data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "internal error: the dirty map counts {counted} dirty chunks but {bits} bits are set; the agent stops rather than skip a resync (report this with the agent's version)"
)]
pub struct CountMismatch {
    pub counted: u64,
    pub bits: u64,
}

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
    ///
    /// The count changes only inside the branch that changes the bit. Do not write it as
    /// `count += u64::from(was_clear)`: with rustc 1.95 (LLVM 22) at opt-level 2 and 3 that
    /// update is dropped when `set` is inlined into a loop that branches on its result, and the
    /// map said 0 dirty chunks while its bits were set (every resync was skipped; the
    /// reproducer is `set_in_a_loop_counts_every_new_bit` below, which runs optimized in
    /// `make test`). [`DirtyMap::check`] recomputes the count wherever it drives a decision.
    pub fn set(&mut self, chunk: u64) -> bool {
        debug_assert!(chunk < self.chunks);
        let w = &mut self.words[(chunk / 64) as usize];
        let bit = 1u64 << (chunk % 64);
        if *w & bit != 0 {
            return false;
        }
        *w |= bit;
        self.count += 1;
        true
    }

    /// Clears a chunk; returns whether it was set. (See [`DirtyMap::set`] for why the count
    /// changes in the branch.)
    pub fn clear(&mut self, chunk: u64) -> bool {
        debug_assert!(chunk < self.chunks);
        let w = &mut self.words[(chunk / 64) as usize];
        let bit = 1u64 << (chunk % 64);
        if *w & bit == 0 {
            return false;
        }
        *w &= !bit;
        self.count -= 1;
        true
    }

    /// The number of marked chunks, counted from the bits.
    pub fn recount(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The paired assertion of the count: `Err` (naming both figures) when the kept count
    /// disagrees with the bits. Called at load, before a map is saved or removed at a flush,
    /// and before every resync decision; a disagreement stops the agent rather than let it
    /// skip a resync.
    pub fn check(&self) -> Result<u64, CountMismatch> {
        let bits = self.recount();
        if bits == self.count {
            Ok(bits)
        } else {
            Err(CountMismatch {
                counted: self.count,
                bits,
            })
        }
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
        map.count = map.recount();
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

    /// Clears every chunk.
    pub fn clear_all(&mut self) {
        self.words.fill(0);
        self.count = 0;
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

    /// The pattern rustc 1.95 miscompiled at opt-level 2 and 3 (`count += u64::from(bool)`
    /// inlined into a loop that branches on `set`'s result dropped the update): the count
    /// must equal the new bits. Runs optimized in `make test` (`cargo test --release`); it
    /// failed there on the old `set` with `count 0` for 4 new bits.
    #[inline(never)]
    fn set_each(map: &mut DirtyMap, chunks: &[u64]) -> u64 {
        let mut new = 0;
        for c in chunks {
            if map.set(*c) {
                new += 1;
            }
        }
        new
    }

    #[inline(never)]
    fn clear_each(map: &mut DirtyMap, chunks: &[u64]) -> u64 {
        let mut gone = 0;
        for c in chunks {
            if map.clear(*c) {
                gone += 1;
            }
        }
        gone
    }

    #[test]
    fn set_in_a_loop_counts_every_new_bit() {
        for chunks in [100u64, 130, 4096] {
            let mut m = DirtyMap::new(chunks);
            let first: Vec<u64> = std::hint::black_box(vec![0, 1, 2, 3]);
            assert_eq!(set_each(&mut m, &first), 4);
            assert_eq!(m.count(), 4, "{chunks} chunks: the count follows the bits");
            assert_eq!(m.check(), Ok(4));
            // Again, with repeats and chunks in other words.
            let more: Vec<u64> = std::hint::black_box(vec![3, 63, 63, 99, 0, 5]);
            assert_eq!(set_each(&mut m, &more), 3);
            assert_eq!(m.count(), 7);
            assert_eq!(m.check(), Ok(7));
            let gone: Vec<u64> = std::hint::black_box(vec![1, 1, 63, 99]);
            assert_eq!(clear_each(&mut m, &gone), 3);
            assert_eq!(m.count(), 4);
            assert_eq!(m.check(), Ok(4));
            m.set_all();
            assert_eq!(m.check(), Ok(chunks));
            m.clear_all();
            assert_eq!(m.check(), Ok(0));
        }
    }

    #[test]
    fn check_names_a_count_that_disagrees_with_the_bits() {
        let mut m = DirtyMap::new(10);
        m.set(2);
        m.count = 0;
        let e = m.check().expect_err("a lying count is found");
        assert_eq!(
            e,
            CountMismatch {
                counted: 0,
                bits: 1
            }
        );
        assert!(e.to_string().contains("stops rather than skip a resync"));
    }

    proptest::proptest! {
        /// Any sequence of sets and clears: the count equals the bits, and each call's
        /// answer says whether the bit changed.
        #[test]
        fn count_follows_the_bits(ops in proptest::collection::vec((proptest::bool::ANY, 0u64..200), 0..400)) {
            let mut m = DirtyMap::new(200);
            let mut model = std::collections::BTreeSet::new();
            for (set, c) in ops {
                if set {
                    proptest::prop_assert_eq!(m.set(c), model.insert(c));
                } else {
                    proptest::prop_assert_eq!(m.clear(c), model.remove(&c));
                }
            }
            proptest::prop_assert_eq!(m.count(), model.len() as u64);
            proptest::prop_assert_eq!(m.check(), Ok(model.len() as u64));
        }
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
