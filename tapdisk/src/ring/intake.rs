//! Intake: pop a batch of requests, copy each slot once, validate it and queue its grants;
//! map the whole batch's grants at once (one map call, or one grant copy, per batch: the
//! transport's [`GrantMapper::map_queued`]); then point each request's iovecs at its pages and
//! hand it to the scheduler (or to the early-read layer); then dispatch, after the batch timer
//! if one is set.

use std::time::Duration;

use blkif::protocol::{status, Segment, MAX_INDIRECT_PAGES_PER_REQUEST};
use blkif::request::{
    copy_indirect_segments, finish_indirect, parse, slot_id, DiskInfo, Operation, Parsed,
    Rejection, Request,
};
use blkif::ring::SlotCopy;
use blkif::transport::GrantMapper;
use blkif::Abi;
use io_uring::types;
use slog::info;

use super::{RingConfig, RingLoop, RingTransport};
use crate::sched::IoCx;
use crate::trace::{now_ns, BatchRecord};

/// The intake's state: what requests must fit, the batch rules, and scratch.
pub(super) struct Intake {
    abi: Abi,
    disk: DiskInfo,
    /// One slot copied out of the ring.
    copy: SlotCopy,
    /// How many requests a pass takes.
    batch: BatchRule,
    batch_wait: Duration,
    /// Dispatch the batch being collected no later than this (ns).
    batch_deadline: Option<u64>,
    /// The batch timer is armed.
    batch_timer: bool,
    /// The batch timer's timespec (read by the kernel at submission).
    batch_ts: Box<types::Timespec>,
    /// The mapped address of each segment of the request being taken.
    addrs: Box<[*mut u8]>,
    /// Slots of the batch being taken, validated and queued for mapping.
    staged: Vec<u32>,
}

impl Intake {
    pub(super) fn new(abi: Abi, disk: DiskInfo, cfg: &RingConfig, ring_size: u32) -> Intake {
        Intake {
            abi,
            disk,
            copy: SlotCopy::default(),
            batch: BatchRule::new(cfg.max_batch, ring_size),
            batch_wait: cfg.batch_wait,
            batch_deadline: None,
            batch_timer: false,
            batch_ts: Box::new(types::Timespec::new()),
            addrs: vec![std::ptr::null_mut(); disk.segment_capacity()].into_boxed_slice(),
            staged: Vec::with_capacity(ring_size as usize),
        }
    }

    /// The batch timer fired.
    pub(super) fn timer_fired(&mut self) {
        self.batch_timer = false;
    }
}

/// The pipelined rule takes at least this many requests per pass (a frontend this shallow
/// is not split).
const PIPELINE_MIN: u32 = 8;

/// How many of the requests waiting in the ring one pass takes.
///
/// Why not all of them: where the IO is a copy done on the loop's thread (a file in memory, a
/// page-cache hit), a pass over a whole ring of requests is long, and the frontend waits for
/// all of it before it sees the first answer; then the loop waits while the frontend refills.
/// The two sides take turns on two CPUs. Taking half the frontend's depth per pass lets them
/// overlap: the first half's answers are published (and the frontend woken) while the second
/// half is served. `td-bench run` on a tmpfs image, 4 KiB random reads at depth 32: 975568
/// IOPS taking the whole ring, 1368854 taking halves (medians of 3, docs/performance.md).
/// Where the IO is asynchronous the split costs one more pass per ring-full and changed
/// nothing measurable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BatchRule {
    /// At most this many (`--max-batch N`).
    Fixed(u32),
    /// Half the frontend's depth, at least [`PIPELINE_MIN`] (`--max-batch 0`, the default).
    Pipelined(Depth),
}

/// How many passes that find requests one window of [`Depth`] spans.
const DEPTH_WINDOW: u32 = 64;

/// The frontend's depth: the most requests it had outstanding (waiting in the ring, or taken
/// and not yet answered) seen by a pass in this window of [`DEPTH_WINDOW`] passes or the one
/// before. A windowed maximum, so that a frontend that lowers its depth is followed within
/// two windows, and one that keeps it is never underestimated in between.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Depth {
    ring_size: u32,
    this_window: u32,
    last_window: u32,
    passes: u32,
}

