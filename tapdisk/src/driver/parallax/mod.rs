//! The `parallax:` driver: a volume of a Parallax image ([`parallax`]) as a tapdisk disk.
//!
//! `parallax:PATH` serves the image's first disk (`base`), `parallax:PATH@VOLUME` another disk
//! (a clone) or a snapshot; snapshots are served read-only, and so is anything opened with
//! `-R`. The image's metadata (V2P and P2M trees, allocators, volume table) is handled by the
//! `parallax` crate; this driver is a format of the translating engine
//! ([`crate::driver::translate`]): the library's mapping calls ([`mapper`]) translate each IO,
//! and the engine does the data IO with io_uring on the store file.
//!
//! # One image, several volumes, one lock
//!
//! A writable image is locked (`flock`) by the process that opened it, so every volume of it
//! that is served must be served by the same tapdisk: `tap-ctl open -p PID -a
//! parallax:vm.plx@snap` next to the running `parallax:vm.plx`. Within a process the volumes of
//! one image (found by device and inode) share one open [`parallax::Image`] behind one mutex.
//! Every mapping call, flush (commit), discard and synchronous NBD IO takes that mutex; a
//! mapping call holds it for a few hundred nanoseconds when the metadata it needs is cached,
//! and the data IO runs outside it. Opening a snapshot first opens the image read-only (a
//! shared lock: `parallax-img list` and `check` still work, and other tapdisks can serve other
//! snapshots); a disk of an image already open read-only in this process cannot then be opened
//! writable, and the error says so.
//!
//! The image is committed when the last volume of it closes, as well as at every flush.
//!
//! # Counters
//!
//! [`Format::stats`] gives the metadata cache's counters (lookups and misses of V2P and P2M
//! nodes, evictions, writebacks), read without taking the mutex; `tap-ctl stats` shows them
//! under `driver`.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use parallax::{DiskSpec, FileBacking, StatsHandle, VolumeId, VolumeKind};

pub mod mapper;

use std::convert::Infallible;

use tapdisk_control::ImageSpec;

use self::mapper::ParallaxMapper;
use super::aio::AioImage;
use super::translate::{Disk, Format};
use super::OpenOptionsImg;

/// The errno a Parallax error is reported with.
pub fn errno(e: &parallax::Error) -> i32 {
    use parallax::Error as E;
    match e {
        E::ReadOnly(_) => libc::EROFS,
        E::NoSpace(_) => libc::ENOSPC,
        E::Invalid(_) => libc::EINVAL,
        E::NoSuchVolume(_) => libc::ENOENT,
        E::Locked(_) => libc::EBUSY,
        E::NoMemory(_) => libc::ENOMEM,
        E::Io { err, .. } => err.raw_os_error().unwrap_or(libc::EIO),
        _ => libc::EIO,
    }
}

/// A Parallax error as an `io::Error` with the same message (a read-only refusal is
/// `PermissionDenied`, as [`BlockTarget`] promises).
pub fn to_io(e: parallax::Error) -> io::Error {
    let kind = match &e {
        parallax::Error::ReadOnly(_) => io::ErrorKind::PermissionDenied,
        parallax::Error::Io { err, .. } => err.kind(),
        other => io::Error::from_raw_os_error(errno(other)).kind(),
    };
    io::Error::new(kind, e.to_string())
}

/// One open image, shared by the volumes of it this process serves.
struct Shared {
    /// Device and inode of the image file.
    key: (u64, u64),
    path: PathBuf,
    writable: bool,
    image: Mutex<parallax::Image<FileBacking>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The last volume closed: make what was written durable (a flush would have).
        let img = self.image.get_mut().unwrap_or_else(|e| e.into_inner());
        if self.writable && img.has_uncommitted_changes() {
            let _ = img.flush();
        }
    }
}

