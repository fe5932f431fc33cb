//! tapdisk-rs: the userspace backend that serves a guest's virtual disk.
//!
//! A tapdisk process owns one or more VBDs (virtual block devices). Each VBD has an image
//! ([`image`]), zero or more blkif rings attached to it, each served by its own event loop on
//! io_uring ([`vbd`]), and optionally an NBD export ([`nbd`]). The process is driven through a
//! unix control socket ([`control`]) by `tap-ctl`.

pub mod image;
pub mod nbd;
