//! iSCSI PDUs (RFC 7143 chapter 11): the 48-byte Basic Header Segment of every PDU, parsed from
//! bytes into validated structs (target to initiator) and encoded from structs (initiator to
//! target).
//!
//! This module is pure: no IO, no allocation. [`parse_header`] takes the 48 bytes a target sent
//! and the [`Limits`] negotiated for the connection and either returns a [`Header`] whose
//! lengths are safe to act on, or a [`PduError`] after which the connection must be closed.
//! [`parse_pdu`] does the same for a whole PDU in one buffer (header digest, AHS, data segment,
//! padding, data digest); it is what the fuzz target drives.

use crate::digest::Crc32c;

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;
/// The reserved tag value ("no task").
pub const RESERVED_TAG: u32 = 0xffff_ffff;
/// Largest data segment any negotiation can produce (2^24 - 1, the field's width).
pub const MAX_DATA_SEGMENT: u32 = (1 << 24) - 1;

/// Initiator opcodes.
pub mod op {
    /// NOP-Out.
    pub const NOP_OUT: u8 = 0x00;
    /// SCSI Command.
    pub const SCSI_CMD: u8 = 0x01;
    /// Task Management Function Request.
    pub const TASK_MGMT: u8 = 0x02;
    /// Login Request.
    pub const LOGIN: u8 = 0x03;
    /// Text Request.
    pub const TEXT: u8 = 0x04;
    /// SCSI Data-Out.
    pub const DATA_OUT: u8 = 0x05;
    /// Logout Request.
    pub const LOGOUT: u8 = 0x06;
    /// NOP-In.
    pub const NOP_IN: u8 = 0x20;
    /// SCSI Response.
    pub const SCSI_RSP: u8 = 0x21;
    /// Task Management Function Response.
    pub const TASK_MGMT_RSP: u8 = 0x22;
    /// Login Response.
    pub const LOGIN_RSP: u8 = 0x23;
    /// Text Response.
    pub const TEXT_RSP: u8 = 0x24;
    /// SCSI Data-In.
    pub const DATA_IN: u8 = 0x25;
    /// Logout Response.
    pub const LOGOUT_RSP: u8 = 0x26;
    /// Ready To Transfer.
    pub const R2T: u8 = 0x31;
    /// Asynchronous Message.
    pub const ASYNC: u8 = 0x32;
    /// Reject.
    pub const REJECT: u8 = 0x3f;
}

/// The immediate-delivery bit of byte 0.
pub const IMMEDIATE: u8 = 0x40;
/// The Final bit of byte 1.
pub const FINAL: u8 = 0x80;

/// Why a target's PDU was refused. Each one closes the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    /// An opcode a target may not send.
    #[error("unknown or initiator-only opcode {0:#04x}")]
    Opcode(u8),
    /// DataSegmentLength larger than we declared we can receive.
    #[error("data segment of {len} bytes exceeds the negotiated limit of {max}")]
    DataTooLong {
        /// What the target declared.
        len: u32,
        /// What we allow.
        max: u32,
    },
    /// A PDU type that carries no data segment (or no AHS) carried one.
    #[error("{0} PDU with an unexpected data segment or AHS")]
    UnexpectedData(&'static str),
    /// Header digest mismatch.
    #[error("header digest mismatch")]
    HeaderDigest,
    /// Data digest mismatch.
    #[error("data digest mismatch")]
    DataDigest,
    /// The buffer ended inside the PDU.
    #[error("truncated PDU")]
    Truncated,
    /// A field value the protocol forbids.
    #[error("invalid {0}")]
    Invalid(&'static str),
}

/// What the connection negotiated, bounding what a target may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Our MaxRecvDataSegmentLength: the largest data segment we accept.
    pub max_recv_data_segment: u32,
    /// HeaderDigest=CRC32C is in force.
    pub header_digest: bool,
    /// DataDigest=CRC32C is in force.
    pub data_digest: bool,
}

impl Limits {
    /// Limits during login (no digests; 8192 bytes unless declared otherwise).
    pub const LOGIN: Limits = Limits {
        max_recv_data_segment: 8192,
        header_digest: false,
        data_digest: false,
    };
}

