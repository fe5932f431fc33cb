//! Backing chains: a writable (or read-only) leaf image over read-only backing images of any
//! depth, qcow2 or raw, shared between the chains of one process through a [`BackingPool`].

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::cache::StatsHandle;
use crate::entry::Compressed;
use crate::error::{corrupt, Error, Result};
use crate::header::MAGIC;
use crate::image::Ticket;
use crate::image::{Image, OpenOptions};
use crate::map::Mapping;
use crate::storage::{FileStorage, OpenFileError, Storage};
use crate::write::{GuestReader, WriteExtent};

/// Longest backing chain opened (QEMU has no fixed limit; this bounds open files and memory).
pub const MAX_DEPTH: usize = 64;

/// A backing image's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// qcow2.
    Qcow2,
    /// A raw file: guest offset = file offset.
    Raw,
}

enum Kind {
    Qcow2(Box<Mutex<Image>>),
    Raw(Arc<dyn Storage>),
}

/// A read-only image under others: shared (`Arc`) by every chain of the process that has it
/// below its leaf. Its qcow2 metadata sits behind a mutex (mapping only; data reads need no
/// lock).
pub struct BackingImage {
    kind: Kind,
    path: PathBuf,
    size: u64,
    parent: Option<Arc<BackingImage>>,
}

impl std::fmt::Debug for BackingImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackingImage")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("parent", &self.parent)
            .finish_non_exhaustive()
    }
}

impl BackingImage {
    /// Guest bytes it provides.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its format.
    pub fn format(&self) -> Format {
        match self.kind {
            Kind::Qcow2(_) => Format::Qcow2,
            Kind::Raw(_) => Format::Raw,
        }
    }

    /// The image below it.
    pub fn parent(&self) -> Option<&Arc<BackingImage>> {
        self.parent.as_ref()
    }

    /// Its storage (data reads go to [`Storage::file`]).
    pub fn storage(&self) -> Arc<dyn Storage> {
        match &self.kind {
            Kind::Qcow2(m) => lock(m).storage().clone(),
            Kind::Raw(s) => s.clone(),
        }
    }

    /// The qcow2 image, locked (`None` for raw files).
    pub fn lock_qcow2(&self) -> Option<MutexGuard<'_, Image>> {
        match &self.kind {
            Kind::Qcow2(m) => Some(lock(m)),
            Kind::Raw(_) => None,
        }
    }

    /// Where guest bytes from `offset` are in this image (never [`Mapping::Backing`] past
    /// its own size: those read as zeroes).
    fn map(&self, offset: u64, len: u64) -> Result<(u64, Mapping)> {
        if offset >= self.size {
            return Ok((len, Mapping::Zero));
        }
        let len = len.min(self.size - offset);
        match &self.kind {
            Kind::Raw(_) => Ok((len, Mapping::Data { offset })),
            Kind::Qcow2(m) => {
                let e = lock(m).map_read(offset, len)?;
                Ok((e.len, e.mapping))
            }
        }
    }
}

fn lock(m: &Mutex<Image>) -> MutexGuard<'_, Image> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl GuestReader for BackingImage {
    fn read_guest(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (n, m) = self.map(pos, (buf.len() - done) as u64)?;
            let out = &mut buf[done..done + n as usize];
            match m {
                Mapping::Zero => out.fill(0),
                Mapping::Data { offset: at } => self
                    .storage()
                    .read_at(out, at)
                    .map_err(|e| Error::io(format!("reading {}", self.path.display()), e))?,
                Mapping::Backing => match &self.parent {
                    Some(p) => p.read_guest(pos, out)?,
                    None => out.fill(0),
                },
                Mapping::Compressed { data, skip } => {
                    if let Some(mut img) = self.lock_qcow2() {
                        img.read_compressed(data, skip, out)?;
                    }
                }
            }
            done += n as usize;
        }
        Ok(())
    }
}

/// Open backing images by (device, inode, format).
type OpenMap = HashMap<(u64, u64, Format), Weak<BackingImage>>;

/// The backing images a process has open, by file identity and format, so chains sharing a
/// base image share one open copy (one descriptor, one metadata cache). Clones share the
/// pool.
#[derive(Clone, Default)]
pub struct BackingPool {
    open: Arc<Mutex<OpenMap>>,
}

impl std::fmt::Debug for BackingPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackingPool").finish_non_exhaustive()
    }
}

