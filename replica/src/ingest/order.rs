//! The reorder buffer of one group's ingest (sans-IO): the batches that arrived ahead of the
//! journal's head wait here, bounded, until the gap before them fills; a group commit then
//! takes the run that follows the head.
//!
//! [`ReorderBuffer`] owns the waiting batches and their byte count and answers with what the
//! caller is to do ([`Offer`]); it never touches the catalog, the journal or a connection. A
//! duplicate (seq ≤ head) is handed back: only the caller can compare it with the catalog's
//! header hash and ack or refuse it.

use cdp_shared::types::Seq;
use std::collections::BTreeMap;

use cdp_shared::batch::Hash;

use super::{PENDING_BATCHES_MAX, PENDING_BYTES_MAX};

/// A batch as the reorder buffer sees it.
pub(super) trait Ordered {
    /// The batch's seq.
    fn seq(&self) -> Seq;
    /// The batch's header hash: two batches with the same seq and the same header hash are the
    /// same batch.
    fn header_hash(&self) -> Hash;
    /// The bytes the batch holds while it waits (constant for one batch).
    fn byte_len(&self) -> usize;
    /// The same batch arrived again (`again`) while this one waits: take what is new in it —
    /// where its replies go. The byte length stays.
    fn refresh(&mut self, again: Self);
}

/// What became of a batch offered to the buffer.
#[derive(Debug)]
pub(super) enum Offer<T> {
    /// seq ≤ head: already durable (or conflicting). The batch is handed back; the caller
    /// checks its header hash against the catalog's and acks or refuses it.
    Duplicate(T),
    /// The same batch (same seq and header hash) was waiting: it was refreshed (its reply
    /// channel replaced); the byte count is unchanged.
    Refreshed,
    /// A different batch with the same seq was waiting: the agent's newer chain (after a
    /// rebase) replaced it, and the byte count now counts the new one. The old one is handed
    /// back (to be dropped; nothing waiting has been acknowledged).
    Replaced(T),
    /// The batch waits for the gap before it.
    Held,
    /// The batch cannot wait (a bound is reached); it is handed back with why.
    Refused(T, Refusal),
}

/// Which bound refused a batch (the first that holds, in this order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Bound {
    /// seq > head + [`PENDING_BATCHES_MAX`].
    Distance,
    /// [`PENDING_BATCHES_MAX`] batches already wait.
    Count,
    /// Its bytes would take the waiting bytes over [`PENDING_BYTES_MAX`].
    Bytes,
}

/// Why a batch cannot wait.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Refusal {
    /// The refused batch's seq.
    pub(super) seq: Seq,
    /// The journal's durable head when it was refused.
    pub(super) head: Seq,
    /// How many batches were waiting.
    pub(super) waiting: usize,
    /// The group's pause reason, when it is paused by a full disk.
    pub(super) paused: Option<String>,
    /// The bound that refused it.
    pub(super) bound: Bound,
}

impl Refusal {
    /// The refusal as the one sentence of a `Nack` for a batch of `group`.
    pub(super) fn reason(&self, group: &str) -> String {
        let seq = self.seq;
        match &self.paused {
            Some(paused) => format!(
                "batch {seq} cannot wait: ingest of group {group} is paused ({paused}) and {} batches already wait; send it again after Resumed",
                self.waiting
            ),
            None => format!(
                "batch {seq} is too far ahead of the journal (durable up to {}); send the missing batches first",
                self.head
            ),
        }
    }
}

/// The batches of one group waiting for the journal's head to reach them, by seq, and their
/// bytes. Bounded by [`PENDING_BATCHES_MAX`] batches, [`PENDING_BYTES_MAX`] bytes and a seq at
/// most head + [`PENDING_BATCHES_MAX`].
#[derive(Debug)]
pub(super) struct ReorderBuffer<T> {
    waiting: BTreeMap<Seq, T>,
    /// The sum of `byte_len` over `waiting`.
    bytes: usize,
}

impl<T> Default for ReorderBuffer<T> {
    fn default() -> Self {
        ReorderBuffer {
            waiting: BTreeMap::new(),
            bytes: 0,
        }
    }
}

impl<T: Ordered> ReorderBuffer<T> {
    /// An empty buffer.
    pub(super) fn new() -> Self {
        Self::default()
    }

