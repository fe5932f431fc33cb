//! The transmission phase: requests in, simple replies out, pipelined.
//!
//! Each request is checked (flags, permission, length, range), its payload read straight into
//! a buffer of the connection's [`Disk`], and submitted; the connection keeps reading while
//! earlier requests are in flight, and answers each as it completes (simple replies may come
//! in any order: the client matches them by handle). Replies go through a [`BufWriter`] that
//! is flushed whenever no complete request header is waiting in the read buffer, and the disk
//! is notified once per such batch. While nothing is buffered the connection sleeps on both
//! the socket and the disk's completion descriptor.

use std::io::{self, BufReader, BufWriter, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use slog::{debug, warn, Logger};

use super::disk::{Cmd, Completion, Disk, Op};
use super::handshake::ExportInfo;
use super::proto::*;
use super::stream::{is_timeout, protocol_error, read_exact_or_eof, read_full, End, Source};
use crate::logging::RateLimit;

/// Counters of an NBD export (several connection threads add to them).
#[derive(Debug, Default, serde::Serialize)]
pub struct Counters {
    /// Reads.
    pub reads: AtomicU64,
    /// Writes.
    pub writes: AtomicU64,
    /// Flushes.
    pub flushes: AtomicU64,
    /// Discards and write-zeroes.
    pub discards: AtomicU64,
    /// Bytes read.
    pub read_bytes: AtomicU64,
    /// Bytes written.
    pub write_bytes: AtomicU64,
    /// Errors returned.
    pub errors: AtomicU64,
}

/// What a connection needs besides its streams.
pub struct ConnCx<'a> {
    /// The export.
    pub export: &'a ExportInfo,
    /// The server's counters.
    pub counters: &'a Counters,
    /// Bytes of buffer memory this server's connections hold (this one adds its share).
    pub held: &'a AtomicU64,
    /// Where the connection reports its client's activity (the server's slot policy).
    pub progress: &'a super::slots::Progress,
    /// Where the connection logs.
    pub log: &'a Logger,
}

/// How long the connection sleeps at most before it looks again (and, idle, gives memory
/// back).
const WAKE: Duration = super::IDLE_RELEASE;

/// Keeps the server's count of buffer memory in step with this connection's.
struct Held<'a> {
    total: &'a AtomicU64,
    mine: u64,
}

impl Held<'_> {
    fn update(&mut self, now: u64) {
        if now > self.mine {
            self.total.fetch_add(now - self.mine, Ordering::Relaxed);
        } else {
            self.total.fetch_sub(self.mine - now, Ordering::Relaxed);
        }
        self.mine = now;
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.update(0);
    }
}

/// Answers what the disk finished.
fn answer<W: Write>(
    w: &mut BufWriter<W>,
    disk: &mut dyn Disk,
    done: &mut Vec<Completion>,
    cx: &ConnCx<'_>,
) -> io::Result<()> {
    disk.reap(done)?;
    if !done.is_empty() {
        cx.progress.active();
    }
    let mut res = Ok(());
    for c in done.drain(..) {
        if res.is_ok() {
            res = match c.result {
                Ok(()) => {
                    w.write_all(&simple_reply(0, c.cookie))
                        .and_then(|()| match (&c.cmd, &c.buf) {
                            (Cmd::Read, Some(b)) => w.write_all(disk.data(b)),
                            _ => Ok(()),
                        })
                }
                Err(errno) => {
                    cx.counters.errors.fetch_add(1, Ordering::Relaxed);
                    w.write_all(&simple_reply(errno, c.cookie))
                }
            };
        }
        if let Some(b) = c.buf {
            disk.free(b);
        }
    }
    res
}

