//! The Xen blkif block-device protocol, as a library.
//!
//! - [`protocol`]: wire-exact request and response layouts for the `x86_64-abi` (native) and
//!   `x86_32-abi` protocols, operation and status codes.
//! - [`ring`]: the shared ring of Xen's `io/ring.h`, back and front halves, with the event-index
//!   notification rules and no Rust references into shared memory.
//! - [`request`]: copy-once parsing and validation; only a validated [`request::Request`]
//!   reaches a backend's IO path.
//! - [`transport`]: grant mapping and event channels as traits.
//! - [`xen`]: the Xen transport: gntdev, evtchn, gntalloc, xenstore, and the ring a Xen
//!   frontend shares, behind the [`transport`] traits.
//! - [`local`]: the local transport (memfd + eventfd over a unix socket) and a frontend that
//!   tests, benchmarks and fuzzers use to drive a backend, hostile requests included.
//! - [`error`]: [`Error`], the one error type of the crate, with a variant per module that can
//!   fail (refused guest requests are data, not errors: [`Problem`], [`Rejection`]).

pub mod early;
pub mod error;
pub mod local;
pub mod mmap;
pub mod protocol;
pub mod request;
pub mod ring;
pub mod transport;
pub mod uffd;
pub mod xen;

pub use error::{Error, Result};
pub use protocol::{Abi, Response, Segment};
pub use request::{DiskInfo, Operation, Problem, Rejection, Request};
