//! Random writes for the tests' batches: where, how long, what kind, drawn in one fixed order
//! (count, then per write its length, offset and kind, then its data's seed) so that a seed
//! gives the same writes.
#![allow(dead_code)]

use std::ops::RangeInclusive;

use rand::Rng;
use rand::rngs::StdRng;

use super::{Op, pattern};

/// How a write's kind is drawn.
#[derive(Clone, Copy, Debug)]
pub enum Kinds {
    /// Zero one time in N (`random_ratio(1, N)`), data otherwise.
    RatioZero(u32),
    /// `random_range(0..N)`: 0 zero, data otherwise.
    PickZero(u32),
    /// `random_range(0..N)`: 0 zero, 1 trim, data otherwise.
    PickZeroTrim(u32),
}

/// The writes of one random batch.
#[derive(Clone, Debug)]
pub struct Mix {
    /// Writes per batch (a single value is not drawn).
    pub count: RangeInclusive<usize>,
    /// Bytes per write.
    pub len: RangeInclusive<u64>,
    pub kinds: Kinds,
}

/// What a write does.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// The bytes `pattern(seed, len)`.
    Data(u64),
    Zero,
    Trim,
}

/// One random write, small enough to keep for every batch of a long run.
#[derive(Clone, Copy, Debug)]
pub struct Write {
    pub offset: u64,
    pub len: u64,
    pub kind: Kind,
}

impl Write {
    /// The write as an op on volume `vol`.
    pub fn op(&self, vol: u32) -> Op {
        let (offset, len) = (self.offset, self.len);
        match self.kind {
            Kind::Data(seed) => Op::Data {
                vol,
                offset,
                bytes: pattern(seed, len as usize),
            },
            Kind::Zero => Op::Zero { vol, offset, len },
            Kind::Trim => Op::Trim { vol, offset, len },
        }
    }

    /// Applies the write to `image`.
    pub fn apply(&self, image: &mut [u8]) {
        let range = self.offset as usize..(self.offset + self.len) as usize;
        match self.kind {
            Kind::Data(seed) => image[range].copy_from_slice(&pattern(seed, self.len as usize)),
            Kind::Zero | Kind::Trim => image[range].fill(0),
        }
    }
}

impl Mix {
    /// Random writes in a volume of `size` bytes; `seed` gives each data write's pattern seed.
    pub fn writes(
        &self,
        rng: &mut StdRng,
        size: u64,
        mut seed: impl FnMut(&mut StdRng) -> u64,
    ) -> Vec<Write> {
        let n = if self.count.start() == self.count.end() {
            *self.count.start()
        } else {
            rng.random_range(self.count.clone())
        };
        (0..n)
            .map(|_| {
                let len = rng.random_range(self.len.clone());
                let offset = rng.random_range(0..=size - len);
                let kind = match self.kinds {
                    Kinds::RatioZero(n) => {
                        if rng.random_ratio(1, n) {
                            Kind::Zero
                        } else {
                            Kind::Data(seed(rng))
                        }
                    }
                    Kinds::PickZero(n) => match rng.random_range(0..n) {
                        0 => Kind::Zero,
                        _ => Kind::Data(seed(rng)),
                    },
                    Kinds::PickZeroTrim(n) => match rng.random_range(0..n) {
                        0 => Kind::Zero,
                        1 => Kind::Trim,
                        _ => Kind::Data(seed(rng)),
                    },
                };
                Write { offset, len, kind }
            })
            .collect()
    }

    /// [`Mix::writes`] as ops on volume 0, each data write's seed drawn from `rng`.
    pub fn ops(&self, rng: &mut StdRng, size: u64) -> Vec<Op> {
        self.writes(rng, size, |rng| rng.random())
            .iter()
            .map(|w| w.op(0))
            .collect()
    }
}
