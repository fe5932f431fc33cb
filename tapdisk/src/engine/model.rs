//! Slow-storage models, for experiments: the IO is done for real (so data is right) and its
//! completion is held back until the modelled service time has passed (an io_uring timeout).
//! Every output that uses a model says so.
//!
//! - **Spindle** (the thesis's disk): one IO at a time, in arrival order, each costing
//!   `X + Y × size`, plus a positioning delay when it does not start where the previous one
//!   ended. The thesis (Table 3.1, direct writes of 4 KB to 1 MB on a Seagate 7200.11) fits
//!   X ≈ 335 µs and Y ≈ 4 µs per KB; those are the defaults, with 4170 µs (half a revolution
//!   at 7200 rpm, the mean rotational latency) to reposition.
//! - **Link** (remote storage behind a network link): IOs are in flight together; their data
//!   crosses one link of a given bandwidth one after another, and each completes a fixed
//!   latency after its last byte is through. What early read return is for.

use std::collections::VecDeque;
use std::io;

use io_uring::{opcode, types};
use tapdisk_control::ModelParams;

use super::{BackendIo, Done, Engine, IoOp, Uring, ENGINE_SPACE};

/// User data of the spindle's timer; a link's timers are `LINK_TIMERS + tag`.
const TIMER: u64 = ENGINE_SPACE - 1;
const LINK_TIMERS: u64 = ENGINE_SPACE / 2;

/// Builds the model engine around `inner`.
pub fn wrap(inner: Box<dyn Engine>, params: ModelParams, tags: u32) -> Box<dyn Engine> {
    match params {
        ModelParams::Spindle { .. } => Box::new(ModelDisk::new(inner, params, tags)),
        ModelParams::Link { .. } => Box::new(ModelLink::new(inner, params, tags)),
    }
}

fn now_ns() -> u64 {
    crate::trace::now_ns()
}

struct Busy {
    io: BackendIo,
    result: Option<i32>,
    timer_done: bool,
}

/// The spindle model around another engine.
pub struct ModelDisk {
    inner: Box<dyn Engine>,
    params: ModelParams,
    queue: VecDeque<BackendIo>,
    busy: Option<Busy>,
    head: u64,
    inner_done: Done,
    /// The timer's timespec: read by the kernel when the timeout is submitted.
    ts: Box<types::Timespec>,
}

impl ModelDisk {
    /// Wraps `inner`, which serves `tags` tags.
    pub fn new(inner: Box<dyn Engine>, params: ModelParams, tags: u32) -> ModelDisk {
        ModelDisk {
            inner,
            params,
            queue: VecDeque::with_capacity(tags as usize),
            busy: None,
            head: 0,
            inner_done: Done::with_capacity(tags as usize),
            ts: Box::new(types::Timespec::new()),
        }
    }

    fn start_next(&mut self, ring: &mut Uring) -> io::Result<()> {
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
        let ns = self.params.service_ns(len, sequential);
        *self.ts = types::Timespec::new()
            .sec(ns / 1_000_000_000)
            .nsec((ns % 1_000_000_000) as u32);
        self.busy = Some(Busy {
            io,
            result: None,
            timer_done: false,
        });
        let e = opcode::Timeout::new(&*self.ts).build().user_data(TIMER);
        // SAFETY: the timespec lives in a Box owned by self, unchanged until this timeout has
        // been submitted (one timer at a time: the next is armed after this one fires).
        unsafe { ring.push(&e)? };
        self.inner_done.0.clear();
        // SAFETY: forwarded from our own submit contract, which the caller upholds.
        unsafe { self.inner.submit(ring, io, &mut self.inner_done)? };
        self.collect();
        Ok(())
    }

    fn collect_polled(&mut self, ring: &mut Uring, done: &mut Done) -> io::Result<()> {
        self.collect();
        self.finish(ring, done)
    }

    fn collect(&mut self) {
        if let Some(b) = self.busy.as_mut() {
            for &(tag, res) in &self.inner_done.0 {
                if tag == b.io.tag {
                    b.result = Some(res);
                }
            }
        }
        self.inner_done.0.clear();
    }

    fn finish(&mut self, ring: &mut Uring, done: &mut Done) -> io::Result<()> {
        if let Some(b) = &self.busy {
            if b.timer_done {
                if let Some(res) = b.result {
                    done.push(b.io.tag, res);
                    self.busy = None;
                    return self.start_next(ring);
                }
            }
        }
        Ok(())
    }
}

