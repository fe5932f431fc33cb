//! Fault injection: an engine layer that fails, delays or tears IOs on a seeded schedule,
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

use super::engine::{BackendIo, Engine, IoOp, Uring};
use super::layer::{Cx, Layer, Layered};

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

/// The fault-injecting layer (see [`Layer`]); its own operations are one delay timer per tag.
pub struct FaultLayer {
    plan: FaultPlan,
    rng: u64,
    tags: Box<[Tag]>,
    ts: Box<[types::Timespec]>,
}

/// `inner`, with the faults of `plan` injected into its IOs (tagged `0..tags`).
pub fn wrap(
    inner: Box<dyn Engine>,
    plan: FaultPlan,
    ring: &mut Uring,
    tags: u32,
) -> Box<dyn Engine> {
    let layer = FaultLayer {
        rng: plan.seed ^ 0x9E37_79B9_7F4A_7C15,
        plan,
        tags: vec![Tag::default(); tags as usize].into_boxed_slice(),
        ts: (0..tags).map(|_| types::Timespec::new()).collect(),
    };
    Box::new(Layered::new(layer, inner, ring, tags))
}

impl FaultLayer {
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

    /// Reports `tag` once its result is in and its delay (if any) is over.
    fn report(&mut self, cx: &mut Cx<'_>, tag: u32) {
        let Some(t) = self.tags.get_mut(tag as usize) else {
            return;
        };
        if !t.busy || t.result.is_none() || (t.delayed && !t.timer_done) {
            return;
        }
        t.busy = false;
        let r = t.force.unwrap_or(t.result.unwrap_or(-libc::EIO));
        cx.report(tag, r);
    }
}

impl Layer for FaultLayer {
    fn name(&self) -> String {
        "faults injected".into()
    }

    fn own_ops(&self) -> u64 {
        self.tags.len() as u64
    }

    unsafe fn submit(&mut self, cx: &mut Cx<'_>, io: BackendIo) -> io::Result<()> {
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
                .build();
            // SAFETY: the timespec lives in `self.ts[tag]`, never resized nor rewritten while
            // the tag is busy.
            unsafe { cx.push_own(u64::from(io.tag), e)? };
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
                return unsafe { cx.submit_inner(torn) };
            }
            self.tags[t].result = Some(-libc::EIO);
            self.report(cx, io.tag);
            return Ok(());
        }
        // SAFETY: forwarded from our submit contract.
        unsafe { cx.submit_inner(io) }
    }

    fn inner_done(&mut self, cx: &mut Cx<'_>, tag: u32, res: i32) -> io::Result<()> {
        if let Some(t) = self.tags.get_mut(tag as usize) {
            t.result = Some(res);
        }
        self.report(cx, tag);
        Ok(())
    }

    fn own_done(&mut self, cx: &mut Cx<'_>, op: u64, _res: i32) -> io::Result<()> {
        let tag = op as u32;
        if let Some(t) = self.tags.get_mut(tag as usize) {
            t.timer_done = true;
        }
        self.report(cx, tag);
        Ok(())
    }
}
