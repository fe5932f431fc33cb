//! The io_uring one ring loop owns, and who owns which completions.
//!
//! Every operation pushed carries a 64-bit user data value that comes back with its
//! completion. Whoever pushes operations (the loop for its own polls and timers, each engine,
//! each layer of an engine stack) first reserves a range of those values with
//! [`Uring::reserve`] and numbers its operations inside it ([`UdRange`]); the loop then routes
//! every completion to the owner of its range. Ranges are handed out once per owner and never
//! reused: an engine replaced on a live ring (an image swapped at unpause) gets a fresh range,
//! so a late completion for the old one can never be mistaken for the new one's. The space is
//! 2^64 values; a ring loop reserves a few thousand per engine it builds.

use std::io;
use std::os::fd::RawFd;

use io_uring::{squeue, IoUring};

/// A range of user data values owned by one party of a ring loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdRange {
    base: u64,
    len: u64,
}

impl UdRange {
    /// The user data of operation `i` of this range.
    ///
    /// `i` must be below [`UdRange::len`]; a larger one is a bug in the owner, caught in debug
    /// builds (in release it would land in a later owner's range, whose owner ignores values it
    /// did not push).
    #[inline]
    pub fn ud(&self, i: u64) -> u64 {
        debug_assert!(
            i < self.len,
            "user data {i} outside a range of {}",
            self.len
        );
        self.base + i
    }

    /// Which operation of this range `ud` is, if it is in the range.
    #[inline]
    pub fn index(&self, ud: u64) -> Option<u64> {
        ud.checked_sub(self.base).filter(|&i| i < self.len)
    }

    /// Values in the range.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One completion: the user data it was pushed with, the result (a byte count or a negative
/// errno) and whether a multishot operation stays armed.
#[derive(Clone, Copy, Debug)]
pub struct Cqe {
    /// User data of the operation.
    pub ud: u64,
    /// Result: non-negative on success, `-errno` on failure.
    pub res: i32,
    /// A multishot operation posted this and is still armed.
    pub more: bool,
}

/// The loop's io_uring, with backpressure: a full submission queue is flushed to the kernel,
/// never reported as an error.
pub struct Uring {
    ring: IoUring,
    /// First user data value not yet reserved (0 is never handed out).
    next_ud: u64,
    /// Fixed-file slots handed out (`0..files_used` of [`FIXED_FILES`]).
    files_used: u32,
}

/// `IORING_ENTER_GETEVENTS`: an enter that also runs deferred completion work.
const ENTER_GETEVENTS: u32 = 1;

/// Fixed-file slots of every ring: enough for a driver stack's files (an image chain's files,
/// each opened buffered and O_DIRECT).
pub const FIXED_FILES: u32 = 128;

impl Uring {
    /// A ring with room for `entries` submissions and twice as many completions.
    pub fn new(entries: u32) -> io::Result<Uring> {
        // Single issuer + deferred task running: completions are processed when we enter the
        // kernel, never by interrupting us (kernel 6.1+), and the kernel flags the ring when
        // such work waits (so a poll enters only then); fall back to a plain ring.
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .setup_cqsize(entries * 2)
            .build(entries)
            .or_else(|_| IoUring::builder().setup_cqsize(entries * 2).build(entries))?;
        ring.submitter().register_files_sparse(FIXED_FILES)?;
        Ok(Uring {
            ring,
            next_ud: 1,
            files_used: 0,
        })
    }

    /// Reserves `len` user data values for one owner.
    pub fn reserve(&mut self, len: u64) -> UdRange {
        let base = self.next_ud;
        // 2^64 values: a loop would have to build engines for millennia to run out.
        self.next_ud = self.next_ud.saturating_add(len);
        UdRange { base, len }
    }

    /// Queues one operation.
    ///
    /// # Safety
    /// Every buffer, iovec array and descriptor `e` points to must stay valid until its
    /// completion is reaped (a timespec only until the next submit).
    pub unsafe fn push(&mut self, e: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: forwarded from the caller.
            if unsafe { self.ring.submission().push(e) }.is_ok() {
                return Ok(());
            }
            // A full submission queue: hand what is queued to the kernel and retry. (The
            // completion queue is sized for every operation the loop can have in flight, so
            // the kernel does not refuse with EBUSY; if it did, that is an error, not a spin.)
            self.ring.submit()?;
        }
    }

