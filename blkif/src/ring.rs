//! The shared ring of Xen's `io/ring.h`, both halves.
//!
//! A ring is `2^order` contiguous pages: a 64-byte header (`req_prod`, `req_event`, `rsp_prod`,
//! `rsp_event`, padding) followed by a power-of-two number of slots, each the size of the
//! request/response union of the frontend's ABI (112 bytes for x86_64: 32 slots in one page, 512
//! in sixteen).
//!
//! Shared memory belongs to another, untrusted party, so this module never makes a Rust
//! reference to a slot: slots are copied out with volatile loads into a private buffer (exactly
//! once), responses are written field by field with volatile stores (padding is never written,
//! so nothing of ours leaks), and the four indexes are accessed as atomics. The orderings follow
//! the Xen macros they replace; each is explained where it is used.

use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU32, Ordering};

use crate::protocol::{Abi, Layout, Response, MAX_SLOT, PAGE_SIZE};

/// Bytes before the first slot.
pub const HEADER_SIZE: usize = 64;
const REQ_PROD: usize = 0;
const REQ_EVENT: usize = 4;
const RSP_PROD: usize = 8;
const RSP_EVENT: usize = 12;

/// Slots in a ring of `pages` pages for `abi`: the slot count that fits, rounded down to a
/// power of two (Xen's `__CONST_RING_SIZE`).
pub const fn ring_size(abi: Abi, pages: usize) -> u32 {
    let fit = (pages * PAGE_SIZE - HEADER_SIZE) / abi.layout().slot;
    if fit == 0 {
        0
    } else {
        1 << (usize::BITS - 1 - fit.leading_zeros())
    }
}

pub use crate::error::RingError;

/// A copy of one slot, taken out of shared memory once.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub struct SlotCopy {
    /// The slot's bytes; only the first `Layout::slot` are meaningful.
    pub bytes: [u8; MAX_SLOT],
}

impl Default for SlotCopy {
    fn default() -> Self {
        SlotCopy {
            bytes: [0; MAX_SLOT],
        }
    }
}

/// The mapped ring memory, shared by both halves' code.
#[derive(Debug)]
struct Shared {
    base: NonNull<u8>,
    size: u32,
    layout: Layout,
}

// SAFETY: `Shared` only holds a pointer to memory the constructor's caller promised stays mapped;
// every access through it is atomic or volatile, so moving it to another thread is sound.
unsafe impl Send for Shared {}

impl Shared {
    /// # Safety
    /// `base` must point to `pages * PAGE_SIZE` bytes, 8-byte aligned, mapped readable and
    /// writable for the lifetime of the value.
    unsafe fn new(base: NonNull<u8>, pages: usize, abi: Abi) -> Option<Shared> {
        let size = ring_size(abi, pages);
        (size > 0).then_some(Shared {
            base,
            size,
            layout: abi.layout(),
        })
    }

    fn index(&self, off: usize) -> &AtomicU32 {
        // SAFETY: `off` is one of the four header offsets, inside the mapping and 4-aligned
        // (the base is page aligned). An `AtomicU32` reference is the sanctioned way to access a
        // word another party writes concurrently: it has interior mutability and every access
        // is atomic, so no Rust aliasing rule is broken by the other side's writes.
        unsafe { AtomicU32::from_ptr(self.base.as_ptr().add(off).cast::<u32>()) }
    }

    fn slot_ptr(&self, idx: u32) -> *mut u8 {
        let i = (idx & (self.size - 1)) as usize;
        // SAFETY: `i < size`, and `HEADER_SIZE + size * slot` fits in the mapping by construction
        // of `size` (see `ring_size`).
        unsafe { self.base.as_ptr().add(HEADER_SIZE + i * self.layout.slot) }
    }

    fn copy_slot(&self, idx: u32, out: &mut SlotCopy) {
        let src = self.slot_ptr(idx).cast::<u32>();
        let words = self.layout.slot / 4;
        for w in 0..words {
            // SAFETY: the slot lies inside the mapping; slot sizes (112, 108) and the slot
            // offsets are multiples of 4, so each u32 is aligned. Volatile: the other side may
            // write concurrently; we read each word once and use only the copy.
            let v = unsafe { src.add(w).read_volatile() };
            out.bytes[w * 4..w * 4 + 4].copy_from_slice(&v.to_ne_bytes());
        }
    }

