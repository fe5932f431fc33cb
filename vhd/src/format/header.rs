//! The dynamic header, its parent locators, blktap's batmap header, and VHD bitmaps.

use super::*;
use crate::error::{Error, Result};

/// Platform codes of parent locators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlatformCode {
    /// Unused entry.
    None,
    /// Windows relative path (deprecated, ASCII).
    Wi2r,
    /// Windows absolute path (deprecated, ASCII).
    Wi2k,
    /// Windows relative path, UTF-16LE.
    W2ru,
    /// Windows absolute path, UTF-16LE.
    W2ku,
    /// Mac OS alias blob.
    Mac,
    /// File URL, UTF-8.
    MacX,
}

impl PlatformCode {
    /// From the 4-byte code.
    pub fn from_code(c: u32) -> Option<PlatformCode> {
        Some(match c {
            0 => PlatformCode::None,
            0x5769_3272 => PlatformCode::Wi2r,
            0x5769_326b => PlatformCode::Wi2k,
            0x5732_7275 => PlatformCode::W2ru,
            0x5732_6b75 => PlatformCode::W2ku,
            0x4d61_6320 => PlatformCode::Mac,
            0x4d61_6358 => PlatformCode::MacX,
            _ => return None,
        })
    }
    /// The 4-byte code.
    pub fn code(self) -> u32 {
        match self {
            PlatformCode::None => 0,
            PlatformCode::Wi2r => 0x5769_3272,
            PlatformCode::Wi2k => 0x5769_326b,
            PlatformCode::W2ru => 0x5732_7275,
            PlatformCode::W2ku => 0x5732_6b75,
            PlatformCode::Mac => 0x4d61_6320,
            PlatformCode::MacX => 0x4d61_6358,
        }
    }
    /// The name blktap's `vhd-util read -p` prints.
    pub fn name(self) -> &'static str {
        match self {
            PlatformCode::None => "PLAT_CODE_NONE",
            PlatformCode::Wi2r => "PLAT_CODE_WI2R",
            PlatformCode::Wi2k => "PLAT_CODE_WI2K",
            PlatformCode::W2ru => "PLAT_CODE_W2RU",
            PlatformCode::W2ku => "PLAT_CODE_W2KU",
            PlatformCode::Mac => "PLAT_CODE_MAC",
            PlatformCode::MacX => "PLAT_CODE_MACX",
        }
    }
}

/// A parent locator entry of the dynamic header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Locator {
    /// What the data holds.
    pub code: PlatformCode,
    /// Space reserved for the data: sectors by the specification, bytes as blktap and
    /// Windows write it (see [`Locator::space_bytes`]).
    pub data_space: u32,
    /// Bytes of locator data.
    pub data_len: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// Absolute file offset of the data.
    pub data_offset: u64,
}

impl Locator {
    /// An unused entry.
    pub const NONE: Locator = Locator {
        code: PlatformCode::None,
        data_space: 0,
        data_len: 0,
        reserved: 0,
        data_offset: 0,
    };

    /// Bytes reserved for the data, reading `data_space` as sectors when it is below 512 and
    /// as bytes when it is a multiple of 512 (both occur); `None` when neither.
    pub fn space_bytes(&self) -> Option<u64> {
        let s = self.data_space as u64;
        if s < 512 {
            Some(s * SECTOR)
        } else if s.is_multiple_of(SECTOR) {
            Some(s)
        } else {
            None
        }
    }
}

/// The dynamic disk header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Absolute offset of the BAT.
    pub table_offset: u64,
    /// Entries the BAT has room for.
    pub max_table_entries: u32,
    /// Bytes per block: a power of two, 512 B ..= 2 MiB.
    pub block_size: u32,
    /// The parent's footer uuid (differencing disks; nil for a raw parent).
    pub parent_uuid: Uuid,
    /// The parent's modification time when linked.
    pub parent_timestamp: u32,
    /// The parent's file name, UTF-16 big-endian, 512 bytes.
    pub parent_name: [u8; 512],
    /// Eight parent locator entries.
    pub locators: [Locator; 8],
    /// Whether the reserved fields were zero when read.
    pub reserved_zero: bool,
}

