//! A model of a guest's block layer above blkfront, for replaying the thesis's `dd` runs.
//!
//! - **Direct IO** (`dd oflag=direct bs=B`): each write of B bytes is split into ring requests
//!   of at most the negotiated request size (11 segments = 44 KiB, or an indirect request's
//!   size); one write at a time. [`crate::bench::measure`] does this with iodepth 1.
//! - **Buffered IO** (`dd bs=4k count=4096`): the writes land in the page cache at once; the
//!   writeback then turns the dirty pages into requests, merging a write into the request
//!   before it when the two are contiguous on disk, up to the request size (a noop elevator:
//!   back-merges only, no sorting, so an interleaved pattern reaches the ring interleaved, as
//!   the thesis's Table 4.2 saw). [`writeback_plan`] builds those requests; [`run_plan`]
//!   pushes them through the ring, as many as the ring holds, refilling as responses come back
//!   (one push per refill, as blkfront's queue does).

use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use blkif::local::{FrontRequest, LocalFrontend};
use blkif::protocol::{op, status, PAGE_SIZE};
use blkif::Segment;

use crate::bench::Stamps;
use crate::target::{self, ReqShape, STALL};
use tapdisk::trace::now_ns;

/// One ring request of a plan: `pages` pages of the page cache written at `sector`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlannedReq {
    /// First sector.
    pub sector: u64,
    /// Index of its first page in the page cache.
    pub first_page: usize,
    /// Pages (whole pages: buffered IO writes pages).
    pub pages: usize,
}

/// Turns application writes (`(byte offset, bytes)`, page aligned, in the order written) into
/// writeback requests of at most `shape.segs_per_req()` pages, back-merging contiguous
/// writes. Page `i` of the page cache holds the `i`th page written.
pub fn writeback_plan(writes: &[(u64, u64)], shape: &ReqShape) -> Vec<PlannedReq> {
    let max = shape.segs_per_req();
    let mut out: Vec<PlannedReq> = Vec::new();
    let mut page = 0usize;
    for &(off, len) in writes {
        let mut sector = off / 512;
        let mut pages = (len as usize).div_ceil(PAGE_SIZE);
        while pages > 0 {
            if let Some(last) = out.last_mut() {
                let end = last.sector + (last.pages * PAGE_SIZE / 512) as u64;
                if end == sector && last.pages < max && last.first_page + last.pages == page {
                    let n = pages.min(max - last.pages);
                    last.pages += n;
                    pages -= n;
                    page += n;
                    sector += (n * PAGE_SIZE / 512) as u64;
                    continue;
                }
            }
            let n = pages.min(max);
            out.push(PlannedReq {
                sector,
                first_page: page,
                pages: n,
            });
            pages -= n;
            page += n;
            sector += (n * PAGE_SIZE / 512) as u64;
        }
    }
    out
}

/// Guest memory a plan needs: its page cache plus descriptor pages for indirect requests.
pub fn plan_pages(plan: &[PlannedReq], shape: &ReqShape) -> usize {
    let cache: usize = plan
        .iter()
        .map(|r| r.first_page + r.pages)
        .max()
        .unwrap_or(0);
    cache + plan.len() * shape.indirect_pages()
}

/// What pushing a plan through the ring took.
#[derive(Clone, Copy, Debug, Default)]
pub struct PlanResult {
    /// Ring requests.
    pub requests: usize,
    /// First push to last response, seconds.
    pub elapsed_s: f64,
    /// Pushes (publish + notify) the frontend made.
    pub pushes: u64,
    /// Requests answered with an error.
    pub errors: u64,
}

