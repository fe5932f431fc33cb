//! A VBD: one image, the rings attached to it, and its NBD export.
//!
//! The VBD listens on its "device node", a unix socket in `<rundir>/tapdisk-rs/vbd/tapdevN`,
//! where local frontends attach rings ([`blkif::local`]); tapback attaches Xen frontends'
//! rings ([`xen`]); the NBD exports (blktap3's `<rundir>/nbd<pid>.<minor>` always, and an
//! address of the settings if given) attach one ring per connection ([`export`]). Every ring gets
//! its own thread running a [`crate::ring::RingLoop`] ([`rings`]).
//!
//! Pausing sets a flag every ring loop checks before taking requests, wakes the loops, waits
//! until each reports that nothing is in flight (NBD requests wait in their rings), then has
//! the image write back its cached metadata ([`crate::driver::Image::quiesce`]).
//! Unpausing may swap the image first (same size), as `tap-ctl unpause -a` does for a live
//! image move.

pub mod export;
pub mod lock;
pub mod rings;
pub mod xen;

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blkif::local::AttachLimits;
use blkif::request::DiskInfo;
use slog::{info, o, warn, Logger};

use tapdisk_control::proto::{VbdState, VbdSummary};
use tapdisk_control::{Driver, ImageSpec, VbdSettings};

use crate::driver::{open_image_logged, Layers, OpenOptionsImg, SECTOR};
use crate::error::{Error, IoContext, Result};
use crate::nbd::NbdServer;
use crate::ring::{RingConfig, RingTransport, VbdShared};
use crate::sched::SchedConfig;
use crate::trace::RingTrace;

use self::rings::{RingKind, RingLink, Rings};

/// Where a VBD is reached, besides any `--nbd` address of its settings.
#[derive(Clone, Debug)]
pub struct VbdPaths {
    /// Its device socket, where local frontends attach rings.
    pub device: PathBuf,
    /// Its NBD socket (blktap3's `<rundir>/nbd<pid>.<minor>`, which Xen's `block-tap` writes
    /// as `physical-device-path`).
    pub nbd: PathBuf,
}

/// One virtual block device.
pub struct Vbd {
    /// Minor number.
    pub minor: u32,
    spec: ImageSpec,
    opts: VbdSettings,
    rings: Arc<Rings>,
    accept_stop: Arc<AtomicBool>,
    /// Wakes the device socket's accept thread (see [`rings::accept_loop`]).
    accept_wake: UnixStream,
    accept: Option<JoinHandle<()>>,
    device: PathBuf,
    nbd: Option<NbdServer>,
    /// The lock on an `aio:` image ([`lock`]).
    image_lock: Option<lock::ImageLock>,
    /// The export on [`VbdPaths::nbd`].
    nbd_socket: Option<NbdServer>,
    quiescing: bool,
    log: Logger,
    /// Xen frontends this VBD serves (see [`xen`]).
    pub xen: Vec<xen::XenAttachment>,
}

