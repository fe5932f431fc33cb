//! Reaching tapdisks through the run directory ([`Ctx`]), one control connection ([`Conn`]),
//! and cleaning up after a tapdisk that died ([`Ctx::clean_dead`]).

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use nix::errno::Errno;
use tapdisk_control::client::{self, Client};
use tapdisk_control::escape;
use tapdisk_control::minor::{self, is_socket, Marker};
use tapdisk_control::process::pid_alive;
use tapdisk_control::proto::{Command, Reply, VbdSummary};
use tapdisk_control::{RunDir, RUNDIR_ENV};

use crate::failure::{errno_of, fail};
use crate::{io_msg, one_line, Disk, Target};

/// How long a tapdisk may take to exit once told to.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an exchange that broke waits for its tapdisk to finish dying before it calls the
/// tapdisk alive (a killed process's socket breaks before the process is gone).
const DYING_GRACE: Duration = Duration::from_millis(500);

/// Where the tapdisks are.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The run directory.
    pub rundir: RunDir,
}

/// A path for a message.
pub fn shown(p: &std::path::Path) -> String {
    escape::os(p.as_os_str()).into_owned()
}

impl Ctx {
    /// The run directory, for messages.
    pub fn rundir_name(&self) -> String {
        shown(&self.rundir.0)
    }

