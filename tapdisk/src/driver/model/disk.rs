//! The spindle: one IO at a time, in arrival order, each held until its modelled service time
//! has passed (an io_uring timeout) and its real IO has completed.

use std::collections::VecDeque;
use std::io;

use io_uring::{opcode, types};

use super::{timespec, ModelParams};
use crate::driver::engine::{BackendIo, IoOp};
use crate::driver::layer::{Cx, Layer};

/// The one IO being served.
struct Busy {
    io: BackendIo,
    result: Option<i32>,
    timer_done: bool,
}

/// The spindle model, as a layer over the engine that does the IO.
pub(super) struct Spindle {
    params: ModelParams,
    queue: VecDeque<BackendIo>,
    busy: Option<Busy>,
    /// Where the last IO ended: the next one is sequential if it starts here.
    head: u64,
    /// The timer's timespec: read by the kernel when the timeout is submitted.
    ts: Box<types::Timespec>,
}

/// The spindle's one timer is operation 0 of its range.
const TIMER: u64 = 0;

impl Spindle {
    pub(super) fn new(params: ModelParams, tags: u32) -> Spindle {
        Spindle {
            params,
            queue: VecDeque::with_capacity(tags as usize),
            busy: None,
            head: 0,
            ts: Box::new(types::Timespec::new()),
        }
    }

    fn start_next(&mut self, cx: &mut Cx<'_>) -> io::Result<()> {
        if self.busy.is_some() {
            return Ok(());
        }
        let Some(io) = self.queue.pop_front() else {
            return Ok(());
        };
        let moves = matches!(io.op, IoOp::Read | IoOp::Write | IoOp::Discard { .. });
        let len = if matches!(io.op, IoOp::Read | IoOp::Write) {
            io.len
        } else {
            0
        };
        let sequential = !moves || io.offset == self.head;
        if moves {
            self.head = io.offset + io.len;
        }
        *self.ts = timespec(self.params.service_ns(len, sequential));
        self.busy = Some(Busy {
            io,
            result: None,
            timer_done: false,
        });
        let e = opcode::Timeout::new(&*self.ts).build();
        // SAFETY: the timespec lives in a Box owned by self, unchanged until this timeout has
        // been submitted (one timer at a time: the next is armed after this one fires).
        unsafe { cx.push_own(TIMER, e)? };
        // SAFETY: the IO came through our own submit, whose contract the caller upholds until
        // we report it.
        unsafe { cx.submit_inner(io) }
    }

    /// Reports the IO being served if both its timer and its IO are done, then starts the
    /// next.
    fn finish(&mut self, cx: &mut Cx<'_>) -> io::Result<()> {
        if let Some(Busy {
            io,
            result: Some(res),
            timer_done: true,
        }) = self.busy
        {
            cx.report(io.tag, res);
            self.busy = None;
            return self.start_next(cx);
        }
        Ok(())
    }
}

impl Layer for Spindle {
    fn name(&self) -> String {
        self.params.to_string()
    }

    fn own_ops(&self) -> u64 {
        1
    }

    unsafe fn submit(&mut self, cx: &mut Cx<'_>, io: BackendIo) -> io::Result<()> {
        self.queue.push_back(io);
        self.start_next(cx)
    }

    fn inner_done(&mut self, cx: &mut Cx<'_>, tag: u32, res: i32) -> io::Result<()> {
        if let Some(b) = self.busy.as_mut().filter(|b| b.io.tag == tag) {
            b.result = Some(res);
        }
        self.finish(cx)
    }

    fn own_done(&mut self, cx: &mut Cx<'_>, _op: u64, _res: i32) -> io::Result<()> {
        if let Some(b) = self.busy.as_mut() {
            b.timer_done = true;
        }
        self.finish(cx)
    }

    fn max_in_flight(&self, _inner: Option<u32>) -> Option<u32> {
        // One spindle: the next IO is chosen when this one finishes.
        Some(1)
    }

    fn lanes(&self, _inner: u32) -> u32 {
        1
    }
}
