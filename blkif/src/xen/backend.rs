//! The ring a Xen frontend shares, as the backend holds it: the ring pages mapped through
//! gntdev from the frontend's `ring-ref`s, the interdomain event channel, and a
//! [`GrantMapper`] that reaches each request's pages in one of two ways:
//!
//! - [`GrantMode::Map`]: one `IOCTL_GNTDEV_MAP_GRANT_REF` + `mmap` per request for all of its
//!   segments (read-only for writes), `munmap` + unmap ioctl when the IO is done. The IO goes
//!   straight into the guest's pages, through the page cache: never O_DIRECT, whose page pins
//!   can outlive the completion and keep a grant mapped past its unmap (tapdisk's
//!   `Engine::unpinned_memory_only`).
//! - [`GrantMode::Copy`]: no mapping; each request slot owns bounce pages, and one
//!   `IOCTL_GNTDEV_GRANT_COPY` per request copies a write's sectors in before the IO, or a read's
//!   sectors out after it. It trades a copy for the map/unmap (and its TLB shootdown).
//!
//! Which is faster depends on the machine; the rig measures both.

use std::io;
use std::ptr::NonNull;

use super::evtchn::Evtchn;
use super::gntdev::{CopySegment, Gntdev, GrantMap};
use super::DomId;
use crate::mmap::Mapping;
use crate::protocol::{Abi, GrantRef, Segment, PAGE_SIZE, SECTOR_SIZE};
use crate::request::Problem;
use crate::ring::{ring_size, BackRing};
use crate::transport::{GrantMapper, MapHandle};

/// How request pages are reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GrantMode {
    /// Map the guest's pages and do IO into them.
    #[default]
    Map,
    /// Grant-copy through bounce pages.
    Copy,
}

impl std::str::FromStr for GrantMode {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "map" => Ok(GrantMode::Map),
            "copy" => Ok(GrantMode::Copy),
            _ => Err(crate::Error::GrantMode(s.chars().take(64).collect())),
        }
    }
}

struct Entry {
    map: Option<GrantMap>,
    /// Copy mode: the request's segments (the sector ranges to copy).
    segs: Box<[Segment]>,
    n: usize,
    to_guest: bool,
    busy: bool,
}

/// Grant access for one ring: a slab of per-request entries, preallocated.
pub struct XenGrants {
    domid: DomId,
    mode: GrantMode,
    entries: Box<[Entry]>,
    free: Vec<u32>,
    /// Most segments one request may carry (direct or indirect).
    max_segs: usize,
    /// Scratch for one map call.
    refs: Box<[GrantRef]>,
    /// Scratch for one grant-copy call.
    ops: Box<[CopySegment]>,
    /// Copy mode: `max_segs` bounce pages per entry (touched lazily).
    bounce: Option<Mapping>,
    /// Last so that every mapping above is released before the device closes.
    gntdev: Gntdev,
}

impl std::fmt::Debug for XenGrants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenGrants")
            .field("domid", &self.domid)
            .field("mode", &self.mode)
            .field("entries", &self.entries.len())
            .finish()
    }
}

