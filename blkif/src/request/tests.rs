//! Parsing against hostile slots, and encoding round trips.

use super::*;
use crate::protocol::MAX_SLOT;
use proptest::prelude::*;

const DISK: DiskInfo = DiskInfo {
    max_indirect_segments: 256,
    ..DiskInfo::writable(1000)
};

fn seg(gref: u32, f: u8, l: u8) -> Segment {
    Segment {
        gref,
        first_sect: f,
        last_sect: l,
        pad: 0,
    }
}

fn slot(abi: Abi, opc: u8, n: u8, id: u64, sector: u64, segs: &[Segment]) -> SlotCopy {
    let mut s = SlotCopy::default();
    encode(abi, opc, n, id, sector, segs, &mut s.bytes);
    s
}

fn ready(p: Result<Parsed, Rejection>) -> Result<Request, Rejection> {
    p.map(|p| match p {
        Parsed::Ready(r) => r,
        Parsed::Indirect(h) => panic!("unexpected indirect {h:?}"),
    })
}

fn run(s: &SlotCopy, abi: Abi, disk: &DiskInfo) -> Result<Request, Rejection> {
    let mut segs = [Segment::default(); 11];
    ready(parse(s, abi, disk, &mut segs))
}

/// Parses an indirect request whose descriptors sit in `pages`.
fn run_indirect(
    s: &SlotCopy,
    abi: Abi,
    disk: &DiskInfo,
    pages: &[Vec<u32>],
) -> Result<(Request, Vec<Segment>), Rejection> {
    let mut segs = vec![Segment::default(); 4096];
    let h = match parse(s, abi, disk, &mut segs)? {
        Parsed::Indirect(h) => h,
        Parsed::Ready(r) => panic!("expected indirect, got {r:?}"),
    };
    let ptrs: Vec<*const u8> = pages.iter().map(|p| p.as_ptr().cast::<u8>()).collect();
    assert!(ptrs.len() >= h.pages());
    // SAFETY: each page is a live Vec of 1024 u32 (4096 bytes, 4-aligned).
    unsafe { copy_indirect_segments(&ptrs, h.nr_segments, &mut segs) };
    let r = finish_indirect(&h, disk, &segs)?;
    segs.truncate(h.nr_segments);
    Ok((r, segs))
}

