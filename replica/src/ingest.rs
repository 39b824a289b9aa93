//! Ingest: from checked batch bytes to durable, acknowledged journal entries, one task per
//! consistency group (the commit protocol is written out in the crate docs, `lib.rs`).
//!
//! * [`plan_batch`] is the sans-IO core: the semantic checks of one batch against the
//!   volumes of its group (as they will be when the batch's turn comes), and what committing
//!   it means — target writes for syncing volumes, a journal append and record rows for
//!   protecting volumes, volume state changes.
//! * [`GroupIngest`] keeps one group's journal in seq order: it holds out-of-order batches
//!   (bounded) until the gap fills, checks the hash chain, and runs group commits.
//! * [`IngestService`] is what the QUIC server (and in-process tests) talk to: `hello` admits
//!   an agent's groups, `attach` subscribes a connection to its groups' `Paused`/`Resumed`
//!   news, `submit` fully checks a batch and hands it to its group's task through a bounded
//!   channel. Replies (`Ack`/`Nack`) go back on the [`Reply`] channel that came with the batch.
//! * A group commit that fails on a full disk is undone and retried every
//!   [`PAUSE_RETRY_INTERVAL`] (the group is *paused*, see the crate docs); any other failure
//!   stops ingest.
//! * `forget` inside serve: [`IngestService::begin_forget`] stops one group's ingest and
//!   trimmer tasks (each group has its own child cancellation token) and refuses Hellos naming
//!   it; [`IngestService::end_forget`] starts them again when the group is still there.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cdp_shared::batch::{self, BatchHeader, BatchView, Hash, RecordHeader, RecordKind};
use cdp_shared::identity::Fingerprint;
use cdp_shared::types::{BATCHES_IN_FLIGHT_DEFAULT, CHUNK_BYTES, check_name};
use cdp_shared::wire::{Control, GroupHello, GroupWelcome, PROTOCOL_VERSION, VolumeWelcome};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::catalog::{
    BatchRow, Catalog, CommitRows, EventLevel, NewRecord, RecordRow, SegmentSpan, VolumeRow,
    VolumeState,
};
use crate::datadir::DataDir;
use crate::error::{ReplicaError, Result};
use crate::journal::{Journal, JournalPos};
use crate::now_ns;
use crate::pause_board::{Pause, PauseBoard};
use crate::retention::Retention;
use crate::target::TargetFile;
use crate::trimmer::{self, TrimLink, Trimmer};

/// Batches waiting in a group task's inbox.
pub const INGEST_QUEUE_BATCHES: usize = 2 * BATCHES_IN_FLIGHT_DEFAULT;
/// Out-of-order batches a group holds while it waits for a gap to fill; beyond this, Nack.
pub const PENDING_BATCHES_MAX: usize = 2 * BATCHES_IN_FLIGHT_DEFAULT;
/// Bytes of out-of-order batches a group holds.
pub const PENDING_BYTES_MAX: usize = 512 << 20;
/// Bytes of batches one group commit takes (it always takes at least one batch).
pub const GROUP_COMMIT_BYTES_MAX: usize = 32 << 20;
/// Control messages queued for one connection's control stream.
pub const CONTROL_OUTBOX_MAX: usize = 4 * PENDING_BATCHES_MAX;
/// How often a group paused by a full disk tries its commit again.
pub const PAUSE_RETRY_INTERVAL: Duration = Duration::from_secs(1);

const _: () = assert!(PENDING_BYTES_MAX >= 2 * batch::BATCH_BYTES_MAX);
const _: () = assert!(GROUP_COMMIT_BYTES_MAX >= batch::BATCH_BYTES_MAX);

/// Test-only: the environment variable that shrinks journal segments (bytes), read by
/// [`IngestOptions::from_env`] (`serve` reads it; tests make many small segments).
pub const TEST_SEGMENT_BYTES_ENV: &str = "CDP_TEST_SEGMENT_BYTES";

/// How a running ingest is tuned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngestOptions {
    /// Where journal segments are rotated (`journal::SEGMENT_BYTES_TARGET`; tests shrink it).
    pub segment_bytes_target: u64,
}

impl Default for IngestOptions {
    fn default() -> IngestOptions {
        IngestOptions {
            segment_bytes_target: crate::journal::SEGMENT_BYTES_TARGET,
        }
    }
}

impl IngestOptions {
    /// The defaults, with the test-only `CDP_TEST_SEGMENT_BYTES` applied when set.
    pub fn from_env() -> IngestOptions {
        let mut o = IngestOptions::default();
        if let Some(n) = std::env::var(TEST_SEGMENT_BYTES_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            o.segment_bytes_target = n;
        }
        o
    }
}

/// Where a batch's replies go: the control stream of the connection it came on.
pub type Reply = mpsc::Sender<Control>;

/// A volume as ingest sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeEntry {
    pub id: i64,
    pub agent_id: u32,
    pub name: String,
    pub size: u64,
    pub state: VolumeState,
}

impl From<&VolumeRow> for VolumeEntry {
    fn from(v: &VolumeRow) -> Self {
        VolumeEntry {
            id: v.id,
            agent_id: v.agent_volume_id,
            name: v.name.clone(),
            size: v.size,
            state: v.state,
        }
    }
}

/// A change a record makes to a syncing volume's target file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetOp {
    /// Write the data record whose header is at `payload_pos` of the payload.
    Write { volume: u32, payload_pos: usize },
    /// Make the range read as zeros (zero and trim records).
    Zero {
        volume: u32,
        offset: u64,
        length: u32,
    },
}

/// A record row before the batch's place in the journal is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlannedRow {
    pub volume_id: i64,
    pub chunk: u64,
    pub idx: u32,
    pub chunk_offset: u32,
    pub length: u32,
    pub kind: RecordKind,
    /// Position of the record header within the payload.
    pub payload_pos: usize,
}

/// What committing one batch means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchPlan {
    /// Append the whole batch to the journal (it changes bytes of a protecting volume).
    pub journal: bool,
    pub target_ops: Vec<TargetOp>,
    pub rows: Vec<PlannedRow>,
    /// (agent volume id, new state, sync_done_seq)
    pub state_changes: Vec<(u32, VolumeState, Option<u64>)>,
}

