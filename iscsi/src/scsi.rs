//! The SCSI layer: CDBs for the commands tapdisk needs (SBC-4, SPC-5), decoding of their
//! parameter data, and sense data decoded into named errors.

use std::fmt;

/// SCSI status GOOD.
pub const STATUS_GOOD: u8 = 0x00;
/// SCSI status CHECK CONDITION (sense data follows).
pub const STATUS_CHECK_CONDITION: u8 = 0x02;
/// SCSI status RESERVATION CONFLICT: another initiator holds a reservation that excludes this
/// command (a fenced writer's writes end here).
pub const STATUS_RESERVATION_CONFLICT: u8 = 0x18;

/// A 16-byte CDB (shorter CDBs are zero-padded, as the SCSI Command PDU carries them).
pub type Cdb = [u8; 16];

/// TEST UNIT READY.
pub fn test_unit_ready() -> Cdb {
    [0; 16]
}

/// INQUIRY (standard data, or the VPD page `page` when given) returning up to `alloc` bytes.
pub fn inquiry(page: Option<u8>, alloc: u16) -> Cdb {
    let mut c = [0u8; 16];
    c[0] = 0x12;
    if let Some(p) = page {
        c[1] = 1;
        c[2] = p;
    }
    c[3..5].copy_from_slice(&alloc.to_be_bytes());
    c
}

/// READ CAPACITY(16) returning up to `alloc` bytes (32 is the full answer).
pub fn read_capacity16(alloc: u32) -> Cdb {
    let mut c = [0u8; 16];
    c[0] = 0x9e;
    c[1] = 0x10;
    c[10..14].copy_from_slice(&alloc.to_be_bytes());
    c
}

/// REPORT LUNS returning up to `alloc` bytes.
pub fn report_luns(alloc: u32) -> Cdb {
    let mut c = [0u8; 16];
    c[0] = 0xa0;
    c[6..10].copy_from_slice(&alloc.to_be_bytes());
    c
}

/// READ(16) of `blocks` blocks at `lba`.
pub fn read16(lba: u64, blocks: u32) -> Cdb {
    let mut c = [0u8; 16];
    c[0] = 0x88;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// WRITE(16) of `blocks` blocks at `lba`, with Force Unit Access when `fua`.
pub fn write16(lba: u64, blocks: u32, fua: bool) -> Cdb {
    let mut c = [0u8; 16];
    c[0] = 0x8a;
    if fua {
        c[1] = 0x08;
    }
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// SYNCHRONIZE CACHE(16) of `blocks` blocks at `lba` (0 blocks: to the end of the medium).
pub fn synchronize_cache16(lba: u64, blocks: u32) -> Cdb {
    let mut c = [0u8; 16];
    c[0] = 0x91;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// Length of an UNMAP parameter list with one block descriptor.
pub const UNMAP_PARAM_LEN: usize = 24;

/// UNMAP with a parameter list of `param_len` bytes (see [`unmap_params`]).
pub fn unmap(param_len: u16) -> Cdb {
    let mut c = [0u8; 16];
    c[0] = 0x42;
    c[7..9].copy_from_slice(&param_len.to_be_bytes());
    c
}

/// The UNMAP parameter list for one extent of `blocks` blocks at `lba`.
pub fn unmap_params(lba: u64, blocks: u32) -> [u8; UNMAP_PARAM_LEN] {
    let mut p = [0u8; UNMAP_PARAM_LEN];
    p[0..2].copy_from_slice(&22u16.to_be_bytes()); // UNMAP DATA LENGTH: bytes after this field
    p[2..4].copy_from_slice(&16u16.to_be_bytes()); // BLOCK DESCRIPTOR DATA LENGTH
    p[8..16].copy_from_slice(&lba.to_be_bytes());
    p[16..20].copy_from_slice(&blocks.to_be_bytes());
    p
}

/// Length of a PERSISTENT RESERVE OUT parameter list (SPC-5 6.17.3; every service action we
/// send but REGISTER AND MOVE). The same length as UNMAP's list, so both travel inline.
pub const PR_OUT_PARAM_LEN: usize = 24;

/// The longest parameter list a command carries inline ([`crate::Command::inline`]).
pub const INLINE_PARAM_LEN: usize = UNMAP_PARAM_LEN;

const _: () = assert!(PR_OUT_PARAM_LEN == INLINE_PARAM_LEN);

/// PERSISTENT RESERVE IN service actions (SPC-5 6.16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PrIn {
    /// Every registered reservation key.
    ReadKeys = 0x00,
    /// The reservation, if any: its holder's key, scope and type.
    ReadReservation = 0x01,
}

/// PERSISTENT RESERVE OUT service actions (SPC-5 6.17).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PrOut {
    /// Register (or, with a zero service action key, unregister) this I_T nexus; the
    /// reservation key must be the current one (0 when not registered).
    Register = 0x00,
    /// Take the reservation (the I_T nexus must be registered).
    Reserve = 0x01,
    /// Give the reservation up.
    Release = 0x02,
    /// Remove every registration and the reservation.
    Clear = 0x03,
    /// Remove the registrations of the service action key (and take its reservation).
    Preempt = 0x04,
    /// Register whatever key this I_T nexus had.
    RegisterAndIgnoreExistingKey = 0x06,
}

/// Persistent reservation types (SPC-5 table 230).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PrType {
    /// Only the holder writes; everyone reads.
    WriteExclusive = 0x1,
    /// Only the holder reads or writes.
    ExclusiveAccess = 0x3,
    /// Every registered I_T nexus writes; everyone reads. What the `stripe:` driver holds:
    /// all sessions of the one writer register its key.
    WriteExclusiveRegistrantsOnly = 0x5,
    /// Every registered I_T nexus reads and writes.
    ExclusiveAccessRegistrantsOnly = 0x6,
}

