//! A session with one target over one connection, driven by its own IO thread.
//!
//! The caller submits [`Command`]s (tagged with a `u32` of its choosing) through a bounded
//! lock-free queue and gets [`Completion`]s back through another, with an eventfd it can poll.
//! Neither side blocks or allocates per command. See the crate docs for the threading model.

use std::io;
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use slog::{debug, info, warn};

use crate::config::{Config, Drive};
use crate::conn::{Command, Completion, Conn, Stats, Wire};
use crate::error::{Error, IoError, Result};
use crate::login::{self, LoggedIn, SessionType};
use crate::text::Params;

/// Where the session's connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Logged in, commands flow.
    Up = 0,
    /// The connection dropped; logging in again. Commands wait.
    Reconnecting = 1,
    /// Reconnecting timed out; new commands fail at once (each new batch of commands tries
    /// one more login first, at most once per reconnect interval).
    Down = 2,
    /// Shut down.
    Closed = 3,
}

struct Shared {
    sq: ArrayQueue<Command>,
    cq: ArrayQueue<Completion>,
    sq_efd: EventFd,
    cq_efd: EventFd,
    /// Inline mode: signalled by the login helper thread when it is done.
    login_efd: EventFd,
    /// The IO thread is (about to be) asleep in poll and needs a kick.
    sleeping: AtomicBool,
    /// The caller is (about to be) asleep on the completion eventfd ([`Session::arm`]).
    armed: AtomicBool,
    stop: AtomicBool,
    state: AtomicU8,
    reconnects: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
    pings: AtomicU64,
    nop_answers: AtomicU64,
    r2ts: AtomicU64,
}

fn eventfd() -> io::Result<EventFd> {
    Ok(EventFd::from_flags(
        EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC,
    )?)
}

/// Signals `fd`; a failure (a saturated counter) only means it is already signalled.
fn efd_signal(fd: &EventFd) {
    let _ = fd.arm();
}

/// Resets an eventfd or a timerfd (non-blocking: nothing to read is fine).
fn efd_drain(fd: RawFd) {
    let mut v = [0u8; 8];
    let _ = nix::unistd::read(fd, &mut v);
}

/// A fresh random-type ISID (RFC 7143 section 11.12.5): `0x80` then 40 bits from the clock,
/// the pid and a counter.
pub fn new_isid() -> [u8; 6] {
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mix =
        t ^ (u64::from(std::process::id()) << 20) ^ N.fetch_add(0x9e37_79b9, Ordering::Relaxed);
    let b = mix.to_be_bytes();
    [0x80, b[3], b[4], b[5], b[6], b[7]]
}

/// A session: see the module docs.
pub struct Session {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// [`Drive::Inline`]: the connection, driven by [`Session::drive`].
    inline: Option<Box<Inline>>,
    params: Params,
    depth: usize,
}

impl Session {
    /// Connects and logs in (on the calling thread, so a refused login is reported here), then
    /// starts the IO thread.
    pub fn connect(cfg: &Config) -> Result<Session> {
        let isid = new_isid();
        let first = open(cfg, isid)?;
        Session::start(cfg, isid, Some(first))
    }

    /// As [`Session::connect`], but a target that cannot be logged in to now gives a session
    /// that starts [`State::Down`] (with the error), not a failure: its first commands try a
    /// login (at most once per reconnect interval) and fail at once while none succeeds, so a
    /// caller with other copies of the data can open now and use this target when it returns.
    /// A [`Error::Fenced`] login is still an error.
    pub fn connect_or_down(cfg: &Config) -> Result<(Session, Option<Error>)> {
        let isid = new_isid();
        match open(cfg, isid) {
            Ok(first) => Ok((Session::start(cfg, isid, Some(first))?, None)),
            Err(e @ Error::Fenced { .. }) => Err(e),
            Err(e) => {
                warn!(cfg.logger, "iSCSI target unreachable at start; session starts down";
                      "target" => &cfg.target, "portal" => &cfg.portal, "error" => %e);
                Ok((Session::start(cfg, isid, None)?, Some(e)))
            }
        }
    }

