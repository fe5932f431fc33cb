//! Host cluster allocation through the refcount structures: finding free clusters, new
//! refcount blocks, growing the refcount table, and freeing (now, or deferred until the L2
//! change that dropped the reference is durable).

use crate::cache::Kind;
use crate::entry::MAX_HOST_OFFSET;
use crate::error::{corrupt, Error, Result};
use crate::header::{field, MAX_REFTABLE_BYTES};
use crate::image::{Dirty, Image};
use crate::storage::write_zeroes;

/// The file grows by at least this much at a time (sparse), so allocations do not each
/// change its size.
const GROW_CHUNK: u64 = 1 << 20;

impl Image {
    /// The slice holding cluster `c`'s refcount and the index in it; `None` when no refcount
    /// block covers `c` (its refcount is 0).
    pub(crate) fn rc_where(&self, c: u64) -> Option<(u64, usize)> {
        let g = &self.g;
        let t = c / g.rc_per_block;
        let block = *self.reftable.get(t as usize)?;
        if block == 0 {
            return None;
        }
        let i = c % g.rc_per_block;
        Some((
            block + (i / g.rc_per_slice) * g.slice,
            (i % g.rc_per_slice) as usize,
        ))
    }

    /// Cluster `c`'s refcount.
    pub(crate) fn refcount(&mut self, c: u64) -> Result<u64> {
        let Some((slice, i)) = self.rc_where(c) else {
            return Ok(0);
        };
        let s = self.slot(Kind::Refblock, slice)?;
        Ok(self.g.rc.get(self.cache.bytes(s), i))
    }

    /// Sets cluster `c`'s refcount (its refcount block exists).
    pub(crate) fn set_refcount(&mut self, c: u64, v: u64) -> Result<()> {
        let (slice, i) = self
            .rc_where(c)
            .ok_or_else(|| corrupt!("no refcount block for cluster {:#x}", c << self.g.bits))?;
        let s = self.slot(Kind::Refblock, slice)?;
        let rc = self.g.rc;
        rc.set(self.cache.bytes_mut(s), i, v);
        Ok(())
    }

