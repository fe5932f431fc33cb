//! The data path of one image: mapping reads, mapping (and allocating) writes, committing
//! them, flushing, and dropping whole blocks.
//!
//! # Crash safety (the ordering)
//!
//! A new block is placed past the end of the file, at a sector chosen so that its data starts
//! on a 4 KiB boundary and the old footer is never overwritten. Then:
//!
//! 1. **Footer** (in [`Image::map_write`], before the data IO): the footer is written at the
//!    block's end. This extends the file, so the block's bitmap and data read as zeroes; the
//!    BAT still does not reference the block. A crash now leaks the space, nothing else.
//! 2. **Data**: the caller writes the data at the returned offset.
//! 3. **Commit** ([`Image::commit`], after the data IO succeeded): the block's BAT entry (set
//!    in memory at step 1) and the sector bitmap bits are dirty in the cache; blktap's batmap
//!    bit is set in memory when the block became full.
//! 4. **Flush** ([`Image::flush`]): fdatasync (data, the zeroed region and the footer are
//!    durable), then the dirty bitmaps and BAT sectors are written, fdatasync; then the batmap
//!    if it changed, fdatasync.
//!
//! So a BAT entry reaches the disk only after the region it points to is durably zero (its
//! bitmap reads "nothing here": reads go to the parent, or zeroes), and a bitmap bit only after
//! the data it vouches for: a crash leaks at worst a block and never shows stale data. The
//! batmap says "full" only for a block whose bitmap and BAT entry are durable. When the cache
//! must evict a dirty slot it does steps 4's first two parts (barrier, then write), so the same
//! holds. A write whose data IO fails is never committed: its bits stay clear.
//!
//! Dropping a block (discard) goes the other way: after a flush, the batmap bit is cleared
//! (written, fdatasync), then the BAT entry (written, fdatasync), then the space is punched.

use crate::cache::Key;
use crate::error::{Error, Result};
use crate::format::{clear_bit, run_len, set_bit, test_bit, DiskType, BAT_UNUSED, SECTOR};
use crate::image::{Image, Ticket, TicketKind};

/// Where a range of one image is, for reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// In this image's file at this byte offset.
    Data {
        /// Byte offset in the file of the range's first byte.
        file_offset: u64,
    },
    /// Not here: read the same range from the parent.
    Parent,
    /// Reads as zeroes.
    Zero,
}

/// A prefix of a requested range with one [`Mapping`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Bytes covered, from the offset asked for (a multiple of 512, at least 512).
    pub len: u64,
    /// Where they are.
    pub map: Mapping,
}

/// Where a prefix of a write goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteMap {
    /// Bytes covered, from the offset asked for (a multiple of 512).
    pub len: u64,
    /// Byte offset in the file where they go.
    pub file_offset: u64,
    /// Whether a block was allocated for this write (its footer already moved).
    pub allocated: bool,
    /// To hand to [`Image::commit`] once the data is written.
    pub ticket: Ticket,
}

impl Image {
    fn check_io(&self, offset: u64, len: u64) -> Result<()> {
        let ok = len > 0
            && offset.is_multiple_of(SECTOR)
            && len.is_multiple_of(SECTOR)
            && offset
                .checked_add(len)
                .is_some_and(|e| e <= self.footer.current_size);
        if ok {
            Ok(())
        } else {
            Err(Error::Range(format!(
                "{len} bytes at {offset}: not whole sectors inside the {}-byte disk {}",
                self.footer.current_size, self.name
            )))
        }
    }

