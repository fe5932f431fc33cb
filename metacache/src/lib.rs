//! Building blocks the metadata caches of the image formats (Parallax, VHD, qcow2) share
//! (and tapdisk's ring counters, which are [`Counter`]s too).
//!
//! Each format keeps its own cache (what a slot holds, what a miss reads and what an eviction
//! writes are the format's), but all of them index slots by small integer keys (table offsets,
//! sector numbers) and count hits and misses for `tap-ctl stats` from the one thread that owns
//! the image while any thread reads the counts:
//! - [`FastMap`] / [`FastSet`]: std's map and set with [`KeyHasher`], a multiplicative hash
//!   that is cheap for integers (the keys come from image files, which are untrusted, but a
//!   cache's size is fixed when it opens, so a crafted file can at worst make lookups slower,
//!   never make the map grow);
//! - [`Counter`]: a count with one writer and any number of readers, without a locked
//!   instruction on the writer's side.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// Multiplicative hashing for integer keys.
#[derive(Default)]
pub struct KeyHasher(u64);

/// The golden-ratio multiplier of Fibonacci hashing.
const MUL: u64 = 0x9e37_79b9_7f4a_7c15;

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(MUL);
        }
    }
    fn write_u64(&mut self, x: u64) {
        let h = (self.0 ^ x).wrapping_mul(MUL);
        self.0 = h ^ (h >> 29);
    }
}

/// A map keyed by integers (or small values of them), hashed by [`KeyHasher`].
pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<KeyHasher>>;

/// A set of integers (or small values of them), hashed by [`KeyHasher`].
pub type FastSet<K> = HashSet<K, BuildHasherDefault<KeyHasher>>;

/// A counter with one writer and any number of readers.
///
/// Only one thread may call [`Counter::add`] (the image's owner); readers on other threads see
/// every count eventually, never a torn value.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n` (wrapping). One writer: a relaxed load and store, no locked instruction.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    /// Subtracts `n` (wrapping; a gauge going down). The writer only, as for `add`.
    #[inline]
    pub fn sub(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_sub(n),
            Ordering::Relaxed,
        );
    }

    /// The count now.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Sets the count (a gauge, such as the slots configured).
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_that_differ_in_one_bit_spread() {
        let mut buckets = [0u32; 64];
        for k in 0..4096u64 {
            let mut h = KeyHasher::default();
            h.write_u64(k << 12);
            buckets[(h.finish() >> 58) as usize] += 1;
        }
        // 4096 page-aligned offsets over 64 buckets: none far from the 64 each would get.
        assert!(
            buckets.iter().all(|&n| (16..=160).contains(&n)),
            "{buckets:?}"
        );
    }

    #[test]
    fn maps_find_what_they_hold() {
        let mut m: FastMap<u64, u32> = FastMap::default();
        for k in 0..1000 {
            m.insert(k * 65536, k as u32);
        }
        assert!((0..1000).all(|k| m[&(k * 65536)] == k as u32));
        let s: FastSet<u32> = (0..10).collect();
        assert!(s.contains(&9) && !s.contains(&10));
    }

    #[test]
    fn a_counter_adds_wraps_and_sets() {
        let c = Counter::default();
        c.add(2);
        c.add(3);
        assert_eq!(c.get(), 5);
        c.sub(4);
        assert_eq!(c.get(), 1);
        c.set(u64::MAX);
        c.add(2);
        assert_eq!(c.get(), 1);
        let c = std::sync::Arc::new(c);
        let r = c.clone();
        std::thread::spawn(move || r.get()).join().unwrap();
    }
}
