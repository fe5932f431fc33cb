//! The VBD's NBD export: each connection that reaches transmission attaches a ring of its own
//! to the VBD (a local-transport ring over a socket pair inside the process) and drives it
//! with [`RingDisk`]. The connection's thread and its ring's stay on one CPU.

use std::io;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::nbd::ring_disk::RingDisk;
use crate::nbd::{Disk, Export, ExportInfo};
use crate::sys::cpu::Colocation;

use super::rings::{RingKind, Rings};

/// What a VBD exports over NBD.
pub struct VbdExport {
    rings: Arc<Rings>,
    info: ExportInfo,
    next: AtomicU64,
}

impl VbdExport {
    /// The export of the disk `rings` serve, called `name`.
    pub fn new(rings: Arc<Rings>, name: &str) -> VbdExport {
        let d = rings.disk();
        let size = d.sectors * d.sector_size as u64;
        VbdExport {
            info: ExportInfo::new(name, size, d.read_only, d.discard),
            rings,
            next: AtomicU64::new(0),
        }
    }
}

#[cfg(test)]
impl VbdExport {
    /// The export of a VBD over `image` with default settings (NBD tests).
    pub fn for_image(
        image: Arc<dyn crate::driver::Image>,
        name: &str,
        log: slog::Logger,
    ) -> Arc<dyn Export> {
        let disk = blkif::request::DiskInfo {
            sectors: image.size() / crate::driver::SECTOR,
            sector_size: crate::driver::SECTOR as u32,
            read_only: image.read_only(),
            flush: true,
            barrier: true,
            discard: !image.read_only() && image.supports_discard(),
            max_segments: blkif::protocol::MAX_SEGMENTS_PER_REQUEST as u8,
            max_indirect_segments: 256,
        };
        let shared = Arc::new(crate::ring::VbdShared::new(image, None));
        let rings = Rings::new(
            crate::ring::RingConfig::default(),
            disk,
            blkif::local::AttachLimits::default(),
            0,
            shared,
            log,
        );
        Arc::new(VbdExport::new(Arc::new(rings), name))
    }
}

impl Export for VbdExport {
    fn info(&self) -> ExportInfo {
        self.info.clone()
    }

    /// Runs on the connection's thread: it and the ring's thread hand each batch to each
    /// other, so both stay on the CPU the connection runs on now ([`Colocation`]).
    fn connect(&self) -> io::Result<Box<dyn Disk>> {
        let (front, back) = UnixStream::pair()?;
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let near = Colocation::here().filter(|c| c.join());
        self.rings
            .attach_local(RingKind::Nbd, &format!("nbd{n}"), back, near)?;
        Ok(Box::new(RingDisk::attach(front)?))
    }
}
