//! The event loop of one ring: blkif requests in, io_uring IO, blkif responses out.
//!
//! One thread per ring runs [`RingLoop::run`]. Everything it waits for is an io_uring
//! completion: the event channel and the control eventfd are multishot polls, the frontend's
//! socket a one-shot poll for hang-up, and the IO itself readv/writev/fsync/fallocate. One
//! `io_uring_enter` per iteration submits new IO and waits.
//!
//! Per request: copy the slot out of the ring once, validate it ([`blkif::request::parse`]),
//! map its grants, point an iovec array at the frontend's pages and submit one readv or writev
//! (no bounce buffer). Slots, iovecs and the in-flight id set are preallocated per ring; the
//! path takes no lock and allocates nothing.
//!
//! Ordering: requests run concurrently, as blkif allows. A FLUSH_DISKCACHE or WRITE_BARRIER
//! stops the intake until every earlier request completed, then writes its data (if any), then
//! `fdatasync`s, then answers, and only then does the intake resume: a flush is acknowledged
//! only when everything acknowledged before it is durable.
//!
//! A frontend that publishes more requests than the ring holds, or reuses an id still in
//! flight, is broken: its ring is disconnected once the IO already started completes. The
//! process and its other rings carry on.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use blkif::protocol::{status, Response, Segment, MAX_SEGMENTS_PER_REQUEST, SECTOR_SIZE};
use blkif::request::{parse, slot_id, DiskInfo, Operation, Problem, Request};
use blkif::ring::{BackRing, SlotCopy};
use blkif::transport::{EventChannel, GrantMapper, MapHandle};
use blkif::Abi;
use io_uring::{opcode, squeue, types, IoUring};
use slog::{debug, info, warn, Logger};

use crate::idset::IdSet;
use crate::image::{discard_fd, AioImage};
use crate::logging::RateLimit;
use crate::stats::RingStats;
use crate::vbd::{RingControl, VbdShared};

const TOKEN_EVTCHN: u64 = u64::MAX;
const TOKEN_CTL: u64 = u64::MAX - 1;
const TOKEN_HANGUP: u64 = u64::MAX - 2;
const MAX_RETRIES: u8 = 16;

/// A ring as a transport hands it over: the back ring, grant mapper and event channel.
pub trait RingTransport: Send + 'static {
    /// Grant mapper.
    type Grants: GrantMapper;
    /// Event channel.
    type Evtchn: EventChannel;
    /// Disjoint borrows of the parts the loop drives.
    fn parts(&mut self) -> (&mut BackRing, &mut Self::Grants, &Self::Evtchn);
    /// The frontend's ABI.
    fn abi(&self) -> Abi;
    /// A descriptor that polls readable or hung-up when the frontend is gone, if any.
    fn hangup_fd(&self) -> Option<RawFd>;
}

impl RingTransport for blkif::local::LocalBackend {
    type Grants = blkif::local::LocalGrants;
    type Evtchn = blkif::local::LocalEvtchn;
    fn parts(&mut self) -> (&mut BackRing, &mut Self::Grants, &Self::Evtchn) {
        (&mut self.ring, &mut self.grants, &self.evtchn)
    }
    fn abi(&self) -> Abi {
        self.abi
    }
    fn hangup_fd(&self) -> Option<RawFd> {
        Some(self.sock.as_raw_fd())
    }
}

/// Why a ring loop ended.
#[derive(Debug)]
pub enum RingExit {
    /// The frontend closed its end.
    FrontendGone,
    /// The frontend broke the protocol and was disconnected.
    Broken(String),
    /// The VBD asked the ring to stop.
    Stopped,
    /// io_uring failed; the ring cannot continue.
    Fatal(io::Error),
}

impl std::fmt::Display for RingExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RingExit::FrontendGone => f.write_str("frontend gone"),
            RingExit::Broken(why) => write!(f, "frontend broke the protocol: {why}"),
            RingExit::Stopped => f.write_str("stopped"),
            RingExit::Fatal(e) => write!(f, "IO engine failed: {e}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Free.
    Idle,
    /// A flush or barrier waiting for earlier requests to complete.
    Draining,
    /// readv/writev in flight.
    Data,
    /// fdatasync in flight.
    Sync,
    /// fallocate (discard) in flight.
    Discard,
}

