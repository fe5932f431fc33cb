//! The full-feature phase of one connection, as a state machine without threads: command slots,
//! sequence numbers and the CmdSN window, the transmit queue (SCSI Command PDUs with immediate
//! data, unsolicited and R2T-solicited Data-Out, NOP-Outs) written with `writev` straight from
//! the callers' iovecs, and the receive path that parses each header from a small staging
//! buffer and reads Data-In payloads with `readv` straight into the callers' iovecs.
//!
//! [`Conn`] talks to the network through a [`Wire`]; the session's IO thread gives it a
//! non-blocking socket, the fuzz target an in-memory script of target PDUs.
//!
//! Tags: the Initiator Task Tag of a command is `generation << 16 | slot`, with a 15-bit
//! generation bumped each time the slot is reused, so a PDU for a finished command never
//! reaches its successor. NOP-Out pings use tags with the top bit set.

use std::collections::VecDeque;
use std::io;
use std::time::{Duration, Instant};

use crate::error::{Error, IoError};
use crate::login::LoggedIn;
use crate::pdu::{self, Dir, Header, Limits, RESERVED_TAG};
use crate::scsi::{self, Cdb};
use crate::text::Params;

mod rx;
mod tx;

#[cfg(test)]
mod tests;

/// Most iovec entries one command may have.
pub const MAX_IOV: usize = 128;
/// Size of the receive staging buffer (headers and small payloads pass through it).
const STAGE: usize = 32 * 1024;
/// iovec entries in one transmit batch.
const TX_IOV: usize = 2 * MAX_IOV + 64;
/// Header bytes (BHS + header digest, padding + data digest) in one transmit batch.
const TX_ARENA: usize = 64 * 64;
/// Times a command is retried after reconnects or UNIT ATTENTION before it fails.
const MAX_RETRIES: u8 = 5;

/// The network side of a connection.
pub trait Wire {
    /// Reads into `iov` like `readv(2)`: `Ok(0)` at end of stream, `WouldBlock` when nothing
    /// is there yet.
    ///
    /// # Safety
    ///
    /// Every entry of `iov` must be valid for writes of its length.
    unsafe fn readv(&mut self, iov: &[libc::iovec]) -> io::Result<usize>;

    /// Writes from `iov` like `writev(2)`.
    ///
    /// # Safety
    ///
    /// Every entry of `iov` must be valid for reads of its length.
    unsafe fn writev(&mut self, iov: &[libc::iovec]) -> io::Result<usize>;
}

/// A SCSI command as callers submit it.
#[derive(Clone, Copy, Debug)]
pub struct Command {
    /// The caller's tag, returned in the completion.
    pub tag: u32,
    /// Logical unit number.
    pub lun: u16,
    /// The CDB.
    pub cdb: Cdb,
    /// Data direction.
    pub dir: Dir,
    /// Expected data transfer length in bytes.
    pub len: u32,
    /// The caller's buffers (`iovcnt` entries), holding at least `len` bytes; unused when
    /// `len` is 0 or the data is inline.
    pub iov: *const libc::iovec,
    /// Number of entries at `iov` (at most [`MAX_IOV`]).
    pub iovcnt: u32,
    /// A short Data-Out payload carried in the command itself (UNMAP parameter lists), used
    /// when `iovcnt` is 0.
    pub inline: [u8; scsi::INLINE_PARAM_LEN],
    /// A residual (short or long transfer) is an error rather than a shorter success.
    pub exact: bool,
}

// SAFETY: the raw pointers are the caller's buffers, which `Session::submit`'s contract keeps
// valid until the completion; the IO thread is the only one touching them meanwhile.
unsafe impl Send for Command {}

impl Command {
    /// A command without data.
    pub fn no_data(tag: u32, lun: u16, cdb: Cdb) -> Command {
        Command {
            tag,
            lun,
            cdb,
            dir: Dir::None,
            len: 0,
            iov: std::ptr::null(),
            iovcnt: 0,
            inline: [0; scsi::INLINE_PARAM_LEN],
            exact: true,
        }
    }

