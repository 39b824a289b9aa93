//! The trimmer: one task per consistency group inside `serve`, beside the group's ingest task.
//! It keeps the group's window to its retention (`retention`): the oldest batches are applied
//! to the target files, then forgotten.
//!
//! It wakes every [`TRIM_INTERVAL`], and at once when a commit takes the group's journal over
//! its cap (the window itself moves by agent seconds: waking after every commit would only
//! take the catalog's write lock once per commit for nothing). A round chooses the new base
//! B' ([`crate::retention::choose_trim`]) and moves the base there; a round cut short by its
//! limits is followed at once by another.
//!
//! # The trim protocol (crash-safe and idempotent)
//! (a) ONE write transaction (`BEGIN IMMEDIATE`): drop the group's dead pins, read the live
//!     ones and the group's failover row (a failover not yet committed holds its point like a
//!     pin that never expires, see `failover`), choose B' (never past the oldest live pin or
//!     failover point, never past the head), and record the
//!     intent `trimming_to = B'`. From this commit on, readers treat the window as starting
//!     at B' (it starts at max(base, trimming_to, the volume's sync_done_seq)), so no new
//!     reader pins a point before it; a reader pinning at the same moment is serialized with
//!     this transaction by SQLite's write lock (see `pins`).
//! (b) For every volume of the group, every journal record with seq in (base, B'] — records
//!     exist only for protecting volumes — is applied to its target file in (seq, index)
//!     order: data records are read from their segment, checked against their index row and
//!     their hash, and written (pwrite); zero and trim records punch a hole (or write zeros).
//!     Readers are not disturbed: each byte written is covered by a record of any plan at a
//!     pinned point ≥ B', and rows stay until (d).
//! (c) fsync every target file written.
//! (d) ONE transaction: delete the record rows with seq ≤ B', the batch rows and bookmarks
//!     with seq < B'; keep batch B' itself (no longer journaled: its bytes are in the target),
//!     so that the window's first point — the image the target files now hold — can still be
//!     listed and restored; remember where the last trimmed journaled batch ended (the
//!     journal's committed end when no journaled batch row is left); set base = B' and clear
//!     `trimming_to`.
//! (e) Unlink the journal segments numbered below the first one still needed: the one holding
//!     the journal's committed end, and the lowest `segment_min` of the group's pins and of its
//!     failover row while not committed (a
//!     reader's plan may still read a record ≤ B' from a segment that held one when it
//!     pinned). The segment a commit may append to is never unlinked. When no pin or failover
//!     reaches back to the segment holding the trimmed end, punch a hole over its bytes before
//!     the trimmed end (`journal::punch_trimmed`): with one large segment — a small journal,
//!     or a cap just lowered — the disk space a trim frees is free at once, so a replica
//!     paused on a full disk resumes after `retention --max-journal` without more space.
//!
//! A `trimming_to` found at the start of a round — left by a crash, or by a round that failed
//! on a full disk — is completed first: (b)–(e) again with the same B'. Re-applying records
//! is idempotent (every byte of (base, B'] ends as the last record covering it leaves it), (d)
//! checks the intent before it acts, and (e) is redone every round; so killing the process at
//! any instant and restarting gives the same result.
//!
//! # The journal cap and ingest
//! A group's ingest and trimmer share a [`TrimLink`]: the journal bytes (ingest adds what it
//! commits, the trimmer subtracts what (d) removes once (e) has freed it on disk) and the
//! cap. Before each group commit, ingest waits while the journal is over its cap and the
//! trimmer can bring it under; so the journal's bytes, on disk too, never exceed the cap by
//! more than one group commit (at most `GROUP_COMMIT_BYTES_MAX`) — unless a live pin holds
//! the base, in which case ingest goes on (a reader never stops protection) and the cap is
//! exceeded until the pin is released (a pin may also keep trimmed bytes of the segment
//! holding the trimmed end on disk, see (e), until it is released).
//!
//! # Errors
//! A journal record that fails its checks (damaged in its segment) is left out — its bytes
//! are not applied — with an error in the log and an event, and the round goes on: the
//! verifier reports the chunks it leaves wrong, and a repair resends them in later batches.
//! A full disk (writing a target file) is logged once and the round tried again at the next
//! wake-up, `trimming_to` staying set meanwhile; ingest is then not held back by the cap. Any
//! other error stops the server, as in ingest (an fsync that failed is never retried: the next
//! start redoes (b)–(e) from the journal, which rewrites every byte before the next fsync).
//!
//! `run` is cancellation-safe between rounds; a round (disk writes, fsyncs, transactions) runs
//! to completion outside any `select!`.

