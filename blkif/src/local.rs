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
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::ptr::NonNull;
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, OFlag, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use crate::mmap::Mapping;
use crate::protocol::SEGMENTS_PER_INDIRECT_FRAME;
use crate::protocol::{Abi, GrantRef, Response, Segment, MAX_SLOT, PAGE_SIZE};
use crate::request::{
    encode, encode_discard, encode_indirect, encode_indirect_page, DiskInfo, Problem,
};
use crate::ring::{BackRing, FrontRing};
use crate::transport::{EventChannel, GrantMapper, MapHandle};

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
    let n = sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
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
        let msg = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
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
        let m = (&*sock).read(&mut buf[len..])?;
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

// ---------------------------------------------------------------------------------------------
// Backend side

/// Grant references of the local transport: page numbers in the frontend's memfd.
#[derive(Debug)]
pub struct LocalGrants {
    mem: Mapping,
    pages: u32,
}

impl LocalGrants {
    /// Pages of guest memory.
    pub fn pages(&self) -> u32 {
        self.pages
    }
}

impl GrantMapper for LocalGrants {
    fn map(
        &mut self,
        segs: &[Segment],
        _writable: bool,
        addrs: &mut [*mut u8],
    ) -> Result<MapHandle, Problem> {
        for (s, a) in segs.iter().zip(addrs.iter_mut()) {
            let r = s.gref;
            if r >= self.pages {
                return Err(Problem::BadGrant(r));
            }
            // SAFETY: `r < pages`, so the page lies inside the mapping of `pages` pages.
            *a = unsafe { self.mem.ptr().as_ptr().add(r as usize * PAGE_SIZE) };
        }
        Ok(MapHandle(0))
    }

    fn unmap(&mut self, _handle: MapHandle) -> Result<(), Problem> {
        Ok(())
    }
}

/// Event channel of the local transport: two eventfds.
#[derive(Debug)]
pub struct LocalEvtchn {
    kick: OwnedFd,
    notify: OwnedFd,
}

impl EventChannel for LocalEvtchn {
    fn fd(&self) -> RawFd {
        self.kick.as_raw_fd()
    }
    fn ack(&self) -> io::Result<()> {
        eventfd_drain(self.kick.as_fd()).map(|_| ())
    }
    fn notify(&self) -> io::Result<()> {
        eventfd_signal(self.notify.as_fd())
    }
}

/// A ring attached over the local transport, as the backend sees it.
#[derive(Debug)]
pub struct LocalBackend {
    /// The back half of the ring. Declared first so it is dropped before its mapping.
    pub ring: BackRing,
    /// Grant mapping.
    pub grants: LocalGrants,
    /// Event channel.
    pub evtchn: LocalEvtchn,
    /// The frontend's ABI.
    pub abi: Abi,
    /// The ring order it asked for.
    pub ring_order: u8,
    /// The socket: it hangs up when the frontend goes away; dropping it tells the frontend
    /// that the ring is gone.
    pub sock: UnixStream,
    /// Early-read mode, if the frontend asked for it.
    pub early_read: Option<EarlyReadPort>,
    _ring_map: Mapping,
}

impl LocalBackend {
    /// Sends the completion record of early-answered read `id` (`ok`: every page filled).
    /// The frontend's watchdog reads the socket all the time; if its buffer were full anyway,
    /// the frontend would find out by its pages (poisoned, never silently wrong) or by the
    /// hang-up when the ring goes.
    pub fn report_early_read_done(&self, id: u64, ok: bool) -> io::Result<()> {
        let mut m = [0u8; 16];
        m[..4].copy_from_slice(if ok {
            EARLY_READ_DONE
        } else {
            EARLY_READ_FAILED
        });
        m[8..].copy_from_slice(&id.to_le_bytes());
        let n = nix::sys::socket::send(
            self.sock.as_raw_fd(),
            &m,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        )?;
        if n != m.len() {
            return Err(io::Error::other("short write of an early-read failure"));
        }
        Ok(())
    }
}

/// How long a peer has to send its attach message (and to read the answer).
pub const ATTACH_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the backend half of the handshake on a freshly accepted socket: validates everything
/// the frontend sent, maps it, answers with `info` (or with the reason for refusing).
pub fn accept(
    sock: UnixStream,
    limits: &AttachLimits,
    info: &DiskInfo,
) -> crate::Result<LocalBackend> {
    Ok(accept_and_answer(sock, limits, info)?)
}

