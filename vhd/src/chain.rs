//! Chains: a leaf image and the parents its reads fall through to.
//!
//! Parents are opened read-only and shared: a [`ParentSet`] (one per process, e.g. one per
//! tapdisk) hands out the same [`Parent`] for the same file (device and inode), so the VBDs
//! of one tapdisk whose chains meet share those images, their metadata caches and their file
//! descriptors. Each parent sits behind its own mutex; the leaf belongs to its chain.
//!
//! A child names its parent by locators (see [`crate::locator`]) and by the parent's uuid in
//! its header: opening checks that the file found has that uuid. A differencing disk whose
//! parent uuid is nil has a raw parent (blktap's `snapshot -m`): a plain file read as is.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::backing::{Backing, FileBacking};
use crate::cache::{CacheStats, StatsHandle, DEFAULT_SLOTS};
use crate::error::{Error, Result};
use crate::format::{DiskType, PlatformCode, SECTOR};
use crate::image::{Image, OpenOptions};
use crate::locator;
use crate::map::Mapping;

/// Chains longer than this are refused (xapi allows 30; blktap has no limit).
pub const DEFAULT_MAX_DEPTH: usize = 256;

/// How to open a chain.
#[derive(Clone, Debug)]
pub struct ChainOptions {
    /// Open the leaf read-only too.
    pub read_only: bool,
    /// Cache slots of the leaf.
    pub cache_slots: usize,
    /// Cache slots of each parent opened by this call (a shared parent keeps its own).
    pub parent_cache_slots: usize,
    /// Most images in the chain, leaf included.
    pub max_depth: usize,
}

impl Default for ChainOptions {
    fn default() -> Self {
        ChainOptions {
            read_only: false,
            cache_slots: DEFAULT_SLOTS,
            parent_cache_slots: DEFAULT_SLOTS,
            max_depth: DEFAULT_MAX_DEPTH,
        }
    }
}

/// What a parent is.
pub enum ParentImage {
    /// A VHD, read-only.
    Vhd(Box<Image>),
    /// A raw file (the parent of `snapshot -m`); its size rounded down to whole sectors.
    Raw {
        /// The file.
        backing: Box<dyn Backing>,
        /// Bytes readable.
        size: u64,
    },
}

/// A read-only image shared by the chains of one process.
pub struct Parent {
    image: Mutex<ParentImage>,
    path: PathBuf,
    size: u64,
    /// A descriptor for data IO that needs no lock (a dup of the image's).
    file: Option<File>,
    stats: Option<StatsHandle>,
}

impl std::fmt::Debug for Parent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parent").field("path", &self.path).finish()
    }
}

impl Parent {
    /// Wraps an opened image (memory images for tests and fuzzing; files go through
    /// [`ParentSet`]).
    pub fn new(image: ParentImage, path: PathBuf) -> Parent {
        let (size, stats, file) = match &image {
            ParentImage::Vhd(i) => (
                i.size(),
                Some(i.stats_handle()),
                i.backing().file().and_then(|f| f.try_clone().ok()),
            ),
            ParentImage::Raw { size, backing } => {
                (*size, None, backing.file().and_then(|f| f.try_clone().ok()))
            }
        };
        Parent {
            image: Mutex::new(image),
            path,
            size,
            file,
            stats,
        }
    }
    /// Locks the image (mapping, metadata reads).
    pub fn lock(&self) -> MutexGuard<'_, ParentImage> {
        self.image.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// The path it was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Virtual size.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Its file, for data IO at the offsets the chain's mapping returns.
    pub fn file(&self) -> Option<&File> {
        self.file.as_ref()
    }
    /// Its cache counters (VHD parents).
    pub fn stats(&self) -> Option<CacheStats> {
        self.stats.as_ref().map(|s| s.snapshot())
    }
    /// Reads `buf.len()` bytes of its file at `file_offset`.
    pub fn read_data(&self, buf: &mut [u8], file_offset: u64) -> Result<()> {
        let g = self.lock();
        let b: &dyn Backing = match &*g {
            ParentImage::Vhd(i) => i.backing(),
            ParentImage::Raw { backing, .. } => &**backing,
        };
        b.read_at(buf, file_offset)
            .map_err(|e| Error::io(format!("reading {}", self.path.display()), e))
    }
}

/// The parents opened by one process, shared between its chains by file identity.
#[derive(Default)]
pub struct ParentSet {
    open: Mutex<HashMap<(u64, u64), Weak<Parent>>>,
}

impl ParentSet {
    /// An empty set.
    pub fn new() -> ParentSet {
        ParentSet::default()
    }

