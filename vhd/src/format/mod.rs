//! The on-disk structures, as explicit big-endian encodings (FORMAT.md draws every byte).
//!
//! Parsing copies the bytes once into a plain struct and checks every field that the rest of
//! the crate relies on, with an error naming the field; the checks that need the file's size
//! (offsets inside the file) are in `layout.rs`. Encoding writes every byte, checksums included.

/// Bytes in a sector; every VHD offset and size is counted in these or in bytes.
pub const SECTOR: u64 = 512;
/// Size of the footer (and of its copy at offset 0 of dynamic disks).
pub const FOOTER_SIZE: usize = 512;
/// Size of the dynamic disk header.
pub const HEADER_SIZE: usize = 1024;
/// Size of blktap's batmap header.
pub const BATMAP_HEADER_SIZE: usize = 512;
/// A BAT entry of a block not allocated.
pub const BAT_UNUSED: u32 = 0xffff_ffff;
/// The default (and blktap's only) block size: 2 MiB.
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;
/// Largest block size accepted: its sector bitmap fills one sector.
pub const MAX_BLOCK_SIZE: u32 = 2 << 20;
/// Smallest block size accepted.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Seconds from the Unix epoch to the VHD epoch (2000-01-01 00:00:00 UTC).
pub const VHD_EPOCH: i64 = 946_684_800;
/// Footer cookie.
pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
/// Dynamic header cookie.
pub const HEADER_COOKIE: &[u8; 8] = b"cxsparse";
/// Batmap header cookie.
pub const BATMAP_COOKIE: &[u8; 8] = b"tdbatmap";
/// Footer cookie of an image blktap's tools disabled ("poisoned").
pub const POISON_COOKIE: &[u8; 8] = b"v_poison";
/// The only file format version.
pub const FILE_FORMAT_VERSION: u32 = 0x0001_0000;
/// The only dynamic header version.
pub const HEADER_VERSION: u32 = 0x0001_0000;
/// Footer feature: temporary disk.
pub const FEATURE_TEMPORARY: u32 = 1;
/// Footer feature: reserved, always set.
pub const FEATURE_RESERVED: u32 = 2;
/// The creator application blktap writes, and so do we.
pub const CREATOR_TAP: [u8; 4] = *b"tap\0";
/// blktap's creator version 1.3 (big-endian bitmaps, batmap 1.2).
pub const CREATOR_VERSION: u32 = 0x0001_0003;
/// Batmap version 1.2 (unsigned byte checksum).
pub const BATMAP_VERSION: u32 = 0x0001_0002;
/// Batmap version 1.1 (signed byte checksum).
pub const BATMAP_VERSION_1_1: u32 = 0x0001_0001;

mod footer;
mod header;
mod time;

pub use footer::{geometry, DiskType, Footer};
pub use header::{
    batmap_checksum, batmap_used_bytes, clear_bit, run_len, set_bit, test_bit, BatmapHeader,
    Header, Locator, PlatformCode,
};
pub use time::{time_string, vhd_now, vhd_time, Uuid};

/// Reads a big-endian u32/u64 at `o` of a slice whose length the caller has checked.
pub(crate) fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
pub(crate) fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}
pub(crate) fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_be_bytes());
}
pub(crate) fn put64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_be_bytes());
}

/// The VHD checksum: the ones' complement of the byte sum, the checksum field counted as 0.
pub fn checksum(bytes: &[u8], field: usize) -> u32 {
    // All bytes, then less the field's: no test per byte.
    let all = bytes
        .iter()
        .fold(0u32, |s, &x| s.wrapping_add(u32::from(x)));
    let stored = bytes
        .iter()
        .skip(field)
        .take(4)
        .fold(0u32, |s, &x| s.wrapping_add(u32::from(x)));
    !all.wrapping_sub(stored)
}

#[cfg(test)]
mod tests {
    use super::checksum;

    #[test]
    fn checksum_leaves_out_the_field_wherever_it_is() {
        let b: Vec<u8> = (0..600u32).map(|i| (i * 37 + 11) as u8).collect();
        let naive = |field: usize| {
            !b.iter()
                .enumerate()
                .filter(|(i, _)| !(field..field + 4).contains(i))
                .fold(0u32, |s, (_, &x)| s.wrapping_add(x as u32))
        };
        for field in [0, 64, 596, 598, 600, 1000] {
            assert_eq!(checksum(&b, field), naive(field), "field at {field}");
        }
    }
}
