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

mod encode;
#[cfg(test)]
mod tests;

pub use encode::{encode, encode_discard, encode_indirect, encode_indirect_page};

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
    /// A writable disk of `sectors` 512-byte sectors that takes flushes, barriers and
    /// discards, with direct requests of up to 11 segments and no indirect ones: the disk of
    /// tests and fuzzers that need one.
    pub const fn writable(sectors: u64) -> DiskInfo {
        DiskInfo {
            sectors,
            sector_size: 512,
            read_only: false,
            flush: true,
            barrier: true,
            discard: true,
            max_segments: 11,
            max_indirect_segments: 0,
        }
    }

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
