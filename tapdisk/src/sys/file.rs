//! File and block-device calls the drivers need that std does not wrap: a block device's
//! size, the alignment O_DIRECT wants, discards (hole punch, BLKDISCARD), and vectored IO that
//! must not block.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

/// Size in bytes of the block device `f` (`BLKGETSIZE64`; the image crates share it).
pub use storefile::block_device_size;

/// The offset/memory alignment O_DIRECT needs on this file (statx STATX_DIOALIGN), 512 if unknown.
pub fn dio_alignment(f: &File) -> u32 {
    // SAFETY: an all-zero `statx` is a valid value of this plain C struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open, the path is an empty C string used with AT_EMPTY_PATH, and `stx`
    // is a valid, writable statx buffer that outlives the call.
    let rc = unsafe {
        libc::statx(
            f.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align != 0 {
        stx.stx_dio_offset_align.max(stx.stx_dio_mem_align).max(512)
    } else {
        512
    }
}

/// Punches a hole (file) or discards (block device: BLKDISCARD, or BLKSECDISCARD if `secure`)
/// `len` bytes at `offset`.
pub fn discard_fd(
    fd: RawFd,
    block_device: bool,
    offset: u64,
    len: u64,
    secure: bool,
) -> io::Result<()> {
    if block_device {
        nix::ioctl_write_ptr_bad!(blkdiscard, 0x1277, [u64; 2]);
        nix::ioctl_write_ptr_bad!(blksecdiscard, 0x127d, [u64; 2]);
        let range = [offset, len];
        if secure {
            // SAFETY: `fd` is an open block device; `range` is a valid [u64; 2] for the call.
            unsafe { blksecdiscard(fd, &range) }.map_err(io::Error::from)?;
        } else {
            // SAFETY: as above.
            unsafe { blkdiscard(fd, &range) }.map_err(io::Error::from)?;
        }
        Ok(())
    } else {
        let (off, l) = (to_off(offset)?, to_off(len)?);
        // SAFETY: plain syscall on an open fd with integer arguments.
        let rc = unsafe {
            libc::fallocate(
                fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// `v` as a file offset, refused if it does not fit.
fn to_off(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))
}

/// Which way [`rw_nowait`] moves data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// File to memory.
    Read,
    /// Memory to file.
    Write,
}

/// Whether the file lives in memory (tmpfs, ramfs): its IO never waits for a device, and it
/// does not take `RWF_NOWAIT` (Linux refuses it there), so io_uring hands every buffered
/// transfer on it to a worker thread.
pub fn memory_backed(f: &File) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    // SAFETY: an all-zero `statfs` is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open and `st` is a valid, writable statfs that outlives the call.
    let rc = unsafe { libc::fstatfs(f.as_raw_fd(), &mut st) };
    rc == 0 && matches!(st.f_type as i64, TMPFS_MAGIC | RAMFS_MAGIC)
}

/// `preadv2`/`pwritev2` that does not wait for a device: with `RWF_NOWAIT` (page-cache hits
/// only), or plainly on a `memory` file ([`memory_backed`]), which has no device to wait for.
/// `Ok(None)`: it would have to wait (nothing moved).
///
/// # Safety
/// Every iovec must point at `iov_len` bytes of memory valid for the transfer (readable for a
/// write, writable for a read) and not accessed by anything else meanwhile.
pub unsafe fn rw_nowait(
    fd: RawFd,
    iov: &[libc::iovec],
    offset: u64,
    dir: Dir,
    memory: bool,
) -> io::Result<Option<usize>> {
    let off = to_off(offset)?;
    let flags = if memory { 0 } else { libc::RWF_NOWAIT };
    let cnt = libc::c_int::try_from(iov.len()).unwrap_or(libc::c_int::MAX);
    // SAFETY: the iovecs are valid for the transfer (the caller's contract); `fd` is an open
    // descriptor; the kernel writes only inside the iovecs.
    let n = unsafe {
        match (dir, iov) {
            // One buffer and no flags: the plain call, which skips copying in an iovec array.
            (Dir::Read, [v]) if flags == 0 => libc::pread(fd, v.iov_base, v.iov_len, off),
            (Dir::Write, [v]) if flags == 0 => libc::pwrite(fd, v.iov_base, v.iov_len, off),
            (Dir::Read, _) => libc::preadv2(fd, iov.as_ptr(), cnt, off, flags),
            (Dir::Write, _) => libc::pwritev2(fd, iov.as_ptr(), cnt, off, flags),
        }
    };
    if n >= 0 {
        return Ok(Some(n as usize));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EOPNOTSUPP) => Ok(None),
        _ => Err(e),
    }
}

/// Raises this process's soft limit on open files to its hard limit (as far as 1 Mi) and
/// returns the limit it has then. Every ring needs a few descriptors and io_uring refuses a
/// fixed-file table larger than the soft limit, so a tapdisk started with the common soft
/// limit of 1024 under a higher hard limit should not stop at it.
pub fn raise_open_files_limit() -> io::Result<u64> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `l` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let want = l.rlim_max.min(1 << 20);
    if want > l.rlim_cur {
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: l.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit that outlives the call; only the soft limit
        // changes, within the hard one.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        return Ok(want);
    }
    Ok(l.rlim_cur)
}

