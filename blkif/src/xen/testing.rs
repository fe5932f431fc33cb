//! A stand-in for `/dev/xen/gntdev` in tests (feature `test-utils`). There is no Xen here, so
//! grant `g` of the one frontend is page `g` of a buffer the test owns (a local frontend's
//! guest memory), grants at or past its end are "never granted" (the map fails, as gntdev's
//! does), and every page mapped is counted: a test can check that the grant bookkeeping
//! ([`super::backend::XenGrants`], [`super::persistent`]) leaves nothing mapped.
//!
//! Only the device is a stand-in; the code under test is the real one.

use std::io;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use super::gntdev::{
    CopySegment, GrantDevice, MappedGrants, GNTCOPY_DEST_GREF, GNTCOPY_SOURCE_GREF,
};
use super::DomId;
use crate::protocol::{GrantRef, PAGE_SIZE};

/// What a [`FakeGntdev`] counts (shared with the test, which keeps a clone).
#[derive(Debug, Default)]
pub struct FakeCounts {
    /// Pages mapped now.
    pub live: AtomicI64,
    /// Map calls made.
    pub map_calls: AtomicU64,
    /// Copy calls made.
    pub copy_calls: AtomicU64,
}

impl FakeCounts {
    /// Pages mapped now.
    pub fn live(&self) -> i64 {
        self.live.load(Ordering::SeqCst)
    }
}

/// Grants as pages of a buffer.
#[derive(Debug)]
pub struct FakeGntdev {
    base: *mut u8,
    pages: u32,
    counts: Arc<FakeCounts>,
}

// SAFETY: the buffer is the test's, valid for the device's life (contract of `new`); the
// device only hands out raw pointers into it.
unsafe impl Send for FakeGntdev {}

impl FakeGntdev {
    /// A device whose grant `g < pages` is page `g` at `base`.
    ///
    /// # Safety
    /// `base` must be valid for reads and writes of `pages` pages for as long as the device
    /// and every mapping it made live.
    pub unsafe fn new(base: *mut u8, pages: u32) -> FakeGntdev {
        FakeGntdev {
            base,
            pages,
            counts: Arc::default(),
        }
    }

    /// The counters, to read after the device was handed away.
    pub fn counts(&self) -> Arc<FakeCounts> {
        self.counts.clone()
    }

    fn page_of(&self, gref: GrantRef) -> io::Result<*mut u8> {
        if gref >= self.pages {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: `gref < pages`: inside the buffer (contract of `new`).
        Ok(unsafe { self.base.add(gref as usize * PAGE_SIZE) })
    }
}

/// One fake map call's pages.
#[derive(Debug)]
pub struct FakeMap {
    addrs: Vec<*mut u8>,
    mapped: Vec<bool>,
    counts: Arc<FakeCounts>,
}

// SAFETY: as for `FakeGntdev`: pointers into the test's buffer.
unsafe impl Send for FakeMap {}

impl MappedGrants for FakeMap {
    fn page(&self, i: usize) -> *mut u8 {
        assert!(self.mapped[i], "page {i} used after its release");
        self.addrs[i]
    }

    fn pages(&self) -> usize {
        self.addrs.len()
    }

    fn release(&mut self, first: usize, n: usize) -> io::Result<()> {
        for m in &mut self.mapped[first..first + n] {
            assert!(*m, "a page released twice");
            *m = false;
            self.counts.live.fetch_sub(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

impl Drop for FakeMap {
    fn drop(&mut self) {
        let left = self.mapped.iter().filter(|m| **m).count() as i64;
        self.counts.live.fetch_sub(left, Ordering::SeqCst);
    }
}

impl GrantDevice for FakeGntdev {
    type Map = FakeMap;

    fn map(&self, _domid: DomId, refs: &[GrantRef], _writable: bool) -> io::Result<FakeMap> {
        self.counts.map_calls.fetch_add(1, Ordering::SeqCst);
        if refs.is_empty() || refs.len() > super::gntdev::MAX_BATCH {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let addrs = refs
            .iter()
            .map(|&g| self.page_of(g))
            .collect::<io::Result<Vec<_>>>()?;
        self.counts
            .live
            .fetch_add(refs.len() as i64, Ordering::SeqCst);
        Ok(FakeMap {
            mapped: vec![true; addrs.len()],
            addrs,
            counts: self.counts.clone(),
        })
    }

    unsafe fn copy(&self, segs: &mut [CopySegment]) -> io::Result<()> {
        self.counts.copy_calls.fetch_add(1, Ordering::SeqCst);
        for s in segs.iter_mut() {
            let (foreign, local, to_local) = match s.flags {
                GNTCOPY_SOURCE_GREF => (s.source[0], s.dest[0], true),
                GNTCOPY_DEST_GREF => (s.dest[0], s.source[0], false),
                _ => {
                    s.status = -1;
                    continue;
                }
            };
            let gref = foreign as u32;
            let off = ((foreign >> 32) & 0xffff) as usize;
            let len = usize::from(s.len);
            let Ok(page) = self.page_of(gref) else {
                s.status = -1;
                continue;
            };
            if off + len > PAGE_SIZE {
                s.status = -1;
                continue;
            }
            // SAFETY: `off + len <= PAGE_SIZE` inside a page of the buffer; the local address
            // is valid for `len` bytes by the caller's contract.
            unsafe {
                let g = page.add(off);
                let l = local as *mut u8;
                if to_local {
                    std::ptr::copy_nonoverlapping(g, l, len);
                } else {
                    std::ptr::copy_nonoverlapping(l, g, len);
                }
            }
            s.status = 0;
        }
        Ok(())
    }
}
