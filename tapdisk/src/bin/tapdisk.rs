//! The tapdisk daemon. Normally started by `tap-ctl spawn` or `tap-ctl create`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use tapdisk::daemon::{block_signals, Daemon, EXIT_DEADLINE};
use tapdisk_control::RunDir;

/// How long start-up (run directory, log file, control socket, telling the spawner the pid)
/// may take before the process gives up: a log file on a FIFO nobody reads, or a run
/// directory on a hung file system, must not leave a tapdisk that never answers.
const STARTUP_DEADLINE: Duration = Duration::from_secs(10);

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
    /// Told to exit (SIGTERM, SIGINT, SIGHUP, tap-ctl destroy), wait at most this many
    /// seconds for the VBDs to finish their IO in flight; then exit anyway (status 3), with
    /// that IO unanswered.
    #[arg(long, value_name = "SECONDS", default_value_t = EXIT_DEADLINE.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    exit_deadline: u64,
}

/// Ends the process if start-up does not finish within [`STARTUP_DEADLINE`], saying which
/// step it was stuck in.
struct Startup {
    step: Arc<Mutex<&'static str>>,
    done: mpsc::Sender<()>,
}

impl Startup {
    fn watch() -> Startup {
        let step = Arc::new(Mutex::new("starting"));
        let (done, rx) = mpsc::channel::<()>();
        let s = step.clone();
        // If the thread cannot start, start-up goes on without its deadline.
        let _ = std::thread::Builder::new()
            .name("startup-deadline".into())
            .spawn(move || {
                if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(STARTUP_DEADLINE) {
                    let step = *s.lock().unwrap_or_else(|e| e.into_inner());
                    let _ = writeln!(
                        std::io::stderr(),
                        "tapdisk: start-up did not finish within {} s (stuck {step})",
                        STARTUP_DEADLINE.as_secs()
                    );
                    std::process::exit(1);
                }
            });
        Startup { step, done }
    }

    fn step(&self, what: &'static str) {
        *self.step.lock().unwrap_or_else(|e| e.into_inner()) = what;
    }

    fn finished(self) {
        let _ = self.done.send(());
    }
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        let _ = writeln!(std::io::stderr(), "tapdisk: {e:#}");
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
    // Before any thread starts, so that every thread inherits the blocked signals.
    let signals = block_signals()?;
    let startup = Startup::watch();
    // Failing leaves the limit as it is; the memory and descriptor check at each open says so
    // if it is too low.
    let _ = tapdisk::sys::file::raise_open_files_limit();
    let pid = std::process::id();
    startup.step("creating the run directory");
    let log_path = match (&args.log_file, args.daemonize) {
        (Some(p), _) => Some(p.clone()),
        (None, true) => {
            rundir.create()?;
            Some(rundir.log_file(pid))
        }
        (None, false) => None,
    };
    startup.step("opening the log file");
    let log = tapdisk::logging::logger(log_path.as_deref(), level)?;
    if let Some(p) = log_path.clone() {
        // A daemon's stderr is /dev/null: put a panicking thread's message in the log.
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // Non-blocking: a log on a FIFO nobody reads must not hang the panicking thread.
            let f = std::fs::OpenOptions::new()
                .append(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&p);
            if let Ok(mut f) = f {
                let _ = writeln!(
                    f,
                    "PANIC in thread {:?}: {info}",
                    std::thread::current().name()
                );
            }
            default(info);
        }));
    }
    startup.step("creating the control socket");
    let (daemon, listener) = Daemon::bind(rundir, log)?;
    daemon.set_exit_deadline(Duration::from_secs(args.exit_deadline));
    daemon.handle_signals(signals)?;
    // Tell the spawner who we are, then let go of its pipe.
    startup.step("writing the pid to standard output");
    let mut out = std::io::stdout().lock();
    writeln!(out, "{pid}").and_then(|()| out.flush())?;
    drop(out);
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
    startup.finished();
    daemon.serve(listener);
    Ok(())
}
