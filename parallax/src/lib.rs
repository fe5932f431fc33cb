//! Parallax: a copy-on-write virtual disk with fast snapshots and clones.
//!
//! One image (a file, a block device, later a striped remote store) holds any number of
//! *volumes* of one virtual size: writable disks and read-only snapshots, which share blocks.
//! Two translation layers find a volume's data, as in the Parallax the thesis measures
//! (section 3.5):
//!
//! - **V2P**, virtual to physical: per volume, a radix tree of 4 KiB nodes with 512 entries
//!   and at least three levels. Entries carry a *writable* bit; a snapshot or clone copies only
//!   the root, with every entry read-only, and a write copies shared blocks (and the path above
//!   them) first. This is where sharing (deduplication) comes from.
//! - **P2M**, physical to machine: one tree for the whole image mapping each physical block
//!   (data or V2P node) to where it lives in the store, with its reference count. Blocks move
//!   (defragmentation, [`Image::defrag`]) by changing only their P2M entry.
//!
//! Nodes of both layers go through one metadata cache with a fixed number of slots
//! ([`OpenOptions::cache_slots`], 128 by default; the thesis's 10 works, so does 1), with hits
//! and misses counted per layer ([`CacheStats`], serialisable for `tap-ctl stats`).
//!
//! Crash consistency is by shadow paging: nothing the last commit references is overwritten
//! before the next commit is durable, and a commit ends by writing one of two superblock copies
//! (see [`image`] and FORMAT.md). After a crash the image opens at its last commit, with every
//! write acknowledged before the last completed [`Image::flush`]. [`check()`] verifies an image
//! and reports in plain words.
//!
//! The store is reached through [`Backing`]: [`FileBacking`] (a file or block device),
//! [`MemBacking`], and [`FaultBacking`], which injects errors and simulates power cuts for tests.
//!
//! # The data path
//!
//! [`Disk`] is what a block driver (tapdisk's `parallax:PATH[@VOLUME]`) holds. For a request
//! it asks [`Disk::map_read`] or [`Disk::map_write`] where the bytes live, gets an [`Extent`]
//! (the longest prefix contiguous in the store, or unwritten) and does the data IO itself at
//! that offset of [`FileBacking::file`]; [`Disk::flush`] commits. After warm-up the mapping
//! calls allocate no memory. [`Disk::read_at`] and [`Disk::write_at`] do the same synchronously
//! through the backing, for tools, tests and NBD.
//!
//! ## How a block driver uses it (tapdisk's `parallax:PATH[@VOLUME]`)
//!
//! 1. Open: `let spec: DiskSpec = "vm.plx@snap".parse()?;` then
//!    `Disk::open(&spec, DiskOptions { cache_slots, read_only })`. Snapshots open read-only;
//!    a writable volume locks the image file (`flock`) for this process. Several volumes of one
//!    image served by one process share one [`Image`] (e.g. `Arc<Mutex<Image>>`, a
//!    [`VolumeId`] per VBD): the same mapping calls exist on [`Image`] with a volume argument.
//! 2. Data IO goes to the image file at the offsets the mapping calls return:
//!    [`Disk::file`], or a descriptor of your own on the same path (O_DIRECT works: a machine
//!    offset keeps the alignment of the virtual offset within its 4 KiB block).
//! 3. Read `len` bytes at `off`: repeat `let e = disk.map_read(off, len)?` and, for `e.len`
//!    bytes, read at `e.machine` (or fill zeroes when it is `None`); advance by `e.len`.
//! 4. Write: the same with [`Disk::map_write`] (`machine` is always `Some`). It allocates or
//!    copies blocks as needed and, for blocks the write covers only partly, fills the rest
//!    (zeroes or the old content) synchronously before returning. If the data write then
//!    fails, call [`Disk::discard`] on the range.
//! 5. Flush (and barrier): once every earlier request has completed, [`Disk::flush`] commits.
//!    No data IO may be in flight during a flush.
//! 6. Discard: [`Disk::discard`]; write-zeroes: [`Disk::write_zeroes`].
//! 7. Counters for `tap-ctl stats`: [`Disk::stats_handle`], read from any thread without a
//!    lock ([`StatsHandle::snapshot`] gives a [`CacheStats`], `serde::Serialize`).
//!
//! The mapping calls take no lock, do no IO when the metadata they need is cached, and
//! allocate nothing once warm.
//!
//! ```
//! use parallax::{CreateOptions, Image, MemBacking};
//! let mut img = Image::create(MemBacking::new(), &CreateOptions::new(1 << 20)).unwrap();
//! let base = img.volume("base").unwrap();
//! img.write_at(base, 0, &[7u8; 4096]).unwrap();
//! let snap = img.snapshot(base, "before").unwrap();
//! img.write_at(base, 0, &[9u8; 4096]).unwrap();
//! img.flush().unwrap();
//! let mut b = [0u8; 4096];
//! img.read_at(snap, 0, &mut b).unwrap();
//! assert_eq!(b, [7u8; 4096]);
//! ```

mod alloc;
pub mod backing;
pub mod bench;
pub mod cache;
pub mod check;
pub mod disk;
pub mod error;
pub mod fault;
pub mod format;
pub mod image;
mod meta;
mod report;
mod superblocks;
mod volume;

pub use backing::{Backing, FileBacking, MemBacking};
pub use cache::{CacheStats, LayerStats, StatsHandle, DEFAULT_SLOTS};
pub use check::{check, CheckReport};
pub use disk::{Disk, DiskOptions, DiskSpec};
pub use error::{Error, Result};
pub use fault::{FaultBacking, FaultOps, Rng};
pub use format::VolumeKind;
pub use image::{CreateOptions, Image, OpenOptions, ProgressFn, Volume, VolumeId, DEFAULT_VOLUME};
pub use report::{DefragReport, Extent, Usage};

#[cfg(test)]
mod tests;