    /// Where `len` bytes at `offset` (whole sectors) are: the longest prefix with one kind of
    /// mapping, within one block.
    pub fn map_read(&mut self, offset: u64, len: u64) -> Result<Extent> {
        self.check_io(offset, len)?;
        if self.footer.disk_type == DiskType::Fixed {
            return Ok(Extent {
                len,
                map: Mapping::Data {
                    file_offset: offset,
                },
            });
        }
        let absent = if self.footer.disk_type == DiskType::Differencing {
            Mapping::Parent
        } else {
            Mapping::Zero
        };
        let block = (offset / self.block_size) as u32;
        let within = offset % self.block_size;
        let n = len.min(self.block_size - within);
        let e = self.bat_entry(block)?;
        if e == BAT_UNUSED {
            return Ok(Extent {
                len: n,
                map: absent,
            });
        }
        let data = (e as u64 + self.bm_secs as u64) * SECTOR + within;
        if self.batmap_full(block) {
            self.cache.count_batmap_hit();
            return Ok(Extent {
                len: n,
                map: Mapping::Data { file_offset: data },
            });
        }
        let s = self.slot(Key::Bitmap(block))?;
        let first = (within / SECTOR) as usize;
        let end = first + (n / SECTOR) as usize;
        let bm = self.cache.buf(s);
        let run = run_len(bm, first, end) as u64 * SECTOR;
        let map = if test_bit(bm, first) {
            Mapping::Data { file_offset: data }
        } else {
            absent
        };
        Ok(Extent { len: run, map })
    }

    /// Where `len` bytes at `offset` (whole sectors) are to be written: the prefix inside one
    /// block, allocating the block (and moving the footer behind it) first if needed.
    pub fn map_write(&mut self, offset: u64, len: u64) -> Result<WriteMap> {
        if self.read_only {
            return Err(Error::ReadOnly(self.name.clone()));
        }
        if let Some(s) = &self.stopped {
            return Err(Error::Stopped(s.clone()));
        }
        self.check_io(offset, len)?;
        if self.footer.disk_type == DiskType::Fixed {
            return Ok(WriteMap {
                len,
                file_offset: offset,
                allocated: false,
                ticket: Ticket {
                    kind: TicketKind::Nothing,
                },
            });
        }
        let block = (offset / self.block_size) as u32;
        let within = offset % self.block_size;
        let n = len.min(self.block_size - within);
        let mut e = self.bat_entry(block)?;
        let allocated = e == BAT_UNUSED;
        if allocated {
            e = self.allocate(block)?;
        }
        let kind = if !allocated && self.batmap_full(block) {
            TicketKind::Nothing
        } else {
            TicketKind::Bits {
                block,
                entry: e,
                first: (within / SECTOR) as u32,
                count: (n / SECTOR) as u32,
            }
        };
        Ok(WriteMap {
            len: n,
            file_offset: (e as u64 + self.bm_secs as u64) * SECTOR + within,
            allocated,
            ticket: Ticket { kind },
        })
    }

    /// Places a new block for `block` past the end of the file and writes the footer behind
    /// it (step 1 of the ordering). Returns its BAT entry, already set in the cache.
    fn allocate(&mut self, block: u32) -> Result<u32> {
        let start = self.place_block()?;
        self.set_bat_entry(block, start)?;
        // Its bitmap is all zero on disk: cache it without a read.
        if self.cache.peek(Key::Bitmap(block)).is_none() {
            let slot = self.free_slot()?;
            self.cache
                .install(slot, Key::Bitmap(block), start as u64 * SECTOR);
            *self.cache.buf_mut(slot) = [0; 512];
        }
        Ok(start)
    }

