//! The data path of a striped disk: one request in, SCSI commands to every server in parallel,
//! one completion out.
//!
//! A [`Striper`] belongs to one event loop (a tapdisk ring, or the blocking front end
//! [`SyncStriper`]). It owns one iSCSI [`Session`] (queue and connection) per server and turns
//! each request into commands:
//!
//! 1. The request's byte range is cut at stripe-unit boundaries; each chunk's place comes from
//!    the [`Geometry`] arithmetic (extent index and offset) and the *resolved* extent table,
//!    a copy of the mapping file cached in the data path: extent index and replica -> (server,
//!    LUN, first LBA).
//! 2. Chunks bound for the same extent at consecutive offsets are merged into one piece, with
//!    the memory of the chunks gathered into one iovec list (the contiguity fix of the thesis's
//!    chapter 6: a 1 MiB request over two stripes is two commands of 512 KiB, not sixteen of
//!    64 KiB). A piece with more buffers than one command carries is split.
//! 3. Reads go to one replica: the first that is neither stale nor on a server that is down,
//!    and on an error to the next. Writes and discards (UNMAP) go to every replica and complete
//!    when all have answered; the request succeeds if every piece reached at least one replica,
//!    and replicas that missed a write are marked *stale* (never read again until resynced;
//!    the marks are kept in `MAP.stale` beside the mapping file so a restarted tapdisk knows).
//!    A flush is SYNCHRONIZE CACHE to every LUN of every server.
//! 4. A command failing with ILLEGAL REQUEST (LBA out of range, LUN not supported) says the
//!    cached mapping may be stale (the block-map patent's rule): the mapping file is read again,
//!    and if the extent moved, the command is sent once more to its new place.
//!
//! Servers that go away are reconnected by the initiator (commands wait up to the reconnect
//! timeout, then fail; a server that comes back takes commands again). Nothing here allocates
//! or locks per request once the per-tag scratch vectors have grown to the largest request
//! seen: the command slots, iovec lists and piece tables are reused.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

pub use iscsi::Drive;
use iscsi::{scsi, Command, Config, IoError, Registration, Session, State, SubmitError};
use nix::sys::eventfd::EventFd;

pub use crate::disk::{parse_stale_marks, Disk, ServerStats};
use crate::map::{Geometry, StripeMap};
pub use crate::options::{Options, BLOCK};
use crate::Error;

/// Most buffers in one SCSI command (the initiator's limit).
const CMD_IOV: usize = iscsi::conn::MAX_IOV;

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read into the iovecs.
    Read,
    /// Write from the iovecs.
    Write,
    /// Make acknowledged writes durable on every server.
    Flush,
    /// UNMAP the range.
    Discard,
}

/// Where one replica of one extent lives, resolved to this loop's server numbers.
#[derive(Debug, Clone, Copy)]
struct Resolved {
    server: u16,
    lun: u16,
    /// LBA of the extent's first byte.
    lba: u64,
}

struct Server {
    session: Session,
    stats: Arc<ServerStats>,
    /// LUNs this disk uses on it (for flushes).
    luns: Vec<u16>,
    /// Commands refused with a full queue, in order.
    backlog: VecDeque<Command>,
    /// Reconnects seen so far (to notice new ones).
    reconnects: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Discard,
    Flush,
}

/// One SCSI command of a request.
#[derive(Debug, Clone, Copy)]
struct Cmd {
    req: u32,
    kind: Kind,
    /// Extent index and replica (unused for flushes).
    index: u32,
    replica: u32,
    /// Byte offset in the extent.
    ext_off: u64,
    bytes: u64,
    /// Server and LUN (flushes; others resolve through the table at submit).
    server: u16,
    lun: u16,
    /// Range of the request's iovec scratch.
    iov_start: u32,
    iovcnt: u32,
    /// Write group (pieces and their replicas) for the all-replicas rule.
    group: u32,
    /// Replicas tried (reads), bit per replica.
    tried: u8,
    refreshed: bool,
    failed: bool,
}

const IDLE_CMD: Cmd = Cmd {
    req: 0,
    kind: Kind::Read,
    index: 0,
    replica: 0,
    ext_off: 0,
    bytes: 0,
    server: 0,
    lun: 0,
    iov_start: 0,
    iovcnt: 0,
    group: 0,
    tried: 0,
    refreshed: false,
    failed: false,
};

