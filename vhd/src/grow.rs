//! Growing a dynamic disk past the BAT room it was created with (`vhd-util resize -j`).
//!
//! The BAT, the batmap and the parent locators must stay in front of every block (blktap's
//! check insists), so growing them moves the blocks in the way to the end of the file first,
//! each one copied, made durable, and only then pointed at by its BAT entry (a crash leaves
//! the old copy in use). Then the metadata area as it is (old header, BAT, batmap, locators,
//! and the space the moved blocks left) is saved to a journal file, which is made durable; the
//! new metadata is written in place, header and footers last; the journal is removed. After a
//! crash in between, [`revert`] puts the saved area and footer back: the image is as it was
//! before the resize, blocks moved included.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use crate::backing::FileBacking;
use crate::error::{Error, Result};
use crate::format::{
    batmap_checksum, batmap_used_bytes, checksum, geometry, BatmapHeader, DiskType, PlatformCode,
    BATMAP_VERSION, BAT_UNUSED, FOOTER_SIZE, SECTOR,
};
use crate::image::{Image, OpenOptions, Region};

const JOURNAL_MAGIC: &[u8; 16] = b"tapdisk-rs vhdj1";

fn pad(n: u64) -> u64 {
    n.div_ceil(SECTOR).max(1) * SECTOR
}

/// Grows the image at `path` to `size` bytes, journaling the metadata to `journal` (which
/// must not exist). Within the reserved room no journal is written.
pub fn grow(path: &Path, size: u64, journal: &Path) -> Result<()> {
    let b = FileBacking::open(path, false)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let opts = OpenOptions {
        read_only: false,
        ..Default::default()
    };
    let mut img = Image::open(Box::new(b), &path.display().to_string(), &opts)?;
    if img.disk_type() == DiskType::Fixed || size <= img.max_fast_size() {
        return img.set_size(size);
    }
    if img.backing.fixed_size() {
        return Err(Error::Unsupported(
            "growing the metadata of a VHD on a block device".into(),
        ));
    }
    if size < img.size() || !size.is_multiple_of(SECTOR) {
        return Err(Error::Invalid(format!(
            "{size} bytes: not whole sectors, or smaller than now ({})",
            img.size()
        )));
    }
    img.grow_metadata(size, journal)
}

impl Image {
    fn grow_metadata(&mut self, size: u64, journal: &Path) -> Result<()> {
        let Some(h) = self.header.clone() else {
            return Err(Error::Invalid("no dynamic header".into()));
        };
        if self.footer.data_offset + 1024 > h.table_offset {
            return Err(Error::Unsupported(
                "the dynamic header lies after the BAT".into(),
            ));
        }
        let bs = h.block_size as u64;
        let entries = size.div_ceil(bs);
        if entries > u32::MAX as u64 / 2 {
            return Err(Error::Invalid(format!(
                "{size} bytes is too large for a VHD"
            )));
        }
        // The new layout.
        let bat_space = pad(entries * 4);
        let mut off = h.table_offset + bat_space;
        let batmap = self
            .batmap
            .as_ref()
            .map(|m| (m.header.clone(), m.map.clone()));
        let mut new_bm = None;
        if let Some((bh, _)) = &batmap {
            let secs = pad(entries.div_ceil(8)) / SECTOR;
            new_bm = Some((off, off + SECTOR, secs, bh.clone()));
            off += SECTOR + secs * SECTOR;
        }
        let mut new_locs = h.locators;
        let mut loc_data = Vec::new();
        for l in new_locs.iter_mut() {
            if l.code == PlatformCode::None {
                continue;
            }
            let space = l.space_bytes().unwrap_or(0).max(l.data_len as u64);
            let mut d = vec![0u8; space as usize];
            self.backing
                .read_at(&mut d, l.data_offset)
                .map_err(|e| Error::io("reading a parent locator", e))?;
            l.data_offset = off;
            l.data_space = pad(space) as u32;
            loc_data.push((off, d));
            off += pad(space);
        }
        let meta_end = off;
        // 1. Move the blocks in the way to the end of the file.
        self.flush()?;
        let bytes = self.block_bytes();
        let mut moves = Vec::new();
        for b in 0..self.blocks {
            let e = self.bat_entry(b)?;
            if e != BAT_UNUSED && (e as u64 * SECTOR) < meta_end {
                moves.push((b, e));
            }
        }
        // The new area must not be taken for the moved blocks' new places.
        self.alloc_from = self.alloc_from.max(meta_end.div_ceil(SECTOR));
        let mut buf = vec![0u8; bytes as usize];
        let mut placed = Vec::new();
        for &(b, e) in &moves {
            let to = self.place_block()?;
            self.backing
                .read_at(&mut buf, e as u64 * SECTOR)
                .map_err(|err| Error::io("reading a block to move", err))?;
            self.backing
                .write_at(&buf, to as u64 * SECTOR)
                .map_err(|err| Error::io("writing a moved block", err))?;
            placed.push((b, to));
        }
        self.sync("barrier after moving blocks")?;
        for &(b, to) in &placed {
            self.set_bat_entry(b, to)?;
            self.cache.remove(crate::cache::Key::Bitmap(b));
        }
        self.write_back(true)?;
        // 2. Save the metadata area and the footer.
        let saved_len = meta_end.min(self.file_size);
        let mut area = vec![0u8; saved_len as usize];
        self.backing
            .read_at(&mut area, 0)
            .map_err(|e| Error::io("reading the metadata area", e))?;
        let old_footer = self.footer.encode();
        write_journal(journal, self.file_size, &area, &old_footer)?;
        // 3. The new metadata: BAT, batmap, locators; then header and footers.
        let mut bat = vec![0xffu8; bat_space as usize];
        for b in 0..self.blocks {
            let e = self.bat_entry(b)?;
            bat[b as usize * 4..b as usize * 4 + 4].copy_from_slice(&e.to_be_bytes());
        }
        let w = |img: &Image, buf: &[u8], at: u64, what: &str| {
            img.backing
                .write_at(buf, at)
                .map_err(|e| Error::io(format!("writing the new {what}"), e))
        };
        w(self, &bat, h.table_offset, "BAT")?;
        let mut regions = vec![
            Region {
                start: self.footer.data_offset,
                end: self.footer.data_offset + 1024,
                what: "the dynamic header",
            },
            Region {
                start: h.table_offset,
                end: h.table_offset + bat_space,
                what: "the BAT",
            },
        ];
        if let (Some((hoff, moff, secs, mut bh)), Some((_, old_map))) = (new_bm, &batmap) {
            let mut map = vec![0u8; (secs * SECTOR) as usize];
            let n = old_map.len().min(map.len());
            map[..n].copy_from_slice(&old_map[..n]);
            let used = batmap_used_bytes(size) as usize;
            bh.offset = moff;
            bh.size_sectors = secs as u32;
            bh.version = BATMAP_VERSION;
            bh.checksum = batmap_checksum(&map[..used.min(map.len())], BATMAP_VERSION);
            w(self, &map, moff, "batmap")?;
            w(self, &bh.encode(), hoff, "batmap header")?;
            regions.push(Region {
                start: hoff,
                end: moff + secs * SECTOR,
                what: "the batmap",
            });
            if let Some(m) = self.batmap.as_mut() {
                m.header = BatmapHeader { ..bh };
                m.header_offset = hoff;
                m.map = map[..used.min(map.len())].to_vec();
                m.dirty = false;
            }
        }
        for (at, d) in &loc_data {
            let mut p = vec![0u8; pad(d.len() as u64) as usize];
            p[..d.len()].copy_from_slice(d);
            w(self, &p, *at, "parent locator")?;
            regions.push(Region {
                start: *at,
                end: *at + p.len() as u64,
                what: "a parent locator",
            });
        }
        self.sync("barrier before the header")?;
        let mut nh = h.clone();
        nh.max_table_entries = entries as u32;
        nh.locators = new_locs;
        w(
            self,
            &nh.encode(),
            self.footer.data_offset,
            "dynamic header",
        )?;
        self.header = Some(nh);
        self.regions = regions;
        self.footer.current_size = size;
        self.footer.geometry = geometry(size);
        self.blocks = entries as u32;
        self.end_of_data = self.end_of_data.max(meta_end);
        self.put_footers()?;
        std::fs::remove_file(journal)
            .map_err(|e| Error::io(format!("removing the journal {}", journal.display()), e))?;
        Ok(())
    }
}

