//! The rings of a VBD: one thread each, started the same way whoever attached them (a local
//! frontend through the device socket, tapback for a Xen frontend, the NBD export for one of
//! its connections), paused, counted and stopped with the VBD.

use std::collections::VecDeque;
use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use blkif::local::AttachLimits;
use blkif::request::DiskInfo;
use slog::{info, o, warn, Logger};

use crate::logging::RateLimit;
use crate::ring::{
    lock, RingConfig, RingControl, RingEnv, RingExit, RingLoop, RingTransport, VbdShared,
};
use crate::stats::{Absorb, RingStats};
use crate::sys::cpu::Colocation;
use crate::trace::{self, TraceReader};

/// Rings attached to a VBD at once through the device socket or by tapback, counting those
/// still in their handshake. A peer of the device socket that connects beyond this is closed
/// at once. (NBD connections have their own limit, [`crate::nbd::MAX_CONNECTIONS`].)
pub const MAX_RINGS: usize = 64;
/// Trace buffers of finished rings kept for `tap-ctl trace`, newest last.
const KEPT_TRACES: usize = 8;

/// Who attached a ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingKind {
    /// A local frontend, through the device socket.
    Local,
    /// A Xen frontend, through tapback.
    Xen,
    /// A connection of the VBD's NBD export.
    Nbd,
}

struct RingHandle {
    kind: RingKind,
    ctl: Arc<RingControl>,
    thread: Option<JoinHandle<RingExit>>,
    stats: Arc<RingStats>,
    trace: Option<TraceReader>,
}

/// The live rings, and what is kept of those that finished (their counters summed into one
/// [`RingStats`], and the last few trace buffers), so that a peer attaching and detaching in a
/// loop costs a bounded amount of memory.
#[derive(Default)]
struct Registry {
    live: Vec<RingHandle>,
    retired: RingStats,
    retired_count: u64,
    retired_traces: VecDeque<TraceReader>,
    /// Numbers rings for logs and traces.
    next_no: u32,
}

impl Registry {
    /// Moves finished rings' counters into `retired` and drops their threads.
    fn prune(&mut self) {
        let mut i = 0;
        while i < self.live.len() {
            if self.live[i]
                .thread
                .as_ref()
                .is_some_and(|t| !t.is_finished())
            {
                i += 1;
                continue;
            }
            let mut h = self.live.swap_remove(i);
            if let Some(t) = h.thread.take() {
                let _ = t.join();
            }
            self.retired.absorb(&h.stats);
            self.retired_count += 1;
            if let Some(t) = h.trace {
                if self.retired_traces.len() == KEPT_TRACES {
                    self.retired_traces.pop_front();
                }
                self.retired_traces.push_back(t);
            }
        }
    }

    fn count(&self, pred: impl Fn(RingKind) -> bool) -> usize {
        self.live.iter().filter(|h| pred(h.kind)).count()
    }
}

/// A ring started by [`Rings::spawn`], as its owner sees it.
#[derive(Debug, Clone)]
pub struct RingLink {
    /// Stop and wake the loop through this.
    pub ctl: Arc<RingControl>,
    /// Why the loop ended, once it has (and the transport, with its mappings, is gone).
    pub exit: Arc<Mutex<Option<String>>>,
    /// The ring's counters.
    pub stats: Arc<RingStats>,
}

/// Everything a VBD starts ring loops with, and the rings it started.
pub struct Rings {
    cfg: RingConfig,
    disk: DiskInfo,
    limits: AttachLimits,
    /// Requests traced per ring (0: off).
    trace: usize,
    shared: Arc<VbdShared>,
    registry: Mutex<Registry>,
    log: Logger,
}

/// Totals of a VBD's rings for `tap-ctl stats`.
pub struct RingTotals {
    /// The counters of every ring, live and finished.
    pub stats: crate::stats::Totals,
    /// Live rings attached by frontends (local and Xen).
    pub live: usize,
    /// Rings ever attached by frontends.
    pub total: u64,
}

