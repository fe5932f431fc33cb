//! A xenstore client speaking the wire protocol (`xen/include/public/io/xs_wire.h`) over
//! `/run/xenstored/socket`, or `/dev/xen/xenbus` when no xenstored socket is local.
//!
//! Every message is a 16-byte header (`type`, `req_id`, `tx_id`, `len`, native endian) and
//! `len` bytes of NUL-separated strings. Replies come in order; watch events may arrive between
//! a request and its reply, so they are queued and handed out by [`Xenstore::next_event`].
//!
//! xenstored itself is trusted, but much of what it returns was written by a guest (a
//! frontend's keys), so payloads are capped at 4 KiB, must be UTF-8, and their meaning is
//! checked by the caller ([`super::frontend_keys`]).
//!
//! Why not the `xenstore-rs` crate (0.8, checked on crates.io): its blocking client has no
//! watches and no transactions (the transaction id is always written as 0), watches exist only
//! in its tokio variant (tokio, futures, uuid, anyhow for one socket), and it allocates whatever
//! length a reply header claims. A backend needs watches and transactions above all, so this
//! module speaks the (small) protocol itself.

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Largest payload either side sends (`XENSTORE_PAYLOAD_MAX`).
pub const PAYLOAD_MAX: usize = 4096;

/// Message types used here (`enum xsd_sockmsg_type`).
#[allow(missing_docs)]
pub mod msg {
    pub const DIRECTORY: u32 = 1;
    pub const READ: u32 = 2;
    pub const WATCH: u32 = 4;
    pub const UNWATCH: u32 = 5;
    pub const TRANSACTION_START: u32 = 6;
    pub const TRANSACTION_END: u32 = 7;
    pub const GET_DOMAIN_PATH: u32 = 10;
    pub const WRITE: u32 = 11;
    pub const MKDIR: u32 = 12;
    pub const RM: u32 = 13;
    pub const SET_PERMS: u32 = 14;
    pub const WATCH_EVENT: u32 = 15;
    pub const ERROR: u32 = 16;
}

pub use crate::error::XsError;

/// A transaction id; [`Tx::NONE`] is outside any transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tx(pub u32);

impl Tx {
    /// No transaction.
    pub const NONE: Tx = Tx(0);
}

/// A fired watch: the path that changed and the token the watch was set with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    /// The node that changed (or the watched node, for the event fired on registration).
    pub path: String,
    /// The watch's token.
    pub token: String,
}

/// A decoded message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// `XS_*` type.
    pub ty: u32,
    /// Request id, echoed.
    pub req_id: u32,
    /// Transaction id.
    pub tx_id: u32,
    /// Payload.
    pub payload: Vec<u8>,
}

/// Parses a 16-byte header; returns (type, req_id, tx_id, len) or why it is invalid.
pub fn parse_header(h: &[u8; 16]) -> crate::Result<(u32, u32, u32, usize)> {
    let w = |i: usize| u32::from_ne_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let len = w(12) as usize;
    if len > PAYLOAD_MAX {
        return Err(
            XsError::Protocol(format!("message of {len} bytes (at most {PAYLOAD_MAX})")).into(),
        );
    }
    Ok((w(0), w(4), w(8), len))
}

/// Splits a payload into its NUL-terminated strings (a last unterminated one counts too).
pub fn split_strings(payload: &[u8]) -> crate::Result<Vec<&str>> {
    let mut out = Vec::new();
    let body = payload.strip_suffix(&[0]).unwrap_or(payload);
    if body.is_empty() && payload.len() <= 1 {
        return Ok(out);
    }
    for part in body.split(|&b| b == 0) {
        out.push(
            std::str::from_utf8(part)
                .map_err(|_| XsError::Protocol("a string is not UTF-8".into()))?,
        );
    }
    Ok(out)
}

/// Decodes a WATCH_EVENT payload (`path\0token\0`).
pub fn parse_watch_event(payload: &[u8]) -> crate::Result<WatchEvent> {
    let v = split_strings(payload)?;
    match v.as_slice() {
        [path, token, ..] => Ok(WatchEvent {
            path: (*path).to_owned(),
            token: (*token).to_owned(),
        }),
        _ => Err(XsError::Protocol("watch event without path and token".into()).into()),
    }
}

