//! Checking an image as blktap's `vhd-util check` does, reporting every problem in words.

use std::path::Path;

use crate::backing::{Backing, FileBacking};
use crate::chain::{find_parent, ParentSet};
use crate::error::{Error, Result};
use crate::format::{
    geometry, test_bit, vhd_now, DiskType, Footer, PlatformCode, FEATURE_RESERVED, FOOTER_SIZE,
    SECTOR,
};
use crate::image::{Image, OpenOptions};
use crate::locator;

/// What to check.
#[derive(Clone, Debug, Default)]
pub struct CheckOptions {
    /// Do not complain about a missing footer at the end (`-i`).
    pub ignore_missing_footer: bool,
    /// Do not look for the parent (`-u`).
    pub skip_parent: bool,
    /// Check the parents too, down the chain (`-p`).
    pub parents: bool,
}

/// The outcome.
#[derive(Clone, Debug, Default)]
pub struct CheckReport {
    /// Problems found, in words; empty when the image is clean.
    pub problems: Vec<String>,
    /// Blocks allocated.
    pub allocated_blocks: u64,
}

impl CheckReport {
    /// Whether nothing was found.
    pub fn clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks the image at `path`. An image that cannot be opened at all is an `Err`.
pub fn check(path: &Path, opts: &CheckOptions) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    let mut next = Some(path.to_path_buf());
    while let Some(p) = next.take() {
        next = check_one(&p, opts, &mut report)?;
        if !opts.parents {
            break;
        }
    }
    Ok(report)
}