/// Sequence numbers most target PDUs carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sn {
    /// StatSN.
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
}

/// SCSI Response (11.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScsiResponse {
    /// Initiator task tag.
    pub itt: u32,
    /// iSCSI response code (0 = command completed at target).
    pub response: u8,
    /// SCSI status.
    pub status: u8,
    /// Residual underflow (U).
    pub underflow: bool,
    /// Residual overflow (O).
    pub overflow: bool,
    /// Residual count.
    pub residual: u32,
    /// Sequence numbers.
    pub sn: Sn,
    /// ExpDataSN.
    pub exp_data_sn: u32,
}

/// SCSI Data-In (11.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataIn {
    /// Initiator task tag.
    pub itt: u32,
    /// Final PDU of the sequence.
    pub fin: bool,
    /// Acknowledge requested (only meaningful at ErrorRecoveryLevel > 0).
    pub ack: bool,
    /// The PDU carries the command's status (S bit).
    pub status: Option<u8>,
    /// Residual underflow.
    pub underflow: bool,
    /// Residual overflow.
    pub overflow: bool,
    /// Residual count (valid with status).
    pub residual: u32,
    /// DataSN.
    pub data_sn: u32,
    /// Where the payload goes in the command's buffer.
    pub offset: u32,
    /// Sequence numbers (StatSN only valid with status).
    pub sn: Sn,
}

/// Ready To Transfer (11.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct R2t {
    /// Initiator task tag.
    pub itt: u32,
    /// Target transfer tag to echo in the Data-Out PDUs.
    pub ttt: u32,
    /// R2TSN.
    pub r2t_sn: u32,
    /// Offset of the requested data.
    pub offset: u32,
    /// Length of the requested data (never 0).
    pub len: u32,
    /// Sequence numbers.
    pub sn: Sn,
}

/// NOP-In (11.19).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NopIn {
    /// Our tag when this answers our NOP-Out, else reserved.
    pub itt: u32,
    /// The target's tag when it wants an answer, else reserved.
    pub ttt: u32,
    /// LUN field, echoed in the answer.
    pub lun: [u8; 8],
    /// Sequence numbers.
    pub sn: Sn,
}

/// Login Response (11.13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginResponse {
    /// Transit bit.
    pub transit: bool,
    /// Continue bit (text continues in the next PDU).
    pub cont: bool,
    /// Current stage.
    pub csg: u8,
    /// Next stage.
    pub nsg: u8,
    /// Version-max.
    pub version_max: u8,
    /// Version-active.
    pub version_active: u8,
    /// ISID.
    pub isid: [u8; 6],
    /// TSIH.
    pub tsih: u16,
    /// Initiator task tag.
    pub itt: u32,
    /// Status-Class.
    pub status_class: u8,
    /// Status-Detail.
    pub status_detail: u8,
    /// Sequence numbers.
    pub sn: Sn,
}

/// Text Response (11.11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextResponse {
    /// Final bit.
    pub fin: bool,
    /// Continue bit.
    pub cont: bool,
    /// Initiator task tag.
    pub itt: u32,
    /// Target transfer tag (not reserved when more is to come).
    pub ttt: u32,
    /// Sequence numbers.
    pub sn: Sn,
}

/// Logout Response (11.15).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogoutResponse {
    /// Response code (0 = closed successfully).
    pub response: u8,
    /// Initiator task tag.
    pub itt: u32,
    /// Sequence numbers.
    pub sn: Sn,
}

/// Asynchronous Message (11.9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsyncMessage {
    /// AsyncEvent (0 SCSI event, 1 logout requested, 2 connection drop, 3 session drop,
    /// 4 renegotiate).
    pub event: u8,
    /// Parameter1..3.
    pub params: [u16; 3],
    /// Sequence numbers.
    pub sn: Sn,
}

/// Reject (11.17); the rejected header is the data segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reject {
    /// Reason code.
    pub reason: u8,
    /// Sequence numbers.
    pub sn: Sn,
}

