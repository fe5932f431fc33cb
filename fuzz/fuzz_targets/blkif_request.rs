//! One ring slot of arbitrary bytes against the request parser, for both ABIs and arbitrary
//! disk settings: never a panic, and anything accepted is inside the disk with in-page segments.
#![no_main]
use arbitrary::Arbitrary;
use blkif::protocol::{Abi, Segment, MAX_SLOT};
use blkif::request::{parse, DiskInfo};
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
    /// Mostly-valid steering: small operation codes and segment counts are likelier.
    op: u8,
    nseg: u8,
    slot: [u8; MAX_SLOT],
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
    };
    let mut s = SlotCopy { bytes: inp.slot };
    s.bytes[0] = inp.op % 8;
    s.bytes[1] = inp.nseg % 16;
    let mut segs = [Segment::default(); 11];
    if let Ok(r) = parse(&s, abi, &disk, &mut segs) {
        assert!(r
            .sector
            .checked_add(r.nr_sectors)
            .is_some_and(|e| e <= disk.sectors));
        assert!(r.nr_segments <= disk.max_segments as usize);
        for sg in &segs[..r.nr_segments] {
            assert!(sg.first_sect <= sg.last_sect && sg.last_sect < 8);
        }
        if disk.read_only {
            assert!(!r.op.writes() || r.nr_segments == 0);
        }
    }
});