    fn start(cfg: &Config, isid: [u8; 6], first: Option<(TcpStream, LoggedIn)>) -> Result<Session> {
        let depth = usize::from(cfg.queue_depth.clamp(1, 4096));
        let shared = Arc::new(Shared {
            sq: ArrayQueue::new(depth),
            cq: ArrayQueue::new(depth),
            sq_efd: eventfd()?,
            cq_efd: eventfd()?,
            login_efd: eventfd()?,
            sleeping: AtomicBool::new(false),
            armed: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            state: AtomicU8::new(if first.is_some() {
                State::Up
            } else {
                State::Down
            } as u8),
            reconnects: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            pings: AtomicU64::new(0),
            nop_answers: AtomicU64::new(0),
            r2ts: AtomicU64::new(0),
        });
        let mut conn = Conn::new(
            depth as u16,
            cfg.offer.max_recv_data_segment,
            cfg.nop_interval,
            cfg.nop_timeout,
        );
        conn.set_command_timeout(cfg.command_timeout);
        let (stream, params) = match first {
            Some((stream, logged)) => {
                info!(cfg.logger, "iSCSI session up"; "target" => &cfg.target, "portal" => &cfg.portal,
                      "params" => format!("{:?}", logged.params));
                conn.bind(&logged);
                (Some(stream), logged.params)
            }
            None => (None, Params::defaults(&cfg.offer)),
        };
        let mut io = IoThread {
            cfg: cfg.clone(),
            isid,
            shared: shared.clone(),
            conn,
            sock: stream,
            depth,
            last_attempt: None,
            signalled: false,
        };
        if cfg.drive == Drive::Inline {
            let inline = Inline::new(io)?;
            return Ok(Session {
                shared,
                thread: None,
                inline: Some(Box::new(inline)),
                params,
                depth,
            });
        }
        let thread = std::thread::Builder::new()
            .name(format!("iscsi-{}", short_name(&cfg.target)))
            .spawn(move || io.run())?;
        Ok(Session {
            shared,
            thread: Some(thread),
            inline: None,
            params,
            depth,
        })
    }

    /// [`Drive::Inline`]: does all the connection's work that is ready, without blocking:
    /// sends submitted commands, reads what arrived, queues completions, answers pings, runs
    /// timeouts and takes over a new connection when a background login succeeds. Call it
    /// after submitting and whenever [`Session::poll_fd`] polls readable. With
    /// [`Drive::Thread`] it only wakes the IO thread ([`Session::kick`]).
    pub fn drive(&mut self) {
        match self.inline.as_mut() {
            Some(i) => i.drive(),
            None => self.kick(),
        }
    }