    fn write_slot_bytes(&self, idx: u32, bytes: &[u8]) {
        let dst = self.slot_ptr(idx);
        for (i, b) in bytes.iter().take(self.layout.slot).enumerate() {
            // SAFETY: `i < slot size`, inside the mapping; byte stores need no alignment.
            unsafe { dst.add(i).write_volatile(*b) };
        }
    }

    fn write_response(&self, idx: u32, rsp: &Response) {
        let dst = self.slot_ptr(idx);
        let id = rsp.id.to_le_bytes();
        // SAFETY: (all four stores) the slot is inside the mapping and at least 12 bytes long;
        // slot offsets are 4-aligned, so the u32 stores at 0 and 4 and the u16 store at the
        // status offset (10) are aligned. The id is split in two u32 halves because x86_32
        // slots are only 4-aligned. Padding bytes are deliberately left untouched.
        unsafe {
            dst.cast::<u32>()
                .write_volatile(u32::from_le_bytes([id[0], id[1], id[2], id[3]]));
            dst.add(4)
                .cast::<u32>()
                .write_volatile(u32::from_le_bytes([id[4], id[5], id[6], id[7]]));
            dst.add(8).write_volatile(rsp.operation);
            dst.add(self.layout.rsp_status)
                .cast::<i16>()
                .write_volatile(rsp.status.to_le());
        }
    }

    fn read_response(&self, idx: u32) -> Response {
        let mut copy = SlotCopy::default();
        self.copy_slot(idx, &mut copy);
        let b = &copy.bytes;
        let st = self.layout.rsp_status;
        Response {
            id: u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            operation: b[8],
            status: i16::from_le_bytes([b[st], b[st + 1]]),
        }
    }
}

/// The backend's half: consumes requests, produces responses.
#[derive(Debug)]
pub struct BackRing {
    sh: Shared,
    req_cons: u32,
    rsp_prod_pvt: u32,
}

impl BackRing {
    /// Attaches to a ring the frontend initialised.
    ///
    /// Returns `None` if `pages` is too small to hold one slot.
    ///
    /// # Safety
    /// `base` must point to `pages * 4096` bytes, page aligned, mapped readable and writable for
    /// as long as the returned value lives. The other party may write it at any time.
    pub unsafe fn new(base: NonNull<u8>, pages: usize, abi: Abi) -> Option<BackRing> {
        // SAFETY: forwarded from the caller.
        let sh = unsafe { Shared::new(base, pages, abi)? };
        // Start from the indexes the frontend published, as blkback does on connect.
        let rsp = sh.index(RSP_PROD).load(Ordering::Acquire);
        Some(BackRing {
            sh,
            req_cons: rsp,
            rsp_prod_pvt: rsp,
        })
    }

    /// Slots in the ring.
    pub fn size(&self) -> u32 {
        self.sh.size
    }

    /// Requests the frontend has published that we have not consumed yet.
    ///
    /// Fails if the frontend's `req_prod` runs more than a ring ahead of our responses (Xen's
    /// `RING_REQUEST_PROD_OVERFLOW`): such a frontend is broken or hostile.
    pub fn pending(&self) -> crate::Result<u32> {
        // Acquire pairs with the frontend's write barrier before it published req_prod: the
        // slots up to req_prod are visible once we see the index.
        let req_prod = self.sh.index(REQ_PROD).load(Ordering::Acquire);
        if req_prod.wrapping_sub(self.rsp_prod_pvt) > self.sh.size {
            return Err(RingError::ProducerOverflow {
                req_prod,
                rsp_prod: self.rsp_prod_pvt,
                size: self.sh.size,
            }
            .into());
        }
        // req_cons lies between rsp_prod_pvt and req_prod; a req_prod published between
        // rsp_prod_pvt and req_cons (moved back) would make the difference wrap to ~2^32.
        let n = req_prod.wrapping_sub(self.req_cons);
        if n > req_prod.wrapping_sub(self.rsp_prod_pvt) {
            return Err(RingError::ProducerBackwards {
                req_prod,
                req_cons: self.req_cons,
            }
            .into());
        }
        Ok(n)
    }

    /// Copies the next request out of the ring. Call only while [`BackRing::pending`] is
    /// non-zero; the copy is the only view of the request tapdisk ever uses.
    pub fn pop(&mut self, out: &mut SlotCopy) {
        self.sh.copy_slot(self.req_cons, out);
        self.req_cons = self.req_cons.wrapping_add(1);
    }

