//! The fixed-newstyle handshake: the greeting, then option haggling until the client enters
//! transmission (`OPT_GO`, `OPT_EXPORT_NAME`), gives up (`OPT_ABORT`) or goes away.

use std::io::{self, Read, Write};

use slog::{debug, Logger};

use super::proto::*;
use super::stream::{protocol_error, read_exact_or_eof, read_full, End};

/// What is being exported, as the handshake describes it.
#[derive(Debug, Clone)]
pub struct ExportInfo {
    /// The export's name (the empty name is accepted too).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`TF_*`).
    pub flags: u16,
}

impl ExportInfo {
    /// An export of `size` bytes called `name`; `read_only` refuses writes, `trim` offers
    /// `CMD_TRIM`.
    pub fn new(name: &str, size: u64, read_only: bool, trim: bool) -> ExportInfo {
        let mut flags =
            TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_WRITE_ZEROES | TF_CAN_MULTI_CONN;
        if read_only {
            flags |= TF_READ_ONLY;
        }
        if trim {
            flags |= TF_SEND_TRIM;
        }
        ExportInfo {
            name: name.to_owned(),
            size,
            flags,
        }
    }

    fn matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.flags & TF_READ_ONLY != 0
    }

    /// Whether `CMD_TRIM` is offered.
    pub fn can_trim(&self) -> bool {
        self.flags & TF_SEND_TRIM != 0
    }
}

/// Runs option haggling. `Ok(None)` means "enter transmission".
pub(super) fn handshake<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    export: &ExportInfo,
    data: &mut Vec<u8>,
    log: &Logger,
) -> io::Result<Option<End>> {
    w.write_all(&NBDMAGIC.to_be_bytes())?;
    w.write_all(&IHAVEOPT.to_be_bytes())?;
    w.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
    w.flush()?;
    let mut b4 = [0u8; 4];
    if !read_exact_or_eof(r, &mut b4, false)? {
        return Ok(Some(End::Closed));
    }
    let client_flags = u32::from_be_bytes(b4);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(protocol_error(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    if client_flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(protocol_error(
            "client does not speak fixed newstyle".into(),
        ));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;

    loop {
        let mut hdr = [0u8; 16];
        if !read_exact_or_eof(r, &mut hdr, false)? {
            return Ok(Some(End::Closed));
        }
        let (magic, opt, len) = (be64(&hdr[0..8]), be32(&hdr[8..12]), be32(&hdr[12..16]));
        if magic != IHAVEOPT {
            return Err(protocol_error(format!("bad option magic {magic:#018x}")));
        }
        if len > MAX_OPTION_LEN {
            // We will not read (or skip) that much; say why, then hang up.
            if opt != OPT_EXPORT_NAME {
                let msg = format!("option data of {len} bytes is over the {MAX_OPTION_LEN} limit");
                reply_err(w, opt, REP_ERR_TOO_BIG, &msg)?;
                w.flush()?;
            }
            return Err(protocol_error(format!(
                "option {opt} with {len} bytes of data"
            )));
        }
        // Bounded by MAX_OPTION_LEN above.
        data.resize(len as usize, 0);
        read_full(r, data, "option data", false)?;
        debug!(log, "option"; "opt" => opt, "len" => len);
        match opt {
            OPT_EXPORT_NAME => {
                if !export.matches(data) {
                    return Err(protocol_error(format!(
                        "unknown export '{}' in OPT_EXPORT_NAME",
                        String::from_utf8_lossy(data)
                    )));
                }
                w.write_all(&export.size.to_be_bytes())?;
                w.write_all(&export.flags.to_be_bytes())?;
                if !no_zeroes {
                    w.write_all(&[0u8; 124])?;
                }
                w.flush()?;
                return Ok(None);
            }
            OPT_ABORT => {
                w.write_all(&option_reply(opt, REP_ACK, 0))?;
                w.flush()?;
                return Ok(Some(End::Aborted));
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply_err(w, opt, REP_ERR_INVALID, "OPT_LIST takes no data")?;
                } else {
                    let name = export.name.as_bytes();
                    let len = u32::try_from(name.len() + 4).map_err(io::Error::other)?;
                    w.write_all(&option_reply(opt, REP_SERVER, len))?;
                    w.write_all(&(len - 4).to_be_bytes())?;
                    w.write_all(name)?;
                    w.write_all(&option_reply(opt, REP_ACK, 0))?;
                }
            }
            OPT_INFO | OPT_GO => match InfoRequest::parse(data) {
                None => reply_err(w, opt, REP_ERR_INVALID, "malformed OPT_INFO/OPT_GO data")?,
                Some(req) if !export.matches(req.name) => {
                    let msg = format!("no export named '{}'", String::from_utf8_lossy(req.name));
                    reply_err(w, opt, REP_ERR_UNKNOWN, &msg)?;
                }
                Some(req) => {
                    send_info(w, opt, export, &req)?;
                    w.write_all(&option_reply(opt, REP_ACK, 0))?;
                    if opt == OPT_GO {
                        w.flush()?;
                        return Ok(None);
                    }
                }
            },
            OPT_STARTTLS
            | OPT_STRUCTURED_REPLY
            | OPT_LIST_META_CONTEXT
            | OPT_SET_META_CONTEXT
            | OPT_EXTENDED_HEADERS => reply_err(w, opt, REP_ERR_UNSUP, "not supported")?,
            _ => reply_err(w, opt, REP_ERR_UNSUP, "unknown option")?,
        }
        w.flush()?;
    }
}

fn reply_err<W: Write>(w: &mut W, opt: u32, err: u32, msg: &str) -> io::Result<()> {
    // Messages are ours and short.
    let len = u32::try_from(msg.len()).map_err(io::Error::other)?;
    w.write_all(&option_reply(opt, err, len))?;
    w.write_all(msg.as_bytes())
}

fn send_info<W: Write>(
    w: &mut W,
    opt: u32,
    export: &ExportInfo,
    req: &InfoRequest<'_>,
) -> io::Result<()> {
    w.write_all(&option_reply(opt, REP_INFO, 12))?;
    w.write_all(&INFO_EXPORT.to_be_bytes())?;
    w.write_all(&export.size.to_be_bytes())?;
    w.write_all(&export.flags.to_be_bytes())?;
    // Our constraints are the protocol's defaults, so sending them unasked is harmless.
    w.write_all(&option_reply(opt, REP_INFO, 14))?;
    w.write_all(&INFO_BLOCK_SIZE.to_be_bytes())?;
    w.write_all(&MIN_BLOCK.to_be_bytes())?;
    w.write_all(&PREFERRED_BLOCK.to_be_bytes())?;
    w.write_all(&MAX_PAYLOAD.to_be_bytes())?;
    if req.wants(INFO_NAME) {
        let name = export.name.as_bytes();
        let len = u32::try_from(name.len() + 2).map_err(io::Error::other)?;
        w.write_all(&option_reply(opt, REP_INFO, len))?;
        w.write_all(&INFO_NAME.to_be_bytes())?;
        w.write_all(name)?;
    }
    if req.wants(INFO_DESCRIPTION) {
        let desc = b"tapdisk-rs virtual disk";
        w.write_all(&option_reply(opt, REP_INFO, desc.len() as u32 + 2))?;
        w.write_all(&INFO_DESCRIPTION.to_be_bytes())?;
        w.write_all(desc)?;
    }
    Ok(())
}