/// Task Management Function Response (11.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskMgmtResponse {
    /// Response code.
    pub response: u8,
    /// Initiator task tag.
    pub itt: u32,
    /// Sequence numbers.
    pub sn: Sn,
}

/// One target PDU header, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetPdu {
    /// NOP-In.
    NopIn(NopIn),
    /// SCSI Response.
    ScsiResponse(ScsiResponse),
    /// Task Management Function Response.
    TaskMgmtResponse(TaskMgmtResponse),
    /// Login Response.
    LoginResponse(LoginResponse),
    /// Text Response.
    TextResponse(TextResponse),
    /// SCSI Data-In.
    DataIn(DataIn),
    /// Logout Response.
    LogoutResponse(LogoutResponse),
    /// R2T.
    R2t(R2t),
    /// Asynchronous Message.
    AsyncMessage(AsyncMessage),
    /// Reject.
    Reject(Reject),
}

/// A validated header plus the lengths of what follows it on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The PDU.
    pub pdu: TargetPdu,
    /// Bytes of additional header segments after the BHS (a multiple of 4, at most 1020).
    pub ahs_len: usize,
    /// DataSegmentLength (without padding), bounded by [`Limits::max_recv_data_segment`].
    pub data_len: u32,
}

impl Header {
    /// Bytes after the BHS+AHS: header digest, data, padding, data digest.
    pub fn rest_len(&self, limits: &Limits) -> usize {
        let mut n = 0;
        if limits.header_digest {
            n += 4;
        }
        n + data_wire_len(self.data_len, limits.data_digest)
    }
}

/// Bytes a data segment of `len` takes on the wire (padding and digest included).
pub fn data_wire_len(len: u32, data_digest: bool) -> usize {
    if len == 0 {
        return 0;
    }
    pad4(len as usize) + if data_digest { 4 } else { 0 }
}

/// `n` rounded up to a multiple of 4.
pub fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

