//! Parsing and validating one request copied out of the ring.
//!
//! Only a [`Request`] that passed every check here reaches tapdisk's IO path. A request that
//! fails gets a [`Rejection`] carrying the id and operation to answer it with, and the status
//! (`BLKIF_RSP_ERROR`, or `BLKIF_RSP_EOPNOTSUPP` for an operation the backend does not do).
//! Grant references are checked later, by the transport that maps them.
//!
//! An indirect request (`BLKIF_OP_INDIRECT`) carries its segment descriptors in separately
//! granted pages. [`parse`] checks its header and returns [`Parsed::Indirect`]; the caller maps
//! the pages it names, copies the descriptors out once with [`copy_indirect_segments`], unmaps
//! them, and validates the copy with [`finish_indirect`], exactly as for a direct request.

use crate::protocol::{
    op, status, Abi, GrantRef, Segment, DISCARD_FLAG_SECURE, MAX_INDIRECT_PAGES_PER_REQUEST,
    MAX_SEGMENTS_PER_REQUEST, PAGE_SIZE, SECTOR_SIZE, SEGMENTS_PER_INDIRECT_FRAME,
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
    /// Segments an indirect request may carry (0: BLKIF_OP_INDIRECT is not offered; at most
    /// 8 pages x 512 = 4096).
    #[serde(default)]
    pub max_indirect_segments: u16,
}

/// The most segments an indirect request can describe (8 pages of 512 descriptors).
pub const MAX_INDIRECT_SEGMENTS: u16 =
    (MAX_INDIRECT_PAGES_PER_REQUEST * SEGMENTS_PER_INDIRECT_FRAME) as u16;

impl DiskInfo {
    /// The most segments any request may carry: the size a per-request segment buffer needs.
    pub fn segment_capacity(&self) -> usize {
        (self.max_segments as usize)
            .min(MAX_SEGMENTS_PER_REQUEST)
            .max(usize::from(
                self.max_indirect_segments.min(MAX_INDIRECT_SEGMENTS),
            ))
    }
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
    /// An indirect request whose inner operation is not READ or WRITE.
    #[error("indirect request with operation {0} (only read and write may be indirect)")]
    BadIndirectOp(u8),
}

/// The checked header of an indirect request, before its segments are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndirectHeader {
    /// The frontend's id.
    pub id: u64,
    /// The inner operation byte (`indirect_op`), echoed in the response: Linux blkback answers
    /// an indirect request with its inner operation, and Linux blkfront marks the whole device
    /// broken when a response carries `BLKIF_OP_INDIRECT` instead.
    pub raw_op: u8,
    /// Read or write.
    pub op: Operation,
    /// First sector.
    pub sector: u64,
    /// Segments described (1..=the disk's maximum).
    pub nr_segments: usize,
    /// Grants of the pages holding the descriptors; the first [`IndirectHeader::pages`] count.
    pub grefs: [GrantRef; MAX_INDIRECT_PAGES_PER_REQUEST],
}

impl IndirectHeader {
    /// Indirect pages the descriptors occupy.
    pub fn pages(&self) -> usize {
        self.nr_segments.div_ceil(SEGMENTS_PER_INDIRECT_FRAME)
    }

    fn reject(&self, problem: Problem) -> Rejection {
        Rejection {
            id: self.id,
            raw_op: self.raw_op,
            problem,
        }
    }
}

/// What [`parse`] found in a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A complete, validated request; its segments are in the caller's buffer.
    Ready(Request),
    /// An indirect request whose header is valid; its segments are still to be read.
    Indirect(IndirectHeader),
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

/// Checks each segment (`first_sect <= last_sect < 8`) and returns the sectors they cover.
fn check_segments(segs: &[Segment]) -> Result<u64, Problem> {
    let mut total = 0u64;
    for (index, s) in segs.iter().enumerate() {
        let n = s.sectors().ok_or(Problem::BadSegment {
            index,
            first: s.first_sect,
            last: s.last_sect,
        })?;
        total += u64::from(n);
    }
    Ok(total)
}

fn check_range(sector: u64, count: u64, disk: &DiskInfo) -> Result<(), Problem> {
    match sector.checked_add(count) {
        Some(end) if end <= disk.sectors => Ok(()),
        _ => Err(Problem::OutOfRange {
            sector,
            count,
            disk: disk.sectors,
        }),
    }
}