impl BackingPool {
    /// An empty pool.
    pub fn new() -> BackingPool {
        BackingPool::default()
    }

    /// Backing images open now.
    pub fn len(&self) -> usize {
        let mut m = self.open.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, w| w.strong_count() > 0);
        m.len()
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Opens (or finds open) the read-only image at `path`, `format` "qcow2" or "raw"
    /// (probed when `None`), with its own backing chain: for callers that assemble a
    /// [`Chain`] over an image of their own ([`Chain::from_image`]).
    pub fn open(
        &self,
        path: &Path,
        format: Option<&str>,
        opts: &OpenOptions,
    ) -> Result<Arc<BackingImage>> {
        self.get(path, format, opts, &mut Vec::new())
    }

    /// Opens (or finds open) the backing image at `path` with `format` (probed when
    /// `None`), and everything below it. `seen` holds the files above it, to refuse loops.
    fn get(
        &self,
        path: &Path,
        format: Option<&str>,
        opts: &OpenOptions,
        seen: &mut Vec<(u64, u64)>,
    ) -> Result<Arc<BackingImage>> {
        let name = path.display().to_string();
        if seen.len() > MAX_DEPTH {
            return Err(Error::Unsupported(format!(
                "backing chain deeper than {MAX_DEPTH} images (at {name})"
            )));
        }
        let meta = std::fs::metadata(path)
            .map_err(|e| Error::io(format!("opening backing file {name}"), e))?;
        let id = (meta.dev(), meta.ino());
        if seen.contains(&id) {
            return Err(corrupt!("backing chain loops back to {name}"));
        }
        let storage: Arc<dyn Storage> = Arc::new(open_file(path, true)?);
        let fmt = match format {
            Some("qcow2") => Format::Qcow2,
            Some("raw") => Format::Raw,
            Some(f) => {
                return Err(Error::Unsupported(format!(
                    "backing file format '{f}' of {name}"
                )))
            }
            None => {
                let mut m = [0u8; 4];
                storage
                    .read_at(&mut m, 0)
                    .map_err(|e| Error::io(format!("probing {name}"), e))?;
                if u32::from_be_bytes(m) == MAGIC {
                    Format::Qcow2
                } else {
                    Format::Raw
                }
            }
        };
        let key = (id.0, id.1, fmt);
        {
            let m = self.open.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(b) = m.get(&key).and_then(Weak::upgrade) {
                return Ok(b);
            }
        }
        let b = match fmt {
            Format::Raw => BackingImage {
                size: storage
                    .size()
                    .map_err(|e| Error::io(format!("sizing {name}"), e))?,
                kind: Kind::Raw(storage),
                path: path.to_path_buf(),
                parent: None,
            },
            Format::Qcow2 => {
                let ro = OpenOptions {
                    read_only: true,
                    ..opts.clone()
                };
                let mut img = Image::open(storage, &ro)?;
                seen.push(id);
                let parent = self.parent_of(&img, path, opts, seen)?;
                seen.pop();
                img.set_backing_size(parent.as_ref().map_or(0, |p| p.size()));
                BackingImage {
                    size: img.disk_size(),
                    kind: Kind::Qcow2(Box::new(Mutex::new(img))),
                    path: path.to_path_buf(),
                    parent,
                }
            }
        };
        let b = Arc::new(b);
        let mut m = self.open.lock().unwrap_or_else(|p| p.into_inner());
        // Another thread may have opened it meanwhile: keep the first.
        if let Some(other) = m.get(&key).and_then(Weak::upgrade) {
            return Ok(other);
        }
        m.insert(key, Arc::downgrade(&b));
        Ok(b)
    }

    /// The backing image `img` (at `path`) names, opened through the pool.
    fn parent_of(
        &self,
        img: &Image,
        path: &Path,
        opts: &OpenOptions,
        seen: &mut Vec<(u64, u64)>,
    ) -> Result<Option<Arc<BackingImage>>> {
        let Some(name) = &img.header().backing_file else {
            return Ok(None);
        };
        let target = resolve(path, name)?;
        let fmt = img.header().backing_format.clone();
        self.get(&target, fmt.as_deref(), opts, seen).map(Some)
    }
}

