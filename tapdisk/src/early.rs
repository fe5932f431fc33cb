//! Early read return: answer a read before all of it has come from the disk.
//!
//! After US patent 9,298,375 (returning reads in the presence of partial data
//! unavailability): a read is first filled from a host-side cache ([`ReadCache`]); the rest
//! is fetched in chunks, in order; as soon as a policy ([`EarlyPolicy`]) is met the read is
//! answered, while the remaining chunks continue. The frontend (early-read mode of the local
//! transport, [`blkif::early`]) has unmapped the read's pages; each page is mapped for it
//! (`UFFDIO_CONTINUE`) the moment its data is in, and a frontend thread that touches a page
//! still missing stalls on a userfaultfd fault until it is. The request's slot and grant
//! mapping are released when its last page is filled. If a chunk fails after the read was
//! answered, its pages are filled with [`blkif::early::POISON`], mapped (no reader hangs), and
//! the frontend is told on the transport socket (no reader goes on unknowing).
//!
//! Policies, each optional, combined with "any": a percentage of the read filled; the first
//! X % filled and Y % of the rest; at most N of its IOs outstanding; the estimated time to
//! fill the rest (recent chunk service times) under a bound; and sequential read-ahead (after
//! a run of sequential reads, a stream's reads are answered once their first X % are in).
//!
//! On Xen there is no safe way to do this for an unmodified PV guest (blkfront ends its grant
//! access when it sees the response); tapdisk only does early reads on rings whose frontend
//! set up the userfaultfd contract. See docs/early-read.md for the Xen design left for later.

use std::collections::HashMap;
use std::sync::Mutex;

use blkif::local::EarlyReadPort;
use blkif::protocol::{Segment, PAGE_SIZE, SECTOR_SIZE};
use blkif::request::{Operation, Request};
use serde::Serialize;
use tapdisk_control::EarlyPolicy;

use crate::stats::Counter;

/// The state of one read, as the policy sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadState {
    /// Pages (segments) in the read.
    pub pages: u32,
    /// Pages filled.
    pub filled: u32,
    /// Pages filled from the start without a gap.
    pub prefix: u32,
    /// Chunk IOs still outstanding.
    pub outstanding: u32,
    /// Part of a sequential stream.
    pub sequential: bool,
}

fn at_least(pages: u32, percent: u8) -> u32 {
    (u64::from(pages) * u64::from(percent)).div_ceil(100) as u32
}

/// Whether `p` lets the read be answered now; `eta_ns` is the estimated time to fill the rest.
pub fn should_answer(p: &EarlyPolicy, r: &ReadState, eta_ns: Option<u64>) -> bool {
    if r.filled >= r.pages {
        return true;
    }
    if let Some(x) = p.percent {
        if r.filled >= at_least(r.pages, x) {
            return true;
        }
    }
    if let Some((x, y)) = p.first_then {
        let first = at_least(r.pages, x);
        if r.prefix >= first && r.filled - first >= at_least(r.pages - first, y) {
            return true;
        }
    }
    if let Some(n) = p.outstanding {
        if r.outstanding <= n {
            return true;
        }
    }
    if let (Some(b), Some(eta)) = (p.eta_us, eta_ns) {
        if eta <= u64::from(b) * 1000 {
            return true;
        }
    }
    if let Some((_, x)) = p.sequential {
        if r.sequential && r.prefix >= at_least(r.pages, x) {
            return true;
        }
    }
    false
}

/// Counters of early reads, per ring.
#[derive(Debug, Default)]
pub struct EarlyCounters {
    /// Reads handled by the early-read layer.
    pub reads: Counter,
    /// Of those, answered before all their pages were filled.
    pub answered_early: Counter,
    /// Pages still unmapped (not filled) when their read was answered.
    pub pages_unmapped: Counter,
    /// Faults the frontend took on its guest memory.
    pub faults: Counter,
    /// Of those, on pages not yet filled: a reader stalled.
    pub stalls: Counter,
    /// Time readers spent stalled, ns.
    pub stall_ns: Counter,
    /// Pages served from the cache.
    pub cache_hits: Counter,
    /// Pages that had to come from the disk.
    pub cache_misses: Counter,
    /// Reads that failed after they had been answered early.
    pub late_failures: Counter,
}

