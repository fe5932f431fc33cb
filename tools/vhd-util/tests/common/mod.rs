//! Helpers of the interop tests: our binary, blktap3's tools (built once into a cache folder
//! from the peers folder beside the repo), processes, a deterministic generator.
#![allow(dead_code)]

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// Our vhd-util.
pub fn ours() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vhd-util"))
}

/// Runs a command, returning its output; panics with its stderr when it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// stdout of a command that must succeed.
pub fn stdout(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run(cmd).stdout).into_owned()
}

/// Whether a program is on the PATH.
pub fn have(prog: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {prog}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The peers folder: `$TAPDISK_RS_SHARED`, else `../shared` beside the repository.
fn shared() -> Option<PathBuf> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cands = [
        std::env::var_os("TAPDISK_RS_SHARED").map(PathBuf::from),
        Some(repo.join("../shared")),
    ];
    cands
        .into_iter()
        .flatten()
        .find(|p| p.join("peers/build-blktap3.sh").exists())
}

/// Where blktap3 is built once and reused.
const CACHE: &str = "/var/tmp/tapdisk-rs-blktap3";

/// blktap3's install prefix, building it on first use; `None` (with a message) where the
/// peers folder is absent, as on a user's machine.
pub fn blktap() -> Option<PathBuf> {
    static B: OnceLock<Option<PathBuf>> = OnceLock::new();
    B.get_or_init(|| {
        let Some(sh) = shared() else {
            eprintln!("skipping the blktap3 interop checks: no ../shared/peers beside the repository (set TAPDISK_RS_SHARED to use one elsewhere)");
            return None;
        };
        let prefix = PathBuf::from(CACHE);
        let ready = |p: &Path| {
            p.join("bin/vhd-util").exists() && p.join("sbin/tap-ctl").exists() && p.join("libexec/tapdisk").exists()
        };
        if !ready(&prefix) {
            // One build at a time across test processes.
            std::fs::create_dir_all("/var/tmp").ok();
            let lock = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open("/var/tmp/tapdisk-rs-blktap3.lock")
                .expect("lock file");
            // SAFETY: flock on a descriptor we own; no memory is passed.
            unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
            if !ready(&prefix) {
                eprintln!("building blktap3 into {CACHE} (about 30 s)");
                let st = Command::new("bash")
                    .arg(sh.join("peers/build-blktap3.sh"))
                    .arg(&prefix)
                    .status()
                    .expect("running build-blktap3.sh");
                assert!(st.success(), "build-blktap3.sh failed");
            }
        }
        Some(prefix)
    })
    .clone()
}

/// A blktap3 command with its libraries found.
pub fn bt(prefix: &Path, prog: &str) -> Command {
    let mut c = Command::new(prefix.join(prog));
    c.env("LD_LIBRARY_PATH", prefix.join("lib"));
    c
}

/// A VHD served by blktap3's tapdisk over NBD; destroyed on drop.
pub struct BlktapServe {
    prefix: PathBuf,
    pid: String,
    minor: String,
    /// The NBD socket.
    pub socket: PathBuf,
}

impl BlktapServe {
    /// `tap-ctl create -a vhd:IMAGE`.
    pub fn new(prefix: &Path, image: &Path) -> BlktapServe {
        let arg = format!("vhd:{}", image.display());
        run(bt(prefix, "sbin/tap-ctl").args(["create", "-a", &arg]));
        let list = stdout(bt(prefix, "sbin/tap-ctl").arg("list"));
        let line = list
            .lines()
            .find(|l| l.ends_with(&format!("args={arg}")))
            .unwrap_or_else(|| panic!("{arg} not in tap-ctl list:\n{list}"));
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap_or_else(|| panic!("no {k} in {line}"))
                .to_string()
        };
        let (pid, minor) = (field("pid="), field("minor="));
        let socket = PathBuf::from(format!("/run/blktap-control/nbd{pid}.{minor}"));
        for _ in 0..100 {
            if socket.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        BlktapServe {
            prefix: prefix.to_path_buf(),
            pid,
            minor,
            socket,
        }
    }

    /// qemu-io's image options for the export.
    pub fn qemu_opts(&self) -> String {
        format!("driver=nbd,path={}", self.socket.display())
    }

    /// The whole disk, read over NBD with nbdcopy.
    pub fn read_all(&self, dir: &Path) -> Vec<u8> {
        let out = dir.join(format!("nbd-{}-{}.raw", self.pid, self.minor));
        let uri = format!("nbd+unix:///?socket={}", self.socket.display());
        // blktap3's NBD server answers the final disconnect with garbage, so nbdcopy fails in
        // nbd_shutdown after copying everything; anything else is a real failure.
        let o = Command::new("nbdcopy")
            .arg(&uri)
            .arg(&out)
            .output()
            .expect("running nbdcopy");
        let err = String::from_utf8_lossy(&o.stderr);
        let only_shutdown = err.lines().all(|l| l.contains("nbd_shutdown"));
        assert!(
            o.status.success() || only_shutdown,
            "nbdcopy from {uri}: {err}"
        );
        let v = std::fs::read(&out).expect("reading the copy");
        std::fs::remove_file(&out).ok();
        v
    }
}

impl Drop for BlktapServe {
    fn drop(&mut self) {
        let _ = bt(&self.prefix, "sbin/tap-ctl")
            .args(["destroy", "-p", &self.pid, "-m", &self.minor])
            .output();
    }
}

/// A small deterministic generator.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// Reads a whole chain with our library.
pub fn read_chain(path: &Path) -> Vec<u8> {
    let set = vhd::ParentSet::new();
    let o = vhd::ChainOptions {
        read_only: true,
        ..Default::default()
    };
    let mut c = vhd::Chain::open(path, &o, &set)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let mut v = vec![0u8; c.size() as usize];
    c.read_at(0, &mut v).unwrap();
    v
}

/// Writes with our library and flushes.
pub fn write_chain(path: &Path, writes: &[(u64, Vec<u8>)]) {
    let set = vhd::ParentSet::new();
    let mut c = vhd::Chain::open(path, &vhd::ChainOptions::default(), &set)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    for (off, data) in writes {
        c.write_at(*off, data).unwrap();
    }
    c.flush().unwrap();
}

/// The first differing byte of two buffers, for messages.
pub fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}
