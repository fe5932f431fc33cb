//! NBD wire constants and the fixed-size messages of the protocol.
//!
//! Everything on the wire is big-endian. Names follow the protocol document
//! (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>) without the `NBD_`
//! prefix.

use std::io;

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: sent by the server after `NBDMAGIC`, and by the client before every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after `OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no 124 zero bytes after `OPT_EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Option: enter transmission on the named export (no reply on failure; the server hangs up).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: the client gives up.
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: TLS (not supported).
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: structured replies (not supported).
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts (not supported).
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts (not supported).
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option: 64-bit headers (not supported).
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply: done.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of `OPT_LIST`.
pub const REP_SERVER: u32 = 2;
/// Option reply: one item of `OPT_INFO`/`OPT_GO`.
pub const REP_INFO: u32 = 3;
/// Option error: option unknown to this server.
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
/// Option error: malformed option.
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
/// Option error: no such export.
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
/// Option error: request too large.
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

/// Info item: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Info item: canonical export name.
pub const INFO_NAME: u16 = 1;
/// Info item: human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Info item: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: always set.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export refuses writes.
pub const TF_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `CMD_FLUSH` is supported.
pub const TF_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `CMD_FLAG_FUA` is supported.
pub const TF_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: `CMD_TRIM` is supported.
pub const TF_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `CMD_WRITE_ZEROES` is supported.
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: a flush on one connection covers writes completed on all of them.
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (payload follows the header).
pub const CMD_WRITE: u16 = 1;
/// Command: soft disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: discard.
pub const CMD_TRIM: u16 = 4;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: write zeroes must not punch a hole (we may ignore it: the data reads as zero
/// either way).
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Error: operation not permitted (write to a read-only export).
pub const EPERM: u32 = 1;
/// Error: input/output error.
pub const EIO: u32 = 5;
/// Error: out of memory.
pub const ENOMEM: u32 = 12;
/// Error: invalid argument (bad range, length, flags or command).
pub const EINVAL: u32 = 22;
/// Error: no space (also writes past the end of the export).
pub const ENOSPC: u32 = 28;
/// Error: operation not supported.
pub const ENOTSUP: u32 = 95;

/// Largest READ/WRITE payload we accept, and advertise in `INFO_BLOCK_SIZE` (32 MiB).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Minimum block size advertised: the backend takes any byte offset and length.
pub const MIN_BLOCK: u32 = 1;
/// Preferred block size advertised.
pub const PREFERRED_BLOCK: u32 = 4096;
/// Largest option payload we read; longer options end the connection.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Bytes in a transmission request header.
pub const REQUEST_LEN: usize = 28;

/// A transmission request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command (`CMD_*`).
    pub cmd: u16,
    /// Opaque cookie echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u32,
}

impl Request {
    /// Parses a header; the error names the bad magic.
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Result<Request, u32> {
        let magic = be32(&b[0..4]);
        if magic != REQUEST_MAGIC {
            return Err(magic);
        }
        Ok(Request {
            flags: be16(&b[4..6]),
            cmd: be16(&b[6..8]),
            handle: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            len: be32(&b[24..28]),
        })
    }

    /// Encodes the header (the client side; used by tests).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.cmd.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// A simple reply header: magic, error, handle.
pub fn simple_reply(error: u32, handle: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

/// An option reply header: magic, option, reply type, payload length.
pub fn option_reply(opt: u32, reply: u32, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..8].copy_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b[8..12].copy_from_slice(&opt.to_be_bytes());
    b[12..16].copy_from_slice(&reply.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// Big-endian u16 from the first 2 bytes of `b` (callers pass slices of the right length).
pub fn be16(b: &[u8]) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[..2]);
    u16::from_be_bytes(a)
}

/// Big-endian u32 from the first 4 bytes of `b`.
pub fn be32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

/// Big-endian u64 from the first 8 bytes of `b`.
pub fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// The NBD error value for a backend error.
pub fn errno_of(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => EPERM,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => ENOSPC,
        Some(libc::EINVAL) => EINVAL,
        Some(libc::ENOMEM) => ENOMEM,
        Some(libc::EOPNOTSUPP) => ENOTSUP,
        Some(_) => EIO,
        None => match e.kind() {
            io::ErrorKind::PermissionDenied => EPERM,
            io::ErrorKind::InvalidInput => EINVAL,
            io::ErrorKind::OutOfMemory => ENOMEM,
            io::ErrorKind::Unsupported => ENOTSUP,
            _ => EIO,
        },
    }
}

/// Parsed data of `OPT_INFO`/`OPT_GO`: the export name and the info items asked for.
#[derive(Debug, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    /// Export name bytes ("" is the default export).
    pub name: &'a [u8],
    /// Requested `INFO_*` items, big-endian u16 each.
    pub items: &'a [u8],
}

impl<'a> InfoRequest<'a> {
    /// Parses `u32 name length, name, u16 count, count * u16`; `None` if inconsistent.
    pub fn parse(data: &'a [u8]) -> Option<InfoRequest<'a>> {
        let name_len = usize::try_from(be32(data.get(..4)?)).ok()?;
        let rest = data.get(4..)?;
        let name = rest.get(..name_len)?;
        let rest = rest.get(name_len..)?;
        let count = usize::from(be16(rest.get(..2)?));
        let items = rest.get(2..)?;
        (items.len() == count * 2).then_some(InfoRequest { name, items })
    }

    /// Whether the client asked for `item`.
    pub fn wants(&self, item: u16) -> bool {
        self.items.chunks_exact(2).any(|c| be16(c) == item)
    }
}
