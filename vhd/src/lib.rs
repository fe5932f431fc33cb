//! VHD images as blktap serves them.
//!
//! The Virtual Hard Disk format (Microsoft's "Virtual Hard Disk Image Format Specification")
//! with what blktap adds: fixed, dynamic and differencing disks, chains of differencing disks
//! whose reads fall through to the parents where a child's sector bitmap says so, blktap's
//! *batmap* (a bit per block, set when the block is full), 2 MiB blocks placed so their data
//! is 4 KiB aligned, parents named by relative-path locators and the parent's uuid. Every
//! byte is drawn in FORMAT.md; every field read from a file is validated, with an error
//! naming the field ([`Error::Field`]). Checksums are checked on open.
//!
//! # The data path (what a block driver calls)
//!
//! The core is sans-IO for data: mapping calls turn a guest range into file offsets, the
//! caller does the data IO itself (tapdisk on io_uring), and metadata IO goes through a small
//! [`Backing`] trait synchronously (cache misses, flushes: rare and small).
//!
//! 1. Open: [`Chain::open`]`(path, &ChainOptions { read_only, cache_slots, .. }, &parents)`
//!    with one [`ParentSet`] per process: parents are opened read-only and shared between
//!    chains (by device and inode), each behind its own mutex.
//! 2. Read `len` bytes at `off` (whole sectors): repeat [`Chain::map_read`] →
//!    [`ChainExtent`] `{ len, map }`: `Data { level, file_offset }` (read from the leaf's file
//!    for level 0, [`Parent::file`] of `parents()[level - 1]` otherwise) or `Zero`; advance by
//!    `len`. One image alone: [`Image::map_read`] → [`Extent`] (`Data`, `Parent`, `Zero`).
//! 3. Write: repeat [`Image::map_write`] on [`Chain::leaf`] → [`WriteMap`] `{ len,
//!    file_offset, allocated, ticket }`; write the data there; when it completed, hand the
//!    [`Ticket`] to [`Image::commit`]; if it failed, drop the ticket (the range reads as
//!    before). A write that allocates a block has already moved the footer behind it.
//! 4. Flush (and barrier): [`Image::flush`] once every earlier write has completed and been
//!    committed, with no data IO in flight: fdatasync, dirty metadata, fdatasync (see
//!    [`map`] for the crash-safety ordering).
//! 5. Discard: [`Chain::discard`] drops whole blocks with nothing below them in the chain and
//!    punches their space (synchronous, ordered).
//! 6. Counters: [`Chain::stats`], or [`Image::stats_handle`] (readable from any thread
//!    without a lock) → [`CacheStats`] (BAT and bitmap hits and misses, batmap hits).
//!
//! The synchronous executor ([`Chain::read_at`], [`Chain::write_at`], [`Chain::flush`],
//! [`Chain::discard`]) does the same through plain positional IO, for tools and tests.
//!
//! # Tools
//!
//! [`create()`], [`snapshot`], [`coalesce`], [`check()`], [`resize`] and footer edits
//! ([`Image::set_hidden`]) are library calls; `vhd-util` (tools/vhd-util) is a thin CLI.
//!
//! ```
//! use vhd::{create_on, Chain, CreateOptions, Image, MemBacking, OpenOptions};
//! let file = MemBacking::new(64 << 20);
//! create_on(&file, &CreateOptions::dynamic(8 << 20), None).unwrap();
//! let opts = OpenOptions { read_only: false, ..Default::default() };
//! let img = Image::open(Box::new(file), "mem", &opts).unwrap();
//! let mut chain = Chain::from_parts(img, Vec::new());
//! chain.write_at(4096, b"hello").unwrap();
//! chain.flush().unwrap();
//! let mut buf = [0u8; 5];
//! chain.read_at(4096, &mut buf).unwrap();
//! assert_eq!(&buf, b"hello");
//! ```

pub mod backing;
pub mod cache;
pub mod chain;
pub mod check;
pub mod coalesce;
pub mod create;
pub mod edit;
pub mod error;
pub mod format;
pub mod grow;
pub mod image;
pub mod locator;
pub mod map;
pub mod resize;
mod sync;

pub use backing::{Backing, FileBacking, MemBacking};
pub use cache::{CacheStats, StatsHandle, DEFAULT_SLOTS};
pub use chain::{
    find_parent, Chain, ChainExtent, ChainMapping, ChainOptions, Parent, ParentImage, ParentRef,
    ParentSet,
};
pub use check::{check, CheckOptions, CheckReport};
pub use coalesce::coalesce;
pub use create::{
    create, create_on, snapshot, CreateOptions, ParentLink, SnapshotInfo, SnapshotOptions,
};
pub use error::{Error, Result};
pub use format::{DiskType, Footer, Header, Uuid};
pub use grow::{grow, revert};
pub use image::{Image, OpenOptions, Ticket};
pub use map::{Extent, Mapping, WriteMap};
pub use resize::resize;

#[cfg(test)]
mod tests;