fn write_journal(path: &Path, file_len: u64, area: &[u8], footer: &[u8]) -> Result<()> {
    let mut body = Vec::with_capacity(area.len() + 600);
    body.extend_from_slice(JOURNAL_MAGIC);
    body.extend_from_slice(&file_len.to_be_bytes());
    body.extend_from_slice(&(area.len() as u64).to_be_bytes());
    body.extend_from_slice(footer);
    body.extend_from_slice(area);
    let c = checksum(&body, body.len());
    body.extend_from_slice(&c.to_be_bytes());
    let mut f = File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io(format!("creating the journal {}", path.display()), e))?;
    f.write_all(&body)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io("writing the journal", e))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Undoes an interrupted [`grow`]: puts the saved metadata area and footer back from
/// `journal`, cuts the file to its old length, and removes the journal.
pub fn revert(path: &Path, journal: &Path) -> Result<()> {
    let mut body = Vec::new();
    File::open(journal)
        .and_then(|mut f| f.read_to_end(&mut body))
        .map_err(|e| Error::io(format!("reading the journal {}", journal.display()), e))?;
    let bad = |r: &str| {
        Error::Invalid(format!(
            "{} is not a journal of ours: {r}",
            journal.display()
        ))
    };
    if body.len() < 16 + 16 + FOOTER_SIZE + 4 || &body[..16] != JOURNAL_MAGIC {
        return Err(bad("no magic"));
    }
    let n = body.len() - 4;
    let stored = u32::from_be_bytes([body[n], body[n + 1], body[n + 2], body[n + 3]]);
    if checksum(&body[..n], n) != stored {
        return Err(bad("checksum mismatch"));
    }
    let file_len = u64::from_be_bytes(body[16..24].try_into().map_err(|_| bad("length"))?);
    let area_len = u64::from_be_bytes(body[24..32].try_into().map_err(|_| bad("length"))?) as usize;
    let footer = &body[32..32 + FOOTER_SIZE];
    let area = body
        .get(32 + FOOTER_SIZE..32 + FOOTER_SIZE + area_len)
        .ok_or_else(|| bad("short"))?;
    if file_len < FOOTER_SIZE as u64 {
        return Err(bad("file length"));
    }
    let f = File::options()
        .write(true)
        .open(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    use std::os::unix::fs::FileExt;
    f.write_all_at(area, 0)
        .and_then(|_| f.set_len(file_len))
        .and_then(|_| f.write_all_at(footer, file_len - FOOTER_SIZE as u64))
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(format!("restoring {}", path.display()), e))?;
    std::fs::remove_file(journal).map_err(|e| Error::io("removing the journal", e))
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    /// Writes the journal a grow of the image at `path` would write first.
    pub fn journal_of(path: &Path, journal: &Path) {
        let bytes = std::fs::read(path).unwrap();
        let n = bytes.len();
        write_journal(
            journal,
            n as u64,
            &bytes[..n - FOOTER_SIZE],
            &bytes[n - FOOTER_SIZE..],
        )
        .unwrap();
    }
}
