//! Persistent grants: the grants a frontend reuses stay mapped for the life of its ring.
//!
//! A frontend and a backend that both write `feature-persistent = 1` (Linux's rule since 6.0:
//! each side advertises what it is configured for, and uses persistent grants only when the
//! other side advertised them too) agree that the frontend keeps granting the same pages, read
//! and write, and copies request data in and out of them itself. The backend then maps each
//! grant once, at its first use, and keeps it: a later request naming the same grant reference
//! finds its page mapped (a *hit*) and costs no map call, no unmap and no TLB shootdown.
//!
//! This cache holds those mappings for one ring:
//! - at most `cap` grants (the ring's capacity, requests x segments, indirect pages included,
//!   unless configured lower), looked up by grant reference in a hash map;
//! - grants seen for the first time in a batch are *pending* until [`PersistentGrants::map_pending`]
//!   maps them all in one map call (a call per [`super::gntdev::MAX_BATCH`] grants); a batch
//!   that fails is retried grant by grant, so only the bad grants fail their requests;
//! - a grant no request uses is *idle*, on an LRU list; when a new grant finds the cache full,
//!   the least recently used idle grant is unmapped to make room, as Linux blkback purges its
//!   least recently used grants. If none can go (all in use, or idle for less than
//!   [`PIN_GRACE`]), [`PersistentGrants::acquire`] says so and the caller maps that request's
//!   pages for its IO only;
//! - everything still mapped is unmapped when the cache is dropped, after the ring's last IO,
//!   and no sooner than [`PIN_GRACE`] after the last request released its grants.
//!
//! Why the grace: IO goes straight into these pages with O_DIRECT, and Linux posts a direct
//! IO's completion just before it drops its pins on the pages (the bio's pages are released
//! after the iocb completes). Unmapping a grant while a pin is still held would leave it mapped
//! (the kernel defers the unmap; the page-table entry is torn down under it and warns). Pages
//! unmapped after every request cannot take O_DIRECT for that reason; pages that stay mapped
//! can, as long as nothing is unmapped within moments of its last IO.
//!
//! The clock is read once per batch of releases ([`PersistentGrants::stamp`]), not once per
//! segment, and it is the kernel's coarse monotonic clock: where a dom0's clock source has no
//! vDSO (a PV dom0 whose TSC Xen does not call stable), every precise read is a system call,
//! and a clock read per segment was most of the ring thread's time on 128 KiB requests in the
//! rig. The coarse clock is read from the vDSO's data page on every clock source; it advances
//! once per kernel tick, so the grace is measured as [`PIN_GRACE`] plus one tick.
//!
//! One map call maps a batch of grants into one contiguous range; a single grant of it is
//! unmapped on eviction with [`MappedGrants::release`], and the range itself when its last
//! grant is gone.

use std::collections::HashMap;
use std::time::Duration;

use super::gntdev::{GrantDevice, MappedGrants, MAX_BATCH};
use super::DomId;
use crate::protocol::GrantRef;

/// How long after its last use an idle grant stays mapped at least (see the module doc).
pub const PIN_GRACE: Duration = Duration::from_millis(100);

const NONE: u32 = u32::MAX;

/// A moment on a cache's clock (coarse ns since the cache was made), read once for a batch of
/// releases with [`PersistentGrants::stamp`]. Taken after the batch's IO completed, so an
/// idle grant's grace never starts before its last IO ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stamp(u64);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Not a grant (on the free list).
    Free,
    /// In the index, waiting for the next map call.
    Pending,
    /// In the index and mapped.
    Mapped,
    /// Its map call failed; out of the index, freed when its last user releases it.
    Failed,
}

#[derive(Clone, Copy, Debug)]
struct Grant {
    gref: GrantRef,
    state: State,
    /// Which mapping holds its page, and where in it.
    chunk: u32,
    page: u32,
    /// Requests in flight using it.
    users: u32,
    /// LRU links (idle mapped grants only).
    prev: u32,
    next: u32,
    /// When it became idle (ns since the cache was made).
    idle_since: u64,
}

struct Chunk<M> {
    map: M,
    /// Grants of this mapping still in the cache.
    live: u32,
}

/// What the cache did, for statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheCounts {
    /// Segments whose grant was in the cache already.
    pub hits: u64,
    /// Grants that had to be mapped.
    pub misses: u64,
    /// Grants unmapped to make room for others.
    pub evictions: u64,
    /// Map calls.
    pub map_calls: u64,
}