impl Header {
    /// Parses and validates 1024 header bytes.
    pub fn parse(b: &[u8; HEADER_SIZE]) -> Result<Header> {
        const S: &str = "dynamic header";
        if &b[0..8] != HEADER_COOKIE {
            return Err(Error::field(
                S,
                "cookie",
                format!("{:?}, not \"cxsparse\"", String::from_utf8_lossy(&b[0..8])),
            ));
        }
        let stored = be32(b, 36);
        let computed = checksum(b, 36);
        if stored != computed {
            return Err(Error::Checksum {
                structure: S,
                stored,
                computed,
            });
        }
        if be64(b, 8) != u64::MAX {
            return Err(Error::field(S, "data_offset", "must be all ones"));
        }
        let version = be32(b, 24);
        if version != HEADER_VERSION {
            return Err(Error::field(
                S,
                "header_version",
                format!("{version:#010x}"),
            ));
        }
        let table_offset = be64(b, 16);
        if !table_offset.is_multiple_of(SECTOR) || table_offset == 0 {
            return Err(Error::field(
                S,
                "table_offset",
                format!("{table_offset:#x} is not a non-zero multiple of 512"),
            ));
        }
        let block_size = be32(b, 32);
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(Error::field(
                S,
                "block_size",
                format!("{block_size}: a power of two from 512 to 2097152 expected"),
            ));
        }
        let mut locators = [Locator::NONE; 8];
        for (i, l) in locators.iter_mut().enumerate() {
            let o = 576 + i * 24;
            let code = be32(b, o);
            let Some(pc) = PlatformCode::from_code(code) else {
                return Err(Error::field(
                    format!("parent locator {i}"),
                    "platform_code",
                    format!("unknown code {code:#010x}"),
                ));
            };
            *l = Locator {
                code: pc,
                data_space: be32(b, o + 4),
                data_len: be32(b, o + 8),
                reserved: be32(b, o + 12),
                data_offset: be64(b, o + 16),
            };
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[40..56]);
        let mut parent_name = [0u8; 512];
        parent_name.copy_from_slice(&b[64..576]);
        Ok(Header {
            table_offset,
            max_table_entries: be32(b, 28),
            block_size,
            parent_uuid: Uuid(uuid),
            parent_timestamp: be32(b, 56),
            parent_name,
            locators,
            reserved_zero: be32(b, 60) == 0 && b[768..].iter().all(|&x| x == 0),
        })
    }

    /// The 1024 bytes, checksum computed.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(HEADER_COOKIE);
        put64(&mut b, 8, u64::MAX);
        put64(&mut b, 16, self.table_offset);
        put32(&mut b, 24, HEADER_VERSION);
        put32(&mut b, 28, self.max_table_entries);
        put32(&mut b, 32, self.block_size);
        b[40..56].copy_from_slice(&self.parent_uuid.0);
        put32(&mut b, 56, self.parent_timestamp);
        b[64..576].copy_from_slice(&self.parent_name);
        for (i, l) in self.locators.iter().enumerate() {
            let o = 576 + i * 24;
            put32(&mut b, o, l.code.code());
            put32(&mut b, o + 4, l.data_space);
            put32(&mut b, o + 8, l.data_len);
            put32(&mut b, o + 12, l.reserved);
            put64(&mut b, o + 16, l.data_offset);
        }
        let c = checksum(&b, 36);
        put32(&mut b, 36, c);
        b
    }

    /// The parent's file name, decoded from UTF-16BE up to the first NUL.
    pub fn parent_name(&self) -> String {
        let units: Vec<u16> = self
            .parent_name
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        String::from_utf16_lossy(&units)
    }

    /// Sets the parent's file name (UTF-16BE, cut at 256 code units).
    pub fn set_parent_name(&mut self, name: &str) {
        self.parent_name = [0; 512];
        for (i, u) in name.encode_utf16().take(256).enumerate() {
            self.parent_name[2 * i..2 * i + 2].copy_from_slice(&u.to_be_bytes());
        }
    }
}

