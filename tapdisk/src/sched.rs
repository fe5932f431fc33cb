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
//! - **Completion.** A request completes when all its IOs are done. If a merged IO fails, each
//!   of its requests is retried on its own, so only the requests whose own IO fails get an
//!   error.
//!
//! Everything is preallocated per ring: request slots, IO slots, iovec arrays, the scratch
//! lists of a dispatch. Nothing here allocates or locks.

use std::io;

use blkif::protocol::{Segment, SECTOR_SIZE};
use blkif::request::{Operation, Request};
use blkif::transport::MapHandle;

use crate::engine::{BackendIo, Done, Engine, IoOp, Uring};
use crate::stats::RingStats;

/// The kernel's limit on iovecs per readv/writev (`UIO_MAXIOV`).
pub const IOV_MAX: usize = 1024;

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
}

impl Default for SchedConfig {
    fn default() -> Self {
        SchedConfig {
            merge: true,
            max_merge_bytes: 1 << 20,
            max_ios: 0,
        }
    }
}

/// Where a request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Free.
    Idle,
    /// Waiting to be dispatched.
    Pending,
    /// Its IOs are in flight.
    Running,
    /// Done; waiting for the ring loop to answer it.
    Finished,
}

/// Timestamps of one request, ns on CLOCK_MONOTONIC (0: not reached).
#[derive(Clone, Copy, Debug, Default)]
pub struct Stamps {
    /// Popped from the ring.
    pub pop: u64,
    /// Validated and mapped; handed to the scheduler.
    pub sched: u64,
    /// Its (first) IO handed to the engine.
    pub submit: u64,
    /// Its last IO completed.
    pub complete: u64,
}

/// One request, as the scheduler and the ring loop share it.
pub struct ReqSlot {
    /// The validated request.
    pub req: Request,
    /// Its segments (copied from the ring or from indirect pages).
    pub segs: Box<[Segment]>,
    /// iovecs over the mapped pages (adjacent ones coalesced).
    pub iov: Box<[libc::iovec]>,
    /// iovecs in use.
    pub n_iov: usize,
    /// The grant mapping to release when the request is answered.
    pub map: MapHandle,
    /// Where it is.
    pub stage: Stage,
    /// Its timestamps.
    pub t: Stamps,
    /// The status to answer with, once finished.
    pub status: i16,
    parts_left: u16,
    failed: bool,
    /// Next member of the same merged IO.
    next_member: u32,
    /// Arrival order (ring order), to keep `pending` sorted by it.
    seq: u64,
    /// Never merge this request again (its merged IO failed; it is retried alone).
    solo: bool,
}

impl ReqSlot {
    fn new(seg_cap: usize) -> ReqSlot {
        ReqSlot {
            req: Request {
                id: 0,
                raw_op: 0,
                op: Operation::Read,
                sector: 0,
                nr_sectors: 0,
                nr_segments: 0,
            },
            segs: zeroed_segments(seg_cap),
            iov: zeroed_iovecs(seg_cap),
            n_iov: 0,
            map: MapHandle::default(),
            stage: Stage::Idle,
            t: Stamps::default(),
            status: 0,
            parts_left: 0,
            failed: false,
            next_member: NONE,
            seq: 0,
            solo: false,
        }
    }

    /// Points the iovecs at the mapped pages `addrs[i]` of the segments, coalescing segments
    /// that are adjacent in our address space.
    pub fn build_iov(&mut self, addrs: &[*mut u8]) {
        let mut n = 0usize;
        for (sg, &addr) in self.segs[..self.req.nr_segments].iter().zip(addrs) {
            let first = usize::from(sg.first_sect) * SECTOR_SIZE as usize;
            let len = usize::from(sg.last_sect - sg.first_sect + 1) * SECTOR_SIZE as usize;
            // SAFETY: a validated segment has `first + len <= 4096`, so the pointer stays
            // inside the mapped page.
            let base = unsafe { addr.add(first) };
            if n > 0 {
                let prev = &mut self.iov[n - 1];
                if prev.iov_base as usize + prev.iov_len == base as usize {
                    prev.iov_len += len;
                    continue;
                }
            }
            self.iov[n] = libc::iovec {
                iov_base: base.cast(),
                iov_len: len,
            };
            n += 1;
        }
        self.n_iov = n;
    }

    fn start(&self) -> u64 {
        self.req.sector
    }
    fn end(&self) -> u64 {
        self.req.sector + self.req.nr_sectors
    }
    fn modifies(&self) -> bool {
        matches!(self.req.op, Operation::Write | Operation::Discard { .. })
    }
    fn is_ordering(&self) -> bool {
        matches!(self.req.op, Operation::Flush | Operation::Barrier)
    }
}