/// The persistent grants of one ring (see the module doc).
pub struct PersistentGrants<M: MappedGrants> {
    index: HashMap<GrantRef, u32>,
    grants: Vec<Grant>,
    free: Vec<u32>,
    chunks: Vec<Option<Chunk<M>>>,
    free_chunks: Vec<u32>,
    /// Idle mapped grants, least recently used first.
    lru_head: u32,
    lru_tail: u32,
    /// Grants waiting for the next map call, in the order they were first seen.
    pending: Vec<u32>,
    /// Scratch for one map call.
    refs: Vec<GrantRef>,
    cap: u32,
    /// Grants in the index (pending and mapped).
    held: u32,
    /// Grants mapped.
    mapped: u32,
    /// The coarse clock when the cache was made (ns).
    t0: u64,
    /// How long a grant stays mapped at least after its last use: [`PIN_GRACE`] plus one
    /// tick of the coarse clock (ns).
    grace: u64,
    /// When a request last released its grants (ns since `t0`).
    last_release: u64,
    counts: CacheCounts,
}

impl<M: MappedGrants> std::fmt::Debug for PersistentGrants<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PersistentGrants")
            .field("cap", &self.cap)
            .field("mapped", &self.mapped)
            .field("held", &self.held)
            .finish()
    }
}

impl<M: MappedGrants> PersistentGrants<M> {
    /// A cache of at most `cap` grants (at least 1).
    pub fn new(cap: u32) -> Self {
        let cap = cap.max(1);
        PersistentGrants {
            index: HashMap::with_capacity(cap as usize),
            grants: Vec::with_capacity(cap as usize),
            free: Vec::with_capacity(cap as usize),
            chunks: Vec::new(),
            free_chunks: Vec::new(),
            lru_head: NONE,
            lru_tail: NONE,
            pending: Vec::with_capacity(cap as usize),
            refs: Vec::with_capacity(MAX_BATCH),
            cap,
            held: 0,
            mapped: 0,
            t0: coarse_ns(),
            grace: PIN_GRACE.as_nanos() as u64 + coarse_tick_ns(),
            last_release: 0,
            counts: CacheCounts::default(),
        }
    }

    /// Most grants kept.
    pub fn capacity(&self) -> u32 {
        self.cap
    }

    /// Grants mapped now.
    pub fn mapped(&self) -> u32 {
        self.mapped
    }

    /// What the cache did so far.
    pub fn counts(&self) -> CacheCounts {
        self.counts
    }

    fn now(&self) -> u64 {
        // Wrapping: the tests move `t0` back to age the cache.
        coarse_ns().wrapping_sub(self.t0)
    }

    /// Now, on this cache's clock: one read for a batch of [`PersistentGrants::release`]s.
    pub fn stamp(&self) -> Stamp {
        Stamp(self.now())
    }

