//! A blocking convenience API over [`Session`], for tools and tests: one command at a time,
//! into and out of ordinary slices.

use std::time::Duration;

use crate::config::Config;
use crate::conn::Command;
use crate::error::{Error, Result};
use crate::pdu::decode_lun;
use crate::scsi::{self, Capacity, Inquiry};
use crate::session::{Session, SubmitError};

/// A session used one command at a time. Not for hot paths: use [`Session`] there.
pub struct Client {
    session: Session,
    lun: u16,
    next_tag: u32,
}

impl Client {
    /// Logs in to `cfg`'s target and addresses `lun`.
    pub fn connect(cfg: &Config, lun: u16) -> Result<Client> {
        Ok(Client {
            session: Session::connect(cfg)?,
            lun,
            next_tag: 1,
        })
    }

    /// The session underneath.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The session underneath, to drive it ([`Session::wait`]) between commands in
    /// [`crate::Drive::Inline`] mode.
    pub fn session_mut(&mut self) -> &mut Session {
        &mut self.session
    }

    /// The LUN commands go to.
    pub fn lun(&self) -> u16 {
        self.lun
    }

    /// Runs one command to completion; returns the bytes transferred.
    ///
    /// # Safety
    ///
    /// As [`Session::submit`]; the buffers need to stay valid only until this returns.
    unsafe fn run(&mut self, mut cmd: Command) -> Result<u32> {
        let tag = self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(1);
        cmd.tag = tag;
        loop {
            // SAFETY: forwarded from the caller; this function does not return before the
            // command's completion has been popped.
            match unsafe { self.session.submit(cmd) } {
                Ok(()) => break,
                Err(SubmitError::Full) => {
                    self.session.wait(Some(Duration::from_millis(10)));
                }
                Err(SubmitError::Invalid(e)) => return Err(e),
            }
        }
        loop {
            while let Some(c) = self.session.pop_completion() {
                if c.tag == tag {
                    return c.result.map_err(Error::Command);
                }
            }
            self.session.wait(Some(Duration::from_secs(1)));
        }
    }

    fn read_cmd(&mut self, cdb: scsi::Cdb, buf: &mut [u8], exact: bool) -> Result<u32> {
        let len =
            u32::try_from(buf.len()).map_err(|_| Error::Invalid("buffer too large".into()))?;
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut cmd = Command::read(0, self.lun, cdb, len, &iov, 1);
        cmd.exact = exact;
        // SAFETY: `iov` and `buf` outlive the call, which waits for the completion.
        unsafe { self.run(cmd) }
    }

    /// TEST UNIT READY.
    pub fn test_unit_ready(&mut self) -> Result<()> {
        // SAFETY: no buffers.
        unsafe { self.run(Command::no_data(0, self.lun, scsi::test_unit_ready())) }.map(|_| ())
    }

    /// Standard INQUIRY data.
    pub fn inquiry(&mut self) -> Result<Inquiry> {
        let mut b = [0u8; 96];
        let n = self.read_cmd(scsi::inquiry(None, 96), &mut b, false)? as usize;
        Inquiry::parse(&b[..n]).ok_or_else(|| Error::Protocol("short INQUIRY data".into()))
    }

    /// READ CAPACITY(16).
    pub fn read_capacity16(&mut self) -> Result<Capacity> {
        let mut b = [0u8; 32];
        let n = self.read_cmd(scsi::read_capacity16(32), &mut b, false)? as usize;
        Capacity::parse(&b[..n]).ok_or_else(|| Error::Protocol("bad READ CAPACITY(16) data".into()))
    }

    /// REPORT LUNS: the LUN numbers the target lists (others are skipped).
    pub fn report_luns(&mut self) -> Result<Vec<u16>> {
        let mut b = vec![0u8; 8 + 8 * 256];
        let n = self.read_cmd(scsi::report_luns(b.len() as u32), &mut b, false)? as usize;
        let luns = scsi::parse_report_luns(&b[..n])
            .ok_or_else(|| Error::Protocol("short REPORT LUNS data".into()))?;
        Ok(luns.iter().filter_map(decode_lun).collect())
    }

