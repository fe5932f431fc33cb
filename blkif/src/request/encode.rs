//! Building request slots, as a frontend does (tests, benchmarks, the NBD export, fuzzers).

use crate::protocol::{
    op, Abi, GrantRef, Segment, DISCARD_FLAG_SECURE, MAX_INDIRECT_PAGES_PER_REQUEST,
    MAX_SEGMENTS_PER_REQUEST, SEGMENTS_PER_INDIRECT_FRAME,
};

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
