//! The tapdisk daemon. Normally started by `tap-ctl spawn` or `tap-ctl create`.

use std::io::Write;
use std::path::PathBuf;

use clap::Parser;
use tapdisk::daemon::Daemon;
use tapdisk_control::RunDir;

/// tapdisk-rs: serve virtual disks to blkif frontends (Xen guests or local frontends) and NBD
/// clients. One process owns one or more VBDs and is driven through its control socket,
/// `<rundir>/tapdisk-rs/ctl/tapdisk-<pid>.sock`, by tap-ctl; each VBD is also served over NBD
/// at `<rundir>/nbd<pid>.<minor>`.
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "Examples:\n  tapdisk --rundir /run/blktap-control --daemonize   # what tap-ctl spawn runs\n  tapdisk --rundir /tmp/td                      # foreground, logs on stderr"
)]
struct Args {
    /// Run directory (control sockets, VBD and NBD sockets, minor markers, logs).
    #[arg(long, env = tapdisk_control::RUNDIR_ENV, default_value = tapdisk_control::DEFAULT_RUNDIR)]
    rundir: PathBuf,
    /// Detach: print the pid once the control socket listens, then log to
    /// <rundir>/tapdisk-rs/log/tapdisk-<pid>.log.
    #[arg(long)]
    daemonize: bool,
    /// Log file (default: stderr, or the log folder when daemonized).
    #[arg(long)]
    log_file: Option<PathBuf>,
    /// Least severe level logged: critical, error, warning, info, debug, trace.
    #[arg(long, default_value = "info")]
    log_level: String,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("tapdisk: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let level: slog::Level = args
        .log_level
        .parse()
        .map_err(|_| anyhow::anyhow!("unknown log level '{}'", args.log_level))?;
    let rundir = RunDir(args.rundir);
    if args.daemonize {
        // Still single-threaded here, so fork is safe.
        // SAFETY: no other thread exists yet; the child only continues this function.
        match unsafe { nix::unistd::fork() }? {
            nix::unistd::ForkResult::Parent { .. } => std::process::exit(0),
            nix::unistd::ForkResult::Child => {
                nix::unistd::setsid()?;
            }
        }
    }
    let pid = std::process::id();
    let log_path = match (&args.log_file, args.daemonize) {
        (Some(p), _) => Some(p.clone()),
        (None, true) => {
            rundir.create()?;
            Some(rundir.log_file(pid))
        }
        (None, false) => None,
    };
    let log = tapdisk::logging::logger(log_path.as_deref(), level)?;
    if let Some(p) = log_path.clone() {
        // A daemon's stderr is /dev/null: put a panicking thread's message in the log.
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(&p) {
                let _ = writeln!(
                    f,
                    "PANIC in thread {:?}: {info}",
                    std::thread::current().name()
                );
            }
            default(info);
        }));
    }
    let (daemon, listener) = Daemon::bind(rundir, log)?;
    daemon.handle_signals()?;
    // Tell the spawner who we are, then let go of its pipe.
    println!("{pid}");
    std::io::stdout().flush()?;
    if args.daemonize {
        let null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")?;
        use std::os::fd::AsRawFd;
        for fd in [0, 1, 2] {
            nix::unistd::dup2(null.as_raw_fd(), fd)?;
        }
    }
    daemon.serve(listener);
    Ok(())
}
