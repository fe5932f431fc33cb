//! The backend IOs the scheduler builds: their slots (one engine tag each), the merge iovec
//! buffers, and how a request or a run of merged requests becomes one or more IOs.

use std::io;

use blkif::protocol::SECTOR_SIZE;
use blkif::request::Operation;

use super::{IoCx, Sched, IOV_MAX, NONE};
use crate::driver::{BackendIo, IoOp, Memory};

/// What an IO slot carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum IoKind {
    Free,
    /// One request, its own iovecs.
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

/// One IO slot: an engine tag.
#[derive(Clone, Copy, Debug)]
pub(super) struct IoSlot {
    pub(super) kind: IoKind,
    pub(super) op: IoOp,
    pub(super) start: u64,
    pub(super) end: u64,
    /// Index in `active`.
    pos: u32,
}

/// The IO slots of a scheduler, the ones in flight, and the merge buffers.
pub(super) struct IoSlots {
    ios: Box<[IoSlot]>,
    free: Vec<u32>,
    /// In-flight IO tags.
    active: Vec<u32>,
    active_modifying: usize,
    merge_bufs: Box<[Box<[libc::iovec]>]>,
    free_bufs: Vec<u16>,
}

impl IoSlots {
    /// Slots for `requests` requests of up to `seg_cap` segments (a request splits into at
    /// most `seg_cap / IOV_MAX` IOs), with merge buffers if merging.
    pub(super) fn new(requests: usize, seg_cap: usize, merge: bool) -> IoSlots {
        let parts = seg_cap.div_ceil(IOV_MAX).max(1);
        let n = requests * parts;
        // A merged IO holds at least two requests: enough buffers for every request to be
        // in one (what is ready may be spread over many lanes), within reason.
        let n_bufs = if merge {
            (requests / 2).clamp(4, 128)
        } else {
            0
        };
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        IoSlots {
            ios: vec![
                IoSlot {
                    kind: IoKind::Free,
                    op: IoOp::Read,
                    start: 0,
                    end: 0,
                    pos: 0,
                };
                n
            ]
            .into_boxed_slice(),
            free: (0..n as u32).rev().collect(),
            active: Vec::with_capacity(n),
            active_modifying: 0,
            merge_bufs: (0..n_bufs)
                .map(|_| vec![empty; IOV_MAX].into_boxed_slice())
                .collect(),
            free_bufs: (0..n_bufs as u16).rev().collect(),
        }
    }

    /// Tags in all.
    pub(super) fn capacity(&self) -> usize {
        self.ios.len()
    }

    /// Tags in flight.
    pub(super) fn active(&self) -> usize {
        self.active.len()
    }

    pub(super) fn has_merge_buffer(&self) -> bool {
        !self.free_bufs.is_empty()
    }

    /// Whether an IO in flight overlaps `start..end` where either side modifies the disk.
    pub(super) fn conflicts(&self, start: u64, end: u64, modifies: bool) -> bool {
        if !modifies && self.active_modifying == 0 {
            return false;
        }
        self.active.iter().any(|&t| {
            let io = &self.ios[t as usize];
            (modifies || io.op.modifies()) && super::overlaps(start, end, io.start, io.end)
        })
    }

    /// Takes an IO slot; None if all are in flight.
    pub(super) fn alloc(&mut self, kind: IoKind, op: IoOp, start: u64, end: u64) -> Option<u32> {
        let tag = self.free.pop()?;
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

    /// IO `tag` is done: frees its slot (and merge buffer) and returns what it was, or None
    /// for a tag that is not in flight (ignored: an engine reporting twice).
    pub(super) fn finish(&mut self, tag: u32) -> Option<IoSlot> {
        let io = *self.ios.get(tag as usize)?;
        if io.kind == IoKind::Free {
            return None;
        }
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
        self.free.push(tag);
        Some(io)
    }

    fn get(&self, tag: u32) -> IoSlot {
        self.ios[tag as usize]
    }
}

impl Sched {
    pub(super) fn submit_single(&mut self, cx: &mut IoCx<'_>, s: u32, now: u64) -> io::Result<()> {
        let slot = cx.table.slot(s);
        let (start, end, n_iov) = (slot.start(), slot.end(), slot.n_iov);
        let op = match slot.req.op {
            Operation::Read => IoOp::Read,
            Operation::Discard { secure } => IoOp::Discard { secure },
            _ => IoOp::Write,
        };
        cx.stats.sched.requests.add(1);
        cx.stats.sched.segments.add(slot.req.nr_segments as u64);
        // Too many iovecs for one IO: consecutive parts of at most IOV_MAX iovecs each.
        let parts = n_iov.div_ceil(IOV_MAX).max(1);
        self.start_running(cx.table, s, parts as u16, now);
        for idx in 0..parts as u16 {
            let kind = if parts == 1 {
                IoKind::Single(s)
            } else {
                IoKind::Part { s, idx }
            };
            let io = self
                .ios
                .alloc(kind, op, start, end)
                .ok_or_else(|| io::Error::other("no free IO slot"))?;
            self.submit_io(cx, io)?;
        }
        Ok(())
    }

