//! userfaultfd for early read return: pages a frontend reads into are unmapped in the
//! frontend until the backend has filled them.
//!
//! The frontend's guest memory is a shared memfd. In early-read mode the frontend registers
//! its mapping of it with a userfaultfd in *minor* mode (`UFFDIO_REGISTER_MODE_MINOR`, Linux
//! 5.13+ for shmem) and zaps the pages of every read it queues (`MADV_DONTNEED`: the page-table
//! entries go, the page-cache pages stay). A frontend thread that touches such a page takes a
//! minor fault, which the kernel reports on the userfaultfd and holds until somebody maps the
//! page with `UFFDIO_CONTINUE`. The backend holds the userfaultfd (passed over the transport
//! socket): it writes the data through its own, unregistered mapping of the same memfd and
//! then continues the page, which maps it in the frontend and wakes any thread stalled on it.
//! A page is never mapped in the frontend before its data is in it.
//!
//! Raw syscalls and ioctls, as in `<linux/userfaultfd.h>`; each unsafe block says why it is
//! sound.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::protocol::PAGE_SIZE;

const UFFD_API: u64 = 0xAA;
/// Report minor faults on shmem (memfd) mappings.
pub const FEATURE_MINOR_SHMEM: u64 = 1 << 10;
/// Fault messages carry the faulting thread's id.
pub const FEATURE_THREAD_ID: u64 = 1 << 8;
const REGISTER_MODE_MINOR: u64 = 1 << 2;
const EVENT_PAGEFAULT: u8 = 0x12;
const PAGEFAULT_FLAG_WRITE: u64 = 1;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioContinue {
    range: UffdioRange,
    mode: u64,
    mapped: i64,
}

/// The ioctls, numbered as in `<linux/userfaultfd.h>` (type 0xAA).
mod sys {
    use super::{UffdioApi, UffdioContinue, UffdioRange, UffdioRegister};
    nix::ioctl_readwrite!(uffdio_api, 0xAA, 0x3F, UffdioApi);
    nix::ioctl_readwrite!(uffdio_register, 0xAA, 0x00, UffdioRegister);
    nix::ioctl_read!(uffdio_wake, 0xAA, 0x02, UffdioRange);
    nix::ioctl_readwrite!(uffdio_continue, 0xAA, 0x07, UffdioContinue);
}
use sys::{uffdio_api, uffdio_continue, uffdio_register, uffdio_wake};

/// One page fault a frontend thread is stalled on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The faulting address (in the frontend's address space).
    pub address: u64,
    /// It was a write.
    pub write: bool,
    /// The faulting thread.
    pub tid: u32,
}

/// A userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