    /// Takes grant `gref` for one use: found (a hit) or entered as pending (a miss, mapped by
    /// the next [`PersistentGrants::map_pending`]). None if the cache is full and no idle
    /// grant may be unmapped yet. The id returned goes back with [`PersistentGrants::release`].
    pub fn acquire(&mut self, gref: GrantRef) -> Option<u32> {
        if let Some(&id) = self.index.get(&gref) {
            let g = &mut self.grants[id as usize];
            g.users += 1;
            if g.users == 1 && g.state == State::Mapped {
                self.lru_unlink(id);
            }
            self.counts.hits += 1;
            return Some(id);
        }
        if self.held >= self.cap && !self.evict_one() {
            return None;
        }
        let g = Grant {
            gref,
            state: State::Pending,
            chunk: NONE,
            page: 0,
            users: 1,
            prev: NONE,
            next: NONE,
            idle_since: 0,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.grants[id as usize] = g;
                id
            }
            None => {
                self.grants.push(g);
                (self.grants.len() - 1) as u32
            }
        };
        self.index.insert(gref, id);
        self.pending.push(id);
        self.held += 1;
        self.counts.misses += 1;
        Some(id)
    }

    /// Gives back one use of grant `id` (taken by [`PersistentGrants::acquire`]) at `at`, a
    /// [`PersistentGrants::stamp`] read after the IO that used it completed.
    pub fn release(&mut self, id: u32, at: Stamp) {
        let now = at.0;
        self.last_release = self.last_release.max(now);
        let Some(g) = self.grants.get_mut(id as usize) else {
            return;
        };
        if g.users == 0 || g.state == State::Free {
            return;
        }
        g.users -= 1;
        if g.users > 0 {
            return;
        }
        match g.state {
            State::Mapped => {
                g.idle_since = now;
                self.lru_push(id);
            }
            State::Failed => self.free_grant(id),
            // Mapped (or failed) by the next map call, then idle.
            State::Pending | State::Free => {}
        }
    }

    /// The page of grant `id`, if it is mapped.
    pub fn addr(&self, id: u32) -> Option<*mut u8> {
        let g = self.grants.get(id as usize)?;
        if g.state != State::Mapped {
            return None;
        }
        let c = self.chunks.get(g.chunk as usize)?.as_ref()?;
        Some(c.map.page(g.page as usize))
    }

    /// Maps every pending grant of `domid`, writable: one map call per
    /// [`MAX_BATCH`] grants; a call that fails is retried grant by grant, and the grants that
    /// still fail are dropped from the cache (their users find no address).
    pub fn map_pending<D: GrantDevice<Map = M>>(&mut self, dev: &D, domid: DomId) {
        let mut pending = std::mem::take(&mut self.pending);
        for batch in pending.chunks(MAX_BATCH) {
            self.refs.clear();
            self.refs
                .extend(batch.iter().map(|&id| self.grants[id as usize].gref));
            self.counts.map_calls += 1;
            match dev.map(domid, &self.refs, true) {
                Ok(m) => self.add_chunk(m, batch),
                Err(_) => {
                    for &id in batch {
                        let gref = self.grants[id as usize].gref;
                        self.counts.map_calls += 1;
                        match dev.map(domid, &[gref], true) {
                            Ok(m) => self.add_chunk(m, &[id]),
                            Err(_) => self.fail(id),
                        }
                    }
                }
            }
        }
        pending.clear();
        self.pending = pending;
    }

    fn add_chunk(&mut self, map: M, ids: &[u32]) {
        let chunk = Chunk {
            map,
            live: ids.len() as u32,
        };
        let c = match self.free_chunks.pop() {
            Some(c) => {
                self.chunks[c as usize] = Some(chunk);
                c
            }
            None => {
                self.chunks.push(Some(chunk));
                (self.chunks.len() - 1) as u32
            }
        };
        let now = self.now();
        for (i, &id) in ids.iter().enumerate() {
            let g = &mut self.grants[id as usize];
            g.state = State::Mapped;
            g.chunk = c;
            g.page = i as u32;
            self.mapped += 1;
            if g.users == 0 {
                // Its only user gave up before the map call (a request that fell back).
                g.idle_since = now;
                self.lru_push(id);
            }
        }
    }

    fn fail(&mut self, id: u32) {
        let g = &mut self.grants[id as usize];
        let gref = g.gref;
        g.state = State::Failed;
        self.index.remove(&gref);
        self.held -= 1;
        if g.users == 0 {
            self.free_grant(id);
        }
    }

    fn free_grant(&mut self, id: u32) {
        self.grants[id as usize].state = State::Free;
        self.free.push(id);
    }

    /// Unmaps the least recently used idle grant if it has been idle for [`PIN_GRACE`].
    fn evict_one(&mut self) -> bool {
        let id = self.lru_head;
        if id == NONE {
            return false;
        }
        let g = self.grants[id as usize];
        if self.now().saturating_sub(g.idle_since) < self.grace {
            return false;
        }
        self.lru_unlink(id);
        self.index.remove(&g.gref);
        self.held -= 1;
        self.mapped -= 1;
        self.counts.evictions += 1;
        if let Some(slot) = self.chunks.get_mut(g.chunk as usize) {
            if let Some(c) = slot.as_mut() {
                c.live -= 1;
                if c.live == 0 {
                    // The last grant of its mapping: drop it whole.
                    *slot = None;
                    self.free_chunks.push(g.chunk);
                } else {
                    // On failure the page stays mapped until its mapping goes: harmless.
                    let _ = c.map.release(g.page as usize, 1);
                }
            }
        }
        self.free_grant(id);
        true
    }

    fn lru_push(&mut self, id: u32) {
        let tail = self.lru_tail;
        {
            let g = &mut self.grants[id as usize];
            g.prev = tail;
            g.next = NONE;
        }
        if tail == NONE {
            self.lru_head = id;
        } else {
            self.grants[tail as usize].next = id;
        }
        self.lru_tail = id;
    }

    fn lru_unlink(&mut self, id: u32) {
        let (prev, next) = {
            let g = &self.grants[id as usize];
            (g.prev, g.next)
        };
        if prev == NONE {
            self.lru_head = next;
        } else {
            self.grants[prev as usize].next = next;
        }
        if next == NONE {
            self.lru_tail = prev;
        } else {
            self.grants[next as usize].prev = prev;
        }
        let g = &mut self.grants[id as usize];
        g.prev = NONE;
        g.next = NONE;
    }
}

