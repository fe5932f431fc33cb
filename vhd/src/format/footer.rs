//! The footer and the disk's CHS geometry.

use super::{
    be32, be64, checksum, put32, put64, vhd_now, Uuid, CREATOR_TAP, CREATOR_VERSION,
    FEATURE_RESERVED, FEATURE_TEMPORARY, FILE_FORMAT_VERSION, FOOTER_COOKIE, FOOTER_SIZE,
    POISON_COOKIE, SECTOR,
};
use crate::error::{Error, Result};

/// The CHS geometry the specification derives from a size (cylinders, heads, sectors per
/// track), encoded as the footer stores it.
pub fn geometry(size: u64) -> u32 {
    let mut secs = size.div_ceil(SECTOR).max(1);
    secs = secs.min(65_535 * 16 * 255);
    let (spt, heads, cth);
    if secs >= 65_535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cth = secs / spt;
    } else {
        let mut s = 17;
        let mut c = secs / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = secs / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = secs / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    let cyl = cth / heads;
    ((cyl as u32) << 16) | ((heads as u32) << 8) | spt as u32
}

/// The kind of disk (footer `disk_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum DiskType {
    /// All data in place, followed by the footer.
    Fixed,
    /// Blocks allocated on first write through the BAT.
    Dynamic,
    /// A dynamic disk whose unwritten sectors come from a parent.
    Differencing,
}

impl DiskType {
    /// The footer's code.
    pub fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }
    /// What blktap's `vhd-util read -p` prints.
    pub fn describe(self) -> &'static str {
        match self {
            DiskType::Fixed => "Fixed hard disk",
            DiskType::Dynamic => "Dynamic hard disk",
            DiskType::Differencing => "Differencing hard disk",
        }
    }
}

/// The footer, at the end of every VHD (and copied at offset 0 of dynamic disks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footer {
    /// Feature bits ([`FEATURE_TEMPORARY`], [`FEATURE_RESERVED`]).
    pub features: u32,
    /// Offset of the dynamic header; all ones for fixed disks.
    pub data_offset: u64,
    /// Creation time, seconds since 2000-01-01 UTC.
    pub timestamp: u32,
    /// Creator application, 4 bytes ("tap\0" for blktap and us).
    pub creator_app: [u8; 4],
    /// Creator version (major << 16 | minor).
    pub creator_version: u32,
    /// Creator host OS code.
    pub creator_os: u32,
    /// Size at creation, bytes.
    pub original_size: u64,
    /// Virtual size, bytes.
    pub current_size: u64,
    /// CHS geometry.
    pub geometry: u32,
    /// Fixed, dynamic or differencing.
    pub disk_type: DiskType,
    /// The disk's id; children name their parent by it.
    pub uuid: Uuid,
    /// Saved-state flag.
    pub saved_state: u8,
    /// blktap's `hidden` flag (byte 85): a snapshot node no VM uses directly.
    pub hidden: u8,
    /// Whether bytes 86..512 were zero when read.
    pub reserved_zero: bool,
}