    pub(super) fn submit_merged(
        &mut self,
        cx: &mut IoCx<'_>,
        k: usize,
        n: usize,
        now: u64,
    ) -> io::Result<()> {
        let buf = self
            .ios
            .free_bufs
            .pop()
            .ok_or_else(|| io::Error::other("no free merge buffer"))?;
        let first = self.ready[k];
        let (op, start) = {
            let f = cx.table.slot(first);
            let op = if f.req.op == Operation::Read {
                IoOp::Read
            } else {
                IoOp::Write
            };
            (op, f.start())
        };
        let mut iv = 0usize;
        let mut prev = NONE;
        let mut end = start;
        let mut segments = 0u64;
        let mut memory = Memory::Stable;
        for j in 0..n {
            let s = self.ready[k + j];
            self.start_running(cx.table, s, 1, now);
            let slot = cx.table.slot(s);
            end = slot.end();
            if slot.memory == Memory::UnmappedAfterIo {
                memory = Memory::UnmappedAfterIo;
            }
            segments += slot.req.nr_segments as u64;
            let dst = &mut self.ios.merge_bufs[buf as usize];
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
                self.marks[prev as usize].next_member = s;
            }
            prev = s;
        }
        let stats = &cx.stats.sched;
        stats.requests.add(n as u64);
        stats.segments.add(segments);
        stats.merged_ios.add(1);
        let tag = self
            .ios
            .alloc(IoKind::Merged { first, buf }, op, start, end)
            .ok_or_else(|| io::Error::other("no free IO slot"))?;
        let io = BackendIo {
            tag,
            op,
            offset: start * SECTOR_SIZE,
            len: (end - start) * SECTOR_SIZE,
            iov: self.ios.merge_bufs[buf as usize].as_mut_ptr(),
            iovcnt: iv as u32,
            memory,
        };
        stats.ios.add(1);
        stats.io_iovecs.add(iv as u64);
        // SAFETY: the merge buffer and the pages it points at (the members' mapped grants)
        // stay untouched until the tag completes: the buffer returns to the free list and the
        // members are answered (and unmapped) only after `io_done` for this tag.
        unsafe { cx.engine.submit(cx.ring, io, &mut self.done) }
    }

    /// Submits IO slot `tag` as its kind describes.
    pub(super) fn submit_io(&mut self, cx: &mut IoCx<'_>, tag: u32) -> io::Result<()> {
        let io = self.ios.get(tag);
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
                    memory: Memory::Stable,
                };
                cx.stats.sched.flushes.add(1);
                // SAFETY: a flush points at no memory.
                return unsafe { cx.engine.submit(cx.ring, b, &mut self.done) };
            }
            IoKind::Merged { .. } | IoKind::Free => {
                return Err(io::Error::other("a merged or free IO slot resubmitted"))
            }
        };
        let slot = cx.table.slot_mut(s);
        let op = if matches!(io.kind, IoKind::FlushData(_)) {
            IoOp::Write
        } else {
            io.op
        };
        let b = if let IoOp::Discard { .. } = op {
            BackendIo {
                tag,
                op,
                offset: slot.start() * SECTOR_SIZE,
                len: slot.req.nr_sectors * SECTOR_SIZE,
                iov: std::ptr::null_mut(),
                iovcnt: 0,
                memory: Memory::Stable,
            }
        } else {
            let (first, cnt) = match part {
                None => (0, slot.n_iov),
                Some(idx) => (idx * IOV_MAX, (slot.n_iov - idx * IOV_MAX).min(IOV_MAX)),
            };
            let skip: u64 = slot.iov[..first].iter().map(|v| v.iov_len as u64).sum();
            let len: u64 = match part {
                None => slot.req.nr_sectors * SECTOR_SIZE,
                Some(_) => slot.iov[first..first + cnt]
                    .iter()
                    .map(|v| v.iov_len as u64)
                    .sum(),
            };
            BackendIo {
                tag,
                op,
                offset: slot.start() * SECTOR_SIZE + skip,
                len,
                // `first <= n_iov <= capacity`: a pointer inside (or one past) the array.
                iov: slot.iov[first..].as_mut_ptr(),
                iovcnt: cnt as u32,
                memory: slot.memory,
            }
        };
        if matches!(op, IoOp::Read | IoOp::Write) {
            cx.stats.sched.ios.add(1);
            cx.stats.sched.io_iovecs.add(u64::from(b.iovcnt));
        }
        // SAFETY: the iovecs live in the request's slot and point at its mapped pages; both
        // stay untouched until the tag completes (the slot is answered, unmapped and reused
        // only after `io_done` reports its last IO).
        unsafe { cx.engine.submit(cx.ring, b, &mut self.done) }
    }
}
