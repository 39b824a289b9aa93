//! The send window: each group's sealed batches go out (from memory as soon as they are
//! sealed, not after the spool has written them), each on its own unidirectional stream,
//! while at most `window` of them are unacknowledged.
//!
//! [`SendWindow`] is the window and the nack policy, sans-IO: the shell tells it how far each
//! group has sealed and what the replica answered, and asks it what to send next
//! ([`SendWindow::poll_send`]), what to send again ([`NackAction::Resend`]) and what the spool
//! may forget ([`SendWindow::handle_ack`]). [`send_window`] and [`send_batch`] are the quinn
//! shell.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use cdp_shared::Seq;
use tokio::task::JoinSet;

use crate::pipeline::Group;

/// A batch refused this many times in a row means something is wrong on this side: the
/// connection is restarted.
pub(super) const NACKS_IN_A_ROW_MAX: u32 = 5;

/// The send window of one connection, over all its groups (see the module doc).
#[derive(Debug)]
pub(super) struct SendWindow {
    /// Batches of a group unacknowledged at once, at most.
    window: u64,
    groups: BTreeMap<String, GroupWindow>,
}

/// A group's place in the send window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct GroupWindow {
    /// The next seq to send.
    next: Seq,
    /// The last seq acknowledged.
    acked: Seq,
    /// The newest seq sealed and queued in the spool.
    appended: Seq,
    /// Nacks since the last ack that moved the window.
    nacks_in_a_row: u32,
}

/// What a nack is answered with, when it does not end the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum NackAction {
    /// The batch is unacknowledged and was sent: send it again, now, outside the window (it is
    /// counted in it already).
    Resend(Seq),
    /// The batch is acknowledged already, or was never sent: nothing to send.
    Ignore,
}

/// An answer of the replica that ends the connection (the next one starts over from its
/// welcome, after the reconnect backoff, and sends every unacknowledged batch again).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(super) enum WindowError {
    #[error("ack for unknown group {group}")]
    AckForUnknownGroup { group: String },
    #[error("the replica acknowledged seq {seq} of group {group}, which was never sent")]
    AckedUnsent { group: String, seq: Seq },
    #[error(
        "the replica refused a batch it could not attribute ({reason}); reconnecting to send every unacknowledged batch again"
    )]
    UnattributedNack { reason: String },
    #[error(
        "the replica refused batches of group {group} {count} times in a row (last: seq {seq}: {reason})"
    )]
    NackedInARow {
        group: String,
        count: u32,
        seq: Seq,
        reason: String,
    },
}

impl SendWindow {
    /// A window of at most `window` unacknowledged batches per group, with no group yet.
    pub(super) fn new(window: usize) -> SendWindow {
        SendWindow {
            window: window as u64,
            groups: BTreeMap::new(),
        }
    }

    /// Adds a group the replica holds up to `durable` (its catch-up is done): the window sends
    /// from `durable + 1` once batches are appended that far.
    pub(super) fn add_group(&mut self, group: &str, durable: Seq) {
        self.groups.insert(
            group.to_owned(),
            GroupWindow {
                next: durable.next(),
                acked: durable,
                appended: durable,
                nacks_in_a_row: 0,
            },
        );
    }

    /// Takes `group` out of the window (the replica refuses it now): nothing more of it is
    /// sent, and acks of it are not expected.
    pub(super) fn remove_group(&mut self, group: &str) {
        self.groups.remove(group);
    }

    /// Whether `group` is one of the window's.
    pub(super) fn has_group(&self, group: &str) -> bool {
        self.groups.contains_key(group)
    }

    /// Batches of `group` are sealed and queued up to `appended`.
    pub(super) fn handle_appended(&mut self, group: &str, appended: Seq) {
        if let Some(g) = self.groups.get_mut(group) {
            g.appended = appended;
        }
    }

