//! The batcher: collects encoded records of one consistency group in log order and cuts them
//! into sealed, sequence-numbered batches — when the payload reaches its size target, when the
//! open batch reaches its age limit, and at every flush, FUA write and bookmark. Sans-IO: time
//! comes in as arguments.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cdp_shared::Seq;
use cdp_shared::batch::{self, BatchFlags, Hash, RecordHeader, SealParams};
use cdp_shared::pool::BufferPool;
use cdp_shared::types::{BATCH_PAYLOAD_BYTES_MAX, BATCH_RECORDS_MAX};

/// Room left for a batch's header before its payload (the longest header there is).
const HEADER_ROOM: usize = batch::HEADER_BYTES_MAX;
/// A sealed batch with a payload smaller than this is copied out of the batcher's buffer
/// (cheap); a bigger one takes the buffer with it, and the next batch gets one from the pool.
const COPIED_PAYLOAD_BYTES_MAX: usize = 256 << 10;
/// Full-size batch buffers the pool keeps for reuse (about 4 MiB each). Buffers come back
/// once the spool and the sender are done with their batch.
const POOLED_BUFFERS_MAX: usize = 8;

/// A batch ready for the spool: its seq and its bytes in the one batch format, with the two
/// header fields the spool keeps for it, as the seal encoded them (so nothing decodes the
/// header again).
#[derive(Clone, Debug)]
pub struct SealedBatch {
    pub seq: Seq,
    pub bytes: Bytes,
    pub flags: BatchFlags,
    /// The batch's identity: blake3 of its header, which the next batch carries as `prev_hash`.
    pub header_hash: Hash,
    /// The agent's wall-clock time the batch was sealed at, in ns since the Unix epoch.
    pub agent_time_ns: i64,
}

#[derive(Clone, Debug)]
pub struct BatcherConfig {
    pub payload_bytes_target: usize,
    pub age_max: Duration,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        BatcherConfig {
            payload_bytes_target: cdp_shared::types::BATCH_PAYLOAD_BYTES_TARGET,
            age_max: Duration::from_millis(cdp_shared::types::BATCH_AGE_MS_DEFAULT),
        }
    }
}

pub struct Batcher {
    group: String,
    config: BatcherConfig,
    /// The seq the next sealed batch gets.
    next_seq: Seq,
    /// Header hash of the last sealed batch.
    prev_hash: Hash,
    /// The open batch: [`HEADER_ROOM`] bytes left for its header, then its payload, so that
    /// a seal writes the header in place instead of copying the payload.
    buf: Vec<u8>,
    pool: Arc<BufferPool>,
    record_count: u32,
    has_sync_records: bool,
    /// When the open batch got its first record: for its age limit, and (agent time) for
    /// the RPO lag.
    opened_at: Option<(Instant, i64)>,
}

impl Batcher {
    /// A batcher whose last sealed batch was `last_seq` with header hash `last_hash`.
    pub fn new(group: &str, config: BatcherConfig, last_seq: Seq, last_hash: Hash) -> Batcher {
        assert!(
            config.payload_bytes_target > 0
                && config.payload_bytes_target <= cdp_shared::types::BATCH_PAYLOAD_BYTES_TARGET
        );
        Batcher {
            group: group.to_owned(),
            config,
            next_seq: last_seq.next(),
            prev_hash: last_hash,
            buf: vec![0; HEADER_ROOM],
            pool: BufferPool::new(HEADER_ROOM + BATCH_PAYLOAD_BYTES_MAX, POOLED_BUFFERS_MAX),
            record_count: 0,
            has_sync_records: false,
            opened_at: None,
        }
    }

    /// Bytes of the open batch's payload.
    pub fn open_bytes(&self) -> usize {
        self.buf.len() - HEADER_ROOM
    }

    /// Continues the chain after `seq` (header hash `hash`), dropping what is open: used when
    /// the agent must continue after the replica's head instead of its own. Returns the
    /// `(volume, offset, length)` of the dropped records that change bytes, for the caller to
    /// send again.
    pub fn rebase(&mut self, seq: Seq, hash: Hash) -> Vec<(cdp_shared::types::VolumeId, u64, u32)> {
        let payload = &self.buf[HEADER_ROOM..];
        let mut dropped = Vec::new();
        let mut pos = 0;
        let mut index = 0;
        while pos < payload.len() {
            // The batcher encoded these records itself: a failure would be its own fault,
            // and stops the walk (the caller's full resyncs cover the rest).
            let Ok(r) = RecordHeader::decode(&payload[pos..], index) else {
                break;
            };
            if r.kind.changes_bytes() {
                dropped.push((r.volume, r.offset, r.length));
            }
            pos += r.total_len();
            index += 1;
        }
        self.next_seq = seq.next();
        self.prev_hash = hash;
        self.buf.truncate(HEADER_ROOM);
        self.record_count = 0;
        self.has_sync_records = false;
        self.opened_at = None;
        dropped
    }

