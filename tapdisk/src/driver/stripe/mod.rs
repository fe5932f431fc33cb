//! The `stripe:MAPFILE` driver: a virtual disk striped (and perhaps replicated) over iSCSI
//! servers, as the mapping file says (thesis chapters 5 and 6).
//!
//! The work is done by [`stripe::path`]: each ring's engine owns a [`Striper`] (one iSCSI
//! session per server, completions gathered on one epoll descriptor that the ring loop polls on
//! its io_uring, [`Engine::poll_fd`]). Opening a file-backed disk locks the mapping file
//! (a second opener is told which pid holds it); opening an etcd-backed one (a mapping file
//! of format version 2, the host's cache of the disk's record) takes the disk's writer lease
//! in etcd ([`stripe_etcd::EtcdControl`], on a runtime thread of its own, never on a ring
//! thread) and registers its fencing token as the reservation key on every LUN. Either way
//! every server is checked, and a replicated disk's write-intent regions are resynced.

use std::io;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use stripe::path::{Disk, Drive, Op, Options, Striper};
use tapdisk_control::{Driver, ImageSpec};

use super::engine::{BackendIo, Cqe, Done, Engine, IoOp, Uring};
use super::{Image, OpenOptionsImg};

/// A striped disk.
pub struct StripeImage {
    disk: Arc<Disk>,
    path: PathBuf,
    read_only: bool,
}

fn to_io(e: stripe::Error) -> io::Error {
    let kind = match &e {
        stripe::Error::InUse { .. } => io::ErrorKind::ResourceBusy,
        stripe::Error::Io { source, .. } => source.kind(),
        stripe::Error::BadMap { .. } => io::ErrorKind::InvalidData,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e.to_string())
}

impl StripeImage {
    /// Opens and locks the mapping file at `path` and checks its servers.
    pub fn open(path: &Path, opts: OpenOptionsImg, log: &slog::Logger) -> io::Result<StripeImage> {
        let o = Options {
            logger: log.new(slog::o!("map" => path.display().to_string())),
            drive: if opts.iscsi_inline {
                Drive::Inline
            } else {
                Drive::Thread
            },
            ..Options::default()
        };
        let map = stripe::StripeMap::read(path).map_err(to_io)?;
        let disk = match &map.store {
            stripe::map::Store::File => Disk::open(path, o).map_err(to_io)?,
            stripe::map::Store::Etcd { .. } => {
                let eo = stripe_etcd::control::Options {
                    takeover: opts.takeover,
                    owner: format!("tapdisk {}", path.display()),
                    ..Default::default()
                };
                let ctl = stripe_etcd::EtcdControl::open(path, &map, eo, o.logger.clone())
                    .map_err(|e| {
                        let kind = match e {
                            stripe_etcd::Error::InUse { .. } => io::ErrorKind::ResourceBusy,
                            _ => io::ErrorKind::Other,
                        };
                        io::Error::new(kind, e.to_string())
                    })?;
                Disk::open_with(Arc::new(ctl), o).map_err(to_io)?
            }
        };
        Ok(StripeImage {
            disk,
            path: path.to_path_buf(),
            read_only: opts.read_only,
        })
    }
}

impl Image for StripeImage {
    fn size(&self) -> u64 {
        self.disk.geometry.size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn supports_discard(&self) -> bool {
        self.disk.discard
    }
    fn engine(self: Arc<Self>, _ring: &mut Uring, tags: u32) -> io::Result<Box<dyn Engine>> {
        let s = Striper::new(self.disk.clone(), tags).map_err(to_io)?;
        Ok(Box::new(StripeEngine { s }))
    }
    fn spec(&self) -> ImageSpec {
        ImageSpec::new(Driver::Stripe, self.path.clone())
    }
    fn direct(&self) -> bool {
        // Nothing of the disk passes through this host's page cache.
        true
    }
    fn stats(&self) -> serde_json::Value {
        self.disk.stats()
    }
}

/// The engine of one ring over a striped disk.
pub struct StripeEngine {
    s: Striper,
}

impl Engine for StripeEngine {
    unsafe fn submit(
        &mut self,
        _ring: &mut Uring,
        io: BackendIo,
        done: &mut Done,
    ) -> io::Result<()> {
        let op = match io.op {
            IoOp::Read => Op::Read,
            IoOp::Write => Op::Write,
            IoOp::Flush => Op::Flush,
            IoOp::Discard { .. } => Op::Discard,
        };
        // SAFETY: `Engine::submit`'s contract (iovecs valid and untouched until the tag is
        // reported done) is `Striper::submit`'s.
        unsafe {
            self.s
                .submit(io.tag, op, io.offset, io.len, io.iov, io.iovcnt)
        };
        // Requests refused at once (bad ranges) are reported now.
        self.s.take_done(&mut |t, r| done.push(t, r));
        Ok(())
    }

    fn complete(&mut self, _ring: &mut Uring, _cqe: Cqe, _done: &mut Done) -> io::Result<()> {
        // Nothing of ours goes through the loop's io_uring but the poll.
        Ok(())
    }

    fn describe(&self) -> String {
        let g = self.s.disk().geometry;
        format!(
            "stripe ({} stripes of {} KiB, {} replicas)",
            g.stripes,
            g.stripe_size >> 10,
            g.replicas
        )
    }

    fn poll_fd(&self) -> Option<RawFd> {
        Some(self.s.poll_fd())
    }

    fn on_poll(&mut self, _ring: &mut Uring, done: &mut Done) -> io::Result<()> {
        self.s.poll();
        self.s.take_done(&mut |t, r| done.push(t, r));
        Ok(())
    }
}
