//! The bytes under an image: a file, a block device, or memory.
//!
//! [`Storage`] is synchronous positional IO. The library does its metadata IO (and, in the
//! synchronous executor, the data IO) through it; a block driver does the data IO itself, on
//! its own io_uring, at the offsets the mapping calls return, on [`Storage::file`].
//!
//! [`FileStorage`] takes QEMU's byte-range locks (open file description locks on bytes 100..
//! and 200.. of the file, as QEMU's `file-posix` driver does), so QEMU tools and this library
//! see each other: `qemu-img` refuses to write an image we serve, and we refuse to open one a
//! QEMU process writes. `qemu-img` with `-U` (force share) can still read it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use storefile::Store;

/// Synchronous positional access to the bytes of an image file.
///
/// Writes transfer the whole buffer or fail. Nothing written is durable before
/// [`Storage::flush`] returns; after a crash any subset of the writes since the last flush may
/// have reached the medium.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Fills `buf` from `offset`; bytes past the end of the storage read as zeroes.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `buf` at `offset`, growing a file if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every write that returned durable (`fdatasync`).
    fn flush(&self) -> io::Result<()>;
    /// Current size in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Makes the storage at least `size` bytes long; the new bytes read as zeroes. A
    /// fixed-size storage fails with `ENOSPC` when it is too small.
    fn grow(&self, size: u64) -> io::Result<()>;
    /// Tells the storage that `len` bytes at `offset` hold nothing useful (a file punches a
    /// hole). Purely a hint: what the range reads afterwards is not relied on.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// Whether bytes past the end of the storage, once it grows over them, read as zeroes
    /// without being written (true for regular files and memory, false for block devices).
    fn grows_with_zeroes(&self) -> bool;
    /// The open file, for data IO by a block driver (`None` for memory).
    fn file(&self) -> Option<&File> {
        None
    }
    /// Takes a reader's locks instead of a writer's (`read_only`), or a writer's again;
    /// storages without locks do nothing. Fails with `WouldBlock` if another open file
    /// description holds a lock that a writer's conflicts with (the reader's locks stay).
    fn relock(&self, read_only: bool) -> io::Result<()> {
        let _ = read_only;
        Ok(())
    }
    /// A name for messages (the path).
    fn name(&self) -> String;
}

/// Zeroes for writes of zeroes.
static ZEROES: [u8; 65536] = [0; 65536];

/// Writes `len` zero bytes at `offset`.
pub(crate) fn write_zeroes(s: &dyn Storage, mut offset: u64, mut len: u64) -> io::Result<()> {
    while len > 0 {
        let n = len.min(ZEROES.len() as u64) as usize;
        s.write_at(&ZEROES[..n], offset)?;
        offset += n as u64;
        len -= n as u64;
    }
    Ok(())
}

/// An image in a regular file or on a block device.
#[derive(Debug)]
pub struct FileStorage {
    store: Store,
}

/// Why a file could not be opened.
#[derive(Debug)]
pub enum OpenFileError {
    /// Another process holds a conflicting QEMU-style lock.
    Locked,
    /// Any other failure.
    Io(io::Error),
}

/// QEMU's permission bits (`BLK_PERM_*` bit numbers) that its locks describe.
const PERM_CONSISTENT_READ: u32 = 0;
const PERM_WRITE: u32 = 1;
const PERM_WRITE_UNCHANGED: u32 = 2;
const PERM_RESIZE: u32 = 3;
/// First byte of "holds permission i" locks, and of "does not share permission i" locks.
const LOCK_PERM_BASE: i64 = 100;
const LOCK_SHARED_BASE: i64 = 200;

impl FileStorage {
    /// Opens an existing file or block device, read-write or read-only, and takes QEMU's
    /// locks for that use (see the module doc).
    pub fn open(path: &Path, read_only: bool) -> Result<FileStorage, OpenFileError> {
        let store = Store::open(path, read_only).map_err(OpenFileError::Io)?;
        Self::from_store(store, read_only, true)
    }

    /// Opens without taking or checking locks (for tools that know better, and tests).
    pub fn open_unlocked(path: &Path, read_only: bool) -> Result<FileStorage, OpenFileError> {
        let store = Store::open(path, read_only).map_err(OpenFileError::Io)?;
        Self::from_store(store, read_only, false)
    }

    /// Creates a new file (failing if it exists), locked for writing.
    pub fn create(path: &Path) -> Result<FileStorage, OpenFileError> {
        let store = Store::create(path).map_err(OpenFileError::Io)?;
        Self::from_store(store, false, true)
    }

    fn from_store(store: Store, read_only: bool, lock: bool) -> Result<FileStorage, OpenFileError> {
        if lock {
            qemu_lock(store.file(), read_only)?;
        }
        Ok(FileStorage { store })
    }

