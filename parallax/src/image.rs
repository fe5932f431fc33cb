//! An open image: superblock, volume table, caches, allocators, and the commit.
//!
//! # Epochs and commits
//!
//! Everything reachable from the last committed superblock stays untouched on the store until
//! the next commit is durable (shadow paging). The first change in an epoch to a metadata block
//! (a V2P node, or a node of the P2M or a bitmap tree) moves it to a newly allocated machine
//! block, and its pointer with it: for a V2P node the pointer is its P2M entry (V2P nodes are
//! named by physical block number, so V2P trees never change when nodes move), for a tree
//! node the pointer is in its parent node or, at the top, in the superblock. Further changes in
//! the same epoch go to the same new block ("fresh" blocks, whose machine numbers are kept in
//! `fresh`). Blocks freed in the epoch are kept allocated until the commit that frees them is
//! durable, so nothing the last commit references is ever overwritten.
//!
//! [`Image::flush`] commits: it writes every dirty node (children before parents, each parent
//! pointer taking its child's CRC32C), then the volume table, syncs the store, writes the
//! superblock into the copy that does not hold the last commit, syncs again, and writes the
//! same superblock into the other copy ([`crate::superblocks`]). A crash at any point leaves
//! one of the two superblock copies valid and pointing at a complete tree; once the commit is
//! durable, both copies hold it, so one damaged copy loses nothing.
//!
//! Data blocks are not shadowed: a write to a block this volume owns alone goes to the block's
//! place, like a write to a plain disk. Blocks shared with a snapshot or a clone, or reached
//! through a read-only pointer, are copied before they are written.
//!
//! The first metadata error (an IO error, a checksum mismatch, a corrupt entry, a full store)
//! stops the image: every later call fails with [`Error::Stopped`], and nothing more is
//! committed. Reopening resumes from the last commit.

use std::collections::HashSet;
use std::time::{SystemTime, UNIX_EPOCH};

use metacache::FastSet;

use crate::backing::Backing;
use crate::cache::{Cache, CacheStats, StatsHandle, Tree, DEFAULT_SLOTS};
use crate::error::{Error, Result};
use crate::format::{
    self, check_name, decode_volume_block, encode_volume_block, v2p_levels, Range, Superblock,
    TreePtr, VolumeKind, VolumeRecord, BITMAP_LEAF_BITS, BLOCK, BLOCK_SHIFT, MAX_DATA_SHIFT,
    MAX_VIRTUAL_SIZE, MAX_VOLUMES, MIN_DATA_SHIFT, P2M_LEAF_BITS, RO_COMPAT_KNOWN,
    VOLUMES_PER_BLOCK,
};
use crate::superblocks;

/// A volume (a disk or a snapshot) of an image.
pub type Volume = VolumeRecord;

/// Freed runs shorter than this many 4 KiB blocks stay allocated in the file at a commit
/// (free for the allocator, not punched out of the file).
pub const PUNCH_MIN_BLOCKS: u64 = 16;

/// Identifies a volume of an open image (its id in the volume table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VolumeId(pub u64);

/// How to create an image.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Virtual size in bytes (a multiple of 512).
    pub size: u64,
    /// Data block size in bytes: a power of two from 4 KiB to 64 KiB.
    pub block_size: u64,
    /// Name of the image's first disk.
    pub name: String,
    /// Metadata cache slots.
    pub cache_slots: usize,
}

impl CreateOptions {
    /// A disk of `size` bytes with 4 KiB blocks, named [`DEFAULT_VOLUME`].
    pub fn new(size: u64) -> CreateOptions {
        CreateOptions {
            size,
            block_size: 4096,
            name: DEFAULT_VOLUME.to_string(),
            cache_slots: DEFAULT_SLOTS,
        }
    }
}

/// The name of the disk `create` makes, and which `PATH` without `@NAME` opens.
pub const DEFAULT_VOLUME: &str = "base";

/// How to open an image.
#[derive(Clone, Copy, Debug)]
pub struct OpenOptions {
    /// Metadata cache slots (at least 1).
    pub cache_slots: usize,
    /// Refuse every change.
    pub read_only: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            cache_slots: DEFAULT_SLOTS,
            read_only: false,
        }
    }
}

/// Which allocator a reservation serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ResKind {
    Data,
    Meta,
    Phys,
    NodePhys,
}

