//! The tapdisk process: the control server and the VBDs it owns.

mod conn;
mod exit;
mod minor;

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use slog::{info, warn, Logger};
use tapdisk_control::proto::{
    Command, Reply, RequestMsg, ResultMsg, TraceFormat, MAX_LINE, VERSION,
};
use tapdisk_control::{Machine, RunDir};

use crate::error::{Error, IoContext, Result};
use crate::logging::RateLimit;
use crate::ring::lock;
use crate::vbd::Vbd;

pub use conn::{IDLE, LINE_DEADLINE, MAX_CONNECTIONS, REPLY_DEADLINE};
pub use exit::block_signals;
pub use minor::{claim_minor, MinorClaim};

/// How long a tapdisk told to exit (SIGTERM, `shutdown`) waits for its VBDs to finish the IO
/// they have in flight before it exits anyway, unless `--exit-deadline` says otherwise.
pub const EXIT_DEADLINE: Duration = Duration::from_secs(10);

/// The exit status of a tapdisk that exited at its deadline with IO still in flight.
pub const EXIT_STATUS_DEADLINE: i32 = 3;

fn write_trace(
    path: &str,
    minor: u32,
    rings: &[crate::trace::RingTrace],
    format: TraceFormat,
) -> std::io::Result<()> {
    let f = std::fs::File::create(path)?;
    let mut w = std::io::BufWriter::new(f);
    match format {
        TraceFormat::Raw => serde_json::to_writer(&mut w, rings)?,
        TraceFormat::Chrome => crate::trace::write_chrome(&mut w, minor, rings, &|_, _| None)?,
    }
    w.flush()
}

struct Entry {
    vbd: Vbd,
    _claim: MinorClaim,
}

/// The daemon's state.
pub struct Daemon {
    rundir: RunDir,
    log: Logger,
    vbds: Mutex<std::collections::BTreeMap<u32, Entry>>,
    exiting: AtomicBool,
    ctl_path: PathBuf,
    /// Control connections being served.
    control_conns: AtomicUsize,
    exit_deadline: Mutex<Duration>,
}

impl Daemon {
    /// Binds the control socket of this process in `rundir`.
    pub fn bind(rundir: RunDir, log: Logger) -> Result<(Arc<Daemon>, UnixListener)> {
        rundir
            .create()
            .doing(|| format!("cannot create {}", rundir.0.display()))?;
        let ctl_path = rundir.ctl_socket(std::process::id());
        let _ = std::fs::remove_file(&ctl_path);
        let l = UnixListener::bind(&ctl_path)
            .doing(|| format!("cannot listen on {}", ctl_path.display()))?;
        let d = Daemon {
            rundir,
            log,
            vbds: Mutex::default(),
            exiting: AtomicBool::new(false),
            ctl_path,
            control_conns: AtomicUsize::new(0),
            exit_deadline: Mutex::new(EXIT_DEADLINE),
        };
        Ok((Arc::new(d), l))
    }