    /// The next batch to send, counted as sent: the groups in name order, each group's
    /// appended batches in seq order while fewer than `window` of them are unacknowledged.
    pub(super) fn poll_send(&mut self) -> Option<(String, Seq)> {
        let window = self.window;
        let (name, g) = self
            .groups
            .iter_mut()
            .find(|(_, g)| g.next <= g.appended && (g.next.0 - g.acked.0 - 1) < window)?;
        let seq = g.next;
        g.next = seq.next();
        Some((name.clone(), seq))
    }

    /// The replica made `group` durable up to `durable`. Returns the seq up to which the
    /// spool may forget its batches, when the ack moved the window (an older or repeated ack
    /// moves nothing). The shell frees the spool ([`crate::spool::Spool::ack`]) before it
    /// publishes the ack to the group's waiters, so a sync woken by it sees the room it made.
    pub(super) fn handle_ack(
        &mut self,
        group: &str,
        durable: Seq,
    ) -> Result<Option<Seq>, WindowError> {
        let g = self
            .groups
            .get_mut(group)
            .ok_or_else(|| WindowError::AckForUnknownGroup {
                group: group.to_owned(),
            })?;
        if durable <= g.acked {
            return Ok(None);
        }
        if durable >= g.next {
            return Err(WindowError::AckedUnsent {
                group: group.to_owned(),
                seq: durable,
            });
        }
        g.acked = durable;
        g.nacks_in_a_row = 0;
        Ok(Some(durable))
    }

    /// The replica refused batch `seq` of `group` for `reason`. A nack the replica could not
    /// attribute to a group of this connection, and more than [`NACKS_IN_A_ROW_MAX`] nacks of
    /// a group without an ack that moves its window, end the connection; otherwise an
    /// unacknowledged batch that was sent is sent again, and any other is ignored (each nack
    /// counts toward the limit all the same). There is no other back-off than the
    /// reconnect's.
    pub(super) fn handle_nack(
        &mut self,
        group: Option<&str>,
        seq: Seq,
        reason: &str,
    ) -> Result<NackAction, WindowError> {
        let Some((group, g)) = group.and_then(|n| self.groups.get_mut(n).map(|g| (n, g))) else {
            return Err(WindowError::UnattributedNack {
                reason: reason.to_owned(),
            });
        };
        g.nacks_in_a_row += 1;
        if g.nacks_in_a_row > NACKS_IN_A_ROW_MAX {
            return Err(WindowError::NackedInARow {
                group: group.to_owned(),
                count: g.nacks_in_a_row,
                seq,
                reason: reason.to_owned(),
            });
        }
        if seq > g.acked && seq < g.next {
            Ok(NackAction::Resend(seq))
        } else {
            Ok(NackAction::Ignore)
        }
    }
}

/// Sends what the window allows: for each group, the spooled batches after the last one sent,
/// while fewer than `window` are unacknowledged.
pub(super) fn send_window(
    window: &mut SendWindow,
    groups: &BTreeMap<String, Arc<Group>>,
    sends: &mut JoinSet<Result<()>>,
    conn: &quinn::Connection,
) -> Result<()> {
    for (name, g) in groups {
        window.handle_appended(name, g.spool.appended());
    }
    while let Some((name, seq)) = window.poll_send() {
        let g = groups
            .get(&name)
            .ok_or_else(|| anyhow!("the send window names an unknown group {name}"))?;
        let bytes = g
            .spool
            .get(seq)?
            .ok_or_else(|| anyhow!("batch {seq} of group {} is missing from the spool", g.name))?;
        g.sent_batches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        g.sent_bytes
            .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        sends.spawn(send_batch(conn.clone(), bytes));
    }
    Ok(())
}

