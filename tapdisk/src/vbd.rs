//! A VBD: one image, the rings attached to it, and its NBD export.
//!
//! The VBD listens on its "device node", a unix socket in `<rundir>/vbd/tapdevN`, where local
//! frontends attach rings ([`blkif::local`]); each ring gets its own thread running a
//! [`RingLoop`]. The NBD export serves the same image through [`GatedTarget`].
//!
//! Pausing sets a flag every ring loop checks before taking requests, wakes the loops, and
//! waits until each reports that nothing is in flight; NBD requests wait at a gate. Unpausing
//! may swap the image first (same size), as `tap-ctl unpause -a` does for a live image move.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blkif::local::AttachLimits;
use blkif::request::DiskInfo;
use slog::{info, o, warn, Logger};
use tapdisk_control::proto::{VbdState, VbdSummary};
use tapdisk_control::{ImageSpec, VbdSettings};

use crate::image::{open_image_logged, BlockTarget, Image, OpenOptionsImg, SECTOR};
use crate::nbd::NbdServer;
use crate::ringloop::{RingConfig, RingEnv, RingExit, RingLoop, RingTransport};
use crate::sched::SchedConfig;
use crate::stats::{self, RingStats};
use crate::trace::{self, RingTrace, TraceReader};

/// Locks a mutex, recovering the data if a thread panicked while holding it (the state these
/// mutexes guard stays consistent at every await point).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// State shared by the VBD and its ring loops.
pub struct VbdShared {
    /// Ring loops take no new requests while set.
    pub paused: AtomicBool,
    image: Mutex<Arc<dyn Image>>,
    /// The host-side read cache (early read return), if configured.
    pub cache: Option<Arc<crate::early::ReadCache>>,
}

impl std::fmt::Debug for VbdShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VbdShared")
            .field("paused", &self.paused)
            .field("image", &self.image().spec().to_string())
            .finish_non_exhaustive()
    }
}

impl VbdShared {
    /// The current image.
    pub fn image(&self) -> Arc<dyn Image> {
        lock(&self.image).clone()
    }
}

/// The control side of one ring loop.
#[derive(Debug)]
pub struct RingControl {
    wake: OwnedFd,
    /// Asks the loop to finish in-flight IO and exit.
    pub stop: AtomicBool,
    /// Set by the loop while paused with nothing in flight.
    pub quiesced: AtomicBool,
}

impl RingControl {
    fn new() -> io::Result<RingControl> {
        // SAFETY: plain syscall; the result is checked before it is wrapped.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor nothing else owns.
        let wake = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(RingControl {
            wake,
            stop: AtomicBool::new(false),
            quiesced: AtomicBool::new(false),
        })
    }

