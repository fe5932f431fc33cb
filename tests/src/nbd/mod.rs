//! A minimal NBD client that speaks the protocol byte by byte over a unix socket, for tests
//! that need clients that misbehave on purpose, or one well-behaved client timed exactly.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub use tapdisk::nbd::proto::{
    CMD_DISC, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, IHAVEOPT, NBDMAGIC, OPT_EXPORT_NAME,
    OPT_INFO, OPT_LIST, OPT_REPLY_MAGIC as REPLY_MAGIC, REP_ACK,
};
use tapdisk::nbd::proto::{
    FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
};
/// Client flags: fixed newstyle, no zeroes.
pub const CLIENT_FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

mod pipelined;
pub use pipelined::{NbdClient, Reply};

/// The 28 bytes of a request (no flags).
fn request_header(cmd: u16, handle: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut m = [0u8; 28];
    m[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    m[6..8].copy_from_slice(&cmd.to_be_bytes());
    m[8..16].copy_from_slice(&handle.to_be_bytes());
    m[16..24].copy_from_slice(&offset.to_be_bytes());
    m[24..28].copy_from_slice(&len.to_be_bytes());
    m
}

/// An NBD client on a unix socket.
pub struct Client {
    /// The socket.
    pub s: UnixStream,
    /// The export's size, once in transmission.
    pub size: u64,
}

impl Client {
    /// Connects, without saying anything yet; reads and writes time out after `timeout`.
    pub fn raw(path: &Path, timeout: Duration) -> io::Result<Client> {
        let s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        Ok(Client { s, size: 0 })
    }

    /// Connects and enters transmission (`OPT_EXPORT_NAME` of the default export).
    pub fn connect(path: &Path, timeout: Duration) -> io::Result<Client> {
        let mut c = Client::raw(path, timeout)?;
        c.greeting()?;
        c.s.write_all(&CLIENT_FLAGS.to_be_bytes())?;
        c.option(OPT_EXPORT_NAME, b"")?;
        let mut b = [0u8; 10];
        c.s.read_exact(&mut b)?;
        c.size = u64::from_be_bytes(b[..8].try_into().unwrap_or_default());
        Ok(c)
    }

    /// Reads the server's greeting; an error if it is not one.
    pub fn greeting(&mut self) -> io::Result<()> {
        let mut g = [0u8; 18];
        self.s.read_exact(&mut g)?;
        if g[..8] != NBDMAGIC.to_be_bytes() || g[8..16] != IHAVEOPT.to_be_bytes() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not an NBD greeting",
            ));
        }
        Ok(())
    }

    /// Sends option `opt` with `data`.
    pub fn option(&mut self, opt: u32, data: &[u8]) -> io::Result<()> {
        let mut m = Vec::with_capacity(16 + data.len());
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m)
    }

    /// Reads option replies up to and including the final one; returns its type.
    pub fn option_replies(&mut self) -> io::Result<u32> {
        loop {
            let mut h = [0u8; 20];
            self.s.read_exact(&mut h)?;
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap_or_default());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap_or_default());
            let mut skip = vec![0u8; len as usize];
            self.s.read_exact(&mut skip)?;
            // NBD_REP_SERVER (2) and NBD_REP_INFO (3) come before the final reply.
            if kind != 2 && kind != 3 {
                return Ok(kind);
            }
        }
    }

    /// Sends a request.
    pub fn request(&mut self, cmd: u16, handle: u64, offset: u64, len: u32) -> io::Result<()> {
        self.s.write_all(&request_header(cmd, handle, offset, len))
    }

    /// Sends a write of `data` at `offset` (the reply is read with [`Client::reply`]).
    pub fn send_write(&mut self, handle: u64, offset: u64, data: &[u8]) -> io::Result<()> {
        self.request(CMD_WRITE, handle, offset, data.len() as u32)?;
        self.s.write_all(data)
    }

    /// Reads one simple reply: `(error, handle)`.
    pub fn reply(&mut self) -> io::Result<(u32, u64)> {
        let mut r = [0u8; 16];
        self.s.read_exact(&mut r)?;
        if r[..4] != SIMPLE_REPLY_MAGIC.to_be_bytes() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad reply magic",
            ));
        }
        Ok((
            u32::from_be_bytes(r[4..8].try_into().unwrap_or_default()),
            u64::from_be_bytes(r[8..16].try_into().unwrap_or_default()),
        ))
    }

    /// Writes `data` at `offset` and waits for the answer; an error unless it succeeded.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.send_write(1, offset, data)?;
        match self.reply()? {
            (0, 1) => Ok(()),
            (e, h) => Err(io::Error::other(format!("write: error {e} (handle {h})"))),
        }
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        self.request(CMD_READ, 2, offset, len)?;
        match self.reply()? {
            (0, 2) => {
                let mut b = vec![0u8; len as usize];
                self.s.read_exact(&mut b)?;
                Ok(b)
            }
            (e, h) => Err(io::Error::other(format!("read: error {e} (handle {h})"))),
        }
    }

    /// Writes `data` at `offset`: `Ok(true)` acknowledged, `Ok(false)` answered with an error
    /// (for tests that must know exactly which writes were acknowledged).
    pub fn write_acked(&mut self, offset: u64, data: &[u8]) -> io::Result<bool> {
        self.send_write(4, offset, data)?;
        Ok(self.reply()?.0 == 0)
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`.
    pub fn read_into(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let b = self.read(offset, buf.len() as u32)?;
        buf.copy_from_slice(&b);
        Ok(())
    }

    /// Flushes: `Ok(true)` acknowledged, `Ok(false)` answered with an error.
    pub fn flush(&mut self) -> io::Result<bool> {
        self.request(CMD_FLUSH, 5, 0, 0)?;
        Ok(self.reply()?.0 == 0)
    }

    /// Says goodbye (`NBD_CMD_DISC`).
    pub fn disconnect(mut self) -> io::Result<()> {
        self.request(CMD_DISC, 3, 0, 0)
    }
}
