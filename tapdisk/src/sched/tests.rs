//! The scheduler against a reference model: whatever the batching, merging and completion
//! order, the outcome equals executing the requests one by one in ring order, a request
//! fails exactly when its own range holds a bad sector, flushes run alone, and an IO over the
//! pages of a request whose memory is unmapped after its IO (merged with others or not) is
//! marked so (never direct IO).

use std::io;

use blkif::request::{Operation, Request};
use proptest::prelude::*;

use super::*;
use crate::driver::engine::{BackendIo, Cqe, Memory};

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
    /// Finish flushes inside submit, as a synchronous ioctl would.
    sync_flush: bool,
    /// What the engine says its storage works on at once.
    lanes: u32,
    /// The test's request buffers (4 KiB each, by address) whose request's memory is
    /// unmapped after its IO.
    unmapped_bufs: Vec<usize>,
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
    unsafe fn submit(&mut self, _: &mut Uring, io: BackendIo, done: &mut Done) -> io::Result<()> {
        if io.op == IoOp::Flush && self.sync_flush {
            if !self.in_flight.is_empty() {
                self.violations
                    .push("flush submitted with IO in flight".into());
            }
            done.push(io.tag, 0);
            return Ok(());
        }
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
            let touches_unmapped = iov.iter().any(|v| {
                let p = v.iov_base as usize;
                self.unmapped_bufs.iter().any(|&b| b <= p && p < b + 4096)
            });
            if touches_unmapped && io.memory != Memory::UnmappedAfterIo {
                self.violations.push(format!(
                    "{io:?}: over pages unmapped after the IO, marked stable"
                ));
            }
        }
        self.in_flight.push(io);
        self.max_seen = self.max_seen.max(self.in_flight.len());
        Ok(())
    }
    fn complete(&mut self, _: &mut Uring, _: Cqe, _: &mut Done) -> io::Result<()> {
        Ok(())
    }
    fn describe(&self) -> String {
        "memory".into()
    }
    fn lanes(&self) -> u32 {
        self.lanes
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
#[allow(clippy::too_many_arguments)]
fn run_sched(
    reqs: &[Req],
    bad: &[bool],
    merge: bool,
    batch: usize,
    picks: &[u16],
    max_ios: u32,
    sync_flush: bool,
    lanes: u32,
) -> (Vec<(i16, Vec<u8>)>, MemEngine, u64) {
    let slots = 16u32;
    let mut sched = Sched::new(
        SchedConfig {
            merge,
            max_merge_bytes: 16 * 512,
            max_ios,
            min_spread_bytes: 2 * 512,
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
        sync_flush,
        lanes,
        unmapped_bufs: Vec::new(),
    };
    sched.set_engine(&eng);
    let mut ring = Uring::new(8).unwrap();
    let mut table = RequestTable::new(slots, 0, 11);
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
            // Every third request's pages go away after its IO (a one-shot grant mapping).
            let base_addr = buf.as_ptr() as usize;
            eng.unmapped_bufs.retain(|&b| b != base_addr);
            let memory = if next.is_multiple_of(3) {
                eng.unmapped_bufs.push(base_addr);
                Memory::UnmappedAfterIo
            } else {
                Memory::Stable
            };
            let slot = table.slot_mut(s);
            slot.memory = memory;
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
        macro_rules! cx {
            () => {
                &mut IoCx {
                    table: &mut table,
                    ring: &mut ring,
                    engine: &mut eng,
                    stats: &stats,
                }
            };
        }
        sched.dispatch(cx!(), 1).unwrap();
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
                sched.io_done(cx!(), tag, res, 2).unwrap();
            }
        }
        sched.dispatch(cx!(), 3).unwrap();
        // As in the ring loop, nothing prompts another dispatch unless a request arrives
        // or an IO completes: with none in flight and none to come, nothing may wait.
        if next == reqs.len() && eng.in_flight.is_empty() {
            assert_eq!(
                sched.pending(),
                0,
                "requests wait with nothing to wake them"
            );
        }
        sched.take_finished(&mut finished);
        for s in finished.drain(..) {
            let i = owner[s as usize];
            let slot = table.slot(s);
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
        sync_flush in any::<bool>(),
        lanes in 1u32..10,
    ) {
        let mut bad = vec![false; SECTORS as usize];
        for b in bad_at {
            bad[b as usize] = true;
        }
        let (got, eng, _) = run_sched(&reqs, &bad, merge, batch, &picks, max_ios, sync_flush, lanes);
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

/// 16 contiguous 4-sector writes, each of its own byte.
fn contiguous_writes() -> Vec<Req> {
    (0..16)
        .map(|i| Req {
            op: Op::Write(i as u8 + 1),
            sector: i * 4,
            sectors: 4,
        })
        .collect()
}

#[test]
fn contiguous_requests_merge_and_a_failure_stays_with_its_request() {
    // 16 contiguous 4-sector writes in one batch; sector 21 is bad.
    let reqs = contiguous_writes();
    let mut bad = vec![false; SECTORS as usize];
    bad[21] = true;
    let (got, eng, ios) = run_sched(&reqs, &bad, true, 16, &[0; 64], 0, false, 1);
    assert!(eng.violations.is_empty());
    assert!(eng.merged_seen > 0, "contiguous writes were not merged");
    for (i, g) in got.iter().enumerate() {
        let want = if i == 5 { -1 } else { 0 };
        assert_eq!(g.0, want, "request {i}");
    }
    // Merged into 16-sector IOs: 4 of them, and the failed one retried as 4 singles.
    assert_eq!(ios, 4 + 4);
    let (_, _, ios) = run_sched(&reqs, &[false; 64], false, 16, &[0; 64], 0, false, 1);
    assert_eq!(ios, 16, "without merging each request is an IO");
}

#[test]
fn what_is_ready_is_spread_over_the_lanes() {
    // 16 contiguous 4-sector writes (32 KiB) at once; merged IOs of at most 16 sectors.
    let reqs = contiguous_writes();
    let ok = [false; SECTORS as usize];
    // One lane: merged as far as the maximum allows, 4 IOs of 16 sectors.
    let (_, eng, ios) = run_sched(&reqs, &ok, true, 16, &[0; 64], 0, false, 1);
    assert_eq!((ios, eng.max_seen), (4, 4));
    // Eight lanes: 64 sectors over 8 lanes, 8 IOs of 8 sectors, all in flight together.
    let (_, eng, ios) = run_sched(&reqs, &ok, true, 16, &[0; 64], 0, false, 8);
    assert_eq!((ios, eng.max_seen), (8, 8));
    // Sixteen lanes: never below the smallest spread (2 sectors here, so 16 IOs of 4).
    let (_, _, ios) = run_sched(&reqs, &ok, true, 16, &[0; 64], 0, false, 16);
    assert_eq!(ios, 16);
}

#[test]
fn what_arrives_while_the_lanes_are_busy_is_still_spread_over_them() {
    // Two batches of 8 contiguous 4-sector writes, four lanes, one IO completing per round:
    // the first batch goes out as 4 IOs of 2 requests; when the second arrives, 3 lanes are
    // still busy. It is cut by the lanes the storage has, not the one free: 4 IOs of 2
    // requests again, not 2 of 4 (a few large IOs serialised behind one lane).
    let reqs = contiguous_writes();
    let ok = [false; SECTORS as usize];
    let (got, eng, ios) = run_sched(&reqs, &ok, true, 8, &[0; 64], 0, false, 4);
    assert!(eng.violations.is_empty());
    assert!(got.iter().all(|g| g.0 == 0));
    assert_eq!(ios, 8);
}
