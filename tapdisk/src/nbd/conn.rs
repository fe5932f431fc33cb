//! One NBD connection: the fixed-newstyle handshake, then transmission with simple replies.
//!
//! Requests are served one at a time in the order they arrive; clients that pipeline simply
//! find their next requests already buffered. Replies go through a [`BufWriter`] that is
//! flushed whenever no complete request header is waiting in the read buffer, so a burst of
//! small requests costs a burst of small replies in one `write`, and nothing is held back while
//! the client waits.
//!
//! Protocol violations end the connection with an `Err` of kind `InvalidData` (the caller logs
//! it); errors the client can recover from get an error reply and the connection goes on.

use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use slog::{debug, warn, Logger};

use super::proto::*;
use crate::image::BlockTarget;
use crate::logging::RateLimit;

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
    /// Describes `target` as `name`.
    pub fn new(name: &str, target: &dyn BlockTarget) -> ExportInfo {
        let mut flags =
            TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_WRITE_ZEROES | TF_CAN_MULTI_CONN;
        if target.read_only() {
            flags |= TF_READ_ONLY;
        }
        if target.supports_discard() {
            flags |= TF_SEND_TRIM;
        }
        ExportInfo {
            name: name.to_owned(),
            size: target.size(),
            flags,
        }
    }

    fn matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }
}

/// How a connection ended without a protocol violation.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// `OPT_ABORT` during the handshake.
    Aborted,
    /// `CMD_DISC`.
    Disconnected,
    /// The client closed the socket between two messages.
    Closed,
}

