//! The transmit side of [`Conn`]: commands into the CmdSN window, PDUs into `writev` batches
//! straight from the callers' buffers.

use std::io;

use super::{iov_range, proto, Completion, Conn, ConnError, SlotState, Tx, Wire, TX_ARENA, TX_IOV};
use crate::digest::Crc32c;
use crate::error::{Error, IoError};
use crate::pdu::{self, Dir, BHS_LEN, RESERVED_TAG};

impl Conn {
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
    pub(super) fn data_iov(
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
}