    /// Submits queued operations and waits for at least `want` completions.
    pub fn submit_and_wait(&mut self, want: usize) -> io::Result<usize> {
        self.ring.submit_and_wait(want)
    }

    /// Whether a completion is waiting, running the kernel's deferred completion work first
    /// if it has flagged some (one system call then; none otherwise). For polling.
    pub fn completions_ready(&mut self) -> io::Result<bool> {
        if !self.ring.completion().is_empty() {
            return Ok(true);
        }
        // SAFETY: an enter that submits nothing and passes no argument: it only runs the
        // deferred completion work and returns at once (min_complete 0).
        unsafe {
            self.ring
                .submitter()
                .enter::<libc::sigset_t>(0, 0, ENTER_GETEVENTS, None)?;
        }
        Ok(!self.ring.completion().is_empty())
    }

    /// The next completion, if one is waiting.
    pub fn next_completion(&mut self) -> Option<Cqe> {
        self.ring.completion().next().map(|c| Cqe {
            ud: c.user_data(),
            res: c.result(),
            more: io_uring::cqueue::more(c.flags()),
        })
    }

    /// Registers `fds` as fixed files; returns the slot of the first (the others follow).
    /// The slots stay the caller's until [`Uring::clear_files`].
    pub fn add_files(&mut self, fds: &[RawFd]) -> io::Result<u32> {
        let n = u32::try_from(fds.len()).unwrap_or(u32::MAX);
        let base = self.files_used;
        if n > FIXED_FILES - base {
            return Err(io::Error::other(format!(
                "a ring has {FIXED_FILES} fixed-file slots; this image chain needs more"
            )));
        }
        self.ring.submitter().register_files_update(base, fds)?;
        self.files_used = base + n;
        Ok(base)
    }

    /// Releases every fixed-file slot (before the loop builds a new engine: nothing may be in
    /// flight on them).
    pub fn clear_files(&mut self) -> io::Result<()> {
        if self.files_used > 0 {
            let none = vec![-1; self.files_used as usize];
            self.ring.submitter().register_files_update(0, &none)?;
            self.files_used = 0;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_disjoint_and_route() {
        let mut u = Uring::new(8).unwrap();
        let a = u.reserve(4);
        let b = u.reserve(10);
        let c = u.reserve(0);
        assert!(c.is_empty());
        for i in 0..4 {
            assert_eq!(a.index(a.ud(i)), Some(i));
            assert_eq!(b.index(a.ud(i)), None);
        }
        for i in 0..10 {
            assert_eq!(b.index(b.ud(i)), Some(i));
            assert_eq!(a.index(b.ud(i)), None);
        }
        assert_eq!(a.index(0), None, "0 is never handed out");
        assert_eq!(b.index(u64::MAX), None);
    }

    #[test]
    fn a_nop_comes_back_to_its_owner() {
        let mut u = Uring::new(8).unwrap();
        let _loop = u.reserve(3);
        let eng = u.reserve(5);
        let e = io_uring::opcode::Nop::new().build().user_data(eng.ud(2));
        // SAFETY: a nop points at no memory.
        unsafe { u.push(&e).unwrap() };
        u.submit_and_wait(1).unwrap();
        let c = u.next_completion().unwrap();
        assert_eq!(eng.index(c.ud), Some(2));
        assert_eq!(c.res, 0);
    }

    #[test]
    fn file_slots_are_handed_out_and_cleared() {
        let mut u = Uring::new(8).unwrap();
        let f = std::fs::File::open("/proc/self/stat").unwrap();
        use std::os::fd::AsRawFd;
        let fd = f.as_raw_fd();
        assert_eq!(u.add_files(&[fd, fd]).unwrap(), 0);
        assert_eq!(u.add_files(&[fd]).unwrap(), 2);
        let too_many = vec![fd; FIXED_FILES as usize];
        assert!(u.add_files(&too_many).is_err());
        u.clear_files().unwrap();
        assert_eq!(u.add_files(&[fd]).unwrap(), 0);
    }
}