pub(crate) fn protocol_error(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` if the stream ended before the first byte.
/// `patient`: a read timeout is not an error, the read goes on (in transmission the timeout
/// only paces [`PayloadBuf`]'s release; during the handshake it ends the connection).
fn read_exact_or_eof<R: Read>(r: &mut R, buf: &mut [u8], patient: bool) -> io::Result<bool> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) if done == 0 => return Ok(false),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("truncated message: got {done} of {} bytes", buf.len()),
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if patient && is_timeout(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Reads exactly `buf.len()` bytes; the end-of-file error says what was cut short.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8], what: &str, patient: bool) -> io::Result<()> {
    let len = buf.len();
    let truncated = || {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("truncated {what} ({len} bytes expected)"),
        )
    };
    match read_exact_or_eof(r, buf, patient) {
        Ok(true) => Ok(()),
        Ok(false) => Err(truncated()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(truncated()),
        Err(e) => Err(e),
    }
}

/// Payload buffer capacity a connection keeps while its client is idle.
pub const KEEP_IDLE: usize = 1 << 20;

/// A connection's one payload buffer. It grows to the largest request (up to
/// [`MAX_PAYLOAD`]) and is given back when the client goes idle, so idle clients hold at most
/// [`KEEP_IDLE`] each. Its capacity is counted in `held`, shared by a server's connections.
struct PayloadBuf<'a> {
    v: Vec<u8>,
    held: &'a AtomicU64,
}

impl PayloadBuf<'_> {
    fn get(&mut self, len: usize) -> &mut [u8] {
        if self.v.len() < len {
            let before = self.v.capacity();
            self.v.resize(len, 0);
            self.held
                .fetch_add((self.v.capacity() - before) as u64, Ordering::Relaxed);
        }
        &mut self.v[..len]
    }

    /// Gives a large buffer back (the client is idle).
    fn release(&mut self) {
        if self.v.capacity() > KEEP_IDLE {
            self.held
                .fetch_sub(self.v.capacity() as u64, Ordering::Relaxed);
            self.v = Vec::new();
        }
    }
}

impl Drop for PayloadBuf<'_> {
    fn drop(&mut self) {
        self.held
            .fetch_sub(self.v.capacity() as u64, Ordering::Relaxed);
    }
}

/// Drives one connection to its end.
pub fn serve<R: Read, W: Write>(
    r: &mut BufReader<R>,
    w: &mut BufWriter<W>,
    export: &ExportInfo,
    target: &dyn BlockTarget,
    log: &Logger,
) -> io::Result<End> {
    serve_with(r, w, export, target, log, &AtomicU64::new(0), |_| Ok(()))
}

/// As [`serve`]; `on_transmission` runs once the handshake is over, before the first
/// request is read (the server sets its idle timeout there: each time a read times out with
/// no request under way, the connection gives back a payload buffer larger than
/// [`KEEP_IDLE`]). `held` counts the bytes of payload buffer the connection holds.
pub fn serve_with<R: Read, W: Write>(
    r: &mut BufReader<R>,
    w: &mut BufWriter<W>,
    export: &ExportInfo,
    target: &dyn BlockTarget,
    log: &Logger,
    held: &AtomicU64,
    on_transmission: impl FnOnce(&mut BufReader<R>) -> io::Result<()>,
) -> io::Result<End> {
    let mut opt_buf = Vec::new();
    if let Some(end) = handshake(r, w, export, &mut opt_buf, log)? {
        return Ok(end);
    }
    drop(opt_buf);
    on_transmission(r)?;
    debug!(log, "transmission");
    transmission(r, w, export, target, log, held)
}

/// Runs option haggling. `Ok(None)` means "enter transmission".
fn handshake<R: Read, W: Write>(
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

/// The transmission phase.
fn transmission<R: Read, W: Write>(
    r: &mut BufReader<R>,
    w: &mut BufWriter<W>,
    export: &ExportInfo,
    target: &dyn BlockTarget,
    log: &Logger,
    held: &AtomicU64,
) -> io::Result<End> {
    let mut buf = PayloadBuf {
        v: Vec::new(),
        held,
    };
    let mut io_errors = RateLimit::new(5, Duration::from_secs(10));
    let read_only = export.flags & TF_READ_ONLY != 0;
    let can_trim = export.flags & TF_SEND_TRIM != 0;
    loop {
        if r.buffer().len() < REQUEST_LEN {
            w.flush()?;
        }
        // Wait for the next request; each read timeout on the way is idle time.
        loop {
            match r.fill_buf() {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => buf.release(),
                Err(e) => return Err(e),
            }
        }
        let mut hdr = [0u8; REQUEST_LEN];
        if !read_exact_or_eof(r, &mut hdr, true)? {
            return Ok(End::Closed);
        }
        let req = Request::parse(&hdr)
            .map_err(|m| protocol_error(format!("bad request magic {m:#010x}")))?;
        let len = req.len as usize;

        if req.cmd == CMD_WRITE {
            if req.len > MAX_PAYLOAD {
                // We cannot tell whether the client will really send that much data (it
                // broke the advertised limit), so the stream cannot be resynchronised:
                // answer EINVAL, then hang up.
                w.write_all(&simple_reply(EINVAL, req.handle))?;
                w.flush()?;
                return Err(protocol_error(format!(
                    "write of {} bytes is over the {MAX_PAYLOAD} byte limit",
                    req.len
                )));
            }
            read_full(r, buf.get(len), "write payload", true)?;
        }

        let result: Result<(), u32> = match req.cmd {
            CMD_DISC => {
                debug!(log, "soft disconnect");
                return Ok(End::Disconnected);
            }
            CMD_READ => check(&req, CMD_FLAG_FUA, export, false, EINVAL).and_then(|()| {
                if req.len > MAX_PAYLOAD {
                    return Err(EINVAL);
                }
                target
                    .read_at(buf.get(len), req.offset)
                    .map_err(|e| io_err(&e, log, &mut io_errors))
            }),
            CMD_WRITE => check(&req, CMD_FLAG_FUA, export, read_only, ENOSPC).and_then(|()| {
                let fua = req.flags & CMD_FLAG_FUA != 0;
                target
                    .write_at(buf.get(len), req.offset, fua)
                    .map_err(|e| io_err(&e, log, &mut io_errors))
            }),
            CMD_FLUSH => {
                if req.flags & !CMD_FLAG_FUA != 0 {
                    Err(EINVAL)
                } else {
                    target.flush().map_err(|e| io_err(&e, log, &mut io_errors))
                }
            }
            CMD_TRIM if can_trim => {
                check(&req, CMD_FLAG_FUA, export, read_only, EINVAL).and_then(|()| {
                    let fua = req.flags & CMD_FLAG_FUA != 0;
                    target
                        .discard(req.offset, req.len.into())
                        .and_then(|()| if fua { target.flush() } else { Ok(()) })
                        .map_err(|e| io_err(&e, log, &mut io_errors))
                })
            }
            CMD_WRITE_ZEROES => check(
                &req,
                CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
                export,
                read_only,
                ENOSPC,
            )
            .and_then(|()| {
                let fua = req.flags & CMD_FLAG_FUA != 0;
                target
                    .write_zeroes(req.offset, req.len.into())
                    .and_then(|()| if fua { target.flush() } else { Ok(()) })
                    .map_err(|e| io_err(&e, log, &mut io_errors))
            }),
            _ => Err(EINVAL),
        };
        match result {
            Ok(()) => {
                w.write_all(&simple_reply(0, req.handle))?;
                if req.cmd == CMD_READ {
                    w.write_all(buf.get(len))?;
                }
            }
            Err(errno) => {
                debug!(log, "request failed"; "cmd" => req.cmd, "flags" => req.flags,
                       "offset" => req.offset, "len" => req.len, "errno" => errno);
                w.write_all(&simple_reply(errno, req.handle))?;
            }
        }
    }
}

/// Validates flags, permission, length and range of a data command. `past_end` is the error
/// for a range beyond the end of the export (ENOSPC for writes, EINVAL otherwise).
fn check(
    req: &Request,
    allowed_flags: u16,
    export: &ExportInfo,
    read_only: bool,
    past_end: u32,
) -> Result<(), u32> {
    if req.flags & !allowed_flags != 0 {
        return Err(EINVAL);
    }
    if read_only {
        return Err(EPERM);
    }
    if req.len == 0 {
        return Err(EINVAL);
    }
    match req.offset.checked_add(req.len.into()) {
        Some(end) if end <= export.size => Ok(()),
        _ => Err(past_end),
    }
}

fn io_err(e: &io::Error, log: &Logger, limit: &mut RateLimit) -> u32 {
    if let Some(suppressed) = limit.check() {
        warn!(log, "backend IO error"; "error" => %e, "suppressed" => suppressed);
    }
    errno_of(e)
}
