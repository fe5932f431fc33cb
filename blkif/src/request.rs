//! Parsing and validating one request copied out of the ring.
//!
//! Only a [`Request`] that passed every check here reaches tapdisk's IO path. A request that
//! fails gets a [`Rejection`] carrying the id and operation to answer it with, and the status
//! (`BLKIF_RSP_ERROR`, or `BLKIF_RSP_EOPNOTSUPP` for an operation the backend does not do).
//! Grant references are checked later, by the transport that maps them.

use crate::protocol::{
    op, status, Abi, Segment, DISCARD_FLAG_SECURE, MAX_SEGMENTS_PER_REQUEST, SECTOR_SIZE,
};
use crate::ring::SlotCopy;

/// What the backend offers the frontend; requests are checked against it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskInfo {
    /// Disk size in 512-byte sectors.
    pub sectors: u64,
    /// The image's logical sector size in bytes (what a frontend should use).
    pub sector_size: u32,
    /// Writes, barriers with data and discards are refused.
    pub read_only: bool,
    /// FLUSH_DISKCACHE is served.
    pub flush: bool,
    /// WRITE_BARRIER is served.
    pub barrier: bool,
    /// DISCARD is served.
    pub discard: bool,
    /// Segments a direct request may carry (1..=11).
    pub max_segments: u8,
}

/// The operation of a validated request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// Read into the segments.
    Read,
    /// Write the segments.
    Write,
    /// Make earlier completed writes durable, then write the segments (if any).
    Flush,
    /// Complete everything before it first; durable before anything after it starts.
    Barrier,
    /// Discard the sector range.
    Discard {
        /// The frontend asked for a secure discard.
        secure: bool,
    },
}

impl Operation {
    /// Whether the request moves data from the frontend to the disk.
    pub fn writes(self) -> bool {
        matches!(
            self,
            Operation::Write | Operation::Flush | Operation::Barrier
        )
    }
}

/// A validated request. Its segments were written into the caller's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// The frontend's id, echoed in the response.
    pub id: u64,
    /// The operation byte as the frontend sent it, echoed in the response.
    pub raw_op: u8,
    /// What to do.
    pub op: Operation,
    /// First sector.
    pub sector: u64,
    /// Sectors covered (sum of the segments, or the discard length).
    pub nr_sectors: u64,
    /// Segments written to the caller's buffer.
    pub nr_segments: usize,
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// The operation code is not a blkif operation.
    #[error("unknown operation {0}")]
    UnknownOperation(u8),
    /// A blkif operation this backend does not offer.
    #[error("unsupported operation {0}")]
    Unsupported(u8),
    /// Read or write with no segments.
    #[error("no segments")]
    NoSegments,
    /// More segments than allowed.
    #[error("{got} segments, at most {max}")]
    TooManySegments {
        /// Segments requested.
        got: usize,
        /// The negotiated maximum.
        max: usize,
    },
    /// `first_sect`/`last_sect` outside one page or reversed.
    #[error("segment {index}: sectors {first}..={last} are not inside one page")]
    BadSegment {
        /// Which segment.
        index: usize,
        /// Its first sector.
        first: u8,
        /// Its last sector.
        last: u8,
    },
    /// The sector range leaves the disk (or overflows).
    #[error("sectors {sector}+{count} lie outside the disk of {disk} sectors")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Sectors.
        count: u64,
        /// Disk size.
        disk: u64,
    },
    /// A write to a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// A grant reference the transport cannot map.
    #[error("grant reference {0} cannot be mapped")]
    BadGrant(u32),
    /// A discard that is not aligned to the sector size or is empty.
    #[error("discard of zero sectors")]
    EmptyDiscard,
}

impl Problem {
    /// The response status for this problem.
    pub fn status(&self) -> i16 {
        match self {
            Problem::UnknownOperation(_) | Problem::Unsupported(_) => status::EOPNOTSUPP,
            _ => status::ERROR,
        }
    }
}

/// A refused request: answer `id` with `problem.status()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The id to answer.
    pub id: u64,
    /// The operation byte to echo.
    pub raw_op: u8,
    /// What was wrong.
    pub problem: Problem,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// The id and operation byte of any slot (every request kind has them at the same place).
pub fn slot_id(slot: &SlotCopy, abi: Abi) -> (u64, u8) {
    (u64_at(&slot.bytes, abi.layout().id), slot.bytes[0])
}

