//! Tests of the NBD server: the protocol driven byte by byte (including
//! malformed input), and interoperability with the real clients (qemu-io, qemu-img, nbdinfo,
//! nbdcopy). The interop tests fail, rather than skip, when a client is not installed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::io;
use std::net::Shutdown;

use slog::{o, Logger};

use super::proto::*;
use super::*;
use crate::driver::{aio::AioImage, OpenOptionsImg};
use tapdisk_control::DirectIo;

const EXPORT: &str = "tapdev7";
const MIB: u64 = 1 << 20;

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

#[test]
fn handshake_options() {
    let fx = Fixture::new(MIB, false);
    let mut c = Raw::unix(&fx.sock);
    c.greeting();
    c.send_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);

    c.send_opt(OPT_LIST, &[]);
    let (o, rep, d) = c.opt_reply();
    assert_eq!((o, rep), (OPT_LIST, REP_SERVER));
    assert_eq!(be32(&d) as usize, EXPORT.len());
    assert_eq!(&d[4..], EXPORT.as_bytes());
    assert_eq!(c.opt_reply().1, REP_ACK);
    c.send_opt(OPT_LIST, b"junk");
    assert_eq!(c.opt_reply().1, REP_ERR_INVALID);

    for opt in [
        OPT_STARTTLS,
        OPT_STRUCTURED_REPLY,
        OPT_SET_META_CONTEXT,
        OPT_LIST_META_CONTEXT,
        4242,
    ] {
        c.send_opt(opt, &[1, 2, 3]);
        let (o, rep, _) = c.opt_reply();
        assert_eq!((o, rep), (opt, REP_ERR_UNSUP), "option {opt}");
    }

    assert_eq!(c.info(OPT_INFO, b"nope", &[]), Err(REP_ERR_UNKNOWN));
    assert_eq!(c.info(OPT_GO, b"nope", &[]), Err(REP_ERR_UNKNOWN));
    // Malformed: name length beyond the data, odd item list.
    c.send_opt(OPT_INFO, &[0, 0, 0, 200, b'a']);
    assert_eq!(c.opt_reply().1, REP_ERR_INVALID);
    let mut bad = Raw::<UnixStream>::info_data(b"", &[1, 2]);
    bad.push(0);
    c.send_opt(OPT_GO, &bad);
    assert_eq!(c.opt_reply().1, REP_ERR_INVALID);

    let infos = c
        .info(OPT_INFO, EXPORT.as_bytes(), &[INFO_NAME, INFO_DESCRIPTION])
        .unwrap();
    let name = infos
        .iter()
        .find(|i| be16(i) == INFO_NAME)
        .expect("INFO_NAME");
    assert_eq!(&name[2..], EXPORT.as_bytes());
    assert!(infos.iter().any(|i| be16(i) == INFO_DESCRIPTION));
    let (size, flags) = c.go(EXPORT.as_bytes()).unwrap();
    assert_eq!(size, MIB);
    let want = TF_HAS_FLAGS
        | TF_SEND_FLUSH
        | TF_SEND_FUA
        | TF_SEND_TRIM
        | TF_SEND_WRITE_ZEROES
        | TF_CAN_MULTI_CONN;
    assert_eq!(flags, want);
    c.write(1, 4096, &[0xab; 512], 0);
    assert_eq!(c.reply(1), 0);
    assert_eq!(c.read(2, 4096, 512), vec![0xab; 512]);
    c.disconnect();

    // Soft disconnect during the handshake.
    let mut c = Raw::unix(&fx.sock);
    c.greeting();
    c.send_flags(FLAG_C_FIXED_NEWSTYLE);
    c.send_opt(OPT_ABORT, &[]);
    assert_eq!(c.opt_reply(), (OPT_ABORT, REP_ACK, vec![]));
    c.assert_closed();
    assert_alive(&fx.sock);
}

