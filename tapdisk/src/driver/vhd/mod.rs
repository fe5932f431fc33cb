//! The `vhd:` driver: a VHD image ([`vhd`]: fixed, dynamic or differencing) and its chain of
//! parents as a tapdisk disk, blktap's `vhd:` type.
//!
//! `vhd:PATH` serves the image at PATH; a differencing disk's parents are found from its
//! locators (relative paths first, as blktap does) and checked against the uuid it names.
//! The leaf is opened read-write (unless `-R`), the parents read-only. This driver is a format
//! of the translating engine ([`crate::driver::translate`]): the library's mapping calls
//! ([`mapper`]) say where each guest range is (a file of the chain, or zeroes) and where a
//! write goes (allocating a block first if needed), and the engine does the data IO on
//! io_uring, O_DIRECT when aligned (blocks blktap and we allocate have their data 4 KiB
//! aligned).
//!
//! # Parents are shared
//!
//! One [`vhd::ParentSet`] per process: the VBDs of one tapdisk whose chains meet (clones of
//! one base image, snapshots served beside their leaf) share each parent's open image, its
//! metadata cache and its mutex; their data IO shares one pair of descriptors per parent
//! ([`crate::driver::translate::shared_read_only`]).
//!
//! # Writes, flushes, discards
//!
//! A write into a block not yet allocated places the block past the end of the file and
//! moves the footer behind it before the data IO (one small synchronous write); once the data
//! completed, its sector bitmap bits are set (in the cache). A flush with such changes writes
//! them back in the library's crash-safe order (fdatasync, bitmaps and BAT, fdatasync, then
//! blktap's batmap), synchronously; a flush with nothing to write back is one `fdatasync` on
//! io_uring. So a crash loses at most the writes after the last flush, leaks at worst a block,
//! and never shows stale data. A discard drops the whole blocks inside its range that have
//! nothing below them in the chain (dropped from the BAT, their space punched); the rest of
//! the range keeps its content (discard is a hint). Pausing the VBD writes back the metadata
//! ([`crate::driver::Image::quiesce`]), so `vhd-util snapshot` of a paused leaf sees
//! everything written before the pause; closing the last VBD of a leaf flushes it.
//!
//! # Counters
//!
//! `tap-ctl stats` shows, under `driver`, the chain's metadata cache counters added up
//! (`cache`: BAT and bitmap hits and misses, batmap hits, write-backs), each image's own
//! (`levels`, the leaf first), and the blocks discards dropped.

pub mod mapper;

use std::convert::Infallible;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use tapdisk_control::ImageSpec;

use self::mapper::VhdMapper;
use super::aio::AioImage;
use super::translate::{same_file, shared_read_only, Disk, Format};
use super::OpenOptionsImg;
use crate::sys::uring::FIXED_FILES;

/// Images in a chain at most: each file takes two of a ring's fixed-file slots (buffered and
/// O_DIRECT). xapi keeps chains under 30.
pub const MAX_DEPTH: usize = (FIXED_FILES / 2) as usize;

/// The parents open in this process, shared between its chains.
static PARENTS: LazyLock<vhd::ParentSet> = LazyLock::new(vhd::ParentSet::new);

/// A VHD error at open as an `io::Error` naming the image.
fn open_error(path: &Path, e: vhd::Error) -> io::Error {
    let kind = match &e {
        vhd::Error::Io { err, .. } => err.kind(),
        vhd::Error::NoSpace(_) => io::ErrorKind::StorageFull,
        vhd::Error::ReadOnly(_) => io::ErrorKind::PermissionDenied,
        _ => io::ErrorKind::InvalidData,
    };
    io::Error::new(kind, format!("VHD image {}: {e}", path.display()))
}

/// A VHD chain served by a VBD.
pub struct VhdImage {
    chain: Mutex<vhd::Chain>,
    path: PathBuf,
    disk_type: vhd::DiskType,
    /// Its files: the leaf, then each parent (nearest first), where data extents point.
    disk: Disk,
    /// The leaf's cache counters, read without the lock.
    leaf_stats: vhd::StatsHandle,
    /// The parents (for their counters and paths).
    parents: Vec<Arc<vhd::Parent>>,
    /// Blocks dropped by discards.
    dropped: AtomicU64,
}

