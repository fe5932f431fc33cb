//! Footer and header edits the tools make: `hidden`, repairing the footer, a new parent.
//! Each is written and made durable before returning.

use std::path::Path;

use crate::error::{Error, Result};
use crate::format::{vhd_time, DiskType, PlatformCode, Uuid, FOOTER_SIZE, SECTOR};
use crate::image::Image;
use crate::locator;

impl Image {
    /// Writes the footer where it belongs (right after the data, the file cut there; at the
    /// end of a block device) and, for dynamic disks, its copy at offset 0; then fdatasync.
    pub fn write_footers(&mut self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly(self.name.clone()));
        }
        self.flush()?;
        self.put_footers()
    }

    /// [`Image::write_footers`] without the flush before it.
    pub(crate) fn put_footers(&mut self) -> Result<()> {
        let f = self.footer.encode();
        let at = if self.backing.fixed_size() {
            self.file_size - FOOTER_SIZE as u64
        } else {
            self.end_of_data
        };
        self.backing
            .write_at(&f, at)
            .map_err(|e| Error::io("writing the footer", e))?;
        if !self.backing.fixed_size() {
            self.backing
                .set_len(at + FOOTER_SIZE as u64)
                .map_err(|e| Error::io("cutting the file after the footer", e))?;
            self.file_size = at + FOOTER_SIZE as u64;
            self.alloc_from = self.alloc_from.max(self.file_size.div_ceil(SECTOR));
        }
        if self.footer.disk_type != DiskType::Fixed {
            self.backing
                .write_at(&f, 0)
                .map_err(|e| Error::io("writing the footer copy", e))?;
        }
        self.footer_from_copy = false;
        self.sync("writing the footer")
    }

    /// Sets blktap's `hidden` flag (0..=255, normally 0 or 1).
    pub fn set_hidden(&mut self, v: u8) -> Result<()> {
        self.footer.hidden = v;
        self.write_footers()
    }

    /// Sets blktap's batmap `marker` byte.
    pub fn set_marker(&mut self, v: u8) -> Result<()> {
        let Some(m) = self.batmap.as_mut() else {
            return Err(Error::Invalid(format!(
                "{} has no batmap to hold a marker",
                self.name
            )));
        };
        m.header.marker = v;
        m.dirty = true;
        self.flush()
    }

    /// blktap's batmap `marker` byte (0 without a batmap).
    pub fn marker(&self) -> u8 {
        self.batmap.as_ref().map(|m| m.header.marker).unwrap_or(0)
    }

    /// Rewrites the footer from the copy in use (the one at the end, or the copy at 0 when
    /// that is gone), giving a nil uuid a new one, and rewrites a damaged batmap.
    pub fn repair(&mut self) -> Result<()> {
        if self.footer.uuid.is_nil() {
            self.footer.uuid = Uuid::random();
        }
        self.write_footers()
    }

    /// Points this differencing disk at a new parent (`vhd-util modify -p`): uuid (nil for a
    /// raw parent), modification time, name and locators rewritten in their existing space.
    pub fn set_parent(&mut self, child_path: &Path, parent: &Path, raw: bool) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly(self.name.clone()));
        }
        if self.footer.disk_type != DiskType::Differencing {
            return Err(Error::Invalid(format!(
                "{} is not a differencing disk",
                self.name
            )));
        }
        let target = locator::canonical(parent)?;
        let uuid = if raw {
            Uuid::default()
        } else {
            let b = crate::backing::FileBacking::open(&target, true)
                .map_err(|e| Error::io(format!("opening {}", target.display()), e))?;
            let p = Image::open(
                Box::new(b),
                &target.display().to_string(),
                &Default::default(),
            )?;
            p.footer().uuid
        };
        let meta = std::fs::metadata(&target).map_err(|e| Error::io("stat", e))?;
        let child = locator::canonical(child_path)?;
        let rel = locator::relative_path(&child, &target);
        let Some(mut h) = self.header.clone() else {
            return Err(Error::Invalid("no dynamic header".into()));
        };
        for (i, l) in h.locators.iter_mut().enumerate() {
            if !matches!(
                l.code,
                PlatformCode::MacX | PlatformCode::W2ku | PlatformCode::W2ru
            ) {
                continue;
            }
            let data = locator::encode(l.code, &rel);
            let space = l.space_bytes().unwrap_or(0);
            if data.len() as u64 > space {
                return Err(Error::Invalid(format!(
                    "the new parent path needs {} bytes, parent locator {i} has room for {space}",
                    data.len()
                )));
            }
            let mut buf = vec![0u8; space as usize];
            buf[..data.len()].copy_from_slice(&data);
            self.backing
                .write_at(&buf, l.data_offset)
                .map_err(|e| Error::io("writing a parent locator", e))?;
            l.data_len = data.len() as u32;
        }
        use std::os::unix::fs::MetadataExt;
        h.parent_uuid = uuid;
        h.parent_timestamp = vhd_time(meta.mtime());
        h.set_parent_name(
            &target
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        self.sync("barrier before the header")?;
        self.backing
            .write_at(&h.encode(), self.footer.data_offset)
            .map_err(|e| Error::io("writing the dynamic header", e))?;
        self.header = Some(h);
        self.sync("writing the dynamic header")
    }
}