#[derive(Default)]
struct Req {
    active: bool,
    op: Option<Op>,
    outstanding: u32,
    err: i32,
    /// The commands (slot numbers).
    cmds: Vec<u32>,
    /// Gathered buffers of every command.
    iovs: Vec<libc::iovec>,
    /// Per write group: replicas that succeeded.
    groups: Vec<u8>,
    /// Chunk scratch: (piece, request byte offset, bytes).
    chunks: Vec<(u32, u64, u64)>,
    /// Piece scratch: (index, ext_off, bytes, chunks).
    pieces: Vec<(u32, u64, u64, u32)>,
    /// The request holds its regions in the write-intent log: (offset, len).
    intent: Option<(u64, u64)>,
}

/// A write waiting for its regions to be marked in the write-intent record.
#[derive(Clone, Copy)]
struct Waiting {
    tag: u32,
    op: Op,
    offset: u64,
    len: u64,
    iov: *const libc::iovec,
    iovcnt: u32,
}

/// Epoll data of the intent log's waker in the striper's set (servers are numbered from 0).
const EV_WAKER: u64 = u64::MAX;

/// The striping engine of one event loop (see the module docs).
pub struct Striper {
    disk: Arc<Disk>,
    geo: Geometry,
    replicas: u32,
    /// `index * replicas + replica`.
    table: Vec<Resolved>,
    servers: Vec<Server>,
    reqs: Box<[Req]>,
    cmds: Vec<Cmd>,
    free: Vec<u32>,
    epoll: Epoll,
    done: Vec<(u32, i32)>,
    stale_marks: Vec<(u32, u32)>,
    /// Writes waiting for the write-intent record, in order.
    waiting: VecDeque<Waiting>,
    /// Readable when waiting writes should try again.
    waker: Option<Arc<EventFd>>,
}

// SAFETY: the raw iovec pointers in the scratch vectors point into memory the caller of
// `submit` keeps valid until the request completes; a Striper is used by one thread at a time.
unsafe impl Send for Striper {}

/// Adds `fd` (a session's completion descriptor) to `ep`, edge-triggered, tagged `data`.
fn epoll_add(ep: &Epoll, fd: RawFd, data: u64) -> io::Result<()> {
    // SAFETY: `fd` is the poll descriptor of a session the striper owns and keeps open for
    // as long as the epoll set lives (sessions are dropped with the striper, after it).
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let ev = EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLET, data);
    ep.add(fd, ev).map_err(io::Error::from)
}

impl Striper {
    /// A striper for `tags` concurrent requests: one session per server of the disk.
    pub fn new(disk: Arc<Disk>, tags: u32) -> Result<Striper, Error> {
        let geo = disk.geometry;
        let mut s = Striper {
            geo,
            replicas: geo.replicas,
            table: Vec::new(),
            servers: Vec::new(),
            reqs: (0..tags).map(|_| Req::default()).collect(),
            cmds: Vec::new(),
            free: Vec::new(),
            epoll: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
                .map_err(|e| Error::io(Path::new("epoll"), e.into()))?,
            done: Vec::with_capacity(tags as usize),
            stale_marks: Vec::new(),
            waiting: VecDeque::new(),
            waker: None,
            disk,
        };
        if let Some(log) = &s.disk.intent {
            let w = log
                .waker()
                .map_err(|e| Error::io(Path::new("eventfd"), e))?;
            epoll_add(&s.epoll, w.as_raw_fd(), EV_WAKER)
                .map_err(|e| Error::io(Path::new("epoll"), e))?;
            s.waker = Some(w);
        }
        let map = s.disk.map();
        s.resolve(&map)?;
        // Preallocate command slots for the common case (pieces of every stripe, replicas).
        let n = (tags as usize) * (geo.stripes as usize + 1) * geo.replicas as usize;
        s.cmds = vec![IDLE_CMD; n];
        s.free = (0..n as u32).rev().collect();
        Ok(s)
    }

