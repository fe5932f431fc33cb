//! The host-side read cache of early read return: 4 KiB disk blocks, clock eviction.

use std::collections::HashMap;
use std::sync::Mutex;

use blkif::protocol::{Segment, PAGE_SIZE, SECTOR_SIZE};

use crate::sys::mem::{try_filled, try_zeroed_bytes};

const BLOCK: usize = PAGE_SIZE;
const BLOCK_SECTORS: u64 = (BLOCK as u64) / SECTOR_SIZE;

struct CacheInner {
    map: HashMap<u64, u32>,
    keys: Vec<u64>,
    referenced: Vec<bool>,
    data: Box<[u8]>,
    hand: usize,
    used: usize,
}

/// A host-side cache of 4 KiB disk blocks, shared by a VBD's rings and its NBD export.
/// Filled by completed reads, invalidated by writes and discards (before they start and when
/// they complete), evicted by the clock algorithm. Preallocated: nothing is allocated after
/// it is created.
pub struct ReadCache {
    inner: Mutex<CacheInner>,
    blocks: usize,
}

impl std::fmt::Debug for ReadCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadCache")
            .field("blocks", &self.blocks)
            .finish_non_exhaustive()
    }
}

fn lock(m: &Mutex<CacheInner>) -> std::sync::MutexGuard<'_, CacheInner> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ReadCache {
    /// A cache of `mb` MiB; an `OutOfMemory` error if the memory for it cannot be had (the
    /// size is a setting: the VBD that asked fails to open, the process goes on).
    pub fn new(mb: u32) -> std::io::Result<ReadCache> {
        let blocks = (mb as usize).saturating_mul(1 << 20) / BLOCK;
        let blocks = blocks.max(1);
        let no_memory = || {
            std::io::Error::new(
                std::io::ErrorKind::OutOfMemory,
                format!("cannot allocate an early-read cache of {mb} MiB"),
            )
        };
        let mut map = HashMap::new();
        map.try_reserve(blocks).map_err(|_| no_memory())?;
        let keys = try_filled(blocks, u64::MAX).map_err(|_| no_memory())?;
        let referenced = try_filled(blocks, false).map_err(|_| no_memory())?;
        let data = blocks
            .checked_mul(BLOCK)
            .and_then(try_zeroed_bytes)
            .ok_or_else(no_memory)?;
        Ok(ReadCache {
            inner: Mutex::new(CacheInner {
                map,
                keys,
                referenced,
                data,
                hand: 0,
                used: 0,
            }),
            blocks,
        })
    }

    /// Blocks it holds at most.
    pub fn capacity(&self) -> usize {
        self.blocks
    }

    /// Copies block `block` into `out` (4096 bytes) if cached.
    pub fn get(&self, block: u64, out: &mut [u8]) -> bool {
        let mut g = lock(&self.inner);
        let Some(&i) = g.map.get(&block) else {
            return false;
        };
        let i = i as usize;
        g.referenced[i] = true;
        out[..BLOCK].copy_from_slice(&g.data[i * BLOCK..(i + 1) * BLOCK]);
        true
    }

    /// Stores block `block` (4096 bytes).
    pub fn put(&self, block: u64, data: &[u8]) {
        let mut g = lock(&self.inner);
        let i = match g.map.get(&block) {
            Some(&i) => i as usize,
            None => {
                let i = if g.used < self.blocks {
                    g.used += 1;
                    g.used - 1
                } else {
                    // Clock: skip recently referenced blocks once.
                    loop {
                        let h = g.hand;
                        g.hand = (h + 1) % self.blocks;
                        if g.referenced[h] {
                            g.referenced[h] = false;
                        } else {
                            break h;
                        }
                    }
                };
                let old = g.keys[i];
                if old != u64::MAX {
                    g.map.remove(&old);
                }
                g.keys[i] = block;
                g.map.insert(block, i as u32);
                i
            }
        };
        g.referenced[i] = true;
        g.data[i * BLOCK..(i + 1) * BLOCK].copy_from_slice(&data[..BLOCK]);
    }

    /// Forgets every block overlapping `count` sectors at `sector`.
    pub fn invalidate(&self, sector: u64, count: u64) {
        if count == 0 {
            return;
        }
        let first = sector / BLOCK_SECTORS;
        let last = (sector + count - 1) / BLOCK_SECTORS;
        let mut g = lock(&self.inner);
        if g.map.is_empty() {
            return;
        }
        let drop_one = |g: &mut CacheInner, b: u64| {
            if let Some(i) = g.map.remove(&b) {
                g.keys[i as usize] = u64::MAX;
                g.referenced[i as usize] = false;
            }
        };
        if last - first < g.map.len() as u64 {
            for b in first..=last {
                drop_one(&mut g, b);
            }
        } else {
            let victims: Vec<u64> = g
                .map
                .keys()
                .copied()
                .filter(|b| (first..=last).contains(b))
                .collect();
            for b in victims {
                drop_one(&mut g, b);
            }
        }
    }
}

/// The disk block a segment covers, if it is exactly one aligned 4 KiB block.
pub fn segment_block(sector: u64, seg: &Segment) -> Option<u64> {
    (seg.first_sect == 0 && seg.last_sect == 7 && sector.is_multiple_of(BLOCK_SECTORS))
        .then_some(sector / BLOCK_SECTORS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_hits_evicts_and_invalidates() {
        let c = ReadCache::new(1).unwrap(); // 256 blocks
        assert_eq!(c.capacity(), 256);
        let mut out = vec![0u8; 4096];
        assert!(!c.get(5, &mut out));
        c.put(5, &[7u8; 4096]);
        assert!(c.get(5, &mut out));
        assert_eq!(out, vec![7u8; 4096]);
        for b in 100..400 {
            c.put(b, &[b as u8; 4096]);
        }
        let held = (0..400).filter(|&b| c.get(b, &mut out)).count();
        assert_eq!(held, 256);
        assert!(c.get(399, &mut out) && out[0] == (399u64 as u8));
        c.invalidate(399 * 8 + 3, 1);
        assert!(!c.get(399, &mut out));
        c.invalidate(0, 1 << 40);
        assert_eq!((0..400).filter(|&b| c.get(b, &mut out)).count(), 0);
    }

    /// A cache bigger than any machine has is an error, not an abort.
    #[test]
    fn a_cache_too_big_for_the_machine_is_an_error() {
        let e = ReadCache::new(u32::MAX).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::OutOfMemory);
        assert!(
            e.to_string().contains("early-read cache of 4294967295 MiB"),
            "{e}"
        );
    }
}