/// A backing file name as QEMU resolves it: relative to the directory of the image naming it.
/// Protocol names (`nbd:`, `json:`, ...) are refused.
fn resolve(image: &Path, name: &Path) -> Result<PathBuf> {
    let bytes = name.as_os_str().as_bytes();
    if let Some(colon) = bytes.iter().position(|&b| b == b':') {
        if !bytes[..colon].contains(&b'/') {
            return Err(Error::Unsupported(format!(
                "backing file '{}' names a protocol",
                name.display()
            )));
        }
    }
    if name.is_absolute() {
        return Ok(name.to_path_buf());
    }
    Ok(image.parent().unwrap_or(Path::new("")).join(name))
}

fn open_file(path: &Path, read_only: bool) -> Result<FileStorage> {
    FileStorage::open(path, read_only).map_err(|e| match e {
        OpenFileError::Locked => Error::Locked(path.display().to_string()),
        OpenFileError::Io(e) => Error::io(format!("opening {}", path.display()), e),
    })
}

/// Where a run of guest bytes is in a chain, for reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainExtent {
    /// Bytes in the run.
    pub len: u64,
    /// The image holding them: 0 the leaf, 1 its backing image, and so on
    /// ([`Chain::layer_storage`]).
    pub layer: usize,
    /// Where they are in that image ([`Mapping::Backing`] never appears).
    pub mapping: Mapping,
}

/// A leaf image and its backing chain: what a block driver serves.
pub struct Chain {
    leaf: Image,
    /// The backing images, nearest first.
    layers: Vec<Arc<BackingImage>>,
    path: PathBuf,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain")
            .field("path", &self.path)
            .field("layers", &self.layers.len())
            .finish_non_exhaustive()
    }
}

impl Chain {
    /// Opens the qcow2 image at `path` (read-write unless `opts.read_only`) and its backing
    /// chain, read-only, through `pool`.
    pub fn open(path: &Path, opts: &OpenOptions, pool: &BackingPool) -> Result<Chain> {
        let storage: Arc<dyn Storage> = Arc::new(open_file(path, opts.read_only)?);
        let mut leaf = Image::open(storage, opts)?;
        let meta = std::fs::metadata(path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let mut seen = vec![(meta.dev(), meta.ino())];
        let parent = pool.parent_of(&leaf, path, opts, &mut seen)?;
        leaf.set_backing_size(parent.as_ref().map_or(0, |p| p.size()));
        Ok(Self::assemble(leaf, parent, path))
    }

    /// A chain over an image opened by the caller (any storage) with an optional backing
    /// image.
    pub fn from_image(mut leaf: Image, parent: Option<Arc<BackingImage>>) -> Chain {
        leaf.set_backing_size(parent.as_ref().map_or(0, |p| p.size()));
        Self::assemble(leaf, parent, Path::new(""))
    }

    fn assemble(leaf: Image, parent: Option<Arc<BackingImage>>, path: &Path) -> Chain {
        let mut layers = Vec::new();
        let mut p = parent;
        while let Some(b) = p {
            p = b.parent.clone();
            layers.push(b);
        }
        Chain {
            leaf,
            layers,
            path: path.to_path_buf(),
        }
    }

    /// The leaf image.
    pub fn leaf(&self) -> &Image {
        &self.leaf
    }

    /// The leaf image, for its own calls.
    pub fn leaf_mut(&mut self) -> &mut Image {
        &mut self.leaf
    }

    /// The backing images, nearest first.
    pub fn backing(&self) -> &[Arc<BackingImage>] {
        &self.layers
    }

    /// Images in the chain, the leaf included.
    pub fn depth(&self) -> usize {
        1 + self.layers.len()
    }

    /// Guest-visible size.
    pub fn disk_size(&self) -> u64 {
        self.leaf.disk_size()
    }

    /// The storage of image `layer` (0: the leaf).
    pub fn layer_storage(&self, layer: usize) -> Option<Arc<dyn Storage>> {
        if layer == 0 {
            return Some(self.leaf.storage().clone());
        }
        self.layers.get(layer - 1).map(|b| b.storage())
    }

    /// Cache counters of the leaf.
    pub fn stats_handle(&self) -> StatsHandle {
        self.leaf.stats_handle()
    }

    /// Where the guest bytes from `offset` are, down the chain: the longest run (up to
    /// `len`) in one image with one mapping.
    pub fn map_read(&mut self, offset: u64, len: u64) -> Result<ChainExtent> {
        let e = self.leaf.map_read(offset, len)?;
        if e.mapping != Mapping::Backing {
            return Ok(ChainExtent {
                len: e.len,
                layer: 0,
                mapping: e.mapping,
            });
        }
        let mut len = e.len;
        for (i, b) in self.layers.iter().enumerate() {
            let (n, m) = b.map(offset, len)?;
            if m != Mapping::Backing {
                return Ok(ChainExtent {
                    len: n,
                    layer: i + 1,
                    mapping: m,
                });
            }
            len = n;
        }
        Ok(ChainExtent {
            len,
            layer: 0,
            mapping: Mapping::Zero,
        })
    }

    /// Inflates a compressed cluster of image `layer` and copies bytes from `skip` on.
    pub fn read_compressed(
        &mut self,
        layer: usize,
        data: Compressed,
        skip: u64,
        out: &mut [u8],
    ) -> Result<()> {
        if layer == 0 {
            return self.leaf.read_compressed(data, skip, out);
        }
        let b = self
            .layers
            .get(layer - 1)
            .ok_or_else(|| Error::Invalid(format!("no layer {layer}")))?;
        match b.lock_qcow2() {
            Some(mut img) => img.read_compressed(data, skip, out),
            None => Err(Error::Invalid(format!("layer {layer} is raw"))),
        }
    }

    /// [`Image::map_write`] on the leaf, copying from the backing chain where needed.
    pub fn map_write(&mut self, offset: u64, len: u64) -> Result<WriteExtent> {
        let p = self.layers.first().cloned();
        self.leaf
            .map_write(offset, len, p.as_deref().map(|b| b as &dyn GuestReader))
    }

    /// [`Image::commit`].
    pub fn commit(&mut self, ticket: Ticket) -> Result<()> {
        self.leaf.commit(ticket)
    }

    /// [`Image::abort`].
    pub fn abort(&mut self, ticket: Ticket) {
        self.leaf.abort(ticket)
    }

    /// Reads guest bytes (the synchronous executor).
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let p = self.layers.first().cloned();
        self.leaf
            .read_at(offset, buf, p.as_deref().map(|b| b as &dyn GuestReader))
    }