impl Depth {
    fn see(&mut self, outstanding: u32) -> u32 {
        self.this_window = self.this_window.max(outstanding.min(self.ring_size));
        self.passes += 1;
        if self.passes == DEPTH_WINDOW {
            self.last_window = self.this_window;
            self.this_window = 0;
            self.passes = 0;
        }
        self.this_window.max(self.last_window)
    }
}

impl BatchRule {
    fn new(max_batch: u32, ring_size: u32) -> BatchRule {
        if max_batch == 0 {
            BatchRule::Pipelined(Depth {
                ring_size,
                this_window: 0,
                last_window: 0,
                passes: 0,
            })
        } else {
            BatchRule::Fixed(max_batch.min(ring_size))
        }
    }

    /// How many of `pending` requests to take, with `in_flight` taken and not yet answered.
    fn take(&mut self, pending: u32, in_flight: u32) -> u32 {
        match self {
            BatchRule::Fixed(n) => pending.min(*n),
            BatchRule::Pipelined(depth) => {
                // `pending` is at most a ring (the ring checks it), but the request table may
                // hold more than a ring's requests (early-read chunks): `see` caps the sum.
                let d = depth.see(pending.saturating_add(in_flight));
                pending.min(d.div_ceil(2).max(PIPELINE_MIN))
            }
        }
    }

    /// The most one pass takes (what the batch timer waits for).
    fn limit(&self) -> u32 {
        match *self {
            BatchRule::Fixed(n) => n,
            BatchRule::Pipelined(d) => d.ring_size,
        }
    }
}

impl<T: RingTransport> RingLoop<T> {
    /// Pops and validates up to a batch of requests. Returns true if more are waiting.
    pub(super) fn take_requests(&mut self) -> bool {
        let pending = match self.t.parts().0.pending() {
            Ok(n) => n,
            Err(e) => {
                self.broken(e.to_string());
                return false;
            }
        };
        if pending == 0 {
            // A pass woken by completions only: no clock read, no map call.
            return false;
        }
        let mut left = self.intake.batch.take(pending, self.table.in_flight());
        let (mut reqs, mut segs) = (0u32, 0u32);
        let queued_before = self.sched.pending();
        // Two clock reads per batch, not per request (in a PV dom0 each read is a system
        // call): the batch's requests are popped when it starts, and reach the scheduler
        // together once the batch's grants are mapped, which is most of the time between.
        let popped = now_ns();
        while left > 0 && self.can_pop() {
            let mut copy = std::mem::take(&mut self.intake.copy);
            self.t.parts().0.pop(&mut copy);
            left -= 1;
            self.stage(&copy, popped);
            self.intake.copy = copy;
        }
        // The batch's grants, all at once.
        self.t.parts().1.map_queued();
        let staged = std::mem::take(&mut self.intake.staged);
        let now = if staged.is_empty() { popped } else { now_ns() };
        for &s in &staged {
            if let Some(n) = self.start(s, now) {
                reqs += 1;
                segs += n as u32;
            }
        }
        self.intake.staged = staged;
        self.intake.staged.clear();
        if reqs > 0 {
            // Dispatch comes next, with no wait between: it submits at this reading.
            self.clock.hand_over(now);
            let st = &self.env.stats.sched;
            st.batches.add(1);
            st.batch_requests.add(u64::from(reqs));
            st.batch_segments.add(u64::from(segs));
            if let Some(tr) = &self.env.trace {
                tr.batch(BatchRecord {
                    t: now,
                    requests: reqs,
                    segments: segs,
                });
            }
            if queued_before == 0 && !self.intake.batch_wait.is_zero() {
                self.intake.batch_deadline = Some(now + self.intake.batch_wait.as_nanos() as u64);
            }
        }
        self.can_pop() && matches!(self.t.parts().0.pending(), Ok(n) if n > 0)
    }

    pub(super) fn guest_error(&mut self, what: &str, id: u64, problem: &dyn std::fmt::Display) {
        if let Some(suppressed) = self.guest_errors.check() {
            info!(self.env.log, "refused a request"; "why" => %problem, "kind" => what,
                  "id" => id, "suppressed" => suppressed);
        }
    }

