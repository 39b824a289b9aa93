//! The batch format: the one byte layout a batch has in the agent's spool, on the wire and in
//! the replica's journal. Encoding, sealing and fully validating decoding, without I/O.
//!
//! ```text
//! batch   = header payload
//! header  = magic "CDPB" | version u16 | flags u16 | header_len u32 | record_count u32
//!           | payload_len u32 | reserved u32 (0) | seq u64 | agent_time_ns i64
//!           | prev_hash [32] | payload_hash [32] | group_len u8 | bookmark_len u8
//!           | group bytes | bookmark bytes | header_hash [32]
//! payload = record*
//! record  = volume u32 | kind u8 | encoding u8 | flags u16 | offset u64 | length u32
//!           | stored_len u32 | data_hash [32] | stored bytes
//! ```
//! All integers little-endian. `header_hash` is blake3 of the header bytes before it and is the
//! batch's identity: the next batch carries it as `prev_hash`. `payload_hash` is blake3 of the
//! payload. A data record's `data_hash` is blake3 of its uncompressed bytes; its stored bytes
//! are zstd-compressed when that shrinks them, raw otherwise. Zero and trim records carry no
//! bytes and read as zeros. Every record lies inside one chunk.
//!
//! Decoding checks every length against the limits in [`crate::types`] before it allocates
//! and rejects anything malformed with a [`BatchError`]; it never panics. [`decode`] checks a
//! borrowed batch and gives a [`BatchView`]; [`CheckedBatch`] is the owned form, checked once
//! and keeping what the check decoded (the receive path makes one per batch and reads its
//! structure from it from then on). [`announced_len`] sizes a read buffer from the first
//! bytes of a batch.

use bytes::Bytes;

use crate::types::{
    BATCH_PAYLOAD_BYTES_MAX, BATCH_RECORDS_MAX, CHUNK_BYTES, NAME_BYTES_MAX, Seq, VolumeId,
    check_name,
};

pub const MAGIC: [u8; 4] = *b"CDPB";
pub const VERSION: u16 = 1;
/// Bytes of the header before the names.
pub const HEADER_FIXED_BYTES: usize = 106;
/// Bytes of the header hash that ends the header.
pub const HASH_BYTES: usize = 32;
/// Largest possible header.
pub const HEADER_BYTES_MAX: usize = HEADER_FIXED_BYTES + 2 * NAME_BYTES_MAX + HASH_BYTES;
/// Largest possible batch.
pub const BATCH_BYTES_MAX: usize = HEADER_BYTES_MAX + BATCH_PAYLOAD_BYTES_MAX;
/// Bytes of a record header.
pub const RECORD_HEADER_BYTES: usize = 56;
/// zstd level for records. A fast (negative) level: on the agent's 2 cores level 1 spent
/// half the agent's CPU for a ratio of 1.14 on fio's data, level -3 a third of that for 1.11.
pub const ZSTD_LEVEL: i32 = -3;

const _: () = assert!(NAME_BYTES_MAX <= u8::MAX as usize);
const _: () = assert!(CHUNK_BYTES <= u32::MAX as u64);

pub type Hash = [u8; 32];
pub const ZERO_HASH: Hash = [0; 32];

/// Flags of a batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchFlags(pub u16);

impl BatchFlags {
    /// Cut by a FLUSH or a FUA write: a point the client made durable.
    pub const FLUSH: u16 = 1;
    /// Carries a bookmark name.
    pub const BOOKMARK: u16 = 2;
    /// Holds sync or resync records.
    pub const SYNC: u16 = 4;
    /// The state at the end of this batch is not crash-consistent (a volume of the group is
    /// inside a sync or resync).
    pub const INCONSISTENT: u16 = 8;
    const KNOWN: u16 = Self::FLUSH | Self::BOOKMARK | Self::SYNC | Self::INCONSISTENT;

    pub fn has(self, flag: u16) -> bool {
        self.0 & flag != 0
    }
    pub fn consistent(self) -> bool {
        !self.has(Self::INCONSISTENT)
    }
}

/// What a record does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    /// Bytes written.
    Data = 1,
    /// A range that reads as zeros (NBD WRITE_ZEROES, or a sync read of an all-zero range).
    Zero = 2,
    /// A discarded range; reads as zeros.
    Trim = 3,
    /// From here the volume is being (re)synchronised: it has no consistent image until the
    /// matching `SyncEnd`. `offset` and `length` are 0.
    SyncBegin = 4,
    /// The volume's (re)synchronisation is complete as of this record.
    SyncEnd = 5,
}

impl RecordKind {
    pub fn from_u8(v: u8) -> Option<RecordKind> {
        Some(match v {
            1 => RecordKind::Data,
            2 => RecordKind::Zero,
            3 => RecordKind::Trim,
            4 => RecordKind::SyncBegin,
            5 => RecordKind::SyncEnd,
            _ => return None,
        })
    }
    /// Whether the record changes bytes of the volume.
    pub fn changes_bytes(self) -> bool {
        matches!(self, RecordKind::Data | RecordKind::Zero | RecordKind::Trim)
    }
}

/// How a data record's bytes are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Encoding {
    Raw = 0,
    Zstd = 1,
}

/// Record flag: the record was read from the device by a sync or resync, not written by a client.
pub const RECORD_FLAG_SYNC: u16 = 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
    #[error("batch is truncated: {0} more bytes needed")]
    Truncated(usize),
    #[error("batch has bad magic")]
    BadMagic,
    #[error("batch format version {0} is not supported (this build reads version {VERSION})")]
    BadVersion(u16),
    #[error("batch header is malformed: {0}")]
    BadHeader(&'static str),
    #[error("batch header checksum does not match")]
    HeaderHash,
    #[error("batch payload checksum does not match")]
    PayloadHash,
    #[error("batch length {actual} does not match its header ({expected})")]
    Length { expected: usize, actual: usize },
    #[error("record {index} is malformed: {reason}")]
    BadRecord { index: u32, reason: &'static str },
    #[error("record data checksum does not match (volume {volume}, offset {offset})")]
    DataHash { volume: VolumeId, offset: u64 },
    #[error("record data does not decompress: {0}")]
    Decompress(String),
}

/// The decoded header of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    pub seq: Seq,
    pub agent_time_ns: i64,
    pub flags: BatchFlags,
    pub group: String,
    pub bookmark: Option<String>,
    pub record_count: u32,
    pub payload_len: u32,
    pub prev_hash: Hash,
    pub payload_hash: Hash,
    /// The batch's identity; the next batch names it as `prev_hash`.
    pub header_hash: Hash,
    pub header_len: u32,
}

