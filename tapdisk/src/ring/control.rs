//! What a ring loop shares with the VBD that started it: the VBD's pause flag, its current
//! image and read cache ([`VbdShared`]), and the loop's own stop and wake-up ([`RingControl`]).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};

use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::driver::Image;
use crate::early::ReadCache;

/// Locks a mutex, recovering the data if a thread panicked while holding it (the state these
/// mutexes guard stays consistent at every await point).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// State shared by a VBD and its ring loops.
pub struct VbdShared {
    /// Ring loops take no new requests while set.
    pub paused: AtomicBool,
    image: Mutex<Arc<dyn Image>>,
    /// The host-side read cache (early read return), if configured.
    pub cache: Option<Arc<ReadCache>>,
}

impl std::fmt::Debug for VbdShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VbdShared")
            .field("paused", &self.paused)
            .field("image", &self.image().spec().to_string())
            .finish_non_exhaustive()
    }
}

impl VbdShared {
    /// Shared state over `image`, running.
    pub fn new(image: Arc<dyn Image>, cache: Option<Arc<ReadCache>>) -> VbdShared {
        VbdShared {
            paused: AtomicBool::new(false),
            image: Mutex::new(image),
            cache,
        }
    }

    /// The current image.
    pub fn image(&self) -> Arc<dyn Image> {
        lock(&self.image).clone()
    }

    /// Replaces the image (while paused: the loops build engines for it when they resume).
    pub fn set_image(&self, image: Arc<dyn Image>) {
        *lock(&self.image) = image;
    }
}

/// The control side of one ring loop.
#[derive(Debug)]
pub struct RingControl {
    wake: EventFd,
    /// Asks the loop to finish in-flight IO and exit.
    pub stop: AtomicBool,
    /// Set by the loop while paused with nothing in flight.
    pub quiesced: AtomicBool,
}

impl RingControl {
    /// A control for a new loop.
    pub fn new() -> io::Result<RingControl> {
        let wake =
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        Ok(RingControl {
            wake,
            stop: AtomicBool::new(false),
            quiesced: AtomicBool::new(false),
        })
    }

    /// The descriptor the loop polls.
    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Wakes the loop so it re-reads the flags.
    pub fn wake(&self) {
        // A full counter (EAGAIN) already means "woken".
        let _ = self.wake.arm();
    }

    /// Consumes wake-ups.
    pub fn ack(&self) {
        // Nothing to read (EAGAIN) is fine: the wake-up was consumed already.
        let _ = self.wake.read();
    }
}
