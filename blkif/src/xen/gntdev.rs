//! `/dev/xen/gntdev`: mapping another domain's grants into this process, and grant copy.
//!
//! Mapping is two steps: `IOCTL_GNTDEV_MAP_GRANT_REF` reserves a range of the device's offset
//! space for a batch of grant references, then `mmap` of that range maps the pages (read-only
//! when the mapping is not `PROT_WRITE`: a frontend grants the pages of a write request
//! read-only, and Xen refuses a writable mapping of them). Undoing it is `munmap` followed by
//! `IOCTL_GNTDEV_UNMAP_GRANT_REF`; [`GrantMap`] does both on drop. A bad grant (wrong domain,
//! revoked, never granted) makes the `mmap` fail, so nothing is ever half mapped.
//!
//! Grant copy (`IOCTL_GNTDEV_GRANT_COPY`) moves bytes between grants and local buffers in the
//! hypervisor, without mapping: one ioctl for a whole batch of segments.
//!
//! Part of a mapping can be given back early ([`MappedGrants::release`]): an inaccessible
//! anonymous placeholder is mapped over those pages (`MAP_FIXED`), which unmaps their grants
//! (gntdev's MMU notifier follows the split mapping, Linux >= 6.1 and the stable kernels since
//! late 2022) while their addresses stay reserved, so the whole range can still be unmapped in
//! one call at the end without touching anything mapped there since.
//!
//! [`GrantDevice`] is what the grant bookkeeping ([`super::backend`], [`super::persistent`])
//! needs from the device; [`Gntdev`] is the real one, and tests use a stand-in
//! (`blkif::xen::testing`, feature `test-utils`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::ptr::NonNull;

use super::{ioc_none, DomId};
use crate::protocol::{GrantRef, PAGE_SIZE};

/// Most grants one map call takes: a 16-page ring, or an indirect request's worth of segments.
pub const MAX_BATCH: usize = 1024;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct GrantRefArg {
    domid: u32,
    r#ref: u32,
}

/// `struct ioctl_gntdev_map_grant_ref` with room for [`MAX_BATCH`] references.
#[repr(C)]
struct MapArg {
    count: u32,
    pad: u32,
    index: u64,
    refs: [GrantRefArg; MAX_BATCH],
}

#[repr(C)]
struct UnmapArg {
    index: u64,
    count: u32,
    pad: u32,
}

/// One segment of a grant copy (`struct gntdev_grant_copy_segment`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CopySegment {
    pub(super) source: [u64; 1],
    pub(super) dest: [u64; 1],
    pub(super) len: u16,
    pub(super) flags: u16,
    pub(super) status: i16,
}

pub(super) const GNTCOPY_SOURCE_GREF: u16 = 1;
pub(super) const GNTCOPY_DEST_GREF: u16 = 2;

fn foreign(gref: GrantRef, offset: u16, domid: DomId) -> [u64; 1] {
    // struct { grant_ref_t ref; u16 offset; domid_t domid; } in little-endian order.
    [u64::from(gref) | (u64::from(offset) << 32) | (u64::from(domid) << 48)]
}

impl CopySegment {
    /// Copy `len` bytes from `offset` in grant `gref` of `domid` to `dst`.
    pub fn from_grant(gref: GrantRef, offset: u16, domid: DomId, dst: *mut u8, len: u16) -> Self {
        CopySegment {
            source: foreign(gref, offset, domid),
            dest: [dst as u64],
            len,
            flags: GNTCOPY_SOURCE_GREF,
            status: 0,
        }
    }

    /// Copy `len` bytes from `src` to `offset` in grant `gref` of `domid`.
    pub fn to_grant(src: *const u8, gref: GrantRef, offset: u16, domid: DomId, len: u16) -> Self {
        CopySegment {
            source: [src as u64],
            dest: foreign(gref, offset, domid),
            len,
            flags: GNTCOPY_DEST_GREF,
            status: 0,
        }
    }

    /// `GNTST_*` after the copy (0 is success).
    pub fn status(&self) -> i16 {
        self.status
    }
}

#[repr(C)]
struct CopyArg {
    count: libc::c_uint,
    segments: *mut CopySegment,
}

/// The pages of one map call, as their holder sees them: unmapped when dropped.
pub trait MappedGrants: Send {
    /// Address of page `i` (`i < pages()`).
    fn page(&self, i: usize) -> *mut u8;
    /// Pages mapped by the call.
    fn pages(&self) -> usize;
    /// Unmaps pages `first..first + n` now; the others stay mapped until the drop.
    fn release(&mut self, first: usize, n: usize) -> io::Result<()>;
}