impl Footer {
    /// Parses and validates 512 footer bytes. The checksum must match (with blktap's
    /// allowance for old tap images whose `hidden` byte was set without updating it).
    pub fn parse(b: &[u8; FOOTER_SIZE]) -> Result<Footer> {
        const S: &str = "footer";
        if &b[0..8] != FOOTER_COOKIE {
            if &b[0..8] == POISON_COOKIE {
                return Err(Error::Unsupported(
                    "the image was disabled (footer cookie 'v_poison')".into(),
                ));
            }
            return Err(Error::NotVhd(format!(
                "footer cookie is {:?}, not \"conectix\"",
                String::from_utf8_lossy(&b[0..8])
            )));
        }
        let stored = be32(b, 64);
        let computed = checksum(b, 64);
        let creator_app = [b[28], b[29], b[30], b[31]];
        let creator_version = be32(b, 32);
        if stored != computed {
            let old_tap = b[85] != 0
                && &creator_app[..3] == b"tap"
                && matches!(creator_version, 0x0000_0001 | 0x0001_0001);
            let mut copy = *b;
            copy[85] = 0;
            if !old_tap || checksum(&copy, 64) != stored {
                return Err(Error::Checksum {
                    structure: S,
                    stored,
                    computed,
                });
            }
        }
        let features = be32(b, 8);
        if features & !(FEATURE_TEMPORARY | FEATURE_RESERVED) != 0 {
            return Err(Error::field(
                S,
                "features",
                format!("unknown bits in {features:#x}"),
            ));
        }
        let version = be32(b, 12);
        if version != FILE_FORMAT_VERSION {
            return Err(Error::field(
                S,
                "file_format_version",
                format!("{version:#010x}, only 0x00010000 exists"),
            ));
        }
        let disk_type = match be32(b, 60) {
            2 => DiskType::Fixed,
            3 => DiskType::Dynamic,
            4 => DiskType::Differencing,
            t => {
                return Err(Error::field(
                    S,
                    "disk_type",
                    format!("{t} (2, 3 or 4 expected)"),
                ))
            }
        };
        let current_size = be64(b, 48);
        if !current_size.is_multiple_of(SECTOR) {
            return Err(Error::field(
                S,
                "current_size",
                format!("{current_size} is not a multiple of 512"),
            ));
        }
        let data_offset = be64(b, 16);
        if disk_type != DiskType::Fixed
            && (!data_offset.is_multiple_of(SECTOR) || data_offset == u64::MAX)
        {
            return Err(Error::field(
                S,
                "data_offset",
                format!("{data_offset:#x} is not a sector offset of a dynamic header"),
            ));
        }
        let saved_state = b[84];
        if saved_state > 1 {
            return Err(Error::field(
                S,
                "saved_state",
                format!("{saved_state}, 0 or 1 expected"),
            ));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[68..84]);
        Ok(Footer {
            features,
            data_offset,
            timestamp: be32(b, 24),
            creator_app,
            creator_version,
            creator_os: be32(b, 36),
            original_size: be64(b, 40),
            current_size,
            geometry: be32(b, 56),
            disk_type,
            uuid: Uuid(uuid),
            saved_state,
            hidden: b[85],
            reserved_zero: b[86..].iter().all(|&x| x == 0),
        })
    }

    /// The 512 bytes, checksum computed.
    pub fn encode(&self) -> [u8; FOOTER_SIZE] {
        let mut b = [0u8; FOOTER_SIZE];
        b[0..8].copy_from_slice(FOOTER_COOKIE);
        put32(&mut b, 8, self.features);
        put32(&mut b, 12, FILE_FORMAT_VERSION);
        put64(&mut b, 16, self.data_offset);
        put32(&mut b, 24, self.timestamp);
        b[28..32].copy_from_slice(&self.creator_app);
        put32(&mut b, 32, self.creator_version);
        put32(&mut b, 36, self.creator_os);
        put64(&mut b, 40, self.original_size);
        put64(&mut b, 48, self.current_size);
        put32(&mut b, 56, self.geometry);
        put32(&mut b, 60, self.disk_type.code());
        b[68..84].copy_from_slice(&self.uuid.0);
        b[84] = self.saved_state;
        b[85] = self.hidden;
        let c = checksum(&b, 64);
        put32(&mut b, 64, c);
        b
    }

    /// A new footer as blktap writes it.
    pub fn new(disk_type: DiskType, size: u64) -> Footer {
        Footer {
            features: FEATURE_RESERVED,
            data_offset: if disk_type == DiskType::Fixed {
                u64::MAX
            } else {
                SECTOR
            },
            timestamp: vhd_now(),
            creator_app: CREATOR_TAP,
            creator_version: CREATOR_VERSION,
            creator_os: 0,
            original_size: size,
            current_size: size,
            geometry: geometry(size),
            disk_type,
            uuid: Uuid::random(),
            saved_state: 0,
            hidden: 0,
            reserved_zero: true,
        }
    }

    /// Whether blktap (or we) made it: it then has a batmap (creator version 1.2 and up; 1.1
    /// when its header is valid).
    pub fn creator_is_tap(&self) -> bool {
        &self.creator_app[..3] == b"tap"
    }
}
