//! One VHD file: opening and validating its metadata, and the metadata cache plumbing (BAT
//! and bitmap sectors in, dirty sectors out). The data path is in `map.rs`.

use crate::backing::Backing;
use crate::cache::{Cache, Key, StatsHandle, DEFAULT_SLOTS};
use crate::error::{Error, Result};
use crate::format::{
    batmap_checksum, batmap_used_bytes, BatmapHeader, DiskType, Footer, Header, Locator,
    PlatformCode, BATMAP_HEADER_SIZE, BATMAP_VERSION_1_1, BAT_UNUSED, FOOTER_SIZE, HEADER_SIZE,
    SECTOR,
};

/// What [`Image::commit`] must record once the data IO of a mapped write has completed.
/// Dropping it instead (the IO failed) leaves the range as it was. (Defined here, beside the
/// image it belongs to; `map.rs` makes and commits them.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "commit the ticket after the data IO completes, or drop it if the IO failed"]
pub struct Ticket {
    pub(crate) kind: TicketKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TicketKind {
    /// Nothing to record (fixed disk, or a block already full).
    Nothing,
    /// Set `count` bitmap bits from `first` in `block`, stored at BAT entry `entry`.
    Bits {
        block: u32,
        entry: u32,
        first: u32,
        count: u32,
    },
}

/// How to open an image.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Refuse writes and metadata changes.
    pub read_only: bool,
    /// Metadata cache slots of 512 bytes (BAT sectors and bitmaps); at least 2.
    pub cache_slots: usize,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read_only: true,
            cache_slots: DEFAULT_SLOTS,
        }
    }
}

/// blktap's batmap as loaded: one bit per block, set when every sector of the block is
/// written, so reads need no bitmap.
#[derive(Debug)]
pub(crate) struct Batmap {
    pub header: BatmapHeader,
    /// Where the header is: right after the BAT's space.
    pub header_offset: u64,
    /// The bytes blktap reads and checksums (`batmap_used_bytes`).
    pub map: Vec<u8>,
    /// Changed since written.
    pub dirty: bool,
}

/// A byte range of metadata no block may overlap.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Region {
    pub start: u64,
    pub end: u64,
    pub what: &'static str,
}

/// One open VHD file.
pub struct Image {
    pub(crate) backing: Box<dyn Backing>,
    pub(crate) name: String,
    pub(crate) read_only: bool,
    pub(crate) footer: Footer,
    /// The footer at the end was missing or damaged; the copy at offset 0 was used.
    pub(crate) footer_from_copy: bool,
    pub(crate) header: Option<Header>,
    /// Bytes per block (dynamic disks).
    pub(crate) block_size: u64,
    /// Sectors per block.
    pub(crate) spb: u32,
    /// Sectors of a block's bitmap (1 for every accepted block size).
    pub(crate) bm_secs: u32,
    /// BAT entries in use: blocks covering the virtual size.
    pub(crate) blocks: u32,
    pub(crate) batmap: Option<Batmap>,
    pub(crate) cache: Cache,
    /// File size in bytes.
    pub(crate) file_size: u64,
    /// Metadata ranges (header, BAT, batmap, parent locator data).
    pub(crate) regions: Vec<Region>,
    /// End of metadata and data: where the footer belongs (bytes, sector aligned).
    pub(crate) end_of_data: u64,
    /// The next block's bitmap may start at this sector or later.
    pub(crate) alloc_from: u64,
    /// Set by a failed metadata write: nothing more is written.
    pub(crate) stopped: Option<String>,
    pub(crate) scratch: Vec<u32>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("name", &self.name)
            .field("type", &self.footer.disk_type)
            .field("size", &self.footer.current_size)
            .finish()
    }
}

fn read(b: &dyn Backing, buf: &mut [u8], off: u64, what: &str) -> Result<()> {
    b.read_at(buf, off)
        .map_err(|e| Error::io(format!("reading {what} at {off:#x}"), e))
}

