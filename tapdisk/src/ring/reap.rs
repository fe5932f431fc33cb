//! Reaping: every completion of the loop's io_uring goes to its owner, one of the loop's own
//! tokens or the engine; the IOs the engine reports done go to the scheduler.

use std::io;

use blkif::protocol::PAGE_SIZE;
use blkif::transport::EventChannel;
use slog::warn;

use super::token::Token;
use super::{LoopState, RingExit, RingLoop, RingTransport};
use crate::sched::IoCx;
use crate::sys::uring::Cqe;
use crate::trace::now_ns;

impl<T: RingTransport> RingLoop<T> {
    /// Handles every completion waiting.
    pub(super) fn reap(&mut self) -> io::Result<()> {
        let mut now = 0u64;
        while let Some(cqe) = self.uring.next_completion() {
            match self.tokens.decode(cqe.ud) {
                Some(tok) => self.on_token(tok, cqe, &mut now)?,
                None => {
                    self.backend.engine_mut().complete(
                        &mut self.uring,
                        cqe,
                        &mut self.scratch.done,
                    )?;
                    self.process_done(&mut now)?;
                }
            }
        }
        if now != 0 {
            // Answering comes next: what completed at this reading is answered at it.
            self.clock.hand_over(now);
        }
        Ok(())
    }

    fn on_token(&mut self, tok: Token, cqe: Cqe, now: &mut u64) -> io::Result<()> {
        match tok {
            Token::Evtchn => {
                match self.kicks.as_mut().map(|k| k.drain(&self.tokens)) {
                    None => self.t.parts().2.ack()?,
                    Some(Some(e)) => self.push_sqe(&e)?,
                    Some(None) => {}
                }
                self.eoi_due = true;
                if !cqe.more {
                    let fd = self.t.parts().2.fd();
                    self.push_sqe(&self.tokens.poll_multi(fd, Token::Evtchn))?;
                }
            }
            Token::Control => {
                self.env.ctl.ack();
                if !cqe.more {
                    let fd = self.env.ctl.wake_fd();
                    self.push_sqe(&self.tokens.poll_multi(fd, Token::Control))?;
                }
            }
            Token::Hangup => {
                if !matches!(self.state, LoopState::Stopping(_)) {
                    self.state = LoopState::Stopping(RingExit::FrontendGone);
                }
            }
            Token::BatchTimer => self.intake.timer_fired(),
            Token::Uffd => {
                self.handle_faults()?;
                if !cqe.more {
                    if let Some(fd) = self.t.early_read().map(|p| p.uffd.fd()) {
                        self.push_sqe(&self.tokens.poll_multi(fd, Token::Uffd))?;
                    }
                }
            }
            Token::EnginePoll => {
                if cqe.res == -libc::ECANCELED {
                    return Ok(());
                }
                self.backend
                    .engine_mut()
                    .on_poll(&mut self.uring, &mut self.scratch.done)?;
                self.process_done(now)?;
                if !cqe.more {
                    self.arm_engine_poll()?;
                }
            }
            Token::Cancel => {}
            Token::KickDrain => {
                if let Some(k) = self.kicks.as_mut() {
                    k.drained();
                }
            }
            Token::Notify => {
                if cqe.res < 0 {
                    return Err(io::Error::from_raw_os_error(-cqe.res));
                }
            }
        }
        Ok(())
    }

    /// Hands what the engine reported done to the scheduler.
    fn process_done(&mut self, now: &mut u64) -> io::Result<()> {
        if self.scratch.done.0.is_empty() {
            return Ok(());
        }
        if *now == 0 {
            *now = self.clock.now();
        }
        let mut cx = IoCx {
            table: &mut self.table,
            ring: &mut self.uring,
            engine: self.backend.engine_mut(),
            stats: &self.env.stats,
        };
        for &(tag, r) in &self.scratch.done.0 {
            if r < 0 && self.guest_errors.check().is_some() {
                let e = io::Error::from_raw_os_error(-r);
                warn!(self.env.log, "IO failed"; "error" => %e, "io" => tag);
            }
            self.sched.io_done(&mut cx, tag, r, *now)?;
        }
        self.scratch.done.0.clear();
        Ok(())
    }

    /// The frontend faulted on guest memory: map pages that are filled (or belong to no
    /// read), leave the others stalled until their data is in.
    fn handle_faults(&mut self) -> io::Result<()> {
        let now = now_ns();
        let Some(port) = self.t.early_read() else {
            return Ok(());
        };
        while let Some(f) = port.uffd.read_fault()? {
            let Some(page) = port.page_of(f.address) else {
                // Not guest memory: the frontend registered more than it told us. Map it
                // anyway so its thread does not hang; the frontend is on its own there.
                let _ = port
                    .uffd
                    .continue_range(f.address & !(PAGE_SIZE as u64 - 1), PAGE_SIZE as u64);
                continue;
            };
            let early = &self.env.stats.early;
            let stalled = match self.early.as_mut() {
                Some(layer) => layer.faulted(page, now, early),
                None => {
                    early.faults.add(1);
                    false
                }
            };
            if stalled {
                continue;
            }
            if let Some(a) = port.page_addr(page) {
                if let Err(e) = port.uffd.continue_range(a, PAGE_SIZE as u64) {
                    if self.guest_errors.check().is_some() {
                        warn!(self.env.log, "cannot map a page the frontend faulted on";
                              "page" => page, "error" => %e);
                    }
                }
            }
        }
        Ok(())
    }
}

/// For the loop's own error paths.
impl From<blkif::request::Problem> for RingExit {
    fn from(p: blkif::request::Problem) -> Self {
        RingExit::Broken(p.to_string())
    }
}
