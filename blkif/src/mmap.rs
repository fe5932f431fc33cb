//! Shared mappings of file descriptors (memfds, grant devices), unmapped on drop.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

/// A `MAP_SHARED` mapping of `len` bytes of a descriptor.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; all access to it goes through raw
// pointers whose users take care of concurrency (volatile/atomic access to shared pages).
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only hands out raw pointers.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` from offset 0, readable and writable, shared.
    pub fn map_shared(fd: BorrowedFd<'_>, len: usize) -> io::Result<Mapping> {
        Self::map(fd, len, 0)
    }

    /// As [`Mapping::map_shared`], with every page faulted in now (`MAP_POPULATE`).
    pub fn map_shared_populated(fd: BorrowedFd<'_>, len: usize) -> io::Result<Mapping> {
        Self::map(fd, len, libc::MAP_POPULATE)
    }

    fn map(fd: BorrowedFd<'_>, len: usize, extra: libc::c_int) -> io::Result<Mapping> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        // SAFETY: a fresh mapping at an address of the kernel's choosing cannot alias any Rust
        // object; the fd is valid for the call; failure is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | extra,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(io::Error::last_os_error)?;
        Ok(Mapping { ptr, len })
    }

    /// First byte.
    pub fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Gives the pages of `off..off + len` back to the file's owner (`MADV_REMOVE`: a shmem
    /// file frees them; reading them again gives zeroes). `off` and `len` are rounded out to
    /// whole pages inside the mapping.
    pub fn remove(&self, off: usize, len: usize) -> io::Result<()> {
        let page = crate::protocol::PAGE_SIZE;
        let start = off / page * page;
        let end = off
            .saturating_add(len)
            .div_ceil(page)
            .saturating_mul(page)
            .min(self.len);
        if start >= end {
            return Ok(());
        }
        // SAFETY: `start..end` lies inside this mapping (clamped above), which we own; the
        // kernel only drops page contents, no Rust object lives in shared memory.
        let rc = unsafe {
            libc::madvise(
                self.ptr.as_ptr().add(start).cast(),
                end - start,
                libc::MADV_REMOVE,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Never true (mappings are not empty); for clippy's sake.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned, and this is the only unmap.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