impl Image {
    /// Opens the image in `backing`. `name` (its path) is used in messages.
    pub fn open(backing: Box<dyn Backing>, name: &str, opts: &OpenOptions) -> Result<Image> {
        let size = backing
            .size()
            .map_err(|e| Error::io(format!("size of {name}"), e))?;
        if size < FOOTER_SIZE as u64 {
            return Err(Error::NotVhd(format!(
                "{name} is {size} bytes, smaller than a footer"
            )));
        }
        // The footer at the end; blktap also accepts a 511-byte one (files of 512n + 511).
        let mut fb = [0u8; FOOTER_SIZE];
        let end_footer_at = if size % SECTOR == 511 {
            size - 511
        } else {
            size - 512
        };
        let n = (size - end_footer_at).min(FOOTER_SIZE as u64) as usize;
        read(&*backing, &mut fb[..n], end_footer_at, "footer")?;
        let (footer, from_copy) = match Footer::parse(&fb) {
            Ok(f) => (f, false),
            Err(end_err) => {
                // A dynamic disk has a copy at offset 0: a crash or a tool may have left the
                // end without a footer (blktap falls back the same way).
                let mut cb = [0u8; FOOTER_SIZE];
                read(&*backing, &mut cb, 0, "footer copy")?;
                match Footer::parse(&cb) {
                    Ok(f) if f.disk_type != DiskType::Fixed => (f, true),
                    _ => return Err(end_err),
                }
            }
        };
        // Data and metadata must end before the footer (or before the end when it is lost).
        let limit = if from_copy { size } else { end_footer_at };
        let mut img = Image {
            backing,
            name: name.to_string(),
            read_only: opts.read_only,
            footer,
            footer_from_copy: from_copy,
            header: None,
            block_size: 0,
            spb: 0,
            bm_secs: 0,
            blocks: 0,
            batmap: None,
            cache: Cache::new(opts.cache_slots),
            file_size: size,
            regions: Vec::new(),
            end_of_data: 0,
            alloc_from: 0,
            stopped: None,
            scratch: Vec::new(),
        };
        if img.footer.disk_type == DiskType::Fixed {
            if img.footer.current_size > limit {
                return Err(Error::field(
                    "footer",
                    "current_size",
                    format!(
                        "{} bytes of a fixed disk do not fit in a {size}-byte file",
                        img.footer.current_size
                    ),
                ));
            }
            img.end_of_data = img.footer.current_size;
            return Ok(img);
        }
        img.open_dynamic(limit)?;
        Ok(img)
    }

    fn open_dynamic(&mut self, limit: u64) -> Result<()> {
        let off = self.footer.data_offset;
        if off
            .checked_add(HEADER_SIZE as u64)
            .is_none_or(|e| e > limit)
        {
            return Err(Error::field(
                "footer",
                "data_offset",
                format!("{off:#x}: the dynamic header does not fit in the file"),
            ));
        }
        let mut hb = [0u8; HEADER_SIZE];
        read(&*self.backing, &mut hb, off, "dynamic header")?;
        let h = Header::parse(&hb)?;
        const S: &str = "dynamic header";
        let bs = h.block_size as u64;
        let blocks = self.footer.current_size.div_ceil(bs);
        if blocks > h.max_table_entries as u64 {
            return Err(Error::field(
                S,
                "max_table_entries",
                format!(
                    "{} entries cannot map {} bytes in blocks of {bs}",
                    h.max_table_entries, self.footer.current_size
                ),
            ));
        }
        let bat_space = (h.max_table_entries as u64 * 4).div_ceil(SECTOR) * SECTOR;
        let bat_used_end = h.table_offset.checked_add(blocks * 4);
        if bat_used_end.is_none_or(|end| end > limit) {
            return Err(Error::field(
                S,
                "table_offset",
                format!("{:#x}: the BAT does not fit in the file", h.table_offset),
            ));
        }
        self.block_size = bs;
        self.spb = (bs / SECTOR) as u32;
        self.bm_secs = (self.spb as u64).div_ceil(8 * SECTOR).max(1) as u32;
        self.blocks = blocks as u32;
        self.regions.push(Region {
            start: off,
            end: off + HEADER_SIZE as u64,
            what: "the dynamic header",
        });
        self.regions.push(Region {
            start: h.table_offset,
            end: h
                .table_offset
                .saturating_add(bat_space)
                .min(limit)
                .max(bat_used_end.unwrap_or(limit)),
            what: "the BAT",
        });
        if self.footer.disk_type == DiskType::Differencing
            || h.locators.iter().any(|l| l.code != PlatformCode::None)
        {
            for (i, l) in h.locators.iter().enumerate() {
                if l.code == PlatformCode::None {
                    continue;
                }
                let r = locator_region(l, limit).map_err(|reason| {
                    Error::field(
                        format!("parent locator {i}"),
                        "platform_data_offset",
                        reason,
                    )
                })?;
                self.regions.push(r);
            }
        }
        let batmap_offset = h.table_offset.saturating_add(bat_space);
        self.header = Some(h);
        self.load_batmap(batmap_offset, limit)?;
        self.scan_bat(limit)?;
        Ok(())
    }