/// A Parallax image on a store.
///
/// Not `Sync`: one thread at a time (tapdisk shares one behind a mutex between its rings).
pub struct Image<B: Backing> {
    pub(crate) backing: B,
    /// The superblock being built for the next commit.
    pub(crate) sb: Superblock,
    /// Which superblock copy (0 or 1) got the last commit first (both hold it once it is
    /// durable; the next commit writes the other one first).
    pub(crate) committed_copy: u64,
    /// What was wrong with the other superblock copy when the image opened.
    superblock_damage: Option<String>,
    pub(crate) read_only: bool,
    pub(crate) cache: Cache,
    /// Metadata machine blocks allocated in this epoch.
    pub(crate) fresh: FastSet<u64>,
    /// Machine runs `(start, len)` freed in this epoch.
    pub(crate) freed_machine: Vec<(u64, u64)>,
    /// Physical blocks freed in this epoch.
    pub(crate) freed_phys: Vec<u64>,
    /// During a commit: how much of `freed_machine` is sorted (and excluded from allocation by
    /// binary search); the rest is checked one by one.
    pub(crate) freed_sorted: usize,
    /// During a commit: whether freed runs may already be clear in the bitmap.
    pub(crate) quarantine: bool,
    /// During a commit: how many of `freed_machine` and `freed_phys` have their bits cleared.
    pub(crate) cleared: (usize, usize),
    /// Reserved ranges whose bits are not yet set: machine (`Mfree`) and physical (`Pfree`).
    pub(crate) unsettled: Vec<(Tree, Range)>,
    /// Where the next search for free space starts, per reservation kind.
    pub(crate) cursors: [u64; 4],
    pub(crate) volumes: Vec<Volume>,
    pub(crate) volumes_dirty: bool,
    /// Machine blocks of the committed volume table.
    pub(crate) volume_blocks: Vec<u64>,
    /// Anything changed since the last commit.
    pub(crate) changed: bool,
    pub(crate) stopped: Option<String>,
    pub(crate) pool: Vec<Box<[u8; BLOCK]>>,
    /// Scratch for copying a data block on the write path.
    pub(crate) fill: Vec<u8>,
    /// A data block of zeroes, for partial writes to new blocks.
    pub(crate) zeroes: Vec<u8>,
    /// Leaf entries copied out on the mapping path.
    pub(crate) entries: Vec<u64>,
    pub(crate) label: String,
    pub(crate) progress: Option<Progress>,
    /// Slots where the last V2P node and the last P2M leaf were found.
    pub(crate) hint_v2p: u32,
    pub(crate) hint_p2m: u32,
    /// The leaf the last mapping call used, valid while `v2p_epoch` is unchanged.
    pub(crate) memo: Option<LeafMemo>,
    /// Bumped by every change to a V2P node above the leaves and every node freed.
    pub(crate) v2p_epoch: u64,
}

/// Which leaf holds a volume's pointers for one 512-block stretch.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LeafMemo {
    pub root: u64,
    pub leaf_index: u64,
    pub leaf: u64,
    /// Reached through writable pointers only (a write may use it without copying).
    pub writable: bool,
    pub epoch: u64,
}

/// A progress callback: `f(what, done, total)` with `total` 0 when unknown.
pub type ProgressFn = Box<dyn FnMut(&str, u64, u64) + Send>;

