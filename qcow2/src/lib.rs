//! qcow2: QEMU's copy-on-write image format, as a library a block driver on its own io_uring
//! can serve from, interoperable with QEMU both ways.
//!
//! PLACEHOLDER

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
pub use image::{Image, OpenOptions};
pub use map::{Extent, Mapping};
pub use snapshot::Snapshot;
pub use storage::{FileStorage, MemStorage, OpenFileError, Storage};
pub use write::{GuestReader, Ticket, WriteExtent};

#[cfg(test)]
mod tests;
