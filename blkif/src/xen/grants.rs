//! How a Xen ring reaches its requests' pages: [`XenGrants`], one per ring, in one of three
//! modes chosen per ring from what was negotiated ([`GrantMode`]):
//!
//! - **persistent** (the frontend and tapback both wrote `feature-persistent = 1`): every
//!   grant stays mapped, writable, for the ring's life ([`super::persistent`]); a batch's new
//!   grants are mapped with one map call. Pages stay mapped after the IO, so the IO may be
//!   direct. A request that finds the cache full (a frontend using more grants than the ring
//!   can hold at once) is mapped for its IO only, as in map mode;
//! - **map**: each request's pages are mapped for its IO only, read-only for a write. A
//!   batch's requests are mapped with one map call (one per direction), and each request's
//!   pages are unmapped as soon as it is done, before it is answered: the frontend ends its
//!   grant access when it sees the response. Buffered IO only ([`Memory::UnmappedAfterIo`]);
//! - **copy**: no mapping; each request slot owns bounce pages, one grant-copy call copies a
//!   batch's write data in before the IO, and one copies a batch's read data out after it.
//!
//! The entries (one per request in flight) and every scratch buffer are preallocated: the
//! request path allocates nothing but the persistent cache's bookkeeping of new grants.

use std::io;

use super::gntdev::{CopySegment, Gntdev, GrantDevice, MappedGrants, MAX_BATCH};
use super::persistent::{PersistentGrants, Stamp};
use super::DomId;
use crate::mmap::Mapping;
use crate::protocol::{GrantRef, Segment, MAX_INDIRECT_PAGES_PER_REQUEST, PAGE_SIZE, SECTOR_SIZE};
use crate::request::Problem;
use crate::transport::{GrantMapper, MapHandle, Memory};

/// How request pages are reached (see the module doc). `map` or `copy` is what tapback is
/// configured with for frontends without persistent grants; `persistent` is negotiated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GrantMode {
    /// Map each request's pages for its IO, and do (buffered) IO into them.
    #[default]
    Map,
    /// Grant-copy through bounce pages.
    Copy,
    /// Keep every grant mapped for the ring's life (negotiated `feature-persistent`).
    Persistent,
}

impl GrantMode {
    /// The name used on command lines and in listings.
    pub fn name(self) -> &'static str {
        match self {
            GrantMode::Map => "map",
            GrantMode::Copy => "copy",
            GrantMode::Persistent => "persistent",
        }
    }
}

impl std::fmt::Display for GrantMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for GrantMode {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "map" => Ok(GrantMode::Map),
            "copy" => Ok(GrantMode::Copy),
            "persistent" => Ok(GrantMode::Persistent),
            _ => Err(crate::Error::GrantMode(s.chars().take(64).collect())),
        }
    }
}

/// Where the IO of a persistent-mode request goes (the VBD setting `--persistent-io`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PersistentIo {
    /// Through bounce pages of the ring's own: the segments' bytes are copied from the
    /// persistent pages before a write and to them after a read, and the IO (direct where the
    /// image takes it) reaches only tapdisk's memory: a write's data is read from the guest
    /// once, and no IO pins a foreign page (`docs/xen.md`).
    #[default]
    Staged,
    /// On the persistently mapped guest pages themselves (no copy).
    Direct,
}

/// What a ring's grant access did, for statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrantCounters {
    /// The ring's mode.
    pub mode: GrantMode,
    /// Persistent mode: where its IO goes.
    pub persistent_io: PersistentIo,
    /// Persistent: segments whose grant was mapped already.
    pub hits: u64,
    /// Persistent: grants mapped into the cache.
    pub misses: u64,
    /// Persistent: grants unmapped to make room for others.
    pub evictions: u64,
    /// Requests whose pages were mapped for their IO only (every request in map mode; in
    /// persistent mode, those that found the cache full).
    pub transient: u64,
    /// Map calls (`IOCTL_GNTDEV_MAP_GRANT_REF` + `mmap`), the ring's own pages excluded.
    pub map_calls: u64,
    /// Grant-copy calls.
    pub copy_calls: u64,
    /// Persistent: pages mapped now.
    pub mapped_pages: u64,
    /// Persistent: most grants kept.
    pub capacity: u64,
}