/// Where grants are mapped and copied: `/dev/xen/gntdev` ([`Gntdev`]), or a stand-in in tests.
pub trait GrantDevice: Send {
    /// One map call's pages.
    type Map: MappedGrants;
    /// Maps `refs` of `domid` (1..=[`MAX_BATCH`]), writable or read-only. All or nothing.
    fn map(&self, domid: DomId, refs: &[GrantRef], writable: bool) -> io::Result<Self::Map>;
    /// Runs a batch of grant copies; each segment's status says whether it succeeded.
    ///
    /// # Safety
    /// Every local address in `segs` must be valid for its `len` bytes (readable for copies
    /// to a grant, writable for copies from one) for the duration of the call.
    unsafe fn copy(&self, segs: &mut [CopySegment]) -> io::Result<()>;
}

const IOCTL_GNTDEV_MAP_GRANT_REF: libc::c_ulong = ioc_none(b'G', 0, 24);
const IOCTL_GNTDEV_UNMAP_GRANT_REF: libc::c_ulong = ioc_none(b'G', 1, 16);
const IOCTL_GNTDEV_GRANT_COPY: libc::c_ulong = ioc_none(b'G', 8, 16);

/// An open `/dev/xen/gntdev`. Each ring loop has its own, so nothing is shared between threads.
#[derive(Debug)]
pub struct Gntdev {
    file: File,
}

/// Grants of one batch, mapped contiguously; unmapped on drop.
#[derive(Debug)]
pub struct GrantMap {
    fd: libc::c_int,
    addr: NonNull<u8>,
    index: u64,
    count: u32,
}

// SAFETY: the mapping is owned by this value alone; the descriptor number stays valid because
// the owning `Gntdev` outlives every `GrantMap` by contract of `Gntdev::map`.
unsafe impl Send for GrantMap {}

impl GrantMap {
    /// First byte of the first page.
    pub fn addr(&self) -> NonNull<u8> {
        self.addr
    }
    /// Pages mapped.
    pub fn pages(&self) -> usize {
        self.count as usize
    }
    /// Address of page `i`.
    pub fn page(&self, i: usize) -> *mut u8 {
        debug_assert!(i < self.count as usize);
        // SAFETY: `i < count` pages lie inside the mapping.
        unsafe { self.addr.as_ptr().add(i * PAGE_SIZE) }
    }
}

impl MappedGrants for GrantMap {
    fn page(&self, i: usize) -> *mut u8 {
        GrantMap::page(self, i)
    }

    fn pages(&self) -> usize {
        self.count as usize
    }

