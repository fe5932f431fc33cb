//! The run directory tap-ctl, tapback and the tapdisks share ([`RunDir`]).
//!
//! Its default is blktap3's, `/run/blktap-control`, and the paths the Xen toolstack and xapi's
//! storage manager build there exist as blktap3 has them:
//!
//! | path | what |
//! | --- | --- |
//! | `tapdisk/tapdisk-<minor>` | the marker of an allocated minor (`tap-ctl allocate` prints it); the tapdisk serving the minor holds an `flock` on it ([`crate::minor`]) |
//! | `nbd<pid>.<minor>` | the NBD socket of each VBD (what Xen's `block-tap` writes as `physical-device-path`) |
//! | `tapdisk-rs/ctl/tapdisk-<pid>.sock` | our control sockets (blktap3's `ctl<pid>` speak another protocol, so ours are apart) |
//! | `tapdisk-rs/vbd/tapdev<minor>` | the device sockets local frontends attach to |
//! | `tapdisk-rs/log/tapdisk-<pid>.log` | the logs of tapdisks started by tap-ctl |

use std::path::PathBuf;

/// Environment variable naming the run directory (default [`DEFAULT_RUNDIR`]).
pub const RUNDIR_ENV: &str = "TAPDISK_RS_RUNDIR";

/// The run directory on a dom0: blktap3's.
pub const DEFAULT_RUNDIR: &str = "/run/blktap-control";

/// The run directory: control sockets, VBD sockets, minor markers, NBD sockets, logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunDir(pub PathBuf);

impl RunDir {
    /// `$TAPDISK_RS_RUNDIR`, or [`DEFAULT_RUNDIR`].
    pub fn from_env() -> RunDir {
        RunDir(
            std::env::var_os(RUNDIR_ENV)
                .map(PathBuf::from)
                .unwrap_or_else(|| DEFAULT_RUNDIR.into()),
        )
    }
    /// Folder of what only tapdisk-rs uses.
    pub fn own_dir(&self) -> PathBuf {
        self.0.join("tapdisk-rs")
    }
    /// Folder of control sockets.
    pub fn ctl_dir(&self) -> PathBuf {
        self.own_dir().join("ctl")
    }
    /// The control socket of tapdisk `pid`.
    pub fn ctl_socket(&self, pid: u32) -> PathBuf {
        self.ctl_dir().join(format!("tapdisk-{pid}.sock"))
    }
    /// Folder of VBD (local transport) sockets: the "device nodes".
    pub fn vbd_dir(&self) -> PathBuf {
        self.own_dir().join("vbd")
    }
    /// The local-transport socket of VBD `minor` (blktap's `/dev/xen/blktap-2/tapdevN`).
    pub fn vbd_socket(&self, minor: u32) -> PathBuf {
        self.vbd_dir().join(format!("tapdev{minor}"))
    }
    /// Folder of minor markers (blktap3's `tapdisk/`).
    pub fn minor_dir(&self) -> PathBuf {
        self.0.join("tapdisk")
    }
    /// The marker of minor `minor` (blktap3's `tapdisk/tapdisk-<minor>`).
    pub fn minor_marker(&self, minor: u32) -> PathBuf {
        self.minor_dir().join(format!("tapdisk-{minor}"))
    }
    /// The NBD socket every VBD is served on (blktap3's `nbd<pid>.<minor>`).
    pub fn nbd_socket(&self, pid: u32, minor: u32) -> PathBuf {
        self.0.join(format!("nbd{pid}.{minor}"))
    }
    /// Folder of log files of spawned tapdisks.
    pub fn log_dir(&self) -> PathBuf {
        self.own_dir().join("log")
    }
    /// The log of tapdisk `pid` started by tap-ctl.
    pub fn log_file(&self, pid: u32) -> PathBuf {
        self.log_dir().join(format!("tapdisk-{pid}.log"))
    }
    /// Creates the folders. Those it creates are `0700`: whoever can connect to a control
    /// socket can make tapdisk open any file and export it, and whoever can connect to a VBD
    /// or NBD socket gets the disk, so only their owner (root) may reach them. Folders that
    /// exist keep their modes (an operator who wants a group to have access arranges it).
    pub fn create(&self) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        for d in [
            self.0.clone(),
            self.minor_dir(),
            self.own_dir(),
            self.ctl_dir(),
            self.vbd_dir(),
            self.log_dir(),
        ] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn new_run_folders_are_owner_only_and_existing_ones_keep_their_mode() {
        let t = std::env::temp_dir().join(format!("rundir-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&t);
        std::fs::create_dir_all(t.join("tapdisk")).unwrap();
        std::fs::set_permissions(t.join("tapdisk"), std::fs::Permissions::from_mode(0o750))
            .unwrap();
        let r = RunDir(t.join("run"));
        r.create().unwrap();
        RunDir(t.clone()).create().unwrap();
        let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        for d in [
            r.0.clone(),
            r.minor_dir(),
            r.own_dir(),
            r.ctl_dir(),
            r.vbd_dir(),
            r.log_dir(),
        ] {
            assert_eq!(mode(d.clone()), 0o700, "{}", d.display());
        }
        assert_eq!(mode(t.join("tapdisk")), 0o750);
        std::fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn blktap3_paths() {
        let r = RunDir(DEFAULT_RUNDIR.into());
        assert_eq!(
            r.minor_marker(3),
            PathBuf::from("/run/blktap-control/tapdisk/tapdisk-3")
        );
        assert_eq!(
            r.nbd_socket(4242, 3),
            PathBuf::from("/run/blktap-control/nbd4242.3")
        );
        assert_eq!(
            r.ctl_socket(4242),
            PathBuf::from("/run/blktap-control/tapdisk-rs/ctl/tapdisk-4242.sock")
        );
    }
}