/// blktap's batmap header, one sector after the BAT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatmapHeader {
    /// Absolute offset of the map.
    pub offset: u64,
    /// Sectors of the map.
    pub size_sectors: u32,
    /// 1.1 or 1.2.
    pub version: u32,
    /// Checksum of the map's bytes ([`batmap_checksum`]).
    pub checksum: u32,
    /// blktap's generic marker byte.
    pub marker: u8,
    /// Key hash of encrypted images (65 bytes: set flag, nonce, hash); kept as read.
    pub keyhash: [u8; 65],
}

impl BatmapHeader {
    /// Parses 512 bytes; `Ok(None)` when the cookie is not there.
    pub fn parse(b: &[u8; BATMAP_HEADER_SIZE]) -> Result<Option<BatmapHeader>> {
        const S: &str = "batmap header";
        if &b[0..8] != BATMAP_COOKIE {
            return Ok(None);
        }
        let version = be32(b, 20);
        if version > BATMAP_VERSION {
            return Err(Error::field(
                S,
                "batmap_version",
                format!("{version:#010x}"),
            ));
        }
        let offset = be64(b, 8);
        if !offset.is_multiple_of(SECTOR) || offset == 0 {
            return Err(Error::field(S, "batmap_offset", format!("{offset:#x}")));
        }
        let mut keyhash = [0u8; 65];
        keyhash.copy_from_slice(&b[29..94]);
        Ok(Some(BatmapHeader {
            offset,
            size_sectors: be32(b, 16),
            version,
            checksum: be32(b, 24),
            marker: b[28],
            keyhash,
        }))
    }

    /// The 512 bytes.
    pub fn encode(&self) -> [u8; BATMAP_HEADER_SIZE] {
        let mut b = [0u8; BATMAP_HEADER_SIZE];
        b[0..8].copy_from_slice(BATMAP_COOKIE);
        put64(&mut b, 8, self.offset);
        put32(&mut b, 16, self.size_sectors);
        put32(&mut b, 20, self.version);
        put32(&mut b, 24, self.checksum);
        b[28] = self.marker;
        b[29..94].copy_from_slice(&self.keyhash);
        b
    }
}

/// Bytes of the batmap that blktap reads and checksums for a disk of `current_size` bytes:
/// one bit per 2 MiB, the byte count rounded down, then up to whole sectors (at least one).
pub fn batmap_used_bytes(current_size: u64) -> u64 {
    (current_size >> 24).div_ceil(SECTOR).max(1) * SECTOR
}

/// The batmap checksum: ones' complement of the byte sum (bytes signed in version 1.1).
pub fn batmap_checksum(map: &[u8], version: u32) -> u32 {
    let sum = map.iter().fold(0u32, |s, &b| {
        let v = if version == BATMAP_VERSION_1_1 {
            b as i8 as i32 as u32
        } else {
            b as u32
        };
        s.wrapping_add(v)
    });
    !sum
}

/// Bit `n` of a VHD bitmap (most significant bit first).
#[inline]
pub fn test_bit(map: &[u8], n: usize) -> bool {
    map.get(n >> 3).is_some_and(|b| b & (0x80 >> (n & 7)) != 0)
}

/// Sets bit `n`.
#[inline]
pub fn set_bit(map: &mut [u8], n: usize) {
    if let Some(b) = map.get_mut(n >> 3) {
        *b |= 0x80 >> (n & 7);
    }
}

/// Clears bit `n`.
#[inline]
pub fn clear_bit(map: &mut [u8], n: usize) {
    if let Some(b) = map.get_mut(n >> 3) {
        *b &= !(0x80 >> (n & 7));
    }
}