    /// Writes one response into the next response slot (not yet visible to the frontend).
    pub fn put_response(&mut self, rsp: &Response) {
        self.sh.write_response(self.rsp_prod_pvt, rsp);
        self.rsp_prod_pvt = self.rsp_prod_pvt.wrapping_add(1);
    }

    /// Responses written but not yet published.
    pub fn unpublished(&self) -> u32 {
        self.rsp_prod_pvt
            .wrapping_sub(self.sh.index(RSP_PROD).load(Ordering::Relaxed))
    }

    /// Publishes every written response with one index store and says whether the frontend
    /// asked to be notified (`RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`).
    pub fn push_responses(&mut self) -> bool {
        let old = self.sh.index(RSP_PROD).load(Ordering::Relaxed);
        let new = self.rsp_prod_pvt;
        if old == new {
            return false;
        }
        // Release: the response slots written above become visible before the new index.
        self.sh.index(RSP_PROD).store(new, Ordering::Release);
        // Full fence (xen_mb): our rsp_prod store must be ordered before the rsp_event load,
        // or we could miss a frontend that just set rsp_event and went to sleep.
        fence(Ordering::SeqCst);
        let event = self.sh.index(RSP_EVENT).load(Ordering::Relaxed);
        new.wrapping_sub(event) < new.wrapping_sub(old)
    }

    /// Before sleeping: asks for a notification at the next request and checks once more
    /// (`RING_FINAL_CHECK_FOR_REQUESTS`). Returns the number of requests pending.
    pub fn final_check(&mut self) -> crate::Result<u32> {
        let n = self.pending()?;
        if n > 0 {
            return Ok(n);
        }
        self.sh
            .index(REQ_EVENT)
            .store(self.req_cons.wrapping_add(1), Ordering::Relaxed);
        // Full fence: the req_event store must be visible before we re-read req_prod, or a
        // request published in between would wait for a notification that never comes.
        fence(Ordering::SeqCst);
        self.pending()
    }

    /// Our consumer index (for diagnostics).
    pub fn req_cons(&self) -> u32 {
        self.req_cons
    }
}

/// The frontend's half: produces requests, consumes responses. Used by tests, benchmarks and
/// the local frontend; it can also publish arbitrary bytes and indexes, as a hostile guest would.
#[derive(Debug)]
pub struct FrontRing {
    sh: Shared,
    req_prod_pvt: u32,
    rsp_cons: u32,
}

impl FrontRing {
    /// Initialises the ring header (`SHARED_RING_INIT`) and returns the front half.
    ///
    /// # Safety
    /// As for [`BackRing::new`].
    pub unsafe fn init(base: NonNull<u8>, pages: usize, abi: Abi) -> Option<FrontRing> {
        // SAFETY: forwarded from the caller.
        let sh = unsafe { Shared::new(base, pages, abi)? };
        sh.index(REQ_PROD).store(0, Ordering::Relaxed);
        sh.index(RSP_PROD).store(0, Ordering::Relaxed);
        sh.index(REQ_EVENT).store(1, Ordering::Relaxed);
        sh.index(RSP_EVENT).store(1, Ordering::Release);
        Some(FrontRing {
            sh,
            req_prod_pvt: 0,
            rsp_cons: 0,
        })
    }

    /// Slots in the ring.
    pub fn size(&self) -> u32 {
        self.sh.size
    }

    /// Slots free for new requests.
    pub fn free(&self) -> u32 {
        self.sh.size - self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }

    /// Writes a request's bytes into the next slot (not yet published). The caller checks
    /// [`FrontRing::free`]; writing into a full ring overwrites an unanswered slot.
    pub fn put_request(&mut self, bytes: &[u8]) {
        self.sh.write_slot_bytes(self.req_prod_pvt, bytes);
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
    }

    /// Publishes queued requests; says whether the backend asked to be notified.
    pub fn push_requests(&mut self) -> bool {
        let old = self.sh.index(REQ_PROD).load(Ordering::Relaxed);
        let new = self.req_prod_pvt;
        // Release: slots before the index, as the backend's Acquire load expects.
        self.sh.index(REQ_PROD).store(new, Ordering::Release);
        fence(Ordering::SeqCst);
        let event = self.sh.index(REQ_EVENT).load(Ordering::Relaxed);
        new.wrapping_sub(event) < new.wrapping_sub(old)
    }