impl Uffd {
    /// A new userfaultfd (nonblocking, close-on-exec) with minor-fault support on shmem.
    /// Fails on kernels without it, or without the privilege to handle kernel-mode faults
    /// (root, or `vm.unprivileged_userfaultfd = 1`).
    pub fn new_minor_shmem() -> io::Result<Uffd> {
        // SAFETY: a plain syscall with integer flags; the result is checked below.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: FEATURE_MINOR_SHMEM | FEATURE_THREAD_ID,
            ioctls: 0,
        };
        // SAFETY: `api` is a valid, writable uffdio_api for the call; the fd is a userfaultfd.
        unsafe { uffdio_api(fd.as_raw_fd(), &mut api) }.map_err(io::Error::from)?;
        if api.features & FEATURE_MINOR_SHMEM == 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this kernel's userfaultfd has no minor faults on shmem (Linux 5.13+)",
            ));
        }
        Ok(Uffd { fd })
    }

    /// Wraps a descriptor received from a peer, after checking that it is a userfaultfd.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Uffd> {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
        if link.as_os_str() != "anon_inode:[userfaultfd]" {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the early-read descriptor is not a userfaultfd",
            ));
        }
        Ok(Uffd { fd })
    }

    /// The descriptor (polls readable when faults are waiting).
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// A second handle on the same userfaultfd.
    pub fn try_clone(&self) -> io::Result<Uffd> {
        Ok(Uffd {
            fd: self.fd.try_clone()?,
        })
    }

    /// The raw descriptor, to send to a peer.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.fd)
    }

    /// Registers `len` bytes at `base` (a shared memfd mapping of this process) for minor
    /// faults.
    ///
    /// # Safety
    /// `base..base+len` must be a page-aligned `MAP_SHARED` mapping of a memfd that this
    /// process keeps mapped while the registration matters; faults on it will wait for
    /// `UFFDIO_CONTINUE` from whoever holds this userfaultfd.
    pub unsafe fn register_minor(&self, base: *mut u8, len: usize) -> io::Result<()> {
        let mut r = UffdioRegister {
            range: UffdioRange {
                start: base as u64,
                len: len as u64,
            },
            mode: REGISTER_MODE_MINOR,
            ioctls: 0,
        };
        // SAFETY: `r` is a valid, writable uffdio_register; the range is the caller's mapping.
        unsafe { uffdio_register(self.fd.as_raw_fd(), &mut r) }.map_err(io::Error::from)?;
        Ok(())
    }

    /// Maps `len` bytes at `addr` of the registered range (whose page-cache pages must hold
    /// their data by now) and wakes threads stalled on them. Pages already mapped are fine.
    pub fn continue_range(&self, addr: u64, len: u64) -> io::Result<()> {
        let mut c = UffdioContinue {
            range: UffdioRange { start: addr, len },
            mode: 0,
            mapped: 0,
        };
        // SAFETY: `c` is a valid, writable uffdio_continue. The ioctl only installs page-table
        // entries for existing page-cache pages in the registered mapping of the process that
        // created the userfaultfd; it cannot touch our own memory.
        match unsafe { uffdio_continue(self.fd.as_raw_fd(), &mut c) } {
            Ok(_) => Ok(()),
            // Already mapped (the frontend touched a page we had continued before, or a range
            // was continued twice): nothing to do, but threads may still wait for a wake-up.
            Err(nix::errno::Errno::EEXIST) => self.wake(addr, len),
            Err(e) => Err(e.into()),
        }
    }

    /// Wakes threads stalled on `len` bytes at `addr` without mapping anything.
    pub fn wake(&self, addr: u64, len: u64) -> io::Result<()> {
        let mut r = UffdioRange { start: addr, len };
        // SAFETY: `r` is a valid uffdio_range; waking only retries the faults.
        unsafe { uffdio_wake(self.fd.as_raw_fd(), &mut r) }
            .map(|_| ())
            .map_err(io::Error::from)
    }

    /// Reads the next fault, if one is waiting.
    pub fn read_fault(&self) -> io::Result<Option<Fault>> {
        loop {
            let mut msg = [0u8; 32];
            // SAFETY: reads at most 32 bytes (one uffd_msg) into a live local buffer.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), msg.as_mut_ptr().cast(), 32) };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(None),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(e),
                };
            }
            if n != 32 {
                return Err(io::Error::other("short userfaultfd message"));
            }
            if msg[0] != EVENT_PAGEFAULT {
                continue;
            }
            let u64_at = |o: usize| u64::from_ne_bytes(msg[o..o + 8].try_into().unwrap_or([0; 8]));
            return Ok(Some(Fault {
                write: u64_at(8) & PAGEFAULT_FLAG_WRITE != 0,
                address: u64_at(16),
                tid: u32::from_ne_bytes(msg[24..28].try_into().unwrap_or([0; 4])),
            }));
        }
    }
}