    /// Serves the control socket until a shutdown. An accept that fails (out of descriptors
    /// or memory) is retried after a pause, not in a busy loop.
    pub fn serve(self: &Arc<Daemon>, listener: UnixListener) {
        info!(self.log, "listening"; "control" => %self.ctl_path.display());
        let mut failed = RateLimit::new(5, Duration::from_secs(10));
        for conn in listener.incoming() {
            if self.exiting.load(Ordering::Acquire) {
                break;
            }
            match conn {
                Ok(sock) => self.take_connection(sock),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if let Some(suppressed) = failed.check() {
                        warn!(self.log, "accepting on the control socket failed"; "error" => %e,
                              "suppressed" => suppressed);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// The answer to one request line, and whether the connection ends after it (a shutdown,
    /// or a line too long to resynchronise after).
    fn answer(&self, line: &[u8]) -> (ResultMsg, bool) {
        if line.len() > MAX_LINE {
            return (
                ResultMsg::Error(format!("control message longer than {MAX_LINE} bytes")),
                true,
            );
        }
        match serde_json::from_slice::<RequestMsg>(line) {
            Err(e) => (
                ResultMsg::Error(format!("malformed control message: {e}")),
                false,
            ),
            Ok(m) if m.v != VERSION => (
                ResultMsg::Error(format!(
                    "control protocol version {} (this tapdisk speaks {VERSION})",
                    m.v
                )),
                false,
            ),
            Ok(m) => {
                let shutdown = m.command == Command::Shutdown;
                match self.dispatch(m.command) {
                    Ok(r) => (ResultMsg::Ok(r), shutdown),
                    Err(e) => (ResultMsg::Error(e.to_string()), false),
                }
            }
        }
    }

    /// Carries out a command. What it carries is checked first ([`Command::validate`]: the
    /// same checks as tap-ctl's; for an `open`, also against the memory and descriptors this
    /// process can still have, [`tapdisk_control::VbdSettings::validate_on`]), so nothing is
    /// claimed or opened for a refused command.
    fn dispatch(&self, cmd: Command) -> Result<Reply> {
        cmd.validate()?;
        match cmd {
            Command::Hello => Ok(Reply::Hello {
                pid: std::process::id(),
                version: VERSION,
                build: env!("CARGO_PKG_VERSION").into(),
            }),
            Command::Open {
                minor,
                image,
                settings,
            } => {
                // The sizes the settings drive, against what this process can still have.
                settings.validate_on(&image, &Machine::probe())?;
                let claim = claim_minor(&self.rundir, minor, &image)?;
                let m = claim.minor;
                if let Some(dead) = &claim.took_over {
                    warn!(self.log, "minor taken over from a dead tapdisk";
                          "minor" => m, "dead_pid" => dead.pid);
                }
                let paths = crate::vbd::VbdPaths {
                    device: self.rundir.vbd_socket(m),
                    nbd: self.rundir.nbd_socket(std::process::id(), m),
                };
                let vbd = Vbd::open(m, image, settings, paths, &self.log)?;
                let summary = vbd.summary();
                lock(&self.vbds).insert(m, Entry { vbd, _claim: claim });
                Ok(Reply::Opened { vbd: summary })
            }
            Command::Close { minor } => {
                let e = lock(&self.vbds)
                    .remove(&minor)
                    .ok_or_else(|| no_such(minor))?;
                e.vbd.close();
                Ok(Reply::Done)
            }
            Command::Pause { minor } => {
                let mut v = lock(&self.vbds);
                v.get_mut(&minor)
                    .ok_or_else(|| no_such(minor))?
                    .vbd
                    .pause()?;
                Ok(Reply::Done)
            }
            Command::Unpause { minor, image } => {
                let mut v = lock(&self.vbds);
                v.get_mut(&minor)
                    .ok_or_else(|| no_such(minor))?
                    .vbd
                    .unpause(image)?;
                Ok(Reply::Done)
            }
            Command::List => {
                let vbds = lock(&self.vbds).values().map(|e| e.vbd.summary()).collect();
                Ok(Reply::List { vbds })
            }
            Command::Stats { minor } => {
                let v = lock(&self.vbds);
                Ok(Reply::Stats {
                    stats: v.get(&minor).ok_or_else(|| no_such(minor))?.vbd.stats(),
                })
            }
            Command::Trace {
                minor,
                path,
                format,
            } => {
                let rings = {
                    let v = lock(&self.vbds);
                    v.get(&minor).ok_or_else(|| no_such(minor))?.vbd.trace()
                };
                let requests = rings.iter().map(|r| r.requests.len() as u64).sum();
                let dropped = rings.iter().map(|r| r.dropped).sum();
                write_trace(&path, minor, &rings, format)
                    .doing(|| format!("writing the trace to {path}"))?;
                Ok(Reply::Trace {
                    path,
                    requests,
                    dropped,
                })
            }
            Command::Shutdown => Ok(Reply::Done),
            Command::XenConnect { minor, spec } => {
                let mut v = lock(&self.vbds);
                let vbd = &mut v.get_mut(&minor).ok_or_else(|| no_such(minor))?.vbd;
                let (disk, xen) = crate::vbd::xen::connect(vbd, spec)?;
                Ok(Reply::XenConnected { disk, xen })
            }
            Command::XenDisconnect {
                minor,
                domid,
                devid,
            } => {
                let mut v = lock(&self.vbds);
                let vbd = &mut v.get_mut(&minor).ok_or_else(|| no_such(minor))?.vbd;
                crate::vbd::xen::disconnect(vbd, domid, devid)?;
                Ok(Reply::Done)
            }
        }
    }
}

fn no_such(minor: u32) -> Error {
    Error::NoSuchMinor(minor)
}

#[cfg(test)]
mod tests;