#[test]
fn export_name_option() {
    let fx = Fixture::new(2 * MIB, false);
    // With NO_ZEROES: size and flags only.
    let mut c = Raw::unix(&fx.sock);
    c.greeting();
    c.send_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    c.send_opt(OPT_EXPORT_NAME, EXPORT.as_bytes());
    let d = c.raw(10);
    assert_eq!(be64(&d), 2 * MIB);
    assert_ne!(be16(&d[8..]) & TF_HAS_FLAGS, 0);
    assert_eq!(c.read(1, 0, 4096), vec![0; 4096]);
    c.disconnect();
    // Without: 124 zero bytes follow.
    let mut c = Raw::unix(&fx.sock);
    c.greeting();
    c.send_flags(FLAG_C_FIXED_NEWSTYLE);
    c.send_opt(OPT_EXPORT_NAME, b"");
    let d = c.raw(10 + 124);
    assert_eq!(be64(&d), 2 * MIB);
    assert!(d[10..].iter().all(|&b| b == 0));
    c.read(1, 0, 512);
    c.disconnect();
    // Unknown name: the server must hang up.
    let mut c = Raw::unix(&fx.sock);
    c.greeting();
    c.send_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    c.send_opt(OPT_EXPORT_NAME, b"other");
    c.assert_closed();
    assert_alive(&fx.sock);
}

#[test]
fn malformed_handshakes_close_cleanly() {
    let fx = Fixture::new(MIB, false);
    let fresh = || {
        let mut c = Raw::unix(&fx.sock);
        c.greeting();
        c
    };
    // Unknown client flags.
    let mut c = fresh();
    c.send_flags(FLAG_C_FIXED_NEWSTYLE | 0x100);
    c.assert_closed();
    assert_alive(&fx.sock);
    // Not fixed newstyle.
    let mut c = fresh();
    c.send_flags(0);
    c.assert_closed();
    assert_alive(&fx.sock);
    // Bad option magic.
    let mut c = fresh();
    c.send_flags(FLAG_C_FIXED_NEWSTYLE);
    c.s.write_all(&[0xde; 16]).unwrap();
    c.assert_closed();
    assert_alive(&fx.sock);
    // Absurd option length: TOO_BIG, then the server hangs up without reading the data.
    let mut c = fresh();
    c.send_flags(FLAG_C_FIXED_NEWSTYLE);
    let mut h = IHAVEOPT.to_be_bytes().to_vec();
    h.extend_from_slice(&OPT_GO.to_be_bytes());
    h.extend_from_slice(&0xffff_fff0u32.to_be_bytes());
    c.s.write_all(&h).unwrap();
    let (o, rep, msg) = c.opt_reply();
    assert_eq!((o, rep), (OPT_GO, REP_ERR_TOO_BIG));
    assert!(String::from_utf8_lossy(&msg).contains("limit"));
    c.assert_closed();
    assert_alive(&fx.sock);
    // The same for OPT_EXPORT_NAME, which has no error reply.
    let mut c = fresh();
    c.send_flags(FLAG_C_FIXED_NEWSTYLE);
    let mut h = IHAVEOPT.to_be_bytes().to_vec();
    h.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    h.extend_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
    c.s.write_all(&h).unwrap();
    c.assert_closed();
    assert_alive(&fx.sock);
    // Truncated option data, then EOF.
    let mut c = fresh();
    c.send_flags(FLAG_C_FIXED_NEWSTYLE);
    let mut h = IHAVEOPT.to_be_bytes().to_vec();
    h.extend_from_slice(&OPT_GO.to_be_bytes());
    h.extend_from_slice(&100u32.to_be_bytes());
    h.extend_from_slice(&[0; 10]);
    c.s.write_all(&h).unwrap();
    c.s.shutdown(Shutdown::Write).unwrap();
    c.assert_closed();
    // Truncated client flags, truncated option header, and a client that just leaves.
    let mut c = fresh();
    c.s.write_all(&[0, 0]).unwrap();
    c.s.shutdown(Shutdown::Write).unwrap();
    c.assert_closed();
    let mut c = fresh();
    c.send_flags(FLAG_C_FIXED_NEWSTYLE);
    c.s.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
    c.s.shutdown(Shutdown::Write).unwrap();
    c.assert_closed();
    drop(UnixStream::connect(&fx.sock).unwrap());
    assert_alive(&fx.sock);
    wait_for("connections to end", || fx.server().connections() == 0);
}