/// Length of the run of bits equal to bit `from`, from `from` up to `end` (exclusive).
pub fn run_len(map: &[u8], from: usize, end: usize) -> usize {
    let v = test_bit(map, from);
    let mut i = from;
    while i < end {
        // Whole bytes at a time where aligned.
        if i & 7 == 0 && i + 8 <= end {
            let byte = map.get(i >> 3).copied().unwrap_or(0);
            if byte == if v { 0xff } else { 0 } {
                i += 8;
                continue;
            }
        }
        if test_bit(map, i) != v {
            break;
        }
        i += 1;
    }
    i - from
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{
        checksum, geometry, time_string, DiskType, Footer, Uuid, DEFAULT_BLOCK_SIZE,
    };

    #[test]
    fn footer_round_trips_and_checksum_is_checked() {
        let f = Footer::new(DiskType::Dynamic, 128 << 20);
        let b = f.encode();
        assert_eq!(Footer::parse(&b).unwrap(), f);
        let mut bad = b;
        bad[50] ^= 1;
        assert!(matches!(Footer::parse(&bad), Err(Error::Checksum { .. })));
    }

    #[test]
    fn footer_fields_are_named_in_errors() {
        let mut f = Footer::new(DiskType::Dynamic, 1 << 20);
        f.current_size = 1000;
        let e = Footer::parse(&f.encode()).unwrap_err().to_string();
        assert!(e.contains("current_size"), "{e}");
        let mut b = Footer::new(DiskType::Fixed, 1 << 20).encode();
        b[63] = 9;
        let c = checksum(&b, 64);
        b[64..68].copy_from_slice(&c.to_be_bytes());
        let e = Footer::parse(&b).unwrap_err().to_string();
        assert!(e.contains("disk_type"), "{e}");
    }

    #[test]
    fn header_round_trips() {
        let mut h = Header {
            table_offset: 1536,
            max_table_entries: 64,
            block_size: DEFAULT_BLOCK_SIZE,
            parent_uuid: Uuid::random(),
            parent_timestamp: 7,
            parent_name: [0; 512],
            locators: [Locator::NONE; 8],
            reserved_zero: true,
        };
        h.set_parent_name("base.vhd");
        h.locators[0] = Locator {
            code: PlatformCode::MacX,
            data_space: 512,
            data_len: 19,
            reserved: 0,
            data_offset: 4096,
        };
        let b = h.encode();
        let p = Header::parse(&b).unwrap();
        assert_eq!(p, h);
        assert_eq!(p.parent_name(), "base.vhd");
    }

    #[test]
    fn geometry_matches_the_specification_table() {
        // 128 MiB: 262144 sectors -> 17 spt, 4 heads? cth = 15420, heads = 16 -> 31 spt...
        let g = geometry(128 << 20);
        let (c, h, s) = (g >> 16, (g >> 8) & 0xff, g & 0xff);
        assert!(c * h * s <= 262_144 && h <= 16 && s <= 255);
        assert_eq!(geometry(1 << 40) & 0xff, 255);
    }

    #[test]
    fn time_strings_read_like_ctime() {
        assert_eq!(time_string(0), "Sat Jan  1 00:00:00 2000");
        assert_eq!(time_string(86_400 * 366 + 3661), "Mon Jan  1 01:01:01 2001");
    }

    #[test]
    fn bit_runs() {
        let mut m = [0u8; 64];
        for i in 10..300 {
            set_bit(&mut m, i);
        }
        assert_eq!(run_len(&m, 0, 512), 10);
        assert_eq!(run_len(&m, 10, 512), 290);
        assert_eq!(run_len(&m, 300, 512), 212);
        assert_eq!(run_len(&m, 12, 100), 88);
        clear_bit(&mut m, 20);
        assert_eq!(run_len(&m, 10, 512), 10);
    }
}
