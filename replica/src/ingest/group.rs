//! One group's ingest: the journal in seq order, out-of-order batches held until the gap
//! fills (in the sans-IO reorder buffer, `order`), group commits and their undo, and the task
//! that runs it.

use cdp_shared::types::Seq;
use std::collections::HashMap;
use std::sync::Arc;

use cdp_shared::batch::{BatchHeader, CheckedBatch, Hash};
use cdp_shared::identity::Fingerprint;
use cdp_shared::wire::Control;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::order::{Offer, Ordered, ReorderBuffer};
use super::pause::Paused;
use super::plan::{BatchPlan, TargetOp, plan_batch};
use super::{GROUP_COMMIT_BYTES_MAX, IngestOptions, Reply, VolumeEntry};
use crate::catalog::{
    BatchRow, Catalog, CommitRows, EventLevel, NewRecord, RecordRow, VolumeState,
};
use crate::clock::now_ns;
use crate::datadir::DataDir;
use crate::error::{ReplicaError, Result};
use crate::journal::{Journal, JournalPos, SegmentSpan};
use crate::pause_board::PauseBoard;
use crate::target::TargetFile;
use crate::trimmer::TrimLink;

/// A checked batch on its way to its group's task (checked once, in `submit`: the group's
/// task reads its header and records from the check and never decodes it again).
pub struct Received {
    pub batch: CheckedBatch,
    pub received_ns: i64,
    pub agent: Fingerprint,
    pub reply: Reply,
}

impl Received {
    pub fn header(&self) -> &BatchHeader {
        self.batch.header()
    }
}

pub(super) enum GroupMsg {
    Batch(Box<Received>),
    /// Re-read the group and its volumes from the catalog (after a hello changed them).
    Reload(oneshot::Sender<Result<()>>),
    /// A connection of the group's agent: it hears `Paused`/`Resumed` (at once if paused).
    Attach(Reply),
}

/// Disk state of a group: its journal and the target files of volumes being synced.
pub(super) struct GroupIo {
    pub(super) data_dir: DataDir,
    pub(super) journal: Journal,
    pub(super) targets: HashMap<u32, TargetFile>,
    pub(super) decompressor: zstd::bulk::Decompressor<'static>,
    pub(super) scratch: Vec<u8>,
    /// A failed commit's journal bytes still to be undone (the undo itself failed on a full
    /// disk): the journal goes back here before anything else is written.
    pub(super) rollback_due: Option<JournalPos>,
}