#[test]
fn transmission_errors() {
    let fx = Fixture::new(MIB, false);
    let (mut c, size, _) = Raw::ready(&fx.sock);
    assert_eq!(size, MIB);
    // Unknown command: EINVAL (the protocol says so), and the connection goes on.
    c.req(42, 0, 1, 0, 512);
    assert_eq!(c.reply(1), EINVAL);
    c.req(7, 0, 2, 0, 512); // BLOCK_STATUS without negotiation
    assert_eq!(c.reply(2), EINVAL);
    // Out-of-range read, overflowing offset, zero length, unknown flag, oversize read.
    c.req(CMD_READ, 0, 3, MIB - 512, 1024);
    assert_eq!(c.reply(3), EINVAL);
    c.req(CMD_READ, 0, 4, u64::MAX - 100, 512);
    assert_eq!(c.reply(4), EINVAL);
    c.req(CMD_READ, 0, 5, 0, 0);
    assert_eq!(c.reply(5), EINVAL);
    c.req(CMD_READ, 1 << 2, 6, 0, 512);
    assert_eq!(c.reply(6), EINVAL);
    c.req(CMD_READ, 0, 7, 0, MAX_PAYLOAD + 1);
    assert_eq!(c.reply(7), EINVAL);
    // Writes past the end: ENOSPC, payload consumed.
    c.write(8, MIB - 512, &[1; 1024], 0);
    assert_eq!(c.reply(8), ENOSPC);
    c.req(CMD_WRITE_ZEROES, 0, 9, MIB, 512);
    assert_eq!(c.reply(9), ENOSPC);
    c.req(CMD_TRIM, 0, 10, MIB, 512);
    assert_eq!(c.reply(10), EINVAL);
    // Write with an unknown flag: EINVAL, payload consumed, nothing written.
    c.write(11, 0, &[2; 512], 1 << 4);
    assert_eq!(c.reply(11), EINVAL);
    c.req(CMD_FLUSH, 1 << 3, 12, 0, 0);
    assert_eq!(c.reply(12), EINVAL);
    // FUA on a read is ignored (clients are known to send it).
    c.req(CMD_READ, CMD_FLAG_FUA, 13, 0, 512);
    assert_eq!(c.reply(13), 0);
    assert_eq!(c.data(512), vec![0; 512]);
    // Oversize write: EINVAL, then the server hangs up.
    c.req(CMD_WRITE, 0, 14, 0, MAX_PAYLOAD + 512);
    assert_eq!(c.reply(14), EINVAL);
    c.assert_closed();
    assert!(fx.image().iter().all(|&b| b == 0));
    assert_alive(&fx.sock);

    // Bad request magic.
    let (mut c, _, _) = Raw::ready(&fx.sock);
    c.s.write_all(&[0x55; REQUEST_LEN]).unwrap();
    c.assert_closed();
    // Truncated header.
    let (mut c, _, _) = Raw::ready(&fx.sock);
    c.s.write_all(
        &Request {
            flags: 0,
            cmd: 0,
            handle: 1,
            offset: 0,
            len: 512,
        }
        .encode()[..20],
    )
    .unwrap();
    c.s.shutdown(Shutdown::Write).unwrap();
    c.assert_closed();
    // Truncated write payload.
    let (mut c, _, _) = Raw::ready(&fx.sock);
    c.req(CMD_WRITE, 0, 1, 0, 4096);
    c.s.write_all(&[3; 100]).unwrap();
    c.s.shutdown(Shutdown::Write).unwrap();
    c.assert_closed();
    // A client that closes without CMD_DISC.
    let (c, _, _) = Raw::ready(&fx.sock);
    drop(c);
    assert_alive(&fx.sock);
    assert!(fx.image().iter().all(|&b| b == 0));
}

#[test]
fn read_only_export() {
    let fx = Fixture::new(MIB, true);
    std::fs::write(&fx.img, vec![0x11u8; MIB as usize]).unwrap();
    let (mut c, _, flags) = Raw::ready(&fx.sock);
    assert_ne!(flags & TF_READ_ONLY, 0);
    c.write(1, 0, &[9; 4096], 0);
    assert_eq!(c.reply(1), EPERM);
    c.req(CMD_TRIM, 0, 2, 0, 4096);
    assert_eq!(c.reply(2), EPERM);
    c.req(CMD_WRITE_ZEROES, 0, 3, 0, 4096);
    assert_eq!(c.reply(3), EPERM);
    assert_eq!(c.read(4, 0, 4096), vec![0x11; 4096]);
    c.req(CMD_FLUSH, 0, 5, 0, 0);
    assert_eq!(c.reply(5), 0);
    c.disconnect();
    assert!(fx.image().iter().all(|&b| b == 0x11));
}