impl BatchHeader {
    pub fn total_len(&self) -> usize {
        self.header_len as usize + self.payload_len as usize
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
fn hash_at(b: &[u8], at: usize) -> Hash {
    let mut h = [0u8; 32];
    h.copy_from_slice(&b[at..at + 32]);
    h
}

/// `buf` holds at least `need` bytes and starts with this format's magic and version.
fn check_prefix(buf: &[u8], need: usize) -> Result<(), BatchError> {
    if buf.len() < need {
        return Err(BatchError::Truncated(need - buf.len()));
    }
    if buf[0..4] != MAGIC {
        return Err(BatchError::BadMagic);
    }
    let version = u16_at(buf, 4);
    if version != VERSION {
        return Err(BatchError::BadVersion(version));
    }
    Ok(())
}

/// Decodes and checks a batch header from the start of `buf` (which may hold more).
/// Does not look at the payload.
pub fn decode_header(buf: &[u8]) -> Result<BatchHeader, BatchError> {
    check_prefix(buf, HEADER_FIXED_BYTES)?;
    let flags = u16_at(buf, 6);
    if flags & !BatchFlags::KNOWN != 0 {
        return Err(BatchError::BadHeader("unknown flags"));
    }
    let header_len = u32_at(buf, 8);
    let record_count = u32_at(buf, 12);
    let payload_len = u32_at(buf, 16);
    if u32_at(buf, 20) != 0 {
        return Err(BatchError::BadHeader("reserved field is not zero"));
    }
    let seq = u64_at(buf, 24);
    let agent_time_ns = u64_at(buf, 32) as i64;
    let prev_hash = hash_at(buf, 40);
    let payload_hash = hash_at(buf, 72);
    let group_len = buf[104] as usize;
    let bookmark_len = buf[105] as usize;
    if group_len == 0 || group_len > NAME_BYTES_MAX || bookmark_len > NAME_BYTES_MAX {
        return Err(BatchError::BadHeader("name length out of range"));
    }
    let expected_len = HEADER_FIXED_BYTES + group_len + bookmark_len + HASH_BYTES;
    if header_len as usize != expected_len {
        return Err(BatchError::BadHeader(
            "header length does not match the names",
        ));
    }
    if seq == 0 {
        return Err(BatchError::BadHeader("seq 0"));
    }
    if payload_len as usize > BATCH_PAYLOAD_BYTES_MAX {
        return Err(BatchError::BadHeader("payload too long"));
    }
    if record_count as usize > BATCH_RECORDS_MAX {
        return Err(BatchError::BadHeader("too many records"));
    }
    if (bookmark_len > 0) != (flags & BatchFlags::BOOKMARK != 0) {
        return Err(BatchError::BadHeader("bookmark flag and name disagree"));
    }
    if buf.len() < expected_len {
        return Err(BatchError::Truncated(expected_len - buf.len()));
    }
    let hashed_len = expected_len - HASH_BYTES;
    let header_hash = hash_at(buf, hashed_len);
    if *blake3::hash(&buf[..hashed_len]).as_bytes() != header_hash {
        return Err(BatchError::HeaderHash);
    }
    let name = |from: usize, len: usize| -> Result<String, BatchError> {
        let s = std::str::from_utf8(&buf[from..from + len])
            .map_err(|_| BatchError::BadHeader("name is not UTF-8"))?;
        check_name("batch", s)
            .map_err(|_| BatchError::BadHeader("name has characters that are not allowed"))?;
        Ok(s.to_owned())
    };
    let group = name(HEADER_FIXED_BYTES, group_len)?;
    let bookmark = if bookmark_len > 0 {
        Some(name(HEADER_FIXED_BYTES + group_len, bookmark_len)?)
    } else {
        None
    };
    Ok(BatchHeader {
        seq: Seq(seq),
        agent_time_ns,
        flags: BatchFlags(flags),
        group,
        bookmark,
        record_count,
        payload_len,
        prev_hash,
        payload_hash,
        header_hash,
        header_len,
    })
}

/// The fixed part of a record, decoded and checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub volume: VolumeId,
    pub kind: RecordKind,
    pub encoding: Encoding,
    pub flags: u16,
    pub offset: u64,
    pub length: u32,
    pub stored_len: u32,
    pub data_hash: Hash,
}

impl RecordHeader {
    /// Decodes a record header from the start of `buf`, checking it on its own (kind, encoding,
    /// lengths, chunk bounds). `index` only names the record in errors.
    pub fn decode(buf: &[u8], index: u32) -> Result<RecordHeader, BatchError> {
        let bad = |reason| BatchError::BadRecord { index, reason };
        if buf.len() < RECORD_HEADER_BYTES {
            return Err(bad("truncated record header"));
        }
        let volume = u32_at(buf, 0);
        let kind = RecordKind::from_u8(buf[4]).ok_or(bad("unknown kind"))?;
        let encoding = match buf[5] {
            0 => Encoding::Raw,
            1 => Encoding::Zstd,
            _ => return Err(bad("unknown encoding")),
        };
        let flags = u16_at(buf, 6);
        if flags & !RECORD_FLAG_SYNC != 0 {
            return Err(bad("unknown flags"));
        }
        let offset = u64_at(buf, 8);
        let length = u32_at(buf, 16);
        let stored_len = u32_at(buf, 20);
        let data_hash = hash_at(buf, 24);
        match kind {
            RecordKind::Data | RecordKind::Zero | RecordKind::Trim => {
                if length == 0 || u64::from(length) > CHUNK_BYTES {
                    return Err(bad("length out of range"));
                }
                let last = offset
                    .checked_add(u64::from(length) - 1)
                    .ok_or(bad("range overflows"))?;
                if offset / CHUNK_BYTES != last / CHUNK_BYTES {
                    return Err(bad("record crosses a chunk boundary"));
                }
            }
            RecordKind::SyncBegin | RecordKind::SyncEnd => {
                if offset != 0 || length != 0 {
                    return Err(bad("sync marker with a range"));
                }
            }
        }
        match (kind, encoding) {
            (RecordKind::Data, Encoding::Raw) if stored_len != length => {
                return Err(bad("raw length mismatch"));
            }
            (RecordKind::Data, Encoding::Zstd) if stored_len == 0 || stored_len >= length => {
                return Err(bad("compressed length out of range"));
            }
            (RecordKind::Data, _) => {}
            (_, Encoding::Raw) if stored_len == 0 => {}
            _ => return Err(bad("record without data carries bytes")),
        }
        Ok(RecordHeader {
            volume,
            kind,
            encoding,
            flags,
            offset,
            length,
            stored_len,
            data_hash,
        })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.volume.to_le_bytes());
        out.push(self.kind as u8);
        out.push(self.encoding as u8);
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.length.to_le_bytes());
        out.extend_from_slice(&self.stored_len.to_le_bytes());
        out.extend_from_slice(&self.data_hash);
    }

    /// Bytes of the record in a payload, header included.
    pub fn total_len(&self) -> usize {
        RECORD_HEADER_BYTES + self.stored_len as usize
    }

    pub fn is_sync(&self) -> bool {
        self.flags & RECORD_FLAG_SYNC != 0
    }

    /// Decodes a data record's stored bytes into `out` (cleared first; its capacity is reused)
    /// and checks them against the record's hash.
    pub fn decode_data(
        &self,
        stored: &[u8],
        decompressor: &mut zstd::bulk::Decompressor<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), BatchError> {
        debug_assert_eq!(self.kind, RecordKind::Data);
        if stored.len() != self.stored_len as usize {
            return Err(BatchError::Length {
                expected: self.stored_len as usize,
                actual: stored.len(),
            });
        }
        out.clear();
        match self.encoding {
            Encoding::Raw => out.extend_from_slice(stored),
            Encoding::Zstd => {
                out.reserve(self.length as usize);
                let n = decompressor
                    .decompress_to_buffer(stored, out)
                    .map_err(|e| BatchError::Decompress(e.to_string()))?;
                if n != self.length as usize {
                    return Err(BatchError::Decompress(format!(
                        "{n} bytes instead of {}",
                        self.length
                    )));
                }
            }
        }
        self.check_data(out)
    }

    /// Checks the stored bytes of a [`Encoding::Raw`] data record (its length and its
    /// blake3 hash) without copying them: they are the record's bytes as they are.
    pub fn check_raw(&self, stored: &[u8]) -> Result<(), BatchError> {
        debug_assert_eq!(
            (self.kind, self.encoding),
            (RecordKind::Data, Encoding::Raw)
        );
        if stored.len() != self.length as usize || self.stored_len != self.length {
            return Err(BatchError::Length {
                expected: self.length as usize,
                actual: stored.len(),
            });
        }
        self.check_data(stored)
    }

    /// Checks decoded bytes against the record's blake3 hash.
    fn check_data(&self, data: &[u8]) -> Result<(), BatchError> {
        if *blake3::hash(data).as_bytes() != self.data_hash {
            return Err(BatchError::DataHash {
                volume: self.volume,
                offset: self.offset,
            });
        }
        Ok(())
    }
}