/// Takes an advisory `flock` on `f` without waiting: exclusive or shared. `Ok(false)` if
/// another open file holds a conflicting one. Closing `f` releases it.
pub fn try_flock(f: &File, exclusive: bool) -> io::Result<bool> {
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    } | libc::LOCK_NB;
    // SAFETY: flock on a descriptor `f` keeps open for the duration of the call; no memory is
    // passed.
    if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// For tests: an iovec over all of `buf`.
#[cfg(test)]
pub(crate) fn iov(buf: &mut [u8]) -> libc::iovec {
    libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// One buffer (the plain calls) and several (the vectored ones) move the same bytes.
    #[test]
    fn one_and_several_buffers_move_the_same_bytes() {
        let dir = tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("img"))
            .unwrap();
        let mem = memory_backed(&f);
        let fd = f.as_raw_fd();
        let mut data: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
        // On a file in memory every transfer moves bytes; elsewhere `RWF_NOWAIT` may decline
        // one (`None`), and then there is nothing to compare.
        let moved = |n: io::Result<Option<usize>>| match n {
            Ok(None) if !mem => None,
            n => Some(n.unwrap().expect("a file in memory never declines")),
        };
        // SAFETY: the iovec points at `data`, alive and untouched during the call.
        let n = unsafe { rw_nowait(fd, &[iov(&mut data)], 512, Dir::Write, mem) };
        let Some(n) = moved(n) else {
            eprintln!("no nowait writes on this file system: nothing to check");
            return;
        };
        assert_eq!(n, 8192);
        let (mut a, mut b) = (vec![0u8; 1000], vec![0u8; 7192]);
        // SAFETY: both iovecs point at live buffers untouched during the call.
        let n = unsafe { rw_nowait(fd, &[iov(&mut a), iov(&mut b)], 512, Dir::Read, mem) };
        if let Some(n) = moved(n) {
            assert_eq!(n, 8192);
            assert_eq!([a, b].concat(), data);
        }
        let mut one = vec![0u8; 4096];
        // SAFETY: as above.
        let n = unsafe { rw_nowait(fd, &[iov(&mut one)], 4096, Dir::Read, mem) };
        if let Some(n) = moved(n) {
            assert_eq!(n, 4096);
            assert_eq!(one[..], data[3584..7680]);
        }
        // Past the end: nothing moved, no error.
        // SAFETY: as above.
        let n = unsafe { rw_nowait(fd, &[iov(&mut one)], 1 << 20, Dir::Read, mem) };
        assert!(matches!(n, Ok(Some(0)) | Ok(None)), "{n:?}");
    }
}
