//! A hostile NBD client: a handshake (usually valid, so transmission is reached) followed by
//! requests with mostly valid headers and arbitrary fields and payloads, served against a
//! 1 MiB in-memory disk. Never a panic; every outcome is a reply or a closed connection.
#![no_main]
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::io::{self, BufReader, BufWriter, Cursor};
use std::sync::Mutex;
use tapdisk::image::BlockTarget;
use tapdisk::nbd::conn::{serve, ExportInfo};
use tapdisk::nbd::proto::*;

const SIZE: u64 = 1 << 20;

struct Mem(Mutex<Vec<u8>>, bool);

impl Mem {
    fn range(&self, off: u64, len: u64) -> io::Result<std::ops::Range<usize>> {
        match off.checked_add(len) {
            Some(end) if end <= SIZE => Ok(off as usize..end as usize),
            _ => Err(io::Error::new(io::ErrorKind::InvalidInput, "out of range")),
        }
    }
}

impl BlockTarget for Mem {
    fn size(&self) -> u64 {
        SIZE
    }
    fn read_only(&self) -> bool {
        self.1
    }
    fn supports_discard(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let r = self.range(off, buf.len() as u64)?;
        buf.copy_from_slice(&self.0.lock().unwrap()[r]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64, _fua: bool) -> io::Result<()> {
        let r = self.range(off, buf.len() as u64)?;
        self.0.lock().unwrap()[r].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        let r = self.range(off, len)?;
        self.0.lock().unwrap()[r].fill(0);
        Ok(())
    }
    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        self.discard(off, len)
    }
}

#[derive(Arbitrary, Debug)]
struct Req {
    bad_magic: bool,
    flags: u16,
    cmd: u8,
    handle: u64,
    offset: u32,
    len: u32,
    payload: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    read_only: bool,
    client_flags: u32,
    /// Options before GO: (option code, data).
    options: Vec<(u8, Vec<u8>)>,
    go_name: Vec<u8>,
    skip_go: bool,
    requests: Vec<Req>,
    tail: Vec<u8>,
}

fuzz_target!(|inp: Input| {
    let mut s = Vec::new();
    s.extend_from_slice(&(inp.client_flags | FLAG_C_FIXED_NEWSTYLE).to_be_bytes());
    for (code, data) in inp.options.iter().take(8) {
        s.extend_from_slice(&IHAVEOPT.to_be_bytes());
        s.extend_from_slice(&u32::from(*code % 16).to_be_bytes());
        s.extend_from_slice(&(data.len() as u32).to_be_bytes());
        s.extend_from_slice(data);
    }
    if !inp.skip_go {
        let name = &inp.go_name
            [..inp.go_name.len().min(16) * usize::from(inp.go_name.first() == Some(&b'x'))];
        s.extend_from_slice(&IHAVEOPT.to_be_bytes());
        s.extend_from_slice(&OPT_GO.to_be_bytes());
        s.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
        s.extend_from_slice(&(name.len() as u32).to_be_bytes());
        s.extend_from_slice(name);
        s.extend_from_slice(&0u16.to_be_bytes());
    }
    for r in inp.requests.iter().take(32) {
        let magic = if r.bad_magic {
            0xdead_beef
        } else {
            REQUEST_MAGIC
        };
        s.extend_from_slice(&magic.to_be_bytes());
        s.extend_from_slice(&r.flags.to_be_bytes());
        s.extend_from_slice(&u16::from(r.cmd % 8).to_be_bytes());
        s.extend_from_slice(&r.handle.to_be_bytes());
        s.extend_from_slice(&u64::from(r.offset % (2 * SIZE as u32)).to_be_bytes());
        let len = r.len % (1 << 21);
        s.extend_from_slice(&len.to_be_bytes());
        if r.cmd % 8 == CMD_WRITE as u8 {
            let n = (len as usize).min(r.payload.len());
            s.extend_from_slice(&r.payload[..n]);
        }
    }
    s.extend_from_slice(&inp.tail);
    let target = Mem(Mutex::new(vec![0; SIZE as usize]), inp.read_only);
    let export = ExportInfo::new("tapdev0", &target);
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let mut r = BufReader::new(Cursor::new(s));
    let mut w = BufWriter::new(io::sink());
    let _ = serve(&mut r, &mut w, &export, &target, &log);
});