    /// Loads blktap's batmap where the creator says there is one. A damaged one is ignored
    /// (read-only) or cleared to be rewritten at the next flush (read-write): a clear bit only
    /// means "look at the bitmap".
    fn load_batmap(&mut self, hoff: u64, limit: u64) -> Result<()> {
        let f = &self.footer;
        if !f.creator_is_tap() || f.creator_version < 0x0001_0001 {
            return Ok(());
        }
        if hoff.saturating_add(BATMAP_HEADER_SIZE as u64) > limit {
            return Ok(());
        }
        let mut hb = [0u8; BATMAP_HEADER_SIZE];
        read(&*self.backing, &mut hb, hoff, "batmap header")?;
        let header = match BatmapHeader::parse(&hb) {
            Ok(Some(h)) => h,
            // No batmap (or one this build does not know): run without.
            Ok(None) | Err(_) => return Ok(()),
        };
        let used = batmap_used_bytes(f.current_size);
        let space = header.size_sectors as u64 * SECTOR;
        let map_end = header.offset.checked_add(space);
        if space < used || map_end.is_none_or(|e| e > limit) {
            return Err(Error::field(
                "batmap header",
                "batmap_size",
                format!(
                    "{} sectors at {:#x}: too small for the disk or outside the file",
                    header.size_sectors, header.offset
                ),
            ));
        }
        let mut map = vec![0u8; used as usize];
        read(&*self.backing, &mut map, header.offset, "batmap")?;
        let valid = batmap_checksum(&map, header.version) == header.checksum;
        self.regions.push(Region {
            start: hoff,
            end: hoff + BATMAP_HEADER_SIZE as u64,
            what: "the batmap header",
        });
        self.regions.push(Region {
            start: header.offset,
            end: header.offset + space,
            what: "the batmap",
        });
        if !valid && self.read_only {
            return Ok(());
        }
        let dirty = !valid || header.version == BATMAP_VERSION_1_1;
        if !valid {
            map.fill(0);
        }
        self.batmap = Some(Batmap {
            header,
            header_offset: hoff,
            map,
            dirty,
        });
        Ok(())
    }

    /// Reads the whole BAT once: every entry must point at a block inside the file clear of
    /// the metadata; finds where the next block goes.
    fn scan_bat(&mut self, limit: u64) -> Result<()> {
        let table = self.header.as_ref().map(|h| h.table_offset).unwrap_or(0);
        let mut end = self.regions.iter().map(|r| r.end).max().unwrap_or(0);
        let total = self.blocks as u64 * 4;
        let mut buf = vec![0u8; total.min(64 << 10) as usize];
        let mut done = 0u64;
        while done < total {
            let n = (total - done).min(buf.len() as u64) as usize;
            read(&*self.backing, &mut buf[..n], table + done, "BAT")?;
            for (i, c) in buf[..n].chunks_exact(4).enumerate() {
                let e = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
                if e == BAT_UNUSED {
                    continue;
                }
                let block = (done / 4) as u32 + i as u32;
                let (_, be) = self.check_entry(block, e, limit)?;
                end = end.max(be);
            }
            done += n as u64;
        }
        self.end_of_data = end.div_ceil(SECTOR) * SECTOR;
        let first_free = if self.backing.fixed_size() {
            self.end_of_data
        } else {
            self.end_of_data.max(self.file_size)
        };
        self.alloc_from = first_free.div_ceil(SECTOR);
        Ok(())
    }