/// A record inside a decoded batch.
#[derive(Clone, Copy, Debug)]
pub struct RecordView<'a> {
    pub header: RecordHeader,
    /// Position of the record header within the payload.
    pub payload_pos: usize,
    pub stored: &'a [u8],
}

/// A batch whose header, payload hash and record structure have all been checked.
#[derive(Debug)]
pub struct BatchView<'a> {
    pub header: BatchHeader,
    pub bytes: &'a [u8],
}

impl<'a> BatchView<'a> {
    pub fn payload(&self) -> &'a [u8] {
        &self.bytes[self.header.header_len as usize..]
    }

    /// The records, in order. Their structure was checked by [`decode`], so this cannot fail.
    pub fn records(&self) -> impl Iterator<Item = RecordView<'a>> + 'a {
        let payload = self.payload();
        let mut pos = 0usize;
        let mut index = 0u32;
        std::iter::from_fn(move || {
            if pos >= payload.len() {
                return None;
            }
            let header = RecordHeader::decode(&payload[pos..], index).ok()?;
            let start = pos + RECORD_HEADER_BYTES;
            let end = start + header.stored_len as usize;
            let view = RecordView {
                header,
                payload_pos: pos,
                stored: payload.get(start..end)?,
            };
            pos = end;
            index += 1;
            Some(view)
        })
    }
}

/// Decodes and fully checks a whole batch: header, header hash, exact length, payload hash and
/// every record's structure. Record data hashes are checked when the data is decoded
/// ([`RecordHeader::decode_data`]) or by [`check_record_data`].
pub fn decode(bytes: &[u8]) -> Result<BatchView<'_>, BatchError> {
    let header = decode_header(bytes)?;
    check_body(&header, bytes, |_, _| {})?;
    Ok(BatchView { header, bytes })
}

/// The checks of [`decode`] after the header's: exact length, payload hash and every record's
/// structure (each record header on its own, the records filling the payload exactly, as many
/// as the header says). `each` sees every record header and its position in the payload, in
/// order, as it is checked.
fn check_body(
    header: &BatchHeader,
    bytes: &[u8],
    mut each: impl FnMut(RecordHeader, usize),
) -> Result<(), BatchError> {
    let total = header.total_len();
    if bytes.len() != total {
        return Err(BatchError::Length {
            expected: total,
            actual: bytes.len(),
        });
    }
    let payload = &bytes[header.header_len as usize..];
    if *blake3::hash(payload).as_bytes() != header.payload_hash {
        return Err(BatchError::PayloadHash);
    }
    let mut pos = 0usize;
    let mut count = 0u32;
    while pos < payload.len() {
        if count >= header.record_count {
            return Err(BatchError::BadHeader("more records than the header says"));
        }
        let rh = RecordHeader::decode(&payload[pos..], count)?;
        let end = pos + rh.total_len();
        if end > payload.len() {
            return Err(BatchError::BadRecord {
                index: count,
                reason: "record data runs past the payload",
            });
        }
        each(rh, pos);
        pos = end;
        count += 1;
    }
    if count != header.record_count {
        return Err(BatchError::BadHeader("fewer records than the header says"));
    }
    Ok(())
}

/// Bytes at the start of a batch that [`announced_len`] reads (up to and including
/// `payload_len`).
pub const LENGTH_PREFIX_BYTES: usize = 20;
/// Smallest possible header (a one-byte group name, no bookmark).
const HEADER_BYTES_MIN: usize = HEADER_FIXED_BYTES + 1 + HASH_BYTES;

