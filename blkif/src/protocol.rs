//! Wire-exact blkif structures (Xen's `xen/include/public/io/blkif.h`).
//!
//! Three layouts exist on the wire. The `x86_64-abi` layout is also the native layout of every
//! 64-bit backend (a `u64` is 8-byte aligned); `x86_32-abi` aligns a `u64` to 4 bytes, so the
//! request id moves from offset 8 to 4 and the request shrinks from 112 to 108 bytes. A frontend
//! names its layout in xenstore (`protocol`); the local transport names it in the attach message.
//!
//! The `#[repr(C)]` structs below exist to pin the layout down: the parser and encoder take their
//! field offsets from them with `offset_of!`, and the tests compare every size and offset with
//! the figures of Xen's headers. Nothing ever makes a reference to one of these inside shared
//! memory: slots are copied out as bytes (see [`crate::ring`]).

use std::mem::{offset_of, size_of};

/// Bytes per blkif sector: sector numbers and `first_sect`/`last_sect` count 512-byte units.
pub const SECTOR_SIZE: u64 = 512;
/// Bytes per page (grant) on x86.
pub const PAGE_SIZE: usize = 4096;
/// Sectors in one page: `last_sect` may be at most `SECTORS_PER_PAGE - 1`.
pub const SECTORS_PER_PAGE: u8 = (PAGE_SIZE as u64 / SECTOR_SIZE) as u8;
/// Segments a direct request can carry (`BLKIF_MAX_SEGMENTS_PER_REQUEST`).
pub const MAX_SEGMENTS_PER_REQUEST: usize = 11;
/// Indirect pages an indirect request can name (`BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST`).
pub const MAX_INDIRECT_PAGES_PER_REQUEST: usize = 8;
/// Segment descriptors in one indirect page (4096 / 8).
pub const SEGMENTS_PER_INDIRECT_FRAME: usize = PAGE_SIZE / size_of::<Segment>();

/// A grant reference: names one page the frontend granted.
pub type GrantRef = u32;

/// Operation codes (`BLKIF_OP_*`).
pub mod op {
    /// Read into the segments.
    pub const READ: u8 = 0;
    /// Write from the segments.
    pub const WRITE: u8 = 1;
    /// Write after every earlier request completed; later ones start after it is durable.
    pub const WRITE_BARRIER: u8 = 2;
    /// Make earlier completed writes durable (may carry data, written after the flush).
    pub const FLUSH_DISKCACHE: u8 = 3;
    /// Reserved (was a vendor extension); never valid.
    pub const RESERVED_1: u8 = 4;
    /// Discard a sector range (no segments).
    pub const DISCARD: u8 = 5;
    /// Segments are described in separately granted indirect pages.
    pub const INDIRECT: u8 = 6;
}

/// Response status codes (`BLKIF_RSP_*`).
pub mod status {
    /// Success.
    pub const OKAY: i16 = 0;
    /// The request failed.
    pub const ERROR: i16 = -1;
    /// The backend does not support the operation.
    pub const EOPNOTSUPP: i16 = -2;
}

/// Flag in a discard request's second byte: the discard must be secure.
pub const DISCARD_FLAG_SECURE: u8 = 1;

/// One segment: a sector range inside one granted page (`struct blkif_request_segment`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    /// The granted page.
    pub gref: GrantRef,
    /// First sector of the page in the transfer.
    pub first_sect: u8,
    /// Last sector of the page in the transfer (inclusive).
    pub last_sect: u8,
    /// Padding on the wire.
    pub pad: u16,
}

impl Segment {
    /// Sectors this segment covers, if `first_sect <= last_sect < SECTORS_PER_PAGE`.
    pub fn sectors(&self) -> Option<u8> {
        (self.first_sect <= self.last_sect && self.last_sect < SECTORS_PER_PAGE)
            .then(|| self.last_sect - self.first_sect + 1)
    }
}

