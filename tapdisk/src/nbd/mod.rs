//! NBD export of a VBD's image.
//!
//! [`NbdServer`] serves one [`BlockTarget`] over the Network Block Device protocol
//! (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>) on a unix or TCP
//! socket, so tools such as `qemu-img`, `qemu-io`, `nbdcopy` or the kernel's `nbd-client` can
//! read and write the disk a guest sees.
//!
//! What is implemented:
//! - Handshake: fixed newstyle only, with `NO_ZEROES`. Options `EXPORT_NAME`, `ABORT`, `LIST`,
//!   `INFO` and `GO` (`INFO_EXPORT`, `INFO_BLOCK_SIZE` = 1 / 4096 / 32 MiB, `INFO_NAME` and
//!   `INFO_DESCRIPTION` when asked). Anything else (TLS, structured replies, metadata contexts,
//!   extended headers) is answered `REP_ERR_UNSUP` and the handshake goes on. The export is
//!   found under its configured name and under the empty (default) name.
//! - Transmission: simple replies; `READ`, `WRITE` (with `FUA`), `FLUSH`, `TRIM` (if the
//!   target supports discard), `WRITE_ZEROES` (`NO_HOLE` ignored), `DISC`.
//!
//! Errors follow the protocol's recommendations: `EPERM` for writes to a read-only export,
//! `ENOSPC` for writes past the end, `EINVAL` for reads/trims past the end, zero lengths,
//! unknown flags and unknown commands, and backend errors mapped by [`proto::errno_of`].
//! A READ over 32 MiB gets `EINVAL`; a WRITE over 32 MiB gets `EINVAL` and the connection is
//! closed, because a client that ignored the advertised limit may or may not send the payload
//! and the stream cannot be resynchronised. Protocol violations (bad magic, unknown client
//! flags, option data over 64 KiB, truncated messages) close the connection with a log line.
//! No allocation is driven by the client beyond one payload buffer of at most 32 MiB and one
//! option buffer of at most 64 KiB per connection.
//!
//! Threads: one accepts connections (polling the listener and a wake-up socket, so shutdown
//! never waits for a client), and each connection gets its own thread with blocking IO.
//! Requests of a connection are served in order, which is what pipelining clients expect.
//! [`NbdServer::shutdown`] stops accepting, shuts the client sockets down, and joins every
//! thread; a connection thread blocked inside the target (e.g. a paused VBD) is joined once the
//! target returns.

pub mod conn;
pub mod proto;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout};
use slog::{debug, info, o, warn, Logger};
use tapdisk_control::NbdListen;

use crate::image::BlockTarget;
use conn::{End, ExportInfo};

/// Most clients served at once; further connections are accepted and closed at once.
pub const MAX_CONNECTIONS: usize = 64;

/// A client must finish the handshake (reach transmission) within this long, or it is
/// disconnected: clients that connect and say nothing cannot hold the connection slots.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = if cfg!(test) {
    std::time::Duration::from_secs(2)
} else {
    std::time::Duration::from_secs(30)
};

/// A client in transmission that sends nothing for this long gives back its payload buffer
/// beyond [`conn::KEEP_IDLE`] (it stays connected: idle NBD clients are normal).
pub const IDLE_RELEASE: std::time::Duration = if cfg!(test) {
    std::time::Duration::from_millis(200)
} else {
    std::time::Duration::from_secs(2)
};

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
        }
    }

    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Unix(l) => l.as_fd(),
            Listener::Tcp(l) => l.as_fd(),
        }
    }
}

