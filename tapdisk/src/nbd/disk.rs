//! What one NBD connection sees of the disk: a queue it submits requests to and reaps
//! completions from, with data buffers in the disk's own memory.
//!
//! The export serves every connection through [`super::ring_disk::RingDisk`]: a ring of the
//! local transport attached to the VBD, so NBD requests take the path ring requests take
//! (validation, the scheduler's ordering and merging, the driver's engine on io_uring, the
//! VBD's O_DIRECT choice). The trait lets the protocol code be driven by anything else with the
//! same contract (the fuzz target uses memory).

use std::io;
use std::os::fd::RawFd;

/// What a client asks of the disk, once the protocol checks passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmd {
    /// Fill the buffer from the disk.
    Read,
    /// Write the buffer to the disk.
    Write,
    /// Make every completed write durable.
    Flush,
    /// Free the range (reads of it return zeroes or the old data: unspecified).
    Trim,
    /// Write zeroes over the range.
    WriteZeroes,
}

/// A data buffer in the disk's memory: a read lands in it, a write comes from it.
#[derive(Debug, PartialEq, Eq)]
pub struct Buf {
    /// Which buffer (the disk's own numbering).
    pub(crate) id: u32,
    /// Bytes.
    pub(crate) len: usize,
}

impl Buf {
    /// Buffer `id` (a disk's own numbering) of `len` bytes: for implementations of [`Disk`].
    pub fn new(id: u32, len: usize) -> Buf {
        Buf { id, len }
    }

    /// Which buffer (the disk's own numbering).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Bytes in the buffer.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One request for the disk.
#[derive(Debug)]
pub struct Op {
    /// Echoed in the completion (the client's handle).
    pub cookie: u64,
    /// What to do.
    pub cmd: Cmd,
    /// Byte offset (any alignment).
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// The data is durable before the request completes.
    pub fua: bool,
    /// The data buffer of a read or a write.
    pub buf: Option<Buf>,
}

/// A finished request.
#[derive(Debug)]
pub struct Completion {
    /// The request's cookie.
    pub cookie: u64,
    /// What it was.
    pub cmd: Cmd,
    /// Done, or the NBD error to answer with.
    pub result: Result<(), u32>,
    /// Its buffer (a read's data), to send and then give back with [`Disk::free`].
    pub buf: Option<Buf>,
}

/// One connection's path to the disk.
pub trait Disk {
    /// A buffer for `len` bytes, or None until completions free memory. With nothing in
    /// flight, a buffer of up to the protocol's largest payload is always available.
    fn alloc(&mut self, len: usize) -> Option<Buf>;

    /// The bytes of `b`.
    fn data(&mut self, b: &Buf) -> &mut [u8];

    /// Gives `b` back.
    fn free(&mut self, b: Buf);

    /// Starts `op` (it may wait for room on the way). An error means the disk is gone: the
    /// connection ends.
    fn submit(&mut self, op: Op) -> io::Result<()>;

    /// Makes what was submitted visible to the disk: one notification per batch.
    fn push(&mut self) -> io::Result<()>;

    /// Moves finished requests into `out`, without waiting.
    fn reap(&mut self, out: &mut Vec<Completion>) -> io::Result<()>;

    /// Requests submitted and not yet reaped.
    fn in_flight(&self) -> usize;

    /// Publishes what was submitted and blocks until a completion is ready to reap (or
    /// nothing is in flight).
    fn wait(&mut self) -> io::Result<()>;

    /// A descriptor that polls readable when completions may be waiting; None if
    /// [`Disk::submit`] completes everything at once.
    fn wait_fd(&self) -> Option<RawFd>;

    /// Before sleeping on [`Disk::wait_fd`]: false if completions are already waiting.
    fn arm(&mut self) -> bool;

    /// A descriptor that polls hung up when the disk is gone for good (the VBD dropped the
    /// connection's ring: it failed, or it is closing), so a connection waiting for
    /// completions ends instead of waiting forever; None if it cannot go.
    fn gone_fd(&self) -> Option<RawFd> {
        None
    }

    /// Bytes of buffer memory held now.
    fn held(&self) -> u64;

    /// The client is idle: give back buffer memory beyond a small amount.
    fn release_idle(&mut self);
}