    /// Fails unless the run directory exists and is readable.
    pub fn require_rundir(&self) -> Result<()> {
        let dir = self.rundir_name();
        match std::fs::metadata(&self.rundir.0) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(fail(
                    Errno::ENOTDIR,
                    format!("run directory {dir} is not a directory"),
                ))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(fail(
                    Errno::ENOENT,
                    format!(
                        "run directory {dir} does not exist: no tapdisk has run there \
                         (pick another with --rundir or ${RUNDIR_ENV})"
                    ),
                ))
            }
            Err(e) => return Err(anyhow!(e).context(format!("cannot access run directory {dir}"))),
        }
        if let Err(e) = std::fs::read_dir(&self.rundir.0) {
            return Err(anyhow!(e).context(format!("cannot read run directory {dir}")));
        }
        Ok(())
    }

    /// Creates the run directory (and its folders) if needed.
    pub fn create_rundir(&self) -> Result<()> {
        self.rundir.create().map_err(|e| {
            anyhow!(e).context(format!(
                "cannot create run directory {}",
                self.rundir_name()
            ))
        })
    }

    /// Connects to tapdisk `pid`, explaining what is wrong if it cannot.
    pub fn connect(&self, pid: u32) -> Result<Conn> {
        self.require_rundir()?;
        let sock = self.rundir.ctl_socket(pid);
        let at = shown(&sock);
        match std::fs::symlink_metadata(&sock) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {
                if pid_alive(pid) {
                    return Err(fail(
                        Errno::ENOENT,
                        format!(
                            "process {pid} is not a tapdisk of run directory {} (no control socket {at})",
                            self.rundir_name()
                        ),
                    ));
                }
                return Err(fail(
                    Errno::ESRCH,
                    format!("no tapdisk with pid {pid}: there is no such process"),
                ));
            }
            Err(e) => {
                return Err(anyhow!(e).context(format!("cannot access the control socket {at}")))
            }
        }
        match Client::connect(&sock) {
            Ok(client) => Ok(Conn { pid, client }),
            Err(tapdisk_control::Error::Connect { cause, .. }) => Err(match cause.kind() {
                ErrorKind::ConnectionRefused if !pid_alive(pid) => fail(
                    Errno::ESRCH,
                    format!(
                        "tapdisk {pid} is dead (killed or crashed; stale control socket {at}): \
                         'tap-ctl list' shows what it served, 'tap-ctl destroy -m MINOR' cleans up"
                    ),
                ),
                ErrorKind::ConnectionRefused => fail(
                    Errno::ECONNREFUSED,
                    format!("tapdisk {pid} refuses connections on {at}: is it shutting down?"),
                ),
                ErrorKind::PermissionDenied => fail(
                    Errno::EACCES,
                    format!("permission denied connecting to tapdisk {pid} at {at}"),
                ),
                _ => fail(
                    cause.raw_os_error().map_or(Errno::EIO, Errno::from_raw),
                    format!("cannot reach tapdisk {pid} at {at}: {}", io_msg(&cause)),
                ),
            }),
            Err(e) => Err(anyhow!(e).context(format!("cannot reach tapdisk {pid} at {at}"))),
        }
    }

    /// The pid of the tapdisk serving `target`: `-p` if given, else found by its minor.
    pub fn resolve(&self, target: &Target) -> Result<u32> {
        match target.pid {
            Some(pid) => Ok(pid),
            None => {
                self.require_rundir()?;
                if let Marker::Dead(r) = minor::inspect(&self.rundir, target.minor)? {
                    return Err(dead_minor(target.minor, r.pid));
                }
                Ok(client::find_minor(&self.rundir, target.minor)?)
            }
        }
    }

    /// Connects to the tapdisk serving `target`.
    pub fn connect_target(&self, target: &Target) -> Result<Conn> {
        let pid = self.resolve(target)?;
        self.connect(pid)
    }

    /// Starts a tapdisk; returns its pid.
    pub fn spawn(&self) -> Result<u32> {
        self.create_rundir()?;
        client::spawn(&self.rundir).map_err(|e| {
            let errno = errno_of(&e);
            let msg = format!("cannot start a tapdisk: {}", one_line(&e));
            match errno {
                Some(n) => fail(n, msg),
                None => anyhow!(msg),
            }
        })
    }

    /// Fails if `minor` is held by a live process.
    pub fn check_minor_free(&self, minor: u32) -> Result<()> {
        if let Marker::Held(r) = minor::inspect(&self.rundir, minor)? {
            return Err(tapdisk_control::Error::MinorInUse {
                minor,
                owner: r.map(|r| r.pid),
            }
            .into());
        }
        Ok(())
    }

    /// Tells tapdisk `pid` to shut down and waits until it has exited. If it cannot be told,
    /// and `force` is set, it is sent SIGTERM instead (and SIGKILL once `EXIT_TIMEOUT` passed).
    pub fn stop(&self, pid: u32, force: bool) -> Result<()> {
        let told = self
            .connect(pid)
            .and_then(|mut c| c.call(Command::Shutdown).map(drop));
        if let Err(e) = told {
            // The reply may be lost to the exit; what counts is whether it goes.
            if pid_alive(pid) && !wait_gone(pid, Duration::from_millis(500)) {
                if !force {
                    return Err(e);
                }
                signal(pid, nix::sys::signal::Signal::SIGTERM);
            }
        }
        if !wait_gone(pid, EXIT_TIMEOUT) {
            if force {
                signal(pid, nix::sys::signal::Signal::SIGKILL);
                if wait_gone(pid, Duration::from_secs(2)) {
                    self.clean_process(pid);
                    return Ok(());
                }
            }
            return Err(fail(
                Errno::ETIMEDOUT,
                format!(
                    "tapdisk {pid} did not exit within {} s of being told to",
                    EXIT_TIMEOUT.as_secs()
                ),
            ));
        }
        Ok(())
    }

    /// Removes what dead tapdisk `pid` left of VBD `minor`: its NBD socket, its device socket
    /// (unless another live tapdisk serves the minor now). The minor's marker is the caller's.
    pub fn clean_dead(&self, pid: u32, minor: u32) {
        let nbd = self.rundir.nbd_socket(pid, minor);
        if is_socket(&nbd) {
            let _ = std::fs::remove_file(nbd);
        }
        let held = matches!(minor::inspect(&self.rundir, minor), Ok(Marker::Held(_)));
        let dev = self.rundir.vbd_socket(minor);
        if !held && is_socket(&dev) {
            let _ = std::fs::remove_file(dev);
        }
        self.clean_process(pid);
    }

    /// Removes the control socket of `pid` if that process is gone.
    pub fn clean_process(&self, pid: u32) {
        let ctl = self.rundir.ctl_socket(pid);
        if !pid_alive(pid) && is_socket(&ctl) {
            let _ = std::fs::remove_file(ctl);
        }
    }

    /// Forgets what a dead tapdisk wrote into the marker of `minor` (the VBD is closed); the
    /// marker stays allocated for `tap-ctl free`.
    pub fn forget_dead(&self, minor: u32) {
        if let Ok(Marker::Dead(_)) = minor::inspect(&self.rundir, minor) {
            if let Ok(f) = std::fs::OpenOptions::new()
                .write(true)
                .open(self.rundir.minor_marker(minor))
            {
                let _ = f.set_len(0);
            }
        }
    }
}