impl Rings {
    /// Rings of a VBD whose requests must fit `disk`.
    pub fn new(
        cfg: RingConfig,
        disk: DiskInfo,
        limits: AttachLimits,
        trace: usize,
        shared: Arc<VbdShared>,
        log: Logger,
    ) -> Rings {
        Rings {
            cfg,
            disk,
            limits,
            trace,
            shared,
            registry: Mutex::default(),
            log,
        }
    }

    /// The disk rings serve.
    pub fn disk(&self) -> DiskInfo {
        self.disk
    }

    /// The state the rings share with the VBD.
    pub fn shared(&self) -> &Arc<VbdShared> {
        &self.shared
    }

    /// Starts a ring thread: `make` builds the transport on it (a handshake may fail there),
    /// then the loop runs over it, enforcing `disk`.
    pub fn spawn<T: RingTransport>(
        &self,
        kind: RingKind,
        name: &str,
        disk: DiskInfo,
        make: impl FnOnce(&Logger) -> Result<T, RingExit> + Send + 'static,
    ) -> io::Result<RingLink> {
        let no = {
            let mut r = lock(&self.registry);
            r.next_no += 1;
            r.next_no
        };
        let ctl = Arc::new(RingControl::new()?);
        let stats = Arc::new(RingStats::default());
        let exit: Arc<Mutex<Option<String>>> = Arc::default();
        let (writer, reader) = if self.trace > 0 {
            let (w, r) = trace::buffer(no, self.trace)?;
            (Some(w), Some(r))
        } else {
            (None, None)
        };
        let env = RingEnv {
            vbd: self.shared.clone(),
            ctl: ctl.clone(),
            stats: stats.clone(),
            trace: writer,
            log: self.log.new(o!("ring" => name.to_owned())),
            cache: self.shared.cache.clone(),
        };
        let cfg = self.cfg.clone();
        let exit2 = exit.clone();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let log = env.log.clone();
                let r = match make(&log) {
                    Ok(t) => match RingLoop::new(t, disk, cfg, env) {
                        Ok(l) => l.run(),
                        Err(e) => RingExit::Fatal(e),
                    },
                    Err(e) => e,
                };
                info!(log, "ring detached"; "why" => ?r);
                *lock(&exit2) = Some(r.to_string());
                r
            })?;
        let mut r = lock(&self.registry);
        r.prune();
        r.live.push(RingHandle {
            kind,
            ctl: ctl.clone(),
            thread: Some(thread),
            stats: stats.clone(),
            trace: reader,
        });
        Ok(RingLink { ctl, exit, stats })
    }

    /// Serves a local-transport frontend that connected over `sock` (its handshake runs on
    /// the ring's thread). With `near`, the ring's thread stays on that CPU (a frontend
    /// thread in this process that works in step with it is there: [`Colocation`]).
    pub fn attach_local(
        &self,
        kind: RingKind,
        name: &str,
        sock: UnixStream,
        near: Option<Colocation>,
    ) -> io::Result<RingLink> {
        let (limits, disk) = (self.limits, self.disk);
        self.spawn(kind, name, disk, move |log| {
            let cpu = near.filter(|c| c.join()).map(|c| c.cpu());
            match blkif::local::accept(sock, &limits, &disk) {
                Ok(be) => {
                    info!(log, "ring attached"; "abi" => be.abi.name(), "ring_order" => be.ring_order,
                          "slots" => be.ring.size(), "mem_pages" => be.grants.pages(),
                          "cpu" => ?cpu);
                    Ok(be)
                }
                Err(e) => {
                    info!(log, "attach refused"; "why" => %e);
                    Err(RingExit::Broken(e.to_string()))
                }
            }
        })
    }

    /// The control of every live ring.
    pub fn live(&self) -> Vec<Arc<RingControl>> {
        let mut r = lock(&self.registry);
        r.prune();
        r.live.iter().map(|h| h.ctl.clone()).collect()
    }

    /// Live rings attached by frontends (not NBD connections).
    pub fn frontend_rings(&self) -> usize {
        let mut r = lock(&self.registry);
        r.prune();
        r.count(|k| k != RingKind::Nbd)
    }

    /// Counters of every ring, live and finished.
    pub fn totals(&self) -> RingTotals {
        let mut r = lock(&self.registry);
        r.prune();
        let stats = crate::stats::totals(
            r.live
                .iter()
                .map(|h| &*h.stats)
                .chain(std::iter::once(&r.retired)),
        );
        RingTotals {
            stats,
            live: r.count(|k| k != RingKind::Nbd),
            total: r.live.len() as u64 + r.retired_count,
        }
    }

    /// What the trace buffers hold, finished rings first.
    pub fn traces(&self) -> Vec<crate::trace::RingTrace> {
        let r = lock(&self.registry);
        r.retired_traces
            .iter()
            .chain(r.live.iter().filter_map(|h| h.trace.as_ref()))
            .map(|t| t.snapshot())
            .collect()
    }

    /// Stops every ring (each finishes its IO in flight) and joins the threads.
    pub fn stop_all(&self) {
        let handles: Vec<RingHandle> = std::mem::take(&mut lock(&self.registry).live);
        for h in &handles {
            h.ctl.stop.store(true, Ordering::Release);
            h.ctl.wake();
        }
        for mut h in handles {
            if let Some(t) = h.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// Serves the device socket: each peer that connects attaches a ring, up to [`MAX_RINGS`].
///
/// The loop sleeps on the listener and on `wake`; the VBD stops it by setting `stop` and
/// writing a byte to the other end of `wake` (never by connecting to the socket's path, which
/// may have been removed under a live tapdisk). An accept that fails for want of descriptors
/// or memory is logged at a limited rate and retried after a pause, not in a busy loop.
pub fn accept_loop(
    listener: UnixListener,
    wake: UnixStream,
    rings: Arc<Rings>,
    stop: Arc<AtomicBool>,
) {
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut refused = RateLimit::new(10, Duration::from_secs(5));
    let mut failed = RateLimit::new(5, Duration::from_secs(10));
    if let Err(e) = listener.set_nonblocking(true) {
        warn!(rings.log, "the device socket cannot be made non-blocking; no frontend can attach";
              "error" => %e);
        return;
    }
    loop {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(wake.as_fd(), PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                warn!(rings.log, "poll on the device socket failed; no more frontends attach";
                      "error" => %e);
                return;
            }
        }
        if stop.load(Ordering::Acquire) {
            return;
        }
        loop {
            let sock = match listener.accept() {
                Ok((sock, _)) => sock,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e)
                    if e.kind() == io::ErrorKind::Interrupted
                        || e.raw_os_error() == Some(libc::ECONNABORTED) =>
                {
                    continue
                }
                Err(e) => {
                    // Out of descriptors or memory: pause instead of spinning on it.
                    if let Some(suppressed) = failed.check() {
                        warn!(rings.log, "accepting on the device socket failed"; "error" => %e,
                              "suppressed" => suppressed);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
            };
            if sock.set_nonblocking(false).is_err() {
                continue;
            }
            let attached = {
                let mut r = lock(&rings.registry);
                r.prune();
                r.count(|k| k != RingKind::Nbd)
            };
            if attached >= MAX_RINGS {
                if let Some(suppressed) = refused.check() {
                    warn!(rings.log, "refused a ring: the VBD already has the most rings it serves";
                          "max_rings" => MAX_RINGS, "suppressed" => suppressed);
                }
                // Dropping the socket closes it: the peer reads end-of-file.
                continue;
            }
            let no = lock(&rings.registry).next_no + 1;
            if let Err(e) = rings.attach_local(RingKind::Local, &format!("ring{no}"), sock, None) {
                warn!(rings.log, "cannot start a ring thread"; "error" => %e);
            }
        }
    }
}
