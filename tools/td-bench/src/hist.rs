//! A latency histogram with HDR-style logarithmic buckets.
//!
//! Values (nanoseconds) below 128 get a bucket each; above, every power of two is split into
//! 64 equal sub-buckets, so a value is known to within 1/64 of itself (the reported value is the
//! middle of its bucket: within 0.8 %). Recording is a leading-zero count, a shift and an
//! increment; the whole table is 3776 counters (30 KiB), allocated once.

/// Bits of sub-bucket resolution per power of two.
const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;
/// Buckets: the linear range `0..2*SUB`, then `SUB` per power of two up to 2^63.
const BUCKETS: usize = ((64 - SUB_BITS) as usize) * SUB as usize + SUB as usize;

/// A histogram of `u64` values.
#[derive(Clone)]
pub struct Histogram {
    counts: Box<[u64]>,
    total: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("total", &self.total)
            .field("min", &self.min())
            .field("max", &self.max)
            .finish()
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

/// Bucket of `v`.
#[inline]
fn index(v: u64) -> usize {
    if v < 2 * SUB {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // >= SUB_BITS + 1
    let shift = exp - SUB_BITS;
    (shift as usize) * SUB as usize + (v >> shift) as usize
}

/// Smallest value in bucket `i`, and the bucket's width.
fn bucket(i: usize) -> (u64, u64) {
    if i < 2 * SUB as usize {
        return (i as u64, 1);
    }
    let shift = (i / SUB as usize - 1) as u32;
    let m = (i % SUB as usize) as u64 + SUB;
    (m << shift, 1 << shift)
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Histogram {
        Histogram {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            total: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    /// Adds one value.
    #[inline]
    pub fn record(&mut self, v: u64) {
        self.counts[index(v)] += 1;
        self.total += 1;
        self.sum += u128::from(v);
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.counts.fill(0);
        self.total = 0;
        self.sum = 0;
        self.min = u64::MAX;
        self.max = 0;
    }

    /// Adds every value of `other`.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.total += other.total;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// Smallest value (0 when empty).
    pub fn min(&self) -> u64 {
        if self.total == 0 {
            0
        } else {
            self.min
        }
    }

    /// Largest value (0 when empty).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Mean value (0 when empty).
    pub fn mean(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum as f64 / self.total as f64
        }
    }

    /// The value at percentile `p` (0..=100): the middle of the bucket holding the
    /// `ceil(p% * count)`-th smallest value, clamped to the exact minimum and maximum (the
    /// largest value is exact). 0 when empty.
    pub fn percentile(&self, p: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((p.clamp(0.0, 100.0) / 100.0 * self.total as f64).ceil() as u64).max(1);
        if rank >= self.total {
            return self.max;
        }
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (lo, width) = bucket(i);
                let mid = lo.saturating_add((width - 1) / 2);
                return mid.clamp(self.min, self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::Rng;

    #[test]
    fn buckets_are_contiguous_and_ordered() {
        assert_eq!(index(0), 0);
        assert_eq!(index(127), 127);
        assert_eq!(index(128), 128);
        assert_eq!(index(255), 191);
        assert_eq!(index(256), 192);
        assert_eq!(index(u64::MAX), BUCKETS - 1);
        let mut prev = 0;
        for i in 1..BUCKETS {
            let (lo, w) = bucket(i);
            let (plo, pw) = bucket(i - 1);
            assert_eq!(plo + pw, lo, "bucket {i} does not follow bucket {}", i - 1);
            assert_eq!(index(lo), i);
            assert_eq!(index(lo + (w - 1)), i);
            assert!(lo > prev || i == 1);
            prev = lo;
        }
    }

    #[test]
    fn empty_and_single() {
        let mut h = Histogram::new();
        assert_eq!(
            (h.count(), h.min(), h.max(), h.percentile(50.0)),
            (0, 0, 0, 0)
        );
        assert_eq!(h.mean(), 0.0);
        h.record(12_345);
        for p in [0.0, 50.0, 99.9, 100.0] {
            assert_eq!(
                h.percentile(p),
                12_345,
                "a single value is its own percentile"
            );
        }
        h.record(u64::MAX);
        assert_eq!(h.percentile(100.0), u64::MAX);
        h.clear();
        assert_eq!(h.count(), 0);
        assert_eq!(h.percentile(99.0), 0);
    }

    #[test]
    fn percentiles_match_exact_within_resolution() {
        let mut rng = Rng::new(99);
        let mut h = Histogram::new();
        let mut v: Vec<u64> = (0..200_000)
            .map(|_| {
                // A long-tailed mix: mostly ~20 µs, some ~1 ms, a few ~50 ms.
                match rng.below(1000) {
                    0..=979 => rng.range(10_000, 30_000),
                    980..=998 => rng.range(500_000, 1_500_000),
                    _ => rng.range(10_000_000, 90_000_000),
                }
            })
            .collect();
        for &x in &v {
            h.record(x);
        }
        v.sort_unstable();
        for p in [1.0, 50.0, 90.0, 99.0, 99.9, 99.99, 100.0] {
            let rank = ((p / 100.0 * v.len() as f64).ceil() as usize).max(1);
            let exact = v[rank - 1] as f64;
            let got = h.percentile(p) as f64;
            assert!(
                (got - exact).abs() / exact < 0.016,
                "p{p}: exact {exact}, histogram {got}"
            );
        }
        assert_eq!(h.min(), v[0]);
        assert_eq!(h.max(), *v.last().unwrap());
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        assert!((h.mean() - mean).abs() < 1e-6 * mean);
    }

    #[test]
    fn merge_adds_up() {
        let mut a = Histogram::new();
        let mut b = Histogram::new();
        let mut all = Histogram::new();
        for x in 1..=1000u64 {
            if x % 3 == 0 {
                a.record(x * 100);
            } else {
                b.record(x * 100);
            }
            all.record(x * 100);
        }
        a.merge(&b);
        assert_eq!(a.count(), 1000);
        assert_eq!((a.min(), a.max()), (100, 100_000));
        for p in [10.0, 50.0, 99.0] {
            assert_eq!(a.percentile(p), all.percentile(p));
        }
        assert!((a.percentile(50.0) as f64 - 50_000.0).abs() < 50_000.0 / 64.0);
    }
}