    /// The descriptor the loop polls.
    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Wakes the loop so it re-reads the flags.
    pub fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our own eventfd. A full counter (EAGAIN)
        // already means "woken".
        unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), 8) };
    }

    /// Consumes wake-ups.
    pub fn ack(&self) {
        let mut b = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live buffer from our own nonblocking eventfd.
        unsafe { libc::read(self.wake.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
    }
}

struct RingHandle {
    ctl: Arc<RingControl>,
    thread: Option<JoinHandle<RingExit>>,
    stats: Arc<RingStats>,
    trace: Option<TraceReader>,
}

/// Rings attached to a VBD at once, counting those still in their handshake. A peer of the
/// device socket that connects beyond this is closed at once.
pub const MAX_RINGS: usize = 64;
/// Trace buffers of finished rings kept for `tap-ctl trace`, newest last.
const KEPT_TRACES: usize = 8;

/// The rings of a VBD: the live ones, and what is kept of those that finished (their counters
/// summed into one [`RingStats`], and the last few trace buffers), so that a peer attaching
/// and detaching in a loop costs a bounded amount of memory.
#[derive(Default)]
struct Rings {
    live: Vec<RingHandle>,
    retired: RingStats,
    retired_count: u64,
    retired_traces: std::collections::VecDeque<TraceReader>,
    /// Numbers rings for logs and traces.
    next_no: u32,
}

impl Rings {
    /// Moves finished rings' counters into `retired` and drops their threads.
    fn prune(&mut self) {
        use crate::stats::Absorb;
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

    fn next_no(&mut self) -> u32 {
        self.next_no += 1;
        self.next_no
    }
}

/// NBD-side gate and counters.
#[derive(Debug, Default)]
struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    closed: bool,
    active: u32,
}

/// The image as the NBD export sees it: every call passes the pause gate and is counted.
pub struct GatedTarget {
    shared: Arc<VbdShared>,
    gate: Arc<Gate>,
    size: u64,
    read_only: bool,
    counters: Arc<NbdCounters>,
}

/// Counters of the NBD export (several connection threads write them).
#[derive(Debug, Default, serde::Serialize)]
pub struct NbdCounters {
    /// Reads.
    pub reads: AtomicU64,
    /// Writes.
    pub writes: AtomicU64,
    /// Flushes.
    pub flushes: AtomicU64,
    /// Discards and write-zeroes.
    pub discards: AtomicU64,
    /// Bytes read.
    pub read_bytes: AtomicU64,
    /// Bytes written.
    pub write_bytes: AtomicU64,
    /// Errors returned.
    pub errors: AtomicU64,
}

impl GatedTarget {
    /// Keeps the read cache coherent with writes that do not come through a ring.
    fn invalidate(&self, offset: u64, len: u64) {
        if let Some(c) = &self.shared.cache {
            let first = offset / SECTOR;
            let end = (offset + len).div_ceil(SECTOR);
            c.invalidate(first, end - first);
        }
    }

    fn with<R>(&self, c: &AtomicU64, f: impl FnOnce(&dyn Image) -> io::Result<R>) -> io::Result<R> {
        {
            let mut g = lock(&self.gate.state);
            while g.closed {
                g = self.gate.cv.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            g.active += 1;
        }
        let r = f(&*self.shared.image());
        {
            let mut g = lock(&self.gate.state);
            g.active -= 1;
            self.gate.cv.notify_all();
        }
        c.fetch_add(1, Ordering::Relaxed);
        if r.is_err() {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

impl BlockTarget for GatedTarget {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn supports_discard(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.counters
            .read_bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.with(&self.counters.reads, |i| i.read_at(buf, offset))
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.counters
            .write_bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.invalidate(offset, buf.len() as u64);
        let r = self.with(&self.counters.writes, |i| i.write_at(buf, offset, fua));
        self.invalidate(offset, buf.len() as u64);
        r
    }
    fn flush(&self) -> io::Result<()> {
        self.with(&self.counters.flushes, |i| i.flush())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.invalidate(offset, len);
        let r = self.with(&self.counters.discards, |i| i.discard(offset, len));
        self.invalidate(offset, len);
        r
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.invalidate(offset, len);
        let r = self.with(&self.counters.discards, |i| i.write_zeroes(offset, len));
        self.invalidate(offset, len);
        r
    }
}

/// One virtual block device.
pub struct Vbd {
    /// Minor number.
    pub minor: u32,
    spec: ImageSpec,
    opts: VbdSettings,
    disk: DiskInfo,
    shared: Arc<VbdShared>,
    rings: Arc<Mutex<Rings>>,
    accept_stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    device: PathBuf,
    nbd: Option<NbdServer>,
    gate: Arc<Gate>,
    nbd_counters: Arc<NbdCounters>,
    quiescing: bool,
    log: Logger,
    /// Ring settings, for rings attached by [`Vbd::attach_ring`].
    ring_cfg: RingConfig,
    /// Xen frontends this VBD serves (see [`crate::xen`]).
    pub xen: Vec<crate::xen::XenAttachment>,
}

impl Vbd {
    /// Opens `spec` as VBD `minor` with settings `opts`, its device socket at `device`. The
    /// caller has checked both ([`VbdSettings::validate_for`]; the daemon does for every
    /// command it reads).
    pub fn open(
        minor: u32,
        spec: ImageSpec,
        opts: VbdSettings,
        device: PathBuf,
        log: &Logger,
    ) -> anyhow::Result<Vbd> {
        use anyhow::{bail, Context};
        let image = open_image_logged(&spec, image_options(&opts), &log.new(o!("minor" => minor)))?;
        if image.size() < SECTOR {
            bail!("image {} is smaller than one sector", spec.path.display());
        }
        let disk = DiskInfo {
            sectors: image.size() / SECTOR,
            sector_size: SECTOR as u32,
            read_only: opts.read_only,
            flush: true,
            barrier: true,
            discard: !opts.read_only && image.supports_discard(),
            max_segments: opts.max_segments,
            max_indirect_segments: opts.max_indirect_segments,
        };
        let ring_cfg = RingConfig {
            sched: SchedConfig {
                merge: opts.merge,
                max_merge_bytes: u64::from(opts.max_merge_kb) * 1024,
                max_ios: opts.max_ios,
            },
            max_batch: opts.max_batch,
            batch_wait: Duration::from_micros(u64::from(opts.batch_wait_us)),
            poll: Duration::from_micros(u64::from(opts.poll_us)),
            model: opts.model,
            early: opts.early,
            faults: opts.faults.clone(),
        };
        let log = log.new(o!("minor" => minor));
        let direct = image.direct();
        let size = image.size();
        let shared = Arc::new(VbdShared {
            paused: AtomicBool::new(false),
            image: Mutex::new(image),
            cache: opts
                .early
                .filter(|p| p.cache_mb > 0)
                .map(|p| Arc::new(crate::early::ReadCache::new(p.cache_mb))),
        });
        if device.exists() {
            std::fs::remove_file(&device).ok();
        }
        let listener = UnixListener::bind(&device)
            .with_context(|| format!("cannot create the device socket {}", device.display()))?;
        let rings: Arc<Mutex<Rings>> = Arc::default();
        let accept_stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let ctx = AcceptCtx {
                limits: AttachLimits {
                    max_ring_order: opts.max_ring_order,
                    ..AttachLimits::default()
                },
                cfg: ring_cfg.clone(),
                trace: opts.trace as usize,
                disk,
                shared: shared.clone(),
                rings: rings.clone(),
                stop: accept_stop.clone(),
                log: log.clone(),
            };
            std::thread::Builder::new()
                .name(format!("vbd{minor}-accept"))
                .spawn(move || accept_loop(listener, ctx))?
        };
        let gate = Arc::new(Gate::default());
        let nbd_counters = Arc::new(NbdCounters::default());
        let nbd = match &opts.nbd {
            Some(l) => {
                let target = Arc::new(GatedTarget {
                    shared: shared.clone(),
                    gate: gate.clone(),
                    size,
                    read_only: opts.read_only,
                    counters: nbd_counters.clone(),
                });
                Some(
                    NbdServer::start(l, &format!("tapdev{minor}"), target, log.clone())
                        .with_context(|| format!("cannot start the NBD export on {l}"))?,
                )
            }
            None => None,
        };
        info!(log, "opened"; "image" => %spec, "sectors" => disk.sectors, "direct" => direct,
              "read_only" => opts.read_only,
              "nbd" => opts.nbd.as_ref().map_or_else(|| "-".into(), |n| n.to_string()));
        Ok(Vbd {
            minor,
            spec,
            opts,
            disk,
            shared,
            rings,
            accept_stop,
            accept: Some(accept),
            device,
            nbd,
            gate,
            nbd_counters,
            quiescing: false,
            log,
            ring_cfg,
            xen: Vec::new(),
        })
    }

    fn live_rings(&self) -> Vec<Arc<RingControl>> {
        let mut rings = lock(&self.rings);
        rings.prune();
        rings.live.iter().map(|r| r.ctl.clone()).collect()
    }

    /// The VBD's state.
    pub fn state(&self) -> VbdState {
        if self.shared.paused.load(Ordering::Acquire) {
            if self.quiescing {
                VbdState::Quiescing
            } else {
                VbdState::Paused
            }
        } else {
            VbdState::Running
        }
    }

    /// A line for `tap-ctl list`.
    pub fn summary(&self) -> VbdSummary {
        VbdSummary {
            minor: self.minor,
            state: self.state(),
            image: self.spec.clone(),
            device: self.device.display().to_string(),
            nbd: self.nbd.as_ref().map(|n| n.local_addr()),
            rings: self.live_rings().len() as u32,
            size: self.disk.sectors * SECTOR,
            read_only: self.disk.read_only,
            xen: self.xen.iter().map(|x| x.info()).collect(),
        }
    }

    /// Counters for `tap-ctl stats`.
    pub fn stats(&self) -> serde_json::Value {
        let mut rings = lock(&self.rings);
        rings.prune();
        let rs = &*rings;
        let t = stats::totals(
            rs.live
                .iter()
                .map(|h| &*h.stats)
                .chain(std::iter::once(&rs.retired)),
        );
        let (live, total) = (rs.live.len(), rs.live.len() as u64 + rs.retired_count);
        drop(rings);
        serde_json::json!({
            "minor": self.minor,
            "image": self.spec.to_string(),
            "state": self.state(),
            "sectors": self.disk.sectors,
            "rings": live,
            "rings_total": total,
            "ring": t,
            "driver": self.shared.image().stats(),
            "nbd": {
                "address": self.nbd.as_ref().map(|n| n.local_addr().to_string()),
                "connections": self.nbd.as_ref().map(|n| n.connections()).unwrap_or(0),
                "buffer_bytes": self.nbd.as_ref().map(|n| n.buffered()).unwrap_or(0),
                "counters": &*self.nbd_counters,
            },
        })
    }

    /// What the rings' trace buffers hold (empty unless opened with a trace size).
    pub fn trace(&self) -> Vec<RingTrace> {
        let rings = lock(&self.rings);
        rings
            .retired_traces
            .iter()
            .chain(rings.live.iter().filter_map(|h| h.trace.as_ref()))
            .map(|r| r.snapshot())
            .collect()
    }

    /// Quiesces: returns once no IO is in flight and none will start until [`Vbd::unpause`].
    pub fn pause(&mut self) -> anyhow::Result<()> {
        self.shared.paused.store(true, Ordering::Release);
        self.quiescing = true;
        {
            let mut g = lock(&self.gate.state);
            g.closed = true;
            let deadline = Instant::now() + Duration::from_secs(30);
            while g.active > 0 {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    anyhow::bail!("NBD requests did not finish within 30 s");
                }
                g = self
                    .gate
                    .cv
                    .wait_timeout(g, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let rings = self.live_rings();
            for r in &rings {
                r.wake();
            }
            if rings.iter().all(|r| r.quiesced.load(Ordering::Acquire)) {
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!("rings still have IO in flight after 30 s");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.quiescing = false;
        info!(self.log, "paused");
        Ok(())
    }

    /// Resumes, first switching to `new_image` if given (it must have the same size).
    pub fn unpause(&mut self, new_image: Option<ImageSpec>) -> anyhow::Result<()> {
        if !self.shared.paused.load(Ordering::Acquire) {
            anyhow::bail!("minor {} is not paused", self.minor);
        }
        if let Some(spec) = new_image {
            let img = open_image_logged(&spec, image_options(&self.opts), &self.log)?;
            if img.size() / SECTOR != self.disk.sectors {
                anyhow::bail!(
                    "new image {} has {} sectors, the disk has {}",
                    spec.path.display(),
                    img.size() / SECTOR,
                    self.disk.sectors
                );
            }
            *lock(&self.shared.image) = img;
            info!(self.log, "image replaced"; "image" => %spec);
            self.spec = spec;
        }
        self.shared.paused.store(false, Ordering::Release);
        {
            let mut g = lock(&self.gate.state);
            g.closed = false;
            self.gate.cv.notify_all();
        }
        for r in self.live_rings() {
            r.wake();
        }
        info!(self.log, "unpaused");
        Ok(())
    }

    /// The device socket.
    pub fn device(&self) -> &Path {
        &self.device
    }

    /// The disk as rings see it.
    pub fn disk(&self) -> DiskInfo {
        self.disk
    }

    /// Serves a ring that any transport attached (a Xen frontend's, say) on a thread of its
    /// own, like the rings local frontends attach through the device socket: it is paused,
    /// counted in the stats and stopped with the VBD.
    /// `disk` is what the ring enforces (the VBD's [`Vbd::disk`], possibly with tighter limits).
    pub fn attach_ring<T: RingTransport>(
        &self,
        t: T,
        name: &str,
        disk: DiskInfo,
    ) -> io::Result<RingLink> {
        let ctl = Arc::new(RingControl::new()?);
        let stats = Arc::new(RingStats::default());
        let exit: Arc<Mutex<Option<String>>> = Arc::default();
        let (shared, ctl2, stats2, exit2, disk, cfg) = (
            self.shared.clone(),
            ctl.clone(),
            stats.clone(),
            exit.clone(),
            disk,
            self.ring_cfg.clone(),
        );
        let cache = self.shared.cache.clone();
        let (writer, reader) = if self.opts.trace > 0 {
            let (w, r) = trace::buffer(lock(&self.rings).next_no(), self.opts.trace as usize);
            (Some(w), Some(r))
        } else {
            (None, None)
        };
        let rlog = self.log.new(o!("ring" => name.to_owned()));
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let env = RingEnv {
                    vbd: shared,
                    ctl: ctl2,
                    stats: stats2,
                    trace: writer,
                    log: rlog.clone(),
                    cache,
                };
                let r = match RingLoop::new(t, disk, cfg, env) {
                    Ok(l) => l.run(),
                    Err(e) => RingExit::Fatal(e),
                };
                info!(rlog, "ring detached"; "why" => ?r);
                *lock(&exit2) = Some(r.to_string());
                r
            })?;
        let mut rings = lock(&self.rings);
        rings.prune();
        rings.live.push(RingHandle {
            ctl: ctl.clone(),
            thread: Some(thread),
            stats: stats.clone(),
            trace: reader,
        });
        Ok(RingLink { ctl, exit, stats })
    }

    /// Disconnects everything and closes the image.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        // Let paused rings and NBD requests waiting at the gate run to their exit first: the
        // NBD server joins its connection threads, which must not be stuck at the gate.
        self.shared.paused.store(false, Ordering::Release);
        {
            let mut g = lock(&self.gate.state);
            g.closed = false;
            self.gate.cv.notify_all();
        }
        if let Some(n) = self.nbd.take() {
            n.shutdown();
        }
        self.accept_stop.store(true, Ordering::Release);
        let _ = UnixStream::connect(&self.device);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let handles: Vec<RingHandle> = std::mem::take(&mut lock(&self.rings).live);
        for h in &handles {
            h.ctl.stop.store(true, Ordering::Release);
            h.ctl.wake();
        }
        for mut h in handles {
            if let Some(t) = h.thread.take() {
                let _ = t.join();
            }
        }
        let _ = std::fs::remove_file(&self.device);
        info!(self.log, "closed");
    }
}

impl Drop for Vbd {
    fn drop(&mut self) {
        if self.accept.is_some() {
            self.shutdown();
        }
    }
}

/// What the accept thread needs to start ring loops.
struct AcceptCtx {
    limits: AttachLimits,
    cfg: RingConfig,
    trace: usize,
    disk: DiskInfo,
    shared: Arc<VbdShared>,
    rings: Arc<Mutex<Rings>>,
    stop: Arc<AtomicBool>,
    log: Logger,
}

/// How a VBD opens its image (at open and when switching images on unpause).
fn image_options(o: &VbdSettings) -> OpenOptionsImg {
    OpenOptionsImg {
        read_only: o.read_only,
        direct: o.direct,
        cache_slots: o.cache_slots,
        iscsi_inline: o.iscsi_inline,
    }
}

fn accept_loop(listener: UnixListener, cx: AcceptCtx) {
    let mut refused = crate::logging::RateLimit::new(10, Duration::from_secs(5));
    for conn in listener.incoming() {
        if cx.stop.load(Ordering::Acquire) {
            return;
        }
        let Ok(sock) = conn else { continue };
        let ring_no = {
            let mut rings = lock(&cx.rings);
            rings.prune();
            if rings.live.len() >= MAX_RINGS {
                drop(rings);
                if let Some(suppressed) = refused.check() {
                    warn!(cx.log, "refused a ring: the VBD already has the most rings it serves";
                          "max_rings" => MAX_RINGS, "suppressed" => suppressed);
                }
                // Dropping the socket closes it: the peer reads end-of-file.
                continue;
            }
            rings.next_no()
        };
        let ctl = match RingControl::new() {
            Ok(c) => Arc::new(c),
            Err(e) => {
                warn!(cx.log, "cannot create a ring's control eventfd"; "error" => %e);
                continue;
            }
        };
        let stats = Arc::new(RingStats::default());
        let (writer, reader) = if cx.trace > 0 {
            let (w, r) = trace::buffer(ring_no, cx.trace);
            (Some(w), Some(r))
        } else {
            (None, None)
        };
        let (shared2, ctl2, stats2) = (cx.shared.clone(), ctl.clone(), stats.clone());
        let cache = cx.shared.cache.clone();
        let rlog = cx.log.new(o!("ring" => ring_no));
        let (limits, disk, cfg) = (cx.limits, cx.disk, cx.cfg.clone());
        let thread = std::thread::Builder::new()
            .name(format!("ring{ring_no}"))
            .spawn(move || {
                let be = match blkif::local::accept(sock, &limits, &disk) {
                    Ok(be) => be,
                    Err(e) => {
                        info!(rlog, "attach refused"; "why" => %e);
                        return RingExit::Broken(e.to_string());
                    }
                };
                info!(rlog, "ring attached"; "abi" => be.abi.name(), "ring_order" => be.ring_order,
                  "slots" => be.ring.size(), "mem_pages" => be.grants.pages());
                let exit = match RingLoop::new(
                    be,
                    disk,
                    cfg,
                    RingEnv {
                        vbd: shared2,
                        ctl: ctl2,
                        stats: stats2,
                        trace: writer,
                        log: rlog.clone(),
                        cache,
                    },
                ) {
                    Ok(l) => l.run(),
                    Err(e) => RingExit::Fatal(e),
                };
                info!(rlog, "ring detached"; "why" => ?exit);
                exit
            });
        match thread {
            Ok(t) => lock(&cx.rings).live.push(RingHandle {
                ctl,
                thread: Some(t),
                stats,
                trace: reader,
            }),
            Err(e) => warn!(cx.log, "cannot start a ring thread"; "error" => %e),
        }
    }
}

/// A ring started by [`Vbd::attach_ring`], as its owner sees it.
#[derive(Debug, Clone)]
pub struct RingLink {
    /// Stop and wake the loop through this.
    pub ctl: Arc<RingControl>,
    /// Why the loop ended, once it has (and the transport, with its mappings, is gone).
    pub exit: Arc<Mutex<Option<String>>>,
    /// The ring's counters.
    pub stats: Arc<RingStats>,
}

/// Map of open VBDs by minor.
pub type VbdMap = BTreeMap<u32, Vbd>;
