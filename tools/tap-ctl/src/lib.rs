//! `tap-ctl`: the operator's command line for tapdisk-rs.
//!
//! It links only the control crate (`tapdisk_control`): the protocol, the client and the
//! settings of a VBD, checked here with the same code the daemon checks them with.
//!
//! One module per verb. This one holds the command line ([`Cli`]), the entry point
//! ([`main_with`]), and what the verbs share: reaching tapdisks through the run directory
//! ([`Ctx`], [`Conn`]), writing to stdout ([`emit`]) and the one-line error report.
//!
//! Every failure is reported as one line, `tap-ctl: <what went wrong>`, on stderr. The exit
//! status is 0 on success, 1 when something failed and 2 when the command line itself is wrong.

pub mod args;
pub mod close;
pub mod create;
pub mod destroy;
pub mod list;
pub mod open;
pub mod pause;
pub mod spawn;
pub mod stats;
pub mod trace;
pub mod unpause;

use std::ffi::OsString;
use std::io::ErrorKind;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use clap::{Parser, Subcommand};
use tapdisk_control::client::{self, Client};
use tapdisk_control::proto::{Command, Reply, VbdSummary};
use tapdisk_control::{RunDir, RUNDIR_ENV};
pub use td_cli::{emit, io_msg, one_line};

pub use args::{Disk, DiskArgs, Target};

const ABOUT: &str =
    "Start, stop and inspect tapdisk-rs processes and the virtual block devices (VBDs) they serve";

const LONG_ABOUT: &str = "\
Start, stop and inspect tapdisk-rs processes and the virtual block devices (VBDs) they serve.

A tapdisk is a daemon serving one or more VBDs. Each VBD has a minor number (unique in the run
directory), an image given as TYPE:PATH (e.g. aio:/var/lib/disks/vm1.img: a raw file or block
device), and a device: the unix socket <rundir>/vbd/tapdevN that blkif frontends attach to.
tap-ctl reaches each tapdisk through its control socket, <rundir>/ctl/tapdisk-<pid>.sock.

Most of the time you need only create, list and destroy. spawn and open are the two halves of
create; pause and unpause quiesce a VBD, e.g. around a snapshot or to swap its image. Commands
taking -m MINOR find the tapdisk serving that minor themselves; -p PID names it explicitly.";

const EXAMPLES: &str = "\
Examples:
  tap-ctl create -a aio:/var/lib/disks/vm1.img     # start a tapdisk serving vm1.img; prints
                                                   # its device, e.g. /run/tapdisk-rs/vbd/tapdev0
  tap-ctl create -a aio:/dev/vg0/vm2 -R --nbd unix:/run/vm2.nbd
                                                   # read-only, also exported over NBD
  tap-ctl list                                     # pid=... minor=... state=... args=...
  tap-ctl pause -m 0                               # quiesce minor 0, e.g. before a snapshot
  tap-ctl unpause -m 0 -a aio:/var/lib/disks/vm1-new.img
                                                   # resume on another image of the same size
  tap-ctl stats -m 0                               # counters of minor 0 as JSON
  tap-ctl destroy -m 0                             # close minor 0; stop its tapdisk if idle

  tap-ctl spawn                                    # create in two steps: start a tapdisk, which
  tap-ctl open -p 4242 -a aio:/var/lib/disks/vm3.img  # prints its pid, then open a VBD in it

