//! The ring a Xen frontend shares, as the backend holds it: the ring pages mapped through
//! gntdev from the frontend's `ring-ref`s, the interdomain event channel, and the
//! [`XenGrants`] that reach each request's pages (persistent grants, per-request mapping or
//! grant copy: [`super::grants`]).

use std::io;
use std::ptr::NonNull;

use super::evtchn::Evtchn;
use super::gntdev::{Gntdev, GrantMap};
use super::DomId;
use crate::protocol::{Abi, GrantRef};
use crate::ring::{ring_size, BackRing};

pub use super::grants::{GrantCounters, GrantMode, PersistentIo, XenGrants};

/// A frontend's ring, mapped and bound.
pub struct XenRing {
    /// The back half of the ring. First, so it goes before the pages under it.
    pub ring: BackRing,
    ring_map: GrantMap,
    /// Request pages.
    pub grants: XenGrants,
    /// The event channel.
    pub evtchn: Evtchn,
    /// The frontend's ABI.
    pub abi: Abi,
    /// `2^ring_order` ring pages.
    pub ring_order: u8,
}

impl std::fmt::Debug for XenRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenRing")
            .field("slots", &self.ring.size())
            .field("abi", &self.abi)
            .field("ring_order", &self.ring_order)
            .field("port", &self.evtchn.port())
            .finish()
    }
}

pub use crate::error::ConnectError;

/// How a ring's requests are reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingAccess {
    /// Persistent grants, per-request mapping, or grant copy.
    pub mode: GrantMode,
    /// Most segments one request may carry (direct or indirect).
    pub max_segs: usize,
    /// Persistent mode: most grants kept mapped (None: the ring's capacity).
    pub max_persistent: Option<u32>,
    /// Persistent mode: where the IO goes.
    pub persistent_io: PersistentIo,
}

impl XenRing {
    /// Maps `ring_refs` (`2^ring_order` pages) of `domid`, binds `port`; requests are reached
    /// as `access` says.
    pub fn connect(
        domid: DomId,
        ring_refs: &[GrantRef],
        ring_order: u8,
        port: u32,
        abi: Abi,
        access: RingAccess,
    ) -> crate::Result<XenRing> {
        let ring = Self::map_and_bind(domid, ring_refs, ring_order, port, abi, access)?;
        Ok(ring)
    }

    fn map_and_bind(
        domid: DomId,
        ring_refs: &[GrantRef],
        ring_order: u8,
        port: u32,
        abi: Abi,
        access: RingAccess,
    ) -> Result<XenRing, ConnectError> {
        let pages = 1usize << ring_order;
        if ring_refs.len() != pages || ring_size(abi, pages) == 0 {
            return Err(ConnectError::Other(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} ring-refs for a ring of {pages} pages", ring_refs.len()),
            )));
        }
        let gntdev = Gntdev::open()?;
        let ring_map = gntdev
            .map(domid, ring_refs, true)
            .map_err(|err| ConnectError::MapRing {
                domid,
                refs: ring_refs.to_vec(),
                err,
            })?;
        let base: NonNull<u8> = ring_map.addr();
        // SAFETY: `ring_map` is `pages` page-aligned pages, mapped writable, and is kept in the
        // same `XenRing` as the ring, which declares (so drops) the ring first.
        let ring = unsafe { BackRing::new(base, pages, abi) }.ok_or_else(|| {
            ConnectError::Other(io::Error::new(
                io::ErrorKind::InvalidInput,
                "ring too small",
            ))
        })?;
        let evtchn = Evtchn::bind_interdomain(domid, port).map_err(|err| ConnectError::Bind {
            domid,
            port,
            err,
        })?;
        let grants = XenGrants::new(
            domid,
            access.mode,
            ring.size(),
            access.max_segs,
            access.max_persistent,
            access.persistent_io,
            gntdev,
        )?;
        Ok(XenRing {
            ring,
            ring_map,
            grants,
            evtchn,
            abi,
            ring_order,
        })
    }

    /// Pages of the ring.
    pub fn ring_pages(&self) -> usize {
        self.ring_map.pages()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_mode_parses() {
        assert_eq!("map".parse::<GrantMode>().unwrap(), GrantMode::Map);
        assert_eq!("copy".parse::<GrantMode>().unwrap(), GrantMode::Copy);
        assert_eq!(
            "persistent".parse::<GrantMode>().unwrap(),
            GrantMode::Persistent
        );
        assert!("mmap".parse::<GrantMode>().is_err());
        assert_eq!(
            serde_json::to_string(&GrantMode::Persistent).unwrap(),
            "\"persistent\""
        );
    }

    fn access(mode: GrantMode) -> RingAccess {
        RingAccess {
            mode,
            max_segs: 11,
            max_persistent: None,
            persistent_io: PersistentIo::default(),
        }
    }

    #[test]
    fn connect_without_xen_fails_cleanly() {
        if std::path::Path::new("/dev/xen/gntdev").exists() {
            return;
        }
        let a = access(GrantMode::Map);
        let e = XenRing::connect(1, &[8], 0, 5, Abi::X86_64, a).unwrap_err();
        assert!(e.to_string().contains("gntdev"), "{e}");
        let e = XenRing::connect(1, &[8, 9], 0, 5, Abi::X86_64, a).unwrap_err();
        assert!(e.to_string().contains("ring-refs"), "{e}");
    }
}
