//! Helpers of the interop tests: our binary, blktap3's tools (built once into a cache folder
//! from the peers folder beside the repo), processes, a deterministic generator.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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

#[path = "../../../../tests/src/blktap.rs"]
mod blktap_peers;
#[allow(unused_imports)] // not every test binary uses both
pub use blktap_peers::{blktap, bt};

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