/// `struct blkif_request` in the x86_64 (and native 64-bit) layout: 112 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestX86_64 {
    /// `BLKIF_OP_*`.
    pub operation: u8,
    /// Segments used (direct requests).
    pub nr_segments: u8,
    /// Virtual device handle.
    pub handle: u16,
    /// Padding before the 8-aligned id.
    pub pad: u32,
    /// Frontend's id, echoed in the response.
    pub id: u64,
    /// Start sector.
    pub sector_number: u64,
    /// Segments.
    pub seg: [Segment; MAX_SEGMENTS_PER_REQUEST],
}

/// `struct blkif_x86_32_request`: 108 bytes, `u64` aligned to 4.
#[repr(C, packed(4))]
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestX86_32 {
    /// `BLKIF_OP_*`.
    pub operation: u8,
    /// Segments used (direct requests).
    pub nr_segments: u8,
    /// Virtual device handle.
    pub handle: u16,
    /// Frontend's id, echoed in the response.
    pub id: u64,
    /// Start sector.
    pub sector_number: u64,
    /// Segments.
    pub seg: [Segment; MAX_SEGMENTS_PER_REQUEST],
}

/// `struct blkif_request_discard`, x86_64 layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DiscardX86_64 {
    /// `BLKIF_OP_DISCARD`.
    pub operation: u8,
    /// `BLKIF_DISCARD_SECURE` or 0.
    pub flag: u8,
    /// Virtual device handle.
    pub handle: u16,
    /// Padding.
    pub pad: u32,
    /// Frontend's id.
    pub id: u64,
    /// Start sector.
    pub sector_number: u64,
    /// Sectors to discard.
    pub nr_sectors: u64,
}

/// `struct blkif_x86_32_request_discard`.
#[repr(C, packed(4))]
#[derive(Clone, Copy, Debug, Default)]
pub struct DiscardX86_32 {
    /// `BLKIF_OP_DISCARD`.
    pub operation: u8,
    /// `BLKIF_DISCARD_SECURE` or 0.
    pub flag: u8,
    /// Virtual device handle.
    pub handle: u16,
    /// Frontend's id.
    pub id: u64,
    /// Start sector.
    pub sector_number: u64,
    /// Sectors to discard.
    pub nr_sectors: u64,
}

/// `struct blkif_request_indirect`, x86_64 layout: 64 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct IndirectX86_64 {
    /// `BLKIF_OP_INDIRECT`.
    pub operation: u8,
    /// `BLKIF_OP_READ` or `BLKIF_OP_WRITE`.
    pub indirect_op: u8,
    /// Segments described by the indirect pages.
    pub nr_segments: u16,
    /// Padding.
    pub pad1: u32,
    /// Frontend's id.
    pub id: u64,
    /// Start sector.
    pub sector_number: u64,
    /// Virtual device handle.
    pub handle: u16,
    /// Padding.
    pub pad2: u16,
    /// Grants of the pages holding the segment descriptors.
    pub indirect_grefs: [GrantRef; MAX_INDIRECT_PAGES_PER_REQUEST],
    /// Padding to 64 bytes.
    pub pad3: u32,
}

/// `struct blkif_x86_32_request_indirect`: 64 bytes (padded explicitly on i386).
#[repr(C, packed(4))]
#[derive(Clone, Copy, Debug, Default)]
pub struct IndirectX86_32 {
    /// `BLKIF_OP_INDIRECT`.
    pub operation: u8,
    /// `BLKIF_OP_READ` or `BLKIF_OP_WRITE`.
    pub indirect_op: u8,
    /// Segments described by the indirect pages.
    pub nr_segments: u16,
    /// Frontend's id.
    pub id: u64,
    /// Start sector.
    pub sector_number: u64,
    /// Virtual device handle.
    pub handle: u16,
    /// Padding.
    pub pad1: u16,
    /// Grants of the pages holding the segment descriptors.
    pub indirect_grefs: [GrantRef; MAX_INDIRECT_PAGES_PER_REQUEST],
    /// Padding to 64 bytes.
    pub pad2: u64,
}

/// `struct blkif_response`, x86_64 layout: 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ResponseX86_64 {
    /// The request's id.
    pub id: u64,
    /// The request's operation.
    pub operation: u8,
    /// Padding.
    pub pad: u8,
    /// `BLKIF_RSP_*`.
    pub status: i16,
}