/// The images open in this process.
static OPEN: Mutex<Vec<Weak<Shared>>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn open_error(path: &Path, e: parallax::Error) -> io::Error {
    let shown = path.display();
    match e {
        parallax::Error::Locked(_) => io::Error::new(
            io::ErrorKind::WouldBlock,
            format!(
                "Parallax image {shown} is in use by another process (another tapdisk, or \
                 parallax-img); serve all volumes of one image from one tapdisk (tap-ctl open -p)"
            ),
        ),
        other => {
            let kind = to_io_kind(&other);
            io::Error::new(kind, format!("Parallax image {shown}: {other}"))
        }
    }
}

/// Volume `name` of the image at `path`; if there is none, an error listing those there are.
fn find_volume<B: parallax::Backing>(
    img: &parallax::Image<B>,
    path: &Path,
    name: &str,
) -> io::Result<VolumeId> {
    img.volume(name).map_err(|e| match e {
        parallax::Error::NoSuchVolume(_) => {
            let names: Vec<&str> = img.volumes().iter().map(|v| v.name.as_str()).collect();
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "Parallax image {} has no volume named '{name}' (it has: {})",
                    path.display(),
                    names.join(", ")
                ),
            )
        }
        e => open_error(path, e),
    })
}

fn to_io_kind(e: &parallax::Error) -> io::ErrorKind {
    match e {
        parallax::Error::Io { err, .. } => err.kind(),
        parallax::Error::NotParallax(_)
        | parallax::Error::Corrupt(_)
        | parallax::Error::Unsupported(_) => io::ErrorKind::InvalidData,
        other => io::Error::from_raw_os_error(errno(other)).kind(),
    }
}

impl Shared {
    /// The open image at `path` for volume `volume`, opening it if this process has not yet.
    fn get(
        path: &Path,
        volume: &str,
        read_only: bool,
        slots: u32,
        log: &slog::Logger,
    ) -> io::Result<Arc<Shared>> {
        let meta = std::fs::metadata(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot open Parallax image {}: {e}", path.display()),
            )
        })?;
        let key = (meta.dev(), meta.ino());
        let mut open = lock(&OPEN);
        open.retain(|w| w.strong_count() > 0);
        if let Some(s) = open.iter().filter_map(Weak::upgrade).find(|s| s.key == key) {
            let kind = {
                let img = lock(&s.image);
                let v = find_volume(&img, path, volume)?;
                img.volume_info(v).map_err(|e| open_error(path, e))?.kind
            };
            if kind == VolumeKind::Disk && !read_only && !s.writable {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                        "Parallax image {} is open read-only in this tapdisk (for a snapshot \
                         or a read-only disk), so its disk '{volume}' cannot be served \
                         writable: close those first, or open it read-only (-R)",
                        path.display()
                    ),
                ));
            }
            return Ok(s);
        }
        let cache_slots = if slots == 0 {
            parallax::DEFAULT_SLOTS
        } else {
            slots as usize
        };
        let ro = parallax::OpenOptions {
            cache_slots,
            read_only: true,
        };
        let mut img = parallax::disk::open_image(path, &ro).map_err(|e| open_error(path, e))?;
        let v = find_volume(&img, path, volume)?;
        let kind = img.volume_info(v).map_err(|e| open_error(path, e))?.kind;
        let writable = !read_only && kind == VolumeKind::Disk;
        if writable {
            drop(img);
            let rw = parallax::OpenOptions {
                cache_slots,
                read_only: false,
            };
            img = parallax::disk::open_image(path, &rw).map_err(|e| open_error(path, e))?;
        }
        if let Some(damage) = img.superblock_damage() {
            slog::warn!(log, "Parallax image has a damaged superblock copy (run parallax-img check)";
                        "image" => %path.display(), "damage" => damage,
                        "generation" => img.superblock().generation);
        }
        let s = Arc::new(Shared {
            key,
            path: path.to_owned(),
            writable,
            image: Mutex::new(img),
        });
        open.push(Arc::downgrade(&s));
        Ok(s)
    }
}

