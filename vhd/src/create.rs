//! Creating images: fixed and dynamic disks, and snapshots (differencing children naming
//! their parent as blktap does), laid out as blktap's `vhd-util` lays them out:
//!
//! ```text
//! 0        footer copy (dynamic disks)
//! 512      dynamic header
//! 1536     BAT, max_table_entries * 4 bytes rounded up to a sector, all 0xFFFFFFFF
//!          batmap header (512 bytes), then the batmap (ceil(entries / 8) rounded up to
//!          a sector)
//!          parent locators (differencing): MacX, W2ku, W2ru, each padded to a sector
//!          footer
//! ```

use std::path::Path;

use crate::backing::{Backing, FileBacking};
use crate::chain::find_parent;
use crate::error::{Error, Result};
use crate::format::{
    vhd_time, BatmapHeader, DiskType, Footer, Header, Locator, PlatformCode, Uuid, BATMAP_VERSION,
    DEFAULT_BLOCK_SIZE, HEADER_SIZE, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, SECTOR,
};
use crate::image::{Image, OpenOptions};
use crate::locator;

/// What to create.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Virtual size in bytes (a multiple of 512).
    pub size: u64,
    /// Fixed or dynamic (differencing disks come from [`snapshot`]).
    pub disk_type: DiskType,
    /// Block size of dynamic disks (blktap supports only the 2 MiB default).
    pub block_size: u32,
    /// Size to reserve BAT and batmap room for, so the disk can later grow to it without
    /// moving data (`vhd-util create -S`); 0 for none.
    pub max_size: u64,
}

impl CreateOptions {
    /// A dynamic disk of `size` bytes with 2 MiB blocks.
    pub fn dynamic(size: u64) -> CreateOptions {
        CreateOptions {
            size,
            disk_type: DiskType::Dynamic,
            block_size: DEFAULT_BLOCK_SIZE,
            max_size: 0,
        }
    }
}

/// How a differencing disk names its parent.
#[derive(Clone, Debug)]
pub struct ParentLink {
    /// The parent's footer uuid (nil for a raw parent).
    pub uuid: Uuid,
    /// The parent file's modification time (VHD timestamp).
    pub timestamp: u32,
    /// The parent's file name (the header's parent name).
    pub name: String,
    /// Locator data, in the order written (MacX, W2ku, W2ru).
    pub locators: Vec<(PlatformCode, Vec<u8>)>,
}

impl ParentLink {
    /// blktap's three locators for a parent at `rel` (relative to the child's directory).
    pub fn for_path(uuid: Uuid, timestamp: u32, name: &str, rel: &str) -> ParentLink {
        ParentLink {
            uuid,
            timestamp,
            name: name.to_string(),
            locators: [PlatformCode::MacX, PlatformCode::W2ku, PlatformCode::W2ru]
                .iter()
                .map(|&c| (c, locator::encode(c, rel)))
                .collect(),
        }
    }
}

fn pad(n: u64) -> u64 {
    n.div_ceil(SECTOR).max(1) * SECTOR
}

fn write(b: &dyn Backing, buf: &[u8], off: u64) -> Result<()> {
    b.write_at(buf, off)
        .map_err(|e| Error::io(format!("writing at {off:#x}"), e))
}

/// Lays out a new image in an empty `backing`; a differencing disk when `parent` is given.
/// Returns its footer. Nothing is durable until the caller flushes.
pub fn create_on(
    backing: &dyn Backing,
    opts: &CreateOptions,
    parent: Option<&ParentLink>,
) -> Result<Footer> {
    if !opts.size.is_multiple_of(SECTOR) {
        return Err(Error::Invalid(format!(
            "size {} is not a multiple of 512",
            opts.size
        )));
    }
    let disk_type = if parent.is_some() {
        DiskType::Differencing
    } else {
        opts.disk_type
    };
    let mut footer = Footer::new(disk_type, opts.size);
    if disk_type == DiskType::Fixed {
        let fe = footer.encode();
        write(backing, &fe, opts.size)?;
        return Ok(footer);
    }
    let bs = opts.block_size;
    if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
        return Err(Error::Invalid(format!(
            "block size {bs}: a power of two from 512 to 2 MiB"
        )));
    }
    let entries = opts.size.max(opts.max_size).div_ceil(bs as u64);
    if entries > u32::MAX as u64 / 2 {
        return Err(Error::Invalid(format!(
            "{} bytes is too large for a VHD",
            opts.size
        )));
    }
    let table = 3 * SECTOR;
    let bat_space = pad(entries * 4);
    let batmap_hdr = table + bat_space;
    let batmap_off = batmap_hdr + SECTOR;
    let batmap_secs = pad(entries.div_ceil(8)) / SECTOR;
    let mut off = batmap_off + batmap_secs * SECTOR;
    let mut header = Header {
        table_offset: table,
        max_table_entries: entries as u32,
        block_size: bs,
        parent_uuid: Uuid::default(),
        parent_timestamp: 0,
        parent_name: [0; 512],
        locators: [Locator::NONE; 8],
        reserved_zero: true,
    };
    if let Some(p) = parent {
        header.parent_uuid = p.uuid;
        header.parent_timestamp = p.timestamp;
        header.set_parent_name(&p.name);
        for (i, (code, data)) in p.locators.iter().take(8).enumerate() {
            let space = pad(data.len() as u64);
            let mut buf = vec![0u8; space as usize];
            buf[..data.len()].copy_from_slice(data);
            write(backing, &buf, off)?;
            header.locators[i] = Locator {
                code: *code,
                // Bytes, not sectors, as blktap and Windows write it.
                data_space: space as u32,
                data_len: data.len() as u32,
                reserved: 0,
                data_offset: off,
            };
            off += space;
        }
    }
    // BAT, batmap, header, footer copy, footer.
    let bat = vec![0xffu8; bat_space as usize];
    write(backing, &bat, table)?;
    let map = vec![0u8; (batmap_secs * SECTOR) as usize];
    write(backing, &map, batmap_off)?;
    let used = crate::format::batmap_used_bytes(opts.size) as usize;
    let bh = BatmapHeader {
        offset: batmap_off,
        size_sectors: batmap_secs as u32,
        version: BATMAP_VERSION,
        checksum: crate::format::batmap_checksum(&map[..used.min(map.len())], BATMAP_VERSION),
        marker: 0,
        keyhash: [0; 65],
    };
    write(backing, &bh.encode(), batmap_hdr)?;
    footer.data_offset = SECTOR;
    write(backing, &header.encode(), SECTOR)?;
    let fe = footer.encode();
    write(backing, &fe, 0)?;
    let end = if backing.fixed_size() {
        backing
            .size()
            .map_err(|e| Error::io("size", e))?
            .checked_sub(SECTOR)
            .filter(|&e| e >= off)
            .ok_or_else(|| Error::NoSpace("the device is too small for the metadata".into()))?
    } else {
        off
    };
    write(backing, &fe, end)?;
    debug_assert!(HEADER_SIZE as u64 + SECTOR == table);
    Ok(footer)
}

