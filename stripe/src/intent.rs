//! The write-intent record of a replicated striped disk (md's write-intent bitmap, DRBD's
//! activity log): which regions of the disk may hold replicas that differ, because writes to
//! them were (or may have been) in flight.
//!
//! A region is marked durable in the record *before* any write to it goes out, and cleared
//! lazily, once no write to it has been in flight for a whole cleaning interval (so every
//! replica acknowledged every write). After an unclean stop (a crash, SIGKILL) or a takeover
//! by another writer, the regions the record names are copied from one chosen replica to the
//! others before the disk serves them ([`crate::resync`]); elsewhere the replicas are equal.
//!
//! # Format (version 1), little-endian
//!
//! | offset | bytes | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `TDSTWIR1` |
//! | 8 | 4 | version, 1 |
//! | 12 | 4 | header length, 64 |
//! | 16 | 8 | region size in bytes (a power of two, at least 64 KiB) |
//! | 24 | 8 | disk size in bytes |
//! | 32 | 8 | the writer's fencing token (0 for a file-backed disk) |
//! | 40 | 8 | sequence number: one more than the record it replaces |
//! | 48 | 4 | regions in the disk, `ceil(size / region size)` |
//! | 52 | 4 | N, regions marked |
//! | 56 | 4 | flags, 0 (none defined) |
//! | 60 | 4 | CRC32C of bytes 0..60 followed by the N region numbers |
//! | 64 | 4 N | the marked region numbers, strictly ascending, each below the region count |
//!
//! Region `r` covers disk bytes `r * region size .. (r + 1) * region size` (the last one ends
//! at the disk's end). Where it lives: for a file-backed disk, `MAP.intent` beside the mapping
//! file holds two slots of [`slot_len`] bytes, at offsets 0 and `slot_len`; records alternate
//! between them (sequence number even: slot 0, odd: slot 1), each written with `pwrite` and
//! `fdatasync`, and the valid slot with the higher sequence number is the record (a torn write
//! spoils one slot, never both). For an etcd-backed disk the record is the value of the key
//! `PREFIX/intent/DISK`, replaced in a transaction that also checks the writer's lease key.

use crate::Error;

/// The magic bytes.
pub const MAGIC: &[u8; 8] = b"TDSTWIR1";
/// The format version written and read.
pub const VERSION: u32 = 1;
/// Header bytes.
pub const HEADER: usize = 64;
/// Most regions a disk is cut into (the region size grows for larger disks).
pub const MAX_REGIONS: u64 = 1 << 20;
/// The smallest region.
pub const MIN_REGION: u64 = 1 << 20;

/// The region size for a disk of `size` bytes striped in units of `stripe_size`: 1 MiB, or
/// the stripe unit if larger, doubled until the disk has at most [`MAX_REGIONS`] regions.
pub fn region_size(size: u64, stripe_size: u64) -> u64 {
    let mut r = MIN_REGION.max(stripe_size.next_power_of_two());
    while size.div_ceil(r) > MAX_REGIONS {
        r *= 2;
    }
    r
}

/// Bytes of one slot of the file: a record with every region marked, in 4 KiB.
pub fn slot_len(regions: u32) -> u64 {
    (HEADER as u64 + 4 * u64::from(regions)).next_multiple_of(4096)
}

/// One write-intent record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Region size in bytes.
    pub region_size: u64,
    /// Disk size in bytes.
    pub disk_size: u64,
    /// The writer's fencing token (0: none).
    pub token: u64,
    /// Sequence number.
    pub seq: u64,
    /// Marked regions, ascending.
    pub marked: Vec<u32>,
}

fn bad(why: impl Into<String>) -> Error {
    Error::Invalid(format!("write-intent record: {}", why.into()))
}

impl Record {
    /// Regions in the disk.
    pub fn regions(&self) -> u32 {
        self.disk_size.div_ceil(self.region_size) as u32
    }

