//! The event loop of one ring: blkif requests in, scheduled backend IO, blkif responses out.
//!
//! One thread per ring runs [`RingLoop::run`]. Everything it waits for is an io_uring
//! completion ([`token`]): the event channel and the control eventfd are multishot polls, the
//! frontend's socket a one-shot poll for hang-up, a batch timer, and the IO itself (through the
//! engine, [`backend`]). One `io_uring_enter` per iteration submits new IO and waits.
//!
//! The loop is cut by concern:
//! - [`intake`]: pop a batch, copy each slot once, validate it ([`blkif::request::parse`]; an
//!   indirect request's descriptor pages are mapped read-only, copied once, unmapped and
//!   validated the same way), map its grants, point iovecs at the frontend's pages, and hand it
//!   to the [`Sched`]uler, which orders, sorts and merges before the engine sees anything;
//! - [`reap`]: route each completion to the loop's own handlers or the engine, and the IOs the
//!   engine reports done to the scheduler;
//! - [`answer`]: unmap what finished, respond, account, and publish once per batch;
//! - [`early`]: early read return, a layer the intake and the answering call into;
//! - the request table ([`RequestTable`]) owns every request's slot, the free lists and the ids
//!   in flight.
//!
//! Slots, iovecs, the id set and every scratch list are preallocated per ring: the path takes
//! no lock and allocates nothing. A frontend that publishes more requests than the ring holds,
//! or reuses an id still in flight, is broken: its ring is disconnected once the IO already
//! started completes. The process and its other rings carry on.

mod answer;
mod backend;
mod clock;
pub mod control;
mod early;
mod intake;
mod kick;
mod poll;
mod reap;
pub mod token;
pub mod transport;

#[cfg(test)]
mod tests;

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use blkif::transport::EventChannel;
use slog::{info, warn, Logger};

use crate::driver::{Done, Layers};
use tapdisk_control::EarlyPolicy;

use crate::early::ReadCache;
use crate::logging::RateLimit;
use crate::requests::RequestTable;
use crate::sched::{Sched, SchedConfig};
use crate::stats::RingStats;
use crate::sys::uring::Uring;
use crate::trace::{now_ns, TraceWriter};

use self::backend::Backend;
use self::clock::PassClock;
use self::early::EarlyLayer;
use self::intake::Intake;
use self::kick::UringKicks;
use self::poll::{PollEnd, Poller};
use self::token::{Token, Tokens};
pub use control::{lock, RingControl, VbdShared};
pub use transport::RingTransport;

/// Why a ring loop ended.
#[derive(Debug)]
pub enum RingExit {
    /// The frontend closed its end.
    FrontendGone,
    /// The frontend broke the protocol and was disconnected.
    Broken(String),
    /// The VBD asked the ring to stop.
    Stopped,
    /// io_uring failed; the ring cannot continue.
    Fatal(io::Error),
}

impl std::fmt::Display for RingExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RingExit::FrontendGone => f.write_str("frontend gone"),
            RingExit::Broken(why) => write!(f, "frontend broke the protocol: {why}"),
            RingExit::Stopped => f.write_str("stopped"),
            RingExit::Fatal(e) => write!(f, "IO engine failed: {e}"),
        }
    }
}

/// Per-ring settings, from the VBD's settings.
#[derive(Clone, Debug, Default)]
pub struct RingConfig {
    /// Sorting and merging.
    pub sched: SchedConfig,
    /// Requests taken from the ring per batch (0: half the frontend's depth, so that the
    /// frontend refills while the loop serves; see `intake.rs`).
    pub max_batch: u32,
    /// Wait up to this long for a batch to fill before dispatching it (0: never wait).
    pub batch_wait: Duration,
    /// Poll the ring and the IO's completions up to this long before sleeping (0: never);
    /// the window adapts below it ([`poll`]).
    pub poll: Duration,
    /// Layers over the driver's engine (fault injection, a model).
    pub layers: Layers,
    /// Early read return (for frontends that set up the early-read contract).
    pub early: Option<EarlyPolicy>,
}

/// What a ring loop shares with its VBD.
pub struct RingEnv {
    /// The VBD's shared state (image, pause flag).
    pub vbd: Arc<VbdShared>,
    /// Stop and wake-up from the VBD.
    pub ctl: Arc<RingControl>,
    /// Where the loop counts.
    pub stats: Arc<RingStats>,
    /// Where the loop records requests, if tracing.
    pub trace: Option<TraceWriter>,
    /// The ring's logger.
    pub log: Logger,
    /// The VBD's read cache, if it has one.
    pub cache: Option<Arc<ReadCache>>,
}