impl Engine for ModelDisk {
    fn unpinned_memory_only(&mut self) {
        self.inner.unpinned_memory_only();
    }

    unsafe fn submit(
        &mut self,
        ring: &mut Uring,
        io: BackendIo,
        _done: &mut Done,
    ) -> io::Result<()> {
        self.queue.push_back(io);
        self.start_next(ring)
    }

    fn complete(
        &mut self,
        ring: &mut Uring,
        user_data: u64,
        res: i32,
        done: &mut Done,
    ) -> io::Result<()> {
        if user_data == TIMER {
            if let Some(b) = self.busy.as_mut() {
                b.timer_done = true;
            }
        } else {
            self.inner
                .complete(ring, user_data, res, &mut self.inner_done)?;
            self.collect();
        }
        self.finish(ring, done)
    }

    fn poll_fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.poll_fd()
    }

    fn on_poll(&mut self, ring: &mut Uring, done: &mut Done) -> io::Result<()> {
        self.inner.on_poll(ring, &mut self.inner_done)?;
        self.collect_polled(ring, done)
    }

    fn describe(&self) -> String {
        format!("{} over {}", self.params, self.inner.describe())
    }

    fn max_in_flight(&self) -> Option<u32> {
        // One spindle: the next IO is chosen when this one finishes.
        Some(1)
    }
}

#[derive(Clone, Copy, Default)]
struct LinkTag {
    busy: bool,
    result: Option<i32>,
    timer_done: bool,
}

/// The link model around another engine: IOs in flight together, sharing the bandwidth.
pub struct ModelLink {
    inner: Box<dyn Engine>,
    params: ModelParams,
    tags: Box<[LinkTag]>,
    /// Absolute completion time of each tag's timer.
    ts: Box<[types::Timespec]>,
    /// When the link is free again (ns, CLOCK_MONOTONIC).
    link_free: u64,
    inner_done: Done,
}

impl ModelLink {
    /// Wraps `inner`, which serves `tags` tags.
    pub fn new(inner: Box<dyn Engine>, params: ModelParams, tags: u32) -> ModelLink {
        ModelLink {
            inner,
            params,
            tags: vec![LinkTag::default(); tags as usize].into_boxed_slice(),
            ts: (0..tags).map(|_| types::Timespec::new()).collect(),
            link_free: 0,
            inner_done: Done::with_capacity(tags as usize),
        }
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
                if t.timer_done {
                    t.busy = false;
                    done.push(tag, res);
                }
            }
        }
        self.inner_done.0.clear();
    }
}

impl Engine for ModelLink {
    fn unpinned_memory_only(&mut self) {
        self.inner.unpinned_memory_only();
    }

    unsafe fn submit(
        &mut self,
        ring: &mut Uring,
        io: BackendIo,
        done: &mut Done,
    ) -> io::Result<()> {
        let ModelParams::Link { latency_us, .. } = self.params else {
            return Err(io::Error::other("not a link model"));
        };
        let len = if matches!(io.op, IoOp::Read | IoOp::Write) {
            io.len
        } else {
            0
        };
        let now = now_ns();
        let start = self.link_free.max(now);
        self.link_free = start + self.params.service_ns(len, true);
        let at = self.link_free + u64::from(latency_us) * 1000;
        let t = io.tag as usize;
        self.tags[t] = LinkTag {
            busy: true,
            result: None,
            timer_done: false,
        };
        self.ts[t] = types::Timespec::new()
            .sec(at / 1_000_000_000)
            .nsec((at % 1_000_000_000) as u32);
        let e = opcode::Timeout::new(&self.ts[t])
            .flags(types::TimeoutFlags::ABS)
            .build()
            .user_data(LINK_TIMERS + u64::from(io.tag));
        // SAFETY: the timespec lives in `self.ts[tag]`, a boxed slice that is never resized,
        // and is not rewritten before this tag completes (tags are not reused while busy).
        unsafe { ring.push(&e)? };
        // SAFETY: forwarded from our own submit contract, which the caller upholds.
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
        if (LINK_TIMERS..LINK_TIMERS + self.tags.len() as u64).contains(&user_data) {
            let tag = (user_data - LINK_TIMERS) as u32;
            let t = &mut self.tags[tag as usize];
            t.timer_done = true;
            if let (true, Some(r)) = (t.busy, t.result) {
                t.busy = false;
                done.push(tag, r);
            }
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
        format!("{} over {}", self.params, self.inner.describe())
    }
}