    /// The path it was opened with.
    pub fn path(&self) -> &Path {
        self.store.path()
    }
}

/// Takes QEMU's locks: a writer holds read, write, write-unchanged and resize and shares
/// neither write nor resize; a reader holds consistent-read and shares neither write nor
/// resize (a backing file must not change under its children). Then checks that no other
/// open file description holds a lock that conflicts, as QEMU does after applying its own.
fn qemu_lock(file: &File, read_only: bool) -> Result<(), OpenFileError> {
    let held: &[u32] = if read_only {
        &[PERM_CONSISTENT_READ]
    } else {
        &[
            PERM_CONSISTENT_READ,
            PERM_WRITE,
            PERM_WRITE_UNCHANGED,
            PERM_RESIZE,
        ]
    };
    let unshared = [PERM_WRITE, PERM_RESIZE];
    for &p in held {
        ofd_lock(file, LOCK_PERM_BASE + p as i64).map_err(OpenFileError::Io)?;
    }
    for &p in &unshared {
        ofd_lock(file, LOCK_SHARED_BASE + p as i64).map_err(OpenFileError::Io)?;
    }
    // Someone who does not share a permission we hold, or who holds one we do not share.
    for &p in held {
        if ofd_conflict(file, LOCK_SHARED_BASE + p as i64).map_err(OpenFileError::Io)? {
            return Err(OpenFileError::Locked);
        }
    }
    for &p in &unshared {
        if ofd_conflict(file, LOCK_PERM_BASE + p as i64).map_err(OpenFileError::Io)? {
            return Err(OpenFileError::Locked);
        }
    }
    Ok(())
}

fn flock_at(byte: i64, ty: libc::c_int) -> libc::flock {
    // SAFETY: `flock` is a plain C struct of integers, for which all zeroes is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    fl
}

/// A shared open-file-description lock on one byte.
fn ofd_lock(file: &File, byte: i64) -> io::Result<()> {
    let fl = flock_at(byte, libc::F_RDLCK);
    // SAFETY: F_OFD_SETLK reads the `flock` the pointer points at, a live local.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } != 0 {
        let e = io::Error::last_os_error();
        // Another description holds an exclusive lock there: a conflict, not an IO error.
        if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) {
            return Err(io::Error::new(io::ErrorKind::WouldBlock, "locked"));
        }
        return Err(e);
    }
    Ok(())
}

