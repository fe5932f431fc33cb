//! blktap3's own tools, the peers of the VHD interop and crash tests: built once into a cache
//! folder from the peers folder (`shared/peers/build-blktap3.sh`) and reused. Where the peers
//! folder is absent (a user's machine) the tests skip the blktap3 checks, saying so.
//!
//! This file is a module of the `tapdisk-e2e` harness and, through `#[path]`, of
//! `tools/vhd-util/tests/common`: it uses only `std` and `libc`.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The peers folder: `$TAPDISK_RS_SHARED`, else a `shared` folder beside the repository (or
/// beside one of its ancestors: a worktree's repository lives deeper).
fn shared() -> Option<PathBuf> {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let repo = here
        .ancestors()
        .find(|a| a.join("Cargo.lock").exists())
        .unwrap_or(here);
    let env = std::env::var_os("TAPDISK_RS_SHARED").map(PathBuf::from);
    env.into_iter()
        .chain(repo.ancestors().skip(1).map(|a| a.join("shared")))
        .find(|p| p.join("peers/build-blktap3.sh").exists())
}

/// Where blktap3 is built once and reused.
const CACHE: &str = "/var/tmp/tapdisk-rs-blktap3";

/// blktap3's install prefix, building it on first use; `None` (with a message) where the
/// peers folder is absent.
pub fn blktap() -> Option<PathBuf> {
    static B: OnceLock<Option<PathBuf>> = OnceLock::new();
    B.get_or_init(|| {
        let Some(sh) = shared() else {
            eprintln!(
                "skipping the blktap3 interop checks: no shared/peers beside the repository \
                 (set TAPDISK_RS_SHARED to use one elsewhere)"
            );
            return None;
        };
        let prefix = PathBuf::from(CACHE);
        let ready = |p: &Path| {
            p.join("bin/vhd-util").exists()
                && p.join("sbin/tap-ctl").exists()
                && p.join("libexec/tapdisk").exists()
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
