//! tapdisk-rs: the userspace backend that serves a guest's virtual disk.
//!
//! A tapdisk process ([`daemon`]) owns one or more VBDs ([`vbd`]). Each VBD has an image,
//! opened by one of the [`driver`]s (a raw file or block device, a volume of a Parallax
//! image, a disk striped over iSCSI servers), rings attached to it by frontends (local or Xen)
//! and by its NBD export ([`nbd`]), each served by its own event loop on io_uring ([`ring`]).
//! The process is driven through a unix control socket by `tap-ctl` ([`daemon`] serves it; the
//! protocol, the settings of a VBD and their checks are the `tapdisk_control` crate); [`stats`]
//! holds the counters `tap-ctl stats` prints.
//!
//! On a ring, requests are validated into the ring's request table ([`requests`]), go through
//! the [`sched`]uler (ordering, sorting, merging) to the driver's engine (io_uring straight
//! into the frontend's pages, possibly under layers: fault injection, a slow-storage model),
//! and are answered; reads may be answered early ([`early`]). Every stage is timestamped
//! ([`trace`]), and marked by USDT [`probes`] for bpftrace. System interfaces with `unsafe` are
//! wrapped once in [`sys`].
//!
//! docs/architecture.md draws the whole path.

pub mod daemon;
pub mod driver;
pub mod early;
pub mod error;
pub mod logging;
pub mod nbd;
pub mod probes;
pub mod requests;
pub mod ring;
pub mod sched;
pub mod stats;
pub mod sys;
pub mod trace;
pub mod vbd;

pub use error::{Error, Result};
