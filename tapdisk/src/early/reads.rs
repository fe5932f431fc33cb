//! Per-ring state of early reads: which pages of each read are filled, when to answer, which
//! pages a faulting frontend waits for.

use blkif::local::EarlyReadPort;
use blkif::protocol::{Segment, PAGE_SIZE};
use blkif::request::{Operation, Request};

use super::{should_answer, EarlyCounters, EarlyPolicy, ReadState};

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
