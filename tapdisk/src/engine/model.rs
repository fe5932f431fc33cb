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
use serde::{Deserialize, Serialize};

use super::{BackendIo, Done, Engine, IoOp, Uring, ENGINE_SPACE};

/// User data of the spindle's timer; a link's timers are `LINK_TIMERS + tag`.
const TIMER: u64 = ENGINE_SPACE - 1;
const LINK_TIMERS: u64 = ENGINE_SPACE / 2;

/// A model's constants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelParams {
    /// One spindle.
    Spindle {
        /// Fixed cost of every IO, µs (thesis: 335).
        x_us: u32,
        /// Transfer cost, ns per KiB (thesis: about 4 µs per KB = 4000).
        y_ns_per_kb: u32,
        /// Added when an IO does not start where the previous one ended, µs.
        seek_us: u32,
    },
    /// A network link to remote storage.
    Link {
        /// Time from the last byte sent to the completion, µs.
        latency_us: u32,
        /// Link bandwidth, MB/s (10^6 bytes).
        mb_s: u32,
    },
}

impl Default for ModelParams {
    fn default() -> Self {
        ModelParams::Spindle {
            x_us: 335,
            y_ns_per_kb: 4000,
            seek_us: 4170,
        }
    }
}

impl std::fmt::Display for ModelParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            ModelParams::Spindle {
                x_us,
                y_ns_per_kb,
                seek_us,
            } => write!(
                f,
                "model disk X={x_us} µs Y={y_ns_per_kb} ns/KB seek={seek_us} µs"
            ),
            ModelParams::Link { latency_us, mb_s } => {
                write!(f, "model link {mb_s} MB/s, {latency_us} µs latency")
            }
        }
    }
}

impl std::str::FromStr for ModelParams {
    type Err = String;
    /// `default` (the thesis's spindle), `X_US,Y_NS_PER_KB,SEEK_US` (a spindle), or
    /// `link:LATENCY_US,MB_S`.
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "default" || s == "spindle" || s.is_empty() {
            return Ok(ModelParams::default());
        }
        let (link, body) = match s.strip_prefix("link:") {
            Some(b) => (true, b),
            None => (false, s),
        };
        let v: Vec<&str> = body.split(',').collect();
        let num = |i: usize, what: &str| -> Result<u32, String> {
            v.get(i)
                .ok_or_else(|| format!("model '{s}' lacks {what}"))?
                .trim()
                .parse::<u32>()
                .map_err(|_| format!("model '{s}': {what} is not a whole number"))
        };
        if link {
            if v.len() != 2 {
                return Err(format!(
                    "model '{s}' is not link:LATENCY_US,MB_S (e.g. link:2000,100)"
                ));
            }
            let mb_s = num(1, "the bandwidth")?;
            if mb_s == 0 {
                return Err(format!("model '{s}': the bandwidth must be positive"));
            }
            return Ok(ModelParams::Link {
                latency_us: num(0, "the latency")?,
                mb_s,
            });
        }
        if v.len() != 3 {
            return Err(format!(
                "model '{s}' is not X_US,Y_NS_PER_KB,SEEK_US (e.g. 335,4000,4170), \
                 link:LATENCY_US,MB_S or 'default'"
            ));
        }
        Ok(ModelParams::Spindle {
            x_us: num(0, "X")?,
            y_ns_per_kb: num(1, "Y")?,
            seek_us: num(2, "the seek time")?,
        })
    }
}

impl ModelParams {
    /// A spindle's service time of an IO of `len` bytes, ns, `sequential` if it starts where
    /// the previous one ended (a link: its transfer time).
    pub fn service_ns(&self, len: u64, sequential: bool) -> u64 {
        match *self {
            ModelParams::Spindle {
                x_us,
                y_ns_per_kb,
                seek_us,
            } => {
                let mut t = u64::from(x_us) * 1000 + u64::from(y_ns_per_kb) * len / 1024;
                if !sequential {
                    t += u64::from(seek_us) * 1000;
                }
                t
            }
            ModelParams::Link { mb_s, .. } => len * 1000 / u64::from(mb_s.max(1)),
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_times_follow_table_3_1() {
        let m = ModelParams::default();
        // Thesis Table 3.1: 4 KB 345 µs, 128 KB 887, 512 KB 2383 (sequential dd).
        for (kb, thesis) in [(4u64, 345.0), (128, 887.0), (512, 2383.0)] {
            let us = m.service_ns(kb * 1024, true) as f64 / 1000.0;
            assert!(
                (us - thesis).abs() / thesis < 0.2,
                "{kb} KB: {us} vs {thesis}"
            );
        }
        assert_eq!(m.service_ns(0, false), (335 + 4170) * 1000);
        let l: ModelParams = "link:2000,100".parse().unwrap();
        // 1 MB at 100 MB/s: 10.49 ms on the wire.
        assert_eq!(l.service_ns(1 << 20, true), 10_485_760);
    }

    #[test]
    fn params_parse() {
        assert_eq!("default".parse::<ModelParams>(), Ok(ModelParams::default()));
        assert_eq!(
            "100,2000,0".parse::<ModelParams>(),
            Ok(ModelParams::Spindle {
                x_us: 100,
                y_ns_per_kb: 2000,
                seek_us: 0
            })
        );
        assert_eq!(
            "link:500,250".parse::<ModelParams>(),
            Ok(ModelParams::Link {
                latency_us: 500,
                mb_s: 250
            })
        );
        assert!("1,2"
            .parse::<ModelParams>()
            .unwrap_err()
            .contains("X_US,Y_NS_PER_KB"));
        assert!("a,2,3"
            .parse::<ModelParams>()
            .unwrap_err()
            .contains("X is not"));
        assert!("link:1".parse::<ModelParams>().is_err());
        assert!("link:1,0".parse::<ModelParams>().is_err());
        assert_eq!(
            ModelParams::Link {
                latency_us: 2000,
                mb_s: 100
            }
            .to_string(),
            "model link 100 MB/s, 2000 µs latency"
        );
    }
}