    fn reject(&mut self, s: u32, rej: Rejection, kind: &str) {
        self.table.give_back(s);
        if rej.problem.status() == status::EOPNOTSUPP {
            self.env.stats.unsupported.add(1);
        } else {
            self.env.stats.bad_requests.add(1);
        }
        self.respond(rej.id, rej.raw_op, rej.problem.status());
        self.guest_error(kind, rej.id, &rej.problem);
    }

    /// Validates one request popped at `pop`, queues its grants for the batch's map call, and
    /// admits it (its id is in flight from here, so a duplicate later in the batch is caught).
    fn stage(&mut self, copy: &SlotCopy, pop: u64) {
        let (id, raw_op) = slot_id(copy, self.intake.abi);
        if self.table.id_in_flight(id) {
            self.broken(format!("frontend reused id {id:#x} while it was in flight"));
            return;
        }
        let Some(s) = self.table.take() else {
            // Cannot happen: pending() bounds outstanding requests by the ring size.
            self.broken("more requests outstanding than the ring holds".into());
            return;
        };
        let req = match self.validate(s, copy) {
            Ok(r) => r,
            Err((rej, kind)) => {
                self.reject(s, rej, kind);
                return;
            }
        };
        let n = req.nr_segments;
        if n > 0 {
            let writable = req.op == Operation::Read;
            let (_, grants, _) = self.t.parts();
            match grants.queue(&self.table.slot(s).segs[..n], writable) {
                Ok(h) => self.table.slot_mut(s).map = h,
                Err(problem) => {
                    let rej = Rejection {
                        id,
                        raw_op,
                        problem,
                    };
                    self.reject(s, rej, "grant");
                    return;
                }
            }
        }
        let slot = self.table.slot_mut(s);
        slot.req = req;
        slot.t = crate::requests::Stamps {
            pop,
            sched: 0,
            submit: 0,
            complete: 0,
        };
        self.table.admit(s);
        crate::probes::request_pull(req.id, req.raw_op, req.sector, req.nr_sectors);
        self.env.stats.in_flight.add(1);
        self.intake.staged.push(s);
    }

    /// Answers staged request `s` with an error: its grants could not be mapped.
    fn fail_staged(&mut self, s: u32, problem: blkif::request::Problem) {
        let (id, raw_op) = {
            let r = &self.table.slot(s).req;
            (r.id, r.raw_op)
        };
        self.table.answered(s);
        self.table.release(s);
        self.env.stats.in_flight.sub(1);
        self.env.stats.bad_requests.add(1);
        self.respond(id, raw_op, problem.status());
        self.guest_error("grant", id, &problem);
    }

    /// Points staged request `s`'s iovecs at its pages (mapped by the batch's map call) and
    /// enqueues it at `now`. Returns its segment count if it was mapped.
    fn start(&mut self, s: u32, now: u64) -> Option<usize> {
        let req = self.table.slot(s).req;
        let n = req.nr_segments;
        let exact = self.early.as_ref().is_some_and(|e| e.eligible(&req));
        if n > 0 {
            let h = self.table.slot(s).map;
            let (_, grants, _) = self.t.parts();
            let segs = &self.table.slot(s).segs[..n];
            match grants.addrs(h, segs, &mut self.intake.addrs[..n]) {
                Ok(()) => {
                    let memory = grants.memory(h);
                    let slot = self.table.slot_mut(s);
                    slot.memory = memory;
                    if exact {
                        slot.build_iov_exact(&self.intake.addrs[..n]);
                    } else {
                        slot.build_iov(&self.intake.addrs[..n]);
                    }
                }
                Err(problem) => {
                    let _ = grants.unmap(h);
                    self.fail_staged(s, problem);
                    return None;
                }
            }
        } else {
            let slot = self.table.slot_mut(s);
            slot.n_iov = 0;
            slot.memory = blkif::transport::Memory::Stable;
        }
        self.table.slot_mut(s).t.sched = now;
        if let Some(c) = &self.env.cache {
            if req.op.writes() || matches!(req.op, Operation::Discard { .. }) {
                c.invalidate(req.sector, req.nr_sectors);
            }
        }
        if exact && self.start_early(s, now) {
            return Some(n);
        }
        self.sched.enqueue(s);
        Some(n)
    }

