//! The metadata cache: a fixed number of 512-byte slots holding BAT sectors (128 entries each)
//! and sector bitmaps (one sector per block), replaced by the CLOCK algorithm.
//!
//! The cache stores and finds sectors; the image decides what a miss reads and what evicting a
//! dirty slot writes (see `image.rs`). Slots and the index are allocated once, when the image
//! opens: lookups, insertions and evictions never allocate.
//!
//! Hits and misses are counted per kind in counters with a single writer (the image's owner),
//! which any thread may read at any time through a [`StatsHandle`] without a lock.

use std::sync::Arc;

use metacache::{Counter, FastMap};
use serde::Serialize;

/// Slots when nothing is configured: 1024 (512 KiB), the bitmaps of 2 GiB of a disk.
pub const DEFAULT_SLOTS: usize = 1024;

/// What a slot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Key {
    /// BAT sector `n` (entries `128n .. 128n+128`).
    Bat(u32),
    /// The sector bitmap of block `n`.
    Bitmap(u32),
}

#[derive(Debug, Default)]
struct Counters {
    bat_hits: Counter,
    bat_misses: Counter,
    bitmap_hits: Counter,
    bitmap_misses: Counter,
    batmap_hits: Counter,
    writebacks: Counter,
    slots: Counter,
}

/// Cache counters of one image, serialisable for `tap-ctl stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CacheStats {
    /// Slots configured.
    pub slots: u64,
    /// BAT lookups served from the cache.
    pub bat_hits: u64,
    /// BAT lookups that read a BAT sector from the file.
    pub bat_misses: u64,
    /// Bitmap lookups served from the cache.
    pub bitmap_hits: u64,
    /// Bitmap lookups that read a bitmap from the file.
    pub bitmap_misses: u64,
    /// Lookups answered by blktap's batmap (a full block) without a bitmap.
    pub batmap_hits: u64,
    /// Times dirty slots were written back to make room (outside a flush).
    pub writebacks: u64,
}

impl CacheStats {
    /// Sum of two images' counters (a chain's total).
    pub fn add(&self, o: &CacheStats) -> CacheStats {
        CacheStats {
            slots: self.slots + o.slots,
            bat_hits: self.bat_hits + o.bat_hits,
            bat_misses: self.bat_misses + o.bat_misses,
            bitmap_hits: self.bitmap_hits + o.bitmap_hits,
            bitmap_misses: self.bitmap_misses + o.bitmap_misses,
            batmap_hits: self.batmap_hits + o.batmap_hits,
            writebacks: self.writebacks + o.writebacks,
        }
    }
}

/// Reads an image's cache counters from any thread, without a lock.
#[derive(Clone, Debug)]
pub struct StatsHandle(Arc<Counters>);

impl StatsHandle {
    /// The counters now.
    pub fn snapshot(&self) -> CacheStats {
        let c = &self.0;
        CacheStats {
            slots: c.slots.get(),
            bat_hits: c.bat_hits.get(),
            bat_misses: c.bat_misses.get(),
            bitmap_hits: c.bitmap_hits.get(),
            bitmap_misses: c.bitmap_misses.get(),
            batmap_hits: c.batmap_hits.get(),
            writebacks: c.writebacks.get(),
        }
    }
}

/// The slots.
pub(crate) struct Cache {
    keys: Box<[Option<Key>]>,
    dirty: Box<[bool]>,
    referenced: Box<[bool]>,
    /// File offset of each slot's sector.
    offsets: Box<[u64]>,
    bufs: Box<[[u8; 512]]>,
    index: FastMap<Key, u32>,
    hand: usize,
    used: usize,
    counters: Arc<Counters>,
}

impl Cache {
    /// A cache of `n` slots (at least 2: a bitmap and a BAT sector may be needed at once).
    pub fn new(n: usize) -> Cache {
        let n = n.max(2);
        let counters = Arc::new(Counters::default());
        counters.slots.add(n as u64);
        Cache {
            keys: vec![None; n].into_boxed_slice(),
            dirty: vec![false; n].into_boxed_slice(),
            referenced: vec![false; n].into_boxed_slice(),
            offsets: vec![0; n].into_boxed_slice(),
            bufs: vec![[0u8; 512]; n].into_boxed_slice(),
            index: FastMap::with_capacity_and_hasher(n, Default::default()),
            hand: 0,
            used: 0,
            counters,
        }
    }

    pub fn stats_handle(&self) -> StatsHandle {
        StatsHandle(self.counters.clone())
    }

