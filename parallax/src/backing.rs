//! The store under a Parallax image: a file now, a striped set of remote extents later.
//!
//! [`Backing`] is synchronous positional IO. The image does its metadata IO through it; the
//! data path hands machine offsets to its caller, which does the data IO itself (tapdisk with
//! io_uring on [`FileBacking::file`]), or uses the image's synchronous read/write API, which
//! goes through the backing too.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use storefile::{Fallocate, Fallocated, Store};

use crate::error::{Error, Result};

/// Synchronous positional access to the bytes of a store.
///
/// Reads and writes transfer the whole buffer or fail. Nothing written is durable before
/// [`Backing::flush`] returns; after a crash, any subset of the writes since the last flush
/// may have reached the store, some of them only partly.
pub trait Backing: Send {
    /// Fills `buf` from `offset`. Reading past the end is an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every write that returned durable.
    fn flush(&self) -> io::Result<()>;
    /// Current size in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Makes the store at least `size` bytes long (a fixed-size store fails when it is too
    /// small).
    fn grow(&self, size: u64) -> io::Result<()>;
    /// Tells the store that `len` bytes at `offset` hold nothing useful any more, so it may
    /// give the space back (a file punches a hole). Purely a hint.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
}

impl<B: Backing + Sync> Backing for Arc<B> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn size(&self) -> io::Result<u64> {
        (**self).size()
    }
    fn grow(&self, size: u64) -> io::Result<()> {
        (**self).grow(size)
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).discard(offset, len)
    }
}

/// A store in a regular file or on a block device.
///
/// Opening takes an advisory lock (`flock`): exclusive for read-write, shared for read-only, so
/// two processes never write one image and no reader sees it change under it.
#[derive(Debug)]
pub struct FileBacking {
    store: Store,
    read_only: bool,
}

impl FileBacking {
    /// Opens an existing file or block device; [`Error::Locked`] if another process holds a
    /// conflicting lock. Errors do not repeat the path: callers say which image they opened.
    pub fn open(path: &Path, read_only: bool) -> Result<FileBacking> {
        let store = Store::open(path, read_only).map_err(|e| Error::io("cannot open", e))?;
        Self::locked(store, read_only, "cannot open")
    }

    /// Creates a new file (failing if it exists).
    pub fn create(path: &Path) -> Result<FileBacking> {
        let store = Store::create(path).map_err(|e| Error::io("cannot create", e))?;
        Self::locked(store, false, "cannot create")
    }

    fn locked(store: Store, read_only: bool, what: &str) -> Result<FileBacking> {
        match store.try_lock(!read_only) {
            Ok(true) => Ok(FileBacking { store, read_only }),
            Ok(false) => Err(Error::Locked(store.path().display().to_string())),
            Err(e) => Err(Error::io(what, e)),
        }
    }

    /// The open file: data IO at the machine offsets the image hands out goes here.
    pub fn file(&self) -> &File {
        self.store.file()
    }

    /// The path it was opened with.
    pub fn path(&self) -> &Path {
        self.store.path()
    }

    /// Whether it is a block device (fixed size, no holes).
    pub fn is_block_device(&self) -> bool {
        self.store.is_block_device()
    }

    /// Whether it was opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }
}

impl Backing for FileBacking {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file().read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file().write_all_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.file().sync_data()
    }
    fn size(&self) -> io::Result<u64> {
        self.store.size()
    }
    fn grow(&self, size: u64) -> io::Result<()> {
        let now = self.size()?;
        if size <= now {
            return Ok(());
        }
        if self.is_block_device() {
            // ENOSPC: the image turns it into an out-of-space error.
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        // Allocate the new space at once (unwritten extents: it still reads as zeroes), so
        // the data written there later needs no block allocation per IO and lands in one
        // contiguous run; where the file system cannot, a sparse extension.
        match self.store.fallocate(Fallocate::Allocate, now, size - now)? {
            Fallocated::Done => Ok(()),
            Fallocated::Unsupported => self.file().set_len(size),
        }
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.store.give_back(offset, len)
    }
}

