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
    /// Requests taken per batch.
    max_batch: u32,
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
            max_batch: if cfg.max_batch == 0 {
                ring_size
            } else {
                cfg.max_batch.min(ring_size)
            },
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
        let mut left = pending.min(self.intake.max_batch);
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
            if now < deadline && (self.sched.pending() as u32) < self.intake.max_batch {
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
