//! The metadata cache: a fixed number of 4 KiB slots shared by V2P nodes and the nodes of the
//! P2M and allocation trees, replaced least-recently-used.
//!
//! The cache only stores and finds nodes; the image decides what a miss loads and what an
//! eviction writes (see `image.rs`). Slots are allocated once, when the image opens: a lookup,
//! an insertion and an eviction move indices in preallocated arrays and never allocate.
//!
//! Hits and misses are counted per layer (V2P, P2M, allocation bitmaps) in counters with a
//! single writer, which another thread may read at any time through a [`StatsHandle`] (for
//! `tap-ctl stats`) without taking a lock.

use std::sync::Arc;

use serde::Serialize;

use metacache::{Counter, FastMap};

use crate::error::{Error, Result};
use crate::format::BLOCK;

/// The default number of slots.
pub const DEFAULT_SLOTS: usize = 128;

/// Which tree a node belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Tree {
    /// The P2M tree.
    P2m,
    /// The machine-block bitmap.
    Mfree,
    /// The physical-block bitmap.
    Pfree,
}

/// The three layers statistics are kept for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layer {
    V2p,
    P2m,
    Alloc,
}

/// A cache key: a V2P node by physical block number, or a tree node by position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Key(u64);

const TAG_SHIFT: u32 = 60;
const LEVEL_SHIFT: u32 = 52;
const INDEX_MASK: u64 = (1 << LEVEL_SHIFT) - 1;

impl Key {
    /// The V2P node with physical block number `phys`.
    pub fn v2p(phys: u64) -> Key {
        Key(phys)
    }
    /// The node of `tree` at `level` (0 = leaf) and `index` within that level.
    pub fn tree(tree: Tree, level: u8, index: u64) -> Key {
        let tag = match tree {
            Tree::P2m => 1u64,
            Tree::Mfree => 2,
            Tree::Pfree => 3,
        };
        Key(tag << TAG_SHIFT | (level as u64) << LEVEL_SHIFT | (index & INDEX_MASK))
    }
    /// What the key names.
    pub fn decode(self) -> KeyKind {
        let tag = self.0 >> TAG_SHIFT;
        let level = ((self.0 >> LEVEL_SHIFT) & 0xff) as u8;
        let index = self.0 & INDEX_MASK;
        match tag {
            0 => KeyKind::V2p(self.0),
            1 => KeyKind::Tree(Tree::P2m, level, index),
            2 => KeyKind::Tree(Tree::Mfree, level, index),
            _ => KeyKind::Tree(Tree::Pfree, level, index),
        }
    }
    /// The statistics layer.
    pub fn layer(self) -> Layer {
        match self.0 >> TAG_SHIFT {
            0 => Layer::V2p,
            1 => Layer::P2m,
            _ => Layer::Alloc,
        }
    }
    /// Order in which dirty nodes are written at a commit: children before parents.
    pub fn rank(self) -> u8 {
        match self.decode() {
            KeyKind::V2p(_) => 0,
            KeyKind::Tree(_, level, _) => 1 + level,
        }
    }
}

/// A decoded [`Key`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeyKind {
    V2p(u64),
    Tree(Tree, u8, u64),
}

#[derive(Debug, Default)]
struct LayerCounters {
    lookups: Counter,
    misses: Counter,
}

#[derive(Debug, Default)]
struct Counters {
    slots: Counter,
    v2p: LayerCounters,
    p2m: LayerCounters,
    alloc: LayerCounters,
    evictions: Counter,
    writebacks: Counter,
}

/// Lookups and misses of one layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct LayerStats {
    /// Node lookups.
    pub lookups: u64,
    /// Lookups that had to read the node from the store.
    pub misses: u64,
    /// `misses / lookups` in percent (0 when there were no lookups).
    pub miss_rate_pct: f64,
}

impl LayerStats {
    fn of(c: &LayerCounters) -> LayerStats {
        let lookups = c.lookups.get();
        let misses = c.misses.get();
        LayerStats {
            lookups,
            misses,
            miss_rate_pct: if lookups == 0 {
                0.0
            } else {
                misses as f64 * 100.0 / lookups as f64
            },
        }
    }

    /// The difference from an earlier reading.
    pub fn since(&self, earlier: &LayerStats) -> LayerStats {
        let lookups = self.lookups - earlier.lookups;
        let misses = self.misses - earlier.misses;
        LayerStats {
            lookups,
            misses,
            miss_rate_pct: if lookups == 0 {
                0.0
            } else {
                misses as f64 * 100.0 / lookups as f64
            },
        }
    }
}