fn be32(b: &[u8; BHS_LEN], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be16(b: &[u8; BHS_LEN], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn sn(b: &[u8; BHS_LEN]) -> Sn {
    Sn {
        stat_sn: be32(b, 24),
        exp_cmd_sn: be32(b, 28),
        max_cmd_sn: be32(b, 32),
    }
}

/// Parses and validates the BHS of a PDU sent by a target.
pub fn parse_header(b: &[u8; BHS_LEN], limits: &Limits) -> Result<Header, PduError> {
    let opcode = b[0] & 0x3f;
    let flags = b[1];
    let ahs_len = usize::from(b[4]) * 4;
    let data_len = u32::from_be_bytes([0, b[5], b[6], b[7]]);
    if data_len > limits.max_recv_data_segment {
        return Err(PduError::DataTooLong {
            len: data_len,
            max: limits.max_recv_data_segment,
        });
    }
    let itt = be32(b, 16);
    let no_data = |name: &'static str| {
        if data_len != 0 || ahs_len != 0 {
            Err(PduError::UnexpectedData(name))
        } else {
            Ok(())
        }
    };
    let pdu = match opcode {
        op::NOP_IN => {
            if ahs_len != 0 {
                return Err(PduError::UnexpectedData("NOP-In"));
            }
            let mut lun = [0u8; 8];
            lun.copy_from_slice(&b[8..16]);
            let ttt = be32(b, 20);
            if itt == RESERVED_TAG && ttt == RESERVED_TAG && data_len != 0 {
                return Err(PduError::UnexpectedData("NOP-In"));
            }
            TargetPdu::NopIn(NopIn {
                itt,
                ttt,
                lun,
                sn: sn(b),
            })
        }
        op::SCSI_RSP => {
            if flags & FINAL == 0 {
                return Err(PduError::Invalid("SCSI Response without the F bit"));
            }
            let underflow = flags & 0x02 != 0;
            let overflow = flags & 0x04 != 0;
            if underflow && overflow {
                return Err(PduError::Invalid("SCSI Response with both U and O"));
            }
            TargetPdu::ScsiResponse(ScsiResponse {
                itt,
                response: b[2],
                status: b[3],
                underflow,
                overflow,
                residual: be32(b, 44),
                sn: sn(b),
                exp_data_sn: be32(b, 36),
            })
        }
        op::TASK_MGMT_RSP => {
            no_data("Task Management Response")?;
            TargetPdu::TaskMgmtResponse(TaskMgmtResponse {
                response: b[2],
                itt,
                sn: sn(b),
            })
        }
        op::LOGIN_RSP => {
            if ahs_len != 0 {
                return Err(PduError::UnexpectedData("Login Response"));
            }
            let transit = flags & 0x80 != 0;
            let cont = flags & 0x40 != 0;
            if transit && cont {
                return Err(PduError::Invalid("Login Response with both T and C"));
            }
            let mut isid = [0u8; 6];
            isid.copy_from_slice(&b[8..14]);
            TargetPdu::LoginResponse(LoginResponse {
                transit,
                cont,
                csg: (flags >> 2) & 3,
                nsg: flags & 3,
                version_max: b[2],
                version_active: b[3],
                isid,
                tsih: be16(b, 14),
                itt,
                status_class: b[36],
                status_detail: b[37],
                sn: sn(b),
            })
        }
        op::TEXT_RSP => {
            if ahs_len != 0 {
                return Err(PduError::UnexpectedData("Text Response"));
            }
            let fin = flags & 0x80 != 0;
            let cont = flags & 0x40 != 0;
            if fin && cont {
                return Err(PduError::Invalid("Text Response with both F and C"));
            }
            TargetPdu::TextResponse(TextResponse {
                fin,
                cont,
                itt,
                ttt: be32(b, 20),
                sn: sn(b),
            })
        }
        op::DATA_IN => {
            if ahs_len != 0 {
                return Err(PduError::UnexpectedData("Data-In"));
            }
            let fin = flags & 0x80 != 0;
            let has_status = flags & 0x01 != 0;
            if has_status && !fin {
                return Err(PduError::Invalid(
                    "Data-In with status but without the F bit",
                ));
            }
            let underflow = flags & 0x02 != 0;
            let overflow = flags & 0x04 != 0;
            if underflow && overflow {
                return Err(PduError::Invalid("Data-In with both U and O"));
            }
            if (underflow || overflow) && !has_status {
                return Err(PduError::Invalid("Data-In residual flags without status"));
            }
            let offset = be32(b, 40);
            if offset.checked_add(data_len).is_none() {
                return Err(PduError::Invalid("Data-In buffer offset"));
            }
            TargetPdu::DataIn(DataIn {
                itt,
                fin,
                ack: flags & 0x40 != 0,
                status: has_status.then_some(b[3]),
                underflow,
                overflow,
                residual: be32(b, 44),
                data_sn: be32(b, 36),
                offset,
                sn: sn(b),
            })
        }
        op::LOGOUT_RSP => {
            no_data("Logout Response")?;
            TargetPdu::LogoutResponse(LogoutResponse {
                response: b[2],
                itt,
                sn: sn(b),
            })
        }
        op::R2T => {
            no_data("R2T")?;
            let len = be32(b, 44);
            let offset = be32(b, 40);
            if len == 0 {
                return Err(PduError::Invalid("R2T desired data transfer length 0"));
            }
            if offset.checked_add(len).is_none() {
                return Err(PduError::Invalid("R2T buffer offset"));
            }
            TargetPdu::R2t(R2t {
                itt,
                ttt: be32(b, 20),
                r2t_sn: be32(b, 36),
                offset,
                len,
                sn: sn(b),
            })
        }
        op::ASYNC => {
            if ahs_len != 0 {
                return Err(PduError::UnexpectedData("Async Message"));
            }
            TargetPdu::AsyncMessage(AsyncMessage {
                event: b[36],
                params: [be16(b, 38), be16(b, 40), be16(b, 42)],
                sn: sn(b),
            })
        }
        op::REJECT => {
            if ahs_len != 0 {
                return Err(PduError::UnexpectedData("Reject"));
            }
            TargetPdu::Reject(Reject {
                reason: b[2],
                sn: sn(b),
            })
        }
        other => return Err(PduError::Opcode(other)),
    };
    Ok(Header {
        pdu,
        ahs_len,
        data_len,
    })
}

/// Parses one whole PDU from the start of `buf`: BHS, AHS (skipped), header digest, data
/// segment, padding and data digest, checking both digests when in force. Returns the header,
/// the data segment (without padding) and the number of bytes consumed.
pub fn parse_pdu<'a>(
    buf: &'a [u8],
    limits: &Limits,
) -> Result<(Header, &'a [u8], usize), PduError> {
    let bhs: &[u8; BHS_LEN] = buf
        .get(..BHS_LEN)
        .and_then(|s| s.try_into().ok())
        .ok_or(PduError::Truncated)?;
    let h = parse_header(bhs, limits)?;
    let mut at = BHS_LEN + h.ahs_len;
    if limits.header_digest {
        let got = buf.get(at..at + 4).ok_or(PduError::Truncated)?;
        let mut c = Crc32c::new();
        c.update(buf.get(..at).ok_or(PduError::Truncated)?);
        if c.digest() != got {
            return Err(PduError::HeaderDigest);
        }
        at += 4;
    } else if buf.len() < at {
        return Err(PduError::Truncated);
    }
    let dl = h.data_len as usize;
    let padded = if dl == 0 { 0 } else { pad4(dl) };
    let data = buf.get(at..at + dl).ok_or(PduError::Truncated)?;
    let with_pad = buf.get(at..at + padded).ok_or(PduError::Truncated)?;
    at += padded;
    if limits.data_digest && dl != 0 {
        let got = buf.get(at..at + 4).ok_or(PduError::Truncated)?;
        let mut c = Crc32c::new();
        c.update(with_pad);
        if c.digest() != got {
            return Err(PduError::DataDigest);
        }
        at += 4;
    }
    Ok((h, data, at))
}