/// The whole length (header and payload) a batch announces in its first
/// [`LENGTH_PREFIX_BYTES`], for a reader that sizes its buffer before the rest arrives. It
/// checks only what the prefix holds — magic, version, header length and payload length
/// within their bounds — so an `Ok` is at most [`BATCH_BYTES_MAX`] and an oversize
/// announcement is refused before anyone allocates; [`decode_header`] checks the rest. A
/// header that `decode_header` accepts announces its [`BatchHeader::total_len`].
pub fn announced_len(prefix: &[u8]) -> Result<usize, BatchError> {
    check_prefix(prefix, LENGTH_PREFIX_BYTES)?;
    let header_len = u32_at(prefix, 8) as usize;
    if !(HEADER_BYTES_MIN..=HEADER_BYTES_MAX).contains(&header_len) {
        return Err(BatchError::BadHeader("header length out of range"));
    }
    let payload_len = u32_at(prefix, 16) as usize;
    if payload_len > BATCH_PAYLOAD_BYTES_MAX {
        return Err(BatchError::BadHeader("payload too long"));
    }
    Ok(header_len + payload_len)
}

/// A batch whose header is decoded and checked ([`decode_header`]) and whose payload is not
/// checked yet: the first half of making a [`CheckedBatch`], for a caller that decides on the
/// header (its group, its seq) before it pays for the payload hash.
#[derive(Clone, Debug)]
pub struct CheckedHeader {
    bytes: Bytes,
    header: BatchHeader,
}

impl CheckedHeader {
    /// Decodes and checks the header at the start of `bytes`, the whole batch.
    pub fn new(bytes: Bytes) -> Result<CheckedHeader, BatchError> {
        let header = decode_header(&bytes)?;
        Ok(CheckedHeader { bytes, header })
    }

    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    /// The rest of [`decode`]'s checks — exact length, payload hash, every record's structure
    /// — without decoding the header again. Fails exactly where `decode` fails, with the same
    /// error.
    pub fn check_payload(self) -> Result<CheckedBatch, BatchError> {
        let CheckedHeader { bytes, header } = self;
        // Bounded by the payload, not by the count the header claims.
        let mut records = Vec::with_capacity(
            (header.record_count as usize).min(header.payload_len as usize / RECORD_HEADER_BYTES),
        );
        check_body(&header, &bytes, |header, payload_pos| {
            records.push(CheckedRecord {
                header,
                payload_pos,
            })
        })?;
        Ok(CheckedBatch {
            bytes,
            header,
            records,
        })
    }
}

/// A record header of a [`CheckedBatch`], as its check decoded it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CheckedRecord {
    header: RecordHeader,
    /// Position of the record header within the payload.
    payload_pos: usize,
}

/// An owned batch checked once, fully, as [`decode`] checks it: header, header hash, exact
/// length, payload hash and every record's structure. It keeps what the check decoded — the
/// header, each record's header and position — so nothing reads the batch's structure again.
/// Record data hashes are not checked here: as with [`decode`], they are checked where the
/// data is decoded ([`RecordHeader::decode_data`], [`check_record_data`]).
#[derive(Clone, Debug)]
pub struct CheckedBatch {
    bytes: Bytes,
    header: BatchHeader,
    records: Vec<CheckedRecord>,
}

impl CheckedBatch {
    /// Checks a whole batch: `CheckedHeader::new(bytes)?.check_payload()`. Accepts exactly what
    /// [`decode`] accepts and fails with the error it fails with.
    pub fn new(bytes: Bytes) -> Result<CheckedBatch, BatchError> {
        CheckedHeader::new(bytes)?.check_payload()
    }

    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    /// The whole batch, header and payload, as received.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    pub fn payload(&self) -> &[u8] {
        &self.bytes[self.header.header_len as usize..]
    }

    /// How many records the batch holds (its header's `record_count`).
    pub fn record_count(&self) -> usize {
        self.records.len()
    }

    /// Record `index` (in batch order), if there is one; not checked again.
    pub fn record(&self, index: usize) -> Option<RecordView<'_>> {
        let r = self.records.get(index)?;
        Some(self.view_of(r))
    }

    /// The records, in order, as [`BatchView::records`] gives them; not checked again.
    pub fn records(&self) -> impl ExactSizeIterator<Item = RecordView<'_>> + '_ {
        self.records.iter().map(|r| self.view_of(r))
    }

    /// The batch as a [`BatchView`] (the header cloned), for code written against `decode`.
    pub fn view(&self) -> BatchView<'_> {
        BatchView {
            header: self.header.clone(),
            bytes: &self.bytes,
        }
    }

    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }

    fn view_of(&self, r: &CheckedRecord) -> RecordView<'_> {
        let start = r.payload_pos + RECORD_HEADER_BYTES;
        RecordView {
            header: r.header,
            payload_pos: r.payload_pos,
            // Inside the payload: the check saw every record end within it.
            stored: &self.payload()[start..start + r.header.stored_len as usize],
        }
    }
}

/// What can still be read of a batch that failed [`decode`] (a damaged batch in the agent's
/// spool): its header, when that is intact (it is hashed on its own), and the ranges its
/// records cover, when their structure is intact too. Nothing here is trusted as data: it
/// only tells which chunks the damaged batch touched, so they can be resynced from the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DamagedBatch {
    pub header: BatchHeader,
    /// `(volume, offset, length)` of each record that changes bytes, or `None` when the
    /// payload's structure is damaged too.
    pub extents: Option<Vec<(VolumeId, u64, u32)>>,
}

/// Reads what it can of a batch at the start of `buf` whose full decode failed. `None` when
/// even its header does not decode (the caller then knows nothing of the batch).
pub fn salvage(buf: &[u8]) -> Option<DamagedBatch> {
    let header = decode_header(buf).ok()?;
    let end = header.total_len().min(buf.len());
    let payload = &buf[header.header_len as usize..end];
    let mut extents = Vec::new();
    let mut pos = 0usize;
    let mut index = 0u32;
    let mut intact = payload.len() == header.payload_len as usize;
    while intact && pos < payload.len() && index < header.record_count {
        match RecordHeader::decode(&payload[pos..], index) {
            Ok(r) => {
                if r.kind.changes_bytes() {
                    extents.push((r.volume, r.offset, r.length));
                }
                pos += r.total_len();
                index += 1;
            }
            Err(_) => intact = false,
        }
    }
    intact &= pos == payload.len() && index == header.record_count;
    Some(DamagedBatch {
        header,
        extents: intact.then_some(extents),
    })
}

