//! Kicks in and notifications out through the loop's io_uring, where the event channel is a
//! pair of eventfds (the local transport).
//!
//! Elsewhere a kick costs the loop a `read` to consume it and a notification a `write` (or,
//! on Xen, an ioctl), each a system call of its own. With eventfds both become io_uring
//! operations that ride on the `io_uring_enter` the loop makes anyway: a kick seen by the
//! multishot poll queues an 8-byte read that drains the eventfd, and publishing responses
//! queues an 8-byte write to the frontend's. Both complete at once (the eventfds are
//! nonblocking and the read is only queued once the poll saw a count), so nothing stays in
//! flight across iterations; the loop still tracks the drain so that it never has two queued
//! or leaves one behind when it returns.
//!
//! Ordering: the poll, not the read, is what makes the loop look at the ring again. A kick
//! that lands after the loop looked but before the drain ran is consumed by the drain, but
//! its write already woke the poll, which posts another completion; and before sleeping the
//! loop re-arms `req_event` and looks once more ([`blkif::ring::BackRing::final_check`]).

use io_uring::{opcode, squeue, types};

use super::token::{Token, Tokens};
use super::transport::EventFds;

/// The eventfds and the two 8-byte buffers the kernel reads and writes.
pub struct UringKicks {
    fds: EventFds,
    /// Where a drain's count lands (written by the kernel during the enter).
    drained: Box<u64>,
    /// The value a notification adds (read by the kernel during the enter).
    one: Box<u64>,
    /// A drain is queued or running.
    draining: bool,
}

impl UringKicks {
    /// Kicks and notifications over `fds`.
    pub fn new(fds: EventFds) -> UringKicks {
        UringKicks {
            fds,
            drained: Box::new(0),
            one: Box::new(1),
            draining: false,
        }
    }

    /// The read that drains the kick eventfd, unless one is already queued.
    pub fn drain(&mut self, tokens: &Tokens) -> Option<squeue::Entry> {
        if self.draining {
            return None;
        }
        self.draining = true;
        let buf: *mut u64 = &mut *self.drained;
        Some(
            opcode::Read::new(types::Fd(self.fds.kick), buf.cast(), 8)
                .build()
                .user_data(tokens.ud(Token::KickDrain)),
        )
    }

    /// The drain completed.
    pub fn drained(&mut self) {
        self.draining = false;
    }

    /// The write that notifies the frontend.
    pub fn notify(&self, tokens: &Tokens) -> squeue::Entry {
        let buf: *const u64 = &*self.one;
        opcode::Write::new(types::Fd(self.fds.notify), buf.cast(), 8)
            .build()
            .user_data(tokens.ud(Token::Notify))
    }
}
