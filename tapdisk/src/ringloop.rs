//! The event loop of one ring: blkif requests in, scheduled backend IO, blkif responses out.
//!
//! One thread per ring runs [`RingLoop::run`]. Everything it waits for is an io_uring
//! completion: the event channel and the control eventfd are multishot polls, the frontend's
//! socket a one-shot poll for hang-up, a batch timer, and the IO itself (through the
//! [`Engine`]). One `io_uring_enter` per iteration submits new IO and waits.
//!
//! Per request: copy the slot out of the ring once, validate it ([`blkif::request::parse`]; an
//! indirect request's descriptor pages are mapped read-only, copied once, unmapped and
//! validated the same way), map its grants, point iovecs at the frontend's pages, and hand it
//! to the [`Sched`]uler, which orders, sorts and merges before the engine sees anything. Slots,
//! iovecs, the id set and every scratch list are preallocated per ring: the path takes no lock
//! and allocates nothing.
//!
//! A frontend that publishes more requests than the ring holds, or reuses an id still in
//! flight, is broken: its ring is disconnected once the IO already started completes. The
//! process and its other rings carry on.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use blkif::protocol::{status, Response, Segment, MAX_INDIRECT_PAGES_PER_REQUEST};
use blkif::request::{
    copy_indirect_segments, finish_indirect, parse, slot_id, DiskInfo, Operation, Parsed, Problem,
    Rejection, Request,
};
use blkif::ring::{BackRing, SlotCopy};
use blkif::transport::{EventChannel, GrantMapper};
use blkif::Abi;
use io_uring::{opcode, types};
use slog::{debug, info, warn, Logger};

use crate::engine::aio::AioEngine;
use crate::engine::model::{ModelDisk, ModelParams};
use crate::engine::{Done, Engine, Uring, ENGINE_SPACE};
use crate::idset::IdSet;
use crate::image::AioImage;
use crate::logging::RateLimit;
use crate::sched::{Sched, SchedConfig};
use crate::stats::RingStats;
use crate::trace::{now_ns, BatchRecord, ReqRecord, TraceWriter};
use crate::vbd::{RingControl, VbdShared};

const TOKEN_EVTCHN: u64 = u64::MAX;
const TOKEN_CTL: u64 = u64::MAX - 1;
const TOKEN_HANGUP: u64 = u64::MAX - 2;
const TOKEN_BATCH: u64 = u64::MAX - 3;

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

/// Per-ring settings, from the VBD's options.
#[derive(Clone, Copy, Debug, Default)]
pub struct RingConfig {
    /// Sorting and merging.
    pub sched: SchedConfig,
    /// Requests taken from the ring per batch (0: the ring size).
    pub max_batch: u32,
    /// Wait up to this long for a batch to fill before dispatching it (0: never wait).
    pub batch_wait: Duration,
    /// Poll the ring this long before sleeping (0: never).
    pub poll: Duration,
    /// Serve through the thesis's disk model.
    pub model: Option<ModelParams>,
}

/// What a ring loop shares with its VBD.
pub struct RingEnv {
    /// The VBD's shared state (image, pause flag).
    pub vbd: Arc<VbdShared>,
    /// Stop and wake-up from the VBD.
    pub ctl: Arc<RingControl>,
    /// Where the loop counts.
    pub stats: Arc<RingStats>,
    /// Where the loop records requests, if tracing.
    pub trace: Option<TraceWriter>,
    /// The ring's logger.
    pub log: Logger,
}

/// Builds the engine for `image` on `ring`.
pub fn make_engine(
    ring: &mut Uring,
    image: Arc<AioImage>,
    model: Option<ModelParams>,
    tags: u32,
    update: bool,
) -> io::Result<Box<dyn Engine>> {
    let aio: Box<dyn Engine> = Box::new(AioEngine::new(ring, image, tags, update)?);
    Ok(match model {
        Some(p) => Box::new(ModelDisk::new(aio, p, tags)),
        None => aio,
    })
}