    /// The last sealed seq.
    pub fn last_sealed(&self) -> Seq {
        Seq(self.next_seq.0 - 1)
    }

    /// The header hash of the last sealed batch (zeros before the first).
    pub fn last_hash(&self) -> Hash {
        self.prev_hash
    }

    pub fn is_empty(&self) -> bool {
        self.record_count == 0
    }

    /// When the open batch must be cut for age, if one is open.
    pub fn deadline(&self) -> Option<Instant> {
        self.opened_at.map(|(t, _)| t + self.config.age_max)
    }

    /// The agent time at which the open batch got its first record, if one is open.
    pub fn opened_ns(&self) -> Option<i64> {
        self.opened_at.map(|(_, ns)| ns)
    }

    /// Appends `n` encoded records (`encoded` holds exactly them) and returns the batches this
    /// sealed. The records of one push stay in one batch when they fit in one (the open batch
    /// is sealed first if they would overflow it), so a write of up to the size target is never
    /// split across batches; a larger push is split at record boundaries. `inconsistent` says
    /// whether the group is inside a sync at this moment.
    pub fn push(
        &mut self,
        encoded: &[u8],
        n: u32,
        sync: bool,
        inconsistent: bool,
        now: Instant,
        time_ns: i64,
    ) -> Vec<SealedBatch> {
        let mut out = Vec::new();
        let fits_alone =
            encoded.len() <= self.config.payload_bytes_target && n as usize <= BATCH_RECORDS_MAX;
        if fits_alone {
            if !self.is_empty()
                && (self.open_bytes() + encoded.len() > self.config.payload_bytes_target
                    || self.record_count as usize + n as usize > BATCH_RECORDS_MAX)
            {
                out.extend(self.seal(0, None, inconsistent, time_ns));
            }
            self.append(encoded, n, sync, now, time_ns);
        } else {
            let mut pos = 0;
            while pos < encoded.len() {
                let len = match RecordHeader::decode(&encoded[pos..], 0) {
                    Ok(h) => h.total_len(),
                    Err(e) => panic!("the write pipeline pushed a malformed record: {e}"),
                };
                let record = &encoded[pos..pos + len];
                if !self.is_empty()
                    && (self.open_bytes() + len > self.config.payload_bytes_target
                        || self.record_count as usize >= BATCH_RECORDS_MAX)
                {
                    out.extend(self.seal(0, None, inconsistent, time_ns));
                }
                self.append(record, 1, sync, now, time_ns);
                pos += len;
            }
        }
        if self.open_bytes() >= self.config.payload_bytes_target {
            out.extend(self.seal(0, None, inconsistent, time_ns));
        }
        out
    }

    fn append(&mut self, encoded: &[u8], n: u32, sync: bool, now: Instant, time_ns: i64) {
        debug_assert!(self.open_bytes() + encoded.len() <= BATCH_PAYLOAD_BYTES_MAX);
        if self.opened_at.is_none() {
            self.opened_at = Some((now, time_ns));
        }
        if self.buf.capacity() < HEADER_ROOM + BATCH_PAYLOAD_BYTES_MAX
            && self.buf.len() == HEADER_ROOM
        {
            // The first record of a batch: a buffer of full size, from the pool.
            let mut buf = self.pool.take();
            buf.resize(HEADER_ROOM, 0);
            self.buf = buf;
        }
        self.buf.extend_from_slice(encoded);
        self.record_count += n;
        self.has_sync_records |= sync;
    }

    /// Cuts the open batch with `flags` (e.g. FLUSH). Without records and without a bookmark
    /// there is nothing to cut and this returns `None`: the last sealed batch already holds
    /// every completed write.
    pub fn seal(
        &mut self,
        flags: u16,
        bookmark: Option<&str>,
        inconsistent: bool,
        time_ns: i64,
    ) -> Option<SealedBatch> {
        if self.is_empty() && bookmark.is_none() {
            return None;
        }
        Some(self.seal_always(flags, bookmark, inconsistent, time_ns))
    }