    /// Reserves room for a block past the end of the file and moves the footer behind it
    /// (or zeroes it on a block device); returns its first sector. Nothing points at it yet.
    pub(crate) fn place_block(&mut self) -> Result<u32> {
        let bm = self.bm_secs as u64;
        // Data on a 4 KiB boundary: (start + bitmap sectors) % 8 == 0.
        let mut start = self.alloc_from;
        start += (8 - (start + bm) % 8) % 8;
        let end = start + bm + self.spb as u64;
        if start > u32::MAX as u64 - 1 {
            return Err(Error::NoSpace(format!(
                "{}: the BAT's 32-bit sector offsets cannot reach past {}",
                self.name,
                u32::MAX
            )));
        }
        let footer = self.footer.encode();
        let (s, e) = (start * SECTOR, end * SECTOR);
        if self.backing.fixed_size() {
            // A block device: the footer stays at its end; zero the region explicitly.
            if e > self.end_limit() {
                return Err(Error::NoSpace(format!(
                    "{}: no room for another block",
                    self.name
                )));
            }
            let z = vec![0u8; (e - s) as usize];
            self.backing
                .write_at(&z, s)
                .map_err(|err| Error::io("zeroing a new block", err))?;
        } else {
            self.backing
                .write_at(&footer, e)
                .map_err(|err| Error::io("writing the footer behind a new block", err))?;
            self.file_size = e + footer.len() as u64;
            self.footer_from_copy = false;
        }
        self.end_of_data = self.end_of_data.max(e);
        self.alloc_from = if self.backing.fixed_size() {
            end
        } else {
            end + 1
        };
        Ok(start as u32)
    }

    /// Records a write whose data IO has completed: sets the bitmap bits (and blktap's batmap
    /// bit when the block became full). Durable at the next [`Image::flush`].
    pub fn commit(&mut self, ticket: Ticket) -> Result<()> {
        let TicketKind::Bits {
            block,
            entry,
            first,
            count,
        } = ticket.kind
        else {
            return Ok(());
        };
        if self.bat_entry(block)? != entry {
            // The block was dropped (discarded) while the write was in flight: nothing to
            // record; its data went to space no longer referenced.
            return Ok(());
        }
        let s = self.slot(Key::Bitmap(block))?;
        let bm = self.cache.buf_mut(s);
        let (first, end) = (first as usize, (first + count) as usize);
        if run_len(bm, first, end) != end - first || !test_bit(bm, first) {
            for i in first..end {
                set_bit(bm, i);
            }
            self.cache.set_dirty(s, true);
        }
        let spb = self.spb as usize;
        let full = run_len(self.cache.buf(s), 0, spb) == spb && test_bit(self.cache.buf(s), 0);
        if full {
            if let Some(m) = self.batmap.as_mut() {
                if (block as usize) < m.map.len() * 8 && !test_bit(&m.map, block as usize) {
                    set_bit(&mut m.map, block as usize);
                    m.dirty = true;
                }
            }
        }
        Ok(())
    }

    /// Makes every committed write durable (the barrier): fdatasync, the dirty bitmaps and BAT
    /// sectors, fdatasync, then the batmap if it changed, fdatasync. No data IO of this image
    /// may be in flight.
    pub fn flush(&mut self) -> Result<()> {
        if let Some(s) = &self.stopped {
            return Err(Error::Stopped(s.clone()));
        }
        if self.read_only {
            return Ok(());
        }
        if self.cache.any_dirty() {
            self.write_back(true)?;
        } else {
            self.sync("flush")?;
        }
        if self.write_batmap()? {
            self.sync("barrier after the batmap")?;
        }
        if self.footer_from_copy {
            // Opened after a crash lost the footer at the end: put it back (blktap does on
            // close), now that everything before it is durable.
            self.put_footers()?;
        }
        Ok(())
    }

    /// Whether a flush has anything to write besides the fdatasync.
    pub fn metadata_dirty(&self) -> bool {
        self.cache.any_dirty() || self.batmap.as_ref().is_some_and(|m| m.dirty)
    }

    /// Whether `block` has a BAT entry.
    pub fn block_allocated(&mut self, block: u32) -> Result<bool> {
        if self.footer.disk_type == DiskType::Fixed {
            return Ok(true);
        }
        if block >= self.blocks {
            return Ok(false);
        }
        Ok(self.bat_entry(block)? != BAT_UNUSED)
    }