/// Where one request's pages are.
enum Held<M> {
    /// No request.
    Free,
    /// To be mapped for its IO by the next `map_queued` (map mode, or a persistent request
    /// that found the cache full).
    Queued,
    /// A copy-mode write whose data the next `map_queued` copies in.
    CopyIn,
    /// Mapped for its IO, by a map call of its own.
    Own(M),
    /// Mapped for its IO, as pages `first..first + n` of a batch's map call.
    Batch { chunk: u32, first: u32 },
    /// Its grants are in the persistent cache (ids in the entry).
    Cached,
    /// Copy mode: its data is (or will be) in its bounce pages.
    Bounce,
    /// It cannot be mapped.
    Failed(Problem),
}

struct Entry<M> {
    held: Held<M>,
    n: usize,
    writable: bool,
    /// The request's segments (map and copy modes, and persistent fallbacks).
    segs: Box<[Segment]>,
    /// Persistent: the cache ids of its grants.
    ids: Box<[u32]>,
}

/// A batch's map call, shared by its requests until the last one is done.
struct BatchMap<M> {
    map: M,
    users: u32,
}

/// Grant access for one ring (see the module doc).
pub struct XenGrants<D: GrantDevice = Gntdev> {
    domid: DomId,
    mode: GrantMode,
    entries: Box<[Entry<D::Map>]>,
    free: Vec<u32>,
    /// Entries queued for the next `map_queued`.
    queued: Vec<u32>,
    /// Most segments one request may carry (direct or indirect).
    max_segs: usize,
    /// Scratch: grant references of one map call, and the entries they belong to.
    refs: Vec<GrantRef>,
    members: Vec<u32>,
    /// Scratch: one grant-copy call, and the entry of each of its segments.
    ops: Vec<CopySegment>,
    op_entry: Vec<u32>,
    /// Copy mode, and staged persistent mode: `max_segs` bounce pages per entry (touched
    /// lazily).
    bounce: Option<Mapping>,
    /// Persistent mode: IO goes through the bounce pages, the data copied from the persistent
    /// pages before a write and to them after a read (see [`XenGrants::new`]).
    stage: bool,
    batches: Vec<Option<BatchMap<D::Map>>>,
    free_batches: Vec<u32>,
    cache: Option<PersistentGrants<D::Map>>,
    counters: GrantCounters,
    /// Last, so that every mapping above is released before the device closes.
    dev: D,
}

impl<D: GrantDevice> std::fmt::Debug for XenGrants<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenGrants")
            .field("domid", &self.domid)
            .field("mode", &self.mode)
            .field("entries", &self.entries.len())
            .finish()
    }
}

