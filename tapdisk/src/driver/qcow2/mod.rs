//! The `qcow2:` driver: a qcow2 image ([`qcow2`]: versions 2 and 3, as `qemu-img` makes them)
//! and its backing chain as a tapdisk disk.
//!
//! `qcow2:PATH` serves the image at PATH. Its backing file (relative names are relative to
//! the image's directory, as in QEMU), and that file's own, are opened read-only, qcow2 or raw
//! as the header's backing format says (probed when it says nothing). The leaf is opened
//! read-write unless `-R`. Both take QEMU's byte-range locks, so `qemu-img` and `qemu-nbd`
//! refuse to write what we serve and we refuse what they write; `qemu-img info -U` still
//! reads it. This driver is a format of the translating engine ([`crate::driver::translate`]):
//! the library's mapping calls ([`mapper`]) say where each guest range is (a file of the
//! chain, zeroes, or a compressed cluster) and where a write goes, and the engine does the
//! data IO on io_uring straight over the guest's pages, O_DIRECT when aligned (clusters of 4
//! KiB and more keep a 4 KiB-aligned guest IO aligned in the file).
//!
//! # Backing images are shared
//!
//! One [`qcow2::BackingPool`] per process: the VBDs of one tapdisk whose chains share a base
//! image share its open image, its metadata cache and its mutex; their data IO shares one
//! pair of descriptors per file ([`crate::driver::translate::shared_read_only`]).
//!
//! # What runs on the ring's thread, synchronously
//!
//! A metadata cache miss (one L2 or refcount slice read); inflating a compressed cluster for
//! a read; the first write into a cluster the leaf does not have yet, when it covers only part
//! of it: the library copies the rest from the backing chain (or zeroes it) before the data
//! IO starts; a write into a fresh cluster past the end of the file needs none of that. A
//! flush with metadata to write back (the library's ordered write-back with its `fdatasync`s;
//! with nothing to write back a flush is one `fdatasync` on io_uring), and discards (whole
//! clusters change only L2 entries, partial ones get zeroes written).
//!
//! # Crash safety
//!
//! A write's new cluster is linked into its L2 table (in the cache) only once its data IO
//! completed; a flush writes refcounts before the L2 entries that need them, with barriers
//! between. So a crash loses at most what was written after the last flush, may leak
//! clusters (`qemu-img check -r leaks` repairs that), and never shows data that was not
//! written to that range. Pausing the VBD writes the metadata back
//! ([`crate::driver::Image::quiesce`]); closing it does too.
//!
//! # Snapshots
//!
//! `tap-ctl pause`, `qemu-img create -f qcow2 -b LEAF -F qcow2 NEW`, `tap-ctl unpause -a
//! qcow2:NEW`: before the VBD opens NEW, the paused leaf gives up its writer's locks
//! ([`crate::driver::Image::release`]), so that NEW's chain can open LEAF as its backing file
//! in this very process; if NEW fails to open, the leaf takes them back and carries on.
//!
//! # Counters
//!
//! `tap-ctl stats` shows, under `driver`, the leaf's metadata cache counters (L2 and refcount
//! hits and misses, write-backs, syncs) and each backing image's.

pub mod mapper;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};

use tapdisk_control::ImageSpec;

use self::mapper::{Compressed, Qcow2Mapper};
use super::aio::AioImage;
use super::translate::{self, shared_read_only, Disk, Format};
use super::OpenOptionsImg;
use crate::sys::uring::FIXED_FILES;

/// Images in a chain at most: each file takes two of a ring's fixed-file slots (buffered and
/// O_DIRECT).
pub const MAX_DEPTH: usize = (FIXED_FILES / 2) as usize;

/// The backing images open in this process, shared between its chains.
static POOL: LazyLock<qcow2::BackingPool> = LazyLock::new(qcow2::BackingPool::new);

/// A qcow2 error as an `io::Error` naming the image.
fn error(path: &Path, e: qcow2::Error) -> io::Error {
    let kind = match &e {
        qcow2::Error::Io { err, .. } => err.kind(),
        qcow2::Error::NoSpace(_) => io::ErrorKind::StorageFull,
        qcow2::Error::ReadOnly(_) => io::ErrorKind::PermissionDenied,
        qcow2::Error::Locked(_) => io::ErrorKind::ResourceBusy,
        qcow2::Error::Invalid(_) => io::ErrorKind::InvalidInput,
        qcow2::Error::Unsupported(_) => io::ErrorKind::Unsupported,
        _ => io::ErrorKind::InvalidData,
    };
    io::Error::new(kind, format!("qcow2 image {}: {e}", path.display()))
}

/// Whether `f` (opened for data IO) is the file `storage` (opened by the library) reads.
fn same_file(storage: &dyn qcow2::Storage, f: &AioImage) -> bool {
    storage.file().is_some_and(|s| translate::same_file(s, f))
}

/// One image of a chain, for `tap-ctl stats`.
struct Level {
    path: PathBuf,
    format: &'static str,
    stats: Option<qcow2::StatsHandle>,
}

