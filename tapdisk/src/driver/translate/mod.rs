//! The translating engine: one engine for every image format that maps guest ranges to
//! ranges of files (`parallax:`, `vhd:`, `qcow2:`).
//!
//! The format's library answers *mapping calls* (where is this guest range, where does this
//! write go) from its metadata, through its own metadata cache; this engine does all the data
//! IO on the ring's io_uring, straight over the guest's pages ([`engine`]): the iovecs of each
//! backend IO are cut at extent boundaries (no data copied) and each run contiguous in one file
//! becomes one IO of that file's `aio` engine (O_DIRECT when aligned, short transfers resumed).
//!
//! # What a format provides
//!
//! A format implements [`Format`] for one open disk (an image, or a chain of them), shared by
//! every ring of the VBD:
//!
//! - [`Format::disk`] ([`Disk`]): the files data extents point into, each opened as a raw
//!   image ([`AioImage`]), with the disk's size, read-only flag and spec. File 0 takes every
//!   write; the others (parents, backing files) are read only, and may be shared with other
//!   VBDs ([`shared_read_only`]).
//! - [`Format::lock`]: its [`Mapper`], locked for the mapping calls of one IO (the format
//!   chooses the lock: a mutex per disk, or one per image file shared by several disks).
//! - Its name and counters (`tap-ctl stats` shows [`Format::stats`] under `driver`; read them
//!   without the lock).
//!
//! and a [`Mapper`]:
//!
//! - [`Mapper::map_read`]: the longest prefix of a range with one [`ReadMap`]: `Data` (a run
//!   contiguous in one file), `Zero`, or `Inline` (bytes the format produces itself, such as a
//!   compressed cluster: [`Mapper::read_inline`] reads and inflates it, synchronously, into the
//!   guest's memory). Backing files are the format's business: a range its top image does not
//!   hold is mapped through the chain to the file that does (a higher file index), or to
//!   `Zero`.
//! - [`Mapper::map_write`]: the longest prefix contiguous in file 0, allocating if needed,
//!   with an optional ticket. What must be on disk before the data (a VHD block's region past
//!   the old end of the file, a qcow2 cluster's copy-on-write of the bytes the write does not
//!   cover) the mapper writes itself before it returns: the engine starts the data IO only
//!   afterwards.
//! - [`Mapper::commit`] of each ticket once every part of the IO completed (the metadata that
//!   makes the new data visible: bitmap bits, L2 entries; in the cache, written back lazily),
//!   or [`Mapper::abort`] if any part failed (the range then reads as before the write, or as
//!   zeroes: never as stale file bytes); [`Mapper::write_failed`] for formats without tickets.
//! - [`Mapper::metadata_dirty`] and [`Mapper::flush`]: a flush with nothing dirty is an
//!   `fdatasync` of file 0 on io_uring; otherwise the mapper's own flush (ordered metadata
//!   writes with the barriers its crash safety needs, data included), synchronously.
//! - [`Mapper::discard`]: synchronous; free what the format can (whole blocks, clusters).
//!
//! The engine calls flush and discard only when no IO of *its ring* is in flight (the
//! scheduler's ordering); other rings of the same VBD (an NBD export beside the guest's ring)
//! may have writes in flight whose tickets are not yet committed. A format must tolerate that:
//! a flush writes back what was committed, and a later commit into a block that a discard
//! dropped meanwhile must do no harm.
//!
//! # What runs synchronously on the ring's thread
//!
//! The mapping calls (no IO when the metadata is cached; a miss reads a metadata sector or
//! page), the work before a write's data (rare: the first write into a block or cluster),
//! commits (in the cache), flushes with dirty metadata, discards, inline reads, and zero fills.

pub mod cursor;
pub mod engine;

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};

use tapdisk_control::ImageSpec;

use super::aio::AioImage;
use super::engine::{Engine, Uring};
use super::{DirectIo, Image, OpenOptionsImg};

/// A positive errno: what mapping calls fail with (the engine reports it negated).
pub type Errno = i32;