/// The semantic checks of one batch and its plan, against `volumes` as they stand when the
/// batch's turn comes (sans-IO). `Err` is the one-line reason the batch is refused.
pub fn plan_batch(
    view: &BatchView<'_>,
    group: &str,
    volumes: &HashMap<u32, VolumeEntry>,
) -> std::result::Result<BatchPlan, String> {
    let seq = view.header.seq.0;
    let count = view.header.record_count as usize;
    let mut states: HashMap<u32, VolumeState> = HashMap::new();
    let mut plan = BatchPlan {
        journal: false,
        target_ops: Vec::new(),
        rows: Vec::new(),
        state_changes: Vec::new(),
    };
    for (i, r) in view.records().enumerate() {
        let h = r.header;
        let Some(v) = volumes.get(&h.volume) else {
            return Err(format!(
                "record {i} names volume id {}, which is not a volume of group {group}",
                h.volume
            ));
        };
        let state = *states.get(&h.volume).unwrap_or(&v.state);
        match h.kind {
            RecordKind::SyncBegin => {
                if i != 0 {
                    return Err(format!(
                        "record {i} is a SyncBegin, which may only be the first record of a batch"
                    ));
                }
                if state == VolumeState::New {
                    states.insert(h.volume, VolumeState::Syncing);
                    plan.state_changes
                        .push((h.volume, VolumeState::Syncing, None));
                }
            }
            RecordKind::SyncEnd => {
                if i + 1 != count {
                    return Err(format!(
                        "record {i} is a SyncEnd, which may only be the last record of a batch"
                    ));
                }
                match state {
                    VolumeState::New => {
                        return Err(format!(
                            "record {i} ends a sync of volume {} that never began",
                            v.name
                        ));
                    }
                    VolumeState::Syncing => {
                        states.insert(h.volume, VolumeState::Protecting);
                        plan.state_changes
                            .push((h.volume, VolumeState::Protecting, Some(seq)));
                    }
                    VolumeState::Protecting => {}
                }
            }
            RecordKind::Data | RecordKind::Zero | RecordKind::Trim => {
                let end = h.offset + u64::from(h.length);
                if end > v.size {
                    return Err(format!(
                        "record {i} reaches byte {end} of volume {}, which has {} bytes",
                        v.name, v.size
                    ));
                }
                match state {
                    VolumeState::New => {
                        return Err(format!(
                            "record {i} changes volume {}, whose initial sync has not begun (a SyncBegin must come first)",
                            v.name
                        ));
                    }
                    VolumeState::Syncing => plan.target_ops.push(match h.kind {
                        RecordKind::Data => TargetOp::Write {
                            volume: h.volume,
                            payload_pos: r.payload_pos,
                        },
                        _ => TargetOp::Zero {
                            volume: h.volume,
                            offset: h.offset,
                            length: h.length,
                        },
                    }),
                    VolumeState::Protecting => {
                        plan.journal = true;
                        plan.rows.push(PlannedRow {
                            volume_id: v.id,
                            chunk: h.offset / CHUNK_BYTES,
                            idx: i as u32,
                            chunk_offset: (h.offset % CHUNK_BYTES) as u32,
                            length: h.length,
                            kind: h.kind,
                            payload_pos: r.payload_pos,
                        });
                    }
                }
            }
        }
    }
    Ok(plan)
}

/// A fully checked batch on its way to its group's task.
pub struct Received {
    pub bytes: Vec<u8>,
    pub header: BatchHeader,
    pub received_ns: i64,
    pub agent: Fingerprint,
    pub reply: Reply,
}

enum GroupMsg {
    Batch(Box<Received>),
    /// Re-read the group and its volumes from the catalog (after a hello changed them).
    Reload(oneshot::Sender<Result<()>>),
    /// A connection of the group's agent: it hears `Paused`/`Resumed` (at once if paused).
    Attach(Reply),
}

struct Pending {
    received: Received,
}

/// Disk state of a group: its journal and the target files of volumes being synced.
struct GroupIo {
    data_dir: DataDir,
    journal: Journal,
    targets: HashMap<u32, TargetFile>,
    decompressor: zstd::bulk::Decompressor<'static>,
    scratch: Vec<u8>,
    /// A failed commit's journal bytes still to be undone (the undo itself failed on a full
    /// disk): the journal goes back here before anything else is written.
    rollback_due: Option<JournalPos>,
}

impl GroupIo {
    /// Steps 4–5 of a group commit for `batches` (in seq order): apply target ops, append
    /// journaled batches, then fsync the journal and the target files. Returns each batch's
    /// place in the journal. Runs on a blocking thread.
    fn write(
        &mut self,
        batches: &[(&[u8], &BatchPlan)],
        volumes: &HashMap<u32, VolumeEntry>,
    ) -> Result<Vec<Option<SegmentSpan>>> {
        self.rollback()?;
        debug_assert_eq!(self.journal.written(), self.journal.durable());
        let mut spans = Vec::with_capacity(batches.len());
        for (bytes, plan) in batches {
            if !plan.target_ops.is_empty() {
                let header_len = batch::decode_header(bytes)
                    .map_err(|e| {
                        ReplicaError::Ingest(format!("a checked batch no longer decodes: {e}"))
                    })?
                    .header_len as usize;
                let payload = &bytes[header_len..];
                for op in &plan.target_ops {
                    let agent_id = match op {
                        TargetOp::Write { volume, .. } | TargetOp::Zero { volume, .. } => *volume,
                    };
                    let target = match self.targets.entry(agent_id) {
                        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::hash_map::Entry::Vacant(e) => {
                            let v = volumes.get(&agent_id).ok_or_else(|| {
                                ReplicaError::Ingest(format!("volume id {agent_id} vanished"))
                            })?;
                            e.insert(TargetFile::open(&self.data_dir.target(&v.name), v.size)?)
                        }
                    };
                    match *op {
                        TargetOp::Write { payload_pos, .. } => {
                            let h = RecordHeader::decode(&payload[payload_pos..], 0)
                                .map_err(|e| ReplicaError::Ingest(e.to_string()))?;
                            let start = payload_pos + batch::RECORD_HEADER_BYTES;
                            let stored = &payload[start..start + h.stored_len as usize];
                            h.decode_data(stored, &mut self.decompressor, &mut self.scratch)
                                .map_err(|e| ReplicaError::Ingest(e.to_string()))?;
                            target.write_at(h.offset, &self.scratch)?;
                        }
                        TargetOp::Zero { offset, length, .. } => {
                            target.zero(offset, u64::from(length))?
                        }
                    }
                }
            }
            spans.push(if plan.journal {
                Some(self.journal.append(bytes)?)
            } else {
                None
            });
        }
        self.journal.sync()?;
        for t in self.targets.values_mut() {
            t.sync()?;
        }
        Ok(spans)
    }

    /// Undoes the journal bytes of a failed commit, if any are still due. Target writes are
    /// not undone: they are re-applied, identically, when the same batches are committed.
    fn rollback(&mut self) -> Result<()> {
        if let Some(to) = self.rollback_due {
            self.journal.rollback_to(to)?;
            self.rollback_due = None;
        }
        Ok(())
    }
}

/// One consistency group's ingest state: the journal in seq order (see the crate docs).
pub struct GroupIngest {
    catalog: Catalog,
    group_id: i64,
    name: String,
    /// Last durable seq (journal fsynced, rows committed).
    head: u64,
    head_hash: Option<Hash>,
    volumes: HashMap<u32, VolumeEntry>,
    pending: BTreeMap<u64, Pending>,
    pending_bytes: usize,
    io: Option<GroupIo>,
    board: Arc<PauseBoard>,
    /// Control streams of the agent's connections (closed ones are dropped as found).
    attached: Vec<Reply>,
    /// Set while a full disk keeps the group from committing.
    paused: Option<Paused>,
    /// Shared with the group's trimmer: the journal's bytes and cap.
    link: Arc<TrimLink>,
    /// The group is failed over (see `failover`): its batches are dropped, never committed.
    /// Said once; cleared by a reload that finds no failover row.
    fenced: bool,
}

/// A group whose commits fail on a full disk.
struct Paused {
    reason: String,
    since_ns: i64,
    since: Instant,
    /// When the pending batches are tried again.
    retry_at: Instant,
    /// Commit attempts that failed.
    attempts: u64,
    /// The pause was recorded in the events table (it may be full too: then it is recorded at
    /// the resume).
    event_recorded: bool,
}

/// A message for a connection: (where, what).
type Outbox = Vec<(Reply, Control)>;

