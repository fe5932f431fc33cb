//! Coalesce: folding a differencing disk into its parent (`vhd-util coalesce`). Every sector
//! the child has written is copied into the parent at the same place; the child is left as
//! it was (the caller then deletes it or relinks its children). Nothing may use the parent
//! meanwhile: it is opened read-write.

use std::path::Path;

use crate::backing::{Backing, FileBacking};
use crate::chain::{find_parent, Chain};
use crate::error::{Error, Result};
use crate::format::{run_len, test_bit, DiskType, SECTOR};
use crate::image::{Image, OpenOptions};

/// Where coalesced data goes.
enum Target {
    Vhd(Box<Chain>),
    Raw(FileBacking, u64),
}

impl Target {
    fn write(&mut self, off: u64, buf: &[u8]) -> Result<()> {
        match self {
            Target::Vhd(c) => c.write_at(off, buf),
            Target::Raw(f, _) => f
                .write_at(buf, off)
                .map_err(|e| Error::io("writing the raw parent", e)),
        }
    }
    fn size(&self) -> u64 {
        match self {
            Target::Vhd(c) => c.size(),
            Target::Raw(_, s) => *s,
        }
    }
}

/// Copies what the differencing disk at `child` has written into its parent; returns the
/// sectors copied (blktap prints "Coalesced N sectors").
pub fn coalesce(child: &Path) -> Result<u64> {
    let b = FileBacking::open(child, true)
        .map_err(|e| Error::io(format!("opening {}", child.display()), e))?;
    let mut img = Image::open(
        Box::new(b),
        &child.display().to_string(),
        &OpenOptions::default(),
    )?;
    if img.disk_type() != DiskType::Differencing {
        return Err(Error::Invalid(format!(
            "{} is not a differencing disk: nothing to coalesce",
            child.display()
        )));
    }
    let pref = find_parent(&img, child, true)?;
    let mut target = if pref.raw {
        let f = FileBacking::open(&pref.path, false)
            .map_err(|e| Error::io(format!("opening {}", pref.path.display()), e))?;
        let size = f.size().map_err(|e| Error::io("size", e))?;
        Target::Raw(f, size)
    } else {
        let f = FileBacking::open(&pref.path, false)
            .map_err(|e| Error::io(format!("opening {}", pref.path.display()), e))?;
        let opts = OpenOptions {
            read_only: false,
            ..Default::default()
        };
        let p = Image::open(Box::new(f), &pref.path.display().to_string(), &opts)?;
        if Some(p.footer().uuid) != img.header().map(|h| h.parent_uuid) {
            return Err(Error::Parent {
                child: child.display().to_string(),
                reason: format!(
                    "{} has another uuid than the child names",
                    pref.path.display()
                ),
            });
        }
        Target::Vhd(Box::new(Chain::from_parts(p, Vec::new())))
    };
    let size = img.size();
    let bs = img.block_size();
    let mut buf = vec![0u8; bs as usize];
    let mut copied = 0u64;
    for block in 0..img.block_count() {
        let Some(sector) = img.block_sector(block)? else {
            continue;
        };
        let data = (sector as u64 + 1) * SECTOR;
        let base = block as u64 * bs;
        let in_disk = ((size - base).min(bs) / SECTOR) as usize;
        let bitmap = if img.batmap_says_full(block) {
            [0xffu8; 512]
        } else {
            img.block_bitmap(block)?.unwrap_or([0; 512])
        };
        let mut i = 0usize;
        while i < in_disk {
            let n = run_len(&bitmap, i, in_disk);
            if test_bit(&bitmap, i) {
                let off = base + i as u64 * SECTOR;
                let len = n as u64 * SECTOR;
                if off + len > target.size() {
                    return Err(Error::Invalid(format!(
                        "{} has data beyond its parent's size {}: resize the parent first",
                        child.display(),
                        target.size()
                    )));
                }
                let chunk = &mut buf[..len as usize];
                img.backing()
                    .read_at(chunk, data + i as u64 * SECTOR)
                    .map_err(|e| Error::io(format!("reading {}", child.display()), e))?;
                target.write(off, chunk)?;
                copied += n as u64;
            }
            i += n;
        }
    }
    match &mut target {
        Target::Vhd(c) => c.flush()?,
        Target::Raw(f, _) => f
            .flush()
            .map_err(|e| Error::io("fdatasync of the raw parent", e))?,
    }
    Ok(copied)
}