struct Slot {
    req: Request,
    segs: [Segment; MAX_SEGMENTS_PER_REQUEST],
    iov: [libc::iovec; MAX_SEGMENTS_PER_REQUEST],
    /// First iovec not yet fully transferred (short IO resumes there).
    iov_start: usize,
    offset: u64,
    remaining: u64,
    map: MapHandle,
    start: Instant,
    phase: Phase,
    retries: u8,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            req: Request {
                id: 0,
                raw_op: 0,
                op: Operation::Read,
                sector: 0,
                nr_sectors: 0,
                nr_segments: 0,
            },
            segs: [Segment::default(); MAX_SEGMENTS_PER_REQUEST],
            iov: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; MAX_SEGMENTS_PER_REQUEST],
            iov_start: 0,
            offset: 0,
            remaining: 0,
            map: MapHandle::default(),
            start: Instant::now(),
            phase: Phase::Idle,
            retries: 0,
        }
    }

    /// Skips `done` bytes of the iovecs after a short transfer.
    fn advance(&mut self, mut done: u64) {
        self.offset += done;
        self.remaining -= done;
        while done > 0 {
            let v = &mut self.iov[self.iov_start];
            let l = v.iov_len as u64;
            if done >= l {
                done -= l;
                self.iov_start += 1;
            } else {
                // SAFETY: `done < iov_len`, so the new base stays inside the same mapped page.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(done as usize) }.cast();
                v.iov_len -= done as usize;
                done = 0;
            }
        }
    }
}

/// One ring's loop. Build it on the thread that runs it (it holds raw pointers).
pub struct RingLoop<T: RingTransport> {
    t: T,
    abi: Abi,
    disk: DiskInfo,
    image: Arc<AioImage>,
    uring: IoUring,
    slots: Box<[Slot]>,
    free: Vec<u32>,
    ids: IdSet,
    in_flight: u32,
    /// The flush or barrier holding the intake, if any.
    draining: Option<u32>,
    paused: bool,
    stopping: Option<RingExit>,
    vbd: Arc<VbdShared>,
    ctl: Arc<RingControl>,
    stats: Arc<RingStats>,
    log: Logger,
    guest_errors: RateLimit,
    copy: SlotCopy,
    poll: std::time::Duration,
    /// An event was consumed and its channel still waits for its EOI (see `EventChannel::eoi`).
    eoi_due: bool,
}

fn new_uring(entries: u32) -> io::Result<IoUring> {
    // Single issuer + deferred task running: completions are processed when we enter the
    // kernel, never by interrupting us (kernel 6.1+); fall back to a plain ring.
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_cqsize(entries * 2)
        .build(entries)
        .or_else(|_| IoUring::builder().setup_cqsize(entries * 2).build(entries))
}

/// Fixed-file slot of the O_DIRECT descriptor (the buffered one if the image has none).
const FILE_DIRECT: u32 = 0;
/// Fixed-file slot of the buffered descriptor.
const FILE_BUFFERED: u32 = 1;

/// Registers the image's descriptors as io_uring fixed files: no fd lookup and reference count
/// per IO in this multi-threaded process.
fn register_image(uring: &IoUring, image: &AioImage, update: bool) -> io::Result<()> {
    let b = image.buffered_fd();
    let fds = [image.direct_fd().map(|(fd, _)| fd).unwrap_or(b), b];
    if update {
        uring.submitter().register_files_update(0, &fds).map(|_| ())
    } else {
        uring.submitter().register_files(&fds)
    }
}

impl<T: RingTransport> RingLoop<T> {
    /// Prepares a loop for `t`, serving the VBD's current image.
    pub fn new(
        t: T,
        disk: DiskInfo,
        vbd: Arc<VbdShared>,
        ctl: Arc<RingControl>,
        stats: Arc<RingStats>,
        log: Logger,
    ) -> io::Result<RingLoop<T>> {
        let mut t = t;
        let abi = t.abi();
        let n = t.parts().0.size();
        let entries = (n + 8).next_power_of_two().min(4096);
        let uring = new_uring(entries)?;
        let image = vbd.image();
        register_image(&uring, &image, false)?;
        Ok(RingLoop {
            t,
            abi,
            disk,
            image,
            uring,
            slots: (0..n).map(|_| Slot::new()).collect(),
            free: (0..n).rev().collect(),
            ids: IdSet::new(n as usize),
            in_flight: 0,
            draining: None,
            paused: false,
            stopping: None,
            vbd,
            ctl,
            stats,
            log,
            guest_errors: RateLimit::new(10, std::time::Duration::from_secs(5)),
            copy: SlotCopy::default(),
            poll: std::time::Duration::ZERO,
            eoi_due: true,
        })
    }