fn anon_pages(pages: usize) -> io::Result<Mapping> {
    let len = pages * PAGE_SIZE;
    // A memfd gives a shared, page-aligned, lazily populated buffer through the same RAII type.
    // SAFETY: plain syscall with a valid C string; checked below.
    let fd = unsafe { libc::memfd_create(c"tapdisk-bounce".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    nix::unistd::ftruncate(&fd, len as i64).map_err(io::Error::from)?;
    Mapping::map_shared(std::os::fd::AsFd::as_fd(&fd), len)
}

impl XenGrants {
    /// How request pages are reached.
    pub fn mode(&self) -> GrantMode {
        self.mode
    }

    /// Grant access to `domid`'s pages for a ring of `slots` requests of at most `max_segs`
    /// segments each.
    pub fn new(
        domid: DomId,
        mode: GrantMode,
        slots: u32,
        max_segs: usize,
        gntdev: Gntdev,
    ) -> io::Result<Self> {
        let n = slots as usize;
        let max_segs = max_segs.clamp(1, super::gntdev::MAX_BATCH);
        let copy = mode == GrantMode::Copy;
        let bounce = if copy {
            Some(anon_pages(n * max_segs)?)
        } else {
            None
        };
        Ok(XenGrants {
            domid,
            mode,
            entries: (0..n)
                .map(|_| Entry {
                    map: None,
                    segs: vec![Segment::default(); if copy { max_segs } else { 0 }]
                        .into_boxed_slice(),
                    n: 0,
                    to_guest: false,
                    busy: false,
                })
                .collect(),
            free: (0..n as u32).rev().collect(),
            max_segs,
            refs: vec![0; max_segs].into_boxed_slice(),
            ops: vec![CopySegment::from_grant(0, 0, 0, std::ptr::null_mut(), 0); max_segs]
                .into_boxed_slice(),
            bounce,
            gntdev,
        })
    }

    /// The grant device (the ring's own pages are mapped through it too).
    pub fn gntdev(&self) -> &Gntdev {
        &self.gntdev
    }

    fn bounce_page(&self, entry: usize, i: usize) -> *mut u8 {
        let b = self.bounce.as_ref().map(|m| m.ptr().as_ptr());
        let base = b.unwrap_or(std::ptr::null_mut());
        // SAFETY: entry < entries and i < max_segs, so the page is inside the bounce mapping
        // of entries * max_segs pages (only used in copy mode).
        unsafe { base.add((entry * self.max_segs + i) * PAGE_SIZE) }
    }

    /// Copies each segment's sectors between the guest and the entry's bounce pages.
    fn copy(&mut self, e: usize, to_guest: bool) -> Result<(), Problem> {
        let n = self.entries[e].n;
        for i in 0..n {
            let s = self.entries[e].segs[i];
            let off = u16::from(s.first_sect) * SECTOR_SIZE as u16;
            let len = u16::from(s.last_sect - s.first_sect + 1) * SECTOR_SIZE as u16;
            // SAFETY: off < 4096, so the pointer stays inside bounce page i.
            let local = unsafe { self.bounce_page(e, i).add(usize::from(off)) };
            self.ops[i] = if to_guest {
                CopySegment::to_grant(local, s.gref, off, self.domid, len)
            } else {
                CopySegment::from_grant(s.gref, off, self.domid, local, len)
            };
        }
        let first = self.entries[e].segs.first().map_or(0, |s| s.gref);
        // SAFETY: every local address is inside this entry's bounce pages, which live as long
        // as `self` and which no IO touches while the copy runs (the request is not in flight:
        // its IO has not started, or has completed).
        unsafe { self.gntdev.copy(&mut self.ops[..n]) }.map_err(|_| Problem::BadGrant(first))?;
        if let Some(i) = self.ops[..n].iter().position(|o| o.status() != 0) {
            return Err(Problem::BadGrant(self.entries[e].segs[i].gref));
        }
        Ok(())
    }
}

impl GrantMapper for XenGrants {
    fn map(
        &mut self,
        segs: &[Segment],
        writable: bool,
        addrs: &mut [*mut u8],
    ) -> Result<MapHandle, Problem> {
        let n = segs.len();
        if n == 0 || n > self.max_segs || addrs.len() < n {
            return Err(Problem::TooManySegments {
                got: n,
                max: self.max_segs,
            });
        }
        let Some(e) = self.free.pop() else {
            // More requests in flight than the ring has slots: the ring loop never lets it.
            return Err(Problem::BadGrant(segs[0].gref));
        };
        let ei = e as usize;
        match self.mode {
            GrantMode::Map => {
                for (r, s) in self.refs.iter_mut().zip(segs) {
                    *r = s.gref;
                }
                match self.gntdev.map(self.domid, &self.refs[..n], writable) {
                    Ok(m) => {
                        for (i, a) in addrs.iter_mut().take(n).enumerate() {
                            *a = m.page(i);
                        }
                        let ent = &mut self.entries[ei];
                        ent.map = Some(m);
                        ent.n = n;
                        ent.busy = true;
                    }
                    Err(_) => {
                        self.free.push(e);
                        return Err(Problem::BadGrant(segs[0].gref));
                    }
                }
            }
            GrantMode::Copy => {
                {
                    let ent = &mut self.entries[ei];
                    ent.segs[..n].copy_from_slice(segs);
                    ent.n = n;
                    ent.to_guest = writable;
                    ent.busy = true;
                }
                if !writable {
                    if let Err(p) = self.copy(ei, false) {
                        self.entries[ei].busy = false;
                        self.free.push(e);
                        return Err(p);
                    }
                }
                for (i, a) in addrs.iter_mut().take(n).enumerate() {
                    *a = self.bounce_page(ei, i);
                }
            }
        }
        Ok(MapHandle(u64::from(e)))
    }

    fn unmap(&mut self, handle: MapHandle) -> Result<(), Problem> {
        let ei = handle.0 as usize;
        if ei >= self.entries.len() || !self.entries[ei].busy {
            return Ok(());
        }
        let r = match self.mode {
            GrantMode::Map => {
                self.entries[ei].map = None;
                Ok(())
            }
            GrantMode::Copy if self.entries[ei].to_guest => self.copy(ei, true),
            GrantMode::Copy => Ok(()),
        };
        self.entries[ei].busy = false;
        self.free.push(ei as u32);
        r
    }
}

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

impl XenRing {
    /// Maps `ring_refs` (`2^ring_order` pages) of `domid`, binds `port`; requests carry at
    /// most `max_segs` segments.
    pub fn connect(
        domid: DomId,
        ring_refs: &[GrantRef],
        ring_order: u8,
        port: u32,
        abi: Abi,
        mode: GrantMode,
        max_segs: usize,
    ) -> crate::Result<XenRing> {
        let ring = Self::map_and_bind(domid, ring_refs, ring_order, port, abi, mode, max_segs)?;
        Ok(ring)
    }

    fn map_and_bind(
        domid: DomId,
        ring_refs: &[GrantRef],
        ring_order: u8,
        port: u32,
        abi: Abi,
        mode: GrantMode,
        max_segs: usize,
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
        let grants = XenGrants::new(domid, mode, ring.size(), max_segs, gntdev)?;
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
        assert!("mmap".parse::<GrantMode>().is_err());
    }

    #[test]
    fn connect_without_xen_fails_cleanly() {
        if std::path::Path::new("/dev/xen/gntdev").exists() {
            return;
        }
        let e = XenRing::connect(1, &[8], 0, 5, Abi::X86_64, GrantMode::Map, 11).unwrap_err();
        assert!(e.to_string().contains("gntdev"), "{e}");
        let e = XenRing::connect(1, &[8, 9], 0, 5, Abi::X86_64, GrantMode::Map, 11).unwrap_err();
        assert!(e.to_string().contains("ring-refs"), "{e}");
    }
}