    /// Builds the resolved table from `map`, connecting to servers not yet known.
    fn resolve(&mut self, map: &StripeMap) -> Result<(), Error> {
        let mut table = Vec::with_capacity(map.extents.len() * self.replicas as usize);
        for reps in &map.extents {
            for x in reps {
                let server = match self
                    .servers
                    .iter()
                    .position(|s| s.stats.portal == x.portal && s.stats.target == x.target)
                {
                    Some(i) => i,
                    None => {
                        let mut luns: Vec<u16> = map
                            .extents
                            .iter()
                            .flatten()
                            .filter(|y| y.portal == x.portal && y.target == x.target)
                            .map(|y| y.lun)
                            .collect();
                        luns.sort_unstable();
                        luns.dedup();
                        self.connect(&x.portal, &x.target, luns)?
                    }
                };
                let sv = &mut self.servers[server];
                if !sv.luns.contains(&x.lun) {
                    sv.luns.push(x.lun);
                }
                table.push(Resolved {
                    server: server as u16,
                    lun: x.lun,
                    lba: x.addr / BLOCK,
                });
            }
        }
        self.table = table;
        Ok(())
    }

    fn connect(&mut self, portal: &str, target: &str, luns: Vec<u16>) -> Result<usize, Error> {
        let o = &self.disk.opts;
        let mut cfg = Config::new(portal, target);
        if self.disk.pr_key.load(Ordering::SeqCst) != 0 {
            // Every login (the first, each reconnect) registers the writer's key and keeps
            // its reservation; a fenced disk has withdrawn the key.
            cfg.registration = Some(Registration {
                key: self.disk.pr_key.clone(),
                luns,
            });
        }
        cfg.queue_depth = o.queue_depth;
        cfg.reconnect_timeout = o.reconnect_timeout;
        cfg.command_timeout = o.command_timeout;
        cfg.login_timeout = Duration::from_secs(5);
        cfg.logger = o.logger.clone();
        cfg.drive = o.drive;
        let named =
            |e: iscsi::Error| Error::Master(format!("server {portal} target {target}: {e}"));
        // With replicas, a server that is down now is used once it returns (its reads fail
        // over, its writes mark replicas stale); without, the disk cannot be served.
        let (session, down) = if self.replicas > 1 {
            Session::connect_or_down(&cfg).map_err(named)?
        } else {
            (Session::connect(&cfg).map_err(named)?, None)
        };
        let i = self.servers.len();
        epoll_add(&self.epoll, session.poll_fd(), i as u64)
            .map_err(|e| Error::io(Path::new("epoll"), e))?;
        if o.drive == Drive::Thread {
            session.arm();
        }
        let stats = self.disk.server_stats(portal, target);
        let st = if down.is_some() {
            State::Down
        } else {
            State::Up
        };
        stats.state.store(st as u8, Ordering::Relaxed);
        self.servers.push(Server {
            session,
            stats,
            luns: Vec::new(),
            backlog: VecDeque::with_capacity(64),
            reconnects: 0,
        });
        Ok(i)
    }

    /// A descriptor that polls readable when commands completed (then call [`Striper::poll`]).
    pub fn poll_fd(&self) -> RawFd {
        self.epoll.0.as_raw_fd()
    }

    /// Requests finished since the last call: `(tag, 0 or -errno)`.
    pub fn take_done(&mut self, out: &mut impl FnMut(u32, i32)) {
        for &(t, r) in &self.done {
            out(t, r);
        }
        self.done.clear();
    }

    fn alloc_cmd(&mut self, c: Cmd) -> u32 {
        match self.free.pop() {
            Some(i) => {
                self.cmds[i as usize] = c;
                i
            }
            None => {
                self.cmds.push(c);
                (self.cmds.len() - 1) as u32
            }
        }
    }

