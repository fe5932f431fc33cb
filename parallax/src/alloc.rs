//! Allocation of machine blocks (for data and for metadata) and physical block numbers.
//!
//! Two bitmap trees record what is allocated: `mfree` over machine blocks, `pfree` over
//! physical block numbers. Allocation works from *reservations*: runs of free blocks found by a
//! next-fit search (or added at the end of the store), held in the superblock so they survive
//! commits. Taking a block from a reservation is an increment; the run's bits are set later, in
//! one go ([`Image::settle`]), at the latest by the next commit. Until then the run is kept out
//! of every search. Data blocks come from their own reservation so that a sequential write
//! lands on consecutive machine blocks.
//!
//! A freed block keeps its bit until the commit that frees it: the commit clears the bits
//! before writing the superblock, and until that superblock is durable searches skip the
//! freed runs (the quarantine), so nothing the previous commit references is reused early.

use crate::backing::Backing;
use crate::cache::Tree;
use crate::error::{Error, Result};
use crate::format::{tree_capacity, Range, BITMAP_LEAF_BITS, BLOCK_SHIFT, MAX_BLOCK_NUMBER};
use crate::image::{Image, ResKind};

/// Physical block numbers reserved at a time.
const RESERVE_PHYS: u64 = 1024;
/// Physical block numbers for V2P nodes reserved at a time.
const RESERVE_NODE_PHYS: u64 = 256;
/// Metadata blocks reserved at a time.
const RESERVE_META: u64 = 64;
/// Data blocks reserved at a time: a sixteenth of the store, at least this many (8 MiB of
/// 4 KiB blocks: growing the store in small steps slowed first writes of fresh blocks; see
/// docs/thesis.md, Table 3.6)...
const RESERVE_DATA_MIN: u64 = 2048;
/// ...but where the store cannot grow that much (a block device, a full file system), as
/// little as this.
const RESERVE_DATA_FLOOR: u64 = 64;
/// ...and at most this many (and never more than the disk has blocks).
const RESERVE_DATA_MAX: u64 = 8192;

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Sets or clears bits `from..to` of a bitmap leaf; returns how many changed.
fn set_bits(buf: &mut [u8], from: usize, to: usize, value: bool) -> u64 {
    let mut changed = 0;
    let mut i = from;
    while i < to {
        let w = i / 64;
        let lo = i % 64;
        let hi = (to - w * 64).min(64);
        let mask = if hi - lo == 64 {
            u64::MAX
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        let mut word = [0u8; 8];
        word.copy_from_slice(&buf[w * 8..w * 8 + 8]);
        let old = u64::from_le_bytes(word);
        let new = if value { old | mask } else { old & !mask };
        changed += (old ^ new).count_ones() as u64;
        buf[w * 8..w * 8 + 8].copy_from_slice(&new.to_le_bytes());
        i = w * 64 + hi;
    }
    changed
}

fn word_at(buf: &[u8], w: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&buf[w * 8..w * 8 + 8]);
    u64::from_le_bytes(word)
}

/// Whether bits `at..at+len` (`len <= 64`, not crossing a word) are all clear.
fn bits_clear(buf: &[u8], at: usize, len: usize) -> bool {
    let w = at / 64;
    let lo = at % 64;
    let mask = if len == 64 {
        u64::MAX
    } else {
        ((1u64 << len) - 1) << lo
    };
    word_at(buf, w) & mask == 0
}

/// Whether bit `i` is set.
#[cfg(test)]
fn bit(buf: &[u8], i: usize) -> bool {
    buf[i / 8] & (1 << (i % 8)) != 0
}

impl<B: Backing> Image<B> {
    fn reservation_mut(&mut self, k: ResKind) -> &mut Range {
        match k {
            ResKind::Data => &mut self.sb.data_reserve,
            ResKind::Meta => &mut self.sb.meta_reserve,
            ResKind::Phys => &mut self.sb.phys_reserve,
            ResKind::NodePhys => &mut self.sb.node_phys_reserve,
        }
    }

    /// A machine block for metadata, fresh in this epoch.
    pub(crate) fn alloc_meta(&mut self) -> Result<u64> {
        self.writable()?;
        if self.sb.meta_reserve.is_empty() {
            self.reserve(ResKind::Meta)?;
        }
        let m = self.sb.meta_reserve.start;
        self.sb.meta_reserve.start += 1;
        self.fresh.insert(m);
        self.changed = true;
        Ok(m)
    }

