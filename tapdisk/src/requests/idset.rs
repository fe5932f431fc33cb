//! A fixed-capacity set of request ids, for catching a frontend that reuses an id in flight.
//!
//! Open addressing with linear probing and backward-shift deletion (no tombstones, so the table
//! never degrades however long the ring runs); preallocated, so the hot path never allocates.
//! The hash is keyed per ring with a random multiplier, so a guest cannot aim ids at one chain;
//! and the set never holds more than a ring's worth of ids, so probes stay short regardless.

/// A set of at most `capacity` ids.
#[derive(Debug)]
pub struct IdSet {
    keys: Box<[u64]>,
    used: Box<[bool]>,
    mask: usize,
    key: u64,
    len: usize,
    capacity: usize,
}

impl IdSet {
    /// A set for up to `capacity` ids.
    pub fn new(capacity: usize) -> IdSet {
        let size = (capacity.max(1) * 2).next_power_of_two();
        let key = std::collections::hash_map::RandomState::new();
        use std::hash::BuildHasher;
        let key = key.hash_one(0u64) | 1;
        IdSet {
            keys: vec![0; size].into_boxed_slice(),
            used: vec![false; size].into_boxed_slice(),
            mask: size - 1,
            key,
            len: 0,
            capacity,
        }
    }

    #[inline]
    fn home(&self, id: u64) -> usize {
        let h = (id ^ (id >> 29)).wrapping_mul(self.key);
        (h >> 32) as usize & self.mask
    }

    /// Inserts `id`; false if it is already present or the set is full.
    #[inline]
    pub fn insert(&mut self, id: u64) -> bool {
        if self.len >= self.capacity {
            return false;
        }
        let mut i = self.home(id);
        while self.used[i] {
            if self.keys[i] == id {
                return false;
            }
            i = (i + 1) & self.mask;
        }
        self.used[i] = true;
        self.keys[i] = id;
        self.len += 1;
        true
    }

    /// Whether `id` is present.
    #[inline]
    pub fn contains(&self, id: u64) -> bool {
        self.find(id).is_some()
    }

    fn find(&self, id: u64) -> Option<usize> {
        let mut i = self.home(id);
        while self.used[i] {
            if self.keys[i] == id {
                return Some(i);
            }
            i = (i + 1) & self.mask;
        }
        None
    }

    /// Removes `id`; false if it was absent.
    #[inline]
    pub fn remove(&mut self, id: u64) -> bool {
        let Some(mut hole) = self.find(id) else {
            return false;
        };
        self.used[hole] = false;
        self.len -= 1;
        let mut j = hole;
        loop {
            j = (j + 1) & self.mask;
            if !self.used[j] {
                return true;
            }
            let h = self.home(self.keys[j]);
            // The entry at j may move into the hole unless its home lies cyclically in (hole, j].
            let stays = if hole <= j {
                hole < h && h <= j
            } else {
                hole < h || h <= j
            };
            if !stays {
                self.keys[hole] = self.keys[j];
                self.used[hole] = true;
                self.used[j] = false;
                hole = j;
            }
        }
    }

    /// Ids present.
    pub fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    proptest! {
        #[test]
        fn behaves_like_a_hashset(ops in proptest::collection::vec((any::<bool>(), 0u64..64), 1..2000)) {
            let mut s = IdSet::new(32);
            let mut m = HashSet::new();
            for (ins, id) in ops {
                if ins {
                    let expect = m.len() < 32 && !m.contains(&id);
                    prop_assert_eq!(s.insert(id), expect);
                    if expect { m.insert(id); }
                } else {
                    prop_assert_eq!(s.remove(id), m.remove(&id));
                }
                prop_assert_eq!(s.len(), m.len());
                for k in 0..64 { prop_assert_eq!(s.contains(k), m.contains(&k)); }
            }
        }
    }

    #[test]
    fn full_set_refuses() {
        let mut s = IdSet::new(2);
        assert!(s.insert(1) && s.insert(u64::MAX));
        assert!(!s.insert(3));
        assert!(!s.insert(1));
        assert!(s.remove(1) && s.insert(3));
    }
}