    /// The slot holding `key`, counting a hit or a miss.
    pub fn lookup(&mut self, key: Key) -> Option<u32> {
        let r = self.index.get(&key).copied();
        let c = &self.counters;
        match (key, r.is_some()) {
            (Key::Bat(_), true) => c.bat_hits.add(1),
            (Key::Bat(_), false) => c.bat_misses.add(1),
            (Key::Bitmap(_), true) => c.bitmap_hits.add(1),
            (Key::Bitmap(_), false) => c.bitmap_misses.add(1),
        }
        if let Some(s) = r {
            self.referenced[s as usize] = true;
        }
        r
    }

    /// The slot holding `key`, without counting.
    pub fn peek(&self, key: Key) -> Option<u32> {
        self.index.get(&key).copied()
    }

    pub fn count_batmap_hit(&self) {
        self.counters.batmap_hits.add(1);
    }

    pub fn count_writeback(&self) {
        self.counters.writebacks.add(1);
    }

    /// The slot to fill next: a free one, or the CLOCK victim (which may be dirty: the caller
    /// writes it back before [`Cache::install`]).
    pub fn victim(&mut self) -> u32 {
        if self.used < self.keys.len() {
            return self.used as u32;
        }
        loop {
            let h = self.hand;
            self.hand = (self.hand + 1) % self.keys.len();
            if self.referenced[h] {
                self.referenced[h] = false;
            } else {
                return h as u32;
            }
        }
    }

    /// Puts `key`, the sector at file offset `offset`, into slot `s` (from [`Cache::victim`],
    /// clean), with the buffer's content to be filled by the caller.
    pub fn install(&mut self, s: u32, key: Key, offset: u64) {
        let i = s as usize;
        if i == self.used {
            self.used += 1;
        }
        if let Some(old) = self.keys[i].take() {
            self.index.remove(&old);
        }
        self.keys[i] = Some(key);
        self.offsets[i] = offset;
        self.dirty[i] = false;
        self.referenced[i] = true;
        self.index.insert(key, s);
    }

    /// Forgets `key` (a dropped block's bitmap).
    pub fn remove(&mut self, key: Key) {
        if let Some(s) = self.index.remove(&key) {
            self.keys[s as usize] = None;
            self.dirty[s as usize] = false;
            self.referenced[s as usize] = false;
            // The slot stays counted as used; CLOCK finds it unreferenced and reuses it.
        }
    }

    pub fn key(&self, s: u32) -> Option<Key> {
        self.keys[s as usize]
    }
    pub fn offset(&self, s: u32) -> u64 {
        self.offsets[s as usize]
    }
    pub fn is_dirty(&self, s: u32) -> bool {
        self.dirty[s as usize]
    }
    pub fn set_dirty(&mut self, s: u32, d: bool) {
        self.dirty[s as usize] = d;
    }
    pub fn buf(&self, s: u32) -> &[u8; 512] {
        &self.bufs[s as usize]
    }
    pub fn buf_mut(&mut self, s: u32) -> &mut [u8; 512] {
        &mut self.bufs[s as usize]
    }
    /// Dirty slots, BAT sectors last (bitmaps reach the file before the BAT entries that
    /// lead to them, although the ordering rule does not depend on it).
    pub fn dirty_slots(&self, out: &mut Vec<u32>) {
        out.clear();
        out.extend((0..self.keys.len() as u32).filter(|&s| {
            self.dirty[s as usize] && matches!(self.keys[s as usize], Some(Key::Bitmap(_)))
        }));
        out.extend((0..self.keys.len() as u32).filter(|&s| {
            self.dirty[s as usize] && matches!(self.keys[s as usize], Some(Key::Bat(_)))
        }));
    }
    pub fn any_dirty(&self) -> bool {
        self.dirty.iter().any(|&d| d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_reuses_unreferenced_slots_and_counts() {
        let mut c = Cache::new(2);
        for k in 0..2 {
            assert!(c.lookup(Key::Bitmap(k)).is_none());
            let s = c.victim();
            c.install(s, Key::Bitmap(k), 0);
        }
        assert!(c.lookup(Key::Bitmap(0)).is_some());
        let v = c.victim();
        c.install(v, Key::Bitmap(7), 0);
        assert_eq!(c.peek(Key::Bitmap(7)), Some(v));
        let st = c.stats_handle().snapshot();
        assert_eq!((st.bitmap_hits, st.bitmap_misses, st.slots), (1, 2, 2));
        c.remove(Key::Bitmap(7));
        assert!(c.peek(Key::Bitmap(7)).is_none());
    }
}
