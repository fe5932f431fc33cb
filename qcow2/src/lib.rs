//! qcow2: QEMU's copy-on-write image format, as a library a block driver on its own io_uring
//! can serve from, interoperable with QEMU both ways.
//!
//! The core is *sans-IO*: the library validates metadata and translates guest ranges into
//! file ranges; the caller does the data IO (tapdisk on io_uring, straight from the guest's
//! pages; the synchronous executor here with `pread`/`pwrite`). Metadata (L2 tables,
//! refcount blocks) goes through a metadata cache with a fixed number of slots and hit/miss
//! counters; a miss reads one slice synchronously through [`Storage`].
//!
//! Supported: versions 2 and 3; every cluster size QEMU allows (512 B to 2 MiB); refcounts of
//! every width (`refcount_order` 0..=6); backing files of any depth (up to [`MAX_DEPTH`]), raw
//! or qcow2, opened read-only and shared between the chains of a process ([`BackingPool`]);
//! zero clusters (v3); write-zeroes and discard that free or zero clusters; compressed
//! clusters (deflate) on read, and copied out when written; growing the refcount table. The
//! on-disk format, byte by byte, is in `FORMAT.md` beside this crate.
//!
//! Refused at open, with an error naming the feature, never misread: encryption, external
//! data files, extended L2 entries, compression types other than deflate, unknown
//! incompatible feature bits. Opened read-only only: images with internal snapshots (the
//! snapshot table is read and validated, nothing more) and images marked corrupt. A dirty
//! image (lazy refcounts in use, not closed cleanly) opens read-only as it is; a writable
//! open first rebuilds its refcounts from the L1/L2 tables and fixes the copied bits, then
//! clears the dirty bit, as QEMU does. This library never sets the dirty bit itself: it does
//! not use lazy refcounts (an image with the lazy-refcounts compatible bit is written with
//! ordinary, ordered refcount updates, which is always allowed). Every field read from an
//! image is checked before use, with an error naming it: offsets aligned and inside the file,
//! table sizes within QEMU's limits and the file, no allocation sized by an unchecked field.
//!
//! # How a block driver uses it
//!
//! One [`Chain`] per virtual disk (under the driver's mutex, like Parallax's image):
//!
//! 1. **Open**: `Chain::open(path, &OpenOptions { read_only, cache_slots }, &pool)`, with one
//!    [`BackingPool`] per process, so disks sharing a base image share one open, read-only
//!    [`BackingImage`] (an `Arc`; its metadata behind its own mutex). The leaf takes QEMU's
//!    byte-range locks (a writer excludes other writers, QEMU's included; backing files are
//!    locked shared, against writers).
//! 2. **Read** `len` bytes at `off`: repeat `let e = chain.map_read(off, len)?`; for `e.len`
//!    bytes, by `e.mapping`: [`Mapping::Data`] `{ offset }`: read at `offset` of
//!    [`Chain::layer_storage`]`(e.layer)`'s [`Storage::file`] (the leaf is layer 0, its backing
//!    image 1, ...); [`Mapping::Zero`]: fill zeroes; [`Mapping::Compressed`]: call
//!    [`Chain::read_compressed`] (synchronous; it keeps the last inflated cluster). Cut the
//!    iovecs at extent boundaries; no data is copied. A data extent never reaches past the
//!    end of its file (bytes there map to zeroes), so reads never come back short.
//! 3. **Write**: repeat `let w = chain.map_write(off, len)?`; write `w.len` bytes at file
//!    offset `w.offset` of the leaf. If `w.ticket` is `Some`, the run went to new clusters:
//!    once that data write completed, [`Chain::commit`]`(ticket)` links them into their L2
//!    tables (in the cache, no IO on a hit); if it failed, [`Chain::abort`]`(ticket)`. Until
//!    the commit, reads see the old content. Writes into clusters that are already allocated
//!    get no ticket: nothing to do afterwards. Several writes may be in flight into one new
//!    cluster (each gets its own ticket).
//! 4. **What is synchronous**: a miss in the metadata cache (one slice read); a write that
//!    covers only part of a *new* cluster fills the rest first (a copy from the backing
//!    chain, the old or inflated cluster, or zeroes; skipped when the cluster lies past the
//!    old end of the file and the rest must read as zeroes, which is the common case of a
//!    fresh image: a 4 KiB write into an unallocated cluster then does no IO in the library
//!    at all). Allocating writes never `fdatasync`.
//! 5. **Write-zeroes and discard**: [`Chain::write_zeroes`]`(off, len, unmap)` and
//!    [`Chain::discard`] (synchronous; whole clusters change only L2 entries, partial ones
//!    get zeroes written). A discarded range always reads as zeroes afterwards.
//! 6. **Flush** (when no data IO is in flight, as the scheduler sends it): [`Chain::flush`]
//!    writes the metadata back in the order below, with the syncs it needs (one `fdatasync`
//!    when only data was written, at most four when new tables were allocated).
//! 7. **Counters** for `tap-ctl stats`: [`Chain::stats_handle`] gives a [`StatsHandle`],
//!    readable from any thread without a lock ([`CacheStats`]: L2 and refcount hits and
//!    misses, write-backs, syncs; `serde::Serialize`).
//!
//! The mapping calls allocate nothing once the per-image buffers are warm, and take no lock
//! of their own except a backing image's mutex when a read falls through to it. Measured
//! (`mapping_cost`, release build): about 95 ns for `map_write` + `commit` of a 4 KiB write
//! into an unallocated cluster, about 30 ns for a `map_read`, with the L2 slices cached.
//!
//! Data IO may use a descriptor of the driver's own on the same file, with `O_DIRECT`: the
//! library's own writes (metadata, fills) are buffered, and Linux writes back and drops the
//! page cache over a range before a direct IO to it. File offsets keep the guest offset's
//! alignment within a cluster, so an IO aligned to 4 KiB stays aligned when clusters are at
//! least 4 KiB (with 512-byte or 2 KiB clusters it may not: fall back to buffered IO then).
//!
//! # Crash safety
//!
//! After a crash the image may leak clusters (`qemu-img check` reports leaks, which
//! `qemu-img check -r leaks` repairs); it is never corrupt and never shows data that was not
//! written to that guest range, and every write acknowledged before a completed flush is
//! there. The ordering that guarantees it:
//!
//! - An allocation raises the new clusters' refcounts in the cache at [`Image::map_write`].
//!   The L2 entry is set only at [`Image::commit`], after the data write completed. So an L2
//!   entry in the cache never points at a cluster whose data is not written.
//! - A partial write into a new cluster fills the rest of it before the data write is even
//!   issued (so the whole cluster holds the right bytes whichever write lands first).
//! - Write-back (at a flush, or when the cache must evict a dirty L2 slice) goes:
//!   1. dirty refcount blocks; if new refcount blocks were created, `fdatasync`, then their
//!      refcount table entries; then `fdatasync` (this also makes the data of every
//!      committed write durable);
//!   2. dirty L2 slices; if new L2 tables were created, `fdatasync`, then their L1 entries;
//!      then `fdatasync`;
//!   3. then, and only then, the refcounts of clusters that L2 entries no longer point at
//!      (discarded, zeroed, replaced compressed clusters) drop, in the cache: a refcount
//!      never reaches 0 on disk while a durable L2 entry still points at the cluster.
//! - Hence refcount increments reach the disk before any L2 entry that needs them
//!   (QEMU's "refcount blocks before the L2 tables that point at new clusters"), and
//!   decrements after the L2 change (QEMU's dependency of the refcount cache on the L2
//!   cache). A refcount block in the cache therefore differs from the disk only in ways that
//!   are safe to write at any time, so one may be evicted without a sync.
//! - Growing the refcount table: new refcount blocks and the new table are written after the
//!   last cluster the old table covers, synced, then the header's two fields are rewritten in
//!   one 12-byte write and synced, then the old table is freed.
//! - New L2 tables and refcount blocks are zeroed on disk when allocated (unless they lie
//!   past the old end of the file), so a table entry that becomes durable early points at
//!   zeroes, never at stale bytes.
//!
//! `tests/crash.rs` checks this with real `qemu-img check` after crashes at random points
//! where a random subset of the unflushed writes reached the file.
//!
//! # Evaluation of existing crates
//!
//! Before writing this library, two Rust qcow2 implementations were evaluated against what
//! tapdisk needs: data IO on its own io_uring with no second async runtime on the hot path,
//! and writes to images with backing files.
//!
//! - **`qcow2-rs`** (crates.io, used by the ublk qcow2 target, `rublk`): an async/await
//!   library whose IO goes through its own `Qcow2IoOps` trait; it depends on `tokio` (and
//!   `tokio-uring`), `futures-locks` and `async-recursion`, so serving from it means running
//!   its futures on an executor on the ring thread (a second runtime beside tapdisk's own
//!   io_uring loop); the library does the data IO itself rather than handing out file
//!   ranges, so tapdisk could not issue one io_uring operation straight over the guest's
//!   pages per extent. It writes to backing chains, but does a copy-on-write with an
//!   `fsync` of the new cluster before updating the mapping, refuses every image with an
//!   incompatible feature bit set (the dirty bit included), and leans on `unwrap()`/asserts
//!   in paths an image controls. Does not fit.
//! - **cloud-hypervisor's `block` crate** (`block/src/qcow`, derived from crosvm): closer in
//!   shape (it has `map_clusters_for_read`/`map_cluster_for_write` returning host offsets for
//!   the caller's io_uring), but it is not a published crate (a workspace member of
//!   cloud-hypervisor tied to its `vmm-sys-util` and virtio types), keeps whole pointer
//!   tables in RAM up to a fixed entry count, models refcounts as 16-bit only in its cache,
//!   and its write mapping links the L2 entry at mapping time, before the caller's data
//!   write, taking copy-on-write data from the backing file as a buffer the caller read
//!   beforehand. Crash ordering is left to whole-cache syncs. Does not fit either.
//!
//! So this crate is our own, shaped like the Parallax library: a sans-IO core with mapping
//! calls, commit-after-data tickets, a slot-bounded cache, and a synchronous executor on the
//! same calls. Deflate comes from `miniz_oxide`.
//!
//! ```
//! use std::sync::Arc;
//! use qcow2::{create, CreateOptions, Image, MemStorage, OpenOptions, Storage};
//! let m = MemStorage::new();
//! create(&m, &CreateOptions::new(1 << 20)).unwrap();
//! let s: Arc<dyn Storage> = Arc::new(m);
//! let mut img = Image::open(s, &OpenOptions::default()).unwrap();
//! // What a driver does: map, write the data itself, commit.
//! let w = img.map_write(4096, 512, None).unwrap();
//! img.storage().write_at(&[7u8; 512], w.offset).unwrap();
//! if let Some(t) = w.ticket {
//!     img.commit(t).unwrap();
//! }
//! img.flush().unwrap();
//! let mut b = [0u8; 512];
//! img.read_at(4096, &mut b, None).unwrap();
//! assert_eq!(b, [7u8; 512]);
//! ```

mod alloc;
pub mod cache;
mod chain;
mod compress;
mod create;
pub mod entry;
pub mod error;
pub mod header;
mod image;
mod io;
mod map;
mod meta;
mod repair;
pub mod snapshot;
pub mod storage;
mod write;
mod zero;

pub use cache::{CacheStats, StatsHandle, DEFAULT_SLOTS};
pub use chain::{BackingImage, BackingPool, Chain, ChainExtent, Format, MAX_DEPTH};
pub use create::{create, CreateOptions};
pub use entry::Compressed;
pub use error::{Error, Result};
pub use header::Header;
pub use image::Ticket;
pub use image::{Image, OpenOptions};
pub use map::{Extent, Mapping};
pub use repair::CheckReport;
pub use snapshot::Snapshot;
pub use storage::{FileStorage, MemStorage, OpenFileError, Storage};
pub use write::{GuestReader, WriteExtent};

#[cfg(test)]
mod tests;