crate::stats::absorb_fields!(EarlyCounters {
    reads,
    answered_early,
    pages_unmapped,
    faults,
    stalls,
    stall_ns,
    cache_hits,
    cache_misses,
    late_failures,
});

/// Early-read figures for output.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct EarlyTotals {
    /// Reads handled by the early-read layer.
    pub reads: u64,
    /// Answered before all their pages were filled.
    pub answered_early: u64,
    /// Pages unmapped when their read was answered.
    pub pages_unmapped: u64,
    /// Faults taken by the frontend.
    pub faults: u64,
    /// Faults on unfilled pages (a reader stalled).
    pub stalls: u64,
    /// Total stall time, µs.
    pub stall_us: f64,
    /// Pages served from the cache.
    pub cache_hits: u64,
    /// Pages read from the disk.
    pub cache_misses: u64,
    /// Reads that failed after being answered.
    pub late_failures: u64,
}

/// Sums the counters of several rings.
pub fn totals<'a>(cs: impl IntoIterator<Item = &'a EarlyCounters>) -> EarlyTotals {
    let mut t = EarlyTotals::default();
    for c in cs {
        t.reads += c.reads.get();
        t.answered_early += c.answered_early.get();
        t.pages_unmapped += c.pages_unmapped.get();
        t.faults += c.faults.get();
        t.stalls += c.stalls.get();
        t.stall_us += c.stall_ns.get() as f64 / 1000.0;
        t.cache_hits += c.cache_hits.get();
        t.cache_misses += c.cache_misses.get();
        t.late_failures += c.late_failures.get();
    }
    t
}

// ---- The cache ------------------------------------------------------------------------------

const BLOCK: usize = PAGE_SIZE;
const BLOCK_SECTORS: u64 = (BLOCK as u64) / SECTOR_SIZE;

struct CacheInner {
    map: HashMap<u64, u32>,
    keys: Vec<u64>,
    referenced: Vec<bool>,
    data: Box<[u8]>,
    hand: usize,
    used: usize,
}

/// A host-side cache of 4 KiB disk blocks, shared by a VBD's rings and its NBD export.
/// Filled by completed reads, invalidated by writes and discards (before they start and when
/// they complete), evicted by the clock algorithm. Preallocated: nothing is allocated after
/// it is created.
pub struct ReadCache {
    inner: Mutex<CacheInner>,
    blocks: usize,
}

impl std::fmt::Debug for ReadCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadCache")
            .field("blocks", &self.blocks)
            .finish_non_exhaustive()
    }
}

