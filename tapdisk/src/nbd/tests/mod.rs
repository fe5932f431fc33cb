//! Tests of the NBD server: the protocol driven byte by byte (including
//! malformed input), and interoperability with the real clients (qemu-io, qemu-img, nbdinfo,
//! nbdcopy). The interop tests fail, rather than skip, when a client is not installed.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::io;

use slog::{o, Logger};

use super::proto::*;
use super::*;
use crate::driver::{aio::AioImage, OpenOptionsImg};
use tapdisk_control::DirectIo;

pub(super) const EXPORT: &str = "tapdev7";
pub(super) const MIB: u64 = 1 << 20;

fn test_log() -> Logger {
    if std::env::var_os("TAPDISK_TEST_LOG").is_some() {
        crate::logging::logger(None, slog::Level::Debug).expect("logger")
    } else {
        Logger::root(slog::Discard, o!())
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    img: PathBuf,
    sock: PathBuf,
    server: Option<NbdServer>,
}

impl Fixture {
    fn new(size: u64, read_only: bool) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("disk.img");
        let f = std::fs::File::create(&img).expect("create image");
        f.set_len(size).expect("size image");
        let sock = dir.path().join("nbd.sock");
        let server = start_unix(&img, &sock, read_only);
        Fixture {
            _dir: dir,
            img,
            sock,
            server: Some(server),
        }
    }

    fn server(&self) -> &NbdServer {
        self.server.as_ref().expect("server running")
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }

    fn image(&self) -> Vec<u8> {
        std::fs::read(&self.img).expect("read image")
    }
}

/// The export of a VBD over the raw image `img`, as a VBD with an NBD export makes it.
fn export(img: &Path, read_only: bool) -> Arc<dyn Export> {
    let opts = OpenOptionsImg {
        read_only,
        direct: DirectIo::Off,
        ..Default::default()
    };
    let image = Arc::new(AioImage::open(img, opts).expect("open image"));
    crate::vbd::export::VbdExport::for_image(image, EXPORT, test_log())
}

fn start_unix(img: &Path, sock: &Path, read_only: bool) -> NbdServer {
    NbdServer::start(
        &NbdListen::Unix(sock.to_owned()),
        export(img, read_only),
        test_log(),
    )
    .expect("start server")
}

/// A hand-driven NBD client. Replies may come in any order (the server pipelines): a reply
/// read while waiting for another is kept until asked for.
struct Raw<S: Read + Write> {
    s: S,
    /// Bytes of data each read request in flight will be answered with.
    reads: std::collections::HashMap<u64, usize>,
    /// Replies read ahead: handle -> (error, data).
    early: std::collections::HashMap<u64, (u32, Vec<u8>)>,
    /// The data of the last reply returned.
    last: Vec<u8>,
}

impl<S: Read + Write> Raw<S> {
    fn new(s: S) -> Raw<S> {
        Raw {
            s,
            reads: Default::default(),
            early: Default::default(),
            last: Vec::new(),
        }
    }
}

impl Raw<UnixStream> {
    fn unix(path: &Path) -> Raw<UnixStream> {
        let s = UnixStream::connect(path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        Raw::new(s)
    }

    /// Connected, negotiated with `OPT_GO` on the default export; returns (client, size, flags).
    fn ready(path: &Path) -> (Raw<UnixStream>, u64, u16) {
        let mut c = Raw::unix(path);
        c.greeting();
        c.send_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        let (size, flags) = c.go(b"").expect("GO accepted");
        (c, size, flags)
    }
}

impl<S: Read + Write> Raw<S> {
    fn greeting(&mut self) -> u16 {
        let mut b = [0u8; 18];
        self.s.read_exact(&mut b).expect("greeting");
        assert_eq!(be64(&b[0..8]), NBDMAGIC);
        assert_eq!(be64(&b[8..16]), IHAVEOPT);
        let flags = be16(&b[16..18]);
        assert_eq!(flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        flags
    }

    fn send_flags(&mut self, f: u32) {
        self.s.write_all(&f.to_be_bytes()).expect("send flags");
    }

    fn send_opt(&mut self, opt: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m).expect("send option");
    }