/// A store in memory, for tests, fuzzing and the cache experiment. Clones share the bytes.
#[derive(Clone, Debug, Default)]
pub struct MemBacking {
    bytes: Arc<Mutex<Vec<u8>>>,
    limit: Option<u64>,
}

impl MemBacking {
    /// An empty store.
    pub fn new() -> MemBacking {
        MemBacking::default()
    }

    /// A store holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> MemBacking {
        MemBacking {
            bytes: Arc::new(Mutex::new(bytes)),
            limit: None,
        }
    }

    /// A store that refuses to grow past `limit` bytes.
    pub fn with_limit(limit: u64) -> MemBacking {
        MemBacking {
            bytes: Arc::default(),
            limit: Some(limit),
        }
    }

    /// A copy of the bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.bytes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn range(offset: u64, len: usize, size: usize) -> io::Result<std::ops::Range<usize>> {
    let start = usize::try_from(offset).map_err(|_| eof())?;
    let end = start.checked_add(len).ok_or_else(eof)?;
    if end > size {
        return Err(eof());
    }
    Ok(start..end)
}

fn eof() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "beyond the end of the store")
}

impl Backing for MemBacking {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let b = self.lock();
        let r = range(offset, buf.len(), b.len())?;
        buf.copy_from_slice(&b[r]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut b = self.lock();
        let start = usize::try_from(offset).map_err(|_| eof())?;
        let end = start.checked_add(buf.len()).ok_or_else(eof)?;
        if let Some(limit) = self.limit {
            if end as u64 > limit {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
        }
        if end > b.len() {
            b.resize(end, 0);
        }
        b[start..end].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.lock().len() as u64)
    }
    fn grow(&self, size: u64) -> io::Result<()> {
        if let Some(limit) = self.limit {
            if size > limit {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
        }
        let size = usize::try_from(size).map_err(|_| eof())?;
        let mut b = self.lock();
        if size > b.len() {
            b.resize(size, 0);
        }
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut b = self.lock();
        let size = b.len();
        if let Ok(r) = range(offset, len as usize, size) {
            b[r].fill(0);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_backing_reads_what_was_written_and_refuses_past_the_end() {
        let m = MemBacking::new();
        m.write_at(b"hello", 10).unwrap();
        assert_eq!(m.size().unwrap(), 15);
        let mut b = [0u8; 5];
        m.read_at(&mut b, 10).unwrap();
        assert_eq!(&b, b"hello");
        assert!(m.read_at(&mut b, 11).is_err());
        m.grow(100).unwrap();
        assert_eq!(m.size().unwrap(), 100);
        m.discard(10, 5).unwrap();
        m.read_at(&mut b, 10).unwrap();
        assert_eq!(b, [0; 5]);
        let l = MemBacking::with_limit(50);
        assert!(l.grow(51).is_err());
        assert!(l.write_at(&[1], 50).is_err());
    }

    #[test]
    fn file_backing_locks_and_punches() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let f = FileBacking::create(&p).unwrap();
        f.write_at(&[7u8; 8192], 0).unwrap();
        assert!(matches!(FileBacking::open(&p, true), Err(Error::Locked(_))));
        assert!(matches!(
            FileBacking::open(&p, false),
            Err(Error::Locked(_))
        ));
        f.discard(0, 4096).unwrap();
        let mut b = [1u8; 4096];
        f.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [0; 4096]);
        f.grow(1 << 20).unwrap();
        assert_eq!(f.size().unwrap(), 1 << 20);
        drop(f);
        let r1 = FileBacking::open(&p, true).unwrap();
        let _r2 = FileBacking::open(&p, true).unwrap();
        assert!(matches!(
            FileBacking::open(&p, false),
            Err(Error::Locked(_))
        ));
        drop(r1);
    }
}