    /// A command reading `len` bytes into `iov[..iovcnt]`.
    pub fn read(
        tag: u32,
        lun: u16,
        cdb: Cdb,
        len: u32,
        iov: *const libc::iovec,
        iovcnt: u32,
    ) -> Command {
        Command {
            dir: Dir::Read,
            len,
            iov,
            iovcnt,
            ..Command::no_data(tag, lun, cdb)
        }
    }

    /// A command writing `len` bytes from `iov[..iovcnt]`.
    pub fn write(
        tag: u32,
        lun: u16,
        cdb: Cdb,
        len: u32,
        iov: *const libc::iovec,
        iovcnt: u32,
    ) -> Command {
        Command {
            dir: Dir::Write,
            ..Command::read(tag, lun, cdb, len, iov, iovcnt)
        }
    }

    /// UNMAP (discard) of `blocks` blocks at `lba`; the parameter list travels inline.
    pub fn unmap(tag: u32, lun: u16, lba: u64, blocks: u32) -> Command {
        Command {
            dir: Dir::Write,
            len: scsi::UNMAP_PARAM_LEN as u32,
            inline: scsi::unmap_params(lba, blocks),
            // Targets report residuals for parameter lists inconsistently (tgt reports the
            // whole list as residual); the status is what counts.
            exact: false,
            ..Command::no_data(tag, lun, scsi::unmap(scsi::UNMAP_PARAM_LEN as u16))
        }
    }

    /// PERSISTENT RESERVE OUT with service action `sa`, type `ty` and the parameter list of
    /// `key` (ours) and `sa_key` (see [`scsi::pr_out_params`]), carried inline.
    pub fn pr_out(
        tag: u32,
        lun: u16,
        sa: scsi::PrOut,
        ty: Option<scsi::PrType>,
        key: u64,
        sa_key: u64,
    ) -> Command {
        Command {
            dir: Dir::Write,
            len: scsi::PR_OUT_PARAM_LEN as u32,
            inline: scsi::pr_out_params(key, sa_key),
            exact: false,
            ..Command::no_data(tag, lun, scsi::persistent_reserve_out(sa, ty))
        }
    }

    /// Checks the shape of the command (not the validity of its pointers).
    pub fn check(&self) -> Result<(), Error> {
        let bad = |m: &str| Err(Error::Invalid(m.to_owned()));
        match self.dir {
            Dir::None if self.len != 0 => return bad("a command without data has a length"),
            Dir::Read | Dir::Write if self.len == 0 => return bad("a data command of length 0"),
            _ => {}
        }
        if self.len == 0 {
            return Ok(());
        }
        if self.iovcnt == 0 {
            if self.dir == Dir::Write && self.len as usize <= self.inline.len() {
                return Ok(());
            }
            return bad("no buffers");
        }
        if self.iovcnt as usize > MAX_IOV {
            return bad("too many iovec entries");
        }
        if self.iov.is_null() {
            return bad("null iovec array");
        }
        // SAFETY: the caller of `Session::submit` guarantees `iov[..iovcnt]` is readable.
        let iov = unsafe { std::slice::from_raw_parts(self.iov, self.iovcnt as usize) };
        let total: u64 = iov.iter().map(|v| v.iov_len as u64).sum();
        if total < u64::from(self.len) {
            return bad("buffers smaller than the transfer length");
        }
        Ok(())
    }
}

/// One finished command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The caller's tag.
    pub tag: u32,
    /// Bytes transferred, or why the command failed.
    pub result: Result<u32, IoError>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Free,
    /// Waiting in `ready` for the CmdSN window (or a connection).
    Ready,
    /// Sent (or in the transmit queue); waiting for the target.
    Active,
    /// Answered while parts of its data were still in the transmit batch being written.
    Finishing,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    cmd: Command,
    state: SlotState,
    generation: u16,
    /// Submission order, to resend in the same order after a reconnect.
    seq: u64,
    /// Bytes of Data-In received (in order).
    received: u32,
    /// Transmit queue entries referring to this slot.
    tx_refs: u32,
    /// Pieces of the current transmit batch pointing at this slot's buffers.
    batch_refs: u32,
    retries: u8,
    /// The command-timeout epoch in which it was sent.
    epoch: u32,
    deferred: Option<Result<u32, IoError>>,
}

