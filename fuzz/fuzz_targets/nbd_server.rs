//! A hostile NBD client: a handshake (usually valid, so transmission is reached) followed by
//! requests with mostly valid headers and arbitrary fields and payloads, served against a
//! 1 MiB in-memory disk behind the connection's `Disk` interface. Never a panic; every outcome
//! is a reply or a closed connection.
#![no_main]
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::io::{self, BufReader, BufWriter, Cursor};
use std::os::fd::RawFd;
use std::sync::atomic::AtomicU64;
use tapdisk::nbd::proto::*;
use tapdisk::nbd::slots::Progress;
use tapdisk::nbd::{serve, Buf, Cmd, Completion, ConnCx, Counters, Disk, ExportInfo, Op};

const SIZE: u64 = 1 << 20;

/// A disk in memory that finishes every request inside `submit`.
struct MemDisk {
    data: Vec<u8>,
    bufs: Vec<Option<Vec<u8>>>,
    done: Vec<Completion>,
}

impl MemDisk {
    fn range(off: u64, len: u64) -> Result<std::ops::Range<usize>, u32> {
        match off.checked_add(len) {
            Some(end) if end <= SIZE => Ok(off as usize..end as usize),
            _ => Err(EINVAL),
        }
    }
}

impl Disk for MemDisk {
    fn alloc(&mut self, len: usize) -> Option<Buf> {
        let i = match self.bufs.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.bufs.push(None);
                self.bufs.len() - 1
            }
        };
        self.bufs[i] = Some(vec![0; len]);
        Some(Buf::new(i as u32, len))
    }
    fn data(&mut self, b: &Buf) -> &mut [u8] {
        self.bufs[b.id() as usize].as_mut().expect("live buffer")
    }
    fn free(&mut self, b: Buf) {
        self.bufs[b.id() as usize] = None;
    }
    fn submit(&mut self, mut op: Op) -> io::Result<()> {
        let r = Self::range(op.offset, op.len);
        let result = match (op.cmd, r) {
            (Cmd::Flush, _) => Ok(()),
            (_, Err(e)) => Err(e),
            (Cmd::Read, Ok(r)) => {
                let b = op.buf.as_ref().expect("a read has a buffer");
                let d = self.data[r].to_vec();
                self.data(b).copy_from_slice(&d);
                Ok(())
            }
            (Cmd::Write, Ok(r)) => {
                let b = op.buf.take().expect("a write has a buffer");
                let d = self.data(&b).to_vec();
                self.data[r].copy_from_slice(&d);
                self.free(b);
                Ok(())
            }
            (Cmd::Trim | Cmd::WriteZeroes, Ok(r)) => {
                self.data[r].fill(0);
                Ok(())
            }
        };
        self.done.push(Completion {
            cookie: op.cookie,
            cmd: op.cmd,
            result,
            buf: op.buf,
        });
        Ok(())
    }
    fn push(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn reap(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        out.append(&mut self.done);
        Ok(())
    }
    fn in_flight(&self) -> usize {
        self.done.len()
    }
    fn wait(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn wait_fd(&self) -> Option<RawFd> {
        None
    }
    fn arm(&mut self) -> bool {
        self.done.is_empty()
    }
    fn held(&self) -> u64 {
        self.bufs.iter().flatten().map(|b| b.len() as u64).sum()
    }
    fn release_idle(&mut self) {}
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
    let export = ExportInfo::new("tapdev0", SIZE, inp.read_only, true);
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let counters = Counters::default();
    let held = AtomicU64::new(0);
    let progress = Progress::new();
    let cx = ConnCx {
        export: &export,
        counters: &counters,
        held: &held,
        progress: &progress,
        log: &log,
    };
    let mut r = BufReader::new(Cursor::new(s));
    let mut w = BufWriter::new(io::sink());
    let disk = || -> io::Result<Box<dyn Disk>> {
        Ok(Box::new(MemDisk {
            data: vec![0; SIZE as usize],
            bufs: Vec::new(),
            done: Vec::new(),
        }))
    };
    let _ = serve(&mut r, &mut w, &cx, disk, |_| Ok(()));
});