    /// Starts a request.
    ///
    /// # Safety
    /// For reads and writes, `iov[..iovcnt]` and the memory it points to must stay valid (and
    /// untouched by the caller) until `tag` is reported done; their lengths must add up to
    /// `len`. `tag` must be below the tag count and not in flight.
    pub unsafe fn submit(
        &mut self,
        tag: u32,
        op: Op,
        offset: u64,
        len: u64,
        iov: *const libc::iovec,
        iovcnt: u32,
    ) {
        let Some(req) = self.reqs.get_mut(tag as usize) else {
            self.done.push((tag, -libc::EINVAL));
            return;
        };
        if req.active {
            self.done.push((tag, -libc::EBUSY));
            return;
        }
        if self.disk.fenced() {
            self.disk.fenced_requests.fetch_add(1, Ordering::Relaxed);
            self.done.push((tag, -libc::EIO));
            return;
        }
        let mut intent = None;
        if matches!(op, Op::Write | Op::Discard) {
            if let Some(log) = &self.disk.intent {
                if offset.checked_add(len).is_some_and(|e| e <= self.geo.size) && len > 0 {
                    if !log.take(offset, len) {
                        self.waiting.push_back(Waiting {
                            tag,
                            op,
                            offset,
                            len,
                            iov,
                            iovcnt,
                        });
                        return;
                    }
                    intent = Some((offset, len));
                }
            }
        }
        let req = &mut self.reqs[tag as usize];
        req.intent = intent;
        req.active = true;
        req.op = Some(op);
        req.outstanding = 0;
        req.err = 0;
        req.cmds.clear();
        req.iovs.clear();
        req.groups.clear();
        if op == Op::Flush {
            self.plan_flush(tag);
        } else {
            let end = offset.checked_add(len);
            if len == 0
                || !offset.is_multiple_of(BLOCK)
                || !len.is_multiple_of(BLOCK)
                || end.is_none_or(|e| e > self.geo.size)
            {
                let req = &mut self.reqs[tag as usize];
                req.active = false;
                if let (Some((o, l)), Some(log)) = (req.intent.take(), &self.disk.intent) {
                    log.put(o, l);
                }
                self.done.push((tag, -libc::EINVAL));
                return;
            }
            // SAFETY: forwarded from the caller.
            unsafe { self.plan_data(tag, op, offset, len, iov, iovcnt) };
        }
        let n = self.reqs[tag as usize].cmds.len();
        self.reqs[tag as usize].outstanding = n as u32;
        if n == 0 {
            self.finish(tag);
            return;
        }
        for k in 0..n {
            let c = self.reqs[tag as usize].cmds[k];
            self.send(c);
        }
        self.send_all();
    }

    /// Sends what was submitted to every server (wakes their IO threads, or writes inline;
    /// an inline session that fails commands at once makes its poll fd readable for them).
    fn send_all(&mut self) {
        for s in &mut self.servers {
            s.session.send();
        }
    }

    fn plan_flush(&mut self, tag: u32) {
        for si in 0..self.servers.len() {
            for li in 0..self.servers[si].luns.len() {
                let lun = self.servers[si].luns[li];
                let c = self.alloc_cmd(Cmd {
                    req: tag,
                    kind: Kind::Flush,
                    server: si as u16,
                    lun,
                    ..IDLE_CMD
                });
                self.reqs[tag as usize].cmds.push(c);
            }
        }
    }

    /// Cuts a read, write or discard into pieces, merges them per extent and builds commands.
    ///
    /// # Safety
    /// As [`Striper::submit`].
    unsafe fn plan_data(
        &mut self,
        tag: u32,
        op: Op,
        offset: u64,
        len: u64,
        iov: *const libc::iovec,
        iovcnt: u32,
    ) {
        let geo = self.geo;
        let replicas = self.replicas;
        let mut req = std::mem::take(&mut self.reqs[tag as usize]);
        req.chunks.clear();
        req.pieces.clear();
        // 1. Chunks at stripe-unit boundaries, each joined to the open piece of its extent
        //    when it continues it.
        let mut off = offset;
        let end = offset + len;
        while off < end {
            let loc = geo.locate(off);
            let n = loc.run.min(end - off);
            let p = match req
                .pieces
                .iter()
                .rposition(|p| p.0 == loc.index && p.1 + p.2 == loc.offset)
            {
                Some(p) => {
                    req.pieces[p].2 += n;
                    req.pieces[p].3 += 1;
                    p
                }
                None => {
                    req.pieces.push((loc.index, loc.offset, n, 1));
                    req.pieces.len() - 1
                }
            };
            req.chunks.push((p as u32, off - offset, n));
            off += n;
        }
        // 2. Per piece, gather its chunks' memory, then cut into commands of at most CMD_IOV
        //    buffers; writes and discards get one command per replica.
        let src: &[libc::iovec] = if op == Op::Discard || iovcnt == 0 {
            &[]
        } else {
            // SAFETY: the caller guarantees `iov[..iovcnt]` is valid until completion.
            unsafe { std::slice::from_raw_parts(iov, iovcnt as usize) }
        };
        for p in 0..req.pieces.len() {
            let (index, ext_off, bytes, _) = req.pieces[p];
            if op == Op::Discard {
                self.push_piece(&mut req, tag, op, index, ext_off, bytes, 0, 0, replicas);
                continue;
            }
            let first_iov = req.iovs.len();
            for ci in 0..req.chunks.len() {
                let (cp, roff, n) = req.chunks[ci];
                if cp as usize == p {
                    gather(src, roff, n, &mut req.iovs);
                }
            }
            // Split at CMD_IOV buffers.
            let mut start = first_iov;
            let mut done = 0u64;
            while start < req.iovs.len() {
                let stop = (start + CMD_IOV).min(req.iovs.len());
                let b: u64 = req.iovs[start..stop].iter().map(|v| v.iov_len as u64).sum();
                self.push_piece(
                    &mut req,
                    tag,
                    op,
                    index,
                    ext_off + done,
                    b,
                    start as u32,
                    (stop - start) as u32,
                    replicas,
                );
                done += b;
                start = stop;
            }
            debug_assert_eq!(done, bytes);
        }
        self.reqs[tag as usize] = req;
    }