impl Slot {
    fn itt(&self, idx: usize) -> u32 {
        (u32::from(self.generation & 0x7fff) << 16) | idx as u32
    }
}

#[derive(Clone, Copy, Debug)]
enum Tx {
    /// The SCSI Command PDU of a slot, with CmdSN and immediate data.
    Cmd {
        slot: u16,
        cmd_sn: u32,
        imm: u32,
        fin: bool,
    },
    /// A Data-Out sequence, expanded into PDUs as it is written.
    Data {
        slot: u16,
        ttt: u32,
        offset: u32,
        end: u32,
        data_sn: u32,
    },
    /// A NOP-Out (a ping of ours, or the answer to a target's NOP-In echoing `nop_data`).
    Nop {
        itt: u32,
        ttt: u32,
        lun: [u8; 8],
        len: u32,
    },
    /// A Logout Request closing the session.
    Logout,
}

enum Sink {
    /// Into a slot's iovecs at this offset.
    Slot { slot: usize, offset: u32 },
    /// Into `rx_buf` (sense data, NOP-In ping data, Reject headers).
    Buf,
}

enum RxState {
    Header,
    Data {
        hdr: Header,
        sink: Sink,
        /// Payload bytes received.
        got: u32,
        /// Padding and digest bytes received.
        tail_got: usize,
    },
}

/// Counters of one session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Commands completed.
    pub completed: u64,
    /// Commands failed.
    pub failed: u64,
    /// Commands resent after a reconnect or UNIT ATTENTION.
    pub retried: u64,
    /// NOP-Out pings sent.
    pub pings: u64,
    /// NOP-Ins answered.
    pub nop_answers: u64,
    /// R2Ts served.
    pub r2ts: u64,
}

/// One connection's full-feature state. See the module docs.
pub struct Conn {
    params: Params,
    limits: Limits,
    slots: Box<[Slot]>,
    free: Vec<u16>,
    ready: VecDeque<u16>,
    busy: usize,
    next_seq: u64,
    cmd_sn: u32,
    exp_stat_sn: u32,
    max_cmd_sn: u32,
    tx: VecDeque<Tx>,
    // The batch being written.
    arena: Box<[u8]>,
    arena_used: usize,
    iov: Vec<libc::iovec>,
    iov_pos: usize,
    batch_slots: Vec<u16>,
    // Receive side.
    stage: Box<[u8]>,
    start: usize,
    end: usize,
    rx: RxState,
    rx_buf: Vec<u8>,
    tail: [u8; 8],
    scratch: Vec<libc::iovec>,
    nop_data: Vec<u8>,
    // Keepalive.
    last_rx: Instant,
    ping: Option<(u32, Instant)>,
    ping_seq: u32,
    nop_interval: Duration,
    nop_timeout: Duration,
    logged_out: bool,
    /// Command timeout bookkeeping: the clock advances one epoch every half timeout, and a
    /// command still unanswered three epochs after it was sent has waited at least the timeout.
    epoch: u32,
    next_epoch: Instant,
    epoch_len: Duration,
    /// The last read came back short: the socket is probably empty, so skip reading until the
    /// owner's poll says it is readable ([`Conn::wake_rx`]). Saves an EAGAIN read per loop.
    rx_idle: bool,
    /// How much to read into the staging buffer when a header comes next: all it holds after
    /// a small PDU (several small PDUs per read), only a header (and its digest) after a
    /// large one, so the next large payload is read straight into its buffer, not through
    /// the staging buffer and a copy.
    rx_ahead: usize,
    /// Counters.
    pub stats: Stats,
}

/// A Data-In payload at least this long predicts another: read only a header after it.
const BIG_PDU: usize = 16 * 1024;

// SAFETY: the raw pointers inside (iovec batches and scratch lists) point into buffers the
// Conn owns or into submitted commands' buffers, which the submitter handed over to whichever
// thread drives the Conn (see `Session::submit`); nothing is shared with another thread.
unsafe impl Send for Conn {}

/// A connection-level failure: the connection must be dropped (and the session reconnected).
pub type ConnError = Error;

