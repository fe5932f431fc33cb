//! One ring slot of arbitrary bytes against the request parser, for both ABIs and arbitrary
//! disk settings, with arbitrary indirect descriptor pages: never a panic, and anything
//! accepted is inside the disk with in-page segments.
#![no_main]
use arbitrary::Arbitrary;
use blkif::protocol::{Abi, Segment, MAX_SLOT};
use blkif::request::{copy_indirect_segments, finish_indirect, parse, DiskInfo, Parsed, Request};
use blkif::ring::SlotCopy;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    x86_32: bool,
    sectors: u64,
    read_only: bool,
    flush: bool,
    barrier: bool,
    discard: bool,
    max_segments: u8,
    max_indirect: u16,
    /// Mostly-valid steering: small operation codes and segment counts are likelier.
    op: u8,
    nseg: u8,
    slot: [u8; MAX_SLOT],
    /// Descriptor pages (8 of them; short ones are padded with zeroes).
    pages: Vec<u8>,
}

fn check(r: &Request, segs: &[Segment], disk: &DiskInfo) {
    assert!(r
        .sector
        .checked_add(r.nr_sectors)
        .is_some_and(|e| e <= disk.sectors));
    for sg in &segs[..r.nr_segments] {
        assert!(sg.first_sect <= sg.last_sect && sg.last_sect < 8);
    }
    if disk.read_only {
        assert!(!r.op.writes() || r.nr_segments == 0);
    }
}

fuzz_target!(|inp: Input| {
    let abi = if inp.x86_32 { Abi::X86_32 } else { Abi::X86_64 };
    let disk = DiskInfo {
        sectors: inp.sectors,
        sector_size: 512,
        read_only: inp.read_only,
        flush: inp.flush,
        barrier: inp.barrier,
        discard: inp.discard,
        max_segments: inp.max_segments % 12,
        max_indirect_segments: inp.max_indirect % 5000,
    };
    let mut s = SlotCopy { bytes: inp.slot };
    s.bytes[0] = inp.op % 8;
    if s.bytes[0] != 6 {
        s.bytes[1] = inp.nseg % 16;
    }
    let mut segs = vec![Segment::default(); disk.segment_capacity().max(11)];
    match parse(&s, abi, &disk, &mut segs) {
        Ok(Parsed::Ready(r)) => {
            assert!(r.nr_segments <= disk.max_segments as usize);
            check(&r, &segs, &disk);
        }
        Ok(Parsed::Indirect(h)) => {
            assert!(h.nr_segments >= 1 && h.nr_segments <= disk.max_indirect_segments as usize);
            assert!(h.pages() <= 8);
            // Page-aligned, 4-aligned storage for the descriptor pages.
            let mut store = vec![0u32; 8 * 1024];
            for (i, b) in inp.pages.iter().take(8 * 4096).enumerate() {
                let w = &mut store[i / 4];
                *w |= u32::from(*b) << (8 * (i % 4));
            }
            let ptrs: Vec<*const u8> = (0..8).map(|p| store[p * 1024..].as_ptr().cast()).collect();
            // SAFETY: eight live 4096-byte, 4-aligned pages.
            unsafe { copy_indirect_segments(&ptrs[..h.pages()], h.nr_segments, &mut segs) };
            if let Ok(r) = finish_indirect(&h, &disk, &segs) {
                assert_eq!(r.nr_segments, h.nr_segments);
                check(&r, &segs, &disk);
            }
        }
        Err(_) => {}
    }
});
