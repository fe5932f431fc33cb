//! The reservation a session takes right after each login ([`Registration`]): persistent
//! reservation commands run one at a time on a scratch connection over the new socket, before
//! the session's own commands go out.

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::config::{Config, Registration};
use crate::conn::{Command, Completion, Conn};
use crate::error::{Error, IoError, Result};
use crate::login::LoggedIn;
use crate::scsi::{self, PrOut, PrType};
use crate::session::SockWire;

/// Runs `cmd` alone on a scratch connection over a socket just logged in, blocking until its
/// completion or `deadline`.
///
/// # Safety
/// As [`Session::submit`]: the command's buffers stay valid until this returns (it waits for
/// the completion, or gives up on the whole connection).
unsafe fn run_one(
    conn: &mut Conn,
    stream: &TcpStream,
    cmd: Command,
    deadline: Instant,
) -> Result<u32> {
    let mut wire = SockWire(stream);
    conn.enqueue(cmd);
    let mut done = None;
    loop {
        let mut out = |c: Completion| done = Some(c.result);
        conn.flush(&mut wire, &mut out)?;
        conn.receive(&mut wire, &mut out)?;
        if let Some(r) = done.take() {
            return r.map_err(Error::Command);
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout("taking the reservation after login"));
        }
        let mut p = libc::pollfd {
            fd: stream.as_raw_fd(),
            events: libc::POLLIN | if conn.wants_write() { libc::POLLOUT } else { 0 },
            revents: 0,
        };
        // SAFETY: one valid pollfd on the stack.
        unsafe {
            libc::poll(&mut p, 1, 50);
        }
        conn.wake_rx();
    }
}

/// Takes `reg`'s reservation over a connection just logged in (see [`Registration`]), on each
/// of its LUNs, one command at a time on a scratch [`Conn`] within the login's deadline:
/// registers the key for this I_T nexus, then makes sure the LUN is reserved "write exclusive,
/// registrants only" by that key. A reservation or registration of a lower key (an older
/// writer) is preempted; one of a higher key means a newer writer exists, and the login fails
/// with [`Error::Fenced`]. Returns the login with its sequence numbers moved on.
pub(crate) fn register(
    cfg: &Config,
    stream: &TcpStream,
    logged: LoggedIn,
    reg: &Registration,
    deadline: Instant,
) -> Result<LoggedIn> {
    let key = reg.key.load(Ordering::SeqCst);
    if key == 0 || reg.luns.is_empty() {
        return Ok(logged);
    }
    let mut conn = Conn::new(
        1,
        cfg.offer.max_recv_data_segment,
        cfg.nop_interval,
        cfg.nop_timeout,
    );
    conn.bind(&logged);
    let wero = Some(PrType::WriteExclusiveRegistrantsOnly);
    for &lun in &reg.luns {
        let out = |sa, ty, sa_key| Command::pr_out(0, lun, sa, ty, key, sa_key);
        // PR OUT parameter lists travel inline; PR IN reads into `buf`, which outlives each
        // `run_one` (it waits for the completion): the SAFETY of every call below.
        // SAFETY: as just said.
        unsafe {
            run_one(
                &mut conn,
                stream,
                Command::pr_out(0, lun, PrOut::RegisterAndIgnoreExistingKey, None, 0, key),
                deadline,
            )?;
        }
        let mut buf = vec![0u8; 8 + 8 * 512];
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let cdb = scsi::persistent_reserve_in(scsi::PrIn::ReadKeys, buf.len() as u16);
        // SAFETY: as above.
        let n = unsafe {
            run_one(
                &mut conn,
                stream,
                Command {
                    exact: false,
                    ..Command::read(0, lun, cdb, buf.len() as u32, &iov, 1)
                },
                deadline,
            )?
        } as usize;
        let keys = scsi::PrKeys::parse(&buf[..n.min(buf.len())])
            .ok_or_else(|| Error::Protocol("short READ KEYS data".into()))?;
        if let Some(&newer) = keys.keys.iter().filter(|&&k| k > key).max() {
            return Err(Error::Fenced {
                target: cfg.target.clone(),
                lun,
                key,
                newer,
            });
        }
        let cdb = scsi::persistent_reserve_in(scsi::PrIn::ReadReservation, 24);
        // SAFETY: as above.
        let n = unsafe {
            run_one(
                &mut conn,
                stream,
                Command {
                    exact: false,
                    ..Command::read(0, lun, cdb, 24, &iov, 1)
                },
                deadline,
            )?
        } as usize;
        let res = scsi::PrReservation::parse(&buf[..n.min(24)])
            .ok_or_else(|| Error::Protocol("bad READ RESERVATION data".into()))?;
        match res.holder {
            None => {
                // SAFETY: as above.
                unsafe { run_one(&mut conn, stream, out(PrOut::Reserve, wero, 0), deadline)? };
            }
            Some((holder, _)) if holder == key => {}
            Some((holder, _)) => {
                // A lower key (checked above): an older writer. Take its reservation over.
                // SAFETY: as above.
                unsafe {
                    run_one(
                        &mut conn,
                        stream,
                        out(PrOut::Preempt, wero, holder),
                        deadline,
                    )?
                };
            }
        }
        // Older writers' other registrations go too (each key once; a key may be listed for
        // many of its I_T nexuses).
        let mut older: Vec<u64> = keys.keys.into_iter().filter(|&k| k != key).collect();
        older.sort_unstable();
        older.dedup();
        for k in older {
            // SAFETY: as above.
            match unsafe { run_one(&mut conn, stream, out(PrOut::Preempt, wero, k), deadline) } {
                // Gone already (the reservation's preempt above took it).
                Ok(_) | Err(Error::Command(IoError::Status(scsi::STATUS_RESERVATION_CONFLICT))) => {
                }
                Err(e) => return Err(e),
            }
        }
    }
    let (cmd_sn, exp_stat_sn, max_cmd_sn) = conn.sequence();
    Ok(LoggedIn {
        cmd_sn,
        exp_stat_sn,
        max_cmd_sn,
        ..logged
    })
}
