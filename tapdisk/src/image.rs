//! Image drivers: what a VBD reads and writes.
//!
//! A driver is an [`Image`]: the synchronous methods of [`BlockTarget`] serve the NBD export and
//! tools (one thread per connection is plenty there), and [`Image::engine`] builds, for each
//! ring, the [`Engine`] its event loop drives (io_uring straight into the frontend's pages).
//! [`open_image`] opens a disk spec with the driver it names.
//!
//! `aio:PATH` is a raw file or block device (blktap's name for it). `parallax:PATH` and
//! `parallax:PATH@VOLUME` are volumes of a Parallax image ([`crate::parallax`]).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tapdisk_control::{DirectIo, Driver, ImageSpec};

use crate::engine::{Engine, Uring};

/// Bytes in a blkif sector (always 512, whatever the image's own block size).
pub const SECTOR: u64 = 512;

/// Synchronous access to a disk, shared between threads.
///
/// Offsets and lengths are in bytes. Implementations check ranges against [`BlockTarget::size`]
/// and refuse writes on a read-only disk with `PermissionDenied`.
pub trait BlockTarget: Send + Sync {
    /// Size of the disk in bytes (a multiple of 512).
    fn size(&self) -> u64;
    /// Whether writes, discards and write-zeroes are refused.
    fn read_only(&self) -> bool;
    /// Whether [`BlockTarget::discard`] can free space.
    fn supports_discard(&self) -> bool;
    /// Fills `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `buf` at `offset`; with `fua` it is durable before this returns.
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()>;
    /// Makes every write that has returned durable.
    fn flush(&self) -> io::Result<()>;
    /// Frees `len` bytes at `offset` (reads of them return zeroes afterwards).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Writes `len` zero bytes at `offset`.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;
}

/// A disk image a VBD serves, whatever the driver.
pub trait Image: BlockTarget {
    /// An engine for one ring over this image, with `tags` concurrent IOs; `update` when it
    /// replaces another engine on the same ring (registered files are updated, not added).
    fn engine(
        self: Arc<Self>,
        ring: &mut Uring,
        tags: u32,
        update: bool,
    ) -> io::Result<Box<dyn Engine>>;
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
        Driver::Aio => Ok(Arc::new(AioImage::open(&spec.path, opts)?)),
        Driver::Stripe => Ok(Arc::new(crate::engine::stripe::StripeImage::open(
            &spec.path, opts, log,
        )?)),
        Driver::Parallax => Ok(Arc::new(crate::parallax::ParallaxImage::open(spec, opts)?)),
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

/// A raw file or block device.
#[derive(Debug)]
pub struct AioImage {
    path: PathBuf,
    buffered: File,
    direct: Option<File>,
    /// Alignment O_DIRECT needs for offsets, lengths and memory (bytes).
    dio_align: u32,
    size: u64,
    read_only: bool,
    block_device: bool,
}

impl AioImage {
    /// Opens `path`.
    pub fn open(path: &Path, opts: OpenOptionsImg) -> io::Result<AioImage> {
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        let buffered = oo.open(path).map_err(|e| annotate(e, path))?;
        let meta = buffered.metadata()?;
        let block_device = meta.file_type().is_block_device();
        if !block_device && !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is neither a regular file nor a block device",
                    path.display()
                ),
            ));
        }
        let size = if block_device {
            block_device_size(&buffered)?
        } else {
            meta.len()
        };
        let size = size - size % SECTOR;
        let direct = match opts.direct {
            DirectIo::Off => None,
            DirectIo::On => Some(oo.custom_flags(libc::O_DIRECT).open(path)?),
            DirectIo::Auto => oo.custom_flags(libc::O_DIRECT).open(path).ok(),
        };
        let dio_align = direct.as_ref().map(dio_alignment).unwrap_or(512);
        Ok(AioImage {
            path: path.to_owned(),
            buffered,
            direct,
            dio_align,
            size,
            read_only: opts.read_only,
            block_device,
        })
    }

    /// The path opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The O_DIRECT descriptor, if the image has one, and the alignment it needs.
    pub fn direct_fd(&self) -> Option<(RawFd, u32)> {
        self.direct
            .as_ref()
            .map(|f| (f.as_raw_fd(), self.dio_align))
    }

    /// The buffered descriptor (always present).
    pub fn buffered_fd(&self) -> RawFd {
        self.buffered.as_raw_fd()
    }

    /// Whether this is a block device (discard is BLKDISCARD) rather than a file (hole punch).
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    fn check(&self, offset: u64, len: u64, write: bool) -> io::Result<()> {
        if write && self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the disk is read-only",
            ));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "range {offset}+{len} is outside the disk ({} bytes)",
                    self.size
                ),
            )),
        }
    }
}

