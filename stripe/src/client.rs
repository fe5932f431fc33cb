//! A client of the master: ONC RPC calls over TCP with at-least-once retries.
//!
//! A call whose connection fails (refused, reset, closed, timed out) is sent again on a new
//! connection with the same transaction id until [`MasterClient::retry_for`] has passed. Every
//! procedure of the master is idempotent (see [`crate::master`]), so a retried call cannot take
//! more than the first would have.

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::proto::{self, AllocArgs, Failure, ListRes, Placement, RegisterArgs};
use crate::rpc::{self, ReplyStatus};
use crate::xdr::{Dec, Enc, XdrError};
use crate::Error;

/// Largest reply record we read (a list of 65536 extents with long names fits).
const MAX_REPLY: usize = 64 << 20;

/// A connection to the master (made on first use, remade on failure).
#[derive(Debug)]
pub struct MasterClient {
    addr: String,
    conn: Option<TcpStream>,
    xid: u32,
    /// How long a call keeps retrying over failed connections.
    pub retry_for: Duration,
    /// Time limit of one attempt (connect, send, answer).
    pub attempt_timeout: Duration,
    /// Attempts made by the last call (1 = no retry).
    pub last_attempts: u32,
}

impl MasterClient {
    /// A client of the master at `addr` (`host[:port]`, port 20049 when not given).
    pub fn new(addr: &str) -> MasterClient {
        let addr = if addr
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            addr.to_owned()
        } else {
            format!("{addr}:{}", proto::DEFAULT_PORT)
        };
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
            ^ std::process::id().rotate_left(16);
        MasterClient {
            addr,
            conn: None,
            xid: seed,
            retry_for: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(10),
            last_attempts: 0,
        }
    }

    /// The master's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn attempt(&mut self, call: &[u8], xid: u32) -> io::Result<Vec<u8>> {
        if self.conn.is_none() {
            let sa = self
                .addr
                .to_socket_addrs()?
                .next()
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))?;
            let s = TcpStream::connect_timeout(&sa, self.attempt_timeout)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(self.attempt_timeout))?;
            s.set_write_timeout(Some(self.attempt_timeout))?;
            self.conn = Some(s);
        }
        let Some(s) = self.conn.as_mut() else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        rpc::write_record(s, call)?;
        loop {
            let rec = rpc::read_record(s, MAX_REPLY)?
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            // A reply to an earlier attempt of another call would have another xid: skip it.
            if rec.len() >= 4 && rec[..4] == xid.to_be_bytes() {
                return Ok(rec);
            }
        }
    }

    /// Calls `proc_` with XDR-encoded `args`; returns the reply record (status checked).
    fn call(&mut self, proc_: u32, args: &[u8]) -> Result<Vec<u8>, Error> {
        self.xid = self.xid.wrapping_add(1);
        let xid = self.xid;
        let mut e = Enc::new();
        rpc::encode_call(&mut e, xid, proto::PROG, proto::VERS, proc_);
        let mut call = e.into_bytes();
        call.extend_from_slice(args);
        let deadline = Instant::now() + self.retry_for;
        let mut wait = Duration::from_millis(20);
        self.last_attempts = 0;
        loop {
            self.last_attempts += 1;
            match self.attempt(&call, xid) {
                Ok(rec) => return Ok(rec),
                Err(e) => {
                    self.conn = None;
                    if Instant::now() + wait > deadline {
                        return Err(Error::Master(format!(
                            "master {}: {} (after {} attempts in {} s)",
                            self.addr,
                            describe_io(&e, self.attempt_timeout),
                            self.last_attempts,
                            self.retry_for.as_secs()
                        )));
                    }
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_millis(500));
                }
            }
        }
    }

    /// Calls `MASTER_NULL` once, without retrying: whether the master answers at all.
    pub fn reachable(&mut self) -> Result<(), Error> {
        let retry = std::mem::replace(&mut self.retry_for, Duration::ZERO);
        let r = self.ping();
        self.retry_for = retry;
        r
    }

    fn result<T>(
        &self,
        rec: &[u8],
        f: impl FnOnce(&mut Dec<'_>) -> Result<T, XdrError>,
    ) -> Result<T, Error> {
        let mut d = Dec::new(rec);
        let (_, st) = rpc::decode_reply(&mut d).map_err(Error::Xdr)?;
        if st != ReplyStatus::Success {
            return Err(Error::Master(format!("master {}: {st}", self.addr)));
        }
        let v = f(&mut d).map_err(Error::Xdr)?;
        d.finish().map_err(Error::Xdr)?;
        Ok(v)
    }

    fn failed(&self, f: Failure) -> Error {
        Error::Master(format!("master {}: {f}", self.addr))
    }

    /// `MASTER_NULL`: is it there?
    pub fn ping(&mut self) -> Result<(), Error> {
        let rec = self.call(proto::PROC_NULL, &[])?;
        self.result(&rec, |_| Ok(()))
    }

    /// `MASTER_REGISTER`: returns how many extents were new.
    pub fn register(&mut self, a: &RegisterArgs) -> Result<u32, Error> {
        let mut e = Enc::new();
        a.encode(&mut e);
        let rec = self.call(proto::PROC_REGISTER, e.bytes())?;
        self.result(&rec, proto::decode_register_res)?
            .map_err(|f| self.failed(f))
    }

    /// `MASTER_ALLOCATE`.
    pub fn allocate(&mut self, a: &AllocArgs) -> Result<Vec<Placement>, Error> {
        let mut e = Enc::new();
        a.encode(&mut e);
        let rec = self.call(proto::PROC_ALLOCATE, e.bytes())?;
        self.result(&rec, proto::decode_alloc_res)?
            .map_err(|f| self.failed(f))
    }

    /// `MASTER_RELEASE`: returns how many extents were freed.
    pub fn release(&mut self, disk: &str) -> Result<u32, Error> {
        let mut e = Enc::new();
        e.string(disk);
        let rec = self.call(proto::PROC_RELEASE, e.bytes())?;
        self.result(&rec, proto::decode_release_res)?
            .map_err(|f| self.failed(f))
    }

    /// `MASTER_LIST`.
    pub fn list(&mut self) -> Result<ListRes, Error> {
        let rec = self.call(proto::PROC_LIST, &[])?;
        self.result(&rec, proto::decode_list_res)
    }
}

