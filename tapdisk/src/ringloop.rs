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

use blkif::local::EarlyReadPort;
use blkif::protocol::{status, Response, Segment, MAX_INDIRECT_PAGES_PER_REQUEST, PAGE_SIZE};
use blkif::request::{
    copy_indirect_segments, finish_indirect, parse, slot_id, DiskInfo, Operation, Parsed, Problem,
    Rejection, Request,
};
use blkif::ring::{BackRing, SlotCopy};
use blkif::transport::{EventChannel, GrantMapper};
use blkif::Abi;
use io_uring::{opcode, types};
use slog::{debug, info, warn, Logger};
use tapdisk_control::{EarlyPolicy, FaultPlan, ModelParams};

use crate::early::{self, EarlyReads, Outcome, ReadCache};
use crate::engine::{Done, Engine, Uring, ENGINE_SPACE};
use crate::idset::IdSet;
use crate::image::Image;
use crate::logging::RateLimit;
use crate::sched::{Sched, SchedConfig};
use crate::stats::RingStats;
use crate::trace::{now_ns, BatchRecord, ReqRecord, TraceWriter};
use crate::vbd::{RingControl, VbdShared};

const TOKEN_EVTCHN: u64 = u64::MAX;
const TOKEN_CTL: u64 = u64::MAX - 1;
const TOKEN_HANGUP: u64 = u64::MAX - 2;
const TOKEN_BATCH: u64 = u64::MAX - 3;
const TOKEN_UFFD: u64 = u64::MAX - 4;
const TOKEN_ENGINE: u64 = u64::MAX - 5;
const TOKEN_CANCEL: u64 = u64::MAX - 6;

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
    /// The early-read contract, if the frontend set it up (local transport only: an
    /// unmodified Xen frontend ends its grant access when it sees the response, so answering
    /// a read before its data is in would hand the guest garbage).
    fn early_read(&self) -> Option<&EarlyReadPort> {
        None
    }
    /// Sends the completion record of early-answered read `id`.
    fn report_early_read_done(&self, _id: u64, _ok: bool) -> io::Result<()> {
        Ok(())
    }
    /// Whether request memory is unmapped right after each IO (see
    /// [`Engine::unpinned_memory_only`]).
    fn unmaps_after_io(&self) -> bool {
        false
    }
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
    fn early_read(&self) -> Option<&EarlyReadPort> {
        self.early_read.as_ref()
    }
    fn report_early_read_done(&self, id: u64, ok: bool) -> io::Result<()> {
        blkif::local::LocalBackend::report_early_read_done(self, id, ok)
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
#[derive(Clone, Debug, Default)]
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
    /// Early read return (for frontends that set up the early-read contract).
    pub early: Option<EarlyPolicy>,
    /// Faults to inject (testing).
    pub faults: Option<FaultPlan>,
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
    /// The VBD's read cache, if it has one.
    pub cache: Option<Arc<ReadCache>>,
}

/// Builds the engine for `image` on `ring`: the driver's, then injected faults, then a model.
/// `unmapped` says request memory is unmapped right after each IO
/// ([`RingTransport::unmaps_after_io`]).
pub fn make_engine(
    ring: &mut Uring,
    image: Arc<dyn Image>,
    cfg: &RingConfig,
    tags: u32,
    update: bool,
    unmapped: bool,
) -> io::Result<Box<dyn Engine>> {
    let mut e: Box<dyn Engine> = image.engine(ring, tags, update)?;
    if unmapped {
        e.unpinned_memory_only();
    }
    if let Some(f) = &cfg.faults {
        e = Box::new(crate::engine::fault::FaultEngine::new(e, f.clone(), tags));
    }
    if let Some(p) = cfg.model {
        e = crate::engine::model::wrap(e, p, tags);
    }
    Ok(e)
}

