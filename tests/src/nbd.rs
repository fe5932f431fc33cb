//! A small synchronous NBD client for tests that must know exactly which writes were
//! acknowledged (newstyle fixed handshake, `NBD_OPT_EXPORT_NAME`, simple replies, one request
//! at a time per connection).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const REPLY_MAGIC: u32 = 0x6744_6698;

/// One connection.
pub struct Nbd {
    s: UnixStream,
    handle: u64,
    /// Export size in bytes.
    pub size: u64,
}

impl Nbd {
    /// Connects to a unix socket export and negotiates.
    pub fn connect(sock: &Path) -> Result<Nbd> {
        let mut s =
            UnixStream::connect(sock).with_context(|| format!("connecting {}", sock.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut h = [0u8; 18];
        s.read_exact(&mut h)?;
        if &h[..8] != b"NBDMAGIC" || u64::from_be_bytes(h[8..16].try_into()?) != IHAVEOPT {
            bail!("not a newstyle NBD server");
        }
        // Fixed newstyle, no zeroes.
        s.write_all(&3u32.to_be_bytes())?;
        let mut o = Vec::new();
        o.extend_from_slice(&IHAVEOPT.to_be_bytes());
        o.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
        o.extend_from_slice(&0u32.to_be_bytes());
        s.write_all(&o)?;
        let mut r = [0u8; 10];
        s.read_exact(&mut r)?;
        let size = u64::from_be_bytes(r[..8].try_into()?);
        Ok(Nbd { s, handle: 0, size })
    }

    fn request(&mut self, ty: u16, off: u64, len: u32, data: &[u8]) -> Result<u32> {
        self.handle += 1;
        let mut q = Vec::with_capacity(28 + data.len());
        q.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        q.extend_from_slice(&0u16.to_be_bytes());
        q.extend_from_slice(&ty.to_be_bytes());
        q.extend_from_slice(&self.handle.to_be_bytes());
        q.extend_from_slice(&off.to_be_bytes());
        q.extend_from_slice(&len.to_be_bytes());
        q.extend_from_slice(data);
        self.s.write_all(&q)?;
        let mut r = [0u8; 16];
        self.s.read_exact(&mut r)?;
        if u32::from_be_bytes(r[..4].try_into()?) != REPLY_MAGIC
            || u64::from_be_bytes(r[8..16].try_into()?) != self.handle
        {
            bail!("bad NBD reply");
        }
        Ok(u32::from_be_bytes(r[4..8].try_into()?))
    }

    /// Writes `data` at `off`: Ok(true) acknowledged, Ok(false) answered with an error.
    pub fn write(&mut self, off: u64, data: &[u8]) -> Result<bool> {
        Ok(self.request(1, off, data.len() as u32, data)? == 0)
    }

    /// Reads `buf.len()` bytes at `off`.
    pub fn read(&mut self, off: u64, buf: &mut [u8]) -> Result<()> {
        let e = self.request(0, off, buf.len() as u32, &[])?;
        if e != 0 {
            bail!("NBD read at {off} failed with error {e}");
        }
        self.s.read_exact(buf)?;
        Ok(())
    }

    /// Flushes: Ok(true) acknowledged.
    pub fn flush(&mut self) -> Result<bool> {
        Ok(self.request(3, 0, 0, &[])? == 0)
    }
}