    /// Whether any block overlapping `len` bytes at `offset` is allocated (fixed disks: the
    /// range lies inside the disk).
    pub fn range_allocated(&mut self, offset: u64, len: u64) -> Result<bool> {
        let end = offset.saturating_add(len).min(self.footer.current_size);
        if offset >= end {
            return Ok(false);
        }
        if self.footer.disk_type == DiskType::Fixed {
            return Ok(true);
        }
        let first = offset / self.block_size;
        let last = (end - 1) / self.block_size;
        for b in first..=last {
            if self.bat_entry(b as u32)? != BAT_UNUSED {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Drops the allocated blocks lying wholly inside `len` bytes at `offset` for which
    /// `droppable(block_offset, block_len)` agrees (a chain passes "nothing below"), and gives
    /// their space back. A fixed disk punches the range instead. Returns the blocks dropped.
    /// Synchronous and ordered (see the module docs); no data IO may be in flight.
    pub fn discard_blocks(
        &mut self,
        offset: u64,
        len: u64,
        droppable: &mut dyn FnMut(u64, u64) -> Result<bool>,
    ) -> Result<u64> {
        if self.read_only {
            return Err(Error::ReadOnly(self.name.clone()));
        }
        self.check_io(offset, len)?;
        if self.footer.disk_type == DiskType::Fixed {
            if droppable(offset, len)? {
                self.backing
                    .punch_hole(offset, len)
                    .map_err(|e| Error::io("punching a hole", e))?;
            }
            return Ok(0);
        }
        let bs = self.block_size;
        let first = offset.div_ceil(bs);
        let last = (offset + len) / bs; // exclusive
        let mut dropped = Vec::new();
        for b in first..last.min(self.blocks as u64) {
            let b = b as u32;
            let e = self.bat_entry(b)?;
            if e != BAT_UNUSED && droppable(b as u64 * bs, bs)? {
                dropped.push((b, e));
            }
        }
        if dropped.is_empty() {
            return Ok(0);
        }
        self.flush()?;
        let mut batmap_changed = false;
        for &(b, _) in &dropped {
            if let Some(m) = self.batmap.as_mut() {
                if test_bit(&m.map, b as usize) {
                    clear_bit(&mut m.map, b as usize);
                    m.dirty = true;
                    batmap_changed = true;
                }
            }
        }
        if batmap_changed {
            self.write_batmap()?;
            self.sync("barrier after the batmap")?;
        }
        for &(b, _) in &dropped {
            self.set_bat_entry(b, BAT_UNUSED)?;
            self.cache.remove(Key::Bitmap(b));
        }
        self.write_back(true)?;
        let bytes = self.block_bytes();
        for &(_, e) in &dropped {
            self.backing
                .punch_hole(e as u64 * SECTOR, bytes)
                .map_err(|err| Error::io("punching a dropped block", err))?;
        }
        Ok(dropped.len() as u64)
    }
}

impl Image {
    /// Blocks with a BAT entry (blktap's `query -a`).
    pub fn allocated_blocks(&mut self) -> Result<u32> {
        let mut n = 0;
        if self.footer.disk_type == DiskType::Fixed {
            return Ok(0);
        }
        for b in 0..self.blocks {
            if self.bat_entry(b)? != BAT_UNUSED {
                n += 1;
            }
        }
        Ok(n)
    }

    /// The BAT entry (sector of the block's bitmap) of `block`, if allocated.
    pub fn block_sector(&mut self, block: u32) -> Result<Option<u32>> {
        if self.footer.disk_type == DiskType::Fixed || block >= self.blocks {
            return Ok(None);
        }
        let e = self.bat_entry(block)?;
        Ok((e != BAT_UNUSED).then_some(e))
    }

    /// The sector bitmap of an allocated `block` (a copy).
    pub fn block_bitmap(&mut self, block: u32) -> Result<Option<[u8; 512]>> {
        if self.block_sector(block)?.is_none() {
            return Ok(None);
        }
        let s = self.slot(Key::Bitmap(block))?;
        Ok(Some(*self.cache.buf(s)))
    }

    /// Whether blktap's batmap marks `block` full.
    pub fn batmap_says_full(&self, block: u32) -> bool {
        self.batmap_full(block)
    }
}
