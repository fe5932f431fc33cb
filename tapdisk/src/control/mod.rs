//! The control socket: how `tap-ctl` drives a tapdisk process.
//!
//! Each tapdisk listens on `<rundir>/ctl/tapdisk-<pid>.sock`. The protocol ([`proto`]) is one
//! JSON object per line in each direction, request then response, versioned by a `v` field.
//! [`client`] is the calling side, shared by tap-ctl, td-bench and the tests; the serving side
//! lives in the daemon ([`crate::daemon`]).

pub mod client;
pub mod proto;

use std::path::PathBuf;

/// Environment variable naming the run directory (default `/run/tapdisk-rs`).
pub const RUNDIR_ENV: &str = "TAPDISK_RS_RUNDIR";

/// The run directory: control sockets, VBD sockets, minor numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunDir(pub PathBuf);

impl RunDir {
    /// `$TAPDISK_RS_RUNDIR`, or `/run/tapdisk-rs`.
    pub fn from_env() -> RunDir {
        RunDir(
            std::env::var_os(RUNDIR_ENV)
                .map(PathBuf::from)
                .unwrap_or_else(|| "/run/tapdisk-rs".into()),
        )
    }
    /// Folder of control sockets.
    pub fn ctl_dir(&self) -> PathBuf {
        self.0.join("ctl")
    }
    /// The control socket of tapdisk `pid`.
    pub fn ctl_socket(&self, pid: u32) -> PathBuf {
        self.ctl_dir().join(format!("tapdisk-{pid}.sock"))
    }
    /// Folder of VBD (local transport) sockets: the "device nodes".
    pub fn vbd_dir(&self) -> PathBuf {
        self.0.join("vbd")
    }
    /// The local-transport socket of VBD `minor` (blktap's `/dev/xen/blktap-2/tapdevN`).
    pub fn vbd_socket(&self, minor: u32) -> PathBuf {
        self.vbd_dir().join(format!("tapdev{minor}"))
    }
    /// Folder of minor-number claims.
    pub fn minor_dir(&self) -> PathBuf {
        self.0.join("minors")
    }
    /// Folder of log files of spawned tapdisks.
    pub fn log_dir(&self) -> PathBuf {
        self.0.join("log")
    }
    /// Creates the folders.
    pub fn create(&self) -> std::io::Result<()> {
        for d in [
            self.ctl_dir(),
            self.vbd_dir(),
            self.minor_dir(),
            self.log_dir(),
        ] {
            std::fs::create_dir_all(d)?;
        }
        Ok(())
    }
}
