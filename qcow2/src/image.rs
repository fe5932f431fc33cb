//! One qcow2 image file: opened and validated, with its L1 table and refcount table in memory
//! and its L2 tables and refcount blocks in the metadata cache.
//!
//! The mapping calls live in `map.rs`, allocation in `alloc.rs`, write-back and flush in
//! `meta.rs`, zeroing and discard in `zero.rs`; they are all methods of [`Image`], which owns
//! every piece of the image's state.

use std::sync::Arc;

use metacache::FastMap;

use crate::cache::{Cache, StatsHandle, DEFAULT_SLOTS, SLICE};
use crate::compress::Inflater;
use crate::entry::{self, Compressed, Refcounts, OFFSET_MASK};
use crate::error::{corrupt, Error, Result};
use crate::header::{self, field, Header};
use crate::snapshot::{self, Snapshot};
use crate::storage::Storage;

// The write path (`write.rs`) and the metadata write-back (`meta.rs`) are methods of [`Image`];
// the types their signatures name live here, so neither file is imported back by this one.

/// Guest clusters a write allocated (or joined while their allocation was in flight), to be
/// linked into their L2 tables after the data write. Not `Clone`: exactly one commit or
/// abort per ticket.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a ticket must be committed or aborted"]
pub struct Ticket {
    pub(crate) first: u64,
    pub(crate) count: u64,
}

/// What the rest of a new cluster must hold.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Source {
    Zero,
    Backing,
    OldCluster(u64),
    Compressed(Compressed),
}

/// Which in-memory table.
#[derive(Clone, Copy)]
pub(crate) enum Table {
    L1,
    Refcount,
}

/// How to open an image.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Open for reading only (backing files always are).
    pub read_only: bool,
    /// Metadata cache slots (slices of at most 4 KiB) of this image; at least 1.
    pub cache_slots: usize,
}

impl Default for OpenOptions {
    fn default() -> OpenOptions {
        OpenOptions {
            read_only: false,
            cache_slots: DEFAULT_SLOTS,
        }
    }
}

/// Sizes derived from the header.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geometry {
    pub bits: u32,
    pub cs: u64,
    pub l2_entries: u64,
    pub slice: u64,
    pub l2_per_slice: u64,
    pub rc: Refcounts,
    pub rc_per_block: u64,
    pub rc_per_slice: u64,
    pub version: u32,
    pub disk_size: u64,
}

/// Which 512-byte sectors of an in-memory table changed.
#[derive(Debug, Default)]
pub(crate) struct Dirty {
    bits: Vec<u64>,
    any: bool,
}

impl Dirty {
    pub fn new(entries: usize) -> Dirty {
        Dirty {
            bits: vec![0; entries.div_ceil(64).div_ceil(64)],
            any: false,
        }
    }
    /// Entry `i` (of 8 bytes) changed.
    pub fn mark(&mut self, i: usize) {
        let sector = i / 64;
        self.bits[sector / 64] |= 1 << (sector % 64);
        self.any = true;
    }
    pub fn any(&self) -> bool {
        self.any
    }
    /// The dirty sectors, cleared.
    pub fn take(&mut self, out: &mut Vec<usize>) {
        out.clear();
        for (w, b) in self.bits.iter_mut().enumerate() {
            while *b != 0 {
                let t = b.trailing_zeros() as usize;
                *b &= *b - 1;
                out.push(w * 64 + t);
            }
        }
        self.any = false;
    }
}

/// A guest cluster whose new host cluster is allocated, and maybe being written, but not yet
/// linked into its L2 table, or linked with writers still in flight.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pending {
    /// The new host cluster.
    pub host: u64,
    /// Tickets not yet committed or aborted.
    pub writers: u32,
    /// The L2 entry points at `host` (in the cache).
    pub linked: bool,
    /// The host cluster was the entry's own preallocated zero cluster (not newly allocated).
    pub reused: bool,
    /// The L2 entry when the allocation was made.
    pub old: u64,
}