/// Records an event. A full disk costs only the event (it is logged at debug level instead;
/// returns false), never the group; any other error is returned.
async fn record_event(
    catalog: &Catalog,
    level: EventLevel,
    group: Option<&str>,
    volume: Option<&str>,
    msg: &str,
    at_ns: i64,
) -> Result<bool> {
    match catalog.event(level, group, volume, msg, at_ns).await {
        Ok(()) => Ok(true),
        Err(e) if e.is_disk_full() => {
            tracing::debug!(group, "could not record an event ({e}): {msg}");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

fn nack(out: &mut Outbox, r: &Received, reason: String) {
    tracing::warn!(group = %r.header.group, seq = r.header.seq.0, agent = %r.agent, "refused a batch: {reason}");
    out.push((
        r.reply.clone(),
        Control::Nack {
            group: r.header.group.clone(),
            seq: r.header.seq.0,
            reason,
        },
    ));
}

impl GroupIngest {
    /// Loads a group and recovers its journal (truncating what no committed row describes).
    pub async fn open(
        catalog: &Catalog,
        data_dir: &DataDir,
        group_id: i64,
        board: Arc<PauseBoard>,
        options: &IngestOptions,
    ) -> Result<GroupIngest> {
        let g = catalog.group_by_id(group_id).await?;
        let committed = catalog.last_journaled(group_id).await?;
        let jdir = data_dir.journal(&g.name);
        let (mut journal, report) =
            tokio::task::spawn_blocking(move || Journal::recover(&jdir, committed)).await??;
        journal.set_segment_bytes_target(options.segment_bytes_target);
        let link = TrimLink::new(
            catalog.journal_bytes(group_id).await?,
            g.retention.journal_bytes_max,
        );
        if let Some((segment, bytes)) = report.truncated {
            let msg = format!(
                "truncated {bytes} uncommitted bytes from the tail of journal segment {segment}"
            );
            tracing::warn!(group = %g.name, "{msg}");
            record_event(
                catalog,
                EventLevel::Warn,
                Some(&g.name),
                None,
                &msg,
                now_ns(),
            )
            .await?;
        }
        if !report.deleted.is_empty() {
            let msg = format!("deleted uncommitted journal segments {:?}", report.deleted);
            tracing::warn!(group = %g.name, "{msg}");
            record_event(
                catalog,
                EventLevel::Warn,
                Some(&g.name),
                None,
                &msg,
                now_ns(),
            )
            .await?;
        }
        let decompressor = zstd::bulk::Decompressor::new()
            .map_err(|e| ReplicaError::Ingest(format!("zstd decompressor: {e}")))?;
        let mut gi = GroupIngest {
            catalog: catalog.clone(),
            group_id,
            name: g.name.clone(),
            head: g.head_seq,
            head_hash: g.head_hash,
            volumes: HashMap::new(),
            pending: BTreeMap::new(),
            pending_bytes: 0,
            io: Some(GroupIo {
                data_dir: data_dir.clone(),
                journal,
                targets: HashMap::new(),
                decompressor,
                scratch: Vec::new(),
                rollback_due: None,
            }),
            board,
            attached: Vec::new(),
            paused: None,
            link,
            fenced: false,
        };
        gi.reload().await?;
        Ok(gi)
    }

    /// What the group's ingest shares with its trimmer.
    pub fn trim_link(&self) -> Arc<TrimLink> {
        self.link.clone()
    }

    /// The next batch is ready but waits for the trimmer (the journal is over its cap).
    fn waits_for_trimmer(&self) -> bool {
        self.pending.contains_key(&(self.head + 1)) && self.link.must_wait()
    }

    pub fn head(&self) -> u64 {
        self.head
    }

    /// Why the group's ingest is paused, if it is.
    pub fn paused(&self) -> Option<&str> {
        self.paused.as_ref().map(|p| p.reason.as_str())
    }

    /// When a paused group tries its commit again.
    fn retry_at(&self) -> Option<Instant> {
        self.paused.as_ref().map(|p| p.retry_at)
    }

    /// Subscribes a connection to the group's `Paused`/`Resumed` news; it hears `Paused` at
    /// once when the group is paused.
    fn attach(&mut self, reply: Reply, out: &mut Outbox) {
        self.attached.retain(|r| !r.is_closed());
        if let Some(p) = &self.paused {
            out.push((
                reply.clone(),
                Control::Paused {
                    group: self.name.clone(),
                    reason: p.reason.clone(),
                },
            ));
        }
        self.attached.push(reply);
    }

    /// Records an event of the group; see [`record_event`].
    async fn event(
        &self,
        level: EventLevel,
        volume: Option<&str>,
        msg: &str,
        at_ns: i64,
    ) -> Result<bool> {
        record_event(&self.catalog, level, Some(&self.name), volume, msg, at_ns).await
    }

    /// Re-reads the group's head and volumes from the catalog.
    pub async fn reload(&mut self) -> Result<()> {
        let g = self.catalog.group_by_id(self.group_id).await?;
        self.head = g.head_seq;
        self.head_hash = g.head_hash;
        self.volumes = self
            .catalog
            .volumes_of_group(self.group_id)
            .await?
            .iter()
            .map(|v| (v.agent_volume_id, VolumeEntry::from(v)))
            .collect();
        self.fenced = self.catalog.failover(self.group_id).await?.is_some();
        // Batches still waiting may have come over an earlier connection, and even belong to
        // a chain the agent has since given up (it rebased): they stay, since that
        // connection may still be there; a newer batch with the same seq replaces one
        // (`handle_batch`), and one that does not follow the journal is refused at its commit.
        let stale: Vec<u64> = self.pending.range(..=self.head).map(|(s, _)| *s).collect();
        for s in stale {
            if let Some(p) = self.pending.remove(&s) {
                self.pending_bytes -= p.received.bytes.len();
            }
        }
        Ok(())
    }

    /// Takes in one checked batch: a duplicate is re-acked (or refused when it conflicts), a
    /// batch from the future waits for its gap (bounded). Commits happen in
    /// [`GroupIngest::commit_ready`].
    pub async fn handle_batch(&mut self, r: Received) -> Result<Outbox> {
        let mut out = Outbox::new();
        let seq = r.header.seq.0;
        if seq <= self.head {
            match self.catalog.batch_hash(self.group_id, seq).await? {
                Some(h) if h != r.header.header_hash => {
                    tracing::error!(group = %self.name, seq, agent = %r.agent, "a resent batch differs from the journaled batch with the same seq");
                    self.event(
                        EventLevel::Error,
                        None,
                        &format!("batch {seq} was resent with different contents"),
                        now_ns(),
                    )
                    .await?;
                    nack(
                        &mut out,
                        &r,
                        format!(
                            "batch {seq} conflicts with the journal (a different batch {seq} is already durable)"
                        ),
                    );
                }
                _ => out.push((
                    r.reply.clone(),
                    Control::ack(&self.name, cdp_shared::Seq(self.head)),
                )),
            }
            return Ok(out);
        }
        if let Some(p) = self.pending.get_mut(&seq) {
            if p.received.header.header_hash == r.header.header_hash {
                p.received.reply = r.reply;
            } else {
                // Nothing waiting is acknowledged, and a group's batches come from its one
                // agent: a different batch with the same seq is the agent's newer chain (after
                // a rebase), so it replaces the older one.
                tracing::debug!(group = %self.name, seq, "a newer batch {seq} replaces the one waiting");
                self.pending_bytes = self.pending_bytes - p.received.bytes.len() + r.bytes.len();
                p.received = r;
            }
            return Ok(out);
        }
        if seq > self.head + PENDING_BATCHES_MAX as u64
            || self.pending.len() >= PENDING_BATCHES_MAX
            || self.pending_bytes + r.bytes.len() > PENDING_BYTES_MAX
        {
            let reason = match &self.paused {
                Some(p) => format!(
                    "batch {seq} cannot wait: ingest of group {} is paused ({}) and {} batches already wait; send it again after Resumed",
                    self.name,
                    p.reason,
                    self.pending.len()
                ),
                None => format!(
                    "batch {seq} is too far ahead of the journal (durable up to {}); send the missing batches first",
                    self.head
                ),
            };
            nack(&mut out, &r, reason);
            return Ok(out);
        }
        self.pending_bytes += r.bytes.len();
        self.pending.insert(seq, Pending { received: r });
        Ok(out)
    }

    /// Runs group commits while the next batch in seq order is waiting. A paused group tries
    /// only when its retry is due. An `Err` means the group cannot go on (a write, fsync or
    /// commit failed other than on a full disk): the caller stops ingest rather than
    /// acknowledge anything it cannot vouch for.
    pub async fn commit_ready(&mut self) -> Result<Outbox> {
        let mut out = Outbox::new();
        if self
            .paused
            .as_ref()
            .is_some_and(|p| Instant::now() < p.retry_at)
        {
            return Ok(out);
        }
        while self.pending.contains_key(&(self.head + 1)) {
            // Over the journal's cap: the trimmer brings it under first (see `trimmer`).
            if self.link.must_wait() {
                break;
            }
            if !self.commit_once(&mut out).await? {
                break;
            }
        }
        Ok(out)
    }

    /// One group commit. Returns false when it failed on a full disk (undone, and the group
    /// paused).
    async fn commit_once(&mut self, out: &mut Outbox) -> Result<bool> {
        // Choose and plan the in-order batches of this commit.
        let mut sim = self.volumes.clone();
        let mut expected_prev = self.head_hash;
        let mut chosen: Vec<(Pending, BatchPlan)> = Vec::new();
        let mut bytes = 0usize;
        let mut next = self.head + 1;
        while let Some(p) = self.pending.get(&next) {
            if !chosen.is_empty() && bytes + p.received.bytes.len() > GROUP_COMMIT_BYTES_MAX {
                break;
            }
            let Some(p) = self.pending.remove(&next) else {
                break;
            };
            self.pending_bytes -= p.received.bytes.len();
            let r = &p.received;
            if let Some(prev) = expected_prev
                && r.header.prev_hash != prev
            {
                nack(
                    out,
                    r,
                    format!(
                        "batch {next} does not follow batch {} in the journal (its prev_hash differs)",
                        next - 1
                    ),
                );
                break;
            }
            let view = match batch::decode(&r.bytes) {
                Ok(v) => v,
                Err(e) => {
                    nack(out, r, e.to_string());
                    break;
                }
            };
            let plan = match plan_batch(&view, &self.name, &sim) {
                Ok(plan) => plan,
                Err(reason) => {
                    nack(out, r, reason);
                    break;
                }
            };
            for (agent_id, state, _) in &plan.state_changes {
                if let Some(v) = sim.get_mut(agent_id) {
                    v.state = *state;
                }
            }
            expected_prev = Some(r.header.header_hash);
            bytes += r.received_len();
            next += 1;
            chosen.push((p, plan));
        }
        if chosen.is_empty() {
            return Ok(true);
        }
        // The fence: a failed-over group commits nothing (checked again inside the
        // transaction, for a failover that starts while this commit writes).
        if let Some(f) = self.catalog.failover(self.group_id).await? {
            drop(chosen);
            self.fence(f.seq);
            return Ok(false);
        }

        // Steps 4-5: target writes, journal append, fsyncs (on a blocking thread).
        let mut io = self.io.take().ok_or_else(|| {
            ReplicaError::Ingest(format!(
                "group {} lost its journal after an earlier failure",
                self.name
            ))
        })?;
        // Where the journal goes back to if this commit fails on a full disk (a rollback
        // still due from an earlier failure goes back to the same place).
        let undo_to = io.rollback_due.unwrap_or_else(|| io.journal.durable());
        let volumes = self.volumes.clone();
        let (io, written, chosen) = tokio::task::spawn_blocking(move || {
            let refs: Vec<(&[u8], &BatchPlan)> = chosen
                .iter()
                .map(|(p, plan)| (p.received.bytes.as_slice(), plan))
                .collect();
            let written = io.write(&refs, &volumes);
            (io, written, chosen)
        })
        .await?;
        self.io = Some(io);

        // Step 6: one transaction.
        let committed = match written {
            Ok(spans) => {
                let rows = self.commit_rows(&chosen, &spans);
                match self.catalog.commit(&rows).await {
                    Ok(()) => Ok(rows),
                    // A COMMIT that failed may still have taken effect: the head says.
                    Err(e) if e.is_disk_full() => {
                        if self.catalog.head(self.group_id).await? == rows.head_seq {
                            Ok(rows)
                        } else {
                            Err(e)
                        }
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        let rows = match committed {
            Ok(rows) => rows,
            Err(ReplicaError::Fenced(why)) => {
                self.undo(undo_to, chosen).await?;
                tracing::debug!(group = %self.name, "a commit met the fence: {why}");
                self.fence(0);
                return Ok(false);
            }
            Err(e) if e.is_disk_full() => {
                self.undo(undo_to, chosen).await?;
                self.pause(&e, out).await?;
                return Ok(false);
            }
            Err(e) => return Err(e),
        };

        // Durable: advance, then step 7, the acks.
        self.head = rows.head_seq;
        self.head_hash = rows.head_hash;
        self.link.committed(
            rows.batches
                .iter()
                .filter_map(|b| b.span.map(|s| s.length))
                .sum(),
        );
        if self.paused.is_some() {
            self.resume(out).await?;
        }
        for (p, plan) in &chosen {
            for (agent_id, state, _) in &plan.state_changes {
                let Some(v) = self.volumes.get_mut(agent_id) else {
                    continue;
                };
                v.state = *state;
                let msg = match state {
                    VolumeState::Syncing => format!(
                        "volume {} began its initial sync at seq {}",
                        v.name, p.received.header.seq
                    ),
                    VolumeState::Protecting => format!(
                        "volume {} completed its initial sync at seq {}; its window starts there",
                        v.name, p.received.header.seq
                    ),
                    VolumeState::New => continue,
                };
                let volume = v.name.clone();
                tracing::info!(group = %self.name, "{msg}");
                self.event(EventLevel::Info, Some(&volume), &msg, now_ns())
                    .await?;
            }
        }
        let mut replies: Vec<Reply> = Vec::new();
        for (p, _) in &chosen {
            if !replies.iter().any(|r| r.same_channel(&p.received.reply)) {
                replies.push(p.received.reply.clone());
            }
        }
        for r in replies {
            out.push((r, Control::ack(&self.name, cdp_shared::Seq(self.head))));
        }
        Ok(true)
    }

    /// The rows of one group commit (step 6).
    fn commit_rows(
        &self,
        chosen: &[(Pending, BatchPlan)],
        spans: &[Option<SegmentSpan>],
    ) -> CommitRows {
        let durable_ns = now_ns();
        let mut rows = CommitRows {
            group_id: self.group_id,
            ..CommitRows::default()
        };
        for ((p, plan), span) in chosen.iter().zip(spans) {
            let h = &p.received.header;
            rows.batches.push(BatchRow {
                seq: h.seq.0,
                agent_ns: h.agent_time_ns,
                received_ns: p.received.received_ns,
                durable_ns,
                flags: h.flags.0,
                bookmark: h.bookmark.clone(),
                span: *span,
                record_count: h.record_count,
                header_hash: h.header_hash,
            });
            if let Some(span) = span {
                for pr in &plan.rows {
                    rows.records.push(NewRecord {
                        volume_id: pr.volume_id,
                        row: RecordRow {
                            chunk: pr.chunk,
                            seq: h.seq.0,
                            idx: pr.idx,
                            chunk_offset: pr.chunk_offset,
                            length: pr.length,
                            kind: pr.kind as u8,
                            segment: span.segment,
                            position: span.position
                                + u64::from(h.header_len)
                                + pr.payload_pos as u64,
                        },
                    });
                }
            }
            if let Some(b) = &h.bookmark {
                rows.bookmarks.push((b.clone(), h.seq.0));
            }
            for (agent_id, state, sync_done) in &plan.state_changes {
                if let Some(v) = self.volumes.get(agent_id) {
                    rows.volume_changes.push((v.id, *state, *sync_done));
                }
            }
        }
        if let Some((last, _)) = chosen.last() {
            rows.head_seq = last.received.header.seq.0;
            rows.head_hash = Some(last.received.header.header_hash);
        }
        rows
    }

    /// Undoes a commit that failed on a full disk: the journal goes back to `to` (now, or
    /// before the next commit writes anything if the undo itself fails on the full disk), and
    /// the batches wait again in `pending`, exactly as before the commit took them.
    async fn undo(&mut self, to: JournalPos, chosen: Vec<(Pending, BatchPlan)>) -> Result<()> {
        for (p, _) in chosen {
            self.pending_bytes += p.received.bytes.len();
            self.pending.insert(p.received.header.seq.0, p);
        }
        let mut io = self
            .io
            .take()
            .ok_or_else(|| ReplicaError::Ingest(format!("group {} lost its journal", self.name)))?;
        io.rollback_due = Some(to);
        let (io, undone) = tokio::task::spawn_blocking(move || {
            let undone = io.rollback();
            (io, undone)
        })
        .await?;
        self.io = Some(io);
        match undone {
            Ok(()) => Ok(()),
            Err(e) if e.is_disk_full() => {
                tracing::debug!(group = %self.name, "the undo of a failed commit waits for space: {e}");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The group is failed over: every batch waiting is dropped unacknowledged (the agent
    /// keeps it in its spool, and the server closes its connection within
    /// `server::FENCE_CHECK_INTERVAL`). One warning line the first time.
    fn fence(&mut self, seq: u64) {
        if !self.fenced {
            tracing::warn!(
                group = %self.name,
                "the group is failed over on this replica{}: its batches are no longer committed",
                if seq > 0 { format!(" at seq {seq}") } else { String::new() }
            );
            self.fenced = true;
        }
        self.pending.clear();
        self.pending_bytes = 0;
    }

    /// Marks the group paused after a commit failed on a full disk (`e`), or schedules the
    /// next retry when it already is. The first time: one warning line, an event, the pause
    /// board, and `Paused` to every attached connection.
    async fn pause(&mut self, e: &ReplicaError, out: &mut Outbox) -> Result<()> {
        let now = Instant::now();
        if let Some(p) = &mut self.paused {
            p.retry_at = now + PAUSE_RETRY_INTERVAL;
            p.attempts += 1;
            tracing::debug!(group = %self.name, attempts = p.attempts, "commit retry failed: {e}");
            return Ok(());
        }
        let reason = self.disk_full_reason(e);
        let since_ns = now_ns();
        tracing::warn!(group = %self.name, "ingest paused: {reason}");
        self.board.set(
            &self.name,
            Some(Pause {
                reason: reason.clone(),
                since_ns,
            }),
        );
        self.attached.retain(|r| !r.is_closed());
        for r in &self.attached {
            out.push((
                r.clone(),
                Control::Paused {
                    group: self.name.clone(),
                    reason: reason.clone(),
                },
            ));
        }
        let event_recorded = self
            .event(
                EventLevel::Warn,
                None,
                &format!("ingest paused: {reason}"),
                since_ns,
            )
            .await?;
        self.paused = Some(Paused {
            reason,
            since_ns,
            since: now,
            retry_at: now + PAUSE_RETRY_INTERVAL,
            attempts: 1,
            event_recorded,
        });
        Ok(())
    }

    /// A commit succeeded while paused: `Resumed` to every attached connection, the board
    /// cleared, a log line and an event (and the pause's own event if the full catalog could
    /// not take it then).
    async fn resume(&mut self, out: &mut Outbox) -> Result<()> {
        let Some(p) = self.paused.take() else {
            return Ok(());
        };
        self.board.set(&self.name, None);
        self.attached.retain(|r| !r.is_closed());
        for r in &self.attached {
            out.push((
                r.clone(),
                Control::Resumed {
                    group: self.name.clone(),
                },
            ));
        }
        let msg = format!(
            "ingest resumed after {:.1} s paused ({} commit attempts failed); batches are acknowledged again",
            p.since.elapsed().as_secs_f64(),
            p.attempts
        );
        tracing::info!(group = %self.name, "{msg}");
        if !p.event_recorded {
            self.event(
                EventLevel::Warn,
                None,
                &format!("ingest paused: {}", p.reason),
                p.since_ns,
            )
            .await?;
        }
        self.event(EventLevel::Info, None, &msg, now_ns()).await?;
        Ok(())
    }

    /// The operator's sentence for a full disk: which disk, the error, and what happens.
    fn disk_full_reason(&self, e: &ReplicaError) -> String {
        let which = match (e, &self.io) {
            (ReplicaError::Io { path, .. }, Some(io))
                if path.starts_with(io.data_dir.journals()) =>
            {
                "the journal's disk is full"
            }
            (ReplicaError::Io { path, .. }, Some(io))
                if path.starts_with(io.data_dir.volumes()) =>
            {
                "the target disks' filesystem is full"
            }
            (ReplicaError::Catalog { .. }, _) => "the catalog's disk is full",
            _ => "the replica's disk is full",
        };
        format!(
            "{which} ({e}); no batch of group {} is acknowledged until space is freed there, and ingest resumes by itself (it retries every {} s)",
            self.name,
            PAUSE_RETRY_INTERVAL.as_secs_f64()
        )
    }
}

impl Received {
    fn received_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Runs one group's ingest until `token` is cancelled or every sender is gone. While the
/// group is paused it wakes up every [`PAUSE_RETRY_INTERVAL`] to try its commit again, and
/// keeps taking batches in meanwhile (within the pending bounds). While its journal is over
/// its cap it waits for the trimmer before the next commit.
///
/// Cancellation-safe at its await points that race cancellation (the inbox `recv`, the retry
/// timer); commits (disk writes, fsyncs, the SQLite transaction) run to completion outside
/// any `select!`, so cancelling never leaves half a commit behind — and a commit cut short by
/// a crash is undone by journal recovery at the next start.
async fn run_group(
    mut g: GroupIngest,
    mut rx: mpsc::Receiver<GroupMsg>,
    token: CancellationToken,
) -> Result<()> {
    let link = g.trim_link();
    loop {
        let retry_at = g.retry_at();
        let trim_wait = g.waits_for_trimmer();
        let msg = tokio::select! {
            biased;
            _ = token.cancelled() => return Ok(()),
            m = rx.recv() => match m { Some(m) => Some(m), None => return Ok(()) },
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => None,
            _ = link.wait_for_trimmer(), if trim_wait => None,
        };
        let mut out = Outbox::new();
        if let Some(msg) = msg {
            handle_msg(&mut g, msg, &mut out).await?;
        }
        // Group commit: take whatever else is already waiting before writing.
        while let Ok(msg) = rx.try_recv() {
            handle_msg(&mut g, msg, &mut out).await?;
        }
        out.extend(g.commit_ready().await?);
        for (reply, msg) in out {
            tokio::select! {
                _ = token.cancelled() => return Ok(()),
                // A closed connection just drops its replies.
                _ = reply.send(msg) => {}
            }
        }
    }
}

async fn handle_msg(g: &mut GroupIngest, msg: GroupMsg, out: &mut Outbox) -> Result<()> {
    match msg {
        GroupMsg::Batch(r) => out.extend(g.handle_batch(*r).await?),
        GroupMsg::Reload(done) => {
            let result = g.reload().await;
            let failed = result.as_ref().err().map(|e| e.to_string());
            let _ = done.send(result);
            if let Some(e) = failed {
                return Err(ReplicaError::Ingest(e));
            }
        }
        GroupMsg::Attach(reply) => g.attach(reply, out),
    }
    Ok(())
}

struct GroupSlot {
    id: i64,
    tx: mpsc::Sender<GroupMsg>,
    /// Stops the group's ingest and trimmer tasks (a child of the service's token).
    token: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

struct ServiceInner {
    dir: DataDir,
    catalog: Catalog,
    /// Held across a whole hello, so hellos are serialized.
    groups: tokio::sync::Mutex<HashMap<String, GroupSlot>>,
    token: CancellationToken,
    tasks: TaskTracker,
    fatal: Mutex<Option<String>>,
    board: Arc<PauseBoard>,
    /// The retention of groups created from now on (`replica.toml`).
    retention_default: Retention,
    options: IngestOptions,
    /// Groups being forgotten (`forget`): a Hello naming one is refused.
    forgetting: Mutex<HashSet<String>>,
    /// How many times each group name was forgotten by this serve: a connection welcomed
    /// before a forget of one of its groups is closed.
    forget_epochs: Mutex<HashMap<String, u64>>,
}

impl ServiceInner {
    /// A task failed: one error line, the fatal error noted, everything stopped.
    fn stop(&self, what: &str, verb: &str, e: &ReplicaError) {
        tracing::error!("{what}: {verb}: {e}");
        if let Ok(mut fatal) = self.fatal.lock() {
            fatal.get_or_insert_with(|| format!("{what}: {e}"));
        }
        self.token.cancel();
    }
}

/// The ingest side of a running replica (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct IngestService {
    inner: Arc<ServiceInner>,
}

impl IngestService {
    /// Recovers every group's journal and starts its task. `token` stops everything; a fatal
    /// ingest error cancels it too (see [`IngestService::fatal_error`]).
    pub async fn start(
        dir: &DataDir,
        catalog: Catalog,
        token: CancellationToken,
    ) -> Result<IngestService> {
        IngestService::start_with(dir, catalog, token, IngestOptions::default()).await
    }

    /// [`IngestService::start`] with explicit options. Every group gets its ingest task and its
    /// trimmer task (`trimmer`).
    pub async fn start_with(
        dir: &DataDir,
        catalog: Catalog,
        token: CancellationToken,
        options: IngestOptions,
    ) -> Result<IngestService> {
        let retention_default = crate::datadir::load_config(dir)?.retention;
        // On a full disk this write fails: serve starts anyway (its groups pause at their
        // first commit, and resume when space returns).
        match catalog.reset_links(now_ns()).await {
            Err(e) if e.is_disk_full() => {
                tracing::warn!("could not mark the agent links down at start: {e}")
            }
            other => other?,
        }
        let service = IngestService {
            inner: Arc::new(ServiceInner {
                dir: dir.clone(),
                catalog: catalog.clone(),
                groups: tokio::sync::Mutex::new(HashMap::new()),
                token,
                tasks: TaskTracker::new(),
                fatal: Mutex::new(None),
                board: Arc::new(PauseBoard::open(dir)),
                retention_default,
                options,
                forgetting: Mutex::new(HashSet::new()),
                forget_epochs: Mutex::new(HashMap::new()),
            }),
        };
        let mut groups = service.inner.groups.lock().await;
        for g in catalog.groups().await? {
            let slot = service.spawn_group(g.id).await?;
            groups.insert(g.name.clone(), slot);
        }
        drop(groups);
        Ok(service)
    }

    pub fn catalog(&self) -> &Catalog {
        &self.inner.catalog
    }

    async fn spawn_group(&self, group_id: i64) -> Result<GroupSlot> {
        let g = GroupIngest::open(
            &self.inner.catalog,
            &self.inner.dir,
            group_id,
            self.inner.board.clone(),
            &self.inner.options,
        )
        .await?;
        let name = g.name.clone();
        let group = self.inner.catalog.group_by_id(group_id).await?;
        let trimmer = Trimmer::new(&self.inner.catalog, &self.inner.dir, &group, g.trim_link());
        let (tx, rx) = mpsc::channel(INGEST_QUEUE_BATCHES);
        let token = self.inner.token.child_token();
        let inner = self.inner.clone();
        let group_token = token.clone();
        let ingest = self.inner.tasks.spawn(async move {
            if let Err(e) = run_group(g, rx, group_token).await {
                inner.stop(&format!("group {name}"), "ingest stopped", &e);
            }
        });
        let inner = self.inner.clone();
        let name = group.name.clone();
        let group_token = token.clone();
        let trim = self.inner.tasks.spawn(async move {
            if let Err(e) = trimmer::run(trimmer, group_token).await {
                inner.stop(&format!("group {name}"), "trimming stopped", &e);
            }
        });
        Ok(GroupSlot {
            id: group_id,
            tx,
            token,
            tasks: vec![ingest, trim],
        })
    }

    /// Before a forget of group `name` (see `forget`): under the hello lock, `check` (the
    /// agent is not connected: `Err` is the refusal), then the group is marked as being
    /// forgotten (Hellos naming it are refused, connections welcomed for it are told to close
    /// through [`IngestService::forget_epoch`]) and its ingest and trimmer tasks are stopped
    /// (a commit or trim round in progress completes first). `Ok(Err)`: refused, nothing
    /// changed.
    pub async fn begin_forget(
        &self,
        name: &str,
        check: impl FnOnce() -> std::result::Result<(), String>,
    ) -> Result<std::result::Result<(), String>> {
        let mut groups = self.inner.groups.lock().await;
        if let Err(why) = check() {
            return Ok(Err(why));
        }
        if let Ok(mut f) = self.inner.forgetting.lock() {
            f.insert(name.to_owned());
        }
        if let Ok(mut e) = self.inner.forget_epochs.lock() {
            *e.entry(name.to_owned()).or_insert(0) += 1;
        }
        let slot = groups.remove(name);
        drop(groups);
        if let Some(slot) = slot {
            slot.token.cancel();
            for t in slot.tasks {
                let _ = t.await;
            }
        }
        self.inner.board.set(name, None);
        Ok(Ok(()))
    }

    /// After a forget of group `name`: its tasks start again if the group is still in the
    /// catalog (only a volume of it was forgotten, or the forget was refused), and Hellos
    /// naming it are admitted again. `done` false (the forget stopped with files left to
    /// delete): the group stays marked, refused until a forget completes.
    pub async fn end_forget(&self, name: &str, done: bool) -> Result<()> {
        if !done {
            return Ok(());
        }
        let mut groups = self.inner.groups.lock().await;
        let result = match self.inner.catalog.group_by_name(name).await {
            Ok(Some(g)) if !groups.contains_key(name) => match self.spawn_group(g.id).await {
                Ok(slot) => {
                    groups.insert(name.to_owned(), slot);
                    Ok(())
                }
                Err(e) => Err(e),
            },
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        if let Ok(mut f) = self.inner.forgetting.lock() {
            f.remove(name);
        }
        result
    }

    /// How many times group `name` was forgotten by this serve (see
    /// [`IngestService::begin_forget`]).
    pub fn forget_epoch(&self, name: &str) -> u64 {
        self.inner
            .forget_epochs
            .lock()
            .ok()
            .and_then(|e| e.get(name).copied())
            .unwrap_or(0)
    }

    /// The error that stopped ingest, if one did.
    pub fn fatal_error(&self) -> Option<String> {
        self.inner.fatal.lock().ok().and_then(|f| f.clone())
    }

    /// Admits an agent's groups (the reply to its Hello). The outer error is the replica's own
    /// failure; the inner one a refusal sentence for the agent.
    pub async fn hello(
        &self,
        agent: &Fingerprint,
        protocol: u32,
        hello: &[GroupHello],
    ) -> Result<std::result::Result<Vec<GroupWelcome>, String>> {
        if protocol != PROTOCOL_VERSION {
            return Ok(Err(format!(
                "this replica speaks control protocol version {PROTOCOL_VERSION}, not {protocol}; upgrade the older side"
            )));
        }
        let catalog = &self.inner.catalog;
        let owner = agent.to_string();
        let mut groups = self.inner.groups.lock().await;
        // Pass 1: check everything before changing anything.
        let mut seen = HashSet::new();
        for gh in hello {
            if let Err(e) = check_name("group", &gh.name) {
                return Ok(Err(e));
            }
            if !seen.insert(gh.name.as_str()) {
                return Ok(Err(format!("group {} is announced twice", gh.name)));
            }
            if self
                .inner
                .forgetting
                .lock()
                .is_ok_and(|f| f.contains(&gh.name))
            {
                return Ok(Err(format!(
                    "group {} is being forgotten on this replica (cdp-replica forget); once that is done it is new to the replica: connect again",
                    gh.name
                )));
            }
            let mut ids = HashSet::new();
            let mut names = HashSet::new();
            for v in &gh.volumes {
                if let Err(e) = check_name("volume", &v.name) {
                    return Ok(Err(e));
                }
                if !ids.insert(v.id) || !names.insert(v.name.as_str()) {
                    return Ok(Err(format!(
                        "group {} announces volume id {} or name {} twice",
                        gh.name, v.id, v.name
                    )));
                }
                if v.size == 0 {
                    return Ok(Err(format!(
                        "volume {} of group {} has size 0",
                        v.name, gh.name
                    )));
                }
            }
            let existing = catalog.group_by_name(&gh.name).await?;
            let group_id = existing.as_ref().map(|g| g.id);
            if let Some(g) = &existing {
                if g.owner != owner {
                    return Ok(Err(format!(
                        "group {} belongs to another agent ({}) on this replica; rename the group or remove it from the replica",
                        gh.name, g.owner
                    )));
                }
                let known = catalog.volumes_of_group(g.id).await?;
                if let Some(f) = catalog.failover(g.id).await? {
                    let volume = known
                        .iter()
                        .find(|k| k.id == f.volume_id)
                        .map_or("?", |k| k.name.as_str());
                    return Ok(Err(crate::failover::fence_reason(&gh.name, volume, &f)));
                }
                for v in &gh.volumes {
                    if let Some(k) = known.iter().find(|k| k.agent_volume_id == v.id)
                        && (k.name != v.name || k.size != v.size)
                    {
                        return Ok(Err(format!(
                            "volume id {} of group {} is {} of {} bytes on this replica, not {} of {} bytes; a volume cannot be renamed or resized while protected",
                            v.id, gh.name, k.name, k.size, v.name, v.size
                        )));
                    }
                }
            }
            for v in &gh.volumes {
                if let Some(k) = catalog.volume_by_name(&v.name).await?
                    && (Some(k.group_id) != group_id || k.agent_volume_id != v.id)
                {
                    return Ok(Err(format!(
                        "volume name {} is already used by another volume on this replica; choose another name",
                        v.name
                    )));
                }
            }
        }
        // Pass 2: create what is new.
        let mut welcomes = Vec::new();
        for gh in hello {
            let now = now_ns();
            // A group created again after a forget starts at seq 0: its agent knows the old
            // group's generation, continues on a fresh chain and syncs every volume again.
            let start = if catalog.forgotten("group", &gh.name).await?.is_some() {
                0
            } else {
                gh.first_held.saturating_sub(1)
            };
            let g = match catalog.group_by_name(&gh.name).await? {
                Some(g) => {
                    if !catalog.group_has_batches(g.id).await? && g.head_seq != start {
                        catalog.rebase_empty_group(g.id, start).await?;
                    }
                    g
                }
                None => {
                    let generation: [u8; 16] = rand::random();
                    let generation: String =
                        generation.iter().map(|b| format!("{b:02x}")).collect();
                    let retention = self.inner.retention_default;
                    let g = catalog
                        .create_group(&gh.name, &owner, &generation, start, &retention, now)
                        .await?;
                    let msg = format!(
                        "group {} created for agent {owner} (retention: {retention})",
                        gh.name
                    );
                    tracing::info!("{msg}");
                    catalog
                        .event(EventLevel::Info, Some(&gh.name), None, &msg, now)
                        .await?;
                    g
                }
            };
            if gh.first_held > g.head_seq + 1 && catalog.group_has_batches(g.id).await? {
                // The agent's spool no longer holds what follows the head (it overflowed, or
                // was lost): the agent continues its chain after the head and resyncs.
                tracing::info!(
                    group = %gh.name,
                    "the agent holds batches from {} on but this replica is durable up to {}: the agent continues after {} and resyncs",
                    gh.first_held,
                    g.head_seq,
                    g.head_seq
                );
            }
            let known = catalog.volumes_of_group(g.id).await?;
            for v in &gh.volumes {
                if known.iter().any(|k| k.agent_volume_id == v.id) {
                    continue;
                }
                let path = self.inner.dir.target(&v.name);
                let size = v.size;
                tokio::task::spawn_blocking(move || TargetFile::create(&path, size)).await??;
                catalog.insert_volume(g.id, v.id, &v.name, v.size).await?;
                let msg = format!(
                    "volume {} ({} bytes) added to group {}; waiting for its initial sync",
                    v.name, v.size, gh.name
                );
                tracing::info!("{msg}");
                catalog
                    .event(
                        EventLevel::Info,
                        Some(&gh.name),
                        Some(&v.name),
                        &msg,
                        now_ns(),
                    )
                    .await?;
            }
            let slot = match groups.get(&gh.name) {
                Some(slot) => slot,
                None => {
                    let slot = self.spawn_group(g.id).await?;
                    groups.entry(gh.name.clone()).or_insert(slot)
                }
            };
            let (done_tx, done_rx) = oneshot::channel();
            if slot.tx.send(GroupMsg::Reload(done_tx)).await.is_err() {
                return Err(ReplicaError::Ingest(
                    self.fatal_error()
                        .unwrap_or_else(|| format!("group {} is shutting down", gh.name)),
                ));
            }
            done_rx
                .await
                .map_err(|_| ReplicaError::Ingest(format!("group {} stopped", gh.name)))??;
            let g = catalog.group_by_id(g.id).await?;
            let volumes = catalog
                .volumes_of_group(g.id)
                .await?
                .iter()
                .map(|v| VolumeWelcome {
                    id: v.agent_volume_id,
                    state: v.state.as_str().to_owned(),
                })
                .collect();
            let head_hash = match g.head_hash {
                Some(h) if g.head_seq > 0 => blake3::Hash::from_bytes(h).to_hex().to_string(),
                _ => String::new(),
            };
            welcomes.push(GroupWelcome {
                name: g.name,
                durable: g.head_seq,
                generation: g.generation,
                head_hash,
                volumes,
            });
        }
        Ok(Ok(welcomes))
    }

    /// Subscribes a connection (its control stream's outbox) to the `Paused`/`Resumed` news
    /// of `group`, after its Welcome; it hears `Paused` at once when the group is paused.
    pub async fn attach(&self, group: &str, reply: &Reply) {
        let tx = match self.inner.groups.lock().await.get(group) {
            Some(slot) => slot.tx.clone(),
            None => return,
        };
        let _ = tx.send(GroupMsg::Attach(reply.clone())).await;
    }

    /// The data directory served.
    pub fn data_dir(&self) -> &DataDir {
        &self.inner.dir
    }

    /// The catalog id of a group that has a running task.
    pub async fn group_id(&self, name: &str) -> Option<i64> {
        self.inner.groups.lock().await.get(name).map(|s| s.id)
    }

    /// Fully checks one batch (header, payload hash, structure, every record's data hash) and
    /// hands it to its group's task; a batch that fails is refused right here with a Nack on
    /// `reply` and one warning line. `announced` are the groups of the agent's hello.
    ///
    /// Cancellation-safe: it writes nothing to disk; dropping it drops the batch.
    pub async fn submit(
        &self,
        agent: &Fingerprint,
        announced: &HashSet<String>,
        bytes: Vec<u8>,
        reply: &Reply,
    ) {
        let received_ns = now_ns();
        let refuse = |group: &str, seq: u64, reason: String| {
            tracing::warn!(group, seq, agent = %agent, "refused a batch: {reason}");
            Control::Nack {
                group: group.to_owned(),
                seq,
                reason,
            }
        };
        let header = match batch::decode_header(&bytes) {
            Ok(h) => h,
            Err(e) => {
                let _ = reply
                    .send(refuse("", 0, format!("unreadable batch header: {e}")))
                    .await;
                return;
            }
        };
        if !announced.contains(&header.group) {
            let reason = format!(
                "group {} was not announced in this connection's hello",
                header.group
            );
            let _ = reply
                .send(refuse(&header.group, header.seq.0, reason))
                .await;
            return;
        }
        let checked = tokio::task::spawn_blocking(move || {
            let result = check_fully(&bytes);
            (bytes, result)
        })
        .await;
        let (bytes, result) = match checked {
            Ok(x) => x,
            Err(e) => {
                let _ = reply
                    .send(refuse(
                        &header.group,
                        header.seq.0,
                        format!("internal error while checking: {e}"),
                    ))
                    .await;
                return;
            }
        };
        if let Err(e) = result {
            let _ = reply.send(refuse(&header.group, header.seq.0, e)).await;
            return;
        }
        let tx = match self.inner.groups.lock().await.get(&header.group) {
            Some(slot) => slot.tx.clone(),
            None => return,
        };
        let group = header.group.clone();
        let seq = header.seq.0;
        let msg = GroupMsg::Batch(Box::new(Received {
            bytes,
            header,
            received_ns,
            agent: *agent,
            reply: reply.clone(),
        }));
        if tx.send(msg).await.is_err() {
            tracing::debug!(group, seq, "dropped a batch: its group is shutting down");
        }
    }

    /// Stops every group task and waits for them (commits in progress complete first).
    pub async fn shutdown(&self) {
        self.inner.token.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}

/// `batch::decode` + `check_record_data`, as a reason string.
/// The ingest check of a batch: header, header hash, exact length, payload hash (which covers
/// every byte of every record) and every record's structure. Record data hashes are checked
/// where record data is decoded (syncing volumes here, every journal read in
/// reconstruction); decoding every record here as well cost more CPU than all the rest of
/// ingest together (`make bench`, section 7).
fn check_fully(bytes: &[u8]) -> std::result::Result<(), String> {
    batch::decode(bytes).map(|_| ()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cdp_shared::Seq;
    use cdp_shared::batch::{BatchFlags, RecordEncoder, SealParams, encode_marker, seal};

    fn volumes(state: VolumeState) -> HashMap<u32, VolumeEntry> {
        [(
            1,
            VolumeEntry {
                id: 10,
                agent_id: 1,
                name: "v".into(),
                size: 4 << 20,
                state,
            },
        )]
        .into_iter()
        .collect()
    }

    fn build(records: impl FnOnce(&mut Vec<u8>) -> u32) -> Vec<u8> {
        let mut payload = Vec::new();
        let n = records(&mut payload);
        let params = SealParams {
            group: "g",
            seq: Seq(5),
            agent_time_ns: 1,
            flags: BatchFlags(0),
            bookmark: None,
            prev_hash: [0; 32],
            record_count: n,
        };
        seal(&params, &payload).0
    }

    #[test]
    fn sync_records_go_to_the_target_and_protected_ones_to_the_journal() {
        let mut enc = RecordEncoder::new();
        let bytes = build(|p| {
            encode_marker(1, RecordKind::SyncBegin, 0, 0, 0, p);
            enc.encode_data(1, 0, &[1u8; 4096], 0, p);
            encode_marker(1, RecordKind::Zero, 8192, 4096, 0, p);
            encode_marker(1, RecordKind::SyncEnd, 0, 0, 0, p);
            4
        });
        let view = batch::decode(&bytes).expect("decode");
        let plan = plan_batch(&view, "g", &volumes(VolumeState::New)).expect("plan");
        assert!(!plan.journal);
        assert_eq!(plan.target_ops.len(), 2);
        assert_eq!(
            plan.state_changes,
            vec![
                (1, VolumeState::Syncing, None),
                (1, VolumeState::Protecting, Some(5))
            ]
        );

        let plan = plan_batch(&view, "g", &volumes(VolumeState::Protecting)).expect("plan");
        assert!(plan.journal);
        assert_eq!(plan.rows.len(), 2);
        assert!(plan.state_changes.is_empty());
    }

    #[test]
    fn semantic_errors_are_refused() {
        let mut enc = RecordEncoder::new();
        let data_first = build(|p| {
            enc.encode_data(1, 0, &[1u8; 512], 0, p);
            1
        });
        let view = batch::decode(&data_first).expect("decode");
        assert!(
            plan_batch(&view, "g", &volumes(VolumeState::New))
                .expect_err("new volume")
                .contains("SyncBegin must come first")
        );
        assert!(plan_batch(&view, "g", &volumes(VolumeState::Syncing)).is_ok());

        let late_begin = build(|p| {
            enc.encode_data(1, 0, &[1u8; 512], 0, p);
            encode_marker(1, RecordKind::SyncBegin, 0, 0, 0, p);
            2
        });
        let view = batch::decode(&late_begin).expect("decode");
        assert!(
            plan_batch(&view, "g", &volumes(VolumeState::Syncing))
                .expect_err("late")
                .contains("first record")
        );

        let early_end = build(|p| {
            encode_marker(1, RecordKind::SyncEnd, 0, 0, 0, p);
            enc.encode_data(1, 0, &[1u8; 512], 0, p);
            2
        });
        let view = batch::decode(&early_end).expect("decode");
        assert!(
            plan_batch(&view, "g", &volumes(VolumeState::Syncing))
                .expect_err("early")
                .contains("last record")
        );

        let past_end = build(|p| {
            encode_marker(1, RecordKind::Trim, 4 << 20, 512, 0, p);
            1
        });
        let view = batch::decode(&past_end).expect("decode");
        assert!(
            plan_batch(&view, "g", &volumes(VolumeState::Protecting))
                .expect_err("past end")
                .contains("which has")
        );

        let stranger = build(|p| {
            encode_marker(7, RecordKind::Trim, 0, 512, 0, p);
            1
        });
        let view = batch::decode(&stranger).expect("decode");
        assert!(
            plan_batch(&view, "g", &volumes(VolumeState::Protecting))
                .expect_err("unknown volume")
                .contains("volume id 7")
        );
    }
}