/// Parses and validates the request in `slot` against `disk`, writing its segments into `segs`
/// (which must hold at least `disk.max_segments` entries).
pub fn parse(
    slot: &SlotCopy,
    abi: Abi,
    disk: &DiskInfo,
    segs: &mut [Segment],
) -> Result<Request, Rejection> {
    let lay = abi.layout();
    let b = &slot.bytes;
    let (id, raw_op) = slot_id(slot, abi);
    let reject = |problem| Rejection {
        id,
        raw_op,
        problem,
    };
    let sector = u64_at(b, lay.sector);
    let check_range = |count: u64| match sector.checked_add(count) {
        Some(end) if end <= disk.sectors => Ok(()),
        _ => Err(reject(Problem::OutOfRange {
            sector,
            count,
            disk: disk.sectors,
        })),
    };

    let opn = match raw_op {
        op::READ => Operation::Read,
        op::WRITE => Operation::Write,
        op::FLUSH_DISKCACHE if disk.flush => Operation::Flush,
        op::WRITE_BARRIER if disk.barrier => Operation::Barrier,
        op::DISCARD if disk.discard => {
            let secure = b[1] & DISCARD_FLAG_SECURE != 0;
            let count = u64_at(b, lay.discard_nr_sectors);
            if disk.read_only {
                return Err(reject(Problem::ReadOnly));
            }
            if count == 0 {
                return Err(reject(Problem::EmptyDiscard));
            }
            check_range(count)?;
            return Ok(Request {
                id,
                raw_op,
                op: Operation::Discard { secure },
                sector,
                nr_sectors: count,
                nr_segments: 0,
            });
        }
        op::FLUSH_DISKCACHE | op::WRITE_BARRIER | op::DISCARD | op::INDIRECT => {
            return Err(reject(Problem::Unsupported(raw_op)))
        }
        other => return Err(reject(Problem::UnknownOperation(other))),
    };

    let n = b[1] as usize;
    let max = (disk.max_segments as usize)
        .min(MAX_SEGMENTS_PER_REQUEST)
        .min(segs.len());
    if n == 0 && matches!(opn, Operation::Read | Operation::Write) {
        return Err(reject(Problem::NoSegments));
    }
    if n > max {
        return Err(reject(Problem::TooManySegments { got: n, max }));
    }
    if disk.read_only && opn.writes() && (n > 0 || opn == Operation::Write) {
        return Err(reject(Problem::ReadOnly));
    }
    let mut total = 0u64;
    for (i, seg) in segs.iter_mut().enumerate().take(n) {
        let o = lay.seg + i * 8;
        let s = Segment {
            gref: u32_at(b, o),
            first_sect: b[o + 4],
            last_sect: b[o + 5],
            pad: 0,
        };
        let count = s.sectors().ok_or(reject(Problem::BadSegment {
            index: i,
            first: s.first_sect,
            last: s.last_sect,
        }))?;
        total += u64::from(count);
        *seg = s;
    }
    check_range(total)?;
    let _ = u16_at; // handle is not used by this backend: one ring serves one disk
    Ok(Request {
        id,
        raw_op,
        op: opn,
        sector,
        nr_sectors: total,
        nr_segments: n,
    })
}

/// Bytes a validated request transfers.
pub fn bytes(req: &Request) -> u64 {
    req.nr_sectors * SECTOR_SIZE
}

/// Encodes a request into slot bytes for `abi` (the frontend side; also used to build hostile
/// requests in tests). `segments` beyond 11 are ignored; `nr_segments` is written as given.
pub fn encode(
    abi: Abi,
    raw_op: u8,
    nr_segments: u8,
    id: u64,
    sector: u64,
    segments: &[Segment],
    out: &mut [u8],
) {
    let lay = abi.layout();
    out[..lay.slot].fill(0);
    out[0] = raw_op;
    out[1] = nr_segments;
    out[lay.id..lay.id + 8].copy_from_slice(&id.to_le_bytes());
    out[lay.sector..lay.sector + 8].copy_from_slice(&sector.to_le_bytes());
    for (i, s) in segments.iter().take(MAX_SEGMENTS_PER_REQUEST).enumerate() {
        let o = lay.seg + i * 8;
        out[o..o + 4].copy_from_slice(&s.gref.to_le_bytes());
        out[o + 4] = s.first_sect;
        out[o + 5] = s.last_sect;
    }
}

/// Encodes a discard request.
pub fn encode_discard(
    abi: Abi,
    id: u64,
    sector: u64,
    nr_sectors: u64,
    secure: bool,
    out: &mut [u8],
) {
    let lay = abi.layout();
    out[..lay.slot].fill(0);
    out[0] = op::DISCARD;
    out[1] = if secure { DISCARD_FLAG_SECURE } else { 0 };
    out[lay.id..lay.id + 8].copy_from_slice(&id.to_le_bytes());
    out[lay.sector..lay.sector + 8].copy_from_slice(&sector.to_le_bytes());
    let o = lay.discard_nr_sectors;
    out[o..o + 8].copy_from_slice(&nr_sectors.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::MAX_SLOT;
    use proptest::prelude::*;

    const DISK: DiskInfo = DiskInfo {
        sectors: 1000,
        sector_size: 512,
        read_only: false,
        flush: true,
        barrier: true,
        discard: true,
        max_segments: 11,
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

    fn run(s: &SlotCopy, abi: Abi, disk: &DiskInfo) -> Result<Request, Rejection> {
        let mut segs = [Segment::default(); 11];
        parse(s, abi, disk, &mut segs)
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
            let r = parse(&s, abi, &DISK, &mut segs).unwrap();
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
        assert_eq!(
            p(slot(a, op::INDIRECT, 1, 1, 0, &[]), &DISK),
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
            if let Ok(r) = parse(&s, abi, &disk, &mut segs) {
                prop_assert!(r.sector + r.nr_sectors <= sectors);
                prop_assert!(r.nr_segments <= 11);
                for sg in &segs[..r.nr_segments] {
                    prop_assert!(sg.first_sect <= sg.last_sect && sg.last_sect < 8);
                }
            }
        }
    }
}