/// One ring's loop. Build it on the thread that runs it (it holds raw pointers).
pub struct RingLoop<T: RingTransport> {
    t: T,
    abi: Abi,
    disk: DiskInfo,
    cfg: RingConfig,
    image: Arc<AioImage>,
    uring: Uring,
    engine: Box<dyn Engine>,
    sched: Sched,
    free: Vec<u32>,
    ids: IdSet,
    /// Requests accepted and not yet answered.
    in_flight: u32,
    paused: bool,
    stopping: Option<RingExit>,
    vbd: Arc<VbdShared>,
    ctl: Arc<RingControl>,
    stats: Arc<RingStats>,
    log: Logger,
    guest_errors: RateLimit,
    copy: SlotCopy,
    /// An event was consumed and its channel still waits for its EOI (see `EventChannel::eoi`).
    eoi_due: bool,
    trace: Option<TraceWriter>,
    max_batch: u32,
    batch_deadline: Option<u64>,
    batch_timer: bool,
    batch_ts: Box<types::Timespec>,
    // Scratch, preallocated.
    addrs: Box<[*mut u8]>,
    done: Done,
    finished: Vec<u32>,
}

impl<T: RingTransport> RingLoop<T> {
    /// Prepares a loop for `t`, serving the VBD's current image.
    pub fn new(t: T, disk: DiskInfo, cfg: RingConfig, env: RingEnv) -> io::Result<RingLoop<T>> {
        let RingEnv {
            vbd,
            ctl,
            stats,
            trace,
            log,
        } = env;
        let mut t = t;
        let abi = t.abi();
        let n = t.parts().0.size();
        let seg_cap = disk.segment_capacity();
        let mut sched = Sched::new(cfg.sched, n, seg_cap);
        let tags = sched.tags();
        // Room for every engine op (model timers included) and the loop's own polls.
        let entries = (tags * 2 + 8).next_power_of_two().min(32768);
        let mut uring = Uring::new(entries)?;
        let image = vbd.image();
        let engine = make_engine(&mut uring, image.clone(), cfg.model, tags, false)?;
        sched.set_engine_limit(engine.max_in_flight());
        let max_batch = if cfg.max_batch == 0 {
            n
        } else {
            cfg.max_batch.min(n)
        };
        Ok(RingLoop {
            t,
            abi,
            disk,
            cfg,
            image,
            uring,
            engine,
            sched,
            free: (0..n).rev().collect(),
            ids: IdSet::new(n as usize),
            in_flight: 0,
            paused: false,
            stopping: None,
            vbd,
            ctl,
            stats,
            log,
            guest_errors: RateLimit::new(10, Duration::from_secs(5)),
            copy: SlotCopy::default(),
            eoi_due: true,
            trace,
            max_batch,
            batch_deadline: None,
            batch_timer: false,
            batch_ts: Box::new(types::Timespec::new()),
            addrs: vec![std::ptr::null_mut(); seg_cap].into_boxed_slice(),
            done: Done::with_capacity(tags as usize),
            finished: Vec::with_capacity(n as usize),
        })
    }

