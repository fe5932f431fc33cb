//! Metadata IO: loading slices into the cache, and writing everything back in the order that
//! keeps the image consistent on disk at every instant (see the crate doc, "Crash safety").
//!
//! The invariants the rest of the crate keeps, which make this order sufficient:
//! - a refcount block in the cache differs from the disk only by increments (allocations),
//!   and by decrements whose cause (an L2 entry no longer pointing there) is already durable;
//!   so a refcount block may be written at any time;
//! - an L2 entry in the cache points only at clusters whose data write completed and whose
//!   refcount increment is in the cache; so an L2 slice may be written once the refcount
//!   blocks (and any new refcount table entries) and the data are durable;
//! - the L1 table points at a new L2 table only once that table is durable.

use crate::cache::{Key, Kind};
use crate::entry::put_be64_at;
use crate::error::{Error, Result};
use crate::image::{Image, Table};

impl Image {
    /// `fdatasync`, counted.
    pub(crate) fn sync(&mut self) -> Result<()> {
        self.cache.counters.sync();
        self.storage
            .flush()
            .map_err(|e| self.fail(Error::io("flushing the image file", e)))?;
        self.linked_since_sync = false;
        Ok(())
    }

    /// Latches a failed metadata write: in-memory and on-disk state may now differ in ways
    /// the ordering rules no longer cover, so no further changes are made.
    pub(crate) fn fail(&mut self, e: Error) -> Error {
        if self.stopped.is_none() {
            self.stopped = Some(e.to_string());
        }
        e
    }

    /// The cache slot holding the slice at `offset` of `kind`, loading it on a miss.
    pub(crate) fn slot(&mut self, kind: Kind, offset: u64) -> Result<usize> {
        let key = Key::new(kind, offset);
        if let Some(s) = self.cache.find(key) {
            return Ok(s);
        }
        let s = self.free_slot()?;
        // Freeing a slot may have written back and applied deferred frees, which can load
        // this very slice: never load a second, stale copy of it.
        if let Some(s) = self.cache.peek(key) {
            return Ok(s);
        }
        let buf = self.cache.take(s);
        self.storage.read_at(buf, offset).map_err(|e| {
            Error::io(
                match kind {
                    Kind::L2 => "reading an L2 table",
                    Kind::Refblock => "reading a refcount block",
                },
                e,
            )
        })?;
        self.cache.install(s, key);
        Ok(s)
    }

    /// A slot that can be reused now: a clean one, else one made clean by writing back (a
    /// refcount block alone; an L2 slice with everything it depends on).
    fn free_slot(&mut self) -> Result<usize> {
        for _ in 0..4 {
            if let Some(s) = self.cache.victim() {
                return Ok(s);
            }
            // Every slot is dirty. A refcount block may be written at any time; an L2 slice
            // needs the ordered write-back (which may leave refcount blocks dirty again, with
            // the deferred frees it applies).
            let refblock = (0..self.cache.slots()).find(|&s| {
                self.cache
                    .key(s)
                    .is_some_and(|k| k.kind() == Kind::Refblock)
            });
            match refblock {
                Some(s) => self.write_slot(s)?,
                None => self.write_back(false)?,
            }
        }
        Err(Error::Stopped("no cache slot could be freed".into()))
    }

    /// Writes slot `s` to its place in the file and marks it clean.
    fn write_slot(&mut self, s: usize) -> Result<()> {
        let Some(key) = self.cache.key(s) else {
            return Ok(());
        };
        let r = self.storage.write_at(self.cache.bytes(s), key.offset());
        r.map_err(|e| self.fail(Error::io("writing metadata", e)))?;
        self.cache.mark_clean(s);
        Ok(())
    }

    /// Writes every dirty slice of `kind`; whether there was any.
    fn write_dirty(&mut self, kind: Kind) -> Result<bool> {
        let mut list = std::mem::take(&mut self.scratch);
        self.cache.dirty_slots(kind, &mut list);
        let mut r = Ok(!list.is_empty());
        for &s in &list {
            if let Err(e) = self.write_slot(s) {
                r = Err(e);
                break;
            }
        }
        self.scratch = list;
        r
    }