/// Where the loop is.
#[derive(Debug)]
enum LoopState {
    /// Taking requests.
    Running,
    /// Paused by the VBD: no new requests; in-flight IO finishes.
    Paused,
    /// Ending: no new requests; once nothing is in flight, the loop returns this.
    Stopping(RingExit),
}

/// What a ring loop reuses on every pass instead of allocating.
struct Scratch {
    /// What the engine reported done.
    done: Done,
    /// What the scheduler finished.
    finished: Vec<u32>,
    /// The grant mappings of the requests being answered, and how their release went.
    unmaps: Vec<blkif::transport::MapHandle>,
    unmap_results: Vec<Result<(), blkif::request::Problem>>,
}

/// The loop's two pollers.
struct Pollers {
    /// How long to spin for the next request before sleeping (nothing in flight).
    requests: Poller,
    /// How long to spin for completions before sleeping (IO in flight).
    io: Poller,
}

/// One ring's loop. Build it on the thread that runs it (it holds raw pointers).
pub struct RingLoop<T: RingTransport> {
    t: T,
    uring: Uring,
    tokens: Tokens,
    backend: Backend,
    sched: Sched,
    table: RequestTable,
    intake: Intake,
    early: Option<EarlyLayer>,
    state: LoopState,
    /// An event was consumed and its channel still waits for its EOI (see `EventChannel::eoi`).
    eoi_due: bool,
    env: RingEnv,
    guest_errors: RateLimit,
    /// Scratch space reused every pass.
    scratch: Scratch,
    /// How long to spin before sleeping, for requests and for completions.
    poll: Pollers,
    /// Kicks and notifications through the io_uring, where the transport allows (after
    /// `uring`, so its buffers outlive the ring).
    kicks: Option<UringKicks>,
    /// A clock reading handed from one step of a pass to the next.
    clock: PassClock,
}

impl<T: RingTransport> RingLoop<T> {
    /// Prepares a loop for `t`, serving the VBD's current image, for requests that fit `disk`.
    pub fn new(
        t: T,
        disk: blkif::request::DiskInfo,
        cfg: RingConfig,
        env: RingEnv,
    ) -> io::Result<RingLoop<T>> {
        let mut t = t;
        let n = t.parts().0.size();
        let seg_cap = disk.segment_capacity();
        let early = EarlyLayer::new(&t, n, seg_cap, cfg.early, env.cache.clone(), &env.log);
        let chunks = early.as_ref().map_or(0, EarlyLayer::chunk_slots);
        let table = RequestTable::new(n, chunks, seg_cap);
        let mut sched = Sched::new(cfg.sched, table.len(), seg_cap);
        let tags = sched.tags();
        // Room for every engine op (model timers included) and the loop's own polls.
        let entries = (tags * 2 + 8).next_power_of_two().min(32768);
        let mut uring = Uring::new(entries)?;
        let tokens = Tokens::reserve(&mut uring);
        let intake = Intake::new(t.abi(), disk, &cfg, n);
        let kicks = t.eventfds().map(UringKicks::new);
        let poll_ns = u64::try_from(cfg.poll.as_nanos()).unwrap_or(u64::MAX);
        let backend = Backend::new(&mut uring, env.vbd.image(), cfg.layers, tags)?;
        sched.set_engine(backend.engine());
        let clock = PassClock::new(env.trace.is_some());
        Ok(RingLoop {
            t,
            uring,
            tokens,
            backend,
            sched,
            table,
            intake,
            early,
            state: LoopState::Running,
            eoi_due: true,
            env,
            guest_errors: RateLimit::new(10, Duration::from_secs(5)),
            scratch: Scratch {
                done: Done::with_capacity(tags as usize),
                finished: Vec::with_capacity(n as usize + chunks as usize),
                unmaps: Vec::with_capacity(n as usize),
                unmap_results: Vec::with_capacity(n as usize),
            },
            poll: Pollers {
                requests: Poller::new(poll_ns, 1),
                io: Poller::new(poll_ns, 8),
            },
            kicks,
            clock,
        })
    }

    fn push_sqe(&mut self, e: &io_uring::squeue::Entry) -> io::Result<()> {
        // SAFETY: the loop's own entries are polls on descriptors that stay open while the
        // loop lives, cancellations, a timeout whose timespec lives in the intake
        // (unchanged until the next submit, which happens before it is rewritten), and
        // 8-byte reads and writes of nonblocking eventfds from and into buffers the loop's
        // `UringKicks` owns (boxed, never moved, and done during the enter that submits
        // them; see `kick`).
        unsafe { self.uring.push(e) }
    }