fn lock(m: &Mutex<CacheInner>) -> std::sync::MutexGuard<'_, CacheInner> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ReadCache {
    /// A cache of `mb` MiB.
    pub fn new(mb: u32) -> ReadCache {
        let blocks = (mb as usize * (1 << 20) / BLOCK).max(1);
        ReadCache {
            inner: Mutex::new(CacheInner {
                map: HashMap::with_capacity(blocks),
                keys: vec![u64::MAX; blocks],
                referenced: vec![false; blocks],
                data: vec![0u8; blocks * BLOCK].into_boxed_slice(),
                hand: 0,
                used: 0,
            }),
            blocks,
        }
    }

    /// Blocks it holds at most.
    pub fn capacity(&self) -> usize {
        self.blocks
    }

    /// Copies block `block` into `out` (4096 bytes) if cached.
    pub fn get(&self, block: u64, out: &mut [u8]) -> bool {
        let mut g = lock(&self.inner);
        let Some(&i) = g.map.get(&block) else {
            return false;
        };
        let i = i as usize;
        g.referenced[i] = true;
        out[..BLOCK].copy_from_slice(&g.data[i * BLOCK..(i + 1) * BLOCK]);
        true
    }

    /// Stores block `block` (4096 bytes).
    pub fn put(&self, block: u64, data: &[u8]) {
        let mut g = lock(&self.inner);
        let i = match g.map.get(&block) {
            Some(&i) => i as usize,
            None => {
                let i = if g.used < self.blocks {
                    g.used += 1;
                    g.used - 1
                } else {
                    // Clock: skip recently referenced blocks once.
                    loop {
                        let h = g.hand;
                        g.hand = (h + 1) % self.blocks;
                        if g.referenced[h] {
                            g.referenced[h] = false;
                        } else {
                            break h;
                        }
                    }
                };
                let old = g.keys[i];
                if old != u64::MAX {
                    g.map.remove(&old);
                }
                g.keys[i] = block;
                g.map.insert(block, i as u32);
                i
            }
        };
        g.referenced[i] = true;
        g.data[i * BLOCK..(i + 1) * BLOCK].copy_from_slice(&data[..BLOCK]);
    }

    /// Forgets every block overlapping `count` sectors at `sector`.
    pub fn invalidate(&self, sector: u64, count: u64) {
        if count == 0 {
            return;
        }
        let first = sector / BLOCK_SECTORS;
        let last = (sector + count - 1) / BLOCK_SECTORS;
        let mut g = lock(&self.inner);
        if g.map.is_empty() {
            return;
        }
        let drop_one = |g: &mut CacheInner, b: u64| {
            if let Some(i) = g.map.remove(&b) {
                g.keys[i as usize] = u64::MAX;
                g.referenced[i as usize] = false;
            }
        };
        if last - first < g.map.len() as u64 {
            for b in first..=last {
                drop_one(&mut g, b);
            }
        } else {
            let victims: Vec<u64> = g
                .map
                .keys()
                .copied()
                .filter(|b| (first..=last).contains(b))
                .collect();
            for b in victims {
                drop_one(&mut g, b);
            }
        }
    }
}

/// The disk block a segment covers, if it is exactly one aligned 4 KiB block.
pub fn segment_block(sector: u64, seg: &Segment) -> Option<u64> {
    (seg.first_sect == 0 && seg.last_sect == 7 && sector.is_multiple_of(BLOCK_SECTORS))
        .then_some(sector / BLOCK_SECTORS)
}

// ---- Per-ring state -------------------------------------------------------------------------

/// What a read's early-read state says to do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing yet.
    Wait,
    /// Answer the read now (with this status); chunks may still be outstanding.
    Answer(i16),
    /// Answer now if not answered yet, and release the read: every page is in.
    Done(i16),
}

struct Entry {
    active: bool,
    answered: bool,
    /// Answered with pages still unfilled.
    early: bool,
    failed: bool,
    pages: u32,
    filled: u32,
    prefix: u32,
    outstanding: u32,
    sequential: bool,
    last_event: u64,
    /// Which segments are filled.
    bits: Box<[u64]>,
}

/// Early-read state of one ring.
pub struct EarlyReads {
    policy: EarlyPolicy,
    entries: Box<[Entry]>,
    /// Per guest page: 1 + the read slot it waits for, 0 if none.
    owner: Box<[u32]>,
    /// Per guest page: when a reader faulted on it while unfilled (0: none).
    fault_at: Box<[u64]>,
    ewma_ns: f64,
    seq_next: u64,
    seq_run: u32,
    /// Pages per chunk.
    chunk_pages: usize,
}

fn zeroed_u32(n: usize) -> Box<[u32]> {
    // SAFETY: zero is a valid u32.
    unsafe { Box::<[u32]>::new_zeroed_slice(n).assume_init() }
}

fn zeroed_u64(n: usize) -> Box<[u64]> {
    // SAFETY: zero is a valid u64.
    unsafe { Box::<[u64]>::new_zeroed_slice(n).assume_init() }
}

