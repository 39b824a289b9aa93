//! Range lock giving write-order fidelity: operations on overlapping byte ranges of a volume
//! take effect in the order they were admitted; operations on disjoint ranges run in parallel.
//!
//! Admission is synchronous (under the caller's lock) and returns the latches of every earlier
//! overlapping operation still in flight; the caller waits for them, does its I/O, then
//! releases its own ticket, which fires its latch.

use std::collections::BTreeMap;

use tokio_util::sync::CancellationToken;

/// A one-shot event: fired once, awaited by any number of waiters.
#[derive(Clone, Debug, Default)]
pub struct Latch(CancellationToken);

impl Latch {
    pub fn fire(&self) {
        self.0.cancel();
    }
    pub async fn wait(&self) {
        self.0.cancelled().await
    }
    pub fn is_fired(&self) -> bool {
        self.0.is_cancelled()
    }
}

/// Identifies an admitted operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(u64);

struct Entry {
    start: u64,
    end: u64,
    latch: Latch,
}

#[derive(Default)]
pub struct RangeLock {
    entries: BTreeMap<Ticket, Entry>,
    next: u64,
}

impl RangeLock {
    pub fn new() -> RangeLock {
        RangeLock::default()
    }

    /// Admits an operation on `[start, end)`: returns its ticket and the latches to wait for.
    pub fn admit(&mut self, start: u64, end: u64) -> (Ticket, Vec<Latch>) {
        let waits = self
            .entries
            .values()
            .filter(|e| e.start < end && start < e.end)
            .map(|e| e.latch.clone())
            .collect();
        let ticket = Ticket(self.next);
        self.next += 1;
        self.entries.insert(
            ticket,
            Entry {
                start,
                end,
                latch: Latch::default(),
            },
        );
        (ticket, waits)
    }

    /// Ends an operation and wakes the operations waiting for it.
    pub fn release(&mut self, ticket: Ticket) {
        if let Some(e) = self.entries.remove(&ticket) {
            e.latch.fire();
        }
    }

    pub fn in_flight(&self) -> usize {
        self.entries.len()
    }
}

/// Waits for every latch.
pub async fn wait_all(latches: Vec<Latch>) {
    for l in latches {
        l.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_admissions_wait_disjoint_ones_do_not() {
        let mut l = RangeLock::new();
        let (a, wa) = l.admit(0, 100);
        assert!(wa.is_empty());
        let (_b, wb) = l.admit(100, 200);
        assert!(wb.is_empty(), "adjacent ranges do not overlap");
        let (_c, wc) = l.admit(50, 150);
        assert_eq!(wc.len(), 2);
        l.release(a);
        assert!(wc[0].is_fired() || wc[1].is_fired());
        assert_eq!(l.in_flight(), 2);
    }
}