    /// The parent at `path` (a VHD unless `raw`), shared if already open.
    pub fn get(&self, path: &Path, raw: bool, cache_slots: usize) -> Result<Arc<Parent>> {
        let meta = std::fs::metadata(path)
            .map_err(|e| Error::io(format!("opening parent {}", path.display()), e))?;
        let id = (meta.dev(), meta.ino());
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|_, w| w.strong_count() > 0);
        if let Some(p) = open.get(&id).and_then(Weak::upgrade) {
            return Ok(p);
        }
        let fb = FileBacking::open(path, true)
            .map_err(|e| Error::io(format!("opening parent {}", path.display()), e))?;
        let name = path.display().to_string();
        let image = if raw {
            let size = fb
                .size()
                .map_err(|e| Error::io(format!("size of {name}"), e))?
                / SECTOR
                * SECTOR;
            ParentImage::Raw {
                backing: Box::new(fb),
                size,
            }
        } else {
            let opts = OpenOptions {
                read_only: true,
                cache_slots,
            };
            ParentImage::Vhd(Box::new(Image::open(Box::new(fb), &name, &opts)?))
        };
        let p = Arc::new(Parent::new(image, path.to_path_buf()));
        open.insert(id, Arc::downgrade(&p));
        Ok(p)
    }

    /// Parents open now.
    pub fn len(&self) -> usize {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.values().filter(|w| w.strong_count() > 0).count()
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where a range of a chain is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainMapping {
    /// In the file of `level` (0: the leaf, 1: its parent, ...) at this byte offset.
    Data {
        /// Which image.
        level: usize,
        /// Byte offset in its file.
        file_offset: u64,
    },
    /// Reads as zeroes.
    Zero,
}

/// A prefix of a requested range with one [`ChainMapping`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainExtent {
    /// Bytes covered (a multiple of 512, at least 512).
    pub len: u64,
    /// Where.
    pub map: ChainMapping,
}

/// A leaf image and its parents.
pub struct Chain {
    pub(crate) leaf: Image,
    pub(crate) parents: Vec<Arc<Parent>>,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain")
            .field("leaf", &self.leaf)
            .field("parents", &self.parents)
            .finish()
    }
}

/// How a differencing disk's parent was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentRef {
    /// The resolved path.
    pub path: PathBuf,
    /// The locator text it came from.
    pub locator: String,
    /// A raw file rather than a VHD.
    pub raw: bool,
}

/// Finds the parent of a differencing image at `child_path` from its locators, in their
/// order, as blktap does; `resolve` false returns the first decodable locator's text without
/// looking for the file.
pub fn find_parent(img: &Image, child_path: &Path, resolve: bool) -> Result<ParentRef> {
    let fail = |reason: String| Error::Parent {
        child: child_path.display().to_string(),
        reason,
    };
    let Some(h) = img.header() else {
        return Err(fail("not a differencing disk".into()));
    };
    if img.disk_type() != DiskType::Differencing {
        return Err(fail("not a differencing disk".into()));
    }
    let raw = h.parent_uuid.is_nil();
    let mut tried = Vec::new();
    for l in h.locators.iter() {
        if !matches!(
            l.code,
            PlatformCode::MacX | PlatformCode::W2ku | PlatformCode::W2ru
        ) {
            continue;
        }
        let mut data = vec![0u8; l.data_len as usize];
        if img.backing().read_at(&mut data, l.data_offset).is_err() {
            continue;
        }
        let Some(name) = locator::decode(l.code, &data) else {
            continue;
        };
        if !resolve {
            return Ok(ParentRef {
                path: PathBuf::from(&name),
                locator: name,
                raw,
            });
        }
        if let Some(p) = locator::resolve(child_path, &name) {
            return Ok(ParentRef {
                path: p,
                locator: name,
                raw,
            });
        }
        tried.push(name);
    }
    Err(fail(if tried.is_empty() {
        "no readable parent locator".into()
    } else {
        format!("none of {tried:?} exists")
    }))
}