use cdp_shared::types::Seq;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::catalog::{Catalog, FailoverState, GroupRow, TrimReads};
use crate::datadir::DataDir;
use crate::error::Result;
use crate::journal;
use crate::pins;
use crate::retention::{
    BatchWeight, Retention, TRIM_ROUND_BATCHES_MAX, TrimChoice, TrimInputs, choose_trim,
};

/// How often the trimmer of a group wakes up by itself.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(1);

/// What a group's ingest and trimmer share (see the module docs).
#[derive(Debug)]
pub struct TrimLink {
    /// The group's journal bytes as committed.
    journal_bytes: AtomicU64,
    /// The cap (`u64::MAX`: none).
    cap_bytes: AtomicU64,
    /// The trimmer cannot bring the journal under its cap now (a pin holds the base, or a
    /// round failed): ingest does not wait for it.
    held: AtomicBool,
    wake_trimmer: Notify,
    wake_ingest: Notify,
}

impl TrimLink {
    pub fn new(journal_bytes: u64, cap: Option<u64>) -> Arc<TrimLink> {
        Arc::new(TrimLink {
            journal_bytes: AtomicU64::new(journal_bytes),
            cap_bytes: AtomicU64::new(cap.unwrap_or(u64::MAX)),
            held: AtomicBool::new(false),
            wake_trimmer: Notify::new(),
            wake_ingest: Notify::new(),
        })
    }

    /// The group's journal bytes as committed.
    pub fn journal_bytes(&self) -> u64 {
        self.journal_bytes.load(Ordering::SeqCst)
    }

    fn over_cap(&self) -> bool {
        self.journal_bytes() > self.cap_bytes.load(Ordering::SeqCst)
    }

    /// Ingest committed `bytes` more journal bytes; wakes the trimmer when that takes the
    /// journal over its cap.
    pub fn committed(&self, bytes: u64) {
        self.journal_bytes.fetch_add(bytes, Ordering::SeqCst);
        if self.over_cap() {
            self.wake_trimmer.notify_one();
        }
    }

    /// Whether ingest waits before its next commit: the journal is over its cap and the
    /// trimmer can bring it under.
    pub fn must_wait(&self) -> bool {
        self.over_cap() && !self.held.load(Ordering::SeqCst)
    }

    /// Completes when the trimmer has news for a waiting ingest.
    pub async fn wait_for_trimmer(&self) {
        self.wake_ingest.notified().await
    }

    fn trimmed(&self, bytes: u64) {
        // Never below zero, whatever happens.
        let _ = self
            .journal_bytes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| {
                Some(b.saturating_sub(bytes))
            });
    }

    fn set_cap(&self, cap: Option<u64>) {
        self.cap_bytes
            .store(cap.unwrap_or(u64::MAX), Ordering::SeqCst);
    }

    fn set_held(&self, held: bool) {
        self.held.store(held, Ordering::SeqCst);
        self.wake_ingest.notify_one();
    }
}

/// Where a round stops, to simulate a crash right after a step (tests).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrimStep {
    /// (a): the intent is recorded.
    Intent,
    /// (b): the records are applied to the target files, not fsynced.
    Apply,
    /// (c): the target files are fsynced.
    Sync,
    /// (d): the base has moved, no segment is unlinked yet.
    Commit,
}

/// What one round did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoundOutcome {
    /// The base the round moved to (or completed a pending move to).
    pub trimmed_to: Option<Seq>,
    /// Another round should follow at once (this one was cut short by its limits, or
    /// completed a pending move).
    pub more: bool,
    /// A pin keeps the base short of what retention asks for.
    pub held_by_pin: bool,
    /// Journal segments unlinked.
    pub unlinked: Vec<u64>,
}