    /// Checks BAT entry `e` of `block`: returns the block's byte range (bitmap included).
    pub(crate) fn check_entry(&self, block: u32, e: u32, limit: u64) -> Result<(u64, u64)> {
        let start = e as u64 * SECTOR;
        let end = start + (self.bm_secs as u64 + self.spb as u64) * SECTOR;
        let bad = |reason: String| Error::field("BAT", "entry", format!("block {block}: {reason}"));
        if end > limit {
            return Err(bad(format!(
                "sector {e} puts the block beyond the end of the file"
            )));
        }
        if let Some(r) = self.regions.iter().find(|r| start < r.end && r.start < end) {
            return Err(bad(format!("sector {e} puts the block over {}", r.what)));
        }
        Ok((start, end))
    }

    /// Where the footer at the end of the file belongs, given the file now.
    pub(crate) fn end_limit(&self) -> u64 {
        if self.backing.fixed_size() {
            self.file_size.saturating_sub(FOOTER_SIZE as u64)
        } else {
            self.file_size
        }
    }

    /// The slot holding `key`, loading it on a miss (evicting, and first writing back dirty
    /// slots, when the cache is full).
    pub(crate) fn slot(&mut self, key: Key) -> Result<u32> {
        if let Some(s) = self.cache.lookup(key) {
            return Ok(s);
        }
        let mut buf = [0u8; 512];
        // Where the sector is, found before a slot is chosen (finding a bitmap may load a
        // BAT sector into the cache).
        let (off, want) = match key {
            Key::Bat(n) => {
                buf.fill(0xff);
                let table = self.header.as_ref().map(|h| h.table_offset).unwrap_or(0);
                // The last BAT sector may be cut short by the end of the used entries.
                let want = (self.blocks as u64 * 4)
                    .saturating_sub(n as u64 * SECTOR)
                    .min(SECTOR);
                (table + n as u64 * SECTOR, want as usize)
            }
            Key::Bitmap(b) => (self.bat_entry(b)? as u64 * SECTOR, 512),
        };
        let s = self.free_slot()?;
        read(&*self.backing, &mut buf[..want], off, "metadata")?;
        self.cache.install(s, key, off);
        *self.cache.buf_mut(s) = buf;
        Ok(s)
    }

    /// A slot to fill, clean.
    pub(crate) fn free_slot(&mut self) -> Result<u32> {
        let s = self.cache.victim();
        if self.cache.is_dirty(s) {
            self.cache.count_writeback();
            self.write_back(false)?;
        }
        Ok(s)
    }

    /// BAT entry of `block` (validated), from the cache.
    pub(crate) fn bat_entry(&mut self, block: u32) -> Result<u32> {
        let s = self.slot(Key::Bat(block / 128))?;
        let i = (block % 128) as usize * 4;
        let b = self.cache.buf(s);
        let e = u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        if e != BAT_UNUSED {
            let limit = self.end_limit();
            self.check_entry(block, e, limit)?;
        }
        Ok(e)
    }

    /// Sets the BAT entry of `block` in the cache (dirty).
    pub(crate) fn set_bat_entry(&mut self, block: u32, e: u32) -> Result<()> {
        let s = self.slot(Key::Bat(block / 128))?;
        let i = (block % 128) as usize * 4;
        self.cache.buf_mut(s)[i..i + 4].copy_from_slice(&e.to_be_bytes());
        self.cache.set_dirty(s, true);
        Ok(())
    }

    /// Whether blktap's batmap says `block` is full.
    pub(crate) fn batmap_full(&self, block: u32) -> bool {
        self.batmap
            .as_ref()
            .is_some_and(|m| crate::format::test_bit(&m.map, block as usize))
    }

    /// Writes every dirty cache slot, after a barrier making the data (and the blocks' zeroed
    /// regions) they describe durable. With `sync_after`, a second barrier.
    pub(crate) fn write_back(&mut self, sync_after: bool) -> Result<()> {
        if let Some(s) = &self.stopped {
            return Err(Error::Stopped(s.clone()));
        }
        let r = self.write_back_inner(sync_after);
        if let Err(e) = &r {
            self.stopped = Some(e.to_string());
        }
        r
    }

