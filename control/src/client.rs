//! The calling side of the control socket, and finding and spawning tapdisk processes.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::proto::{Command, Reply, RequestMsg, ResponseMsg, ResultMsg, MAX_LINE, VERSION};
use crate::rundir::RunDir;

/// A connection to one tapdisk's control socket.
#[derive(Debug)]
pub struct Client {
    reader: BufReader<UnixStream>,
    path: PathBuf,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |cause| Error::Io { what, cause }
}

impl Client {
    /// Connects to a control socket.
    pub fn connect(path: &Path) -> Result<Client> {
        let s = UnixStream::connect(path).map_err(|cause| Error::Connect {
            path: path.to_owned(),
            cause,
        })?;
        Ok(Client {
            reader: BufReader::new(s),
            path: path.to_owned(),
        })
    }

    /// Connects to tapdisk `pid` in `rundir`.
    pub fn connect_pid(rundir: &RunDir, pid: u32) -> Result<Client> {
        Client::connect(&rundir.ctl_socket(pid))
    }

    /// Sends a command and waits for its reply, for at most the command's own deadline
    /// ([`Command::deadline`]); a tapdisk-side error becomes [`Error::Refused`] with the
    /// tapdisk's message.
    pub fn call(&mut self, command: Command) -> Result<Reply> {
        let limit = command.deadline();
        self.call_within(command, limit)
    }

    /// Sends a command and waits for its reply, the whole exchange bounded by `limit` (not
    /// each read: a tapdisk that answers a byte at a time still fails in time, with
    /// [`Error::Timeout`]).
    pub fn call_within(&mut self, command: Command, limit: Duration) -> Result<Reply> {
        let deadline = Instant::now() + limit;
        let name = command.name();
        let mut line = serde_json::to_vec(&RequestMsg {
            v: VERSION,
            command,
        })
        .map_err(|e| {
            Error::invalid(
                "command",
                format!("the command cannot be written as JSON: {e}"),
            )
        })?;
        line.push(b'\n');
        let timed_out = |path: &Path| Error::Timeout {
            what: format!("{name} on {}", path.display()),
            secs: limit.as_secs_f64(),
        };
        let sock = self.reader.get_mut();
        sock.set_write_timeout(Some(
            remaining(deadline).ok_or_else(|| timed_out(&self.path))?,
        ))
        .map_err(io(format!("setting a timeout on {}", self.path.display())))?;
        if let Err(e) = sock.write_all(&line) {
            return Err(if is_timeout(&e) {
                timed_out(&self.path)
            } else {
                io(format!("writing to {}", self.path.display()))(e)
            });
        }
        let mut buf = Vec::new();
        loop {
            let left = remaining(deadline).ok_or_else(|| timed_out(&self.path))?;
            self.reader
                .get_mut()
                .set_read_timeout(Some(left))
                .map_err(io(format!("setting a timeout on {}", self.path.display())))?;
            let chunk = match self.reader.fill_buf() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if is_timeout(&e) => return Err(timed_out(&self.path)),
                Err(e) => return Err(io(format!("reading from {}", self.path.display()))(e)),
            };
            if chunk.is_empty() {
                return Err(Error::Closed {
                    path: self.path.clone(),
                });
            }
            let (take, done) = match chunk.iter().position(|b| *b == b'\n') {
                Some(i) => (i + 1, true),
                None => (chunk.len(), false),
            };
            buf.extend_from_slice(&chunk[..take]);
            self.reader.consume(take);
            if buf.len() > MAX_LINE {
                return Err(Error::Io {
                    what: format!("reading from {}", self.path.display()),
                    cause: std::io::Error::other(format!("reply longer than {MAX_LINE} bytes")),
                });
            }
            if done {
                break;
            }
        }
        let msg: ResponseMsg = serde_json::from_slice(&buf).map_err(|cause| Error::BadReply {
            path: self.path.clone(),
            cause,
        })?;
        match msg.result {
            ResultMsg::Ok(r) => Ok(r),
            ResultMsg::Error(e) => Err(Error::Refused(e)),
        }
    }
}