/// Decodes every data record of a checked batch and checks its hash (the receiver's full check).
pub fn check_record_data(
    batch: &BatchView<'_>,
    decompressor: &mut zstd::bulk::Decompressor<'_>,
    scratch: &mut Vec<u8>,
) -> Result<(), BatchError> {
    for r in batch.records() {
        if r.header.kind == RecordKind::Data {
            r.header.decode_data(r.stored, decompressor, scratch)?;
        }
    }
    Ok(())
}

/// Encodes records; holds a reusable zstd compressor and scratch buffer. One per thread/task.
pub struct RecordEncoder {
    compressor: zstd::bulk::Compressor<'static>,
    scratch: Vec<u8>,
    /// Small records (too short to sample) still to be stored raw without trying zstd.
    small_skip: u32,
    /// How many small records the next miss skips; doubles per consecutive miss up to
    /// [`SMALL_SKIP_MAX`], back to 0 on a hit.
    small_backoff: u32,
}

impl RecordEncoder {
    pub fn new() -> RecordEncoder {
        // Creating a compressor only fails when zstd cannot allocate its context.
        let compressor = zstd::bulk::Compressor::new(ZSTD_LEVEL)
            .unwrap_or_else(|e| panic!("zstd compressor: {e}"));
        RecordEncoder {
            compressor,
            scratch: Vec::new(),
            small_skip: 0,
            small_backoff: 0,
        }
    }

    /// Appends a data record for `data` at `offset` (which must lie in one chunk) to `out`.
    pub fn encode_data(
        &mut self,
        volume: VolumeId,
        offset: u64,
        data: &[u8],
        flags: u16,
        out: &mut Vec<u8>,
    ) {
        assert!(!data.is_empty() && data.len() as u64 <= CHUNK_BYTES);
        assert_eq!(
            offset / CHUNK_BYTES,
            (offset + data.len() as u64 - 1) / CHUNK_BYTES
        );
        let data_hash = *blake3::hash(data).as_bytes();
        let length = data.len() as u32;
        let small = data.len() < SAMPLE_MIN_BYTES;
        let compressed = self.worth_compressing(data) && {
            self.scratch.clear();
            self.scratch
                .reserve(zstd::zstd_safe::compress_bound(data.len()));
            let n = match self.compressor.compress_to_buffer(data, &mut self.scratch) {
                Ok(n) => n,
                Err(_) => data.len(),
            };
            if small {
                self.small_outcome(n <= data.len() - data.len() / SAMPLE_SAVING_MIN_DIV);
            }
            n > 0 && n < data.len()
        };
        let (encoding, stored): (Encoding, &[u8]) = if compressed {
            (Encoding::Zstd, &self.scratch)
        } else {
            (Encoding::Raw, data)
        };
        let header = RecordHeader {
            volume,
            kind: RecordKind::Data,
            encoding,
            flags,
            offset,
            length,
            stored_len: stored.len() as u32,
            data_hash,
        };
        out.reserve(RECORD_HEADER_BYTES + stored.len());
        header.encode(out);
        out.extend_from_slice(stored);
    }
}

impl RecordEncoder {
    /// Whether `data` is likely to shrink enough to pay for compressing it: a record of at
    /// least [`SAMPLE_MIN_BYTES`] is compressed only when one of two [`SAMPLE_BYTES`] samples
    /// (its start and its middle) shrinks by at least 1/[`SAMPLE_SAVING_MIN_DIV`].
    /// Compressing incompressible data was most of the agent's CPU, and compressing data
    /// that saves 6 % (fio's default buffers) was a fifth of it for bytes not worth saving.
    /// A shorter record is its own sample: it is compressed unless the small records before
    /// it missed (saved less than 1/[`SAMPLE_SAVING_MIN_DIV`]), in which case the next 1, 2,
    /// 4 … up to [`SMALL_SKIP_MAX`] small records are stored raw without trying; one hit
    /// ends the back-off. Trying every 4 KiB record of fio's buffers was a fifth of the
    /// agent's CPU at qd32 (issue 12).
    fn worth_compressing(&mut self, data: &[u8]) -> bool {
        if data.len() < SAMPLE_MIN_BYTES {
            if self.small_skip > 0 {
                self.small_skip -= 1;
                return false;
            }
            return true;
        }
        let mid = (data.len() / 2) & !(SAMPLE_BYTES - 1);
        [&data[..SAMPLE_BYTES], &data[mid..mid + SAMPLE_BYTES]]
            .iter()
            .any(|sample| {
                self.scratch.clear();
                self.scratch
                    .reserve(zstd::zstd_safe::compress_bound(SAMPLE_BYTES));
                match self
                    .compressor
                    .compress_to_buffer(sample, &mut self.scratch)
                {
                    Ok(n) => n <= SAMPLE_BYTES - SAMPLE_BYTES / SAMPLE_SAVING_MIN_DIV,
                    Err(_) => false,
                }
            })
    }
}

impl RecordEncoder {
    /// Records whether a small record's compression saved enough, and sets the back-off.
    fn small_outcome(&mut self, saved: bool) {
        if saved {
            self.small_backoff = 0;
        } else {
            self.small_backoff = (self.small_backoff * 2).clamp(1, SMALL_SKIP_MAX);
        }
        self.small_skip = self.small_backoff;
    }
}

/// Most small records stored raw, untried, after consecutive misses (one try in 65 then:
/// compressible data that follows is noticed within 64 records).
pub const SMALL_SKIP_MAX: u32 = 64;
/// Records at least this long are sampled before they are compressed.
pub const SAMPLE_MIN_BYTES: usize = 32 << 10;
/// Bytes of each compressibility sample.
pub const SAMPLE_BYTES: usize = 4 << 10;
/// A sample must shrink by at least 1/this of its size for its record to be compressed
/// (1/8: 512 bytes of 4 KiB). Data that saves less costs the protected disk's CPU for little
/// link; database pages, file system metadata and text save far more.
pub const SAMPLE_SAVING_MIN_DIV: usize = 8;
const _: () = assert!(SAMPLE_MIN_BYTES >= 2 * SAMPLE_BYTES && SAMPLE_BYTES.is_power_of_two());

impl Default for RecordEncoder {
    fn default() -> Self {
        Self::new()
    }
}

