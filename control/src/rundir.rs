//! The run directory tap-ctl, tapback and the tapdisks share ([`RunDir`]).

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
    /// Creates the folders. Those it creates are `0700`: whoever can connect to a control
    /// socket can make tapdisk open any file and export it, and whoever can connect to a VBD
    /// socket gets the disk, so only their owner (root) may reach them. Folders that exist
    /// keep their modes (an operator who wants a group to have access arranges it).
    pub fn create(&self) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        for d in [
            self.0.clone(),
            self.ctl_dir(),
            self.vbd_dir(),
            self.minor_dir(),
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
        std::fs::create_dir_all(t.join("log")).unwrap();
        std::fs::set_permissions(t.join("log"), std::fs::Permissions::from_mode(0o750)).unwrap();
        let r = RunDir(t.join("run"));
        r.create().unwrap();
        RunDir(t.clone()).create().unwrap();
        let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        for d in [
            r.0.clone(),
            r.ctl_dir(),
            r.vbd_dir(),
            r.minor_dir(),
            r.log_dir(),
        ] {
            assert_eq!(mode(d.clone()), 0o700, "{}", d.display());
        }
        assert_eq!(mode(t.join("log")), 0o750);
        std::fs::remove_dir_all(&t).unwrap();
    }
}