    /// The first machine block of a new data block.
    pub(crate) fn alloc_data(&mut self) -> Result<u64> {
        let run = self.sb.data_run();
        if self.sb.data_reserve.len() < run {
            self.reserve(ResKind::Data)?;
        }
        let m = self.sb.data_reserve.start;
        self.sb.data_reserve.start += run;
        self.changed = true;
        Ok(m)
    }

    /// Where the next data block will be, if no new reservation is needed for it.
    #[inline]
    pub(crate) fn next_data(&self) -> Option<u64> {
        (self.sb.data_reserve.len() >= self.sb.data_run()).then_some(self.sb.data_reserve.start)
    }

    /// A physical block number for a data block (`node` false) or a V2P node.
    pub(crate) fn alloc_phys(&mut self, node: bool) -> Result<u64> {
        if self.quarantine {
            return Err(Error::Corrupt(
                "internal inconsistency: physical allocation during a commit".into(),
            ));
        }
        let k = if node {
            ResKind::NodePhys
        } else {
            ResKind::Phys
        };
        if self.reservation_mut(k).is_empty() {
            self.reserve(k)?;
        }
        let r = self.reservation_mut(k);
        let p = r.start;
        r.start += 1;
        self.changed = true;
        Ok(p)
    }

    /// Frees machine blocks `start..start+len` with the next commit.
    pub(crate) fn free_machine(&mut self, start: u64, len: u64) {
        self.freed_machine.push((start, len));
        self.changed = true;
    }

    /// Frees physical block `p` with the next commit.
    pub(crate) fn free_phys(&mut self, p: u64) {
        self.freed_phys.push(p);
        self.changed = true;
    }

    /// Gives up the rest of the data reservation (freed with the next commit).
    pub(crate) fn drop_data_reservation(&mut self) {
        let r = self.sb.data_reserve;
        if !r.is_empty() {
            self.free_machine(r.start, r.len());
        }
        self.sb.data_reserve = Range {
            start: r.end,
            end: r.end,
        };
    }

    /// Makes `r` the data reservation (its bits are set at the next settle).
    pub(crate) fn set_data_reservation(&mut self, r: Range) {
        self.sb.data_reserve = r;
        self.unsettled.push((Tree::Mfree, r));
        self.cursors[ResKind::Data as usize] = r.end;
        self.changed = true;
    }

    fn unsettled_len(&self, t: Tree) -> u64 {
        self.unsettled
            .iter()
            .filter(|(tt, _)| *tt == t)
            .map(|(_, r)| r.len())
            .sum()
    }

    /// Finds a new reservation of kind `k`. Never changes a tree, so it can be called from
    /// anywhere (only reading bitmap leaves, which may evict).
    fn reserve(&mut self, k: ResKind) -> Result<()> {
        self.writable()?;
        let run = self.sb.data_run();
        let (t, want, align) = match k {
            ResKind::Data => {
                let blocks = (self.sb.store_blocks / run / 16)
                    .clamp(RESERVE_DATA_MIN, RESERVE_DATA_MAX)
                    .min(self.sb.virtual_blocks().max(1));
                (Tree::Mfree, blocks * run, run)
            }
            ResKind::Meta => (Tree::Mfree, RESERVE_META, 1),
            ResKind::Phys => (Tree::Pfree, RESERVE_PHYS, 1),
            ResKind::NodePhys => (Tree::Pfree, RESERVE_NODE_PHYS, 1),
        };
        let (first, limit, used) = match t {
            Tree::Pfree => (1, self.sb.phys_limit, self.sb.used_phys),
            _ => (2, self.sb.store_blocks, self.sb.used_machine),
        };
        let free = limit.saturating_sub(used + self.unsettled_len(t));
        let cursor = self.cursors[k as usize].clamp(first, limit);
        let floor = match k {
            ResKind::Data => (RESERVE_DATA_FLOOR * run).min(want),
            _ => want,
        };
        let mut want = want;
        let r = loop {
            let mut found = None;
            if free >= align {
                found = self.find_free(t, cursor, limit, want, align, align)?;
                if found.is_none() && cursor > first {
                    found = self.find_free(t, first, cursor, want, align, align)?;
                }
            }
            if let Some(r) = found {
                break r;
            }
            match self.extend(t, want, align) {
                Ok(r) => break r,
                // Out of space: try a smaller run before giving up (extend changed nothing).
                // Any other error (EIO, say) is reported at once.
                Err(Error::NoSpace(_)) if want > floor => {
                    want = ((want / 2) / align * align).max(floor)
                }
                Err(e) => return Err(e),
            }
        };
        *self.reservation_mut(k) = r;
        self.unsettled.push((t, r));
        self.cursors[k as usize] = r.end;
        self.changed = true;
        Ok(())
    }

