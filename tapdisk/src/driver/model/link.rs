//! The link: IOs in flight together, their data crossing one link of a given bandwidth one
//! after another, each completing a fixed latency after its last byte is through.

use std::io;

use io_uring::{opcode, types};

use super::{timespec, ModelParams};
use crate::driver::engine::{BackendIo, IoOp};
use crate::driver::layer::{Cx, Layer};
use crate::trace::now_ns;

#[derive(Clone, Copy, Default)]
struct LinkTag {
    busy: bool,
    result: Option<i32>,
    timer_done: bool,
}

/// The link model, as a layer over the engine that does the IO; its own operations are one
/// timer per tag.
pub(super) struct Link {
    params: ModelParams,
    latency_ns: u64,
    tags: Box<[LinkTag]>,
    /// Absolute completion time of each tag's timer.
    ts: Box<[types::Timespec]>,
    /// When the link is free again (ns, CLOCK_MONOTONIC).
    link_free: u64,
}

impl Link {
    pub(super) fn new(params: ModelParams, latency_us: u32, tags: u32) -> Link {
        Link {
            params,
            latency_ns: u64::from(latency_us) * 1000,
            tags: vec![LinkTag::default(); tags as usize].into_boxed_slice(),
            ts: (0..tags).map(|_| types::Timespec::new()).collect(),
            link_free: 0,
        }
    }

    /// Reports `tag` once both its timer and its IO are done.
    fn finish(&mut self, cx: &mut Cx<'_>, tag: u32) {
        if let Some(t) = self.tags.get_mut(tag as usize) {
            if let (true, true, Some(r)) = (t.busy, t.timer_done, t.result) {
                t.busy = false;
                cx.report(tag, r);
            }
        }
    }
}

impl Layer for Link {
    fn name(&self) -> String {
        self.params.to_string()
    }

    fn own_ops(&self) -> u64 {
        self.tags.len() as u64
    }

    unsafe fn submit(&mut self, cx: &mut Cx<'_>, io: BackendIo) -> io::Result<()> {
        let len = if matches!(io.op, IoOp::Read | IoOp::Write) {
            io.len
        } else {
            0
        };
        let start = self.link_free.max(now_ns());
        self.link_free = start + self.params.service_ns(len, true);
        let t = io.tag as usize;
        self.tags[t] = LinkTag {
            busy: true,
            result: None,
            timer_done: false,
        };
        self.ts[t] = timespec(self.link_free + self.latency_ns);
        let e = opcode::Timeout::new(&self.ts[t])
            .flags(types::TimeoutFlags::ABS)
            .build();
        // SAFETY: the timespec lives in `self.ts[tag]`, a boxed slice that is never resized,
        // and is not rewritten before this tag completes (tags are not reused while busy).
        unsafe { cx.push_own(u64::from(io.tag), e)? };
        // SAFETY: forwarded from our own submit contract, which the caller upholds.
        unsafe { cx.submit_inner(io) }
    }

    fn inner_done(&mut self, cx: &mut Cx<'_>, tag: u32, res: i32) -> io::Result<()> {
        if let Some(t) = self.tags.get_mut(tag as usize) {
            t.result = Some(res);
        }
        self.finish(cx, tag);
        Ok(())
    }

    fn own_done(&mut self, cx: &mut Cx<'_>, op: u64, _res: i32) -> io::Result<()> {
        let tag = op as u32;
        if let Some(t) = self.tags.get_mut(tag as usize) {
            t.timer_done = true;
        }
        self.finish(cx, tag);
        Ok(())
    }
}
