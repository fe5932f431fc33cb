//! The request scheduler: between the ring and the IO engine.
//!
//! The ring loop pops a batch of requests, validates and maps them, and hands them here in
//! ring order. [`Sched::dispatch`] decides what may start now and in what shape:
//!
//! - **Ordering.** A FLUSH_DISKCACHE or WRITE_BARRIER starts only when everything before it has
//!   completed, and nothing after it starts until it has completed (its data written, then
//!   `fdatasync`). A request that overlaps an earlier one that is still pending or in flight,
//!   where either of the two modifies the disk (write or discard), waits until the earlier one
//!   completes: overlapping writes, and reads and writes of the same sectors, never pass each
//!   other. Everything else may run concurrently, as blkif allows.
//! - **Sorting and merging** (when enabled). The requests that may start are sorted by sector,
//!   and runs of exactly contiguous requests of the same direction become one vectored IO
//!   (readv/writev over the frontend's own pages: no copy, no remapping), up to the maximum
//!   merged size and the kernel's iovec limit. This is the thesis's fix for virtual-request
//!   fragmentation (Table 4.2).
//! - **Never holding IO back.** Whatever may start is started at once while the engine has
//!   room ([`Engine::max_in_flight`], usually unlimited): sorting and merging work on what
//!   arrived together, and on what accumulates while a device that takes one IO at a time is
//!   busy. A merge never turns parallel work into serial work: what is ready is spread over
//!   the storage's lanes ([`Engine::lanes`]), each merged IO at most its share (and at
//!   least [`MIN_SPREAD_BYTES`]), so 16 MiB of contiguous writes on a device with 8 lanes go
//!   out as 8 IOs of 2 MiB side by side, not one of 16 MiB.
//! - **Completion.** A request completes when all its IOs are done. If a merged IO fails, each
//!   of its requests is retried on its own, so only the requests whose own IO fails get an
//!   error.
//!
//! The requests themselves live in the ring's [`RequestTable`]; the scheduler keeps its own
//! bookkeeping per slot and the backend IOs it built ([`ios`]). Everything is preallocated per
//! ring: IO slots, merge iovec arrays, the scratch lists of a dispatch. Nothing here allocates
//! or locks.

use std::io;

use blkif::protocol::SECTOR_SIZE;
use blkif::request::Operation;

use crate::driver::{Done, Engine, IoOp, Uring};
use crate::requests::{ReqSlot, RequestTable};
use crate::stats::RingStats;

mod ios;
#[cfg(test)]
mod tests;

use self::ios::{IoKind, IoSlots};

/// The kernel's limit on iovecs per readv/writev (`UIO_MAXIOV`).
pub const IOV_MAX: usize = 1024;

/// A merged IO spread over the lanes is never cut smaller than this by default: below it,
/// the cost per IO outweighs the parallelism.
pub const MIN_SPREAD_BYTES: u64 = 1 << 20;

/// Scheduler settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedConfig {
    /// Sort and merge (off: each request is its own IO, in ring order).
    pub merge: bool,
    /// Largest merged IO, bytes.
    pub max_merge_bytes: u64,
    /// Backend IOs in flight at most (0: no limit of our own; the engine may still ask for
    /// one, see [`Engine::max_in_flight`]). Requests beyond it wait here, where later ones
    /// can still be sorted and merged with them, as in an elevator in front of a busy disk.
    /// (A request too large for one IO may go over it by its extra parts.)
    pub max_ios: u32,
    /// A merged IO spread over the lanes is never cut smaller than this
    /// ([`MIN_SPREAD_BYTES`]; smaller in tests).
    pub min_spread_bytes: u64,
}

impl Default for SchedConfig {
    fn default() -> Self {
        SchedConfig {
            merge: true,
            max_merge_bytes: 1 << 20,
            max_ios: 0,
            min_spread_bytes: MIN_SPREAD_BYTES,
        }
    }
}

/// Where a request is, as the scheduler sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Not the scheduler's (free, or being parsed, or finished and taken).
    Idle,
    /// Waiting to be dispatched.
    Pending,
    /// Its IOs are in flight.
    Running,
    /// Done; waiting for the ring loop to answer it.
    Finished,
}

/// The scheduler's bookkeeping of one request slot (the request itself is the table's).
#[derive(Clone, Copy, Debug)]
struct Mark {
    stage: Stage,
    parts_left: u16,
    failed: bool,
    /// Next member of the same merged IO.
    next_member: u32,
    /// Arrival order (ring order), to keep `pending` sorted by it.
    seq: u64,
    /// Never merge this request again (its merged IO failed; it is retried alone).
    solo: bool,
}

const NONE: u32 = u32::MAX;

impl Mark {
    const IDLE: Mark = Mark {
        stage: Stage::Idle,
        parts_left: 0,
        failed: false,
        next_member: NONE,
        seq: 0,
        solo: false,
    };
}