/// A connection to xenstore.
#[derive(Debug)]
pub struct Xenstore {
    fd: OwnedFd,
    next_id: u32,
    events: VecDeque<WatchEvent>,
}

fn op_name(ty: u32) -> &'static str {
    match ty {
        msg::DIRECTORY => "directory",
        msg::READ => "read",
        msg::WATCH => "watch",
        msg::UNWATCH => "unwatch",
        msg::TRANSACTION_START => "transaction_start",
        msg::TRANSACTION_END => "transaction_end",
        msg::GET_DOMAIN_PATH => "get_domain_path",
        msg::WRITE => "write",
        msg::MKDIR => "mkdir",
        msg::RM => "rm",
        msg::SET_PERMS => "set_perms",
        _ => "request",
    }
}

impl Xenstore {
    /// Connects to `$XENSTORED_PATH`, `/run/xenstored/socket`, or else `/dev/xen/xenbus`.
    pub fn open() -> crate::Result<Xenstore> {
        let sock = std::env::var("XENSTORED_PATH").unwrap_or("/run/xenstored/socket".into());
        let fd: OwnedFd = match UnixStream::connect(&sock) {
            Ok(s) => s.into(),
            Err(_) => OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/xen/xenbus")
                .map_err(|e| {
                    XsError::Io(io::Error::new(
                        e.kind(),
                        format!("neither {sock} nor /dev/xen/xenbus can be opened: {e}"),
                    ))
                })?
                .into(),
        };
        Ok(Xenstore {
            fd,
            next_id: 1,
            events: VecDeque::new(),
        })
    }

    /// The descriptor to poll for watch events (check [`Xenstore::has_events`] first: some may
    /// already be queued).
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match nix::unistd::write(self.fd.as_fd(), buf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => buf = &buf[n..],
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn read_exact(&self, mut buf: &mut [u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match nix::unistd::read(self.fd.as_raw_fd(), buf) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "xenstore closed the connection",
                    ))
                }
                Ok(n) => buf = &mut buf[n..],
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn read_message(&self) -> crate::Result<Message> {
        let mut h = [0u8; 16];
        self.read_exact(&mut h).map_err(XsError::Io)?;
        let (ty, req_id, tx_id, len) = parse_header(&h)?;
        let mut payload = vec![0u8; len];
        self.read_exact(&mut payload).map_err(XsError::Io)?;
        Ok(Message {
            ty,
            req_id,
            tx_id,
            payload,
        })
    }

    fn request(&mut self, ty: u32, tx: Tx, parts: &[&[u8]], path: &str) -> crate::Result<Vec<u8>> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > PAYLOAD_MAX {
            return Err(XsError::Protocol(format!("request of {len} bytes")).into());
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let mut m = Vec::with_capacity(16 + len);
        for w in [ty, id, tx.0, len as u32] {
            m.extend_from_slice(&w.to_ne_bytes());
        }
        for p in parts {
            m.extend_from_slice(p);
        }
        self.write_all(&m).map_err(XsError::Io)?;
        loop {
            let r = self.read_message()?;
            if r.ty == msg::WATCH_EVENT {
                self.events.push_back(parse_watch_event(&r.payload)?);
                continue;
            }
            if r.ty == msg::ERROR {
                let errno = split_strings(&r.payload)?
                    .first()
                    .map(|s| (*s).to_owned())
                    .unwrap_or_default();
                return Err(XsError::Refused {
                    op: op_name(ty),
                    path: path.to_owned(),
                    errno,
                }
                .into());
            }
            if r.ty != ty {
                return Err(XsError::Protocol(format!(
                    "reply of type {} to a {} request",
                    r.ty,
                    op_name(ty)
                ))
                .into());
            }
            return Ok(r.payload);
        }
    }

    fn text(payload: Vec<u8>) -> Result<String, XsError> {
        String::from_utf8(payload).map_err(|_| XsError::Protocol("value is not UTF-8".into()))
    }

