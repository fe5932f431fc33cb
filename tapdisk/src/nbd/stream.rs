//! What the handshake and transmission share: how a connection ends, the client's byte
//! stream, and reading exact amounts from it.

use std::io::{self, Read};
use std::os::fd::RawFd;

/// Payload buffer memory a connection keeps while its client is idle.
pub const KEEP_IDLE: usize = 1 << 20;

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

/// A byte stream from a client that may be waited on with `poll` (a socket), or not (a
/// buffer in tests and fuzzing, always ready).
pub trait Source: Read {
    /// The descriptor to poll for readability, if any.
    fn poll_fd(&self) -> Option<RawFd>;
}

impl Source for &[u8] {
    fn poll_fd(&self) -> Option<RawFd> {
        None
    }
}

impl<T: AsRef<[u8]>> Source for io::Cursor<T> {
    fn poll_fd(&self) -> Option<RawFd> {
        None
    }
}

pub(crate) fn protocol_error(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

pub(super) fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` if the stream ended before the first byte.
/// `patient`: a read timeout is not an error, the read goes on (in transmission the timeout
/// only paces the release of idle buffers; during the handshake it ends the connection).
pub(super) fn read_exact_or_eof<R: Read>(
    r: &mut R,
    buf: &mut [u8],
    patient: bool,
) -> io::Result<bool> {
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
pub(super) fn read_full<R: Read>(
    r: &mut R,
    buf: &mut [u8],
    what: &str,
    patient: bool,
) -> io::Result<()> {
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
