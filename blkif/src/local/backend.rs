//! The backend side of the local transport: checking and accepting a frontend's attach, and the
//! ring, grants and event channel the ring loop drives.

use std::io::{self};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::mmap::Mapping;
use crate::protocol::{Abi, Segment, PAGE_SIZE};
use crate::request::{DiskInfo, Problem};
use crate::ring::BackRing;
use crate::transport::{EventChannel, GrantMapper, MapHandle, Memory};

use nix::sys::socket::MsgFlags;

use super::{
    check_eventfd, check_sealed, eventfd_drain, eventfd_signal, fd_size, proto, recv_line,
    send_line, AttachError, AttachLimits, AttachReply, AttachRequest, EarlyReadPort,
    EARLY_READ_DONE, EARLY_READ_FAILED, VERSION,
};

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

    /// The first page of guest memory (page `g` is grant `g`).
    pub fn base(&self) -> *mut u8 {
        self.mem.ptr().as_ptr()
    }

    fn check(&self, segs: &[Segment]) -> Result<(), Problem> {
        match segs.iter().find(|s| s.gref >= self.pages) {
            Some(s) => Err(Problem::BadGrant(s.gref)),
            None => Ok(()),
        }
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

    fn queue(&mut self, segs: &[Segment], _writable: bool) -> Result<MapHandle, Problem> {
        self.check(segs)?;
        Ok(MapHandle(0))
    }

    fn map_queued(&mut self) {}

    fn addrs(
        &mut self,
        _handle: MapHandle,
        segs: &[Segment],
        addrs: &mut [*mut u8],
    ) -> Result<(), Problem> {
        self.map(segs, true, addrs).map(|_| ())
    }

    fn memory(&self, _handle: MapHandle) -> Memory {
        Memory::Stable
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

impl LocalEvtchn {
    /// The eventfd we signal to notify the frontend (8-byte writes of a count; nonblocking).
    /// Its kick descriptor is [`EventChannel::fd`] (8-byte reads drain it).
    pub fn notify_fd(&self) -> RawFd {
        self.notify.as_raw_fd()
    }
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