/// The trimmer of one group.
pub struct Trimmer {
    catalog: Catalog,
    dir: DataDir,
    group_id: i64,
    name: String,
    link: Arc<TrimLink>,
    /// A round failed on a full disk and said so (said again only after a success).
    disk_full_told: bool,
    /// The trimmed end (segment, offset) up to which this trimmer last punched the journal
    /// (step (e)); punched again only once the trimmed end moves.
    punched: Option<(u64, u64)>,
}

impl Trimmer {
    pub fn new(catalog: &Catalog, dir: &DataDir, group: &GroupRow, link: Arc<TrimLink>) -> Trimmer {
        Trimmer {
            catalog: catalog.clone(),
            dir: dir.clone(),
            group_id: group.id,
            name: group.name.clone(),
            link,
            disk_full_told: false,
            punched: None,
        }
    }

    /// One round of the protocol (see the module docs).
    pub async fn round(&mut self) -> Result<RoundOutcome> {
        self.round_stopping_after(None).await
    }

    /// One round, stopping right after `stop` (tests simulate a crash there).
    #[doc(hidden)]
    pub async fn round_stopping_after(&mut self, stop: Option<TrimStep>) -> Result<RoundOutcome> {
        let g = self.catalog.group_by_id(self.group_id).await?;
        self.link.set_cap(g.retention.journal_bytes_max);
        let mut outcome = RoundOutcome::default();
        // The journal bytes (d) removed; ingest is told once (e) has freed them on disk.
        let mut released = 0;
        let to = match g.trimming_to {
            Some(to) => {
                tracing::debug!(group = %self.name, "completing the trim to seq {to} under way");
                outcome.more = true;
                Some(to)
            }
            None => {
                let choice = self.intent().await?;
                outcome.more = choice.more;
                outcome.held_by_pin = choice.held_by_pin;
                choice.to
            }
        };
        if let Some(to) = to {
            if stop == Some(TrimStep::Intent) {
                return Ok(outcome);
            }
            let g = self.catalog.group_by_id(self.group_id).await?;
            let applied = self
                .apply(g.base_seq, to, stop != Some(TrimStep::Apply))
                .await?;
            if matches!(stop, Some(TrimStep::Apply | TrimStep::Sync)) {
                return Ok(outcome);
            }
            if let Some(done) = self.catalog.finish_trim(self.group_id, to).await? {
                released = done.journal_bytes;
                tracing::debug!(
                    group = %self.name,
                    "trimmed to seq {to}: {} batches, {} journal bytes, {} records applied to {} target files",
                    done.batches,
                    done.journal_bytes,
                    done.records,
                    applied
                );
                outcome.trimmed_to = Some(to);
            }
            if stop == Some(TrimStep::Commit) {
                // A crash right after (d): a restart counts the journal from the catalog,
                // which (d) changed.
                self.link.trimmed(released);
                return Ok(outcome);
            }
        }
        // Ingest may commit again once the link says the journal is under its cap: said
        // only after (e), so the disk space those commits take has been freed first (a
        // replica paused on a full disk, or measured against its cap, never sees the trimmed
        // bytes counted out while they are still on disk).
        let unlinked = self.unlink().await;
        self.link.trimmed(released);
        outcome.unlinked = unlinked?;
        Ok(outcome)
    }

