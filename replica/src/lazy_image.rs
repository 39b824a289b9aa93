//! The image of a volume at a pinned point, read at random without a full plan: what `export`
//! serves and `diff` compares.
//!
//! [`LazyImage`] plans one 1 MiB chunk at a time, when a read first touches it: the chunk's
//! records with seq in (L, S] — one range of the catalog's primary key — overlaid into a
//! [`Plan`] ([`crate::reconstruct`]), kept in a bounded LRU ([`PlanCache`], at most
//! [`PLAN_CACHE_CHUNKS_MAX`] chunks). Opening it costs two catalog reads, however long the
//! journal, so an export serves its first byte at once. Bytes come from the target file where
//! no record covers them, else from the journal through a [`RecordLoader`] (hash checked);
//! a read of at most [`INLINE_READ_BYTES_MAX`] whose chunk plans are cached and whose bytes the
//! page cache holds (`preadv2(RWF_NOWAIT)`, segments already open) is served on the calling
//! task; any other read runs on the blocking pool, any number at once (record loaders are
//! pooled, at most [`LOADERS_KEPT_MAX`] kept idle).
//!
//! # What is checked
//! A journal record is read whole and checked against its index row and blake3 hash the first
//! time one of the image's reads needs it (and whenever it must come from the disk). A raw
//! record that passed is noted ([`CheckedRecords`]); a later read of part of it copies just
//! that part, if the page cache holds it (`RWF_NOWAIT`, no disk read), without hashing the
//! whole record again (measured: a 4 KiB random read of 33 KiB records spent most of its time
//! reading and hashing bytes it did not return). The trust this adds is in pages the kernel
//! kept: a page of a checked record that was evicted and later brought back from the disk by
//! a read of a neighbouring record, and damaged on the disk meanwhile, would be served
//! unchecked. Restore, the trimmer and every first read keep the full check.
//!
//! # Why lazy plans stay right while the trimmer runs
//! S is pinned ([`crate::pins`]), so the trimmer never moves the base past S and never unlinks
//! a segment numbered at or above the pin's `segment_min` (the lowest segment holding a batch
//! in (base at pin time, S]). L is the group's base read right after pinning (so L ≤ S, and
//! every record the image can ever ask for lies in a segment ≥ `segment_min`). The trimmer
//! meanwhile moves the base from B to B' ≤ S: (b) applies the records in (B, B'] to the target
//! file, (c) fsyncs it, (d) deletes the rows ≤ B' and sets base = B' in one transaction.
//!
//! A chunk's plan is built from one catalog snapshot, in which the base is some X ≥ L. Since
//! (d) deletes the rows ≤ X in the transaction that sets base = X, the query `seq in (L, S]`
//! returns exactly the rows in (X, S] — all of them, as rows > base are never deleted. At that
//! moment, and at every later one while the pin holds, the target file holds the image at X
//! with some records of (X, S] applied over it (the trims after X apply records in
//! (base, B'] ⊆ (X, S], in seq order). So for each byte of the chunk:
//! * a record of (X, S] covers it: the plan reads the last such record, which is the last
//!   record ≤ S covering it — the byte of the image at S. Its segment is ≥ `segment_min`,
//!   so it is still there even after the trimmer deleted its row. The target file's byte is
//!   never read, so it does not matter that the trimmer may be writing it right now;
//! * no record of (X, S] covers it: no trim since X wrote it (trims write only bytes of
//!   records in (X, S]), so the target file still holds its byte of the image at X, which is
//!   its byte of the image at S.
//!
//! A plan cached before the base moved stays right by the same argument (its X is just
//! older). Reading the target file and the journal concurrently with a trim is therefore
//! safe without any lock; what is needed is the pin, for as long as the image is read: the
//! caller checks [`crate::PinGuard::check_held`] / `is_held` (export refuses reads once its
//! pin is known lost; diff checks before it reports).

use cdp_shared::types::Seq;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cdp_shared::types::CHUNK_BYTES;

use crate::catalog::{Catalog, RecordRow};
use crate::error::{ReplicaError, Result};
use crate::reconstruct::{
    CheckedRecords, ImageSources, Plan, ReadMode, ReadScratch, RecordLoader, RecordRef,
    read_planned,
};

/// Chunk plans a [`LazyImage`] keeps (least recently used evicted first).
pub const PLAN_CACHE_CHUNKS_MAX: usize = 4096;
/// Idle record loaders a [`LazyImage`] keeps for the next reads.
pub const LOADERS_KEPT_MAX: usize = 16;
/// The largest read [`LazyImage::read`] takes (the NBD request limit).
pub const LAZY_READ_BYTES_MAX: u64 = cdp_shared::NBD_REQUEST_BYTES_MAX as u64;
/// The largest read [`LazyImage::read`] tries on the calling task, from the page cache only,
/// before it hands the read to the blocking pool.
pub const INLINE_READ_BYTES_MAX: u64 = 1024 * 1024;