    /// Parses the slot (reading an indirect request's descriptor pages once).
    fn validate(&mut self, s: u32, copy: &SlotCopy) -> Result<Request, (Rejection, &'static str)> {
        let abi = self.intake.abi;
        let disk = self.intake.disk;
        let parsed = parse(copy, abi, &disk, &mut self.table.slot_mut(s).segs)
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
                &mut self.table.slot_mut(s).segs,
            )
        };
        // A read-only mapping: nothing is copied back, so unmapping cannot fail the request.
        let _ = self.t.parts().1.unmap(handle);
        finish_indirect(&h, &disk, &self.table.slot(s).segs).map_err(|r| (r, "invalid indirect"))
    }

    /// Starts what the scheduler may start, unless the batch timer says to wait for more.
    pub(super) fn dispatch(&mut self) -> std::io::Result<()> {
        if self.sched.pending() == 0 {
            return Ok(());
        }
        let now = self.clock.now();
        if let Some(deadline) = self.intake.batch_deadline {
            if now < deadline && (self.sched.pending() as u32) < self.intake.batch.limit() {
                if !self.intake.batch_timer {
                    let ns = deadline - now;
                    *self.intake.batch_ts = types::Timespec::new().nsec(ns.min(999_999_999) as u32);
                    let e = self.tokens.batch_timer(&self.intake.batch_ts);
                    self.push_sqe(&e)?;
                    self.intake.batch_timer = true;
                }
                return Ok(());
            }
            self.intake.batch_deadline = None;
        }
        let mut cx = IoCx {
            table: &mut self.table,
            ring: &mut self.uring,
            engine: self.backend.engine_mut(),
            stats: &self.env.stats,
        };
        self.sched.dispatch(&mut cx, now)
    }
}

#[cfg(test)]
mod batch_tests {
    use super::{BatchRule, PIPELINE_MIN};

    #[test]
    fn a_fixed_batch_takes_at_most_its_size() {
        let mut b = BatchRule::new(4, 32);
        assert_eq!(b, BatchRule::Fixed(4));
        assert_eq!(b.take(32, 0), 4);
        assert_eq!(b.take(3, 0), 3);
        assert_eq!(b.limit(), 4);
        // More than the ring holds means the ring.
        assert_eq!(BatchRule::new(100, 32), BatchRule::Fixed(32));
    }

    #[test]
    fn a_full_ring_is_served_in_halves() {
        let mut b = BatchRule::new(0, 32);
        assert_eq!(b.limit(), 32);
        // 32 outstanding: take 16, then the other 16 while the frontend refills the first.
        assert_eq!(b.take(32, 0), 16);
        assert_eq!(b.take(16, 0), 16);
        // The frontend refilled 16 while 16 are being served: still halves.
        assert_eq!(b.take(16, 16), 16);
        assert_eq!(b.take(32, 0), 16);
    }

    #[test]
    fn a_shallow_frontend_is_not_split() {
        let mut b = BatchRule::new(0, 32);
        assert_eq!(b.take(1, 0), 1);
        assert_eq!(b.take(PIPELINE_MIN, 0), PIPELINE_MIN);
        let mut b = BatchRule::new(0, 32);
        assert_eq!(b.take(12, 0), PIPELINE_MIN);
    }

    #[test]
    fn the_depth_follows_a_frontend_that_lowers_it() {
        let mut b = BatchRule::new(0, 256);
        assert_eq!(b.take(256, 0), 128);
        // The frontend drops to depth 16: within two windows the batch is 8 again.
        let mut batches = Vec::new();
        for _ in 0..2 * super::DEPTH_WINDOW {
            batches.push(b.take(16, 0));
        }
        assert_eq!(batches[0], 16);
        assert_eq!(*batches.last().unwrap(), PIPELINE_MIN);
    }

    #[test]
    fn the_depth_never_exceeds_the_ring() {
        let mut b = BatchRule::new(0, 32);
        // Early-read chunks can make the table hold more than a ring.
        assert_eq!(b.take(32, u32::MAX), 16);
        assert_eq!(b.take(0, 0), 0);
        assert_eq!(b.take(u32::MAX, u32::MAX), 16);
    }
}