/// An attempt's failure in words an operator reads (a read timeout is "no answer within 10 s",
/// not "Resource temporarily unavailable").
pub fn describe_io(e: &io::Error, attempt_timeout: Duration) -> String {
    let t = attempt_timeout.as_secs_f64();
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            format!("no answer within {t} s")
        }
        io::ErrorKind::ConnectionRefused => {
            "connection refused (is stripe-master running there?)".to_owned()
        }
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => {
            "the master closed the connection".to_owned()
        }
        io::ErrorKind::NotFound => "the address does not resolve".to_owned(),
        _ => {
            // The OS text without " (os error N)".
            let s = e.to_string();
            match s.find(" (os error") {
                Some(i) => s[..i].to_owned(),
                None => s,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_read_as_timeouts() {
        let t = Duration::from_secs(10);
        let e = io::Error::from_raw_os_error(libc::EAGAIN);
        assert_eq!(describe_io(&e, t), "no answer within 10 s");
        let e = io::Error::from(io::ErrorKind::TimedOut);
        assert_eq!(
            describe_io(&e, Duration::from_millis(500)),
            "no answer within 0.5 s"
        );
        let e = io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert!(describe_io(&e, t).starts_with("connection refused"));
        let e = io::Error::from_raw_os_error(libc::EHOSTUNREACH);
        assert!(
            !describe_io(&e, t).contains("os error"),
            "{}",
            describe_io(&e, t)
        );
    }

    #[test]
    fn an_unreachable_master_is_reported_in_words() {
        // A port nobody listens on: refused at once, retried for the time given, then named.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut c = MasterClient::new(&format!("127.0.0.1:{port}"));
        c.retry_for = Duration::from_millis(100);
        let e = c.ping().unwrap_err().to_string();
        assert!(e.contains("connection refused"), "{e}");
        assert!(!e.contains("os error"), "{e}");
        assert!(c.reachable().is_err());
    }
}