    /// Adds `want` blocks (aligned to `align`) at the end of the store or the physical space.
    pub(crate) fn extend(&mut self, t: Tree, want: u64, align: u64) -> Result<Range> {
        match t {
            Tree::Pfree => {
                let start = self.sb.phys_limit;
                let end = start + want;
                if end > MAX_BLOCK_NUMBER {
                    return Err(Error::NoSpace("no physical block numbers left".into()));
                }
                self.sb.phys_limit = end;
                Ok(Range { start, end })
            }
            _ => {
                let start = align_up(self.sb.store_blocks, align);
                let end = start + want;
                if end > MAX_BLOCK_NUMBER {
                    return Err(Error::NoSpace("the store cannot grow any more".into()));
                }
                self.backing
                    .grow(end << BLOCK_SHIFT)
                    .map_err(|e| Error::io("growing the store", e))?;
                self.sb.store_blocks = end;
                Ok(Range { start, end })
            }
        }
    }

    /// If `start..end` overlaps space that must not be handed out (reservations, runs whose
    /// bits are not set yet, runs freed in this epoch during a commit), the end of that space.
    fn excluded(&self, t: Tree, start: u64, end: u64) -> Option<u64> {
        let overlaps = |r: &Range| r.start < end && start < r.end;
        let reservations: &[Range] = match t {
            Tree::Pfree => &[self.sb.phys_reserve, self.sb.node_phys_reserve],
            _ => &[self.sb.data_reserve, self.sb.meta_reserve],
        };
        for r in reservations {
            if overlaps(r) {
                return Some(r.end);
            }
        }
        for (tt, r) in &self.unsettled {
            if *tt == t && overlaps(r) {
                return Some(r.end);
            }
        }
        if self.quarantine && t == Tree::Mfree {
            let sorted = &self.freed_machine[..self.freed_sorted];
            let i = sorted.partition_point(|&(s, l)| s + l <= start);
            if let Some(&(s, l)) = sorted.get(i) {
                if s < end {
                    return Some(s + l);
                }
            }
            for &(s, l) in &self.freed_machine[self.freed_sorted..] {
                if s < end && start < s + l {
                    return Some(s + l);
                }
            }
        }
        None
    }

    /// Whether bits `at..at+len` of `t` are clear (`len` divides 64, `at` aligned to it).
    fn run_clear(&mut self, t: Tree, at: u64, len: u64) -> Result<bool> {
        let leaf = at >> BITMAP_LEAF_BITS;
        let off = (at - (leaf << BITMAP_LEAF_BITS)) as usize;
        Ok(match self.tree_get(t, 0, leaf)? {
            None => true,
            Some(s) => bits_clear(self.cache.buf(s), off, len as usize),
        })
    }

    /// The first run of free blocks in `from..limit`, aligned to `align`, at least `min_len`
    /// and at most `want` long.
    pub(crate) fn find_free(
        &mut self,
        t: Tree,
        from: u64,
        limit: u64,
        want: u64,
        min_len: u64,
        align: u64,
    ) -> Result<Option<Range>> {
        debug_assert!(align <= 64 && 64 % align == 0);
        let mut p = align_up(from, align);
        while p + align <= limit {
            if let Some(end) = self.excluded(t, p, p + align) {
                p = align_up(end, align);
                continue;
            }
            let leaf = p >> BITMAP_LEAF_BITS;
            let base = leaf << BITMAP_LEAF_BITS;
            let leaf_end = (base + (1 << BITMAP_LEAF_BITS)).min(limit);
            let hit = match self.tree_get(t, 0, leaf)? {
                None => Some(p),
                Some(s) => {
                    let buf = self.cache.buf(s);
                    let mut x = p;
                    let mut hit = None;
                    while x + align <= leaf_end {
                        let off = (x - base) as usize;
                        if off.is_multiple_of(64)
                            && x + 64 <= leaf_end
                            && word_at(buf, off / 64) == u64::MAX
                        {
                            x += 64;
                            continue;
                        }
                        if bits_clear(buf, off, align as usize) {
                            hit = Some(x);
                            break;
                        }
                        x += align;
                    }
                    hit
                }
            };
            let Some(q) = hit else {
                p = align_up(leaf_end, align);
                continue;
            };
            if let Some(end) = self.excluded(t, q, q + align) {
                p = align_up(end, align);
                continue;
            }
            let mut e = q + align;
            while e + align <= limit
                && e - q < want
                && self.excluded(t, e, e + align).is_none()
                && self.run_clear(t, e, align)?
            {
                e += align;
            }
            if e - q >= min_len {
                return Ok(Some(Range { start: q, end: e }));
            }
            p = e;
        }
        Ok(None)
    }