/// Appends a record without data (zero, trim, sync markers) to `out`.
pub fn encode_marker(
    volume: VolumeId,
    kind: RecordKind,
    offset: u64,
    length: u32,
    flags: u16,
    out: &mut Vec<u8>,
) {
    assert_ne!(kind, RecordKind::Data);
    RecordHeader {
        volume,
        kind,
        encoding: Encoding::Raw,
        flags,
        offset,
        length,
        stored_len: 0,
        data_hash: ZERO_HASH,
    }
    .encode(out);
}

/// What a sealed batch's header says, apart from what the payload determines.
#[derive(Clone, Debug)]
pub struct SealParams<'a> {
    pub group: &'a str,
    pub seq: Seq,
    pub agent_time_ns: i64,
    pub flags: BatchFlags,
    pub bookmark: Option<&'a str>,
    pub prev_hash: Hash,
    pub record_count: u32,
}

/// Bytes of the header of a batch of `group` with `bookmark`.
pub fn header_len(group: &str, bookmark: Option<&str>) -> usize {
    HEADER_FIXED_BYTES + group.len() + bookmark.map_or(0, str::len) + HASH_BYTES
}

/// Builds the header for `payload` and returns the whole batch (header then payload) and its
/// header hash. The payload must be a sequence of `record_count` encoded records.
pub fn seal(params: &SealParams<'_>, payload: &[u8]) -> (Vec<u8>, Hash) {
    let reserve = header_len(params.group, params.bookmark);
    let mut out = Vec::with_capacity(reserve + payload.len());
    out.resize(reserve, 0);
    out.extend_from_slice(payload);
    let (start, hash) = seal_in_place(params, &mut out, reserve);
    debug_assert_eq!(start, 0);
    (out, hash)
}

