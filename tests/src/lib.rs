//! Harness for the end-to-end tests in `tests/`: they start the real `tapdisk`, `tap-ctl` and
//! `td-bench` binaries (built on first use by [`bin_dir`]) in a private run directory and drive
//! them with real peers (qemu-io, qemu-img, nbdinfo, fio) and the blkif local frontend.

pub mod blktap;
pub mod crash;
pub use crash::Rng;
pub mod etcd;
pub mod lan;
pub mod nbd;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};
use tapdisk_control::client::Client;
use tapdisk_control::proto::{Command as Ctl, Reply, VbdSummary};
use tapdisk_control::{RunDir, VbdSettings};

/// The folder holding the workspace's binaries (`target/<profile>`, or
/// `target/<triple>/<profile>`), found from the running test executable (which runs from its
/// `deps/`). `cargo test --workspace` builds only the binaries of the package under test, so
/// the first call builds `tapdisk`, `tap-ctl`, `td-bench` and the other tools into that same
/// target directory (a no-op when they are fresh); this honours `CARGO_TARGET_DIR` and the
/// profile.
pub fn bin_dir() -> PathBuf {
    static BUILD: std::sync::Once = std::sync::Once::new();
    let exe = std::env::current_exe().expect("current_exe");
    let prof = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf();
    BUILD.call_once(|| {
        let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.args([
            "build",
            "-q",
            "-p",
            "tapdisk",
            "-p",
            "tap-ctl",
            "-p",
            "tapback",
            "-p",
            "td-bench",
            "-p",
            "parallax-img",
            "-p",
            "stripe-img",
            "-p",
            "stripe-master",
            "-p",
            "xen-frontend",
            "-p",
            "vhd-util",
            "--bins",
        ]);
        let parent = prof.parent().expect("target dir");
        let target_dir = if parent.join("CACHEDIR.TAG").exists() {
            parent.to_path_buf()
        } else {
            let triple = parent.file_name().expect("triple").to_owned();
            cmd.arg("--target").arg(triple);
            parent.parent().expect("target dir").to_path_buf()
        };
        cmd.arg("--target-dir").arg(target_dir);
        match prof.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => {}
            Some("release") => {
                cmd.arg("--release");
            }
            Some(other) => {
                cmd.args(["--profile", other]);
            }
        }
        cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
        let status = cmd.status().expect("running cargo build");
        assert!(status.success(), "building the binaries failed: {cmd:?}");
    });
    prof
}

/// Path of workspace binary `name` (built on first use).
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.is_file(), "{} was not built", p.display());
    p
}

/// A tapdisk process in the foreground with its own run directory, killed on drop.
pub struct Tapdisk {
    /// The child.
    pub child: Child,
    /// Its pid.
    pub pid: u32,
    /// Its run directory.
    pub rundir: RunDir,
    _dir: Option<tempfile::TempDir>,
}

impl Tapdisk {
    /// Starts a tapdisk in a fresh temporary run directory.
    pub fn start() -> Result<Tapdisk> {
        let dir = tempfile::tempdir()?;
        let mut t = Tapdisk::start_in(dir.path())?;
        t._dir = Some(dir);
        Ok(t)
    }

    /// Starts a tapdisk in `rundir`, logging at debug level to our stderr.
    pub fn start_in(rundir: &Path) -> Result<Tapdisk> {
        Tapdisk::start_with(rundir, &[])
    }

    /// Starts a tapdisk in `rundir`, logging at info level into the file `log` (tests that
    /// start many).
    pub fn start_logged(rundir: &Path, log: &Path) -> Result<Tapdisk> {
        let f =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        Tapdisk::spawn(rundir, &[], &["--log-level", "info"], Stdio::from(f))
    }

    /// Starts a tapdisk in `rundir` with more arguments (`--log-file`, `--exit-deadline`).
    pub fn start_with(rundir: &Path, args: &[&str]) -> Result<Tapdisk> {
        Tapdisk::start_wrapped(rundir, &[], args)
    }

    /// Starts a tapdisk in `rundir` through `wrapper` (a command that execs the rest, such
    /// as `prlimit --as=N --`), with more arguments.
    pub fn start_wrapped(rundir: &Path, wrapper: &[&str], args: &[&str]) -> Result<Tapdisk> {
        Tapdisk::spawn(rundir, wrapper, args, Stdio::inherit())
    }

