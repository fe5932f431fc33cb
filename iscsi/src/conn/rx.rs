//! The receive side of [`Conn`]: headers through the staging buffer, Data-In payloads straight
//! into the callers' buffers, and what each target PDU does.

use std::io;
use std::time::Instant;

use super::{
    proto, Completion, Conn, ConnError, RxState, Sink, SlotState, Tx, Wire, BIG_PDU, MAX_RETRIES,
    STAGE,
};
use crate::digest::Crc32c;
use crate::error::{Error, IoError};
use crate::pdu::{self, Dir, Header, TargetPdu, BHS_LEN, RESERVED_TAG};
use crate::scsi::{self, Sense};

impl Conn {
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
            iov_len: (STAGE - self.end).min(self.rx_ahead),
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
        self.rx_ahead = if len as usize >= BIG_PDU {
            pdu::BHS_LEN + if self.limits.header_digest { 4 } else { 0 }
        } else {
            STAGE
        };
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
                iov_len: self.rx_ahead,
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