    /// Seals the open batch even when it holds nothing: a point of its own (after a resync,
    /// the consistent point that ends it).
    pub fn seal_always(
        &mut self,
        flags: u16,
        bookmark: Option<&str>,
        inconsistent: bool,
        time_ns: i64,
    ) -> SealedBatch {
        let mut f = flags;
        if self.has_sync_records {
            f |= BatchFlags::SYNC;
        }
        if inconsistent {
            f |= BatchFlags::INCONSISTENT;
        }
        let params = SealParams {
            group: &self.group,
            seq: self.next_seq,
            agent_time_ns: time_ns,
            flags: BatchFlags(f),
            bookmark,
            prev_hash: self.prev_hash,
            record_count: self.record_count,
        };
        let (start, hash) = batch::seal_in_place(&params, &mut self.buf, HEADER_ROOM);
        let bytes = if self.open_bytes() < COPIED_PAYLOAD_BYTES_MAX {
            // A small batch is copied out: the open batch keeps its big buffer.
            Bytes::copy_from_slice(&self.buf[start..])
        } else {
            let full = std::mem::replace(&mut self.buf, vec![0; HEADER_ROOM]);
            let end = full.len();
            self.pool.freeze(full, start..end)
        };
        let sealed = SealedBatch {
            seq: self.next_seq,
            bytes,
            flags: BatchFlags(f),
            header_hash: hash,
            agent_time_ns: time_ns,
        };
        self.prev_hash = hash;
        self.next_seq = self.next_seq.next();
        self.buf.truncate(HEADER_ROOM);
        self.record_count = 0;
        self.has_sync_records = false;
        self.opened_at = None;
        sealed
    }