impl PrType {
    /// From the TYPE field (None for a type we do not know).
    pub fn from_u8(v: u8) -> Option<PrType> {
        Some(match v {
            0x1 => PrType::WriteExclusive,
            0x3 => PrType::ExclusiveAccess,
            0x5 => PrType::WriteExclusiveRegistrantsOnly,
            0x6 => PrType::ExclusiveAccessRegistrantsOnly,
            _ => return None,
        })
    }
}

/// PERSISTENT RESERVE IN with service action `sa`, returning up to `alloc` bytes.
pub fn persistent_reserve_in(sa: PrIn, alloc: u16) -> Cdb {
    let mut c = [0u8; 16];
    c[0] = 0x5e;
    c[1] = sa as u8;
    c[7..9].copy_from_slice(&alloc.to_be_bytes());
    c
}

/// PERSISTENT RESERVE OUT with service action `sa` and reservation type `ty` (scope: the
/// logical unit), with a parameter list of [`PR_OUT_PARAM_LEN`] bytes (see [`pr_out_params`]).
pub fn persistent_reserve_out(sa: PrOut, ty: Option<PrType>) -> Cdb {
    let mut c = [0u8; 16];
    c[0] = 0x5f;
    c[1] = sa as u8;
    c[2] = ty.map_or(0, |t| t as u8);
    c[5..9].copy_from_slice(&(PR_OUT_PARAM_LEN as u32).to_be_bytes());
    c
}

/// The PERSISTENT RESERVE OUT parameter list: our current reservation key and the service
/// action's key (the new key of a REGISTER, the key preempted by a PREEMPT); no SPEC_I_PT,
/// ALL_TG_PT or APTPL.
pub fn pr_out_params(key: u64, sa_key: u64) -> [u8; PR_OUT_PARAM_LEN] {
    let mut p = [0u8; PR_OUT_PARAM_LEN];
    p[0..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    p
}

/// READ KEYS parameter data: the PR generation and the registered keys (one per registered
/// I_T nexus, so a key may appear more than once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrKeys {
    /// Bumped by the target on every registration change.
    pub generation: u32,
    /// The keys, as listed.
    pub keys: Vec<u64>,
}

impl PrKeys {
    /// Decodes READ KEYS parameter data (`d` may be cut short by the allocation length: only
    /// whole keys present are taken).
    pub fn parse(d: &[u8]) -> Option<PrKeys> {
        if d.len() < 8 {
            return None;
        }
        let generation = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
        let len = u32::from_be_bytes([d[4], d[5], d[6], d[7]]) as usize;
        let list = &d[8..];
        let n = len.min(list.len()) / 8;
        let keys = list
            .chunks_exact(8)
            .take(n)
            .map(|k| u64::from_be_bytes([k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7]]))
            .collect();
        Some(PrKeys { generation, keys })
    }
}

