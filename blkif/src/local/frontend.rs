//! The frontend side of the local transport: what tests, benchmarks, fuzzers and the NBD export
//! drive tapdisk with.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::ptr::NonNull;
use std::time::Duration;

use crate::mmap::Mapping;
use crate::protocol::SEGMENTS_PER_INDIRECT_FRAME;
use crate::protocol::{Abi, GrantRef, Response, Segment, MAX_SLOT, PAGE_SIZE};
use crate::request::{encode, encode_discard, encode_indirect, encode_indirect_page, DiskInfo};
use crate::ring::FrontRing;

use super::{
    eventfd_drain, eventfd_signal, new_eventfd, new_sealed_memfd, poll_raw, proto, recv_line,
    send_line, AttachError, AttachReply, AttachRequest, EarlyReadAttach, STATUS_EARLY, VERSION,
};

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
