//! What the replica's control messages are answered with: acks and nacks move the send
//! window, hash replies go to the waiting hash request, pause notices to the link state, and
//! the verifier's questions (`VerifyRequest`) and repairs (`RepairRequest`) to the group, their
//! answers written back by the connection loop.

use std::collections::BTreeMap;

use anyhow::{Result, anyhow, bail};
use cdp_shared::Seq;
use cdp_shared::wire::Control;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::window::{GroupSend, send_batch};
use super::{HashWaiters, NACKS_IN_A_ROW_MAX, SharedLink, parse_hash};

pub(super) struct Ctx<'a> {
    pub(super) state: &'a mut BTreeMap<String, GroupSend>,
    pub(super) conn: &'a quinn::Connection,
    pub(super) sends: &'a mut JoinSet<Result<()>>,
    pub(super) link: &'a SharedLink,
    pub(super) hash_waiters: &'a mut HashWaiters,
    /// Answers to the replica's verify requests, written by the connection loop.
    pub(super) replies: mpsc::Sender<Control>,
    pub(super) verifies: &'a mut JoinSet<()>,
}

impl Ctx<'_> {
    pub(super) fn handle(&mut self, msg: Control) -> Result<()> {
        match msg {
            Control::Ack { group, durable } => {
                let s = self
                    .state
                    .get_mut(&group)
                    .ok_or_else(|| anyhow!("ack for unknown group {group}"))?;
                let durable = Seq(durable);
                if durable > s.acked {
                    if durable >= s.next {
                        bail!(
                            "the replica acknowledged seq {durable} of group {group}, which was never sent"
                        );
                    }
                    s.acked = durable;
                    s.nacks_in_a_row = 0;
                    s.group.spool.ack(durable);
                    s.group.acked.send_replace(durable);
                    s.group.bump();
                }
            }
            Control::Nack { group, seq, reason } => {
                let Some(s) = self.state.get_mut(&group) else {
                    // The replica could not tell which batch it refused (its header was
                    // unreadable): start over, which sends every unacknowledged batch again.
                    bail!(
                        "the replica refused a batch it could not attribute ({reason}); reconnecting to send every unacknowledged batch again"
                    );
                };
                tracing::warn!(
                    group,
                    seq,
                    "the replica refused batch {seq}: {reason}; sending it again"
                );
                s.nacks_in_a_row += 1;
                if s.nacks_in_a_row > NACKS_IN_A_ROW_MAX {
                    bail!(
                        "the replica refused batches of group {group} {} times in a row (last: seq {seq}: {reason})",
                        s.nacks_in_a_row
                    );
                }
                let seq = Seq(seq);
                if seq > s.acked && seq < s.next {
                    let bytes = s
                        .group
                        .spool
                        .get(seq)?
                        .ok_or_else(|| anyhow!("batch {seq} is missing from the spool"))?;
                    self.sends.spawn(send_batch(self.conn.clone(), bytes));
                }
            }
            Control::HashReply {
                group,
                volume,
                seq: _,
                first_chunk,
                hashes,
            } => {
                if let Some(reply) = self.hash_waiters.remove(&(group, volume, first_chunk)) {
                    let parsed: Option<Vec<[u8; 32]>> =
                        hashes.iter().map(|h| parse_hash(h)).collect();
                    let _ =
                        reply.send(parsed.ok_or_else(|| "a hash is not 64 hex digits".to_owned()));
                }
            }
            Control::HashError {
                group,
                volume,
                reason,
            } => {
                let keys: Vec<_> = self
                    .hash_waiters
                    .keys()
                    .filter(|(g, v, _)| *g == group && *v == volume)
                    .cloned()
                    .collect();
                for k in keys {
                    if let Some(reply) = self.hash_waiters.remove(&k) {
                        let _ = reply.send(Err(reason.clone()));
                    }
                }
            }
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
            } => {
                let Some(s) = self.state.get(&group) else {
                    let _ = self.replies.try_send(Control::VerifyRefused {
                        id,
                        reason: format!("no group {group} on this agent"),
                    });
                    return Ok(());
                };
                let g = s.group.clone();
                let replies = self.replies.clone();
                self.verifies.spawn(async move {
                    let msg = match g.hash_chunk_at_boundary(volume, chunk).await {
                        Ok((seq, hash)) => Control::VerifyReply {
                            id,
                            seq: seq.0,
                            hash: hash.iter().map(|b| format!("{b:02x}")).collect(),
                        },
                        Err(reason) => Control::VerifyRefused { id, reason },
                    };
                    let _ = replies.send(msg).await;
                });
            }
            Control::RepairRequest {
                id,
                group,
                volume,
                chunks,
            } => {
                let refuse = |reason: String| Control::RepairRefused { id, reason };
                let Some(s) = self.state.get(&group) else {
                    let _ = self
                        .replies
                        .try_send(refuse(format!("no group {group} on this agent")));
                    return Ok(());
                };
                if chunks.len() > cdp_shared::wire::REPAIR_CHUNKS_PER_MESSAGE_MAX {
                    let _ = self.replies.try_send(refuse(format!(
                        "{} chunks in one repair request (at most {})",
                        chunks.len(),
                        cdp_shared::wire::REPAIR_CHUNKS_PER_MESSAGE_MAX
                    )));
                    return Ok(());
                }
                let g = s.group.clone();
                let replies = self.replies.clone();
                self.verifies.spawn(async move {
                    let msg = match g.repair_chunks(volume, &chunks).await {
                        Ok(seq) => Control::RepairStarted { id, seq: seq.0 },
                        Err(reason) => Control::RepairRefused { id, reason },
                    };
                    let _ = replies.send(msg).await;
                });
            }
            other => bail!("unexpected message from the replica: {other:?}"),
        }
        Ok(())
    }
}