    #[allow(clippy::too_many_arguments)]
    fn push_piece(
        &mut self,
        req: &mut Req,
        tag: u32,
        op: Op,
        index: u32,
        ext_off: u64,
        bytes: u64,
        iov_start: u32,
        iovcnt: u32,
        replicas: u32,
    ) {
        let base = Cmd {
            req: tag,
            index,
            ext_off,
            bytes,
            iov_start,
            iovcnt,
            ..IDLE_CMD
        };
        match op {
            Op::Read => {
                let c = self.alloc_cmd(Cmd {
                    kind: Kind::Read,
                    replica: u32::MAX,
                    ..base
                });
                req.cmds.push(c);
            }
            Op::Write | Op::Discard => {
                let group = req.groups.len() as u32;
                req.groups.push(0);
                for r in 0..replicas {
                    let c = self.alloc_cmd(Cmd {
                        kind: if op == Op::Write {
                            Kind::Write
                        } else {
                            Kind::Discard
                        },
                        replica: r,
                        group,
                        ..base
                    });
                    req.cmds.push(c);
                }
            }
            Op::Flush => {}
        }
    }

    /// Picks the replica a read goes to: not stale, not tried, on a server that is up if
    /// possible. None: no replica left.
    fn pick_replica(&self, c: &Cmd) -> Option<u32> {
        let mut fallback = None;
        for r in 0..self.replicas {
            if c.tried & (1 << r) != 0 || self.disk.is_stale(c.index, r) {
                continue;
            }
            let res = self.table[(c.index * self.replicas + r) as usize];
            if self.servers[res.server as usize].session.state() == State::Up {
                return Some(r);
            }
            fallback.get_or_insert(r);
        }
        fallback
    }

    /// Builds the SCSI command of slot `ci` (choosing the replica of a read); None when the
    /// command failed at once (no replica left).
    fn prepare(&mut self, ci: u32) -> Option<(u16, Command)> {
        let mut c = self.cmds[ci as usize];
        if c.kind == Kind::Read {
            match self.pick_replica(&c) {
                Some(r) => {
                    c.replica = r;
                    c.tried |= 1 << r;
                }
                None => {
                    self.cmd_done(ci, Err(-libc::EIO));
                    return None;
                }
            }
            self.cmds[ci as usize] = c;
        }
        if c.kind == Kind::Flush {
            return Some((
                c.server,
                Command::no_data(ci, c.lun, scsi::synchronize_cache16(0, 0)),
            ));
        }
        let res = self.table[(c.index * self.replicas + c.replica) as usize];
        let lba = res.lba + c.ext_off / BLOCK;
        let blocks = (c.bytes / BLOCK) as u32;
        let iov = self.reqs[c.req as usize].iovs[c.iov_start as usize..].as_ptr();
        let cmd = match c.kind {
            Kind::Read => Command::read(
                ci,
                res.lun,
                scsi::read16(lba, blocks),
                c.bytes as u32,
                iov,
                c.iovcnt,
            ),
            Kind::Write => Command::write(
                ci,
                res.lun,
                scsi::write16(lba, blocks, false),
                c.bytes as u32,
                iov,
                c.iovcnt,
            ),
            _ => Command::unmap(ci, res.lun, lba, blocks),
        };
        Some((res.server, cmd))
    }