// ---- encoding (initiator to target) ----

fn put32(b: &mut [u8; BHS_LEN], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put_dlen(b: &mut [u8; BHS_LEN], len: u32) {
    debug_assert!(len <= MAX_DATA_SEGMENT);
    b[5..8].copy_from_slice(&len.to_be_bytes()[1..]);
}

/// The 8-byte LUN field for LUN number `lun` (SAM-5 peripheral or flat addressing).
pub fn encode_lun(lun: u16) -> [u8; 8] {
    let mut l = [0u8; 8];
    if lun < 256 {
        l[1] = lun as u8;
    } else {
        l[0] = 0x40 | ((lun >> 8) as u8 & 0x3f);
        l[1] = lun as u8;
    }
    l
}

/// The LUN number of an 8-byte LUN field in peripheral or flat addressing, if it is one.
pub fn decode_lun(l: &[u8; 8]) -> Option<u16> {
    if l[2..].iter().any(|&x| x != 0) {
        return None;
    }
    match l[0] >> 6 {
        0 if l[0] == 0 => Some(u16::from(l[1])),
        1 => Some((u16::from(l[0] & 0x3f) << 8) | u16::from(l[1])),
        _ => None,
    }
}

/// Direction of a SCSI command's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// No data.
    None,
    /// From target to initiator (Data-In).
    Read,
    /// From initiator to target (Data-Out).
    Write,
}

/// A SCSI Command BHS (11.3).
#[allow(clippy::too_many_arguments)]
pub fn scsi_command(
    h: &mut [u8; BHS_LEN],
    dir: Dir,
    fin: bool,
    lun: [u8; 8],
    itt: u32,
    edtl: u32,
    cmd_sn: u32,
    exp_stat_sn: u32,
    cdb: &[u8; 16],
    immediate_len: u32,
) {
    *h = [0; BHS_LEN];
    h[0] = op::SCSI_CMD;
    let mut f = 0x01; // task attribute SIMPLE
    if fin {
        f |= FINAL;
    }
    match dir {
        Dir::Read => f |= 0x40,
        Dir::Write => f |= 0x20,
        Dir::None => {}
    }
    h[1] = f;
    put_dlen(h, immediate_len);
    h[8..16].copy_from_slice(&lun);
    put32(h, 16, itt);
    put32(h, 20, edtl);
    put32(h, 24, cmd_sn);
    put32(h, 28, exp_stat_sn);
    h[32..48].copy_from_slice(cdb);
}

