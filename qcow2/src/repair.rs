//! Rebuilding refcounts of a dirty image (lazy refcounts in use, not closed cleanly), as QEMU
//! does when it opens one read-write: count every reference the metadata makes, make every
//! refcount equal to its count (creating refcount blocks where needed), set the copied bits
//! to match, write everything back, then clear the dirty bit.

use crate::cache::Kind;
use crate::entry::{self, be64_at, COPIED, L2};
use crate::error::{corrupt, Error, Result};
use crate::header::{incompat, MAX_L1_BYTES};
use crate::image::Image;

/// What [`Image::check`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CheckReport {
    /// Clusters whose refcount is below their references (corruption).
    pub errors: u64,
    /// Clusters whose refcount is above their references (leaks: harmless, space lost).
    pub leaks: u64,
}

/// Byte offset of `incompatible_features` in the header.
const INCOMPAT_AT: u64 = 72;

impl Image {
    /// Rebuilds the refcounts (see the module doc). The image has no internal snapshots.
    pub(crate) fn repair_refcounts(&mut self) -> Result<()> {
        // Each pass may create refcount blocks or grow the table, which the next pass counts.
        for _ in 0..8 {
            let counts = self.count_references()?;
            if !self.fix_refcounts(&counts)? {
                self.fix_copied_bits()?;
                self.close()?;
                let flags = self.header.incompatible_features & !incompat::DIRTY;
                self.storage
                    .write_at(&flags.to_be_bytes(), INCOMPAT_AT)
                    .and_then(|()| self.storage.flush())
                    .map_err(|e| self.fail(Error::io("clearing the dirty bit", e)))?;
                self.header.incompatible_features = flags;
                return Ok(());
            }
        }
        Err(corrupt!("refcount repair did not settle"))
    }

    /// Compares every refcount with the references the metadata makes (what `qemu-img
    /// check` does for refcounts). Internal snapshots' tables are not counted, so an image
    /// with snapshots reports leaks.
    pub fn check(&mut self) -> Result<CheckReport> {
        let counts = self.count_references()?;
        let mut r = CheckReport::default();
        let mut look = |c: u64, stored: u64| {
            let refs = counts.get(c as usize).map_or(0, |&n| n as u64);
            if stored < refs {
                r.errors += 1;
            } else if stored > refs {
                r.leaks += 1;
            }
        };
        // Every cluster a refcount block covers, and every referenced one (a reference to a
        // cluster no block covers is an error: its refcount is 0). A refcount of 0 past the
        // last referenced cluster is right: those are skipped, a slice at a time.
        let g = self.g;
        let referenced = counts.len() as u64;
        for t in 0..self.reftable.len() as u64 {
            let first = t * g.rc_per_block;
            self.each_refcount(first, first + g.rc_per_block, referenced, &mut look)?;
        }
        let covered = self.reftable.len() as u64 * g.rc_per_block;
        for c in covered..referenced {
            look(c, 0);
        }
        Ok(r)
    }

    /// Calls `f(cluster, refcount)` for the clusters `c..end` of one refcount block's range,
    /// one cache slice at a time, except those at or past `skip_zero_from` whose refcount is
    /// 0. Without a refcount block the range is all zeroes.
    fn each_refcount(
        &mut self,
        mut c: u64,
        end: u64,
        skip_zero_from: u64,
        f: &mut impl FnMut(u64, u64),
    ) -> Result<()> {
        let g = self.g;
        while c < end {
            let Some((slice, i)) = self.rc_where(c) else {
                for k in c..end.min(skip_zero_from) {
                    f(k, 0);
                }
                return Ok(());
            };
            let run = (g.rc_per_slice - i as u64).min(end - c);
            let s = self.slot(Kind::Refblock, slice)?;
            let bytes = self.cache.bytes(s);
            if bytes.iter().all(|&b| b == 0) {
                for k in c..(c + run).min(skip_zero_from) {
                    f(k, 0);
                }
            } else {
                for k in 0..run {
                    let v = g.rc.get(bytes, i + k as usize);
                    if v != 0 || c + k < skip_zero_from {
                        f(c + k, v);
                    }
                }
            }
            c += run;
        }
        Ok(())
    }

    /// References to each host cluster, by index.
    fn count_references(&mut self) -> Result<Vec<u32>> {
        let g = self.g;
        let limit = (self.file_size >> g.bits) + (1 << 16);
        let mut counts: Vec<u32> = vec![0; (self.file_size.div_ceil(g.cs)) as usize];
        let mut add = |off: u64, bytes: u64| -> Result<()> {
            for c in off >> g.bits..(off + bytes).div_ceil(g.cs) {
                if c >= limit {
                    return Err(corrupt!(
                        "a reference to cluster {:#x}, far past the end of the file",
                        c << g.bits
                    ));
                }
                if c as usize >= counts.len() {
                    counts.resize(c as usize + 1, 0);
                }
                counts[c as usize] = counts[c as usize].saturating_add(1);
            }
            Ok(())
        };
        add(0, 1)?;
        add(
            self.header.l1_table_offset,
            (self.l1.len() as u64 * 8).max(1),
        )?;
        add(
            self.header.refcount_table_offset,
            self.reftable.len() as u64 * 8,
        )?;
        for &b in &self.reftable {
            if b != 0 {
                add(b, 1)?;
            }
        }
        debug_assert!(self.l1.len() as u64 * 8 <= MAX_L1_BYTES);
        let mut table = vec![0u8; g.cs as usize];
        for i in 0..self.l1.len() {
            let (l2, _) = entry::l1_entry(self.l1[i], i as u64, g.bits)?;
            if l2 == 0 {
                continue;
            }
            add(l2, 1)?;
            self.read_l2_table(l2, &mut table)?;
            for j in 0..g.l2_entries as usize {
                let raw = be64_at(&table, j);
                let gc = i as u64 * g.l2_entries + j as u64;
                match entry::l2_entry(raw, gc, g.bits, g.version)? {
                    L2::Data { offset, .. } | L2::Zero(Some(offset)) => add(offset, 1)?,
                    L2::Compressed(c) => {
                        let (off, n) = c.clusters(g.bits);
                        add(off, n << g.bits)?;
                    }
                    L2::Unallocated | L2::Zero(None) => {}
                }
            }
        }
        Ok(counts)
    }