    /// Sends command slot `ci` (first time or again), behind any backlog of its server.
    fn send(&mut self, ci: u32) {
        let Some((server, cmd)) = self.prepare(ci) else {
            return;
        };
        let sv = &mut self.servers[server as usize];
        if !sv.backlog.is_empty() {
            sv.backlog.push_back(cmd);
            return;
        }
        // SAFETY: the iovecs live in the request's scratch vector, which is not touched until
        // the request completes, and point into the caller's memory, valid until then too
        // (`submit`'s contract).
        match unsafe { sv.session.submit_quiet(cmd) } {
            Ok(()) => {}
            Err(SubmitError::Full) => sv.backlog.push_back(cmd),
            Err(SubmitError::Invalid(_)) => self.cmd_done(ci, Err(-libc::EINVAL)),
        }
    }

    /// Submits backlogged commands of server `si` while its queue takes them.
    fn drain_backlog(&mut self, si: usize) {
        while let Some(&cmd) = self.servers[si].backlog.front() {
            // SAFETY: as in `send`: the command's buffers stay valid until its completion.
            match unsafe { self.servers[si].session.submit_quiet(cmd) } {
                Ok(()) => {
                    self.servers[si].backlog.pop_front();
                }
                Err(SubmitError::Full) => break,
                Err(SubmitError::Invalid(_)) => {
                    self.servers[si].backlog.pop_front();
                    self.cmd_done(cmd.tag, Err(-libc::EINVAL));
                }
            }
        }
    }

    /// Collects completions from every server (call when [`Striper::poll_fd`] is readable,
    /// or to poll).
    pub fn poll(&mut self) {
        let mut evs = [EpollEvent::empty(); 16];
        // Consume the edge notifications (the sessions' eventfds are drained below).
        while let Ok(16) = self.epoll.wait(&mut evs, EpollTimeout::ZERO) {}
        if let Some(w) = &self.waker {
            // Non-blocking: nothing to read is fine.
            let _ = w.read();
        }
        if !self.waiting.is_empty() {
            self.retry_waiting();
        }
        let inline = self.disk.opts.drive == Drive::Inline;
        for si in 0..self.servers.len() {
            if inline {
                self.servers[si].session.drive();
            } else {
                self.servers[si].session.clear_completion_fd();
            }
            loop {
                while let Some(c) = self.servers[si].session.pop_completion() {
                    self.on_completion(si, c.tag, c.result);
                }
                if inline || self.servers[si].session.arm() {
                    break;
                }
            }
            let sv = &self.servers[si];
            sv.stats
                .state
                .store(sv.session.state() as u8, Ordering::Relaxed);
            let rc = sv.session.reconnects();
            if rc != sv.reconnects {
                sv.stats
                    .reconnects
                    .fetch_add(rc - sv.reconnects, Ordering::Relaxed);
                self.servers[si].reconnects = rc;
            }
            if !self.servers[si].backlog.is_empty() {
                self.drain_backlog(si);
            }
        }
        // Retries and backlog submitted while handling completions.
        self.send_all();
    }

    /// Tries the writes waiting for the write-intent record again, in order (those whose
    /// regions are still unmarked keep waiting; a fenced disk fails them).
    fn retry_waiting(&mut self) {
        for _ in 0..self.waiting.len() {
            let Some(w) = self.waiting.pop_front() else {
                break;
            };
            // SAFETY: the caller of `submit` keeps the iovecs valid until the tag is reported
            // done, which it has not been.
            unsafe { self.submit(w.tag, w.op, w.offset, w.len, w.iov, w.iovcnt) };
        }
    }

