//! A private `tgtd` (Debian's `tgt`) on loopback for tests and benchmarks: its own iSCSI port
//! and control port, one target with a file LUN, stopped (and its files removed) on drop. The
//! daemon also gets SIGKILL when the thread that started it dies (`PR_SET_PDEATHSIG`), so a
//! killed test run leaves no tgtd behind: start and drop it on the same thread.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The target name every lab target uses.
pub const TARGET: &str = "iqn.2026-11.rs.tapdisk:lab";

/// A running private tgtd.
pub struct Tgtd {
    child: Option<Child>,
    /// iSCSI port on 127.0.0.1.
    pub port: u16,
    /// tgtd control port number (`-C`).
    pub control: u32,
    /// The LUN's backing file.
    pub lun_file: PathBuf,
    /// LUN size in bytes.
    pub size: u64,
    chap: Option<(String, String)>,
    thin: bool,
    digests: bool,
    target_params: Vec<(String, String)>,
    _dir: Option<tempfile_dir::Dir>,
}

mod tempfile_dir {
    //! A temporary folder removed on drop (std only, so the library needs no tempfile).
    use std::path::{Path, PathBuf};

    pub struct Dir(pub PathBuf);

    impl Dir {
        pub fn new(base: &Path, tag: &str) -> std::io::Result<Dir> {
            let p = base.join(format!("{tag}-{}-{}", std::process::id(), super::unique()));
            std::fs::create_dir_all(&p)?;
            Ok(Dir(p))
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn unique() -> u32 {
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// How to set up the lab target.
#[derive(Debug, Clone, Default)]
pub struct TgtdOptions {
    /// LUN size in bytes (default 64 MiB).
    pub size: u64,
    /// Require CHAP with this user and secret.
    pub chap: Option<(String, String)>,
    /// Enable thin provisioning on the LUN (so UNMAP works).
    pub thin_provisioning: bool,
    /// Allocate the LUN file's blocks up front (as a real disk has them), rather than sparse.
    pub preallocate: bool,
    /// Make the target accept CRC32C header and data digests.
    pub digests: bool,
    /// Further target parameters (`tgtadm --op update --mode target --name K --value V`), e.g.
    /// `("InitialR2T", "No")`.
    pub target_params: Vec<(String, String)>,
    /// Folder for the LUN file (default /dev/shm, else the temp dir).
    pub dir: Option<PathBuf>,
}

impl Tgtd {
    /// Whether tgtd and tgtadm are installed.
    pub fn available() -> bool {
        Path::new("/usr/sbin/tgtd").exists() && Path::new("/usr/sbin/tgtadm").exists()
    }

    /// Starts a tgtd with one target ([`TARGET`]) whose LUN 1 is a fresh file.
    pub fn start(opts: TgtdOptions) -> std::io::Result<Tgtd> {
        let base = opts.dir.clone().unwrap_or_else(|| {
            let shm = PathBuf::from("/dev/shm");
            if shm.is_dir() {
                shm
            } else {
                std::env::temp_dir()
            }
        });
        let dir = tempfile_dir::Dir::new(&base, "iscsi-lab")?;
        let size = if opts.size == 0 { 64 << 20 } else { opts.size };
        let lun_file = dir.0.join("lun1.img");
        let f = std::fs::File::create(&lun_file)?;
        f.set_len(size)?;
        if opts.preallocate {
            use std::os::fd::AsRawFd;
            // SAFETY: plain syscall on a file we own.
            if unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, size as libc::off_t) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        drop(f);
        let port = free_port()?;
        let mut t = Tgtd {
            child: None,
            port,
            control: control_port(),
            lun_file,
            size,
            chap: opts.chap.clone(),
            thin: opts.thin_provisioning,
            digests: opts.digests,
            target_params: opts.target_params.clone(),
            _dir: Some(dir),
        };
        t.spawn()?;
        Ok(t)
    }

    /// (Re)starts the daemon on the same ports and LUN file (after [`Tgtd::kill`]).
    pub fn spawn(&mut self) -> std::io::Result<()> {
        let mut cmd = Command::new("tgtd");
        // SAFETY: the hook runs in the forked child before exec and only makes one
        // async-signal-safe syscall.
        unsafe {
            cmd.pre_exec(|| {
                // If the test (or benchmark) dies without dropping us, tgtd goes with it.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd
            .arg("-f")
            .arg("-C")
            .arg(self.control.to_string())
            .arg("--iscsi")
            .arg(format!("portal=127.0.0.1:{}", self.port))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.adm(&["--op", "show", "--mode", "sys"]).is_ok() {
                break;
            }
            if let Ok(Some(st)) = child.try_wait() {
                return Err(std::io::Error::other(format!("tgtd exited at start: {st}")));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(std::io::Error::other("tgtd did not start in 10 s"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.child = Some(child);
        let lun = self.lun_file.to_string_lossy().into_owned();
        let r = (|| {
            self.adm(&[
                "--op", "new", "--mode", "target", "--tid", "1", "-T", TARGET,
            ])?;
            self.adm(&[
                "--op",
                "new",
                "--mode",
                "logicalunit",
                "--tid",
                "1",
                "--lun",
                "1",
                "--bstype",
                "rdwr",
                "-b",
                &lun,
            ])?;
            if self.thin {
                self.adm(&[
                    "--op",
                    "update",
                    "--mode",
                    "logicalunit",
                    "--tid",
                    "1",
                    "--lun",
                    "1",
                    "--params",
                    "thin_provisioning=1",
                ])?;
            }
            if self.digests {
                for key in ["HeaderDigest", "DataDigest"] {
                    self.adm(&[
                        "--op", "update", "--mode", "target", "--tid", "1", "--name", key,
                        "--value", "CRC32C",
                    ])?;
                }
            }
            for (k, v) in self.target_params.clone() {
                self.adm(&[
                    "--op", "update", "--mode", "target", "--tid", "1", "--name", &k, "--value", &v,
                ])?;
            }
            if let Some((u, p)) = self.chap.clone() {
                self.adm(&[
                    "--op",
                    "new",
                    "--mode",
                    "account",
                    "--user",
                    &u,
                    "--password",
                    &p,
                ])?;
                self.adm(&[
                    "--op", "bind", "--mode", "account", "--tid", "1", "--user", &u,
                ])?;
            }
            self.adm(&[
                "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL",
            ])
        })();
        if let Err(e) = r {
            self.kill();
            return Err(e);
        }
        // The portal must accept connections before we hand it out.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                self.kill();
                return Err(std::io::Error::other(
                    "tgtd portal does not accept connections",
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Runs tgtadm against this daemon.
    pub fn adm(&self, args: &[&str]) -> std::io::Result<()> {
        let out = Command::new("tgtadm")
            .arg("-C")
            .arg(self.control.to_string())
            .arg("--lld")
            .arg("iscsi")
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        if out.status.success() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "tgtadm {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }

    /// `host:port` of the portal.
    pub fn portal(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// An `iscsi://` URL of LUN 1 (what libiscsi tools take).
    pub fn url(&self) -> String {
        format!("iscsi://127.0.0.1:{}/{TARGET}/1", self.port)
    }

    /// A session config for the lab target.
    pub fn config(&self) -> crate::Config {
        crate::Config::new(self.portal(), TARGET)
    }

    /// Kills the daemon at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(format!("/var/run/tgtd/socket.{}", self.control));
        let _ = std::fs::remove_file(format!("/var/run/tgtd/socket.{}.lock", self.control));
    }

    /// Sends `sig` to the daemon (SIGSTOP makes a hung target, SIGCONT revives it).
    pub fn signal(&self, sig: libc::c_int) {
        if let Some(c) = self.child.as_ref() {
            // SAFETY: plain syscall; the pid is our own child, not yet reaped.
            unsafe {
                libc::kill(c.id() as libc::pid_t, sig);
            }
        }
    }

    /// Whether the daemon runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for Tgtd {
    fn drop(&mut self) {
        // Nothing of tgtd's state outlives the test: kill it outright (its LUN file goes with
        // the temporary folder).
        self.kill();
    }
}

fn free_port() -> std::io::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// A tgtd control port number nobody on this machine uses now.
fn control_port() -> u32 {
    // tgtd takes -C values up to 32767 (0 is the system daemon's).
    let base = std::process::id().wrapping_mul(7919);
    loop {
        let n = 1000 + (base.wrapping_add(unique().wrapping_mul(104_729))) % 31_000;
        if !Path::new(&format!("/var/run/tgtd/socket.{n}")).exists() {
            return n;
        }
    }
}
