//! The NBD server: a listener, an accept thread, and a thread per connection.

use std::fmt;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use slog::{debug, info, o, warn, Logger};

use super::conn::serve;
use super::disk::Disk;
use super::handshake::ExportInfo;
use super::slots::{Admitted, Conn, Cut, Slots, CHECK_EVERY, HANDSHAKE_DEADLINE, MAX_WAITING};
use super::stream::{End, Source};
use super::transmission::ConnCx;
use super::transmission::Counters;
use super::{NbdListen, IDLE_RELEASE};
use crate::logging::RateLimit;

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

    fn set_write_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tcp(s) => s.set_write_timeout(t),
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

impl Conn for Stream {
    fn hang_up(&self) {
        self.shutdown();
    }

    fn gone(&self) -> bool {
        use nix::sys::socket::{recv, MsgFlags};
        let fd = match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        };
        let mut b = [0u8; 1];
        // A client speaks only after the greeting; end of file now means it left.
        match recv(fd, &mut b, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
            Ok(0) => true,
            Ok(_) | Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => false,
            Err(_) => true,
        }
    }

    fn handle(&self) -> io::Result<Stream> {
        self.try_clone()
    }
}

impl Source for Stream {
    fn poll_fd(&self) -> Option<RawFd> {
        Some(match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        })
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
    /// Bytes of buffer memory the connections hold.
    held: AtomicU64,
    counters: Counters,
}

#[derive(Default)]
struct Conns {
    /// A clone of each live client socket (to hang up on it from outside), and its progress.
    slots: Slots<Stream>,
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
        self.shared.conns().slots.remove(self.id);
    }
}

/// What an NBD server exports: its description, and a disk for each connection that
/// reaches transmission.
pub trait Export: Send + Sync {
    /// Size, name, flags.
    fn info(&self) -> ExportInfo;
    /// A new connection's path to the disk.
    fn connect(&self) -> io::Result<Box<dyn Disk>>;
}