/// The error for a minor whose tapdisk died.
pub fn dead_minor(minor: u32, pid: u32) -> anyhow::Error {
    fail(
        Errno::ESRCH,
        format!(
            "minor {minor}: tapdisk {pid} serving it is dead (killed or crashed); \
             'tap-ctl destroy -m {minor}' cleans up after it"
        ),
    )
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    if let Ok(p) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), sig);
    }
}

/// Waits up to `timeout` for process `pid` to go; returns whether it did.
pub fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !pid_alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A control connection to one tapdisk.
#[derive(Debug)]
pub struct Conn {
    /// The tapdisk's pid.
    pub pid: u32,
    client: Client,
}

impl Conn {
    /// Sends `command`; a failure reads `tapdisk PID: <reason>`.
    pub fn call(&mut self, command: Command) -> Result<Reply> {
        let limit = command.deadline();
        self.call_within(command, limit)
    }

    /// [`Conn::call`], the exchange bounded by `limit`.
    pub fn call_within(&mut self, command: Command, limit: Duration) -> Result<Reply> {
        let pid = self.pid;
        self.client
            .call_within(command, limit)
            .map_err(|e| self.failure(&e, format!("tapdisk {pid}: {}", one_line(&e))))
    }

    /// The error for a failed exchange, reading `msg`: ESRCH if the tapdisk died during it
    /// ([`Conn::died`]), else the errno the failure carries.
    fn failure(&self, e: &tapdisk_control::Error, msg: String) -> anyhow::Error {
        self.died(e, &msg).unwrap_or_else(|| match errno_of(e) {
            Some(n) => fail(n, msg),
            None => anyhow!(msg),
        })
    }

    /// The error for an exchange that failed because the tapdisk died during it (killed or
    /// crashed just before or meanwhile, its socket not yet gone): ESRCH, as for a tapdisk
    /// found dead before the exchange, so every verb treats both alike. None if the failure is
    /// not the transport's, or the tapdisk lives on.
    fn died(&self, e: &tapdisk_control::Error, msg: &str) -> Option<anyhow::Error> {
        let transport = matches!(
            e,
            tapdisk_control::Error::Io { .. }
                | tapdisk_control::Error::Closed { .. }
                | tapdisk_control::Error::Connect { .. }
        );
        if !transport {
            return None;
        }
        // A process killed a moment ago may still be exiting when its socket breaks.
        let deadline = Instant::now() + DYING_GRACE;
        while pid_alive(self.pid) {
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(fail(
            Errno::ESRCH,
            format!(
                "tapdisk {} died during the request (killed or crashed): {msg}; \
                 'tap-ctl list' shows what it served, 'tap-ctl destroy -m MINOR' cleans up",
                self.pid
            ),
        ))
    }

    /// Sends a command answered with `done`.
    pub fn done(&mut self, command: Command) -> Result<()> {
        self.done_within(command.deadline(), command)
    }

    /// [`Conn::done`] bounded by `limit`.
    pub fn done_within(&mut self, limit: Duration, command: Command) -> Result<()> {
        match self.call_within(command, limit)? {
            Reply::Done => Ok(()),
            other => Err(self.unexpected(&other)),
        }
    }

    /// The tapdisk's VBDs.
    pub fn list(&mut self) -> Result<Vec<VbdSummary>> {
        match self.call(Command::List)? {
            Reply::List { vbds } => Ok(vbds),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Opens `disk` as a new VBD, at `minor` or the lowest free one. A failure is the tapdisk's
    /// own message.
    pub fn open(&mut self, minor: Option<u32>, disk: Disk) -> Result<VbdSummary> {
        let cmd = Command::Open {
            minor,
            image: disk.image,
            settings: disk.settings,
        };
        let limit = cmd.deadline();
        match self.client.call_within(cmd, limit) {
            Ok(Reply::Opened { vbd }) => Ok(vbd),
            Ok(other) => Err(self.unexpected(&other)),
            Err(e) => Err(self.failure(&e, one_line(&e))),
        }
    }

    fn unexpected(&self, reply: &Reply) -> anyhow::Error {
        fail(
            Errno::EPROTO,
            format!("tapdisk {} sent an unexpected reply: {reply:?}", self.pid),
        )
    }
}