/// `struct blkif_x86_32_response`: 12 bytes.
#[repr(C, packed(4))]
#[derive(Clone, Copy, Debug, Default)]
pub struct ResponseX86_32 {
    /// The request's id.
    pub id: u64,
    /// The request's operation.
    pub operation: u8,
    /// Padding.
    pub pad: u8,
    /// `BLKIF_RSP_*`.
    pub status: i16,
}

/// The layout a frontend uses on its ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Abi {
    /// `x86_32-abi`: ids and sectors aligned to 4 bytes.
    #[serde(rename = "x86_32-abi")]
    X86_32,
    /// `x86_64-abi`, also the native layout of 64-bit backends.
    #[serde(rename = "x86_64-abi")]
    X86_64,
}

/// Byte offsets of the fields the parser reads, per ABI.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    /// Size of a ring slot: the union of request and response.
    pub slot: usize,
    /// `id` in a request (every request kind puts it at the same offset).
    pub id: usize,
    /// `sector_number`.
    pub sector: usize,
    /// `seg[0]` of a direct request.
    pub seg: usize,
    /// `nr_sectors` of a discard request.
    pub discard_nr_sectors: usize,
    /// `handle` of an indirect request.
    pub indirect_handle: usize,
    /// `indirect_grefs[0]`.
    pub indirect_grefs: usize,
    /// Response size.
    pub rsp: usize,
    /// `status` in a response.
    pub rsp_status: usize,
}

const fn max(a: usize, b: usize) -> usize {
    if a > b {
        a
    } else {
        b
    }
}

impl Abi {
    /// The layout of this machine's own `struct blkif_request` (what `protocol` absent means).
    pub const NATIVE: Abi = if cfg!(target_pointer_width = "32") && cfg!(target_arch = "x86") {
        Abi::X86_32
    } else {
        Abi::X86_64
    };

    /// The xenstore `protocol` string.
    pub fn name(self) -> &'static str {
        match self {
            Abi::X86_32 => "x86_32-abi",
            Abi::X86_64 => "x86_64-abi",
        }
    }

    /// Parses a xenstore `protocol` string.
    pub fn from_name(s: &str) -> Option<Abi> {
        match s {
            "x86_32-abi" => Some(Abi::X86_32),
            "x86_64-abi" => Some(Abi::X86_64),
            _ => None,
        }
    }

    /// Field offsets for this ABI.
    pub const fn layout(self) -> Layout {
        match self {
            Abi::X86_64 => Layout {
                slot: max(
                    max(size_of::<RequestX86_64>(), size_of::<ResponseX86_64>()),
                    max(size_of::<DiscardX86_64>(), size_of::<IndirectX86_64>()),
                ),
                id: offset_of!(RequestX86_64, id),
                sector: offset_of!(RequestX86_64, sector_number),
                seg: offset_of!(RequestX86_64, seg),
                discard_nr_sectors: offset_of!(DiscardX86_64, nr_sectors),
                indirect_handle: offset_of!(IndirectX86_64, handle),
                indirect_grefs: offset_of!(IndirectX86_64, indirect_grefs),
                rsp: size_of::<ResponseX86_64>(),
                rsp_status: offset_of!(ResponseX86_64, status),
            },
            Abi::X86_32 => Layout {
                slot: max(
                    max(size_of::<RequestX86_32>(), size_of::<ResponseX86_32>()),
                    max(size_of::<DiscardX86_32>(), size_of::<IndirectX86_32>()),
                ),
                id: offset_of!(RequestX86_32, id),
                sector: offset_of!(RequestX86_32, sector_number),
                seg: offset_of!(RequestX86_32, seg),
                discard_nr_sectors: offset_of!(DiscardX86_32, nr_sectors),
                indirect_handle: offset_of!(IndirectX86_32, handle),
                indirect_grefs: offset_of!(IndirectX86_32, indirect_grefs),
                rsp: size_of::<ResponseX86_32>(),
                rsp_status: offset_of!(ResponseX86_32, status),
            },
        }
    }
}

/// The largest slot of any ABI: a buffer this big holds any request.
pub const MAX_SLOT: usize = max(Abi::X86_64.layout().slot, Abi::X86_32.layout().slot);