/// Parses and validates the request in `slot` against `disk`. A direct request's segments are
/// written into `segs` (which must hold at least `disk.max_segments` entries); an indirect
/// request comes back as [`Parsed::Indirect`] for the caller to finish.
pub fn parse(
    slot: &SlotCopy,
    abi: Abi,
    disk: &DiskInfo,
    segs: &mut [Segment],
) -> Result<Parsed, Rejection> {
    let lay = abi.layout();
    let b = &slot.bytes;
    let (id, raw_op) = slot_id(slot, abi);
    let reject = |problem| Rejection {
        id,
        raw_op,
        problem,
    };
    let sector = u64_at(b, lay.sector);

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
            check_range(sector, count, disk).map_err(reject)?;
            return Ok(Parsed::Ready(Request {
                id,
                raw_op,
                op: Operation::Discard { secure },
                sector,
                nr_sectors: count,
                nr_segments: 0,
            }));
        }
        op::INDIRECT if disk.max_indirect_segments > 0 => {
            // Responses to indirect requests echo the inner operation (see IndirectHeader).
            let raw_op = b[1];
            let reject = |problem| Rejection {
                id,
                raw_op,
                problem,
            };
            let inner = match b[1] {
                op::READ => Operation::Read,
                op::WRITE => Operation::Write,
                other => return Err(reject(Problem::BadIndirectOp(other))),
            };
            let n = usize::from(u16_at(b, 2));
            let max = usize::from(disk.max_indirect_segments.min(MAX_INDIRECT_SEGMENTS));
            if n == 0 {
                return Err(reject(Problem::NoSegments));
            }
            if n > max {
                return Err(reject(Problem::TooManySegments { got: n, max }));
            }
            if disk.read_only && inner == Operation::Write {
                return Err(reject(Problem::ReadOnly));
            }
            let mut grefs = [0; MAX_INDIRECT_PAGES_PER_REQUEST];
            for (i, g) in grefs.iter_mut().enumerate() {
                *g = u32_at(b, lay.indirect_grefs + 4 * i);
            }
            return Ok(Parsed::Indirect(IndirectHeader {
                id,
                raw_op,
                op: inner,
                sector,
                nr_segments: n,
                grefs,
            }));
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
    for (i, seg) in segs.iter_mut().enumerate().take(n) {
        let o = lay.seg + i * 8;
        *seg = Segment {
            gref: u32_at(b, o),
            first_sect: b[o + 4],
            last_sect: b[o + 5],
            pad: 0,
        };
    }
    let total = check_segments(&segs[..n]).map_err(reject)?;
    check_range(sector, total, disk).map_err(reject)?;
    Ok(Parsed::Ready(Request {
        id,
        raw_op,
        op: opn,
        sector,
        nr_sectors: total,
        nr_segments: n,
    }))
}

/// Copies `n` segment descriptors out of mapped indirect pages into `out`, once, with volatile
/// loads (the frontend may be rewriting them as we read; only the copy is used afterwards).
///
/// # Safety
/// `pages[i]` must point to a readable, 4-byte aligned mapping of at least 4096 bytes for every
/// `i < n.div_ceil(512)`, valid for the duration of the call. `out` must hold `n` entries.
pub unsafe fn copy_indirect_segments(pages: &[*const u8], n: usize, out: &mut [Segment]) {
    for (i, seg) in out.iter_mut().enumerate().take(n) {
        let page = pages[i / SEGMENTS_PER_INDIRECT_FRAME];
        let off = (i % SEGMENTS_PER_INDIRECT_FRAME) * 8;
        debug_assert!(off + 8 <= PAGE_SIZE);
        // SAFETY: `off + 8 <= 4096`, inside the page the caller vouched for; the page is
        // 4-aligned and `off` a multiple of 8, so both u32 loads are aligned.
        let (gref, sects) = unsafe {
            let p = page.add(off).cast::<u32>();
            (p.read_volatile(), p.add(1).read_volatile())
        };
        let sb = u32::from_le(sects).to_le_bytes();
        *seg = Segment {
            gref: u32::from_le(gref),
            first_sect: sb[0],
            last_sect: sb[1],
            pad: 0,
        };
    }
}

/// Validates the segments of an indirect request, copied into `segs` by
/// [`copy_indirect_segments`], and returns the request.
pub fn finish_indirect(
    h: &IndirectHeader,
    disk: &DiskInfo,
    segs: &[Segment],
) -> Result<Request, Rejection> {
    let total = check_segments(&segs[..h.nr_segments]).map_err(|p| h.reject(p))?;
    check_range(h.sector, total, disk).map_err(|p| h.reject(p))?;
    Ok(Request {
        id: h.id,
        raw_op: h.raw_op,
        op: h.op,
        sector: h.sector,
        nr_sectors: total,
        nr_segments: h.nr_segments,
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

/// Encodes an indirect request header; the descriptors go into the pages `grefs` names.
pub fn encode_indirect(
    abi: Abi,
    inner_op: u8,
    nr_segments: u16,
    id: u64,
    sector: u64,
    grefs: &[GrantRef],
    out: &mut [u8],
) {
    let lay = abi.layout();
    out[..lay.slot].fill(0);
    out[0] = op::INDIRECT;
    out[1] = inner_op;
    out[2..4].copy_from_slice(&nr_segments.to_le_bytes());
    out[lay.id..lay.id + 8].copy_from_slice(&id.to_le_bytes());
    out[lay.sector..lay.sector + 8].copy_from_slice(&sector.to_le_bytes());
    for (i, g) in grefs
        .iter()
        .take(MAX_INDIRECT_PAGES_PER_REQUEST)
        .enumerate()
    {
        let o = lay.indirect_grefs + 4 * i;
        out[o..o + 4].copy_from_slice(&g.to_le_bytes());
    }
}

/// Writes `segs` as indirect descriptors into `page` (4096 bytes), 512 per page.
pub fn encode_indirect_page(segs: &[Segment], page: &mut [u8]) {
    for (i, s) in segs.iter().take(SEGMENTS_PER_INDIRECT_FRAME).enumerate() {
        let o = i * 8;
        page[o..o + 4].copy_from_slice(&s.gref.to_le_bytes());
        page[o + 4] = s.first_sect;
        page[o + 5] = s.last_sect;
        page[o + 6] = 0;
        page[o + 7] = 0;
    }
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
        max_indirect_segments: 256,
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
}
