//! Table entries: L1 and L2 entries, compressed cluster descriptors and refcount block
//! entries of every width, decoded from and encoded to their on-disk bits.

use crate::error::{corrupt, Result};

/// Bit 63 of L1 and L2 entries: the refcount of what it points to is exactly one.
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of L2 entries: a compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of standard L2 entries (version 3): the cluster reads as zeroes.
pub const ZERO: u64 = 1;
/// Bits 9..=55: a cluster offset in the file.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits that must be 0 in an L1 entry.
const L1_RESERVED: u64 = !(OFFSET_MASK | COPIED);
/// Bits that must be 0 in a standard L2 entry (1..=8 and 56..=61).
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Offsets must stay below 2^56 (64 PiB): the L1/L2 offset fields are that wide.
pub const MAX_HOST_OFFSET: u64 = 1 << 56;

/// Decodes an L1 entry: the L2 table's offset (0: none) and whether its refcount is one.
pub fn l1_entry(e: u64, index: u64, cluster_bits: u32) -> Result<(u64, bool)> {
    if e & L1_RESERVED != 0 {
        return Err(corrupt!(
            "L1 entry {index} ({e:#018x}) has reserved bits set"
        ));
    }
    let off = e & OFFSET_MASK;
    if off & ((1 << cluster_bits) - 1) != 0 {
        return Err(corrupt!(
            "L1 entry {index}: L2 table offset {off:#x} is not aligned to a cluster"
        ));
    }
    Ok((off, e & COPIED != 0))
}

/// A compressed cluster: where its deflate stream lies in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Compressed {
    /// First byte of the compressed data.
    pub offset: u64,
    /// Bytes from `offset` to the end of the last 512-byte sector holding its data.
    pub len: u64,
}

impl Compressed {
    /// The host clusters the data touches, as `(first cluster offset, count)`: each holds a
    /// reference for this compressed cluster.
    pub fn clusters(&self, cluster_bits: u32) -> (u64, u64) {
        let first = self.offset >> cluster_bits;
        let last = (self.offset + self.len - 1) >> cluster_bits;
        (first << cluster_bits, last - first + 1)
    }
}

/// What an L2 entry says about a guest cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2 {
    /// Not allocated here: read the backing file (or zeroes without one).
    Unallocated,
    /// Reads as zeroes; `Some(offset)` when a host cluster stays preallocated for it.
    Zero(Option<u64>),
    /// Data in the host cluster at `offset`; `copied`: its refcount is exactly one, so it
    /// may be written in place.
    Data {
        /// The host cluster.
        offset: u64,
        /// Bit 63.
        copied: bool,
    },
    /// Compressed data.
    Compressed(Compressed),
}

/// Decodes an L2 entry of an image with `cluster_bits` and `version` (no extended L2).
pub fn l2_entry(e: u64, index: u64, cluster_bits: u32, version: u32) -> Result<L2> {
    if e & COMPRESSED != 0 {
        // x = 62 - (cluster_bits - 8) bits of offset, then the extra sector count.
        let x = 62 - (cluster_bits - 8);
        let desc = e & !(COPIED | COMPRESSED);
        let offset = desc & ((1u64 << x) - 1);
        let sectors = desc >> x;
        if offset >= MAX_HOST_OFFSET {
            return Err(corrupt!(
                "L2 entry {index}: compressed data offset {offset:#x} beyond 64 PiB"
            ));
        }
        if offset == 0 {
            return Err(corrupt!(
                "L2 entry {index}: compressed data at offset 0 (the header)"
            ));
        }
        let len = (sectors + 1) * 512 - (offset & 511);
        return Ok(L2::Compressed(Compressed { offset, len }));
    }
    if e & L2_RESERVED != 0 {
        return Err(corrupt!(
            "L2 entry {index} ({e:#018x}) has reserved bits set"
        ));
    }
    let off = e & OFFSET_MASK;
    if off & ((1 << cluster_bits) - 1) != 0 {
        return Err(corrupt!(
            "L2 entry {index}: cluster offset {off:#x} is not aligned to a cluster"
        ));
    }
    if e & ZERO != 0 {
        if version < 3 {
            return Err(corrupt!("L2 entry {index}: zero flag in a version 2 image"));
        }
        return Ok(L2::Zero((off != 0).then_some(off)));
    }
    if off == 0 {
        if e & COPIED != 0 {
            return Err(corrupt!(
                "L2 entry {index}: offset 0 with the copied bit (external data files are \
                 not supported)"
            ));
        }
        return Ok(L2::Unallocated);
    }
    Ok(L2::Data {
        offset: off,
        copied: e & COPIED != 0,
    })
}