fn check_one(
    path: &Path,
    opts: &CheckOptions,
    r: &mut CheckReport,
) -> Result<Option<std::path::PathBuf>> {
    let name = path.display().to_string();
    let b = FileBacking::open(path, true).map_err(|e| Error::io(format!("opening {name}"), e))?;
    let size = b.size().map_err(|e| Error::io("size", e))?;
    let mut img = Image::open(Box::new(b), &name, &OpenOptions::default())?;
    let mut problem = |s: String| r.problems.push(format!("{name}: {s}"));
    if img.footer_from_copy() && !opts.ignore_missing_footer {
        problem("primary footer invalid or missing (the copy at offset 0 is intact; `vhd-util repair` rewrites it)".into());
    }
    let f = img.footer().clone();
    footer_problems(&f, &mut problem);
    if f.disk_type != DiskType::Fixed {
        let mut copy = [0u8; FOOTER_SIZE];
        img.backing()
            .read_at(&mut copy, 0)
            .map_err(|e| Error::io("reading the footer copy", e))?;
        if !img.footer_from_copy() && copy != f.encode() {
            let same = Footer::parse(&copy).map(|c| c == f).unwrap_or(false);
            if !same {
                problem("primary and backup footers do not match".into());
            }
        }
        if let Some(h) = img.header() {
            if !h.reserved_zero {
                problem("dynamic header: reserved fields are not zero".into());
            }
            if f.disk_type == DiskType::Dynamic {
                if h.locators.iter().any(|l| l.code != PlatformCode::None)
                    || h.parent_name[0] != 0
                    || h.parent_name[1] != 0
                {
                    problem("dynamic disk with a parent name or parent locators".into());
                }
                if !h.parent_uuid.is_nil() || h.parent_timestamp != 0 {
                    problem("dynamic disk with a parent uuid or timestamp".into());
                }
            } else if h.parent_timestamp > vhd_now().saturating_add(120) {
                problem("parent timestamp in the future".into());
            }
        }
        // Blocks: inside the file (open checked each), not overlapping each other.
        let mut blocks = Vec::new();
        for b in 0..img.block_count() {
            if let Some(s) = img.block_sector(b)? {
                blocks.push((s as u64, b));
            }
        }
        r.allocated_blocks += blocks.len() as u64;
        blocks.sort_unstable();
        let len = (img.block_size() / SECTOR) + 1;
        for w in blocks.windows(2) {
            if w[0].0 + len > w[1].0 {
                problem(format!(
                    "block {} (sector {}) overlaps block {} (sector {})",
                    w[1].1, w[1].0, w[0].1, w[0].0
                ));
            }
        }
        if let Some(last) = blocks.last() {
            if (last.0 + len) * SECTOR > size {
                problem(format!("block {} runs past the end of the file", last.1));
            }
        }
        // The batmap: only allocated blocks marked full, and those really full.
        if img.has_batmap() {
            for b in 0..img.block_count() {
                if !img.batmap_says_full(b) {
                    continue;
                }
                match img.block_bitmap(b)? {
                    None => problem(format!("batmap shows unallocated block {b} full")),
                    Some(bm) => {
                        let spb = (img.block_size() / SECTOR) as usize;
                        if !(0..spb).all(|i| test_bit(&bm, i)) {
                            problem(format!("batmap shows block {b} full but its bitmap is not"));
                        }
                    }
                }
            }
        } else if f.creator_is_tap() && f.creator_version >= 0x0001_0002 {
            problem("batmap missing or invalid".into());
        }
    }
    if f.disk_type != DiskType::Differencing || opts.skip_parent {
        return Ok(None);
    }
    let Some(h) = img.header().cloned() else {
        return Ok(None);
    };
    // Locators: decodable, naming the header's parent name.
    let pname = h.parent_name();
    for (i, l) in h.locators.iter().enumerate() {
        if !matches!(
            l.code,
            PlatformCode::MacX | PlatformCode::W2ku | PlatformCode::W2ru
        ) {
            continue;
        }
        let mut data = vec![0u8; l.data_len as usize];
        img.backing()
            .read_at(&mut data, l.data_offset)
            .map_err(|e| Error::io("reading a parent locator", e))?;
        match locator::decode(l.code, &data) {
            None => problem(format!("parent locator {i} does not decode")),
            Some(s) => {
                let base = Path::new(&s)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned());
                if base.as_deref() != Some(pname.as_str()) {
                    problem(format!(
                        "parent locator {i} name ({s}) does not match header name ({pname})"
                    ));
                }
            }
        }
    }
    match find_parent(&img, path, true) {
        Err(e) => {
            problem(format!("{e}"));
            Ok(None)
        }
        Ok(p) if p.raw => Ok(None),
        Ok(p) => {
            let set = ParentSet::new();
            match set.get(&p.path, false, 16) {
                Err(e) => problem(format!("parent {}: {e}", p.path.display())),
                Ok(par) => {
                    if let crate::chain::ParentImage::Vhd(pi) = &*par.lock() {
                        if pi.footer().uuid != h.parent_uuid {
                            problem(format!(
                                "invalid parent uuid: {} has {}, the header names {}",
                                p.path.display(),
                                pi.footer().uuid,
                                h.parent_uuid
                            ));
                        }
                    }
                }
            }
            Ok(Some(p.path))
        }
    }
}

fn footer_problems(f: &Footer, problem: &mut impl FnMut(String)) {
    if f.features & FEATURE_RESERVED == 0 {
        problem("footer: the 'reserved' feature bit is not set".into());
    }
    if f.timestamp > vhd_now().saturating_add(120) {
        problem("footer: creation time in the future".into());
    }
    if geometry(f.current_size) < f.geometry {
        problem("footer: geometry too large".into());
    }
    if f.hidden > 1 {
        problem(format!("footer: invalid 'hidden' state {}", f.hidden));
    }
    if !f.reserved_zero {
        problem("footer: reserved bytes are not zero".into());
    }
    if f.uuid.is_nil() {
        problem("footer: nil uuid".into());
    }
}

/// Checks the bytes of one image in memory (for fuzzing): opens it and walks its BAT,
/// bitmaps and batmap. Never panics.
pub fn check_backing(backing: Box<dyn Backing>) -> Result<CheckReport> {
    // A small cache: a walk reads each sector once, and a fuzzer opens thousands a second.
    let opts = OpenOptions {
        read_only: true,
        cache_slots: 16,
    };
    let mut img = Image::open(backing, "memory", &opts)?;
    let mut r = CheckReport::default();
    for b in 0..img.block_count() {
        if img.block_sector(b)?.is_some() {
            r.allocated_blocks += 1;
            img.block_bitmap(b)?;
        }
    }
    Ok(r)
}
