//! The frontend's half of early-read mode on the local transport.
//!
//! In this mode the frontend unmaps ("zaps") the pages of every read it queues, so that a
//! thread touching one before tapdisk has filled it stalls on a userfaultfd fault until the
//! data is there (see [`crate::uffd`]). tapdisk may answer a read before all of it has been
//! read from the disk; the caller learns that the read's data is complete, or that it never
//! will be, from [`crate::local::LocalFrontend::finish_read`].
//!
//! A read answered early comes back with status [`crate::local::STATUS_EARLY`] (handed to
//! the caller as OKAY), and tapdisk sends a completion record on the transport socket once
//! all its pages are in, or once it failed. Failures never go unnoticed: a watchdog thread
//! reads those records and keeps its own handle on the userfaultfd. If tapdisk dies, every
//! page of every read not yet finished is filled with a poison pattern and mapped, which
//! wakes any thread stalled on one (nobody hangs), and `finish_read` reports the failure
//! (nobody goes on with unfilled data without being told).

use std::collections::{HashMap, HashSet};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::local::poll_raw;
use crate::mmap::Mapping;
use crate::protocol::PAGE_SIZE;
use crate::uffd::Uffd;

/// The byte pattern of a page that tapdisk never filled (it died first).
pub const POISON: u8 = 0xDB;

pub use crate::error::EarlyReadError;

/// Runs of pages: `(first page, count)`.
type Runs = Vec<(u32, u32)>;

#[derive(Default)]
struct State {
    /// Reads zapped and not yet finished: id -> their pages.
    outstanding: HashMap<u64, Runs>,
    /// Reads answered early whose completion record has not come yet.
    pending: HashSet<u64>,
    /// Completion records received: id -> every page filled.
    completed: HashMap<u64, bool>,
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
    dead: AtomicBool,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Early-read state of one frontend.
pub(crate) struct EarlyFront {
    base: usize,
    pages: u32,
    shared: Arc<Shared>,
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for EarlyFront {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EarlyFront")
            .field("base", &self.base)
            .field("pages", &self.pages)
            .finish_non_exhaustive()
    }
}

impl EarlyFront {
    /// Starts the watchdog. `mem` is the frontend's registered mapping of the memfd, `alias`
    /// a second, unregistered mapping of it (for poisoning), `uffd` the frontend's own handle.
    pub(crate) fn start(
        mem: &Mapping,
        alias: Mapping,
        uffd: Uffd,
        sock: &UnixStream,
    ) -> io::Result<EarlyFront> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            dead: AtomicBool::new(false),
        });
        let stop = crate::local::new_eventfd()?;
        let w = Watchdog {
            sock: sock.try_clone()?,
            stop: stop.try_clone()?,
            uffd,
            alias,
            base: mem.ptr().as_ptr() as u64,
            shared: shared.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("early-read-watchdog".into())
            .spawn(move || w.run())?;
        Ok(EarlyFront {
            base: mem.ptr().as_ptr() as usize,
            pages: (mem.len() / PAGE_SIZE) as u32,
            shared,
            stop,
            thread: Some(thread),
        })
    }

    /// Zaps `pages` (grant refs = page numbers; out-of-range ones are skipped) before read
    /// `id` is queued, and remembers them until [`EarlyFront::finish`].
    pub(crate) fn zap_read(&self, id: u64, pages: impl Iterator<Item = u32>) -> io::Result<()> {
        let mut runs: Runs = Vec::new();
        for p in pages.filter(|&p| p < self.pages) {
            match runs.last_mut() {
                Some((start, n)) if *start + *n == p => *n += 1,
                Some((start, n)) if p >= *start && p < *start + *n => {}
                _ => runs.push((p, 1)),
            }
        }
        for &(start, n) in &runs {
            let addr = (self.base + start as usize * PAGE_SIZE) as *mut u8;
            // SAFETY: the run lies inside our registered shared memfd mapping (checked
            // against `pages` above), which lives as long as the frontend.
            unsafe { crate::uffd::zap(addr, n as usize * PAGE_SIZE)? };
        }
        lock(&self.shared.state).outstanding.insert(id, runs);
        Ok(())
    }

    /// tapdisk answered read `id` before all its data was in.
    pub(crate) fn answered_early(&self, id: u64) {
        lock(&self.shared.state).pending.insert(id);
    }

    /// Waits until read `id` is complete, then says whether its data is good. A read
    /// answered early is complete when tapdisk's completion record arrives (or tapdisk dies);
    /// any other read was complete when it was answered.
    pub(crate) fn finish(&self, id: u64) -> Result<(), EarlyReadError> {
        let mut st = lock(&self.shared.state);
        let result = if st.pending.contains(&id) {
            loop {
                if let Some(ok) = st.completed.remove(&id) {
                    break if ok {
                        Ok(())
                    } else {
                        Err(EarlyReadError::Failed(id))
                    };
                }
                if self.shared.dead.load(Ordering::Acquire) {
                    break Err(EarlyReadError::BackendGone(id));
                }
                st = self.shared.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        } else {
            Ok(())
        };
        st.pending.remove(&id);
        st.outstanding.remove(&id);
        result
    }

    /// Whether the watchdog saw tapdisk go away.
    pub(crate) fn backend_gone(&self) -> bool {
        self.shared.dead.load(Ordering::Acquire)
    }
}