fn anon_pages(pages: usize) -> io::Result<Mapping> {
    let len = pages * PAGE_SIZE;
    // A memfd gives a shared, page-aligned, lazily populated buffer through the same RAII type.
    let fd = nix::sys::memfd::memfd_create(
        c"tapdisk-bounce",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    nix::unistd::ftruncate(&fd, len as i64).map_err(io::Error::from)?;
    Mapping::map_shared(std::os::fd::AsFd::as_fd(&fd), len)
}

/// The persistent grants a ring of `slots` requests of up to `max_segs` segments may use at
/// once: every segment of every request, and the pages of their indirect descriptors.
pub fn ring_capacity(slots: u32, max_segs: usize) -> u32 {
    let indirect = max_segs
        .div_ceil(crate::protocol::SEGMENTS_PER_INDIRECT_FRAME)
        .min(MAX_INDIRECT_PAGES_PER_REQUEST);
    let per = if max_segs > crate::protocol::MAX_SEGMENTS_PER_REQUEST {
        max_segs + indirect
    } else {
        max_segs
    };
    (slots as usize).saturating_mul(per).min(u32::MAX as usize) as u32
}

impl<D: GrantDevice> XenGrants<D> {
    /// Grant access to `domid`'s pages for a ring of `slots` requests of at most `max_segs`
    /// segments each. In persistent mode the cache keeps at most `cache_cap` grants (None:
    /// the ring's capacity, [`ring_capacity`]) and the IO goes where `persistent_io` says.
    pub fn new(
        domid: DomId,
        mode: GrantMode,
        slots: u32,
        max_segs: usize,
        cache_cap: Option<u32>,
        persistent_io: PersistentIo,
        dev: D,
    ) -> io::Result<Self> {
        let n = slots as usize;
        let max_segs = max_segs.clamp(1, MAX_BATCH);
        let copy = mode == GrantMode::Copy;
        let persistent = mode == GrantMode::Persistent;
        let stage = persistent && persistent_io == PersistentIo::Staged;
        let bounce = if copy || stage {
            Some(anon_pages(n * max_segs)?)
        } else {
            None
        };
        let cache = persistent.then(|| {
            let full = ring_capacity(slots, max_segs);
            PersistentGrants::new(cache_cap.map_or(full, |c| c.min(full)))
        });
        let zeroed_segs = |k: usize| {
            // SAFETY: `Segment` is plain integers; all-zero bytes are a valid value. (A zeroed
            // allocation is only touched, page by page, as it is used.)
            unsafe { Box::<[Segment]>::new_zeroed_slice(k).assume_init() }
        };
        let zeroed_ids = |k: usize| {
            // SAFETY: integers: all-zero bytes are valid.
            unsafe { Box::<[u32]>::new_zeroed_slice(k).assume_init() }
        };
        let ops_cap = if copy { n * max_segs } else { 0 };
        Ok(XenGrants {
            domid,
            mode,
            entries: (0..n)
                .map(|_| Entry {
                    held: Held::Free,
                    n: 0,
                    writable: false,
                    segs: zeroed_segs(max_segs),
                    ids: zeroed_ids(if persistent { max_segs } else { 0 }),
                })
                .collect(),
            free: (0..n as u32).rev().collect(),
            queued: Vec::with_capacity(n),
            max_segs,
            refs: Vec::with_capacity(MAX_BATCH),
            members: Vec::with_capacity(n),
            ops: Vec::with_capacity(ops_cap),
            op_entry: Vec::with_capacity(ops_cap),
            bounce,
            stage,
            batches: Vec::with_capacity(n),
            free_batches: Vec::with_capacity(n),
            cache,
            counters: GrantCounters {
                mode,
                persistent_io,
                ..GrantCounters::default()
            },
            dev,
        })
    }

    /// How request pages are reached.
    pub fn mode(&self) -> GrantMode {
        self.mode
    }

    /// The grant device.
    pub fn device(&self) -> &D {
        &self.dev
    }

    /// What this ring's grant access did so far.
    pub fn counters(&self) -> GrantCounters {
        let mut c = self.counters;
        if let Some(cache) = &self.cache {
            let k = cache.counts();
            c.hits = k.hits;
            c.misses = k.misses;
            c.evictions = k.evictions;
            c.map_calls += k.map_calls;
            c.mapped_pages = u64::from(cache.mapped());
            c.capacity = u64::from(cache.capacity());
        }
        c
    }

    fn bounce_page(&self, entry: usize, i: usize) -> *mut u8 {
        let b = self.bounce.as_ref().map(|m| m.ptr().as_ptr());
        let base = b.unwrap_or(std::ptr::null_mut());
        // SAFETY: entry < entries and i < max_segs, so the page is inside the bounce mapping
        // of entries * max_segs pages (only used in copy mode).
        unsafe { base.add((entry * self.max_segs + i) * PAGE_SIZE) }
    }

    /// Staged persistent mode: copies the bytes of entry `e`'s segments between its persistent
    /// pages and its bounce pages (to the persistent pages when `to_guest`).
    fn stage_copy(&self, e: usize, to_guest: bool) -> Result<(), Problem> {
        let ent = &self.entries[e];
        let Some(cache) = self.cache.as_ref() else {
            return Err(Problem::BadGrant(ent.segs[0].gref));
        };
        for i in 0..ent.n {
            let s = ent.segs[i];
            let page = cache.addr(ent.ids[i]).ok_or(Problem::BadGrant(s.gref))?;
            let off = usize::from(s.first_sect) * SECTOR_SIZE as usize;
            let len = usize::from(s.last_sect - s.first_sect + 1) * SECTOR_SIZE as usize;
            // SAFETY: the segment was validated (first_sect <= last_sect < 8), so off + len <=
            // 4096 and both ranges lie inside one page: `page` is a persistent page mapped for
            // the ring's life, the bounce page is entry e's own, and no IO of this entry is in
            // flight (before its write is submitted, after its read completed). The guest may
            // write its page meanwhile: that changes the bytes, nothing else.
            unsafe {
                let (guest, local) = (page.add(off), self.bounce_page(e, i).add(off));
                if to_guest {
                    std::ptr::copy_nonoverlapping(local, guest, len);
                } else {
                    std::ptr::copy_nonoverlapping(guest, local, len);
                }
            }
        }
        Ok(())
    }

    /// Adds the grant copies of entry `e`'s segments (guest to bounce pages, or back) to
    /// the scratch call.
    fn push_copies(&mut self, e: usize, to_guest: bool) {
        for i in 0..self.entries[e].n {
            let s = self.entries[e].segs[i];
            let off = u16::from(s.first_sect) * SECTOR_SIZE as u16;
            let len = u16::from(s.last_sect - s.first_sect + 1) * SECTOR_SIZE as u16;
            // SAFETY: off < 4096, so the pointer stays inside bounce page i.
            let local = unsafe { self.bounce_page(e, i).add(usize::from(off)) };
            self.ops.push(if to_guest {
                CopySegment::to_grant(local, s.gref, off, self.domid, len)
            } else {
                CopySegment::from_grant(s.gref, off, self.domid, local, len)
            });
            self.op_entry.push(e as u32);
        }
    }

    /// Runs the scratch grant-copy call; each entry with a failed segment gets `Err` through
    /// `failed(entry, gref)`.
    fn run_copies(&mut self, mut failed: impl FnMut(&mut Self, usize, GrantRef)) {
        if self.ops.is_empty() {
            return;
        }
        self.counters.copy_calls += 1;
        // SAFETY: every local address is inside an entry's bounce pages, which live as long
        // as `self` and which no IO touches while the copy runs (each entry's request is not
        // in flight: its IO has not started, or has completed).
        let all = unsafe { self.dev.copy(&mut self.ops) }.is_err();
        let mut last = u32::MAX;
        for k in 0..self.ops.len() {
            let e = self.op_entry[k];
            if (all || self.ops[k].status() != 0) && e != last {
                let gref = self.entries[e as usize].segs[k - self.first_op_of(k)].gref;
                failed(self, e as usize, gref);
                last = e;
            }
        }
        self.ops.clear();
        self.op_entry.clear();
    }

    /// Index of the first scratch op of the entry op `k` belongs to.
    fn first_op_of(&self, k: usize) -> usize {
        let e = self.op_entry[k];
        let mut j = k;
        while j > 0 && self.op_entry[j - 1] == e {
            j -= 1;
        }
        j
    }

    /// Maps the queued entries whose direction is `writable`, in as few map calls as the
    /// batch limit allows; an entry whose call fails is retried alone.
    fn map_queued_dir(&mut self, writable: bool) {
        self.members.clear();
        self.refs.clear();
        for qi in 0..self.queued.len() {
            let e = self.queued[qi] as usize;
            let ent = &self.entries[e];
            if !matches!(ent.held, Held::Queued) || ent.writable != writable {
                continue;
            }
            if self.refs.len() + ent.n > MAX_BATCH {
                self.map_members(writable);
            }
            let ent = &self.entries[e];
            self.refs.extend(ent.segs[..ent.n].iter().map(|s| s.gref));
            self.members.push(e as u32);
        }
        self.map_members(writable);
    }

    /// One map call for `members` (their grants in `refs`).
    fn map_members(&mut self, writable: bool) {
        if self.members.is_empty() {
            return;
        }
        self.counters.map_calls += 1;
        match self.dev.map(self.domid, &self.refs, writable) {
            Ok(map) => {
                let b = BatchMap {
                    map,
                    users: self.members.len() as u32,
                };
                let chunk = match self.free_batches.pop() {
                    Some(c) => {
                        self.batches[c as usize] = Some(b);
                        c
                    }
                    None => {
                        self.batches.push(Some(b));
                        (self.batches.len() - 1) as u32
                    }
                };
                let mut first = 0u32;
                for k in 0..self.members.len() {
                    let ent = &mut self.entries[self.members[k] as usize];
                    ent.held = Held::Batch { chunk, first };
                    first += ent.n as u32;
                }
            }
            Err(_) => {
                // Find the bad request(s): each alone.
                for k in 0..self.members.len() {
                    let e = self.members[k] as usize;
                    let n = self.entries[e].n;
                    self.refs.clear();
                    let segs = &self.entries[e].segs[..n];
                    self.refs.extend(segs.iter().map(|s| s.gref));
                    self.counters.map_calls += 1;
                    self.entries[e].held = match self.dev.map(self.domid, &self.refs, writable) {
                        Ok(m) => Held::Own(m),
                        Err(_) => Held::Failed(Problem::BadGrant(self.entries[e].segs[0].gref)),
                    };
                }
            }
        }
        self.members.clear();
        self.refs.clear();
    }

    /// Releases entry `e`'s pages (the request is done; in copy mode its read data was copied
    /// out already). `at` is the batch's persistent-cache stamp, read at the first release
    /// that needs it.
    fn release(&mut self, e: usize, at: &mut Option<Stamp>) {
        let held = std::mem::replace(&mut self.entries[e].held, Held::Free);
        match held {
            Held::Own(m) => drop(m),
            Held::Batch { chunk, first } => {
                let n = self.entries[e].n;
                let mut done = false;
                if let Some(Some(b)) = self.batches.get_mut(chunk as usize) {
                    b.users -= 1;
                    if b.users == 0 {
                        done = true;
                    } else {
                        // Unmapped now, before the request is answered; on failure the pages
                        // stay mapped until the batch's last request is done.
                        let _ = b.map.release(first as usize, n);
                    }
                }
                if done {
                    self.batches[chunk as usize] = None;
                    self.free_batches.push(chunk);
                }
            }
            Held::Cached => {
                if let Some(cache) = self.cache.as_mut() {
                    let at = *at.get_or_insert_with(|| cache.stamp());
                    for &id in &self.entries[e].ids[..self.entries[e].n] {
                        cache.release(id, at);
                    }
                }
            }
            Held::Free | Held::Queued | Held::CopyIn | Held::Bounce | Held::Failed(_) => {}
        }
        self.free.push(e as u32);
    }

    fn entry_of(&self, handle: MapHandle) -> Option<usize> {
        let e = handle.0 as usize;
        match self.entries.get(e)?.held {
            Held::Free => None,
            _ => Some(e),
        }
    }
}

impl<D: GrantDevice> GrantMapper for XenGrants<D> {
    fn map(
        &mut self,
        segs: &[Segment],
        writable: bool,
        addrs: &mut [*mut u8],
    ) -> Result<MapHandle, Problem> {
        let h = self.queue(segs, writable)?;
        self.map_queued();
        match self.addrs(h, segs, addrs) {
            Ok(()) => Ok(h),
            Err(p) => {
                let _ = self.unmap(h);
                Err(p)
            }
        }
    }

    fn queue(&mut self, segs: &[Segment], writable: bool) -> Result<MapHandle, Problem> {
        let n = segs.len();
        if n == 0 || n > self.max_segs {
            return Err(Problem::TooManySegments {
                got: n,
                max: self.max_segs,
            });
        }
        let Some(e) = self.free.pop() else {
            // More requests in flight than the ring has slots: the ring loop never lets it.
            return Err(Problem::BadGrant(segs[0].gref));
        };
        let ei = e as usize;
        {
            let ent = &mut self.entries[ei];
            ent.n = n;
            ent.writable = writable;
            ent.segs[..n].copy_from_slice(segs);
        }
        let held = match (self.mode, self.cache.as_mut()) {
            (GrantMode::Persistent, Some(cache)) => {
                let mut got = 0;
                for (i, s) in segs.iter().enumerate() {
                    match cache.acquire(s.gref) {
                        Some(id) => {
                            self.entries[ei].ids[i] = id;
                            got += 1;
                        }
                        None => break,
                    }
                }
                if got == n {
                    Held::Cached
                } else {
                    // The cache is full of grants in use or just used: this request's pages
                    // are mapped for its IO only.
                    let at = cache.stamp();
                    for &id in &self.entries[ei].ids[..got] {
                        cache.release(id, at);
                    }
                    self.counters.transient += 1;
                    self.queued.push(e);
                    Held::Queued
                }
            }
            (GrantMode::Copy, _) if !writable => {
                self.queued.push(e);
                Held::CopyIn
            }
            (GrantMode::Copy, _) => Held::Bounce,
            _ => {
                self.counters.transient += 1;
                self.queued.push(e);
                Held::Queued
            }
        };
        self.entries[ei].held = held;
        Ok(MapHandle(u64::from(e)))
    }

    fn map_queued(&mut self) {
        if let Some(cache) = self.cache.as_mut() {
            cache.map_pending(&self.dev, self.domid);
        }
        if self.queued.is_empty() {
            return;
        }
        if self.mode == GrantMode::Copy {
            for qi in 0..self.queued.len() {
                let e = self.queued[qi] as usize;
                if matches!(self.entries[e].held, Held::CopyIn) {
                    self.entries[e].held = Held::Bounce;
                    self.push_copies(e, false);
                }
            }
            self.run_copies(|g, e, gref| {
                g.entries[e].held = Held::Failed(Problem::BadGrant(gref));
            });
        } else {
            self.map_queued_dir(false);
            self.map_queued_dir(true);
        }
        self.queued.clear();
    }

    fn addrs(
        &mut self,
        handle: MapHandle,
        segs: &[Segment],
        addrs: &mut [*mut u8],
    ) -> Result<(), Problem> {
        let Some(e) = self.entry_of(handle) else {
            return Err(Problem::BadGrant(segs.first().map_or(0, |s| s.gref)));
        };
        let n = self.entries[e].n.min(addrs.len()).min(segs.len());
        let ent = &self.entries[e];
        match &ent.held {
            Held::Failed(p) => return Err(*p),
            Held::Own(m) => {
                for (i, a) in addrs[..n].iter_mut().enumerate() {
                    *a = m.page(i);
                }
            }
            Held::Batch { chunk, first } => {
                let Some(Some(b)) = self.batches.get(*chunk as usize) else {
                    return Err(Problem::BadGrant(segs[0].gref));
                };
                for (i, a) in addrs[..n].iter_mut().enumerate() {
                    *a = b.map.page(*first as usize + i);
                }
            }
            Held::Cached if self.stage => {
                if ent.writable {
                    // Nothing to copy in; every page must be there to copy out to.
                    let cache = self.cache.as_ref();
                    for i in 0..n {
                        cache
                            .and_then(|c| c.addr(ent.ids[i]))
                            .ok_or(Problem::BadGrant(ent.segs[i].gref))?;
                    }
                } else {
                    self.stage_copy(e, false)?;
                }
                for (i, a) in addrs[..n].iter_mut().enumerate() {
                    *a = self.bounce_page(e, i);
                }
            }
            Held::Cached => {
                let Some(cache) = self.cache.as_ref() else {
                    return Err(Problem::BadGrant(segs[0].gref));
                };
                for (i, a) in addrs[..n].iter_mut().enumerate() {
                    *a = cache
                        .addr(ent.ids[i])
                        .ok_or(Problem::BadGrant(ent.segs[i].gref))?;
                }
            }
            Held::Bounce => {
                for (i, a) in addrs[..n].iter_mut().enumerate() {
                    *a = self.bounce_page(e, i);
                }
            }
            Held::Free | Held::Queued | Held::CopyIn => {
                return Err(Problem::BadGrant(segs[0].gref));
            }
        }
        Ok(())
    }

    fn memory(&self, handle: MapHandle) -> Memory {
        match self.entries.get(handle.0 as usize).map(|e| &e.held) {
            Some(Held::Own(_) | Held::Batch { .. }) => Memory::UnmappedAfterIo,
            _ => Memory::Stable,
        }
    }

    fn unmap(&mut self, handle: MapHandle) -> Result<(), Problem> {
        let mut r = [Ok(())];
        self.unmap_batch(&[handle], &mut r);
        r[0]
    }

    fn unmap_batch(&mut self, handles: &[MapHandle], results: &mut [Result<(), Problem>]) {
        if self.mode == GrantMode::Copy {
            // One grant copy for every read's data.
            for h in handles {
                if let Some(e) = self.entry_of(*h) {
                    let ent = &self.entries[e];
                    if ent.writable && matches!(ent.held, Held::Bounce) {
                        self.push_copies(e, true);
                    }
                }
            }
            self.run_copies(|g, e, gref| {
                g.entries[e].held = Held::Failed(Problem::BadGrant(gref));
            });
        }
        // One clock read for the batch (the persistent cache stamps idle grants with it).
        let mut at = None;
        for (h, r) in handles.iter().zip(results.iter_mut()) {
            *r = match self.entry_of(*h) {
                None => Ok(()),
                Some(e) => {
                    // A staged read's data goes to the guest's persistent pages now.
                    let ent = &self.entries[e];
                    let staged = self.stage && ent.writable && matches!(ent.held, Held::Cached);
                    let copied = if staged {
                        self.stage_copy(e, true)
                    } else {
                        Ok(())
                    };
                    let st = match self.entries[e].held {
                        // A read whose data could not be copied back must not succeed.
                        Held::Failed(p) if self.entries[e].writable => Err(p),
                        _ => copied,
                    };
                    self.release(e, &mut at);
                    st
                }
            };
        }
    }
}

#[cfg(test)]
mod tests;