    /// Sets (or clears) bits `start..end` of bitmap `t`, keeping the used counts.
    pub(crate) fn bitmap_set_range(
        &mut self,
        t: Tree,
        start: u64,
        end: u64,
        value: bool,
    ) -> Result<()> {
        let mut x = start;
        while x < end {
            let leaf = x >> BITMAP_LEAF_BITS;
            let base = leaf << BITMAP_LEAF_BITS;
            let stop = end.min(base + (1 << BITMAP_LEAF_BITS));
            let s = self.tree_mut(t, 0, leaf)?;
            let changed = set_bits(
                self.cache.buf_mut(s),
                (x - base) as usize,
                (stop - base) as usize,
                value,
            );
            let used = match t {
                Tree::Pfree => &mut self.sb.used_phys,
                _ => &mut self.sb.used_machine,
            };
            if value {
                *used += changed;
            } else {
                *used -= changed.min(*used);
            }
            x = stop;
        }
        Ok(())
    }

    /// Sets the bits of every reserved run whose bits are not set yet.
    pub(crate) fn settle(&mut self) -> Result<()> {
        while let Some(&(t, r)) = self.unsettled.last() {
            // The run stays excluded from searches until its bits are set.
            self.bitmap_set_range(t, r.start, r.end, true)?;
            if let Some(i) = self.unsettled.iter().rposition(|x| *x == (t, r)) {
                self.unsettled.remove(i);
            }
        }
        Ok(())
    }

    /// Before a commit writes nodes: set the bits of every reservation, clear the bits of
    /// everything freed in this epoch, and make the trees cover the store.
    pub(crate) fn prepare_allocators(&mut self) -> Result<()> {
        if !self.quarantine {
            self.freed_machine.sort_unstable();
            self.freed_sorted = self.freed_machine.len();
            self.quarantine = true;
            self.cleared = (0, 0);
        }
        loop {
            self.settle()?;
            if self.cleared.0 < self.freed_machine.len() {
                let (s, l) = self.freed_machine[self.cleared.0];
                self.cleared.0 += 1;
                self.bitmap_set_range(Tree::Mfree, s, s + l, false)?;
                continue;
            }
            if self.cleared.1 < self.freed_phys.len() {
                let p = self.freed_phys[self.cleared.1];
                self.cleared.1 += 1;
                self.bitmap_set_range(Tree::Pfree, p, p + 1, false)?;
                continue;
            }
            let limits = [
                (Tree::P2m, self.sb.phys_limit),
                (Tree::Pfree, self.sb.phys_limit),
                (Tree::Mfree, self.sb.store_blocks),
            ];
            let mut grew = false;
            for (t, items) in limits {
                if tree_capacity(self.tree_levels(t), Self::leaf_bits(t)) < items {
                    self.grow_tree(t, items)?;
                    grew = true;
                }
            }
            if !grew && self.unsettled.is_empty() {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_helpers() {
        let mut b = vec![0u8; 4096];
        assert_eq!(set_bits(&mut b, 3, 200, true), 197);
        assert_eq!(set_bits(&mut b, 0, 10, true), 3);
        assert!(bit(&b, 0) && bit(&b, 199) && !bit(&b, 200));
        assert!(!bits_clear(&b, 192, 8));
        assert!(bits_clear(&b, 200, 8));
        assert_eq!(set_bits(&mut b, 64, 128, false), 64);
        assert!(bits_clear(&b, 64, 64));
        assert_eq!(set_bits(&mut b, 0, 32768, true), 32768 - 200 + 64);
        assert_eq!(word_at(&b, 511), u64::MAX);
        assert_eq!(align_up(5, 4), 8);
        assert_eq!(align_up(8, 4), 8);
    }
}
