//! The live write-intent log of a disk being served: per-region state shared by every event
//! loop's striper, and the worker thread that stores the record ([`crate::intent`]).
//!
//! Each region has one `AtomicU64`: writes in flight (low 32 bits), DURABLE (marked in the
//! stored record), WANTED (a writer waits for it to be marked) and a count of writes started
//! (top bits, wrapping). A write takes every region it touches with one `fetch_add` each and
//! goes out only if all were DURABLE; otherwise it gives them back, flags the unmarked ones
//! WANTED and waits (its striper keeps it, [`IntentLog::waker`] says when to try again). The
//! worker stores a record with DURABLE and WANTED regions, then sets DURABLE. Once a second it
//! clears regions with no write in flight and none started since its last look (a
//! compare-and-swap that fails if a write came in between), and stores the smaller record.
//! So a region is never absent from the stored record while a write to it is in flight.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::control::Control;
use crate::intent::Record;

const INFLIGHT: u64 = 0xffff_ffff;
const DURABLE: u64 = 1 << 32;
const WANTED: u64 = 1 << 33;
/// A stale replica is being copied under this region: writes wait.
const LOCKED: u64 = 1 << 34;
const STARTED_SHIFT: u32 = 35;
const STARTED_ONE: u64 = 1 << STARTED_SHIFT;

/// The regions and the worker's mailbox (see the module docs).
pub struct IntentLog {
    /// Region size in bytes.
    pub region_size: u64,
    disk_size: u64,
    states: Box<[AtomicU64]>,
    token: u64,
    seq: AtomicU64,
    kick: EventFd,
    wakers: Mutex<Vec<Weak<EventFd>>>,
    stop: AtomicBool,
    /// Records stored.
    pub records: AtomicU64,
    /// Records that could not be stored (retried).
    pub store_errors: AtomicU64,
    /// Writes that waited for their regions to be marked.
    pub waits: AtomicU64,
}

impl IntentLog {
    /// An empty log for a disk of `disk_size` bytes in regions of `region_size`, whose records
    /// carry `token` and continue after sequence number `seq`.
    pub fn new(disk_size: u64, region_size: u64, token: u64, seq: u64) -> std::io::Result<Self> {
        let n = disk_size.div_ceil(region_size) as usize;
        Ok(IntentLog {
            region_size,
            disk_size,
            states: (0..n).map(|_| AtomicU64::new(0)).collect(),
            token,
            seq: AtomicU64::new(seq),
            kick: EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?,
            wakers: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            records: AtomicU64::new(0),
            store_errors: AtomicU64::new(0),
            waits: AtomicU64::new(0),
        })
    }

    fn range(&self, off: u64, len: u64) -> std::ops::Range<usize> {
        let first = (off / self.region_size) as usize;
        let last = ((off + len.max(1) - 1) / self.region_size) as usize;
        first..(last + 1).min(self.states.len())
    }

    /// Takes the regions of bytes `off..off + len` for a write: true if all are marked (the
    /// write may go; call [`IntentLog::put`] when it is done), false if it must wait (nothing
    /// is held then, and the worker was asked to mark what is missing).
    pub fn take(&self, off: u64, len: u64) -> bool {
        let range = self.range(off, len);
        for r in range.clone() {
            let s = self.states[r].fetch_add(1 + STARTED_ONE, Ordering::SeqCst);
            if s & DURABLE == 0 || s & LOCKED != 0 {
                // Give back what was taken, this one included; ask for the missing marks.
                for q in range.start..=r {
                    self.states[q].fetch_sub(1, Ordering::SeqCst);
                }
                for q in range.clone() {
                    let s = self.states[q].load(Ordering::SeqCst);
                    if s & DURABLE == 0 && s & WANTED == 0 {
                        self.states[q].fetch_or(WANTED, Ordering::SeqCst);
                    }
                }
                self.waits.fetch_add(1, Ordering::Relaxed);
                let _ = self.kick.arm();
                return false;
            }
        }
        true
    }