    fn opt_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).expect("option reply");
        assert_eq!(be64(&h[0..8]), OPT_REPLY_MAGIC);
        let len = be32(&h[16..20]) as usize;
        assert!(len < 1 << 20, "option reply of {len} bytes");
        let mut d = vec![0u8; len];
        self.s.read_exact(&mut d).expect("option reply data");
        (be32(&h[8..12]), be32(&h[12..16]), d)
    }

    fn info_data(name: &[u8], items: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&(items.len() as u16).to_be_bytes());
        for i in items {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// Sends `opt` (INFO or GO) and collects the INFO items; `Err(reply)` on an error reply.
    fn info(&mut self, opt: u32, name: &[u8], items: &[u16]) -> Result<Vec<Vec<u8>>, u32> {
        self.send_opt(opt, &Self::info_data(name, items));
        let mut infos = Vec::new();
        loop {
            let (o, rep, d) = self.opt_reply();
            assert_eq!(o, opt);
            match rep {
                REP_INFO => infos.push(d),
                REP_ACK => return Ok(infos),
                e => return Err(e),
            }
        }
    }

    fn go(&mut self, name: &[u8]) -> Result<(u64, u16), u32> {
        let infos = self.info(OPT_GO, name, &[INFO_BLOCK_SIZE])?;
        let e = infos
            .iter()
            .find(|i| be16(i) == INFO_EXPORT)
            .expect("INFO_EXPORT");
        assert_eq!(e.len(), 12);
        let bs = infos
            .iter()
            .find(|i| be16(i) == INFO_BLOCK_SIZE)
            .expect("INFO_BLOCK_SIZE");
        assert_eq!(
            (be32(&bs[2..]), be32(&bs[6..]), be32(&bs[10..])),
            (1, 4096, 32 << 20)
        );
        Ok((be64(&e[2..10]), be16(&e[10..12])))
    }

    fn req(&mut self, cmd: u16, flags: u16, handle: u64, offset: u64, len: u32) {
        if cmd == CMD_READ {
            self.reads.insert(handle, len as usize);
        }
        let r = Request {
            flags,
            cmd,
            handle,
            offset,
            len,
        };
        self.s.write_all(&r.encode()).expect("send request");
    }

    fn write(&mut self, handle: u64, offset: u64, data: &[u8], flags: u16) {
        self.req(CMD_WRITE, flags, handle, offset, data.len() as u32);
        self.s.write_all(data).expect("send payload");
    }

    /// The reply to `handle` (reading, and keeping, the replies to others on the way);
    /// returns its error. A successful read's data is then [`Raw::data`].
    fn reply(&mut self, handle: u64) -> u32 {
        loop {
            if let Some((err, data)) = self.early.remove(&handle) {
                self.last = data;
                return err;
            }
            let mut b = [0u8; 16];
            self.s.read_exact(&mut b).expect("reply");
            assert_eq!(be32(&b[0..4]), SIMPLE_REPLY_MAGIC);
            let (err, h) = (be32(&b[4..8]), be64(&b[8..16]));
            let n = self.reads.remove(&h).unwrap_or(0);
            let mut data = vec![0u8; if err == 0 { n } else { 0 }];
            self.s.read_exact(&mut data).expect("read data");
            assert!(
                self.early.insert(h, (err, data)).is_none(),
                "two replies to handle {h}"
            );
        }
    }

    /// The next `n` bytes the server sends.
    fn raw(&mut self, n: usize) -> Vec<u8> {
        let mut d = vec![0u8; n];
        self.s.read_exact(&mut d).expect("read bytes");
        d
    }

    /// The data of the last successful read reply ([`Raw::reply`]), `n` bytes long.
    fn data(&mut self, n: usize) -> Vec<u8> {
        let d = std::mem::take(&mut self.last);
        assert_eq!(d.len(), n, "read data length");
        d
    }

    fn read(&mut self, handle: u64, offset: u64, len: u32) -> Vec<u8> {
        self.req(CMD_READ, 0, handle, offset, len);
        assert_eq!(self.reply(handle), 0, "read {offset}+{len}");
        self.data(len as usize)
    }

    /// The server hung up: EOF (or a reset) with no further bytes.
    fn assert_closed(&mut self) {
        let mut b = [0u8; 64];
        match self.s.read(&mut b) {
            Ok(0) => {}
            Ok(n) => panic!("expected a closed connection, got {n} bytes: {:?}", &b[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("expected a closed connection, got {e}"),
        }
    }

    fn disconnect(mut self) {
        self.req(CMD_DISC, 0, 0, 0, 0);
        self.assert_closed();
    }
}

/// A new client still gets served.
fn assert_alive(sock: &Path) {
    let (mut c, size, _) = Raw::ready(sock);
    assert!(size >= 512);
    c.read(99, 0, 512);
    c.disconnect();
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

mod clients;
mod protocol;
mod server;
mod slots;