/// Where a prefix of a read range is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadMap<I> {
    /// In file `file` of the disk's [`Disk::files`], from byte `offset`, contiguous.
    Data {
        /// Index into [`Disk::files`].
        file: usize,
        /// Byte offset in that file.
        offset: u64,
    },
    /// Reads as zeroes.
    Zero,
    /// The format produces the bytes itself ([`Mapper::read_inline`]).
    Inline(I),
}

/// A prefix of a read range with one [`ReadMap`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadExtent<I> {
    /// Bytes covered (at least 1, at most the length asked for).
    pub len: u64,
    /// Where they are.
    pub map: ReadMap<I>,
}

/// Where a prefix of a write goes: file 0, from `offset`.
#[derive(Debug)]
pub struct WriteExtent<T> {
    /// Bytes covered (at least 1, at most the length asked for).
    pub len: u64,
    /// Byte offset in file 0.
    pub offset: u64,
    /// To [`Mapper::commit`] once the IO's data is written, or [`Mapper::abort`] if not.
    pub ticket: Option<T>,
}

/// The mapping calls of one open disk, under the format's lock.
pub trait Mapper {
    /// Links a write's newly allocated space once its data is written.
    type Ticket;
    /// What [`ReadMap::Inline`] carries.
    type Inline: Copy;

    /// Where the guest bytes `[offset, offset + len)` are: the longest prefix with one
    /// mapping. Ranges are whole sectors inside the disk.
    fn map_read(&mut self, offset: u64, len: u64) -> Result<ReadExtent<Self::Inline>, Errno>;

    /// Fills `out` with the bytes of an inline extent from byte `skip` of the extent on.
    fn read_inline(&mut self, what: Self::Inline, skip: u64, out: &mut [u8]) -> Result<(), Errno>;

    /// Where the guest bytes `[offset, offset + len)` are to be written: the longest prefix
    /// contiguous in file 0, allocated, with whatever must precede the data already written.
    fn map_write(&mut self, offset: u64, len: u64) -> Result<WriteExtent<Self::Ticket>, Errno>;

    /// Records a write whose data IO completed.
    fn commit(&mut self, ticket: Self::Ticket) -> Result<(), Errno>;

    /// Forgets a write whose data IO failed: its range reads as before.
    fn abort(&mut self, ticket: Self::Ticket);

    /// A write of `[offset, offset + len)` failed (after its tickets were aborted): make the
    /// range safe to read (formats without tickets zero it). Best effort.
    fn write_failed(&mut self, _offset: u64, _len: u64) {}

    /// Whether a flush must do more than `fdatasync` file 0.
    fn metadata_dirty(&self) -> bool {
        true
    }

    /// Makes every committed write durable, data and metadata.
    fn flush(&mut self) -> Result<(), Errno>;

    /// Frees what the format can of `[offset, offset + len)` (a hint: what stays keeps its
    /// content, unless the format documents otherwise).
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), Errno>;
}

/// What every translated disk has, whatever its format.
#[derive(Debug)]
pub struct Disk {
    /// The files data extents point into; file 0 takes the writes. Never empty.
    pub files: Vec<Arc<AioImage>>,
    /// Guest-visible size in bytes (a multiple of 512).
    pub size: u64,
    /// Writes and discards are refused.
    pub read_only: bool,
    /// The spec it was opened from.
    pub spec: ImageSpec,
}

/// One open disk of a translating format (see the module docs).
pub trait Format: Send + Sync + 'static {
    /// [`Mapper::Ticket`].
    type Ticket;
    /// [`Mapper::Inline`].
    type Inline: Copy;
    /// The mapper, locked.
    type Mapper<'a>: Mapper<Ticket = Self::Ticket, Inline = Self::Inline>
    where
        Self: 'a;

    /// Takes the lock for a few mapping calls.
    fn lock(&self) -> Self::Mapper<'_>;
    /// Its files, size, read-only flag and spec.
    fn disk(&self) -> &Disk;
    /// The format's name, for logs ("vhd").
    fn name(&self) -> &'static str;
    /// Counters for `tap-ctl stats`, read without the lock.
    fn stats(&self) -> serde_json::Value;
    /// [`Image::release`].
    fn release(&self) -> io::Result<()> {
        Ok(())
    }
    /// [`Image::reclaim`].
    fn reclaim(&self) -> io::Result<()> {
        Ok(())
    }
}