/// A connected client socket.
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn peer(&self) -> String {
        match self {
            Stream::Unix(_) => "unix".to_owned(),
            Stream::Tcp(s) => s
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into()),
        }
    }

    fn set_read_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }

    fn prepare(&self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_nonblocking(false),
            Stream::Tcp(s) => {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// State shared by the server handle, the accept thread and the connection threads.
struct Shared {
    stop: AtomicBool,
    conns: Mutex<Conns>,
    /// Bytes of payload buffers the connections hold.
    held: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct Conns {
    next_id: u64,
    /// A clone of each live client socket, to shut it down from outside.
    live: HashMap<u64, Stream>,
    threads: Vec<JoinHandle<()>>,
}

impl Shared {
    fn conns(&self) -> MutexGuard<'_, Conns> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Removes a connection from the live set when its thread ends, however it ends.
struct Deregister {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Deregister {
    fn drop(&mut self) {
        self.shared.conns().live.remove(&self.id);
    }
}

/// A running NBD server exporting one [`BlockTarget`].
pub struct NbdServer {
    running: Option<Running>,
}

struct Running {
    addr: NbdListen,
    shared: Arc<Shared>,
    wake: UnixStream,
    accept: JoinHandle<()>,
    /// The socket file we created, with its (device, inode), to unlink it only if it is ours.
    unix_file: Option<(PathBuf, u64, u64)>,
    log: Logger,
}

impl NbdServer {
    /// Listens on `listen` and serves `target` as `export_name` (and as the default export).
    ///
    /// A stale unix socket at the path is replaced; a live one, or any other kind of file, is
    /// an error.
    pub fn start(
        listen: &NbdListen,
        export_name: &str,
        target: Arc<dyn BlockTarget>,
        log: Logger,
    ) -> io::Result<NbdServer> {
        let (listener, addr, unix_file) = match listen {
            NbdListen::Unix(path) => {
                let l = bind_unix(path)?;
                let meta = std::fs::symlink_metadata(path)?;
                (
                    Listener::Unix(l),
                    listen.clone(),
                    Some((path.clone(), meta.dev(), meta.ino())),
                )
            }
            NbdListen::Tcp(a) => {
                let l = TcpListener::bind(a)?;
                let bound = l.local_addr()?;
                (Listener::Tcp(l), NbdListen::Tcp(bound), None)
            }
        };
        let cleanup = |e: io::Error| {
            if let Some((p, _, _)) = &unix_file {
                let _ = std::fs::remove_file(p);
            }
            e
        };
        let nonblocking = match &listener {
            Listener::Unix(l) => l.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        };
        nonblocking.map_err(cleanup)?;
        let (wake, wake_rx) = UnixStream::pair().map_err(cleanup)?;
        let log = log.new(o!("nbd" => addr.to_string()));
        let export = ExportInfo::new(export_name, &*target);
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            conns: Mutex::default(),
            held: Default::default(),
        });
        let accept = {
            let (shared, log) = (shared.clone(), log.clone());
            std::thread::Builder::new()
                .name("nbd-accept".into())
                .spawn(move || accept_loop(listener, wake_rx, shared, export, target, log))
                .map_err(cleanup)?
        };
        info!(log, "NBD export listening"; "export" => export_name);
        Ok(NbdServer {
            running: Some(Running {
                addr,
                shared,
                wake,
                accept,
                unix_file,
                log,
            }),
        })
    }

    /// The address the server is bound to (with the real port when port 0 was asked for).
    pub fn local_addr(&self) -> NbdListen {
        match &self.running {
            Some(r) => r.addr.clone(),
            None => NbdListen::Unix(PathBuf::new()),
        }
    }

    /// Bytes of payload buffers the connections hold now (at most [`conn::KEEP_IDLE`] per
    /// client idle for [`IDLE_RELEASE`]).
    pub fn buffered(&self) -> u64 {
        self.running
            .as_ref()
            .map(|r| r.shared.held.load(std::sync::atomic::Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// How many clients are connected.
    pub fn connections(&self) -> usize {
        self.running
            .as_ref()
            .map(|r| r.shared.conns().live.len())
            .unwrap_or(0)
    }

    /// Stops accepting, disconnects every client, joins all threads and removes the unix
    /// socket.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(r) = self.running.take() else { return };
        r.shared.stop.store(true, Ordering::Release);
        let _ = (&r.wake).write(&[1]);
        if r.accept.join().is_err() {
            warn!(r.log, "the NBD accept thread panicked");
        }
        // The accept thread is gone, so no connection can be added any more.
        let (live, threads) = {
            let mut c = r.shared.conns();
            for s in c.live.values() {
                s.shutdown();
            }
            (c.live.len(), std::mem::take(&mut c.threads))
        };
        for t in threads {
            if t.join().is_err() {
                warn!(r.log, "an NBD connection thread panicked");
            }
        }
        if let Some((path, dev, ino)) = &r.unix_file {
            match std::fs::symlink_metadata(path) {
                Ok(m) if m.dev() == *dev && m.ino() == *ino => {
                    let _ = std::fs::remove_file(path);
                }
                _ => {}
            }
        }
        info!(r.log, "NBD export stopped"; "clients_disconnected" => live);
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdServer")
            .field("addr", &self.running.as_ref().map(|r| r.addr.to_string()))
            .field("connections", &self.connections())
            .finish()
    }
}

/// Binds a unix listener at `path`, replacing a stale socket left there.
fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is the socket of a running server", path.display()),
                ))
            }
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                std::fs::remove_file(path)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "cannot tell whether socket {} is stale: {e}",
                        path.display()
                    ),
                ))
            }
        },
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    UnixListener::bind(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot listen on {}: {e}", path.display()),
        )
    })
}

