//! NBD export of a VBD's image.
//!
//! [`NbdServer`] serves one [`Export`] over the Network Block Device protocol
//! (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>) on a unix or TCP
//! socket, so tools such as `qemu-img`, `qemu-io`, `nbdcopy` or the kernel's `nbd-client` can
//! read and write the disk a guest sees.
//!
//! What is implemented:
//! - Handshake: fixed newstyle only, with `NO_ZEROES`. Options `EXPORT_NAME`, `ABORT`, `LIST`,
//!   `INFO` and `GO` (`INFO_EXPORT`, `INFO_BLOCK_SIZE` = 1 / 4096 / 32 MiB, `INFO_NAME` and
//!   `INFO_DESCRIPTION` when asked). Anything else (TLS, structured replies, metadata contexts,
//!   extended headers) is answered `REP_ERR_UNSUP` and the handshake goes on. The export is
//!   found under its configured name and under the empty (default) name.
//! - Transmission: simple replies; `READ`, `WRITE` (with `FUA`), `FLUSH`, `TRIM` (if the
//!   target supports discard), `WRITE_ZEROES` (`NO_HOLE` ignored), `DISC`.
//!
//! Errors follow the protocol's recommendations: `EPERM` for writes to a read-only export,
//! `ENOSPC` for writes past the end, `EINVAL` for reads/trims past the end, zero lengths,
//! unknown flags and unknown commands, and backend errors mapped by [`proto::errno_of`].
//! A READ over 32 MiB gets `EINVAL`; a WRITE over 32 MiB gets `EINVAL` and the connection is
//! closed, because a client that ignored the advertised limit may or may not send the payload
//! and the stream cannot be resynchronised. Protocol violations (bad magic, unknown client
//! flags, option data over 64 KiB, truncated messages) close the connection with a log line.
//! No allocation is driven by the client beyond one payload buffer of at most 32 MiB and one
//! option buffer of at most 64 KiB per connection.
//!
//! Where requests go: each connection that reaches transmission gets its own [`Disk`], which
//! for a VBD's export is a ring of the local transport attached to the VBD
//! ([`ring_disk::RingDisk`]): NBD requests are validated, ordered, sorted and merged by the
//! same code as a guest's, and the driver's engine does their IO on io_uring, honouring the
//! VBD's O_DIRECT setting. A connection pipelines: it keeps reading requests while earlier ones
//! are in flight and answers each as it completes ([`transmission`]). Requests not aligned to
//! 512 bytes are done alone, by read-modify-write of the sectors they touch.
//!
//! Threads: one accepts connections (polling the listener and a wake-up socket, so shutdown
//! never waits for a client), and each connection gets its own thread with blocking IO (the
//! VBD serves its ring with a ring thread of its own).
//!
//! Time and slots ([`slots`]): at most [`MAX_CONNECTIONS`] clients are served at once, more
//! wait in line for a slot; a client must reach transmission within [`HANDSHAKE_DEADLINE`] of
//! getting its slot (the whole handshake, not each read); a waiting client takes the slot of
//! one stalled in its handshake past [`HANDSHAKE_GRACE`] or idle in transmission past
//! [`IDLE_EVICT`]. Clients that trickle, loop on options or sit idle cannot keep another
//! client waiting longer than [`IDLE_EVICT`] (plus the accept thread's check interval). [`NbdServer::shutdown`] stops
//! accepting, shuts the client sockets down, and joins every thread; a connection whose ring is
//! paused finishes once the VBD resumes or closes.

pub mod conn;
pub mod disk;
pub mod handshake;
mod pages;
pub mod proto;
pub mod ring_disk;
mod server;
pub mod slots;
pub mod stream;
#[cfg(test)]
mod tests;
pub mod transmission;

pub use conn::serve;
pub use disk::{Buf, Cmd, Completion, Disk, Op};
pub use handshake::ExportInfo;
pub use server::{Export, NbdServer};
pub use stream::{End, Source};
pub use tapdisk_control::NbdListen;
pub use transmission::ConnCx;
pub use transmission::Counters;

/// Most clients served at once. When all are taken, a newcomer waits in line for the slot of
/// a client stalled in its handshake or idle ([`slots`]).
pub const MAX_CONNECTIONS: usize = 64;

pub use slots::{HANDSHAKE_DEADLINE, HANDSHAKE_GRACE, IDLE_EVICT, MAX_WAITING, WAIT_DEADLINE};

/// A client in transmission that sends nothing for this long gives back its payload buffer
/// beyond [`stream::KEEP_IDLE`] (it stays connected: idle NBD clients are normal).
pub const IDLE_RELEASE: std::time::Duration = if cfg!(test) {
    std::time::Duration::from_millis(200)
} else {
    std::time::Duration::from_secs(2)
};
