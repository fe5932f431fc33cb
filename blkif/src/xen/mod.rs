//! The Xen transport: grant tables, event channels and xenstore, as a dom0 backend (and, for
//! tests, a frontend played from dom0) reaches them through Linux's `/dev/xen` devices.
//!
//! - [`gntdev`]: maps batches of a guest's grant references into this process
//!   (`IOCTL_GNTDEV_MAP_GRANT_REF` + `mmap`, undone on drop), and grant copy
//!   (`IOCTL_GNTDEV_GRANT_COPY`) between grants and local buffers.
//! - [`evtchn`]: one bound interdomain event channel per descriptor: notify, read pending events,
//!   and unmask after the ring is drained (the late EOI of XSA-332: a guest cannot make us spin).
//! - [`gntalloc`]: grants pages of our own to another domain (the frontend half, used by the
//!   rig's hostile frontend).
//! - [`xenstore`]: the xenstore wire protocol over `/run/xenstored/socket` or `/dev/xen/xenbus`,
//!   with transactions and watches.
//! - [`backend`]: the Xen ring transport tapdisk serves: the ring pages mapped from the
//!   frontend's `ring-ref`s, the event channel, and [`grants`]: how requests' pages are
//!   reached (persistent grants ([`persistent`]), per-request mapping in batches, or grant
//!   copy), behind the [`crate::transport`] traits.
//! - [`frontend_keys`]: parsing the keys a frontend writes in xenstore (guest-controlled text).
//!
//! All of it is raw ioctls through `libc`; every `unsafe` block says why it is sound.

pub mod backend;
pub mod evtchn;
pub mod frontend_keys;
pub mod gntalloc;
pub mod gntdev;
pub mod grants;
pub mod persistent;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
pub mod xenstore;

/// A Xen domain id.
pub type DomId = u16;

/// Largest ring order offered to Xen frontends (`max-ring-page-order`): 2^4 = 16 pages, 512
/// requests, the most Linux's xenbus maps for one ring (`XENBUS_MAX_RING_GRANT_ORDER`).
pub const MAX_RING_ORDER: u8 = 4;
/// Most queues (rings) a Xen frontend may use (`multi-queue-max-queues`).
pub const MAX_QUEUES: u32 = 16;

/// `_IOC(_IOC_NONE, ty, nr, size)` of Linux's asm-generic ioctl.h (x86 uses the generic layout).
pub(crate) const fn ioc_none(ty: u8, nr: u8, size: usize) -> libc::c_ulong {
    // dir NONE = 0 in bits 30..32; size in bits 16..30; type in 8..16; nr in 0..8.
    ((size as libc::c_ulong) << 16) | ((ty as libc::c_ulong) << 8) | nr as libc::c_ulong
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux() {
        // Values computed from Linux's uapi headers (x86_64).
        assert_eq!(ioc_none(b'G', 0, 24), 0x0018_4700); // IOCTL_GNTDEV_MAP_GRANT_REF
        assert_eq!(ioc_none(b'G', 1, 16), 0x0010_4701); // IOCTL_GNTDEV_UNMAP_GRANT_REF
        assert_eq!(ioc_none(b'E', 1, 8), 0x0008_4501); // IOCTL_EVTCHN_BIND_INTERDOMAIN
        assert_eq!(ioc_none(b'E', 4, 4), 0x0004_4504); // IOCTL_EVTCHN_NOTIFY
    }
}