impl Chain {
    /// Opens the image at `path` and, for a differencing disk, its parents through `set`.
    pub fn open(path: &Path, opts: &ChainOptions, set: &ParentSet) -> Result<Chain> {
        let fb = FileBacking::open(path, opts.read_only)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let name = path.display().to_string();
        let leaf = Image::open(
            Box::new(fb),
            &name,
            &OpenOptions {
                read_only: opts.read_only,
                cache_slots: opts.cache_slots,
            },
        )?;
        let mut parents: Vec<Arc<Parent>> = Vec::new();
        let mut seen = HashSet::new();
        if let Ok(m) = std::fs::metadata(path) {
            seen.insert((m.dev(), m.ino()));
        }
        let mut child_path = path.to_path_buf();
        let mut next = if leaf.disk_type() == DiskType::Differencing {
            Some((
                find_parent(&leaf, &child_path, true)?,
                leaf.header().map(|h| h.parent_uuid),
            ))
        } else {
            None
        };
        while let Some((pref, want_uuid)) = next.take() {
            if parents.len() + 1 >= opts.max_depth {
                return Err(Error::Parent {
                    child: name.clone(),
                    reason: format!("chain deeper than {} images", opts.max_depth),
                });
            }
            let m = std::fs::metadata(&pref.path)
                .map_err(|e| Error::io(format!("opening parent {}", pref.path.display()), e))?;
            if !seen.insert((m.dev(), m.ino())) {
                return Err(Error::Parent {
                    child: child_path.display().to_string(),
                    reason: format!("{} is already in the chain (a loop)", pref.path.display()),
                });
            }
            let p = set.get(&pref.path, pref.raw, opts.parent_cache_slots)?;
            {
                let g = p.lock();
                if let ParentImage::Vhd(pi) = &*g {
                    if let Some(u) = want_uuid {
                        if pi.footer().uuid != u {
                            return Err(Error::Parent {
                                child: child_path.display().to_string(),
                                reason: format!(
                                    "{} has uuid {}, the child's header names {}",
                                    pref.path.display(),
                                    pi.footer().uuid,
                                    u
                                ),
                            });
                        }
                    }
                    if pi.disk_type() == DiskType::Differencing {
                        next = Some((
                            find_parent(pi, &pref.path, true)?,
                            pi.header().map(|h| h.parent_uuid),
                        ));
                    }
                }
            }
            child_path = pref.path.clone();
            parents.push(p);
        }
        Ok(Chain { leaf, parents })
    }

    /// A chain of already opened images (memory images for tests and fuzzing).
    pub fn from_parts(leaf: Image, parents: Vec<Arc<Parent>>) -> Chain {
        Chain { leaf, parents }
    }

    /// The leaf (writes, commits, flushes go to it).
    pub fn leaf(&mut self) -> &mut Image {
        &mut self.leaf
    }
    /// The leaf, shared.
    pub fn leaf_ref(&self) -> &Image {
        &self.leaf
    }
    /// The parents, nearest first.
    pub fn parents(&self) -> &[Arc<Parent>] {
        &self.parents
    }
    /// Images in the chain, leaf included (blktap's "chain depth").
    pub fn depth(&self) -> usize {
        1 + self.parents.len()
    }
    /// Virtual size (the leaf's).
    pub fn size(&self) -> u64 {
        self.leaf.size()
    }
    /// Cache counters of the leaf and of every parent, added up.
    pub fn stats(&self) -> CacheStats {
        self.parents
            .iter()
            .filter_map(|p| p.stats())
            .fold(self.leaf.stats_handle().snapshot(), |a, s| a.add(&s))
    }

    /// Where `len` bytes at `offset` (whole sectors) are, following the parents where the
    /// leaf's bitmaps say so: the longest prefix with one mapping.
    pub fn map_read(&mut self, offset: u64, len: u64) -> Result<ChainExtent> {
        let e = self.leaf.map_read(offset, len)?;
        match e.map {
            Mapping::Data { file_offset } => Ok(ChainExtent {
                len: e.len,
                map: ChainMapping::Data {
                    level: 0,
                    file_offset,
                },
            }),
            Mapping::Zero => Ok(ChainExtent {
                len: e.len,
                map: ChainMapping::Zero,
            }),
            Mapping::Parent => map_parents(&self.parents, offset, e.len),
        }
    }
}

/// Maps a range that is not in the leaf through `parents` (nearest first).
pub(crate) fn map_parents(parents: &[Arc<Parent>], offset: u64, len: u64) -> Result<ChainExtent> {
    let mut len = len;
    for (i, p) in parents.iter().enumerate() {
        if offset >= p.size {
            break;
        }
        len = len.min(p.size - offset);
        let mut g = p.lock();
        let e = match &mut *g {
            ParentImage::Raw { .. } => Mapping::Data {
                file_offset: offset,
            },
            ParentImage::Vhd(img) => {
                let e = img.map_read(offset, len)?;
                len = e.len;
                e.map
            }
        };
        match e {
            Mapping::Data { file_offset } => {
                return Ok(ChainExtent {
                    len,
                    map: ChainMapping::Data {
                        level: i + 1,
                        file_offset,
                    },
                })
            }
            Mapping::Zero => break,
            Mapping::Parent => continue,
        }
    }
    Ok(ChainExtent {
        len,
        map: ChainMapping::Zero,
    })
}