    /// Reads a node; `None` if it does not exist.
    pub fn read(&mut self, tx: Tx, path: &str) -> crate::Result<Option<String>> {
        match self.request(msg::READ, tx, &[path.as_bytes(), b"\0"], path) {
            Ok(v) => Ok(Some(Self::text(v)?)),
            Err(e) if e.is_xenstore("ENOENT") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes a node (creating its parents).
    pub fn write(&mut self, tx: Tx, path: &str, value: &str) -> crate::Result<()> {
        self.request(
            msg::WRITE,
            tx,
            &[path.as_bytes(), b"\0", value.as_bytes()],
            path,
        )
        .map(|_| ())
    }

    /// Creates a node if it does not exist.
    pub fn mkdir(&mut self, tx: Tx, path: &str) -> crate::Result<()> {
        self.request(msg::MKDIR, tx, &[path.as_bytes(), b"\0"], path)
            .map(|_| ())
    }

    /// Lists a node's children; empty if it does not exist.
    pub fn directory(&mut self, tx: Tx, path: &str) -> crate::Result<Vec<String>> {
        match self.request(msg::DIRECTORY, tx, &[path.as_bytes(), b"\0"], path) {
            Ok(v) => Ok(split_strings(&v)?.into_iter().map(str::to_owned).collect()),
            Err(e) if e.is_xenstore("ENOENT") => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Removes a node and its children (absent is fine).
    pub fn rm(&mut self, tx: Tx, path: &str) -> crate::Result<()> {
        match self.request(msg::RM, tx, &[path.as_bytes(), b"\0"], path) {
            Err(e) if e.is_xenstore("ENOENT") => Ok(()),
            r => r.map(|_| ()),
        }
    }

    /// Sets a node's permissions, e.g. `["n0", "r5"]`: owned by dom0, readable by domain 5.
    pub fn set_perms(&mut self, tx: Tx, path: &str, perms: &[&str]) -> crate::Result<()> {
        let mut parts: Vec<&[u8]> = vec![path.as_bytes(), b"\0"];
        for p in perms {
            parts.push(p.as_bytes());
            parts.push(b"\0");
        }
        self.request(msg::SET_PERMS, tx, &parts, path).map(|_| ())
    }

    /// Watches `path` and everything under it; events carry `token`. xenstored fires one event
    /// for `path` at once.
    pub fn watch(&mut self, path: &str, token: &str) -> crate::Result<()> {
        self.request(
            msg::WATCH,
            Tx::NONE,
            &[path.as_bytes(), b"\0", token.as_bytes(), b"\0"],
            path,
        )
        .map(|_| ())
    }

    /// Removes a watch.
    pub fn unwatch(&mut self, path: &str, token: &str) -> crate::Result<()> {
        self.request(
            msg::UNWATCH,
            Tx::NONE,
            &[path.as_bytes(), b"\0", token.as_bytes(), b"\0"],
            path,
        )
        .map(|_| ())
    }

    /// Starts a transaction.
    pub fn transaction_start(&mut self) -> crate::Result<Tx> {
        let v = self.request(msg::TRANSACTION_START, Tx::NONE, &[b"\0"], "")?;
        let s = split_strings(&v)?;
        s.first()
            .and_then(|t| t.parse::<u32>().ok())
            .map(Tx)
            .ok_or_else(|| XsError::Protocol("transaction id is not a number".into()).into())
    }

    /// Ends a transaction: commits it (`commit`) or aborts it. Returns false if xenstored
    /// refused the commit because of a conflict (`EAGAIN`): run the transaction again.
    pub fn transaction_end(&mut self, tx: Tx, commit: bool) -> crate::Result<bool> {
        let arg: &[u8] = if commit { b"T\0" } else { b"F\0" };
        match self.request(msg::TRANSACTION_END, tx, &[arg], "") {
            Ok(_) => Ok(true),
            Err(e) if e.is_xenstore("EAGAIN") => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Runs `f` in a transaction, retrying on conflicts (at most 100 times).
    pub fn transaction<R>(
        &mut self,
        mut f: impl FnMut(&mut Xenstore, Tx) -> crate::Result<R>,
    ) -> crate::Result<R> {
        for _ in 0..100 {
            let tx = self.transaction_start()?;
            match f(self, tx) {
                Ok(r) => {
                    if self.transaction_end(tx, true)? {
                        return Ok(r);
                    }
                }
                Err(e) => {
                    let _ = self.transaction_end(tx, false);
                    return Err(e);
                }
            }
        }
        Err(XsError::Protocol("transaction conflicted 100 times in a row".into()).into())
    }

    /// Whether watch events are queued.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// The next watch event: a queued one, or one read from the connection within `timeout`
    /// (`None` waits forever). `Ok(None)` when the timeout passed.
    pub fn next_event(&mut self, timeout: Option<Duration>) -> crate::Result<Option<WatchEvent>> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        loop {
            if let Some(e) = self.events.pop_front() {
                return Ok(Some(e));
            }
            let t = match timeout {
                None => PollTimeout::NONE,
                Some(d) => PollTimeout::try_from(d).unwrap_or(PollTimeout::MAX),
            };
            let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, t) {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(XsError::Io(e.into()).into()),
            }
            let m = self.read_message()?;
            if m.ty == msg::WATCH_EVENT {
                self.events.push_back(parse_watch_event(&m.payload)?);
            } else {
                return Err(XsError::Protocol(format!(
                    "unexpected message of type {} outside a request",
                    m.ty
                ))
                .into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn strings_and_events() {
        assert_eq!(split_strings(b"").unwrap(), Vec::<&str>::new());
        assert_eq!(split_strings(b"\0").unwrap(), Vec::<&str>::new());
        assert_eq!(split_strings(b"a\0bc\0").unwrap(), vec!["a", "bc"]);
        assert_eq!(split_strings(b"a\0bc").unwrap(), vec!["a", "bc"]);
        assert!(split_strings(b"\xff\0").is_err());
        let e = parse_watch_event(b"/local/domain/0/backend/vbd3/5/51712/state\0be\0").unwrap();
        assert_eq!(e.token, "be");
        assert!(e.path.ends_with("/state"));
        assert!(parse_watch_event(b"onlypath\0").is_err());
    }

    #[test]
    fn oversized_header_is_refused() {
        let mut h = [0u8; 16];
        h[12..16].copy_from_slice(&4097u32.to_ne_bytes());
        assert!(parse_header(&h).is_err());
        h[12..16].copy_from_slice(&4096u32.to_ne_bytes());
        assert_eq!(parse_header(&h).unwrap().3, 4096);
    }

    /// A fake xenstored on a socket pair: replies in order, with a watch event slipped in
    /// before the reply, as xenstored may do.
    #[test]
    fn events_between_request_and_reply_are_queued() {
        let (a, b) = UnixStream::pair().unwrap();
        let srv = std::thread::spawn(move || {
            let mut b = b;
            let mut h = [0u8; 16];
            b.read_exact(&mut h).unwrap();
            let (ty, id, _, len) = parse_header(&h).unwrap();
            let mut p = vec![0u8; len];
            b.read_exact(&mut p).unwrap();
            assert_eq!(ty, msg::READ);
            assert_eq!(p, b"/a\0");
            let send = |b: &mut UnixStream, ty: u32, id: u32, body: &[u8]| {
                let mut m = Vec::new();
                for w in [ty, id, 0, body.len() as u32] {
                    m.extend_from_slice(&w.to_ne_bytes());
                }
                m.extend_from_slice(body);
                b.write_all(&m).unwrap();
            };
            send(&mut b, msg::WATCH_EVENT, 0, b"/a/b\0tok\0");
            send(&mut b, msg::READ, id, b"value");
            b.read_exact(&mut h).unwrap();
            let (ty, id, _, len) = parse_header(&h).unwrap();
            let mut p = vec![0u8; len];
            b.read_exact(&mut p).unwrap();
            assert_eq!(ty, msg::READ);
            send(&mut b, msg::ERROR, id, b"ENOENT\0");
        });
        let mut xs = Xenstore {
            fd: a.into(),
            next_id: 1,
            events: VecDeque::new(),
        };
        assert_eq!(xs.read(Tx::NONE, "/a").unwrap().as_deref(), Some("value"));
        assert!(xs.has_events());
        assert_eq!(xs.read(Tx::NONE, "/missing").unwrap(), None);
        let ev = xs.next_event(Some(Duration::ZERO)).unwrap().unwrap();
        assert_eq!((ev.path.as_str(), ev.token.as_str()), ("/a/b", "tok"));
        srv.join().unwrap();
        // The fake xenstored is gone: the next wait reports it, it does not hang or panic.
        assert!(xs.next_event(Some(Duration::from_secs(5))).is_err());
    }
}
