//! The pipelining NBD client for tests that need control over what is in flight (which
//! writes a flush covers, requests queued while a VBD is paused): fixed newstyle with
//! `OPT_EXPORT_NAME`, simple replies. Replies are read on a thread of their own and handed
//! over in arrival order. (qemu-io, qemu-img and nbdinfo test the export's interop.)

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use tapdisk::nbd::proto::SIMPLE_REPLY_MAGIC;

use super::{request_header, Client, CMD_DISC, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE};

/// A reply: the request's handle, its error (0: success) and, for reads, the data.
#[derive(Debug)]
pub struct Reply {
    /// The handle the request was sent with.
    pub handle: u64,
    /// NBD error code (0: success).
    pub error: u32,
    /// Read data.
    pub data: Vec<u8>,
}

/// One NBD connection.
pub struct NbdClient {
    sock: UnixStream,
    /// Export size in bytes.
    pub size: u64,
    replies: mpsc::Receiver<io::Result<Reply>>,
    /// Read lengths by handle, for the reader thread.
    reads: mpsc::Sender<(u64, u32)>,
    reader: Option<JoinHandle<()>>,
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

impl NbdClient {
    /// Connects to the export on unix socket `path` and finishes the handshake.
    pub fn connect(path: &Path) -> io::Result<NbdClient> {
        let Client { s: sock, size } = Client::connect(path, Duration::from_secs(30))?;
        sock.set_read_timeout(None)?;
        let (tx, replies) = mpsc::channel();
        let (reads, read_lens) = mpsc::channel::<(u64, u32)>();
        let mut rx = sock.try_clone()?;
        let reader = std::thread::spawn(move || {
            let mut lens = std::collections::HashMap::new();
            loop {
                let mut h = [0u8; 16];
                let r = rx.read_exact(&mut h).and_then(|()| {
                    if u32::from_be_bytes([h[0], h[1], h[2], h[3]]) != SIMPLE_REPLY_MAGIC {
                        return Err(io::Error::other("bad reply magic"));
                    }
                    let handle = be64(&h[8..]);
                    let error = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                    while let Ok((k, n)) = read_lens.try_recv() {
                        lens.insert(k, n);
                    }
                    let mut data = Vec::new();
                    if let Some(n) = lens.remove(&handle) {
                        if error == 0 {
                            data = vec![0u8; n as usize];
                            rx.read_exact(&mut data)?;
                        }
                    }
                    Ok(Reply {
                        handle,
                        error,
                        data,
                    })
                });
                let end = r.is_err();
                if tx.send(r).is_err() || end {
                    return;
                }
            }
        });
        Ok(NbdClient {
            sock,
            size,
            replies,
            reads,
            reader: Some(reader),
        })
    }

    fn request(
        &mut self,
        cmd: u16,
        handle: u64,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> io::Result<()> {
        let mut h = Vec::with_capacity(28 + data.len());
        h.extend_from_slice(&request_header(cmd, handle, offset, len));
        h.extend_from_slice(data);
        self.sock.write_all(&h)
    }

    /// Sends a write of `data` at `offset`.
    pub fn send_write(&mut self, handle: u64, offset: u64, data: &[u8]) -> io::Result<()> {
        let len = u32::try_from(data.len()).map_err(io::Error::other)?;
        self.request(CMD_WRITE, handle, offset, len, data)
    }

    /// Sends a read of `len` bytes at `offset`.
    pub fn send_read(&mut self, handle: u64, offset: u64, len: u32) -> io::Result<()> {
        self.reads
            .send((handle, len))
            .map_err(|_| io::Error::other("reader gone"))?;
        self.request(CMD_READ, handle, offset, len, &[])
    }

    /// Sends a flush.
    pub fn send_flush(&mut self, handle: u64) -> io::Result<()> {
        self.request(CMD_FLUSH, handle, 0, 0, &[])
    }

    /// Sends a trim (discard).
    pub fn send_trim(&mut self, handle: u64, offset: u64, len: u32) -> io::Result<()> {
        self.request(CMD_TRIM, handle, offset, len, &[])
    }

    /// The next reply, waiting up to `timeout`; `Ok(None)` on timeout.
    pub fn next_reply(&mut self, timeout: Duration) -> io::Result<Option<Reply>> {
        match self.replies.recv_timeout(timeout) {
            Ok(r) => r.map(Some),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(io::Error::from(io::ErrorKind::UnexpectedEof))
            }
        }
    }

    /// Waits for the reply to the one request in flight, which must succeed.
    fn wait_ok(&mut self, handle: u64) -> io::Result<Reply> {
        let r = self
            .next_reply(Duration::from_secs(60))?
            .ok_or_else(|| io::Error::other("no reply in 60 s"))?;
        if r.handle != handle || r.error != 0 {
            return Err(io::Error::other(format!(
                "request {handle}: reply {} with error {}",
                r.handle, r.error
            )));
        }
        Ok(r)
    }

    /// Writes `data` at `offset` and waits for the reply.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.send_write(1, offset, data)?;
        self.wait_ok(1).map(|_| ())
    }

    /// Reads `len` bytes at `offset` (at most 32 MiB) and waits for them.
    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        self.send_read(2, offset, len)?;
        self.wait_ok(2).map(|r| r.data)
    }

    /// Reads the whole export, 4 MiB at a time.
    pub fn read_all(&mut self) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.size as usize);
        while (out.len() as u64) < self.size {
            let n = (self.size - out.len() as u64).min(4 << 20) as u32;
            out.extend(self.read(out.len() as u64, n)?);
        }
        Ok(out)
    }

    /// Flushes and waits for the reply.
    pub fn flush(&mut self) -> io::Result<()> {
        self.send_flush(3)?;
        self.wait_ok(3).map(|_| ())
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        let _ = self.request(CMD_DISC, 0, 0, 0, &[]);
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
    }
}
