//! The local transport: a frontend and tapdisk on one host, without Xen.
//!
//! It plays the role blktap2's character device played in the thesis. The frontend owns its
//! "guest memory" (a sealed memfd) and its ring (another sealed memfd), creates two eventfds
//! (`kick`: frontend to backend, `notify`: backend to frontend), and sends all four descriptors
//! with `SCM_RIGHTS` over a unix stream socket to the VBD, together with a one-line JSON
//! [`AttachRequest`]. The backend answers with one JSON line, [`AttachReply`]. A grant reference
//! is a page number in the guest memory. The socket stays open for the life of the ring: when
//! either side closes it, the ring is gone.
//!
//! The backend trusts none of it: the memfds must be sealed against shrinking (else the
//! frontend could truncate them under our mapping and kill tapdisk with SIGBUS), the eventfds
//! must be eventfds, sizes must match, and every grant reference is bounds-checked.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, OFlag, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use crate::protocol::{Abi, PAGE_SIZE};
use crate::request::DiskInfo;

/// `poll(2)` on raw pollfds (nix's wrapper cannot report `POLLRDHUP`). Retries on EINTR;
/// returns how many descriptors have events.
pub(crate) fn poll_raw(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    loop {
        // SAFETY: `fds` is a live, writable array of `fds.len()` pollfds for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Version of the attach handshake.
pub const VERSION: u32 = 1;
/// Largest ring order the local transport offers: rings of up to 2^8 pages (256 pages,
/// 8192 requests of the x86_64 layout).
pub const MAX_RING_ORDER: u8 = 8;
const MAX_LINE: usize = 4096;

/// What the frontend asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AttachRequest {
    /// Handshake version ([`VERSION`]).
    pub version: u32,
    /// Ring layout.
    pub abi: Abi,
    /// The ring has `2^ring_order` pages.
    pub ring_order: u8,
    /// Pages of guest memory; grant refs are `0..mem_pages`.
    pub mem_pages: u32,
    /// Early-read mode: a fifth descriptor, a userfaultfd on which the frontend registered its
    /// mapping of guest memory (at `base` in its address space) for minor faults; the
    /// frontend unmaps the pages of every read it queues, and the backend maps each page
    /// (`UFFDIO_CONTINUE`) once its data is in it (see [`crate::uffd`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_read: Option<EarlyReadAttach>,
}

/// The frontend's side of early-read mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EarlyReadAttach {
    /// Where guest memory is mapped in the frontend.
    pub base: u64,
}

/// What the backend needs to serve early reads on a ring.
#[derive(Debug)]
pub struct EarlyReadPort {
    /// The frontend's userfaultfd.
    pub uffd: crate::uffd::Uffd,
    /// Guest memory's address in the frontend.
    pub base: u64,
    /// Pages of guest memory.
    pub pages: u32,
}

impl EarlyReadPort {
    /// The frontend address of guest page `page`, if it exists.
    pub fn page_addr(&self, page: u32) -> Option<u64> {
        (page < self.pages).then(|| self.base + u64::from(page) * PAGE_SIZE as u64)
    }

    /// The guest page holding frontend address `addr`, if it is guest memory.
    pub fn page_of(&self, addr: u64) -> Option<u32> {
        let off = addr.checked_sub(self.base)?;
        let p = off / PAGE_SIZE as u64;
        (p < u64::from(self.pages)).then_some(p as u32)
    }
}

/// Response status, to early-read frontends only: the read was answered before all its data
/// is in; the pages fill in behind (each unmapped until filled), and a completion record
/// ([`EARLY_READ_DONE`] or [`EARLY_READ_FAILED`]) follows on the socket. The frontend library
/// hands it to its caller as `BLKIF_RSP_OKAY` and waits for the record in
/// [`LocalFrontend::finish_read`].
pub const STATUS_EARLY: i16 = 1;

/// Completion record of an early-answered read whose pages are all filled: `b"ERRD"`, 4 zero
/// bytes, the request id (little endian).
pub const EARLY_READ_DONE: &[u8; 4] = b"ERRD";
/// Completion record of an early-answered read that failed after the answer (its unfilled
/// pages hold [`crate::early::POISON`]).
pub const EARLY_READ_FAILED: &[u8; 4] = b"ERRF";

/// The backend's answer.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AttachReply {
    /// Handshake version.
    pub version: u32,
    /// The disk, or why the attach was refused.
    pub result: Result<DiskInfo, String>,
}

/// Limits the backend puts on a frontend.
#[derive(Clone, Copy, Debug)]
pub struct AttachLimits {
    /// Largest ring order accepted.
    pub max_ring_order: u8,
    /// Largest guest memory accepted, in pages.
    pub max_mem_pages: u32,
}

impl Default for AttachLimits {
    fn default() -> Self {
        AttachLimits {
            max_ring_order: MAX_RING_ORDER,
            max_mem_pages: 1 << 22,
        }
    }
}

