//! IO engines: what does a backend IO once the scheduler has built it.
//!
//! Every ring loop owns one io_uring ([`Uring`]) and one engine ([`Engine`]). The scheduler
//! hands the engine [`BackendIo`]s (a vectored read or write, a flush or a discard, tagged with
//! a `u32`); the engine pushes whatever io_uring operations it needs, receives their
//! completions back from the loop ([`Engine::complete`]), and reports each IO once, finished
//! or failed, into a [`Done`] list. Short transfers and `EAGAIN` are the engine's business: a
//! data IO is reported either complete or as an error.
//!
//! User data of the loop's io_uring is split by the top byte: [`ENGINE_SPACE`] for engines,
//! the rest for the loop's own tokens (event channel, control, hang-up, timers).
//!
//! Engines here: [`aio::AioEngine`] (a raw file or block device), [`parallax::ParallaxEngine`]
//! (Parallax's translation in front of its store's engine), [`stripe::StripeEngine`] (a disk
//! striped over iSCSI servers); wrappers: [`model`] (slow
//! storage models: the thesis's spindle, a network link) and [`fault`] (fault injection).

pub mod aio;
pub mod fault;
pub mod model;
pub mod parallax;
pub mod stripe;

use std::io;

use io_uring::{squeue, IoUring};

/// User data values below this belong to the engine.
pub const ENGINE_SPACE: u64 = 1 << 56;

/// The loop's io_uring, with backpressure: a full submission queue is flushed to the kernel,
/// never reported as an error.
pub struct Uring {
    ring: IoUring,
}

impl Uring {
    /// A ring with room for `entries` submissions and twice as many completions.
    pub fn new(entries: u32) -> io::Result<Uring> {
        // Single issuer + deferred task running: completions are processed when we enter the
        // kernel, never by interrupting us (kernel 6.1+); fall back to a plain ring.
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_cqsize(entries * 2)
            .build(entries)
            .or_else(|_| IoUring::builder().setup_cqsize(entries * 2).build(entries))?;
        Ok(Uring { ring })
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

    /// The next completion: `(user_data, result, more)`.
    pub fn next_completion(&mut self) -> Option<(u64, i32, bool)> {
        self.ring
            .completion()
            .next()
            .map(|c| (c.user_data(), c.result(), io_uring::cqueue::more(c.flags())))
    }

    /// Registers descriptors as fixed files (slots `0..fds.len()`), or replaces them.
    pub fn register_files(&mut self, fds: &[i32], update: bool) -> io::Result<()> {
        if update {
            self.ring
                .submitter()
                .register_files_update(0, fds)
                .map(|_| ())
        } else {
            self.ring.submitter().register_files(fds)
        }
    }

    /// Drops every registered file.
    pub fn unregister_files(&mut self) -> io::Result<()> {
        self.ring.submitter().unregister_files()
    }
}

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

    /// A completion of the loop's ring whose user data is below [`ENGINE_SPACE`].
    fn complete(
        &mut self,
        ring: &mut Uring,
        user_data: u64,
        res: i32,
        done: &mut Done,
    ) -> io::Result<()>;

    /// A short name for logs and stats ("aio", "model disk over aio").
    fn describe(&self) -> String;

    /// How many IOs this engine wants in flight at most (None: as many as it gets). A
    /// device that serves one IO at a time says so, and the scheduler keeps the rest, where
    /// they can still be sorted and merged.
    fn max_in_flight(&self) -> Option<u32> {
        None
    }

    /// For engines whose IOs complete on other threads (network storage): a descriptor that
    /// polls readable when completions are waiting. The ring loop polls it on its io_uring
    /// and then calls [`Engine::on_poll`].
    fn poll_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }

    /// The memory of every IO is unmapped as soon as the IO completes (a Xen ring's grant
    /// mappings): never do direct IO into it. Linux posts a direct IO's completion before it
    /// releases its pins on the pages (iomap completes the iocb, then releases the last bio's
    /// pages, for reads possibly later from a workqueue), and a grant unmapped while a pin is
    /// held is not unmapped: gntdev defers it, the pages' PTEs are torn down under it (kernel
    /// warnings in `free_zone_device_folio` and `__unmap_grant_pages_done`), and the guest,
    /// finding its grant still in use after the response, fails the request. Buffered IO
    /// copies in the kernel and holds no pin past the syscall. Wrappers pass this on.
    fn unpinned_memory_only(&mut self) {}

    /// [`Engine::poll_fd`] was readable: report what completed into `done`.
    fn on_poll(&mut self, _ring: &mut Uring, _done: &mut Done) -> io::Result<()> {
        Ok(())
    }
}