#[test]
fn pipelined_requests() {
    let fx = Fixture::new(4 * MIB, false);
    let (mut c, _, _) = Raw::ready(&fx.sock);
    // Everything sent before any reply is read.
    let big: Vec<u8> = (0..(2 * MIB) as usize).map(|i| (i % 251) as u8).collect();
    c.write(1, 0, &big, 0);
    c.write(2, 2 * MIB, &[0x77; 8192], CMD_FLAG_FUA);
    c.req(CMD_READ, 0, 3, 2 * MIB, 8192);
    c.req(CMD_TRIM, CMD_FLAG_FUA, 4, 2 * MIB, 4096);
    c.req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 5, 0, 4096);
    c.req(CMD_FLUSH, 0, 6, 0, 0);
    c.req(CMD_READ, 0, 7, 0, 8192);
    assert_eq!(c.reply(1), 0);
    assert_eq!(c.reply(2), 0);
    assert_eq!(c.reply(3), 0);
    assert_eq!(c.data(8192), vec![0x77; 8192]);
    assert_eq!(c.reply(4), 0);
    assert_eq!(c.reply(5), 0);
    assert_eq!(c.reply(6), 0);
    assert_eq!(c.reply(7), 0);
    let d = c.data(8192);
    assert_eq!(&d[..4096], &[0; 4096][..]);
    assert_eq!(&d[4096..], &big[4096..8192]);
    c.disconnect();
    let img = fx.image();
    assert_eq!(&img[..4096], &[0; 4096][..]);
    assert_eq!(&img[4096..2 * MIB as usize], &big[4096..]);
    assert_eq!(
        &img[(2 * MIB) as usize..(2 * MIB + 4096) as usize],
        &[0; 4096][..]
    );
    assert_eq!(
        &img[(2 * MIB + 4096) as usize..(2 * MIB + 8192) as usize],
        &[0x77; 4096][..]
    );
}

#[test]
fn shutdown_disconnects_clients_and_removes_socket() {
    let mut fx = Fixture::new(MIB, false);
    let mut idle = Raw::unix(&fx.sock); // stuck in the handshake
    idle.greeting();
    let (mut busy, _, _) = Raw::ready(&fx.sock);
    busy.read(1, 0, 512);
    wait_for("2 connections", || fx.server().connections() == 2);
    let server = fx.server.take().unwrap();
    let t = Instant::now();
    server.shutdown();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        t.elapsed()
    );
    assert!(!fx.sock.exists(), "socket left behind");
    idle.assert_closed();
    busy.assert_closed();

    // Dropping a server shuts it down too.
    let server = start_unix(&fx.img, &fx.sock, false);
    let (mut c, _, _) = Raw::ready(&fx.sock);
    drop(server);
    c.assert_closed();
    assert!(!fx.sock.exists());
}

#[test]
fn unix_socket_path_handling() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(MIB).unwrap();
    // A stale socket (its listener is gone) is replaced.
    let sock = dir.path().join("stale.sock");
    drop(UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let server = start_unix(&img, &sock, false);
    assert_eq!(server.local_addr(), NbdListen::Unix(sock.clone()));
    assert_alive(&sock);
    // A live socket is not stolen.
    let target = export(&img, false);
    let e =
        NbdServer::start(&NbdListen::Unix(sock.clone()), target.clone(), test_log()).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
    assert_alive(&sock);
    server.shutdown();
    // A regular file is an error and stays as it was.
    let file = dir.path().join("file");
    std::fs::write(&file, b"keep me").unwrap();
    let e =
        NbdServer::start(&NbdListen::Unix(file.clone()), target.clone(), test_log()).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
    assert!(e.to_string().contains("not a socket"));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    // A missing directory is an error naming the path.
    let e = NbdServer::start(
        &NbdListen::Unix(dir.path().join("no/such/dir.sock")),
        target,
        test_log(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("no/such/dir.sock"), "{e}");
}

#[test]
fn tcp_port_zero_and_connection_count() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(MIB).unwrap();
    let listen: NbdListen = "tcp:127.0.0.1:0".parse().unwrap();
    let server = NbdServer::start(&listen, export(&img, false), test_log()).unwrap();
    let NbdListen::Tcp(addr) = server.local_addr() else {
        panic!("not tcp")
    };
    assert_ne!(addr.port(), 0);
    assert!(addr.ip().is_loopback());
    assert_eq!(
        server.local_addr().to_string(),
        format!("tcp:127.0.0.1:{}", addr.port())
    );
    let mut clients = Vec::new();
    for i in 0..3u8 {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = Raw::new(s);
        c.greeting();
        c.send_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        assert_eq!(c.go(EXPORT.as_bytes()).unwrap().0, MIB);
        c.write(1, u64::from(i) * 4096, &[i + 1; 4096], 0);
        assert_eq!(c.reply(1), 0);
        clients.push(c);
    }
    wait_for("3 connections", || server.connections() == 3);
    for (i, mut c) in clients.into_iter().enumerate() {
        assert_eq!(c.read(2, i as u64 * 4096, 4096), vec![i as u8 + 1; 4096]);
        c.disconnect();
    }
    wait_for("0 connections", || server.connections() == 0);
    server.shutdown();
    assert!(
        TcpStream::connect(addr).is_err(),
        "still listening after shutdown"
    );
}