    fn arm_polls(&mut self) -> io::Result<()> {
        let ev = self.t.parts().2.fd();
        self.push_sqe(&self.tokens.poll_multi(ev, Token::Evtchn))?;
        self.push_sqe(
            &self
                .tokens
                .poll_multi(self.env.ctl.wake_fd(), Token::Control),
        )?;
        if let Some(fd) = self.t.hangup_fd() {
            self.push_sqe(&self.tokens.poll_hangup(fd, Token::Hangup))?;
        }
        if let Some(fd) = self.t.early_read().map(|p| p.uffd.fd()) {
            self.push_sqe(&self.tokens.poll_multi(fd, Token::Uffd))?;
        }
        self.arm_engine_poll()
    }

    /// Polls the engine's completion descriptor, if it has one.
    fn arm_engine_poll(&mut self) -> io::Result<()> {
        if let Some(fd) = self.backend.engine().poll_fd() {
            self.push_sqe(&self.tokens.poll_multi(fd, Token::EnginePoll))?;
        }
        Ok(())
    }

    /// Runs until the frontend goes away, breaks the protocol, or the VBD stops the ring.
    pub fn run(mut self) -> RingExit {
        let r = self.run_inner();
        self.update_grant_stats();
        self.env.stats.grants.clear_gauges();
        match r {
            Ok(()) => match std::mem::replace(&mut self.state, LoopState::Running) {
                LoopState::Stopping(exit) => exit,
                _ => RingExit::Stopped,
            },
            Err(e) => {
                // Never leave IO in flight that points into memory we are about to unmap.
                self.drain_all();
                RingExit::Fatal(e)
            }
        }
    }

