//! What the replica's control messages are answered with: acks and nacks move the send
//! window, hash replies go to the waiting hash request, pause notices to the link state, and
//! the verifier's questions (`VerifyRequest`) and repairs (`RepairRequest`) to the group, their
//! answers written back by the connection loop.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Result, anyhow, bail};
use cdp_shared::Seq;
use cdp_shared::types::VolumeId;
use cdp_shared::wire::{Control, GroupRefused, GroupWelcome};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::window::{NackAction, SendWindow, send_batch};
use super::{
    HashWaiters, SharedLink, group_hello, join_window, parse_hash, primary_of, set_refused,
};
use crate::pipeline::Group;
use cdp_shared::cause::Primary;

pub(super) struct Ctx<'a> {
    pub(super) window: &'a mut SendWindow,
    /// The groups of the connection, by name: the window's, and those the replica refuses
    /// (fenced: out of the window until they join again).
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
            Control::Fenced(refused) => self.handle_fenced(refused),
            Control::Rejoin { group } => self.handle_rejoin(&group),
            Control::Joined { group } => self.handle_joined(&group)?,
            other => bail!("unexpected message from the replica: {other:?}"),
        }
        Ok(())
    }

    /// The replica refuses `refused.name` from now on (it was failed over there): the group
    /// leaves the window and keeps spooling; its other groups go on.
    fn handle_fenced(&mut self, refused: GroupRefused) {
        if !self.groups.contains_key(&refused.name) {
            tracing::debug!(group = %refused.name, "ignored a fence of a group not on this connection");
            return;
        }
        self.window.remove_group(&refused.name);
        if let Some(g) = self.groups.get(&refused.name) {
            g.set_primary(primary_of(Some(&refused)));
        }
        set_refused(self.link, std::slice::from_ref(&refused));
    }

    /// The replica says a refused group may replicate again: it is announced once more
    /// (`Join`, written by the connection loop).
    fn handle_rejoin(&mut self, group: &str) {
        let Some(g) = self.groups.get(group) else {
            tracing::debug!(group, "ignored a rejoin of a group not on this connection");
            return;
        };
        if self.window.has_group(group) {
            return;
        }
        tracing::info!(
            group,
            "the replica accepts group {group} again: announcing it"
        );
        let _ = self.replies.try_send(Control::Join {
            group: group_hello(g),
        });
    }

    /// The replica admitted a group again: it catches up like at a Welcome and rejoins the
    /// window.
    fn handle_joined(&mut self, w: &GroupWelcome) -> Result<()> {
        let g = self.group(&w.name)?.clone();
        if self.window.has_group(&w.name) {
            bail!("the replica admitted group {} twice", w.name);
        }
        join_window(self.window, &g, w)?;
        g.set_primary(Primary::Agent);
        self.link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .refused
            .remove(&w.name);
        tracing::info!(
            group = %w.name,
            durable = w.durable.0,
            "group {} replicates again, from seq {}",
            w.name,
            w.durable.next()
        );
        g.wake.send_modify(|v| *v += 1);
        g.bump();
        Ok(())
    }

    fn handle_ack(&mut self, group: &str, durable: Seq) -> Result<()> {
        if !self.window.has_group(group) && self.groups.contains_key(group) {
            // Committed before the group was fenced; its Join's Welcome says it again.
            tracing::debug!(
                group,
                durable = durable.0,
                "ignored an ack of a fenced group"
            );
            return Ok(());
        }
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
            && !self.window.has_group(group)
            && self.groups.contains_key(group)
        {
            tracing::debug!(
                group,
                seq = seq.0,
                "ignored a nack of a fenced group: {reason}"
            );
            return Ok(());
        }
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