Errors are one line on stderr, 'tap-ctl: ...'. Exit status: 0 success, 1 failure, 2 bad command
line. Use 'tap-ctl <COMMAND> --help' for the options of each command.";

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "tap-ctl",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = EXAMPLES,
    arg_required_else_help = true
)]
pub struct Cli {
    /// Run directory shared with the tapdisks
    ///
    /// Control sockets, device sockets, minor claims and tapdisk logs live here.
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        env = RUNDIR_ENV,
        default_value = "/run/tapdisk-rs"
    )]
    pub rundir: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub verb: Verb,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Verb {
    /// Start a tapdisk with no VBD and print its pid.
    ///
    /// The tapdisk detaches and serves its control socket in the run directory until it is
    /// destroyed. Open VBDs in it with 'tap-ctl open -p PID'. Its log is
    /// <rundir>/log/tapdisk-<pid>.log.
    #[command(verbatim_doc_comment, after_help = spawn::EXAMPLES)]
    Spawn(spawn::SpawnArgs),
    /// Start a tapdisk and open a VBD in it (spawn + open); print the VBD's device.
    ///
    /// The device is the unix socket blkif frontends attach to, <rundir>/vbd/tapdevMINOR.
    /// If the VBD cannot be opened, the tapdisk just started is stopped again and the
    /// error reported.
    #[command(verbatim_doc_comment, after_help = create::EXAMPLES)]
    Create(create::CreateArgs),
    /// Open a VBD in a running tapdisk; print its device.
    #[command(after_help = open::EXAMPLES)]
    Open(open::OpenArgs),
    /// Close a VBD: disconnect its frontends and NBD clients and close its image.
    ///
    /// The tapdisk keeps running, even with no VBD left; 'destroy' also stops it.
    #[command(verbatim_doc_comment, after_help = close::EXAMPLES)]
    Close(close::CloseArgs),
    /// Quiesce a VBD: wait for in-flight IO to finish and accept no new IO until unpaused.
    ///
    /// Returns once the VBD is paused. Frontends stay connected; their requests wait.
    #[command(verbatim_doc_comment, after_help = pause::EXAMPLES)]
    Pause(pause::PauseArgs),
    /// Resume a paused VBD, optionally on another image of the same size.
    #[command(after_help = unpause::EXAMPLES)]
    Unpause(unpause::UnpauseArgs),
    /// Close a VBD, then stop its tapdisk if it serves no other VBD.
    #[command(after_help = destroy::EXAMPLES)]
    Destroy(destroy::DestroyArgs),
    /// Print the counters of a VBD as JSON.
    #[command(after_help = stats::EXAMPLES)]
    Stats(stats::StatsArgs),
    /// Write a VBD's request trace to a file (Chrome trace JSON for Perfetto, or raw records).
    ///
    /// Each request's stages are timestamped: ring pop, scheduler, IO submit, IO complete,
    /// response push. The VBD records them only if it was opened with --trace N.
    #[command(verbatim_doc_comment, after_help = trace::EXAMPLES)]
    Trace(trace::TraceArgs),
    /// List tapdisks and their VBDs, one line per VBD.
    ///
    /// Lines look like 'pid=1234 minor=0 state=running args=aio:/var/lib/x.img', with
    /// ' nbd=ADDRESS' added when the VBD is exported over NBD. A tapdisk with no VBD is
    /// listed as 'pid=1234 minor=- state=- args=-'.
    /// States: running, quiescing (pause under way), paused, closing.
    #[command(verbatim_doc_comment, after_help = list::EXAMPLES)]
    List(list::ListArgs),
}

/// Parses `args` (the first is the program name), runs the command and returns the exit status.
/// Errors are reported on stderr as one line.
pub fn main_with<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) => return clap_exit(e, verb_of(&args)),
    };
    match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("tap-ctl: {}", one_line(&e));
            1
        }
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    let ctx = Ctx {
        rundir: RunDir(cli.rundir),
    };
    match &cli.verb {
        Verb::Spawn(a) => spawn::run(&ctx, a),
        Verb::Create(a) => create::run(&ctx, a),
        Verb::Open(a) => open::run(&ctx, a),
        Verb::Close(a) => close::run(&ctx, a),
        Verb::Pause(a) => pause::run(&ctx, a),
        Verb::Unpause(a) => unpause::run(&ctx, a),
        Verb::Destroy(a) => destroy::run(&ctx, a),
        Verb::Stats(a) => stats::run(&ctx, a),
        Verb::Trace(a) => trace::run(&ctx, a),
        Verb::List(a) => list::run(&ctx, a),
    }
}

/// The verb named on a command line, if any, for pointing at its help.
fn verb_of(args: &[OsString]) -> Option<String> {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let mut words = args.iter().skip(1).filter_map(|a| a.to_str());
    while let Some(w) = words.next() {
        if w == "--rundir" {
            words.next();
        } else if let Some(sub) = cmd.find_subcommand(w) {
            return Some(sub.get_name().to_string());
        } else if !w.starts_with('-') {
            return None;
        }
    }
    None
}

/// Reports a clap outcome: help and version as clap prints them, errors as one line.
fn clap_exit(e: clap::Error, verb: Option<String>) -> i32 {
    td_cli::clap_exit("tap-ctl", &e, verb.as_deref())
}

/// A clap error of tap-ctl on one line (see [`td_cli::clap_one_line`]).
pub fn clap_one_line(e: &clap::Error, verb: Option<&str>) -> String {
    td_cli::clap_one_line("tap-ctl", e, verb)
}