    /// Step (a): chooses B' and records the intent, in one write transaction.
    async fn intent(&mut self) -> Result<TrimChoice> {
        let mut lock = self.catalog.write_lock().await?;
        let g = lock.group(self.group_id).await?;
        let live = pins::collect_dead_pins(&mut lock, &g).await?;
        // A failover not yet committed holds its point like a pin that never expires.
        let failover_seq = lock
            .failover(g.id)
            .await?
            .filter(|f| f.state != FailoverState::Committed)
            .map(|f| f.seq);
        let none = TrimChoice {
            to: g.trimming_to,
            wanted: g.base_seq,
            held_by_pin: false,
            more: false,
        };
        if g.trimming_to.is_some() {
            lock.commit().await?;
            return Ok(none);
        }
        let journal_bytes = lock.journal_bytes(g.id).await?;
        let Some((inputs, batches)) =
            trim_inputs(&mut lock, &g, g.base_seq, &g.retention, journal_bytes).await?
        else {
            lock.commit().await?;
            return Ok(none);
        };
        let choice = choose_trim(
            &TrimInputs {
                oldest_pin: live
                    .first()
                    .map(|p| p.seq)
                    .into_iter()
                    .chain(failover_seq)
                    .min(),
                ..inputs
            },
            &batches,
        );
        if let Some(to) = choice.to {
            lock.set_trimming_to(g.id, to).await?;
        }
        lock.commit().await?;
        Ok(choice)
    }

    /// Steps (b) and (c): applies the records in (base, to] to the target files, and fsyncs
    /// them when `sync`. Returns the number of target files written.
    async fn apply(&self, base: Seq, to: Seq, sync: bool) -> Result<usize> {
        crate::apply::apply_journal(
            &self.catalog,
            &self.dir,
            self.group_id,
            &self.name,
            base,
            to,
            sync,
        )
        .await
    }

    /// Step (e): unlinks the segments below the first one still needed.
    async fn unlink(&mut self) -> Result<Vec<u64>> {
        let g = self.catalog.group_by_id(self.group_id).await?;
        let Some((end_segment, end_offset)) = g.trimmed_end else {
            return Ok(Vec::new());
        };
        let first_live = self
            .catalog
            .first_segment(g.id, g.base_seq, Seq(u64::MAX >> 1))
            .await?;
        let pinned = self
            .catalog
            .pins_of_group(g.id)
            .await?
            .iter()
            .filter_map(|p| p.segment_min)
            .min();
        let failover = self
            .catalog
            .failover(g.id)
            .await?
            .filter(|f| f.state != FailoverState::Committed)
            .and_then(|f| f.segment_min);
        let keep_from = [Some(end_segment), first_live, pinned, failover]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(end_segment);
        // The trimmed bytes of the end segment are punched out unless a reader may still
        // read them: a pin or a failover taken before the last trims may plan records in
        // that segment that are now trimmed (one taken since reads only past the trimmed
        // end, but the two are not told apart). Readers are short (the verifier) or hold
        // their point anyway (exports, failovers).
        let readers_below = [pinned, failover]
            .into_iter()
            .flatten()
            .any(|s| s <= end_segment);
        let punch = (!readers_below
            && keep_from == end_segment
            && self.punched < Some((end_segment, end_offset)))
        .then_some((end_segment, end_offset));
        let jdir = self.dir.journal(&self.name);
        let (unlinked, punched) = tokio::task::spawn_blocking(move || -> Result<_> {
            let unlinked = journal::remove_segments_before(&jdir, keep_from)?;
            let punched = match punch {
                Some((segment, end)) => journal::punch_trimmed(&jdir, segment, end)?,
                None => 0,
            };
            Ok((unlinked, punched))
        })
        .await??;
        if !unlinked.is_empty() {
            tracing::debug!(group = %self.name, "unlinked trimmed journal segments {unlinked:?}");
        }
        if let Some(at) = punch {
            self.punched = Some(at);
            tracing::debug!(
                group = %self.name,
                "released the trimmed bytes of journal segment {end_segment} before offset {end_offset} ({punched} bytes punched)"
            );
        }
        Ok(unlinked)
    }

    /// The state ingest sees after a round: held when over the cap with nothing more to do.
    fn publish(&self, outcome: &RoundOutcome) {
        self.link.set_held(self.link.over_cap() && !outcome.more);
    }
}

