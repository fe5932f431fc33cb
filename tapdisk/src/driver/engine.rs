//! The engine interface: what does a backend IO once the scheduler has built it.
//!
//! Every ring loop owns one io_uring ([`Uring`]) and one engine ([`Engine`]), built by the
//! VBD's driver ([`super::Driver::engine`]) and possibly wrapped in layers
//! ([`super::layer`]). The scheduler hands the engine [`BackendIo`]s (a vectored read or
//! write, a flush or a discard, tagged with a `u32`); the engine pushes whatever io_uring
//! operations it needs, numbered inside a user data range it reserved ([`UdRange`]), receives
//! their completions back from the loop ([`Engine::complete`]), and reports each IO once,
//! finished or failed, into a [`Done`] list. Short transfers and `EAGAIN` are the engine's
//! business: a data IO is reported either complete or as an error.

use std::io;

pub use crate::sys::uring::{Cqe, UdRange, Uring};
pub use blkif::transport::Memory;

/// [`Engine::lanes`] of storage that says nothing better: enough IOs side by side for a
/// solid-state device or a file system over one, few enough that each stays large.
pub const DEFAULT_LANES: u32 = 8;

/// What a backend IO does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOp {
    /// Read into the iovecs.
    Read,
    /// Write from the iovecs.
    Write,
    /// Make every completed write durable (`fdatasync`).
    Flush,
    /// Free the range (hole punch, BLKDISCARD; BLKSECDISCARD if secure).
    Discard {
        /// Secure discard.
        secure: bool,
    },
}

impl IoOp {
    /// Whether the IO changes the disk (for ordering).
    pub fn modifies(self) -> bool {
        matches!(self, IoOp::Write | IoOp::Discard { .. })
    }
}

/// One IO for an engine.
#[derive(Clone, Copy, Debug)]
pub struct BackendIo {
    /// Echoed in the completion.
    pub tag: u32,
    /// What to do.
    pub op: IoOp,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Bytes (for reads and writes, the sum of the iovec lengths).
    pub len: u64,
    /// The iovec array (reads and writes).
    pub iov: *mut libc::iovec,
    /// Its length.
    pub iovcnt: u32,
    /// What the memory behind the iovecs is: pages unmapped as soon as the IO is done never
    /// get direct IO ([`Memory::UnmappedAfterIo`] says why).
    pub memory: Memory,
}

impl BackendIo {
    /// No IO: what per-tag state holds before its first.
    pub const IDLE: BackendIo = BackendIo {
        tag: 0,
        op: IoOp::Read,
        offset: 0,
        len: 0,
        iov: std::ptr::null_mut(),
        iovcnt: 0,
        memory: Memory::Stable,
    };
}

/// Completions an engine reports: `(tag, result)`, where result is 0 or a negative errno.
/// Preallocated by the loop for every tag, so pushing never allocates.
#[derive(Debug, Default)]
pub struct Done(pub Vec<(u32, i32)>);

impl Done {
    /// A list with room for `tags` completions.
    pub fn with_capacity(tags: usize) -> Done {
        Done(Vec::with_capacity(tags))
    }

    /// Reports one IO.
    #[inline]
    pub fn push(&mut self, tag: u32, res: i32) {
        self.0.push((tag, res));
    }
}

/// Does backend IOs for one ring loop.
pub trait Engine {
    /// Starts `io`.
    ///
    /// # Safety
    /// The iovec array and the memory it points to must stay valid, and untouched by the
    /// caller, until the engine reports `io.tag` in [`Done`]; the engine may rewrite the
    /// iovecs (to resume a short transfer). Tags must be below the engine's tag count and not
    /// in flight. An engine that finishes an IO at once (a synchronous ioctl) reports it in
    /// `done` before returning.
    unsafe fn submit(&mut self, ring: &mut Uring, io: BackendIo, done: &mut Done)
        -> io::Result<()>;

    /// A completion of the loop's ring that is not the loop's own: the engine (or one of its
    /// layers) pushed it, in a range it reserved. A value in no range of the engine is ignored.
    fn complete(&mut self, ring: &mut Uring, cqe: Cqe, done: &mut Done) -> io::Result<()>;

    /// A short name for logs and stats ("aio", "model disk over aio").
    fn describe(&self) -> String;

    /// How many IOs this engine wants in flight at most (None: as many as it gets). A
    /// device that serves one IO at a time says so, and the scheduler keeps the rest, where
    /// they can still be sorted and merged.
    fn max_in_flight(&self) -> Option<u32> {
        None
    }

