//! Fault injection: an engine wrapper that fails, delays or tears IOs on a seeded schedule,
//! for testing everything above an engine (the scheduler, early reads, the drivers).
//!
//! A [`FaultPlan`] names bad sector ranges (every IO touching one fails with EIO, every time:
//! a bad spot on the disk) and seeded random faults per IO: failures (parts per million),
//! delays, and torn writes (a failing write first writes the first half of its data, as a
//! power cut or a dying disk can). Faults never corrupt what they do not report: an IO that
//! completes OK did all of its work.

use std::io;

use io_uring::{opcode, types};
use tapdisk_control::FaultPlan;

use super::{BackendIo, Done, Engine, IoOp, Uring, ENGINE_SPACE};

/// Timer user data: `FAULT_TIMERS + tag` (the inner engine uses tag numbers).
const FAULT_TIMERS: u64 = ENGINE_SPACE / 4;

#[derive(Clone, Copy, Default)]
struct Tag {
    busy: bool,
    /// Report this instead of the inner result (a torn write's EIO).
    force: Option<i32>,
    result: Option<i32>,
    /// Waiting for a delay timer.
    delayed: bool,
    timer_done: bool,
}

/// The fault-injecting wrapper.
pub struct FaultEngine {
    inner: Box<dyn Engine>,
    plan: FaultPlan,
    rng: u64,
    tags: Box<[Tag]>,
    ts: Box<[types::Timespec]>,
    inner_done: Done,
}

impl FaultEngine {
    /// Wraps `inner`, which serves `tags` tags.
    pub fn new(inner: Box<dyn Engine>, plan: FaultPlan, tags: u32) -> FaultEngine {
        FaultEngine {
            inner,
            rng: plan.seed ^ 0x9E37_79B9_7F4A_7C15,
            plan,
            tags: vec![Tag::default(); tags as usize].into_boxed_slice(),
            ts: (0..tags).map(|_| types::Timespec::new()).collect(),
            inner_done: Done::with_capacity(tags as usize),
        }
    }

    fn roll(&mut self, ppm: u32) -> bool {
        if ppm == 0 {
            return false;
        }
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let v = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (v >> 32) % 1_000_000 < u64::from(ppm)
    }

    fn report(&mut self, tag: u32, done: &mut Done) {
        let t = &mut self.tags[tag as usize];
        if !t.busy || t.result.is_none() || (t.delayed && !t.timer_done) {
            return;
        }
        t.busy = false;
        let r = t.force.unwrap_or(t.result.unwrap_or(-libc::EIO));
        done.push(tag, r);
    }

    fn collect_polled(&mut self, _ring: &mut Uring, done: &mut Done) -> io::Result<()> {
        self.collect(done);
        Ok(())
    }

    fn collect(&mut self, done: &mut Done) {
        for i in 0..self.inner_done.0.len() {
            let (tag, res) = self.inner_done.0[i];
            if let Some(t) = self.tags.get_mut(tag as usize) {
                t.result = Some(res);
            }
            self.report(tag, done);
        }
        self.inner_done.0.clear();
    }
}

impl Engine for FaultEngine {
    fn unpinned_memory_only(&mut self) {
        self.inner.unpinned_memory_only();
    }

    unsafe fn submit(
        &mut self,
        ring: &mut Uring,
        io: BackendIo,
        done: &mut Done,
    ) -> io::Result<()> {
        let data = matches!(io.op, IoOp::Read | IoOp::Write | IoOp::Discard { .. });
        let fail = (data && self.plan.hits_bad(io.offset, io.len)) || {
            let p = self.plan.fail_ppm;
            self.roll(p)
        };
        let delay = {
            let p = self.plan.delay_ppm;
            self.roll(p)
        };
        let t = io.tag as usize;
        self.tags[t] = Tag {
            busy: true,
            ..Tag::default()
        };
        if delay && self.plan.delay_us > 0 {
            let at = crate::trace::now_ns() + u64::from(self.plan.delay_us) * 1000;
            self.ts[t] = types::Timespec::new()
                .sec(at / 1_000_000_000)
                .nsec((at % 1_000_000_000) as u32);
            let e = opcode::Timeout::new(&self.ts[t])
                .flags(types::TimeoutFlags::ABS)
                .build()
                .user_data(FAULT_TIMERS + u64::from(io.tag));
            // SAFETY: the timespec lives in `self.ts[tag]`, never resized nor rewritten while
            // the tag is busy.
            unsafe { ring.push(&e)? };
            self.tags[t].delayed = true;
        }
        if fail {
            self.tags[t].force = Some(-libc::EIO);
            if io.op == IoOp::Write && self.plan.tear && io.len >= 1024 {
                // Write the first half (whole sectors, whole iovecs cut short), then fail.
                let mut keep = (io.len / 2) & !511;
                let mut cnt = 0u32;
                // SAFETY: the iovecs are ours to rewrite until the tag completes (submit
                // contract); `cnt < iovcnt` while bytes remain to keep.
                unsafe {
                    while keep > 0 && cnt < io.iovcnt {
                        let v = &mut *io.iov.add(cnt as usize);
                        if (v.iov_len as u64) > keep {
                            v.iov_len = keep as usize;
                        }
                        keep -= v.iov_len as u64;
                        cnt += 1;
                    }
                }
                let torn = BackendIo {
                    len: (io.len / 2) & !511,
                    iovcnt: cnt,
                    ..io
                };
                // SAFETY: forwarded from our submit contract.
                unsafe { self.inner.submit(ring, torn, &mut self.inner_done)? };
                self.collect(done);
                return Ok(());
            }
            self.tags[t].result = Some(-libc::EIO);
            self.report(io.tag, done);
            return Ok(());
        }
        // SAFETY: forwarded from our submit contract.
        unsafe { self.inner.submit(ring, io, &mut self.inner_done)? };
        self.collect(done);
        Ok(())
    }

    fn complete(
        &mut self,
        ring: &mut Uring,
        user_data: u64,
        res: i32,
        done: &mut Done,
    ) -> io::Result<()> {
        if (FAULT_TIMERS..FAULT_TIMERS + self.tags.len() as u64).contains(&user_data) {
            let tag = (user_data - FAULT_TIMERS) as u32;
            self.tags[tag as usize].timer_done = true;
            self.report(tag, done);
            return Ok(());
        }
        self.inner
            .complete(ring, user_data, res, &mut self.inner_done)?;
        self.collect(done);
        Ok(())
    }

    fn poll_fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.poll_fd()
    }

    fn on_poll(&mut self, ring: &mut Uring, done: &mut Done) -> io::Result<()> {
        self.inner.on_poll(ring, &mut self.inner_done)?;
        self.collect_polled(ring, done)
    }

    fn describe(&self) -> String {
        format!("faults injected over {}", self.inner.describe())
    }

    fn max_in_flight(&self) -> Option<u32> {
        self.inner.max_in_flight()
    }
}