/// The metadata cache's counters, as `tap-ctl stats` shows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct CacheStats {
    /// Slots in the cache.
    pub slots: u64,
    /// V2P (virtual to physical) radix nodes.
    pub v2p: LayerStats,
    /// P2M (physical to machine) tree nodes.
    pub p2m: LayerStats,
    /// Allocation bitmap nodes.
    pub alloc: LayerStats,
    /// Nodes evicted to make room.
    pub evictions: u64,
    /// Dirty nodes written back (on eviction or at a commit).
    pub writebacks: u64,
}

impl CacheStats {
    /// The difference from an earlier reading.
    pub fn since(&self, earlier: &CacheStats) -> CacheStats {
        CacheStats {
            slots: self.slots,
            v2p: self.v2p.since(&earlier.v2p),
            p2m: self.p2m.since(&earlier.p2m),
            alloc: self.alloc.since(&earlier.alloc),
            evictions: self.evictions - earlier.evictions,
            writebacks: self.writebacks - earlier.writebacks,
        }
    }
}

/// A handle another thread can read the cache counters through.
#[derive(Clone, Debug)]
pub struct StatsHandle(Arc<Counters>);

impl StatsHandle {
    /// The counters now.
    pub fn snapshot(&self) -> CacheStats {
        let c = &self.0;
        CacheStats {
            slots: c.slots.get(),
            v2p: LayerStats::of(&c.v2p),
            p2m: LayerStats::of(&c.p2m),
            alloc: LayerStats::of(&c.alloc),
            evictions: c.evictions.get(),
            writebacks: c.writebacks.get(),
        }
    }
}

const NIL: u32 = u32::MAX;

/// What the cache knows about one occupied slot.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Slot {
    /// The node.
    pub key: Key,
    /// Where the node lives (or will be written) in the store.
    pub machine: u64,
    /// Changed since it was read or written.
    pub dirty: bool,
    /// Its machine block was allocated in this epoch, so it may be changed in place.
    pub fresh: bool,
    prev: u32,
    next: u32,
    used: bool,
}

/// The slots.
pub(crate) struct Cache {
    data: Vec<u8>,
    slots: Vec<Slot>,
    map: FastMap<Key, u32>,
    free: Vec<u32>,
    /// Most recently used.
    head: u32,
    /// Least recently used.
    tail: u32,
    counters: Arc<Counters>,
}

impl Cache {
    /// A cache of `n >= 1` slots.
    #[cfg(test)]
    pub fn new(n: usize) -> Cache {
        Cache::try_new(n).expect("a small test cache")
    }