impl Drop for EarlyFront {
    fn drop(&mut self) {
        // A failed write (a saturated counter) still leaves the eventfd readable.
        let _ = nix::unistd::write(&self.stop, &1u64.to_ne_bytes());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Watchdog {
    sock: UnixStream,
    stop: OwnedFd,
    uffd: Uffd,
    alias: Mapping,
    base: u64,
    shared: Arc<Shared>,
}

impl Watchdog {
    fn run(mut self) {
        let mut buf = [0u8; 16];
        let mut have = 0usize;
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.sock.as_raw_fd(),
                    events: libc::POLLIN | libc::POLLRDHUP,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            if poll_raw(&mut fds, -1).is_err() {
                return self.gone();
            }
            if fds[1].revents != 0 {
                return;
            }
            let r = fds[0].revents;
            if r & libc::POLLIN != 0 {
                match self.sock.read(&mut buf[have..]) {
                    Ok(0) => return self.gone(),
                    Ok(n) => {
                        have += n;
                        if have == buf.len() {
                            have = 0;
                            let ok = &buf[..4] == crate::local::EARLY_READ_DONE;
                            if ok || &buf[..4] == crate::local::EARLY_READ_FAILED {
                                let id = u64::from_le_bytes(buf[8..].try_into().unwrap_or([0; 8]));
                                lock(&self.shared.state).completed.insert(id, ok);
                                self.shared.cv.notify_all();
                            }
                        }
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(_) => return self.gone(),
                }
            }
            if r & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0 {
                return self.gone();
            }
        }
    }

    /// tapdisk is gone: poison and map every page still outstanding, waking stalled threads.
    fn gone(&self) {
        self.shared.dead.store(true, Ordering::Release);
        self.shared.cv.notify_all();
        let st = lock(&self.shared.state);
        for runs in st.outstanding.values() {
            for &(start, n) in runs {
                let off = start as usize * PAGE_SIZE;
                let len = n as usize * PAGE_SIZE;
                if off + len > self.alias.len() {
                    continue;
                }
                // SAFETY: inside the alias mapping (checked above): plain bytes of shared memory
                // that no Rust reference points into. Threads reading these pages through the
                // registered mapping either stall until the continue below (unfilled pages) or
                // may see poison (filled ones); either way `finish` reports the read as bad.
                unsafe { std::ptr::write_bytes(self.alias.ptr().as_ptr().add(off), POISON, len) };
                let _ = self.uffd.continue_range(self.base + off as u64, len as u64);
            }
        }
    }
}