    /// Offers a batch that arrived while the journal's durable head is `head`; `paused` is the
    /// group's pause reason, if it is paused (it goes into a refusal).
    pub(super) fn offer(&mut self, item: T, head: Seq, paused: Option<&str>) -> Offer<T> {
        let seq = item.seq();
        if seq <= head {
            return Offer::Duplicate(item);
        }
        if let Some(w) = self.waiting.get_mut(&seq) {
            if w.header_hash() == item.header_hash() {
                let len = w.byte_len();
                w.refresh(item);
                debug_assert_eq!(w.byte_len(), len, "a refresh keeps the byte length");
                return Offer::Refreshed;
            }
            self.bytes = self.bytes - w.byte_len() + item.byte_len();
            return Offer::Replaced(std::mem::replace(w, item));
        }
        let bound = if seq.0 > head.0 + PENDING_BATCHES_MAX as u64 {
            Some(Bound::Distance)
        } else if self.len() >= PENDING_BATCHES_MAX {
            Some(Bound::Count)
        } else if self.bytes() + item.byte_len() > PENDING_BYTES_MAX {
            Some(Bound::Bytes)
        } else {
            None
        };
        if let Some(bound) = bound {
            let refusal = Refusal {
                seq,
                head,
                waiting: self.len(),
                paused: paused.map(str::to_owned),
                bound,
            };
            return Offer::Refused(item, refusal);
        }
        self.bytes += item.byte_len();
        self.waiting.insert(seq, item);
        Offer::Held
    }

    /// Drops the batches with seq ≤ `head` (durable already, e.g. found so by a reload).
    pub(super) fn drop_through(&mut self, head: Seq) {
        let keep = self.waiting.split_off(&Seq(head.0.saturating_add(1)));
        for dropped in std::mem::replace(&mut self.waiting, keep).into_values() {
            self.bytes -= dropped.byte_len();
        }
    }

    /// Takes the run of batches head + 1, head + 2, … that are waiting, in seq order, while
    /// their bytes stay within `max_bytes` — but always the first one when it is there. Stops
    /// at the first gap.
    pub(super) fn take_in_order(&mut self, head: Seq, max_bytes: usize) -> Vec<T> {
        let mut run = Vec::new();
        let mut bytes = 0usize;
        let mut next = head.next();
        while let Some(w) = self.waiting.get(&next) {
            if !run.is_empty() && bytes + w.byte_len() > max_bytes {
                break;
            }
            let Some(w) = self.waiting.remove(&next) else {
                break;
            };
            self.bytes -= w.byte_len();
            bytes += w.byte_len();
            next = next.next();
            run.push(w);
        }
        run
    }

    /// Puts a taken batch back, as it was (a commit that took it was undone, or a batch before
    /// it was refused). No bound applies: it was within them when it was offered.
    pub(super) fn put_back(&mut self, item: T) {
        self.bytes += item.byte_len();
        if let Some(old) = self.waiting.insert(item.seq(), item) {
            self.bytes -= old.byte_len();
        }
    }

    /// Batch head + 1 is waiting: a commit can go ahead.
    pub(super) fn next_ready(&self, head: Seq) -> bool {
        self.waiting.contains_key(&head.next())
    }

    /// Drops every waiting batch (the group is fenced).
    pub(super) fn clear(&mut self) {
        self.waiting.clear();
        self.bytes = 0;
    }

    /// How many batches wait.
    pub(super) fn len(&self) -> usize {
        self.waiting.len()
    }

