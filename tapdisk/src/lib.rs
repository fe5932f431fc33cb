//! tapdisk-rs: the userspace backend that serves a guest's virtual disk.
//!
//! A tapdisk process ([`daemon`]) owns one or more VBDs ([`vbd`]). Each VBD has an image
//! ([`image`]: a raw file or block device, or a volume of a Parallax image, [`parallax`]),
//! zero or more blkif rings attached to it, each served by its own event loop on
//! io_uring ([`ringloop`]), and optionally an NBD export ([`nbd`]). The process is driven
//! through a unix control socket by `tap-ctl` ([`daemon`] serves it; the protocol, the
//! settings of a VBD and their checks are the `tapdisk_control` crate); [`stats`] holds the counters
//! `tap-ctl stats` prints; [`xen`] serves Xen frontends' rings, which tapback hands over.
//!
//! On a ring, requests go through the [`sched`]uler (ordering, sorting, merging) to an IO
//! [`engine`] (io_uring on a raw image, optionally behind the thesis's disk model); every
//! stage is timestamped ([`trace`]).

pub mod daemon;
pub mod early;
pub mod engine;
pub mod idset;
pub mod image;
pub mod logging;
pub mod nbd;
pub mod parallax;
pub mod ringloop;
pub mod sched;
pub mod stats;
pub mod trace;
pub mod vbd;
pub mod xen;
