//! One control connection: request lines in, one reply line each, every phase under a
//! deadline so that a peer that stalls holds only its own connection, and only for so long.
//!
//! - Between requests a connection may sit idle for [`IDLE`]; then it is closed.
//! - Once the first byte of a request has arrived, the whole line (up to its newline) must
//!   arrive within [`LINE_DEADLINE`], however the peer spreads it out; a late line is answered
//!   with an error and the connection is closed.
//! - A reply must be taken by the peer within [`REPLY_DEADLINE`].
//! - At most [`MAX_CONNECTIONS`] connections are served at once; the next is answered with an
//!   error line and closed.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tapdisk_control::proto::{ResponseMsg, ResultMsg, MAX_LINE, VERSION};

use super::Daemon;

/// How long a connection may wait between two requests.
pub const IDLE: Duration = Duration::from_secs(300);
/// How long one request line may take to arrive once it has begun.
pub const LINE_DEADLINE: Duration = if cfg!(test) {
    Duration::from_secs(1)
} else {
    Duration::from_secs(10)
};
/// How long a reply may take to be written.
pub const REPLY_DEADLINE: Duration = Duration::from_secs(10);
/// Control connections served at once.
pub const MAX_CONNECTIONS: usize = 64;

/// What reading one request gave.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Line {
    /// A line, with its newline (or cut at `MAX_LINE + 1` bytes, or at end of file).
    Complete(Vec<u8>),
    /// End of file, or no request within [`IDLE`].
    End,
    /// A request began but did not end within [`LINE_DEADLINE`].
    Late,
}

/// Reads one request line from `r`: at most `MAX_LINE + 1` bytes, the whole of it within
/// `deadline` of its first byte, waiting up to `idle` for that first byte.
pub(super) fn read_line(
    r: &mut BufReader<UnixStream>,
    idle: Duration,
    deadline: Duration,
) -> io::Result<Line> {
    let mut line = Vec::new();
    let mut ends: Option<Instant> = None;
    loop {
        let wait = match ends {
            None => idle,
            Some(t) => match t.checked_duration_since(Instant::now()) {
                Some(d) if !d.is_zero() => d,
                _ => return Ok(Line::Late),
            },
        };
        r.get_ref().set_read_timeout(Some(wait))?;
        let buf = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(if ends.is_some() {
                    Line::Late
                } else {
                    Line::End
                });
            }
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(if line.is_empty() {
                Line::End
            } else {
                Line::Complete(line)
            });
        }
        ends.get_or_insert_with(|| Instant::now() + deadline);
        let room = (MAX_LINE + 1).saturating_sub(line.len());
        let take = buf.len().min(room);
        if let Some(i) = buf[..take].iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&buf[..=i]);
            r.consume(i + 1);
            return Ok(Line::Complete(line));
        }
        line.extend_from_slice(&buf[..take]);
        r.consume(take);
        if line.len() > MAX_LINE {
            return Ok(Line::Complete(line));
        }
    }
}

/// Writes one response line.
pub(super) fn write_reply(w: &mut UnixStream, result: ResultMsg) -> io::Result<()> {
    let mut out = serde_json::to_vec(&ResponseMsg { v: VERSION, result }).unwrap_or_default();
    out.push(b'\n');
    w.write_all(&out)
}

/// Counts a connection for as long as it lives.
struct Counted(Arc<Daemon>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.control_conns.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Daemon {
    /// Takes a new control connection: serves it on a thread of its own, or refuses it (with
    /// an error line) when [`MAX_CONNECTIONS`] are served already.
    pub(super) fn take_connection(self: &Arc<Daemon>, mut sock: UnixStream) {
        if self.control_conns.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            self.control_conns.fetch_sub(1, Ordering::AcqRel);
            let _ = sock.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = write_reply(
                &mut sock,
                ResultMsg::Error(format!(
                    "this tapdisk already serves {MAX_CONNECTIONS} control connections; try again"
                )),
            );
            return;
        }
        let counted = Counted(self.clone());
        let spawned = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || counted.0.clone().connection(sock));
        if let Err(e) = spawned {
            slog::warn!(self.log, "cannot start a control connection thread"; "error" => %e);
        }
    }

    /// Serves one control connection until the peer leaves, stalls, or shuts the process
    /// down.
    fn connection(self: Arc<Daemon>, sock: UnixStream) {
        let mut w = match sock.try_clone() {
            Ok(w) => w,
            Err(_) => return,
        };
        if w.set_write_timeout(Some(REPLY_DEADLINE)).is_err() {
            return;
        }
        let mut r = BufReader::new(sock);
        loop {
            let line = match read_line(&mut r, IDLE, LINE_DEADLINE) {
                Ok(Line::Complete(l)) => l,
                Ok(Line::End) | Err(_) => return,
                Ok(Line::Late) => {
                    let _ = write_reply(
                        &mut w,
                        ResultMsg::Error(format!(
                            "control message not finished within {} s of its first byte",
                            LINE_DEADLINE.as_secs()
                        )),
                    );
                    return;
                }
            };
            let (reply, exit) = self.answer(&line);
            let is_shutdown = exit && matches!(reply, ResultMsg::Ok(_));
            let _ = write_reply(&mut w, reply);
            if is_shutdown {
                self.exit();
            }
            if exit {
                return;
            }
        }
    }
}
