//! `tap-ctl`: the operator's command line for tapdisk-rs, and a drop-in for blktap3's.
//!
//! It links only the control crate (`tapdisk_control`): the protocol, the client and the
//! settings of a VBD, checked here with the same code the daemon checks them with.
//!
//! blktap3's command line is here as Xen's `block-tap` hotplug script and xapi's storage
//! manager use it: `allocate`, `free`, `spawn`, `attach`, `detach`, `open` (with blktap3's
//! flags), `close`, `pause`, `unpause`, `list` (the `pid= minor= state=0xHEX args=` lines),
//! `stats` (one JSON line), `destroy`, and blktap3's exit statuses ([`failure`]: the errno of
//! what failed). `create`, `trace`, `destroy -m` without `-p`, `list --json`/`--long`,
//! `stats --pretty`/`--prometheus` and the VBD settings (`--ring-order`, `--nbd`, ...) are
//! ours.
//!
//! One module per verb. This one holds the command line ([`Cli`]) and the entry point
//! ([`main_with`]); [`ctx`] reaches tapdisks through the run directory.
//!
//! Every failure is reported as one line, `tap-ctl: <what went wrong>`, on stderr (text from
//! files and tapdisks escaped: [`tapdisk_control::escape`]).

pub mod alloc;
pub mod args;
pub mod attach;
pub mod close;
pub mod create;
pub mod ctx;
pub mod destroy;
pub mod failure;
pub mod list;
pub mod open;
pub mod pause;
pub mod prometheus;
pub mod spawn;
pub mod stats;
pub mod trace;
pub mod unpause;

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use tapdisk_control::{escape, RunDir, DEFAULT_RUNDIR, RUNDIR_ENV};
pub use td_cli::{emit, io_msg, one_line};

pub use args::{Disk, DiskArgs, Target};
pub use ctx::{Conn, Ctx};

const ABOUT: &str =
    "Start, stop and inspect tapdisk-rs processes and the virtual block devices (VBDs) they serve";

const LONG_ABOUT: &str = "\
Start, stop and inspect tapdisk-rs processes and the virtual block devices (VBDs) they serve.

A tapdisk is a daemon serving one or more VBDs. Each VBD has a minor number (unique in the run
directory, allocated as a marker <rundir>/tapdisk/tapdisk-N), an image given as TYPE:PATH (e.g.
aio:/var/lib/disks/vm1.img: a raw file or block device), a device (the unix socket
<rundir>/tapdisk-rs/vbd/tapdevN that blkif frontends attach to) and an NBD socket
<rundir>/nbd<pid>.<minor>. tap-ctl reaches each tapdisk through its control socket,
<rundir>/tapdisk-rs/ctl/tapdisk-<pid>.sock.

The verbs and flags of blktap3's tap-ctl work as there (allocate, spawn, attach, open, close,
detach, free, pause, unpause, list, stats, destroy), so Xen's block-tap script and xapi's
storage manager drive tapdisk-rs unchanged. create (allocate + spawn + attach + open) and
destroy -m (close + detach + free, finding the tapdisk itself) are what an operator needs most.
Commands taking -m MINOR find the tapdisk serving that minor themselves; -p PID names it.";

const EXAMPLES: &str = "\
Examples:
  tap-ctl create -a aio:/var/lib/disks/vm1.img     # start a tapdisk serving vm1.img; prints
                                                   # its device, e.g.
                                                   # /run/blktap-control/tapdisk-rs/vbd/tapdev0
  tap-ctl create -a aio:/dev/vg0/vm2 -R --nbd unix:/run/vm2.nbd
                                                   # read-only, also exported over NBD there
  tap-ctl list                                     # pid=... minor=... state=0x.. args=...
  tap-ctl pause -m 0                               # quiesce minor 0, e.g. before a snapshot
  tap-ctl unpause -m 0 -a aio:/var/lib/disks/vm1-new.img
                                                   # resume on another image of the same size
  tap-ctl stats -m 0                               # counters of minor 0, one JSON line
  tap-ctl destroy -m 0                             # close minor 0; stop its tapdisk if idle

  blktap3's way, as Xen's block-tap does it:
  tap-ctl allocate                                 # /run/blktap-control/tapdisk/tapdisk-0
  tap-ctl spawn                                    # 4242
  tap-ctl attach -p 4242 -m 0
  tap-ctl open -p 4242 -m 0 -a aio:/var/lib/disks/vm3.img
  tap-ctl destroy -p 4242 -m 0                     # close, detach (the tapdisk exits), free