/// What the scheduler works with while it dispatches or completes IO: the requests, the ring
/// the engine pushes to, the engine, and the counters.
pub struct IoCx<'a> {
    /// The ring's requests.
    pub table: &'a mut RequestTable,
    /// The loop's io_uring.
    pub ring: &'a mut Uring,
    /// The engine doing the IO.
    pub engine: &'a mut dyn Engine,
    /// Where dispatches are counted.
    pub stats: &'a RingStats,
}

/// A request range seen during a dispatch scan.
#[derive(Clone, Copy, Debug)]
struct Range {
    start: u64,
    end: u64,
    modifies: bool,
}

fn overlaps(a0: u64, a1: u64, b0: u64, b1: u64) -> bool {
    a0 < b1 && b0 < a1
}

/// The scheduler of one ring.
pub struct Sched {
    cfg: SchedConfig,
    marks: Box<[Mark]>,
    /// The backend IOs built and in flight.
    ios: IoSlots,
    /// Requests waiting to start, in ring order.
    pending: Vec<u32>,
    /// A flush or barrier is running: nothing else starts.
    ordering: bool,
    /// Finished requests for the ring loop to answer.
    finished: Vec<u32>,
    // Scratch for dispatch.
    ready: Vec<u32>,
    seen: Vec<Range>,
    /// What the engine finished inside a submit.
    done: Done,
    next_seq: u64,
    /// Backend IOs in flight at most (0: unlimited): the config's, or the engine's.
    io_limit: usize,
    /// IOs the storage works on at once ([`Engine::lanes`]).
    lanes: u32,
    /// Largest merged IO of the dispatch under way.
    merge_cap: u64,
    /// Completions engines reported inside submit, ever.
    sync_done: u64,
}

impl Sched {
    /// A scheduler for the `slots` request slots of a table whose requests have up to
    /// `seg_cap` segments each.
    pub fn new(cfg: SchedConfig, slots: u32, seg_cap: usize) -> Sched {
        let n = slots as usize;
        let ios = IoSlots::new(n, seg_cap, cfg.merge);
        Sched {
            cfg,
            marks: vec![Mark::IDLE; n].into_boxed_slice(),
            done: Done::with_capacity(ios.capacity()),
            ios,
            pending: Vec::with_capacity(n),
            ordering: false,
            finished: Vec::with_capacity(n),
            ready: Vec::with_capacity(n),
            seen: Vec::with_capacity(n),
            next_seq: 0,
            io_limit: cfg.max_ios as usize,
            lanes: 1,
            merge_cap: cfg.max_merge_bytes,
            sync_done: 0,
        }
    }

    /// Takes what the engine says of its storage: its wish for a limit on IOs in flight
    /// (unless the config sets one), and how many IOs it works on at once.
    pub fn set_engine(&mut self, engine: &dyn Engine) {
        self.io_limit = match (self.cfg.max_ios, engine.max_in_flight()) {
            (0, Some(l)) => l as usize,
            (c, _) => c as usize,
        };
        self.lanes = engine.lanes().max(1);
    }

    /// Engine tags this scheduler uses (`0..tags()`).
    pub fn tags(&self) -> u32 {
        self.ios.capacity() as u32
    }

    /// The settings.
    pub fn config(&self) -> SchedConfig {
        self.cfg
    }

    /// IOs in flight.
    pub fn ios_in_flight(&self) -> usize {
        self.ios.active()
    }

    /// Requests waiting to start.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// A flush or barrier is running (nothing else may start).
    pub fn ordering(&self) -> bool {
        self.ordering
    }

    /// Hands over a validated, mapped request (slot `s` of the table).
    pub fn enqueue(&mut self, s: u32) {
        self.enqueue_as(s, false)
    }

    /// Hands over a request that must never be merged with another (a chunk of an early
    /// read: merging it back would defeat the point).
    pub fn enqueue_solo(&mut self, s: u32) {
        self.enqueue_as(s, true)
    }

    fn enqueue_as(&mut self, s: u32, solo: bool) {
        self.marks[s as usize] = Mark {
            stage: Stage::Pending,
            seq: self.next_seq,
            solo,
            ..Mark::IDLE
        };
        self.next_seq += 1;
        self.pending.push(s);
    }

    /// Takes the requests that finished since the last call; the caller answers each (with
    /// the status the table's slot holds) and then calls [`Sched::release`].
    pub fn take_finished(&mut self, out: &mut Vec<u32>) {
        out.append(&mut self.finished);
    }

    /// Forgets a finished request.
    pub fn release(&mut self, s: u32) {
        self.marks[s as usize].stage = Stage::Idle;
    }

    fn conflicts_in_flight(&self, s: &ReqSlot) -> bool {
        self.ios.conflicts(s.start(), s.end(), s.modifies())
    }