/// A qcow2 chain served by a VBD.
pub struct Qcow2Image {
    chain: Mutex<qcow2::Chain>,
    path: PathBuf,
    /// The leaf, then each backing image (nearest first), in `files`: where data extents point.
    disk: Disk,
    cluster_size: u64,
    version: u32,
    /// The leaf, then each backing image.
    levels: Vec<Level>,
}

impl std::fmt::Debug for Qcow2Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Image")
            .field("path", &self.path)
            .field("depth", &self.disk.files.len())
            .field("read_only", &self.disk.read_only)
            .finish_non_exhaustive()
    }
}

impl Qcow2Image {
    /// Opens the chain `spec` names (`qcow2:PATH`).
    pub fn open(spec: &ImageSpec, opts: OpenOptionsImg) -> io::Result<Qcow2Image> {
        let path = spec.path.clone();
        let qo = qcow2::OpenOptions {
            read_only: opts.read_only,
            cache_slots: match opts.cache_slots {
                0 => qcow2::DEFAULT_SLOTS,
                n => (n as usize).max(2),
            },
        };
        let chain = qcow2::Chain::open(&path, &qo, &POOL).map_err(|e| error(&path, e))?;
        if chain.depth() > MAX_DEPTH {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "qcow2 image {}: a chain of {} images (at most {MAX_DEPTH})",
                    path.display(),
                    chain.depth()
                ),
            ));
        }
        let leaf = chain.leaf();
        let (size, cluster_size, version) =
            (leaf.disk_size(), leaf.cluster_size(), leaf.header().version);
        let mut files = Vec::with_capacity(chain.depth());
        let mut levels = vec![Level {
            path: path.clone(),
            format: "qcow2",
            stats: Some(chain.stats_handle()),
        }];
        let f = Arc::new(AioImage::open(&path, opts)?);
        if !same_file(&**leaf.storage(), &f) {
            return Err(changed(&path, &path));
        }
        files.push(f);
        for b in chain.backing() {
            let f = shared_read_only(b.path(), opts.direct)?;
            // The file the data IO reads must be the one the metadata came from.
            if !same_file(&*b.storage(), &f) {
                return Err(changed(&path, b.path()));
            }
            files.push(f);
            let qcow2 = b.lock_qcow2();
            levels.push(Level {
                path: b.path().to_path_buf(),
                format: if qcow2.is_some() { "qcow2" } else { "raw" },
                stats: qcow2.map(|i| i.stats_handle()),
            });
        }
        Ok(Qcow2Image {
            chain: Mutex::new(chain),
            path,
            disk: Disk {
                files,
                size,
                read_only: opts.read_only,
                spec: spec.clone(),
            },
            cluster_size,
            version,
            levels,
        })
    }

    fn chain(&self) -> std::sync::MutexGuard<'_, qcow2::Chain> {
        self.chain.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The error for a file of `image`'s chain that changed between the library's open and ours.
fn changed(image: &Path, file: &Path) -> io::Error {
    io::Error::other(format!(
        "qcow2 image {}: {} changed while it was being opened",
        image.display(),
        file.display()
    ))
}

impl Drop for Qcow2Image {
    fn drop(&mut self) {
        // The last user of the leaf: write back what only the cache holds, so the image is
        // clean for `qemu-img check`.
        if !self.disk.read_only {
            let c = self.chain.get_mut().unwrap_or_else(|e| e.into_inner());
            let _ = c.close();
        }
    }
}

impl Format for Qcow2Image {
    type Ticket = qcow2::Ticket;
    type Inline = Compressed;
    type Mapper<'a> = Qcow2Mapper<'a>;

    fn lock(&self) -> Qcow2Mapper<'_> {
        Qcow2Mapper {
            chain: self.chain(),
        }
    }
    fn disk(&self) -> &Disk {
        &self.disk
    }
    fn name(&self) -> &'static str {
        "qcow2"
    }
    fn release(&self) -> io::Result<()> {
        self.chain()
            .release_leaf()
            .map_err(|e| error(&self.path, e))
    }
    fn reclaim(&self) -> io::Result<()> {
        self.chain()
            .reclaim_leaf()
            .map_err(|e| error(&self.path, e))
    }
    fn stats(&self) -> serde_json::Value {
        let levels: Vec<serde_json::Value> = self
            .levels
            .iter()
            .map(|l| {
                serde_json::json!({
                    "path": l.path.display().to_string(),
                    "format": l.format,
                    "cache": l.stats.as_ref().map(|s| s.snapshot()),
                })
            })
            .collect();
        serde_json::json!({
            "type": "qcow2",
            "image": self.path.display().to_string(),
            "version": self.version,
            "cluster_size": self.cluster_size,
            "read_only": self.disk.read_only,
            "depth": self.disk.files.len(),
            "cache": self.levels[0].stats.as_ref().map(|s| s.snapshot()),
            "levels": levels,
        })
    }
}

#[cfg(test)]
mod tests;