/// A bounded least-recently-used map from chunk index to its plan (sans-IO).
#[derive(Debug)]
pub struct PlanCache {
    capacity: usize,
    /// chunk -> (plan, last use).
    plans: HashMap<u64, (Arc<Plan>, u64)>,
    /// last use -> chunk.
    by_use: BTreeMap<u64, u64>,
    tick: u64,
}

impl PlanCache {
    pub fn new(capacity: usize) -> PlanCache {
        PlanCache {
            capacity: capacity.max(1),
            plans: HashMap::new(),
            by_use: BTreeMap::new(),
            tick: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.plans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.plans.is_empty()
    }

    /// The plan of `chunk`, marked as just used.
    pub fn get(&mut self, chunk: u64) -> Option<Arc<Plan>> {
        self.tick += 1;
        let tick = self.tick;
        let (plan, used) = self.plans.get_mut(&chunk)?;
        self.by_use.remove(used);
        *used = tick;
        self.by_use.insert(tick, chunk);
        Some(plan.clone())
    }

    /// Keeps `plan` for `chunk`, evicting the least recently used plan when full.
    pub fn insert(&mut self, chunk: u64, plan: Arc<Plan>) {
        self.tick += 1;
        if let Some((_, used)) = self.plans.remove(&chunk) {
            self.by_use.remove(&used);
        }
        while self.plans.len() >= self.capacity {
            let Some((_, victim)) = self.by_use.pop_first() else {
                break;
            };
            self.plans.remove(&victim);
        }
        self.plans.insert(chunk, (plan, self.tick));
        self.by_use.insert(self.tick, chunk);
    }
}

/// What a [`LazyImage`] reads: one volume at one pinned seq.
#[derive(Clone, Debug)]
pub struct LazyImageSpec {
    pub volume_id: i64,
    pub agent_volume_id: u32,
    pub size: u64,
    /// The pinned seq S.
    pub seq: Seq,
    /// L: the group's base read after pinning (see the module docs).
    pub base_floor: Seq,
    pub target: PathBuf,
    pub journal_dir: PathBuf,
}

struct Inner {
    spec: LazyImageSpec,
    catalog: Catalog,
    target: File,
    plans: Mutex<PlanCache>,
    /// Idle record loaders, each with the scratch buffers of its last read.
    loaders: Mutex<Vec<(RecordLoader, ReadScratch)>>,
    /// Raw records the loaders have read whole and checked (see the module docs).
    checked: Arc<CheckedRecords>,
    plans_built: AtomicU64,
    records_read: AtomicU64,
    parts_read: AtomicU64,
}

/// The image at a pinned point, planned chunk by chunk (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct LazyImage {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave them half-updated in a harmful way
    // (a cache and a pool), so a poisoned lock is used as it is.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LazyImage {
    /// Opens the image (no plan is built: see the module docs). The caller holds a pin on
    /// `spec.seq` for as long as it reads.
    pub fn open(spec: LazyImageSpec, catalog: Catalog) -> Result<LazyImage> {
        let target =
            File::open(&spec.target).map_err(ReplicaError::io("open target file", &spec.target))?;
        Ok(LazyImage {
            inner: Arc::new(Inner {
                spec,
                catalog,
                target,
                plans: Mutex::new(PlanCache::new(PLAN_CACHE_CHUNKS_MAX)),
                loaders: Mutex::new(Vec::new()),
                checked: Arc::new(CheckedRecords::default()),
                plans_built: AtomicU64::new(0),
                records_read: AtomicU64::new(0),
                parts_read: AtomicU64::new(0),
            }),
        })
    }

    pub fn size(&self) -> u64 {
        self.inner.spec.size
    }

    pub fn seq(&self) -> Seq {
        self.inner.spec.seq
    }

    /// Chunk plans built so far (each one catalog range read).
    pub fn plans_built(&self) -> u64 {
        self.inner.plans_built.load(Ordering::Relaxed)
    }

    /// Journal records read whole (and hash-checked) so far.
    pub fn records_read(&self) -> u64 {
        self.inner.records_read.load(Ordering::Relaxed)
    }

    /// Parts of already checked raw records read from the page cache so far.
    pub fn parts_read(&self) -> u64 {
        self.inner.parts_read.load(Ordering::Relaxed)
    }

