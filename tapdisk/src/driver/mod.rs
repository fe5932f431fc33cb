//! Image drivers: what a VBD reads and writes, one folder per driver.
//!
//! A driver opens an [`Image`]; for each ring of the VBD, [`Image::engine`] builds the
//! [`Engine`] that ring's event loop drives (io_uring straight into the frontend's pages).
//! [`open_image`] opens a disk spec with the driver it names, and [`make_engine`] builds a
//! ring's engine: the driver's own, then the layers the VBD's settings ask for (fault
//! injection, a slow-storage model; [`layer`]).
//!
//! Drivers: [`aio`] (`aio:PATH`, a raw file or block device), [`parallax`] (`parallax:PATH`
//! and `parallax:PATH@VOLUME`, volumes of a Parallax image), [`stripe`] (`stripe:MAPPING`, a
//! disk striped over iSCSI servers). Layers: [`fault`], [`model`]. Adding a driver is adding a
//! folder here with its image and its engine, and a line in [`open_image_logged`].

pub mod aio;
pub mod engine;
pub mod fault;
pub mod layer;
pub mod model;
pub mod parallax;
pub mod stripe;

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
}

/// Opens `spec` with the driver it names; drivers that log (`stripe:`: lost connections,
/// failovers, stale replicas) log nowhere. A VBD uses [`open_image_logged`].
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
        Driver::Parallax => Ok(Arc::new(parallax::ParallaxImage::open(spec, opts)?)),
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
    /// Metadata cache slots of a Parallax image (0: the driver's default, 128). An image
    /// already open in this process for another volume keeps its cache.
    pub cache_slots: u32,
    /// A `stripe:` image's iSCSI connections are driven inline by the event loops.
    pub iscsi_inline: bool,
}