/// READ RESERVATION parameter data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrReservation {
    /// The PR generation.
    pub generation: u32,
    /// The holder's key and the type (the raw TYPE field, see [`PrType::from_u8`]), when the
    /// logical unit is reserved.
    pub holder: Option<(u64, u8)>,
}

impl PrReservation {
    /// Decodes READ RESERVATION parameter data.
    pub fn parse(d: &[u8]) -> Option<PrReservation> {
        if d.len() < 8 {
            return None;
        }
        let generation = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
        let len = u32::from_be_bytes([d[4], d[5], d[6], d[7]]);
        if len == 0 {
            return Some(PrReservation {
                generation,
                holder: None,
            });
        }
        if len < 16 || d.len() < 24 {
            return None;
        }
        let key = u64::from_be_bytes([d[8], d[9], d[10], d[11], d[12], d[13], d[14], d[15]]);
        Some(PrReservation {
            generation,
            holder: Some((key, d[21] & 0x0f)),
        })
    }
}

/// What READ CAPACITY(16) says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Number of logical blocks.
    pub blocks: u64,
    /// Bytes per logical block.
    pub block_size: u32,
    /// Logical block provisioning management enabled (the LU supports UNMAP).
    pub thin_provisioned: bool,
}

impl Capacity {
    /// Size in bytes.
    pub fn bytes(&self) -> u64 {
        self.blocks.saturating_mul(u64::from(self.block_size))
    }

    /// Decodes READ CAPACITY(16) parameter data.
    pub fn parse(d: &[u8]) -> Option<Capacity> {
        if d.len() < 12 {
            return None;
        }
        let mut l = [0u8; 8];
        l.copy_from_slice(&d[0..8]);
        let last = u64::from_be_bytes(l);
        let block_size = u32::from_be_bytes([d[8], d[9], d[10], d[11]]);
        if block_size == 0 || block_size > (1 << 20) || last == u64::MAX {
            return None;
        }
        Some(Capacity {
            blocks: last + 1,
            block_size,
            thin_provisioned: d.get(14).is_some_and(|b| b & 0x80 != 0),
        })
    }
}

/// Standard INQUIRY data, the parts a person wants to see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inquiry {
    /// Peripheral device type (0 = direct-access block device).
    pub device_type: u8,
    /// Vendor identification.
    pub vendor: String,
    /// Product identification.
    pub product: String,
    /// Product revision level.
    pub revision: String,
}

impl Inquiry {
    /// Decodes standard INQUIRY data.
    pub fn parse(d: &[u8]) -> Option<Inquiry> {
        if d.len() < 36 {
            return None;
        }
        let s = |r: std::ops::Range<usize>| String::from_utf8_lossy(&d[r]).trim().to_owned();
        Some(Inquiry {
            device_type: d[0] & 0x1f,
            vendor: s(8..16),
            product: s(16..32),
            revision: s(32..36),
        })
    }
}

/// Decodes REPORT LUNS parameter data into 8-byte LUN fields.
pub fn parse_report_luns(d: &[u8]) -> Option<Vec<[u8; 8]>> {
    if d.len() < 8 {
        return None;
    }
    let len = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize;
    let list = d.get(8..)?;
    let n = len.min(list.len()) / 8;
    Some(
        list.chunks_exact(8)
            .take(n)
            .map(|c| {
                let mut l = [0u8; 8];
                l.copy_from_slice(c);
                l
            })
            .collect(),
    )
}

/// Decoded sense data: key, additional sense code and qualifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    /// Sense key.
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
}

impl Sense {
    /// Decodes fixed (0x70/0x71) or descriptor (0x72/0x73) format sense data.
    pub fn parse(d: &[u8]) -> Option<Sense> {
        let code = d.first()? & 0x7f;
        match code {
            0x70 | 0x71 => Some(Sense {
                key: d.get(2)? & 0x0f,
                asc: d.get(12).copied().unwrap_or(0),
                ascq: d.get(13).copied().unwrap_or(0),
            }),
            0x72 | 0x73 => Some(Sense {
                key: d.get(1)? & 0x0f,
                asc: d.get(2).copied().unwrap_or(0),
                ascq: d.get(3).copied().unwrap_or(0),
            }),
            _ => None,
        }
    }