impl EarlyReads {
    /// State for a ring of `slots` requests of up to `seg_cap` segments, over `mem_pages`
    /// pages of guest memory.
    pub fn new(policy: EarlyPolicy, slots: u32, seg_cap: usize, mem_pages: u32) -> EarlyReads {
        let words = seg_cap.div_ceil(64);
        EarlyReads {
            policy,
            entries: (0..slots)
                .map(|_| Entry {
                    active: false,
                    answered: false,
                    early: false,
                    failed: false,
                    pages: 0,
                    filled: 0,
                    prefix: 0,
                    outstanding: 0,
                    sequential: false,
                    last_event: 0,
                    bits: zeroed_u64(words),
                })
                .collect(),
            owner: zeroed_u32(mem_pages as usize),
            fault_at: zeroed_u64(mem_pages as usize),
            ewma_ns: 0.0,
            seq_next: u64::MAX,
            seq_run: 0,
            chunk_pages: (policy.chunk_kb as usize * 1024 / PAGE_SIZE).max(1),
        }
    }

    /// The policy.
    pub fn policy(&self) -> &EarlyPolicy {
        &self.policy
    }

    /// Segments per chunk IO.
    pub fn chunk_pages(&self) -> usize {
        self.chunk_pages
    }

    /// Whether `req` goes through the early-read layer: reads of two pages or more.
    pub fn eligible(&self, req: &Request) -> bool {
        req.op == Operation::Read && req.nr_segments >= 2
    }

    /// Starts read slot `s` of `segs` (their grant refs are guest page numbers).
    pub fn begin(&mut self, s: u32, req: &Request, segs: &[Segment], now: u64) {
        let sequential = match self.policy.sequential {
            Some((run, _)) => {
                if req.sector == self.seq_next {
                    self.seq_run = self.seq_run.saturating_add(1);
                } else {
                    self.seq_run = 0;
                }
                self.seq_next = req.sector + req.nr_sectors;
                self.seq_run >= run
            }
            None => false,
        };
        let e = &mut self.entries[s as usize];
        e.active = true;
        e.answered = false;
        e.early = false;
        e.failed = false;
        e.pages = segs.len() as u32;
        e.filled = 0;
        e.prefix = 0;
        e.outstanding = 0;
        e.sequential = sequential;
        e.last_event = now;
        e.bits[..segs.len().div_ceil(64)].fill(0);
        for sg in segs {
            if let Some(o) = self.owner.get_mut(sg.gref as usize) {
                *o = s + 1;
            }
        }
    }

    /// Marks segments `first..first+n` of read `s` filled (the caller maps their pages for
    /// the frontend), accounting stall time for pages a reader waits on.
    pub fn fill(&mut self, s: u32, first: usize, segs: &[Segment], now: u64, c: &EarlyCounters) {
        let e = &mut self.entries[s as usize];
        for (k, sg) in segs.iter().enumerate() {
            let i = first + k;
            let (w, b) = (i / 64, 1u64 << (i % 64));
            if e.bits[w] & b == 0 {
                e.bits[w] |= b;
                e.filled += 1;
            }
            let page = sg.gref as usize;
            if self.owner.get(page) == Some(&(s + 1)) {
                self.owner[page] = 0;
                let t = self.fault_at[page];
                if t != 0 {
                    c.stall_ns.add(now.saturating_sub(t));
                    self.fault_at[page] = 0;
                }
            }
        }
        while e.prefix < e.pages {
            let i = e.prefix as usize;
            if e.bits[i / 64] & (1 << (i % 64)) == 0 {
                break;
            }
            e.prefix += 1;
        }
    }

    /// A chunk IO of read `s` was issued.
    pub fn chunk_issued(&mut self, s: u32) {
        self.entries[s as usize].outstanding += 1;
    }

    /// A chunk IO of read `s` finished (`ok`); its pages were filled with [`Self::fill`] if
    /// it succeeded. Says what to do.
    pub fn chunk_done(&mut self, s: u32, ok: bool, now: u64) -> Outcome {
        let e = &mut self.entries[s as usize];
        e.outstanding -= 1;
        if !ok {
            e.failed = true;
        }
        let dt = now.saturating_sub(e.last_event) as f64;
        e.last_event = now;
        self.ewma_ns = if self.ewma_ns == 0.0 {
            dt
        } else {
            0.8 * self.ewma_ns + 0.2 * dt
        };
        self.decide(s)
    }

