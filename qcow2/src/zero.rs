//! Zeroing and discard: whole clusters change only their L2 entries (the zero flag in
//! version 3, unallocated in version 2 without a backing file), and are freed when the
//! caller allows it; partial clusters get zeroes written like data.

use crate::entry::{COPIED, L2, ZERO};
use crate::error::Result;
use crate::image::Image;
use crate::write::GuestReader;

impl Image {
    /// Makes `len` guest bytes from `offset` read as zeroes. With `unmap`, whole clusters
    /// give their host clusters back (freed once the L2 change is durable); without it,
    /// version 3 keeps them allocated (zero flag with the offset, as QEMU's
    /// `write-zeroes` without `may-unmap` does). Synchronous: partial clusters are written
    /// with zeroes through the same path as data.
    pub fn write_zeroes(
        &mut self,
        offset: u64,
        len: u64,
        unmap: bool,
        backing: Option<&dyn GuestReader>,
    ) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let g = self.g;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let gc = pos >> g.bits;
            let cstart = gc << g.bits;
            let cend = (cstart + g.cs).min(g.disk_size);
            let n = cend.min(end) - pos;
            let whole = pos == cstart && end >= cend;
            // No L2 table, no backing image: the whole table's range reads as zeroes already.
            if whole && pos >= self.backing_size && self.l2_missing(gc) {
                let table_end = (gc / g.l2_entries + 1) * g.l2_entries;
                pos = (table_end << g.bits).min(end);
                continue;
            }
            if !(whole && !self.pending.contains_key(&gc) && self.zero_cluster(gc, unmap)?) {
                self.write_zero_bytes(pos, n, backing)?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Discard (TRIM): the range reads as zeroes afterwards, and whole clusters are freed.
    /// (Stricter than QEMU's discard, which may leave partial clusters and, in version 2
    /// images, expose the backing file: here a discarded range always reads as zeroes.)
    pub fn discard(
        &mut self,
        offset: u64,
        len: u64,
        backing: Option<&dyn GuestReader>,
    ) -> Result<()> {
        self.write_zeroes(offset, len, true, backing)
    }

    /// Zeroes whole guest cluster `gc` by its L2 entry; false if the format cannot say it
    /// (version 2 with a backing file, or an allocated cluster kept allocated).
    fn zero_cluster(&mut self, gc: u64, unmap: bool) -> Result<bool> {
        let g = self.g;
        let (_, e) = self.l2_decoded(gc)?;
        let backed = (gc << g.bits) < self.backing_size;
        let free_old = |img: &mut Image, e: L2| match e {
            L2::Data { offset, .. } => img.defer_free(offset, 1),
            L2::Zero(Some(h)) => img.defer_free(h, 1),
            L2::Compressed(c) => {
                let (off, n) = c.clusters(g.bits);
                img.defer_free(off, n)
            }
            L2::Unallocated | L2::Zero(None) => {}
        };
        if g.version >= 3 {
            let new = match e {
                L2::Zero(None) => return Ok(true),
                L2::Unallocated if !backed => return Ok(true),
                L2::Zero(Some(_)) if !unmap => return Ok(true),
                L2::Data {
                    offset,
                    copied: true,
                } if !unmap => offset | COPIED | ZERO,
                _ => ZERO,
            };
            self.ensure_l2_table(gc)?;
            self.l2_set(gc, new)?;
            if new == ZERO {
                free_old(self, e);
            }
            return Ok(true);
        }
        if backed {
            return Ok(false);
        }
        match e {
            L2::Unallocated => Ok(true),
            L2::Data { copied: true, .. } if !unmap => Ok(false),
            _ => {
                self.l2_set(gc, 0)?;
                free_old(self, e);
                Ok(true)
            }
        }
    }

    /// Writes zero bytes to `len` guest bytes from `offset` through the write mapping.
    fn write_zero_bytes(
        &mut self,
        offset: u64,
        len: u64,
        backing: Option<&dyn GuestReader>,
    ) -> Result<()> {
        let mut done = 0;
        while done < len {
            let w = self.map_write(offset + done, len - done, backing)?;
            let r = crate::storage::write_zeroes(&*self.storage, w.offset, w.len)
                .map_err(|e| crate::error::Error::io("writing zeroes", e));
            match (r, w.ticket) {
                (Ok(()), Some(t)) => self.commit(t)?,
                (Ok(()), None) => {}
                (Err(e), Some(t)) => {
                    self.abort(t);
                    return Err(e);
                }
                (Err(e), None) => return Err(e),
            }
            done += w.len;
        }
        Ok(())
    }
}