/// What the trimmer weighs in a round of group `g` whose base is `base`, with `journal_bytes`
/// journal bytes after it, under `retention`: the inputs of [`choose_trim`] (no pins: the
/// caller adds them) and the batches after the base it may look at. `None` when nothing
/// follows the base.
pub(crate) async fn trim_inputs(
    reads: &mut impl TrimReads,
    g: &GroupRow,
    base: Seq,
    retention: &Retention,
    journal_bytes: u64,
) -> Result<Option<(TrimInputs, Vec<BatchWeight>)>> {
    if g.head_seq <= base {
        return Ok(None);
    }
    let Some(head) = reads.batch(g.id, g.head_seq).await? else {
        return Ok(None);
    };
    // Back from the head's agent time, or from the replica's clock when that is earlier:
    // an agent clock running ahead never trims more.
    let window_ns = i64::try_from(retention.window.as_nanos()).unwrap_or(i64::MAX);
    let cutoff_ns = head
        .agent_ns
        .min(crate::clock::now_ns())
        .saturating_sub(window_ns);
    let scan_to = g
        .head_seq
        .min(Seq(base.0.saturating_add(TRIM_ROUND_BATCHES_MAX + 1)));
    let older_than_window = match reads
        .first_batch_since(g.id, base, scan_to, cutoff_ns)
        .await?
    {
        Some(young) => Seq(young.0 - 1),
        None => scan_to,
    };
    let excess_bytes = match retention.journal_bytes_max {
        Some(cap) => journal_bytes.saturating_sub(cap),
        None => 0,
    };
    // Only as many batches as the choice can look at.
    let weigh = if excess_bytes > 0 {
        TRIM_ROUND_BATCHES_MAX
    } else {
        (older_than_window.0 - base.0).min(TRIM_ROUND_BATCHES_MAX)
    };
    let batches = if weigh > 0 {
        reads.batch_weights(g.id, base, weigh).await?
    } else {
        Vec::new()
    };
    Ok(Some((
        TrimInputs {
            base,
            head: g.head_seq,
            older_than_window,
            excess_bytes,
            oldest_pin: None,
        },
        batches,
    )))
}

/// Where the trimmer's rounds would take group `g`'s base under `retention` if no reader held
/// it and no batch arrived: its rounds played out on the catalog as it is (the same inputs and
/// [`choose_trim`] as [`Trimmer::round`], without writing anything). `retention` uses it to
/// tell what a change would drop.
pub(crate) async fn base_after_trims(
    reads: &mut impl TrimReads,
    g: &GroupRow,
    retention: &Retention,
) -> Result<Seq> {
    let mut base = g.window_floor();
    let mut journal_bytes = reads.journal_bytes_after(g.id, base).await?;
    while let Some((inputs, batches)) =
        trim_inputs(reads, g, base, retention, journal_bytes).await?
    {
        let Some(to) = choose_trim(&inputs, &batches).to else {
            break;
        };
        let trimmed: u64 = batches
            .iter()
            .filter(|b| b.seq <= to)
            .map(|b| b.journal_bytes)
            .sum();
        journal_bytes = journal_bytes.saturating_sub(trimmed);
        base = to;
    }
    Ok(base)
}

/// Runs a group's trimmer until `token` is cancelled (see the module docs). An `Err` is an
/// error other than a full disk: the caller stops the server.
pub async fn run(mut t: Trimmer, token: CancellationToken) -> Result<()> {
    loop {
        if token.is_cancelled() {
            return Ok(());
        }
        let outcome = match t.round().await {
            Ok(o) => {
                t.disk_full_told = false;
                metrics::counter!("cdp_replica_trimmer_runs_total", "group" => t.name.clone())
                    .increment(1);
                o
            }
            Err(e) if e.is_disk_full() => {
                if !t.disk_full_told {
                    tracing::warn!(group = %t.name, "trimming waits for disk space (it tries again every {} s): {e}", TRIM_INTERVAL.as_secs_f64());
                    t.disk_full_told = true;
                }
                t.link.set_held(true);
                RoundOutcome::default()
            }
            Err(e) => {
                t.link.set_held(true);
                return Err(e);
            }
        };
        if !t.disk_full_told {
            t.publish(&outcome);
        }
        if outcome.more {
            tokio::task::yield_now().await;
            continue;
        }
        tokio::select! {
            biased;
            _ = token.cancelled() => return Ok(()),
            _ = t.link.wake_trimmer.notified() => {}
            _ = tokio::time::sleep(TRIM_INTERVAL) => {}
        }
    }
}