/// Creates a new image file at `path` (which must not exist).
pub fn create(path: &Path, opts: &CreateOptions) -> Result<Footer> {
    let b = FileBacking::create(path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    let r = create_on(&b, opts, None).and_then(|f| {
        b.flush().map_err(|e| Error::io("fdatasync", e))?;
        Ok(f)
    });
    if r.is_err() {
        let _ = std::fs::remove_file(path);
    }
    r
}

/// How to take a snapshot.
#[derive(Clone, Debug, Default)]
pub struct SnapshotOptions {
    /// The parent is a raw file, not a VHD (`vhd-util snapshot -m`).
    pub raw_parent: bool,
    /// Link to the parent given even if it is an empty differencing disk (`-e`); by default,
    /// as blktap, the child links past empty differencing disks to the first non-empty one.
    pub link_empty: bool,
    /// Virtual size; 0: the parent's.
    pub size: u64,
    /// Metadata room for growing (`-S`), bytes; 0 for none.
    pub max_size: u64,
}

/// What [`snapshot`] made.
#[derive(Clone, Debug)]
pub struct SnapshotInfo {
    /// The child's footer.
    pub footer: Footer,
    /// The parent it links to (perhaps below empty ones).
    pub parent: std::path::PathBuf,
}

fn mtime(path: &Path) -> Result<u32> {
    use std::os::unix::fs::MetadataExt;
    let m =
        std::fs::metadata(path).map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
    Ok(vhd_time(m.mtime()))
}

/// Creates the differencing disk `child` over `parent`: the parent's uuid and modification
/// time in the header, its name and three locators with the path relative to the child.
pub fn snapshot(child: &Path, parent: &Path, opts: &SnapshotOptions) -> Result<SnapshotInfo> {
    let mut target = locator::canonical(parent)?;
    let (uuid, mut size) = if opts.raw_parent {
        let len = std::fs::metadata(&target)
            .map_err(|e| Error::io(format!("stat {}", target.display()), e))?
            .len();
        (Uuid::default(), len / SECTOR * SECTOR)
    } else {
        let open = |p: &Path| -> Result<Image> {
            let b = FileBacking::open(p, true)
                .map_err(|e| Error::io(format!("opening {}", p.display()), e))?;
            Image::open(
                Box::new(b),
                &p.display().to_string(),
                &OpenOptions::default(),
            )
        };
        let given = open(&target)?;
        let size = given.size();
        let mut img = given;
        // Skip empty differencing parents, as blktap does unless told otherwise.
        while !opts.link_empty
            && img.disk_type() == DiskType::Differencing
            && img.allocated_blocks()? == 0
        {
            let pref = find_parent(&img, &target, true)?;
            if pref.raw {
                break;
            }
            target = locator::canonical(&pref.path)?;
            img = open(&target)?;
        }
        if img.footer().uuid.is_nil() {
            return Err(Error::Invalid(format!(
                "{} has a nil uuid",
                target.display()
            )));
        }
        (img.footer().uuid, size)
    };
    if opts.size != 0 {
        if opts.size < size {
            return Err(Error::Invalid(format!(
                "snapshot size {} is smaller than the parent's {size}",
                opts.size
            )));
        }
        size = opts.size;
    }
    // blktap rounds sizes up to whole 2 MiB blocks.
    let bs = DEFAULT_BLOCK_SIZE as u64;
    size = size.div_ceil(bs) * bs;
    let b = FileBacking::create(child)
        .map_err(|e| Error::io(format!("creating {}", child.display()), e))?;
    let r = (|| {
        let child_abs = locator::canonical(child)?;
        let rel = locator::relative_path(&child_abs, &target);
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let link = ParentLink::for_path(uuid, mtime(&target)?, &name, &rel);
        let mut o = CreateOptions::dynamic(size);
        o.max_size = opts.max_size;
        let footer = create_on(&b, &o, Some(&link))?;
        b.flush().map_err(|e| Error::io("fdatasync", e))?;
        Ok(SnapshotInfo {
            footer,
            parent: target.clone(),
        })
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(child);
    }
    r
}
