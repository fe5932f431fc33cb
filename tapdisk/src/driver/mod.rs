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
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

pub use engine::{BackendIo, Done, Engine, IoOp, Uring};

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

/// What the memory of a ring's requests is, for the engine's choice of direct IO.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Memory {
    /// Stays mapped while the request lives: any IO may go straight to it.
    Stable,
    /// Unmapped as soon as each IO completes (a Xen ring's grant mappings): never direct IO
    /// into it ([`Engine::unpinned_memory_only`] says why).
    UnmappedAfterIo,
}

/// The layers a ring's engine gets on top of its driver's.
#[derive(Clone, Debug, Default)]
pub struct Layers {
    /// Faults to inject (testing).
    pub faults: Option<fault::FaultPlan>,
    /// Serve through a slow-storage model (experiments).
    pub model: Option<model::ModelParams>,
}

/// Builds the engine of one ring over `image` (IOs tagged `0..tags`): the driver's, then
/// injected faults, then a model. Nothing may be in flight on `ring`'s fixed files (a new
/// ring, or one whose engine is being replaced while paused).
pub fn make_engine(
    image: &Arc<dyn Image>,
    ring: &mut Uring,
    tags: u32,
    layers: &Layers,
    memory: Memory,
) -> io::Result<Box<dyn Engine>> {
    ring.clear_files()?;
    let mut e = image.clone().engine(ring, tags)?;
    if memory == Memory::UnmappedAfterIo {
        e.unpinned_memory_only();
    }
    if let Some(f) = &layers.faults {
        e = fault::wrap(e, f.clone(), ring, tags);
    }
    if let Some(p) = layers.model {
        e = model::wrap(e, p, ring, tags);
    }
    Ok(e)
}

/// Which image driver a disk spec names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    /// A raw file or block device.
    Aio,
    /// A volume of a Parallax image: the path is `PATH` (its first disk) or `PATH@VOLUME`.
    Parallax,
    /// A disk striped over iSCSI servers, described by a mapping file.
    Stripe,
}

impl Driver {
    /// The name in a disk spec.
    pub fn name(self) -> &'static str {
        match self {
            Driver::Aio => "aio",
            Driver::Parallax => "parallax",
            Driver::Stripe => "stripe",
        }
    }
}

/// A disk spec as tap-ctl and xenstore write it: `TYPE:PATH`, e.g. `aio:/var/lib/disk.img` or
/// `parallax:/var/lib/vm1.plx@before-upgrade`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageSpec {
    /// The driver.
    pub driver: Driver,
    /// The path the driver opens (for `parallax:`, with its `@VOLUME` if one was given).
    pub path: PathBuf,
}

impl FromStr for ImageSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (ty, path) = s.split_once(':').ok_or_else(|| {
            format!("disk spec '{s}' has no type: write it as TYPE:PATH, e.g. aio:{s}")
        })?;
        let driver = match ty {
            "aio" => Driver::Aio,
            "parallax" => Driver::Parallax,
            "stripe" => Driver::Stripe,
            other => {
                return Err(format!(
                    "unknown disk type '{other}' in '{s}' (known: aio, parallax, stripe)"
                ))
            }
        };
        if path.is_empty() {
            return Err(format!("disk spec '{s}' has an empty path"));
        }
        if driver == Driver::Parallax {
            path.parse::<::parallax::DiskSpec>()
                .map_err(|e| format!("disk spec '{s}': {e}"))?;
        }
        Ok(ImageSpec {
            driver,
            path: PathBuf::from(path),
        })
    }
}

impl std::fmt::Display for ImageSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.driver.name(), self.path.display())
    }
}

/// Whether to open the image with O_DIRECT.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DirectIo {
    /// O_DIRECT where the file system takes it, buffered otherwise.
    #[default]
    Auto,
    /// O_DIRECT or fail to open.
    On,
    /// Page cache.
    Off,
}

impl FromStr for DirectIo {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DirectIo::Auto),
            "on" => Ok(DirectIo::On),
            "off" => Ok(DirectIo::Off),
            _ => Err(format!("direct IO mode '{s}' is not one of auto, on, off")),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parses_and_rejects() {
        let s: ImageSpec = "aio:/tmp/x.img".parse().unwrap();
        assert_eq!(s.driver, Driver::Aio);
        assert_eq!(s.to_string(), "aio:/tmp/x.img");
        assert!("/tmp/x.img"
            .parse::<ImageSpec>()
            .unwrap_err()
            .contains("no type"));
        assert!("vhd:/x"
            .parse::<ImageSpec>()
            .unwrap_err()
            .contains("unknown disk type"));
        assert!("aio:"
            .parse::<ImageSpec>()
            .unwrap_err()
            .contains("empty path"));
    }
}
