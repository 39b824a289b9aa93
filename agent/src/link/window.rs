//! The send window: each group's spooled batches go out, each on its own unidirectional
//! stream, while at most `window` of them are unacknowledged.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use cdp_shared::Seq;
use tokio::task::JoinSet;

use crate::pipeline::Group;

/// A group's place in the send window: the next seq to send and the last one acknowledged.
pub(super) struct GroupSend {
    pub(super) group: Arc<Group>,
    pub(super) next: Seq,
    pub(super) acked: Seq,
    pub(super) nacks_in_a_row: u32,
}

/// Sends what the window allows: for each group, the spooled batches after the last one sent,
/// while fewer than `window` are unacknowledged. `corrupt` is the test-only fault injection
/// of [`SenderConfig::corrupt_seq_once`].
///
/// [`SenderConfig::corrupt_seq_once`]: super::SenderConfig::corrupt_seq_once
pub(super) fn send_window(
    state: &mut BTreeMap<String, GroupSend>,
    sends: &mut JoinSet<Result<()>>,
    conn: &quinn::Connection,
    window: usize,
    corrupt: &mut Option<u64>,
) -> Result<()> {
    for s in state.values_mut() {
        let written = s.group.spool.written();
        while s.next <= written && (s.next.0 - s.acked.0 - 1) < window as u64 {
            let seq = s.next;
            let bytes = s.group.spool.get(seq)?.ok_or_else(|| {
                anyhow!(
                    "batch {seq} of group {} is missing from the spool",
                    s.group.name
                )
            })?;
            let bytes = if *corrupt == Some(seq.0) {
                *corrupt = None;
                // The last byte lies in the payload (or the header hash of an empty
                // batch): the header stays readable, so the refusal names the batch.
                let mut v = bytes.to_vec();
                let at = v.len() - 1;
                v[at] ^= 0x10;
                tracing::warn!(
                    seq = seq.0,
                    "fault injection: sending a corrupted copy of this batch"
                );
                bytes::Bytes::from(v)
            } else {
                bytes
            };
            sends.spawn(send_batch(conn.clone(), bytes));
            s.next = s.next.next();
        }
    }
    Ok(())
}

pub(super) async fn send_batch(conn: quinn::Connection, bytes: bytes::Bytes) -> Result<()> {
    let mut stream = conn.open_uni().await.context("open a batch stream")?;
    stream.write_chunk(bytes).await.context("send a batch")?;
    stream.finish().context("finish a batch stream")?;
    Ok(())
}