    fn write_back_inner(&mut self, sync_after: bool) -> Result<()> {
        let mut dirty = std::mem::take(&mut self.scratch);
        self.cache.dirty_slots(&mut dirty);
        if dirty.is_empty() {
            self.scratch = dirty;
            return Ok(());
        }
        self.sync("barrier before metadata")?;
        for &s in &dirty {
            let len = match self.cache.key(s) {
                Some(Key::Bat(n)) => (self.blocks as u64 * 4)
                    .saturating_sub(n as u64 * SECTOR)
                    .min(SECTOR) as usize,
                Some(Key::Bitmap(_)) => 512,
                None => continue,
            };
            let off = self.cache.offset(s);
            let buf = *self.cache.buf(s);
            self.backing
                .write_at(&buf[..len], off)
                .map_err(|e| Error::io(format!("writing metadata at {off:#x}"), e))?;
            self.cache.set_dirty(s, false);
        }
        self.scratch = dirty;
        if sync_after {
            self.sync("barrier after metadata")?;
        }
        Ok(())
    }

    pub(crate) fn sync(&self, what: &str) -> Result<()> {
        self.backing
            .flush()
            .map_err(|e| Error::io(format!("{what} (fdatasync of {})", self.name), e))
    }

    /// Writes blktap's batmap (map, then header with its checksum) if it changed.
    pub(crate) fn write_batmap(&mut self) -> Result<bool> {
        let Some(m) = self.batmap.as_mut().filter(|m| m.dirty) else {
            return Ok(false);
        };
        m.header.version = crate::format::BATMAP_VERSION;
        m.header.checksum = batmap_checksum(&m.map, m.header.version);
        let hb = m.header.encode();
        let r = self
            .backing
            .write_at(&m.map, m.header.offset)
            .and_then(|_| self.backing.write_at(&hb, m.header_offset));
        if let Err(e) = r {
            let e = Error::io("writing the batmap", e);
            self.stopped = Some(e.to_string());
            return Err(e);
        }
        m.dirty = false;
        Ok(true)
    }

    // ----- accessors -----

    /// The footer.
    pub fn footer(&self) -> &Footer {
        &self.footer
    }
    /// The dynamic header (dynamic and differencing disks).
    pub fn header(&self) -> Option<&Header> {
        self.header.as_ref()
    }
    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.footer.current_size
    }
    /// Fixed, dynamic or differencing.
    pub fn disk_type(&self) -> DiskType {
        self.footer.disk_type
    }
    /// Block size in bytes (0 for fixed disks).
    pub fn block_size(&self) -> u64 {
        self.block_size
    }
    /// BAT entries covering the virtual size.
    pub fn block_count(&self) -> u32 {
        self.blocks
    }
    /// The name (path) it was opened with.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }
    /// Whether the footer came from the copy at offset 0 (the one at the end is missing).
    pub fn footer_from_copy(&self) -> bool {
        self.footer_from_copy
    }
    /// Whether the image has blktap's batmap (valid, or cleared to be rewritten).
    pub fn has_batmap(&self) -> bool {
        self.batmap.is_some()
    }
    /// The batmap header, if any.
    pub fn batmap_header(&self) -> Option<&BatmapHeader> {
        self.batmap.as_ref().map(|m| &m.header)
    }
    /// The file under the image (for a driver's data IO).
    pub fn backing(&self) -> &dyn Backing {
        &*self.backing
    }
    /// Cache counters, readable from any thread.
    pub fn stats_handle(&self) -> StatsHandle {
        self.cache.stats_handle()
    }
    /// Bytes of metadata and data before the footer: what blktap's `query -s` reports, less
    /// the footer.
    pub fn end_of_data(&self) -> u64 {
        self.end_of_data
    }
    /// Bytes a block occupies in the file, bitmap included.
    pub(crate) fn block_bytes(&self) -> u64 {
        (self.bm_secs as u64 + self.spb as u64) * SECTOR
    }
}

/// The byte range of a parent locator's data, checked against the file.
fn locator_region(l: &Locator, limit: u64) -> std::result::Result<Region, String> {
    let Some(space) = l.space_bytes() else {
        return Err(format!(
            "data space {} is neither sectors nor a multiple of 512",
            l.data_space
        ));
    };
    if l.data_len as u64 > space.max(l.data_len as u64) || l.data_len > 65_536 {
        return Err(format!("data length {} is too large", l.data_len));
    }
    let space = space.max(l.data_len as u64);
    match l.data_offset.checked_add(space) {
        Some(end) if end <= limit && l.data_offset >= SECTOR => Ok(Region {
            start: l.data_offset,
            end,
            what: "a parent locator",
        }),
        _ => Err(format!(
            "{} bytes at {:#x} lie outside the file",
            space, l.data_offset
        )),
    }
}