/// A volume of a Parallax image, served by a VBD.
pub struct ParallaxImage {
    shared: Arc<Shared>,
    vol: VolumeId,
    volume: String,
    /// Its one file is the store, as a raw image: the data IO goes there.
    disk: Disk,
    stats: StatsHandle,
}

impl std::fmt::Debug for ParallaxImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParallaxImage")
            .field("path", &self.shared.path)
            .field("volume", &self.volume)
            .field("read_only", &self.disk.read_only)
            .finish_non_exhaustive()
    }
}

impl ParallaxImage {
    /// Opens the volume `spec` names (`parallax:PATH` or `parallax:PATH@VOLUME`).
    pub fn open(
        spec: &ImageSpec,
        opts: OpenOptionsImg,
        log: &slog::Logger,
    ) -> io::Result<ParallaxImage> {
        let ds = DiskSpec {
            path: spec.path.clone(),
            volume: spec.volume.clone(),
        };
        let volume = ds.volume_name().to_string();
        parallax::format::check_name(&volume).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("disk spec '{spec}': {e}"),
            )
        })?;
        let shared = Shared::get(&ds.path, &volume, opts.read_only, opts.cache_slots, log)?;
        let (vol, kind, size, stats) = {
            let mut img = lock(&shared.image);
            let vol = find_volume(&img, &ds.path, &volume)?;
            // The root is on every IO's path: read it now, not on the guest's first IO.
            img.warm(vol).map_err(|e| open_error(&ds.path, e))?;
            let kind = img
                .volume_info(vol)
                .map_err(|e| open_error(&ds.path, e))?
                .kind;
            (vol, kind, img.size(), img.stats_handle())
        };
        let read_only = opts.read_only || !shared.writable || kind == VolumeKind::Snapshot;
        let store = AioImage::open(&ds.path, OpenOptionsImg { read_only, ..opts })?;
        Ok(ParallaxImage {
            shared,
            vol,
            volume,
            disk: Disk {
                files: vec![Arc::new(store)],
                size,
                read_only,
                spec: spec.clone(),
            },
            stats,
        })
    }
}

impl Format for ParallaxImage {
    type Ticket = Infallible;
    type Inline = Infallible;
    type Mapper<'a> = ParallaxMapper<'a>;

