//! The metadata cache: a fixed number of slots, each holding one *slice* of an L2 table or a
//! refcount block (4 KiB, or the whole cluster when clusters are smaller), replaced with the
//! CLOCK algorithm, clean slots first.
//!
//! The cache only stores and finds slices; the image decides what a miss loads and what
//! writing a dirty slice back requires (see `meta.rs`). Slots are allocated once, when the
//! image opens: a lookup, an insertion and an eviction never allocate.
//!
//! Hits and misses are counted per table kind in counters with a single writer, which another
//! thread may read at any time through a [`StatsHandle`] (for `tap-ctl stats`) without a lock.

use std::sync::Arc;

use metacache::{Counter, FastMap};
use serde::Serialize;

/// The default number of slots (8 MiB of 4 KiB slices: the L2 tables of 4 GiB of disk with
/// 64 KiB clusters).
pub const DEFAULT_SLOTS: usize = 2048;
/// Bytes per slice when clusters are larger.
pub const SLICE: u64 = 4096;

/// What a slice belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    L2,
    Refblock,
}

/// A cache key: the slice's file offset (a multiple of 512) with the kind in bit 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Key(u64);

const EMPTY: u64 = u64::MAX;

impl Key {
    pub fn new(kind: Kind, offset: u64) -> Key {
        Key(offset | (kind == Kind::Refblock) as u64)
    }
    pub fn kind(self) -> Kind {
        if self.0 & 1 == 1 {
            Kind::Refblock
        } else {
            Kind::L2
        }
    }
    pub fn offset(self) -> u64 {
        self.0 & !1
    }
}

/// Counters with one writer (the image's owner) and any number of readers.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    l2_hits: Counter,
    l2_misses: Counter,
    refcount_hits: Counter,
    refcount_misses: Counter,
    writebacks: Counter,
    syncs: Counter,
}

impl Counters {
    pub fn sync(&self) {
        self.syncs.add(1);
    }
}

/// Cache counters at one moment (serialisable for `tap-ctl stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CacheStats {
    /// Slots in the cache.
    pub slots: u64,
    /// Bytes per slot.
    pub slice_bytes: u64,
    /// L2 slice lookups found in the cache.
    pub l2_hits: u64,
    /// L2 slice lookups read from the file.
    pub l2_misses: u64,
    /// Refcount block slice lookups found in the cache.
    pub refcount_hits: u64,
    /// Refcount block slice lookups read from the file.
    pub refcount_misses: u64,
    /// Dirty slices written to the file.
    pub writebacks: u64,
    /// `fdatasync` calls the image made.
    pub syncs: u64,
}

/// Reads an image's cache counters from any thread, without a lock.
#[derive(Clone, Debug)]
pub struct StatsHandle {
    counters: Arc<Counters>,
    slots: u64,
    slice: u64,
}

impl StatsHandle {
    /// The counters now.
    pub fn snapshot(&self) -> CacheStats {
        let c = &self.counters;
        let r = Counter::get;
        CacheStats {
            slots: self.slots,
            slice_bytes: self.slice,
            l2_hits: r(&c.l2_hits),
            l2_misses: r(&c.l2_misses),
            refcount_hits: r(&c.refcount_hits),
            refcount_misses: r(&c.refcount_misses),
            writebacks: r(&c.writebacks),
            syncs: r(&c.syncs),
        }
    }
}

/// The slots.
pub(crate) struct Cache {
    slice: usize,
    data: Vec<u8>,
    keys: Vec<u64>,
    dirty: Vec<bool>,
    referenced: Vec<bool>,
    map: FastMap<u64, u32>,
    hand: usize,
    pub counters: Arc<Counters>,
}

impl Cache {
    /// `slots` slots (at least one) of `slice` bytes.
    pub fn new(slots: usize, slice: usize) -> Cache {
        let slots = slots.max(1);
        let mut map = FastMap::default();
        map.reserve(slots);
        Cache {
            slice,
            data: vec![0; slots * slice],
            keys: vec![EMPTY; slots],
            dirty: vec![false; slots],
            referenced: vec![false; slots],
            map,
            hand: 0,
            counters: Arc::default(),
        }
    }

    pub fn stats_handle(&self) -> StatsHandle {
        StatsHandle {
            counters: self.counters.clone(),
            slots: self.keys.len() as u64,
            slice: self.slice as u64,
        }
    }