    /// Allocates up to `max` contiguous free clusters (at least one), each with refcount 1;
    /// returns the first cluster's index and the count.
    pub(crate) fn alloc(&mut self, max: u64) -> Result<(u64, u64)> {
        let g = self.g;
        // Clusters past the end of the file hold nothing; a refcount there is a leak at
        // best. A scan that runs far past the end is corruption, not a reason to hang.
        let limit = (self.file_size >> g.bits) + (1 << 16);
        let mut c = self.free_hint;
        let mut start = 0;
        let mut n = 0u64;
        'scan: while n < max {
            if (c + 1) << g.bits > MAX_HOST_OFFSET {
                if n > 0 {
                    break;
                }
                return Err(Error::NoSpace("the image file reached 64 PiB".into()));
            }
            let t = c / g.rc_per_block;
            if t >= self.reftable.len() as u64 {
                if n > 0 {
                    break;
                }
                let s = self.grow_reftable(t)?;
                c = c.min(s);
                continue;
            }
            if self.reftable[t as usize] == 0 {
                if n > 0 {
                    break;
                }
                self.new_refblock(t, c)?;
                c += 1;
                continue;
            }
            if c > limit && n == 0 {
                return Err(self.fail(corrupt!(
                    "no free cluster up to {:#x}, far past the end of the file",
                    c << g.bits
                )));
            }
            let Some((slice, first)) = self.rc_where(c) else {
                break;
            };
            let s = self.slot(Kind::Refblock, slice)?;
            let bytes = self.cache.bytes(s);
            for i in first..g.rc_per_slice as usize {
                if g.rc.get(bytes, i) == 0 {
                    if n == 0 {
                        start = c;
                    }
                    n += 1;
                    c += 1;
                    if n == max {
                        break 'scan;
                    }
                } else if n > 0 {
                    break 'scan;
                } else {
                    c += 1;
                }
            }
        }
        for i in start..start + n {
            if self.meta_clusters.contains_key(&i) {
                return Err(self.fail(corrupt!(
                    "cluster {:#x} holds metadata but its refcount is 0",
                    i << g.bits
                )));
            }
        }
        for i in start..start + n {
            self.set_refcount(i, 1)?;
        }
        self.free_hint = start + n;
        Ok((start, n))
    }

    /// Makes the file cover `end` bytes (growing it sparsely, a chunk at a time).
    pub(crate) fn cover(&mut self, end: u64) -> Result<()> {
        if end <= self.file_size {
            return Ok(());
        }
        let target = end
            .max(self.file_size.saturating_add(GROW_CHUNK))
            .next_multiple_of(self.g.cs);
        let r = self.storage.grow(target).or_else(|e| {
            // A fixed-size device, or a full file system: grow exactly, if that fits.
            if target > end {
                self.storage.grow(end)
            } else {
                Err(e)
            }
        });
        r.map_err(|e| Error::io("growing the image file", e))?;
        self.file_size = self.storage.size().unwrap_or(end).max(end);
        Ok(())
    }

    /// Prepares newly allocated clusters `c..c+n` for use: the file covers them and the
    /// zero watermark moves past them; returns whether they read as zeroes already (never
    /// written since the file grew over them).
    pub(crate) fn claim(&mut self, c: u64, n: u64) -> Result<bool> {
        self.cover((c + n) << self.g.bits)?;
        let fresh = c >= self.zero_from;
        self.zero_from = self.zero_from.max(c + n);
        Ok(fresh)
    }

    /// Prepares a newly allocated metadata cluster: reads as zeroes, remembered as metadata.
    pub(crate) fn claim_meta(&mut self, c: u64) -> Result<()> {
        if !self.claim(c, 1)? {
            write_zeroes(&*self.storage, c << self.g.bits, self.g.cs)
                .map_err(|e| self.fail(Error::io("zeroing a new metadata cluster", e)))?;
        }
        self.meta_clusters.insert(c, ());
        Ok(())
    }

    /// A refcount block for table index `t`, placed at cluster `c` (free, inside the range
    /// the block covers, so it describes itself).
    pub(crate) fn new_refblock(&mut self, t: u64, c: u64) -> Result<()> {
        if self.meta_clusters.contains_key(&c) {
            return Err(self.fail(corrupt!(
                "cluster {:#x} holds metadata but no refcount block covers it",
                c << self.g.bits
            )));
        }
        self.claim_meta(c)?;
        self.reftable[t as usize] = c << self.g.bits;
        self.reftable_dirty.mark(t as usize);
        self.set_refcount(c, 1)
    }

    /// Grows the refcount table to cover table index `need`, QEMU-style: new refcount blocks
    /// and the new table go right after the last cluster the old table covers, describing
    /// themselves; they are written and synced, then the header is switched to the new table
    /// and synced, then the old table's clusters are freed.
    /// Returns the first cluster the new structures occupy.
    pub(crate) fn grow_reftable(&mut self, need: u64) -> Result<u64> {
        // The new table copies the in-memory entries: make the blocks they point at durable.
        self.write_back(false)?;
        self.sync()?;
        let g = self.g;
        let old_n = self.reftable.len() as u64;
        let s = old_n * g.rc_per_block;
        let mut new_n = (need + 1).max(old_n * 2);
        let (blocks, tc) = loop {
            let tc = (new_n * 8).div_ceil(g.cs);
            let mut b = 1;
            while b < (b + tc).div_ceil(g.rc_per_block) {
                b += 1;
            }
            if new_n >= old_n + b {
                break (b, tc);
            }
            new_n = old_n + b;
        };
        if tc * g.cs > MAX_REFTABLE_BYTES {
            return Err(Error::NoSpace(
                "the refcount table would exceed QEMU's 8 MiB limit".into(),
            ));
        }
        let total = blocks + tc;
        if (s + total) << g.bits > MAX_HOST_OFFSET {
            return Err(Error::NoSpace("the image file reached 64 PiB".into()));
        }
        for c in s..s + total {
            if self.meta_clusters.contains_key(&c) {
                return Err(self.fail(corrupt!(
                    "cluster {:#x} holds metadata beyond the refcount table",
                    c << g.bits
                )));
            }
        }
        self.claim(s, total)?;
        let io = |e| Error::io("growing the refcount table", e);
        let mut buf = vec![0u8; g.cs as usize];
        for j in 0..blocks {
            buf.fill(0);
            let first = s + j * g.rc_per_block;
            for c in first.max(s)..(first + g.rc_per_block).min(s + total) {
                g.rc.set(&mut buf, (c - first) as usize, 1);
            }
            let r = self.storage.write_at(&buf, (s + j) << g.bits);
            r.map_err(|e| self.fail(io(e)))?;
        }
        let entries = (tc * g.cs / 8) as usize;
        let mut table = std::mem::take(&mut self.reftable);
        table.resize(entries, 0);
        for j in 0..blocks {
            table[(old_n + j) as usize] = (s + j) << g.bits;
        }
        let mut bytes = vec![0u8; entries * 8];
        for (i, e) in table.iter().enumerate() {
            bytes[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
        }
        let new_off = (s + blocks) << g.bits;
        let old_off = self.header.refcount_table_offset;
        let old_clusters = self.header.refcount_table_clusters as u64;
        // Until the header points at it, the new table is only a leak: restore the old one
        // in memory if anything fails.
        let r = self.storage.write_at(&bytes, new_off);
        if let Err(e) = r {
            table.truncate(old_n as usize);
            self.reftable = table;
            return Err(self.fail(io(e)));
        }
        self.reftable = table;
        self.reftable_dirty = Dirty::new(entries);
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&new_off.to_be_bytes());
        hdr[8..].copy_from_slice(&(tc as u32).to_be_bytes());
        self.sync()?;
        let r = self.storage.write_at(&hdr, field::REFCOUNT_TABLE_OFFSET);
        r.map_err(|e| self.fail(io(e)))?;
        self.sync()?;
        self.header.refcount_table_offset = new_off;
        self.header.refcount_table_clusters = tc as u32;
        for c in s..s + total {
            self.meta_clusters.insert(c, ());
        }
        // Nothing references the old table now.
        for c in old_off >> g.bits..(old_off >> g.bits) + old_clusters {
            self.meta_clusters.remove(&c);
            self.decref(c)?;
        }
        Ok(s)
    }

    /// Drops cluster `c`'s refcount by one now.
    pub(crate) fn decref(&mut self, c: u64) -> Result<()> {
        let v = self.refcount(c)?;
        if v == 0 {
            return Err(self.fail(corrupt!(
                "refcount of cluster {:#x} would drop below 0",
                c << self.g.bits
            )));
        }
        self.set_refcount(c, v - 1)?;
        if v == 1 {
            self.free_hint = self.free_hint.min(c);
            self.meta_clusters.remove(&c);
            // A hint: the space may go back to the file system.
            let _ = self.storage.discard(c << self.g.bits, self.g.cs);
        }
        Ok(())
    }

    /// Clusters `offset..` (`n` of them) lose a reference once the L2 change that dropped it
    /// is durable (at the next write-back).
    pub(crate) fn defer_free(&mut self, offset: u64, n: u64) {
        self.deferred.push((offset >> self.g.bits, n));
    }

    /// Applies the deferred frees (their L2 changes are durable).
    pub(crate) fn apply_deferred(&mut self) -> Result<()> {
        let list = std::mem::take(&mut self.deferred);
        for &(c, n) in &list {
            for i in c..c + n {
                self.decref(i)?;
            }
        }
        Ok(())
    }
}
