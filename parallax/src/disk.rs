//! [`Disk`]: one volume of an image, as a block driver uses it.
//!
//! Opened from a spec `PATH` (the image's first disk, [`DEFAULT_VOLUME`]) or `PATH@VOLUME`.
//! Snapshots open read-only. The image file is locked: a writer excludes everyone else,
//! readers share.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::backing::{Backing, FileBacking};
use crate::cache::{CacheStats, StatsHandle, DEFAULT_SLOTS};
use crate::error::{Error, Result};
use crate::format::VolumeKind;
use crate::image::{CreateOptions, Image, OpenOptions, VolumeId, DEFAULT_VOLUME};
use crate::report::Extent;

/// `PATH` or `PATH@VOLUME`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    /// The image file.
    pub path: PathBuf,
    /// The volume (`None`: [`DEFAULT_VOLUME`]).
    pub volume: Option<String>,
}

impl DiskSpec {
    /// The volume name this spec opens.
    pub fn volume_name(&self) -> &str {
        self.volume.as_deref().unwrap_or(DEFAULT_VOLUME)
    }
}

impl FromStr for DiskSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if s.is_empty() {
            return Err(Error::Invalid("empty image path".into()));
        }
        // The volume is after the last '@', unless that part looks like a path.
        if let Some((path, vol)) = s.rsplit_once('@') {
            if !vol.contains('/') {
                if path.is_empty() {
                    return Err(Error::Invalid(format!(
                        "'{s}' has no image path before '@'"
                    )));
                }
                crate::format::check_name(vol)?;
                return Ok(DiskSpec {
                    path: PathBuf::from(path),
                    volume: Some(vol.to_string()),
                });
            }
        }
        Ok(DiskSpec {
            path: PathBuf::from(s),
            volume: None,
        })
    }
}

impl fmt::Display for DiskSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.volume {
            Some(v) => write!(f, "{}@{v}", self.path.display()),
            None => write!(f, "{}", self.path.display()),
        }
    }
}

/// How to open a [`Disk`].
#[derive(Clone, Copy, Debug)]
pub struct DiskOptions {
    /// Metadata cache slots.
    pub cache_slots: usize,
    /// Open read-only even if the volume is writable.
    pub read_only: bool,
}

impl Default for DiskOptions {
    fn default() -> Self {
        DiskOptions {
            cache_slots: DEFAULT_SLOTS,
            read_only: false,
        }
    }
}

/// Opens the store of an image file, turning lock and not-found failures into clear errors.
///
/// Errors do not repeat the path: callers say which image they were opening.
pub fn open_backing(path: &Path, read_only: bool) -> Result<FileBacking> {
    FileBacking::open(path, read_only)
}

/// Opens the image in file `path`.
pub fn open_image(path: &Path, opts: &OpenOptions) -> Result<Image<FileBacking>> {
    let b = open_backing(path, opts.read_only)?;
    let mut img = Image::open(b, opts)?;
    img.set_label(path.display().to_string());
    Ok(img)
}

/// One volume of an image.
pub struct Disk<B: Backing = FileBacking> {
    image: Image<B>,
    vol: VolumeId,
    read_only: bool,
    name: String,
}

impl Disk<FileBacking> {
    /// Opens `spec`. A snapshot, or any volume with `opts.read_only`, opens read-only and
    /// shares the image with other readers; a writable volume takes the image for itself.
    pub fn open(spec: &DiskSpec, opts: DiskOptions) -> Result<Disk> {
        let ro = OpenOptions {
            cache_slots: opts.cache_slots,
            read_only: true,
        };
        let img = open_image(&spec.path, &ro)?;
        let vol = img.volume(spec.volume_name())?;
        let kind = img.volume_info(vol)?.kind;
        if opts.read_only || kind == VolumeKind::Snapshot {
            return Disk::from_image(img, spec.volume_name(), true);
        }
        drop(img);
        let rw = OpenOptions {
            cache_slots: opts.cache_slots,
            read_only: false,
        };
        let img = open_image(&spec.path, &rw)?;
        Disk::from_image(img, spec.volume_name(), false)
    }

    /// Creates a new image file at `path` (which must not exist) and opens its disk. If the
    /// image cannot be made, the file is removed again.
    pub fn create(path: &Path, opts: &CreateOptions) -> Result<Disk> {
        let b = FileBacking::create(path)?;
        let mut img = match Image::create(b, opts) {
            Ok(img) => img,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
        };
        img.set_label(path.display().to_string());
        Disk::from_image(img, &opts.name, false)
    }

    /// The open image file: data IO at the offsets [`Disk::map_read`] and
    /// [`Disk::map_write`] return goes here.
    pub fn file(&self) -> &std::fs::File {
        self.image.backing().file()
    }
}

