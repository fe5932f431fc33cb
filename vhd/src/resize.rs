//! Changing the virtual size (`vhd-util resize`). Growing within the BAT room reserved at
//! creation (`-S`), or any fixed disk, rewrites the footer; shrinking is refused (it would
//! drop data); growing past the reserved room is [`crate::grow`]'s, with a journal.

use std::path::Path;

use crate::backing::FileBacking;
use crate::error::{Error, Result};
use crate::format::{batmap_checksum, batmap_used_bytes, geometry, DiskType, SECTOR};
use crate::image::{Image, OpenOptions};

/// Sets the virtual size of the image at `path` to `size` bytes.
pub fn resize(path: &Path, size: u64) -> Result<()> {
    let b = FileBacking::open(path, false)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let opts = OpenOptions {
        read_only: false,
        ..Default::default()
    };
    let mut img = Image::open(Box::new(b), &path.display().to_string(), &opts)?;
    img.set_size(size)
}

impl Image {
    /// The largest size reachable without moving data: BAT room times block size
    /// (blktap's `query -S`, in bytes); 0 for fixed disks.
    pub fn max_fast_size(&self) -> u64 {
        self.header
            .as_ref()
            .map(|h| h.max_table_entries as u64 * h.block_size as u64)
            .unwrap_or(0)
    }

    /// Sets the virtual size (see the module docs).
    pub fn set_size(&mut self, size: u64) -> Result<()> {
        let old = self.footer.current_size;
        if !size.is_multiple_of(SECTOR) {
            return Err(Error::Invalid(format!(
                "size {size} is not a multiple of 512"
            )));
        }
        if size < old {
            return Err(Error::Invalid(format!(
                "shrinking from {old} to {size} bytes would drop data; not done"
            )));
        }
        if size == old {
            return Ok(());
        }
        if self.footer.disk_type == DiskType::Fixed {
            // The data grows into the space where the footer was; zero it, then the footer.
            self.flush()?;
            let z = vec![0u8; SECTOR as usize];
            self.backing
                .write_at(&z, old)
                .map_err(|e| Error::io("zeroing the old footer", e))?;
            self.end_of_data = size;
            self.footer.current_size = size;
            self.footer.geometry = geometry(size);
            return self.write_footers();
        }
        if size > self.max_fast_size() {
            return Err(Error::Unsupported(format!(
                "growing to {size} bytes needs {} BAT entries, the image has room for {} (grow it with a journal, vhd::grow, or create it with -S to reserve more)",
                size.div_ceil(self.block_size),
                self.header.as_ref().map(|h| h.max_table_entries).unwrap_or(0)
            )));
        }
        self.flush()?;
        // blktap checksums the batmap over a length that depends on the size.
        if let Some(m) = self.batmap.as_mut() {
            let used = batmap_used_bytes(size);
            if used > m.header.size_sectors as u64 * SECTOR {
                return Err(Error::Unsupported(
                    "the batmap has no room for that size".into(),
                ));
            }
            let mut map = vec![0u8; used as usize];
            self.backing
                .read_at(&mut map, m.header.offset)
                .map_err(|e| Error::io("reading the batmap", e))?;
            m.header.checksum = batmap_checksum(&map, m.header.version);
            m.map = map;
            m.dirty = true;
        }
        self.footer.current_size = size;
        self.footer.geometry = geometry(size);
        self.blocks = size.div_ceil(self.block_size) as u32;
        self.write_footers()?;
        self.flush()
    }
}