/// A disk of a translating format as a VBD serves it: the [`Image`] over a [`Format`].
pub struct Translated<F: Format> {
    format: F,
}

impl<F: Format> Translated<F> {
    /// Serves `format`.
    pub fn new(format: F) -> Translated<F> {
        Translated { format }
    }

    /// The format.
    pub fn format(&self) -> &F {
        &self.format
    }
}

impl<F: Format> Image for Translated<F> {
    fn size(&self) -> u64 {
        self.format.disk().size
    }
    fn read_only(&self) -> bool {
        self.format.disk().read_only
    }
    fn supports_discard(&self) -> bool {
        !self.read_only()
    }
    fn engine(self: Arc<Self>, ring: &mut Uring, tags: u32) -> io::Result<Box<dyn Engine>> {
        Ok(Box::new(engine::TranslateEngine::new(self, ring, tags)?))
    }
    fn spec(&self) -> ImageSpec {
        self.format.disk().spec.clone()
    }
    fn direct(&self) -> bool {
        self.format.disk().files.first().is_some_and(|f| f.direct())
    }
    fn stats(&self) -> serde_json::Value {
        self.format.stats()
    }
    fn release(&self) -> io::Result<()> {
        self.format.release()
    }
    fn reclaim(&self) -> io::Result<()> {
        self.format.reclaim()
    }
    fn quiesce(&self) -> io::Result<()> {
        if self.read_only() {
            return Ok(());
        }
        let mut m = self.format.lock();
        if m.metadata_dirty() {
            let what = format!("writing back the metadata of {}", self.spec());
            m.flush().map_err(|e| errno_error(&what, e))?;
        }
        Ok(())
    }
}

/// A file's identity and O_DIRECT policy.
type FileKey = (u64, u64, DirectIo);

/// The read-only data files open in this process.
static SHARED: Mutex<Vec<(FileKey, Weak<AioImage>)>> = Mutex::new(Vec::new());

/// The file at `path` opened read-only for data IO, shared with every other disk of this
/// process that reads it (a base image under several VBDs' chains).
pub fn shared_read_only(path: &Path, direct: DirectIo) -> io::Result<Arc<AioImage>> {
    let m = std::fs::metadata(path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display())))?;
    let key = (m.dev(), m.ino(), direct);
    let mut open = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    open.retain(|(_, w)| w.strong_count() > 0);
    if let Some(f) = open
        .iter()
        .find(|(k, _)| *k == key)
        .and_then(|(_, w)| w.upgrade())
    {
        return Ok(f);
    }
    let opts = OpenOptionsImg {
        read_only: true,
        direct,
        ..Default::default()
    };
    let f = Arc::new(AioImage::open(path, opts)?);
    open.push((key, Arc::downgrade(&f)));
    Ok(f)
}

/// Whether `image` (opened for data IO) is the same file as `file` (opened by a format's
/// library for its metadata): a file renamed or replaced between the two opens is not.
pub fn same_file(file: &std::fs::File, image: &AioImage) -> bool {
    match (file.metadata(), std::fs::metadata(image.path())) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// How many shared read-only files are open (for tests).
pub fn shared_files_open() -> usize {
    let open = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    open.iter().filter(|(_, w)| w.strong_count() > 0).count()
}

/// An errno as an `io::Error` saying what was done.
pub fn errno_error(what: &str, e: Errno) -> io::Error {
    let err = io::Error::from_raw_os_error(e);
    io::Error::new(err.kind(), format!("{what}: {err}"))
}

#[cfg(test)]
mod tests;
