//! XenGrants against the stand-in grant device: which calls each mode makes, what the
//! addresses are, and that nothing stays mapped.

use std::sync::atomic::Ordering;

use super::*;
use crate::xen::testing::FakeGntdev;

const PAGES: usize = 64;

struct Guest {
    mem: Vec<u8>,
}

impl Guest {
    fn new() -> Guest {
        let mut mem = vec![0u8; PAGES * PAGE_SIZE];
        for (p, chunk) in mem.chunks_mut(PAGE_SIZE).enumerate() {
            chunk.fill(p as u8);
        }
        Guest { mem }
    }

    fn page(&mut self, g: u32) -> *mut u8 {
        // SAFETY: tests only name grants below PAGES.
        unsafe { self.mem.as_mut_ptr().add(g as usize * PAGE_SIZE) }
    }

    /// Grants in `mode`; persistent IO on the guest's pages (direct), whose addresses the
    /// tests compare.
    fn grants(&mut self, mode: GrantMode, cap: Option<u32>) -> XenGrants<FakeGntdev> {
        self.grants_with(mode, cap, PersistentIo::Direct)
    }

    fn grants_with(
        &mut self,
        mode: GrantMode,
        cap: Option<u32>,
        pio: PersistentIo,
    ) -> XenGrants<FakeGntdev> {
        // SAFETY: every test declares the guest before the grants, so it outlives them.
        let dev = unsafe { FakeGntdev::new(self.mem.as_mut_ptr(), PAGES as u32) };
        XenGrants::new(1, mode, 8, 11, cap, pio, dev).unwrap()
    }
}

fn segs(grefs: &[u32]) -> Vec<Segment> {
    grefs
        .iter()
        .map(|&gref| Segment {
            gref,
            first_sect: 0,
            last_sect: 7,
            pad: 0,
        })
        .collect()
}

fn calls(g: &XenGrants<FakeGntdev>) -> u64 {
    g.device().counts().map_calls.load(Ordering::SeqCst)
}

#[test]
fn persistent_grants_are_mapped_once_per_batch_and_then_hit() {
    let mut guest = Guest::new();
    let mut g = guest.grants(GrantMode::Persistent, None);
    let counts = g.device().counts();
    let reqs = [segs(&[1, 2, 3]), segs(&[4]), segs(&[2, 5])];
    let hs: Vec<MapHandle> = reqs.iter().map(|s| g.queue(s, true).unwrap()).collect();
    g.map_queued();
    assert_eq!(calls(&g), 1, "one map call for the batch");
    assert_eq!(counts.live(), 5, "grant 2 mapped once");
    let mut addrs = [std::ptr::null_mut(); 11];
    for (h, s) in hs.iter().zip(&reqs) {
        g.addrs(*h, s, &mut addrs).unwrap();
        for (a, sg) in addrs.iter().zip(s.iter()) {
            assert_eq!(*a, guest.page(sg.gref));
        }
        assert_eq!(g.memory(*h), Memory::Stable);
    }
    let mut res = vec![Ok(()); hs.len()];
    g.unmap_batch(&hs, &mut res);
    assert!(res.iter().all(|r| r.is_ok()));
    assert_eq!(counts.live(), 5, "persistent: still mapped after the IO");
    // The same grants again: no map call.
    let h = g.queue(&segs(&[3, 1]), false).unwrap();
    g.map_queued();
    g.addrs(h, &segs(&[3, 1]), &mut addrs).unwrap();
    assert_eq!(calls(&g), 1);
    g.unmap(h).unwrap();
    let c = g.counters();
    assert_eq!((c.hits, c.misses, c.mapped_pages), (3, 5, 5));
    assert_eq!(c.capacity, 8 * 11);
    drop(g);
    assert_eq!(counts.live(), 0, "grants left mapped after the ring went");
}

#[test]
fn map_mode_maps_a_batch_per_direction_and_unmaps_each_request_before_its_answer() {
    let mut guest = Guest::new();
    let mut g = guest.grants(GrantMode::Map, None);
    let counts = g.device().counts();
    let reads = [segs(&[1, 2]), segs(&[3])];
    let writes = [segs(&[7]), segs(&[8, 9, 10])];
    let hr: Vec<MapHandle> = reads.iter().map(|s| g.queue(s, true).unwrap()).collect();
    let hw: Vec<MapHandle> = writes.iter().map(|s| g.queue(s, false).unwrap()).collect();
    g.map_queued();
    assert_eq!(calls(&g), 2, "one map call per direction");
    assert_eq!(counts.live(), 7);
    let mut addrs = [std::ptr::null_mut(); 11];
    g.addrs(hw[1], &writes[1], &mut addrs).unwrap();
    assert_eq!(addrs[2], guest.page(10));
    assert_eq!(g.memory(hw[1]), Memory::UnmappedAfterIo);
    // Each request's pages go when it is done, whatever its batch-mates do.
    g.unmap(hr[0]).unwrap();
    assert_eq!(counts.live(), 5);
    g.unmap(hw[1]).unwrap();
    assert_eq!(counts.live(), 2);
    g.unmap(hr[1]).unwrap();
    g.unmap(hw[0]).unwrap();
    assert_eq!(counts.live(), 0);
    assert_eq!(g.counters().transient, 4);
}