    fn conflicts_seen(seen: &[Range], s: &ReqSlot, seen_modifying: usize) -> bool {
        let m = s.modifies();
        if !m && seen_modifying == 0 {
            return false;
        }
        seen.iter()
            .any(|r| (m || r.modifies) && overlaps(s.start(), s.end(), r.start, r.end))
    }

    /// Starts every pending request that may start now. `now` stamps their submission.
    pub fn dispatch(&mut self, cx: &mut IoCx<'_>, now: u64) -> io::Result<()> {
        // An engine may finish an IO inside submit (a synchronous ioctl, an injected fault);
        // if that lets more start (a flush done, a conflict gone), go round again: no
        // completion will come later to prompt it.
        loop {
            let before = self.sync_done;
            self.dispatch_once(cx, now)?;
            if self.sync_done == before || self.pending.is_empty() {
                return Ok(());
            }
        }
    }

    fn at_io_limit(&self) -> bool {
        self.io_limit > 0 && self.ios.active() >= self.io_limit
    }

    fn dispatch_once(&mut self, cx: &mut IoCx<'_>, now: u64) -> io::Result<()> {
        if self.pending.is_empty() || self.ordering || self.at_io_limit() {
            return Ok(());
        }
        self.ready.clear();
        self.seen.clear();
        let mut seen_modifying = 0usize;
        let mut keep = 0usize;
        let mut i = 0usize;
        let mut start_ordering = None;
        while i < self.pending.len() {
            let s = self.pending[i];
            let slot = cx.table.slot(s);
            if slot.is_ordering() {
                if keep == 0 && self.ready.is_empty() && self.ios.active() == 0 {
                    start_ordering = Some(s);
                    i += 1;
                }
                break;
            }
            let hold = Self::conflicts_seen(&self.seen, slot, seen_modifying)
                || self.conflicts_in_flight(slot);
            self.seen.push(Range {
                start: slot.start(),
                end: slot.end(),
                modifies: slot.modifies(),
            });
            seen_modifying += usize::from(slot.modifies());
            if hold {
                self.pending[keep] = s;
                keep += 1;
            } else {
                self.ready.push(s);
            }
            i += 1;
        }
        // Keep the held requests and everything from the first unstarted flush on.
        let tail = self.pending.len() - i;
        self.pending.copy_within(i.., keep);
        self.pending.truncate(keep + tail);

        if self.cfg.merge && self.ready.len() > 1 {
            let table = &*cx.table;
            self.ready
                .sort_unstable_by_key(|&s| table.slot(s).req.sector);
            self.merge_cap = self.spread(table);
        }
        let mut k = 0;
        while k < self.ready.len() && !self.at_io_limit() {
            let n = self.group_len(cx.table, k);
            if n > 1 {
                self.submit_merged(cx, k, n, now)?;
            } else {
                let s = self.ready[k];
                self.submit_single(cx, s, now)?;
            }
            k += n;
        }
        if k < self.ready.len() {
            // Over the IO limit: the rest waits, back in ring order.
            for j in k..self.ready.len() {
                let s = self.ready[j];
                self.pending.push(s);
            }
            self.sort_pending();
        }
        if let Some(s) = start_ordering {
            self.start_ordering(cx, s, now)?;
        }
        self.reap_done(cx)
    }

    /// The largest merged IO for what is ready now: its bytes spread over the storage's
    /// lanes, at least [`MIN_SPREAD_BYTES`], at most the configured maximum. Over all the
    /// lanes, not only the free ones: what starts while some are busy waits in the device's
    /// queue, and a share of all lanes keeps each lane busy as it frees, where the free lanes'
    /// share would be a few large IOs serialised behind them (one lane free: one IO of
    /// everything).
    fn spread(&self, table: &RequestTable) -> u64 {
        let max = self.cfg.max_merge_bytes;
        if self.lanes <= 1 {
            return max;
        }
        let ready: u64 = self
            .ready
            .iter()
            .map(|&s| table.slot(s).req.nr_sectors * SECTOR_SIZE)
            .sum();
        ready
            .div_ceil(u64::from(self.lanes))
            .next_multiple_of(SECTOR_SIZE)
            .clamp(self.cfg.min_spread_bytes.min(max), max)
    }

    fn sort_pending(&mut self) {
        let marks = &self.marks;
        self.pending
            .sort_unstable_by_key(|&s| marks[s as usize].seq);
    }

