//! The calling side of the control socket, and finding and spawning tapdisk processes.

use std::io::{BufRead, BufReader, Read, Write};
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
        let what = || format!("setting timeouts on {}", path.display());
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(io(what()))?;
        s.set_write_timeout(Some(Duration::from_secs(10)))
            .map_err(io(what()))?;
        Ok(Client {
            reader: BufReader::new(s),
            path: path.to_owned(),
        })
    }

    /// Connects to tapdisk `pid` in `rundir`.
    pub fn connect_pid(rundir: &RunDir, pid: u32) -> Result<Client> {
        Client::connect(&rundir.ctl_socket(pid))
    }

    /// Sends a command and waits for its reply; a tapdisk-side error becomes
    /// [`Error::Refused`] with the tapdisk's message.
    pub fn call(&mut self, command: Command) -> Result<Reply> {
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
        self.reader
            .get_mut()
            .write_all(&line)
            .map_err(io(format!("writing to {}", self.path.display())))?;
        let mut buf = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut buf)
            .map_err(io(format!("reading from {}", self.path.display())))?;
        if n == 0 {
            return Err(Error::Closed {
                path: self.path.clone(),
            });
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

/// Pids of the tapdisks with a control socket in `rundir` that answers. Stale sockets (their
/// process is gone) are removed.
pub fn discover(rundir: &RunDir) -> Result<Vec<u32>> {
    let mut pids = Vec::new();
    let dir = match std::fs::read_dir(rundir.ctl_dir()) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(pids),
        Err(e) => return Err(io(format!("reading {}", rundir.ctl_dir().display()))(e)),
    };
    for ent in dir.flatten() {
        let name = ent.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("tapdisk-"))
            .and_then(|n| n.strip_suffix(".sock"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if UnixStream::connect(ent.path()).is_ok() {
            pids.push(pid);
        } else if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(ent.path());
        }
    }
    pids.sort_unstable();
    Ok(pids)
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

/// Starts a tapdisk daemon in `rundir` and waits until its control socket answers.
/// Returns its pid. Its log goes to `<rundir>/log/tapdisk-<pid>.log`.
pub fn spawn(rundir: &RunDir) -> Result<u32> {
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
    // The daemon prints its pid on stdout once the control socket listens, then detaches.
    let mut out = String::new();
    if let Some(mut so) = child.stdout.take() {
        so.read_to_string(&mut out)
            .map_err(io(format!("reading the pid {} printed", bin.display())))?;
    }
    let status = child
        .wait()
        .map_err(io(format!("waiting for {}", bin.display())))?;
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
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut c) = Client::connect_pid(rundir, pid) {
            if c.call(Command::Hello).is_ok() {
                return Ok(pid);
            }
        }
        if Instant::now() > deadline {
            return Err(Error::Spawn(format!(
                "tapdisk {pid} did not answer on its control socket within 10 s"
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Finds which tapdisk serves `minor`.
pub fn find_minor(rundir: &RunDir, minor: u32) -> Result<u32> {
    for pid in discover(rundir)? {
        let mut c = Client::connect_pid(rundir, pid)?;
        if let Reply::List { vbds } = c.call(Command::List)? {
            if vbds.iter().any(|v| v.minor == minor) {
                return Ok(pid);
            }
        }
    }
    Err(Error::NoSuchMinor(minor))
}
