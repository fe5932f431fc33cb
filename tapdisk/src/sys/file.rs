//! File and block-device calls the drivers need that std does not wrap: a block device's
//! size, the alignment O_DIRECT wants, discards (hole punch, BLKDISCARD).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

/// Size in bytes of the block device `f`.
pub fn block_device_size(f: &File) -> io::Result<u64> {
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
    let mut size = 0u64;
    // SAFETY: `f` is an open block device and `size` is a valid, writable u64 that outlives the call.
    unsafe { blkgetsize64(f.as_raw_fd(), &mut size) }.map_err(io::Error::from)?;
    Ok(size)
}

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