/// A SCSI Data-Out BHS (11.7).
#[allow(clippy::too_many_arguments)]
pub fn data_out(
    h: &mut [u8; BHS_LEN],
    fin: bool,
    lun: [u8; 8],
    itt: u32,
    ttt: u32,
    exp_stat_sn: u32,
    data_sn: u32,
    offset: u32,
    len: u32,
) {
    *h = [0; BHS_LEN];
    h[0] = op::DATA_OUT;
    h[1] = if fin { FINAL } else { 0 };
    put_dlen(h, len);
    h[8..16].copy_from_slice(&lun);
    put32(h, 16, itt);
    put32(h, 20, ttt);
    put32(h, 28, exp_stat_sn);
    put32(h, 36, data_sn);
    put32(h, 40, offset);
}

/// A NOP-Out BHS (11.18), always immediate.
pub fn nop_out(
    h: &mut [u8; BHS_LEN],
    lun: [u8; 8],
    itt: u32,
    ttt: u32,
    cmd_sn: u32,
    exp_stat_sn: u32,
    data_len: u32,
) {
    *h = [0; BHS_LEN];
    h[0] = op::NOP_OUT | IMMEDIATE;
    h[1] = FINAL;
    put_dlen(h, data_len);
    h[8..16].copy_from_slice(&lun);
    put32(h, 16, itt);
    put32(h, 20, ttt);
    put32(h, 24, cmd_sn);
    put32(h, 28, exp_stat_sn);
}

/// A Login Request BHS (11.12).
#[allow(clippy::too_many_arguments)]
pub fn login_request(
    h: &mut [u8; BHS_LEN],
    transit: bool,
    csg: u8,
    nsg: u8,
    isid: [u8; 6],
    tsih: u16,
    itt: u32,
    cid: u16,
    cmd_sn: u32,
    exp_stat_sn: u32,
    data_len: u32,
) {
    *h = [0; BHS_LEN];
    h[0] = op::LOGIN | IMMEDIATE;
    h[1] = (if transit { 0x80 } else { 0 }) | ((csg & 3) << 2) | if transit { nsg & 3 } else { 0 };
    put_dlen(h, data_len);
    h[8..14].copy_from_slice(&isid);
    h[14..16].copy_from_slice(&tsih.to_be_bytes());
    put32(h, 16, itt);
    h[20..22].copy_from_slice(&cid.to_be_bytes());
    put32(h, 24, cmd_sn);
    put32(h, 28, exp_stat_sn);
}

/// A Text Request BHS (11.10).
pub fn text_request(
    h: &mut [u8; BHS_LEN],
    itt: u32,
    ttt: u32,
    cmd_sn: u32,
    exp_stat_sn: u32,
    data_len: u32,
) {
    *h = [0; BHS_LEN];
    h[0] = op::TEXT | IMMEDIATE;
    h[1] = FINAL;
    put_dlen(h, data_len);
    put32(h, 16, itt);
    put32(h, 20, ttt);
    put32(h, 24, cmd_sn);
    put32(h, 28, exp_stat_sn);
}

/// A Logout Request BHS (11.14) closing the whole session (reason 0).
pub fn logout_request(h: &mut [u8; BHS_LEN], itt: u32, cid: u16, cmd_sn: u32, exp_stat_sn: u32) {
    *h = [0; BHS_LEN];
    h[0] = op::LOGOUT | IMMEDIATE;
    h[1] = FINAL;
    put32(h, 16, itt);
    h[20..22].copy_from_slice(&cid.to_be_bytes());
    put32(h, 24, cmd_sn);
    put32(h, 28, exp_stat_sn);
}

/// The header digest for `header` (BHS plus AHS).
pub fn header_digest(header: &[u8]) -> [u8; 4] {
    let mut c = Crc32c::new();
    c.update(header);
    c.digest()
}