    /// The slot holding `key`, counting a hit or a miss.
    pub fn find(&mut self, key: Key) -> Option<usize> {
        let hit = self.map.get(&key.0).map(|&s| s as usize);
        let c = &self.counters;
        match (key.kind(), hit.is_some()) {
            (Kind::L2, true) => c.l2_hits.add(1),
            (Kind::L2, false) => c.l2_misses.add(1),
            (Kind::Refblock, true) => c.refcount_hits.add(1),
            (Kind::Refblock, false) => c.refcount_misses.add(1),
        }
        if let Some(s) = hit {
            self.referenced[s] = true;
        }
        hit
    }

    /// The slot holding `key`, without counting.
    pub fn peek(&self, key: Key) -> Option<usize> {
        self.map.get(&key.0).map(|&s| s as usize)
    }

    /// A slot to reuse: an empty one, else a clean one not recently used. `None` when every
    /// slot is dirty (the caller writes dirty slots back and asks again).
    pub fn victim(&mut self) -> Option<usize> {
        let n = self.keys.len();
        for _ in 0..2 * n {
            let s = self.hand;
            self.hand = (self.hand + 1) % n;
            if self.keys[s] == EMPTY {
                return Some(s);
            }
            if self.dirty[s] {
                continue;
            }
            if self.referenced[s] {
                self.referenced[s] = false;
                continue;
            }
            return Some(s);
        }
        None
    }

    /// Empties slot `s` (clean or not) and hands out its bytes to load `key` into; the key is
    /// set by [`Cache::install`] once the load succeeded.
    pub fn take(&mut self, s: usize) -> &mut [u8] {
        if self.keys[s] != EMPTY {
            self.map.remove(&self.keys[s]);
            self.keys[s] = EMPTY;
        }
        self.dirty[s] = false;
        let sl = self.slice;
        &mut self.data[s * sl..(s + 1) * sl]
    }

    /// Slot `s` (taken and loaded) now holds `key`.
    pub fn install(&mut self, s: usize, key: Key) {
        self.keys[s] = key.0;
        self.referenced[s] = true;
        self.map.insert(key.0, s as u32);
    }

    pub fn bytes(&self, s: usize) -> &[u8] {
        &self.data[s * self.slice..(s + 1) * self.slice]
    }

    /// Slot `s`'s bytes for changing; marks it dirty.
    pub fn bytes_mut(&mut self, s: usize) -> &mut [u8] {
        self.dirty[s] = true;
        let sl = self.slice;
        &mut self.data[s * sl..(s + 1) * sl]
    }

    pub fn key(&self, s: usize) -> Option<Key> {
        (self.keys[s] != EMPTY).then_some(Key(self.keys[s]))
    }

    pub fn mark_clean(&mut self, s: usize) {
        self.dirty[s] = false;
        self.counters.writebacks.add(1);
    }

    pub fn slots(&self) -> usize {
        self.keys.len()
    }

    /// Dirty slots of `kind`, in file order (so a write-back is sequential).
    pub fn dirty_slots(&self, kind: Kind, out: &mut Vec<usize>) {
        out.clear();
        out.extend((0..self.keys.len()).filter(|&s| {
            self.dirty[s] && self.keys[s] != EMPTY && Key(self.keys[s]).kind() == kind
        }));
        out.sort_unstable_by_key(|&s| self.keys[s]);
    }

    pub fn any_dirty(&self, kind: Kind) -> bool {
        (0..self.keys.len())
            .any(|s| self.dirty[s] && self.keys[s] != EMPTY && Key(self.keys[s]).kind() == kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_slots_are_evicted_first_and_counters_count() {
        let mut c = Cache::new(2, 512);
        let a = Key::new(Kind::L2, 4096);
        let b = Key::new(Kind::Refblock, 4096);
        assert_ne!(a, b);
        assert!(c.find(a).is_none());
        let s = c.victim().unwrap();
        c.take(s);
        c.install(s, a);
        c.bytes_mut(s)[0] = 1;
        let t = c.victim().unwrap();
        assert_ne!(s, t);
        c.take(t);
        c.install(t, b);
        assert_eq!(c.find(a), Some(s));
        // The only clean slot is the refcount slice.
        assert_eq!(c.victim(), Some(t));
        c.bytes_mut(t);
        assert_eq!(c.victim(), None);
        let st = c.stats_handle().snapshot();
        assert_eq!((st.l2_hits, st.l2_misses), (1, 1));
    }
}