    /// How many ready requests from index `k` form one merged IO.
    fn group_len(&self, table: &RequestTable, k: usize) -> usize {
        if !self.cfg.merge || !self.ios.has_merge_buffer() {
            return 1;
        }
        let s0 = self.ready[k];
        let first = table.slot(s0);
        if self.marks[s0 as usize].solo
            || !matches!(first.req.op, Operation::Read | Operation::Write)
        {
            return 1;
        }
        let (op, mut end) = (first.req.op, first.end());
        let mut bytes = first.req.nr_sectors * SECTOR_SIZE;
        let mut iovs = first.n_iov;
        if iovs > IOV_MAX {
            return 1;
        }
        let mut n = 1;
        while let Some(&s) = self.ready.get(k + n) {
            let r = table.slot(s);
            let b = r.req.nr_sectors * SECTOR_SIZE;
            if self.marks[s as usize].solo
                || r.req.op != op
                || r.req.sector != end
                || bytes + b > self.merge_cap
                || iovs + r.n_iov > IOV_MAX
            {
                break;
            }
            bytes += b;
            iovs += r.n_iov;
            end = r.end();
            n += 1;
        }
        n
    }

    /// Marks request `s` running, stamping its first submission.
    fn start_running(&mut self, table: &mut RequestTable, s: u32, parts: u16, now: u64) {
        let m = &mut self.marks[s as usize];
        m.stage = Stage::Running;
        m.parts_left = parts;
        m.next_member = NONE;
        let slot = table.slot_mut(s);
        if slot.t.submit == 0 {
            slot.t.submit = now;
            crate::probes::driver_queue(slot.req.id, u32::from(parts));
        }
    }

    fn start_ordering(&mut self, cx: &mut IoCx<'_>, s: u32, now: u64) -> io::Result<()> {
        self.ordering = true;
        self.start_running(cx.table, s, 1, now);
        let slot = cx.table.slot(s);
        let (start, end) = (slot.start(), slot.end());
        let kind = if slot.req.nr_segments > 0 {
            (IoKind::FlushData(s), IoOp::Write)
        } else {
            (IoKind::FlushSync(s), IoOp::Flush)
        };
        let tag = self
            .ios
            .alloc(kind.0, kind.1, start, end)
            .ok_or_else(|| io::Error::other("no free IO slot with nothing in flight"))?;
        self.submit_io(cx, tag)
    }

    /// Processes completions the engine reported synchronously during a submit.
    fn reap_done(&mut self, cx: &mut IoCx<'_>) -> io::Result<()> {
        while let Some((tag, res)) = self.done.0.pop() {
            self.sync_done += 1;
            self.io_done(cx, tag, res, 0)?;
        }
        Ok(())
    }

    fn finish_part(&mut self, table: &mut RequestTable, s: u32, failed: bool, now: u64) {
        let m = &mut self.marks[s as usize];
        m.failed |= failed;
        m.parts_left -= 1;
        if m.parts_left == 0 {
            m.stage = Stage::Finished;
            let slot = table.slot_mut(s);
            slot.t.complete = now;
            slot.status = if m.failed {
                blkif::protocol::status::ERROR
            } else {
                blkif::protocol::status::OKAY
            };
            crate::probes::driver_complete(slot.req.id, slot.status);
            self.finished.push(s);
        }
    }

    /// The engine reported IO `tag` done with `res` (0 or -errno). `now` stamps completions.
    pub fn io_done(&mut self, cx: &mut IoCx<'_>, tag: u32, res: i32, now: u64) -> io::Result<()> {
        let Some(io) = self.ios.finish(tag) else {
            return Ok(());
        };
        if res < 0 {
            cx.stats.io_errors.add(1);
        }
        match io.kind {
            IoKind::Free => {}
            IoKind::Single(s) | IoKind::Part { s, .. } => {
                self.finish_part(cx.table, s, res < 0, now)
            }
            IoKind::Merged { first, .. } => {
                let mut s = first;
                if res < 0 {
                    // Find out which requests fail: each goes back to wait, to be retried
                    // alone, in ring order with the rest.
                    cx.stats.sched.merge_retries.add(1);
                    while s != NONE {
                        let m = &mut self.marks[s as usize];
                        let next = m.next_member;
                        m.solo = true;
                        m.stage = Stage::Pending;
                        m.parts_left = 0;
                        self.pending.push(s);
                        s = next;
                    }
                    self.sort_pending();
                } else {
                    while s != NONE {
                        let next = self.marks[s as usize].next_member;
                        self.finish_part(cx.table, s, false, now);
                        s = next;
                    }
                }
            }
            IoKind::FlushData(s) => {
                if res < 0 {
                    self.ordering = false;
                    self.finish_part(cx.table, s, true, now);
                } else {
                    let t = self
                        .ios
                        .alloc(IoKind::FlushSync(s), IoOp::Flush, 0, 0)
                        .ok_or_else(|| io::Error::other("no free IO slot"))?;
                    self.submit_io(cx, t)?;
                }
            }
            IoKind::FlushSync(s) => {
                self.ordering = false;
                self.finish_part(cx.table, s, res < 0, now);
            }
        }
        self.reap_done(cx)
    }
}
