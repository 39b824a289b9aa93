//! Reusable byte buffers for the hot paths.
//!
//! Backing fresh memory is slow on the machines cdp runs on (about 11 µs per new 4 KiB page
//! measured on a VM), and large buffers freed to the allocator go back to the kernel, so a
//! 4 MiB batch buffer allocated anew costs about a thousand page faults each time. A
//! [`BufferPool`] keeps a few buffers whose pages are already backed: [`BufferPool::take`]
//! hands one out, [`BufferPool::freeze`] turns it into [`Bytes`] that give the buffer back
//! when the last clone is dropped. At most `kept_max` buffers wait in the pool; more are freed.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// A pool of buffers of one capacity (see the module doc).
#[derive(Debug)]
pub struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
    capacity: usize,
    kept_max: usize,
}

/// A buffer on loan from a pool, inside [`Bytes`]; back to the pool on drop.
struct Loaned {
    buf: Vec<u8>,
    pool: Arc<BufferPool>,
}

impl AsRef<[u8]> for Loaned {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Loaned {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

impl BufferPool {
    /// A pool of buffers of `capacity` bytes, keeping at most `kept_max` of them.
    pub fn new(capacity: usize, kept_max: usize) -> Arc<BufferPool> {
        Arc::new(BufferPool {
            free: Mutex::new(Vec::new()),
            capacity,
            kept_max,
        })
    }

    /// An empty buffer with room for at least the pool's capacity: a reused one when the pool
    /// has one.
    pub fn take(&self) -> Vec<u8> {
        let reused = self.lock().pop();
        reused.unwrap_or_else(|| Vec::with_capacity(self.capacity))
    }

    /// Gives an unused buffer back (cleared here).
    pub fn give_back(&self, mut buf: Vec<u8>) {
        if buf.capacity() < self.capacity {
            return;
        }
        buf.clear();
        let mut free = self.lock();
        if free.len() < self.kept_max {
            free.push(buf);
        }
    }

    /// `buf[range]` as [`Bytes`]; the buffer comes back to the pool when the last clone (or
    /// slice) of them is dropped.
    pub fn freeze(self: &Arc<Self>, buf: Vec<u8>, range: Range<usize>) -> Bytes {
        Bytes::from_owner(Loaned {
            buf,
            pool: self.clone(),
        })
        .slice(range)
    }

    /// Buffers waiting in the pool.
    pub fn kept(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frozen_buffer_comes_back_when_its_last_slice_is_dropped() {
        let pool = BufferPool::new(1024, 2);
        let mut buf = pool.take();
        assert!(buf.capacity() >= 1024);
        buf.extend_from_slice(b"headerpayload");
        let ptr = buf.as_ptr();
        let bytes = pool.freeze(buf, 6..13);
        assert_eq!(&bytes[..], b"payload");
        let clone = bytes.slice(1..3);
        drop(bytes);
        assert_eq!(pool.kept(), 0, "a slice still holds it");
        drop(clone);
        assert_eq!(pool.kept(), 1);
        let again = pool.take();
        assert_eq!(again.as_ptr(), ptr, "the same memory, reused");
        assert!(again.is_empty());
    }

    #[test]
    fn the_pool_keeps_at_most_its_bound_and_only_big_enough_buffers() {
        let pool = BufferPool::new(64, 2);
        for _ in 0..4 {
            pool.give_back(Vec::with_capacity(64));
        }
        assert_eq!(pool.kept(), 2);
        pool.give_back(Vec::with_capacity(8));
        assert_eq!(pool.kept(), 2);
        let _a = pool.take();
        let _b = pool.take();
        assert_eq!(pool.kept(), 0);
        assert!(
            pool.take().capacity() >= 64,
            "a new one when the pool is empty"
        );
    }
}