#[test]
fn the_connection_limit_and_the_handshake_timeout_keep_idle_clients_from_locking_others_out() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let sock = dir.path().join("nbd.sock");
    std::fs::File::create(&img).unwrap().set_len(MIB).unwrap();
    let server = start_unix(&img, &sock, false);
    // MAX_CONNECTIONS clients connect and say nothing.
    let idle: Vec<UnixStream> = (0..MAX_CONNECTIONS)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    wait_for("all idle clients counted", || {
        server.connections() == MAX_CONNECTIONS
    });
    // One more is closed at once: it reads EOF, not the greeting.
    let mut extra = UnixStream::connect(&sock).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut b = [0u8; 8];
    assert_eq!(
        extra.read(&mut b).unwrap(),
        0,
        "a client past the limit was served"
    );
    // The idle ones are dropped when the handshake timeout passes; then clients are served.
    let t = Instant::now();
    wait_for("idle clients dropped", || server.connections() == 0);
    assert!(
        t.elapsed() >= HANDSHAKE_TIMEOUT - Duration::from_millis(500),
        "dropped after {:?}, before the timeout",
        t.elapsed()
    );
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // The greeting was sent, then the connection closed.
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        assert_eq!(all.len(), 18, "greeting then EOF");
    }
    assert_alive(&sock);
    // A client that takes its time in transmission (after the handshake) is not dropped.
    let (mut c, _, _) = Raw::ready(&sock);
    std::thread::sleep(HANDSHAKE_TIMEOUT + Duration::from_millis(500));
    assert_eq!(c.read(5, 0, 512), vec![0u8; 512]);
    c.disconnect();
    server.shutdown();
}

#[test]
fn idle_clients_give_their_large_buffers_back() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let sock = dir.path().join("nbd.sock");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let server = start_unix(&img, &sock, false);
    let (mut a, _, _) = Raw::ready(&sock);
    let (mut b, _, _) = Raw::ready(&sock);
    let data: Vec<u8> = (0..8 * MIB as usize).map(|i| (i / 4099) as u8).collect();
    a.write(1, 0, &data, 0);
    assert_eq!(a.reply(1), 0);
    assert_eq!(b.read(2, 0, 4 << 20), data[..4 << 20]);
    // Both now hold a buffer of their largest request, until they have been idle a while.
    assert!(server.buffered() >= 12 * MIB, "{}", server.buffered());
    wait_for("idle buffers released", || server.buffered() == 0);
    // Small requests keep a small buffer even when idle; large ones come back as needed.
    assert_eq!(a.read(3, 4096, 4096), data[4096..8192]);
    std::thread::sleep(IDLE_RELEASE * 3);
    assert_eq!(server.buffered(), 4096);
    assert_eq!(
        b.read(4, MIB, 2 << 20),
        data[MIB as usize..3 * MIB as usize]
    );
    // A client that stalls inside a request (half a payload) is waited for, not dropped.
    a.req(CMD_WRITE, 0, 5, 0, 8192);
    a.s.write_all(&data[..4096]).unwrap();
    std::thread::sleep(IDLE_RELEASE * 3);
    a.s.write_all(&data[4096..8192]).unwrap();
    assert_eq!(a.reply(5), 0);
    a.disconnect();
    b.disconnect();
    wait_for("buffers freed at disconnect", || server.buffered() == 0);
    server.shutdown();
}

// ---- Real clients -------------------------------------------------------------------------

/// The path of `name`, or a failure saying what to install.
fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not installed but the NBD interoperability tests need it \
                 (Debian/Ubuntu: apt-get install qemu-utils libnbd-bin)"
            )
        })
}

/// Runs `cmd` with a deadline; returns stdout, failing the test with stderr on an error.
fn run(mut cmd: Command) -> String {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let t = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if t.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} timed out");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stdout.into_owned()
}

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new(tool("qemu-io"));
    c.args(["-f", "raw", uri]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let out = run(c);
    // Older qemu-io exits 0 when a command fails; look at what it printed too.
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io said:\n{out}"
    );
    out
}