    /// How many IOs the storage works on at once (its queues, spindles, servers). The
    /// scheduler never merges what is ready into fewer, larger IOs than this while it has
    /// room: one 16 MiB IO on a device that could run eight 2 MiB IOs side by side finishes
    /// later, not sooner.
    fn lanes(&self) -> u32 {
        DEFAULT_LANES
    }

    /// For engines whose IOs complete on other threads (network storage): a descriptor that
    /// polls readable when completions are waiting. The ring loop polls it on its io_uring
    /// and then calls [`Engine::on_poll`].
    fn poll_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }

    /// [`Engine::poll_fd`] was readable: report what completed into `done`.
    fn on_poll(&mut self, _ring: &mut Uring, _done: &mut Done) -> io::Result<()> {
        Ok(())
    }
}

/// Helpers for driver tests: one IO at a time through an engine, waiting for its completion.
#[cfg(test)]
pub mod testing {
    use super::*;

    /// One IO to run, over a caller's buffer.
    pub struct Step {
        op: IoOp,
        offset: u64,
        len: u64,
        iov: Option<libc::iovec>,
    }

    impl Step {
        /// A write of `data` at `offset`.
        pub fn write(offset: u64, data: &[u8]) -> Step {
            Step {
                op: IoOp::Write,
                offset,
                len: data.len() as u64,
                iov: Some(libc::iovec {
                    iov_base: data.as_ptr() as *mut libc::c_void,
                    iov_len: data.len(),
                }),
            }
        }

        /// A read into `buf` from `offset`.
        pub fn read(offset: u64, buf: &mut [u8]) -> Step {
            Step {
                op: IoOp::Read,
                offset,
                len: buf.len() as u64,
                iov: Some(libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: buf.len(),
                }),
            }
        }

        /// An IO without data (flush, discard).
        pub fn op(op: IoOp, offset: u64, len: u64) -> Step {
            Step {
                op,
                offset,
                len,
                iov: None,
            }
        }
    }

    /// Runs `step` as tag 0 and returns its result (0 or `-errno`).
    pub fn run(e: &mut dyn Engine, ring: &mut Uring, step: Step) -> i32 {
        let mut iov = step.iov;
        let io = BackendIo {
            tag: 0,
            op: step.op,
            offset: step.offset,
            len: step.len,
            iov: iov
                .as_mut()
                .map_or(std::ptr::null_mut(), |v| v as *mut libc::iovec),
            iovcnt: u32::from(iov.is_some()),
            memory: Memory::Stable,
        };
        let mut done = Done::with_capacity(4);
        // SAFETY: the iovec (on this stack frame) and the buffer it points at (borrowed by the
        // step's constructor for the caller's lifetime) stay valid until the engine reports
        // tag 0, which this function waits for before returning.
        unsafe { e.submit(ring, io, &mut done).expect("submit") };
        while done.0.is_empty() {
            ring.submit_and_wait(1).expect("io_uring wait");
            while let Some(c) = ring.next_completion() {
                e.complete(ring, c, &mut done).expect("complete");
            }
        }
        done.0[0].1
    }

    /// Two disks over one shared base (`one` and `two`, opened in this process; the base holds
    /// 0x11 in the 8 KiB at 1 MiB): a write through one is not seen through the other, and the
    /// base's metadata cache is one (level 1 of both disks' stats counts both disks' lookups).
    pub fn check_shared_base(
        one: &std::sync::Arc<dyn crate::driver::Image>,
        two: &std::sync::Arc<dyn crate::driver::Image>,
    ) {
        const MB: u64 = 1 << 20;
        let mut ring = Uring::new(32).unwrap();
        let mut e1 = one.clone().engine(&mut ring, 2).unwrap();
        let mut e2 = two.clone().engine(&mut ring, 2).unwrap();
        assert_eq!(
            run(&mut *e1, &mut ring, Step::write(MB, &[0x33u8; 4096])),
            0
        );
        let mut got = vec![0u8; 8192];
        assert_eq!(run(&mut *e2, &mut ring, Step::read(MB, &mut got)), 0);
        assert!(got.iter().all(|&x| x == 0x11), "the clones diverge");
        assert_eq!(run(&mut *e1, &mut ring, Step::read(MB, &mut got)), 0);
        assert!(got[..4096].iter().all(|&x| x == 0x33));
        assert!(got[4096..].iter().all(|&x| x == 0x11));
        assert_eq!(
            one.stats()["levels"][1]["cache"],
            two.stats()["levels"][1]["cache"]
        );
    }
}