    /// Whether read `s` may be answered now (after `begin` and the cache fill, or a chunk).
    pub fn decide(&mut self, s: u32) -> Outcome {
        let e = &self.entries[s as usize];
        let status = if e.failed {
            blkif::protocol::status::ERROR
        } else {
            blkif::protocol::status::OKAY
        };
        if e.outstanding == 0 {
            return Outcome::Done(status);
        }
        if e.answered || e.failed {
            return Outcome::Wait;
        }
        let st = ReadState {
            pages: e.pages,
            filled: e.filled,
            prefix: e.prefix,
            outstanding: e.outstanding,
            sequential: e.sequential,
        };
        let eta = (self.ewma_ns > 0.0).then(|| (self.ewma_ns * f64::from(e.outstanding)) as u64);
        if should_answer(&self.policy, &st, eta) {
            Outcome::Answer(status)
        } else {
            Outcome::Wait
        }
    }

    /// Records that read `s` was answered; returns the pages still unfilled.
    pub fn answered(&mut self, s: u32) -> u32 {
        let e = &mut self.entries[s as usize];
        e.answered = true;
        e.early = e.filled < e.pages;
        e.pages - e.filled
    }

    /// Whether read `s` was answered before all its pages were filled.
    pub fn answered_early(&self, s: u32) -> bool {
        self.entries[s as usize].early
    }

    /// Whether read `s` was answered already.
    pub fn was_answered(&self, s: u32) -> bool {
        self.entries[s as usize].answered
    }

    /// Releases read `s` (every chunk is done); pages never filled lose their owner.
    pub fn end(&mut self, s: u32, segs: &[Segment]) {
        for sg in segs {
            let page = sg.gref as usize;
            if self.owner.get(page) == Some(&(s + 1)) {
                self.owner[page] = 0;
                self.fault_at[page] = 0;
            }
        }
        self.entries[s as usize].active = false;
    }

    /// A frontend thread faulted on guest page `page`. Returns true if the page is still
    /// waiting for its data (the thread stays stalled until it is filled), false if it may be
    /// mapped right away.
    pub fn faulted(&mut self, page: u32, now: u64, c: &EarlyCounters) -> bool {
        c.faults.add(1);
        match self.owner.get(page as usize) {
            Some(&o) if o != 0 => {
                c.stalls.add(1);
                if self.fault_at[page as usize] == 0 {
                    self.fault_at[page as usize] = now;
                }
                true
            }
            _ => false,
        }
    }
}