    /// Name of the sense key.
    pub fn key_name(&self) -> &'static str {
        match self.key {
            0x0 => "NO SENSE",
            0x1 => "RECOVERED ERROR",
            0x2 => "NOT READY",
            0x3 => "MEDIUM ERROR",
            0x4 => "HARDWARE ERROR",
            0x5 => "ILLEGAL REQUEST",
            0x6 => "UNIT ATTENTION",
            0x7 => "DATA PROTECT",
            0x8 => "BLANK CHECK",
            0x9 => "VENDOR SPECIFIC",
            0xa => "COPY ABORTED",
            0xb => "ABORTED COMMAND",
            0xd => "VOLUME OVERFLOW",
            0xe => "MISCOMPARE",
            _ => "RESERVED",
        }
    }

    /// Name of the additional sense code and qualifier, when it is one we know.
    pub fn asc_name(&self) -> Option<&'static str> {
        Some(match (self.asc, self.ascq) {
            (0x00, 0x00) => "NO ADDITIONAL SENSE INFORMATION",
            (0x04, 0x00) => "LOGICAL UNIT NOT READY, CAUSE NOT REPORTABLE",
            (0x04, 0x01) => "LOGICAL UNIT IS IN PROCESS OF BECOMING READY",
            (0x04, 0x02) => "LOGICAL UNIT NOT READY, INITIALIZING COMMAND REQUIRED",
            (0x04, 0x03) => "LOGICAL UNIT NOT READY, MANUAL INTERVENTION REQUIRED",
            (0x0c, 0x00) => "WRITE ERROR",
            (0x11, 0x00) => "UNRECOVERED READ ERROR",
            (0x1a, 0x00) => "PARAMETER LIST LENGTH ERROR",
            (0x20, 0x00) => "INVALID COMMAND OPERATION CODE",
            (0x21, 0x00) => "LOGICAL BLOCK ADDRESS OUT OF RANGE",
            (0x24, 0x00) => "INVALID FIELD IN CDB",
            (0x25, 0x00) => "LOGICAL UNIT NOT SUPPORTED",
            (0x26, 0x00) => "INVALID FIELD IN PARAMETER LIST",
            (0x27, 0x00) => "WRITE PROTECTED",
            (0x28, 0x00) => "NOT READY TO READY CHANGE, MEDIUM MAY HAVE CHANGED",
            (0x29, 0x00) => "POWER ON, RESET, OR BUS DEVICE RESET OCCURRED",
            (0x29, 0x01) => "POWER ON OCCURRED",
            (0x29, 0x07) => "I_T NEXUS LOSS OCCURRED",
            (0x2a, 0x03) => "RESERVATIONS PREEMPTED",
            (0x2a, 0x04) => "RESERVATIONS RELEASED",
            (0x2a, 0x05) => "REGISTRATIONS PREEMPTED",
            (0x2a, 0x01) => "MODE PARAMETERS CHANGED",
            (0x2a, 0x09) => "CAPACITY DATA HAS CHANGED",
            (0x3a, 0x00) => "MEDIUM NOT PRESENT",
            (0x3f, 0x0e) => "REPORTED LUNS DATA HAS CHANGED",
            (0x44, 0x00) => "INTERNAL TARGET FAILURE",
            (0x47, 0x00) => "SCSI PARITY ERROR",
            (0x49, 0x00) => "INVALID MESSAGE ERROR",
            (0x4b, 0x00) => "DATA PHASE ERROR",
            (0x55, 0x03) => "INSUFFICIENT RESOURCES",
            _ => return None,
        })
    }
}

impl fmt::Display for Sense {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.key_name())?;
        match self.asc_name() {
            Some(n) => write!(f, ", {n}"),
            None => write!(f, ", ASC {:#04x} ASCQ {:#04x}", self.asc, self.ascq),
        }
    }
}