    fn run_inner(&mut self) -> io::Result<()> {
        // The ring's mode shows in the counters from the start, not from its first request.
        self.update_grant_stats();
        self.arm_polls()?;
        self.t.parts().2.ack()?;
        loop {
            self.clock.forget();
            self.check_control()?;
            if self.stopping() && self.idle() {
                self.publish()?;
                return Ok(());
            }
            let more = self.can_pop() && self.take_requests();
            self.dispatch()?;
            self.answer();
            self.publish()?;
            let mut wait = !more;
            self.clock.forget();
            if wait && self.poller().window_ns() > 0 && self.may_spin() {
                // Busy-poll before re-arming req_event: a frontend that publishes within the
                // window needs neither a kick nor a wake-up, nor does a completion.
                wait = !self.spin()?;
            }
            if wait && self.can_pop() {
                // About to sleep: re-arm req_event and look once more.
                match self.t.parts().0.final_check() {
                    Ok(0) => {}
                    Ok(_) => wait = false,
                    Err(e) => self.broken(e.to_string()),
                }
            }
            if self.stopping() && self.idle() {
                continue;
            }
            if wait && self.eoi_due && self.can_pop() {
                // Drained and req_event re-armed: only now let the frontend's next kick in.
                // While we cannot take requests (paused, no free slot) the channel stays
                // masked, so a frontend kicking in a loop cannot keep waking us.
                self.eoi_due = false;
                self.t.parts().2.eoi()?;
            }
            if wait && matches!(self.state, LoopState::Paused) && self.idle() {
                self.env.ctl.quiesced.store(true, Ordering::Release);
            }
            let asleep = if wait && self.poll.requests.enabled() {
                now_ns()
            } else {
                0
            };
            let io_wait = self.sched.ios_in_flight() > 0;
            match self.uring.submit_and_wait(usize::from(wait)) {
                Ok(n) => {
                    if n > 0 {
                        self.env.stats.submits.add(1);
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(e),
            }
            if asleep != 0 {
                let woke = now_ns();
                self.clock.hand_over(woke);
                let slept = woke.saturating_sub(asleep);
                let p = if io_wait {
                    &mut self.poll.io
                } else {
                    &mut self.poll.requests
                };
                p.slept(slept);
                let w = p.window_ns();
                self.env.stats.poll.window_ns.set(w);
            }
            self.reap()?;
            self.answer();
            let stats = &self.env.stats;
            stats.waiting.set(self.sched.pending() as u64);
            stats.ios_in_flight.set(self.sched.ios_in_flight() as u64);
            stats
                .early_busy
                .set(self.early.as_ref().map_or(0, |e| u64::from(e.busy())));
            self.update_grant_stats();
        }
    }

    fn update_grant_stats(&self) {
        if let Some(c) = self.t.grant_counters() {
            self.env.stats.grants.update(&c);
        }
    }

    /// Whether anything may arrive that a spin could catch: requests we could take, or
    /// completions of IO in flight.
    fn may_spin(&self) -> bool {
        matches!(self.state, LoopState::Running)
            && (self.table.has_free() || self.sched.ios_in_flight() > 0)
    }

    /// Spins up to the poller's window for a request or a completion, and teaches the poller
    /// what happened. False if the window passed with nothing to do (sleep now).
    fn spin(&mut self) -> io::Result<bool> {
        let window = self.poller().window_ns();
        let start = now_ns();
        let mut now = start;
        let end = loop {
            if self.table.has_free() && !matches!(self.t.parts().0.pending(), Ok(0)) {
                break PollEnd::Hit(now - start);
            }
            if self.sched.ios_in_flight() > 0 && self.uring.completions_ready()? {
                break PollEnd::Hit(now - start);
            }
            if self.env.ctl.stop.load(Ordering::Relaxed)
                || self.env.vbd.paused.load(Ordering::Relaxed)
            {
                break PollEnd::Interrupted;
            }
            if now - start >= window {
                break PollEnd::Miss;
            }
            std::hint::spin_loop();
            now = now_ns();
        };
        let p = self.poller();
        p.spun(end);
        let window = p.window_ns();
        let st = &self.env.stats.poll;
        st.spins.add(1);
        st.spin_ns.add(now_ns().saturating_sub(start));
        match end {
            PollEnd::Hit(_) => st.hits.add(1),
            PollEnd::Miss => st.misses.add(1),
            PollEnd::Interrupted => {}
        }
        st.window_ns.set(window);
        Ok(end != PollEnd::Miss)
    }

    /// The poller of what the loop would wait for now.
    fn poller(&mut self) -> &mut Poller {
        if self.sched.ios_in_flight() > 0 {
            &mut self.poll.io
        } else {
            &mut self.poll.requests
        }
    }

    /// Nothing answered or not is still using the frontend's memory.
    fn idle(&self) -> bool {
        self.table.in_flight() == 0 && self.early.as_ref().is_none_or(|e| e.busy() == 0)
    }

    fn stopping(&self) -> bool {
        matches!(self.state, LoopState::Stopping(_))
    }

    fn can_pop(&self) -> bool {
        matches!(self.state, LoopState::Running) && self.table.has_free()
    }

    fn broken(&mut self, why: String) {
        if !self.stopping() {
            warn!(self.env.log, "disconnecting a broken frontend"; "why" => &why);
            self.state = LoopState::Stopping(RingExit::Broken(why));
        }
    }

    fn check_control(&mut self) -> io::Result<()> {
        if self.stopping() {
            return Ok(());
        }
        if self.env.ctl.stop.load(Ordering::Acquire) {
            self.state = LoopState::Stopping(RingExit::Stopped);
            return Ok(());
        }
        let paused = self.env.vbd.paused.load(Ordering::Acquire);
        match (&self.state, paused) {
            (LoopState::Running, true) => self.state = LoopState::Paused,
            (LoopState::Paused, false) => {
                // The image may have been replaced while we were paused (nothing in flight).
                let image = self.env.vbd.image();
                let had_poll = self.backend.engine().poll_fd().is_some();
                match self.backend.swap(&mut self.uring, image, self.sched.tags()) {
                    Ok(false) => {}
                    Ok(true) => {
                        self.sched.set_engine(self.backend.engine());
                        if had_poll {
                            self.push_sqe(&self.tokens.cancel(Token::EnginePoll))?;
                        }
                        self.arm_engine_poll()?;
                        info!(self.env.log, "serving the new image";
                              "engine" => self.backend.engine().describe());
                    }
                    Err(e) => {
                        warn!(self.env.log, "cannot switch to the new image"; "error" => %e);
                        self.state = LoopState::Stopping(RingExit::Fatal(e));
                        return Ok(());
                    }
                }
                self.state = LoopState::Running;
                self.env.ctl.quiesced.store(false, Ordering::Release);
            }
            _ => {}
        }
        Ok(())
    }

    fn publish(&mut self) -> io::Result<()> {
        let (ring, _, ev) = self.t.parts();
        if !ring.push_responses() {
            return Ok(());
        }
        self.env.stats.notifies.add(1);
        let Some(k) = &self.kicks else {
            return ev.notify();
        };
        let e = k.notify(&self.tokens);
        self.push_sqe(&e)?;
        // The write goes out with the loop's next enter, unless the loop spins or ends
        // before it enters: then now.
        if self.poller().window_ns() > 0 || self.stopping() {
            self.uring.submit_and_wait(0)?;
        }
        Ok(())
    }

    /// Waits for every IO in flight (used on fatal errors only).
    fn drain_all(&mut self) {
        let mut spins = 0;
        while self.sched.ios_in_flight() > 0 && spins < 10_000 {
            spins += 1;
            if self.uring.submit_and_wait(1).is_err() {
                std::thread::sleep(Duration::from_millis(1));
            }
            if self.reap().is_err() {
                break;
            }
        }
    }
}