pub use crate::error::AttachError;

fn proto(msg: impl Into<String>) -> AttachError {
    AttachError::Protocol(msg.into())
}

fn send_line(sock: &UnixStream, line: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let iov = [io::IoSlice::new(line)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    let n = loop {
        match sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            // A socket with a timeout is not restarted after a signal or task work (an
            // io_uring this thread closed queues some): try again.
            Err(nix::errno::Errno::EINTR) => continue,
            r => break r?,
        }
    };
    (&*sock).write_all(&line[n..])
}

/// Reads one newline-terminated line (at most 4 KiB) and the descriptors sent with it;
/// `timeout` is the socket's read timeout, for the error when it passes.
fn recv_line(sock: &UnixStream, timeout: Duration) -> Result<(Vec<u8>, Vec<OwnedFd>), AttachError> {
    let mut buf = vec![0u8; MAX_LINE];
    let mut fds = Vec::new();
    let mut cmsg_space = nix::cmsg_space!([RawFd; 8]);
    let n = {
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let msg = loop {
            let r = recvmsg::<()>(
                sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg_space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            );
            // As in `send_line`: an interrupted wait is tried again (nothing was received).
            if r != Err(nix::errno::Errno::EINTR) {
                break r;
            }
        }
        .map_err(|e| match e {
            nix::errno::Errno::EAGAIN => proto(format!(
                "no handshake message from the peer within {} s",
                timeout.as_secs()
            )),
            e => AttachError::Io(io::Error::from(e)),
        })?;
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(v) = c {
                // SAFETY: the kernel just installed these descriptors in our table for us;
                // nothing else owns them.
                fds.extend(v.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(proto("too many descriptors sent"));
        }
        msg.bytes
    };
    let mut len = n;
    while !buf[..len].contains(&b'\n') {
        if len == MAX_LINE {
            return Err(proto("handshake line longer than 4 KiB"));
        }
        let m = match (&*sock).read(&mut buf[len..]) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => r?,
        };
        if m == 0 {
            return Err(proto("peer closed the socket during the handshake"));
        }
        len += m;
    }
    let end = buf[..len].iter().position(|&b| b == b'\n').unwrap_or(len);
    buf.truncate(end);
    Ok((buf, fds))
}

fn fd_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    Ok(nix::sys::stat::fstat(fd.as_raw_fd())
        .map_err(io::Error::from)?
        .st_size as u64)
}

fn check_sealed(fd: BorrowedFd<'_>, what: &str) -> Result<(), AttachError> {
    let seals = fcntl(fd.as_raw_fd(), FcntlArg::F_GET_SEALS).unwrap_or(0);
    if seals & libc::F_SEAL_SHRINK == 0 {
        return Err(proto(format!(
            "{what} must be a memfd sealed with F_SEAL_SHRINK"
        )));
    }
    Ok(())
}

fn check_eventfd(fd: BorrowedFd<'_>, what: &str) -> Result<(), AttachError> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    if link.as_os_str() != "anon_inode:[eventfd]" {
        return Err(proto(format!("{what} is not an eventfd")));
    }
    set_nonblocking(fd)?;
    Ok(())
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let fl = OFlag::from_bits_retain(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(fl | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Signals an eventfd; a saturated counter already means "notified".
fn eventfd_signal(fd: BorrowedFd<'_>) -> io::Result<()> {
    match nix::unistd::write(fd, &1u64.to_ne_bytes()) {
        Ok(_) | Err(nix::errno::Errno::EAGAIN) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Reads and resets an eventfd's counter (0 if it was not signalled).
fn eventfd_drain(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut v = [0u8; 8];
    match nix::unistd::read(fd.as_raw_fd(), &mut v) {
        Ok(8) => Ok(u64::from_ne_bytes(v)),
        Ok(n) => Err(io::Error::other(format!(
            "short read of {n} bytes from an eventfd"
        ))),
        Err(nix::errno::Errno::EAGAIN) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// A new non-blocking, close-on-exec eventfd.
pub(crate) fn new_eventfd() -> io::Result<OwnedFd> {
    use nix::sys::eventfd::{EfdFlags, EventFd};
    let efd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
    Ok(efd.into())
}

fn new_sealed_memfd(name: &std::ffi::CStr, len: u64) -> io::Result<OwnedFd> {
    let flags = MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING;
    let fd = memfd_create(name, flags)?;
    let len = i64::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    nix::unistd::ftruncate(&fd, len)?;
    let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
    fcntl(fd.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals))?;
    Ok(fd)
}

mod backend;
mod frontend;
#[cfg(test)]
mod tests;

pub use backend::{accept, LocalBackend, LocalEvtchn, LocalGrants};
pub use frontend::{FrontRequest, FrontendConfig, LocalFrontend};