impl Image {
    /// Drops every block (`vhd-util modify -z`): the BAT emptied, the batmap cleared, the file
    /// cut after the metadata.
    pub fn zero_all(&mut self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly(self.name.clone()));
        }
        if self.footer.disk_type == DiskType::Fixed {
            return Err(Error::Unsupported("zeroing a fixed disk".into()));
        }
        self.flush()?;
        if let Some(m) = self.batmap.as_mut() {
            m.map.fill(0);
            m.dirty = true;
        }
        self.write_batmap()?;
        self.sync("barrier after the batmap")?;
        for b in 0..self.blocks {
            if self.bat_entry(b)? != crate::format::BAT_UNUSED {
                self.set_bat_entry(b, crate::format::BAT_UNUSED)?;
                self.cache.remove(crate::cache::Key::Bitmap(b));
            }
        }
        self.write_back(true)?;
        self.end_of_data = self
            .regions
            .iter()
            .map(|r| r.end)
            .max()
            .unwrap_or(0)
            .div_ceil(SECTOR)
            * SECTOR;
        self.write_footers()
    }

    /// Puts the footer at `size - 512` (`vhd-util modify -s`, for images in fixed-size
    /// containers); refuses to cut data.
    pub fn set_phys_size(&mut self, size: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly(self.name.clone()));
        }
        let need = self.end_of_data + FOOTER_SIZE as u64;
        if size < need {
            return Err(Error::Invalid(format!(
                "{size} bytes would cut data (at least {need} needed)"
            )));
        }
        self.flush()?;
        let f = self.footer.encode();
        self.backing
            .write_at(&f, size - FOOTER_SIZE as u64)
            .map_err(|e| Error::io("writing the footer", e))?;
        self.backing
            .set_len(size)
            .map_err(|e| Error::io("setting the size", e))?;
        self.file_size = size;
        self.alloc_from = self.alloc_from.max(size.div_ceil(SECTOR));
        self.sync("writing the footer")
    }

    /// The batmap's stored checksum and the one computed over its bytes now.
    pub fn batmap_checksums(&self) -> Option<(u32, u32)> {
        self.batmap.as_ref().map(|m| {
            (
                m.header.checksum,
                crate::format::batmap_checksum(&m.map, m.header.version),
            )
        })
    }

    /// Every parent locator in use with its decoded path (`None` when it does not decode).
    pub fn locators(&self) -> Vec<(usize, crate::format::Locator, Option<String>)> {
        let Some(h) = &self.header else {
            return Vec::new();
        };
        h.locators
            .iter()
            .enumerate()
            .filter(|(_, l)| l.code != PlatformCode::None)
            .map(|(i, l)| {
                let mut data = vec![0u8; (l.data_len as usize).min(65_536)];
                let name = self
                    .backing
                    .read_at(&mut data, l.data_offset)
                    .ok()
                    .and_then(|_| locator::decode(l.code, &data));
                (i, *l, name)
            })
            .collect()
    }
}