/// Name of a SCSI status byte.
pub fn status_name(s: u8) -> &'static str {
    match s {
        0x00 => "GOOD",
        0x02 => "CHECK CONDITION",
        0x04 => "CONDITION MET",
        0x08 => "BUSY",
        0x18 => "RESERVATION CONFLICT",
        0x28 => "TASK SET FULL",
        0x30 => "ACA ACTIVE",
        0x40 => "TASK ABORTED",
        _ => "unknown status",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdbs() {
        let c = read16(0x0102_0304_0506_0708, 8);
        assert_eq!(c[0], 0x88);
        assert_eq!(&c[2..10], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&c[10..14], &[0, 0, 0, 8]);
        assert_eq!(write16(1, 1, true)[1], 0x08);
        let p = unmap_params(10, 20);
        assert_eq!(&p[0..4], &[0, 22, 0, 16]);
        assert_eq!(p[15], 10);
        assert_eq!(p[19], 20);
    }

    #[test]
    fn sense_formats() {
        let mut fixed = [0u8; 18];
        fixed[0] = 0x70;
        fixed[2] = 0x05;
        fixed[12] = 0x21;
        let s = Sense::parse(&fixed).unwrap();
        assert_eq!(
            s.to_string(),
            "ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE"
        );
        let desc = [0x72u8, 0x06, 0x29, 0x07, 0, 0, 0, 0];
        assert_eq!(
            Sense::parse(&desc).unwrap().to_string(),
            "UNIT ATTENTION, I_T NEXUS LOSS OCCURRED"
        );
        let odd = [0x72u8, 0x03, 0x99, 0x42];
        assert_eq!(
            Sense::parse(&odd).unwrap().to_string(),
            "MEDIUM ERROR, ASC 0x99 ASCQ 0x42"
        );
        assert_eq!(Sense::parse(&[0x10]), None);
        assert_eq!(Sense::parse(&[]), None);
    }

    #[test]
    fn persistent_reservations() {
        let c = persistent_reserve_out(PrOut::Preempt, Some(PrType::WriteExclusiveRegistrantsOnly));
        assert_eq!(&c[..3], &[0x5f, 0x04, 0x05]);
        assert_eq!(&c[5..9], &[0, 0, 0, 24]);
        let p = pr_out_params(0x0102, 0xa0b0);
        assert_eq!(&p[6..8], &[1, 2]);
        assert_eq!(&p[14..16], &[0xa0, 0xb0]);
        assert!(p[16..].iter().all(|&b| b == 0));
        let c = persistent_reserve_in(PrIn::ReadKeys, 4096);
        assert_eq!((c[0], c[1], c[7], c[8]), (0x5e, 0, 0x10, 0));
        // Two keys, a third cut off by the allocation length, and a length that lies.
        let mut d = vec![0, 0, 0, 7, 0, 0, 0, 24];
        d.extend_from_slice(&5u64.to_be_bytes());
        d.extend_from_slice(&9u64.to_be_bytes());
        d.extend_from_slice(&[1, 2, 3]);
        let k = PrKeys::parse(&d).unwrap();
        assert_eq!((k.generation, k.keys), (7, vec![5, 9]));
        d[7] = 0xff;
        assert_eq!(PrKeys::parse(&d).unwrap().keys.len(), 2);
        assert_eq!(PrKeys::parse(&d[..5]), None);
        let none = [0, 0, 0, 3, 0, 0, 0, 0];
        assert_eq!(PrReservation::parse(&none).unwrap().holder, None);
        let mut held = vec![0, 0, 0, 3, 0, 0, 0, 16];
        held.extend_from_slice(&42u64.to_be_bytes());
        held.extend_from_slice(&[0, 0, 0, 0, 0, 0x05, 0, 0]);
        assert_eq!(PrReservation::parse(&held).unwrap().holder, Some((42, 5)));
        assert_eq!(PrReservation::parse(&held[..20]), None);
        assert_eq!(
            PrType::from_u8(5),
            Some(PrType::WriteExclusiveRegistrantsOnly)
        );
        assert_eq!(PrType::from_u8(2), None);
    }

    #[test]
    fn parameter_data() {
        let mut rc = [0u8; 32];
        rc[7] = 0xff; // last LBA 255
        rc[10] = 0x02; // 512-byte blocks
        rc[14] = 0x80;
        let c = Capacity::parse(&rc).unwrap();
        assert_eq!(
            (c.blocks, c.block_size, c.thin_provisioned),
            (256, 512, true)
        );
        assert_eq!(c.bytes(), 131072);
        assert_eq!(Capacity::parse(&[0; 12]), None);
        let mut rl = vec![0u8, 0, 0, 16, 0, 0, 0, 0];
        rl.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(parse_report_luns(&rl).unwrap().len(), 2);
        let mut rl_lying = rl.clone();
        rl_lying[0] = 0xff;
        assert_eq!(parse_report_luns(&rl_lying).unwrap().len(), 2);
    }
}