    fn on_completion(&mut self, si: usize, ci: u32, result: Result<u32, IoError>) {
        let Some(c) = self.cmds.get(ci as usize).copied() else {
            return;
        };
        match result {
            Ok(_) => {
                let st = &self.servers[si].stats;
                st.ios.fetch_add(1, Ordering::Relaxed);
                if matches!(c.kind, Kind::Read | Kind::Write) {
                    st.bytes.fetch_add(c.bytes, Ordering::Relaxed);
                }
                self.cmd_done(ci, Ok(()));
            }
            Err(e) => {
                let st = &self.servers[si].stats;
                st.errors.fetch_add(1, Ordering::Relaxed);
                if e == IoError::Status(scsi::STATUS_RESERVATION_CONFLICT) && c.kind != Kind::Read {
                    // Another writer holds the reservation: we were fenced at the target.
                    self.disk.fenced_writes.fetch_add(1, Ordering::Relaxed);
                    self.disk.fence(&format!(
                        "server {} refused a write with RESERVATION CONFLICT: another writer took the disk over",
                        st.portal
                    ));
                    self.cmd_done(ci, Err(-libc::EIO));
                    return;
                }
                slog::debug!(self.disk.opts.logger, "command failed"; "server" => &st.portal,
                    "error" => %e);
                // A stale mapping? Read the file again and retry once at the new place.
                if !c.refreshed && c.kind != Kind::Flush && mapping_error(&e) {
                    self.cmds[ci as usize].refreshed = true;
                    let map = self.disk.refresh();
                    if let Err(e) = self.resolve(&map) {
                        slog::warn!(self.disk.opts.logger, "cannot use the refreshed mapping";
                            "error" => %e);
                    } else {
                        if c.kind == Kind::Read {
                            self.cmds[ci as usize].tried &= !(1 << c.replica);
                        }
                        self.send(ci);
                        return;
                    }
                }
                if c.kind == Kind::Read {
                    if self.pick_replica(&c).is_some() {
                        self.servers[si]
                            .stats
                            .failovers
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    // The next replica, if any (send fails the command when none is left).
                    self.send(ci);
                    return;
                }
                self.cmd_done(ci, Err(-libc::EIO));
            }
        }
    }

    fn cmd_done(&mut self, ci: u32, r: Result<(), i32>) {
        let c = self.cmds[ci as usize];
        let req = &mut self.reqs[c.req as usize];
        match r {
            Ok(()) => {
                if matches!(c.kind, Kind::Write | Kind::Discard) {
                    req.groups[c.group as usize] += 1;
                }
            }
            Err(e) => {
                self.cmds[ci as usize].failed = true;
                if matches!(c.kind, Kind::Read) {
                    req.err = e;
                }
            }
        }
        req.outstanding -= 1;
        if req.outstanding == 0 {
            self.finish(c.req);
        }
    }

    /// Every command of request `tag` answered: apply the replica rules and report it.
    fn finish(&mut self, tag: u32) {
        let mut req = std::mem::take(&mut self.reqs[tag as usize]);
        let mut err = req.err;
        let mut failed_servers = 0u64;
        for &ci in &req.cmds {
            let c = self.cmds[ci as usize];
            if c.failed {
                match c.kind {
                    Kind::Write | Kind::Discard => {
                        if req.groups[c.group as usize] == 0 {
                            err = -libc::EIO;
                        } else {
                            self.stale_marks.push((c.index, c.replica));
                        }
                    }
                    Kind::Flush => failed_servers |= 1 << (c.server.min(63)),
                    Kind::Read => {}
                }
            }
            self.free.push(ci);
        }
        if failed_servers != 0 {
            // Replicas on servers that could not flush are stale unless the extent has no
            // other replica that flushed (then the flush fails).
            let r = self.replicas as usize;
            for (k, res) in self.table.iter().enumerate() {
                if failed_servers & (1 << res.server.min(63)) == 0 {
                    continue;
                }
                let i = k / r;
                let others_ok = (0..r).any(|o| {
                    failed_servers & (1 << self.table[i * r + o].server.min(63)) == 0
                        && !self.disk.is_stale(i as u32, o as u32)
                });
                if others_ok {
                    self.stale_marks.push((i as u32, (k % r) as u32));
                } else {
                    err = -libc::EIO;
                }
            }
        }
        if !self.stale_marks.is_empty() {
            if !self.disk.mark_stale(&self.stale_marks) {
                // A replica missed the write and that cannot be recorded: not acknowledged.
                err = -libc::EIO;
            }
            self.stale_marks.clear();
        }
        if self.disk.fenced.load(Ordering::Relaxed) && err == 0 && req.op != Some(Op::Read) {
            // A write some replica refused as fenced is not acknowledged, even if another
            // replica took it before the takeover (the new writer resyncs that region).
            err = -libc::EIO;
        }
        if let (Some((o, l)), Some(log)) = (req.intent.take(), &self.disk.intent) {
            log.put(o, l);
        }
        req.active = false;
        self.reqs[tag as usize] = req;
        self.done.push((tag, err));
    }

    /// The disk.
    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }
}