/// Seals a batch whose payload already sits in `buf[payload_at..]`, without copying it: the
/// header is written just before it, into room the caller left (at least
/// [`header_len`] bytes). Returns where the batch starts in `buf` and its header hash;
/// `buf[start..]` is then exactly what [`seal`] returns.
pub fn seal_in_place(params: &SealParams<'_>, buf: &mut [u8], payload_at: usize) -> (usize, Hash) {
    let bookmark = params.bookmark.unwrap_or("");
    let payload_len = buf.len() - payload_at;
    assert!(
        !params.group.is_empty()
            && params.group.len() <= NAME_BYTES_MAX
            && bookmark.len() <= NAME_BYTES_MAX
    );
    assert!(
        payload_len <= BATCH_PAYLOAD_BYTES_MAX && params.record_count as usize <= BATCH_RECORDS_MAX
    );
    let header_len = header_len(params.group, params.bookmark);
    assert!(payload_at >= header_len, "no room for the header");
    let mut flags = params.flags.0;
    if params.bookmark.is_some() {
        flags |= BatchFlags::BOOKMARK;
    }
    let payload_hash = blake3::hash(&buf[payload_at..]);
    let start = payload_at - header_len;
    let mut at = start;
    let mut put = |bytes: &[u8]| {
        buf[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
    };
    put(&MAGIC);
    put(&VERSION.to_le_bytes());
    put(&flags.to_le_bytes());
    put(&(header_len as u32).to_le_bytes());
    put(&params.record_count.to_le_bytes());
    put(&(payload_len as u32).to_le_bytes());
    put(&0u32.to_le_bytes());
    put(&params.seq.0.to_le_bytes());
    put(&params.agent_time_ns.to_le_bytes());
    put(&params.prev_hash);
    put(payload_hash.as_bytes());
    put(&[params.group.len() as u8, bookmark.len() as u8]);
    put(params.group.as_bytes());
    put(bookmark.as_bytes());
    let hashed_end = at;
    let header_hash = *blake3::hash(&buf[start..hashed_end]).as_bytes();
    buf[hashed_end..payload_at].copy_from_slice(&header_hash);
    debug_assert_eq!(hashed_end + HASH_BYTES, payload_at);
    (start, header_hash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Vec<u8> {
        let mut enc = RecordEncoder::new();
        let mut payload = Vec::new();
        enc.encode_data(1, 4096, &[7u8; 8192], 0, &mut payload); // compressible
        let mut random = vec![0u8; 5000];
        blake3::Hasher::new()
            .update(b"seed")
            .finalize_xof()
            .fill(&mut random);
        enc.encode_data(2, CHUNK_BYTES, &random, RECORD_FLAG_SYNC, &mut payload);
        encode_marker(1, RecordKind::Zero, 0, 512, 0, &mut payload);
        encode_marker(1, RecordKind::Trim, CHUNK_BYTES - 512, 512, 0, &mut payload);
        let params = SealParams {
            group: "db",
            seq: Seq(42),
            agent_time_ns: 1_700_000_000_000_000_000,
            flags: BatchFlags(BatchFlags::FLUSH),
            bookmark: Some("before-upgrade"),
            prev_hash: [9; 32],
            record_count: 4,
        };
        seal(&params, &payload).0
    }

    #[test]
    fn round_trip() {
        let bytes = sample();
        let view = decode(&bytes).expect("decode");
        assert_eq!(view.header.seq, Seq(42));
        assert_eq!(view.header.group, "db");
        assert_eq!(view.header.bookmark.as_deref(), Some("before-upgrade"));
        assert!(
            view.header.flags.has(BatchFlags::FLUSH) && view.header.flags.has(BatchFlags::BOOKMARK)
        );
        assert_eq!(view.header.prev_hash, [9; 32]);
        let records: Vec<_> = view.records().collect();
        assert_eq!(records.len(), 4);
        assert_eq!(records[0].header.encoding, Encoding::Zstd);
        assert_eq!(records[1].header.encoding, Encoding::Raw);
        assert!(records[1].header.is_sync());
        assert_eq!(records[2].header.kind, RecordKind::Zero);
        let mut d = zstd::bulk::Decompressor::new().expect("decompressor");
        let mut out = Vec::new();
        records[0]
            .header
            .decode_data(records[0].stored, &mut d, &mut out)
            .expect("data");
        assert_eq!(out, vec![7u8; 8192]);
        check_record_data(&view, &mut d, &mut out).expect("all data");
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let bytes = sample();
        let mut d = zstd::bulk::Decompressor::new().expect("decompressor");
        let mut scratch = Vec::new();
        for i in 0..bytes.len() {
            for bit in [0u8, 3, 7] {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                let ok = decode(&b).and_then(|v| check_record_data(&v, &mut d, &mut scratch));
                assert!(ok.is_err(), "flip of bit {bit} in byte {i} went unnoticed");
            }
        }
    }

    #[test]
    fn incompressible_records_are_stored_raw_and_compressible_ones_compressed() {
        let mut enc = RecordEncoder::new();
        let mut random = vec![0u8; 256 << 10];
        blake3::Hasher::new()
            .update(b"r")
            .finalize_xof()
            .fill(&mut random);
        let mut half = random.clone();
        half[64 << 10..].fill(0); // random start, zeros from the middle sample on
        let same = vec![5u8; 256 << 10];
        // Random with the first `zeros` bytes of every 512 zero: saves about zeros/512.
        let sectors = |zeros: usize| {
            let mut d = random.clone();
            d.chunks_mut(512).for_each(|s| s[..zeros].fill(0));
            d
        };
        let (slight, quarter) = (sectors(48), sectors(128));
        for (data, want) in [
            (&random, Encoding::Raw),
            (&half, Encoding::Zstd),
            (&same, Encoding::Zstd),
            // 8 % smaller is not worth the CPU (fio's default buffers save 6 %); a
            // quarter is.
            (&slight, Encoding::Raw),
            (&quarter, Encoding::Zstd),
        ] {
            let mut out = Vec::new();
            enc.encode_data(0, 0, data, 0, &mut out);
            let h = RecordHeader::decode(&out, 0).expect("record");
            assert_eq!(h.encoding, want);
            let mut d = zstd::bulk::Decompressor::new().expect("decompressor");
            let mut back = Vec::new();
            h.decode_data(&out[RECORD_HEADER_BYTES..], &mut d, &mut back)
                .expect("decodes");
            assert_eq!(&back, data);
        }
    }

    #[test]
    fn small_records_that_do_not_compress_back_off_and_a_compressible_one_ends_it() {
        let mut enc = RecordEncoder::new();
        let mut random = vec![0u8; 4096];
        blake3::Hasher::new()
            .update(b"s")
            .finalize_xof()
            .fill(&mut random);
        let text = b"a journal of every write, in order; ".repeat(120)[..4096].to_vec();
        let mut encode = |data: &[u8]| {
            let mut out = Vec::new();
            enc.encode_data(0, 0, data, 0, &mut out);
            let h = RecordHeader::decode(&out, 0).expect("record");
            let mut d = zstd::bulk::Decompressor::new().expect("decompressor");
            let mut back = Vec::new();
            h.decode_data(&out[RECORD_HEADER_BYTES..], &mut d, &mut back)
                .expect("decodes");
            assert_eq!(back, data);
            h.encoding
        };
        // Compressible small records are compressed every time: a hit never backs off.
        for _ in 0..100 {
            assert_eq!(encode(&text), Encoding::Zstd);
        }
        // A long run of misses: tries at 0, 2, 5, 10, 19, 36, 69, 134, …; the back-off stops
        // doubling at SMALL_SKIP_MAX.
        for _ in 0..1000 {
            assert_eq!(encode(&random), Encoding::Raw);
        }
        // Compressible data now: stored raw while the back-off lasts, then compressed again
        // within SMALL_SKIP_MAX + 1 records, and from then on every time.
        let raw_first = (0..=SMALL_SKIP_MAX)
            .take_while(|_| encode(&text) == Encoding::Raw)
            .count();
        assert!(raw_first >= 1, "the back-off skipped nothing");
        assert!(raw_first <= SMALL_SKIP_MAX as usize, "never tried again");
        for _ in 0..100 {
            assert_eq!(encode(&text), Encoding::Zstd);
        }
    }

    #[test]
    fn a_batch_damaged_in_its_data_still_names_its_extents() {
        let bytes = sample();
        let h = decode_header(&bytes).expect("header");
        let all: Vec<_> = decode(&bytes)
            .expect("decodes")
            .records()
            .filter(|r| r.header.kind.changes_bytes())
            .map(|r| (r.header.volume, r.header.offset, r.header.length))
            .collect();
        // A flipped byte in the last record's stored bytes: the batch fails, its extents stay.
        let mut damaged = bytes.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 0x40;
        assert!(decode(&damaged).is_err());
        let got = salvage(&damaged).expect("the header is intact");
        assert_eq!(got.header, h);
        assert_eq!(got.extents.as_deref(), Some(&all[..]));
        // A damaged header: nothing can be said.
        let mut damaged = bytes.clone();
        damaged[30] ^= 1;
        assert!(salvage(&damaged).is_none());
        // A damaged record header: the header is known, the extents are not.
        let mut damaged = bytes.clone();
        damaged[h.header_len as usize + 4] = 200;
        let got = salvage(&damaged).expect("the header is intact");
        assert_eq!(got.extents, None);
    }

    #[test]
    fn truncation_is_an_error() {
        let bytes = sample();
        for n in [0, 3, 50, HEADER_FIXED_BYTES, 200, bytes.len() - 1] {
            assert!(decode(&bytes[..n]).is_err());
        }
    }

    #[test]
    fn record_crossing_a_chunk_is_refused() {
        let mut buf = Vec::new();
        encode_marker(0, RecordKind::Zero, CHUNK_BYTES - 1, 2, 0, &mut buf);
        assert!(matches!(
            RecordHeader::decode(&buf, 0),
            Err(BatchError::BadRecord { .. })
        ));
    }

    /// What a record view says, comparable.
    fn parts(r: RecordView<'_>) -> (RecordHeader, usize, Vec<u8>) {
        (r.header, r.payload_pos, r.stored.to_vec())
    }

    /// `CheckedBatch::new` against `decode` on the same bytes: the same verdict, the same
    /// error, the same header and records.
    fn agrees_with_decode(b: &[u8]) -> Result<(), String> {
        let checked = CheckedBatch::new(Bytes::copy_from_slice(b));
        match (decode(b), checked) {
            (Ok(view), Ok(c)) => {
                let want: Vec<_> = view.records().map(parts).collect();
                let got: Vec<_> = c.records().map(parts).collect();
                let by_index: Vec<_> = (0..c.record_count())
                    .map(|i| c.record(i).map(parts))
                    .collect::<Option<_>>()
                    .ok_or("a record index has no record")?;
                if *c.header() != view.header
                    || got != want
                    || by_index != want
                    || c.record(c.record_count()).is_some()
                    || &c.bytes()[..] != b
                    || c.payload() != view.payload()
                    || c.view().header != view.header
                {
                    return Err("accepted, but reads differently".into());
                }
                Ok(())
            }
            (Err(a), Err(b)) if a == b => Ok(()),
            (a, b) => Err(format!(
                "decode says {:?}, CheckedBatch says {:?}",
                a.map(|v| v.header.seq),
                b.map(|c| c.header().seq)
            )),
        }
    }

    #[test]
    fn a_checked_batch_reads_as_decode_reads() {
        let bytes = sample();
        agrees_with_decode(&bytes).expect("agrees");
        let c = CheckedBatch::new(Bytes::from(bytes.clone())).expect("checks");
        assert_eq!(c.record_count(), 4);
        assert_eq!(c.into_bytes(), bytes);
        // Split in two, the check fails where decode fails and says the same.
        let header = CheckedHeader::new(Bytes::from(bytes.clone())).expect("header");
        assert_eq!(header.header().seq, Seq(42));
        let mut damaged = bytes.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        let header = CheckedHeader::new(Bytes::from(damaged.clone())).expect("header intact");
        assert_eq!(
            header.check_payload().map(|_| ()),
            decode(&damaged).map(|_| ())
        );
        assert_eq!(
            CheckedBatch::new(Bytes::from(damaged)).map(|_| ()),
            Err(BatchError::PayloadHash)
        );
    }

    #[test]
    fn a_checked_batch_refuses_every_single_bit_flip_as_decode_does() {
        let bytes = sample();
        for i in 0..bytes.len() {
            for bit in [0u8, 3, 7] {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                agrees_with_decode(&b)
                    .unwrap_or_else(|e| panic!("flip of bit {bit} in byte {i}: {e}"));
                assert!(
                    CheckedBatch::new(Bytes::from(b)).is_err(),
                    "flip of bit {bit} in byte {i} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn a_checked_batch_refuses_truncations_and_extensions_as_decode_does() {
        let bytes = sample();
        for n in [0, 3, 19, 20, 50, HEADER_FIXED_BYTES, 200, bytes.len() - 1] {
            agrees_with_decode(&bytes[..n]).expect("agrees");
            assert!(CheckedBatch::new(Bytes::copy_from_slice(&bytes[..n])).is_err());
        }
        let mut longer = bytes.clone();
        longer.push(0);
        agrees_with_decode(&longer).expect("agrees");
    }

    #[test]
    fn announced_len_reads_the_length_from_the_prefix_alone() {
        let bytes = sample();
        assert_eq!(announced_len(&bytes), Ok(bytes.len()));
        assert_eq!(
            announced_len(&bytes[..LENGTH_PREFIX_BYTES]),
            Ok(bytes.len())
        );
        assert_eq!(
            announced_len(&bytes[..LENGTH_PREFIX_BYTES - 1]),
            Err(BatchError::Truncated(1))
        );
        assert_eq!(
            announced_len(&[]),
            Err(BatchError::Truncated(LENGTH_PREFIX_BYTES))
        );
    }

    #[test]
    fn announced_len_refuses_an_oversize_announcement_from_the_prefix_alone() {
        // Only the prefix exists: the refusal cannot depend on anything after it, nor on
        // any buffer of the announced size.
        let bytes = sample();
        let with = |fields: &[(usize, u32)]| {
            let mut p = bytes[..LENGTH_PREFIX_BYTES].to_vec();
            for &(at, value) in fields {
                p[at..at + 4].copy_from_slice(&value.to_le_bytes());
            }
            p
        };
        let prefix = |at: usize, value: u32| with(&[(at, value)]);
        for payload_len in [BATCH_PAYLOAD_BYTES_MAX as u32 + 1, u32::MAX] {
            assert_eq!(
                announced_len(&prefix(16, payload_len)),
                Err(BatchError::BadHeader("payload too long"))
            );
        }
        for header_len in [
            0,
            HEADER_BYTES_MIN as u32 - 1,
            HEADER_BYTES_MAX as u32 + 1,
            u32::MAX,
        ] {
            assert_eq!(
                announced_len(&prefix(8, header_len)),
                Err(BatchError::BadHeader("header length out of range"))
            );
        }
        let largest = with(&[
            (8, HEADER_BYTES_MAX as u32),
            (16, BATCH_PAYLOAD_BYTES_MAX as u32),
        ]);
        assert_eq!(announced_len(&largest), Ok(BATCH_BYTES_MAX));
        let mut bad_magic = bytes[..LENGTH_PREFIX_BYTES].to_vec();
        bad_magic[0] ^= 1;
        assert_eq!(announced_len(&bad_magic), Err(BatchError::BadMagic));
        let mut bad_version = bytes[..LENGTH_PREFIX_BYTES].to_vec();
        bad_version[4] = 9;
        assert_eq!(announced_len(&bad_version), Err(BatchError::BadVersion(9)));
    }

    proptest! {
        #[test]
        fn a_checked_batch_agrees_with_decode_on_mutated_batches(idx in 0usize..4000, val in any::<u8>(), cut in 0usize..4000) {
            let mut b = sample();
            let i = idx % b.len();
            b[i] = val;
            b.truncate(b.len() - cut % b.len());
            prop_assert_eq!(agrees_with_decode(&b), Ok(()));
        }

        #[test]
        fn announced_len_is_bounded_and_agrees_with_decode_header(idx in 0usize..LENGTH_PREFIX_BYTES, val in any::<u8>(), cut in 0usize..200) {
            let mut b = sample();
            b[idx] = val;
            b.truncate(b.len() - cut);
            if let Ok(n) = announced_len(&b) {
                prop_assert!(n <= BATCH_BYTES_MAX);
            }
            if let Ok(h) = decode_header(&b) {
                prop_assert_eq!(announced_len(&b), Ok(h.total_len()));
            }
        }

        #[test]
        fn decoding_random_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode(&bytes);
            let _ = decode_header(&bytes);
            let _ = RecordHeader::decode(&bytes, 0);
            let _ = announced_len(&bytes);
            prop_assert_eq!(agrees_with_decode(&bytes), Ok(()));
        }

        #[test]
        fn decoding_mutated_batches_never_panics(idx in 0usize..4000, val in any::<u8>(), cut in 0usize..4000) {
            let mut b = sample();
            let i = idx % b.len();
            b[i] = val;
            b.truncate(b.len() - cut % b.len());
            if let Ok(v) = decode(&b) {
                let mut d = zstd::bulk::Decompressor::new().expect("decompressor");
                let mut s = Vec::new();
                let _ = check_record_data(&v, &mut d, &mut s);
            }
        }
    }
}