impl<B: Backing> Disk<B> {
    /// Volume `volume` of an open image.
    pub fn from_image(image: Image<B>, volume: &str, read_only: bool) -> Result<Disk<B>> {
        let vol = image.volume(volume)?;
        let kind = image.volume_info(vol)?.kind;
        Ok(Disk {
            read_only: read_only || image.read_only() || kind == VolumeKind::Snapshot,
            image,
            vol,
            name: volume.to_string(),
        })
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.image.size()
    }

    /// Data block size in bytes (writes aligned to it never need a fill).
    pub fn block_size(&self) -> u64 {
        self.image.block_size()
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The volume's name.
    pub fn volume_name(&self) -> &str {
        &self.name
    }

    /// The volume's id.
    pub fn volume_id(&self) -> VolumeId {
        self.vol
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly(format!(
                "{}@{}",
                self.image.label(),
                self.name
            )));
        }
        Ok(())
    }

    /// Where `len` bytes at `offset` are: see [`Image::map_read`].
    #[inline]
    pub fn map_read(&mut self, offset: u64, len: u64) -> Result<Extent> {
        self.image.map_read(self.vol, offset, len)
    }

    /// Where to write `len` bytes at `offset`: see [`Image::map_write`].
    #[inline]
    pub fn map_write(&mut self, offset: u64, len: u64) -> Result<Extent> {
        self.check_writable()?;
        self.image.map_write(self.vol, offset, len)
    }

    /// Frees the whole blocks in the range: see [`Image::discard`].
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<u64> {
        self.check_writable()?;
        self.image.discard(self.vol, offset, len)
    }

    /// Makes `len` bytes at `offset` read as zeroes: see [`Image::write_zeroes`].
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.image.write_zeroes(self.vol, offset, len)
    }

    /// Commits: see [`Image::flush`].
    pub fn flush(&mut self) -> Result<()> {
        self.image.flush()
    }

    /// Reads synchronously through the store.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.image.read_at(self.vol, offset, buf)
    }

    /// Writes synchronously through the store (durable after [`Disk::flush`]).
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        self.check_writable()?;
        self.image.write_at(self.vol, offset, buf)
    }

    /// Metadata cache counters.
    pub fn stats(&self) -> CacheStats {
        self.image.stats()
    }

    /// A handle another thread reads the cache counters through, without locking.
    pub fn stats_handle(&self) -> StatsHandle {
        self.image.stats_handle()
    }

    /// The image.
    pub fn image(&self) -> &Image<B> {
        &self.image
    }

    /// The image, to change (snapshots, other volumes).
    pub fn image_mut(&mut self) -> &mut Image<B> {
        &mut self.image
    }

    /// The image, giving up the disk.
    pub fn into_image(self) -> Image<B> {
        self.image
    }
}

impl<B: Backing> fmt::Debug for Disk<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Disk")
            .field("image", &self.image.label())
            .field("volume", &self.name)
            .field("read_only", &self.read_only)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_move_between_threads() {
        fn send<T: Send>() {}
        send::<Disk<FileBacking>>();
        send::<Image<crate::MemBacking>>();
    }

    #[test]
    fn write_zeroes_discards_whole_blocks_and_zeroes_the_ends() {
        let img = Image::create(crate::MemBacking::new(), &CreateOptions::new(1 << 20)).unwrap();
        let mut d = Disk::from_image(img, "base", false).unwrap();
        d.write_at(0, &[7u8; 65536]).unwrap();
        d.write_zeroes(100, 20000).unwrap();
        let mut b = vec![0u8; 65536];
        d.read_at(0, &mut b).unwrap();
        assert!(b[..100].iter().all(|&x| x == 7));
        assert!(b[100..20100].iter().all(|&x| x == 0));
        assert!(b[20100..].iter().all(|&x| x == 7));
        let v = d.volume_id();
        assert_eq!(d.image_mut().usage(v).unwrap().mapped_blocks, 16 - 3);
        assert!(d.write_zeroes(1 << 20, 1).is_err());
    }

    #[test]
    fn specs() {
        let s: DiskSpec = "/var/img.plx".parse().unwrap();
        assert_eq!(s.volume, None);
        assert_eq!(s.volume_name(), "base");
        let s: DiskSpec = "/var/img.plx@snap-1".parse().unwrap();
        assert_eq!(s.path, PathBuf::from("/var/img.plx"));
        assert_eq!(s.volume.as_deref(), Some("snap-1"));
        assert_eq!(s.to_string(), "/var/img.plx@snap-1");
        let s: DiskSpec = "/data/vm@1/disk.plx".parse().unwrap();
        assert_eq!(s.path, PathBuf::from("/data/vm@1/disk.plx"));
        assert!("@x".parse::<DiskSpec>().is_err());
        assert!("/a@".parse::<DiskSpec>().is_err());
        assert!("/a@b c".parse::<DiskSpec>().is_err());
        assert!("".parse::<DiskSpec>().is_err());
    }
}