    fn spawn(rundir: &Path, wrapper: &[&str], args: &[&str], stderr: Stdio) -> Result<Tapdisk> {
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin("tapdisk"));
                c
            }
            None => Command::new(bin("tapdisk")),
        };
        cmd.arg("--rundir").arg(rundir);
        if !args.contains(&"--log-level") {
            cmd.args(["--log-level", "debug"]);
        }
        let mut child = cmd
            .args(args)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .context("starting tapdisk")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        let pid: u32 = line
            .trim()
            .parse()
            .with_context(|| format!("tapdisk printed {line:?}"))?;
        Ok(Tapdisk {
            child,
            pid,
            rundir: RunDir(rundir.to_owned()),
            _dir: None,
        })
    }

    /// A control connection.
    pub fn client(&self) -> Result<Client> {
        Ok(Client::connect_pid(&self.rundir, self.pid)?)
    }

    /// Opens `image` (a TYPE:PATH spec) with `settings`.
    pub fn open(&self, image: &str, settings: VbdSettings) -> Result<VbdSummary> {
        match self.client()?.call(Ctl::Open {
            minor: None,
            image: image.parse()?,
            settings,
        })? {
            Reply::Opened { vbd } => Ok(vbd),
            other => bail!("unexpected reply {other:?}"),
        }
    }

    /// Counters of `minor` as JSON.
    pub fn stats(&self, minor: u32) -> Result<serde_json::Value> {
        match self.client()?.call(Ctl::Stats { minor })? {
            Reply::Stats { stats } => Ok(stats),
            other => bail!("unexpected reply {other:?}"),
        }
    }

    /// Sends one raw line to the control socket and returns the reply line (tests of what
    /// the daemon does with input tap-ctl would not send).
    pub fn raw_call(&self, line: &str) -> Result<String> {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(self.rundir.ctl_socket(self.pid))?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(60)))?;
        s.write_all(line.as_bytes())?;
        s.write_all(b"\n")?;
        let mut reply = String::new();
        BufReader::new(s).read_line(&mut reply)?;
        Ok(reply)
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Tapdisk {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `qemu-img create -f qcow2 -o OPTS` of an overlay at `path` over `backing` (a name relative
/// to the overlay's folder) of format `backing_fmt`.
pub fn qcow2_overlay(path: &Path, backing: &str, backing_fmt: &str, opts: &str) {
    run_ok(
        Command::new("qemu-img")
            .args([
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                backing,
                "-F",
                backing_fmt,
            ])
            .args(["-o", opts])
            .arg(path),
    );
}

/// A sparse image file of `size` bytes in a temporary folder.
pub fn image(size: u64) -> Result<(tempfile::TempDir, PathBuf)> {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("disk.img");
    std::fs::File::create(&p)?.set_len(size)?;
    Ok((dir, p))
}

/// A `tap-ctl` command for the run directory `rundir`.
pub fn tap_ctl(rundir: &Path) -> Command {
    let mut c = Command::new(bin("tap-ctl"));
    c.arg("--rundir").arg(rundir);
    c
}

/// Runs `cmd` with no input and returns its output; panics (failing the test) with its output
/// if it cannot start or exits unsuccessfully.
pub fn run_ok(cmd: &mut Command) -> std::process::Output {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?}: {e} (CI installs qemu-utils and libnbd-bin)")
    });
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Asserts that the error text `err` names the holder of the `flock` on `path` correctly:
/// `holder` (our pid for it) must be named where `/proc` shows it holding the lock; a pid named
/// must be one `/proc` shows holding it (in a pid namespace with an outer `/proc` that differs
/// from `holder`); "another process" is allowed only where `/proc` shows neither (sandboxes
/// that hide it: another pid namespace, no fdinfo locks).
pub fn assert_holder_named(err: &str, path: &Path, holder: u32) {
    let named = err.split("in use by pid ").nth(1).and_then(|t| {
        t.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse::<u32>()
            .ok()
    });
    match named {
        Some(pid) => assert!(
            pid == holder || stripe::map::flock_held_by(path, pid),
            "{err}"
        ),
        None => assert!(
            err.contains("in use by another process") && !stripe::map::flock_held_by(path, holder),
            "{err}"
        ),
    }
}
