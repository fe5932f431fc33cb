//! The request table of one ring: every request the loop holds, from the moment its slot is
//! taken until the slot is released.
//!
//! The table owns the request slots (the validated request, its segments, its iovecs over the
//! mapped pages, its grant mapping, its timestamps and the status it is answered with), the
//! free lists, and the set of ids in flight that catches a frontend reusing one. The scheduler
//! keeps only its own bookkeeping per slot ([`crate::sched`]); the early-read layer borrows
//! the extra *chunk* slots for the pieces of the reads it splits.
//!
//! A ring slot goes: taken ([`RequestTable::take`]) while the request is parsed and mapped;
//! then either given back (refused: nothing recorded) or admitted ([`RequestTable::admit`]:
//! its id is in flight); answered ([`RequestTable::answered`]: the id may be reused); released
//! ([`RequestTable::release`]: back on the free list). An early read is answered before it is
//! released; every other request in one go.

mod idset;

use blkif::protocol::{Segment, SECTOR_SIZE};
use blkif::request::{Operation, Request};
use blkif::transport::{MapHandle, Memory};

use idset::IdSet;

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

/// One request.
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
    /// Whether its pages outlive its IO (direct IO allowed) or not.
    pub memory: Memory,
    /// Its timestamps.
    pub t: Stamps,
    /// The status to answer with, once its IO finished.
    pub status: i16,
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
            memory: Memory::Stable,
            t: Stamps::default(),
            status: 0,
        }
    }

    /// Points the iovecs at the mapped pages `addrs[i]` of the segments, coalescing segments
    /// that are adjacent in our address space.
    pub fn build_iov(&mut self, addrs: &[*mut u8]) {
        self.build_iov_inner(addrs, true)
    }

    /// As [`ReqSlot::build_iov`], one iovec per segment (iovec `i` is segment `i`).
    pub fn build_iov_exact(&mut self, addrs: &[*mut u8]) {
        self.build_iov_inner(addrs, false)
    }

    fn build_iov_inner(&mut self, addrs: &[*mut u8], coalesce: bool) {
        let mut n = 0usize;
        for (sg, &addr) in self.segs[..self.req.nr_segments].iter().zip(addrs) {
            let first = usize::from(sg.first_sect) * SECTOR_SIZE as usize;
            let len = usize::from(sg.last_sect - sg.first_sect + 1) * SECTOR_SIZE as usize;
            // SAFETY: a validated segment has `first + len <= 4096`, so the pointer stays
            // inside the mapped page.
            let base = unsafe { addr.add(first) };
            if n > 0 && coalesce {
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

    /// First sector.
    pub fn start(&self) -> u64 {
        self.req.sector
    }

    /// One past the last sector.
    pub fn end(&self) -> u64 {
        self.req.sector + self.req.nr_sectors
    }

    /// Whether it changes the disk (a write or a discard).
    pub fn modifies(&self) -> bool {
        self.req.op.writes() || matches!(self.req.op, Operation::Discard { .. })
    }

    /// Whether it orders everything around it (a flush or a barrier).
    pub fn is_ordering(&self) -> bool {
        matches!(self.req.op, Operation::Flush | Operation::Barrier)
    }

    /// Sectors of segments `a..b`.
    pub fn sectors_of(&self, a: usize, b: usize) -> u64 {
        self.segs[a..b]
            .iter()
            .map(|g| u64::from(g.last_sect - g.first_sect + 1))
            .sum()
    }
}

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

/// The requests of one ring.
pub struct RequestTable {
    slots: Box<[ReqSlot]>,
    /// Slots `0..ring_slots` hold ring requests; the rest are chunk slots.
    ring_slots: u32,
    free: Vec<u32>,
    chunk_free: Vec<u32>,
    ids: IdSet,
    /// Admitted and not yet answered.
    in_flight: u32,
}

impl RequestTable {
    /// A table for `ring_slots` requests and `chunk_slots` chunks of early reads, of up to
    /// `seg_cap` segments each.
    pub fn new(ring_slots: u32, chunk_slots: u32, seg_cap: usize) -> RequestTable {
        let n = ring_slots + chunk_slots;
        RequestTable {
            slots: (0..n).map(|_| ReqSlot::new(seg_cap)).collect(),
            ring_slots,
            free: (0..ring_slots).rev().collect(),
            chunk_free: (ring_slots..n).rev().collect(),
            ids: IdSet::new(ring_slots as usize),
            in_flight: 0,
        }
    }

    /// Slots in all (ring and chunk): the scheduler's size.
    pub fn len(&self) -> u32 {
        self.slots.len() as u32
    }

    /// Whether the table has no slots at all.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Segments a slot holds at most.
    pub fn segment_capacity(&self) -> usize {
        self.slots.first().map_or(0, |s| s.segs.len())
    }

    /// Slot `s`.
    pub fn slot(&self, s: u32) -> &ReqSlot {
        &self.slots[s as usize]
    }

    /// Slot `s`, to fill in or update.
    pub fn slot_mut(&mut self, s: u32) -> &mut ReqSlot {
        &mut self.slots[s as usize]
    }

    /// Two different slots at once (`a != b`).
    pub fn pair_mut(&mut self, a: u32, b: u32) -> (&mut ReqSlot, &mut ReqSlot) {
        assert_ne!(a, b, "one slot borrowed twice");
        let (a, b) = (a as usize, b as usize);
        if a < b {
            let (x, y) = self.slots.split_at_mut(b);
            (&mut x[a], &mut y[0])
        } else {
            let (x, y) = self.slots.split_at_mut(a);
            (&mut y[0], &mut x[b])
        }
    }

    /// Whether a ring slot is free.
    pub fn has_free(&self) -> bool {
        !self.free.is_empty()
    }

    /// Whether request id `id` is in flight (admitted and not answered).
    pub fn id_in_flight(&self, id: u64) -> bool {
        self.ids.contains(id)
    }

    /// Takes a free ring slot for a request about to be parsed.
    pub fn take(&mut self) -> Option<u32> {
        self.free.pop()
    }

    /// Returns a slot taken for a request that was refused.
    pub fn give_back(&mut self, s: u32) {
        self.free.push(s);
    }

    /// Records slot `s`'s request (filled in) as in flight.
    pub fn admit(&mut self, s: u32) {
        let id = self.slots[s as usize].req.id;
        // The caller checked `id_in_flight`, and a ring never holds more ids than slots.
        let fresh = self.ids.insert(id);
        debug_assert!(fresh, "id {id:#x} admitted twice");
        self.in_flight += 1;
        debug_assert_eq!(self.ids.len(), self.in_flight as usize);
    }

    /// Slot `s`'s request was answered: its id may come again.
    pub fn answered(&mut self, s: u32) {
        let id = self.slots[s as usize].req.id;
        self.ids.remove(id);
        self.in_flight -= 1;
    }

    /// Puts slot `s` (ring or chunk) back on its free list.
    pub fn release(&mut self, s: u32) {
        if self.is_chunk(s) {
            self.chunk_free.push(s);
        } else {
            self.free.push(s);
        }
    }

    /// Requests admitted and not yet answered.
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Whether `s` is a chunk slot.
    pub fn is_chunk(&self, s: u32) -> bool {
        s >= self.ring_slots
    }

    /// Free chunk slots.
    pub fn chunks_free(&self) -> usize {
        self.chunk_free.len()
    }

    /// Takes a chunk slot.
    pub fn take_chunk(&mut self) -> Option<u32> {
        self.chunk_free.pop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_cycle_and_ids_are_tracked() {
        let mut t = RequestTable::new(2, 1, 11);
        assert_eq!(t.len(), 3);
        let a = t.take().unwrap();
        let b = t.take().unwrap();
        assert!(t.take().is_none() && !t.has_free());
        t.slot_mut(a).req.id = 7;
        t.admit(a);
        assert!(t.id_in_flight(7) && !t.id_in_flight(8));
        t.give_back(b);
        assert!(t.has_free());
        assert_eq!(t.in_flight(), 1);
        t.answered(a);
        assert!(!t.id_in_flight(7));
        t.release(a);
        assert_eq!(t.in_flight(), 0);
        let c = t.take_chunk().unwrap();
        assert!(t.is_chunk(c) && t.take_chunk().is_none());
        t.release(c);
        assert_eq!(t.chunks_free(), 1);
        let (x, y) = t.pair_mut(2, 0);
        x.n_iov = 1;
        y.n_iov = 2;
        assert_eq!((t.slot(2).n_iov, t.slot(0).n_iov), (1, 2));
    }

    #[test]
    fn iovecs_coalesce_adjacent_pages() {
        let mut t = RequestTable::new(1, 0, 11);
        let s = t.slot_mut(0);
        s.req.nr_segments = 3;
        for (i, sg) in s.segs.iter_mut().take(3).enumerate() {
            sg.first_sect = if i == 0 { 1 } else { 0 };
            sg.last_sect = 7;
        }
        let mut page = vec![0u8; 3 * 4096];
        let base = page.as_mut_ptr();
        // SAFETY: offsets inside the 3-page buffer.
        let addrs = unsafe { [base, base.add(4096), base.add(3 * 4096 - 4096)] };
        s.build_iov(&addrs[..3]);
        // Pages 0 and 1 are adjacent; page 2 here is page 2 too, adjacent to 1.
        assert_eq!(s.n_iov, 1);
        assert_eq!(s.iov[0].iov_len, 3 * 4096 - 512);
        s.build_iov_exact(&addrs[..3]);
        assert_eq!(s.n_iov, 3);
        assert_eq!(s.sectors_of(0, 3), 7 + 8 + 8);
    }
}