    /// The bytes of the batches waiting.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A batch without a channel: `reply` stands for where its replies go.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Item {
        seq: Seq,
        hash: u8,
        len: usize,
        reply: u32,
    }

    impl Ordered for Item {
        fn seq(&self) -> Seq {
            self.seq
        }
        fn header_hash(&self) -> Hash {
            [self.hash; 32]
        }
        fn byte_len(&self) -> usize {
            self.len
        }
        fn refresh(&mut self, again: Self) {
            self.reply = again.reply;
        }
    }

    fn item(seq: u64, len: usize) -> Item {
        Item {
            seq: Seq(seq),
            hash: 1,
            len,
            reply: 0,
        }
    }

    fn held_sum(b: &ReorderBuffer<Item>) -> usize {
        b.waiting.values().map(|i| i.len).sum()
    }

    fn seqs(items: &[Item]) -> Vec<u64> {
        items.iter().map(|i| i.seq.0).collect()
    }

    #[test]
    fn a_batch_at_or_below_the_head_is_handed_back_as_a_duplicate() {
        let mut b = ReorderBuffer::new();
        for seq in [1, 9, 10] {
            match b.offer(item(seq, 100), Seq(10), None) {
                Offer::Duplicate(i) => assert_eq!(i.seq, Seq(seq)),
                other => panic!("seq {seq}: {other:?}"),
            }
        }
        assert_eq!((b.len(), b.bytes()), (0, 0));
        assert!(matches!(b.offer(item(11, 100), Seq(10), None), Offer::Held));
    }

    #[test]
    fn the_same_batch_resent_while_waiting_replaces_its_reply_not_its_bytes() {
        let mut b = ReorderBuffer::new();
        assert!(matches!(b.offer(item(12, 100), Seq(10), None), Offer::Held));
        let again = Item {
            reply: 7,
            ..item(12, 100)
        };
        assert!(matches!(b.offer(again, Seq(10), None), Offer::Refreshed));
        assert_eq!((b.len(), b.bytes()), (1, 100));
        let run = b.take_in_order(Seq(11), usize::MAX);
        assert_eq!(
            run,
            vec![Item {
                reply: 7,
                ..item(12, 100)
            }]
        );
    }

    #[test]
    fn a_newer_chains_batch_replaces_the_waiting_one_and_its_bytes() {
        let mut b = ReorderBuffer::new();
        assert!(matches!(b.offer(item(12, 100), Seq(10), None), Offer::Held));
        assert!(matches!(b.offer(item(13, 50), Seq(10), None), Offer::Held));
        let newer = Item {
            hash: 2,
            len: 300,
            reply: 5,
            seq: Seq(12),
        };
        match b.offer(newer.clone(), Seq(10), None) {
            Offer::Replaced(old) => assert_eq!(old, item(12, 100)),
            other => panic!("{other:?}"),
        }
        assert_eq!((b.len(), b.bytes()), (2, 350));
        assert_eq!(b.bytes(), held_sum(&b));
        // Smaller again: the count goes down, too.
        let smaller = Item {
            hash: 3,
            len: 10,
            ..newer.clone()
        };
        assert!(matches!(b.offer(smaller, Seq(10), None), Offer::Replaced(o) if o == newer));
        assert_eq!((b.len(), b.bytes()), (2, 60));
        assert_eq!(seqs(&b.take_in_order(Seq(11), usize::MAX)), vec![12, 13]);
        assert_eq!(b.bytes(), 0);
    }

    #[test]
    fn the_count_bound_refuses_one_batch_more() {
        let max = PENDING_BATCHES_MAX as u64;
        let mut b = ReorderBuffer::new();
        // Offered while the head was `max`: batches max+1 ..= 2*max wait.
        for seq in max + 1..=2 * max {
            assert!(matches!(b.offer(item(seq, 1), Seq(max), None), Offer::Held));
        }
        assert_eq!(b.len(), PENDING_BATCHES_MAX);
        // Within the distance bound of head 1, not waiting, but the count is full.
        match b.offer(item(2, 1), Seq(1), None) {
            Offer::Refused(i, r) => {
                assert_eq!(i.seq, Seq(2));
                assert_eq!(r.bound, Bound::Count);
                assert_eq!(r.waiting, PENDING_BATCHES_MAX);
                assert_eq!(
                    r.reason("g"),
                    "batch 2 is too far ahead of the journal (durable up to 1); send the missing batches first"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            (b.len(), b.bytes()),
            (PENDING_BATCHES_MAX, PENDING_BATCHES_MAX)
        );
    }

    #[test]
    fn the_bytes_bound_refuses_what_would_go_over_it() {
        let mut b = ReorderBuffer::new();
        let half = PENDING_BYTES_MAX / 2;
        assert!(matches!(b.offer(item(3, half), Seq(1), None), Offer::Held));
        assert!(matches!(
            b.offer(item(4, half - 10), Seq(1), None),
            Offer::Held
        ));
        match b.offer(item(5, 11), Seq(1), Some("disk full")) {
            Offer::Refused(i, r) => {
                assert_eq!(i.seq, Seq(5));
                assert_eq!(r.bound, Bound::Bytes);
                assert_eq!(
                    r.reason("db"),
                    "batch 5 cannot wait: ingest of group db is paused (disk full) and 2 batches already wait; send it again after Resumed"
                );
            }
            other => panic!("{other:?}"),
        }
        // Exactly up to the bound fits.
        assert!(matches!(b.offer(item(5, 10), Seq(1), None), Offer::Held));
        assert_eq!(b.bytes(), PENDING_BYTES_MAX);
        assert_eq!(b.bytes(), held_sum(&b));
    }

    #[test]
    fn the_distance_bound_refuses_a_batch_too_far_ahead_with_or_without_a_pause() {
        let max = PENDING_BATCHES_MAX as u64;
        let mut b = ReorderBuffer::new();
        assert!(matches!(
            b.offer(item(10 + max, 1), Seq(10), None),
            Offer::Held
        ));
        match b.offer(item(11 + max, 1), Seq(10), None) {
            Offer::Refused(i, r) => {
                assert_eq!(i.seq, Seq(11 + max));
                assert_eq!(r.bound, Bound::Distance);
                assert_eq!(r.paused, None);
                assert_eq!(
                    r.reason("g"),
                    format!(
                        "batch {} is too far ahead of the journal (durable up to 10); send the missing batches first",
                        11 + max
                    )
                );
            }
            other => panic!("{other:?}"),
        }
        match b.offer(item(11 + max, 1), Seq(10), Some("no space left on device")) {
            Offer::Refused(_, r) => {
                assert_eq!(r.bound, Bound::Distance);
                assert_eq!(
                    r.reason("g"),
                    format!(
                        "batch {} cannot wait: ingest of group g is paused (no space left on device) and 1 batches already wait; send it again after Resumed",
                        11 + max
                    )
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!((b.len(), b.bytes()), (1, 1));
    }

    #[test]
    fn take_in_order_stops_at_a_gap() {
        let mut b = ReorderBuffer::new();
        for seq in [11, 12, 14, 15] {
            assert!(matches!(b.offer(item(seq, 10), Seq(10), None), Offer::Held));
        }
        assert!(b.next_ready(Seq(10)));
        assert_eq!(seqs(&b.take_in_order(Seq(10), usize::MAX)), vec![11, 12]);
        assert_eq!((b.len(), b.bytes()), (2, 20));
        // Nothing follows head 12 yet.
        assert!(!b.next_ready(Seq(12)));
        assert!(b.take_in_order(Seq(12), usize::MAX).is_empty());
        assert!(matches!(b.offer(item(13, 10), Seq(12), None), Offer::Held));
        assert_eq!(
            seqs(&b.take_in_order(Seq(12), usize::MAX)),
            vec![13, 14, 15]
        );
        assert_eq!((b.len(), b.bytes()), (0, 0));
    }

    #[test]
    fn take_in_order_stops_at_max_bytes_but_takes_at_least_one() {
        let mut b = ReorderBuffer::new();
        for (seq, len) in [(1, 40), (2, 40), (3, 30), (4, 10)] {
            assert!(matches!(b.offer(item(seq, len), Seq(0), None), Offer::Held));
        }
        // 40 + 40 = 80 ≤ 100, + 30 > 100.
        assert_eq!(seqs(&b.take_in_order(Seq(0), 100)), vec![1, 2]);
        // One batch over the limit is still taken, alone.
        assert_eq!(seqs(&b.take_in_order(Seq(2), 5)), vec![3]);
        assert_eq!(seqs(&b.take_in_order(Seq(3), 10)), vec![4]);
        assert_eq!(b.bytes(), 0);
    }

    #[test]
    fn put_back_restores_what_was_taken() {
        let mut b = ReorderBuffer::new();
        for seq in 1..=3 {
            assert!(matches!(
                b.offer(item(seq, seq as usize), Seq(0), None),
                Offer::Held
            ));
        }
        let run = b.take_in_order(Seq(0), usize::MAX);
        assert_eq!((b.len(), b.bytes()), (0, 0));
        for i in run {
            b.put_back(i);
        }
        assert_eq!((b.len(), b.bytes()), (3, 6));
        assert!(b.next_ready(Seq(0)));
        assert_eq!(seqs(&b.take_in_order(Seq(0), usize::MAX)), vec![1, 2, 3]);
    }

    #[test]
    fn drop_through_after_a_reload_drops_what_is_durable() {
        let mut b = ReorderBuffer::new();
        for seq in [12, 13, 15, 20] {
            assert!(matches!(
                b.offer(item(seq, 100), Seq(10), None),
                Offer::Held
            ));
        }
        // A reload found head 15 (another connection's batches got there first).
        b.drop_through(Seq(15));
        assert_eq!((b.len(), b.bytes()), (1, 100));
        assert!(!b.next_ready(Seq(15)));
        b.drop_through(Seq(15));
        assert_eq!(b.len(), 1);
        b.drop_through(Seq(u64::MAX));
        assert_eq!((b.len(), b.bytes()), (0, 0));
    }

    #[test]
    fn clear_on_fence_drops_everything() {
        let mut b = ReorderBuffer::new();
        for seq in [2, 3, 9] {
            assert!(matches!(b.offer(item(seq, 100), Seq(1), None), Offer::Held));
        }
        b.clear();
        assert_eq!((b.len(), b.bytes()), (0, 0));
        assert!(!b.next_ready(Seq(1)));
        // And it takes batches again afterwards.
        assert!(matches!(b.offer(item(2, 5), Seq(1), None), Offer::Held));
        assert_eq!(b.bytes(), 5);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Offer { ahead: u64, hash: u8, len: usize },
        Advance(u64),
        Take(usize),
        PutBack,
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..PENDING_BATCHES_MAX as u64 + 8, 0u8..3, 0..PENDING_BYTES_MAX / 8)
                .prop_map(|(ahead, hash, len)| Op::Offer { ahead, hash, len }),
            1 => (0u64..6).prop_map(Op::Advance),
            2 => (0..PENDING_BYTES_MAX / 4).prop_map(Op::Take),
            1 => Just(Op::PutBack),
            1 => Just(Op::Clear),
        ]
    }

    proptest! {
        /// Whatever happens to it, the buffer's byte count is the sum of what it holds, and
        /// nothing it holds is at or below the head after `drop_through`.
        #[test]
        fn the_byte_count_is_always_the_sum_of_the_held_batches(
            ops in proptest::collection::vec(op(), 1..200)
        ) {
            let mut b = ReorderBuffer::new();
            let mut head = 0u64;
            let mut taken: Vec<Item> = Vec::new();
            for op in ops {
                match op {
                    Op::Offer { ahead, hash, len } => {
                        let i = Item { seq: Seq(head + ahead), hash, len, reply: 0 };
                        let (count, before) = (b.len(), b.bytes());
                        match b.offer(i, Seq(head), None) {
                            Offer::Duplicate(_) => prop_assert_eq!(ahead, 0),
                            Offer::Refreshed | Offer::Refused(_, _) => {
                                prop_assert_eq!((b.len(), b.bytes()), (count, before));
                            }
                            Offer::Replaced(old) => {
                                prop_assert_eq!(b.len(), count);
                                prop_assert_eq!(b.bytes(), before - old.len + len);
                            }
                            Offer::Held => {
                                prop_assert!(count < PENDING_BATCHES_MAX);
                                prop_assert!(ahead <= PENDING_BATCHES_MAX as u64);
                                prop_assert!(before + len <= PENDING_BYTES_MAX);
                            }
                        }
                    }
                    Op::Advance(n) => {
                        head += n;
                        b.drop_through(Seq(head));
                        taken.retain(|i| i.seq > Seq(head));
                        prop_assert!(b.waiting.keys().all(|s| *s > Seq(head)));
                    }
                    Op::Take(max) => {
                        let run = b.take_in_order(Seq(head), max);
                        let total: usize = run.iter().map(|i| i.len).sum();
                        prop_assert!(run.len() <= 1 || total <= max);
                        prop_assert!(!b.next_ready(Seq(head)));
                        for (k, i) in run.iter().enumerate() {
                            prop_assert_eq!(i.seq, Seq(head + 1 + k as u64));
                        }
                        taken.extend(run);
                    }
                    Op::PutBack => {
                        if let Some(i) = taken.pop() {
                            b.put_back(i);
                        }
                    }
                    Op::Clear => {
                        b.clear();
                        taken.clear();
                    }
                }
                prop_assert_eq!(b.bytes(), held_sum(&b));
            }
        }
    }
}