/// Serial number arithmetic (RFC 1982, 32 bits): `a < b`.
pub fn sn_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < 0x8000_0000
}

/// Serial number arithmetic: `a <= b`.
pub fn sn_le(a: u32, b: u32) -> bool {
    a == b || sn_lt(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        max_recv_data_segment: 65536,
        header_digest: false,
        data_digest: false,
    };

    fn hdr(opcode: u8, flags: u8, dlen: u32) -> [u8; BHS_LEN] {
        let mut b = [0u8; BHS_LEN];
        b[0] = opcode;
        b[1] = flags;
        b[5..8].copy_from_slice(&dlen.to_be_bytes()[1..]);
        b
    }

    #[test]
    fn data_in_with_status() {
        let mut b = hdr(op::DATA_IN, 0x81, 4096);
        b[3] = 0;
        b[16..20].copy_from_slice(&7u32.to_be_bytes());
        b[40..44].copy_from_slice(&8192u32.to_be_bytes());
        let h = parse_header(&b, &L).unwrap();
        assert_eq!(h.data_len, 4096);
        match h.pdu {
            TargetPdu::DataIn(d) => {
                assert_eq!(d.itt, 7);
                assert_eq!(d.offset, 8192);
                assert_eq!(d.status, Some(0));
                assert!(d.fin);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refuses_bad_headers() {
        assert_eq!(
            parse_header(&hdr(op::DATA_IN, 0x80, 65537), &L),
            Err(PduError::DataTooLong {
                len: 65537,
                max: 65536
            })
        );
        assert!(matches!(
            parse_header(&hdr(op::DATA_IN, 0x01, 0), &L),
            Err(PduError::Invalid(_))
        ));
        assert!(matches!(
            parse_header(&hdr(op::R2T, 0x80, 0), &L),
            Err(PduError::Invalid(_))
        ));
        assert!(matches!(
            parse_header(&hdr(op::R2T, 0x80, 4), &L),
            Err(PduError::UnexpectedData(_))
        ));
        assert_eq!(
            parse_header(&hdr(op::SCSI_CMD, 0x80, 0), &L),
            Err(PduError::Opcode(op::SCSI_CMD))
        );
        let mut b = hdr(op::DATA_IN, 0x80, 16);
        b[40..44].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_header(&b, &L).is_err());
    }

    #[test]
    fn whole_pdu_with_digests() {
        let lim = Limits {
            header_digest: true,
            data_digest: true,
            ..L
        };
        let mut b = hdr(op::NOP_IN, 0x80, 5);
        b[16..20].copy_from_slice(&1u32.to_be_bytes());
        b[20..24].copy_from_slice(&RESERVED_TAG.to_be_bytes());
        let mut wire = b.to_vec();
        wire.extend_from_slice(&header_digest(&b));
        let data = [1u8, 2, 3, 4, 5, 0, 0, 0];
        wire.extend_from_slice(&data);
        let mut c = Crc32c::new();
        c.update(&data);
        wire.extend_from_slice(&c.digest());
        let (h, d, n) = parse_pdu(&wire, &lim).unwrap();
        assert_eq!(n, wire.len());
        assert_eq!(d, &[1, 2, 3, 4, 5]);
        assert!(matches!(h.pdu, TargetPdu::NopIn(_)));
        let mut bad = wire.clone();
        bad[60] ^= 1;
        assert_eq!(parse_pdu(&bad, &lim), Err(PduError::DataDigest));
        let mut bad = wire.clone();
        bad[3] ^= 1;
        assert_eq!(parse_pdu(&bad, &lim), Err(PduError::HeaderDigest));
        assert_eq!(parse_pdu(&wire[..60], &lim), Err(PduError::Truncated));
    }

    #[test]
    fn serial_numbers_and_luns() {
        assert!(sn_lt(0xffff_fff0, 5));
        assert!(!sn_lt(5, 0xffff_fff0));
        assert!(sn_le(3, 3));
        for lun in [0u16, 1, 255, 256, 16383] {
            assert_eq!(decode_lun(&encode_lun(lun)), Some(lun));
        }
    }
}
