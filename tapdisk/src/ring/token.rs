//! The loop's own io_uring operations, as a typed token: what woke the loop up.
//!
//! The loop reserves one user data range for these ([`Tokens`]); every other completion
//! belongs to the engine.

use std::os::fd::RawFd;

use io_uring::{opcode, squeue, types};

use crate::sys::uring::{UdRange, Uring};

/// What one of the loop's own operations waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Token {
    /// The event channel (multishot poll): the frontend kicked.
    Evtchn,
    /// The control eventfd (multishot poll): the VBD wants the loop to look at its flags.
    Control,
    /// The frontend's socket hung up (one-shot poll).
    Hangup,
    /// The batch timer fired.
    BatchTimer,
    /// The frontend faulted on guest memory (userfaultfd, multishot poll).
    Uffd,
    /// The engine's completion descriptor (multishot poll).
    EnginePoll,
    /// An engine poll was cancelled (image swap).
    Cancel,
    /// A read that drained the kick eventfd (eventfd transports).
    KickDrain,
    /// A write that notified the frontend (eventfd transports).
    Notify,
}

impl Token {
    const ALL: [Token; 9] = [
        Token::Evtchn,
        Token::Control,
        Token::Hangup,
        Token::BatchTimer,
        Token::Uffd,
        Token::EnginePoll,
        Token::Cancel,
        Token::KickDrain,
        Token::Notify,
    ];

    fn index(self) -> u64 {
        self as u64
    }
}

/// The loop's user data range.
#[derive(Clone, Copy, Debug)]
pub struct Tokens(UdRange);

impl Tokens {
    /// Reserves the range on `ring`.
    pub fn reserve(ring: &mut Uring) -> Tokens {
        Tokens(ring.reserve(Token::ALL.len() as u64))
    }

    /// The user data of `t`.
    pub fn ud(&self, t: Token) -> u64 {
        self.0.ud(t.index())
    }

    /// Which token `ud` is, if it is one of the loop's.
    pub fn decode(&self, ud: u64) -> Option<Token> {
        self.0
            .index(ud)
            .and_then(|i| Token::ALL.get(i as usize).copied())
    }

    /// A multishot poll for readability of `fd`, completing as `t`.
    pub fn poll_multi(&self, fd: RawFd, t: Token) -> squeue::Entry {
        opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(self.ud(t))
    }

    /// A one-shot poll for `fd` hanging up (or becoming readable), completing as `t`.
    pub fn poll_hangup(&self, fd: RawFd, t: Token) -> squeue::Entry {
        opcode::PollAdd::new(types::Fd(fd), (libc::POLLIN | libc::POLLRDHUP) as u32)
            .build()
            .user_data(self.ud(t))
    }

    /// Cancels the operation that completes as `target`; the cancellation completes as
    /// [`Token::Cancel`].
    pub fn cancel(&self, target: Token) -> squeue::Entry {
        opcode::AsyncCancel::new(self.ud(target))
            .build()
            .user_data(self.ud(Token::Cancel))
    }

    /// A timeout of `ts`, completing as [`Token::BatchTimer`].
    pub fn batch_timer(&self, ts: &types::Timespec) -> squeue::Entry {
        opcode::Timeout::new(ts)
            .build()
            .user_data(self.ud(Token::BatchTimer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_nothing_else_decodes() {
        let mut u = Uring::new(4).unwrap();
        let before = u.reserve(3);
        let t = Tokens::reserve(&mut u);
        let after = u.reserve(3);
        for tok in Token::ALL {
            assert_eq!(t.decode(t.ud(tok)), Some(tok));
        }
        for i in 0..3 {
            assert_eq!(t.decode(before.ud(i)), None);
            assert_eq!(t.decode(after.ud(i)), None);
        }
    }
}