pub(crate) struct Progress {
    pub f: ProgressFn,
    pub done: u64,
    pub total: u64,
}

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A new image's id: 16 bytes from the kernel's random generator (two images made in one
/// second by one process still differ).
fn random_uuid() -> Result<[u8; 16]> {
    let mut u = [0u8; 16];
    getrandom::fill(&mut u).map_err(|e| Error::io("drawing a random image id", e.into()))?;
    Ok(u)
}

impl<B: Backing> Image<B> {
    fn empty(backing: B, sb: Superblock, slots: usize, read_only: bool) -> Result<Image<B>> {
        let run = sb.data_run() as usize * BLOCK;
        let cache = Cache::try_new(slots)?;
        Ok(Image {
            backing,
            sb,
            committed_copy: 1,
            superblock_damage: None,
            read_only,
            cache,
            fresh: FastSet::default(),
            freed_machine: Vec::new(),
            freed_phys: Vec::new(),
            freed_sorted: 0,
            quarantine: false,
            cleared: (0, 0),
            unsettled: Vec::new(),
            cursors: [2, 2, 1, 1],
            volumes: Vec::new(),
            volumes_dirty: false,
            volume_blocks: Vec::new(),
            changed: false,
            stopped: None,
            pool: Vec::new(),
            fill: vec![0u8; run],
            zeroes: vec![0u8; run],
            entries: Vec::with_capacity(crate::format::V2P_FANOUT),
            label: "image".into(),
            progress: None,
            hint_v2p: u32::MAX,
            hint_p2m: u32::MAX,
            memo: None,
            v2p_epoch: 0,
        })
    }

    /// Creates a new image on `backing` (whatever it held is lost) with one empty disk, and
    /// commits it.
    pub fn create(backing: B, opts: &CreateOptions) -> Result<Image<B>> {
        if opts.size == 0 || !opts.size.is_multiple_of(512) || opts.size > MAX_VIRTUAL_SIZE {
            return Err(Error::Invalid(format!(
                "size {} is not a positive multiple of 512 bytes up to 64 PiB",
                opts.size
            )));
        }
        let bs = opts.block_size;
        if !bs.is_power_of_two() || !(1 << MIN_DATA_SHIFT..=1 << MAX_DATA_SHIFT).contains(&bs) {
            return Err(Error::Invalid(format!(
                "block size {bs} is not a power of two from 4096 to 65536"
            )));
        }
        check_name(&opts.name)?;
        let shift = bs.trailing_zeros() as u8;
        let t = now();
        let sb = Superblock {
            incompat: 0,
            ro_compat: 0,
            compat: 0,
            uuid: random_uuid()?,
            generation: 0,
            created: t,
            committed: t,
            virtual_size: opts.size,
            data_shift: shift,
            v2p_levels: v2p_levels(opts.size, shift),
            p2m_levels: 1,
            mfree_levels: 1,
            pfree_levels: 1,
            store_blocks: 2,
            phys_limit: 1,
            used_machine: 0,
            used_phys: 0,
            next_volume_id: 1,
            volume_count: 0,
            volume_blocks: 0,
            p2m_root: TreePtr::NULL,
            mfree_root: TreePtr::NULL,
            pfree_root: TreePtr::NULL,
            volumes: TreePtr::NULL,
            data_reserve: Range::default(),
            meta_reserve: Range::default(),
            phys_reserve: Range::default(),
            node_phys_reserve: Range::default(),
        };
        let mut img = Image::empty(backing, sb, opts.cache_slots, false)?;
        // A stale superblock from an earlier image must not win over the new one.
        img.backing
            .grow(2 * BLOCK as u64)
            .map_err(|e| Error::io("growing the store", e))?;
        img.backing
            .write_at(&[0u8; BLOCK], BLOCK as u64)
            .map_err(|e| Error::io("clearing the second superblock", e))?;
        // The superblocks and physical block 0 (the null pointer) are always allocated.
        img.unsettled
            .push((Tree::Mfree, Range { start: 0, end: 2 }));
        img.unsettled
            .push((Tree::Pfree, Range { start: 0, end: 1 }));
        img.changed = true;
        img.guard(|img| {
            let root = img.v2p_new(img.sb.v2p_levels - 1, None)?;
            img.add_volume(&opts.name, root, VolumeKind::Disk, 0)?;
            img.commit()
        })?;
        Ok(img)
    }

    /// Opens the image on `backing`.
    pub fn open(backing: B, opts: &OpenOptions) -> Result<Image<B>> {
        let copies = superblocks::read(&backing)?;
        let (copy, sb) = (copies.copy, copies.sb.clone());
        let size = backing
            .size()
            .map_err(|e| Error::io("reading the store size", e))?;
        if sb.ro_compat & !RO_COMPAT_KNOWN != 0 && !opts.read_only {
            return Err(Error::Unsupported(format!(
                "unknown read-only-compatible features {:#x}: open it read-only",
                sb.ro_compat & !RO_COMPAT_KNOWN
            )));
        }
        let need = sb.store_blocks * BLOCK as u64;
        if size < need {
            return Err(Error::Corrupt(format!(
                "the image is truncated: its store needs {need} bytes but holds {size}"
            )));
        }
        let mut img = Image::empty(backing, sb, opts.cache_slots, opts.read_only)?;
        img.committed_copy = copy;
        img.superblock_damage = copies.damage();
        // The next flush commits, rewriting the damaged copy, even if nothing else changes.
        img.changed = img.superblock_damage.is_some() && !opts.read_only;
        img.cursors = [
            img.sb.data_reserve.end.max(2),
            img.sb.meta_reserve.end.max(2),
            img.sb.phys_reserve.end.max(1),
            img.sb.node_phys_reserve.end.max(1),
        ];
        img.read_volume_table()?;
        Ok(img)
    }

    fn read_volume_table(&mut self) -> Result<()> {
        let mut ptr = self.sb.volumes;
        let mut index = 0u32;
        let mut b = vec![0u8; BLOCK];
        while !ptr.is_null() {
            if index >= self.sb.volume_blocks {
                return Err(Error::Corrupt(format!(
                    "the volume table is longer than the {} blocks the superblock says",
                    self.sb.volume_blocks
                )));
            }
            if ptr.machine >= self.sb.store_blocks {
                return Err(Error::Corrupt(format!(
                    "volume table block {index} at machine block {} is beyond the store",
                    ptr.machine
                )));
            }
            self.read_block(ptr.machine, &mut b)
                .map_err(|e| Error::io(format!("reading volume table block {index}"), e))?;
            if format::crc32c(&b) != ptr.crc {
                return Err(Error::Corrupt(format!(
                    "volume table block {index} (machine block {}): checksum mismatch",
                    ptr.machine
                )));
            }
            let blk = decode_volume_block(&b, index)?;
            self.volume_blocks.push(ptr.machine);
            self.volumes.extend(blk.records);
            ptr = blk.next;
            index += 1;
        }
        if index != self.sb.volume_blocks || self.volumes.len() != self.sb.volume_count as usize {
            return Err(Error::Corrupt(format!(
                "the volume table holds {} volumes in {index} blocks, the superblock says {} in {}",
                self.volumes.len(),
                self.sb.volume_count,
                self.sb.volume_blocks
            )));
        }
        let mut ids = HashSet::new();
        let mut names = HashSet::new();
        for v in &self.volumes {
            if !ids.insert(v.id) || v.id >= self.sb.next_volume_id {
                return Err(Error::Corrupt(format!(
                    "volume id {} is repeated or not below the next id",
                    v.id
                )));
            }
            if !names.insert(v.name.clone()) {
                return Err(Error::Corrupt(format!(
                    "volume name '{}' is repeated",
                    v.name
                )));
            }
            if v.root >= self.sb.phys_limit {
                return Err(Error::Corrupt(format!(
                    "volume '{}' has root {} beyond the physical limit",
                    v.name, v.root
                )));
            }
        }
        Ok(())
    }

    pub(crate) fn read_block(&self, machine: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.backing.read_at(buf, machine << BLOCK_SHIFT)
    }

    /// Runs `f`, stopping the image if it fails with a fatal error.
    pub(crate) fn guard<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        if let Some(m) = &self.stopped {
            return Err(Error::Stopped(m.clone()));
        }
        let r = f(self);
        if let Err(e) = &r {
            if e.is_fatal() {
                self.stop(e.to_string());
            }
        }
        r
    }

    /// Stops the image (the first error wins).
    pub(crate) fn stop(&mut self, why: String) {
        if self.stopped.is_none() {
            self.stopped = Some(why);
        }
    }

    /// The error that stopped the image, if one did.
    pub fn stopped(&self) -> Option<&str> {
        self.stopped.as_deref()
    }

    pub(crate) fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly(format!(
                "{} (opened read-only)",
                self.label
            )));
        }
        Ok(())
    }

    /// Sets the name used in messages (e.g. the path).
    pub fn set_label(&mut self, label: impl Into<String>) {
        self.label = label.into();
    }

    /// Calls `f` now and then during long operations (delete, usage, defrag), with what is
    /// being done and how far it got; `None` stops it.
    pub fn set_progress(&mut self, f: Option<ProgressFn>) {
        self.progress = f.map(|f| Progress {
            f,
            done: 0,
            total: 0,
        });
    }

    /// Resets the progress count, announcing `total` units (0 = unknown).
    pub fn progress_start(&mut self, total: u64) {
        if let Some(p) = self.progress.as_mut() {
            p.done = 0;
            p.total = total;
        }
    }

    /// The name used in messages.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The store.
    pub fn backing(&self) -> &B {
        &self.backing
    }

    /// The superblock of the last commit plus uncommitted changes.
    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    /// What was wrong with the superblock copy not used when the image opened (damaged: a
    /// torn write, a flipped bit), in words for a log line; None if both were fine. The image
    /// is whole either way (the copy used is checked); the next commit rewrites the damaged
    /// one.
    pub fn superblock_damage(&self) -> Option<&str> {
        self.superblock_damage.as_deref()
    }

    /// Whether the image was opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Virtual size of every volume in bytes.
    pub fn size(&self) -> u64 {
        self.sb.virtual_size
    }

    /// Data block size in bytes.
    pub fn block_size(&self) -> u64 {
        self.sb.data_block()
    }

    /// The volumes, in the order they were created.
    pub fn volumes(&self) -> &[Volume] {
        &self.volumes
    }

    /// The volume named `name`.
    pub fn volume(&self, name: &str) -> Result<VolumeId> {
        self.volumes
            .iter()
            .find(|v| v.name == name)
            .map(|v| VolumeId(v.id))
            .ok_or_else(|| Error::NoSuchVolume(name.to_string()))
    }

    /// The record of volume `id`.
    pub fn volume_info(&self, id: VolumeId) -> Result<&Volume> {
        self.volumes
            .iter()
            .find(|v| v.id == id.0)
            .ok_or_else(|| Error::NoSuchVolume(format!("#{}", id.0)))
    }

    /// Cache counters now.
    pub fn stats(&self) -> CacheStats {
        self.cache.stats_handle().snapshot()
    }

    /// A handle another thread can read the cache counters through without locking.
    pub fn stats_handle(&self) -> StatsHandle {
        self.cache.stats_handle()
    }

    /// Number of cache slots.
    pub fn cache_slots(&self) -> usize {
        self.cache.len()
    }

    /// Commits, then empties the metadata cache (for cold-cache measurements).
    pub fn drop_cache(&mut self) -> Result<()> {
        self.flush()?;
        self.cache.clear();
        Ok(())
    }

    /// Whether anything changed since the last commit.
    pub fn has_uncommitted_changes(&self) -> bool {
        self.changed
    }

    pub(crate) fn add_volume(
        &mut self,
        name: &str,
        root: u64,
        kind: VolumeKind,
        parent: u64,
    ) -> Result<VolumeId> {
        let id = self.sb.next_volume_id;
        self.sb.next_volume_id += 1;
        self.volumes.push(VolumeRecord {
            id,
            root,
            created: now(),
            parent,
            kind,
            name: name.to_string(),
        });
        self.volumes_dirty = true;
        self.changed = true;
        Ok(VolumeId(id))
    }

    pub(crate) fn check_new_name(&self, name: &str) -> Result<()> {
        check_name(name)?;
        if self.volumes.iter().any(|v| v.name == name) {
            return Err(Error::VolumeExists(name.to_string()));
        }
        if self.volumes.len() >= MAX_VOLUMES as usize {
            return Err(Error::Invalid(format!(
                "the image already holds {MAX_VOLUMES} volumes"
            )));
        }
        Ok(())
    }

    pub(crate) fn take_scratch(&mut self) -> Box<[u8; BLOCK]> {
        self.pool.pop().unwrap_or_else(|| Box::new([0u8; BLOCK]))
    }

    pub(crate) fn give_scratch(&mut self, b: Box<[u8; BLOCK]>) {
        self.pool.push(b);
    }

    /// Commits: makes every change and every completed data write durable.
    ///
    /// The caller must not have data IO in flight to offsets this image handed out: a commit
    /// may make blocks freed in the epoch reusable.
    pub fn flush(&mut self) -> Result<()> {
        self.guard(|img| img.commit())
    }

    pub(crate) fn commit(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        if !self.changed {
            return self
                .backing
                .flush()
                .map_err(|e| Error::io("syncing the store", e));
        }
        // The volume table moves to new blocks; the old ones are freed with this commit.
        let mut table_blocks = Vec::new();
        if self.volumes_dirty {
            let n = self.volumes.len().div_ceil(VOLUMES_PER_BLOCK);
            for _ in 0..n {
                table_blocks.push(self.alloc_meta()?);
            }
            for m in std::mem::take(&mut self.volume_blocks) {
                self.free_machine(m, 1);
            }
        }
        loop {
            self.prepare_allocators()?;
            // Write dirty nodes, children before parents.
            while let Some(s) = self.cache.lowest_dirty() {
                self.writeback(s)?;
            }
            // Writing moves nothing, so this holds at once; but never commit bits that are
            // not set or runs that are not cleared.
            if self.unsettled.is_empty()
                && self.cleared == (self.freed_machine.len(), self.freed_phys.len())
            {
                break;
            }
        }
        if self.volumes_dirty {
            let mut next = TreePtr::NULL;
            for (i, chunk) in self.volumes.chunks(VOLUMES_PER_BLOCK).enumerate().rev() {
                let b = encode_volume_block(i as u32, chunk, next);
                let m = table_blocks[i];
                self.backing
                    .write_at(&b, m << BLOCK_SHIFT)
                    .map_err(|e| Error::io("writing the volume table", e))?;
                next = TreePtr {
                    machine: m,
                    crc: format::crc32c(&b),
                };
            }
            self.sb.volumes = next;
            self.sb.volume_count = self.volumes.len() as u32;
            self.sb.volume_blocks = table_blocks.len() as u32;
        }
        self.backing
            .flush()
            .map_err(|e| Error::io("syncing the store", e))?;
        let copy = 1 - self.committed_copy;
        let mut sb = self.sb.clone();
        sb.generation += 1;
        sb.committed = now();
        sb.validate()
            .map_err(|e| e.within(format_args!("refusing to commit a bad superblock")))?;
        superblocks::write_commit(&self.backing, &sb, copy)?;
        // Durable: the blocks freed in this epoch may be reused, and given back to the store.
        self.sb = sb;
        self.committed_copy = copy;
        if self.volumes_dirty {
            self.volume_blocks = table_blocks;
            self.volumes_dirty = false;
        }
        self.release_freed();
        self.fresh.clear();
        self.cache.end_epoch();
        self.changed = false;
        Ok(())
    }

    /// Gives the runs freed in the epoch back to the store. Only runs of at least
    /// [`PUNCH_MIN_BLOCKS`] are worth it: each is a system call that costs a file system
    /// journal update, and small runs (mostly the metadata blocks every commit moves) are
    /// reused by the allocator soon anyway.
    fn release_freed(&mut self) {
        self.freed_machine.sort_unstable();
        let mut run: Option<(u64, u64)> = None;
        let runs = std::mem::take(&mut self.freed_machine);
        let punch = |b: &B, (rs, rl): (u64, u64)| {
            if rl >= PUNCH_MIN_BLOCKS {
                let _ = b.discard(rs << BLOCK_SHIFT, rl << BLOCK_SHIFT);
            }
        };
        for &(s, l) in &runs {
            run = match run {
                Some((rs, rl)) if rs + rl == s => Some((rs, rl + l)),
                Some(r) => {
                    punch(&self.backing, r);
                    Some((s, l))
                }
                None => Some((s, l)),
            };
        }
        if let Some(r) = run {
            punch(&self.backing, r);
        }
        self.freed_machine = runs;
        self.freed_machine.clear();
        self.freed_phys.clear();
        self.freed_sorted = 0;
        self.quarantine = false;
        self.cleared = (0, 0);
    }

    /// Levels of `tree`.
    pub(crate) fn tree_levels(&self, t: Tree) -> u8 {
        match t {
            Tree::P2m => self.sb.p2m_levels,
            Tree::Mfree => self.sb.mfree_levels,
            Tree::Pfree => self.sb.pfree_levels,
        }
    }

    pub(crate) fn tree_levels_mut(&mut self, t: Tree) -> &mut u8 {
        match t {
            Tree::P2m => &mut self.sb.p2m_levels,
            Tree::Mfree => &mut self.sb.mfree_levels,
            Tree::Pfree => &mut self.sb.pfree_levels,
        }
    }

    pub(crate) fn root_ptr(&self, t: Tree) -> TreePtr {
        match t {
            Tree::P2m => self.sb.p2m_root,
            Tree::Mfree => self.sb.mfree_root,
            Tree::Pfree => self.sb.pfree_root,
        }
    }

    pub(crate) fn root_ptr_mut(&mut self, t: Tree) -> &mut TreePtr {
        match t {
            Tree::P2m => &mut self.sb.p2m_root,
            Tree::Mfree => &mut self.sb.mfree_root,
            Tree::Pfree => &mut self.sb.pfree_root,
        }
    }

    pub(crate) fn leaf_bits(t: Tree) -> u32 {
        match t {
            Tree::P2m => P2M_LEAF_BITS,
            Tree::Mfree | Tree::Pfree => BITMAP_LEAF_BITS,
        }
    }
}

impl<B: Backing> std::fmt::Debug for Image<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("label", &self.label)
            .field("generation", &self.sb.generation)
            .field("volumes", &self.volumes.len())
            .field("read_only", &self.read_only)
            .finish()
    }
}
