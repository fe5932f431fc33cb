//! A native iSCSI initiator (RFC 7143) for tapdisk-rs, shaped for the `stripe:` driver: one
//! [`Session`] per storage server, fed from a single-threaded event loop without blocking,
//! locking, allocating or copying per IO.
//!
//! # What it speaks
//!
//! - Discovery sessions ([`discover`], `SendTargets=All`) and normal sessions.
//! - Login without authentication or with one-way CHAP (`CHAP_A=5`, MD5; [`Chap`]). A wrong
//!   secret is [`Error::AuthFailed`]; a target that wants CHAP from an unconfigured initiator
//!   is [`Error::AuthMismatch`].
//! - Operational negotiation ([`text::Offer`] -> [`text::Params`]): MaxRecvDataSegmentLength
//!   (declarative, both ways), MaxBurstLength, FirstBurstLength, ImmediateData, InitialR2T,
//!   MaxOutstandingR2T, HeaderDigest and DataDigest (None or CRC32C), ErrorRecoveryLevel=0.
//! - Many tagged commands in flight, within the CmdSN window the target opens with MaxCmdSN.
//! - Data-In (including status in the last Data-In), R2T-solicited Data-Out, immediate data and
//!   unsolicited Data-Out up to FirstBurstLength.
//! - SCSI: TEST UNIT READY, INQUIRY, READ CAPACITY(16), REPORT LUNS, READ(16), WRITE(16),
//!   SYNCHRONIZE CACHE(16), UNMAP, PERSISTENT RESERVE IN (READ KEYS, READ RESERVATION) and OUT
//!   (REGISTER, REGISTER AND IGNORE EXISTING KEY, RESERVE, RELEASE, CLEAR, PREEMPT) ([`scsi`]);
//!   a session can register a reservation key after every login ([`Registration`]), so a
//!   writer that holds a "registrants only" reservation keeps writing across reconnects. CHECK CONDITION sense data (fixed or descriptor
//!   format) is decoded into [`IoError::Check`], which names the sense key and, for the codes
//!   a block device meets, the ASC/ASCQ ("ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE").
//! - NOP-In/NOP-Out: target pings are answered; after [`Config::nop_interval`] of silence we
//!   ping, and a ping unanswered for [`Config::nop_timeout`] drops the connection, as does a
//!   command unanswered for [`Config::command_timeout`].
//! - Logout when a session is closed or dropped.
//!
//! # Reconnecting
//!
//! When the connection breaks (socket error, end of stream, a malformed PDU, a ping timeout, or
//! an Async Message asking for logout), the IO thread closes it and logs in again with the
//! *same ISID and TSIH 0*. For a target that still holds the old session this is session
//! reinstatement (RFC 7143 section 6.3.5): it ends the old session and its tasks before the new
//! one starts, so a stale write cannot land after its retry. A restarted target simply sees a
//! new session. Every command that had not completed is then sent again, in its original
//! submission order, with fresh tags (READ and WRITE are idempotent; the stripe driver keeps
//! overlapping writes apart). A command answered with UNIT ATTENTION (as the first commands
//! after a target restart are) is also sent again. After [`Config::reconnect_timeout`] without
//! success the commands in flight complete with [`IoError::Disconnected`] and the session is
//! [`State::Down`]: new commands then try one login (at most once per
//! [`Config::reconnect_interval`]) and fail at once if it does not work, so IO resumes by
//! itself when the server comes back. Each command is retried at most 5 times.
//!
//! # Threading model
//!
//! Each [`Session`] owns one IO thread, which alone owns the socket (non-blocking) and all
//! protocol state ([`conn::Conn`]). The caller's thread and the IO thread share only:
//!
//! - a bounded lock-free submission queue ([`crossbeam_queue::ArrayQueue`]) of [`Command`]s,
//!   each tagged with a caller-chosen `u32`. [`Session::submit`] pushes and, only when the IO
//!   thread has announced that it is going to sleep, writes an eventfd to wake it
//!   ([`Session::submit_quiet`] and [`Session::kick`] make that one wake-up per batch);
//! - a bounded lock-free completion queue of [`Completion`]s (tag and result), with an eventfd
//!   ([`Session::completion_fd`]) the IO thread signals once per batch of completions, for the
//!   caller's epoll loop.
//!
//! Both queues hold [`Config::queue_depth`] entries, and the IO thread only takes a command
//! when a completion slot is guaranteed for it, so a full queue is backpressure
//! ([`SubmitError::Full`]), never a loss. Commands carry raw iovecs ([`Command::iov`]); the
//! caller promises (the `# Safety` of [`Session::submit`]) that they stay valid until the
//! completion. The IO thread reads each Data-In payload straight into those iovecs with
//! `readv` (only bytes that arrived in the same read as a header pass through a 32 KiB staging
//! buffer) and sends Data-Out payloads straight from them with `writev`: no bounce copy, no
//! allocation per IO. A command whose target answers before all its data left (an early
//! CHECK CONDITION) is held back until the kernel has taken the data.
//!
//! The IO thread sleeps in `poll` on the socket and the submission eventfd; it never waits for
//! the caller. Logins (first, and on reconnect) block the IO thread only, up to
//! [`Config::login_timeout`]; the first login happens in [`Session::connect`] on the caller's
//! thread so errors surface there.
//!
//! An event loop drives a session like this (one session shown; a `stripe:` driver has one per
//! server, all in one epoll set):
//!
//! ```no_run
//! use iscsi::{scsi, Command, Config, Session, SubmitError};
//!
//! let s = Session::connect(&Config::new("127.0.0.1:3260", "iqn.2026-11.lab:srv1"))?;
//! // Per-request state lives in caller-owned, preallocated memory, indexed by the tag.
//! let mut buf = vec![0u8; 64 * 1024];
//! let iov = [libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }];
//! let cmd = Command::read(7, 1, scsi::read16(2048, 128), 64 * 1024, iov.as_ptr(), 1);
//! // SAFETY: `buf` and `iov` stay untouched until tag 7 completes (we wait for it below).
//! match unsafe { s.submit(cmd) } {
//!     Ok(()) => {}
//!     Err(SubmitError::Full) => { /* keep the request queued; retry after completions */ }
//!     Err(SubmitError::Invalid(e)) => return Err(e.into()),
//! }
//! loop {
//!     while let Some(c) = s.pop_completion() {
//!         assert_eq!(c.tag, 7);
//!         println!("read: {:?}", c.result); // Ok(bytes) or an IoError naming the sense data
//!         return Ok(());
//!     }
//!     if s.arm() {
//!         // epoll_wait on s.completion_fd() together with the ring's event channel, then:
//!         s.wait_completion_fd(None);
//!         s.clear_completion_fd();
//!     }
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Inline: no IO thread
//!
//! With [`Config::drive`] set to [`Drive::Inline`] there is no IO thread: the same queues and
//! the same connection state are stepped on the caller's thread. The caller polls
//! [`Session::poll_fd`] (an epoll set of the socket, a timerfd for keepalive and command
//! timeouts, and an eventfd of the login helper) and calls [`Session::drive`] when it is
//! readable, and [`Session::send`] after a batch of submissions; completions are popped as
//! above. A lost connection is logged into again on a short-lived helper thread, so the
//! caller never blocks on a login; the reconnect and retry rules are the same. A 4 KiB QD32
//! random read stream costs three syscalls per command here (poll, readv, writev) and no
//! wake-up of another thread; the `stripe:` driver offers it as `--iscsi-inline`.
//! [`Session::wait`] is the loop for callers without an event loop of their own.
//!
//! [`Client`] is a blocking wrapper (one command at a time, plain slices) for tools and tests.
//!
//! # Safety of input
//!
//! Everything a target sends is parsed by the pure [`pdu`] module (fuzzed by
//! `fuzz/fuzz_targets/iscsi_pdu.rs`): headers are validated before any length in them is used,
//! a DataSegmentLength above what we declared closes the connection, Data-In must arrive in
//! order and inside the command's buffer, R2Ts must lie inside the command's data, and text
//! keys are bounded in number and size. Any violation closes the connection with an error
//! (followed by the reconnect above), never a panic or an unbounded allocation.

pub mod blocking;
pub mod config;
pub mod conn;
pub mod digest;
pub mod error;
pub mod lab;
pub mod login;
pub mod pdu;
mod reserve;
pub mod scsi;
pub mod session;
pub mod text;

pub use blocking::Client;
pub use config::{Chap, Config, Drive, Registration, Url};
pub use conn::{Command, Completion};
pub use error::{Error, IoError, Result};
pub use login::{discover, DiscoveredTarget};
pub use pdu::Dir;
pub use session::{Session, State, SubmitError};