fn accept_and_answer(
    sock: UnixStream,
    limits: &AttachLimits,
    info: &DiskInfo,
) -> Result<LocalBackend, AttachError> {
    sock.set_read_timeout(Some(ATTACH_TIMEOUT))?;
    sock.set_write_timeout(Some(ATTACH_TIMEOUT))?;
    match accept_inner(&sock, limits, info) {
        Ok(parts) => {
            let reply = AttachReply {
                version: VERSION,
                result: Ok(*info),
            };
            send_json(&sock, &reply)?;
            sock.set_read_timeout(None)?;
            sock.set_write_timeout(None)?;
            let (ring, grants, evtchn, req, ring_map, early_read) = parts;
            Ok(LocalBackend {
                ring,
                grants,
                evtchn,
                abi: req.abi,
                ring_order: req.ring_order,
                sock,
                early_read,
                _ring_map: ring_map,
            })
        }
        Err(e) => {
            let reply = AttachReply {
                version: VERSION,
                result: Err(e.to_string()),
            };
            let _ = send_json(&sock, &reply);
            Err(e)
        }
    }
}

type Parts = (
    BackRing,
    LocalGrants,
    LocalEvtchn,
    AttachRequest,
    Mapping,
    Option<EarlyReadPort>,
);

fn accept_inner(
    sock: &UnixStream,
    limits: &AttachLimits,
    info: &DiskInfo,
) -> Result<Parts, AttachError> {
    let (line, fds) = recv_line(sock, ATTACH_TIMEOUT)?;
    let req: AttachRequest = serde_json::from_slice(&line)
        .map_err(|e| proto(format!("attach request is not valid JSON: {e}")))?;
    if req.version != VERSION {
        return Err(proto(format!(
            "handshake version {} (this backend speaks {VERSION})",
            req.version
        )));
    }
    if req.ring_order > limits.max_ring_order {
        return Err(proto(format!(
            "ring order {} is above the maximum {}",
            req.ring_order, limits.max_ring_order
        )));
    }
    if req.mem_pages == 0 || req.mem_pages > limits.max_mem_pages {
        return Err(proto(format!(
            "guest memory of {} pages is outside 1..={}",
            req.mem_pages, limits.max_mem_pages
        )));
    }
    let want = if req.early_read.is_some() { 5 } else { 4 };
    if fds.len() != want {
        return Err(proto(format!(
            "expected {want} descriptors, got {}",
            fds.len()
        )));
    }
    let mut fds = fds.into_iter();
    let mut next = || fds.next().ok_or_else(|| proto("descriptor missing"));
    let (mem_fd, ring_fd, kick, notify) = (next()?, next()?, next()?, next()?);
    let early_read = match req.early_read {
        Some(e) => {
            let uffd = crate::uffd::Uffd::from_fd(next()?).map_err(|e| proto(e.to_string()))?;
            if e.base % PAGE_SIZE as u64 != 0 {
                return Err(proto("early-read base address is not page aligned"));
            }
            Some(EarlyReadPort {
                uffd,
                base: e.base,
                pages: req.mem_pages,
            })
        }
        None => None,
    };
    check_sealed(mem_fd.as_fd(), "guest memory")?;
    check_sealed(ring_fd.as_fd(), "the ring")?;
    check_eventfd(kick.as_fd(), "the kick descriptor")?;
    check_eventfd(notify.as_fd(), "the notify descriptor")?;
    let ring_pages = 1usize << req.ring_order;
    let mem_len = req.mem_pages as u64 * PAGE_SIZE as u64;
    if fd_size(mem_fd.as_fd())? < mem_len {
        return Err(proto("guest memory memfd is smaller than mem_pages"));
    }
    if fd_size(ring_fd.as_fd())? < (ring_pages * PAGE_SIZE) as u64 {
        return Err(proto("ring memfd is smaller than 2^ring_order pages"));
    }
    let mem = Mapping::map_shared(mem_fd.as_fd(), mem_len as usize)?;
    let ring_map = Mapping::map_shared(ring_fd.as_fd(), ring_pages * PAGE_SIZE)?;
    // SAFETY: `ring_map` is page aligned, `ring_pages` pages long, sealed against shrinking,
    // and is moved into the same `LocalBackend` as the ring, which drops the ring first.
    let ring = unsafe { BackRing::new(ring_map.ptr(), ring_pages, req.abi) }
        .ok_or_else(|| proto("ring too small"))?;
    let _ = info;
    Ok((
        ring,
        LocalGrants {
            mem,
            pages: req.mem_pages,
        },
        LocalEvtchn { kick, notify },
        req,
        ring_map,
        early_read,
    ))
}