#[test]
fn a_bad_grant_fails_only_its_request() {
    let mut guest = Guest::new();
    for mode in [GrantMode::Map, GrantMode::Persistent] {
        let mut g = guest.grants(mode, None);
        let counts = g.device().counts();
        let good = segs(&[1, 2]);
        let bad = segs(&[3, 900]);
        let hg = g.queue(&good, true).unwrap();
        let hb = g.queue(&bad, true).unwrap();
        g.map_queued();
        let mut addrs = [std::ptr::null_mut(); 11];
        assert!(g.addrs(hg, &good, &mut addrs).is_ok(), "{mode}");
        let e = g.addrs(hb, &bad, &mut addrs).unwrap_err();
        assert!(matches!(e, Problem::BadGrant(_)), "{mode}: {e}");
        let _ = g.unmap(hb);
        g.unmap(hg).unwrap();
        drop(g);
        assert_eq!(counts.live(), 0, "{mode}");
    }
}

#[test]
fn a_full_persistent_cache_maps_the_request_for_its_io_only() {
    let mut guest = Guest::new();
    let mut g = guest.grants(GrantMode::Persistent, Some(2));
    let counts = g.device().counts();
    let first = segs(&[1, 2]);
    let h1 = g.queue(&first, true).unwrap();
    // Grants 1 and 2 fill the cache and are in use: this one cannot join it.
    let second = segs(&[3, 4, 5]);
    let h2 = g.queue(&second, false).unwrap();
    g.map_queued();
    let mut addrs = [std::ptr::null_mut(); 11];
    g.addrs(h2, &second, &mut addrs).unwrap();
    assert_eq!(addrs[1], guest.page(4));
    assert_eq!(g.memory(h1), Memory::Stable);
    assert_eq!(g.memory(h2), Memory::UnmappedAfterIo, "buffered IO only");
    assert_eq!(counts.live(), 5);
    g.unmap(h2).unwrap();
    assert_eq!(counts.live(), 2, "the one-shot mapping went at once");
    g.unmap(h1).unwrap();
    let c = g.counters();
    assert_eq!((c.transient, c.mapped_pages, c.capacity), (1, 2, 2));
    drop(g);
    assert_eq!(counts.live(), 0);
}

#[test]
fn copy_mode_copies_a_batch_in_one_call_each_way() {
    let mut guest = Guest::new();
    let mut g = guest.grants(GrantMode::Copy, None);
    let counts = g.device().counts();
    let w1 = segs(&[5]);
    let w2 = segs(&[6, 7]);
    let r1 = segs(&[9]);
    let hw1 = g.queue(&w1, false).unwrap();
    let hw2 = g.queue(&w2, false).unwrap();
    let hr1 = g.queue(&r1, true).unwrap();
    g.map_queued();
    assert_eq!(counts.copy_calls.load(Ordering::SeqCst), 1);
    let mut addrs = [std::ptr::null_mut(); 11];
    g.addrs(hw2, &w2, &mut addrs).unwrap();
    // SAFETY: a bounce page of the request, 4096 bytes, filled by the copy.
    let b = unsafe { std::slice::from_raw_parts(addrs[1], PAGE_SIZE) };
    assert!(b.iter().all(|&x| x == 7), "write data copied in");
    assert_ne!(addrs[1], guest.page(7), "bounce, not the guest's page");
    g.addrs(hr1, &r1, &mut addrs).unwrap();
    // SAFETY: the read's bounce page.
    unsafe { std::ptr::write_bytes(addrs[0], 0xab, PAGE_SIZE) };
    let mut res = [Ok(()), Ok(()), Ok(())];
    g.unmap_batch(&[hw1, hw2, hr1], &mut res);
    assert!(res.iter().all(|r| r.is_ok()));
    assert_eq!(counts.copy_calls.load(Ordering::SeqCst), 2);
    // SAFETY: page 9 of the guest buffer.
    let p = unsafe { std::slice::from_raw_parts(guest.page(9), PAGE_SIZE) };
    assert!(p.iter().all(|&x| x == 0xab), "read data copied out");
    assert_eq!(counts.live(), 0);
    assert_eq!(g.counters().copy_calls, 2);
}