    /// Writes the dirty 512-byte sectors of the L1 or refcount table.
    fn write_table(&mut self, which: Table) -> Result<()> {
        let mut list = Vec::new();
        let (entries, offset) = match which {
            Table::L1 => {
                self.l1_dirty.take(&mut list);
                (&self.l1, self.header.l1_table_offset)
            }
            Table::Refcount => {
                self.reftable_dirty.take(&mut list);
                (&self.reftable, self.header.refcount_table_offset)
            }
        };
        let mut sector = [0u8; 512];
        let mut r = Ok(());
        for &sec in &list {
            let first = sec * 64;
            let n = entries.len().saturating_sub(first).min(64);
            sector.fill(0);
            for i in 0..n {
                put_be64_at(&mut sector, i, entries[first + i]);
            }
            // The table's last sector may be partly outside the table: write only entries.
            if let Err(e) = self
                .storage
                .write_at(&sector[..n * 8], offset + first as u64 * 8)
            {
                r = Err(Error::io("writing the L1 or refcount table", e));
                break;
            }
        }
        r.map_err(|e| self.fail(e))
    }

    /// Writes back every change in the cache and the in-memory tables, in order:
    ///
    /// 1. refcount blocks; then, if the refcount table changed (new blocks), sync and the
    ///    table; then sync (this also makes the data of committed writes durable);
    /// 2. L2 slices; then, if the L1 table changed (new L2 tables), sync and the L1 table;
    ///    then sync;
    /// 3. the deferred frees: refcounts of clusters no L2 entry points at any more drop (in
    ///    the cache; written back later).
    ///
    /// Each sync is skipped when the step before it wrote nothing; with `final_sync` the
    /// last step always ends with one (a flush: everything before it durable).
    pub(crate) fn write_back(&mut self, final_sync: bool) -> Result<()> {
        if let Some(s) = &self.stopped {
            return Err(Error::Stopped(s.clone()));
        }
        let wrote_rc = self.write_dirty(Kind::Refblock)?;
        if self.reftable_dirty.any() {
            self.sync()?;
            self.write_table(Table::Refcount)?;
            self.sync()?;
        } else if wrote_rc || self.linked_since_sync {
            self.sync()?;
        }
        let wrote_l2 = self.write_dirty(Kind::L2)?;
        let mut synced = false;
        if self.l1_dirty.any() {
            self.sync()?;
            self.write_table(Table::L1)?;
            self.sync()?;
            synced = true;
        } else if wrote_l2 || final_sync || !self.deferred.is_empty() {
            self.sync()?;
            synced = true;
        }
        if synced {
            self.apply_deferred()?;
        }
        Ok(())
    }

    /// Makes every write whose ticket was committed, and every zeroing and discard before
    /// it, durable. Call it when no data IO is in flight.
    pub fn flush(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.write_back(true)
    }

    /// Flushes until nothing is left to write (deferred frees applied and written), so the
    /// image is clean for `qemu-img check`. The image stays usable.
    pub fn close(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.write_back(true)?;
        if self.cache.any_dirty(Kind::Refblock) || self.cache.any_dirty(Kind::L2) {
            self.write_back(true)?;
        }
        Ok(())
    }

    /// Whether anything is waiting to be written back.
    pub fn has_unwritten_metadata(&self) -> bool {
        self.cache.any_dirty(Kind::Refblock)
            || self.cache.any_dirty(Kind::L2)
            || self.l1_dirty.any()
            || self.reftable_dirty.any()
            || !self.deferred.is_empty()
    }
}

impl Drop for Image {
    /// A best-effort flush, so tools that forget one do not lose data. A block driver
    /// flushes explicitly and reports errors.
    fn drop(&mut self) {
        if !self.read_only && self.stopped.is_none() && self.pending.is_empty() {
            let _ = self.close();
        }
    }
}