    fn release(&mut self, first: usize, n: usize) -> io::Result<()> {
        if n == 0
            || first
                .checked_add(n)
                .is_none_or(|end| end > self.count as usize)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("pages {first}+{n} of a mapping of {}", self.count),
            ));
        }
        // SAFETY: the range lies inside our own mapping (checked above), and nothing of Rust
        // lives there: the pages were only reached through raw pointers, whose users (the IO
        // into them) finished before the caller releases them. MAP_FIXED replaces exactly
        // those pages with an inaccessible placeholder, keeping the addresses ours until the
        // drop unmaps the whole range.
        let p = unsafe {
            libc::mmap(
                self.page(first).cast(),
                n * PAGE_SIZE,
                libc::PROT_NONE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for GrantMap {
    fn drop(&mut self) {
        let len = self.count as usize * PAGE_SIZE;
        // SAFETY: addr/len are exactly what mmap returned and this is the only unmap.
        unsafe { libc::munmap(self.addr.as_ptr().cast(), len) };
        let mut arg = UnmapArg {
            index: self.index,
            count: self.count,
            pad: 0,
        };
        // SAFETY: the ioctl reads a live `UnmapArg` of the size its number encodes; `fd` is the
        // gntdev descriptor that made the mapping (the `Gntdev` outlives us).
        unsafe { libc::ioctl(self.fd, IOCTL_GNTDEV_UNMAP_GRANT_REF, &mut arg) };
    }
}

impl GrantDevice for Gntdev {
    type Map = GrantMap;

    fn map(&self, domid: DomId, refs: &[GrantRef], writable: bool) -> io::Result<GrantMap> {
        Gntdev::map(self, domid, refs, writable)
    }

    unsafe fn copy(&self, segs: &mut [CopySegment]) -> io::Result<()> {
        // SAFETY: the caller's contract is this one's.
        unsafe { Gntdev::copy(self, segs) }
    }
}

impl Gntdev {
    /// Opens `/dev/xen/gntdev`.
    pub fn open() -> io::Result<Gntdev> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/xen/gntdev")
            .map_err(|e| io::Error::new(e.kind(), format!("/dev/xen/gntdev: {e}")))?;
        Ok(Gntdev { file })
    }

    /// Maps `refs` of domain `domid` as one contiguous range, writable or read-only. The
    /// returned mapping must be dropped before this `Gntdev`.
    pub fn map(&self, domid: DomId, refs: &[GrantRef], writable: bool) -> io::Result<GrantMap> {
        if refs.is_empty() || refs.len() > MAX_BATCH {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} grants in one map (1..={MAX_BATCH})", refs.len()),
            ));
        }
        let mut arg = MapArg {
            count: refs.len() as u32,
            pad: 0,
            index: 0,
            refs: [GrantRefArg::default(); MAX_BATCH],
        };
        for (a, r) in arg.refs.iter_mut().zip(refs) {
            *a = GrantRefArg {
                domid: u32::from(domid),
                r#ref: *r,
            };
        }
        let fd = self.file.as_raw_fd();
        // SAFETY: the kernel reads `count` entries of `refs` and writes `index`, all inside the
        // live `arg`, which has room for MAX_BATCH >= count entries.
        if unsafe { libc::ioctl(fd, IOCTL_GNTDEV_MAP_GRANT_REF, &mut arg) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let len = refs.len() * PAGE_SIZE;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh shared mapping at an address the kernel picks cannot alias a Rust
        // object; the offset is the one the map ioctl reserved for exactly `len` bytes.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd,
                arg.index as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            let mut un = UnmapArg {
                index: arg.index,
                count: refs.len() as u32,
                pad: 0,
            };
            // SAFETY: releases the reservation made above; reads a live `UnmapArg`.
            unsafe { libc::ioctl(fd, IOCTL_GNTDEV_UNMAP_GRANT_REF, &mut un) };
            return Err(e);
        }
        let addr = NonNull::new(p.cast::<u8>()).ok_or_else(io::Error::last_os_error)?;
        Ok(GrantMap {
            fd,
            addr,
            index: arg.index,
            count: refs.len() as u32,
        })
    }

    /// Runs a batch of grant copies. Returns `Ok` when the hypervisor processed them all; each
    /// segment's [`CopySegment::status`] then says whether it succeeded.
    ///
    /// # Safety
    /// Every local address in `segs` must be valid for its `len` bytes (readable for copies to
    /// a grant, writable for copies from one) for the duration of the call.
    pub unsafe fn copy(&self, segs: &mut [CopySegment]) -> io::Result<()> {
        if segs.is_empty() {
            return Ok(());
        }
        let mut arg = CopyArg {
            count: segs.len() as libc::c_uint,
            segments: segs.as_mut_ptr(),
        };
        // SAFETY: the kernel reads `count` segments from, and writes their status into, the
        // live slice; the local buffers are valid by the caller's contract.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), IOCTL_GNTDEV_GRANT_COPY, &mut arg) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn layouts_match_linux() {
        assert_eq!(size_of::<GrantRefArg>(), 8);
        assert_eq!(offset_of!(MapArg, index), 8);
        assert_eq!(offset_of!(MapArg, refs), 16);
        assert_eq!(size_of::<UnmapArg>(), 16);
        assert_eq!(size_of::<CopySegment>(), 24);
        assert_eq!(offset_of!(CopySegment, len), 16);
        assert_eq!(offset_of!(CopySegment, flags), 18);
        assert_eq!(offset_of!(CopySegment, status), 20);
        assert_eq!(size_of::<CopyArg>(), 16);
        let f = foreign(0x1234, 0x200, 7);
        assert_eq!(f[0].to_le_bytes(), [0x34, 0x12, 0, 0, 0x00, 0x02, 7, 0]);
    }

    #[test]
    fn refuses_empty_and_oversized_batches_before_any_ioctl() {
        // Without Xen the device does not open; the argument checks come first in `map`.
        if let Ok(g) = Gntdev::open() {
            assert!(g.map(1, &[], false).is_err());
        } else {
            assert!(Gntdev::open().is_err());
        }
    }
}