/// Drops this open file description's lock on one byte.
fn ofd_unlock(file: &File, byte: i64) -> io::Result<()> {
    let fl = flock_at(byte, libc::F_UNLCK);
    // SAFETY: F_OFD_SETLK reads the `flock` the pointer points at, a live local.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether another open file description holds a lock on `byte`.
fn ofd_conflict(file: &File, byte: i64) -> io::Result<bool> {
    let mut fl = flock_at(byte, libc::F_WRLCK);
    // SAFETY: F_OFD_GETLK reads and rewrites the `flock` the pointer points at, a live local.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self
                .store
                .file()
                .read_at(&mut buf[done..], offset + done as u64)
            {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
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
    fn grow(&self, size: u64) -> io::Result<()> {
        if self.size()? >= size {
            return Ok(());
        }
        if self.store.is_block_device() {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.store.file().set_len(size)
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.store.give_back(offset, len)
    }
    fn grows_with_zeroes(&self) -> bool {
        !self.store.is_block_device()
    }
    fn file(&self) -> Option<&File> {
        Some(self.store.file())
    }
    fn relock(&self, read_only: bool) -> io::Result<()> {
        let writer = [PERM_WRITE, PERM_WRITE_UNCHANGED, PERM_RESIZE];
        if read_only {
            for p in writer {
                ofd_unlock(self.store.file(), LOCK_PERM_BASE + p as i64)?;
            }
            return Ok(());
        }
        match qemu_lock(self.store.file(), false) {
            Ok(()) => Ok(()),
            Err(e) => {
                for p in writer {
                    ofd_unlock(self.store.file(), LOCK_PERM_BASE + p as i64)?;
                }
                Err(match e {
                    OpenFileError::Locked => io::Error::new(
                        io::ErrorKind::WouldBlock,
                        "another process holds a conflicting lock",
                    ),
                    OpenFileError::Io(e) => e,
                })
            }
        }
    }
    fn name(&self) -> String {
        self.store.path().display().to_string()
    }
}

/// An image in memory, for tests and fuzzing. Clones share the bytes. Like a sparse file,
/// growing it allocates nothing: bytes past the last one written read as zeroes.
#[derive(Clone, Debug, Default)]
pub struct MemStorage {
    bytes: Arc<Mutex<Mem>>,
    limit: Option<u64>,
}

/// The bytes written (up to the last one) and the size, which may be larger.
#[derive(Debug, Default)]
struct Mem {
    data: Vec<u8>,
    size: usize,
}

impl MemStorage {
    /// An empty storage.
    pub fn new() -> MemStorage {
        MemStorage::default()
    }

    /// A storage holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> MemStorage {
        MemStorage {
            bytes: Arc::new(Mutex::new(Mem {
                size: bytes.len(),
                data: bytes,
            })),
            limit: None,
        }
    }

    /// The same, refusing to grow past `limit` bytes (`ENOSPC`).
    pub fn with_limit(bytes: Vec<u8>, limit: u64) -> MemStorage {
        MemStorage {
            limit: Some(limit),
            ..MemStorage::from_bytes(bytes)
        }
    }

    /// A copy of the bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let m = self.lock();
        let mut b = m.data.clone();
        b.resize(m.size, 0);
        b
    }

    fn lock(&self) -> MutexGuard<'_, Mem> {
        self.bytes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_limit(&self, end: u64) -> io::Result<usize> {
        if self.limit.is_some_and(|l| end > l) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        usize::try_from(end).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let m = self.lock();
        buf.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return Ok(());
        };
        if start < m.data.len() {
            let n = (m.data.len() - start).min(buf.len());
            buf[..n].copy_from_slice(&m.data[start..start + n]);
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        let end = self.check_limit(end)?;
        let mut m = self.lock();
        if end > m.data.len() {
            m.data.resize(end, 0);
        }
        m.data[end - buf.len()..end].copy_from_slice(buf);
        m.size = m.size.max(end);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.lock().size as u64)
    }
    fn grow(&self, size: u64) -> io::Result<()> {
        let size = self.check_limit(size)?;
        let mut m = self.lock();
        m.size = m.size.max(size);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut m = self.lock();
        let size = m.data.len() as u64;
        let start = offset.min(size);
        let end = offset.saturating_add(len).min(size);
        m.data[start as usize..end as usize].fill(0);
        Ok(())
    }
    fn grows_with_zeroes(&self) -> bool {
        true
    }
    fn name(&self) -> String {
        "memory".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_storage_reads_zeroes_past_the_end_and_honours_its_limit() {
        let m = MemStorage::with_limit(Vec::new(), 64);
        m.write_at(b"hello", 10).unwrap();
        assert_eq!(m.size().unwrap(), 15);
        let mut b = [9u8; 8];
        m.read_at(&mut b, 12).unwrap();
        assert_eq!(&b, b"llo\0\0\0\0\0");
        assert!(m.write_at(&[1], 64).is_err());
        assert!(m.grow(65).is_err());
        m.grow(64).unwrap();
        assert_eq!(m.size().unwrap(), 64);
        // Sparse: growing allocated nothing, and the bytes past the data read as zeroes.
        assert_eq!(m.lock().data.len(), 15);
        m.read_at(&mut b, 56).unwrap();
        assert_eq!(b, [0u8; 8]);
        let all = m.to_bytes();
        assert_eq!((all.len(), &all[10..15]), (64, &b"hello"[..]));
    }

    #[test]
    fn file_storage_takes_qemu_locks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let w = FileStorage::create(&p).unwrap();
        w.write_at(&[7u8; 100], 1000).unwrap();
        let mut b = [1u8; 200];
        w.read_at(&mut b, 1000).unwrap();
        assert_eq!(&b[..100], &[7u8; 100]);
        assert_eq!(&b[100..], &[0u8; 100]);
        assert!(matches!(
            FileStorage::open(&p, true),
            Err(OpenFileError::Locked)
        ));
        assert!(matches!(
            FileStorage::open(&p, false),
            Err(OpenFileError::Locked)
        ));
        // A writer that takes a reader's locks lets readers in, and cannot become a writer
        // again while they are there.
        w.relock(true).unwrap();
        let r = FileStorage::open(&p, true).unwrap();
        assert!(matches!(
            FileStorage::open(&p, false),
            Err(OpenFileError::Locked)
        ));
        assert_eq!(
            w.relock(false).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        drop(r);
        w.relock(false).unwrap();
        assert!(matches!(
            FileStorage::open(&p, true),
            Err(OpenFileError::Locked)
        ));
        drop(w);
        let r1 = FileStorage::open(&p, true).unwrap();
        let _r2 = FileStorage::open(&p, true).unwrap();
        assert!(matches!(
            FileStorage::open(&p, false),
            Err(OpenFileError::Locked)
        ));
        drop(r1);
    }
}