    /// Locks the regions of bytes `off..off + len` against writes (for copying a replica under
    /// them): new writes wait, and this returns once those in flight are done.
    pub fn lock(&self, off: u64, len: u64) {
        let range = self.range(off, len);
        for r in range.clone() {
            self.states[r].fetch_or(LOCKED, Ordering::SeqCst);
        }
        for r in range {
            while self.states[r].load(Ordering::SeqCst) & INFLIGHT != 0 {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    /// Undoes [`IntentLog::lock`] and lets waiting writes try again.
    pub fn unlock(&self, off: u64, len: u64) {
        for r in self.range(off, len) {
            self.states[r].fetch_and(!LOCKED, Ordering::SeqCst);
        }
        self.wake_all();
    }

    /// Gives back the regions of a write [`IntentLog::take`] let go, once every replica
    /// answered it.
    pub fn put(&self, off: u64, len: u64) {
        for r in self.range(off, len) {
            self.states[r].fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// An eventfd that turns readable when waiting writes should try again; kept while the
    /// caller holds the `Arc`.
    pub fn waker(&self) -> std::io::Result<Arc<EventFd>> {
        let w = Arc::new(EventFd::from_flags(
            EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC,
        )?);
        let mut ws = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        ws.retain(|w| w.strong_count() > 0);
        ws.push(Arc::downgrade(&w));
        Ok(w)
    }

    fn wake_all(&self) {
        let ws = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        for w in ws.iter().filter_map(Weak::upgrade) {
            let _ = w.arm();
        }
    }

    /// Regions marked (durable) now.
    pub fn marked(&self) -> usize {
        self.states
            .iter()
            .filter(|s| s.load(Ordering::Relaxed) & DURABLE != 0)
            .count()
    }

    fn record(&self, marked: Vec<u32>) -> Record {
        Record {
            region_size: self.region_size,
            disk_size: self.disk_size,
            token: self.token,
            seq: self.seq.fetch_add(1, Ordering::SeqCst) + 1,
            marked,
        }
    }

    fn store(&self, ctl: &dyn Control, marked: Vec<u32>) -> bool {
        match ctl.store_intent(&self.record(marked)) {
            Ok(()) => {
                self.records.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(_) => {
                self.store_errors.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// One round of the worker: marks what writers wait for; with `clean`, clears idle
    /// regions (`seen` is the worker's memory of each region's start count).
    fn round(&self, ctl: &dyn Control, clean: bool, seen: &mut [u64]) {
        let mut wanted = Vec::new();
        let mut marked = Vec::new();
        for (r, s) in self.states.iter().enumerate() {
            let v = s.load(Ordering::SeqCst);
            if v & DURABLE != 0 {
                marked.push(r as u32);
            } else if v & WANTED != 0 {
                wanted.push(r);
                marked.push(r as u32);
            }
        }
        if !wanted.is_empty() {
            if !self.store(ctl, marked) {
                return; // Writers keep waiting; tried again next round.
            }
            for r in wanted {
                self.states[r].fetch_or(DURABLE, Ordering::SeqCst);
                self.states[r].fetch_and(!WANTED, Ordering::SeqCst);
            }
            self.wake_all();
        }
        if !clean {
            return;
        }
        let mut cleared = false;
        for (r, s) in self.states.iter().enumerate() {
            let v = s.load(Ordering::SeqCst);
            if v & DURABLE == 0 {
                continue;
            }
            let started = v >> STARTED_SHIFT;
            if v & INFLIGHT == 0
                && v & WANTED == 0
                && started == seen[r]
                && s.compare_exchange(v, v & !DURABLE, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            {
                cleared = true;
            } else {
                seen[r] = started;
            }
        }
        if cleared {
            let marked = self
                .states
                .iter()
                .enumerate()
                .filter(|(_, s)| s.load(Ordering::SeqCst) & (DURABLE | WANTED) != 0)
                .map(|(r, _)| r as u32)
                .collect();
            // A failed store leaves the old, larger record: still a superset.
            self.store(ctl, marked);
        }
    }

    /// The worker: runs until [`IntentLog::stop`], then, if nothing is in flight, stores an
    /// empty record (a clean stop needs no resync).
    pub fn run(self: Arc<Self>, ctl: Arc<dyn Control>, interval: Duration) {
        let mut seen = vec![u64::MAX; self.states.len()];
        let mut next_clean = Instant::now() + interval;
        while !self.stop.load(Ordering::SeqCst) {
            let wait = next_clean.saturating_duration_since(Instant::now());
            let mut p = libc::pollfd {
                fd: self.kick.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd on the stack.
            unsafe { libc::poll(&mut p, 1, wait.as_millis().min(60_000) as i32) };
            let _ = self.kick.read();
            if !ctl.held() {
                // Fenced: nothing may be stored; writers are failed by their stripers.
                self.wake_all();
                continue;
            }
            let clean = Instant::now() >= next_clean;
            if clean {
                next_clean = Instant::now() + interval;
            }
            self.round(&*ctl, clean, &mut seen);
        }
        if ctl.held()
            && self
                .states
                .iter()
                .all(|s| s.load(Ordering::SeqCst) & INFLIGHT == 0)
        {
            self.store(&*ctl, Vec::new());
        }
    }

    /// Tells the worker to stop (it stores the empty record if it can).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.kick.arm();
    }

    /// Counters for `tap-ctl stats`.
    pub fn stats(&self) -> serde_json::Value {
        serde_json::json!({
            "region_size": self.region_size,
            "regions": self.states.len(),
            "marked": self.marked(),
            "records": self.records.load(Ordering::Relaxed),
            "store_errors": self.store_errors.load(Ordering::Relaxed),
            "waits": self.waits.load(Ordering::Relaxed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::StripeMap;

    /// A control plane keeping the last record in memory.
    #[derive(Default)]
    struct Mem(Mutex<Option<Record>>);

    impl Control for Mem {
        fn map(&self) -> StripeMap {
            crate::map::tests::sample(2, 2)
        }
        fn pr_key(&self) -> Option<u64> {
            None
        }
        fn held(&self) -> bool {
            true
        }
        fn store_stale(&self, _: &[(u32, u32)]) -> Result<(), crate::Error> {
            Ok(())
        }
        fn load_stale(&self) -> Result<Vec<(u32, u32)>, crate::Error> {
            Ok(vec![])
        }
        fn load_intent(&self, _: u64, _: u64) -> Result<Option<Record>, crate::Error> {
            Ok(self.0.lock().unwrap().clone())
        }
        fn store_intent(&self, r: &Record) -> Result<(), crate::Error> {
            *self.0.lock().unwrap() = Some(r.clone());
            Ok(())
        }
        fn refresh_map(&self) -> Option<StripeMap> {
            None
        }
        fn stats(&self) -> serde_json::Value {
            serde_json::Value::Null
        }
    }

    #[test]
    fn a_region_is_in_the_record_while_a_write_to_it_is_in_flight() {
        let log = IntentLog::new(8 << 20, 1 << 20, 0, 0).unwrap();
        let ctl = Mem::default();
        let mut seen = vec![u64::MAX; 8];
        // Not marked: the write waits, and asks.
        assert!(!log.take(1 << 20, 2 << 20));
        log.round(&ctl, false, &mut seen);
        assert_eq!(ctl.0.lock().unwrap().as_ref().unwrap().marked, vec![1, 2]);
        assert!(log.take(1 << 20, 2 << 20));
        // In flight: two cleaning rounds leave it.
        log.round(&ctl, true, &mut seen);
        log.round(&ctl, true, &mut seen);
        assert_eq!(log.marked(), 2);
        log.put(1 << 20, 2 << 20);
        // Another write to region 1 starts and ends between two rounds: region 1 stays one
        // more round, region 2 (idle since the last round) goes.
        assert!(log.take(1 << 20, 512));
        log.put(1 << 20, 512);
        log.round(&ctl, true, &mut seen);
        assert_eq!(log.marked(), 1);
        // Idle for a whole round: cleared.
        log.round(&ctl, true, &mut seen);
        assert_eq!(log.marked(), 0);
        let r = ctl.0.lock().unwrap().clone().unwrap();
        assert!(r.marked.is_empty());
        assert_eq!(r.seq, 3, "one record to mark, two to clear");
        // A write that starts after the clean finds the region unmarked again.
        assert!(!log.take(3 << 20, 512));
        assert!(!log.take(0, 512));
    }
}
