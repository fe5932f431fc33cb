//! `/dev/xen/gntalloc`: granting pages of this process to another domain.
//!
//! The frontend's half of grant tables. tapdisk does not need it; the rig uses it to play a
//! (hostile) frontend from dom0, whose pages tapdisk then maps like any guest's.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::ptr::NonNull;

use super::{ioc_none, DomId};
use crate::protocol::{GrantRef, PAGE_SIZE};

const IOCTL_GNTALLOC_ALLOC_GREF: libc::c_ulong = ioc_none(b'G', 5, 24);
const IOCTL_GNTALLOC_DEALLOC_GREF: libc::c_ulong = ioc_none(b'G', 6, 16);
const MAX_PAGES: usize = 256;

#[repr(C)]
struct AllocArg {
    domid: u16,
    flags: u16,
    count: u32,
    index: u64,
    gref_ids: [u32; MAX_PAGES],
}

#[repr(C)]
struct DeallocArg {
    index: u64,
    count: u32,
    pad: u32,
}

/// Pages granted (writable) to one domain, mapped here; revoked and unmapped on drop.
#[derive(Debug)]
pub struct GrantedPages {
    file: File,
    addr: NonNull<u8>,
    index: u64,
    refs: Vec<GrantRef>,
}

impl GrantedPages {
    /// Allocates `count` zeroed pages granted writable to `domid`.
    pub fn alloc(domid: DomId, count: usize) -> io::Result<GrantedPages> {
        if count == 0 || count > MAX_PAGES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{count} pages (1..={MAX_PAGES})"),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/xen/gntalloc")
            .map_err(|e| io::Error::new(e.kind(), format!("/dev/xen/gntalloc: {e}")))?;
        let mut arg = AllocArg {
            domid,
            flags: 1, // GNTALLOC_FLAG_WRITABLE
            count: count as u32,
            index: 0,
            gref_ids: [0; MAX_PAGES],
        };
        // SAFETY: the kernel reads the header and writes `index` and `count` grant ids, all
        // inside the live `arg` (room for MAX_PAGES >= count ids).
        if unsafe { libc::ioctl(file.as_raw_fd(), IOCTL_GNTALLOC_ALLOC_GREF, &mut arg) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let len = count * PAGE_SIZE;
        // SAFETY: a fresh shared mapping of the range the ioctl reserved; it aliases nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                arg.index as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(GrantedPages {
            addr: NonNull::new(p.cast()).ok_or_else(io::Error::last_os_error)?,
            index: arg.index,
            refs: arg.gref_ids[..count].to_vec(),
            file,
        })
    }

    /// The grant references, one per page.
    pub fn refs(&self) -> &[GrantRef] {
        &self.refs
    }

    /// First byte of the first page.
    pub fn addr(&self) -> NonNull<u8> {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.refs.len() * PAGE_SIZE
    }

    /// Never true.
    pub fn is_empty(&self) -> bool {
        self.refs.is_empty()
    }
}

impl Drop for GrantedPages {
    fn drop(&mut self) {
        // SAFETY: addr/len are what mmap returned; this is the only unmap.
        unsafe { libc::munmap(self.addr.as_ptr().cast(), self.len()) };
        let mut arg = DeallocArg {
            index: self.index,
            count: self.refs.len() as u32,
            pad: 0,
        };
        // SAFETY: reads a live `DeallocArg` of the size the number encodes.
        unsafe { libc::ioctl(self.file.as_raw_fd(), IOCTL_GNTALLOC_DEALLOC_GREF, &mut arg) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn layouts_match_linux() {
        assert_eq!(offset_of!(AllocArg, count), 4);
        assert_eq!(offset_of!(AllocArg, index), 8);
        assert_eq!(offset_of!(AllocArg, gref_ids), 16);
        assert_eq!(size_of::<DeallocArg>(), 16);
    }
}
