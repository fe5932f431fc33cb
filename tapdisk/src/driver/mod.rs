//! Image drivers: what a VBD reads and writes, one folder per driver.
//!
//! A driver opens an [`Image`]; for each ring of the VBD, [`Image::engine`] builds the
//! [`Engine`] that ring's event loop drives (io_uring straight into the frontend's pages).
//! [`open_image`] opens a disk spec with the driver it names, and [`make_engine`] builds a
//! ring's engine: the driver's own, then the layers the VBD's settings ask for (fault
//! injection, a slow-storage model; [`layer`]).
//!
//! Drivers: [`aio`] (`aio:PATH`, a raw file or block device), [`parallax`] (`parallax:PATH`
//! and `parallax:PATH@VOLUME`, volumes of a Parallax image), [`vhd`] (`vhd:PATH`, a VHD and
//! its parents), [`qcow2`] (`qcow2:PATH`, a qcow2 image and its backing chain), [`stripe`]
//! (`stripe:MAPPING`, a disk striped over iSCSI servers). Parallax, VHD and qcow2 are
//! formats of the translating engine ([`translate`]: the format maps guest ranges
//! to file ranges, the engine does the data IO). Layers: [`fault`], [`model`]. Adding a
//! driver is adding a folder here with its image and its engine (or its [`translate::Format`]),
//! and a line in [`open_image_logged`].

pub mod aio;
pub mod engine;
pub mod fault;
pub mod layer;
pub mod model;
pub mod parallax;
pub mod qcow2;
pub mod stripe;
pub mod translate;
pub mod vhd;

use std::io;
use std::sync::Arc;

pub use engine::{BackendIo, Done, Engine, IoOp, Memory, Uring};
pub use tapdisk_control::{DirectIo, Driver, ImageSpec};

/// Bytes in a blkif sector (always 512, whatever the image's own block size).
pub const SECTOR: u64 = 512;

/// A disk image a VBD serves, whatever the driver: what it is, and an engine per ring that
/// does its IO.
pub trait Image: Send + Sync {
    /// Size of the disk in bytes (a multiple of 512).
    fn size(&self) -> u64;
    /// Whether writes and discards are refused.
    fn read_only(&self) -> bool;
    /// Whether a discard can free space (and so is offered to frontends).
    fn supports_discard(&self) -> bool;
    /// An engine for one ring over this image, with IOs tagged `0..tags`.
    fn engine(self: Arc<Self>, ring: &mut Uring, tags: u32) -> io::Result<Box<dyn Engine>>;
    /// For logs and `tap-ctl list`: the spec it was opened from.
    fn spec(&self) -> ImageSpec;
    /// Whether IO bypasses the page cache (for the log line at open).
    fn direct(&self) -> bool {
        false
    }
    /// Driver-specific counters for `tap-ctl stats` (`null` if none).
    fn stats(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// The VBD paused with nothing in flight: write back what the image holds only in memory
    /// (metadata), so that tools reading the file meanwhile (`vhd-util snapshot` of a paused
    /// leaf) find it complete.
    fn quiesce(&self) -> io::Result<()> {
        Ok(())
    }
    /// The VBD, paused, is about to open another image in this one's place (`tap-ctl unpause
    /// -a`): let go of what would keep the new image from opening this one's files (a qcow2
    /// leaf's writer locks, when the new image is an overlay over it). Nothing is written
    /// meanwhile; [`Image::reclaim`] undoes it if the new image does not open.
    fn release(&self) -> io::Result<()> {
        Ok(())
    }
    /// Takes back what [`Image::release`] let go of.
    fn reclaim(&self) -> io::Result<()> {
        Ok(())
    }
}

/// Opens `spec` with the driver it names; drivers that log (`stripe:`: lost connections,
/// failovers, stale replicas; `parallax:`: a damaged superblock copy) log nowhere. A VBD uses
/// [`open_image_logged`].
pub fn open_image(spec: &ImageSpec, opts: OpenOptionsImg) -> io::Result<Arc<dyn Image>> {
    open_image_logged(spec, opts, &slog::Logger::root(slog::Discard, slog::o!()))
}

/// As [`open_image`]; the driver logs to `log`.
pub fn open_image_logged(
    spec: &ImageSpec,
    opts: OpenOptionsImg,
    log: &slog::Logger,
) -> io::Result<Arc<dyn Image>> {
    match spec.driver {
        Driver::Aio => Ok(Arc::new(aio::AioImage::open(&spec.path, opts)?)),
        Driver::Stripe => Ok(Arc::new(stripe::StripeImage::open(&spec.path, opts, log)?)),
        Driver::Parallax => Ok(Arc::new(translate::Translated::new(
            parallax::ParallaxImage::open(spec, opts, log)?,
        ))),
        Driver::Vhd => Ok(Arc::new(translate::Translated::new(vhd::VhdImage::open(
            spec, opts,
        )?))),
        Driver::Qcow2 => Ok(Arc::new(translate::Translated::new(
            qcow2::Qcow2Image::open(spec, opts)?,
        ))),
    }
}

/// The layers a ring's engine gets on top of its driver's.
#[derive(Clone, Debug, Default)]
pub struct Layers {
    /// Faults to inject (testing).
    pub faults: Option<tapdisk_control::FaultPlan>,
    /// Serve through a slow-storage model (experiments).
    pub model: Option<tapdisk_control::ModelParams>,
}

/// Builds the engine of one ring over `image` (IOs tagged `0..tags`): the driver's, then
/// injected faults, then a model. Nothing may be in flight on `ring`'s fixed files (a new
/// ring, or one whose engine is being replaced while paused).
pub fn make_engine(
    image: &Arc<dyn Image>,
    ring: &mut Uring,
    tags: u32,
    layers: &Layers,
) -> io::Result<Box<dyn Engine>> {
    ring.clear_files()?;
    let mut e = image.clone().engine(ring, tags)?;
    if let Some(f) = &layers.faults {
        e = fault::wrap(e, f.clone(), ring, tags);
    }
    if let Some(p) = layers.model {
        e = model::wrap(e, p, ring, tags);
    }
    Ok(e)
}

/// Options for opening an image.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOptionsImg {
    /// Refuse writes.
    pub read_only: bool,
    /// O_DIRECT policy.
    pub direct: DirectIo,
    /// Metadata cache slots of a Parallax or VHD image (0: the driver's default). An image
    /// already open in this process (another volume, a shared parent) keeps its cache.
    pub cache_slots: u32,
    /// A `stripe:` image's iSCSI connections are driven inline by the event loops.
    pub iscsi_inline: bool,
    /// A `stripe:` disk in etcd: take the writer role over from whoever holds it.
    pub takeover: bool,
}