/// Pushes `plan` (writes) through the ring in order: as many requests as the ring has room
/// for, one push, wait for responses, refill. Ids are `seq << 32 | index`.
pub fn run_plan(
    fe: &mut LocalFrontend,
    shape: &ReqShape,
    plan: &[PlannedReq],
    mut stamps: Option<&mut Stamps>,
) -> Result<PlanResult> {
    let need = plan_pages(plan, shape);
    if need > fe.mem_pages() as usize {
        bail!(
            "internal error: the plan needs {need} pages, {} attached",
            fe.mem_pages()
        );
    }
    let cache = need - plan.len() * shape.indirect_pages();
    let ind = shape.indirect_pages();
    let mut segs: Vec<Segment> = Vec::with_capacity(shape.segs_per_req());
    let mut pushed_at = vec![0u64; if stamps.is_some() { plan.len() } else { 0 }];
    let mut done = vec![false; plan.len()];
    let (mut next, mut answered, mut pushes, mut errors) = (0usize, 0usize, 0u64, 0u64);
    let start = Instant::now();
    while answered < plan.len() {
        let first = next;
        while next < plan.len() && fe.free_slots() > 0 {
            let r = plan[next];
            segs.clear();
            segs.extend((0..r.pages).map(|i| Segment {
                gref: (r.first_page + i) as u32,
                first_sect: 0,
                last_sect: 7,
                pad: 0,
            }));
            let id = next as u64;
            let grefs: Vec<u32> = (0..ind).map(|k| (cache + next * ind + k) as u32).collect();
            let req = if ind > 0 {
                FrontRequest::Indirect {
                    op: op::WRITE,
                    id,
                    sector: r.sector,
                    indirect: &grefs,
                    segments: &segs,
                }
            } else {
                FrontRequest::Rw {
                    op: op::WRITE,
                    id,
                    sector: r.sector,
                    segments: &segs,
                }
            };
            if !fe.queue(&req) {
                break;
            }
            next += 1;
        }
        if next > first {
            // Before the push, whose kick is the ring path's time (see bench::measure).
            if stamps.is_some() {
                let t = now_ns();
                pushed_at[first..next].fill(t);
            }
            fe.push()
                .map_err(|e| target::wait_error(e, fe.outstanding()))?;
            pushes += 1;
        }
        let n = fe.outstanding();
        if !fe.wait(Some(STALL)).map_err(|e| target::wait_error(e, n))? {
            bail!(
                "no response from tapdisk for {} s with {n} requests in flight",
                STALL.as_secs()
            );
        }
        let stamped = stamps.as_ref().map_or(0, |s| s.len());
        let mut bad = None;
        fe.poll(|rsp| {
            let i = rsp.id as usize;
            if i >= plan.len() || i >= next || done[i] {
                bad = Some(rsp.id);
                return;
            }
            done[i] = true;
            answered += 1;
            if rsp.status != status::OKAY {
                errors += 1;
            }
            if let Some(st) = stamps.as_deref_mut() {
                st.push((rsp.id, pushed_at[i], 0));
            }
        });
        if let Some(st) = stamps.as_deref_mut() {
            // Seen once the poll has taken them: a stamp before the poll could precede the
            // answer to a response tapdisk published in between.
            let seen = now_ns();
            for s in &mut st[stamped..] {
                s.2 = seen;
            }
        }
        if let Some(id) = bad {
            return Err(anyhow!(
                "tapdisk answered an id that is not in flight: {id:#x}"
            ));
        }
    }
    Ok(PlanResult {
        requests: plan.len(),
        elapsed_s: start.elapsed().as_secs_f64(),
        pushes,
        errors,
    })
}

/// The thesis's Table 4.2 pattern: `count` writes of `bs` bytes alternating between two
/// regions of the disk (write i goes to region i % 2, position i / 2), so consecutive writes
/// are never contiguous but each region's writes are.
pub fn interleaved(count: u64, bs: u64) -> Vec<(u64, u64)> {
    let half = count.div_ceil(2) * bs;
    (0..count)
        .map(|i| ((i % 2) * half + (i / 2) * bs, bs))
        .collect()
}

/// `count` sequential writes of `bs` bytes from offset 0.
pub fn sequential(count: u64, bs: u64) -> Vec<(u64, u64)> {
    (0..count).map(|i| (i * bs, bs)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIRECT11: ReqShape = ReqShape {
        max_segments: 11,
        indirect_segments: 0,
    };

    #[test]
    fn sequential_page_writes_merge_up_to_the_request_size() {
        let plan = writeback_plan(&sequential(4096, 4096), &DIRECT11);
        // 4096 pages in requests of 11: 372 full ones and one of 4.
        assert_eq!(plan.len(), 373);
        assert!(plan[..372].iter().all(|r| r.pages == 11));
        assert_eq!(plan[372].pages, 4);
        assert_eq!(plan[1].sector, 88);
        assert_eq!(plan[1].first_page, 11);
        let big = ReqShape {
            max_segments: 11,
            indirect_segments: 256,
        };
        assert_eq!(writeback_plan(&sequential(4096, 4096), &big).len(), 16);
        assert_eq!(plan_pages(&plan, &DIRECT11), 4096);
        assert_eq!(
            plan_pages(&writeback_plan(&sequential(4096, 4096), &big), &big),
            4096 + 16
        );
    }

    #[test]
    fn interleaved_writes_do_not_merge_in_the_guest() {
        let w = interleaved(100, 112 << 10);
        assert_eq!(w[0], (0, 112 << 10));
        assert_eq!(w[1], (50 * (112 << 10), 112 << 10));
        assert_eq!(w[2], (112 << 10, 112 << 10));
        let plan = writeback_plan(&w, &DIRECT11);
        // 28 pages per write: 11 + 11 + 6, never merged with the next write.
        assert_eq!(plan.len(), 300);
        assert_eq!(
            plan[..3].iter().map(|r| r.pages).collect::<Vec<_>>(),
            [11, 11, 6]
        );
    }
}