fn seg(gref: u32, first_sect: u8, last_sect: u8) -> [Segment; 1] {
    [Segment {
        gref,
        first_sect,
        last_sect,
        pad: 0,
    }]
}

#[test]
fn staged_persistent_io_copies_the_segments_bytes_and_nothing_else() {
    let mut guest = Guest::new();
    let mut g = guest.grants_with(GrantMode::Persistent, None, PersistentIo::Staged);
    let counts = g.device().counts();
    // A write of sectors 2..=5 of page 4, a read of sectors 1..=3 of page 6.
    let (w, r) = (seg(4, 2, 5), seg(6, 1, 3));
    let hw = g.queue(&w, false).unwrap();
    let hr = g.queue(&r, true).unwrap();
    g.map_queued();
    assert_eq!(calls(&g), 1, "both grants mapped in one call, persistently");
    let mut addrs = [std::ptr::null_mut(); 11];
    g.addrs(hw, &w, &mut addrs).unwrap();
    assert_ne!(
        addrs[0],
        guest.page(4),
        "the IO goes to tapdisk's page, not the guest's"
    );
    // SAFETY: the write's bounce page, 4096 bytes.
    let b = unsafe { std::slice::from_raw_parts(addrs[0], PAGE_SIZE) };
    assert!(
        b[1024..3072].iter().all(|&x| x == 4),
        "the segment's bytes copied in"
    );
    assert_eq!(g.memory(hw), Memory::Stable, "direct IO allowed");
    g.addrs(hr, &r, &mut addrs).unwrap();
    assert_ne!(addrs[0], guest.page(6));
    // The read's IO fills its bounce page (more than the segment, as a sloppy device could).
    // SAFETY: the read's bounce page.
    unsafe { std::ptr::write_bytes(addrs[0], 0xab, PAGE_SIZE) };
    let mut res = [Ok(()), Ok(())];
    g.unmap_batch(&[hw, hr], &mut res);
    assert!(res.iter().all(|r| r.is_ok()));
    // SAFETY: page 6 of the guest buffer.
    let p = unsafe { std::slice::from_raw_parts(guest.page(6), PAGE_SIZE) };
    assert!(
        p[512..2048].iter().all(|&x| x == 0xab),
        "the read's sectors copied out"
    );
    assert!(
        p[..512].iter().chain(&p[2048..]).all(|&x| x == 6),
        "the rest of the guest's page untouched"
    );
    assert_eq!(counts.live(), 2, "persistent: still mapped after the IO");
    let c = g.counters();
    assert_eq!((c.persistent_io, c.copy_calls), (PersistentIo::Staged, 0));
    drop(g);
    assert_eq!(counts.live(), 0);
}

#[test]
fn staged_persistent_io_fails_a_request_whose_grant_cannot_be_mapped() {
    let mut guest = Guest::new();
    let mut g = guest.grants_with(GrantMode::Persistent, None, PersistentIo::Staged);
    let mut addrs = [std::ptr::null_mut(); 11];
    for writable in [false, true] {
        let bad = seg(900, 0, 7);
        let h = g.queue(&bad, writable).unwrap();
        g.map_queued();
        let e = g.addrs(h, &bad, &mut addrs).unwrap_err();
        assert!(matches!(e, Problem::BadGrant(900)), "{e}");
        let _ = g.unmap(h);
    }
    assert_eq!(g.device().counts().live(), 0);
}

#[test]
fn persistent_io_names_on_the_wire() {
    for (p, name) in [
        (PersistentIo::Staged, "\"staged\""),
        (PersistentIo::Direct, "\"direct\""),
    ] {
        assert_eq!(serde_json::to_string(&p).unwrap(), name);
        assert_eq!(serde_json::from_str::<PersistentIo>(name).unwrap(), p);
    }
    assert!(serde_json::from_str::<PersistentIo>("\"copy\"").is_err());
    assert_eq!(PersistentIo::default(), PersistentIo::Staged);
}

#[test]
fn dropping_the_grants_with_requests_still_held_unmaps_everything() {
    let mut guest = Guest::new();
    for mode in [GrantMode::Map, GrantMode::Persistent] {
        let mut g = guest.grants(mode, None);
        let counts = g.device().counts();
        let s = segs(&[1, 2, 3]);
        let mut addrs = [std::ptr::null_mut(); 11];
        let _h = g.map(&s, true, &mut addrs).unwrap();
        assert_eq!(counts.live(), 3);
        drop(g);
        assert_eq!(counts.live(), 0, "{mode}");
    }
}

#[test]
fn persistent_capacity_counts_indirect_pages() {
    assert_eq!(ring_capacity(32, 11), 32 * 11);
    assert_eq!(ring_capacity(32, 256), 32 * (256 + 1));
    assert_eq!(ring_capacity(512, 4096), 512 * (4096 + 8));
}