    /// The record's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER + 4 * self.marked.len());
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&(HEADER as u32).to_le_bytes());
        b.extend_from_slice(&self.region_size.to_le_bytes());
        b.extend_from_slice(&self.disk_size.to_le_bytes());
        b.extend_from_slice(&self.token.to_le_bytes());
        b.extend_from_slice(&self.seq.to_le_bytes());
        b.extend_from_slice(&self.regions().to_le_bytes());
        b.extend_from_slice(&(self.marked.len() as u32).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        let mut list = Vec::with_capacity(4 * self.marked.len());
        for r in &self.marked {
            list.extend_from_slice(&r.to_le_bytes());
        }
        let crc = crc32c::crc32c_append(crc32c::crc32c(&b), &list);
        b.extend_from_slice(&crc.to_le_bytes());
        b.extend_from_slice(&list);
        b
    }

    /// Parses and checks a record (untrusted bytes: a file or a key anyone could have
    /// written); `disk_size` and `region_size` must be the disk's. Bytes after the list are
    /// ignored (a file slot is longer than its record).
    pub fn decode(b: &[u8], disk_size: u64, region_size: u64) -> Result<Record, Error> {
        if b.len() < HEADER {
            return Err(bad(format!("{} bytes, shorter than its header", b.len())));
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        if &b[..8] != MAGIC {
            return Err(bad("no TDSTWIR1 magic"));
        }
        if u32_at(8) != VERSION || u32_at(12) != HEADER as u32 {
            return Err(bad(format!(
                "version {} header {} (this build reads version {VERSION})",
                u32_at(8),
                u32_at(12)
            )));
        }
        let rec_region = u64_at(16);
        let rec_size = u64_at(24);
        if rec_region != region_size || rec_size != disk_size {
            return Err(bad(format!(
                "for a disk of {rec_size} bytes in regions of {rec_region}, not {disk_size} in {region_size}"
            )));
        }
        let regions = u32_at(48);
        if u64::from(regions) != disk_size.div_ceil(region_size) {
            return Err(bad(format!("region count {regions} does not fit the disk")));
        }
        let n = u32_at(52) as usize;
        let end = n
            .checked_mul(4)
            .and_then(|l| l.checked_add(HEADER))
            .filter(|&e| e <= b.len())
            .ok_or_else(|| bad(format!("{n} marked regions, more than its bytes hold")))?;
        let want = u32_at(60);
        let got = crc32c::crc32c_append(crc32c::crc32c(&b[..60]), &b[HEADER..end]);
        if want != got {
            return Err(bad("checksum mismatch (torn or damaged)"));
        }
        let mut marked = Vec::with_capacity(n);
        for k in 0..n {
            let r = u32_at(HEADER + 4 * k);
            if r >= regions || marked.last().is_some_and(|&p| p >= r) {
                return Err(bad(format!("region {r} out of range or out of order")));
            }
            marked.push(r);
        }
        Ok(Record {
            region_size,
            disk_size,
            token: u64_at(32),
            seq: u64_at(40),
            marked,
        })
    }
}

/// Of the two slots of a record file, the valid one with the higher sequence number (None when
/// neither is valid).
pub fn pick_slot(a: Option<Record>, b: Option<Record>) -> Option<Record> {
    match (a, b) {
        (Some(x), Some(y)) => Some(if y.seq > x.seq { y } else { x }),
        (x, y) => x.or(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(marked: Vec<u32>) -> Record {
        Record {
            region_size: 1 << 20,
            disk_size: 64 << 20,
            token: 7,
            seq: 3,
            marked,
        }
    }

    #[test]
    fn round_trips_and_damage_is_caught() {
        let r = rec(vec![0, 5, 63]);
        let b = r.encode();
        assert_eq!(b.len(), HEADER + 12);
        assert_eq!(&b[..8], b"TDSTWIR1");
        assert_eq!(Record::decode(&b, 64 << 20, 1 << 20).unwrap(), r);
        // Padding after the list is fine (a file slot).
        let mut padded = b.clone();
        padded.resize(4096, 0);
        assert_eq!(Record::decode(&padded, 64 << 20, 1 << 20).unwrap(), r);
        for i in [0, 9, 17, 30, 45, 53, 61, 66, 70] {
            let mut d = b.clone();
            d[i] ^= 0x10;
            assert!(Record::decode(&d, 64 << 20, 1 << 20).is_err(), "byte {i}");
        }
        assert!(Record::decode(&b[..b.len() - 1], 64 << 20, 1 << 20).is_err());
        assert!(
            Record::decode(&b, 32 << 20, 1 << 20).is_err(),
            "another disk"
        );
        assert!(Record::decode(&[], 64 << 20, 1 << 20).is_err());
        // Out of range or unsorted lists are refused even with a good checksum.
        for m in [vec![64], vec![3, 3], vec![4, 2]] {
            let b = rec(m).encode();
            assert!(Record::decode(&b, 64 << 20, 1 << 20).is_err());
        }
        // A huge count with few bytes behind it allocates nothing.
        let mut d = rec(vec![]).encode();
        d[52..56].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Record::decode(&d, 64 << 20, 1 << 20).is_err());
    }

    #[test]
    fn region_sizes_and_slots() {
        assert_eq!(region_size(64 << 20, 64 << 10), 1 << 20);
        assert_eq!(region_size(64 << 20, 4 << 20), 4 << 20);
        assert_eq!(region_size(3 << 20, 3 << 20), 4 << 20);
        let huge = 4u64 << 40;
        let r = region_size(huge, 64 << 10);
        assert!(huge.div_ceil(r) <= MAX_REGIONS && huge.div_ceil(r / 2) > MAX_REGIONS);
        assert_eq!(slot_len(64), 4096);
        assert_eq!(slot_len(1024), 8192);
        let (a, b) = (
            rec(vec![1]),
            Record {
                seq: 4,
                ..rec(vec![2])
            },
        );
        assert_eq!(pick_slot(Some(a.clone()), Some(b.clone())), Some(b.clone()));
        assert_eq!(pick_slot(None, Some(a.clone())), Some(a));
        assert_eq!(pick_slot(None, None), None);
    }
}