impl std::fmt::Debug for VhdImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhdImage")
            .field("path", &self.path)
            .field("depth", &self.disk.files.len())
            .field("read_only", &self.disk.read_only)
            .finish_non_exhaustive()
    }
}

impl VhdImage {
    /// Opens the chain `spec` names (`vhd:PATH`).
    pub fn open(spec: &ImageSpec, opts: OpenOptionsImg) -> io::Result<VhdImage> {
        let path = spec.path.clone();
        let slots = match opts.cache_slots {
            0 => vhd::DEFAULT_SLOTS,
            n => (n as usize).max(2),
        };
        let co = vhd::ChainOptions {
            read_only: opts.read_only,
            cache_slots: slots,
            parent_cache_slots: slots,
            max_depth: MAX_DEPTH,
        };
        let chain = vhd::Chain::open(&path, &co, &PARENTS).map_err(|e| open_error(&path, e))?;
        let leaf = chain.leaf_ref();
        let (size, disk_type, leaf_stats) = (leaf.size(), leaf.disk_type(), leaf.stats_handle());
        let parents = chain.parents().to_vec();
        let mut files = Vec::with_capacity(1 + parents.len());
        files.push(Arc::new(AioImage::open(&path, opts)?));
        for p in &parents {
            let f = shared_read_only(p.path(), opts.direct)?;
            // The file the data IO reads must be the one the metadata came from.
            if !p.file().is_some_and(|pf| same_file(pf, &f)) {
                return Err(io::Error::other(format!(
                    "VHD image {}: parent {} changed while it was being opened",
                    path.display(),
                    p.path().display()
                )));
            }
            files.push(f);
        }
        Ok(VhdImage {
            chain: Mutex::new(chain),
            path,
            disk_type,
            disk: Disk {
                files,
                size,
                read_only: opts.read_only,
                spec: spec.clone(),
            },
            leaf_stats,
            parents,
            dropped: AtomicU64::new(0),
        })
    }
}

impl Drop for VhdImage {
    fn drop(&mut self) {
        // The last user of the leaf: make what was written durable, as blktap does at close
        // (and put back a footer a crash lost).
        if !self.disk.read_only {
            let c = self.chain.get_mut().unwrap_or_else(|e| e.into_inner());
            let _ = c.flush();
        }
    }
}

impl Format for VhdImage {
    type Ticket = vhd::Ticket;
    type Inline = Infallible;
    type Mapper<'a> = VhdMapper<'a>;

    fn lock(&self) -> VhdMapper<'_> {
        VhdMapper {
            chain: self.chain.lock().unwrap_or_else(|e| e.into_inner()),
            dropped: &self.dropped,
        }
    }
    fn disk(&self) -> &Disk {
        &self.disk
    }
    fn name(&self) -> &'static str {
        "vhd"
    }
    fn stats(&self) -> serde_json::Value {
        let leaf = self.leaf_stats.snapshot();
        let mut total = leaf;
        let mut levels = vec![serde_json::json!({
            "path": self.path.display().to_string(),
            "read_only": self.disk.read_only,
            "cache": leaf,
        })];
        for p in &self.parents {
            let s = p.stats();
            if let Some(s) = &s {
                total = total.add(s);
            }
            levels.push(serde_json::json!({
                "path": p.path().display().to_string(),
                "read_only": true,
                "cache": s,
            }));
        }
        serde_json::json!({
            "type": "vhd",
            "image": self.path.display().to_string(),
            "disk_type": format!("{:?}", self.disk_type).to_lowercase(),
            "read_only": self.disk.read_only,
            "depth": self.disk.files.len(),
            "cache": total,
            "levels": levels,
            "discarded_blocks": self.dropped.load(Ordering::Relaxed),
        })
    }
}

#[cfg(test)]
mod tests;