const NONE: u32 = u32::MAX;

// Per-slot arrays are sized for the largest request the ring may carry (4096 segments with
// indirect requests: 96 KiB per slot). Zeroed allocations come from fresh pages the kernel
// maps on first touch, so a ring only pays for the slots and sizes it actually uses.

/// `n` all-zero segments.
pub fn zeroed_segments(n: usize) -> Box<[Segment]> {
    // SAFETY: `Segment` is plain integers; all-zero bytes are a valid value.
    unsafe { Box::<[Segment]>::new_zeroed_slice(n).assume_init() }
}

/// `n` all-zero iovecs.
pub fn zeroed_iovecs(n: usize) -> Box<[libc::iovec]> {
    // SAFETY: an iovec is a raw pointer and a length; all-zero bytes are a valid value (a
    // null pointer, length 0).
    unsafe { Box::<[libc::iovec]>::new_zeroed_slice(n).assume_init() }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IoKind {
    Free,
    /// One request, its own iovecs (or a slice of them: `Part`).
    Single(u32),
    /// Part `idx` of one request too large for one IO.
    Part {
        s: u32,
        idx: u16,
    },
    /// Several requests; members linked from the first; iovecs in a merge buffer.
    Merged {
        first: u32,
        buf: u16,
    },
    /// The data of a flush or barrier.
    FlushData(u32),
    /// The fdatasync of a flush or barrier.
    FlushSync(u32),
}

#[derive(Clone, Copy, Debug)]
struct IoSlot {
    kind: IoKind,
    op: IoOp,
    start: u64,
    end: u64,
    /// Index in `active`.
    pos: u32,
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
    slots: Box<[ReqSlot]>,
    ios: Box<[IoSlot]>,
    free_ios: Vec<u32>,
    /// In-flight IO tags.
    active: Vec<u32>,
    active_modifying: usize,
    merge_bufs: Box<[Box<[libc::iovec]>]>,
    free_bufs: Vec<u16>,
    /// Requests waiting to start, in ring order.
    pending: Vec<u32>,
    /// A flush or barrier is running: nothing else starts.
    ordering: bool,
    /// Finished requests for the ring loop to answer.
    finished: Vec<u32>,
    // Scratch for dispatch.
    ready: Vec<u32>,
    seen: Vec<Range>,
    done: Done,
    next_seq: u64,
    /// Backend IOs in flight at most (0: unlimited): the config's, or the engine's.
    io_limit: usize,
}

impl Sched {
    /// A scheduler for `slots` requests of up to `seg_cap` segments each.
    pub fn new(cfg: SchedConfig, slots: u32, seg_cap: usize) -> Sched {
        let n = slots as usize;
        // A request splits into at most this many IOs.
        let parts = seg_cap.div_ceil(IOV_MAX).max(1);
        let n_ios = n * parts;
        let n_bufs = if cfg.merge { (n / 4).clamp(4, 128) } else { 0 };
        Sched {
            cfg,
            slots: (0..n).map(|_| ReqSlot::new(seg_cap)).collect(),
            ios: vec![
                IoSlot {
                    kind: IoKind::Free,
                    op: IoOp::Read,
                    start: 0,
                    end: 0,
                    pos: 0,
                };
                n_ios
            ]
            .into_boxed_slice(),
            free_ios: (0..n_ios as u32).rev().collect(),
            active: Vec::with_capacity(n_ios),
            active_modifying: 0,
            merge_bufs: (0..n_bufs)
                .map(|_| {
                    vec![
                        libc::iovec {
                            iov_base: std::ptr::null_mut(),
                            iov_len: 0
                        };
                        IOV_MAX
                    ]
                    .into_boxed_slice()
                })
                .collect(),
            free_bufs: (0..n_bufs as u16).rev().collect(),
            pending: Vec::with_capacity(n),
            ordering: false,
            finished: Vec::with_capacity(n),
            ready: Vec::with_capacity(n),
            seen: Vec::with_capacity(n),
            done: Done::with_capacity(n_ios),
            next_seq: 0,
            io_limit: cfg.max_ios as usize,
        }
    }

    /// Takes the engine's wish for a limit on IOs in flight, unless the config sets one.
    pub fn set_engine_limit(&mut self, limit: Option<u32>) {
        self.io_limit = match (self.cfg.max_ios, limit) {
            (0, Some(l)) => l as usize,
            (c, _) => c as usize,
        };
    }

    /// Engine tags this scheduler uses (`0..tags()`).
    pub fn tags(&self) -> u32 {
        self.ios.len() as u32
    }

    /// The settings.
    pub fn config(&self) -> SchedConfig {
        self.cfg
    }

    /// Request slot `s`.
    pub fn slot(&self, s: u32) -> &ReqSlot {
        &self.slots[s as usize]
    }

    /// Request slot `s`, to fill in before [`Sched::enqueue`].
    pub fn slot_mut(&mut self, s: u32) -> &mut ReqSlot {
        &mut self.slots[s as usize]
    }

    /// IOs in flight.
    pub fn ios_in_flight(&self) -> usize {
        self.active.len()
    }

    /// Requests waiting to start.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Hands a validated, mapped request to the scheduler.
    pub fn enqueue(&mut self, s: u32) {
        let slot = &mut self.slots[s as usize];
        slot.stage = Stage::Pending;
        slot.failed = false;
        slot.parts_left = 0;
        slot.next_member = NONE;
        slot.seq = self.next_seq;
        slot.solo = false;
        self.next_seq += 1;
        self.pending.push(s);
    }

    /// Takes the requests that finished since the last call; the caller answers each
    /// (`slot(s).status`) and then calls [`Sched::release`].
    pub fn take_finished(&mut self, out: &mut Vec<u32>) {
        out.append(&mut self.finished);
    }

    /// Returns a finished request's slot to the free state.
    pub fn release(&mut self, s: u32) {
        self.slots[s as usize].stage = Stage::Idle;
    }

    fn alloc_io(&mut self, kind: IoKind, op: IoOp, start: u64, end: u64) -> Option<u32> {
        let tag = self.free_ios.pop()?;
        self.ios[tag as usize] = IoSlot {
            kind,
            op,
            start,
            end,
            pos: self.active.len() as u32,
        };
        self.active.push(tag);
        if op.modifies() {
            self.active_modifying += 1;
        }
        Some(tag)
    }

    fn free_io(&mut self, tag: u32) {
        let io = self.ios[tag as usize];
        let pos = io.pos as usize;
        self.active.swap_remove(pos);
        if let Some(&moved) = self.active.get(pos) {
            self.ios[moved as usize].pos = pos as u32;
        }
        if io.op.modifies() {
            self.active_modifying -= 1;
        }
        if let IoKind::Merged { buf, .. } = io.kind {
            self.free_bufs.push(buf);
        }
        self.ios[tag as usize].kind = IoKind::Free;
        self.free_ios.push(tag);
    }

    fn conflicts_in_flight(&self, s: &ReqSlot) -> bool {
        let m = s.modifies();
        if !m && self.active_modifying == 0 {
            return false;
        }
        self.active.iter().any(|&t| {
            let io = &self.ios[t as usize];
            (m || io.op.modifies()) && overlaps(s.start(), s.end(), io.start, io.end)
        })
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
    pub fn dispatch(
        &mut self,
        ring: &mut Uring,
        eng: &mut dyn Engine,
        stats: &RingStats,
        now: u64,
    ) -> io::Result<()> {
        if self.pending.is_empty() || self.ordering {
            return Ok(());
        }
        if self.io_limit > 0 && self.active.len() >= self.io_limit {
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
            let slot = &self.slots[s as usize];
            if slot.is_ordering() {
                if keep == 0 && self.ready.is_empty() && self.active.is_empty() {
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
            let slots = &self.slots;
            self.ready
                .sort_unstable_by_key(|&s| slots[s as usize].req.sector);
        }
        let mut k = 0;
        while k < self.ready.len() {
            if self.io_limit > 0 && self.active.len() >= self.io_limit {
                break;
            }
            let n = self.group_len(k);
            if n > 1 {
                self.submit_merged(k, n, ring, eng, stats, now)?;
            } else {
                let s = self.ready[k];
                self.submit_single(s, ring, eng, stats, now)?;
            }
            k += n;
        }
        if k < self.ready.len() {
            // Over the IO limit: the rest waits, back in ring order.
            for j in k..self.ready.len() {
                let s = self.ready[j];
                self.pending.push(s);
            }
            let slots = &self.slots;
            self.pending
                .sort_unstable_by_key(|&s| slots[s as usize].seq);
        }
        if let Some(s) = start_ordering {
            self.ordering = true;
            let slot = &mut self.slots[s as usize];
            slot.stage = Stage::Running;
            slot.t.submit = now;
            slot.parts_left = 1;
            let (start, end) = (slot.start(), slot.end());
            if slot.req.nr_segments > 0 {
                let io = self
                    .alloc_io(IoKind::FlushData(s), IoOp::Write, start, end)
                    .expect("an IO slot is free: nothing else is in flight");
                self.submit_io(io, ring, eng, stats)?;
            } else {
                let io = self
                    .alloc_io(IoKind::FlushSync(s), IoOp::Flush, 0, 0)
                    .expect("an IO slot is free: nothing else is in flight");
                self.submit_io(io, ring, eng, stats)?;
            }
        }
        self.reap_done(ring, eng, stats)
    }

    /// How many ready requests from index `k` form one merged IO.
    fn group_len(&self, k: usize) -> usize {
        if !self.cfg.merge || self.free_bufs.is_empty() {
            return 1;
        }
        let first = &self.slots[self.ready[k] as usize];
        if first.solo || !matches!(first.req.op, Operation::Read | Operation::Write) {
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
            let r = &self.slots[s as usize];
            let b = r.req.nr_sectors * SECTOR_SIZE;
            if r.solo
                || r.req.op != op
                || r.req.sector != end
                || bytes + b > self.cfg.max_merge_bytes
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

    fn submit_single(
        &mut self,
        s: u32,
        ring: &mut Uring,
        eng: &mut dyn Engine,
        stats: &RingStats,
        now: u64,
    ) -> io::Result<()> {
        let slot = &mut self.slots[s as usize];
        slot.stage = Stage::Running;
        if slot.t.submit == 0 {
            slot.t.submit = now;
        }
        let (start, end, n_iov) = (slot.start(), slot.end(), slot.n_iov);
        let op = match slot.req.op {
            Operation::Read => IoOp::Read,
            Operation::Discard { secure } => IoOp::Discard { secure },
            _ => IoOp::Write,
        };
        stats.sched.requests.add(1);
        stats.sched.segments.add(slot.req.nr_segments as u64);
        if n_iov <= IOV_MAX {
            slot.parts_left = 1;
            let io = self
                .alloc_io(IoKind::Single(s), op, start, end)
                .ok_or_else(|| io::Error::other("no free IO slot"))?;
            return self.submit_io(io, ring, eng, stats);
        }
        // Too many iovecs for one IO: consecutive parts of at most IOV_MAX iovecs each.
        let parts = n_iov.div_ceil(IOV_MAX);
        slot.parts_left = parts as u16;
        for idx in 0..parts as u16 {
            let io = self
                .alloc_io(IoKind::Part { s, idx }, op, start, end)
                .ok_or_else(|| io::Error::other("no free IO slot"))?;
            self.submit_io(io, ring, eng, stats)?;
        }
        Ok(())
    }

    fn submit_merged(
        &mut self,
        k: usize,
        n: usize,
        ring: &mut Uring,
        eng: &mut dyn Engine,
        stats: &RingStats,
        now: u64,
    ) -> io::Result<()> {
        let buf = self
            .free_bufs
            .pop()
            .expect("group_len checked for a buffer");
        let first = self.ready[k];
        let mut iv = 0usize;
        let mut prev = NONE;
        let (op, start) = {
            let f = &self.slots[first as usize];
            (
                if f.req.op == Operation::Read {
                    IoOp::Read
                } else {
                    IoOp::Write
                },
                f.start(),
            )
        };
        let mut end = start;
        let mut segments = 0u64;
        for j in 0..n {
            let s = self.ready[k + j];
            let slot = &mut self.slots[s as usize];
            slot.stage = Stage::Running;
            slot.parts_left = 1;
            slot.next_member = NONE;
            if slot.t.submit == 0 {
                slot.t.submit = now;
            }
            end = slot.end();
            segments += slot.req.nr_segments as u64;
            let dst = &mut self.merge_bufs[buf as usize];
            for v in &slot.iov[..slot.n_iov] {
                if iv > 0 {
                    let p = &mut dst[iv - 1];
                    if p.iov_base as usize + p.iov_len == v.iov_base as usize {
                        p.iov_len += v.iov_len;
                        continue;
                    }
                }
                dst[iv] = *v;
                iv += 1;
            }
            if prev != NONE {
                self.slots[prev as usize].next_member = s;
            }
            prev = s;
        }
        stats.sched.requests.add(n as u64);
        stats.sched.segments.add(segments);
        stats.sched.merged_ios.add(1);
        let tag = self
            .alloc_io(IoKind::Merged { first, buf }, op, start, end)
            .ok_or_else(|| io::Error::other("no free IO slot"))?;
        let io = BackendIo {
            tag,
            op,
            offset: start * SECTOR_SIZE,
            len: (end - start) * SECTOR_SIZE,
            iov: self.merge_bufs[buf as usize].as_mut_ptr(),
            iovcnt: iv as u32,
        };
        stats.sched.ios.add(1);
        stats.sched.io_iovecs.add(iv as u64);
        // SAFETY: the merge buffer and the pages it points at (the members' mapped grants)
        // stay untouched until the tag completes: the buffer returns to the free list and the
        // members are answered (and unmapped) only after `io_done` for this tag.
        unsafe { eng.submit(ring, io, &mut self.done) }
    }

    /// Submits IO slot `tag` as its kind describes.
    fn submit_io(
        &mut self,
        tag: u32,
        ring: &mut Uring,
        eng: &mut dyn Engine,
        stats: &RingStats,
    ) -> io::Result<()> {
        let io = self.ios[tag as usize];
        let (s, part) = match io.kind {
            IoKind::Single(s) | IoKind::FlushData(s) => (s, None),
            IoKind::Part { s, idx } => (s, Some(usize::from(idx))),
            IoKind::FlushSync(_) => {
                let b = BackendIo {
                    tag,
                    op: IoOp::Flush,
                    offset: 0,
                    len: 0,
                    iov: std::ptr::null_mut(),
                    iovcnt: 0,
                };
                stats.sched.flushes.add(1);
                // SAFETY: a flush points at no memory.
                return unsafe { eng.submit(ring, b, &mut self.done) };
            }
            IoKind::Merged { .. } | IoKind::Free => unreachable!("not submitted here"),
        };
        let slot = &mut self.slots[s as usize];
        let (iov, iovcnt, offset, len) = match part {
            None => (
                slot.iov.as_mut_ptr(),
                slot.n_iov as u32,
                slot.start() * SECTOR_SIZE,
                slot.req.nr_sectors * SECTOR_SIZE,
            ),
            Some(idx) => {
                let first = idx * IOV_MAX;
                let cnt = (slot.n_iov - first).min(IOV_MAX);
                let skip: u64 = slot.iov[..first].iter().map(|v| v.iov_len as u64).sum();
                let len: u64 = slot.iov[first..first + cnt]
                    .iter()
                    .map(|v| v.iov_len as u64)
                    .sum();
                (
                    // SAFETY: `first < n_iov <= capacity`.
                    unsafe { slot.iov.as_mut_ptr().add(first) },
                    cnt as u32,
                    slot.start() * SECTOR_SIZE + skip,
                    len,
                )
            }
        };
        let op = if matches!(io.kind, IoKind::FlushData(_)) {
            IoOp::Write
        } else {
            io.op
        };
        let b = BackendIo {
            tag,
            op,
            offset,
            len: if matches!(op, IoOp::Discard { .. }) {
                slot.req.nr_sectors * SECTOR_SIZE
            } else {
                len
            },
            iov: if matches!(op, IoOp::Discard { .. }) {
                std::ptr::null_mut()
            } else {
                iov
            },
            iovcnt: if matches!(op, IoOp::Discard { .. }) {
                0
            } else {
                iovcnt
            },
        };
        if matches!(op, IoOp::Read | IoOp::Write) {
            stats.sched.ios.add(1);
            stats.sched.io_iovecs.add(u64::from(b.iovcnt));
        }
        // SAFETY: the iovecs live in the request's slot and point at its mapped pages; both
        // stay untouched until the tag completes (the slot is answered, unmapped and reused
        // only after `io_done` reports its last IO).
        unsafe { eng.submit(ring, b, &mut self.done) }
    }

    /// Processes completions the engine reported synchronously during a submit.
    fn reap_done(
        &mut self,
        ring: &mut Uring,
        eng: &mut dyn Engine,
        stats: &RingStats,
    ) -> io::Result<()> {
        while let Some((tag, res)) = self.done.0.pop() {
            self.io_done(tag, res, ring, eng, stats, 0)?;
        }
        Ok(())
    }

    fn finish_part(&mut self, s: u32, failed: bool, now: u64) {
        let slot = &mut self.slots[s as usize];
        slot.failed |= failed;
        slot.parts_left -= 1;
        if slot.parts_left == 0 {
            slot.stage = Stage::Finished;
            slot.t.complete = now;
            slot.status = if slot.failed {
                blkif::protocol::status::ERROR
            } else {
                blkif::protocol::status::OKAY
            };
            self.finished.push(s);
        }
    }

    /// An engine reported IO `tag` done with `res` (0 or -errno). `now` stamps completions.
    pub fn io_done(
        &mut self,
        tag: u32,
        res: i32,
        ring: &mut Uring,
        eng: &mut dyn Engine,
        stats: &RingStats,
        now: u64,
    ) -> io::Result<()> {
        let Some(io) = self.ios.get(tag as usize).copied() else {
            return Ok(());
        };
        if io.kind == IoKind::Free {
            return Ok(());
        }
        self.free_io(tag);
        if res < 0 {
            stats.io_errors.add(1);
        }
        match io.kind {
            IoKind::Free => {}
            IoKind::Single(s) | IoKind::Part { s, .. } => self.finish_part(s, res < 0, now),
            IoKind::Merged { first, .. } => {
                let mut s = first;
                if res < 0 {
                    // Find out which requests fail: each goes back to wait, to be retried
                    // alone, in ring order with the rest.
                    stats.sched.merge_retries.add(1);
                    while s != NONE {
                        let slot = &mut self.slots[s as usize];
                        let next = slot.next_member;
                        slot.solo = true;
                        slot.stage = Stage::Pending;
                        slot.parts_left = 0;
                        self.pending.push(s);
                        s = next;
                    }
                    let slots = &self.slots;
                    self.pending
                        .sort_unstable_by_key(|&s| slots[s as usize].seq);
                } else {
                    while s != NONE {
                        let next = self.slots[s as usize].next_member;
                        self.finish_part(s, false, now);
                        s = next;
                    }
                }
            }
            IoKind::FlushData(s) => {
                if res < 0 {
                    self.ordering = false;
                    self.finish_part(s, true, now);
                } else {
                    let t = self
                        .alloc_io(IoKind::FlushSync(s), IoOp::Flush, 0, 0)
                        .ok_or_else(|| io::Error::other("no free IO slot"))?;
                    self.submit_io(t, ring, eng, stats)?;
                }
            }
            IoKind::FlushSync(s) => {
                self.ordering = false;
                self.finish_part(s, res < 0, now);
            }
        }
        self.reap_done(ring, eng, stats)
    }
}

#[cfg(test)]
mod tests {
    //! The scheduler against a reference model: whatever the batching, merging and completion
    //! order, the outcome equals executing the requests one by one in ring order, a request
    //! fails exactly when its own range holds a bad sector, and flushes run alone.

    use super::*;
    use proptest::prelude::*;

    const SECTORS: u64 = 64;

    /// An in-memory disk. IOs take effect when the test completes them, in any order.
    struct MemEngine {
        disk: Vec<u8>,
        bad: Vec<bool>,
        in_flight: Vec<BackendIo>,
        flushing: bool,
        violations: Vec<String>,
        merged_seen: usize,
        max_seen: usize,
    }

    impl MemEngine {
        fn complete_one(&mut self, i: usize, done: &mut Done) {
            let io = self.in_flight.swap_remove(i);
            let (a, b) = (io.offset / 512, (io.offset + io.len) / 512);
            let bad = (a..b).any(|s| self.bad[s as usize]);
            let res = if bad && io.op != IoOp::Flush {
                -libc::EIO
            } else {
                0
            };
            if res == 0 {
                let iov: &[libc::iovec] = if io.iovcnt == 0 {
                    &[]
                } else {
                    // SAFETY: the scheduler keeps the iovecs valid until we report the tag.
                    unsafe { std::slice::from_raw_parts(io.iov, io.iovcnt as usize) }
                };
                let mut off = io.offset as usize;
                match io.op {
                    IoOp::Read => {
                        for v in iov {
                            // SAFETY: as above: each iovec is a live test buffer.
                            let dst = unsafe {
                                std::slice::from_raw_parts_mut(v.iov_base.cast::<u8>(), v.iov_len)
                            };
                            dst.copy_from_slice(&self.disk[off..off + v.iov_len]);
                            off += v.iov_len;
                        }
                    }
                    IoOp::Write => {
                        for v in iov {
                            // SAFETY: as above.
                            let src = unsafe {
                                std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len)
                            };
                            self.disk[off..off + v.iov_len].copy_from_slice(src);
                            off += v.iov_len;
                        }
                    }
                    IoOp::Discard { .. } => {
                        self.disk[io.offset as usize..(io.offset + io.len) as usize].fill(0)
                    }
                    IoOp::Flush => {}
                }
            }
            if io.op == IoOp::Flush {
                self.flushing = false;
            }
            done.push(io.tag, res);
        }
    }

    impl Engine for MemEngine {
        unsafe fn submit(&mut self, _: &mut Uring, io: BackendIo, _: &mut Done) -> io::Result<()> {
            if self.flushing {
                self.violations
                    .push(format!("{io:?} submitted during a flush"));
            }
            if io.op == IoOp::Flush {
                if !self.in_flight.is_empty() {
                    self.violations
                        .push("flush submitted with IO in flight".into());
                }
                self.flushing = true;
            }
            if matches!(io.op, IoOp::Read | IoOp::Write) {
                // SAFETY: as in complete_one.
                let iov = unsafe { std::slice::from_raw_parts(io.iov, io.iovcnt as usize) };
                let sum: usize = iov.iter().map(|v| v.iov_len).sum();
                if sum as u64 != io.len {
                    self.violations
                        .push(format!("{io:?}: iovecs hold {sum} bytes"));
                }
                if io.len > 8 * 512 {
                    self.merged_seen += 1;
                }
            }
            self.in_flight.push(io);
            self.max_seen = self.max_seen.max(self.in_flight.len());
            Ok(())
        }
        fn complete(&mut self, _: &mut Uring, _: u64, _: i32, _: &mut Done) -> io::Result<()> {
            Ok(())
        }
        fn describe(&self) -> String {
            "memory".into()
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Read,
        Write(u8),
        Flush,
        Discard,
    }

    #[derive(Clone, Debug)]
    struct Req {
        op: Op,
        sector: u64,
        sectors: u64,
    }

    fn req_strategy() -> impl Strategy<Value = Req> {
        (0u8..10, 0..SECTORS, 1u64..=8, any::<u8>()).prop_map(|(k, sector, n, fill)| {
            let sectors = n.min(SECTORS - sector);
            let op = match k {
                0..=3 => Op::Read,
                4..=7 => Op::Write(fill),
                8 => Op::Flush,
                _ => Op::Discard,
            };
            Req {
                op,
                sector,
                sectors,
            }
        })
    }

    /// Runs `reqs` through the scheduler: batches of `batch` requests, completing a few IOs
    /// (chosen by `picks`) between batches. Returns each request's status and read data.
    fn run_sched(
        reqs: &[Req],
        bad: &[bool],
        merge: bool,
        batch: usize,
        picks: &[u16],
        max_ios: u32,
    ) -> (Vec<(i16, Vec<u8>)>, MemEngine, u64) {
        let slots = 16u32;
        let mut sched = Sched::new(
            SchedConfig {
                merge,
                max_merge_bytes: 16 * 512,
                max_ios,
            },
            slots,
            11,
        );
        let mut eng = MemEngine {
            disk: vec![0; (SECTORS * 512) as usize],
            bad: bad.to_vec(),
            in_flight: Vec::new(),
            flushing: false,
            violations: Vec::new(),
            merged_seen: 0,
            max_seen: 0,
        };
        let mut ring = Uring::new(8).unwrap();
        let stats = RingStats::default();
        let mut bufs: Vec<Vec<u8>> = vec![vec![0u8; 4096]; slots as usize];
        let mut owner: Vec<usize> = vec![usize::MAX; slots as usize];
        let mut free: Vec<u32> = (0..slots).rev().collect();
        let mut results: Vec<(i16, Vec<u8>)> = vec![(99, Vec::new()); reqs.len()];
        let mut finished = Vec::new();
        let mut next = 0usize;
        let mut pick = 0usize;
        let mut done = Done::with_capacity(64);
        let mut guard = 0;
        while next < reqs.len() || sched.ios_in_flight() > 0 || sched.pending() > 0 {
            guard += 1;
            assert!(guard < 100_000, "the scheduler stopped making progress");
            let mut n = 0;
            while n < batch && next < reqs.len() {
                let Some(s) = free.pop() else { break };
                let r = &reqs[next];
                let buf = &mut bufs[s as usize];
                let len = (r.sectors * 512) as usize;
                let (op, nseg) = match r.op {
                    Op::Read => (Operation::Read, 1),
                    Op::Write(fill) => {
                        buf[..len].fill(fill);
                        (Operation::Write, 1)
                    }
                    Op::Flush => (Operation::Flush, 0),
                    Op::Discard => (Operation::Discard { secure: false }, 0),
                };
                let slot = sched.slot_mut(s);
                slot.req = Request {
                    id: next as u64,
                    raw_op: 0,
                    op,
                    sector: if nseg == 0 && matches!(r.op, Op::Flush) {
                        0
                    } else {
                        r.sector
                    },
                    nr_sectors: if matches!(r.op, Op::Flush) {
                        0
                    } else {
                        r.sectors
                    },
                    nr_segments: nseg,
                };
                // Two iovecs when possible, to exercise coalescing and splitting.
                if nseg > 0 {
                    let half = (len / 2) & !511;
                    let base = buf.as_mut_ptr();
                    if half > 0 {
                        slot.iov[0] = libc::iovec {
                            iov_base: base.cast(),
                            iov_len: half,
                        };
                        // SAFETY: `half < len <= 4096`, inside the buffer.
                        let b2 = unsafe { base.add(half) };
                        slot.iov[1] = libc::iovec {
                            iov_base: b2.cast(),
                            iov_len: len - half,
                        };
                        slot.n_iov = 2;
                    } else {
                        slot.iov[0] = libc::iovec {
                            iov_base: base.cast(),
                            iov_len: len,
                        };
                        slot.n_iov = 1;
                    }
                } else {
                    slot.n_iov = 0;
                }
                owner[s as usize] = next;
                sched.enqueue(s);
                next += 1;
                n += 1;
            }
            sched.dispatch(&mut ring, &mut eng, &stats, 1).unwrap();
            // Complete some IOs in a chosen order.
            let k = 1 + picks.get(pick).copied().unwrap_or(0) as usize % 4;
            for _ in 0..k {
                if eng.in_flight.is_empty() {
                    break;
                }
                let i = picks.get(pick).copied().unwrap_or(0) as usize % eng.in_flight.len();
                pick += 1;
                eng.complete_one(i, &mut done);
                for (tag, res) in std::mem::take(&mut done.0) {
                    sched
                        .io_done(tag, res, &mut ring, &mut eng, &stats, 2)
                        .unwrap();
                }
            }
            sched.dispatch(&mut ring, &mut eng, &stats, 3).unwrap();
            sched.take_finished(&mut finished);
            for s in finished.drain(..) {
                let i = owner[s as usize];
                let slot = sched.slot(s);
                let data = if matches!(reqs[i].op, Op::Read) {
                    bufs[s as usize][..(reqs[i].sectors * 512) as usize].to_vec()
                } else {
                    Vec::new()
                };
                results[i] = (slot.status, data);
                sched.release(s);
                free.push(s);
            }
        }
        let ios = stats.sched.ios.get();
        (results, eng, ios)
    }

    /// Executes `reqs` one by one.
    fn reference(reqs: &[Req], bad: &[bool]) -> Vec<(i16, Vec<u8>)> {
        let mut disk = vec![0u8; (SECTORS * 512) as usize];
        reqs.iter()
            .map(|r| {
                let (a, b) = (r.sector, r.sector + r.sectors);
                let is_bad = (a..b).any(|s| bad[s as usize]);
                let range = (a * 512) as usize..(b * 512) as usize;
                match r.op {
                    Op::Flush => (0, Vec::new()),
                    _ if is_bad => (-1, Vec::new()),
                    Op::Read => (0, disk[range].to_vec()),
                    Op::Write(fill) => {
                        disk[range].fill(fill);
                        (0, Vec::new())
                    }
                    Op::Discard => {
                        disk[range].fill(0);
                        (0, Vec::new())
                    }
                }
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn matches_sequential_execution(
            reqs in proptest::collection::vec(req_strategy(), 1..120),
            bad_at in proptest::collection::vec(0..SECTORS, 0..3),
            merge in any::<bool>(),
            batch in 1usize..16,
            picks in proptest::collection::vec(any::<u16>(), 0..400),
            max_ios in 0u32..3,
        ) {
            let mut bad = vec![false; SECTORS as usize];
            for b in bad_at {
                bad[b as usize] = true;
            }
            let (got, eng, _) = run_sched(&reqs, &bad, merge, batch, &picks, max_ios);
            if max_ios > 0 {
                prop_assert!(eng.max_seen <= max_ios as usize, "{} IOs in flight", eng.max_seen);
            }
            prop_assert!(eng.violations.is_empty(), "{:?}", eng.violations);
            let want = reference(&reqs, &bad);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                prop_assert_eq!(g.0, w.0, "status of request {} {:?}", i, reqs[i]);
                if w.0 == 0 {
                    prop_assert!(g.1 == w.1, "data of request {} {:?}", i, reqs[i]);
                }
            }
        }
    }

    #[test]
    fn contiguous_requests_merge_and_a_failure_stays_with_its_request() {
        // 16 contiguous 4-sector writes in one batch; sector 21 is bad.
        let reqs: Vec<Req> = (0..16)
            .map(|i| Req {
                op: Op::Write(i as u8 + 1),
                sector: i * 4,
                sectors: 4,
            })
            .collect();
        let mut bad = vec![false; SECTORS as usize];
        bad[21] = true;
        let (got, eng, ios) = run_sched(&reqs, &bad, true, 16, &[0; 64], 0);
        assert!(eng.violations.is_empty());
        assert!(eng.merged_seen > 0, "contiguous writes were not merged");
        for (i, g) in got.iter().enumerate() {
            let want = if i == 5 { -1 } else { 0 };
            assert_eq!(g.0, want, "request {i}");
        }
        // Merged into 16-sector IOs: 4 of them, and the failed one retried as 4 singles.
        assert_eq!(ios, 4 + 4);
        let (_, _, ios) = run_sched(&reqs, &[false; 64], false, 16, &[0; 64], 0);
        assert_eq!(ios, 16, "without merging each request is an IO");
    }
}