fn proto(m: impl Into<String>) -> ConnError {
    Error::Protocol(m.into())
}

impl Conn {
    /// A connection with `depth` command slots, not yet bound to a login.
    pub fn new(
        depth: u16,
        max_recv_data_segment: u32,
        nop_interval: Duration,
        nop_timeout: Duration,
    ) -> Conn {
        let depth = usize::from(depth.clamp(1, 0x7fff));
        let blank = Slot {
            cmd: Command::no_data(0, 0, [0; 16]),
            state: SlotState::Free,
            generation: 0,
            seq: 0,
            received: 0,
            tx_refs: 0,
            batch_refs: 0,
            retries: 0,
            epoch: 0,
            deferred: None,
        };
        let params = Params::defaults(&crate::text::Offer::default());
        Conn {
            params,
            limits: Limits::LOGIN,
            slots: vec![blank; depth].into_boxed_slice(),
            free: (0..depth as u16).rev().collect(),
            ready: VecDeque::with_capacity(depth),
            busy: 0,
            next_seq: 0,
            cmd_sn: 0,
            exp_stat_sn: 0,
            max_cmd_sn: 0,
            tx: VecDeque::with_capacity(depth * 4),
            arena: vec![0u8; TX_ARENA].into_boxed_slice(),
            arena_used: 0,
            iov: Vec::with_capacity(TX_IOV),
            iov_pos: 0,
            batch_slots: Vec::with_capacity(TX_IOV),
            stage: vec![0u8; STAGE].into_boxed_slice(),
            start: 0,
            end: 0,
            rx: RxState::Header,
            rx_buf: vec![0u8; max_recv_data_segment as usize],
            tail: [0; 8],
            scratch: Vec::with_capacity(MAX_IOV + 2),
            nop_data: Vec::new(),
            last_rx: Instant::now(),
            ping: None,
            ping_seq: 0,
            nop_interval,
            nop_timeout,
            logged_out: false,
            epoch: 0,
            next_epoch: Instant::now(),
            epoch_len: Duration::from_secs(15),
            rx_idle: false,
            rx_ahead: STAGE,
            stats: Stats::default(),
        }
    }

    /// Starts the full-feature phase of a fresh login. Commands still in flight from a previous
    /// connection (see [`Conn::requeue`]) are sent again first, in their original order.
    pub fn bind(&mut self, l: &LoggedIn) {
        self.params = l.params;
        self.limits = Limits {
            max_recv_data_segment: l.params.max_recv_data_segment,
            header_digest: l.params.header_digest,
            data_digest: l.params.data_digest,
        };
        let max = l.params.max_recv_data_segment as usize;
        if self.rx_buf.len() < max {
            self.rx_buf.resize(max, 0);
        }
        // A queued NOP-Out answer points into `nop_data`: with this capacity (no data segment
        // is larger) refilling it never reallocates.
        self.nop_data.reserve(max);
        self.cmd_sn = l.cmd_sn;
        self.exp_stat_sn = l.exp_stat_sn;
        self.max_cmd_sn = l.max_cmd_sn;
        self.last_rx = Instant::now();
        self.ping = None;
        self.rx_idle = false;
        self.next_epoch = Instant::now() + self.epoch_len;
    }

    /// Tells the connection the socket is readable again (see the `rx_idle` field).
    pub fn wake_rx(&mut self) {
        self.rx_idle = false;
    }

    /// A command unanswered for `t` (up to 1.5 `t`) drops the connection, so a target that
    /// accepts commands and never answers them costs a reconnect and a retry, not a hang.
    pub fn set_command_timeout(&mut self, t: Duration) {
        self.epoch_len = (t / 2).max(Duration::from_millis(1));
        self.next_epoch = Instant::now() + self.epoch_len;
    }

    /// The parameters in force.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// The sequence numbers now: next CmdSN, ExpStatSN and MaxCmdSN (to hand a connection
    /// that ran a few commands over to another [`Conn`] through [`Conn::bind`]).
    pub fn sequence(&self) -> (u32, u32, u32) {
        (self.cmd_sn, self.exp_stat_sn, self.max_cmd_sn)
    }