fn page_of(segs: &[Segment]) -> Vec<u32> {
    let mut bytes = vec![0u8; 4096];
    encode_indirect_page(segs, &mut bytes);
    bytes
        .chunks(4)
        .map(|c| u32::from_ne_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn good_requests_in_both_abis() {
    for abi in [Abi::X86_64, Abi::X86_32] {
        let s = slot(
            abi,
            op::WRITE,
            2,
            0xdead_beef_0042,
            10,
            &[seg(3, 0, 7), seg(9, 2, 5)],
        );
        let mut segs = [Segment::default(); 11];
        let r = ready(parse(&s, abi, &DISK, &mut segs)).unwrap();
        assert_eq!(r.id, 0xdead_beef_0042);
        assert_eq!(r.op, Operation::Write);
        assert_eq!((r.sector, r.nr_sectors, r.nr_segments), (10, 12, 2));
        assert_eq!(&segs[..2], &[seg(3, 0, 7), seg(9, 2, 5)]);
        let mut d = SlotCopy::default();
        encode_discard(abi, 5, 100, 900, true, &mut d.bytes);
        let r = run(&d, abi, &DISK).unwrap();
        assert_eq!(r.op, Operation::Discard { secure: true });
        assert_eq!(r.nr_sectors, 900);
        let f = slot(abi, op::FLUSH_DISKCACHE, 0, 6, 0, &[]);
        assert_eq!(run(&f, abi, &DISK).unwrap().op, Operation::Flush);
    }
}

#[test]
fn each_problem_is_caught() {
    let a = Abi::X86_64;
    let p = |s: SlotCopy, d: &DiskInfo| run(&s, a, d).unwrap_err().problem;
    assert_eq!(
        p(slot(a, 99, 1, 1, 0, &[seg(1, 0, 7)]), &DISK),
        Problem::UnknownOperation(99)
    );
    assert_eq!(
        p(slot(a, op::RESERVED_1, 1, 1, 0, &[]), &DISK),
        Problem::UnknownOperation(4)
    );
    let no_indirect = DiskInfo {
        max_indirect_segments: 0,
        ..DISK
    };
    assert_eq!(
        p(slot(a, op::INDIRECT, 1, 1, 0, &[]), &no_indirect),
        Problem::Unsupported(6)
    );
    assert_eq!(
        p(slot(a, op::READ, 0, 1, 0, &[]), &DISK),
        Problem::NoSegments
    );
    assert_eq!(
        p(slot(a, op::READ, 12, 1, 0, &[seg(1, 0, 7); 11]), &DISK),
        Problem::TooManySegments { got: 12, max: 11 }
    );
    assert_eq!(
        p(slot(a, op::READ, 255, 1, 0, &[]), &DISK),
        Problem::TooManySegments { got: 255, max: 11 }
    );
    assert_eq!(
        p(slot(a, op::READ, 1, 1, 0, &[seg(1, 0, 8)]), &DISK),
        Problem::BadSegment {
            index: 0,
            first: 0,
            last: 8
        }
    );
    assert_eq!(
        p(
            slot(a, op::READ, 2, 1, 0, &[seg(1, 0, 7), seg(1, 5, 4)]),
            &DISK
        ),
        Problem::BadSegment {
            index: 1,
            first: 5,
            last: 4
        }
    );
    assert_eq!(
        p(slot(a, op::READ, 1, 1, 0, &[seg(1, 0, 255)]), &DISK),
        Problem::BadSegment {
            index: 0,
            first: 0,
            last: 255
        }
    );
    assert!(matches!(
        p(slot(a, op::READ, 1, 1, 995, &[seg(1, 0, 7)]), &DISK),
        Problem::OutOfRange { .. }
    ));
    assert!(matches!(
        p(
            slot(a, op::WRITE, 1, 1, u64::MAX - 2, &[seg(1, 0, 7)]),
            &DISK
        ),
        Problem::OutOfRange { .. }
    ));
    let ro = DiskInfo {
        read_only: true,
        ..DISK
    };
    assert_eq!(
        p(slot(a, op::WRITE, 1, 1, 0, &[seg(1, 0, 7)]), &ro),
        Problem::ReadOnly
    );
    assert!(run(&slot(a, op::READ, 1, 1, 0, &[seg(1, 0, 7)]), a, &ro).is_ok());
    let mut d = SlotCopy::default();
    encode_discard(a, 5, 999, 2, false, &mut d.bytes);
    assert!(matches!(p(d, &DISK), Problem::OutOfRange { .. }));
    encode_discard(a, 5, 0, 0, false, &mut d.bytes);
    assert_eq!(p(d, &DISK), Problem::EmptyDiscard);
    let nodiscard = DiskInfo {
        discard: false,
        flush: false,
        barrier: false,
        ..DISK
    };
    encode_discard(a, 5, 0, 8, false, &mut d.bytes);
    assert_eq!(p(d, &nodiscard), Problem::Unsupported(op::DISCARD));
    assert_eq!(
        p(slot(a, op::FLUSH_DISKCACHE, 0, 1, 0, &[]), &nodiscard).status(),
        -2
    );
    let four = DiskInfo {
        max_segments: 4,
        ..DISK
    };
    assert_eq!(
        p(slot(a, op::READ, 5, 1, 0, &[seg(1, 0, 7); 5]), &four),
        Problem::TooManySegments { got: 5, max: 4 }
    );
}

#[test]
fn rejection_carries_id_and_status() {
    let r = run(&slot(Abi::X86_32, 42, 1, 77, 0, &[]), Abi::X86_32, &DISK).unwrap_err();
    assert_eq!(
        (r.id, r.raw_op, r.problem.status()),
        (77, 42, status::EOPNOTSUPP)
    );
    let r = run(
        &slot(Abi::X86_32, op::READ, 0, 78, 0, &[]),
        Abi::X86_32,
        &DISK,
    )
    .unwrap_err();
    assert_eq!((r.id, r.problem.status()), (78, status::ERROR));
}

#[test]
fn indirect_requests_in_both_abis() {
    for abi in [Abi::X86_64, Abi::X86_32] {
        // 600 segments of one page each span two indirect pages.
        let segs: Vec<Segment> = (0..600).map(|i| seg(1000 + i, 0, 7)).collect();
        let pages = vec![page_of(&segs[..512]), page_of(&segs[512..])];
        let mut s = SlotCopy::default();
        encode_indirect(abi, op::WRITE, 600, 0x77, 8, &[5, 6], &mut s.bytes);
        let disk = DiskInfo {
            sectors: 1 << 20,
            max_indirect_segments: 4096,
            ..DISK
        };
        let (r, got) = run_indirect(&s, abi, &disk, &pages).unwrap();
        assert_eq!((r.id, r.raw_op, r.op), (0x77, op::WRITE, Operation::Write));
        assert_eq!((r.sector, r.nr_sectors, r.nr_segments), (8, 4800, 600));
        assert_eq!(got, segs);
        let mut segs = vec![Segment::default(); 4096];
        let Parsed::Indirect(h) = parse(&s, abi, &disk, &mut segs).unwrap() else {
            panic!()
        };
        assert_eq!((h.pages(), &h.grefs[..2]), (2, &[5, 6][..]));
    }
}

#[test]
fn each_indirect_problem_is_caught() {
    let a = Abi::X86_64;
    let good = page_of(&[seg(1, 0, 7); 512]);
    let ind = |inner, n, sector| {
        let mut s = SlotCopy::default();
        encode_indirect(a, inner, n, 9, sector, &[1, 2, 3], &mut s.bytes);
        s
    };
    let p = |s: SlotCopy, d: &DiskInfo, pages: &[Vec<u32>]| {
        run_indirect(&s, a, d, pages).unwrap_err().problem
    };
    let three = [good.clone(), good.clone(), good.clone()];
    assert_eq!(
        p(ind(op::FLUSH_DISKCACHE, 1, 0), &DISK, &three),
        Problem::BadIndirectOp(3)
    );
    assert_eq!(
        p(ind(op::INDIRECT, 1, 0), &DISK, &three),
        Problem::BadIndirectOp(6)
    );
    assert_eq!(p(ind(op::READ, 0, 0), &DISK, &three), Problem::NoSegments);
    assert_eq!(
        p(ind(op::READ, 257, 0), &DISK, &three),
        Problem::TooManySegments { got: 257, max: 256 }
    );
    let huge = DiskInfo {
        max_indirect_segments: u16::MAX,
        sectors: u64::MAX,
        ..DISK
    };
    assert_eq!(
        p(ind(op::READ, 4097, 0), &huge, &three),
        Problem::TooManySegments {
            got: 4097,
            max: 4096
        }
    );
    assert!(matches!(
        p(ind(op::READ, 200, 999), &DISK, &three),
        Problem::OutOfRange { .. }
    ));
    let ro = DiskInfo {
        read_only: true,
        ..DISK
    };
    assert_eq!(p(ind(op::WRITE, 1, 0), &ro, &three), Problem::ReadOnly);
    assert!(run_indirect(&ind(op::READ, 1, 0), a, &ro, &three).is_ok());
    let mut bad = [seg(1, 0, 7); 10];
    bad[9] = seg(1, 6, 9);
    assert_eq!(
        p(ind(op::WRITE, 10, 0), &DISK, &[page_of(&bad)]),
        Problem::BadSegment {
            index: 9,
            first: 6,
            last: 9
        }
    );
    assert_eq!(
        run_indirect(&ind(op::WRITE, 10, 0), a, &DISK, &[page_of(&bad)])
            .unwrap_err()
            .raw_op,
        op::WRITE
    );
}

proptest! {
    /// Arbitrary slot bytes never panic, and anything accepted is inside the disk with
    /// in-page segments.
    #[test]
    fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), MAX_SLOT),
                       sectors in 0u64..5000, abi in prop_oneof![Just(Abi::X86_64), Just(Abi::X86_32)]) {
        let mut s = SlotCopy::default();
        s.bytes.copy_from_slice(&bytes);
        s.bytes[0] %= 8;
        let disk = DiskInfo { sectors, ..DISK };
        let mut segs = [Segment::default(); 11];
        if let Ok(Parsed::Ready(r)) = parse(&s, abi, &disk, &mut segs) {
            prop_assert!(r.sector + r.nr_sectors <= sectors);
            prop_assert!(r.nr_segments <= 11);
            for sg in &segs[..r.nr_segments] {
                prop_assert!(sg.first_sect <= sg.last_sect && sg.last_sect < 8);
            }
        }
    }
}