fn nbdinfo_size(uri: &str) -> u64 {
    let mut c = Command::new(tool("nbdinfo"));
    c.args(["--json", uri]);
    let out = run(c);
    let v: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo JSON");
    v["exports"][0]["export-size"]
        .as_u64()
        .unwrap_or_else(|| panic!("no export-size in {out}"))
}

#[test]
fn qemu_io_writes_and_reads_over_unix() {
    let fx = Fixture::new(8 * MIB, false);
    let out = qemu_io(&fx.uri(), &["write -P 0x5a 0 1M", "read -P 0x5a 0 1M"]);
    assert!(out.contains("wrote 1048576/1048576 bytes"), "{out}");
    assert!(out.contains("read 1048576/1048576 bytes"), "{out}");
    let img = fx.image();
    assert!(img[..MIB as usize].iter().all(|&b| b == 0x5a));
    assert!(img[MIB as usize..].iter().all(|&b| b == 0));
    // Pattern mismatch must be detected (so the checks above mean something), FUA, zeroes,
    // discard and flush, through the named export.
    let named = format!("nbd+unix:///{EXPORT}?socket={}", fx.sock.display());
    qemu_io(
        &named,
        &[
            "write -f -P 0x33 1M 64k",
            "write -z 4k 4k",
            "discard 8k 4k",
            "flush",
            "read -P 0x33 1M 64k",
            "read -P 0 4k 8k",
        ],
    );
    let img = fx.image();
    assert!(img[4096..12288].iter().all(|&b| b == 0));
    assert!(img[MIB as usize..(MIB + 65536) as usize]
        .iter()
        .all(|&b| b == 0x33));
    let mut c = Command::new(tool("qemu-io"));
    c.args(["-f", "raw", &fx.uri(), "-c", "read -P 0x99 0 4k"]);
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() || text.contains("Pattern verification failed"),
        "{text}"
    );
    wait_for("clients to leave", || fx.server().connections() == 0);
}

#[test]
fn nbdinfo_and_qemu_img_report_the_size() {
    let fx = Fixture::new(3 * MIB + 512, false);
    assert_eq!(nbdinfo_size(&fx.uri()), 3 * MIB + 512);
    let named = format!("nbd+unix:///{EXPORT}?socket={}", fx.sock.display());
    assert_eq!(nbdinfo_size(&named), 3 * MIB + 512);
    let mut c = Command::new(tool("nbdinfo"));
    c.args(["--list", "--json", &fx.uri()]);
    let out = run(c);
    assert!(out.contains(EXPORT), "{out}");
    let mut c = Command::new(tool("qemu-img"));
    c.args(["info", "--output=json", &fx.uri()]);
    let out = run(c);
    let v: serde_json::Value = serde_json::from_str(&out).expect("qemu-img JSON");
    assert_eq!(v["virtual-size"].as_u64(), Some(3 * MIB + 512), "{out}");
}

#[test]
fn real_clients_over_tcp_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(2 * MIB)
        .unwrap();
    let server = NbdServer::start(
        &"tcp:127.0.0.1:0".parse().unwrap(),
        export(&img, false),
        test_log(),
    )
    .unwrap();
    let NbdListen::Tcp(addr) = server.local_addr() else {
        panic!("not tcp")
    };
    let uri = format!("nbd://127.0.0.1:{}/", addr.port());
    assert_eq!(nbdinfo_size(&uri), 2 * MIB);
    qemu_io(&uri, &["write -P 0xc3 512k 256k", "read -P 0xc3 512k 256k"]);
    let data = std::fs::read(&img).unwrap();
    assert!(data[512 << 10..768 << 10].iter().all(|&b| b == 0xc3));
    server.shutdown();
}

#[test]
fn nbdcopy_random_image() {
    let fx = Fixture::new(4 * MIB, false);
    let src = fx.img.with_file_name("random.bin");
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let data: Vec<u8> = (0..4 * MIB / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    std::fs::write(&src, &data).unwrap();
    let mut c = Command::new(tool("nbdcopy"));
    c.arg(&src).arg(fx.uri());
    run(c);
    let mut c = Command::new("cmp");
    c.arg(&src).arg(&fx.img);
    run(c);
    // And back out again.
    let back = fx.img.with_file_name("back.bin");
    let mut c = Command::new(tool("nbdcopy"));
    c.arg(fx.uri()).arg(&back);
    run(c);
    assert_eq!(std::fs::read(&back).unwrap(), data);
}