/// One ring's loop. Build it on the thread that runs it (it holds raw pointers).
pub struct RingLoop<T: RingTransport> {
    t: T,
    abi: Abi,
    disk: DiskInfo,
    cfg: RingConfig,
    image: Arc<dyn Image>,
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
    // Early read return.
    /// Ring slots; sched slots from here on are chunks of early reads.
    n_ring: u32,
    early: Option<EarlyReads>,
    cache: Option<Arc<ReadCache>>,
    chunk_free: Vec<u32>,
    /// Per chunk slot (minus `n_ring`): its read's slot and first segment.
    chunk_of: Box<[(u32, u32)]>,
    /// Early reads answered or not whose pages are still being filled.
    early_busy: u32,
    block_buf: Box<[u8]>,
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
            cache,
        } = env;
        let mut t = t;
        let abi = t.abi();
        let n = t.parts().0.size();
        let seg_cap = disk.segment_capacity();
        // Early reads: only where the frontend set up the contract, and only if asked for.
        let early = match (t.early_read(), cfg.early) {
            (Some(port), Some(p)) if p.answers_early() || p.cache_mb > 0 => {
                Some(EarlyReads::new(p, n, seg_cap, port.pages))
            }
            (None, Some(p)) if p.answers_early() => {
                info!(
                    log,
                    "early read return stays off on this ring: the frontend did not \
                            set up the early-read contract (Xen frontends cannot)"
                );
                None
            }
            _ => None,
        };
        let n_chunks = if early.is_some() {
            (n * 8).min(16384)
        } else {
            0
        };
        let mut sched = Sched::new(cfg.sched, n + n_chunks, seg_cap);
        let tags = sched.tags();
        // Room for every engine op (model timers included) and the loop's own polls.
        let entries = (tags * 2 + 8).next_power_of_two().min(32768);
        let mut uring = Uring::new(entries)?;
        let image = vbd.image();
        let unmapped = t.unmaps_after_io();
        let engine = make_engine(&mut uring, image.clone(), &cfg, tags, false, unmapped)?;
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
            n_ring: n,
            early,
            cache,
            chunk_free: (n..n + n_chunks).rev().collect(),
            chunk_of: vec![(0, 0); n_chunks as usize].into_boxed_slice(),
            early_busy: 0,
            block_buf: vec![0u8; PAGE_SIZE].into_boxed_slice(),
            addrs: vec![std::ptr::null_mut(); seg_cap].into_boxed_slice(),
            done: Done::with_capacity(tags as usize),
            finished: Vec::with_capacity((n + n_chunks) as usize),
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
        if let Some(fd) = self.t.early_read().map(|p| p.uffd.fd()) {
            self.push_sqe(&multi(fd, TOKEN_UFFD))?;
        }
        self.arm_engine_poll()
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
            if self.stopping.is_some() && self.idle() {
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
            if self.stopping.is_some() && self.idle() {
                continue;
            }
            if wait && self.eoi_due && self.can_pop() {
                // Drained and req_event re-armed: only now let the frontend's next kick in.
                // While we cannot take requests (paused, no free slot) the channel stays
                // masked, so a frontend kicking in a loop cannot keep waking us.
                self.eoi_due = false;
                self.t.parts().2.eoi()?;
            }
            if wait && self.paused && self.idle() {
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
            self.stats.waiting.set(self.sched.pending() as u64);
            self.stats
                .ios_in_flight
                .set(self.sched.ios_in_flight() as u64);
            self.stats.early_busy.set(u64::from(self.early_busy));
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

    /// Nothing answered or not is still using the frontend's memory.
    fn idle(&self) -> bool {
        self.in_flight == 0 && self.early_busy == 0
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
                if !std::ptr::addr_eq(Arc::as_ptr(&image), Arc::as_ptr(&self.image)) {
                    let tags = self.sched.tags();
                    let unmapped = self.t.unmaps_after_io();
                    match make_engine(
                        &mut self.uring,
                        image.clone(),
                        &self.cfg,
                        tags,
                        true,
                        unmapped,
                    ) {
                        Ok(e) => {
                            self.sched.set_engine_limit(e.max_in_flight());
                            if self.engine.poll_fd().is_some() {
                                let c = opcode::AsyncCancel::new(TOKEN_ENGINE)
                                    .build()
                                    .user_data(TOKEN_CANCEL);
                                self.push_sqe(&c)?;
                            }
                            self.engine = e;
                            self.image = image;
                            self.arm_engine_poll()?;
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
                    let exact = self.early.as_ref().is_some_and(|e| e.eligible(&req));
                    let slot = self.sched.slot_mut(s);
                    slot.req = req;
                    slot.map = h;
                    if exact {
                        slot.build_iov_exact(&self.addrs[..n]);
                    } else {
                        slot.build_iov(&self.addrs[..n]);
                    }
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
        let now = now_ns();
        slot.t = crate::sched::Stamps {
            pop,
            sched: now,
            submit: 0,
            complete: 0,
        };
        if let Some(c) = &self.cache {
            if req.op.writes() || matches!(req.op, Operation::Discard { .. }) {
                c.invalidate(req.sector, req.nr_sectors);
            }
        }
        if self.early.as_ref().is_some_and(|e| e.eligible(&req)) && self.start_early(s, now) {
            return Some(n);
        }
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
            if s >= self.n_ring {
                self.chunk_finished(s, now);
                continue;
            }
            let (req, st) = {
                let slot = self.sched.slot(s);
                (slot.req, slot.status)
            };
            if req.op.writes() || matches!(req.op, Operation::Discard { .. }) {
                if let Some(c) = &self.cache {
                    c.invalidate(req.sector, req.nr_sectors);
                }
            }
            if req.op == Operation::Read {
                // Early-read frontends unmapped these pages when they queued the read.
                self.map_for_frontend(s, 0, req.nr_segments);
            }
            // Unmap before answering: a copying transport copies read data back here, and a
            // failed copy must not be answered as a successful read.
            let st = match self.unmap_request(s) {
                Ok(()) => st,
                Err(p) => {
                    self.guest_error("unmap", req.id, &p);
                    status::ERROR
                }
            };
            self.respond_request(s, st, now);
            self.sched.release(s);
            self.free.push(s);
        }
        finished.clear();
        self.finished = finished;
    }

    /// Answers request `s` with `st` and accounts for it; its slot and grants stay held.
    fn respond_request(&mut self, s: u32, st: i16, now: u64) {
        let (req, t) = {
            let slot = self.sched.slot(s);
            (slot.req, slot.t)
        };
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
        if st != status::OKAY && st != blkif::local::STATUS_EARLY {
            c.errors.add(1);
        }
        let complete = if t.complete == 0 { now } else { t.complete };
        let submit = if t.submit == 0 { t.sched } else { t.submit };
        let st_ = &self.stats.stages;
        st_.validate.record(t.sched.saturating_sub(t.pop));
        st_.queue.record(submit.saturating_sub(t.sched));
        st_.io.record(complete.saturating_sub(submit));
        st_.respond.record(now.saturating_sub(complete));
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
                submit,
                complete,
                push: now,
            });
        }
        self.in_flight -= 1;
        self.stats.in_flight.sub(1);
    }

    /// Releases request `s`'s grants (a copying transport copies read data back here).
    fn unmap_request(&mut self, s: u32) -> Result<(), Problem> {
        let (nseg, map) = {
            let slot = self.sched.slot(s);
            (slot.req.nr_segments, slot.map)
        };
        if nseg > 0 {
            self.t.parts().1.unmap(map)?;
        }
        Ok(())
    }

    /// Releases request slot `s`, answered already: its grants and the slot itself. (Only
    /// early reads get here, on the local transport, whose unmap cannot fail.)
    fn release_request(&mut self, s: u32) {
        if let Err(p) = self.unmap_request(s) {
            let id = self.sched.slot(s).req.id;
            self.guest_error("unmap", id, &p);
        }
        self.free.push(s);
    }

    /// Maps segments `first..first+n` of request `s` for an early-read frontend (nothing
    /// without one). A failure means the frontend broke its own mapping; its readers may
    /// fault, and are then served by the fault handler.
    fn map_for_frontend(&mut self, s: u32, first: usize, n: usize) {
        if let Some(port) = self.t.early_read() {
            let segs = &self.sched.slot(s).segs[first..first + n];
            if let Err(e) = early::continue_pages(port, segs) {
                if self.guest_errors.check().is_some() {
                    warn!(self.log, "cannot map pages for the frontend"; "error" => %e);
                }
            }
        }
    }

    /// Starts read `s` (validated, mapped, one iovec per segment) through the early-read
    /// layer: fills what the cache has, fetches the rest in chunks, answers when the policy
    /// says so. Returns false (nothing done) if there are not enough chunk slots.
    fn start_early(&mut self, s: u32, now: u64) -> bool {
        let Some(er) = self.early.as_mut() else {
            return false;
        };
        let chunk = er.chunk_pages();
        let req = self.sched.slot(s).req;
        let n = req.nr_segments;
        // The cache first (the patent's steps 310-315): whole aligned 4 KiB blocks.
        let mut hit = [0u64; 64];
        let mut hits = 0u32;
        if let Some(cache) = &self.cache {
            let slot = self.sched.slot(s);
            let mut sector = req.sector;
            for i in 0..n.min(64 * 64) {
                let sg = slot.segs[i];
                if let Some(b) = early::segment_block(sector, &sg) {
                    if cache.get(b, &mut self.block_buf) {
                        let v = slot.iov[i];
                        // SAFETY: iovec `i` (exact, one per segment) points at the mapped
                        // page of a whole-page segment: 4096 writable bytes, which the
                        // frontend cannot see yet (unmapped there until we continue it).
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                self.block_buf.as_ptr(),
                                v.iov_base.cast::<u8>(),
                                v.iov_len.min(PAGE_SIZE),
                            )
                        };
                        hit[i / 64] |= 1 << (i % 64);
                        hits += 1;
                    }
                }
                sector += u64::from(sg.last_sect - sg.first_sect + 1);
            }
        }
        let is_hit = |i: usize| i < 64 * 64 && hit[i / 64] & (1 << (i % 64)) != 0;
        // Chunks: runs of missing segments, at most `chunk` long.
        let mut chunks = 0usize;
        let mut i = 0;
        while i < n {
            if is_hit(i) {
                i += 1;
                continue;
            }
            let mut k = 0;
            while i + k < n && k < chunk && !is_hit(i + k) {
                k += 1;
            }
            chunks += 1;
            i += k;
        }
        if chunks > self.chunk_free.len() {
            return false;
        }
        let c = &self.stats.early;
        c.reads.add(1);
        c.cache_hits.add(u64::from(hits));
        c.cache_misses.add(n as u64 - u64::from(hits));
        er.begin(s, &req, &self.sched.slot(s).segs[..n], now);
        self.early_busy += 1;
        // Plan and enqueue the chunks.
        let mut sector = req.sector;
        let mut i = 0;
        while i < n {
            let sectors_of = |sl: &crate::sched::ReqSlot, a: usize, b: usize| -> u64 {
                sl.segs[a..b]
                    .iter()
                    .map(|g| u64::from(g.last_sect - g.first_sect + 1))
                    .sum()
            };
            if is_hit(i) {
                sector += sectors_of(self.sched.slot(s), i, i + 1);
                i += 1;
                continue;
            }
            let mut k = 0;
            while i + k < n && k < chunk && !is_hit(i + k) {
                k += 1;
            }
            let c = self.chunk_free.pop().expect("counted above");
            let nsec = sectors_of(self.sched.slot(s), i, i + k);
            let (segs, iov, t) = {
                let p = self.sched.slot(s);
                (p.segs.as_ptr(), p.iov.as_ptr(), p.t)
            };
            let slot = self.sched.slot_mut(c);
            // SAFETY: `segs`/`iov` point at request `s`'s arrays (a different slot from `c`),
            // which hold at least `i + k <= n` entries and are not written meanwhile.
            unsafe {
                std::ptr::copy_nonoverlapping(segs.add(i), slot.segs.as_mut_ptr(), k);
                std::ptr::copy_nonoverlapping(iov.add(i), slot.iov.as_mut_ptr(), k);
            }
            slot.n_iov = k;
            slot.req = Request {
                id: req.id,
                raw_op: req.raw_op,
                op: Operation::Read,
                sector,
                nr_sectors: nsec,
                nr_segments: k,
            };
            slot.t = t;
            self.chunk_of[(c - self.n_ring) as usize] = (s, i as u32);
            if let Some(er) = self.early.as_mut() {
                er.chunk_issued(s);
            }
            self.sched.enqueue_solo(c);
            sector += nsec;
            i += k;
        }
        // Cache hits are filled: map them for the frontend now.
        if hits > 0 {
            let mut i = 0;
            while i < n {
                if !is_hit(i) {
                    i += 1;
                    continue;
                }
                let mut k = 0;
                while i + k < n && is_hit(i + k) {
                    k += 1;
                }
                if let Some(er) = self.early.as_mut() {
                    let segs = &self.sched.slot(s).segs[i..i + k];
                    er.fill(s, i, segs, now, &self.stats.early);
                }
                self.map_for_frontend(s, i, k);
                i += k;
            }
        }
        self.early_decide(s, now);
        true
    }

    /// Acts on what the policy says about early read `s`.
    fn early_decide(&mut self, s: u32, now: u64) {
        let Some(er) = self.early.as_mut() else {
            return;
        };
        match er.decide(s) {
            Outcome::Wait => {}
            Outcome::Answer(st) => self.early_answer(s, st, now),
            Outcome::Done(st) => self.early_done(s, st, now),
        }
    }

    fn early_answer(&mut self, s: u32, st: i16, now: u64) {
        let mut st = st;
        if let Some(er) = self.early.as_mut() {
            let unfilled = er.answered(s);
            if unfilled > 0 {
                self.stats.early.answered_early.add(1);
                self.stats.early.pages_unmapped.add(u64::from(unfilled));
                if st == status::OKAY {
                    st = blkif::local::STATUS_EARLY;
                }
            }
        }
        self.respond_request(s, st, now);
    }

    /// Every chunk of early read `s` is done: answer it if not yet, and release it.
    fn early_done(&mut self, s: u32, st: i16, now: u64) {
        let answered = self.early.as_ref().is_some_and(|er| er.was_answered(s));
        if !answered {
            if let Some(er) = self.early.as_mut() {
                er.answered(s);
            }
            self.respond_request(s, st, now);
        } else if self.early.as_ref().is_some_and(|er| er.answered_early(s)) {
            if st != status::OKAY {
                self.stats.early.late_failures.add(1);
            }
            let id = self.sched.slot(s).req.id;
            if let Err(e) = self.t.report_early_read_done(id, st == status::OKAY) {
                warn!(self.log, "cannot send the completion of an early read";
                      "id" => id, "error" => %e);
            }
        }
        let n = self.sched.slot(s).req.nr_segments;
        if let Some(er) = self.early.as_mut() {
            er.end(s, &self.sched.slot(s).segs[..n]);
        }
        self.early_busy -= 1;
        self.release_request(s);
    }

    /// Chunk slot `c` of an early read finished.
    fn chunk_finished(&mut self, c: u32, now: u64) {
        let (s, first) = self.chunk_of[(c - self.n_ring) as usize];
        let (ok, k) = {
            let slot = self.sched.slot(c);
            (slot.status == status::OKAY, slot.req.nr_segments)
        };
        let first = first as usize;
        if ok {
            // Keep what was read, then let the frontend see it.
            if let Some(cache) = &self.cache {
                let p = self.sched.slot(s);
                let mut sector = p.req.sector
                    + p.segs[..first]
                        .iter()
                        .map(|g| u64::from(g.last_sect - g.first_sect + 1))
                        .sum::<u64>();
                for i in first..first + k {
                    let sg = p.segs[i];
                    if let Some(b) = early::segment_block(sector, &sg) {
                        let v = p.iov[i];
                        // SAFETY: iovec `i` points at 4096 readable bytes of the mapped page
                        // just filled by the chunk's read.
                        let data = unsafe {
                            std::slice::from_raw_parts(v.iov_base.cast::<u8>(), PAGE_SIZE)
                        };
                        cache.put(b, data);
                    }
                    sector += u64::from(sg.last_sect - sg.first_sect + 1);
                }
            }
            if let Some(er) = self.early.as_mut() {
                let segs = &self.sched.slot(s).segs[first..first + k];
                er.fill(s, first, segs, now, &self.stats.early);
            }
            self.map_for_frontend(s, first, k);
        } else if self.early.as_ref().is_some_and(|er| er.was_answered(s)) {
            // Answered already: nobody may wait forever, nobody may read garbage unknowing.
            // Poison the pages, map them (stalled readers wake), and report at the end.
            let p = self.sched.slot(s);
            for i in first..first + k {
                let v = p.iov[i];
                // SAFETY: iovec `i` points at `iov_len` writable bytes of a mapped page of
                // this request, which the frontend cannot see until we continue it.
                unsafe {
                    std::ptr::write_bytes(v.iov_base.cast::<u8>(), blkif::early::POISON, v.iov_len)
                };
            }
            if let Some(er) = self.early.as_mut() {
                let segs = &self.sched.slot(s).segs[first..first + k];
                er.fill(s, first, segs, now, &self.stats.early);
            }
            self.map_for_frontend(s, first, k);
        }
        self.sched.release(c);
        self.chunk_free.push(c);
        let Some(er) = self.early.as_mut() else {
            return;
        };
        match er.chunk_done(s, ok, now) {
            Outcome::Wait => {}
            Outcome::Answer(st) => self.early_answer(s, st, now),
            Outcome::Done(st) => self.early_done(s, st, now),
        }
    }

    /// The frontend faulted on guest memory: map pages that are filled (or belong to no
    /// read), leave the others stalled until their data is in.
    fn handle_faults(&mut self) -> io::Result<()> {
        let now = now_ns();
        loop {
            let fault = match self.t.early_read() {
                Some(port) => port.uffd.read_fault()?,
                None => return Ok(()),
            };
            let Some(f) = fault else { return Ok(()) };
            let Some(port) = self.t.early_read() else {
                return Ok(());
            };
            let Some(page) = port.page_of(f.address) else {
                // Not guest memory: the frontend registered more than it told us. Map it
                // anyway so its thread does not hang; the frontend is on its own there.
                let _ = port
                    .uffd
                    .continue_range(f.address & !(PAGE_SIZE as u64 - 1), PAGE_SIZE as u64);
                continue;
            };
            let stalled = match self.early.as_mut() {
                Some(er) => er.faulted(page, now, &self.stats.early),
                None => {
                    self.stats.early.faults.add(1);
                    false
                }
            };
            if !stalled {
                if let Some(a) = port.page_addr(page) {
                    if let Err(e) = port.uffd.continue_range(a, PAGE_SIZE as u64) {
                        if self.guest_errors.check().is_some() {
                            warn!(self.log, "cannot map a page the frontend faulted on";
                                  "page" => page, "error" => %e);
                        }
                    }
                }
            }
        }
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
                TOKEN_UFFD => {
                    self.handle_faults()?;
                    if !more {
                        if let Some(fd) = self.t.early_read().map(|p| p.uffd.fd()) {
                            let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
                                .multi(true)
                                .build()
                                .user_data(TOKEN_UFFD);
                            self.push_sqe(&e)?;
                        }
                    }
                }
                TOKEN_ENGINE => {
                    if res == -libc::ECANCELED {
                        continue;
                    }
                    self.engine.on_poll(&mut self.uring, &mut self.done)?;
                    self.process_done(&mut now)?;
                    if !more {
                        self.arm_engine_poll()?;
                    }
                }
                TOKEN_CANCEL => {}
                ud if ud < ENGINE_SPACE => {
                    self.engine
                        .complete(&mut self.uring, ud, res, &mut self.done)?;
                    self.process_done(&mut now)?;
                }
                other => debug!(self.log, "unexpected completion"; "token" => other),
            }
        }
        Ok(())
    }

    /// Hands what the engine reported done to the scheduler.
    fn process_done(&mut self, now: &mut u64) -> io::Result<()> {
        if self.done.0.is_empty() {
            return Ok(());
        }
        if *now == 0 {
            *now = now_ns();
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
                *now,
            )?;
        }
        self.done.0.clear();
        Ok(())
    }

    /// Polls the engine's completion descriptor, if it has one.
    fn arm_engine_poll(&mut self) -> io::Result<()> {
        if let Some(fd) = self.engine.poll_fd() {
            let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
                .multi(true)
                .build()
                .user_data(TOKEN_ENGINE);
            self.push_sqe(&e)?;
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