/// One qcow2 image. See the crate documentation for how a block driver uses it.
pub struct Image {
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) header: Header,
    pub(crate) g: Geometry,
    pub(crate) read_only: bool,
    /// Guest bytes a backing image provides (0: none).
    pub(crate) backing_size: u64,
    pub(crate) l1: Vec<u64>,
    pub(crate) l1_dirty: Dirty,
    pub(crate) reftable: Vec<u64>,
    pub(crate) reftable_dirty: Dirty,
    pub(crate) cache: Cache,
    pub(crate) pending: FastMap<u64, Pending>,
    /// Clusters (offset, count) whose references were removed from L2 entries in the cache;
    /// their refcounts drop once that change is durable.
    pub(crate) deferred: Vec<(u64, u64)>,
    /// No cluster below this index is free.
    pub(crate) free_hint: u64,
    /// Clusters from this index on read as zeroes (never written); `u64::MAX`: none known.
    pub(crate) zero_from: u64,
    /// The file's size as this image keeps it (it grows the file itself).
    pub(crate) file_size: u64,
    /// An L2 entry was pointed at newly written data since the last sync.
    pub(crate) linked_since_sync: bool,
    /// The first failed metadata write: the image refuses changes after it.
    pub(crate) stopped: Option<String>,
    /// Clusters holding metadata (writable images): never handed out as free.
    pub(crate) meta_clusters: FastMap<u64, ()>,
    pub(crate) snapshots: Vec<Snapshot>,
    pub(crate) inflater: Inflater,
    pub(crate) scratch: Vec<usize>,
    pub(crate) fill_buf: Vec<u8>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("storage", &self.storage.name())
            .field("header", &self.header)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl Image {
    /// Opens the image in `storage`, reading and checking its header, L1 table, refcount
    /// table and snapshot table. Backing files are the caller's business ([`crate::Chain`]
    /// opens them); without [`Image::set_backing_size`] unallocated clusters read as
    /// [`crate::Mapping::Backing`] never, zeroes always.
    ///
    /// A writable open refuses images marked corrupt and images with internal snapshots,
    /// clears autoclear feature bits it does not maintain (bitmaps), and rebuilds the
    /// refcounts of a dirty image (lazy refcounts, not closed cleanly) before anything else,
    /// as QEMU does, clearing the dirty bit when they are right.
    pub fn open(storage: Arc<dyn Storage>, opts: &OpenOptions) -> Result<Image> {
        let io = |what: &'static str| move |e| Error::io(what, e);
        let file_size = storage.size().map_err(io("reading the file size"))?;
        let mut first = [0u8; 24];
        storage
            .read_at(&mut first, 0)
            .map_err(io("reading the header"))?;
        let bits = u32::from_be_bytes([first[20], first[21], first[22], first[23]]);
        let cs = 1usize << bits.clamp(header::MIN_CLUSTER_BITS, header::MAX_CLUSTER_BITS);
        let mut buf = vec![0u8; cs.min(file_size as usize)];
        storage
            .read_at(&mut buf, 0)
            .map_err(io("reading the header"))?;
        let header = Header::parse(&buf, file_size)?;
        drop(buf);
        if !opts.read_only {
            if header.is_corrupt() {
                return Err(Error::Corrupt(
                    "the image is marked corrupt: it opens read-only only; \
                     `qemu-img check -r all` may repair it"
                        .into(),
                ));
            }
            if header.nb_snapshots > 0 {
                return Err(Error::Unsupported(format!(
                    "internal snapshots ({}): writing to an image with internal snapshots \
                     is not supported; open it read-only or delete them with \
                     `qemu-img snapshot -d`",
                    header.nb_snapshots
                )));
            }
        }
        let rc = Refcounts::new(header.refcount_order);
        let slice = (cs as u64).min(SLICE);
        let g = Geometry {
            bits: header.cluster_bits,
            cs: cs as u64,
            l2_entries: cs as u64 / 8,
            slice,
            l2_per_slice: slice / 8,
            rc,
            rc_per_block: rc.per(cs as u64),
            rc_per_slice: rc.per(slice),
            version: header.version,
            disk_size: header.disk_size(),
        };
        let l1 = read_table(&*storage, header.l1_table_offset, header.l1_size as u64)
            .map_err(io("reading the L1 table"))?;
        let rt_entries = header.refcount_table_clusters as u64 * g.l2_entries;
        let reftable = read_table(&*storage, header.refcount_table_offset, rt_entries)
            .map_err(io("reading the refcount table"))?;
        for (i, &e) in l1.iter().enumerate() {
            let (off, _) = entry::l1_entry(e, i as u64, g.bits)?;
            if off != 0 && off.checked_add(g.cs).is_none_or(|end| end > file_size) {
                return Err(corrupt!(
                    "L1 entry {i}: L2 table at {off:#x} lies outside the file"
                ));
            }
        }
        for (i, &e) in reftable.iter().enumerate() {
            if e & 511 != 0 || e & (g.cs - 1) != 0 {
                return Err(corrupt!(
                    "refcount table entry {i} ({e:#x}) is not aligned to a cluster"
                ));
            }
            if e != 0 && e.checked_add(g.cs).is_none_or(|end| end > file_size) {
                return Err(corrupt!(
                    "refcount table entry {i}: refcount block at {e:#x} lies outside the file"
                ));
            }
        }
        let snapshots = if header.nb_snapshots > 0 {
            snapshot::read_table(
                &*storage,
                header.snapshots_offset,
                header.nb_snapshots,
                g.bits,
                g.version,
                file_size,
            )?
        } else {
            Vec::new()
        };
        let mut img = Image {
            zero_from: if storage.grows_with_zeroes() {
                file_size.div_ceil(g.cs)
            } else {
                u64::MAX
            },
            storage,
            l1_dirty: Dirty::new(l1.len()),
            reftable_dirty: Dirty::new(reftable.len()),
            l1,
            reftable,
            cache: Cache::new(opts.cache_slots, slice as usize),
            pending: FastMap::default(),
            deferred: Vec::new(),
            free_hint: 0,
            file_size,
            linked_since_sync: false,
            stopped: None,
            meta_clusters: FastMap::default(),
            snapshots,
            inflater: Inflater::new(g.cs as usize),
            scratch: Vec::new(),
            fill_buf: Vec::new(),
            read_only: opts.read_only,
            backing_size: 0,
            header,
            g,
        };
        if !img.read_only {
            img.prepare_for_writing()?;
            if img.header.is_dirty() {
                // As QEMU does on a read-write open: rebuild the refcounts first.
                img.repair_refcounts()?;
            }
        }
        Ok(img)
    }

    /// Clears autoclear bits and records which clusters hold metadata.
    fn prepare_for_writing(&mut self) -> Result<()> {
        if self.header.autoclear_features != 0 {
            self.storage
                .write_at(&0u64.to_be_bytes(), field::AUTOCLEAR)
                .and_then(|()| self.storage.flush())
                .map_err(|e| Error::io("clearing autoclear feature bits", e))?;
            self.header.autoclear_features = 0;
        }
        let cs = self.g.cs;
        let mut meta = FastMap::default();
        meta.insert(0, ());
        let mut range = |off: u64, bytes: u64| {
            for c in off / cs..(off + bytes).div_ceil(cs) {
                meta.insert(c, ());
            }
        };
        range(self.header.l1_table_offset, self.l1.len() as u64 * 8);
        range(
            self.header.refcount_table_offset,
            self.reftable.len() as u64 * 8,
        );
        for &e in self.l1.iter().chain(self.reftable.iter()) {
            let off = e & OFFSET_MASK;
            if off != 0 {
                range(off, 1);
            }
        }
        self.meta_clusters = meta;
        Ok(())
    }

    /// The header as read (and as this library has rewritten it).
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The internal snapshots the table lists.
    pub fn snapshots(&self) -> &[Snapshot] {
        &self.snapshots
    }

    /// Guest-visible size in bytes.
    pub fn disk_size(&self) -> u64 {
        self.g.disk_size
    }

    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        self.g.cs
    }

    /// Whether the image was opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The storage: data IO goes to [`Storage::file`] at the offsets the mapping calls
    /// return.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Tells the image that a backing image provides the first `size` guest bytes (0: no
    /// backing image). Unallocated clusters below `size` then map to
    /// [`crate::Mapping::Backing`], and a partial write into one copies the rest of the
    /// cluster from the backing image.
    pub fn set_backing_size(&mut self, size: u64) {
        self.backing_size = size;
    }

    /// Guest bytes the backing image provides.
    pub fn backing_size(&self) -> u64 {
        self.backing_size
    }

    /// A handle that reads this image's cache counters from any thread.
    pub fn stats_handle(&self) -> StatsHandle {
        self.cache.stats_handle()
    }

    /// Allocations whose data is in flight (tickets not yet committed or aborted).
    pub fn pending_allocations(&self) -> usize {
        self.pending.len()
    }

    /// Checks `offset, len` against the disk.
    pub(crate) fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.g.disk_size => Ok(()),
            _ => Err(Error::Invalid(format!(
                "range {offset}+{len} is outside the disk ({} bytes)",
                self.g.disk_size
            ))),
        }
    }

    /// Fails if the image may not change.
    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly(self.storage.name()));
        }
        if let Some(s) = &self.stopped {
            return Err(Error::Stopped(s.clone()));
        }
        Ok(())
    }
}

/// Reads `n` big-endian u64s at `offset`.
fn read_table(s: &dyn Storage, offset: u64, n: u64) -> std::io::Result<Vec<u64>> {
    let mut bytes = vec![0u8; n as usize * 8];
    if n > 0 {
        s.read_at(&mut bytes, offset)?;
    }
    Ok(bytes
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}