    /// A cache of `n >= 1` slots, or [`Error::NoMemory`] if the memory for it cannot be had
    /// (the slot count comes from a setting: a failed allocation is an error, not an abort).
    pub fn try_new(n: usize) -> Result<Cache> {
        let n = n.max(1);
        let no_memory = |_: std::collections::TryReserveError| {
            Error::NoMemory(format!(
                "a metadata cache of {n} slots ({} MiB)",
                n.saturating_mul(BLOCK) >> 20
            ))
        };
        let counters = Arc::new(Counters::default());
        counters.slots.set(n as u64);
        let mut map = FastMap::default();
        map.try_reserve(n).map_err(no_memory)?;
        let bytes = n.saturating_mul(BLOCK);
        let mut data = Vec::new();
        data.try_reserve_exact(bytes).map_err(no_memory)?;
        data.resize(bytes, 0);
        let empty = Slot {
            key: Key(0),
            machine: 0,
            dirty: false,
            fresh: false,
            prev: NIL,
            next: NIL,
            used: false,
        };
        let mut slots = Vec::new();
        slots.try_reserve_exact(n).map_err(no_memory)?;
        slots.resize(n, empty);
        let mut free = Vec::new();
        free.try_reserve_exact(n).map_err(no_memory)?;
        free.extend((0..n as u32).rev());
        Ok(Cache {
            data,
            slots,
            map,
            free,
            head: NIL,
            tail: NIL,
            counters,
        })
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// A handle on the counters.
    pub fn stats_handle(&self) -> StatsHandle {
        StatsHandle(self.counters.clone())
    }

    fn layer(&self, l: Layer) -> &LayerCounters {
        match l {
            Layer::V2p => &self.counters.v2p,
            Layer::P2m => &self.counters.p2m,
            Layer::Alloc => &self.counters.alloc,
        }
    }

    /// Counts a lookup of `key` and finds it, making it most recently used.
    #[inline]
    pub fn lookup(&mut self, key: Key) -> Option<u32> {
        self.layer(key.layer()).lookups.add(1);
        let s = *self.map.get(&key)?;
        self.touch(s);
        Some(s)
    }

    /// [`Cache::lookup`], trying slot `*hint` first (the slot this kind of node was found in
    /// last time), and updating it.
    #[inline]
    pub fn lookup_hinted(&mut self, key: Key, hint: &mut u32) -> Option<u32> {
        let h = *hint as usize;
        if h < self.slots.len() && self.slots[h].used && self.slots[h].key == key {
            self.layer(key.layer()).lookups.add(1);
            self.touch(*hint);
            return Some(*hint);
        }
        let s = self.lookup(key)?;
        *hint = s;
        Some(s)
    }

    /// Finds `key` without counting or reordering.
    #[inline]
    pub fn peek(&self, key: Key) -> Option<u32> {
        self.map.get(&key).copied()
    }

    /// Counts `n` lookups served by a node already found (consecutive entries of one node).
    #[inline]
    pub fn count_lookups(&self, layer: Layer, n: u64) {
        self.layer(layer).lookups.add(n);
    }

    /// Counts a miss (a read from the store) in `key`'s layer.
    pub fn count_miss(&self, key: Key) {
        self.layer(key.layer()).misses.add(1);
    }

    /// Counts a dirty node written back.
    pub fn count_writeback(&self) {
        self.counters.writebacks.add(1);
    }

    /// A free slot, if any.
    pub fn take_free(&mut self) -> Option<u32> {
        self.free.pop()
    }

    /// The least recently used occupied slot (the eviction victim).
    pub fn lru(&self) -> Option<u32> {
        (self.tail != NIL).then_some(self.tail)
    }

    /// Puts `key` into the free slot `s`, most recently used.
    pub fn install(&mut self, s: u32, key: Key, machine: u64, dirty: bool, fresh: bool) {
        debug_assert!(!self.slots[s as usize].used);
        let slot = &mut self.slots[s as usize];
        slot.key = key;
        slot.machine = machine;
        slot.dirty = dirty;
        slot.fresh = fresh;
        slot.used = true;
        self.map.insert(key, s);
        self.link_front(s);
    }

    /// Empties slot `s` (without writing it).
    pub fn remove(&mut self, s: u32) {
        let slot = self.slots[s as usize];
        debug_assert!(slot.used);
        self.unlink(s);
        self.map.remove(&slot.key);
        self.slots[s as usize].used = false;
        self.slots[s as usize].dirty = false;
        self.free.push(s);
    }

    /// Returns slot `s`, taken with [`Cache::take_free`] but never installed.
    pub fn release(&mut self, s: u32) {
        debug_assert!(!self.slots[s as usize].used);
        self.free.push(s);
    }

    /// Empties slot `s` because room was needed.
    pub fn evict(&mut self, s: u32) {
        self.counters.evictions.add(1);
        self.remove(s);
    }

    /// The slot's bookkeeping.
    #[inline]
    pub fn slot(&self, s: u32) -> &Slot {
        &self.slots[s as usize]
    }

    /// The slot's bookkeeping, to change.
    #[inline]
    pub fn slot_mut(&mut self, s: u32) -> &mut Slot {
        &mut self.slots[s as usize]
    }

    /// The node's bytes.
    #[inline]
    pub fn buf(&self, s: u32) -> &[u8] {
        let o = s as usize * BLOCK;
        &self.data[o..o + BLOCK]
    }

    /// The node's bytes, to change.
    #[inline]
    pub fn buf_mut(&mut self, s: u32) -> &mut [u8] {
        let o = s as usize * BLOCK;
        &mut self.data[o..o + BLOCK]
    }

    /// The dirty slot with the lowest write rank, if any.
    pub fn lowest_dirty(&self) -> Option<u32> {
        let mut best: Option<(u8, u32)> = None;
        for (i, s) in self.slots.iter().enumerate() {
            if s.used && s.dirty {
                let r = s.key.rank();
                if best.is_none_or(|(br, _)| r < br) {
                    best = Some((r, i as u32));
                }
            }
        }
        best.map(|(_, i)| i)
    }

    /// After a commit: nothing is dirty and nothing is fresh.
    pub fn end_epoch(&mut self) {
        for s in &mut self.slots {
            s.fresh = false;
            debug_assert!(!s.dirty);
            s.dirty = false;
        }
    }

    /// Drops every node (after an error, or for a cold start).
    pub fn clear(&mut self) {
        for i in 0..self.slots.len() as u32 {
            if self.slots[i as usize].used {
                self.remove(i);
            }
        }
    }

    fn touch(&mut self, s: u32) {
        if self.head != s {
            self.unlink(s);
            self.link_front(s);
        }
    }

    fn link_front(&mut self, s: u32) {
        self.slots[s as usize].prev = NIL;
        self.slots[s as usize].next = self.head;
        if self.head != NIL {
            self.slots[self.head as usize].prev = s;
        }
        self.head = s;
        if self.tail == NIL {
            self.tail = s;
        }
    }

    fn unlink(&mut self, s: u32) {
        let Slot { prev, next, .. } = self.slots[s as usize];
        if prev != NIL {
            self.slots[prev as usize].next = next;
        } else {
            self.head = next;
        }
        if next != NIL {
            self.slots[next as usize].prev = prev;
        } else {
            self.tail = prev;
        }
        self.slots[s as usize].prev = NIL;
        self.slots[s as usize].next = NIL;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// tapdisk's memory check at open counts 4096 + 64 bytes per slot
    /// (`tapdisk_control::limits::CACHE_SLOT_BYTES`): a slot's record, its map entry and its
    /// free-list entry fit in the 64.
    #[test]
    fn a_slot_costs_what_the_memory_check_counts() {
        let per = std::mem::size_of::<Slot>() + std::mem::size_of::<(Key, u32)>() + 1 + 4;
        assert!(per <= 64, "{per}");
        assert!(matches!(
            Cache::try_new(usize::MAX / BLOCK),
            Err(Error::NoMemory(_))
        ));
    }

    #[test]
    fn keys_decode_and_rank() {
        let k = Key::tree(Tree::Pfree, 3, 12345);
        assert_eq!(k.decode(), KeyKind::Tree(Tree::Pfree, 3, 12345));
        assert_eq!(k.layer(), Layer::Alloc);
        assert_eq!(k.rank(), 4);
        let v = Key::v2p((1 << 48) - 1);
        assert_eq!(v.decode(), KeyKind::V2p((1 << 48) - 1));
        assert_eq!(v.rank(), 0);
        assert_eq!(Key::tree(Tree::P2m, 0, 0).layer(), Layer::P2m);
    }

    #[test]
    fn lru_order_and_counts() {
        let mut c = Cache::new(3);
        for i in 0..3 {
            let s = c.take_free().unwrap();
            c.install(s, Key::v2p(i + 1), 10 + i, false, false);
        }
        assert!(c.take_free().is_none());
        // 1 is least recently used; touching it makes 2 the victim.
        assert_eq!(c.slot(c.lru().unwrap()).key, Key::v2p(1));
        assert!(c.lookup(Key::v2p(1)).is_some());
        let victim = c.lru().unwrap();
        assert_eq!(c.slot(victim).key, Key::v2p(2));
        c.evict(victim);
        assert!(c.lookup(Key::v2p(2)).is_none());
        c.count_miss(Key::v2p(2));
        let s = c.take_free().unwrap();
        c.install(s, Key::tree(Tree::P2m, 0, 0), 50, true, true);
        assert!(c.lookup(Key::tree(Tree::P2m, 0, 0)).is_some());
        assert_eq!(c.lowest_dirty(), Some(s));
        let st = c.stats_handle().snapshot();
        assert_eq!(st.v2p.lookups, 2);
        assert_eq!(st.v2p.misses, 1);
        assert_eq!(st.p2m.lookups, 1);
        assert_eq!(st.evictions, 1);
        assert_eq!(st.slots, 3);
        c.slot_mut(s).dirty = false;
        c.end_epoch();
        c.clear();
        assert_eq!(c.free.len(), 3);
    }

    #[test]
    fn one_slot_works() {
        let mut c = Cache::new(0);
        assert_eq!(c.len(), 1);
        let s = c.take_free().unwrap();
        c.install(s, Key::v2p(9), 1, false, false);
        assert_eq!(c.lru(), Some(s));
        c.evict(s);
        assert!(c.take_free().is_some());
    }
}