    /// Polls the ring for up to `poll` before sleeping (see `VbdOptions::poll_us`).
    pub fn with_poll(mut self, poll: std::time::Duration) -> Self {
        self.poll = poll;
        self
    }

    fn push_sqe(&mut self, e: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every entry we build points at memory that outlives the operation: the
            // iovec arrays live in `self.slots` (never reallocated), the pages they point at
            // stay mapped until the slot completes, and fds stay open while `self` lives.
            if unsafe { self.uring.submission().push(e) }.is_ok() {
                return Ok(());
            }
            // A full submission queue: hand what is queued to the kernel and retry.
            self.uring.submit()?;
        }
    }

    fn arm_polls(&mut self) -> io::Result<()> {
        let ev = self.t.parts().2.fd();
        let multi = |fd: RawFd, tok: u64| {
            opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
                .multi(true)
                .build()
                .user_data(tok)
        };
        self.push_sqe(&multi(ev, TOKEN_EVTCHN))?;
        self.push_sqe(&multi(self.ctl.wake_fd(), TOKEN_CTL))?;
        if let Some(fd) = self.t.hangup_fd() {
            let e = opcode::PollAdd::new(types::Fd(fd), (libc::POLLIN | libc::POLLRDHUP) as u32)
                .build()
                .user_data(TOKEN_HANGUP);
            self.push_sqe(&e)?;
        }
        Ok(())
    }

    /// Runs until the frontend goes away, breaks the protocol, or the VBD stops the ring.
    pub fn run(mut self) -> RingExit {
        match self.run_inner() {
            Ok(()) => self.stopping.take().unwrap_or(RingExit::Stopped),
            Err(e) => {
                // Never leave IO in flight that points into memory we are about to unmap.
                self.drain_all();
                RingExit::Fatal(e)
            }
        }
    }

    fn run_inner(&mut self) -> io::Result<()> {
        self.arm_polls()?;
        self.t.parts().2.ack()?;
        loop {
            self.check_control();
            if self.stopping.is_some() && self.in_flight == 0 {
                self.publish()?;
                return Ok(());
            }
            let mut more = false;
            if self.can_pop() {
                more = self.take_requests();
            }
            self.publish()?;
            let mut wait = !more;
            if wait && self.can_pop() && self.in_flight == 0 && !self.poll.is_zero() {
                // Busy-poll before re-arming req_event: a frontend that publishes within the
                // window needs neither a kick nor a wake-up.
                wait = !self.poll_ring();
            }
            if wait && self.can_pop() {
                // About to sleep: re-arm req_event and look once more.
                match self.t.parts().0.final_check() {
                    Ok(0) => {}
                    Ok(_) => wait = false,
                    Err(e) => self.broken(e.to_string()),
                }
            }
            if self.stopping.is_some() && self.in_flight == 0 {
                continue;
            }
            if wait && self.eoi_due {
                // Drained and req_event re-armed: only now let the frontend's next kick in.
                self.eoi_due = false;
                self.t.parts().2.eoi()?;
            }
            if wait && self.paused && self.in_flight == 0 {
                self.ctl.quiesced.store(true, Ordering::Release);
            }
            match self.uring.submit_and_wait(usize::from(wait)) {
                Ok(n) => {
                    if n > 0 {
                        self.stats.submits.add(1);
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(e),
            }
            self.reap()?;
        }
    }

    /// Spins until the ring has requests (true), or the poll window or a control event ends.
    fn poll_ring(&mut self) -> bool {
        let start = Instant::now();
        loop {
            match self.t.parts().0.pending() {
                Ok(0) => {}
                Ok(_) | Err(_) => return true,
            }
            if start.elapsed() >= self.poll || self.ctl.stop.load(Ordering::Relaxed) {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    fn can_pop(&self) -> bool {
        self.stopping.is_none() && !self.paused && self.draining.is_none() && !self.free.is_empty()
    }

    fn check_control(&mut self) {
        if self.ctl.stop.load(Ordering::Acquire) && self.stopping.is_none() {
            self.stopping = Some(RingExit::Stopped);
        }
        let paused = self.vbd.paused.load(Ordering::Acquire);
        if paused != self.paused {
            self.paused = paused;
            if !paused {
                // The image may have been replaced while we were paused.
                let image = self.vbd.image();
                if !Arc::ptr_eq(&image, &self.image) {
                    if let Err(e) = register_image(&self.uring, &image, true) {
                        warn!(self.log, "cannot switch to the new image"; "error" => %e);
                        self.stopping = Some(RingExit::Fatal(e));
                    }
                    self.image = image;
                }
                self.ctl.quiesced.store(false, Ordering::Release);
            }
        }
    }

    /// Pops and starts requests. Returns true if more are waiting (we stopped early).
    fn take_requests(&mut self) -> bool {
        let pending = match self.t.parts().0.pending() {
            Ok(n) => n,
            Err(e) => {
                self.broken(e.to_string());
                return false;
            }
        };
        let mut left = pending;
        while left > 0 && self.can_pop() {
            let mut copy = std::mem::take(&mut self.copy);
            self.t.parts().0.pop(&mut copy);
            left -= 1;
            let r = self.start(&copy);
            self.copy = copy;
            if let Err(e) = r {
                // io_uring refused work: fatal for the ring; surfaced by the next enter.
                warn!(self.log, "cannot submit IO"; "error" => %e);
                self.stopping = Some(RingExit::Fatal(e));
            }
        }
        left > 0 && self.can_pop()
    }

    fn respond(&mut self, id: u64, op: u8, st: i16) {
        self.t.parts().0.put_response(&Response {
            id,
            operation: op,
            status: st,
        });
    }

    fn guest_error(&mut self, what: &str, id: u64, problem: &dyn std::fmt::Display) {
        if let Some(suppressed) = self.guest_errors.check() {
            info!(self.log, "refused a request"; "why" => %problem, "kind" => what, "id" => id,
                  "suppressed" => suppressed);
        }
    }

    fn start(&mut self, copy: &SlotCopy) -> io::Result<()> {
        let (id, raw_op) = slot_id(copy, self.abi);
        if self.ids.contains(id) {
            self.broken(format!("frontend reused id {id:#x} while it was in flight"));
            return Ok(());
        }
        let Some(s) = self.free.pop() else {
            // Cannot happen: pending() bounds outstanding requests by the ring size.
            self.broken("more requests outstanding than the ring holds".into());
            return Ok(());
        };
        let slot = &mut self.slots[s as usize];
        let req = match parse(copy, self.abi, &self.disk, &mut slot.segs) {
            Ok(r) => r,
            Err(rej) => {
                self.free.push(s);
                if rej.problem.status() == status::EOPNOTSUPP {
                    self.stats.unsupported.add(1);
                } else {
                    self.stats.bad_requests.add(1);
                }
                self.respond(rej.id, rej.raw_op, rej.problem.status());
                self.guest_error("invalid", rej.id, &rej.problem);
                return Ok(());
            }
        };
        // Map the grants and point the iovecs at the pages.
        let n = req.nr_segments;
        if n > 0 {
            let mut addrs = [std::ptr::null_mut::<u8>(); MAX_SEGMENTS_PER_REQUEST];
            let writable = req.op == Operation::Read;
            let (_, grants, _) = self.t.parts();
            match grants.map(&slot.segs[..n], writable, &mut addrs[..n]) {
                Ok(h) => {
                    let slot = &mut self.slots[s as usize];
                    slot.map = h;
                    for ((iov, sg), addr) in slot.iov.iter_mut().zip(&slot.segs[..n]).zip(addrs) {
                        let first = sg.first_sect as usize * SECTOR_SIZE as usize;
                        let len =
                            (sg.last_sect - sg.first_sect + 1) as usize * SECTOR_SIZE as usize;
                        // SAFETY: `first + len <= 4096` (a validated segment), so the pointer
                        // stays inside the mapped page.
                        let base = unsafe { addr.add(first) };
                        *iov = libc::iovec {
                            iov_base: base.cast(),
                            iov_len: len,
                        };
                    }
                }
                Err(problem) => {
                    self.free.push(s);
                    self.stats.bad_requests.add(1);
                    self.respond(id, raw_op, problem.status());
                    self.guest_error("grant", id, &problem);
                    return Ok(());
                }
            }
        }
        self.ids.insert(id);
        self.in_flight += 1;
        self.stats.in_flight.add(1);
        let slot = &mut self.slots[s as usize];
        slot.req = req;
        slot.iov_start = 0;
        slot.offset = req.sector * SECTOR_SIZE;
        slot.remaining = req.nr_sectors * SECTOR_SIZE;
        slot.start = Instant::now();
        slot.retries = 0;
        match req.op {
            Operation::Read | Operation::Write => self.submit_data(s),
            Operation::Discard { .. } => self.submit_discard(s),
            Operation::Flush | Operation::Barrier => {
                self.slots[s as usize].phase = Phase::Draining;
                self.draining = Some(s);
                self.maybe_release_drain()
            }
        }
    }

    /// Starts the draining flush/barrier once it is the only request in flight.
    fn maybe_release_drain(&mut self) -> io::Result<()> {
        if let Some(d) = self.draining {
            if self.in_flight == 1 && self.slots[d as usize].phase == Phase::Draining {
                if self.slots[d as usize].req.nr_segments > 0 {
                    self.submit_data(d)?;
                } else {
                    self.submit_sync(d)?;
                }
            }
        }
        Ok(())
    }

    fn choose_fd(&self, s: u32) -> types::Fixed {
        let slot = &self.slots[s as usize];
        if let Some((_, align)) = self.image.direct_fd() {
            let a = align as u64;
            let aligned = slot.offset % a == 0
                && slot.iov[slot.iov_start..slot.req.nr_segments]
                    .iter()
                    .all(|v| v.iov_base as u64 % a == 0 && v.iov_len as u64 % a == 0);
            if aligned {
                return types::Fixed(FILE_DIRECT);
            }
        }
        types::Fixed(FILE_BUFFERED)
    }

    fn submit_data(&mut self, s: u32) -> io::Result<()> {
        let fd = self.choose_fd(s);
        let slot = &mut self.slots[s as usize];
        slot.phase = Phase::Data;
        let iov = slot.iov[slot.iov_start..].as_ptr();
        let cnt = (slot.req.nr_segments - slot.iov_start) as u32;
        let e = if slot.req.op == Operation::Read {
            opcode::Readv::new(fd, iov, cnt).offset(slot.offset).build()
        } else {
            opcode::Writev::new(fd, iov, cnt)
                .offset(slot.offset)
                .build()
        };
        self.push_sqe(&e.user_data(u64::from(s)))
    }

    fn submit_sync(&mut self, s: u32) -> io::Result<()> {
        self.slots[s as usize].phase = Phase::Sync;
        let e = opcode::Fsync::new(types::Fixed(FILE_BUFFERED))
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(u64::from(s));
        self.push_sqe(&e)
    }

    fn submit_discard(&mut self, s: u32) -> io::Result<()> {
        let slot = &mut self.slots[s as usize];
        slot.phase = Phase::Discard;
        if self.image.is_block_device() {
            // io_uring has no portable discard for block devices before kernel 6.12: issue
            // BLKDISCARD here. Discards are rare and the ioctl returns once queued.
            let secure = matches!(slot.req.op, Operation::Discard { secure: true });
            let (off, len) = (slot.offset, slot.remaining);
            let r = discard_fd(self.image.buffered_fd(), true, off, len, secure);
            return match r {
                Ok(()) => self.complete(s, status::OKAY),
                Err(e) => {
                    self.stats.io_errors.add(1);
                    warn!(self.log, "discard failed"; "error" => %e, "sector" => off / SECTOR_SIZE);
                    self.complete(s, status::ERROR)
                }
            };
        }
        let e = opcode::Fallocate::new(types::Fixed(FILE_BUFFERED), slot.remaining)
            .offset(slot.offset)
            .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
            .build()
            .user_data(u64::from(s));
        self.push_sqe(&e)
    }

    fn reap(&mut self) -> io::Result<()> {
        loop {
            let Some(cqe) = self.uring.completion().next() else {
                return Ok(());
            };
            let (tok, res, more) = (
                cqe.user_data(),
                cqe.result(),
                io_uring::cqueue::more(cqe.flags()),
            );
            match tok {
                TOKEN_EVTCHN => {
                    self.t.parts().2.ack()?;
                    self.eoi_due = true;
                    if !more {
                        let fd = self.t.parts().2.fd();
                        let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
                            .multi(true)
                            .build()
                            .user_data(TOKEN_EVTCHN);
                        self.push_sqe(&e)?;
                    }
                }
                TOKEN_CTL => {
                    self.ctl.ack();
                    if !more {
                        let e = opcode::PollAdd::new(
                            types::Fd(self.ctl.wake_fd()),
                            libc::POLLIN as u32,
                        )
                        .multi(true)
                        .build()
                        .user_data(TOKEN_CTL);
                        self.push_sqe(&e)?;
                    }
                }
                TOKEN_HANGUP => {
                    if self.stopping.is_none() {
                        self.stopping = Some(RingExit::FrontendGone);
                    }
                }
                s if (s as usize) < self.slots.len() => self.io_done(s as u32, res)?,
                other => debug!(self.log, "unexpected completion"; "token" => other),
            }
        }
    }

    fn io_done(&mut self, s: u32, res: i32) -> io::Result<()> {
        let phase = self.slots[s as usize].phase;
        if res == -libc::EAGAIN || res == -libc::EINTR {
            let slot = &mut self.slots[s as usize];
            if slot.retries < MAX_RETRIES {
                slot.retries += 1;
                return match phase {
                    Phase::Data => self.submit_data(s),
                    Phase::Sync => self.submit_sync(s),
                    _ => self.submit_discard(s),
                };
            }
        }
        if res < 0 {
            self.stats.io_errors.add(1);
            let e = io::Error::from_raw_os_error(-res);
            warn!(self.log, "IO failed"; "error" => %e, "sector" => self.slots[s as usize].req.sector);
            return self.complete(s, status::ERROR);
        }
        match phase {
            Phase::Data => {
                let done = res as u64;
                let slot = &mut self.slots[s as usize];
                if done < slot.remaining {
                    if done == 0 {
                        // End of file inside the validated range: the image shrank under us.
                        self.stats.io_errors.add(1);
                        return self.complete(s, status::ERROR);
                    }
                    slot.advance(done);
                    return self.submit_data(s);
                }
                if matches!(slot.req.op, Operation::Flush | Operation::Barrier) {
                    self.submit_sync(s)
                } else {
                    self.complete(s, status::OKAY)
                }
            }
            Phase::Sync | Phase::Discard => self.complete(s, status::OKAY),
            Phase::Idle | Phase::Draining => Ok(()),
        }
    }

    fn complete(&mut self, s: u32, st: i16) -> io::Result<()> {
        let slot = &mut self.slots[s as usize];
        slot.phase = Phase::Idle;
        let req = slot.req;
        let (map, start) = (slot.map, slot.start);
        let mut st = st;
        // Unmap before answering: a copying transport copies read data back here.
        if req.nr_segments > 0 {
            if let Err(p) = self.t.parts().1.unmap(map) {
                self.guest_error("unmap", req.id, &p);
                st = status::ERROR;
            }
        }
        self.respond(req.id, req.raw_op, st);
        self.ids.remove(req.id);
        let c = match req.op {
            Operation::Read => &self.stats.read,
            Operation::Write => &self.stats.write,
            Operation::Flush | Operation::Barrier => &self.stats.flush,
            Operation::Discard { .. } => &self.stats.discard,
        };
        c.requests.add(1);
        c.sectors.add(req.nr_sectors);
        if st != status::OKAY {
            c.errors.add(1);
        }
        self.stats.latency.record(start.elapsed().as_nanos() as u64);
        self.in_flight -= 1;
        self.stats.in_flight.sub(1);
        self.free.push(s);
        if self.draining == Some(s) {
            self.draining = None;
        }
        self.maybe_release_drain()
    }

    fn publish(&mut self) -> io::Result<()> {
        let (ring, _, ev) = self.t.parts();
        if ring.push_responses() {
            ev.notify()?;
            self.stats.notifies.add(1);
        }
        Ok(())
    }

    fn broken(&mut self, why: String) {
        if self.stopping.is_none() {
            warn!(self.log, "disconnecting a broken frontend"; "why" => &why);
            self.stopping = Some(RingExit::Broken(why));
        }
    }

    /// Waits for every IO in flight (used on fatal errors only).
    fn drain_all(&mut self) {
        let mut spins = 0;
        while self.in_flight > 0 && spins < 10_000 {
            spins += 1;
            if self.uring.submit_and_wait(1).is_err() {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            while let Some(cqe) = self.uring.completion().next() {
                let s = cqe.user_data();
                if (s as usize) < self.slots.len() && self.slots[s as usize].phase != Phase::Idle {
                    self.slots[s as usize].phase = Phase::Idle;
                    self.in_flight -= 1;
                    self.stats.in_flight.sub(1);
                }
            }
        }
    }
}

/// For the loop's own error paths.
impl From<Problem> for RingExit {
    fn from(p: Problem) -> Self {
        RingExit::Broken(p.to_string())
    }
}