    fn lock(&self) -> ParallaxMapper<'_> {
        ParallaxMapper {
            img: lock(&self.shared.image),
            vol: self.vol,
        }
    }
    fn disk(&self) -> &Disk {
        &self.disk
    }
    fn name(&self) -> &'static str {
        "parallax"
    }
    fn stats(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "type": "parallax",
            "image": self.shared.path.display().to_string(),
            "volume": self.volume,
            "read_only": self.disk.read_only,
            "cache": self.stats.snapshot(),
        });
        // Without waiting: stats must not stall behind a commit.
        if let Ok(img) = self.shared.image.try_lock() {
            v["generation"] = img.superblock().generation.into();
            v["uncommitted_changes"] = img.has_uncommitted_changes().into();
            v["stopped"] = img.stopped().into();
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::engine::testing::{run, Step};
    use crate::driver::engine::Uring;
    use crate::driver::open_image;
    use tapdisk_control::Driver;

    fn make(dir: &Path, size: u64) -> PathBuf {
        let p = dir.join("vm.plx");
        let mut d =
            parallax::Disk::create(&p, &parallax::CreateOptions::new(size)).expect("create");
        d.write_at(0, &[0x11u8; 8192]).unwrap();
        let base = d.volume_id();
        d.image_mut().snapshot(base, "snap").unwrap();
        d.flush().unwrap();
        p
    }

    fn spec(s: &str) -> ImageSpec {
        s.parse().unwrap()
    }

    fn open_err(s: &str, opts: OpenOptionsImg) -> io::Error {
        match open_image(&spec(s), opts) {
            Ok(_) => panic!("{s} opened"),
            Err(e) => e,
        }
    }

    #[test]
    fn volumes_of_one_image_share_it_in_one_process() {
        let dir = tempfile::tempdir().unwrap();
        let p = make(dir.path(), 1 << 20);
        let live = open_image(
            &spec(&format!("parallax:{}", p.display())),
            OpenOptionsImg::default(),
        )
        .unwrap();
        assert_eq!(live.spec().driver, Driver::Parallax);
        assert!(!live.read_only());
        let snap = open_image(
            &spec(&format!("parallax:{}@snap", p.display())),
            OpenOptionsImg::default(),
        )
        .unwrap();
        assert!(snap.read_only());
        let mut ring = Uring::new(16).unwrap();
        let mut le = live.clone().engine(&mut ring, 4).unwrap();
        let mut se = snap.clone().engine(&mut ring, 4).unwrap();
        assert_eq!(run(&mut *le, &mut ring, Step::write(0, &[0x22u8; 4096])), 0);
        let mut b = [0u8; 4096];
        assert_eq!(run(&mut *se, &mut ring, Step::read(0, &mut b)), 0);
        assert_eq!(b, [0x11u8; 4096]);
        assert_eq!(run(&mut *le, &mut ring, Step::read(0, &mut b)), 0);
        assert_eq!(b, [0x22u8; 4096]);
        // Discard reads back as zeroes, whole sectors included.
        let discard = crate::driver::IoOp::Discard { secure: false };
        assert_eq!(run(&mut *le, &mut ring, Step::op(discard, 512, 7680)), 0);
        let mut b = [1u8; 8192];
        assert_eq!(run(&mut *le, &mut ring, Step::read(0, &mut b)), 0);
        assert!(b[..512].iter().all(|&x| x == 0x22));
        assert!(b[512..8192].iter().all(|&x| x == 0));
        assert_eq!(
            run(
                &mut *le,
                &mut ring,
                Step::op(crate::driver::IoOp::Flush, 0, 0)
            ),
            0
        );
        drop((le, se));
        let st = live.stats();
        assert_eq!(st["type"], "parallax");
        assert!(st["cache"]["v2p"]["lookups"].as_u64().unwrap() > 0);
        // Closing the last volume commits.
        drop(live);
        drop(snap);
        let b = parallax::disk::open_backing(&p, true).unwrap();
        let r = parallax::check(&b, None).unwrap();
        assert!(r.is_clean(), "{r:?}");
        drop(b);
        let ds: DiskSpec = p.to_str().unwrap().parse().unwrap();
        let mut d = parallax::Disk::open(&ds, Default::default()).unwrap();
        let mut b = [0u8; 4096];
        d.read_at(0, &mut b).unwrap();
        assert_eq!(b[..100], [0x22u8; 100]);
    }

    #[test]
    fn snapshot_first_then_disk_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let p = make(dir.path(), 1 << 20);
        let snap = open_image(
            &spec(&format!("parallax:{}@snap", p.display())),
            OpenOptionsImg::default(),
        )
        .unwrap();
        let e = open_err(
            &format!("parallax:{}", p.display()),
            OpenOptionsImg::default(),
        );
        assert!(
            e.to_string().contains("open read-only in this tapdisk"),
            "{e}"
        );
        // Read-only is fine.
        let ro = open_image(
            &spec(&format!("parallax:{}", p.display())),
            OpenOptionsImg {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(ro.read_only());
        drop(snap);
        drop(ro);
        let e = open_err(
            &format!("parallax:{}@nope", p.display()),
            OpenOptionsImg::default(),
        );
        assert!(
            e.to_string()
                .ends_with("has no volume named 'nope' (it has: base, snap)"),
            "{e}"
        );
        let e = open_err(
            &format!("parallax:{}@bad name", p.display()),
            OpenOptionsImg::default(),
        );
        assert!(e.to_string().contains("volume name 'bad name'"), "{e}");
        let junk = dir.path().join("junk");
        std::fs::write(&junk, vec![7u8; 16384]).unwrap();
        let e = open_err(
            &format!("parallax:{}", junk.display()),
            OpenOptionsImg::default(),
        );
        assert!(e.to_string().contains("not a Parallax image"), "{e}");
    }
}