    /// Commands accepted and not yet completed.
    pub fn busy(&self) -> usize {
        self.busy
    }

    /// The Initiator Task Tag an active command with caller tag `tag` uses on the wire (for
    /// diagnostics and the fuzz target; a linear scan).
    pub fn itt_of(&self, tag: u32) -> Option<u32> {
        self.slots
            .iter()
            .enumerate()
            .find(|(_, s)| s.state == SlotState::Active && s.cmd.tag == tag)
            .map(|(i, s)| s.itt(i))
    }

    /// Whether a slot is free for [`Conn::enqueue`].
    pub fn has_free_slot(&self) -> bool {
        !self.free.is_empty()
    }

    /// Whether anything waits to be written.
    pub fn wants_write(&self) -> bool {
        self.iov_pos < self.iov.len() || !self.tx.is_empty() || self.can_send_ready()
    }

    fn can_send_ready(&self) -> bool {
        !self.ready.is_empty() && pdu::sn_le(self.cmd_sn, self.max_cmd_sn)
    }

    /// Accepts a command into a free slot. The caller checked [`Command::check`] and that a
    /// slot is free.
    pub fn enqueue(&mut self, cmd: Command) {
        let Some(idx) = self.free.pop() else {
            debug_assert!(false, "enqueue without a free slot");
            return;
        };
        let s = &mut self.slots[usize::from(idx)];
        s.cmd = cmd;
        s.state = SlotState::Ready;
        s.generation = s.generation.wrapping_add(1) & 0x7fff;
        s.seq = self.next_seq;
        s.received = 0;
        s.retries = 0;
        s.deferred = None;
        self.next_seq += 1;
        self.busy += 1;
        self.ready.push_back(idx);
    }

    fn complete(
        &mut self,
        idx: usize,
        result: Result<u32, IoError>,
        out: &mut impl FnMut(Completion),
    ) {
        let s = &mut self.slots[idx];
        if s.batch_refs > 0 {
            // The kernel has not taken all of this command's data yet: finish after the batch.
            s.state = SlotState::Finishing;
            s.deferred = Some(result);
            return;
        }
        if s.tx_refs > 0 {
            let slot = idx as u16;
            self.tx.retain(|t| match t {
                Tx::Cmd { slot: x, .. } | Tx::Data { slot: x, .. } => *x != slot,
                Tx::Nop { .. } | Tx::Logout => true,
            });
            self.slots[idx].tx_refs = 0;
        }
        let s = &mut self.slots[idx];
        s.state = SlotState::Free;
        s.generation = s.generation.wrapping_add(1) & 0x7fff;
        let tag = s.cmd.tag;
        self.busy -= 1;
        self.free.push(idx as u16);
        if result.is_ok() {
            self.stats.completed += 1;
        } else {
            self.stats.failed += 1;
        }
        out(Completion { tag, result });
    }

    /// After a lost connection: forget everything on the wire and put every unfinished command
    /// back in the ready queue, in submission order, to be sent on the next connection.
    /// Commands retried too often complete with [`IoError::Disconnected`].
    pub fn requeue(&mut self, out: &mut impl FnMut(Completion)) {
        self.tx.clear();
        self.iov.clear();
        self.iov_pos = 0;
        self.arena_used = 0;
        for &i in &self.batch_slots {
            self.slots[usize::from(i)].batch_refs = 0;
        }
        self.batch_slots.clear();
        self.start = 0;
        self.end = 0;
        self.rx = RxState::Header;
        self.ping = None;
        self.ready.clear();
        let mut give_up = Vec::new();
        for (i, s) in self.slots.iter_mut().enumerate() {
            s.tx_refs = 0;
            match s.state {
                SlotState::Free => {}
                SlotState::Finishing => {
                    s.state = SlotState::Active;
                    give_up.push((i, s.deferred.take().unwrap_or(Err(IoError::Disconnected))));
                }
                SlotState::Ready | SlotState::Active => {
                    if s.state == SlotState::Active {
                        s.retries += 1;
                    }
                    if s.retries > MAX_RETRIES {
                        s.state = SlotState::Active;
                        give_up.push((i, Err(IoError::Disconnected)));
                    } else {
                        s.state = SlotState::Ready;
                        s.received = 0;
                        s.generation = s.generation.wrapping_add(1) & 0x7fff;
                        self.ready.push_back(i as u16);
                    }
                }
            }
        }
        let slots = &self.slots;
        self.ready
            .make_contiguous()
            .sort_unstable_by_key(|&i| slots[usize::from(i)].seq);
        self.stats.retried += self.ready.len() as u64;
        for (i, r) in give_up {
            self.complete(i, r, out);
        }
    }

