//! The tapdisk process: the control server and the VBDs it owns.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use slog::{info, warn, Logger};
use tapdisk_control::proto::{
    Command, Reply, RequestMsg, ResponseMsg, ResultMsg, TraceFormat, MAX_LINE, VERSION,
};
use tapdisk_control::RunDir;

use crate::error::{Error, IoContext, Result};
use crate::ring::lock;
use crate::vbd::{Vbd, VbdMap};

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

/// A claim on a minor number: the file `<rundir>/minors/N` holding our pid, removed on drop.
#[derive(Debug)]
pub struct MinorClaim {
    /// The number.
    pub minor: u32,
    path: PathBuf,
}

impl Drop for MinorClaim {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Claims `wanted`, or the lowest free minor.
pub fn claim_minor(rundir: &RunDir, wanted: Option<u32>) -> Result<MinorClaim> {
    let me = std::process::id();
    let try_one = |m: u32| -> Result<Option<MinorClaim>> {
        let path = rundir.minor_dir().join(m.to_string());
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    writeln!(f, "{me}").doing(|| format!("claiming {}", path.display()))?;
                    return Ok(Some(MinorClaim { minor: m, path }));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let owner = std::fs::read_to_string(&path).unwrap_or_default();
                    match owner.trim().parse::<u32>() {
                        Ok(pid) if pid_alive(pid) => return Ok(None),
                        // A claim left by a dead tapdisk (or half written): reclaim it.
                        _ => {
                            let _ = std::fs::remove_file(&path);
                        }
                    }
                }
                Err(e) => return Err(Error::io(format!("claiming {}", path.display()), e)),
            }
        }
        Ok(None)
    };
    match wanted {
        Some(m) => try_one(m)?.ok_or_else(|| {
            let owner =
                std::fs::read_to_string(rundir.minor_dir().join(m.to_string())).unwrap_or_default();
            Error::MinorInUse {
                minor: m,
                owner: owner.trim().to_owned(),
            }
        }),
        None => {
            for m in 0..(1 << 20) {
                if let Some(c) = try_one(m)? {
                    return Ok(c);
                }
            }
            Err(Error::NoFreeMinor)
        }
    }
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
        };
        Ok((Arc::new(d), l))
    }

    /// Serves the control socket until a shutdown.
    pub fn serve(self: &Arc<Daemon>, listener: UnixListener) {
        info!(self.log, "listening"; "control" => %self.ctl_path.display());
        for conn in listener.incoming() {
            if self.exiting.load(Ordering::Acquire) {
                break;
            }
            let Ok(sock) = conn else { continue };
            let d = self.clone();
            let _ = std::thread::Builder::new()
                .name("control".into())
                .spawn(move || d.connection(sock));
        }
    }

    fn connection(self: Arc<Daemon>, sock: UnixStream) {
        let _ = sock.set_read_timeout(Some(Duration::from_secs(300)));
        let mut w = match sock.try_clone() {
            Ok(w) => w,
            Err(_) => return,
        };
        let mut r = BufReader::new(sock);
        loop {
            let mut line = Vec::new();
            match (&mut r)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut line)
            {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let (reply, exit) = self.answer(&line);
            let is_shutdown = exit && matches!(reply, ResultMsg::Ok(_));
            let mut out = serde_json::to_vec(&ResponseMsg {
                v: VERSION,
                result: reply,
            })
            .unwrap_or_default();
            out.push(b'\n');
            let _ = w.write_all(&out);
            if is_shutdown {
                self.exit();
            }
            if exit {
                return;
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
    /// same checks as tap-ctl's), so nothing is claimed or opened for a refused command.
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
                let claim = claim_minor(&self.rundir, minor)?;
                let m = claim.minor;
                let vbd = Vbd::open(m, image, settings, self.rundir.vbd_socket(m), &self.log)?;
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

    /// Closes every VBD, removes the control socket and exits the process.
    pub fn exit(&self) -> ! {
        self.exiting.store(true, Ordering::Release);
        let vbds: VbdMap = {
            let mut g = lock(&self.vbds);
            std::mem::take(&mut *g)
                .into_iter()
                .map(|(m, e)| {
                    drop(e._claim);
                    (m, e.vbd)
                })
                .collect()
        };
        for (_, v) in vbds {
            v.close();
        }
        let _ = std::fs::remove_file(&self.ctl_path);
        info!(self.log, "exiting");
        std::process::exit(0)
    }

    /// Handles SIGTERM, SIGINT and SIGHUP by shutting down cleanly. Call before any other
    /// thread starts, so every thread inherits the blocked mask.
    pub fn handle_signals(self: &Arc<Daemon>) -> Result<()> {
        use nix::sys::signal::{SigSet, Signal};
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
}

fn no_such(minor: u32) -> Error {
    Error::NoSuchMinor(minor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minors_are_claimed_and_reclaimed() {
        let dir = tempfile::tempdir().unwrap();
        let rd = RunDir(dir.path().into());
        rd.create().unwrap();
        let a = claim_minor(&rd, None).unwrap();
        let b = claim_minor(&rd, None).unwrap();
        assert_eq!((a.minor, b.minor), (0, 1));
        assert!(claim_minor(&rd, Some(0))
            .unwrap_err()
            .to_string()
            .contains("in use"));
        drop(a);
        assert_eq!(claim_minor(&rd, None).unwrap().minor, 0);
        // A claim by a dead process is taken over.
        std::fs::write(rd.minor_dir().join("7"), "999999999\n").unwrap();
        assert_eq!(claim_minor(&rd, Some(7)).unwrap().minor, 7);
    }

    /// What tap-ctl refuses is refused when written to the socket directly, with the error
    /// line naming the setting and its range, and nothing claimed or opened.
    #[test]
    fn settings_out_of_range_are_refused_on_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let rundir = RunDir(dir.path().join("run"));
        let log = Logger::root(slog::Discard, slog::o!());
        let (d, _listener) = Daemon::bind(rundir.clone(), log).unwrap();
        let open = |settings: &str| {
            format!(
                r#"{{"v":1,"cmd":"open","minor":null,"image":{{"driver":"aio","path":"{}"}},"settings":{settings}}}"#,
                img.display()
            )
        };
        let error = |line: &str| match d.answer(line.as_bytes()) {
            (ResultMsg::Error(e), false) => e,
            other => panic!("{line}: {other:?}"),
        };
        for (settings, says) in [
            (
                r#"{"early":{"percent":250}}"#,
                "early-read percent 250% is out of range: early.percent takes 0..=100",
            ),
            (
                r#"{"early":{"chunk_kb":0}}"#,
                "early-read chunk 0 KiB is out of range: early.chunk_kb takes 4..=16384",
            ),
            (
                r#"{"faults":{"fail_ppm":1000001}}"#,
                "faults.fail_ppm takes 0..=1000000",
            ),
            (
                r#"{"faults":{"delay_ppm":4294967295}}"#,
                "faults.delay_ppm takes 0..=1000000",
            ),
            (
                r#"{"poll_us":4294967295}"#,
                "poll time 4294967295 µs is out of range: poll_us takes 0..=10000",
            ),
            (r#"{"max_segments":12}"#, "max_segments takes 1..=11"),
            (
                r#"{"cache_slots":8}"#,
                "parallax:, vhd: and qcow2: images only",
            ),
        ] {
            let e = error(&open(settings));
            assert_eq!(e.lines().count(), 1, "{e}");
            assert!(e.contains(says), "{settings}: {e}");
        }
        assert!(lock(&d.vbds).is_empty());
        assert_eq!(std::fs::read_dir(rundir.minor_dir()).unwrap().count(), 0);
        // The same open with settings in range succeeds.
        match d.answer(open(r#"{"poll_us":10000}"#).as_bytes()) {
            (ResultMsg::Ok(Reply::Opened { vbd }), false) => assert_eq!(vbd.minor, 0),
            other => panic!("{other:?}"),
        }
        let e = error(
            r#"{"v":1,"cmd":"unpause","minor":0,"image":{"driver":"aio","path":"/x","volume":"v"}}"#,
        );
        assert!(e.contains("aio images have no volumes"), "{e}");
        assert!(matches!(
            d.answer(br#"{"v":1,"cmd":"close","minor":0}"#),
            (ResultMsg::Ok(Reply::Done), false)
        ));
    }
}
