//! A group whose commits fail on a full disk: paused, retried, resumed.

use cdp_shared::wire::Control;
use tokio::time::Instant;

use super::group::Outbox;
use super::{GroupIngest, PAUSE_RETRY_INTERVAL};
use crate::catalog::EventLevel;
use crate::clock::now_ns;
use crate::error::{ReplicaError, Result};
use crate::pause_board::Pause;

/// A group whose commits fail on a full disk.
pub(super) struct Paused {
    pub(super) reason: String,
    pub(super) since_ns: i64,
    pub(super) since: Instant,
    /// When the pending batches are tried again.
    pub(super) retry_at: Instant,
    /// Commit attempts that failed.
    pub(super) attempts: u64,
    /// The pause was recorded in the events table (it may be full too: then it is recorded at
    /// the resume).
    pub(super) event_recorded: bool,
}

impl GroupIngest {
    /// Marks the group paused after a commit failed on a full disk (`e`), or schedules the
    /// next retry when it already is. The first time: one warning line, an event, the pause
    /// board, and `Paused` to every attached connection.
    pub(super) async fn pause(&mut self, e: &ReplicaError, out: &mut Outbox) -> Result<()> {
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
    pub(super) async fn resume(&mut self, out: &mut Outbox) -> Result<()> {
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
    pub(super) fn disk_full_reason(&self, e: &ReplicaError) -> String {
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