fn send_json<T: serde::Serialize>(sock: &UnixStream, v: &T) -> io::Result<()> {
    let mut line = serde_json::to_vec(v).map_err(io::Error::other)?;
    line.push(b'\n');
    send_line(sock, &line, &[])
}

// ---------------------------------------------------------------------------------------------
// Frontend side

/// How a local frontend sets up its ring.
#[derive(Clone, Copy, Debug)]
pub struct FrontendConfig {
    /// Ring layout to use.
    pub abi: Abi,
    /// `2^ring_order` ring pages.
    pub ring_order: u8,
    /// Pages of guest memory to share.
    pub mem_pages: u32,
    /// Early-read mode: every read's pages are unmapped here until tapdisk has filled them,
    /// so tapdisk may answer reads early (see [`crate::early`]). Needs userfaultfd with minor
    /// faults on shmem (Linux 5.13+) and the privilege to use it.
    pub early_read: bool,
}

impl Default for FrontendConfig {
    fn default() -> Self {
        FrontendConfig {
            abi: Abi::NATIVE,
            ring_order: 0,
            mem_pages: 1024,
            early_read: false,
        }
    }
}

/// A request as a frontend builds it.
#[derive(Clone, Copy, Debug)]
pub enum FrontRequest<'a> {
    /// A read, write, flush or barrier with these segments.
    Rw {
        /// `BLKIF_OP_*`.
        op: u8,
        /// Id echoed in the response.
        id: u64,
        /// First sector.
        sector: u64,
        /// Segments (at most 11).
        segments: &'a [Segment],
    },
    /// An indirect read or write: the descriptors of `segments` are written into the guest
    /// pages `indirect` names (512 per page; grant refs outside guest memory are skipped, so a
    /// test can name bad ones), then the header is queued.
    Indirect {
        /// `BLKIF_OP_READ` or `BLKIF_OP_WRITE` (anything, for hostile tests).
        op: u8,
        /// Id echoed in the response.
        id: u64,
        /// First sector.
        sector: u64,
        /// Pages for the descriptors (at most 8 are named in the request).
        indirect: &'a [GrantRef],
        /// Segments (`nr_segments` is their count, truncated to u16).
        segments: &'a [Segment],
    },
    /// A discard.
    Discard {
        /// Id echoed in the response.
        id: u64,
        /// First sector.
        sector: u64,
        /// Sectors.
        nr_sectors: u64,
        /// Secure discard.
        secure: bool,
    },
}

/// A frontend on the local transport: tests, `td-bench` and fuzzers drive tapdisk with it.
#[derive(Debug)]
pub struct LocalFrontend {
    ring: FrontRing,
    abi: Abi,
    info: DiskInfo,
    mem: Mapping,
    mem_pages: u32,
    kick: OwnedFd,
    notify: OwnedFd,
    sock: UnixStream,
    spin: Duration,
    early: Option<crate::early::EarlyFront>,
    ring_fd: OwnedFd,
    _ring_map: Mapping,
}

impl LocalFrontend {
    /// Busy-polls the ring for up to `spin` in [`LocalFrontend::wait`] before sleeping:
    /// lower latency for a CPU (0, the default, never spins).
    pub fn set_spin(&mut self, spin: Duration) {
        self.spin = spin;
    }

    /// Connects to a VBD's local-transport socket and attaches a new ring.
    pub fn connect(path: &Path, cfg: FrontendConfig) -> crate::Result<LocalFrontend> {
        let sock = UnixStream::connect(path).map_err(|e| {
            AttachError::Io(io::Error::new(
                e.kind(),
                format!("cannot connect to {}: {e}", path.display()),
            ))
        })?;
        Self::attach(sock, cfg)
    }

    /// Attaches over an already connected socket.
    pub fn attach(sock: UnixStream, cfg: FrontendConfig) -> crate::Result<LocalFrontend> {
        Ok(Self::attach_socket(sock, cfg)?)
    }

