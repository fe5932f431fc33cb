//! Early read return on a ring: the layer between the intake and the scheduler for reads of a
//! frontend that set up the early-read contract (see [`crate::early`] for the policy and the
//! per-read state, and docs/early-read.md).
//!
//! An eligible read (mapped one iovec per segment) is filled from the read cache where it can,
//! and the rest is fetched in *chunks*: pieces of at most the policy's chunk size, each its own
//! request in a chunk slot of the table, enqueued so that the scheduler never merges them
//! back. Each page is mapped for the frontend the moment its data is in. The layer tells the
//! loop, as an [`Outcome`], when the policy lets the read be answered and when its last chunk
//! is done; the loop answers and releases ([`super::answer`]).

use std::sync::Arc;

use blkif::local::EarlyReadPort;
use blkif::protocol::{status, PAGE_SIZE};
use blkif::request::{Operation, Request};
use slog::{info, warn, Logger};

use super::RingTransport;
use crate::early::{
    continue_pages, segment_block, EarlyCounters, EarlyPolicy, EarlyReads, Outcome, ReadCache,
};
use crate::logging::RateLimit;
use crate::requests::RequestTable;
use crate::sched::Sched;

/// Reads larger than this many pages are not looked up in the cache page by page.
const MAX_LOOKUP: usize = 64 * 64;

/// What the layer needs of the loop while it works.
pub(super) struct EarlyCx<'a> {
    pub(super) table: &'a mut RequestTable,
    pub(super) sched: &'a mut Sched,
    pub(super) port: &'a EarlyReadPort,
    pub(super) stats: &'a EarlyCounters,
    pub(super) errors: &'a mut RateLimit,
    pub(super) log: &'a Logger,
}

impl EarlyCx<'_> {
    /// Maps segments `first..first+n` of request `s` for the frontend. A failure means the
    /// frontend broke its own mapping; its readers may fault, and are then served by the
    /// fault handler.
    fn map_for_frontend(&mut self, s: u32, first: usize, n: usize) {
        let segs = &self.table.slot(s).segs[first..first + n];
        if let Err(e) = continue_pages(self.port, segs) {
            if self.errors.check().is_some() {
                warn!(self.log, "cannot map pages for the frontend"; "error" => %e);
            }
        }
    }
}

/// The early-read layer of one ring.
pub(super) struct EarlyLayer {
    reads: EarlyReads,
    cache: Option<Arc<ReadCache>>,
    /// The first chunk slot of the table.
    first_chunk: u32,
    /// Per chunk slot (minus `first_chunk`): its read's slot and first segment.
    chunk_of: Box<[(u32, u32)]>,
    /// Early reads answered or not whose pages are still being filled.
    busy: u32,
    /// One block, for cache lookups.
    block_buf: Box<[u8]>,
}

impl EarlyLayer {
    /// The layer for a ring of `n` slots, if the frontend set up the contract and the
    /// settings ask for early reads or a cache.
    pub(super) fn new<T: RingTransport>(
        t: &T,
        n: u32,
        seg_cap: usize,
        policy: Option<EarlyPolicy>,
        cache: Option<Arc<ReadCache>>,
        log: &Logger,
    ) -> Option<EarlyLayer> {
        let reads = match (t.early_read(), policy) {
            (Some(port), Some(p)) if p.answers_early() || p.cache_mb > 0 => {
                EarlyReads::new(p, n, seg_cap, port.pages)
            }
            (None, Some(p)) if p.answers_early() => {
                info!(
                    log,
                    "early read return stays off on this ring: the frontend did not \
                            set up the early-read contract (Xen frontends cannot)"
                );
                return None;
            }
            _ => return None,
        };
        let chunks = (n * 8).min(16384);
        Some(EarlyLayer {
            reads,
            cache,
            first_chunk: n,
            chunk_of: vec![(0, 0); chunks as usize].into_boxed_slice(),
            busy: 0,
            block_buf: vec![0u8; PAGE_SIZE].into_boxed_slice(),
        })
    }

    /// Chunk slots the table must have.
    pub(super) fn chunk_slots(&self) -> u32 {
        self.chunk_of.len() as u32
    }

    /// Early reads whose pages are still being filled.
    pub(super) fn busy(&self) -> u32 {
        self.busy
    }

    /// Whether `req` goes through the layer.
    pub(super) fn eligible(&self, req: &Request) -> bool {
        self.reads.eligible(req)
    }