/// Waits until the socket has data or the disk completions; false on a timeout; an error if
/// the disk is gone (its ring was dropped: nothing in flight will ever complete).
fn wait_for_either<R: Source>(r: &BufReader<R>, disk: &mut dyn Disk) -> io::Result<bool> {
    let (Some(sock), Some(dfd)) = (r.get_ref().poll_fd(), disk.wait_fd()) else {
        return Ok(true);
    };
    if !disk.arm() {
        return Ok(true);
    }
    let gone = disk.gone_fd();
    let mut fds = [
        libc::pollfd {
            fd: sock,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: dfd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            // A negative descriptor is ignored by poll.
            fd: gone.unwrap_or(-1),
            events: libc::POLLRDHUP,
            revents: 0,
        },
    ];
    let ms = WAKE.as_millis() as i32;
    loop {
        // SAFETY: `fds` is a live array of three pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 3, ms) };
        if n >= 0 {
            if fds[2].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
                && fds[1].revents & libc::POLLIN == 0
            {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the VBD dropped the connection's ring",
                ));
            }
            return Ok(n > 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Finishes what is in flight and answers it (the client disconnected or is leaving).
fn drain<W: Write>(
    w: &mut BufWriter<W>,
    disk: &mut dyn Disk,
    done: &mut Vec<Completion>,
    cx: &ConnCx<'_>,
) -> io::Result<()> {
    disk.push()?;
    while disk.in_flight() > 0 {
        disk.wait()?;
        answer(w, disk, done, cx)?;
    }
    w.flush()
}

/// The transmission phase, to the connection's end.
pub(super) fn transmission<R: Source, W: Write>(
    r: &mut BufReader<R>,
    w: &mut BufWriter<W>,
    disk: &mut dyn Disk,
    cx: &ConnCx<'_>,
) -> io::Result<End> {
    let mut held = Held {
        total: cx.held,
        mine: 0,
    };
    let mut done = Vec::with_capacity(64);
    let mut io_errors = RateLimit::new(5, Duration::from_secs(10));
    let r = loop {
        match step(r, w, disk, cx, &mut done, &mut io_errors) {
            Ok(None) => held.update(disk.held()),
            Ok(Some(end)) => break Ok(end),
            Err(e) => break Err(e),
        }
    };
    // Whatever ended the connection, the requests it started finish before the disk goes.
    let drained = drain(w, disk, &mut done, cx);
    match (r, drained) {
        (Ok(End::Disconnected), Err(e)) => Err(e),
        (r, _) => r,
    }
}

/// Takes one request (answering what completes meanwhile). `Some` when the connection ends.
fn step<R: Source, W: Write>(
    r: &mut BufReader<R>,
    w: &mut BufWriter<W>,
    disk: &mut dyn Disk,
    cx: &ConnCx<'_>,
    done: &mut Vec<Completion>,
    io_errors: &mut RateLimit,
) -> io::Result<Option<End>> {
    answer(w, disk, done, cx)?;
    if r.buffer().len() < REQUEST_LEN {
        // Nothing complete to read: send what we have, let the disk start what we gave it,
        // and sleep until the client or the disk has something.
        w.flush()?;
        disk.push()?;
        if disk.in_flight() > 0 {
            if !wait_for_either(r, disk)? {
                return Ok(None);
            }
            if !socket_ready(r)? {
                return Ok(None);
            }
        } else {
            // Idle: a read timeout on the way is idle time.
            match io::BufRead::fill_buf(r) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(None),
                Err(e) if is_timeout(&e) => {
                    disk.release_idle();
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        }
    }
    let mut hdr = [0u8; REQUEST_LEN];
    if !read_exact_or_eof(r, &mut hdr, true)? {
        return Ok(Some(End::Closed));
    }
    let req =
        Request::parse(&hdr).map_err(|m| protocol_error(format!("bad request magic {m:#010x}")))?;
    cx.progress.active();
    let export = cx.export;
    let mut buf = None;
    if req.cmd == CMD_WRITE {
        if req.len > MAX_PAYLOAD {
            // We cannot tell whether the client will really send that much data (it broke
            // the advertised limit), so the stream cannot be resynchronised: answer EINVAL,
            // then hang up.
            w.write_all(&simple_reply(EINVAL, req.handle))?;
            w.flush()?;
            return Err(protocol_error(format!(
                "write of {} bytes is over the {MAX_PAYLOAD} byte limit",
                req.len
            )));
        }
        let b = alloc(w, disk, done, cx, req.len as usize)?;
        read_full(r, disk.data(&b), "write payload", true)?;
        buf = Some(b);
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let checked = match req.cmd {
        CMD_DISC => {
            debug!(cx.log, "soft disconnect");
            return Ok(Some(End::Disconnected));
        }
        CMD_READ if req.len > MAX_PAYLOAD => Err(EINVAL),
        CMD_READ => check(&req, CMD_FLAG_FUA, export, false, EINVAL).map(|()| Cmd::Read),
        CMD_WRITE => {
            check(&req, CMD_FLAG_FUA, export, export.read_only(), ENOSPC).map(|()| Cmd::Write)
        }
        CMD_FLUSH if req.flags & !CMD_FLAG_FUA == 0 => Ok(Cmd::Flush),
        CMD_TRIM if export.can_trim() || export.read_only() => {
            check(&req, CMD_FLAG_FUA, export, export.read_only(), EINVAL).map(|()| Cmd::Trim)
        }
        CMD_WRITE_ZEROES => check(
            &req,
            CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            export,
            export.read_only(),
            ENOSPC,
        )
        .map(|()| Cmd::WriteZeroes),
        _ => Err(EINVAL),
    };
    let cmd = match checked {
        Ok(c) => c,
        Err(errno) => {
            debug!(cx.log, "request refused"; "cmd" => req.cmd, "flags" => req.flags,
                   "offset" => req.offset, "len" => req.len, "errno" => errno);
            if let Some(b) = buf {
                disk.free(b);
            }
            w.write_all(&simple_reply(errno, req.handle))?;
            return Ok(None);
        }
    };
    let len = u64::from(req.len);
    let c = cx.counters;
    match cmd {
        Cmd::Read => {
            c.reads.fetch_add(1, Ordering::Relaxed);
            c.read_bytes.fetch_add(len, Ordering::Relaxed);
            buf = Some(alloc(w, disk, done, cx, req.len as usize)?);
        }
        Cmd::Write => {
            c.writes.fetch_add(1, Ordering::Relaxed);
            c.write_bytes.fetch_add(len, Ordering::Relaxed);
        }
        Cmd::Flush => {
            c.flushes.fetch_add(1, Ordering::Relaxed);
        }
        Cmd::Trim | Cmd::WriteZeroes => {
            c.discards.fetch_add(1, Ordering::Relaxed);
        }
    }
    let op = Op {
        cookie: req.handle,
        cmd,
        offset: req.offset,
        len,
        fua,
        buf,
    };
    if let Err(e) = disk.submit(op) {
        if let Some(suppressed) = io_errors.check() {
            warn!(cx.log, "the disk of an NBD connection failed"; "error" => %e,
                  "suppressed" => suppressed);
        }
        return Err(e);
    }
    if r.buffer().len() < REQUEST_LEN {
        disk.push()?;
    }
    Ok(None)
}

/// Whether the socket has something to read now (without blocking).
fn socket_ready<R: Source>(r: &BufReader<R>) -> io::Result<bool> {
    let Some(fd) = r.get_ref().poll_fd() else {
        return Ok(true);
    };
    let mut p = [libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: a live array of one pollfd for the duration of the call; timeout 0.
    let n = unsafe { libc::poll(p.as_mut_ptr(), 1, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n > 0)
}

/// A buffer of `len` bytes, answering completions until one is free.
fn alloc<W: Write>(
    w: &mut BufWriter<W>,
    disk: &mut dyn Disk,
    done: &mut Vec<Completion>,
    cx: &ConnCx<'_>,
    len: usize,
) -> io::Result<super::disk::Buf> {
    loop {
        if let Some(b) = disk.alloc(len) {
            return Ok(b);
        }
        if disk.in_flight() == 0 {
            return Err(io::Error::other(format!(
                "no buffer of {len} bytes with nothing in flight"
            )));
        }
        disk.push()?;
        disk.wait()?;
        answer(w, disk, done, cx)?;
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