    fn attach_socket(sock: UnixStream, cfg: FrontendConfig) -> Result<LocalFrontend, AttachError> {
        let ring_pages = 1usize << cfg.ring_order;
        let mem_fd = new_sealed_memfd(c"blkif-guest-mem", cfg.mem_pages as u64 * PAGE_SIZE as u64)?;
        let ring_fd = new_sealed_memfd(c"blkif-ring", (ring_pages * PAGE_SIZE) as u64)?;
        let mem_len = cfg.mem_pages as usize * PAGE_SIZE;
        let mem = if cfg.early_read {
            // Every page mapped now, so only pages we zap ever fault.
            Mapping::map_shared_populated(mem_fd.as_fd(), mem_len)?
        } else {
            Mapping::map_shared(mem_fd.as_fd(), mem_len)?
        };
        let early = if cfg.early_read {
            let uffd = crate::uffd::Uffd::new_minor_shmem().map_err(|e| {
                io::Error::new(e.kind(), format!("early-read mode needs userfaultfd: {e}"))
            })?;
            // SAFETY: `mem` is our shared memfd mapping; it lives in the frontend as long as
            // the registration matters (faults on it are resolved by tapdisk or the watchdog).
            unsafe { uffd.register_minor(mem.ptr().as_ptr(), mem_len)? };
            let alias = Mapping::map_shared(mem_fd.as_fd(), mem_len)?;
            Some((uffd, alias))
        } else {
            None
        };
        let ring_map = Mapping::map_shared(ring_fd.as_fd(), ring_pages * PAGE_SIZE)?;
        // SAFETY: `ring_map` is page aligned, `ring_pages` long, and lives in the same struct
        // as the ring, which is declared (and so dropped) first.
        let ring = unsafe { FrontRing::init(ring_map.ptr(), ring_pages, cfg.abi) }
            .ok_or_else(|| proto("ring too small"))?;
        let kick = new_eventfd()?;
        let notify = new_eventfd()?;
        let req = AttachRequest {
            version: VERSION,
            abi: cfg.abi,
            ring_order: cfg.ring_order,
            mem_pages: cfg.mem_pages,
            early_read: early.as_ref().map(|_| EarlyReadAttach {
                base: mem.ptr().as_ptr() as u64,
            }),
        };
        let mut line = serde_json::to_vec(&req).map_err(io::Error::other)?;
        line.push(b'\n');
        let mut fds = vec![
            mem_fd.as_raw_fd(),
            ring_fd.as_raw_fd(),
            kick.as_raw_fd(),
            notify.as_raw_fd(),
        ];
        if let Some((uffd, _)) = &early {
            fds.push(uffd.fd());
        }
        send_line(&sock, &line, &fds)?;
        let wait = Duration::from_secs(10);
        sock.set_read_timeout(Some(wait))?;
        let (line, _) = recv_line(&sock, wait)?;
        sock.set_read_timeout(None)?;
        let reply: AttachReply = serde_json::from_slice(&line)
            .map_err(|e| proto(format!("attach reply is not valid JSON: {e}")))?;
        let info = reply.result.map_err(AttachError::Refused)?;
        let early = match early {
            Some((uffd, alias)) => Some(crate::early::EarlyFront::start(&mem, alias, uffd, &sock)?),
            None => None,
        };
        Ok(LocalFrontend {
            ring,
            abi: cfg.abi,
            info,
            mem,
            mem_pages: cfg.mem_pages,
            kick,
            notify,
            sock,
            spin: Duration::ZERO,
            early,
            ring_fd,
            _ring_map: ring_map,
        })
    }

    /// Whether early-read mode is on.
    pub fn early_read(&self) -> bool {
        self.early.is_some()
    }

    /// In early-read mode: waits until every page of read `id` (answered already) is filled,
    /// then says whether its data is good. A thread touching an unfilled page of an answered
    /// read stalls the same way; this is how a reader learns that the data is complete, or
    /// that it never will be (tapdisk failed the rest, or went away: the unfilled pages then
    /// hold [`crate::early::POISON`]). Outside early-read mode, always `Ok`.
    pub fn finish_read(&self, id: u64) -> crate::Result<()> {
        match &self.early {
            Some(e) => Ok(e.finish(id)?),
            None => Ok(()),
        }
    }