impl Vbd {
    /// Opens `spec` as VBD `minor` with settings `opts`, reached at `paths`. The caller has
    /// checked both ([`VbdSettings::validate_for`]; the daemon does for every command it
    /// reads).
    pub fn open(
        minor: u32,
        spec: ImageSpec,
        opts: VbdSettings,
        paths: VbdPaths,
        log: &Logger,
    ) -> Result<Vbd> {
        let device = paths.device;
        let log = log.new(o!("minor" => minor));
        let image_lock = take_lock(&spec, &opts, &log)?;
        let image = open_image_logged(&spec, image_options(&opts), &log).map_err(Error::Image)?;
        if let Some(l) = &image_lock {
            if !l.is_file(&spec.path) {
                return Err(Error::Refused(format!(
                    "image {} was replaced while it was opened",
                    spec.path.display()
                )));
            }
        }
        if image.size() < SECTOR {
            return Err(Error::Refused(format!(
                "image {} is smaller than one sector",
                spec.path.display()
            )));
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
                ..SchedConfig::default()
            },
            max_batch: opts.max_batch,
            batch_wait: Duration::from_micros(u64::from(opts.batch_wait_us)),
            poll: Duration::from_micros(u64::from(opts.poll_us)),
            layers: Layers {
                faults: opts.faults.clone(),
                model: opts.model,
            },
            early: opts.early,
        };
        let direct = image.direct();
        let cache = match opts.early.filter(|p| p.cache_mb > 0) {
            Some(p) => Some(Arc::new(
                crate::early::ReadCache::new(p.cache_mb).map_err(Error::Image)?,
            )),
            None => None,
        };
        let shared = Arc::new(VbdShared::new(image, cache));
        if device.exists() {
            std::fs::remove_file(&device).ok();
        }
        let listener = UnixListener::bind(&device)
            .doing(|| format!("cannot create the device socket {}", device.display()))?;
        let limits = AttachLimits {
            max_ring_order: opts.max_ring_order,
            ..AttachLimits::default()
        };
        let rings = Arc::new(Rings::new(
            ring_cfg,
            disk,
            limits,
            opts.trace as usize,
            shared,
            log.clone(),
        ));
        let accept_stop = Arc::new(AtomicBool::new(false));
        let (accept_wake, wake_rx) =
            UnixStream::pair().doing(|| "cannot make the device socket's wake-up pair".into())?;
        let accept = {
            let (rings, stop) = (rings.clone(), accept_stop.clone());
            std::thread::Builder::new()
                .name(format!("vbd{minor}-accept"))
                .spawn(move || rings::accept_loop(listener, wake_rx, rings, stop))
                .doing(|| "cannot start the device socket's thread".into())?
        };
        let export: Arc<dyn crate::nbd::Export> = Arc::new(export::VbdExport::new(
            rings.clone(),
            &format!("tapdev{minor}"),
        ));
        let nbd = match &opts.nbd {
            Some(l) => Some(
                NbdServer::start(l, export.clone(), log.clone())
                    .doing(|| format!("cannot start the NBD export on {l}"))?,
            ),
            None => None,
        };
        let standard = tapdisk_control::NbdListen::Unix(paths.nbd.clone());
        let nbd_socket = Some(
            NbdServer::start(&standard, export, log.clone())
                .doing(|| format!("cannot start the NBD export on {standard}"))?,
        );
        info!(log, "opened"; "image" => %spec, "sectors" => disk.sectors, "direct" => direct,
              "read_only" => opts.read_only,
              "nbd" => opts.nbd.as_ref().map_or_else(|| "-".into(), |n| n.to_string()));
        Ok(Vbd {
            minor,
            spec,
            opts,
            rings,
            accept_stop,
            accept_wake,
            accept: Some(accept),
            device,
            nbd,
            image_lock,
            nbd_socket,
            quiescing: false,
            log,
            xen: Vec::new(),
        })
    }

    fn shared(&self) -> &Arc<VbdShared> {
        self.rings.shared()
    }

    /// The VBD's state.
    pub fn state(&self) -> VbdState {
        if self.shared().paused.load(Ordering::Acquire) {
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
        let disk = self.rings.disk();
        VbdSummary {
            minor: self.minor,
            state: self.state(),
            image: self.spec.clone(),
            device: self.device.display().to_string(),
            nbd: self.nbd.as_ref().map(|n| n.local_addr()),
            nbd_socket: self.nbd_socket.as_ref().and_then(|n| match n.local_addr() {
                tapdisk_control::NbdListen::Unix(p) => Some(p),
                tapdisk_control::NbdListen::Tcp(_) => None,
            }),
            max_ring_order: self.opts.max_ring_order,
            max_indirect_segments: self.opts.max_indirect_segments,
            rings: self.rings.frontend_rings() as u32,
            size: disk.sectors * SECTOR,
            read_only: disk.read_only,
            xen: self.xen.iter().map(|x| x.info()).collect(),
        }
    }

    /// Counters for `tap-ctl stats`.
    pub fn stats(&self) -> serde_json::Value {
        let t = self.rings.totals();
        serde_json::json!({
            "minor": self.minor,
            "image": self.spec.to_string(),
            "state": self.state(),
            "state_flags": self.state().blktap_flags(),
            "sectors": self.rings.disk().sectors,
            "rings": t.live,
            "rings_total": t.total,
            "ring": t.stats,
            "driver": self.shared().image().stats(),
            "nbd": nbd_stats(self.nbd.as_ref()),
            "nbd_socket": nbd_stats(self.nbd_socket.as_ref()),
        })
    }

    /// What the rings' trace buffers hold (empty unless opened with a trace size).
    pub fn trace(&self) -> Vec<RingTrace> {
        self.rings.traces()
    }

    /// Quiesces: returns once no IO is in flight and none will start until [`Vbd::unpause`].
    pub fn pause(&mut self) -> Result<()> {
        self.shared().paused.store(true, Ordering::Release);
        self.quiescing = true;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let rings = self.rings.live();
            for r in &rings {
                r.wake();
            }
            if rings.iter().all(|r| r.quiesced.load(Ordering::Acquire)) {
                break;
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout(
                    "rings still have IO in flight after 30 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.quiescing = false;
        // Nothing in flight: the image writes back what only its memory holds, so tools see
        // the file complete while it is paused (a snapshot of the leaf, say).
        self.shared().image().quiesce().map_err(Error::Image)?;
        info!(self.log, "paused");
        Ok(())
    }

    /// Resumes, first switching to `new_image` if given (it must have the same size).
    pub fn unpause(&mut self, new_image: Option<ImageSpec>) -> Result<()> {
        if !self.shared().paused.load(Ordering::Acquire) {
            return Err(Error::Refused(format!(
                "minor {} is not paused",
                self.minor
            )));
        }
        if let Some(spec) = new_image {
            self.opts
                .validate_on(&spec, &tapdisk_control::Machine::probe())?;
            // The same file keeps its lock; another one's is taken before the old one goes.
            let same = self
                .image_lock
                .as_ref()
                .is_some_and(|l| spec.driver == Driver::Aio && l.is_file(&spec.path));
            let new_lock = if same {
                None
            } else {
                take_lock(&spec, &self.opts, &self.log)?
            };
            // The new image may be an overlay over the old one (a snapshot): the old one lets
            // go of its writer's locks first, and takes them back if the new one is refused.
            let old = self.shared().image();
            old.release().map_err(Error::Image)?;
            let opened = open_image_logged(&spec, image_options(&self.opts), &self.log)
                .map_err(Error::Image)
                .and_then(|img| {
                    let sectors = self.rings.disk().sectors;
                    if img.size() / SECTOR != sectors {
                        return Err(Error::Refused(format!(
                            "new image {} has {} sectors, the disk has {}",
                            spec.path.display(),
                            img.size() / SECTOR,
                            sectors
                        )));
                    }
                    Ok(img)
                });
            let img = match opened {
                Ok(img) => img,
                Err(e) => {
                    // (A new image of the wrong size was dropped already.)
                    if let Err(r) = old.reclaim() {
                        warn!(self.log, "the old image could not be locked again"; "error" => %r);
                    }
                    return Err(e);
                }
            };
            self.shared().set_image(img);
            if !same {
                self.image_lock = new_lock;
            }
            info!(self.log, "image replaced"; "image" => %spec);
            self.spec = spec;
        }
        self.shared().paused.store(false, Ordering::Release);
        for r in self.rings.live() {
            r.wake();
        }
        info!(self.log, "unpaused");
        Ok(())
    }

    /// The device socket.
    pub fn device(&self) -> &Path {
        &self.device
    }

    /// The largest ring order frontends may use (its setting).
    pub fn max_ring_order(&self) -> u8 {
        self.opts.max_ring_order
    }

    /// Where the IO of its Xen rings with persistent grants goes (its setting).
    pub fn persistent_io(&self) -> blkif::xen::backend::PersistentIo {
        self.opts.persistent_io
    }

    /// The disk as rings see it.
    pub fn disk(&self) -> DiskInfo {
        self.rings.disk()
    }

    /// Serves a ring that another transport attached (a Xen frontend's, say) on a thread of
    /// its own, like the rings local frontends attach through the device socket: it is
    /// paused, counted in the stats and stopped with the VBD. `disk` is what the ring
    /// enforces (the VBD's [`Vbd::disk`], possibly with other limits).
    pub fn attach_ring<T: RingTransport>(
        &self,
        t: T,
        name: &str,
        disk: DiskInfo,
    ) -> io::Result<RingLink> {
        self.rings.spawn(RingKind::Xen, name, disk, move |_| Ok(t))
    }

    /// Disconnects everything and closes the image.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        // Let paused rings run to their exit first: the NBD server joins its connection
        // threads, which wait for their rings.
        self.shared().paused.store(false, Ordering::Release);
        for r in self.rings.live() {
            r.wake();
        }
        if let Some(n) = self.nbd.take() {
            n.shutdown();
        }
        if let Some(n) = self.nbd_socket.take() {
            n.shutdown();
        }
        self.accept_stop.store(true, Ordering::Release);
        let _ = (&self.accept_wake).write(&[1]);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        self.rings.stop_all();
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

/// The lock of an `aio:` image ([`lock::lock_image`]); other drivers lock their own files.
fn take_lock(spec: &ImageSpec, o: &VbdSettings, log: &Logger) -> Result<Option<lock::ImageLock>> {
    match spec.driver {
        Driver::Aio => lock::lock_image(&spec.path, o.read_only, o.force_share, log),
        _ => Ok(None),
    }
}

/// The counters of one NBD export (`nbd`, `nbd_socket` in `tap-ctl stats`).
fn nbd_stats(n: Option<&NbdServer>) -> serde_json::Value {
    serde_json::json!({
        "address": n.map(|n| n.local_addr().to_string()),
        "connections": n.map(|n| n.connections()).unwrap_or(0),
        "waiting": n.map(|n| n.waiting()).unwrap_or(0),
        "buffer_bytes": n.map(|n| n.buffered()).unwrap_or(0),
        "counters": n.map(|n| n.counters()),
    })
}

/// How a VBD opens its image (at open and when switching images on unpause).
fn image_options(o: &VbdSettings) -> OpenOptionsImg {
    OpenOptionsImg {
        read_only: o.read_only,
        direct: o.direct,
        cache_slots: o.cache_slots,
        iscsi_inline: o.iscsi_inline,
        takeover: o.takeover,
    }
}

/// Map of open VBDs by minor.
pub type VbdMap = BTreeMap<u32, Vbd>;