    /// Fails every unfinished command with `err` (the session gave up reconnecting, or is
    /// shutting down). Nothing may be on the wire any more.
    pub fn fail_all(&mut self, err: IoError, out: &mut impl FnMut(Completion)) {
        // Commands that already have an answer (or ran out of retries) complete with it.
        self.requeue(out);
        while let Some(i) = self.ready.pop_front() {
            let i = usize::from(i);
            self.slots[i].state = SlotState::Active;
            self.complete(i, Err(err), out);
        }
    }

    /// Fails every command submitted while no connection is possible.
    pub fn fail_ready(&mut self, err: IoError, out: &mut impl FnMut(Completion)) {
        while let Some(i) = self.ready.pop_front() {
            let i = usize::from(i);
            self.slots[i].state = SlotState::Active;
            self.complete(i, Err(err), out);
        }
    }

    // ---------------------------------------------------------------- keepalive

    /// Sends a ping when the target has been quiet for the NOP interval; fails when a ping
    /// stays unanswered past the NOP timeout. Returns when it next needs to run.
    pub fn tick(&mut self, now: Instant) -> Result<Instant, ConnError> {
        if now >= self.next_epoch {
            self.epoch = self.epoch.wrapping_add(1);
            self.next_epoch = now + self.epoch_len;
            let e = self.epoch;
            if self
                .slots
                .iter()
                .any(|s| s.state == SlotState::Active && e.wrapping_sub(s.epoch) >= 3)
            {
                return Err(Error::Timeout("waiting for the target to answer a command"));
            }
        }
        let next = self.keepalive(now)?;
        Ok(next.min(self.next_epoch))
    }

    fn keepalive(&mut self, now: Instant) -> Result<Instant, ConnError> {
        if let Some((_, sent)) = self.ping {
            if now.duration_since(sent) >= self.nop_timeout {
                return Err(Error::Timeout("waiting for the answer to a NOP-Out ping"));
            }
            return Ok(sent + self.nop_timeout);
        }
        let due = self.last_rx + self.nop_interval;
        if now >= due {
            self.ping_seq = self.ping_seq.wrapping_add(1) & 0x7fff_ffff;
            let itt = 0x8000_0000 | self.ping_seq;
            self.ping = Some((itt, now));
            self.stats.pings += 1;
            self.tx.push_back(Tx::Nop {
                itt,
                ttt: RESERVED_TAG,
                lun: [0; 8],
                len: 0,
            });
            return Ok(now + self.nop_timeout);
        }
        Ok(due)
    }

    /// Queues a Logout Request closing the session; [`Conn::logged_out`] turns true when the
    /// target answers.
    pub fn queue_logout(&mut self) {
        self.tx.push_back(Tx::Logout);
    }

    /// Whether the target answered our Logout Request.
    pub fn logged_out(&self) -> bool {
        self.logged_out
    }
}

/// Counts (and with `out`, pushes) the entries of `iov` covering `[off, off + len)`.
fn iov_range(
    iov: &[libc::iovec],
    mut off: usize,
    mut len: usize,
    mut out: Option<&mut Vec<libc::iovec>>,
) -> usize {
    let mut n = 0;
    for v in iov {
        if len == 0 {
            break;
        }
        if off >= v.iov_len {
            off -= v.iov_len;
            continue;
        }
        let take = (v.iov_len - off).min(len);
        if let Some(o) = out.as_deref_mut() {
            o.push(libc::iovec {
                iov_base: (v.iov_base as *mut u8).wrapping_add(off) as *mut libc::c_void,
                iov_len: take,
            });
        }
        n += 1;
        len -= take;
        off = 0;
    }
    n
}
