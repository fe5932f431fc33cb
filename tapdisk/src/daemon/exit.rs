//! Ending the process. SIGTERM, SIGINT, SIGHUP and the `shutdown` command all end in
//! [`Daemon::exit`]: every VBD is closed (its rings finish the IO they have in flight, its NBD
//! clients are disconnected), the control socket is removed, and the process exits 0. The
//! whole of it is bounded by the exit deadline ([`super::EXIT_DEADLINE`], or `--exit-deadline`):
//! IO that has not finished by then (a hung device) is abandoned, unanswered, the reason is
//! logged with the VBDs still closing, and the process exits with
//! [`super::EXIT_STATUS_DEADLINE`]. Abandoned IO was never acknowledged, so this is no worse
//! than a crash: no acknowledged write is lost.
//!
//! Nothing here depends on the run directory still being there: closing a VBD wakes its
//! threads through socket pairs it holds, not through the paths of its sockets.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};
use slog::{error, info, warn};

use super::{Daemon, EXIT_STATUS_DEADLINE};
use crate::error::{Error, IoContext, Result};
use crate::ring::lock;

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread (and so in every thread it starts
/// afterwards) and ignores SIGPIPE; returns the set for [`Daemon::handle_signals`]. Call
/// before any other thread starts.
pub fn block_signals() -> Result<SigSet> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    set.thread_block()
        .map_err(|e| Error::io("cannot block signals", e.into()))?;
    // A frontend or NBD client that disappears must not kill us with SIGPIPE.
    // SAFETY: setting SIGPIPE to ignored is async-signal-safe and affects only delivery.
    unsafe { nix::sys::signal::signal(Signal::SIGPIPE, nix::sys::signal::SigHandler::SigIgn) }
        .map_err(|e| Error::io("cannot ignore SIGPIPE", e.into()))?;
    Ok(set)
}

impl Daemon {
    /// How long [`Daemon::exit`] may take before it gives up on IO in flight.
    pub fn set_exit_deadline(&self, d: Duration) {
        *lock(&self.exit_deadline) = d;
    }

    /// Handles the signals of `set` (from [`block_signals`]) by shutting down cleanly.
    pub fn handle_signals(self: &Arc<Daemon>, set: SigSet) -> Result<()> {
        let d = self.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Ok(sig) = set.wait() {
                    warn!(d.log, "signal received, shutting down"; "signal" => %sig);
                    d.exit();
                }
            })
            .doing(|| "cannot start the signal thread".into())?;
        Ok(())
    }

    /// Closes every VBD, removes the control socket and exits the process, within the exit
    /// deadline. A second caller (a signal during a `shutdown`) waits for the first.
    pub fn exit(&self) -> ! {
        if self.exiting.swap(true, Ordering::AcqRel) {
            loop {
                std::thread::park();
            }
        }
        let closing: Arc<Mutex<Vec<u32>>> = Arc::default();
        let deadline = *lock(&self.exit_deadline);
        {
            let (log, ctl, closing) = (self.log.clone(), self.ctl_path.clone(), closing.clone());
            let watchdog = std::thread::Builder::new()
                .name("exit-deadline".into())
                .spawn(move || {
                    std::thread::sleep(deadline);
                    let minors = lock(&closing).clone();
                    error!(log, "exit deadline passed: exiting with IO still in flight, unanswered";
                           "deadline_s" => deadline.as_secs_f64(), "closing" => ?minors);
                    let _ = std::fs::remove_file(&ctl);
                    std::process::exit(EXIT_STATUS_DEADLINE)
                });
            if let Err(e) = watchdog {
                warn!(self.log, "cannot start the exit deadline's thread; exiting without one";
                      "error" => %e);
            }
        }
        let vbds: Vec<_> = {
            let mut g = lock(&self.vbds);
            std::mem::take(&mut *g)
                .into_iter()
                .map(|(m, e)| {
                    drop(e._claim);
                    (m, e.vbd)
                })
                .collect()
        };
        *lock(&closing) = vbds.iter().map(|(m, _)| *m).collect();
        for (m, v) in vbds {
            v.close();
            lock(&closing).retain(|&c| c != m);
        }
        let _ = std::fs::remove_file(&self.ctl_path);
        info!(self.log, "exiting");
        std::process::exit(0)
    }
}