    /// In early-read mode: whether tapdisk went away (the watchdog noticed).
    pub fn backend_gone(&self) -> bool {
        self.early.as_ref().is_some_and(|e| e.backend_gone())
    }

    /// The disk as the backend described it.
    pub fn info(&self) -> &DiskInfo {
        &self.info
    }

    /// The ring layout.
    pub fn abi(&self) -> Abi {
        self.abi
    }

    /// Slots in the ring.
    pub fn ring_size(&self) -> u32 {
        self.ring.size()
    }

    /// Pages of guest memory (valid grant refs are `0..mem_pages()`).
    pub fn mem_pages(&self) -> u32 {
        self.mem_pages
    }

    /// Copies `data` into guest memory at byte offset `off`.
    ///
    /// # Panics
    /// If the range is outside guest memory (a bug in the caller, which owns that memory).
    pub fn write_mem(&self, off: usize, data: &[u8]) {
        assert!(off
            .checked_add(data.len())
            .is_some_and(|e| e <= self.mem.len()));
        // SAFETY: the range is inside our mapping (checked above). The backend only writes a
        // page while a read request naming it is in flight, which the caller does not overlap
        // with its own writes; a racing write would tear data, not memory safety.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.mem.ptr().as_ptr().add(off),
                data.len(),
            )
        };
    }

    /// Copies guest memory at byte offset `off` into `out`.
    ///
    /// # Panics
    /// If the range is outside guest memory.
    pub fn read_mem(&self, off: usize, out: &mut [u8]) {
        assert!(off
            .checked_add(out.len())
            .is_some_and(|e| e <= self.mem.len()));
        // SAFETY: as for `write_mem`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.mem.ptr().as_ptr().add(off),
                out.as_mut_ptr(),
                out.len(),
            )
        };
    }

    /// Raw pointer to guest memory (for zero-copy benchmarks).
    pub fn mem_ptr(&self) -> NonNull<u8> {
        self.mem.ptr()
    }

    /// Gives guest memory pages `off..off + len` (bytes, rounded out to pages) back to the
    /// system; they read as zeroes afterwards. Only for pages no request in flight names.
    pub fn release_mem(&self, off: usize, len: usize) -> io::Result<()> {
        self.mem.remove(off, len)
    }

    /// The descriptor that polls readable when the backend notified (published responses):
    /// for callers that wait for the ring and something else at once. Before sleeping on it,
    /// call [`LocalFrontend::prepare_wait`]; after it polled readable, [`LocalFrontend::ack_notify`].
    pub fn notify_fd(&self) -> RawFd {
        self.notify.as_raw_fd()
    }

    /// Asks to be notified of the next response; true if responses are already waiting (do
    /// not sleep then).
    pub fn prepare_wait(&mut self) -> bool {
        self.ring.final_check()
    }

    /// Consumes the notifications [`LocalFrontend::notify_fd`] signalled.
    pub fn ack_notify(&self) -> io::Result<()> {
        eventfd_drain(self.notify.as_fd()).map(|_| ())
    }

    /// The socket end the backend hangs up when it drops the ring.
    pub fn hangup_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Slots free for new requests.
    pub fn free_slots(&self) -> u32 {
        self.ring.free()
    }

    /// Requests published and not yet answered.
    pub fn outstanding(&self) -> u32 {
        self.ring.outstanding()
    }

    /// Queues a request (not visible to the backend until [`LocalFrontend::push`]).
    /// Returns false if the ring is full.
    pub fn queue(&mut self, req: &FrontRequest<'_>) -> bool {
        if self.ring.free() == 0 {
            return false;
        }
        if let Some(e) = &self.early {
            // Reads' pages are unmapped here until tapdisk has filled them.
            let (read, id, segs) = match *req {
                FrontRequest::Rw {
                    op, id, segments, ..
                } => (op == crate::protocol::op::READ, id, segments),
                FrontRequest::Indirect {
                    op, id, segments, ..
                } => (op == crate::protocol::op::READ, id, segments),
                FrontRequest::Discard { .. } => (false, 0, &[][..]),
            };
            if read && e.zap_read(id, segs.iter().map(|s| s.gref)).is_err() {
                return false;
            }
        }
        let mut bytes = [0u8; MAX_SLOT];
        match *req {
            FrontRequest::Rw {
                op,
                id,
                sector,
                segments,
            } => {
                let n = segments.len().min(u8::MAX as usize) as u8;
                encode(self.abi, op, n, id, sector, segments, &mut bytes)
            }
            FrontRequest::Indirect {
                op,
                id,
                sector,
                indirect,
                segments,
            } => {
                let mut page = [0u8; PAGE_SIZE];
                for (chunk, &g) in segments.chunks(SEGMENTS_PER_INDIRECT_FRAME).zip(indirect) {
                    if g < self.mem_pages {
                        page.fill(0);
                        encode_indirect_page(chunk, &mut page);
                        self.write_mem(g as usize * PAGE_SIZE, &page);
                    }
                }
                let n = segments.len().min(u16::MAX as usize) as u16;
                encode_indirect(self.abi, op, n, id, sector, indirect, &mut bytes)
            }
            FrontRequest::Discard {
                id,
                sector,
                nr_sectors,
                secure,
            } => encode_discard(self.abi, id, sector, nr_sectors, secure, &mut bytes),
        }
        self.ring.put_request(&bytes[..self.abi.layout().slot]);
        true
    }

    /// Queues arbitrary slot bytes, as a hostile frontend would. Returns false if full.
    pub fn queue_raw(&mut self, bytes: &[u8]) -> bool {
        if self.ring.free() == 0 {
            return false;
        }
        self.ring.put_request(bytes);
        true
    }

    /// Publishes queued requests and kicks the backend if it asked for it.
    pub fn push(&mut self) -> io::Result<()> {
        if self.ring.push_requests() {
            eventfd_signal(self.kick.as_fd())?;
        }
        Ok(())
    }

    /// A duplicate of the ring's memfd (tests hand it to another process that scribbles over
    /// the request slots while tapdisk copies them).
    pub fn ring_handle(&self) -> io::Result<OwnedFd> {
        self.ring_fd.try_clone()
    }

    /// A duplicate of the kick eventfd, for kicks outside the ring protocol (tests of kick
    /// storms: a hostile frontend can signal it as often as it likes).
    pub fn kick_handle(&self) -> io::Result<OwnedFd> {
        self.kick.try_clone()
    }

    /// Publishes an arbitrary `req_prod` and kicks (hostile index games).
    pub fn publish_raw_req_prod(&mut self, v: u32) -> io::Result<()> {
        self.ring.publish_raw_req_prod(v);
        eventfd_signal(self.kick.as_fd())
    }

    /// Takes every response published so far.
    pub fn poll(&mut self, mut f: impl FnMut(Response)) -> u32 {
        match &self.early {
            Some(e) => self.ring.take_responses(|mut r| {
                if r.status == STATUS_EARLY {
                    e.answered_early(r.id);
                    r.status = crate::protocol::status::OKAY;
                }
                f(r)
            }),
            None => self.ring.take_responses(f),
        }
    }

    /// Waits until responses are published, the timeout passes (`Ok(false)`), or the backend
    /// drops the ring (an error).
    pub fn wait(&mut self, timeout: Option<Duration>) -> io::Result<bool> {
        if !self.spin.is_zero() {
            let until = std::time::Instant::now() + self.spin;
            while std::time::Instant::now() < until {
                if self.ring.has_responses() {
                    return Ok(true);
                }
                std::hint::spin_loop();
            }
        }
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            if self.ring.final_check() {
                return Ok(true);
            }
            let left_ms = match deadline {
                None => -1,
                Some(d) => {
                    let now = std::time::Instant::now();
                    if now >= d {
                        return Ok(false);
                    }
                    (d - now).as_millis().clamp(1, i32::MAX as u128) as i32
                }
            };
            // The socket only ever says "gone" (hang-up); in early-read mode tapdisk also sends
            // it messages, which the watchdog reads.
            let mut fds = [
                libc::pollfd {
                    fd: self.notify.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.sock.as_raw_fd(),
                    events: libc::POLLRDHUP,
                    revents: 0,
                },
            ];
            poll_raw(&mut fds, left_ms)?;
            if fds[1].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
                if self.ring.final_check() {
                    return Ok(true);
                }
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the backend disconnected the ring",
                ));
            }
            if fds[0].revents & libc::POLLIN != 0 {
                eventfd_drain(self.notify.as_fd())?;
            }
        }
    }

    /// Copies the raw bytes of ring slot `idx` (tests look at what the backend wrote there).
    pub fn peek_slot(&self, idx: u32, out: &mut crate::ring::SlotCopy) {
        self.ring.peek(idx, out)
    }

    /// Whether the backend has dropped this ring (its socket end is closed).
    pub fn disconnected(&self) -> bool {
        let mut fds = [libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        }];
        matches!(poll_raw(&mut fds, 0), Ok(n) if n > 0)
            && fds[0].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::op;

    const INFO: DiskInfo = DiskInfo {
        sectors: 2048,
        sector_size: 512,
        read_only: false,
        flush: true,
        barrier: true,
        discard: true,
        max_segments: 11,
        max_indirect_segments: 0,
    };

    #[test]
    fn handshake_and_one_request() {
        let (a, b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || accept(b, &AttachLimits::default(), &INFO));
        let mut fe = LocalFrontend::attach(
            a,
            FrontendConfig {
                mem_pages: 4,
                ..Default::default()
            },
        )
        .unwrap();
        let mut be = t.join().unwrap().unwrap();
        assert_eq!(fe.info(), &INFO);
        assert_eq!(fe.ring_size(), 32);
        fe.write_mem(4096, b"hello");
        let seg = [Segment {
            gref: 1,
            first_sect: 0,
            last_sect: 7,
            pad: 0,
        }];
        assert!(fe.queue(&FrontRequest::Rw {
            op: op::WRITE,
            id: 9,
            sector: 0,
            segments: &seg
        }));
        fe.push().unwrap();
        be.evtchn.ack().unwrap();
        assert_eq!(be.ring.pending().unwrap(), 1);
        let mut addrs = [std::ptr::null_mut(); 1];
        let sg = |gref| Segment {
            gref,
            first_sect: 0,
            last_sect: 7,
            pad: 0,
        };
        be.grants.map(&[sg(1)], false, &mut addrs).unwrap();
        // SAFETY: the page is mapped by `be.grants`, which is alive.
        assert_eq!(unsafe { std::slice::from_raw_parts(addrs[0], 5) }, b"hello");
        assert_eq!(
            be.grants.map(&[sg(4)], false, &mut addrs),
            Err(Problem::BadGrant(4))
        );
        be.ring.put_response(&Response {
            id: 9,
            operation: op::WRITE,
            status: 0,
        });
        if be.ring.push_responses() {
            be.evtchn.notify().unwrap();
        }
        assert!(fe.wait(Some(Duration::from_secs(5))).unwrap());
        let mut got = vec![];
        fe.poll(|r| got.push(r));
        assert_eq!(
            got,
            vec![Response {
                id: 9,
                operation: op::WRITE,
                status: 0
            }]
        );
        drop(be);
        assert!(fe.wait(Some(Duration::from_secs(5))).is_err());
    }

    #[test]
    fn limits_are_enforced() {
        let (a, b) = UnixStream::pair().unwrap();
        let lim = AttachLimits {
            max_ring_order: 2,
            max_mem_pages: 8,
        };
        let t = std::thread::spawn(move || accept(b, &lim, &INFO));
        let r = LocalFrontend::attach(
            a,
            FrontendConfig {
                ring_order: 3,
                mem_pages: 4,
                ..Default::default()
            },
        );
        assert!(
            matches!(r, Err(crate::Error::Attach(AttachError::Refused(m))) if m.contains("ring order 3"))
        );
        assert!(t.join().unwrap().is_err());
    }

    #[test]
    fn unsealed_or_missing_descriptors_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || accept(b, &AttachLimits::default(), &INFO));
        let ev = new_eventfd().unwrap();
        let line = b"{\"version\":1,\"abi\":\"x86_64-abi\",\"ring_order\":0,\"mem_pages\":1}\n";
        send_line(&a, line, &[ev.as_raw_fd()]).unwrap();
        let err = t.join().unwrap().unwrap_err().to_string();
        assert!(err.contains("expected 4 descriptors"), "{err}");

        let (a, b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || accept(b, &AttachLimits::default(), &INFO));
        let f = new_eventfd().unwrap();
        send_line(
            &a,
            line,
            &[f.as_raw_fd(), f.as_raw_fd(), f.as_raw_fd(), f.as_raw_fd()],
        )
        .unwrap();
        let err = t.join().unwrap().unwrap_err().to_string();
        assert!(err.contains("sealed"), "{err}");

        let (a, b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || accept(b, &AttachLimits::default(), &INFO));
        (&a).write_all(b"not json\n").unwrap();
        assert!(t.join().unwrap().unwrap_err().to_string().contains("JSON"));
    }

    #[test]
    fn early_read_reports_never_block_on_a_peer_that_does_not_read() {
        let mem = new_sealed_memfd(c"mem", 4 * PAGE_SIZE as u64).unwrap();
        let ring = new_sealed_memfd(c"ring", PAGE_SIZE as u64).unwrap();
        let (k, n) = (new_eventfd().unwrap(), new_eventfd().unwrap());
        let (a, b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || accept(b, &AttachLimits::default(), &INFO));
        let line = b"{\"version\":1,\"abi\":\"x86_64-abi\",\"ring_order\":0,\"mem_pages\":4}\n";
        let fds = [
            mem.as_raw_fd(),
            ring.as_raw_fd(),
            k.as_raw_fd(),
            n.as_raw_fd(),
        ];
        send_line(&a, line, &fds).unwrap();
        let be = t.join().unwrap().unwrap();
        // `a` never reads again: the socket buffer fills, and then each report fails at once
        // (the ring thread logs it and goes on) instead of blocking the ring thread.
        let t0 = std::time::Instant::now();
        let mut sent = 0u64;
        let err = loop {
            match be.report_early_read_done(sent, true) {
                Ok(()) => sent += 1,
                Err(e) => break e,
            }
            assert!(sent < 10_000_000, "the buffer never filled");
        };
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
        assert!(sent > 0);
        for _ in 0..1000 {
            assert!(be.report_early_read_done(0, false).is_err());
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(5));
        drop(a);
    }

    /// Sends the attach line for one ring page and `claimed` pages of memory with `fds`, and
    /// returns why the backend refused it.
    fn refusal(claimed: u32, fds: &[RawFd]) -> String {
        let (a, b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || accept(b, &AttachLimits::default(), &INFO));
        let line = format!(
            "{{\"version\":1,\"abi\":\"x86_64-abi\",\"ring_order\":0,\"mem_pages\":{claimed}}}\n"
        );
        send_line(&a, line.as_bytes(), fds).unwrap();
        t.join().unwrap().unwrap_err().to_string()
    }

    #[test]
    fn short_memfds_and_foreign_event_descriptors_are_refused() {
        let mem = new_sealed_memfd(c"mem", 4 * PAGE_SIZE as u64).unwrap();
        let ring = new_sealed_memfd(c"ring", PAGE_SIZE as u64).unwrap();
        let short_ring = new_sealed_memfd(c"ring", 512).unwrap();
        let (k, n) = (new_eventfd().unwrap(), new_eventfd().unwrap());
        let (m, r) = (mem.as_raw_fd(), ring.as_raw_fd());
        let (k, n) = (k.as_raw_fd(), n.as_raw_fd());
        // Guest memory smaller than claimed: mapping it whole would fault (SIGBUS) on use.
        let err = refusal(5, &[m, r, k, n]);
        assert!(err.contains("smaller than mem_pages"), "{err}");
        let err = refusal(4, &[m, short_ring.as_raw_fd(), k, n]);
        assert!(err.contains("ring memfd is smaller"), "{err}");
        // A memfd, a pipe or a socket where an eventfd belongs.
        let (pr, _pw) = nix::unistd::pipe().unwrap();
        let (sa, _sb) = UnixStream::pair().unwrap();
        for (fds, what) in [
            ([m, r, m, n], "kick"),
            ([m, r, k, pr.as_raw_fd()], "notify"),
            ([m, r, sa.as_raw_fd(), n], "kick"),
        ] {
            let err = refusal(4, &fds);
            assert!(
                err.contains(&format!("the {what} descriptor is not an eventfd")),
                "{err}"
            );
        }
        // The same descriptors, right, attach.
        let (a, b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || accept(b, &AttachLimits::default(), &INFO));
        let line = b"{\"version\":1,\"abi\":\"x86_64-abi\",\"ring_order\":0,\"mem_pages\":4}\n";
        send_line(&a, line, &[m, r, k, n]).unwrap();
        assert!(t.join().unwrap().is_ok());
    }
}
