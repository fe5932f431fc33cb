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

use crate::crc32c::Crc32c;
use crate::error::{Error, IoError};
use crate::login::LoggedIn;
use crate::pdu::{self, Dir, Header, Limits, TargetPdu, BHS_LEN, RESERVED_TAG};
use crate::scsi::{self, Cdb, Sense};
use crate::text::Params;

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
    pub inline: [u8; scsi::UNMAP_PARAM_LEN],
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
            inline: [0; scsi::UNMAP_PARAM_LEN],
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
    /// Counters.
    pub stats: Stats,
}

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

    // ---------------------------------------------------------------- transmit

    /// Moves ready commands into the transmit queue while the CmdSN window allows.
    fn issue_ready(&mut self) {
        while self.can_send_ready() {
            let Some(idx) = self.ready.pop_front() else {
                break;
            };
            let i = usize::from(idx);
            let cmd_sn = self.cmd_sn;
            self.cmd_sn = self.cmd_sn.wrapping_add(1);
            let p = self.params;
            let s = &mut self.slots[i];
            s.state = SlotState::Active;
            s.epoch = self.epoch;
            let mut imm = 0;
            let mut unsolicited_end = 0;
            if s.cmd.dir == Dir::Write {
                let first = s.cmd.len.min(p.first_burst);
                if p.immediate_data {
                    imm = first.min(p.max_xmit_data_segment);
                }
                if !p.initial_r2t {
                    unsolicited_end = first;
                }
            }
            let more = unsolicited_end > imm;
            s.tx_refs += 1;
            self.tx.push_back(Tx::Cmd {
                slot: idx,
                cmd_sn,
                imm,
                fin: !more,
            });
            if more {
                s.tx_refs += 1;
                self.tx.push_back(Tx::Data {
                    slot: idx,
                    ttt: RESERVED_TAG,
                    offset: imm,
                    end: unsolicited_end,
                    data_sn: 0,
                });
            }
        }
    }

    /// Counts the iovec entries covering `[off, off + len)` of a slot's buffers, or pushes
    /// them to `out` when given. Inline data is one entry.
    fn data_iov(
        &self,
        idx: usize,
        off: u32,
        len: u32,
        out: Option<&mut Vec<libc::iovec>>,
    ) -> usize {
        let c = &self.slots[idx].cmd;
        if c.iovcnt == 0 {
            if let Some(o) = out {
                o.push(libc::iovec {
                    iov_base: c.inline.as_ptr().wrapping_add(off as usize) as *mut libc::c_void,
                    iov_len: len as usize,
                });
            }
            return 1;
        }
        // SAFETY: `Command::check` ran at submission and the submitter guarantees `iov` stays
        // valid until the completion.
        let iov = unsafe { std::slice::from_raw_parts(c.iov, c.iovcnt as usize) };
        iov_range(iov, off as usize, len as usize, out)
    }

    /// Fills a new transmit batch from the transmit queue. Returns false if there was nothing.
    fn fill_batch(&mut self) -> bool {
        self.iov.clear();
        self.iov_pos = 0;
        self.arena_used = 0;
        for &i in &self.batch_slots {
            let s = &mut self.slots[usize::from(i)];
            s.batch_refs = 0;
        }
        self.batch_slots.clear();
        let hd = if self.limits.header_digest { 4 } else { 0 };
        let dd = self.limits.data_digest;
        let maxseg = self.params.max_xmit_data_segment.max(512);
        while let Some(front) = self.tx.front_mut() {
            // Room for one more PDU: header, its data entries, padding and digest.
            if self.arena_used + BHS_LEN + hd + 8 > TX_ARENA {
                break;
            }
            let (_, data) = match *front {
                Tx::Cmd {
                    slot,
                    cmd_sn,
                    imm,
                    fin,
                } => {
                    let i = usize::from(slot);
                    let need = if imm > 0 {
                        self.data_iov(i, 0, imm, None)
                    } else {
                        0
                    };
                    if !self.iov.is_empty() && self.iov.len() + need + 2 > TX_IOV {
                        break;
                    }
                    self.tx.pop_front();
                    let s = &mut self.slots[i];
                    s.tx_refs -= 1;
                    let itt = s.itt(i);
                    let c = s.cmd;
                    let mut h = [0u8; BHS_LEN];
                    pdu::scsi_command(
                        &mut h,
                        c.dir,
                        fin,
                        pdu::encode_lun(c.lun),
                        itt,
                        c.len,
                        cmd_sn,
                        self.exp_stat_sn,
                        &c.cdb,
                        imm,
                    );
                    (self.push_header(&h), (imm > 0).then_some((i, 0, imm)))
                }
                Tx::Data {
                    slot,
                    ttt,
                    offset,
                    end,
                    ..
                } => {
                    let i = usize::from(slot);
                    let n = (end - offset).min(maxseg);
                    let off = offset;
                    let need = self.data_iov(i, off, n, None);
                    if !self.iov.is_empty() && self.iov.len() + need + 2 > TX_IOV {
                        break;
                    }
                    // Re-borrow: data_iov borrowed self immutably.
                    let Some(Tx::Data {
                        offset, data_sn, ..
                    }) = self.tx.front_mut()
                    else {
                        break;
                    };
                    let sn = *data_sn;
                    *offset += n;
                    *data_sn += 1;
                    let last = *offset == end;
                    if last {
                        self.tx.pop_front();
                        self.slots[i].tx_refs -= 1;
                    }
                    let s = &self.slots[i];
                    let mut h = [0u8; BHS_LEN];
                    pdu::data_out(
                        &mut h,
                        last,
                        pdu::encode_lun(s.cmd.lun),
                        s.itt(i),
                        ttt,
                        self.exp_stat_sn,
                        sn,
                        off,
                        n,
                    );
                    (self.push_header(&h), Some((i, off, n)))
                }
                Tx::Logout => {
                    self.tx.pop_front();
                    let mut h = [0u8; BHS_LEN];
                    pdu::logout_request(
                        &mut h,
                        0x7fff_fffe | 0x8000_0000,
                        0,
                        self.cmd_sn,
                        self.exp_stat_sn,
                    );
                    self.push_header(&h);
                    continue;
                }
                Tx::Nop { itt, ttt, lun, len } => {
                    self.tx.pop_front();
                    let mut h = [0u8; BHS_LEN];
                    pdu::nop_out(&mut h, lun, itt, ttt, self.cmd_sn, self.exp_stat_sn, len);
                    let e = self.push_header(&h);
                    if len > 0 {
                        let n = (len as usize).min(self.nop_data.len());
                        self.iov.push(libc::iovec {
                            iov_base: self.nop_data.as_ptr() as *mut libc::c_void,
                            iov_len: n,
                        });
                        let mut crc = Crc32c::new();
                        crc.update(&self.nop_data[..n]);
                        self.push_tail(n, dd, crc);
                    }
                    let _ = e;
                    continue;
                }
            };
            if let Some((i, off, n)) = data {
                let mut iov = std::mem::take(&mut self.iov);
                let first = iov.len();
                self.data_iov(i, off, n, Some(&mut iov));
                let mut crc = Crc32c::new();
                if dd {
                    for v in &iov[first..] {
                        // SAFETY: these entries cover the command's data, valid for reads until
                        // its completion (submission contract).
                        crc.update(unsafe {
                            std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
                        });
                    }
                }
                self.iov = iov;
                let s = &mut self.slots[i];
                if s.batch_refs == 0 {
                    self.batch_slots.push(i as u16);
                }
                s.batch_refs += 1;
                self.push_tail(n as usize, dd, crc);
            }
        }
        !self.iov.is_empty()
    }

    fn push_header(&mut self, h: &[u8; BHS_LEN]) -> usize {
        let at = self.arena_used;
        self.arena[at..at + BHS_LEN].copy_from_slice(h);
        let mut n = BHS_LEN;
        if self.limits.header_digest {
            let d = pdu::header_digest(h);
            self.arena[at + BHS_LEN..at + BHS_LEN + 4].copy_from_slice(&d);
            n += 4;
        }
        self.arena_used += n;
        self.push_arena_iov(at, n);
        at + n
    }

    /// Padding and data digest after a data segment of `n` bytes whose CRC so far is `crc`.
    fn push_tail(&mut self, n: usize, dd: bool, mut crc: Crc32c) {
        let pad = pdu::pad4(n) - n;
        let at = self.arena_used;
        let mut len = 0;
        if pad > 0 {
            self.arena[at..at + pad].fill(0);
            crc.update(&[0u8; 3][..pad]);
            len += pad;
        }
        if dd {
            self.arena[at + len..at + len + 4].copy_from_slice(&crc.digest());
            len += 4;
        }
        if len > 0 {
            self.arena_used += len;
            self.push_arena_iov(at, len);
        }
    }

    fn push_arena_iov(&mut self, at: usize, len: usize) {
        // Merge with the previous entry when it ends where this one starts.
        if let Some(last) = self.iov.last_mut() {
            let prev_end = (last.iov_base as usize).wrapping_add(last.iov_len);
            if prev_end == self.arena.as_ptr() as usize + at {
                last.iov_len += len;
                return;
            }
        }
        self.iov.push(libc::iovec {
            // The arena is not moved or reallocated while the batch is pending.
            iov_base: self.arena.as_mut_ptr().wrapping_add(at) as *mut libc::c_void,
            iov_len: len,
        });
    }

    /// Writes as much as the wire takes. Returns the bytes written.
    pub fn flush(
        &mut self,
        wire: &mut impl Wire,
        out: &mut impl FnMut(Completion),
    ) -> Result<usize, ConnError> {
        self.issue_ready();
        let mut total = 0;
        loop {
            if self.iov_pos >= self.iov.len() {
                self.finish_batch(out);
                if !self.fill_batch() {
                    return Ok(total);
                }
            }
            let end = self.iov.len().min(self.iov_pos + 1024);
            // SAFETY: entries point into the arena (owned, not resized during the batch), into
            // `nop_data` (not changed while a NOP is queued), or at submitted commands' buffers
            // (valid until their completion, which waits for the batch: `batch_refs`).
            let r = unsafe { wire.writev(&self.iov[self.iov_pos..end]) };
            match r {
                Ok(0) => return Err(proto("connection closed while writing")),
                Ok(mut n) => {
                    total += n;
                    while n > 0 {
                        let v = &mut self.iov[self.iov_pos];
                        if n >= v.iov_len {
                            n -= v.iov_len;
                            self.iov_pos += 1;
                        } else {
                            v.iov_base =
                                (v.iov_base as *mut u8).wrapping_add(n) as *mut libc::c_void;
                            v.iov_len -= n;
                            n = 0;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(total),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::Io(e)),
            }
        }
    }

    fn finish_batch(&mut self, out: &mut impl FnMut(Completion)) {
        let mut k = 0;
        while k < self.batch_slots.len() {
            let i = usize::from(self.batch_slots[k]);
            k += 1;
            let s = &mut self.slots[i];
            s.batch_refs = 0;
            if s.state == SlotState::Finishing {
                let r = s.deferred.take().unwrap_or(Err(IoError::Disconnected));
                s.state = SlotState::Active;
                self.complete(i, r, out);
            }
        }
        self.batch_slots.clear();
        self.iov.clear();
        self.iov_pos = 0;
        self.arena_used = 0;
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

    // ---------------------------------------------------------------- receive

    /// Reads and handles everything the wire has. Returns the number of PDUs handled.
    pub fn receive(
        &mut self,
        wire: &mut impl Wire,
        out: &mut impl FnMut(Completion),
    ) -> Result<usize, ConnError> {
        let mut handled = 0;
        loop {
            let p = match self.rx {
                RxState::Header => self.rx_header(wire, out)?,
                RxState::Data { .. } => self.rx_data(wire, out)?,
            };
            match p {
                Progress::Pdu => handled += 1,
                Progress::More => {}
                Progress::Blocked => return Ok(handled),
            }
        }
    }

    /// Reads more bytes into the staging buffer.
    fn fill_stage(&mut self, wire: &mut impl Wire) -> Result<Progress, ConnError> {
        if self.rx_idle {
            return Ok(Progress::Blocked);
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if STAGE - self.end < 2048 {
            self.stage.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let v = [libc::iovec {
            iov_base: self.stage[self.end..].as_mut_ptr() as *mut libc::c_void,
            iov_len: STAGE - self.end,
        }];
        // SAFETY: the entry covers the free tail of the staging buffer, owned by self.
        match unsafe { wire.readv(&v) } {
            Ok(0) => Err(proto("target closed the connection")),
            Ok(n) => {
                self.rx_idle = n < v[0].iov_len;
                self.end += n;
                self.last_rx = Instant::now();
                Ok(Progress::More)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Progress::Blocked),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Progress::More),
            Err(e) => Err(Error::Io(e)),
        }
    }

    /// The slot an ITT names, if it is an active command of ours.
    fn slot_of(&self, itt: u32) -> Option<usize> {
        if itt & 0x8000_0000 != 0 {
            return None;
        }
        let idx = (itt & 0xffff) as usize;
        let s = self.slots.get(idx)?;
        (s.state == SlotState::Active && s.itt(idx) == itt).then_some(idx)
    }

    fn rx_header(
        &mut self,
        wire: &mut impl Wire,
        out: &mut impl FnMut(Completion),
    ) -> Result<Progress, ConnError> {
        if self.end - self.start < BHS_LEN {
            return self.fill_stage(wire);
        }
        let mut bhs = [0u8; BHS_LEN];
        bhs.copy_from_slice(&self.stage[self.start..self.start + BHS_LEN]);
        let h = pdu::parse_header(&bhs, &self.limits)?;
        let hd = if self.limits.header_digest { 4 } else { 0 };
        let hlen = BHS_LEN + h.ahs_len + hd;
        if self.end - self.start < hlen {
            return self.fill_stage(wire);
        }
        if hd > 0 {
            let at = self.start + BHS_LEN + h.ahs_len;
            if pdu::header_digest(&self.stage[self.start..at]) != self.stage[at..at + 4] {
                return Err(pdu::PduError::HeaderDigest.into());
            }
        }
        self.start += hlen;
        if h.data_len == 0 {
            self.dispatch(h, out)?;
            return Ok(Progress::Pdu);
        }
        let sink = match h.pdu {
            TargetPdu::DataIn(d) => {
                let idx = self
                    .slot_of(d.itt)
                    .ok_or_else(|| proto(format!("Data-In for unknown task {:#x}", d.itt)))?;
                let s = &self.slots[idx];
                if s.cmd.dir != Dir::Read {
                    return Err(proto("Data-In for a command that reads nothing"));
                }
                if d.offset != s.received {
                    return Err(proto(format!(
                        "Data-In at offset {} while {} bytes were received (out of order)",
                        d.offset, s.received
                    )));
                }
                if u64::from(d.offset) + u64::from(h.data_len) > u64::from(s.cmd.len) {
                    return Err(proto("Data-In beyond the expected transfer length"));
                }
                Sink::Slot {
                    slot: idx,
                    offset: d.offset,
                }
            }
            _ => Sink::Buf,
        };
        self.rx = RxState::Data {
            hdr: h,
            sink,
            got: 0,
            tail_got: 0,
        };
        Ok(Progress::More)
    }

    fn rx_data(
        &mut self,
        wire: &mut impl Wire,
        out: &mut impl FnMut(Completion),
    ) -> Result<Progress, ConnError> {
        let RxState::Data {
            hdr,
            ref sink,
            mut got,
            mut tail_got,
        } = self.rx
        else {
            return Ok(Progress::More);
        };
        let (slot, offset) = match *sink {
            Sink::Slot { slot, offset } => (Some(slot), offset),
            Sink::Buf => (None, 0),
        };
        let len = hdr.data_len;
        let tail_len = pdu::data_wire_len(len, self.limits.data_digest) - len as usize;
        // First what the staging buffer already holds.
        let avail = self.end - self.start;
        if avail > 0 && got < len {
            let n = (avail as u32).min(len - got);
            let src = self.start;
            self.copy_in(slot, offset + got, src, n as usize);
            self.start += n as usize;
            got += n;
        }
        let avail = self.end - self.start;
        if avail > 0 && got == len && tail_got < tail_len {
            let n = avail.min(tail_len - tail_got);
            self.tail[tail_got..tail_got + n]
                .copy_from_slice(&self.stage[self.start..self.start + n]);
            self.start += n;
            tail_got += n;
        }
        if (got < len || tail_got < tail_len) && self.rx_idle {
            self.rx = RxState::Data {
                hdr,
                sink: restore(slot, offset),
                got,
                tail_got,
            };
            return Ok(Progress::Blocked);
        }
        if got < len || tail_got < tail_len {
            // Then straight from the socket: the rest of the payload into its destination, the
            // padding and digest, and whatever follows into the (now empty) staging buffer.
            debug_assert_eq!(self.start, self.end);
            self.start = 0;
            self.end = 0;
            let mut sc = std::mem::take(&mut self.scratch);
            sc.clear();
            if got < len {
                match slot {
                    Some(i) => {
                        self.data_iov(i, offset + got, len - got, Some(&mut sc));
                    }
                    None => sc.push(libc::iovec {
                        iov_base: self.rx_buf[got as usize..].as_mut_ptr() as *mut libc::c_void,
                        iov_len: (len - got) as usize,
                    }),
                }
            }
            if tail_got < tail_len {
                sc.push(libc::iovec {
                    iov_base: self.tail[tail_got..].as_mut_ptr() as *mut libc::c_void,
                    iov_len: tail_len - tail_got,
                });
            }
            sc.push(libc::iovec {
                iov_base: self.stage.as_mut_ptr() as *mut libc::c_void,
                iov_len: STAGE,
            });
            // SAFETY: the entries cover the active command's buffers at offsets validated
            // against its length (valid for writes until its completion, by the submission
            // contract), or buffers owned by self.
            let r = unsafe { wire.readv(&sc) };
            let asked: usize = sc.iter().map(|v| v.iov_len).sum();
            self.scratch = sc;
            match r {
                Ok(0) => return Err(proto("target closed the connection")),
                Ok(mut n) => {
                    self.last_rx = Instant::now();
                    self.rx_idle = n < asked;
                    let p = n.min((len - got) as usize);
                    got += p as u32;
                    n -= p;
                    let t = n.min(tail_len - tail_got);
                    tail_got += t;
                    n -= t;
                    self.end = n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.rx = RxState::Data {
                        hdr,
                        sink: restore(slot, offset),
                        got,
                        tail_got,
                    };
                    return Ok(Progress::Blocked);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::Io(e)),
            }
        }
        if got < len || tail_got < tail_len {
            self.rx = RxState::Data {
                hdr,
                sink: restore(slot, offset),
                got,
                tail_got,
            };
            return Ok(Progress::More);
        }
        self.rx = RxState::Header;
        if self.limits.data_digest {
            let mut crc = Crc32c::new();
            match slot {
                Some(i) => {
                    let mut sc = std::mem::take(&mut self.scratch);
                    sc.clear();
                    self.data_iov(i, offset, len, Some(&mut sc));
                    for v in &sc {
                        // SAFETY: the command's buffer range just filled; valid until its
                        // completion.
                        crc.update(unsafe {
                            std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
                        });
                    }
                    self.scratch = sc;
                }
                None => crc.update(&self.rx_buf[..len as usize]),
            }
            let pad = tail_len - 4;
            crc.update(&self.tail[..pad]);
            if crc.digest() != self.tail[pad..pad + 4] {
                return Err(pdu::PduError::DataDigest.into());
            }
        }
        self.dispatch(hdr, out)?;
        Ok(Progress::Pdu)
    }

    /// Copies `n` staging bytes at `src` into the slot's buffers at `off` (or `rx_buf`).
    fn copy_in(&mut self, slot: Option<usize>, off: u32, src: usize, n: usize) {
        match slot {
            None => {
                let o = off as usize;
                self.rx_buf[o..o + n].copy_from_slice(&self.stage[src..src + n]);
            }
            Some(i) => {
                let mut sc = std::mem::take(&mut self.scratch);
                sc.clear();
                self.data_iov(i, off, n as u32, Some(&mut sc));
                let mut at = src;
                for v in &sc {
                    // SAFETY: `v` lies within the command's buffers (offsets validated against
                    // its length); they are valid for writes until its completion and do not
                    // overlap the staging buffer, which we own.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            self.stage.as_ptr().add(at),
                            v.iov_base as *mut u8,
                            v.iov_len,
                        );
                    }
                    at += v.iov_len;
                }
                self.scratch = sc;
            }
        }
    }

    fn note_sn(&mut self, sn: pdu::Sn, stat: bool) {
        // MaxCmdSN only moves forward, and only when consistent (RFC 7143 section 4.2.2.1).
        if pdu::sn_le(sn.exp_cmd_sn, sn.max_cmd_sn.wrapping_add(1))
            && pdu::sn_lt(self.max_cmd_sn, sn.max_cmd_sn)
        {
            self.max_cmd_sn = sn.max_cmd_sn;
        }
        if stat && pdu::sn_le(self.exp_stat_sn, sn.stat_sn.wrapping_add(1)) {
            self.exp_stat_sn = sn.stat_sn.wrapping_add(1);
        }
    }

    /// Acts on one complete PDU (its data, when not a Data-In, is in `rx_buf`).
    fn dispatch(&mut self, h: Header, out: &mut impl FnMut(Completion)) -> Result<(), ConnError> {
        let dlen = h.data_len as usize;
        match h.pdu {
            TargetPdu::DataIn(d) => {
                self.note_sn(d.sn, d.status.is_some());
                let idx = self
                    .slot_of(d.itt)
                    .ok_or_else(|| proto(format!("Data-In for unknown task {:#x}", d.itt)))?;
                if dlen == 0 && d.offset != self.slots[idx].received {
                    return Err(proto("Data-In out of order"));
                }
                self.slots[idx].received += h.data_len;
                if let Some(st) = d.status {
                    self.finish_command(idx, st, d.underflow, d.overflow, d.residual, None, out);
                }
            }
            TargetPdu::ScsiResponse(r) => {
                self.note_sn(r.sn, true);
                let idx = self
                    .slot_of(r.itt)
                    .ok_or_else(|| proto(format!("SCSI Response for unknown task {:#x}", r.itt)))?;
                if r.response != 0 {
                    self.complete(idx, Err(IoError::Response(r.response)), out);
                    return Ok(());
                }
                let sense = if dlen >= 2 {
                    let sl = usize::from(u16::from_be_bytes([self.rx_buf[0], self.rx_buf[1]]));
                    Sense::parse(&self.rx_buf[2..2 + sl.min(dlen - 2)])
                } else {
                    None
                };
                self.finish_command(
                    idx,
                    r.status,
                    r.underflow,
                    r.overflow,
                    r.residual,
                    sense,
                    out,
                );
            }
            TargetPdu::R2t(r) => {
                self.note_sn(r.sn, false);
                let idx = self
                    .slot_of(r.itt)
                    .ok_or_else(|| proto(format!("R2T for unknown task {:#x}", r.itt)))?;
                let s = &mut self.slots[idx];
                if s.cmd.dir != Dir::Write {
                    return Err(proto("R2T for a command that writes nothing"));
                }
                let end = u64::from(r.offset) + u64::from(r.len);
                if end > u64::from(s.cmd.len) {
                    return Err(proto("R2T beyond the expected transfer length"));
                }
                s.tx_refs += 1;
                self.stats.r2ts += 1;
                self.tx.push_back(Tx::Data {
                    slot: idx as u16,
                    ttt: r.ttt,
                    offset: r.offset,
                    end: end as u32,
                    data_sn: 0,
                });
            }
            TargetPdu::NopIn(n) => {
                self.note_sn(n.sn, n.itt != RESERVED_TAG);
                if let Some((itt, _)) = self.ping {
                    if n.itt == itt {
                        self.ping = None;
                    }
                }
                if n.ttt != RESERVED_TAG {
                    // The target pings us: answer with its tag and echo its data.
                    self.nop_data.clear();
                    self.nop_data.extend_from_slice(&self.rx_buf[..dlen]);
                    self.stats.nop_answers += 1;
                    self.tx.push_back(Tx::Nop {
                        itt: RESERVED_TAG,
                        ttt: n.ttt,
                        lun: n.lun,
                        len: h.data_len,
                    });
                }
            }
            TargetPdu::AsyncMessage(a) => {
                self.note_sn(a.sn, true);
                match a.event {
                    1 => return Err(proto("the target requests a logout")),
                    2 => return Err(proto("the target is dropping the connection")),
                    3 => return Err(proto("the target is dropping the session")),
                    _ => {}
                }
            }
            TargetPdu::Reject(r) => {
                self.note_sn(r.sn, true);
                if dlen >= BHS_LEN {
                    let itt = u32::from_be_bytes([
                        self.rx_buf[16],
                        self.rx_buf[17],
                        self.rx_buf[18],
                        self.rx_buf[19],
                    ]);
                    if let Some(idx) = self.slot_of(itt) {
                        self.complete(idx, Err(IoError::Rejected(r.reason)), out);
                        return Ok(());
                    }
                }
                return Err(proto(format!(
                    "target rejected a PDU (reason {:#04x})",
                    r.reason
                )));
            }
            TargetPdu::LogoutResponse(r) => {
                self.note_sn(r.sn, true);
                self.logged_out = true;
            }
            other => {
                return Err(proto(format!(
                    "unexpected PDU in full-feature phase: {other:?}"
                )))
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_command(
        &mut self,
        idx: usize,
        status: u8,
        underflow: bool,
        overflow: bool,
        residual: u32,
        sense: Option<Sense>,
        out: &mut impl FnMut(Completion),
    ) {
        let s = &self.slots[idx];
        let expected = s.cmd.len;
        let result = match status {
            scsi::STATUS_GOOD => {
                let mut done = if underflow {
                    expected.saturating_sub(residual)
                } else {
                    expected
                };
                if s.cmd.dir == Dir::Read {
                    done = done.min(s.received);
                }
                if s.cmd.exact && (done != expected || (overflow && residual > 0)) {
                    Err(IoError::Residual {
                        expected,
                        residual: if done != expected {
                            expected - done
                        } else {
                            residual
                        },
                    })
                } else {
                    Ok(done)
                }
            }
            scsi::STATUS_CHECK_CONDITION => match sense {
                Some(sense) => {
                    if sense.key == 0x6
                        && s.retries < MAX_RETRIES
                        && s.tx_refs == 0
                        && s.batch_refs == 0
                    {
                        // UNIT ATTENTION (after a target restart or reset): send it again.
                        let s = &mut self.slots[idx];
                        s.retries += 1;
                        s.state = SlotState::Ready;
                        s.received = 0;
                        s.generation = s.generation.wrapping_add(1) & 0x7fff;
                        self.ready.push_front(idx as u16);
                        self.stats.retried += 1;
                        return;
                    }
                    Err(IoError::Check(sense))
                }
                None => Err(IoError::CheckNoSense),
            },
            other => Err(IoError::Status(other)),
        };
        self.complete(idx, result, out);
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

fn restore(slot: Option<usize>, offset: u32) -> Sink {
    match slot {
        Some(slot) => Sink::Slot { slot, offset },
        None => Sink::Buf,
    }
}

enum Progress {
    Pdu,
    More,
    Blocked,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdu::op;

    /// Serves scripted bytes in small reads and records what is written.
    struct Script {
        input: Vec<u8>,
        pos: usize,
        chunk: usize,
        written: Vec<u8>,
    }

    impl Wire for Script {
        unsafe fn readv(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
            if self.pos == self.input.len() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut budget = self.chunk;
            let mut n = 0;
            for v in iov {
                let take = v.iov_len.min(budget).min(self.input.len() - self.pos);
                // SAFETY: the caller guarantees `v` is writable for its length.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.input[self.pos..].as_ptr(),
                        v.iov_base as *mut u8,
                        take,
                    )
                };
                self.pos += take;
                budget -= take;
                n += take;
            }
            Ok(n)
        }

        unsafe fn writev(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
            let mut n = 0;
            for v in iov {
                // SAFETY: the caller guarantees `v` is readable for its length.
                let b = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) };
                self.written.extend_from_slice(b);
                n += v.iov_len;
            }
            Ok(n)
        }
    }

    /// Receives until the script is used up, as the session does: a short read makes the
    /// connection wait for poll, which the test stands in for with `wake_rx`.
    fn pump(
        c: &mut Conn,
        w: &mut Script,
        out: &mut impl FnMut(Completion),
    ) -> Result<usize, ConnError> {
        let mut n = 0;
        loop {
            n += c.receive(w, out)?;
            if w.pos == w.input.len() {
                n += c.receive(w, out)?;
                return Ok(n);
            }
            c.wake_rx();
        }
    }

    fn conn(p: impl FnOnce(&mut Params)) -> Conn {
        let mut params = Params::defaults(&crate::text::Offer::default());
        p(&mut params);
        let mut c = Conn::new(
            4,
            params.max_recv_data_segment,
            Duration::from_secs(60),
            Duration::from_secs(60),
        );
        c.bind(&LoggedIn {
            params,
            tsih: 1,
            cmd_sn: 10,
            exp_stat_sn: 5,
            max_cmd_sn: 20,
        });
        c
    }

    fn bhs(opcode: u8, flags: u8, itt: u32, dlen: u32) -> [u8; BHS_LEN] {
        let mut h = [0u8; BHS_LEN];
        h[0] = opcode;
        h[1] = flags;
        h[5..8].copy_from_slice(&dlen.to_be_bytes()[1..]);
        h[16..20].copy_from_slice(&itt.to_be_bytes());
        h[24..28].copy_from_slice(&5u32.to_be_bytes()); // StatSN
        h[28..32].copy_from_slice(&11u32.to_be_bytes()); // ExpCmdSN
        h[32..36].copy_from_slice(&30u32.to_be_bytes()); // MaxCmdSN
        h
    }

    #[test]
    fn data_in_lands_in_the_iovecs() {
        let mut c = conn(|_| {});
        let mut a = vec![0u8; 1000];
        let mut b = vec![0u8; 3096];
        let iov = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
        ];
        let cmd = Command::read(77, 1, scsi::read16(0, 8), 4096, iov.as_ptr(), 2);
        cmd.check().unwrap();
        c.enqueue(cmd);
        let mut w = Script {
            input: Vec::new(),
            pos: 0,
            chunk: 7,
            written: Vec::new(),
        };
        let mut done = Vec::new();
        c.flush(&mut w, &mut |x| done.push(x)).unwrap();
        assert_eq!(w.written.len(), BHS_LEN);
        assert_eq!(w.written[0], op::SCSI_CMD);
        let itt = c.itt_of(77).unwrap();
        let payload: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let h1 = bhs(op::DATA_IN, 0, itt, 3000);
        let mut h2 = bhs(op::DATA_IN, 0x81, itt, 1096);
        h2[40..44].copy_from_slice(&3000u32.to_be_bytes());
        w.input.extend_from_slice(&h1);
        w.input.extend_from_slice(&payload[..3000]);
        w.input.extend_from_slice(&h2);
        w.input.extend_from_slice(&payload[3000..]);
        let n = pump(&mut c, &mut w, &mut |x| done.push(x)).unwrap();
        assert_eq!(n, 2);
        assert_eq!(
            done,
            vec![Completion {
                tag: 77,
                result: Ok(4096)
            }]
        );
        assert_eq!([a, b].concat(), payload);
        assert_eq!(c.busy(), 0);
    }

    #[test]
    fn r2t_is_answered_with_data_out() {
        let mut c = conn(|p| {
            p.immediate_data = false;
            p.initial_r2t = true;
            p.max_xmit_data_segment = 8192;
        });
        let data: Vec<u8> = (0..20000u32).map(|i| (i * 7) as u8).collect();
        let iov = [libc::iovec {
            iov_base: data.as_ptr() as *mut _,
            iov_len: data.len(),
        }];
        c.enqueue(Command::write(
            5,
            1,
            scsi::write16(0, 40, false),
            20000,
            iov.as_ptr(),
            1,
        ));
        let mut w = Script {
            input: Vec::new(),
            pos: 0,
            chunk: 1 << 20,
            written: Vec::new(),
        };
        let mut done = Vec::new();
        c.flush(&mut w, &mut |x| done.push(x)).unwrap();
        assert_eq!(w.written.len(), BHS_LEN, "no immediate data");
        assert_eq!(&w.written[24..28], &10u32.to_be_bytes(), "CmdSN");
        let itt = c.itt_of(5).unwrap();
        let mut r2t = bhs(op::R2T, 0x80, itt, 0);
        r2t[20..24].copy_from_slice(&0x55u32.to_be_bytes());
        r2t[44..48].copy_from_slice(&20000u32.to_be_bytes());
        w.input.extend_from_slice(&r2t);
        w.written.clear();
        pump(&mut c, &mut w, &mut |x| done.push(x)).unwrap();
        c.flush(&mut w, &mut |x| done.push(x)).unwrap();
        let mut at = 0;
        let mut got = Vec::new();
        for (k, len) in [8192usize, 8192, 3616].into_iter().enumerate() {
            let h = &w.written[at..at + BHS_LEN];
            assert_eq!(h[0], op::DATA_OUT);
            assert_eq!(h[1] & 0x80 != 0, k == 2, "F bit on the last PDU only");
            assert_eq!(&h[20..24], &0x55u32.to_be_bytes(), "TTT echoed");
            assert_eq!(&h[36..40], &(k as u32).to_be_bytes(), "DataSN");
            assert_eq!(&h[40..44], &((k * 8192) as u32).to_be_bytes(), "offset");
            got.extend_from_slice(&w.written[at + BHS_LEN..at + BHS_LEN + len]);
            at += BHS_LEN + len;
        }
        assert_eq!(at, w.written.len());
        assert_eq!(got, data);
        w.input.extend_from_slice(&bhs(op::SCSI_RSP, 0x80, itt, 0));
        pump(&mut c, &mut w, &mut |x| done.push(x)).unwrap();
        assert_eq!(
            done,
            vec![Completion {
                tag: 5,
                result: Ok(20000)
            }]
        );
    }

    #[test]
    fn hostile_pdus_close_the_connection() {
        let mut c = conn(|p| p.max_recv_data_segment = 8192);
        let mut buf = vec![0u8; 4096];
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        c.enqueue(Command::read(
            1,
            1,
            scsi::read16(0, 8),
            4096,
            iov.as_ptr(),
            1,
        ));
        let mut w = Script {
            input: Vec::new(),
            pos: 0,
            chunk: 4096,
            written: Vec::new(),
        };
        c.flush(&mut w, &mut |_| {}).unwrap();
        let case = |k: usize, itt: u32| -> (Vec<u8>, &str) {
            match k {
                0 => (
                    bhs(op::DATA_IN, 0, itt, 9000).to_vec(),
                    "exceeds the negotiated limit",
                ),
                1 => (
                    bhs(op::DATA_IN, 0, itt ^ 0x10000, 512).to_vec(),
                    "unknown task",
                ),
                2 => {
                    let mut h = bhs(op::DATA_IN, 0, itt, 1024);
                    h[40..44].copy_from_slice(&3584u32.to_be_bytes());
                    (h.to_vec(), "out of order")
                }
                3 => (bhs(op::R2T, 0x80, itt, 0).to_vec(), "R2T"),
                _ => (bhs(op::LOGIN_RSP, 0x80, 0, 0).to_vec(), "unexpected PDU"),
            }
        };
        for k in 0..5 {
            let (input, want) = case(k, c.itt_of(1).unwrap());
            let mut w = Script {
                input,
                pos: 0,
                chunk: 4096,
                written: Vec::new(),
            };
            let e = pump(&mut c, &mut w, &mut |_| {}).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should mention {want:?}");
            // As after a lost connection: forget the wire, keep the command.
            c.requeue(&mut |_| {});
            let mut sink = Script {
                input: Vec::new(),
                pos: 0,
                chunk: 1,
                written: Vec::new(),
            };
            c.flush(&mut sink, &mut |_| {}).unwrap();
        }
        let mut failed = Vec::new();
        c.fail_all(IoError::Disconnected, &mut |x| failed.push(x));
        assert_eq!(
            failed,
            vec![Completion {
                tag: 1,
                result: Err(IoError::Disconnected)
            }]
        );
        let _ = &mut buf;
    }
}