/// Refcount block entries of one width (`refcount_order` 0..=6).
#[derive(Clone, Copy, Debug)]
pub struct Refcounts {
    order: u32,
}

impl Refcounts {
    /// Entries `2^order` bits wide.
    pub fn new(order: u32) -> Refcounts {
        debug_assert!(order <= 6);
        Refcounts { order }
    }

    /// Bits per entry.
    pub fn bits(&self) -> u32 {
        1 << self.order
    }

    /// The largest refcount an entry holds.
    pub fn max(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << self.bits()) - 1
        }
    }

    /// Entries in `bytes` bytes.
    pub fn per(&self, bytes: u64) -> u64 {
        (bytes * 8) >> self.order
    }

    /// Entry `i` of `block`. Sub-byte entries count from the least significant bit; wider
    /// ones are big-endian.
    pub fn get(&self, block: &[u8], i: usize) -> u64 {
        match self.order {
            0..=2 => {
                let bits = self.bits() as usize;
                let bit = i * bits;
                (block[bit / 8] as u64 >> (bit % 8)) & ((1 << bits) - 1)
            }
            3 => block[i] as u64,
            4 => u16::from_be_bytes([block[2 * i], block[2 * i + 1]]) as u64,
            5 => {
                let mut b = [0u8; 4];
                b.copy_from_slice(&block[4 * i..4 * i + 4]);
                u32::from_be_bytes(b) as u64
            }
            _ => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&block[8 * i..8 * i + 8]);
                u64::from_be_bytes(b)
            }
        }
    }

    /// Sets entry `i` of `block` to `v` (at most [`Refcounts::max`]).
    pub fn set(&self, block: &mut [u8], i: usize, v: u64) {
        debug_assert!(v <= self.max());
        match self.order {
            0..=2 => {
                let bits = self.bits() as usize;
                let bit = i * bits;
                let mask = (((1u16 << bits) - 1) << (bit % 8)) as u8;
                let b = &mut block[bit / 8];
                *b = (*b & !mask) | (((v as u8) << (bit % 8)) & mask);
            }
            3 => block[i] = v as u8,
            4 => block[2 * i..2 * i + 2].copy_from_slice(&(v as u16).to_be_bytes()),
            5 => block[4 * i..4 * i + 4].copy_from_slice(&(v as u32).to_be_bytes()),
            _ => block[8 * i..8 * i + 8].copy_from_slice(&v.to_be_bytes()),
        }
    }
}

/// Reads big-endian u64 number `i` of `b`.
pub fn be64_at(b: &[u8], i: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[8 * i..8 * i + 8]);
    u64::from_be_bytes(x)
}

/// Writes big-endian u64 number `i` of `b`.
pub fn put_be64_at(b: &mut [u8], i: usize, v: u64) {
    b[8 * i..8 * i + 8].copy_from_slice(&v.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcounts_of_every_width_round_trip() {
        for order in 0..=6 {
            let r = Refcounts::new(order);
            let mut block = vec![0u8; 512];
            let n = r.per(512) as usize;
            for i in 0..n {
                r.set(&mut block, i, (i as u64 * 7 + 3) & r.max());
            }
            for i in 0..n {
                assert_eq!(
                    r.get(&block, i),
                    (i as u64 * 7 + 3) & r.max(),
                    "order {order}"
                );
            }
        }
        // Sub-byte entries start at the least significant bit.
        let r = Refcounts::new(1);
        let mut b = [0u8; 1];
        r.set(&mut b, 0, 1);
        r.set(&mut b, 3, 2);
        assert_eq!(b[0], 0b1000_0001);
    }

    #[test]
    fn l2_entries_decode() {
        assert_eq!(l2_entry(0, 0, 16, 3).unwrap(), L2::Unallocated);
        assert_eq!(l2_entry(1, 0, 16, 3).unwrap(), L2::Zero(None));
        assert_eq!(
            l2_entry(COPIED | 0x50000 | 1, 0, 16, 3).unwrap(),
            L2::Zero(Some(0x50000))
        );
        assert_eq!(
            l2_entry(COPIED | 0x50000, 0, 16, 3).unwrap(),
            L2::Data {
                offset: 0x50000,
                copied: true
            }
        );
        assert!(l2_entry(1, 0, 16, 2).is_err());
        assert!(l2_entry(0x50200, 0, 16, 3).is_err());
        assert!(l2_entry(0x50000 | 2, 0, 16, 3).is_err());
        // 64 KiB clusters: 54 offset bits, then the sector count.
        let e = COMPRESSED | (3u64 << 54) | 0x12345;
        assert_eq!(
            l2_entry(e, 0, 16, 3).unwrap(),
            L2::Compressed(Compressed {
                offset: 0x12345,
                len: 4 * 512 - 0x145
            })
        );
    }
}