/// Whether process `pid` exists (a zombie does not count).
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold anything.
        Ok(stat) => match stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
        {
            Some(state) => !matches!(state, "Z" | "X" | "x"),
            None => true,
        },
        Err(_) => false,
    }
}

/// How long a tapdisk may take to exit once told to.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the tapdisks are.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The run directory.
    pub rundir: RunDir,
}

impl Ctx {
    fn rundir_name(&self) -> String {
        self.rundir.0.display().to_string()
    }

    /// Fails unless the run directory exists and is readable.
    pub fn require_rundir(&self) -> Result<()> {
        let dir = self.rundir_name();
        match std::fs::metadata(&self.rundir.0) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => bail!("run directory {dir} is not a directory"),
            Err(e) if e.kind() == ErrorKind::NotFound => bail!(
                "run directory {dir} does not exist: no tapdisk has run there \
                 (pick another with --rundir or ${RUNDIR_ENV})"
            ),
            Err(e) => bail!("cannot access run directory {dir}: {}", io_msg(&e)),
        }
        if let Err(e) = std::fs::read_dir(&self.rundir.0) {
            bail!("cannot read run directory {dir}: {}", io_msg(&e));
        }
        Ok(())
    }

    /// Creates the run directory (and its folders) if needed.
    pub fn create_rundir(&self) -> Result<()> {
        self.rundir.create().map_err(|e| {
            anyhow!(
                "cannot create run directory {}: {}",
                self.rundir_name(),
                io_msg(&e)
            )
        })
    }

    /// Connects to tapdisk `pid`, explaining what is wrong if it cannot.
    pub fn connect(&self, pid: u32) -> Result<Conn> {
        self.require_rundir()?;
        let sock = self.rundir.ctl_socket(pid);
        let shown = sock.display();
        match std::fs::symlink_metadata(&sock) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {
                if pid_alive(pid) {
                    bail!(
                        "process {pid} is not a tapdisk of run directory {} (no control socket {shown})",
                        self.rundir_name()
                    );
                }
                bail!("no tapdisk with pid {pid}: there is no such process");
            }
            Err(e) => bail!("cannot access the control socket {shown}: {}", io_msg(&e)),
        }
        match Client::connect(&sock) {
            Ok(client) => Ok(Conn { pid, client }),
            Err(tapdisk_control::Error::Connect { cause, .. }) => match cause.kind() {
                ErrorKind::ConnectionRefused if !pid_alive(pid) => bail!(
                    "no tapdisk with pid {pid}: the process is gone (stale control socket {shown})"
                ),
                ErrorKind::ConnectionRefused => {
                    bail!("tapdisk {pid} refuses connections on {shown}: is it shutting down?")
                }
                ErrorKind::PermissionDenied => {
                    bail!("permission denied connecting to tapdisk {pid} at {shown}")
                }
                _ => bail!("cannot reach tapdisk {pid} at {shown}: {}", io_msg(&cause)),
            },
            Err(e) => bail!("cannot reach tapdisk {pid} at {shown}: {}", one_line(&e)),
        }
    }

    /// The pid of the tapdisk serving `target`: `-p` if given, else found by its minor.
    pub fn resolve(&self, target: &Target) -> Result<u32> {
        match target.pid {
            Some(pid) => Ok(pid),
            None => {
                self.require_rundir()?;
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
        client::spawn(&self.rundir).map_err(|e| anyhow!("cannot start a tapdisk: {}", one_line(&e)))
    }

    /// Fails if `minor` is claimed by a live tapdisk.
    pub fn check_minor_free(&self, minor: u32) -> Result<()> {
        let claim = self.rundir.minor_dir().join(minor.to_string());
        if let Ok(owner) = std::fs::read_to_string(claim) {
            if let Ok(pid) = owner.trim().parse::<u32>() {
                if pid_alive(pid) {
                    bail!("minor {minor} is in use by tapdisk {pid}");
                }
            }
        }
        Ok(())
    }

    /// Tells tapdisk `pid` to shut down and waits until it has exited. If it cannot be told,
    /// and `force` is set, it is sent SIGTERM instead.
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
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        if !wait_gone(pid, EXIT_TIMEOUT) {
            bail!(
                "tapdisk {pid} did not exit within {} s of being told to",
                EXIT_TIMEOUT.as_secs()
            );
        }
        Ok(())
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
        self.request(command)
            .map_err(|e| anyhow!("tapdisk {}: {}", self.pid, one_line(&e)))
    }

    /// Sends `command`; a failure is the tapdisk's own message.
    pub fn request(&mut self, command: Command) -> Result<Reply> {
        Ok(self.client.call(command)?)
    }

    /// Sends a command answered with `done`.
    pub fn done(&mut self, command: Command) -> Result<()> {
        match self.call(command)? {
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
        match self.request(cmd)? {
            Reply::Opened { vbd } => Ok(vbd),
            other => Err(self.unexpected(&other)),
        }
    }

    fn unexpected(&self, reply: &Reply) -> anyhow::Error {
        anyhow!("tapdisk {} sent an unexpected reply: {reply:?}", self.pid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("tap-ctl").chain(args.iter().copied()))
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn rundir_is_global() {
        let c = parse(&["list", "--rundir", "/tmp/x"]).unwrap();
        assert_eq!(c.rundir, PathBuf::from("/tmp/x"));
        let c = parse(&["--rundir", "/tmp/y", "list"]).unwrap();
        assert_eq!(c.rundir, PathBuf::from("/tmp/y"));
    }

    #[test]
    fn clap_errors_become_one_line() {
        let e = parse(&["close"]).unwrap_err();
        let l = clap_one_line(&e, None);
        assert!(!l.contains('\n'));
        assert!(l.contains("--minor"), "{l}");
        assert!(l.ends_with("see 'tap-ctl close --help'"), "{l}");

        let e = parse(&["create", "-a", "aio:/x", "--readonyl"]).unwrap_err();
        let l = clap_one_line(&e, None);
        assert!(
            l.starts_with("unexpected argument '--readonyl' found"),
            "{l}"
        );
        assert!(l.ends_with("see 'tap-ctl create --help'"), "{l}");

        let e = parse(&["frobnicate"]).unwrap_err();
        let l = clap_one_line(&e, None);
        assert!(
            l.contains("frobnicate") && l.ends_with("see 'tap-ctl --help'"),
            "{l}"
        );

        let e = parse(&["pause", "-m", "zero"]).unwrap_err();
        let l = clap_one_line(&e, Some("pause"));
        assert!(l.contains("invalid value 'zero'"), "{l}");
        assert!(l.ends_with("see 'tap-ctl pause --help'"), "{l}");
        assert_eq!(main_with(["tap-ctl", "pause", "-m", "zero"]), 2);
    }

    #[test]
    fn verb_is_found() {
        let v = |args: &[&str]| verb_of(&args.iter().map(OsString::from).collect::<Vec<_>>());
        assert_eq!(
            v(&["tap-ctl", "--rundir", "list", "pause", "-m", "x"]).as_deref(),
            Some("pause")
        );
        assert_eq!(
            v(&["tap-ctl", "create", "--direct", "maybe"]).as_deref(),
            Some("create")
        );
        assert_eq!(v(&["tap-ctl", "frob", "list"]), None);
        assert_eq!(v(&["tap-ctl"]), None);
    }

    #[test]
    fn errors_are_one_line() {
        let e = anyhow!("first\nsecond").context("outer");
        assert_eq!(one_line(&e), "outer: first second");
        let io = std::io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(io_msg(&io), "No such file or directory");
    }

    #[test]
    fn liveness() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(u32::MAX - 1));
    }

    #[test]
    fn missing_rundir_is_named() {
        let ctx = Ctx {
            rundir: RunDir("/nonexistent/tapdisk-rs".into()),
        };
        let e = ctx.require_rundir().unwrap_err().to_string();
        assert!(
            e.contains("run directory /nonexistent/tapdisk-rs does not exist"),
            "{e}"
        );
        let e = ctx.connect(1).unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
    }

    #[test]
    fn unknown_pid_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = Ctx {
            rundir: RunDir(dir.path().into()),
        };
        ctx.create_rundir().unwrap();
        let e = ctx.connect(u32::MAX - 1).unwrap_err().to_string();
        assert!(e.contains("no tapdisk with pid"), "{e}");
        let e = ctx.connect(std::process::id()).unwrap_err().to_string();
        assert!(e.contains("is not a tapdisk"), "{e}");
        // A socket left behind by a dead tapdisk.
        let stale = ctx.rundir.ctl_socket(u32::MAX - 1);
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        let e = ctx.connect(u32::MAX - 1).unwrap_err().to_string();
        assert!(e.contains("stale control socket"), "{e}");
    }
}