impl<M: MappedGrants> Drop for PersistentGrants<M> {
    fn drop(&mut self) {
        // The ring's IO is over (its loop drained it before dropping the transport); let the
        // last completions drop their page pins before the grants are unmapped.
        if self.mapped > 0 {
            let idle = self.now().saturating_sub(self.last_release);
            if let Some(wait) = self.grace.checked_sub(idle) {
                std::thread::sleep(Duration::from_nanos(wait));
            }
        }
        // The chunks' drops unmap what is left.
        self.chunks.clear();
    }
}

/// CLOCK_MONOTONIC_COARSE in ns: the kernel's time at its last tick, read from the vDSO's data
/// page without a system call whatever the clock source.
fn coarse_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through the pointer, a live local; the clock
    // id is a constant every Linux since 2.6.32 knows, so it cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    timespec_ns(&ts)
}

/// How far the coarse clock may lag the precise one: one kernel tick (ns). 10 ms (HZ=100,
/// the coarsest Linux tick) if the kernel does not say.
fn coarse_tick_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_getres writes one timespec through the pointer, a live local.
    let r = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    match timespec_ns(&ts) {
        t if r == 0 && t > 0 => t,
        _ => 10_000_000,
    }
}

/// A timespec the kernel wrote, in ns (negative fields, which it never writes, count as 0).
fn timespec_ns(ts: &libc::timespec) -> u64 {
    let s = u64::try_from(ts.tv_sec).unwrap_or(0);
    let ns = u64::try_from(ts.tv_nsec).unwrap_or(0);
    s * 1_000_000_000 + ns
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xen::testing::FakeGntdev;

    struct Guest {
        mem: Vec<u8>,
    }

    impl Guest {
        fn new(pages: usize) -> Guest {
            Guest {
                mem: vec![0u8; pages * 4096],
            }
        }
        fn dev(&mut self) -> FakeGntdev {
            // SAFETY: the buffer outlives the device in every test below (declared first).
            unsafe { FakeGntdev::new(self.mem.as_mut_ptr(), (self.mem.len() / 4096) as u32) }
        }
    }

    fn age_past_grace<M: MappedGrants>(c: &mut PersistentGrants<M>) {
        c.t0 = c.t0.wrapping_sub(2 * c.grace);
        for g in c.grants.iter_mut() {
            g.idle_since = 0;
        }
    }

    #[test]
    fn hits_after_the_first_use_one_map_call_per_batch() {
        let mut guest = Guest::new(64);
        let dev = guest.dev();
        let counts = dev.counts();
        let mut c = PersistentGrants::new(16);
        let ids: Vec<u32> = (0..8).map(|g| c.acquire(g).unwrap()).collect();
        assert!(c.addr(ids[0]).is_none(), "pending until mapped");
        c.map_pending(&dev, 1);
        assert_eq!(
            counts.map_calls.load(std::sync::atomic::Ordering::SeqCst),
            1
        );
        assert_eq!((c.mapped(), counts.live()), (8, 8));
        for &id in &ids {
            assert!(c.addr(id).is_some());
            c.release(id, c.stamp());
        }
        // Used again: hits, no map call.
        let again: Vec<u32> = (0..8).map(|g| c.acquire(g).unwrap()).collect();
        c.map_pending(&dev, 1);
        assert_eq!(
            counts.map_calls.load(std::sync::atomic::Ordering::SeqCst),
            1
        );
        assert_eq!(again, ids);
        let k = c.counts();
        assert_eq!((k.hits, k.misses, k.evictions), (8, 8, 0));
        for id in again {
            c.release(id, c.stamp());
        }
        drop(c);
        assert_eq!(counts.live(), 0, "grants left mapped after the cache went");
    }

    #[test]
    fn a_full_cache_evicts_the_least_recently_used_idle_grant() {
        let mut guest = Guest::new(64);
        let dev = guest.dev();
        let counts = dev.counts();
        let mut c = PersistentGrants::new(4);
        for g in 0..4 {
            let id = c.acquire(g).unwrap();
            c.map_pending(&dev, 1);
            c.release(id, c.stamp());
        }
        // Grant 0 used again: grant 1 is now the least recently used.
        let id0 = c.acquire(0).unwrap();
        c.release(id0, c.stamp());
        // Idle for less than the grace: nothing may go yet.
        assert!(c.acquire(10).is_none());
        age_past_grace(&mut c);
        let id = c.acquire(10).unwrap();
        c.map_pending(&dev, 1);
        assert_eq!(c.counts().evictions, 1);
        assert!(!c.index.contains_key(&1), "grant 1 (LRU) evicted");
        assert!(c.index.contains_key(&0) && c.index.contains_key(&10));
        assert_eq!((c.mapped(), counts.live()), (4, 4));
        c.release(id, c.stamp());
        drop(c);
        assert_eq!(counts.live(), 0);
    }

    #[test]
    fn grants_in_use_are_never_evicted() {
        let mut guest = Guest::new(64);
        let dev = guest.dev();
        let mut c = PersistentGrants::new(2);
        let a = c.acquire(1).unwrap();
        let b = c.acquire(2).unwrap();
        c.map_pending(&dev, 1);
        age_past_grace(&mut c);
        assert!(c.acquire(3).is_none(), "both in use: full");
        c.release(a, c.stamp());
        age_past_grace(&mut c);
        assert!(c.acquire(3).is_some());
        assert!(c.index.contains_key(&2) && !c.index.contains_key(&1));
        let _ = b;
    }

    #[test]
    fn a_bad_grant_fails_alone() {
        let mut guest = Guest::new(8);
        let dev = guest.dev();
        let counts = dev.counts();
        let mut c = PersistentGrants::new(16);
        let good = c.acquire(3).unwrap();
        let bad = c.acquire(100).unwrap(); // never granted
        c.map_pending(&dev, 1);
        assert!(c.addr(good).is_some());
        assert!(c.addr(bad).is_none());
        c.release(bad, c.stamp());
        c.release(good, c.stamp());
        // The bad one is not cached: a later use tries again.
        let again = c.acquire(100).unwrap();
        assert_eq!(c.counts().misses, 3);
        c.release(again, c.stamp());
        c.map_pending(&dev, 1);
        drop(c);
        assert_eq!(counts.live(), 0);
    }

    #[test]
    fn the_same_grant_twice_in_a_batch_is_mapped_once() {
        let mut guest = Guest::new(8);
        let dev = guest.dev();
        let counts = dev.counts();
        let mut c = PersistentGrants::new(16);
        let a = c.acquire(5).unwrap();
        let b = c.acquire(5).unwrap();
        assert_eq!(a, b);
        c.map_pending(&dev, 1);
        assert_eq!(counts.live(), 1);
        c.release(a, c.stamp());
        assert!(c.lru_head == NONE, "still used once");
        c.release(b, c.stamp());
        assert_eq!(c.lru_head, a);
    }

    #[test]
    fn eviction_of_part_of_a_mapping_keeps_the_rest() {
        let mut guest = Guest::new(16);
        let dev = guest.dev();
        let counts = dev.counts();
        let mut c = PersistentGrants::new(3);
        let ids: Vec<u32> = (0..3).map(|g| c.acquire(g).unwrap()).collect();
        c.map_pending(&dev, 1);
        for &id in &ids {
            c.release(id, c.stamp());
        }
        age_past_grace(&mut c);
        let n = c.acquire(7).unwrap();
        c.map_pending(&dev, 1);
        // Grant 0 went; 1 and 2 still reach their pages through the first mapping.
        assert_eq!(counts.live(), 3);
        let id1 = c.acquire(1).unwrap();
        assert!(c.addr(id1).is_some());
        c.release(id1, c.stamp());
        c.release(n, c.stamp());
        drop(c);
        assert_eq!(counts.live(), 0);
    }
}