    /// Writes guest bytes (the synchronous executor).
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        let p = self.layers.first().cloned();
        self.leaf
            .write_at(offset, buf, p.as_deref().map(|b| b as &dyn GuestReader))
    }

    /// [`Image::write_zeroes`].
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let p = self.layers.first().cloned();
        self.leaf.write_zeroes(
            offset,
            len,
            unmap,
            p.as_deref().map(|b| b as &dyn GuestReader),
        )
    }

    /// [`Image::discard`].
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true)
    }

    /// [`Image::flush`].
    pub fn flush(&mut self) -> Result<()> {
        self.leaf.flush()
    }

    /// [`Image::close`].
    pub fn close(&mut self) -> Result<()> {
        self.leaf.close()
    }

    /// Writes everything back and trades the leaf's writer locks for a reader's, so that
    /// another chain (of this process or another) may open the leaf as its backing file: a
    /// snapshot's new overlay over it. Nothing may be written meanwhile (the block driver is
    /// paused); [`Chain::reclaim_leaf`] takes the writer's locks back. Fails, keeping the
    /// writer's locks, if a write is in flight or the write-back fails.
    pub fn release_leaf(&mut self) -> Result<()> {
        if self.leaf.read_only() {
            return Ok(());
        }
        if self.leaf.pending_allocations() > 0 {
            return Err(Error::Invalid(
                "writes are in flight: the leaf cannot be released".into(),
            ));
        }
        self.leaf.close()?;
        let name = self.leaf.storage().name();
        self.leaf
            .storage()
            .relock(true)
            .map_err(|e| Error::io(format!("unlocking {name}"), e))
    }

    /// Takes back the writer's locks [`Chain::release_leaf`] gave up; fails with
    /// [`Error::Locked`] while someone reads the leaf as a backing file.
    pub fn reclaim_leaf(&mut self) -> Result<()> {
        if self.leaf.read_only() {
            return Ok(());
        }
        let name = self.leaf.storage().name();
        self.leaf.storage().relock(false).map_err(|e| {
            if e.kind() == std::io::ErrorKind::WouldBlock {
                Error::Locked(name)
            } else {
                Error::io(format!("locking {name}"), e)
            }
        })
    }
}