    /// Waits up to `timeout` (None: for ever) until completions are queued, driving the
    /// connection meanwhile in [`Drive::Inline`] mode; returns at once if some are queued.
    /// For callers without an event loop of their own (tools, tests).
    pub fn wait(&mut self, timeout: Option<Duration>) {
        if self.inline.is_none() {
            self.wait_completion_fd(timeout);
            self.clear_completion_fd();
            return;
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            self.drive();
            if !self.shared.cq.is_empty() {
                return;
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left == Some(Duration::ZERO) {
                return;
            }
            let mut p = libc::pollfd {
                fd: self.poll_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.map_or(-1, |d| d.as_millis().clamp(1, 60_000) as i32);
            // SAFETY: one valid pollfd on the stack.
            unsafe {
                libc::poll(&mut p, 1, ms);
            }
        }
    }

    /// [`Drive::Inline`]: sends the commands submitted since the last call, and nothing else
    /// (no read, no timers): the cheap call after a batch of submissions, when the caller
    /// will poll [`Session::poll_fd`] next anyway. Commands it fails at once (connection
    /// down) make [`Session::poll_fd`] readable. With [`Drive::Thread`] it wakes the IO
    /// thread ([`Session::kick`]).
    pub fn send(&mut self) {
        match self.inline.as_mut() {
            Some(i) => i.send(),
            None => self.kick(),
        }
    }

    /// The descriptor to poll (readable) before [`Session::drive`]: with [`Drive::Inline`] an
    /// epoll set of the socket, a timer for keepalive and timeouts, and the login helper's
    /// signal; with [`Drive::Thread`], [`Session::completion_fd`].
    pub fn poll_fd(&self) -> RawFd {
        match &self.inline {
            Some(i) => i.epoll.0.as_raw_fd(),
            None => self.completion_fd(),
        }
    }

    /// Submits a command. A full queue is backpressure: reap completions and submit again.
    /// Invalid commands are refused with an error and never reach the target.
    ///
    /// # Safety
    ///
    /// Until the command's completion has been popped from [`Session::pop_completion`] (or the
    /// session is dropped), the iovec array `cmd.iov[..cmd.iovcnt]` must stay valid for reads,
    /// and every buffer it points at must stay valid for writes (reads) of its length for a
    /// read (write) command, and not be accessed by the caller. The IO thread writes Data-In
    /// straight into these buffers and sends Data-Out straight from them.
    pub unsafe fn submit(&self, cmd: Command) -> std::result::Result<(), SubmitError> {
        // SAFETY: forwarded from the caller.
        unsafe { self.submit_quiet(cmd) }?;
        self.kick();
        Ok(())
    }

    /// Queues a command without waking the IO thread; call [`Session::kick`] after the last
    /// one of a batch, so a batch costs at most one wake-up.
    ///
    /// # Safety
    ///
    /// As [`Session::submit`].
    pub unsafe fn submit_quiet(&self, cmd: Command) -> std::result::Result<(), SubmitError> {
        if let Err(e) = cmd.check() {
            return Err(SubmitError::Invalid(e));
        }
        if self.shared.sq.push(cmd).is_err() {
            return Err(SubmitError::Full);
        }
        Ok(())
    }

    /// Wakes the IO thread if it sleeps (after [`Session::submit_quiet`]).
    pub fn kick(&self) {
        // Pairs with the IO thread's SeqCst store of `sleeping` before it re-checks the queue:
        // either it sees our commands or we see it sleeping.
        std::sync::atomic::fence(Ordering::SeqCst);
        // Only the first kick after it fell asleep pays for the wake-up.
        if self.shared.sleeping.load(Ordering::SeqCst)
            && self.shared.sleeping.swap(false, Ordering::SeqCst)
        {
            efd_signal(&self.shared.sq_efd);
        }
    }

    /// The next completion, if any.
    pub fn pop_completion(&self) -> Option<Completion> {
        self.shared.cq.pop()
    }

    /// An eventfd that becomes readable when completions are queued while the caller is
    /// [armed](Session::arm). The protocol of a caller's event loop: pop completions until none
    /// is left; call `arm()`; if it returns false, completions arrived meanwhile: pop again;
    /// otherwise sleep (epoll) on this fd, and when it fires call
    /// [`Session::clear_completion_fd`] and pop. While the caller keeps busy the IO thread
    /// never touches the eventfd, so a steady stream of completions costs no syscalls here.
    pub fn completion_fd(&self) -> RawFd {
        self.shared.cq_efd.as_raw_fd()
    }

    /// Resets the completion eventfd (before draining the completion queue).
    pub fn clear_completion_fd(&self) {
        efd_drain(self.shared.cq_efd.as_raw_fd());
    }

    /// Asks for a signal on [`Session::completion_fd`] at the next completion. Returns false
    /// when completions are already queued (pop them instead of sleeping).
    pub fn arm(&self) -> bool {
        self.shared.armed.store(true, Ordering::SeqCst);
        // Pairs with the IO thread's fence between pushing a completion and reading `armed`:
        // either it sees us armed or we see its completion.
        std::sync::atomic::fence(Ordering::SeqCst);
        self.shared.cq.is_empty()
    }

    /// Arms and waits up to `timeout` for the completion eventfd (returns at once when
    /// completions are queued).
    pub fn wait_completion_fd(&self, timeout: Option<Duration>) {
        if !self.arm() {
            return;
        }
        let mut p = libc::pollfd {
            fd: self.completion_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.map_or(-1, |d| d.as_millis().min(i32::MAX as u128) as i32);
        // SAFETY: one valid pollfd on the stack.
        unsafe {
            libc::poll(&mut p, 1, ms);
        }
    }

    /// The parameters negotiated at the first login.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// The queue depth (most commands in flight; the queues' capacity).
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// Where the connection stands.
    pub fn state(&self) -> State {
        state_of(self.shared.state.load(Ordering::Relaxed))
    }

    /// Times the connection was re-established.
    pub fn reconnects(&self) -> u64 {
        self.shared.reconnects.load(Ordering::Relaxed)
    }

    /// Counters (updated by the IO thread about once per loop).
    pub fn stats(&self) -> Stats {
        Stats {
            completed: self.shared.completed.load(Ordering::Relaxed),
            failed: self.shared.failed.load(Ordering::Relaxed),
            retried: self.shared.retried.load(Ordering::Relaxed),
            pings: self.shared.pings.load(Ordering::Relaxed),
            nop_answers: self.shared.nop_answers.load(Ordering::Relaxed),
            r2ts: self.shared.r2ts.load(Ordering::Relaxed),
        }
    }

    /// Logs out and stops the IO thread. Commands still in flight complete with
    /// [`IoError::Shutdown`] (their completions are discarded).
    pub fn close(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        efd_signal(&self.shared.sq_efd);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(mut i) = self.inline.take() {
            // A login helper still running sees `stop` and ends by itself.
            i.io.shutdown();
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Why [`Session::submit`] refused a command (the caller still has it: commands are `Copy`).
#[derive(Debug)]
pub enum SubmitError {
    /// The submission queue is full; try again after reaping completions.
    Full,
    /// The command is malformed.
    Invalid(Error),
}

fn state_of(v: u8) -> State {
    match v {
        0 => State::Up,
        1 => State::Reconnecting,
        2 => State::Down,
        _ => State::Closed,
    }
}

fn short_name(target: &str) -> String {
    let tail = target.rsplit([':', '.']).next().unwrap_or(target);
    tail.chars().take(9).collect()
}

/// Connects and logs in with `isid` (TSIH 0: a new session, or the reinstatement of ours).
fn open(cfg: &Config, isid: [u8; 6]) -> Result<(TcpStream, LoggedIn)> {
    let deadline = Instant::now() + cfg.login_timeout;
    let stream = login::connect(&cfg.portal, cfg.login_timeout)?;
    let (c, logged) = login::login(stream, cfg, SessionType::Normal, isid, deadline)?;
    let stream = c.stream;
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    stream.set_nonblocking(true)?;
    let logged = match &cfg.registration {
        Some(reg) => crate::reserve::register(cfg, &stream, logged, reg, deadline)?,
        None => logged,
    };
    Ok((stream, logged))
}

pub(crate) struct SockWire<'a>(pub(crate) &'a TcpStream);

impl Wire for SockWire<'_> {
    unsafe fn readv(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        let n = iov.len().min(1024) as libc::c_int;
        // SAFETY: the caller guarantees each entry is valid for writes of its length.
        let r = unsafe { libc::readv(self.0.as_raw_fd(), iov.as_ptr(), n) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }

    unsafe fn writev(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        let n = iov.len().min(1024) as libc::c_int;
        // SAFETY: the caller guarantees each entry is valid for reads of its length.
        let r = unsafe { libc::writev(self.0.as_raw_fd(), iov.as_ptr(), n) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }
}

struct IoThread {
    cfg: Config,
    isid: [u8; 6],
    shared: Arc<Shared>,
    conn: Conn,
    sock: Option<TcpStream>,
    depth: usize,
    /// When the last login attempt in the Down state happened.
    last_attempt: Option<Instant>,
    signalled: bool,
}

impl IoThread {
    fn set_state(&self, s: State) {
        self.shared.state.store(s as u8, Ordering::Relaxed);
    }

    fn state(&self) -> State {
        state_of(self.shared.state.load(Ordering::Relaxed))
    }

    fn push_completion(shared: &Shared, signalled: &mut bool, c: Completion) {
        // Cannot fail: commands are only accepted while busy + queued completions < depth.
        if shared.cq.push(c).is_err() {
            debug_assert!(false, "completion queue overflow");
        }
        *signalled = true;
    }

    /// Runs `f` on the connection with an output that queues its completions (the caller is
    /// signalled at the next [`IoThread::publish`]).
    fn emit<R>(&mut self, f: impl FnOnce(&mut Conn, &mut dyn FnMut(Completion)) -> R) -> R {
        let shared = &*self.shared;
        let mut sig = false;
        let r = f(&mut self.conn, &mut |c| {
            Self::push_completion(shared, &mut sig, c)
        });
        self.signalled |= sig;
        r
    }

    /// One round on a live connection: send what is queued, read what arrived, run the
    /// timers. Returns what was written and read and when the timers are next due.
    fn exchange(&mut self, sock: &TcpStream) -> Result<((usize, usize), Instant)> {
        let mut wire = SockWire(sock);
        self.emit(|conn, mut out| -> Result<((usize, usize), Instant)> {
            let w = conn.flush(&mut wire, &mut out)?;
            let r = conn.receive(&mut wire, &mut out)?;
            Ok(((w, r), conn.tick(Instant::now())?))
        })
    }

    /// Down with commands waiting: whether a login attempt is due (at most one per reconnect
    /// interval); if so, the attempt is stamped now.
    fn login_due(&mut self) -> bool {
        let due = self
            .last_attempt
            .is_none_or(|t| t.elapsed() >= self.cfg.reconnect_interval);
        if due {
            self.last_attempt = Some(Instant::now());
        }
        due
    }

    /// Fails the commands waiting to be sent (Down, between login attempts).
    fn fail_ready(&mut self) {
        self.emit(|c, mut out| c.fail_ready(IoError::Disconnected, &mut out));
    }

    /// Takes a login's outcome: binds the new connection (in-flight commands are resent), or
    /// logs the failure and returns it.
    fn adopt(&mut self, r: LoginResult) -> Result<()> {
        match r {
            Ok((s, l)) => {
                self.conn.bind(&l);
                self.sock = Some(s);
                self.shared.reconnects.fetch_add(1, Ordering::Relaxed);
                self.set_state(State::Up);
                info!(self.cfg.logger, "iSCSI session re-established"; "target" => &self.cfg.target,
                      "resending" => self.conn.busy());
                Ok(())
            }
            Err(e) => {
                debug!(self.cfg.logger, "iSCSI login attempt failed"; "target" => &self.cfg.target, "error" => %e);
                Err(e)
            }
        }
    }

    /// The connection failed: drop it (Reconnecting) and requeue what was in flight.
    fn drop_connection(&mut self, e: &Error) {
        warn!(self.cfg.logger, "iSCSI connection lost"; "target" => &self.cfg.target, "error" => %e,
              "in_flight" => self.conn.busy());
        if let Some(s) = self.sock.take() {
            // Closing it also takes it out of an inline session's epoll set.
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        self.set_state(State::Reconnecting);
        self.emit(|c, mut out| c.requeue(&mut out));
        self.publish();
    }

    /// No login succeeded before the reconnect timeout: fail everything and go Down.
    fn give_up(&mut self, e: &Error) {
        warn!(self.cfg.logger, "iSCSI target unreachable; failing commands in flight";
              "target" => &self.cfg.target, "failed" => self.conn.busy(), "error" => %e);
        self.set_state(State::Down);
        self.last_attempt = Some(Instant::now());
        self.emit(|c, mut out| c.fail_all(IoError::Disconnected, &mut out));
        self.publish();
    }

    fn publish(&mut self) {
        let st = &self.conn.stats;
        self.shared.completed.store(st.completed, Ordering::Relaxed);
        self.shared.failed.store(st.failed, Ordering::Relaxed);
        self.shared.retried.store(st.retried, Ordering::Relaxed);
        self.shared.pings.store(st.pings, Ordering::Relaxed);
        self.shared
            .nop_answers
            .store(st.nop_answers, Ordering::Relaxed);
        self.shared.r2ts.store(st.r2ts, Ordering::Relaxed);
        if self.signalled {
            self.signalled = false;
            std::sync::atomic::fence(Ordering::SeqCst);
            if self.shared.armed.load(Ordering::SeqCst)
                && self.shared.armed.swap(false, Ordering::SeqCst)
            {
                efd_signal(&self.shared.cq_efd);
            }
        }
    }

    /// Moves submissions into free slots while completions have room.
    fn accept(&mut self) -> usize {
        let mut n = 0;
        while self.conn.has_free_slot() && self.conn.busy() + self.shared.cq.len() < self.depth {
            match self.shared.sq.pop() {
                Some(c) => {
                    self.conn.enqueue(c);
                    n += 1;
                }
                None => break,
            }
        }
        n
    }

    fn can_accept(&self) -> bool {
        !self.shared.sq.is_empty()
            && self.conn.has_free_slot()
            && self.conn.busy() + self.shared.cq.len() < self.depth
    }

    fn run(&mut self) {
        let mut next_tick;
        loop {
            if self.shared.stop.load(Ordering::SeqCst) {
                self.shutdown();
                return;
            }
            let accepted = self.accept();
            let Some(sock) = self.sock.take() else {
                // Down: try one login when there is work, at most once per interval.
                if self.conn.busy() > 0 {
                    if self.login_due() && self.try_login().is_ok() {
                        continue;
                    }
                    self.fail_ready();
                }
                self.publish();
                self.sleep(None, Some(Duration::from_millis(100)));
                continue;
            };
            let r = self.exchange(&sock);
            self.sock = Some(sock);
            let (w, r) = match r {
                Ok((wr, t)) => {
                    next_tick = t;
                    wr
                }
                Err(e) => {
                    self.publish();
                    self.lost(e);
                    continue;
                }
            };
            self.publish();
            if accepted == 0 && w == 0 && r == 0 && !self.can_accept() {
                let wait = next_tick.saturating_duration_since(Instant::now());
                let sock = self.sock.take();
                self.sleep(sock.as_ref(), Some(wait.max(Duration::from_millis(1))));
                self.sock = sock;
            }
        }
    }

    /// Sleeps in poll until the socket (readable, or writable when output is pending), a
    /// submission kick or the timeout.
    fn sleep(&mut self, sock: Option<&TcpStream>, timeout: Option<Duration>) {
        self.shared.sleeping.store(true, Ordering::SeqCst);
        if self.can_accept() || self.shared.stop.load(Ordering::SeqCst) {
            self.shared.sleeping.store(false, Ordering::SeqCst);
            return;
        }
        let mut fds = [
            libc::pollfd {
                fd: self.shared.sq_efd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: -1,
                events: 0,
                revents: 0,
            },
        ];
        if let Some(s) = sock {
            fds[1].fd = s.as_raw_fd();
            fds[1].events = libc::POLLIN;
            if self.conn.wants_write() {
                fds[1].events |= libc::POLLOUT;
            }
        }
        let ms = timeout.map_or(-1, |d| d.as_millis().min(60_000) as i32);
        // SAFETY: a valid array of two pollfds on the stack.
        unsafe {
            libc::poll(fds.as_mut_ptr(), 2, ms);
        }
        self.shared.sleeping.store(false, Ordering::SeqCst);
        if fds[1].revents != 0 {
            self.conn.wake_rx();
        }
        if fds[0].revents != 0 {
            efd_drain(self.shared.sq_efd.as_raw_fd());
        }
    }

    /// One login attempt, in this thread; on success the connection is bound and in-flight
    /// commands resent.
    fn try_login(&mut self) -> Result<()> {
        let r = open(&self.cfg, self.isid);
        self.adopt(r)
    }

    /// The connection failed: drop it, requeue what was in flight, and log in again until the
    /// reconnect timeout; then fail everything and go Down.
    fn lost(&mut self, e: Error) {
        self.drop_connection(&e);
        let deadline = Instant::now() + self.cfg.reconnect_timeout;
        let last = loop {
            if self.shared.stop.load(Ordering::SeqCst) {
                return;
            }
            match self.try_login() {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => break e,
                Err(_) => {}
            }
            let pause = self
                .cfg
                .reconnect_interval
                .min(deadline.saturating_duration_since(Instant::now()));
            std::thread::sleep(pause);
        };
        self.give_up(&last);
    }

    /// Logs out (waiting up to a second for commands in flight and for the answer), then
    /// fails whatever is left.
    fn shutdown(&mut self) {
        let shared = self.shared.clone();
        let mut sig = false;
        if let Some(sock) = self.sock.take() {
            let deadline = Instant::now() + Duration::from_secs(1);
            let mut logout_sent = false;
            let mut wire = SockWire(&sock);
            while Instant::now() < deadline {
                if !logout_sent && self.conn.busy() == 0 {
                    self.conn.queue_logout();
                    logout_sent = true;
                }
                let mut out = |c| Self::push_completion(&shared, &mut sig, c);
                if self.conn.flush(&mut wire, &mut out).is_err()
                    || self.conn.receive(&mut wire, &mut out).is_err()
                    || self.conn.logged_out()
                {
                    break;
                }
                let mut p = libc::pollfd {
                    fd: sock.as_raw_fd(),
                    events: libc::POLLIN
                        | if self.conn.wants_write() {
                            libc::POLLOUT
                        } else {
                            0
                        },
                    revents: 0,
                };
                // SAFETY: one valid pollfd on the stack.
                unsafe {
                    libc::poll(&mut p, 1, 50);
                }
                self.conn.wake_rx();
            }
            let _ = sock.shutdown(std::net::Shutdown::Both);
        }
        self.conn.fail_all(IoError::Shutdown, &mut |c| {
            Self::push_completion(&shared, &mut sig, c)
        });
        self.signalled |= sig;
        self.set_state(State::Closed);
        self.publish();
    }
}

/// Epoll data of the socket, the timer and the login signal in an inline session's set.
const EV_SOCK: u64 = 1;
const EV_TIMER: u64 = 2;
const EV_LOGIN: u64 = 3;

type LoginResult = Result<(TcpStream, LoggedIn)>;

/// A session driven from the caller's thread ([`Drive::Inline`]): the same [`IoThread`]
/// state, stepped by [`Session::drive`] instead of a loop, with readiness from an epoll set
/// the caller polls. Logins (after a lost connection) run on a helper thread.
struct Inline {
    io: IoThread,
    epoll: Epoll,
    timer: TimerFd,
    /// When the timer fires (None: disarmed).
    timer_at: Option<Instant>,
    /// The socket's registered events (0: not registered).
    sock_events: EpollFlags,
    /// The login helper, if one runs.
    login: Option<JoinHandle<LoginResult>>,
    /// The login eventfd was signalled to bring the caller back (a bounded drive).
    woken: bool,
}

impl Inline {
    fn new(io: IoThread) -> io::Result<Inline> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        epoll.add(&timer, EpollEvent::new(EpollFlags::EPOLLIN, EV_TIMER))?;
        epoll.add(
            &io.shared.login_efd,
            EpollEvent::new(EpollFlags::EPOLLIN, EV_LOGIN),
        )?;
        let mut i = Inline {
            io,
            epoll,
            timer,
            timer_at: None,
            sock_events: EpollFlags::empty(),
            login: None,
            woken: false,
        };
        i.watch_socket()?;
        Ok(i)
    }

    /// Registers (or updates) the socket's events: readable, and writable while output waits.
    fn watch_socket(&mut self) -> io::Result<()> {
        let Some(sock) = &self.io.sock else {
            self.sock_events = EpollFlags::empty();
            return Ok(());
        };
        let mut want = EpollFlags::EPOLLIN;
        if self.io.conn.wants_write() {
            want |= EpollFlags::EPOLLOUT;
        }
        if want == self.sock_events {
            return Ok(());
        }
        let mut ev = EpollEvent::new(want, EV_SOCK);
        if self.sock_events.is_empty() {
            self.epoll.add(sock, ev)?;
        } else {
            self.epoll.modify(sock, &mut ev)?;
        }
        self.sock_events = want;
        Ok(())
    }

    /// Arms the timer for `at` unless it already fires no later.
    fn arm_timer(&mut self, at: Instant) {
        let now = Instant::now();
        if self.timer_at.is_some_and(|t| t > now && t <= at) {
            return;
        }
        let d = at
            .saturating_duration_since(now)
            .max(Duration::from_millis(1));
        // A failure leaves the timer as it was; the caller's next drive checks the clock anyway.
        let _ = self.timer.set(
            Expiration::OneShot(TimeSpec::from_duration(d)),
            TimerSetTimeFlags::empty(),
        );
        self.timer_at = Some(at);
    }

    /// Starts a login helper that tries until `deadline` (one attempt if it has passed).
    fn start_login(&mut self, deadline: Instant) {
        let cfg = self.io.cfg.clone();
        let isid = self.io.isid;
        let shared = self.io.shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("iscsi-login-{}", short_name(&cfg.target)))
            .spawn(move || {
                let r = loop {
                    match open(&cfg, isid) {
                        Ok(x) => break Ok(x),
                        Err(e)
                            if Instant::now() >= deadline || shared.stop.load(Ordering::SeqCst) =>
                        {
                            break Err(e)
                        }
                        Err(_) => std::thread::sleep(
                            cfg.reconnect_interval
                                .min(deadline.saturating_duration_since(Instant::now())),
                        ),
                    }
                };
                efd_signal(&shared.login_efd);
                r
            });
        match spawned {
            Ok(h) => self.login = Some(h),
            Err(e) => {
                warn!(self.io.cfg.logger, "cannot start an iSCSI login thread"; "error" => %e);
            }
        }
    }

    /// The connection failed: as [`IoThread::lost`], but the logins run on a helper.
    fn lost(&mut self, e: Error) {
        self.io.drop_connection(&e);
        self.sock_events = EpollFlags::empty();
        if self.login.is_none() {
            self.start_login(Instant::now() + self.io.cfg.reconnect_timeout);
        }
    }

    /// Takes the login helper's result, if it has one.
    fn reap_login(&mut self) {
        if !self.login.as_ref().is_some_and(|h| h.is_finished()) {
            return;
        }
        efd_drain(self.io.shared.login_efd.as_raw_fd());
        let r = match self.login.take().map(|h| h.join()) {
            Some(Ok(r)) => r,
            _ => Err(Error::Io(io::Error::other("login thread panicked"))),
        };
        let reconnecting = self.io.state() == State::Reconnecting;
        match self.io.adopt(r) {
            Ok(()) => {
                if let Err(e) = self.watch_socket() {
                    return self.lost(Error::Io(e));
                }
            }
            Err(e) if reconnecting => return self.io.give_up(&e),
            Err(_) => self.io.fail_ready(),
        }
        self.io.publish();
    }

    /// Sends what was submitted; nothing else (see [`Session::send`]). Completions it queues
    /// (commands failed at once) make the set readable, so the caller's poll comes back for them.
    fn send(&mut self) {
        let queued = self.io.shared.cq.len();
        self.send_only();
        if self.io.shared.cq.len() > queued {
            efd_signal(&self.io.shared.login_efd);
            self.woken = true;
        }
    }

    fn send_only(&mut self) {
        if self.io.sock.is_none() || self.login.is_some() {
            return self.drive();
        }
        let accepted = self.io.accept();
        if accepted == 0 && !self.io.conn.wants_write() {
            return;
        }
        let Some(sock) = self.io.sock.take() else {
            return;
        };
        let mut wire = SockWire(&sock);
        let r = self.io.emit(|c, mut out| c.flush(&mut wire, &mut out));
        self.io.sock = Some(sock);
        self.io.publish();
        match r.and_then(|_| self.watch_socket().map_err(Error::Io)) {
            Ok(()) => {}
            Err(e) => self.lost(e),
        }
    }

    fn drive(&mut self) {
        // No epoll_wait to learn what is ready: the socket is simply read (a read that finds
        // nothing costs what the epoll_wait would), the timer is due by the clock, and the
        // login helper says it finished.
        self.io.conn.wake_rx();
        if self.timer_at.is_some_and(|t| Instant::now() >= t) {
            efd_drain(self.timer.as_fd().as_raw_fd());
            self.timer_at = None;
        }
        self.reap_login();
        if std::mem::take(&mut self.woken) {
            efd_drain(self.io.shared.login_efd.as_raw_fd());
        }
        // Bounded: a target that keeps the socket full cannot keep the caller here; when the
        // bound is reached the set is made readable again so the caller comes back.
        let mut rounds = 0;
        loop {
            rounds += 1;
            if rounds > 64 {
                efd_signal(&self.io.shared.login_efd);
                self.woken = true;
                break;
            }
            let accepted = self.io.accept();
            let Some(sock) = self.io.sock.take() else {
                if self.login.is_none() && self.io.conn.busy() > 0 {
                    if self.io.login_due() {
                        // Down: one attempt, in the background; commands wait for it.
                        self.start_login(Instant::now());
                    } else {
                        self.io.fail_ready();
                    }
                }
                self.io.publish();
                return;
            };
            let r = self.io.exchange(&sock);
            self.io.sock = Some(sock);
            let ((w, r), next_tick) = match r {
                Ok(x) => x,
                Err(e) => {
                    self.io.publish();
                    self.lost(e);
                    return;
                }
            };
            self.io.publish();
            self.arm_timer(next_tick);
            if accepted == 0 && w == 0 && r == 0 && !self.io.can_accept() {
                break;
            }
        }
        if let Err(e) = self.watch_socket() {
            self.lost(Error::Io(e));
        }
    }
}