/// A running NBD server exporting one [`Export`].
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
    /// Listens on `listen` and serves `export` (under its name and as the default export).
    ///
    /// A stale unix socket at the path is replaced; a live one, or any other kind of file, is
    /// an error.
    pub fn start(
        listen: &NbdListen,
        export: Arc<dyn Export>,
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
        let info = export.info();
        let export_name = info.name.clone();
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            conns: Mutex::default(),
            held: AtomicU64::new(0),
            counters: Counters::default(),
        });
        let accept = {
            let (shared, log) = (shared.clone(), log.clone());
            std::thread::Builder::new()
                .name("nbd-accept".into())
                .spawn(move || accept_loop(listener, wake_rx, shared, info, export, log))
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

    /// Bytes of buffer memory the connections hold now (at most [`super::stream::KEEP_IDLE`] per client
    /// idle for [`IDLE_RELEASE`]).
    pub fn buffered(&self) -> u64 {
        self.running
            .as_ref()
            .map(|r| r.shared.held.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// The export's counters, as JSON.
    pub fn counters(&self) -> serde_json::Value {
        match &self.running {
            Some(r) => serde_json::to_value(&r.shared.counters).unwrap_or_default(),
            None => serde_json::Value::Null,
        }
    }

    /// How many clients are connected.
    pub fn connections(&self) -> usize {
        self.running
            .as_ref()
            .map(|r| r.shared.conns().slots.len())
            .unwrap_or(0)
    }

    /// How many clients wait for a connection slot.
    pub fn waiting(&self) -> usize {
        self.running
            .as_ref()
            .map(|r| r.shared.conns().slots.waiting())
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
            (c.slots.hang_up_all(), std::mem::take(&mut c.threads))
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
    info: ExportInfo,
    export: Arc<dyn Export>,
    log: Logger,
) {
    let info = Arc::new(info);
    let mut refused = RateLimit::new(10, Duration::from_secs(10));
    let check_ms = u16::try_from(CHECK_EVERY.as_millis()).unwrap_or(u16::MAX);
    loop {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(wake.as_fd(), PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, PollTimeout::from(check_ms)) {
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
                Ok(stream) => arrive(stream, &shared, &log, &mut refused),
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
        let admitted: Vec<Admitted<Stream>> = {
            let now = Instant::now();
            let mut c = shared.conns();
            c.slots.enforce_deadline(now);
            std::iter::from_fn(|| c.slots.admit(now)).collect()
        };
        for a in admitted {
            spawn_conn(a, &shared, &info, &export, &log);
        }
        reap(&shared);
    }
}

/// A new client waits for a slot (it is given one on the accept thread's next round), or is
/// closed at once if too many wait already.
fn arrive(stream: Stream, shared: &Shared, log: &Logger, refused: &mut RateLimit) {
    if let Err(e) = stream.prepare() {
        debug!(log, "cannot set up an NBD connection"; "error" => %e);
        return;
    }
    let peer = stream.peer();
    if shared.conns().slots.arrive(stream, Instant::now()).is_err() {
        if let Some(suppressed) = refused.check() {
            info!(log, "every NBD connection slot is in use and too many clients wait; closing \
                        new connection";
                  "peer" => peer, "max" => super::MAX_CONNECTIONS, "max_waiting" => MAX_WAITING,
                  "suppressed" => suppressed);
        }
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
    admitted: Admitted<Stream>,
    shared: &Arc<Shared>,
    info: &Arc<ExportInfo>,
    export: &Arc<dyn Export>,
    log: &Logger,
) {
    let Admitted {
        id,
        conn: stream,
        progress,
        took_from,
        waited,
    } = admitted;
    let peer = stream.peer();
    if let Some(old) = took_from {
        info!(log, "a client waited for a connection slot; one stalled in its handshake or idle \
                    gave it its slot";
              "closed" => old, "new" => id, "waited_ms" => waited.as_millis() as u64);
    }
    let reader = match stream.try_clone() {
        Ok(r) => r,
        Err(e) => {
            warn!(log, "cannot set up NBD connection"; "peer" => peer, "error" => %e);
            shared.conns().slots.remove(id);
            return;
        }
    };
    let log = log.new(o!("conn" => id, "peer" => peer));
    // Not holding the lock: if `spawn` fails it drops the closure, and the guard locks.
    let guard = Deregister {
        shared: shared.clone(),
        id,
    };
    let (info, export, tlog) = (info.clone(), export.clone(), log.clone());
    let shared2 = shared.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("nbd-conn{id}"))
        .spawn(move || {
            let _guard = guard;
            let cx = ConnCx {
                export: &info,
                counters: &shared2.counters,
                held: &shared2.held,
                progress: &progress,
                log: &tlog,
            };
            run_conn(reader, stream, &cx, &*export);
        });
    match spawned {
        // Only this thread adds handles, and shutdown joins it before taking them.
        Ok(t) => shared.conns().threads.push(t),
        Err(e) => warn!(log, "cannot start NBD connection thread"; "error" => %e),
    }
}

fn run_conn(reader: Stream, writer: Stream, cx: &ConnCx<'_>, export: &dyn Export) {
    let log = cx.log;
    debug!(log, "NBD client connected");
    // The accept thread enforces the handshake's deadline for the whole phase; these
    // timeouts only make sure no single read or write outlives it.
    let timeouts = reader
        .set_read_timeout(Some(HANDSHAKE_DEADLINE))
        .and_then(|()| writer.set_write_timeout(Some(HANDSHAKE_DEADLINE)));
    if let Err(e) = timeouts {
        warn!(log, "cannot set the NBD handshake timeouts"; "error" => %e);
        writer.shutdown();
        return;
    }
    let mut r = BufReader::with_capacity(64 << 10, reader);
    let mut w = BufWriter::with_capacity(64 << 10, writer);
    let result = serve(
        &mut r,
        &mut w,
        cx,
        || export.connect(),
        |r| {
            cx.progress.active();
            r.get_ref().set_read_timeout(Some(IDLE_RELEASE))
        },
    );
    let _ = w.flush();
    match (cx.progress.cut(), result) {
        (Some(Cut::HandshakeDeadline), _) => {
            info!(log, "NBD client did not finish the handshake in time; connection closed";
                  "deadline_s" => HANDSHAKE_DEADLINE.as_secs())
        }
        (Some(Cut::MadeRoom), _) => {
            info!(
                log,
                "NBD connection closed to make room for a new client (every slot was \
                        in use, this one stalled in its handshake or idle)"
            )
        }
        (None, Ok(End::Disconnected) | Ok(End::Aborted)) => debug!(log, "NBD client disconnected"),
        (None, Ok(End::Closed)) => debug!(log, "NBD client closed the connection"),
        (None, Err(e)) if e.kind() == io::ErrorKind::InvalidData => {
            info!(log, "NBD protocol error; connection closed"; "error" => %e)
        }
        (None, Err(e)) => debug!(log, "NBD connection ended"; "error" => %e),
    }
    w.get_ref().shutdown();
}