pub(super) async fn send_batch(conn: quinn::Connection, bytes: bytes::Bytes) -> Result<()> {
    let mut stream = conn.open_uni().await.context("open a batch stream")?;
    stream.write_chunk(bytes).await.context("send a batch")?;
    stream.finish().context("finish a batch stream")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A window of `w` over groups `a` and `b`, both acknowledged up to `durable`.
    fn window(w: usize, durable: u64) -> SendWindow {
        let mut win = SendWindow::new(w);
        win.add_group("a", Seq(durable));
        win.add_group("b", Seq(durable));
        win
    }

    fn drain(win: &mut SendWindow) -> Vec<(String, u64)> {
        std::iter::from_fn(|| win.poll_send())
            .map(|(g, s)| (g, s.0))
            .collect()
    }

    fn sent(group: &str, seqs: std::ops::RangeInclusive<u64>) -> Vec<(String, u64)> {
        seqs.map(|s| (group.to_owned(), s)).collect()
    }

    #[test]
    fn sends_written_batches_in_seq_order_up_to_the_window() {
        let mut win = window(3, 4);
        assert_eq!(drain(&mut win), vec![], "nothing written past the ack");
        win.handle_appended("a", Seq(10));
        assert_eq!(drain(&mut win), sent("a", 5..=7));
        assert_eq!(drain(&mut win), vec![], "the window is full");
    }

    #[test]
    fn sends_nothing_past_what_the_spool_holds() {
        let mut win = window(32, 0);
        win.handle_appended("a", Seq(2));
        assert_eq!(drain(&mut win), sent("a", 1..=2));
        win.handle_appended("a", Seq(3));
        assert_eq!(drain(&mut win), sent("a", 3..=3));
    }

    #[test]
    fn groups_go_in_name_order_each_as_far_as_its_window_allows() {
        let mut win = window(2, 0);
        win.handle_appended("b", Seq(5));
        win.handle_appended("a", Seq(5));
        let mut want = sent("a", 1..=2);
        want.extend(sent("b", 1..=2));
        assert_eq!(drain(&mut win), want);
    }

    #[test]
    fn an_ack_opens_the_window_and_frees_the_spool_up_to_it() {
        let mut win = window(3, 0);
        win.handle_appended("a", Seq(10));
        assert_eq!(drain(&mut win), sent("a", 1..=3));
        assert_eq!(win.handle_ack("a", Seq(2)), Ok(Some(Seq(2))));
        assert_eq!(drain(&mut win), sent("a", 4..=5));
        // Group b's window is its own.
        assert_eq!(win.handle_ack("b", Seq(0)), Ok(None));
    }

    /// The past fault's part in the window: the ack that frees room reports it in the same
    /// call that moves the window, so the shell frees the spool before it tells the waiters
    /// (a sync in `wait_for_room`, woken by the ack or first looking after it, sees the room).
    #[test]
    fn an_ack_reports_the_room_it_frees_at_once() {
        let mut win = window(32, 0);
        win.handle_appended("a", Seq(8));
        assert_eq!(drain(&mut win), sent("a", 1..=8));
        assert_eq!(win.handle_ack("a", Seq(8)), Ok(Some(Seq(8))));
        // Nothing is left to free later, and nothing is freed twice.
        assert_eq!(win.handle_ack("a", Seq(8)), Ok(None));
        assert_eq!(drain(&mut win), vec![]);
    }

    #[test]
    fn an_older_or_repeated_ack_moves_nothing() {
        let mut win = window(32, 0);
        win.handle_appended("a", Seq(5));
        drain(&mut win);
        assert_eq!(win.handle_ack("a", Seq(4)), Ok(Some(Seq(4))));
        assert_eq!(win.handle_ack("a", Seq(4)), Ok(None));
        assert_eq!(win.handle_ack("a", Seq(2)), Ok(None));
        // The seq the connection started from counts as acknowledged.
        let mut win = window(32, 7);
        assert_eq!(win.handle_ack("a", Seq(7)), Ok(None));
    }

    #[test]
    fn an_ack_of_a_batch_never_sent_ends_the_connection() {
        let mut win = window(2, 0);
        win.handle_appended("a", Seq(5));
        assert_eq!(drain(&mut win), sent("a", 1..=2));
        let e = win.handle_ack("a", Seq(3)).expect_err("never sent");
        assert_eq!(
            e,
            WindowError::AckedUnsent {
                group: "a".into(),
                seq: Seq(3)
            }
        );
        assert_eq!(
            e.to_string(),
            "the replica acknowledged seq 3 of group a, which was never sent"
        );
    }

    #[test]
    fn an_ack_for_an_unknown_group_ends_the_connection() {
        let mut win = window(2, 0);
        let e = win.handle_ack("c", Seq(1)).expect_err("unknown");
        assert_eq!(e.to_string(), "ack for unknown group c");
    }

    #[test]
    fn a_nack_of_a_batch_in_flight_sends_it_again_outside_the_window() {
        let mut win = window(2, 0);
        win.handle_appended("a", Seq(5));
        assert_eq!(drain(&mut win), sent("a", 1..=2));
        assert_eq!(
            win.handle_nack(Some("a"), Seq(2), "bad hash"),
            Ok(NackAction::Resend(Seq(2)))
        );
        assert_eq!(
            win.handle_nack(Some("a"), Seq(1), "bad hash"),
            Ok(NackAction::Resend(Seq(1)))
        );
        // The window does not move: the resent batches are counted in it already.
        assert_eq!(drain(&mut win), vec![]);
    }

    #[test]
    fn a_nack_of_an_acknowledged_or_unsent_batch_is_ignored() {
        let mut win = window(2, 3);
        win.handle_appended("a", Seq(10));
        assert_eq!(drain(&mut win), sent("a", 4..=5));
        for seq in [2, 3, 6, 9] {
            assert_eq!(
                win.handle_nack(Some("a"), Seq(seq), "stale"),
                Ok(NackAction::Ignore),
                "seq {seq}"
            );
        }
    }

    #[test]
    fn more_than_five_nacks_in_a_row_end_the_connection() {
        let mut win = window(2, 0);
        win.handle_appended("a", Seq(5));
        drain(&mut win);
        for _ in 0..NACKS_IN_A_ROW_MAX {
            assert_eq!(
                win.handle_nack(Some("a"), Seq(1), "bad"),
                Ok(NackAction::Resend(Seq(1)))
            );
        }
        // Ignored nacks count too.
        let e = win
            .handle_nack(Some("a"), Seq(9), "bad")
            .expect_err("too many");
        assert_eq!(
            e.to_string(),
            "the replica refused batches of group a 6 times in a row (last: seq 9: bad)"
        );
    }

    #[test]
    fn an_ack_that_moves_the_window_resets_the_nack_count() {
        let mut win = window(2, 0);
        win.handle_appended("a", Seq(5));
        drain(&mut win);
        for _ in 0..NACKS_IN_A_ROW_MAX {
            win.handle_nack(Some("a"), Seq(2), "bad").expect("resend");
        }
        // A repeated ack does not reset it; one that moves the window does.
        assert_eq!(win.handle_ack("a", Seq(0)), Ok(None));
        assert_eq!(win.handle_ack("a", Seq(1)), Ok(Some(Seq(1))));
        for _ in 0..NACKS_IN_A_ROW_MAX {
            assert_eq!(
                win.handle_nack(Some("a"), Seq(2), "bad"),
                Ok(NackAction::Resend(Seq(2)))
            );
        }
        assert!(win.handle_nack(Some("a"), Seq(2), "bad").is_err());
        // The count is per group.
        assert_eq!(
            win.handle_nack(Some("b"), Seq(1), "bad"),
            Ok(NackAction::Ignore)
        );
    }

    #[test]
    fn a_nack_the_replica_could_not_attribute_ends_the_connection() {
        let mut win = window(2, 0);
        assert!(!win.has_group(""));
        let e = win
            .handle_nack(None, Seq(0), "unreadable header")
            .expect_err("unattributed");
        assert_eq!(
            e.to_string(),
            "the replica refused a batch it could not attribute (unreadable header); reconnecting to send every unacknowledged batch again"
        );
    }
}