impl GroupIo {
    /// Steps 4–5 of a group commit for `batches` (in seq order): apply target ops, append
    /// journaled batches, then fsync the journal and the target files. Returns each batch's
    /// place in the journal. Runs on a blocking thread.
    pub(super) fn write(
        &mut self,
        batches: &[(&CheckedBatch, &BatchPlan)],
        volumes: &HashMap<u32, VolumeEntry>,
    ) -> Result<Vec<Option<SegmentSpan>>> {
        self.rollback()?;
        debug_assert_eq!(self.journal.written(), self.journal.durable());
        let journaled: u64 = batches
            .iter()
            .filter(|(_, plan)| plan.journal)
            .map(|(batch, _)| batch.bytes().len() as u64)
            .sum();
        if journaled > 0 {
            self.journal.check_room(journaled)?;
        }
        let mut spans = Vec::with_capacity(batches.len());
        for (batch, plan) in batches {
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
                    TargetOp::Write { record, .. } => {
                        let rec = batch.record(record).ok_or_else(|| {
                            ReplicaError::Ingest(format!(
                                "batch {} has no record {record} to write",
                                batch.header().seq
                            ))
                        })?;
                        rec.header
                            .decode_data(rec.stored, &mut self.decompressor, &mut self.scratch)
                            .map_err(|e| ReplicaError::BadRecord {
                                seq: batch.header().seq,
                                reason: format!("record {record}: {e}"),
                            })?;
                        target.write_at(rec.header.offset, &self.scratch)?;
                    }
                    TargetOp::Zero { offset, length, .. } => {
                        target.zero(offset, u64::from(length))?
                    }
                }
            }
            spans.push(if plan.journal {
                Some(self.journal.append(batch.bytes())?)
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
    pub(super) fn rollback(&mut self) -> Result<()> {
        if let Some(to) = self.rollback_due {
            self.journal.rollback_to(to)?;
            self.rollback_due = None;
        }
        Ok(())
    }
}

/// One consistency group's ingest state: the journal in seq order (see the crate docs).
pub struct GroupIngest {
    pub(super) catalog: Catalog,
    pub(super) group_id: i64,
    pub(super) name: String,
    /// Last durable seq (journal fsynced, rows committed).
    pub(super) head: Seq,
    pub(super) head_hash: Option<Hash>,
    pub(super) volumes: HashMap<u32, VolumeEntry>,
    /// Batches ahead of the head, waiting for the gap before them (bounded).
    pub(super) pending: ReorderBuffer<Received>,
    pub(super) io: Option<GroupIo>,
    pub(super) board: Arc<PauseBoard>,
    /// Control streams of the agent's connections (closed ones are dropped as found).
    pub(super) attached: Vec<Reply>,
    /// Set while a full disk keeps the group from committing.
    pub(super) paused: Option<Paused>,
    /// Shared with the group's trimmer: the journal's bytes and cap.
    pub(super) link: Arc<TrimLink>,
    /// The group is failed over (see `failover`): its batches are dropped, never committed.
    /// Said once; cleared by a reload that finds no failover row.
    pub(super) fenced: bool,
}

/// A message for a connection: (where, what).
pub(super) type Outbox = Vec<(Reply, Control)>;

/// The batches one group commit takes, in seq order, each with its plan.
pub(super) type Chosen = Vec<(Received, BatchPlan)>;

/// What the writes of a group commit leave (see [`GroupIngest::write_batches`]): where the
/// journal goes back to on failure, each batch's place in the journal (or the failure), and the
/// batches.
type Written = (JournalPos, Result<Vec<Option<SegmentSpan>>>, Chosen);

/// Records an event. A full disk costs only the event (it is logged at debug level instead;
/// returns false), never the group; any other error is returned.
pub(super) async fn record_event(
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

pub(super) fn nack(out: &mut Outbox, r: &Received, reason: String) {
    tracing::warn!(group = %r.header().group, seq = r.header().seq.0, agent = %r.agent, "refused a batch: {reason}");
    out.push((
        r.reply.clone(),
        Control::Nack {
            group: Some(r.header().group.clone()),
            seq: r.header().seq,
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
            pending: ReorderBuffer::new(),
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
    pub(super) fn waits_for_trimmer(&self) -> bool {
        self.pending.next_ready(self.head) && self.link.must_wait()
    }

    pub fn head(&self) -> Seq {
        self.head
    }

    /// Why the group's ingest is paused, if it is.
    pub fn paused(&self) -> Option<&str> {
        self.paused.as_ref().map(|p| p.reason.as_str())
    }

    /// When a paused group tries its commit again.
    pub(super) fn retry_at(&self) -> Option<Instant> {
        self.paused.as_ref().map(|p| p.retry_at)
    }

    /// Subscribes a connection to the group's `Paused`/`Resumed` news; it hears `Paused` at
    /// once when the group is paused.
    pub(super) fn attach(&mut self, reply: Reply, out: &mut Outbox) {
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
    pub(super) async fn event(
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
        self.pending.drop_through(self.head);
        Ok(())
    }

    /// Takes in one checked batch: a duplicate is re-acked (or refused when it conflicts), a
    /// batch from the future waits for its gap (bounded). Commits happen in
    /// [`GroupIngest::commit_ready`].
    pub async fn handle_batch(&mut self, r: Received) -> Result<Outbox> {
        let mut out = Outbox::new();
        let seq = r.header().seq;
        let paused = self.paused.as_ref().map(|p| p.reason.as_str());
        match self.pending.offer(r, self.head, paused) {
            Offer::Duplicate(r) => match self.catalog.batch_hash(self.group_id, seq).await? {
                Some(h) if h != r.header().header_hash => {
                    tracing::error!(group = %self.name, seq = seq.0, agent = %r.agent, "a resent batch differs from the journaled batch with the same seq");
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
                _ => out.push((r.reply.clone(), Control::ack(&self.name, self.head))),
            },
            Offer::Refreshed | Offer::Held => {}
            // Nothing waiting is acknowledged, and a group's batches come from its one agent:
            // a different batch with the same seq is the agent's newer chain (after a rebase),
            // so it replaced the older one.
            Offer::Replaced(_older) => {
                tracing::debug!(group = %self.name, seq = seq.0, "a newer batch {seq} replaces the one waiting");
            }
            Offer::Refused(r, refusal) => nack(&mut out, &r, refusal.reason(&self.name)),
        }
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
        while self.pending.next_ready(self.head) {
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
    pub(super) async fn commit_once(&mut self, out: &mut Outbox) -> Result<bool> {
        let chosen = self.choose_batches(out);
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
        let (undo_to, written, chosen) = self.write_batches(chosen).await?;
        let rows = match self.commit_batches(&chosen, written).await? {
            Ok(rows) => rows,
            Err(ReplicaError::Fenced(why)) => {
                self.undo(undo_to, chosen).await?;
                tracing::debug!(group = %self.name, "a commit met the fence: {why}");
                self.fence(Seq::ZERO);
                return Ok(false);
            }
            Err(e) if e.is_disk_full() => {
                self.undo(undo_to, chosen).await?;
                self.pause(&e, out).await?;
                return Ok(false);
            }
            Err(ReplicaError::BadRecord { seq, reason }) => {
                // Refused like a batch that fails its plan; the batches before it are
                // committed again at once (their target writes are re-applied identically),
                // the ones after it wait for its resend.
                let (bad, rest): (Chosen, Chosen) =
                    chosen.into_iter().partition(|(r, _)| r.header().seq == seq);
                for (r, _) in &bad {
                    nack(out, r, reason.clone());
                }
                self.undo(undo_to, rest).await?;
                return Ok(true);
            }
            Err(e) => return Err(e),
        };
        let bytes: usize = chosen.iter().map(|(r, _)| r.batch.bytes().len()).sum();
        metrics::counter!("cdp_replica_ingested_batches_total", "group" => self.name.clone())
            .increment(chosen.len() as u64);
        metrics::counter!("cdp_replica_ingested_bytes_total", "group" => self.name.clone())
            .increment(bytes as u64);
        self.advance_and_ack(rows, &chosen, out).await?;
        Ok(true)
    }

    /// Step 3 of a group commit: takes the in-order run of waiting batches (within
    /// [`GROUP_COMMIT_BYTES_MAX`]) and plans each against the hash chain and the group's
    /// volumes as they will be at its turn. The first batch that fails is refused (`Nack` in
    /// `out`); the ones after it wait again. Returns the batches to commit, with their plans.
    fn choose_batches(&mut self, out: &mut Outbox) -> Chosen {
        let mut sim = self.volumes.clone();
        let mut expected_prev = self.head_hash;
        let mut chosen: Chosen = Vec::new();
        let mut run = self
            .pending
            .take_in_order(self.head, GROUP_COMMIT_BYTES_MAX)
            .into_iter();
        for r in run.by_ref() {
            let seq = r.header().seq;
            if let Some(prev) = expected_prev
                && r.header().prev_hash != prev
            {
                nack(
                    out,
                    &r,
                    format!(
                        "batch {seq} does not follow batch {} in the journal (its prev_hash differs)",
                        seq.0 - 1
                    ),
                );
                break;
            }
            let plan = match plan_batch(&r.batch, &self.name, &sim) {
                Ok(plan) => plan,
                Err(reason) => {
                    nack(out, &r, reason);
                    break;
                }
            };
            for c in &plan.state_changes {
                if let Some(v) = sim.get_mut(&c.volume) {
                    v.state = c.state;
                }
            }
            expected_prev = Some(r.header().header_hash);
            chosen.push((r, plan));
        }
        // The batches after a refused one wait again, as they were.
        for r in run {
            self.pending.put_back(r);
        }
        chosen
    }

    /// Steps 4–5 of a group commit: target writes, journal append, fsyncs (on a blocking
    /// thread). Returns where the journal goes back to if the commit fails, what the writes
    /// came to (an `Err` there is the commit's failure, for the caller to undo), and the
    /// batches back. An `Err` of its own stops ingest.
    async fn write_batches(&mut self, chosen: Chosen) -> Result<Written> {
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
            let refs: Vec<(&CheckedBatch, &BatchPlan)> =
                chosen.iter().map(|(r, plan)| (&r.batch, plan)).collect();
            let written = io.write(&refs, &volumes);
            (io, written, chosen)
        })
        .await?;
        self.io = Some(io);
        Ok((undo_to, written, chosen))
    }

    /// Step 6 of a group commit: the batches' rows in one transaction, once their writes
    /// (`written`) succeeded. The inner result is the commit's: its rows, or the failure the
    /// caller undoes (a failed COMMIT that took effect after all counts as a success). An
    /// outer `Err` (reading the head back failed) stops ingest.
    async fn commit_batches(
        &self,
        chosen: &[(Received, BatchPlan)],
        written: Result<Vec<Option<SegmentSpan>>>,
    ) -> Result<Result<CommitRows>> {
        let spans = match written {
            Ok(spans) => spans,
            Err(e) => return Ok(Err(e)),
        };
        let rows = self.commit_rows(chosen, &spans);
        Ok(match self.catalog.commit(&rows).await {
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
        })
    }

    /// After a group commit is durable: the head advances, a paused group resumes, volume
    /// state changes are applied (an info line and an event each), then step 7, one `Ack` to
    /// each connection that sent one of the batches.
    async fn advance_and_ack(
        &mut self,
        rows: CommitRows,
        chosen: &[(Received, BatchPlan)],
        out: &mut Outbox,
    ) -> Result<()> {
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
        for (r, plan) in chosen {
            for c in &plan.state_changes {
                let Some(v) = self.volumes.get_mut(&c.volume) else {
                    continue;
                };
                v.state = c.state;
                let msg = match c.state {
                    VolumeState::Syncing => format!(
                        "volume {} began its initial sync at seq {}",
                        v.name,
                        r.header().seq
                    ),
                    VolumeState::Protecting => format!(
                        "volume {} completed its initial sync at seq {}; its window starts there",
                        v.name,
                        r.header().seq
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
        for (r, _) in chosen {
            if !replies.iter().any(|c| c.same_channel(&r.reply)) {
                replies.push(r.reply.clone());
            }
        }
        for r in replies {
            out.push((r, Control::ack(&self.name, self.head)));
        }
        Ok(())
    }

    /// The rows of one group commit (step 6).
    pub(super) fn commit_rows(
        &self,
        chosen: &[(Received, BatchPlan)],
        spans: &[Option<SegmentSpan>],
    ) -> CommitRows {
        let durable_ns = now_ns();
        let mut rows = CommitRows {
            group_id: self.group_id,
            ..CommitRows::default()
        };
        for ((r, plan), span) in chosen.iter().zip(spans) {
            let h = r.header();
            rows.batches.push(BatchRow {
                seq: h.seq,
                agent_ns: h.agent_time_ns,
                received_ns: r.received_ns,
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
                            seq: h.seq,
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
                rows.bookmarks.push((b.clone(), h.seq));
            }
            for c in &plan.state_changes {
                if let Some(v) = self.volumes.get(&c.volume) {
                    rows.volume_changes.push((v.id, c.state, c.sync_done_seq));
                }
            }
        }
        if let Some((last, _)) = chosen.last() {
            rows.head_seq = last.header().seq;
            rows.head_hash = Some(last.header().header_hash);
        }
        rows
    }

    /// Undoes a commit that failed on a full disk: the journal goes back to `to` (now, or
    /// before the next commit writes anything if the undo itself fails on the full disk), and
    /// the batches wait again in `pending`, exactly as before the commit took them.
    pub(super) async fn undo(&mut self, to: JournalPos, chosen: Chosen) -> Result<()> {
        for (r, _) in chosen {
            self.pending.put_back(r);
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
    pub(super) fn fence(&mut self, seq: Seq) {
        if !self.fenced {
            tracing::warn!(
                group = %self.name,
                "the group is failed over on this replica{}: its batches are no longer committed",
                if seq > Seq::ZERO { format!(" at seq {seq}") } else { String::new() }
            );
            self.fenced = true;
        }
        self.pending.clear();
    }
}

impl Ordered for Received {
    fn seq(&self) -> Seq {
        self.header().seq
    }

    fn header_hash(&self) -> Hash {
        self.header().header_hash
    }

    fn byte_len(&self) -> usize {
        self.batch.bytes().len()
    }

    /// The same batch came again (over another connection, or resent): its replies go where
    /// the latest copy came from.
    fn refresh(&mut self, again: Received) {
        self.reply = again.reply;
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
pub(super) async fn run_group(
    mut g: GroupIngest,
    mut rx: mpsc::Receiver<GroupMsg>,
    token: CancellationToken,
    heads: watch::Sender<HashMap<i64, Seq>>,
) -> Result<()> {
    let link = g.trim_link();
    loop {
        let (id, head) = (g.group_id, g.head);
        heads.send_if_modified(|h| h.insert(id, head) != Some(head));
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

pub(super) async fn handle_msg(g: &mut GroupIngest, msg: GroupMsg, out: &mut Outbox) -> Result<()> {
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