    /// Publishes an arbitrary `req_prod` (robustness tests: a frontend playing index games).
    pub fn publish_raw_req_prod(&mut self, v: u32) {
        self.sh.index(REQ_PROD).store(v, Ordering::Release);
    }

    /// Takes every published response, in order.
    pub fn take_responses(&mut self, mut f: impl FnMut(Response)) -> u32 {
        // Acquire pairs with the backend's Release store of rsp_prod.
        let prod = self.sh.index(RSP_PROD).load(Ordering::Acquire);
        let mut n = 0;
        while self.rsp_cons != prod {
            f(self.sh.read_response(self.rsp_cons));
            self.rsp_cons = self.rsp_cons.wrapping_add(1);
            n += 1;
        }
        n
    }

    /// Whether responses are waiting, without asking for a notification (for polling).
    pub fn has_responses(&self) -> bool {
        self.sh.index(RSP_PROD).load(Ordering::Acquire) != self.rsp_cons
    }

    /// Before sleeping: asks for a notification at the next response and checks once more.
    /// Returns whether responses are waiting.
    pub fn final_check(&mut self) -> bool {
        if self.sh.index(RSP_PROD).load(Ordering::Acquire) != self.rsp_cons {
            return true;
        }
        self.sh
            .index(RSP_EVENT)
            .store(self.rsp_cons.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::SeqCst);
        self.sh.index(RSP_PROD).load(Ordering::Acquire) != self.rsp_cons
    }

    /// Copies slot `idx` (diagnostics and tests).
    pub fn peek(&self, idx: u32, out: &mut SlotCopy) {
        self.sh.copy_slot(idx, out)
    }