Errors are one line on stderr, 'tap-ctl: ...'. Exit status: 0 success, else the errno of the
failure as blktap3's tap-ctl gives it (2 no such file or minor, 3 a dead tapdisk, 16 in use,
22 bad command line, 110 timed out, ...; 1 when no errno fits). Use 'tap-ctl <COMMAND> --help'
for the options of each command.";

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
    /// Minor markers, NBD sockets, control and device sockets and tapdisk logs live here.
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        env = RUNDIR_ENV,
        default_value = DEFAULT_RUNDIR
    )]
    pub rundir: PathBuf,
    /// Accepted for blktap3's command line; no effect.
    #[arg(long, global = true, hide = true)]
    pub debug: bool,
    /// What to do.
    #[command(subcommand)]
    pub verb: Verb,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Verb {
    /// Allocate a minor number: make its marker and print its path (blktap3's).
    ///
    /// The path is <rundir>/tapdisk/tapdisk-<minor>. The minor stays allocated until
    /// 'tap-ctl free -m MINOR'.
    #[command(verbatim_doc_comment, after_help = alloc::ALLOCATE_EXAMPLES)]
    Allocate(alloc::AllocateArgs),
    /// Free an allocated minor number that no tapdisk holds.
    #[command(after_help = alloc::FREE_EXAMPLES)]
    Free(alloc::FreeArgs),
    /// Start a tapdisk with no VBD and print its pid.
    ///
    /// The tapdisk detaches and serves its control socket in the run directory until it is
    /// destroyed, or its last VBD detached. Open VBDs in it with 'tap-ctl open -p PID'. Its
    /// log is <rundir>/tapdisk-rs/log/tapdisk-<pid>.log.
    #[command(verbatim_doc_comment, after_help = spawn::EXAMPLES)]
    Spawn(spawn::SpawnArgs),
    /// Give an allocated minor to a tapdisk, before 'open' (blktap3's).
    #[command(after_help = attach::ATTACH_EXAMPLES)]
    Attach(attach::AttachArgs),
    /// Take a closed minor back from a tapdisk; a tapdisk left with no VBD exits (blktap3's).
    #[command(after_help = attach::DETACH_EXAMPLES)]
    Detach(attach::AttachArgs),
    /// Start a tapdisk and open a VBD in it; print the VBD's device.
    ///
    /// The device is the unix socket blkif frontends attach to,
    /// <rundir>/tapdisk-rs/vbd/tapdevMINOR. If the VBD cannot be opened, the tapdisk just
    /// started is stopped again and the error reported.
    #[command(verbatim_doc_comment, after_help = create::EXAMPLES)]
    Create(create::CreateArgs),
    /// Open a VBD in a running tapdisk; print its device.
    #[command(after_help = open::EXAMPLES)]
    Open(open::OpenArgs),
    /// Close a VBD: disconnect its frontends and NBD clients and close its image.
    ///
    /// The tapdisk keeps running; 'detach' or 'destroy' also stops it once it serves nothing.
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
    /// Close a VBD, stop its tapdisk if it serves no other VBD, and free its minor.
    ///
    /// Also cleans up after a tapdisk that died (killed, crashed): its sockets and markers.
    #[command(verbatim_doc_comment, after_help = destroy::EXAMPLES)]
    Destroy(destroy::DestroyArgs),
    /// Print the counters of a VBD: one JSON line, indented JSON or Prometheus text.
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
    /// Lines look like 'pid=1234 minor=0 state=0 args=aio:/var/lib/x.img' (blktap3's). state
    /// is blktap3's flag word in hex: 0 running, 0x10 pause under way, 0x28 paused, 0x1 dead.
    /// A tapdisk with no VBD is listed as 'pid=1234'; an allocated minor no tapdisk serves as
    /// 'minor=3'; a VBD whose tapdisk died as 'minor=3 state=0x1 args=...', with a message on
    /// stderr naming the dead pid and exit status 3. Text from paths is escaped (\xNN).
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
            eprintln!("tap-ctl: {}", escape::text(&one_line(&e)));
            failure::exit_code(&e)
        }
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    let ctx = Ctx {
        rundir: RunDir(cli.rundir),
    };
    match &cli.verb {
        Verb::Allocate(a) => alloc::allocate(&ctx, a),
        Verb::Free(a) => alloc::free(&ctx, a),
        Verb::Spawn(a) => spawn::run(&ctx, a),
        Verb::Attach(a) => attach::attach(&ctx, a),
        Verb::Detach(a) => attach::detach(&ctx, a),
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

/// Reports a clap outcome: help and version as clap prints them, errors as one line with
/// blktap3's status for a bad command line, EINVAL.
fn clap_exit(e: clap::Error, verb: Option<String>) -> i32 {
    match td_cli::clap_exit("tap-ctl", &e, verb.as_deref()) {
        0 => 0,
        _ => nix::errno::Errno::EINVAL as i32,
    }
}

/// A clap error of tap-ctl on one line (see [`td_cli::clap_one_line`]).
pub fn clap_one_line(e: &clap::Error, verb: Option<&str>) -> String {
    td_cli::clap_one_line("tap-ctl", e, verb)
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
        // blktap3's status for a bad command line: EINVAL.
        assert_eq!(main_with(["tap-ctl", "pause", "-m", "zero"]), 22);
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
        let e = anyhow::anyhow!("first\nsecond").context("outer");
        assert_eq!(one_line(&e), "outer: first second");
        let io = std::io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(io_msg(&io), "No such file or directory");
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