    /// Cuts the open batch if it is older than the age limit.
    pub fn poll_age(
        &mut self,
        now: Instant,
        inconsistent: bool,
        time_ns: i64,
    ) -> Option<SealedBatch> {
        match self.deadline() {
            Some(d) if now >= d => self.seal(0, None, inconsistent, time_ns),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cdp_shared::batch::{RecordKind, encode_marker};

    fn marker() -> Vec<u8> {
        let mut v = Vec::new();
        encode_marker(0, RecordKind::Zero, 0, 4096, 0, &mut v);
        v
    }

    #[test]
    fn a_rebase_returns_the_open_records_that_change_bytes_and_continues_after_its_seq() {
        let mut b = Batcher::new("g", BatcherConfig::default(), Seq(0), [0; 32]);
        let t0 = Instant::now();
        let mut recs = Vec::new();
        encode_marker(0, RecordKind::SyncBegin, 0, 0, 0, &mut recs);
        encode_marker(1, RecordKind::Zero, 8192, 4096, 0, &mut recs);
        encode_marker(0, RecordKind::Trim, 1 << 20, 512, 0, &mut recs);
        assert!(b.push(&recs, 3, false, false, t0, 1).is_empty());
        let dropped = b.rebase(Seq(41), [5; 32]);
        assert_eq!(dropped, vec![(1, 8192, 4096), (0, 1 << 20, 512)]);
        assert!(b.is_empty());
        assert_eq!(b.last_sealed(), Seq(41));
        let sealed = b.push(&marker(), 1, false, false, t0, 2);
        assert!(sealed.is_empty());
        let s = b.seal(BatchFlags::FLUSH, None, false, 2).expect("sealed");
        assert_eq!(s.seq, Seq(42));
        let view = batch::decode(&s.bytes).expect("decodes");
        assert_eq!(view.header.prev_hash, [5; 32]);
        assert!(b.rebase(Seq(42), s.header_hash).is_empty(), "nothing open");
    }

    #[test]
    fn cuts_on_size_age_and_flush_and_chains_hashes() {
        let cfg = BatcherConfig {
            payload_bytes_target: 3 * marker().len(),
            age_max: Duration::from_millis(20),
        };
        let mut b = Batcher::new("g", cfg, Seq(0), [0; 32]);
        let t0 = Instant::now();
        assert!(b.push(&marker(), 1, false, false, t0, 1).is_empty());
        assert!(b.push(&marker(), 1, false, false, t0, 1).is_empty());
        let sealed = b.push(&marker(), 1, false, false, t0, 1);
        assert_eq!(sealed.len(), 1, "size target reached");
        assert_eq!(sealed[0].seq, Seq(1));
        let first = batch::decode(&sealed[0].bytes).expect("decodes");
        assert_eq!(first.header.record_count, 3);

        assert!(b.poll_age(t0, false, 2).is_none(), "nothing open");
        b.push(&marker(), 1, false, true, t0, 2);
        assert!(
            b.poll_age(t0 + Duration::from_millis(5), false, 2)
                .is_none()
        );
        let aged = b
            .poll_age(t0 + Duration::from_millis(25), true, 2)
            .expect("age cut");
        let second = batch::decode(&aged.bytes).expect("decodes");
        assert_eq!(second.header.seq, Seq(2));
        assert_eq!(second.header.prev_hash, first.header.header_hash);
        assert!(!second.header.flags.consistent());

        assert!(
            b.seal(BatchFlags::FLUSH, None, false, 3).is_none(),
            "empty flush seals nothing"
        );
        let bm = b
            .seal(BatchFlags::FLUSH, Some("bm"), false, 3)
            .expect("bookmark seals an empty batch");
        let third = batch::decode(&bm.bytes).expect("decodes");
        assert_eq!(third.header.bookmark.as_deref(), Some("bm"));
        assert_eq!(third.header.record_count, 0);
        assert_eq!(b.last_sealed(), Seq(3));
    }

    /// The hash and time a sealed batch carries are those its bytes say: the spool and the
    /// chain rely on them without decoding the header again.
    #[test]
    fn a_big_batch_is_sealed_in_place_and_its_buffer_comes_back_for_the_next() {
        let mut b = Batcher::new("g", BatcherConfig::default(), Seq(0), [0; 32]);
        let mut enc = cdp_shared::batch::RecordEncoder::new();
        let mut sealed = Vec::new();
        for round in 0..3u8 {
            // Incompressible, so that the record stays 1 MiB.
            let mut data = vec![0u8; 1 << 20];
            blake3::Hasher::new()
                .update(&[round])
                .finalize_xof()
                .fill(&mut data);
            let mut rec = Vec::new();
            enc.encode_data(0, 0, &data, 0, &mut rec);
            let records = b.push(&rec, 1, false, false, Instant::now(), 1);
            assert!(records.is_empty());
            let s = b
                .seal(BatchFlags::FLUSH, Some("x"), false, 2)
                .expect("sealed");
            // The same bytes the copying seal makes.
            let decoded = batch::decode(&s.bytes).expect("decodes");
            assert_eq!(decoded.header.seq, s.seq);
            assert_eq!(decoded.header.header_hash, s.header_hash);
            assert_eq!(decoded.header.bookmark.as_deref(), Some("x"));
            let params = SealParams {
                group: "g",
                seq: s.seq,
                agent_time_ns: 2,
                flags: decoded.header.flags,
                bookmark: Some("x"),
                prev_hash: decoded.header.prev_hash,
                record_count: 1,
            };
            let (copied, hash) = batch::seal(&params, &rec);
            assert_eq!(&s.bytes[..], &copied[..]);
            assert_eq!(hash, s.header_hash);
            sealed.push(s);
        }
        assert_eq!(b.pool.kept(), 0, "every buffer is held by its batch");
        sealed.clear();
        assert_eq!(b.pool.kept(), 3, "dropped batches give their buffers back");
    }

    #[test]
    fn a_sealed_batch_carries_its_header_hash_and_time() {
        let cfg = BatcherConfig {
            payload_bytes_target: 2 * marker().len(),
            age_max: Duration::from_millis(20),
        };
        let mut b = Batcher::new("g", cfg, Seq(0), [7; 32]);
        let mut sealed = b.push(&marker(), 1, false, false, Instant::now(), 11);
        sealed.extend(b.push(&marker(), 1, true, true, Instant::now(), 12));
        sealed.extend(b.seal(BatchFlags::FLUSH, Some("bm"), false, 13));
        sealed.push(b.seal_always(0, None, false, -5));
        assert_eq!(sealed.len(), 3);
        let mut prev = [7; 32];
        for s in &sealed {
            let h = batch::decode_header(&s.bytes).expect("decodes");
            assert_eq!(s.header_hash, h.header_hash, "seq {}", s.seq.0);
            assert_eq!(s.agent_time_ns, h.agent_time_ns, "seq {}", s.seq.0);
            assert_eq!(s.seq, h.seq);
            assert_eq!(h.prev_hash, prev, "chained");
            prev = s.header_hash;
        }
        assert_eq!(
            sealed.iter().map(|s| s.agent_time_ns).collect::<Vec<_>>(),
            vec![12, 13, -5]
        );
    }

    #[test]
    fn a_push_larger_than_a_batch_is_split_at_records() {
        let cfg = BatcherConfig {
            payload_bytes_target: 2 * marker().len(),
            age_max: Duration::from_millis(20),
        };
        let mut b = Batcher::new("g", cfg, Seq(0), [0; 32]);
        let five: Vec<u8> = (0..5).flat_map(|_| marker()).collect();
        let sealed = b.push(&five, 5, false, false, Instant::now(), 1);
        let counts: Vec<u32> = sealed
            .iter()
            .map(|s| {
                batch::decode(&s.bytes)
                    .expect("decodes")
                    .header
                    .record_count
            })
            .collect();
        assert_eq!(
            counts,
            vec![2, 2],
            "two full batches sealed, one record left open"
        );
        let last = b.seal(0, None, false, 1).expect("the rest");
        assert_eq!(
            batch::decode(&last.bytes)
                .expect("decodes")
                .header
                .record_count,
            1
        );
    }
}