fn annotate(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("cannot open image {}: {e}", path.display()),
    )
}

fn block_device_size(f: &File) -> io::Result<u64> {
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
    let mut size = 0u64;
    // SAFETY: `f` is an open block device and `size` is a valid, writable u64 that outlives the call.
    unsafe { blkgetsize64(f.as_raw_fd(), &mut size) }.map_err(io::Error::from)?;
    Ok(size)
}

/// The offset/memory alignment O_DIRECT needs on this file (statx STATX_DIOALIGN), 512 if unknown.
fn dio_alignment(f: &File) -> u32 {
    // SAFETY: an all-zero `statx` is a valid value of this plain C struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open, the path is an empty C string used with AT_EMPTY_PATH, and `stx`
    // is a valid, writable statx buffer that outlives the call.
    let rc = unsafe {
        libc::statx(
            f.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align != 0 {
        stx.stx_dio_offset_align.max(stx.stx_dio_mem_align).max(512)
    } else {
        512
    }
}

/// Punches a hole (file) or discards (block device: BLKDISCARD, or BLKSECDISCARD if `secure`)
/// `len` bytes at `offset`.
pub fn discard_fd(
    fd: RawFd,
    block_device: bool,
    offset: u64,
    len: u64,
    secure: bool,
) -> io::Result<()> {
    if block_device {
        nix::ioctl_write_ptr_bad!(blkdiscard, 0x1277, [u64; 2]);
        nix::ioctl_write_ptr_bad!(blksecdiscard, 0x127d, [u64; 2]);
        let range = [offset, len];
        if secure {
            // SAFETY: `fd` is an open block device; `range` is a valid [u64; 2] for the call.
            unsafe { blksecdiscard(fd, &range) }.map_err(io::Error::from)?;
        } else {
            // SAFETY: as above.
            unsafe { blkdiscard(fd, &range) }.map_err(io::Error::from)?;
        }
        Ok(())
    } else {
        let (off, l) = (to_off(offset)?, to_off(len)?);
        // SAFETY: plain syscall on an open fd with integer arguments.
        let rc = unsafe {
            libc::fallocate(
                fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

fn to_off(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))
}

impl Image for AioImage {
    fn engine(
        self: Arc<Self>,
        ring: &mut Uring,
        tags: u32,
        update: bool,
    ) -> io::Result<Box<dyn Engine>> {
        Ok(Box::new(crate::engine::aio::AioEngine::new(
            ring, self, tags, update,
        )?))
    }
    fn spec(&self) -> ImageSpec {
        ImageSpec::new(Driver::Aio, self.path.clone())
    }
    fn direct(&self) -> bool {
        self.direct.is_some()
    }
}

impl BlockTarget for AioImage {
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
        self.check(offset, buf.len() as u64, false)?;
        self.buffered.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.check(offset, buf.len() as u64, true)?;
        self.buffered.write_all_at(buf, offset)?;
        if fua {
            self.buffered.sync_data()?;
        }
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.buffered.sync_data()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len, true)?;
        discard_fd(
            self.buffered.as_raw_fd(),
            self.block_device,
            offset,
            len,
            false,
        )
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len, true)?;
        if !self.block_device {
            let (off, l) = (to_off(offset)?, to_off(len)?);
            // SAFETY: plain syscall on an open fd with integer arguments.
            let rc = unsafe {
                libc::fallocate(
                    self.buffered.as_raw_fd(),
                    libc::FALLOC_FL_ZERO_RANGE,
                    off,
                    l,
                )
            };
            if rc == 0 {
                return Ok(());
            }
        }
        let zeroes = vec![0u8; 1 << 20];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            self.buffered.write_all_at(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aio_roundtrip_and_bounds() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        let img = AioImage::open(f.path(), OpenOptionsImg::default()).unwrap();
        assert_eq!(img.size(), 1 << 20);
        img.write_at(&[7u8; 4096], 8192, true).unwrap();
        let mut b = [0u8; 4096];
        img.read_at(&mut b, 8192).unwrap();
        assert_eq!(b, [7u8; 4096]);
        assert!(img.read_at(&mut b, (1 << 20) - 512).is_err());
        assert!(img.write_at(&b, u64::MAX - 10, false).is_err());
        img.discard(8192, 4096).unwrap();
        img.read_at(&mut b, 8192).unwrap();
        assert_eq!(b, [0u8; 4096]);
        let ro = AioImage::open(
            f.path(),
            OpenOptionsImg {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            ro.write_at(&b, 0, false).unwrap_err().kind(),
            io::ErrorKind::PermissionDenied
        );
    }
}