/// Time left until `deadline`, if any.
fn remaining(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Pids of every tapdisk with a control socket in `rundir`, answering or not, in order.
pub fn control_pids(rundir: &RunDir) -> Result<Vec<u32>> {
    let mut pids = Vec::new();
    let dir = match std::fs::read_dir(rundir.ctl_dir()) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(pids),
        Err(e) => return Err(io(format!("reading {}", rundir.ctl_dir().display()))(e)),
    };
    for ent in dir.flatten() {
        let name = ent.file_name();
        if let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("tapdisk-"))
            .and_then(|n| n.strip_suffix(".sock"))
            .and_then(|n| n.parse::<u32>().ok())
        {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    Ok(pids)
}

/// Pids of the tapdisks with a control socket in `rundir` that accepts a connection. Sockets
/// of dead tapdisks are left for tap-ctl to report and clean up.
pub fn discover(rundir: &RunDir) -> Result<Vec<u32>> {
    Ok(control_pids(rundir)?
        .into_iter()
        .filter(|pid| UnixStream::connect(rundir.ctl_socket(*pid)).is_ok())
        .collect())
}

/// Finds the `tapdisk` binary: `$TAPDISK_RS_TAPDISK`, next to the running executable, or `PATH`.
pub fn tapdisk_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("TAPDISK_RS_TAPDISK") {
        return p.into();
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in [exe.parent(), exe.parent().and_then(Path::parent)]
            .into_iter()
            .flatten()
        {
            let cand = dir.join("tapdisk");
            if cand.is_file() {
                return cand;
            }
        }
    }
    PathBuf::from("tapdisk")
}

/// How long a new tapdisk has to report ready: print its pid, then answer on its control
/// socket. The whole start-up is bounded by it, not each step.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts a tapdisk daemon in `rundir` and waits until its control socket answers, all of it
/// within [`START_TIMEOUT`]. Returns its pid. Its log goes to `<rundir>/log/tapdisk-<pid>.log`.
pub fn spawn(rundir: &RunDir) -> Result<u32> {
    spawn_within(rundir, START_TIMEOUT)
}

/// [`spawn`] with another bound on the start-up.
pub fn spawn_within(rundir: &RunDir, limit: Duration) -> Result<u32> {
    let deadline = Instant::now() + limit;
    rundir
        .create()
        .map_err(io(format!("creating {}", rundir.0.display())))?;
    let bin = tapdisk_binary();
    let mut child = std::process::Command::new(&bin)
        .arg("--rundir")
        .arg(&rundir.0)
        .arg("--daemonize")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .map_err(io(format!("cannot start {}", bin.display())))?;
    let late = |what: &str| Error::Timeout {
        what: format!("starting {} ({what})", bin.display()),
        secs: limit.as_secs_f64(),
    };
    // The daemon prints its pid on stdout once the control socket listens, then detaches
    // (the process we started exits; the daemon lets go of the pipe).
    let out = match child.stdout.take() {
        Some(so) => match read_all_until(so, deadline) {
            Ok(Some(out)) => out,
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(late("waiting for it to print its pid"));
            }
            Err(e) => return Err(io(format!("reading the pid {} printed", bin.display()))(e)),
        },
        None => String::new(),
    };
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(late("waiting for it to detach"));
            }
            Err(e) => return Err(io(format!("waiting for {}", bin.display()))(e)),
        }
    };
    if !status.success() {
        return Err(Error::Spawn(format!(
            "{} failed to start ({status})",
            bin.display()
        )));
    }
    let pid: u32 = out
        .trim()
        .parse()
        .map_err(|_| Error::Spawn(format!("tapdisk printed no pid: {out:?}")))?;
    loop {
        if let Some(left) = remaining(deadline) {
            if let Ok(mut c) = Client::connect_pid(rundir, pid) {
                if c.call_within(Command::Hello, left).is_ok() {
                    return Ok(pid);
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!("starting tapdisk {pid} (waiting for its control socket to answer)"),
                secs: limit.as_secs_f64(),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Everything `r` gives until its end, unless that takes past `deadline` (`None`).
fn read_all_until(
    mut r: std::process::ChildStdout,
    deadline: Instant,
) -> std::io::Result<Option<String>> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut out = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        let Some(left) = remaining(deadline) else {
            return Ok(None);
        };
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(r.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
        match r.read(&mut buf) {
            Ok(0) => return Ok(Some(String::from_utf8_lossy(&out).into_owned())),
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.len() > 4096 {
                    return Err(std::io::Error::other("more than 4 KiB on stdout"));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Finds which tapdisk serves `minor`: the one holding its marker, else the one that lists it.
pub fn find_minor(rundir: &RunDir, minor: u32) -> Result<u32> {
    if let Ok(crate::minor::Marker::Held(Some(r))) = crate::minor::inspect(rundir, minor) {
        return Ok(r.pid);
    }
    for pid in discover(rundir)? {
        let listed = Client::connect_pid(rundir, pid).and_then(|mut c| c.call(Command::List));
        if let Ok(Reply::List { vbds }) = listed {
            if vbds.iter().any(|v| v.minor == minor) {
                return Ok(pid);
            }
        }
    }
    Err(Error::NoSuchMinor(minor))
}
