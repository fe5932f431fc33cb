//! The file under an image: synchronous positional IO, for metadata and for the synchronous
//! executor. A block driver does its data IO itself at the offsets the mapping calls return,
//! on [`Backing::file`] or a descriptor of its own on the same path.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use storefile::{Fallocate, Fallocated, Store};

/// Synchronous positional access to an image file.
///
/// Reads and writes transfer the whole buffer or fail. Nothing written is durable before
/// [`Backing::flush`] returns; after a crash any subset of the writes since the last flush may
/// have reached the file, some only partly, but a write never changes bytes outside its range.
pub trait Backing: Send + Sync {
    /// Fills `buf` from `offset`. Reading past the end is an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `buf` at `offset`, growing the file if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every write that returned durable (fdatasync).
    fn flush(&self) -> io::Result<()>;
    /// Current size in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Gives back the space of `len` bytes at `offset`, which then read as zeroes.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Cuts or extends the file to `len` bytes (ignored for block devices).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Whether the size is fixed (a block device): the footer stays at its end and new blocks
    /// are zeroed explicitly.
    fn fixed_size(&self) -> bool {
        false
    }
    /// The open file, for data IO by a driver; `None` for memory.
    fn file(&self) -> Option<&File> {
        None
    }
    /// The path it was opened with, if any.
    fn path(&self) -> Option<&Path> {
        None
    }
}

/// An image in a regular file or on a block device.
#[derive(Debug)]
pub struct FileBacking {
    store: Store,
}

impl FileBacking {
    /// Opens an existing file or block device.
    pub fn open(path: &Path, read_only: bool) -> io::Result<FileBacking> {
        Ok(FileBacking {
            store: Store::open(path, read_only)?,
        })
    }

    /// Creates a new file, failing if it exists.
    pub fn create(path: &Path) -> io::Result<FileBacking> {
        Ok(FileBacking {
            store: Store::create(path)?,
        })
    }
}

impl Backing for FileBacking {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.store.file().read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.store.file().write_all_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.store.file().sync_data()
    }
    fn size(&self) -> io::Result<u64> {
        self.store.size()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        // Zeroing a range of a block device: it may not hold zeroes after a plain discard.
        let what = if self.store.is_block_device() {
            Fallocate::ZeroRange
        } else {
            Fallocate::PunchHole
        };
        if self.store.fallocate(what, offset, len)? == Fallocated::Done {
            return Ok(());
        }
        // No hole punching here: write zeroes instead, so the range still reads as zero.
        let z = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(z.len() as u64) as usize;
            self.store.file().write_all_at(&z[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if self.store.is_block_device() {
            return Ok(());
        }
        self.store.file().set_len(len)
    }
    fn fixed_size(&self) -> bool {
        self.store.is_block_device()
    }
    fn file(&self) -> Option<&File> {
        Some(self.store.file())
    }
    fn path(&self) -> Option<&Path> {
        Some(self.store.path())
    }
}

/// An image in memory, for tests and fuzzing. Writes beyond `limit` bytes fail with ENOSPC,
/// so a hostile image cannot make it grow without bound.
#[derive(Debug)]
pub struct MemBacking {
    data: Mutex<Vec<u8>>,
    limit: u64,
}

impl MemBacking {
    /// An empty file that may grow to `limit` bytes.
    pub fn new(limit: u64) -> MemBacking {
        MemBacking::from_bytes(Vec::new(), limit)
    }
    /// A file holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>, limit: u64) -> MemBacking {
        MemBacking {
            data: Mutex::new(bytes),
            limit,
        }
    }
    /// A copy of the contents.
    pub fn bytes(&self) -> Vec<u8> {
        self.lock().clone()
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Backing for MemBacking {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.lock();
        let end = offset.checked_add(buf.len() as u64);
        match end {
            Some(end) if end <= d.len() as u64 => {
                buf.copy_from_slice(&d[offset as usize..end as usize]);
                Ok(())
            }
            _ => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
        }
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut d = self.lock();
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.limit)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOSPC))?;
        if end > d.len() as u64 {
            d.resize(end as usize, 0);
        }
        d[offset as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.lock().len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if len > self.limit {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.lock().resize(len as usize, 0);
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut d = self.lock();
        let n = d.len() as u64;
        let start = offset.min(n) as usize;
        let end = offset.saturating_add(len).min(n) as usize;
        d[start..end].fill(0);
        Ok(())
    }
}
