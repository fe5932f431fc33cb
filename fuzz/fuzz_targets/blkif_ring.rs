//! A hostile frontend playing with a shared ring: arbitrary slot contents and index moves,
//! interleaved with the backend consuming and answering. The consumer must never read outside
//! the ring, never accept more outstanding requests than the ring holds, and never panic.
#![no_main]
use arbitrary::Arbitrary;
use blkif::protocol::{Abi, Response, Segment, PAGE_SIZE};
use blkif::request::{parse, DiskInfo, Parsed};
use blkif::ring::{BackRing, SlotCopy};
use libfuzzer_sys::fuzz_target;
use std::ptr::NonNull;

#[derive(Arbitrary, Debug)]
enum Step {
    /// The frontend writes bytes somewhere in the ring page (slots or header).
    Scribble { at: u16, bytes: Vec<u8> },
    /// The frontend publishes a new req_prod, relative to the last one.
    Publish { delta: u32 },
    /// The backend consumes what is pending.
    Consume,
    /// The backend answers what it consumed and publishes.
    Answer,
    /// The backend goes to sleep.
    FinalCheck,
}

#[derive(Arbitrary, Debug)]
struct Input {
    x86_32: bool,
    steps: Vec<Step>,
}

const DISK: DiskInfo = DiskInfo::writable(1 << 20);

fuzz_target!(|inp: Input| {
    let abi = if inp.x86_32 { Abi::X86_32 } else { Abi::X86_64 };
    let mut mem = vec![0u64; 2 * PAGE_SIZE / 8];
    let base = mem.as_mut_ptr().cast::<u8>();
    let off = base.align_offset(PAGE_SIZE);
    // SAFETY: the vector holds two pages, so one aligned page fits inside it.
    let page = unsafe { base.add(off) };
    let Some(mut ring) = (unsafe {
        // SAFETY: `page` is one aligned page that outlives `ring` (both live in this closure).
        BackRing::new(NonNull::new(page).unwrap(), 1, abi)
    }) else {
        return;
    };
    let mut req_prod = 0u32;
    let mut consumed: Vec<u64> = Vec::new();
    let mut answered = 0u32;
    let mut broken = false;
    for step in inp.steps.into_iter().take(256) {
        match step {
            Step::Scribble { at, bytes } => {
                let at = at as usize % PAGE_SIZE;
                for (i, b) in bytes.iter().take(PAGE_SIZE - at).enumerate() {
                    // SAFETY: `at + i < PAGE_SIZE`, inside the page.
                    unsafe { page.add(at + i).write_volatile(*b) };
                }
            }
            Step::Publish { delta } => {
                req_prod = req_prod.wrapping_add(delta % 64);
                // SAFETY: req_prod lives at offset 0 of the page.
                unsafe { page.cast::<u32>().write_volatile(req_prod) };
            }
            Step::Consume if !broken => match ring.pending() {
                Ok(n) => {
                    assert!(n <= ring.size());
                    for _ in 0..n {
                        let mut s = SlotCopy::default();
                        ring.pop(&mut s);
                        let mut segs = [Segment::default(); 11];
                        let id = match parse(&s, abi, &DISK, &mut segs) {
                            Ok(Parsed::Ready(r)) => r.id,
                            Ok(Parsed::Indirect(h)) => h.id,
                            Err(rej) => rej.id,
                        };
                        consumed.push(id);
                    }
                }
                Err(_) => broken = true,
            },
            Step::Answer if !broken => {
                for id in consumed.drain(..) {
                    ring.put_response(&Response {
                        id,
                        operation: 0,
                        status: 0,
                    });
                    answered += 1;
                }
                ring.push_responses();
            }
            Step::FinalCheck if !broken => {
                if ring.final_check().is_err() {
                    broken = true;
                }
            }
            _ => {}
        }
        // Outstanding requests (consumed but unanswered) never exceed the ring.
        assert!(consumed.len() as u32 <= ring.size());
    }
    let _ = answered;
    drop(ring);
    drop(mem);
});
