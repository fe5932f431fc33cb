//! The `aio:` driver: a raw image file or block device (blktap's name for it).
//!
//! The image is opened twice when O_DIRECT is possible: an O_DIRECT descriptor for IO whose
//! offsets, lengths and memory meet the file's alignment, and a buffered one for the rest
//! ([`engine`]: one io_uring `readv`/`writev` per IO on registered files). With the default
//! `--direct auto`, reads that continue a sequential stream take the buffered one too
//! (`stream.rs`): the page cache reads ahead of them.

pub mod engine;
mod stream;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::engine::{Engine, Uring};
use super::{DirectIo, Driver, Image, ImageSpec, OpenOptionsImg, SECTOR};
use crate::sys::file::{block_device_size, dio_alignment, memory_backed};

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
    /// tmpfs or ramfs: IO never waits for a device.
    memory_backed: bool,
    /// Sequential read streams go through the page cache (`--direct auto` on a file system
    /// that takes O_DIRECT, not in memory).
    cache_streams: bool,
    /// Reads of sequential streams sent through the page cache, by every ring (`tap-ctl stats`).
    stream_reads: AtomicU64,
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
        let memory_backed = memory_backed(&buffered);
        let cache_streams = opts.direct == DirectIo::Auto && direct.is_some() && !memory_backed;
        Ok(AioImage {
            path: path.to_owned(),
            buffered,
            direct,
            dio_align,
            size,
            read_only: opts.read_only,
            block_device,
            memory_backed,
            cache_streams,
            stream_reads: AtomicU64::new(0),
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

    /// Whether the image lives in memory (tmpfs, ramfs).
    pub fn memory_backed(&self) -> bool {
        self.memory_backed
    }

    /// Whether reads that continue a sequential stream go through the page cache.
    pub fn cache_streams(&self) -> bool {
        self.cache_streams
    }

    /// Counts a read of a sequential stream sent through the page cache.
    pub fn count_stream_read(&self) {
        self.stream_reads.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether this is a block device (discard is BLKDISCARD) rather than a file (hole punch).
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }
}

impl Image for AioImage {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn supports_discard(&self) -> bool {
        true
    }
    fn engine(self: Arc<Self>, ring: &mut Uring, tags: u32) -> io::Result<Box<dyn Engine>> {
        Ok(Box::new(engine::AioEngine::new(ring, self, tags)?))
    }
    fn spec(&self) -> ImageSpec {
        ImageSpec::new(Driver::Aio, self.path.clone())
    }
    fn direct(&self) -> bool {
        self.direct.is_some()
    }
    fn stats(&self) -> serde_json::Value {
        serde_json::json!({
            "type": "aio",
            "image": self.path.display().to_string(),
            "direct": self.direct.is_some(),
            "cache_streams": self.cache_streams,
            // A counter read on its own: no other memory depends on it.
            "stream_reads": self.stream_reads.load(Ordering::Relaxed),
        })
    }
}

fn annotate(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("cannot open image {}: {e}", path.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::engine::testing::{run, Step};
    use crate::driver::IoOp;

    #[test]
    fn io_through_the_engine_round_trips() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        let img = Arc::new(AioImage::open(f.path(), OpenOptionsImg::default()).unwrap());
        assert_eq!(img.size(), 1 << 20);
        let mut ring = Uring::new(8).unwrap();
        let mut e = img.clone().engine(&mut ring, 4).unwrap();
        let data = vec![7u8; 8192];
        assert_eq!(run(&mut *e, &mut ring, Step::write(8192, &data)), 0);
        assert_eq!(run(&mut *e, &mut ring, Step::op(IoOp::Flush, 0, 0)), 0);
        let mut back = vec![0u8; 8192];
        assert_eq!(run(&mut *e, &mut ring, Step::read(8192, &mut back)), 0);
        assert_eq!(back, data);
        let discard = IoOp::Discard { secure: false };
        assert_eq!(run(&mut *e, &mut ring, Step::op(discard, 8192, 4096)), 0);
        assert_eq!(run(&mut *e, &mut ring, Step::read(8192, &mut back)), 0);
        assert!(back[..4096].iter().all(|&b| b == 0));
        assert!(back[4096..].iter().all(|&b| b == 7));
        let ro = AioImage::open(
            f.path(),
            OpenOptionsImg {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(ro.read_only());
    }
}
