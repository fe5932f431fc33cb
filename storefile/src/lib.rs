//! The file or block device under an image.
//!
//! The image formats (Parallax, VHD, qcow2) and tapdisk's raw driver each keep their image in
//! a regular file or on a block device and need the same few calls std does not wrap: which
//! of the two it is, a block device's size (`BLKGETSIZE64`), an advisory lock (`flock`), and
//! `fallocate` to reserve space, punch holes or zero ranges. [`Store`] holds the open file and
//! what it is; the calls with `unsafe` live here once, each with the reason it is sound.
//!
//! What a caller does when the file system cannot (no hole punching, say) differs between the
//! formats, so [`Store::fallocate`] reports [`Fallocated::Unsupported`] instead of choosing.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// An open regular file or block device.
#[derive(Debug)]
pub struct Store {
    file: File,
    path: PathBuf,
    block_device: bool,
}

/// What [`Store::fallocate`] does to a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallocate {
    /// Reserve the space (unwritten extents: the range reads as zeroes); the file grows if the
    /// range ends past its end.
    Allocate,
    /// Give the space back, the size unchanged; the range then reads as zeroes.
    PunchHole,
    /// Make the range read as zeroes, the size unchanged (on a block device too, where a
    /// discard need not leave zeroes behind).
    ZeroRange,
}

/// How a [`Store::fallocate`] went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallocated {
    /// Done.
    Done,
    /// The file system or device does not do this (`EOPNOTSUPP`, `ENOSYS`); nothing changed.
    Unsupported,
}

/// `_IOR(0x12, 114, size_t)`: a block device's size in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Size in bytes of the block device `file`.
pub fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 stores one u64 through the pointer, which points at a live local of
    // that type for the duration of the call; the descriptor is open (borrowed from `file`).
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// `v` as a file offset or length, refused if it does not fit.
fn off(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))
}

impl Store {
    /// Opens an existing file or block device (close-on-exec).
    pub fn open(path: &Path, read_only: bool) -> io::Result<Store> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        Store::from_file(file, path)
    }

    /// Creates a new regular file, failing if `path` exists.
    pub fn create(path: &Path) -> io::Result<Store> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        Store::from_file(file, path)
    }

    /// Takes `file`, opened at `path`; refused unless it is a regular file or a block device.
    pub fn from_file(file: File, path: &Path) -> io::Result<Store> {
        let meta = file.metadata()?;
        let block_device = meta.file_type().is_block_device();
        if !block_device && !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "neither a regular file nor a block device",
            ));
        }
        Ok(Store {
            file,
            path: path.to_path_buf(),
            block_device,
        })
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The path it was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether it is a block device (a fixed size, no holes).
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// Size in bytes.
    pub fn size(&self) -> io::Result<u64> {
        if self.block_device {
            block_device_size(&self.file)
        } else {
            Ok(self.file.metadata()?.len())
        }
    }

    /// Takes an advisory `flock` without waiting: exclusive or shared. False if another open
    /// file description holds a conflicting one.
    pub fn try_lock(&self, exclusive: bool) -> io::Result<bool> {
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        } | libc::LOCK_NB;
        // SAFETY: flock on a descriptor this value owns; no memory is passed.
        if unsafe { libc::flock(self.file.as_raw_fd(), op) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(false);
        }
        Err(e)
    }

    /// Does `what` to `len` bytes at `offset` (nothing for an empty range).
    pub fn fallocate(&self, what: Fallocate, offset: u64, len: u64) -> io::Result<Fallocated> {
        if len == 0 {
            return Ok(Fallocated::Done);
        }
        let mode = match what {
            Fallocate::Allocate => 0,
            Fallocate::PunchHole => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            Fallocate::ZeroRange => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        };
        let (o, l) = (off(offset)?, off(len)?);
        // SAFETY: fallocate on a descriptor this value owns, with integer arguments only.
        if unsafe { libc::fallocate(self.file.as_raw_fd(), mode, o, l) } == 0 {
            return Ok(Fallocated::Done);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(Fallocated::Unsupported),
            _ => Err(e),
        }
    }
}

impl Store {
    /// Tells the store that `len` bytes at `offset` hold nothing useful any more: a file
    /// punches a hole where its file system can. Purely a hint, so nothing happens on a block
    /// device (a discard there need not leave zeroes), on a file system without hole punching,
    /// or for a range no file can reach; only other failures are errors.
    pub fn give_back(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.block_device {
            return Ok(());
        }
        match self.fallocate(Fallocate::PunchHole, offset, len) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EFBIG) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_file_is_sized_locked_punched_and_zeroed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let s = Store::create(&p).unwrap();
        assert!(!s.is_block_device());
        assert_eq!(s.path(), p);
        assert_eq!(
            s.fallocate(Fallocate::Allocate, 0, 1 << 20).unwrap(),
            Fallocated::Done
        );
        assert_eq!(s.size().unwrap(), 1 << 20);
        s.file().write_all_at(&[7u8; 8192], 4096).unwrap();
        for what in [Fallocate::PunchHole, Fallocate::ZeroRange] {
            s.file().write_all_at(&[7u8; 4096], 4096).unwrap();
            if s.fallocate(what, 4096, 4096).unwrap() == Fallocated::Done {
                let mut b = [1u8; 4096];
                s.file().read_exact_at(&mut b, 4096).unwrap();
                assert!(b.iter().all(|&x| x == 0), "{what:?} left data");
            }
        }
        let mut b = [0u8; 4096];
        s.file().read_exact_at(&mut b, 8192).unwrap();
        assert!(b.iter().all(|&x| x == 7), "a neighbour was touched");
        assert_eq!(s.size().unwrap(), 1 << 20, "the size changed");

        assert!(s.try_lock(true).unwrap());
        let other = Store::open(&p, true).unwrap();
        assert!(
            !other.try_lock(false).unwrap(),
            "a shared lock beside an exclusive one"
        );
        drop(s);
        assert!(other.try_lock(false).unwrap());
    }

    #[test]
    fn only_files_and_block_devices_are_stores() {
        let dir = tempfile::tempdir().unwrap();
        let e = Store::open(dir.path(), true).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(Store::create(&dir.path().join("x")).is_ok());
        assert!(
            Store::create(&dir.path().join("x")).is_err(),
            "created twice"
        );
    }

    #[test]
    fn huge_ranges_are_refused_not_wrapped() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::create(&dir.path().join("x")).unwrap();
        let e = s.fallocate(Fallocate::PunchHole, u64::MAX, 1).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EFBIG));
        // A hint about such a range is no error.
        s.give_back(u64::MAX, 1).unwrap();
    }
}