fn accept_loop(
    listener: Listener,
    wake: UnixStream,
    shared: Arc<Shared>,
    export: ExportInfo,
    target: Arc<dyn BlockTarget>,
    log: Logger,
) {
    let export = Arc::new(export);
    loop {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(wake.as_fd(), PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                warn!(log, "poll failed; NBD server stops accepting"; "error" => %e);
                return;
            }
        }
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        loop {
            match listener.accept() {
                Ok(stream) => spawn_conn(stream, &shared, &export, &target, &log),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e)
                    if e.kind() == io::ErrorKind::Interrupted
                        || e.raw_os_error() == Some(libc::ECONNABORTED) => {}
                Err(e) => {
                    // Out of descriptors or memory: back off instead of spinning.
                    warn!(log, "accept failed"; "error" => %e);
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
            }
        }
        reap(&shared);
    }
}

/// Joins the threads of connections that have ended.
fn reap(shared: &Shared) {
    let done: Vec<JoinHandle<()>> = {
        let mut c = shared.conns();
        let (done, running) = std::mem::take(&mut c.threads)
            .into_iter()
            .partition(|t| t.is_finished());
        c.threads = running;
        done
    };
    for t in done {
        let _ = t.join();
    }
}

fn spawn_conn(
    stream: Stream,
    shared: &Arc<Shared>,
    export: &Arc<ExportInfo>,
    target: &Arc<dyn BlockTarget>,
    log: &Logger,
) {
    let peer = stream.peer();
    let (closer, reader) = match (stream.prepare(), stream.try_clone(), stream.try_clone()) {
        (Ok(()), Ok(c), Ok(r)) => (c, r),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            warn!(log, "cannot set up NBD connection"; "peer" => peer, "error" => %e);
            return;
        }
    };
    let id = {
        let mut c = shared.conns();
        if c.live.len() >= MAX_CONNECTIONS {
            info!(log, "too many NBD clients; closing new connection"; "peer" => peer,
                  "max" => MAX_CONNECTIONS);
            return;
        }
        let id = c.next_id;
        c.next_id += 1;
        c.live.insert(id, closer);
        id
    };
    let log = log.new(o!("conn" => id, "peer" => peer));
    // Not holding the lock: if `spawn` fails it drops the closure, and the guard locks.
    let guard = Deregister {
        shared: shared.clone(),
        id,
    };
    let (export, target, tlog) = (export.clone(), target.clone(), log.clone());
    let shared2 = shared.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("nbd-conn{id}"))
        .spawn(move || {
            let _guard = guard;
            run_conn(reader, stream, &export, &*target, &tlog, &shared2.held);
        });
    match spawned {
        // Only this thread adds handles, and shutdown joins it before taking them.
        Ok(t) => shared.conns().threads.push(t),
        Err(e) => warn!(log, "cannot start NBD connection thread"; "error" => %e),
    }
}

fn run_conn(
    reader: Stream,
    writer: Stream,
    export: &ExportInfo,
    target: &dyn BlockTarget,
    log: &Logger,
    held: &std::sync::atomic::AtomicU64,
) {
    debug!(log, "NBD client connected");
    if let Err(e) = reader.set_read_timeout(Some(HANDSHAKE_TIMEOUT)) {
        warn!(log, "cannot set the NBD handshake timeout"; "error" => %e);
        writer.shutdown();
        return;
    }
    let mut r = BufReader::with_capacity(64 << 10, reader);
    let mut w = BufWriter::with_capacity(64 << 10, writer);
    let result = conn::serve_with(&mut r, &mut w, export, target, log, held, |r| {
        r.get_ref().set_read_timeout(Some(IDLE_RELEASE))
    });
    let _ = w.flush();
    match result {
        Ok(End::Disconnected) | Ok(End::Aborted) => debug!(log, "NBD client disconnected"),
        Ok(End::Closed) => debug!(log, "NBD client closed the connection"),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            info!(log, "NBD protocol error; connection closed"; "error" => %e)
        }
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            info!(log, "NBD client did not finish the handshake in time; connection closed";
                  "timeout_s" => HANDSHAKE_TIMEOUT.as_secs())
        }
        Err(e) => debug!(log, "NBD connection ended"; "error" => %e),
    }
    w.get_ref().shutdown();
}