    fn push_sqe(&mut self, e: &io_uring::squeue::Entry) -> io::Result<()> {
        // SAFETY: the loop's own entries are polls on descriptors that stay open while the
        // loop lives, and a timeout whose timespec lives in `self.batch_ts` (unchanged until
        // the next submit, which happens before it is rewritten).
        unsafe { self.uring.push(e) }
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
            self.check_control()?;
            if self.stopping.is_some() && self.in_flight == 0 {
                self.publish()?;
                return Ok(());
            }
            let mut more = false;
            if self.can_pop() {
                more = self.take_requests();
            }
            self.dispatch()?;
            self.answer();
            self.publish()?;
            let mut wait = !more;
            if wait && self.can_pop() && self.in_flight == 0 && !self.cfg.poll.is_zero() {
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
            if wait && self.eoi_due && self.can_pop() {
                // Drained and req_event re-armed: only now let the frontend's next kick in.
                // While we cannot take requests (paused, draining, no free slot) the channel
                // stays masked, so a frontend kicking in a loop cannot keep waking us.
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
            self.answer();
        }
    }

    /// Spins until the ring has requests (true), or the poll window or a control event ends.
    fn poll_ring(&mut self) -> bool {
        let start = std::time::Instant::now();
        loop {
            match self.t.parts().0.pending() {
                Ok(0) => {}
                Ok(_) | Err(_) => return true,
            }
            if start.elapsed() >= self.cfg.poll || self.ctl.stop.load(Ordering::Relaxed) {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    fn can_pop(&self) -> bool {
        self.stopping.is_none() && !self.paused && !self.free.is_empty()
    }

    fn check_control(&mut self) -> io::Result<()> {
        if self.ctl.stop.load(Ordering::Acquire) && self.stopping.is_none() {
            self.stopping = Some(RingExit::Stopped);
        }
        let paused = self.vbd.paused.load(Ordering::Acquire);
        if paused != self.paused {
            self.paused = paused;
            if !paused {
                // The image may have been replaced while we were paused (nothing in flight).
                let image = self.vbd.image();
                if !Arc::ptr_eq(&image, &self.image) {
                    let tags = self.sched.tags();
                    match make_engine(&mut self.uring, image.clone(), self.cfg.model, tags, true) {
                        Ok(e) => {
                            self.sched.set_engine_limit(e.max_in_flight());
                            self.engine = e;
                            self.image = image;
                        }
                        Err(e) => {
                            warn!(self.log, "cannot switch to the new image"; "error" => %e);
                            self.stopping = Some(RingExit::Fatal(e));
                        }
                    }
                }
                self.ctl.quiesced.store(false, Ordering::Release);
            }
        }
        Ok(())
    }

    /// Pops and validates up to a batch of requests. Returns true if more are waiting.
    fn take_requests(&mut self) -> bool {
        let pending = match self.t.parts().0.pending() {
            Ok(n) => n,
            Err(e) => {
                self.broken(e.to_string());
                return false;
            }
        };
        let mut left = pending.min(self.max_batch);
        let (mut reqs, mut segs) = (0u32, 0u32);
        let queued_before = self.sched.pending();
        while left > 0 && self.can_pop() {
            let mut copy = std::mem::take(&mut self.copy);
            self.t.parts().0.pop(&mut copy);
            left -= 1;
            if let Some(n) = self.start(&copy) {
                reqs += 1;
                segs += n as u32;
            }
            self.copy = copy;
        }
        if reqs > 0 {
            let now = now_ns();
            self.stats.sched.batches.add(1);
            self.stats.sched.batch_requests.add(u64::from(reqs));
            self.stats.sched.batch_segments.add(u64::from(segs));
            if let Some(tr) = &self.trace {
                tr.batch(BatchRecord {
                    t: now,
                    requests: reqs,
                    segments: segs,
                });
            }
            if queued_before == 0 && !self.cfg.batch_wait.is_zero() {
                self.batch_deadline = Some(now + self.cfg.batch_wait.as_nanos() as u64);
            }
        }
        self.can_pop() && matches!(self.t.parts().0.pending(), Ok(n) if n > 0)
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

    fn reject(&mut self, s: u32, rej: Rejection, kind: &str) {
        self.free.push(s);
        if rej.problem.status() == status::EOPNOTSUPP {
            self.stats.unsupported.add(1);
        } else {
            self.stats.bad_requests.add(1);
        }
        self.respond(rej.id, rej.raw_op, rej.problem.status());
        self.guest_error(kind, rej.id, &rej.problem);
    }

    /// Validates, maps and enqueues one request. Returns its segment count if accepted.
    fn start(&mut self, copy: &SlotCopy) -> Option<usize> {
        let pop = now_ns();
        let (id, raw_op) = slot_id(copy, self.abi);
        if self.ids.contains(id) {
            self.broken(format!("frontend reused id {id:#x} while it was in flight"));
            return None;
        }
        let Some(s) = self.free.pop() else {
            // Cannot happen: pending() bounds outstanding requests by the ring size.
            self.broken("more requests outstanding than the ring holds".into());
            return None;
        };
        let req = match self.validate(s, copy) {
            Ok(r) => r,
            Err((rej, kind)) => {
                self.reject(s, rej, kind);
                return None;
            }
        };
        // Map the grants and point the iovecs at the pages.
        let n = req.nr_segments;
        if n > 0 {
            let slot = self.sched.slot(s);
            let writable = req.op == Operation::Read;
            let (_, grants, _) = self.t.parts();
            match grants.map(&slot.segs[..n], writable, &mut self.addrs[..n]) {
                Ok(h) => {
                    let slot = self.sched.slot_mut(s);
                    slot.req = req;
                    slot.map = h;
                    slot.build_iov(&self.addrs[..n]);
                }
                Err(problem) => {
                    let rej = Rejection {
                        id,
                        raw_op,
                        problem,
                    };
                    self.reject(s, rej, "grant");
                    return None;
                }
            }
        }
        self.ids.insert(id);
        self.in_flight += 1;
        self.stats.in_flight.add(1);
        let slot = self.sched.slot_mut(s);
        slot.req = req;
        if n == 0 {
            slot.n_iov = 0;
        }
        slot.t = crate::sched::Stamps {
            pop,
            sched: now_ns(),
            submit: 0,
            complete: 0,
        };
        self.sched.enqueue(s);
        Some(n)
    }

    /// Parses the slot (reading an indirect request's descriptor pages once).
    fn validate(&mut self, s: u32, copy: &SlotCopy) -> Result<Request, (Rejection, &'static str)> {
        let abi = self.abi;
        let disk = self.disk;
        let parsed = parse(copy, abi, &disk, &mut self.sched.slot_mut(s).segs)
            .map_err(|r| (r, "invalid"))?;
        let h = match parsed {
            Parsed::Ready(r) => return Ok(r),
            Parsed::Indirect(h) => h,
        };
        let pages = h.pages();
        let mut addrs = [std::ptr::null_mut::<u8>(); MAX_INDIRECT_PAGES_PER_REQUEST];
        let mut pages_segs = [Segment::default(); MAX_INDIRECT_PAGES_PER_REQUEST];
        for (sg, g) in pages_segs.iter_mut().zip(&h.grefs[..pages]) {
            *sg = Segment {
                gref: *g,
                first_sect: 0,
                last_sect: 7,
                pad: 0,
            };
        }
        let (_, grants, _) = self.t.parts();
        let handle = grants
            .map(&pages_segs[..pages], false, &mut addrs[..pages])
            .map_err(|problem| {
                (
                    Rejection {
                        id: h.id,
                        raw_op: h.raw_op,
                        problem,
                    },
                    "indirect grant",
                )
            })?;
        let mut ptrs = [std::ptr::null::<u8>(); MAX_INDIRECT_PAGES_PER_REQUEST];
        for (p, a) in ptrs.iter_mut().zip(addrs) {
            *p = a.cast_const();
        }
        // SAFETY: the transport just mapped `pages` pages, each 4096 bytes and page aligned,
        // readable until the unmap below; `segs` holds the disk's segment capacity, which
        // `parse` checked `nr_segments` against.
        unsafe {
            copy_indirect_segments(
                &ptrs[..pages],
                h.nr_segments,
                &mut self.sched.slot_mut(s).segs,
            )
        };
        // A read-only mapping: nothing is copied back, so unmapping cannot fail the request.
        let _ = self.t.parts().1.unmap(handle);
        finish_indirect(&h, &disk, &self.sched.slot(s).segs).map_err(|r| (r, "invalid indirect"))
    }

    fn dispatch(&mut self) -> io::Result<()> {
        if self.sched.pending() == 0 {
            return Ok(());
        }
        let now = now_ns();
        if let Some(deadline) = self.batch_deadline {
            if now < deadline && (self.sched.pending() as u32) < self.max_batch {
                if !self.batch_timer {
                    let ns = deadline - now;
                    *self.batch_ts = types::Timespec::new().nsec(ns.min(999_999_999) as u32);
                    let e = opcode::Timeout::new(&*self.batch_ts)
                        .build()
                        .user_data(TOKEN_BATCH);
                    self.push_sqe(&e)?;
                    self.batch_timer = true;
                }
                return Ok(());
            }
            self.batch_deadline = None;
        }
        self.sched
            .dispatch(&mut self.uring, &mut *self.engine, &self.stats, now)
    }

    /// Answers every request the scheduler finished.
    fn answer(&mut self) {
        self.sched.take_finished(&mut self.finished);
        if self.finished.is_empty() {
            return;
        }
        let now = now_ns();
        let mut finished = std::mem::take(&mut self.finished);
        for &s in &finished {
            let (req, st, t, map) = {
                let slot = self.sched.slot(s);
                (slot.req, slot.status, slot.t, slot.map)
            };
            // Unmap before answering: a copying transport copies read data back here, and a
            // failed copy must not be answered as a successful read.
            let mut st = st;
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
            let st_ = &self.stats.stages;
            st_.validate.record(t.sched.saturating_sub(t.pop));
            st_.queue.record(t.submit.saturating_sub(t.sched));
            st_.io.record(t.complete.saturating_sub(t.submit));
            st_.respond.record(now.saturating_sub(t.complete));
            self.stats.latency.record(now.saturating_sub(t.pop));
            if let Some(tr) = &self.trace {
                tr.request(ReqRecord {
                    id: req.id,
                    op: req.raw_op,
                    sector: req.sector,
                    sectors: req.nr_sectors as u32,
                    segments: req.nr_segments as u32,
                    status: st,
                    pop: t.pop,
                    sched: t.sched,
                    submit: t.submit,
                    complete: t.complete,
                    push: now,
                });
            }
            self.sched.release(s);
            self.free.push(s);
            self.in_flight -= 1;
            self.stats.in_flight.sub(1);
        }
        finished.clear();
        self.finished = finished;
    }

    fn reap(&mut self) -> io::Result<()> {
        let mut now = 0u64;
        while let Some((tok, res, more)) = self.uring.next_completion() {
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
                TOKEN_BATCH => self.batch_timer = false,
                ud if ud < ENGINE_SPACE => {
                    self.engine
                        .complete(&mut self.uring, ud, res, &mut self.done)?;
                    if !self.done.0.is_empty() {
                        if now == 0 {
                            now = now_ns();
                        }
                        for i in 0..self.done.0.len() {
                            let (tag, r) = self.done.0[i];
                            if r < 0 {
                                self.io_error(tag, r);
                            }
                            self.sched.io_done(
                                tag,
                                r,
                                &mut self.uring,
                                &mut *self.engine,
                                &self.stats,
                                now,
                            )?;
                        }
                        self.done.0.clear();
                    }
                }
                other => debug!(self.log, "unexpected completion"; "token" => other),
            }
        }
        Ok(())
    }

    fn io_error(&mut self, tag: u32, res: i32) {
        let e = io::Error::from_raw_os_error(-res);
        if self.guest_errors.check().is_some() {
            warn!(self.log, "IO failed"; "error" => %e, "io" => tag);
        }
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
        while self.sched.ios_in_flight() > 0 && spins < 10_000 {
            spins += 1;
            if self.uring.submit_and_wait(1).is_err() {
                std::thread::sleep(Duration::from_millis(1));
            }
            if self.reap().is_err() {
                break;
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