/// Zaps the page-table entries of `len` bytes at `addr` (page aligned) of this process's
/// shared mapping: the pages keep their content in the page cache, and the next touch
/// faults.
///
/// # Safety
/// `addr..addr+len` must lie in a `MAP_SHARED` mapping of a memfd owned by the caller (for
/// shmem, `MADV_DONTNEED` drops only page-table entries, never data).
pub unsafe fn zap(addr: *mut u8, len: usize) -> io::Result<()> {
    debug_assert!((addr as usize).is_multiple_of(PAGE_SIZE) && len.is_multiple_of(PAGE_SIZE));
    // SAFETY: forwarded from the caller; madvise does not touch memory safety of a shared
    // mapping (later accesses fault and are resolved by the userfaultfd's holder).
    if unsafe { libc::madvise(addr.cast(), len, libc::MADV_DONTNEED) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmap::Mapping;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    fn memfd(pages: usize) -> OwnedFd {
        // SAFETY: a plain syscall with a valid C string; the result is checked.
        let fd = unsafe { libc::memfd_create(c"uffd-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        nix::unistd::ftruncate(&fd, (pages * PAGE_SIZE) as i64).unwrap();
        fd
    }

    /// A reader stalls on a zapped page until the "backend" (another thread with its own
    /// mapping) fills and continues it, and then sees the new data.
    #[test]
    fn stall_until_filled() {
        let uffd = match Uffd::new_minor_shmem() {
            Ok(u) => u,
            Err(e) => panic!("userfaultfd with minor shmem faults is required: {e}"),
        };
        let fd = memfd(4);
        let front = Mapping::map_shared(std::os::fd::AsFd::as_fd(&fd), 4 * PAGE_SIZE).unwrap();
        let back = Mapping::map_shared(std::os::fd::AsFd::as_fd(&fd), 4 * PAGE_SIZE).unwrap();
        let fb = front.ptr().as_ptr();
        // Touch every page first, as a frontend does at attach.
        for p in 0..4 {
            // SAFETY: inside the 4-page mapping.
            unsafe { fb.add(p * PAGE_SIZE).write_volatile(0xAA) };
        }
        // SAFETY: `front` is a shared memfd mapping that outlives the test's faults.
        unsafe { uffd.register_minor(fb, 4 * PAGE_SIZE) }.unwrap();
        // SAFETY: page 2 of our own shared memfd mapping.
        unsafe { zap(fb.add(2 * PAGE_SIZE), PAGE_SIZE) }.unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let addr = fb as usize + 2 * PAGE_SIZE;
        let reader = {
            let done = done.clone();
            std::thread::spawn(move || {
                // SAFETY: inside the mapping, which outlives the thread (joined below).
                let v = unsafe { (addr as *const u8).read_volatile() };
                done.store(true, Ordering::SeqCst);
                v
            })
        };
        // The reader faults and waits; its fault shows up on the userfaultfd.
        let deadline = Instant::now() + Duration::from_secs(5);
        let fault = loop {
            if let Some(f) = uffd.read_fault().unwrap() {
                break f;
            }
            assert!(Instant::now() < deadline, "no fault reported");
            std::thread::sleep(Duration::from_millis(1));
        };
        assert_eq!(fault.address as usize & !(PAGE_SIZE - 1), addr);
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !done.load(Ordering::SeqCst),
            "the reader ran before the page was filled"
        );
        // Fill through the backend's mapping, then continue.
        // SAFETY: page 2 of the backend's mapping of the same memfd.
        unsafe { back.ptr().as_ptr().add(2 * PAGE_SIZE).write_volatile(0x5A) };
        uffd.continue_range(addr as u64, PAGE_SIZE as u64).unwrap();
        assert_eq!(reader.join().unwrap(), 0x5A);
        // Continuing an already mapped page is fine.
        uffd.continue_range(addr as u64, PAGE_SIZE as u64).unwrap();
        // Untouched pages never faulted.
        assert_eq!(uffd.read_fault().unwrap(), None);
    }

    #[test]
    fn foreign_descriptors_are_refused() {
        let fd = memfd(1);
        assert!(Uffd::from_fd(fd).is_err());
    }
}
