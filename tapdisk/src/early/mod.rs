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

mod cache;
mod reads;

pub use tapdisk_control::EarlyPolicy;

pub use cache::{segment_block, ReadCache};
pub use reads::{continue_pages, EarlyReads, Outcome};

pub use crate::stats::early::{EarlyCounters, EarlyTotals};

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
}