    /// The plans of chunks `first..=last`, from the cache or built from one catalog read of
    /// the missing ones.
    async fn plans(&self, first: u64, last: u64) -> Result<Vec<Arc<Plan>>> {
        let i = &self.inner;
        let mut got: Vec<Option<Arc<Plan>>> = {
            let mut cache = lock(&i.plans);
            (first..=last).map(|c| cache.get(c)).collect()
        };
        let missing: Vec<u64> = (first..=last)
            .zip(&got)
            .filter(|(_, p)| p.is_none())
            .map(|(c, _)| c)
            .collect();
        if let (Some(&lo), Some(&hi)) = (missing.first(), missing.last()) {
            let rows = i
                .catalog
                .records_in_chunks(
                    i.spec.volume_id,
                    i.spec.base_floor,
                    i.spec.seq,
                    lo,
                    hi + 1,
                    cdp_shared::types::chunk_len_of(i.spec.size),
                )
                .await?;
            let mut by_chunk: BTreeMap<u64, Vec<RecordRow>> = BTreeMap::new();
            for r in rows {
                by_chunk.entry(r.chunk).or_default().push(r);
            }
            let mut cache = lock(&i.plans);
            for c in missing {
                let rows = by_chunk.remove(&c).unwrap_or_default();
                let plan = Arc::new(Plan::build(
                    i.spec.size,
                    rows.iter()
                        .map(RecordRef::from_row)
                        .collect::<Result<Vec<_>>>()?,
                )?);
                i.plans_built.fetch_add(1, Ordering::Relaxed);
                tracing::trace!(chunk = c, records = rows.len(), "planned a chunk");
                cache.insert(c, plan.clone());
                got[(c - first) as usize] = Some(plan);
            }
        }
        got.into_iter()
            .map(|p| p.ok_or_else(|| ReplicaError::Task("a chunk plan went missing".into())))
            .collect()
    }

    /// The image bytes `[offset, offset + len)` (at most [`LAZY_READ_BYTES_MAX`], inside the
    /// volume; any alignment, across chunks).
    pub async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let size = self.size();
        if len > LAZY_READ_BYTES_MAX || offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(ReplicaError::Task(format!(
                "a read of {len} bytes at {offset} of a {size}-byte volume"
            )));
        }
        if len == 0 {
            return Ok(Vec::new());
        }
        let first = offset / CHUNK_BYTES;
        let last = (offset + len - 1) / CHUNK_BYTES;
        let plans = self.plans(first, last).await?;
        // What the page cache holds is read right here: a handoff to the blocking pool costs
        // more than such a read (measured: the export's 4 KiB reads spent most of their time
        // waking blocking threads).
        if len <= INLINE_READ_BYTES_MAX
            && let Some(buf) =
                self.inner
                    .read_with(offset, len, first, &plans, ReadMode::CachedOnly)?
        {
            return Ok(buf);
        }
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            inner
                .read_with(offset, len, first, &plans, ReadMode::Blocking)?
                .ok_or_else(|| ReplicaError::Task("a blocking image read declined".into()))
        })
        .await?
    }
}

impl Inner {
    /// The bytes `[offset, offset + len)` read as `mode` allows; `None` when
    /// [`ReadMode::CachedOnly`] would have had to wait.
    fn read_with(
        &self,
        offset: u64,
        len: u64,
        first: u64,
        plans: &[Arc<Plan>],
        mode: ReadMode,
    ) -> Result<Option<Vec<u8>>> {
        let mut buf = vec![0u8; len as usize];
        let popped = lock(&self.loaders).pop();
        let (mut loader, mut scratch) = match popped {
            Some(l) => l,
            None => (
                RecordLoader::with_checked(&self.spec.journal_dir, self.checked.clone())?,
                ReadScratch::default(),
            ),
        };
        let (records_before, parts_before) = (loader.records_read(), loader.parts_read());
        let end = offset + len;
        let mut result = Ok(true);
        for (k, plan) in plans.iter().enumerate() {
            let chunk_start = (first + k as u64) * CHUNK_BYTES;
            let from = offset.max(chunk_start);
            let to = end.min(chunk_start + CHUNK_BYTES);
            let out = &mut buf[(from - offset) as usize..(to - offset) as usize];
            let mut src = ImageSources {
                target: &self.target,
                target_path: &self.spec.target,
                records: &mut loader,
                agent_volume_id: self.spec.agent_volume_id,
                holes: None,
            };
            result = read_planned(plan, from, out, &mut src, &mut scratch, mode);
            if !matches!(result, Ok(true)) {
                break;
            }
        }
        scratch.keep_small();
        self.records_read
            .fetch_add(loader.records_read() - records_before, Ordering::Relaxed);
        self.parts_read
            .fetch_add(loader.parts_read() - parts_before, Ordering::Relaxed);
        let mut idle = lock(&self.loaders);
        if idle.len() < LOADERS_KEPT_MAX {
            idle.push((loader, scratch));
        }
        drop(idle);
        result.map(|all| all.then_some(buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_cache_evicts_the_least_recently_used() {
        let mut c = PlanCache::new(3);
        let p = Arc::new(Plan::new(1));
        for chunk in 0..3 {
            c.insert(chunk, p.clone());
        }
        assert!(c.get(0).is_some()); // 1 is now the oldest
        c.insert(3, p.clone());
        assert_eq!(c.len(), 3);
        assert!(c.get(1).is_none());
        assert!(c.get(0).is_some() && c.get(2).is_some() && c.get(3).is_some());
        // Re-inserting a chunk does not grow the cache.
        c.insert(3, p.clone());
        assert_eq!(c.len(), 3);
        c.insert(4, p);
        assert_eq!(c.len(), 3);
        assert!(c.get(0).is_none(), "0 was the least recently used");
    }
}