    /// Requests published and not yet answered.
    pub fn outstanding(&self) -> u32 {
        self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ring_sizes_match_xen() {
        assert_eq!(ring_size(Abi::X86_64, 1), 32);
        assert_eq!(ring_size(Abi::X86_64, 2), 64);
        assert_eq!(ring_size(Abi::X86_64, 16), 512);
        assert_eq!(ring_size(Abi::X86_64, 256), 8192);
        assert_eq!(ring_size(Abi::X86_32, 1), 32);
        assert_eq!(ring_size(Abi::X86_32, 16), 512);
    }

    /// Page-aligned heap memory standing in for a mapped ring.
    struct Pages(Vec<u64>);
    impl Pages {
        fn new(pages: usize) -> Pages {
            Pages(vec![0u64; pages * PAGE_SIZE / 8 + PAGE_SIZE / 8])
        }
        fn base(&mut self) -> NonNull<u8> {
            let p = self.0.as_mut_ptr().cast::<u8>();
            let off = p.align_offset(PAGE_SIZE);
            // SAFETY: the vector has an extra page of slack, so the aligned pointer is in it.
            NonNull::new(unsafe { p.add(off) }).unwrap()
        }
    }

    fn pair(mem: &mut Pages, pages: usize, abi: Abi) -> (FrontRing, BackRing) {
        let base = mem.base();
        // SAFETY: `mem` outlives both halves in every test and is `pages` pages long.
        unsafe {
            (
                FrontRing::init(base, pages, abi).unwrap(),
                BackRing::new(base, pages, abi).unwrap(),
            )
        }
    }

    #[test]
    fn overflowing_producer_is_detected() {
        let mut mem = Pages::new(1);
        let (mut f, b) = pair(&mut mem, 1, Abi::X86_64);
        f.publish_raw_req_prod(32);
        assert_eq!(b.pending().unwrap(), 32);
        f.publish_raw_req_prod(33);
        assert!(matches!(
            b.pending(),
            Err(crate::Error::Ring(RingError::ProducerOverflow { .. }))
        ));
        f.publish_raw_req_prod(u32::MAX);
        assert!(b.pending().is_err());
    }

    #[test]
    fn producer_moving_back_behind_consumed_requests_is_detected() {
        // Found by the blkif_ring fuzz target: pending() answered ~2^32.
        let mut mem = Pages::new(1);
        let (mut f, mut b) = pair(&mut mem, 1, Abi::X86_64);
        f.publish_raw_req_prod(10);
        assert_eq!(b.pending().unwrap(), 10);
        let mut s = SlotCopy::default();
        for _ in 0..10 {
            b.pop(&mut s);
        }
        assert_eq!(b.pending().unwrap(), 0);
        f.publish_raw_req_prod(4);
        assert!(matches!(
            b.pending(),
            Err(crate::Error::Ring(RingError::ProducerBackwards {
                req_prod: 4,
                req_cons: 10
            }))
        ));
        // Answering the consumed requests does not make the backwards index acceptable.
        for id in 0..10 {
            b.put_response(&Response {
                id,
                operation: 0,
                status: 0,
            });
        }
        assert!(b.pending().is_err());
        f.publish_raw_req_prod(12);
        assert_eq!(b.pending().unwrap(), 2);
    }

    #[test]
    fn notification_rules() {
        let mut mem = Pages::new(1);
        let (mut f, mut b) = pair(&mut mem, 1, Abi::X86_64);
        f.put_request(&[0u8; 112]);
        // req_event starts at 1: the first request notifies.
        assert!(f.push_requests());
        assert_eq!(b.final_check().unwrap(), 1);
        let mut s = SlotCopy::default();
        b.pop(&mut s);
        f.put_request(&[0u8; 112]);
        // The backend did not re-arm req_event: no notification needed while it is awake.
        assert!(!f.push_requests());
        b.pop(&mut s);
        assert_eq!(b.final_check().unwrap(), 0);
        f.put_request(&[0u8; 112]);
        assert!(
            f.push_requests(),
            "after final_check the next request must notify"
        );
        b.put_response(&Response {
            id: 7,
            operation: 1,
            status: 0,
        });
        assert!(b.push_responses(), "rsp_event starts at 1");
        let mut got = vec![];
        f.take_responses(|r| got.push(r));
        assert_eq!(
            got,
            vec![Response {
                id: 7,
                operation: 1,
                status: 0
            }]
        );
        b.put_response(&Response {
            id: 8,
            operation: 0,
            status: -1,
        });
        assert!(!b.push_responses(), "frontend has not re-armed rsp_event");
        assert!(f.final_check());
    }

    proptest! {
        /// Any interleaving of produce/consume with indexes starting anywhere (wrapping) keeps
        /// requests and responses in order and never loses one.
        #[test]
        fn wrapping_indexes(start in any::<u32>(), ops in proptest::collection::vec(0u8..4, 1..400),
                            abi in prop_oneof![Just(Abi::X86_64), Just(Abi::X86_32)]) {
            let mut mem = Pages::new(1);
            let base = mem.base();
            // Pre-set all indexes to `start` to exercise wrap-around.
            for off in [REQ_PROD, RSP_PROD] {
                // SAFETY: header words inside the page-aligned test memory.
                unsafe { base.as_ptr().add(off).cast::<u32>().write(start) };
            }
            // SAFETY: as in `pair`.
            let mut b = unsafe { BackRing::new(base, 1, abi).unwrap() };
            let sh_front = {
                // SAFETY: as in `pair`; we do not call init so the preset indexes stay.
                let sh = unsafe { Shared::new(base, 1, abi).unwrap() };
                FrontRing { sh, req_prod_pvt: start, rsp_cons: start }
            };
            let mut f = sh_front;
            let (mut next_id, mut expect_rsp, mut in_backend) = (0u64, 0u64, std::collections::VecDeque::new());
            let lay = abi.layout();
            for o in ops {
                match o {
                    0 | 1 if f.free() > 0 => {
                        let mut bytes = [0u8; MAX_SLOT];
                        bytes[lay.id..lay.id + 8].copy_from_slice(&next_id.to_le_bytes());
                        f.put_request(&bytes[..lay.slot]);
                        next_id += 1;
                        f.push_requests();
                    }
                    2 => {
                        let n = b.pending().unwrap();
                        for _ in 0..n {
                            let mut s = SlotCopy::default();
                            b.pop(&mut s);
                            let id = u64::from_le_bytes(s.bytes[lay.id..lay.id + 8].try_into().unwrap());
                            in_backend.push_back(id);
                        }
                    }
                    _ => {
                        while let Some(id) = in_backend.pop_front() {
                            b.put_response(&Response { id, operation: 0, status: 0 });
                        }
                        b.push_responses();
                        f.take_responses(|r| { assert_eq!(r.id, expect_rsp); expect_rsp += 1; });
                    }
                }
                prop_assert!(f.outstanding() <= f.size());
            }
        }
    }
}
