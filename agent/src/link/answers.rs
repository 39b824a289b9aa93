//! What the replica's control messages are answered with: acks and nacks move the send
//! window, hash replies go to the waiting hash request, pause notices to the link state, and
//! the verifier's questions (`VerifyRequest`) and repairs (`RepairRequest`) to the group, their
//! answers written back by the connection loop.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Result, anyhow, bail};
use cdp_shared::Seq;
use cdp_shared::types::VolumeId;
use cdp_shared::wire::Control;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::window::{NackAction, SendWindow, send_batch};
use super::{HashWaiters, SharedLink, parse_hash};
use crate::pipeline::Group;

pub(super) struct Ctx<'a> {
    pub(super) window: &'a mut SendWindow,
    /// The groups of the connection, by name (the window's groups).
    pub(super) groups: &'a BTreeMap<String, Arc<Group>>,
    pub(super) conn: &'a quinn::Connection,
    pub(super) sends: &'a mut JoinSet<Result<()>>,
    pub(super) link: &'a SharedLink,
    pub(super) hash_waiters: &'a mut HashWaiters,
    /// Answers to the replica's verify requests, written by the connection loop.
    pub(super) replies: mpsc::Sender<Control>,
    pub(super) verifies: &'a mut JoinSet<()>,
}

impl Ctx<'_> {
    /// The connection's group named `name` (one of the window's).
    fn group(&self, name: &str) -> Result<&Arc<Group>> {
        self.groups
            .get(name)
            .ok_or_else(|| anyhow!("no group {name} on this connection"))
    }

    pub(super) fn handle(&mut self, msg: Control) -> Result<()> {
        match msg {
            Control::Ack { group, durable } => self.handle_ack(&group, durable)?,
            Control::Nack { group, seq, reason } => {
                self.handle_nack(group.as_deref(), seq, &reason)?
            }
            Control::HashReply {
                group,
                volume,
                seq: _,
                first_chunk,
                hashes,
            } => self.handle_hash_reply(group, volume, first_chunk, &hashes),
            Control::HashError {
                group,
                volume,
                reason,
            } => self.handle_hash_error(&group, volume, &reason),
            Control::Paused { group, reason } => {
                tracing::warn!(
                    group,
                    "the replica paused ingest: {reason}; batches stay in the spool until it resumes"
                );
                self.link
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .paused
                    .insert(group, reason);
            }
            Control::Resumed { group } => {
                tracing::info!(group, "the replica resumed ingest");
                self.link
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .paused
                    .remove(&group);
            }
            Control::VerifyRequest {
                id,
                group,
                volume,
                chunk,
            } => self.handle_verify_request(id, &group, volume, chunk),
            Control::RepairRequest {
                id,
                group,
                volume,
                chunks,
            } => self.handle_repair_request(id, &group, volume, chunks),
            other => bail!("unexpected message from the replica: {other:?}"),
        }
        Ok(())
    }

    fn handle_ack(&mut self, group: &str, durable: Seq) -> Result<()> {
        if let Some(free) = self.window.handle_ack(group, durable)? {
            let g = self.group(group)?;
            // The spool forgets the batches before the waiters hear of the ack: a
            // sync woken by it (`wait_for_room`) sees the room it made.
            g.spool.ack(free);
            g.acked.send_replace(free);
            g.bump();
        }
        Ok(())
    }

    fn handle_nack(&mut self, group: Option<&str>, seq: Seq, reason: &str) -> Result<()> {
        // A nack the replica could not attribute (its header was unreadable) ends
        // the connection: the next one sends every unacknowledged batch again.
        if let Some(group) = group
            && self.window.has_group(group)
        {
            tracing::warn!(
                group,
                seq = seq.0,
                "the replica refused batch {seq}: {reason}; sending it again"
            );
        }
        // The window resends only batches of a group it knows, so `group` is named then.
        match (self.window.handle_nack(group, seq, reason)?, group) {
            (NackAction::Resend(seq), Some(group)) => {
                let bytes = self
                    .group(group)?
                    .spool
                    .get(seq)?
                    .ok_or_else(|| anyhow!("batch {seq} is missing from the spool"))?;
                self.sends.spawn(send_batch(self.conn.clone(), bytes));
            }
            (NackAction::Resend(_), None) | (NackAction::Ignore, _) => {}
        }
        Ok(())
    }

    fn handle_hash_reply(
        &mut self,
        group: String,
        volume: VolumeId,
        first_chunk: u64,
        hashes: &[String],
    ) {
        if let Some(reply) = self.hash_waiters.remove(&(group, volume, first_chunk)) {
            let parsed: Option<Vec<[u8; 32]>> = hashes.iter().map(|h| parse_hash(h)).collect();
            let _ = reply.send(parsed.ok_or_else(|| "a hash is not 64 hex digits".to_owned()));
        }
    }

    /// The replica cannot hash `volume` of `group`: every request waiting for it hears why.
    fn handle_hash_error(&mut self, group: &str, volume: VolumeId, reason: &str) {
        let keys: Vec<_> = self
            .hash_waiters
            .keys()
            .filter(|(g, v, _)| *g == group && *v == volume)
            .cloned()
            .collect();
        for k in keys {
            if let Some(reply) = self.hash_waiters.remove(&k) {
                let _ = reply.send(Err(reason.to_owned()));
            }
        }
    }

    /// Hashes `chunk` at a batch boundary in a task of its own; the answer goes back through
    /// the connection loop.
    fn handle_verify_request(&mut self, id: u64, group: &str, volume: VolumeId, chunk: u64) {
        let Some(g) = self.groups.get(group) else {
            let _ = self.replies.try_send(Control::VerifyRefused {
                id,
                reason: format!("no group {group} on this agent"),
            });
            return;
        };
        let g = g.clone();
        let replies = self.replies.clone();
        self.verifies.spawn(async move {
            let msg = match g.hash_chunk_at_boundary(volume, chunk).await {
                Ok((seq, hash)) => Control::VerifyReply {
                    id,
                    seq,
                    hash: hash.iter().map(|b| format!("{b:02x}")).collect(),
                },
                Err(reason) => Control::VerifyRefused { id, reason },
            };
            let _ = replies.send(msg).await;
        });
    }

    /// Marks `chunks` for repair in a task of its own (at most
    /// [`cdp_shared::wire::REPAIR_CHUNKS_PER_MESSAGE_MAX`]); the answer goes back through the
    /// connection loop.
    fn handle_repair_request(&mut self, id: u64, group: &str, volume: VolumeId, chunks: Vec<u64>) {
        let refuse = |reason: String| Control::RepairRefused { id, reason };
        let Some(g) = self.groups.get(group) else {
            let _ = self
                .replies
                .try_send(refuse(format!("no group {group} on this agent")));
            return;
        };
        if chunks.len() > cdp_shared::wire::REPAIR_CHUNKS_PER_MESSAGE_MAX {
            let _ = self.replies.try_send(refuse(format!(
                "{} chunks in one repair request (at most {})",
                chunks.len(),
                cdp_shared::wire::REPAIR_CHUNKS_PER_MESSAGE_MAX
            )));
            return;
        }
        let g = g.clone();
        let replies = self.replies.clone();
        self.verifies.spawn(async move {
            let msg = match g.repair_chunks(volume, &chunks).await {
                Ok(seq) => Control::RepairStarted { id, seq },
                Err(reason) => Control::RepairRefused { id, reason },
            };
            let _ = replies.send(msg).await;
        });
    }
}