    /// Copies what the cache has of read `s` into its pages; returns the hit bitmap and count.
    fn fill_from_cache(&mut self, table: &RequestTable, s: u32) -> ([u64; 64], u32) {
        let mut hit = [0u64; 64];
        let mut hits = 0u32;
        let Some(cache) = &self.cache else {
            return (hit, 0);
        };
        let slot = table.slot(s);
        let mut sector = slot.req.sector;
        for i in 0..slot.req.nr_segments.min(MAX_LOOKUP) {
            let sg = slot.segs[i];
            if let Some(b) = segment_block(sector, &sg) {
                if cache.get(b, &mut self.block_buf) {
                    let v = slot.iov[i];
                    // SAFETY: iovec `i` (exact, one per segment) points at the mapped page of
                    // a whole-page segment: 4096 writable bytes, which the frontend cannot see
                    // yet (unmapped there until we continue it).
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
        (hit, hits)
    }

    /// Starts read `s` (validated, mapped, one iovec per segment): fills what the cache has,
    /// fetches the rest in chunks. None (nothing done) if there are not enough chunk slots;
    /// otherwise what the policy says now.
    pub(super) fn start(&mut self, cx: &mut EarlyCx<'_>, s: u32, now: u64) -> Option<Outcome> {
        let chunk = self.reads.chunk_pages();
        let req = cx.table.slot(s).req;
        let n = req.nr_segments;
        // The cache first (the patent's steps 310-315): whole aligned 4 KiB blocks.
        let (hit, hits) = self.fill_from_cache(cx.table, s);
        // Chunks: runs of missing segments, at most `chunk` long.
        let misses = Runs::new(hit, n, false, chunk);
        if misses.count() > cx.table.chunks_free() {
            return None;
        }
        cx.stats.reads.add(1);
        cx.stats.cache_hits.add(u64::from(hits));
        cx.stats.cache_misses.add(n as u64 - u64::from(hits));
        self.reads.begin(s, &req, &cx.table.slot(s).segs[..n], now);
        self.busy += 1;
        // Enqueue the chunks.
        for (i, k) in Runs::new(hit, n, false, chunk) {
            let c = cx.table.take_chunk()?;
            let (read, slot) = cx.table.pair_mut(s, c);
            let sector = read.req.sector + read.sectors_of(0, i);
            slot.segs[..k].copy_from_slice(&read.segs[i..i + k]);
            slot.iov[..k].copy_from_slice(&read.iov[i..i + k]);
            slot.n_iov = k;
            slot.req = Request {
                id: req.id,
                raw_op: req.raw_op,
                op: Operation::Read,
                sector,
                nr_sectors: read.sectors_of(i, i + k),
                nr_segments: k,
            };
            slot.t = read.t;
            self.chunk_of[(c - self.first_chunk) as usize] = (s, i as u32);
            self.reads.chunk_issued(s);
            cx.sched.enqueue_solo(c);
        }
        // Cache hits are filled: map them for the frontend now.
        if hits > 0 {
            for (i, k) in Runs::new(hit, n, true, n) {
                let segs = &cx.table.slot(s).segs[i..i + k];
                self.reads.fill(s, i, segs, now, cx.stats);
                cx.map_for_frontend(s, i, k);
            }
        }
        Some(self.reads.decide(s))
    }

    /// Chunk slot `c` finished: keeps its data in the cache, maps its pages for the frontend
    /// (poisoned if it failed after its read was answered), releases the chunk slot. Returns
    /// the read and what the policy says about it now.
    pub(super) fn chunk_finished(
        &mut self,
        cx: &mut EarlyCx<'_>,
        c: u32,
        now: u64,
    ) -> (u32, Outcome) {
        let (s, first) = self.chunk_of[(c - self.first_chunk) as usize];
        let (ok, k) = {
            let slot = cx.table.slot(c);
            (slot.status == status::OKAY, slot.req.nr_segments)
        };
        let first = first as usize;
        if ok {
            // Keep what was read, then let the frontend see it.
            if let Some(cache) = &self.cache {
                let p = cx.table.slot(s);
                let mut sector = p.req.sector + p.sectors_of(0, first);
                for i in first..first + k {
                    let sg = p.segs[i];
                    if let Some(b) = segment_block(sector, &sg) {
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
            let segs = &cx.table.slot(s).segs[first..first + k];
            self.reads.fill(s, first, segs, now, cx.stats);
            cx.map_for_frontend(s, first, k);
        } else if self.reads.was_answered(s) {
            // Answered already: nobody may wait forever, nobody may read garbage unknowing.
            // Poison the pages, map them (stalled readers wake), and report at the end.
            let p = cx.table.slot(s);
            for v in &p.iov[first..first + k] {
                // SAFETY: the iovec points at `iov_len` writable bytes of a mapped page of
                // this request, which the frontend cannot see until we continue it.
                unsafe {
                    std::ptr::write_bytes(v.iov_base.cast::<u8>(), blkif::early::POISON, v.iov_len)
                };
            }
            let segs = &cx.table.slot(s).segs[first..first + k];
            self.reads.fill(s, first, segs, now, cx.stats);
            cx.map_for_frontend(s, first, k);
        }
        cx.sched.release(c);
        cx.table.release(c);
        (s, self.reads.chunk_done(s, ok, now))
    }

    /// Read `s` is about to be answered early with `st`: the status to send (the frontend
    /// learns that pages are still coming) and the counts.
    pub(super) fn answering(&mut self, s: u32, st: i16, stats: &EarlyCounters) -> i16 {
        let unfilled = self.reads.answered(s);
        if unfilled > 0 {
            stats.answered_early.add(1);
            stats.pages_unmapped.add(u64::from(unfilled));
            if st == status::OKAY {
                return blkif::local::STATUS_EARLY;
            }
        }
        st
    }

    /// Every chunk of read `s` is done with `st`. Returns what the loop still owes the
    /// frontend, and forgets the read (its slot is the loop's to release).
    pub(super) fn finish(
        &mut self,
        table: &RequestTable,
        s: u32,
        st: i16,
        stats: &EarlyCounters,
    ) -> Owed {
        let owed = if !self.reads.was_answered(s) {
            self.reads.answered(s);
            Owed::Answer(st)
        } else if self.reads.answered_early(s) {
            if st != status::OKAY {
                stats.late_failures.add(1);
            }
            Owed::Report(st == status::OKAY)
        } else {
            Owed::Nothing
        };
        let slot = table.slot(s);
        self.reads.end(s, &slot.segs[..slot.req.nr_segments]);
        self.busy -= 1;
        owed
    }

    /// The frontend faulted on guest memory: maps pages that are filled (or belong to no
    /// read), leaves the others stalled until their data is in.
    pub(super) fn faulted(&mut self, page: u32, now: u64, stats: &EarlyCounters) -> bool {
        self.reads.faulted(page, now, stats)
    }
}

/// What the loop owes the frontend when an early read's last chunk is done.
pub(super) enum Owed {
    /// The read was never answered: answer it with this status.
    Answer(i16),
    /// It was answered early: send its completion record (success or not).
    Report(bool),
    /// It was answered when complete: nothing more.
    Nothing,
}

/// Runs of segments that were (or were not) cache hits, at most `max` long: `(first, len)`.
#[derive(Clone, Copy)]
struct Runs {
    hit: [u64; 64],
    n: usize,
    i: usize,
    want_hit: bool,
    max: usize,
}

impl Runs {
    fn new(hit: [u64; 64], n: usize, want_hit: bool, max: usize) -> Runs {
        Runs {
            hit,
            n,
            i: 0,
            want_hit,
            max: max.max(1),
        }
    }

    fn is_hit(&self, i: usize) -> bool {
        i < MAX_LOOKUP && self.hit[i / 64] & (1 << (i % 64)) != 0
    }
}

impl Iterator for Runs {
    type Item = (usize, usize);
    fn next(&mut self) -> Option<(usize, usize)> {
        while self.i < self.n && self.is_hit(self.i) != self.want_hit {
            self.i += 1;
        }
        if self.i >= self.n {
            return None;
        }
        let first = self.i;
        while self.i < self.n && self.is_hit(self.i) == self.want_hit && self.i - first < self.max {
            self.i += 1;
        }
        Some((first, self.i - first))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_split_misses_into_chunks_and_gather_hits() {
        let mut hit = [0u64; 64];
        for i in [2usize, 3, 7] {
            hit[0] |= 1 << i;
        }
        let misses: Vec<_> = Runs::new(hit, 10, false, 2).collect();
        assert_eq!(misses, vec![(0, 2), (4, 2), (6, 1), (8, 2)]);
        let hits: Vec<_> = Runs::new(hit, 10, true, 10).collect();
        assert_eq!(hits, vec![(2, 2), (7, 1)]);
        assert_eq!(Runs::new([0; 64], 0, false, 4).count(), 0);
    }
}