/// Maps `segs`' pages for the frontend (`UFFDIO_CONTINUE`), coalescing consecutive pages.
pub fn continue_pages(port: &EarlyReadPort, segs: &[Segment]) -> std::io::Result<()> {
    let mut run: Option<(u32, u32)> = None;
    let flush = |r: (u32, u32)| -> std::io::Result<()> {
        if let Some(a) = port.page_addr(r.0) {
            let n = r.1.min(port.pages - r.0);
            port.uffd
                .continue_range(a, u64::from(n) * PAGE_SIZE as u64)?;
        }
        Ok(())
    };
    for sg in segs {
        run = match run {
            Some((a, n)) if a + n == sg.gref => Some((a, n + 1)),
            Some((a, n)) if sg.gref >= a && sg.gref < a + n => Some((a, n)),
            Some(r) => {
                flush(r)?;
                Some((sg.gref, 1))
            }
            None => Some((sg.gref, 1)),
        };
    }
    if let Some(r) = run {
        flush(r)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(pages: u32, filled: u32, prefix: u32, outstanding: u32) -> ReadState {
        ReadState {
            pages,
            filled,
            prefix,
            outstanding,
            sequential: false,
        }
    }

    #[test]
    fn policies() {
        let p: EarlyPolicy = "percent=25".parse().unwrap();
        assert!(!should_answer(&p, &st(16, 3, 3, 13), None));
        assert!(should_answer(&p, &st(16, 4, 0, 12), None));
        let p: EarlyPolicy = "first=25+50".parse().unwrap();
        // first 4 pages, then half of the other 12.
        assert!(!should_answer(&p, &st(16, 10, 3, 6), None));
        assert!(!should_answer(&p, &st(16, 9, 4, 7), None));
        assert!(should_answer(&p, &st(16, 10, 4, 6), None));
        let p: EarlyPolicy = "outstanding=2".parse().unwrap();
        assert!(!should_answer(&p, &st(16, 0, 0, 3), None));
        assert!(should_answer(&p, &st(16, 0, 0, 2), None));
        let p: EarlyPolicy = "eta=500".parse().unwrap();
        assert!(!should_answer(&p, &st(16, 0, 0, 3), Some(600_000)));
        assert!(should_answer(&p, &st(16, 0, 0, 3), Some(500_000)));
        assert!(!should_answer(&p, &st(16, 0, 0, 3), None));
        let p: EarlyPolicy = "seq=2:10".parse().unwrap();
        let mut s = st(16, 2, 2, 14);
        assert!(!should_answer(&p, &s, None));
        s.sequential = true;
        assert!(should_answer(&p, &s, None));
        // Everything filled always answers; nothing set never answers early.
        assert!(should_answer(
            &EarlyPolicy::default(),
            &st(4, 4, 4, 0),
            None
        ));
        assert!(!should_answer(
            &EarlyPolicy::default(),
            &st(4, 3, 3, 1),
            None
        ));
    }

    #[test]
    fn cache_hits_evicts_and_invalidates() {
        let c = ReadCache::new(1); // 256 blocks
        assert_eq!(c.capacity(), 256);
        let mut out = vec![0u8; 4096];
        assert!(!c.get(5, &mut out));
        c.put(5, &[7u8; 4096]);
        assert!(c.get(5, &mut out));
        assert_eq!(out, vec![7u8; 4096]);
        for b in 100..400 {
            c.put(b, &[b as u8; 4096]);
        }
        let held = (0..400).filter(|&b| c.get(b, &mut out)).count();
        assert_eq!(held, 256);
        assert!(c.get(399, &mut out) && out[0] == (399u64 as u8));
        c.invalidate(399 * 8 + 3, 1);
        assert!(!c.get(399, &mut out));
        c.invalidate(0, 1 << 40);
        assert_eq!((0..400).filter(|&b| c.get(b, &mut out)).count(), 0);
    }

    #[test]
    fn chunks_fill_and_decide() {
        let p: EarlyPolicy = "percent=50".parse().unwrap();
        let mut e = EarlyReads::new(p, 4, 64, 100);
        let segs: Vec<Segment> = (0..8)
            .map(|i| Segment {
                gref: 10 + i,
                first_sect: 0,
                last_sect: 7,
                pad: 0,
            })
            .collect();
        let req = Request {
            id: 1,
            raw_op: 0,
            op: Operation::Read,
            sector: 0,
            nr_sectors: 64,
            nr_segments: 8,
        };
        let c = EarlyCounters::default();
        e.begin(2, &req, &segs, 100);
        for _ in 0..4 {
            e.chunk_issued(2);
        }
        assert!(e.faulted(15, 150, &c), "page 15 waits for its data");
        assert!(!e.faulted(50, 150, &c), "page 50 belongs to no read");
        e.fill(2, 0, &segs[..2], 200, &c);
        assert_eq!(e.chunk_done(2, true, 200), Outcome::Wait);
        e.fill(2, 2, &segs[2..4], 300, &c);
        assert_eq!(e.chunk_done(2, true, 300), Outcome::Answer(0));
        assert_eq!(e.answered(2), 4);
        e.fill(2, 4, &segs[4..6], 400, &c);
        assert_eq!(e.chunk_done(2, true, 400), Outcome::Wait);
        assert_eq!(c.stall_ns.get(), 250, "page 15 waited from 150 to 400");
        assert_eq!(e.chunk_done(2, false, 500), Outcome::Done(-1));
        e.end(2, &segs);
        assert!(!e.faulted(17, 600, &c));
        assert_eq!((c.faults.get(), c.stalls.get()), (3, 1));
    }
}