    /// READ(16) of `buf.len() / block_size` blocks at `lba` into `buf`.
    pub fn read16(&mut self, lba: u64, buf: &mut [u8], block_size: u32) -> Result<()> {
        let blocks = blocks_of(buf.len(), block_size)?;
        self.read_cmd(scsi::read16(lba, blocks), buf, true)
            .map(|_| ())
    }

    /// WRITE(16) of `buf` at `lba` (Force Unit Access when `fua`).
    pub fn write16(&mut self, lba: u64, buf: &[u8], block_size: u32, fua: bool) -> Result<()> {
        let blocks = blocks_of(buf.len(), block_size)?;
        let iov = libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        let cmd = Command::write(
            0,
            self.lun,
            scsi::write16(lba, blocks, fua),
            buf.len() as u32,
            &iov,
            1,
        );
        // SAFETY: `iov` and `buf` outlive the call, which waits for the completion; the
        // target only reads from a write's buffers.
        unsafe { self.run(cmd) }.map(|_| ())
    }

    /// SYNCHRONIZE CACHE(16) of the whole medium.
    pub fn synchronize_cache16(&mut self) -> Result<()> {
        // SAFETY: no buffers.
        unsafe {
            self.run(Command::no_data(
                0,
                self.lun,
                scsi::synchronize_cache16(0, 0),
            ))
        }
        .map(|_| ())
    }

    /// UNMAP `blocks` blocks at `lba`.
    pub fn unmap(&mut self, lba: u64, blocks: u32) -> Result<()> {
        // SAFETY: the parameter list travels inline in the command.
        unsafe { self.run(Command::unmap(0, self.lun, lba, blocks)) }.map(|_| ())
    }

    /// PERSISTENT RESERVE IN, READ KEYS: every registered key (up to 1000).
    pub fn pr_read_keys(&mut self) -> Result<scsi::PrKeys> {
        let mut b = vec![0u8; 8 + 8 * 1000];
        let n = self.read_cmd(
            scsi::persistent_reserve_in(scsi::PrIn::ReadKeys, b.len() as u16),
            &mut b,
            false,
        )? as usize;
        scsi::PrKeys::parse(&b[..n]).ok_or_else(|| Error::Protocol("short READ KEYS data".into()))
    }

    /// PERSISTENT RESERVE IN, READ RESERVATION.
    pub fn pr_read_reservation(&mut self) -> Result<scsi::PrReservation> {
        let mut b = [0u8; 24];
        let n = self.read_cmd(
            scsi::persistent_reserve_in(scsi::PrIn::ReadReservation, b.len() as u16),
            &mut b,
            false,
        )? as usize;
        scsi::PrReservation::parse(&b[..n])
            .ok_or_else(|| Error::Protocol("bad READ RESERVATION data".into()))
    }

    /// PERSISTENT RESERVE OUT: service action `sa` of type `ty`, with our key `key` and the
    /// service action key `sa_key` (see [`scsi::PrOut`]).
    pub fn pr_out(
        &mut self,
        sa: scsi::PrOut,
        ty: Option<scsi::PrType>,
        key: u64,
        sa_key: u64,
    ) -> Result<()> {
        // SAFETY: the parameter list travels inline in the command.
        unsafe { self.run(Command::pr_out(0, self.lun, sa, ty, key, sa_key)) }.map(|_| ())
    }

    /// Logs out.
    pub fn close(self) {
        self.session.close();
    }
}

fn blocks_of(len: usize, block_size: u32) -> Result<u32> {
    if block_size == 0 || len == 0 || !len.is_multiple_of(block_size as usize) {
        return Err(Error::Invalid(format!(
            "buffer of {len} bytes is not a whole number of {block_size}-byte blocks"
        )));
    }
    u32::try_from(len / block_size as usize).map_err(|_| Error::Invalid("too many blocks".into()))
}
