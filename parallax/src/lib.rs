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
mod volume;

pub use backing::{Backing, FileBacking, MemBacking};
pub use cache::{CacheStats, LayerStats, StatsHandle, DEFAULT_SLOTS};
pub use check::{check, CheckReport};
pub use disk::{Disk, DiskOptions, DiskSpec};
pub use error::{Error, Result};
pub use fault::{FaultBacking, FaultOps, Rng};
pub use format::VolumeKind;
pub use image::{CreateOptions, Image, OpenOptions, ProgressFn, Volume, VolumeId, DEFAULT_VOLUME};
pub use volume::{DefragReport, Extent, Usage};

#[cfg(test)]
mod tests;