    /// An L2 table as the cache (if it holds slices of it) or the file has it.
    fn read_l2_table(&mut self, off: u64, out: &mut [u8]) -> Result<()> {
        let slice = self.g.slice as usize;
        for (k, chunk) in out.chunks_mut(slice).enumerate() {
            let s = self.slot(Kind::L2, off + (k * slice) as u64)?;
            chunk.copy_from_slice(self.cache.bytes(s));
        }
        Ok(())
    }

    /// Makes every refcount equal its count; true if it had to create refcount blocks (the
    /// counts are then stale and another pass is needed).
    fn fix_refcounts(&mut self, counts: &[u32]) -> Result<bool> {
        let g = self.g;
        let max = g.rc.max();
        for (c, &n) in counts.iter().enumerate() {
            let c = c as u64;
            let want = (n as u64).min(max);
            if self.refcount(c)? == want {
                continue;
            }
            let t = c / g.rc_per_block;
            if t >= self.reftable.len() as u64 || self.reftable[t as usize] == 0 {
                // A block is needed: the first unreferenced cluster of its range, else past
                // the table's end (a table growth places its structures there).
                let first = t * g.rc_per_block;
                let spot = (first..first + g.rc_per_block)
                    .find(|&p| counts.get(p as usize).is_none_or(|&k| k == 0));
                if t < self.reftable.len() as u64 {
                    let p = spot.ok_or_else(|| {
                        corrupt!("no room for a refcount block among referenced clusters")
                    })?;
                    self.new_refblock(t, p)?;
                } else {
                    let s = self.reftable.len() as u64 * g.rc_per_block;
                    if (s as usize) < counts.len() && counts[s as usize..].iter().any(|&k| k > 0) {
                        return Err(corrupt!(
                            "references past the refcount table's coverage: cannot rebuild"
                        ));
                    }
                    self.grow_reftable(t)?;
                }
                return Ok(true);
            }
            self.set_refcount(c, want)?;
        }
        // Refcounts past the last referenced cluster are leaks.
        for t in 0..self.reftable.len() as u64 {
            if self.reftable[t as usize] == 0 {
                continue;
            }
            let first = (t * g.rc_per_block).max(counts.len() as u64);
            self.clear_refcounts(first, (t + 1) * g.rc_per_block)?;
        }
        self.free_hint = 0;
        Ok(false)
    }

    /// Sets the refcounts of clusters `c..end` (of one refcount block's range) to 0, a cache
    /// slice at a time; slices already 0 stay clean.
    fn clear_refcounts(&mut self, mut c: u64, end: u64) -> Result<()> {
        let g = self.g;
        while c < end {
            let Some((slice, i)) = self.rc_where(c) else {
                return Ok(());
            };
            let run = (g.rc_per_slice - i as u64).min(end - c);
            let s = self.slot(Kind::Refblock, slice)?;
            let bytes = self.cache.bytes(s);
            let any = bytes.iter().any(|&b| b != 0)
                && (0..run).any(|k| g.rc.get(bytes, i + k as usize) != 0);
            if any {
                let bytes = self.cache.bytes_mut(s);
                for k in 0..run {
                    g.rc.set(bytes, i + k as usize, 0);
                }
            }
            c += run;
        }
        Ok(())
    }

    /// Sets the copied bit of every L1 and L2 entry to "refcount is one".
    fn fix_copied_bits(&mut self) -> Result<()> {
        let g = self.g;
        for i in 0..self.l1.len() {
            let (l2, copied) = entry::l1_entry(self.l1[i], i as u64, g.bits)?;
            if l2 == 0 {
                continue;
            }
            let one = self.refcount(l2 >> g.bits)? == 1;
            if one != copied {
                self.l1[i] = l2 | if one { COPIED } else { 0 };
                self.l1_dirty.mark(i);
            }
            for j in 0..g.l2_entries {
                let gc = i as u64 * g.l2_entries + j;
                let raw = self.l2_get(gc)?;
                let host = match entry::l2_entry(raw, gc, g.bits, g.version)? {
                    L2::Data { offset, .. } | L2::Zero(Some(offset)) => offset,
                    _ => continue,
                };
                let one = self.refcount(host >> g.bits)? == 1;
                if one != (raw & COPIED != 0) {
                    let v = (raw & !COPIED) | if one { COPIED } else { 0 };
                    self.l2_set(gc, v)?;
                }
            }
        }
        Ok(())
    }
}