/// Whether a command error says the extent is not where the cached mapping thinks.
fn mapping_error(e: &IoError) -> bool {
    match e {
        // ILLEGAL REQUEST: LBA out of range (0x21) or LUN not supported (0x25).
        IoError::Check(s) => s.key == 0x5 && (s.asc == 0x21 || s.asc == 0x25),
        _ => false,
    }
}

/// Appends to `out` the parts of `src` covering bytes `off..off + n` of their concatenation.
fn gather(src: &[libc::iovec], off: u64, n: u64, out: &mut Vec<libc::iovec>) {
    let mut pos = 0u64;
    let mut left = n;
    for v in src {
        let vl = v.iov_len as u64;
        if pos + vl <= off {
            pos += vl;
            continue;
        }
        let skip = off.saturating_sub(pos);
        let take = (vl - skip).min(left);
        out.push(libc::iovec {
            iov_base: (v.iov_base as usize + skip as usize) as *mut libc::c_void,
            iov_len: take as usize,
        });
        left -= take;
        pos += vl;
        if left == 0 {
            break;
        }
    }
}

/// A blocking front end over a [`Striper`] (one request at a time) for the NBD export and
/// tools.
pub struct SyncStriper {
    s: Striper,
}

impl SyncStriper {
    /// One striper with one tag.
    pub fn new(disk: Arc<Disk>) -> Result<SyncStriper, Error> {
        Ok(SyncStriper {
            s: Striper::new(disk, 1)?,
        })
    }

    fn run(&mut self, op: Op, offset: u64, iov: &[libc::iovec]) -> io::Result<()> {
        let len: u64 = iov.iter().map(|v| v.iov_len as u64).sum();
        // SAFETY: `iov` and its buffers are borrowed for this call, which waits for the
        // completion before returning.
        unsafe {
            self.s
                .submit(0, op, offset, len, iov.as_ptr(), iov.len() as u32)
        };
        self.wait()
    }

    fn wait(&mut self) -> io::Result<()> {
        loop {
            let mut res = None;
            self.s.take_done(&mut |_, r| res = Some(r));
            if let Some(r) = res {
                return if r == 0 {
                    Ok(())
                } else {
                    Err(io::Error::from_raw_os_error(-r))
                };
            }
            let mut p = libc::pollfd {
                fd: self.s.poll_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one live pollfd.
            unsafe { libc::poll(&mut p, 1, 100) };
            self.s.poll();
        }
    }

    /// Reads `buf` from `offset`.
    pub fn read(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        self.run(Op::Read, offset, &iov)
    }

    /// Writes `buf` at `offset`.
    pub fn write(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let iov = [libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        }];
        self.run(Op::Write, offset, &iov)
    }

    /// Flushes every server.
    pub fn flush(&mut self) -> io::Result<()> {
        self.run(Op::Flush, 0, &[])
    }

    /// UNMAPs a range.
    pub fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: a discard has no buffers.
        unsafe {
            self.s
                .submit(0, Op::Discard, offset, len, std::ptr::null(), 0)
        };
        self.wait()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_cuts_iovecs() {
        let a = [0u8; 100];
        let b = [0u8; 50];
        let src = [
            libc::iovec {
                iov_base: a.as_ptr() as *mut _,
                iov_len: 100,
            },
            libc::iovec {
                iov_base: b.as_ptr() as *mut _,
                iov_len: 50,
            },
        ];
        let mut out = Vec::new();
        gather(&src, 90, 30, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].iov_base as usize, a.as_ptr() as usize + 90);
        assert_eq!(out[0].iov_len, 10);
        assert_eq!(out[1].iov_base as usize, b.as_ptr() as usize);
        assert_eq!(out[1].iov_len, 20);
        out.clear();
        gather(&src, 0, 150, &mut out);
        assert_eq!(out.iter().map(|v| v.iov_len).sum::<usize>(), 150);
    }
}