/// A response as the backend means it, before it is written into a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response {
    /// The request's id.
    pub id: u64,
    /// The request's operation byte, echoed.
    pub operation: u8,
    /// `BLKIF_RSP_*`.
    pub status: i16,
}

#[cfg(test)]
mod tests {
    use super::*;

    // The figures below are those of Xen's public io/blkif.h and Linux xen-blkback's common.h.
    #[test]
    fn x86_64_sizes_and_offsets() {
        assert_eq!(size_of::<Segment>(), 8);
        assert_eq!(offset_of!(Segment, first_sect), 4);
        assert_eq!(offset_of!(Segment, last_sect), 5);
        assert_eq!(size_of::<RequestX86_64>(), 112);
        assert_eq!(offset_of!(RequestX86_64, nr_segments), 1);
        assert_eq!(offset_of!(RequestX86_64, handle), 2);
        assert_eq!(offset_of!(RequestX86_64, id), 8);
        assert_eq!(offset_of!(RequestX86_64, sector_number), 16);
        assert_eq!(offset_of!(RequestX86_64, seg), 24);
        assert_eq!(size_of::<DiscardX86_64>(), 32);
        assert_eq!(offset_of!(DiscardX86_64, flag), 1);
        assert_eq!(offset_of!(DiscardX86_64, nr_sectors), 24);
        assert_eq!(size_of::<IndirectX86_64>(), 64);
        assert_eq!(offset_of!(IndirectX86_64, nr_segments), 2);
        assert_eq!(offset_of!(IndirectX86_64, id), 8);
        assert_eq!(offset_of!(IndirectX86_64, sector_number), 16);
        assert_eq!(offset_of!(IndirectX86_64, handle), 24);
        assert_eq!(offset_of!(IndirectX86_64, indirect_grefs), 28);
        assert_eq!(size_of::<ResponseX86_64>(), 16);
        assert_eq!(offset_of!(ResponseX86_64, operation), 8);
        assert_eq!(offset_of!(ResponseX86_64, status), 10);
        assert_eq!(Abi::X86_64.layout().slot, 112);
    }

    #[test]
    fn x86_32_sizes_and_offsets() {
        assert_eq!(size_of::<RequestX86_32>(), 108);
        assert_eq!(offset_of!(RequestX86_32, id), 4);
        assert_eq!(offset_of!(RequestX86_32, sector_number), 12);
        assert_eq!(offset_of!(RequestX86_32, seg), 20);
        assert_eq!(size_of::<DiscardX86_32>(), 28);
        assert_eq!(offset_of!(DiscardX86_32, nr_sectors), 20);
        assert_eq!(size_of::<IndirectX86_32>(), 64);
        assert_eq!(offset_of!(IndirectX86_32, id), 4);
        assert_eq!(offset_of!(IndirectX86_32, handle), 20);
        assert_eq!(offset_of!(IndirectX86_32, indirect_grefs), 24);
        assert_eq!(size_of::<ResponseX86_32>(), 12);
        assert_eq!(offset_of!(ResponseX86_32, status), 10);
        assert_eq!(Abi::X86_32.layout().slot, 108);
    }

    #[test]
    fn abi_names_roundtrip() {
        for abi in [Abi::X86_32, Abi::X86_64] {
            assert_eq!(Abi::from_name(abi.name()), Some(abi));
        }
        assert_eq!(Abi::from_name("arm-abi"), None);
        assert_eq!(SEGMENTS_PER_INDIRECT_FRAME, 512);
        assert_eq!(MAX_SLOT, 112);
    }

    #[test]
    fn segment_sector_rules() {
        let s = |f, l| Segment {
            gref: 1,
            first_sect: f,
            last_sect: l,
            pad: 0,
        };
        assert_eq!(s(0, 7).sectors(), Some(8));
        assert_eq!(s(3, 3).sectors(), Some(1));
        assert_eq!(s(4, 3).sectors(), None);
        assert_eq!(s(0, 8).sectors(), None);
        assert_eq!(s(0, 255).sectors(), None);
    }
}
